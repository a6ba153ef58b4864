//! The bodies of gRPC calls as lodestar wraps them: what each message
//! passes through ([`Messages`]: the size limit, then compression or
//! transcoding), a received body's deadline ([`CallBody`]), and a client's
//! request ([`RequestBody`]). The server's response body, which shares
//! [`Messages`] and [`Timer`], is `server/stack/response.rs`.
//!
//! Each poll hands the frame it got straight on: these bodies sit on the
//! path of every message, and a frame is over 100 bytes to move.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::codec::{self, Encoded, SendScope};
use crate::compression::ReceivedFlags;
use crate::deadline::{self, Deadline};
use crate::frames::Reframer;
use crate::metrics::rpc::Record;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The first error a request body yielded, shared with the response side so
/// the caller learns *why* a call failed rather than that a stream was reset.
pub(crate) type RequestError = Arc<OnceLock<tonic::Status>>;

/// A call's deadline and its timer.
#[derive(Debug)]
pub(crate) struct Timer {
    deadline: Deadline,
    sleep: Pin<Box<Sleep>>,
}

impl Timer {
    /// A timer for `deadline`: `sleep` if given (one already set for it).
    pub(crate) fn new(deadline: Deadline, sleep: Option<Pin<Box<Sleep>>>) -> Self {
        Self {
            deadline,
            sleep: sleep.unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline.instant()))),
        }
    }

    /// The deadline.
    pub(crate) fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// Whether the deadline has passed; if not, `cx` is woken when it does.
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.sleep.as_mut().poll(cx).is_ready()
    }
}

/// What [`Messages::pass`] made of a chunk of data.
#[derive(Debug)]
pub(crate) enum Passed {
    /// Data to yield.
    Data,
    /// Nothing yet: a message is still incomplete.
    Incomplete,
    /// The call ends with this status (boxed: this is returned for
    /// every chunk, and rarely this).
    End(Box<tonic::Status>),
}

/// What each message of a body passes through, in order: the limit on its
/// size, then the rewrite (decompression, transcoding, compression).
///
/// A message over the limit ends the call with `RESOURCE_EXHAUSTED`; the
/// complete messages before it are still delivered, and none of it is
/// buffered (nor, for a body being sent, encoded).
#[derive(Debug, Default)]
pub(crate) struct Messages {
    limit: Option<FrameLimit>,
    // Where the messages that pass are counted (metrics), if anywhere:
    // counted here, added to the series once, when the body goes.
    counted: Option<Counted>,
    // Boxed: rare (compression, JSON), and bodies are moved often.
    reframer: Option<Box<Reframer>>,
    // An error to yield on the next poll, after the data before it
    // (boxed: checked on every poll, and rarely there).
    pending: Option<Box<tonic::Status>>,
}

/// A body's messages, for a method's series: counted as they pass, added
/// to the series when dropped.
#[derive(Debug)]
struct Counted {
    series: Arc<crate::metrics::rpc::Series>,
    way: crate::metrics::rpc::Way,
    /// Messages counted already, when the counting began.
    from: u64,
}

impl Drop for Messages {
    fn drop(&mut self) {
        if let Some(counted) = self.counted.take() {
            let now = self.limit.as_ref().map_or(0, |limit| limit.messages);
            counted
                .series
                .messages(counted.way, now.saturating_sub(counted.from));
        }
    }
}

impl Messages {
    /// Counts the messages that pass from now on in `series`, as going
    /// `way`, until the body goes. (Only a body whose messages are
    /// followed, under a limit, counts them: every body lodestar's
    /// stacks make is.)
    pub(crate) fn count_in(
        &mut self,
        series: Arc<crate::metrics::rpc::Series>,
        way: crate::metrics::rpc::Way,
    ) {
        let from = self.limit.as_ref().map_or(0, |limit| limit.messages);
        self.counted = Some(Counted { series, way, from });
    }

    /// Messages limited to `limit` bytes, if given.
    pub(crate) fn new(limit: Option<usize>) -> Self {
        let mut messages = Self::default();
        messages.limit = limit.map(FrameLimit::new);
        messages
    }

    /// Refuses messages over `limit` bytes (keeping any flags recorded).
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit
            .get_or_insert_with(|| FrameLimit::new(limit))
            .limit = limit;
    }

    /// Records whether each message that passes was compressed.
    pub(crate) fn set_received_flags(&mut self, flags: Option<ReceivedFlags>) {
        if flags.is_none() && self.limit.is_none() {
            return;
        }
        self.limit
            .get_or_insert_with(|| FrameLimit::new(usize::MAX))
            .flags = flags;
    }

    /// Rewrites the messages that pass (decompress, transcode, compress).
    pub(crate) fn set_reframer(&mut self, reframer: Option<Reframer>) {
        self.reframer = reframer.filter(Reframer::is_active).map(Box::new);
    }

    /// The limit a body being sent encodes its messages under, if any
    /// (see [`SendScope`]).
    pub(crate) fn send_limit(&self) -> Option<usize> {
        self.limit.as_ref().map(|limit| limit.limit)
    }

    /// The error to end with now, after the data before it was delivered.
    #[inline]
    pub(crate) fn take_pending(&mut self) -> Option<Box<tonic::Status>> {
        self.pending.take()
    }

    /// Whether the body that passes through these checks, `inner`, has
    /// ended (no error waits to be yielded).
    pub(crate) fn is_end_stream(&self, inner: &impl Body) -> bool {
        self.pending.is_none() && inner.is_end_stream()
    }

    /// The size of the body that passes through these checks, `inner`:
    /// unknown if its messages are rewritten (compression changes the
    /// size) or it ends early.
    pub(crate) fn size_hint(&self, inner: &impl Body) -> SizeHint {
        if self.reframer.is_some() || self.pending.is_some() {
            return SizeHint::default();
        }
        inner.size_hint()
    }

    /// The status of a message the encoder refused during a poll that
    /// yielded no data to pass (an error or trailers instead).
    pub(crate) fn refused(&self, encoded: Option<&Encoded>) -> Option<tonic::Status> {
        let refused = encoded?.refused?;
        Some(too_large(refused.len as u64, self.send_limit()?))
    }

    /// Passes one chunk of the body's data, leaving in `data` what to
    /// yield now. `encoded` is what the encoder did while the chunk was
    /// produced, for a body being sent.
    #[inline]
    pub(crate) fn pass(&mut self, data: &mut Bytes, encoded: Option<&Encoded>) -> Passed {
        // The usual chunk: whole messages within the limit, nothing to
        // rewrite.
        if self.reframer.is_none() && !data.is_empty() {
            match self.limit.as_mut() {
                None => return Passed::Data,
                Some(limit) if limit.passes(data, encoded) => {
                    limit.messages += encoded.map_or(1, |e| e.checked as u64);
                    return Passed::Data;
                }
                Some(_) => {}
            }
        }
        self.pass_slowly(data, encoded)
    }

    /// [`pass`](Self::pass), any chunk.
    #[inline(never)]
    fn pass_slowly(&mut self, data: &mut Bytes, encoded: Option<&Encoded>) -> Passed {
        if let Some(refused) = encoded.and_then(|e| e.refused) {
            // Deliver the complete messages before the refused one first.
            let limit = self.send_limit().unwrap_or(usize::MAX);
            self.pending = Some(Box::new(too_large(refused.len as u64, limit)));
            data.truncate(refused.offset_in(data));
        } else if let Some(limit) = self.limit.as_mut() {
            let scanned = match encoded {
                Some(encoded) => limit.scan_sent(data, encoded),
                None => limit.scan(data),
            };
            if let Err((valid, status)) = scanned {
                // Deliver the complete messages before the oversized one first.
                data.truncate(valid);
                self.pending = Some(Box::new(status));
            }
        }
        if let Some(reframer) = self.reframer.as_mut() {
            match reframer.feed(data) {
                Ok(out) => *data = out,
                Err(status) => return Passed::End(Box::new(status)),
            }
        }
        if !data.is_empty() {
            return Passed::Data;
        }
        match self.pending.take() {
            Some(status) => Passed::End(status),
            None => Passed::Incomplete,
        }
    }

    /// The body ended: an error if it ended inside a message.
    pub(crate) fn finish(&self) -> Result<(), tonic::Status> {
        if self
            .reframer
            .as_ref()
            .is_some_and(|r| r.has_partial_frame())
        {
            return Err(tonic::Status::internal("the body ended inside a message"));
        }
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// A gRPC body being received (a client's response, a server's
    /// request), with a deadline and the [`Messages`] checks.
    ///
    /// * At the deadline, the call ends with `DEADLINE_EXCEEDED`, even if
    ///   the body always has more data ready.
    /// * A message whose length prefix exceeds the limit ends the call with
    ///   `RESOURCE_EXHAUSTED` before any of it is buffered; the complete
    ///   messages before it are still delivered.
    ///
    /// The body fails with the status; the reader gets it.
    pub struct CallBody<B> {
        #[pin]
        inner: B,
        timer: Option<Timer>,
        messages: Messages,
        request_error: Option<RequestError>,
        // Called when the body fails with an error that is not a status
        // of ours (the stream was reset, or the connection lost).
        on_broken: Option<fn()>,
        // A client call's record in the metrics, ended with the call.
        record: Record,
        done: bool,
    }
}

impl<B> std::fmt::Debug for CallBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<B> CallBody<B> {
    /// `inner`, ended at `deadline` and with messages limited to `limit`
    /// bytes, if given.
    pub(crate) fn new(inner: B, deadline: Option<Deadline>, limit: Option<usize>) -> Self {
        Self {
            inner,
            timer: deadline.map(|deadline| Timer::new(deadline, None)),
            messages: Messages::new(limit),
            request_error: None,
            on_broken: None,
            record: Record::default(),
            done: false,
        }
    }

    /// Ends `record` with the call's code when the body ends (a status in
    /// its trailers, a failure, its deadline), or `CANCELLED` if it is
    /// dropped first.
    /// Its messages count in the record's series, as received.
    pub(crate) fn set_record(&mut self, record: Record) {
        if let Some(series) = record.series() {
            let way = crate::metrics::rpc::Way::Received;
            self.messages.count_in(series.clone(), way);
        }
        self.record = record;
    }

    /// The body inside.
    #[cfg(feature = "otlp")]
    pub(crate) fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// What each message passes through, to configure.
    pub(crate) fn messages(&mut self) -> &mut Messages {
        &mut self.messages
    }

    /// Rewrites the messages that pass (decompress, transcode, compress).
    pub(crate) fn with_reframer(mut self, reframer: Option<Reframer>) -> Self {
        self.messages.set_reframer(reframer);
        self
    }

    /// Records whether each message that passes was compressed.
    pub(crate) fn with_received_flags(mut self, flags: Option<ReceivedFlags>) -> Self {
        self.messages.set_received_flags(flags);
        self
    }

    /// Calls `on_broken` when the body fails with an error that is not a
    /// status of ours: the stream was reset, or the connection lost.
    pub(crate) fn with_on_broken(mut self, on_broken: fn()) -> Self {
        self.on_broken = Some(on_broken);
        self
    }

    /// Reports `error`, if set, in place of the error of this body (the
    /// response to the request that failed).
    pub(crate) fn with_request_error(mut self, error: RequestError) -> Self {
        self.request_error = Some(error);
        self
    }
}

impl<B> Body for CallBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let failed = |done: &mut bool, record: &mut Record, status: tonic::Status| {
            *done = true;
            record.end(status.code());
            Poll::Ready(Some(Err(Box::new(status) as BoxError)))
        };
        if let Some(status) = this.messages.take_pending() {
            return failed(this.done, this.record, *status);
        }
        // The deadline first: a body that always has data must still end.
        if let Some(timer) = this.timer.as_mut()
            && timer.expired(cx)
        {
            return failed(
                this.done,
                this.record,
                deadline::exceeded("while streaming"),
            );
        }
        loop {
            let frame = match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    if let Some(status) = this.request_error.as_ref().and_then(|e| e.get()) {
                        return failed(this.done, this.record, status.clone());
                    }
                    *this.done = true;
                    let error = error.into();
                    // A reset or lost connection, as the caller sees it.
                    let code = error
                        .downcast_ref::<tonic::Status>()
                        .map_or(tonic::Code::Unavailable, tonic::Status::code);
                    this.record.end(code);
                    if let Some(on_broken) = this.on_broken
                        && !error.is::<tonic::Status>()
                    {
                        on_broken();
                    }
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    return match this.messages.finish() {
                        Ok(()) => {
                            // Trailers, if any, ended the record already.
                            this.record.end(tonic::Code::Unknown);
                            Poll::Ready(None)
                        }
                        Err(status) => failed(this.done, this.record, status),
                    };
                }
            };
            let mut data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        let code = crate::status::code_in(trailers);
                        this.record.end(code.unwrap_or(tonic::Code::Unknown));
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
            };
            match this.messages.pass(&mut data, None) {
                Passed::Data => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Passed::Incomplete => {}
                Passed::End(status) => return failed(this.done, this.record, *status),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.messages.is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        self.messages.size_hint(&self.inner)
    }
}

/// The trailers that end a call with `status`.
pub(crate) fn status_trailers(status: &tonic::Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert(
        crate::status::GRPC_STATUS,
        HeaderValue::from(status.code() as i32),
    );
    if let Ok(message) = HeaderValue::from_str(status.message()) {
        trailers.insert("grpc-message", message);
    }
    trailers
}

/// Follows the gRPC length-prefixed framing (1 flag byte, 4 length bytes,
/// then the message) across data chunks, and refuses a message whose
/// declared length is over the limit.
#[derive(Debug)]
struct FrameLimit {
    limit: usize,
    header: [u8; 5],
    have: usize,
    /// Message bytes still to skip before the next header.
    remaining: u64,
    /// Where to record each message's compressed flag, if anywhere.
    flags: Option<ReceivedFlags>,
    /// Messages whose header passed.
    messages: u64,
}

impl FrameLimit {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            header: [0; 5],
            have: 0,
            remaining: 0,
            flags: None,
            messages: 0,
        }
    }

    /// As [`scan`](Self::scan), but data that the encoder yielded having
    /// checked each message's size (whole messages, see
    /// [`Encoded::checked`](codec::Encoded::checked)) passes as it is.
    fn scan_sent(
        &mut self,
        data: &Bytes,
        encoded: &codec::Encoded,
    ) -> Result<(), (usize, tonic::Status)> {
        if self.passes(data, Some(encoded)) {
            self.messages += encoded.checked as u64;
            return Ok(());
        }
        self.scan(data)
    }

    /// Whether `data` is sure to pass without being followed, at a message
    /// boundary: whole messages the encoder yielded having checked each
    /// one's size (`encoded`, a body being sent, none refused), or one
    /// whole message within the limit (a unary call's usual chunk).
    #[inline]
    fn passes(&self, data: &[u8], encoded: Option<&codec::Encoded>) -> bool {
        if self.have != 0 || self.remaining != 0 {
            return false;
        }
        if let Some(encoded) = encoded {
            return encoded.checked > 0 && encoded.refused.is_none();
        }
        if self.flags.is_some() {
            return false;
        }
        let [_, a, b, c, d, ref message @ ..] = data[..] else {
            return false;
        };
        let len = u32::from_be_bytes([a, b, c, d]);
        u64::from(len) == message.len() as u64 && u64::from(len) <= self.limit as u64
    }

    /// Follows `data`. On an oversized message, returns how many leading
    /// bytes of `data` are complete messages (or parts of them) before the
    /// oversized message's header, and the status to end the call with.
    fn scan(&mut self, data: &Bytes) -> Result<(), (usize, tonic::Status)> {
        if self.passes(data, None) {
            self.messages += 1;
            return Ok(());
        }
        self.follow(data)
    }

    /// [`scan`](Self::scan), any chunk.
    fn follow(&mut self, data: &Bytes) -> Result<(), (usize, tonic::Status)> {
        let mut chunk = &data[..];
        while chunk.has_remaining() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                chunk.advance(skip);
                self.remaining -= skip as u64;
                continue;
            }
            let header_start = data.len() - chunk.len();
            // The usual header: whole in this chunk, read where it is.
            if self.have == 0
                && let [flag, a, b, c, d, ..] = chunk[..]
            {
                chunk.advance(5);
                self.header_read(flag, u32::from_be_bytes([a, b, c, d]), header_start)?;
                continue;
            }
            let take = (5 - self.have).min(chunk.len());
            self.header[self.have..self.have + take].copy_from_slice(&chunk[..take]);
            chunk.advance(take);
            // Where this header began in `data` (0 if it began in an earlier chunk).
            let began = if self.have == 0 { header_start } else { 0 };
            self.have += take;
            if self.have == 5 {
                self.have = 0;
                let [flag, a, b, c, d] = self.header;
                self.header_read(flag, u32::from_be_bytes([a, b, c, d]), began)?;
            }
        }
        Ok(())
    }

    /// A message header was read (it began at `began` in the chunk, or in
    /// an earlier chunk if 0): its message of `len` bytes is followed next.
    #[inline]
    fn header_read(
        &mut self,
        flag: u8,
        len: u32,
        began: usize,
    ) -> Result<(), (usize, tonic::Status)> {
        if let Some(flags) = &self.flags {
            flags.record(flag != 0);
        }
        if u64::from(len) > self.limit as u64 {
            return Err((began, too_large(u64::from(len), self.limit)));
        }
        self.messages += 1;
        self.remaining = u64::from(len);
        Ok(())
    }
}

/// The status of a call that would send or receive a message of `len`
/// bytes over `limit`.
fn too_large(len: u64, limit: usize) -> tonic::Status {
    tonic::Status::resource_exhausted(format!(
        "message of {len} bytes is larger than the limit of {limit} bytes"
    ))
}

pin_project_lite::pin_project! {
    /// A client's request body: refuses messages over the send limit
    /// before they are encoded, and keeps the first error it yields (see
    /// [`RequestError`]).
    pub(crate) struct RequestBody {
        #[pin]
        inner: tonic::body::Body,
        messages: Messages,
        error: RequestError,
        // Data read from it already (the retry layer reads a request to
        // keep a copy), yielded before the rest.
        ahead: Option<Bytes>,
    }
}

impl RequestBody {
    /// Wraps `inner`, refusing messages over `limit` bytes, and rewriting
    /// messages with `reframer`, if any.
    pub(crate) fn new(
        inner: tonic::body::Body,
        limit: usize,
        reframer: Option<Reframer>,
        error: RequestError,
    ) -> Self {
        let mut messages = Messages::new(Some(limit));
        messages.set_reframer(reframer);
        Self {
            inner,
            messages,
            error,
            ahead: None,
        }
    }

    /// Wraps `inner`, a body that is not gRPC's frames (a gRPC-Web text
    /// request, whose frames `inner` checked already), passing its data
    /// as it is.
    pub(crate) fn unchecked(inner: tonic::body::Body, error: RequestError) -> Self {
        Self {
            inner,
            messages: Messages::new(None),
            error,
            ahead: None,
        }
    }

    /// A body of `bytes` (a kept copy of a request, already checked and
    /// encoded) that reports its errors to `error`. Allocates nothing.
    pub(crate) fn replay(bytes: Bytes, error: RequestError) -> Self {
        let mut body = Self::new(tonic::body::Body::empty(), usize::MAX, None, error);
        body.unread(bytes);
        body
    }

    /// Puts `data`, read from this body, back before what is left of it.
    pub(crate) fn unread(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.ahead = Some(data);
        }
    }

    /// What each message passes through.
    pub(crate) fn messages(&mut self) -> &mut Messages {
        &mut self.messages
    }

    /// Where this body reports the first error it yields.
    pub(crate) fn error(&self) -> &RequestError {
        &self.error
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Some(data) = this.ahead.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let fail = |status: tonic::Status| {
            let _ = this.error.set(status.clone());
            Poll::Ready(Some(Err(status)))
        };
        if let Some(status) = this.messages.take_pending() {
            return fail(*status);
        }
        let mut inner = this.inner;
        loop {
            // The request is encoded here: messages over the send limit are
            // refused before they are encoded.
            let scope = this.messages.send_limit().map(SendScope::enter);
            let polled = inner.as_mut().poll_frame(cx);
            let encoded = scope.map(SendScope::finish);
            let mut data = match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        if let Some(status) = this.messages.refused(encoded.as_ref()) {
                            return fail(status);
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                other => {
                    if let Some(status) = this.messages.refused(encoded.as_ref()) {
                        return fail(status);
                    }
                    if let Poll::Ready(Some(Err(status))) = other {
                        return fail(status);
                    }
                    return other;
                }
            };
            match this.messages.pass(&mut data, encoded.as_ref()) {
                Passed::Data => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Passed::Incomplete => {}
                Passed::End(status) => return fail(*status),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && self.messages.is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        // None given: hyper would turn an exact one (a kept request's) into
        // a `content-length` header, which gRPC does not use and every
        // server would then parse and check.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7, len as usize));
        v
    }

    #[test]
    fn follows_frames_split_anywhere_and_keeps_what_came_before() {
        let mut stream = frame(3);
        stream.extend(frame(10));
        stream.extend(frame(0));
        let valid = stream.len();
        stream.extend(frame(11));
        for split in 1..stream.len() {
            let mut limit = FrameLimit::new(10);
            let (a, b) = stream.split_at(split);
            let (chunk, offset, result) = match limit.scan(&Bytes::copy_from_slice(a)) {
                Err(e) => (a, 0, Err(e)),
                Ok(()) => (b, a.len(), limit.scan(&Bytes::copy_from_slice(b))),
            };
            let (kept, status) = result.expect_err("the 11-byte message is over the limit");
            assert_eq!(status.code(), tonic::Code::ResourceExhausted);
            assert!(
                status.message().contains("11 bytes"),
                "{}",
                status.message()
            );
            // Everything before the bad header is delivered, and nothing after it.
            if valid >= offset {
                assert_eq!(kept, (valid - offset).min(chunk.len()), "split at {split}");
            } else {
                assert_eq!(kept, 0, "split at {split}");
            }
        }
        // A whole message over the limit, alone in its chunk.
        let (kept, _) = FrameLimit::new(10)
            .scan(&Bytes::from(frame(11)))
            .expect_err("over the limit");
        assert_eq!(kept, 0);
        let mut limit = FrameLimit::new(10);
        assert!(limit.scan(&Bytes::from(frame(10))).is_ok());
        assert!(limit.scan(&Bytes::from(frame(1))).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_is_always_ready_still_ends_at_the_deadline() {
        use http_body_util::BodyExt;
        let endless = http_body_util::StreamBody::new(futures_util::stream::repeat_with(|| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(frame(1))))
        }));
        let deadline = Deadline::after(std::time::Duration::from_millis(10));
        let mut body = std::pin::pin!(CallBody::new(endless, Some(deadline), Some(16)));
        tokio::time::advance(std::time::Duration::from_millis(20)).await;
        let error = body
            .frame()
            .await
            .expect("a frame")
            .expect_err("the deadline has passed");
        let status = error.downcast::<tonic::Status>().expect("a status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }
}

//! Body wrappers that enforce a call's deadline and the limits on message size.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::codec;
use crate::compression::ReceivedFlags;
use crate::deadline::{self, Deadline};
use crate::frames::Reframer;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The first error a request body yielded, shared with the response side so
/// the caller learns *why* a call failed rather than that a stream was reset.
pub(crate) type RequestError = Arc<OnceLock<tonic::Status>>;

/// Which body a [`CallBody`] wraps, which decides how it ends a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// A body being received: it fails, and the reader gets the status.
    Received,
    /// A server's response being sent: it ends with trailers carrying the
    /// status, and the handler's stream is dropped.
    ServerResponse,
}

pin_project_lite::pin_project! {
    /// A gRPC body with a deadline and a limit on the size of each message.
    ///
    /// * At the deadline, the call ends with `DEADLINE_EXCEEDED`, even if
    ///   the body always has more data ready.
    /// * A message whose length prefix exceeds the limit ends the call with
    ///   `RESOURCE_EXHAUSTED` before any of it is buffered; the complete
    ///   messages before it are still delivered.
    ///
    /// A body being received fails with the status; a server's response
    /// ends with trailers carrying it.
    ///
    /// It is kept small (the parts most calls do not use are boxed), as it
    /// is moved several times per call.
    pub struct CallBody<B> {
        #[pin]
        inner: B,
        sleep: Option<Pin<Box<Sleep>>>,
        deadline: Option<Deadline>,
        side: Side,
        limit: Option<FrameLimit>,
        // An error to yield on the next poll, after the data before it.
        pending: Option<tonic::Status>,
        request_error: Option<RequestError>,
        reframer: Option<Box<Reframer>>,
        // Extra trailers to merge into the final ones (server responses).
        trailers: Option<Box<HeaderMap>>,
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
    pub(crate) fn new(
        inner: B,
        deadline: Option<Deadline>,
        side: Side,
        limit: Option<usize>,
    ) -> Self {
        Self {
            inner,
            sleep: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.instant()))),
            deadline,
            side,
            limit: limit.map(FrameLimit::new),
            pending: None,
            request_error: None,
            reframer: None,
            trailers: None,
            done: false,
        }
    }

    /// Adds `trailers` to the trailers the response ends with.
    pub(crate) fn set_trailers(&mut self, trailers: Option<HeaderMap>) {
        self.trailers = trailers.map(Box::new);
    }

    /// Rewrites the messages that pass (decompress, transcode, compress).
    pub(crate) fn with_reframer(mut self, reframer: Option<Reframer>) -> Self {
        self.set_reframer(reframer);
        self
    }

    /// Rewrites the messages that pass (decompress, transcode, compress).
    pub(crate) fn set_reframer(&mut self, reframer: Option<Reframer>) {
        self.reframer = reframer.filter(Reframer::is_active).map(Box::new);
    }

    /// Records whether each message that passes was compressed.
    pub(crate) fn with_received_flags(mut self, flags: Option<ReceivedFlags>) -> Self {
        self.set_received_flags(flags);
        self
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

    /// Refuses messages over `limit` bytes (keeping any flags recorded).
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit
            .get_or_insert_with(|| FrameLimit::new(limit))
            .limit = limit;
    }

    /// Ends the call at `deadline`, with `sleep` (a timer set for it) as
    /// the timer if given.
    pub(crate) fn set_deadline(&mut self, deadline: Deadline, sleep: Option<Pin<Box<Sleep>>>) {
        self.sleep =
            Some(sleep.unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline.instant()))));
        self.deadline = Some(deadline);
    }

    /// Reports `error`, if set, in place of the error of this body (the
    /// response to the request that failed).
    pub(crate) fn with_request_error(mut self, error: RequestError) -> Self {
        self.request_error = Some(error);
        self
    }
}

/// A server's response body as a layer can make one: `http_body_util`
/// and tonic bodies convert with [`tonic::body::Body::new`] first.
impl From<tonic::body::Body> for CallBody<tonic::body::Body> {
    fn from(body: tonic::body::Body) -> Self {
        Self::new(body, None, Side::ServerResponse, None)
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
        if let Some(status) = this.pending.take() {
            *this.done = true;
            return Poll::Ready(Some(end(*this.side, status)));
        }
        // The deadline first: a body that always has data must still end.
        if let Some(sleep) = this.sleep.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            *this.done = true;
            let status = deadline::exceeded("while streaming");
            return Poll::Ready(Some(end(*this.side, status)));
        }
        loop {
            // A server's response stream runs with the inbound deadline
            // current, so calls made while producing it are bounded by it too.
            let inner = this.inner.as_mut();
            let poll = || match (*this.side, *this.deadline) {
                (Side::ServerResponse, Some(deadline)) => {
                    deadline::sync_scope(deadline, || inner.poll_frame(cx))
                }
                _ => inner.poll_frame(cx),
            };
            // A server's response is encoded here: messages over the send
            // limit are refused before they are encoded.
            let (frame, encoded) = match (*this.side, this.limit.as_ref()) {
                (Side::ServerResponse, Some(limit)) => codec::with_send_limit(limit.limit, poll),
                _ => (poll(), codec::Encoded::default()),
            };
            let refused = encoded.refused;
            let Poll::Ready(frame) = frame else {
                return Poll::Pending;
            };
            // The status of a refused message, and where its frame starts.
            let refused = refused
                .zip(this.limit.as_ref())
                .map(|(refused, limit)| (too_large(refused.len as u64, limit.limit), refused));
            if let Some((status, _)) = &refused
                && !matches!(&frame, Some(Ok(frame)) if frame.is_data())
            {
                *this.done = true;
                return Poll::Ready(Some(end(*this.side, status.clone())));
            }
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    *this.done = true;
                    if let Some(status) = this.request_error.as_ref().and_then(|e| e.get()) {
                        return Poll::Ready(Some(Err(Box::new(status.clone()))));
                    }
                    return Poll::Ready(Some(Err(error.into())));
                }
                None => {
                    if this
                        .reframer
                        .as_ref()
                        .is_some_and(|r| r.has_partial_frame())
                    {
                        *this.done = true;
                        let status = tonic::Status::internal("the body ended inside a message");
                        return Poll::Ready(Some(end(*this.side, status)));
                    }
                    return Poll::Ready(None);
                }
            };
            let mut data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    let frame = match (frame.into_trailers(), this.trailers.take()) {
                        (Ok(mut trailers), Some(extra)) => {
                            for (name, value) in extra.iter() {
                                trailers.append(name, value.clone());
                            }
                            Frame::trailers(trailers)
                        }
                        (Ok(trailers), None) => Frame::trailers(trailers),
                        (Err(frame), _) => frame,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
            };
            if let Some((status, refused)) = refused {
                // Deliver the complete messages before the refused one first.
                *this.pending = Some(status);
                data = data.slice(..refused.offset_in(&data));
            } else if let Some(limit) = this.limit.as_mut()
                && let Err((valid, status)) = limit.scan_sent(&data, &encoded)
            {
                // Deliver the complete messages before the oversized one first.
                *this.pending = Some(status);
                data = data.slice(..valid);
            }
            if let Some(reframer) = this.reframer.as_mut() {
                match reframer.feed(&data) {
                    Ok(out) => data = out,
                    Err(status) => {
                        *this.done = true;
                        return Poll::Ready(Some(end(*this.side, status)));
                    }
                }
            }
            if data.is_empty() {
                if let Some(status) = this.pending.take() {
                    *this.done = true;
                    return Poll::Ready(Some(end(*this.side, status)));
                }
                continue; // a frame is still incomplete
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.pending.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // Compression changes the size; so does ending early.
        if self.reframer.is_some() || self.pending.is_some() {
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

fn end(side: Side, status: tonic::Status) -> Result<Frame<Bytes>, BoxError> {
    match side {
        Side::Received => Err(Box::new(status)),
        Side::ServerResponse => Ok(Frame::trailers(status_trailers(&status))),
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
}

impl FrameLimit {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            header: [0; 5],
            have: 0,
            remaining: 0,
            flags: None,
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
        if encoded.checked > 0 && self.have == 0 && self.remaining == 0 {
            return Ok(());
        }
        self.scan(data)
    }

    /// Follows `data`. On an oversized message, returns how many leading
    /// bytes of `data` are complete messages (or parts of them) before the
    /// oversized message's header, and the status to end the call with.
    #[inline]
    fn scan(&mut self, data: &Bytes) -> Result<(), (usize, tonic::Status)> {
        // One whole message within the limit, at a message boundary (a
        // unary call's usual chunk): checked in place.
        if self.have == 0
            && self.remaining == 0
            && self.flags.is_none()
            && let [_, a, b, c, d, ref message @ ..] = data[..]
        {
            let len = u32::from_be_bytes([a, b, c, d]);
            if u64::from(len) == message.len() as u64 && u64::from(len) <= self.limit as u64 {
                return Ok(());
            }
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
            let take = (5 - self.have).min(chunk.len());
            self.header[self.have..self.have + take].copy_from_slice(&chunk[..take]);
            chunk.advance(take);
            // Where this header began in `data` (0 if it began in an earlier chunk).
            let began = if self.have == 0 { header_start } else { 0 };
            self.have += take;
            if self.have == 5 {
                self.have = 0;
                let [flag, a, b, c, d] = self.header;
                let len = u32::from_be_bytes([a, b, c, d]);
                if let Some(flags) = &self.flags {
                    flags.record(flag != 0);
                }
                if u64::from(len) > self.limit as u64 {
                    return Err((began, too_large(u64::from(len), self.limit)));
                }
                self.remaining = u64::from(len);
            }
        }
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
    /// A request body that refuses messages over the send limit and keeps
    /// the first error it yields (see [`RequestError`]).
    pub(crate) struct RequestBody {
        #[pin]
        inner: tonic::body::Body,
        limit: FrameLimit,
        // Boxed: rare (compression, JSON), and every request is moved often.
        reframer: Option<Box<Reframer>>,
        pending: Option<tonic::Status>,
        error: RequestError,
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
        Self {
            inner,
            limit: FrameLimit::new(limit),
            reframer: reframer.filter(Reframer::is_active).map(Box::new),
            pending: None,
            error,
        }
    }

    /// A body of `bytes` (a kept copy of a request, already checked and
    /// encoded) that reports its errors to `error`.
    pub(crate) fn replay(bytes: Bytes, error: RequestError) -> Self {
        let body = tonic::body::Body::new(http_body_util::Full::new(bytes));
        Self::new(body, usize::MAX, None, error)
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
        let fail = |error: &RequestError, status: tonic::Status| {
            let _ = error.set(status.clone());
            Poll::Ready(Some(Err(status)))
        };
        if let Some(status) = this.pending.take() {
            return fail(this.error, status);
        }
        let mut inner = this.inner;
        loop {
            // The request is encoded here: messages over the send limit are
            // refused before they are encoded.
            let (frame, encoded) =
                codec::with_send_limit(this.limit.limit, || inner.as_mut().poll_frame(cx));
            let refused = encoded
                .refused
                .map(|r| (too_large(r.len as u64, this.limit.limit), r));
            if let Some((status, _)) = &refused
                && !matches!(&frame, Poll::Ready(Some(Ok(frame))) if frame.is_data())
            {
                return fail(this.error, status.clone());
            }
            let frame = match frame {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(status))) => return fail(this.error, status),
                other => return other,
            };
            let mut data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            if let Some((status, refused)) = refused {
                *this.pending = Some(status);
                data = data.slice(..refused.offset_in(&data));
            } else if let Err((valid, status)) = this.limit.scan_sent(&data, &encoded) {
                *this.pending = Some(status);
                data = data.slice(..valid);
            }
            if let Some(reframer) = this.reframer.as_mut() {
                match reframer.feed(&data) {
                    Ok(out) => data = out,
                    Err(status) => return fail(this.error, status),
                }
            }
            if data.is_empty() {
                if let Some(status) = this.pending.take() {
                    return fail(this.error, status);
                }
                continue;
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
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
        let mut body = std::pin::pin!(CallBody::new(
            endless,
            Some(deadline),
            Side::Received,
            Some(16)
        ));
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

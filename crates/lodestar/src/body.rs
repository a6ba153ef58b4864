//! [`CallBody`]: the body wrapper that enforces a call's deadline and the
//! receive limit on message size.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::deadline::{self, Deadline};

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
    /// * At the deadline, the call ends with `DEADLINE_EXCEEDED`.
    /// * A message whose length prefix exceeds the limit ends the call with
    ///   `RESOURCE_EXHAUSTED` before any of it is buffered.
    ///
    /// A body being received fails with the status; a server's response
    /// ends with trailers carrying it.
    pub struct CallBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Option<Sleep>,
        side: Side,
        done: bool,
        limit: Option<FrameLimit>,
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
            sleep: deadline.map(|d| tokio::time::sleep_until(d.instant())),
            side,
            done: false,
            limit: limit.map(FrameLimit::new),
        }
    }
}

impl<B> Body for CallBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if let (Some(Ok(frame)), Some(limit)) = (&frame, this.limit.as_mut())
                && let Some(data) = frame.data_ref()
                && let Err(status) = limit.scan(data)
            {
                *this.done = true;
                return Poll::Ready(Some(end(*this.side, status)));
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some(sleep) = this.sleep.as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            *this.done = true;
            let status = deadline::exceeded("while streaming the response");
            return Poll::Ready(Some(end(*this.side, status)));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn end(side: Side, status: tonic::Status) -> Result<Frame<Bytes>, BoxError> {
    match side {
        Side::Received => Err(Box::new(status)),
        Side::ServerResponse => Ok(Frame::trailers(status_trailers(&status))),
    }
}

fn status_trailers(status: &tonic::Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
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
}

impl FrameLimit {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            header: [0; 5],
            have: 0,
            remaining: 0,
        }
    }

    fn scan(&mut self, data: &Bytes) -> Result<(), tonic::Status> {
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
            let take = (5 - self.have).min(chunk.len());
            self.header[self.have..self.have + take].copy_from_slice(&chunk[..take]);
            chunk.advance(take);
            self.have += take;
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if u64::from(len) > self.limit as u64 {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "message of {len} bytes is larger than the limit of {} bytes",
                        self.limit
                    )));
                }
                self.remaining = u64::from(len);
            }
        }
        Ok(())
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
    fn follows_frames_split_anywhere() {
        let mut stream = frame(3);
        stream.extend(frame(10));
        stream.extend(frame(0));
        stream.extend(frame(11));
        for split in 1..stream.len() {
            let mut limit = FrameLimit::new(10);
            let (a, b) = stream.split_at(split);
            let first = limit.scan(&Bytes::copy_from_slice(a));
            let result = first.and_then(|()| limit.scan(&Bytes::copy_from_slice(b)));
            let status = result.expect_err("the 11-byte message is over the limit");
            assert_eq!(status.code(), tonic::Code::ResourceExhausted);
            assert!(
                status.message().contains("11 bytes"),
                "{}",
                status.message()
            );
        }
        let mut limit = FrameLimit::new(10);
        assert!(limit.scan(&Bytes::from(frame(10))).is_ok());
        assert!(limit.scan(&Bytes::from(frame(1))).is_ok());
    }
}

pin_project_lite::pin_project! {
    /// A request body that keeps the first error it yields, so that the
    /// caller learns why a request failed (for example, a message over the
    /// send limit) instead of only that the stream was reset.
    pub(crate) struct RequestBody {
        #[pin]
        inner: tonic::body::Body,
        limit: FrameLimit,
        error: std::sync::Arc<std::sync::OnceLock<tonic::Status>>,
    }
}

impl RequestBody {
    /// Wraps `inner`, refusing messages over `limit` bytes.
    pub(crate) fn new(
        inner: tonic::body::Body,
        limit: usize,
    ) -> (Self, std::sync::Arc<std::sync::OnceLock<tonic::Status>>) {
        let error = std::sync::Arc::new(std::sync::OnceLock::new());
        (
            Self {
                inner,
                limit: FrameLimit::new(limit),
                error: error.clone(),
            },
            error,
        )
    }

    /// The wrapped body, for sending again elsewhere.
    pub(crate) fn into_inner(self) -> tonic::body::Body {
        self.inner
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
        let mut frame = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(data))) = &frame
            && let Some(Err(status)) = data.data_ref().map(|d| this.limit.scan(d))
        {
            frame = Poll::Ready(Some(Err(status)));
        }
        if let Poll::Ready(Some(Err(status))) = &frame {
            let _ = this.error.set(status.clone());
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! The response body as the server's layers see it ([`ResponseBody`]):
//! the handler's, in the one wrapper that every layer sets its part of.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tower::BoxError;

use super::call_end::Unended;
use crate::body::{Messages, Passed, Timer, status_trailers};
use crate::codec::SendScope;
use crate::deadline::{self, Deadline};
use crate::frames::Reframer;
use crate::server::budget::EndsCall;

pin_project_lite::pin_project! {
    /// The body of a response as the server's layers see it: the
    /// handler's, in the one wrapper that
    ///
    /// * ends the response stream at the inbound deadline, with
    ///   `DEADLINE_EXCEEDED` in its trailers, and keeps that deadline
    ///   current while the stream is polled (calls made to produce it are
    ///   bounded by it too);
    /// * refuses a message over the send limit before it is encoded: the
    ///   messages before it are sent, then `RESOURCE_EXHAUSTED`;
    /// * compresses or transcodes the messages, as the call asked;
    /// * adds the handler's trailers to the final ones;
    /// * reports the call's final status to its
    ///   [`CallEnd`](super::CallEnd) hooks: the status in the trailers, or
    ///   `CANCELLED` if the body is dropped before them.
    ///
    /// A layer that answers by itself makes one from a `tonic::body::Body`
    /// (`ResponseBody::from`), or fails with a [`tonic::Status`] instead.
    pub struct ResponseBody {
        #[pin]
        inner: tonic::body::Body,
        timer: Option<Timer>,
        messages: Messages,
        // Extra trailers to merge into the final ones.
        trailers: Option<Box<HeaderMap>>,
        // Current while the body below is polled.
        call: Unended,
        done: bool,
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// A server's response body as a layer can make one: `http_body_util`
/// and tonic bodies convert with [`tonic::body::Body::new`] first.
impl From<tonic::body::Body> for ResponseBody {
    fn from(inner: tonic::body::Body) -> Self {
        Self {
            inner,
            timer: None,
            messages: Messages::default(),
            trailers: None,
            call: Unended::default(),
            done: false,
        }
    }
}

impl ResponseBody {
    /// Adds `trailers` to the trailers the response ends with.
    pub(super) fn set_trailers(&mut self, trailers: Option<HeaderMap>) {
        self.trailers = trailers.map(Box::new);
    }

    /// Compresses or transcodes the messages that pass.
    pub(super) fn set_reframer(&mut self, reframer: Option<Reframer>) {
        self.messages.set_reframer(reframer);
    }

    /// Refuses messages over `limit` bytes.
    pub(super) fn set_limit(&mut self, limit: usize) {
        self.messages.set_limit(limit);
    }

    /// Ends the response at `deadline`, with `sleep` (a timer set for it).
    pub(super) fn set_deadline(&mut self, deadline: Deadline, sleep: Pin<Box<Sleep>>) {
        self.timer = Some(Timer::new(deadline, Some(sleep)));
    }

    /// Reports the end of `call`, which this body now ends.
    pub(super) fn set_call(&mut self, call: Unended) {
        if let Some(series) = call.series() {
            let way = crate::metrics::rpc::Way::Sent;
            self.messages.count_in(series.clone(), way);
        }
        self.call = call;
    }

    /// Ends the call with `status`, in the trailers this returns.
    fn end(done: &mut bool, call: &mut Unended, status: &tonic::Status) -> Frame<Bytes> {
        *done = true;
        call.end_with_status(status);
        Frame::trailers(status_trailers(status))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Some(status) = this.messages.take_pending() {
            return Poll::Ready(Some(Ok(Self::end(this.done, this.call, &status))));
        }
        // The deadline first: a body that always has data must still end.
        if let Some(timer) = this.timer.as_mut()
            && timer.expired(cx)
        {
            let status = deadline::exceeded("while streaming");
            return Poll::Ready(Some(Ok(Self::end(this.done, this.call, &status))));
        }
        loop {
            // The messages are encoded here, under the send limit, with the
            // call (and its deadline) current.
            let scope = this.messages.send_limit().map(SendScope::enter);
            let polled = {
                let _entered = this.call.enter();
                match this.timer.as_ref() {
                    Some(timer) => deadline::sync_scope(timer.deadline(), || {
                        this.inner.as_mut().poll_frame(cx)
                    }),
                    None => this.inner.as_mut().poll_frame(cx),
                }
            };
            let encoded = scope.map(SendScope::finish);
            let frame = match ready!(polled) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    // HTTP/2 resets the stream; the client sees an internal error.
                    *this.done = true;
                    let status = tonic::Status::internal(format!("the response failed: {error}"));
                    this.call.end_with_status(&status);
                    return Poll::Ready(Some(Err(error.into())));
                }
                None => {
                    let ended = this
                        .messages
                        .refused(encoded.as_ref())
                        .map_or_else(|| this.messages.finish(), Err);
                    if let Err(status) = ended {
                        return Poll::Ready(Some(Ok(Self::end(this.done, this.call, &status))));
                    }
                    this.call.end_with_headers(&HeaderMap::new());
                    return Poll::Ready(None);
                }
            };
            let mut data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Some(status) = this.messages.refused(encoded.as_ref()) {
                        return Poll::Ready(Some(Ok(Self::end(this.done, this.call, &status))));
                    }
                    let mut trailers = match frame.into_trailers() {
                        Ok(trailers) => trailers,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    if let Some(extra) = this.trailers.take() {
                        for (name, value) in extra.iter() {
                            trailers.append(name, value.clone());
                        }
                    }
                    this.call.end_with_headers(&trailers);
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            };
            match this.messages.pass(&mut data, encoded.as_ref()) {
                Passed::Data => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Passed::Incomplete => {}
                Passed::End(status) => {
                    return Poll::Ready(Some(Ok(Self::end(this.done, this.call, &status))));
                }
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

impl EndsCall for ResponseBody {
    fn ended(self: Pin<&mut Self>, status: &tonic::Status) -> Frame<Bytes> {
        self.project().call.end_with_status(status);
        Frame::trailers(status_trailers(status))
    }
}

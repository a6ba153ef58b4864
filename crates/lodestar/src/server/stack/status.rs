//! The status layer: every call ends with a proper gRPC status, and the
//! [`CallEnd`] hooks learn which: the status layer's future, then its
//! response body, hold the call's hooks, and make the call current while
//! they poll the layers below (so that those can register).
//!
//! The layers below it (the user's, then lodestar's) may fail with an
//! error instead of a response; it becomes a trailers-only response with a
//! gRPC status (see `status.rs`), in JSON's content type for JSON calls,
//! never a reset stream or an HTTP error.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tonic::Code;
use tower::{BoxError, Layer, Service};

use hyper::body::Incoming;

use super::call_end::{Call, CallEnd};
use super::request::RequestBody;
use super::{GRPC_STATUS, ResponseBody, reject};
use crate::codec as json;
use crate::headers::{find_header, has_header};
use crate::server::budget::EndsCall;

/// Maps errors to statuses and reports each call's end.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StatusLayer;

impl<S> Layer<S> for StatusLayer {
    type Service = StatusService<S>;

    fn layer(&self, inner: S) -> StatusService<S> {
        StatusService { inner }
    }
}

/// See [`StatusLayer`].
#[derive(Debug, Clone)]
pub(crate) struct StatusService<S> {
    inner: S,
}

impl<S> StatusService<S> {
    /// The service below.
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S> Service<Request<Incoming>> for StatusService<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<StatusBody>;
    type Error = std::convert::Infallible;
    type Future = StatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service is the user layers' segment, which is always
        // ready: their own readiness is awaited inside each call, where an
        // error becomes the call's status.
        let _ = ready!(self.inner.poll_ready(cx));
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let json = json::is_json(request.headers());
        // The deadline runs from arrival: read it before any layer can
        // make the call wait (a malformed one is refused below, as before).
        let timeout = find_header(request.headers(), &crate::grpc_timeout::HEADER);
        let arrived = crate::deadline::inbound(timeout);
        let mut request = request.map(|body| RequestBody::new(body, json));
        match arrived {
            Ok(None) => {}
            Ok(Some(deadline)) => {
                request.extensions_mut().insert(deadline);
                request.body_mut().plan.arrived = Some(deadline);
            }
            Err(status) => request.body_mut().plan.refusal = Some(status),
        }
        request.extensions_mut().insert(CallEnd::HANDLE);
        StatusFuture {
            inner: self.inner.call(request),
            call: Unended(Some(Call::new())),
            json,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`StatusService`].
    pub(crate) struct StatusFuture<F> {
        #[pin]
        inner: F,
        // Current while the layers below are polled.
        call: Unended,
        json: bool,
    }
}

impl<F, E> Future for StatusFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<StatusBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut inner = this.inner;
        let answer = match this.call.0.as_mut() {
            Some(call) => call.enter(|| inner.as_mut().poll(cx)),
            None => inner.poll(cx),
        };
        let response = match ready!(answer) {
            Ok(response) => response,
            Err(error) => {
                let status = crate::status::from_layer_error(error.into());
                if let Some(call) = this.call.0.take() {
                    call.end_with_status(&status);
                }
                let response = reject(status, *this.json);
                return Poll::Ready(Ok(response.map(|body| StatusBody {
                    inner: body,
                    call: Unended(None),
                })));
            }
        };
        let mut call = this.call.0.take();
        // A trailers-only response ends the call here.
        if has_header(response.headers(), &GRPC_STATUS)
            && let Some(call) = call.take()
        {
            call.end_with_headers(response.headers());
        }
        Poll::Ready(Ok(response.map(|body| StatusBody {
            inner: body,
            call: Unended(call),
        })))
    }
}

/// A call that has not ended yet: ends it `CANCELLED` when dropped, as the
/// call is then abandoned (the client reset the stream or went away, or
/// the connection closed) before its status was sent.
#[derive(Debug)]
struct Unended(Option<Call>);

impl Drop for Unended {
    fn drop(&mut self) {
        if let Some(call) = self.0.take() {
            call.end(|| {
                (
                    Code::Cancelled,
                    super::call_end::Message::Text(super::call_end::CANCELLED),
                )
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that reports its call's end: the status in its
    /// trailers, or `CANCELLED` if it is dropped before them.
    pub(crate) struct StatusBody {
        #[pin]
        inner: ResponseBody,
        // Current while the body below is polled.
        call: Unended,
    }
}

impl StatusBody {
    fn finish(call: &mut Unended, outcome: impl FnOnce(Call)) {
        if let Some(call) = call.0.take() {
            outcome(call);
        }
    }
}

impl Body for StatusBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut inner = this.inner;
        let Some(call) = this.call.0.as_mut() else {
            return inner.poll_frame(cx);
        };
        let frame = ready!(call.enter(|| inner.as_mut().poll_frame(cx)));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    Self::finish(this.call, |call| call.end_with_headers(trailers));
                }
            }
            Some(Err(error)) => {
                // HTTP/2 resets the stream; the client sees an internal error.
                let status = tonic::Status::internal(format!("the response failed: {error}"));
                Self::finish(this.call, |call| call.end_with_status(&status));
            }
            None => Self::finish(this.call, |call| call.end_with_headers(&HeaderMap::new())),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl EndsCall for StatusBody {
    fn ended(self: Pin<&mut Self>, status: &tonic::Status) {
        Self::finish(self.project().call, |call| call.end_with_status(status));
    }
}

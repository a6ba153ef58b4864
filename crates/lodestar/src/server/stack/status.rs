//! The status layer: every call ends with a proper gRPC status, and the
//! [`CallEnd`] hooks learn which: the status layer's future, then the
//! response body ([`ResponseBody`], `response.rs`), hold the call's hooks,
//! and make the call current while they poll the layers below (so that
//! those can register).
//!
//! The layers below it (the user's, then lodestar's) may fail with an
//! error instead of a response; it becomes a trailers-only response with a
//! gRPC status (see `status.rs`), in JSON's content type for JSON calls,
//! never a reset stream or an HTTP error.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use tower::{BoxError, Layer, Service};

use super::call_end::{Call, CallEnd, Unended};
use super::request::{Inbound, RequestBody};
use super::{GRPC_STATUS, ResponseBody, reject};
use crate::codec as json;
use crate::headers::{find_header, has_header};
use crate::metrics::rpc::{MethodTable, Record};

/// Maps errors to statuses and reports each call's end: to the
/// [`CallEnd`] hooks, and to the server's metrics (by method, if counted).
#[derive(Debug, Clone, Default)]
pub(crate) struct StatusLayer {
    pub(crate) methods: Option<MethodTable>,
}

impl<S> Layer<S> for StatusLayer {
    type Service = StatusService<S>;

    fn layer(&self, inner: S) -> StatusService<S> {
        StatusService {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// See [`StatusLayer`].
#[derive(Debug, Clone)]
pub(crate) struct StatusService<S> {
    inner: S,
    methods: Option<MethodTable>,
}

impl<S> StatusService<S> {
    /// The service below.
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S, B> Service<Request<B>> for StatusService<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    B: Into<Inbound>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = std::convert::Infallible;
    type Future = StatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service is the user layers' segment, which is always
        // ready: their own readiness is awaited inside each call, where an
        // error becomes the call's status.
        let _ = ready!(self.inner.poll_ready(cx));
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let record = match &self.methods {
            Some(methods) => methods.find(request.uri().path()).start(),
            None => Record::default(),
        };
        let json = json::is_json(request.headers());
        // The deadline runs from arrival: read it before any layer can
        // make the call wait (a malformed one is refused below, as before).
        let timeout = find_header(request.headers(), &crate::grpc_timeout::HEADER);
        let arrived = crate::deadline::inbound(timeout);
        let mut request = request.map(|body| RequestBody::new(body, json));
        if let Some(series) = record.series() {
            let way = crate::metrics::rpc::Way::Received;
            request.body_mut().messages().count_in(series.clone(), way);
        }
        let deadline = match arrived {
            Ok(None) => None,
            Ok(Some(deadline)) => {
                request.extensions_mut().insert(deadline);
                request.body_mut().plan.arrived = Some(deadline);
                Some(deadline)
            }
            Err(status) => {
                request.body_mut().plan.refusal = Some(status);
                None
            }
        };
        request.extensions_mut().insert(CallEnd::HANDLE);
        StatusFuture {
            inner: self.inner.call(request),
            call: Unended::new(Some(Call::new()), record, deadline),
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
    type Output = Result<Response<ResponseBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut inner = this.inner;
        let answer = {
            let _entered = this.call.enter();
            inner.as_mut().poll(cx)
        };
        let mut response = match ready!(answer) {
            Ok(response) => response,
            Err(error) => {
                let status = crate::status::from_layer_error(error.into());
                this.call.end_with_status(&status);
                return Poll::Ready(Ok(reject(status, *this.json)));
            }
        };
        // A trailers-only response ends the call here; the body ends any other.
        if has_header(response.headers(), &GRPC_STATUS) {
            this.call.end_with_headers(response.headers());
        } else {
            response.body_mut().set_call(this.call.take());
        }
        Poll::Ready(Ok(response))
    }
}

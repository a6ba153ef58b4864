//! The metrics layer: each call counted by method and final status, in
//! the client's [`metrics`](crate::metrics) (`rpc_client_*`).
//!
//! Outermost of lodestar's layers, so a call's duration covers everything
//! below (waiting for instances, retries, backoff) and its code is the one
//! the caller sees: the status a layer fails it with, the one in its
//! trailers, `DEADLINE_EXCEEDED` mid-stream, or `CANCELLED` when the caller
//! drops it first. The response body carries the call's record to its end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::Either;
use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;

use super::Call;
use crate::client::{MethodInfo, ResponseBody};
use crate::codec::Descriptors;
use crate::metrics::rpc::{ClientMethods, Kind, Record, Series, Way};

/// The series whose sent messages the codec layer's request body counts
/// (a request extension, for calls that may send more than one).
#[derive(Debug, Clone)]
pub(crate) struct CountSent(pub(crate) Arc<Series>);

/// Counts each call (when the client counts them) and passes it on.
#[derive(Debug)]
pub(crate) struct Metered<S> {
    methods: Option<Arc<ClientMethods>>,
    inner: S,
}

impl<S> Metered<S> {
    pub(crate) fn new(methods: Option<Arc<ClientMethods>>, inner: S) -> Self {
        Self { methods, inner }
    }
}

/// The kind of the method `path` names, from the call's descriptors.
pub(crate) fn kind(info: Option<&MethodInfo>, path: &str) -> Kind {
    info.and_then(|info| info.descriptors)
        .and_then(|set| Descriptors::of_static(set).ok())
        .and_then(|descriptors| descriptors.method(path))
        .map_or(Kind::Unknown, |method| {
            Kind::of(method.is_client_streaming(), method.is_server_streaming())
        })
}

impl<S> Call<Request<Body>> for Metered<S>
where
    S: Call<Request<Body>, Response = Response<ResponseBody>>,
{
    type Response = Response<ResponseBody>;

    fn call(
        &self,
        request: Request<Body>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send {
        let Some(methods) = &self.methods else {
            return Either::Left(self.inner.call(request));
        };
        let path = request.uri().path();
        let series = methods.find(path, || kind(request.extensions().get(), path));
        let record = series.start();
        let mut request = request;
        match series.kind() {
            // One request message: counted now, with nothing per message.
            Kind::Unary | Kind::ServerStream => series.messages(Way::Sent, 1),
            // Counted as they go, by the codec layer's body.
            Kind::ClientStream | Kind::Bidi | Kind::Unknown => {
                request.extensions_mut().insert(CountSent(series));
            }
        }
        Either::Right(MeteredFuture {
            inner: self.inner.call(request),
            record,
        })
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Metered`]: ends the record with a failure, or hands
    /// it to the response body.
    pub(crate) struct MeteredFuture<F> {
        #[pin]
        inner: F,
        record: Record,
    }
}

impl<F> Future for MeteredFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, Status>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(status) => {
                this.record.end(status.code());
                return Poll::Ready(Err(status));
            }
        };
        // A trailers-only answer ends here; any other, with its body.
        match crate::status::code_in(response.headers()) {
            Some(code) => this.record.end(code),
            None => response.body_mut().set_record(std::mem::take(this.record)),
        }
        Poll::Ready(Ok(response))
    }
}

//! The deadline layer: when the call must be over.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::{Request, Response};
use lodestar_core::ServiceKey;
use tokio::time::Sleep;
use tonic::Status;
use tonic::body::Body;

use super::Call;
use crate::client::ResponseBody;
use crate::deadline::{self, Deadline as Instant};

/// The deadline of the call being served when the call was made, carried
/// from the caller's task (the user's layers may move the call elsewhere).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inherited(pub(crate) Instant);

/// Settings of the deadline layer.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// Named when the deadline passes.
    pub(crate) service: ServiceKey,
    /// The client's default timeout ([`ClientBuilder::timeout`](crate::client::ClientBuilder::timeout)).
    pub(crate) default: Option<Duration>,
}

/// Decides the call's deadline: the earliest of its own `grpc-timeout`, the
/// [`Inherited`] one and the client's default. The layers below find it in
/// the request's extensions (each attempt sends the time left, and the
/// response body ends at it); the wait for the response's headers ends at
/// it with `DEADLINE_EXCEEDED`.
#[derive(Debug)]
pub(crate) struct Deadline<S> {
    params: Params,
    inner: S,
}

impl<S> Deadline<S> {
    pub(crate) fn new(params: Params, inner: S) -> Self {
        Self { params, inner }
    }
}

impl<S> Call<Request<Body>> for Deadline<S>
where
    S: Call<Request<Body>, Response = Response<ResponseBody>>,
{
    type Response = Response<ResponseBody>;

    fn call(
        &self,
        mut request: Request<Body>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send {
        let inherited = request.extensions_mut().remove::<Inherited>().map(|i| i.0);
        let deadline = match deadline::outbound(request.headers(), inherited, self.params.default) {
            Ok(deadline) => deadline,
            Err(status) => return Either::Right(std::future::ready(Err(status))),
        };
        if let Some(deadline) = deadline {
            request.extensions_mut().insert(deadline);
        }
        Either::Left(ResponseFuture {
            inner: self.inner.call(request),
            sleep: deadline.map(|d| tokio::time::sleep_until(d.instant())),
            service: &self.params.service,
        })
    }
}

pin_project_lite::pin_project! {
    /// The response of a call: `DEADLINE_EXCEEDED`, naming the service, if
    /// its headers have not come by the deadline.
    pub(crate) struct ResponseFuture<'a, F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        service: &'a ServiceKey,
    }
}

impl<F, T> Future for ResponseFuture<'_, F>
where
    F: Future<Output = Result<T, Status>>,
{
    type Output = Result<T, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.inner.poll(cx) {
            return Poll::Ready(response);
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => {
                let service = &this.service.service;
                Poll::Ready(Err(deadline::exceeded(format_args!("calling {service}"))))
            }
            _ => Poll::Pending,
        }
    }
}

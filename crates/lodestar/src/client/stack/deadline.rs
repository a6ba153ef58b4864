//! The deadline layer: when the call must be over.

use std::time::Duration;

use http::{Request, Response};
use lodestar_core::ServiceKey;
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

    async fn call(&self, mut request: Request<Body>) -> Result<Self::Response, Status> {
        let inherited = request.extensions_mut().remove::<Inherited>().map(|i| i.0);
        let Some(deadline) = deadline::outbound(request.headers(), inherited, self.params.default)?
        else {
            return self.inner.call(request).await;
        };
        request.extensions_mut().insert(deadline);
        let service = &self.params.service.service;
        tokio::time::timeout_at(deadline.instant(), self.inner.call(request))
            .await
            .map_err(|_| deadline::exceeded(format_args!("calling {service}")))?
    }
}

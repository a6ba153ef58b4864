//! The deadline layer: the inbound `grpc-timeout` (read on arrival by the
//! status layer, so time in the user's layers counts) becomes the call's
//! [`Deadline`]: current while the handler runs (so the calls it makes are
//! bounded by it), and the end of the call when it passes, before the
//! handler answers (the handler is dropped) or while its response streams.
//! A malformed `grpc-timeout` refuses the call (`INTERNAL`).
//!
//! The routes' future enforces it ([`Bound`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::request::RequestBody;
use super::{ResponseBody, reject};
use crate::deadline::{self, Deadline};

/// Applies the inbound deadline.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> DeadlineService<S> {
        DeadlineService { inner }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub(crate) struct DeadlineService<S> {
    inner: S,
}

impl<S> Service<Request<RequestBody>> for DeadlineService<S>
where
    S: Service<Request<RequestBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> S::Future {
        // Read on arrival (by the status layer), so it already counts the
        // time the call spent in the user's layers.
        let plan = &mut request.body_mut().plan;
        if let Some(deadline) = plan.arrived.take() {
            let sleep = Box::pin(tokio::time::sleep_until(deadline.instant()));
            plan.deadline = Bound(Some((deadline, sleep)));
        }
        self.inner.call(request)
    }
}

/// A call's deadline, if it has one, and its timer (boxed, to move into
/// the response body when the handler answers).
#[derive(Debug, Default)]
pub(crate) struct Bound(Option<(Deadline, Pin<Box<Sleep>>)>);

impl Bound {
    /// The call's deadline, if it has one.
    pub(super) fn deadline(&self) -> Option<Deadline> {
        self.0.as_ref().map(|(deadline, _)| *deadline)
    }

    /// Polls the handler's future (`poll`) with the deadline current; once
    /// the deadline passes, answers `DEADLINE_EXCEEDED` instead (the
    /// handler is then dropped with the future).
    pub(super) fn poll_handler<E>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<Result<Response<ResponseBody>, E>>,
    ) -> Poll<Result<Response<ResponseBody>, E>> {
        let Some((deadline, sleep)) = self.0.as_mut() else {
            return poll(cx);
        };
        let answer = deadline::sync_scope(*deadline, || poll(cx));
        if answer.is_ready() {
            return answer;
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let status = deadline::exceeded("before the handler answered");
                Poll::Ready(Ok(reject(status, false)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Ends `response`'s body at the deadline too.
    pub(super) fn apply(self, response: &mut Response<ResponseBody>) {
        if let Some((deadline, sleep)) = self.0 {
            response.body_mut().set_deadline(deadline, sleep);
        }
    }
}

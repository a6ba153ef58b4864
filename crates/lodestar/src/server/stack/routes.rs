//! The routes: the services added, and health and reflection, by path
//! (see `router.rs`). Their future is the one of lodestar's layers below
//! the user's: it carries out the [`Plan`] those layers made on the way in
//! (the deadline, the codec, the send limit) when the handler answers, and
//! sends the handler's [`Trailers`](crate::Trailers) after the messages.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use super::request::{Plan, RequestBody};
use super::router::{RouteFuture, Router};
use super::{ResponseBody, reject};

/// Routes each call to its service and method.
#[derive(Debug, Clone)]
pub(crate) struct RoutesService {
    routes: Router,
}

impl RoutesService {
    pub(crate) fn new(routes: Router) -> Self {
        Self { routes }
    }
}

impl Service<Request<RequestBody>> for RoutesService {
    type Response = Response<ResponseBody>;
    type Error = std::convert::Infallible;
    type Future = RoutesFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Always ready: each service's readiness is awaited in its call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> RoutesFuture {
        let body = request.body_mut();
        let mut plan = std::mem::take(&mut body.plan);
        if let Some(status) = plan.refusal.take() {
            let json = body.json;
            return RoutesFuture {
                state: State::Refused {
                    refusal: Some((status, json)),
                },
            };
        }
        RoutesFuture {
            state: State::Routed {
                inner: self.routes.call(request),
                plan: Some(plan),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`RoutesService`].
    pub(crate) struct RoutesFuture {
        #[pin]
        state: State,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State {
        Routed {
            inner: RouteFuture,
            plan: Option<Plan>,
        },
        /// Refused before the handler: the status, and whether the call is JSON.
        Refused { refusal: Option<(tonic::Status, bool)> },
    }
}

impl Future for RoutesFuture {
    type Output = Result<Response<ResponseBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (inner, plan) = match self.project().state.project() {
            StateProj::Routed { inner, plan } => (inner, plan),
            StateProj::Refused { refusal } => {
                return match refusal.take() {
                    Some((status, json)) => Poll::Ready(Ok(reject(status, json))),
                    None => Poll::Pending, // polled after it completed
                };
            }
        };
        let Some(bound) = plan.as_mut().map(|plan| &mut plan.deadline) else {
            return Poll::Pending; // polled after it completed
        };
        let answer = std::task::ready!(bound.poll_handler(cx, |cx| {
            inner.as_mut().poll(cx).map(|answer| answer.map(answered))
        }));
        let mut response = answer?;
        if let Some(plan) = plan.take() {
            let Plan {
                deadline,
                codec,
                send_limit,
                refusal: _,
                arrived: _,
            } = plan;
            codec.apply(&mut response);
            if let Some(limit) = send_limit {
                response.body_mut().set_limit(limit);
            }
            deadline.apply(&mut response);
        }
        Poll::Ready(Ok(response))
    }
}

/// The handler's response as the stack sends it: one body wrapper, and the
/// handler's trailers to send after the messages.
fn answered(mut response: Response<tonic::body::Body>) -> Response<ResponseBody> {
    let trailers = response
        .extensions_mut()
        .remove::<crate::Trailers>()
        .map(|t| t.0.into_headers());
    response.map(|body| {
        let mut body = ResponseBody::from(body);
        body.set_trailers(trailers);
        body
    })
}

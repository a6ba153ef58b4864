//! The server stack: what every call goes through, built in one place.
//!
//! Outermost first:
//!
//! 1. **budget** (per connection): response data counts against the
//!    connection's and the server's unsent-byte budgets
//!    ([`ConnectionLimits`](super::ConnectionLimits); `server/budget.rs`);
//! 2. **status**: an error of any layer below becomes a proper gRPC status,
//!    and every call's final status is reported to [`CallEnd`] hooks
//!    (`status.rs`, `call_end.rs`, `response.rs`);
//! 3. **trace**: the caller's W3C trace context is current for the rest
//!    of the call; with OpenTelemetry on, the call's server span is, and
//!    ends with the call's final status (`trace.rs`);
//! 4. **admission**: the policy's rate and concurrency limits refuse a
//!    call before anything below runs (`admission.rs`; `server/admission`);
//! 5. **user layers**, added with
//!    [`ServiceBuilder::layer`](crate::ServiceBuilder::layer), the first
//!    added outermost (`user.rs`);
//! 6. **deadline**: the inbound `grpc-timeout` bounds the handler and its
//!    response stream (`deadline.rs`);
//! 6. **fault**: faults the server policy injects into a method's calls
//!    (delays bounded by the deadline, aborts that never reach the handler;
//!    `fault.rs`);
//! 7. **codec**: JSON transcoding and response compression (`codec.rs`);
//! 8. **body limits**: message size limits both ways (`limits.rs`);
//! 9. **routes**: the services, health and reflection (`routes.rs`,
//!    `router.rs`).
//!
//! Everything is built once when the server starts; each connection gets a
//! copy, and each call a clone of that copy's reference. Per call, the
//! user layers' segment is one boxed future, plus one more for each layer
//! below the outermost; with no user layers, or only ones that add nothing
//! (tower's `Identity`), lodestar's layers are called directly, in one
//! small box. The whole stack is called when the call's own task first
//! polls it (so what the layers allocate is allocated and freed on that
//! task's thread). The request and response
//! bodies are each wrapped once ([`RequestBody`], [`ResponseBody`]), every
//! layer setting its part of that one wrapper.

mod admission;
mod call_end;
mod codec;
mod deadline;
pub(crate) mod fault;
mod limits;
mod request;
mod response;
mod router;
mod routes;
mod status;
mod trace;
mod user;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};

pub use call_end::{CallEnd, CallOutcome};
pub(crate) use request::Inbound;
pub use request::RequestBody;
pub use response::ResponseBody;
pub(crate) use router::{Router, RouterBuilder};
pub use user::Next;
pub(crate) use user::{Added, UserLayer};

use self::admission::{AdmissionLayer, AdmissionService};
use self::codec::CodecLayer;
use self::deadline::{DeadlineLayer, DeadlineService};
use self::fault::{FaultLayer, FaultService};
use self::limits::{LimitsLayer, LimitsService};
use self::routes::RoutesService;
use self::status::{StatusLayer, StatusService};
use self::trace::{TraceLayer, TraceService};
use self::user::{Layered, UserLayers};
use super::admission::Admission;
use super::budget::{Budgeted, ConnectionBudget};
use super::connection::Drain;
use super::web::{self, Answer, SocketHost, Upgraded, WebFuture, WebProtocols, WebState};
use crate::MessageLimits;
use crate::codec::Descriptors;
use crate::compression::Encoding;

/// The header of a trailers-only response's (or the trailers') status.
pub(crate) use crate::status::GRPC_STATUS;

/// lodestar's layers below the user's.
type Core = DeadlineService<FaultService<self::codec::CodecService<LimitsService<RoutesService>>>>;
type CoreFuture = self::fault::FaultFuture<self::routes::RoutesFuture, Infallible>;

/// The server's settings the stack applies.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) limits: MessageLimits,
    pub(crate) send_compressed: Option<Encoding>,
    pub(crate) inspect_compression: bool,
    pub(crate) descriptors: Descriptors,
    /// The server policy in force (`RunningService::set_policy` replaces it).
    pub(crate) policy: Arc<arc_swap::ArcSwap<super::policy::Policy>>,
    /// Told of the policy layers' decisions.
    pub(crate) observers: super::observe::Observers,
    /// The fault injectors, following the policy.
    pub(crate) faults: Arc<fault::Live>,
    /// The series of the server's methods, if calls are counted.
    pub(crate) methods: Option<crate::metrics::rpc::MethodTable>,
}

/// The stack below the per-connection budget, as built at start.
pub(crate) type Outer = StatusService<TraceService<AdmissionService<Layered>>>;

/// The server stack, built once.
#[derive(Clone)]
pub(crate) struct Stack {
    outer: Outer,
    /// The web protocols' settings, shared by every connection.
    web: Arc<WebState>,
    /// The policy's limits, for `RunningService::set_policy` to update.
    admission: Arc<Admission>,
}

impl Stack {
    /// Builds the stack over `routes`, with the user's `layers`.
    pub(crate) fn build(
        routes: Router,
        settings: Settings,
        layers: Vec<Box<dyn UserLayer>>,
        web: WebProtocols,
        rest: Option<web::rest::Routes>,
    ) -> Self {
        let web = Arc::new(WebState {
            settings: web,
            descriptors: settings.descriptors.clone(),
            limits: settings.limits,
            rest,
        });
        let admission = Arc::new(Admission::new(
            &settings.policy.load(),
            settings.observers.clone(),
        ));
        // Outermost first; the budget is added per connection.
        let outer = ServiceBuilder::new()
            .layer(StatusLayer {
                methods: settings.methods,
            })
            .layer(TraceLayer)
            .layer(AdmissionLayer {
                admission: admission.clone(),
            })
            .layer(UserLayers(layers))
            .layer(DeadlineLayer)
            .layer(FaultLayer {
                live: settings.faults,
                observers: settings.observers,
            })
            .layer(CodecLayer {
                send_compressed: settings.send_compressed,
                inspect_compression: settings.inspect_compression,
                descriptors: settings.descriptors,
                max_decoding_message_size: settings.limits.max_decoding_message_size,
            })
            .layer(LimitsLayer {
                limits: settings.limits,
            })
            .service(RoutesService::new(routes));
        Self {
            outer,
            web,
            admission,
        }
    }

    /// The policy's limits as this stack applies them.
    pub(crate) fn admission(&self) -> Arc<Admission> {
        self.admission.clone()
    }

    /// This stack for one connection, its responses counted against `budget`.
    ///
    /// `drain` is the server's, for the WebSockets the connection opens.
    pub(crate) fn for_connection(
        &self,
        budget: Arc<ConnectionBudget>,
        drain: Drain,
    ) -> ConnectionStack {
        let mut outer = self.outer.clone();
        let admission = outer.get_mut().get_mut();
        admission.make_own();
        admission.get_mut().make_own();
        ConnectionStack {
            outer,
            budget,
            web: self.web.clone(),
            sockets: SocketHost::new(drain),
        }
    }
}

/// The stack of one connection, as hyper calls it.
pub(crate) struct ConnectionStack {
    outer: Outer,
    budget: Arc<ConnectionBudget>,
    web: Arc<WebState>,
    sockets: SocketHost,
}

impl ConnectionStack {
    /// This stack with the WebSocket an HTTP/1.1 connection upgrades to
    /// put in `upgraded`, for the connection's task to run.
    pub(crate) fn holding_upgrades(mut self, upgraded: Arc<Upgraded>) -> Self {
        self.sockets = self.sockets.holding(upgraded);
        self
    }
}

impl hyper::service::Service<Request<Incoming>> for ConnectionStack {
    type Response = Response<Budgeted<Answer>>;
    type Error = Infallible;
    type Future = Dispatched;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        // Native gRPC first, as it always went; the web protocols
        // (`server/web`) translate theirs at the edge, then call the same
        // stack.
        let call = if web::is_native(&request) {
            Call::Grpc {
                inner: Deferred::Waiting {
                    service: self.outer.clone(),
                    request: Some(request),
                },
            }
        } else {
            Call::Web {
                inner: web::serve(self.outer.clone(), self.web.clone(), &self.sockets, request),
            }
        };
        Dispatched {
            call,
            budget: Some(self.budget.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call on its way, its response body to be counted against the
    /// connection's budget.
    pub(crate) struct Dispatched {
        #[pin]
        call: Call,
        budget: Option<Arc<ConnectionBudget>>,
    }
}

pin_project_lite::pin_project! {
    /// Native gRPC through the stack, or a web protocol's call (boxed: it
    /// translates, then calls the stack).
    #[project = CallProj]
    enum Call {
        Grpc { #[pin] inner: Deferred<Outer, Request<Incoming>> },
        Web { inner: WebFuture },
    }
}

impl Future for Dispatched {
    type Output = Result<Response<Budgeted<Answer>>, Infallible>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The body is wrapped once, in one move of the response.
        match this.call.project() {
            CallProj::Grpc { inner } => {
                let Ok(response) = std::task::ready!(inner.poll(cx));
                let budget = this.budget.take();
                Poll::Ready(Ok(
                    response.map(|body| Budgeted::new(Answer::Grpc { body }, budget))
                ))
            }
            CallProj::Web { inner } => {
                let response = std::task::ready!(inner.as_mut().poll(cx));
                let budget = this.budget.take();
                Poll::Ready(Ok(response.map(|body| {
                    Budgeted::new(
                        Answer::Web {
                            body: Box::pin(body),
                        },
                        budget,
                    )
                })))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Calls an always-ready `service` (see StatusService and Layered:
    /// no `poll_ready`) with the request when first polled: in the call's
    /// own task (hyper spawns one per call) rather than the connection's,
    /// as hyper's glue for tower services does, so that what the layers
    /// allocate for the call is allocated and freed on the same thread.
    /// Measured: calling at once from the connection's task costs more in
    /// the allocator than it saves.
    #[project = DeferredProj]
    pub(crate) enum Deferred<S: Service<R>, R> {
        Waiting { service: S, request: Option<R> },
        Called { #[pin] inner: S::Future },
    }
}

impl<S: Service<R>, R> Future for Deferred<S, R> {
    type Output = Result<S::Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let DeferredProj::Waiting { service, request } = self.as_mut().project()
            && let Some(request) = request.take()
        {
            let inner = service.call(request);
            self.set(Deferred::Called { inner });
        }
        match self.project() {
            DeferredProj::Called { inner } => inner.poll(cx),
            DeferredProj::Waiting { .. } => Poll::Pending, // not reached: called above
        }
    }
}

/// A trailers-only response carrying `status`, in JSON's content type for
/// a JSON call.
pub(crate) fn reject(status: tonic::Status, json: bool) -> Response<ResponseBody> {
    let mut response = status.into_http::<tonic::body::Body>();
    if json {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(crate::codec::CONTENT_TYPE),
        );
    }
    response.map(ResponseBody::from)
}

//! [`Channel`]: the `tower::Service` generated clients send their calls through.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tower::ServiceExt as _;

use super::MethodInfo;
use super::observe::Observed;
use super::stack::{self, Balance, Call as _, Core};
use crate::body::CallBody;
use crate::deadline::Deadline;
use crate::trace::TraceContext;

/// The body of a response received through a [`Channel`]: it fails with
/// `DEADLINE_EXCEEDED` if still open at the call's deadline, and with
/// `RESOURCE_EXHAUSTED` on a message over the client's receive limit.
pub type ResponseBody = CallBody<Observed>;

/// A channel as the layers added with [`ClientBuilder::layer`](super::ClientBuilder::layer)
/// see it: calls in, responses or statuses out. Cheap to clone.
///
/// ```
/// use lodestar::client::BoxChannel;
///
/// // What a layer that wraps the channel in its own service gives back.
/// fn wrap(inner: BoxChannel) -> BoxChannel {
///     BoxChannel::new(tower::limit::ConcurrencyLimit::new(inner, 8))
/// }
/// # let _ = wrap;
/// ```
pub struct BoxChannel(Box<dyn CloneChannel>);

/// A call's future, as a [`BoxChannel`] returns it.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Status>> + Send>>;

impl BoxChannel {
    /// Boxes `service`, and each call's future.
    pub fn new<S>(service: S) -> Self
    where
        S: tower_service::Service<Request<Body>, Response = Response<ResponseBody>, Error = Status>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self::boxed(service.map_future(|future| Box::pin(future) as CallFuture))
    }

    /// Boxes `service`, whose futures are boxed already.
    fn boxed(service: impl CloneChannel + 'static) -> Self {
        Self(Box::new(service))
    }
}

/// A service a [`BoxChannel`] can hold.
trait CloneChannel: Send + Sync {
    fn poll_ready_boxed(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>>;
    fn call_boxed(&mut self, request: Request<Body>) -> CallFuture;
    fn clone_box(&self) -> Box<dyn CloneChannel>;
}

impl<S> CloneChannel for S
where
    S: tower_service::Service<
            Request<Body>,
            Response = Response<ResponseBody>,
            Error = Status,
            Future = CallFuture,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    fn poll_ready_boxed(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.poll_ready(cx)
    }

    fn call_boxed(&mut self, request: Request<Body>) -> CallFuture {
        self.call(request)
    }

    fn clone_box(&self) -> Box<dyn CloneChannel> {
        Box::new(self.clone())
    }
}

impl Clone for BoxChannel {
    fn clone(&self) -> Self {
        Self(self.0.clone_box())
    }
}

impl fmt::Debug for BoxChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxChannel")
    }
}

impl tower_service::Service<Request<Body>> for BoxChannel {
    type Response = Response<ResponseBody>;
    type Error = Status;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.0.poll_ready_boxed(cx)
    }

    fn call(&mut self, request: Request<Body>) -> CallFuture {
        self.0.call_boxed(request)
    }
}

/// Calls one named service: picks an instance per call, connects lazily,
/// applies deadlines, and sends again where that is safe; see the
/// [client docs](super) for the layers a call passes.
///
/// Cheap to clone; clones share instances and connections. Get one from
/// [`Client::channel`](super::Client::channel) and put a generated client
/// on it, or use the generated `by_name` constructor, which does both.
/// A channel may be wrapped in any tower layers before a generated client
/// is put on it: what a call needs to know about its method (whether it is
/// idempotent, its descriptors) travels with the call ([`MethodInfo`]).
#[derive(Clone)]
pub struct Channel {
    balance: Arc<Balance>,
    route: Route,
    /// What calls without a [`MethodInfo`] of their own are told.
    defaults: Option<Arc<Defaults>>,
}

#[derive(Clone)]
enum Route {
    /// No user layers: straight into the stack.
    Core(Arc<Core>),
    /// Through the user's layers, then the stack.
    Layered(BoxChannel),
}

#[derive(Debug, Default, Clone)]
struct Defaults {
    descriptors: Option<&'static [u8]>,
    idempotent: &'static [&'static str],
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("service", &self.balance.key)
            .finish()
    }
}

impl Channel {
    /// The balance layer of this channel's service.
    pub(crate) fn balance(&self) -> &Arc<Balance> {
        &self.balance
    }

    /// The channel over `balance`, through the user's `layers`.
    pub(crate) fn new(balance: Arc<Balance>, layers: &[super::UserLayer]) -> Self {
        let core = Arc::new(stack::core(balance.clone()));
        let route = if layers.is_empty() {
            Route::Core(core)
        } else {
            // First added, outermost: wrap from the innermost out.
            let inner = BoxChannel::boxed(CoreService(core));
            Route::Layered(layers.iter().rev().fold(inner, |inner, layer| layer(inner)))
        };
        Self {
            balance,
            route,
            defaults: None,
        }
    }

    /// Gives the channel the descriptors of the services it calls (an
    /// encoded `FileDescriptorSet`), which the JSON codec needs, for calls
    /// that do not bring a [`MethodInfo`] (clients lodestar-build generated
    /// do).
    pub fn with_descriptors(mut self, file_descriptor_set: &'static [u8]) -> Self {
        Arc::make_mut(self.defaults.get_or_insert_with(Default::default)).descriptors =
            Some(file_descriptor_set);
        self
    }

    /// Declares the unary methods (by path, `/package.Service/Method`) that
    /// are safe to send again when an instance fails before answering, for
    /// calls that do not bring a [`MethodInfo`] (clients lodestar-build
    /// generated do: they declare the methods marked idempotent in the `.proto`).
    pub fn with_idempotent_methods(mut self, paths: &'static [&'static str]) -> Self {
        Arc::make_mut(self.defaults.get_or_insert_with(Default::default)).idempotent = paths;
        self
    }

    /// The addresses of the instances this channel currently balances over.
    pub fn addresses(&self) -> Vec<String> {
        self.balance
            .endpoints()
            .iter()
            .map(|e| e.instance.address.clone())
            .collect()
    }

    /// The endpoints this channel currently balances over, with what the
    /// stack has recorded about each.
    pub fn endpoints(&self) -> Vec<Arc<super::selector::Endpoint>> {
        self.balance.endpoints().to_vec()
    }
}

/// Carries what the caller's task knows into the request, before any layer
/// can move the call to another task: the deadline and trace context of
/// the call being served, and the channel's defaults.
fn prepare(request: &mut Request<Body>, defaults: Option<&Defaults>) {
    TraceContext::inject_current(request.headers_mut());
    if let Some(deadline) = Deadline::current() {
        request.extensions_mut().insert(stack::Inherited(deadline));
    }
    if let Some(defaults) = defaults
        && request.extensions().get::<MethodInfo>().is_none()
    {
        let path = request.uri().path();
        let info = MethodInfo {
            descriptors: defaults.descriptors,
            idempotent: defaults.idempotent.contains(&path),
        };
        request.extensions_mut().insert(info);
    }
}

impl tower_service::Service<Request<Body>> for Channel {
    type Response = Response<ResponseBody>;
    type Error = Status;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        match &mut self.route {
            Route::Core(_) => Poll::Ready(Ok(())),
            Route::Layered(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        #[cfg(feature = "otlp")]
        if crate::telemetry::spans_on() {
            return self.call_traced(request);
        }
        prepare(&mut request, self.defaults.as_deref());
        self.send(request)
    }
}

impl Channel {
    /// Sends a prepared call down the route.
    fn send(&mut self, request: Request<Body>) -> CallFuture {
        match &mut self.route {
            Route::Core(core) => {
                let core = core.clone();
                Box::pin(async move { core.call(request).await })
            }
            Route::Layered(service) => tower_service::Service::call(service, request),
        }
    }

    /// A call in its client span, which ends with the call's response (or
    /// its failure); the request carries the span's context.
    #[cfg(feature = "otlp")]
    #[cold]
    fn call_traced(&mut self, mut request: Request<Body>) -> CallFuture {
        let span = crate::telemetry::spans::call(&mut request);
        prepare(&mut request, self.defaults.as_deref());
        let call = self.send(request);
        Box::pin(async move {
            let mut result = call.await;
            match &mut result {
                Ok(response) => span.hold(response),
                Err(status) => span.finish_status(status),
            }
            result
        })
    }
}

/// The stack below the user's layers, as a `tower::Service` for them to wrap.
#[derive(Clone)]
struct CoreService(Arc<Core>);

impl tower_service::Service<Request<Body>> for CoreService {
    type Response = Response<ResponseBody>;
    type Error = Status;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let core = self.0.clone();
        Box::pin(async move { core.call(request).await })
    }
}

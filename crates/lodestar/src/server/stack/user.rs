//! The user's layers ([`ServiceBuilder::layer`](crate::ServiceBuilder::layer)):
//! ordinary tower layers over HTTP requests, applied once when the server
//! starts, between the status layer above and the deadline below.
//!
//! The composed service is type-erased once: each call clones it (cheap:
//! layers share their state, e.g. a concurrency limit's semaphore) and
//! drives it in one boxed future that waits for its readiness and then
//! calls it, as tower's `Oneshot` does. With no layers, or only ones that
//! add nothing (tower's `Identity`), lodestar's layers below are called
//! directly instead, in one small boxed future.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::TryFutureExt as _;
use http::{Request, Response};
use tower::util::{BoxCloneSyncService, ServiceExt as _};
use tower::{BoxError, Layer, Service};

use super::{Core, CoreFuture, RequestBody, ResponseBody};

/// What a request the user's layers see is answered with.
type Answer = Result<Response<ResponseBody>, BoxError>;
/// The one boxed future of a call through the user's layers.
type BoxFuture = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// The part of the server's stack below the layers added with
/// [`ServiceBuilder::layer`](crate::ServiceBuilder::layer): the inbound
/// deadline, the codec (JSON transcoding and compression), message size
/// limits, and routing to the services. A
/// `tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>, Error = tower::BoxError>`,
/// always ready, cheap to clone.
#[derive(Clone)]
pub struct Next(Inner);

#[derive(Clone)]
enum Inner {
    Core(Core),
    /// Layers below the one this is given to.
    Layered(BoxCloneSyncService<Request<RequestBody>, Response<ResponseBody>, BoxError>),
}

impl std::fmt::Debug for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next").finish_non_exhaustive()
    }
}

impl Next {
    pub(super) fn core(core: Core) -> Self {
        Self(Inner::Core(core))
    }

    /// `service` as the `Next` of a layer above it; without a box if it is
    /// one already (a layer that adds nothing, such as tower's `Identity`).
    fn from_service<S>(mut service: S) -> Self
    where
        S: UserService,
        S::Error: Into<BoxError>,
    {
        if let Some(next) = (&mut service as &mut dyn Any).downcast_mut::<Next>() {
            return next.clone();
        }
        Self(Inner::Layered(BoxCloneSyncService::new(
            service.map_err(Into::into),
        )))
    }
}

impl Service<Request<RequestBody>> for Next {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = NextFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.0 {
            Inner::Core(core) => Service::<Request<RequestBody>>::poll_ready(core, cx)
                .map_err(|never| match never {}),
            Inner::Layered(layered) => layered.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<RequestBody>) -> NextFuture {
        match &mut self.0 {
            Inner::Core(core) => NextFuture {
                inner: NextFutureInner::Core {
                    inner: core.call(request),
                },
            },
            Inner::Layered(layered) => NextFuture {
                inner: NextFutureInner::Layered {
                    inner: layered.call(request),
                },
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Next`].
    pub struct NextFuture {
        #[pin]
        inner: NextFutureInner,
    }
}

impl std::fmt::Debug for NextFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NextFuture").finish_non_exhaustive()
    }
}

pin_project_lite::pin_project! {
    #[project = NextProj]
    enum NextFutureInner {
        Core { #[pin] inner: CoreFuture },
        Layered { inner: BoxFuture },
    }
}

impl Future for NextFuture {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        match self.project().inner.project() {
            NextProj::Core { inner } => inner.poll(cx).map_err(|never| match never {}),
            NextProj::Layered { inner } => inner.as_mut().poll(cx),
        }
    }
}

/// What a user's layer must make of [`Next`].
pub(crate) trait UserService:
    Service<Request<RequestBody>, Response = Response<ResponseBody>, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> UserService for S where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Future: Send + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A layer added with `ServiceBuilder::layer`, type-erased.
pub(crate) trait UserLayer: Send + Sync + 'static {
    /// This layer over `next`, as the `Next` of the layer above.
    fn below(&self, next: Next) -> Next;
    /// This layer over `next`, as the outermost one.
    fn top(&self, next: Next) -> Layered;
}

/// A user's layer, as added.
pub(crate) struct Added<L>(pub(crate) L);

impl<L> UserLayer for Added<L>
where
    L: Layer<Next> + Send + Sync + 'static,
    L::Service: UserService,
    <L::Service as Service<Request<RequestBody>>>::Error: Into<BoxError>,
{
    fn below(&self, next: Next) -> Next {
        Next::from_service(self.0.layer(next))
    }

    fn top(&self, next: Next) -> Layered {
        Layered::new(self.0.layer(next))
    }
}

/// The user's layers, the first added outermost, as one layer over
/// lodestar's below them.
pub(crate) struct UserLayers(pub(crate) Vec<Box<dyn UserLayer>>);

impl Layer<Core> for UserLayers {
    type Service = Layered;

    fn layer(&self, core: Core) -> Layered {
        let Some((top, below)) = self.0.split_first() else {
            return Layered(Top::Core(core));
        };
        let next = Next::core(core);
        let next = below
            .iter()
            .rev()
            .fold(next, |next, layer| layer.below(next));
        top.top(next)
    }
}

/// Calls a clone of a service, once, in one boxed future.
trait CallOnce: Send + Sync + 'static {
    fn call_once(&self, request: Request<RequestBody>) -> BoxFuture;
    /// A copy of its own (for a new connection).
    fn copy(&self) -> Arc<dyn CallOnce>;
}

impl<S> CallOnce for S
where
    S: UserService,
    S::Error: Into<BoxError>,
{
    fn call_once(&self, request: Request<RequestBody>) -> BoxFuture {
        Box::pin(self.clone().oneshot(request).map_err(Into::into))
    }

    fn copy(&self) -> Arc<dyn CallOnce> {
        Arc::new(self.clone())
    }
}

/// The user's layers over [`Next`]: always ready (each call waits for the
/// layers' readiness itself).
#[derive(Clone)]
pub(crate) struct Layered(Top);

#[derive(Clone)]
enum Top {
    /// No layers, or only ones that add nothing (such as tower's
    /// `Identity`): lodestar's own, always ready, called directly.
    Core(Core),
    /// The user's layers, erased: one boxed future per call.
    Erased(Arc<dyn CallOnce>),
}

impl Layered {
    fn new<S>(mut service: S) -> Self
    where
        S: UserService,
        S::Error: Into<BoxError>,
    {
        if let Some(Next(Inner::Core(core))) = (&mut service as &mut dyn Any).downcast_mut::<Next>()
        {
            return Self(Top::Core(core.clone()));
        }
        Self(Top::Erased(Arc::new(service)))
    }

    /// Becomes a copy of its own (for one connection), so that the calls
    /// of a connection share no reference count with other connections'.
    pub(crate) fn make_own(&mut self) {
        if let Top::Erased(erased) = &mut self.0 {
            *erased = erased.copy();
        }
    }
}

impl Service<Request<RequestBody>> for Layered {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = LayeredFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody>) -> LayeredFuture {
        match &mut self.0 {
            Top::Core(core) => LayeredFuture::Core(Box::pin(core.call(request))),
            Top::Erased(erased) => LayeredFuture::Erased(erased.call_once(request)),
        }
    }
}

/// The future of [`Layered`]: boxed either way, so that the task hyper
/// spawns for each call stays small (its allocation stays cheap).
pub(crate) enum LayeredFuture {
    Core(Pin<Box<CoreFuture>>),
    Erased(BoxFuture),
}

impl Future for LayeredFuture {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        match self.get_mut() {
            Self::Core(inner) => inner.as_mut().poll(cx).map_err(|never| match never {}),
            Self::Erased(inner) => inner.as_mut().poll(cx),
        }
    }
}

//! The router: the table of a server's services (its own, health and
//! reflection) by name, and which of them a call's path names.
//!
//! A call's path is `/{service}/{method}`: the service is found by name in
//! a table sorted once at start (a binary search, no hashing, nothing
//! allocated), and called with the request; the service answers an
//! unknown method itself. A path that names no service (or no method) is
//! answered `UNIMPLEMENTED`, as tonic's router answers it.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use http::{Request, Response};
use tonic::body::Body;
use tower::{Service, ServiceExt as _};

use crate::server::GrpcRoute;

/// What a service answers a call with.
type Answer = Result<Response<Body>, Infallible>;
/// The future of a call to one service (generated services' own).
pub(crate) type RouteFuture = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// The services of a server by name, built once at start; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Router {
    /// Sorted by name, names unique.
    services: Arc<[(&'static str, Box<dyn Route>)]>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = self.services.iter().map(|(name, _)| name);
        f.debug_list().entries(names).finish()
    }
}

/// The services of a server, as they are added.
#[derive(Default)]
pub(crate) struct RouterBuilder {
    services: Vec<(&'static str, Box<dyn Route>)>,
}

impl RouterBuilder {
    /// Adds `service` under its name (names are unique: checked at start,
    /// before the routes are built; a later one with the same name would
    /// never be called).
    pub(crate) fn add_service<S: GrpcRoute>(&mut self, service: S) -> &mut Self {
        self.services.push((S::NAME, Box::new(service)));
        self
    }

    /// The router of the services added.
    pub(crate) fn build(mut self) -> Router {
        self.services.sort_by_key(|(name, _)| *name);
        Router {
            services: self.services.into(),
        }
    }
}

impl Router {
    /// Calls the service that `request`'s path names.
    pub(crate) fn call<B>(&self, request: Request<B>) -> RouteFuture
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<tower::BoxError>,
    {
        let found = service_name(request.uri().path()).and_then(|name| {
            self.services
                .binary_search_by(|(candidate, _)| (*candidate).cmp(name))
                .ok()
        });
        match found.and_then(|index| self.services.get(index)) {
            Some((_, service)) => service.route(request.map(Body::new)),
            None => Box::pin(std::future::ready(Ok(unimplemented()))),
        }
    }
}

/// The service a gRPC path (`/{service}/{method}`) names, if it names a
/// method of one.
fn service_name(path: &str) -> Option<&str> {
    let path = path.strip_prefix('/')?;
    // Byte by byte: names are short, and a `char` search costs more.
    let end = path.bytes().position(|b| b == b'/')?;
    (end + 1 < path.len()).then(|| &path[..end])
}

/// The answer to a call to a service this server does not have.
fn unimplemented() -> Response<Body> {
    tonic::Status::unimplemented("")
        .into_http::<()>()
        .map(|()| Body::empty())
}

/// One service of the table, erased.
trait Route: Send + Sync + 'static {
    /// Calls a clone of the service with `request`, when it is ready.
    fn route(&self, request: Request<Body>) -> RouteFuture;
}

impl<S: GrpcRoute> Route for S {
    fn route(&self, request: Request<Body>) -> RouteFuture {
        let mut service = self.clone();
        // Generated services are always ready: call at once. One that is
        // not (a service wrapped in a limit) is waited for in the future,
        // where its readiness wakes the call.
        match Service::poll_ready(&mut service, &mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => boxed(Service::call(&mut service, request)),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => Box::pin(service.oneshot(request)),
        }
    }
}

/// `future`, boxed unless it is boxed already (as generated services'
/// futures are).
fn boxed<F>(future: F) -> RouteFuture
where
    F: Future<Output = Answer> + Send + 'static,
{
    let mut future = Some(future);
    let already = (&mut future as &mut dyn Any)
        .downcast_mut::<Option<RouteFuture>>()
        .and_then(Option::take);
    match (already, future) {
        (Some(boxed), _) => boxed,
        (None, Some(future)) => Box::pin(future),
        // Not reached: the future is taken only when it is boxed already.
        (None, None) => Box::pin(std::future::ready(Ok(unimplemented()))),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use http::{Request, Response};
    use tonic::body::Body;
    use tonic::server::NamedService;

    use super::{RouterBuilder, service_name};

    /// A service that is ready only when asked a second time, and says in
    /// its answer whether it was ready when called.
    #[derive(Clone, Default)]
    struct Slow(Arc<AtomicUsize>);

    impl NamedService for Slow {
        const NAME: &'static str = "test.Slow";
    }

    impl tower::Service<Request<Body>> for Slow {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.0.fetch_add(1, Ordering::SeqCst) > 0 {
                return Poll::Ready(Ok(()));
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            let mut response = Response::new(Body::empty());
            let ready = if self.0.load(Ordering::SeqCst) > 1 {
                "yes"
            } else {
                "no"
            };
            response
                .headers_mut()
                .insert("x-ready", http::HeaderValue::from_static(ready));
            std::future::ready(Ok(response))
        }
    }

    fn call(path: &'static str) -> Request<Body> {
        Request::builder().uri(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn a_call_waits_for_its_service_and_an_unknown_one_is_unimplemented() {
        let mut routes = RouterBuilder::default();
        routes.add_service(Slow::default());
        let router = routes.build();
        let response = router.call(call("/test.Slow/Method")).await.unwrap();
        assert_eq!(response.headers()["x-ready"], "yes");
        assert!(response.headers().get("grpc-status").is_none());
        for path in ["/test.Other/Method", "/test.Slow/", "/test.Slo/Method"] {
            let response = router.call(call(path)).await.unwrap();
            assert_eq!(response.headers()["grpc-status"], "12", "{path}");
        }
    }

    #[test]
    fn a_path_names_a_service_only_with_a_method() {
        assert_eq!(service_name("/pkg.Svc/Method"), Some("pkg.Svc"));
        assert_eq!(service_name("/pkg.Svc/a/b"), Some("pkg.Svc"));
        assert_eq!(service_name("/pkg.Svc/"), None);
        assert_eq!(service_name("/pkg.Svc"), None);
        assert_eq!(service_name("pkg.Svc/Method"), None);
        assert_eq!(service_name("*"), None);
    }
}

//! The server's fault injection layer: delays and aborts a method's calls
//! before they reach the codec and the handler, as the server policy says
//! ([`fault`](crate::fault)). A delay ends at the call's deadline, if that
//! comes first (the call then ends `DEADLINE_EXCEEDED`); an abort answers
//! with its code and never runs the handler.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};

use super::request::RequestBody;
use super::{ResponseBody, reject};
use crate::fault::{Fault, Injector};
use crate::server::observe::{Decision, DecisionKind, Observers};
use crate::server::policy::Policy;

/// The fault injectors of a server's methods, built from the policy and
/// replaced with it (by `RunningService::set_policy`). With no method
/// set, a call costs one relaxed load and a branch.
#[derive(Debug, Default)]
pub(crate) struct Live {
    on: AtomicBool,
    table: ArcSwap<Table>,
}

/// Injectors by the names of the policy's entries (`None`: the entry
/// sets no faults, and hides the entries after it).
#[derive(Debug, Default)]
struct Table {
    /// `package.Service/Method`.
    methods: HashMap<Box<str>, Option<Arc<Injector>>>,
    /// `package.Service` (of `package.Service/*`).
    services: HashMap<Box<str>, Option<Arc<Injector>>>,
    /// `"*"`.
    any: Option<Arc<Injector>>,
}

impl Live {
    /// Built for `policy`.
    pub(crate) fn new(policy: &Policy) -> Arc<Self> {
        let live = Arc::new(Self::default());
        live.follow(policy);
        live
    }

    /// Follows `policy` from the next call on.
    pub(crate) fn follow(&self, policy: &Policy) {
        let mut table = Table::default();
        for entry in &policy.methods {
            let injector = entry.fault.as_ref().map(Injector::new);
            for name in &entry.names {
                let injector = injector.clone();
                if name == "*" {
                    table.any = injector;
                } else if let Some(service) = name.strip_suffix("/*") {
                    table.services.insert(service.into(), injector);
                } else {
                    table.methods.insert(name.as_str().into(), injector);
                }
            }
        }
        let on = table.any.is_some()
            || table.methods.values().any(Option::is_some)
            || table.services.values().any(Option::is_some);
        self.table.store(Arc::new(table));
        self.on.store(on, Ordering::Relaxed);
    }

    /// The injector of the method at `path` (`/package.Service/Method`):
    /// see [`Policy::method`] for which entry applies.
    fn get(&self, path: &str) -> Option<Arc<Injector>> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let table = self.table.load();
        let path = path.strip_prefix('/').unwrap_or(path);
        if let Some(injector) = table.methods.get(path) {
            return injector.clone();
        }
        let service = path.rsplit_once('/').map_or(path, |(service, _)| service);
        match table.services.get(service) {
            Some(injector) => injector.clone(),
            None => table.any.clone(),
        }
    }
}

/// Adds fault injection.
#[derive(Debug, Clone)]
pub(crate) struct FaultLayer {
    pub(crate) live: Arc<Live>,
    pub(crate) observers: Observers,
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> FaultService<S> {
        FaultService {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`FaultLayer`].
#[derive(Debug, Clone)]
pub(crate) struct FaultService<S> {
    inner: S,
    layer: FaultLayer,
}

type Injected<E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, E>> + Send>>;

/// The inner layers' future, or an injected fault's (boxed: rare).
pub(crate) type FaultFuture<F, E> = Either<F, Injected<E>>;

impl<S> Service<Request<RequestBody>> for FaultService<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = FaultFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let injector = self.layer.live.get(request.uri().path());
        let Some((fault, method)) = crate::fault::for_call(injector, &mut request) else {
            return Either::Left(self.inner.call(request));
        };
        self.layer.observers.decided(&Decision {
            method: &method,
            kind: DecisionKind::FaultInjected {
                delay: fault.delay,
                abort: fault.abort,
            },
        });
        let json = request.body().json;
        let deadline = request.body().plan.deadline.deadline();
        // Called later, from its own task: the ready one goes with the
        // call, a clone stays (the stack's services are always ready).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Rare, and only where a policy asks for it: boxed.
        Either::Right(Box::pin(async move {
            if let Some(delay) = fault.delay {
                let until = tokio::time::Instant::now() + delay;
                match deadline {
                    Some(deadline) if deadline.instant() < until => {
                        tokio::time::sleep_until(deadline.instant()).await;
                        let status = crate::deadline::exceeded("while a fault delayed the call");
                        return Ok(reject(status, json));
                    }
                    _ => tokio::time::sleep_until(until).await,
                }
            }
            match fault.end() {
                Some(code) => Ok(reject(Fault::status(code, "server", &method), json)),
                None => inner.call(request).await,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_takes_its_entry_then_its_services_then_the_default() {
        let policy = Policy::from_toml(
            r#"
            [[methods]]
            names = ["a.S/Quiet", "b.T/*"]
            [[methods]]
            names = ["a.S/Get"]
            fault = { abort_percent = 100.0, abort_code = "NOT_FOUND" }
            [[methods]]
            names = ["a.S/*"]
            fault = { abort_percent = 100.0, abort_code = "ABORTED" }
            [[methods]]
            names = ["*"]
            fault = { abort_percent = 100.0, abort_code = "INTERNAL" }
            "#,
        )
        .unwrap();
        let live = Live::new(&policy);
        let code = |path: &str| {
            live.get(path)
                .and_then(|i| i.draw(&mut http::HeaderMap::new()))
                .and_then(Fault::end)
        };
        assert_eq!(code("/a.S/Get"), Some(tonic::Code::NotFound));
        assert_eq!(code("/a.S/List"), Some(tonic::Code::Aborted));
        assert_eq!(code("/c.U/Get"), Some(tonic::Code::Internal));
        // An entry without faults hides the ones after it.
        assert_eq!(code("/a.S/Quiet"), None);
        assert_eq!(code("/b.T/Get"), None);
        // Replaced: off, and a call costs one load.
        live.follow(&Policy::default());
        assert!(!live.on.load(Ordering::Relaxed));
        assert_eq!(code("/a.S/Get"), None);
    }
}

//! The client's fault injection layer: delays and aborts a method's calls
//! as its policy says ([`fault`](crate::fault)).

use std::future::Future;
use std::sync::Arc;

use futures_util::future::Either;
use http::{Request, Response};
use tonic::Status;

use super::Call;
use super::guard::PerMethod;
use crate::body::RequestBody;
use crate::client::observe::{DecisionKind, Observed, Reporter};
use crate::client::policy::Policy;
use crate::fault::{Fault as Injected, Injector};

/// The fault injectors of one service's methods.
pub(crate) type Live = PerMethod<Injector>;

impl Live {
    /// Follows `policy` (a method's count of faults in progress starts
    /// again when its settings change).
    pub(crate) fn follow(&self, policy: &Policy) {
        self.set(
            policy,
            |entry| entry.fault.as_ref(),
            |settings, _| Injector::new(settings),
        );
    }
}

/// Delays or fails the calls of methods with fault settings, before they
/// go further; the breaker above counts an injected abort like any other
/// failure, the retry layer below never sees it.
#[derive(Debug)]
pub(crate) struct Fault<S> {
    live: Arc<Live>,
    reporter: Reporter,
    inner: S,
}

impl<S> Fault<S> {
    pub(crate) fn new(live: Arc<Live>, reporter: Reporter, inner: S) -> Self {
        Self {
            live,
            reporter,
            inner,
        }
    }
}

impl<S> Call<Request<RequestBody>> for Fault<S>
where
    S: Call<Request<RequestBody>, Response = Response<Observed>>,
{
    type Response = Response<Observed>;

    fn call(
        &self,
        mut request: Request<RequestBody>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send {
        let fault = self
            .live
            .get(request.uri().path())
            .and_then(|injector| injector.draw(request.headers_mut()));
        let Some(fault) = fault else {
            return Either::Left(self.inner.call(request));
        };
        let method = request.uri().path().to_owned();
        self.reporter.report(
            &method,
            DecisionKind::FaultInjected {
                delay: fault.delay,
                abort: fault.abort,
            },
        );
        // Rare, and only where a policy asks for it: boxed.
        Either::Right(Box::pin(async move {
            if let Some(delay) = fault.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(code) = fault.end() {
                return Err(Injected::status(code, "client", &method));
            }
            self.inner.call(request).await
        }))
    }
}

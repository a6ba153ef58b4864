//! The client's fault injection layer: delays and aborts a method's calls
//! as its policy says ([`fault`](crate::fault)).

use std::future::Future;

use futures_util::future::Either;
use http::{Request, Response};
use tonic::Status;

use super::Call;
use super::guard::{Guarded, PerMethod};
use crate::body::RequestBody;
use crate::client::observe::{DecisionKind, Observed};
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
pub(crate) type Fault<S> = Guarded<Live, S>;

impl<S> Call<Request<RequestBody>> for Guarded<Live, S>
where
    S: Call<Request<RequestBody>, Response = Response<Observed>>,
{
    type Response = Response<Observed>;

    fn call(
        &self,
        mut request: Request<RequestBody>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send {
        let injector = self.live.get(request.uri().path());
        let Some((fault, method)) = crate::fault::for_call(injector, &mut request) else {
            return Either::Left(self.inner.call(request));
        };
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

//! The breaker layer: a method's circuit breaker refuses its calls while
//! they mostly fail ([`breaker`](crate::client::breaker)).

use std::future::Future;

use futures_util::future::Either;
use http::uri::PathAndQuery;
use http::{Request, Response};
use tonic::Status;

use super::Call;
use super::guard::{Guarded, Hold, Holding, PerMethod};
use crate::body::RequestBody;
use crate::client::breaker::{Breaker as State, Permit};
use crate::client::observe::{DecisionKind, Observed, Outcome, Reporter};
use crate::client::policy::Policy;
use crate::deadline::Deadline;

/// The breakers of one service's methods.
pub(crate) type Live = PerMethod<State>;

impl Live {
    /// Follows `policy`, keeping each breaker whose settings stay the same.
    pub(crate) fn follow(&self, policy: &Policy, reporter: &Reporter) {
        let reporter = reporter.clone();
        self.set(
            policy,
            |entry| entry.breaker.as_ref(),
            move |settings, old| match old {
                Some(old) if old.settings == *settings => old.clone(),
                _ => State::new(settings, reporter.clone()),
            },
        );
    }
}

// Boxed: a call's future stays as small as without a breaker; only a
// call with one pays for the allocation.
impl Hold for Box<Permit> {
    fn hold(self, response: &mut Response<Observed>) {
        // A trailers-only answer carries its status in its headers.
        let trailers_only = http_body::Body::is_end_stream(response.body());
        match trailers_only
            .then(|| crate::status::code_in(response.headers()))
            .flatten()
        {
            Some(code) => self.finish(&Outcome::Status(code)),
            None => response.body_mut().permits().breaker = Some(self),
        }
    }

    fn failed(self, status: &Status) {
        self.finish(&Outcome::Status(status.code()));
    }
}

/// Asks the breaker of the call's method, if it has one: refused, the
/// call fails at once with `UNAVAILABLE`; let through, the breaker counts
/// how it ends.
pub(crate) type Breaker<S> = Guarded<Live, S>;

impl<S> Call<Request<RequestBody>> for Guarded<Live, S>
where
    S: Call<Request<RequestBody>, Response = Response<Observed>>,
{
    type Response = Response<Observed>;

    fn call(
        &self,
        request: Request<RequestBody>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send {
        let Some(breaker) = self.live.get(request.uri().path()) else {
            return Either::Left(Holding {
                inner: self.inner.call(request),
                permit: None,
            });
        };
        let method = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let deadline = request.extensions().get::<Deadline>().copied();
        match breaker.admit(&method, deadline) {
            Ok(permit) => Either::Left(Holding {
                inner: self.inner.call(request),
                permit: Some(Box::new(permit)),
            }),
            Err(refusal) => {
                self.reporter
                    .report(method.path(), DecisionKind::BreakerRejected);
                let service = &self.reporter.service;
                let method = method.path();
                Either::Right(std::future::ready(Err(Status::unavailable(format!(
                    "calling {service}: the circuit breaker of {method} {refusal}; not sent, \
                     and not retried"
                )))))
            }
        }
    }
}

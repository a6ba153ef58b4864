//! The bulkhead layer: at most so many calls to the service in flight
//! ([`bulkhead`](crate::client::bulkhead)).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures_util::future::Either;
use http::{Request, Response};
use lodestar_core::ServiceKey;
use tonic::Status;

use super::Call;
use super::guard::{Guarded, Hold, Holding};
use crate::body::RequestBody;
use crate::client::observe::{DecisionKind, Observed};
use crate::client::policy::Policy;

/// The bulkhead of one service: its maximum (0: none), from the policy,
/// and its calls in flight, kept across policy changes.
#[derive(Debug, Default)]
pub(crate) struct Live {
    max_calls: AtomicU32,
    in_flight: AtomicU32,
}

impl Live {
    /// Follows `policy`.
    pub(crate) fn set(&self, policy: &Policy) {
        let max = policy.bulkhead.as_ref().map_or(0, |b| b.max_calls);
        self.max_calls.store(max, Ordering::Relaxed);
    }
}

/// A call's place in the bulkhead, given back when dropped.
#[derive(Debug)]
pub(crate) struct BulkheadPermit(Arc<Live>);

impl Drop for BulkheadPermit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Hold for BulkheadPermit {
    fn hold(self, response: &mut Response<Observed>) {
        response.body_mut().permits().bulkhead = Some(self);
    }

    fn failed(self, _: &Status) {}
}

/// Fails a call at once with `RESOURCE_EXHAUSTED` when the service's
/// bulkhead is full; otherwise the call holds a place until its response
/// ends, or it is dropped.
pub(crate) type Bulkhead<S> = Guarded<Live, S>;

impl<S> Call<Request<RequestBody>> for Guarded<Live, S>
where
    S: Call<Request<RequestBody>, Response = Response<Observed>>,
{
    type Response = Response<Observed>;

    fn call(
        &self,
        request: Request<RequestBody>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send {
        let max = self.live.max_calls.load(Ordering::Relaxed);
        if max == 0 {
            return Either::Left(Holding {
                inner: self.inner.call(request),
                permit: None,
            });
        }
        if self.live.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
            self.live.in_flight.fetch_sub(1, Ordering::AcqRel);
            let method = request.uri().path();
            self.reporter
                .report(method, DecisionKind::BulkheadFull { max_calls: max });
            return Either::Right(std::future::ready(Err(full(
                &self.reporter.service,
                method,
                max,
            ))));
        }
        Either::Left(Holding {
            inner: self.inner.call(request),
            permit: Some(BulkheadPermit(self.live.clone())),
        })
    }
}

fn full(service: &ServiceKey, method: &str, max: u32) -> Status {
    Status::resource_exhausted(format!(
        "calling {service} ({method}): the service's bulkhead is full: {max} calls are in \
         flight, its maximum (policy `bulkhead.max_calls`); not sent, and not retried"
    ))
}

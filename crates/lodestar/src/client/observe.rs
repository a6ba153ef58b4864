//! Seeing every attempt of every call: the [`Observer`] hook.
//!
//! A call may go to several endpoints (see the [client docs](super)); layers
//! added with [`ClientBuilder::layer`](super::ClientBuilder::layer) see it
//! once, as the caller made it. An observer sees each attempt: the endpoint
//! it went to, how it ended, how long it took ([`Attempt::latency`]) and
//! whether the request was sent. This is what metrics, outlier detection and retry budgets build on.
//!
//! An attempt that got a response ends when the response does: with the
//! `grpc-status` of its trailers, or `CANCELLED` if the caller dropped it
//! first (`DEADLINE_EXCEEDED` if that was because its deadline passed).
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use lodestar::client::observe::Attempt;
//!
//! let failures = Arc::new(AtomicUsize::new(0));
//! let counted = failures.clone();
//! let client = lodestar::Client::builder(lodestar::MemoryRegistry::new())
//!     .observe(move |attempt: &Attempt<'_>| {
//!         if attempt.outcome.is_failure() {
//!             counted.fetch_add(1, Ordering::Relaxed);
//!         }
//!     })
//!     .build();
//! # drop(client);
//! ```

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http_body::{Body, Frame, SizeHint};
use lodestar_core::ServiceKey;
use tokio::time::Instant;
use tonic::Code;

use super::outlier::{FailureCodes, OutlierSettings};
use super::selector::{Endpoint, Selector};
use super::stack::balance::Balance;
use super::stream::Received;
use crate::Deadline;

/// Sees every attempt of every call a client makes. Closures
/// `Fn(&Attempt<'_>)` are observers.
///
/// Called on the task that ends the attempt, once per attempt: keep it
/// short (count, record, send to a channel).
pub trait Observer: Send + Sync + 'static {
    /// One attempt ended.
    fn attempt(&self, attempt: &Attempt<'_>);

    /// A resilience layer decided something about a call (see
    /// [`Decision`]). Default: nothing.
    fn decided(&self, decision: &Decision<'_>) {
        let _ = decision;
    }
}

impl<F> Observer for F
where
    F: Fn(&Attempt<'_>) + Send + Sync + 'static,
{
    fn attempt(&self, attempt: &Attempt<'_>) {
        self(attempt);
    }
}

/// A decision a resilience layer made about a call: what metrics count
/// besides attempts (a retry, a budget's denial, a hedge, a breaker's change
/// of state, a call refused, a fault injected).
#[derive(Debug)]
#[non_exhaustive]
pub struct Decision<'a> {
    /// The service called.
    pub service: &'a ServiceKey,
    /// The method, as `/package.Service/Method`.
    pub method: &'a str,
    /// What was decided.
    pub kind: DecisionKind,
}

/// What a resilience layer decided (see [`Decision`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecisionKind {
    /// The method's circuit breaker opened (from closed, or from
    /// half-open when a probe failed): its calls fail at once for
    /// `open_for` ([`breaker`](super::breaker)).
    BreakerOpened {
        /// How long until it lets probes through.
        open_for: Duration,
    },
    /// The method's circuit breaker is half-open: its probes go out.
    BreakerHalfOpen,
    /// The method's circuit breaker closed: its probes succeeded.
    BreakerClosed,
    /// The method's circuit breaker (open, half-open with every probe
    /// out, or the adaptive throttle) refused a call: it failed at once
    /// with `UNAVAILABLE`.
    BreakerRejected,
    /// The service's bulkhead was full: the call failed at once with
    /// `RESOURCE_EXHAUSTED` ([`bulkhead`](super::bulkhead)).
    BulkheadFull {
        /// The bulkhead's maximum of calls in flight.
        max_calls: u32,
    },
    /// A fault was injected into the call ([`fault`](crate::fault)): a
    /// delay, an abort, or both.
    FaultInjected {
        /// The delay before the call went on, if any.
        delay: Option<Duration>,
        /// The code the call was failed with, if it was aborted.
        abort: Option<Code>,
    },
    /// A configured retry ([`retries`](super::retries)): attempt number
    /// `attempt` (2 for the first retry) goes after `backoff`.
    Retry {
        /// The number of the attempt about to be made.
        attempt: u32,
        /// How long it waits first (the jittered backoff, or the server's
        /// pushback).
        backoff: std::time::Duration,
    },
    /// A hedge ([`retries`](super::retries)): attempt number `attempt`
    /// goes now, `delay` after the attempt before it.
    Hedge {
        /// The number of the attempt sent.
        attempt: u32,
        /// How long after the previous attempt (0: at once, because an
        /// attempt failed).
        delay: std::time::Duration,
    },
    /// The service's [retry budget](super::budget) denied a retry (or a
    /// hedge): the call ends with the error of its last attempt (or waits
    /// for the attempts it has).
    BudgetDenied {
        /// The number the attempt would have had.
        attempt: u32,
        /// Whether it was a hedge.
        hedge: bool,
    },
    /// The server's `grpc-retry-pushback-ms` was honoured: the next
    /// attempt waits `wait`.
    PushbackWait {
        /// How long.
        wait: std::time::Duration,
    },
    /// The server's `grpc-retry-pushback-ms` said not to retry (negative
    /// or malformed, or longer than the call has left): the call ends with
    /// the error of its last attempt.
    PushbackStop,
}

/// Who is told of the decisions of a channel's resilience layers.
#[derive(Debug, Clone)]
pub(crate) struct Reporter {
    pub(crate) service: ServiceKey,
    pub(crate) observers: Arc<[Arc<dyn ObserverDebug>]>,
    /// Where decisions are counted, if the client counts them.
    pub(crate) counted: Option<crate::metrics::governance::ClientGovernance>,
}

impl Reporter {
    /// An endpoint was ejected, for `reason` (see `lodestar_client_ejections`).
    pub(crate) fn ejected(&self, reason: &'static str) {
        if let Some(counted) = &self.counted {
            counted.ejected(&self.service.service, reason);
        }
    }

    pub(crate) fn report(&self, method: &str, kind: DecisionKind) {
        if let Some(counted) = &self.counted {
            counted.decided(&self.service.service, method, &kind);
        }
        if self.observers.is_empty() {
            return;
        }
        let decision = Decision {
            service: &self.service,
            method,
            kind,
        };
        for observer in self.observers.iter() {
            observer.decided(&decision);
        }
    }
}

/// One attempt of a call, as it ended.
#[derive(Debug)]
#[non_exhaustive]
pub struct Attempt<'a> {
    /// The service called.
    pub service: &'a ServiceKey,
    /// The method, as `/package.Service/Method`.
    pub method: &'a str,
    /// The endpoint the attempt went to.
    pub endpoint: &'a Endpoint,
    /// Which attempt of the call: 1 for the first.
    pub number: u32,
    /// How it ended.
    pub outcome: &'a Outcome,
    /// When it was handed to the endpoint; see [`latency`](Self::latency).
    pub started: Instant,
    /// From the request going out to the response's headers, if they came
    /// (read from the clock once, when they did): from
    /// [`started`](Self::started), or, when the attempt had to open its
    /// connection first, from the moment it was open, so that a handshake
    /// is not taken for the instance's latency.
    pub answered: Option<Duration>,
    /// Whether the request may have reached the server. An attempt that
    /// was not sent (no connection could be had, or the connection was
    /// found closed first) can always be sent elsewhere.
    pub sent: bool,
    /// Whether the caller ended the attempt, not the endpoint: the call was
    /// dropped (the outcome is then `CANCELLED`), or its own deadline passed
    /// (`DEADLINE_EXCEEDED`, whether this client or the server noticed it
    /// first: a server's `DEADLINE_EXCEEDED` counts as the caller's when less
    /// than [`CALLER_DEADLINE_SLACK`] of the call's deadline was left). Such
    /// an outcome says nothing about the endpoint's health.
    pub by_caller: bool,
}

/// How close to the call's own deadline a server's `DEADLINE_EXCEEDED` may
/// come and still be taken as that deadline passing (see
/// [`Attempt::by_caller`]): 1 ms. The server counts the `grpc-timeout` it
/// was sent from when the request arrived, and the header rounds the time
/// left down to its unit (a microsecond below 100 s, a millisecond below 27
/// hours), so it may end the call a little before the caller's own clock
/// says the deadline is over.
pub const CALLER_DEADLINE_SLACK: Duration = Duration::from_millis(1);

impl Attempt<'_> {
    /// From the moment the attempt was handed to the endpoint until now,
    /// when it has just ended (read from the clock only when asked).
    pub fn latency(&self) -> Duration {
        self.started.elapsed()
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// With this gRPC status (`OK` included); `CANCELLED` when the caller
    /// dropped the call, `DEADLINE_EXCEEDED` when its deadline passed.
    Status(Code),
    /// The connection failed: refused, reset, or closed; the text says how.
    Transport(String),
}

impl Outcome {
    /// Whether this counts against the endpoint: a transport failure, or
    /// `UNAVAILABLE`, `INTERNAL`, `UNKNOWN` or `DATA_LOSS` — what a sick
    /// instance answers. A caller's own cancellation or deadline, and the
    /// codes that describe the request (`INVALID_ARGUMENT`, `NOT_FOUND`,
    /// …), do not.
    pub fn is_failure(&self) -> bool {
        match self {
            Outcome::Transport(_) => true,
            Outcome::Status(code) => matches!(
                code,
                Code::Unavailable | Code::Internal | Code::Unknown | Code::DataLoss
            ),
        }
    }
}

/// Who is told about the attempts of one channel's calls.
#[derive(Debug)]
pub(crate) struct Watchers {
    pub(crate) service: ServiceKey,
    pub(crate) selector: Arc<dyn Selector>,
    pub(crate) observers: Arc<[Arc<dyn ObserverDebug>]>,
    /// Outlier detection, when the policy turns it on.
    pub(crate) outlier: Option<OutlierWatch>,
}

/// What outlier detection needs of each attempt's report: how to count it,
/// and whom to ask for an ejection.
#[derive(Debug)]
pub(crate) struct OutlierWatch {
    pub(crate) settings: OutlierSettings,
    pub(crate) codes: FailureCodes,
    pub(crate) balance: Weak<Balance>,
    /// Whether the balance layer's sweeps are idle: a failure wakes them.
    pub(crate) sweeps_idle: Arc<AtomicBool>,
}

/// An [`Observer`] the client can print (as its type name).
pub(crate) trait ObserverDebug: Observer {}
impl<T: Observer> ObserverDebug for T {}

impl std::fmt::Debug for dyn ObserverDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// One attempt in progress: counts it in flight on its endpoint, and
/// reports how it ended exactly once, however it ends (dropped included).
#[derive(Debug)]
pub(crate) struct AttemptGuard {
    watchers: Arc<Watchers>,
    endpoint: Arc<Endpoint>,
    method: PathAndQuery,
    number: u32,
    started: Instant,
    /// When the request went out, if a connection had to be opened first
    /// (else `started`).
    exchange_started: Option<Instant>,
    /// Time to the response's headers, once they came.
    answered: Option<Duration>,
    deadline: Option<Deadline>,
    sent: bool,
    reported: bool,
}

impl AttemptGuard {
    pub(crate) fn start(
        watchers: Arc<Watchers>,
        endpoint: Arc<Endpoint>,
        method: PathAndQuery,
        number: u32,
        deadline: Option<Deadline>,
    ) -> Self {
        endpoint.stats.started();
        Self {
            watchers,
            endpoint,
            method,
            number,
            started: Instant::now(),
            exchange_started: None,
            answered: None,
            deadline,
            sent: false,
            reported: false,
        }
    }

    /// The request went out (it may have reached the server).
    pub(crate) fn sent(&mut self) {
        self.sent = true;
    }

    /// The attempt had to open its connection first, and just did: the
    /// latency sample starts now, so that an instance's first call does
    /// not make it look slow for its handshake (one clock read, on this
    /// rare path only).
    pub(crate) fn connected(&mut self) {
        self.exchange_started = Some(Instant::now());
    }

    /// The response's headers arrived: the latency sample of this
    /// attempt, kept for its report (selectors such as peak-EWMA read it
    /// there, with no clock read of their own).
    pub(crate) fn answered(&mut self) {
        let rtt = self.exchange_started.unwrap_or(self.started).elapsed();
        self.answered = Some(rtt);
        self.endpoint.stats.record_latency(rtt);
    }

    /// The attempt ended with `outcome`.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.report(outcome, false);
    }

    /// Reports `outcome`; `dropped` when the caller dropped the attempt.
    fn report(&mut self, outcome: Outcome, dropped: bool) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        let by_caller = dropped
            || (outcome == Outcome::Status(Code::DeadlineExceeded)
                && self
                    .deadline
                    .is_some_and(|d| d.remaining() < CALLER_DEADLINE_SLACK));
        self.endpoint.stats.record_outcome(outcome.is_failure());
        let attempt = Attempt {
            service: &self.watchers.service,
            method: self.method.path(),
            endpoint: &self.endpoint,
            number: self.number,
            outcome: &outcome,
            started: self.started,
            answered: self.answered,
            sent: self.sent,
            by_caller,
        };
        self.watchers.selector.report(&attempt);
        for observer in self.watchers.observers.iter() {
            observer.attempt(&attempt);
        }
        if let Some(outlier) = &self.watchers.outlier
            && let Some(failure) = outlier.codes.classify(&outcome, by_caller)
        {
            let eject = self
                .endpoint
                .stats
                .outlier
                .record(failure, &outlier.settings);
            let wake = failure && outlier.sweeps_idle.load(Ordering::Acquire);
            if (eject || wake)
                && let Some(balance) = outlier.balance.upgrade()
            {
                if wake {
                    balance.wake_sweeps();
                }
                if eject {
                    balance.consecutive_failures(&self.endpoint);
                }
            }
        }
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        if !self.reported {
            // Dropped before it ended: the caller gave up, or its deadline passed.
            let code = match self.deadline {
                Some(deadline) if deadline.is_expired() => Code::DeadlineExceeded,
                _ => Code::Cancelled,
            };
            self.report(Outcome::Status(code), true);
        }
        self.endpoint.stats.finished();
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its attempt, and its call's permits,
    /// when it ends.
    #[derive(Debug)]
    pub struct Observed {
        #[pin]
        inner: Received,
        guard: Option<AttemptGuard>,
        permits: Permits,
    }
}

impl Observed {
    pub(crate) fn new(inner: Received, guard: Option<AttemptGuard>) -> Self {
        Self {
            inner,
            guard,
            permits: Permits::default(),
        }
    }

    /// The permits of the call (a breaker's, a bulkhead's), released
    /// when the response ends or is dropped.
    pub(crate) fn permits(&mut self) -> &mut Permits {
        &mut self.permits
    }
}

/// What the layers above retry hold for a whole call, until its response
/// ends: told how it ended, or released when dropped.
#[derive(Debug, Default)]
pub(crate) struct Permits {
    pub(crate) breaker: Option<Box<super::breaker::Permit>>,
    pub(crate) bulkhead: Option<super::stack::BulkheadPermit>,
    /// The call's client span, with OpenTelemetry on (boxed: the body of
    /// an untraced call stays as small as it was).
    #[cfg(feature = "otlp")]
    pub(crate) span: Option<Box<crate::telemetry::spans::CallSpan>>,
}

impl Permits {
    fn is_empty(&self) -> bool {
        #[cfg(feature = "otlp")]
        let no_span = self.span.is_none();
        #[cfg(not(feature = "otlp"))]
        let no_span = true;
        self.breaker.is_none() && self.bulkhead.is_none() && no_span
    }

    /// The call ended with `outcome`.
    pub(crate) fn finish(&mut self, outcome: &Outcome) {
        if let Some(permit) = self.breaker.take() {
            permit.finish(outcome);
        }
        self.bulkhead = None;
        #[cfg(feature = "otlp")]
        if let Some(span) = self.span.take() {
            span.finish_outcome(outcome);
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = h2::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if this.guard.is_some() || !this.permits.is_empty() {
            let outcome = match &polled {
                Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|trailers| {
                    // A response without a status is an error (gRPC says UNKNOWN).
                    Outcome::Status(crate::status::code_in(trailers).unwrap_or(Code::Unknown))
                }),
                Poll::Ready(Some(Err(e))) => {
                    Some(Outcome::Transport(lodestar_core::error::chain(e)))
                }
                Poll::Ready(None) => Some(Outcome::Status(Code::Unknown)),
                Poll::Pending => None,
            };
            if let Some(outcome) = outcome {
                this.permits.finish(&outcome);
                if let Some(guard) = this.guard.take() {
                    guard.finish(outcome);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use lodestar_core::Instance;
    use lodestar_core::sync::MutexExt;

    use super::*;
    use crate::client::selector::RoundRobin;

    /// What an observer saw: (outcome, by_caller) per attempt.
    type Seen = Arc<Mutex<Vec<(Outcome, bool)>>>;

    /// A guard whose reports land in the returned list.
    fn guard(deadline: Option<Deadline>) -> (AttemptGuard, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let observer = move |a: &Attempt<'_>| {
            sink.lock_unpoisoned()
                .push((a.outcome.clone(), a.by_caller))
        };
        let watchers = Arc::new(Watchers {
            service: ServiceKey::new("svc"),
            selector: Arc::new(RoundRobin::default()),
            observers: Arc::from([Arc::new(observer) as Arc<dyn ObserverDebug>]),
            outlier: None,
        });
        let endpoint =
            crate::client::selector::tests::endpoint(Instance::new("svc", "127.0.0.1:1"));
        let method = PathAndQuery::from_static("/svc/M");
        (
            AttemptGuard::start(watchers, endpoint, method, 1, deadline),
            seen,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_attempt_is_the_callers() {
        let (attempt, seen) = guard(None);
        drop(attempt);
        let (expired, seen_expired) = guard(Some(Deadline::after(Duration::from_secs(1))));
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(expired);
        assert_eq!(
            *seen.lock_unpoisoned(),
            [(Outcome::Status(Code::Cancelled), true)]
        );
        assert_eq!(
            *seen_expired.lock_unpoisoned(),
            [(Outcome::Status(Code::DeadlineExceeded), true)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_servers_deadline_exceeded_is_the_callers_only_at_the_callers_deadline() {
        let deadline = Deadline::after(Duration::from_secs(1));
        let exceeded = Outcome::Status(Code::DeadlineExceeded);
        // The server gave up with most of the call's time left: its doing.
        let (early, seen_early) = guard(Some(deadline));
        tokio::time::advance(Duration::from_millis(200)).await;
        early.finish(exceeded.clone());
        // At the deadline, less the header's rounding: the caller's.
        let (late, seen_late) = guard(Some(deadline));
        tokio::time::advance(Duration::from_micros(799_999)).await;
        late.finish(exceeded.clone());
        // Without a deadline of its own, the caller cannot have caused it.
        let (none, seen_none) = guard(None);
        none.finish(exceeded.clone());
        // Any other code that ends an attempt is the server's.
        let (cancelled, seen_cancelled) = guard(Some(deadline));
        cancelled.finish(Outcome::Status(Code::Cancelled));
        assert_eq!(*seen_early.lock_unpoisoned(), [(exceeded.clone(), false)]);
        assert_eq!(*seen_late.lock_unpoisoned(), [(exceeded.clone(), true)]);
        assert_eq!(*seen_none.lock_unpoisoned(), [(exceeded, false)]);
        assert_eq!(
            *seen_cancelled.lock_unpoisoned(),
            [(Outcome::Status(Code::Cancelled), false)]
        );
    }
}

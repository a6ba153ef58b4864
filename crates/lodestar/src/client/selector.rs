//! Choosing the instance each call goes to: the [`Selector`], and the
//! per-endpoint record ([`EndpointStats`]) every selector can read.
//!
//! A channel keeps one [`Endpoint`] per instance of its service that takes
//! traffic. For each attempt of a call, its selector is shown the endpoints
//! the call may use (neither ejected nor already tried by this call) and
//! picks one; after the attempt it is told the result
//! ([`Selector::report`]). The stack itself keeps each endpoint's
//! [`EndpointStats`] (calls in flight, a latency average, recent outcomes),
//! so a selector needs no bookkeeping of its own to balance by load.
//!
//! ```
//! use std::sync::Arc;
//! use lodestar::client::selector::{CallInfo, Endpoint, Selector};
//!
//! /// Sends every call to the instances labelled `canary=true`, if any.
//! #[derive(Debug, Clone, Default)]
//! struct Canary;
//!
//! impl Selector for Canary {
//!     fn select(&self, endpoints: &[Arc<Endpoint>], _call: &CallInfo<'_>) -> Option<usize> {
//!         endpoints
//!             .iter()
//!             .position(|e| e.instance().metadata.get("canary").is_some_and(|v| v == "true"))
//!     }
//! }
//!
//! let client = lodestar::Client::builder(lodestar::MemoryRegistry::new())
//!     .selector(Canary)
//!     .build();
//! # drop(client);
//! ```

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderMap;
use http::uri::Authority;
use lodestar_core::{Instance, ServiceKey};
use tokio::time::Instant;

use super::connection::Connection;
use super::observe::Attempt;
use super::outlier::OutlierStats;

/// Chooses an endpoint for each attempt of a call, and is told how it went.
///
/// A client gives each channel (one per service) its own clone of the
/// selector, so state kept in a selector (a round-robin cursor) is per
/// service; share state across services with an `Arc` inside.
pub trait Selector: fmt::Debug + Send + Sync + 'static {
    /// The index in `endpoints` of the one to use, or `None` if none suits
    /// the call (it then fails with `UNAVAILABLE`). `endpoints` is never
    /// empty, holds only endpoints the call may use, and is ordered by
    /// instance id.
    fn select(&self, endpoints: &[Arc<Endpoint>], call: &CallInfo<'_>) -> Option<usize>;

    /// Builds what [`select_prepared`](Self::select_prepared) reads for
    /// one set of endpoints (a schedule, a hash ring): called when the set
    /// changes (instances, weights, ejections, policy), never per call.
    /// Default: nothing.
    fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Option<Box<dyn Any + Send + Sync>> {
        let _ = endpoints;
        None
    }

    /// The index in `set` of the endpoint to use: the usual call, whose
    /// set of usable endpoints was prepared in advance. Default:
    /// [`select`](Self::select) over the set's endpoints.
    fn select_prepared(&self, set: &Prepared, call: &CallInfo<'_>) -> Option<usize> {
        self.select(set.endpoints(), call)
    }

    /// Told the outcome of every attempt that went to an endpoint this
    /// selector chose (after the endpoint's [`EndpointStats`] took it in).
    /// Default: nothing.
    fn report(&self, attempt: &Attempt<'_>) {
        let _ = attempt;
    }
}

/// A set of endpoints a call may use, with what its selector prepared for
/// it ([`Selector::prepare`]).
#[derive(Debug)]
pub struct Prepared {
    endpoints: Arc<[Arc<Endpoint>]>,
    state: Option<Box<dyn Any + Send + Sync>>,
}

impl Prepared {
    /// Prepares `endpoints` for `selector`.
    pub fn new(selector: &dyn Selector, endpoints: Arc<[Arc<Endpoint>]>) -> Self {
        let state = selector.prepare(&endpoints);
        Self { endpoints, state }
    }

    /// The endpoints, ordered by instance id; never empty when a selector
    /// is asked to choose among them.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// What the selector prepared, if it was a `T`.
    pub fn state<T: Any>(&self) -> Option<&T> {
        self.state.as_deref()?.downcast_ref()
    }
}

/// What a selector knows about the call it chooses for.
#[derive(Debug)]
#[non_exhaustive]
pub struct CallInfo<'a> {
    /// The service called.
    pub service: &'a ServiceKey,
    /// The method, as `/package.Service/Method`.
    pub method: &'a str,
    /// The request's headers (metadata), e.g. for hashing on a key.
    pub headers: &'a HeaderMap,
    /// Which attempt of the call this is: 1 for the first.
    pub attempt: u32,
}

/// Each endpoint in turn (the default).
#[derive(Debug, Default)]
pub struct RoundRobin {
    cursor: AtomicUsize,
}

impl Clone for RoundRobin {
    /// A fresh cursor: each channel turns through its own endpoints.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl Selector for RoundRobin {
    fn select(&self, endpoints: &[Arc<Endpoint>], _call: &CallInfo<'_>) -> Option<usize> {
        Some(self.cursor.fetch_add(1, Ordering::Relaxed) % endpoints.len())
    }
}

/// An endpoint chosen uniformly at random.
#[derive(Debug, Clone, Copy, Default)]
pub struct Random;

impl Selector for Random {
    fn select(&self, endpoints: &[Arc<Endpoint>], _call: &CallInfo<'_>) -> Option<usize> {
        Some(fastrand::usize(..endpoints.len()))
    }
}

/// One instance of the service, as a channel calls it.
#[derive(Debug)]
pub struct Endpoint {
    pub(crate) instance: Instance,
    pub(crate) authority: Authority,
    /// Kept across updates of the instance (same id and address).
    pub(crate) connection: Arc<Connection>,
    pub(crate) stats: Arc<EndpointStats>,
}

impl Endpoint {
    /// The instance, as the registry last described it.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// What the stack has recorded about calls to this endpoint.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }
}

/// The weight of each new latency sample in [`EndpointStats::latency`]'s
/// moving average: 0.2, so the average follows a change within about ten calls.
const LATENCY_WEIGHT: f64 = 0.2;

/// How many outcomes [`EndpointStats::recent`] remembers: the last 64.
pub const RECENT_OUTCOMES: u32 = 64;

/// What the stack records about the calls to one endpoint: one record per
/// instance address, shared by every layer that needs it (selection,
/// ejection, and the outlier detection and retry budgets to come). It
/// outlives changes to the instance's metadata.
#[derive(Debug, Default)]
pub struct EndpointStats {
    in_flight: AtomicUsize,
    /// Nanoseconds, as `f64` bits; 0 until the first sample.
    latency: AtomicU64,
    /// The last outcomes, newest in bit 0; a set bit is a failure.
    outcomes: AtomicU64,
    /// How many outcomes were recorded, up to [`RECENT_OUTCOMES`].
    recorded: AtomicU32,
    /// Ejected until this many nanoseconds after [`epoch`]; 0 when not.
    ejected_until: AtomicU64,
    /// Failed connection attempts in a row.
    connect_failures: AtomicU32,
    /// Outlier detection's counts and ejection; apart from the connection
    /// ejection above (see [`outlier`](super::outlier)).
    pub(crate) outlier: OutlierStats,
}

impl EndpointStats {
    /// Attempts sent to this endpoint that have not finished (their
    /// response not fully received, or dropped). Every attempt is counted
    /// out however it ends, including a call dropped by its caller.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A moving average of the time from sending a request to its
    /// response's headers; `None` before the first response.
    pub fn latency(&self) -> Option<Duration> {
        let nanos = f64::from_bits(self.latency.load(Ordering::Relaxed));
        (nanos > 0.0).then(|| Duration::from_nanos(nanos as u64))
    }

    /// Of the last [`RECENT_OUTCOMES`] attempts, how many succeeded and how
    /// many failed (see [`Outcome::is_failure`](super::observe::Outcome::is_failure)).
    pub fn recent(&self) -> (u32, u32) {
        // Capped: concurrent recorders may both count the 64th.
        let recorded = self.recorded.load(Ordering::Relaxed).min(RECENT_OUTCOMES);
        let failures = self.outcomes.load(Ordering::Relaxed).count_ones();
        (recorded.saturating_sub(failures), failures)
    }

    /// What outlier detection keeps about this endpoint.
    pub fn outlier(&self) -> &OutlierStats {
        &self.outlier
    }

    /// Whether the endpoint is ejected (skipped by selection) at `now`,
    /// which is read from the clock only when an ejection is in force.
    pub fn is_ejected(&self) -> bool {
        self.ejected(&mut None)
    }

    pub(crate) fn ejected(&self, now: &mut Option<Instant>) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && nanos_since_epoch(*now.get_or_insert_with(Instant::now)) < until
    }

    /// When the ejection in force ends (see [`nanos_since_epoch`]).
    pub(crate) fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Relaxed)
    }

    pub(crate) fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn record_latency(&self, sample: Duration) {
        let sample = sample.as_nanos() as f64;
        let _ = self
            .latency
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                let old = f64::from_bits(old);
                let new = if old > 0.0 {
                    old + (sample - old) * LATENCY_WEIGHT
                } else {
                    sample
                };
                Some(new.max(1.0).to_bits())
            });
    }

    pub(crate) fn record_outcome(&self, failure: bool) {
        let _ = self
            .outcomes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((bits << 1) | u64::from(failure))
            });
        if self.recorded.load(Ordering::Relaxed) < RECENT_OUTCOMES {
            self.recorded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Skips this endpoint for a while after a refused connection: `base`,
    /// doubled for each failure in a row, at most `max`. Returns how long,
    /// and until when (as [`nanos_since_epoch`]).
    pub(crate) fn eject(&self, base: Duration, max: Duration) -> (Duration, u64) {
        let failures = self
            .connect_failures
            .fetch_add(1, Ordering::Relaxed)
            .min(16);
        let duration = base.saturating_mul(1u32 << failures).min(max);
        let until = nanos_since_epoch(crate::deadline::later(Instant::now(), duration)).max(1);
        self.ejected_until.store(until, Ordering::Relaxed);
        (duration, until)
    }

    /// Clears the ejection after a connection succeeded.
    pub(crate) fn connected(&self) {
        if self.connect_failures.load(Ordering::Relaxed) != 0 {
            self.connect_failures.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(crate) fn nanos_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The instant `nanos` after [`epoch`] (the inverse of [`nanos_since_epoch`]).
pub(crate) fn instant_at(nanos: u64) -> Instant {
    crate::deadline::later(epoch(), Duration::from_nanos(nanos))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh endpoint for `instance`, with a connection not yet opened.
    pub(crate) fn endpoint(instance: Instance) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            authority: instance.address.parse().unwrap(),
            connection: Arc::new(Connection::new(instance.address.clone())),
            stats: Arc::new(EndpointStats::default()),
            instance,
        })
    }

    #[test]
    fn recent_outcomes_keep_the_last_sixty_four() {
        let stats = EndpointStats::default();
        assert_eq!(stats.recent(), (0, 0));
        for i in 0..100 {
            stats.record_outcome(i % 4 == 0);
        }
        // The last 64 of 0..100 are 36..100: 16 of them are multiples of 4.
        assert_eq!(stats.recent(), (48, 16));
    }

    #[test]
    fn latency_is_a_moving_average() {
        let stats = EndpointStats::default();
        assert_eq!(stats.latency(), None);
        stats.record_latency(Duration::from_millis(10));
        assert_eq!(stats.latency(), Some(Duration::from_millis(10)));
        stats.record_latency(Duration::from_millis(20));
        assert_eq!(stats.latency(), Some(Duration::from_millis(12)));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_doubles_and_a_connection_clears_it() {
        let stats = EndpointStats::default();
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(3));
        assert_eq!(stats.eject(base, max).0, base);
        assert!(stats.is_ejected());
        assert_eq!(stats.eject(base, max).0, Duration::from_secs(2));
        assert_eq!(stats.eject(base, max).0, max);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!stats.is_ejected());
        stats.eject(base, max);
        stats.connected();
        assert!(!stats.is_ejected());
        assert_eq!(stats.eject(base, max).0, base);
    }
}

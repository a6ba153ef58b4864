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

impl<'a> CallInfo<'a> {
    /// The first attempt of a call of `method` (`/package.Service/Method`)
    /// of `service` with `headers`: for testing and benchmarking
    /// selectors (a client makes its own for each attempt).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use http::HeaderMap;
    /// use lodestar::ServiceKey;
    /// use lodestar::client::selector::{CallInfo, Endpoint, Prepared, RoundRobin, Selector};
    ///
    /// let endpoints: Arc<[Arc<Endpoint>]> = ["127.0.0.1:7001", "127.0.0.1:7002"]
    ///     .into_iter()
    ///     .map(|address| Endpoint::new(lodestar::Instance::new("orders", address)).map(Arc::new))
    ///     .collect::<Result<_, _>>()?;
    /// let selector = RoundRobin::default();
    /// let set = Prepared::new(&selector, endpoints);
    /// let (service, headers) = (ServiceKey::new("orders"), HeaderMap::new());
    /// let call = CallInfo::new(&service, "/orders.Orders/Get", &headers);
    /// let first = selector.select_prepared(&set, &call);
    /// let second = selector.select_prepared(&set, &call);
    /// assert!(first.is_some() && first != second);
    /// # Ok::<(), lodestar::client::selector::InvalidAddress>(())
    /// ```
    pub fn new(service: &'a ServiceKey, method: &'a str, headers: &'a HeaderMap) -> Self {
        Self {
            service,
            method,
            headers,
            attempt: 1,
        }
    }
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
        turn(&self.cursor, endpoints.len())
    }

    /// A cursor of the set's own, starting anywhere: each group a policy
    /// routes to turns through its endpoints on its own.
    fn prepare(&self, _endpoints: &[Arc<Endpoint>]) -> Option<Box<dyn Any + Send + Sync>> {
        Some(Box::new(AtomicUsize::new(fastrand::usize(..))))
    }

    fn select_prepared(&self, set: &Prepared, call: &CallInfo<'_>) -> Option<usize> {
        match set.state::<AtomicUsize>() {
            Some(cursor) => turn(cursor, set.endpoints().len()),
            None => self.select(set.endpoints(), call),
        }
    }
}

/// The next of `len` in turn, by `cursor`; `None` for none.
fn turn(cursor: &AtomicUsize, len: usize) -> Option<usize> {
    (len != 0).then(|| cursor.fetch_add(1, Ordering::Relaxed) % len)
}

/// An endpoint chosen uniformly at random.
#[derive(Debug, Clone, Copy, Default)]
pub struct Random;

impl Selector for Random {
    fn select(&self, endpoints: &[Arc<Endpoint>], _call: &CallInfo<'_>) -> Option<usize> {
        (!endpoints.is_empty()).then(|| fastrand::usize(..endpoints.len()))
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

/// An instance whose address is not `host:port`, given to [`Endpoint::new`].
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "instance `{instance}` of service `{service}` has the address `{address}`; expected host:port"
)]
pub struct InvalidAddress {
    /// The instance's id.
    pub instance: String,
    /// The service, as `namespace/group/name`.
    pub service: ServiceKey,
    /// The address it gave.
    pub address: String,
}

impl Endpoint {
    /// An endpoint for `instance`, with fresh stats, not connected until a
    /// call uses it: for testing selectors and benchmarking them. (A
    /// client makes its own endpoints, sharing each one's connection and
    /// stats across updates of the instance.) Fails if the instance's
    /// address is not `host:port`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use lodestar::client::selector::Endpoint;
    ///
    /// let instance = lodestar::Instance::new("orders", "127.0.0.1:7001").with_id("a");
    /// let endpoint = Arc::new(Endpoint::new(instance)?);
    /// assert_eq!(endpoint.stats().in_flight(), 0);
    /// # Ok::<(), lodestar::client::selector::InvalidAddress>(())
    /// ```
    pub fn new(instance: Instance) -> Result<Self, InvalidAddress> {
        let authority = instance
            .address
            .parse::<Authority>()
            .map_err(|_| InvalidAddress {
                instance: instance.id.clone(),
                service: instance.key.clone(),
                address: instance.address.clone(),
            })?;
        Ok(Self {
            connection: Arc::new(Connection::new(instance.address.clone())),
            stats: Arc::new(EndpointStats::default()),
            instance,
            authority,
        })
    }

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
/// connection ejection, outlier detection, and later retry budgets). It
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
    /// The peak-EWMA latency estimate ([`PeakEwma`](super::strategy::PeakEwma)):
    /// nanoseconds, as `f64` bits; 0 until the first sample.
    peak_rtt: AtomicU64,
    /// When [`peak_rtt`](Self::peak_rtt) was last updated, as
    /// [`nanos_since_epoch`].
    peak_at: AtomicU64,
    /// When a peak-EWMA selector last picked this endpoint, as
    /// [`nanos_since_epoch`]; 0 if never (for its forced probe).
    last_picked: AtomicU64,
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

    /// Whether the endpoint is ejected (skipped by selection, unless too
    /// few are left): for a refused connection, or by outlier detection.
    pub fn is_ejected(&self) -> bool {
        self.outlier.is_ejected() || self.ejected(&mut None)
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

    /// The peak-EWMA latency estimate at `now` (nanoseconds since
    /// [`epoch`]), decayed toward 0 since its last update with time
    /// constant `decay` (nanoseconds): an endpoint left alone looks faster
    /// and faster. `None` before the first sample.
    pub(crate) fn peak_rtt(&self, now: u64, decay: f64) -> Option<f64> {
        let rtt = f64::from_bits(self.peak_rtt.load(Ordering::Relaxed));
        if rtt <= 0.0 {
            return None;
        }
        let at = self.peak_at.load(Ordering::Relaxed);
        Some(rtt * decay_weight(now.saturating_sub(at), decay))
    }

    /// Takes a latency sample (nanoseconds) taken at `at` into the
    /// peak-EWMA estimate. The estimate is read as decayed toward 0 since
    /// the last sample (by `exp(-elapsed / decay)`, as [`peak_rtt`](Self::peak_rtt)
    /// reads it); a slower sample replaces it, and a faster one pulls it
    /// toward itself by `1 - exp(-elapsed / decay)`. Both keep the value
    /// continuous: a faster sample never raises what a read would see,
    /// and the estimate never falls below the sample.
    ///
    /// The estimate and its time are two atomics: a racing update can pair
    /// one's value with the other's time, which skews the decay of one
    /// sample slightly and is corrected by the next.
    pub(crate) fn record_peak_rtt(&self, sample: f64, at: u64, decay: f64) {
        let sample = sample.max(1.0);
        // Never back in time: reports may arrive out of order.
        let last = self.peak_at.fetch_max(at, Ordering::Relaxed);
        let weight = decay_weight(at.saturating_sub(last), decay);
        let _ = self
            .peak_rtt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                // The estimate as read now (decayed toward 0), then
                // pulled toward a faster sample.
                let current = f64::from_bits(old) * weight;
                let new = if current <= 0.0 || sample >= current {
                    sample
                } else {
                    current * weight + sample * (1.0 - weight)
                };
                Some(new.to_bits())
            });
    }

    /// When a peak-EWMA selector last picked this endpoint (nanoseconds
    /// since [`epoch`]; 0 if never).
    pub(crate) fn last_picked(&self) -> u64 {
        self.last_picked.load(Ordering::Relaxed)
    }

    /// Notes that the endpoint was picked at `now`: written at most once
    /// a millisecond (the probe interval is far longer), so that picks from
    /// many threads do not all write the same cache line.
    pub(crate) fn picked(&self, now: u64) {
        const GRANULARITY: u64 = 1_000_000;
        let last = self.last_picked.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= GRANULARITY {
            self.last_picked.store(now, Ordering::Relaxed);
        }
    }

    /// Claims this endpoint's forced probe: true for exactly one of the
    /// callers that saw it last picked at `seen`.
    pub(crate) fn claim_probe(&self, seen: u64, now: u64) -> bool {
        self.last_picked
            .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
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

/// `exp(-elapsed / decay)`: how much of an estimate is left after
/// `elapsed` nanoseconds.
fn decay_weight(elapsed: u64, decay: f64) -> f64 {
    if decay <= 0.0 {
        return 0.0;
    }
    (-(elapsed as f64) / decay).exp()
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

    #[test]
    fn the_peak_estimate_jumps_up_and_decays_down() {
        let stats = EndpointStats::default();
        let (second, decay) = (1_000_000_000u64, 10e9);
        assert_eq!(stats.peak_rtt(0, decay), None);
        stats.record_peak_rtt(10e6, second, decay);
        stats.record_peak_rtt(50e6, second, decay);
        // A slower sample: taken at once.
        assert_eq!(stats.peak_rtt(second, decay), Some(50e6));
        // Read 10 s later: decayed toward 0 by e^-1.
        let read = stats.peak_rtt(11 * second, decay).unwrap_or(0.0);
        assert!((read - 50e6 / std::f64::consts::E).abs() < 1e3, "{read}");
        // A faster sample 10 s later pulls the decayed estimate toward
        // itself by 1 - e^-1, not below it.
        stats.record_peak_rtt(10e6, 11 * second, decay);
        let after = stats.peak_rtt(11 * second, decay).unwrap_or(0.0);
        let e = std::f64::consts::E;
        let expected = 50e6 / e / e + 10e6 * (1.0 - 1.0 / e);
        assert!((after - expected).abs() < 1e3, "{after} against {expected}");
        assert!(after > 10e6 && after < read);
        // A report from before the last one does not move time back.
        stats.record_peak_rtt(20e6, second, decay);
        assert!(stats.peak_rtt(11 * second, decay).unwrap_or(0.0) >= 20e6);
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

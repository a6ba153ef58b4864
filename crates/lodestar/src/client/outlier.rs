//! Outlier detection: taking an instance that fails out of rotation for a
//! while (ejecting it), and bringing it back.
//!
//! Three detectors, all counting only what [`FailureCodes::classify`] calls
//! a failure:
//!
//! - **consecutive failures**, at once, on the call that makes the count
//!   ([`OutlierStats::record`], then [`Detector::try_eject`]);
//! - **failure percentage** and **success rate**, over each interval, on a
//!   timer ([`Detector::sweep`]).
//!
//! An ejected instance keeps its connection; it is only left out of
//! selection. It comes back when its time is over, on the next sweep: never
//! because a call happened to reach it. Each ejection lasts longer than the
//! one before (the base time, times a multiplier that grows by one per
//! ejection and shrinks by one per healthy interval, up to the maximum),
//! and no more than [`OutlierSettings::max_ejection_percent`] of the
//! instances are ejected at once, counting the one about to be (one may
//! always be, so that a fleet of two can lose its sick half).
//!
//! An instance that refuses connections is also skipped for a while, but
//! that is a connection backoff ([`EndpointStats`](super::selector::EndpointStats)
//! keeps it apart): it is certain rather than statistical, ends as soon as
//! a connection succeeds, and is not held to the maximum percentage.
//!
//! ```
//! use lodestar::client::outlier::{FailureCodes, OutlierSettings};
//! use lodestar::client::observe::Outcome;
//! use tonic::Code;
//!
//! let settings = OutlierSettings::default();
//! let codes: FailureCodes = settings.failure_code_set();
//! assert_eq!(codes.classify(&Outcome::Status(Code::Unavailable), false), Some(true));
//! assert_eq!(codes.classify(&Outcome::Status(Code::NotFound), false), Some(false));
//! // The caller's own cancel or deadline is not counted at all.
//! assert_eq!(codes.classify(&Outcome::Status(Code::Cancelled), true), None);
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodestar_core::ServiceKey;
use lodestar_core::sync::MutexExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::Code;

use super::observe::Outcome;
use super::policy::{CODES, code_from_name, code_name};
use super::selector::{Endpoint, nanos_since_epoch};

/// The codes that count as failures by default: what a sick instance
/// answers. `DEADLINE_EXCEEDED` counts only when the server caused it.
pub(crate) const DEFAULT_FAILURE_CODES: [Code; 5] = [
    Code::Unavailable,
    Code::Internal,
    Code::Unknown,
    Code::DataLoss,
    Code::DeadlineExceeded,
];

/// When an instance is taken out of rotation (ejected) for failing, and
/// for how long. The defaults are conservative enough for a fleet of two:
/// a 50% cap (one of two may go), and no minimum number of instances for
/// the consecutive-failure and failure-percentage detectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OutlierSettings {
    /// Whether outlier detection runs. Default: yes.
    pub enabled: bool,
    /// How often the rates are checked and ejections ended, in
    /// milliseconds, from [`MIN_OUTLIER_INTERVAL_MS`](super::policy::MIN_OUTLIER_INTERVAL_MS)
    /// to [`MAX_DURATION_MS`](super::policy::MAX_DURATION_MS).
    /// Default: 10,000.
    pub interval_ms: u64,
    /// Eject after this many failures in a row (0: never). Default: 5.
    pub consecutive_failures: u32,
    /// Eject when at least this percentage of an interval's calls failed
    /// (0: never; at most 100). Default: 85.
    pub failure_percentage: u32,
    /// ... counted only for instances with at least this many calls in the
    /// interval. Default: 50.
    pub failure_percentage_min_calls: u32,
    /// Eject when the success rate is below the mean by more than this
    /// many standard deviations, in thousandths (0: never). Default: 1,900.
    pub success_rate_stdev_factor: u32,
    /// ... counted only with at least this many instances having enough
    /// calls. Default: 5.
    pub success_rate_min_hosts: u32,
    /// ... and only for instances with at least this many calls in the
    /// interval; the others are left out of the mean and deviation too.
    /// Default: 100.
    pub success_rate_min_calls: u32,
    /// The first ejection's length, in milliseconds (at least 1); each
    /// further one is longer by as much again. Default: 30,000.
    pub base_ejection_ms: u64,
    /// The longest ejection, in milliseconds, from `base_ejection_ms` to
    /// [`MAX_DURATION_MS`](super::policy::MAX_DURATION_MS). Default: 300,000.
    pub max_ejection_ms: u64,
    /// The most instances ejected at once, as a percentage (at most 100),
    /// counting the one about to be; at least one may always be ejected,
    /// unless it is the only instance. Default: 50.
    pub max_ejection_percent: u32,
    /// The panic threshold, as a percentage (at most 100): when fewer than
    /// this share of the instances are left in rotation (by outlier
    /// detection, refused connections, or both), calls go to every
    /// instance, ejected or not, rather than pile onto the few left. 0
    /// turns it off, except that with no instance left in rotation calls
    /// still go to every instance rather than fail. Default: 50 (Envoy's).
    pub panic_threshold_percent: u32,
    /// The gRPC codes (as names, e.g. `UNAVAILABLE`; each once) that
    /// count as failures, with transport
    /// errors. Default: `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS`,
    /// and `DEADLINE_EXCEEDED` when the server caused it. A caller's own
    /// cancel or deadline never counts, whatever is listed.
    pub failure_codes: Vec<String>,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 10_000,
            consecutive_failures: 5,
            failure_percentage: 85,
            failure_percentage_min_calls: 50,
            success_rate_stdev_factor: 1_900,
            success_rate_min_hosts: 5,
            success_rate_min_calls: 100,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejection_percent: 50,
            panic_threshold_percent: 50,
            failure_codes: DEFAULT_FAILURE_CODES
                .map(|code| code_name(code).to_owned())
                .to_vec(),
        }
    }
}

impl OutlierSettings {
    /// The set of [`failure_codes`](Self::failure_codes). Names that are
    /// not gRPC codes, and `OK`, are left out: [`Policy::validate`](super::policy::Policy::validate)
    /// refuses them before settings are used.
    pub fn failure_code_set(&self) -> FailureCodes {
        FailureCodes::of(
            self.failure_codes
                .iter()
                .filter_map(|name| code_from_name(name))
                .filter(|&code| code != Code::Ok),
        )
    }

    /// How often [`Detector::sweep`] should run: `interval_ms`.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

/// The gRPC codes that count as failures of an endpoint: a set, checked
/// with one bit test per attempt. The default is the default of
/// [`OutlierSettings::failure_codes`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FailureCodes(u32);

impl Default for FailureCodes {
    fn default() -> Self {
        Self::of(DEFAULT_FAILURE_CODES)
    }
}

fn bit(code: Code) -> u32 {
    1u32.checked_shl(code as u32).unwrap_or(0)
}

impl FailureCodes {
    /// The set of `codes`.
    ///
    /// ```
    /// use lodestar::client::outlier::FailureCodes;
    /// use tonic::Code;
    ///
    /// let codes = FailureCodes::of([Code::ResourceExhausted]);
    /// assert!(codes.contains(Code::ResourceExhausted));
    /// assert!(!codes.contains(Code::Unavailable));
    /// ```
    pub fn of(codes: impl IntoIterator<Item = Code>) -> Self {
        Self(codes.into_iter().fold(0, |bits, code| bits | bit(code)))
    }

    /// Whether `code` is in the set.
    pub fn contains(self, code: Code) -> bool {
        self.0 & bit(code) != 0
    }

    /// How an attempt counts against its endpoint: `Some(true)` a failure
    /// (a transport error, or a code in the set), `Some(false)` a success
    /// (any other answer: the endpoint answered), `None` not at all (the
    /// caller ended it: pass [`Attempt::by_caller`](super::observe::Attempt::by_caller)).
    pub fn classify(self, outcome: &Outcome, by_caller: bool) -> Option<bool> {
        if by_caller {
            return None;
        }
        Some(match outcome {
            Outcome::Transport(_) => true,
            Outcome::Status(code) => self.contains(*code),
        })
    }
}

impl fmt::Debug for FailureCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = CODES
            .iter()
            .filter(|&&code| self.contains(code))
            .map(|&code| code_name(code));
        f.debug_set().entries(names).finish()
    }
}

/// One call counted in [`OutlierStats`]'s interval word (the high half).
const CALL: u64 = 1 << 32;

/// What outlier detection keeps about one endpoint: atomics only, 32 bytes,
/// a field of [`EndpointStats`](super::selector::EndpointStats). Each call
/// costs one atomic add (and one more for a failure).
#[derive(Debug, Default)]
pub struct OutlierStats {
    /// Failures in a row; reset by a success, an ejection and a return.
    consecutive: AtomicU32,
    /// This interval's calls (high 32 bits) and failures (low 32 bits),
    /// taken and zeroed by each sweep. Failures never exceed calls, so the
    /// low half never carries; past 2^32 calls in one interval the count
    /// wraps (harmlessly: the endpoint is then judged on fewer calls).
    interval: AtomicU64,
    /// How many base times the next ejection lasts, minus one: +1 per
    /// ejection, −1 per healthy interval, at most max/base.
    multiplier: AtomicU32,
    /// Ejected until this many nanoseconds after the selector's epoch
    /// (see `nanos_since_epoch`); 0 when not ejected. Ended by a sweep
    /// only, so it reads no clock.
    ejected_until: AtomicU64,
}

impl OutlierStats {
    /// Counts one attempt that [`FailureCodes::classify`] counted
    /// (`failure` or not), and says whether it makes the failures in a row
    /// reach [`OutlierSettings::consecutive_failures`]: the caller should
    /// then ask [`Detector::try_eject`]. Said once per run of failures, and
    /// never while the endpoint is ejected.
    pub fn record(&self, failure: bool, settings: &OutlierSettings) -> bool {
        if !settings.enabled {
            return false;
        }
        self.interval
            .fetch_add(CALL | u64::from(failure), Ordering::Relaxed);
        if !failure {
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let failures = self
            .consecutive
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        settings.consecutive_failures != 0
            && failures == settings.consecutive_failures
            && !self.is_ejected()
    }

    /// Whether outlier detection has taken the endpoint out of rotation.
    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// Failures in a row, up to now.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    /// The ejection multiplier: the next ejection lasts this many base
    /// times, plus one (at most the maximum).
    pub fn multiplier(&self) -> u32 {
        self.multiplier.load(Ordering::Relaxed)
    }

    /// Whether a failure was counted in this interval.
    pub(crate) fn failures_pending(&self) -> bool {
        self.interval.load(Ordering::Relaxed) & u64::from(u32::MAX) != 0
    }

    /// This interval's (calls, failures), zeroing them.
    fn take_interval(&self) -> (u64, u64) {
        let word = self.interval.swap(0, Ordering::Relaxed);
        (word >> 32, word & u64::from(u32::MAX))
    }

    fn end_ejection(&self) {
        self.ejected_until.store(0, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
    }
}

/// Which detector asked for an ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// [`OutlierSettings::consecutive_failures`] failures in a row.
    ConsecutiveFailures,
    /// At least [`OutlierSettings::failure_percentage`] of an interval's
    /// calls failed.
    FailurePercentage,
    /// The success rate was far below the other instances'.
    SuccessRate,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::ConsecutiveFailures => "consecutive failures",
            Reason::FailurePercentage => "failure percentage",
            Reason::SuccessRate => "success rate",
        })
    }
}

/// One endpoint taken out of rotation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Ejection {
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    /// Why.
    pub reason: Reason,
    /// For how long (it returns on the first sweep after).
    pub duration: Duration,
}

/// What a [`Detector::sweep`] changed: when it is empty, the endpoints a
/// call may use are as they were.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Changes {
    /// Endpoints taken out of rotation, worst first.
    pub ejected: Vec<Ejection>,
    /// Endpoints whose ejection is over.
    pub returned: Vec<Arc<Endpoint>>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.ejected.is_empty() && self.returned.is_empty()
    }
}

/// Outlier detection for one service: decides every ejection and every
/// return, one at a time (a lock held only by [`sweep`](Self::sweep) and
/// [`try_eject`](Self::try_eject), never by an ordinary call), so that the
/// maximum ejected percentage holds under concurrent failures.
#[derive(Debug)]
pub struct Detector {
    service: ServiceKey,
    deciding: Mutex<()>,
}

impl Detector {
    /// A detector for `service` (named in its logs).
    pub fn new(service: ServiceKey) -> Self {
        Self {
            service,
            deciding: Mutex::new(()),
        }
    }

    /// Ejects `endpoint` for `reason`, one of the service's `endpoints`
    /// (all of them, ejected or not), unless it is ejected already, is the
    /// only one, or ejecting it would put more than
    /// [`OutlierSettings::max_ejection_percent`] of them out, counting it
    /// (one may always be). Returns the ejection's length if it was made.
    pub fn try_eject(
        &self,
        endpoint: &Endpoint,
        endpoints: &[Arc<Endpoint>],
        settings: &OutlierSettings,
        now: Instant,
        reason: Reason,
    ) -> Option<Duration> {
        let _deciding = self.deciding.lock_unpoisoned();
        self.eject(endpoint, endpoints, settings, now, reason)
    }

    /// [`try_eject`](Self::try_eject), with the lock held.
    fn eject(
        &self,
        endpoint: &Endpoint,
        endpoints: &[Arc<Endpoint>],
        settings: &OutlierSettings,
        now: Instant,
        reason: Reason,
    ) -> Option<Duration> {
        let stats = &endpoint.stats.outlier;
        if !settings.enabled || stats.is_ejected() {
            return None;
        }
        let total = endpoints.len();
        let ejected = endpoints
            .iter()
            .filter(|e| e.stats.outlier.is_ejected())
            .count();
        let percent = u64::from(settings.max_ejection_percent);
        // Counted after the candidate: with 50%, one of three, not two.
        let over_cap = ejected > 0 && (ejected as u64 + 1) * 100 > percent * total as u64;
        if total < 2 || over_cap {
            tracing::debug!(service = %self.service, instance = %endpoint.instance.id,
                %reason, ejected, total, max_percent = settings.max_ejection_percent,
                "not ejecting: too few instances would be left");
            return None;
        }
        let base = Duration::from_millis(settings.base_ejection_ms);
        let max = Duration::from_millis(settings.max_ejection_ms);
        let cap = u32::try_from(
            settings
                .max_ejection_ms
                .div_ceil(settings.base_ejection_ms.max(1)),
        )
        .unwrap_or(u32::MAX)
        .max(1);
        let multiplier = stats.multiplier().saturating_add(1).min(cap);
        stats.multiplier.store(multiplier, Ordering::Relaxed);
        let duration = base.saturating_mul(multiplier).min(max);
        let until = nanos_since_epoch(crate::deadline::later(now, duration)).max(1);
        stats.ejected_until.store(until, Ordering::Relaxed);
        stats.consecutive.store(0, Ordering::Relaxed);
        tracing::info!(service = %self.service, instance = %endpoint.instance.id,
            address = %endpoint.instance.address, %reason, ?duration,
            "instance ejected: out of rotation, its connection kept");
        Some(duration)
    }

    /// The periodic check, every [`OutlierSettings::interval_ms`] (and once
    /// more when the settings change): ends the ejections whose time is
    /// over, judges the interval just ended by failure percentage and
    /// success rate (and retries a consecutive-failure ejection the cap
    /// refused), and starts a new interval. `endpoints` are all of the
    /// service's, ejected or not. With detection disabled, it ends every
    /// ejection.
    pub fn sweep(
        &self,
        endpoints: &[Arc<Endpoint>],
        settings: &OutlierSettings,
        now: Instant,
    ) -> Changes {
        let _deciding = self.deciding.lock_unpoisoned();
        let mut changes = Changes::default();
        let now_nanos = nanos_since_epoch(now);
        // Endpoints in rotation, with this interval's (calls, failures).
        let mut judged = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let stats = &endpoint.stats.outlier;
            let (calls, failures) = stats.take_interval();
            let until = stats.ejected_until.load(Ordering::Relaxed);
            if until != 0 {
                // Its calls came from selection having no one else: not judged.
                if !settings.enabled || now_nanos >= until {
                    stats.end_ejection();
                    tracing::info!(service = %self.service, instance = %endpoint.instance.id,
                        address = %endpoint.instance.address, "instance back in rotation");
                    changes.returned.push(endpoint.clone());
                }
                continue;
            }
            judged.push((endpoint, calls, failures));
        }
        if settings.enabled {
            let mut candidates = candidates(&judged, settings);
            // Worst first, in case the cap stops some.
            candidates.sort_by(|a, b| a.2.total_cmp(&b.2));
            for (endpoint, reason, _) in candidates {
                if let Some(duration) = self.eject(endpoint, endpoints, settings, now, reason) {
                    changes.ejected.push(Ejection {
                        endpoint: endpoint.clone(),
                        reason,
                        duration,
                    });
                }
            }
        }
        // A healthy interval (in rotation, and still): the next ejection is shorter.
        for (endpoint, _, _) in &judged {
            let stats = &endpoint.stats.outlier;
            if !stats.is_ejected() && stats.multiplier() != 0 {
                stats.multiplier.fetch_sub(1, Ordering::Relaxed);
            }
        }
        changes
    }
}

/// The endpoints in rotation that a detector would eject, each once, with
/// why and its success rate over the interval (1 without calls).
fn candidates<'a>(
    judged: &[(&'a Arc<Endpoint>, u64, u64)],
    settings: &OutlierSettings,
) -> Vec<(&'a Arc<Endpoint>, Reason, f64)> {
    let rate = |calls: u64, failures: u64| {
        if calls == 0 {
            1.0
        } else {
            (calls - failures.min(calls)) as f64 / calls as f64
        }
    };
    let mut found: Vec<(&Arc<Endpoint>, Reason, f64)> = Vec::new();
    // Failure percentage: each endpoint with enough calls, on its own.
    let percent = u64::from(settings.failure_percentage);
    let min_calls = u64::from(settings.failure_percentage_min_calls).max(1);
    for &(endpoint, calls, failures) in judged {
        if percent != 0 && calls >= min_calls && failures * 100 >= percent * calls {
            found.push((endpoint, Reason::FailurePercentage, rate(calls, failures)));
        }
    }
    // Success rate: against the others with enough calls (only those make
    // the mean and the deviation), when there are enough of them.
    let min_calls = u64::from(settings.success_rate_min_calls).max(1);
    let eligible: Vec<(&Arc<Endpoint>, f64)> = judged
        .iter()
        .filter(|(_, calls, _)| *calls >= min_calls)
        .map(|&(endpoint, calls, failures)| (endpoint, rate(calls, failures)))
        .collect();
    let min_hosts = usize::try_from(settings.success_rate_min_hosts)
        .unwrap_or(usize::MAX)
        .max(1);
    if settings.success_rate_stdev_factor != 0 && eligible.len() >= min_hosts {
        let n = eligible.len() as f64;
        let mean = eligible.iter().map(|(_, r)| r).sum::<f64>() / n;
        let variance = eligible
            .iter()
            .map(|(_, r)| (r - mean).powi(2))
            .sum::<f64>()
            / n;
        let factor = f64::from(settings.success_rate_stdev_factor) / 1000.0;
        let threshold = mean - variance.sqrt() * factor;
        for &(endpoint, r) in &eligible {
            if r < threshold && !found.iter().any(|(e, _, _)| Arc::ptr_eq(e, endpoint)) {
                found.push((endpoint, Reason::SuccessRate, r));
            }
        }
    }
    // A run of failures the cap kept in rotation: another chance.
    if settings.consecutive_failures != 0 {
        for &(endpoint, calls, failures) in judged {
            let stats = &endpoint.stats.outlier;
            if stats.consecutive_failures() >= settings.consecutive_failures
                && !found.iter().any(|(e, _, _)| Arc::ptr_eq(e, endpoint))
            {
                found.push((endpoint, Reason::ConsecutiveFailures, rate(calls, failures)));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use lodestar_core::Instance;

    use super::*;
    use crate::client::selector::tests::endpoint;

    fn fleet(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| endpoint(Instance::new("svc", format!("127.0.0.1:{}", 1000 + i))))
            .collect()
    }

    fn detector() -> Detector {
        Detector::new(ServiceKey::new("svc"))
    }

    /// `calls` attempts on `endpoint`, of which the first `failures` fail.
    fn calls(endpoint: &Endpoint, calls: u32, failures: u32, settings: &OutlierSettings) {
        for i in 0..calls {
            endpoint.stats.outlier.record(i < failures, settings);
        }
    }

    fn ejected(endpoints: &[Arc<Endpoint>]) -> Vec<usize> {
        (0..endpoints.len())
            .filter(|&i| endpoints[i].stats.outlier.is_ejected())
            .collect()
    }

    /// Only the interval detectors named run.
    fn only(failure_percentage: bool, success_rate: bool) -> OutlierSettings {
        let mut settings = OutlierSettings {
            consecutive_failures: 0,
            ..OutlierSettings::default()
        };
        if !failure_percentage {
            settings.failure_percentage = 0;
        }
        if !success_rate {
            settings.success_rate_stdev_factor = 0;
        }
        settings
    }

    #[test]
    fn five_failures_in_a_row_eject_four_do_not() {
        let settings = OutlierSettings::default();
        let endpoints = fleet(2);
        let stats = &endpoints[0].stats.outlier;
        // Four, a success, four: never five in a row.
        for failure in [true, true, true, true, false, true, true, true] {
            assert!(!stats.record(failure, &settings));
        }
        assert!(!stats.record(true, &settings), "four in a row");
        assert!(stats.record(true, &settings), "five in a row");
        let now = Instant::now();
        let detector = detector();
        let duration = detector.try_eject(
            &endpoints[0],
            &endpoints,
            &settings,
            now,
            Reason::ConsecutiveFailures,
        );
        assert_eq!(duration, Some(Duration::from_secs(30)));
        assert!(stats.is_ejected());
        assert_eq!(stats.consecutive_failures(), 0, "reset on ejection");
        // Failures while ejected (no one else to call) ask for nothing.
        for _ in 0..10 {
            assert!(!stats.record(true, &settings));
        }
        let again = detector.try_eject(
            &endpoints[0],
            &endpoints,
            &settings,
            now,
            Reason::ConsecutiveFailures,
        );
        assert_eq!(again, None, "ejected already");
    }

    #[test]
    fn only_configured_codes_count() {
        let codes = OutlierSettings::default().failure_code_set();
        assert_eq!(codes, FailureCodes::default());
        let status = |code| Outcome::Status(code);
        let transport = Outcome::Transport("connection reset".to_owned());
        for failure in [
            Code::Unavailable,
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
            Code::DeadlineExceeded, // the server's, not the caller's
        ] {
            assert_eq!(
                codes.classify(&status(failure), false),
                Some(true),
                "{failure:?}"
            );
        }
        assert_eq!(codes.classify(&transport, false), Some(true));
        for answer in [
            Code::Ok,
            Code::NotFound,
            Code::InvalidArgument,
            Code::ResourceExhausted,
        ] {
            assert_eq!(
                codes.classify(&status(answer), false),
                Some(false),
                "{answer:?}"
            );
        }
        // The caller's cancel and deadline: not counted, whatever the set.
        let all = FailureCodes::of(CODES);
        for by_caller in [Code::Cancelled, Code::DeadlineExceeded] {
            assert_eq!(codes.classify(&status(by_caller), true), None);
            assert_eq!(all.classify(&status(by_caller), true), None);
        }
        // A set of one's own.
        let own = OutlierSettings {
            failure_codes: vec!["RESOURCE_EXHAUSTED".into(), "BOGUS".into()],
            ..OutlierSettings::default()
        }
        .failure_code_set();
        assert_eq!(
            own.classify(&status(Code::ResourceExhausted), false),
            Some(true)
        );
        assert_eq!(own.classify(&status(Code::Unavailable), false), Some(false));
        assert_eq!(own.classify(&transport, false), Some(true));
        assert_eq!(format!("{own:?}"), r#"{"RESOURCE_EXHAUSTED"}"#);
    }

    #[test]
    fn failure_percentage_ejects_the_bad_one_of_four() {
        let settings = only(true, false);
        let endpoints = fleet(4);
        for (i, endpoint) in endpoints.iter().enumerate() {
            calls(endpoint, 100, if i == 2 { 90 } else { 5 }, &settings);
        }
        let changes = detector().sweep(&endpoints, &settings, Instant::now());
        assert_eq!(ejected(&endpoints), [2]);
        assert_eq!(changes.ejected.len(), 1);
        assert_eq!(changes.ejected[0].reason, Reason::FailurePercentage);
        assert!(Arc::ptr_eq(&changes.ejected[0].endpoint, &endpoints[2]));
        // Too few calls to judge: even all failing.
        let endpoints = fleet(4);
        calls(&endpoints[0], 49, 49, &settings);
        assert!(
            detector()
                .sweep(&endpoints, &settings, Instant::now())
                .is_empty()
        );
    }

    #[test]
    fn success_rate_needs_five_hosts_and_ignores_quiet_ones() {
        let settings = only(false, true);
        // Four with enough calls: no verdict.
        let endpoints = fleet(4);
        for (i, endpoint) in endpoints.iter().enumerate() {
            calls(endpoint, 100, if i == 0 { 50 } else { 0 }, &settings);
        }
        assert!(
            detector()
                .sweep(&endpoints, &settings, Instant::now())
                .is_empty()
        );
        // Five with enough calls, and one with too few (all failing), left
        // out of the mean and deviation: with it, the mean would drop so
        // far that the 50% one would stay and the quiet one would go.
        let endpoints = fleet(6);
        for (i, endpoint) in endpoints.iter().enumerate() {
            match i {
                0 => calls(endpoint, 100, 50, &settings),
                5 => calls(endpoint, 99, 99, &settings),
                _ => calls(endpoint, 100, 0, &settings),
            }
        }
        let changes = detector().sweep(&endpoints, &settings, Instant::now());
        assert_eq!(ejected(&endpoints), [0]);
        assert_eq!(changes.ejected[0].reason, Reason::SuccessRate);
    }

    #[test]
    fn at_most_half_are_ejected_counting_the_candidate() {
        let settings = OutlierSettings::default();
        let now = Instant::now();
        // Three of three failing at 50%: one, not two.
        let endpoints = fleet(3);
        for endpoint in &endpoints {
            calls(endpoint, 100, 100, &settings);
        }
        let changes = detector().sweep(&endpoints, &settings, now);
        assert_eq!(changes.ejected.len(), 1);
        assert_eq!(ejected(&endpoints).len(), 1);
        // The same through the consecutive-failure path.
        let endpoints = fleet(3);
        let detector = detector();
        let made: Vec<_> = endpoints
            .iter()
            .map(|e| detector.try_eject(e, &endpoints, &settings, now, Reason::ConsecutiveFailures))
            .collect();
        assert_eq!(made.iter().flatten().count(), 1, "{made:?}");
        // One may always go, even past the percentage: a fleet of two at 10%.
        let mut tight = settings.clone();
        tight.max_ejection_percent = 10;
        let endpoints = fleet(2);
        let reason = Reason::ConsecutiveFailures;
        assert!(
            detector
                .try_eject(&endpoints[0], &endpoints, &tight, now, reason)
                .is_some()
        );
        assert!(
            detector
                .try_eject(&endpoints[1], &endpoints, &tight, now, reason)
                .is_none()
        );
        // But never the only one.
        let endpoints = fleet(1);
        assert!(
            detector
                .try_eject(&endpoints[0], &endpoints, &settings, now, reason)
                .is_none()
        );
    }

    #[test]
    fn ejections_grow_with_repeats_and_shrink_with_healthy_intervals() {
        let settings = OutlierSettings::default();
        let endpoints = fleet(2);
        let detector = detector();
        let reason = Reason::ConsecutiveFailures;
        let stats = &endpoints[0].stats.outlier;
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let eject = |now| detector.try_eject(&endpoints[0], &endpoints, &settings, now, reason);
        assert_eq!(eject(at(0)), Some(Duration::from_secs(30)));
        assert_eq!(
            detector.sweep(&endpoints, &settings, at(30)).returned.len(),
            1
        );
        // Again, before any healthy interval: twice as long.
        assert_eq!(eject(at(31)), Some(Duration::from_secs(60)));
        assert!(detector.sweep(&endpoints, &settings, at(90)).is_empty());
        assert_eq!(
            detector.sweep(&endpoints, &settings, at(91)).returned.len(),
            1
        );
        assert_eq!(
            stats.multiplier(),
            2,
            "not shrunk on the sweep that ends it"
        );
        detector.sweep(&endpoints, &settings, at(101));
        assert_eq!(stats.multiplier(), 1);
        assert_eq!(eject(at(102)), Some(Duration::from_secs(60)));
        detector.sweep(&endpoints, &settings, at(162));
        for secs in [172, 182] {
            detector.sweep(&endpoints, &settings, at(secs));
        }
        assert_eq!(stats.multiplier(), 0);
        detector.sweep(&endpoints, &settings, at(192));
        assert_eq!(stats.multiplier(), 0, "not below zero");
        assert_eq!(eject(at(193)), Some(Duration::from_secs(30)));
        // Repeated ejections stop at the maximum, and so does the multiplier.
        let mut now = 193;
        for _ in 0..20 {
            now += 300;
            detector.sweep(&endpoints, &settings, at(now));
            eject(at(now));
        }
        assert_eq!(stats.multiplier(), 10);
        now += 300;
        detector.sweep(&endpoints, &settings, at(now));
        assert_eq!(eject(at(now)), Some(Duration::from_secs(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_returns_an_instance_without_any_call_and_starts_it_afresh() {
        let settings = OutlierSettings::default();
        let endpoints = fleet(2);
        let detector = detector();
        let stats = &endpoints[0].stats.outlier;
        for _ in 0..5 {
            calls(&endpoints[0], 1, 1, &settings);
        }
        let eject = Reason::ConsecutiveFailures;
        detector.try_eject(&endpoints[0], &endpoints, &settings, Instant::now(), eject);
        // Calls while ejected (selection had no one else): not judged, not kept.
        calls(&endpoints[0], 100, 100, &settings);
        let mut interval = tokio::time::interval(settings.interval());
        interval.tick().await; // at once
        for _ in 0..2 {
            interval.tick().await; // 10 s, 20 s: still out
            assert!(
                detector
                    .sweep(&endpoints, &settings, Instant::now())
                    .is_empty()
            );
            assert!(stats.is_ejected());
        }
        interval.tick().await; // 30 s: back, with no call made
        let changes = detector.sweep(&endpoints, &settings, Instant::now());
        assert!(changes.ejected.is_empty());
        assert!(Arc::ptr_eq(&changes.returned[0], &endpoints[0]));
        assert!(!stats.is_ejected());
        assert_eq!(stats.consecutive_failures(), 0);
        // Four more failures do not eject it: its count started again.
        for _ in 0..4 {
            assert!(!stats.record(true, &settings));
        }
        assert!(
            detector
                .sweep(&endpoints, &settings, Instant::now())
                .is_empty()
        );
        // The interval counts are zeroed by each sweep: 40 failing calls in
        // each of two intervals never make the 50 needed.
        calls(&endpoints[1], 40, 40, &only(true, false));
        assert!(
            detector
                .sweep(&endpoints, &only(true, false), Instant::now())
                .is_empty()
        );
        calls(&endpoints[1], 40, 40, &only(true, false));
        assert!(
            detector
                .sweep(&endpoints, &only(true, false), Instant::now())
                .is_empty()
        );
    }

    #[test]
    fn a_run_the_cap_kept_in_rotation_is_ejected_on_a_later_sweep() {
        let settings = OutlierSettings::default();
        let endpoints = fleet(2);
        let detector = detector();
        let now = Instant::now();
        let reason = Reason::ConsecutiveFailures;
        detector.try_eject(&endpoints[1], &endpoints, &settings, now, reason);
        calls(&endpoints[0], 6, 6, &settings);
        assert!(
            detector
                .try_eject(&endpoints[0], &endpoints, &settings, now, reason)
                .is_none()
        );
        let later = now + Duration::from_secs(30);
        let changes = detector.sweep(&endpoints, &settings, later);
        assert!(Arc::ptr_eq(&changes.returned[0], &endpoints[1]));
        assert_eq!(changes.ejected[0].reason, Reason::ConsecutiveFailures);
        assert_eq!(ejected(&endpoints), [0]);
    }

    #[test]
    fn disabled_counts_nothing_and_ends_every_ejection() {
        let mut settings = OutlierSettings::default();
        let endpoints = fleet(2);
        let detector = detector();
        let now = Instant::now();
        let reason = Reason::ConsecutiveFailures;
        detector.try_eject(&endpoints[0], &endpoints, &settings, now, reason);
        settings.enabled = false;
        for _ in 0..10 {
            assert!(!endpoints[1].stats.outlier.record(true, &settings));
        }
        let changes = detector.sweep(&endpoints, &settings, now);
        assert_eq!(changes.returned.len(), 1);
        assert!(ejected(&endpoints).is_empty());
        assert!(
            detector
                .try_eject(&endpoints[0], &endpoints, &settings, now, reason)
                .is_none()
        );
    }
}

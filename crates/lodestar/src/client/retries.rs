//! Configured retries and hedging of a service's methods, as gRPC's A6
//! proposal defines them: set per method in the [`Policy`]
//! ([`MethodPolicy::retry`](super::policy::MethodPolicy::retry),
//! [`MethodPolicy::hedge`](super::policy::MethodPolicy::hedge)), one or the
//! other, never both.
//!
//! **Retries** ([`RetrySettings`]) send a call again when an attempt ends
//! with one of the configured codes (`UNAVAILABLE` by default), after a
//! jittered exponential backoff: the n-th retry waits a random time between
//! 0 and `min(initial × multiplier^(n−1), max)`. A server may say how long
//! to wait instead, in the `grpc-retry-pushback-ms` metadata of its answer
//! (the backoff then starts over), or that it wants no retry (a negative or
//! malformed value). Each retry carries `grpc-previous-rpc-attempts`, and
//! goes to an instance the call has not tried when there is one.
//!
//! **Hedging** ([`HedgeSettings`]) sends one more attempt, to another
//! instance, when the call has had no answer after a delay (fixed, or a
//! percentile of the method's recent latencies), up to a number of hedges;
//! the first answer wins and the other attempts are cancelled (their
//! servers see the stream reset with `CANCEL`). An attempt that ends with
//! one of the hedge's codes sends the next hedge at once.
//!
//! What is safe to send again:
//!
//! * only methods marked idempotent in their `.proto`
//!   ([`MethodInfo`](super::MethodInfo)), or those the policy vouches for
//!   (`idempotent = true`): a method with side effects is never retried
//!   or hedged once its request may have reached a server;
//! * only calls whose request is whole when the call starts, and at most
//!   the client's send limit (plus each message's 5-byte prefix): unary and
//!   server-streaming calls, and client streams whose every message is
//!   ready at once. A request stream still being written is not kept, so
//!   its call is not retried (only sent elsewhere if it never left);
//! * a call is committed once response headers arrive (a response that is
//!   more than a status): a streaming call is never retried after that, so
//!   never after a message reached the caller. A status-only answer
//!   (gRPC's trailers-only response) is what a retry looks at.
//!
//! Retries and hedges are bounded: by their own counts (at most
//! [`MAX_ATTEMPTS`] attempts in all), by the call's deadline (no attempt
//! starts, nor backoff ends, after it), and by the service's
//! [retry budget](super::budget).
//!
//! ```
//! use lodestar::client::Policy;
//!
//! let policy = Policy::from_toml(r#"
//!     [[methods]]
//!     names = ["GetFeature"]
//!     retry = { max_attempts = 4, codes = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"] }
//!
//!     [[methods]]
//!     names = ["ListFeatures"]
//!     hedge = { delay_ms = 20, max_hedges = 2 }
//! "#)?;
//! let retry = policy.method("GetFeature").and_then(|m| m.retry.as_ref()).unwrap();
//! assert_eq!((retry.initial_backoff_ms, retry.max_backoff_ms), (25, 250)); // defaults
//!
//! // One or the other:
//! let error = Policy::from_toml(r#"
//!     [[methods]]
//!     names = ["GetFeature"]
//!     retry = {}
//!     hedge = {}
//! "#).unwrap_err();
//! assert!(error.to_string().starts_with("policy field `methods[0].hedge`"));
//! # Ok::<(), lodestar::client::PolicyError>(())
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderMap;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::Code;

use arc_swap::ArcSwapOption;

use super::budget::RetryBudget;
use super::outlier::FailureCodes;
use super::policy::{
    MAX_DURATION_MS, MethodPolicy, Policy, PolicyError, code_from_name, code_name,
};
use super::selector::nanos_since_epoch;
use super::stack::guard::PerMethod;
use crate::policy_data::{in_range, invalid, validate_codes};

/// The most attempts a configured retry or hedging policy may make, the
/// first included: 5 (gRPC's A6 cap).
pub const MAX_ATTEMPTS: u32 = 5;

/// The largest backoff multiplier: 10.
pub const MAX_BACKOFF_MULTIPLIER: f64 = 10.0;

/// The longest wait a server's `grpc-retry-pushback-ms` is honoured for
/// when the call has no deadline: 60 s; a longer one ends the retries.
pub const MAX_PUSHBACK: Duration = Duration::from_secs(60);

/// The metadata a server answers with to delay the next retry, or stop it.
pub const PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// The metadata each retry and hedge carries: how many attempts went
/// before it.
pub const PREVIOUS_ATTEMPTS_HEADER: &str = "grpc-previous-rpc-attempts";

/// How a method's calls are retried (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetrySettings {
    /// The most attempts of a call, the first included: 2 to
    /// [`MAX_ATTEMPTS`]. Default: 3.
    pub max_attempts: u32,
    /// The longest wait before the first retry, in milliseconds (at least
    /// 1). Default: 25.
    pub initial_backoff_ms: u64,
    /// The longest wait before any retry, in milliseconds, from
    /// `initial_backoff_ms` to [`MAX_DURATION_MS`]. Default: 250.
    pub max_backoff_ms: u64,
    /// How much longer each retry may wait than the one before: 1 to
    /// [`MAX_BACKOFF_MULTIPLIER`]. Default: 2.
    pub backoff_multiplier: f64,
    /// The codes (names, e.g. `UNAVAILABLE`; each once, not `OK`) an
    /// attempt may end with to be retried; a transport failure after the
    /// request went out counts as `UNAVAILABLE`. At least one. Default:
    /// `UNAVAILABLE`.
    pub codes: Vec<String>,
    /// Retry even if the `.proto` does not mark the method idempotent: the
    /// policy vouches that running it twice is harmless. Default: no.
    pub idempotent: bool,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff_ms: 25,
            max_backoff_ms: 250,
            backoff_multiplier: 2.0,
            codes: vec![code_name(Code::Unavailable).to_owned()],
            idempotent: false,
        }
    }
}

/// How a method's calls are hedged (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct HedgeSettings {
    /// The most extra attempts of a call: 1 to [`MAX_ATTEMPTS`] − 1.
    /// Default: 1.
    pub max_hedges: u32,
    /// A fixed delay before each hedge, in milliseconds (0: all at once).
    /// Default: none (the `percentile`).
    pub delay_ms: Option<u64>,
    /// Hedge after this percentile (1 to 99) of the method's latencies
    /// over the last 10 to 20 seconds; until it has
    /// [`MIN_LATENCY_SAMPLES`], after `min_delay_ms`. Not with
    /// `delay_ms`. Default: 95 when `delay_ms` is not set.
    pub percentile: Option<u32>,
    /// The shortest delay the percentile may give, in milliseconds (at
    /// most [`MAX_DURATION_MS`]). Default: 10.
    pub min_delay_ms: u64,
    /// The codes (names; each once, not `OK`) an attempt may end with and
    /// leave the call to the other attempts (the next hedge goes at once);
    /// any other ends the call. Default: `UNAVAILABLE`.
    pub codes: Vec<String>,
    /// Hedge even if the `.proto` does not mark the method idempotent.
    /// Default: no.
    pub idempotent: bool,
}

impl Default for HedgeSettings {
    fn default() -> Self {
        Self {
            max_hedges: 1,
            delay_ms: None,
            percentile: None,
            min_delay_ms: 10,
            codes: vec![code_name(Code::Unavailable).to_owned()],
            idempotent: false,
        }
    }
}

/// The percentile a hedge waits for when [`HedgeSettings`] names neither
/// a delay nor a percentile: 95.
pub const DEFAULT_HEDGE_PERCENTILE: u32 = 95;

/// How many latencies a method needs before its percentile is used: 20.
pub const MIN_LATENCY_SAMPLES: u32 = 20;

/// Checks the retry and hedge settings of the method entry at `at`
/// (`methods[0]`).
pub(crate) fn validate(at: &str, entry: &MethodPolicy) -> Result<(), PolicyError> {
    if let Some(retry) = &entry.retry {
        let field = |name: &str| format!("{at}.retry.{name}");
        in_range(
            &field("max_attempts"),
            retry.max_attempts.into(),
            2,
            MAX_ATTEMPTS.into(),
        )?;
        in_range(
            &field("initial_backoff_ms"),
            retry.initial_backoff_ms,
            1,
            MAX_DURATION_MS,
        )?;
        in_range(
            &field("max_backoff_ms"),
            retry.max_backoff_ms,
            retry.initial_backoff_ms,
            MAX_DURATION_MS,
        )?;
        let multiplier = retry.backoff_multiplier;
        if !(1.0..=MAX_BACKOFF_MULTIPLIER).contains(&multiplier) {
            return Err(invalid(
                field("backoff_multiplier"),
                multiplier,
                format!("1 to {MAX_BACKOFF_MULTIPLIER}"),
            ));
        }
        validate_code_list(&field("codes"), &retry.codes)?;
    }
    if let Some(hedge) = &entry.hedge {
        let field = |name: &str| format!("{at}.hedge.{name}");
        if entry.retry.is_some() {
            return Err(invalid(
                format!("{at}.hedge"),
                "set with `retry`",
                "one of `retry` and `hedge` per method (gRPC A6)",
            ));
        }
        in_range(
            &field("max_hedges"),
            hedge.max_hedges.into(),
            1,
            u64::from(MAX_ATTEMPTS - 1),
        )?;
        if let Some(delay) = hedge.delay_ms {
            in_range(&field("delay_ms"), delay, 0, MAX_DURATION_MS)?;
            if hedge.percentile.is_some() {
                return Err(invalid(
                    field("percentile"),
                    "set with `delay_ms`",
                    "one of `delay_ms` and `percentile`",
                ));
            }
        }
        if let Some(percentile) = hedge.percentile {
            in_range(&field("percentile"), percentile.into(), 1, 99)?;
        }
        in_range(
            &field("min_delay_ms"),
            hedge.min_delay_ms,
            0,
            MAX_DURATION_MS,
        )?;
        validate_code_list(&field("codes"), &hedge.codes)?;
    }
    Ok(())
}

fn validate_code_list(at: &str, codes: &[String]) -> Result<(), PolicyError> {
    if codes.is_empty() {
        return Err(invalid(
            at,
            "[]",
            "at least one gRPC code, such as `UNAVAILABLE`",
        ));
    }
    validate_codes(at, codes)
}

fn code_set(names: &[String]) -> FailureCodes {
    FailureCodes::of(names.iter().filter_map(|name| code_from_name(name)))
}

/// What the stack follows for the configured methods of one service: built
/// from its policy when the policy is set, never per call.
#[derive(Debug, Default)]
pub(crate) struct Plans {
    /// Each retried or hedged method's plan (and, hedged, its latencies):
    /// under `"*"`, one per method too.
    methods: PerMethod<MethodPlan>,
    /// The service's retry budget, if it has one.
    budget: ArcSwapOption<RetryBudget>,
}

/// How one method's calls are retried or hedged.
#[derive(Debug)]
pub(crate) struct MethodPlan {
    /// Whether the policy vouches for the method being idempotent.
    pub(crate) idempotent: bool,
    pub(crate) kind: PlanKind,
}

/// Retried or hedged.
#[derive(Debug)]
pub(crate) enum PlanKind {
    Retry(RetryPlan),
    Hedge(HedgePlan),
}

/// [`RetrySettings`], ready to use.
#[derive(Debug)]
pub(crate) struct RetryPlan {
    pub(crate) max_attempts: u32,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    pub(crate) codes: FailureCodes,
}

/// [`HedgeSettings`], ready to use, and the method's latencies.
#[derive(Debug)]
pub(crate) struct HedgePlan {
    pub(crate) max_hedges: u32,
    delay: Option<Duration>,
    percentile: u32,
    min_delay: Duration,
    pub(crate) codes: FailureCodes,
    latencies: Latencies,
}

impl Plans {
    /// Follows `policy`: a plan for each method it retries or hedges, and
    /// the budget, kept (with its counts) if its settings are the same.
    pub(crate) fn follow(&self, policy: &Policy) {
        self.methods.set(
            policy,
            |entry| (entry.retry.is_some() || entry.hedge.is_some()).then_some(entry),
            |entry, _| Arc::new(MethodPlan::of(entry)),
        );
        let settings = &policy.retry_budget;
        let old = self.budget.load_full();
        self.budget.store(settings.enabled.then(|| {
            old.filter(|budget| budget.settings() == settings)
                .unwrap_or_else(|| Arc::new(RetryBudget::new(settings.clone())))
        }));
    }

    /// Whether any method is retried or hedged (one relaxed load).
    pub(crate) fn any_configured(&self) -> bool {
        self.methods.is_on()
    }

    /// The plan of the method `path` calls (`/package.Service/Method`), if
    /// it is retried or hedged, with the service's retry budget.
    pub(crate) fn method(&self, path: &str) -> Option<(Arc<MethodPlan>, Option<Arc<RetryBudget>>)> {
        let plan = self.methods.get(path)?;
        Some((plan, self.budget.load_full()))
    }
}

impl MethodPlan {
    /// Its retries, if it is retried (rather than hedged).
    pub(crate) fn retry(&self) -> Option<&RetryPlan> {
        match &self.kind {
            PlanKind::Retry(retry) => Some(retry),
            PlanKind::Hedge(_) => None,
        }
    }

    /// The plan of a method `entry` retries or hedges (retry if both: the
    /// policy refuses both on one entry).
    fn of(entry: &MethodPolicy) -> Self {
        let kind = match (&entry.retry, &entry.hedge) {
            (Some(r), _) => PlanKind::Retry(RetryPlan {
                max_attempts: r.max_attempts.clamp(1, MAX_ATTEMPTS),
                initial: Duration::from_millis(r.initial_backoff_ms),
                max: Duration::from_millis(r.max_backoff_ms),
                multiplier: r.backoff_multiplier,
                codes: code_set(&r.codes),
            }),
            (None, hedge) => {
                let h = hedge.clone().unwrap_or_default();
                PlanKind::Hedge(HedgePlan {
                    max_hedges: h.max_hedges.clamp(1, MAX_ATTEMPTS - 1),
                    delay: h.delay_ms.map(Duration::from_millis),
                    percentile: h.percentile.unwrap_or(DEFAULT_HEDGE_PERCENTILE),
                    min_delay: Duration::from_millis(h.min_delay_ms),
                    codes: code_set(&h.codes),
                    latencies: Latencies::default(),
                })
            }
        };
        let idempotent = entry.retry.as_ref().is_some_and(|r| r.idempotent)
            || entry.hedge.as_ref().is_some_and(|h| h.idempotent);
        Self { idempotent, kind }
    }
}

impl RetryPlan {
    /// How long to wait before retry `n` (1 for the first): a random time
    /// up to `min(initial × multiplier^(n−1), max)` (full jitter).
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        let exponent = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let ceiling = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let ceiling = ceiling.min(self.max.as_secs_f64());
        Duration::from_secs_f64(ceiling * fastrand::f64())
    }
}

impl HedgePlan {
    /// Records a call's latency (to its winning answer), if the delay is
    /// a percentile of them.
    pub(crate) fn record(&self, latency: Duration) {
        if self.delay.is_none() {
            self.latencies.record(latency);
        }
    }

    /// How long after an attempt the next hedge goes.
    pub(crate) fn delay(&self) -> Duration {
        if let Some(delay) = self.delay {
            return delay;
        }
        self.latencies
            .percentile(self.percentile)
            .map_or(self.min_delay, |p| p.max(self.min_delay))
    }
}

/// What a server's answer says about retrying it (`grpc-retry-pushback-ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushback {
    /// Nothing: the backoff decides.
    None,
    /// Wait this long, then retry.
    Wait(Duration),
    /// Do not retry (a negative or malformed value).
    Stop,
}

impl Pushback {
    /// Reads the pushback in `headers` (a status-only answer's).
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let Some(value) = headers.get(PUSHBACK_HEADER) else {
            return Pushback::None;
        };
        // At most 19 digits: anything longer is not a number of ms to wait.
        match value
            .to_str()
            .ok()
            .filter(|v| v.len() <= 19)
            .and_then(|v| v.parse::<i64>().ok())
        {
            Some(ms) if ms >= 0 => Pushback::Wait(Duration::from_millis(ms.unsigned_abs())),
            _ => Pushback::Stop,
        }
    }
}

/// How often the latency record starts a new generation (the percentile
/// reads the last two): 10 s.
const LATENCY_PERIOD: Duration = Duration::from_secs(10);

/// Buckets below this many microseconds are one microsecond wide.
const LINEAR: u64 = 16;
/// Each power of two above is split in this many buckets (12.5% wide).
const SUB_BUCKETS: u64 = 8;
/// Enough buckets for latencies up to 2^30 µs (about 18 minutes).
const BUCKETS: usize = (LINEAR + (30 - 4) * SUB_BUCKETS) as usize;

/// A method's recent latencies, for the percentile a hedge waits for: a
/// histogram of atomic counters in buckets 12.5% wide, in two generations
/// of [`LATENCY_PERIOD`] each (the older is cleared when the newer fills a
/// period), so that the percentile reads 10 to 20 s of calls.
#[derive(Debug)]
pub(crate) struct Latencies {
    generations: [Box<[AtomicU32]>; 2],
    /// Which generation is recorded into.
    current: AtomicUsize,
    /// When it began (see [`nanos_since_epoch`]).
    began: AtomicU64,
}

impl Default for Latencies {
    fn default() -> Self {
        let generation = || (0..BUCKETS).map(|_| AtomicU32::new(0)).collect();
        Self {
            generations: [generation(), generation()],
            current: AtomicUsize::new(0),
            began: AtomicU64::new(nanos_since_epoch(Instant::now())),
        }
    }
}

fn bucket_of(latency: Duration) -> usize {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    let index = if micros < LINEAR {
        micros
    } else {
        let log = u64::from(63 - micros.leading_zeros()); // at least 4
        let sub = (micros >> (log - 3)) & (SUB_BUCKETS - 1);
        LINEAR + (log - 4) * SUB_BUCKETS + sub
    };
    usize::try_from(index)
        .unwrap_or(usize::MAX)
        .min(BUCKETS - 1)
}

/// The largest latency in bucket `index`.
fn bucket_top(index: usize) -> Duration {
    let index = index as u64;
    let micros = if index < LINEAR {
        index + 1
    } else {
        let log = (index - LINEAR) / SUB_BUCKETS + 4;
        let sub = (index - LINEAR) % SUB_BUCKETS;
        (SUB_BUCKETS + sub + 1) << (log - 3)
    };
    Duration::from_micros(micros)
}

impl Latencies {
    /// Records one call's latency.
    pub(crate) fn record(&self, latency: Duration) {
        let now = nanos_since_epoch(Instant::now());
        let began = self.began.load(Ordering::Acquire);
        let period = u64::try_from(LATENCY_PERIOD.as_nanos()).unwrap_or(u64::MAX);
        if now.saturating_sub(began) >= period
            && self
                .began
                .compare_exchange(began, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // A new generation: the older one is cleared and recorded into.
            let older = 1 - self.current.load(Ordering::Acquire) % 2;
            for count in self.generations[older].iter() {
                count.store(0, Ordering::Relaxed);
            }
            self.current.store(older, Ordering::Release);
        }
        let current = self.current.load(Ordering::Acquire) % 2;
        self.generations[current][bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `percentile` (1 to 99) of the latencies recorded, as the top of
    /// its bucket; `None` with fewer than [`MIN_LATENCY_SAMPLES`].
    pub(crate) fn percentile(&self, percentile: u32) -> Option<Duration> {
        let count = |i: usize| -> u64 {
            self.generations
                .iter()
                .map(|g| u64::from(g[i].load(Ordering::Relaxed)))
                .sum()
        };
        let total: u64 = (0..BUCKETS).map(count).sum();
        if total < u64::from(MIN_LATENCY_SAMPLES) {
            return None;
        }
        // The rank of the percentile, rounded up.
        let rank = (total * u64::from(percentile)).div_ceil(100).max(1);
        let mut seen = 0;
        for i in 0..BUCKETS {
            seen += count(i);
            if seen >= rank {
                return Some(bucket_top(i));
            }
        }
        Some(bucket_top(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_below_a_growing_ceiling() {
        let plan = RetryPlan {
            max_attempts: 5,
            initial: Duration::from_millis(10),
            max: Duration::from_millis(35),
            multiplier: 2.0,
            codes: FailureCodes::default(),
        };
        for (n, ceiling) in [(1, 10), (2, 20), (3, 35), (4, 35)] {
            let waits: Vec<Duration> = (0..200).map(|_| plan.backoff(n)).collect();
            let max = waits.iter().max().copied().unwrap_or_default();
            let min = waits.iter().min().copied().unwrap_or_default();
            assert!(max <= Duration::from_millis(ceiling), "retry {n}: {max:?}");
            // Spread over the range, not a fixed wait.
            assert!(
                max > Duration::from_millis(ceiling) * 3 / 4,
                "retry {n}: {max:?}"
            );
            assert!(
                min < Duration::from_millis(ceiling) / 4,
                "retry {n}: {min:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn plans_follow_the_first_entry_naming_a_method_and_hedges_wait_for_the_percentile() {
        let policy = Policy::from_toml(
            r#"
            [[methods]]
            names = ["Get"]
            hedge = { percentile = 90, min_delay_ms = 5 }
            [[methods]]
            names = ["Put"]
            [[methods]]
            names = ["*"]
            retry = { max_attempts = 4 }
            "#,
        )
        .unwrap();
        let plans = Plans::default();
        assert!(!plans.any_configured());
        plans.follow(&policy);
        assert!(plans.any_configured());
        let plan = |path| plans.method(path).map(|(plan, _)| plan);
        // `Put` is named by an entry that configures nothing: no plan,
        // even though `*` retries.
        assert!(plan("/pkg.S/Put").is_none());
        let other = plan("/pkg.S/Other");
        assert!(
            matches!(other.as_deref().map(|p| &p.kind), Some(PlanKind::Retry(r)) if r.max_attempts == 4)
        );
        // Each method under `*` has its own plan (and latencies).
        assert!(!Arc::ptr_eq(&other.unwrap(), &plan("/pkg.S/Else").unwrap()));
        let get = plan("/pkg.S/Get").unwrap();
        let PlanKind::Hedge(hedge) = &get.kind else {
            panic!("Get is hedged");
        };
        // Until 20 latencies are known: the floor.
        assert_eq!(hedge.delay(), Duration::from_millis(5));
        for i in 0..100u64 {
            hedge.record(Duration::from_millis(if i % 10 == 0 { 100 } else { 20 }));
        }
        let delay = hedge.delay();
        assert!(
            delay >= Duration::from_millis(20) && delay < Duration::from_millis(23),
            "{delay:?}"
        );
        // The budget is kept across a new policy with the same settings.
        let budget = plans.method("/pkg.S/Get").and_then(|(_, b)| b).unwrap();
        plans.follow(&policy);
        let again = plans.method("/pkg.S/Get").and_then(|(_, b)| b).unwrap();
        assert!(Arc::ptr_eq(&budget, &again));
        plans.follow(&Policy::default());
        assert!(!plans.any_configured());
    }

    #[test]
    fn pushback_waits_or_stops() {
        let of = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(PUSHBACK_HEADER, value.parse().unwrap());
            Pushback::of(&headers)
        };
        assert_eq!(Pushback::of(&HeaderMap::new()), Pushback::None);
        assert_eq!(of("200"), Pushback::Wait(Duration::from_millis(200)));
        assert_eq!(of("0"), Pushback::Wait(Duration::ZERO));
        assert_eq!(of("-1"), Pushback::Stop);
        assert_eq!(of("soon"), Pushback::Stop);
        assert_eq!(of("99999999999999999999999"), Pushback::Stop);
    }

    #[test]
    fn buckets_are_narrow_and_ordered() {
        for micros in [0u64, 1, 15, 16, 17, 100, 1_000, 123_456, 10_000_000] {
            let latency = Duration::from_micros(micros);
            let bucket = bucket_of(latency);
            assert!(bucket_top(bucket) >= latency, "{micros}");
            assert!(
                bucket_top(bucket).as_micros() as f64
                    <= (micros as f64 * 1.125).max(micros as f64 + 1.0),
                "{micros}: {:?}",
                bucket_top(bucket)
            );
            if bucket > 0 {
                assert!(bucket_top(bucket - 1) <= latency, "{micros}");
            }
        }
        assert_eq!(bucket_of(Duration::from_secs(100_000)), BUCKETS - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_percentile_follows_recent_latencies() {
        let latencies = Latencies::default();
        for _ in 0..MIN_LATENCY_SAMPLES - 1 {
            latencies.record(Duration::from_millis(1));
        }
        assert_eq!(latencies.percentile(95), None, "too few samples");
        // 95 calls of 1 ms and 5 of 500 ms: p95 is 1 ms, p99 500 ms.
        let latencies = Latencies::default();
        for i in 0..100 {
            let ms = if i % 20 == 0 { 500 } else { 1 };
            latencies.record(Duration::from_millis(ms));
        }
        let p95 = latencies.percentile(95).unwrap();
        let p99 = latencies.percentile(99).unwrap();
        assert!(
            p95 >= Duration::from_millis(1) && p95 < Duration::from_micros(1_130),
            "{p95:?}"
        );
        assert!(
            p99 >= Duration::from_millis(500) && p99 < Duration::from_millis(563),
            "{p99:?}"
        );
        // Two periods later, only what was recorded since counts.
        tokio::time::advance(LATENCY_PERIOD).await;
        for _ in 0..100 {
            latencies.record(Duration::from_millis(10));
        }
        tokio::time::advance(LATENCY_PERIOD).await;
        for _ in 0..100 {
            latencies.record(Duration::from_millis(10));
        }
        let p99 = latencies.percentile(99).unwrap();
        assert!(p99 < Duration::from_millis(12), "{p99:?}");
    }
}

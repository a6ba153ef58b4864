//! The client policy of a service, as data: how its instances are chosen
//! ([`Strategy`]), which of them a call may use ([`Route`], [`Split`],
//! [`ZoneAffinity`]) and when one is taken out of rotation
//! ([`OutlierSettings`]); and how calls are kept from a sick service: a
//! [`BulkheadSettings`] per service, a circuit breaker
//! ([`BreakerSettings`]) and fault injection ([`FaultSettings`]) per method
//! ([`MethodPolicy`]).
//!
//! A [`Policy`] is a plain value: set in code, read from TOML or JSON
//! ([`Policy::from_toml`], [`Policy::from_json`], [`Policy::from_file`]),
//! and replaced on a running client without reconnecting. Every way of
//! reading one also [validates](Policy::validate) it: a bad policy is
//! refused with a [`PolicyError`] naming the field (as a path, e.g.
//! `split.subsets[1].weight`), its value and what was expected.
//!
//! How a call is routed, in order:
//! 1. the first [`Route`] whose `when` matches the call (its metadata, and
//!    the caller's own labels) decides: the instances with its `to` labels,
//!    or, when none has them, its [`Fallback`];
//! 2. otherwise the [`Split`], if any: a subset chosen by weight, per call
//!    or sticky by a key;
//! 3. otherwise every instance.
//!
//! Within whichever set that is, [`ZoneAffinity`] keeps the call in the
//! caller's zone while enough instances there can take it, and the
//! [`Strategy`] picks one.
//!
//! ```
//! use lodestar::client::policy::{Fallback, Policy, Strategy};
//!
//! let policy = Policy::from_toml(r#"
//!     [strategy]
//!     kind = "least_request"
//!     choices = 2
//!
//!     ## Calls carrying `x-tenant: beta` go to the beta instances, or fail.
//!     [[routes]]
//!     when.metadata = { x-tenant = "beta" }
//!     to = { track = "beta" }
//!     fallback = "fail"
//!
//!     ## Every other call: 10% to version 2, sticky per user.
//!     [split]
//!     sticky_header = "x-user"
//!     subsets = [
//!         { labels = { version = "2" }, weight = 10 },
//!         { labels = { version = "1" }, weight = 90 },
//!     ]
//!
//!     [zone]
//!     min_local = 3
//!
//!     [outlier]
//!     consecutive_failures = 3
//! "#)?;
//! assert_eq!(policy.strategy, Strategy::LeastRequest { choices: 2 });
//! assert_eq!(policy.routes[0].fallback, Fallback::Fail);
//! assert_eq!(policy.split.as_ref().map(|s| s.subsets.len()), Some(2));
//! assert_eq!(policy.zone.min_local, 3);
//! assert!(policy.outlier.enabled); // unset fields keep their defaults
//!
//! // Refused, naming the field and the value:
//! let error = Policy::from_toml("[zone]\nmin_local = 0").unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "policy field `zone.min_local` is 0: expected at least 1",
//! );
//! # Ok::<(), lodestar::client::policy::PolicyError>(())
//! ```
//!
//! Every default, written out (an empty document gives the same policy):
//!
//! ```
//! # use lodestar::client::policy::Policy;
//! let defaults = Policy::from_toml(r#"
//!     routes = []               # no routes
//!     methods = []              # no settings of particular methods
//!                               ## no bulkhead
//!                               ## no split
//!     [strategy]                # P2C peak-EWMA
//!     kind = "peak_ewma"
//!     default_rtt_ms = 30
//!     decay_ms = 10_000
//!     probe_after_ms = 1_000
//!
//!     [zone]
//!     enabled = true            # when the caller's zone is known
//!     min_local = 2
//!
//!     [outlier]
//!     enabled = true
//!     interval_ms = 10_000
//!     consecutive_failures = 5
//!     failure_percentage = 85
//!     failure_percentage_min_calls = 50
//!     success_rate_stdev_factor = 1_900
//!     success_rate_min_hosts = 5
//!     success_rate_min_calls = 100
//!     base_ejection_ms = 30_000
//!     max_ejection_ms = 300_000
//!     max_ejection_percent = 50
//!     panic_threshold_percent = 50
//!     failure_codes = ["UNAVAILABLE", "INTERNAL", "UNKNOWN", "DATA_LOSS", "DEADLINE_EXCEEDED"]
//!
//!     [retry_budget]            # for configured retries and hedges
//!     enabled = true
//!     percent = 20
//!     min_per_second = 10
//!     window_ms = 10_000
//! "#)?;
//! assert_eq!(defaults, Policy::default());
//! assert_eq!(Policy::from_toml("")?, Policy::default());
//! # Ok::<(), lodestar::client::policy::PolicyError>(())
//! ```

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};
use lodestar_core::registry::limits::quoted;
use serde::{Deserialize, Serialize};

pub use super::breaker::{BreakerKind, BreakerSettings};
pub use super::budget::BudgetSettings;
pub use super::bulkhead::BulkheadSettings;
pub use super::outlier::OutlierSettings;
pub use super::retries::{HedgeSettings, RetrySettings};
pub use crate::fault::FaultSettings;
pub(crate) use crate::policy_data::CODES;
use crate::policy_data::{self, MethodNames, at_most, in_range, invalid, validate_codes};
pub use crate::policy_data::{MAX_POLICY_FILE, PolicyError, code_from_name, code_name};

/// The whole client policy of one service.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Policy {
    /// How an instance is chosen among those a call may use.
    pub strategy: Strategy,
    /// Routes, tried in order: the first whose `when` matches the call
    /// decides which instances it may use. None match: the split, if any,
    /// else every instance. Default: none. At most [`MAX_ROUTES`].
    pub routes: Vec<Route>,
    /// A weighted split between subsets (canaries), for calls no route
    /// matched. Default: none.
    pub split: Option<Split>,
    /// Prefer instances in the caller's own zone.
    pub zone: ZoneAffinity,
    /// When an instance is taken out of rotation for failing.
    pub outlier: OutlierSettings,
    /// Settings of particular methods (gRPC's `methodConfig`): the first
    /// entry naming a method applies to it, else the first entry named
    /// `"*"`, else none. Default: none. At most [`MAX_METHOD_POLICIES`].
    pub methods: Vec<MethodPolicy>,
    /// The most calls to the service in flight at once
    /// ([`bulkhead`](super::bulkhead)). Default: none (no maximum).
    pub bulkhead: Option<BulkheadSettings>,
    /// How many retries and hedges the calls to the service may add
    /// ([`budget`](super::budget)). Default: 20% of the calls plus 10 per
    /// second, over 10 s.
    pub retry_budget: BudgetSettings,
}

/// Settings of some methods of the service (see [`Policy::methods`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MethodPolicy {
    /// The methods, by their name in the `.proto` (`SayHello`), or `"*"`
    /// for every method no other entry names. At least one; at most
    /// [`MAX_METHOD_NAMES`], each at most [`MAX_METHOD_NAME`] bytes.
    pub names: Vec<String>,
    /// The circuit breaker of these methods ([`breaker`](super::breaker)).
    /// Default: none.
    pub breaker: Option<BreakerSettings>,
    /// Faults injected into their calls ([`fault`](crate::fault)).
    /// Default: none.
    pub fault: Option<FaultSettings>,
    /// Retry their calls ([`retries`](super::retries)); not with `hedge`.
    /// Default: none.
    pub retry: Option<RetrySettings>,
    /// Hedge their calls ([`retries`](super::retries)); not with `retry`.
    /// Default: none.
    pub hedge: Option<HedgeSettings>,
}

/// How an instance is chosen, as data (see [`selector`](super::selector)
/// for the selectors each names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", try_from = "StrategyFields")]
#[non_exhaustive]
pub enum Strategy {
    /// Each instance in turn.
    RoundRobin,
    /// An instance chosen uniformly at random.
    Random,
    /// Each instance in proportion to its weight, smoothly interleaved
    /// (earliest deadline first).
    WeightedRoundRobin,
    /// The less loaded of `choices` random instances, by calls in flight.
    LeastRequest {
        /// How many instances to sample. Default: 2.
        #[serde(default = "default_choices")]
        choices: u32,
    },
    /// The cheaper of two random instances, where cost is a latency
    /// estimate that jumps to a slower sample and decays toward faster
    /// ones, times (calls in flight + 1).
    PeakEwma {
        /// The latency assumed for an instance without a sample, in
        /// milliseconds. Default: 30.
        #[serde(default = "default_rtt_ms")]
        default_rtt_ms: u64,
        /// How fast the estimate decays toward faster samples, in
        /// milliseconds. Default: 10,000.
        #[serde(default = "default_decay_ms")]
        decay_ms: u64,
        /// An instance not chosen for this long is chosen next time it is
        /// sampled, in milliseconds. Default: 1,000.
        #[serde(default = "default_probe_after_ms")]
        probe_after_ms: u64,
    },
    /// Consistent hashing on a key from the call's metadata.
    Hash {
        /// The metadata (header) whose value is the key.
        header: String,
        /// Cap each instance at this percentage of the average load
        /// (bounded load; e.g. 125), if set.
        #[serde(default)]
        bounded_load_percent: Option<u32>,
    },
}

impl Default for Strategy {
    /// P2C peak-EWMA, with its defaults.
    fn default() -> Self {
        Strategy::PeakEwma {
            default_rtt_ms: default_rtt_ms(),
            decay_ms: default_decay_ms(),
            probe_after_ms: default_probe_after_ms(),
        }
    }
}

/// A [`Strategy`] as read: every field of every kind, so that an error in
/// one is named by its path (`strategy.choices`) rather than only
/// `strategy`, as serde's tagged enums would.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrategyFields {
    kind: StrategyKind,
    choices: Option<u32>,
    default_rtt_ms: Option<u64>,
    decay_ms: Option<u64>,
    probe_after_ms: Option<u64>,
    header: Option<String>,
    bounded_load_percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum StrategyKind {
    RoundRobin,
    Random,
    WeightedRoundRobin,
    LeastRequest,
    PeakEwma,
    Hash,
}

impl TryFrom<StrategyFields> for Strategy {
    type Error = String;

    fn try_from(f: StrategyFields) -> Result<Self, String> {
        let (strategy, kind, allowed): (_, _, &[&str]) = match f.kind {
            StrategyKind::RoundRobin => (Strategy::RoundRobin, "round_robin", &[]),
            StrategyKind::Random => (Strategy::Random, "random", &[]),
            StrategyKind::WeightedRoundRobin => {
                (Strategy::WeightedRoundRobin, "weighted_round_robin", &[])
            }
            StrategyKind::LeastRequest => (
                Strategy::LeastRequest {
                    choices: f.choices.unwrap_or_else(default_choices),
                },
                "least_request",
                &["choices"],
            ),
            StrategyKind::PeakEwma => (
                Strategy::PeakEwma {
                    default_rtt_ms: f.default_rtt_ms.unwrap_or_else(default_rtt_ms),
                    decay_ms: f.decay_ms.unwrap_or_else(default_decay_ms),
                    probe_after_ms: f.probe_after_ms.unwrap_or_else(default_probe_after_ms),
                },
                "peak_ewma",
                &["default_rtt_ms", "decay_ms", "probe_after_ms"],
            ),
            StrategyKind::Hash => (
                Strategy::Hash {
                    header: f
                        .header
                        .clone()
                        .ok_or("kind `hash` needs `header`, the metadata whose value is the key")?,
                    bounded_load_percent: f.bounded_load_percent,
                },
                "hash",
                &["header", "bounded_load_percent"],
            ),
        };
        let given = [
            ("choices", f.choices.is_some()),
            ("default_rtt_ms", f.default_rtt_ms.is_some()),
            ("decay_ms", f.decay_ms.is_some()),
            ("probe_after_ms", f.probe_after_ms.is_some()),
            ("header", f.header.is_some()),
            ("bounded_load_percent", f.bounded_load_percent.is_some()),
        ];
        match given
            .iter()
            .find(|(name, set)| *set && !allowed.contains(name))
        {
            Some((name, _)) => Err(format!("`{name}` does not apply to kind `{kind}`")),
            None => Ok(strategy),
        }
    }
}

fn default_choices() -> u32 {
    2
}

fn default_rtt_ms() -> u64 {
    30
}

fn default_decay_ms() -> u64 {
    10_000
}

fn default_probe_after_ms() -> u64 {
    1_000
}

/// Which instances a call may use, for calls that match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Route {
    /// What a call must carry for this route to apply.
    pub when: Match,
    /// The labels (instance metadata) an instance must have.
    pub to: BTreeMap<String, String>,
    /// What happens when no instance has them.
    pub fallback: Fallback,
    /// Whether a retry may go to an instance outside the route. Default:
    /// no.
    pub retry_anywhere: bool,
}

/// What a call must carry for a [`Route`] to apply; empty matches every call.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Match {
    /// Metadata (headers) of the call, each with this value.
    pub metadata: BTreeMap<String, String>,
    /// Labels of the caller (`ClientBuilder::labels`), each with this value.
    pub caller: BTreeMap<String, String>,
}

/// What a route does when no instance has its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Fallback {
    /// Fail the call with `UNAVAILABLE`, naming the labels.
    #[default]
    Fail,
    /// Use every instance.
    All,
    /// Use the instances without the labels.
    Rest,
}

/// A weighted split of calls between subsets of instances.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Split {
    /// The subsets, each with its share: 1 to [`MAX_SUBSETS`], of weights
    /// not all 0. A subset with no instance takes no calls: its share goes
    /// to the others in proportion; when no subset has an instance, calls
    /// use every instance.
    pub subsets: Vec<Subset>,
    /// Decide by hashing this metadata (header) of the call rather than at
    /// random: one key, one subset (as long as the subsets and their
    /// weights stay the same; raising the first subset's weight only moves
    /// keys into it). A call without the header is split at random.
    /// Default: none (every call at random).
    pub sticky_header: Option<String>,
}

/// One subset of a [`Split`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Subset {
    /// The labels an instance must have.
    pub labels: BTreeMap<String, String>,
    /// Its share, relative to the other subsets' weights.
    pub weight: u32,
}

/// Preferring instances in the caller's zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ZoneAffinity {
    /// Whether to prefer them. Default: yes, when the caller's zone is
    /// known.
    pub enabled: bool,
    /// Stay in the zone only while it has at least this many usable
    /// instances. Default: 2.
    pub min_local: u32,
}

impl Default for ZoneAffinity {
    fn default() -> Self {
        Self {
            enabled: true,
            min_local: 2,
        }
    }
}

/// The fewest instances [`Strategy::LeastRequest`] samples: 2.
pub const MIN_CHOICES: u32 = 2;

/// The most instances [`Strategy::LeastRequest`] samples: 16 (beyond a
/// few, sampling more only adds herding onto the least loaded).
pub const MAX_CHOICES: u32 = 16;

/// The longest duration a policy may set (latency estimates, decay, probe
/// interval, outlier interval and ejections): one hour, in milliseconds.
pub const MAX_DURATION_MS: u64 = 60 * 60 * 1000;

/// The shortest outlier detection interval: 100 ms (each check reads every
/// endpoint's counters).
pub const MIN_OUTLIER_INTERVAL_MS: u64 = 100;

/// The largest [`Strategy::Hash`] `bounded_load_percent`: 1,000 (ten times
/// the average; above it the bound never binds).
pub const MAX_BOUNDED_LOAD_PERCENT: u32 = 1_000;

/// The largest outlier `success_rate_stdev_factor`: 10,000 thousandths
/// (ten standard deviations).
pub const MAX_STDEV_FACTOR: u32 = 10_000;

/// The most routes in a policy: 64 (each call tries them in order).
pub const MAX_ROUTES: usize = 64;

/// The most subsets in a [`Split`]: 16.
pub const MAX_SUBSETS: usize = 16;

/// The most labels (or metadata conditions) in one map of a route or
/// subset: 16.
pub const MAX_LABELS: usize = 16;

/// The most entries [`Policy::methods`] may have: 256.
pub const MAX_METHOD_POLICIES: usize = 256;

/// The most names one [`MethodPolicy`] may list: 1,024.
pub const MAX_METHOD_NAMES: usize = 1_024;

/// The most methods the `"*"` entry of [`Policy::methods`] gives state of
/// their own (a circuit breaker, a fault injector's count): 1,024, each on
/// its first call. The methods called past that share one.
pub const MAX_OTHER_METHODS: usize = 1_024;

/// The longest method name a [`MethodPolicy`] may list: 256 bytes.
pub const MAX_METHOD_NAME: usize = 256;

/// The longest label key or metadata (header) name: 128 bytes, as the
/// registry allows for instance labels.
pub const MAX_LABEL_KEY: usize = 128;

/// The longest label or metadata value: 4,096 bytes, as the registry
/// allows for instance labels.
pub const MAX_LABEL_VALUE: usize = 4_096;

impl Policy {
    crate::policy_data::readers!();

    /// Checks every field: numbers in range, names and labels well formed
    /// and within the size limits (the `MAX_*` constants of this module),
    /// failure codes known. The first field found wrong is named in the
    /// error, with its value and what was expected.
    pub fn validate(&self) -> Result<(), PolicyError> {
        validate_strategy(&self.strategy)?;
        at_most("routes", self.routes.len(), MAX_ROUTES, "routes")?;
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            validate_headers(&format!("{at}.when.metadata"), &route.when.metadata)?;
            validate_labels(&format!("{at}.when.caller"), &route.when.caller)?;
            validate_labels(&format!("{at}.to"), &route.to)?;
        }
        if let Some(split) = &self.split {
            validate_split(split)?;
        }
        if self.zone.min_local < 1 {
            return Err(invalid("zone.min_local", 0, "at least 1"));
        }
        validate_outlier(&self.outlier)?;
        if let Some(bulkhead) = &self.bulkhead {
            bulkhead.validate("bulkhead")?;
        }
        validate_methods(&self.methods)?;
        super::budget::validate("retry_budget", &self.retry_budget)
    }

    /// The settings of the method named `method` (its name in the
    /// `.proto`, without the service): the first entry of
    /// [`methods`](Self::methods) that names it, else the first named
    /// `"*"`.
    ///
    /// ```
    /// # use lodestar::client::policy::Policy;
    /// let policy = Policy::from_toml(r#"
    ///     [[methods]]
    ///     names = ["Get", "List"]
    ///     [[methods]]
    ///     names = ["*"]
    /// "#)?;
    /// assert_eq!(policy.method("List").map(|m| m.names.len()), Some(2));
    /// assert_eq!(policy.method("Put").map(|m| m.names[0].as_str()), Some("*"));
    /// # Ok::<(), lodestar::client::policy::PolicyError>(())
    /// ```
    pub fn method(&self, method: &str) -> Option<&MethodPolicy> {
        self.methods
            .iter()
            .find(|m| m.names.iter().any(|n| n == method))
            .or_else(|| {
                self.methods
                    .iter()
                    .find(|m| m.names.iter().any(|n| n == "*"))
            })
    }
}

fn validate_methods(methods: &[MethodPolicy]) -> Result<(), PolicyError> {
    policy_data::validate_method_names(
        methods.iter().map(|m| m.names.as_slice()),
        &MethodNames {
            max_entries: MAX_METHOD_POLICIES,
            max_names: MAX_METHOD_NAMES,
            well_formed: |name| {
                name == "*"
                    || (!name.is_empty()
                        && name.len() <= MAX_METHOD_NAME
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            },
            expected: &format!(
                "a method's name as in the .proto (letters, digits, `_`; at most \
                 {MAX_METHOD_NAME} bytes), or \"*\""
            ),
            empty: "at least one method name, or \"*\"",
        },
    )?;
    for (i, entry) in methods.iter().enumerate() {
        if let Some(breaker) = &entry.breaker {
            breaker.validate(&format!("methods[{i}].breaker"))?;
        }
        if let Some(fault) = &entry.fault {
            fault.validate(&format!("methods[{i}].fault"))?;
        }
        super::retries::validate(&format!("methods[{i}]"), entry)?;
    }
    Ok(())
}

fn validate_strategy(strategy: &Strategy) -> Result<(), PolicyError> {
    match strategy {
        Strategy::RoundRobin | Strategy::Random | Strategy::WeightedRoundRobin => Ok(()),
        Strategy::LeastRequest { choices } => in_range(
            "strategy.choices",
            u64::from(*choices),
            MIN_CHOICES.into(),
            MAX_CHOICES.into(),
        ),
        Strategy::PeakEwma {
            default_rtt_ms,
            decay_ms,
            probe_after_ms,
        } => {
            in_range(
                "strategy.default_rtt_ms",
                *default_rtt_ms,
                1,
                MAX_DURATION_MS,
            )?;
            in_range("strategy.decay_ms", *decay_ms, 1, MAX_DURATION_MS)?;
            in_range(
                "strategy.probe_after_ms",
                *probe_after_ms,
                1,
                MAX_DURATION_MS,
            )
        }
        Strategy::Hash {
            header,
            bounded_load_percent,
        } => {
            validate_header_name("strategy.header", header)?;
            match bounded_load_percent {
                Some(p) => in_range(
                    "strategy.bounded_load_percent",
                    u64::from(*p),
                    101,
                    MAX_BOUNDED_LOAD_PERCENT.into(),
                ),
                None => Ok(()),
            }
        }
    }
}

fn validate_split(split: &Split) -> Result<(), PolicyError> {
    if split.subsets.is_empty() {
        return Err(invalid("split.subsets", "empty", "at least one subset"));
    }
    at_most("split.subsets", split.subsets.len(), MAX_SUBSETS, "subsets")?;
    let mut total: u32 = 0;
    for (i, subset) in split.subsets.iter().enumerate() {
        validate_labels(&format!("split.subsets[{i}].labels"), &subset.labels)?;
        total = total.checked_add(subset.weight).ok_or_else(|| {
            invalid(
                format!("split.subsets[{i}].weight"),
                subset.weight,
                format!("weights whose sum is at most {}", u32::MAX),
            )
        })?;
    }
    if total == 0 {
        return Err(invalid(
            "split.subsets",
            "all of weight 0",
            "at least one subset with a weight above 0",
        ));
    }
    if let Some(header) = &split.sticky_header {
        validate_header_name("split.sticky_header", header)?;
    }
    Ok(())
}

fn validate_outlier(o: &OutlierSettings) -> Result<(), PolicyError> {
    in_range(
        "outlier.interval_ms",
        o.interval_ms,
        MIN_OUTLIER_INTERVAL_MS,
        MAX_DURATION_MS,
    )?;
    in_range(
        "outlier.failure_percentage",
        o.failure_percentage.into(),
        0,
        100,
    )?;
    in_range(
        "outlier.success_rate_stdev_factor",
        o.success_rate_stdev_factor.into(),
        0,
        MAX_STDEV_FACTOR.into(),
    )?;
    in_range(
        "outlier.max_ejection_percent",
        o.max_ejection_percent.into(),
        0,
        100,
    )?;
    in_range(
        "outlier.panic_threshold_percent",
        o.panic_threshold_percent.into(),
        0,
        100,
    )?;
    in_range(
        "outlier.max_ejection_ms",
        o.max_ejection_ms,
        1,
        MAX_DURATION_MS,
    )?;
    in_range(
        "outlier.base_ejection_ms",
        o.base_ejection_ms,
        1,
        MAX_DURATION_MS,
    )?;
    if o.base_ejection_ms > o.max_ejection_ms {
        return Err(invalid(
            "outlier.base_ejection_ms",
            o.base_ejection_ms,
            format!("at most `outlier.max_ejection_ms` ({})", o.max_ejection_ms),
        ));
    }
    validate_codes("outlier.failure_codes", &o.failure_codes)
}

/// Label keys and values: non-empty and within [`MAX_LABEL_KEY`],
/// [`MAX_LABEL_VALUE`] and [`MAX_LABELS`].
fn validate_labels(at: &str, labels: &BTreeMap<String, String>) -> Result<(), PolicyError> {
    at_most(at, labels.len(), MAX_LABELS, "labels")?;
    for (key, value) in labels {
        if key.is_empty() || key.len() > MAX_LABEL_KEY {
            return Err(invalid(
                at,
                quoted(key),
                format!("label keys of 1 to {MAX_LABEL_KEY} bytes"),
            ));
        }
        if value.is_empty() || value.len() > MAX_LABEL_VALUE {
            return Err(invalid(
                format!("{at}.{key}"),
                quoted(value),
                format!("a value of 1 to {MAX_LABEL_VALUE} bytes"),
            ));
        }
    }
    Ok(())
}

/// Metadata conditions: labels whose keys are header names and whose
/// values are header values.
fn validate_headers(at: &str, headers: &BTreeMap<String, String>) -> Result<(), PolicyError> {
    validate_labels(at, headers)?;
    for (name, value) in headers {
        validate_header_name(at, name)?;
        if HeaderValue::from_str(value).is_err() {
            return Err(invalid(
                format!("{at}.{name}"),
                quoted(value),
                "a metadata value (visible ASCII and spaces)",
            ));
        }
    }
    Ok(())
}

fn validate_header_name(field: &str, name: &str) -> Result<(), PolicyError> {
    if name.len() > MAX_LABEL_KEY || HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(invalid(
            field,
            quoted(name),
            format!("a metadata (header) name of 1 to {MAX_LABEL_KEY} bytes of `a-z 0-9 - _ .`"),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Labels from pairs (for route tests too).
    pub(crate) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// 10% of calls to version 2, 90% to version 1 (for route tests too).
    pub(crate) fn canary(sticky_header: Option<&str>) -> Split {
        Split {
            subsets: vec![
                Subset {
                    labels: labels(&[("version", "2")]),
                    weight: 10,
                },
                Subset {
                    labels: labels(&[("version", "1")]),
                    weight: 90,
                },
            ],
            sticky_header: sticky_header.map(String::from),
        }
    }

    /// A policy with every part set, and valid.
    fn full() -> Policy {
        Policy {
            strategy: Strategy::Hash {
                header: "x-user".into(),
                bounded_load_percent: Some(125),
            },
            routes: vec![Route {
                when: Match {
                    metadata: labels(&[("x-tenant", "beta")]),
                    caller: labels(&[("team", "shop")]),
                },
                to: labels(&[("track", "beta")]),
                fallback: Fallback::Rest,
                retry_anywhere: true,
            }],
            split: Some(canary(Some("x-user"))),
            zone: ZoneAffinity {
                enabled: false,
                min_local: 3,
            },
            outlier: OutlierSettings {
                failure_codes: vec!["UNAVAILABLE".into(), "RESOURCE_EXHAUSTED".into()],
                ..OutlierSettings::default()
            },
            methods: vec![
                MethodPolicy {
                    names: vec!["Get".into(), "List".into()],
                    breaker: Some(BreakerSettings {
                        slow_call_ms: Some(500),
                        ..BreakerSettings::default()
                    }),
                    fault: Some(FaultSettings {
                        abort_percent: 2.5,
                        ..FaultSettings::default()
                    }),
                    retry: Some(RetrySettings {
                        codes: vec!["UNAVAILABLE".into(), "RESOURCE_EXHAUSTED".into()],
                        ..RetrySettings::default()
                    }),
                    hedge: None,
                },
                MethodPolicy {
                    names: vec!["*".into()],
                    breaker: Some(BreakerSettings {
                        kind: BreakerKind::Sre,
                        ..BreakerSettings::default()
                    }),
                    fault: None,
                    retry: None,
                    hedge: Some(HedgeSettings {
                        delay_ms: Some(20),
                        ..HedgeSettings::default()
                    }),
                },
            ],
            bulkhead: Some(BulkheadSettings::new(64)),
            retry_budget: BudgetSettings {
                percent: 30,
                ..BudgetSettings::default()
            },
        }
    }

    #[test]
    fn an_unknown_strategy_is_refused_naming_the_field_and_value() {
        let error = Policy::from_toml("[strategy]\nkind = \"fastest\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("`strategy.kind`"), "{error}");
        assert!(error.contains("`fastest`"), "{error}");
        assert!(error.contains("line 2"), "{error}");
        let error = Policy::from_json(r#"{"strategy": {"kind": "fastest"}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`strategy.kind`") && error.contains("`fastest`"),
            "{error}"
        );
    }

    #[test]
    fn a_negative_weight_is_refused_naming_the_field_and_value() {
        let toml = "[split]\n[[split.subsets]]\nlabels = { v = \"1\" }\nweight = 1\n\
                    [[split.subsets]]\nlabels = { v = \"2\" }\nweight = -1\n";
        let error = Policy::from_toml(toml).unwrap_err().to_string();
        assert!(error.contains("`split.subsets[1].weight`"), "{error}");
        assert!(error.contains("`-1`"), "{error}");
        let error = Policy::from_json(r#"{"split": {"subsets": [{"weight": -1}]}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`split.subsets[0].weight`") && error.contains("-1"),
            "{error}"
        );
    }

    #[test]
    fn strategy_fields_are_named_and_checked_against_their_kind() {
        let error = Policy::from_toml("[strategy]\nkind = \"least_request\"\nchoices = -3")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`strategy.choices`") && error.contains("-3"),
            "{error}"
        );
        let error = Policy::from_toml("[strategy]\nkind = \"round_robin\"\nchoices = 3")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`choices` does not apply to kind `round_robin`"),
            "{error}"
        );
        let error = Policy::from_toml("[strategy]\nkind = \"hash\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("needs `header`"), "{error}");
        let policy = Policy::from_toml("[strategy]\nkind = \"least_request\"").unwrap();
        assert_eq!(policy.strategy, Strategy::LeastRequest { choices: 2 });
    }

    #[test]
    fn method_names_are_checked_and_listed_once() {
        let error = |toml: &str| Policy::from_toml(toml).unwrap_err().to_string();
        assert_eq!(
            error("[[methods]]\nnames = []"),
            "policy field `methods[0].names` is []: expected at least one method name, or \"*\""
        );
        assert!(
            error("[[methods]]\nnames = [\"Get\", \"/pkg.S/Put\"]")
                .starts_with("policy field `methods[0].names[1]` is `/pkg.S/Put`"),
        );
        assert_eq!(
            error("[[methods]]\nnames = [\"Get\"]\n[[methods]]\nnames = [\"*\", \"Get\"]"),
            "policy field `methods[1].names[1]` is `Get`: expected a name no earlier entry lists"
        );
        let policy = Policy::from_toml("[[methods]]\nnames = [\"Get\"]").unwrap();
        assert!(policy.method("Get").is_some());
        assert!(policy.method("Put").is_none(), "no \"*\" entry");
    }

    #[test]
    fn validation_names_each_bad_field_its_value_and_the_bound() {
        type Change = fn(&mut Policy);
        let cases: &[(Change, &str)] = &[
            (
                |p| p.strategy = Strategy::LeastRequest { choices: 1 },
                "policy field `strategy.choices` is 1: expected 2 to 16",
            ),
            (
                |p| {
                    p.strategy = Strategy::PeakEwma {
                        default_rtt_ms: 30,
                        decay_ms: 0,
                        probe_after_ms: 1,
                    }
                },
                "policy field `strategy.decay_ms` is 0: expected 1 to 3600000",
            ),
            (
                |p| {
                    p.strategy = Strategy::Hash {
                        header: "x user".into(),
                        bounded_load_percent: None,
                    }
                },
                "policy field `strategy.header` is `x user`: expected a metadata (header) name",
            ),
            (
                |p| {
                    p.strategy = Strategy::Hash {
                        header: "x-user".into(),
                        bounded_load_percent: Some(100),
                    }
                },
                "policy field `strategy.bounded_load_percent` is 100: expected 101 to 1000",
            ),
            (
                |p| {
                    p.routes[0]
                        .to
                        .insert(String::new(), "x".into())
                        .map_or((), drop)
                },
                "policy field `routes[0].to` is ``: expected label keys of 1 to 128 bytes",
            ),
            (
                |p| {
                    p.routes[0]
                        .to
                        .insert("k".into(), "x".repeat(5000))
                        .map_or((), drop)
                },
                "policy field `routes[0].to.k` is `xxxx",
            ),
            (
                |p| {
                    p.routes[0]
                        .when
                        .metadata
                        .insert("x-a".into(), "a\nb".into())
                        .map_or((), drop)
                },
                "policy field `routes[0].when.metadata.x-a` is `a\\nb`: expected a metadata value",
            ),
            (
                |p| p.routes = vec![Route::default(); MAX_ROUTES + 1],
                "policy field `routes` is 65 routes: expected at most 64",
            ),
            (
                |p| p.split = Some(Split::default()),
                "policy field `split.subsets` is empty: expected at least one subset",
            ),
            (
                |p| {
                    if let Some(s) = &mut p.split {
                        s.subsets.iter_mut().for_each(|s| s.weight = 0);
                    }
                },
                "policy field `split.subsets` is all of weight 0",
            ),
            (
                |p| {
                    if let Some(s) = &mut p.split {
                        s.subsets[1].weight = u32::MAX;
                    }
                },
                "policy field `split.subsets[1].weight` is 4294967295: expected weights whose sum",
            ),
            (
                |p| p.zone.min_local = 0,
                "policy field `zone.min_local` is 0: expected at least 1",
            ),
            (
                |p| p.outlier.interval_ms = 99,
                "policy field `outlier.interval_ms` is 99: expected 100 to 3600000",
            ),
            (
                |p| p.outlier.failure_percentage = 101,
                "policy field `outlier.failure_percentage` is 101: expected at most 100",
            ),
            (
                |p| p.outlier.max_ejection_percent = 101,
                "policy field `outlier.max_ejection_percent` is 101: expected at most 100",
            ),
            (
                |p| p.outlier.base_ejection_ms = 400_000,
                "policy field `outlier.base_ejection_ms` is 400000: expected at most \
                 `outlier.max_ejection_ms` (300000)",
            ),
            (
                |p| p.outlier.failure_codes.push("unavailable".into()),
                "policy field `outlier.failure_codes[2]` is `unavailable`: expected a gRPC code",
            ),
            (
                |p| p.outlier.failure_codes.push("UNAVAILABLE".into()),
                "policy field `outlier.failure_codes[2]` is `UNAVAILABLE`: expected each code once",
            ),
            (
                |p| p.bulkhead = Some(BulkheadSettings::new(0)),
                "policy field `bulkhead.max_calls` is 0: expected 1 to 1000000",
            ),
            (
                |p| {
                    if let Some(b) = &mut p.methods[1].breaker {
                        b.window_ms = 0;
                    }
                },
                "policy field `methods[1].breaker.window_ms` is 0: expected 100 to 3600000",
            ),
            (
                |p| {
                    if let Some(b) = &mut p.methods[0].breaker {
                        b.failure_codes.push("NOPE".into());
                    }
                },
                "policy field `methods[0].breaker.failure_codes[5]` is `NOPE`",
            ),
            (
                |p| {
                    if let Some(f) = &mut p.methods[0].fault {
                        f.delay_percent = 101.0;
                    }
                },
                "policy field `methods[0].fault.delay_percent` is 101: expected a percentage",
            ),
            (
                |p| p.outlier.failure_codes.push("OK".into()),
                "policy field `outlier.failure_codes[2]` is `OK`: expected a code other than `OK`",
            ),
        ];
        assert_eq!(full().validate(), Ok(()));
        for (change, expected) in cases {
            let mut policy = full();
            change(&mut policy);
            let error = policy.validate().unwrap_err().to_string();
            assert!(error.starts_with(expected), "{error}\nexpected: {expected}");
        }
    }

    #[test]
    fn a_policy_survives_json_and_toml() {
        let policy = full();
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(Policy::from_json(&json).unwrap(), policy);
        let toml = toml::to_string(&policy).unwrap();
        assert_eq!(Policy::from_toml(&toml).unwrap(), policy);
        assert_eq!(Policy::from_json("{}").unwrap(), Policy::default());
        assert_eq!(Policy::default().validate(), Ok(()));
    }

    #[test]
    fn policy_files_are_read_by_extension_and_bounded() {
        let dir = std::env::temp_dir().join(format!(
            "lodestar-policy-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let toml = dir.join("policy.toml");
        std::fs::write(&toml, toml::to_string(&full()).unwrap()).unwrap();
        assert_eq!(Policy::from_file(&toml).unwrap(), full());
        let json = dir.join("policy.json");
        std::fs::write(&json, r#"{"zone": {"min_local": 0}}"#).unwrap();
        let error = Policy::from_file(&json).unwrap_err().to_string();
        assert!(
            error.starts_with("policy file ") && error.contains("`zone.min_local`"),
            "{error}"
        );
        let yaml = dir.join("policy.yaml");
        std::fs::write(&yaml, "").unwrap();
        let error = Policy::from_file(&yaml).unwrap_err().to_string();
        assert!(error.contains("`.toml` or `.json`"), "{error}");
        let big = dir.join("big.toml");
        // A comment of exactly the largest size allowed.
        let mut text = format!(
            "#{}",
            " ".repeat(usize::try_from(MAX_POLICY_FILE).unwrap() - 1)
        );
        std::fs::write(&big, &text).unwrap();
        assert_eq!(Policy::from_file(&big).unwrap(), Policy::default());
        text.push(' ');
        std::fs::write(&big, &text).unwrap();
        let error = Policy::from_file(&big).unwrap_err().to_string();
        assert!(error.contains("larger than the 1048576 bytes"), "{error}");
        let error = Policy::from_file(&dir.join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing.toml"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_grpc_code_has_its_name() {
        for (i, code) in CODES.into_iter().enumerate() {
            assert_eq!(code, tonic::Code::from_i32(i32::try_from(i).unwrap()));
            assert_eq!(code_from_name(code_name(code)), Some(code));
        }
        for name in &OutlierSettings::default().failure_codes {
            assert!(code_from_name(name).is_some(), "{name}");
        }
    }
}

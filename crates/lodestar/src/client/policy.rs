//! The client policy of a service, as data: how its instances are chosen
//! ([`Strategy`]), which of them a call may use ([`Route`], [`Split`],
//! [`ZoneAffinity`]) and when one is taken out of rotation
//! ([`OutlierSettings`]).
//!
//! A [`Policy`] is a plain value: set in code, read from TOML or JSON, and
//! replaced on a running client without reconnecting.
//!
//! SKELETON: the types are agreed; validation, loading and docs are being
//! filled in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::outlier::OutlierSettings;

/// The whole client policy of one service.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Policy {
    /// How an instance is chosen among those a call may use.
    pub strategy: Strategy,
    /// Routes, tried in order: the first whose `when` matches the call
    /// decides which instances it may use. None match: all of them.
    pub routes: Vec<Route>,
    /// A weighted split between subsets (canaries), for calls no route
    /// matched.
    pub split: Option<Split>,
    /// Prefer instances in the caller's own zone.
    pub zone: ZoneAffinity,
    /// When an instance is taken out of rotation for failing.
    pub outlier: OutlierSettings,
}

/// How an instance is chosen, as data (see [`selector`](super::selector)
/// for the selectors each names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
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
    /// The subsets, each with its share.
    pub subsets: Vec<Subset>,
    /// Decide by hashing this metadata (header) of the call rather than at
    /// random: one key, one subset.
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

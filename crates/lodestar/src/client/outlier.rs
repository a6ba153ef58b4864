//! Outlier detection: taking an instance that fails out of rotation for a
//! while, and bringing it back.
//!
//! SKELETON: the settings are agreed; detection is being filled in.

use serde::{Deserialize, Serialize};

/// When an instance is taken out of rotation (ejected) for failing, and
/// for how long. The defaults are conservative enough for a fleet of two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OutlierSettings {
    /// Whether outlier detection runs. Default: yes.
    pub enabled: bool,
    /// How often the rates are checked and ejections ended, in
    /// milliseconds. Default: 10,000.
    pub interval_ms: u64,
    /// Eject after this many failures in a row (0: never). Default: 5.
    pub consecutive_failures: u32,
    /// Eject when at least this percentage of an interval's calls failed
    /// (0: never). Default: 85.
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
    /// interval. Default: 100.
    pub success_rate_min_calls: u32,
    /// The first ejection's length, in milliseconds; each further one is
    /// longer by as much again. Default: 30,000.
    pub base_ejection_ms: u64,
    /// The longest ejection, in milliseconds. Default: 300,000.
    pub max_ejection_ms: u64,
    /// The most instances ejected at once, as a percentage, counting the
    /// one about to be; at least one may always be ejected. Default: 50.
    pub max_ejection_percent: u32,
    /// The gRPC codes (as names, e.g. `UNAVAILABLE`) that count as
    /// failures, with transport errors. Default: `UNAVAILABLE`,
    /// `INTERNAL`, `UNKNOWN`, `DATA_LOSS`, and `DEADLINE_EXCEEDED` when the
    /// server caused it.
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
            failure_codes: [
                "UNAVAILABLE",
                "INTERNAL",
                "UNKNOWN",
                "DATA_LOSS",
                "DEADLINE_EXCEEDED",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

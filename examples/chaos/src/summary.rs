//! What `chaos-client` counts while it calls, and the one JSON summary it
//! prints: calls, successes, failures by code, calls per instance and
//! latency percentiles, and the retries, hedges and budget denials the
//! client decided ([`Decisions`]). Memory is bounded whatever the run's
//! length or the servers' answers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodestar::client::observe::{Attempt, Decision, Observer};

use lodestar::Status;
use lodestar::client::Policy;
use lodestar::client::policy::code_name;
use serde::Serialize;

use crate::{Pong, instance_of};

/// Latencies kept for the percentiles; past this, a uniform random sample
/// of this many (8 MB).
pub const MAX_LATENCY_SAMPLES: usize = 1_000_000;

/// Distinct instance ids counted one by one; calls naming any further one
/// are counted under [`OTHER_INSTANCES`].
pub const MAX_INSTANCES: usize = 1_024;

/// The longest instance id kept as it was sent; longer ones are cut.
pub const MAX_INSTANCE_ID: usize = 400;

/// The per-instance key of calls naming instances past [`MAX_INSTANCES`].
pub const OTHER_INSTANCES: &str = "(other)";

/// The per-instance key of calls whose answer named no instance (a
/// failure before any instance answered, such as no instance at all).
pub const NO_INSTANCE: &str = "(none)";

/// Counts of one run.
#[derive(Debug)]
pub struct Tally {
    calls: u64,
    ok: u64,
    failures: BTreeMap<&'static str, u64>,
    per_instance: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
    rng: fastrand::Rng,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            calls: 0,
            ok: 0,
            failures: BTreeMap::new(),
            per_instance: BTreeMap::new(),
            latencies_us: Vec::new(),
            rng: fastrand::Rng::with_seed(0x5EED),
        }
    }
}

impl Tally {
    /// Counts one call that took `latency`.
    pub fn record(&mut self, outcome: &Result<Pong, Status>, latency: Duration) {
        self.calls += 1;
        match outcome {
            Ok(pong) => {
                self.ok += 1;
                self.count_instance(Some(&pong.instance));
            }
            Err(status) => {
                *self.failures.entry(code_name(status.code())).or_default() += 1;
                self.count_instance(instance_of(status).as_deref());
            }
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if self.latencies_us.len() < MAX_LATENCY_SAMPLES {
            self.latencies_us.push(micros);
        } else {
            // Reservoir sampling: kept with probability samples / calls.
            let slot = self.rng.u64(..self.calls);
            if let Some(kept) = usize::try_from(slot)
                .ok()
                .and_then(|slot| self.latencies_us.get_mut(slot))
            {
                *kept = micros;
            }
        }
    }

    /// Counts a call under its instance: allocates only for an instance
    /// not seen before.
    fn count_instance(&mut self, instance: Option<&str>) {
        let id = match instance {
            None => NO_INSTANCE,
            Some(id) => {
                let mut end = id.len().min(MAX_INSTANCE_ID);
                while !id.is_char_boundary(end) {
                    end -= 1;
                }
                &id[..end]
            }
        };
        if let Some(count) = self.per_instance.get_mut(id) {
            *count += 1;
            return;
        }
        // Calls that named no instance are always counted on their own.
        let key = if id != NO_INSTANCE && self.per_instance.len() >= MAX_INSTANCES {
            OTHER_INSTANCES
        } else {
            id
        };
        *self.per_instance.entry(key.to_owned()).or_default() += 1;
    }

    /// The summary, with `policy` (the policy in force) and the run's
    /// length.
    pub fn summary(mut self, policy: Policy, elapsed: Duration) -> Summary {
        self.latencies_us.sort_unstable();
        // The nearest rank: the smallest sample at or above the share `q`
        // of all samples, in milliseconds.
        let at = |q: f64| {
            let n = self.latencies_us.len();
            if n == 0 {
                return 0.0;
            }
            let rank = ((n as f64 * q).ceil() as usize).clamp(1, n);
            self.latencies_us[rank - 1] as f64 / 1_000.0
        };
        Summary {
            calls: self.calls,
            ok: self.ok,
            failures: self
                .failures
                .into_iter()
                .map(|(code, n)| (code.to_owned(), n))
                .collect(),
            per_instance: self.per_instance,
            latency_ms: Percentiles {
                p50: at(0.50),
                p99: at(0.99),
                p99_9: at(0.999),
            },
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            decisions: BTreeMap::new(),
            metrics: BTreeMap::new(),
            policy,
        }
    }
}

/// Counts the client's resilience decisions by kind, named in snake case
/// (`retry`, `hedge`, `budget_denied`, `breaker_opened`,
/// `breaker_rejected`, `bulkhead_full`, `fault_injected`, ...): an
/// [`Observer`] to give the client, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Decisions(Arc<Mutex<BTreeMap<String, u64>>>);

impl Observer for Decisions {
    fn attempt(&self, _attempt: &Attempt<'_>) {}

    fn decided(&self, decision: &Decision<'_>) {
        // The variant's name: what its `Debug` form starts with.
        let debug = format!("{:?}", decision.kind);
        let variant = debug.split([' ', '{', '(']).next().unwrap_or_default();
        let mut name = String::with_capacity(variant.len() + 4);
        for (i, c) in variant.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                name.push('_');
            }
            name.push(c.to_ascii_lowercase());
        }
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_default() += 1;
    }
}

impl Decisions {
    /// The counts, by name, of the kinds that happened.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What `chaos-client` prints, as one JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Calls made.
    pub calls: u64,
    /// Calls that succeeded.
    pub ok: u64,
    /// Failed calls by gRPC code name.
    pub failures: BTreeMap<String, u64>,
    /// Calls (succeeded or failed) by the instance that answered.
    pub per_instance: BTreeMap<String, u64>,
    /// Latency percentiles of every call, in milliseconds (to the
    /// microsecond). At a fixed rate, counted from when each call was due
    /// to start, so that a server that holds the client up is not
    /// measured only by the calls it let through.
    pub latency_ms: Percentiles,
    /// How long the run took.
    pub elapsed_ms: u64,
    /// The client's resilience decisions by kind, those that happened
    /// (see [`Decisions`]).
    pub decisions: BTreeMap<String, u64>,
    /// The client's governance counters as its `/metrics` would show them
    /// (`lodestar_client_ejections_total`, `..._breaker_transitions_total`,
    /// `..._retry_budget_denied_total`, ...), each summed over its labels;
    /// those that moved.
    pub metrics: BTreeMap<String, f64>,
    /// The client policy in force, every field written out.
    pub policy: Policy,
}

/// The counters named `lodestar_client_*_total` in an OpenMetrics `text`,
/// each summed over its series; those above zero.
pub fn governance_totals(text: &str) -> BTreeMap<String, f64> {
    let mut totals = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("lodestar_client_")) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value
            && name.ends_with("_total")
            && value > 0.0
        {
            *totals.entry(name.to_owned()).or_insert(0.0) += value;
        }
    }
    totals
}

/// p50, p99 and p99.9, in milliseconds; 0 when no call was made.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// The median.
    pub p50: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The 99.9th percentile.
    pub p99_9: f64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lodestar::Code;

    fn pong(instance: &str) -> Result<Pong, Status> {
        Ok(Pong {
            instance: instance.to_owned(),
            ..Pong::default()
        })
    }

    #[test]
    fn counts_add_up_and_percentiles_take_the_rank_at_or_above() {
        let mut tally = Tally::default();
        for i in 1..=1000u64 {
            let outcome = if i % 4 == 0 {
                Err(Status::unavailable("down"))
            } else {
                pong(if i % 2 == 0 { "a" } else { "b" })
            };
            tally.record(&outcome, Duration::from_micros(i));
        }
        let s = tally.summary(Policy::default(), Duration::from_secs(1));
        assert_eq!((s.calls, s.ok), (1000, 750));
        assert_eq!(s.failures["UNAVAILABLE"], 250);
        assert_eq!(s.per_instance["a"], 250);
        assert_eq!(s.per_instance["b"], 500);
        assert_eq!(s.per_instance[NO_INSTANCE], 250);
        assert_eq!((s.latency_ms.p50, s.latency_ms.p99), (0.5, 0.99));
        assert_eq!(s.latency_ms.p99_9, 0.999);
    }

    #[test]
    fn a_server_naming_endless_instances_costs_bounded_memory() {
        let mut tally = Tally::default();
        for i in 0..(MAX_INSTANCES + 10) {
            tally.record(&pong(&format!("i{i}")), Duration::ZERO);
        }
        tally.record(&pong(&"x".repeat(10_000)), Duration::ZERO);
        let failed = Status::new(Code::Internal, "x");
        tally.record(&Err(failed), Duration::ZERO);
        // Every id counted, plus `(other)` and `(none)`.
        assert_eq!(tally.per_instance.len(), MAX_INSTANCES + 2);
        assert_eq!(tally.per_instance[OTHER_INSTANCES], 11);
        assert_eq!(tally.per_instance[NO_INSTANCE], 1);
        assert!(
            tally
                .per_instance
                .keys()
                .all(|k| k.len() <= MAX_INSTANCE_ID)
        );
    }
}

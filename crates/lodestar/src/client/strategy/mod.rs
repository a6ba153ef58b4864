//! The built-in balancing strategies: one [`Selector`](super::selector::Selector) per
//! [`Strategy`], each honouring [`Instance::weight`](lodestar_core::Instance::weight).
//!
//! | strategy | picks | cost of a pick | reads the load | weights |
//! |---|---|---|---|---|
//! | [`RoundRobin`] | each endpoint in turn | O(1) | no | ignored |
//! | [`Random`] | uniformly at random | O(1) | no | ignored |
//! | [`WeightedRoundRobin`] | a precomputed smooth (EDF) cycle | O(1) | no | exact shares |
//! | [`LeastRequest`] | the fewest calls in flight of 2 (or `choices`) sampled | O(log n) | in flight | sampling ∝ weight, load per unit of weight |
//! | [`PeakEwma`] (the default) | the lowest latency × (in flight + 1) of 2 sampled | O(log n) + one clock read | latency and in flight | as least-request |
//! | [`RingHash`] | the endpoint owning the call's key on a hash ring | O(log n) | only with bounded load | vnodes ∝ weight |
//!
//! **Why P2C peak-EWMA is the default.** A fleet is rarely uniform: one
//! instance is on a busy host, in a garbage-collection pause, or failing.
//! Round robin and random keep sending such an instance its full share,
//! so its slowness lands in every caller's tail. Least-request sees only
//! calls in flight, which hide a slow instance until enough calls pile up
//! on it. Peak-EWMA sees latency itself, reacts at once to a slower
//! sample (the "peak"), forgets it over the decay (10 s), and multiplies
//! by the calls in flight, so it also spreads load among equally fast
//! instances. Sampling two at random (P2C) rather than taking the global
//! minimum avoids herding every caller onto the same instance. linkerd
//! and go-zero default to it for the same reasons; tower's published
//! numbers (p99 96 ms against round robin's 906 ms with a mix of slow
//! instances) show the gap. Two pitfalls of the classic algorithm are closed: a failed attempt
//! counts as at least [`FAILURE_PENALTY`] (1 s), so an instance that fails
//! fast does not look fast, and an instance not picked for `probe_after`
//! (1 s) is picked the next time it is sampled, so a recovered or new
//! instance gets traffic again.
//!
//! **Weights.** A weight of 0 counts as 1 (the smallest share, not none):
//! an instance takes no traffic only when it is disabled or unhealthy in
//! the registry. The P2C strategies sample endpoints in proportion to
//! their weights and compare load per unit of weight (calls in flight ×
//! mean weight ÷ weight), ties going to the first sampled: with no load,
//! shares follow the weights exactly; under load, an endpoint of twice
//! the weight is expected to carry twice the calls in flight. (Dividing
//! the whole cost by the weight, `(in flight + 1) / weight`, would instead
//! make the heavier of two idle endpoints win every comparison: 1:2:7
//! would get 0/33/67% of calls rather than 10/20/70%.)
//!
//! Every strategy reads only what
//! [`Selector::prepare`](super::selector::Selector::prepare) built for the
//! current endpoint set and the endpoints' atomic
//! [`EndpointStats`](super::selector::EndpointStats): no lock is shared across calls.

use std::any::Any;
use std::sync::Arc;

use super::SelectorFactory;
use super::policy::Strategy;
use super::selector::{Endpoint, Prepared, Random, RoundRobin};

mod hash;
mod least_request;
mod peak_ewma;
mod weighted;

pub(crate) use hash::hash as stable_hash;
pub use hash::{MAX_RING, RingHash, VNODES_PER_ENDPOINT};
pub use least_request::LeastRequest;
pub use peak_ewma::{FAILURE_PENALTY, PeakEwma};
pub use weighted::{MAX_WRR_CYCLE, WeightedRoundRobin};

/// The most endpoints a P2C strategy samples per pick:
/// [`policy::MAX_CHOICES`](super::policy::MAX_CHOICES); `choices` above it
/// counts as this many.
const MAX_CHOICES: usize = super::policy::MAX_CHOICES as usize;

/// The selector factory for `strategy` (what
/// [`ClientBuilder::strategy`](super::ClientBuilder::strategy) installs).
pub(crate) fn factory(strategy: &Strategy) -> SelectorFactory {
    match strategy {
        Strategy::RoundRobin => super::selector_factory(RoundRobin::default()),
        Strategy::Random => super::selector_factory(Random),
        Strategy::WeightedRoundRobin => super::selector_factory(WeightedRoundRobin),
        Strategy::LeastRequest { choices } => {
            super::selector_factory(LeastRequest::new(*choices as usize))
        }
        Strategy::PeakEwma {
            default_rtt_ms,
            decay_ms,
            probe_after_ms,
        } => super::selector_factory(
            PeakEwma::default()
                .default_rtt(std::time::Duration::from_millis(*default_rtt_ms))
                .decay(std::time::Duration::from_millis(*decay_ms))
                .probe_after(std::time::Duration::from_millis(*probe_after_ms)),
        ),
        Strategy::Hash {
            header,
            bounded_load_percent,
        } => {
            let ring = RingHash::new(header).unwrap_or_else(|e| {
                // Policy validation refuses such a header first; a
                // selector must still be had.
                tracing::warn!(header = %header, error = %e,
                    "the hash strategy's header is not a valid header name: every call is keyless");
                RingHash::keyless()
            });
            super::selector_factory(ring.bounded_load(*bounded_load_percent))
        }
    }
}

/// The heap bytes a built-in strategy prepared for `set` (its schedule,
/// weight table or ring), for measuring memory; 0 for a strategy that
/// prepares nothing or a selector of another kind.
pub fn prepared_bytes(set: &Prepared) -> usize {
    if let Some(table) = set.state::<WeightTable>() {
        table.heap_bytes()
    } else if let Some(schedule) = set.state::<weighted::Schedule>() {
        schedule.heap_bytes()
    } else if let Some(ring) = set.state::<Arc<hash::Ring>>() {
        ring.heap_bytes()
    } else {
        0
    }
}

/// An endpoint's weight for balancing: 0 counts as 1 (see the module docs).
pub(crate) fn weight(endpoint: &Endpoint) -> u32 {
    endpoint.instance().weight.max(1)
}

/// A strategy that picks with a [`WeightTable`] prepared for each set of
/// endpoints (the P2C strategies): the [`Selector`] plumbing they share.
pub(crate) trait Weighted {
    /// The index in `endpoints` to use, `table` being theirs.
    fn pick(&self, table: &WeightTable, endpoints: &[Arc<Endpoint>]) -> Option<usize>;

    /// [`Selector::select`]: with a table made for `endpoints` now.
    fn select_weighted(&self, endpoints: &[Arc<Endpoint>]) -> Option<usize> {
        self.pick(&WeightTable::new(endpoints), endpoints)
    }

    /// [`Selector::prepare`]: the set's table.
    fn prepare_weighted(&self, endpoints: &[Arc<Endpoint>]) -> Option<Box<dyn Any + Send + Sync>> {
        Some(Box::new(WeightTable::new(endpoints)))
    }

    /// [`Selector::select_prepared`]: with the set's table.
    fn select_prepared_weighted(&self, set: &Prepared) -> Option<usize> {
        match set.state::<WeightTable>() {
            Some(table) => self.pick(table, set.endpoints()),
            None => self.select_weighted(set.endpoints()),
        }
    }
}

/// Sampling endpoints in proportion to their weights: uniformly when all
/// weights are equal (O(1)), else by binary search over the cumulative
/// weights (O(log n)).
#[derive(Debug)]
pub(crate) struct WeightTable {
    /// Cumulative weights (the first endpoint's, the first two's, …);
    /// empty when all weights are equal.
    cumulative: Box<[u64]>,
    len: usize,
    /// The mean weight.
    mean: f64,
}

impl WeightTable {
    pub(crate) fn new(endpoints: &[Arc<Endpoint>]) -> Self {
        let first = endpoints.first().map_or(1, |e| weight(e));
        let equal = endpoints.iter().all(|e| weight(e) == first);
        let mut total = 0u64;
        let cumulative = if equal {
            total = u64::from(first) * endpoints.len() as u64;
            Box::default()
        } else {
            endpoints
                .iter()
                .map(|e| {
                    total += u64::from(weight(e));
                    total
                })
                .collect()
        };
        Self {
            cumulative,
            len: endpoints.len(),
            mean: total as f64 / endpoints.len().max(1) as f64,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.cumulative)
    }

    /// The mean weight divided by `endpoint`'s: how much one call in
    /// flight weighs on it, relative to an endpoint of mean weight.
    pub(crate) fn load_factor(&self, endpoint: &Endpoint) -> f64 {
        self.mean / f64::from(weight(endpoint))
    }

    /// One index, in proportion to weight. The table must not be empty.
    pub(crate) fn sample(&self) -> usize {
        match self.cumulative.last() {
            None => fastrand::usize(..self.len),
            Some(&total) => {
                let r = fastrand::u64(..total);
                self.cumulative.partition_point(|&c| c <= r)
            }
        }
    }

    /// `choices` distinct indices (fewer if there are fewer endpoints), each
    /// drawn in proportion to weight among those not drawn yet (by
    /// rejection, a few tries each: with very uneven weights a light
    /// endpoint may then be drawn uniformly instead).
    pub(crate) fn sample_distinct(&self, choices: usize) -> Candidates {
        let want = choices.clamp(1, MAX_CHOICES).min(self.len);
        let mut out = Candidates {
            indices: [0; MAX_CHOICES],
            len: 0,
        };
        while out.len < want {
            let mut index = self.sample();
            let mut tries = 1;
            while out.contains(index) {
                index = if tries < 4 {
                    self.sample()
                } else {
                    // Uniformly among the rest: always terminates.
                    let skip = fastrand::usize(..self.len - out.len);
                    (0..self.len)
                        .filter(|i| !out.contains(*i))
                        .nth(skip)
                        .unwrap_or(0)
                };
                tries += 1;
            }
            out.indices[out.len] = index;
            out.len += 1;
        }
        out
    }
}

/// The endpoints a P2C pick compares, in the order they were drawn.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidates {
    indices: [usize; MAX_CHOICES],
    len: usize,
}

impl Candidates {
    fn contains(&self, index: usize) -> bool {
        self.indices[..self.len].contains(&index)
    }

    pub(crate) fn as_slice(&self) -> &[usize] {
        &self.indices[..self.len]
    }
}

/// Of `candidates`, the one with the lowest cost; ties go to the first
/// drawn (which was drawn in proportion to weight). A later candidate
/// must be cheaper than the best so far by more than `margin` (a factor,
/// 1.0 for any difference) to take its place: costs closer than that are
/// ties.
pub(crate) fn cheapest(
    candidates: &Candidates,
    margin: f64,
    mut cost: impl FnMut(usize) -> f64,
) -> usize {
    let mut best = (candidates.indices[0], cost(candidates.indices[0]));
    for &index in candidates.as_slice().iter().skip(1) {
        let c = cost(index);
        if c * margin < best.1 {
            best = (index, c);
        }
    }
    best.0
}

#[cfg(test)]
pub(crate) mod testing {
    //! Endpoints and counting helpers for the strategies' tests.

    use std::sync::Arc;

    use http::HeaderMap;
    use lodestar_core::{Instance, ServiceKey};

    use crate::client::selector::{CallInfo, Endpoint, Prepared, Selector};

    /// Endpoints `e0`, `e1`, … with these weights.
    pub(crate) fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let instance = Instance::new("svc", format!("127.0.0.1:{}", 7000 + i))
                    .with_id(format!("e{i:05}"))
                    .with_weight(*w);
                Arc::new(Endpoint::new(instance).expect("a valid address"))
            })
            .collect()
    }

    /// Calls `f` with a call carrying `headers`.
    pub(crate) fn with_call<T>(headers: &HeaderMap, f: impl FnOnce(&CallInfo<'_>) -> T) -> T {
        let service = ServiceKey::new("svc");
        let call = CallInfo {
            service: &service,
            method: "/svc.Svc/Call",
            headers,
            attempt: 1,
        };
        f(&call)
    }

    /// How many of `picks` prepared picks went to each endpoint.
    pub(crate) fn shares(
        selector: &dyn Selector,
        endpoints: &[Arc<Endpoint>],
        picks: usize,
    ) -> Vec<usize> {
        let prepared = Prepared::new(selector, endpoints.to_vec().into());
        let mut counts = vec![0; endpoints.len()];
        with_call(&HeaderMap::new(), |call| {
            for _ in 0..picks {
                let i = selector.select_prepared(&prepared, call).expect("a pick");
                counts[i] += 1;
            }
        });
        counts
    }

    /// Asserts each count is `expected` percent of `total`, ± `tolerance`.
    pub(crate) fn assert_shares(counts: &[usize], expected: &[f64], tolerance: f64) {
        let total: usize = counts.iter().sum();
        for (i, (&count, &want)) in counts.iter().zip(expected).enumerate() {
            let got = 100.0 * count as f64 / total as f64;
            assert!(
                (got - want).abs() <= tolerance,
                "endpoint {i}: {got:.2}% of picks, expected {want}% ± {tolerance} ({counts:?})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::client::selector::Selector;

    fn every_strategy() -> Vec<(&'static str, Box<dyn Selector>)> {
        [
            Strategy::RoundRobin,
            Strategy::Random,
            Strategy::WeightedRoundRobin,
            Strategy::LeastRequest { choices: 2 },
            Strategy::default(),
        ]
        .iter()
        .map(|s| {
            let name = match s {
                Strategy::RoundRobin => "round robin",
                Strategy::Random => "random",
                Strategy::WeightedRoundRobin => "weighted round robin",
                Strategy::LeastRequest { .. } => "least request",
                _ => "peak ewma",
            };
            (name, factory(s)())
        })
        .collect()
    }

    #[test]
    fn five_equal_endpoints_get_a_fifth_each_from_every_strategy() {
        fastrand::seed(7);
        let endpoints = endpoints(&[100; 5]);
        for (name, selector) in every_strategy() {
            let counts = shares(&*selector, &endpoints, 50_000);
            eprintln!("{name}: {counts:?}");
            assert_shares(&counts, &[20.0; 5], 1.5);
        }
    }

    #[test]
    fn weighted_strategies_follow_weights_without_load() {
        fastrand::seed(11);
        let endpoints = endpoints(&[1, 2, 7]);
        for (name, selector) in every_strategy().into_iter().skip(2) {
            let counts = shares(&*selector, &endpoints, 50_000);
            eprintln!("{name}: {counts:?}");
            assert_shares(&counts, &[10.0, 20.0, 70.0], 1.5);
        }
    }

    #[test]
    fn weight_zero_counts_as_one() {
        fastrand::seed(3);
        let endpoints = endpoints(&[0, 1]);
        let counts = shares(&WeightedRoundRobin, &endpoints, 10_000);
        assert_eq!(counts, [5_000, 5_000]);
    }

    #[test]
    fn distinct_samples_are_distinct_even_with_very_uneven_weights() {
        fastrand::seed(5);
        let table = WeightTable::new(&endpoints(&[10_000, 1, 1]));
        for _ in 0..1_000 {
            let c = table.sample_distinct(3);
            let mut seen = c.as_slice().to_vec();
            seen.sort_unstable();
            assert_eq!(seen, [0, 1, 2]);
        }
        assert_eq!(table.sample_distinct(100).as_slice().len(), 3);
    }
}

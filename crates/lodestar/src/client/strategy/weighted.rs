//! Weighted round robin: each endpoint in proportion to its weight,
//! smoothly interleaved.

use std::any::Any;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{WeightTable, weight};
use crate::client::selector::{CallInfo, Endpoint, Prepared, Selector};

/// The most slots a weighted round-robin cycle has beyond one per
/// endpoint: 65,536 (256 KiB of schedule). Weights whose sum (after
/// dividing by their greatest common divisor) is larger are scaled down to
/// fit, each to at least one slot.
pub const MAX_WRR_CYCLE: usize = 65_536;

/// Each endpoint in proportion to its [weight](lodestar_core::Instance::weight)
/// (0 counts as 1), smoothly interleaved: weights 1:2:7 give a cycle of ten
/// picks such as `C B C C A C C B C C`, never `A B B C C C C C C C`.
///
/// [`prepare`](Selector::prepare) computes one cycle by earliest deadline
/// first (each endpoint due every `1 / weight`, its first deadline drawn at
/// random within its period so that clients do not move in lockstep);
/// each pick then takes the next slot with one atomic increment, from a
/// random starting slot. A new endpoint set (an instance added, removed or
/// reweighted in the registry) is prepared anew, with no reconnecting.
///
/// Shares are exact while the weights, divided by their greatest common
/// divisor, sum to at most [`MAX_WRR_CYCLE`]; beyond, each weight is scaled
/// to fit and rounded to the nearest slot, at least one, so no endpoint is
/// starved and none is off by more than one slot in `MAX_WRR_CYCLE`.
///
/// Picks among endpoints that were not prepared (the retry of a call that
/// already tried one) are weighted random.
#[derive(Debug, Clone, Copy, Default)]
pub struct WeightedRoundRobin;

/// One prepared cycle.
#[derive(Debug)]
pub(crate) struct Schedule {
    /// Endpoint indices, in pick order.
    cycle: Box<[u32]>,
    cursor: AtomicUsize,
}

impl Schedule {
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.cycle)
    }
}

impl Selector for WeightedRoundRobin {
    fn select(&self, endpoints: &[Arc<Endpoint>], _call: &CallInfo<'_>) -> Option<usize> {
        Some(WeightTable::new(endpoints).sample())
    }

    fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Option<Box<dyn Any + Send + Sync>> {
        let cycle = cycle(&slots(endpoints));
        let cursor = AtomicUsize::new(fastrand::usize(..cycle.len().max(1)));
        Some(Box::new(Schedule { cycle, cursor }))
    }

    fn select_prepared(&self, set: &Prepared, call: &CallInfo<'_>) -> Option<usize> {
        match set.state::<Schedule>() {
            Some(schedule) if !schedule.cycle.is_empty() => {
                let slot = schedule.cursor.fetch_add(1, Ordering::Relaxed) % schedule.cycle.len();
                schedule.cycle.get(slot).map(|&i| i as usize)
            }
            _ => self.select(set.endpoints(), call),
        }
    }
}

/// How many slots of a cycle each endpoint gets: its weight divided by the
/// greatest common divisor of all, scaled down if they sum to more than
/// [`MAX_WRR_CYCLE`].
fn slots(endpoints: &[Arc<Endpoint>]) -> Vec<u64> {
    let weights: Vec<u64> = endpoints.iter().map(|e| u64::from(weight(e))).collect();
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
    let total: u64 = weights.iter().sum();
    let limit = MAX_WRR_CYCLE as u64;
    if total <= limit {
        return weights;
    }
    let scale = limit as f64 / total as f64;
    weights
        .iter()
        .map(|&w| ((w as f64 * scale).round() as u64).max(1))
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One earliest-deadline-first cycle: endpoint `i` appears `slots[i]`
/// times. Its `k`-th deadline is `(offset + k) / slots[i]` with `offset`
/// random in `[0, 1)`, so exactly `slots[i]` of its deadlines fall before 1,
/// and the cycle repeats seamlessly.
fn cycle(slots: &[u64]) -> Box<[u32]> {
    let len: u64 = slots.iter().sum();
    let mut heap: BinaryHeap<Reverse<(u64, u32)>> = slots
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let deadline = fastrand::f64() / w as f64;
            // Non-negative floats order as their bits do.
            Reverse((deadline.to_bits(), i as u32))
        })
        .collect();
    let mut cycle = Vec::with_capacity(len as usize);
    while cycle.len() < len as usize {
        let Some(Reverse((deadline, i))) = heap.pop() else {
            break;
        };
        cycle.push(i);
        let next = f64::from_bits(deadline) + 1.0 / slots[i as usize] as f64;
        heap.push(Reverse((next.to_bits(), i)));
    }
    cycle.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::client::selector::Prepared;
    use http::HeaderMap;

    fn sequence(endpoints: &[Arc<Endpoint>], picks: usize) -> Vec<usize> {
        let prepared = Prepared::new(&WeightedRoundRobin, endpoints.to_vec().into());
        with_call(&HeaderMap::new(), |call| {
            (0..picks)
                .map(|_| {
                    WeightedRoundRobin
                        .select_prepared(&prepared, call)
                        .expect("a pick")
                })
                .collect()
        })
    }

    #[test]
    fn every_ten_picks_hold_weights_one_two_seven_exactly_and_smoothly() {
        for seed in 0..50 {
            fastrand::seed(seed);
            let picks = sequence(&endpoints(&[1, 2, 7]), 50_000);
            for window in picks.chunks(10) {
                let count = |e| window.iter().filter(|&&p| p == e).count();
                // Any ten consecutive picks from a random start: a rotation
                // of the cycle.
                assert_eq!([count(0), count(1), count(2)], [1, 2, 7], "{window:?}");
            }
            for pair in picks.windows(2) {
                assert!(
                    !(pair[0] == pair[1] && pair[0] != 2),
                    "a light endpoint picked twice in a row: {:?}",
                    &picks[..20]
                );
            }
        }
    }

    #[test]
    fn weights_are_reduced_by_their_common_divisor() {
        let endpoints = endpoints(&[100, 300]);
        assert_eq!(slots(&endpoints), [1, 3]);
        assert_eq!(cycle(&slots(&endpoints)).len(), 4);
    }

    #[test]
    fn weights_too_large_for_one_cycle_are_scaled_without_starving_or_flooding() {
        fastrand::seed(1);
        // Weights 1..=1000 and a few at the extremes: they sum to about
        // 540k, past the cycle limit.
        let mut weights: Vec<u32> = (1..=1000).collect();
        weights.extend([10_000, 10_000, 10_000, 10_000, 0]);
        let endpoints = endpoints(&weights);
        let total: f64 = weights.iter().map(|&w| f64::from(w.max(1))).sum();
        let cycle = cycle(&slots(&endpoints));
        assert!(cycle.len() <= MAX_WRR_CYCLE + endpoints.len());
        let mut counts = vec![0usize; endpoints.len()];
        for &i in cycle.iter() {
            counts[i as usize] += 1;
        }
        for (i, &count) in counts.iter().enumerate() {
            assert!(count >= 1, "endpoint {i} starved");
            let exact = f64::from(weights[i].max(1)) / total * cycle.len() as f64;
            assert!(
                (count as f64 - exact).abs() <= 1.0,
                "endpoint {i} (weight {}): {count} slots, exactly {exact:.2}",
                weights[i]
            );
        }
    }

    #[test]
    fn a_new_weight_applies_from_the_next_prepare() {
        fastrand::seed(2);
        let before = endpoints(&[100, 100]);
        assert_eq!(shares(&WeightedRoundRobin, &before, 1_000), [500, 500]);
        let after = endpoints(&[100, 300]);
        assert_eq!(shares(&WeightedRoundRobin, &after, 1_000), [250, 750]);
    }

    #[test]
    fn unprepared_picks_are_weighted_random() {
        fastrand::seed(4);
        let endpoints = endpoints(&[1, 2, 7]);
        let mut counts = [0; 3];
        with_call(&HeaderMap::new(), |call| {
            for _ in 0..50_000 {
                counts[WeightedRoundRobin.select(&endpoints, call).expect("a pick")] += 1;
            }
        });
        assert_shares(&counts, &[10.0, 20.0, 70.0], 1.5);
    }
}

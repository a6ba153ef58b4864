//! P2C least-request: the less loaded of a few random endpoints.

use std::any::Any;
use std::sync::Arc;

use super::{WeightTable, Weighted, cheapest};
use crate::client::selector::{CallInfo, Endpoint, Prepared, Selector};

/// The endpoint with the fewest calls in flight of `choices` (default 2)
/// distinct endpoints drawn at random in proportion to their weights.
///
/// Load is compared per unit of weight (calls in flight × mean weight ÷
/// weight), ties going to the first drawn: idle endpoints get shares
/// exactly in proportion to their weights, and a busy endpoint of twice
/// the weight may carry twice the calls before it loses. See the
/// [module docs](super) for why not `(in flight + 1) / weight`.
///
/// [`prepare`](Selector::prepare) builds the weight table (O(n)); a pick
/// is O(log n) with uneven weights, O(1) with equal ones. Picks among
/// endpoints that were not prepared (retries) build a table for the slice.
#[derive(Debug, Clone, Copy)]
pub struct LeastRequest {
    choices: usize,
}

impl Default for LeastRequest {
    /// Two choices.
    fn default() -> Self {
        Self::new(2)
    }
}

impl LeastRequest {
    /// Compares `choices` endpoints per pick: at least 1, at most
    /// [`MAX_CHOICES`](crate::client::policy::MAX_CHOICES) (16). More choices find a lightly
    /// loaded endpoint more surely when several are slow, and herd callers
    /// more.
    pub fn new(choices: usize) -> Self {
        Self {
            choices: choices.clamp(1, super::MAX_CHOICES),
        }
    }
}

impl Weighted for LeastRequest {
    fn pick(&self, table: &WeightTable, endpoints: &[Arc<Endpoint>]) -> Option<usize> {
        if endpoints.is_empty() || table.len() != endpoints.len() {
            return None;
        }
        let candidates = table.sample_distinct(self.choices);
        Some(cheapest(&candidates, 1.0, |i| {
            endpoints.get(i).map_or(f64::INFINITY, |e| {
                e.stats().in_flight() as f64 * table.load_factor(e)
            })
        }))
    }
}

impl Selector for LeastRequest {
    fn select(&self, endpoints: &[Arc<Endpoint>], _call: &CallInfo<'_>) -> Option<usize> {
        self.select_weighted(endpoints)
    }

    fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Option<Box<dyn Any + Send + Sync>> {
        self.prepare_weighted(endpoints)
    }

    fn select_prepared(&self, set: &Prepared, _call: &CallInfo<'_>) -> Option<usize> {
        self.select_prepared_weighted(set)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn the_less_loaded_of_two_wins() {
        fastrand::seed(9);
        let endpoints = endpoints(&[100; 2]);
        for _ in 0..3 {
            endpoints[0].stats().started();
        }
        let counts = shares(&LeastRequest::default(), &endpoints, 1_000);
        assert_eq!(counts, [0, 1_000]);
    }

    #[test]
    fn load_is_compared_per_unit_of_weight() {
        fastrand::seed(10);
        // Weight 300 with 2 in flight is lighter than weight 100 with 1.
        let endpoints = endpoints(&[300, 100]);
        endpoints[0].stats().started();
        endpoints[0].stats().started();
        endpoints[1].stats().started();
        let counts = shares(&LeastRequest::default(), &endpoints, 1_000);
        assert_eq!(counts, [1_000, 0]);
    }

    #[test]
    fn a_busy_endpoint_among_five_gets_little_with_more_choices() {
        fastrand::seed(12);
        let endpoints = endpoints(&[100; 5]);
        endpoints[0].stats().started();
        // With 2 choices the busy one is never taken (both drawn are
        // distinct, the other is idle); 1 choice is plain weighted random.
        assert_eq!(shares(&LeastRequest::new(2), &endpoints, 10_000)[0], 0);
        let random = shares(&LeastRequest::new(1), &endpoints, 10_000)[0];
        assert!((1_700..2_300).contains(&random), "{random}");
    }
}

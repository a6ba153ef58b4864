//! P2C peak-EWMA: the cheaper of two random endpoints, where cost is a
//! latency estimate times the calls in flight.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use super::{WeightTable, Weighted, cheapest};
use crate::client::observe::{Attempt, Outcome};
use crate::client::selector::{CallInfo, Endpoint, Prepared, Selector, nanos_since_epoch};

/// The least latency a failed attempt counts as: 1 s, so that an
/// instance answering `UNAVAILABLE` in a microsecond looks slow, not fast.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// The latency assumed for an endpoint without a sample: 30 ms (linkerd's).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast the estimate forgets: 10 s (linkerd's and go-zero's).
const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// An endpoint not picked for this long is picked when next drawn: 1 s
/// (go-zero's).
const DEFAULT_PROBE_AFTER: Duration = Duration::from_secs(1);

/// How much cheaper the second endpoint drawn must be to be picked over
/// the first: by more than a fifth (its cost × 1.25 below the first's).
/// Closer costs are noise (a scheduling hiccup held as a peak), and the
/// first drawn, random, takes the call: equal instances get equal shares,
/// while a slower or busier one (a difference of 25% and more) is still
/// avoided.
const TIE_MARGIN: f64 = 1.25;

/// Of two endpoints drawn at random (in proportion to their weights), the
/// one with the lower cost: a latency estimate × (1 + calls in flight ×
/// mean weight ÷ weight). The tower / linkerd / Finagle algorithm, with
/// these changes:
///
/// - the **estimate** (kept in each endpoint's stats) jumps to any slower
///   sample at once (the "peak"), and moves toward a faster one by
///   `1 - exp(-elapsed / decay)` (`decay` 10 s by default); read later, it
///   has decayed toward 0 meanwhile, so an endpoint left alone looks
///   cheaper and cheaper. An endpoint without a sample counts as
///   `default_rtt` (30 ms).
/// - a **failed** attempt ([`Outcome::is_failure`]) counts as at least
///   [`FAILURE_PENALTY`] (1 s), whatever its latency: failing fast does not
///   attract traffic. An attempt cancelled by its caller before an answer
///   is no sample; one whose deadline passed first counts as the time it
///   waited.
/// - **near ties**: the second endpoint drawn must be cheaper than the
///   first by more than a fifth to be picked; closer costs are taken as
///   equal (latency noise held as a peak would otherwise skew the shares
///   of equal instances for the length of the decay).
/// - a **forced probe**: an endpoint never picked, or not picked for
///   `probe_after` (1 s), is picked the next time it is drawn against one
///   picked more recently (by one caller: the claim is an atomic swap),
///   so a recovered or new endpoint gets traffic again and a fresh
///   sample, however bad its last one was. When both drawn are due (too
///   little traffic to pick each every `probe_after`), their costs decide.
///
/// Samples are the time to the response's headers, taken from the
/// attempt's report (no clock read of their own). A pick reads the clock
/// once (tokio's, so paused time in tests holds), for the decay and the
/// probe, and notes the time on the endpoint picked.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    /// Nanoseconds.
    default_rtt: f64,
    /// Nanoseconds.
    decay: f64,
    /// Nanoseconds.
    probe_after: u64,
}

impl Default for PeakEwma {
    /// Default RTT 30 ms, decay 10 s, probe after 1 s.
    fn default() -> Self {
        Self {
            default_rtt: nanos(DEFAULT_RTT),
            decay: nanos(DEFAULT_DECAY),
            probe_after: DEFAULT_PROBE_AFTER.as_nanos() as u64,
        }
    }
}

fn nanos(duration: Duration) -> f64 {
    duration.as_nanos() as f64
}

impl PeakEwma {
    /// The latency assumed for an endpoint without a sample. Default: 30 ms.
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.default_rtt = nanos(rtt).max(1.0);
        self
    }

    /// How fast the estimate decays toward faster samples, and toward 0
    /// while unused. Default: 10 s.
    pub fn decay(mut self, decay: Duration) -> Self {
        self.decay = nanos(decay);
        self
    }

    /// An endpoint not picked for this long is picked the next time it is
    /// drawn. Default: 1 s.
    pub fn probe_after(mut self, after: Duration) -> Self {
        self.probe_after = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    /// The cost of `endpoint` at `now` (nanoseconds since the stats' epoch).
    fn cost(&self, table: &WeightTable, endpoint: &Endpoint, now: u64) -> f64 {
        let stats = endpoint.stats();
        let rtt = stats.peak_rtt(now, self.decay).unwrap_or(self.default_rtt);
        rtt * (1.0 + stats.in_flight() as f64 * table.load_factor(endpoint))
    }
}

impl Weighted for PeakEwma {
    fn pick(&self, table: &WeightTable, endpoints: &[Arc<Endpoint>]) -> Option<usize> {
        if endpoints.is_empty() || table.len() != endpoints.len() {
            return None;
        }
        // Never 0, which means "never picked".
        let now = nanos_since_epoch(Instant::now()).max(1);
        let candidates = table.sample_distinct(2);
        // A probe for the one of the two not picked for a while; when both
        // are (little traffic), their costs decide, or a slow endpoint
        // would get an even share.
        let mut due = [None; 2];
        for (slot, &i) in due.iter_mut().zip(candidates.as_slice()) {
            let last = endpoints.get(i)?.stats().last_picked();
            if last == 0 || now.saturating_sub(last) >= self.probe_after {
                *slot = Some((i, last));
            }
        }
        if let [Some((i, last)), None] | [None, Some((i, last))] = due
            && endpoints.get(i)?.stats().claim_probe(last, now)
        {
            return Some(i);
        }
        let chosen = cheapest(&candidates, TIE_MARGIN, |i| {
            endpoints
                .get(i)
                .map_or(f64::INFINITY, |e| self.cost(table, e, now))
        });
        endpoints.get(chosen)?.stats().picked(now);
        Some(chosen)
    }
}

impl Selector for PeakEwma {
    fn select(&self, endpoints: &[Arc<Endpoint>], _call: &CallInfo<'_>) -> Option<usize> {
        self.select_weighted(endpoints)
    }

    fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Option<Box<dyn Any + Send + Sync>> {
        self.prepare_weighted(endpoints)
    }

    fn select_prepared(&self, set: &Prepared, _call: &CallInfo<'_>) -> Option<usize> {
        self.select_prepared_weighted(set)
    }

    fn report(&self, attempt: &Attempt<'_>) {
        let failed = attempt.outcome.is_failure();
        let (rtt, at) = match attempt.answered {
            Some(rtt) => (rtt, attempt.started + rtt),
            // No answer and no failure: the caller gave up (no sample), or
            // its deadline passed (a sample of the wait, read now: rare).
            None if !failed => match attempt.outcome {
                Outcome::Status(Code::DeadlineExceeded) => {
                    let rtt = attempt.latency();
                    (rtt, attempt.started + rtt)
                }
                _ => return,
            },
            None => (Duration::ZERO, attempt.started),
        };
        let sample = if failed {
            rtt.max(FAILURE_PENALTY)
        } else {
            rtt
        };
        attempt
            .endpoint
            .stats()
            .record_peak_rtt(nanos(sample), nanos_since_epoch(at), self.decay);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use lodestar_core::ServiceKey;

    /// Reports an attempt on `endpoint` that got its answer after `rtt`,
    /// ending with `code`, at the current (paused) time.
    fn report(selector: &PeakEwma, endpoint: &Endpoint, rtt: Duration, code: Code) {
        let service = ServiceKey::new("svc");
        let outcome = Outcome::Status(code);
        selector.report(&Attempt {
            service: &service,
            method: "/svc.Svc/Call",
            endpoint,
            number: 1,
            outcome: &outcome,
            started: Instant::now() - rtt,
            answered: Some(rtt),
            sent: true,
            by_caller: false,
        });
    }

    /// Twenty rounds, 10 ms apart, of one report from the first of four
    /// endpoints (`first`: its latency and code) and one from each other
    /// (`others`), starting 2 s in; the share of picks the first then gets.
    async fn first_after_rounds(seed: u64, first: (u64, Code), others: u64) -> f64 {
        fastrand::seed(seed);
        let selector = PeakEwma::default();
        let endpoints = endpoints(&[100; 4]);
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..20 {
            report(
                &selector,
                &endpoints[0],
                Duration::from_millis(first.0),
                first.1,
            );
            for e in &endpoints[1..] {
                report(&selector, e, Duration::from_millis(others), Code::Ok);
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        share_of_first(&selector, &endpoints, 10_000)
    }

    fn share_of_first(selector: &PeakEwma, endpoints: &[Arc<Endpoint>], picks: usize) -> f64 {
        let counts = shares(selector, endpoints, picks);
        100.0 * counts[0] as f64 / picks as f64
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_endpoint_gets_at_most_five_percent() {
        let share = first_after_rounds(21, (51, Code::Ok), 1).await;
        assert!(share <= 5.0, "the slow endpoint got {share:.2}% of picks");
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_failing_fast_is_not_preferred() {
        let share = first_after_rounds(22, (1, Code::Unavailable), 5).await;
        assert!(
            share <= 5.0,
            "the failing endpoint got {share:.2}% of picks"
        );
        // A request-level error (NOT_FOUND) is an answer like any other.
        let selector = PeakEwma::default();
        let healthy = super::super::testing::endpoints(&[100; 2]);
        report(
            &selector,
            &healthy[0],
            Duration::from_millis(1),
            Code::NotFound,
        );
        report(&selector, &healthy[1], Duration::from_millis(5), Code::Ok);
        assert!(share_of_first(&selector, &healthy, 1_000) > 90.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovered_endpoint_is_probed_once_per_probe_interval() {
        fastrand::seed(23);
        let selector = PeakEwma::default();
        let endpoints = endpoints(&[100; 4]);
        let prepared = Prepared::new(&selector, endpoints.to_vec().into());
        tokio::time::advance(Duration::from_secs(2)).await;
        report(&selector, &endpoints[0], Duration::from_secs(3), Code::Ok);
        for e in &endpoints[1..] {
            report(&selector, e, Duration::from_millis(1), Code::Ok);
        }
        let picks = |n: usize| {
            with_call(&http::HeaderMap::new(), |call| {
                (0..n)
                    .filter(|_| selector.select_prepared(&prepared, call) == Some(0))
                    .count()
            })
        };
        tokio::time::advance(Duration::from_millis(1)).await;
        // Each is probed once (the first time it is drawn), then the slow
        // one no more.
        assert_eq!(picks(1_000), 1);
        assert_eq!(picks(1_000), 0);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(picks(1_000), 0);
        // A second after its last pick, the slow endpoint is probed once.
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(picks(1_000), 1);
        assert_eq!(picks(1_000), 0);
        // It answered fast (1 ms, the others 2 ms): faster samples pull
        // the estimate down over the decay, and it wins again.
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(500)).await;
            report(&selector, &endpoints[0], Duration::from_millis(1), Code::Ok);
            for e in &endpoints[1..] {
                report(&selector, e, Duration::from_millis(2), Code::Ok);
            }
        }
        let share = share_of_first(&selector, &endpoints, 10_000);
        assert!(share > 40.0, "{share:.2}%");
    }

    #[tokio::test(start_paused = true)]
    async fn without_probes_a_slow_endpoint_is_never_picked() {
        fastrand::seed(24);
        let selector = PeakEwma::default().probe_after(Duration::from_secs(3_600));
        let endpoints = endpoints(&[100; 4]);
        report(&selector, &endpoints[0], Duration::from_secs(3), Code::Ok);
        for e in &endpoints[1..] {
            report(&selector, e, Duration::from_millis(1), Code::Ok);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        // Its first draw only: an endpoint never picked is probed.
        assert_eq!(shares(&selector, &endpoints, 10_000)[0], 1);
        assert_eq!(shares(&selector, &endpoints, 10_000)[0], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_raise_the_cost() {
        fastrand::seed(25);
        let selector = PeakEwma::default();
        let endpoints = endpoints(&[100; 2]);
        report(
            &selector,
            &endpoints[0],
            Duration::from_millis(10),
            Code::Ok,
        );
        report(
            &selector,
            &endpoints[1],
            Duration::from_millis(15),
            Code::Ok,
        );
        // 10 ms × (1 + 1) = 20 > 15 ms × 1.
        endpoints[0].stats().started();
        // (Each is probed at its first draw.)
        assert_eq!(shares(&selector, &endpoints, 1_000), [1, 999]);
        endpoints[0].stats().finished();
        assert_eq!(shares(&selector, &endpoints, 1_000), [1_000, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn costs_within_a_fifth_are_ties_and_beyond_are_not() {
        fastrand::seed(26);
        let selector = PeakEwma::default();
        let endpoints = endpoints(&[100; 2]);
        let rtt = |ms: u64| Duration::from_micros(ms);
        report(&selector, &endpoints[0], rtt(2_000), Code::Ok);
        report(&selector, &endpoints[1], rtt(2_300), Code::Ok);
        // 15% apart: noise, shared about evenly.
        let counts = shares(&selector, &endpoints, 10_000);
        let (a, b) = (counts[0], counts[1]);
        assert!((4_700..=5_300).contains(&a) && a + b == 10_000, "{a} / {b}");
        // 30% apart: the cheaper takes (almost) every call.
        report(&selector, &endpoints[1], rtt(2_600), Code::Ok);
        let counts = shares(&selector, &endpoints, 10_000);
        assert!(counts[0] >= 9_990, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn with_too_little_traffic_to_probe_costs_still_decide() {
        fastrand::seed(27);
        let selector = PeakEwma::default();
        let endpoints = endpoints(&[100; 2]);
        report(
            &selector,
            &endpoints[0],
            Duration::from_millis(50),
            Code::Ok,
        );
        report(&selector, &endpoints[1], Duration::from_millis(1), Code::Ok);
        let prepared = Prepared::new(&selector, endpoints.clone().into());
        let mut slow = 0;
        for _ in 0..40 {
            // Both are due for a probe at every pick.
            tokio::time::advance(Duration::from_millis(1_500)).await;
            let picked = with_call(&http::HeaderMap::new(), |call| {
                selector.select_prepared(&prepared, call)
            });
            slow += usize::from(picked == Some(0));
        }
        assert_eq!(slow, 0, "the slow endpoint got {slow} of 40 picks");
    }
}

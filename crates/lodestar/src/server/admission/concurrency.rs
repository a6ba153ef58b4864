//! Concurrency limits: calls in flight per policy entry, counted from
//! admission to the call's final status, against a fixed limit or an
//! adaptive one.
//!
//! **The adaptive limit** estimates how many calls the handlers can have in
//! flight before they queue, as BBR does for a network path: by Little's
//! law, the largest throughput seen × the lowest latency seen. Both come
//! from a sliding window of 100 buckets (each: calls ended, their total
//! latency): the throughput is the busiest bucket's, the latency the
//! lowest bucket average (an average, not the lowest call, so that one
//! lucky call does not make it shed). The estimate is recomputed as each
//! bucket ends. A latency estimator alone would only see queueing once it
//! is there, and a throughput × latency estimate alone sheds normal
//! bursts at light load (it is the *average* in flight); so the limit is
//! twice the estimate while the last bucket's average latency is within
//! `tolerance` × the lowest, and the estimate itself while it is above
//! (calls are queueing), until `cooldown_ms` after the last such bucket.
//! Under overload the limit thus settles where the handlers are busy but
//! not queueing; the lowest latency stays a no-queue latency, because the
//! limit keeps the queue away (the failure mode of estimators whose
//! baseline latency drifts up with the queue). For the same reason there is
//! no room for a queue on top of the estimate (Envoy's √limit): it would
//! raise the lowest latency, the estimate with it, and so on. The price:
//! at exactly the capacity, calls arriving in a burst beyond it are shed.
//! The first bucket of calls after a quiet window saw only part of their
//! throughput and does not count as the busiest; until a whole bucket has
//! been seen, the limit stays (`initial` at first).
//!
//! Calls refused are never samples (their latency says nothing about the
//! handlers); calls the client cancelled neither. A call whose deadline
//! passed is one (it waited that long). A stream's sample is its whole
//! life: adaptive limits suit unary calls and short streams; give
//! long-lived streams a fixed limit.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use super::settings::{Adaptive, Concurrency};
use crate::server::CallOutcome;

/// The buckets of an adaptive limit's window.
const BUCKETS: usize = 100;

/// A call refused for want of room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shed {
    /// Calls in flight when it came.
    pub(crate) in_flight: usize,
    /// The limit then.
    pub(crate) limit: usize,
    /// The latency of the last call that ended (at least 1 ms): about
    /// when trying again makes sense.
    pub(crate) pushback: Duration,
}

/// The concurrency limit of one policy entry, shared by every call it covers.
#[derive(Debug)]
pub(crate) struct ConcurrencyLimiter {
    pub(super) settings: Concurrency,
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    /// The limit observers were last told of.
    reported: AtomicUsize,
    /// The latency of the last call that ended, in ms.
    last_latency_ms: AtomicU64,
    estimator: Option<Mutex<Estimator>>,
}

impl ConcurrencyLimiter {
    pub(crate) fn new(settings: Concurrency) -> Self {
        let (limit, estimator) = match &settings {
            Concurrency::Fixed(n) => (*n as usize, None),
            Concurrency::Adaptive(a) => (a.initial as usize, Some(Mutex::new(Estimator::new(a)))),
        };
        Self {
            settings,
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            reported: AtomicUsize::new(limit),
            last_latency_ms: AtomicU64::new(1),
            estimator,
        }
    }

    /// Whether the limit is adaptive.
    pub(crate) fn is_adaptive(&self) -> bool {
        self.estimator.is_some()
    }

    /// A place for one more call, if there is room.
    pub(crate) fn acquire(self: &Arc<Self>) -> Result<Slot, Shed> {
        let limit = self.limit.load(Ordering::Relaxed);
        let in_flight = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if in_flight >= limit {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            let pushback = self.last_latency_ms.load(Ordering::Relaxed).max(1);
            return Err(Shed {
                in_flight,
                limit,
                pushback: Duration::from_millis(pushback),
            });
        }
        Ok(Slot(self.clone()))
    }

    /// The limit, if it changed since the last time this returned it.
    pub(crate) fn changed_limit(&self) -> Option<usize> {
        let limit = self.limit.load(Ordering::Relaxed);
        (self.reported.swap(limit, Ordering::Relaxed) != limit).then_some(limit)
    }

    /// Calls in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A call ended with `code` after `latency`.
    fn ended(&self, code: Code, latency: Duration) {
        let millis = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.last_latency_ms.store(millis, Ordering::Relaxed);
        let Some(estimator) = &self.estimator else {
            return;
        };
        if code == Code::Cancelled {
            return;
        }
        let mut estimator = estimator.lock().unwrap_or_else(PoisonError::into_inner);
        let limit = estimator.sample(Instant::now(), latency);
        self.limit.store(limit, Ordering::Relaxed);
    }
}

/// A call's place among those in flight: given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<ConcurrencyLimiter>);

impl Slot {
    /// The call ended: its latency is a sample (adaptive limits), and its
    /// place is given back (by the drop).
    pub(crate) fn end(self, outcome: &CallOutcome<'_>) {
        self.0.ended(outcome.code(), outcome.elapsed());
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The adaptive limit's window and arithmetic (times in ns since `epoch`).
#[derive(Debug)]
struct Estimator {
    min: usize,
    max: usize,
    tolerance: f64,
    cooldown: u64,
    epoch: Instant,
    bucket_len: u64,
    buckets: Box<[Bucket]>,
    current: usize,
    /// When the current bucket ends.
    current_end: u64,
    /// Calls count as queueing until then.
    congested_until: u64,
    /// The bucket that took the first calls after a quiet window (or
    /// none yet): it saw only part of their throughput, so it does not
    /// count for the busiest.
    partial: Option<usize>,
    /// No call since the window was last empty.
    quiet: bool,
    limit: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    calls: u64,
    /// Their latencies' sum, in ns.
    total: u64,
}

impl Bucket {
    fn average(self) -> Option<u64> {
        self.total.checked_div(self.calls)
    }
}

impl Estimator {
    fn new(settings: &Adaptive) -> Self {
        let bucket_len = (settings.window_ms.saturating_mul(1_000_000) / BUCKETS as u64).max(1);
        Self {
            min: settings.min as usize,
            max: settings.max as usize,
            tolerance: settings.tolerance,
            cooldown: settings.cooldown_ms.saturating_mul(1_000_000),
            epoch: Instant::now(),
            bucket_len,
            buckets: vec![Bucket::default(); BUCKETS].into_boxed_slice(),
            current: 0,
            current_end: bucket_len,
            congested_until: 0,
            partial: None,
            quiet: true,
            limit: settings.initial as usize,
        }
    }

    /// Records a call that ended at `at` after `latency`; the limit.
    fn sample(&mut self, at: Instant, latency: Duration) -> usize {
        let now = nanos(at.saturating_duration_since(self.epoch));
        self.advance(now);
        if std::mem::take(&mut self.quiet) {
            self.partial = Some(self.current);
        }
        if let Some(bucket) = self.buckets.get_mut(self.current) {
            bucket.calls += 1;
            bucket.total = bucket.total.saturating_add(nanos(latency));
        }
        self.limit
    }

    /// Moves the window to `now`, estimating again if a bucket ended.
    fn advance(&mut self, now: u64) {
        if now < self.current_end {
            return;
        }
        let last = self.buckets.get(self.current).copied().unwrap_or_default();
        let ended = (now - self.current_end) / self.bucket_len + 1;
        if ended >= BUCKETS as u64 {
            // Quiet for a whole window: nothing in it is recent.
            self.buckets.fill(Bucket::default());
            self.partial = None;
            self.quiet = true;
        } else {
            for _ in 0..ended {
                self.current = (self.current + 1) % BUCKETS;
                if let Some(bucket) = self.buckets.get_mut(self.current) {
                    *bucket = Bucket::default();
                }
                if self.partial == Some(self.current) {
                    self.partial = None;
                }
            }
        }
        self.current_end = self
            .current_end
            .saturating_add(ended.saturating_mul(self.bucket_len));
        self.estimate(now, last);
    }

    /// The limit from the window, `last` the bucket that just ended.
    fn estimate(&mut self, now: u64, last: Bucket) {
        let mut busiest = 0;
        let mut lowest = u64::MAX;
        for (i, bucket) in self.buckets.iter().enumerate() {
            if let Some(average) = bucket.average() {
                if self.partial != Some(i) {
                    busiest = busiest.max(bucket.calls);
                }
                lowest = lowest.min(average);
            }
        }
        if busiest == 0 {
            return; // no whole bucket of calls in the window: the limit stays
        }
        // Little's law: calls in flight at the best throughput and the
        // best latency seen.
        let estimate =
            (u128::from(busiest) * u128::from(lowest)).div_ceil(u128::from(self.bucket_len));
        let estimate = usize::try_from(estimate).unwrap_or(usize::MAX);
        if last
            .average()
            .is_some_and(|average| average as f64 > self.tolerance * lowest as f64)
        {
            self.congested_until = now.saturating_add(self.cooldown);
        }
        // No room for a queue while queueing: a queue would raise the
        // lowest latency seen, and the estimate with it.
        let limit = if now < self.congested_until {
            estimate
        } else {
            estimate.saturating_mul(2)
        };
        self.limit = limit.clamp(self.min, self.max);
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive(toml: &str) -> Estimator {
        let settings: Adaptive = crate::policy_data::from_toml(toml).unwrap();
        Estimator::new(&settings)
    }

    /// Handlers with `workers` workers taking `service` each, offered
    /// `per_second` calls, evenly, for `seconds`, admitted up to the
    /// estimator's limit (paused time: each call's latency is computed
    /// from the queue it finds). Returns the calls admitted and the
    /// highest latency of those admitted in the last second.
    async fn run(
        estimator: &mut Estimator,
        workers: usize,
        service: Duration,
        per_second: u32,
        seconds: u32,
    ) -> (usize, usize, Duration) {
        let gap = Duration::from_secs(1) / per_second;
        // When each worker is next free, and the calls in flight (their ends).
        let mut free = vec![Instant::now(); workers];
        let mut ends: Vec<(Instant, Duration)> = Vec::new();
        let (mut admitted, mut shed, mut worst) = (0, 0, Duration::ZERO);
        let start = Instant::now();
        for _ in 0..per_second * seconds {
            let now = Instant::now();
            ends.sort();
            let (done, waiting): (Vec<_>, Vec<_>) =
                ends.into_iter().partition(|(end, _)| *end <= now);
            for (end, latency) in done {
                estimator.sample(end, latency);
            }
            ends = waiting;
            if ends.len() >= estimator.limit {
                shed += 1;
            } else {
                admitted += 1;
                // FIFO: the worker free first takes it.
                let worker = free.iter_mut().min().unwrap();
                let begin = (*worker).max(now);
                *worker = begin + service;
                let latency = *worker - now;
                ends.push((*worker, latency));
                if now.duration_since(start) >= Duration::from_secs(u64::from(seconds) - 1) {
                    worst = worst.max(latency);
                }
            }
            tokio::time::advance(gap).await;
        }
        (admitted, shed, worst)
    }

    #[tokio::test(start_paused = true)]
    async fn settles_where_the_handlers_are_busy_but_not_queueing() {
        // 8 workers × 10 ms: 800 calls/s.
        let mut estimator = adaptive("window_ms = 2000");
        let service = Duration::from_millis(10);
        let (_, shed, _) = run(&mut estimator, 8, service, 400, 3).await;
        assert_eq!(shed, 0, "half the capacity: nothing shed");
        let (admitted, _, worst) = run(&mut estimator, 8, service, 3_200, 4).await;
        // 4× overload: at least 80% of 800/s goes through, and the calls
        // admitted wait at most about one service time in the queue.
        assert!(admitted >= 4 * 640, "admitted {admitted}");
        assert!(worst <= service * 3, "worst latency {worst:?}");
        // Back to half: shedding stops once the cooldown is over.
        let _ = run(&mut estimator, 8, service, 400, 1).await;
        let (_, shed, _) = run(&mut estimator, 8, service, 400, 2).await;
        assert_eq!(shed, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_stays_within_its_bounds_and_keeps_it_without_samples() {
        let mut estimator = adaptive("min = 3\nmax = 7\ninitial = 5\nwindow_ms = 100");
        assert_eq!(estimator.limit, 5);
        let start = Instant::now();
        // 1 call per ms at 100 ms: an estimate of 100, held at the max.
        for ms in 0..50 {
            estimator.sample(
                start + Duration::from_millis(ms),
                Duration::from_millis(100),
            );
        }
        estimator.sample(
            start + Duration::from_millis(60),
            Duration::from_millis(100),
        );
        assert_eq!(estimator.limit, 7);
        // After a quiet window, fast calls now and then. The first bucket
        // with calls saw only part of their throughput: no estimate from
        // it alone.
        let fast = Duration::from_micros(10);
        estimator.sample(start + Duration::from_secs(5), fast);
        estimator.sample(start + Duration::from_millis(5_001), fast);
        assert_eq!(estimator.limit, 7);
        // From a whole bucket: the estimate drops to the min.
        estimator.sample(start + Duration::from_millis(5_002), fast);
        assert_eq!(estimator.limit, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_given_back_when_dropped() {
        let limiter = Arc::new(ConcurrencyLimiter::new(Concurrency::Fixed(2)));
        let a = limiter.acquire().unwrap();
        let _b = limiter.acquire().unwrap();
        let shed = limiter.acquire().unwrap_err();
        assert_eq!((shed.in_flight, shed.limit), (2, 2));
        drop(a);
        assert_eq!(limiter.in_flight(), 1);
        assert!(limiter.acquire().is_ok());
        assert_eq!(limiter.in_flight(), 1);
    }
}

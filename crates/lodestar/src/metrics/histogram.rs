//! [`DurationHistogram`]: a histogram of durations counted with relaxed
//! atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use super::DURATION_BUCKETS;

/// The bucket bounds in nanoseconds, compared as integers.
const BOUNDS_NANOS: [u64; DURATION_BUCKETS.len()] = {
    let mut nanos = [0; DURATION_BUCKETS.len()];
    let mut i = 0;
    while i < nanos.len() {
        nanos[i] = (DURATION_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

/// A histogram of durations in the [`DURATION_BUCKETS`], encoded in
/// seconds. Observing one takes no lock: three relaxed atomic additions
/// (its bucket, the count, the sum in nanoseconds). prometheus-client's
/// own histogram takes a lock per observation, which every call of a busy
/// method would share.
///
/// It is what lodestar's call metrics are made of; it encodes as a
/// histogram (`EncodeMetric`), so a collector of one's own can encode it.
///
/// ```
/// use std::time::Duration;
/// use lodestar::metrics::DurationHistogram;
///
/// let latency = DurationHistogram::default();
/// latency.observe(Duration::from_millis(30));
/// latency.observe(Duration::from_secs(20)); // above every bucket: +Inf
/// assert_eq!(latency.count(), 2);
/// assert!((latency.sum_seconds() - 20.03).abs() < 1e-9);
/// ```
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// One per bound, then one for longer durations (`+Inf`).
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    /// Counts one `duration`.
    #[inline]
    pub fn observe(&self, duration: Duration) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NANOS.partition_point(|bound| *bound < nanos);
        if let Some(bucket) = self.buckets.get(bucket) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The sum of the durations counted, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Each bucket's upper bound (seconds; the last `+Inf`) and its own
    /// count (not cumulative), as prometheus-client encodes them.
    pub(crate) fn buckets(&self) -> [(f64, u64); DURATION_BUCKETS.len() + 1] {
        let mut out = [(f64::INFINITY, 0); DURATION_BUCKETS.len() + 1];
        for (i, (slot, count)) in out.iter_mut().zip(&self.buckets).enumerate() {
            slot.0 = DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            slot.1 = count.load(Ordering::Relaxed);
        }
        out
    }

    /// Adds this histogram's counts to `into` (same bounds).
    pub(crate) fn add_to(&self, into: &mut [(f64, u64); DURATION_BUCKETS.len() + 1]) {
        for (slot, count) in into.iter_mut().zip(&self.buckets) {
            slot.1 += count.load(Ordering::Relaxed);
        }
    }

    /// Encodes `buckets` (as [`buckets`](Self::buckets) gives them), with
    /// their `count` and `sum`.
    pub(crate) fn encode_buckets(
        encoder: &mut MetricEncoder<'_>,
        sum: f64,
        count: u64,
        buckets: &[(f64, u64)],
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let buckets = self.buckets();
        // The count after the buckets: a scrape never sees more in the
        // buckets than in the count.
        let count = buckets.iter().map(|(_, n)| n).sum();
        Self::encode_buckets(&mut encoder, self.sum_seconds(), count, &buckets)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_lands_in_the_first_bucket_whose_bound_is_not_below_it() {
        let histogram = DurationHistogram::default();
        histogram.observe(Duration::from_millis(5)); // on the bound: le=0.005
        histogram.observe(Duration::from_micros(5001)); // just over: le=0.01
        histogram.observe(Duration::from_secs(11)); // +Inf
        let buckets = histogram.buckets();
        assert_eq!(buckets[0], (0.005, 1));
        assert_eq!(buckets[1], (0.01, 1));
        assert_eq!(buckets[14], (f64::INFINITY, 1));
        assert_eq!(histogram.count(), 3);
        assert!((histogram.sum_seconds() - 11.010001).abs() < 1e-9);
    }
}

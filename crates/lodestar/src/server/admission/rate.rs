//! Rate limits: a token bucket per policy entry, or per caller.
//!
//! A bucket is one number, GCRA's *theoretical arrival time* (TAT): the
//! time at which the bucket would be full again. A call at `now` passes if
//! `TAT ≤ now + (burst − 1) × interval` and moves it to
//! `max(TAT, now) + interval` (`interval` = 1 / rate); otherwise it waits
//! for `TAT − (burst − 1) × interval − now`, which is the pushback a
//! refused call is given. The same arithmetic as a token bucket that
//! starts full, in one word: the shared bucket is an atomic, updated with
//! compare-and-swap (no lock).
//!
//! Callers' own buckets live in 16 shards, each a short lock over a map
//! of at most `max_keys / 16` (rounded up) keys. A bucket whose TAT has
//! passed is full: forgetting it loses nothing, so a full shard drops all
//! of those (at most 8 times per time a bucket takes to fill up), and a
//! caller that still finds no room uses the shared bucket.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::time::Instant;

use super::settings::{MAX_KEY_LEN, RateLimit};

/// How many locks callers' buckets are spread over.
const SHARDS: usize = 16;

/// One bucket's arithmetic, in nanoseconds since the limiter's epoch.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Between two tokens.
    interval: u64,
    /// `(burst − 1) × interval`: how far ahead of now the TAT may be.
    tolerance: u64,
}

impl Gcra {
    fn new(limit: &RateLimit) -> Self {
        // Validated: 0 < per_second ≤ 1e9, so at least 1 ns (saturating
        // for the slowest rates).
        let interval = (1e9 / limit.per_second).round().max(1.0) as u64;
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(limit.burst.max(1)) - 1),
        }
    }

    /// Takes a token at `now` from a bucket at `tat`: its next TAT, or the
    /// nanoseconds until a token.
    fn take(self, tat: u64, now: u64) -> Result<u64, u64> {
        let latest = now.saturating_add(self.tolerance);
        if tat > latest {
            return Err(tat - latest);
        }
        Ok(tat.max(now).saturating_add(self.interval))
    }

    /// Takes a token from the bucket in `state`.
    fn take_atomic(self, state: &AtomicU64, now: u64) -> Result<(), u64> {
        let mut tat = state.load(Ordering::Relaxed);
        loop {
            let next = self.take(tat, now)?;
            match state.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }
}

/// A call refused by a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Until the bucket has a token.
    pub(crate) wait: Duration,
    /// Whether it was the caller's own bucket (rather than the shared one).
    pub(crate) own_bucket: bool,
}

/// The rate limit of one policy entry, shared by every call it covers.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    pub(super) settings: RateLimit,
    gcra: Gcra,
    epoch: Instant,
    /// The TAT of the bucket every call without a bucket of its own shares.
    shared: AtomicU64,
    keyed: Option<Keyed>,
}

impl RateLimiter {
    pub(crate) fn new(settings: RateLimit) -> Self {
        let gcra = Gcra::new(&settings);
        let keyed = settings.key.as_deref().and_then(|key| {
            let header = HeaderName::from_bytes(key.as_bytes()).ok()?;
            // Time for an empty bucket to fill; a full shard sweeps at
            // most 8 times in it (and at most once a millisecond).
            let refill = gcra.interval.saturating_mul(u64::from(settings.burst));
            Some(Keyed {
                header,
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                per_shard: (settings.max_keys as usize).div_ceil(SHARDS),
                hasher: RandomState::new(),
                sweep_every: (refill / 8).max(1_000_000),
            })
        });
        Self {
            settings,
            gcra,
            epoch: Instant::now(),
            shared: AtomicU64::new(0),
            keyed,
        }
    }

    /// The metadata key naming callers, if the limit is per caller.
    pub(crate) fn key(&self) -> Option<&HeaderName> {
        self.keyed.as_ref().map(|k| &k.header)
    }

    /// Takes a token for a call with `headers`, now.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let now = Instant::now().saturating_duration_since(self.epoch);
        let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let own = self.keyed.as_ref().and_then(|keyed| {
            let key = headers.get(&keyed.header)?.as_bytes();
            (key.len() <= MAX_KEY_LEN)
                .then(|| keyed.take(self.gcra, key, now))
                .flatten()
        });
        let (taken, own_bucket) = match own {
            Some(taken) => (taken, true),
            None => (self.gcra.take_atomic(&self.shared, now), false),
        };
        taken.map_err(|wait| Refused {
            wait: Duration::from_nanos(wait),
            own_bucket,
        })
    }

    /// How many callers have a bucket of their own now.
    #[cfg(test)]
    pub(crate) fn keys(&self) -> usize {
        self.keyed.as_ref().map_or(0, |keyed| {
            keyed
                .shards
                .iter()
                .map(|s| {
                    s.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .buckets
                        .len()
                })
                .sum()
        })
    }
}

/// Callers' own buckets.
#[derive(Debug)]
struct Keyed {
    header: HeaderName,
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: RandomState,
    /// The least time between two sweeps of a full shard.
    sweep_every: u64,
}

#[derive(Debug, Default)]
struct Shard {
    /// Each caller's TAT.
    buckets: HashMap<Box<[u8]>, u64>,
    /// No sweep before this.
    next_sweep: u64,
}

impl Keyed {
    /// Takes a token from `key`'s bucket: `None` if it has none and there
    /// is no room for one.
    fn take(&self, gcra: Gcra, key: &[u8], now: u64) -> Option<Result<(), u64>> {
        let index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        let mut shard = self
            .shards
            .get(index)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tat) = shard.buckets.get_mut(key) {
            return Some(gcra.take(*tat, now).map(|next| *tat = next));
        }
        if shard.buckets.len() >= self.per_shard {
            if now < shard.next_sweep {
                return None;
            }
            // Full buckets hold nothing a new one would not.
            shard.buckets.retain(|_, tat| *tat > now);
            shard.next_sweep = now.saturating_add(self.sweep_every);
            if shard.buckets.len() >= self.per_shard {
                return None;
            }
        }
        // A new bucket is full: the call passes.
        let next = gcra.take(0, now).ok()?;
        shard.buckets.insert(key.into(), next);
        Some(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(toml: &str) -> RateLimiter {
        RateLimiter::new(crate::policy_data::from_toml(toml).unwrap())
    }

    fn caller(name: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-caller", name.parse().unwrap());
        headers
    }

    /// Offers `per_second` calls a second for `seconds`, evenly; counts
    /// those admitted.
    async fn offer(
        limiter: &RateLimiter,
        headers: &HeaderMap,
        per_second: u64,
        seconds: u64,
    ) -> u64 {
        let gap = Duration::from_secs(1) / u32::try_from(per_second).unwrap();
        let mut admitted = 0;
        for _ in 0..per_second * seconds {
            admitted += u64::from(limiter.check(headers).is_ok());
            tokio::time::advance(gap).await;
        }
        admitted
    }

    #[tokio::test(start_paused = true)]
    async fn admits_the_burst_then_the_rate_exactly() {
        let limiter = limiter("per_second = 100\nburst = 10");
        let admitted = offer(&limiter, &HeaderMap::new(), 500, 5).await;
        // The burst, then one every 10 ms: at 10 ms, 20 ms, … 4,990 ms.
        assert_eq!(admitted, 10 + 499);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_says_when_the_next_token_comes() {
        let limiter = limiter("per_second = 10\nburst = 2");
        let none = HeaderMap::new();
        assert!(limiter.check(&none).is_ok());
        assert!(limiter.check(&none).is_ok());
        let refused = limiter.check(&none).unwrap_err();
        assert_eq!(refused.wait, Duration::from_millis(100));
        assert!(!refused.own_bucket);
        tokio::time::advance(Duration::from_millis(40)).await;
        assert_eq!(
            limiter.check(&none).unwrap_err().wait,
            Duration::from_millis(60)
        );
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(limiter.check(&none).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn each_caller_has_a_bucket_and_the_rest_share_one() {
        let limiter = limiter("per_second = 1\nburst = 3\nkey = \"x-caller\"");
        for name in ["a", "b"] {
            for _ in 0..3 {
                assert!(limiter.check(&caller(name)).is_ok(), "{name}");
            }
            let refused = limiter.check(&caller(name)).unwrap_err();
            assert!(refused.own_bucket);
        }
        // Calls without the key share a bucket of their own.
        for _ in 0..3 {
            assert!(limiter.check(&HeaderMap::new()).is_ok());
        }
        assert!(!limiter.check(&HeaderMap::new()).unwrap_err().own_bucket);
        assert_eq!(limiter.keys(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn random_keys_cannot_grow_the_map_beyond_its_cap() {
        let limiter = limiter("per_second = 1\nburst = 2\nkey = \"x-caller\"\nmax_keys = 64");
        for n in 0..10_000 {
            let _ = limiter.check(&caller(&format!("attacker-{n}")));
        }
        // 16 shards of at most 4: never more than 64 keys.
        assert!(limiter.keys() <= 64, "{} keys", limiter.keys());
        // Those without room shared one bucket: 2 calls passed there.
        // Once the buckets have filled up again, they are forgotten and a
        // new caller gets its own.
        tokio::time::advance(Duration::from_secs(3)).await;
        for _ in 0..2 {
            assert!(limiter.check(&caller("late")).is_ok());
        }
        assert!(limiter.check(&caller("late")).unwrap_err().own_bucket);
        assert!(limiter.keys() <= 64);
    }

    #[tokio::test(start_paused = true)]
    async fn long_keys_share_the_shared_bucket() {
        let limiter = limiter("per_second = 1\nburst = 1\nkey = \"x-caller\"");
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(limiter.check(&caller(&long)).is_ok());
        assert!(!limiter.check(&caller(&long)).unwrap_err().own_bucket);
        assert_eq!(limiter.keys(), 0);
    }
}

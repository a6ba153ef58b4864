//! Consistent hashing on a ring: one key, one endpoint.

use std::any::Any;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::HeaderName;
use http::header::InvalidHeaderName;

use super::{WeightTable, weight};
use crate::client::selector::{CallInfo, Endpoint, Prepared, Selector};

/// Virtual nodes of the lightest endpoint of a ring: 1,024; each other
/// endpoint gets as many more as its weight is heavier.
pub const VNODES_PER_ENDPOINT: u64 = 1_024;

/// The most virtual nodes a ring holds: 262,144 (3 MiB, built in a few
/// milliseconds). A larger ring halves every endpoint's virtual nodes
/// (keeping at least one) until it fits: 100 endpoints of equal weight keep
/// their 1,024 each; 1,000 get 256 and 10,000 get 16 (keys then spread less
/// evenly). A selection holds one ring per group its policy routes to, so
/// a policy of many routes and subsets multiplies this.
pub const MAX_RING: u64 = 1 << 18;

/// Consistent hashing of a key taken from the call's metadata onto a ring
/// of virtual nodes (Karger et al., as Envoy's and gRPC's `ring_hash`).
///
/// - **The ring.** Each endpoint owns [`VNODES_PER_ENDPOINT`] × its weight
///   ÷ the lightest weight of the set points, placed by hashing its
///   instance id, so a point never moves while its endpoint stays: adding
///   or removing an endpoint moves only the keys it gains or had (unless
///   the lightest weight changes, or the ring passes [`MAX_RING`]).
/// - **The key** is the value of the configured header. A call without it
///   goes to a random endpoint, in proportion to weight (as gRPC's ring
///   hash does); hash on a header every call carries to avoid that.
/// - **The hash** is FNV-1a 64 finished with the SplitMix64 mixer: fixed
///   constants, so every client process and release maps a key alike (std's
///   `DefaultHasher` promises neither).
/// - **Endpoints missing from a pick** (already tried by the call, or
///   ejected): the key goes to the next endpoint clockwise that may be
///   used, so an ejected endpoint's keys move to its successors and come
///   back when it does.
/// - **Bounded load** (optional, [`bounded_load`](Self::bounded_load)):
///   an endpoint whose calls in flight would pass `percent` / 100 × the
///   average (counting the call being placed) is skipped, clockwise. It
///   sums the calls in flight of every endpoint on each pick: O(n).
///
/// A pick is a binary search of the prepared ring: O(log n). The selector
/// keeps the last ring it prepared, to walk for picks among endpoints that
/// were not prepared; if none of them is on it, it builds a ring for them.
#[derive(Debug)]
pub struct RingHash {
    header: Option<HeaderName>,
    bounded_load_percent: Option<u32>,
    /// The last ring prepared, for [`Selector::select`].
    last: ArcSwapOption<Ring>,
}

impl Clone for RingHash {
    /// The same settings, with no ring yet: each channel prepares its own.
    fn clone(&self) -> Self {
        Self {
            header: self.header.clone(),
            bounded_load_percent: self.bounded_load_percent,
            last: ArcSwapOption::empty(),
        }
    }
}

impl RingHash {
    /// Hashes on the value of the metadata (header) `header`. Fails if it
    /// is not a valid header name.
    pub fn new(header: &str) -> Result<Self, InvalidHeaderName> {
        let header = HeaderName::from_bytes(header.as_bytes())?;
        Ok(Self {
            header: Some(header),
            ..Self::keyless()
        })
    }

    /// A ring with no key: every call goes to a random endpoint.
    pub(crate) fn keyless() -> Self {
        Self {
            header: None,
            bounded_load_percent: None,
            last: ArcSwapOption::empty(),
        }
    }

    /// Skips endpoints with more than `percent` / 100 of the average calls
    /// in flight (e.g. 125; at least 100, and a policy may set 101 to
    /// 1,000). Default: none.
    pub fn bounded_load(mut self, percent: Option<u32>) -> Self {
        self.bounded_load_percent = percent.map(|p| p.max(100));
        self
    }

    fn key(&self, call: &CallInfo<'_>) -> Option<u64> {
        let value = call.headers.get(self.header.as_ref()?)?;
        Some(hash(value.as_bytes()))
    }

    /// Whether an endpoint with `in_flight` calls may take one more, out
    /// of `total` calls in flight over `count` endpoints.
    fn fits(&self, in_flight: usize, total: usize, count: usize) -> bool {
        match self.bounded_load_percent {
            None => true,
            Some(percent) => {
                let cap = (u128::from(percent) * (total as u128 + 1)).div_ceil(100 * count as u128);
                (in_flight as u128) < cap
            }
        }
    }

    fn total_in_flight(&self, endpoints: &[Arc<Endpoint>]) -> usize {
        match self.bounded_load_percent {
            None => 0,
            Some(_) => endpoints.iter().map(|e| e.stats().in_flight()).sum(),
        }
    }
}

/// Virtual nodes sorted by hash, and who owns each.
#[derive(Debug)]
pub(crate) struct Ring {
    hashes: Box<[u64]>,
    /// Indices into `endpoints`.
    owners: Box<[u32]>,
    endpoints: Box<[Arc<Endpoint>]>,
}

impl Ring {
    fn new(endpoints: &[Arc<Endpoint>]) -> Self {
        let lightest = endpoints.iter().map(|e| weight(e)).min().unwrap_or(1);
        let base: Vec<u64> = endpoints
            .iter()
            .map(|e| (u64::from(weight(e)) * VNODES_PER_ENDPOINT).div_ceil(u64::from(lightest)))
            .collect();
        let fits = |shift: u32| base.iter().map(|b| (b >> shift).max(1)).sum::<u64>() <= MAX_RING;
        let shift = (0..64).find(|&s| fits(s)).unwrap_or(63);
        let mut points: Vec<(u64, u32)> = Vec::new();
        for (i, (endpoint, base)) in endpoints.iter().zip(&base).enumerate() {
            let id = fnv1a(endpoint.instance().id.as_bytes());
            let count = (base >> shift).max(1);
            points.extend((0..count).map(|j| {
                let point = mix(id.wrapping_add(j.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
                (point, i as u32)
            }));
        }
        points.sort_unstable();
        Self {
            hashes: points.iter().map(|p| p.0).collect(),
            owners: points.iter().map(|p| p.1).collect(),
            endpoints: endpoints.into(),
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.hashes)
            + std::mem::size_of_val(&*self.owners)
            + std::mem::size_of_val(&*self.endpoints)
    }

    /// The first point at or clockwise after `key`.
    fn position(&self, key: u64) -> usize {
        let at = self.hashes.partition_point(|&h| h < key);
        if at == self.hashes.len() { 0 } else { at }
    }

    /// The owners of the points from `start` clockwise, once round.
    fn clockwise(&self, start: usize) -> impl Iterator<Item = usize> + '_ {
        let (before, after) = self.owners.split_at(start.min(self.owners.len()));
        after.iter().chain(before).map(|&o| o as usize)
    }

    /// The endpoint for `key` (random without one), skipping those that
    /// `usable` refuses, clockwise; the first found if all are refused.
    fn pick(&self, key: Option<u64>, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        let start = match key {
            Some(key) => self.position(key),
            None => fastrand::usize(..self.hashes.len()),
        };
        let first = self.owners[start] as usize;
        Some(self.clockwise(start).find(|&o| usable(o)).unwrap_or(first))
    }
}

impl Selector for RingHash {
    fn select(&self, endpoints: &[Arc<Endpoint>], call: &CallInfo<'_>) -> Option<usize> {
        let key = self.key(call);
        if key.is_none() {
            return Some(WeightTable::new(endpoints).sample());
        }
        let total = self.total_in_flight(endpoints);
        let fits = |e: &Endpoint| self.fits(e.stats().in_flight(), total, endpoints.len());
        // The slice is ordered by instance id.
        let find = |e: &Endpoint| {
            endpoints
                .binary_search_by(|x| x.instance().id.as_str().cmp(&e.instance().id))
                .ok()
        };
        if let Some(ring) = self.last.load_full() {
            let mut found = None;
            let walked = ring.pick(key, |o| {
                let Some(i) = find(&ring.endpoints[o]) else {
                    return false;
                };
                found.get_or_insert(i);
                fits(&endpoints[i])
            });
            if let Some(i) = walked.and_then(|o| find(&ring.endpoints[o])) {
                return Some(i);
            }
            if found.is_some() {
                return found;
            }
        }
        // None of them is on the last ring prepared: one for them.
        let ring = Ring::new(endpoints);
        ring.pick(key, |o| fits(&endpoints[o]))
    }

    fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Option<Box<dyn Any + Send + Sync>> {
        let ring = Arc::new(Ring::new(endpoints));
        self.last.store(Some(ring.clone()));
        Some(Box::new(ring))
    }

    fn select_prepared(&self, set: &Prepared, call: &CallInfo<'_>) -> Option<usize> {
        let Some(ring) = set.state::<Arc<Ring>>() else {
            return self.select(set.endpoints(), call);
        };
        let endpoints = set.endpoints();
        let total = self.total_in_flight(endpoints);
        ring.pick(self.key(call), |o| {
            self.bounded_load_percent.is_none()
                || endpoints
                    .get(o)
                    .is_some_and(|e| self.fits(e.stats().in_flight(), total, endpoints.len()))
        })
    }
}

/// FNV-1a, 64 bits, finished with [`mix`]: the same in every process and
/// release (std's `DefaultHasher` promises neither), for keys that must
/// land alike in every client (ring keys, sticky split keys).
pub(crate) fn hash(bytes: &[u8]) -> u64 {
    mix(fnv1a(bytes))
}

/// FNV-1a, 64 bits (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The SplitMix64 finaliser: every input bit moves every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn ring() -> RingHash {
        RingHash::new("x-user").expect("a valid header")
    }

    fn headers(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-user",
            HeaderValue::from_str(key).expect("a header value"),
        );
        headers
    }

    /// The instance id each key goes to, picking among all of `endpoints`.
    fn owners(selector: &RingHash, endpoints: &[Arc<Endpoint>], keys: &[String]) -> Vec<String> {
        let prepared = Prepared::new(selector, endpoints.to_vec().into());
        keys.iter()
            .map(|key| {
                with_call(&headers(key), |call| {
                    let i = selector.select_prepared(&prepared, call).expect("a pick");
                    endpoints[i].instance().id.clone()
                })
            })
            .collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|_| format!("user-{}", fastrand::u64(..)))
            .collect()
    }

    #[test]
    fn the_hash_is_stable() {
        // Fixed values: a change here remaps every key of every client.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(mix(0), 0);
        assert_eq!(mix(1), 0x5692_161d_100b_05e5);
        assert_eq!(hash(b"user-1"), 0xc499_b5f8_a721_df58);
        assert_ne!(hash(b"user-1"), hash(b"user-2"));
    }

    #[test]
    fn random_keys_spread_evenly_and_by_weight() {
        fastrand::seed(31);
        let keys = keys(50_000);
        for (weights, expected) in [
            (vec![100; 5], vec![20.0; 5]),
            (vec![1, 2, 7], vec![10.0, 20.0, 70.0]),
        ] {
            let endpoints = endpoints(&weights);
            let owned = owners(&ring(), &endpoints, &keys);
            let counts: Vec<usize> = endpoints
                .iter()
                .map(|e| owned.iter().filter(|o| **o == e.instance().id).count())
                .collect();
            assert_shares(&counts, &expected, 1.5);
        }
    }

    #[test]
    fn a_key_always_lands_on_the_same_endpoint() {
        fastrand::seed(32);
        let endpoints = endpoints(&[100; 5]);
        let keys = keys(1_000);
        let first = owners(&ring(), &endpoints, &keys);
        // Again, by another client (another selector, another prepare).
        assert_eq!(owners(&ring(), &endpoints, &keys), first);
        assert_eq!(owners(&ring().clone(), &endpoints, &keys), first);
    }

    #[test]
    fn removing_one_of_five_moves_only_its_keys() {
        fastrand::seed(33);
        let all = endpoints(&[100; 5]);
        let keys = keys(10_000);
        let before = owners(&ring(), &all, &keys);
        let rest: Vec<_> = all
            .iter()
            .filter(|e| e.instance().id != "e00002")
            .cloned()
            .collect();
        let after = owners(&ring(), &rest, &keys);
        let moved: Vec<usize> = (0..keys.len()).filter(|&i| before[i] != after[i]).collect();
        assert!(moved.len() <= 2_500, "{} keys of 10,000 moved", moved.len());
        assert!(moved.iter().all(|&i| before[i] == "e00002"));
        assert_eq!(
            moved.len(),
            before.iter().filter(|o| *o == "e00002").count()
        );
    }

    #[test]
    fn a_missing_endpoints_keys_go_to_its_clockwise_successor() {
        fastrand::seed(34);
        let all = endpoints(&[100; 5]);
        let selector = ring();
        let keys = keys(2_000);
        let on_all = owners(&selector, &all, &keys);
        let slice: Vec<_> = all
            .iter()
            .filter(|e| e.instance().id != "e00001")
            .cloned()
            .collect();
        // What a ring of the four would say: the successor on the ring.
        let successors = owners(&ring(), &slice, &keys);
        // `select` over the slice (a retry, an ejection) walks the
        // prepared ring of five.
        let _ = Prepared::new(&selector, all.clone().into());
        for (i, key) in keys.iter().enumerate() {
            let picked = with_call(&headers(key), |call| selector.select(&slice, call))
                .map(|i| slice[i].instance().id.clone());
            assert_eq!(picked.as_ref(), Some(&successors[i]));
            if on_all[i] != "e00001" {
                assert_eq!(picked.as_ref(), Some(&on_all[i]));
            }
        }
        // Without a prepared ring, the same answer.
        let fresh = ring();
        for (i, key) in keys.iter().enumerate().take(200) {
            let picked = with_call(&headers(key), |call| fresh.select(&slice, call));
            assert_eq!(
                picked.map(|i| slice[i].instance().id.clone()),
                Some(successors[i].clone())
            );
        }
    }

    #[test]
    fn calls_without_a_key_go_anywhere() {
        fastrand::seed(35);
        let counts = shares(&ring(), &endpoints(&[100; 5]), 50_000);
        assert_shares(&counts, &[20.0; 5], 1.5);
    }

    #[test]
    fn bounded_load_skips_an_overloaded_endpoint_clockwise() {
        fastrand::seed(36);
        let endpoints = endpoints(&[100; 5]);
        let selector = ring().bounded_load(Some(125));
        let key = "hot".to_owned();
        let home = owners(&selector, &endpoints, std::slice::from_ref(&key))[0].clone();
        let home_index = endpoints
            .iter()
            .position(|e| e.instance().id == home)
            .expect("home");
        // 4 in flight on its home, none elsewhere: the cap is
        // ceil(1.25 × 5 / 5) = 2, so the key moves on.
        for _ in 0..4 {
            endpoints[home_index].stats().started();
        }
        let moved = owners(&selector, &endpoints, std::slice::from_ref(&key))[0].clone();
        assert_ne!(moved, home);
        let unbounded = owners(&ring(), &endpoints, std::slice::from_ref(&key))[0].clone();
        assert_eq!(unbounded, home);
    }
}

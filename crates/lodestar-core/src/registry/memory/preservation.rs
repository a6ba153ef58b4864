//! Self-preservation (expiry frozen while most leases go silent at once)
//! and protection thresholds (every instance served while too few are
//! healthy).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{MemoryRegistry, State, Timer, after, new_service, two_intervals};
use crate::{Instance, ServiceKey};

/// How often self-preservation is judged while leases exist.
pub(super) const PRESERVATION_TICK: Duration = Duration::from_millis(250);

/// Eureka's self-preservation, done right.
///
/// When most instances stop renewing at once, it is more likely that the
/// registry lost touch with them (a network partition on its side) than
/// that they all died together. Self-preservation then freezes expiry:
/// nothing is marked unhealthy or evicted until renewals recover.
///
/// Eureka estimates renewals per minute from a fixed 30 s interval, updates
/// the estimate rarely, and needs peers. Here an instance *keeps up* if it
/// renewed within two of its own heartbeat intervals (a third of its TTL
/// each), so any interval works and nothing is averaged. Only instances
/// registered right now count, so graceful scale-downs and earlier evictions
/// lower the bar at once. It needs no peers, so it works on a single node.
/// It engages when fewer than `threshold` of the ephemeral instances keep
/// up, which happens before their leases (three intervals) run out. It
/// releases when at least halfway from `threshold` to all of them keep up
/// again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelfPreservation {
    /// Engage when fewer than this fraction of the ephemeral instances keep
    /// up. Default: 0.5.
    pub threshold: f64,
    /// Never engage with fewer ephemeral instances than this. Default: 3.
    pub min_instances: usize,
    /// Release after this long even if renewals have not recovered: the
    /// instances may really be gone (a zone lost, a deploy that killed its
    /// old instances). Clients skip dead instances on their own meanwhile.
    /// Default: 15 minutes.
    pub max_duration: Duration,
}

impl Default for SelfPreservation {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            min_instances: 3,
            max_duration: Duration::from_secs(15 * 60),
        }
    }
}

/// How many ephemeral instances keep up, and the share of the expected
/// renewals they stand for: each instance weighs as much as the heartbeats
/// it should send (in proportion to 1 / TTL), so that instances with long
/// leases cannot hide the silence of those with short ones. Kept up to date
/// as leases come, renew, go stale and go; weights are integers so that
/// adding and taking away never drifts.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct Renewals {
    /// Ephemeral instances that renewed within two heartbeat intervals.
    pub(super) count: usize,
    /// Their weights, summed.
    pub(super) fresh: u128,
    /// The weights of every ephemeral instance, summed.
    pub(super) total: u128,
}

impl Renewals {
    /// How much an instance with this TTL weighs: its heartbeat rate, in
    /// units fine enough for TTLs from a millisecond to years.
    pub(super) fn weight(ttl: Duration) -> u128 {
        (1u128 << 60) / ttl.as_micros().max(1000)
    }

    /// A new lease, renewed just now.
    pub(super) fn add(&mut self, ttl: Duration) {
        self.total += Self::weight(ttl);
        self.renewed(ttl);
    }

    /// A lease went away; `fresh` says whether it was keeping up.
    pub(super) fn remove(&mut self, ttl: Duration, fresh: bool) {
        self.total = self.total.saturating_sub(Self::weight(ttl));
        if fresh {
            self.went_stale(ttl);
        }
    }

    /// A lease that had stopped keeping up renewed.
    pub(super) fn renewed(&mut self, ttl: Duration) {
        self.count += 1;
        self.fresh += Self::weight(ttl);
    }

    /// A lease stopped keeping up.
    pub(super) fn went_stale(&mut self, ttl: Duration) {
        self.count = self.count.saturating_sub(1);
        self.fresh = self.fresh.saturating_sub(Self::weight(ttl));
    }

    /// The share of the expected renewals that arrive (1 without leases).
    pub(super) fn keeping_up(&self) -> f64 {
        if self.total > 0 {
            self.fresh as f64 / self.total as f64
        } else {
            1.0
        }
    }
}

impl MemoryRegistry {
    /// The services with a protection threshold, and their thresholds, in
    /// key order.
    pub fn protection_thresholds(&self) -> Vec<(ServiceKey, f64)> {
        let state = self.shared.lock();
        let mut thresholds: Vec<(ServiceKey, f64)> = state
            .services
            .iter()
            .filter(|(_, s)| s.protection > 0.0)
            .map(|(k, s)| (ServiceKey::clone(k), s.protection))
            .collect();
        thresholds.sort_by(|a, b| a.0.cmp(&b.0));
        thresholds
    }

    /// Sets the protection threshold of a service (0 turns it off, the
    /// default): while fewer than this fraction of its instances are
    /// healthy, [`instances`](crate::Registry::instances) returns all of them as
    /// healthy, rather than funnel all traffic onto the few left.
    pub fn set_protection_threshold(&self, service: &ServiceKey, threshold: f64) {
        let mut state = self.shared.lock();
        state
            .services
            .entry(Arc::new(service.clone()))
            .or_insert_with(new_service)
            .protection = threshold.clamp(0.0, 1.0);
    }
}

impl State {
    /// Engages or releases self-preservation; true while engaged.
    pub(super) fn preserve(&mut self, now: Instant) -> bool {
        let Some(preservation) = self.preservation else {
            return false;
        };
        let total = self.ephemeral;
        let renewing = self.renewals.count;
        let keeping_up = self.renewals.keeping_up();
        // By heartbeats expected, so that long leases cannot hide the
        // silence of short ones; and by instances, so that a few leases
        // with tiny TTLs (each weighing like thousands of ordinary ones)
        // cannot freeze expiry on their own: a partition silences many.
        let counted = if total > 0 {
            renewing as f64 / total as f64
        } else {
            1.0
        };
        let silent = total.saturating_sub(renewing);
        let engage = total >= preservation.min_instances
            && silent >= preservation.min_instances
            && keeping_up < preservation.threshold
            && counted < (1.0 + preservation.threshold) / 2.0;
        let overdue = self
            .preserving_since
            .is_some_and(|since| now.saturating_duration_since(since) >= preservation.max_duration);
        let release = keeping_up >= (1.0 + preservation.threshold) / 2.0
            || total < preservation.min_instances
            || overdue;
        if overdue && self.preserving {
            tracing::warn!(
                "self-preservation held for {:?} without renewals recovering; the silent instances \
                 are taken to be gone and expiry resumes",
                preservation.max_duration
            );
        }
        if !self.preserving && engage {
            self.preserving = true;
            self.preserving_since = Some(now);
            tracing::warn!(
                renewing,
                instances = total,
                "SELF-PRESERVATION ENGAGED: {silent} of {total} instances stopped renewing their \
                 leases ({renewing} renew, bringing {:.0}% of the heartbeats expected); nothing \
                 that was alive until now expires until they recover (a partition on the \
                 registry's side is likelier than all of them dying at once)",
                keeping_up * 100.0
            );
        } else if self.preserving && release {
            self.preserving = false;
            self.preserving_since = None;
            // Renewals recovered: leases that ran out while expiry was frozen
            // get one full TTL from now, since heartbeats come back spread
            // over an interval. (After giving up, they are taken to be gone.)
            if !overdue {
                self.renew_expired(now);
            }
            tracing::warn!(
                renewing,
                instances = total,
                "self-preservation released: renewals recovered; expiry resumes"
            );
        }
        self.preserving
    }

    /// Renews every lease that has run out by `now`. A scan of every lease,
    /// but only once per release of self-preservation.
    pub(super) fn renew_expired(&mut self, now: Instant) {
        for (service, entry) in &mut self.services {
            for (id, lease) in &mut entry.instances {
                let Some(ttl) = lease.ttl else {
                    continue;
                };
                if lease.expires().is_none_or(|expires| expires > now) {
                    continue;
                }
                lease.renewed = now;
                if !lease.fresh {
                    lease.fresh = true;
                    self.renewals.renewed(ttl);
                }
                let at = after(now, two_intervals(ttl));
                lease.queued = Some(at);
                self.timers.push(Timer {
                    at,
                    service: service.clone(),
                    id: id.clone(),
                });
            }
        }
    }

    /// The instances of `key` as lookups report them (every one healthy
    /// while the service is below its protection threshold), and whether
    /// the protection threshold changed what they say.
    pub(super) fn lookup(&self, key: &ServiceKey) -> (Vec<Instance>, bool) {
        let Some((service, entry)) = self.services.get_key_value(key) else {
            return (Vec::new(), false);
        };
        let leases = || entry.instances.values().map(|l| &l.instance);
        let (healthy, total) = leases()
            .filter(|i| i.enabled)
            .fold((0, 0), |(h, t), i| (h + usize::from(i.healthy), t + 1));
        let protect = crate::registry::below_protection_threshold(healthy, total, entry.protection)
            && leases().any(|i| !i.healthy);
        if protect {
            tracing::debug!(service = %key, healthy, total, "protection threshold: returning every instance");
        }
        let instances = entry
            .instances
            .iter()
            .map(|(id, l)| {
                let mut instance = l.instance.unpack(service, id);
                instance.healthy |= protect;
                instance
            })
            .collect();
        (instances, protect)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{beat, inst, many};
    use super::super::*;
    use super::*;

    /// Checks the counts kept as things happen against a count from
    /// scratch, the way self-preservation used to count: a scan of every
    /// lease.
    fn assert_counts_right(r: &MemoryRegistry) -> Renewals {
        let mut state = r.shared.lock();
        let now = Instant::now();
        state.catch_up(now);
        let mut expected = Renewals::default();
        let mut ephemeral = 0;
        for lease in state.services.values().flat_map(|s| s.instances.values()) {
            let Some(ttl) = lease.ttl else {
                continue;
            };
            ephemeral += 1;
            expected.total += Renewals::weight(ttl);
            if now.saturating_duration_since(lease.renewed) < ttl * 2 / 3 {
                expected.count += 1;
                expected.fresh += Renewals::weight(ttl);
            }
        }
        assert_eq!(state.renewals, expected);
        assert_eq!(state.ephemeral, ephemeral);
        let instances: usize = state.services.values().map(|s| s.instances.len()).sum();
        assert_eq!(state.instances, instances);
        let populated = state.services.values().filter(|s| !s.instances.is_empty());
        assert_eq!(state.populated, populated.count());
        expected
    }

    #[tokio::test(start_paused = true)]
    async fn self_preservation_engages_when_most_heartbeats_stop_and_releases_when_they_resume() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation::default())
            .build();
        let key = ServiceKey::new("svc");
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        // Everyone heartbeats every second (TTL / 3) for a while.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all).await;
        }
        assert!(!r.stats().self_preservation);
        // Eight stop at once; two carry on, for much longer than the TTL.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
        }
        let stats = r.stats();
        assert!(stats.self_preservation, "{stats:?}");
        assert_eq!(
            r.instances(&key).await.unwrap().len(),
            10,
            "nothing is evicted"
        );
        assert!(
            r.instances(&key).await.unwrap().iter().all(|i| i.healthy),
            "nothing is even marked"
        );
        // They come back, one after another: preservation is released, and
        // none of them is evicted for coming back a little later than another.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for i in &all {
                r.heartbeat(&i.instance_key()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(!r.stats().self_preservation, "{:?}", r.stats());
        assert_eq!(r.instances(&key).await.unwrap().len(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_graceful_scale_down_does_not_trip_self_preservation() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation::default())
            .build();
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all).await;
        }
        for i in &all[2..] {
            r.deregister(&i.instance_key()).await.unwrap();
        }
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
            assert!(!r.stats().self_preservation, "{:?}", r.stats());
        }
    }

    #[tokio::test]
    async fn below_the_protection_threshold_lookups_return_every_instance() {
        let r = MemoryRegistry::new();
        let key = ServiceKey::new("svc");
        for i in many(4) {
            r.register_persistent(i).unwrap();
        }
        for i in &many(4)[..3] {
            r.set_health(&i.instance_key(), false).unwrap();
        }
        let healthy = |v: Vec<Instance>| v.iter().filter(|i| i.healthy).count();
        assert_eq!(healthy(r.instances(&key).await.unwrap()), 1);
        r.set_protection_threshold(&key, 0.5);
        assert_eq!(healthy(r.instances(&key).await.unwrap()), 4);
        r.set_health(&many(4)[0].instance_key(), true).unwrap();
        assert_eq!(
            healthy(r.instances(&key).await.unwrap()),
            2,
            "at the threshold, the truth"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn long_leases_do_not_hide_the_silence_of_short_ones() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation::default())
            .build();
        let short: Vec<Instance> = (0..10).map(|i| inst(&format!("s{i:02}"))).collect();
        let long: Vec<Instance> = (0..10).map(|i| inst(&format!("long{i:02}"))).collect();
        for i in &short {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        for i in &long {
            r.register(i.clone(), Duration::from_secs(60))
                .await
                .unwrap();
        }
        // Every heartbeat stops (a partition on the registry's side).
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(r.stats().self_preservation, "{:?}", r.stats());
        assert_eq!(
            r.instances(&ServiceKey::new("svc")).await.unwrap().len(),
            20
        );
    }

    #[tokio::test(start_paused = true)]
    async fn self_preservation_gives_up_after_its_maximum_duration() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation {
                max_duration: Duration::from_secs(60),
                ..SelfPreservation::default()
            })
            .build();
        let all = many(5);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        // Three die for good; two carry on.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
        }
        assert!(r.stats().self_preservation);
        for _ in 0..70 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
        }
        assert!(!r.stats().self_preservation);
        assert_eq!(
            r.instances(&ServiceKey::new("svc")).await.unwrap().len(),
            2,
            "the dead are evicted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_counts_stay_right_through_register_heartbeat_expiry_and_deregister() {
        let r = MemoryRegistry::builder()
            .eviction_grace(Duration::from_secs(1))
            .build();
        let svc = ServiceKey::new("svc");
        let key = |id: &str| inst(id).instance_key();
        r.register(inst("a"), Duration::from_secs(3)).await.unwrap();
        r.register(inst("bb"), Duration::from_secs(3))
            .await
            .unwrap();
        r.register(inst("long"), Duration::from_secs(60))
            .await
            .unwrap();
        r.register_persistent(inst("db").with_service_key(ServiceKey::new("other")))
            .unwrap();
        assert_eq!(assert_counts_right(&r).count, 3);

        tokio::time::sleep(Duration::from_secs(1)).await;
        r.heartbeat(&key("a")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // `bb` last renewed 2.5 s ago: no longer keeping up; `a` 1.5 s ago is.
        assert_eq!(assert_counts_right(&r).count, 2);
        assert_eq!(r.stats().renewing, 2);

        r.heartbeat(&key("bb")).await.unwrap();
        assert_eq!(assert_counts_right(&r).count, 3);

        r.deregister(&key("long")).await.unwrap();
        assert_eq!(assert_counts_right(&r).count, 2);
        // Replacing a lease counts it once, with its new TTL.
        r.register(inst("a"), Duration::from_secs(6)).await.unwrap();
        let counts = assert_counts_right(&r);
        assert_eq!(counts.count, 2);
        assert_eq!(
            counts.total,
            Renewals::weight(Duration::from_secs(6)) + Renewals::weight(Duration::from_secs(3))
        );

        // `bb` runs out and is marked unhealthy, then heals within its grace.
        tokio::time::sleep(Duration::from_millis(3200)).await;
        assert!(
            r.instances(&svc)
                .await
                .unwrap()
                .iter()
                .any(|i| i.id == "bb" && !i.healthy)
        );
        assert_eq!(assert_counts_right(&r).count, 1);
        r.heartbeat(&key("bb")).await.unwrap();
        assert_eq!(assert_counts_right(&r).count, 2);
        assert!(r.instances(&svc).await.unwrap().iter().all(|i| i.healthy));

        // Everyone falls silent: marked, then evicted; only the persistent one stays.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let counts = assert_counts_right(&r);
        assert_eq!(counts, Renewals::default());
        assert!(r.instances(&svc).await.unwrap().is_empty());
        let stats = r.stats();
        assert_eq!(
            (stats.instances, stats.ephemeral, stats.services),
            (1, 0, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_counts_stay_right_through_self_preservation() {
        let r = MemoryRegistry::builder()
            .eviction_grace(Duration::from_secs(2))
            .self_preservation(SelfPreservation::default())
            .build();
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        // Eight fall silent: preservation engages and nothing expires.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
            assert_counts_right(&r);
        }
        assert!(r.stats().self_preservation);
        assert_eq!(r.stats().renewing, 2);
        // They come back: released, and the counts follow.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all).await;
            assert_counts_right(&r);
        }
        assert!(!r.stats().self_preservation);
        assert_eq!(assert_counts_right(&r).count, 10);
        // Most leave gracefully, and the two left (too few for
        // preservation) fall silent: they expire on time.
        for i in &all[2..] {
            r.deregister(&i.instance_key()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(assert_counts_right(&r), Renewals::default());
        assert!(
            r.instances(&ServiceKey::new("svc"))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_few_tiny_leases_cannot_freeze_expiry_and_the_gone_are_still_evicted() {
        // Limits that let a 1 ms lease in, to show that the rule itself holds.
        let limits = Limits {
            min_ttl: Duration::from_millis(1),
            ..Limits::default()
        };
        let r = MemoryRegistry::builder()
            .limits(limits)
            .self_preservation(SelfPreservation::default())
            .build();
        let healthy = many(150);
        for i in &healthy {
            r.register(i.clone(), Duration::from_secs(6)).await.unwrap();
        }
        let tiny: Vec<Instance> = (0..2).map(|n| inst(&format!("tiny{n}"))).collect();
        for i in &tiny {
            r.register(i.clone(), Duration::from_millis(1))
                .await
                .unwrap();
        }
        // The tiny leases go silent (their weight dwarfs the rest); the
        // others keep renewing.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            beat(&r, &healthy).await;
            assert!(!r.stats().self_preservation, "{:?}", r.stats());
        }
        let ids: Vec<String> = r
            .instances(&ServiceKey::new("svc"))
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids.len(), 150, "the silent ones were evicted");
        assert!(!ids.iter().any(|id| id.starts_with("tiny")));
    }

    #[tokio::test(start_paused = true)]
    async fn instances_gone_before_self_preservation_engaged_are_still_evicted() {
        let r = MemoryRegistry::builder()
            .eviction_grace(Duration::from_secs(3))
            .self_preservation(SelfPreservation::default())
            .build();
        let key = ServiceKey::new("svc");
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        // One dies first; its lease runs out while the rest still renew.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[1..]).await;
        }
        assert!(!r.stats().self_preservation);
        // Then most go silent together (a partition): preservation engages.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[1..3]).await;
        }
        assert!(r.stats().self_preservation, "{:?}", r.stats());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let left = r.instances(&key).await.unwrap();
        assert_eq!(left.len(), 9, "the one gone before is evicted");
        assert!(!left.iter().any(|i| i.id == all[0].id));
    }
}

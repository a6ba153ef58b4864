//! Leases: when each one needs looking at, and the sweeper that marks
//! expired instances unhealthy and evicts them after the grace period.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Changed, MemoryRegistry, PRESERVATION_TICK, Renewals, ServiceEntry, Shared, State};
use crate::ServiceKey;
use crate::registry::packed::Packed;

pub(super) struct Lease {
    pub(super) instance: Packed,
    /// What the instance counts for in its service's `bytes`.
    pub(super) size: u32,
    /// `None` for persistent instances, which never expire.
    pub(super) ttl: Option<Duration>,
    pub(super) renewed: Instant,
    /// The lease ran out and the instance is marked unhealthy.
    pub(super) expired: bool,
    /// Renewed within two heartbeat intervals (ephemeral instances only):
    /// counted in [`State::renewals`] as keeping up.
    pub(super) fresh: bool,
    /// When the timer that speaks for this lease is due; `None` for
    /// persistent instances. Timers due at another time are left over from
    /// before and ignored.
    pub(super) queued: Option<Instant>,
}

/// `by` after `at`; far in the future rather than a panic if that is
/// past what the clock can hold.
pub(super) fn after(at: Instant, by: Duration) -> Instant {
    pub(super) const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);
    at.checked_add(by)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// Two heartbeat intervals of a lease: how recently it must have renewed
/// to count as keeping up.
pub(super) fn two_intervals(ttl: Duration) -> Duration {
    ttl.saturating_mul(2) / 3
}

impl Lease {
    pub(super) fn expires(&self) -> Option<Instant> {
        self.ttl.map(|ttl| after(self.renewed, ttl))
    }

    /// When the lease stops keeping up: two heartbeat intervals after its
    /// last renewal.
    pub(super) fn stale_at(&self) -> Option<Instant> {
        self.ttl.map(|ttl| after(self.renewed, two_intervals(ttl)))
    }

    /// The next moment something may happen to the lease: it stops keeping
    /// up, it runs out, or its grace period ends.
    pub(super) fn next_check(&self, grace: Duration) -> Option<Instant> {
        let ttl = self.ttl?;
        Some(if self.fresh {
            after(self.renewed, two_intervals(ttl))
        } else if !self.expired {
            after(self.renewed, ttl)
        } else {
            after(self.renewed, ttl.saturating_add(grace))
        })
    }

    /// Notes that the lease stopped keeping up, if it did by `now`.
    pub(super) fn settle(&mut self, renewals: &mut Renewals, now: Instant) {
        if let Some(ttl) = self.ttl
            && self.fresh
            && self.stale_at().is_some_and(|at| at <= now)
        {
            self.fresh = false;
            renewals.went_stale(ttl);
        }
    }
}

/// A lease to look at: the instance `id` of `service`, at `at`.
///
/// Timers are lazy. A heartbeat does not move its lease's timer; the
/// sweeper, finding the timer early, queues it again. Only the timer due at
/// the lease's [`Lease::queued`] speaks for it; others (left over from a
/// heartbeat after expiry, a re-registration, a deregistration) are dropped
/// when they come due.
pub(super) struct Timer {
    pub(super) at: Instant,
    pub(super) service: Arc<ServiceKey>,
    pub(super) id: Arc<str>,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Timer {}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timer {
    /// Reversed, so that the heap (a max-heap) yields the soonest first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at)
    }
}

/// The lease of instance `id` of `service`.
pub(super) fn lease_in<'a>(
    services: &'a mut HashMap<Arc<ServiceKey>, ServiceEntry>,
    service: &ServiceKey,
    id: &str,
) -> Option<&'a mut Lease> {
    services.get_mut(service)?.instances.get_mut(id)
}

/// Evicts expired leases on time. Holds only a weak reference, and ends when
/// the registry is dropped.
pub(super) async fn sweep(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let notified = wake.notified();
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = shared.lock();
            state.evict_expired(Instant::now())
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

impl MemoryRegistry {
    pub(super) fn ensure_sweeper(&self, state: &mut State) {
        if state.sweeper.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.shared);
        let wake = self.shared.wake.clone();
        // A new sweeper looks at everything first; until then, any new
        // timer is worth waking it for.
        state.next_wake = None;
        state.sweeper = Some(handle.spawn(sweep(weak, wake)));
    }
}

impl State {
    /// Queues a timer for instance `id` of `service` at `at`; true if the
    /// sweeper must be woken for it.
    pub(super) fn schedule(
        &mut self,
        at: Instant,
        service: &Arc<ServiceKey>,
        id: &Arc<str>,
    ) -> bool {
        let wake = self.next_wake.is_none_or(|planned| at < planned);
        if wake {
            self.next_wake = Some(at);
        }
        self.timers.push(Timer {
            at,
            service: service.clone(),
            id: id.clone(),
        });
        wake
    }

    /// Takes the timers due by `now` off the heap (dropping those left over),
    /// and notes which of their leases stopped keeping up.
    pub(super) fn due(&mut self, now: Instant) -> Vec<Timer> {
        let mut due = Vec::new();
        while self.timers.peek().is_some_and(|t| t.at <= now) {
            let Some(timer) = self.timers.pop() else {
                break;
            };
            let Some(lease) = lease_in(&mut self.services, &timer.service, &timer.id) else {
                continue;
            };
            if lease.queued != Some(timer.at) {
                continue;
            }
            lease.settle(&mut self.renewals, now);
            due.push(timer);
        }
        due
    }

    /// Brings the counts of leases keeping up to `now`, without expiring
    /// anything (that is the sweeper's job).
    pub(super) fn catch_up(&mut self, now: Instant) {
        let due = self.due(now);
        self.timers.extend(due);
    }

    /// Marks instances whose lease ran out unhealthy, and evicts those past
    /// the grace period, unless self-preservation holds; returns when to look
    /// again. The work is in proportion to the timers that came due.
    pub(super) fn evict_expired(&mut self, now: Instant) -> Option<Instant> {
        let mut due = self.due(now);
        let was_preserving = self.preserving;
        let preserving = self.preserve(now);
        if was_preserving && !preserving {
            due.append(&mut self.frozen);
        }
        for timer in due {
            self.visit(timer, now, preserving);
        }
        let mut next = self.timers.peek().map(|t| t.at);
        // Self-preservation is judged continually while leases exist.
        if self.preservation.is_some() && self.ephemeral > 0 {
            let tick = after(now, PRESERVATION_TICK);
            next = Some(next.map_or(tick, |n| n.min(tick)));
        }
        self.next_wake = next;
        next
    }

    /// Does what is due to the lease of a due timer, and queues the timer
    /// again for the lease's next moment.
    pub(super) fn visit(&mut self, mut timer: Timer, now: Instant, preserving: bool) {
        let grace = self.grace;
        let Some(lease) = lease_in(&mut self.services, &timer.service, &timer.id) else {
            return;
        };
        if lease.queued != Some(timer.at) {
            return;
        }
        lease.settle(&mut self.renewals, now);
        let Some(expires) = lease.expires() else {
            lease.queued = None;
            return;
        };
        let mut marked = None;
        // Leases that had run out before self-preservation engaged belong to
        // owners that were gone before whatever silenced the rest: they
        // expire as usual.
        let gone_before = self.preserving_since.is_some_and(|since| expires <= since);
        if !preserving || gone_before {
            if after(expires, grace) <= now {
                tracing::info!(service = %timer.service, instance = %timer.id, "lease expired; instance evicted");
                if self.remove(&timer.service, &timer.id) {
                    self.events.evicted += 1;
                }
                return;
            }
            if expires <= now && !lease.expired {
                lease.expired = true;
                lease.instance.healthy = false;
                marked = Some(lease.instance.clone());
                self.events.expired += 1;
            }
        }
        match lease.next_check(grace) {
            Some(at) if at > now => {
                lease.queued = Some(at);
                timer.at = at;
            }
            // Only while preserving is anything due now still due after a
            // visit: it waits for expiry to resume.
            _ if preserving => {
                self.frozen.push(timer);
                return;
            }
            // Not reached; a millisecond on rather than a busy loop if it were.
            _ => {
                let at = after(now, Duration::from_millis(1));
                lease.queued = Some(at);
                timer.at = at;
            }
        }
        if let Some(instance) = marked {
            tracing::info!(service = %timer.service, instance = %timer.id, "lease expired; instance marked unhealthy");
            self.record(
                timer.service.clone(),
                Changed::Put(timer.id.clone(), instance),
            );
        }
        self.timers.push(timer);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{beat, inst, many, next};
    use super::super::*;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lease_expires_without_heartbeat_and_is_renewed_with_one() {
        let r = MemoryRegistry::new();
        let key = ServiceKey::new("svc");
        r.register(inst("a"), Duration::from_secs(3)).await.unwrap();
        r.register(inst("bb"), Duration::from_secs(3))
            .await
            .unwrap();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            r.heartbeat(&inst("a").instance_key()).await.unwrap();
        }
        let left: Vec<String> = r
            .instances(&key)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(left, vec!["a".to_owned()]);
        assert_eq!(
            r.heartbeat(&inst("bb").instance_key()).await,
            Err(RegistryError::NotFound(inst("bb").instance_key()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn two_stage_expiry_marks_unhealthy_then_evicts_and_a_late_heartbeat_heals() {
        let r = MemoryRegistry::builder()
            .eviction_grace(Duration::from_secs(1))
            .build();
        let key = ServiceKey::new("svc");
        let mut w = r.watch(&key, None).await.unwrap();
        next(&mut w).await;
        r.register(inst("a"), Duration::from_secs(2)).await.unwrap();
        r.register(inst("bb"), Duration::from_secs(2))
            .await
            .unwrap();
        next(&mut w).await;
        next(&mut w).await;
        // Both leases run out: both marked unhealthy, still listed.
        for _ in 0..2 {
            assert!(
                matches!(next(&mut w).await, WatchEvent::Put { instance, .. } if !instance.healthy)
            );
        }
        assert_eq!(r.instances(&key).await.unwrap().len(), 2);
        // One comes back within the grace period: healthy again.
        r.heartbeat(&inst("a").instance_key()).await.unwrap();
        assert!(
            matches!(next(&mut w).await, WatchEvent::Put { instance, .. } if instance.id == "a" && instance.healthy)
        );
        // The other is evicted when the grace period ends.
        assert!(matches!(next(&mut w).await, WatchEvent::Delete { id, .. } if id == "bb"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_does_not_delay_an_earlier_one() {
        let r = MemoryRegistry::new();
        let mut w = r.watch(&ServiceKey::new("svc"), None).await.unwrap();
        next(&mut w).await;
        let start = Instant::now();
        r.register(inst("long"), Duration::from_secs(60))
            .await
            .unwrap();
        r.register(inst("short"), Duration::from_secs(2))
            .await
            .unwrap();
        next(&mut w).await;
        next(&mut w).await;
        assert!(matches!(next(&mut w).await, WatchEvent::Delete { id, .. } if id == "short"));
        assert_eq!(start.elapsed(), Duration::from_secs(2), "evicted on time");
        assert_eq!(r.instances(&ServiceKey::new("svc")).await.unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_pushes_expiry_out_by_a_full_ttl() {
        let r = MemoryRegistry::new();
        let mut w = r.watch(&ServiceKey::new("svc"), None).await.unwrap();
        next(&mut w).await;
        r.register(inst("a"), Duration::from_secs(3)).await.unwrap();
        next(&mut w).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let renewed = Instant::now();
        r.heartbeat(&inst("a").instance_key()).await.unwrap();
        assert!(matches!(next(&mut w).await, WatchEvent::Delete { id, .. } if id == "a"));
        assert_eq!(renewed.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_sooner_deadline_wakes_the_sweeper() {
        let r = MemoryRegistry::new();
        let registered = Instant::now();
        r.register(inst("a"), Duration::from_secs(3)).await.unwrap();
        // Let the sweeper plan: it looks again when `a` stops keeping up.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let planned = registered + Duration::from_secs(2);
        let mut state = r.shared.lock();
        assert_eq!(state.next_wake, Some(planned));
        let now = Instant::now();
        let packed = Packed::new(&inst("b")).unwrap();
        let key = ServiceKey::new("svc");
        let ttl = Some(Duration::from_secs(60));
        assert!(!state.put(key.clone(), "later".into(), packed.clone(), 0, ttl, now));
        assert_eq!(state.next_wake, Some(planned));
        let ttl = Some(Duration::from_secs(1));
        assert!(state.put(key, "sooner".into(), packed, 0, ttl, now));
        assert!(state.next_wake < Some(planned));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_do_not_pile_up_timers_and_persistent_instances_have_none() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation::default())
            .build();
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        r.register_persistent(inst("db")).unwrap();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            beat(&r, &all).await;
        }
        assert!(r.shared.lock().timers.len() <= all.len());
        assert_eq!(r.stats().renewing, 10);
    }
}

//! Admission: which calls a server takes, per policy entry, before any of
//! its work is done.
//!
//! Two limits, set per [`MethodPolicy`](super::policy::MethodPolicy) entry
//! and shared by every method the entry names (so `a.S/*` limits the
//! service as a whole, `a.S/Get` that method alone), by every connection
//! and every clone of the service:
//!
//! * a **rate limit** ([`RateLimit`]): a token bucket, for every caller
//!   together or for each caller as named by a metadata key (`rate.rs`);
//! * a **concurrency limit** ([`Concurrency`]): the calls in flight, from
//!   admission to their final status, against a fixed limit or one
//!   estimated from throughput and latency (`concurrency.rs`).
//!
//! A call over either is refused with `RESOURCE_EXHAUSTED` before the
//! handler runs, its request body never decoded, with a message naming
//! the method, the entry and the limit, and a `grpc-retry-pushback-ms`
//! trailer: when the bucket has a token again, or the latency of the last
//! call that ended (about when a place frees up). The rate limit is
//! checked first: a call refused by it takes no place.
//!
//! The policy is compiled into a table by name when it is set (and again
//! when [`RunningService::set_policy`](super::RunningService::set_policy)
//! replaces it); an entry whose names and settings did not change keeps
//! its buckets, in-flight count and estimate. A call finds its entry as
//! [`Policy::method`] does, except that `"*"` leaves lodestar's own health
//! and reflection services alone (shedding health checks under load turns
//! overload into an outage): name them to limit them. With no limit in the
//! policy, a call costs one atomic load.

mod concurrency;
mod rate;
mod settings;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderMap;
use tonic::metadata::{MetadataMap, MetadataValue};

pub(crate) use self::concurrency::Slot;
use self::concurrency::{ConcurrencyLimiter, Shed};
use self::rate::{RateLimiter, Refused};
pub use self::settings::{
    Adaptive, Concurrency, MAX_BURST, MAX_CONCURRENCY, MAX_KEY_LEN, MAX_KEYS, MAX_RATE,
    MAX_WINDOW_MS, RateLimit,
};
pub(crate) use self::settings::{validate_concurrency, validate_rate_limit};
use super::observe::{Decision, DecisionKind, Observers};
use super::policy::{MethodPolicy, Policy};

/// The trailer (or header of a trailers-only answer) telling a refused
/// caller when to try again, in milliseconds (gRPC's retry design, A6).
pub(crate) const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The server's admission state, built from its policy.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Whether any entry has a limit: when not, calls pass at once.
    enabled: AtomicBool,
    table: ArcSwap<Table>,
    observers: Observers,
    /// Held while a new policy is compiled.
    updating: Mutex<()>,
}

impl Admission {
    pub(crate) fn new(policy: &Policy, observers: Observers) -> Self {
        let table = Table::compile(policy, &Table::default());
        Self {
            enabled: AtomicBool::new(table.enabled),
            table: ArcSwap::from_pointee(table),
            observers,
            updating: Mutex::new(()),
        }
    }

    /// Follows the policy now in `policy` (call after storing a new one).
    pub(crate) fn update(&self, policy: &ArcSwap<Policy>) {
        let _updating = self.updating.lock().unwrap_or_else(PoisonError::into_inner);
        // The policy stored last, whichever update runs last.
        let table = Table::compile(&policy.load(), &self.table.load());
        self.enabled.store(table.enabled, Ordering::Relaxed);
        self.table.store(Arc::new(table));
    }

    /// Whether any call may be refused.
    #[inline]
    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Admits the call to `path` (`/package.Service/Method`) with
    /// `headers`: its place among the calls in flight, if its entry limits
    /// them; or the status it is refused with.
    pub(crate) fn admit(
        &self,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Option<Slot>, tonic::Status> {
        let table = self.table.load();
        let Some(limits) = table.find(path) else {
            return Ok(None);
        };
        if let Some(rate) = &limits.rate
            && let Err(refused) = rate.check(headers)
        {
            return Err(self.rate_limited(path, limits, rate, refused, headers));
        }
        let Some(concurrency) = &limits.concurrency else {
            return Ok(None);
        };
        if let Some(limit) = concurrency.changed_limit() {
            self.report(path, DecisionKind::ConcurrencyLimit { limit });
        }
        match concurrency.acquire() {
            Ok(slot) => Ok(Some(slot)),
            Err(shed) => Err(self.shed(path, limits, concurrency, shed)),
        }
    }

    fn rate_limited(
        &self,
        path: &str,
        limits: &Limits,
        rate: &RateLimiter,
        refused: Refused,
        headers: &HeaderMap,
    ) -> tonic::Status {
        let key = rate.key().and_then(|name| headers.get(name));
        if !self.observers.is_empty() {
            let key = key
                .filter(|key| key.len() <= MAX_KEY_LEN)
                .map(|key| String::from_utf8_lossy(key.as_bytes()).into_owned());
            self.report(
                path,
                DecisionKind::RateLimited {
                    key,
                    retry_after: refused.wait,
                },
            );
        }
        let settings = &rate.settings;
        let whose = match (rate.key(), refused.own_bucket) {
            (Some(name), true) => format!(" for each `{name}`"),
            (Some(name), false) => format!(" shared by calls without a `{name}` bucket"),
            (None, _) => String::new(),
        };
        refusal(
            format!(
                "{path} is over the rate limit of `{}`: {}/s in bursts of up to {}{whose}; \
                 a call is allowed again in {} ms",
                limits.name(),
                settings.per_second,
                settings.burst,
                millis(refused.wait),
            ),
            refused.wait,
        )
    }

    fn shed(
        &self,
        path: &str,
        limits: &Limits,
        concurrency: &ConcurrencyLimiter,
        shed: Shed,
    ) -> tonic::Status {
        let adaptive = concurrency.is_adaptive();
        self.report(
            path,
            DecisionKind::Shed {
                limit: shed.limit,
                adaptive,
            },
        );
        refusal(
            format!(
                "{path} is overloaded: {} calls in flight, at the {} concurrency limit of `{}` \
                 ({}); try again later or elsewhere",
                shed.in_flight,
                if adaptive { "adaptive" } else { "fixed" },
                limits.name(),
                shed.limit,
            ),
            shed.pushback,
        )
    }

    fn report(&self, method: &str, kind: DecisionKind) {
        if !self.observers.is_empty() {
            self.observers.decided(&Decision { method, kind });
        }
    }
}

/// `RESOURCE_EXHAUSTED` with `message`, and a pushback of `wait`.
fn refusal(message: String, wait: Duration) -> tonic::Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(PUSHBACK, MetadataValue::from(millis(wait)));
    tonic::Status::with_metadata(tonic::Code::ResourceExhausted, message, metadata)
}

/// `wait` in whole milliseconds, rounded up.
fn millis(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The limits of one policy entry.
#[derive(Debug)]
struct Limits {
    names: Vec<String>,
    rate: Option<Arc<RateLimiter>>,
    concurrency: Option<Arc<ConcurrencyLimiter>>,
}

impl Limits {
    /// The entry, as messages name it: its first name.
    fn name(&self) -> &str {
        self.names.first().map_or("", String::as_str)
    }

    /// The limits of `entry`, keeping `old`'s state where the settings
    /// are the same.
    fn compile(entry: &MethodPolicy, old: Option<&Limits>) -> Option<Arc<Self>> {
        if entry.rate_limit.is_none() && entry.concurrency.is_none() {
            return None;
        }
        let old = old.filter(|old| old.names == entry.names);
        let rate = entry.rate_limit.as_ref().map(|settings| {
            old.and_then(|old| old.rate.clone())
                .filter(|old| old.settings == *settings)
                .unwrap_or_else(|| Arc::new(RateLimiter::new(settings.clone())))
        });
        let concurrency = entry.concurrency.as_ref().map(|settings| {
            old.and_then(|old| old.concurrency.clone())
                .filter(|old| old.settings == *settings)
                .unwrap_or_else(|| Arc::new(ConcurrencyLimiter::new(settings.clone())))
        });
        Some(Arc::new(Self {
            names: entry.names.clone(),
            rate,
            concurrency,
        }))
    }
}

/// The policy's entries by name; `None` for an entry without limits (it
/// still decides which entry a call takes).
#[derive(Debug, Default)]
struct Table {
    /// By `package.Service/Method`.
    methods: HashMap<Box<str>, Option<Arc<Limits>>>,
    /// By `package.Service` (named `package.Service/*`).
    services: HashMap<Box<str>, Option<Arc<Limits>>>,
    /// Named `*`.
    any: Option<Arc<Limits>>,
    enabled: bool,
}

impl Table {
    fn compile(policy: &Policy, old: &Table) -> Self {
        let mut table = Table::default();
        for entry in &policy.methods {
            let before = entry.names.first().and_then(|name| old.named(name));
            let limits = Limits::compile(entry, before);
            table.enabled |= limits.is_some();
            for name in &entry.names {
                let limits = limits.clone();
                if name == "*" {
                    table.any = limits;
                } else if let Some(service) = name.strip_suffix("/*") {
                    table.services.insert(service.into(), limits);
                } else {
                    table.methods.insert(name.as_str().into(), limits);
                }
            }
        }
        table
    }

    /// The limits of the entry with `name` among its names.
    fn named(&self, name: &str) -> Option<&Limits> {
        let limits = if name == "*" {
            self.any.as_ref()
        } else if let Some(service) = name.strip_suffix("/*") {
            self.services.get(service)?.as_ref()
        } else {
            self.methods.get(name)?.as_ref()
        };
        limits.map(|limits| &**limits)
    }

    /// The limits of the call to `path`, as [`Policy::method`] finds its
    /// entry (but `*` does not cover lodestar's own services).
    fn find(&self, path: &str) -> Option<&Limits> {
        let path = path.strip_prefix('/').unwrap_or(path);
        if let Some(limits) = self.methods.get(path) {
            return limits.as_deref();
        }
        let service = path.rsplit_once('/').map_or(path, |(service, _)| service);
        if let Some(limits) = self.services.get(service) {
            return limits.as_deref();
        }
        if service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.") {
            return None;
        }
        self.any.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(toml: &str) -> Admission {
        Admission::new(&Policy::from_toml(toml).unwrap(), Observers::default())
    }

    fn pushback(status: &tonic::Status) -> &str {
        status.metadata().get(PUSHBACK).unwrap().to_str().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_without_limits_admits_everything_at_once() {
        let admission = admission("[[methods]]\nnames = [\"*\"]");
        assert!(!admission.is_enabled());
        let admission = self::admission("");
        assert!(!admission.is_enabled());
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_name_the_method_entry_and_limit_with_a_pushback() {
        let admission = admission(
            r#"
            [[methods]]
            names = ["a.S/*"]
            rate_limit = { per_second = 10, burst = 1 }
            [[methods]]
            names = ["a.T/Get"]
            concurrency = { fixed = 1 }
            "#,
        );
        let none = HeaderMap::new();
        assert!(admission.admit("/a.S/Get", &none).unwrap().is_none());
        let refused = admission.admit("/a.S/Put", &none).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            refused.message(),
            "/a.S/Put is over the rate limit of `a.S/*`: 10/s in bursts of up to 1; \
             a call is allowed again in 100 ms"
        );
        assert_eq!(pushback(&refused), "100");

        let slot = admission.admit("/a.T/Get", &none).unwrap();
        assert!(slot.is_some());
        let shed = admission.admit("/a.T/Get", &none).unwrap_err();
        assert_eq!(
            shed.message(),
            "/a.T/Get is overloaded: 1 calls in flight, at the fixed concurrency limit of \
             `a.T/Get` (1); try again later or elsewhere"
        );
        assert_eq!(pushback(&shed), "1");
        drop(slot);
        assert!(admission.admit("/a.T/Get", &none).is_ok());
        // Other methods, and lodestar's own services, are not limited.
        assert!(admission.admit("/a.T/Put", &none).unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_catch_all_leaves_health_and_reflection_alone() {
        let admission = admission("[[methods]]\nnames = [\"*\"]\nconcurrency = { fixed = 1 }");
        let none = HeaderMap::new();
        let _slot = admission.admit("/a.S/Get", &none).unwrap();
        assert!(admission.admit("/b.T/Get", &none).is_err());
        assert!(
            admission
                .admit("/grpc.health.v1.Health/Check", &none)
                .is_ok()
        );
        let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        assert!(admission.admit(reflection, &none).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_limits_keep_their_state_across_a_new_policy() {
        let limited = r#"
            [[methods]]
            names = ["a.S/*"]
            rate_limit = { per_second = 1, burst = 1 }
            [[methods]]
            names = ["a.T/*"]
            rate_limit = { per_second = 1, burst = 1 }
        "#;
        let policy = ArcSwap::from_pointee(Policy::from_toml(limited).unwrap());
        let admission = Admission::new(&policy.load(), Observers::default());
        let none = HeaderMap::new();
        assert!(admission.admit("/a.S/Get", &none).is_ok());
        assert!(admission.admit("/a.T/Get", &none).is_ok());
        // a.S unchanged: its empty bucket stays empty; a.T changed: a new one.
        let changed = limited.replace(
            "a.T/*\"]\n            rate_limit = { per_second = 1, burst = 1 }",
            "a.T/*\"]\n            rate_limit = { per_second = 1, burst = 2 }",
        );
        assert_ne!(changed, limited);
        policy.store(Arc::new(Policy::from_toml(&changed).unwrap()));
        admission.update(&policy);
        assert!(admission.admit("/a.S/Get", &none).is_err());
        assert!(admission.admit("/a.T/Get", &none).is_ok());
        // No limits any more: everything passes, without looking.
        policy.store(Arc::new(Policy::default()));
        admission.update(&policy);
        assert!(!admission.is_enabled());
    }
}

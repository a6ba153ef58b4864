//! Routing: which of a service's endpoints a call may use, decided before
//! the selector picks one among them.
//!
//! [`Routing::build`] turns a [`Policy`]'s routes, split and zone affinity
//! into groups of endpoints, each [prepared](Prepared) for the selector,
//! whenever the endpoints, the policy or the caller change. Per call,
//! [`Routing::route`] only compares metadata with the routes' conditions
//! and, for a split, draws a number or hashes a key: no allocation, no
//! lock, O(routes × conditions) header lookups.
//!
//! In order:
//! 1. the first route whose `when` matches decides (the caller's labels
//!    are compared once, at build time; the call's metadata per call): its
//!    group, or when no endpoint has its labels, its [`Fallback`];
//! 2. else the split, by weight over its non-empty subsets;
//! 3. else every endpoint (the default group).
//!
//! Each group prefers the caller's zone: while at least
//! [`ZoneAffinity::min_local`] of its endpoints are in that zone, calls
//! use only those; below that, the whole group (spill over).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use lodestar_core::registry::limits::printable;

use super::connection::Connection;
use super::policy::{Fallback, Policy, ZoneAffinity};
use super::selector::{CallInfo, Endpoint, Prepared, Selector};
use super::strategy::stable_hash;

/// Who is calling: the client's own labels and zone, as routes match them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The caller's labels (`ClientBuilder::labels`).
    pub(crate) labels: BTreeMap<String, String>,
    /// The caller's zone (`ClientBuilder::zone` or `LODESTAR_ZONE`), if
    /// known; an empty zone counts as unknown.
    pub(crate) zone: Option<String>,
}

/// The endpoints a call may use, and whether its retries may leave them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Routed<'a> {
    /// The endpoints, prepared for the selector: the group's local part
    /// when it has one. Empty only when the routing was built over no
    /// endpoints at all.
    pub(crate) group: &'a Prepared,
    /// The whole group, in every zone: where a retry goes when `group`
    /// has no endpoint left to try.
    pub(crate) whole: &'a Prepared,
    /// Whether a retry may go to any endpoint ([`Routing::all`]) rather
    /// than only to this group.
    pub(crate) retry_anywhere: bool,
    /// Whether no route or split chose the group: the call may use any
    /// endpoint.
    pub(crate) unrouted: bool,
}

/// A route matched the call, but no endpoint has its labels, and its
/// fallback is [`Fallback::Fail`]. Calls fail with `UNAVAILABLE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "route {route} of the client policy sends it to instances labelled {labels}, and no \
     instance has those labels (the route's fallback is `fail`; `all` or `rest` would send it \
     to other instances)"
)]
pub(crate) struct RouteError {
    /// The route's index in the policy.
    pub(crate) route: usize,
    /// The route's labels, as `key=value, …`.
    pub(crate) labels: Arc<str>,
}

/// One set of endpoints, with its local part when the caller's zone has
/// enough of them.
#[derive(Debug)]
struct Group {
    /// The endpoints in the caller's zone, when there are at least
    /// `min_local` of them (and some are elsewhere).
    local: Option<Prepared>,
    whole: Prepared,
}

impl Group {
    fn prepared(&self) -> &Prepared {
        self.local.as_ref().unwrap_or(&self.whole)
    }
}

/// Where a route sends the calls it matches.
#[derive(Debug)]
enum Target {
    Group(Arc<Group>),
    /// No endpoint has the labels, and the fallback is to fail.
    Fail(Arc<str>),
}

#[derive(Debug)]
struct CompiledRoute {
    /// The route's index in the policy.
    index: usize,
    metadata: Vec<(HeaderName, HeaderValue)>,
    target: Target,
    retry_anywhere: bool,
}

impl CompiledRoute {
    /// Whether each condition's header is on the call with its value (any
    /// of the header's values, when it has several).
    fn matches(&self, call: &CallInfo<'_>) -> bool {
        self.metadata.iter().all(|(name, value)| {
            call.headers
                .get_all(name)
                .iter()
                .any(|v| v.as_bytes() == value.as_bytes())
        })
    }
}

#[derive(Debug)]
struct CompiledSplit {
    /// The non-empty subsets with weight, each with the sum of the weights
    /// up to and including its own.
    subsets: Vec<(u32, Arc<Group>)>,
    total: u32,
    sticky: Option<HeaderName>,
}

impl CompiledSplit {
    /// The subset for `call`; `None` only if there is none (never: a split
    /// is built with at least one).
    fn pick(&self, call: &CallInfo<'_>) -> Option<&Group> {
        let point = match self.sticky.as_ref().and_then(|h| call.headers.get(h)) {
            // The key's hash, scaled to 0..total: a key keeps its point,
            // and a subset's range only grows or shrinks at its ends.
            Some(key) => {
                ((u128::from(stable_hash(key.as_bytes())) * u128::from(self.total)) >> 64) as u32
            }
            None => fastrand::u32(..self.total),
        };
        let i = self.subsets.partition_point(|(end, _)| *end <= point);
        // `point < total`, the last end: `i` is in range.
        let (_, group) = self.subsets.get(i).or(self.subsets.last())?;
        Some(group)
    }
}

/// A policy's routing for one set of endpoints and one caller, ready for
/// calls.
#[derive(Debug)]
pub(crate) struct Routing {
    routes: Vec<CompiledRoute>,
    split: Option<CompiledSplit>,
    default: Arc<Group>,
}

impl Routing {
    /// Builds the groups `policy` routes to over `endpoints` (the usable
    /// ones, ordered by instance id), for `caller`; a group none of whose
    /// instances is usable is made of those in `all` (every endpoint,
    /// ejected or not) that have its labels, rather than fail or fall back
    /// while its instances are only ejected. Routes whose caller conditions
    /// `caller` does not meet are left out. Groups with the same labels are
    /// built once.
    pub(crate) fn build(
        policy: &Policy,
        endpoints: &[Arc<Endpoint>],
        all: &[Arc<Endpoint>],
        caller: &Caller,
        selector: &dyn Selector,
    ) -> Routing {
        let mut builder = Builder {
            endpoints,
            all,
            zone: caller
                .zone
                .as_deref()
                .filter(|z| !z.is_empty() && policy.zone.enabled),
            affinity: &policy.zone,
            selector,
            groups: HashMap::new(),
        };
        static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
        let default = builder.group(&NO_LABELS, false);
        let routes = policy
            .routes
            .iter()
            .enumerate()
            .filter(|(_, route)| {
                route
                    .when
                    .caller
                    .iter()
                    .all(|(k, v)| caller.labels.get(k) == Some(v))
            })
            .filter_map(|(index, route)| {
                let metadata = route
                    .when
                    .metadata
                    .iter()
                    .map(|(name, value)| {
                        Some((
                            HeaderName::from_bytes(name.as_bytes()).ok()?,
                            HeaderValue::from_str(value).ok()?,
                        ))
                    })
                    // A condition that is not a header can match no call
                    // (`Policy::validate` refuses it).
                    .collect::<Option<Vec<_>>>()?;
                let subset = builder.group(&route.to, false);
                let target = if !subset.whole.endpoints().is_empty() {
                    Target::Group(subset)
                } else {
                    match route.fallback {
                        Fallback::All => Target::Group(default.clone()),
                        Fallback::Rest => Target::Group(builder.group(&route.to, true)),
                        // `Fallback` is non-exhaustive to users, not here;
                        // anything new fails safe.
                        _ => Target::Fail(label_list(&route.to)),
                    }
                };
                Some(CompiledRoute {
                    index,
                    metadata,
                    target,
                    retry_anywhere: route.retry_anywhere,
                })
            })
            .collect();
        let split = policy.split.as_ref().and_then(|split| {
            let mut total = 0u32;
            let mut subsets = Vec::with_capacity(split.subsets.len());
            for subset in &split.subsets {
                let group = builder.group(&subset.labels, false);
                if subset.weight == 0 || group.whole.endpoints().is_empty() {
                    continue;
                }
                // Validated policies' weights fit; saturate regardless.
                total = total.saturating_add(subset.weight);
                subsets.push((total, group));
            }
            (total > 0).then(|| CompiledSplit {
                subsets,
                total,
                sticky: split
                    .sticky_header
                    .as_ref()
                    .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            })
        });
        Routing {
            routes,
            split,
            default,
        }
    }

    /// The endpoints `call` may use: those of the first route that matches
    /// it, else of the split, else every endpoint (each in the caller's
    /// zone while it has enough of them).
    pub(crate) fn route(&self, call: &CallInfo<'_>) -> Result<Routed<'_>, RouteError> {
        for route in &self.routes {
            if !route.matches(call) {
                continue;
            }
            return match &route.target {
                Target::Group(group) => Ok(Routed {
                    group: group.prepared(),
                    whole: &group.whole,
                    retry_anywhere: route.retry_anywhere,
                    unrouted: false,
                }),
                Target::Fail(labels) => Err(RouteError {
                    route: route.index,
                    labels: labels.clone(),
                }),
            };
        }
        let split = self.split.as_ref().and_then(|split| split.pick(call));
        let group = split.unwrap_or(&self.default);
        Ok(Routed {
            group: group.prepared(),
            whole: &group.whole,
            retry_anywhere: false,
            unrouted: split.is_none(),
        })
    }

    /// [`route`](Self::route) for a retry of a call whose first attempt
    /// went over `first`: a split call stays in the subset of that
    /// attempt's endpoint rather than draw again.
    pub(crate) fn route_retry(
        &self,
        call: &CallInfo<'_>,
        first: &Arc<Connection>,
    ) -> Result<Routed<'_>, RouteError> {
        let routed = self.route(call)?;
        if routed.unrouted || self.routes.iter().any(|r| r.matches(call)) {
            return Ok(routed);
        }
        let Some(split) = &self.split else {
            return Ok(routed);
        };
        let holds = |group: &Group| {
            group
                .whole
                .endpoints()
                .iter()
                .any(|e| Arc::ptr_eq(&e.connection, first))
        };
        Ok(split
            .subsets
            .iter()
            .map(|(_, group)| group)
            .find(|group| holds(group))
            .map_or(routed, |group| Routed {
                group: group.prepared(),
                whole: &group.whole,
                retry_anywhere: false,
                unrouted: false,
            }))
    }

    /// Every usable endpoint, in every zone: where a retry of a route with
    /// `retry_anywhere` may go.
    pub(crate) fn all(&self) -> &Prepared {
        &self.default.whole
    }
}

/// Builds the groups of one [`Routing`], each set of labels once.
struct Builder<'a> {
    endpoints: &'a [Arc<Endpoint>],
    /// Every endpoint, ejected or not: a group's members when none of
    /// them is usable.
    all: &'a [Arc<Endpoint>],
    /// The caller's zone, when affinity applies.
    zone: Option<&'a str>,
    affinity: &'a ZoneAffinity,
    selector: &'a dyn Selector,
    /// By labels, and whether the group is the endpoints without them.
    groups: HashMap<(&'a BTreeMap<String, String>, bool), Arc<Group>>,
}

impl<'a> Builder<'a> {
    /// The endpoints with every one of `labels` (or, if `without`, the
    /// others).
    fn group(&mut self, labels: &'a BTreeMap<String, String>, without: bool) -> Arc<Group> {
        if let Some(group) = self.groups.get(&(labels, without)) {
            return group.clone();
        }
        let members = |set: &[Arc<Endpoint>]| -> Vec<Arc<Endpoint>> {
            set.iter()
                .filter(|e| has_labels(e, labels) != without)
                .cloned()
                .collect()
        };
        let mut whole = members(self.endpoints);
        if whole.is_empty() {
            // Only ejected ones have the labels: rather call them.
            whole = members(self.all);
        }
        let local: Option<Vec<Arc<Endpoint>>> = self.zone.and_then(|zone| {
            let local: Vec<_> = whole
                .iter()
                .filter(|e| e.instance.zone == zone)
                .cloned()
                .collect();
            let enough =
                local.len() >= usize::try_from(self.affinity.min_local).unwrap_or(usize::MAX);
            (enough && local.len() < whole.len()).then_some(local)
        });
        let group = Arc::new(Group {
            local: local.map(|l| Prepared::new(self.selector, l.into())),
            whole: Prepared::new(self.selector, whole.into()),
        });
        self.groups.insert((labels, without), group.clone());
        group
    }
}

fn has_labels(endpoint: &Endpoint, labels: &BTreeMap<String, String>) -> bool {
    labels
        .iter()
        .all(|(k, v)| endpoint.instance.metadata.get(k) == Some(v))
}

/// `key=value, …`, printable.
fn label_list(labels: &BTreeMap<String, String>) -> Arc<str> {
    let list: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{}={}", printable(k), printable(v)))
        .collect();
    list.join(", ").into()
}

#[cfg(test)]
mod tests {
    use std::any::Any;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::HeaderMap;
    use lodestar_core::{Instance, ServiceKey};

    use super::*;
    use crate::client::connection::Connection;
    use crate::client::policy::tests::labels;
    use crate::client::policy::{self, Match, Route, Subset};
    use crate::client::selector::RoundRobin;

    /// An endpoint (no connection is opened until a call).
    fn endpoint(id: &str, zone: &str, pairs: &[(&str, &str)]) -> Arc<Endpoint> {
        let address = format!("{id}.test:7000");
        let mut instance = Instance::new("orders", address.clone())
            .with_id(id)
            .with_zone(zone);
        instance.metadata = labels(pairs);
        Arc::new(Endpoint {
            instance,
            authority: address.parse().unwrap(),
            connection: Arc::new(Connection::new(address)),
            stats: Default::default(),
        })
    }

    /// a and b are version 1, c is version 2.
    fn versions() -> Vec<Arc<Endpoint>> {
        vec![
            endpoint("a", "", &[("version", "1")]),
            endpoint("b", "", &[("version", "1")]),
            endpoint("c", "", &[("version", "2")]),
        ]
    }

    fn ids(prepared: &Prepared) -> Vec<&str> {
        prepared
            .endpoints()
            .iter()
            .map(|e| e.instance.id.as_str())
            .collect()
    }

    fn route(routing: &Routing, headers: &HeaderMap) -> Result<(Vec<String>, bool), RouteError> {
        let service = ServiceKey::new("orders");
        let call = CallInfo {
            service: &service,
            method: "/orders.Orders/Get",
            headers,
            attempt: 1,
        };
        let routed = routing.route(&call)?;
        let ids = ids(routed.group).into_iter().map(String::from).collect();
        Ok((ids, routed.retry_anywhere))
    }

    fn header(name: &'static str, value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_static(value));
        headers
    }

    fn policy_with_route(to: &[(&str, &str)], fallback: Fallback) -> Policy {
        let mut policy = Policy::default();
        policy.routes.push(Route {
            when: Match {
                metadata: labels(&[("x-tenant", "beta")]),
                caller: BTreeMap::new(),
            },
            to: labels(to),
            fallback,
            retry_anywhere: false,
        });
        policy
    }

    #[test]
    fn a_label_route_sends_matching_calls_to_its_subset() {
        let mut policy = policy_with_route(&[("version", "2")], Fallback::Fail);
        policy.routes[0].retry_anywhere = true;
        let routing = Routing::build(
            &policy,
            &versions(),
            &versions(),
            &Caller::default(),
            &RoundRobin::default(),
        );
        let beta = header("x-tenant", "beta");
        assert_eq!(route(&routing, &beta).unwrap(), (vec!["c".into()], true));
        // Another value, or no header: the route does not match.
        let other = header("x-tenant", "gamma");
        assert_eq!(route(&routing, &other).unwrap().0, ["a", "b", "c"]);
        assert_eq!(
            route(&routing, &HeaderMap::new()).unwrap(),
            (vec!["a".into(), "b".into(), "c".into()], false)
        );
        // Any of a header's values matches.
        let mut both = header("x-tenant", "gamma");
        both.append("x-tenant", HeaderValue::from_static("beta"));
        assert_eq!(route(&routing, &both).unwrap().0, ["c"]);
        assert_eq!(ids(routing.all()), ["a", "b", "c"]);
    }

    #[test]
    fn a_route_without_instances_follows_its_fallback() {
        let beta = header("x-tenant", "beta");
        let missing = [("track", "beta"), ("version", "9")];
        let caller = Caller::default();
        let fail = Routing::build(
            &policy_with_route(&missing, Fallback::Fail),
            &versions(),
            &versions(),
            &caller,
            &RoundRobin::default(),
        );
        let error = route(&fail, &beta).unwrap_err().to_string();
        assert!(error.contains("track=beta, version=9"), "{error}");
        assert!(error.contains("route 0"), "{error}");
        // Calls the route does not match are unaffected.
        assert_eq!(route(&fail, &HeaderMap::new()).unwrap().0, ["a", "b", "c"]);
        for fallback in [Fallback::All, Fallback::Rest] {
            let policy = policy_with_route(&missing, fallback);
            let routing = Routing::build(
                &policy,
                &versions(),
                &versions(),
                &caller,
                &RoundRobin::default(),
            );
            assert_eq!(
                route(&routing, &beta).unwrap().0,
                ["a", "b", "c"],
                "{fallback:?}"
            );
        }
    }

    #[test]
    fn a_route_can_match_the_callers_own_labels() {
        let mut policy = Policy::default();
        policy.routes.push(Route {
            when: Match {
                metadata: BTreeMap::new(),
                caller: labels(&[("team", "shop")]),
            },
            to: labels(&[("version", "2")]),
            ..Route::default()
        });
        let shop = Caller {
            labels: labels(&[("team", "shop"), ("zone-group", "x")]),
            zone: None,
        };
        let routing = Routing::build(
            &policy,
            &versions(),
            &versions(),
            &shop,
            &RoundRobin::default(),
        );
        assert_eq!(route(&routing, &HeaderMap::new()).unwrap().0, ["c"]);
        let other = Caller {
            labels: labels(&[("team", "ads")]),
            zone: None,
        };
        let routing = Routing::build(
            &policy,
            &versions(),
            &versions(),
            &other,
            &RoundRobin::default(),
        );
        assert_eq!(
            route(&routing, &HeaderMap::new()).unwrap().0,
            ["a", "b", "c"]
        );
    }

    fn canary(sticky: Option<&str>) -> Policy {
        Policy {
            split: Some(policy::tests::canary(sticky)),
            ..Policy::default()
        }
    }

    /// Of `calls` routed with headers from `headers`, how many went to the
    /// canary (version 2), in percent.
    fn canary_share(routing: &Routing, calls: usize, headers: impl Fn(usize) -> HeaderMap) -> f64 {
        let canary = (0..calls)
            .filter(|&i| route(routing, &headers(i)).unwrap().0 == ["c"])
            .count();
        canary as f64 * 100.0 / calls as f64
    }

    #[test]
    fn a_ten_percent_canary_gets_ten_percent_of_calls() {
        fastrand::seed(7);
        let routing = Routing::build(
            &canary(None),
            &versions(),
            &versions(),
            &Caller::default(),
            &RoundRobin::default(),
        );
        let share = canary_share(&routing, 50_000, |_| HeaderMap::new());
        assert!((share - 10.0).abs() <= 0.6, "canary share {share}%");
    }

    #[test]
    fn a_sticky_split_keeps_each_key_on_one_subset() {
        let routing = Routing::build(
            &canary(Some("x-user")),
            &versions(),
            &versions(),
            &Caller::default(),
            &RoundRobin::default(),
        );
        let user = |i: usize| {
            let mut headers = HeaderMap::new();
            headers.insert(
                "x-user",
                HeaderValue::from_str(&format!("user-{i}")).unwrap(),
            );
            headers
        };
        for i in 0..50 {
            let first = route(&routing, &user(i)).unwrap().0;
            for _ in 0..20 {
                assert_eq!(route(&routing, &user(i)).unwrap().0, first, "user-{i}");
            }
        }
        // Over many keys, the split holds.
        let share = canary_share(&routing, 50_000, user);
        assert!(
            (share - 10.0).abs() <= 0.6,
            "canary share over keys {share}%"
        );
        // A call without the key is split at random.
        fastrand::seed(11);
        let share = canary_share(&routing, 50_000, |_| HeaderMap::new());
        assert!(
            (share - 10.0).abs() <= 0.6,
            "canary share without keys {share}%"
        );
    }

    #[test]
    fn a_split_skips_subsets_without_instances() {
        let mut policy = canary(None);
        if let Some(split) = &mut policy.split {
            split.subsets.push(Subset {
                labels: labels(&[("version", "3")]),
                weight: 1_000,
            });
        }
        fastrand::seed(3);
        let routing = Routing::build(
            &policy,
            &versions(),
            &versions(),
            &Caller::default(),
            &RoundRobin::default(),
        );
        let share = canary_share(&routing, 50_000, |_| HeaderMap::new());
        assert!((share - 10.0).abs() <= 0.6, "canary share {share}%");
        // No subset has an instance: every instance.
        let only_v3 = vec![endpoint("d", "", &[("version", "3")])];
        let mut policy = canary(None);
        let routing = Routing::build(
            &policy,
            &only_v3,
            &only_v3,
            &Caller::default(),
            &RoundRobin::default(),
        );
        assert_eq!(route(&routing, &HeaderMap::new()).unwrap().0, ["d"]);
        // No instance at all: an empty group, which the caller reports.
        policy.routes.clear();
        let routing = Routing::build(
            &policy,
            &[],
            &[],
            &Caller::default(),
            &RoundRobin::default(),
        );
        assert!(route(&routing, &HeaderMap::new()).unwrap().0.is_empty());
    }

    fn zones(local: usize, remote: usize) -> Vec<Arc<Endpoint>> {
        let mut endpoints: Vec<_> = (0..local)
            .map(|i| endpoint(&format!("l{i}"), "east", &[]))
            .chain((0..remote).map(|i| endpoint(&format!("r{i}"), "west", &[])))
            .collect();
        endpoints.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
        endpoints
    }

    fn east() -> Caller {
        Caller {
            labels: BTreeMap::new(),
            zone: Some("east".into()),
        }
    }

    #[test]
    fn calls_stay_in_the_callers_zone_while_it_has_enough_instances() {
        let policy = Policy::default();
        let routing = Routing::build(
            &policy,
            &zones(3, 3),
            &zones(3, 3),
            &east(),
            &RoundRobin::default(),
        );
        assert_eq!(
            route(&routing, &HeaderMap::new()).unwrap().0,
            ["l0", "l1", "l2"]
        );
        assert_eq!(routing.all().endpoints().len(), 6);
        // Fewer than `min_local` (2) in the zone: spill over to all.
        let routing = Routing::build(
            &policy,
            &zones(1, 3),
            &zones(1, 3),
            &east(),
            &RoundRobin::default(),
        );
        assert_eq!(route(&routing, &HeaderMap::new()).unwrap().0.len(), 4);
        // Zone unknown, or affinity off: all.
        let routing = Routing::build(
            &policy,
            &zones(3, 3),
            &zones(3, 3),
            &Caller::default(),
            &RoundRobin::default(),
        );
        assert_eq!(route(&routing, &HeaderMap::new()).unwrap().0.len(), 6);
        let mut off = Policy::default();
        off.zone.enabled = false;
        let routing = Routing::build(
            &off,
            &zones(3, 3),
            &zones(3, 3),
            &east(),
            &RoundRobin::default(),
        );
        assert_eq!(route(&routing, &HeaderMap::new()).unwrap().0.len(), 6);
    }

    #[test]
    fn zone_affinity_applies_inside_a_routes_subset() {
        let mut endpoints = zones(2, 2);
        endpoints.push(endpoint("v2-east", "east", &[("version", "2")]));
        endpoints.push(endpoint("v2-west", "west", &[("version", "2")]));
        let mut policy = policy_with_route(&[("version", "2")], Fallback::Fail);
        policy.zone.min_local = 1;
        let routing = Routing::build(
            &policy,
            &endpoints,
            &endpoints,
            &east(),
            &RoundRobin::default(),
        );
        let beta = header("x-tenant", "beta");
        assert_eq!(route(&routing, &beta).unwrap().0, ["v2-east"]);
        assert_eq!(
            route(&routing, &HeaderMap::new()).unwrap().0,
            ["l0", "l1", "v2-east"]
        );
    }

    /// Counts the sets it prepares.
    #[derive(Debug, Default)]
    struct Counting(AtomicUsize);

    impl Selector for Counting {
        fn select(&self, _: &[Arc<Endpoint>], _: &CallInfo<'_>) -> Option<usize> {
            Some(0)
        }

        fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Option<Box<dyn Any + Send + Sync>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Some(Box::new(endpoints.len()))
        }
    }

    #[test]
    fn each_set_of_labels_is_prepared_once() {
        // A route and a split subset to version 2, and a split subset with
        // no labels (every instance, as the default group).
        let mut policy = canary(None);
        policy.routes.push(Route {
            to: labels(&[("version", "2")]),
            ..Route::default()
        });
        if let Some(split) = &mut policy.split {
            split.subsets.push(Subset {
                labels: BTreeMap::new(),
                weight: 1,
            });
        }
        let selector = Counting::default();
        let routing = Routing::build(
            &policy,
            &versions(),
            &versions(),
            &Caller::default(),
            &selector,
        );
        // Every instance, version 2, version 1.
        assert_eq!(selector.0.load(Ordering::Relaxed), 3);
        assert_eq!(routing.all().state::<usize>(), Some(&3));
    }
}

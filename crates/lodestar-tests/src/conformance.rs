//! One suite of behaviour tests that every [`Registry`] backend must pass:
//! memory, the registry server, etcd. Each case takes a registry and a
//! namespace of its own (so that cases can share one server), and panics
//! with what went wrong.
//!
//! Use [`registry_conformance!`](crate::registry_conformance) to run every
//! case as a test of its own for a backend.

use std::collections::BTreeMap;
use std::time::Duration;

use lodestar::{
    Instance, InstanceKey, Registry, RegistryError, ServiceKey, WatchEvent, WatchStream,
};
use tokio_stream::StreamExt;

use crate::bounded;

/// What a backend can and cannot do, for the cases that depend on it.
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    /// The shortest lease it honours (etcd's are whole seconds).
    pub short_ttl: Duration,
}

fn key(namespace: &str, service: &str) -> ServiceKey {
    ServiceKey::new(service).with_namespace(namespace)
}

fn instance(namespace: &str, service: &str, id: &str, port: u16) -> Instance {
    Instance::new(service, format!("10.1.2.3:{port}"))
        .with_service_key(key(namespace, service))
        .with_id(id)
}

async fn ids(registry: &dyn Registry, key: &ServiceKey) -> Vec<String> {
    let mut ids: Vec<String> = registry
        .instances(key)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    ids.sort();
    ids
}

async fn next(watch: &mut WatchStream) -> WatchEvent {
    bounded("a watch event", watch.next())
        .await
        .expect("the watch is open")
        .expect("no watch error")
}

const LONG: Duration = Duration::from_secs(60);

/// Register, look up, deregister; deregistering an unknown instance is fine.
pub async fn register_lookup_deregister(registry: &dyn Registry, ns: &str) {
    let svc = key(ns, "orders");
    registry
        .register(instance(ns, "orders", "a", 1), LONG)
        .await
        .unwrap();
    registry
        .register(instance(ns, "orders", "b", 2), LONG)
        .await
        .unwrap();
    assert_eq!(ids(registry, &svc).await, ["a", "b"]);
    registry
        .deregister(&InstanceKey {
            service: svc.clone(),
            id: "a".into(),
        })
        .await
        .unwrap();
    assert_eq!(ids(registry, &svc).await, ["b"]);
    registry
        .deregister(&InstanceKey {
            service: svc.clone(),
            id: "never".into(),
        })
        .await
        .unwrap();
    assert!(
        registry
            .instances(&key(ns, "unknown-service"))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Every field of an instance survives the trip.
pub async fn fields_round_trip(registry: &dyn Registry, ns: &str) {
    let mut labels = BTreeMap::new();
    labels.insert("canary".to_owned(), "true".to_owned());
    labels.insert("ünï".to_owned(), "cödé ☺".to_owned());
    let sent = instance(ns, "payments", "p-1", 9)
        .with_service_key(key(ns, "payments").with_group("checkout"))
        .with_version("2.3.4")
        .with_protocol("grpc+tls")
        .with_weight(42)
        .with_zone("eu-west-1b");
    let sent = Instance {
        metadata: labels,
        ..sent
    };
    registry.register(sent.clone(), LONG).await.unwrap();
    let found = registry.instances(&sent.key).await.unwrap();
    assert_eq!(found, [sent]);
}

/// Services are listed per namespace; namespaces and groups isolate.
pub async fn namespaces_and_groups_isolate(registry: &dyn Registry, ns: &str) {
    let other = format!("{ns}-other");
    registry
        .register(instance(ns, "alpha", "a", 1), LONG)
        .await
        .unwrap();
    registry
        .register(instance(ns, "beta", "b", 2), LONG)
        .await
        .unwrap();
    let grouped =
        instance(ns, "alpha", "g", 3).with_service_key(key(ns, "alpha").with_group("blue"));
    registry.register(grouped, LONG).await.unwrap();
    registry
        .register(instance(&other, "alpha", "o", 4), LONG)
        .await
        .unwrap();
    let services = registry.services(ns).await.unwrap();
    let mut names: Vec<(String, String)> =
        services.into_iter().map(|k| (k.group, k.service)).collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("blue".to_owned(), "alpha".to_owned()),
            ("default".to_owned(), "alpha".to_owned()),
            ("default".to_owned(), "beta".to_owned())
        ]
    );
    assert_eq!(ids(registry, &key(ns, "alpha")).await, ["a"]);
    assert_eq!(
        ids(registry, &key(ns, "alpha").with_group("blue")).await,
        ["g"]
    );
    assert_eq!(ids(registry, &key(&other, "alpha")).await, ["o"]);
}

/// A lease without heartbeats runs out (the instance leaves, or is marked
/// unhealthy first); one with heartbeats stays.
pub async fn leases_expire_without_heartbeats(registry: &dyn Registry, ns: &str, backend: Backend) {
    let svc = key(ns, "leases");
    let ttl = backend.short_ttl;
    let mut watch = registry.watch(&svc, None).await.unwrap();
    assert!(matches!(
        next(&mut watch).await,
        WatchEvent::Snapshot { .. }
    ));
    let kept = instance(ns, "leases", "kept", 1);
    registry
        .register(instance(ns, "leases", "lapsed", 2), ttl)
        .await
        .unwrap();
    registry.register(kept.clone(), ttl).await.unwrap();
    let keep_alive = async {
        loop {
            tokio::time::sleep(ttl / 4).await;
            registry.heartbeat(&kept.instance_key()).await.unwrap();
        }
    };
    let lapsed = async {
        loop {
            match next(&mut watch).await {
                WatchEvent::Delete { id, .. } if id == "lapsed" => return,
                WatchEvent::Put { instance, .. }
                    if instance.id == "lapsed" && !instance.healthy =>
                {
                    return;
                }
                _ => {}
            }
        }
    };
    bounded("the lapsed instance to go", async {
        tokio::select! {
            () = lapsed => {}
            () = keep_alive => unreachable!(),
        }
    })
    .await;
    let kept_now = registry
        .instances(&svc)
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.id == "kept");
    assert!(
        kept_now.is_some_and(|i| i.healthy),
        "the instance that heartbeats stays healthy"
    );
}

/// A heartbeat for an instance that is not registered says so.
pub async fn heartbeat_of_an_unknown_instance_is_an_error(registry: &dyn Registry, ns: &str) {
    let error = registry
        .heartbeat(&InstanceKey {
            service: key(ns, "ghosts"),
            id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            RegistryError::NotFound(_) | RegistryError::LeaseExpired(_)
        ),
        "{error:?}"
    );
}

/// Invalid registrations are refused, naming the problem, and change nothing.
pub async fn invalid_registrations_are_refused(registry: &dyn Registry, ns: &str) {
    let svc = key(ns, "strict");
    let error = registry
        .register(instance(ns, "strict", "a", 1).with_id(""), LONG)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RegistryError::Invalid(m) if m.contains("empty id")),
        "{error:?}"
    );
    let mut no_address = instance(ns, "strict", "b", 2);
    no_address.address.clear();
    let error = registry.register(no_address, LONG).await.unwrap_err();
    assert!(
        matches!(&error, RegistryError::Invalid(m) if m.contains("empty address")),
        "{error:?}"
    );
    assert!(registry.instances(&svc).await.unwrap().is_empty());
}

/// Watch: a snapshot, then changes in order with growing revisions; a
/// watcher that resumes from a revision gets exactly what it missed.
pub async fn watch_is_ordered_and_resumes(registry: &dyn Registry, ns: &str) {
    let svc = key(ns, "watched");
    registry
        .register(instance(ns, "watched", "before", 1), LONG)
        .await
        .unwrap();
    let mut watch = registry.watch(&svc, None).await.unwrap();
    let start = match next(&mut watch).await {
        WatchEvent::Snapshot {
            revision,
            instances,
        } => {
            assert_eq!(
                instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
                ["before"]
            );
            revision
        }
        other => panic!("a watch starts with a snapshot, not {other:?}"),
    };
    registry
        .register(instance(ns, "watched", "a", 2), LONG)
        .await
        .unwrap();
    registry
        .register(instance(ns, "watched", "b", 3), LONG)
        .await
        .unwrap();
    registry
        .deregister(&InstanceKey {
            service: svc.clone(),
            id: "a".into(),
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut last = start;
    for _ in 0..3 {
        let event = next(&mut watch).await;
        assert!(
            event.revision() > last,
            "revisions grow: {event:?} after {last}"
        );
        last = event.revision();
        seen.push(match event {
            WatchEvent::Put { instance, revision } => ("put", instance.id, revision),
            WatchEvent::Delete { id, revision } => ("delete", id, revision),
            other => panic!("unexpected {other:?}"),
        });
    }
    let kinds: Vec<(&str, &str)> = seen.iter().map(|(k, id, _)| (*k, id.as_str())).collect();
    assert_eq!(kinds, [("put", "a"), ("put", "b"), ("delete", "a")]);
    drop(watch);
    // Resume after the first change: exactly the two after it.
    let mut resumed = registry.watch(&svc, Some(seen[0].2)).await.unwrap();
    let first = next(&mut resumed).await;
    assert!(
        matches!(&first, WatchEvent::Put { instance, .. } if instance.id == "b"),
        "{first:?}"
    );
    let second = next(&mut resumed).await;
    assert!(
        matches!(&second, WatchEvent::Delete { id, .. } if id == "a"),
        "{second:?}"
    );
}

/// Many registrations at once all land.
pub async fn concurrent_registrations_all_land(registry: &dyn Registry, ns: &str) {
    let svc = key(ns, "crowd");
    // All in flight at once.
    let registrations =
        (0..40u16).map(|n| registry.register(instance(ns, "crowd", &format!("c{n:02}"), n), LONG));
    for result in futures_util::future::join_all(registrations).await {
        result.unwrap();
    }
    assert_eq!(registry.instances(&svc).await.unwrap().len(), 40);
}

/// Whatever must stay alive while a case runs (a server, say); dropped
/// when the case ends.
pub type Guard = Box<dyn std::any::Any + Send>;

/// Runs every conformance case as a test of its own:
/// `registry_conformance!(memory, async { (registry, Backend { .. }, guard) });`
/// where the expression makes a fresh `(Arc<dyn Registry>, Backend, Guard)`.
#[macro_export]
macro_rules! registry_conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            use $crate::conformance as case;

            async fn registry() -> (
                std::sync::Arc<dyn lodestar::Registry>,
                case::Backend,
                case::Guard,
            ) {
                $make.await
            }

            fn namespace(case: &str) -> String {
                format!("{}-{case}-{}", stringify!($backend), std::process::id())
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn register_lookup_deregister() {
                let (r, _, _guard) = registry().await;
                case::register_lookup_deregister(&*r, &namespace("rld")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fields_round_trip() {
                let (r, _, _guard) = registry().await;
                case::fields_round_trip(&*r, &namespace("fields")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn namespaces_and_groups_isolate() {
                let (r, _, _guard) = registry().await;
                case::namespaces_and_groups_isolate(&*r, &namespace("ns")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn leases_expire_without_heartbeats() {
                let (r, backend, _guard) = registry().await;
                case::leases_expire_without_heartbeats(&*r, &namespace("lease"), backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn heartbeat_of_an_unknown_instance_is_an_error() {
                let (r, _, _guard) = registry().await;
                case::heartbeat_of_an_unknown_instance_is_an_error(&*r, &namespace("hb")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn invalid_registrations_are_refused() {
                let (r, _, _guard) = registry().await;
                case::invalid_registrations_are_refused(&*r, &namespace("invalid")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_is_ordered_and_resumes() {
                let (r, _, _guard) = registry().await;
                case::watch_is_ordered_and_resumes(&*r, &namespace("watch")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_registrations_all_land() {
                let (r, _, _guard) = registry().await;
                case::concurrent_registrations_all_land(&*r, &namespace("crowd")).await;
            }
        }
    };
}

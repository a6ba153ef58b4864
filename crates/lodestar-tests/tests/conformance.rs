//! The registry conformance suite, for every backend.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use lodestar::{MemoryRegistry, Registry};
use lodestar_tests::conformance::{Backend, Guard};
use lodestar_tests::registry_conformance;

registry_conformance!(memory, async {
    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
    let backend = Backend {
        short_ttl: Duration::from_millis(600),
    };
    (registry, backend, Box::new(()) as Guard)
});

// The registry server, on a real socket, through `RemoteRegistry`.
registry_conformance!(remote, async {
    let server = lodestar_registry_server::start(lodestar_registry_server::Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: None,
        warmup: Duration::ZERO,
        eviction_grace: Duration::from_millis(300),
        ..lodestar_registry_server::Config::default()
    })
    .await
    .unwrap();
    let address = server.local_addr().to_string();
    let registry: Arc<dyn Registry> = Arc::new(lodestar_registry::RemoteRegistry::new(&[address]));
    let backend = Backend {
        short_ttl: Duration::from_millis(900),
    };
    // The server stops when the test ends.
    (registry, backend, Box::new(server) as Guard)
});

// etcd, a real single-member server started for each test.
registry_conformance!(etcd, async {
    let server = lodestar_tests::etcd::Etcd::single();
    lodestar_tests::etcd::ready(std::slice::from_ref(&server)).await;
    let registry: Arc<dyn Registry> =
        Arc::new(lodestar_etcd::EtcdRegistry::from_url(&server.url()).unwrap());
    let backend = Backend {
        short_ttl: Duration::from_secs(1),
    };
    // The server stops when the test ends.
    (registry, backend, Box::new(server) as Guard)
});

// etcd serving clients over TLS only, with authentication on: every call
// carries a token for a user that may touch the registry's prefix only.
registry_conformance!(etcd_tls_auth, async {
    let server = lodestar_tests::etcd::Etcd::secure().await;
    let registry: Arc<dyn Registry> =
        Arc::new(lodestar_etcd::EtcdRegistry::from_url(&server.url()).unwrap());
    let backend = Backend {
        short_ttl: Duration::from_secs(1),
    };
    (registry, backend, Box::new(server) as Guard)
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_refuses_bad_credentials_plaintext_and_keys_outside_the_users_prefix_clearly() {
    use lodestar::{Instance, RegistryError, ServiceKey};
    use lodestar_tests::etcd::{Etcd, PASSWORD};
    let server = Etcd::secure().await;
    let url = server.url();
    let instance = || Instance::new("secured", "10.0.0.1:1").with_id("a");
    let ttl = Duration::from_secs(30);

    // A wrong password: refused as unauthorized, and the error hides it.
    let wrong = url.replace(&format!("password={PASSWORD}"), "password=not-it");
    let registry = lodestar_etcd::EtcdRegistry::from_url(&wrong).unwrap();
    let error = lodestar_tests::bounded("a wrong password", registry.register(instance(), ttl))
        .await
        .unwrap_err();
    assert!(matches!(error, RegistryError::Unauthorized(_)), "{error:?}");
    assert!(!error.to_string().contains("not-it"), "{error}");

    // No credentials at all, against a member with auth on.
    let anonymous = url.split('&').next().unwrap().to_owned();
    assert!(anonymous.contains("?ca=") && !anonymous.contains("user="));
    let registry = lodestar_etcd::EtcdRegistry::from_url(&anonymous).unwrap();
    let error = lodestar_tests::bounded("no credentials", registry.register(instance(), ttl))
        .await
        .unwrap_err();
    assert!(matches!(error, RegistryError::Unauthorized(_)), "{error:?}");

    // No CA: the client speaks plaintext to a TLS-only member and gets a
    // bounded, clear failure rather than a hang.
    let plaintext = format!("etcd://{}", server.client);
    let registry = lodestar_etcd::EtcdRegistry::from_url(&plaintext).unwrap();
    let error = lodestar_tests::bounded(
        "plaintext to TLS",
        registry.instances(&ServiceKey::new("secured")),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, RegistryError::Unavailable(_)), "{error:?}");

    // The user's role covers the default prefix only.
    let elsewhere = format!("{url}&prefix=/not-lodestar");
    let registry = lodestar_etcd::EtcdRegistry::from_url(&elsewhere).unwrap();
    let error = lodestar_tests::bounded("outside the prefix", registry.register(instance(), ttl))
        .await
        .unwrap_err();
    assert!(matches!(error, RegistryError::Unauthorized(_)), "{error:?}");

    // The right URL works, and the instance is visible.
    let registry = lodestar_etcd::EtcdRegistry::from_url(&url).unwrap();
    lodestar_tests::bounded("register", registry.register(instance(), ttl))
        .await
        .unwrap();
    let found = registry
        .instances(&ServiceKey::new("secured"))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_resume_from_a_compacted_revision_resynchronises() {
    use lodestar::{Instance, ServiceKey, WatchEvent};
    use tokio_stream::StreamExt;
    let server = lodestar_tests::etcd::Etcd::single();
    lodestar_tests::etcd::ready(std::slice::from_ref(&server)).await;
    let registry = lodestar_etcd::EtcdRegistry::from_url(&server.url()).unwrap();
    let key = ServiceKey::new("compacted");
    registry
        .register(
            Instance::new("compacted", "10.0.0.1:1").with_id("a"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let mut watch = registry.watch(&key, None).await.unwrap();
    let old = match lodestar_tests::bounded("snapshot", watch.next())
        .await
        .unwrap()
        .unwrap()
    {
        WatchEvent::Snapshot { revision, .. } => revision,
        other => panic!("{other:?}"),
    };
    drop(watch);
    registry
        .register(
            Instance::new("compacted", "10.0.0.1:2").with_id("b"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    registry
        .register(
            Instance::new("compacted", "10.0.0.1:3").with_id("c"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    registry.compact().await.unwrap();
    // Resuming from before the compaction: a fresh snapshot, not an error loop.
    let mut resumed = registry.watch(&key, Some(old)).await.unwrap();
    match lodestar_tests::bounded("a resynchronising snapshot", resumed.next())
        .await
        .unwrap()
        .unwrap()
    {
        WatchEvent::Snapshot { instances, .. } => {
            let mut ids: Vec<String> = instances.into_iter().map(|i| i.id).collect();
            ids.sort();
            assert_eq!(ids, ["a", "b", "c"]);
        }
        other => panic!("expected a snapshot after compaction, got {other:?}"),
    }
}

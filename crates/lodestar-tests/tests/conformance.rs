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

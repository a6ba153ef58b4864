//! The registry conformance suite, for every backend.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use lodestar::{MemoryRegistry, Registry};
use lodestar_tests::conformance::Backend;
use lodestar_tests::registry_conformance;

registry_conformance!(memory, async {
    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
    (
        registry,
        Backend {
            short_ttl: Duration::from_millis(600),
        },
    )
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
    // The server lives as long as the test's runtime.
    std::mem::forget(server);
    let registry: Arc<dyn Registry> = Arc::new(lodestar_registry::RemoteRegistry::new(&[address]));
    (
        registry,
        Backend {
            short_ttl: Duration::from_millis(900),
        },
    )
});

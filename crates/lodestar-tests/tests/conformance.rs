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

/// The registry server's `KeepAlive` stream, which `RemoteRegistry` sends
/// its heartbeats on: each reference gets its answer, in order, on one
/// stream; a failed heartbeat is an answer, not the end of the stream; and
/// the stream needs the write token.
#[tokio::test]
async fn keepalive_stream_answers_each_heartbeat_in_order_and_needs_the_token() {
    use lodestar_registry::pb;
    let server = lodestar_registry_server::start(lodestar_registry_server::Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: None,
        warmup: Duration::ZERO,
        tokens: lodestar_registry_server::Tokens::single("s3cret").unwrap(),
        ..lodestar_registry_server::Config::default()
    })
    .await
    .unwrap();
    let address = server.local_addr().to_string();
    let registry =
        lodestar_registry::RemoteRegistry::new(std::slice::from_ref(&address)).with_token("s3cret");
    let instance = lodestar::Instance::new("kept", "127.0.0.1:1");
    registry
        .register(instance.clone(), Duration::from_secs(30))
        .await
        .unwrap();

    let client = lodestar::Client::new(
        lodestar::StaticRegistry::new().with(lodestar_registry::SERVICE_NAME, [address]),
    );
    let mut api =
        pb::registry_client::RegistryClient::by_name(&client, lodestar_registry::SERVICE_NAME);
    let reference = |id: &str| pb::InstanceRef {
        service: Some(lodestar_registry::key_to_pb(&instance.key)),
        id: id.to_owned(),
    };
    let (outbound, requests) = tokio::sync::mpsc::channel(8);
    let mut request = lodestar::Request::new(tokio_stream::wrappers::ReceiverStream::new(requests));
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let mut answers = lodestar_tests::bounded("open KeepAlive", api.keep_alive(request))
        .await
        .unwrap()
        .into_inner();
    for id in [instance.id.as_str(), "nobody", "", instance.id.as_str()] {
        outbound.send(reference(id)).await.unwrap();
    }
    let mut codes = Vec::new();
    for _ in 0..4 {
        let answer = lodestar_tests::bounded("a KeepAlive answer", answers.message())
            .await
            .unwrap()
            .expect("an answer");
        codes.push(answer.code);
    }
    // OK, NOT_FOUND, INVALID_ARGUMENT, and the stream still renews after.
    assert_eq!(codes, [0, 5, 3, 0]);
    drop(outbound);
    assert!(
        lodestar_tests::bounded("the end of KeepAlive", answers.message())
            .await
            .unwrap()
            .is_none()
    );

    // Without the token, no stream.
    let (_outbound, requests) = tokio::sync::mpsc::channel::<pb::InstanceRef>(1);
    let refused = lodestar_tests::bounded(
        "KeepAlive without the token",
        api.keep_alive(tokio_stream::wrappers::ReceiverStream::new(requests)),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), lodestar::Code::Unauthenticated);

    // RemoteRegistry's heartbeats (on its own stream) say the same.
    registry.heartbeat(&instance.instance_key()).await.unwrap();
    let unknown = lodestar::InstanceKey {
        service: instance.key.clone(),
        id: "nobody".to_owned(),
    };
    assert!(matches!(
        registry.heartbeat(&unknown).await,
        Err(lodestar::RegistryError::NotFound(_))
    ));
    // Many at once share the stream and each gets its own answer.
    let many = (0..64).map(|i| {
        let registry = registry.clone();
        let key = if i % 2 == 0 {
            instance.instance_key()
        } else {
            unknown.clone()
        };
        async move { (i, registry.heartbeat(&key).await) }
    });
    for (i, result) in futures_util::future::join_all(many).await {
        assert_eq!(result.is_ok(), i % 2 == 0, "heartbeat {i}: {result:?}");
    }
    // RemoteRegistry's stream is still open: shutting down ends it rather
    // than waiting out the drain's grace period (10 s).
    tokio::time::timeout(Duration::from_secs(3), server.shutdown())
        .await
        .expect("shutdown waited for the keep-alive stream")
        .unwrap();
}

/// A registry server whose handle is dropped (not shut down) keeps serving,
/// as a dropped `RunningService` does, and its KeepAlive streams with it.
#[tokio::test]
async fn keepalive_streams_outlive_a_dropped_registry_handle() {
    use lodestar_registry::pb;
    let server = lodestar_registry_server::start(lodestar_registry_server::Config::ephemeral())
        .await
        .unwrap();
    let address = server.local_addr().to_string();
    drop(server);
    let registry = lodestar_registry::RemoteRegistry::new(std::slice::from_ref(&address));
    let instance = lodestar::Instance::new("kept", "127.0.0.1:1");
    registry
        .register(instance.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    let client = lodestar::Client::new(
        lodestar::StaticRegistry::new().with(lodestar_registry::SERVICE_NAME, [address]),
    );
    let mut api =
        pb::registry_client::RegistryClient::by_name(&client, lodestar_registry::SERVICE_NAME);
    let (outbound, requests) = tokio::sync::mpsc::channel(1);
    let mut answers = lodestar_tests::bounded(
        "open KeepAlive",
        api.keep_alive(tokio_stream::wrappers::ReceiverStream::new(requests)),
    )
    .await
    .unwrap()
    .into_inner();
    outbound
        .send(pb::InstanceRef {
            service: Some(lodestar_registry::key_to_pb(&instance.key)),
            id: instance.id.clone(),
        })
        .await
        .unwrap();
    let answer = lodestar_tests::bounded("a KeepAlive answer", answers.message())
        .await
        .unwrap()
        .expect("an answer, not the end of the stream");
    assert_eq!(answer.code, 0);
}

/// A registry server as `RemoteRegistry`'s heartbeats may meet it: one
/// without `KeepAlive` (older), or one whose stream never answers (hung).
/// It counts the `Heartbeat` calls it gets.
mod keepalive_fallback {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use futures_util::Stream;
    use lodestar::{Registry, Request, Response, Status};
    use lodestar_registry::pb;

    type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    #[derive(Clone, Copy)]
    enum KeepAlive {
        Unimplemented,
        Silent,
    }

    struct Fake {
        keep_alive: KeepAlive,
        heartbeats: Arc<AtomicUsize>,
    }

    #[lodestar::async_trait]
    impl pb::registry_server::Registry for Fake {
        async fn register(
            &self,
            _: Request<pb::RegisterRequest>,
        ) -> Result<Response<pb::RegisterResponse>, Status> {
            Ok(Response::new(pb::RegisterResponse { revision: 1 }))
        }
        async fn heartbeat(
            &self,
            _: Request<pb::InstanceRef>,
        ) -> Result<Response<pb::HeartbeatResponse>, Status> {
            self.heartbeats.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(pb::HeartbeatResponse {}))
        }
        type KeepAliveStream = Answers<pb::KeepAliveResponse>;
        async fn keep_alive(
            &self,
            _: Request<lodestar::codegen::tonic::Streaming<pb::InstanceRef>>,
        ) -> Result<Response<Self::KeepAliveStream>, Status> {
            match self.keep_alive {
                KeepAlive::Unimplemented => Err(Status::unimplemented("no KeepAlive here")),
                KeepAlive::Silent => Ok(Response::new(Box::pin(futures_util::stream::pending()))),
            }
        }
        async fn deregister(
            &self,
            _: Request<pb::InstanceRef>,
        ) -> Result<Response<pb::DeregisterResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn get_instances(
            &self,
            _: Request<pb::GetInstancesRequest>,
        ) -> Result<Response<pb::GetInstancesResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn list_services(
            &self,
            _: Request<pb::ListServicesRequest>,
        ) -> Result<Response<pb::ListServicesResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        type WatchStream = Answers<pb::WatchResponse>;
        async fn watch(
            &self,
            _: Request<pb::WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn set_enabled(
            &self,
            _: Request<pb::SetEnabledRequest>,
        ) -> Result<Response<pb::SetEnabledResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn set_protection(
            &self,
            _: Request<pb::SetProtectionRequest>,
        ) -> Result<Response<pb::SetProtectionResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn status(
            &self,
            _: Request<pb::StatusRequest>,
        ) -> Result<Response<pb::StatusResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    async fn serve(keep_alive: KeepAlive) -> (lodestar::RunningService, Arc<AtomicUsize>, String) {
        let heartbeats = Arc::new(AtomicUsize::new(0));
        let fake = Fake {
            keep_alive,
            heartbeats: heartbeats.clone(),
        };
        let running = lodestar::Service::builder(lodestar_registry::SERVICE_NAME)
            .bind("127.0.0.1:0".parse().unwrap())
            .add_service(pb::registry_server::RegistryServer::new(fake))
            .start()
            .await
            .unwrap();
        let address = running.local_addr().to_string();
        (running, heartbeats, address)
    }

    #[tokio::test]
    async fn heartbeats_go_as_calls_to_a_server_without_keepalive() {
        let (_server, heartbeats, address) = serve(KeepAlive::Unimplemented).await;
        let registry = lodestar_registry::RemoteRegistry::new(&[address]);
        let instance = lodestar::Instance::new("older", "127.0.0.1:1");
        registry
            .register(instance.clone(), Duration::from_secs(30))
            .await
            .unwrap();
        for _ in 0..3 {
            lodestar_tests::bounded("a heartbeat", registry.heartbeat(&instance.instance_key()))
                .await
                .unwrap();
        }
        assert_eq!(heartbeats.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_stream_that_never_answers_is_given_up_in_time_for_the_lease() {
        let (_server, heartbeats, address) = serve(KeepAlive::Silent).await;
        let registry = lodestar_registry::RemoteRegistry::new(&[address]);
        let instance = lodestar::Instance::new("hung", "127.0.0.1:1");
        registry
            .register(instance.clone(), Duration::from_secs(30))
            .await
            .unwrap();
        let started = Instant::now();
        lodestar_tests::bounded("a heartbeat", registry.heartbeat(&instance.instance_key()))
            .await
            .expect("renewed by a call once the stream stalled");
        // Given up after about a second: well before the 3 s a heartbeat
        // may take, and the lease of a default service (6 s).
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(heartbeats.load(Ordering::SeqCst), 1);
    }
}

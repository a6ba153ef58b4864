//! A service's life: registration, health, reflection, graceful shutdown,
//! being killed, and the registry losing it. Real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use lodestar::server::Lifecycle;
use lodestar::{Registry, RunningService, Service, ServiceKey, WatchEvent};
use lodestar_tests::*;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn next_lifecycle(events: &mut lodestar::server::LifecycleEvents) -> Lifecycle {
    bounded("a lifecycle event", events.next())
        .await
        .expect("lifecycle events open")
}

async fn ids(world: &World, service: &str) -> Vec<String> {
    let mut ids: Vec<String> = world
        .registry
        .instances(&ServiceKey::new(service))
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_deregisters_closes_the_listener_then_drains_in_flight_streams() {
    let mut world = World::new();
    let running = world.start("echo", "a").await;
    let address = running.local_addr();
    assert_eq!(ids(&world, "echo").await, ["a"]);
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");

    let request = StreamRequest {
        count: 5,
        interval: Some(Duration::from_millis(150).try_into().unwrap()),
        token: "in-flight".into(),
        trailer: String::new(),
        ..Default::default()
    };
    let mut stream = bounded("stream start", echo.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    let first = bounded("first item", stream.next()).await.unwrap().unwrap();
    assert_eq!(first.message, "in-flight #0");

    let mut lifecycle = running.lifecycle();
    // Subscribing late still shows every step so far.
    assert_eq!(
        next_lifecycle(&mut lifecycle).await,
        Lifecycle::Serving(address)
    );
    assert_eq!(next_lifecycle(&mut lifecycle).await, Lifecycle::Registered);
    let shutdown = tokio::spawn(running.shutdown());
    assert_eq!(next_lifecycle(&mut lifecycle).await, Lifecycle::NotServing);
    assert_eq!(
        next_lifecycle(&mut lifecycle).await,
        Lifecycle::Deregistered
    );
    assert_eq!(
        next_lifecycle(&mut lifecycle).await,
        Lifecycle::ListenerClosed
    );
    // By the time the listener is closed, the registry no longer lists the instance...
    assert!(ids(&world, "echo").await.is_empty());
    // ...and no new connection is accepted.
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the listener should be closed"
    );

    // The stream in flight still runs to its end.
    let rest: Vec<EchoReply> = bounded(
        "the rest of the stream",
        stream.collect::<Result<Vec<_>, _>>(),
    )
    .await
    .unwrap();
    let messages: Vec<String> = rest.into_iter().map(|r| r.message).collect();
    assert_eq!(
        messages,
        [
            "in-flight #1",
            "in-flight #2",
            "in-flight #3",
            "in-flight #4"
        ]
    );
    assert_eq!(
        next_lifecycle(&mut lifecycle).await,
        Lifecycle::Drained { cut: 0 }
    );
    bounded("shutdown", shutdown).await.unwrap().unwrap();
    assert_eq!(
        world.next_event().await,
        Event::StreamEnded {
            token: "in-flight".into(),
            completed: true
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_still_open_at_the_end_of_the_grace_period_are_cut() {
    let world = World::new();
    let running = world
        .builder("echo", "a")
        .grace_period(Duration::from_millis(300))
        .add_service(EchoServer::new(world.echo("a")))
        .start()
        .await
        .unwrap();
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    let request = StreamRequest {
        count: 10_000,
        interval: Some(Duration::from_millis(20).try_into().unwrap()),
        token: "endless".into(),
        trailer: String::new(),
        ..Default::default()
    };
    let mut stream = bounded("stream start", echo.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    bounded("first item", stream.next()).await.unwrap().unwrap();
    let mut lifecycle = running.lifecycle();
    let started = tokio::time::Instant::now();
    bounded("shutdown", running.shutdown()).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let mut last = None;
    while let Some(event) = lifecycle.try_next() {
        last = Some(event);
    }
    assert_eq!(last, Some(Lifecycle::Drained { cut: 1 }));
    let ended = bounded("the cut stream", async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await;
    assert!(
        ended.is_some(),
        "a cut stream must not look like a clean end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_then_not_serving_during_shutdown() {
    let world = World::new();
    let running = world.start("echo", "a").await;
    let client = direct("health", running.local_addr()).await;
    let mut health = HealthClient::new(client.channel("health"));
    for service in ["", "lodestar.test.Echo"] {
        let response = bounded(
            "health check",
            health.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    let status = bounded(
        "health check",
        health.check(HealthCheckRequest {
            service: "no.such.Service".into(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), lodestar::Code::NotFound);

    let mut watch = bounded(
        "health watch",
        health.watch(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let first = bounded("watch item", watch.next()).await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let shutdown = tokio::spawn(running.shutdown());
    let next = bounded("watch item", watch.next()).await.unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    bounded("shutdown", shutdown).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as V1Request;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse as V1Response;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as V1Alpha;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as V1AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as V1AlphaResponse;

    let world = World::new();
    let running = world.start("echo", "a").await;
    let client = direct("reflect", running.local_addr()).await;

    let mut v1 = V1::new(client.channel("reflect"));
    let requests = vec![
        tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(V1Request::ListServices(String::new())),
        },
        tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(V1Request::FileContainingSymbol("lodestar.test.Echo".into())),
        },
    ];
    let responses: Vec<_> = bounded("reflection v1", async {
        v1.server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner()
            .collect::<Result<Vec<_>, _>>()
            .await
    })
    .await
    .unwrap();
    let Some(V1Response::ListServicesResponse(list)) = &responses[0].message_response else {
        panic!("expected a service list, got {:?}", responses[0]);
    };
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "lodestar.test.Echo"
        ]
    );
    let Some(V1Response::FileDescriptorResponse(files)) = &responses[1].message_response else {
        panic!("expected file descriptors, got {:?}", responses[1]);
    };
    assert!(!files.file_descriptor_proto.is_empty());

    let mut v1alpha = V1Alpha::new(client.channel("reflect"));
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1AlphaRequest::ListServices(String::new())),
    };
    let responses: Vec<_> = bounded("reflection v1alpha", async {
        v1alpha
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner()
            .collect::<Result<Vec<_>, _>>()
            .await
    })
    .await
    .unwrap();
    let Some(V1AlphaResponse::ListServicesResponse(list)) = &responses[0].message_response else {
        panic!("expected a service list, got {:?}", responses[0]);
    };
    assert!(list.service.iter().any(|s| s.name == "lodestar.test.Echo"));
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_skipped_by_clients_and_expires_from_the_registry() {
    let world = World::new();
    let mut running: Vec<RunningService> = Vec::new();
    for name in ["a", "b", "c"] {
        running.push(world.start("echo", name).await);
    }
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    // Every instance has served, so the client holds a connection to each.
    for _ in 0..6 {
        bounded("warm-up call", echo.unary(EchoRequest::default()))
            .await
            .unwrap();
    }
    let key = ServiceKey::new("echo");
    let mut watch = world
        .registry
        .watch(&key, Some(world.registry.revision()))
        .await
        .unwrap();

    let killed = running.pop().unwrap();
    killed.abort().await;
    let killed_at = tokio::time::Instant::now();
    for n in 0..30 {
        let reply = bounded(
            "call after the kill",
            echo.unary(EchoRequest {
                message: n.to_string(),
                payload: vec![],
            }),
        )
        .await
        .unwrap_or_else(|status| panic!("call {n} after the kill failed: {status:?}"))
        .into_inner();
        assert_ne!(
            reply.served_by, "c",
            "call {n} was served by the killed instance"
        );
    }
    // Nobody deregistered it: its lease (900 ms) runs out.
    let event = bounded("the killed instance to expire", watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&event, WatchEvent::Delete { id, .. } if id == "c"),
        "{event:?}"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(3),
        "expired after {:?}",
        killed_at.elapsed()
    );
    assert_eq!(ids(&world, "echo").await, ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_the_registry_lost_registers_again() {
    let world = World::new();
    let running = world.start("echo", "a").await;
    let key = ServiceKey::new("echo");
    let mut watch = world
        .registry
        .watch(&key, Some(world.registry.revision()))
        .await
        .unwrap();
    world
        .registry
        .deregister(&running.instance().instance_key())
        .await
        .unwrap();
    let event = bounded("deletion", watch.next()).await.unwrap().unwrap();
    assert!(matches!(event, WatchEvent::Delete { .. }), "{event:?}");
    // The next heartbeat finds the lease gone and registers again.
    let event = bounded("registration again", watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&event, WatchEvent::Put { instance, .. } if instance.id == "a"),
        "{event:?}"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_the_registry_refuses_fails_start() {
    let world = World::new();
    let error = world
        .builder("echo", "a")
        .advertise("")
        .add_service(EchoServer::new(world.echo("a")))
        .start()
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("refused to register a") && message.contains("empty address"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_a_busy_address_is_a_clear_error() {
    let world = World::new();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = busy.local_addr().unwrap();
    let error = Service::builder("echo")
        .bind(address)
        .add_service(EchoServer::new(world.echo("a")))
        .start()
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&address.to_string()) && message.contains("bind"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_a_registry_serves_and_registers_its_real_port() {
    let world = World::new();
    let running = Service::builder("echo")
        .add_service(EchoServer::new(world.echo("solo")))
        .start()
        .await
        .unwrap();
    assert_ne!(running.local_addr().port(), 0);
    assert_eq!(running.instance().address, running.local_addr().to_string());
    let client = direct("solo", running.local_addr()).await;
    let mut echo = EchoClient::by_name(&client, "solo");
    let reply = bounded("unary", echo.unary(EchoRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.served_by, "solo");
    running.shutdown().await.unwrap();
}

//! Calls through discovery: every call kind, spreading, deadlines,
//! cancellation, metadata, status codes, and bad input. Real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::error::Error as _;
use std::time::Duration;

use lodestar::client::{Channel, Strategy};
use lodestar::{Client, Code, Instance, MessageLimits, Registry, Request};
use lodestar_tests::*;
use tokio_stream::StreamExt;

fn spread(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

fn expect_even(counts: &BTreeMap<String, usize>, per_instance: usize) {
    let expected: BTreeMap<String, usize> = ["a", "b", "c"]
        .iter()
        .map(|n| (n.to_string(), per_instance))
        .collect();
    assert_eq!(
        counts, &expected,
        "calls should be spread evenly over all three instances"
    );
}

async fn three(world: &World) -> Vec<lodestar::RunningService> {
    let mut running = Vec::new();
    for name in ["a", "b", "c"] {
        running.push(world.start("echo", name).await);
    }
    running
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_kind_is_spread_over_three_instances() {
    let world = World::new();
    let _running = three(&world).await;
    let client = Client::builder(world.registry.clone())
        .strategy(Strategy::RoundRobin)
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");

    let mut served = Vec::new();
    for n in 0..9 {
        let reply = bounded(
            "unary",
            echo.unary(EchoRequest {
                message: format!("m{n}"),
                payload: vec![],
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(reply.message, format!("m{n}"));
        served.push(reply.served_by);
    }
    expect_even(&spread(served), 3);

    let mut served = Vec::new();
    for n in 0..6 {
        let request = StreamRequest {
            count: 3,
            interval: None,
            token: format!("s{n}"),
            ..Default::default()
        };
        let stream = bounded("server stream", echo.server_stream(request))
            .await
            .unwrap()
            .into_inner();
        let replies: Vec<EchoReply> =
            bounded("server stream items", stream.collect::<Result<Vec<_>, _>>())
                .await
                .unwrap();
        assert_eq!(
            replies
                .iter()
                .map(|r| r.message.clone())
                .collect::<Vec<_>>(),
            [format!("s{n} #0"), format!("s{n} #1"), format!("s{n} #2")]
        );
        served.push(replies[0].served_by.clone());
    }
    expect_even(&spread(served), 2);

    let mut served = Vec::new();
    for _ in 0..6 {
        let messages = (0..5).map(|i| EchoRequest {
            message: i.to_string(),
            payload: vec![0; 100],
        });
        let reply = bounded(
            "client stream",
            echo.client_stream(tokio_stream::iter(messages)),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(
            (reply.message.as_str(), reply.payload_len),
            ("5 messages", 500)
        );
        served.push(reply.served_by);
    }
    expect_even(&spread(served), 2);

    let mut served = Vec::new();
    for _ in 0..6 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut replies = bounded(
            "bidi",
            echo.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .unwrap()
        .into_inner();
        // Ping-pong: each reply arrives before the next message is sent.
        for i in 0..3 {
            tx.send(EchoRequest {
                message: format!("ping {i}"),
                payload: vec![],
            })
            .await
            .unwrap();
            let reply = bounded("bidi reply", replies.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(reply.message, format!("ping {i}"));
            served.push(reply.served_by);
        }
        drop(tx);
        assert!(bounded("bidi end", replies.next()).await.is_none());
    }
    let counts = spread(served);
    expect_even(&counts, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_strategy_reaches_every_instance() {
    let world = World::new();
    let _running = three(&world).await;
    let client = Client::builder(world.registry.clone())
        .strategy(Strategy::Random)
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let mut served = Vec::new();
    for _ in 0..60 {
        let reply = bounded("unary", echo.unary(EchoRequest::default()))
            .await
            .unwrap();
        served.push(reply.into_inner().served_by);
    }
    let counts = spread(served);
    assert_eq!(
        counts.len(),
        3,
        "60 random picks should reach all three instances: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_exceeded_reaches_the_caller_and_cancels_the_handler() {
    let mut world = World::new();
    let _running = world.start("echo", "a").await;
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");

    let mut request = Request::new(sleep_request("slow", Duration::from_secs(30)));
    request.set_timeout(Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    let status = bounded("the sleeping call", echo.sleep(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    world.expect_sleep_cancelled("slow").await;

    // A client-wide default deadline works the same way.
    let client = Client::builder(world.registry.clone())
        .timeout(Duration::from_millis(150))
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let status = bounded(
        "the sleeping call",
        echo.sleep(sleep_request("default", Duration::from_secs(30))),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    world.expect_sleep_cancelled("default").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_unary_call_cancels_the_handler() {
    let mut world = World::new();
    let _running = world.start("echo", "a").await;
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    let call = tokio::spawn(async move {
        echo.sleep(sleep_request("abandoned", Duration::from_secs(60)))
            .await
    });
    assert_eq!(
        world.next_event().await,
        Event::SleepStarted("abandoned".into())
    );
    call.abort();
    assert_eq!(
        world.next_event().await,
        Event::SleepCancelled("abandoned".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_mid_stream_ends_the_stream() {
    let mut world = World::new();
    let _running = world.start("echo", "a").await;
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    let mut request = Request::new(StreamRequest {
        count: 1000,
        interval: Some(Duration::from_millis(20).try_into().unwrap()),
        token: "long".into(),
        trailer: String::new(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let mut stream = bounded("stream start", echo.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    let status = loop {
        match bounded("stream item", stream.next()).await {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("the stream ended without an error after {received} items"),
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(received > 0 && received < 1000, "{received}");
    assert_eq!(
        world.next_event().await,
        Event::StreamEnded {
            token: "long".into(),
            completed: false
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_deadline_bounds_nested_calls() {
    let world = World::new();
    let _front = world.start("front", "front-1").await;
    let _back = world.start("back", "back-1").await;
    let client = world.client();
    let mut front = EchoClient::by_name(&client, "front");

    let mut request = Request::new(NestedRequest {
        service: "back".into(),
    });
    request.set_timeout(Duration::from_millis(2500));
    let report = bounded("nested call", front.nested(request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.served_by, "back-1");
    assert!(report.has_deadline, "the nested call carried no deadline");
    assert!(
        report.remaining_ms > 0 && report.remaining_ms <= 2500,
        "{report:?}"
    );

    // Without an inbound deadline the nested call has none either.
    let report = bounded(
        "nested call",
        front.nested(NestedRequest {
            service: "back".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(!report.has_deadline, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_server_stream_ends_it_on_the_server() {
    let mut world = World::new();
    let _running = world.start("echo", "a").await;
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    let request = StreamRequest {
        count: 10_000,
        interval: Some(Duration::from_millis(5).try_into().unwrap()),
        token: "dropped".into(),
        trailer: String::new(),
        ..Default::default()
    };
    let mut stream = bounded("stream start", echo.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        bounded("stream item", stream.next())
            .await
            .unwrap()
            .unwrap();
    }
    drop(stream);
    assert_eq!(
        world.next_event().await,
        Event::StreamEnded {
            token: "dropped".into(),
            completed: false
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_trailers_round_trip() {
    let world = World::new();
    let _running = world.start("echo", "a").await;
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");

    let mut request = Request::new(EchoRequest {
        message: "hi".into(),
        payload: vec![],
    });
    request
        .metadata_mut()
        .insert("x-request-id", "abc-123".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-tenant", "blue".parse().unwrap());
    let response = bounded("unary", echo.unary(request)).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "abc-123");
    assert_eq!(response.metadata().get("x-tenant").unwrap(), "blue");

    let status = bounded(
        "fail",
        echo.fail(FailRequest {
            code: Code::NotFound as i32,
            message: "no such order: ünïcode ✓".into(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no such order: ünïcode ✓");
    assert_eq!(status.metadata().get("x-failed-by").unwrap(), "a");

    for code in [
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::AlreadyExists,
        Code::Aborted,
        Code::DataLoss,
    ] {
        let status = bounded(
            "fail",
            echo.fail(FailRequest {
                code: code as i32,
                message: format!("{code:?}"),
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (code, format!("{code:?}").as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_service_name_is_an_error_naming_it() {
    let world = World::new();
    let _running = world.start("echo", "a").await;
    let client = world.client();
    let mut nobody = EchoClient::by_name(&client, "no-such-service");
    let status = bounded("call to nobody", nobody.unary(EchoRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("no-such-service"),
        "{}",
        status.message()
    );
    let source = status
        .source()
        .and_then(|e| e.downcast_ref::<lodestar::client::Error>());
    assert!(
        matches!(source, Some(lodestar::client::Error::NoInstances { service }) if service.service == "no-such-service"),
        "{source:?}"
    );
}

async fn call_path(channel: Channel, path: &'static str) -> lodestar::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = lodestar::codegen::tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    grpc.unary(
        Request::new(EchoRequest::default()),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_and_grpc_services_are_unimplemented() {
    let world = World::new();
    let _running = world.start("echo", "a").await;
    let client = world.client();
    let status = bounded(
        "unknown method",
        call_path(client.channel("echo"), "/lodestar.test.Echo/NoSuchMethod"),
    )
    .await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let status = bounded(
        "unknown service",
        call_path(client.channel("echo"), "/lodestar.test.Nope/Unary"),
    )
    .await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    // The server keeps serving.
    let mut echo = EchoClient::by_name(&client, "echo");
    bounded("unary", echo.unary(EchoRequest::default()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_resource_exhausted_and_the_next_call_succeeds() {
    let world = World::new();
    let limits = MessageLimits {
        max_decoding_message_size: 64 * 1024,
        ..MessageLimits::default()
    };
    let _running = world.start_with_limits("echo", "a", limits).await;
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    for kind in ["unary", "client stream"] {
        let big = EchoRequest {
            message: "big".into(),
            payload: vec![7; 100 * 1024],
        };
        let status = match kind {
            "unary" => bounded(kind, echo.write(big)).await.unwrap_err(),
            _ => bounded(kind, echo.client_stream(tokio_stream::iter(vec![big])))
                .await
                .unwrap_err(),
        };
        assert_eq!(status.code(), Code::ResourceExhausted, "{kind}: {status:?}");
        assert!(
            status.message().contains("65536"),
            "{kind}: {}",
            status.message()
        );
        let small = EchoRequest {
            message: "small".into(),
            payload: vec![7; 60 * 1024],
        };
        let reply = bounded("the next call", echo.write(small))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.payload_len, 60 * 1024);
    }
    // A response over the server's send limit ends the call with RESOURCE_EXHAUSTED.
    let limits = MessageLimits {
        max_encoding_message_size: 1024,
        ..MessageLimits::default()
    };
    let _small = world.start_with_limits("small-replies", "s", limits).await;
    let mut small = EchoClient::by_name(&client, "small-replies");
    let request = StreamRequest {
        count: 2,
        interval: None,
        token: "y".repeat(2048),
        ..Default::default()
    };
    let mut stream = bounded("stream start", small.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    let status = bounded("stream item", stream.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let request = StreamRequest {
        count: 2,
        interval: None,
        token: "short".into(),
        ..Default::default()
    };
    let stream = bounded("stream start", small.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        bounded("items", stream.collect::<Result<Vec<_>, _>>())
            .await
            .unwrap()
            .len(),
        2
    );

    // The client enforces its own limits too, before anything is sent.
    let client = lodestar::Client::builder(world.registry.clone())
        .message_limits(MessageLimits {
            max_encoding_message_size: 1024,
            ..MessageLimits::default()
        })
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let status = bounded(
        "client-side limit",
        echo.write(EchoRequest {
            message: String::new(),
            payload: vec![1; 4096],
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_that_refuse_connections_are_skipped_for_every_call_kind() {
    let world = World::new();
    let _running = world.start("echo", "live").await;
    // Two registered instances with nothing listening behind them.
    for dead in ["dead-1", "dead-2"] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        world
            .registry
            .register(
                Instance::new("echo", address).with_id(dead),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    for _ in 0..10 {
        let reply = bounded("unary", echo.unary(EchoRequest::default()))
            .await
            .unwrap();
        assert_eq!(reply.into_inner().served_by, "live");
        let reply = bounded("not idempotent", echo.write(EchoRequest::default()))
            .await
            .unwrap();
        assert_eq!(reply.into_inner().served_by, "live");
        let stream = bounded(
            "server stream",
            echo.server_stream(StreamRequest {
                count: 1,
                interval: None,
                token: String::new(),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner();
        let replies = bounded("items", stream.collect::<Result<Vec<_>, _>>())
            .await
            .unwrap();
        assert_eq!(replies[0].served_by, "live");
        let reply = bounded(
            "client stream",
            echo.client_stream(tokio_stream::iter(vec![EchoRequest::default()])),
        )
        .await
        .unwrap();
        assert_eq!(reply.into_inner().served_by, "live");
        let replies = bounded(
            "bidi",
            echo.bidi(tokio_stream::iter(vec![EchoRequest::default()])),
        )
        .await
        .unwrap()
        .into_inner();
        let replies = bounded("bidi items", replies.collect::<Result<Vec<_>, _>>())
            .await
            .unwrap();
        assert_eq!(replies[0].served_by, "live");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_no_instance_can_be_reached_the_error_says_which_were_tried() {
    let world = World::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    world
        .registry
        .register(
            Instance::new("echo", address.clone()),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    let status = bounded("unary", echo.unary(EchoRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains(&address) && status.message().contains("echo"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_queued_behind_a_hanging_connect_share_its_failure() {
    let world = World::new();
    let _live = world.start("echo", "b-live").await;
    let hole = Blackhole::new();
    world
        .registry
        .register(
            Instance::new("echo", hole.address.to_string()).with_id("a-hole"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let client = Client::builder(world.registry.clone())
        .connect_timeout(Duration::from_millis(500))
        .build();
    let started = tokio::time::Instant::now();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut echo = EchoClient::by_name(&client, "echo");
            tokio::spawn(async move { echo.unary(EchoRequest::default()).await })
        })
        .collect();
    for call in calls {
        let reply = bounded("a call", call).await.unwrap().unwrap();
        assert_eq!(reply.into_inner().served_by, "b-live");
    }
    // One 500 ms connect attempt, shared; one after another would take 2 s or more.
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1800), "took {took:?}");
}

/// Always the first endpoint a call may use (ordered by instance id).
#[derive(Debug, Clone)]
struct First;

impl lodestar::client::selector::Selector for First {
    fn select(
        &self,
        _endpoints: &[std::sync::Arc<lodestar::client::selector::Endpoint>],
        _call: &lodestar::client::selector::CallInfo<'_>,
    ) -> Option<usize> {
        Some(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_carries_the_time_that_is_left() {
    let world = World::new();
    let _live = world.start("echo", "b-live").await;
    let hole = Blackhole::new();
    world
        .registry
        .register(
            Instance::new("echo", hole.address.to_string()).with_id("a-hole"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let client = Client::builder(world.registry.clone())
        .connect_timeout(Duration::from_millis(1000))
        .selector(First)
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let mut request = Request::new(());
    request.set_timeout(Duration::from_secs(3));
    // The first pick is the hole (ids sort first); after its 1 s connect
    // timeout, the live instance gets what is left of the 3 s.
    let report = bounded("the call", echo.report_deadline(request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.served_by, "b-live");
    assert!(
        report.has_deadline && report.remaining_ms <= 2100,
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_messages_before_an_oversized_one_are_delivered() {
    let world = World::new();
    let limits = MessageLimits {
        max_encoding_message_size: 1024,
        ..MessageLimits::default()
    };
    let _running = world.start_with_limits("echo", "a", limits).await;
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    let requests = vec![
        EchoRequest {
            message: "small".into(),
            payload: vec![],
        },
        EchoRequest {
            message: "x".repeat(2048),
            payload: vec![],
        },
    ];
    let mut replies = bounded("bidi", echo.bidi(tokio_stream::iter(requests)))
        .await
        .unwrap()
        .into_inner();
    let first = bounded("first reply", replies.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.message, "small");
    let status = bounded("second reply", replies.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_in_the_middle_of_a_stream_is_resource_exhausted() {
    let world = World::new();
    let _running = world.start("echo", "a").await;
    let client = Client::builder(world.registry.clone())
        .message_limits(MessageLimits {
            max_encoding_message_size: 1024,
            ..MessageLimits::default()
        })
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = bounded(
        "bidi",
        echo.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .into_inner();
    tx.send(EchoRequest {
        message: "small".into(),
        payload: vec![],
    })
    .await
    .unwrap();
    assert_eq!(next_message("reply", &mut replies).await, "small");
    tx.send(EchoRequest {
        message: String::new(),
        payload: vec![0; 4096],
    })
    .await
    .unwrap();
    let status = bounded("the oversized send", replies.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_outlives_its_first_runtime_keeps_following_the_registry() {
    let world = World::new();
    let _a = world.start("echo", "a").await;
    let client = world.client();
    let first = client.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut echo = EchoClient::by_name(&first, "echo");
            echo.unary(EchoRequest::default()).await.unwrap();
        });
        // The runtime, and the resolver it ran, end here.
    })
    .join()
    .unwrap();
    let _b = world.start("echo", "b").await;
    let mut echo = EchoClient::by_name(&client, "echo");
    bounded("a call served by the instance that came later", async {
        loop {
            let reply = echo
                .unary(EchoRequest::default())
                .await
                .unwrap()
                .into_inner();
            if reply.served_by == "b" {
                break;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_limits_the_calls_open_on_one_connection() {
    let world = World::new();
    let settings = lodestar::Http2Settings {
        max_concurrent_streams: 1,
        ..lodestar::Http2Settings::server()
    };
    let _running = world
        .builder("echo", "a")
        .http2(settings)
        .add_service(EchoServer::new(world.echo("a")))
        .start()
        .await
        .unwrap();
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo");
    let request = stream_request("holding", 10_000, Duration::from_millis(10));
    let mut stream = bounded("stream start", echo.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    bounded("first item", stream.next()).await.unwrap().unwrap();
    // The one slot is taken: another call waits for it, here until its deadline.
    let mut request = Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_millis(300));
    let status = bounded("the waiting call", echo.unary(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(stream);
    bounded(
        "a call once the slot is free",
        echo.unary(EchoRequest::default()),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_its_protection_threshold_a_client_calls_every_enabled_instance() {
    let world = World::new();
    let mut running = Vec::new();
    for name in ["a", "b", "c", "d"] {
        running.push(world.start("echo", name).await);
    }
    for name in ["b", "c", "d"] {
        let key = lodestar::InstanceKey {
            service: lodestar::ServiceKey::new("echo"),
            id: name.into(),
        };
        world.registry.set_health(&key, false).unwrap();
    }
    let spread_with = |threshold: f64| {
        let client = Client::builder(world.registry.clone())
            .protection_threshold(threshold)
            .build();
        async move {
            let mut echo = EchoClient::by_name(&client, "echo");
            let mut served = Vec::new();
            for _ in 0..12 {
                served.push(
                    bounded("unary", echo.unary(EchoRequest::default()))
                        .await
                        .unwrap()
                        .into_inner()
                        .served_by,
                );
            }
            spread(served)
        }
    };
    // Without protection, one healthy instance takes everything.
    assert_eq!(spread_with(0.0).await.keys().collect::<Vec<_>>(), ["a"]);
    // One in four healthy is below half: every enabled instance takes calls.
    assert_eq!(spread_with(0.5).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_does_not_send_a_malformed_grpc_timeout() {
    let mut world = World::new();
    let _running = world.start("echo", "a").await;
    let mut echo = EchoClient::by_name(&world.client(), "echo");
    let mut request = Request::new(sleep_request("never", Duration::from_secs(30)));
    request
        .metadata_mut()
        .insert("grpc-timeout", "abc".parse().unwrap());
    let status = bounded("the refused call", echo.sleep(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("malformed grpc-timeout \"abc\""),
        "{status:?}"
    );
    // Refused before sending: the handler never ran.
    let mut request = Request::new(sleep_request("sent", Duration::ZERO));
    request.set_timeout(Duration::from_secs(5));
    bounded("a well-formed call", echo.sleep(request))
        .await
        .unwrap();
    assert_eq!(world.next_event().await, Event::SleepStarted("sent".into()));
}

/// What a test's server layer answers a call with.
type Answer = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<lodestar::server::ResponseBody>, tower::BoxError>,
            > + Send,
    >,
>;

/// A test's server layer, written as a closure that gets each request and
/// the services below, and answers.
fn intercept<F>(
    answer: F,
) -> impl tower::Layer<lodestar::server::Next, Service = Intercept<F>> + Clone
where
    F: FnMut(http::Request<lodestar::server::RequestBody>, &mut lodestar::server::Next) -> Answer
        + Clone,
{
    tower::layer::layer_fn(move |inner| Intercept {
        inner,
        answer: answer.clone(),
    })
}

/// See [`intercept`].
#[derive(Clone)]
struct Intercept<F> {
    inner: lodestar::server::Next,
    answer: F,
}

impl<F> tower_service::Service<http::Request<lodestar::server::RequestBody>> for Intercept<F>
where
    F: FnMut(http::Request<lodestar::server::RequestBody>, &mut lodestar::server::Next) -> Answer,
{
    type Response = http::Response<lodestar::server::ResponseBody>;
    type Error = tower::BoxError;
    type Future = Answer;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), tower::BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<lodestar::server::RequestBody>) -> Answer {
        (self.answer)(request, &mut self.inner)
    }
}

#[path = "calls/admission.rs"]
mod admission;
#[path = "calls/browser.rs"]
mod browser;
#[path = "calls/client_stack.rs"]
mod client_stack;
#[path = "calls/guards.rs"]
mod guards;
#[path = "calls/metrics.rs"]
mod metrics;
#[path = "calls/rest.rs"]
mod rest;
#[path = "calls/retries.rs"]
mod retries;
#[path = "calls/server_stack.rs"]
mod server_stack;
#[path = "calls/telemetry.rs"]
mod telemetry;
#[path = "calls/traffic.rs"]
mod traffic;
#[path = "calls/web.rs"]
mod web;

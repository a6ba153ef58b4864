//! The client stack: user layers, the attempt observer, selectors and the
//! per-endpoint record, and trace context across nested calls.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodestar::client::observe::{Attempt, Outcome};
use lodestar::client::selector::{CallInfo, Endpoint, Selector};
use lodestar::{Client, Code, Instance, Registry, Request};
use lodestar_tests::pb::NestedRequest;
use lodestar_tests::pb::echo_server::EchoServer;
use lodestar_tests::*;

/// An HTTP/2 server that takes one request on each connection and never
/// answers it. Unless `hang`, it then drops the connection: an instance
/// dying while it holds the call. With `hang`, it reads nothing more (no
/// PING is answered) and holds the connection open: an instance that hangs.
async fn unanswering_instance(hang: bool) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                let _request = connection.accept().await;
                if hang {
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    address
}

/// A tower layer that counts the calls passing through it.
fn counting(
    calls: Arc<AtomicUsize>,
) -> tower::util::MapRequestLayer<
    impl Fn(http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> + Clone,
> {
    tower::util::MapRequestLayer::new(move |request| {
        calls.fetch_add(1, Ordering::Relaxed);
        request
    })
}

/// Picks the first endpoint the call may use (they are sorted by id).
#[derive(Debug, Clone)]
struct First;

impl Selector for First {
    fn select(&self, _endpoints: &[Arc<Endpoint>], _call: &CallInfo<'_>) -> Option<usize> {
        Some(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_layers_see_one_call_and_the_observer_every_attempt() {
    let world = World::new();
    let _live = world.start("echo", "c-live").await;
    // Ids sort: a, then b, then the live c.
    let mut dying = Vec::new();
    for id in ["a-dying", "b-dying"] {
        let address = unanswering_instance(false).await;
        dying.push(address.to_string());
        world
            .registry
            .register(
                Instance::new("echo", address.to_string()).with_id(id),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    let (built, wrapped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let (seen, seen_attempts) = (attempts.clone(), attempts.clone());
    let client = Client::builder(world.registry.clone())
        .selector(First)
        .layer(counting(built.clone()))
        .observe(move |attempt: &Attempt<'_>| {
            seen.lock().unwrap().push((
                attempt.number,
                attempt.endpoint.instance().id.clone(),
                attempt.outcome.clone(),
                attempt.sent,
            ));
        })
        .build();
    // A layer of the caller's own, around the channel: the call still knows
    // its method is idempotent, so it is sent again.
    let channel = tower::ServiceBuilder::new()
        .layer(counting(wrapped.clone()))
        .service(client.channel("echo"));
    let mut echo = EchoClient::new(channel);

    let reply = bounded("the call", echo.unary(pb::EchoRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.served_by, "c-live");
    assert_eq!(built.load(Ordering::Relaxed), 1, "the client's layer");
    assert_eq!(wrapped.load(Ordering::Relaxed), 1, "the caller's layer");
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    for (i, id) in ["a-dying", "b-dying"].into_iter().enumerate() {
        let (number, endpoint, outcome, sent) = &attempts[i];
        assert_eq!(
            (*number as usize, endpoint.as_str(), *sent),
            (i + 1, id, true)
        );
        assert!(matches!(outcome, Outcome::Transport(_)), "{outcome:?}");
    }
    assert_eq!(
        attempts[2],
        (3, "c-live".to_owned(), Outcome::Status(Code::Ok), true)
    );

    // A large message is kept whole, and replayed whole.
    let reply = bounded(
        "a large call",
        echo.unary(pb::EchoRequest {
            message: "large".into(),
            payload: vec![7; 300 * 1024],
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        (reply.served_by.as_str(), reply.payload_len),
        ("c-live", 300 * 1024)
    );
    let attempts = seen_attempts.lock().unwrap().clone();
    let went_to: Vec<_> = attempts[3..].iter().map(|a| (a.0, a.1.as_str())).collect();
    assert_eq!(went_to, [(1, "a-dying"), (2, "b-dying"), (3, "c-live")]);
}

/// Picks the instance labelled `pick=me`, whatever else there is.
#[derive(Debug, Clone, Default)]
struct Labelled {
    reports: Arc<AtomicUsize>,
}

impl Selector for Labelled {
    fn select(&self, endpoints: &[Arc<Endpoint>], _call: &CallInfo<'_>) -> Option<usize> {
        endpoints
            .iter()
            .position(|e| e.instance().metadata.get("pick").is_some_and(|v| v == "me"))
    }

    fn report(&self, _attempt: &Attempt<'_>) {
        self.reports.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_selector_picks_every_call_and_in_flight_counts_return_to_zero() {
    let mut world = World::new();
    let _a = world.start("echo", "a").await;
    let _picked = bounded(
        "the labelled instance to start",
        world
            .builder("echo", "b-picked")
            .metadata("pick", "me")
            .add_service(EchoServer::new(world.echo("b-picked")))
            .start(),
    )
    .await
    .unwrap();
    let _c = world.start("echo", "c").await;
    let selector = Labelled::default();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let seen = outcomes.clone();
    let client = Client::builder(world.registry.clone())
        .selector(selector.clone())
        .observe(move |attempt: &Attempt<'_>| {
            seen.lock().unwrap().push(attempt.outcome.clone());
        })
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let channel = client.channel("echo");
    // Wait until all three are known, so the choice is the selector's.
    bounded("three instances", async {
        while channel.addresses().len() < 3 {
            let _ = echo.unary(pb::EchoRequest::default()).await;
            tokio::task::yield_now().await;
        }
    })
    .await;

    outcomes.lock().unwrap().clear();
    // Completions, and errors of every sort.
    for _ in 0..6 {
        let reply = bounded("a call", echo.unary(pb::EchoRequest::default()))
            .await
            .unwrap();
        assert_eq!(reply.into_inner().served_by, "b-picked");
    }
    let failed = bounded(
        "a failing call",
        echo.fail(pb::FailRequest {
            code: Code::NotFound as i32,
            message: "no".into(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(failed.code(), Code::NotFound);
    assert_eq!(failed.metadata().get("x-failed-by").unwrap(), "b-picked");
    // A deadline that passes while the handler sleeps.
    let mut request = Request::new(sleep_request("deadline", Duration::from_secs(30)));
    request.set_timeout(Duration::from_millis(100));
    let status = bounded("a call past its deadline", echo.sleep(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    world.expect_sleep_cancelled("deadline").await;
    // A call its caller drops while it is in flight.
    let mut in_flight = Box::pin(echo.sleep(sleep_request("dropped", Duration::from_secs(30))));
    tokio::select! {
        _ = &mut in_flight => panic!("the sleep answered"),
        event = world.next_event() => assert_eq!(event, Event::SleepStarted("dropped".into())),
    }
    let picked = channel
        .endpoints()
        .into_iter()
        .find(|e| e.instance().id == "b-picked")
        .unwrap();
    assert_eq!(picked.stats().in_flight(), 1, "the sleeping call");
    drop(in_flight);
    assert_eq!(
        world.next_event().await,
        Event::SleepCancelled("dropped".into())
    );

    for endpoint in channel.endpoints() {
        assert_eq!(
            endpoint.stats().in_flight(),
            0,
            "{} still counts calls in flight",
            endpoint.instance().id
        );
    }
    let status = |code| Outcome::Status(code);
    let mut expected = vec![status(Code::Ok); 6];
    expected.extend([
        status(Code::NotFound),
        status(Code::DeadlineExceeded),
        status(Code::Cancelled),
    ]);
    assert_eq!(*outcomes.lock().unwrap(), expected);
    let (succeeded, failed) = picked.stats().recent();
    assert!(succeeded >= 8 && failed == 0, "{succeeded} {failed}");
    assert!(picked.stats().latency().is_some());
    assert!(selector.reports.load(Ordering::Relaxed) >= 10);
    let others: usize = channel
        .endpoints()
        .iter()
        .filter(|e| e.instance().id != "b-picked")
        .map(|e| e.stats().recent().0 as usize + e.stats().recent().1 as usize)
        .sum();
    assert_eq!(
        others, 0,
        "calls reached instances the selector never picked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_a_nested_call_unchanged() {
    let world = World::new();
    let _a = world.start("echo-a", "a").await;
    let _b = world.start("echo-b", "b").await;
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "echo-a");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = Request::new(NestedRequest {
        service: "echo-b".into(),
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
        .metadata_mut()
        .insert("tracestate", "vendor=1".parse().unwrap());
    let report = bounded("the nested call", echo.nested(request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.served_by, "b");
    assert_eq!(report.traceparent, traceparent);
    assert_eq!(report.tracestate, "vendor=1");

    // Without one, none is made up.
    let report = bounded(
        "an untraced nested call",
        echo.nested(NestedRequest {
            service: "echo-b".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(report.traceparent, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_close_a_connection_whose_instance_stopped_answering() {
    let world = World::new();
    let address = unanswering_instance(true).await;
    world
        .registry
        .register(
            Instance::new("echo", address.to_string()).with_id("silent"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let client = Client::builder(world.registry.clone())
        .http2(lodestar::Http2Settings {
            keepalive_interval: Some(Duration::from_millis(100)),
            keepalive_timeout: Duration::from_millis(200),
            ..lodestar::Http2Settings::client()
        })
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let mut request = Request::new(pb::EchoRequest::default());
    request.set_timeout(Duration::from_secs(30));
    let started = std::time::Instant::now();
    // Without PINGs the call would wait for its 30 s deadline.
    let status = tokio::time::timeout(Duration::from_secs(10), echo.unary(request))
        .await
        .expect("the unanswered PING ends the call")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // It says why the connection went, not only that the stream broke.
    assert!(
        status
            .message()
            .contains("the connection was closed: keepalive PING not answered within 200ms"),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

//! Metrics: every call counted on both sides by method and final status
//! (trailers, deadline, cancellation), served over HTTP/1.1 on the admin
//! endpoint, with a bounded number of series.

use std::time::Duration;

use lodestar::metrics::Metrics;
use lodestar::{Code, Registry as _, Request};
use lodestar_tests::*;
use tokio_stream::StreamExt;

use super::call_path;

const ECHO: &str = "lodestar.test.Echo";

/// The duration histogram's count of `method`'s calls that ended `code`.
fn count(text: &str, side: &str, method: &str, code: &str, extra: &str) -> f64 {
    let error = if code == "OK" { "" } else { code };
    let series = format!(
        r#"rpc_{side}_call_duration_seconds_count{{rpc_system_name="grpc",rpc_method="{ECHO}/{method}"{extra},rpc_status_code="{code}",error_type="{error}"}}"#
    );
    sample(text, &series).unwrap_or(0.0)
}

/// `ok` calls that succeed, then one that fails `NOT_FOUND`.
async fn ok_and_not_found(echo: &mut EchoClient<lodestar::client::Channel>, ok: usize) {
    for _ in 0..ok {
        bounded("unary", echo.unary(EchoRequest::default()))
            .await
            .unwrap();
    }
    let failure = FailRequest {
        code: Code::NotFound as i32,
        message: "no such thing".into(),
    };
    let failed = bounded("fail", echo.fail(failure)).await.unwrap_err();
    assert_eq!(failed.code(), Code::NotFound);
}

/// Scrapes `admin` until `done` holds for the text (the server learns of a
/// cancellation asynchronously); bounded.
async fn scrape_until(admin: std::net::SocketAddr, done: impl Fn(&str) -> bool) -> String {
    bounded("the metrics to show the calls", async {
        loop {
            let (_, _, text) = http_get(admin, "/metrics").await;
            if done(&text) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_counted_by_method_and_final_code_on_both_sides() {
    let mut world = World::new();
    let (served, called) = (Metrics::new(), Metrics::new());
    let running = bounded(
        "an instance to start",
        world
            .builder("metered", "a")
            .metrics(Some(served.clone()))
            .add_service(EchoServer::new(world.echo("a")))
            .start(),
    )
    .await
    .unwrap();
    let admin = running.admin_addr().expect("an admin endpoint by default");
    let client = lodestar::Client::builder(world.registry.clone())
        .metrics(Some(called.clone()))
        .build();
    let mut echo = EchoClient::by_name(&client, "metered");

    // Before any call, every method is there at zero.
    let (status, content_type, text) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, lodestar::metrics::CONTENT_TYPE);
    assert_eq!(count(&text, "server", "Unary", "OK", ""), 0.0);
    assert!(
        text.contains(&format!(r#"rpc_method="{ECHO}/Bidi""#)),
        "{text}"
    );

    // OK, and a failure by its code.
    ok_and_not_found(&mut echo, 1).await;

    // A stream that ends by its trailers.
    let mut stream = bounded(
        "stream",
        echo.server_stream(stream_request("t", 3, Duration::ZERO)),
    )
    .await
    .unwrap()
    .into_inner();
    while bounded("a message", stream.next()).await.is_some() {}

    // One that its deadline ends mid-stream.
    let mut request = Request::new(stream_request("d", 1000, Duration::from_millis(20)));
    request.set_timeout(Duration::from_millis(150));
    let mut stream = bounded("stream", echo.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(item) = bounded("a message", stream.next()).await {
        last = Some(item);
    }
    assert_eq!(last.unwrap().unwrap_err().code(), Code::DeadlineExceeded);

    // One that the client cancels.
    let mut stream = bounded(
        "stream",
        echo.server_stream(stream_request("c", 1000, Duration::from_millis(20))),
    )
    .await
    .unwrap()
    .into_inner();
    bounded("a message", stream.next()).await.unwrap().unwrap();
    drop(stream);
    loop {
        if let Event::StreamEnded { token, completed } = world.next_event().await
            && token == "c"
        {
            assert!(!completed);
            break;
        }
    }

    let text = scrape_until(admin, |text| {
        count(text, "server", "ServerStream", "CANCELLED", "") == 1.0
    })
    .await;
    assert_eq!(count(&text, "server", "Unary", "OK", ""), 1.0, "{text}");
    assert_eq!(
        count(&text, "server", "Fail", "NOT_FOUND", ""),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(&text, "server", "ServerStream", "OK", ""),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(&text, "server", "ServerStream", "DEADLINE_EXCEEDED", ""),
        1.0,
        "{text}"
    );
    let started = format!(
        r#"rpc_server_calls_started_total{{rpc_system_name="grpc",rpc_method="{ECHO}/ServerStream"}}"#
    );
    assert_eq!(sample(&text, &started), Some(3.0), "{text}");
    let active = format!(
        r#"rpc_server_calls_active{{rpc_system_name="grpc",rpc_method="{ECHO}/ServerStream"}}"#
    );
    assert_eq!(sample(&text, &active), Some(0.0), "{text}");

    // The client counts the same calls, by the service it called.
    let text = called.encode();
    let to = r#",server_address="metered""#;
    assert_eq!(count(&text, "client", "Unary", "OK", to), 1.0, "{text}");
    assert_eq!(
        count(&text, "client", "Fail", "NOT_FOUND", to),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(&text, "client", "ServerStream", "OK", to),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(&text, "client", "ServerStream", "DEADLINE_EXCEEDED", to),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(&text, "client", "ServerStream", "CANCELLED", to),
        1.0,
        "{text}"
    );

    // Messages each way: a client stream of three, answered with one.
    let requests = (0..3).map(|n| EchoRequest {
        message: format!("m{n}"),
        ..Default::default()
    });
    bounded(
        "client stream",
        echo.client_stream(tokio_stream::iter(requests)),
    )
    .await
    .unwrap();
    let messages = |text: &str, side: &str, way: &str, extra: &str| {
        let series = format!(
            r#"rpc_{side}_messages_{way}_total{{rpc_system_name="grpc",rpc_method="{ECHO}/ClientStream"{extra}}}"#
        );
        sample(text, &series)
    };
    let text = scrape_until(admin, |text| {
        messages(text, "server", "received", "") == Some(3.0)
            && messages(text, "server", "sent", "") == Some(1.0)
    })
    .await;
    let unary_received = format!(
        r#"rpc_server_messages_received_total{{rpc_system_name="grpc",rpc_method="{ECHO}/Unary"}}"#
    );
    assert_eq!(sample(&text, &unary_received), Some(1.0), "{text}");
    let text = called.encode();
    assert_eq!(messages(&text, "client", "sent", to), Some(3.0), "{text}");
    assert_eq!(
        messages(&text, "client", "received", to),
        Some(1.0),
        "{text}"
    );

    // Liveness and readiness.
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    assert_eq!(http_get(admin, "/nope").await.0, 404);
    bounded("shutdown", running.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_calls_to_unknown_methods_make_one_series() {
    let world = World::new();
    let served = Metrics::new();
    let running = bounded(
        "an instance to start",
        world
            .builder("unknowns", "a")
            .metrics(Some(served.clone()))
            .add_service(EchoServer::new(world.echo("a")))
            .start(),
    )
    .await
    .unwrap();
    let client = lodestar::Client::builder(world.registry.clone())
        .metrics(None)
        .build();
    let before = served.encode().lines().count();
    let calls = (0..4).map(|task| {
        let channel = client.channel("unknowns");
        tokio::spawn(async move {
            for i in 0..2500 {
                // Leaked: call_path takes static paths; 10,000 short strings.
                let path: &'static str =
                    Box::leak(format!("/lodestar.test.Nope{task}/Method{i}").into_boxed_str());
                let status = call_path(channel.clone(), path).await;
                assert_eq!(status.code(), Code::Unimplemented);
            }
        })
    });
    for call in calls {
        bounded("10,000 calls", call).await.unwrap();
    }
    let text = served.encode();
    let other = r#"rpc_server_calls_started_total{rpc_system_name="grpc",rpc_method="_OTHER"}"#;
    assert_eq!(sample(&text, other), Some(10_000.0), "{text}");
    // One new series (UNIMPLEMENTED's histogram) and nothing else.
    assert_eq!(text.lines().count(), before + 17, "{text}");
    assert!(!text.contains("Nope"));
    running.abort().await;
}

/// A real Prometheus (Debian's) scrapes a service, the registry server it
/// registers in and a broker subscriber over HTTP/1.1: every target is up,
/// it answers for the calls the test made by method and code, the failed
/// one included, and the registry's instance gauge matches the registry's
/// own list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_service_the_registry_and_a_subscriber() {
    let registry_server = bounded(
        "the registry server to start",
        lodestar_registry_server::start(lodestar_registry_server::Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: Some("127.0.0.1:0".parse().unwrap()),
            warmup: Duration::ZERO,
            metrics: Metrics::new(),
            ..lodestar_registry_server::Config::default()
        }),
    )
    .await
    .unwrap();
    let registry =
        lodestar_registry::from_url(&format!("lodestar://{}", registry_server.local_addr()))
            .unwrap();
    let world = World::new();
    let mut instances = Vec::new();
    for id in ["a", "b"] {
        let running = bounded(
            "an instance to start",
            lodestar::Service::builder("scraped")
                .id(id)
                .registry(registry.clone())
                .metrics(Some(Metrics::new()))
                .add_service(EchoServer::new(world.echo(id)))
                .start(),
        )
        .await
        .unwrap();
        instances.push(running);
    }
    let subscriber = bounded(
        "a subscriber to start",
        lodestar::Service::builder("subscriber")
            .metrics(Some(Metrics::new()))
            .broker(std::sync::Arc::new(lodestar::MemoryBroker::new()))
            .subscribe(
                "orders",
                lodestar::events::SubscribeOptions::broadcast(),
                lodestar::events::proto_handler(|_: u64, _| async { Ok(()) }),
            )
            .start(),
    )
    .await
    .unwrap();
    let prometheus = lodestar_tests::prometheus::Prometheus::start(&[
        (
            "services",
            instances.iter().map(|i| i.admin_addr().unwrap()).collect(),
        ),
        ("registry", vec![registry_server.http_addr().unwrap()]),
        ("subscribers", vec![subscriber.admin_addr().unwrap()]),
    ])
    .await;
    prometheus.all_up().await;

    let mut echo = EchoClient::by_name(&lodestar::Client::new(registry.clone()), "scraped");
    ok_and_not_found(&mut echo, 4).await;

    // Summed over the instances, by method and code.
    let query = r#"sum by (rpc_method, rpc_status_code) (rpc_server_call_duration_seconds_count{job="services", rpc_method=~"lodestar.test.Echo/(Unary|Fail)"})"#;
    let value = |result: &[serde_json::Value], method: &str, code: &str| {
        result
            .iter()
            .find(|r| r["metric"]["rpc_method"] == method && r["metric"]["rpc_status_code"] == code)
            .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
    };
    let result = prometheus
        .query_until(query, |result| {
            value(result, "lodestar.test.Echo/Unary", "OK") == Some(4.0)
                && value(result, "lodestar.test.Echo/Fail", "NOT_FOUND") == Some(1.0)
        })
        .await;
    // Fail's OK series exists from the start, at zero.
    assert_eq!(
        value(&result, "lodestar.test.Echo/Fail", "OK"),
        Some(0.0),
        "{result:?}"
    );

    // The registry's gauge says what the registry lists.
    let listed = registry
        .instances(&lodestar::ServiceKey::new("scraped"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    let gauge = prometheus
        .query_until(
            r#"sum(lodestar_registry_instances{job="registry", service="scraped", status="healthy"})"#,
            |result| !result.is_empty(),
        )
        .await;
    assert_eq!(gauge[0]["value"][1], listed.len().to_string(), "{gauge:?}");

    // The subscriber's own target is scraped too.
    let up = prometheus.query(r#"up{job="subscribers"}"#).await;
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0]["value"][1], "1", "{up:?}");
    for running in instances {
        running.abort().await;
    }
    subscriber.abort().await;
    registry_server.shutdown().await.unwrap();
}

/// An admin address that is taken stops the start, and the error says it
/// is the admin endpoint's and how to choose another.
#[tokio::test]
async fn a_taken_admin_address_is_refused_by_name() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let world = World::new();
    let started = bounded(
        "the start to fail",
        world
            .builder("admin-taken", "a")
            .admin_addr(Some(address))
            .add_service(EchoServer::new(world.echo("a")))
            .start(),
    )
    .await;
    let error = started.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, lodestar::server::ServeError::AdminBind { address: a, .. } if a == address),
        "{message}"
    );
    assert!(message.contains(&address.to_string()), "{message}");
    assert!(message.contains("ServiceBuilder::admin_addr"), "{message}");
}

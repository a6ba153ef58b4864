//! Logs and traces: a caller's trace id in the handler's log lines, and
//! spans exported to a real OTLP collector (rotel) with their parent links.
//!
//! Each test installs lodestar's subscriber as its thread's default and
//! runs on a single-threaded runtime, so every task of its services (and
//! nothing of the tests beside it) is traced and logged through it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use lodestar::events::{self, EventPublisher, SubscribeOptions};
use lodestar::telemetry::{LogFormat, Protocol, Telemetry};
use lodestar::{MemoryBroker, RunningService};
use lodestar_tests::rotel::{CollectedSpan, Rotel};

use super::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Log output, shared with the subscriber that writes it.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An instance of `service` named `name`, with this thread's subscriber
/// (lodestar installs none of its own).
async fn start(world: &World, service: &str, echo: TestEcho) -> RunningService {
    bounded(
        "an instance to start",
        world
            .builder(service, service)
            .telemetry(false)
            .add_service(EchoServer::new(echo))
            .start(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_callers_trace_id_is_in_the_handlers_log_lines_as_text_and_json() {
    for format in [LogFormat::Text, LogFormat::Json] {
        let logs = Captured::default();
        let sink = logs.clone();
        let (dispatch, _guard) = Telemetry::new()
            .log_filter("info,lodestar_tests=debug")
            .log_format(format)
            .log_writer(move || sink.clone())
            .dispatch()
            .unwrap();
        let _default = tracing::dispatcher::set_default(&dispatch);
        let world = World::new();
        let service = start(&world, "logged", world.echo("logged")).await;
        let mut echo = EchoClient::by_name(&world.client(), "logged");
        let mut request = Request::new(EchoRequest {
            message: "hello".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("traceparent", TRACEPARENT.parse().unwrap());
        bounded("a traced call", echo.unary(request)).await.unwrap();
        // A call without a context logs without ids.
        let untraced = EchoRequest {
            message: "untraced".into(),
            ..Default::default()
        };
        bounded("an untraced call", echo.unary(untraced))
            .await
            .unwrap();
        service.shutdown().await.unwrap();

        let logs = logs.text();
        let line = |message: &str| {
            logs.lines()
                .find(|line| line.contains("echoing") && line.contains(message))
                .unwrap_or_else(|| panic!("no handler line for {message} in:\n{logs}"))
                .to_owned()
        };
        let (traced, untraced) = (line("hello"), line("untraced"));
        match format {
            LogFormat::Text => {
                assert!(
                    traced.contains(&format!("trace_id={TRACE_ID} span_id=")),
                    "{traced}"
                );
                assert!(!untraced.contains("trace_id="), "{untraced}");
            }
            LogFormat::Json => {
                let traced: serde_json::Value = serde_json::from_str(&traced).unwrap();
                assert_eq!(traced["trace_id"], TRACE_ID, "{traced}");
                assert_eq!(traced["span_id"].as_str().map(str::len), Some(16));
                assert_eq!(traced["level"], "DEBUG");
                assert_eq!(traced["message"], "echoing");
                let untraced: serde_json::Value = serde_json::from_str(&untraced).unwrap();
                assert!(untraced.get("trace_id").is_none(), "{untraced}");
            }
        }
    }
}

/// The spans of one trace, found by kind and name.
struct Trace<'a>(Vec<&'a CollectedSpan>);

impl<'a> Trace<'a> {
    fn one(&self, kind: &str, name: &str) -> &'a CollectedSpan {
        let found: Vec<_> = self
            .0
            .iter()
            .filter(|s| s.kind == kind && s.name == name)
            .collect();
        assert_eq!(found.len(), 1, "one {kind} span {name}, in {:#?}", self.0);
        found[0]
    }
}

/// Client → A → B; A then publishes an event, which a subscriber handles:
/// every span reaches the collector, in one trace, linked parent to child.
async fn a_trace_reaches_the_collector(protocol: Protocol) {
    let rotel = Rotel::start().await;
    let endpoint = match protocol {
        Protocol::Grpc => format!("http://{}", rotel.grpc),
        Protocol::HttpProtobuf => format!("http://{}/v1/traces", rotel.http),
    };
    let (dispatch, guard) = Telemetry::new()
        .logs(false)
        .otlp(endpoint, protocol)
        .service_name("lodestar-tests")
        .dispatch()
        .unwrap();
    let _default = tracing::dispatcher::set_default(&dispatch);

    let world = World::new();
    let broker = MemoryBroker::new();
    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let subscriber = bounded(
        "the subscriber to start",
        world
            .builder("traced-subscriber", "s")
            .telemetry(false)
            .broker(Arc::new(broker.clone()))
            .subscribe(
                "reports",
                SubscribeOptions::broadcast(),
                events::handler(move |_| {
                    let _ = handled_tx.send(());
                    async { Ok(()) }
                }),
            )
            .start(),
    )
    .await
    .unwrap();
    let b = start(&world, "traced-b", world.echo("b")).await;
    let a_echo = world
        .echo("a")
        .publishing(EventPublisher::new(broker.clone()), "reports");
    let a = start(&world, "traced-a", a_echo).await;

    let mut echo = EchoClient::by_name(&world.client(), "traced-a");
    let report = bounded(
        "client → A → B",
        echo.nested(NestedRequest {
            service: "traced-b".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(report.served_by, "b");
    bounded("the event to be handled", handled.recv())
        .await
        .unwrap();
    // Shutting down waits for the handlers, then flushes the spans.
    for service in [a, b, subscriber] {
        bounded("a shutdown", service.shutdown()).await.unwrap();
    }

    // B saw the client's trace.
    let trace_id = report.traceparent.get(3..35).unwrap().to_owned();
    let spans = rotel
        .spans_until(|spans| spans.iter().filter(|s| s.trace_id == trace_id).count() >= 6)
        .await;
    let trace = Trace(spans.iter().filter(|s| s.trace_id == trace_id).collect());
    assert_eq!(trace.0.len(), 6, "{:#?}", trace.0);
    let nested = "lodestar.test.Echo/Nested";
    let report_deadline = "lodestar.test.Echo/ReportDeadline";
    let client = trace.one("SPAN_KIND_CLIENT", nested);
    let a_server = trace.one("SPAN_KIND_SERVER", nested);
    let a_client = trace.one("SPAN_KIND_CLIENT", report_deadline);
    let b_server = trace.one("SPAN_KIND_SERVER", report_deadline);
    let publish = trace.one("SPAN_KIND_PRODUCER", "publish reports");
    let process = trace.one("SPAN_KIND_CONSUMER", "process reports");
    assert_eq!(client.parent_id, "", "the client's span is the root");
    assert_eq!(a_server.parent_id, client.id);
    assert_eq!(a_client.parent_id, a_server.id);
    assert_eq!(b_server.parent_id, a_client.id);
    assert_eq!(publish.parent_id, a_server.id);
    assert_eq!(process.parent_id, publish.id);
    // B's handler ran in its server span's context.
    assert_eq!(report.traceparent.get(36..52), Some(b_server.id.as_str()));
    for span in [client, a_server, a_client, b_server] {
        for attribute in [
            "rpc.system.name: Str(grpc)",
            "rpc.grpc.status_code: Int(0)",
            "rpc.response.status_code: Str(OK)",
        ] {
            assert!(
                span.attributes.iter().any(|a| a == attribute),
                "{attribute} in {span:#?}"
            );
        }
        assert!(
            span.attributes
                .iter()
                .any(|a| a.starts_with("rpc.method: Str(lodestar.test.Echo/")),
            "{span:#?}"
        );
    }
    assert!(rotel.output().contains("service.name: Str(lodestar-tests)"));
    drop(guard);
}

#[tokio::test]
async fn a_trace_reaches_a_real_collector_over_otlp_grpc() {
    a_trace_reaches_the_collector(Protocol::Grpc).await;
}

#[tokio::test]
async fn a_trace_reaches_a_real_collector_over_otlp_http() {
    a_trace_reaches_the_collector(Protocol::HttpProtobuf).await;
}

#[tokio::test]
async fn calls_succeed_when_the_collector_is_down_and_it_is_said_once() {
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        // Bound, never listening: connections are refused.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let down = socket.local_addr().unwrap();
        let endpoint = match protocol {
            Protocol::Grpc => format!("http://{down}"),
            Protocol::HttpProtobuf => format!("http://{down}/v1/traces"),
        };
        let logs = Captured::default();
        let sink = logs.clone();
        let (dispatch, guard) = Telemetry::new()
            .log_filter("info,lodestar_tests=debug")
            .log_writer(move || sink.clone())
            .otlp(endpoint, protocol)
            .dispatch()
            .unwrap();
        let _default = tracing::dispatcher::set_default(&dispatch);
        let world = World::new();
        let service = start(&world, "untraceable", world.echo("u")).await;
        let mut echo = EchoClient::by_name(&world.client(), "untraceable");
        for round in 0..2 {
            let request = EchoRequest {
                message: format!("round {round}"),
                ..Default::default()
            };
            let reply = bounded("a call", echo.unary(request)).await.unwrap();
            assert_eq!(reply.into_inner().served_by, "u");
            // Each flush is a failed export.
            bounded("a flush", guard.flush()).await;
        }
        bounded("a shutdown", service.shutdown()).await.unwrap();
        let logs = logs.text();
        assert_eq!(
            logs.matches("cannot export spans").count(),
            1,
            "{protocol:?}: said once, in:\n{logs}"
        );
        // With spans on, a handler's line carries its server span's ids,
        // not the span's fields.
        let echoed = logs.lines().find(|l| l.contains("echoing")).unwrap();
        assert!(echoed.contains(" trace_id="), "{echoed}");
        assert!(!echoed.contains("otel.name"), "{echoed}");
        drop(_default);
        // Dropping the guard does not hang on the collector.
        bounded("the guard to drop", async { drop(guard) }).await;
    }
}

/// Whether `span` has the attribute, as the collector prints it.
fn has(span: &CollectedSpan, attribute: &str) -> bool {
    span.attributes.iter().any(|a| a == attribute)
}

#[tokio::test]
async fn a_calls_spans_end_with_its_final_status_whatever_ends_it() {
    let rotel = Rotel::start().await;
    let (dispatch, guard) = Telemetry::new()
        .logs(false)
        .otlp(
            format!("http://{}/v1/traces", rotel.http),
            Protocol::HttpProtobuf,
        )
        .dispatch()
        .unwrap();
    let _default = tracing::dispatcher::set_default(&dispatch);
    let mut world = World::new();
    let service = start(&world, "ended", world.echo("e")).await;
    let client = world.client();
    let mut echo = EchoClient::by_name(&client, "ended");

    // Failed by the handler, with a code that is the caller's doing.
    let failed = echo.fail(FailRequest {
        code: Code::NotFound as i32,
        message: "no such thing".into(),
    });
    let status = bounded("a failing call", failed).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Ended by its deadline while the handler sleeps.
    let mut request = Request::new(sleep_request("slow", Duration::from_secs(30)));
    request.set_timeout(Duration::from_millis(100));
    let status = bounded("a call past its deadline", echo.sleep(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    world.expect_sleep_cancelled("slow").await;
    // Ended by its deadline in the middle of a stream.
    let mut request = Request::new(stream_request("long", 1000, Duration::from_millis(20)));
    request.set_timeout(Duration::from_millis(150));
    let mut stream = bounded("a stream to start", echo.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    let ended = bounded("the stream to end", async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await;
    assert_eq!(ended, Some(Code::DeadlineExceeded));
    assert_eq!(
        world.next_event().await,
        Event::StreamEnded {
            token: "long".into(),
            completed: false
        }
    );
    // Cancelled: the caller drops the call while the handler sleeps.
    let mut abandoning = echo.clone();
    let call = tokio::spawn(async move {
        abandoning
            .sleep(sleep_request("abandoned", Duration::from_secs(60)))
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
    bounded("a shutdown", service.shutdown()).await.unwrap();
    bounded("a flush", guard.flush()).await;

    let sleep = "lodestar.test.Echo/Sleep";
    let spans = rotel
        .spans_until(|spans| {
            spans
                .iter()
                .filter(|s| s.kind == "SPAN_KIND_SERVER")
                .count()
                >= 4
        })
        .await;
    let server = |name: &str, code: Code| {
        spans
            .iter()
            .find(|s| {
                s.kind == "SPAN_KIND_SERVER"
                    && s.name == name
                    && has(s, &format!("rpc.grpc.status_code: Int({})", code as i32))
            })
            .unwrap_or_else(|| panic!("a server span {name} ending {code:?} in {spans:#?}"))
    };
    // A caller's mistake is no server error; a passed deadline is.
    let not_found = server("lodestar.test.Echo/Fail", Code::NotFound);
    assert!(has(not_found, "rpc.response.status_code: Str(NOT_FOUND)"));
    assert!(
        !not_found
            .attributes
            .iter()
            .any(|a| a.starts_with("error.type"))
    );
    let past_deadline = server(sleep, Code::DeadlineExceeded);
    assert!(has(past_deadline, "error.type: Str(DEADLINE_EXCEEDED)"));
    let mid_stream = server("lodestar.test.Echo/ServerStream", Code::DeadlineExceeded);
    assert!(has(mid_stream, "error.type: Str(DEADLINE_EXCEEDED)"));
    let cancelled = server(sleep, Code::Cancelled);
    assert!(
        !cancelled
            .attributes
            .iter()
            .any(|a| a.starts_with("error.type"))
    );
    // On the client, every code but OK is an error.
    let client_failed = spans
        .iter()
        .find(|s| s.kind == "SPAN_KIND_CLIENT" && s.name == "lodestar.test.Echo/Fail")
        .unwrap();
    assert!(has(client_failed, "error.type: Str(NOT_FOUND)"));
    assert_eq!(not_found.parent_id, client_failed.id);
}

#[tokio::test]
async fn the_registry_clients_calls_carry_the_callers_trace() {
    use tracing::Instrument as _;

    let rotel = Rotel::start().await;
    let (dispatch, guard) = Telemetry::new()
        .logs(false)
        .otlp(format!("http://{}", rotel.grpc), Protocol::Grpc)
        .dispatch()
        .unwrap();
    let _default = tracing::dispatcher::set_default(&dispatch);
    let server = lodestar_registry_server::start(lodestar_registry_server::Config::ephemeral())
        .await
        .unwrap();
    let registry = lodestar_registry::RemoteRegistry::new(&[server.local_addr().to_string()]);
    let instance = Instance::new("registered", "127.0.0.1:1");
    let registering = registry.register(instance, Duration::from_secs(30));
    bounded(
        "a registration in a span",
        registering.instrument(tracing::info_span!("registering")),
    )
    .await
    .unwrap();
    bounded("a flush", guard.flush()).await;

    let register = "lodestar.registry.v1.Registry/Register";
    let spans = rotel
        .spans_until(|spans| {
            spans.iter().any(|s| s.name == "registering")
                && spans
                    .iter()
                    .any(|s| s.kind == "SPAN_KIND_SERVER" && s.name == register)
        })
        .await;
    let find = |kind: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.kind == kind && s.name == name)
            .unwrap_or_else(|| panic!("a {kind} span {name} in {spans:#?}"))
    };
    let outer = find("SPAN_KIND_INTERNAL", "registering");
    let client = find("SPAN_KIND_CLIENT", register);
    let served = find("SPAN_KIND_SERVER", register);
    assert_eq!(client.parent_id, outer.id);
    assert_eq!(served.parent_id, client.id);
    assert_eq!(served.trace_id, outer.trace_id);
    server.shutdown().await.unwrap();
}

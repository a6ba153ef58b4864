//! REST routes from `google.api.http` on the service's own port: `curl` on
//! an annotated route, path, query and body mapping, the status mapping,
//! unknown routes and verbs, bad input, the body limit, a template the
//! server refuses at start, CORS, the switch, and a user layer that sees
//! REST calls as it sees every call. Real sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use lodestar::server::{Cors, WebProtocols};
use lodestar_tests::*;

use super::web::{Answer, Conn, Counting, assert_counted};

/// Sends one request on a fresh HTTP/1.1 or HTTP/2 connection.
async fn send(
    address: std::net::SocketAddr,
    http2: bool,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into())).unwrap();
    let mut conn = if http2 {
        Conn::http2(address).await
    } else {
        Conn::http1(address).await
    };
    conn.send(request).await
}

async fn get(address: std::net::SocketAddr, path: &str) -> Answer {
    send(address, false, Method::GET, path, &[], Bytes::new()).await
}

async fn start(
    world: &World,
    web: WebProtocols,
    limits: lodestar::MessageLimits,
) -> lodestar::RunningService {
    bounded(
        "an instance to start",
        world
            .builder("echo", "a")
            .web(web)
            .message_limits(limits)
            .add_service(EchoServer::new(world.echo("a")))
            .start(),
    )
    .await
    .unwrap()
}

/// `curl`, as anyone would call a REST route.
fn curl(args: &[&str]) -> String {
    let mut command = std::process::Command::new("curl");
    command.args(["-sS", "--max-time", "10"]).args(args);
    let output = run_bounded(command, Duration::from_secs(20));
    assert!(output.status.success(), "curl {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// curl's output with `-w '\n%{http_code}'`: the body as JSON, and the status.
fn body_and_code(out: &str) -> (serde_json::Value, String) {
    let (body, code) = out.rsplit_once('\n').unwrap();
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (body, code.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_calls_annotated_rest_routes() {
    let world = World::new();
    let running = start(
        &world,
        WebProtocols::default(),
        lodestar::MessageLimits::default(),
    )
    .await;
    let base = format!("http://{}", running.local_addr());
    let out = tokio::task::spawn_blocking(move || {
        [
            // GET: a path variable and the query (bytes in base64).
            curl(&[
                "-w",
                "\n%{http_code}",
                &format!("{base}/v1/echo/hello%20curl?payload=aGk="),
            ]),
            // POST with `body: "*"` (curl says form data; the body is JSON all the same).
            curl(&[
                "-w",
                "\n%{http_code}",
                "-d",
                r#"{"message":"posted"}"#,
                &format!("{base}/v1/echo"),
            ]),
            // PUT with one field as the body.
            curl(&[
                "-w",
                "\n%{http_code}",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/json",
                "-d",
                r#""aGVsbG8=""#,
                &format!("{base}/v1/messages/put"),
            ]),
            // NOT_FOUND from the handler: 404 and the JSON error.
            curl(&[
                "-w",
                "\n%{http_code}",
                &format!("{base}/v1/fail/5?message=no%20such%20thing"),
            ]),
        ]
    })
    .await
    .unwrap();
    let (body, code) = body_and_code(&out[0]);
    assert_eq!(code, "200");
    assert_eq!(
        body,
        serde_json::json!({"message": "hello curl", "servedBy": "a", "payloadLen": "2"})
    );
    let (body, code) = body_and_code(&out[1]);
    assert_eq!(
        (body["message"].as_str(), code.as_str()),
        (Some("posted"), "200")
    );
    let (body, code) = body_and_code(&out[2]);
    assert_eq!(code, "200");
    assert_eq!(
        body,
        serde_json::json!({"message": "put", "servedBy": "a", "payloadLen": "5"})
    );
    let (body, code) = body_and_code(&out[3]);
    assert_eq!(code, "404");
    assert_eq!(
        body,
        serde_json::json!({"code": "not_found", "message": "no such thing"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_query_and_body_map_onto_the_request_over_both_http_versions() {
    let world = World::new();
    let running = start(
        &world,
        WebProtocols::default(),
        lodestar::MessageLimits::default(),
    )
    .await;
    let address = running.local_addr();
    for http2 in [false, true] {
        let answer = send(
            address,
            http2,
            Method::GET,
            "/v1/echo/a%2Fb?payload=AAEC",
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.header("content-type"), "application/json");
        assert_eq!(answer.json()["message"], "a/b");
        assert_eq!(answer.json()["payloadLen"], "3");
        // A multi-segment variable keeps its slashes.
        let answer = send(
            address,
            http2,
            Method::GET,
            "/v1/rooms/r1/notes/x/y",
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(answer.json()["message"], "rooms/r1/notes/x/y", "{answer:?}");
        // The path wins over the body; the body fills the rest.
        let answer = send(
            address,
            http2,
            Method::POST,
            "/v1/echo",
            &[("content-type", "application/json")],
            r#"{"message":"body","payload":"AAECAw=="}"#,
        )
        .await;
        assert_eq!(answer.json()["payloadLen"], "4", "{answer:?}");
        // A custom verb, and a nested field in the path (Sleep's duration.nanos).
        let verb = Method::from_bytes(b"SLEEP").unwrap();
        let answer = send(address, http2, verb, "/v1/sleep/t/1000", &[], Bytes::new()).await;
        assert_eq!(
            (answer.status, answer.json()),
            (StatusCode::OK, serde_json::json!({}))
        );
    }
    // `grpc-timeout` is the call's deadline; none without it.
    let answer = send(
        address,
        false,
        Method::GET,
        "/v1/deadline",
        &[("grpc-timeout", "5S")],
        Bytes::new(),
    )
    .await;
    let report = answer.json();
    assert_eq!(report["hasDeadline"], true, "{report}");
    let remaining: i64 = report["remainingMs"].as_str().unwrap().parse().unwrap();
    assert!(remaining > 0 && remaining <= 5000, "{report}");
    let report = get(address, "/v1/deadline").await.json();
    assert_eq!(report.get("hasDeadline"), None, "{report}");
    // A handler that outlives it: 504, deadline_exceeded (a 0.9 s sleep, 50 ms allowed).
    let answer = send(
        address,
        false,
        Method::from_bytes(b"SLEEP").unwrap(),
        "/v1/sleep/late/900000000",
        &[("grpc-timeout", "50m")],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{answer:?}");
    assert_eq!(answer.json()["code"], "deadline_exceeded");
    // `response_body`: one field of the reply is the body.
    let answer = get(address, "/v1/deadline/served-by").await;
    assert_eq!(answer.body, "\"a\"");
    // Connect still answers for the method's own path.
    let answer = send(
        address,
        false,
        Method::POST,
        "/lodestar.test.Echo/Unary",
        &[("content-type", "application/json")],
        r#"{"message":"connect"}"#,
    )
    .await;
    assert_eq!(answer.json()["message"], "connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_verbs_and_bad_input_get_their_documented_status() {
    let world = World::new();
    let limits = lodestar::MessageLimits {
        max_decoding_message_size: 1024,
        ..lodestar::MessageLimits::default()
    };
    let running = start(&world, WebProtocols::default(), limits).await;
    let address = running.local_addr();
    // No route: 404, not_found.
    let answer = get(address, "/v1/nothing/here").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json()["code"], "not_found");
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("/v1/nothing/here")
    );
    // A route under another verb: 405 with Allow.
    let answer = send(
        address,
        false,
        Method::DELETE,
        "/v1/echo/x",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.header("allow"), "GET");
    assert_eq!(answer.json()["code"], "unimplemented");
    // Bad values, unknown parameters: 400 naming them.
    for (path, names) in [
        ("/v1/fail/five", "path variable `code`"),
        ("/v1/echo/x?payload=***", "query parameter `payload`"),
        ("/v1/echo/x?nope=1", "unknown query parameter `nope`"),
        ("/v1/echo/x?message=y", "comes from the path"),
    ] {
        let answer = get(address, path).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path}: {answer:?}");
        assert_eq!(answer.json()["code"], "invalid_argument");
        let message = answer.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains(names), "{path}: {message}");
    }
    let many = vec!["payload=AA"; 200].join("&");
    let answer = get(address, &format!("/v1/echo/x?{many}")).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    // Bad JSON: 400.
    let answer = send(address, false, Method::POST, "/v1/echo", &[], "{").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    // A body over the receive limit: 413, resource_exhausted.
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(2000));
    let answer = send(address, false, Method::POST, "/v1/echo", &[], big).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.json()["code"], "resource_exhausted");
    // A path over 8 KiB: 414.
    let long = format!("/v1/echo/{}", "x".repeat(9000));
    let answer = get(address, &long).await;
    assert_eq!(answer.status, StatusCode::URI_TOO_LONG);
    // The server carries on.
    let answer = get(address, "/v1/echo/still").await;
    assert_eq!(answer.json()["message"], "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_the_server_cannot_take_stops_the_start_naming_it() {
    use lodestar_tests::bad_route::bad_route_server::{BadRoute, BadRouteServer};
    struct Bad;
    #[lodestar::async_trait]
    impl BadRoute for Bad {
        async fn get(
            &self,
            _: lodestar::Request<()>,
        ) -> Result<lodestar::Response<()>, lodestar::Status> {
            Ok(lodestar::Response::new(()))
        }
    }
    let world = World::new();
    let error = bounded(
        "a start that fails",
        world
            .builder("bad", "a")
            .add_service(BadRouteServer::new(Bad))
            .start(),
    )
    .await
    .expect_err("a template with `**` before its end is refused");
    let text = error.to_string();
    assert!(
        matches!(error, lodestar::server::ServeError::RestRoute(_)),
        "{error:?}"
    );
    for says in [
        "lodestar.test.badroute.BadRoute.Get",
        "\"/v1/**/things\"",
        "last segment",
    ] {
        assert!(text.contains(says), "{text}");
    }
    // With REST off, the rule is not read. (Two descriptor sets that
    // both carry google/api/http.proto load side by side.)
    let web = WebProtocols {
        rest: false,
        ..WebProtocols::default()
    };
    let running = bounded(
        "a start with REST off",
        world
            .builder("bad", "b")
            .web(web)
            .add_service(BadRouteServer::new(Bad))
            .add_service(EchoServer::new(world.echo("b")))
            .start(),
    )
    .await
    .unwrap();
    let answer = get(running.local_addr(), "/v1/echo/off").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_and_the_switch_apply_to_rest() {
    let world = World::new();
    let web = WebProtocols {
        cors: Cors::allow(["http://app.example"]),
        ..WebProtocols::default()
    };
    let running = start(&world, web, lodestar::MessageLimits::default()).await;
    let address = running.local_addr();
    let preflight = send(
        address,
        false,
        Method::OPTIONS,
        "/v1/messages/x",
        &[
            ("origin", "http://app.example"),
            ("access-control-request-method", "PUT"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(preflight.status, StatusCode::NO_CONTENT);
    assert!(
        preflight
            .header("access-control-allow-methods")
            .contains("PUT")
    );
    let answer = send(
        address,
        false,
        Method::GET,
        "/v1/echo/cors",
        &[("origin", "http://app.example")],
        Bytes::new(),
    )
    .await;
    assert_eq!(
        answer.header("access-control-allow-origin"),
        "http://app.example"
    );
    assert_eq!(answer.json()["message"], "cors");

    // REST off: the path is no route; Connect's GET refuses it.
    let world = World::new();
    let web = WebProtocols {
        rest: false,
        ..WebProtocols::default()
    };
    let running = start(&world, web, lodestar::MessageLimits::default()).await;
    let answer = get(running.local_addr(), "/v1/echo/off").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
    // REST alone still serves HTTP/1.1.
    let world = World::new();
    let web = WebProtocols {
        rest: true,
        ..WebProtocols::none()
    };
    let running = start(&world, web, lodestar::MessageLimits::default()).await;
    let answer = get(running.local_addr(), "/v1/echo/alone").await;
    assert_eq!(answer.json()["message"], "alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_layers_and_metrics_see_rest_calls() {
    let world = World::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    let metrics = lodestar::metrics::Metrics::new();
    let running = bounded(
        "an instance to start",
        world
            .builder("echo", "a")
            .metrics(Some(metrics.clone()))
            .layer(tower::layer::layer_fn(move |inner| Counting {
                inner,
                seen: counted.clone(),
            }))
            .add_service(EchoServer::new(world.echo("a")))
            .start(),
    )
    .await
    .unwrap();
    let address = running.local_addr();
    assert_eq!(get(address, "/v1/echo/one").await.status, StatusCode::OK);
    assert_eq!(
        get(address, "/v1/fail/5").await.status,
        StatusCode::NOT_FOUND
    );
    // Refused before the stack: not a call.
    assert_eq!(
        get(address, "/v1/nothing").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "the user layer saw both calls"
    );
    assert_counted(&metrics, 1.0);
}

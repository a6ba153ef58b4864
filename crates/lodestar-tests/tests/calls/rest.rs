//! REST routes from `google.api.http` on the service's own port: `curl` on
//! an annotated route, path, query and body mapping, the status mapping,
//! unknown routes and verbs, bad input, the body limit, a template the
//! server refuses at start, CORS, the switch, a user layer that sees
//! REST calls as it sees every call, and server streams as lines of JSON
//! (errors before and after the first reply, deadlines, back-pressure,
//! the send limit). Real sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use lodestar::server::{Cors, WebProtocols};
use lodestar_tests::*;

use super::web::{Answer, Conn, Counting, assert_counted, start_with, start_with_small_budget};

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
    start_with(world, |b| b.web(web).message_limits(limits)).await
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
            // A server stream, a line per reply, over HTTP/1.1 and HTTP/2.
            curl(&["-N", &format!("{base}/v1/streams/c?count=3")]),
            curl(&[
                "-N",
                "--http2-prior-knowledge",
                &format!("{base}/v1/streams/c?count=2&fail_code=14&fail_message=down"),
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
    let lines = |out: &str| -> Vec<serde_json::Value> {
        assert!(out.ends_with('\n'), "{out:?}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    };
    assert_eq!(lines(&out[4]), results("c", 0..3));
    let mut expected = results("c", 0..2);
    expected.push(serde_json::json!({"error": {"code": "unavailable", "message": "down"}}));
    assert_eq!(lines(&out[5]), expected);
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
    let stream = get(address, "/v1/streams/m?count=2").await;
    assert_eq!(stream.body.iter().filter(|b| **b == b'\n').count(), 2);
    // Refused before the stack: not a call.
    assert_eq!(
        get(address, "/v1/nothing").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "the user layer saw every call"
    );
    assert_counted(&metrics, 1.0);
    let text = metrics.encode();
    let streamed = sample(
        &text,
        "rpc_server_call_duration_seconds_count{rpc_system_name=\"grpc\",rpc_method=\"lodestar.test.Echo/ServerStream\",rpc_status_code=\"OK\",error_type=\"\"}",
    );
    assert_eq!(streamed, Some(1.0), "{text}");
}

/// A REST server stream being read: its head, then its body a line at a time.
struct Lines {
    status: StatusCode,
    headers: http::HeaderMap,
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
    // The connection's sender, kept for as long as the stream is read.
    _conn: Conn,
}

impl Lines {
    /// `GET path` on `conn`, read up to the answer's head.
    async fn open(mut conn: Conn, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut request = http::Request::get(format!("http://localhost{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::new())).unwrap();
        let exchange = async {
            match &mut conn {
                Conn::Http1(sender) => {
                    sender.ready().await?;
                    sender.send_request(request).await
                }
                Conn::Http2(sender) => {
                    sender.ready().await?;
                    sender.send_request(request).await
                }
            }
        };
        let response = bounded("a streamed answer's head", exchange).await.unwrap();
        let (parts, body) = response.into_parts();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
            buffer: Vec::new(),
            _conn: conn,
        }
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The next line, as JSON; `None` at the end of the body.
    async fn next(&mut self) -> Option<serde_json::Value> {
        use http_body_util::BodyExt as _;
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let json = serde_json::from_slice(&line[..end])
                    .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&line)));
                return Some(json);
            }
            match bounded("a line of the stream", self.body.frame()).await {
                Some(frame) => {
                    if let Ok(data) = frame.unwrap().into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                None => {
                    assert!(
                        self.buffer.is_empty(),
                        "the body ended inside a line: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    return None;
                }
            }
        }
    }

    /// Every line left.
    async fn rest(&mut self) -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        while let Some(line) = self.next().await {
            lines.push(line);
        }
        lines
    }
}

async fn conn(address: std::net::SocketAddr, http2: bool) -> Conn {
    if http2 {
        Conn::http2(address).await
    } else {
        Conn::http1(address).await
    }
}

/// `{"result":{"message":"<token> #n","servedBy":"a"}}` for n in `range`.
fn results(token: &str, range: std::ops::Range<u32>) -> Vec<serde_json::Value> {
    range
        .map(|n| serde_json::json!({"result": {"message": format!("{token} #{n}"), "servedBy": "a"}}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streams_arrive_as_json_lines_over_http1_and_http2() {
    let mut world = World::new();
    let running = start(
        &world,
        WebProtocols::default(),
        lodestar::MessageLimits::default(),
    )
    .await;
    let address = running.local_addr();
    for http2 in [false, true] {
        let mut stream =
            Lines::open(conn(address, http2).await, "/v1/streams/s?count=3", &[]).await;
        assert_eq!(stream.status, StatusCode::OK);
        assert_eq!(stream.header("content-type"), "application/x-ndjson");
        assert_eq!(stream.header("x-accel-buffering"), "no");
        assert_eq!(stream.rest().await, results("s", 0..3), "http2: {http2}");
        // `response_body` applies to each reply.
        let mut stream = Lines::open(
            conn(address, http2).await,
            "/v1/streams/f/messages?count=2",
            &[],
        )
        .await;
        assert_eq!(
            stream.rest().await,
            [
                serde_json::json!({"result": "f #0"}),
                serde_json::json!({"result": "f #1"})
            ]
        );
        for _ in 0..2 {
            assert!(matches!(
                world.next_event().await,
                Event::StreamEnded {
                    completed: true,
                    ..
                }
            ));
        }

        // Each reply goes out as it comes: the first line arrives while the
        // handler still holds the stream open (the second reply is 30 s
        // away), and the client going away cancels the handler.
        let mut stream = Lines::open(
            conn(address, http2).await,
            "/v1/streams/open?count=2&interval=30s",
            &[],
        )
        .await;
        assert_eq!(stream.status, StatusCode::OK);
        assert_eq!(stream.next().await, Some(results("open", 0..1)[0].clone()));
        drop(stream);
        assert_eq!(
            world.next_event().await,
            Event::StreamEnded {
                token: "open".into(),
                completed: false
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_error_is_the_status_before_the_first_reply_and_the_last_line_after_it() {
    let world = World::new();
    let running = start(
        &world,
        WebProtocols::default(),
        lodestar::MessageLimits::default(),
    )
    .await;
    let address = running.local_addr();
    for http2 in [false, true] {
        // After two replies: 200, the replies, then the error as the last line.
        let mut stream = Lines::open(
            conn(address, http2).await,
            "/v1/streams/e?count=2&fail_code=5&fail_message=gone",
            &[],
        )
        .await;
        assert_eq!(stream.status, StatusCode::OK);
        let mut expected = results("e", 0..2);
        expected.push(serde_json::json!({"error": {"code": "not_found", "message": "gone"}}));
        assert_eq!(stream.rest().await, expected, "http2: {http2}");

        // Before any reply: the REST error answer, with the code's status.
        let answer = send(
            address,
            http2,
            Method::GET,
            "/v1/streams/e?count=0&failCode=7&failMessage=no",
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
        assert_eq!(answer.header("content-type"), "application/json");
        assert_eq!(
            answer.json(),
            serde_json::json!({"code": "permission_denied", "message": "no"})
        );

        // No reply and no error: 200 and an empty body.
        let answer = send(
            address,
            http2,
            Method::GET,
            "/v1/streams/none?count=0",
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.header("content-type"), "application/x-ndjson");
        assert!(answer.body.is_empty(), "{answer:?}");

        // A deadline (`grpc-timeout`) that passes mid-stream ends it with a
        // deadline_exceeded line. (Long enough for the first reply, which
        // the head waits for, on a loaded machine.)
        let mut stream = Lines::open(
            conn(address, http2).await,
            "/v1/streams/d?count=100&interval=0.2s",
            &[("grpc-timeout", "2S")],
        )
        .await;
        assert_eq!(stream.status, StatusCode::OK);
        let lines = stream.rest().await;
        let (last, replies) = lines.split_last().unwrap();
        assert_eq!(last["error"]["code"], "deadline_exceeded", "{lines:?}");
        assert!(
            !replies.is_empty() && replies.len() < 100,
            "{} replies before the deadline",
            replies.len()
        );
        assert_eq!(replies, &results("d", 0..replies.len() as u32)[..]);
    }
    // A bad query is refused before the call, as on unary routes.
    let answer = get(address, "/v1/streams/x?count=many").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["code"], "invalid_argument");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_handler_back_and_lines_are_bounded_by_the_send_limit() {
    let mut world = World::new();
    let limits = lodestar::MessageLimits {
        max_encoding_message_size: 64,
        ..lodestar::MessageLimits::default()
    };
    let running = start(&world, WebProtocols::default(), limits).await;
    let address = running.local_addr();
    // An HTTP/2 client that lets the server send 1 KiB ahead of what it
    // has read: the server takes replies from the handler only as the
    // connection takes lines, so 200 replies (about 10 KB) wait in the
    // handler, not in the server, until they are read.
    let stream = bounded("connect", tokio::net::TcpStream::connect(address))
        .await
        .unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(1024)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut slow = Lines::open(Conn::Http2(sender), "/v1/streams/slow?count=200", &[]).await;
    assert_eq!(slow.next().await, Some(results("slow", 0..1)[0].clone()));
    // While nothing is read, the handler cannot finish. (Absence is
    // checked for a bounded time: with a window that does not hold the
    // client back, the handler ends in well under it.)
    let ended = tokio::time::timeout(Duration::from_millis(500), world.events.recv()).await;
    assert!(ended.is_err(), "the handler finished early: {ended:?}");
    let rest = slow.rest().await;
    assert_eq!(rest, results("slow", 1..200));
    assert_eq!(
        world.next_event().await,
        Event::StreamEnded {
            token: "slow".into(),
            completed: true
        }
    );

    // The send limit bounds each line: a reply whose protobuf fits (40
    // bytes) but whose JSON line does not (76) ends the call
    // resource_exhausted, before the first reply with its HTTP status.
    let token = "t".repeat(32);
    let answer = get(address, &format!("/v1/streams/{token}?count=2")).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS, "{answer:?}");
    assert_eq!(answer.json()["code"], "resource_exhausted");
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("send limit of 64 bytes"),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_the_connections_budget_ends_the_stream_with_an_error_line() {
    let world = World::new();
    let running = start_with_small_budget(&world).await;
    // A line of 6 KB: more than the connection may hold. The head (200)
    // went out with the first line; the error is the line in its place.
    let path = format!("/v1/streams/{}?count=2", "t".repeat(6000));
    for http2 in [false, true] {
        let mut stream = Lines::open(conn(running.local_addr(), http2).await, &path, &[]).await;
        assert_eq!(stream.status, StatusCode::OK, "http2 {http2}");
        let lines = stream.rest().await;
        assert_eq!(lines.len(), 1, "http2 {http2}: {lines:?}");
        assert_eq!(lines[0]["error"]["code"], "resource_exhausted", "{lines:?}");
        let message = lines[0]["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("max_unsent_bytes_per_connection"),
            "{message}"
        );
    }
}

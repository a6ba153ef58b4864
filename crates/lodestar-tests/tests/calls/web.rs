//! gRPC-Web and Connect on the service's own port, over HTTP/1.1 and
//! HTTP/2: a raw HTTP client for the wire details, `curl` and `buf curl`
//! as third-party clients, CORS, the switches, and bad input.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lodestar::server::{Cors, WebProtocols};
use lodestar_tests::*;
use prost::Message as _;

/// An answer as a client sees it.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Answer {
    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub(super) fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// One HTTP connection to a service, kept alive between requests.
pub(super) enum Conn {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    pub(super) async fn http1(address: std::net::SocketAddr) -> Self {
        let stream = bounded("connect", tokio::net::TcpStream::connect(address))
            .await
            .unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        Conn::Http1(sender)
    }

    pub(super) async fn http2(address: std::net::SocketAddr) -> Self {
        let stream = bounded("connect", tokio::net::TcpStream::connect(address))
            .await
            .unwrap();
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        Conn::Http2(sender)
    }

    pub(super) async fn send(&mut self, request: http::Request<Full<Bytes>>) -> Answer {
        let exchange = async {
            let response = match self {
                Conn::Http1(sender) => {
                    sender.ready().await?;
                    sender.send_request(request).await?
                }
                Conn::Http2(sender) => {
                    sender.ready().await?;
                    sender.send_request(request).await?
                }
            };
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        bounded("an HTTP exchange", exchange).await.unwrap()
    }

    async fn post(&mut self, path: &str, content_type: &str, body: impl Into<Bytes>) -> Answer {
        self.post_with(path, content_type, &[], body).await
    }

    async fn post_with(
        &mut self,
        path: &str,
        content_type: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let mut request = http::Request::builder()
            .method(Method::POST)
            .uri(self.uri(path))
            .header("content-type", content_type);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request.body(Full::new(body.into())).unwrap())
            .await
    }

    fn uri(&self, path: &str) -> String {
        match self {
            // HTTP/2 needs a scheme and authority; HTTP/1.1 a Host header,
            // which hyper adds from an absolute URI too.
            Conn::Http1(_) | Conn::Http2(_) => format!("http://localhost{path}"),
        }
    }
}

/// `message` framed as gRPC, gRPC-Web and Connect streams frame it.
fn frame(flags: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(flags);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The frames of a body: flags and payload each.
fn frames(mut body: Bytes) -> Vec<(u8, Bytes)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "a truncated frame: {body:?}");
        let flags = body.get_u8();
        let len = body.get_u32() as usize;
        assert!(body.len() >= len, "a truncated frame");
        out.push((flags, body.split_to(len)));
    }
    out
}

/// The trailers in a gRPC-Web body's last frame, as `name: value` lines.
fn web_trailers(frames: &[(u8, Bytes)]) -> String {
    let (flags, block) = frames.last().expect("a trailer frame");
    assert_eq!(*flags, 0x80, "the last frame carries the trailers");
    String::from_utf8(block.to_vec()).unwrap()
}

fn echo_request(message: &str) -> Vec<u8> {
    EchoRequest {
        message: message.into(),
        payload: vec![],
    }
    .encode_to_vec()
}

async fn start(world: &World, web: WebProtocols) -> lodestar::RunningService {
    start_with(world, |b| b.web(web)).await
}

/// Starts Echo instance `a`, its builder set up by `configure`.
pub(super) async fn start_with(
    world: &World,
    configure: impl FnOnce(lodestar::ServiceBuilder) -> lodestar::ServiceBuilder,
) -> lodestar::RunningService {
    bounded(
        "an instance to start",
        configure(world.builder("echo", "a"))
            .add_service(EchoServer::new(world.echo("a")))
            .start(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_unary_answers_json_and_proto_over_http1_and_http2() {
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let address = running.local_addr();
    for mut conn in [Conn::http1(address).await, Conn::http2(address).await] {
        let answer = conn
            .post_with(
                "/lodestar.test.Echo/Unary",
                "application/json",
                &[("connect-protocol-version", "1"), ("x-note", "kept")],
                r#"{"message":"hello"}"#,
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.header("content-type"), "application/json");
        assert_eq!(answer.json()["message"], "hello");
        assert_eq!(answer.json()["servedBy"], "a");
        let answer = conn
            .post(
                "/lodestar.test.Echo/Unary",
                "application/proto",
                echo_request("binary"),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.header("content-type"), "application/proto");
        assert_eq!(EchoReply::decode(answer.body).unwrap().message, "binary");
        // Native gRPC still works beside it on HTTP/2 (the world's client).
    }
    let mut echo = EchoClient::by_name(&world.client(), "echo");
    let reply = bounded("a native call", echo.unary(EchoRequest::default()))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().served_by, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_carry_the_mapped_http_status_and_metadata() {
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let answer = conn
        .post(
            "/lodestar.test.Echo/Fail",
            "application/json",
            r#"{"code":5,"message":"no such thing"}"#,
        )
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
    assert_eq!(answer.header("content-type"), "application/json");
    assert_eq!(
        answer.json(),
        serde_json::json!({"code": "not_found", "message": "no such thing"})
    );
    assert_eq!(answer.header("x-failed-by"), "a", "metadata as headers");
    for (code, http) in [(3, 400), (7, 403), (8, 429), (14, 503), (16, 401), (4, 504)] {
        let answer = conn
            .post(
                "/lodestar.test.Echo/Fail",
                "application/json",
                format!(r#"{{"code":{code}}}"#),
            )
            .await;
        assert_eq!(answer.status.as_u16(), http, "code {code}: {answer:?}");
    }
    // Unknown methods and services: 404 with `unimplemented`.
    for path in ["/lodestar.test.Echo/Nope", "/no.Such/Service"] {
        let answer = conn.post(path, "application/json", "{}").await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}: {answer:?}");
        assert_eq!(answer.json()["code"], "unimplemented", "{path}");
    }
    // Bad JSON is the caller's fault.
    let answer = conn
        .post("/lodestar.test.Echo/Unary", "application/json", "{nope")
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
    assert_eq!(answer.json()["code"], "invalid_argument");
    // A streaming method called as unary: 415.
    let answer = conn
        .post("/lodestar.test.Echo/ServerStream", "application/json", "{}")
        .await;
    assert_eq!(
        answer.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeouts_become_the_call_deadline_and_get_serves_reads() {
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let answer = conn
        .post_with(
            "/lodestar.test.Echo/ReportDeadline",
            "application/json",
            &[("connect-timeout-ms", "5000")],
            "{}",
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let report = answer.json();
    assert_eq!(report["hasDeadline"], true, "{report}");
    let remaining: i64 = report["remainingMs"].as_str().unwrap().parse().unwrap();
    assert!((4000..=5000).contains(&remaining), "{report}");
    // The deadline ends a slow call: 504 deadline_exceeded.
    let answer = conn
        .post_with(
            "/lodestar.test.Echo/Sleep",
            "application/json",
            &[("connect-timeout-ms", "100")],
            r#"{"duration":"10s","token":"slow"}"#,
        )
        .await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{answer:?}");
    assert_eq!(answer.json()["code"], "deadline_exceeded");
    let answer = conn
        .post_with(
            "/lodestar.test.Echo/Unary",
            "application/json",
            &[("connect-timeout-ms", "soon")],
            "{}",
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");

    // GET, for the method marked NO_SIDE_EFFECTS.
    let get = |uri: String| {
        http::Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let answer = conn
        .send(get(
            "http://localhost/lodestar.test.Echo/ReportDeadline?connect=v1&encoding=json&message=%7B%7D"
                .into(),
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.json()["servedBy"], "a");
    let answer = conn
        .send(get(
            "http://localhost/lodestar.test.Echo/ReportDeadline?encoding=proto&base64=1&message="
                .into(),
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(DeadlineReport::decode(answer.body).unwrap().served_by, "a");
    // Others may not be called with GET.
    let answer = conn
        .send(get(
            "http://localhost/lodestar.test.Echo/Unary?encoding=json&message=%7B%7D".into(),
        ))
        .await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{answer:?}");
    assert_eq!(answer.header("allow"), "POST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_streams_end_with_an_end_of_stream_envelope() {
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let request = frame(0, br#"{"count":3,"token":"t","trailer":"done"}"#);
    let answer = conn
        .post(
            "/lodestar.test.Echo/ServerStream",
            "application/connect+json",
            request,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.header("content-type"), "application/connect+json");
    let got = frames(answer.body);
    assert_eq!(got.len(), 4, "{got:?}");
    for (flags, message) in &got[..3] {
        assert_eq!(*flags, 0);
        let reply: serde_json::Value = serde_json::from_slice(message).unwrap();
        assert_eq!(reply["servedBy"], "a");
    }
    let (flags, end) = &got[3];
    assert_eq!(*flags, 0x02);
    let end: serde_json::Value = serde_json::from_slice(end).unwrap();
    assert!(end.get("error").is_none(), "{end}");

    // Client streaming over HTTP/1.1: several request envelopes.
    let mut body = BytesMut::new();
    for word in ["a", "b", "c"] {
        body.put(frame(0, &echo_request(word)));
    }
    let answer = conn
        .post(
            "/lodestar.test.Echo/ClientStream",
            "application/connect+proto",
            body.freeze(),
        )
        .await;
    let got = frames(answer.body);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        !EchoReply::decode(got[0].1.clone())
            .unwrap()
            .served_by
            .is_empty()
    );
    assert_eq!(got[1].0, 0x02);

    // An error ends the stream in the envelope, still HTTP 200.
    let answer = conn
        .post(
            "/lodestar.test.Echo/Fail",
            "application/connect+json",
            frame(0, br#"{"code":5,"message":"gone"}"#),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let got = frames(answer.body);
    let end: serde_json::Value = serde_json::from_slice(&got.last().unwrap().1).unwrap();
    assert_eq!(end["error"]["code"], "not_found", "{end}");
    assert_eq!(end["error"]["message"], "gone", "{end}");
    assert_eq!(end["metadata"]["x-failed-by"][0], "a", "{end}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_carries_trailers_in_the_body_over_both_http_versions() {
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let address = running.local_addr();
    for mut conn in [Conn::http1(address).await, Conn::http2(address).await] {
        let answer = conn
            .post_with(
                "/lodestar.test.Echo/Unary",
                "application/grpc-web+proto",
                &[("x-grpc-web", "1")],
                frame(0, &echo_request("web")),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("content-type"), "application/grpc-web+proto");
        let got = frames(answer.body);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(EchoReply::decode(got[0].1.clone()).unwrap().message, "web");
        assert!(web_trailers(&got).contains("grpc-status: 0\r\n"));

        // NOT_FOUND, in the trailers (in the body), HTTP 200.
        let fail = FailRequest {
            code: 5,
            message: "absent".into(),
        };
        let answer = conn
            .post(
                "/lodestar.test.Echo/Fail",
                "application/grpc-web",
                frame(0, &fail.encode_to_vec()),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.headers.get("grpc-status").is_none());
        let trailers = web_trailers(&frames(answer.body));
        assert!(trailers.contains("grpc-status: 5\r\n"), "{trailers}");
        assert!(trailers.contains("grpc-message: absent\r\n"), "{trailers}");

        // Server streaming, JSON messages.
        let answer = conn
            .post(
                "/lodestar.test.Echo/ServerStream",
                "application/grpc-web+json",
                frame(0, br#"{"count":2,"token":"w"}"#),
            )
            .await;
        let got = frames(answer.body);
        assert_eq!(got.len(), 3, "{got:?}");
        let reply: serde_json::Value = serde_json::from_slice(&got[0].1).unwrap();
        assert_eq!(reply["servedBy"], "a");
        assert!(web_trailers(&got).contains("grpc-status: 0"));
    }
}

/// An instance of Echo whose connections may each hold 4 KiB unsent.
pub(super) async fn start_with_small_budget(world: &World) -> lodestar::RunningService {
    start_with(world, |b| {
        b.connection_limits(lodestar::ConnectionLimits {
            max_unsent_bytes_per_connection: 4096,
            ..lodestar::ConnectionLimits::default()
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_the_connections_budget_ends_a_grpc_web_stream_in_its_body() {
    let world = World::new();
    let running = start_with_small_budget(&world).await;
    // A 6 KB reply: more than the connection may hold. Over HTTP/1.1 with
    // no `TE: trailers`, only a status in the body reaches the client.
    let token = "t".repeat(6000);
    let request = format!(r#"{{"count":2,"token":"{token}"}}"#);
    for mut conn in [
        Conn::http1(running.local_addr()).await,
        Conn::http2(running.local_addr()).await,
    ] {
        let answer = conn
            .post(
                "/lodestar.test.Echo/ServerStream",
                "application/grpc-web+json",
                frame(0, request.as_bytes()),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let got = frames(answer.body);
        assert_eq!(got.len(), 1, "{got:?}");
        let trailers = web_trailers(&got);
        assert!(trailers.contains("grpc-status: 8\r\n"), "{trailers}");
        assert!(
            trailers.contains("max_unsent_bytes_per_connection"),
            "{trailers}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_text_is_base64_both_ways() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let body = b64.encode(frame(0, &echo_request("in text")));
    let answer = conn
        .post(
            "/lodestar.test.Echo/Unary",
            "application/grpc-web-text",
            body,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("content-type"),
        "application/grpc-web-text+proto"
    );
    // Each chunk is encoded on its own: decode padded segments in turn.
    let mut decoded = Vec::new();
    let text = answer.body.to_vec();
    let mut start = 0;
    for end in 1..=text.len() {
        let at_group_end = (end - start) % 4 == 0;
        if at_group_end && (text[end - 1] == b'=' || end == text.len()) {
            decoded.extend(b64.decode(&text[start..end]).unwrap());
            start = end;
        }
    }
    let got = frames(Bytes::from(decoded));
    assert_eq!(
        EchoReply::decode(got[0].1.clone()).unwrap().message,
        "in text"
    );
    assert!(web_trailers(&got).contains("grpc-status: 0"));

    // Not base64: INVALID_ARGUMENT, and the connection carries on.
    let answer = conn
        .post(
            "/lodestar.test.Echo/Unary",
            "application/grpc-web-text",
            "@@@@",
        )
        .await;
    let trailers = String::from_utf8(
        b64.decode(&answer.body[..])
            .map(|d| frames(Bytes::from(d)))
            .map(|f| web_trailers(&f).into_bytes())
            .unwrap(),
    )
    .unwrap();
    assert!(trailers.contains("grpc-status: 3"), "{trailers}");
    assert!(
        trailers.contains("0x40%20('@')%20at%20offset%200"),
        "{trailers}"
    );
    let answer = conn
        .post("/lodestar.test.Echo/Unary", "application/json", "{}")
        .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_documented_answer_and_the_connection_carries_on() {
    let world = World::new();
    let limits = lodestar::MessageLimits {
        max_decoding_message_size: 1024,
        ..lodestar::MessageLimits::default()
    };
    let running = start_with(&world, |b| b.message_limits(limits)).await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let status_of = |answer: Answer| {
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        web_trailers(&frames(answer.body))
    };
    // A frame whose length says more than the body holds (truncated).
    let mut truncated = BytesMut::from(&frame(0, &echo_request("x"))[..]);
    truncated.truncate(truncated.len() - 2);
    let trailers = status_of(
        conn.post(
            "/lodestar.test.Echo/Unary",
            "application/grpc-web",
            truncated.freeze(),
        )
        .await,
    );
    assert!(!trailers.contains("grpc-status: 0"), "{trailers}");
    // A flag gRPC does not define (a trailer frame from the client).
    let trailers = status_of(
        conn.post(
            "/lodestar.test.Echo/Unary",
            "application/grpc-web",
            frame(0x80, b"x: y\r\n"),
        )
        .await,
    );
    assert!(!trailers.contains("grpc-status: 0"), "{trailers}");
    // A message over the server's limit: RESOURCE_EXHAUSTED, nothing buffered.
    let big = EchoRequest {
        message: String::new(),
        payload: vec![7; 4096],
    }
    .encode_to_vec();
    let trailers = status_of(
        conn.post(
            "/lodestar.test.Echo/Unary",
            "application/grpc-web",
            frame(0, &big),
        )
        .await,
    );
    assert!(trailers.contains("grpc-status: 8"), "{trailers}");
    // Refused with an HTTP status, each on the same connection.
    // What is wrong, the content type, more headers, the body, the status.
    type Refusal = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        Bytes,
        StatusCode,
    );
    let refused: [Refusal; 5] = [
        (
            "a Connect unary body over the same limit",
            "application/proto",
            &[],
            big.into(),
            StatusCode::TOO_MANY_REQUESTS,
        ),
        (
            "a content type no protocol takes",
            "text/plain",
            &[],
            "hello".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "native gRPC over HTTP/1.1",
            "application/grpc",
            &[],
            frame(0, &echo_request("x")),
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        ),
        (
            "an unsupported compression",
            "application/json",
            &[("content-encoding", "br")],
            "{}".into(),
            StatusCode::NOT_IMPLEMENTED,
        ),
        (
            "a wrong Connect protocol version",
            "application/json",
            &[("connect-protocol-version", "2")],
            "{}".into(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (what, content_type, headers, body, status) in refused {
        let answer = conn
            .post_with("/lodestar.test.Echo/Unary", content_type, headers, body)
            .await;
        assert_eq!(answer.status, status, "{what}: {answer:?}");
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer.json()["code"], "resource_exhausted", "{what}");
        }
    }
    // After all of it, the same connection still serves.
    let answer = conn
        .post(
            "/lodestar.test.Echo/Unary",
            "application/json",
            r#"{"message":"still"}"#,
        )
        .await;
    assert_eq!(answer.json()["message"], "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_compressed_connect_calls_round_trip() {
    use std::io::{Read, Write};
    let world = World::new();
    let running = start_with(&world, |b| {
        b.send_compressed(lodestar::compression::Encoding::Gzip)
    })
    .await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(br#"{"message":"squeezed"}"#).unwrap();
    let answer = conn
        .post_with(
            "/lodestar.test.Echo/Unary",
            "application/json",
            &[("content-encoding", "gzip"), ("accept-encoding", "gzip")],
            gz.finish().unwrap(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.header("content-encoding"), "gzip");
    let mut json = String::new();
    flate2::read::GzDecoder::new(&answer.body[..])
        .read_to_string(&mut json)
        .unwrap();
    assert!(json.contains("squeezed"), "{json}");
}

/// A `GET` (or `HEAD`) of `path` with `headers`.
async fn get(conn: &mut Conn, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = http::Request::builder().method(method).uri(conn.uri(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    conn.send(request.body(Full::new(Bytes::new())).unwrap())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_client_and_assets_are_served_with_etags_over_http1_and_http2() {
    let world = World::new();
    let page: &'static [u8] = b"<!doctype html><p>the page</p>";
    let web = WebProtocols::default()
        .asset("/", "text/html; charset=utf-8", page)
        .unwrap();
    let running = start(&world, web).await;
    let address = running.local_addr();
    for mut conn in [Conn::http1(address).await, Conn::http2(address).await] {
        let client = get(&mut conn, Method::GET, "/_lodestar/client.js", &[]).await;
        assert_eq!(client.status, StatusCode::OK);
        assert_eq!(
            client.header("content-type"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(client.header("cache-control"), "no-cache");
        assert_eq!(client.header("access-control-allow-origin"), "*");
        let text = std::str::from_utf8(&client.body).unwrap();
        for export in [
            "export class LodestarError",
            "export function createClient",
            "lodestar.v1+json",
            "connect-timeout-ms",
        ] {
            assert!(text.contains(export), "client.js has {export}");
        }
        let etag = client.header("etag").to_owned();
        assert!(etag.starts_with('"') && etag.len() == 18, "{etag}");

        // Revalidation: the same ETag is 304 with no body.
        let again = get(
            &mut conn,
            Method::GET,
            "/_lodestar/client.js",
            &[("if-none-match", &etag)],
        )
        .await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED);
        assert!(again.body.is_empty());
        assert_eq!(again.header("etag"), etag);

        let head = get(&mut conn, Method::HEAD, "/_lodestar/client.js", &[]).await;
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.body.is_empty());
        assert_eq!(head.header("content-length"), client.body.len().to_string());

        // The asset, at its exact path only.
        let answer = get(&mut conn, Method::GET, "/", &[]).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("content-type"), "text/html; charset=utf-8");
        assert_eq!(&answer.body[..], page);
        assert!(answer.headers.get("access-control-allow-origin").is_none());
        let other = get(&mut conn, Method::GET, "/index.html", &[]).await;
        assert_ne!(other.status, StatusCode::OK);
        let post = conn.post("/", "text/html", "x").await;
        assert_eq!(post.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

        // The calls still work beside them.
        let call = conn
            .post(
                "/lodestar.test.Echo/Unary",
                "application/json",
                r#"{"message":"hi"}"#,
            )
            .await;
        assert_eq!(call.status, StatusCode::OK);
    }
    running.shutdown().await.unwrap();

    // Switched off: not served (the GET goes to Connect, which has no such
    // method).
    let world = World::new();
    let running = start(
        &world,
        WebProtocols {
            client_js: false,
            ..WebProtocols::default()
        },
    )
    .await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let off = get(&mut conn, Method::GET, "/_lodestar/client.js", &[]).await;
    assert_ne!(off.status, StatusCode::OK);
    assert!(!String::from_utf8_lossy(&off.body).contains("createClient"));
    running.shutdown().await.unwrap();

    // With the web protocols off, not even over HTTP/2.
    let world = World::new();
    let running = start(&world, WebProtocols::none()).await;
    let mut conn = Conn::http2(running.local_addr()).await;
    let none = get(&mut conn, Method::GET, "/_lodestar/client.js", &[]).await;
    assert_ne!(none.status, StatusCode::OK);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_allowed_origins_only() {
    let world = World::new();
    let web = WebProtocols {
        cors: Cors::allow(["http://app.example"]),
        ..WebProtocols::default()
    };
    let running = start(&world, web).await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let preflight = |origin: &str| {
        http::Request::builder()
            .method(Method::OPTIONS)
            .uri("http://localhost/lodestar.test.Echo/Unary")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,connect-protocol-version",
            )
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let answer = conn.send(preflight("http://app.example")).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{answer:?}");
    assert_eq!(
        answer.header("access-control-allow-origin"),
        "http://app.example"
    );
    assert!(
        answer
            .header("access-control-allow-methods")
            .contains("POST")
    );
    assert!(
        answer
            .header("access-control-allow-headers")
            .contains("connect-protocol-version")
    );
    assert_eq!(answer.header("access-control-max-age"), "7200");
    let answer = conn.send(preflight("http://evil.example")).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
    assert!(answer.headers.get("access-control-allow-origin").is_none());

    let call = |origin: &'static str| [("origin", origin)];
    let answer = conn
        .post_with(
            "/lodestar.test.Echo/Unary",
            "application/json",
            &call("http://app.example"),
            "{}",
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("access-control-allow-origin"),
        "http://app.example"
    );
    assert!(
        answer
            .header("access-control-expose-headers")
            .contains("grpc-status")
    );
    let answer = conn
        .post_with(
            "/lodestar.test.Echo/Unary",
            "application/grpc-web",
            &call("http://evil.example"),
            frame(0, &echo_request("x")),
        )
        .await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "served, but the browser keeps it from the page"
    );
    assert!(answer.headers.get("access-control-allow-origin").is_none());

    // The default: no cross-origin access at all.
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let answer = conn.send(preflight("http://app.example")).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_protocols_are_refused_and_grpc_only_refuses_http1() {
    let world = World::new();
    let web = WebProtocols {
        grpc_web: false,
        ..WebProtocols::default()
    };
    let running = start(&world, web).await;
    let mut conn = Conn::http2(running.local_addr()).await;
    let answer = conn
        .post(
            "/lodestar.test.Echo/Unary",
            "application/grpc-web",
            frame(0, &[]),
        )
        .await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let answer = conn
        .post("/lodestar.test.Echo/Unary", "application/json", "{}")
        .await;
    assert_eq!(answer.status, StatusCode::OK);

    let world = World::new();
    let running = start(&world, WebProtocols::none()).await;
    // HTTP/1.1 is not served at all: the connection is closed.
    let answer = bounded("an HTTP/1.1 request", async {
        let stream = tokio::net::TcpStream::connect(running.local_addr())
            .await
            .unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = http::Request::post("http://localhost/lodestar.test.Echo/Unary")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        sender.send_request(request).await
    })
    .await;
    assert!(answer.is_err(), "{answer:?}");
    // HTTP/2 with a web content type: 415.
    let mut conn = Conn::http2(running.local_addr()).await;
    let answer = conn
        .post("/lodestar.test.Echo/Unary", "application/json", "{}")
        .await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let mut echo = EchoClient::by_name(&world.client(), "echo");
    bounded("a native call", echo.unary(EchoRequest::default()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_layers_and_metrics_see_web_calls_as_they_see_grpc_calls() {
    let world = World::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    let metrics = lodestar::metrics::Metrics::new();
    let running = start_with(&world, |b| {
        b.metrics(Some(metrics.clone()))
            .layer(tower::layer::layer_fn(move |inner| Counting {
                inner,
                seen: counted.clone(),
            }))
    })
    .await;
    let mut conn = Conn::http1(running.local_addr()).await;
    conn.post("/lodestar.test.Echo/Unary", "application/json", "{}")
        .await;
    conn.post(
        "/lodestar.test.Echo/Unary",
        "application/grpc-web",
        frame(0, &echo_request("x")),
    )
    .await;
    let answer = conn
        .post(
            "/lodestar.test.Echo/Fail",
            "application/json",
            r#"{"code":5}"#,
        )
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let mut echo = EchoClient::by_name(&world.client(), "echo");
    bounded("a native call", echo.unary(EchoRequest::default()))
        .await
        .unwrap();
    assert_eq!(
        seen.load(Ordering::SeqCst),
        4,
        "the user layer saw every call"
    );
    assert_counted(&metrics, 3.0);
}

/// Asserts the server's metrics counted `ok` successful `Echo/Unary`
/// calls, and one `Echo/Fail` ending `NOT_FOUND`.
pub(super) fn assert_counted(metrics: &lodestar::metrics::Metrics, ok: f64) {
    let text = metrics.encode();
    let counted = sample(
        &text,
        "rpc_server_call_duration_seconds_count{rpc_system_name=\"grpc\",rpc_method=\"lodestar.test.Echo/Unary\",rpc_status_code=\"OK\",error_type=\"\"}",
    );
    assert_eq!(counted, Some(ok), "{text}");
    let failed = text
        .lines()
        .any(|l| l.contains("Echo/Fail") && l.contains("NOT_FOUND") && l.ends_with(" 1"));
    assert!(failed, "{text}");
}

/// A user layer that counts the calls it sees.
#[derive(Clone)]
pub(super) struct Counting {
    pub(super) inner: lodestar::server::Next,
    pub(super) seen: Arc<AtomicUsize>,
}

impl tower_service::Service<http::Request<lodestar::server::RequestBody>> for Counting {
    type Response = http::Response<lodestar::server::ResponseBody>;
    type Error = tower::BoxError;
    type Future = <lodestar::server::Next as tower_service::Service<
        http::Request<lodestar::server::RequestBody>,
    >>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), tower::BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<lodestar::server::RequestBody>) -> Self::Future {
        self.seen.fetch_add(1, Ordering::SeqCst);
        self.inner.call(request)
    }
}

/// `curl`, for Connect unary JSON as anyone would call it.
fn curl(args: &[&str]) -> (String, String) {
    let mut command = std::process::Command::new("curl");
    command.args(["-sS", "--max-time", "10"]).args(args);
    let output = run_bounded(command, Duration::from_secs(20));
    assert!(output.status.success(), "curl {args:?}: {output:?}");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_calls_connect_unary_json() {
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let url = format!("http://{}/lodestar.test.Echo/Unary", running.local_addr());
    let (out, _) = tokio::task::spawn_blocking(move || {
        curl(&[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"message":"from curl"}"#,
            &url,
        ])
    })
    .await
    .unwrap();
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["message"], "from curl");
    let url = format!("http://{}/lodestar.test.Echo/Fail", running.local_addr());
    let (out, _) = tokio::task::spawn_blocking(move || {
        curl(&[
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"code":5,"message":"nothing here"}"#,
            &url,
        ])
    })
    .await
    .unwrap();
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "404");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(body).unwrap()["code"],
        "not_found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_tls_http1_by_alpn_gets_connect_and_h2_still_gets_grpc() {
    use lodestar::tls::{ClientTls, DevPki, ServerTls};
    let world = World::new();
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], 1).unwrap();
    let tls = ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes()).unwrap();
    let running = start_with(&world, |b| b.tls(tls)).await;
    let dir = std::env::temp_dir().join(format!("lodestar-web-{}", unique_name()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_cert).unwrap();
    let url = format!(
        "https://localhost:{}/lodestar.test.Echo/Unary",
        running.local_addr().port()
    );
    let ca_arg = ca.display().to_string();
    let (out, err) = tokio::task::spawn_blocking(move || {
        curl(&[
            "-v",
            "--http1.1",
            "--cacert",
            &ca_arg,
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"message":"tls"}"#,
            &url,
        ])
    })
    .await
    .unwrap();
    assert!(err.contains("ALPN: server accepted http/1.1"), "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["message"], "tls");
    let _ = std::fs::remove_dir_all(&dir);
    let client = lodestar::Client::builder(world.registry.clone())
        .tls(ClientTls::from_ca_pem(pki.ca_cert.as_bytes()).unwrap())
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let reply = bounded("a native call over h2", echo.unary(EchoRequest::default()))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().served_by, "a");
}

/// `buf curl` (npm `@bufbuild/buf`, installed by `scripts/test` into
/// `target/npm`), with the test service's descriptors as its schema.
fn buf_curl(schema: &std::path::Path, args: &[&str]) -> std::process::Output {
    let root = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/npm/node_modules/.bin/buf"
    );
    let buf = find_binary(
        "LODESTAR_BUF",
        &[root, "buf"],
        "buf (npm @bufbuild/buf) is needed for the third-party client tests",
    );
    let mut command = std::process::Command::new(buf);
    command.args(["curl", "--schema"]).arg(schema).args(args);
    run_bounded(command, Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buf_curl_calls_over_connect_grpc_web_and_grpc() {
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let dir = std::env::temp_dir().join(format!("lodestar-buf-{}", unique_name()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("echo.binpb");
    std::fs::write(&schema, pb::FILE_DESCRIPTOR_SET).unwrap();
    let base = format!("http://{}", running.local_addr());
    for (protocol, extra) in [
        ("connect", None),
        ("grpcweb", None),
        ("grpc", Some("--http2-prior-knowledge")),
    ] {
        let (schema1, base1) = (schema.clone(), base.clone());
        let output = tokio::task::spawn_blocking(move || {
            let (schema, base) = (schema1, base1);
            let url = format!("{base}/lodestar.test.Echo/Unary");
            let mut args = vec!["--protocol", protocol, "-d", r#"{"message":"via buf"}"#];
            args.extend(extra);
            args.push(&url);
            buf_curl(&schema, &args)
        })
        .await
        .unwrap();
        let out = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{protocol}: {output:?}");
        let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(reply["message"], "via buf", "{protocol}");

        // NOT_FOUND as each protocol carries it.
        let (schema2, base2) = (schema.clone(), base.clone());
        let output = tokio::task::spawn_blocking(move || {
            let (schema, base) = (schema2, base2);
            let url = format!("{base}/lodestar.test.Echo/Fail");
            let mut args = vec!["--protocol", protocol, "-d", r#"{"code":5,"message":"no"}"#];
            args.extend(extra);
            args.push(&url);
            buf_curl(&schema, &args)
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{protocol}: {output:?}");
        assert!(err.contains("not_found"), "{protocol}: {err}");
    }
    // Server streaming over Connect and gRPC-Web, on HTTP/1.1.
    for protocol in ["connect", "grpcweb"] {
        let (schema3, base3) = (schema.clone(), base.clone());
        let output = tokio::task::spawn_blocking(move || {
            let (schema, base) = (schema3, base3);
            let url = format!("{base}/lodestar.test.Echo/ServerStream");
            buf_curl(
                &schema,
                &["--protocol", protocol, "-d", r#"{"count":3}"#, &url],
            )
        })
        .await
        .unwrap();
        assert!(output.status.success(), "{protocol}: {output:?}");
        let out = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            out.matches("\"servedBy\": \"a\"").count(),
            3,
            "{protocol}: {out}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_rate_limit_counts_web_and_grpc_calls_alike() {
    let world = World::new();
    // A burst of 3, refilled once in 1,000 s: the fourth call is refused.
    let policy = lodestar::server::policy::Policy::from_toml(
        "[[methods]]\nnames = [\"lodestar.test.Echo/Unary\"]\n\
         rate_limit = { per_second = 0.001, burst = 3 }",
    )
    .unwrap();
    let running = start_with(&world, |b| b.policy(policy).unwrap()).await;
    let mut conn = Conn::http1(running.local_addr()).await;
    let answer = conn
        .post("/lodestar.test.Echo/Unary", "application/json", "{}")
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = conn
        .post(
            "/lodestar.test.Echo/Unary",
            "application/grpc-web",
            frame(0, &echo_request("x")),
        )
        .await;
    assert!(web_trailers(&frames(answer.body)).contains("grpc-status: 0"));
    let mut echo = EchoClient::by_name(&world.client(), "echo");
    bounded("a native call", echo.unary(EchoRequest::default()))
        .await
        .unwrap();
    // The burst is spent by the three protocols together.
    let answer = conn
        .post("/lodestar.test.Echo/Unary", "application/json", "{}")
        .await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS, "{answer:?}");
    assert_eq!(answer.json()["code"], "resource_exhausted");
    let answer = conn
        .post(
            "/lodestar.test.Echo/Unary",
            "application/grpc-web",
            frame(0, &echo_request("x")),
        )
        .await;
    assert!(web_trailers(&frames(answer.body)).contains("grpc-status: 8"));
    let status = bounded("a native call", echo.unary(EchoRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), lodestar::Code::ResourceExhausted);
}

// WebSocket: the lodestar.v1 sub-protocol (docs/web.md, "WebSocket").

mod websocket {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::{self, Message};

    type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

    /// Opens a socket on `path` with `protocol`, and `origin` if given.
    async fn open(
        address: std::net::SocketAddr,
        path: &str,
        protocol: &str,
        origin: Option<&str>,
    ) -> Result<Socket, tungstenite::Error> {
        let mut request = format!("ws://{address}{path}").into_client_request()?;
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocol.parse().unwrap());
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
        }
        let stream = bounded("connect", tokio::net::TcpStream::connect(address))
            .await
            .unwrap();
        let (socket, response) = bounded(
            "a WebSocket handshake",
            tokio_tungstenite::client_async(request, stream),
        )
        .await?;
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            protocol,
            "the server picks the offered sub-protocol"
        );
        Ok(socket)
    }

    /// Opens a socket and sends the leading envelope.
    async fn call(
        address: std::net::SocketAddr,
        path: &str,
        protocol: &str,
        leading: &str,
    ) -> Socket {
        let mut socket = open(address, path, protocol, None).await.unwrap();
        send(&mut socket, frame(0x04, leading.as_bytes())).await;
        socket
    }

    async fn send(socket: &mut Socket, envelope: Bytes) {
        bounded("a send", socket.send(Message::Binary(envelope)))
            .await
            .unwrap();
    }

    /// The next envelope from the server (pings skipped).
    async fn receive(socket: &mut Socket) -> (u8, Bytes) {
        loop {
            match bounded("a message", socket.next()).await {
                Some(Ok(Message::Binary(data))) => {
                    let mut got = frames(data);
                    assert_eq!(got.len(), 1, "one envelope per message");
                    return got.remove(0);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame and returns its code.
    async fn closed(socket: &mut Socket) -> CloseCode {
        loop {
            match bounded("the close", socket.next()).await {
                Some(Ok(Message::Close(Some(frame)))) => return frame.code,
                Some(Ok(Message::Close(None))) | None => return CloseCode::Status,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("expected a close frame, got {e}"),
            }
        }
    }

    /// The end envelope's JSON, then a normal close.
    async fn end_of(socket: &mut Socket) -> serde_json::Value {
        let (flags, payload) = receive(socket).await;
        assert_eq!(flags, 0x02, "the end envelope: {payload:?}");
        let end: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(closed(socket).await, CloseCode::Normal);
        end
    }

    const JSON: &str = "lodestar.v1+json";
    const PROTO: &str = "lodestar.v1+proto";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_call_kind_runs_over_a_websocket_with_json_and_proto() {
        let world = World::new();
        let running = start(&world, WebProtocols::default()).await;
        let address = running.local_addr();

        // Unary, JSON: leading metadata, the message, the half-close.
        let mut socket = call(address, "/lodestar.test.Echo/Unary", JSON, "{}").await;
        send(&mut socket, frame(0, br#"{"message":"hi"}"#)).await;
        send(&mut socket, frame(0x02, b"")).await;
        let (flags, reply) = receive(&mut socket).await;
        assert_eq!(flags, 0);
        let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["message"], "hi");
        assert_eq!(reply["servedBy"], "a");
        let end = end_of(&mut socket).await;
        assert!(end.get("error").is_none(), "{end}");

        // Unary, proto.
        let mut socket = call(address, "/lodestar.test.Echo/Unary", PROTO, "{}").await;
        send(&mut socket, frame(0, &echo_request("bin"))).await;
        send(&mut socket, frame(0x02, b"")).await;
        let (_, reply) = receive(&mut socket).await;
        assert_eq!(EchoReply::decode(reply).unwrap().message, "bin");
        assert!(end_of(&mut socket).await.get("error").is_none());

        // Server streaming, JSON, with a trailer in the end envelope.
        let mut socket = call(address, "/lodestar.test.Echo/ServerStream", JSON, "{}").await;
        send(
            &mut socket,
            frame(0, br#"{"count":3,"token":"t","trailer":"done"}"#),
        )
        .await;
        send(&mut socket, frame(0x02, b"")).await;
        for n in 0..3 {
            let (flags, reply) = receive(&mut socket).await;
            assert_eq!(flags, 0);
            let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
            assert_eq!(reply["message"], format!("t #{n}"));
        }
        let end = end_of(&mut socket).await;
        assert!(end.get("error").is_none(), "{end}");
        assert_eq!(end["metadata"]["x-trailer"][0], "done", "{end}");

        // Server streaming, proto.
        let mut socket = call(address, "/lodestar.test.Echo/ServerStream", PROTO, "{}").await;
        let request = StreamRequest {
            count: 2,
            token: "p".into(),
            ..Default::default()
        };
        send(&mut socket, frame(0, &request.encode_to_vec())).await;
        send(&mut socket, frame(0x02, b"")).await;
        for n in 0..2 {
            let (_, reply) = receive(&mut socket).await;
            assert_eq!(EchoReply::decode(reply).unwrap().message, format!("p #{n}"));
        }
        assert!(end_of(&mut socket).await.get("error").is_none());

        // Client streaming, both encodings: the answer comes after the half-close.
        for protocol in [JSON, PROTO] {
            let mut socket =
                call(address, "/lodestar.test.Echo/ClientStream", protocol, "{}").await;
            for word in ["a", "b", "c"] {
                let message = if protocol == JSON {
                    format!(r#"{{"message":"{word}"}}"#).into_bytes()
                } else {
                    echo_request(word)
                };
                send(&mut socket, frame(0, &message)).await;
            }
            send(&mut socket, frame(0x02, b"")).await;
            let (_, reply) = receive(&mut socket).await;
            let message = if protocol == JSON {
                serde_json::from_slice::<serde_json::Value>(&reply).unwrap()["message"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            } else {
                EchoReply::decode(reply).unwrap().message
            };
            assert_eq!(message, "3 messages", "{protocol}");
            assert!(end_of(&mut socket).await.get("error").is_none());
        }

        // Bidi ping-pong, both encodings: each answer is read before the
        // next message is sent.
        for protocol in [JSON, PROTO] {
            let mut socket = call(address, "/lodestar.test.Echo/Bidi", protocol, "{}").await;
            for n in 0..5 {
                let word = format!("ping {n}");
                let message = if protocol == JSON {
                    format!(r#"{{"message":"{word}"}}"#).into_bytes()
                } else {
                    echo_request(&word)
                };
                send(&mut socket, frame(0, &message)).await;
                let (flags, reply) = receive(&mut socket).await;
                assert_eq!(flags, 0);
                let got = if protocol == JSON {
                    serde_json::from_slice::<serde_json::Value>(&reply).unwrap()["message"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                } else {
                    EchoReply::decode(reply).unwrap().message
                };
                assert_eq!(got, word, "{protocol}");
            }
            send(&mut socket, frame(0x02, b"")).await;
            assert!(end_of(&mut socket).await.get("error").is_none());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statuses_headers_and_deadlines_travel_in_the_envelopes() {
        let world = World::new();
        let running = start(&world, WebProtocols::default()).await;
        let address = running.local_addr();

        // NOT_FOUND in the end envelope, with the handler's metadata.
        let mut socket = call(address, "/lodestar.test.Echo/Fail", JSON, "{}").await;
        send(&mut socket, frame(0, br#"{"code":5,"message":"gone"}"#)).await;
        send(&mut socket, frame(0x02, b"")).await;
        let end = end_of(&mut socket).await;
        assert_eq!(end["error"]["code"], "not_found", "{end}");
        assert_eq!(end["error"]["message"], "gone", "{end}");
        assert_eq!(end["metadata"]["x-failed-by"][0], "a", "{end}");

        // The deadline from the leading envelope: the handler sees it...
        let mut socket = call(
            address,
            "/lodestar.test.Echo/ReportDeadline",
            JSON,
            r#"{"headers":{"x-tenant":"t1"},"timeout_ms":5000}"#,
        )
        .await;
        send(&mut socket, frame(0, b"{}")).await;
        send(&mut socket, frame(0x02, b"")).await;
        let (_, reply) = receive(&mut socket).await;
        let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["hasDeadline"], true, "{reply}");
        let remaining = reply["remainingMs"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap();
        assert!((1..=5000).contains(&remaining), "{reply}");
        end_of(&mut socket).await;

        // ...and a call that outlives it ends DEADLINE_EXCEEDED.
        let mut socket = call(
            address,
            "/lodestar.test.Echo/Sleep",
            PROTO,
            r#"{"timeout_ms":100}"#,
        )
        .await;
        let sleep = sleep_request("ws", Duration::from_secs(30));
        send(&mut socket, frame(0, &sleep.encode_to_vec())).await;
        send(&mut socket, frame(0x02, b"")).await;
        let end = end_of(&mut socket).await;
        assert_eq!(end["error"]["code"], "deadline_exceeded", "{end}");

        // An unknown method: unimplemented in the end envelope.
        let mut socket = call(address, "/lodestar.test.Echo/Nope", JSON, "{}").await;
        send(&mut socket, frame(0, b"{}")).await;
        send(&mut socket, frame(0x02, b"")).await;
        let end = end_of(&mut socket).await;
        assert_eq!(end["error"]["code"], "unimplemented", "{end}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_input_gets_its_close_code_and_the_server_carries_on() {
        let world = World::new();
        let limits = lodestar::MessageLimits {
            max_decoding_message_size: 1024,
            ..lodestar::MessageLimits::default()
        };
        let running = start_with(&world, |b| {
            b.message_limits(limits).web(WebProtocols {
                cors: Cors::allow(["https://app.example.com"]),
                ..WebProtocols::default()
            })
        })
        .await;
        let address = running.local_addr();
        let unary = "/lodestar.test.Echo/Unary";
        let serves = || async {
            let mut socket = call(address, unary, JSON, "{}").await;
            send(&mut socket, frame(0, br#"{"message":"still"}"#)).await;
            send(&mut socket, frame(0x02, b"")).await;
            let (_, reply) = receive(&mut socket).await;
            assert!(String::from_utf8_lossy(&reply).contains("still"));
            end_of(&mut socket).await;
        };

        // An envelope whose length disagrees with its message: 1002.
        let mut socket = call(address, unary, JSON, "{}").await;
        let mut wrong = BytesMut::from(&frame(0, b"{}")[..]);
        wrong.put_slice(b"extra");
        send(&mut socket, wrong.freeze()).await;
        assert_eq!(closed(&mut socket).await, CloseCode::Protocol);
        serves().await;

        // Too short to be an envelope, and a first envelope that is not
        // the leading metadata: 1002.
        let mut socket = open(address, unary, JSON, None).await.unwrap();
        send(&mut socket, Bytes::from_static(&[0, 0])).await;
        assert_eq!(closed(&mut socket).await, CloseCode::Protocol);
        let mut socket = open(address, unary, JSON, None).await.unwrap();
        send(&mut socket, frame(0, b"{}")).await;
        assert_eq!(closed(&mut socket).await, CloseCode::Protocol);
        serves().await;

        // A message over the receive limit: 1009, announced by the
        // envelope's length alone.
        let mut socket = call(address, unary, PROTO, "{}").await;
        let mut header = BytesMut::new();
        header.put_u8(0);
        header.put_u32(1 << 20);
        send(&mut socket, header.freeze()).await;
        assert_eq!(closed(&mut socket).await, CloseCode::Size);
        // A WebSocket message over the bound: 1009 from the frame limit.
        let mut socket = call(address, unary, PROTO, "{}").await;
        let big = vec![b'x'; 4096];
        let _ = socket.send(Message::Binary(frame(0, &big))).await;
        assert_eq!(closed(&mut socket).await, CloseCode::Size);
        serves().await;

        // A text frame: 1003.
        let mut socket = call(address, unary, JSON, "{}").await;
        bounded("a send", socket.send(Message::text(r#"{"message":"t"}"#)))
            .await
            .unwrap();
        assert_eq!(closed(&mut socket).await, CloseCode::Unsupported);
        serves().await;

        // A bad leading envelope (a reserved header): 1002.
        let mut socket = call(address, unary, JSON, r#"{"headers":{"grpc-timeout":"1S"}}"#).await;
        assert_eq!(closed(&mut socket).await, CloseCode::Protocol);

        // Origins: an allowed one opens, a disallowed one gets 403 before
        // the upgrade, none (a non-browser client) opens.
        let socket = open(address, unary, JSON, Some("https://app.example.com")).await;
        assert!(socket.is_ok());
        match open(address, unary, JSON, Some("https://evil.example.com")).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::FORBIDDEN)
            }
            other => panic!("a disallowed origin must get 403, got {other:?}"),
        }
        // The service's own origin (a page it served) opens without being
        // listed: the Origin's host and port are the Host.
        let own = format!("http://{address}");
        let socket = open(address, unary, JSON, Some(&own)).await;
        assert!(socket.is_ok(), "the service's own origin opens");
        // No sub-protocol of ours: 400.
        match open(address, unary, "chat", None).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::BAD_REQUEST)
            }
            other => panic!("an unknown sub-protocol must get 400, got {other:?}"),
        }
        serves().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_socket_is_pinged_and_websocket_can_be_switched_off() {
        let world = World::new();
        let running = start(
            &world,
            WebProtocols {
                websocket_ping_interval: Duration::from_millis(100),
                websocket_ping_timeout: Duration::from_millis(200),
                ..WebProtocols::default()
            },
        )
        .await;
        let address = running.local_addr();
        // The raw socket is read with no automatic pong: tungstenite
        // answers pings only when it reads, so reading once and then
        // stopping leaves the server's second ping unanswered.
        let mut socket = open(address, "/lodestar.test.Echo/Bidi", JSON, None)
            .await
            .unwrap();
        match bounded("a ping", socket.next()).await {
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("expected the server's ping, got {other:?}"),
        }
        // Answering keeps the socket open: the call still runs.
        send(&mut socket, frame(0x04, b"{}")).await;
        send(&mut socket, frame(0, br#"{"message":"alive"}"#)).await;
        let (_, reply) = receive(&mut socket).await;
        assert!(String::from_utf8_lossy(&reply).contains("alive"));
        send(&mut socket, frame(0x02, b"")).await;
        end_of(&mut socket).await;

        // A peer that never reads answers no ping: closed 1001 (going away).
        // Reading would answer the ping (so no event can be awaited here):
        // the test waits without reading for over three times the interval
        // and the timeout together (300 ms), for a loaded machine.
        let mut silent = open(address, "/lodestar.test.Echo/Bidi", JSON, None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(closed(&mut silent).await, CloseCode::Away);

        // Switched off: no upgrade.
        let off = start(
            &world,
            WebProtocols {
                websocket: false,
                ..WebProtocols::default()
            },
        )
        .await;
        match open(off.local_addr(), "/lodestar.test.Echo/Unary", JSON, None).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            other => panic!("WebSocket off must refuse the upgrade, got {other:?}"),
        }
    }

    /// A browser's way under TLS: ALPN offers only `http/1.1`, and the
    /// socket opens with an HTTP/1.1 `Upgrade`; an `h2` client of the same
    /// port still gets native gRPC.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_tls_a_socket_opens_over_http1_by_alpn_and_h2_still_gets_grpc() {
        use lodestar::tls::{ClientTls, DevPki, ServerTls};
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};

        let world = World::new();
        let pki = DevPki::generate(&["localhost", "127.0.0.1"], 1).unwrap();
        let tls =
            ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes()).unwrap();
        let running = start_with(&world, |b| b.tls(tls)).await;
        let address = running.local_addr();

        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pki.ca_cert.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = bounded("connect", tokio::net::TcpStream::connect(address))
            .await
            .unwrap();
        let stream = bounded(
            "a TLS handshake",
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").unwrap(), tcp),
        )
        .await
        .unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

        let mut request = format!("wss://localhost:{}/lodestar.test.Echo/Bidi", address.port())
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", JSON.parse().unwrap());
        let (mut socket, response) = bounded(
            "a WebSocket handshake over TLS",
            tokio_tungstenite::client_async(request, stream),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        bounded("a send", socket.send(Message::Binary(frame(0x04, b"{}"))))
            .await
            .unwrap();
        for word in ["over", "tls"] {
            let message = format!(r#"{{"message":"{word}"}}"#);
            bounded(
                "a send",
                socket.send(Message::Binary(frame(0, message.as_bytes()))),
            )
            .await
            .unwrap();
            let reply = match bounded("a reply", socket.next()).await {
                Some(Ok(Message::Binary(data))) => frames(data).remove(0).1,
                other => panic!("expected a reply, got {other:?}"),
            };
            let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
            assert_eq!(reply["message"], word);
        }
        bounded("a send", socket.send(Message::Binary(frame(0x02, b""))))
            .await
            .unwrap();
        let end = loop {
            match bounded("the end envelope", socket.next()).await {
                Some(Ok(Message::Binary(data))) => break frames(data).remove(0),
                Some(Ok(Message::Ping(_))) => {}
                other => panic!("expected the end envelope, got {other:?}"),
            }
        };
        assert_eq!(end.0, 0x02);

        let client = lodestar::Client::builder(world.registry.clone())
            .tls(ClientTls::from_ca_pem(pki.ca_cert.as_bytes()).unwrap())
            .build();
        let mut echo = EchoClient::by_name(&client, "echo");
        let reply = bounded("a native call over h2", echo.unary(EchoRequest::default()))
            .await
            .unwrap();
        assert_eq!(reply.into_inner().served_by, "a");
    }

    /// A bidi socket with one round trip done: the upgrade is complete
    /// and the call runs.
    async fn live(address: std::net::SocketAddr) -> Socket {
        let mut socket = call(address, "/lodestar.test.Echo/Bidi", JSON, "{}").await;
        send(&mut socket, frame(0, br#"{"message":"up"}"#)).await;
        let (_, reply) = receive(&mut socket).await;
        assert!(String::from_utf8_lossy(&reply).contains("up"));
        socket
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockets_count_as_connections_and_close_going_away_when_the_server_drains() {
        let world = World::new();
        let grace = Duration::from_secs(2);
        let running = start_with(&world, |b| {
            b.connection_limits(lodestar::ConnectionLimits {
                max_connections: 2,
                ..lodestar::ConnectionLimits::default()
            })
            .grace_period(grace)
        })
        .await;
        let address = running.local_addr();

        // An upgraded HTTP/1.1 connection is still a connection: with two
        // sockets open, a third is closed before its handshake.
        let mut first = live(address).await;
        let mut second = live(address).await;
        assert!(
            open(address, "/lodestar.test.Echo/Bidi", JSON, None)
                .await
                .is_err(),
            "a socket over max_connections must be refused"
        );

        // One ends: its place is free once the server has closed it.
        send(&mut first, frame(0x02, b"")).await;
        end_of(&mut first).await;
        assert!(
            bounded("the server to close the socket", first.next())
                .await
                .is_none()
        );
        let mut third = bounded("a freed place", async {
            loop {
                if let Ok(socket) = open(address, "/lodestar.test.Echo/Bidi", JSON, None).await {
                    return socket;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        send(&mut third, frame(0x04, b"{}")).await;

        // At shutdown, sockets whose calls still run are waited for, then
        // closed with 1001 before the grace period ends, so the drain
        // ends without cutting anything.
        let started = std::time::Instant::now();
        let shutdown = tokio::spawn(running.shutdown());
        for socket in [&mut second, &mut third] {
            assert_eq!(closed(socket).await, CloseCode::Away);
            // Reading on sends the client's close frame back.
            assert!(bounded("the socket's end", socket.next()).await.is_none());
        }
        let waited = started.elapsed();
        assert!(
            waited >= grace / 2,
            "the calls were given time to finish (closed after {waited:?})"
        );
        bounded("the shutdown", shutdown).await.unwrap().unwrap();
        assert!(
            started.elapsed() < grace,
            "the drain ended before the grace period: nothing was cut"
        );
    }
}

/// WebSocket over HTTP/2 (RFC 8441), with a raw `h2` client and frames
/// encoded by hand: the extended `CONNECT`, then a unary call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_opens_by_extended_connect_over_http2() {
    /// A masked client frame (RFC 6455 §5.2), binary, short.
    fn ws_frame(payload: &[u8]) -> Bytes {
        assert!(payload.len() < 126);
        let mask = [1u8, 2, 3, 4];
        let mut out = BytesMut::new();
        out.put_u8(0x82);
        out.put_u8(0x80 | payload.len() as u8);
        out.put_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out.freeze()
    }
    let world = World::new();
    let running = start(&world, WebProtocols::default()).await;
    let stream = bounded(
        "connect",
        tokio::net::TcpStream::connect(running.local_addr()),
    )
    .await
    .unwrap();
    let (client, connection) = bounded("an h2 handshake", h2::client::handshake(stream))
        .await
        .unwrap();
    let mut connection = connection;
    let mut ping_pong = connection.ping_pong().unwrap();
    tokio::spawn(connection);
    // The server's SETTINGS come first, so once a ping is answered they
    // have been read.
    bounded("a pong", ping_pong.ping(h2::Ping::opaque()))
        .await
        .unwrap();
    let mut client = bounded("ready", client.ready()).await.unwrap();
    assert!(client.is_extended_connect_protocol_enabled());
    let mut request = http::Request::builder()
        .method(Method::CONNECT)
        .uri("http://localhost/lodestar.test.Echo/Unary")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "lodestar.v1+json")
        .body(())
        .unwrap();
    request
        .extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (response, mut send) = client.send_request(request, false).unwrap();
    let response = bounded("the CONNECT's answer", response).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "lodestar.v1+json"
    );
    for envelope in [
        frame(0x04, b"{}"),
        frame(0, br#"{"message":"over h2"}"#),
        frame(0x02, b""),
    ] {
        send.send_data(ws_frame(&envelope), false).unwrap();
    }
    // The server's frames (unmasked): the reply, the end envelope, close.
    let mut body = response.into_body();
    let mut got = BytesMut::new();
    let mut messages: Vec<(u8, Bytes)> = Vec::new();
    while messages.last().is_none_or(|(op, _)| *op != 0x8) {
        let data = bounded("a frame", body.data()).await.unwrap().unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        got.extend_from_slice(&data);
        while got.len() >= 2 && got.len() >= 2 + (got[1] & 0x7f) as usize {
            assert!(got[1] & 0x7f < 126, "short frames only");
            let len = (got[1] & 0x7f) as usize;
            let op = got[0] & 0x0f;
            let frame = got.split_to(2 + len).freeze();
            messages.push((op, frame.slice(2..)));
        }
    }
    let reply = frames(messages[0].1.clone());
    assert_eq!(messages[0].0, 0x2, "binary");
    assert!(String::from_utf8_lossy(&reply[0].1).contains("over h2"));
    let end = frames(messages[1].1.clone());
    assert_eq!(end[0].0, 0x02);
    assert_eq!(&end[0].1[..], b"{}");
    assert_eq!(&messages[2].1[..2], &1000u16.to_be_bytes());
}

// The client's side: `ClientBuilder::protocol`.

/// A client of `world`'s registry whose calls go over `protocol`.
fn web_client(
    world: &World,
    protocol: lodestar::client::Protocol,
) -> EchoClient<lodestar::client::Channel> {
    let client = lodestar::Client::builder(world.registry.clone())
        .protocol(protocol)
        .build();
    EchoClient::by_name(&client, "echo")
}

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        payload: vec![],
    }
}

/// Calls over `protocol`: a unary call with metadata both ways, a large
/// message each way (many HTTP/2 frames and, in text, base64 split
/// wherever they split), and a server stream with its trailer.
async fn unary_large_and_server_stream(
    client: &mut EchoClient<lodestar::client::Channel>,
    protocol: lodestar::client::Protocol,
) {
    use tokio_stream::StreamExt as _;
    let mut request = lodestar::Request::new(echo("hello"));
    request
        .metadata_mut()
        .insert("x-asked", "yes".parse().unwrap());
    let reply = bounded("unary", client.unary(request)).await.unwrap();
    assert_eq!(
        reply.metadata().get("x-asked").unwrap(),
        "yes",
        "{protocol}"
    );
    assert_eq!(reply.get_ref().message, "hello", "{protocol}");
    let large = "0123456789".repeat(20_000) + "!";
    let reply = bounded("large", client.unary(echo(&large))).await.unwrap();
    assert!(reply.get_ref().message == large, "{protocol}");

    let stream = bounded(
        "server stream",
        client.server_stream(StreamRequest {
            count: 3,
            interval: None,
            token: "s".into(),
            trailer: "end".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let mut stream = stream.into_inner();
    let mut got = Vec::new();
    while let Some(reply) = bounded("a message", stream.next()).await {
        got.push(reply.unwrap().message);
    }
    assert_eq!(got, ["s #0", "s #1", "s #2"], "{protocol}");
    let trailers = bounded("trailers", stream.trailers())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(trailers.get("x-trailer").unwrap(), "end", "{protocol}");
}

/// A `NOT_FOUND` over `protocol`, its message not ASCII: the status, for
/// its metadata.
async fn not_found(
    client: &mut EchoClient<lodestar::client::Channel>,
    protocol: lodestar::client::Protocol,
) -> lodestar::Status {
    let status = bounded(
        "fail",
        client.fail(FailRequest {
            code: lodestar::Code::NotFound as i32,
            message: "no such order: ünïcode ✓".into(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(
        status.code(),
        lodestar::Code::NotFound,
        "{protocol}: {status:?}"
    );
    assert_eq!(status.message(), "no such order: ünïcode ✓", "{protocol}");
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_calls_every_kind_over_grpc_web_binary_and_text_and_connect() {
    use lodestar::client::Protocol;
    use tokio_stream::StreamExt as _;
    let world = World::new();
    let _running = start(&world, WebProtocols::default()).await;
    for protocol in [Protocol::GrpcWeb, Protocol::GrpcWebText, Protocol::Connect] {
        let mut client = web_client(&world, protocol);

        unary_large_and_server_stream(&mut client, protocol).await;

        // Client stream.
        let messages = tokio_stream::iter((0..3).map(|n| EchoRequest {
            message: format!("c{n}"),
            payload: vec![0; 10],
        }));
        let reply = bounded("client stream", client.client_stream(messages))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.message, "3 messages", "{protocol}");
        assert_eq!(reply.payload_len, 30, "{protocol}");

        // Bidi, one answer per message as it goes.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let replies = bounded(
            "bidi",
            client.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)),
        );
        tx.send(echo("b0")).await.unwrap();
        let mut replies = replies.await.unwrap().into_inner();
        assert_eq!(
            bounded("b0", replies.next())
                .await
                .unwrap()
                .unwrap()
                .message,
            "b0"
        );
        tx.send(echo("b1")).await.unwrap();
        assert_eq!(
            bounded("b1", replies.next())
                .await
                .unwrap()
                .unwrap()
                .message,
            "b1"
        );
        drop(tx);
        assert!(
            bounded("the end", replies.next()).await.is_none(),
            "{protocol}"
        );

        // NOT_FOUND, with its message (not ASCII) and metadata.
        let status = not_found(&mut client, protocol).await;
        assert_eq!(
            status.metadata().get("x-failed-by").unwrap(),
            "a",
            "{protocol}"
        );

        // The deadline reaches the server, and one that passes is
        // DEADLINE_EXCEEDED.
        let mut request = lodestar::Request::new(());
        request.set_timeout(Duration::from_secs(5));
        let report = bounded("report", client.report_deadline(request))
            .await
            .unwrap()
            .into_inner();
        assert!(
            report.has_deadline && report.remaining_ms > 3000 && report.remaining_ms <= 5000,
            "{protocol}: {report:?}"
        );
        let mut request = lodestar::Request::new(sleep_request("late", Duration::from_secs(5)));
        request.set_timeout(Duration::from_millis(200));
        let status = bounded("sleep", client.sleep(request)).await.unwrap_err();
        assert_eq!(
            status.code(),
            lodestar::Code::DeadlineExceeded,
            "{protocol}: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_client_of_a_server_without_web_protocols_gets_a_clear_error() {
    use lodestar::client::Protocol;
    let world = World::new();
    let _running = start(&world, WebProtocols::none()).await;
    for (protocol, name) in [
        (Protocol::GrpcWeb, "gRPC-Web"),
        (Protocol::GrpcWebText, "gRPC-Web"),
        (Protocol::Connect, "Connect"),
    ] {
        let mut client = web_client(&world, protocol);
        let status = bounded("unary", client.unary(echo("x"))).await.unwrap_err();
        assert_eq!(status.code(), lodestar::Code::Unknown, "{status:?}");
        let message = status.message();
        assert!(
            message.contains(name)
                && message.contains("415")
                && message.contains("application/grpc (HTTP/2)"),
            "{message}"
        );
    }
    // Native gRPC still works.
    let mut client = web_client(&world, Protocol::Grpc);
    bounded("native", client.unary(echo("x"))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_replies_obey_the_clients_receive_limit() {
    use lodestar::client::Protocol;
    let world = World::new();
    let _running = start(&world, WebProtocols::default()).await;
    for protocol in [Protocol::GrpcWeb, Protocol::GrpcWebText, Protocol::Connect] {
        let client = lodestar::Client::builder(world.registry.clone())
            .protocol(protocol)
            .message_limits(lodestar::MessageLimits {
                max_decoding_message_size: 64,
                ..lodestar::MessageLimits::default()
            })
            .build();
        let mut client = EchoClient::by_name(&client, "echo");
        let status = bounded("unary", client.unary(echo(&"x".repeat(200))))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            lodestar::Code::ResourceExhausted,
            "{protocol}: {status:?}"
        );
        // A small one still passes.
        bounded("unary", client.unary(echo("x"))).await.unwrap();
    }
}

/// A registry whose one instance of `echo` is at `address`.
async fn echo_at(address: std::net::SocketAddr) -> lodestar::MemoryRegistry {
    use lodestar::Registry as _;
    let registry = lodestar::MemoryRegistry::new();
    registry
        .register(
            lodestar::Instance::new("echo", address.to_string()),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    registry
}

/// Serves `TestEcho` with tonic behind `tonic_web::GrpcWebLayer`, over
/// HTTP/2 on a loopback port: a gRPC-Web server that is not lodestar's.
async fn tonic_web_echo(world: &World) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tower::Layer as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = tonic_web::GrpcWebLayer::new().layer(EchoServer::new(world.echo("tonic-web")));
    let serving = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = service.clone();
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let mut service = service.clone();
                    async move {
                        tower::Service::call(&mut service, request.map(tonic::body::Body::new))
                            .await
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (address, serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_calls_tonic_web_over_grpc_web_binary_and_text() {
    use lodestar::client::Protocol;
    let world = World::new();
    let (address, serving) = tonic_web_echo(&world).await;
    let registry = echo_at(address).await;
    for protocol in [Protocol::GrpcWeb, Protocol::GrpcWebText] {
        let client = lodestar::Client::builder(registry.clone())
            .protocol(protocol)
            .build();
        let mut client = EchoClient::by_name(&client, "echo");

        unary_large_and_server_stream(&mut client, protocol).await;

        // An error: tonic answers trailers-only, which tonic-web passes in
        // the response's headers.
        let status = not_found(&mut client, protocol).await;
        assert_eq!(status.metadata().get("x-failed-by").unwrap(), "tonic-web");

        // A deadline that passes (the client's own: this server does not
        // enforce `grpc-timeout`).
        let mut request = lodestar::Request::new(sleep_request("late", Duration::from_secs(5)));
        request.set_timeout(Duration::from_millis(200));
        let status = bounded("sleep", client.sleep(request)).await.unwrap_err();
        assert_eq!(
            status.code(),
            lodestar::Code::DeadlineExceeded,
            "{protocol}: {status:?}"
        );
    }
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_answer_that_is_not_base64_ends_the_call_internal() {
    // A server that answers gRPC-Web text with a body that is not base64.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service =
                hyper::service::service_fn(|_: http::Request<hyper::body::Incoming>| async {
                    let good = base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        frame(0, b"\x0a\x02hi"),
                    );
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", "application/grpc-web-text+proto")
                            .body(Full::new(Bytes::from(format!("{good}*AAA"))))
                            .unwrap(),
                    )
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    let client = lodestar::Client::builder(echo_at(address).await)
        .protocol(lodestar::client::Protocol::GrpcWebText)
        .build();
    let mut client = EchoClient::by_name(&client, "echo");
    let status = bounded("unary", client.unary(echo("x"))).await.unwrap_err();
    assert_eq!(status.code(), lodestar::Code::Internal, "{status:?}");
    assert!(
        status.message().contains("not base64")
            && status.message().contains("0x2a")
            && status.message().contains("offset 12"),
        "{status:?}"
    );
    serving.abort();
}

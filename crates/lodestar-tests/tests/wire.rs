//! What lodestar puts on the wire, seen by a bare HTTP/2 client: compression
//! negotiation, message flags and sizes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read as _;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lodestar::Service;
use lodestar::compression::Encoding;
use lodestar_tests::*;
use prost::Message as _;

/// One unary call with a bare HTTP/2 client: the response headers, and each
/// response message as (compressed flag, bytes on the wire).
async fn raw_call(
    address: std::net::SocketAddr,
    path: &str,
    accept_encoding: Option<&str>,
    message: &impl prost::Message,
) -> (http::HeaderMap, Vec<(bool, Vec<u8>)>) {
    let (headers, trailers, messages) = raw_bytes_call(
        address,
        path,
        "application/grpc",
        accept_encoding,
        &message.encode_to_vec(),
    )
    .await;
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0"),
        "{trailers:?}"
    );
    (headers, messages)
}

/// One call with a bare HTTP/2 client, sending `payload` as the one message:
/// the response headers, trailers, and messages.
async fn raw_bytes_call(
    address: std::net::SocketAddr,
    path: &str,
    content_type: &str,
    accept_encoding: Option<&str>,
    payload: &[u8],
) -> (http::HeaderMap, http::HeaderMap, Vec<(bool, Vec<u8>)>) {
    raw_frame_call(
        address,
        path,
        content_type,
        accept_encoding,
        &[],
        0,
        payload,
    )
    .await
}

/// Like [`raw_bytes_call`], with extra request headers and the message's flag byte.
async fn raw_frame_call(
    address: std::net::SocketAddr,
    path: &str,
    content_type: &str,
    accept_encoding: Option<&str>,
    extra_headers: &[(&str, &str)],
    flag: u8,
    payload: &[u8],
) -> (http::HeaderMap, http::HeaderMap, Vec<(bool, Vec<u8>)>) {
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut frame = vec![flag];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    let mut request = http::Request::post(format!("http://{address}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers");
    if let Some(accept) = accept_encoding {
        request = request.header("grpc-accept-encoding", accept);
    }
    for (name, value) in extra_headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(frame))).unwrap();
    let response = bounded("the raw call", sender.send_request(request))
        .await
        .unwrap();
    let mut headers = response.headers().clone();
    let body = bounded("the raw body", response.into_body().collect())
        .await
        .unwrap();
    // A trailers-only response carries its status in the headers.
    let trailers = body
        .trailers()
        .cloned()
        .unwrap_or_else(|| std::mem::take(&mut headers));
    let mut data = body.to_bytes();
    let mut messages = Vec::new();
    while data.has_remaining() {
        let flag = data.get_u8();
        let len = data.get_u32() as usize;
        messages.push((flag == 1, data.split_to(len).to_vec()));
    }
    (headers, trailers, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_compresses_for_clients_that_accept_it_and_only_for_them() {
    let world = World::new();
    let running = Service::builder("echo")
        .send_compressed(Encoding::Gzip)
        .add_service(EchoServer::new(world.echo("a")))
        .start()
        .await
        .unwrap();
    let address = running.local_addr();
    // A reply that compresses well: the message echoes 64 KiB of 'a'.
    let request = EchoRequest {
        message: "a".repeat(64 * 1024),
        payload: vec![],
    };
    let plain_len = EchoReply {
        message: request.message.clone(),
        served_by: "a".into(),
        payload_len: 0,
    }
    .encoded_len();

    let (headers, messages) = raw_call(
        address,
        "/lodestar.test.Echo/Unary",
        Some("identity, gzip"),
        &request,
    )
    .await;
    assert_eq!(headers.get("grpc-encoding").unwrap(), "gzip");
    assert_eq!(messages.len(), 1);
    let (compressed, bytes) = &messages[0];
    assert!(compressed, "the message flag says compressed");
    assert!(
        bytes.len() * 10 < plain_len,
        "{} bytes on the wire for a {plain_len}-byte message",
        bytes.len()
    );
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut inflated)
        .unwrap();
    assert_eq!(
        EchoReply::decode(&inflated[..]).unwrap().message,
        request.message
    );

    // A client that does not accept gzip gets the message as it is.
    for accept in [None, Some("identity, deflate")] {
        let (headers, messages) =
            raw_call(address, "/lodestar.test.Echo/Unary", accept, &request).await;
        assert!(
            headers.get("grpc-encoding").is_none(),
            "{accept:?}: {headers:?}"
        );
        let (compressed, bytes) = &messages[0];
        assert!(!compressed, "{accept:?}");
        assert_eq!(bytes.len(), plain_len);
        assert_eq!(
            EchoReply::decode(&bytes[..]).unwrap().message,
            request.message
        );
    }
    running.shutdown().await.unwrap();
}

/// An echo service that compresses its replies with gzip.
async fn gzip_echo(world: &World) -> lodestar::RunningService {
    Service::builder("echo")
        .registry(world.registry.clone())
        .send_compressed(Encoding::Gzip)
        .add_service(EchoServer::new(world.echo("a")))
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_decompresses_replies_itself_however_its_generated_client_was_made() {
    let world = World::new();
    let running = gzip_echo(&world).await;
    let client = lodestar::Client::builder(world.registry.clone())
        .inspect_compression(true)
        .build();
    // Neither tells tonic's generated code about gzip: the channel asks
    // for it, and decompresses, itself.
    let clients = [
        ("by_name", EchoClient::by_name(&client, "echo")),
        ("by hand", EchoClient::new(client.channel("echo"))),
    ];
    for (made, mut echo) in clients {
        let message = "a".repeat(64 * 1024);
        let reply = bounded(
            "a compressed reply",
            echo.unary(EchoRequest {
                message: message.clone(),
                payload: vec![],
            }),
        )
        .await
        .unwrap_or_else(|status| panic!("{made}: {status:?}"));
        let flags = reply
            .extensions()
            .get::<lodestar::compression::ReceivedFlags>()
            .cloned()
            .unwrap_or_else(|| panic!("{made}: no flags recorded"));
        assert_eq!(
            flags.next(),
            Some(true),
            "{made}: the reply came uncompressed"
        );
        assert_eq!(reply.into_inner().message, message, "{made}");

        let token = "z".repeat(4096);
        let mut stream = bounded(
            "a compressed stream",
            echo.server_stream(StreamRequest {
                count: 3,
                token: token.clone(),
                ..Default::default()
            }),
        )
        .await
        .unwrap_or_else(|status| panic!("{made}: {status:?}"))
        .into_inner();
        for n in 0..3 {
            let reply = bounded("a streamed reply", stream.message())
                .await
                .unwrap_or_else(|status| panic!("{made}: {status:?}"));
            assert_eq!(
                reply.map(|r| r.message),
                Some(format!("{token} #{n}")),
                "{made}"
            );
        }
        let end = bounded("the stream's end", stream.message()).await;
        assert!(matches!(end, Ok(None)), "{made}: {end:?}");
    }
    bounded("shutdown", running.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_reply_over_the_clients_limit_once_decompressed_is_refused() {
    let world = World::new();
    let running = gzip_echo(&world).await;
    // 64 KiB of one letter is a few hundred bytes compressed: under the
    // limit on the wire, far over it decompressed.
    let limit = 4096;
    let client = lodestar::Client::builder(world.registry.clone())
        .message_limits(lodestar::MessageLimits {
            max_decoding_message_size: limit,
            ..Default::default()
        })
        .build();
    for (made, mut echo) in [
        ("by_name", EchoClient::by_name(&client, "echo")),
        ("by hand", EchoClient::new(client.channel("echo"))),
    ] {
        let status = bounded(
            "a reply too large once decompressed",
            echo.unary(EchoRequest {
                message: "a".repeat(64 * 1024),
                payload: vec![],
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(
            status.code(),
            lodestar::Code::ResourceExhausted,
            "{made}: {status:?}"
        );
        assert!(
            status.message().contains(&limit.to_string()),
            "{made}: the limit is not named: {status:?}"
        );
    }
    // The connection is fine: a small reply still comes.
    let mut echo = EchoClient::by_name(&client, "echo");
    let reply = bounded(
        "a small reply",
        echo.unary(EchoRequest {
            message: "small".into(),
            payload: vec![],
        }),
    )
    .await
    .unwrap();
    assert_eq!(reply.into_inner().message, "small");
    bounded("shutdown", running.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressing_client_sends_smaller_messages_that_the_server_reads() {
    let world = World::new();
    let running = Service::builder("echo")
        .registry(world.registry.clone())
        .inspect_compression(true)
        .add_service(EchoServer::new(world.echo("a")))
        .start()
        .await
        .unwrap();
    let client = lodestar::Client::builder(world.registry.clone())
        .send_compressed(Encoding::Gzip)
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let reply = bounded(
        "a compressed call",
        echo.unary(EchoRequest {
            message: "b".repeat(100_000),
            payload: vec![0; 100_000],
        }),
    )
    .await
    .unwrap();
    let received = |reply: &lodestar::Response<EchoReply>| {
        reply
            .metadata()
            .get("x-received-compressed")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        received(&reply).as_deref(),
        Some("true"),
        "the request went uncompressed"
    );
    let reply = reply.into_inner();
    assert_eq!((reply.message.len(), reply.payload_len), (100_000, 100_000));
    // An opt-out per call goes uncompressed, and still works.
    let mut request = lodestar::Request::new(EchoRequest {
        message: "c".into(),
        payload: vec![],
    });
    request
        .extensions_mut()
        .insert(lodestar::compression::Compress(false));
    let reply = bounded("an uncompressed call", echo.unary(request))
        .await
        .unwrap();
    assert_eq!(
        received(&reply).as_deref(),
        Some("false"),
        "the opt-out was ignored"
    );
    assert_eq!(reply.into_inner().message, "c");
    bounded("shutdown", running.shutdown()).await.unwrap();
}

mod json {
    use super::*;
    use lodestar::{Client, Code, Codec};
    use tokio_stream::StreamExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_json_client_makes_every_kind_of_call_with_and_without_compression() {
        let world = World::new();
        let running = world
            .builder("echo", "a")
            .send_compressed(Encoding::Gzip)
            .add_service(EchoServer::new(world.echo("a")))
            .start()
            .await
            .unwrap();
        for compressed in [false, true] {
            let mut builder = Client::builder(world.registry.clone()).codec(Codec::Json);
            if compressed {
                builder = builder.send_compressed(Encoding::Gzip);
            }
            let client = builder.build();
            let mut echo = EchoClient::by_name(&client, "echo");
            let reply = bounded(
                "unary",
                echo.unary(EchoRequest {
                    message: "ünï 😈".into(),
                    payload: vec![1, 2, 3],
                }),
            )
            .await
            .unwrap()
            .into_inner();
            assert_eq!(
                (
                    reply.message.as_str(),
                    reply.served_by.as_str(),
                    reply.payload_len
                ),
                ("ünï 😈", "a", 3)
            );

            let stream = bounded(
                "server stream",
                echo.server_stream(StreamRequest {
                    count: 3,
                    ..Default::default()
                }),
            )
            .await
            .unwrap()
            .into_inner();
            assert_eq!(
                bounded("items", stream.collect::<Result<Vec<_>, _>>())
                    .await
                    .unwrap()
                    .len(),
                3
            );

            let messages = (0..4).map(|i| EchoRequest {
                message: i.to_string(),
                payload: vec![0; 1000],
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
                ("4 messages", 4000)
            );

            let messages = (0..3).map(|i| EchoRequest {
                message: format!("ping {i}"),
                payload: vec![],
            });
            let replies = bounded("bidi", echo.bidi(tokio_stream::iter(messages)))
                .await
                .unwrap()
                .into_inner();
            let replies: Vec<String> =
                bounded("bidi items", replies.collect::<Result<Vec<_>, _>>())
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| r.message)
                    .collect();
            assert_eq!(
                replies,
                ["ping 0", "ping 1", "ping 2"],
                "compressed: {compressed}"
            );
        }
        running.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_json_on_the_wire_is_answered_in_json_and_bad_json_is_refused_clearly() {
        let world = World::new();
        let running = world.start("echo", "a").await;
        let address = running.local_addr();
        let (headers, trailers, messages) = raw_bytes_call(
            address,
            "/lodestar.test.Echo/Unary",
            "application/grpc+json",
            None,
            br#"{"message": "from a script", "payload": "AAEC"}"#,
        )
        .await;
        assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{trailers:?}");
        assert_eq!(
            headers.get("content-type").unwrap(),
            "application/grpc+json"
        );
        let reply: serde_json::Value = serde_json::from_slice(&messages[0].1).unwrap();
        assert_eq!(reply["message"], "from a script");
        assert_eq!(reply["servedBy"], "a");
        assert_eq!(
            reply["payloadLen"], "3",
            "64-bit integers are strings in proto3 JSON"
        );

        let (_, trailers, messages) = raw_bytes_call(
            address,
            "/lodestar.test.Echo/Unary",
            "application/grpc+json",
            None,
            br#"{"message": 42"#,
        )
        .await;
        assert!(messages.is_empty());
        assert_eq!(
            trailers.get("grpc-status").unwrap(),
            &(Code::InvalidArgument as i32).to_string()
        );
        let message = percent_decode(trailers.get("grpc-message").unwrap().to_str().unwrap());
        assert!(message.contains("lodestar.test.EchoRequest"), "{message}");
        // The server carries on.
        let mut echo = EchoClient::by_name(&world.client(), "echo");
        bounded("a call after bad JSON", echo.unary(EchoRequest::default()))
            .await
            .unwrap();
        running.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn json_compression_is_checked_as_the_spec_says_and_unknown_json_methods_are_unimplemented()
     {
        let world = World::new();
        let running = world
            .builder("echo", "a")
            .add_service(EchoServer::new(world.echo("a")))
            // A service with no descriptors: it cannot be transcoded.
            .add_tonic_service(Hidden(EchoServer::new(world.echo("hidden"))))
            .start()
            .await
            .unwrap();
        let address = running.local_addr();
        let json = "application/grpc+json; charset=utf-8";
        let body = br#"{"message": "hi"}"#;
        let gzipped = lodestar_gzip(body);
        let status = |trailers: &http::HeaderMap| {
            (
                trailers
                    .get("grpc-status")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned(),
                percent_decode(
                    trailers
                        .get("grpc-message")
                        .map_or("", |v| v.to_str().unwrap()),
                ),
            )
        };

        // Compressed with gzip, and said so: fine (and the media type may carry parameters).
        let (headers, trailers, messages) = raw_frame_call(
            address,
            "/lodestar.test.Echo/Unary",
            json,
            None,
            &[("grpc-encoding", "gzip")],
            1,
            &gzipped,
        )
        .await;
        assert_eq!(status(&trailers).0, "0", "{trailers:?}");
        assert_eq!(
            headers.get("content-type").unwrap(),
            "application/grpc+json"
        );
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&messages[0].1).unwrap()["message"],
            "hi"
        );

        // Flagged compressed without a grpc-encoding, or an invalid flag: INTERNAL.
        for (headers, flag) in [(&[][..], 1u8), (&[("grpc-encoding", "gzip")][..], 2u8)] {
            let (_, trailers, _) = raw_frame_call(
                address,
                "/lodestar.test.Echo/Unary",
                json,
                None,
                headers,
                flag,
                &gzipped,
            )
            .await;
            assert_eq!(
                status(&trailers).0,
                (Code::Internal as i32).to_string(),
                "flag {flag}: {trailers:?}"
            );
        }

        // An encoding the server does not have: UNIMPLEMENTED, saying what it accepts.
        let (_, trailers, _) = raw_frame_call(
            address,
            "/lodestar.test.Echo/Unary",
            json,
            None,
            &[("grpc-encoding", "deflate")],
            1,
            body,
        )
        .await;
        assert_eq!(
            status(&trailers).0,
            (Code::Unimplemented as i32).to_string(),
            "{trailers:?}"
        );
        assert_eq!(
            trailers.get("grpc-accept-encoding").unwrap(),
            "gzip,identity"
        );

        // JSON for a service without descriptors: UNIMPLEMENTED, saying why.
        let (_, trailers, _) = raw_frame_call(
            address,
            "/lodestar.test.Hidden/Unary",
            json,
            None,
            &[],
            0,
            b"{}",
        )
        .await;
        let (code, message) = status(&trailers);
        assert_eq!(code, (Code::Unimplemented as i32).to_string());
        assert!(message.contains("no descriptors"), "{message}");
        // The same service answers protobuf as usual.
        let (_, messages) = raw_call(
            address,
            "/lodestar.test.Hidden/Unary",
            None,
            &EchoRequest::default(),
        )
        .await;
        assert_eq!(
            EchoReply::decode(&messages[0].1[..]).unwrap().served_by,
            "hidden"
        );
        // And JSON for the health service, whose descriptors are known, works.
        let (_, trailers, messages) = raw_frame_call(
            address,
            "/grpc.health.v1.Health/Check",
            json,
            None,
            &[],
            0,
            b"{}",
        )
        .await;
        assert_eq!(status(&trailers).0, "0", "{trailers:?}");
        let reply: serde_json::Value = serde_json::from_slice(&messages[0].1).unwrap();
        assert_eq!(reply["status"], "SERVING");
        running.shutdown().await.unwrap();
    }

    /// The Echo service under another name, added without descriptors.
    #[derive(Clone)]
    struct Hidden(EchoServer<TestEcho>);

    impl tonic::server::NamedService for Hidden {
        const NAME: &'static str = "lodestar.test.Hidden";
    }

    impl tower_service::Service<http::Request<tonic::body::Body>> for Hidden {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = <EchoServer<TestEcho> as tower_service::Service<
            http::Request<tonic::body::Body>,
        >>::Future;

        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            tower_service::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.0, cx)
        }

        fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
            let path = request
                .uri()
                .path()
                .replace("lodestar.test.Hidden", "lodestar.test.Echo");
            *request.uri_mut() = path.parse().unwrap();
            tower_service::Service::<http::Request<tonic::body::Body>>::call(&mut self.0, request)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adding_a_service_twice_is_an_error_not_a_panic() {
        let world = World::new();
        let error = world
            .builder("echo", "a")
            .add_service(EchoServer::new(world.echo("a")))
            .add_tonic_service(tonic_health::server::health_reporter().1)
            .start()
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("grpc.health.v1.Health"),
            "{error}"
        );
        let error = world
            .builder("echo", "a")
            .add_service(EchoServer::new(world.echo("a")))
            .add_service(EchoServer::new(world.echo("a")))
            .start()
            .await
            .unwrap_err();
        assert!(error.to_string().contains("lodestar.test.Echo"), "{error}");
    }

    fn lodestar_gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn percent_decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }
}

mod tls {
    use super::*;
    use lodestar::tls::{ClientTls, DevPki, ServerTls};
    use lodestar::{Client, Code};

    struct Setup {
        world: World,
        pki: DevPki,
        running: lodestar::RunningService,
    }

    async fn serve(mutual: bool) -> Setup {
        let world = World::new();
        let pki = DevPki::generate(&["localhost", "127.0.0.1"], 1).unwrap();
        let mut tls =
            ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes()).unwrap();
        if mutual {
            tls = tls.require_client_certs(pki.ca_cert.as_bytes()).unwrap();
        }
        let running = world
            .builder("echo", "a")
            .tls(tls)
            .add_service(EchoServer::new(world.echo("a")))
            .start()
            .await
            .unwrap();
        Setup {
            world,
            pki,
            running,
        }
    }

    async fn call(client: &Client) -> Result<EchoReply, lodestar::Status> {
        let mut echo = EchoClient::by_name(client, "echo");
        bounded(
            "a call",
            echo.unary(EchoRequest {
                message: "over tls".into(),
                payload: vec![],
            }),
        )
        .await
        .map(lodestar::Response::into_inner)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_works_and_an_untrusted_or_plaintext_client_is_refused_clearly() {
        let setup = serve(false).await;
        let trusted = ClientTls::from_ca_pem(setup.pki.ca_cert.as_bytes()).unwrap();
        let client = Client::builder(setup.world.registry.clone())
            .tls(trusted)
            .build();
        assert_eq!(call(&client).await.unwrap().message, "over tls");

        let other = DevPki::generate(&["localhost"], 1).unwrap();
        let untrusted = ClientTls::from_ca_pem(other.ca_cert.as_bytes()).unwrap();
        let client = Client::builder(setup.world.registry.clone())
            .tls(untrusted)
            .build();
        let status = call(&client).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("TLS handshake") && status.message().contains("certificate"),
            "{}",
            status.message()
        );

        let plaintext = setup.world.client();
        let status = call(&plaintext).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        setup.running.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutual_tls_refuses_a_client_without_a_certificate_and_accepts_one_with_it() {
        let setup = serve(true).await;
        let anonymous = ClientTls::from_ca_pem(setup.pki.ca_cert.as_bytes()).unwrap();
        let client = Client::builder(setup.world.registry.clone())
            .tls(anonymous)
            .build();
        let status = call(&client).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().to_lowercase().contains("certificate"),
            "{}",
            status.message()
        );

        let identified = ClientTls::from_ca_pem(setup.pki.ca_cert.as_bytes())
            .unwrap()
            .with_identity_pem(
                setup.pki.client_cert.as_bytes(),
                setup.pki.client_key.as_bytes(),
            )
            .unwrap();
        let client = Client::builder(setup.world.registry.clone())
            .tls(identified)
            .build();
        assert_eq!(call(&client).await.unwrap().message, "over tls");
        setup.running.shutdown().await.unwrap();
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        let error = ServerTls::from_pem(b"not pem", b"nor this")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("server certificate holds no certificate"),
            "{error}"
        );
        let error = ClientTls::from_ca_file("/no/such/ca.pem")
            .unwrap_err()
            .to_string();
        assert!(error.contains("/no/such/ca.pem"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_speaks_is_closed_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt as _;
    let world = World::new();
    let settings = lodestar::Http2Settings {
        handshake_timeout: std::time::Duration::from_millis(300),
        ..lodestar::Http2Settings::server()
    };
    let pki = lodestar::tls::DevPki::generate(&["localhost"], 1).unwrap();
    let tls =
        lodestar::tls::ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes())
            .unwrap();
    let plain = world
        .builder("echo", "plain")
        .http2(settings)
        .add_service(EchoServer::new(world.echo("plain")))
        .start()
        .await
        .unwrap();
    let secure = world
        .builder("echo", "tls")
        .http2(settings)
        .tls(tls)
        .add_service(EchoServer::new(world.echo("tls")))
        .start()
        .await
        .unwrap();
    for address in [plain.local_addr(), secure.local_addr()] {
        let mut silent = bounded("connect", tokio::net::TcpStream::connect(address))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let connected = std::time::Instant::now();
        // The server gives up on it: end of stream (or a reset).
        bounded("the server to close a silent connection", async {
            loop {
                match silent.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue, // TLS servers may have written something
                }
            }
        })
        .await;
        // After the 300ms handshake timeout, not the 10s default.
        let waited = connected.elapsed();
        assert!(
            waited < std::time::Duration::from_secs(3),
            "{address}: closed after {waited:?}"
        );
    }
    // Connections that do speak are served as ever.
    let mut echo = EchoClient::by_name(&world.client(), "echo");
    bounded("a call", echo.unary(EchoRequest::default()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_grpc_timeout_is_refused_rather_than_ignored() {
    let world = World::new();
    let running = world.start("echo", "a").await;
    let request = EchoRequest::default().encode_to_vec();
    // Not digits, a sign, nine digits, no unit, an unknown unit.
    for bad in ["abc", "-1S", "123456789S", "5", "5X"] {
        let (_, trailers, messages) = raw_frame_call(
            running.local_addr(),
            "/lodestar.test.Echo/Unary",
            "application/grpc",
            None,
            &[("grpc-timeout", bad)],
            0,
            &request,
        )
        .await;
        assert!(messages.is_empty(), "{bad}: {messages:?}");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
            Some("13"),
            "{bad}: {trailers:?}"
        );
        let message = trailers.get("grpc-message").unwrap().to_str().unwrap();
        // grpc-message is percent-encoded.
        assert!(
            message.starts_with("malformed%20grpc-timeout"),
            "{bad}: {message}"
        );
    }
    // Eight digits and a unit are fine.
    let (_, trailers, messages) = raw_frame_call(
        running.local_addr(),
        "/lodestar.test.Echo/Unary",
        "application/grpc",
        None,
        &[("grpc-timeout", "99999999m")],
        0,
        &request,
    )
    .await;
    assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{trailers:?}");
    assert_eq!(messages.len(), 1);
}

/// Slow readers: what a server holds for responses nobody reads.
mod unread {
    use super::*;
    use lodestar::ConnectionLimits;
    use std::time::Duration;

    type Sender = h2::client::SendRequest<Bytes>;

    /// An HTTP/2 connection whose streams open `window` bytes to the server
    /// (0: the server may send no response data at all), and its task.
    pub(super) async fn connect(
        address: std::net::SocketAddr,
        window: u32,
    ) -> (Sender, tokio::task::JoinHandle<Result<(), h2::Error>>) {
        let tcp = bounded("connect", tokio::net::TcpStream::connect(address))
            .await
            .unwrap();
        let (sender, connection) = bounded(
            "the HTTP/2 handshake",
            h2::client::Builder::new()
                .initial_window_size(window)
                .handshake(tcp),
        )
        .await
        .unwrap();
        (sender, tokio::spawn(connection))
    }

    /// Starts an Echo call whose reply carries `reply` bytes.
    pub(super) async fn echo(
        sender: &Sender,
        reply: usize,
    ) -> Result<h2::client::ResponseFuture, h2::Error> {
        let request = http::Request::post("http://localhost/lodestar.test.Echo/Unary")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let message = EchoRequest {
            message: "a".repeat(reply),
            payload: vec![],
        }
        .encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(&message);
        let mut sender = sender.clone().ready().await?;
        let (response, mut body) = sender.send_request(request, false)?;
        body.send_data(Bytes::from(frame), true)?;
        Ok(response)
    }

    /// How a call ended: (grpc-status, grpc-message). Reads the response's
    /// data first if `read`; otherwise only what needs no flow-control window.
    pub(super) async fn ending(
        response: h2::client::ResponseFuture,
        read: bool,
    ) -> Result<(String, String), h2::Error> {
        let response = response.await?;
        let (parts, mut body) = response.into_parts();
        let trailers = if parts.headers.contains_key("grpc-status") {
            parts.headers
        } else {
            while read && let Some(chunk) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk?.len());
            }
            body.trailers().await?.unwrap_or_default()
        };
        let text = |name| {
            trailers
                .get(name)
                .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        Ok((text("grpc-status"), text("grpc-message")))
    }

    /// Makes `calls` Echo calls with `reply`-byte replies on each of
    /// `connections` new connections that never read, and waits for
    /// `refused` of them to end; returns their endings. The connections
    /// stay open until the returned tasks are dropped.
    async fn unread_calls(
        address: std::net::SocketAddr,
        connections: usize,
        calls: usize,
        reply: usize,
        refused: usize,
    ) -> (Vec<(String, String)>, Vec<Sender>) {
        let mut senders = Vec::new();
        let mut endings = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let (sender, _connection) = connect(address, 0).await;
            for _ in 0..calls {
                let response = echo(&sender, reply).await.unwrap();
                endings.spawn(ending(response, false));
            }
            senders.push(sender);
        }
        let mut ended = Vec::new();
        bounded("the calls over the budget to be refused", async {
            while ended.len() < refused {
                ended.push(endings.join_next().await.unwrap().unwrap().unwrap());
            }
        })
        .await;
        // The others stay held: their endings wait behind data nobody reads.
        endings.detach_all();
        (ended, senders)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_reads_nothing_pins_at_most_its_budget() {
        const REPLY: usize = 300 * 1024;
        let world = World::new();
        // One connection may hold 1 MiB: three of twelve 300 KiB replies.
        let running = world
            .builder("echo", "a")
            .connection_limits(ConnectionLimits {
                max_unsent_bytes_per_connection: 1024 * 1024,
                ..ConnectionLimits::default()
            })
            .add_service(EchoServer::new(world.echo("a")))
            .start()
            .await
            .unwrap();
        let (ended, _held) = unread_calls(running.local_addr(), 1, 12, REPLY, 9).await;
        for (status, message) in &ended {
            assert_eq!(status, "8", "{message}");
            assert!(
                message.contains("max_unsent_bytes_per_connection"),
                "{message}"
            );
        }
        // Other connections are served as ever.
        let mut echo = EchoClient::by_name(&world.client(), "echo");
        bounded(
            "a call on another connection",
            echo.unary(EchoRequest::default()),
        )
        .await
        .unwrap();

        // All connections together may hold 1 MiB: three of four replies,
        // two connections asking for two each.
        let running = world
            .builder("echo", "b")
            .connection_limits(ConnectionLimits {
                max_unsent_bytes: 1024 * 1024,
                ..ConnectionLimits::default()
            })
            .add_service(EchoServer::new(world.echo("b")))
            .start()
            .await
            .unwrap();
        let (ended, _held) = unread_calls(running.local_addr(), 2, 2, REPLY, 1).await;
        let (status, message) = &ended[0];
        assert_eq!(status, "8", "{message}");
        assert!(message.contains("max_unsent_bytes)"), "{message}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_that_sends_nothing_it_holds_is_closed_after_the_stall_timeout() {
        let world = World::new();
        let stall_timeout = Duration::from_millis(300);
        let running = with_stall_timeout(&world, stall_timeout).await;
        let address = running.local_addr();
        // An idle connection, and one that reads nothing.
        let (idle, _idle_task) = connect(address, 1024 * 1024).await;
        let call = echo(&idle, 10).await.unwrap();
        assert_eq!(ending(call, true).await.unwrap().0, "0");
        let started = std::time::Instant::now();
        let (stalled, stalled_task) = connect(address, 0).await;
        let held = echo(&stalled, 100 * 1024).await.unwrap();
        // The server closes it, and the call ends with it.
        let closed = bounded("the server to close the stalled connection", stalled_task)
            .await
            .unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= stall_timeout,
            "closed after {waited:?}: {closed:?}"
        );
        assert!(
            bounded("the held call", ending(held, false)).await.is_err(),
            "the held call ended normally"
        );
        // The idle connection, older than the timeout, is still served.
        let call = echo(&idle, 10).await.unwrap();
        assert_eq!(ending(call, true).await.unwrap().0, "0");
    }

    /// An Echo server that closes stalled connections after `stall_timeout`.
    async fn with_stall_timeout(
        world: &World,
        stall_timeout: Duration,
    ) -> lodestar::RunningService {
        world
            .builder("echo", "a")
            .connection_limits(ConnectionLimits {
                stall_timeout,
                ..ConnectionLimits::default()
            })
            .add_service(EchoServer::new(world.echo("a")))
            .start()
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_whose_client_only_trickles_is_closed_too() {
        let world = World::new();
        let stall_timeout = Duration::from_millis(300);
        let running = with_stall_timeout(&world, stall_timeout).await;
        // A window of 16 bytes, given back every 50 ms: a few hundred
        // bytes a second, while the server holds 100 KiB for it.
        let (trickling, task) = connect(running.local_addr(), 16).await;
        let response = echo(&trickling, 100 * 1024).await.unwrap();
        let reader = tokio::spawn(async move {
            let Ok(response) = response.await else { return };
            let mut body = response.into_body();
            while let Some(Ok(chunk)) = body.data().await {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
        });
        // The reply would take minutes at this pace: only the server
        // closing the connection ends it in time.
        let started = std::time::Instant::now();
        bounded("the server to close the trickling connection", task)
            .await
            .unwrap()
            .ok();
        assert!(started.elapsed() >= stall_timeout);
        reader.abort();
    }

    #[tokio::test]
    async fn connection_limits_that_cannot_work_are_refused_at_start() {
        let world = World::new();
        for limits in [
            ConnectionLimits {
                stall_timeout: Duration::ZERO,
                ..ConnectionLimits::default()
            },
            ConnectionLimits {
                max_connections: 0,
                ..ConnectionLimits::default()
            },
        ] {
            let error = world
                .builder("echo", "a")
                .connection_limits(limits)
                .add_service(EchoServer::new(world.echo("a")))
                .start()
                .await
                .expect_err("refused");
            assert!(error.to_string().contains("ConnectionLimits"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_heartbeat_no_shorter_than_the_ttl_is_refused_at_start() {
        let world = World::new();
        let error = bounded(
            "start",
            world
                .builder("echo", "a")
                .ttl(Duration::from_secs(2))
                .heartbeat_interval(Duration::from_secs(2))
                .add_service(EchoServer::new(world.echo("a")))
                .start(),
        )
        .await
        .expect_err("refused");
        let text = error.to_string();
        assert!(
            text.contains("heartbeat interval (2s)") && text.contains("TTL (2s)"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_limit_are_closed_until_one_ends() {
        let world = World::new();
        let running = world
            .builder("echo", "a")
            .connection_limits(ConnectionLimits {
                max_connections: 1,
                ..ConnectionLimits::default()
            })
            .add_service(EchoServer::new(world.echo("a")))
            .start()
            .await
            .unwrap();
        let address = running.local_addr();
        let (first, first_task) = connect(address, 1024 * 1024).await;
        let call = echo(&first, 10).await.unwrap();
        assert_eq!(ending(call, true).await.unwrap().0, "0");
        // A second connection is closed at once.
        let (second, second_task) = connect(address, 1024 * 1024).await;
        let refused = bounded("the second connection's call", async {
            ending(echo(&second, 10).await?, true).await
        })
        .await;
        assert!(refused.is_err(), "{refused:?}");
        assert!(
            bounded("the second connection to end", second_task)
                .await
                .is_ok()
        );
        // Once the first ends, a new one is served.
        drop(first);
        first_task.abort();
        bounded("a connection once the first ended", async {
            loop {
                let (sender, _task) = connect(address, 1024 * 1024).await;
                let served = async { ending(echo(&sender, 10).await?, true).await };
                if let Ok((status, _)) = served.await {
                    assert_eq!(status, "0");
                    return;
                }
            }
        })
        .await;
    }
}

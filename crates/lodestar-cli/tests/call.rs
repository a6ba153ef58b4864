//! `lodestar call`, `lodestar list` and `lodestar health` as real
//! processes, against services in processes of their own (this test
//! binary, run as `child_service`), found by address or by name through a
//! real `lodestar registry` process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::{ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lodestar_tests::process::Proc;
use lodestar_tests::run_bounded;
use serde_json::{Value, json};

/// Every wait is bounded by this.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A point with a feature in route-guide's data.
const KNOWN_POINT: &str = r#"{"latitude":409146138,"longitude":-746188906}"#;
const KNOWN_NAME: &str = "Lodestar Trailhead, Kestrel Ridge, NJ, USA";

/// `lodestar registry` on a free port; its URL.
fn registry() -> (Proc, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    command
        .args([
            "registry",
            "--addr",
            "127.0.0.1:0",
            "--no-http",
            "--warmup",
            "0",
        ])
        .env_remove("LODESTAR_REGISTRY_TOKEN");
    let proc = Proc::spawn(command);
    let address = proc.line("lodestar registry: gRPC on");
    (proc, format!("lodestar://{address}"))
}

/// A service in a process of its own (this test binary, as
/// `child_service`): `kind` is `route-guide` or `echo`, registered in
/// `registry` (`memory://`: a registry of its own). Returns its address.
fn service(kind: &str, registry: &str) -> (Proc, String) {
    service_with(kind, registry, Quirks::default())
}

/// How a child service departs from the plain one.
#[derive(Debug, Default)]
struct Quirks<'a> {
    /// Serve over mutual TLS with the certificates in this directory.
    tls_dir: Option<&'a std::path::Path>,
    /// Refuse calls whose paths start with one of these (UNIMPLEMENTED).
    refused: &'a [&'a str],
    /// Fail the method at this path NOT_FOUND, with details.
    failing: Option<&'a str>,
}

/// [`service`], with `quirks`.
fn service_with(kind: &str, registry: &str, quirks: Quirks<'_>) -> (Proc, String) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "child_service",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("LODESTAR_CHILD_KIND", kind)
        .env("LODESTAR_CHILD_REGISTRY", registry);
    command.env("LODESTAR_CHILD_REFUSE", quirks.refused.join(","));
    if let Some(path) = quirks.failing {
        command.env("LODESTAR_CHILD_FAIL", path);
    }
    if let Some(dir) = quirks.tls_dir {
        command.env("LODESTAR_CHILD_TLS_DIR", dir);
    }
    let proc = Proc::spawn(command);
    let address = proc.line("child serving on");
    (proc, address)
}

/// Runs as a separate process for the tests above; does nothing otherwise.
#[test]
#[ignore = "a service the call tests start as a separate process"]
fn child_service() {
    let (Ok(kind), Ok(url)) = (
        std::env::var("LODESTAR_CHILD_KIND"),
        std::env::var("LODESTAR_CHILD_REGISTRY"),
    ) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let registry = lodestar_registry::from_url(&url).unwrap();
        let (events, _kept) = tokio::sync::mpsc::unbounded_channel();
        let builder = match kind.as_str() {
            "route-guide" => lodestar::Service::builder(route_guide::SERVICE_NAME)
                .add_service(route_guide::RouteGuideService::new("child").into_server()),
            "echo" => {
                lodestar::Service::builder("echo").add_service(lodestar_tests::EchoServer::new(
                    lodestar_tests::TestEcho::new("child", events, None),
                ))
            }
            other => panic!("no such child service: {other}"),
        };
        let builder = match std::env::var("LODESTAR_CHILD_TLS_DIR") {
            Ok(dir) => {
                let dir = std::path::Path::new(&dir);
                let tls = lodestar::tls::ServerTls::from_pem_files(
                    dir.join("server.pem"),
                    dir.join("server.key"),
                )
                .unwrap()
                .require_client_certs_from_file(dir.join("ca.pem"))
                .unwrap();
                builder.tls(tls)
            }
            Err(_) => builder,
        };
        // Reflection paths to refuse as UNIMPLEMENTED, as a server without them would.
        let refused: Vec<String> = std::env::var("LODESTAR_CHILD_REFUSE")
            .map(|list| {
                list.split(',')
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        // A method to fail NOT_FOUND with details, as a handler may.
        let failing = std::env::var("LODESTAR_CHILD_FAIL").unwrap_or_default();
        let builder = builder.layer(tower::filter::FilterLayer::new(
            move |request: http::Request<lodestar::server::RequestBody>| {
                let path = request.uri().path();
                if refused
                    .iter()
                    .any(|prefix| path.starts_with(prefix.as_str()))
                {
                    Err(lodestar::Status::unimplemented(format!(
                        "{path} is not served"
                    )))
                } else if !failing.is_empty() && path == failing {
                    Err(not_found_with_details())
                } else {
                    Ok(request)
                }
            },
        ));
        let running = builder.registry(registry).start().await.unwrap();
        println!("child serving on {}", running.local_addr());
        lodestar::server::shutdown_signal().await;
        running.shutdown().await.unwrap();
    });
}

/// `google.rpc.Status`, as the `grpc-status-details-bin` trailer carries it.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// NOT_FOUND with two details: a type of the server's schema
/// (`routeguide.Point`), and one nobody describes.
fn not_found_with_details() -> lodestar::Status {
    use prost::Message as _;
    let point = route_guide::Point {
        latitude: 7,
        longitude: 0,
    };
    let status = RpcStatus {
        code: lodestar::Code::NotFound as i32,
        message: "no feature here".into(),
        details: vec![
            prost_types::Any {
                type_url: "type.googleapis.com/routeguide.Point".into(),
                value: point.encode_to_vec(),
            },
            prost_types::Any {
                type_url: "type.googleapis.com/acme.Unknown".into(),
                value: vec![1, 2, 3],
            },
        ],
    };
    lodestar::Status::with_details(
        lodestar::Code::NotFound,
        "no feature here",
        status.encode_to_vec().into(),
    )
}

/// `lodestar ARGS…`, run to its end (bounded), stdin empty.
fn lodestar(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    command.args(args).env_remove("LODESTAR_REGISTRY");
    run_bounded(command, TIMEOUT)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Each stdout line as JSON (the output is piped: one document per line).
fn documents(output: &Output) -> Vec<Value> {
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Asserts a successful exit, and returns the replies.
fn ok(output: &Output) -> Vec<Value> {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        stdout(output),
        stderr(output)
    );
    documents(output)
}

/// Asserts the exit code and returns the one JSON object on stderr.
fn failed(output: &Output, code: i32) -> Value {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(output),
        stderr(output)
    );
    let text = stderr(output);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("stderr is not one JSON object ({e}):\n{text}"))
}

/// The four call kinds of RouteGuide through `target` (with `extra` flags).
fn assert_four_kinds(target: &str, extra: &[&str]) {
    let call = |method: &str, data: &str| {
        let mut args = vec!["call", target, method, "-d", data];
        args.extend_from_slice(extra);
        lodestar(&args)
    };
    // Unary, by its full name.
    let replies = ok(&call("routeguide.RouteGuide/GetFeature", KNOWN_POINT));
    assert_eq!(
        replies,
        [
            json!({"name": KNOWN_NAME, "location": serde_json::from_str::<Value>(KNOWN_POINT).unwrap()})
        ]
    );
    // Server streaming, by service and method.
    let rectangle = r#"{"lo":{"latitude":400000000,"longitude":-750000000},
                        "hi":{"latitude":420000000,"longitude":-730000000}}"#;
    let features = ok(&call("RouteGuide.ListFeatures", rectangle));
    assert!(features.len() > 1, "{features:?}");
    assert!(
        features.iter().any(|f| f["name"] == KNOWN_NAME),
        "{features:?}"
    );
    assert!(features.iter().all(|f| {
        let latitude = f["location"]["latitude"].as_i64().unwrap_or(0);
        (400_000_000..=420_000_000).contains(&latitude)
    }));
    // Client streaming: two points, newline-separated, by method alone.
    let points = format!("{KNOWN_POINT}\n{{\"latitude\":410248224,\"longitude\":-747127767}}");
    let summary = ok(&call("RecordRoute", &points));
    assert_eq!(summary.len(), 1, "{summary:?}");
    assert_eq!(summary[0]["pointCount"], 2);
    assert_eq!(summary[0]["featureCount"], 1);
    assert!(summary[0]["distance"].as_i64().unwrap() > 0, "{summary:?}");
    // Bidi: the server answers each note with the notes before it at the same place.
    let notes = r#"{"location":{"latitude":1,"longitude":2},"message":"first"}
                   {"location":{"latitude":1,"longitude":2},"message":"second"}
                   {"location":{"latitude":1,"longitude":2},"message":"third"}"#;
    let replies = ok(&call("RouteChat", notes));
    let messages: Vec<&str> = replies
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["first", "first", "second"]);
}

#[test]
fn each_call_kind_by_name_through_a_registry_process() {
    let (_registry, url) = registry();
    let (_instance, _) = service("route-guide", &url);
    assert_four_kinds("route-guide", &["--registry", &url]);
}

#[test]
fn each_call_kind_by_address() {
    let (_instance, address) = service("route-guide", "memory://");
    assert_four_kinds(&address, &[]);
    // http:// is the same address, in plaintext.
    let replies = ok(&lodestar(&[
        "call",
        &format!("http://{address}"),
        "GetFeature",
        "-d",
        KNOWN_POINT,
    ]));
    assert_eq!(replies[0]["name"], KNOWN_NAME);
}

#[test]
fn calls_over_mutual_tls() {
    let dir = std::env::temp_dir().join(format!(
        "lodestar-call-tls-{}",
        lodestar_tests::unique_name()
    ));
    lodestar::tls::DevPki::generate(&["localhost", "127.0.0.1"], 1)
        .unwrap()
        .write_to(&dir)
        .unwrap();
    let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let (_instance, address) = service_with(
        "route-guide",
        "memory://",
        Quirks {
            tls_dir: Some(&dir),
            ..Quirks::default()
        },
    );
    // https:// and --ca, presenting a client certificate.
    let https = format!("https://{address}");
    let replies = ok(&lodestar(&[
        "call",
        &https,
        "GetFeature",
        "-d",
        KNOWN_POINT,
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
    ]));
    assert_eq!(replies[0]["name"], KNOWN_NAME);
    // An address, with a name the certificate lists, for the health check.
    let serving = lodestar(&[
        "health",
        &address,
        "--ca",
        &ca,
        "--server-name",
        "localhost",
        "--cert",
        &cert,
        "--key",
        &key,
    ]);
    assert_eq!(stdout(&ok_status(serving)).trim(), "SERVING");
    // Without a client certificate the server refuses: a failure on this side.
    let output = lodestar(&["call", &https, "GetFeature", "--ca", &ca]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    // Plaintext to a TLS server fails too, and says where.
    let error = failed(&lodestar(&["call", &address, "GetFeature"]), 1);
    assert!(
        error["message"].as_str().unwrap().contains(&address),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bidi_call_sends_each_value_as_it_is_read() {
    let (_instance, address) = service("route-guide", "memory://");
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    command.args(["call", &address, "RouteChat", "-d", "@-"]);
    command.stdin(Stdio::piped());
    let mut call = Proc::spawn(command);
    let mut stdin: ChildStdin = call.child.stdin.take().unwrap();
    let note = |message: &str| {
        format!(r#"{{"location":{{"latitude":5,"longitude":6}},"message":"{message}"}}"#)
    };
    // Two notes at one place: the second is answered with the first, while
    // stdin is still open.
    writeln!(stdin, "{}", note("one")).unwrap();
    writeln!(stdin, "{}", note("two")).unwrap();
    stdin.flush().unwrap();
    let reply: Value =
        serde_json::from_str(&call.next_line("the answer to the second note")).unwrap();
    assert_eq!(reply["message"], "one");
    // More, still on the same call.
    write!(stdin, "{}", note("three")).unwrap();
    stdin.flush().unwrap();
    let replies: Vec<Value> = (0..2)
        .map(|_| serde_json::from_str(&call.next_line("the answers to the third note")).unwrap())
        .collect();
    assert_eq!(replies[0]["message"], "one");
    assert_eq!(replies[1]["message"], "two");
    // Closing stdin ends the call, OK.
    drop(stdin);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = call.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the call did not end at EOF");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        call.try_next_line(Duration::ZERO).is_none(),
        "no more replies"
    );
}

#[test]
fn failures_are_one_json_object_with_documented_exit_codes() {
    let (_registry, url) = registry();
    let (_instance, address) = service("route-guide", &url);
    let (_echo, echo) = service("echo", "memory://");

    // Unknown service: the registry's services are listed.
    let error = failed(
        &lodestar(&["call", "route-gide", "GetFeature", "--registry", &url]),
        1,
    );
    assert_eq!(error["error"], "target");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("unknown service `route-gide`"),
        "{message}"
    );
    assert!(message.contains("known services: route-guide"), "{message}");

    // An instance the service does not have: its instances are listed.
    let error = failed(
        &lodestar(&[
            "call",
            "route-guide",
            "GetFeature",
            "--registry",
            &url,
            "--instance",
            "nope",
        ]),
        1,
    );
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("has no instance `nope`"), "{message}");
    assert!(message.contains("its instances: route-guide-"), "{message}");

    // Unknown method: the candidates, closest first.
    let error = failed(&lodestar(&["call", &address, "GetFeatures"]), 1);
    assert_eq!(error["error"], "method");
    let message = error["message"].as_str().unwrap();
    assert!(
        message
            .contains("unknown method `GetFeatures`; closest: routeguide.RouteGuide/GetFeature,"),
        "{message}"
    );

    // Invalid JSON: the line and column.
    let error = failed(
        &lodestar(&[
            "call",
            &address,
            "GetFeature",
            "-d",
            "{\"latitude\": 1,\n \"longitude\": x}",
        ]),
        1,
    );
    assert_eq!(error["error"], "input");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("invalid JSON in -d at line 2, column 15"),
        "{message}"
    );

    // A wrong field type: the field, by its path.
    let error = failed(
        &lodestar(&[
            "call",
            &address,
            "ListFeatures",
            "-d",
            r#"{"lo":{"latitude":true}}"#,
        ]),
        1,
    );
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("routeguide.Rectangle"), "{message}");
    assert!(message.contains("field `lo.latitude`"), "{message}");

    // An unknown field is refused, unless allowed.
    let unknown = r#"{"latitude":409146138,"longitude":-746188906,"altitude":3}"#;
    let error = failed(
        &lodestar(&["call", &address, "GetFeature", "-d", unknown]),
        1,
    );
    assert!(
        error["message"].as_str().unwrap().contains("altitude"),
        "{error}"
    );
    let replies = ok(&lodestar(&[
        "call",
        &address,
        "GetFeature",
        "-d",
        unknown,
        "--allow-unknown-fields",
    ]));
    assert_eq!(replies[0]["name"], KNOWN_NAME);

    // A unary method refuses a second value.
    let error = failed(
        &lodestar(&[
            "call",
            &address,
            "GetFeature",
            "-d",
            &format!("{KNOWN_POINT} {KNOWN_POINT}"),
        ]),
        1,
    );
    assert!(
        error["message"].as_str().unwrap().contains("second value"),
        "{error}"
    );

    // A status from the server: 64 + its code, and its JSON.
    let error = failed(
        &lodestar(&[
            "call",
            &echo,
            "Fail",
            "-d",
            r#"{"code":5,"message":"no such thing"}"#,
        ]),
        69,
    );
    assert_eq!(
        error,
        json!({"code": "not_found", "message": "no such thing"})
    );
    let error = failed(
        &lodestar(&[
            "call",
            &echo,
            "Fail",
            "-d",
            r#"{"code":14,"message":"down"}"#,
        ]),
        78,
    );
    assert_eq!(error["code"], "unavailable");

    // A reply over --max-message-size (reflection, with larger answers, still works).
    let error = failed(
        &lodestar(&[
            "call",
            &address,
            "GetFeature",
            "-d",
            KNOWN_POINT,
            "--max-message-size",
            "50",
        ]),
        72,
    );
    assert_eq!(error["code"], "resource_exhausted");

    // Details: decoded when the server describes their type, else base64.
    let (_failing, failing) = service_with(
        "route-guide",
        "memory://",
        Quirks {
            failing: Some("/routeguide.RouteGuide/GetFeature"),
            ..Quirks::default()
        },
    );
    let error = failed(&lodestar(&["call", &failing, "GetFeature"]), 69);
    assert_eq!(
        error,
        json!({
            "code": "not_found",
            "message": "no feature here",
            "details": [
                {"type": "routeguide.Point", "value": "CAc", "debug": {"latitude": 7}},
                {"type": "acme.Unknown", "value": "AQID"},
            ],
        })
    );

    // Nothing listening: a transport failure, exit 1.
    let dead = lodestar_tests::free_port();
    let error = failed(
        &lodestar(&[
            "call",
            &format!("127.0.0.1:{dead}"),
            "GetFeature",
            "--connect-timeout",
            "2s",
        ]),
        1,
    );
    assert_eq!(error["error"], "transport");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{dead}")),
        "{error}"
    );
}

#[test]
fn imports_well_known_types_metadata_and_deadlines_reach_the_server() {
    let (_echo, echo) = service("echo", "memory://");
    // ServerStream's request is declared in another file (imported), with a
    // google.protobuf.Duration field (a well-known type).
    let replies = ok(&lodestar(&[
        "call",
        &echo,
        "lodestar.test.Echo/ServerStream",
        "-d",
        r#"{"count":3,"interval":"0.001s","token":"t"}"#,
    ]));
    assert_eq!(replies.len(), 3, "{replies:?}");
    // Values from a file, streamed (-d @FILE).
    let file = std::env::temp_dir().join(format!(
        "lodestar-call-{}.json",
        lodestar_tests::unique_name()
    ));
    std::fs::write(&file, "{\"message\":\"a\"}\n{\"message\":\"b\"}\n").unwrap();
    let data = format!("@{}", file.display());
    let replies = ok(&lodestar(&["call", &echo, "Bidi", "-d", &data]));
    let _ = std::fs::remove_file(&file);
    let messages: Vec<&str> = replies
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["a", "b"]);
    // google.protobuf.Empty in, a deadline out: --timeout is sent.
    let replies = ok(&lodestar(&[
        "call",
        &echo,
        "ReportDeadline",
        "--timeout",
        "30s",
    ]));
    assert_eq!(replies[0]["hasDeadline"], true, "{replies:?}");
    let remaining = replies[0]["remainingMs"]
        .as_str()
        .unwrap()
        .parse::<i64>()
        .unwrap();
    assert!((1..=30_000).contains(&remaining), "{remaining}");
    // -H goes out as metadata; -v shows what comes back.
    let output = lodestar(&[
        "call",
        &echo,
        "Echo/Unary",
        "-d",
        r#"{"message":"hi"}"#,
        "-H",
        "x-trace-me: yes",
        "-v",
    ]);
    let replies = ok(&output);
    assert_eq!(replies[0]["message"], "hi");
    let verbose = stderr(&output);
    assert!(verbose.contains("response headers:"), "{verbose}");
    assert!(verbose.contains("x-trace-me: yes"), "{verbose}");
    assert!(verbose.contains("response trailers:"), "{verbose}");
    // --emit-defaults prints fields at their defaults.
    let replies = ok(&lodestar(&["call", &echo, "Echo/Unary", "--emit-defaults"]));
    assert_eq!(replies[0]["message"], "");
    assert_eq!(replies[0]["payloadLen"], "0");
    // A bare name two services share would be ambiguous; this server has one.
    let replies = ok(&lodestar(&[
        "call",
        &echo,
        "Unary",
        "-d",
        r#"{"message":"x"}"#,
    ]));
    assert_eq!(replies[0]["message"], "x");
}

#[test]
fn reflection_falls_back_to_v1alpha_and_says_when_there_is_none() {
    let v1 = "/grpc.reflection.v1.ServerReflection/";
    let v1alpha = "/grpc.reflection.v1alpha.ServerReflection/";
    let (_old, address) = service_with(
        "route-guide",
        "memory://",
        Quirks {
            refused: &[v1],
            ..Quirks::default()
        },
    );
    let replies = ok(&lodestar(&[
        "call",
        &address,
        "GetFeature",
        "-d",
        KNOWN_POINT,
    ]));
    assert_eq!(replies[0]["name"], KNOWN_NAME);
    let methods = stdout(&ok_status(lodestar(&["list", &address, "RouteGuide"])));
    assert!(
        methods.contains("routeguide.RouteGuide/RouteChat"),
        "{methods}"
    );

    let (_none, address) = service_with(
        "route-guide",
        "memory://",
        Quirks {
            refused: &[v1, v1alpha],
            ..Quirks::default()
        },
    );
    let error = failed(&lodestar(&["call", &address, "GetFeature"]), 1);
    assert_eq!(error["error"], "reflection");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("does not serve reflection (grpc.reflection.v1 nor v1alpha)"),
        "{message}"
    );
}

#[test]
fn list_and_health() {
    let (_registry, url) = registry();
    let (_instance, address) = service("route-guide", &url);

    let services = stdout(&ok_status(lodestar(&[
        "list",
        "route-guide",
        "--registry",
        &url,
    ])));
    assert!(
        services.lines().any(|l| l == "routeguide.RouteGuide"),
        "{services}"
    );
    assert!(
        services.lines().any(|l| l == "grpc.health.v1.Health"),
        "{services}"
    );

    let listed = lodestar(&["list", &address, "RouteGuide", "--output", "json"]);
    let listed: Value = serde_json::from_str(&stdout(&ok_status(listed))).unwrap();
    assert_eq!(listed["service"], "routeguide.RouteGuide");
    let kinds: Vec<(&str, &str, &str, &str)> = listed["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["method"].as_str().unwrap(),
                m["kind"].as_str().unwrap(),
                m["input"].as_str().unwrap(),
                m["output"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (
                "GetFeature",
                "unary",
                "routeguide.Point",
                "routeguide.Feature"
            ),
            (
                "ListFeatures",
                "server_streaming",
                "routeguide.Rectangle",
                "routeguide.Feature"
            ),
            (
                "RecordRoute",
                "client_streaming",
                "routeguide.Point",
                "routeguide.RouteSummary"
            ),
            (
                "RouteChat",
                "bidi_streaming",
                "routeguide.RouteNote",
                "routeguide.RouteNote"
            ),
        ]
    );
    let table = stdout(&ok_status(lodestar(&["list", &address, "RouteGuide"])));
    assert!(table.starts_with("METHOD"), "{table}");
    assert!(table.contains("routeguide.RouteGuide/RouteChat"), "{table}");

    // Health: 0 serving (by name and by address), 3 for a service the
    // server does not know, 1 when nothing answers.
    let serving = lodestar(&["health", "route-guide", "--registry", &url]);
    assert_eq!(stdout(&ok_status(serving)).trim(), "SERVING");
    let serving = lodestar(&[
        "health",
        &address,
        "routeguide.RouteGuide",
        "--output",
        "json",
    ]);
    assert_eq!(
        stdout(&ok_status(serving)).trim(),
        r#"{"status":"SERVING"}"#
    );
    let unknown = lodestar(&["health", &address, "no.Such"]);
    assert_eq!(unknown.status.code(), Some(3), "{}", stderr(&unknown));
    assert!(
        stderr(&unknown).contains("not_found"),
        "{}",
        stderr(&unknown)
    );
    let dead = lodestar_tests::free_port();
    let dead = lodestar(&[
        "health",
        &format!("127.0.0.1:{dead}"),
        "--connect-timeout",
        "2s",
    ]);
    assert_eq!(dead.status.code(), Some(1), "{}", stderr(&dead));
}

/// `output`, which must have exited 0.
fn ok_status(output: Output) -> Output {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        stdout(&output),
        stderr(&output)
    );
    output
}

#[test]
fn calls_over_connect_and_grpc_web_binary_and_text() {
    let (_echo, echo) = service("echo", "memory://");
    let (_failing, failing) = service_with(
        "route-guide",
        "memory://",
        Quirks {
            failing: Some("/routeguide.RouteGuide/GetFeature"),
            ..Quirks::default()
        },
    );
    for protocol in ["connect", "grpc-web", "grpc-web-text"] {
        // A fresh instance each: RouteChat answers with the notes before.
        let (_instance, address) = service("route-guide", "memory://");
        assert_four_kinds(&address, &["--protocol", protocol]);
        // NOT_FOUND with its details, mapped back from the protocol's own
        // error (Connect's JSON, gRPC-Web's trailers frame, in base64 for
        // text).
        let error = failed(
            &lodestar(&["call", &failing, "GetFeature", "--protocol", protocol]),
            69,
        );
        assert_eq!(
            error,
            json!({
                "code": "not_found",
                "message": "no feature here",
                "details": [
                    {"type": "routeguide.Point", "value": "CAc", "debug": {"latitude": 7}},
                    {"type": "acme.Unknown", "value": "AQID"},
                ],
            }),
            "{protocol}"
        );
        // The deadline: the server's handler sleeps past it.
        let error = failed(
            &lodestar(&[
                "call",
                &echo,
                "Sleep",
                "-d",
                r#"{"token":"t","duration":"5s"}"#,
                "--timeout",
                "300ms",
                "--protocol",
                protocol,
            ]),
            68,
        );
        assert_eq!(error["code"], "deadline_exceeded", "{protocol}");
    }
    // An unknown protocol is a usage error.
    let output = lodestar(&["call", &echo, "Unary", "--protocol", "http"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output)
            .contains("expected \"grpc\", \"grpc-web\", \"grpc-web-text\" or \"connect\""),
        "{}",
        stderr(&output)
    );
}

//! What the registry accepts and remembers, and what no registration can
//! do to it: bounded memory, services that stay resolvable, validated
//! names and checks, one behaviour for both APIs, operators' choices that
//! survive a restart.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use lodestar::{Client, Instance, Registry, RegistryError, ServiceKey, StaticRegistry};
use lodestar_registry::{RemoteRegistry, pb};
use tokio_stream::StreamExt;

use super::{TIMEOUT, bounded, http, registry};

/// A raw gRPC client of the registry API, to send exactly what another
/// language's client might.
fn raw_client(grpc: SocketAddr) -> pb::registry_client::RegistryClient<lodestar::client::Channel> {
    let client = Client::new(StaticRegistry::new().with("registry", [grpc.to_string()]));
    pb::registry_client::RegistryClient::new(client.channel("registry"))
}

fn listed(http_addr: SocketAddr, service: &str) -> serde_json::Value {
    let (code, body) = http(
        http_addr,
        "GET",
        &format!("/v1/services/{service}/instances"),
        None,
        None,
    );
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn error_of(body: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not the JSON error shape: {body}"));
    value["error"].as_str().unwrap().to_owned()
}

/// The registry process's resident memory, in bytes.
fn rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_or_oversized_registrations_are_refused_with_the_reason_over_both_apis() {
    let registry = registry("127.0.0.1:0", &[]);
    let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
    let huge = "m".repeat(20_000);
    // (a JSON registration, what the refusal names)
    let cases: Vec<(String, &str)> = vec![
        (r#"{"service": "a\nlevel=ERROR msg=forged", "address": "10.0.0.1:80", "ttl_ms": 5000}"#.into(), "service"),
        (r#"{"service": "a\u001b[2J", "address": "10.0.0.1:80", "ttl_ms": 5000}"#.into(), "service"),
        (r#"{"service": "a\u0000b", "address": "10.0.0.1:80", "ttl_ms": 5000}"#.into(), "service"),
        (r#"{"service": "svc", "id": "x\u202eevil", "address": "10.0.0.1:80", "ttl_ms": 5000}"#.into(), "id"),
        (format!(r#"{{"service": "svc", "id": "{}", "address": "10.0.0.1:80", "ttl_ms": 5000}}"#, "i".repeat(5_000)), "id"),
        (r#"{"service": "svc", "id": "x", "address": "10.0.0.1:80\r\nHost: evil", "ttl_ms": 5000}"#.into(), "address"),
        (r#"{"service": "svc", "address": "10.0.0.1:80", "ttl_ms": 1}"#.into(), "TTL"),
        (r#"{"service": "svc", "address": "10.0.0.1:80", "ttl_ms": 99999999999}"#.into(), "TTL"),
        (format!(r#"{{"service": "svc", "address": "10.0.0.1:80", "ttl_ms": 5000, "metadata": {{"k": "{huge}"}}}}"#), "metadata"),
        (r#"{"service": "svc", "address": "10.0.0.1:80", "persistent": true, "check": {"kind": "smtp"}}"#.into(), "unknown check kind"),
        (r#"{"service": "svc", "address": "10.0.0.1:80", "persistent": true, "ttl_ms": 5000}"#.into(), "no lease"),
    ];
    for (body, says) in &cases {
        let (code, text) = http(registry.http, "POST", "/v1/instances", Some(body), None);
        assert_eq!(code, 400, "{text}");
        let error = error_of(&text);
        assert!(error.contains(says), "{says}: {error}");
        assert!(
            !error.contains('\n') && !error.contains('\u{1b}') && !error.contains('\u{202e}'),
            "the error echoes unsafe text: {error:?}"
        );
        assert!(error.len() < 1000, "the error echoes a huge value");
    }
    // The same refusals over gRPC.
    for (instance, ttl, says) in [
        (Instance::new("a\nb", "10.0.0.1:80"), 5000, "service"),
        (
            Instance::new("svc", "10.0.0.1:80").with_id("a\u{1b}[31m"),
            5000,
            "id",
        ),
        (Instance::new("svc", "10.0.0.1:80"), 1, "TTL"),
        (
            Instance::new("svc", "10.0.0.1:80").with_label("k", "v".repeat(20_000)),
            5000,
            "metadata",
        ),
    ] {
        let error = remote
            .register(instance, Duration::from_millis(ttl))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, RegistryError::Invalid(m) if m.contains(says)),
            "{says}: {error}"
        );
    }
    let mut raw = raw_client(registry.grpc);
    let unknown_kind = pb::RegisterRequest {
        instance: Some(lodestar_registry::to_pb(&Instance::new(
            "svc",
            "10.0.0.1:80",
        ))),
        persistent: true,
        check: Some(pb::HealthCheck {
            kind: 42,
            ..pb::HealthCheck::default()
        }),
        ..pb::RegisterRequest::default()
    };
    let status = raw.register(unknown_kind).await.unwrap_err();
    assert_eq!(status.code(), lodestar::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("unknown check kind"),
        "{status:?}"
    );
    // Nothing was registered by any of it.
    assert!(remote.services("default").await.unwrap().is_empty());

    // A protection threshold only for a service that exists, by a valid name.
    for (path, says) in [
        ("/v1/services/nobody/protection", "no instances"),
        ("/v1/services/a%0Ab/protection", "service"),
    ] {
        let (code, text) = http(
            registry.http,
            "PUT",
            path,
            Some(r#"{"threshold": 0.5}"#),
            None,
        );
        assert_eq!(code, 400, "{path}: {text}");
        let error = error_of(&text);
        assert!(
            error.contains(says) && !error.contains('\n'),
            "{path}: {error}"
        );
    }

    // Malformed queries and paths, and wrong methods, answer in the
    // documented JSON shape too.
    for (method, path, code) in [
        ("GET", "/v1/services?bogus=1", 400),
        (
            "GET",
            "/v1/services/svc/instances?namespace=a&namespace=b",
            400,
        ),
        ("PATCH", "/v1/instances", 405),
    ] {
        let (got, text) = http(registry.http, method, path, None, None);
        assert_eq!(got, code, "{method} {path}: {text}");
        assert!(!error_of(&text).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_registration_that_leaves_the_defaults_is_enabled_healthy_and_weighted() {
    let registry = registry("127.0.0.1:0", &[]);
    let mut raw = raw_client(registry.grpc);
    // What a minimal client in another language sends: only what it must.
    let bare = pb::Instance {
        id: "bare-1".into(),
        service: Some(pb::ServiceKey {
            namespace: "default".into(),
            group: "default".into(),
            service: "bare".into(),
        }),
        address: "10.0.0.1:80".into(),
        ..pb::Instance::default()
    };
    raw.register(pb::RegisterRequest {
        instance: Some(bare),
        ttl_ms: 30_000,
        ..pb::RegisterRequest::default()
    })
    .await
    .unwrap();
    let listed = listed(registry.http, "bare");
    let instance = &listed["instances"][0];
    assert_eq!(instance["enabled"], true, "{listed}");
    assert_eq!(instance["healthy"], true, "{listed}");
    assert_eq!(instance["weight"], 100, "{listed}");
    assert_eq!(instance["protocol"], "grpc", "{listed}");
    // The same registration over HTTP gives the same instance.
    let (code, text) = http(
        registry.http,
        "POST",
        "/v1/instances",
        Some(r#"{"service": "bare", "id": "bare-2", "address": "10.0.0.1:81", "ttl_ms": 30000}"#),
        None,
    );
    assert_eq!(code, 201, "{text}");
    let listed = self::listed(registry.http, "bare");
    let (a, b) = (&listed["instances"][0], &listed["instances"][1]);
    for field in [
        "enabled",
        "healthy",
        "weight",
        "protocol",
        "version",
        "zone",
        "ephemeral",
    ] {
        assert_eq!(a[field], b[field], "{field}: {listed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_accepted_registration_makes_a_service_unresolvable() {
    let registry = registry("127.0.0.1:0", &[]);
    let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
    // The attack of the report: two instances with 3 MiB of metadata each,
    // disabled, so that nobody would notice them.
    let mut big = Instance::new("victim", "10.0.0.9:80").with_id("big");
    big.enabled = false;
    big.metadata
        .insert("blob".into(), "x".repeat(3 * 1024 * 1024));
    let error = remote
        .register(big, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(error, RegistryError::Invalid(_)), "{error}");
    // As big as the limits allow, as many as a service takes.
    let limits = lodestar::registry::Limits::default();
    let mut registered = 0;
    let refusal = loop {
        let mut instance = Instance::new(
            "victim",
            format!("10.0.{}.{}:80", registered / 250, registered % 250),
        )
        .with_id(format!("fat-{registered}"));
        for n in 0..4 {
            instance
                .metadata
                .insert(format!("k{n}"), "y".repeat(limits.max_metadata / 4 - 8));
        }
        match remote.register(instance, Duration::from_secs(30)).await {
            Ok(()) => registered += 1,
            Err(e) => break e,
        }
        assert!(registered < 1_000, "no limit on a service's size");
    };
    assert!(
        refusal.to_string().contains("must fit in one message"),
        "{refusal}"
    );
    // Every reader still gets the whole service: a lookup, a new client's
    // watch, and the CLI.
    let found = remote.instances(&ServiceKey::new("victim")).await.unwrap();
    assert_eq!(found.len(), registered);
    let fresh = RemoteRegistry::new(&[registry.grpc.to_string()]);
    let mut watch = fresh.watch(&ServiceKey::new("victim"), None).await.unwrap();
    let first = bounded("a snapshot", watch.next()).await.unwrap().unwrap();
    assert!(
        matches!(&first, lodestar::WatchEvent::Snapshot { instances, .. } if instances.len() == registered),
        "{first:?}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_lodestar"))
        .args(["describe", "victim", "--output", "json", "--registry"])
        .arg(registry.url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registering_the_largest_instance_ten_thousand_times_keeps_memory_bounded() {
    let registry = registry("127.0.0.1:0", &[]);
    let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
    let pid = registry.proc.child.id();
    let limits = lodestar::registry::Limits::default();
    let mut instance = Instance::new("churn", "10.0.0.1:80").with_id("churn-1");
    let mut metadata = BTreeMap::new();
    for n in 0..4 {
        metadata.insert(format!("k{n}"), "z".repeat(limits.max_metadata / 4 - 8));
    }
    instance.metadata = metadata;
    let baseline = rss(pid);
    let started = Instant::now();
    for n in 0..10_000 {
        // Each a change (a new version), so each is kept in the history.
        instance.version = format!("1.0.{n}");
        remote
            .register(instance.clone(), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(120), "too slow");
    }
    let grown = rss(pid).saturating_sub(baseline);
    // The history holds at most 16 MiB of instances (docs/limits.md); the
    // rest is allocator slack. Without a bound it holds 4,096 of them: 64 MiB.
    assert!(
        grown < 48 * 1024 * 1024,
        "the registry grew by {} MiB",
        grown / (1024 * 1024)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_choices_survive_a_restart() {
    let data = std::env::temp_dir().join(format!(
        "lodestar-registry-choices-{}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    let data_dir = data.to_str().unwrap().to_owned();
    let first = registry("127.0.0.1:0", &["--data-dir", &data_dir]);
    let grpc = first.grpc.to_string();
    let remote = RemoteRegistry::new(std::slice::from_ref(&grpc));
    let instance = Instance::new("orders", "10.0.0.1:80").with_id("orders-1");
    remote
        .register(instance.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    let (code, text) = http(
        first.http,
        "PUT",
        "/v1/services/orders/instances/orders-1/enabled",
        Some(r#"{"enabled": false}"#),
        None,
    );
    assert_eq!(code, 204, "{text}");
    let (code, text) = http(
        first.http,
        "PUT",
        "/v1/services/orders/protection",
        Some(r#"{"threshold": 0.75}"#),
        None,
    );
    assert_eq!(code, 204, "{text}");
    first.proc.kill();

    let second = registry(&grpc, &["--data-dir", &data_dir]);
    // The owner registers again, as a service does when its registry
    // forgot it: still out of traffic.
    let remote = RemoteRegistry::new(&[second.grpc.to_string()]);
    remote
        .register(instance, Duration::from_secs(30))
        .await
        .unwrap();
    let listed = listed(second.http, "orders");
    assert_eq!(listed["instances"][0]["enabled"], false, "{listed}");
    // The protection threshold is back: with the only instance unhealthy
    // (its lease runs out), lookups return it as healthy.
    let short = Instance::new("orders", "10.0.0.2:80").with_id("orders-2");
    remote
        .register(short, Duration::from_millis(600))
        .await
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let listed = self::listed(second.http, "orders");
        if listed["protected"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no protection after a restart: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// A one-shot HTTP server: answers each request with `200 OK` and sends
/// its request head (up to the blank line) on the returned channel.
fn recording_http_server() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            if tx.send(head).is_err() {
                return;
            }
        }
    });
    (address, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_are_validated_sent_as_real_requests_and_kept_to_allowed_networks() {
    let registry = registry("127.0.0.1:0", &[]);
    // The request smuggling of the report: refused at registration.
    let (target, _requests) = recording_http_server();
    let smuggle = format!(
        r#"{{"service": "web", "address": "{target}", "persistent": true, "check": {{"kind": "http", "target": "/ HTTP/1.1\r\nHost: x\r\n\r\nDELETE /admin HTTP/1.1\r\nX:", "interval_ms": 1000}}}}"#
    );
    let (code, text) = http(registry.http, "POST", "/v1/instances", Some(&smuggle), None);
    assert_eq!(code, 400, "{text}");
    assert!(error_of(&text).contains("path"), "{text}");
    for (check, says) in [
        (
            r#"{"kind": "http", "target": "http://169.254.169.254/latest", "interval_ms": 1000}"#,
            "path",
        ),
        (r#"{"kind": "tcp", "interval_ms": 5}"#, "interval"),
        (r#"{"kind": "grpc", "target": "a\nb"}"#, "service name"),
    ] {
        let body = format!(
            r#"{{"service": "web", "address": "{target}", "persistent": true, "check": {check}}}"#
        );
        let (code, text) = http(registry.http, "POST", "/v1/instances", Some(&body), None);
        assert_eq!(code, 400, "{check}: {text}");
        assert!(error_of(&text).contains(says), "{check}: {text}");
    }
    // A valid check goes out as one well-formed GET.
    let (target, requests) = recording_http_server();
    let body = format!(
        r#"{{"service": "web", "id": "web-1", "address": "{target}", "persistent": true, "check": {{"kind": "http", "target": "/healthz?deep=1", "interval_ms": 1000}}}}"#
    );
    assert_eq!(
        http(registry.http, "POST", "/v1/instances", Some(&body), None).0,
        201
    );
    let head = requests
        .recv_timeout(TIMEOUT)
        .expect("a health check request");
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("GET /healthz?deep=1 HTTP/1.1"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("host: {target}")),
        "{head}"
    );

    // An operator who allows checks only into 10.0.0.0/8: a check aimed at
    // loopback never reaches it, and the instance is unhealthy.
    let fenced = super::registry("127.0.0.1:0", &["--check-network", "10.0.0.0/8"]);
    let (target, requests) = recording_http_server();
    let body = format!(
        r#"{{"service": "web", "id": "web-1", "address": "{target}", "persistent": true, "check": {{"kind": "http", "target": "/healthz", "interval_ms": 1000}}}}"#
    );
    assert_eq!(
        http(fenced.http, "POST", "/v1/instances", Some(&body), None).0,
        201
    );
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let listed = listed(fenced.http, "web");
        if listed["instances"][0]["healthy"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "still healthy: {listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        requests.try_recv().is_err(),
        "a check reached a network it may not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cannot_resolve_a_service_says_why_the_registry_refused() {
    // A registry whose reads need a token, and a client without one.
    let dir = std::env::temp_dir().join(format!(
        "lodestar-registry-why-{}",
        lodestar_tests::unique_name()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens.json");
    std::fs::write(
        &tokens,
        r#"{"tokens": [{"name": "ops", "secret": "not-for-clients", "namespaces": ["*"], "access": "write"}]}"#,
    )
    .unwrap();
    let registry = registry("127.0.0.1:0", &["--tokens", tokens.to_str().unwrap()]);
    let client = Client::builder(RemoteRegistry::new(&[registry.grpc.to_string()]))
        .resolve_timeout(Duration::from_millis(500))
        .build();
    let mut guide = route_guide::RouteGuideClient::by_name(&client, "orders");
    let status = bounded(
        "a call to fail",
        guide.get_feature(route_guide::Point::default()),
    )
    .await
    .unwrap_err();
    assert!(
        status.message().contains("did not list its instances")
            && status.message().contains("not authorized"),
        "the cause is hidden: {status:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_api_serves_at_most_its_connection_limit() {
    let registry = registry("127.0.0.1:0", &["--grpc-max-connections", "1"]);
    // One connection holds the only place (it has sent nothing yet).
    let held = std::net::TcpStream::connect(registry.grpc).unwrap();
    let services = |registry: &super::RegistryProc| {
        let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
        async move { remote.services("default").await }
    };
    let refused = bounded("a refused call", services(&registry)).await;
    assert!(refused.is_err(), "a second connection was served");
    drop(held);
    let deadline = Instant::now() + TIMEOUT;
    while bounded("a call", services(&registry)).await.is_err() {
        assert!(Instant::now() < deadline, "the freed place is not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tiny_lease_cannot_freeze_expiry_for_the_whole_registry() {
    // The report's registry let a 1 ms lease in; let it in here too, to
    // show that the self-preservation rule itself holds.
    let registry = registry("127.0.0.1:0", &["--min-ttl", "1ms"]);
    let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
    let ttl = Duration::from_secs(3);
    let fleet: Vec<Instance> = (0..150)
        .map(|n| {
            Instance::new("fleet", format!("10.0.{}.{}:80", n / 100, n % 100))
                .with_id(format!("f{n}"))
        })
        .collect();
    for instance in &fleet {
        remote.register(instance.clone(), ttl).await.unwrap();
    }
    remote
        .register(
            Instance::new("fleet", "10.9.9.9:80").with_id("tiny"),
            Duration::from_millis(1),
        )
        .await
        .unwrap();
    // Everyone but one renews; the tiny lease and `f0` (its process died)
    // go silent.
    let alive = fleet[1..].to_vec();
    let beating = {
        let remote = remote.clone();
        tokio::spawn(async move {
            loop {
                for instance in &alive {
                    let _ = remote.heartbeat(&instance.instance_key()).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    // `f0` is marked unhealthy when its lease runs out (3 s), evicted a
    // second later (the grace of these tests), and expiry never freezes.
    let started = Instant::now();
    let deadline = started + TIMEOUT;
    loop {
        let (_, text) = http(registry.http, "GET", "/v1/status", None, None);
        let status: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(status["self_preservation"], false, "{status}");
        let ids: Vec<String> = remote
            .instances(&ServiceKey::new("fleet"))
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        if !ids.iter().any(|id| id == "f0" || id == "tiny") {
            break;
        }
        assert!(Instant::now() < deadline, "the dead stay: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    beating.abort();
}

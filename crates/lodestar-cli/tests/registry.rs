//! The registry server as a real process (`lodestar registry`), with
//! services and clients in other processes, over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use lodestar::{Client, Registry, ServiceKey, StaticRegistry, WatchEvent};
use lodestar_registry::{RemoteRegistry, SnapshotRegistry};
use lodestar_tests::process::Proc;
use route_guide::{Point, RouteGuideClient, SERVICE_NAME};
use tokio_stream::StreamExt;

#[path = "registry/hardening.rs"]
mod hardening;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Durability of what the registry keeps on disk.
#[path = "registry/persistence.rs"]
mod persistence;

/// `lodestar watch` against the registry process.
#[path = "registry/watch.rs"]
mod watch;

async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {TIMEOUT:?} waiting for {what}"))
}

/// `lodestar registry` on `grpc` (port 0: any), with extra flags.
struct RegistryProc {
    proc: Proc,
    grpc: SocketAddr,
    http: SocketAddr,
}

fn registry(grpc: &str, extra: &[&str]) -> RegistryProc {
    start_registry(registry_command(grpc, extra))
}

/// The command [`registry`] runs, to add to before [`start_registry`].
fn registry_command(grpc: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    command
        .args([
            "registry",
            "--addr",
            grpc,
            "--http-addr",
            "127.0.0.1:0",
            "--eviction-grace",
            "1s",
        ])
        .args(extra)
        .env_remove("LODESTAR_REGISTRY_TOKEN");
    if !extra.contains(&"--warmup") {
        command.args(["--warmup", "0"]);
    }
    command
}

fn start_registry(command: Command) -> RegistryProc {
    let proc = Proc::spawn(command);
    let grpc = proc.line("lodestar registry: gRPC on").parse().unwrap();
    let http = proc.line("lodestar registry: HTTP on");
    let http = http
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches("/v1/status")
        .parse()
        .unwrap();
    RegistryProc { proc, grpc, http }
}

impl RegistryProc {
    fn url(&self) -> String {
        format!("lodestar://{}", self.grpc)
    }
}

/// This test binary, to run only the ignored test `test` (which reads
/// its part from the environment) in a process of its own.
fn child_process(test: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args([
        test,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    command
}

/// A RouteGuide instance in a process of its own (this test binary, run as
/// `child_instance`), registering in `url` with a lease of `ttl_ms`.
fn instance(url: &str, name: &str, ttl_ms: u64) -> (Proc, SocketAddr) {
    let mut command = child_process("child_instance");
    command
        .env("LODESTAR_CHILD_REGISTRY", url)
        .env("LODESTAR_CHILD_NAME", name)
        .env("LODESTAR_CHILD_TTL_MS", ttl_ms.to_string())
        .env("RUST_LOG", "lodestar=info");
    let proc = Proc::spawn(command);
    let address = proc.line("child ready on").parse().unwrap();
    (proc, address)
}

/// Runs as a separate process for the tests above; does nothing otherwise.
#[test]
#[ignore = "a RouteGuide instance the registry tests start as a separate process"]
fn child_instance() {
    let Ok(url) = std::env::var("LODESTAR_CHILD_REGISTRY") else {
        return;
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("lodestar=info")
        .init();
    let name = std::env::var("LODESTAR_CHILD_NAME").unwrap();
    let ttl = Duration::from_millis(
        std::env::var("LODESTAR_CHILD_TTL_MS")
            .unwrap()
            .parse()
            .unwrap(),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let registry = lodestar_registry::from_url(&url).unwrap();
        let running = lodestar::Service::builder(SERVICE_NAME)
            .id(name.clone())
            .registry(registry)
            .ttl(ttl)
            .add_service(route_guide::RouteGuideService::new(name).into_server())
            .start()
            .await
            .unwrap();
        println!("child ready on {}", running.local_addr());
        lodestar::server::shutdown_signal().await;
        running.shutdown().await.unwrap();
    });
}

/// A minimal HTTP/1.1 request: the status code and body.
fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    Primed::send(address, method, path, body, token).complete()
}

/// An HTTP/1.1 request on a connection of its own, sent but for its last
/// byte: requests primed this way reach the server as close together as
/// the calls that complete them.
struct Primed {
    stream: TcpStream,
    last: u8,
}

impl Primed {
    fn send(
        address: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> Self {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let body = body.unwrap_or("");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (last, rest) = request.as_bytes().split_last().unwrap();
        stream.write_all(rest).unwrap();
        Self {
            stream,
            last: *last,
        }
    }

    /// Sends the last byte; the status code and body of the answer.
    fn complete(self) -> (u16, String) {
        let response = self.complete_whole();
        let code = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }

    /// Sends the last byte; the whole answer, status line and headers too.
    fn complete_whole(mut self) -> String {
        self.stream.write_all(&[self.last]).unwrap();
        let mut response = String::new();
        self.stream.read_to_string(&mut response).unwrap();
        response
    }
}

/// The value of the sample `series` (name and labels, as the scrape
/// writes them) in OpenMetrics `text`, if there is one.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

/// The next event of a watch, bounded.
async fn next_event(watch: &mut lodestar::WatchStream) -> WatchEvent {
    bounded("a watch event", watch.next())
        .await
        .unwrap()
        .unwrap()
}

fn status(http_addr: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&http(http_addr, "GET", "/v1/status", None, None).1).unwrap()
}

async fn ids(registry: &dyn Registry) -> Vec<String> {
    let mut ids: Vec<String> = registry
        .instances(&ServiceKey::new(SERVICE_NAME))
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    ids.sort();
    ids
}

/// Calls `guide` every 10ms until the returned sender says stop; the task
/// yields how many calls succeeded and the statuses of those that failed.
fn steady_load(
    mut guide: RouteGuideClient<lodestar::client::Channel>,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<(u32, Vec<String>)>,
) {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !*stop_rx.borrow() {
            match served_by(&mut guide).await {
                Ok(_) => ok += 1,
                Err(status) => failed.push(status.to_string()),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stop_rx.changed() => {}
            }
        }
        (ok, failed)
    });
    (stop_tx, load)
}

async fn served_by(
    guide: &mut RouteGuideClient<lodestar::client::Channel>,
) -> Result<String, lodestar::Status> {
    let response = guide
        .get_feature(Point {
            latitude: 409_146_138,
            longitude: -746_188_906,
        })
        .await?;
    Ok(response
        .metadata()
        .get(route_guide::SERVED_BY)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_in_other_processes_are_found_and_called_through_the_registry() {
    let registry = registry("127.0.0.1:0", &[]);
    let (_a, _) = instance(&registry.url(), "rg-a", 3000);
    let (_b, _) = instance(&registry.url(), "rg-b", 3000);
    let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
    assert_eq!(ids(&remote).await, ["rg-a", "rg-b"]);
    let client = Client::new(remote);
    let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        seen.insert(bounded("a call", served_by(&mut guide)).await.unwrap());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["rg-a", "rg-b"]);

    // The CLI sees them too, as JSON with the fields scripts rely on.
    cli_sees_two_healthy_instances(&registry.url());
}

/// `lodestar describe` and `lodestar services` (the registry given by flag,
/// then by `LODESTAR_REGISTRY`) both report two healthy instances.
fn cli_sees_two_healthy_instances(url: &str) {
    let lodestar = |args: &[&str], env: Option<&str>| -> serde_json::Value {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
        command.args(args).args(["--output", "json"]);
        if let Some(url) = env {
            command.env("LODESTAR_REGISTRY", url);
        }
        let output = lodestar_tests::run_bounded(command, TIMEOUT);
        assert!(
            output.status.success(),
            "lodestar {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let described = lodestar(&["describe", SERVICE_NAME, "--registry", url], None);
    let instances = described["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2);
    for instance in instances {
        assert!(
            instance["id"].is_string()
                && instance["address"].is_string()
                && instance["healthy"] == true,
            "{instance}"
        );
    }
    let services = lodestar(&["services"], Some(url));
    assert_eq!(services["services"][0]["service"], SERVICE_NAME);
    assert_eq!(services["services"][0]["healthy"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_turns_unhealthy_then_is_evicted_and_clients_stop_picking_it() {
    let registry = registry("127.0.0.1:0", &[]);
    let (a, _) = instance(&registry.url(), "rg-a", 900);
    let (_b, _) = instance(&registry.url(), "rg-b", 900);
    let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
    let key = ServiceKey::new(SERVICE_NAME);
    let client = Client::new(remote.clone());
    let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
    for _ in 0..4 {
        bounded("a warm-up call", served_by(&mut guide))
            .await
            .unwrap();
    }
    let mut watch = remote.watch(&key, None).await.unwrap();
    bounded("the snapshot", watch.next()).await;

    a.kill(); // SIGKILL: no deregistration
    let killed = Instant::now();
    // Calls go on, and go to the live instance.
    for _ in 0..10 {
        assert_eq!(
            bounded("a call", served_by(&mut guide)).await.unwrap(),
            "rg-b"
        );
    }
    let mut unhealthy_after = None;
    let evicted_after = loop {
        match bounded("the killed instance to leave", watch.next())
            .await
            .unwrap()
            .unwrap()
        {
            WatchEvent::Put { instance, .. } if instance.id == "rg-a" && !instance.healthy => {
                unhealthy_after = Some(killed.elapsed());
            }
            WatchEvent::Delete { id, .. } if id == "rg-a" => break killed.elapsed(),
            _ => {}
        }
    };
    // Lease 0.9 s, then 1 s of grace (the registry's --eviction-grace).
    let unhealthy_after = unhealthy_after.expect("marked unhealthy before eviction");
    assert!(
        unhealthy_after < Duration::from_millis(2500),
        "unhealthy after {unhealthy_after:?}"
    );
    assert!(
        evicted_after < Duration::from_millis(4000),
        "evicted after {evicted_after:?}"
    );
    assert_eq!(ids(&remote).await, ["rg-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_restart_under_load_loses_no_call_and_instances_come_back() {
    let data = std::env::temp_dir().join(format!("lodestar-registry-test-{}", std::process::id()));
    let data_dir = data.to_str().unwrap().to_owned();
    let first = registry("127.0.0.1:0", &["--data-dir", &data_dir, "--warmup", "1s"]);
    let grpc = first.grpc;
    let (_a, a_address) = instance(&first.url(), "rg-a", 1500);
    let (_b, _) = instance(&first.url(), "rg-b", 1500);
    // One that will die while the registry is away, and never come back.
    let (c, _) = instance(&first.url(), "rg-c", 1500);
    // A persistent instance, registered by an operator, checked over TCP.
    let body = format!(
        r#"{{"service": "legacy-db", "address": "{a_address}", "id": "db-1", "persistent": true, "check": {{"kind": "tcp"}}}}"#
    );
    assert_eq!(
        http(first.http, "POST", "/v1/instances", Some(&body), None).0,
        201
    );

    let remote = RemoteRegistry::new(&[grpc.to_string()]);
    let client = Client::new(remote.clone());
    let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
    bounded("a first call", served_by(&mut guide))
        .await
        .unwrap();
    let view = client.channel(SERVICE_NAME);
    bounded("the client to see all three", async {
        while view.addresses().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Steady load for the whole test.
    let (stop_tx, load) = steady_load(guide);

    first.proc.kill();
    c.kill();
    // Calls go on from the clients' caches while the registry is away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = registry(
        &grpc.to_string(),
        &["--data-dir", &data_dir, "--warmup", "1s"],
    );
    let restarted = Instant::now();
    // Every live instance registers again within about one heartbeat (0.5 s).
    bounded("the instances to register again", async {
        while ids(&remote).await.len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let back_after = restarted.elapsed();
    eprintln!(
        "instances registered again {back_after:?} after the registry restarted (heartbeat every 500ms)"
    );
    assert!(
        back_after < Duration::from_millis(1500),
        "registered again after {back_after:?}"
    );
    // When warm-up ends, the client learns that rg-c never came back, and
    // keeps the two that did.
    bounded(
        "the client to drop the instance that never came back",
        async {
            while view.addresses().len() != 2 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    // The persistent instance survived the restart.
    let db = remote
        .instances(&ServiceKey::new("legacy-db"))
        .await
        .unwrap();
    assert_eq!(db.len(), 1);
    assert!(!db[0].ephemeral);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    let (ok, failed) = bounded("the load to stop", load).await.unwrap();
    assert!(
        failed.is_empty(),
        "{} calls failed during the outage: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 100, "only {ok} calls were made");
    drop(second);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_engages_when_most_heartbeats_stop_and_releases_when_they_resume() {
    let registry = registry("127.0.0.1:0", &[]);
    let instance = |i: usize| {
        format!(
            r#"{{"service": "fleet", "address": "10.0.0.{i}:80", "id": "i{i}", "ttl_ms": 1500}}"#
        )
    };
    for i in 0..10 {
        assert_eq!(
            http(
                registry.http,
                "POST",
                "/v1/instances",
                Some(&instance(i)),
                None
            )
            .0,
            201
        );
    }
    let beat = |ids: std::ops::Range<usize>| {
        for i in ids {
            let path = format!("/v1/services/fleet/instances/i{i}/heartbeat");
            assert_eq!(http(registry.http, "PUT", &path, None, None).0, 204, "i{i}");
        }
    };
    let deadline = Instant::now() + TIMEOUT;
    // Two keep beating (every TTL/3); eight stop at once.
    loop {
        beat(0..2);
        if status(registry.http)["self_preservation"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "self-preservation never engaged: {}",
            status(registry.http)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Long past their leases and the grace period, nothing is evicted.
    for _ in 0..8 {
        beat(0..2);
        std::thread::sleep(Duration::from_millis(500));
    }
    let listed: serde_json::Value = serde_json::from_str(
        &http(
            registry.http,
            "GET",
            "/v1/services/fleet/instances",
            None,
            None,
        )
        .1,
    )
    .unwrap();
    assert_eq!(listed["instances"].as_array().unwrap().len(), 10);
    // They come back: it releases.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        beat(0..10);
        if status(registry.http)["self_preservation"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "self-preservation never released: {}",
            status(registry.http)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_reconnects_resumes_without_missing_or_repeating_events() {
    let registry = registry("127.0.0.1:0", &[]);
    let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
    let key = ServiceKey::new("orders");
    let register = |id: &'static str| {
        let remote = remote.clone();
        async move {
            let instance =
                lodestar::Instance::new("orders", format!("10.0.0.1:{}", 8000 + id.len()))
                    .with_id(id);
            remote
                .register(instance, Duration::from_secs(60))
                .await
                .unwrap();
        }
    };
    let mut watch = remote.watch(&key, None).await.unwrap();
    assert!(matches!(
        bounded("snapshot", watch.next()).await.unwrap().unwrap(),
        WatchEvent::Snapshot { .. }
    ));
    register("a").await;
    register("bb").await;
    let mut last = 0;
    for expected in ["a", "bb"] {
        match bounded("a put", watch.next()).await.unwrap().unwrap() {
            WatchEvent::Put { revision, instance } if instance.id == expected => last = revision,
            other => panic!("expected a Put of {expected}, got {other:?}"),
        }
    }
    drop(watch);
    // While disconnected: one more, one less.
    register("ccc").await;
    remote
        .deregister(&lodestar::InstanceKey {
            service: key.clone(),
            id: "a".into(),
        })
        .await
        .unwrap();
    let mut watch = remote.watch(&key, Some(last)).await.unwrap();
    let first = bounded("the first missed event", watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&first, WatchEvent::Put { instance, revision } if instance.id == "ccc" && *revision > last),
        "{first:?}"
    );
    let second = bounded("the second missed event", watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&second, WatchEvent::Delete { id, .. } if id == "a"),
        "{second:?}"
    );
    // Nothing else is pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch.next())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_unauthorized_calls_get_clear_errors_and_change_nothing() {
    let registry = registry("127.0.0.1:0", &["--token", "s3cret"]);
    let before = status(registry.http)["revision"].clone();
    let good = r#"{"service": "svc", "address": "10.0.0.1:80", "ttl_ms": 5000}"#;
    // (method, path, body, token, expected status, what the error says)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        u16,
        &'a str,
    );
    let cases: [Case<'_>; 6] = [
        ("POST", "/v1/instances", Some(good), None, 401, "Bearer"),
        (
            "POST",
            "/v1/instances",
            Some(good),
            Some("wrong"),
            401,
            "Bearer",
        ),
        (
            "POST",
            "/v1/instances",
            Some(r#"{"service": "svc""#),
            Some("s3cret"),
            400,
            "invalid request body",
        ),
        (
            "POST",
            "/v1/instances",
            Some(r#"{"service": "svc", "address": "a:1"}"#),
            Some("s3cret"),
            400,
            "ttl_ms",
        ),
        (
            "POST",
            "/v1/instances",
            Some(r#"{"service": "", "address": "a:1", "ttl_ms": 5}"#),
            Some("s3cret"),
            400,
            "empty service",
        ),
        (
            "PUT",
            "/v1/services/svc/instances/nope/heartbeat",
            None,
            Some("s3cret"),
            404,
            "not registered",
        ),
    ];
    for (method, path, body, token, code, says) in cases {
        let (got, text) = http(registry.http, method, path, body, token);
        assert_eq!(got, code, "{method} {path} {body:?}: {text}");
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(says),
            "{method} {path}: {text}"
        );
    }
    // Over gRPC too.
    let anonymous = RemoteRegistry::new(&[registry.grpc.to_string()]);
    let error = anonymous
        .register(
            lodestar::Instance::new("svc", "10.0.0.1:80"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, lodestar::RegistryError::Unauthorized(_)),
        "{error:?}"
    );
    let authorized = RemoteRegistry::new(&[registry.grpc.to_string()]).with_token("s3cret");
    let error = authorized
        .register(lodestar::Instance::new("svc", ""), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, lodestar::RegistryError::Invalid(m) if m.contains("empty address")),
        "{error:?}"
    );
    assert_eq!(status(registry.http)["revision"], before, "nothing changed");
    // A good write with the token works.
    assert_eq!(
        http(
            registry.http,
            "POST",
            "/v1/instances",
            Some(good),
            Some("s3cret")
        )
        .0,
        201
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_before_its_registry_serves_and_registers_when_it_appears() {
    // A free port for a registry that is not there yet.
    let port = lodestar_tests::free_port();
    let url = format!("lodestar://127.0.0.1:{port}");
    let (child, address) = instance(&url, "early", 1500);
    // It serves already.
    let direct = Client::new(StaticRegistry::new().with(SERVICE_NAME, [address.to_string()]));
    let mut guide = RouteGuideClient::by_name(&direct, SERVICE_NAME);
    assert_eq!(
        bounded("a direct call", served_by(&mut guide))
            .await
            .unwrap(),
        "early"
    );
    child.wait_stderr("waiting for the registry");
    let registry = registry(&format!("127.0.0.1:{port}"), &[]);
    let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
    bounded("the early service to register", async {
        while ids(&remote).await != ["early"] {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_instances_are_health_checked_and_the_protection_threshold_applies() {
    let registry = registry("127.0.0.1:0", &[]);
    let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], lodestar_tests::free_port()));
    for (id, address) in [("db-live", live.local_addr().unwrap()), ("db-dead", dead)] {
        let body = format!(
            r#"{{"service": "db", "id": "{id}", "address": "{address}", "persistent": true, "check": {{"kind": "tcp", "interval_ms": 1000}}}}"#
        );
        assert_eq!(
            http(registry.http, "POST", "/v1/instances", Some(&body), None).0,
            201
        );
    }
    let health = || {
        let listed: serde_json::Value = serde_json::from_str(
            &http(
                registry.http,
                "GET",
                "/v1/services/db/instances",
                None,
                None,
            )
            .1,
        )
        .unwrap();
        let mut health: Vec<(String, bool)> = listed["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_owned(),
                    i["healthy"].as_bool().unwrap(),
                )
            })
            .collect();
        health.sort();
        (health, listed["protected"].as_bool().unwrap())
    };
    let deadline = Instant::now() + TIMEOUT;
    // The check finds the dead one.
    while health().0 != [("db-dead".to_owned(), false), ("db-live".to_owned(), true)] {
        assert!(
            Instant::now() < deadline,
            "health checks never settled: {:?}",
            health()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Below a threshold of 90% healthy, lookups return both, as healthy.
    let protection = r#"{"threshold": 0.9}"#;
    assert_eq!(
        http(
            registry.http,
            "PUT",
            "/v1/services/db/protection",
            Some(protection),
            None
        )
        .0,
        204
    );
    assert_eq!(
        health(),
        (
            vec![("db-dead".to_owned(), true), ("db-live".to_owned(), true)],
            true
        )
    );
    let (code, text) = http(
        registry.http,
        "PUT",
        "/v1/services/db/protection",
        Some(r#"{"threshold": 2}"#),
        None,
    );
    assert_eq!(code, 400, "{text}");
    drop(live);
}

/// A RouteGuide client in a process of its own (this test binary, run as
/// `child_client`), on the registry `url` (with its `snapshot=`): it makes
/// three calls, says whether the service is stale, saves, and exits.
fn client(url: &str) -> Proc {
    let mut command = child_process("child_client");
    command.env("LODESTAR_CLIENT_REGISTRY", url);
    Proc::spawn(command)
}

/// Runs as a separate process for the tests above; does nothing otherwise.
#[test]
#[ignore = "a RouteGuide client the registry tests start as a separate process"]
fn child_client() {
    let Ok(url) = std::env::var("LODESTAR_CLIENT_REGISTRY") else {
        return;
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("warn,lodestar_registry=info")
        .init();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let registry = SnapshotRegistry::from_url(&url).unwrap();
        // Not the default 5 s: a client with nothing to call gives up sooner.
        let client = Client::builder(registry.clone())
            .resolve_timeout(Duration::from_secs(1))
            .build();
        let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
        for _ in 0..3 {
            match served_by(&mut guide).await {
                Ok(by) => println!("client served by {by}"),
                Err(status) => println!("client call failed: {status}"),
            }
        }
        let stale = registry.is_stale(&ServiceKey::new(SERVICE_NAME));
        println!("client stale: {stale}");
        match registry.save().await {
            Ok(()) => println!("client saved: ok"),
            Err(error) => println!("client saved: {error}"),
        }
    });
}

/// The ids of the RouteGuide instances in the snapshot file at `path`.
fn ids_in_snapshot(path: &std::path::Path) -> Vec<String> {
    let snapshot: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut ids: Vec<String> = snapshot["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["service"]["service"] == SERVICE_NAME)
        .flat_map(|s| s["instances"].as_array().unwrap().iter())
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_started_while_the_registry_is_down_calls_the_instances_of_its_snapshot() {
    let dir = std::env::temp_dir().join(format!(
        "lodestar-snapshot-test-{}",
        lodestar_tests::unique_name()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("registry.snapshot");
    let first = registry("127.0.0.1:0", &[]);
    let grpc = first.grpc;
    let (_a, _) = instance(&first.url(), "rg-a", 1500);
    let url = format!("{}?snapshot={}", first.url(), path.display());

    // A corrupt snapshot: a warning, then calls go as without one, and the
    // client saves a good snapshot over it.
    std::fs::write(&path, br#"{"format": "lodestar-registry-snap"#).unwrap();
    let writer = client(&url);
    assert_eq!(writer.line("client served by"), "rg-a");
    assert_eq!(writer.line("client stale:"), "false");
    assert_eq!(writer.line("client saved:"), "ok");
    writer.wait_stderr("is corrupt");
    assert_eq!(ids_in_snapshot(&path), ["rg-a"]);
    // The same snapshot, as if saved from another registry.
    let foreign = dir.join("foreign.snapshot");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &foreign,
        text.replace(&format!("lodestar://{grpc}"), "lodestar://10.9.9.9:7070"),
    )
    .unwrap();

    first.proc.kill();
    // A new client process, started while the registry is down, calls the
    // instance its snapshot names, and says the view is stale.
    let reader = client(&url);
    for _ in 0..3 {
        assert_eq!(reader.line("client served by"), "rg-a");
    }
    assert_eq!(reader.line("client stale:"), "true");
    reader.wait_stderr("serving the instances of the snapshot");
    // A foreign snapshot is ignored: that client has nothing to call.
    let foreign_url = format!("lodestar://{grpc}?snapshot={}", foreign.display());
    let ignorer = client(&foreign_url);
    assert!(
        ignorer
            .line("client call failed:")
            .contains("did not list its instances"),
        "stderr:\n{}",
        ignorer.stderr()
    );
    assert_eq!(ignorer.line("client stale:"), "false");
    ignorer.wait_stderr("saved from the registry `lodestar://10.9.9.9:7070`");

    // In this process too: a new instance, calls from the snapshot...
    let snapshotted = SnapshotRegistry::from_url(&url).unwrap();
    let key = ServiceKey::new(SERVICE_NAME);
    let client = Client::new(snapshotted.clone());
    let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
    let started = Instant::now();
    assert_eq!(
        bounded("a call from the snapshot", served_by(&mut guide))
            .await
            .unwrap(),
        "rg-a"
    );
    eprintln!(
        "first call from the snapshot, registry down: {:?}",
        started.elapsed()
    );
    assert!(snapshotted.is_stale(&key));
    // ...until the registry is back: then its live view replaces the
    // snapshot's, and changes flow again (and reach the file).
    let second = registry(&grpc.to_string(), &[]);
    let restarted = Instant::now();
    bounded("the registry to answer", async {
        while snapshotted.is_stale(&key) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    eprintln!(
        "live view replaced the snapshot {:?} after the registry restarted",
        restarted.elapsed()
    );
    let (_b, _) = instance(&second.url(), "rg-b", 1500);
    let view = client.channel(SERVICE_NAME);
    bounded("the client to see rg-b", async {
        while view.addresses().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    bounded("the snapshot to list rg-b", async {
        while ids_in_snapshot(&path) != ["rg-a", "rg-b"] {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

mod etcd {
    use super::*;
    use lodestar_tests::etcd::{Etcd, cluster, ready, url};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn services_in_other_processes_are_found_through_etcd_and_a_killed_one_vanishes() {
        let server = Etcd::single();
        ready(std::slice::from_ref(&server)).await;
        let (a, _) = instance(&server.url(), "rg-a", 1000);
        let (_b, _) = instance(&server.url(), "rg-b", 1000);
        let registry = lodestar_etcd::EtcdRegistry::from_url(&server.url()).unwrap();
        assert_eq!(ids(&registry).await, ["rg-a", "rg-b"]);
        let client = Client::new(registry.clone());
        let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            seen.insert(bounded("a call", served_by(&mut guide)).await.unwrap());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["rg-a", "rg-b"]);
        cli_sees_two_healthy_instances(&server.url());

        let key = ServiceKey::new(SERVICE_NAME);
        let mut watch = registry.watch(&key, None).await.unwrap();
        bounded("the snapshot", watch.next()).await;
        a.kill(); // SIGKILL: its lease runs out in etcd
        let killed = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                bounded("a call", served_by(&mut guide)).await.unwrap(),
                "rg-b"
            );
        }
        loop {
            if let WatchEvent::Delete { id, .. } = bounded("the key to vanish", watch.next())
                .await
                .unwrap()
                .unwrap()
                && id == "rg-a"
            {
                break;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "vanished after {:?}",
            killed.elapsed()
        );
        assert_eq!(ids(&registry).await, ["rg-b"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instance_whose_lease_ran_out_during_a_pause_registers_again() {
        let server = Etcd::single();
        ready(std::slice::from_ref(&server)).await;
        let (paused, _) = instance(&server.url(), "rg-paused", 1000);
        let registry = lodestar_etcd::EtcdRegistry::from_url(&server.url()).unwrap();
        assert_eq!(ids(&registry).await, ["rg-paused"]);
        let pid = paused.child.id().to_string();
        let signal = |name: &str| {
            assert!(
                Command::new("kill")
                    .args([name, &pid])
                    .status()
                    .unwrap()
                    .success()
            );
        };
        // A long pause (a stop-the-world stall, a frozen VM): the lease runs out.
        signal("-STOP");
        bounded("the lease to run out", async {
            while !ids(&registry).await.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        // It wakes up, finds its lease gone, and registers again with a new one.
        signal("-CONT");
        bounded("the instance to register again", async {
            while ids(&registry).await != ["rg-paused"] {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        drop(paused);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_go_on_while_etcd_restarts_and_instances_stay_registered() {
        let mut server = Etcd::single();
        ready(std::slice::from_ref(&server)).await;
        let (_a, _) = instance(&server.url(), "rg-a", 1500);
        let (_b, _) = instance(&server.url(), "rg-b", 1500);
        let registry = lodestar_etcd::EtcdRegistry::from_url(&server.url()).unwrap();
        let client = Client::new(registry.clone());
        let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
        bounded("a first call", served_by(&mut guide))
            .await
            .unwrap();
        let (stop_tx, load) = steady_load(guide);
        server.kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        server.restart();
        ready(std::slice::from_ref(&server)).await;
        bounded("both instances to be registered after the restart", async {
            while ids(&registry).await != ["rg-a", "rg-b"] {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let _ = stop_tx.send(true);
        let (ok, failed) = bounded("the load to stop", load).await.unwrap();
        assert!(
            failed.is_empty(),
            "{} calls failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        assert!(ok > 100, "only {ok} calls were made");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_three_member_cluster_loses_its_leader_and_nothing_is_lost() {
        let mut members = cluster(3);
        ready(&members).await;
        let all = url(&members);
        let (_a, _) = instance(&all, "rg-a", 1500);
        let registry = lodestar_etcd::EtcdRegistry::from_url(&all).unwrap();
        assert_eq!(ids(&registry).await, ["rg-a"]);

        // Find the leader, and stop it.
        let mut leader = None;
        for (index, member) in members.iter().enumerate() {
            let alone = lodestar_etcd::EtcdRegistry::from_url(&member.url()).unwrap();
            let (leader_id, member_id) = alone.status().await.unwrap();
            if leader_id == member_id {
                leader = Some(index);
            }
        }
        let leader = leader.expect("the cluster has a leader");
        members[leader].kill();

        // The registration survives, and the backend fails over: lookups,
        // heartbeats and new registrations go to the members left.
        bounded("a registration through the remaining members", async {
            loop {
                let instance =
                    lodestar::Instance::new(SERVICE_NAME, "10.9.9.9:1").with_id("rg-late");
                if registry
                    .register(instance, Duration::from_secs(30))
                    .await
                    .is_ok()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert_eq!(ids(&registry).await, ["rg-a", "rg-late"]);
        // rg-a keeps heartbeating through the others: still there after several leases.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(ids(&registry).await, ["rg-a", "rg-late"]);
    }
}

/// `lodestar publish` and `lodestar subscribe` as processes of their own.
mod events {
    use super::*;
    use lodestar_tests::nats::Nats;

    /// `lodestar subscribe …`, once it has subscribed.
    fn subscriber(args: &[&str]) -> Proc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
        command
            .arg("subscribe")
            .args(args)
            .env_remove("LODESTAR_BROKER");
        let proc = Proc::spawn(command);
        let deadline = Instant::now() + TIMEOUT;
        while !proc.stderr().contains("subscribed to") {
            assert!(
                Instant::now() < deadline,
                "not subscribed; stderr:\n{}",
                proc.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        proc
    }

    /// `lodestar publish …`: its exit status and standard error.
    fn publish(args: &[&str]) -> (bool, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
        command
            .arg("publish")
            .args(args)
            .env_remove("LODESTAR_BROKER");
        let output = lodestar_tests::run_bounded(command, TIMEOUT);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn json_line(proc: &Proc) -> serde_json::Value {
        serde_json::from_str(&format!("{{{}", proc.line("{")))
            .unwrap_or_else(|_| panic!("not JSON; stderr:\n{}", proc.stderr()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cli_publishes_and_subscribes_over_nats_alongside_plain_clients() {
        let server = Nats::start().await;
        let url = server.url();
        let sub = subscriber(&["orders.created", "--broker", &url, "--count", "2"]);
        let (ok, stderr) = publish(&[
            "orders.created",
            "order 7",
            "--broker",
            &url,
            "--header",
            "x-region=eu",
        ]);
        assert!(ok, "{stderr}");
        // A plain NATS client publishes too.
        let plain = async_nats::connect(url.as_str()).await.unwrap();
        plain
            .publish("orders.created", "from plain".into())
            .await
            .unwrap();
        plain.flush().await.unwrap();

        let first = json_line(&sub);
        assert_eq!(first["topic"], "orders.created");
        assert_eq!(first["body"]["text"], "order 7");
        assert_eq!(first["headers"]["x-region"], "eu");
        assert_eq!(first["headers"]["content-type"], "text/plain");
        assert_eq!(first["headers"]["message-id"].as_str().unwrap().len(), 32);
        let second = json_line(&sub);
        assert_eq!(second["body"]["text"], "from plain");

        // The plain client sees what the CLI publishes, headers included.
        let mut plain_sub = plain.subscribe("orders.shipped").await.unwrap();
        plain.flush().await.unwrap();
        let (ok, stderr) = publish(&["orders.shipped", "box 3", "--broker", &url]);
        assert!(ok, "{stderr}");
        let got = bounded("the plain subscriber", plain_sub.next())
            .await
            .unwrap();
        assert_eq!(&got.payload[..], b"box 3");
        assert!(got.headers.unwrap().get("message-id").is_some());

        // Bad input: clear errors, nonzero exit.
        let (ok, stderr) = publish(&["orders.*", "x", "--broker", &url]);
        assert!(!ok && stderr.contains("topic `orders.*`"), "{stderr}");
        let (ok, stderr) = publish(&["t", "x", "--broker", "nats://127.0.0.1:1"]);
        assert!(!ok && stderr.contains("cannot connect"), "{stderr}");
        let (ok, stderr) = publish(&["t", "x", "--broker", "kafka://h:1"]);
        assert!(
            !ok && stderr.contains("expected a URL starting with memory://"),
            "{stderr}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_subscriber_killed_mid_batch_loses_nothing() {
        use lodestar::Broker;
        use lodestar::broker::{Durable, Message, SubscribeOptions};
        let server = Nats::start().await;
        let url = server.url();
        // A subscriber process that acks three deliveries and holds three
        // more unacked when it is killed.
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--exact",
                "events::child_durable_subscriber",
                "--ignored",
                "--nocapture",
            ])
            .env("LODESTAR_CHILD_NATS", &url);
        let crashing = Proc::spawn(command);
        crashing.line("child subscribed");
        let broker = lodestar_broker::NatsBroker::connect(&url).await.unwrap();
        for i in 0..10 {
            broker
                .publish(Message::new("js.batch", i.to_string()))
                .await
                .unwrap();
        }
        let acked: Vec<String> = (0..3).map(|_| crashing.line("acked")).collect();
        let held: Vec<String> = (0..3).map(|_| crashing.line("holding")).collect();
        crashing.kill();
        // Another member of the durable gets everything not acked, the held
        // ones included, once their ack wait runs out.
        let mut survivor = broker
            .subscribe(
                "js.batch",
                // Members of one durable share its settings (others would
                // update the consumer for all of them).
                SubscribeOptions::durable(Durable::new("ledger").ack_wait(Duration::from_secs(1))),
            )
            .await
            .unwrap();
        let mut rest = std::collections::BTreeSet::new();
        while rest.len() < 7 {
            let delivery = bounded("a redelivery", survivor.next()).await.unwrap();
            let body = String::from_utf8_lossy(&delivery.message.body).into_owned();
            assert!(
                !acked.contains(&body),
                "{body} was acked, yet delivered again"
            );
            delivery.ack().await.unwrap();
            rest.insert(body);
        }
        for body in &held {
            assert!(
                rest.contains(body),
                "{body} was held by the killed subscriber and lost"
            );
        }
        let mut all: std::collections::BTreeSet<String> = rest;
        all.extend(acked);
        assert_eq!(all, (0..10).map(|i| i.to_string()).collect());
    }

    /// Runs as a separate process for the test above; does nothing otherwise.
    #[test]
    #[ignore = "a durable NATS subscriber the broker tests start as a separate process"]
    fn child_durable_subscriber() {
        use lodestar::Broker;
        use lodestar::broker::{Durable, SubscribeOptions};
        let Ok(url) = std::env::var("LODESTAR_CHILD_NATS") else {
            return;
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let broker = lodestar_broker::NatsBroker::connect(&url).await.unwrap();
            let durable = Durable::new("ledger").ack_wait(Duration::from_secs(1));
            let mut subscription = broker
                .subscribe("js.batch", SubscribeOptions::durable(durable))
                .await
                .unwrap();
            println!("child subscribed");
            let mut held = Vec::new();
            for i in 0..6 {
                let delivery = subscription.next().await.unwrap();
                let body = String::from_utf8_lossy(&delivery.message.body).into_owned();
                if i < 3 {
                    delivery.ack().await.unwrap();
                    println!("acked {body}");
                } else {
                    println!("holding {body}");
                    held.push(delivery);
                }
            }
            std::future::pending::<()>().await;
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_http_broker_works_across_processes_and_reports_dead_queue_groups() {
        let registry = registry("127.0.0.1:0", &[]);
        let url = registry.url();
        let http = ["--broker", "http://", "--registry", url.as_str()];
        let args = |topic: &'static str, extra: &[&'static str]| -> Vec<&str> {
            let mut args = vec![topic];
            args.extend_from_slice(&http);
            args.extend_from_slice(extra);
            args
        };
        let worker = subscriber(&args("jobs", &["--queue", "workers"]));
        let watcher_a = subscriber(&args("jobs", &[]));
        let watcher_b = subscriber(&args("jobs", &[]));
        let (ok, stderr) = publish(&args("jobs", &["first"]));
        assert!(ok, "{stderr}");
        for proc in [&worker, &watcher_a, &watcher_b] {
            assert_eq!(json_line(proc)["body"]["text"], "first");
        }

        // A broadcast subscriber that died (still registered: its lease has
        // not run out) is skipped; the live one still gets the message.
        watcher_a.kill();
        let (ok, stderr) = publish(&args("jobs", &["second"]));
        assert!(ok, "{stderr}");
        assert_eq!(json_line(&watcher_b)["body"]["text"], "second");
        assert_eq!(json_line(&worker)["body"]["text"], "second");

        // The queue group's only member died: the publisher is told.
        worker.kill();
        let (ok, stderr) = publish(&args("jobs", &["third"]));
        assert!(!ok, "publishing to a dead queue group succeeded");
        assert!(
            stderr.contains("no subscriber of queue group `workers`"),
            "{stderr}"
        );
        // The broadcast subscriber still got it.
        assert_eq!(json_line(&watcher_b)["body"]["text"], "third");
    }
}

/// Tokens scoped to namespaces, TLS, and the bounds of the HTTP API.
mod auth {
    use super::*;
    use lodestar::RegistryError;
    use std::path::{Path, PathBuf};

    const SECRET_A: &str = "tenant-a-s3cret-9f2c";
    const SECRET_B: &str = "tenant-b-s3cret-41d7";

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "lodestar-registry-auth-{}",
            lodestar_tests::unique_name()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A tokens file: `tenant-a` may write namespace `a`, `tenant-b` namespace `b`.
    fn tenants(dir: &Path) -> String {
        let path = dir.join("tokens.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"tokens": [
                    {{"name": "tenant-a", "secret": "{SECRET_A}", "namespaces": ["a"], "access": "write"}},
                    {{"name": "tenant-b", "secret": "{SECRET_B}", "namespaces": ["b"], "access": "write"}}
                ]}}"#
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_owned()
    }

    fn orders_in(namespace: &str, id: &str) -> lodestar::Instance {
        lodestar::Instance::new("orders", "10.0.0.2:80")
            .with_service_key(ServiceKey::new("orders").with_namespace(namespace))
            .with_id(id)
    }

    fn said_no_secret(text: &str) {
        assert!(
            !text.contains(SECRET_A) && !text.contains(SECRET_B),
            "a token leaked: {text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_token_can_neither_see_nor_change_another_namespace_over_either_api() {
        let dir = temp_dir();
        let mut command = registry_command("127.0.0.1:0", &["--tokens", &tenants(&dir)]);
        command.env("RUST_LOG", "debug");
        let registry = start_registry(command);
        let grpc = [registry.grpc.to_string()];
        let a = RemoteRegistry::new(&grpc).with_token(SECRET_A);
        let b = RemoteRegistry::new(&grpc).with_token(SECRET_B);
        let ttl = Duration::from_secs(30);

        // Each tenant works in its own namespace, over both APIs.
        b.register(orders_in("b", "b-grpc"), ttl).await.unwrap();
        let in_b = r#"{"service": "orders", "namespace": "b", "address": "10.0.0.3:80", "id": "b-http", "ttl_ms": 30000}"#;
        let (code, text) = http(
            registry.http,
            "POST",
            "/v1/instances",
            Some(in_b),
            Some(SECRET_B),
        );
        assert_eq!(code, 201, "{text}");
        a.register(orders_in("a", "a-1"), ttl).await.unwrap();
        assert_eq!(a.services("a").await.unwrap().len(), 1);
        let (code, text) = http(
            registry.http,
            "GET",
            "/v1/services?namespace=a",
            None,
            Some(SECRET_A),
        );
        assert_eq!(code, 200, "{text}");

        // Tenant A can neither list, read, watch, register, renew nor
        // deregister anything in b over gRPC...
        let orders_b = ServiceKey::new("orders").with_namespace("b");
        let b_grpc = orders_in("b", "b-grpc").instance_key();
        let errors = [
            a.services("b").await.unwrap_err(),
            a.instances(&orders_b).await.unwrap_err(),
            a.watch(&orders_b, None).await.err().unwrap(),
            a.register(orders_in("b", "intruder"), ttl)
                .await
                .unwrap_err(),
            a.heartbeat(&b_grpc).await.unwrap_err(),
            a.deregister(&b_grpc).await.unwrap_err(),
        ];
        for error in &errors {
            assert!(
                matches!(error, RegistryError::Unauthorized(m)
                    if m.contains("token `tenant-a`") && m.contains("namespace `b`")),
                "{error:?}"
            );
            said_no_secret(&error.to_string());
        }
        // ... nor over HTTP.
        let intruder = r#"{"service": "orders", "namespace": "b", "address": "10.0.0.9:80", "id": "intruder", "ttl_ms": 30000}"#;
        for (method, path, body) in [
            ("GET", "/v1/services?namespace=b", None),
            ("GET", "/v1/services/orders/instances?namespace=b", None),
            ("POST", "/v1/instances", Some(intruder)),
            (
                "PUT",
                "/v1/services/orders/instances/b-http/heartbeat?namespace=b",
                None,
            ),
            (
                "PUT",
                "/v1/services/orders/instances/b-http/enabled?namespace=b",
                Some(r#"{"enabled": false}"#),
            ),
            (
                "DELETE",
                "/v1/services/orders/instances/b-http?namespace=b",
                None,
            ),
            (
                "PUT",
                "/v1/services/orders/protection?namespace=b",
                Some(r#"{"threshold": 1}"#),
            ),
        ] {
            let (code, text) = http(registry.http, method, path, body, Some(SECRET_A));
            assert_eq!(code, 403, "{method} {path}: {text}");
            let error: serde_json::Value = serde_json::from_str(&text).unwrap();
            let error = error["error"].as_str().unwrap();
            assert!(
                error.contains("token `tenant-a`") && error.contains("namespace `b`"),
                "{method} {path}: {error}"
            );
            said_no_secret(error);
        }
        // Without a token, or with one the registry does not know, nothing
        // is readable either (no --open-reads).
        for token in [None, Some("not-a-token")] {
            let (code, text) = http(
                registry.http,
                "GET",
                "/v1/services?namespace=b",
                None,
                token,
            );
            assert_eq!(code, 401, "{token:?}: {text}");
            assert!(!text.contains("not-a-token"), "{text}");
        }
        let anonymous = RemoteRegistry::new(&grpc);
        assert!(matches!(
            anonymous.instances(&orders_b).await,
            Err(RegistryError::Unauthorized(_))
        ));

        // What B registered is all there, untouched.
        let instances = b.instances(&orders_b).await.unwrap();
        let mut ids: Vec<_> = instances.iter().map(|i| i.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["b-grpc", "b-http"]);
        assert!(instances.iter().all(|i| i.enabled && i.healthy));

        // The CLI takes its token from LODESTAR_REGISTRY_TOKEN.
        let services_in_b = |token: &str| {
            let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
            command
                .args(["services", "--namespace", "b", "--output", "json"])
                .args(["--registry", &registry.url()])
                .env("LODESTAR_REGISTRY_TOKEN", token);
            lodestar_tests::run_bounded(command, TIMEOUT)
        };
        let refused = services_in_b(SECRET_A);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert!(stderr.contains("namespace `b`"), "{stderr}");
        said_no_secret(&stderr);
        let listed = services_in_b(SECRET_B);
        assert!(listed.status.success(), "{listed:?}");
        let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
        assert_eq!(listed["services"][0]["service"], "orders");

        // The registry's own log (at debug) names tokens, never their secrets.
        let log = registry.proc.stderr();
        assert!(log.contains("tenant-a"), "the log was captured: {log}");
        said_no_secret(&log);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// `GET path` over HTTPS, trusting `ca`, presenting `identity` if given.
    fn https(
        address: SocketAddr,
        ca: &str,
        identity: Option<(&str, &str)>,
        path: &str,
    ) -> std::io::Result<(u16, String)> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(cert)
                        .unwrap()
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_file(key).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        // What curl offers.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(address)?;
        tcp.set_read_timeout(Some(TIMEOUT))?;
        let mut tls = rustls::StreamOwned::new(connection, tcp);
        write!(
            tls,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        tls.read_to_end(&mut response)?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let code = response
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response}")))?;
        Ok((code, response))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_registry_its_services_clients_and_the_cli_work_over_tls_and_mutual_tls() {
        let dir = temp_dir();
        let mut cert = Command::new(env!("CARGO_BIN_EXE_lodestar"));
        cert.args(["cert", "--out", dir.to_str().unwrap()]);
        assert!(lodestar_tests::run_bounded(cert, TIMEOUT).status.success());
        let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        let (ca, server_cert, server_key) =
            (file("ca.pem"), file("server.pem"), file("server.key"));
        let (client_cert, client_key) = (file("client.pem"), file("client.key"));
        for mutual in [false, true] {
            let mut flags = vec!["--tls-cert", &server_cert, "--tls-key", &server_key];
            if mutual {
                flags.extend(["--tls-client-ca", &ca]);
            }
            let registry = registry("127.0.0.1:0", &flags);
            let mut url = format!("lodestars://{}?ca={ca}", registry.grpc);
            if mutual {
                url.push_str(&format!("&cert={client_cert}&key={client_key}"));
            }
            // A service registers over TLS, and a client finds and calls it by name.
            let (_a, _) = instance(&url, "rg-a", 3000);
            let (_b, _) = instance(&url, "rg-b", 3000);
            let remote = lodestar_registry::from_url(&url).unwrap();
            assert_eq!(ids(&*remote).await, ["rg-a", "rg-b"], "mutual: {mutual}");
            let client = Client::new(remote);
            let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
            bounded("a call", served_by(&mut guide)).await.unwrap();
            // The CLI too.
            cli_sees_two_healthy_instances(&url);
            // The HTTP API serves HTTPS, on the same certificates.
            let identity = mutual.then_some((client_cert.as_str(), client_key.as_str()));
            let (code, text) = https(registry.http, &ca, identity, "/v1/status").unwrap();
            assert_eq!(code, 200, "{text}");
            // Plaintext is refused.
            let plain = RemoteRegistry::new(&[registry.grpc.to_string()]);
            assert!(plain.services("default").await.is_err());
            if mutual {
                // Without a client certificate: refused, over both APIs.
                let no_cert = format!("lodestars://{}?ca={ca}", registry.grpc);
                let no_cert = lodestar_registry::from_url(&no_cert).unwrap();
                assert!(no_cert.services("default").await.is_err());
                let refused = https(registry.http, &ca, None, "/v1/status");
                assert!(refused.is_err(), "{refused:?}");
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The resident memory of process `pid`, in KiB.
    fn rss_kib(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_without_a_valid_token_is_refused_before_its_body_is_read() {
        let registry = registry("127.0.0.1:0", &["--token", "s3cret"]);
        let head = |token: Option<&str>| {
            let auth = token
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            format!(
                "POST /v1/instances HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 2097152\r\n\r\n"
            )
        };
        // Headers announcing 2 MB, and no body: the answer comes without
        // waiting for it (a token that may write gets 413: over the limit).
        for (token, code) in [
            (None, "401"),
            (Some("wrong"), "401"),
            (Some("s3cret"), "413"),
        ] {
            let mut stream = TcpStream::connect(registry.http).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream.write_all(head(token).as_bytes()).unwrap();
            let mut response = [0u8; 12];
            stream
                .read_exact(&mut response)
                .unwrap_or_else(|e| panic!("{token:?}: no answer without the body: {e}"));
            assert_eq!(&response[9..12], code.as_bytes(), "{token:?}");
        }
        // Many callers sending big bodies cost the server nothing it keeps.
        let pid = registry.proc.child.id();
        let before = rss_kib(pid);
        let body = vec![b' '; 1 << 20];
        let mut streams = Vec::new();
        for _ in 0..64 {
            let mut stream = TcpStream::connect(registry.http).unwrap();
            stream
                .set_write_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            stream.write_all(head(None).as_bytes()).unwrap();
            // Fails once the server has answered and closed: that is the point.
            let _ = stream.write_all(&body);
            streams.push(stream);
        }
        let after = rss_kib(pid);
        assert!(
            after < before + 16 * 1024,
            "resident memory grew from {before} KiB to {after} KiB"
        );
    }

    /// Reads until the server closes the connection (or `TIMEOUT`): what it
    /// sent, and how long that took.
    fn until_closed(stream: &mut TcpStream) -> (String, Duration) {
        let started = Instant::now();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the connection stayed open {:?}: {e}", started.elapsed()),
            }
        }
        (
            String::from_utf8_lossy(&received).into_owned(),
            started.elapsed(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_sent_headers_and_idle_connections_are_closed_after_the_header_timeout() {
        let registry = registry("127.0.0.1:0", &["--header-timeout", "500ms"]);
        let mut half = TcpStream::connect(registry.http).unwrap();
        half.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let (_, took) = until_closed(&mut half);
        assert!(took >= Duration::from_millis(400), "closed after {took:?}");
        // A kept-alive connection idle after its request, likewise.
        let mut idle = TcpStream::connect(registry.http).unwrap();
        idle.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (response, _) = until_closed(&mut idle);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_http_limit_are_closed_and_the_grpc_api_still_answers() {
        let mut command = registry_command("127.0.0.1:0", &["--http-max-connections", "4"]);
        command.env("RUST_LOG", "info");
        let registry = start_registry(command);
        let mut held: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(registry.http).unwrap())
            .collect();
        // Accepted in order: the fifth is past the limit.
        let mut fifth = TcpStream::connect(registry.http).unwrap();
        let _ = fifth.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (response, _) = until_closed(&mut fifth);
        assert_eq!(response, "", "served past the limit");
        // The gRPC API answers all the while.
        let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
        bounded("a gRPC call", remote.services("default"))
            .await
            .unwrap();
        // A freed slot serves again (once the server has seen it close).
        held.pop();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut stream = TcpStream::connect(registry.http).unwrap();
            let _ = stream
                .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            if until_closed(&mut stream).0.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(Instant::now() < deadline, "no slot came free");
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = registry.proc.stderr();
        assert!(log.contains("connection limit"), "{log}");
        assert!(log.contains("open-file limit"), "{log}");
        drop(held);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_instances_by_health_watchers_events_and_http_durations_as_the_cli_sees_them()
{
    let registry = registry("127.0.0.1:0", &[]);
    let register = |id: &str, ttl_ms: u64| {
        let body = format!(
            r#"{{"service": "shop", "id": "{id}", "address": "127.0.0.1:9", "ttl_ms": {ttl_ms}}}"#
        );
        let (code, answer) = http(registry.http, "POST", "/v1/instances", Some(&body), None);
        assert_eq!(code, 201, "{answer}");
    };
    let remote = RemoteRegistry::new(&[registry.grpc.to_string()]);
    let shop = ServiceKey::new("shop");
    let mut watch = bounded("a watch", remote.watch(&shop, None)).await.unwrap();
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Snapshot { .. }
    ));
    register("stays", 60_000);
    register("goes", 600);
    for _ in 0..2 {
        assert!(matches!(
            next_event(&mut watch).await,
            WatchEvent::Put { .. }
        ));
    }
    let (code, _) = http(
        registry.http,
        "PUT",
        "/v1/services/shop/instances/stays/heartbeat",
        None,
        None,
    );
    assert_eq!(code, 204);
    let (code, _) = http(registry.http, "GET", "/no/such/api/7", None, None);
    assert_eq!(code, 404);
    // "goes" misses its heartbeats: marked unhealthy (the watch says so).
    match next_event(&mut watch).await {
        WatchEvent::Put { instance, .. } => assert!(instance.id == "goes" && !instance.healthy),
        other => panic!("expected goes to turn unhealthy, got {other:?}"),
    }

    let scrape = || {
        let response = Primed::send(registry.http, "GET", "/metrics", None, None).complete_whole();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains(&format!(
                "content-type: {}",
                lodestar::metrics::CONTENT_TYPE
            )),
            "{head}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        body.to_owned()
    };
    let text = scrape();
    let instances = |status: &str| {
        sample(
            &text,
            &format!(
                r#"lodestar_registry_instances{{namespace="default",group="default",service="shop",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(
        (instances("healthy"), instances("unhealthy")),
        (Some(1.0), Some(1.0)),
        "{text}"
    );
    assert_eq!(
        sample(&text, "lodestar_registry_watchers"),
        Some(1.0),
        "{text}"
    );
    let event = |text: &str, kind: &str| {
        sample(
            text,
            &format!(r#"lodestar_registry_events_total{{type="{kind}"}}"#),
        )
    };
    assert_eq!(event(&text, "registered"), Some(2.0), "{text}");
    assert_eq!(event(&text, "expired"), Some(1.0), "{text}");
    assert_eq!(event(&text, "evicted"), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "lodestar_registry_heartbeats_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "lodestar_registry_self_preservation"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "lodestar_registry_self_preservation_threshold_ratio"),
        Some(0.5),
        "{text}"
    );
    // Durations by route template, never by the ids in the path; every
    // path no route matches is one series.
    let requests = |method: &str, route: &str, code: u16| {
        sample(
            &text,
            &format!(
                r#"http_server_request_duration_seconds_count{{http_request_method="{method}",http_route="{route}",http_response_status_code="{code}"}}"#
            ),
        )
    };
    assert_eq!(requests("POST", "/v1/instances", 201), Some(2.0), "{text}");
    assert_eq!(
        requests(
            "PUT",
            "/v1/services/{service}/instances/{id}/heartbeat",
            204
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(requests("GET", "_OTHER", 404), Some(1.0), "{text}");
    assert!(!text.contains("stays/heartbeat"), "{text}");
    // The gRPC API's calls show on the same port.
    assert!(
        text.contains(r#"rpc_method="lodestar.registry.v1.Registry/Watch""#),
        "{text}"
    );

    // The CLI sees what the gauge says.
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    command.args([
        "services",
        "--registry",
        &registry.url(),
        "--output",
        "json",
    ]);
    let output = lodestar_tests::run_bounded(command, TIMEOUT);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed["services"][0]["service"], "shop");
    assert_eq!(listed["services"][0]["instances"], 2);
    assert_eq!(listed["services"][0]["healthy"], 1);

    // Evicted after the grace (the watch says so); the watch closed, no watchers.
    match next_event(&mut watch).await {
        WatchEvent::Delete { id, .. } => assert_eq!(id, "goes"),
        other => panic!("expected goes to be evicted, got {other:?}"),
    }
    drop(watch);
    let deadline = Instant::now() + TIMEOUT;
    let text = loop {
        // The server learns that the watch closed when the stream's reset
        // reaches it.
        let text = scrape();
        if sample(&text, "lodestar_registry_watchers") == Some(0.0) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        sample(&text, "lodestar_registry_watchers"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(event(&text, "evicted"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"lodestar_registry_instances{namespace="default",group="default",service="shop",status="unhealthy"}"#
        ),
        Some(0.0),
        "{text}"
    );

    // Liveness and readiness, open to all.
    assert_eq!(http(registry.http, "GET", "/healthz", None, None).0, 200);
    let (code, ready) = http(registry.http, "GET", "/readyz", None, None);
    assert_eq!(code, 200, "{ready}");
    assert!(ready.contains(r#""ready":true"#), "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_cache_ages_while_the_registry_is_down_and_its_watch_reconnects_are_counted() {
    let first = registry("127.0.0.1:0", &[]);
    let grpc = first.grpc;
    let metrics = lodestar::metrics::Metrics::new();
    let remote = RemoteRegistry::new(&[grpc.to_string()]).with_metrics(&metrics);
    let shop = ServiceKey::new("shop");
    let mut follow = lodestar_core::registry::Follow::new(std::sync::Arc::new(remote), shop);
    bounded("the first snapshot", follow.next()).await.unwrap();
    let age_series = r#"lodestar_registry_client_cache_age_seconds{namespace="default",group="default",service="shop"}"#;
    let reconnects = "lodestar_registry_client_watch_reconnects_total";
    let text = metrics.encode();
    assert_eq!(sample(&text, age_series), Some(0.0), "{text}");
    assert_eq!(sample(&text, reconnects), Some(0.0), "{text}");

    // The registry goes away: the watch breaks, and the cache ages.
    first.proc.kill();
    assert!(bounded("the watch to break", follow.next()).await.is_err());
    let before = sample(&metrics.encode(), age_series).unwrap();
    // Time has to pass for an age to grow.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = metrics.encode();
    let after = sample(&text, age_series).unwrap();
    assert!(after >= before + 0.25, "{before} then {after}: {text}");
    assert_eq!(sample(&text, reconnects), Some(0.0), "{text}");

    // It comes back on the same address: the watch reconnects (counted
    // once), and the cache is current again.
    let second = registry(&grpc.to_string(), &[]);
    let body = r#"{"service": "shop", "id": "a", "address": "127.0.0.1:9", "ttl_ms": 60000}"#;
    assert_eq!(
        http(second.http, "POST", "/v1/instances", Some(body), None).0,
        201
    );
    let deadline = Instant::now() + TIMEOUT;
    loop {
        // Errors while the watch retries, then the registry's events.
        if let Ok(known) = bounded("a watch answer", follow.next()).await
            && known.contains_key("a")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the watch never came back");
    }
    let text = metrics.encode();
    assert_eq!(sample(&text, reconnects), Some(1.0), "{text}");
    assert_eq!(sample(&text, age_series), Some(0.0), "{text}");
}

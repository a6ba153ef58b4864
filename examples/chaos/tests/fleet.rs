//! `chaos-server` and `chaos-client` as real processes around a registry
//! server on a real socket; and the `Control` method, in process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chaos::{ChaosClient, ChaosService, ControlRequest, Ping, StreamRequest};
use lodestar::client::Policy;
use lodestar::{Client, Code, MemoryRegistry, Registry as _, Service, ServiceKey};
use serde_json::Value;
use tokio_stream::StreamExt;

/// The bound on every wait.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A child process, killed when dropped, and for a `chaos-server`, the
/// URL of its metrics.
struct Proc(Child, String);

/// The metrics a `chaos-server` serves, scraped over HTTP/1.1 as
/// Prometheus does.
fn scrape(server: &Proc) -> String {
    use std::io::{Read, Write};
    let address = server
        .1
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of `series` (name and labels as exposed) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lodestar registry`'s server, in process, on any free port.
async fn registry() -> (lodestar_registry_server::RunningRegistry, String) {
    let registry = lodestar_registry_server::start(lodestar_registry_server::Config::ephemeral())
        .await
        .unwrap();
    let url = format!("lodestar://{}", registry.local_addr());
    (registry, url)
}

/// A `chaos-server` registered in `url` as `id`, once it says it serves.
fn server(url: &str, id: &str, extra: &[&str]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chaos-server"))
        .args(["--addr", "127.0.0.1:0", "--registry", url, "--id", id])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start chaos-server");
    let stdout = child.stdout.take().unwrap();
    let mut proc = Proc(child, String::new());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| panic!("chaos-server {id} did not say it serves"));
    assert!(
        line.starts_with("chaos serving on 127.0.0.1:") && line.ends_with(&format!(" as {id}")),
        "{line}"
    );
    let line = rx
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| panic!("chaos-server {id} did not say where its metrics are"));
    proc.1 = line
        .strip_prefix("chaos metrics at ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();
    proc
}

/// Runs a process to its end, within [`TIMEOUT`].
async fn run(mut command: Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the process");
    let pid = child.id();
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(TIMEOUT, waited).await {
        Ok(output) => output.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("the process did not end within {TIMEOUT:?}");
        }
    }
}

/// `chaos-client` with `args`, its summary parsed.
async fn client(args: &[&str]) -> Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chaos-client"));
    command.args(args);
    let output = run(command).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chaos-client failed:\n{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one line of JSON:\n{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}:\n{stdout}"))
}

/// A file in the test's own scratch directory.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-fleet");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-{name}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_takes_the_failing_instance_out_and_the_summary_says_so() {
    let (registry, url) = registry().await;
    let _healthy = server(
        &url,
        "healthy",
        &["--labels", "track=stable", "--zone", "z1"],
    );
    let _failing = server(&url, "failing", &["--fail-rate", "1", "--weight", "50"]);
    let policy_file = scratch("policy.toml");
    std::fs::write(
        &policy_file,
        "[strategy]\n\
         kind = \"round_robin\"\n\
         [outlier]\n\
         interval_ms = 100\n\
         consecutive_failures = 3\n\
         base_ejection_ms = 60000\n",
    )
    .unwrap();
    let policy = policy_file.to_str().unwrap();

    let summary = client(&[
        "--registry",
        &url,
        "--policy",
        policy,
        "--calls",
        "200",
        "--concurrency",
        "2",
    ])
    .await;

    assert_eq!(summary["calls"], 200, "{summary}");
    let per_instance = summary["per_instance"].as_object().unwrap();
    let counted: u64 = per_instance.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(counted, 200, "{summary}");
    // Every failure is the failing instance's, by code name; outlier
    // detection ejected it after a few.
    let failures = summary["failures"].as_object().unwrap();
    assert_eq!(
        failures.keys().collect::<Vec<_>>(),
        ["UNAVAILABLE"],
        "{summary}"
    );
    let failed = failures["UNAVAILABLE"].as_u64().unwrap();
    assert_eq!(per_instance["failing"].as_u64(), Some(failed), "{summary}");
    assert!(
        (3..20).contains(&failed),
        "ejected after 3 in a row: {summary}"
    );
    assert_eq!(summary["ok"].as_u64(), Some(200 - failed), "{summary}");
    // The ejection shows in the client's metrics.
    assert!(
        summary["metrics"]["lodestar_client_ejections_total"].as_f64() >= Some(1.0),
        "{summary}"
    );
    assert_eq!(per_instance["healthy"].as_u64(), Some(200 - failed));
    let latency = &summary["latency_ms"];
    let (p50, p99, p99_9) = (
        latency["p50"].as_f64().unwrap(),
        latency["p99"].as_f64().unwrap(),
        latency["p99_9"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p99_9, "{summary}");
    // The policy in force is the file's, every field written out.
    let expected = serde_json::to_value(Policy::from_file(&policy_file).unwrap()).unwrap();
    assert_eq!(summary["policy"], expected);
    // ... and reads back as the same policy.
    let echoed = Policy::from_json(&summary["policy"].to_string()).unwrap();
    assert_eq!(echoed, Policy::from_file(&policy_file).unwrap());
    assert_eq!(summary["policy"]["outlier"]["interval_ms"], 100);
    assert_eq!(summary["policy"]["strategy"]["kind"], "round_robin");

    // The instances registered with their labels, zone and weight.
    let instances = lodestar_registry::from_url(&url)
        .unwrap()
        .instances(&ServiceKey::new(chaos::SERVICE_NAME))
        .await
        .unwrap();
    let healthy = instances.iter().find(|i| i.id == "healthy").unwrap();
    assert_eq!(healthy.metadata["track"], "stable");
    assert_eq!(healthy.zone, "z1");
    assert_eq!(healthy.weight, 100);
    let failing = instances.iter().find(|i| i.id == "failing").unwrap();
    assert_eq!(failing.weight, 50);

    std::fs::remove_file(&policy_file).unwrap();
    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_fixed_rate_calls_start_on_schedule_and_a_slow_server_shows_in_the_latency() {
    let (registry, url) = registry().await;
    let _slow = server(&url, "slow", &["--delay-ms", "200"]);

    // 20 calls at 40 per second: the last is due at 475 ms. Started on
    // schedule, all 20 are in flight at once: none waits for another.
    let started = Instant::now();
    let summary = client(&["--registry", &url, "--calls", "20", "--rate", "40"]).await;
    assert_eq!(summary["calls"], 20, "{summary}");
    assert_eq!(summary["ok"], 20, "{summary}");
    assert_eq!(summary["per_instance"]["slow"], 20, "{summary}");
    let elapsed = summary["elapsed_ms"].as_u64().unwrap();
    // One after another they would take 4 s.
    assert!((675..2_500).contains(&elapsed), "{summary}");
    assert!(started.elapsed() < TIMEOUT);
    let p50 = summary["latency_ms"]["p50"].as_f64().unwrap();
    assert!(p50 >= 200.0, "{summary}");

    // With at most 1 in flight, calls queue behind the slow one, and the
    // wait counts: the last was due at 475 ms and ends near 4 s.
    let summary = client(&[
        "--registry",
        &url,
        "--calls",
        "20",
        "--rate",
        "40",
        "--max-in-flight",
        "1",
    ])
    .await;
    assert_eq!(summary["calls"], 20, "{summary}");
    let p99 = summary["latency_ms"]["p99"].as_f64().unwrap();
    assert!(p99 >= 3_000.0, "queueing counts in latency: {summary}");
    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_held_to_the_budget_and_hedges_cut_the_tail() {
    let (registry, url) = registry().await;
    let failing = server(&url, "failing", &["--fail-rate", "1"]);
    // 200 calls, each allowed three attempts: without a budget, two
    // retries each; with one of 20% (+10/s), at most 40 + 10 a second.
    let retried = &[
        "--registry",
        &url,
        "--calls",
        "200",
        "--retry-attempts",
        "3",
    ];
    let summary = client(
        &[
            retried.as_slice(),
            &["--retry-backoff-ms", "1", "--no-budget"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(summary["failures"]["UNAVAILABLE"], 200, "{summary}");
    assert_eq!(summary["decisions"]["retry"], 400, "{summary}");
    assert_eq!(
        summary["policy"]["methods"][0]["retry"]["max_attempts"], 3,
        "{summary}"
    );
    let summary = client(&[retried.as_slice(), &["--retry-backoff-ms", "1"]].concat()).await;
    let retries = summary["decisions"]["retry"].as_u64().unwrap();
    let seconds = summary["elapsed_ms"].as_u64().unwrap().div_ceil(1_000) + 1;
    assert!(retries <= 40 + 10 * seconds, "{summary}");
    assert!(
        summary["decisions"]["budget_denied"].as_u64().unwrap() > 0,
        "{summary}"
    );
    // The client's metrics count the same decisions.
    let metrics = &summary["metrics"];
    assert_eq!(
        metrics["lodestar_client_retries_total"].as_f64(),
        Some(retries as f64),
        "{summary}"
    );
    assert_eq!(
        metrics["lodestar_client_retry_budget_denied_total"].as_f64(),
        summary["decisions"]["budget_denied"].as_f64(),
        "{summary}"
    );
    drop(failing);

    // One of two instances (of another service) holds every call 300 ms:
    // hedged after 20 ms, no call waits for it.
    let _fast = server(&url, "fast", &["--service", "tail"]);
    let _slow = server(&url, "slow", &["--service", "tail", "--delay-ms", "300"]);
    let policy_file = scratch("rr.toml");
    std::fs::write(&policy_file, "[strategy]\nkind = \"round_robin\"\n").unwrap();
    let summary = client(&[
        "--registry",
        &url,
        "--service",
        "tail",
        "--calls",
        "40",
        "--concurrency",
        "1",
        "--policy",
        policy_file.to_str().unwrap(),
        "--hedge-delay-ms",
        "20",
        "--budget-percent",
        "100",
    ])
    .await;
    std::fs::remove_file(&policy_file).unwrap();
    assert_eq!(summary["ok"], 40, "{summary}");
    assert_eq!(summary["per_instance"]["fast"], 40, "{summary}");
    // Each call that went to the slow one first was hedged (round robin
    // sends it about half of them).
    let hedges = summary["decisions"]["hedge"].as_u64().unwrap();
    assert!((10..=40).contains(&hedges), "{summary}");
    assert_eq!(
        summary["metrics"]["lodestar_client_hedges_total"].as_f64(),
        Some(hedges as f64),
        "{summary}"
    );
    let p99 = summary["latency_ms"]["p99"].as_f64().unwrap();
    assert!(p99 < 300.0, "{summary}");
    // Both at once are refused.
    let mut command = Command::new(env!("CARGO_BIN_EXE_chaos-client"));
    command.args([
        "--registry",
        &url,
        "--retry-attempts",
        "2",
        "--hedge-delay-ms",
        "5",
    ]);
    let output = run(command).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--hedge-delay-ms"), "{stderr}");
    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_and_a_concurrency_limit_refuse_the_calls_over_them() {
    let (registry, url) = registry().await;
    let _limited = server(&url, "limited", &["--rate-limit", "5", "--burst", "5"]);
    // 40 calls in about 400 ms: the burst of 5 and about 2 more pass.
    let summary = client(&["--registry", &url, "--calls", "40", "--rate", "100"]).await;
    let ok = summary["ok"].as_u64().unwrap();
    assert!((5..=12).contains(&ok), "{summary}");
    assert_eq!(
        summary["failures"]["RESOURCE_EXHAUSTED"],
        40 - ok,
        "{summary}"
    );
    // The server's metrics count what its rate limit refused, by method.
    let text = scrape(&_limited);
    let refused = sample(
        &text,
        r#"lodestar_server_rate_limited_total{rpc_method="chaos.Chaos/Unary"}"#,
    );
    assert_eq!(refused, Some((40 - ok) as f64), "{text}");
    drop(_limited);

    let _one = server(
        &url,
        "one-at-a-time",
        &[
            "--service",
            "chaos-one",
            "--concurrency-limit",
            "1",
            "--delay-ms",
            "300",
        ],
    );
    // 4 at once, for 300 ms each: 1 passes, 3 are shed at once.
    let summary = client(&[
        "--registry",
        &url,
        "--calls",
        "4",
        "--concurrency",
        "4",
        "--service",
        "chaos-one",
    ])
    .await;
    assert_eq!(summary["ok"], 1, "{summary}");
    assert_eq!(summary["failures"]["RESOURCE_EXHAUSTED"], 3, "{summary}");
    let text = scrape(&_one);
    let shed = sample(
        &text,
        r#"lodestar_server_shed_total{rpc_method="chaos.Chaos/Unary"}"#,
    );
    assert_eq!(shed, Some(3.0), "{text}");
    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_are_refused_with_the_flag_and_what_was_expected() {
    let (registry, url) = registry().await;
    let cases: [(&str, &[&str], &str); 10] = [
        (
            env!("CARGO_BIN_EXE_chaos-server"),
            &["--rate-limit=-1"],
            "--rate-limit -1: expected more than 0 and at most 1000000000 calls per second",
        ),
        (
            env!("CARGO_BIN_EXE_chaos-server"),
            &["--concurrency-limit", "0"],
            "--concurrency-limit 0: expected 1 to 1000000",
        ),
        (
            env!("CARGO_BIN_EXE_chaos-server"),
            &["--fail-rate", "1.5"],
            "fail_rate = 1.5: expected a share from 0.0 to 1.0",
        ),
        (
            env!("CARGO_BIN_EXE_chaos-server"),
            &["--fail-code", "unavailable"],
            "fail_code = \"unavailable\"",
        ),
        (
            env!("CARGO_BIN_EXE_chaos-server"),
            &["--labels", "track"],
            "--labels: label \"track\": expected key=value",
        ),
        (
            env!("CARGO_BIN_EXE_chaos-client"),
            &["--policy", "/nonexistent/policy.toml"],
            "policy file /nonexistent/policy.toml",
        ),
        (
            env!("CARGO_BIN_EXE_chaos-client"),
            &["--rate", "0"],
            "--rate 0: expected calls per second above 0",
        ),
        (
            env!("CARGO_BIN_EXE_chaos-client"),
            &["--breaker", "ratio", "--breaker-probes", "0"],
            "policy field `methods[0].breaker.probes` is 0: expected 1 to 1000",
        ),
        (
            env!("CARGO_BIN_EXE_chaos-client"),
            &["--fault-abort-percent", "120"],
            "policy field `methods[0].fault.abort_percent` is 120",
        ),
        (
            env!("CARGO_BIN_EXE_chaos-server"),
            &["--fault-delay-percent", "50", "--fault-delay-ms", "70000"],
            "--fault-*: policy field `methods[1].fault.delay_ms` is 70000",
        ),
    ];
    for (binary, args, expected) in cases {
        let mut command = Command::new(binary);
        command.args(["--registry", &url]).args(args);
        let output = run(command).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(output.stdout.is_empty(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let mut command = Command::new(env!("CARGO_BIN_EXE_chaos-client"));
    command.args(["--registry", "nonsense"]);
    let stderr = String::from_utf8_lossy(&run(command).await.stderr).into_owned();
    assert!(stderr.starts_with("chaos-client: --registry: "), "{stderr}");
    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_open_the_breaker_and_the_summary_counts_the_decisions() {
    let (registry, url) = registry().await;
    let _server = server(
        &url,
        "aborting",
        &[
            "--fault-abort-percent",
            "100",
            "--fault-abort-code",
            "ABORTED",
        ],
    );
    // The server's faults: every call aborted, the handler never run.
    let summary = client(&["--registry", &url, "--calls", "20"]).await;
    assert_eq!(summary["failures"]["ABORTED"], 20, "{summary}");
    assert_eq!(summary["decisions"], serde_json::json!({}), "{summary}");
    // The client's faults open its breaker: 5 injected, then refused.
    let summary = client(&[
        "--registry",
        &url,
        "--calls",
        "100",
        "--concurrency",
        "1",
        "--fault-abort-percent",
        "100",
        "--fault-abort-code",
        "DATA_LOSS",
        "--breaker",
        "ratio",
        "--breaker-min-calls",
        "5",
        "--breaker-open-ms",
        "60000",
    ])
    .await;
    assert_eq!(summary["failures"]["DATA_LOSS"], 5, "{summary}");
    assert_eq!(summary["failures"]["UNAVAILABLE"], 95, "{summary}");
    assert_eq!(
        summary["decisions"],
        serde_json::json!({"fault_injected": 5, "breaker_opened": 1, "breaker_rejected": 95}),
        "{summary}"
    );
    // So do the client's metrics: the breaker opened once, refused 95.
    assert_eq!(
        summary["metrics"],
        serde_json::json!({
            "lodestar_client_faults_injected_total": 5.0,
            "lodestar_client_breaker_transitions_total": 1.0,
            "lodestar_client_breaker_rejected_total": 95.0,
        }),
        "{summary}"
    );
    assert_eq!(summary["policy"]["methods"][0]["names"][0], "*");
    registry.shutdown().await.unwrap();
}

#[tokio::test]
async fn control_changes_the_behaviour_of_the_running_instance() {
    let registry = MemoryRegistry::new();
    let service = ChaosService::new("chaos-a", chaos::Behaviour::default());
    let server = Service::builder("chaos")
        .registry(registry.clone())
        .add_service(service.clone().into_server())
        .start()
        .await
        .unwrap();
    let client = Client::builder(registry).timeout(TIMEOUT).build();
    let mut chaos = ChaosClient::by_name(&client, "chaos");
    let ping = || Ping {
        body: b"hi".to_vec(),
    };

    // Well behaved: every method answers, naming the instance.
    let pong = chaos.unary(ping()).await.unwrap().into_inner();
    assert_eq!(
        (pong.instance.as_str(), pong.body.as_slice()),
        ("chaos-a", &b"hi"[..])
    );
    let pongs: Vec<_> = chaos
        .server_stream(StreamRequest { count: 3 })
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .unwrap();
    assert_eq!(pongs.iter().map(|p| p.seq).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(pongs.iter().all(|p| p.instance == "chaos-a"));
    let pongs: Vec<_> = chaos
        .bidi(tokio_stream::iter([ping(), ping()]))
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .unwrap();
    assert_eq!(pongs.len(), 2);
    assert!(pongs.iter().all(|p| p.instance == "chaos-a"));

    // Told to fail every call with RESOURCE_EXHAUSTED, it does at once.
    let now = chaos
        .control(ControlRequest {
            fail_rate: Some(1.0),
            fail_code: Some("RESOURCE_EXHAUSTED".into()),
            ..ControlRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (now.instance.as_str(), now.fail_rate, now.fail_code.as_str()),
        ("chaos-a", 1.0, "RESOURCE_EXHAUSTED")
    );
    assert_eq!(service.behaviour().fail_code, Code::ResourceExhausted);
    let status = chaos.unary(ping()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(chaos::instance_of(&status).as_deref(), Some("chaos-a"));
    let status = chaos
        .server_stream(StreamRequest { count: 1 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);

    // A change that is not valid is refused whole, naming the field; the
    // behaviour in force stays.
    let status = chaos
        .control(ControlRequest {
            fail_rate: Some(0.0),
            delay_ms: Some(chaos::MAX_DELAY_MS + 1),
            ..ControlRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("delay_ms = 60001"), "{status:?}");
    assert_eq!(service.behaviour().fail_rate, 1.0);

    // Healthy again, but slow: the delay is in force on the next call.
    let now = chaos
        .control(ControlRequest {
            fail_rate: Some(0.0),
            delay_ms: Some(150),
            ..ControlRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((now.delay_ms, now.fail_rate), (150, 0.0));
    let started = Instant::now();
    chaos.unary(ping()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));

    tokio::time::timeout(TIMEOUT, server.shutdown())
        .await
        .unwrap()
        .unwrap();
}

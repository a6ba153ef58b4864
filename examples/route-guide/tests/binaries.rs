//! `route-guide-server` and `route-guide-client` as real processes, and
//! the example page in a real browser (`browser/`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod browser;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Kills the server if the test fails before stopping it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(extra: &[&str]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_route-guide-server"))
        .args(["--addr", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start route-guide-server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let server = Server(child);
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server announces its address");
    let address = line
        .strip_prefix("route-guide serving on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_owned();
    (server, address)
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_client_runs_all_four_call_kinds_against_the_server_which_stops_on_sigterm() {
    let (mut server, address) = start_server(&[]);
    assert!(
        !address.ends_with(":0"),
        "the real port is announced: {address}"
    );

    let mut client = Command::new(env!("CARGO_BIN_EXE_route-guide-client"))
        .args(["--addr", &address])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start route-guide-client");
    let status = wait_with_timeout(&mut client, Duration::from_secs(30));
    let output = client.wait_with_output().expect("client output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        status.success(),
        "client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("Lodestar Trailhead, Kestrel Ridge, NJ, USA"),
        "{stdout}"
    );
    assert!(stdout.contains("100 features"), "{stdout}");
    assert!(stdout.contains("point_count: 10"), "{stdout}");
    // RouteChat returns, for each note, the earlier notes at its location.
    let first_run_replies: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("got message"))
        .collect();
    assert_eq!(
        first_run_replies,
        [
            "got message \"First message\" at point(0, 1)",
            "got message \"Second message\" at point(0, 2)",
            "got message \"Third message\" at point(0, 3)",
        ]
    );

    let kill = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status = wait_with_timeout(&mut server.0, Duration::from_secs(30));
    assert!(
        status.success(),
        "the server exits cleanly on SIGTERM: {status:?}"
    );
}

#[test]
fn get_feature_is_a_rest_route_too() {
    let (_server, address) = start_server(&[]);
    let curl = |path: &str| {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .arg(format!("http://{address}{path}"))
            .output()
            .expect("run curl");
        assert!(output.status.success(), "curl: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // `option (google.api.http) = { get: "/v1/features/{latitude}/{longitude}" }`
    let out = curl("/v1/features/409146138/-746188906");
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "{out}");
    assert_eq!(
        body,
        r#"{"name":"Lodestar Trailhead, Kestrel Ridge, NJ, USA","location":{"latitude":409146138,"longitude":-746188906}}"#
    );
    let out = curl("/v1/features/north/1");
    assert!(out.ends_with("\n400"), "{out}");
}

#[test]
fn list_features_streams_over_rest_as_lines_of_json() {
    let (_server, address) = start_server(&[]);
    // `option (google.api.http) = { get: "/v1/features" }`: the rectangle
    // from the query, a line per feature as it is found (`-N`: as it comes).
    let output = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "--max-time",
            "10",
            "-w",
            "%{http_code} %{content_type}",
        ])
        .arg(format!(
            "http://{address}/v1/features?lo.latitude=400000000&lo.longitude=-750000000\
             &hi.latitude=420000000&hi.longitude=-730000000"
        ))
        .output()
        .expect("run curl");
    assert!(output.status.success(), "curl: {output:?}");
    let out = String::from_utf8_lossy(&output.stdout);
    let (body, status) = out.rsplit_once('\n').unwrap();
    assert_eq!(status, "200 application/x-ndjson", "{out}");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 100, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with(r#"{"result":{"#) && l.ends_with("}}}")),
        "{out}"
    );
    assert!(
        lines.contains(
            &r#"{"result":{"name":"Lodestar Trailhead, Kestrel Ridge, NJ, USA","location":{"latitude":409146138,"longitude":-746188906}}}"#
        ),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_and_client_find_each_other_through_a_registry_server() {
    let registry = lodestar_registry_server::start(lodestar_registry_server::Config::ephemeral())
        .await
        .unwrap();
    let url = format!("lodestar://{}", registry.local_addr());
    let (_first, _) = start_server(&["--registry", &url, "--name", "first"]);
    let (_second, _) = start_server(&["--registry", &url, "--name", "second"]);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_route-guide-client"))
            .args(["--registry", &url])
            .output()
            .expect("run route-guide-client")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("100 features"), "{stdout}");
    registry.shutdown().await.unwrap();
}

//! `lodestar demo`, run as a real process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use lodestar_tests::process::Proc;

/// The one line of `stdout` that starts (after indentation) with `prefix`.
fn line<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    let found: Vec<&str> = stdout
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with(prefix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one line `{prefix}…` expected in:\n{stdout}"
    );
    found[0]
}

/// The number just before `suffix` in `text`.
fn number_before(text: &str, suffix: &str) -> u64 {
    let at = text
        .find(suffix)
        .unwrap_or_else(|| panic!("no `{suffix}` in: {text}"));
    let digits: String = text[..at]
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number before `{suffix}` in: {text}"))
}

#[test]
fn demo_succeeds_and_reports_every_call_kind_the_event_the_failures_and_the_crash() {
    let started = Instant::now();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    demo.arg("demo");
    let output = lodestar_tests::run_bounded(demo, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "lodestar demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the demo took {:?}",
        started.elapsed()
    );
    // Progress: one line per phase, in order.
    let phases: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with('['))
        .collect();
    assert_eq!(phases.len(), 8, "{stdout}");
    for (n, phase) in phases.iter().enumerate() {
        assert!(phase.starts_with(&format!("[{}/8] ", n + 1)), "{phase}");
    }
    // Every call kind, as the client saw them: all succeeded.
    let summary = &stdout[stdout.find("\nSummary").expect("a summary")..];
    for kind in [
        "unary            GetFeature",
        "server streaming ListFeatures",
        "client streaming RecordRoute",
        "bidi streaming   RouteChat",
        "unary            greeter SayHello",
    ] {
        let calls = line(summary, kind);
        assert!(calls.ends_with(" calls, 0 failed"), "{calls}");
        assert!(number_before(calls, " calls") >= 12, "{calls}");
    }
    // The failing instance: its failures were injected, it was ejected.
    let failing = line(summary, "route-guide-4:");
    assert!(
        failing.contains(" UNAVAILABLE) → ")
            && number_before(failing, " failed (") >= 3
            && failing.contains("ejected by outlier detection (3 consecutive failures)"),
        "{failing}"
    );
    // The slow instance: well under a fair share while the others were up.
    let slow = line(summary, "route-guide-3:");
    assert!(slow.contains("0 failed"), "{slow}");
    let share = number_before(slow, "% of the load phase's calls under least-request");
    assert!(share < 30, "the slow instance took {share}%: {slow}");
    // The crash and the graceful shutdown.
    let crashed = line(summary, "route-guide-1:");
    assert!(crashed.contains("until it crashed"), "{crashed}");
    let graceful = line(summary, "route-guide-2:");
    assert!(
        graceful.contains("0 failed") && graceful.contains("shut down gracefully"),
        "{graceful}"
    );
    assert!(
        line(
            summary,
            "graceful shutdown: route-guide-2 left the registry"
        )
        .contains("after")
    );
    assert!(
        line(summary, "crash: route-guide-1's lease ran out; evicted").contains("after the kill")
    );
    // The event from RouteGuide, handled by the greeter.
    let events = line(summary, "events:");
    let published = number_before(events, " route summaries published");
    assert!(published >= 12, "{events}");
    assert!(
        events.contains(&format!("{published} handled by greeter")),
        "{events}"
    );
    assert!(line(&stdout, "All went well").contains("every call succeeded"));
    assert!(
        stdout.contains("lodestar demo --keep"),
        "the hint: {stdout}"
    );
}

/// The address in `http://ADDRESS/…`.
fn http_address(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn demo_keep_leaves_everything_running_at_the_addresses_it_prints() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    command.args([
        "demo", "--keep", "--load", "10", "--rounds", "2", "--after", "5",
    ]);
    let kept = Proc::spawn(command);
    let mut printed = Vec::new();
    loop {
        let line = kept.next_line("the demo's output, up to `Ready: press Ctrl-C`");
        let ready = line.starts_with("Ready: press Ctrl-C");
        printed.push(line);
        if ready {
            break;
        }
    }
    let printed = printed.join("\n");
    assert!(printed.contains("All went well"), "{printed}");
    let curls: Vec<&str> = printed
        .lines()
        .filter_map(|line| line.trim().strip_prefix("curl "))
        .collect();
    let metrics: Vec<&&str> = curls.iter().filter(|u| u.ends_with("/metrics")).collect();
    // The registry's, and those of route-guide-3, route-guide-4 and greeter-1.
    assert_eq!(metrics.len(), 4, "{printed}");
    for call in ["route-guide", "helloworld.Greeter/SayHello", "GetFeature"] {
        assert!(
            printed
                .lines()
                .any(|line| line.trim().starts_with("lodestar call ") && line.contains(call)),
            "no `lodestar call` of {call} in:\n{printed}"
        );
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for url in &metrics {
            let (status, _, body) = lodestar_tests::http_get(http_address(url), "/metrics").await;
            assert_eq!(status, 200, "{url}: {body}");
            assert!(body.contains("# EOF"), "{url}: {body}");
        }
        let services = curls
            .iter()
            .find(|u| u.ends_with("/v1/services"))
            .expect("the registry's services");
        let (status, _, body) =
            lodestar_tests::http_get(http_address(services), "/v1/services").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("\"route-guide\"") && body.contains("\"greeter\""),
            "{body}"
        );
        let instances = curls
            .iter()
            .find(|u| u.ends_with("/instances"))
            .expect("the registry's instances of route-guide");
        let (status, _, body) = lodestar_tests::http_get(
            http_address(instances),
            "/v1/services/route-guide/instances",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("route-guide-3") && body.contains("route-guide-4"),
            "{body}"
        );
    });
}

#[test]
fn help_lists_the_demo_and_says_when_it_succeeds() {
    let lodestar = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
        command.args(args);
        lodestar_tests::run_bounded(command, Duration::from_secs(10))
    };
    let output = lodestar(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("demo") && help.contains("watch"), "{help}");
    let output = lodestar(&["demo", "--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("Exits 0 when all went well") && help.contains("--keep"),
        "{help}"
    );
    let output = lodestar(&["no-such-command"]);
    assert_eq!(output.status.code(), Some(2), "a usage error exits 2");
}

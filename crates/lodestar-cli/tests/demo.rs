//! `lodestar demo`, run as a real process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_succeeds_and_reports_every_call_kind() {
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
    for kind in ["GetFeature", "ListFeatures", "RecordRoute", "RouteChat"] {
        assert!(stdout.contains(kind), "no {kind} in:\n{stdout}");
    }
    for instance in ["route-guide-1", "route-guide-2", "route-guide-3"] {
        assert!(stdout.contains(instance), "no {instance} in:\n{stdout}");
    }
    assert!(stdout.contains("lease expired"), "{stdout}");
    assert!(stdout.contains(", 0 failed"), "{stdout}");
}

#[test]
fn help_lists_the_demo() {
    let lodestar = |arg: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
        command.arg(arg);
        lodestar_tests::run_bounded(command, Duration::from_secs(10))
    };
    let output = lodestar("--help");
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("demo"));
    let output = lodestar("no-such-command");
    assert_eq!(output.status.code(), Some(2), "a usage error exits 2");
}

//! The benchmark harness still works: `lodestar-bench run --smoke` runs
//! every scenario end to end (real servers, real processes, real sockets)
//! and reports every case for lodestar and its peers.

use std::process::Command;
use std::time::Duration;

#[test]
fn smoke_run_reports_every_scenario() {
    let dir =
        std::env::temp_dir().join(format!("lodestar-bench-{}", lodestar_tests::unique_name()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("results.json");
    let markdown = dir.join("results.md");
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar-bench"));
    command
        .args(["run", "--smoke", "--json"])
        .arg(&json)
        .arg("--markdown")
        .arg(&markdown);
    let output = lodestar_tests::run_bounded(command, Duration::from_secs(180));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "smoke run failed:\n{stderr}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON report")).expect("valid JSON");
    let cases = report["cases"].as_array().expect("cases");
    for scenario in [
        "rpc",
        "rpc-server",
        "rpc-client",
        "registry",
        "broker",
        "failover",
        "footprint",
        "pick",
        "balance",
        "resilience",
        "overload",
        "tracing",
        "web",
    ] {
        assert!(
            cases.iter().any(|c| c["scenario"] == scenario),
            "no `{scenario}` case in the report"
        );
    }
    for case in cases {
        let name = format!("{} / {}", case["scenario"], case["case"]);
        let variants = case["variants"].as_array().expect("variants");
        assert_eq!(
            variants[0]["name"], "lodestar",
            "{name}: lodestar comes first"
        );
        for variant in variants {
            let samples = variant["samples"].as_array().expect("samples");
            assert_eq!(
                samples.len(),
                1,
                "{name}: one sample per variant in a smoke run"
            );
            let sample = samples[0].as_object().expect("a sample");
            assert!(!sample.is_empty(), "{name}: an empty sample");
            let value = |metric: &str| sample.get(metric).and_then(|v| v.as_f64());
            if let (Some(p50), Some(p99), Some(p999)) = (value("p50"), value("p99"), value("p99.9"))
            {
                assert!(
                    0.0 < p50 && p50 <= p99 && p99 <= p999,
                    "{name} / {}: percentiles out of order: {p50} {p99} {p999}",
                    variant["name"]
                );
            }
            if let Some(cpu) = value("server cpu/op") {
                // Under load, a server whose CPU reads 0 was not measured.
                assert!(cpu > 0.0, "{name} / {}: no server CPU", variant["name"]);
            }
            if let Some(throughput) = sample.get("throughput") {
                assert!(
                    throughput.as_f64().is_some_and(|t| t > 0.0),
                    "{name} / {}: no throughput",
                    variant["name"]
                );
            }
        }
        // Every peer has its ratio against lodestar.
        for peer in &variants[1..] {
            assert!(
                peer["lodestar_advantage"]
                    .as_object()
                    .is_some_and(|a| !a.is_empty()),
                "{name}: no ratio against {}",
                peer["name"]
            );
        }
    }
    // The target the failover scenario reports against: no idempotent call
    // fails when one of three instances is SIGKILLed.
    let failover = cases
        .iter()
        .find(|c| c["scenario"] == "failover")
        .expect("failover case");
    assert_eq!(
        failover["variants"][0]["samples"][0]["failed calls"].as_f64(),
        Some(0.0),
        "lodestar failed idempotent calls during failover"
    );
    let tables = std::fs::read_to_string(&markdown).expect("Markdown report");
    assert!(tables.contains("| case | metric | lodestar |"), "{tables}");
    let _ = std::fs::remove_dir_all(&dir);
}

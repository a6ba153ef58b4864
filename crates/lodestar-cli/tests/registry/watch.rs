//! `lodestar watch` against a real `lodestar registry` process: the JSON
//! lines of instances coming and going, in order; `--count`, `--timeout`
//! and the table.

use std::collections::BTreeMap;

use lodestar::Instance;
use serde_json::Value;

use super::*;

fn watch_command(url: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    command
        .args(["watch", SERVICE_NAME, "--registry", url])
        .args(extra)
        .env_remove("LODESTAR_REGISTRY_TOKEN");
    command
}

/// The next stdout line of `proc`, as JSON (bounded).
fn next_json(proc: &Proc) -> Value {
    let line = proc.next_line("a JSON line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn key(id: &str) -> lodestar::InstanceKey {
    lodestar::InstanceKey {
        service: ServiceKey::new(SERVICE_NAME),
        id: id.to_owned(),
    }
}

fn instance(id: &str, address: &str) -> Instance {
    let mut instance = Instance::new(SERVICE_NAME, address).with_id(id);
    instance.version = "2.1.0".to_owned();
    instance
}

/// Waits (bounded) for `child` to exit, and says how.
fn exit_status(mut proc: Proc) -> std::process::ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "lodestar watch did not exit; stderr:\n{}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn watch_prints_instances_coming_and_going_as_json_lines_in_order() {
    let server = registry("127.0.0.1:0", &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let registry = lodestar_registry::from_url(&server.url()).unwrap();
    let ttl = Duration::from_secs(20);
    runtime
        .block_on(registry.register(instance("first", "127.0.0.1:7001"), ttl))
        .unwrap();

    // Piped, so JSON lines without asking; four events, then it exits.
    let watch = Proc::spawn(watch_command(&server.url(), &["--count", "4"]));
    // The instance already there comes first: the watch is live from then on.
    let existing = next_json(&watch);
    assert_eq!(existing["type"], "existing", "{existing}");
    assert_eq!(existing["id"], "first");

    runtime
        .block_on(registry.register(instance("second", "127.0.0.1:7002"), ttl))
        .unwrap();
    let added = next_json(&watch);
    runtime
        .block_on(registry.deregister(&key("second")))
        .unwrap();
    let removed = next_json(&watch);
    runtime
        .block_on(registry.deregister(&key("first")))
        .unwrap();
    let last = next_json(&watch);

    let fields = |event: &Value| -> BTreeMap<String, Value> {
        ["type", "id", "address", "healthy", "version", "service"]
            .iter()
            .map(|field| ((*field).to_owned(), event[*field].clone()))
            .collect()
    };
    let expected = |kind: &str, id: &str, address: &str| -> BTreeMap<String, Value> {
        [
            ("type", kind),
            ("id", id),
            ("address", address),
            ("version", "2.1.0"),
            ("service", SERVICE_NAME),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .chain([("healthy".to_owned(), Value::Bool(true))])
        .collect()
    };
    assert_eq!(
        fields(&existing),
        expected("existing", "first", "127.0.0.1:7001")
    );
    assert_eq!(
        fields(&added),
        expected("added", "second", "127.0.0.1:7002")
    );
    assert_eq!(
        fields(&removed),
        expected("removed", "second", "127.0.0.1:7002")
    );
    assert_eq!(
        fields(&last),
        expected("removed", "first", "127.0.0.1:7001")
    );
    // Times are RFC 3339 in UTC, and do not go back; revisions grow.
    let times: Vec<&str> = [&existing, &added, &removed, &last]
        .iter()
        .map(|e| e["time"].as_str().unwrap())
        .collect();
    for time in &times {
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{time}"
        );
    }
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let revisions: Vec<u64> = [&existing, &added, &removed, &last]
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert!(
        revisions.windows(2).skip(1).all(|w| w[0] < w[1]),
        "{revisions:?}"
    );
    // --count 4: it exits on its own, successfully.
    let status = exit_status(watch);
    assert!(status.success(), "{status}");
}

#[test]
fn watch_stops_at_its_timeout_and_draws_a_table_when_asked() {
    let server = registry("127.0.0.1:0", &[]);
    // Nothing registered: no event, and it stops at its timeout.
    let started = Instant::now();
    let quiet = lodestar_tests::run_bounded(
        watch_command(&server.url(), &["--timeout", "300ms"]),
        TIMEOUT,
    );
    assert!(quiet.status.success(), "{quiet:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(quiet.stdout.is_empty(), "{quiet:?}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let registry = lodestar_registry::from_url(&server.url()).unwrap();
    runtime
        .block_on(registry.register(
            instance("tabled", "127.0.0.1:7003"),
            Duration::from_secs(20),
        ))
        .unwrap();
    let table = lodestar_tests::run_bounded(
        watch_command(&server.url(), &["--output", "table", "--count", "1"]),
        TIMEOUT,
    );
    assert!(table.status.success(), "{table:?}");
    let stdout = String::from_utf8_lossy(&table.stdout);
    // Not a terminal: appended, without ANSI escapes.
    assert!(!stdout.contains('\x1b'), "{stdout}");
    let row = stdout
        .lines()
        .find(|line| line.starts_with("tabled "))
        .unwrap_or_else(|| panic!("no row for the instance in:\n{stdout}"));
    assert!(
        row.contains("127.0.0.1:7003") && row.contains("2.1.0"),
        "{row}"
    );
    assert!(
        stdout.contains("existing tabled 127.0.0.1:7003"),
        "{stdout}"
    );

    // A duration without a unit is refused by the parser, as a usage error.
    let bad =
        lodestar_tests::run_bounded(watch_command(&server.url(), &["--timeout", "10"]), TIMEOUT);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

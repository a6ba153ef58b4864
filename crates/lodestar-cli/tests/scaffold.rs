//! `lodestar new` and `lodestar completions`, run as real processes; the
//! generated crate is built and its own test run, offline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The workspace root (this crate is `crates/lodestar-cli`).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// A directory of the test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "lodestar-scaffold-{tag}-{}",
            lodestar_tests::unique_name()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lodestar(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    command.current_dir(dir).args(args);
    lodestar_tests::run_bounded(command, Duration::from_secs(30))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every file under `dir`, by relative path.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let contents = std::fs::read(&path).unwrap();
                found.insert(path.strip_prefix(dir).unwrap().to_path_buf(), contents);
            }
        }
    }
    found
}

/// The generated crate builds and its own test (which serves every call
/// kind on a free port) passes, offline, against this workspace; a second
/// run writes the same bytes; rustfmt finds nothing to change.
#[test]
fn a_new_service_builds_and_passes_its_own_tests_offline() {
    let root = workspace();
    let (first, second) = (TempDir::new("a"), TempDir::new("b"));
    for dir in [&first, &second] {
        let output = lodestar(
            &dir.0,
            &["new", "demo-svc", "--lodestar-path", root.to_str().unwrap()],
        );
        assert!(output.status.success(), "{}", text(&output.stderr));
        assert!(text(&output.stdout).contains("cd demo-svc"));
    }
    let crate_dir = first.0.join("demo-svc");
    let generated = files(&crate_dir);
    let expected = [
        ".gitignore",
        "Cargo.toml",
        "README.md",
        "build.rs",
        "lodestar.toml",
        "proto/demo_svc.proto",
        "src/lib.rs",
        "src/main.rs",
        "src/service.rs",
        "tests/smoke.rs",
    ];
    let paths: Vec<&str> = generated.keys().filter_map(|p| p.to_str()).collect();
    assert_eq!(paths, expected);
    assert!(
        generated == files(&second.0.join("demo-svc")),
        "two runs with the same arguments wrote different files"
    );
    let proto = text(&generated[Path::new("proto/demo_svc.proto")]);
    for method in [
        "rpc Hello (HelloRequest) returns (HelloReply)",
        "rpc Count (CountRequest) returns (stream Number)",
        "rpc Sum (stream Number) returns (SumReply)",
        "rpc Echo (stream EchoMessage) returns (stream EchoMessage)",
    ] {
        assert!(proto.contains(method), "{method} missing from:\n{proto}");
    }

    // The same versions as this workspace, so the build needs no network.
    std::fs::copy(root.join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    // A target directory of its own beside this workspace's (a cargo
    // running tests may hold the lock on the workspace's own), kept between
    // runs so only the first builds lodestar's dependencies.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("scaffold");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut test = Command::new(&cargo);
    test.current_dir(&crate_dir)
        .args(["test", "--offline", "--color", "never"])
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS");
    let output = lodestar_tests::run_bounded(test, Duration::from_secs(1200));
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "cargo test in the new crate failed:\n{stdout}\n{}",
        text(&output.stderr)
    );
    assert!(
        stdout.contains("test serves_every_call_kind_by_name ... ok"),
        "{stdout}"
    );
    assert!(
        !text(&output.stderr).contains("warning:"),
        "the generated crate has warnings:\n{}",
        text(&output.stderr)
    );

    let mut fmt = Command::new(&cargo);
    fmt.current_dir(&crate_dir).args(["fmt", "--check"]);
    let output = lodestar_tests::run_bounded(fmt, Duration::from_secs(60));
    assert!(
        output.status.success(),
        "the generated code is not as rustfmt lays it out:\n{}",
        text(&output.stdout)
    );
}

#[test]
fn new_refuses_a_non_empty_directory_and_invalid_names() {
    let dir = TempDir::new("refuse");
    std::fs::create_dir_all(dir.0.join("taken")).unwrap();
    std::fs::write(dir.0.join("taken/notes.txt"), "mine").unwrap();

    let output = lodestar(&dir.0, &["new", "taken"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("not empty"),
        "{}",
        text(&output.stderr)
    );
    assert!(text(&output.stderr).contains("--force"));
    assert!(
        !dir.0.join("taken/Cargo.toml").exists(),
        "nothing is written"
    );

    let output = lodestar(&dir.0, &["new", "taken", "--force"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(dir.0.join("taken/Cargo.toml").exists());
    assert_eq!(
        std::fs::read_to_string(dir.0.join("taken/notes.txt")).unwrap(),
        "mine",
        "--force leaves other files alone"
    );

    for name in ["My-Service", "9lives", "a b", "test"] {
        let output = lodestar(&dir.0, &["new", name]);
        assert_eq!(output.status.code(), Some(2), "{name}");
        assert!(
            text(&output.stderr).contains("invalid crate name"),
            "{name}: {}",
            text(&output.stderr)
        );
    }
    let output = lodestar(&dir.0, &["new", "svc", "--lodestar-path", "/nonexistent"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("--lodestar-path"));
}

#[test]
fn bash_can_source_the_completion_script() {
    let dir = TempDir::new("completions");
    let output = lodestar(&dir.0, &["completions", "bash"]);
    assert!(output.status.success());
    let script = dir.0.join("lodestar.bash");
    std::fs::write(&script, &output.stdout).unwrap();
    // Sourced, it registers a completion function for `lodestar` that
    // offers the subcommands.
    let mut bash = Command::new("bash");
    bash.arg("-c").arg(format!(
        "set -e; source {}; complete -p lodestar; \
         COMP_WORDS=(lodestar ne); COMP_CWORD=1; COMP_LINE='lodestar ne'; COMP_POINT=11; \
         _lodestar lodestar ne lodestar; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    ));
    let output = lodestar_tests::run_bounded(bash, Duration::from_secs(10));
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert!(stdout.contains("complete -o"), "{stdout}");
    assert!(stdout.lines().any(|line| line == "new"), "{stdout}");
    for shell in ["zsh", "fish"] {
        let output = lodestar(&dir.0, &["completions", shell]);
        assert!(
            output.status.success() && !output.stdout.is_empty(),
            "{shell}"
        );
    }
}

//! lodestar against another gRPC implementation, grpcio (Python): the Python
//! interop client against `lodestar-interop-server`, and
//! `lodestar-interop-client` against the Python interop server, in plaintext
//! and over TLS, as real processes on loopback.
//!
//! Needs a Python with grpcio and grpcio-tools: `LODESTAR_PYTHON`, else
//! `python3`. `./scripts/test` installs them into `target/python` and sets
//! `LODESTAR_PYTHON`. Without them these tests fail; they never pass silently.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

// Every wait is bounded, and well within nextest's limit (.config/nextest.toml:
// 4 x 30 s), so that the children are killed here, with what they printed.
/// How long a server may take to announce its address.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a whole interop client run may take (a passing one takes about a second).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(75);
/// How long the Python check, and the stub generation, may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

const TLS_CLIENT_FLAGS: &[&str] = &[
    "--use_tls=true",
    "--use_test_ca=true",
    "--server_host_override=foo.test.google.fr",
];

/// The cases python/interop_client.py runs against lodestar's server.
const PYTHON_CLIENT_CASES: &[&str] = &[
    "empty_unary",
    "large_unary",
    "client_compressed_unary",
    "server_compressed_unary",
    "client_streaming",
    "server_streaming",
    "server_compressed_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "custom_metadata",
    "status_code_and_message",
    "special_status_message",
    "unimplemented_method",
    "unimplemented_service",
];

/// The cases lodestar's client runs against the Python server: all of them
/// but `client_compressed_unary` and `client_compressed_streaming`, which need
/// a server that checks whether each request message arrived compressed
/// (`expect_compressed`). A grpcio server cannot: it never learns a received
/// message's compressed flag, so it cannot answer the uncompressed probe
/// with INVALID_ARGUMENT.
const LODESTAR_CLIENT_CASES: &[&str] = &[
    "empty_unary",
    "large_unary",
    "server_compressed_unary",
    "client_streaming",
    "server_streaming",
    "server_compressed_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "custom_metadata",
    "status_code_and_message",
    "special_status_message",
    "unimplemented_method",
    "unimplemented_service",
];

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Python with grpcio, and the grpc.testing stubs generated for it into a
/// fresh temporary directory, removed when the test ends.
struct Python {
    interpreter: OsString,
    gen_dir: PathBuf,
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.gen_dir);
    }
}

impl Python {
    /// Checks the interpreter has grpcio and grpcio-tools, and generates the stubs.
    fn setup() -> Self {
        let interpreter =
            std::env::var_os("LODESTAR_PYTHON").unwrap_or_else(|| OsString::from("python3"));
        let shown = interpreter.to_string_lossy().into_owned();
        let hint = "Run ./scripts/test, which installs grpcio and grpcio-tools into \
                    target/python and sets LODESTAR_PYTHON, or set LODESTAR_PYTHON to a \
                    Python that has grpcio==1.85.1 and grpcio-tools==1.85.1.";
        let mut check = python_command(&interpreter);
        check.args(["-c", "import grpc, grpc_tools"]);
        let check = match run_bounded(check, SETUP_TIMEOUT) {
            Ok(check) => check,
            Err(e) => panic!("cannot run the Python interpreter `{shown}`: {e}. {hint}"),
        };
        assert!(
            check.status.success(),
            "`{shown} -c 'import grpc, grpc_tools'` failed: the Python interop tests need \
             grpcio and grpcio-tools. {hint}\n{}",
            check.stderr
        );

        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let gen_dir = std::env::temp_dir().join(format!(
            "lodestar-interop-python-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
        ));
        std::fs::create_dir(&gen_dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", gen_dir.display()));
        let python = Self {
            interpreter,
            gen_dir,
        };
        let mut protoc = python.command();
        protoc
            .current_dir(MANIFEST_DIR)
            .args(["-m", "grpc_tools.protoc", "-I", "proto"])
            .arg(flag_with_path("--python_out=", &python.gen_dir))
            .arg(flag_with_path("--grpc_python_out=", &python.gen_dir))
            .args([
                "proto/grpc/testing/empty.proto",
                "proto/grpc/testing/messages.proto",
                "proto/grpc/testing/test.proto",
            ]);
        let generated = run_bounded(protoc, SETUP_TIMEOUT)
            .unwrap_or_else(|e| panic!("run grpc_tools.protoc: {e}"));
        assert!(
            generated.status.success(),
            "grpc_tools.protoc failed:\n{}\n{}",
            generated.stdout,
            generated.stderr
        );
        python
    }

    fn command(&self) -> Command {
        python_command(&self.interpreter)
    }

    /// Runs a script of python/ with the generated stubs.
    fn script(&self, name: &str) -> Command {
        let mut command = self.command();
        command
            .arg(Path::new(MANIFEST_DIR).join("python").join(name))
            .arg(flag_with_path("--gen_dir=", &self.gen_dir));
        command
    }
}

fn python_command(interpreter: &OsString) -> Command {
    let mut command = Command::new(interpreter);
    command
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    command
}

fn flag_with_path(flag: &str, path: &Path) -> OsString {
    let mut arg = OsString::from(flag);
    arg.push(path);
    arg
}

/// What a finished process printed.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn read_all(stream: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = BufReader::new(stream).read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `command` to its end, killing it (and failing) if it takes longer than `timeout`.
fn run_bounded(mut command: Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let mut child = Killed(child);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            drop(child);
            panic!(
                "{command:?} did not finish within {timeout:?}; it printed:\n{}\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Starts a server on a free loopback port and waits (bounded) for the line
/// announcing its address, `<announcement> 127.0.0.1:PORT`.
fn start_server(mut command: Command, announcement: &str) -> (Killed, u16) {
    let mut child = command
        .args(["--port", "0", "--host", "127.0.0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let server = Killed(child);
    let (tx, rx) = mpsc::channel();
    // Reads stdout to its end, so that the server never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + ANNOUNCE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{command:?} did not announce its address within {ANNOUNCE_TIMEOUT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{command:?} exited before announcing its address")
            }
        };
        let Some(address) = line.strip_prefix(announcement) else {
            eprintln!("server: {line}");
            continue;
        };
        let port = address
            .trim()
            .strip_prefix("127.0.0.1:")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no 127.0.0.1:PORT in {line:?}"));
        return (server, port);
    }
}

/// Runs an interop client for `cases` against 127.0.0.1:`port`, and checks
/// that it succeeded and that every case passed.
fn run_client(mut command: Command, port: u16, cases: &[&str], extra: &[&str], how: &str) {
    command
        .args(["--server_host", "127.0.0.1", "--server_port"])
        .arg(port.to_string())
        .args(["--test_case", &cases.join(",")])
        .args(extra);
    let output = run_bounded(command, CLIENT_TIMEOUT)
        .unwrap_or_else(|e| panic!("run the interop client {how}: {e}"));
    let report = format!(
        "{how}:\n--- stdout\n{}--- stderr\n{}",
        output.stdout, output.stderr
    );
    assert!(
        output.status.success(),
        "the interop client failed {report}"
    );
    for case in cases {
        let pass = format!("PASS {case}");
        assert!(
            output.stdout.lines().any(|line| line == pass),
            "{case} did not pass {report}"
        );
    }
}

fn lodestar_server(extra: &[&str]) -> (Killed, u16) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar-interop-server"));
    command.args(extra);
    start_server(command, "lodestar-interop-server listening on ")
}

fn python_server(python: &Python, extra: &[&str]) -> (Killed, u16) {
    let mut command = python.script("interop_server.py");
    command.args(extra);
    start_server(command, "python interop server listening on ")
}

#[test]
fn python_client_passes_against_lodestar_server_in_plaintext() {
    let python = Python::setup();
    let (_server, port) = lodestar_server(&[]);
    run_client(
        python.script("interop_client.py"),
        port,
        PYTHON_CLIENT_CASES,
        &[],
        "Python client -> lodestar server, plaintext",
    );
}

#[test]
fn python_client_passes_against_lodestar_server_over_tls() {
    let python = Python::setup();
    let (_server, port) = lodestar_server(&["--use_tls=true"]);
    run_client(
        python.script("interop_client.py"),
        port,
        PYTHON_CLIENT_CASES,
        TLS_CLIENT_FLAGS,
        "Python client -> lodestar server, TLS",
    );
}

#[test]
fn lodestar_client_passes_against_python_server_in_plaintext() {
    let python = Python::setup();
    let (_server, port) = python_server(&python, &[]);
    run_client(
        Command::new(env!("CARGO_BIN_EXE_lodestar-interop-client")),
        port,
        LODESTAR_CLIENT_CASES,
        &[],
        "lodestar client -> Python server, plaintext",
    );
}

#[test]
fn lodestar_client_passes_against_python_server_over_tls() {
    let python = Python::setup();
    let (_server, port) = python_server(&python, &["--use_tls=true"]);
    run_client(
        Command::new(env!("CARGO_BIN_EXE_lodestar-interop-client")),
        port,
        LODESTAR_CLIENT_CASES,
        TLS_CLIENT_FLAGS,
        "lodestar client -> Python server, TLS",
    );
}

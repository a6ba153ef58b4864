//! A real browser for the tests: headless Chromium (Debian's `chromium`,
//! never a downloaded build) driven by npm's `playwright-core` (installed by
//! `scripts/test` into `target/npm`) through `browser/drive.mjs`, which
//! prints what a page showed as JSON.
//!
//! Without node, Chromium or playwright-core, [`tools`] says so and the
//! test passes, unless `CI` is set: there the browser tests must run.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What drives the browser.
#[derive(Debug)]
pub struct Tools {
    node: String,
    chromium: String,
    /// A `node_modules` folder holding `playwright-core`.
    playwright: PathBuf,
}

/// The tools (`LODESTAR_NODE`, default `node`; `LODESTAR_CHROMIUM`,
/// default `/usr/bin/chromium`; `LODESTAR_PLAYWRIGHT`, default the
/// workspace's `target/npm/node_modules`), or `None` with a message when
/// one is missing outside CI. Under `CI`, a missing tool fails the test.
pub fn tools() -> Option<Tools> {
    let node = std::env::var("LODESTAR_NODE").unwrap_or_else(|_| "node".to_owned());
    let chromium =
        std::env::var("LODESTAR_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let playwright = std::env::var_os("LODESTAR_PLAYWRIGHT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/npm/node_modules")
        });
    let node_runs = Command::new(&node)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let missing = if !node_runs {
        Some(format!("node (`{node}`; Debian: apt-get install nodejs)"))
    } else if !Path::new(&chromium).is_file() {
        Some(format!(
            "Chromium (`{chromium}`; Debian: apt-get install chromium; or set LODESTAR_CHROMIUM)"
        ))
    } else if !playwright.join("playwright-core/package.json").is_file() {
        Some(format!(
            "playwright-core in {} (npm; or set LODESTAR_PLAYWRIGHT)",
            playwright.display()
        ))
    } else {
        None
    };
    match missing {
        None => Some(Tools {
            node,
            chromium,
            playwright,
        }),
        Some(what) if std::env::var_os("CI").is_some() => {
            panic!(
                "the browser tests must run under CI, but {what} is missing: ./scripts/test installs it"
            )
        }
        Some(what) => {
            eprintln!("skipping the browser test: {what} is missing (./scripts/test installs it)");
            None
        }
    }
}

/// Opens `url` in headless Chromium and returns what `drive.mjs` read
/// from the page: `mode` `example` (`examples/route-guide`'s page) or
/// `probe` (a page that leaves JSON in `#results` and sets
/// `body[data-state]` to `done`). Blocking, bounded: 90 s at most.
pub fn drive(tools: &Tools, mode: &str, url: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/browser/drive.mjs");
    let mut child = Command::new(&tools.node)
        .args([script, mode, url])
        .env("LODESTAR_PLAYWRIGHT", &tools.playwright)
        .env("LODESTAR_CHROMIUM", &tools.chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("drive.mjs {mode} {url} did not end within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("node's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        status.success(),
        "drive.mjs {mode} {url} failed ({status:?}):\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Serves `page` to a `GET /` (any query) from a loopback port of its own,
/// in a thread: a page of another origin than a service's. Returns that
/// origin, `http://127.0.0.1:PORT`.
pub fn serve_page(page: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a page server");
    let origin = format!("http://{}", listener.local_addr().expect("its address"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            // A thread for each connection: a browser may open one and
            // send nothing on it.
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let (status, body) = if head.starts_with(b"GET / ") || head.starts_with(b"GET /?") {
                    ("200 OK", page)
                } else {
                    ("404 Not Found", "")
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    origin
}

//! The example page in a real browser: headless Chromium (Debian's
//! `chromium`, never a downloaded build) driven by `playwright-core` (npm,
//! installed by `scripts/test` into `target/npm`) through `drive.mjs`.
//!
//! Without node, Chromium or playwright-core the tests say so and pass,
//! unless `CI` is set: there they must run.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::{start_server, wait_with_timeout};

/// What drives the browser.
struct Tools {
    node: String,
    chromium: String,
    /// A `node_modules` folder holding `playwright-core`.
    playwright: PathBuf,
}

/// The tools, or `None` (with a message) when one is missing outside CI.
fn tools() -> Option<Tools> {
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

/// Opens `url` in headless Chromium and returns what `drive.mjs` read from
/// the page (`mode`: `example` or `probe`).
fn drive(tools: &Tools, mode: &str, url: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/drive.mjs");
    let mut child = Command::new(&tools.node)
        .args([script, mode, url])
        .env("LODESTAR_PLAYWRIGHT", &tools.playwright)
        .env("LODESTAR_CHROMIUM", &tools.chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    let status = wait_with_timeout(&mut child, Duration::from_secs(90));
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

/// Serves `page` to any `GET` from a loopback port of its own: a page of
/// another origin than the service's. Returns that origin.
fn serve_page(page: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a page server");
    let origin = format!("http://{}", listener.local_addr().expect("its address"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            // A connection of its own each: a browser may open one and
            // send nothing.
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

const CROSS_ORIGIN_PAGE: &str = include_str!("cross_origin.html");

#[test]
fn chromium_loads_the_example_page_from_the_service_and_makes_all_four_calls() {
    let Some(tools) = tools() else { return };
    let (_server, address) = start_server(&[]);
    let page = drive(&tools, "example", &format!("http://{address}/"));
    assert_eq!(page["state"], "done", "every call succeeded: {page:#}");
    // GetFeature (unary, Connect JSON over fetch).
    assert_eq!(
        page["feature"], "Lodestar Trailhead, Kestrel Ridge, NJ, USA",
        "{page:#}"
    );
    // ListFeatures (server streaming, Connect envelopes read as they come).
    assert_eq!(page["listed"], 100, "{page:#}");
    assert_eq!(page["listedShown"], "100", "{page:#}");
    // RecordRoute (client streaming, WebSocket).
    assert_eq!(page["pointCount"], "10", "{page:#}");
    // RouteChat (bidi, WebSocket): each note brings back the earlier ones
    // at its place.
    assert_eq!(
        page["chat"],
        json!(["First message", "Second message", "Third message"]),
        "{page:#}"
    );
}

#[test]
fn chromium_refuses_a_page_from_a_disallowed_origin_and_lets_an_allowed_one_call() {
    let Some(tools) = tools() else { return };
    let allowed = serve_page(CROSS_ORIGIN_PAGE);
    let disallowed = serve_page(CROSS_ORIGIN_PAGE);
    let (_server, address) = start_server(&["--allow-origin", &allowed]);
    let service = format!("http://{address}");
    let feature = "Lodestar Trailhead, Kestrel Ridge, NJ, USA";

    // An allowed origin: CORS lets fetch read the answers, and the socket
    // opens.
    let ok = drive(&tools, "probe", &format!("{allowed}/?service={service}"));
    assert_eq!(ok["state"], "done", "{ok:#}");
    assert_eq!(ok["unary"]["ok"], feature, "{ok:#}");
    assert_eq!(ok["clientStream"]["ok"], 2, "{ok:#}");
    assert_eq!(ok["fetch"]["ok"], format!("200 {feature}"), "{ok:#}");
    assert_eq!(ok["websocket"]["ok"][0], "open lodestar.v1+json", "{ok:#}");

    // A disallowed origin: the preflight is refused (403), so fetch fails
    // with a CORS error; the WebSocket opening gets 403, so the socket
    // errors and closes without opening.
    let no = drive(&tools, "probe", &format!("{disallowed}/?service={service}"));
    assert_eq!(no["state"], "done", "{no:#}");
    assert!(no.get("import").is_none(), "the client loads: {no:#}");
    assert_eq!(no["unary"]["error"]["code"], "unavailable", "{no:#}");
    assert_eq!(no["unary"]["error"]["name"], "LodestarError", "{no:#}");
    assert_eq!(no["clientStream"]["error"]["code"], "unavailable", "{no:#}");
    assert_eq!(no["fetch"]["error"]["name"], "TypeError", "{no:#}");
    assert_eq!(
        no["websocket"]["ok"],
        json!(["error", "close 1006"]),
        "{no:#}"
    );
    let console: Vec<&str> = no["console"]
        .as_array()
        .map(|lines| lines.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        console
            .iter()
            .any(|line| line.contains("blocked by CORS policy")),
        "the browser blames CORS: {console:#?}"
    );
    assert!(
        console
            .iter()
            .any(|line| line.contains("WebSocket") && line.contains("403")),
        "the browser saw the WebSocket opening refused with 403: {console:#?}"
    );
}

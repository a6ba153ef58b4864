//! A real OTLP collector for tests: `rotel-agent` (PyPI's `rotel` wheel),
//! on free loopback ports, printing the spans it receives, which are read
//! back from its output. Stopped when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// The rotel-agent binary: `LODESTAR_ROTEL` (which `scripts/test` sets),
/// else `rotel-agent` on the PATH.
pub fn binary() -> String {
    crate::find_binary(
        "LODESTAR_ROTEL",
        &["rotel-agent"],
        "the trace export tests need it (pip install rotel==0.0.1a15; its wheel carries the binary)",
    )
}

/// One span as the collector printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectedSpan {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub id: String,
    /// 16 hex digits; empty for a root span.
    pub parent_id: String,
    /// The span's name.
    pub name: String,
    /// `SPAN_KIND_SERVER` and so on.
    pub kind: String,
    /// The attributes (and the resource's), as printed: `key: Type(value)`.
    pub attributes: Vec<String>,
}

/// A running collector.
#[derive(Debug)]
pub struct Rotel {
    /// Its OTLP/gRPC address.
    pub grpc: SocketAddr,
    /// Its OTLP/HTTP address.
    pub http: SocketAddr,
    child: Child,
    output: Arc<Mutex<String>>,
    changed: watch::Receiver<usize>,
}

impl Rotel {
    /// Starts one and waits until both its ports accept connections.
    pub async fn start() -> Rotel {
        let grpc = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let mut child = Command::new(binary())
            .args([
                "start",
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
                "--otlp-grpc-endpoint",
            ])
            .arg(grpc.to_string())
            .arg("--otlp-http-endpoint")
            .arg(http.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rotel-agent");
        let output = Arc::new(Mutex::new(String::new()));
        let (tell, changed) = watch::channel(0);
        let tell = Arc::new(tell);
        for stream in [
            Box::new(child.stdout.take().expect("piped stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("piped stderr")),
        ] {
            let (output, tell) = (output.clone(), tell.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let mut output = output.lock().unwrap_or_else(|e| e.into_inner());
                    output.push_str(&line);
                    output.push('\n');
                    drop(output);
                    tell.send_modify(|n| *n += 1);
                }
            });
        }
        let rotel = Rotel {
            grpc,
            http,
            child,
            output,
            changed,
        };
        crate::bounded("rotel-agent to accept connections", async {
            for address in [grpc, http] {
                while tokio::net::TcpStream::connect(address).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
        .await;
        rotel
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The spans it printed so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        parse(&self.output())
    }

    /// Waits (at most [`TIMEOUT`](crate::TIMEOUT)) until the spans it
    /// printed satisfy `enough`, and returns them.
    pub async fn spans_until(
        &self,
        enough: impl Fn(&[CollectedSpan]) -> bool,
    ) -> Vec<CollectedSpan> {
        let mut changed = self.changed.clone();
        let waited = tokio::time::timeout(crate::TIMEOUT, async {
            loop {
                let spans = self.spans();
                if enough(&spans) {
                    return spans;
                }
                if changed.changed().await.is_err() {
                    return self.spans();
                }
            }
        })
        .await;
        match waited {
            Ok(spans) if enough(&spans) => spans,
            _ => panic!(
                "the collector did not print the spans expected within {:?}; it printed:\n{}",
                crate::TIMEOUT,
                self.output()
            ),
        }
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the spans out of rotel's detailed debug log:
///
/// ```text
/// Span #0
///     Trace ID       : 4bf92f3577b34da6a3ce929d0e0e4736
///     Parent ID      : 1111111111111111
///     ID             : 00f067aa0ba902b7
///     Name           : demo.Echo/Say
///     Kind           : SPAN_KIND_SERVER
/// Attributes:
///      -> rpc.method: Str(demo.Echo/Say)
/// ```
pub fn parse(output: &str) -> Vec<CollectedSpan> {
    let mut spans = Vec::new();
    let mut current: Option<CollectedSpan> = None;
    for line in output.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("Span #") {
            spans.extend(current.take());
            current = Some(CollectedSpan::default());
            continue;
        }
        if trimmed.starts_with("ResourceSpans #") || trimmed.starts_with("ScopeSpans #") {
            spans.extend(current.take());
            continue;
        }
        let Some(span) = current.as_mut() else {
            continue;
        };
        if let Some(attribute) = trimmed.strip_prefix("-> ") {
            span.attributes.push(attribute.to_owned());
            continue;
        }
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        let value = value.trim().to_owned();
        match key.trim() {
            "Trace ID" => span.trace_id = value,
            "Parent ID" => span.parent_id = value,
            "ID" => span.id = value,
            "Name" => span.name = value,
            "Kind" => span.kind = value,
            _ => {}
        }
    }
    spans.extend(current);
    spans
}

//! A child process for tests: killed when dropped, its stdout lines
//! delivered as they come, its stderr collected; every wait bounded.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long [`Proc`] waits for a line or a message before failing the test.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A child process, killed when dropped; its stdout lines arrive on a
/// channel, its stderr is collected for failure messages.
#[derive(Debug)]
pub struct Proc {
    /// The process (its stdin is whatever the command set).
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `command` with stdout and stderr piped.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let collected = Arc::new(Mutex::new(String::new()));
        let sink = collected.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut all = sink.lock().unwrap_or_else(|e| e.into_inner());
                all.push_str(&line);
                all.push('\n');
            }
        });
        Self {
            child,
            lines,
            stderr: collected,
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The next stdout line, which must come within [`TIMEOUT`].
    pub fn next_line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("no stdout line: {what}; stderr:\n{}", self.stderr()))
    }

    /// The next stdout line within `timeout`, if one comes.
    pub fn try_next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// What follows `prefix` on the first stdout line that has it, which
    /// must come within [`TIMEOUT`].
    pub fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line `{prefix}…`; stderr:\n{}", self.stderr()));
            // (libtest may print the test's name on the same line first)
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim().to_owned();
            }
        }
    }

    /// Waits, at most [`TIMEOUT`], until stderr says `needle`.
    pub fn wait_stderr(&self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no `{needle}`; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process and waits for it.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

//! Progress for anything that takes more than a second: a line on stderr
//! saying what the command waits for, with the time spent, shown only once
//! a second has passed and cleared when the wait ends.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a wait goes unmentioned.
const QUIET: Duration = Duration::from_secs(1);

/// How often the line is redrawn on a terminal.
const TICK: Duration = Duration::from_millis(250);

/// A wait being reported; the report stops when this is dropped.
#[derive(Debug)]
pub(crate) struct Progress {
    task: tokio::task::JoinHandle<()>,
    /// Set once a line is on a terminal, to be erased.
    drawn: Arc<AtomicBool>,
}

/// Reports `what` (e.g. "connecting to lodestar://10.0.0.1:7070") on stderr
/// if it is still going on after a second. On a terminal the line counts
/// the seconds and is erased at the end; otherwise it is printed once.
pub(crate) fn waiting(what: impl Into<String>) -> Progress {
    let what = what.into();
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    let drawn = Arc::new(AtomicBool::new(false));
    let shown = drawn.clone();
    let task = tokio::spawn(async move {
        tokio::time::sleep(QUIET).await;
        if !terminal {
            eprintln!("lodestar: {what}…");
            return;
        }
        shown.store(true, Ordering::Relaxed);
        loop {
            {
                let mut stderr = std::io::stderr().lock();
                let _ = write!(
                    stderr,
                    "\r\x1b[2Klodestar: {what}… {}s",
                    started.elapsed().as_secs()
                );
                let _ = stderr.flush();
            }
            tokio::time::sleep(TICK).await;
        }
    });
    Progress { task, drawn }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        if self.drawn.load(Ordering::Relaxed) {
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[2K");
            let _ = stderr.flush();
        }
    }
}

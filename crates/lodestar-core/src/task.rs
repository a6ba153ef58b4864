//! Tasks tied to the lifetime of their owner.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::{JoinError, JoinHandle};

/// Owns a spawned task and aborts it when dropped, so that a background
/// task (a watch, a heartbeat, an accept loop) lives exactly as long as
/// whatever holds this.
///
/// Awaiting it awaits the task, like its [`JoinHandle`].
///
/// ```
/// use lodestar_core::task::AbortOnDrop;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let forever = AbortOnDrop::new(tokio::spawn(std::future::pending::<()>()));
/// assert!(!forever.is_finished());
/// drop(forever); // the task is aborted
///
/// let answer = AbortOnDrop::new(tokio::spawn(async { 42 }));
/// assert_eq!(answer.await.ok(), Some(42));
/// # }
/// ```
#[derive(Debug)]
pub struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Takes ownership of `task`: it is aborted when this is dropped.
    pub fn new(task: JoinHandle<T>) -> Self {
        Self(task)
    }

    /// Whether the task has ended (finished, panicked or been aborted).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Aborts the task now; awaiting this then reports it cancelled, unless
    /// it had already ended.
    pub fn abort(&self) {
        self.0.abort();
    }
}

impl<T> From<JoinHandle<T>> for AbortOnDrop<T> {
    fn from(task: JoinHandle<T>) -> Self {
        Self::new(task)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn dropping_it_aborts_the_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = AbortOnDrop::new(tokio::spawn(async move {
            // Holds `tx` until aborted.
            let _tx = tx;
            std::future::pending::<()>().await;
        }));
        drop(task);
        // The sender is dropped only if the task was aborted.
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the task was not aborted")
            .expect_err("the task sent instead of being aborted");
    }

    #[tokio::test]
    async fn awaiting_it_gives_the_tasks_output() {
        let task = AbortOnDrop::from(tokio::spawn(async { "done" }));
        assert_eq!(task.await.unwrap(), "done");
        let aborted = AbortOnDrop::new(tokio::spawn(std::future::pending::<()>()));
        aborted.abort();
        assert!(aborted.await.unwrap_err().is_cancelled());
    }
}

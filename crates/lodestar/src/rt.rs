//! The executor lodestar gives hyper for the tasks it spawns per call.

use std::future::Future;

/// Spawns hyper's tasks on tokio, boxed first.
///
/// hyper spawns a task for every HTTP/2 request it sends (and every stream
/// it serves), and the future it spawns is an enum as large as its largest
/// variant (the whole connection task): a kilobyte or more. `tokio::spawn`
/// moves a future by value through several calls before it lands in the
/// task, copying it each time; boxed, each move is a pointer, and the one
/// copy is into the box.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future));
    }
}

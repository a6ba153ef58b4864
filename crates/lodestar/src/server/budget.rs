//! What a server holds for responses its clients have not read yet.
//!
//! Every chunk of response data a call hands to HTTP/2 is counted against
//! its connection's budget and the server's, from the moment the handler's
//! body yields it until HTTP/2 has written it to the socket (or dropped it,
//! when the stream or the connection ends). A client that stops reading —
//! or never opens its flow-control window — therefore pins at most its
//! connection's budget, and all such clients together at most the
//! server's. A chunk that does not fit ends its call with
//! `RESOURCE_EXHAUSTED` instead of being queued.
//!
//! The counting is a few atomic operations per chunk and per write, and
//! allocates nothing: the count travels inside the chunk ([`Sending`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

/// The budget of the whole server, shared by its connections.
#[derive(Debug)]
pub(crate) struct ServerBudget {
    held: AtomicUsize,
    limit: usize,
}

impl ServerBudget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            limit,
        })
    }
}

/// The budget of one connection, and how much of its data has been sent
/// (to tell a stalled connection from a slow one).
#[derive(Debug)]
pub(crate) struct ConnectionBudget {
    held: AtomicUsize,
    sent: AtomicU64,
    limit: usize,
    server: Arc<ServerBudget>,
}

impl ConnectionBudget {
    pub(crate) fn new(limit: usize, server: Arc<ServerBudget>) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            limit,
            server,
        })
    }

    /// Bytes of response data waiting to be written.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Bytes of response data written so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Counts `bytes` more as held, if both budgets have room for them.
    fn reserve(self: &Arc<Self>, bytes: usize) -> Result<Reservation, tonic::Status> {
        let before = self.held.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.limit {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return Err(tonic::Status::resource_exhausted(format!(
                "this connection already holds {before} bytes of responses its client has \
                 not read; {bytes} more would pass the limit of {} bytes \
                 (ConnectionLimits::max_unsent_bytes_per_connection)",
                self.limit
            )));
        }
        let server = &self.server;
        let before_all = server.held.fetch_add(bytes, Ordering::Relaxed);
        if before_all.saturating_add(bytes) > server.limit {
            server.held.fetch_sub(bytes, Ordering::Relaxed);
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return Err(tonic::Status::resource_exhausted(format!(
                "the server already holds {before_all} bytes of responses its clients have \
                 not read; {bytes} more would pass the limit of {} bytes \
                 (ConnectionLimits::max_unsent_bytes)",
                server.limit
            )));
        }
        Ok(Reservation {
            budget: self.clone(),
            bytes,
        })
    }
}

/// Bytes counted as held; given back as they are written, the rest when dropped.
#[derive(Debug)]
struct Reservation {
    budget: Arc<ConnectionBudget>,
    bytes: usize,
}

impl Reservation {
    fn written(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        self.budget.held.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.server.held.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return; // all written: nothing left to give back
        }
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.budget
            .server
            .held
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A chunk of response data on its way out, counted until it is written.
#[derive(Debug)]
pub(crate) struct Sending {
    data: Bytes,
    held: Option<Reservation>,
}

impl Buf for Sending {
    fn remaining(&self) -> usize {
        self.data.len()
    }

    fn chunk(&self) -> &[u8] {
        &self.data
    }

    fn advance(&mut self, cnt: usize) {
        self.data.advance(cnt);
        if let Some(held) = &mut self.held {
            held.written(cnt);
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        let bytes = self.data.copy_to_bytes(len);
        if let Some(held) = &mut self.held {
            held.written(len);
        }
        bytes
    }
}

/// A response body that learns when the budget ends its call.
pub(crate) trait EndsCall {
    /// The call ends with `status`: the body is not polled again. The
    /// frame that tells the peer, as the body's protocol says: native
    /// gRPC's trailers; a web protocol's last frame in the body (an HTTP/1.1
    /// client that did not ask for trailers never sees them).
    fn ended(self: Pin<&mut Self>, status: &tonic::Status) -> Frame<Bytes>;
}

pin_project_lite::pin_project! {
    /// A response body whose data is counted against its connection's budget.
    pub(crate) struct Budgeted<B> {
        #[pin]
        inner: B,
        budget: Option<Arc<ConnectionBudget>>,
        done: bool,
    }
}

impl<B> Budgeted<B> {
    /// Counts `inner`'s data against `budget` (none: not counted).
    pub(crate) fn new(inner: B, budget: Option<Arc<ConnectionBudget>>) -> Self {
        Self {
            inner,
            budget,
            done: false,
        }
    }
}

impl<B: Body<Data = Bytes> + EndsCall> Body for Budgeted<B> {
    type Data = Sending;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Sending>, B::Error>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return Poll::Ready(Some(Err(error))),
            None => return Poll::Ready(None),
        };
        let held = match (frame.data_ref(), this.budget.as_ref()) {
            (Some(data), Some(budget)) if !data.is_empty() => match budget.reserve(data.len()) {
                Ok(held) => Some(held),
                Err(status) => {
                    // The chunk is dropped here; the call ends with why (a
                    // few bytes, past the budget).
                    *this.done = true;
                    let last = this.inner.ended(&status);
                    tracing::debug!(error = %status.message(), "response refused");
                    return Poll::Ready(Some(Ok(
                        last.map_data(|data| Sending { data, held: None })
                    )));
                }
            },
            _ => None,
        };
        Poll::Ready(Some(Ok(frame.map_data(|data| Sending { data, held }))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            return SizeHint::with_exact(0);
        }
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_held_until_written_or_dropped() {
        let server = ServerBudget::new(100);
        let a = ConnectionBudget::new(60, server.clone());
        let b = ConnectionBudget::new(60, server.clone());
        let mut first = a.reserve(50).unwrap();
        // Over the connection's budget, then over the server's.
        let error = a.reserve(20).unwrap_err();
        assert!(
            error.message().contains("connection already holds 50"),
            "{error:?}"
        );
        let second = b.reserve(40).unwrap();
        let error = b.reserve(20).unwrap_err();
        assert!(
            error.message().contains("server already holds 90"),
            "{error:?}"
        );
        assert_eq!((a.held(), b.held()), (50, 40));
        first.written(30);
        assert_eq!((a.held(), a.sent()), (20, 30));
        let third = b.reserve(20).unwrap();
        drop((first, second, third));
        assert_eq!((a.held(), b.held()), (0, 0));
        assert_eq!(server.held.load(Ordering::Relaxed), 0);
        assert_eq!(a.sent(), 30, "dropped bytes were not sent");
    }
}

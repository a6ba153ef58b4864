//! Deadlines that follow a call from service to service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::grpc_timeout;

tokio::task_local! {
    static CURRENT: Deadline;
}

/// The instant by which a call must finish.
///
/// A caller sets a timeout per call (`tonic::Request::set_timeout`) or per
/// client ([`ClientBuilder::timeout`](crate::client::ClientBuilder::timeout));
/// it travels to the server in the standard `grpc-timeout` header. When the
/// deadline passes, the caller gets `DEADLINE_EXCEEDED` and the server's
/// handler is cancelled (its future is dropped).
///
/// While a lodestar server runs a handler, the inbound deadline is the
/// *current* deadline: every call made through a lodestar client inside that
/// handler finishes by it at the latest, without any code in the handler.
/// Work moved to another task can carry it along with [`Deadline::scope`].
///
/// ```
/// use std::time::Duration;
/// use lodestar::Deadline;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let deadline = Deadline::after(Duration::from_secs(2));
/// let remaining = deadline
///     .scope(async { Deadline::current().unwrap().remaining() })
///     .await;
/// assert!(remaining <= Duration::from_secs(2));
/// assert!(Deadline::current().is_none());
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// A deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Self(instant)
    }

    /// The instant of the deadline.
    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.0
    }

    /// The deadline of the call being served by this task, if it has one.
    pub fn current() -> Option<Deadline> {
        CURRENT.try_with(|d| *d).ok()
    }

    /// The deadline of an inbound request, as read from its `grpc-timeout`.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Option<Deadline> {
        request.extensions().get::<Deadline>().copied()
    }

    /// Runs `future` with this as the current deadline (or the current one,
    /// if that is earlier), so that lodestar calls made inside it are bounded by it.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        let effective = Deadline::current().map_or(self, |current| current.min(self));
        CURRENT.scope(effective, future).await
    }
}

/// The deadline for an outbound request: the earliest of its own
/// `grpc-timeout`, the current inbound deadline, and the client default.
/// Rewrites the header to the time that is left.
pub(crate) fn outbound(headers: &mut HeaderMap, default: Option<Duration>) -> Option<Deadline> {
    let now = Instant::now();
    let candidates = [
        headers
            .get(grpc_timeout::HEADER)
            .and_then(grpc_timeout::parse)
            .map(|d| Deadline(now + d)),
        Deadline::current(),
        default.map(|d| Deadline(now + d)),
    ];
    let deadline = candidates.into_iter().flatten().min()?;
    headers.insert(
        grpc_timeout::HEADER,
        grpc_timeout::encode(deadline.remaining()),
    );
    Some(deadline)
}

/// The deadline of an inbound request, from its `grpc-timeout` header.
pub(crate) fn inbound(headers: &HeaderMap) -> Option<Deadline> {
    headers
        .get(grpc_timeout::HEADER)
        .and_then(grpc_timeout::parse)
        .map(Deadline::after)
}

pub(crate) fn exceeded(context: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("deadline exceeded {context}"))
}

pin_project_lite::pin_project! {
    /// A response body that ends at a deadline.
    ///
    /// On the client, a body still open at the deadline fails with
    /// `DEADLINE_EXCEEDED`. On the server, it is replaced by trailers saying
    /// `DEADLINE_EXCEEDED`, and the handler's stream is dropped.
    pub struct DeadlineBody<B> {
        #[pin]
        inner: B,
        sleep: Option<Pin<Box<Sleep>>>,
        side: Side,
        done: bool,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// Fail the body.
    Client,
    /// End the body with trailers.
    Server,
}

impl<B> std::fmt::Debug for DeadlineBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineBody")
            .field("done", &self.done)
            .finish()
    }
}

impl<B> DeadlineBody<B> {
    pub(crate) fn new(inner: B, deadline: Option<Deadline>, side: Side) -> Self {
        Self {
            inner,
            sleep: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.0))),
            side,
            done: false,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            *this.done = true;
            let status = exceeded("while streaming the response");
            return Poll::Ready(Some(match this.side {
                Side::Client => Err(Box::new(status)),
                Side::Server => {
                    let mut trailers = HeaderMap::new();
                    trailers.insert(
                        "grpc-status",
                        HeaderValue::from(tonic::Code::DeadlineExceeded as i32),
                    );
                    if let Ok(message) = HeaderValue::from_str(status.message()) {
                        trailers.insert("grpc-message", message);
                    }
                    Ok(Frame::trailers(trailers))
                }
            }));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

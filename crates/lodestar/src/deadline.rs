//! Deadlines that follow a call from service to service.

use std::future::Future;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;

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
    /// A deadline `timeout` from now (timeouts too large for the clock mean
    /// "decades from now").
    pub fn after(timeout: Duration) -> Self {
        Self(later(Instant::now(), timeout))
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

/// `now + d`, saturating at a point decades away instead of overflowing.
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    const DECADES: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    now.checked_add(d.min(DECADES))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

/// Runs `f` with `deadline` as the current deadline (or the current one, if
/// that is earlier). For code that polls futures or streams by hand.
pub(crate) fn sync_scope<R>(deadline: Deadline, f: impl FnOnce() -> R) -> R {
    let effective = Deadline::current().map_or(deadline, |current| current.min(deadline));
    CURRENT.sync_scope(effective, f)
}

/// The deadline for an outbound request: the earliest of its own
/// `grpc-timeout`, `current` (the deadline of the call being served), and
/// the client default. A malformed `grpc-timeout` (set by hand in the
/// request's metadata) is refused rather than sent.
pub(crate) fn outbound(
    headers: &HeaderMap,
    current: Option<Deadline>,
    default: Option<Duration>,
) -> Result<Option<Deadline>, tonic::Status> {
    let own = timeout(crate::headers::find_header(headers, &grpc_timeout::HEADER))?;
    if own.is_none() && default.is_none() {
        // The common call: no clock read.
        return Ok(current);
    }
    let now = Instant::now();
    Ok([
        own.map(|d| Deadline(later(now, d))),
        current,
        default.map(|d| Deadline(later(now, d))),
    ]
    .into_iter()
    .flatten()
    .min())
}

/// Sets `grpc-timeout` to the time left until `deadline`, just before a
/// request goes out (again).
pub(crate) fn set_header(headers: &mut HeaderMap, deadline: Deadline) {
    headers.insert(
        grpc_timeout::HEADER,
        grpc_timeout::encode(deadline.remaining()),
    );
}

/// The deadline of an inbound request, from the value of its `grpc-timeout`
/// header ([`grpc_timeout::HEADER`]), if it has one; a malformed one is an
/// error (`INTERNAL`, as grpc-go answers it), so that a call is never
/// served without the deadline its caller meant to set.
pub(crate) fn inbound(value: Option<&HeaderValue>) -> Result<Option<Deadline>, tonic::Status> {
    Ok(timeout(value)?.map(Deadline::after))
}

/// The duration a `grpc-timeout` value says, if there is one.
fn timeout(value: Option<&HeaderValue>) -> Result<Option<Duration>, tonic::Status> {
    let Some(value) = value else {
        return Ok(None);
    };
    grpc_timeout::parse(value).map(Some).ok_or_else(|| {
        // Quote a short value; a long one is wrong whatever it says.
        const QUOTED: usize = 16;
        let shown = match value.as_bytes() {
            short if short.len() <= QUOTED => format!("{:?}", String::from_utf8_lossy(short)),
            long => format!("of {} bytes", long.len()),
        };
        tonic::Status::internal(format!(
            "malformed grpc-timeout {shown}: expected 1 to 8 ASCII digits and a unit (H, M, S, m, u or n)"
        ))
    })
}

pub(crate) fn exceeded(context: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("deadline exceeded {context}"))
}

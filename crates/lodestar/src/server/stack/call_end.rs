//! [`CallEnd`]: how a layer learns each call's final gRPC status.

use std::borrow::Cow;
use std::cell::Cell;
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;
use tonic::Code;

use crate::Deadline;
use crate::metrics::rpc::Record;
use crate::server::admission::Slot;

/// A hook called once, when its call ends.
type Hook = Box<dyn FnOnce(&CallOutcome<'_>) + Send>;

/// Where a call's end is announced: in the extensions of every request the
/// server's layers (and handlers) see. A layer registers a hook with
/// [`on_end`](Self::on_end) and learns the call's **final** status, exactly
/// once, whatever ends it:
///
/// * the handler's status, in the response headers (trailers-only) or in
///   the trailers after a stream;
/// * `DEADLINE_EXCEEDED` when the inbound deadline passes, before the
///   handler answers or while its response streams;
/// * `CANCELLED` when the client resets the stream, drops the call or the
///   connection closes, including before the handler answers;
/// * the status a layer's error was mapped to (see
///   [`ServiceBuilder::layer`](crate::ServiceBuilder::layer));
/// * `RESOURCE_EXHAUSTED` when a response does not fit the unsent-byte
///   budget ([`ConnectionLimits`](crate::server::ConnectionLimits)).
///
/// Metrics, outlier, logging and load-shedding layers build on it. A call
/// that nobody watches costs nothing: no allocation, no clock read. Hooks
/// run on the task that serves the call, at its end: they should be quick
/// and must not panic.
///
/// A hook is registered with the call being served on the current task:
/// from a layer's `call`, or while its future or response body is polled.
/// (A layer that hands calls to another task, such as tower's `Buffer`,
/// cannot register from there: [`on_end`](Self::on_end) says so.)
///
/// ```
/// use std::task::{Context, Poll};
/// use lodestar::server::{CallEnd, RequestBody};
///
/// /// Logs how each call ended.
/// #[derive(Clone)]
/// struct Log<S>(S);
///
/// impl<S> tower_service::Service<http::Request<RequestBody>> for Log<S>
/// where
///     S: tower_service::Service<http::Request<RequestBody>>,
/// {
///     type Response = S::Response;
///     type Error = S::Error;
///     type Future = S::Future;
///
///     fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
///         self.0.poll_ready(cx)
///     }
///
///     fn call(&mut self, request: http::Request<RequestBody>) -> S::Future {
///         let path = request.uri().path().to_owned();
///         if let Some(end) = request.extensions().get::<CallEnd>() {
///             end.on_end(move |outcome| {
///                 println!("{path}: {:?} after {:?}: {}", outcome.code(), outcome.elapsed(), outcome.message());
///             });
///         }
///         self.0.call(request)
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct CallEnd {
    _private: (),
}

impl CallEnd {
    /// The handle requests carry.
    pub(crate) const HANDLE: CallEnd = CallEnd { _private: () };

    /// Calls `hook` with the final outcome of the call being served on
    /// this task, when it ends. Returns whether it was registered: it is
    /// not outside the task serving a call (see above).
    pub fn on_end(&self, hook: impl FnOnce(&CallOutcome<'_>) + Send + 'static) -> bool {
        watch(|watched| watched.hooks.push(Box::new(hook)))
    }

    /// Holds the call's place under a concurrency limit until it ends (the
    /// admission layer's hook, kept without a box of its own). Dropped at
    /// once, giving the place back, if no call is current.
    pub(crate) fn hold(&self, slot: Slot) -> bool {
        watch(|watched| watched.slot = Some(slot))
    }
}

/// Adds to the watch of the call current on this thread, if there is one.
fn watch(add: impl FnOnce(&mut Watched)) -> bool {
    CURRENT.with(|current| {
        let mut call = current.take();
        let active = call.active;
        if active {
            add(call.watched.get_or_insert_with(|| {
                Box::new(Watched {
                    hooks: Vec::new(),
                    slot: None,
                    started: Instant::now(),
                })
            }));
        }
        current.set(call);
        active
    })
}

thread_local! {
    /// The call whose futures or body this thread is polling (inactive if
    /// none).
    static CURRENT: Cell<Call> = const { Cell::new(Call::INACTIVE) };
}

/// One call's hooks, held by the status layer's future and then its
/// response body, and current while they poll the layers below. Small
/// (16 bytes), as it is swapped in and out on every poll.
#[derive(Default)]
pub(crate) struct Call {
    /// Whether this is a call (rather than the place of none).
    active: bool,
    /// The client went away: the call ends `CANCELLED`, whatever the
    /// handler answers.
    abandoned: bool,
    /// The hooks, once one is registered.
    watched: Option<Box<Watched>>,
}

/// The hooks of a call someone watches.
struct Watched {
    hooks: Vec<Hook>,
    /// Its place under a concurrency limit ([`CallEnd::hold`]).
    slot: Option<Slot>,
    /// When the first hook was registered.
    started: Instant,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("hooks", &self.watched.as_ref().map_or(0, |w| w.hooks.len()))
            .field("abandoned", &self.abandoned)
            .finish()
    }
}

impl Call {
    const INACTIVE: Call = Call {
        active: false,
        abandoned: false,
        watched: None,
    };

    /// A call that starts now.
    pub(crate) fn new() -> Self {
        Self {
            active: true,
            ..Self::INACTIVE
        }
    }

    /// Makes this call current on this thread (two swaps, no allocation)
    /// until the guard is dropped; the call before it (or none) is current
    /// again after.
    #[inline]
    pub(crate) fn enter(&mut self) -> Entered<'_> {
        swap_current(self);
        Entered(self)
    }

    /// The client of the call current on this thread went away (it reset
    /// the stream, or the connection was lost).
    pub(crate) fn abandon_current() {
        CURRENT.with(|current| {
            let mut call = current.take();
            call.abandoned |= call.active;
            current.set(call);
        });
    }

    /// Ends the call: runs the hooks with the outcome `outcome` describes
    /// (worked out only if some hook waits for it), or the one `abandoned`
    /// gives if the client went away.
    fn end<'a>(
        self,
        abandoned: impl FnOnce() -> (Code, &'static str),
        outcome: impl FnOnce() -> (Code, Message<'a>),
    ) {
        let Some(watched) = self.watched else {
            return;
        };
        let (code, message) = if self.abandoned {
            let (code, message) = abandoned();
            (code, Message::Text(message))
        } else {
            outcome()
        };
        let outcome = CallOutcome {
            code,
            message,
            elapsed: watched.started.elapsed(),
        };
        for hook in watched.hooks {
            hook(&outcome);
        }
        if let Some(slot) = watched.slot {
            slot.end(&outcome);
        }
    }
}

/// A call made current by [`Call::enter`]: swapped back out of the
/// thread's current one when dropped, even if polling panicked.
#[must_use = "the call is current until this is dropped"]
pub(crate) struct Entered<'a>(&'a mut Call);

impl Drop for Entered<'_> {
    #[inline]
    fn drop(&mut self) {
        swap_current(self.0);
    }
}

/// Swaps `call` with the thread's current one.
#[inline]
fn swap_current(call: &mut Call) {
    CURRENT.with(|current| {
        let mine = std::mem::take(call);
        *call = current.replace(mine);
    });
}

/// A call that has not ended yet: ends it `CANCELLED` when dropped, as the
/// call is then abandoned (the client reset the stream or went away, or
/// the connection closed) before its status was sent. It also carries the
/// call's [`Record`] in the server's metrics, ended with the same code.
#[derive(Debug, Default)]
pub(crate) struct Unended {
    call: Option<Call>,
    record: Record,
    /// The call's deadline: a client that goes away at it ended the call
    /// by its deadline, not by a cancel of its own.
    deadline: Option<Deadline>,
}

impl Unended {
    /// `call`, until it ends, counted in `record`, with its `deadline`.
    pub(crate) fn new(call: Option<Call>, record: Record, deadline: Option<Deadline>) -> Self {
        Self {
            call,
            record,
            deadline,
        }
    }

    /// Makes the call current while the guard lives, if it has not ended.
    #[inline]
    pub(crate) fn enter(&mut self) -> Option<Entered<'_>> {
        self.call.as_mut().map(Call::enter)
    }

    /// The series the call counts in, if it is counted.
    pub(crate) fn series(&self) -> Option<&std::sync::Arc<crate::metrics::rpc::Series>> {
        self.record.series()
    }

    /// Takes the call out (for the response body to end it).
    pub(crate) fn take(&mut self) -> Self {
        std::mem::take(self)
    }

    /// The code the call ends with when it would end with `code`: a call
    /// the client abandoned ends `CANCELLED`.
    fn final_code(&self, code: Code) -> Code {
        match &self.call {
            Some(call) if call.abandoned => abandoned(self.deadline).0,
            _ => code,
        }
    }

    /// Ends the call with `status`, if it has not ended.
    pub(crate) fn end_with_status(&mut self, status: &tonic::Status) {
        self.record.end(self.final_code(status.code()));
        let deadline = self.deadline;
        if let Some(call) = self.call.take() {
            call.end(
                || abandoned(deadline),
                || (status.code(), Message::Text(status.message())),
            );
        }
    }

    /// Ends the call with the status in `headers`, if it has not ended.
    pub(crate) fn end_with_headers(&mut self, headers: &HeaderMap) {
        let code = crate::status::code_in(headers).unwrap_or(Code::Unknown);
        self.record.end(self.final_code(code));
        let deadline = self.deadline;
        if let Some(call) = self.call.take() {
            call.end(|| abandoned(deadline), || (code, Message::Headers(headers)));
        }
    }
}

impl Drop for Unended {
    fn drop(&mut self) {
        // Not ended: the client went away (a record with no call is ended
        // already, or was never started).
        if let Some(call) = self.call.take() {
            let (code, message) = abandoned(self.deadline);
            self.record.end(code);
            call.end(|| (code, message), || (code, Message::Text(message)));
        }
    }
}

/// How a call the client abandoned ends: `DEADLINE_EXCEEDED` when it went
/// away at the call's `deadline` (within [`AT_DEADLINE`]), else
/// `CANCELLED`. Asked of abandoned calls only (it reads the clock).
fn abandoned(deadline: Option<Deadline>) -> (Code, &'static str) {
    match deadline {
        Some(deadline) if deadline.remaining() <= AT_DEADLINE => {
            (Code::DeadlineExceeded, CANCELLED_AT_DEADLINE)
        }
        _ => (Code::Cancelled, CANCELLED),
    }
}

/// The message of a call the client abandoned.
pub(crate) const CANCELLED: &str = "the client went away before the call ended";

/// The message of a call the client abandoned at its deadline.
const CANCELLED_AT_DEADLINE: &str = "the client went away at the call's deadline";

/// How near its deadline a call the client abandons counts as ended by
/// it: 10 ms. The client gives up at the deadline it set, and the server's
/// copy of it runs from the request's arrival, a transit later, so the
/// client's cancel and the server's own timer race; either way the call
/// ended by its deadline.
const AT_DEADLINE: Duration = Duration::from_millis(10);

/// Where a call's status message is, until someone asks for it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Message<'a> {
    Text(&'a str),
    /// In `grpc-message`, percent-encoded.
    Headers(&'a HeaderMap),
}

/// How a call ended, as [`CallEnd`] hooks see it.
#[derive(Debug)]
pub struct CallOutcome<'a> {
    code: Code,
    message: Message<'a>,
    elapsed: Duration,
}

impl<'a> CallOutcome<'a> {
    /// The final gRPC status code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The status message (decoded only when asked for).
    pub fn message(&self) -> Cow<'a, str> {
        match self.message {
            Message::Text(text) => Cow::Borrowed(text),
            Message::Headers(headers) => tonic::Status::from_header_map(headers)
                .map(|status| Cow::Owned(status.message().to_owned()))
                .unwrap_or_default(),
        }
    }

    /// Time from the registration of the call's first hook (as the call
    /// reached the layer that registered it) to the call's end.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gone_at_the_deadline_ended_the_call_by_it() {
        let gone = |deadline: Option<Deadline>| abandoned(deadline).0;
        assert_eq!(gone(None), Code::Cancelled);
        assert_eq!(
            gone(Some(Deadline::after(Duration::from_secs(1)))),
            Code::Cancelled
        );
        // The client's timer fired a transit before the server's.
        assert_eq!(
            gone(Some(Deadline::after(Duration::from_millis(2)))),
            Code::DeadlineExceeded
        );
        assert_eq!(
            gone(Some(Deadline::at(Instant::now()))),
            Code::DeadlineExceeded
        );
    }
}

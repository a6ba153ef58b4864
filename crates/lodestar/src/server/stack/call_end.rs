//! [`CallEnd`]: how a layer learns each call's final gRPC status.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;
use tonic::Code;

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
///   budget ([`ConnectionLimits`](super::ConnectionLimits)).
///
/// Metrics, outlier, logging and load-shedding layers build on it. Hooks run
/// on the task that serves the call, at its end: they should be quick and
/// must not panic. Registering nothing costs nothing beyond the handle
/// itself (one small allocation per call).
///
/// ```
/// use std::task::{Context, Poll};
/// use lodestar::server::{CallEnd, RequestBody};
///
/// /// Counts the calls that end with each code.
/// #[derive(Clone)]
/// struct Count<S>(S);
///
/// impl<S: tower_service::Service<http::Request<RequestBody>>> tower_service::Service<http::Request<RequestBody>> for Count<S> {
///     type Response = S::Response;
///     type Error = S::Error;
///     type Future = S::Future;
///
///     fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
///         self.0.poll_ready(cx)
///     }
///
///     fn call(&mut self, request: http::Request<RequestBody>) -> S::Future {
///         if let Some(end) = request.extensions().get::<CallEnd>() {
///             end.on_end(|outcome| {
///                 println!("{:?} after {:?}: {}", outcome.code(), outcome.elapsed(), outcome.message());
///             });
///         }
///         self.0.call(request)
///     }
/// }
/// ```
#[derive(Clone)]
pub struct CallEnd(Arc<Shared>);

struct Shared {
    /// When the first hook was registered: the clock is read only for a
    /// call someone watches.
    started: std::sync::OnceLock<Instant>,
    hooks: Mutex<Hooks>,
}

enum Hooks {
    /// The call goes on; these wait for its end. `abandoned`: the client
    /// went away, so the call ends `CANCELLED` whatever the handler says.
    Open { hooks: Vec<Hook>, abandoned: bool },
    /// The call has ended; a hook registered now is dropped uncalled.
    Ended,
}

impl std::fmt::Debug for CallEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallEnd")
            .field("elapsed", &self.0.started.get().map(Instant::elapsed))
            .finish_non_exhaustive()
    }
}

impl CallEnd {
    /// The handle of a call that starts now.
    pub(crate) fn start() -> Self {
        Self(Arc::new(Shared {
            started: std::sync::OnceLock::new(),
            hooks: Mutex::new(Hooks::Open {
                hooks: Vec::new(),
                abandoned: false,
            }),
        }))
    }

    /// Calls `hook` with the call's final outcome when it ends. A hook
    /// registered after the end is dropped without being called.
    pub fn on_end(&self, hook: impl FnOnce(&CallOutcome<'_>) + Send + 'static) {
        self.0.started.get_or_init(Instant::now);
        if let Hooks::Open { hooks, .. } = &mut *self.lock() {
            hooks.push(Box::new(hook));
        }
    }

    /// Time since the first hook was registered (or since this was first
    /// asked, if none was): a layer that registers as the call reaches it
    /// measures the call from there to its end.
    pub fn elapsed(&self) -> Duration {
        self.0.started.get_or_init(Instant::now).elapsed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hooks> {
        self.0.hooks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client went away (reset the stream, or the connection was
    /// lost): the call ends `CANCELLED`, whatever the handler answers.
    pub(crate) fn abandon(&self) {
        if let Hooks::Open { abandoned, .. } = &mut *self.lock() {
            *abandoned = true;
        }
    }

    /// Ends the call: runs the hooks with the outcome `outcome` describes
    /// (worked out only if some hook waits for it).
    pub(crate) fn end<'a>(&self, outcome: impl FnOnce() -> (Code, Message<'a>)) {
        let (hooks, abandoned) = match std::mem::replace(&mut *self.lock(), Hooks::Ended) {
            Hooks::Open { hooks, abandoned } if !hooks.is_empty() => (hooks, abandoned),
            _ => return,
        };
        let (code, message) = if abandoned {
            (Code::Cancelled, Message::Text(CANCELLED))
        } else {
            outcome()
        };
        let outcome = CallOutcome {
            code,
            message,
            elapsed: self.elapsed(),
        };
        for hook in hooks {
            hook(&outcome);
        }
    }

    /// Ends the call with the status that `headers` (a trailers-only
    /// response's headers, or trailers) carry.
    pub(crate) fn end_with_headers(&self, headers: &HeaderMap) {
        self.end(|| (code_in(headers), Message::Headers(headers)));
    }

    /// Ends the call with `status`.
    pub(crate) fn end_with_status(&self, status: &tonic::Status) {
        self.end(|| (status.code(), Message::Text(status.message())));
    }
}

/// The message of a call the client abandoned.
pub(crate) const CANCELLED: &str = "the client went away before the call ended";

/// The code in `headers`' `grpc-status` (`UNKNOWN` if there is none).
fn code_in(headers: &HeaderMap) -> Code {
    headers
        .get(&super::GRPC_STATUS)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Unknown, Code::from_i32)
}

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

    /// Time from the first hook's registration to the call's end (see
    /// [`CallEnd::elapsed`]).
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

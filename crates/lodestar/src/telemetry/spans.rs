//! The spans lodestar makes when OpenTelemetry is on: a SERVER span per
//! call served, a CLIENT span per call made, a PRODUCER span per event
//! published and a CONSUMER span per event handled.
//!
//! Each span's own W3C context becomes the current [`TraceContext`] for
//! the work inside it, so that what already carries the current context
//! on (the client's `traceparent`, the events' headers, the log lines'
//! ids) carries the span's.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::Code;
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::client::observe::Outcome;
use crate::server::CallEnd;
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};

/// Whether an OpenTelemetry layer was ever built in this process.
static ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are made: one relaxed load.
#[inline]
pub(crate) fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// From now on, spans are made.
pub(super) fn turn_on() {
    ON.store(true, Ordering::Relaxed);
}

/// A span, and its own context (`None` if the subscriber does not export
/// it: the context then stays what it was).
#[derive(Debug)]
pub(crate) struct Traced {
    span: tracing::Span,
    context: Option<TraceContext>,
}

impl Traced {
    /// `span` under `parent` (if set, else under the current span, as
    /// made), its context read: the span's own, else (the span is not
    /// exported: this task's subscriber has no OpenTelemetry layer)
    /// `parent`, carried on as it would be with no span.
    fn new(span: tracing::Span, parent: Option<&TraceContext>) -> Self {
        if let Some(parent) = parent {
            let _ = span.set_parent(otel_context(parent));
        }
        let context = own_context(&span).or_else(|| parent.cloned());
        Self { span, context }
    }

    /// Runs `future` inside the span, with the span's context current.
    pub(crate) fn run<F: Future>(&self, future: F) -> impl Future<Output = F::Output> + use<F> {
        let future = future.instrument(self.span.clone());
        let context = self.context.clone();
        async move {
            match context {
                Some(context) => context.scope(future).await,
                None => future.await,
            }
        }
    }
}

/// The name of the method at `path` (`/pkg.Service/Method`):
/// `pkg.Service/Method`.
fn method_name(path: &str) -> &str {
    path.strip_prefix('/').unwrap_or(path)
}

/// The server span of `request`, whose caller sent `parent`, around the
/// call (made inside it). It ends with the call's final
/// status, whatever ends the call ([`CallEnd`]).
pub(crate) fn serve<B, F>(
    request: http::Request<B>,
    parent: Option<TraceContext>,
    call: impl FnOnce(http::Request<B>) -> F,
) -> impl Future<Output = F::Output> + Send + 'static
where
    F: Future + Send + 'static,
{
    let name = method_name(request.uri().path());
    let span = tracing::info_span!(
        target: super::SPANS_TARGET,
        parent: None,
        "grpc.server",
        otel.name = name,
        otel.kind = "server",
        rpc.system.name = "grpc",
        rpc.method = name,
        rpc.grpc.status_code = Empty,
        rpc.response.status_code = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
        "error.type" = Empty,
    );
    let traced = Traced::new(span, parent.as_ref());
    let inner = traced.span.in_scope(|| call(request));
    let ending = CallSpan {
        span: Some(traced.span.clone()),
        side: Side::Server,
    };
    let inner = traced.run(inner);
    async move {
        // The call is current on this task now (see `CallEnd`): its end
        // ends the span. If it is not, the span ends with the future.
        let _ = CallEnd::HANDLE.on_end(move |outcome| {
            ending.finish(outcome.code(), || outcome.message());
        });
        inner.await
    }
}

/// The client span of `request`: under the caller's own `traceparent` if
/// the request has one, else under the current span, else under the
/// current [`TraceContext`]. The request then carries the span's context.
pub(crate) fn call<B>(request: &mut http::Request<B>) -> CallSpan {
    let name = method_name(request.uri().path());
    let span = tracing::info_span!(
        target: super::SPANS_TARGET,
        "grpc.client",
        otel.name = name,
        otel.kind = "client",
        rpc.system.name = "grpc",
        rpc.method = name,
        rpc.grpc.status_code = Empty,
        rpc.response.status_code = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
        "error.type" = Empty,
    );
    let headers = request.headers_mut();
    let traced = Traced::new(span, explicit_parent(headers).as_ref());
    match &traced.context {
        // The request carries the span's context (or, if the span is not
        // exported, its own or the current one, as it would with no span).
        Some(context) if TraceContext::from_headers(headers).as_ref() != Some(context) => {
            headers.remove(TRACEPARENT);
            headers.remove(TRACESTATE);
            context.inject(headers);
        }
        _ => TraceContext::inject_current(headers),
    }
    CallSpan {
        span: Some(traced.span),
        side: Side::Client,
    }
}

/// The producer span of an event published on `topic`; the event carries
/// its context (run the publication in it: [`Traced::run`]).
pub(crate) fn publish(topic: &str) -> Traced {
    let span = tracing::info_span!(
        target: super::SPANS_TARGET,
        "publish",
        otel.name = format!("publish {topic}"),
        otel.kind = "producer",
        messaging.system = "lodestar",
        messaging.operation.type = "send",
        messaging.destination.name = topic,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    Traced::new(span, outside_any_span().as_ref())
}

/// The consumer span of a delivery on `topic`, under the publisher's
/// context, if the message carried one.
pub(crate) fn consume(
    topic: &str,
    message_id: Option<&str>,
    parent: Option<&TraceContext>,
) -> Traced {
    let span = tracing::info_span!(
        target: super::SPANS_TARGET,
        parent: None,
        "process",
        otel.name = format!("process {topic}"),
        otel.kind = "consumer",
        messaging.system = "lodestar",
        messaging.operation.type = "process",
        messaging.destination.name = topic,
        messaging.message.id = message_id,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    Traced::new(span, parent)
}

/// Marks `traced`'s span failed, with `error` as its description.
pub(crate) fn failed(traced: &Traced, error: &dyn std::fmt::Display) {
    traced.span.record("otel.status_code", "error");
    traced
        .span
        .record("otel.status_description", error.to_string());
}

/// The parent a client call names itself: the request's own
/// `traceparent`, else [`outside_any_span`].
fn explicit_parent(headers: &http::HeaderMap) -> Option<TraceContext> {
    TraceContext::from_headers(headers).or_else(outside_any_span)
}

/// The current context, when no span is current to be the parent (code
/// that set a context of its own with [`TraceContext::scope`]); inside a
/// span, the span is the parent, as made.
fn outside_any_span() -> Option<TraceContext> {
    match tracing::Span::current().is_none() {
        true => TraceContext::current(),
        false => None,
    }
}

/// Which side of a call a span is: which codes are errors.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// The server's errors: what says the server failed.
    Server,
    /// For a client, every code but `OK`.
    Client,
}

impl Side {
    fn is_error(self, code: Code) -> bool {
        match self {
            Side::Server => matches!(
                code,
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            ),
            Side::Client => code != Code::Ok,
        }
    }
}

/// A call's span, until the call ends: ended with its status by
/// [`finish`](Self::finish), else `CANCELLED` when dropped.
#[derive(Debug)]
pub(crate) struct CallSpan {
    span: Option<tracing::Span>,
    side: Side,
}

impl CallSpan {
    /// The call ended with `code`; `message` is read only for an error.
    pub(crate) fn finish<'a>(mut self, code: Code, message: impl FnOnce() -> Cow<'a, str>) {
        if let Some(span) = self.span.take() {
            record(&span, self.side, code, message);
        }
    }

    /// The call ended as `outcome` says.
    pub(crate) fn finish_outcome(self, outcome: &Outcome) {
        match outcome {
            Outcome::Status(code) => self.finish(*code, || Cow::Borrowed("")),
            Outcome::Transport(text) => self.finish(Code::Unavailable, || Cow::Borrowed(text)),
        }
    }

    /// The call ended with `status`.
    pub(crate) fn finish_status(self, status: &tonic::Status) {
        self.finish(status.code(), || Cow::Borrowed(status.message()));
    }

    /// Ends the span with the call's response: at once if it carries its
    /// status in its headers (trailers-only), else when its body ends.
    pub(crate) fn hold(self, response: &mut http::Response<crate::client::ResponseBody>) {
        let trailers_only = http_body::Body::is_end_stream(response.body());
        match trailers_only
            .then(|| crate::status::code_in(response.headers()))
            .flatten()
        {
            Some(code) => self.finish(code, || {
                Cow::Owned(
                    tonic::Status::from_header_map(response.headers())
                        .map(|s| s.message().to_owned())
                        .unwrap_or_default(),
                )
            }),
            None => response.body_mut().get_mut().permits().span = Some(Box::new(self)),
        }
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        if let Some(span) = self.span.take() {
            record(&span, self.side, Code::Cancelled, || {
                Cow::Borrowed("the call was dropped before it ended")
            });
        }
    }
}

/// Records how a call ended on its span.
fn record<'a>(
    span: &tracing::Span,
    side: Side,
    code: Code,
    message: impl FnOnce() -> Cow<'a, str>,
) {
    span.record("rpc.grpc.status_code", code as i64);
    span.record(
        "rpc.response.status_code",
        crate::policy_data::code_name(code),
    );
    if side.is_error(code) {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", message().as_ref());
        span.record("error.type", crate::policy_data::code_name(code));
    }
}

/// The OpenTelemetry context of a remote parent.
fn otel_context(parent: &TraceContext) -> opentelemetry::Context {
    static PROPAGATOR: std::sync::OnceLock<TraceContextPropagator> = std::sync::OnceLock::new();
    PROPAGATOR
        .get_or_init(TraceContextPropagator::new)
        .extract(&Headers(parent))
}

/// `span`'s own W3C context, if it is exported (valid).
fn own_context(span: &tracing::Span) -> Option<TraceContext> {
    let context = span.context();
    let otel = context.span();
    let span_context = otel.span_context();
    if !span_context.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    let tracestate = span_context.trace_state().header();
    TraceContext::parse(
        &traceparent,
        Some(tracestate.as_str()).filter(|s| !s.is_empty()),
    )
}

/// A [`TraceContext`] as the propagator reads headers.
struct Headers<'a>(&'a TraceContext);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.0.traceparent()),
            TRACESTATE => self.0.tracestate(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

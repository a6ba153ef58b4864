//! Log lines, text or JSON, that carry the trace and span ids of the call
//! they were written in.
//!
//! The ids come from the call's [`TraceContext`] (a task-local the server
//! sets for each call), read when an event is formatted: no span is made
//! per call for this, so it costs nothing when nothing is logged. With
//! OpenTelemetry on, a handler's context is its server span's, so
//! `span_id` is that span's id; with it off, the context is the caller's,
//! so `span_id` is the caller's span (the `traceparent`'s parent id).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::LogFormat;
use crate::trace::TraceContext;

/// Formats each event as a line of [`LogFormat`], with `trace_id` and
/// `span_id` when the event happened inside a call with a trace context.
#[derive(Debug)]
pub(crate) struct LineFormat {
    format: LogFormat,
    text: format::Format<format::Full, SystemTime>,
}

impl LineFormat {
    pub(crate) fn new(format: LogFormat, ansi: bool) -> Self {
        Self {
            format,
            text: format::Format::default().with_ansi(ansi),
        }
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let trace = TraceContext::current();
        match self.format {
            LogFormat::Text => {
                let Some(trace) = trace else {
                    return self.text.format_event(ctx, writer, event);
                };
                // The usual line, then the ids at its end.
                let mut line = String::new();
                self.text.format_event(ctx, Writer::new(&mut line), event)?;
                let line = line.trim_end_matches('\n');
                writeln!(
                    writer,
                    "{line} trace_id={} span_id={}",
                    trace.trace_id(),
                    trace.parent_id()
                )
            }
            LogFormat::Json => json_line(ctx, writer, event, trace.as_ref()),
        }
    }
}

/// One JSON object: `timestamp`, `level`, `target`, the event's fields
/// (`message` among them), the names of the spans it is in (`spans`,
/// outermost first), then `trace_id` and `span_id`.
fn json_line<S, N>(
    ctx: &FmtContext<'_, S, N>,
    mut writer: Writer<'_>,
    event: &Event<'_>,
    trace: Option<&TraceContext>,
) -> fmt::Result
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let mut timestamp = String::new();
    SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
    let metadata = event.metadata();
    let mut object = serde_json::Map::new();
    object.insert("timestamp".into(), timestamp.into());
    object.insert("level".into(), metadata.level().as_str().into());
    object.insert("target".into(), metadata.target().into());
    let mut fields = JsonFields(&mut object);
    event.record(&mut fields);
    if let Some(scope) = ctx.event_scope() {
        let spans: Vec<serde_json::Value> = scope
            .from_root()
            .map(|span| {
                let mut entry = serde_json::Map::new();
                entry.insert("name".into(), span.name().into());
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    entry.insert("fields".into(), fields.as_str().into());
                }
                entry.into()
            })
            .collect();
        if !spans.is_empty() {
            object.insert("spans".into(), spans.into());
        }
    }
    if let Some(trace) = trace {
        object.insert("trace_id".into(), trace.trace_id().into());
        object.insert("span_id".into(), trace.parent_id().into());
    }
    let line = serde_json::Value::Object(object);
    writeln!(writer, "{line}")
}

/// Records an event's fields into a JSON object.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            let _ = write!(text, ": {cause}");
            source = cause.source();
        }
        self.0.insert(field.name().into(), text.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

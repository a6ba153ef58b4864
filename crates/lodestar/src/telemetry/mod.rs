//! Logs and traces: lodestar's `tracing` subscriber, and spans exported
//! over OTLP.
//!
//! With no code from the user, [`ServiceBuilder::start`](crate::ServiceBuilder::start)
//! installs this subscriber, configured from the environment, the first
//! time a service starts in a process where no global subscriber is
//! installed yet ([`ServiceBuilder::telemetry`](crate::ServiceBuilder::telemetry)
//! turns that off). It:
//!
//! * writes log lines to standard error, at the level `RUST_LOG` sets
//!   (default `info`), as text or JSON as `LODESTAR_LOG_FORMAT` says
//!   (`text`, the default, or `json`); an event logged inside a call
//!   carries the call's `trace_id` and `span_id`;
//! * when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and the `otlp` feature is on
//!   (the default), makes a span for every call served and made and every
//!   event published and handled, and exports them over OTLP (see the
//!   variables in [`settings`]). With no endpoint, no span is made: a call
//!   pays one relaxed atomic load for tracing.
//!
//! When the collector cannot be reached, calls go on as ever, the spans
//! are dropped, and lodestar logs so once (and once more when it can reach
//! it again). Spans are flushed when a service shuts down
//! ([`RunningService::shutdown`](crate::RunningService::shutdown)) and when
//! the [`TelemetryGuard`] is dropped.
//!
//! A program can install it itself, with settings of its own:
//!
//! ```no_run
//! use lodestar::telemetry::{LogFormat, Telemetry};
//!
//! # fn main() -> Result<(), lodestar::telemetry::TelemetryError> {
//! let _telemetry = Telemetry::from_env()?.log_format(LogFormat::Json).init()?;
//! tracing::info!("up");
//! # Ok(())
//! # }
//! ```
//!
//! or add lodestar's layers to a subscriber of its own:
//!
//! ```
//! use tracing_subscriber::layer::SubscriberExt as _;
//!
//! # fn main() -> Result<(), lodestar::telemetry::TelemetryError> {
//! let (layer, _guard) = lodestar::telemetry::Telemetry::from_env()?.layer()?;
//! let subscriber = tracing_subscriber::registry().with(layer);
//! tracing::subscriber::with_default(subscriber, || tracing::info!("inside"));
//! # Ok(())
//! # }
//! ```

mod logs;
#[cfg(feature = "otlp")]
mod otlp;
pub mod settings;
#[cfg(feature = "otlp")]
pub(crate) mod spans;

use std::sync::OnceLock;

use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;

use settings::Settings;
pub use settings::{LogFormat, Otlp, Protocol, Sampler};

/// The target of the spans lodestar makes for calls and events. They are
/// for export only: log lines carry their ids, not their fields, so the log
/// layer skips them (no per-call formatting of their fields).
pub const SPANS_TARGET: &str = "lodestar::spans";

/// A layer of lodestar's telemetry, for a subscriber of type `S`.
pub type BoxLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

/// What went wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// A variable (or the same setting made in code) has a value that
    /// cannot be used.
    #[error("{variable}=`{value}`: {reason}")]
    Setting {
        /// The variable, such as `OTEL_TRACES_SAMPLER`.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        reason: &'static str,
    },
    /// The log filter (`RUST_LOG`) is not valid.
    #[error("the log filter `{filter}` (RUST_LOG) is not valid: {reason}")]
    LogFilter {
        /// The filter.
        filter: String,
        /// Why.
        reason: String,
    },
    /// A global `tracing` subscriber is installed already.
    #[error(
        "a global tracing subscriber is installed already; add lodestar's to it with \
         `Telemetry::layer` instead"
    )]
    AlreadyInstalled,
    /// The OTLP exporter could not be built.
    #[error("cannot export spans to `{endpoint}`: {reason}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The thread that exports spans could not be started.
    #[error("cannot start the thread that exports spans: {0}")]
    Thread(#[source] std::io::Error),
}

impl TelemetryError {
    pub(crate) fn setting(variable: &'static str, value: &str, reason: &'static str) -> Self {
        Self::Setting {
            variable,
            value: value.to_owned(),
            reason,
        }
    }
}

/// Telemetry's settings, then [`init`](Self::init) (or
/// [`layer`](Self::layer)).
///
/// ```
/// use lodestar::telemetry::{Protocol, Sampler, Telemetry};
///
/// let telemetry = Telemetry::new()
///     .log_filter("info,lodestar=debug")
///     .otlp("http://127.0.0.1:4317", Protocol::Grpc)
///     .service_name("orders")
///     .sampler(Sampler::ParentBasedTraceIdRatio(0.1));
/// # drop(telemetry);
/// ```
pub struct Telemetry {
    settings: Settings,
    /// Whether lodestar's log layer is part of [`layer`](Self::layer).
    logs: bool,
    /// Default: standard error.
    writer: Option<BoxMakeWriter>,
    /// `service.name` when neither `OTEL_SERVICE_NAME` nor the resource
    /// attributes set it (a service's own name, at start).
    fallback_service_name: Option<String>,
    /// What the methods set over the environment's OTLP settings.
    overrides: Overrides,
}

/// OTLP settings made in code, applied over the environment's once an
/// endpoint is known (whichever was set first).
#[derive(Debug, Default)]
struct Overrides {
    service_name: Option<String>,
    resource: Vec<(String, String)>,
    sampler: Option<Sampler>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("settings", &self.settings)
            .field("logs", &self.logs)
            .finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// The defaults, whatever the environment says: text logs at `info`,
    /// no spans.
    pub fn new() -> Self {
        Self {
            settings: Settings {
                log_filter: settings::DEFAULT_LOG_FILTER.to_owned(),
                log_format: LogFormat::Text,
                otlp: None,
            },
            logs: true,
            writer: None,
            fallback_service_name: None,
            overrides: Overrides::default(),
        }
    }

    /// The settings the environment gives (see [`settings`]); the
    /// defaults for any variable not set. A variable with a value that
    /// cannot be used is an error that names it.
    pub fn from_env() -> Result<Self, TelemetryError> {
        let settings = Settings::from_lookup(|name| std::env::var(name).ok())?;
        Ok(Self {
            settings,
            ..Self::new()
        })
    }

    /// Which events are logged: `EnvFilter` directives such as
    /// `info,lodestar=debug` (as `RUST_LOG`; default `info`).
    pub fn log_filter(mut self, directives: impl Into<String>) -> Self {
        self.settings.log_filter = directives.into();
        self
    }

    /// Text or JSON lines (as `LODESTAR_LOG_FORMAT`; default text).
    pub fn log_format(mut self, format: LogFormat) -> Self {
        self.settings.log_format = format;
        self
    }

    /// Where log lines go (default: standard error).
    pub fn log_writer<W>(mut self, writer: W) -> Self
    where
        W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
    {
        self.writer = Some(BoxMakeWriter::new(writer));
        self
    }

    /// Whether [`layer`](Self::layer) includes lodestar's log lines
    /// (default: yes). Off, for a subscriber that formats logs its own way,
    /// the layer makes and exports spans only.
    pub fn logs(mut self, logs: bool) -> Self {
        self.logs = logs;
        self
    }

    /// Exports spans to `endpoint`, used as it is: for HTTP, the full URL
    /// (`http://host:4318/v1/traces`); for gRPC, the collector's address
    /// (`http://host:4317`). Replaces what the environment said.
    pub fn otlp(mut self, endpoint: impl Into<String>, protocol: Protocol) -> Self {
        let endpoint = endpoint.into();
        match &mut self.settings.otlp {
            Some(otlp) => {
                otlp.endpoint = endpoint;
                otlp.protocol = protocol;
            }
            None => {
                self.settings.otlp = Some(Otlp {
                    endpoint,
                    protocol,
                    service_name: None,
                    resource: Vec::new(),
                    sampler: Sampler::default(),
                })
            }
        }
        self
    }

    /// No spans, whatever the environment said.
    pub fn without_otlp(mut self) -> Self {
        self.settings.otlp = None;
        self
    }

    /// The `service.name` of the spans (as `OTEL_SERVICE_NAME`), when they
    /// are exported.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.overrides.service_name = Some(name.into());
        self
    }

    /// Adds a resource attribute (as `OTEL_RESOURCE_ATTRIBUTES`), when
    /// spans are exported.
    pub fn resource_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.overrides.resource.push((key.into(), value.into()));
        self
    }

    /// Which traces are recorded (as `OTEL_TRACES_SAMPLER`; default
    /// [`Sampler::ParentBasedAlwaysOn`]), when spans are exported.
    pub fn sampler(mut self, sampler: Sampler) -> Self {
        self.overrides.sampler = Some(sampler);
        self
    }

    /// The OTLP settings, if spans are to be exported: the environment's,
    /// with what was set here.
    pub fn otlp_settings(&self) -> Option<Otlp> {
        let mut otlp = self.settings.otlp.clone()?;
        let overrides = &self.overrides;
        if let Some(name) = &overrides.service_name {
            otlp.service_name = Some(name.clone());
        }
        otlp.resource.extend(overrides.resource.iter().cloned());
        if let Some(sampler) = overrides.sampler {
            otlp.sampler = sampler;
        }
        Some(otlp)
    }

    /// `service.name` when nothing else sets it.
    pub(crate) fn fallback_service_name(mut self, name: &str) -> Self {
        self.fallback_service_name = Some(name.to_owned());
        self
    }

    /// lodestar's layers for a subscriber of type `S`: log lines (unless
    /// [`logs`](Self::logs) is off) and, with an endpoint, spans exported
    /// over OTLP. Keep the guard for as long as spans should be exported:
    /// dropping it flushes them and stops the export.
    ///
    /// Spans are exported from a thread of lodestar's (with its own Tokio
    /// runtime), so this works inside or outside a runtime.
    pub fn layer<S>(mut self) -> Result<(BoxLayer<S>, TelemetryGuard), TelemetryError>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let mut layers: Vec<BoxLayer<S>> = Vec::new();
        if self.logs {
            layers.push(self.log_layer()?);
        }
        #[cfg(feature = "otlp")]
        let exporting = match self.otlp_settings() {
            Some(otlp) => {
                let (layer, pipeline) =
                    otlp::Pipeline::start(&otlp, self.fallback_service_name.as_deref())?;
                layers.push(layer);
                Some(pipeline)
            }
            None => None,
        };
        #[cfg(not(feature = "otlp"))]
        if self.settings.otlp.is_some() {
            tracing::warn!(
                "an OTLP endpoint is configured, but lodestar was built without its `otlp` \
                 feature: no span is exported"
            );
        }
        Ok((
            Box::new(layers),
            TelemetryGuard {
                #[cfg(feature = "otlp")]
                exporting,
            },
        ))
    }

    /// The subscriber these settings describe, to install as the default
    /// for a scope (`tracing::subscriber::set_default`) rather than for
    /// the whole process.
    pub fn dispatch(self) -> Result<(tracing::Dispatch, TelemetryGuard), TelemetryError> {
        let (layer, guard) = self.layer()?;
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
        guard.report_to(&dispatch);
        Ok((dispatch, guard))
    }

    /// Installs the subscriber as the process's global default. Fails if
    /// one is installed already ([`TelemetryError::AlreadyInstalled`]).
    pub fn init(self) -> Result<TelemetryGuard, TelemetryError> {
        if tracing::dispatcher::has_been_set() {
            return Err(TelemetryError::AlreadyInstalled);
        }
        let (dispatch, guard) = self.dispatch()?;
        tracing::dispatcher::set_global_default(dispatch)
            .map_err(|_| TelemetryError::AlreadyInstalled)?;
        #[cfg(feature = "otlp")]
        guard.set_global_provider();
        Ok(guard)
    }

    /// The log layer: lodestar's line format, filtered by the log filter,
    /// written to the writer set (taken), else standard error.
    fn log_layer<S>(&mut self) -> Result<BoxLayer<S>, TelemetryError>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let invalid = |e: &dyn std::fmt::Display| TelemetryError::LogFilter {
            filter: self.settings.log_filter.clone(),
            reason: e.to_string(),
        };
        // lodestar's spans are skipped by a static directive (only spans
        // have that target), which keeps the filter's level hint: `debug!`
        // and `trace!` under the level still cost one comparison.
        let skip_spans = format!("{SPANS_TARGET}=off")
            .parse()
            .map_err(|e| invalid(&e))?;
        let filter = tracing_subscriber::EnvFilter::try_new(&self.settings.log_filter)
            .map_err(|e| invalid(&e))?
            .add_directive(skip_spans);
        let layer = tracing_subscriber::fmt::layer();
        Ok(match self.writer.take() {
            Some(writer) => {
                let format = logs::LineFormat::new(self.settings.log_format, false);
                Box::new(
                    layer
                        .event_format(format)
                        .with_writer(writer)
                        .with_filter(filter),
                )
            }
            None => {
                let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
                let format = logs::LineFormat::new(self.settings.log_format, ansi);
                Box::new(
                    layer
                        .event_format(format)
                        .with_writer(std::io::stderr)
                        .with_filter(filter),
                )
            }
        })
    }
}

/// Keeps spans exported: dropping it flushes the spans not exported yet and
/// stops the export (waiting at most the exporter's timeout). Without an
/// OTLP endpoint it holds nothing.
#[must_use = "dropping the guard stops the export of spans"]
#[derive(Debug)]
pub struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    exporting: Option<otlp::Pipeline>,
}

impl TelemetryGuard {
    /// Exports the spans that have ended and are not exported yet, now
    /// (waiting at most the exporter's timeout).
    pub async fn flush(&self) {
        #[cfg(feature = "otlp")]
        if let Some(pipeline) = &self.exporting {
            pipeline.flush().await;
        }
    }

    /// Whether spans are exported.
    pub fn exports_spans(&self) -> bool {
        #[cfg(feature = "otlp")]
        return self.exporting.is_some();
        #[cfg(not(feature = "otlp"))]
        false
    }

    /// Sends the pipeline's own reports (the collector cannot be reached)
    /// to `dispatch`, rather than to the global default.
    fn report_to(&self, dispatch: &tracing::Dispatch) {
        #[cfg(feature = "otlp")]
        if let Some(pipeline) = &self.exporting {
            pipeline.report_to(dispatch);
        }
        #[cfg(not(feature = "otlp"))]
        let _ = dispatch;
    }

    #[cfg(feature = "otlp")]
    fn set_global_provider(&self) {
        if let Some(pipeline) = &self.exporting {
            pipeline.set_global_provider();
        }
    }
}

/// Exports now the spans that have ended and are not exported yet, on every
/// OTLP pipeline of the process. [`RunningService::shutdown`](crate::RunningService::shutdown)
/// calls it last.
pub async fn flush() {
    #[cfg(feature = "otlp")]
    otlp::flush_all().await;
}

/// Whether lodestar makes spans: one relaxed load, all a call pays when it
/// does not.
#[cfg(feature = "otlp")]
#[inline]
pub(crate) fn spans_on() -> bool {
    spans::on()
}

/// Installs lodestar's subscriber, configured by `settings` (none: from
/// the environment), as the process's global default, unless one is installed already; once per
/// process. A variable that cannot be used is logged (as a warning) and
/// the defaults are used instead: a service starts whatever `OTEL_*` says.
pub(crate) fn install(service_name: &str, settings: Option<Telemetry>) {
    /// The guard of what was installed, kept for the life of the process.
    static INSTALLED: OnceLock<Option<TelemetryGuard>> = OnceLock::new();
    if tracing::dispatcher::has_been_set() {
        return;
    }
    INSTALLED.get_or_init(|| {
        let settings = match settings {
            Some(settings) => Ok(settings),
            None => Telemetry::from_env(),
        };
        let (telemetry, problem) = match settings {
            Ok(telemetry) => (telemetry.fallback_service_name(service_name), None),
            Err(error) => (Telemetry::new(), Some(error)),
        };
        let (guard, problem) = match telemetry.init() {
            Ok(guard) => (Some(guard), problem),
            Err(TelemetryError::AlreadyInstalled) => (None, problem),
            // The exporter or the log filter: the defaults, and say why.
            Err(error) => (Telemetry::new().init().ok(), Some(error)),
        };
        if let Some(problem) = problem {
            tracing::warn!(
                error = %problem,
                "telemetry is not set up as configured; logging with the defaults (text, info) \
                 and exporting no span"
            );
        }
        guard
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_made_in_code_apply_whichever_comes_first() {
        let before = Telemetry::new()
            .service_name("orders")
            .sampler(Sampler::AlwaysOff)
            .resource_attribute("team", "a")
            .otlp("http://c:4317", Protocol::Grpc);
        let otlp = before.otlp_settings().unwrap();
        assert_eq!(otlp.service_name.as_deref(), Some("orders"));
        assert_eq!(otlp.sampler, Sampler::AlwaysOff);
        assert_eq!(otlp.resource, [("team".to_owned(), "a".to_owned())]);
        assert_eq!(otlp.endpoint, "http://c:4317");
        assert_eq!(otlp.protocol, Protocol::Grpc);
        // Without an endpoint, nothing is exported.
        assert_eq!(
            Telemetry::new().service_name("orders").otlp_settings(),
            None
        );
        let off = before.without_otlp();
        assert_eq!(off.otlp_settings(), None);
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn an_endpoint_the_exporter_cannot_reach_is_an_error_that_names_it() {
        for endpoint in [
            "https://collector:4318/v1/traces",
            "collector:4318",
            "not a url",
        ] {
            let error = Telemetry::new()
                .otlp(endpoint, Protocol::HttpProtobuf)
                .dispatch()
                .unwrap_err();
            assert!(
                matches!(&error, TelemetryError::Exporter { endpoint: e, .. } if e == endpoint),
                "{error}"
            );
        }
    }

    #[test]
    fn a_bad_log_filter_is_an_error_that_names_it() {
        let error = Telemetry::new()
            .log_filter("lodestar=loud")
            .dispatch()
            .unwrap_err();
        assert!(error.to_string().contains("lodestar=loud"), "{error}");
    }
}

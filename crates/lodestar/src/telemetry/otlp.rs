//! The OTLP pipeline: a tracer provider whose batch processor hands spans
//! to an OTLP exporter, and the thread (with a Tokio runtime of its own)
//! the exports run on.
//!
//! The SDK's batch processor runs on an OS thread of its own, outside any
//! runtime, where tonic's and hyper's futures cannot run ("there is no
//! reactor running"), and every span would be dropped without a word. So
//! the exporter is built inside lodestar's export runtime, and each export
//! is spawned onto it ([`OnRuntime`]); the batch processor only waits for
//! the result. That runtime belongs to lodestar, not to the application,
//! so flushing works wherever the guard is dropped, even from inside a
//! single-threaded runtime, or after the application's runtime is gone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use lodestar_core::sync::MutexExt as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter};
use tokio::runtime::Handle;
use tracing::Subscriber;
use tracing_subscriber::Layer as _;
use tracing_subscriber::registry::LookupSpan;

use super::settings::{Otlp, Protocol, Sampler};
use super::{BoxLayer, TelemetryError};

/// How long a flush, or the shutdown when the guard is dropped, may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The service name when nothing sets one, as the specification says.
const UNKNOWN_SERVICE: &str = "unknown_service";

/// The pipelines of the process, for [`flush_all`].
static PIPELINES: Mutex<Vec<(u64, SdkTracerProvider)>> = Mutex::new(Vec::new());

/// One OTLP pipeline: stopped (its spans flushed) when dropped.
#[derive(Debug)]
pub(super) struct Pipeline {
    id: u64,
    provider: SdkTracerProvider,
    health: Arc<Health>,
    thread: Option<ExportThread>,
}

impl Pipeline {
    /// Starts exporting as `otlp` says; the layer makes the spans.
    /// `fallback_service_name` is `service.name` when nothing else sets it.
    pub(super) fn start<S>(
        otlp: &Otlp,
        fallback_service_name: Option<&str>,
    ) -> Result<(BoxLayer<S>, Self), TelemetryError>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let thread = ExportThread::start()?;
        let exporter = {
            // Inside the export runtime: tonic's channel needs one.
            let _entered = thread.handle.enter();
            build_exporter(otlp)?
        };
        let health = Arc::new(Health {
            endpoint: otlp.endpoint.clone(),
            failing: AtomicBool::new(false),
            dispatch: OnceLock::new(),
        });
        let exporter = OnRuntime {
            inner: Arc::new(exporter),
            handle: thread.handle.clone(),
            health: health.clone(),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_sampler(sampler(otlp.sampler))
            .with_resource(resource(otlp, fallback_service_name))
            .build();
        // The global propagator is a no-op until set: set the W3C one, for
        // code of the application's that uses OpenTelemetry's API.
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        // Spans at INFO and above: lodestar's, and those of the
        // application's that are as important (not the libraries' TRACE
        // and DEBUG spans, such as h2's per frame), whatever the log level.
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("lodestar"))
            .with_location(false)
            .with_threads(false)
            // No clock reads at every poll for busy and idle times.
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        PIPELINES.lock_unpoisoned().push((id, provider.clone()));
        super::spans::turn_on();
        let pipeline = Self {
            id,
            provider,
            health,
            thread: Some(thread),
        };
        Ok((Box::new(layer), pipeline))
    }

    /// Exports the spans that have ended, now.
    pub(super) async fn flush(&self) {
        flush_provider(self.provider.clone()).await;
    }

    /// Sends the reports of [`Health`] to `dispatch`.
    pub(super) fn report_to(&self, dispatch: &tracing::Dispatch) {
        let _ = self.health.dispatch.set(dispatch.downgrade());
    }

    /// Makes this pipeline's provider OpenTelemetry's global one.
    pub(super) fn set_global_provider(&self) {
        opentelemetry::global::set_tracer_provider(self.provider.clone());
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        PIPELINES.lock_unpoisoned().retain(|(id, _)| *id != self.id);
        // Blocks this thread while the batch processor exports what it has
        // on the export thread (not on the application's runtime).
        if let Err(error) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            self.health.report(&Err(error));
        }
        drop(self.thread.take());
    }
}

/// Flushes every pipeline of the process.
pub(super) async fn flush_all() {
    let providers: Vec<SdkTracerProvider> = PIPELINES
        .lock_unpoisoned()
        .iter()
        .map(|(_, provider)| provider.clone())
        .collect();
    for provider in providers {
        flush_provider(provider).await;
    }
}

/// `force_flush` blocks until the batch processor's thread has exported:
/// off the caller's runtime threads.
async fn flush_provider(provider: SdkTracerProvider) {
    let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
}

/// The thread whose runtime runs the exports; stopped when dropped.
#[derive(Debug)]
struct ExportThread {
    handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl ExportThread {
    fn start() -> Result<Self, TelemetryError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TelemetryError::Thread)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let join = std::thread::Builder::new()
            .name("lodestar-otlp".to_owned())
            .spawn(move || {
                // Nothing the export does is traced or logged: a span of
                // the exporter's would be exported in turn, without end.
                let _quiet = tracing::dispatcher::set_default(&tracing::Dispatch::none());
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(TelemetryError::Thread)?;
        Ok(Self {
            handle,
            stop: Some(stop),
            join: Some(join),
        })
    }
}

impl Drop for ExportThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

/// Runs each export of `inner` on the export runtime, and tells [`Health`]
/// how it went.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    handle: Handle,
    health: Arc<Health>,
}

impl SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.handle.spawn(async move { inner.export(batch).await });
        let health = self.health.clone();
        async move {
            let result = task.await.unwrap_or_else(|e| {
                Err(OTelSdkError::InternalFailure(format!(
                    "the export did not finish: {e}"
                )))
            });
            health.report(&result);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Set once, when the provider is built, before any export.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Whether the collector can be reached, said in the logs once per change
/// (not per batch).
#[derive(Debug)]
struct Health {
    endpoint: String,
    failing: AtomicBool,
    /// Where to say it; the global default if unset or gone.
    dispatch: OnceLock<tracing::dispatcher::WeakDispatch>,
}

impl Health {
    fn report(&self, result: &OTelSdkResult) {
        let say = |say: &dyn Fn()| match self.dispatch.get().and_then(|d| d.upgrade()) {
            Some(dispatch) => tracing::dispatcher::with_default(&dispatch, say),
            None => say(),
        };
        match result {
            Err(error) if !self.failing.swap(true, Ordering::Relaxed) => say(&|| {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    %error,
                    "cannot export spans to the OTLP collector; calls go on, and their spans \
                     are dropped until it can be reached (said once)"
                )
            }),
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => say(
                &|| tracing::info!(endpoint = %self.endpoint, "spans reach the OTLP collector again"),
            ),
            _ => {}
        }
    }
}

fn build_exporter(otlp: &Otlp) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let refused = |reason: &str| TelemetryError::Exporter {
        endpoint: otlp.endpoint.clone(),
        reason: reason.to_owned(),
    };
    match otlp.endpoint.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
        Ok(uri) if uri.scheme_str() == Some("https") => {
            return Err(refused(
                "TLS is not compiled into the exporter; send to a collector over plain http://",
            ));
        }
        _ => return Err(refused("expected an http:// URL with a host")),
    }
    let built = match otlp.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(otlp.endpoint.clone())
            .build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(otlp.endpoint.clone())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build(),
    };
    built.map_err(|e| TelemetryError::Exporter {
        endpoint: otlp.endpoint.clone(),
        reason: e.to_string(),
    })
}

fn sampler(sampler: Sampler) -> opentelemetry_sdk::trace::Sampler {
    use opentelemetry_sdk::trace::Sampler as S;
    match sampler {
        Sampler::AlwaysOn => S::AlwaysOn,
        Sampler::AlwaysOff => S::AlwaysOff,
        Sampler::TraceIdRatio(ratio) => S::TraceIdRatioBased(ratio),
        Sampler::ParentBasedAlwaysOn => S::ParentBased(Box::new(S::AlwaysOn)),
        Sampler::ParentBasedAlwaysOff => S::ParentBased(Box::new(S::AlwaysOff)),
        Sampler::ParentBasedTraceIdRatio(ratio) => {
            S::ParentBased(Box::new(S::TraceIdRatioBased(ratio)))
        }
    }
}

/// The resource: the attributes, then `service.name`: `OTEL_SERVICE_NAME`,
/// else the attributes', else the fallback, else `unknown_service`.
fn resource(otlp: &Otlp, fallback_service_name: Option<&str>) -> Resource {
    let in_attributes = otlp
        .resource
        .iter()
        .find(|(key, _)| key == "service.name")
        .map(|(_, value)| value.as_str());
    let name = otlp
        .service_name
        .as_deref()
        .or(in_attributes)
        .or(fallback_service_name)
        .unwrap_or(UNKNOWN_SERVICE);
    Resource::builder_empty()
        .with_attributes(
            otlp.resource
                .iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
        )
        .with_service_name(name.to_owned())
        .build()
}

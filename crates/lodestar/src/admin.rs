//! The admin endpoint: what operators and Prometheus ask a running
//! service over plain HTTP/1.1, on its own address
//! ([`ServiceBuilder::admin_addr`](crate::ServiceBuilder::admin_addr);
//! default `127.0.0.1`, any free port, given by
//! [`RunningService::admin_addr`](crate::RunningService::admin_addr)):
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` | the service's [metrics](crate::metrics), OpenMetrics text ([`CONTENT_TYPE`](crate::metrics::CONTENT_TYPE)) |
//! | `GET /healthz` | `200 ok` while the process serves (liveness) |
//! | `GET /readyz` | `200 ready` once the service serves and is registered (if it has a registry), `503` with the reason before that and from the start of its shutdown (readiness) |
//!
//! Anything else is `404` (`405` for another method than `GET` or
//! `HEAD`). Requests are bounded: at most [`MAX_CONNECTIONS`] connections
//! at once, each closed if its request head does not arrive within
//! [`HEADER_TIMEOUT`], and request bodies are never read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::server::Lifecycle;
use crate::server::lifecycle::Announcer;

/// Admin connections served at once; one more waits for a place.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection has to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin endpoint reports on.
pub(crate) struct State {
    /// `None`: metrics are off (`/metrics` is `404`).
    pub(crate) metrics: Option<Metrics>,
    /// The service's lifecycle, for readiness.
    pub(crate) events: Arc<Announcer>,
    /// Whether readiness waits for a registration.
    pub(crate) registers: bool,
}

impl State {
    /// Why the service is not ready, if it is not.
    fn not_ready(&self) -> Option<&'static str> {
        let history = self.events.history();
        if history.iter().any(|e| matches!(e, Lifecycle::NotServing)) {
            return Some("shutting down");
        }
        if !history.iter().any(|e| matches!(e, Lifecycle::Serving(_))) {
            return Some("not serving yet");
        }
        if self.registers && !history.iter().any(|e| matches!(e, Lifecycle::Registered)) {
            return Some("not registered yet");
        }
        None
    }

    fn answer(&self, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: &str| {
            let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            response
        };
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        }
        match request.uri().path() {
            "/metrics" => match &self.metrics {
                Some(metrics) => {
                    let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                    );
                    response
                }
                None => text(StatusCode::NOT_FOUND, "metrics are off for this service"),
            },
            "/healthz" => text(StatusCode::OK, "ok"),
            "/readyz" => match self.not_ready() {
                None => text(StatusCode::OK, "ready"),
                Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz or /readyz",
            ),
        }
    }
}

/// Serves `state` on `listener` until `stop` says so (or is dropped).
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Told to stop, or the handle is gone.
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let mut stopped = std::pin::pin!(stopped);
    let mut connections = JoinSet::new();
    loop {
        let place = tokio::select! {
            place = places.clone().acquire_owned() => place,
            _ = &mut stopped => break,
        };
        let Ok(place) = place else { break };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, most likely: wait a little.
                    tracing::warn!(%error, "admin endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stopped => break,
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = state.answer(&request);
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // A peer that goes away is not an error of ours.
            let _ = connection.await;
            drop(place);
        });
        // Reap the finished ones as we go.
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}

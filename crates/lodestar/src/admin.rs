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

/// What the admin endpoint's connections may cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub(crate) max_connections: usize,
    pub(crate) header_timeout: Duration,
}

impl Bounds {
    /// [`MAX_CONNECTIONS`] and [`HEADER_TIMEOUT`].
    pub(crate) const DEFAULT: Bounds = Bounds {
        max_connections: MAX_CONNECTIONS,
        header_timeout: HEADER_TIMEOUT,
    };
}

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
    bounds: Bounds,
    mut stop: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(bounds.max_connections));
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
                .header_read_timeout(bounds.header_timeout)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const BOUND: Duration = Duration::from_secs(5);
    const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

    /// An admin endpoint with `bounds`, serving until the sender drops.
    async fn start(bounds: Bounds) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(State {
            metrics: Some(Metrics::new()),
            events: Arc::new(Announcer::new()),
            registers: false,
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, state, bounds, stopped));
        (address, stop)
    }

    /// Sends `request` on a new connection and reads the answer to its end.
    async fn exchange(address: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        // A peer may close before reading everything (a head too large).
        let _ = stream.write_all(request).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(BOUND, stream.read_to_end(&mut answer))
            .await
            .expect("an answer, then the connection closed");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn bad_requests_get_their_status_and_the_endpoint_carries_on() {
        let (address, _stop) = start(Bounds::DEFAULT).await;
        let cases: [(&[u8], &str); 4] = [
            (
                b"POST /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 3\r\n\r\nabc",
                "HTTP/1.1 405",
            ),
            (
                b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                "HTTP/1.1 404",
            ),
            (b"this is not HTTP\r\n\r\n", "HTTP/1.1 400"),
            // Not serving yet (no lifecycle step announced).
            (
                b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                "HTTP/1.1 503",
            ),
        ];
        for (request, status) in cases {
            let answer = exchange(address, request).await;
            assert!(answer.starts_with(status), "{status}: {answer}");
        }
        // A request head larger than hyper's buffer is refused, not kept.
        let mut huge = b"GET /metrics HTTP/1.1\r\nx-big: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        let answer = exchange(address, &huge).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        );
        // Still serving.
        let answer = exchange(address, HEALTHZ).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_connections_are_bounded() {
        let bounds = Bounds {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
        };
        let (address, _stop) = start(bounds).await;
        // Two connections that say nothing take both places...
        let mut silent = [
            TcpStream::connect(address).await.unwrap(),
            TcpStream::connect(address).await.unwrap(),
        ];
        // ...so a third is served only once the header timeout has closed them.
        let started = tokio::time::Instant::now();
        let answer = exchange(address, HEALTHZ).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        for stream in &mut silent {
            let mut rest = Vec::new();
            let closed = tokio::time::timeout(BOUND, stream.read_to_end(&mut rest)).await;
            assert!(closed.is_ok(), "a silent connection is closed");
        }
    }
}

//! The subscribers' side: one HTTP server per broker taking messages in for
//! its subscriptions, and ending a subscription (stop delivery and the
//! heartbeat, deregister).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::ALLOW;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use lodestar::broker::{BrokerError, Delivery, Unsubscribe};
use lodestar::{InstanceKey, Registry};
use lodestar_core::error::chain;
use lodestar_core::sync::MutexExt;
use lodestar_core::task::AbortOnDrop;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::wire::{PATH_PREFIX, decode, reply};
use super::{Config, Inner, registry_error};

pub(super) struct Server {
    /// The advertised `host:port`.
    pub(super) address: String,
    pub(super) endpoints: Arc<Endpoints>,
    pub(super) _accept: AbortOnDrop<()>,
}

/// The live subscriptions of one server, by subscription id.
pub(crate) struct Endpoints {
    pub(super) subscriptions: Mutex<HashMap<String, Endpoint>>,
    pub(super) max_body: usize,
}

#[derive(Clone)]
pub(super) struct Endpoint {
    pub(super) topic: String,
    pub(super) tx: mpsc::Sender<Delivery>,
}

impl Inner {
    pub(super) async fn server(&self) -> Result<&Server, BrokerError> {
        self.server
            .get_or_try_init(|| start_server(&self.config))
            .await
    }

    pub(super) fn subscription_id(&self) -> String {
        let n = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.uid)
    }
}

pub(super) async fn start_server(config: &Config) -> Result<Server, BrokerError> {
    let listener = TcpListener::bind(config.bind).await.map_err(|e| {
        BrokerError::Unavailable(format!(
            "the HTTP broker cannot listen on {}: {e}",
            config.bind
        ))
    })?;
    let local = listener.local_addr().map_err(|e| {
        BrokerError::Unavailable(format!("the HTTP broker's listening address: {e}"))
    })?;
    let address = advertised(config.advertise.as_deref(), local)?;
    let endpoints = Arc::new(Endpoints::new(config.max_body));
    let accept = tokio::spawn(accept_loop(listener, endpoints.clone()));
    tracing::debug!(%local, %address, "HTTP broker listening");
    Ok(Server {
        address,
        endpoints,
        _accept: AbortOnDrop::new(accept),
    })
}

/// The address to register, from the configured one and the bound one.
pub(super) fn advertised(
    advertise: Option<&str>,
    local: SocketAddr,
) -> Result<String, BrokerError> {
    match advertise {
        Some(address) => match address.rsplit_once(':') {
            Some((host, "0")) if !host.is_empty() => Ok(format!("{host}:{}", local.port())),
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(address.to_owned())
            }
            _ => Err(BrokerError::Invalid(format!(
                "advertised address `{address}`: expected host:port"
            ))),
        },
        None if local.ip().is_unspecified() => Err(BrokerError::Invalid(format!(
            "the HTTP broker listens on {local}, which publishers cannot dial; \
             set HttpBrokerBuilder::advertise to a reachable host:port"
        ))),
        None => Ok(local.to_string()),
    }
}

/// Accepts connections until aborted; aborting drops (and so aborts) the
/// connection tasks too.
pub(super) async fn accept_loop(listener: TcpListener, endpoints: Arc<Endpoints>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, endpoints.clone()));
                }
                Err(e) => {
                    // E.g. out of file descriptors: wait instead of spinning.
                    tracing::warn!(error = %e, "HTTP broker: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

pub(super) async fn serve_connection(stream: TcpStream, endpoints: Arc<Endpoints>) {
    let _ = stream.set_nodelay(true);
    serve_io(stream, endpoints).await;
}

/// Serves the HTTP/1.1 connection `io` (a TCP stream, or in-memory bytes
/// for the fuzz targets).
pub(crate) async fn serve_io<I>(io: I, endpoints: Arc<Endpoints>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let service = hyper::service::service_fn(move |request| {
        let endpoints = endpoints.clone();
        async move { Ok::<_, Infallible>(endpoints.handle(request).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %chain(&e), "HTTP broker: connection ended with an error");
    }
}

impl Endpoints {
    /// Endpoints refusing bodies over `max_body` bytes, with no subscriptions yet.
    pub(crate) fn new(max_body: usize) -> Self {
        Self {
            subscriptions: Mutex::new(HashMap::new()),
            max_body,
        }
    }

    /// Delivers the messages POSTed to subscription `id` (of `topic`) to `tx`.
    pub(crate) fn subscribe(&self, id: String, topic: String, tx: mpsc::Sender<Delivery>) {
        self.subscriptions
            .lock_unpoisoned()
            .insert(id, Endpoint { topic, tx });
    }

    pub(super) fn remove(&self, id: &str) {
        self.subscriptions.lock_unpoisoned().remove(id);
    }

    pub(super) async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(id) = request
            .uri()
            .path()
            .strip_prefix(PATH_PREFIX)
            .map(str::to_owned)
        else {
            return reply(
                StatusCode::NOT_FOUND,
                format!("not a broker endpoint; POST {PATH_PREFIX}{{subscription id}}\n"),
            );
        };
        if request.method() != Method::POST {
            let mut response = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "messages are POSTed\n".to_owned(),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        let Some(endpoint) = self.subscriptions.lock_unpoisoned().get(&id).cloned() else {
            return reply(
                StatusCode::NOT_FOUND,
                format!("no subscription `{id}` here (it may have unsubscribed)\n"),
            );
        };
        let message = match decode(request, &endpoint.topic, self.max_body).await {
            Ok(message) => message,
            Err(response) => return response,
        };
        match endpoint.tx.send(Delivery::new(message)).await {
            Ok(()) => reply(StatusCode::OK, String::new()),
            Err(_) => reply(
                StatusCode::NOT_FOUND,
                format!("subscription `{id}` has ended\n"),
            ),
        }
    }
}

/// Ends one subscription: stops delivery, the heartbeat, and deregisters.
pub(super) struct SubscriptionHandle {
    pub(super) inner: Arc<Inner>,
    pub(super) id: String,
    pub(super) key: InstanceKey,
    pub(super) heartbeat: Option<JoinHandle<()>>,
}

impl SubscriptionHandle {
    /// Stops delivery and the heartbeat; returns the heartbeat task to await
    /// before deregistering (so that it cannot register again afterwards).
    pub(super) fn stop(&mut self) -> Option<JoinHandle<()>> {
        if let Some(server) = self.inner.server.get() {
            server.endpoints.remove(&self.id);
        }
        let heartbeat = self.heartbeat.take();
        if let Some(task) = &heartbeat {
            task.abort();
        }
        heartbeat
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        let Some(heartbeat) = self.stop() else {
            // Already unsubscribed, or never registered.
            return;
        };
        // Deregister in the background; without a runtime, the lease runs out.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let registry = self.inner.registry.clone();
            let key = self.key.clone();
            runtime.spawn(async move {
                let _ = heartbeat.await;
                if let Err(e) = registry.deregister(&key).await {
                    tracing::debug!(%key, error = %e, "HTTP broker: deregistering a dropped subscription failed; its lease will run out");
                }
            });
        }
    }
}

#[async_trait::async_trait]
impl Unsubscribe for SubscriptionHandle {
    async fn unsubscribe(mut self: Box<Self>) -> Result<(), BrokerError> {
        if let Some(heartbeat) = self.stop() {
            let _ = heartbeat.await;
        }
        self.inner
            .registry
            .deregister(&self.key)
            .await
            .map_err(registry_error)
    }
}

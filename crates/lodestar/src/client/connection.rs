//! One lazily opened HTTP/2 connection to one instance.

use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;
use tokio::net::TcpStream;

pub(crate) type Sender = http2::SendRequest<crate::body::RequestBody>;

/// The connection to one address: the sender of the open connection, if
/// any, readable without locking; opening one is single-flight.
#[derive(Debug)]
pub(crate) struct Connection {
    address: String,
    current: ArcSwapOption<Sender>,
    opening: tokio::sync::Mutex<()>,
}

impl Connection {
    pub(crate) fn new(address: String) -> Self {
        Self {
            address,
            current: ArcSwapOption::empty(),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// A sender on an open connection, opening one if there is none.
    pub(crate) async fn sender(&self, connect_timeout: Duration) -> Result<Sender, ConnectError> {
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let _opening = self.opening.lock().await;
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let sender = tokio::time::timeout(connect_timeout, self.open())
            .await
            .map_err(|_| {
                ConnectError(format!(
                    "connect to {} timed out after {connect_timeout:?}",
                    self.address
                ))
            })??;
        self.current.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    fn live(&self) -> Option<Sender> {
        let guard = self.current.load();
        guard
            .as_ref()
            .filter(|s| !s.is_closed())
            .map(|s| Sender::clone(s))
    }

    /// Forgets the current connection (it failed); the next call opens a new one.
    pub(crate) fn reset(&self) {
        self.current.store(None);
    }

    async fn open(&self) -> Result<Sender, ConnectError> {
        let stream = TcpStream::connect(&self.address)
            .await
            .map_err(|e| ConnectError(format!("connect to {}: {e}", self.address)))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError(format!("HTTP/2 handshake with {}: {e}", self.address)))?;
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%address, error = %e, "connection closed with an error");
            }
        });
        Ok(sender)
    }
}

/// A connection could not be opened.
#[derive(Debug, Clone)]
pub(crate) struct ConnectError(pub(crate) String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

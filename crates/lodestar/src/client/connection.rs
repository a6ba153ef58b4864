//! One lazily opened HTTP/2 connection to one address.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use lodestar_core::sync::MutexExt;

use crate::body::RequestBody;
use crate::io::Rewind;
use crate::tls::ClientTls;

pub(crate) type Sender = http2::SendRequest<RequestBody>;

/// The connection to one address: the sender of the open connection, if
/// any, readable without locking. Opening one is single-flight, and callers
/// that queued behind a failed attempt share its failure instead of trying
/// again one after another.
#[derive(Debug)]
pub(crate) struct Connection {
    address: String,
    current: ArcSwapOption<Sender>,
    opening: tokio::sync::Mutex<()>,
    /// Finished connect attempts; tells a queued caller that one failed meanwhile.
    attempts: AtomicU64,
    last_error: Mutex<Option<ConnectError>>,
}

/// A connection could not be had.
#[derive(Debug, Clone)]
pub(crate) struct ConnectError {
    pub(crate) message: String,
    /// False when this caller only waited for someone else's failed attempt.
    pub(crate) attempted: bool,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Connection {
    pub(crate) fn new(address: String) -> Self {
        Self {
            address,
            current: ArcSwapOption::empty(),
            opening: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Opens the connection, or waits for a concurrent caller that is
    /// opening it; the sender of the connection that is then open.
    pub(crate) async fn connect(
        &self,
        connect_timeout: Duration,
        tls: Option<&ClientTls>,
        settings: crate::Http2Settings,
    ) -> Result<Arc<Sender>, ConnectError> {
        let seen = self.attempts.load(Ordering::Acquire);
        let _opening = self.opening.lock().await;
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        if self.attempts.load(Ordering::Acquire) != seen {
            // An attempt finished while we queued and left no connection.
            let last = self.last_error.lock_unpoisoned().clone();
            return Err(ConnectError {
                message: last.map_or_else(
                    || format!("connect to {} failed", self.address),
                    |e| e.message,
                ),
                attempted: false,
            });
        }
        let result =
            match tokio::time::timeout(connect_timeout, self.open(tls, settings, connect_timeout))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "connect to {} timed out after {connect_timeout:?}",
                    self.address
                )),
            };
        let outcome = match result {
            Ok(sender) => {
                let sender = Arc::new(sender);
                self.current.store(Some(sender.clone()));
                Ok(sender)
            }
            Err(message) => {
                let error = ConnectError {
                    message,
                    attempted: true,
                };
                *self.last_error.lock_unpoisoned() = Some(error.clone());
                Err(error)
            }
        };
        self.attempts.fetch_add(1, Ordering::AcqRel);
        outcome
    }

    /// The sender of the open connection, if one is open and not closed.
    pub(crate) fn live(&self) -> Option<Arc<Sender>> {
        self.current.load_full().filter(|s| !s.is_closed())
    }

    /// Forgets `failed`, if it is still the current connection; the next
    /// call opens a new one. A connection opened meanwhile is kept.
    pub(crate) fn reset(&self, failed: &Arc<Sender>) {
        let current = self.current.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, failed)) {
            self.current.compare_and_swap(&current, None);
        }
    }

    async fn open(
        &self,
        tls: Option<&ClientTls>,
        settings: crate::Http2Settings,
        connect_timeout: Duration,
    ) -> Result<Sender, String> {
        let address = &self.address;
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect to {address}: {e}"))?;
        crate::io::tune(&stream, &settings, Some(settings.keepalive_timeout));
        let Some(tls) = tls else {
            return self.handshake(TokioIo::new(stream), settings).await;
        };
        let host = address
            .rsplit_once(':')
            .map_or(address.as_str(), |(host, _)| host);
        let name = tls.server_name(host).map_err(|e| e.to_string())?;
        let stream = tls
            .connector()
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake with {address}: {e}"))?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(format!(
                "TLS handshake with {address}: the server did not agree to HTTP/2 (ALPN `h2`), which gRPC needs"
            ));
        }
        // With TLS 1.3 a server checks our certificate only after our side of
        // the handshake is done, and refuses with an alert on our first read.
        // Servers speak first in HTTP/2 (their SETTINGS), so read that now,
        // to report a refusal as what it is, and replay the bytes to hyper.
        let mut stream = stream;
        let mut first = vec![0u8; 16 * 1024];
        // A refusal arrives within a round trip; a server that waits for our
        // preface before it speaks costs at most this much, once per connection.
        let wait = (connect_timeout / 4).min(Duration::from_millis(250));
        let prefix = match tokio::time::timeout(wait, stream.read(&mut first)).await {
            Ok(Ok(0)) => {
                return Err(format!(
                    "the server at {address} closed the connection right after the TLS handshake"
                ));
            }
            Ok(Ok(n)) => {
                first.truncate(n);
                first
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "the server at {address} refused the TLS connection: {e}{}",
                    refusal_hint(&e)
                ));
            }
            Err(_) => Vec::new(), // a server that waits for us to speak first
        };
        self.handshake(TokioIo::new(Rewind::new(prefix, stream)), settings)
            .await
    }

    async fn handshake<I>(&self, io: I, settings: crate::Http2Settings) -> Result<Sender, String>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, connection) = http2::Builder::new(crate::rt::BoxingExecutor)
            .timer(TokioTimer::new())
            .adaptive_window(settings.adaptive_window)
            .keep_alive_interval(settings.keepalive_interval)
            .keep_alive_timeout(settings.keepalive_timeout)
            .handshake(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {}: {e}", self.address))?;
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%address, error = %e, "connection closed with an error");
            }
        });
        Ok(sender)
    }
}

/// What to do about a TLS alert from a server that refused us.
fn refusal_hint(error: &std::io::Error) -> &'static str {
    use rustls::AlertDescription as Alert;
    let alert = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::AlertReceived(alert) => Some(*alert),
            _ => None,
        });
    match alert {
        Some(Alert::CertificateRequired) => {
            " (the server requires a client certificate: see ClientTls::with_identity_pem)"
        }
        Some(
            Alert::UnknownCA
            | Alert::BadCertificate
            | Alert::CertificateUnknown
            | Alert::AccessDenied,
        ) => {
            " (the server does not accept this client certificate: is it signed by a CA the server trusts?)"
        }
        Some(Alert::CertificateExpired) => " (the client certificate has expired)",
        _ => "",
    }
}

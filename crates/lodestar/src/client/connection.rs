//! One lazily opened HTTP/2 connection to one address.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use lodestar_core::sync::MutexExt;

use crate::io::Rewind;
use crate::tls::ClientTls;
use crate::{CONNECTION_WINDOW, STREAM_WINDOW};

/// The largest header block a response may carry: 16 KiB (hyper's client
/// default).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How many calls may be open before the server's SETTINGS say how many
/// it allows: 100 (hyper's client default).
const FIRST_MAX_STREAMS: usize = 100;
/// How much of a call's request data HTTP/2 buffers before it stops
/// granting the call room to send more: 1 MiB (hyper's client default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// The handle of an open HTTP/2 connection: opens streams on it.
#[derive(Debug)]
pub(crate) struct Sender {
    h2: h2::client::SendRequest<Bytes>,
    /// Set by the connection's task when the connection has ended.
    ended: Arc<Ended>,
    /// Dropped with the last handle: tells the connection's task, which
    /// then lets the calls still open finish and closes the connection.
    _last: super::stream::OnDrop,
}

impl Sender {
    /// The HTTP/2 handle, to clone per call.
    pub(crate) fn h2(&self) -> &h2::client::SendRequest<Bytes> {
        &self.h2
    }

    fn is_closed(&self) -> bool {
        self.ended.closed.load(Ordering::Acquire)
    }

    /// What a call on this connection failed with (`error`), and why the
    /// connection closed, if it did with an error: h2 tells each call only
    /// that its stream broke.
    pub(crate) fn failure(&self, error: &h2::Error) -> String {
        let error = lodestar_core::error::chain(error);
        match self.ended.error.get() {
            Some(closed) => format!("{error}; the connection was closed: {closed}"),
            None => error,
        }
    }
}

/// How a connection ended, as its task records it.
#[derive(Debug, Default)]
struct Ended {
    closed: AtomicBool,
    /// Why, if the connection failed (set before `closed`).
    error: OnceLock<String>,
}

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
            return self.handshake(stream, settings).await;
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
        // to report a refusal as what it is, and replay the bytes to HTTP/2.
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
        self.handshake(Rewind::new(prefix, stream), settings).await
    }

    async fn handshake<I>(&self, io: I, settings: crate::Http2Settings) -> Result<Sender, String>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (h2, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_max_send_streams(FIRST_MAX_STREAMS)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {}: {e}", self.address))?;
        let keepalive = settings
            .keepalive_interval
            .zip(connection.ping_pong())
            .map(|(interval, pings)| keepalive(pings, interval, settings.keepalive_timeout));
        let ended = Arc::new(Ended::default());
        let (last, dropped) = super::stream::drop_signal();
        let address = self.address.clone();
        let record = ended.clone();
        tokio::spawn(async move {
            let keepalive = async move {
                match keepalive {
                    Some(keepalive) => keepalive.await,
                    None => std::future::pending().await,
                }
            };
            let error = tokio::select! {
                biased;
                result = &mut connection => result.err().map(|e| e.to_string()),
                unanswered = keepalive => Some(unanswered),
                // h2 does not wake the connection when its last handle goes:
                // now it ends once the calls still open are done.
                _ = dropped => connection.await.err().map(|e| e.to_string()),
            };
            if let Some(error) = error {
                tracing::debug!(%address, %error, "connection closed with an error");
                let _ = record.error.set(error);
            }
            // Before the connection is dropped, which fails its calls.
            record.closed.store(true, Ordering::Release);
        });
        Ok(Sender {
            h2,
            ended,
            _last: last,
        })
    }
}

/// Sends a PING every `interval`; ends (which closes the connection) with
/// the reason when one is not answered within `timeout`.
async fn keepalive(mut pings: h2::PingPong, interval: Duration, timeout: Duration) -> String {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
            Err(_) => return format!("keepalive PING not answered within {timeout:?}"),
        }
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

//! Connections: the accept loop, the limits on connections, and serving
//! one connection over HTTP/2 or HTTP/1.1 (handshake deadline, stall
//! detection, graceful drain).
//!
//! Which HTTP a connection speaks is decided once, before hyper sees it:
//! under TLS by ALPN (`h2`, or `http/1.1` when the web protocols are on),
//! in plaintext by its first bytes (the HTTP/2 preface, or anything else
//! for HTTP/1.1). Both serve the same [`ConnectionStack`] under the same
//! limits: the connection count, the unsent-byte budgets and stall
//! timeout, the drain at shutdown. HTTP/1.1 adds a deadline for each
//! request's head ([`HTTP1_HEADER_TIMEOUT`]) and a bound on its size.

use lodestar_core::task::AbortOnDrop;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::budget::{ConnectionBudget, ServerBudget};
use super::lifecycle::{Announcer, Lifecycle};
use super::stack::{ConnectionStack, Stack};
use super::web::Upgraded;
use crate::io::Rewind;

/// The least a connection holding response data must send per
/// `stall_timeout` not to count as stalled: 64 KiB (or all it held).
const MIN_PROGRESS: usize = 64 * 1024;

/// Limits on what clients may cost a server through its connections: how
/// many connections, and how much response data it holds for clients that
/// do not read it. Set with
/// [`ServiceBuilder::connection_limits`](crate::ServiceBuilder::connection_limits).
///
/// Response data is counted from the moment a handler's body yields it
/// until HTTP/2 has written it to the socket, so a client that stops
/// reading (or never opens its flow-control window) pins at most
/// `max_unsent_bytes_per_connection`, and all clients together at most
/// `max_unsent_bytes`. See `docs/limits.md` for every limit.
///
/// ```
/// use std::time::Duration;
/// use lodestar::server::ConnectionLimits;
///
/// let limits = ConnectionLimits {
///     max_connections: 512,
///     stall_timeout: Duration::from_secs(10),
///     ..ConnectionLimits::default()
/// };
/// assert_eq!(limits.max_unsent_bytes_per_connection, 32 * 1024 * 1024);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once. One more is accepted and closed at once,
    /// so its client can try another instance. Default: 4096.
    pub max_connections: usize,
    /// Response bytes one connection may hold unsent. A response message
    /// that does not fit ends its call with `RESOURCE_EXHAUSTED`. Keep it
    /// above the send limit ([`MessageLimits`](crate::MessageLimits)), or messages that large can
    /// never be sent. Default: 32 MiB (eight 4 MiB messages).
    pub max_unsent_bytes_per_connection: usize,
    /// Response bytes all connections together may hold unsent; past it, as
    /// above. Default: 256 MiB.
    pub max_unsent_bytes: usize,
    /// A connection that holds unsent response data and sends less than
    /// 64 KiB of it (or less than all it held) in this long is closed (every
    /// call on it ends), freeing what it holds: a client that takes a byte
    /// now and then pins the server's budget as surely as one that takes
    /// nothing. Detected between one and two times this after progress
    /// stopped. Must be above zero. Default: 30 s.
    pub stall_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_unsent_bytes_per_connection: 32 * 1024 * 1024,
            max_unsent_bytes: 256 * 1024 * 1024,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// How long an HTTP/1.1 client has to send a request's head (the
/// request line and headers), counted from when the server starts waiting
/// for it: a client that dawdles, or a kept-alive connection left idle
/// this long, is disconnected.
pub(crate) const HTTP1_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The most an HTTP/1.1 request's head may take (hyper answers `431`
/// past it), which also bounds a Connect `GET`'s query.
pub(crate) const HTTP1_MAX_HEAD: usize = 64 * 1024;

/// The server's drain, as each connection sees it: `None` while serving,
/// then the instant the grace period ends, when connections still open
/// are cut.
pub(crate) type Drain = watch::Receiver<Option<tokio::time::Instant>>;

/// How connections are served: TLS or not, HTTP/1.1 or not, HTTP/2
/// settings, and limits.
pub(crate) struct Connections {
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Whether HTTP/1.1 connections are served (the web protocols are on).
    pub(crate) http1: bool,
    pub(crate) http2: crate::Http2Settings,
    pub(crate) limits: ConnectionLimits,
}

/// Accepts connections until told to stop, then closes the listener, asks
/// every connection to finish (GOAWAY), and waits up to `grace` for them.
pub(crate) async fn serve(
    listener: TcpListener,
    stack: Stack,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    events: Arc<Announcer>,
    connections: Connections,
) {
    let Connections {
        tls,
        http1: serve_http1,
        http2: settings,
        limits,
    } = connections;
    let http1 = serve_http1.then(|| {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(HTTP1_HEADER_TIMEOUT)
            .max_buf_size(HTTP1_MAX_HEAD)
            .keep_alive(true);
        http1
    });
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        // A client's fixed windows; adaptive windows, when on, replace them
        // (so this order).
        .initial_stream_window_size(crate::STREAM_WINDOW)
        .initial_connection_window_size(crate::CONNECTION_WINDOW)
        .adaptive_window(settings.adaptive_window)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .max_concurrent_streams(settings.max_concurrent_streams);
    if serve_http1 {
        // RFC 8441: WebSocket over HTTP/2 (extended CONNECT); a CONNECT
        // with WebSocket off is refused by the web dispatch.
        http2.enable_connect_protocol();
    }
    let (drain_tx, drain_rx) = watch::channel(None);
    let mut connections = JoinSet::new();
    let unsent = ServerBudget::new(limits.max_unsent_bytes);
    // Whether the last connection was refused, to warn once per episode.
    let mut refusing = false;
    let stopped = async move {
        // A dropped sender means the handle was dropped: keep serving.
        if stop.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            () = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // No TCP_USER_TIMEOUT: the stall timeout closes a connection whose
                    // client stops taking its data.
                    crate::io::tune(&stream, &settings, None);
                    // Count only connections still open.
                    while connections.try_join_next().is_some() {}
                    if connections.len() >= limits.max_connections {
                        if !refusing {
                            tracing::warn!(max_connections = limits.max_connections,
                                "at the connection limit: closing new connections until some end");
                        }
                        refusing = true;
                        tracing::debug!(%peer, "connection refused: at the connection limit");
                        drop(stream);
                        continue;
                    }
                    refusing = false;
                    let budget = ConnectionBudget::new(
                        limits.max_unsent_bytes_per_connection,
                        unsent.clone(),
                    );
                    connections.spawn(serve_connection(
                        stream,
                        settings.handshake_timeout,
                        tls.clone(),
                        Builders { http1: http1.clone(), http2: http2.clone() },
                        Served {
                            stack: stack.for_connection(budget.clone(), drain_rx.clone()),
                            budget,
                            stall_timeout: limits.stall_timeout,
                        },
                        drain_rx.clone(),
                    ));
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    events.announce(Lifecycle::ListenerClosed);
    let _ = drain_tx.send(Some(tokio::time::Instant::now() + grace));
    let open = connections.len();
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    let cut = match drained {
        Ok(()) => 0,
        Err(_) => {
            let cut = connections.len();
            tracing::warn!(
                cut,
                open,
                ?grace,
                "grace period over; cutting the remaining connections"
            );
            connections.shutdown().await;
            cut
        }
    };
    events.announce(Lifecycle::Drained { cut });
}

/// The client connection preface every HTTP/2 connection starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's connection builders: HTTP/1.1 when served, and HTTP/2.
struct Builders {
    http1: Option<hyper::server::conn::http1::Builder>,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// What serves one connection: the stack for its calls, and the budget it
/// watches for stalls.
struct Served {
    stack: ConnectionStack,
    budget: Arc<ConnectionBudget>,
    stall_timeout: Duration,
}

async fn serve_connection(
    stream: TcpStream,
    handshake_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    builders: Builders,
    served: Served,
    drain: Drain,
) {
    let peer = stream.peer_addr().ok();
    let started = tokio::time::Instant::now() + handshake_timeout;
    // In the connection's own task, so a slow client holds up no one else;
    // a client that never finishes its handshake is dropped.
    let Some(acceptor) = tls else {
        return match builders.http1 {
            // HTTP/2 only: as before, the preface read whole.
            None => {
                if let Some(stream) = expect_preface(stream, started, peer).await {
                    let connection = builders
                        .http2
                        .serve_connection(TokioIo::new(stream), served.stack);
                    run_connection(connection, served.budget, served.stall_timeout, drain, peer)
                        .await;
                }
            }
            Some(http1) => match sniff(stream, started, peer).await {
                Some((stream, true)) => {
                    let connection = builders
                        .http2
                        .serve_connection(TokioIo::new(stream), served.stack);
                    run_connection(connection, served.budget, served.stall_timeout, drain, peer)
                        .await;
                }
                Some((stream, false)) => serve_http1(&http1, stream, served, drain, peer).await,
                None => {}
            },
        };
    };
    let stream = match tokio::time::timeout_at(started, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return tracing::info!(?peer, error = %e, "TLS handshake failed"),
        Err(_) => {
            return tracing::info!(?peer, "TLS handshake timed out after {handshake_timeout:?}");
        }
    };
    // ALPN decides: `http/1.1` is offered only when HTTP/1.1 is served.
    let negotiated_http1 = stream.get_ref().1.alpn_protocol() == Some(b"http/1.1");
    match builders.http1 {
        Some(http1) if negotiated_http1 => serve_http1(&http1, stream, served, drain, peer).await,
        _ => {
            if let Some(stream) = expect_preface(stream, started, peer).await {
                let connection = builders
                    .http2
                    .serve_connection(TokioIo::new(stream), served.stack);
                run_connection(connection, served.budget, served.stall_timeout, drain, peer).await;
            }
        }
    }
}

/// Serves an HTTP/1.1 connection, then the WebSocket it may have been
/// upgraded to: in this task, so that a socket counts against
/// `max_connections`, and is waited for and cut as connections are.
async fn serve_http1<S>(
    http1: &hyper::server::conn::http1::Builder,
    stream: S,
    served: Served,
    drain: Drain,
    peer: Option<std::net::SocketAddr>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let upgraded = Arc::new(Upgraded::default());
    let stack = served.stack.holding_upgrades(upgraded.clone());
    let connection = http1
        .serve_connection(TokioIo::new(stream), stack)
        .with_upgrades();
    run_connection(connection, served.budget, served.stall_timeout, drain, peer).await;
    if let Some(socket) = upgraded.take() {
        socket.await;
    }
}

/// Reads a plaintext connection's first bytes before `deadline`: the
/// whole HTTP/2 preface (`true`), or as soon as a byte differs from it,
/// HTTP/1.1 (`false`). Hands back a stream that replays them.
async fn sniff<S>(
    mut stream: S,
    deadline: tokio::time::Instant,
    peer: Option<std::net::SocketAddr>,
) -> Option<(Rewind<S>, bool)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut read = vec![0u8; PREFACE.len()];
    let mut len = 0;
    while len < PREFACE.len() {
        match tokio::time::timeout_at(deadline, stream.read(&mut read[len..])).await {
            Ok(Ok(0)) => {
                tracing::debug!(?peer, "connection closed before its first request");
                return None;
            }
            Ok(Ok(n)) => len += n,
            Ok(Err(e)) => {
                tracing::debug!(?peer, error = %e, "connection failed before its first request");
                return None;
            }
            Err(_) => {
                tracing::info!(?peer, "no request in time; closing the connection");
                return None;
            }
        }
        if read[..len] != PREFACE[..len] {
            read.truncate(len);
            return Some((Rewind::new(read, stream), false));
        }
    }
    Some((Rewind::new(read, stream), true))
}

/// Reads the HTTP/2 preface before `deadline` (hyper would wait forever),
/// and hands back a stream that replays it.
async fn expect_preface<S>(
    mut stream: S,
    deadline: tokio::time::Instant,
    peer: Option<std::net::SocketAddr>,
) -> Option<Rewind<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut preface = vec![0u8; PREFACE.len()];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) => Some(Rewind::new(preface, stream)),
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "connection closed before the HTTP/2 preface");
            None
        }
        Err(_) => {
            tracing::info!(?peer, "no HTTP/2 preface in time; closing the connection");
            None
        }
    }
}

/// A connection hyper serves, as [`run_connection`] drives it: HTTP/2
/// or HTTP/1.1.
trait Driven: Future<Output = Result<(), hyper::Error>> {
    /// Finish the calls open, take no more (HTTP/2: `GOAWAY`; HTTP/1.1:
    /// close after the request in progress).
    fn drain(self: Pin<&mut Self>);
}

impl<I, S, B> Driven for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Driven for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

async fn run_connection<C: Driven>(
    connection: C,
    budget: Arc<ConnectionBudget>,
    stall_timeout: Duration,
    drain: Drain,
    peer: Option<std::net::SocketAddr>,
) {
    tokio::pin!(connection);
    // The drain and stall checks run in a task of their own: this one is
    // woken for every frame, and then polls only the connection and reads
    // one atomic (no timer, channel or waker to register with again).
    let signals = Arc::new(Signals::default());
    let watcher = tokio::spawn(watch_connection(
        drain,
        budget,
        stall_timeout,
        peer,
        signals.clone(),
    ));
    let _watcher = AbortOnDrop::new(watcher);
    // Whether the drain was passed on; the signals when the waker was last
    // registered, and that waker.
    let mut draining = false;
    let mut seen = 0;
    let mut registered: Option<std::task::Waker> = None;
    let ended = std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(result.map_err(|e| (e, draining)));
            }
            let now = signals.state.load(Ordering::Acquire);
            if now & CUT != 0 {
                return Poll::Ready(Ok(()));
            }
            if now & DRAIN != 0 && !draining {
                // Polled again at once, to send the GOAWAY.
                draining = true;
                connection.as_mut().drain();
                continue;
            }
            // A wake takes the registered waker: register again after each
            // signal, or when polled with another waker.
            if now != seen || registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                seen = now;
                signals.waker.register(cx.waker());
                registered = Some(cx.waker().clone());
                continue; // a signal may have come before the waker was there
            }
            return Poll::Pending;
        }
    });
    if let Err((e, draining)) = ended.await {
        tracing::debug!(error = %e, draining, "connection ended with an error");
    }
}

/// What a connection's watcher tells its task: [`DRAIN`] (the server is
/// stopping: finish the calls open, take no more) and [`CUT`] (the client
/// stalled: close now), as bits set once each.
#[derive(Default)]
struct Signals {
    state: AtomicU8,
    waker: AtomicWaker,
}

/// The server is stopping: finish the calls open, take no more.
const DRAIN: u8 = 1;
/// The client reads too little of its responses: close the connection.
const CUT: u8 = 2;

impl Signals {
    fn send(&self, signal: u8) {
        self.state.fetch_or(signal, Ordering::Release);
        self.waker.wake();
    }
}

/// Watches a connection for the server's drain and for a stalled client:
/// says `drain` when the server stops, and `cut` when the client has read
/// too little of its responses for a `stall_timeout`.
async fn watch_connection(
    mut drain: Drain,
    budget: Arc<ConnectionBudget>,
    stall_timeout: Duration,
    peer: Option<std::net::SocketAddr>,
    signals: Arc<Signals>,
) {
    // A stall: data held at two checks in a row, and less than
    // MIN_PROGRESS of it (or of what was held) sent between.
    let mut stall_check =
        tokio::time::interval_at(tokio::time::Instant::now() + stall_timeout, stall_timeout);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (budget.held(), budget.sent());
    let mut draining = false;
    loop {
        tokio::select! {
            _ = drain.wait_for(Option::is_some), if !draining => {
                draining = true;
                signals.send(DRAIN);
            }
            _ = stall_check.tick() => {
                let now = (budget.held(), budget.sent());
                // A client that takes a trickle (a byte now and then) holds
                // its budget as surely as one that takes nothing: progress
                // is at least MIN_PROGRESS, or all that was held.
                let needed = last.0.min(MIN_PROGRESS);
                let sent = now.1.saturating_sub(last.1);
                if last.0 > 0 && now.0 > 0 && sent < needed as u64 {
                    tracing::info!(?peer, held = now.0, sent, ?stall_timeout,
                        "closing a connection whose client reads too little of its responses");
                    signals.send(CUT);
                    return;
                }
                last = now;
            }
        }
    }
}

//! Connections: the HTTP API's bounded accept loop (a connection limit,
//! TLS, header and idle timeouts), and the open-file limit.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How the HTTP API's connections are bounded.
pub(crate) struct Limits {
    /// At most this many connections at once.
    pub(crate) max_connections: usize,
    /// Time to finish the TLS handshake, and then each request's headers
    /// (idle time between requests included).
    pub(crate) header_timeout: Duration,
    /// TLS, offering `http/1.1` in ALPN.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
}

/// How often, at most, refused connections are logged (with their count).
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `app` over HTTP/1.1 on `listener` within `limits`, until the
/// task is aborted (its connections with it).
pub(crate) async fn serve_http1(listener: TcpListener, app: axum::Router, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let service = TowerToHyperService::new(app);
    let mut connections = JoinSet::new();
    let mut refused = 0u64;
    let mut last_logged: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "registry HTTP API: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Closed at once: a connection past the limit holds nothing.
                    drop(stream);
                    refused += 1;
                    if last_logged.is_none_or(|at| at.elapsed() >= REFUSED_LOG_INTERVAL) {
                        tracing::warn!(
                            refused,
                            limit = limits.max_connections,
                            "registry HTTP API: at its connection limit; closing new connections"
                        );
                        last_logged = Some(tokio::time::Instant::now());
                    }
                    continue;
                };
                let http1 = http1.clone();
                let service = service.clone();
                let tls = limits.tls.clone();
                let handshake = limits.header_timeout;
                connections.spawn(async move {
                    let _slot = slot;
                    let _ = stream.set_nodelay(true);
                    let Some(tls) = tls else {
                        let served = http1.serve_connection(TokioIo::new(stream), service);
                        if let Err(e) = served.await {
                            tracing::debug!(%peer, error = %e, "registry HTTP connection ended");
                        }
                        return;
                    };
                    let stream = match tokio::time::timeout(handshake, tls.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            return tracing::info!(%peer, error = %e, "registry HTTP API: TLS handshake failed");
                        }
                        Err(_) => {
                            return tracing::info!(%peer, "registry HTTP API: TLS handshake timed out after {handshake:?}");
                        }
                    };
                    let served = http1.serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = served.await {
                        tracing::debug!(%peer, error = %e, "registry HTTP connection ended");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Raises the soft open-file limit to the hard limit, so that the limits
/// above, not file descriptors, bound the connections; logs what it did.
pub(crate) fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` into the valid struct given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            let e = std::io::Error::last_os_error();
            return tracing::warn!(error = %e, "cannot read the open-file limit");
        }
        let soft = limit.rlim_cur;
        if soft >= limit.rlim_max {
            return tracing::info!(open_files = soft, "open-file limit already at its maximum");
        }
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one valid `rlimit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            let e = std::io::Error::last_os_error();
            return tracing::warn!(error = %e, open_files = soft, "cannot raise the open-file limit");
        }
        tracing::info!(
            from = soft,
            to = limit.rlim_max,
            "raised the open-file limit to its hard limit"
        );
    }
}

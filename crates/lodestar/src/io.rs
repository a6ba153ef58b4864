//! Small I/O helpers shared by the client and the server.

use std::time::Duration;

use tokio::net::TcpStream;

/// How often TCP keepalive probes an idle connection once it starts.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// How many unanswered TCP keepalive probes close a connection.
const PROBES: u32 = 3;

/// Readies a new connection's socket, as `settings` say: no Nagle delay
/// (every gRPC write is a whole frame) and TCP keepalive. With
/// `unacknowledged`, data the peer's TCP has not acknowledged for that
/// long closes the connection (Linux `TCP_USER_TIMEOUT`); clients set it,
/// so that calls to an instance that died mid-call fail in seconds, not
/// after the kernel's retransmissions (about 15 minutes). Servers do not:
/// their stall timeout closes a connection that stops taking its data. A
/// setting the platform refuses is skipped: the connection works without it.
pub(crate) fn tune(
    stream: &TcpStream,
    settings: &crate::Http2Settings,
    unacknowledged: Option<Duration>,
) {
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    if let Some(idle) = settings.tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(PROBE_INTERVAL)
            .with_retries(PROBES);
        let _ = socket.set_tcp_keepalive(&keepalive);
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if unacknowledged.is_some() {
        let _ = socket.set_tcp_user_timeout(unacknowledged);
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = unacknowledged;
}

/// An I/O stream that yields `prefix` before reading from `inner`.
pub(crate) struct Rewind<T> {
    prefix: Vec<u8>,
    offset: usize,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self {
            prefix,
            offset: 0,
            inner,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.offset < self.prefix.len() {
            let n = (self.prefix.len() - self.offset).min(buf.remaining());
            let start = self.offset;
            buf.put_slice(&self.prefix[start..start + n]);
            self.offset += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads the text file at `path`, refusing one larger than `max` bytes
/// (whatever its metadata says: one byte more is read to find out); the
/// error says why, for the caller to name the file and what it was for
/// (`what`: "a policy file", "a configuration file").
pub(crate) fn read_bounded(path: &std::path::Path, max: u64, what: &str) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > max {
        return Err(format!("larger than the {max} bytes {what} may have"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tuned_socket_has_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(!socket.keepalive().unwrap(), "off before");

        let settings = crate::Http2Settings::client();
        tune(&stream, &settings, Some(settings.keepalive_timeout));
        assert!(stream.nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), PROBE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), PROBES);
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(settings.keepalive_timeout)
        );

        let other = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let off = crate::Http2Settings {
            tcp_keepalive: None,
            ..settings
        };
        tune(&other, &off, None);
        let other = socket2::SockRef::from(&other);
        assert!(!other.keepalive().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(other.tcp_user_timeout().unwrap(), None);
    }
}

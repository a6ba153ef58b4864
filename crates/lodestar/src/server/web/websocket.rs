//! WebSocket for every call kind: the `lodestar.v1` sub-protocol
//! (`docs/web.md`, "WebSocket").
//!
//! A socket is opened with an HTTP/1.1 `Upgrade: websocket` (`101`) or an
//! HTTP/2 extended `CONNECT` with `:protocol = websocket` (`200`, RFC
//! 8441), on the method's path. Every binary message is one envelope
//! (Connect's: a flags byte, a 4-byte big-endian length, the payload):
//! the client sends a leading-metadata envelope (headers, deadline), its
//! messages, and an end-of-stream envelope; the server sends its messages
//! and an end-of-stream envelope carrying the status and trailers, then
//! closes with `1000`. The messages become the body of a native gRPC
//! request that goes through the same server stack as every protocol.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::connect::{end_stream, grpc_timeout};
use super::{WebRequestBody, WebResponseBody, WebState, call, cors, plain};
use crate::server::connection::Drain;
use crate::server::stack::{Outer, ResponseBody};

/// The sub-protocol with JSON messages.
pub(super) const PROTOCOL_JSON: &str = "lodestar.v1+json";
/// The sub-protocol with protobuf messages.
pub(super) const PROTOCOL_PROTO: &str = "lodestar.v1+proto";

/// Envelope flag: a compressed message (not supported on WebSocket).
const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: the end of the stream (the client's half-close, or the
/// server's status).
const FLAG_END: u8 = 0x02;
/// Envelope flag: the client's leading metadata.
const FLAG_METADATA: u8 = 0x04;

/// The envelope header's length: flags and length.
const HEADER: usize = 5;
/// How many request messages may wait for the handler.
const QUEUE: usize = 8;
/// How long the server waits for the peer's close frame after its own.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// At most this many leading-metadata headers.
const MAX_HEADERS: usize = 64;
/// When the server drains, a socket whose call is still running is
/// closed (`1001`) this long before the grace period ends, or halfway
/// through a shorter one, so that its close frame goes out before the
/// connection is cut.
const CLOSE_MARGIN: Duration = Duration::from_millis(500);

/// A socket's task, for its connection to run.
type SocketTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a WebSocket takes from the connection it is opened on: the
/// server's drain, and on HTTP/1.1 the [`Upgraded`] slot its task goes
/// in.
///
/// An HTTP/1.1 connection that upgrades is over for hyper, so its task
/// runs the socket next: the socket then counts against
/// `max_connections`, and is waited for and cut at shutdown as any
/// connection. An HTTP/2 socket is one stream of a connection that stays
/// open while it runs, so it has a task of its own.
#[derive(Clone)]
pub(crate) struct SocketHost {
    drain: Drain,
    upgraded: Option<Arc<Upgraded>>,
}

impl SocketHost {
    /// Sockets that run in tasks of their own (HTTP/2).
    pub(crate) fn new(drain: Drain) -> Self {
        Self {
            drain,
            upgraded: None,
        }
    }

    /// Sockets put in `upgraded`, for the connection's task (HTTP/1.1).
    pub(crate) fn holding(self, upgraded: Arc<Upgraded>) -> Self {
        Self {
            upgraded: Some(upgraded),
            ..self
        }
    }

    /// Runs `task` where this host says.
    fn run(&self, task: SocketTask) {
        let task = match &self.upgraded {
            Some(slot) => match slot.put(task) {
                Ok(()) => return,
                Err(task) => task,
            },
            None => task,
        };
        tokio::spawn(task);
    }
}

/// The WebSocket an HTTP/1.1 connection was upgraded to, for the
/// connection's task to run when hyper is done with it.
#[derive(Default)]
pub(crate) struct Upgraded(std::sync::Mutex<Option<SocketTask>>);

impl Upgraded {
    /// The socket's task, if the connection was upgraded.
    pub(crate) fn take(&self) -> Option<SocketTask> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Puts `task` in the slot, or hands it back when one is there.
    fn put(&self, task: SocketTask) -> Result<(), SocketTask> {
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_some() {
            return Err(task);
        }
        *slot = Some(task);
        Ok(())
    }
}

/// Whether `request` asks for a WebSocket: an HTTP/1.1 `GET` with
/// `Upgrade: websocket`, or an HTTP/2 `CONNECT` with `:protocol =
/// websocket`.
pub(super) fn is_websocket<B>(request: &Request<B>) -> bool {
    if request.version() == Version::HTTP_2 {
        return request.method() == Method::CONNECT
            && request
                .extensions()
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    }
    request.method() == Method::GET
        && request
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
            })
}

/// How the socket's messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Proto,
}

impl Encoding {
    fn protocol(self) -> &'static str {
        match self {
            Encoding::Json => PROTOCOL_JSON,
            Encoding::Proto => PROTOCOL_PROTO,
        }
    }

    fn grpc_content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Encoding::Json => "application/grpc+json",
            Encoding::Proto => "application/grpc",
        })
    }

    /// The first of ours among `Sec-WebSocket-Protocol`'s values.
    fn offered(headers: &HeaderMap) -> Option<Self> {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| match p.trim() {
                PROTOCOL_JSON => Some(Encoding::Json),
                PROTOCOL_PROTO => Some(Encoding::Proto),
                _ => None,
            })
    }
}

/// Answers a WebSocket opening: checks the origin, the version and the
/// sub-protocol, and hands the upgraded connection to a task of its own
/// that runs the call.
pub(super) fn open(
    outer: Outer,
    state: &Arc<WebState>,
    sockets: SocketHost,
    mut request: Request<Incoming>,
) -> Response<WebResponseBody> {
    let settings = &state.settings;
    if request.headers().contains_key(header::ORIGIN)
        && cors::allowed_origin(&settings.cors, request.headers()).is_none()
        && !cors::is_same_origin(&request)
    {
        return plain(
            StatusCode::FORBIDDEN,
            "this origin may not open a WebSocket here (the service's \
             [service.web.cors] allow_origins does not list it)",
        );
    }
    let http2 = request.version() == Version::HTTP_2;
    if request
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut response = plain(
            StatusCode::BAD_REQUEST,
            "a WebSocket opening needs Sec-WebSocket-Version: 13",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let accept = if http2 {
        None
    } else {
        let Some(key) = request.headers().get(header::SEC_WEBSOCKET_KEY) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "a WebSocket opening needs Sec-WebSocket-Key",
            );
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        match HeaderValue::try_from(accept) {
            Ok(value) => Some(value),
            Err(_) => {
                return plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the WebSocket accept key could not be made",
                );
            }
        }
    };
    let Some(encoding) = Encoding::offered(request.headers()) else {
        return plain(
            StatusCode::BAD_REQUEST,
            &format!(
                "a WebSocket here needs Sec-WebSocket-Protocol {PROTOCOL_JSON} or {PROTOCOL_PROTO}"
            ),
        );
    };
    let upgrade = hyper::upgrade::on(&mut request);
    let (parts, _body) = request.into_parts();
    let socket = Socket {
        outer,
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        encoding,
        receive_limit: state.limits.max_decoding_message_size,
        ping_interval: settings.websocket_ping_interval,
        ping_timeout: settings.websocket_ping_timeout,
        drain: sockets.drain.clone(),
    };
    sockets.run(Box::pin(async move {
        match upgrade.await {
            Ok(upgraded) => socket.run(TokioIo::new(upgraded)).await,
            Err(error) => tracing::debug!(%error, "WebSocket upgrade failed"),
        }
    }));
    let mut response = Response::new(WebResponseBody::empty());
    let headers = response.headers_mut();
    if let Some(accept) = accept {
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    } else {
        headers.remove(header::CONTENT_LENGTH);
    }
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(encoding.protocol()),
    );
    response
}

/// Why a socket is closed before its call ends normally.
#[derive(Debug)]
struct Closing {
    code: CloseCode,
    reason: String,
}

impl Closing {
    fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        // A close frame's reason is at most 123 bytes.
        if reason.len() > 123 {
            let mut end = 123;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Self { code, reason }
    }

    fn protocol(reason: impl Into<String>) -> Self {
        Self::new(CloseCode::Protocol, reason)
    }
}

/// One envelope of a binary message, checked whole.
fn envelope(message: &Bytes, limit: usize) -> Result<(u8, Bytes), Closing> {
    if message.len() < HEADER {
        return Err(Closing::protocol(format!(
            "a binary message of {} bytes; each is one envelope of at least 5 bytes",
            message.len()
        )));
    }
    let flags = message[0];
    let len = u32::from_be_bytes([message[1], message[2], message[3], message[4]]) as usize;
    if len > limit {
        return Err(Closing::new(
            CloseCode::Size,
            format!("an envelope of {len} bytes; this method takes at most {limit}"),
        ));
    }
    if len != message.len() - HEADER {
        return Err(Closing::protocol(format!(
            "an envelope says {len} bytes but carries {}; send one envelope per message",
            message.len() - HEADER
        )));
    }
    Ok((flags, message.slice(HEADER..)))
}

/// The client's leading metadata.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Leading {
    #[serde(default)]
    headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// Request headers the socket's call may not take from the client: the
/// protocol's own and hop-by-hop ones.
fn reserved(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("grpc-")
        || name.starts_with("sec-websocket-")
        || matches!(
            name,
            "connection"
                | "upgrade"
                | "content-type"
                | "content-length"
                | "content-encoding"
                | "transfer-encoding"
                | "te"
                | "host"
                | "keep-alive"
        )
}

/// Reads the leading-metadata envelope's payload into `headers`.
fn apply_leading(payload: &[u8], headers: &mut HeaderMap) -> Result<(), Closing> {
    let leading: Leading = serde_json::from_slice(payload).map_err(|e| {
        Closing::protocol(format!(
            "the leading envelope is not {{\"headers\":{{…}},\"timeout_ms\":N}}: {e}"
        ))
    })?;
    if leading.headers.len() > MAX_HEADERS {
        return Err(Closing::protocol(format!(
            "{} leading headers; at most {MAX_HEADERS}",
            leading.headers.len()
        )));
    }
    for (name, value) in leading.headers {
        let name = HeaderName::try_from(name.as_str())
            .ok()
            .filter(|n| !reserved(n))
            .ok_or_else(|| Closing::protocol(format!("leading header {name:?} is not allowed")))?;
        let values = match value {
            serde_json::Value::String(v) => vec![v],
            serde_json::Value::Array(vs) => vs
                .into_iter()
                .map(|v| match v {
                    serde_json::Value::String(v) => Ok(v),
                    _ => Err(()),
                })
                .collect::<Result<_, _>>()
                .map_err(|()| {
                    Closing::protocol(format!("leading header {name}: values must be strings"))
                })?,
            _ => {
                return Err(Closing::protocol(format!(
                    "leading header {name}: a string or an array of strings expected"
                )));
            }
        };
        headers.remove(&name);
        for value in values {
            let value = HeaderValue::try_from(value).map_err(|_| {
                Closing::protocol(format!("leading header {name}: not a header value"))
            })?;
            headers.append(name.clone(), value);
        }
    }
    if let Some(millis) = leading.timeout_ms {
        let value = grpc_timeout(&HeaderValue::from(millis))
            .map_err(|s| Closing::protocol(format!("timeout_ms: {}", s.message())))?;
        headers.insert(HeaderName::from_static("grpc-timeout"), value);
    }
    Ok(())
}

type Ws<S> = WebSocketStream<S>;

/// A socket's call, before it runs.
struct Socket {
    outer: Outer,
    path: String,
    headers: HeaderMap,
    encoding: Encoding,
    receive_limit: usize,
    ping_interval: Duration,
    ping_timeout: Duration,
    /// The server's drain: the call is given until shortly before the
    /// grace period ends.
    drain: Drain,
}

/// A response body being sent, and the bytes of a partial envelope.
struct Sending {
    body: ResponseBody,
    buffer: BytesMut,
}

impl Socket {
    async fn run<S>(self, io: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        // One envelope per message: the message bounded by the receive
        // limit and its header, frames likewise.
        let bound = self.receive_limit.saturating_add(HEADER);
        let config = WebSocketConfig::default()
            .max_message_size(Some(bound))
            .max_frame_size(Some(bound));
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let outcome = self.serve(&mut ws).await;
        let frame = match outcome {
            Ok(()) => CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            },
            Err(closing) => CloseFrame {
                code: closing.code,
                reason: closing.reason.into(),
            },
        };
        if ws.close(Some(frame)).await.is_ok() {
            // The peer answers with its close frame; the socket ends then.
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
    }

    /// Runs the call over `ws`: `Ok` once the end envelope is sent.
    async fn serve<S>(self, ws: &mut Ws<S>) -> Result<(), Closing>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut heard = Instant::now();
        let mut pinged: Option<Instant> = None;
        let limit = self.receive_limit;
        let going_away = going_away(self.drain);
        tokio::pin!(going_away);

        // The leading envelope comes first.
        let mut headers = self.headers;
        headers.retain_not_reserved();
        let leading = loop {
            let next = match pinged {
                Some(at) => at + self.ping_timeout,
                None => heard + self.ping_interval,
            };
            tokio::select! {
                message = ws.next() => {
                    heard = Instant::now();
                    pinged = None;
                    match incoming(message)? {
                        Some(Read::Binary(data)) => break data,
                        Some(Read::Control) => continue,
                        None => return Err(Closing::new(CloseCode::Normal, "")),
                    }
                }
                () = tokio::time::sleep_until(next) => {
                    ping(ws, &mut pinged, heard, self.ping_interval).await?;
                }
                closing = &mut going_away => return Err(closing),
            }
        };
        let (flags, payload) = envelope(&leading, limit)?;
        if flags != FLAG_METADATA {
            return Err(Closing::protocol(format!(
                "the first envelope has flags {flags:#04x}; it must be the leading metadata (0x04)"
            )));
        }
        apply_leading(&payload, &mut headers)?;
        headers.insert(header::CONTENT_TYPE, self.encoding.grpc_content_type());
        headers.insert(header::TE, HeaderValue::from_static("trailers"));

        let (tx, rx) = mpsc::channel(QUEUE);
        let mut request = Request::new(WebRequestBody::socket(rx).into());
        *request.method_mut() = Method::POST;
        *request.version_mut() = Version::HTTP_2;
        *request.uri_mut() = self
            .path
            .parse()
            .map_err(|_| Closing::protocol("the path is not a method's"))?;
        *request.headers_mut() = headers;

        let mut responding: Pin<Box<_>> = Box::pin(call(self.outer, request));
        let mut sending: Option<Sending> = None;
        let mut tx = Some(tx);
        let mut pending: Option<Bytes> = None;
        loop {
            let next = match pinged {
                Some(at) => at + self.ping_timeout,
                None => heard + self.ping_interval,
            };
            let waiting = sending.is_none();
            tokio::select! {
                response = &mut responding, if waiting => {
                    let (mut parts, body) = response.into_parts();
                    if let Some(status) = super::take_status_headers(&mut parts.headers) {
                        // Trailers-only: the status, with every header trailing.
                        let mut trailers = parts.headers;
                        trailers.extend(status);
                        send_end(ws, &trailers).await?;
                        return Ok(());
                    }
                    sending = Some(Sending { body, buffer: BytesMut::new() });
                }
                frame = next_frame(&mut sending) => {
                    match frame {
                        Ok(Some(data)) => {
                            let Some(out) = sending.as_mut() else { continue };
                            out.buffer.extend_from_slice(&data);
                            while let Some(message) = split(&mut out.buffer) {
                                ws.send(Message::Binary(message)).await.map_err(sent)?;
                            }
                        }
                        Ok(None) => {
                            let trailers = HeaderMap::new();
                            send_end(ws, &trailers).await?;
                            return Ok(());
                        }
                        Err(Some(trailers)) => {
                            send_end(ws, &trailers).await?;
                            return Ok(());
                        }
                        Err(None) => {
                            return Err(Closing::new(CloseCode::Error, "the call's response failed"));
                        }
                    }
                }
                permit = reserve(tx.clone()), if pending.is_some() => {
                    match (permit, pending.take()) {
                        (Some(permit), Some(data)) => {
                            permit.send(Ok(data));
                        }
                        // The handler stopped reading: the rest is dropped.
                        _ => tx = None,
                    }
                }
                message = ws.next(), if pending.is_none() => {
                    heard = Instant::now();
                    pinged = None;
                    match incoming(message)? {
                        Some(Read::Control) => {}
                        Some(Read::Binary(data)) => {
                            let (flags, payload) = envelope(&data, limit)?;
                            match flags {
                                0 if tx.is_some() => {
                                    let mut frame = BytesMut::with_capacity(data.len());
                                    frame.extend_from_slice(&data[..HEADER]);
                                    frame.extend_from_slice(&payload);
                                    pending = Some(frame.freeze());
                                }
                                0 => {}
                                FLAG_END => {
                                    tx = None;
                                }
                                FLAG_COMPRESSED => {
                                    return Err(Closing::protocol(
                                        "compressed envelopes are not supported on WebSocket",
                                    ));
                                }
                                other => {
                                    return Err(Closing::protocol(format!(
                                        "an envelope with flags {other:#04x}; expected 0x00 (a message) or 0x02 (end)"
                                    )));
                                }
                            }
                        }
                        None => {
                            // The peer went away: the call is cancelled.
                            if let Some(tx) = tx.take() {
                                let _ = tx.try_send(Err("the WebSocket closed before its end envelope".into()));
                            }
                            return Err(Closing::new(CloseCode::Normal, ""));
                        }
                    }
                }
                () = tokio::time::sleep_until(next) => {
                    ping(ws, &mut pinged, heard, self.ping_interval).await?;
                }
                closing = &mut going_away => return Err(closing),
            }
        }
    }
}

/// Resolves when a socket still open must close because the server is
/// stopping: [`CLOSE_MARGIN`] before its grace period ends (or halfway
/// through a shorter one). Never, while the server serves.
async fn going_away(mut drain: Drain) -> Closing {
    let deadline = match drain.wait_for(Option::is_some).await {
        Ok(deadline) => *deadline,
        Err(_) => None,
    };
    let Some(deadline) = deadline else {
        // The server is gone: its connections go with it.
        return std::future::pending().await;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep_until(deadline - CLOSE_MARGIN.min(left / 2)).await;
    Closing::new(CloseCode::Away, "the server is shutting down")
}

/// Request headers without the reserved ones.
trait RetainNotReserved {
    fn retain_not_reserved(&mut self);
}

impl RetainNotReserved for HeaderMap {
    fn retain_not_reserved(&mut self) {
        let names: Vec<HeaderName> = self.keys().filter(|n| reserved(n)).cloned().collect();
        for name in names {
            self.remove(name);
        }
    }
}

/// What a read from the socket gave.
enum Read {
    Binary(Bytes),
    /// A ping, pong or frame the crate handles.
    Control,
}

/// Sorts a read: `None` when the peer closed.
fn incoming(
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Option<Read>, Closing> {
    use tokio_tungstenite::tungstenite::Error;
    match message {
        None | Some(Ok(Message::Close(_))) => Ok(None),
        Some(Ok(Message::Binary(data))) => Ok(Some(Read::Binary(data))),
        Some(Ok(Message::Text(_))) => Err(Closing::new(
            CloseCode::Unsupported,
            "text frames are not taken; send binary envelopes",
        )),
        Some(Ok(_)) => Ok(Some(Read::Control)),
        Some(Err(Error::Capacity(e))) => Err(Closing::new(CloseCode::Size, e.to_string())),
        Some(Err(Error::Protocol(e))) => Err(Closing::protocol(e.to_string())),
        Some(Err(Error::Utf8(_))) => Err(Closing::new(CloseCode::Invalid, "invalid UTF-8")),
        Some(Err(_)) => Ok(None),
    }
}

/// Pings a silent peer, or gives up on one that did not answer.
async fn ping<S>(
    ws: &mut Ws<S>,
    pinged: &mut Option<Instant>,
    heard: Instant,
    interval: Duration,
) -> Result<(), Closing>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let now = Instant::now();
    if pinged.is_some() {
        return Err(Closing::new(
            CloseCode::Away,
            "no answer to the server's ping",
        ));
    }
    if now.duration_since(heard) >= interval {
        ws.send(Message::Ping(Bytes::new())).await.map_err(sent)?;
        *pinged = Some(now);
    }
    Ok(())
}

fn sent(error: tokio_tungstenite::tungstenite::Error) -> Closing {
    Closing::new(CloseCode::Away, format!("sending failed: {error}"))
}

/// Sends the end-of-stream envelope made of `trailers`.
async fn send_end<S>(ws: &mut Ws<S>, trailers: &HeaderMap) -> Result<(), Closing>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let status = tonic::Status::from_header_map(trailers)
        .unwrap_or_else(|| tonic::Status::internal("the response ended without a status"));
    ws.send(Message::Binary(end_stream(&status, trailers)))
        .await
        .map_err(sent)
}

/// The response body's next frame: `Ok(Some)` data, `Ok(None)` its end,
/// `Err(Some)` its trailers, `Err(None)` an error. Pending while there is
/// no body yet.
async fn next_frame(sending: &mut Option<Sending>) -> Result<Option<Bytes>, Option<HeaderMap>> {
    let Some(out) = sending.as_mut() else {
        return std::future::pending().await;
    };
    match out.body.frame().await {
        None => Ok(None),
        Some(Ok(frame)) => match frame.into_data() {
            Ok(data) => Ok(Some(data)),
            Err(frame) => Err(Some(frame.into_trailers().unwrap_or_default())),
        },
        Some(Err(_)) => Err(None),
    }
}

/// A permit for the request channel; `None` once the handler is gone.
async fn reserve(
    tx: Option<mpsc::Sender<Result<Bytes, tower::BoxError>>>,
) -> Option<mpsc::OwnedPermit<Result<Bytes, tower::BoxError>>> {
    match tx {
        Some(tx) => tx.reserve_owned().await.ok(),
        None => None,
    }
}

/// Splits one whole gRPC frame (an envelope) off `buffer`.
fn split(buffer: &mut BytesMut) -> Option<Bytes> {
    if buffer.len() < HEADER {
        return None;
    }
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if buffer.len() < HEADER + len {
        return None;
    }
    Some(buffer.split_to(HEADER + len).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_checked_whole() {
        let ok = Bytes::from_static(&[0, 0, 0, 0, 2, 7, 8]);
        assert_eq!(envelope(&ok, 10).unwrap(), (0, Bytes::from_static(&[7, 8])));
        let short = Bytes::from_static(&[0, 0, 0]);
        assert_eq!(envelope(&short, 10).unwrap_err().code, CloseCode::Protocol);
        let wrong = Bytes::from_static(&[0, 0, 0, 0, 3, 7, 8]);
        assert_eq!(envelope(&wrong, 10).unwrap_err().code, CloseCode::Protocol);
        let big = Bytes::from_static(&[0, 0, 0, 1, 0, 7, 8]);
        assert_eq!(envelope(&big, 10).unwrap_err().code, CloseCode::Size);
    }

    #[test]
    fn leading_metadata_sets_headers_and_the_deadline() {
        let mut headers = HeaderMap::new();
        apply_leading(
            br#"{"headers":{"x-a":"1","x-b":["2","3"]},"timeout_ms":250}"#,
            &mut headers,
        )
        .unwrap();
        assert_eq!(headers["x-a"], "1");
        assert_eq!(headers.get_all("x-b").iter().count(), 2);
        assert_eq!(headers["grpc-timeout"], "250m");
        for bad in [
            &br#"{"headers":{"grpc-timeout":"1S"}}"#[..],
            br#"{"headers":{"x-a":1}}"#,
            br#"{"other":1}"#,
            b"not json",
        ] {
            assert_eq!(
                apply_leading(bad, &mut HeaderMap::new()).unwrap_err().code,
                CloseCode::Protocol
            );
        }
    }

    #[test]
    fn responses_split_into_whole_envelopes() {
        let mut buffer = BytesMut::from(&[0u8, 0, 0, 0, 1, 9, 0, 0, 0][..]);
        assert_eq!(
            split(&mut buffer).unwrap(),
            Bytes::from_static(&[0, 0, 0, 0, 1, 9])
        );
        assert!(split(&mut buffer).is_none());
        buffer.extend_from_slice(&[0, 0]);
        assert_eq!(split(&mut buffer).unwrap().len(), 5);
        assert!(buffer.is_empty());
    }
}

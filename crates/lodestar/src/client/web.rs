//! Calls over gRPC-Web or Connect: the client's side of the server's
//! `server/web`, translated in the endpoint layer so that every layer above
//! (deadline, codec, retry, balance, metrics) sees native gRPC.
//!
//! * **gRPC-Web** (binary): the request is native gRPC's frames with
//!   `application/grpc-web+proto` (or `+json`); the response's status
//!   comes in a last frame flagged `0x80` holding `name: value\r\n` lines
//!   (the server's `grpc_web::trailer_frame`), made into trailers here.
//! * **gRPC-Web text**: the same body in base64 both ways
//!   (`application/grpc-web-text+proto`), encoded and decoded as it
//!   streams ([`web_text`](crate::web_text)); what is decoded is read as
//!   binary gRPC-Web is.
//! * **Connect, unary** (methods that take and return one message): the
//!   request is the bare message (`application/proto` or
//!   `application/json`), the answer the bare reply with `200`, or a JSON
//!   error whose `code` becomes the status (the HTTP status only when the
//!   body has none). `trailer-` headers become trailers.
//! * **Connect, streams** (every other kind, and calls whose kind is not
//!   known): envelopes are gRPC's frames; the end-of-stream envelope
//!   (flag `0x02`, the server's `connect::end_stream`) becomes trailers.
//!
//! `grpc-timeout` becomes `Connect-Timeout-Ms`. A response that is not
//! `200` and carries no status (a server or proxy that does not speak the
//! protocol) ends the call with the code of its HTTP status (gRPC's
//! `http-grpc-status-mapping`) and its body's first bytes as the message.
//! Everything read whole (a Connect unary reply, an error body, a trailers
//! frame) is bounded: by the client's receive limit, or by
//! [`MAX_METADATA`].
//!
//! An answer that is only a status reaches the layers above as gRPC's
//! trailers-only answer (the status in the headers of an ended response),
//! so that retries, breakers and metrics read it where they read a native
//! one: an error (not `200`) is read whole first, and a gRPC-Web unary
//! call's first frame is awaited ([`Decoder::status_only`]).

use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::RecvStream;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body as _, Frame};

use crate::body::RequestBody;
use crate::web_text::{DecodeText, EncodeText};

/// The wire protocol a client's calls travel over. Default:
/// [`Protocol::Grpc`].
///
/// Whatever the protocol, calls are made the same way (generated clients
/// work unchanged): the translation happens inside the client, below every
/// other layer. Connections are HTTP/2 in every case (h2c, or h2 by ALPN
/// under TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// Native gRPC (`application/grpc`). The default.
    #[default]
    Grpc,
    /// gRPC-Web, binary (`application/grpc-web+proto`): the status travels
    /// in the body, so it passes proxies that drop HTTP trailers. Every
    /// call kind.
    GrpcWeb,
    /// gRPC-Web text (`application/grpc-web-text+proto`, with `accept:
    /// application/grpc-web-text`): gRPC-Web's body in base64 both ways,
    /// for proxies and servers that pass only text. The request is encoded
    /// as its messages go (padded where the next message is not ready yet,
    /// and at its end); the response is decoded as it comes, wherever the
    /// server padded it. About a third larger on the wire than
    /// [`Protocol::GrpcWeb`]. Every call kind.
    GrpcWebText,
    /// The Connect protocol: unary calls as a plain `POST` of the message
    /// (`application/proto` or `application/json`), others as Connect
    /// streams (`application/connect+proto`).
    Connect,
}

impl Protocol {
    /// The protocol's name as `lodestar.toml` and the CLI spell it:
    /// `grpc`, `grpc-web`, `grpc-web-text` or `connect`. Parsing
    /// ([`str::parse`]) takes these, and `grpcweb` and `grpcwebtext` (as
    /// `buf curl --protocol grpcweb` spells it) too.
    ///
    /// ```
    /// use lodestar::client::Protocol;
    /// assert_eq!("grpcwebtext".parse::<Protocol>(), Ok(Protocol::GrpcWebText));
    /// assert_eq!(Protocol::GrpcWebText.to_string(), "grpc-web-text");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::GrpcWebText => "grpc-web-text",
            Protocol::Connect => "connect",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of a call, as a request extension, for calls whose method the
/// client cannot look up in generated descriptors (a dynamic client such
/// as `lodestar call`). Only [`Protocol::Connect`] needs it: it sends
/// unary calls differently from streams. Without it, and without
/// descriptors, a Connect call goes as a stream, which lodestar servers
/// take for every kind but other Connect servers may refuse for unary
/// methods.
///
/// ```
/// let mut request = tonic::Request::new(());
/// request.extensions_mut().insert(lodestar::client::CallKind::Unary);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallKind {
    /// One message each way.
    Unary,
    /// One request message, a stream of replies.
    ServerStream,
    /// A stream of request messages, one reply.
    ClientStream,
    /// Streams both ways.
    Bidi,
}

impl CallKind {
    /// The kind of a method that streams its requests and/or its replies.
    pub fn of(client_streaming: bool, server_streaming: bool) -> Self {
        match (client_streaming, server_streaming) {
            (false, false) => CallKind::Unary,
            (false, true) => CallKind::ServerStream,
            (true, false) => CallKind::ClientStream,
            (true, true) => CallKind::Bidi,
        }
    }
}

/// A protocol name that is not one of `grpc`, `grpc-web`, `grpc-web-text`
/// or `connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownProtocol(pub String);

impl std::fmt::Display for UnknownProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown protocol {:?}: expected \"grpc\", \"grpc-web\", \"grpc-web-text\" or \
             \"connect\"",
            self.0
        )
    }
}

impl std::error::Error for UnknownProtocol {}

impl std::str::FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Self, UnknownProtocol> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "grpc-web" | "grpcweb" => Ok(Protocol::GrpcWeb),
            "grpc-web-text" | "grpcwebtext" => Ok(Protocol::GrpcWebText),
            "connect" => Ok(Protocol::Connect),
            other => Err(UnknownProtocol(other.to_owned())),
        }
    }
}

/// The largest trailers frame, end-of-stream envelope or error body read:
/// 64 KiB.
pub(crate) const MAX_METADATA: usize = 64 * 1024;
/// How much of a body that is not the protocol's goes into the status
/// message.
const MAX_QUOTED: usize = 512;

const CONNECT_TIMEOUT_MS: HeaderName = HeaderName::from_static("connect-timeout-ms");
const CONNECT_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("connect-protocol-version");
const CONNECT_CONTENT_ENCODING: HeaderName = HeaderName::from_static("connect-content-encoding");
const CONNECT_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("connect-accept-encoding");
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");

/// How a web call's response is read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    GrpcWeb,
    ConnectUnary,
    ConnectStream,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::GrpcWeb => "gRPC-Web",
            Mode::ConnectUnary | Mode::ConnectStream => "Connect",
        }
    }

    /// The flag of the frame that ends the response.
    fn end_flag(self) -> u8 {
        match self {
            Mode::GrpcWeb => 0x80,
            Mode::ConnectUnary | Mode::ConnectStream => 0x02,
        }
    }
}

/// Marks a request [`prepare`] rewrote already: one that comes back
/// unsent (its connection was closing) and is sent again is not rewritten
/// twice.
#[derive(Debug, Clone, Copy)]
struct Prepared;

/// Rewrites a native gRPC `request` for `protocol` (not
/// [`Protocol::Grpc`]); `unary` says whether the method takes and returns
/// one message. The decoder reads the response back. A request rewritten
/// already is left as it is.
pub(crate) fn prepare(
    request: &mut Request<RequestBody>,
    protocol: Protocol,
    unary: bool,
    receive_limit: usize,
) -> Result<Box<Decoder>, tonic::Status> {
    let mode = match protocol {
        Protocol::Grpc | Protocol::GrpcWeb | Protocol::GrpcWebText => Mode::GrpcWeb,
        Protocol::Connect if unary => Mode::ConnectUnary,
        Protocol::Connect => Mode::ConnectStream,
    };
    let decoder = |json| {
        let mut decoder = Decoder::new(mode, json, receive_limit);
        decoder.peek = unary && mode == Mode::GrpcWeb;
        Box::new(decoder)
    };
    // JSON before the rewrite (`application/grpc+json`) and after it
    // (`…+json`, Connect unary's `application/json`).
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().ends_with(b"json"));
    if request.extensions().get::<Prepared>().is_some() {
        return Ok(decoder(json));
    }
    let headers = request.headers_mut();
    headers.remove(header::TE);
    match mode {
        Mode::GrpcWeb => {
            let text = protocol == Protocol::GrpcWebText;
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(match (text, json) {
                    (false, false) => "application/grpc-web+proto",
                    (false, true) => "application/grpc-web+json",
                    (true, false) => "application/grpc-web-text+proto",
                    (true, true) => "application/grpc-web-text+json",
                }),
            );
            if text {
                // tonic-web answers in text only when asked to.
                headers.insert(
                    header::ACCEPT,
                    HeaderValue::from_static("application/grpc-web-text"),
                );
            }
            headers.insert("x-grpc-web", HeaderValue::from_static("1"));
        }
        Mode::ConnectUnary | Mode::ConnectStream => {
            if let Some(timeout) = headers.remove(crate::grpc_timeout::HEADER)
                && let Some(timeout) = crate::grpc_timeout::parse(&timeout)
            {
                // At least 1 ms (0 would mean "already expired"), at most
                // ten digits.
                let ms = timeout.as_millis().clamp(1, 9_999_999_999);
                headers.insert(
                    CONNECT_TIMEOUT_MS,
                    HeaderValue::from(u64::try_from(ms).unwrap_or(9_999_999_999)),
                );
            }
            headers.insert(CONNECT_PROTOCOL_VERSION, HeaderValue::from_static("1"));
            if mode == Mode::ConnectUnary {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(if json {
                        "application/json"
                    } else {
                        "application/proto"
                    }),
                );
                if let Some(accept) = headers.remove(GRPC_ACCEPT_ENCODING) {
                    headers.insert(header::ACCEPT_ENCODING, accept);
                }
            } else {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(if json {
                        "application/connect+json"
                    } else {
                        "application/connect+proto"
                    }),
                );
                if let Some(encoding) = headers.remove(GRPC_ENCODING) {
                    headers.insert(CONNECT_CONTENT_ENCODING, encoding);
                }
                if let Some(accept) = headers.remove(GRPC_ACCEPT_ENCODING) {
                    headers.insert(CONNECT_ACCEPT_ENCODING, accept);
                }
            }
        }
    }
    if mode == Mode::ConnectUnary {
        unwrap_unary(request)?;
    }
    if protocol == Protocol::GrpcWebText {
        let error = request.body().error().clone();
        let body = std::mem::replace(
            request.body_mut(),
            RequestBody::replay(Bytes::new(), error.clone()),
        );
        let text = tonic::body::Body::new(EncodeText::new(body));
        *request.body_mut() = RequestBody::unchecked(text, error);
    }
    request.extensions_mut().insert(Prepared);
    Ok(decoder(json))
}

/// Replaces a unary request's one framed message with the bare message
/// (Connect unary), its compression named by `Content-Encoding`.
fn unwrap_unary(request: &mut Request<RequestBody>) -> Result<(), tonic::Status> {
    let mut now = Context::from_waker(std::task::Waker::noop());
    let mut whole = BytesMut::new();
    let body = request.body_mut();
    loop {
        match std::pin::Pin::new(&mut *body).poll_frame(&mut now) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    whole.extend_from_slice(&data);
                }
            }
            Poll::Ready(Some(Err(status))) => return Err(status),
            Poll::Ready(None) => break,
            Poll::Pending => {
                return Err(tonic::Status::internal(
                    "a unary request's message was not ready when the call was sent over \
                     Connect (which sends a unary message whole)",
                ));
            }
        }
    }
    let mut framed = whole.freeze();
    if framed.len() < 5 {
        return Err(tonic::Status::internal(format!(
            "a unary request's body is {} bytes: expected one framed message (at least 5)",
            framed.len()
        )));
    }
    let flags = framed.get_u8();
    let len = framed.get_u32() as usize;
    if len != framed.len() {
        return Err(tonic::Status::internal(format!(
            "a unary request's frame says {len} bytes and holds {}: expected exactly one message",
            framed.len()
        )));
    }
    let error = body.error().clone();
    let headers = request.headers_mut();
    let encoding = headers.remove(GRPC_ENCODING);
    if flags & 1 == 1
        && let Some(encoding) = encoding
    {
        headers.insert(header::CONTENT_ENCODING, encoding);
    }
    *request.body_mut() = RequestBody::replay(framed, error);
    Ok(())
}

/// Whether a web answer is only a status ([`Decoder::status_only`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusOnly {
    /// No: messages may come.
    No,
    /// Yes, in its headers already.
    Now,
    /// Perhaps: [`Decoder::poll_first`] tells.
    AfterFirstFrame,
}

/// Reads a web call's response body back as native gRPC: messages as
/// gRPC frames, then the status as trailers.
#[derive(Debug)]
pub(crate) struct Decoder {
    mode: Mode,
    json: bool,
    /// The client's receive limit (a Connect unary reply is read whole).
    limit: usize,
    /// The HTTP status, when not `200`: the body is read (bounded) as the
    /// error.
    failed_http: Option<StatusCode>,
    /// The status in the response's headers (a trailers-only answer).
    header_status: Option<HeaderMap>,
    /// A Connect unary reply's `trailer-` headers.
    unary_trailers: Option<HeaderMap>,
    /// Whether a Connect unary reply is compressed.
    compressed: bool,
    /// A gRPC-Web text response's base64, decoded as it comes.
    text: Option<DecodeText>,
    /// Data received and not looked at yet.
    input: Bytes,
    /// A frame's head that came in pieces.
    head: BytesMut,
    /// Bytes of the current message still to pass on.
    remaining: usize,
    /// The length of the end frame, once its head is read.
    end_len: Option<usize>,
    /// A body read whole (Connect unary, an error, the end frame).
    collected: BytesMut,
    /// Trailers to yield after the data just yielded.
    pending: Option<HeaderMap>,
    /// Whether the first frame is read before the answer is handed on
    /// (gRPC-Web unary calls: a status alone there is a status-only
    /// answer).
    peek: bool,
    /// The first frame, read by [`poll_first`](Self::poll_first).
    held: Option<Frame<Bytes>>,
    pub(crate) done: bool,
}

impl Decoder {
    fn new(mode: Mode, json: bool, limit: usize) -> Self {
        Self {
            mode,
            json,
            limit,
            failed_http: None,
            header_status: None,
            unary_trailers: None,
            compressed: false,
            text: None,
            input: Bytes::new(),
            head: BytesMut::new(),
            remaining: 0,
            end_len: None,
            collected: BytesMut::new(),
            pending: None,
            peek: false,
            held: None,
            done: false,
        }
    }

    /// Rewrites the head of a response to look like native gRPC's.
    pub(crate) fn response<B>(&mut self, response: &mut Response<B>) {
        let status = response.status();
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(if self.json {
                "application/grpc+json"
            } else {
                "application/grpc"
            }),
        );
        if self.mode == Mode::GrpcWeb && content_type.starts_with("application/grpc-web-text") {
            self.text = Some(DecodeText::default());
        }
        if crate::status::code_in(headers).is_some() {
            let mut only = HeaderMap::new();
            for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                if let Some(value) = headers.get(name) {
                    only.insert(name, value.clone());
                }
            }
            self.header_status = Some(only);
            return;
        }
        let expected = match self.mode {
            Mode::GrpcWeb => content_type.starts_with("application/grpc-web"),
            Mode::ConnectUnary => !content_type.starts_with("application/connect"),
            Mode::ConnectStream => content_type.starts_with("application/connect"),
        };
        if status != StatusCode::OK || !expected {
            self.failed_http = Some(status);
            return;
        }
        match self.mode {
            Mode::ConnectUnary => {
                let mut trailers = HeaderMap::new();
                let names: Vec<HeaderName> = headers
                    .keys()
                    .filter(|name| name.as_str().starts_with("trailer-"))
                    .cloned()
                    .collect();
                for name in names {
                    let Ok(short) = HeaderName::from_bytes(&name.as_str().as_bytes()[8..]) else {
                        continue;
                    };
                    for value in headers.get_all(&name) {
                        trailers.append(short.clone(), value.clone());
                    }
                    headers.remove(&name);
                }
                self.unary_trailers = Some(trailers);
                if let Some(encoding) = headers.remove(header::CONTENT_ENCODING) {
                    self.compressed = true;
                    headers.insert(GRPC_ENCODING, encoding);
                }
            }
            Mode::ConnectStream => {
                if let Some(encoding) = headers.remove(CONNECT_CONTENT_ENCODING) {
                    headers.insert(GRPC_ENCODING, encoding);
                }
            }
            Mode::GrpcWeb => {}
        }
    }

    /// After [`response`](Self::response): whether the answer is only a
    /// status, as gRPC's trailers-only answer is, so that the layers above
    /// (retries, breakers, metrics) read it from the headers. A status in
    /// the headers of a response that has ended is one at once
    /// (`end_stream`). An error (not `200`, or not the protocol's content
    /// type), and a gRPC-Web unary answer (whose status may be its only
    /// frame), are known after [`poll_first`](Self::poll_first).
    pub(crate) fn status_only(&mut self, end_stream: bool) -> StatusOnly {
        if self.failed_http.is_some() {
            return StatusOnly::AfterFirstFrame;
        }
        if self.header_status.is_some() {
            if end_stream {
                self.header_status = None;
                self.done = true;
                return StatusOnly::Now;
            }
            return StatusOnly::No;
        }
        if self.peek && !end_stream {
            return StatusOnly::AfterFirstFrame;
        }
        StatusOnly::No
    }

    /// Reads the body's first frame: the status, as gRPC's status headers,
    /// when that is all the answer is (an error's body is read whole,
    /// bounded by [`MAX_METADATA`]); otherwise `None`, and the frame is
    /// kept for [`poll`](Self::poll).
    pub(crate) fn poll_first(
        &mut self,
        stream: &mut RecvStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, h2::Error>> {
        let first = match std::task::ready!(self.poll(stream, cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return Poll::Ready(Err(error)),
            None => return Poll::Ready(Ok(None)),
        };
        match first.into_trailers() {
            Ok(status) => {
                self.pending = None;
                self.done = true;
                Poll::Ready(Ok(Some(status)))
            }
            Err(frame) => {
                self.held = Some(frame);
                Poll::Ready(Ok(None))
            }
        }
    }

    /// The next frame of the translated body, read from `stream`.
    pub(crate) fn poll(
        &mut self,
        stream: &mut RecvStream,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if let Some(frame) = self.held.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(trailers) = self.pending.take() {
            self.done = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        if self.failed_http.is_some() || self.mode == Mode::ConnectUnary {
            return self.poll_whole(stream, cx);
        }
        loop {
            if let Some(frame) = self.step() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match stream.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = stream.flow_control().release_capacity(data.len());
                    if let Some(failed) = self.take_input(data) {
                        return Poll::Ready(Some(Ok(failed)));
                    }
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => {
                    let trailers = match self.header_status.take() {
                        Some(status) => status,
                        None => trailers_of(&tonic::Status::internal(format!(
                            "the {} response ended without its status (no end-of-stream \
                             frame){}",
                            self.mode.name(),
                            match self.text.as_ref().map_or(0, DecodeText::holds) {
                                0 => String::new(),
                                n => format!(
                                    ", inside a group of four base64 characters ({n} of them \
                                     left over)"
                                ),
                            }
                        ))),
                    };
                    self.done = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
        }
    }

    /// Makes `data`, read from the body, the input to follow: decoded
    /// first, if it is base64. Invalid base64 ends the call: its status,
    /// as trailers.
    fn take_input(&mut self, data: Bytes) -> Option<Frame<Bytes>> {
        self.input = match self.text.as_mut() {
            None => data,
            Some(text) => match text.decode(&data) {
                Ok(decoded) => decoded,
                Err(error) => {
                    self.done = true;
                    let status = tonic::Status::internal(format!(
                        "the gRPC-Web text response is not base64 (standard alphabet, \
                         padded): {error}"
                    ));
                    return Some(Frame::trailers(trailers_of(&status)));
                }
            },
        };
        None
    }

    /// Follows the frames in `input`: a frame to yield, if one is ready.
    fn step(&mut self) -> Option<Frame<Bytes>> {
        loop {
            if self.input.is_empty() {
                return None;
            }
            if self.remaining > 0 {
                let n = self.remaining.min(self.input.len());
                self.remaining -= n;
                return Some(Frame::data(self.input.split_to(n)));
            }
            if let Some(len) = self.end_len {
                let n = (len - self.collected.len()).min(self.input.len());
                self.collected.extend_from_slice(&self.input.split_to(n));
                if self.collected.len() == len {
                    let end = std::mem::take(&mut self.collected).freeze();
                    self.done = true;
                    self.input = Bytes::new();
                    return Some(Frame::trailers(self.end_trailers(&end)));
                }
                continue;
            }
            // A frame's head, whole in `input` (the usual case) or in pieces.
            let (flags, len, pieces) = if self.head.is_empty() && self.input.len() >= 5 {
                let len = u32::from_be_bytes([
                    self.input[1],
                    self.input[2],
                    self.input[3],
                    self.input[4],
                ]);
                (self.input[0], len as usize, None)
            } else {
                let n = (5 - self.head.len()).min(self.input.len());
                self.head.extend_from_slice(&self.input.split_to(n));
                if self.head.len() < 5 {
                    return None;
                }
                let head = self.head.split().freeze();
                let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
                (head[0], len as usize, Some(head))
            };
            if flags & self.mode.end_flag() == 0 {
                // A message: its head and body pass as they are (the codec
                // layer above checks the size limit).
                match pieces {
                    None => self.remaining = 5 + len,
                    Some(head) => {
                        self.remaining = len;
                        return Some(Frame::data(head));
                    }
                }
                continue;
            }
            if pieces.is_none() {
                self.input.advance(5);
            }
            if len > MAX_METADATA {
                self.done = true;
                self.input = Bytes::new();
                return Some(Frame::trailers(trailers_of(
                    &tonic::Status::resource_exhausted(format!(
                        "the {} end-of-stream frame is {len} bytes: the limit is {MAX_METADATA}",
                        self.mode.name()
                    )),
                )));
            }
            if len == 0 {
                self.done = true;
                return Some(Frame::trailers(self.end_trailers(&[])));
            }
            self.end_len = Some(len);
        }
    }

    /// The trailers an end frame's payload stands for.
    fn end_trailers(&self, payload: &[u8]) -> HeaderMap {
        match self.mode {
            Mode::GrpcWeb => {
                grpc_web_trailers(payload).unwrap_or_else(|status| trailers_of(&status))
            }
            Mode::ConnectUnary | Mode::ConnectStream => connect_end(payload),
        }
    }

    /// Reads the whole body (bounded), then yields what it stands for.
    fn poll_whole(
        &mut self,
        stream: &mut RecvStream,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let bound = match self.failed_http {
            Some(_) => MAX_METADATA,
            None => self.limit,
        };
        loop {
            match stream.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = stream.flow_control().release_capacity(data.len());
                    if self.collected.len() + data.len() > bound {
                        self.done = true;
                        let status = match self.failed_http {
                            // Enough of an error body to quote.
                            Some(_) => self.http_error(),
                            None => tonic::Status::resource_exhausted(format!(
                                "the Connect reply is over the limit of {bound} bytes"
                            )),
                        };
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers_of(&status)))));
                    }
                    self.collected.extend_from_slice(&data);
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => break,
            }
        }
        if self.failed_http.is_some() {
            self.done = true;
            let status = self.http_error();
            return Poll::Ready(Some(Ok(Frame::trailers(trailers_of(&status)))));
        }
        // A Connect unary reply: one framed message, then the trailers.
        let body = std::mem::take(&mut self.collected);
        let mut framed = BytesMut::with_capacity(5 + body.len());
        framed.put_u8(u8::from(self.compressed));
        framed.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
        framed.put_slice(&body);
        let mut trailers = self.unary_trailers.take().unwrap_or_default();
        trailers.insert(crate::status::GRPC_STATUS, HeaderValue::from_static("0"));
        self.pending = Some(trailers);
        Poll::Ready(Some(Ok(Frame::data(framed.freeze()))))
    }

    /// The status of a response that was not `200` (or not the protocol's
    /// content type): a Connect error's own code, or the code of the HTTP
    /// status with the body quoted.
    fn http_error(&self) -> tonic::Status {
        let http = self.failed_http.unwrap_or(StatusCode::OK);
        if self.mode != Mode::GrpcWeb
            && let Some(status) = connect_error(&self.collected)
        {
            return status;
        }
        let code = match http.as_u16() {
            400 => tonic::Code::Internal,
            401 => tonic::Code::Unauthenticated,
            403 => tonic::Code::PermissionDenied,
            404 => tonic::Code::Unimplemented,
            429 | 502 | 503 | 504 => tonic::Code::Unavailable,
            _ => tonic::Code::Unknown,
        };
        let quoted = &self.collected[..self.collected.len().min(MAX_QUOTED)];
        let text = String::from_utf8_lossy(quoted);
        let hint = if http == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            " (the server does not take this protocol: a lodestar service serves gRPC-Web \
             and Connect unless `ServiceBuilder::web` or `[service.web]` turns them off)"
        } else {
            ""
        };
        tonic::Status::new(
            code,
            format!(
                "the server answered a {} call with HTTP {http}{hint}: {}",
                self.mode.name(),
                text.trim()
            ),
        )
    }
}

/// The trailers that carry `status`: its code, its message
/// percent-encoded, and its details.
fn trailers_of(status: &tonic::Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    match status.add_header(&mut trailers) {
        Ok(()) => trailers,
        Err(_) => crate::body::status_trailers(status),
    }
}

/// The trailers in a gRPC-Web trailers frame's payload.
fn grpc_web_trailers(payload: &[u8]) -> Result<HeaderMap, tonic::Status> {
    let bad = |what: &str| {
        tonic::Status::internal(format!("the gRPC-Web trailers frame is malformed: {what}"))
    };
    let mut trailers = HeaderMap::new();
    for line in payload.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| bad("a line has no `:`"))?;
        let name = HeaderName::from_bytes(line[..colon].trim_ascii())
            .map_err(|_| bad("a name is not a header name"))?;
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
            .map_err(|_| bad("a value is not a header value"))?;
        trailers.append(name, value);
    }
    if crate::status::code_in(&trailers).is_none() {
        return Err(bad("it has no grpc-status"));
    }
    Ok(trailers)
}

/// The trailers a Connect end-of-stream envelope's JSON stands for.
fn connect_end(payload: &[u8]) -> HeaderMap {
    let json: serde_json::Value =
        match serde_json::from_slice(if payload.is_empty() { b"{}" } else { payload }) {
            Ok(json) => json,
            Err(e) => {
                return trailers_of(&tonic::Status::internal(format!(
                    "the Connect end-of-stream envelope is not JSON: {e}"
                )));
            }
        };
    let status = match json.get("error") {
        Some(error) => status_of(error).unwrap_or_else(|| {
            tonic::Status::internal("the Connect end-of-stream error has no known `code`")
        }),
        None => tonic::Status::ok(""),
    };
    let mut trailers = trailers_of(&status);
    if let Some(metadata) = json.get("metadata").and_then(|m| m.as_object()) {
        for (name, values) in metadata {
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                continue;
            };
            for value in values.as_array().into_iter().flatten() {
                if let Some(value) = value.as_str().and_then(|v| HeaderValue::from_str(v).ok()) {
                    trailers.append(name.clone(), value);
                }
            }
        }
    }
    trailers
}

/// A Connect unary error body's status, if it is one.
fn connect_error(body: &[u8]) -> Option<tonic::Status> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    status_of(&json)
}

/// The status a Connect error object (`code`, `message`, `details`) stands
/// for.
fn status_of(error: &serde_json::Value) -> Option<tonic::Status> {
    let name = error.get("code")?.as_str()?;
    let code = (0..=16)
        .map(tonic::Code::from_i32)
        .find(|code| crate::server::web::connect_code_name(*code) == name)?;
    let message = error
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_owned();
    let details: Vec<prost_types::Any> = error
        .get("details")
        .and_then(|d| d.as_array())
        .into_iter()
        .flatten()
        .filter_map(|detail| {
            let name = detail.get("type")?.as_str()?;
            let value = detail.get("value")?.as_str()?;
            let value = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(value.trim_end_matches('='))
                .ok()?;
            Some(prost_types::Any {
                type_url: format!("type.googleapis.com/{name}"),
                value,
            })
        })
        .collect();
    if details.is_empty() {
        return Some(tonic::Status::new(code, message));
    }
    let encoded = prost::Message::encode_to_vec(&crate::server::web::RpcStatus {
        code: code as i32,
        message: message.clone(),
        details,
    });
    Some(tonic::Status::with_details(
        code,
        message,
        Bytes::from(encoded),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![flags];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A native request of one framed message, as the client stack hands
    /// it to `prepare`.
    fn native_request(json: bool) -> Request<RequestBody> {
        let body = RequestBody::replay(Bytes::from(framed(0, b"message")), Default::default());
        let mut request = Request::new(body);
        let content_type = if json {
            "application/grpc+json"
        } else {
            "application/grpc"
        };
        let headers = request.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            crate::grpc_timeout::HEADER,
            HeaderValue::from_static("250m"),
        );
        request
    }

    /// A request's body, read whole (every body here is ready).
    fn read_body(request: &mut Request<RequestBody>) -> Vec<u8> {
        let mut now = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        while let Poll::Ready(Some(frame)) =
            std::pin::Pin::new(request.body_mut()).poll_frame(&mut now)
        {
            if let Ok(data) = frame.expect("a ready body").into_data() {
                out.extend_from_slice(&data);
            }
        }
        out
    }

    #[test]
    fn a_request_sent_again_unsent_is_not_rewritten_twice() {
        for protocol in [Protocol::GrpcWeb, Protocol::GrpcWebText, Protocol::Connect] {
            for unary in [true, false] {
                for json in [false, true] {
                    let case = format!("{protocol}, unary {unary}, json {json}");
                    let mut once = native_request(json);
                    let first = prepare(&mut once, protocol, unary, 1024).expect(&case);
                    let mut twice = native_request(json);
                    prepare(&mut twice, protocol, unary, 1024).expect(&case);
                    // Back unsent (its connection was closing), sent again.
                    let again = prepare(&mut twice, protocol, unary, 1024).expect(&case);
                    assert_eq!(once.headers(), twice.headers(), "{case}");
                    assert_eq!(read_body(&mut once), read_body(&mut twice), "{case}");
                    assert_eq!(
                        (first.mode, first.json, first.peek),
                        (again.mode, again.json, again.peek),
                        "{case}"
                    );
                }
            }
        }
    }

    /// Feeds `chunks` to a decoder: the data it yields, and its trailers.
    fn decode(mode: Mode, chunks: &[&[u8]]) -> (Vec<u8>, Option<HeaderMap>) {
        decode_with(Decoder::new(mode, false, 1024), chunks)
    }

    /// Feeds `chunks` to `decoder`: the data it yields, and its trailers.
    fn decode_with(mut decoder: Decoder, chunks: &[&[u8]]) -> (Vec<u8>, Option<HeaderMap>) {
        let (mut data, mut trailers) = (Vec::new(), None);
        for chunk in chunks {
            if decoder.done {
                break;
            }
            if let Some(failed) = decoder.take_input(Bytes::copy_from_slice(chunk)) {
                trailers = failed.into_trailers().ok();
                break;
            }
            while let Some(frame) = decoder.step() {
                match frame.into_data() {
                    Ok(bytes) => data.extend_from_slice(&bytes),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                }
            }
        }
        (data, trailers)
    }

    #[test]
    fn frames_split_anywhere_pass_whole_and_the_end_frame_becomes_trailers() {
        let messages = [framed(0, b"hello"), framed(1, b""), framed(0, &[7; 40])].concat();
        for (mode, end) in [
            (Mode::GrpcWeb, framed(0x80, b"grpc-status: 0\r\nx-k: v\r\n")),
            (
                Mode::ConnectStream,
                framed(0x02, br#"{"metadata":{"x-k":["v"]}}"#),
            ),
        ] {
            let body = [messages.clone(), end].concat();
            for cut in 0..=body.len() {
                let (data, trailers) = decode(mode, &[&body[..cut], &body[cut..]]);
                assert_eq!(data, messages, "{mode:?}, cut at {cut}");
                let trailers = trailers.unwrap_or_else(|| panic!("{mode:?}, cut at {cut}"));
                assert_eq!(trailers["grpc-status"], "0");
                assert_eq!(trailers["x-k"], "v");
            }
            let single: Vec<&[u8]> = body.chunks(1).collect();
            assert_eq!(decode(mode, &single).0, messages, "{mode:?}, byte by byte");
        }
    }

    /// A decoder of a gRPC-Web text response.
    fn text_decoder() -> Decoder {
        let mut decoder = Decoder::new(Mode::GrpcWeb, false, 1024);
        let mut response = Response::new(());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web-text+proto"),
        );
        decoder.response(&mut response);
        assert!(decoder.text.is_some());
        decoder
    }

    #[test]
    fn a_text_response_padded_frame_by_frame_decodes_split_anywhere() {
        use base64::engine::general_purpose::STANDARD;
        let frames = [
            framed(0, b"hello"),
            framed(1, b""),
            framed(0, &[7; 40]),
            framed(0x80, b"grpc-status: 0\r\nx-k: v\r\n"),
        ];
        // As a server that encodes each frame as it flushes it: padded
        // segments, one per frame.
        let body: String = frames.iter().map(|f| STANDARD.encode(f)).collect();
        let body = body.as_bytes();
        let messages = frames[..3].concat();
        for cut in 0..=body.len() {
            let (data, trailers) = decode_with(text_decoder(), &[&body[..cut], &body[cut..]]);
            assert_eq!(data, messages, "cut at {cut}");
            let trailers = trailers.unwrap_or_else(|| panic!("cut at {cut}"));
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["x-k"], "v");
        }
        let single: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(decode_with(text_decoder(), &single).0, messages);
    }

    #[test]
    fn invalid_base64_in_a_text_response_ends_the_call_internal() {
        use base64::engine::general_purpose::STANDARD;
        let good = STANDARD.encode(framed(0, b"hello"));
        let body = format!("{good}%%%%");
        let (data, trailers) = decode_with(text_decoder(), &[body.as_bytes()]);
        assert!(data.is_empty(), "{data:?}");
        let trailers = trailers.unwrap();
        assert_eq!(trailers["grpc-status"], "13");
        let status = tonic::Status::from_header_map(&trailers).unwrap();
        let message = status.message();
        assert!(
            message.contains("base64") && message.contains("0x25") && message.contains("offset 16"),
            "{message}"
        );
    }

    #[test]
    fn an_end_frame_over_the_bound_ends_the_call() {
        let mut head = vec![0x80];
        head.extend_from_slice(&((MAX_METADATA + 1) as u32).to_be_bytes());
        let (data, trailers) = decode(Mode::GrpcWeb, &[&head]);
        assert!(data.is_empty());
        assert_eq!(trailers.unwrap()["grpc-status"], "8");
    }

    #[test]
    fn protocols_parse_by_name() {
        assert_eq!("grpc".parse::<Protocol>(), Ok(Protocol::Grpc));
        assert_eq!("grpc-web".parse::<Protocol>(), Ok(Protocol::GrpcWeb));
        assert_eq!("grpcweb".parse::<Protocol>(), Ok(Protocol::GrpcWeb));
        for name in ["grpc-web-text", "grpcwebtext"] {
            assert_eq!(name.parse::<Protocol>(), Ok(Protocol::GrpcWebText));
        }
        assert_eq!("connect".parse::<Protocol>(), Ok(Protocol::Connect));
        for protocol in [
            Protocol::Grpc,
            Protocol::GrpcWeb,
            Protocol::GrpcWebText,
            Protocol::Connect,
        ] {
            assert_eq!(protocol.to_string().parse::<Protocol>(), Ok(protocol));
        }
        let e = "http".parse::<Protocol>().unwrap_err().to_string();
        assert!(
            e.contains("\"http\"") && e.contains("\"grpc-web-text\""),
            "{e}"
        );
    }

    #[test]
    fn grpc_web_trailer_lines_become_trailers() {
        let trailers =
            grpc_web_trailers(b"grpc-status: 5\r\ngrpc-message: no such feature\r\nx-k: v\r\n")
                .unwrap();
        assert_eq!(trailers["grpc-status"], "5");
        assert_eq!(trailers["x-k"], "v");
        assert!(grpc_web_trailers(b"x-k: v\r\n").is_err());
        assert!(grpc_web_trailers(b"nonsense\r\n").is_err());
    }

    #[test]
    fn connect_errors_keep_their_code_and_details() {
        let status = connect_error(
            br#"{"code":"not_found","message":"no feature","details":[{"type":"google.rpc.RetryInfo","value":"CgIIAQ"}]}"#,
        )
        .unwrap();
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "no feature");
        assert!(!status.details().is_empty());
        assert_eq!(
            connect_error(br#"{"code":"canceled"}"#).unwrap().code(),
            tonic::Code::Cancelled
        );
        assert!(connect_error(b"<html>").is_none());
        let end =
            connect_end(br#"{"error":{"code":"deadline_exceeded"},"metadata":{"k":["a","b"]}}"#);
        assert_eq!(end["grpc-status"], "4");
        assert_eq!(end.get_all("k").iter().count(), 2);
        assert_eq!(connect_end(b"{}")["grpc-status"], "0");
    }
}

//! The Connect protocol (<https://connectrpc.com/docs/protocol>).
//!
//! * **Unary** (`POST`, `application/json` or `application/proto`): the
//!   body is one bare message, read whole up to the receive limit, and
//!   framed as gRPC's; the answer is the bare reply with `200`, or a
//!   Connect error (JSON, `{"code":"not_found","message":…}`) with the
//!   HTTP status of its code ([`http_status`]). Trailing metadata comes
//!   back as `trailer-` headers.
//! * **GET** for methods whose `.proto` says
//!   `idempotency_level = NO_SIDE_EFFECTS`: the message is in the query
//!   (`message`, `encoding`, `base64`, `compression`); other methods get
//!   `405`.
//! * **Streams** (`application/connect+json|+proto`): envelopes are
//!   gRPC's frames, so they pass through both ways; the trailers become
//!   the end-of-stream envelope (flag `0x02`, JSON with `error` and
//!   `metadata`). Always `200`.
//!
//! `Connect-Timeout-Ms` becomes `grpc-timeout`; compression is gzip
//! (`Content-Encoding` for unary, `Connect-Content-Encoding` for streams).

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::trailers::{Ending, TrailersInBody};
use super::{WebRequestBody, WebResponseBody, WebState, call};
use crate::server::stack::{Outer, ResponseBody};

/// How a Connect call's messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Codec {
    Json,
    Proto,
}

impl Codec {
    fn grpc_content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Codec::Json => "application/grpc+json",
            Codec::Proto => "application/grpc",
        })
    }

    fn unary_content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        })
    }

    fn stream_content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Codec::Json => "application/connect+json",
            Codec::Proto => "application/connect+proto",
        })
    }
}

/// The kind of Connect request a (lowercase, parameter-free) media type
/// names on a `POST`: unary or stream, and the codec.
pub(super) fn kind_of(media: &str) -> Option<(bool, Codec)> {
    Some(match media {
        "application/json" => (false, Codec::Json),
        "application/proto" => (false, Codec::Proto),
        "application/connect+json" => (true, Codec::Json),
        "application/connect+proto" => (true, Codec::Proto),
        _ => return None,
    })
}

const CONNECT_TIMEOUT_MS: HeaderName = HeaderName::from_static("connect-timeout-ms");
const CONNECT_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("connect-protocol-version");
const CONNECT_CONTENT_ENCODING: HeaderName = HeaderName::from_static("connect-content-encoding");
const CONNECT_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("connect-accept-encoding");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");

/// The headers every Connect request shares, made gRPC's: the protocol
/// version checked, `Connect-Timeout-Ms` as `grpc-timeout`, the content
/// type gRPC's.
fn prepare(headers: &mut HeaderMap, codec: Codec) -> Result<(), tonic::Status> {
    if let Some(version) = headers.get(&CONNECT_PROTOCOL_VERSION)
        && version.as_bytes() != b"1"
    {
        return Err(tonic::Status::invalid_argument(format!(
            "Connect-Protocol-Version is {version:?}; this server speaks version 1"
        )));
    }
    if let Some(timeout) = headers.remove(&CONNECT_TIMEOUT_MS) {
        headers.insert(GRPC_TIMEOUT, grpc_timeout(&timeout)?);
    }
    headers.insert(header::CONTENT_TYPE, codec.grpc_content_type());
    headers.remove(header::CONTENT_LENGTH);
    Ok(())
}

/// `Connect-Timeout-Ms` (at most 10 digits) as a `grpc-timeout` value
/// (at most 8 digits: milliseconds, or seconds above that).
pub(super) fn grpc_timeout(value: &HeaderValue) -> Result<HeaderValue, tonic::Status> {
    let bytes = value.as_bytes();
    let millis = std::str::from_utf8(bytes)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| {
            tonic::Status::invalid_argument(format!(
                "Connect-Timeout-Ms is {value:?}; expected a whole number of milliseconds, \
                 at most 10 digits"
            ))
        })?;
    let text = if millis <= 99_999_999 {
        format!("{millis}m")
    } else {
        format!("{}S", millis.div_ceil(1000))
    };
    HeaderValue::try_from(text).map_err(|e| tonic::Status::internal(e.to_string()))
}

/// Whether `headers` (`Accept-Encoding`-like) accept gzip.
fn accepts_gzip(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().eq_ignore_ascii_case("gzip")))
}

/// Whether a content encoding is gzip (`true`), none (`false`), or one
/// this server does not take.
fn compressed(value: Option<&[u8]>) -> Result<bool, tonic::Status> {
    match value {
        None | Some(b"identity") => Ok(false),
        Some(b"gzip") => Ok(true),
        Some(other) => Err(tonic::Status::unimplemented(format!(
            "this server cannot decompress `{}` (it accepts gzip)",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// A unary message framed as gRPC's.
pub(super) fn envelope(flags: u8, message: &[u8]) -> Result<Bytes, tonic::Status> {
    let len = u32::try_from(message.len()).map_err(|_| {
        tonic::Status::resource_exhausted("a message of 4 GiB or more cannot be framed")
    })?;
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(flags);
    frame.put_u32(len);
    frame.put_slice(message);
    Ok(frame.freeze())
}

/// Serves a unary Connect `POST`.
pub(super) async fn unary(
    outer: Outer,
    state: &WebState,
    request: Request<Incoming>,
    codec: Codec,
) -> Response<WebResponseBody> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    if let Some(method) = state.descriptors.method(&path)
        && (method.is_client_streaming() || method.is_server_streaming())
    {
        return error_response(
            &tonic::Status::invalid_argument(format!(
                "{path} streams: call it with application/connect+json or \
                 application/connect+proto"
            )),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            HeaderMap::new(),
        );
    }
    let gzip = match compressed(
        parts
            .headers
            .get(header::CONTENT_ENCODING)
            .map(HeaderValue::as_bytes),
    ) {
        Ok(gzip) => gzip,
        Err(status) => return error_response(&status, None, HeaderMap::new()),
    };
    if let Err(status) = prepare(&mut parts.headers, codec) {
        return error_response(&status, None, HeaderMap::new());
    }
    let limit = state.limits.max_decoding_message_size;
    let message = match read_bounded(body, limit).await {
        Ok(message) => message,
        Err(status) => return error_response(&status, None, HeaderMap::new()),
    };
    unary_call(outer, state, parts, &message, gzip, codec).await
}

/// Calls the stack with one message and answers as Connect unary does.
async fn unary_call(
    outer: Outer,
    state: &WebState,
    mut parts: http::request::Parts,
    message: &[u8],
    gzip: bool,
    codec: Codec,
) -> Response<WebResponseBody> {
    let frame = match envelope(u8::from(gzip), message) {
        Ok(frame) => frame,
        Err(status) => return error_response(&status, None, HeaderMap::new()),
    };
    parts.headers.remove(header::CONTENT_ENCODING);
    if gzip {
        parts
            .headers
            .insert(GRPC_ENCODING, HeaderValue::from_static("gzip"));
    }
    if accepts_gzip(parts.headers.get(header::ACCEPT_ENCODING)) {
        parts
            .headers
            .insert(GRPC_ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    }
    parts.method = Method::POST;
    let known = state.descriptors.method(parts.uri.path()).is_some();
    let body = WebRequestBody::whole(frame);
    let response = call(outer, Request::from_parts(parts, body.into())).await;
    let limit = state.limits.max_encoding_message_size;
    unary_response(response, codec, known, limit).await
}

/// Reads a unary body whole, refusing it past `limit` bytes.
async fn read_bounded(body: Incoming, limit: usize) -> Result<Bytes, tonic::Status> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(tonic::Status::resource_exhausted(format!(
                "the request message is larger than this server's limit of {limit} bytes \
                 (MessageLimits::max_decoding_message_size)"
            )))
        }
        Err(error) => Err(tonic::Status::cancelled(format!(
            "the request body could not be read: {error}"
        ))),
    }
}

/// The Connect unary answer for a native response: the reply with `200`,
/// or a Connect error.
pub(super) async fn unary_response(
    response: Response<ResponseBody>,
    codec: Codec,
    known: bool,
    limit: usize,
) -> Response<WebResponseBody> {
    let (parts, mut body) = response.into_parts();
    let mut headers = metadata(parts.headers);
    if let Some(status) = tonic::Status::from_header_map(&headers) {
        super::take_status_headers(&mut headers);
        return unary_error(&status, known, headers);
    }
    let mut data = BytesMut::new();
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(chunk) => {
                    if data.len() + chunk.len() > limit.saturating_add(5) {
                        let status = tonic::Status::internal(
                            "a unary method answered more than one message's worth",
                        );
                        return unary_error(&status, known, headers);
                    }
                    data.put(chunk);
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = t;
                    }
                }
            },
            Err(error) => {
                let status = tonic::Status::internal(format!("the response failed: {error}"));
                return unary_error(&status, known, headers);
            }
        }
    }
    let status = tonic::Status::from_header_map(&trailers)
        .unwrap_or_else(|| tonic::Status::internal("the response ended without a status"));
    super::take_status_headers(&mut trailers);
    for (name, value) in &trailers {
        if let Ok(name) = HeaderName::try_from(format!("trailer-{name}")) {
            headers.append(name, value.clone());
        }
    }
    if status.code() != tonic::Code::Ok {
        return unary_error(&status, known, headers);
    }
    let mut data = data.freeze();
    if data.len() < 5 {
        let status = tonic::Status::internal("a unary method answered no message");
        return unary_error(&status, known, headers);
    }
    let flags = data.get_u8();
    let len = data.get_u32() as usize;
    if len != data.len() {
        let status = tonic::Status::internal("a unary method answered more than one message");
        return unary_error(&status, known, headers);
    }
    headers.insert(header::CONTENT_TYPE, codec.unary_content_type());
    if flags & 1 != 0 {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    let mut response = Response::new(WebResponseBody::full(data));
    *response.headers_mut() = headers;
    response
}

/// A unary error: `UNIMPLEMENTED` for a method the server does not have
/// is `404` (an unknown path), otherwise the code's status.
fn unary_error(
    status: &tonic::Status,
    known: bool,
    headers: HeaderMap,
) -> Response<WebResponseBody> {
    let http =
        (!known && status.code() == tonic::Code::Unimplemented).then_some(StatusCode::NOT_FOUND);
    error_response(status, http, headers)
}

/// The response headers that are the call's metadata: gRPC's own
/// (content type, encodings) left out.
pub(super) fn metadata(mut headers: HeaderMap) -> HeaderMap {
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        GRPC_ENCODING,
        GRPC_ACCEPT_ENCODING,
    ] {
        headers.remove(name);
    }
    headers
}

/// The Connect protocol's name of a gRPC code: snake case, `canceled`
/// with one l (what Connect error bodies and `lodestar call` print).
///
/// ```
/// assert_eq!(lodestar::server::connect_code_name(lodestar::Code::NotFound), "not_found");
/// ```
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status of a gRPC code in a Connect unary error (the Connect
/// specification's table, which is grpc-gateway's).
pub(crate) fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::OK,
        // 499: nginx's "client closed request".
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// `google.rpc.Status`, to read a status's details.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub(crate) code: i32,
    #[prost(string, tag = "2")]
    pub(crate) message: String,
    #[prost(message, repeated, tag = "3")]
    pub(crate) details: Vec<prost_types::Any>,
}

/// The JSON of a Connect error: `code`, `message` and `details` (each
/// `type` and unpadded base64 `value`).
pub(super) fn error_json(status: &tonic::Status) -> serde_json::Value {
    let mut error = serde_json::Map::new();
    error.insert("code".into(), code_name(status.code()).into());
    if !status.message().is_empty() {
        error.insert("message".into(), status.message().into());
    }
    if !status.details().is_empty()
        && let Ok(decoded) = <RpcStatus as prost::Message>::decode(status.details())
    {
        let details: Vec<serde_json::Value> = decoded
            .details
            .iter()
            .map(|any| {
                let name = any.type_url.rsplit('/').next().unwrap_or(&any.type_url);
                serde_json::json!({
                    "type": name,
                    "value": base64::engine::general_purpose::STANDARD_NO_PAD.encode(&any.value),
                })
            })
            .collect();
        error.insert("details".into(), details.into());
    }
    serde_json::Value::Object(error)
}

/// A Connect unary error: the code's HTTP status (or `http`), a JSON body,
/// and the call's metadata as headers.
pub(super) fn error_response(
    status: &tonic::Status,
    http: Option<StatusCode>,
    mut headers: HeaderMap,
) -> Response<WebResponseBody> {
    let body = serde_json::to_vec(&error_json(status)).unwrap_or_default();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut response = Response::new(WebResponseBody::full(Bytes::from(body)));
    *response.status_mut() = http.unwrap_or_else(|| http_status(status.code()));
    *response.headers_mut() = headers;
    response
}

/// Serves a Connect `GET` (a unary call whose message is in the query),
/// for methods marked `NO_SIDE_EFFECTS`.
pub(super) async fn get(
    outer: Outer,
    state: &WebState,
    request: Request<Incoming>,
) -> Response<WebResponseBody> {
    let (mut parts, _body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    if let Some(method) = state.descriptors.method(&path) {
        let level = method
            .method_descriptor_proto()
            .options
            .as_ref()
            .and_then(|o| o.idempotency_level);
        // 1: NO_SIDE_EFFECTS.
        if level != Some(1) {
            let mut response = error_response(
                &tonic::Status::unimplemented(format!(
                    "{path} has side effects: call it with POST (GET is for methods marked \
                     idempotency_level = NO_SIDE_EFFECTS)"
                )),
                Some(StatusCode::METHOD_NOT_ALLOWED),
                HeaderMap::new(),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
    }
    let query = match GetQuery::parse(parts.uri.query().unwrap_or("")) {
        Ok(query) => query,
        Err(status) => return error_response(&status, None, HeaderMap::new()),
    };
    let gzip = match compressed(query.compression.as_deref().map(str::as_bytes)) {
        Ok(gzip) => gzip,
        Err(status) => return error_response(&status, None, HeaderMap::new()),
    };
    if let Err(status) = prepare(&mut parts.headers, query.codec) {
        return error_response(&status, None, HeaderMap::new());
    }
    if query.message.len() > state.limits.max_decoding_message_size {
        let status = tonic::Status::resource_exhausted(format!(
            "the request message is larger than this server's limit of {} bytes",
            state.limits.max_decoding_message_size
        ));
        return error_response(&status, None, HeaderMap::new());
    }
    unary_call(outer, state, parts, &query.message, gzip, query.codec).await
}

/// A Connect `GET`'s query: `message` (percent-encoded, or URL-safe base64
/// with `base64=1`), `encoding` (`json` or `proto`), `compression`, and
/// `connect=v1`.
#[derive(Debug)]
pub(super) struct GetQuery {
    pub(super) message: Vec<u8>,
    pub(super) codec: Codec,
    pub(super) compression: Option<String>,
}

impl GetQuery {
    pub(super) fn parse(query: &str) -> Result<Self, tonic::Status> {
        let bad = |what: String| tonic::Status::invalid_argument(what);
        let mut message = None;
        let mut encoding = None;
        let mut base64 = false;
        let mut compression = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = super::percent::decode(value, true, false).ok_or_else(|| {
                bad(format!(
                    "the query parameter `{key}` is not percent-encoded"
                ))
            })?;
            match key {
                "message" => message = Some(value),
                "encoding" => encoding = Some(value),
                "base64" => base64 = value == b"1",
                "compression" => {
                    compression = Some(String::from_utf8_lossy(&value).into_owned());
                }
                "connect" if value != b"v1" => {
                    return Err(bad(format!(
                        "connect={}; this server speaks v1",
                        String::from_utf8_lossy(&value)
                    )));
                }
                _ => {}
            }
        }
        let codec = match encoding.as_deref() {
            Some(b"json") => Codec::Json,
            Some(b"proto") => Codec::Proto,
            Some(other) => {
                return Err(bad(format!(
                    "encoding={}; expected json or proto",
                    String::from_utf8_lossy(other)
                )));
            }
            None => return Err(bad("a Connect GET needs encoding=json or proto".into())),
        };
        let mut message = message.unwrap_or_default();
        if base64 {
            let text: Vec<u8> = message.iter().copied().filter(|b| *b != b'=').collect();
            message = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text)
                .map_err(|e| bad(format!("message is not URL-safe base64: {e}")))?;
        }
        Ok(Self {
            message,
            codec,
            compression,
        })
    }
}

/// Serves a Connect stream (any call kind, `application/connect+*`).
pub(super) async fn stream(
    outer: Outer,
    request: Request<Incoming>,
    codec: Codec,
) -> Response<WebResponseBody> {
    let (mut parts, body) = request.into_parts();
    let early = |status: tonic::Status| {
        let mut response = Response::new(WebResponseBody::full(end_stream(
            &status,
            &HeaderMap::new(),
        )));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, codec.stream_content_type());
        response
    };
    if let Err(status) = prepare(&mut parts.headers, codec) {
        return early(status);
    }
    if let Some(encoding) = parts.headers.remove(&CONNECT_CONTENT_ENCODING) {
        if let Err(status) = compressed(Some(encoding.as_bytes())) {
            return early(status);
        }
        parts.headers.insert(GRPC_ENCODING, encoding);
    }
    if let Some(accept) = parts.headers.remove(&CONNECT_ACCEPT_ENCODING) {
        parts.headers.insert(GRPC_ACCEPT_ENCODING, accept);
    }
    let response = call(outer, Request::from_parts(parts, body.into())).await;
    let (parts, body) = response.into_parts();
    let mut headers = parts.headers;
    let mut status_headers = super::take_status_headers(&mut headers);
    let encoding = headers.remove(&GRPC_ENCODING);
    let mut headers = metadata(headers);
    // A trailers-only answer: all its metadata is trailing, so it goes in
    // the end-of-stream envelope.
    if let Some(trailers) = status_headers.as_mut() {
        let mut last = None;
        for (name, value) in std::mem::take(&mut headers) {
            // `None`: another value of the name before.
            if let Some(name) = name {
                last = Some(name);
            }
            if let Some(name) = &last {
                trailers.append(name.clone(), value);
            }
        }
    }
    headers.insert(header::CONTENT_TYPE, codec.stream_content_type());
    if let Some(encoding) = encoding {
        headers.insert(CONNECT_CONTENT_ENCODING, encoding);
    }
    let body = TrailersInBody::new(body, Ending::Connect, status_headers);
    let mut response = Response::new(WebResponseBody::Streamed { body });
    *response.headers_mut() = headers;
    response
}

/// The end-of-stream envelope for a call that ended with `status` and
/// `trailers` (flag `0x02`; `{}` on success).
pub(super) fn end_stream(status: &tonic::Status, trailers: &HeaderMap) -> Bytes {
    let mut end = serde_json::Map::new();
    if status.code() != tonic::Code::Ok {
        end.insert("error".into(), error_json(status));
    }
    let mut metadata = serde_json::Map::new();
    for (name, value) in trailers {
        if matches!(
            name.as_str(),
            "grpc-status" | "grpc-message" | "grpc-status-details-bin"
        ) {
            continue;
        }
        let Ok(value) = value.to_str() else { continue };
        let values = metadata
            .entry(name.as_str())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(values) = values {
            values.push(value.into());
        }
    }
    if !metadata.is_empty() {
        end.insert("metadata".into(), metadata.into());
    }
    let json = serde_json::to_vec(&end).unwrap_or_default();
    let mut frame = BytesMut::with_capacity(5 + json.len());
    frame.put_u8(0x02);
    frame.put_u32(u32::try_from(json.len()).unwrap_or(u32::MAX));
    frame.put_slice(&json);
    frame.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_the_spec_table() {
        use tonic::Code;
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::Cancelled).as_u16(), 499);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::FailedPrecondition),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(Code::Unimplemented),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(code_name(Code::Cancelled), "canceled");
        assert_eq!(code_name(Code::InvalidArgument), "invalid_argument");
    }

    #[test]
    fn timeouts_fit_grpc_timeout() {
        let t = |v: &'static str| grpc_timeout(&HeaderValue::from_static(v));
        assert_eq!(t("250").unwrap(), "250m");
        assert_eq!(t("99999999").unwrap(), "99999999m");
        assert_eq!(t("9999999999").unwrap(), "10000000S");
        for bad in ["", "-1", "12345678901", "1.5", "soon"] {
            assert_eq!(
                t(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn get_queries_parse() {
        let q = GetQuery::parse("connect=v1&encoding=json&message=%7B%22a%22%3A1%7D").unwrap();
        assert_eq!(q.codec, Codec::Json);
        assert_eq!(q.message, br#"{"a":1}"#);
        let q = GetQuery::parse("encoding=proto&base64=1&message=CCo").unwrap();
        assert_eq!((q.codec, q.message), (Codec::Proto, vec![0x08, 0x2a]));
        for bad in [
            "message=x",
            "encoding=xml&message=x",
            "encoding=json&message=%zz",
            "encoding=json&connect=v2",
            "encoding=proto&base64=1&message=***",
        ] {
            assert_eq!(
                GetQuery::parse(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn the_end_of_a_stream_carries_the_error_and_metadata() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-count", HeaderValue::from_static("3"));
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        let frame = end_stream(&tonic::Status::not_found("no such feature"), &trailers);
        assert_eq!(frame[0], 0x02);
        let json: serde_json::Value = serde_json::from_slice(&frame[5..]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "error": {"code": "not_found", "message": "no such feature"},
                "metadata": {"x-count": ["3"]},
            })
        );
        let ok = end_stream(&tonic::Status::ok(""), &HeaderMap::new());
        assert_eq!(&ok[5..], b"{}");
    }
}

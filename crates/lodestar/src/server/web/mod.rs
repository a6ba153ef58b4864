//! The web protocols on the service's own port: gRPC-Web and Connect,
//! over HTTP/1.1 and HTTP/2, with CORS.
//!
//! Every request a connection takes comes to [`ConnectionStack`]
//! (`stack/mod.rs`), which asks [`is_native`] first: native gRPC (HTTP/2
//! and `application/grpc`, `+proto`, `+json`) goes straight into the
//! server stack, as it always did, at the cost of one look at the
//! content type. Everything else comes here, to [`dispatch`], which
//! reads top to bottom:
//!
//! 1. a CORS preflight is answered from the allow list (`cors.rs`);
//! 2. the request is classified ([`Route::of`]): a WebSocket opening
//!    (`websocket.rs`), a REST route from `google.api.http` (`rest/`,
//!    for requests no other protocol claims), gRPC-Web (`grpc_web.rs`),
//!    Connect unary, `GET` or stream (`connect.rs`), native gRPC over
//!    HTTP/1.1 (refused: `505`), or something else (`415`);
//! 3. the protocol's module translates the request into a native gRPC one
//!    at the edge (headers, framing, base64, `Connect-Timeout-Ms`) and
//!    calls **the same server stack** ([`call`]): status, trace,
//!    admission, the user's layers, deadline, faults, codec (JSON ↔
//!    protobuf), limits, routes. Metrics, rate limits, deadlines and auth
//!    layers see every protocol alike;
//! 4. it translates the native answer back (trailers into the body,
//!    Connect errors as JSON with their HTTP status);
//! 5. an allowed origin's answer gets its CORS headers.
//!
//! Every protocol has a module of its own: WebSocket (`websocket.rs`, an
//! HTTP/1.1 `Upgrade` or an HTTP/2 extended `CONNECT`), REST routes from
//! `google.api.http` (`rest/`, matched before Connect by method and
//! path template), and static files, the browser client
//! `/_lodestar/client.js` and a service's assets (`assets.rs`, matched by
//! exact path first).

mod assets;
mod connect;
mod cors;
mod grpc_web;
mod percent;
pub(crate) mod rest;
mod settings;
mod trailers;
mod websocket;

// Shared with the client's side (`client/web.rs`).
pub(crate) use connect::RpcStatus;
pub use connect::code_name as connect_code_name;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::{BoxError, Service as _};

pub use assets::{Asset, AssetError};
pub use settings::{Cors, WebProtocols};
pub(crate) use websocket::{SocketHost, Upgraded};

use super::budget::EndsCall;
use super::stack::{Inbound, Outer, ResponseBody};
use crate::MessageLimits;
use crate::codec::Descriptors;

/// What the web protocols need besides the stack: their switches, the
/// services' descriptors (streaming, idempotency) and the message limits.
#[derive(Debug)]
pub(crate) struct WebState {
    pub(crate) settings: WebProtocols,
    pub(crate) descriptors: Descriptors,
    pub(crate) limits: MessageLimits,
    /// The REST routes (`rest/`); `None` with REST off or no route.
    pub(crate) rest: Option<rest::Routes>,
}

/// Whether `request` is native gRPC: HTTP/2 with `application/grpc`,
/// `application/grpc+proto` or `+json` (any parameters). Every call asks,
/// so this only compares bytes.
#[inline]
pub(crate) fn is_native<B>(request: &Request<B>) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    if request.version() != Version::HTTP_2 {
        return false;
    }
    let Some(value) = crate::headers::find_header(request.headers(), &header::CONTENT_TYPE) else {
        return false;
    };
    let value = value.as_bytes();
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && !matches!(value.get(GRPC.len()), Some(b'-'))
}

/// What a non-native request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Native gRPC's content type over HTTP/1.1: refused.
    GrpcOverHttp1,
    GrpcWeb(grpc_web::Mode),
    ConnectUnary(connect::Codec),
    ConnectStream(connect::Codec),
    ConnectGet,
    /// A WebSocket opening (HTTP/1.1 `Upgrade` or HTTP/2 extended
    /// `CONNECT`).
    WebSocket,
    /// A `GET` or `HEAD` of a static file: `/_lodestar/client.js` or an
    /// asset (`assets.rs`).
    Static,
    /// A REST route, or a request only REST could take (`rest/`).
    Rest(rest::Hit),
    /// A content type (or method) no protocol that is on takes.
    Unsupported,
}

impl Route {
    fn of<B>(request: &Request<B>, settings: &WebProtocols, rest: Option<&rest::Routes>) -> Self {
        if websocket::is_websocket(request) {
            return if settings.websocket {
                Route::WebSocket
            } else {
                Route::Unsupported
            };
        }
        if assets::is_static(request, settings) {
            return Route::Static;
        }
        if let Some(hit) = rest.and_then(|routes| routes.classify(request)) {
            return Route::Rest(hit);
        }
        if request.method() == Method::GET {
            return if settings.connect {
                Route::ConnectGet
            } else {
                Route::Unsupported
            };
        }
        if request.method() != Method::POST {
            return Route::Unsupported;
        }
        let media = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        if settings.grpc_web
            && let Some(mode) = grpc_web::Mode::of(&media)
        {
            return Route::GrpcWeb(mode);
        }
        if settings.connect
            && let Some((stream, codec)) = connect::kind_of(&media)
        {
            return if stream {
                Route::ConnectStream(codec)
            } else {
                Route::ConnectUnary(codec)
            };
        }
        if matches!(
            media.as_str(),
            "application/grpc" | "application/grpc+proto" | "application/grpc+json"
        ) {
            return Route::GrpcOverHttp1;
        }
        Route::Unsupported
    }
}

/// The future of a web call, boxed: native calls never make one.
pub(crate) type WebFuture = Pin<Box<dyn Future<Output = Response<WebResponseBody>> + Send>>;

/// Serves a request that is not native gRPC (see the module docs).
///
/// `sockets` is where a WebSocket the request opens runs (see
/// [`SocketHost`]).
pub(crate) fn serve(
    outer: Outer,
    state: Arc<WebState>,
    sockets: &SocketHost,
    request: Request<Incoming>,
) -> WebFuture {
    Box::pin(dispatch(outer, state, sockets.clone(), request))
}

async fn dispatch(
    outer: Outer,
    state: Arc<WebState>,
    sockets: SocketHost,
    request: Request<Incoming>,
) -> Response<WebResponseBody> {
    let cors = &state.settings.cors;
    if cors::is_preflight(&request) {
        return cors::preflight(cors, &request, state.rest.is_some());
    }
    let origin = cors::allowed_origin(cors, request.headers());
    let mut response = match Route::of(&request, &state.settings, state.rest.as_ref()) {
        Route::Rest(hit) => match &state.rest {
            Some(routes) => rest::serve(outer, &state, routes, request, hit).await,
            None => unsupported(&state.settings),
        },
        Route::GrpcWeb(mode) => grpc_web::serve(outer, request, mode).await,
        Route::ConnectUnary(codec) => connect::unary(outer, &state, request, codec).await,
        Route::ConnectStream(codec) => connect::stream(outer, request, codec).await,
        Route::ConnectGet => connect::get(outer, &state, request).await,
        Route::WebSocket => websocket::open(outer, &state, sockets, request),
        Route::Static => assets::serve(&request, &state.settings),
        Route::GrpcOverHttp1 => plain(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "native gRPC needs HTTP/2; over HTTP/1.1 call with gRPC-Web \
             (application/grpc-web) or Connect (application/json)",
        ),
        Route::Unsupported => unsupported(&state.settings),
    };
    if let Some(origin) = origin {
        cors::decorate(&mut response, origin);
    }
    response
}

/// `415`, naming what the server takes.
fn unsupported(settings: &WebProtocols) -> Response<WebResponseBody> {
    let mut takes = vec!["application/grpc (HTTP/2)"];
    if settings.grpc_web {
        takes.push("application/grpc-web[+proto|+json]");
        takes.push("application/grpc-web-text[+proto|+json]");
    }
    if settings.connect {
        takes.push("application/json");
        takes.push("application/proto");
        takes.push("application/connect+json");
        takes.push("application/connect+proto");
    }
    plain(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        &format!(
            "this service takes POST with one of: {}{}",
            takes.join(", "),
            if settings.connect {
                "; or a Connect GET"
            } else {
                ""
            }
        ),
    )
}

/// Calls the server stack with a translated request.
async fn call(mut outer: Outer, request: Request<Inbound>) -> Response<ResponseBody> {
    match outer.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// A plain-text answer with `status`.
pub(super) fn plain(status: StatusCode, text: &str) -> Response<WebResponseBody> {
    let mut response = Response::new(WebResponseBody::full(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Takes a trailers-only answer's status headers (`grpc-status`,
/// `grpc-message`, `grpc-status-details-bin`) out of `headers`.
fn take_status_headers(headers: &mut HeaderMap) -> Option<HeaderMap> {
    let status = headers.remove("grpc-status")?;
    let mut taken = HeaderMap::new();
    taken.insert("grpc-status", status);
    for name in ["grpc-message", "grpc-status-details-bin"] {
        if let Some(value) = headers.remove(name) {
            taken.insert(name, value);
        }
    }
    Some(taken)
}

pin_project_lite::pin_project! {
    /// A request body the web protocols made: gRPC-Web text decoded from
    /// base64, or a Connect unary message framed as gRPC's.
    #[project = WebRequestBodyProj]
    pub(crate) enum WebRequestBody {
        Text { #[pin] body: grpc_web::Base64Body },
        Whole { data: Option<Bytes> },
        /// A WebSocket's messages, framed as gRPC's, as they arrive.
        Socket { rx: tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>> },
    }
}

impl WebRequestBody {
    fn text(body: Incoming) -> Self {
        Self::Text {
            body: grpc_web::Base64Body::new(body),
        }
    }

    fn whole(data: Bytes) -> Self {
        Self::Whole { data: Some(data) }
    }

    fn socket(rx: tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>) -> Self {
        Self::Socket { rx }
    }
}

impl Body for WebRequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            WebRequestBodyProj::Text { body } => body.poll_frame(cx),
            WebRequestBodyProj::Whole { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            WebRequestBodyProj::Socket { rx } => rx
                .poll_recv(cx)
                .map(|item| item.map(|result| result.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Text { body } => body.is_end_stream(),
            Self::Whole { data } => data.is_none(),
            Self::Socket { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Text { .. } | Self::Socket { .. } => SizeHint::default(),
            Self::Whole { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A web protocol's response body.
    #[project = WebResponseBodyProj]
    pub(crate) enum WebResponseBody {
        /// A whole answer: a Connect unary reply or error, a refusal.
        Full { data: Option<Bytes> },
        /// gRPC-Web, and Connect streams: the trailers in the body.
        Streamed { #[pin] body: trailers::TrailersInBody },
        /// A REST server stream: a line of JSON per reply (boxed: its
        /// first line is read before the answer is made).
        Lines { body: Pin<Box<rest::stream::Lines>> },
    }
}

impl WebResponseBody {
    fn full(data: Bytes) -> Self {
        Self::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    fn empty() -> Self {
        Self::Full { data: None }
    }
}

impl Body for WebResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            WebResponseBodyProj::Full { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            WebResponseBodyProj::Streamed { body } => body.poll_frame(cx),
            WebResponseBodyProj::Lines { body } => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full { data } => data.is_none(),
            Self::Streamed { body } => body.is_end_stream(),
            Self::Lines { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Self::Streamed { body } => body.size_hint(),
            Self::Lines { body } => body.size_hint(),
        }
    }
}

impl EndsCall for WebResponseBody {
    fn ended(self: Pin<&mut Self>, status: &tonic::Status) -> Frame<Bytes> {
        match self.project() {
            WebResponseBodyProj::Full { data } => {
                // Its head (the status, the length) went out already.
                *data = None;
                Frame::trailers(crate::body::status_trailers(status))
            }
            WebResponseBodyProj::Streamed { body } => body.ended(status),
            WebResponseBodyProj::Lines { body } => body.as_mut().ended(status),
        }
    }
}

pin_project_lite::pin_project! {
    /// The body of any answer a connection sends: native gRPC's, or a web
    /// protocol's (boxed: every native answer is moved a few times on its
    /// way out, and stays the size of its own body).
    #[project = AnswerProj]
    pub(crate) enum Answer {
        Grpc { #[pin] body: ResponseBody },
        Web { body: Pin<Box<WebResponseBody>> },
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            AnswerProj::Grpc { body } => body.poll_frame(cx),
            AnswerProj::Web { body } => body.as_mut().poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Grpc { body } => body.is_end_stream(),
            Self::Web { body } => body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Grpc { body } => body.size_hint(),
            Self::Web { body } => body.size_hint(),
        }
    }
}

impl EndsCall for Answer {
    fn ended(self: Pin<&mut Self>, status: &tonic::Status) -> Frame<Bytes> {
        match self.project() {
            AnswerProj::Grpc { body } => body.ended(status),
            AnswerProj::Web { body } => body.as_mut().ended(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, method: Method, content_type: &'static str) -> Request<()> {
        Request::builder()
            .version(version)
            .method(method)
            .uri("/pkg.Svc/M")
            .header(header::CONTENT_TYPE, content_type)
            .body(())
            .unwrap()
    }

    #[test]
    fn native_grpc_is_http2_with_grpc_content_types_only() {
        use Version as V;
        for native in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json; x=y",
        ] {
            assert!(
                is_native(&request(V::HTTP_2, Method::POST, native)),
                "{native}"
            );
            assert!(
                !is_native(&request(V::HTTP_11, Method::POST, native)),
                "{native}"
            );
        }
        for web in [
            "application/grpc-web",
            "application/grpc-web-text",
            "application/json",
        ] {
            assert!(!is_native(&request(V::HTTP_2, Method::POST, web)), "{web}");
        }
    }

    #[test]
    fn routes_follow_the_switches() {
        let all = WebProtocols::default();
        let none = WebProtocols::none();
        let post = |ct| request(Version::HTTP_11, Method::POST, ct);
        let web = Route::GrpcWeb(grpc_web::Mode {
            text: false,
            json: false,
        });
        assert_eq!(Route::of(&post("application/grpc-web"), &all, None), web);
        assert_eq!(
            Route::of(&post("application/grpc-web"), &none, None),
            Route::Unsupported
        );
        assert_eq!(
            Route::of(&post("application/json; charset=utf-8"), &all, None),
            Route::ConnectUnary(connect::Codec::Json)
        );
        assert_eq!(
            Route::of(&post("application/connect+proto"), &all, None),
            Route::ConnectStream(connect::Codec::Proto)
        );
        assert_eq!(
            Route::of(&post("text/plain"), &all, None),
            Route::Unsupported
        );
        assert_eq!(
            Route::of(&post("application/grpc"), &all, None),
            Route::GrpcOverHttp1
        );
        let get = request(Version::HTTP_11, Method::GET, "");
        assert_eq!(Route::of(&get, &all, None), Route::ConnectGet);
        let client_js = Request::get("/_lodestar/client.js").body(()).unwrap();
        assert_eq!(Route::of(&client_js, &all, None), Route::Static);
        assert_eq!(Route::of(&client_js, &none, None), Route::Unsupported);
        assert_eq!(Route::of(&get, &none, None), Route::Unsupported);
        let upgrade = Request::builder()
            .method(Method::GET)
            .uri("/pkg.Svc/M")
            .header(header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        assert_eq!(Route::of(&upgrade, &all, None), Route::WebSocket);
        let no_ws = WebProtocols {
            websocket: false,
            ..WebProtocols::default()
        };
        assert_eq!(Route::of(&upgrade, &no_ws, None), Route::Unsupported);
        let put = request(Version::HTTP_11, Method::PUT, "application/json");
        assert_eq!(Route::of(&put, &all, None), Route::Unsupported);
    }
}

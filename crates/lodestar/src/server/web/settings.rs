//! The switches of the web protocols and their CORS policy, as the
//! builder and `lodestar.toml` set them.

use std::time::Duration;

use super::assets::Asset;

/// Which protocols besides native gRPC a service serves on its port, and
/// who may call them from a browser. Set with
/// [`ServiceBuilder::web`](crate::ServiceBuilder::web); `[web]` in
/// `lodestar.toml`.
///
/// Native gRPC (HTTP/2) is always served. With either web protocol on, the
/// port also takes HTTP/1.1 connections (by the first bytes in plaintext,
/// by ALPN under TLS), since that is what browsers and `curl` speak.
///
/// ```
/// use lodestar::server::{Cors, WebProtocols};
///
/// // Connect only, callable from one origin's pages.
/// let web = WebProtocols {
///     grpc_web: false,
///     cors: Cors::allow(["https://app.example.com"]),
///     ..WebProtocols::default()
/// };
/// assert!(web.connect);
/// assert!(web.rest); // routes from `google.api.http`, where methods have them
/// assert!(web.serves_http1());
/// assert!(!WebProtocols::none().serves_http1());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebProtocols {
    /// gRPC-Web (`application/grpc-web`, `+proto`, `+json`, and the
    /// base64 `application/grpc-web-text`), over HTTP/1.1 and HTTP/2.
    /// Default: on (it costs nothing until a client uses it).
    pub grpc_web: bool,
    /// The Connect protocol: unary `POST` with `application/json` or
    /// `application/proto`, `GET` for methods marked `NO_SIDE_EFFECTS`,
    /// and streams as `application/connect+json|+proto`. Default: on.
    pub connect: bool,
    /// WebSocket (`lodestar.v1+json`, `lodestar.v1+proto`; an HTTP/1.1
    /// `Upgrade` or an HTTP/2 extended `CONNECT`) for every call kind,
    /// one call per socket (`docs/web.md`, "WebSocket"). A socket's
    /// `Origin`, when it sends one, must be in [`Cors::allow_origins`], or
    /// be the service's own (its host and port those of the request's
    /// `Host`: a page the service served). Default: on.
    pub websocket: bool,
    /// REST routes from the services' `google.api.http` annotations
    /// (`docs/web.md`, "REST"): `GET /v1/features/1/2` and the like,
    /// JSON in and out, for unary methods and server-streaming ones (a
    /// line of JSON per reply). Default: on (it costs nothing when no
    /// method is annotated).
    pub rest: bool,
    /// How long a WebSocket may be silent before the server pings it.
    /// Default: 30 s.
    pub websocket_ping_interval: Duration,
    /// How long the server waits for any frame (a pong or other) after a
    /// ping before it closes the socket. Default: 10 s.
    pub websocket_ping_timeout: Duration,
    /// Which browser origins may call the web protocols. Default: none
    /// ([`Cors::default`]): no cross-origin access.
    pub cors: Cors,
    /// Serve the browser client, an ES module that calls every call kind
    /// (Connect over `fetch`, and WebSocket), at `GET
    /// /_lodestar/client.js` (`docs/web.md`, "Browser client"), while a
    /// web protocol is on. Default: on.
    pub client_js: bool,
    /// Static files served at exact paths (`GET`, `HEAD`), added with
    /// [`WebProtocols::asset`]. Default: none.
    pub assets: Vec<Asset>,
}

impl Default for WebProtocols {
    fn default() -> Self {
        Self {
            grpc_web: true,
            connect: true,
            websocket: true,
            rest: true,
            websocket_ping_interval: Duration::from_secs(30),
            websocket_ping_timeout: Duration::from_secs(10),
            cors: Cors::default(),
            client_js: true,
            assets: Vec::new(),
        }
    }
}

impl WebProtocols {
    /// Native gRPC only, over HTTP/2 only: the port refuses HTTP/1.1.
    pub fn none() -> Self {
        Self {
            grpc_web: false,
            connect: false,
            websocket: false,
            rest: false,
            ..Self::default()
        }
    }

    /// Whether the port takes HTTP/1.1 connections: when any web
    /// protocol (REST included) is on.
    pub fn serves_http1(&self) -> bool {
        self.grpc_web || self.connect || self.websocket || self.rest
    }
}

/// Cross-origin access to the web protocols (CORS): which origins'
/// pages may call, and how long browsers may cache a preflight's answer.
///
/// An origin is compared exactly (scheme, host and port, as the browser
/// sends it in `Origin`, ASCII case aside); `"*"` allows every origin,
/// but only when it is listed. A preflight (`OPTIONS` with
/// `Access-Control-Request-Method`) from an allowed origin is answered
/// `204` with the allowed methods (`POST, GET`) and headers (Connect's,
/// gRPC-Web's, `Authorization`, and [`Cors::allow_headers`]); from any
/// other origin, `403` without CORS headers. A call from a disallowed
/// origin is served without CORS headers, so the browser keeps the answer
/// from the page.
///
/// ```
/// use std::time::Duration;
/// use lodestar::server::Cors;
///
/// let cors = Cors {
///     max_age: Duration::from_secs(600),
///     ..Cors::allow(["http://localhost:5173"])
/// };
/// assert_eq!(cors.allow_origins, ["http://localhost:5173"]);
/// assert!(Cors::default().allow_origins.is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// The origins allowed, exactly as browsers send them
    /// (`https://app.example.com`, `http://localhost:5173`), or `"*"` for
    /// any. Default: none.
    pub allow_origins: Vec<String>,
    /// Request headers allowed besides the protocols' own and
    /// `Authorization` (metadata a page sends, such as `x-tenant`).
    /// Default: none.
    pub allow_headers: Vec<String>,
    /// How long a browser may cache a preflight's answer
    /// (`Access-Control-Max-Age`, whole seconds). Default: 2 hours,
    /// Chrome's cap.
    pub max_age: Duration,
}

impl Default for Cors {
    fn default() -> Self {
        Self {
            allow_origins: Vec::new(),
            allow_headers: Vec::new(),
            max_age: Duration::from_secs(7200),
        }
    }
}

impl Cors {
    /// Allows `origins` (exact, or `"*"` for any), with the other
    /// settings at their defaults.
    pub fn allow<I, S>(origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            allow_origins: origins.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

//! Static files on the service's port: the browser client
//! `/_lodestar/client.js`, and the few assets a service registers with
//! [`WebProtocols::asset`] (an example page, its script).
//!
//! Each is compiled into the binary, served for its exact path to `GET`
//! and `HEAD` only, with an `ETag` (a hash of its bytes) and
//! `Cache-Control: no-cache`: a browser keeps its copy and asks again
//! with `If-None-Match`, which is answered `304` while the bytes are the
//! same. Nothing is read from disk and no path is resolved, so there is
//! no directory to escape from.

use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::WebResponseBody;
use super::settings::WebProtocols;

/// Where the browser client is served.
pub(crate) const CLIENT_JS_PATH: &str = "/_lodestar/client.js";

/// The browser client: an ES module, no build step (`client.js` here).
const CLIENT_JS: &str = include_str!("client.js");

/// Paths under this prefix are lodestar's own.
const RESERVED_PREFIX: &str = "/_lodestar/";

/// The browser client's `ETag`, computed at compile time.
const CLIENT_JS_ETAG: &str = {
    const HASH: [u8; 18] = etag_bytes(CLIENT_JS.as_bytes());
    match std::str::from_utf8(&HASH) {
        Ok(text) => text,
        Err(_) => "\"lodestar-client\"",
    }
};

/// FNV-1a, 64 bits: enough to tell two versions of a file apart.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"<16 hex digits>"`: a strong `ETag` for `bytes`.
const fn etag_bytes(bytes: &[u8]) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = fnv1a(bytes);
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

/// A static file a service serves on its port, at one exact path: made
/// with [`WebProtocols::asset`]. Its bytes are `'static` (compiled in with
/// `include_bytes!`), its `ETag` computed once.
#[derive(Clone, PartialEq, Eq)]
pub struct Asset {
    path: String,
    content_type: HeaderValue,
    etag: HeaderValue,
    body: &'static [u8],
}

impl fmt::Debug for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Asset")
            .field("path", &self.path)
            .field("content_type", &self.content_type)
            .field("len", &self.body.len())
            .finish()
    }
}

impl Asset {
    /// The path it is served at.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Its `Content-Type`.
    pub fn content_type(&self) -> &str {
        self.content_type.to_str().unwrap_or_default()
    }

    /// Its bytes.
    pub fn body(&self) -> &'static [u8] {
        self.body
    }

    fn new(path: &str, content_type: &str, body: &'static [u8]) -> Result<Self, AssetError> {
        let bad_path = |expected| AssetError {
            path: path.to_owned(),
            problem: format!("the path {path:?} is not {expected}"),
        };
        if !path.starts_with('/') {
            return Err(bad_path("absolute (it must start with `/`)"));
        }
        if path.starts_with(RESERVED_PREFIX) {
            return Err(bad_path("free: paths under /_lodestar/ are lodestar's own"));
        }
        let exact = path
            .parse::<http::uri::PathAndQuery>()
            .is_ok_and(|p| p.query().is_none() && p.as_str() == path)
            && !path.contains('#');
        if !exact {
            return Err(bad_path("a plain URL path (no query, fragment or spaces)"));
        }
        let content_type = HeaderValue::try_from(content_type).map_err(|_| AssetError {
            path: path.to_owned(),
            problem: format!("the content type {content_type:?} is not a header value"),
        })?;
        let etag = HeaderValue::from_bytes(&etag_bytes(body)).map_err(|_| AssetError {
            path: path.to_owned(),
            problem: "its ETag could not be made".to_owned(),
        })?;
        Ok(Self {
            path: path.to_owned(),
            content_type,
            etag,
            body,
        })
    }
}

/// Why [`WebProtocols::asset`] refused an asset: its path and what was
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetError {
    path: String,
    problem: String,
}

impl AssetError {
    /// The path the asset was to be served at.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for AssetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "static asset {:?}: {}", self.path, self.problem)
    }
}

impl std::error::Error for AssetError {}

impl WebProtocols {
    /// Serves `body` at exactly `path` (`GET` and `HEAD`), with
    /// `content_type`, an `ETag` and `Cache-Control: no-cache`; replaces an
    /// asset registered earlier at the same path. For a page and its few
    /// files compiled into the binary (`include_bytes!`), such as
    /// `examples/route-guide`'s page at `/`. Assets are served while a web
    /// protocol is on ([`WebProtocols::serves_http1`]).
    ///
    /// The path must start with `/`, be a plain URL path (no query or
    /// fragment) and not be under `/_lodestar/`; the content type must be
    /// a header value. Otherwise [`AssetError`] says what was wrong.
    ///
    /// ```
    /// use lodestar::server::WebProtocols;
    ///
    /// let web = WebProtocols::default()
    ///     .asset("/", "text/html; charset=utf-8", b"<!doctype html><p>hello</p>")?
    ///     .asset("/app.js", "text/javascript; charset=utf-8", b"console.log(1);")?;
    /// assert_eq!(web.assets.len(), 2);
    /// assert!(WebProtocols::default().asset("no-slash", "text/plain", b"").is_err());
    /// # Ok::<(), lodestar::server::AssetError>(())
    /// ```
    pub fn asset(
        mut self,
        path: &str,
        content_type: &str,
        body: &'static [u8],
    ) -> Result<Self, AssetError> {
        let asset = Asset::new(path, content_type, body)?;
        self.assets.retain(|a| a.path != asset.path);
        self.assets.push(asset);
        Ok(self)
    }
}

/// Whether `request` is a `GET` or `HEAD` of a static file `settings`
/// serve.
pub(super) fn is_static<B>(request: &Request<B>, settings: &WebProtocols) -> bool {
    if !matches!(*request.method(), Method::GET | Method::HEAD) || !settings.serves_http1() {
        return false;
    }
    let path = request.uri().path();
    (settings.client_js && path == CLIENT_JS_PATH) || settings.assets.iter().any(|a| a.path == path)
}

/// Answers a `GET` or `HEAD` of a static file (see [`is_static`]): `200`
/// with the bytes, or `304` when `If-None-Match` names its `ETag`.
pub(super) fn serve<B>(request: &Request<B>, settings: &WebProtocols) -> Response<WebResponseBody> {
    let path = request.uri().path();
    let (body, content_type, etag, anyone) = if path == CLIENT_JS_PATH && settings.client_js {
        (
            CLIENT_JS.as_bytes(),
            HeaderValue::from_static("text/javascript; charset=utf-8"),
            HeaderValue::from_static(CLIENT_JS_ETAG),
            true,
        )
    } else if let Some(asset) = settings.assets.iter().find(|a| a.path == path) {
        (
            asset.body,
            asset.content_type.clone(),
            asset.etag.clone(),
            false,
        )
    } else {
        return super::plain(StatusCode::NOT_FOUND, "no such file");
    };
    let fresh = request
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == etag.as_bytes()
        });
    let head = request.method() == Method::HEAD;
    let mut response = if fresh {
        let mut response = Response::new(WebResponseBody::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(if head {
            WebResponseBody::empty()
        } else {
            WebResponseBody::full(Bytes::from_static(body))
        });
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, content_type);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if anyone {
        // The client is public code: any page may import it (what it may
        // then call is still up to CORS and the WebSocket origin check).
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    fn get(method: Method, path: &str, if_none_match: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(tag) = if_none_match {
            builder = builder.header(header::IF_NONE_MATCH, tag);
        }
        builder.body(()).unwrap()
    }

    fn body_len(response: &Response<WebResponseBody>) -> u64 {
        response.body().size_hint().exact().unwrap()
    }

    #[test]
    fn the_client_is_served_with_an_etag_and_revalidated() {
        let settings = WebProtocols::default();
        let request = get(Method::GET, CLIENT_JS_PATH, None);
        assert!(is_static(&request, &settings));
        let response = serve(&request, &settings);
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        let etag = headers[header::ETAG].to_str().unwrap().to_owned();
        assert_eq!(etag.len(), 18, "{etag}");
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
        assert_eq!(body_len(&response), CLIENT_JS.len() as u64);

        for tag in [
            etag.as_str(),
            &format!("W/{etag}"),
            &format!("\"x\", {etag}"),
        ] {
            let again = serve(&get(Method::GET, CLIENT_JS_PATH, Some(tag)), &settings);
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{tag}");
            assert_eq!(body_len(&again), 0);
            assert_eq!(again.headers()[header::ETAG], etag.as_str());
        }
        let changed = serve(&get(Method::GET, CLIENT_JS_PATH, Some("\"0\"")), &settings);
        assert_eq!(changed.status(), StatusCode::OK);

        let head = serve(&get(Method::HEAD, CLIENT_JS_PATH, None), &settings);
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(body_len(&head), 0);
        assert_eq!(
            head.headers()[header::CONTENT_LENGTH],
            CLIENT_JS.len().to_string().as_str()
        );
    }

    #[test]
    fn the_switches_decide_what_is_static() {
        let request = get(Method::GET, CLIENT_JS_PATH, None);
        let off = WebProtocols {
            client_js: false,
            ..WebProtocols::default()
        };
        assert!(!is_static(&request, &off));
        assert!(!is_static(&request, &WebProtocols::none()));
        let post = get(Method::POST, CLIENT_JS_PATH, None);
        assert!(!is_static(&post, &WebProtocols::default()));
        let other = get(Method::GET, "/_lodestar/other.js", None);
        assert!(!is_static(&other, &WebProtocols::default()));
    }

    #[test]
    fn assets_are_served_at_their_exact_path() {
        let settings = WebProtocols::default()
            .asset("/", "text/html; charset=utf-8", b"<p>old</p>")
            .unwrap()
            .asset("/", "text/html; charset=utf-8", b"<p>page</p>")
            .unwrap();
        assert_eq!(settings.assets.len(), 1, "the same path is replaced");
        let page = serve(&get(Method::GET, "/", None), &settings);
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(body_len(&page), 11);
        assert!(
            !page
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        for path in ["/index.html", "/?x=1", "//"] {
            let request = get(Method::GET, path, None);
            assert_eq!(
                is_static(&request, &settings),
                path == "/?x=1",
                "{path}: the path alone is compared"
            );
        }
        assert_ne!(
            etag_bytes(b"<p>old</p>"),
            etag_bytes(b"<p>page</p>"),
            "the ETag follows the bytes"
        );
    }

    #[test]
    fn bad_assets_say_what_was_wrong() {
        for (path, content_type, expected) in [
            ("page.html", "text/html", "must start with `/`"),
            ("/_lodestar/x.js", "text/javascript", "lodestar's own"),
            ("/a?b=1", "text/html", "no query"),
            ("/a b", "text/html", "no query"),
            ("/a#b", "text/html", "no query"),
            ("/a", "text/html\n", "not a header value"),
        ] {
            let error = WebProtocols::default()
                .asset(path, content_type, b"")
                .unwrap_err();
            assert_eq!(error.path(), path);
            let text = error.to_string();
            assert!(text.contains(expected), "{path}: {text}");
        }
    }
}

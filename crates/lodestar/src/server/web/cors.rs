//! CORS for the web protocols: preflights answered from the allow list,
//! and the headers an allowed origin's calls carry back.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};

use super::settings::Cors;
use super::{WebResponseBody, plain};

/// The request headers the protocols use, always allowed in a preflight.
const ALLOW_HEADERS: &str = "content-type, connect-protocol-version, connect-timeout-ms, \
     connect-content-encoding, connect-accept-encoding, grpc-timeout, grpc-accept-encoding, \
     x-grpc-web, x-user-agent, authorization";

/// The response headers a page may read: the status and Connect's.
const EXPOSE_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin, \
     connect-content-encoding, content-encoding";

/// What a cross-origin request varies by.
const VARY: &str = "origin, access-control-request-method, access-control-request-headers";

/// The `Origin` of `headers` if `cors` allows it: the value to send back
/// in `Access-Control-Allow-Origin`. `None` for a same-origin request (no
/// `Origin`) and for a disallowed one.
pub(super) fn allowed_origin(cors: &Cors, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    cors.allow_origins.iter().find_map(|allowed| {
        if allowed == "*" {
            Some(HeaderValue::from_static("*"))
        } else {
            allowed.eq_ignore_ascii_case(text).then(|| origin.clone())
        }
    })
}

/// Whether `request` comes from a page of the service's own origin: its
/// `Origin`, less the scheme, is the request's `Host` (HTTP/1.1) or
/// `:authority` (HTTP/2). Browsers let such a page call without CORS; the
/// WebSocket origin check lets it open a socket likewise.
pub(super) fn is_same_origin<B>(request: &Request<B>) -> bool {
    let Some(origin) = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(origin) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok()),
    };
    host.is_some_and(|host| !host.is_empty() && host.eq_ignore_ascii_case(origin))
}

/// Whether `request` is a CORS preflight (`OPTIONS` with
/// `Access-Control-Request-Method`).
pub(super) fn is_preflight<B>(request: &Request<B>) -> bool {
    request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Answers a preflight: `204` with what the origin may do, or `403`
/// without CORS headers for an origin not allowed (or a method the web
/// protocols do not use: `POST` and `GET`, and with REST routes `PUT`,
/// `PATCH` and `DELETE`).
pub(super) fn preflight<B>(
    cors: &Cors,
    request: &Request<B>,
    rest: bool,
) -> Response<WebResponseBody> {
    let methods = if rest {
        "POST, GET, PUT, PATCH, DELETE"
    } else {
        "POST, GET"
    };
    let method_ok = request
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| !m.is_empty() && methods.split(", ").any(|allowed| allowed == m));
    let Some(origin) = allowed_origin(cors, request.headers()).filter(|_| method_ok) else {
        return plain(
            StatusCode::FORBIDDEN,
            &format!(
                "this origin may not call this service (see Cors::allow_origins), \
                 or the method is not one of {methods}"
            ),
        );
    };
    let mut response = Response::new(WebResponseBody::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    let mut allow = String::from(ALLOW_HEADERS);
    for extra in &cors.allow_headers {
        allow.push_str(", ");
        allow.push_str(extra);
    }
    if let Ok(allow) = HeaderValue::try_from(allow) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow);
    }
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from(cors.max_age.as_secs()),
    );
    headers.insert(header::VARY, HeaderValue::from_static(VARY));
    response
}

/// Adds to the answer of an allowed origin's call the headers that let
/// its page read it: the origin, and which headers it may see (the
/// status, and Connect's `trailer-*` metadata, by name).
pub(super) fn decorate(response: &mut Response<WebResponseBody>, origin: HeaderValue) {
    let mut expose = String::from(EXPOSE_HEADERS);
    for name in response.headers().keys() {
        if name.as_str().starts_with("trailer-") {
            expose.push_str(", ");
            expose.push_str(name.as_str());
        }
    }
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if let Ok(expose) = HeaderValue::try_from(expose) {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose);
    }
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, origin: &'static str, asks: Option<&'static str>) -> Request<()> {
        let mut builder = Request::builder()
            .method(method)
            .uri("/pkg.Svc/M")
            .header(header::ORIGIN, origin);
        if let Some(asks) = asks {
            builder = builder.header(header::ACCESS_CONTROL_REQUEST_METHOD, asks);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn only_listed_origins_pass_and_star_only_when_listed() {
        let cors = Cors::allow(["https://app.example.com"]);
        let allowed = request(Method::POST, "https://app.example.com", None);
        assert_eq!(
            allowed_origin(&cors, allowed.headers()).unwrap(),
            "https://app.example.com"
        );
        let other = request(Method::POST, "https://evil.example.com", None);
        assert!(allowed_origin(&cors, other.headers()).is_none());
        assert!(allowed_origin(&Cors::default(), allowed.headers()).is_none());
        let any = Cors::allow(["*"]);
        assert_eq!(allowed_origin(&any, other.headers()).unwrap(), "*");
    }

    #[test]
    fn same_origin_is_the_host_with_a_web_scheme() {
        let with = |origin: &'static str, host: &'static str| {
            Request::builder()
                .uri("/pkg.Svc/M")
                .header(header::ORIGIN, origin)
                .header(header::HOST, host)
                .body(())
                .unwrap()
        };
        assert!(is_same_origin(&with(
            "http://127.0.0.1:8080",
            "127.0.0.1:8080"
        )));
        assert!(is_same_origin(&with("https://App.example", "app.example")));
        assert!(!is_same_origin(&with(
            "http://127.0.0.1:8081",
            "127.0.0.1:8080"
        )));
        assert!(!is_same_origin(&with("http://evil.example", "app.example")));
        assert!(!is_same_origin(&with("null", "null")));
        assert!(!is_same_origin(&with("ftp://app.example", "app.example")));
        let http2 = Request::builder()
            .uri("http://app.example:443/pkg.Svc/M")
            .header(header::ORIGIN, "https://app.example:443")
            .body(())
            .unwrap();
        assert!(is_same_origin(&http2));
    }

    #[test]
    fn a_preflight_is_answered_for_allowed_origins_only() {
        let cors = Cors::allow(["https://app.example.com"]);
        let ok = request(Method::OPTIONS, "https://app.example.com", Some("POST"));
        assert!(is_preflight(&ok));
        let response = preflight(&cors, &ok, false);
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let headers = response.headers();
        assert_eq!(headers[header::ACCESS_CONTROL_MAX_AGE], "7200");
        let allow = headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .unwrap();
        assert!(allow.contains("connect-protocol-version"), "{allow}");
        assert!(allow.contains("x-grpc-web"), "{allow}");
        let refused = preflight(
            &cors,
            &request(Method::OPTIONS, "https://evil.example.com", Some("POST")),
            false,
        );
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(
            !refused
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        let put = preflight(
            &cors,
            &request(Method::OPTIONS, "https://app.example.com", Some("PUT")),
            false,
        );
        assert_eq!(put.status(), StatusCode::FORBIDDEN);
        // With REST routes, their verbs are allowed too.
        let put = preflight(
            &cors,
            &request(Method::OPTIONS, "https://app.example.com", Some("PUT")),
            true,
        );
        assert_eq!(put.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            put.headers()[header::ACCESS_CONTROL_ALLOW_METHODS],
            "POST, GET, PUT, PATCH, DELETE"
        );
    }
}

//! The wire format: how a message travels as an HTTP request (see the
//! [module docs](super#wire-format)), both ways, and the plain-text answers.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use lodestar::broker::{BrokerError, Message, validate_topic};

/// The HTTP header carrying the message's topic.
pub const TOPIC_HEADER: &str = "lodestar-topic";

/// The prefix of the HTTP headers carrying message headers:
/// `lodestar-h-{name}: {value}`.
pub const HEADER_PREFIX: &str = "lodestar-h-";

/// The path under which subscriptions receive messages:
/// `/v1/broker/{subscription id}`.
pub const PATH_PREFIX: &str = "/v1/broker/";

pub(super) fn reply(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The message a request carries, or the error response.
pub(super) async fn decode(
    request: Request<Incoming>,
    expected_topic: &str,
    max_body: usize,
) -> Result<Message, Response<Full<Bytes>>> {
    let bad = |text: String| reply(StatusCode::BAD_REQUEST, text + "\n");
    let topic = match request.headers().get(TOPIC_HEADER).map(|v| v.to_str()) {
        Some(Ok(topic)) => topic.to_owned(),
        Some(Err(_)) => return Err(bad(format!("the {TOPIC_HEADER} header is not ASCII"))),
        None => return Err(bad(format!("missing the {TOPIC_HEADER} header"))),
    };
    if let Err(e) = validate_topic(&topic) {
        return Err(bad(e.to_string()));
    }
    if topic != expected_topic {
        return Err(bad(format!(
            "this subscription is to `{expected_topic}`, not `{topic}`"
        )));
    }
    let mut message = Message::new(topic, Bytes::new());
    for (name, value) in request.headers() {
        let Some(name) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        let Ok(value) = std::str::from_utf8(value.as_bytes()) else {
            return Err(bad(format!(
                "the value of header {HEADER_PREFIX}{name} is not UTF-8"
            )));
        };
        message.headers.insert(name.to_owned(), value.to_owned());
    }
    match Limited::new(request.into_body(), max_body).collect().await {
        Ok(body) => message.body = body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("message bodies are limited to {max_body} bytes\n"),
            ));
        }
        Err(e) => return Err(bad(format!("reading the body: {e}"))),
    }
    Ok(message)
}

/// The HTTP headers carrying `message`'s topic and headers.
pub(super) fn encode_headers(message: &Message) -> Result<HeaderMap, BrokerError> {
    let mut headers = HeaderMap::with_capacity(message.headers.len() + 2);
    let topic = HeaderValue::from_str(&message.topic)
        .map_err(|_| BrokerError::Invalid(format!("topic `{}`", message.topic)))?;
    headers.insert(HeaderName::from_static(TOPIC_HEADER), topic);
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    for (name, value) in &message.headers {
        let http_name = HeaderName::from_bytes(format!("{HEADER_PREFIX}{name}").as_bytes())
            .map_err(|_| {
                BrokerError::Invalid(format!(
                    "header name `{name}` cannot be sent as an HTTP header name"
                ))
            })?;
        let http_value = HeaderValue::from_bytes(value.as_bytes()).map_err(|_| {
            BrokerError::Invalid(format!(
                "the value of header `{name}` cannot be sent as an HTTP header value \
                 (no control characters such as line breaks)"
            ))
        })?;
        headers.insert(http_name, http_value);
    }
    Ok(headers)
}

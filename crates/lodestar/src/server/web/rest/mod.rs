//! REST routes from `google.api.http` annotations (HTTP/JSON transcoding).
//!
//! A method annotated in its `.proto`
//!
//! ```proto
//! rpc GetFeature(Point) returns (Feature) {
//!   option (google.api.http) = { get: "/v1/features/{latitude}/{longitude}" };
//! }
//! ```
//!
//! is also served as `GET /v1/features/407838351/-746143763`, with no
//! gateway and no generated code: at start, [`Routes::build`] reads each
//! served method's `HttpRule` (and its `additional_bindings`) from the
//! descriptors `lodestar-build` embeds, and parses its path template
//! ([`Template`]). A request is matched in `Route::of` (`mod.rs`) before
//! the Connect arms; [`serve`] then builds the request message from the
//! path variables, the query parameters and the body (JSON), calls **the
//! same server stack** as every protocol with it as native gRPC, and
//! answers `200` with the reply as JSON (or its `response_body` field),
//! or a Connect error body with the code's HTTP status.
//!
//! A server-streaming method's route answers its replies as they come,
//! one line of JSON each (`application/x-ndjson`, `{"result":…}`), and a
//! failure after the first reply as a last `{"error":…}` line:
//! `stream.rs`. A client-streaming or bidi method's rule is skipped with
//! a warning at start (a REST request has one message).
//!
//! Path templates, their grammar and matching: `template.rs`.

use std::collections::HashSet;
use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use prost::Message as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    SerializeOptions, Value,
};

pub(crate) mod stream;
mod template;

use self::template::Template;
use super::{WebRequestBody, WebResponseBody, WebState, call, connect, percent};
use crate::codec::Descriptors;
use crate::server::stack::Outer;

/// The longest request path a REST route takes (`414` beyond).
pub(crate) const MAX_PATH_LEN: usize = 8 * 1024;
/// The most query parameters a REST request may carry (`400` beyond).
pub(crate) const MAX_QUERY_PARAMS: usize = 128;

/// The `google.api.http` option (field 72295728 of
/// `google.protobuf.MethodOptions`), read from a method's encoded options
/// whether or not the descriptor pool knows the extension.
#[derive(Clone, PartialEq, prost::Message)]
struct HttpOption {
    #[prost(message, optional, tag = "72295728")]
    http: Option<HttpRule>,
}

/// `google.api.HttpRule`, the fields lodestar reads (same numbers as
/// upstream; the `pattern` oneof is its five verbs and `custom`).
#[derive(Clone, PartialEq, prost::Message)]
struct HttpRule {
    #[prost(string, tag = "2")]
    get: String,
    #[prost(string, tag = "3")]
    put: String,
    #[prost(string, tag = "4")]
    post: String,
    #[prost(string, tag = "5")]
    delete: String,
    #[prost(string, tag = "6")]
    patch: String,
    #[prost(string, tag = "7")]
    body: String,
    #[prost(message, optional, tag = "8")]
    custom: Option<CustomHttpPattern>,
    #[prost(message, repeated, tag = "11")]
    additional_bindings: Vec<HttpRule>,
    #[prost(string, tag = "12")]
    response_body: String,
}

/// `google.api.CustomHttpPattern`.
#[derive(Clone, PartialEq, prost::Message)]
struct CustomHttpPattern {
    #[prost(string, tag = "1")]
    kind: String,
    #[prost(string, tag = "2")]
    path: String,
}

impl HttpRule {
    /// The rule's verb and template, if it has one.
    fn pattern(&self) -> Option<(Method, &str)> {
        let verbs = [
            (Method::GET, &self.get),
            (Method::PUT, &self.put),
            (Method::POST, &self.post),
            (Method::DELETE, &self.delete),
            (Method::PATCH, &self.patch),
        ];
        if let Some((method, path)) = verbs.into_iter().find(|(_, path)| !path.is_empty()) {
            return Some((method, path.as_str()));
        }
        let custom = self.custom.as_ref()?;
        let method = Method::from_bytes(custom.kind.as_bytes()).ok()?;
        Some((method, custom.path.as_str()))
    }
}

/// A path template that does not parse, or a rule that does not fit its
/// method: which method, which template, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteError {
    /// The gRPC method (`package.Service.Method`).
    pub(crate) method: String,
    /// The HTTP verb.
    pub(crate) verb: String,
    /// The template as written.
    pub(crate) template: String,
    /// What is wrong, and what was expected.
    pub(crate) reason: String,
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the REST route of {}", self.method)?;
        if !self.template.is_empty() {
            write!(f, " ({} \"{}\")", self.verb, self.template)?;
        }
        write!(f, " is invalid: {}", self.reason)
    }
}

impl std::error::Error for RouteError {}

/// Where a route takes the HTTP body.
#[derive(Debug, Clone)]
enum BodyField {
    /// No body (it is not read).
    None,
    /// `*`: every field the path does not bind.
    All,
    /// One top-level field.
    Field(FieldDescriptor),
}

/// One REST route: a verb and template, and the method it calls.
#[derive(Debug, Clone)]
struct RestRoute {
    verb: Method,
    template: Template,
    /// The template as written, for errors.
    text: String,
    /// The method's gRPC path (`/package.Service/Method`).
    grpc_path: Uri,
    input: MessageDescriptor,
    body: BodyField,
    /// How a reply becomes JSON.
    reply: Reply,
    /// Whether the method streams its replies (server streaming).
    streams: bool,
    /// The path variables' fields (`.proto` names), to refuse them in
    /// the query.
    bound: HashSet<String>,
}

/// What `Route::of` found for a request that may be REST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hit {
    /// The route at this index.
    Route(usize),
    /// A template matches the path, but under other verbs: `405`.
    WrongMethod,
    /// No template matches, and no other protocol takes the request: `404`.
    NoRoute,
    /// The path is longer than [`MAX_PATH_LEN`]: `414`.
    TooLong,
}

/// The REST routes of a server's services, built once at start.
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    routes: Vec<RestRoute>,
    descriptors: Descriptors,
}

impl Routes {
    /// The routes of the methods of `services` that carry a
    /// `google.api.http` option. A template that does not parse, or that
    /// names fields the request does not have, is an error naming the
    /// method and the template; a client-streaming or bidi method's rules
    /// are skipped with a warning (REST serves unary and server-streaming
    /// methods).
    pub(crate) fn build(descriptors: &Descriptors, services: &[&str]) -> Result<Self, RouteError> {
        let mut routes = Vec::new();
        for service in descriptors
            .pool()
            .services()
            .filter(|s| services.contains(&s.full_name()))
        {
            for method in service.methods() {
                let options = method.options().encode_to_vec();
                let option = HttpOption::decode(options.as_slice()).map_err(|e| RouteError {
                    method: method.full_name().to_owned(),
                    verb: String::new(),
                    template: String::new(),
                    reason: format!(
                        "its option 72295728 is not a google.api.HttpRule: {e} (another \
                         extension with google.api.http's number?)"
                    ),
                })?;
                let Some(rule) = option.http else { continue };
                if method.is_client_streaming() {
                    tracing::warn!(
                        method = method.full_name(),
                        "google.api.http on a client-streaming or bidi method is not served \
                         over REST (unary and server-streaming methods only); call it with \
                         Connect, gRPC-Web or WebSocket"
                    );
                    continue;
                }
                let grpc_path = format!("/{}/{}", service.full_name(), method.name());
                let grpc_path = Uri::try_from(grpc_path.as_str()).map_err(|e| RouteError {
                    method: method.full_name().to_owned(),
                    verb: String::new(),
                    template: String::new(),
                    reason: format!("its gRPC path {grpc_path} is not a URI path: {e}"),
                })?;
                let bindings = std::iter::once(&rule).chain(&rule.additional_bindings);
                for binding in bindings {
                    routes.push(route(&method, &grpc_path, binding)?);
                }
            }
        }
        for (i, a) in routes.iter().enumerate() {
            if let Some(b) = routes[..i]
                .iter()
                .find(|b| b.verb == a.verb && b.template == a.template)
            {
                return Err(RouteError {
                    method: a.grpc_path.path().trim_start_matches('/').replace('/', "."),
                    verb: a.verb.to_string(),
                    template: a.text.clone(),
                    reason: format!(
                        "the same verb and template already route to {}",
                        b.grpc_path.path().trim_start_matches('/').replace('/', ".")
                    ),
                });
            }
        }
        // The most literal template first; `**` after the others; ties in
        // the order of the descriptors.
        routes.sort_by_key(|r| {
            (
                std::cmp::Reverse(r.template.literals()),
                r.template.open_ended(),
            )
        });
        Ok(Self {
            routes,
            descriptors: descriptors.clone(),
        })
    }

    /// Whether there is no route at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Classifies a request that is not a WebSocket opening: `None` when it
    /// is another protocol's (a gRPC method's path, or Connect's and
    /// gRPC-Web's content types, or a request Connect may take: any
    /// `POST`, a `GET` with `encoding=`), a [`Hit`] otherwise.
    pub(crate) fn classify<B>(&self, request: &Request<B>) -> Option<Hit> {
        let path = request.uri().path();
        if is_other_protocol(request.headers()) || self.descriptors.method(path).is_some() {
            return None;
        }
        let connect_may_take = request.method() == Method::POST
            || (request.method() == Method::GET
                && request
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|p| p.starts_with("encoding="))));
        if path.len() > MAX_PATH_LEN {
            return (!connect_may_take).then_some(Hit::TooLong);
        }
        let mut elsewhere = false;
        for (i, route) in self.routes.iter().enumerate() {
            if route.template.is_match(path) {
                if route.verb == request.method() {
                    return Some(Hit::Route(i));
                }
                elsewhere = true;
            }
        }
        if elsewhere {
            return Some(Hit::WrongMethod);
        }
        (!connect_may_take).then_some(Hit::NoRoute)
    }

    /// The verbs whose templates match `path`, for `Allow`.
    fn allowed(&self, path: &str) -> String {
        let mut verbs: Vec<&str> = Vec::new();
        for route in &self.routes {
            if route.template.is_match(path) && !verbs.contains(&route.verb.as_str()) {
                verbs.push(route.verb.as_str());
            }
        }
        verbs.join(", ")
    }
}

/// Whether a content type is one of the other protocols' (gRPC, gRPC-Web,
/// Connect streams, Connect's `application/proto`).
fn is_other_protocol(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let media = value
        .as_bytes()
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let starts = |prefix: &[u8]| {
        media.len() >= prefix.len() && media[..prefix.len()].eq_ignore_ascii_case(prefix)
    };
    starts(b"application/grpc")
        || starts(b"application/connect+")
        || media.eq_ignore_ascii_case(b"application/proto")
}

/// One binding's route, its fields checked against the method's types.
fn route(
    method: &prost_reflect::MethodDescriptor,
    grpc_path: &Uri,
    rule: &HttpRule,
) -> Result<RestRoute, RouteError> {
    let (verb, text) = rule.pattern().ok_or_else(|| RouteError {
        method: method.full_name().to_owned(),
        verb: String::new(),
        template: String::new(),
        reason: "the rule has no verb and path (get, put, post, delete, patch or custom)".into(),
    })?;
    let error = |reason: String| RouteError {
        method: method.full_name().to_owned(),
        verb: verb.to_string(),
        template: text.to_owned(),
        reason,
    };
    let template = Template::parse(text).map_err(error)?;
    let input = method.input();
    let output = method.output();
    let mut bound = HashSet::new();
    for variable in template.fields() {
        let path = variable.join(".");
        let field = resolve(&input, variable).map_err(&error)?;
        if field.is_list() || field.is_map() {
            return Err(error(format!(
                "the path variable `{path}` is a repeated or map field; variables fill single fields"
            )));
        }
        bound.insert(proto_path(&input, variable));
    }
    let body = match rule.body.as_str() {
        "" => BodyField::None,
        "*" => BodyField::All,
        name => BodyField::Field(input.get_field_by_name(name).ok_or_else(|| {
            error(format!(
                "body: \"{name}\" is not a field of {} (expected a top-level field name, or `*`)",
                input.full_name()
            ))
        })?),
    };
    let response_body = match rule.response_body.as_str() {
        "" => None,
        name => Some(output.get_field_by_name(name).ok_or_else(|| {
            error(format!(
                "response_body: \"{name}\" is not a field of {} (expected a top-level field name)",
                output.full_name()
            ))
        })?),
    };
    Ok(RestRoute {
        verb,
        template,
        text: text.to_owned(),
        grpc_path: grpc_path.clone(),
        input,
        body,
        reply: Reply {
            output,
            response_body,
        },
        streams: method.is_server_streaming(),
        bound,
    })
}

/// The field a dotted path names in `message`: every step but the last a
/// singular message field. Names are the `.proto` names or their JSON names.
fn resolve(message: &MessageDescriptor, path: &[String]) -> Result<FieldDescriptor, String> {
    let mut current = message.clone();
    let mut found: Option<FieldDescriptor> = None;
    for (i, name) in path.iter().enumerate() {
        if let Some(field) = found.take() {
            match field.kind() {
                Kind::Message(inner) if !field.is_list() && !field.is_map() => current = inner,
                _ => {
                    return Err(format!(
                        "`{}` is not a message field, so it has no field `{name}`",
                        path[..i].join(".")
                    ));
                }
            }
        }
        let field = current
            .get_field_by_name(name)
            .or_else(|| current.get_field_by_json_name(name))
            .ok_or_else(|| format!("{} has no field `{name}`", current.full_name()))?;
        found = Some(field);
    }
    found.ok_or_else(|| "an empty field path".to_owned())
}

/// A REST answer's error: a Connect error body with `http` (or the
/// code's status).
fn error(status: &tonic::Status, http: Option<StatusCode>) -> Response<WebResponseBody> {
    connect::error_response(status, http, HeaderMap::new())
}

fn invalid(message: String) -> tonic::Status {
    tonic::Status::invalid_argument(message)
}

/// Serves a request `Route::of` classified as REST.
pub(super) async fn serve(
    outer: Outer,
    state: &WebState,
    routes: &Routes,
    request: Request<Incoming>,
    hit: Hit,
) -> Response<WebResponseBody> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let index = match hit {
        Hit::Route(index) => index,
        Hit::NoRoute => {
            let status = tonic::Status::not_found(format!("no route for {} {path}", parts.method));
            return error(&status, None);
        }
        Hit::WrongMethod => {
            let allow = routes.allowed(&path);
            let status = tonic::Status::unimplemented(format!(
                "{path} is not served for {}; it is for {allow}",
                parts.method
            ));
            let mut response = error(&status, Some(StatusCode::METHOD_NOT_ALLOWED));
            if let Ok(allow) = HeaderValue::try_from(allow) {
                response.headers_mut().insert(header::ALLOW, allow);
            }
            return response;
        }
        Hit::TooLong => {
            let status = invalid(format!(
                "the path is {} bytes long; REST routes take at most {MAX_PATH_LEN}",
                path.len()
            ));
            return error(&status, Some(StatusCode::URI_TOO_LONG));
        }
    };
    let Some(route) = routes.routes.get(index) else {
        return error(
            &tonic::Status::internal("the REST route table changed"),
            None,
        );
    };
    let limit = state.limits.max_decoding_message_size;
    let body = match route.body {
        BodyField::None => None,
        _ => match read_body(body, &parts.headers, limit).await {
            Ok(body) => Some(body),
            Err(response) => return response,
        },
    };
    let message = match request_message(route, &path, parts.uri.query(), body.as_deref()) {
        Ok(message) => message,
        Err(status) => return error(&status, None),
    };
    let frame = match connect::envelope(0, &message.encode_to_vec()) {
        Ok(frame) => frame,
        Err(status) => return error(&status, None),
    };
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::ACCEPT_ENCODING,
        HeaderName::from_static("grpc-encoding"),
        HeaderName::from_static("grpc-accept-encoding"),
    ] {
        parts.headers.remove(name);
    }
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts.method = Method::POST;
    parts.uri = route.grpc_path.clone();
    let request = Request::from_parts(parts, WebRequestBody::whole(frame).into());
    let response = call(outer, request).await;
    if route.streams {
        let limit = state.limits.max_encoding_message_size;
        return stream::respond(response, route.reply.clone(), limit).await;
    }
    let response = connect::unary_response(
        response,
        connect::Codec::Proto,
        true,
        state.limits.max_encoding_message_size,
    )
    .await;
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let reply = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return error(
                &tonic::Status::internal(format!("the reply failed: {e}")),
                None,
            );
        }
    };
    match route.reply.json(&reply) {
        Ok(json) => {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            parts.headers.remove(header::CONTENT_ENCODING);
            Response::from_parts(parts, WebResponseBody::full(Bytes::from(json)))
        }
        Err(status) => error(&status, None),
    }
}

/// Reads a REST body whole, up to `limit` bytes (`413` beyond). It is
/// JSON whatever its content type says (`curl -d` says form data).
async fn read_body(
    body: Incoming,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, Response<WebResponseBody>> {
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING)
        && encoding.as_bytes() != b"identity"
    {
        let status = tonic::Status::unimplemented(format!(
            "a REST body cannot be {encoding:?}-encoded (send it uncompressed)"
        ));
        return Err(error(&status, Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let status = tonic::Status::resource_exhausted(format!(
                "the request body is larger than this server's limit of {limit} bytes \
                 (MessageLimits::max_decoding_message_size)"
            ));
            Err(error(&status, Some(StatusCode::PAYLOAD_TOO_LARGE)))
        }
        Err(e) => Err(error(
            &tonic::Status::cancelled(format!("the request body could not be read: {e}")),
            None,
        )),
    }
}

/// The request message of `route` for this path, query and body.
fn request_message(
    route: &RestRoute,
    path: &str,
    query: Option<&str>,
    body: Option<&[u8]>,
) -> Result<DynamicMessage, tonic::Status> {
    let input = &route.input;
    let mut message = match (&route.body, body) {
        (BodyField::All, Some(body)) | (BodyField::Field(_), Some(body)) => {
            let json: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
                serde_json::Value::Object(serde_json::Map::new())
            } else {
                serde_json::from_slice(body)
                    .map_err(|e| invalid(format!("the body is not JSON: {e}")))?
            };
            let json = match &route.body {
                BodyField::Field(field) => {
                    let mut object = serde_json::Map::new();
                    object.insert(field.name().to_owned(), json);
                    serde_json::Value::Object(object)
                }
                _ => json,
            };
            let options = DeserializeOptions::new().deny_unknown_fields(false);
            DynamicMessage::deserialize_with_options(input.clone(), json, &options).map_err(
                |e| {
                    invalid(format!(
                        "the body is not a valid {} in JSON: {e}",
                        input.full_name()
                    ))
                },
            )?
        }
        _ => DynamicMessage::new(input.clone()),
    };
    let captures = route
        .template
        .captures(path)
        .ok_or_else(|| invalid(format!("{path} has a bad percent escape, or is not UTF-8")))?;
    for (field, text) in captures {
        set(&mut message, field, &text, false).map_err(|e| {
            invalid(format!(
                "the path variable `{}` = {text:?}: {e}",
                field.join(".")
            ))
        })?;
    }
    let Some(query) = query else {
        return Ok(message);
    };
    let params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    if params.len() > MAX_QUERY_PARAMS {
        return Err(invalid(format!(
            "{} query parameters; a REST request takes at most {MAX_QUERY_PARAMS}",
            params.len()
        )));
    }
    for param in params {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let key = percent::decode_utf8(key, true, false).ok_or_else(|| {
            invalid(format!(
                "the query parameter `{key}` is not percent-encoded"
            ))
        })?;
        let value = percent::decode_utf8(value, true, false).ok_or_else(|| {
            invalid(format!(
                "the value of the query parameter `{key}` is not percent-encoded"
            ))
        })?;
        let field: Vec<String> = key.split('.').map(str::to_owned).collect();
        match &route.body {
            BodyField::All => {
                return Err(invalid(format!(
                    "unknown query parameter `{key}`: this route takes every field from the body"
                )));
            }
            BodyField::Field(body) if field[0] == body.name() || field[0] == body.json_name() => {
                return Err(invalid(format!(
                    "the query parameter `{key}` sets a field that comes from the body"
                )));
            }
            _ => {}
        }
        let resolved = resolve(input, &field)
            .map_err(|e| invalid(format!("unknown query parameter `{key}`: {e}")))?;
        let named = proto_path(input, &field);
        let covers = |bound: &String| {
            bound == &named
                || bound
                    .strip_prefix(named.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        };
        if route.bound.iter().any(covers) {
            return Err(invalid(format!(
                "the query parameter `{key}` sets a field that comes from the path"
            )));
        }
        if resolved.is_map() {
            return Err(invalid(format!(
                "the query parameter `{key}` names a map field, which a query cannot set"
            )));
        }
        set(&mut message, &field, &value, true)
            .map_err(|e| invalid(format!("the query parameter `{key}` = {value:?}: {e}")))?;
    }
    Ok(message)
}

/// A field path written with JSON names, in `.proto` names.
fn proto_path(message: &MessageDescriptor, path: &[String]) -> String {
    let mut names = Vec::with_capacity(path.len());
    let mut current = Some(message.clone());
    for name in path {
        let field = current.as_ref().and_then(|m| {
            m.get_field_by_name(name)
                .or_else(|| m.get_field_by_json_name(name))
        });
        match field {
            Some(field) => {
                names.push(field.name().to_owned());
                current = match field.kind() {
                    Kind::Message(inner) => Some(inner),
                    _ => None,
                };
            }
            None => names.push(name.clone()),
        }
    }
    names.join(".")
}

/// Sets the field at `path` in `message` from `text`, creating the
/// messages on the way; a repeated field gets one more element when
/// `append` (the query's repeated keys).
fn set(
    message: &mut DynamicMessage,
    path: &[String],
    text: &str,
    append: bool,
) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("an empty field path".into());
    };
    let mut current = message;
    for name in parents {
        let descriptor = current.descriptor();
        let field = descriptor
            .get_field_by_name(name)
            .or_else(|| descriptor.get_field_by_json_name(name))
            .ok_or_else(|| format!("{} has no field `{name}`", descriptor.full_name()))?;
        match current.get_field_mut(&field) {
            Value::Message(inner) => current = inner,
            _ => return Err(format!("`{name}` is not a message field")),
        }
    }
    let descriptor = current.descriptor();
    let field = descriptor
        .get_field_by_name(last)
        .or_else(|| descriptor.get_field_by_json_name(last))
        .ok_or_else(|| format!("{} has no field `{last}`", descriptor.full_name()))?;
    let value = scalar(&field.kind(), text)?;
    if field.is_list() {
        if !append {
            return Err("a repeated field cannot be a path variable".into());
        }
        match current.get_field_mut(&field) {
            Value::List(items) => items.push(value),
            _ => return Err(format!("`{last}` is not a list")),
        }
    } else {
        current.set_field(&field, value);
    }
    Ok(())
}

/// `text` as a value of `kind`: numbers in decimal, booleans as
/// `true`/`false`, bytes in base64 (standard or URL-safe), enums by name
/// or number, and messages by their JSON form given as a string
/// (`google.protobuf.Timestamp`, `Duration`, `FieldMask`, wrappers).
fn scalar(kind: &Kind, text: &str) -> Result<Value, String> {
    fn number<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, String> {
        text.parse().map_err(|_| format!("expected {what}"))
    }
    Ok(match kind {
        Kind::Double => Value::F64(number(text, "a number")?),
        Kind::Float => Value::F32(number(text, "a number")?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(number(text, "a 32-bit integer")?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(number(text, "a 64-bit integer")?)
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(number(text, "an unsigned 32-bit integer")?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(number(text, "an unsigned 64-bit integer")?),
        Kind::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err("expected true or false".into()),
        },
        Kind::String => Value::String(text.to_owned()),
        Kind::Bytes => {
            use base64::Engine as _;
            let trimmed = text.trim_end_matches('=');
            let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(trimmed)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
                .map_err(|_| "expected base64".to_owned())?;
            Value::Bytes(Bytes::from(decoded))
        }
        Kind::Enum(descriptor) => {
            if let Some(value) = descriptor.get_value_by_name(text) {
                Value::EnumNumber(value.number())
            } else if let Ok(number) = text.parse::<i32>() {
                Value::EnumNumber(number)
            } else {
                let names: Vec<String> = descriptor.values().map(|v| v.name().to_owned()).collect();
                return Err(format!(
                    "expected one of {} (or a number)",
                    names.join(", ")
                ));
            }
        }
        Kind::Message(descriptor) => {
            let options = DeserializeOptions::new().deny_unknown_fields(false);
            let as_string = serde_json::Value::String(text.to_owned());
            let message =
                DynamicMessage::deserialize_with_options(descriptor.clone(), as_string, &options)
                    .or_else(|first| {
                        // Wrappers of numbers and booleans take them bare.
                        let json: serde_json::Value =
                            serde_json::from_str(text).map_err(|_| first.to_string())?;
                        DynamicMessage::deserialize_with_options(descriptor.clone(), json, &options)
                            .map_err(|e| e.to_string())
                    })
                    .map_err(|e| {
                        format!(
                            "expected a {} in its JSON form: {e}",
                            descriptor.full_name()
                        )
                    })?;
            Value::Message(message)
        }
    })
}

/// How a route's replies become JSON: the reply type, and the
/// `response_body` field if the rule names one.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    output: MessageDescriptor,
    response_body: Option<FieldDescriptor>,
}

impl Reply {
    /// The reply (encoded protobuf) as JSON: the whole message, or its
    /// `response_body` field.
    fn json(&self, reply: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        let message = DynamicMessage::decode(self.output.clone(), reply).map_err(|e| {
            tonic::Status::internal(format!(
                "the reply does not decode as {}: {e}",
                self.output.full_name()
            ))
        })?;
        let encode = |e: serde_json::Error| {
            tonic::Status::internal(format!(
                "encoding a {} as JSON: {e}",
                self.output.full_name()
            ))
        };
        let Some(field) = &self.response_body else {
            return serde_json::to_vec(&message).map_err(encode);
        };
        // The field's JSON as the whole message's JSON writes it, defaults
        // included (so an unset field is its default, not nothing).
        let options = SerializeOptions::new().skip_default_fields(false);
        let whole = message
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(encode)?;
        let value = whole
            .get(field.json_name())
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        serde_json::to_vec(&value).map_err(encode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool with `t.Req { repeated int32 ids = 1; Inner inner = 2;
    /// Color color = 3; bool flag = 4; string name = 5; }`,
    /// `t.Inner { int64 n = 1; }`, `enum t.Color { RED = 0; BLUE = 1; }`
    /// and `service t.S { rpc M(Req) returns (Req); }`.
    fn pool() -> Descriptors {
        pool_with(&[])
    }

    /// Which side of a test method streams.
    #[derive(Debug, Clone, Copy)]
    enum Streams {
        No,
        Server,
        Client,
        Both,
    }

    /// [`pool`], with more methods of `t.S` (`Req` in and out), each with
    /// its `google.api.http` rule as protoc writes it (an unknown field of
    /// the method's options, since prost-types cannot carry extensions),
    /// and which side streams.
    fn pool_with(methods: &[(&str, HttpRule, Streams)]) -> Descriptors {
        use prost_types::field_descriptor_proto::{Label, Type};
        use prost_types::{
            DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
            FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto, ServiceDescriptorProto,
        };
        let field = |name: &str, number, ty: Type, label: Label, type_name: Option<&str>| {
            FieldDescriptorProto {
                name: Some(name.into()),
                number: Some(number),
                r#type: Some(ty as i32),
                label: Some(label as i32),
                type_name: type_name.map(str::to_owned),
                json_name: Some(name.into()),
                ..Default::default()
            }
        };
        let set = FileDescriptorSet {
            file: vec![FileDescriptorProto {
                name: Some("t.proto".into()),
                package: Some("t".into()),
                syntax: Some("proto3".into()),
                message_type: vec![
                    DescriptorProto {
                        name: Some("Req".into()),
                        field: vec![
                            field("ids", 1, Type::Int32, Label::Repeated, None),
                            field("inner", 2, Type::Message, Label::Optional, Some(".t.Inner")),
                            field("color", 3, Type::Enum, Label::Optional, Some(".t.Color")),
                            field("flag", 4, Type::Bool, Label::Optional, None),
                            field("name", 5, Type::String, Label::Optional, None),
                        ],
                        ..Default::default()
                    },
                    DescriptorProto {
                        name: Some("Inner".into()),
                        field: vec![field("n", 1, Type::Int64, Label::Optional, None)],
                        ..Default::default()
                    },
                ],
                enum_type: vec![EnumDescriptorProto {
                    name: Some("Color".into()),
                    value: vec![
                        EnumValueDescriptorProto {
                            name: Some("RED".into()),
                            number: Some(0),
                            ..Default::default()
                        },
                        EnumValueDescriptorProto {
                            name: Some("BLUE".into()),
                            number: Some(1),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        // Length-delimited field `tag` holding `bytes`.
        let raw = |tag: u32, bytes: &[u8]| {
            let mut out = Vec::new();
            prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
            prost::encoding::encode_varint(bytes.len() as u64, &mut out);
            out.extend_from_slice(bytes);
            out
        };
        let plain = MethodDescriptorProto {
            name: Some("M".into()),
            input_type: Some(".t.Req".into()),
            output_type: Some(".t.Req".into()),
            ..Default::default()
        };
        let mut service = ServiceDescriptorProto {
            name: Some("S".into()),
            method: vec![plain.clone()],
            ..Default::default()
        }
        .encode_to_vec();
        for (name, rule, streams) in methods {
            let (client, server) = match streams {
                Streams::No => (false, false),
                Streams::Server => (false, true),
                Streams::Client => (true, false),
                Streams::Both => (true, true),
            };
            let mut method = MethodDescriptorProto {
                name: Some((*name).into()),
                client_streaming: Some(client),
                server_streaming: Some(server),
                ..plain.clone()
            }
            .encode_to_vec();
            let option = HttpOption {
                http: Some(rule.clone()),
            };
            method.extend(raw(4, &option.encode_to_vec()));
            service.extend(raw(2, &method));
        }
        let mut file = set.file[0].encode_to_vec();
        file.extend(raw(6, &service));
        Descriptors::from_sets(&[&raw(1, &file)]).unwrap()
    }

    #[test]
    fn the_table_is_built_from_the_methods_options() {
        let get = |template: &str| HttpRule {
            get: template.into(),
            ..Default::default()
        };
        let pool = pool_with(&[
            (
                "A",
                HttpRule {
                    additional_bindings: vec![get("/v1/a/special")],
                    ..get("/v1/a/{name}")
                },
                Streams::No,
            ),
            ("B", get("/v1/{name=**}"), Streams::No),
            ("Streams", get("/v1/streams"), Streams::Server),
            ("Uploads", get("/v1/uploads"), Streams::Client),
            ("Chats", get("/v1/chats"), Streams::Both),
        ]);
        let routes = Routes::build(&pool, &["t.S"]).unwrap();
        let table: Vec<(&str, &str, bool)> = routes
            .routes
            .iter()
            .map(|r| (r.text.as_str(), r.grpc_path.path(), r.streams))
            .collect();
        // Most literal first, `**` last; the server-streaming method is a
        // streamed route, the client-streaming and bidi ones are skipped.
        assert_eq!(
            table,
            [
                ("/v1/a/special", "/t.S/A", false),
                ("/v1/a/{name}", "/t.S/A", false),
                ("/v1/streams", "/t.S/Streams", true),
                ("/v1/{name=**}", "/t.S/B", false),
            ]
        );
        assert!(Routes::build(&pool, &["t.Other"]).unwrap().is_empty());
        let twice = pool_with(&[
            ("A", get("/v1/x"), Streams::No),
            ("B", get("/v1/x"), Streams::No),
        ]);
        let error = Routes::build(&twice, &["t.S"]).unwrap_err().to_string();
        assert_eq!(
            error,
            "the REST route of t.S.B (GET \"/v1/x\") is invalid: the same verb and template \
             already route to t.S.A"
        );
        let bad = pool_with(&[("A", get("/v1/{nope}"), Streams::No)]);
        let error = Routes::build(&bad, &["t.S"]).unwrap_err().to_string();
        assert!(error.contains("t.S.A (GET \"/v1/{nope}\")"), "{error}");
        let error = Routes::build(
            &pool_with(&[("A", HttpRule::default(), Streams::No)]),
            &["t.S"],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            "the REST route of t.S.A is invalid: the rule has no verb and path (get, put, \
             post, delete, patch or custom)"
        );
    }

    fn rest_route(rule: HttpRule) -> Result<RestRoute, RouteError> {
        let pool = pool();
        let method = pool.method("/t.S/M").unwrap();
        route(&method, &Uri::from_static("/t.S/M"), &rule)
    }

    fn json(message: &DynamicMessage) -> serde_json::Value {
        serde_json::to_value(message).unwrap()
    }

    #[test]
    fn path_query_and_body_fill_the_request() {
        let get = rest_route(HttpRule {
            get: "/v1/{inner.n}/items/{name}".into(),
            ..Default::default()
        })
        .unwrap();
        let message = request_message(
            &get,
            "/v1/42/items/a%20b",
            Some("ids=1&ids=2&color=BLUE&flag=true"),
            None,
        )
        .unwrap();
        assert_eq!(
            json(&message),
            serde_json::json!({
                "ids": [1, 2], "inner": {"n": "42"}, "color": "BLUE", "flag": true, "name": "a b",
            })
        );
        let bad = |route: &RestRoute, path, query: &str, body: Option<&[u8]>| {
            request_message(route, path, Some(query), body)
                .unwrap_err()
                .message()
                .to_owned()
        };
        let e = bad(&get, "/v1/1/items/x", "nope=1", None);
        assert!(e.contains("unknown query parameter `nope`"), "{e}");
        let e = bad(&get, "/v1/1/items/x", "ids=one", None);
        assert!(e.contains("`ids`") && e.contains("32-bit integer"), "{e}");
        let e = bad(&get, "/v1/1/items/x", "color=GREEN", None);
        assert!(e.contains("RED, BLUE"), "{e}");
        for from_path in ["name=y", "inner.n=2", "inner=%7B%7D"] {
            let e = bad(&get, "/v1/1/items/x", from_path, None);
            assert!(e.contains("comes from the path"), "{from_path}: {e}");
        }
        let e = bad(&get, "/v1/1/items/x", "flag=yes", None);
        assert!(e.contains("true or false"), "{e}");
        let e = bad(&get, "/v1/x/items/x", "", None);
        assert!(e.contains("path variable `inner.n`"), "{e}");
        let many = vec!["flag=true"; MAX_QUERY_PARAMS + 1].join("&");
        let e = bad(&get, "/v1/1/items/x", &many, None);
        assert!(e.contains("at most"), "{e}");

        let post = rest_route(HttpRule {
            post: "/v1/{name}".into(),
            body: "*".into(),
            ..Default::default()
        })
        .unwrap();
        let message =
            request_message(&post, "/v1/n", None, Some(br#"{"ids":[3],"name":"body"}"#)).unwrap();
        // The path wins over the body.
        assert_eq!(json(&message), serde_json::json!({"ids": [3], "name": "n"}));
        let e = bad(&post, "/v1/n", "flag=true", Some(b"{}"));
        assert!(e.contains("from the body"), "{e}");
        let e = bad(&post, "/v1/n", "", Some(b"{"));
        assert!(e.contains("not JSON"), "{e}");

        let field = rest_route(HttpRule {
            put: "/v1/inner".into(),
            body: "inner".into(),
            ..Default::default()
        })
        .unwrap();
        let message = request_message(
            &field,
            "/v1/inner",
            Some("flag=true"),
            Some(br#"{"n":"7"}"#),
        )
        .unwrap();
        assert_eq!(
            json(&message),
            serde_json::json!({"inner": {"n": "7"}, "flag": true})
        );
        let e = bad(&field, "/v1/inner", "inner.n=1", Some(b"{}"));
        assert!(e.contains("from the body"), "{e}");
    }

    #[test]
    fn rules_that_do_not_fit_the_method_are_refused_naming_it() {
        for (rule, says) in [
            (
                HttpRule {
                    get: "/v1/{missing}".into(),
                    ..Default::default()
                },
                "t.Req has no field `missing`",
            ),
            (
                HttpRule {
                    get: "/v1/{ids}".into(),
                    ..Default::default()
                },
                "repeated",
            ),
            (
                HttpRule {
                    get: "/v1/{name.x}".into(),
                    ..Default::default()
                },
                "not a message field",
            ),
            (
                HttpRule {
                    post: "/v1".into(),
                    body: "nobody".into(),
                    ..Default::default()
                },
                "body: \"nobody\"",
            ),
            (
                HttpRule {
                    get: "/v1".into(),
                    response_body: "nothing".into(),
                    ..Default::default()
                },
                "response_body",
            ),
            (HttpRule::default(), "no verb"),
            (
                HttpRule {
                    get: "v1".into(),
                    ..Default::default()
                },
                "starts with `/`",
            ),
        ] {
            let error = rest_route(rule).unwrap_err();
            let text = error.to_string();
            assert!(text.contains("t.S.M") && text.contains(says), "{text}");
        }
    }

    #[test]
    fn the_table_routes_by_verb_and_specificity_and_leaves_other_protocols_alone() {
        let pool = pool();
        let route = |verb: Method, template: &str| {
            let mut route =
                rest_route(HttpRule::default().tap_verb(verb.clone(), template)).unwrap();
            route.verb = verb;
            route
        };
        let routes = Routes {
            routes: vec![
                route(Method::GET, "/v1/{name}"),
                route(Method::DELETE, "/v1/{name}"),
                route(Method::GET, "/v1/special"),
            ],
            descriptors: pool,
        };
        let mut sorted = routes.clone();
        sorted.routes.sort_by_key(|r| {
            (
                std::cmp::Reverse(r.template.literals()),
                r.template.open_ended(),
            )
        });
        let request = |method: Method, uri: &str, content_type: Option<&str>| {
            let mut builder = Request::builder().method(method).uri(uri);
            if let Some(ct) = content_type {
                builder = builder.header(header::CONTENT_TYPE, ct);
            }
            builder.body(()).unwrap()
        };
        assert_eq!(
            sorted.classify(&request(Method::GET, "/v1/special", None)),
            Some(Hit::Route(0))
        );
        assert_eq!(
            sorted.classify(&request(Method::GET, "/v1/other?x=1", None)),
            Some(Hit::Route(1))
        );
        assert_eq!(
            sorted.classify(&request(Method::PUT, "/v1/other", None)),
            Some(Hit::WrongMethod)
        );
        assert_eq!(sorted.allowed("/v1/other"), "GET, DELETE");
        assert_eq!(
            sorted.classify(&request(Method::GET, "/v2/x", None)),
            Some(Hit::NoRoute)
        );
        // Other protocols' requests.
        assert_eq!(
            sorted.classify(&request(Method::POST, "/v2/x", Some("application/json"))),
            None
        );
        assert_eq!(
            sorted.classify(&request(
                Method::GET,
                "/t.S/M?encoding=json&message=%7B%7D",
                None
            )),
            None
        );
        assert_eq!(
            sorted.classify(&request(Method::GET, "/v1/x", Some("application/grpc-web"))),
            None
        );
        assert_eq!(sorted.classify(&request(Method::GET, "/t.S/M", None)), None);
        let long = format!("/v1/{}", "a".repeat(MAX_PATH_LEN));
        assert_eq!(
            sorted.classify(&request(Method::GET, &long, None)),
            Some(Hit::TooLong)
        );
    }

    impl HttpRule {
        fn tap_verb(mut self, verb: Method, template: &str) -> Self {
            match verb {
                Method::GET => self.get = template.into(),
                Method::DELETE => self.delete = template.into(),
                _ => {
                    self.custom = Some(CustomHttpPattern {
                        kind: verb.to_string(),
                        path: template.into(),
                    })
                }
            }
            self
        }
    }

    #[test]
    fn replies_are_json_or_their_response_body_field() {
        let whole = rest_route(HttpRule {
            get: "/v1".into(),
            ..Default::default()
        })
        .unwrap();
        let mut reply = DynamicMessage::new(whole.reply.output.clone());
        reply.set_field_by_name("name", Value::String("x".into()));
        let bytes = reply.encode_to_vec();
        assert_eq!(whole.reply.json(&bytes).unwrap(), br#"{"name":"x"}"#);
        let field = rest_route(HttpRule {
            get: "/v1".into(),
            response_body: "flag".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(field.reply.json(&bytes).unwrap(), b"false");
        let field = rest_route(HttpRule {
            get: "/v1".into(),
            response_body: "name".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(field.reply.json(&bytes).unwrap(), br#""x""#);
    }

    #[test]
    fn the_option_is_read_from_encoded_method_options() {
        let rule = HttpRule {
            get: "/v1/x".into(),
            additional_bindings: vec![HttpRule {
                post: "/v1/x".into(),
                body: "*".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let bytes = HttpOption {
            http: Some(rule.clone()),
        }
        .encode_to_vec();
        // Tag 72295728, wire type 2: what protoc and protox write.
        assert_eq!(&bytes[..5], &[0x82, 0xd3, 0xe4, 0x93, 0x02]);
        let decoded = HttpOption::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.http, Some(rule));
    }
}

//! The HTTP/JSON API, for `curl`, scripts and dashboards.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/status` | the server's status, self-preservation included |
//! | `GET /v1/services?namespace=` | services with instance counts |
//! | `GET /v1/services/{service}/instances?namespace=&group=` | instances of a service |
//! | `POST /v1/instances` | register (`{"service", "address", …, "ttl_ms"}` or `"persistent": true`) |
//! | `PUT /v1/services/{service}/instances/{id}/heartbeat?namespace=&group=` | renew a lease |
//! | `DELETE /v1/services/{service}/instances/{id}?namespace=&group=` | deregister |
//! | `PUT /v1/services/{service}/instances/{id}/enabled?namespace=&group=` | `{"enabled": false}` takes it out of traffic |
//! | `PUT /v1/services/{service}/protection?namespace=&group=` | `{"threshold": 0.5}` |
//! | `GET /metrics` | the server's metrics, OpenMetrics text (read access to every namespace) |
//! | `GET /healthz` | 200 while the process serves (liveness) |
//! | `GET /readyz` | 200 while it serves requests, 503 once shutdown began |
//!
//! Requests carry `Authorization: Bearer <token>` when the server has
//! tokens (see [`crate::auth`]): 401 without a token where one is needed
//! or with an unknown one, 403 when the token lacks the right for the
//! namespace (`?namespace=`, or `"namespace"` in a registration). A token
//! is checked before any body is read, and a caller that may not write
//! anywhere gets its 401 or 403 without the body being read. Bodies over
//! the limit get 413, requests that take too long 408. `GET /v1/status`
//! is open: counts and flags, no names.
//! Errors are `{"error": "…"}` with a fitting status code.

// The error of these helpers is the HTTP response itself, as is usual with axum.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Extension, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use lodestar::{Instance, InstanceKey, Registry, RegistryError, ServiceKey};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Server;
use crate::auth::{Access, Caller, Denied};
use crate::store::Check;

type Shared = State<Arc<Server>>;

/// The API's routes, behind [`guard`].
pub(crate) fn router(
    server: Arc<Server>,
    max_body: usize,
    request_timeout: Duration,
    metrics: crate::metrics::ServerMetrics,
) -> Router {
    let guard_state = Guard {
        server: server.clone(),
        max_body,
        request_timeout,
    };
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/services", get(services))
        .route("/v1/services/{service}/instances", get(instances))
        .route("/v1/instances", post(register))
        .route(
            "/v1/services/{service}/instances/{id}/heartbeat",
            put(heartbeat),
        )
        .route("/v1/services/{service}/instances/{id}", delete(deregister))
        .route(
            "/v1/services/{service}/instances/{id}/enabled",
            put(enabled),
        )
        .route("/v1/services/{service}/protection", put(protection))
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such API; see GET /v1/status, /v1/services",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "this API does not take that method; see the table in the registry's docs",
            )
        })
        .with_state(server)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(guard_state),
            guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            crate::metrics::record,
        ))
}

/// What [`guard`] needs.
struct Guard {
    server: Arc<Server>,
    max_body: usize,
    request_timeout: Duration,
}

/// Runs before any handler, so before any body is read: finds the caller
/// (401 for an unknown token), refuses writes from callers who may write
/// nowhere and bodies declared over the limit, and bounds the time the
/// whole request may take. Handlers then check the caller's right to the
/// namespace the request touches.
async fn guard(State(guard): State<Arc<Guard>>, mut request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let caller = match guard.server.auth.caller(authorization) {
        Ok(caller) => caller,
        Err(denied) => return refused(&denied),
    };
    if ![Method::GET, Method::HEAD].contains(request.method())
        && let Err(denied) = caller.may_write_somewhere()
    {
        return refused(&denied);
    }
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > guard.max_body as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {} bytes", guard.max_body),
        );
    }
    request.extensions_mut().insert(caller);
    match tokio::time::timeout(guard.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {:?} (its body too slow?)",
                guard.request_timeout
            ),
        ),
    }
}

/// A refusal: 401 when the caller is not known or gave no token, 403 when
/// its token lacks the right.
fn refused(denied: &Denied) -> Response {
    let code = if denied.unauthenticated() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    error(code, denied.to_string())
}

/// Whether `caller` may `access` `namespace` (absent: the default, as
/// [`Scope::key`] has it).
fn authorize(caller: &Caller, access: Access, namespace: Option<&str>) -> Result<(), Response> {
    let namespace = namespace.unwrap_or(lodestar::DEFAULT_NAMESPACE);
    caller
        .may(access, namespace)
        .map_err(|denied| refused(&denied))
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

fn registry_error(e: RegistryError) -> Response {
    match e {
        RegistryError::NotFound(_) | RegistryError::LeaseExpired(_) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        RegistryError::Invalid(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        RegistryError::Conflict(_) => error(StatusCode::CONFLICT, e.to_string()),
        RegistryError::Unauthorized(_) => error(StatusCode::UNAUTHORIZED, e.to_string()),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Query parameters, refused as the API's JSON error when malformed.
struct Params<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(e) => Err(error(
                StatusCode::BAD_REQUEST,
                format!("invalid query: {}", e.body_text()),
            )),
        }
    }
}

/// Path segments, refused as the API's JSON error when malformed.
struct Segments<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Segments<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(e) => Err(error(
                StatusCode::BAD_REQUEST,
                format!("invalid path: {}", e.body_text()),
            )),
        }
    }
}

/// A body that must be JSON of the given shape; a clear 400 otherwise
/// (413 when it is over the limit).
fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> Result<T, Response> {
    parsed.map(|Json(value)| value).map_err(|e| {
        let code = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        error(code, format!("invalid request body: {}", e.body_text()))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Scope {
    namespace: Option<String>,
    group: Option<String>,
}

impl Scope {
    fn key(&self, service: String) -> ServiceKey {
        let mut key = ServiceKey::new(service);
        if let Some(namespace) = &self.namespace {
            key.namespace.clone_from(namespace);
        }
        if let Some(group) = &self.group {
            key.group.clone_from(group);
        }
        key
    }
}

async fn status(State(server): Shared) -> Json<Value> {
    let s = crate::status(&server);
    Json(json!({
        "revision": s.revision,
        "services": s.services,
        "instances": s.instances,
        "ephemeral": s.ephemeral,
        "renewing": s.renewing,
        "self_preservation": s.self_preservation,
        "warming": s.warming,
        "uptime_ms": s.uptime_ms,
    }))
}

/// The metrics, for Prometheus. Service names show in them, so reading
/// them takes read access to every namespace (anonymous callers have it
/// with the default `open_reads`; a scraper may send a token).
async fn scrape(State(server): Shared, Extension(caller): Extension<Caller>) -> Response {
    if let Err(denied) = authorize(&caller, Access::Read, Some(crate::ALL_NAMESPACES)) {
        return denied;
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            lodestar::metrics::CONTENT_TYPE,
        )],
        server.metrics.encode(),
    )
        .into_response()
}

/// Liveness: the process answers.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: serving, and not shutting down.
async fn readyz(State(server): Shared) -> Response {
    let closing = *server.closing.borrow();
    let body = Json(json!({ "ready": !closing, "warming": server.warming() }));
    if closing {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else {
        body.into_response()
    }
}

async fn services(
    State(server): Shared,
    Extension(caller): Extension<Caller>,
    Params(scope): Params<Scope>,
) -> Response {
    if let Err(denied) = authorize(&caller, Access::Read, scope.namespace.as_deref()) {
        return denied;
    }
    let namespace = scope
        .namespace
        .unwrap_or_else(|| lodestar::DEFAULT_NAMESPACE.to_owned());
    match server.registry.services(&namespace).await {
        Ok(keys) => {
            let services: Vec<Value> = keys
                .into_iter()
                .map(|key| {
                    // Real health, whatever the protection threshold makes lookups say.
                    let (total, healthy) = server.registry.health(&key);
                    json!({
                        "namespace": key.namespace,
                        "group": key.group,
                        "service": key.service,
                        "instances": total,
                        "healthy": healthy,
                    })
                })
                .collect();
            Json(json!({ "services": services })).into_response()
        }
        Err(e) => registry_error(e),
    }
}

async fn instances(
    State(server): Shared,
    Extension(caller): Extension<Caller>,
    Segments(service): Segments<String>,
    Params(scope): Params<Scope>,
) -> Response {
    if let Err(denied) = authorize(&caller, Access::Read, scope.namespace.as_deref()) {
        return denied;
    }
    let key = scope.key(service);
    let (instances, protected) = server.registry.lookup(&key);
    Json(json!({
        "namespace": key.namespace,
        "group": key.group,
        "service": key.service,
        "protected": protected,
        "instances": instances,
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    service: String,
    address: String,
    id: Option<String>,
    namespace: Option<String>,
    group: Option<String>,
    version: Option<String>,
    protocol: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    weight: Option<u32>,
    zone: Option<String>,
    enabled: Option<bool>,
    ttl_ms: Option<u64>,
    #[serde(default)]
    persistent: bool,
    check: Option<Check>,
}

async fn register(
    State(server): Shared,
    Extension(caller): Extension<Caller>,
    parsed: Result<Json<Registration>, JsonRejection>,
) -> Response {
    let r = match body(parsed) {
        Ok(r) => r,
        Err(bad) => return bad,
    };
    if let Err(denied) = authorize(&caller, Access::Write, r.namespace.as_deref()) {
        return denied;
    }
    let scope = Scope {
        namespace: r.namespace,
        group: r.group,
    };
    let mut instance =
        Instance::new(r.service.clone(), r.address).with_service_key(scope.key(r.service));
    if let Some(id) = r.id {
        instance.id = id;
    }
    instance.version = r.version.unwrap_or_default();
    if let Some(protocol) = r.protocol {
        instance.protocol = protocol;
    }
    instance.metadata = r.metadata;
    instance.weight = r.weight.unwrap_or(100);
    instance.zone = r.zone.unwrap_or_default();
    instance.enabled = r.enabled.unwrap_or(true);
    let id = instance.id.clone();
    let registered =
        match crate::registration::Registration::new(instance, r.ttl_ms, r.persistent, r.check) {
            Ok(registration) => server.register(registration).await,
            Err(invalid) => Err(invalid),
        };
    match registered {
        Ok(()) => (
            StatusCode::CREATED,
            Json(json!({ "id": id, "revision": server.registry.revision() })),
        )
            .into_response(),
        Err(e) => registry_error(e),
    }
}

async fn heartbeat(
    State(server): Shared,
    Extension(caller): Extension<Caller>,
    Segments((service, id)): Segments<(String, String)>,
    Params(scope): Params<Scope>,
) -> Response {
    if let Err(denied) = authorize(&caller, Access::Write, scope.namespace.as_deref()) {
        return denied;
    }
    let key = InstanceKey {
        service: scope.key(service),
        id,
    };
    match server.registry.heartbeat(&key).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => registry_error(e),
    }
}

async fn deregister(
    State(server): Shared,
    Extension(caller): Extension<Caller>,
    Segments((service, id)): Segments<(String, String)>,
    Params(scope): Params<Scope>,
) -> Response {
    if let Err(denied) = authorize(&caller, Access::Write, scope.namespace.as_deref()) {
        return denied;
    }
    let key = InstanceKey {
        service: scope.key(service),
        id,
    };
    match server.deregister(&key).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => registry_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Enabled {
    enabled: bool,
}

async fn enabled(
    State(server): Shared,
    Extension(caller): Extension<Caller>,
    Segments((service, id)): Segments<(String, String)>,
    Params(scope): Params<Scope>,
    parsed: Result<Json<Enabled>, JsonRejection>,
) -> Response {
    if let Err(denied) = authorize(&caller, Access::Write, scope.namespace.as_deref()) {
        return denied;
    }
    let enabled = match body(parsed) {
        Ok(e) => e.enabled,
        Err(bad) => return bad,
    };
    let key = InstanceKey {
        service: scope.key(service),
        id,
    };
    match server.set_enabled(&key, enabled).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => registry_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Protection {
    threshold: f64,
}

async fn protection(
    State(server): Shared,
    Extension(caller): Extension<Caller>,
    Segments(service): Segments<String>,
    Params(scope): Params<Scope>,
    parsed: Result<Json<Protection>, JsonRejection>,
) -> Response {
    if let Err(denied) = authorize(&caller, Access::Write, scope.namespace.as_deref()) {
        return denied;
    }
    let threshold = match body(parsed) {
        Ok(p) => p.threshold,
        Err(bad) => return bad,
    };
    match server.set_protection(&scope.key(service), threshold).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => registry_error(e),
    }
}

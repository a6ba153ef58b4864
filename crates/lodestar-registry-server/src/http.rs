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
//!
//! Writes need `Authorization: Bearer <token>` when the server has a token.
//! Errors are `{"error": "…"}` with a fitting status code.

// The error of these helpers is the HTTP response itself, as is usual with axum.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use lodestar::{Instance, InstanceKey, Registry, RegistryError, ServiceKey};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Server;
use crate::store::Check;

type Shared = State<Arc<Server>>;

pub(crate) async fn serve(listener: tokio::net::TcpListener, server: Arc<Server>) {
    let app = Router::new()
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
        .with_state(server);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the registry HTTP API stopped");
    }
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

fn authorize(server: &Server, headers: &HeaderMap) -> Result<(), Response> {
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    if server.allows_write(given) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "writes to this registry need `Authorization: Bearer <token>` with its token",
        ))
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

/// A body that must be JSON of the given shape; a clear 400 otherwise.
fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> Result<T, Response> {
    parsed.map(|Json(value)| value).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {}", e.body_text()),
        )
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

async fn services(State(server): Shared, Params(scope): Params<Scope>) -> Response {
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
    Segments(service): Segments<String>,
    Params(scope): Params<Scope>,
) -> Response {
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
    headers: HeaderMap,
    parsed: Result<Json<Registration>, JsonRejection>,
) -> Response {
    if let Err(denied) = authorize(&server, &headers) {
        return denied;
    }
    let r = match body(parsed) {
        Ok(r) => r,
        Err(bad) => return bad,
    };
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
    headers: HeaderMap,
    Segments((service, id)): Segments<(String, String)>,
    Params(scope): Params<Scope>,
) -> Response {
    if let Err(denied) = authorize(&server, &headers) {
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
    headers: HeaderMap,
    Segments((service, id)): Segments<(String, String)>,
    Params(scope): Params<Scope>,
) -> Response {
    if let Err(denied) = authorize(&server, &headers) {
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
    headers: HeaderMap,
    Segments((service, id)): Segments<(String, String)>,
    Params(scope): Params<Scope>,
    parsed: Result<Json<Enabled>, JsonRejection>,
) -> Response {
    if let Err(denied) = authorize(&server, &headers) {
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
    headers: HeaderMap,
    Segments(service): Segments<String>,
    Params(scope): Params<Scope>,
    parsed: Result<Json<Protection>, JsonRejection>,
) -> Response {
    if let Err(denied) = authorize(&server, &headers) {
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

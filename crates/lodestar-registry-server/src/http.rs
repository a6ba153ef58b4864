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
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
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
    if let Err(e) = axum::serve(listener, router(server)).await {
        tracing::error!(error = %e, "the registry HTTP API stopped");
    }
}

/// The API's routes over `server`.
pub(crate) fn router(server: Arc<Server>) -> Router {
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
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such API; see GET /v1/status, /v1/services",
            )
        })
        .with_state(server)
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

async fn services(State(server): Shared, Query(scope): Query<Scope>) -> Response {
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
    Path(service): Path<String>,
    Query(scope): Query<Scope>,
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
    let key = instance.instance_key();
    if let Err(message) = server.check_kind(&key, r.persistent) {
        return error(StatusCode::CONFLICT, message);
    }
    let result = if r.persistent {
        let mut check = r.check.unwrap_or_default();
        if check.kind.is_empty() {
            check.kind = "none".to_owned();
        }
        if !["none", "tcp", "http", "grpc"].contains(&check.kind.as_str()) {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown check kind `{}` (expected none, tcp, http or grpc)",
                    check.kind
                ),
            );
        }
        server.register_persistent(instance, check)
    } else {
        match r.ttl_ms {
            Some(ttl) if ttl > 0 => {
                server
                    .registry
                    .register(instance, Duration::from_millis(ttl))
                    .await
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "an ephemeral instance needs \"ttl_ms\" > 0 (or \"persistent\": true)",
                );
            }
        }
    };
    match result {
        Ok(()) => (
            StatusCode::CREATED,
            Json(json!({ "id": key.id, "revision": server.registry.revision() })),
        )
            .into_response(),
        Err(e) => registry_error(e),
    }
}

async fn heartbeat(
    State(server): Shared,
    headers: HeaderMap,
    Path((service, id)): Path<(String, String)>,
    Query(scope): Query<Scope>,
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
    Path((service, id)): Path<(String, String)>,
    Query(scope): Query<Scope>,
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
    Path((service, id)): Path<(String, String)>,
    Query(scope): Query<Scope>,
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
    match server.registry.set_enabled(&key, enabled) {
        Ok(()) => {
            server.save();
            StatusCode::NO_CONTENT.into_response()
        }
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
    Path(service): Path<String>,
    Query(scope): Query<Scope>,
    parsed: Result<Json<Protection>, JsonRejection>,
) -> Response {
    if let Err(denied) = authorize(&server, &headers) {
        return denied;
    }
    let threshold = match body(parsed) {
        Ok(p) => p.threshold,
        Err(bad) => return bad,
    };
    if !(0.0..=1.0).contains(&threshold) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("\"threshold\" must be between 0 and 1, not {threshold}"),
        );
    }
    server
        .registry
        .set_protection_threshold(&scope.key(service), threshold);
    StatusCode::NO_CONTENT.into_response()
}

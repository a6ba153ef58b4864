//! The gRPC API (`lodestar.registry.v1.Registry`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{Stream, StreamExt};
use lodestar::{Registry, RegistryError, Request, Response, Status, WatchEvent};
use lodestar_registry::{from_pb, key_from_pb};

use crate::Server;
use crate::auth::{Access, Caller, Denied};
use crate::pb;
use crate::registration::Registration;
use crate::store::Check;

/// The API over the shared server state.
pub(crate) struct Api {
    server: Arc<Server>,
    /// The revision when warm-up ended (0 until then): a watcher resuming
    /// from before it gets a full snapshot.
    warmed_at: Arc<AtomicU64>,
}

impl Api {
    pub(crate) fn new(server: Arc<Server>) -> Self {
        Self {
            server,
            warmed_at: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Who sent `request`; an unknown token is refused here.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.server.auth.caller(given).map_err(|d| refused(&d))
    }

    /// The revision at which warm-up ended, noting it the first time it is asked after.
    fn warmed_revision(&self) -> Option<u64> {
        if self.server.warming() {
            return None;
        }
        let noted = self.warmed_at.load(Ordering::Acquire);
        if noted != 0 {
            return Some(noted);
        }
        let now = self.server.registry.revision().max(1);
        let _ = self
            .warmed_at
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        Some(self.warmed_at.load(Ordering::Acquire))
    }
}

/// A refusal: `UNAUTHENTICATED` when the caller is not known or gave no
/// token, `PERMISSION_DENIED` when its token lacks the right.
fn refused(denied: &Denied) -> Status {
    if denied.unauthenticated() {
        Status::unauthenticated(denied.to_string())
    } else {
        Status::permission_denied(denied.to_string())
    }
}

/// Whether `caller` may `access` the namespace of `service`.
fn authorize(
    caller: &Caller,
    access: Access,
    service: &lodestar::ServiceKey,
) -> Result<(), Status> {
    caller
        .may(access, &service.namespace)
        .map_err(|d| refused(&d))
}

fn status(error: RegistryError) -> Status {
    match error {
        RegistryError::NotFound(key) | RegistryError::LeaseExpired(key) => Status::not_found(
            format!("instance {key} is not registered (its lease may have expired)"),
        ),
        RegistryError::Invalid(message) => Status::invalid_argument(message),
        RegistryError::Conflict(message) => Status::failed_precondition(message),
        RegistryError::Unauthorized(message) => Status::unauthenticated(message),
        other => Status::unavailable(other.to_string()),
    }
}

fn key_of(reference: pb::InstanceRef) -> Result<lodestar::InstanceKey, Status> {
    let service = reference
        .service
        .ok_or_else(|| Status::invalid_argument("the instance reference has no service"))?;
    if reference.id.is_empty() {
        return Err(Status::invalid_argument(
            "the instance reference has an empty id",
        ));
    }
    Ok(lodestar::InstanceKey {
        service: key_from_pb(service),
        id: reference.id,
    })
}

fn service_of(service: Option<pb::ServiceKey>) -> Result<lodestar::ServiceKey, Status> {
    let service =
        service.ok_or_else(|| Status::invalid_argument("the request names no service"))?;
    if service.service.is_empty() {
        return Err(Status::invalid_argument("the service name is empty"));
    }
    Ok(key_from_pb(service))
}

/// The wire form of an instance, moving its strings rather than copying
/// them (what `lodestar_registry::to_pb` does from a reference).
fn into_pb(instance: lodestar::Instance) -> pb::Instance {
    let lodestar::Instance {
        id,
        key,
        version,
        address,
        protocol,
        metadata,
        weight,
        zone,
        healthy,
        enabled,
        ephemeral,
    } = instance;
    pb::Instance {
        id,
        service: Some(pb::ServiceKey {
            namespace: key.namespace,
            group: key.group,
            service: key.service,
        }),
        version,
        address,
        protocol,
        metadata: metadata.into_iter().collect(),
        weight: Some(weight),
        zone,
        healthy,
        enabled: Some(enabled),
        ephemeral,
    }
}

fn event_to_pb(event: WatchEvent, warming: bool) -> pb::WatchEvent {
    let (revision, kind) = match event {
        WatchEvent::Snapshot {
            revision,
            instances,
        } => (
            revision,
            pb::watch_event::Kind::Snapshot(pb::Snapshot {
                instances: instances.into_iter().map(into_pb).collect(),
                warming,
            }),
        ),
        WatchEvent::Put { revision, instance } => {
            (revision, pb::watch_event::Kind::Put(into_pb(instance)))
        }
        WatchEvent::Delete { revision, id } => (revision, pb::watch_event::Kind::Delete(id)),
    };
    pb::WatchEvent {
        revision,
        kind: Some(kind),
    }
}

/// The most bytes of events one `WatchResponse` carries: 1 MiB. Events
/// that are ready together travel together up to this, so that no
/// response nears the 4 MiB message limit of a gRPC peer (a service's
/// snapshot alone is at most 3 MiB, see `Limits::max_service_bytes`).
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// `events` in responses of at most [`MAX_BATCH_BYTES`] each (an event
/// larger than that travels alone).
fn batches(events: Vec<pb::WatchEvent>) -> Vec<pb::WatchResponse> {
    use lodestar::codegen::prost::Message as _;
    let mut responses = Vec::new();
    let mut current = pb::WatchResponse::default();
    let mut bytes = 0;
    for event in events {
        let size = event.encoded_len();
        if !current.events.is_empty() && bytes + size > MAX_BATCH_BYTES {
            responses.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.events.push(event);
    }
    if !current.events.is_empty() {
        responses.push(current);
    }
    responses
}

type WatchResponses = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;
type KeepAliveResponses = Pin<Box<dyn Stream<Item = Result<pb::KeepAliveResponse, Status>> + Send>>;

#[lodestar::async_trait]
impl pb::registry_server::Registry for Api {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let instance = request
            .instance
            .ok_or_else(|| Status::invalid_argument("the request has no instance"))?;
        let instance = from_pb(instance);
        authorize(&caller, Access::Write, &instance.key)?;
        let check = match request.check {
            None => None,
            some => Some(Check::from_pb(some).map_err(Status::invalid_argument)?),
        };
        let registration = Registration::new(
            instance,
            Some(u64::from(request.ttl_ms)),
            request.persistent,
            check,
        )
        .map_err(status)?;
        self.server.register(registration).await.map_err(status)?;
        Ok(Response::new(pb::RegisterResponse {
            revision: self.server.registry.revision(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::InstanceRef>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = self.caller(&request)?;
        let key = key_of(request.into_inner())?;
        authorize(&caller, Access::Write, &key.service)?;
        self.server.registry.heartbeat(&key).await.map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    type KeepAliveStream = KeepAliveResponses;

    async fn keep_alive(
        &self,
        request: Request<lodestar::codegen::tonic::Streaming<pb::InstanceRef>>,
    ) -> Result<Response<KeepAliveResponses>, Status> {
        let caller = self.caller(&request)?;
        // A stream only for callers who may renew something; each
        // heartbeat on it is then checked against its namespace.
        caller.may_write_somewhere().map_err(|d| refused(&d))?;
        let server = self.server.clone();
        let mut closing = self.server.closing.clone();
        let closing = async move {
            if closing.wait_for(|closing| *closing).await.is_err() {
                // The handle was dropped without a shutdown: the server
                // keeps serving (as a dropped RunningService does), and so
                // does the stream.
                std::future::pending::<()>().await;
            }
        };
        // The stream ends when shutdown begins: the client sends its next
        // heartbeats elsewhere (or as calls) instead of holding the drain up.
        let heartbeats = request.into_inner().take_until(closing);
        let answers = heartbeats.then(move |reference| {
            let server = server.clone();
            let caller = caller.clone();
            async move {
                // A failed heartbeat is an answer, not the end of the stream.
                let renewed = match key_of(reference?)
                    .and_then(|key| authorize(&caller, Access::Write, &key.service).map(|()| key))
                {
                    Ok(key) => server.registry.heartbeat(&key).await.map_err(status),
                    Err(invalid) => Err(invalid),
                };
                Ok(match renewed {
                    Ok(()) => pb::KeepAliveResponse::default(),
                    Err(status) => pb::KeepAliveResponse {
                        code: status.code() as u32,
                        message: status.message().to_owned(),
                    },
                })
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn deregister(
        &self,
        request: Request<pb::InstanceRef>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let caller = self.caller(&request)?;
        let key = key_of(request.into_inner())?;
        authorize(&caller, Access::Write, &key.service)?;
        self.server.deregister(&key).await.map_err(status)?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn get_instances(
        &self,
        request: Request<pb::GetInstancesRequest>,
    ) -> Result<Response<pb::GetInstancesResponse>, Status> {
        let caller = self.caller(&request)?;
        let service = service_of(request.into_inner().service)?;
        authorize(&caller, Access::Read, &service)?;
        let found = self.server.registry.lookup_with_revision(&service);
        Ok(Response::new(pb::GetInstancesResponse {
            instances: found.instances.into_iter().map(into_pb).collect(),
            revision: found.revision,
            protected: found.protected,
            warming: self.server.warming(),
        }))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let caller = self.caller(&request)?;
        let mut namespace = request.into_inner().namespace;
        if namespace.is_empty() {
            namespace = lodestar::DEFAULT_NAMESPACE.to_owned();
        }
        caller
            .may(Access::Read, &namespace)
            .map_err(|d| refused(&d))?;
        let registry = &self.server.registry;
        let mut services = Vec::new();
        for key in registry.services(&namespace).await.map_err(status)? {
            // Real health, whatever the protection threshold makes lookups say.
            let (total, healthy) = registry.health(&key);
            services.push(pb::ServiceSummary {
                service: Some(lodestar_registry::key_to_pb(&key)),
                instances: u32::try_from(total).unwrap_or(u32::MAX),
                healthy: u32::try_from(healthy).unwrap_or(u32::MAX),
            });
        }
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    type WatchStream = WatchResponses;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchResponses>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let service = service_of(request.service)?;
        authorize(&caller, Access::Read, &service)?;
        // One reading of the clock decides whether this watch is in warm-up.
        let warming = self.server.warming();
        // A watcher from before warm-up ended may hold instances that never
        // came back: it gets a full snapshot. (Clients whose view came from a
        // warming snapshot also ask for one.)
        let since = match (request.since, warming, self.warmed_revision()) {
            (0, _, _) | (_, true, _) => None,
            (since, false, Some(warmed)) if since < warmed => None,
            (since, _, _) => Some(since),
        };
        let events = self
            .server
            .registry
            .watch(&service, since)
            .await
            .map_err(status)?;
        let responses = events
            .ready_chunks(256)
            .map(move |chunk| {
                let mut events = Vec::with_capacity(chunk.len());
                for event in chunk {
                    match event {
                        Ok(event) => events.push(event_to_pb(event, warming)),
                        Err(e) => return vec![Err(status(e))],
                    }
                }
                batches(events).into_iter().map(Ok).collect()
            })
            .flat_map(futures_util::stream::iter);
        if warming {
            // When warm-up ends this stream ends; the watcher comes back and
            // gets a full snapshot.
            let ends = tokio::time::sleep_until(self.server.warmup_ends());
            return Ok(Response::new(Box::pin(responses.take_until(ends))));
        }
        Ok(Response::new(Box::pin(responses)))
    }

    async fn set_enabled(
        &self,
        request: Request<pb::SetEnabledRequest>,
    ) -> Result<Response<pb::SetEnabledResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let key = key_of(request.instance.unwrap_or_default())?;
        authorize(&caller, Access::Write, &key.service)?;
        self.server
            .set_enabled(&key, request.enabled)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetEnabledResponse {}))
    }

    async fn set_protection(
        &self,
        request: Request<pb::SetProtectionRequest>,
    ) -> Result<Response<pb::SetProtectionResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let service = service_of(request.service)?;
        authorize(&caller, Access::Write, &service)?;
        self.server
            .set_protection(&service, request.threshold)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetProtectionResponse {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(crate::status(&self.server)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_ready_together_are_sent_in_responses_well_under_the_message_limit() {
        use lodestar::codegen::prost::Message as _;
        let big = lodestar::Instance::new("svc", "10.0.0.1:80")
            .with_label("blob", "x".repeat(16 * 1024 - 8));
        let events: Vec<pb::WatchEvent> = (0..256u64)
            .map(|revision| {
                event_to_pb(
                    WatchEvent::Put {
                        revision,
                        instance: big.clone(),
                    },
                    false,
                )
            })
            .collect();
        let responses = batches(events);
        assert!(responses.len() > 1);
        assert_eq!(responses.iter().map(|r| r.events.len()).sum::<usize>(), 256);
        for response in &responses {
            assert!(
                response.encoded_len() <= MAX_BATCH_BYTES + 1024,
                "{}",
                response.encoded_len()
            );
        }
        let revisions: Vec<u64> = responses
            .iter()
            .flat_map(|r| r.events.iter().map(|e| e.revision))
            .collect();
        assert!(revisions.windows(2).all(|w| w[0] < w[1]), "out of order");
    }

    #[test]
    fn moving_an_instance_to_the_wire_gives_what_copying_does() {
        let mut instance = lodestar::Instance::new("orders", "10.0.0.7:8080")
            .with_service_key(
                lodestar::ServiceKey::new("orders")
                    .with_namespace("staging")
                    .with_group("shop"),
            )
            .with_id("orders-a")
            .with_version("1.2.3")
            .with_protocol("http")
            .with_zone("eu-west-1a")
            .with_weight(7)
            .with_label("canary", "true");
        instance.healthy = false;
        instance.ephemeral = false;
        assert_eq!(
            into_pb(instance.clone()),
            lodestar_registry::to_pb(&instance)
        );
    }
}

//! A started service: its address, health, lifecycle events, and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use lodestar_core::Instance;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::ServeError;
use super::lifecycle::{Announcer, Lifecycle, LifecycleEvents};
use super::policy::{Policy, PolicyError};
use super::registration::Registration;

/// A started service. Dropping it leaves the service running in the
/// background; call [`shutdown`](Self::shutdown) to stop it.
pub struct RunningService {
    pub(super) local_addr: SocketAddr,
    pub(super) instance: Instance,
    pub(super) health: HealthReporter,
    pub(super) names: Vec<&'static str>,
    pub(super) registration: Option<Registration>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) serve: tokio::task::JoinHandle<()>,
    pub(super) events: Arc<Announcer>,
    pub(super) subscribers_stop: watch::Sender<bool>,
    pub(super) subscriber_tasks: Vec<tokio::task::JoinHandle<()>>,
    pub(super) grace: Duration,
    pub(super) policy: Arc<ArcSwap<Policy>>,
    /// The fault injectors, following `policy`.
    pub(super) faults: Arc<super::stack::fault::Live>,
    /// The policy's limits, compiled (see `admission`).
    pub(super) admission: Arc<super::admission::Admission>,
    /// The admin endpoint, if it has one.
    pub(super) admin: Option<Admin>,
}

/// A running admin endpoint.
#[derive(Debug)]
pub(super) struct Admin {
    pub(super) address: SocketAddr,
    pub(super) stop: watch::Sender<bool>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for RunningService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningService")
            .field("local_addr", &self.local_addr)
            .field("instance", &self.instance.id)
            .finish_non_exhaustive()
    }
}

impl RunningService {
    /// The address of the [admin endpoint](crate::admin) (`/metrics`,
    /// `/healthz`, `/readyz`), if it has one
    /// ([`ServiceBuilder::admin_addr`](crate::ServiceBuilder::admin_addr)).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|admin| admin.address)
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The instance as registered.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The health reporter, to change what `grpc.health.v1.Health` reports.
    pub fn health(&self) -> &HealthReporter {
        &self.health
    }

    /// The lifecycle events: every step so far, then each new one.
    pub fn lifecycle(&self) -> LifecycleEvents {
        self.events.subscribe()
    }

    /// Replaces the server policy (see [`policy`](super::policy)): calls
    /// that start from now on follow the new one. A policy that is not
    /// valid is refused, naming the field, and the old one stays.
    pub fn set_policy(&self, policy: Policy) -> Result<(), PolicyError> {
        policy.validate()?;
        self.faults.follow(&policy);
        self.policy.store(Arc::new(policy));
        self.admission.update(&self.policy);
        Ok(())
    }

    /// The server policy in force.
    pub fn policy(&self) -> Policy {
        Policy::clone(&self.policy.load())
    }

    /// Shuts down gracefully; see the [module docs](crate::server) for the order.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let key = self.instance.key.clone();
        tracing::info!(service = %key, instance = %self.instance.id, "shutting down");
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for name in &self.names {
            self.health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        self.events.announce(Lifecycle::NotServing);
        if let Some(registration) = self.registration {
            // Stop heartbeating, and wait until a registration in flight is
            // over, so that it cannot land after the deregistration.
            registration.task.abort();
            let _ = registration.task.await;
            let instance_key = self.instance.instance_key();
            let deregister = registration.registry.deregister(&instance_key);
            match tokio::time::timeout(Duration::from_secs(5), deregister).await {
                Ok(Ok(())) => self.events.announce(Lifecycle::Deregistered),
                Ok(Err(e)) => {
                    tracing::warn!(service = %key, error = %e, "deregistration failed; the lease will expire instead")
                }
                Err(_) => {
                    tracing::warn!(service = %key, "deregistration timed out; the lease will expire instead")
                }
            }
        }
        // Stop taking events, finish the ones in hand, unsubscribe.
        let _ = self.subscribers_stop.send(true);
        let aborts: Vec<_> = self
            .subscriber_tasks
            .iter()
            .map(|t| t.abort_handle())
            .collect();
        let subscribers = futures_util::future::join_all(self.subscriber_tasks);
        if tokio::time::timeout(self.grace, subscribers).await.is_err() {
            tracing::warn!(service = %key, "event handlers still running at the end of the grace period; cut");
            for abort in aborts {
                abort.abort();
            }
        }
        let _ = self.stop.send(true);
        let served = self
            .serve
            .await
            .map_err(|e| ServeError::Task(e.to_string()));
        // Scraped until the last connection is drained.
        if let Some(admin) = &self.admin {
            let _ = admin.stop.send(true);
        }
        // The spans of the last calls, exported before the process exits.
        crate::telemetry::flush().await;
        served
    }

    /// Stops at once, as a crash would: no deregistration, no draining;
    /// connections are cut. The lease expires on its own. For tests and demos.
    pub async fn abort(self) {
        if let Some(registration) = &self.registration {
            registration.task.abort();
        }
        for task in &self.subscriber_tasks {
            task.abort();
        }
        self.serve.abort();
        let _ = self.serve.await;
    }
}

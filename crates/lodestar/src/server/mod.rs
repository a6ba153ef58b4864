//! Serving: the [`Service`] builder and the lifecycle it owns.
//!
//! A service **binds** (port 0 is allowed; the real port is what gets
//! registered), **serves** gRPC over HTTP/2 with `grpc.health.v1.Health`
//! and server reflection (v1 and v1alpha) added, **registers** with its
//! registry under a lease and **heartbeats** to keep it. On SIGINT or
//! SIGTERM (with [`ServiceBuilder::run`]) or on
//! [`RunningService::shutdown`], it stops in this order:
//!
//! 1. health turns `NOT_SERVING`;
//! 2. the instance is deregistered, so clients stop picking it;
//! 3. the listener closes and every connection is told to stop opening
//!    streams (HTTP/2 `GOAWAY`); calls and streams in flight go on;
//! 4. once they finish, or the grace period ends (then they are cut), the
//!    service exits.
//!
//! Each step is announced as a [`Lifecycle`] event.
//!
//! Every call goes through the server stack, outermost first: the
//! connection's unsent-byte budget ([`ConnectionLimits`]), the caller's
//! trace context, the status layer (every error becomes a gRPC status;
//! [`CallEnd`] reports each call's final one), admission (the
//! [`policy`]'s rate and concurrency limits), the layers added with
//! [`ServiceBuilder::layer`], the inbound deadline, the codec (JSON
//! transcoding, compression), the message size limits, and the routes.
//!
//! The modules: `builder` (the settings), `policy` (settings per method,
//! as data, replaceable while running), `admission` (the policy's rate and
//! concurrency limits), `observe` (what its layers decide), `start` (routes, stack, listener,
//! first registration), `stack` (the layers), `connection` (accepting and
//! serving connections), `budget`, `registration` (heartbeats),
//! `running` (the started service and its shutdown), `lifecycle`,
//! `signal`.

mod admission;
mod budget;
mod builder;
mod connection;
pub(crate) mod lifecycle;
pub mod observe;
pub mod policy;
mod registration;
mod running;
mod signal;
mod stack;
mod start;
pub(crate) mod web;

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response};
use lodestar_core::RegistryError;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::MessageLimits;

pub use builder::{Service, ServiceBuilder};
pub use connection::ConnectionLimits;
pub use lifecycle::{Lifecycle, LifecycleEvents};
pub use running::RunningService;
pub use signal::shutdown_signal;
pub use stack::{CallEnd, CallOutcome, Next, RequestBody, ResponseBody};
pub use web::{Asset, AssetError, Cors, WebProtocols, connect_code_name};

/// What `lodestar-build` generates for each server so that [`ServiceBuilder`]
/// can configure it and describe it through reflection.
pub trait ServiceDefinition: Sized {
    /// The encoded `FileDescriptorSet` that declares this service.
    fn file_descriptor_set() -> &'static [u8];
    /// Applies the message size limits.
    fn with_message_limits(self, limits: &MessageLimits) -> Self;
}

/// A tonic-compatible gRPC service that a server can route calls to:
/// what generated `…Server` types, `tonic-health` and `tonic-reflection` are.
pub trait GrpcRoute:
    tower_service::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcRoute for S where
    S: tower_service::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Errors that stop a service from starting or from shutting down cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot bind {address}: {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The admin endpoint's address could not be bound.
    #[error(
        "cannot bind the admin endpoint (/metrics, /healthz, /readyz) at {address}: {source}; \
         choose another with ServiceBuilder::admin_addr, or None for no admin endpoint"
    )]
    AdminBind {
        /// The address asked for ([`ServiceBuilder::admin_addr`](crate::ServiceBuilder::admin_addr)).
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The reflection descriptors could not be loaded.
    #[error("invalid file descriptor set for reflection: {0}")]
    Reflection(String),
    /// Two services with the same name were added (lodestar adds
    /// `grpc.health.v1.Health` and the reflection services itself).
    #[error("the service `{0}` is added twice (lodestar serves health and reflection itself)")]
    DuplicateService(&'static str),
    /// The registry refused the registration as invalid (a retry would not help).
    #[error("the registry refused to register {instance}: {source}")]
    Registration {
        /// The instance id.
        instance: String,
        /// What the registry said.
        source: RegistryError,
    },
    /// The serving task failed or panicked.
    #[error("the server task ended abnormally: {0}")]
    Task(String),
    /// A setting cannot work; the message names it, its value and what
    /// it must be.
    #[error("invalid setting: {0}")]
    Setting(String),
    /// A method's `google.api.http` rule cannot be served as a REST route
    /// (a template that does not parse, a field the request does not
    /// have, a verb and template that route twice); the message names the
    /// method, the template and what was expected.
    #[error("{0}; fix the rule, or turn REST off (WebProtocols::rest, [service.web] rest)")]
    RestRoute(String),
    /// A declared subscription could not be made.
    #[error("cannot subscribe to `{topic}`: {source}")]
    Subscribe {
        /// The topic.
        topic: String,
        /// What the broker said.
        source: crate::BrokerError,
    },
}

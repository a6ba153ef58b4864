//! The small, dependency-light heart of lodestar: the instance model, the
//! [`Registry`] trait every discovery backend implements, and
//! [`MemoryRegistry`], the in-process backend that needs no setup and doubles
//! as the test fixture.
//!
//! Most users depend on the `lodestar` facade crate, which re-exports
//! everything here.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use lodestar_core::{Instance, MemoryRegistry, Registry, ServiceKey};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), lodestar_core::RegistryError> {
//! let registry = MemoryRegistry::new();
//! let instance = Instance::new("greeter", "127.0.0.1:50051").with_version("1.2.0");
//! registry.register(instance, Duration::from_secs(10)).await?;
//!
//! let found = registry.instances(&ServiceKey::new("greeter")).await?;
//! assert_eq!(found.len(), 1);
//! assert_eq!(found[0].version, "1.2.0");
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backoff;
pub mod broker;
pub mod error;
mod instance;
pub mod registry;
pub mod sync;
pub mod task;

pub use broker::memory::MemoryBroker;
pub use broker::{Broker, BrokerError, Message};
pub use instance::{
    DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, InstanceKey, ServiceKey, parse_host_ports,
};
pub use registry::memory::{
    MemoryRegistry, MemoryRegistryBuilder, RegistryEvents, RegistryStats, SelfPreservation,
    ServiceHealth,
};
pub use registry::{Registry, RegistryError, Revision, StaticRegistry, WatchEvent, WatchStream};

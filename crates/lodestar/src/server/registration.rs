//! A service's registration. Keeping it (heartbeats, and registering again
//! when the registry has lost the instance) is
//! [`KeepRegistered`](lodestar_core::registry::KeepRegistered)'s work.

use std::sync::Arc;

use lodestar_core::Registry;

/// A service's registration: where, and the task that keeps it.
pub(super) struct Registration {
    pub(super) registry: Arc<dyn Registry>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

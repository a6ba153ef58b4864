//! A registration as both APIs take it: one set of defaults, one validation.

use std::time::Duration;

use lodestar::{Instance, RegistryError};

use crate::store::Check;

/// What an instance registers with: a lease, or a place among the
/// persistent instances with a health check.
pub(crate) enum Kind {
    /// Ephemeral, with a lease of this TTL.
    Lease(Duration),
    /// Persistent, checked by the registry.
    Persistent(Check),
}

/// A registration, checked.
pub(crate) struct Registration {
    pub(crate) instance: Instance,
    pub(crate) kind: Kind,
}

impl Registration {
    /// Checks what either API was sent. The instance itself (names, sizes,
    /// TTL bounds) is checked by the registry with its
    /// [`Limits`](lodestar::registry::Limits); here, how it registers:
    /// a persistent instance has a valid check and no TTL, an ephemeral one
    /// a TTL and no check. Health is the registry's to decide: every
    /// instance starts healthy, whatever it was sent with.
    pub(crate) fn new(
        mut instance: Instance,
        ttl_ms: Option<u64>,
        persistent: bool,
        check: Option<Check>,
    ) -> Result<Self, RegistryError> {
        let invalid = |why: String| {
            RegistryError::Invalid(format!(
                "instance {} of service {}: {why}",
                lodestar::registry::limits::quoted(&instance.id),
                lodestar::registry::limits::quoted(&instance.key.to_string())
            ))
        };
        instance.healthy = true;
        let ttl_ms = ttl_ms.filter(|ms| *ms > 0);
        let kind = if persistent {
            if ttl_ms.is_some() {
                return Err(invalid(
                    "a persistent instance has no lease; leave ttl_ms out".to_owned(),
                ));
            }
            let mut check = check.unwrap_or_default();
            if check.kind.is_empty() {
                check.kind = "none".to_owned();
            }
            check.validate().map_err(invalid)?;
            Kind::Persistent(check)
        } else {
            if check.is_some_and(|c| !c.kind.is_empty() && c.kind != "none") {
                return Err(invalid(
                    "only persistent instances are health-checked by the registry; an ephemeral \
                     one keeps its lease with heartbeats"
                        .to_owned(),
                ));
            }
            let Some(ttl_ms) = ttl_ms else {
                return Err(invalid(
                    "an ephemeral instance needs ttl_ms > 0 (or persistent: true)".to_owned(),
                ));
            };
            Kind::Lease(Duration::from_millis(ttl_ms))
        };
        Ok(Self { instance, kind })
    }
}

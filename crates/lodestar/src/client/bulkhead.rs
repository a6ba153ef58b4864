//! The bulkhead: a maximum of concurrent calls to one service
//! ([`Policy::bulkhead`](super::policy::Policy::bulkhead)), so that a
//! slow service cannot take every task, connection and buffer of its
//! callers (Envoy's `max_requests`, gRPC's A32).
//!
//! A call beyond the maximum fails at once with `RESOURCE_EXHAUSTED`,
//! naming the service and the maximum, and is never retried (the bulkhead
//! sits above the retry layer). A call holds its place from the moment it
//! is let through until its response ends (the last message of a stream
//! included), or until it is dropped, whichever comes first. The count is
//! shared by every clone of the client and survives
//! [`Client::set_policy`](crate::Client::set_policy): lowering the
//! maximum lets the calls in flight finish.
//!
//! ```
//! use lodestar::client::policy::Policy;
//!
//! let policy = Policy::from_toml("[bulkhead]\nmax_calls = 64")?;
//! assert_eq!(policy.bulkhead.map(|b| b.max_calls), Some(64));
//! let error = Policy::from_toml("[bulkhead]\nmax_calls = 0").unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "policy field `bulkhead.max_calls` is 0: expected 1 to 1000000",
//! );
//! # Ok::<(), lodestar::client::policy::PolicyError>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::policy_data::{PolicyError, in_range};

/// The largest [`BulkheadSettings::max_calls`]: 1,000,000.
pub const MAX_CALLS: u32 = 1_000_000;

/// A maximum of concurrent calls to a service (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BulkheadSettings {
    /// The most calls in flight at once (1 to [`MAX_CALLS`]). Default:
    /// 1,024 (Envoy's and gRPC's `max_requests`).
    pub max_calls: u32,
}

impl Default for BulkheadSettings {
    fn default() -> Self {
        Self { max_calls: 1_024 }
    }
}

impl BulkheadSettings {
    /// A bulkhead of `max_calls`.
    pub fn new(max_calls: u32) -> Self {
        Self { max_calls }
    }

    pub(crate) fn validate(&self, at: &str) -> Result<(), PolicyError> {
        in_range(
            &format!("{at}.max_calls"),
            self.max_calls.into(),
            1,
            MAX_CALLS.into(),
        )
    }
}

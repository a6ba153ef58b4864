//! Seeing what the server's policy layers decide: the [`Observer`] hook.
//!
//! A call refused by a rate limit, shed under load, or given an injected
//! fault is reported here, once, as a [`Decision`], so that metrics can
//! count it. How each call ended is [`CallEnd`](super::CallEnd)'s job.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use lodestar::server::observe::Decision;
//!
//! let decisions = Arc::new(AtomicUsize::new(0));
//! let counted = decisions.clone();
//! let builder = lodestar::Service::builder("greeter").observe(move |_: &Decision<'_>| {
//!     counted.fetch_add(1, Ordering::Relaxed);
//! });
//! ```

use std::sync::Arc;

/// Sees every decision the server's policy layers make. Closures
/// `Fn(&Decision<'_>)` are observers.
///
/// Called on the task of the call decided about: keep it short (count,
/// record, send to a channel).
pub trait Observer: Send + Sync + 'static {
    /// A policy layer decided something about a call.
    fn decided(&self, decision: &Decision<'_>);
}

impl<F> Observer for F
where
    F: Fn(&Decision<'_>) + Send + Sync + 'static,
{
    fn decided(&self, decision: &Decision<'_>) {
        self(decision);
    }
}

/// A decision a server policy layer made about a call.
#[derive(Debug)]
#[non_exhaustive]
pub struct Decision<'a> {
    /// The method, as `/package.Service/Method`.
    pub method: &'a str,
    /// What was decided.
    pub kind: DecisionKind,
}

/// What a server policy layer decided (see [`Decision`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecisionKind {
    /// A fault was injected into the call ([`fault`](crate::fault)): a
    /// delay, an abort (the handler did not run), or both.
    FaultInjected {
        /// The delay before the call went on, if any.
        delay: Option<std::time::Duration>,
        /// The code the call was answered with, if it was aborted.
        abort: Option<tonic::Code>,
    },
    /// Refused by its rate limit (`RESOURCE_EXHAUSTED`, with a pushback),
    /// before the handler ran.
    RateLimited {
        /// The caller's key (the value of the limit's metadata key), if
        /// the limit is per caller and the call had one (at most
        /// [`MAX_KEY_LEN`](super::policy::MAX_KEY_LEN) bytes).
        key: Option<String>,
        /// Until its bucket has a token again (the pushback).
        retry_after: std::time::Duration,
    },
    /// Shed: refused for want of room under its concurrency limit
    /// (`RESOURCE_EXHAUSTED`), before the handler ran.
    Shed {
        /// The limit at the time.
        limit: usize,
        /// Whether the limit is adaptive (else fixed).
        adaptive: bool,
    },
    /// An adaptive concurrency limit changed: reported with the first call
    /// it covers after the change.
    ConcurrencyLimit {
        /// The new limit.
        limit: usize,
    },
}

/// The observers of a server, in the order they were added.
#[derive(Clone, Default)]
pub(crate) struct Observers(Arc<[Arc<dyn Observer>]>);

impl Observers {
    /// These observers and `observer` after them.
    pub(crate) fn with(&self, observer: impl Observer) -> Self {
        let mut all = self.0.to_vec();
        all.push(Arc::new(observer));
        Self(all.into())
    }

    /// Whether there is none.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Tells every observer of `decision`.
    pub(crate) fn decided(&self, decision: &Decision<'_>) {
        for observer in self.0.iter() {
            observer.decided(decision);
        }
    }
}

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} observers", self.0.len())
    }
}

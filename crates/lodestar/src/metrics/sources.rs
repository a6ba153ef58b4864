//! [`Sources`]: the live things a collector reads at scrape time.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use lodestar_core::sync::MutexExt;

/// The things a collector reads when it is scraped (registry servers,
/// registry clients...), held weakly: one that is dropped leaves the
/// scrape with it, and registering another does not leak.
///
/// A collector is registered once per [`Metrics`](super::Metrics) (see
/// [`Metrics::set`](super::Metrics::set)) with a `Sources` of its own;
/// each thing that comes to life is added to it. Series of several live
/// sources with the same labels are the collector's to merge (a process
/// is one scrape target).
///
/// ```
/// use std::sync::Arc;
/// use lodestar::metrics::Sources;
///
/// let sources = Sources::default();
/// let server = Arc::new("a server");
/// sources.add(&server);
/// assert_eq!(sources.live().len(), 1);
/// drop(server);
/// assert!(sources.live().is_empty());
/// ```
pub struct Sources<T: ?Sized> {
    list: Arc<Mutex<Vec<Weak<T>>>>,
}

impl<T: ?Sized> Clone for Sources<T> {
    fn clone(&self) -> Self {
        Self {
            list: self.list.clone(),
        }
    }
}

impl<T: ?Sized> Default for Sources<T> {
    fn default() -> Self {
        Self {
            list: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl<T: ?Sized> fmt::Debug for Sources<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("live", &self.live().len())
            .finish()
    }
}

impl<T: ?Sized> Sources<T> {
    /// Adds `source`, for as long as it lives.
    pub fn add(&self, source: &Arc<T>) {
        let mut list = self.list.lock_unpoisoned();
        list.retain(|weak| weak.strong_count() > 0);
        list.push(Arc::downgrade(source));
    }

    /// The sources still alive, in the order they were added.
    pub fn live(&self) -> Vec<Arc<T>> {
        let mut list = self.list.lock_unpoisoned();
        list.retain(|weak| weak.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    }
}

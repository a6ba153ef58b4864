//! [`SnapshotRegistry`]: the last known instances of every service kept on
//! disk, so that a process that starts while its registry is unreachable
//! can still call.

mod file;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use lodestar::{
    Instance, InstanceKey, Registry, RegistryError, Revision, ServiceKey, WatchEvent, WatchStream,
};
use lodestar_core::backoff::Backoff;
use lodestar_core::sync::MutexExt;
use tokio::sync::Notify;

pub use file::MAX_SNAPSHOT_BYTES;

/// The least time between two writes of the snapshot: changes that come
/// faster are written together, at most once a second.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// While a watch is served from the snapshot, the first wait before asking
/// the registry again; it doubles after each failure up to
/// [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(100);

/// The longest wait between two attempts to reach the registry while a
/// watch is served from the snapshot (the resolver's own cap).
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The revision of a watch snapshot served from the file: the file keeps
/// none, and such a snapshot is always followed by the registry's own.
const STALE_REVISION: Revision = 0;

/// Why a snapshot file was not used, or could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The file (or the snapshot about to be written) is larger than the cap.
    #[error("the registry snapshot {path} is {bytes} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// The snapshot file.
        path: PathBuf,
        /// Its size, or the size it would have had.
        bytes: u64,
        /// [`MAX_SNAPSHOT_BYTES`].
        limit: u64,
    },
    /// The file could not be read or written.
    #[error("cannot {action} the registry snapshot {path}: {message}")]
    Io {
        /// The snapshot file.
        path: PathBuf,
        /// `read`, `encode` or `write`.
        action: &'static str,
        /// The system's reason.
        message: String,
    },
    /// The file is not valid JSON, or not in the snapshot's layout.
    #[error("the registry snapshot {path} is corrupt: {reason}")]
    Corrupt {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file is another program's, another format version's, or was
    /// saved from another registry.
    #[error("the registry snapshot {path} is not for this registry: {reason}")]
    Foreign {
        /// The snapshot file.
        path: PathBuf,
        /// Which of format, version or source did not match, and how.
        reason: String,
    },
}

/// A [`Registry`] that keeps the last known instances of every service it
/// looked up or watched in a file, and serves them when the registry it
/// wraps is unreachable, also to a process that has just started. See the
/// [crate docs](crate#a-snapshot-on-disk).
///
/// ```no_run
/// # fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use lodestar_registry::SnapshotRegistry;
///
/// let registry = SnapshotRegistry::from_url(
///     "lodestar://10.0.0.1:7070?snapshot=/var/lib/orders/registry.snapshot",
/// )?;
/// let client = lodestar::Client::new(registry.clone());
/// // Later: were the instances of `billing` last seen in the file, not the registry?
/// let stale = registry.is_stale(&lodestar::ServiceKey::new("billing"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SnapshotRegistry {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Arc<dyn Registry>,
    /// The registry's name, as snapshot files record it.
    source: String,
    path: PathBuf,
    state: Mutex<State>,
    /// Wakes the writer after a change.
    wake: Arc<Notify>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One write at a time, from reading the state to the rename, so an
    /// older snapshot never replaces a newer one.
    writing: Mutex<()>,
}

#[derive(Default)]
struct State {
    services: HashMap<ServiceKey, Known>,
    /// Counts changes to `services`; `saved` is the count the file holds.
    changes: u64,
    saved: u64,
    /// How many times the file was written.
    writes: u64,
    /// When the file read at start was saved.
    loaded_from: Option<SystemTime>,
}

/// What is known of one service.
#[derive(Default)]
struct Known {
    instances: BTreeMap<String, Instance>,
    /// Read from the file; the registry has not answered for it since.
    stale: bool,
    /// Whether serving it stale has been logged.
    told: bool,
}

impl std::fmt::Debug for SnapshotRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} (snapshot {})",
            self.shared.registry,
            self.shared.path.display()
        )
    }
}

impl SnapshotRegistry {
    /// Wraps `registry`, keeping its snapshot at `path` (a file; its
    /// directory is created when first written). `source` names the
    /// registry, and is recorded in the file: a file recorded for another
    /// source is not used. [`from_url`](Self::from_url) derives it from the
    /// registry URL.
    ///
    /// The file is read here, once: a missing file is no snapshot; a file
    /// larger than [`MAX_SNAPSHOT_BYTES`], corrupt, or not for this
    /// registry is ignored with a warning (and replaced at the next write).
    pub fn new(
        registry: Arc<dyn Registry>,
        source: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> Self {
        let source = source.into();
        let path = path.into();
        let mut state = State::default();
        match file::load(&path, &source) {
            Ok(None) => {}
            Ok(Some(loaded)) => {
                tracing::debug!(path = %path.display(), services = loaded.services.len(),
                    "read the registry snapshot");
                state.loaded_from = Some(loaded.saved_at);
                for entry in loaded.services {
                    let instances = entry
                        .instances
                        .into_iter()
                        .map(|i| (i.id.clone(), i))
                        .collect();
                    let known = Known {
                        instances,
                        stale: true,
                        told: false,
                    };
                    state.services.insert(entry.service, known);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "ignoring the registry snapshot; starting without one");
            }
        }
        Self {
            shared: Arc::new(Shared {
                registry,
                source,
                path,
                state: Mutex::new(state),
                wake: Arc::new(Notify::new()),
                writer: Mutex::new(None),
                writing: Mutex::new(()),
            }),
        }
    }

    /// The registry named by `url` (see [`from_url`](crate::from_url)),
    /// which must carry a `snapshot=PATH` parameter: the file this keeps.
    pub fn from_url(url: &str) -> Result<Self, crate::UrlError> {
        let (base, path) = crate::split_snapshot(url)?;
        let Some(path) = path else {
            return Err(crate::UrlError::new(
                url,
                "it has no snapshot=PATH parameter",
            ));
        };
        let registry = crate::open(&base, url)?;
        Ok(Self::new(registry, crate::registry_name(&base), path))
    }

    /// The snapshot file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Whether the instances of `service` this registry serves came from the
    /// snapshot file and the registry has not answered for the service
    /// since. False for a service it knows nothing of.
    pub fn is_stale(&self, service: &ServiceKey) -> bool {
        let state = self.shared.lock();
        state.services.get(service).is_some_and(|k| k.stale)
    }

    /// Writes the snapshot now, if anything changed since it was last
    /// written (call it at shutdown; the last handle's drop does it too).
    /// The writing runs on a blocking thread.
    pub async fn save(&self) -> Result<(), SnapshotError> {
        let shared = self.shared.clone();
        let path = shared.path.clone();
        tokio::task::spawn_blocking(move || shared.write())
            .await
            .unwrap_or_else(|e| {
                Err(SnapshotError::Io {
                    path,
                    action: "write",
                    message: format!("the writing thread failed: {e}"),
                })
            })
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock_unpoisoned()
    }

    /// Takes in the registry's full answer for `service`.
    fn replace(self: &Arc<Self>, service: &ServiceKey, instances: &[Instance]) {
        let fresh: BTreeMap<String, Instance> = instances
            .iter()
            .map(|i| (i.id.clone(), i.clone()))
            .collect();
        let mut state = self.lock();
        let known = state.services.entry(service.clone()).or_default();
        if known.stale {
            known.stale = false;
            known.told = false;
            tracing::info!(%service, instances = fresh.len(),
                "the registry answered; its instances replace the snapshot's");
        }
        if known.instances != fresh {
            known.instances = fresh;
            self.changed(state);
        }
    }

    /// Takes in one watch event for `service`.
    fn apply(self: &Arc<Self>, service: &ServiceKey, event: &WatchEvent) {
        match event {
            WatchEvent::Snapshot { instances, .. } => self.replace(service, instances),
            WatchEvent::Put { instance, .. } => {
                let mut state = self.lock();
                let known = state.services.entry(service.clone()).or_default();
                if known.instances.get(&instance.id) != Some(instance) {
                    known
                        .instances
                        .insert(instance.id.clone(), instance.clone());
                    self.changed(state);
                }
            }
            WatchEvent::Delete { id, .. } => {
                let mut state = self.lock();
                let known = state.services.entry(service.clone()).or_default();
                if known.instances.remove(id).is_some() {
                    self.changed(state);
                }
            }
        }
    }

    /// Counts a change and makes sure the writer will write it.
    fn changed(self: &Arc<Self>, mut state: std::sync::MutexGuard<'_, State>) {
        state.changes += 1;
        drop(state);
        let mut writer = self.writer.lock_unpoisoned();
        // Started on first change, and again if its runtime went away.
        if writer.as_ref().is_none_or(|w| w.is_finished())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            *writer =
                Some(runtime.spawn(write_when_changed(Arc::downgrade(self), self.wake.clone())));
        }
        self.wake.notify_one();
    }

    /// The last known instances of `service`, when there are any, saying
    /// so in the log when they came from the file.
    fn last_known(&self, service: &ServiceKey, reason: &str) -> Option<Vec<Instance>> {
        let mut state = self.lock();
        let saved_at = state.loaded_from;
        let known = state.services.get_mut(service)?;
        if known.stale && !known.told {
            known.told = true;
            let age = saved_at
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .map_or_else(
                    || "an unknown time".to_owned(),
                    |d| format!("{}s", d.as_secs()),
                );
            tracing::warn!(%service, instances = known.instances.len(), path = %self.path.display(),
                %reason, "the registry is unreachable; serving the instances of the snapshot \
                 saved {age} ago, stale until the registry answers");
        }
        Some(known.instances.values().cloned().collect())
    }

    /// `stream`, with each event taken in on the way.
    fn follow(self: &Arc<Self>, service: ServiceKey, stream: WatchStream) -> WatchStream {
        let this = self.clone();
        Box::pin(stream.map(move |event| {
            if let Ok(event) = &event {
                this.apply(&service, event);
            }
            event
        }))
    }

    /// Watches `service` from the start once the registry can be reached,
    /// trying again with backoff while it cannot.
    async fn reconnect(self: Arc<Self>, service: ServiceKey) -> WatchStream {
        let mut backoff = Backoff::new(RECONNECT_FIRST, RECONNECT_MAX);
        loop {
            let waited = backoff.next_wait();
            tokio::time::sleep(waited).await;
            match self.registry.watch(&service, None).await {
                Ok(stream) => return self.follow(service, stream),
                Err(RegistryError::Unavailable(reason)) => {
                    tracing::debug!(%service, %reason, backoff = ?waited, "the registry is still unreachable");
                }
                Err(error) => return Box::pin(futures_util::stream::iter([Err(error)])),
            }
        }
    }

    /// Writes what changed since the last write, if anything did. Blocks.
    fn write(&self) -> Result<(), SnapshotError> {
        let _writing = self.writing.lock_unpoisoned();
        let (changes, services) = {
            let state = self.lock();
            if state.changes == state.saved {
                return Ok(());
            }
            let services: Vec<file::Service> = state
                .services
                .iter()
                .filter(|(_, known)| !known.instances.is_empty())
                .map(|(service, known)| file::Service {
                    service: service.clone(),
                    instances: known.instances.values().cloned().collect(),
                })
                .collect();
            (state.changes, services)
        };
        let bytes = file::encode(&self.path, &self.source, services)?;
        file::replace(&self.path, &bytes)?;
        let mut state = self.lock();
        state.saved = state.saved.max(changes);
        state.writes += 1;
        tracing::debug!(path = %self.path.display(), writes = state.writes, "saved the registry snapshot");
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(writer) = self
            .writer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            writer.abort();
        }
        // The last handle is gone (the process is shutting down): what
        // changed since the last write is written here, once.
        if let Err(error) = self.write() {
            tracing::warn!(%error, "the registry snapshot was not saved at shutdown");
        }
    }
}

/// The writer: writes after each change, then waits [`MIN_WRITE_INTERVAL`]
/// before it writes again. Ends with the registry.
async fn write_when_changed(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let written = tokio::task::spawn_blocking(move || strong.write()).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "the registry snapshot was not saved"),
            Err(error) => tracing::warn!(%error, "the registry snapshot writer failed"),
        }
        tokio::time::sleep(MIN_WRITE_INTERVAL).await;
    }
}

#[async_trait::async_trait]
impl Registry for SnapshotRegistry {
    async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), RegistryError> {
        self.shared.registry.register(instance, ttl).await
    }

    async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        self.shared.registry.heartbeat(key).await
    }

    async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        self.shared.registry.deregister(key).await
    }

    async fn instances(&self, service: &ServiceKey) -> Result<Vec<Instance>, RegistryError> {
        match self.shared.registry.instances(service).await {
            Ok(instances) => {
                self.shared.replace(service, &instances);
                Ok(instances)
            }
            Err(RegistryError::Unavailable(reason)) => self
                .shared
                .last_known(service, &reason)
                .ok_or(RegistryError::Unavailable(reason)),
            Err(error) => Err(error),
        }
    }

    async fn services(&self, namespace: &str) -> Result<Vec<ServiceKey>, RegistryError> {
        self.shared.registry.services(namespace).await
    }

    /// Watches through the wrapped registry. When it is unreachable and the
    /// watcher starts from nothing (`since: None`), the stream opens with a
    /// snapshot of the last known instances (revision 0), then follows the
    /// registry's own watch, from its snapshot on, once it can be reached.
    async fn watch(
        &self,
        service: &ServiceKey,
        since: Option<Revision>,
    ) -> Result<WatchStream, RegistryError> {
        match self.shared.registry.watch(service, since).await {
            Ok(stream) => Ok(self.shared.follow(service.clone(), stream)),
            Err(RegistryError::Unavailable(reason)) if since.is_none() => {
                let Some(instances) = self.shared.last_known(service, &reason) else {
                    return Err(RegistryError::Unavailable(reason));
                };
                let first = futures_util::stream::iter([Ok(WatchEvent::Snapshot {
                    revision: STALE_REVISION,
                    instances,
                })]);
                let live =
                    futures_util::stream::once(self.shared.clone().reconnect(service.clone()))
                        .flatten();
                Ok(Box::pin(first.chain(live)))
            }
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::file::tests::Scratch;
    use super::*;
    use lodestar::MemoryRegistry;

    const SOURCE: &str = "lodestar://127.0.0.1:7070";

    fn writes(registry: &SnapshotRegistry) -> u64 {
        registry.shared.lock().writes
    }

    /// The ids of `service` in the file at `path`.
    fn ids_in_file(path: &Path, service: &ServiceKey) -> Vec<String> {
        let loaded = file::load(path, SOURCE).unwrap().unwrap();
        let entry = loaded.services.into_iter().find(|s| &s.service == service);
        let mut ids: Vec<String> = entry
            .map(|s| s.instances.into_iter().map(|i| i.id).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    fn ids(instances: &[Instance]) -> Vec<&str> {
        let mut ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        ids.sort_unstable();
        ids
    }

    /// A snapshot at `path` holding `orders` at the ids given.
    fn saved(path: &Path, ids: &[&str]) {
        let orders = ServiceKey::new("orders");
        let instances = ids
            .iter()
            .map(|id| {
                Instance::new("orders", format!("127.0.0.1:{}", 1000 + id.len())).with_id(*id)
            })
            .collect();
        let services = vec![file::Service {
            service: orders,
            instances,
        }];
        file::replace(path, &file::encode(path, SOURCE, services).unwrap()).unwrap();
    }

    /// Waits (in paused time: without moving the clock while a write runs)
    /// until the file has been written `n` times.
    async fn written(registry: &SnapshotRegistry, n: u64) {
        for _ in 0..1000 {
            if writes(registry) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{} writes, expected {n}", writes(registry));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_written_at_most_once_a_second_and_at_drop() {
        let scratch = Scratch::new("throttle");
        let path = scratch.0.join("registry.snapshot");
        let memory = MemoryRegistry::new();
        let registry = SnapshotRegistry::new(Arc::new(memory.clone()), SOURCE, &path);
        let orders = ServiceKey::new("orders");
        let ttl = Duration::from_secs(600);
        let add = |id: &str| {
            memory.register(
                Instance::new("orders", format!("127.0.0.1:{}", 1000 + id.len())).with_id(id),
                ttl,
            )
        };

        // The first change is written at once.
        add("a").await.unwrap();
        registry.instances(&orders).await.unwrap();
        written(&registry, 1).await;
        assert_eq!(ids_in_file(&path, &orders), ["a"]);

        // A burst of changes within the next second: not written yet...
        for id in ["bb", "ccc", "dddd"] {
            add(id).await.unwrap();
            registry.instances(&orders).await.unwrap();
        }
        tokio::time::sleep(MIN_WRITE_INTERVAL / 2).await;
        assert_eq!(writes(&registry), 1);
        assert_eq!(ids_in_file(&path, &orders), ["a"]);
        // ...then written together, once.
        written(&registry, 2).await;
        assert_eq!(ids_in_file(&path, &orders), ["a", "bb", "ccc", "dddd"]);

        // Lookups that change nothing write nothing.
        for _ in 0..5 {
            registry.instances(&orders).await.unwrap();
            tokio::time::sleep(MIN_WRITE_INTERVAL).await;
        }
        assert_eq!(writes(&registry), 2);

        // A change still waiting for its turn is written when the registry is dropped.
        tokio::time::sleep(MIN_WRITE_INTERVAL * 2).await;
        add("eeeee").await.unwrap();
        registry.instances(&orders).await.unwrap();
        written(&registry, 3).await;
        memory.deregister(&orders_key("a")).await.unwrap();
        registry.instances(&orders).await.unwrap();
        assert_eq!(writes(&registry), 3);
        drop(registry);
        assert_eq!(ids_in_file(&path, &orders), ["bb", "ccc", "dddd", "eeeee"]);
    }

    fn orders_key(id: &str) -> InstanceKey {
        InstanceKey {
            service: ServiceKey::new("orders"),
            id: id.to_owned(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_registry_s_answer_replaces_the_stale_view() {
        let scratch = Scratch::new("replace");
        let path = scratch.0.join("registry.snapshot");
        saved(&path, &["old-1", "old-2"]);
        let memory = MemoryRegistry::new();
        memory
            .register(
                Instance::new("orders", "127.0.0.1:2000").with_id("new"),
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        let orders = ServiceKey::new("orders");
        let registry = SnapshotRegistry::new(Arc::new(memory), SOURCE, &path);
        assert!(registry.is_stale(&orders));
        assert!(!registry.is_stale(&ServiceKey::new("unknown")));
        // A registry that answers is used, not the file.
        let mut watch = registry.watch(&orders, None).await.unwrap();
        match watch.next().await.unwrap().unwrap() {
            WatchEvent::Snapshot { instances, .. } => assert_eq!(ids(&instances), ["new"]),
            other => panic!("expected a snapshot, got {other:?}"),
        }
        assert!(!registry.is_stale(&orders));
        written(&registry, 1).await;
        assert_eq!(ids_in_file(&path, &orders), ["new"]);
    }

    /// The address of a port nothing listens on.
    /// A loopback address nothing listens on, held (bound, never
    /// listening) while the socket lives: a port merely freed could be
    /// taken meanwhile by a server of a test running beside this one.
    fn closed_port() -> (tokio::net::TcpSocket, String) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = socket.local_addr().unwrap().to_string();
        (socket, address)
    }

    async fn bounded<F: std::future::Future>(
        future: F,
    ) -> Result<F::Output, tokio::time::error::Elapsed> {
        tokio::time::timeout(Duration::from_secs(10), future).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_registry_is_served_from_the_snapshot() {
        let scratch = Scratch::new("unreachable");
        let path = scratch.0.join("registry.snapshot");
        saved(&path, &["a", "b"]);
        let (_held, closed) = closed_port();
        let remote = Arc::new(crate::RemoteRegistry::new(&[closed]));
        let registry = SnapshotRegistry::new(remote.clone(), SOURCE, &path);
        let orders = ServiceKey::new("orders");

        let looked_up = bounded(registry.instances(&orders)).await.unwrap().unwrap();
        assert_eq!(ids(&looked_up), ["a", "b"]);
        assert!(registry.is_stale(&orders));
        let mut watch = bounded(registry.watch(&orders, None))
            .await
            .unwrap()
            .unwrap();
        match bounded(watch.next()).await {
            Ok(Some(Ok(WatchEvent::Snapshot {
                revision,
                instances,
            }))) => {
                assert_eq!(revision, STALE_REVISION);
                assert_eq!(ids(&instances), ["a", "b"]);
            }
            other => panic!("expected the stale snapshot, got {other:?}"),
        }
        // Nothing more until the registry answers.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), watch.next())
                .await
                .is_err()
        );
        assert!(registry.is_stale(&orders));
        // A watcher resuming from a revision has its own view: it gets the error.
        let resumed = bounded(registry.watch(&orders, Some(7))).await.unwrap();
        assert!(matches!(resumed, Err(RegistryError::Unavailable(_))));
        // A service the snapshot does not hold fails as it would without one.
        let unknown = bounded(registry.instances(&ServiceKey::new("unknown")))
            .await
            .unwrap();
        assert!(matches!(unknown, Err(RegistryError::Unavailable(_))));

        // The same file, for another registry: ignored.
        let other = SnapshotRegistry::new(remote, "lodestar://10.9.9.9:7070", &path);
        assert!(!other.is_stale(&orders));
        let looked_up = bounded(other.instances(&orders)).await.unwrap();
        assert!(matches!(looked_up, Err(RegistryError::Unavailable(_))));
    }

    #[test]
    fn snapshot_urls_are_checked_and_name_their_registry() {
        let registry = SnapshotRegistry::from_url(
            "lodestar://127.0.0.1:7071,127.0.0.1:7070?token=s3cret&snapshot=/tmp/my%20dir/registry.snapshot",
        )
        .unwrap();
        assert_eq!(registry.path(), Path::new("/tmp/my dir/registry.snapshot"));
        assert_eq!(
            registry.shared.source,
            "lodestar://127.0.0.1:7070,127.0.0.1:7071"
        );
        assert!(crate::from_url("lodestar://h:1?snapshot=/tmp/x.snapshot").is_ok());
        for (bad, says) in [
            ("lodestar://h:1", "no snapshot=PATH parameter"),
            ("lodestar://h:1?snapshot=", "needs the path of a file"),
            ("lodestar://h:1?snapshot=/a&snapshot=/b", "more than once"),
            ("memory://?snapshot=/a", "ends with its process"),
            (
                "lodestar://h:1?snapshot=/a&tok=x",
                "unknown parameter `tok`",
            ),
        ] {
            let error = SnapshotRegistry::from_url(bad)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
        assert_eq!(
            crate::registry_name("etcd://b:2379,a:2379?user=u&password=p&prefix=/apps/"),
            "etcd://a:2379,b:2379?prefix=/apps"
        );
    }
}

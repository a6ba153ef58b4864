//! What the registry keeps on disk: persistent instances with their health
//! checks, and operators' choices (instances taken out of traffic,
//! protection thresholds), so that a restart forgets none of them.
//!
//! # Durability
//!
//! A write is acknowledged only once it is on disk. Each change is one
//! record appended to `registry.log` and `fsync`ed, so a write costs what
//! the change costs, not what the whole state does. When the log has grown
//! past [`COMPACT_AT`] bytes and twice the last snapshot, the whole state is
//! written to `registry.snapshot` (a temporary file, `fsync`, a rename, an
//! `fsync` of the directory) and the log starts again empty. Writes are
//! made one at a time, in the order they are applied to memory, on
//! Tokio's blocking threads: heartbeats and reads never wait for the disk.
//!
//! A write that fails (a full disk, an I/O error, a read-only file system)
//! is undone on disk (the log is cut back to its last whole record), not
//! applied in memory, and answered with an error.
//!
//! # Format
//!
//! Both files are a sequence of records: a little-endian `u32` length, a
//! little-endian `u32` CRC-32 of the body, and the body, a JSON object.
//! Loading stops at a torn record at the end of the log (a crash in the
//! middle of a write, never acknowledged) and cuts it off; a damaged record
//! anywhere else is an error that names the file and the offset, since
//! acknowledged writes follow it. Records are whole states, not deltas, so
//! replaying the log over a snapshot that already holds some of it (a crash
//! between the two steps of a compaction) gives the same state.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use lodestar::{Instance, InstanceKey, MemoryRegistry, RegistryError, ServiceKey};
use serde::{Deserialize, Serialize};

use crate::pb;

/// The log is compacted into a snapshot once it is past this many bytes
/// (and past twice the last snapshot): 4 MiB.
pub(crate) const COMPACT_AT: u64 = 4 * 1024 * 1024;
/// The largest record accepted when loading: 1 MiB. A registration is far
/// smaller (see [`lodestar::registry::Limits`]); a larger length is damage.
const MAX_RECORD: u32 = 1024 * 1024;

const LOG: &str = "registry.log";
const SNAPSHOT: &str = "registry.snapshot";
/// The one-file format of earlier versions, read once and replaced.
const LEGACY: &str = "persistent-instances.json";

/// How a persistent instance is checked (the JSON form of [`pb::HealthCheck`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Check {
    /// `none`, `tcp`, `http` or `grpc`.
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) target: String,
    #[serde(default)]
    pub(crate) interval_ms: u32,
}

impl Check {
    /// The check a gRPC registration asks for; an unknown kind is an error.
    pub(crate) fn from_pb(check: Option<pb::HealthCheck>) -> Result<Self, String> {
        let check = check.unwrap_or_default();
        let kind = match pb::health_check::Kind::try_from(check.kind) {
            Ok(pb::health_check::Kind::None) => "none",
            Ok(pb::health_check::Kind::Tcp) => "tcp",
            Ok(pb::health_check::Kind::Http) => "http",
            Ok(pb::health_check::Kind::Grpc) => "grpc",
            Err(_) => {
                return Err(format!(
                    "unknown check kind {} (expected NONE, TCP, HTTP or GRPC)",
                    check.kind
                ));
            }
        };
        Ok(Self {
            kind: kind.to_owned(),
            target: check.target,
            interval_ms: check.interval_ms,
        })
    }
}

/// One change, as the log keeps it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    /// A persistent instance, as it now is.
    Put {
        instance: Instance,
        #[serde(default)]
        check: Check,
    },
    /// A persistent instance left.
    Delete { key: InstanceKey },
    /// An operator took an instance out of traffic, or put it back.
    Enabled { key: InstanceKey, enabled: bool },
    /// A service's protection threshold.
    Protection { service: ServiceKey, threshold: f64 },
}

/// Everything the files hold, replayed.
#[derive(Default)]
struct Replayed {
    instances: HashMap<InstanceKey, (Instance, Check)>,
    disabled: HashSet<InstanceKey>,
    protection: HashMap<ServiceKey, f64>,
}

impl Replayed {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Put { instance, check } => {
                self.instances
                    .insert(instance.instance_key(), (instance, check));
            }
            Record::Delete { key } => {
                self.instances.remove(&key);
            }
            Record::Enabled { key, enabled } => {
                if enabled {
                    self.disabled.remove(&key);
                } else {
                    self.disabled.insert(key);
                }
            }
            Record::Protection { service, threshold } => {
                self.protection.insert(service, threshold);
            }
        }
    }
}

/// The open log.
struct Log {
    file: File,
    dir: PathBuf,
    /// Its length after the last whole record.
    len: u64,
    /// The size of the last snapshot.
    snapshot: u64,
}

/// Where persistent state is kept, and how each persistent instance is checked.
pub(crate) struct Store {
    /// `None` when the registry keeps nothing on disk. The lock orders
    /// durable writes: one at a time, each applied to memory before the
    /// next begins, so the disk and memory agree on the order.
    log: tokio::sync::Mutex<Option<Log>>,
    on_disk: bool,
    /// The checks of persistent instances, which the checker runs.
    pub(crate) checks: crate::checks::Checks,
}

/// Whether the next write may go ahead: a guard on the ordered log.
pub(crate) struct WriteGate<'a>(tokio::sync::MutexGuard<'a, Option<Log>>);

fn unavailable(what: &str, e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(format!(
        "cannot save {what} to the registry's data directory: {e}; nothing was changed"
    ))
}

impl Store {
    /// Opens the data directory (`None`: keep nothing on disk) and loads
    /// what it holds into `registry`; returns the store and how many
    /// persistent instances came back.
    pub(crate) fn open(
        dir: Option<PathBuf>,
        registry: &MemoryRegistry,
    ) -> Result<(Self, usize), String> {
        let Some(dir) = dir else {
            let store = Self {
                log: tokio::sync::Mutex::new(None),
                on_disk: false,
                checks: crate::checks::Checks::default(),
            };
            return Ok((store, 0));
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut replayed = Replayed::default();
        let snapshot_path = dir.join(SNAPSHOT);
        let snapshot = match File::open(&snapshot_path) {
            Ok(mut file) => read_records(&mut file, &snapshot_path, false, &mut replayed)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(format!("cannot read {}: {e}", snapshot_path.display())),
        };
        let legacy = dir.join(LEGACY);
        let migrate = legacy.exists();
        if migrate {
            read_legacy(&legacy, &mut replayed)?;
        }
        let log_path = dir.join(LOG);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let len = read_records(&mut file, &log_path, true, &mut replayed)?;
        let cut = |e: std::io::Error| format!("cannot write {}: {e}", log_path.display());
        // A torn record at the end was never acknowledged: cut it off.
        file.set_len(len).map_err(cut)?;
        file.seek(SeekFrom::Start(len)).map_err(cut)?;
        sync_dir(&dir).map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;

        let restored = replayed.instances.len();
        for key in &replayed.disabled {
            registry.remember_disabled(key.clone());
        }
        for (service, threshold) in &replayed.protection {
            registry.set_protection_threshold(service, *threshold);
        }
        let checks = crate::checks::Checks::default();
        for (key, (instance, check)) in replayed.instances {
            registry
                .register_persistent(instance)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            checks.remember(key, check);
        }
        let store = Self {
            log: tokio::sync::Mutex::new(Some(Log {
                file,
                dir: dir.clone(),
                len,
                snapshot,
            })),
            on_disk: true,
            checks,
        };
        if migrate {
            let mut log = store.log.try_lock().map_err(|e| e.to_string())?;
            if let Some(log) = log.as_mut() {
                let state = store.state(registry);
                log.compact(&state)
                    .map_err(|e| format!("cannot write {}: {e}", snapshot_path.display()))?;
            }
            std::fs::remove_file(&legacy)
                .and_then(|()| sync_dir(&dir))
                .map_err(|e| format!("cannot remove {}: {e}", legacy.display()))?;
            tracing::info!(from = %legacy.display(), "persistent instances moved to the log format");
        }
        Ok((store, restored))
    }

    /// Waits for the turn to write. Hold it from the check of a write to
    /// its application in memory.
    pub(crate) async fn gate(&self) -> WriteGate<'_> {
        WriteGate(self.log.lock().await)
    }

    /// Appends a persistent instance (registered or changed) durably.
    pub(crate) async fn put(
        &self,
        gate: &mut WriteGate<'_>,
        instance: &Instance,
        check: &Check,
    ) -> Result<(), RegistryError> {
        let record = Record::Put {
            instance: instance.clone(),
            check: check.clone(),
        };
        self.append(gate, &record, "the registration").await
    }

    /// Appends the removal of a persistent instance durably.
    pub(crate) async fn delete(
        &self,
        gate: &mut WriteGate<'_>,
        key: &InstanceKey,
    ) -> Result<(), RegistryError> {
        let record = Record::Delete { key: key.clone() };
        self.append(gate, &record, "the deregistration").await
    }

    /// Appends an operator's enabling or disabling of an instance durably.
    pub(crate) async fn enabled(
        &self,
        gate: &mut WriteGate<'_>,
        key: &InstanceKey,
        enabled: bool,
    ) -> Result<(), RegistryError> {
        let record = Record::Enabled {
            key: key.clone(),
            enabled,
        };
        self.append(gate, &record, "the change of `enabled`").await
    }

    /// Appends a service's protection threshold durably.
    pub(crate) async fn protection(
        &self,
        gate: &mut WriteGate<'_>,
        service: &ServiceKey,
        threshold: f64,
    ) -> Result<(), RegistryError> {
        let record = Record::Protection {
            service: service.clone(),
            threshold,
        };
        self.append(gate, &record, "the protection threshold").await
    }

    async fn append(
        &self,
        gate: &mut WriteGate<'_>,
        record: &Record,
        what: &str,
    ) -> Result<(), RegistryError> {
        if !self.on_disk {
            return Ok(());
        }
        let body = serde_json::to_vec(record).map_err(|e| unavailable(what, e))?;
        let Some(mut log) = gate.0.take() else {
            return Err(unavailable(
                what,
                "the log was lost after an earlier failure",
            ));
        };
        let (log, written) = tokio::task::spawn_blocking(move || {
            let written = log.append(&body);
            (log, written)
        })
        .await
        .map_err(|e| unavailable(what, e))?;
        *gate.0 = Some(log);
        written.map_err(|e| unavailable(what, e))
    }

    /// Compacts the log into a snapshot if it has grown enough. A failure
    /// is logged: the log still holds everything.
    pub(crate) async fn maybe_compact(&self, gate: &mut WriteGate<'_>, registry: &MemoryRegistry) {
        let due = gate
            .0
            .as_ref()
            .is_some_and(|log| log.len > COMPACT_AT && log.len > 2 * log.snapshot);
        if !due {
            return;
        }
        let state = self.state(registry);
        let Some(mut log) = gate.0.take() else {
            return;
        };
        let joined = tokio::task::spawn_blocking(move || {
            let compacted = log.compact(&state);
            (log, compacted)
        })
        .await;
        match joined {
            Ok((log, compacted)) => {
                if let Err(e) = compacted {
                    tracing::error!(error = %e, "cannot compact the registry log; it keeps growing");
                }
                *gate.0 = Some(log);
            }
            Err(e) => tracing::error!(error = %e, "the registry log was lost while compacting"),
        }
    }

    /// Every record the current state needs.
    fn state(&self, registry: &MemoryRegistry) -> Vec<Record> {
        let checks = self.checks.all();
        let mut records: Vec<Record> = registry
            .persistent_instances()
            .into_iter()
            .map(|instance| {
                let check = checks
                    .get(&instance.instance_key())
                    .cloned()
                    .unwrap_or_default();
                Record::Put { instance, check }
            })
            .collect();
        records.extend(registry.disabled().into_iter().map(|key| Record::Enabled {
            key,
            enabled: false,
        }));
        records.extend(
            registry
                .protection_thresholds()
                .into_iter()
                .map(|(service, threshold)| Record::Protection { service, threshold }),
        );
        records
    }

    pub(crate) fn remember(&self, key: InstanceKey, check: Check) {
        self.checks.remember(key, check);
    }

    /// The check of a persistent instance.
    pub(crate) fn check(&self, key: &InstanceKey) -> Option<Check> {
        self.checks.get(key)
    }

    pub(crate) fn forget(&self, key: &InstanceKey) {
        self.checks.forget(key);
    }
}

impl Log {
    /// Appends one record and makes it durable; on failure, cuts the file
    /// back to its last whole record.
    fn append(&mut self, body: &[u8]) -> std::io::Result<()> {
        let frame = frame(body)?;
        let written = self
            .file
            .write_all(&frame)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Undo whatever part reached the file; if even that fails,
                // the next load cuts a torn record at the end off.
                let _ = self.file.set_len(self.len);
                let _ = self.file.seek(SeekFrom::Start(self.len));
                let _ = self.file.sync_data();
                Err(e)
            }
        }
    }

    /// Writes `state` as the snapshot, then empties the log.
    fn compact(&mut self, state: &[Record]) -> std::io::Result<()> {
        let temporary = self.dir.join(format!("{SNAPSHOT}.tmp"));
        let mut bytes = 0u64;
        {
            let mut file = std::io::BufWriter::new(File::create(&temporary)?);
            for record in state {
                let body = serde_json::to_vec(record).map_err(std::io::Error::other)?;
                let frame = frame(&body)?;
                file.write_all(&frame)?;
                bytes += frame.len() as u64;
            }
            file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        std::fs::rename(&temporary, self.dir.join(SNAPSHOT))?;
        sync_dir(&self.dir)?;
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.sync_all()?;
        self.len = 0;
        self.snapshot = bytes;
        Ok(())
    }
}

/// A record's bytes: length, CRC-32, body.
fn frame(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len <= MAX_RECORD)
        .ok_or_else(|| std::io::Error::other(format!("a record of {} bytes", body.len())))?;
    let mut frame = Vec::with_capacity(body.len() + 8);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    frame.extend_from_slice(body);
    Ok(frame)
}

/// Replays the records of `file` into `into`; returns the length of its
/// whole records. With `torn_tail_ok`, a damaged record at the very end is
/// left out (and reported); otherwise, and anywhere else, it is an error.
fn read_records(
    file: &mut File,
    path: &Path,
    torn_tail_ok: bool,
    into: &mut Replayed,
) -> Result<u64, String> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut at = 0usize;
    while at < bytes.len() {
        match parse_record(&bytes[at..]) {
            Ok((record, used)) => {
                into.apply(record);
                at += used;
            }
            Err(why) => {
                let damaged = format!("{} is damaged at byte {at}: {why}", path.display());
                let whole_tail_torn = torn_tail_ok && tail_is_torn(&bytes[at..]);
                if !whole_tail_torn {
                    return Err(damaged);
                }
                tracing::warn!(
                    "{damaged}; it is the end of the log, a write cut short and never \
                     acknowledged, and is dropped"
                );
                break;
            }
        }
    }
    Ok(at as u64)
}

/// Whether damage at the start of `rest` can only be a write cut short: the
/// record it starts claims to run past the end of the file.
fn tail_is_torn(rest: &[u8]) -> bool {
    let Some(len) = rest
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    else {
        return true;
    };
    (len as usize).saturating_add(8) >= rest.len()
}

fn parse_record(bytes: &[u8]) -> Result<(Record, usize), String> {
    let header = bytes.get(..8).ok_or("the record header is cut short")?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return Err(format!(
            "a record claims {len} bytes (at most {MAX_RECORD})"
        ));
    }
    let end = 8 + len as usize;
    let body = bytes.get(8..end).ok_or("the record is cut short")?;
    if crc32fast::hash(body) != crc {
        return Err("the record's checksum does not match".to_owned());
    }
    let record =
        serde_json::from_slice(body).map_err(|e| format!("the record is not valid: {e}"))?;
    Ok((record, end))
}

/// The format of earlier versions: one JSON array of instances with checks.
fn read_legacy(path: &Path, into: &mut Replayed) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Saved {
        instance: Instance,
        #[serde(default)]
        check: Check,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let saved: Vec<Saved> =
        serde_json::from_str(&text).map_err(|e| format!("{} is not valid: {e}", path.display()))?;
    for Saved { instance, check } in saved {
        into.apply(Record::Put { instance, check });
    }
    Ok(())
}

/// Makes a rename or a new file in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "lodestar-store-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn key(id: &str) -> InstanceKey {
        Instance::new("db", "10.0.0.1:5432")
            .with_id(id)
            .instance_key()
    }

    #[tokio::test]
    async fn every_kind_of_record_survives_a_restart_and_compaction() {
        let dir = temp_dir("restart");
        let registry = MemoryRegistry::new();
        let (store, _) = Store::open(Some(dir.clone()), &registry).unwrap();
        let db = Instance::new("db", "10.0.0.1:5432").with_id("a");
        let check = Check {
            kind: "tcp".into(),
            ..Check::default()
        };
        let mut gate = store.gate().await;
        store.put(&mut gate, &db, &check).await.unwrap();
        store
            .put(&mut gate, &db.clone().with_id("b"), &check)
            .await
            .unwrap();
        store.delete(&mut gate, &key("b")).await.unwrap();
        store.enabled(&mut gate, &key("eph"), false).await.unwrap();
        let service = ServiceKey::new("db");
        store.protection(&mut gate, &service, 0.5).await.unwrap();
        drop(gate);

        let reopened = MemoryRegistry::new();
        let (store, restored) = Store::open(Some(dir.clone()), &reopened).unwrap();
        assert_eq!(restored, 1);
        assert_eq!(store.check(&key("a")), Some(check.clone()));
        assert_eq!(store.checks.all().len(), 1);
        assert_eq!(reopened.disabled(), vec![key("eph")]);
        assert_eq!(
            reopened.protection_thresholds(),
            vec![(service.clone(), 0.5)]
        );

        // Compacted, the same state comes back from the snapshot alone.
        let mut gate = store.gate().await;
        let state = store.state(&reopened);
        gate.0.as_mut().unwrap().compact(&state).unwrap();
        drop(gate);
        assert_eq!(std::fs::metadata(dir.join(LOG)).unwrap().len(), 0);
        let again = MemoryRegistry::new();
        let (_, restored) = Store::open(Some(dir.clone()), &again).unwrap();
        assert_eq!(restored, 1);
        assert_eq!(again.disabled(), vec![key("eph")]);
        assert_eq!(again.protection_thresholds(), vec![(service, 0.5)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_torn_tail_is_dropped_but_damage_before_acknowledged_records_is_an_error() {
        let dir = temp_dir("torn");
        let registry = MemoryRegistry::new();
        let (store, _) = Store::open(Some(dir.clone()), &registry).unwrap();
        let mut gate = store.gate().await;
        for id in ["a", "b"] {
            let instance = Instance::new("db", "10.0.0.1:5432").with_id(id);
            store
                .put(&mut gate, &instance, &Check::default())
                .await
                .unwrap();
        }
        drop(gate);
        drop(store);
        let log = dir.join(LOG);
        let whole = std::fs::read(&log).unwrap();
        // A write cut short at the end: dropped, the rest loads.
        std::fs::write(&log, &whole[..whole.len() - 5]).unwrap();
        let (_, restored) = Store::open(Some(dir.clone()), &MemoryRegistry::new()).unwrap();
        assert_eq!(restored, 1);
        // Damage in the first record, with a whole one after it: refused.
        let mut damaged = whole.clone();
        damaged[12] ^= 0xff;
        std::fs::write(&log, &damaged).unwrap();
        let error = Store::open(Some(dir.clone()), &MemoryRegistry::new())
            .err()
            .unwrap();
        assert!(error.contains("damaged at byte 0"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_legacy_file_is_read_once_and_replaced() {
        let dir = temp_dir("legacy");
        std::fs::create_dir_all(&dir).unwrap();
        let legacy = r#"[{"instance": {"id": "a", "namespace": "default", "group": "default",
            "service": "db", "version": "", "address": "10.0.0.1:5432", "protocol": "tcp",
            "metadata": {}, "weight": 100, "zone": "", "healthy": true, "enabled": true,
            "ephemeral": false}, "check": {"kind": "tcp"}}]"#;
        std::fs::write(dir.join(LEGACY), legacy).unwrap();
        let (_, restored) = Store::open(Some(dir.clone()), &MemoryRegistry::new()).unwrap();
        assert_eq!(restored, 1);
        assert!(!dir.join(LEGACY).exists());
        let (_, restored) = Store::open(Some(dir.clone()), &MemoryRegistry::new()).unwrap();
        assert_eq!(restored, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

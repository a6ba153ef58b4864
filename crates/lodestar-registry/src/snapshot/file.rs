//! The snapshot file: its format, reading it with a size cap, and
//! replacing it atomically.
//!
//! One JSON document:
//!
//! ```json
//! {"format": "lodestar-registry-snapshot", "version": 1,
//!  "source": "lodestar://10.0.0.1:7070", "saved_at_unix_ms": 1700000000000,
//!  "services": [{"service": {"namespace": "default", "group": "default",
//!                "service": "orders"}, "instances": [ … ]}]}
//! ```
//!
//! `format` tells our file from another program's, `version` this layout
//! from a later one, and `source` names the registry the instances came
//! from; a reader uses the file only when all three are what it expects.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lodestar::{Instance, ServiceKey};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// What the `format` field of every snapshot says.
pub(crate) const FORMAT: &str = "lodestar-registry-snapshot";

/// The layout this build writes and reads.
pub(crate) const VERSION: u32 = 1;

/// The largest snapshot file read or written: 4 MiB, some ten thousand
/// instances. A larger file is not read (it is ignored with a warning);
/// a snapshot that would be larger is not written (the file keeps its
/// previous contents, and the save reports [`SnapshotError::TooLarge`]).
pub const MAX_SNAPSHOT_BYTES: u64 = 4 * 1024 * 1024;

/// The instances of one service, as the file holds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Service {
    pub(crate) service: ServiceKey,
    pub(crate) instances: Vec<Instance>,
}

/// What a reader checks before it trusts the rest.
#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    format: String,
    #[serde(default)]
    version: u32,
    #[serde(default)]
    source: String,
}

/// The whole file.
#[derive(Serialize, Deserialize)]
struct Document {
    format: String,
    version: u32,
    source: String,
    saved_at_unix_ms: u64,
    services: Vec<Service>,
}

/// A snapshot read back: when it was saved, and what it holds.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) saved_at: SystemTime,
    pub(crate) services: Vec<Service>,
}

/// Reads the snapshot at `path`, written for the registry `source`.
/// `Ok(None)`: there is no file. Any other trouble is an error that says
/// why the file cannot be used.
pub(crate) fn load(path: &Path, source: &str) -> Result<Option<Loaded>, SnapshotError> {
    let io = |error: std::io::Error| SnapshotError::Io {
        path: path.to_owned(),
        action: "read",
        message: error.to_string(),
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let too_large = |bytes| SnapshotError::TooLarge {
        path: path.to_owned(),
        bytes,
        limit: MAX_SNAPSHOT_BYTES,
    };
    let length = file.metadata().map_err(io)?.len();
    if length > MAX_SNAPSHOT_BYTES {
        return Err(too_large(length));
    }
    // The file may grow between the check and the read: read one byte past
    // the cap at most.
    let mut bytes = Vec::new();
    file.take(MAX_SNAPSHOT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SNAPSHOT_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let header: Header = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let foreign = |reason: String| SnapshotError::Foreign {
        path: path.to_owned(),
        reason,
    };
    if header.format != FORMAT {
        return Err(foreign(format!(
            "it is not a registry snapshot (its format is `{}`, expected `{FORMAT}`)",
            header.format
        )));
    }
    if header.version != VERSION {
        return Err(foreign(format!(
            "it has format version {}; this build reads version {VERSION}",
            header.version
        )));
    }
    if header.source != source {
        return Err(foreign(format!(
            "it was saved from the registry `{}`, not `{source}`",
            header.source
        )));
    }
    let document: Document = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    for entry in &document.services {
        if let Some(stray) = entry.instances.iter().find(|i| i.key != entry.service) {
            return Err(corrupt(format!(
                "instance `{}` of service {} is listed under service {}",
                stray.id, stray.key, entry.service
            )));
        }
    }
    Ok(Some(Loaded {
        saved_at: UNIX_EPOCH + Duration::from_millis(document.saved_at_unix_ms),
        services: document.services,
    }))
}

/// The snapshot of `services`, from the registry `source`, as the bytes
/// of a file; refused when larger than [`MAX_SNAPSHOT_BYTES`].
pub(crate) fn encode(
    path: &Path,
    source: &str,
    services: Vec<Service>,
) -> Result<Vec<u8>, SnapshotError> {
    let saved_at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let document = Document {
        format: FORMAT.to_owned(),
        version: VERSION,
        source: source.to_owned(),
        saved_at_unix_ms,
        services,
    };
    let bytes = serde_json::to_vec(&document).map_err(|e| SnapshotError::Io {
        path: path.to_owned(),
        action: "encode",
        message: e.to_string(),
    })?;
    if bytes.len() as u64 > MAX_SNAPSHOT_BYTES {
        return Err(SnapshotError::TooLarge {
            path: path.to_owned(),
            bytes: bytes.len() as u64,
            limit: MAX_SNAPSHOT_BYTES,
        });
    }
    Ok(bytes)
}

/// Replaces the file at `path` with `bytes`, so that a reader (or a crash)
/// sees the old file or the new one, never a mix: the bytes go to a
/// temporary file beside it, are flushed to disk, renamed over `path`, and
/// the directory is flushed so the rename survives a power loss.
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    /// Tells apart the temporary files of saves running at once.
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map_or_else(
        || "snapshot".into(),
        |name| name.to_string_lossy().into_owned(),
    );
    let temporary = directory.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SAVES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(&directory)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        sync_directory(&directory)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        SnapshotError::Io {
            path: path.to_owned(),
            action: "write",
            message: e.to_string(),
        }
    })
}

/// Flushes a directory's entries (a rename in it) to disk.
#[cfg(unix)]
fn sync_directory(directory: &Path) -> std::io::Result<()> {
    std::fs::File::open(directory)?.sync_all()
}

/// Directories cannot be opened as files here; the rename is left to the
/// file system.
#[cfg(not(unix))]
fn sync_directory(_directory: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A fresh directory for one test, removed when dropped.
    pub(crate) struct Scratch(pub(crate) PathBuf);

    impl Scratch {
        pub(crate) fn new(name: &str) -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "lodestar-snapshot-{name}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn orders() -> Vec<Service> {
        let key = ServiceKey::new("orders").with_namespace("prod");
        vec![Service {
            service: key.clone(),
            instances: vec![
                Instance::new("orders", "10.0.0.1:80")
                    .with_service_key(key)
                    .with_label("canary", "true"),
            ],
        }]
    }

    #[test]
    fn a_snapshot_reads_back_as_written_and_leaves_no_temporary_file() {
        let scratch = Scratch::new("roundtrip");
        // The directory does not exist yet: the first write makes it.
        let path = scratch.0.join("nested").join("registry.snapshot");
        let source = "lodestar://127.0.0.1:7070";
        assert!(load(&path, source).unwrap().is_none());
        replace(&path, &encode(&path, source, orders()).unwrap()).unwrap();
        let loaded = load(&path, source).unwrap().unwrap();
        assert_eq!(loaded.services, orders());
        assert!(loaded.saved_at.elapsed().unwrap() < Duration::from_secs(60));
        // A second write replaces the first.
        replace(&path, &encode(&path, source, Vec::new()).unwrap()).unwrap();
        assert!(load(&path, source).unwrap().unwrap().services.is_empty());
        let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["registry.snapshot"]);
    }

    #[test]
    fn unusable_files_are_refused_with_the_reason() {
        let scratch = Scratch::new("unusable");
        std::fs::create_dir_all(&scratch.0).unwrap();
        let path = scratch.0.join("registry.snapshot");
        let source = "lodestar://127.0.0.1:7070";
        let valid = String::from_utf8(encode(&path, source, orders()).unwrap()).unwrap();
        let cases: Vec<(String, &str)> = vec![
            ("\u{0}\u{1}garbage".into(), "is corrupt"),
            (valid[..valid.len() / 2].into(), "is corrupt"),
            (
                r#"{"name": "another program's file"}"#.into(),
                "is not a registry snapshot",
            ),
            (
                valid.replace(r#""version":1"#, r#""version":2"#),
                "format version 2; this build reads version 1",
            ),
            (
                valid.replace("lodestar://127.0.0.1:7070", "lodestar://10.9.9.9:7070"),
                "saved from the registry `lodestar://10.9.9.9:7070`, not `lodestar://127.0.0.1:7070`",
            ),
            (
                // The service's key comes first, its instance's after.
                valid.replacen(r#""namespace":"prod""#, r#""namespace":"staging""#, 1),
                "is listed under service",
            ),
            (
                " ".repeat(usize::try_from(MAX_SNAPSHOT_BYTES).unwrap() + 1),
                "more than the limit of 4194304 bytes",
            ),
        ];
        for (contents, says) in cases {
            std::fs::write(&path, &contents).unwrap();
            let error = load(&path, source).unwrap_err().to_string();
            assert!(
                error.contains(says) && error.contains("registry.snapshot"),
                "{says}: {error}"
            );
        }
        // A directory where the file should be is an error too, not a panic.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(load(&path, source).is_err());
    }

    #[test]
    fn a_snapshot_past_the_cap_is_not_written() {
        let path = PathBuf::from("registry.snapshot");
        let key = ServiceKey::new("big");
        let instances = (0..20_000)
            .map(|n| {
                Instance::new("big", format!("10.0.{}.{}:80", n / 256, n % 256))
                    .with_service_key(key.clone())
            })
            .collect();
        let services = vec![Service {
            service: key.clone(),
            instances,
        }];
        match encode(&path, "lodestar://h:1", services) {
            Err(SnapshotError::TooLarge { bytes, limit, .. }) => {
                assert!(bytes > limit && limit == MAX_SNAPSHOT_BYTES);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
}

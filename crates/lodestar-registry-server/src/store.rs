//! Persistent instances on disk: one JSON file, replaced atomically.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use lodestar::{Instance, InstanceKey, MemoryRegistry};
use serde::{Deserialize, Serialize};

use crate::pb;

/// How a persistent instance is checked (the JSON form of [`pb::HealthCheck`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Check {
    /// `none`, `tcp`, `http` or `grpc`.
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) target: String,
    #[serde(default)]
    pub(crate) interval_ms: u32,
}

impl Check {
    pub(crate) fn from_pb(check: Option<pb::HealthCheck>) -> Self {
        let check = check.unwrap_or_default();
        let kind = match pb::health_check::Kind::try_from(check.kind) {
            Ok(pb::health_check::Kind::Tcp) => "tcp",
            Ok(pb::health_check::Kind::Http) => "http",
            Ok(pb::health_check::Kind::Grpc) => "grpc",
            _ => "none",
        };
        Self {
            kind: kind.to_owned(),
            target: check.target,
            interval_ms: check.interval_ms,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    instance: Instance,
    #[serde(default)]
    check: Check,
}

/// Where persistent instances are kept, and how each is checked.
pub(crate) struct Store {
    path: Option<PathBuf>,
    checks: Mutex<HashMap<InstanceKey, Check>>,
    /// One save at a time, from reading the instances to the rename, so an
    /// older save can never replace a newer one.
    saving: Mutex<()>,
}

impl Store {
    pub(crate) fn open(dir: Option<PathBuf>) -> Result<Self, String> {
        let path = match dir {
            None => None,
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                Some(dir.join("persistent-instances.json"))
            }
        };
        Ok(Self {
            path,
            checks: Mutex::new(HashMap::new()),
            saving: Mutex::new(()),
        })
    }

    /// Registers the saved instances; returns how many.
    pub(crate) fn load(&self, registry: &MemoryRegistry) -> Result<usize, String> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let saved: Vec<Saved> = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not valid: {e}", path.display()))?;
        let count = saved.len();
        for entry in saved {
            self.remember(entry.instance.instance_key(), entry.check);
            registry
                .register_persistent(entry.instance)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(count)
    }

    pub(crate) fn remember(&self, key: InstanceKey, check: Check) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, check);
    }

    pub(crate) fn forget(&self, key: &InstanceKey) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    pub(crate) fn checks(&self) -> Vec<(InstanceKey, Check)> {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks.iter().map(|(k, c)| (k.clone(), c.clone())).collect()
    }

    /// Writes every persistent instance: to a temporary file, then renamed
    /// over the old one, so a crash never leaves half a file.
    pub(crate) fn save(&self, registry: &MemoryRegistry) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _saving = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let saved: Vec<Saved> = registry
            .persistent_instances()
            .into_iter()
            .map(|instance| {
                let check = checks
                    .get(&instance.instance_key())
                    .cloned()
                    .unwrap_or_default();
                Saved { instance, check }
            })
            .collect();
        let text = serde_json::to_string_pretty(&saved).map_err(|e| e.to_string())?;
        let temporary = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()
        };
        write().map_err(|e| format!("cannot write {}: {e}", temporary.display()))?;
        std::fs::rename(&temporary, path)
            .map_err(|e| format!("cannot replace {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_from_many_threads_never_lose_a_registration() {
        let dir = std::env::temp_dir().join(format!("lodestar-store-test-{}", std::process::id()));
        let store = std::sync::Arc::new(Store::open(Some(dir.clone())).unwrap());
        let registry = MemoryRegistry::new();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                let registry = registry.clone();
                std::thread::spawn(move || {
                    for n in 0..25 {
                        let instance = Instance::new("db", format!("10.0.{t}.{n}:5432"));
                        registry.register_persistent(instance).unwrap();
                        store.save(&registry).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let reloaded = MemoryRegistry::new();
        assert_eq!(
            Store::open(Some(dir.clone()))
                .unwrap()
                .load(&reloaded)
                .unwrap(),
            100
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

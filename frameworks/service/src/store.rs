//! The service framework's durable state: one redb file in the work dir.
//!
//! Tables: `meta` (the framework id), `services` (name → [`ServiceMeta`],
//! JSON), `versions` ((name, version) → the version's wire spec, protobuf)
//! and `instances` ((name, number) → [`Instance`] with its tasks, JSON).
//! Instances are separate records so a status update rewrites one small
//! record, not the whole service. Every [`Store::apply`] is one durable
//! transaction (redb commits fsync by default); the actor groups all changes
//! made while the previous commit ran into the next one — the batch
//! framework's store, with the service core's records.
//!
//! Calls block (file I/O, fsync): the actor runs them on the blocking pool.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use corral_proto::pb;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::core::{Change, Instance, ServiceMeta, StoredService};

const META: TableDefinition<'_, &str, &str> = TableDefinition::new("meta");
const SERVICES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("services");
const VERSIONS: TableDefinition<'_, (&str, u32), &[u8]> = TableDefinition::new("versions");
const INSTANCES: TableDefinition<'_, (&str, u32), &[u8]> = TableDefinition::new("instances");

const FRAMEWORK_ID: &str = "framework_id";
/// The store's file in the work dir.
pub const FILE_NAME: &str = "service.redb";

#[derive(Debug, thiserror::Error)]
#[error("service store {path}: {message}")]
pub struct StoreError {
    pub path: PathBuf,
    pub message: String,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

/// One encoded write: which table, its key, and the value (None: delete).
enum Write {
    Service(String, Option<Vec<u8>>),
    Version((String, u32), Option<Vec<u8>>),
    Instance((String, u32), Option<Vec<u8>>),
}

impl Store {
    /// Opens (or creates) `<dir>/service.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(FILE_NAME);
        let fail = |message: String| StoreError {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create directory: {e}")))?;
        let db = Database::create(&path).map_err(|e| fail(e.to_string()))?;
        let store = Self { db, path };
        // Create the tables, so reads of a fresh store find them.
        store.write(|txn| {
            txn.open_table(META)?;
            txn.open_table(SERVICES)?;
            txn.open_table(VERSIONS)?;
            txn.open_table(INSTANCES)?;
            Ok(())
        })?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, message: impl ToString) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    fn write(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        body(&txn).map_err(|e| self.error(e))?;
        txn.commit().map_err(|e| self.error(e))
    }

    pub fn framework_id(&self) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(META).map_err(|e| self.error(e))?;
        let value = table.get(FRAMEWORK_ID).map_err(|e| self.error(e))?;
        Ok(value.map(|v| v.value().to_string()))
    }

    pub fn save_framework_id(&self, id: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(META)?.insert(FRAMEWORK_ID, id)?;
            Ok(())
        })
    }

    /// Every stored service with its versions and instances. A record that
    /// does not decode is an error naming it: the store was written by
    /// something else, and guessing would lose (or duplicate) instances.
    pub fn load(&self) -> Result<Vec<StoredService>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let services = txn.open_table(SERVICES).map_err(|e| self.error(e))?;
        let versions = txn.open_table(VERSIONS).map_err(|e| self.error(e))?;
        let instances = txn.open_table(INSTANCES).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for item in services.iter().map_err(|e| self.error(e))? {
            let (name, bytes) = item.map_err(|e| self.error(e))?;
            let name = name.value().to_string();
            let meta: ServiceMeta = serde_json::from_slice(bytes.value())
                .map_err(|e| self.error(format!("record of service {name}: {e}")))?;
            let mut stored_versions = Vec::new();
            let range = versions
                .range((name.as_str(), 0)..=(name.as_str(), u32::MAX))
                .map_err(|e| self.error(e))?;
            for item in range {
                let (key, value) = item.map_err(|e| self.error(e))?;
                let (_, number) = key.value();
                let spec = pb::ServiceSpec::decode(value.value())
                    .map_err(|e| self.error(format!("version {number} of service {name}: {e}")))?;
                stored_versions.push((number, spec));
            }
            let mut stored_instances = Vec::new();
            let range = instances
                .range((name.as_str(), 0)..=(name.as_str(), u32::MAX))
                .map_err(|e| self.error(e))?;
            for item in range {
                let (key, value) = item.map_err(|e| self.error(e))?;
                let (_, number) = key.value();
                let instance: Instance = serde_json::from_slice(value.value())
                    .map_err(|e| self.error(format!("instance {number} of service {name}: {e}")))?;
                stored_instances.push(instance);
            }
            out.push(StoredService {
                meta,
                versions: stored_versions,
                instances: stored_instances,
            });
        }
        Ok(out)
    }

    /// Writes `changes` in one durable transaction; of several changes to
    /// one record only the last is written.
    pub fn apply(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut seen_services = HashSet::new();
        let mut seen_versions = HashSet::new();
        let mut seen_instances = HashSet::new();
        let mut writes = Vec::with_capacity(changes.len());
        for change in changes.into_iter().rev() {
            match change {
                Change::Service(name, meta) => {
                    if seen_services.insert(name.clone()) {
                        writes.push(Write::Service(name, meta.map(|m| to_json(&m))));
                    }
                }
                Change::Version(key, spec) => {
                    if seen_versions.insert(key.clone()) {
                        writes.push(Write::Version(key, spec.map(|s| s.encode_to_vec())));
                    }
                }
                Change::Instance(key, instance) => {
                    if seen_instances.insert(key.clone()) {
                        writes.push(Write::Instance(key, instance.map(|i| to_json(&i))));
                    }
                }
            }
        }
        self.write(|txn| {
            let mut services = txn.open_table(SERVICES)?;
            let mut versions = txn.open_table(VERSIONS)?;
            let mut instances = txn.open_table(INSTANCES)?;
            for write in &writes {
                match write {
                    Write::Service(name, Some(v)) => {
                        drop(services.insert(name.as_str(), v.as_slice())?);
                    }
                    Write::Service(name, None) => drop(services.remove(name.as_str())?),
                    Write::Version((name, n), Some(v)) => {
                        drop(versions.insert((name.as_str(), *n), v.as_slice())?);
                    }
                    Write::Version((name, n), None) => {
                        drop(versions.remove((name.as_str(), *n))?);
                    }
                    Write::Instance((name, n), Some(v)) => {
                        drop(instances.insert((name.as_str(), *n), v.as_slice())?);
                    }
                    Write::Instance((name, n), None) => {
                        drop(instances.remove((name.as_str(), *n))?);
                    }
                }
            }
            Ok(())
        })
    }
}

fn to_json(value: &impl serde::Serialize) -> Vec<u8> {
    // Serializing plain structs of numbers and strings cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Services;
    use std::collections::BTreeMap;

    fn by_name(stored: Vec<StoredService>) -> BTreeMap<String, StoredService> {
        stored
            .into_iter()
            .map(|s| (s.meta.name.clone(), s))
            .collect()
    }

    const WEB: &str = r#"
name = "web"
instances = 3
[task]
command = "exec sleep 600"
cpus = 0.1
mem = 16
"#;

    fn service(text: &str) -> crate::Service {
        crate::validate(&crate::parse_toml(text).unwrap()).unwrap()
    }

    #[test]
    fn services_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut services = Services::new();
        services.apply(service(WEB), 1.0).unwrap();
        services
            .apply(service(&WEB.replace("sleep 600", "sleep 601")), 2.0)
            .unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.framework_id().unwrap(), None);
            store.save_framework_id("fw-1").unwrap();
            store.apply(services.take_changes()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.framework_id().unwrap().as_deref(), Some("fw-1"));
        let stored = by_name(store.load().unwrap());
        assert_eq!(stored["web"].versions.len(), 2);
        let mut restored = Services::new();
        assert!(
            restored
                .restore(stored.into_values().collect(), 3.0)
                .is_empty()
        );
        assert_eq!(restored.status("web", 3.0), services.status("web", 3.0));
    }

    #[test]
    fn a_deleted_service_leaves_no_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut services = Services::new();
        services.apply(service(WEB), 1.0).unwrap();
        store.apply(services.take_changes()).unwrap();
        services.delete("web", 2.0).unwrap();
        store.apply(services.take_changes()).unwrap();
        assert!(store.load().unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .write(|txn| {
                txn.open_table(SERVICES)?
                    .insert("broken", b"{not json".as_slice())?;
                Ok(())
            })
            .unwrap();
        let e = store.load().expect_err("load must fail");
        assert!(e.to_string().contains("record of service broken"), "{e}");
        assert!(e.to_string().contains("service.redb"), "{e}");
    }
}

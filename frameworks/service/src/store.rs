//! The service framework's durable state: one redb file in the work dir.
//!
//! Tables: `meta` (the framework id), `services` (name → [`ServiceMeta`],
//! JSON), `versions` ((name, version) → the version's wire spec, protobuf),
//! `instances` ((name, number) → [`Instance`] with its tasks, JSON) and
//! `slots` ((name, slot) → [`Slot`]: a persistent service's volumes on one
//! agent, JSON). Instances are separate records so a status update rewrites
//! one small record, not the whole service; slots are records of their own
//! because they outlive instances (a scale down keeps them). Every [`Store::apply`] is one durable
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

use crate::core::{Change, Instance, ServiceMeta, Slot, StoredService};

const META: TableDefinition<'_, &str, &str> = TableDefinition::new("meta");
const SERVICES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("services");
const VERSIONS: TableDefinition<'_, (&str, u32), &[u8]> = TableDefinition::new("versions");
const INSTANCES: TableDefinition<'_, (&str, u32), &[u8]> = TableDefinition::new("instances");
const SLOTS: TableDefinition<'_, (&str, u32), &[u8]> = TableDefinition::new("slots");

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
    Slot((String, u32), Option<Vec<u8>>),
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
            txn.open_table(SLOTS)?;
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

    /// Every stored service with its versions, instances and slots. A record that
    /// does not decode is an error naming it: the store was written by
    /// something else, and guessing would lose (or duplicate) instances.
    pub fn load(&self) -> Result<Vec<StoredService>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let services = txn.open_table(SERVICES).map_err(|e| self.error(e))?;
        let versions = txn.open_table(VERSIONS).map_err(|e| self.error(e))?;
        let instances = txn.open_table(INSTANCES).map_err(|e| self.error(e))?;
        let slots = txn.open_table(SLOTS).map_err(|e| self.error(e))?;
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
            let mut stored_slots = Vec::new();
            let range = slots
                .range((name.as_str(), 0)..=(name.as_str(), u32::MAX))
                .map_err(|e| self.error(e))?;
            for item in range {
                let (key, value) = item.map_err(|e| self.error(e))?;
                let (_, number) = key.value();
                let slot: Slot = serde_json::from_slice(value.value())
                    .map_err(|e| self.error(format!("slot {number} of service {name}: {e}")))?;
                stored_slots.push(slot);
            }
            out.push(StoredService {
                meta,
                versions: stored_versions,
                instances: stored_instances,
                slots: stored_slots,
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
        let mut seen_slots = HashSet::new();
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
                Change::Slot(key, slot) => {
                    if seen_slots.insert(key.clone()) {
                        writes.push(Write::Slot(key, slot.map(|s| to_json(&s))));
                    }
                }
            }
        }
        self.write(|txn| {
            let mut services = txn.open_table(SERVICES)?;
            let mut versions = txn.open_table(VERSIONS)?;
            let mut instances = txn.open_table(INSTANCES)?;
            let mut slots = txn.open_table(SLOTS)?;
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
                    Write::Slot((name, n), Some(v)) => {
                        drop(slots.insert((name.as_str(), *n), v.as_slice())?);
                    }
                    Write::Slot((name, n), None) => drop(slots.remove((name.as_str(), *n))?),
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

    const DB: &str = r#"
name = "db"
instances = 2
constraints = ["hostname unique"]
[pod]
[[pod.containers]]
name = "pg"
command = ["serve"]
volume_mounts = [{ name = "data", path = "/data" }]
[[pod.volumes]]
name = "data"
persistent = { size = 512 }
"#;

    fn offer(id: &str, agent: &str) -> pb::Offer {
        pb::Offer {
            id: id.into(),
            agent_id: agent.into(),
            hostname: format!("{agent}.example"),
            resources: corral_proto::Resources::parse("cpus:4;mem:4096;disk:4096")
                .unwrap()
                .to_proto(),
            attributes: vec![
                pb::Attribute {
                    name: "rack".into(),
                    value: Some(pb::attribute::Value::Text("r1".into())),
                },
                // Pods need containers.
                pb::Attribute {
                    name: "isolation".into(),
                    value: Some(pb::attribute::Value::Text("container".into())),
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn slots_survive_a_reopen_with_the_instances_that_hold_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut services = Services::new();
        services.apply(service(DB), 1.0).unwrap();
        let plan = services.place(&[offer("o1", "a1"), offer("o2", "a2")], 1.0);
        assert_eq!(plan.launches.len(), 2);
        {
            let store = Store::open(dir.path()).unwrap();
            store.apply(services.take_changes()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let stored = by_name(store.load().unwrap());
        let db = &stored["db"];
        let slots: Vec<(u32, &str, &str, Vec<&str>)> = db
            .slots
            .iter()
            .map(|s| {
                (
                    s.number,
                    s.agent_id.as_str(),
                    s.hostname.as_str(),
                    s.volumes.iter().map(|v| v.id.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            slots,
            vec![
                (0, "a1", "a1.example", vec!["data-db-0"]),
                (1, "a2", "a2.example", vec!["data-db-1"]),
            ]
        );
        assert_eq!(db.slots[0].attributes[0], ("rack".into(), "r1".into()));
        assert_eq!(
            db.slots[0].volumes[0].size,
            corral_proto::Amount::from_units(512)
        );
        assert!(!db.slots[0].created);
        let held: Vec<Option<u32>> = db.instances.iter().map(|i| i.slot).collect();
        assert_eq!(held, vec![Some(0), Some(1)]);
        let mut restored = Services::new();
        assert!(
            restored
                .restore(stored.into_values().collect(), 2.0)
                .is_empty()
        );
        assert_eq!(restored.status("db", 2.0), services.status("db", 2.0));
    }

    #[test]
    fn an_instance_record_from_before_slots_loads_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut services = Services::new();
        services.apply(service(WEB), 1.0).unwrap();
        services.place(&[offer("o1", "a1")], 1.0);
        store.apply(services.take_changes()).unwrap();
        // Rewrite instance 1 as the previous release did: no `slot` field.
        let loaded = store.load().unwrap();
        let mut json = serde_json::to_value(&loaded[0].instances[0]).unwrap();
        json.as_object_mut().unwrap().remove("slot");
        let bytes = serde_json::to_vec(&json).unwrap();
        store
            .write(|txn| {
                txn.open_table(INSTANCES)?
                    .insert(("web", 1), bytes.as_slice())?;
                Ok(())
            })
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded[0].instances[0].slot, None);
        assert_eq!(loaded[0].instances.len(), 3);
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

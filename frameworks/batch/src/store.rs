//! The batch framework's durable state: one redb file in the work dir.
//!
//! Tables: `meta` (the framework id), `specs` (job name → the job's wire spec,
//! protobuf), `jobs` (job name → [`JobMeta`], JSON) and `slots`
//! ((job, run, index) → [`Slot`] with its attempts, JSON). Slots are separate
//! records so a 10,000-task array job rewrites one small record per update,
//! not the whole job. Every [`Store::apply`] is one durable transaction
//! (redb commits fsync by default); the actor groups all changes made while
//! the previous commit ran into the next one.
//!
//! Calls block (file I/O, fsync): the actor runs them on the blocking pool.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use corral_proto::pb;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::jobs::{Change, JobMeta, Slot};

const META: TableDefinition<'_, &str, &str> = TableDefinition::new("meta");
const SPECS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("specs");
const JOBS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("jobs");
const SLOTS: TableDefinition<'_, (&str, u32, u32), &[u8]> = TableDefinition::new("slots");

const FRAMEWORK_ID: &str = "framework_id";
/// The store's file in the work dir.
pub const FILE_NAME: &str = "batch.redb";

#[derive(Debug, thiserror::Error)]
#[error("batch store {path}: {message}")]
pub struct StoreError {
    pub path: PathBuf,
    pub message: String,
}

/// Jobs as stored: spec, job record, and slot records by (run, index).
pub type StoredJob = (pb::JobSpec, JobMeta, Vec<((u32, u32), Slot)>);

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `<dir>/batch.redb`.
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
            txn.open_table(SPECS)?;
            txn.open_table(JOBS)?;
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

    /// Every stored job. A record that does not decode is an error naming
    /// it: the store was written by something else, and guessing would lose
    /// data.
    pub fn load(&self) -> Result<Vec<StoredJob>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let specs = txn.open_table(SPECS).map_err(|e| self.error(e))?;
        let jobs = txn.open_table(JOBS).map_err(|e| self.error(e))?;
        let slots = txn.open_table(SLOTS).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for item in specs.iter().map_err(|e| self.error(e))? {
            let (name, bytes) = item.map_err(|e| self.error(e))?;
            let name = name.value().to_string();
            let spec = pb::JobSpec::decode(bytes.value())
                .map_err(|e| self.error(format!("spec of job {name}: {e}")))?;
            let Some(meta) = jobs.get(name.as_str()).map_err(|e| self.error(e))? else {
                return Err(self.error(format!("job {name} has a spec but no record")));
            };
            let meta: JobMeta = serde_json::from_slice(meta.value())
                .map_err(|e| self.error(format!("record of job {name}: {e}")))?;
            let mut job_slots = Vec::new();
            let range = slots
                .range((name.as_str(), 0, 0)..=(name.as_str(), u32::MAX, u32::MAX))
                .map_err(|e| self.error(e))?;
            for item in range {
                let (key, value) = item.map_err(|e| self.error(e))?;
                let (_, run, index) = key.value();
                let slot: Slot = serde_json::from_slice(value.value())
                    .map_err(|e| self.error(format!("slot {run}/{index} of job {name}: {e}")))?;
                job_slots.push(((run, index), slot));
            }
            out.push((spec, meta, job_slots));
        }
        Ok(out)
    }

    /// Writes `changes` in one durable transaction; of several changes to
    /// one record only the last is written.
    pub fn apply(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut seen_specs = HashSet::new();
        let mut seen_jobs = HashSet::new();
        let mut seen_slots = HashSet::new();
        let mut latest = Vec::with_capacity(changes.len());
        for change in changes.into_iter().rev() {
            let fresh = match &change {
                Change::Spec(name, _) => seen_specs.insert(name.clone()),
                Change::Job(name, _) => seen_jobs.insert(name.clone()),
                Change::Slot(key, _) => seen_slots.insert(key.clone()),
            };
            if fresh {
                latest.push(change);
            }
        }
        let mut encoded = Vec::with_capacity(latest.len());
        for change in latest {
            encoded.push(match change {
                Change::Spec(name, spec) => (0, name, 0, 0, spec.map(|s| s.encode_to_vec())),
                Change::Job(name, meta) => (1, name, 0, 0, meta.map(|m| to_json(&m))),
                Change::Slot((name, run, index), slot) => {
                    (2, name, run, index, slot.map(|s| to_json(&s)))
                }
            });
        }
        self.write(|txn| {
            let mut specs = txn.open_table(SPECS)?;
            let mut jobs = txn.open_table(JOBS)?;
            let mut slots = txn.open_table(SLOTS)?;
            for (table, name, run, index, value) in &encoded {
                let name = name.as_str();
                match (table, value) {
                    (0, Some(v)) => drop(specs.insert(name, v.as_slice())?),
                    (0, None) => drop(specs.remove(name)?),
                    (1, Some(v)) => drop(jobs.insert(name, v.as_slice())?),
                    (1, None) => drop(jobs.remove(name)?),
                    (_, Some(v)) => drop(slots.insert((name, *run, *index), v.as_slice())?),
                    (_, None) => drop(slots.remove((name, *run, *index))?),
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
    use crate::jobs::Jobs;

    fn spec(name: &str, count: u32) -> pb::JobSpec {
        pb::JobSpec {
            name: name.into(),
            shell: "true".into(),
            cpus: 0.1,
            mem_mib: 16.0,
            count,
            ..Default::default()
        }
    }

    #[test]
    fn jobs_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut jobs = Jobs::new();
        jobs.submit(spec("a", 3), 1.0).unwrap();
        jobs.submit(spec("b", 1), 2.0).unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.framework_id().unwrap(), None);
            store.save_framework_id("fw-1").unwrap();
            store.apply(jobs.take_changes()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.framework_id().unwrap().as_deref(), Some("fw-1"));
        let mut restored = Jobs::new();
        assert!(restored.restore(store.load().unwrap()).is_empty());
        for name in ["a", "b"] {
            assert_eq!(
                restored.status(name, true),
                jobs.status(name, true),
                "{name}"
            );
        }
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .write(|txn| {
                txn.open_table(SPECS)?
                    .insert("broken", spec("broken", 1).encode_to_vec().as_slice())?;
                txn.open_table(JOBS)?
                    .insert("broken", b"{not json".as_slice())?;
                Ok(())
            })
            .unwrap();
        let e = store.load().expect_err("load must fail");
        assert!(e.to_string().contains("record of job broken"), "{e}");
        assert!(e.to_string().contains("batch.redb"), "{e}");
    }
}

//! Persistent volumes as the master knows them: disk of one agent reserved
//! for one framework, which outlives the pods that mount it (Mesos
//! persistent volumes). The agent holds the data and reports its volumes
//! whenever it registers, so the agent is the source of truth for what
//! exists; the master decides who may create, mount and destroy them.
//!
//! A volume's disk stays allocated to its framework from CreateVolume to
//! DestroyVolume (or the framework's removal), whether a pod mounts it or
//! not, so it counts toward the framework's share as Mesos' reservations do.

use std::collections::{HashMap, HashSet};

use corral_proto::{AgentId, Amount, FrameworkId, Resources, TaskId, VolumeId, pb};

use crate::validation::FieldError;

pub(crate) type VolumeKey = (FrameworkId, VolumeId);

pub(crate) struct Volume {
    pub(crate) agent_id: AgentId,
    /// `disk` only.
    pub(crate) disk: Resources,
    /// The tasks of the last pod that mounted it; the volume is in use while
    /// one of them is live.
    pub(crate) users: HashSet<TaskId>,
}

impl Volume {
    pub(crate) fn new(agent_id: AgentId, disk: Resources) -> Self {
        Self {
            agent_id,
            disk,
            users: HashSet::new(),
        }
    }

    pub(crate) fn to_proto(&self, key: &VolumeKey) -> pb::PersistentVolume {
        pb::PersistentVolume {
            id: key.1.to_string(),
            framework_id: key.0.to_string(),
            agent_id: self.agent_id.to_string(),
            disk_mib: self.disk.disk.as_f64(),
        }
    }
}

#[derive(Default)]
pub(crate) struct Volumes {
    by_key: HashMap<VolumeKey, Volume>,
}

impl Volumes {
    pub(crate) fn get(&self, key: &VolumeKey) -> Option<&Volume> {
        self.by_key.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &VolumeKey) -> Option<&mut Volume> {
        self.by_key.get_mut(key)
    }

    pub(crate) fn contains(&self, key: &VolumeKey) -> bool {
        self.by_key.contains_key(key)
    }

    pub(crate) fn insert(&mut self, key: VolumeKey, volume: Volume) {
        self.by_key.insert(key, volume);
    }

    pub(crate) fn remove(&mut self, key: &VolumeKey) -> Option<Volume> {
        self.by_key.remove(key)
    }

    /// Every volume, in a stable order (for `/state`).
    pub(crate) fn sorted(&self) -> Vec<(&VolumeKey, &Volume)> {
        let mut all: Vec<_> = self.by_key.iter().collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all
    }

    /// The volumes on `agent`.
    pub(crate) fn on_agent<'a>(
        &'a self,
        agent: &'a AgentId,
    ) -> impl Iterator<Item = (&'a VolumeKey, &'a Volume)> + 'a {
        self.by_key
            .iter()
            .filter(move |(_, v)| &v.agent_id == agent)
    }

    /// The keys of `framework`'s volumes.
    pub(crate) fn of_framework(&self, framework: &FrameworkId) -> Vec<VolumeKey> {
        self.by_key
            .keys()
            .filter(|(f, _)| f == framework)
            .cloned()
            .collect()
    }
}

/// A checked CreateVolume: its id and its disk as resources.
pub(crate) struct ValidCreate {
    pub(crate) id: VolumeId,
    pub(crate) disk: Resources,
}

/// Checks one CreateVolume on its own (the master checks it against its
/// volumes and the offers); `field` is `operations[i].create_volume`.
pub(crate) fn create(op: &pb::CreateVolume, field: &str) -> Result<ValidCreate, FieldError> {
    let id = VolumeId::parse(&op.volume_id, &format!("{field}.volume_id"))?;
    let disk_field = format!("{field}.disk_mib");
    let positive = || FieldError::new(&disk_field, "must be finite and > 0");
    let amount = match Amount::from_f64(op.disk_mib, &disk_field) {
        // Also refuses what rounds to zero (below a thousandth of a MiB).
        Ok(a) if a.is_zero() => return Err(positive()),
        Ok(a) => a,
        // Too big: say so.
        Err(e) if op.disk_mib > 0.0 && op.disk_mib.is_finite() => return Err(e.into()),
        Err(_) => return Err(positive()),
    };
    let disk = Resources {
        disk: amount,
        ..Resources::default()
    };
    Ok(ValidCreate { id, disk })
}

/// Checks a volume an agent reports (`register.volumes[i]`).
pub(crate) fn reported(
    v: &pb::PersistentVolume,
    field: &str,
) -> Result<(VolumeKey, Resources), FieldError> {
    let fid = FrameworkId::parse(&v.framework_id, &format!("{field}.framework_id"))?;
    let op = pb::CreateVolume {
        volume_id: v.id.clone(),
        disk_mib: v.disk_mib,
    };
    let valid = create(&op, field)?;
    Ok(((fid, valid.id), valid.disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: &str, disk_mib: f64) -> pb::CreateVolume {
        pb::CreateVolume {
            volume_id: id.into(),
            disk_mib,
        }
    }

    #[test]
    fn a_create_needs_a_path_safe_id_and_a_positive_finite_size() {
        let ok = create(&op("data-web-0", 64.0), "operations[0].create_volume").unwrap();
        assert_eq!(ok.id.as_str(), "data-web-0");
        assert_eq!(ok.disk.disk.as_f64(), 64.0);
        for (bad, field) in [
            (op("", 1.0), "operations[0].create_volume.volume_id"),
            (op("a/b", 1.0), "operations[0].create_volume.volume_id"),
            (op("..", 1.0), "operations[0].create_volume.volume_id"),
            (op("v", 0.0), "operations[0].create_volume.disk_mib"),
            (op("v", -1.0), "operations[0].create_volume.disk_mib"),
            (op("v", f64::NAN), "operations[0].create_volume.disk_mib"),
            (
                op("v", f64::INFINITY),
                "operations[0].create_volume.disk_mib",
            ),
        ] {
            let e = create(&bad, "operations[0].create_volume")
                .err()
                .unwrap_or_else(|| panic!("{bad:?} was accepted"));
            assert_eq!(e.field, field, "{bad:?}");
        }
    }

    #[test]
    fn a_reported_volume_names_the_register_field() {
        let v = pb::PersistentVolume {
            id: "v".into(),
            framework_id: String::new(),
            agent_id: "a".into(),
            disk_mib: 1.0,
        };
        let e = reported(&v, "register.volumes[2]").err().unwrap();
        assert_eq!(e.field, "register.volumes[2].framework_id");
    }
}

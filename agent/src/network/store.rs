//! What the pod network persists under its state dir, so a restarted agent
//! knows which addresses are taken and which pods it had:
//!
//! - `ips/<address>`: one file per allocated address holding the owner's pod
//!   id, as CNI's host-local IPAM does. Created exclusively (see
//!   [`Store::write_allocation`]), so an address is never owned twice.
//! - `ips/last_reserved_ip`: the next-fit cursor.
//! - `pods/<pod id>`: the pod's record (address, host veth), JSON.
//! - `tmp/`: files being written; whatever is left there after a crash is
//!   removed on open.
//!
//! Blocking (fsync): callers run these on a blocking thread.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::NetworkError;

const LAST_RESERVED: &str = "last_reserved_ip";

/// A pod's network as persisted: enough to find everything setup made.
/// Written before the veth is created, so a crash never leaves a link the
/// record does not name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PodRecord {
    pub pod_id: String,
    pub ip: Ipv4Addr,
    pub host_veth: String,
}

/// Everything read back by [`Store::open`].
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub allocations: Vec<(Ipv4Addr, String)>,
    pub last_reserved: Option<Ipv4Addr>,
    pub records: Vec<PodRecord>,
}

#[derive(Debug, Clone)]
pub(crate) struct Store {
    ips: PathBuf,
    pods: PathBuf,
    tmp: PathBuf,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> NetworkError {
    let path = path.to_path_buf();
    move |source| NetworkError::Io { what, path, source }
}

impl Store {
    /// Creates the dirs if needed, removes leftover temp files and reads
    /// back allocations and records.
    pub fn open(root: &Path) -> Result<(Self, Loaded), NetworkError> {
        let store = Store {
            ips: root.join("ips"),
            pods: root.join("pods"),
            tmp: root.join("tmp"),
        };
        for dir in [&store.ips, &store.pods, &store.tmp] {
            fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        }
        for entry in fs::read_dir(&store.tmp).map_err(io_err("cannot read", &store.tmp))? {
            let path = entry.map_err(io_err("cannot read", &store.tmp))?.path();
            remove_file_if_exists(&path)?;
        }
        let mut loaded = Loaded::default();
        for entry in fs::read_dir(&store.ips).map_err(io_err("cannot read", &store.ips))? {
            let entry = entry.map_err(io_err("cannot read", &store.ips))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == LAST_RESERVED {
                let text = fs::read_to_string(&path).map_err(io_err("cannot read", &path))?;
                // A cursor that does not parse only costs next-fit order.
                loaded.last_reserved = text.trim().parse().ok();
                continue;
            }
            let ip: Ipv4Addr = name.parse().map_err(|_| NetworkError::CorruptState {
                path: path.clone(),
                reason: "not named after an IPv4 address".into(),
            })?;
            let owner = fs::read_to_string(&path).map_err(io_err("cannot read", &path))?;
            super::validate_pod_id(&owner).map_err(|e| NetworkError::CorruptState {
                path: path.clone(),
                reason: format!("owner: {e}"),
            })?;
            loaded.allocations.push((ip, owner));
        }
        for entry in fs::read_dir(&store.pods).map_err(io_err("cannot read", &store.pods))? {
            let path = entry.map_err(io_err("cannot read", &store.pods))?.path();
            let bytes = fs::read(&path).map_err(io_err("cannot read", &path))?;
            let record: PodRecord =
                serde_json::from_slice(&bytes).map_err(|e| NetworkError::CorruptState {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if path.file_name() != Some(record.pod_id.as_ref()) {
                return Err(NetworkError::CorruptState {
                    path,
                    reason: format!("holds the record of pod {}", record.pod_id),
                });
            }
            loaded.records.push(record);
        }
        loaded.allocations.sort();
        loaded.records.sort_by(|a, b| a.pod_id.cmp(&b.pod_id));
        Ok((store, loaded))
    }

    /// Records that `pod_id` owns `ip`. The file is written in full under
    /// `tmp/` and then hard-linked into place: `link(2)` fails if the name
    /// exists, like `O_EXCL`, but the file appears complete or not at all.
    pub fn write_allocation(&self, ip: Ipv4Addr, pod_id: &str) -> Result<(), NetworkError> {
        let path = self.ips.join(ip.to_string());
        let tmp = self.write_tmp(pod_id.as_bytes())?;
        let linked = fs::hard_link(&tmp, &path);
        remove_file_if_exists(&tmp)?;
        match linked {
            Ok(()) => sync_dir(&self.ips),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(NetworkError::CorruptState {
                path,
                reason: format!(
                    "address already allocated on disk while handing it to pod {pod_id} \
                         (is another agent using this state dir?)"
                ),
            }),
            Err(e) => Err(io_err("cannot create", &path)(e)),
        }
    }

    /// Removes the allocation of `ip` if `pod_id` owns it: a file naming
    /// another pod is that pod's, whatever the caller believes.
    pub fn remove_allocation(&self, ip: Ipv4Addr, pod_id: &str) -> Result<(), NetworkError> {
        let path = self.ips.join(ip.to_string());
        match fs::read_to_string(&path) {
            Ok(owner) if owner == pod_id => {
                remove_file_if_exists(&path)?;
                sync_dir(&self.ips)
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot read", &path)(e)),
        }
    }

    /// Persists the next-fit cursor. Renamed into place (never a torn
    /// file) but not fsynced: after a power loss the cursor may be older,
    /// which only changes which free address comes next.
    pub fn write_last_reserved(&self, ip: Ipv4Addr) -> Result<(), NetworkError> {
        let tmp = self.tmp_path();
        fs::write(&tmp, ip.to_string()).map_err(io_err("cannot write", &tmp))?;
        let path = self.ips.join(LAST_RESERVED);
        fs::rename(&tmp, &path).map_err(io_err("cannot rename into", &path))
    }

    /// Writes (or replaces) a pod's record: temp file, fsync, rename, fsync
    /// the dir.
    pub fn write_record(&self, record: &PodRecord) -> Result<(), NetworkError> {
        let path = self.pods.join(&record.pod_id);
        let bytes = serde_json::to_vec(record).map_err(|e| NetworkError::CorruptState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let tmp = self.write_tmp(&bytes)?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("cannot rename into", &path)(e));
        }
        sync_dir(&self.pods)
    }

    pub fn remove_record(&self, pod_id: &str) -> Result<(), NetworkError> {
        let path = self.pods.join(pod_id);
        if remove_file_if_exists(&path)? {
            sync_dir(&self.pods)?;
        }
        Ok(())
    }

    fn tmp_path(&self) -> PathBuf {
        self.tmp.join(uuid::Uuid::new_v4().simple().to_string())
    }

    fn write_tmp(&self, bytes: &[u8]) -> Result<PathBuf, NetworkError> {
        let tmp = self.tmp_path();
        let written = fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("cannot write", &tmp)(e));
        }
        Ok(tmp)
    }
}

/// Removes `path`; `Ok(false)` if it was not there.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<bool, NetworkError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("cannot remove", path)(e)),
    }
}

/// Makes a rename or link in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), NetworkError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pod: &str, ip: &str) -> PodRecord {
        PodRecord {
            pod_id: pod.into(),
            ip: ip.parse().unwrap(),
            host_veth: format!("cv-{pod}"),
        }
    }

    #[test]
    fn allocations_records_and_cursor_come_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert!(loaded.allocations.is_empty() && loaded.records.is_empty());
        let ip_a: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let ip_b: Ipv4Addr = "10.0.0.3".parse().unwrap();
        store.write_allocation(ip_a, "pod-a").unwrap();
        store.write_allocation(ip_b, "pod-b").unwrap();
        store.write_last_reserved(ip_b).unwrap();
        store.write_record(&record("pod-a", "10.0.0.2")).unwrap();
        // A crash mid-write leaves a temp file: reopening removes it.
        fs::write(dir.path().join("tmp/leftover"), b"x").unwrap();

        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(
            loaded.allocations,
            vec![(ip_a, "pod-a".to_string()), (ip_b, "pod-b".to_string())]
        );
        assert_eq!(loaded.last_reserved, Some(ip_b));
        assert_eq!(loaded.records, vec![record("pod-a", "10.0.0.2")]);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        store.remove_allocation(ip_a, "pod-a").unwrap();
        store.remove_record("pod-a").unwrap();
        store.remove_record("pod-a").unwrap();
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.allocations, vec![(ip_b, "pod-b".to_string())]);
        assert!(loaded.records.is_empty());
    }

    #[test]
    fn an_address_file_is_created_exclusively_and_removed_only_by_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let ip: Ipv4Addr = "10.0.0.2".parse().unwrap();
        store.write_allocation(ip, "pod-a").unwrap();
        let err = store.write_allocation(ip, "pod-b").unwrap_err();
        assert!(err.to_string().contains("10.0.0.2"), "{err}");
        store.remove_allocation(ip, "pod-b").unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("ips/10.0.0.2")).unwrap(),
            "pod-a"
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_state_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("pods/pod-a"), b"{not json").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("pods/pod-a"), "{err}");
        fs::remove_file(dir.path().join("pods/pod-a")).unwrap();
        fs::write(dir.path().join("ips/10.0.0.9"), b"bad/owner").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("ips/10.0.0.9"), "{err}");
    }
}

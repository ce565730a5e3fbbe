//! Several masters on etcd: leader election on an etcd lease, and the
//! registry in etcd, written only while this master's leader key exists.
//!
//! Each master campaigns (etcd's election API) with its address as the
//! value, on a lease it keeps alive. The winner's epoch is the creation
//! revision of its leader key: it grows with every election, so it is a
//! fencing token. Every registry write is a transaction that checks the
//! key still has that revision; agents and frameworks refuse messages with
//! a lower epoch than one they saw. So a leader that was paused past its
//! lease (Jepsen's "etcd locks are not mutual exclusion") can neither write
//! nor command.
//!
//! The leader steps down when its lease is not renewed within its TTL (by
//! its own clock, measured from when the renewal was sent, which is never
//! later than etcd's), when a write is fenced off, or when etcd fails; it
//! then closes every stream and campaigns again as a standby. Standbys
//! observe the election and name the leader to clients.
//!
//! Keys, under the cluster's prefix `P` (`/corral` by default):
//! - `P/leader/<lease>`: the candidates (etcd's election API);
//! - `P/format`, `P/registry_id`;
//! - `P/registry/{agents,frameworks,removed_frameworks}/ID`,
//!   `P/registry/{tasks,volumes}/FRAMEWORK/ID`: protobuf records as in the
//!   embedded store (a removed framework's value is its removal time, f64
//!   little-endian).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaderKey, ResignOptions, Txn, TxnOp,
};
use prost::Message;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::MasterError;
use crate::config::{EtcdConfig, MasterConfig};
use crate::leader::{self, Role};
use crate::master;
use crate::metrics::Metrics;
use crate::registry::{Change, FORMAT_VERSION, Fence, Registry, RegistryError, Stored};

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Well under etcd's default `--max-request-bytes` (1.5 MiB).
const MAX_TXN_BYTES: usize = 1024 * 1024;
/// Keys read per range request when loading the registry.
const PAGE: i64 = 2000;
/// One etcd request (not a campaign, which waits for its turn).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Between attempts to reach etcd.
const RETRY: Duration = Duration::from_millis(500);

fn storage(config: &EtcdConfig, e: impl ToString) -> RegistryError {
    RegistryError::Storage {
        path: label(config),
        message: e.to_string(),
    }
}

/// How errors name the store: `etcd://h1:2379,h2:2379/corral`.
fn label(config: &EtcdConfig) -> PathBuf {
    let hosts: Vec<&str> = config
        .endpoints
        .iter()
        .map(|e| e.trim_start_matches("http://"))
        .collect();
    PathBuf::from(format!("etcd://{}{}", hosts.join(","), config.prefix))
}

/// A client for `config`'s endpoints, with request timeouts.
pub async fn connect(config: &EtcdConfig) -> Result<Client, etcd_client::Error> {
    let options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    Client::connect(config.endpoints.clone(), Some(options)).await
}

/// The registry in etcd for one leadership term.
pub struct EtcdRegistry {
    client: Client,
    runtime: Handle,
    config: EtcdConfig,
    /// `P/registry/`, before every record's key.
    prefix: String,
    leader_key: Vec<u8>,
    fence: Fence,
}

impl EtcdRegistry {
    /// The registry of the leader holding `leader` (from a won campaign):
    /// checks the format and reads (or creates) the registry's id.
    pub async fn open(
        client: Client,
        config: EtcdConfig,
        leader: &LeaderKey,
    ) -> Result<Self, RegistryError> {
        let mut kv = client.clone();
        let fail = |e: etcd_client::Error| storage(&config, e);
        let format_key = format!("{}/format", config.prefix);
        let id_key = format!("{}/registry_id", config.prefix);
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        // Create both if absent, in one step, then read what is there.
        let txn = Txn::new()
            .when([Compare::create_revision(
                id_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(id_key.clone(), fresh, None),
                TxnOp::put(format_key.clone(), FORMAT_VERSION.to_string(), None),
            ]);
        kv.txn(txn).await.map_err(fail)?;
        let format = kv.get(format_key.clone(), None).await.map_err(fail)?;
        let found = format
            .kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse::<u32>().ok());
        if found != Some(FORMAT_VERSION) {
            return Err(RegistryError::UnknownFormat {
                path: label(&config),
                found: found.unwrap_or(0),
            });
        }
        let id = kv.get(id_key, None).await.map_err(fail)?;
        let registry_id = id
            .kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok())
            .unwrap_or_default()
            .to_string();
        let epoch = u64::try_from(leader.rev()).unwrap_or(0);
        Ok(Self {
            client,
            runtime: Handle::current(),
            prefix: format!("{}/registry/", config.prefix),
            leader_key: leader.key().to_vec(),
            fence: Fence { registry_id, epoch },
            config,
        })
    }

    fn key_of(&self, change: &Change) -> String {
        let p = &self.prefix;
        match change {
            Change::Agent(id, _) => format!("{p}agents/{id}"),
            Change::Framework(id, _) => format!("{p}frameworks/{id}"),
            Change::RemovedFramework(id, _) => format!("{p}removed_frameworks/{id}"),
            Change::Task((f, t), _) => format!("{p}tasks/{f}/{t}"),
            Change::Volume((f, v), _) => format!("{p}volumes/{f}/{v}"),
        }
    }

    /// The op for one change, and its size on the wire (roughly).
    fn op(&self, change: &Change) -> (TxnOp, usize) {
        let key = self.key_of(change);
        let value = match change {
            Change::Agent(_, r) => r.as_ref().map(Message::encode_to_vec),
            Change::Framework(_, r) => r.as_ref().map(Message::encode_to_vec),
            Change::RemovedFramework(_, at) => Some(at.to_le_bytes().to_vec()),
            Change::Task(_, r) => r.as_ref().map(|r| r.encode_to_vec()),
            Change::Volume(_, r) => r.as_ref().map(Message::encode_to_vec),
        };
        let size = key.len() + value.as_ref().map_or(0, Vec::len) + 16;
        match value {
            Some(v) => (TxnOp::put(key, v, None), size),
            None => (TxnOp::delete(key, None), size),
        }
    }

    /// [`Registry::apply`], on the caller's runtime.
    pub async fn apply_async(&self, changes: &[Change]) -> Result<(), RegistryError> {
        let mut kv = self.client.clone();
        let mut batch: Vec<TxnOp> = Vec::new();
        let mut bytes = 0;
        let mut ops = changes.iter().map(|c| self.op(c)).peekable();
        while let Some((op, size)) = ops.next() {
            batch.push(op);
            bytes += size;
            let full = batch.len() >= MAX_TXN_OPS
                || ops.peek().is_some_and(|(_, s)| bytes + s > MAX_TXN_BYTES);
            if full || ops.peek().is_none() {
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        self.leader_key.clone(),
                        CompareOp::Equal,
                        // The epoch is this revision.
                        i64::try_from(self.fence.epoch).unwrap_or(i64::MAX),
                    )])
                    .and_then(std::mem::take(&mut batch));
                bytes = 0;
                let response = kv.txn(txn).await.map_err(|e| storage(&self.config, e))?;
                if !response.succeeded() {
                    return Err(RegistryError::Deposed {
                        path: label(&self.config),
                        epoch: self.fence.epoch,
                    });
                }
            }
        }
        Ok(())
    }

    /// [`Registry::load`], on the caller's runtime.
    pub async fn load_async(&self) -> Result<Stored, RegistryError> {
        let mut kv = self.client.clone();
        let prefix = &self.prefix;
        let end = prefix_end(prefix);
        let mut out = Stored::default();
        let mut from = prefix.clone().into_bytes();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                // Every page from the same snapshot.
                options = options.with_revision(revision);
            }
            let page = kv
                .get(from.clone(), Some(options))
                .await
                .map_err(|e| storage(&self.config, e))?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            for item in page.kvs() {
                let key = String::from_utf8_lossy(item.key()).to_string();
                let rest = key.strip_prefix(prefix.as_str()).unwrap_or(&key);
                self.decode(&mut out, rest, item.value())?;
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// One record into `out`; what does not decode is named by its key.
    /// (Whether a record makes sense, e.g. an agent's phase, the master
    /// checks when it recovers, for every backend.)
    fn decode(&self, out: &mut Stored, key: &str, value: &[u8]) -> Result<(), RegistryError> {
        let corrupt = |message: String| RegistryError::Corrupt {
            path: label(&self.config),
            key: key.to_string(),
            message,
        };
        let parts: Vec<&str> = key.split('/').collect();
        match parts.as_slice() {
            ["agents", id] => out
                .agents
                .push(((*id).to_string(), decode_as(value).map_err(&corrupt)?)),
            ["frameworks", id] => out
                .frameworks
                .push(((*id).to_string(), decode_as(value).map_err(&corrupt)?)),
            ["removed_frameworks", id] => {
                let at: [u8; 8] = value
                    .try_into()
                    .map_err(|_| corrupt(format!("{} bytes, not an f64", value.len())))?;
                out.removed_frameworks
                    .push(((*id).to_string(), f64::from_le_bytes(at)));
            }
            ["tasks", f, t] => out.tasks.push((
                ((*f).to_string(), (*t).to_string()),
                decode_as(value).map_err(&corrupt)?,
            )),
            ["volumes", f, v] => out.volumes.push((
                ((*f).to_string(), (*v).to_string()),
                decode_as(value).map_err(&corrupt)?,
            )),
            _ => return Err(corrupt("not a registry key".into())),
        }
        Ok(())
    }
}

impl Registry for EtcdRegistry {
    fn load(&self) -> Result<Stored, RegistryError> {
        self.runtime.block_on(self.load_async())
    }

    fn apply(&self, changes: &[Change]) -> Result<(), RegistryError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.runtime.block_on(self.apply_async(changes))
    }

    fn fence(&self) -> Fence {
        self.fence.clone()
    }
}

fn decode_as<M: Message + Default>(value: &[u8]) -> Result<M, String> {
    M::decode(value).map_err(|e| e.to_string())
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Keeps the lease (asked for at `granted`) alive; returns when it is
/// lost, saying why. Valid means within `ttl` of the last renewal that
/// etcd confirmed, counted from when it was sent.
async fn keep_lease(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    granted: Instant,
) -> &'static str {
    let Ok((mut keeper, mut responses)) = client.lease_keep_alive(lease).await else {
        return "etcd";
    };
    let every = ttl / 3;
    let mut valid_until = granted + ttl;
    loop {
        tokio::time::sleep(every).await;
        // Checked before renewing: after a pause (SIGSTOP, a long GC, a
        // frozen VM) the lease may be gone though nothing told us yet.
        let sent = Instant::now();
        if sent >= valid_until {
            return "lease";
        }
        let renewed = async {
            keeper.keep_alive().await.ok()?;
            responses.message().await.ok()?
        };
        match tokio::time::timeout_at(valid_until, renewed).await {
            Ok(Some(response)) if response.ttl() > 0 => valid_until = sent + ttl,
            Ok(Some(_)) => return "lease",
            // A failed renewal is retried until the lease runs out.
            Ok(None) => {}
            Err(_) => return "lease",
        }
    }
}

/// Names the current leader to clients while this master waits, and
/// forgets it as soon as its key is gone (its lease expired, or it
/// resigned): until the next one is elected, calls wait here instead of
/// being sent to a dead master.
async fn observe_leader(client: Client, name: String, me: String, role: Arc<watch::Sender<Role>>) {
    let mut client = client;
    let set = |leader: Option<String>| {
        role.send_if_modified(|r| match r {
            Role::Standby { leader: known } if *known != leader => {
                known.clone_from(&leader);
                true
            }
            _ => false,
        });
    };
    loop {
        let mut leaders = match client.observe(name.clone()).await {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot observe the leader election: {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        // The watch on the current leader's key, for its deletion.
        let mut gone: Option<etcd_client::WatchStream> = None;
        loop {
            let deleted = async {
                match gone.as_mut() {
                    Some(w) => loop {
                        match w.message().await {
                            Ok(Some(r)) => {
                                if r.events()
                                    .iter()
                                    .any(|e| e.event_type() == etcd_client::EventType::Delete)
                                {
                                    return;
                                }
                            }
                            // The watch broke: the observer reconnects.
                            Ok(None) | Err(_) => std::future::pending::<()>().await,
                        }
                    },
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = deleted => {
                    gone = None;
                    set(None);
                }
                next = leaders.message() => {
                    let Ok(Some(response)) = next else { break };
                    let Some(kv) = response.kv() else { continue };
                    let leader = String::from_utf8_lossy(kv.value()).to_string();
                    let options = etcd_client::WatchOptions::new()
                        .with_start_revision(kv.mod_revision() + 1);
                    gone = client.watch(kv.key().to_vec(), Some(options)).await.ok();
                    set((leader != me).then_some(leader));
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Campaigns, leads while elected, steps down and campaigns again, until
/// `stop` turns true.
pub(crate) async fn lead(
    config: MasterConfig,
    etcd: EtcdConfig,
    advertise: String,
    metrics: Arc<Metrics>,
    role: Arc<watch::Sender<Role>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), MasterError> {
    let name = format!("{}/leader", etcd.prefix);
    let ttl = etcd.lease_ttl.max(Duration::from_secs(1));
    let ttl_seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    while !stopped(&stop) {
        let mut client = match connect(&etcd).await {
            Ok(c) => c,
            Err(e) => {
                warn!(etcd = %label(&etcd).display(), "cannot reach etcd: {e}");
                tokio::select! {
                    () = leader::until_stopped(&mut stop) => break,
                    () = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        let _observer = AbortOnDrop(tokio::spawn(observe_leader(
            client.clone(),
            name.clone(),
            advertise.clone(),
            role.clone(),
        )));
        let granted = Instant::now();
        let lease = match client.lease_grant(ttl_seconds, None).await {
            Ok(l) => l.id(),
            Err(e) => {
                warn!("cannot get an etcd lease: {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut kept = std::pin::pin!(keep_lease(client.clone(), lease, ttl, granted));
        let mut campaign_client = client.clone();
        let campaign = campaign_client.campaign(name.clone(), advertise.clone(), lease);
        let leader_key = tokio::select! {
            won = campaign => match won {
                Ok(r) => r.leader().cloned(),
                Err(e) => {
                    warn!("campaign failed: {e}");
                    None
                }
            },
            reason = &mut kept => {
                warn!(reason, "lost the lease while campaigning");
                None
            }
            () = leader::until_stopped(&mut stop) => None,
        };
        let Some(leader_key) = leader_key else {
            let _ = client.lease_revoke(lease).await;
            if !stopped(&stop) {
                tokio::time::sleep(RETRY).await;
            }
            continue;
        };
        drop(_observer);
        let reason = match term(
            &config,
            &etcd,
            client.clone(),
            &leader_key,
            &metrics,
            &role,
            &mut kept,
            &mut stop,
        )
        .await
        {
            Ok(reason) => reason,
            // Never led: the role is still a standby's.
            Err(e) => {
                warn!("could not take up leadership: {e}");
                Some("registry")
            }
        };
        if let Some(reason) = reason {
            metrics.leadership_lost(reason);
        }
        // Hand over at once rather than after the TTL (no-op when the
        // lease is gone already).
        let _ = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.resign(Some(ResignOptions::new().with_leader(leader_key))),
        )
        .await;
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
    }
    Ok(())
}

/// One leadership term. Returns why it ended (`None`: asked to stop).
#[allow(clippy::too_many_arguments)]
async fn term(
    config: &MasterConfig,
    etcd: &EtcdConfig,
    client: Client,
    leader_key: &LeaderKey,
    metrics: &Arc<Metrics>,
    role: &watch::Sender<Role>,
    kept: &mut std::pin::Pin<&mut impl std::future::Future<Output = &'static str>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<&'static str>, MasterError> {
    let registry = EtcdRegistry::open(client, etcd.clone(), leader_key).await?;
    let fence = registry.fence();
    let stored = registry.load_async().await?;
    info!(
        epoch = fence.epoch,
        agents = stored.agents.len(),
        tasks = stored.tasks.len(),
        "elected leader"
    );
    let (handle, mut actor) = master::spawn(
        config.clone(),
        metrics.clone(),
        Some((Box::new(registry), stored)),
    )?;
    role.send_replace(Role::Leading {
        master: handle.clone(),
        fence: fence.clone(),
    });
    let reason = tokio::select! {
        ended = &mut actor => {
            role.send_replace(Role::Standby { leader: None });
            match ended {
                Ok(Err(e)) => warn!(epoch = fence.epoch, "stepping down: {e}"),
                Ok(Ok(())) => warn!(epoch = fence.epoch, "stepping down: the master stopped"),
                Err(e) => warn!(epoch = fence.epoch, "stepping down: the master failed: {e}"),
            }
            return Ok(Some("registry"));
        }
        reason = kept.as_mut() => Some(reason),
        () = leader::until_stopped(stop) => None,
    };
    if let Some(reason) = reason {
        warn!(
            epoch = fence.epoch,
            reason, "stepping down: the lease is lost"
        );
    }
    let _ = leader::step_down(role, &handle, actor).await;
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(
            prefix_end("/corral/registry/"),
            b"/corral/registry0".to_vec()
        );
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn etcd_urls_parse_with_and_without_a_prefix() {
        let c = EtcdConfig::parse("etcd://h1:2379, h2:2379").unwrap();
        assert_eq!(c.endpoints, vec!["http://h1:2379", "http://h2:2379"]);
        assert_eq!(c.prefix, "/corral");
        let c = EtcdConfig::parse("etcd://h1:2379/prod/corral/").unwrap();
        assert_eq!(c.prefix, "/prod/corral");
        assert!(EtcdConfig::parse("http://h1:2379").is_err());
        assert!(EtcdConfig::parse("etcd://h1:2379,,h2").is_err());
        assert_eq!(
            label(&EtcdConfig::parse("etcd://h1:2379,h2:2379").unwrap()),
            PathBuf::from("etcd://h1:2379,h2:2379/corral")
        );
    }
}

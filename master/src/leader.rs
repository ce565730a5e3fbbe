//! Who serves: the leading master's actor, or a standby that names the
//! leader. The tonic services and the HTTP routes ask [`Leadership`] for the
//! actor on every call; a single master leads from start to end, a master
//! on etcd switches between standby and leader as elections go.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

use crate::master::{Command, MasterHandle};
use crate::registry::{Fence, RegistryError};

/// How long a call waits for a leader while none is known (a client that
/// lost the leader is served as soon as the next one is elected, instead
/// of polling).
pub(crate) const LEADER_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub(crate) enum Role {
    /// This master leads: calls go to its actor; messages carry `fence`.
    Leading { master: MasterHandle, fence: Fence },
    /// Another master leads (`Some(address)`), or none is known yet.
    Standby { leader: Option<String> },
}

#[derive(Clone)]
pub(crate) struct Leadership {
    role: watch::Receiver<Role>,
}

impl Leadership {
    pub(crate) fn new(role: watch::Receiver<Role>) -> Self {
        Self { role }
    }

    pub(crate) fn current(&self) -> Role {
        self.role.borrow().clone()
    }

    /// The actor to serve a call, or the leader to send it to. A leader
    /// that does not accept connections (killed, its lease not expired yet)
    /// is not named: the call waits here for the next one.
    pub(crate) async fn leading(&self) -> Result<(MasterHandle, Fence), NotLeading> {
        let mut role = self.role.clone();
        let deadline = Instant::now() + LEADER_WAIT;
        let mut last_named = None;
        loop {
            let current = role.borrow_and_update().clone();
            match current {
                Role::Leading { master, fence } => return Ok((master, fence)),
                Role::Standby {
                    leader: Some(leader),
                } => {
                    if reachable(&leader).await {
                        return Err(NotLeading {
                            leader: Some(leader),
                        });
                    }
                    last_named = Some(leader);
                }
                Role::Standby { leader: None } => {}
            }
            match tokio::time::timeout_at(deadline, role.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(NotLeading { leader: last_named }),
            }
        }
    }
}

/// How long a standby tries to connect to the leader before it names it.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Whether `address` accepts TCP connections now.
async fn reachable(address: &str) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(address)).await,
        Ok(Ok(_))
    )
}

/// This master does not lead; `leader` is the one that does, if known.
#[derive(Debug)]
pub(crate) struct NotLeading {
    pub(crate) leader: Option<String>,
}

impl std::fmt::Display for NotLeading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.leader {
            Some(leader) => write!(f, "this master is a standby; the leader is {leader}"),
            None => write!(f, "no leading master is elected yet; try again"),
        }
    }
}

/// UNAVAILABLE with the leader in the `corral-leader` metadata.
impl From<NotLeading> for Status {
    fn from(not: NotLeading) -> Status {
        let mut status = Status::unavailable(not.to_string());
        if let Some(value) = not.leader.and_then(|l| l.parse().ok()) {
            status
                .metadata_mut()
                .insert(corral_proto::leader::LEADER_METADATA, value);
        }
        status
    }
}

/// Ends a leadership asked to stop: calls see a standby from now on, and
/// the actor closes every stream (so the server's graceful shutdown does
/// not wait on them) and ends.
pub(crate) async fn step_down(
    role: &watch::Sender<Role>,
    master: &MasterHandle,
    actor: tokio::task::JoinHandle<Result<(), RegistryError>>,
) -> Result<Result<(), RegistryError>, tokio::task::JoinError> {
    role.send_replace(Role::Standby { leader: None });
    let _ = master.request(|reply| Command::Shutdown { reply }).await;
    actor.await
}

/// Resolves once `stop` is true (or its sender is gone).
pub(crate) async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

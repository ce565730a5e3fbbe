//! Who serves: the leading master's actor, or a standby that names the
//! leader. The tonic services and the HTTP routes ask [`Leadership`] for the
//! actor on every call; a single master leads from start to end, a master
//! on etcd switches between standby and leader as elections go.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

use crate::master::MasterHandle;
use crate::registry::Fence;

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

    /// The actor to serve a call, or UNAVAILABLE naming the leader. A
    /// leader that does not accept connections (killed, its lease not
    /// expired yet) is not named: the call waits here for the next one.
    pub(crate) async fn leading(&self) -> Result<(MasterHandle, Fence), Status> {
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
                        return Err(not_leader(Some(&leader)));
                    }
                    last_named = Some(leader);
                }
                Role::Standby { leader: None } => {}
            }
            match tokio::time::timeout_at(deadline, role.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(not_leader(last_named.as_deref())),
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

/// UNAVAILABLE with the leader in the `corral-leader` metadata.
pub(crate) fn not_leader(leader: Option<&str>) -> Status {
    match leader {
        Some(leader) => {
            let mut status =
                Status::unavailable(format!("this master is a standby; the leader is {leader}"));
            if let Ok(value) = leader.parse() {
                status
                    .metadata_mut()
                    .insert(corral_proto::leader::LEADER_METADATA, value);
            }
            status
        }
        None => Status::unavailable("no leading master is elected yet; try again"),
    }
}

/// Resolves once `stop` is true (or its sender is gone).
pub(crate) async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

//! The one error type of the SDK.

use std::time::Duration;

/// What can go wrong talking to the master.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The driver has no live subscription (not yet subscribed, reconnecting,
    /// or stopped); calls fail fast instead of queueing.
    #[error("not subscribed to the master")]
    NotSubscribed,

    /// `DriverConfig::master` is not a usable address.
    #[error("invalid master address '{address}': {reason}")]
    InvalidMaster { address: String, reason: String },

    /// A value the framework passed in is invalid (e.g. `framework_info.id`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Could not connect to the master.
    #[error("cannot connect to master {master}: {source}")]
    Transport {
        master: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// The master (or the transport under the call) answered with a gRPC
    /// error, e.g. `InvalidArgument` with `field.path: reason`.
    #[error("master answered {code:?}: {message}")]
    Status { code: tonic::Code, message: String },

    /// A call got no answer in time.
    #[error("{call} call to the master timed out after {after:?}")]
    Timeout { call: &'static str, after: Duration },

    /// The master no longer knows the framework (torn down, or its failover
    /// timeout expired). Fatal: re-subscribing cannot succeed.
    #[error("framework {framework_id} was removed by the master: {message}")]
    FrameworkRemoved {
        framework_id: String,
        message: String,
    },

    /// The master sent an `Error` event: it will not serve this subscription
    /// any more (torn down, or replaced by a newer subscription of the same
    /// framework id).
    #[error("master ended the subscription of framework {framework_id}: {message}")]
    Terminated {
        framework_id: String,
        message: String,
    },

    /// The master broke the protocol (e.g. the first event was not
    /// `Subscribed`).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl DriverError {
    /// The gRPC code for [`DriverError::Status`], `None` otherwise.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            DriverError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The one place a gRPC status becomes an SDK error.
    pub(crate) fn from_status(status: tonic::Status) -> Self {
        DriverError::Status {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

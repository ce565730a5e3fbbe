//! What the `corral batch` and `corral service` clients share: the gRPC
//! channel to a framework's API, and [`CallError`], the one place where a
//! gRPC status becomes the message the user reads.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// A framework that does not accept a connection this fast is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for one call; GetJob of a 100 000-task array is the slowest.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Which framework's API a client talks to, as its messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Api {
    /// `batch`, `service`.
    pub(crate) name: &'static str,
    /// The flag and the environment variable that point at it.
    pub(crate) flag: &'static str,
    pub(crate) env: &'static str,
    /// What else a wrong address may be.
    pub(crate) others: &'static str,
}

/// A channel to `addr` that connects on first use, so an unreachable
/// framework surfaces as an `Unavailable` [`CallError`] like any other
/// failed call.
pub(crate) fn channel(api: Api, addr: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("{}: '{addr}' is not HOST:PORT", api.flag))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(RPC_TIMEOUT);
    Ok(endpoint.connect_lazy())
}

/// A failed call to a framework's API, displayed as what the user should
/// read.
#[derive(Debug)]
pub(crate) struct CallError {
    api: Api,
    status: tonic::Status,
    addr: String,
}

impl CallError {
    pub(crate) fn new(api: Api, addr: &str, status: tonic::Status) -> Self {
        Self {
            api,
            status,
            addr: addr.to_string(),
        }
    }

    /// The framework could not be reached (not running, restarting, wrong
    /// address): worth retrying while waiting for it.
    pub(crate) fn is_unavailable(&self) -> bool {
        self.status.code() == Code::Unavailable
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = self.status.message();
        let (addr, api) = (&self.addr, self.api);
        let name = api.name;
        match self.status.code() {
            // The framework's own words, which name the field or the object.
            Code::InvalidArgument
            | Code::AlreadyExists
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::OutOfRange
                if !message.is_empty() =>
            {
                f.write_str(message)
            }
            Code::Unavailable => write!(
                f,
                "cannot reach the {name} framework at {addr} (is it running? start it with \
                 `corral {name} serve` or `corral dev`, or point {} / {} at it): {message}",
                api.flag, api.env
            ),
            Code::DeadlineExceeded => write!(
                f,
                "the {name} framework at {addr} did not answer within {}s",
                RPC_TIMEOUT.as_secs()
            ),
            Code::Unimplemented => write!(
                f,
                "{addr} does not serve the {name} API (is it {}?): {message}",
                api.others
            ),
            code if message.is_empty() => write!(f, "{addr}: {}", code.description()),
            code => write!(f, "{addr}: {}: {message}", code.description()),
        }
    }
}

impl std::error::Error for CallError {}

#[cfg(test)]
mod tests {
    use super::*;

    const API: Api = Api {
        name: "batch",
        flag: "--batch",
        env: "CORRAL_BATCH",
        others: "a master or an agent",
    };

    fn message(code: Code, text: &str) -> String {
        CallError::new(API, "127.0.0.1:5060", tonic::Status::new(code, text)).to_string()
    }

    #[test]
    fn refusals_read_as_the_frameworks_own_message() {
        assert_eq!(
            message(Code::InvalidArgument, "job.cpus: must be finite and > 0"),
            "job.cpus: must be finite and > 0"
        );
        assert_eq!(message(Code::NotFound, "no job 'x'"), "no job 'x'");
    }

    #[test]
    fn an_unreachable_framework_says_where_it_was_looked_for() {
        let text = message(Code::Unavailable, "tcp connect error");
        assert!(text.contains("127.0.0.1:5060"), "{text}");
        assert!(text.contains("--batch / CORRAL_BATCH"), "{text}");
        assert!(text.contains("corral batch serve"), "{text}");
        let text = message(Code::Unimplemented, "");
        assert!(text.contains("a master or an agent"), "{text}");
        let text = message(Code::Internal, "");
        assert!(text.contains("127.0.0.1:5060"), "{text}");
    }
}

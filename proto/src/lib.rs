//! Corral's wire types and the exact arithmetic and validation over them.
//!
//! - [`pb`]: the generated protobuf/tonic code for `corral.v1` (agent ⇄ master
//!   stream, framework API, agent API, the batch and service frameworks' specs).
//! - [`ids`]: validated id newtypes (`AgentId`, `FrameworkId`, `TaskId`, `OfferId`,
//!   `VolumeId`).
//! - [`resources`]: fixed-point resource amounts, port ranges, parsing of the
//!   `cpus:4;mem:8192;ports:[31000-32000]` text form, and validation of wire values.
//! - [`leader`]: master lists, the standby's leader hint, and the epoch fence.
//! - [`attributes`]: agent attributes and their text form (`rack:r1;zone:a`).
//! - [`task`]: task state helpers (terminal states, names, timestamps).

pub mod attributes;
pub mod ids;
pub mod leader;
pub mod resources;
pub mod task;

/// Generated code for the `corral.v1` protobuf package.
#[allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
pub mod pb {
    tonic::include_proto!("corral.v1");
}

pub use ids::{AgentId, FrameworkId, IdError, OfferId, TaskId, VolumeId};
pub use resources::{Amount, RangeSet, ResourceError, Resources};

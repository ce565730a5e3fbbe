//! Corral's pure allocator: decides which framework is offered which agent's
//! free resources, by two-level Dominant Resource Fairness (roles, then the
//! frameworks in a role), honouring role weights, decline filters and
//! suppress/revive.
//!
//! Pure by design: no tokio, no clock reads, no unseeded randomness. Time
//! comes in as an argument (`now`, a `Duration` since an epoch the master
//! picks); allocations come out as return values. The master's actor owns one
//! [`Allocator`] and drives it.
//!
//! Modules:
//! - `allocator`: the [`Allocator`] and [`Allocation`] (public API, round logic).
//! - `sorter`: the DRF fairness order (Mesos `sorter/drf`), one instance for
//!   roles and one per role for its frameworks.
//! - `filters`: per-agent decline filters with a cached "blocked" set.
//! - `scalars`: integer scalar vectors used for shares.
//! - `bitset`: growable bit sets over framework slots.
//! - `slots`: dense `u32` slots for agents, frameworks and roles.
//! - `proptests` (tests only): random operation sequences checked against a
//!   slow reference model.

mod allocator;
mod bitset;
mod filters;
#[cfg(test)]
mod proptests;
mod scalars;
mod slots;
mod sorter;

pub use allocator::{Allocation, Allocator, DEFAULT_ROLE};

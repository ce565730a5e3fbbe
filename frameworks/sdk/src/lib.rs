//! The Corral framework SDK: write a framework as a [`Scheduler`] (a handful of
//! async callbacks) and let a [`Driver`] own the connection to the master.
//!
//! The driver subscribes, re-subscribes with the same framework id after a
//! lost stream or missed heartbeats (capped exponential backoff with jitter),
//! reconciles after every subscription, acknowledges agent status updates after
//! the callback has seen them (several acknowledgements in flight at once) and
//! drops duplicates of updates it already delivered. A framework that must
//! persist updates before they are acknowledged turns
//! [`DriverConfig::implicit_acknowledgements`] off and calls
//! [`SchedulerClient::acknowledge`] itself; it then sees every resent copy.
//! Callbacks run one at a time, in event order, on the task that
//! awaits [`Driver::run`]; calls to the master go through a cheap, cloneable
//! [`SchedulerClient`] usable from anywhere.
//!
//! ```no_run
//! use corral_sdk::{async_trait, pb, Driver, DriverConfig, Scheduler, SchedulerClient};
//!
//! struct Decliner;
//!
//! #[async_trait]
//! impl Scheduler for Decliner {
//!     async fn offers(&mut self, client: &SchedulerClient, offers: Vec<pb::Offer>) {
//!         let ids: Vec<_> = offers
//!             .iter()
//!             .filter_map(|o| corral_sdk::OfferId::parse(&o.id, "offer.id").ok())
//!             .collect();
//!         let _ = client.decline(&ids, None).await;
//!     }
//! }
//!
//! # async fn demo() -> Result<(), corral_sdk::DriverError> {
//! let framework = pb::FrameworkInfo { name: "decliner".into(), ..Default::default() };
//! let (driver, _client) = Driver::new(DriverConfig::new("127.0.0.1:5050", framework));
//! driver.run(Decliner).await
//! # }
//! ```
//!
//! Modules:
//! - `scheduler`: the [`Scheduler`] trait.
//! - `driver`: [`Driver`], [`DriverConfig`] and the subscription loop.
//! - `client`: [`SchedulerClient`], the calls a framework makes.
//! - `error`: [`DriverError`].
//! - `task`: [`TaskBuilder`].
//! - `offer`: [`OfferResources`], carving tasks out of one offer.
//! - [`constraint`]: placement constraints on agent attributes.
//! - [`spec`]: what the frameworks' specs share: durations and names.
//! - [`runtime`]: what a long-lived framework process needs around its
//!   actor: a driver with explicit acknowledgements, an event forwarder, and
//!   re-registration after the master removed the framework.
//! - `backoff`, `recent`: reconnect backoff and the duplicate-update memory.

mod backoff;
mod client;
pub mod constraint;
mod driver;
mod error;
mod offer;
mod recent;
pub mod runtime;
mod scheduler;
pub mod spec;
mod task;

pub use async_trait::async_trait;
pub use client::SchedulerClient;
pub use constraint::Constraint;
pub use corral_proto::{
    AgentId, FrameworkId, OfferId, RangeSet, ResourceError, Resources, TaskId, VolumeId, pb,
};
pub use driver::{
    DEFAULT_MISSED_HEARTBEATS, DEFAULT_RECONNECT_BACKOFF_INITIAL, DEFAULT_RECONNECT_BACKOFF_MAX,
    Driver, DriverConfig,
};
pub use error::DriverError;
pub use offer::{OfferResources, shortfall};
pub use scheduler::Scheduler;
pub use task::TaskBuilder;

/// Compiles the README's framework example, so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExample;

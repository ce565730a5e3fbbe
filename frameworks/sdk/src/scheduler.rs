//! The callbacks a framework implements.

use async_trait::async_trait;
use corral_proto::{AgentId, FrameworkId, OfferId, pb};

use crate::client::SchedulerClient;

/// A framework's reaction to master events.
///
/// The driver calls these one at a time, in the order the master sent the
/// events, from the task that awaits [`Driver::run`](crate::Driver::run);
/// the next event waits until the callback returns. A callback may call the
/// master through `client` (or hand a clone of it to other tasks). Only
/// [`offers`](Scheduler::offers) is required.
///
/// Implement with [`#[async_trait]`](crate::async_trait). `&mut S` and
/// `Box<S>` are schedulers too, so `driver.run(&mut my_scheduler)` leaves the
/// scheduler with the caller for inspection afterwards.
#[async_trait]
pub trait Scheduler: Send {
    /// After every (re-)subscription, before the driver's implicit
    /// reconciliation is sent. `framework_id` stays the same across
    /// re-subscriptions.
    async fn subscribed(&mut self, _client: &SchedulerClient, _framework_id: &FrameworkId) {}

    /// New offers. Accept (launch) or decline each one; an offer that is
    /// neither stays allocated to the framework until the master rescinds it.
    async fn offers(&mut self, client: &SchedulerClient, offers: Vec<pb::Offer>);

    /// The master took back an offer (e.g. its agent was lost).
    async fn rescinded(&mut self, _client: &SchedulerClient, _offer_id: &OfferId) {}

    /// A task status update.
    ///
    /// With implicit acknowledgements (the default), agent updates are
    /// acknowledged by the driver after this returns, and an update already
    /// delivered (same uuid) is not delivered again. Still, treat updates
    /// idempotently: reconciliation can repeat a state, and the duplicate
    /// memory is bounded.
    ///
    /// With [`DriverConfig::implicit_acknowledgements`] off, acknowledge each
    /// agent update (non-empty `uuid`) yourself with
    /// [`SchedulerClient::acknowledge`] once it is durable, here or later
    /// from another task; the agent holds back the task's next update until
    /// then. Every copy the agent resends is delivered, so the same update
    /// (same uuid) can arrive several times, also after you acknowledged it
    /// (the acknowledgement was lost) or after a restart: handle it
    /// idempotently and acknowledge it again.
    ///
    /// [`DriverConfig::implicit_acknowledgements`]: crate::DriverConfig::implicit_acknowledgements
    async fn status_update(&mut self, _client: &SchedulerClient, _status: &pb::TaskStatus) {}

    /// An agent was removed or lost; its tasks get their own updates.
    async fn failure(&mut self, _client: &SchedulerClient, _agent_id: &AgentId) {}

    /// The driver is about to stop with an error (framework removed, or the
    /// master ended the subscription). `run` returns the error next.
    async fn error(&mut self, _client: &SchedulerClient, _message: &str) {}

    /// The subscription was lost; calls fail with
    /// [`DriverError::NotSubscribed`](crate::DriverError::NotSubscribed) until
    /// the driver has re-subscribed (`subscribed` is called again then).
    async fn disconnected(&mut self, _client: &SchedulerClient) {}
}

macro_rules! forward_scheduler {
    ($ty:ty) => {
        #[async_trait]
        impl<S: Scheduler + ?Sized> Scheduler for $ty {
            async fn subscribed(&mut self, client: &SchedulerClient, framework_id: &FrameworkId) {
                (**self).subscribed(client, framework_id).await
            }
            async fn offers(&mut self, client: &SchedulerClient, offers: Vec<pb::Offer>) {
                (**self).offers(client, offers).await
            }
            async fn rescinded(&mut self, client: &SchedulerClient, offer_id: &OfferId) {
                (**self).rescinded(client, offer_id).await
            }
            async fn status_update(&mut self, client: &SchedulerClient, status: &pb::TaskStatus) {
                (**self).status_update(client, status).await
            }
            async fn failure(&mut self, client: &SchedulerClient, agent_id: &AgentId) {
                (**self).failure(client, agent_id).await
            }
            async fn error(&mut self, client: &SchedulerClient, message: &str) {
                (**self).error(client, message).await
            }
            async fn disconnected(&mut self, client: &SchedulerClient) {
                (**self).disconnected(client).await
            }
        }
    };
}

forward_scheduler!(&mut S);
forward_scheduler!(Box<S>);

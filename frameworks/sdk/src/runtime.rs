//! What a long-lived framework process needs around its own logic, shared
//! by the batch and service frameworks: a driver that acknowledges only when
//! the framework says so (after its store commit), a scheduler that forwards
//! every event to the framework's actor without waiting on it, and a loop
//! that registers anew when the master removed the framework.
//!
//! The shape (one actor owns the state and a store; the driver only
//! forwards) is the one `corral-batch` and `corral-service` use; a framework
//! of your own can use it the same way.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{Driver, DriverConfig, DriverError, FrameworkId, Scheduler, SchedulerClient, pb};

/// Who a framework process subscribes as; the framework id comes from its
/// store (a failover) or from the master (a new framework).
#[derive(Debug, Clone)]
pub struct FrameworkIdentity {
    /// Master address, `HOST:PORT`.
    pub master: String,
    pub name: String,
    pub role: String,
    /// How long the master keeps the framework's tasks while no instance
    /// of it is connected.
    pub failover_timeout: Duration,
}

impl FrameworkIdentity {
    /// A driver subscribing as `framework_id` (None: a new framework), with
    /// implicit acknowledgements off: the framework acknowledges an update
    /// once it has made it durable.
    pub fn driver(&self, framework_id: Option<&str>) -> (Driver, SchedulerClient) {
        let framework = pb::FrameworkInfo {
            id: framework_id.unwrap_or_default().to_string(),
            name: self.name.clone(),
            role: self.role.clone(),
            failover_timeout_seconds: self.failover_timeout.as_secs_f64(),
            hostname: hostname(),
            ..Default::default()
        };
        let mut config = DriverConfig::new(self.master.clone(), framework);
        config.implicit_acknowledgements = false;
        Driver::new(config)
    }
}

/// One scheduler event, as a framework's actor receives it.
#[derive(Debug, Clone)]
pub enum SchedulerEvent {
    Subscribed(FrameworkId),
    Disconnected,
    Offers(Vec<pb::Offer>),
    Update(pb::TaskStatus),
}

/// A [`Scheduler`] that sends every event to an actor's channel and returns,
/// so the driver never waits on the actor's store commits.
pub struct Forwarder<C> {
    tx: mpsc::Sender<C>,
}

impl<C> Forwarder<C> {
    pub fn new(tx: mpsc::Sender<C>) -> Self {
        Self { tx }
    }

    async fn forward(&self, event: SchedulerEvent)
    where
        C: From<SchedulerEvent>,
    {
        // A closed channel means the actor stopped; the process is ending.
        let _ = self.tx.send(C::from(event)).await;
    }
}

#[async_trait]
impl<C: From<SchedulerEvent> + Send + 'static> Scheduler for Forwarder<C> {
    async fn subscribed(&mut self, _client: &SchedulerClient, framework_id: &FrameworkId) {
        self.forward(SchedulerEvent::Subscribed(framework_id.clone()))
            .await;
    }

    async fn offers(&mut self, _client: &SchedulerClient, offers: Vec<pb::Offer>) {
        self.forward(SchedulerEvent::Offers(offers)).await;
    }

    async fn status_update(&mut self, _client: &SchedulerClient, status: &pb::TaskStatus) {
        self.forward(SchedulerEvent::Update(status.clone())).await;
    }

    async fn disconnected(&mut self, _client: &SchedulerClient) {
        self.forward(SchedulerEvent::Disconnected).await;
    }
}

/// Runs `driver` with a [`Forwarder`] to `tx`. If the master removed the
/// framework (its failover timeout passed while no instance of it ran, so
/// its tasks were killed), registers anew as a new framework and hands the
/// new client to `use_client`; the actor then reconciles and finds its old
/// tasks unknown. Any other driver error is returned.
pub async fn drive<C, F, Fut>(
    identity: &FrameworkIdentity,
    mut driver: Driver,
    tx: mpsc::Sender<C>,
    mut use_client: F,
) -> Result<(), DriverError>
where
    C: From<SchedulerEvent> + Send + 'static,
    F: FnMut(SchedulerClient) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        match driver.run(Forwarder::new(tx.clone())).await {
            Err(DriverError::FrameworkRemoved {
                framework_id,
                message,
            }) => {
                tracing::error!(
                    %framework_id,
                    %message,
                    framework = %identity.name,
                    "the master removed this framework and killed its tasks; registering as a new framework"
                );
                let (next, client) = identity.driver(None);
                use_client(client).await;
                driver = next;
            }
            other => return other,
        }
    }
}

/// Aborts the task when dropped: a framework's `run` future that is dropped
/// (e.g. an aborted test) takes its driver and actor tasks with it.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This machine's hostname, for `FrameworkInfo.hostname` (empty if unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

impl DriverError {
    /// True when the failed call certainly had no effect on the master: it
    /// was never sent, or the master answered with an error. A timeout or a
    /// broken connection is not certain (the master may have acted), so the
    /// framework must reconcile instead of assuming.
    pub fn certainly_refused(&self) -> bool {
        matches!(
            self,
            DriverError::NotSubscribed | DriverError::InvalidArgument(_)
        ) || self.code().is_some_and(|c| {
            !matches!(
                c,
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_and_unsent_calls_are_certain_refusals() {
        let status = |code| DriverError::Status {
            code,
            message: String::new(),
        };
        assert!(DriverError::NotSubscribed.certainly_refused());
        assert!(DriverError::InvalidArgument("x".into()).certainly_refused());
        assert!(status(tonic::Code::InvalidArgument).certainly_refused());
        assert!(status(tonic::Code::NotFound).certainly_refused());
        for unsure in [
            tonic::Code::Unavailable,
            tonic::Code::Unknown,
            tonic::Code::Cancelled,
            tonic::Code::DeadlineExceeded,
        ] {
            assert!(!status(unsure).certainly_refused(), "{unsure:?}");
        }
        let timeout = DriverError::Timeout {
            call: "accept",
            after: Duration::from_secs(1),
        };
        assert!(!timeout.certainly_refused());
    }

    #[tokio::test]
    async fn the_driver_carries_the_identity_and_the_stored_id() {
        let identity = FrameworkIdentity {
            master: "127.0.0.1:1".into(),
            name: "fw".into(),
            role: "batch".into(),
            failover_timeout: Duration::from_secs(60),
        };
        // Building a driver does not dial; it only checks the address.
        let (_driver, client) = identity.driver(Some("fw-1"));
        assert_eq!(
            client.framework_id().map(|f| f.to_string()),
            Some("fw-1".into())
        );
    }
}

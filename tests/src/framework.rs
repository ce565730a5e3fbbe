//! A framework on the raw gRPC API. Unlike the SDK it does exactly what the
//! test says: it can skip acknowledgements, reuse offers, or send garbage.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use corral_proto::pb::{self, scheduler_client::SchedulerClient};
use corral_proto::task::is_terminal;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;

use crate::WAIT;

pub struct TestFramework {
    pub id: String,
    pub stream_id: String,
    pub client: SchedulerClient<Channel>,
    /// Acknowledge agent updates as they arrive (default true).
    pub auto_ack: bool,
    events: mpsc::UnboundedReceiver<pb::Event>,
    reader: JoinHandle<()>,
    /// Offers received and not yet taken by `wait_offers`.
    pub offers: VecDeque<pb::Offer>,
    /// Every update received, in order.
    pub updates: Vec<pb::TaskStatus>,
    /// Messages of `Error` events.
    pub errors: Vec<String>,
    pub rescinded: Vec<String>,
}

impl TestFramework {
    pub async fn subscribe(master: SocketAddr, name: &str, role: &str) -> TestFramework {
        let info = pb::FrameworkInfo {
            name: name.into(),
            role: role.into(),
            failover_timeout_seconds: 0.0,
            ..Default::default()
        };
        Self::subscribe_with(master, info).await.expect("subscribe")
    }

    pub async fn subscribe_with(
        master: SocketAddr,
        info: pb::FrameworkInfo,
    ) -> Result<TestFramework, Status> {
        let mut client = SchedulerClient::connect(format!("http://{master}"))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut stream = client
            .subscribe(pb::SubscribeRequest {
                framework_info: Some(info),
            })
            .await?
            .into_inner();
        let first = tokio::time::timeout(WAIT, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no subscribed event"))??;
        let Some(pb::Event {
            event: Some(pb::event::Event::Subscribed(sub)),
            ..
        }) = first
        else {
            return Err(Status::internal(format!(
                "first event was not subscribed: {first:?}"
            )));
        };
        let (tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Ok(Some(e)) = stream.message().await {
                if tx.send(e).is_err() {
                    break;
                }
            }
        });
        Ok(TestFramework {
            id: sub.framework_id,
            stream_id: sub.stream_id,
            client,
            auto_ack: true,
            events,
            reader,
            offers: VecDeque::new(),
            updates: Vec::new(),
            errors: Vec::new(),
            rescinded: Vec::new(),
        })
    }

    pub fn header(&self) -> Option<pb::CallHeader> {
        Some(pb::CallHeader {
            framework_id: self.id.clone(),
            stream_id: self.stream_id.clone(),
        })
    }

    /// Handles one event if one arrives within `timeout`; false otherwise
    /// (also when the stream ended).
    pub async fn pump(&mut self, timeout: Duration) -> bool {
        let Ok(Some(event)) = tokio::time::timeout(timeout, self.events.recv()).await else {
            return false;
        };
        match event.event {
            Some(pb::event::Event::Offers(o)) => self.offers.extend(o.offers),
            Some(pb::event::Event::Update(u)) => {
                if let Some(status) = u.status {
                    if self.auto_ack && !status.uuid.is_empty() {
                        self.acknowledge(&status).await.expect("acknowledge");
                    }
                    self.updates.push(status);
                }
            }
            Some(pb::event::Event::Rescind(r)) => {
                self.offers.retain(|o| o.id != r.offer_id);
                self.rescinded.push(r.offer_id);
            }
            Some(pb::event::Event::Error(e)) => self.errors.push(e.message),
            _ => {}
        }
        true
    }

    /// Pumps events until `check` holds, or panics after [`WAIT`].
    pub async fn until<T>(
        &mut self,
        what: &str,
        mut check: impl FnMut(&mut Self) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(v) = check(self) {
                return v;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                panic!("framework {}: timed out waiting for: {what}", self.id);
            }
            self.pump(left.min(Duration::from_millis(100))).await;
        }
    }

    /// Waits for at least one offer and takes all buffered offers.
    pub async fn wait_offers(&mut self) -> Vec<pb::Offer> {
        self.until("an offer", |f| {
            (!f.offers.is_empty()).then(|| f.offers.drain(..).collect())
        })
        .await
    }

    /// Waits for an update of `task_id` in `state` and returns it.
    pub async fn wait_update(&mut self, task_id: &str, state: pb::TaskState) -> pb::TaskStatus {
        let what = format!("{task_id} {}", state.as_str_name());
        self.until(&what, |f| {
            f.updates
                .iter()
                .find(|u| u.task_id == task_id && u.state() == state)
                .cloned()
        })
        .await
    }

    /// Waits for a terminal update of `task_id`.
    pub async fn wait_terminal(&mut self, task_id: &str) -> pb::TaskStatus {
        self.until(&format!("{task_id} terminal"), |f| {
            f.updates
                .iter()
                .find(|u| u.task_id == task_id && is_terminal(u.state()))
                .cloned()
        })
        .await
    }

    /// True when no offer arrives for `window` (used after decline/suppress;
    /// absence can only be observed over a window).
    pub async fn no_offers_for(&mut self, window: Duration) -> bool {
        self.offers.clear();
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return self.offers.is_empty();
            }
            self.pump(left).await;
            if !self.offers.is_empty() {
                return false;
            }
        }
    }

    pub async fn accept(
        &mut self,
        offer_ids: Vec<String>,
        tasks: Vec<pb::TaskInfo>,
        refuse: Option<f64>,
    ) -> Result<(), Status> {
        self.client
            .accept(pb::AcceptRequest {
                header: self.header(),
                offer_ids,
                operations: vec![pb::Operation {
                    operation: Some(pb::operation::Operation::Launch(pb::Launch { tasks })),
                }],
                filters: Some(pb::Filters {
                    refuse_seconds: refuse,
                }),
            })
            .await
            .map(|_| ())
    }

    /// Accepts `offer_ids` with one LAUNCH_GROUP of `group` (its tasks'
    /// agent id is set to `agent_id`).
    pub async fn accept_group(
        &mut self,
        offer_ids: Vec<String>,
        agent_id: &str,
        mut group: pb::TaskGroupInfo,
    ) -> Result<(), Status> {
        for t in &mut group.tasks {
            t.agent_id = agent_id.to_string();
        }
        self.client
            .accept(pb::AcceptRequest {
                header: self.header(),
                offer_ids,
                operations: vec![pb::Operation {
                    operation: Some(pb::operation::Operation::LaunchGroup(pb::LaunchGroup {
                        task_group: Some(group),
                    })),
                }],
                filters: Some(pb::Filters {
                    refuse_seconds: Some(0.0),
                }),
            })
            .await
            .map(|_| ())
    }

    /// Accepts `offer_ids` with these operations, as they are.
    pub async fn accept_operations(
        &mut self,
        offer_ids: Vec<String>,
        operations: Vec<pb::Operation>,
    ) -> Result<(), Status> {
        self.client
            .accept(pb::AcceptRequest {
                header: self.header(),
                offer_ids,
                operations,
                filters: Some(pb::Filters {
                    refuse_seconds: Some(0.0),
                }),
            })
            .await
            .map(|_| ())
    }

    pub async fn destroy_volume(&mut self, volume_id: &str) -> Result<(), Status> {
        self.client
            .destroy_volume(pb::DestroyVolumeRequest {
                header: self.header(),
                volume_id: volume_id.to_string(),
            })
            .await
            .map(|_| ())
    }

    /// Launches `tasks` on `offer` (their agent id is set to the offer's).
    pub async fn launch(&mut self, offer: &pb::Offer, mut tasks: Vec<pb::TaskInfo>) {
        for t in &mut tasks {
            t.agent_id = offer.agent_id.clone();
        }
        self.accept(vec![offer.id.clone()], tasks, None)
            .await
            .expect("accept");
    }

    pub async fn decline(
        &mut self,
        offer_ids: Vec<String>,
        refuse: Option<f64>,
    ) -> Result<(), Status> {
        self.client
            .decline(pb::DeclineRequest {
                header: self.header(),
                offer_ids,
                filters: Some(pb::Filters {
                    refuse_seconds: refuse,
                }),
            })
            .await
            .map(|_| ())
    }

    pub async fn revive(&mut self) -> Result<(), Status> {
        self.client
            .revive(pb::ReviveRequest {
                header: self.header(),
            })
            .await
            .map(|_| ())
    }

    pub async fn suppress(&mut self) -> Result<(), Status> {
        self.client
            .suppress(pb::SuppressRequest {
                header: self.header(),
            })
            .await
            .map(|_| ())
    }

    pub async fn kill(&mut self, task_id: &str) -> Result<(), Status> {
        self.client
            .kill(pb::KillRequest {
                header: self.header(),
                task_id: task_id.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn acknowledge(&mut self, status: &pb::TaskStatus) -> Result<(), Status> {
        self.client
            .acknowledge(pb::AcknowledgeRequest {
                header: self.header(),
                agent_id: status.agent_id.clone(),
                task_id: status.task_id.clone(),
                uuid: status.uuid.clone(),
            })
            .await
            .map(|_| ())
    }

    pub async fn reconcile(&mut self, tasks: Vec<(String, String)>) -> Result<(), Status> {
        self.client
            .reconcile(pb::ReconcileRequest {
                header: self.header(),
                tasks: tasks
                    .into_iter()
                    .map(|(task_id, agent_id)| pb::ReconcileTask { task_id, agent_id })
                    .collect(),
            })
            .await
            .map(|_| ())
    }

    pub async fn teardown(&mut self) -> Result<(), Status> {
        self.client
            .teardown(pb::TeardownRequest {
                header: self.header(),
            })
            .await
            .map(|_| ())
    }
}

impl Drop for TestFramework {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A shell task with the given resources.
pub fn shell_task(id: &str, command: &str, cpus: f64, mem: f64) -> pb::TaskInfo {
    use pb::resource::Value;
    pb::TaskInfo {
        task_id: id.into(),
        name: id.into(),
        resources: vec![
            pb::Resource {
                name: "cpus".into(),
                value: Some(Value::Scalar(cpus)),
            },
            pb::Resource {
                name: "mem".into(),
                value: Some(Value::Scalar(mem)),
            },
        ],
        command: Some(pb::CommandInfo {
            shell: true,
            value: command.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

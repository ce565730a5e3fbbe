//! The tonic services. They only translate: each request becomes a
//! [`Command`] for the master actor, and the reply becomes the response.

use std::time::Duration;

use corral_proto::pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::Stream;

use crate::leader::Leadership;
use crate::master::{Call, Command, MasterHandle, agent_channel};
use crate::registry::Fence;

/// An agent must say who it is this soon after opening its stream.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct SchedulerApi {
    pub(crate) leadership: Leadership,
}

impl SchedulerApi {
    async fn call(&self, call: Call) -> Result<Response<pb::CallResponse>, Status> {
        let (master, _) = self.leadership.leading().await?;
        master
            .request(|reply| Command::Call { call, reply })
            .await??;
        Ok(Response::new(pb::CallResponse {}))
    }
}

#[tonic::async_trait]
impl pb::scheduler_server::Scheduler for SchedulerApi {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let (master, fence) = self.leadership.leading().await?;
        let sub = master
            .request(|reply| Command::Subscribe { request, reply })
            .await??;
        Ok(Response::new(EventStream {
            inner: Stamped {
                inner: ReceiverStream::new(sub.events),
                fence,
            },
            master,
            framework_id: Some(sub.framework_id),
            stream_id: sub.stream_id,
        }))
    }

    async fn accept(
        &self,
        r: Request<pb::AcceptRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.call(Call::Accept(r.into_inner())).await
    }

    async fn decline(
        &self,
        r: Request<pb::DeclineRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.call(Call::Decline(r.into_inner())).await
    }

    async fn revive(
        &self,
        r: Request<pb::ReviveRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.call(Call::Revive(r.into_inner())).await
    }

    async fn suppress(
        &self,
        r: Request<pb::SuppressRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.call(Call::Suppress(r.into_inner())).await
    }

    async fn kill(
        &self,
        r: Request<pb::KillRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.call(Call::Kill(r.into_inner())).await
    }

    async fn acknowledge(
        &self,
        r: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.call(Call::Acknowledge(r.into_inner())).await
    }

    async fn reconcile(
        &self,
        r: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.call(Call::Reconcile(r.into_inner())).await
    }

    async fn teardown(
        &self,
        r: Request<pb::TeardownRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.call(Call::Teardown(r.into_inner())).await
    }

    async fn destroy_volume(
        &self,
        r: Request<pb::DestroyVolumeRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.call(Call::DestroyVolume(r.into_inner())).await
    }
}

pub(crate) struct AgentRegistryApi {
    pub(crate) leadership: Leadership,
}

#[tonic::async_trait]
impl pb::agent_registry_server::AgentRegistry for AgentRegistryApi {
    type AttachStream = Stamped<pb::MasterMessage>;

    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no register message within 30 s"))??;
        let register = match first.and_then(|m| m.message) {
            Some(pb::agent_message::Message::Register(r)) => r,
            _ => {
                return Err(Status::invalid_argument(
                    "message: the first message must be register",
                ));
            }
        };
        let (master, fence) = self.leadership.leading().await?;
        let (tx, rx) = agent_channel();
        let (agent_id, conn) = master
            .request(|reply| Command::AgentRegister {
                register,
                tx,
                reply,
            })
            .await??;
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::AgentMessage {
                        message: Some(message),
                    })) => {
                        let agent_id = agent_id.clone();
                        master
                            .send(Command::AgentMessage {
                                agent_id,
                                conn,
                                message,
                            })
                            .await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        debug!(agent_id = %agent_id, "agent stream error: {e}");
                        break;
                    }
                }
            }
            master
                .send(Command::AgentDisconnected { agent_id, conn })
                .await;
        });
        Ok(Response::new(Stamped {
            inner: ReceiverStream::new(rx),
            fence,
        }))
    }
}

/// A message from the leading master: it carries the leader's epoch, and
/// the first one of a stream (`Registered`, `Subscribed`) the registry's id.
pub(crate) trait Fenced {
    fn stamp(&mut self, fence: &Fence);
}

impl Fenced for pb::MasterMessage {
    fn stamp(&mut self, fence: &Fence) {
        self.epoch = fence.epoch;
        if let Some(pb::master_message::Message::Registered(r)) = &mut self.message {
            r.registry_id.clone_from(&fence.registry_id);
        }
    }
}

impl Fenced for pb::Event {
    fn stamp(&mut self, fence: &Fence) {
        self.epoch = fence.epoch;
        if let Some(pb::event::Event::Subscribed(s)) = &mut self.event {
            s.registry_id.clone_from(&fence.registry_id);
        }
    }
}

/// A stream from the master's actor, each message stamped with the fence.
pub(crate) struct Stamped<T> {
    inner: ReceiverStream<Result<T, Status>>,
    fence: Fence,
}

impl<T: Fenced> Stream for Stamped<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut item = std::task::ready!(Pin::new(&mut self.inner).poll_next(cx));
        if let Some(Ok(message)) = &mut item {
            message.stamp(&self.fence);
        }
        Poll::Ready(item)
    }
}

/// A framework's event stream. tonic drops it when the scheduler goes away,
/// and that is how the master learns of the disconnection.
pub(crate) struct EventStream {
    inner: Stamped<pb::Event>,
    master: MasterHandle,
    framework_id: Option<corral_proto::FrameworkId>,
    stream_id: String,
}

impl Stream for EventStream {
    type Item = Result<pb::Event, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(framework_id) = self.framework_id.take() {
            self.master.send_from_drop(Command::FrameworkDisconnected {
                framework_id,
                stream_id: std::mem::take(&mut self.stream_id),
            });
        }
    }
}

//! The `corral.v1.Services` gRPC service and `GET /metrics`: they parse and
//! validate requests, translate them into actor commands, and turn the
//! core's views into wire messages; errors become gRPC codes here and
//! nowhere else.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use corral_proto::pb;
use tonic::{Request, Response, Status};

use crate::actor::{Command, Handle};
use crate::core::{Applied, CoreError, DeploymentStatus, InstanceStatus, ServiceStatus};
use crate::k8s::{ManifestError, parse_pod_manifest};
use crate::spec::{SpecError, parse_toml, validate, validate_name};

pub struct ServicesApi {
    pub actor: Handle,
}

fn stopped() -> Status {
    Status::unavailable("the service framework is shutting down")
}

fn to_status(error: CoreError) -> Status {
    match error {
        CoreError::Invalid(e) => invalid(&e),
        CoreError::NotFound(_) => Status::not_found(error.to_string()),
        CoreError::Deleting(_) => Status::failed_precondition(error.to_string()),
        CoreError::TooManyInstances { .. } => Status::invalid_argument(error.to_string()),
    }
}

fn invalid(error: &SpecError) -> Status {
    Status::invalid_argument(error.to_string())
}

fn manifest_error(error: &ManifestError) -> Status {
    Status::invalid_argument(format!("pod_manifest: {error}"))
}

fn service_name(value: &str) -> Result<String, Status> {
    validate_name(value, "name").map_err(|e| invalid(&e))?;
    Ok(value.to_string())
}

#[tonic::async_trait]
impl pb::services_server::Services for ServicesApi {
    async fn apply(
        &self,
        request: Request<pb::ApplyServiceRequest>,
    ) -> Result<Response<pb::ApplyServiceResponse>, Status> {
        use pb::apply_service_request::Source;
        let wire = match request.into_inner().source {
            None => {
                return Err(Status::invalid_argument(
                    "source: required (spec, toml or pod_manifest)",
                ));
            }
            Some(Source::Spec(spec)) => spec,
            Some(Source::Toml(text)) => parse_toml(&text).map_err(|e| invalid(&e))?,
            Some(Source::PodManifest(yaml)) => {
                parse_pod_manifest(&yaml).map_err(|e| manifest_error(&e))?
            }
        };
        let service = validate(&wire).map_err(|e| invalid(&e))?;
        let name = service.name.clone();
        let instances = service.instances;
        let (applied, version) = self
            .actor
            .request(|reply| Command::Apply {
                service: Box::new(service),
                reply,
            })
            .await
            .ok_or_else(stopped)?
            .map_err(to_status)?;
        use pb::apply_service_response::Outcome;
        let outcome = match applied {
            Applied::Created { .. } => Outcome::Created,
            Applied::Updated { .. } => Outcome::Updated,
            Applied::Scaled { .. } => Outcome::Scaled,
            Applied::Unchanged => Outcome::Unchanged,
        };
        Ok(Response::new(pb::ApplyServiceResponse {
            name,
            outcome: outcome.into(),
            version,
            instances,
        }))
    }

    async fn list(
        &self,
        _request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let services = self
            .actor
            .request(|reply| Command::List { reply })
            .await
            .ok_or_else(stopped)?
            .into_iter()
            .map(|s| {
                let mut wire = to_wire(s);
                wire.instances.clear();
                wire
            })
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn get(
        &self,
        request: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let name = service_name(&request.into_inner().name)?;
        let status = self
            .actor
            .request(|reply| Command::Get {
                name: name.clone(),
                reply,
            })
            .await
            .ok_or_else(stopped)?
            .ok_or_else(|| to_status(CoreError::NotFound(name)))?;
        Ok(Response::new(to_wire(status)))
    }

    async fn scale(
        &self,
        request: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::ScaleServiceResponse>, Status> {
        let request = request.into_inner();
        let name = service_name(&request.name)?;
        let instances = request.instances;
        self.actor
            .request(|reply| Command::Scale {
                name,
                instances,
                reply,
            })
            .await
            .ok_or_else(stopped)?
            .map_err(to_status)?;
        Ok(Response::new(pb::ScaleServiceResponse {}))
    }

    async fn restart(
        &self,
        request: Request<pb::RestartServiceRequest>,
    ) -> Result<Response<pb::RestartServiceResponse>, Status> {
        let name = service_name(&request.into_inner().name)?;
        let version = self
            .actor
            .request(|reply| Command::Restart { name, reply })
            .await
            .ok_or_else(stopped)?
            .map_err(to_status)?;
        Ok(Response::new(pb::RestartServiceResponse { version }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        let name = service_name(&request.into_inner().name)?;
        self.actor
            .request(|reply| Command::Delete { name, reply })
            .await
            .ok_or_else(stopped)?
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteServiceResponse {}))
    }
}

fn to_wire(s: ServiceStatus) -> pb::ServiceStatus {
    let live = || {
        s.instances
            .iter()
            .filter(|i| i.state == pb::TaskState::TaskRunning)
    };
    let instances_running = count(live());
    let instances_healthy = count(live().filter(|i| i.healthy));
    pb::ServiceStatus {
        instances_running,
        instances_healthy,
        instances: s.instances.iter().map(instance).collect(),
        deployment: s.deployment.as_ref().map(deployment),
        name: s.name,
        spec: Some(s.spec),
        version: s.version,
        instances_wanted: s.instances_wanted,
        message: s.message,
        unplaced: s.unplaced.unwrap_or_default(),
        backoff_until: s.backoff_until,
        deleting: s.deleting,
    }
}

fn count<T>(items: impl Iterator<Item = T>) -> u32 {
    u32::try_from(items.count()).unwrap_or(u32::MAX)
}

fn instance(i: &InstanceStatus) -> pb::ServiceInstance {
    pb::ServiceInstance {
        id: i.id.clone(),
        number: i.number,
        version: i.version,
        agent_id: i.agent_id.clone(),
        hostname: i.hostname.clone(),
        task_ids: i.task_ids.clone(),
        state: i.state.into(),
        healthy: i.healthy,
        ready: i.ready,
        available: i.available,
        pod_ip: i.pod_ip.clone(),
        restart_count: i.restart_count,
        volumes: i.volumes.clone(),
    }
}

fn deployment(d: &DeploymentStatus) -> pb::ServiceDeployment {
    pb::ServiceDeployment {
        target_version: d.target_version,
        from_version: d.from_version,
        old_instances: d.old_instances,
        new_instances: d.new_instances,
        new_available: d.new_available,
        available: d.available,
        rolling_back: d.rolling_back,
        failed: d.failed,
    }
}

/// `GET /metrics`, Prometheus text.
pub fn http_router(actor: Handle) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(actor)
}

async fn metrics(State(actor): State<Handle>) -> Result<String, (axum::http::StatusCode, String)> {
    actor
        .request(|reply| Command::Metrics { reply })
        .await
        .ok_or((
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "shutting down".to_string(),
        ))
}

//! The `corral.v1.Batch` gRPC service and `GET /metrics`: they translate
//! requests into actor commands; errors become gRPC codes here and nowhere
//! else.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use corral_proto::pb;
use tonic::{Request, Response, Status};

use crate::actor::{Command, Handle};
use crate::jobs::JobsError;
use crate::spec::validate_name;

pub struct BatchApi {
    pub actor: Handle,
}

fn stopped() -> Status {
    Status::unavailable("the batch framework is shutting down")
}

fn to_status(error: JobsError) -> Status {
    match error {
        JobsError::Invalid(e) => Status::invalid_argument(e.to_string()),
        JobsError::Exists(_) => Status::already_exists(error.to_string()),
        JobsError::NotFound(_) => Status::not_found(error.to_string()),
        JobsError::Busy(_) => Status::failed_precondition(error.to_string()),
    }
}

fn job_id(value: &str) -> Result<String, Status> {
    validate_name(value, "job_id").map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(value.to_string())
}

#[tonic::async_trait]
impl pb::batch_server::Batch for BatchApi {
    async fn submit(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        let job_id = self
            .actor
            .request(|reply| Command::Submit { spec, reply })
            .await
            .ok_or_else(stopped)?
            .map_err(to_status)?;
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self
            .actor
            .request(|reply| Command::List { reply })
            .await
            .ok_or_else(stopped)?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let request = request.into_inner();
        let name = job_id(&request.job_id)?;
        let status = self
            .actor
            .request(|reply| Command::Get {
                name: name.clone(),
                with_tasks: !request.summary_only,
                reply,
            })
            .await
            .ok_or_else(stopped)?
            .ok_or_else(|| to_status(JobsError::NotFound(name)))?;
        Ok(Response::new(status))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let name = job_id(&request.into_inner().job_id)?;
        self.actor
            .request(|reply| Command::Cancel { name, reply })
            .await
            .ok_or_else(stopped)?
            .map_err(to_status)?;
        Ok(Response::new(pb::CancelJobResponse {}))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let name = job_id(&request.into_inner().job_id)?;
        self.actor
            .request(|reply| Command::Delete { name, reply })
            .await
            .ok_or_else(stopped)?
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteJobResponse {}))
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

//! Plain HTTP on the gRPC port: `GET /metrics` (Prometheus text) and
//! `GET /state` (JSON), like Mesos serves `/metrics/snapshot` and `/state`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;

use crate::master::{Command, MasterHandle};
use crate::metrics::Metrics;

#[derive(Clone)]
struct Http {
    master: MasterHandle,
    metrics: Arc<Metrics>,
}

pub(crate) fn router(master: MasterHandle, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/state", get(state))
        .route("/metrics", get(render_metrics))
        .with_state(Http { master, metrics })
}

async fn state(State(http): State<Http>) -> Response {
    match http
        .master
        .request(|reply| Command::Snapshot { reply })
        .await
    {
        Ok(snapshot) => Json(snapshot).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response(),
    }
}

async fn render_metrics(State(http): State<Http>) -> Response {
    match http
        .master
        .request(|reply| Command::Snapshot { reply })
        .await
    {
        Ok(snapshot) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            http.metrics.render(&snapshot),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response(),
    }
}

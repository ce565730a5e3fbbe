//! Plain HTTP on the gRPC port: `GET /metrics` (Prometheus text) and
//! `GET /state` (JSON), like Mesos serves `/metrics/snapshot` and `/state`.
//! A standby serves its own `/metrics` and redirects `/state` to the leader
//! (307), as a Mesos standby does.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;

use crate::leader::{Leadership, Role};
use crate::master::Command;
use crate::metrics::Metrics;
use crate::state::StateSnapshot;

#[derive(Clone)]
struct Http {
    leadership: Leadership,
    metrics: Arc<Metrics>,
}

pub(crate) fn router(leadership: Leadership, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/state", get(state))
        .route("/metrics", get(render_metrics))
        .with_state(Http {
            leadership,
            metrics,
        })
}

/// The leader's state, or why there is none here: a redirect to the
/// leader, or 503 (after waiting a while for one to be elected, as calls
/// do; a single master is in that state only while it opens its registry).
async fn snapshot(http: &Http) -> Result<StateSnapshot, Response> {
    match http.leadership.leading().await {
        Ok((master, fence)) => {
            let mut snapshot = master
                .request(|reply| Command::Snapshot { reply })
                .await
                .map_err(|e| {
                    (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response()
                })?;
            snapshot.epoch = fence.epoch;
            snapshot.registry_id = fence.registry_id;
            Ok(snapshot)
        }
        Err(not) => {
            let message = format!("{not}\n");
            Err(match not.leader {
                Some(leader) => (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, format!("http://{leader}/state"))],
                    message,
                )
                    .into_response(),
                None => (StatusCode::SERVICE_UNAVAILABLE, message).into_response(),
            })
        }
    }
}

async fn state(State(http): State<Http>) -> Response {
    match snapshot(&http).await {
        Ok(snapshot) => Json(snapshot).into_response(),
        Err(response) => response,
    }
}

/// Every master serves its own metrics; a standby's gauges are zero and
/// `corral_master_elected` is 0.
async fn render_metrics(State(http): State<Http>) -> Response {
    let text = match http.leadership.current() {
        Role::Leading { .. } => match snapshot(&http).await {
            Ok(s) => http.metrics.render(&s, true),
            Err(response) => return response,
        },
        Role::Standby { .. } => http.metrics.render(&StateSnapshot::default(), false),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

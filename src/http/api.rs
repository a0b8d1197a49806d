//! breakwater's own API (not the distribution API): replication runs and their progress.
//!
//! - `GET /api/replication`: every configured policy with its saved state, live counters and failures.
//! - `GET /api/replication/{name}`: one of them.
//! - `POST /api/replication/{name}/run`: starts a run now (202), 409 if one is running, 404 if no such policy.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::App;
use crate::replicate::StartError;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/replication", get(list))
        .route("/api/replication/{name}", get(one))
        .route("/api/replication/{name}/run", post(start))
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn list(State(app): State<Arc<App>>) -> Response {
    Json(serde_json::json!({ "jobs": app.replication.status().await })).into_response()
}

async fn one(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.replication.status_of(&name).await {
        Some(s) => Json(s).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no replication policy named {name}")),
    }
}

async fn start(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.replication.start(&name).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(serde_json::json!({ "started": name }))).into_response(),
        Err(e @ StartError::Unknown(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ StartError::Running(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ StartError::Invalid(..)) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

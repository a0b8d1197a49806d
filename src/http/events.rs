//! `POST /api/replication/{name}/events`: a source registry's notifications for policy `name` (distribution's
//! notification envelope, or Harbor's webhook), queued for the policy's event worker (`replicate::EventQueue`).
//!
//! Answers at once: 202 `{"accepted": N, "ignored": M}` (a body with nothing to act on is accepted too, with
//! N = 0); 400 for a body that is not a notification; 404 for an unknown policy; 413 for a body over 1 MiB; 503
//! with `Retry-After` when the policy's queue is full or the server is shutting down, so the sender retries.
//! Who may send is the gate's business (`auth.rs`: an admin, or the policy's `events_secret` as a bearer token).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::api::{error, start_error};
use super::App;
use crate::replicate::EventError;

/// Largest notification body taken: distribution sends a few events at a time, each well under a kilobyte.
const MAX_EVENTS_BYTES: usize = 1024 * 1024;

/// Seconds a sender is asked to wait when the queue is full.
const RETRY_AFTER_SECS: &str = "5";

pub async fn receive(State(app): State<Arc<App>>, Path(name): Path<String>, body: Body) -> Response {
    let queue = match app.replication.events_of(&name) {
        Ok(q) => q,
        Err(e) => return start_error(e),
    };
    let Ok(bytes) = axum::body::to_bytes(body, MAX_EVENTS_BYTES).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, format!("a notification body is at most {MAX_EVENTS_BYTES} bytes"));
    };
    match queue.receive(&bytes) {
        Ok(received) => (StatusCode::ACCEPTED, Json(received)).into_response(),
        Err(e @ EventError::Full(_)) => {
            let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            resp
        }
        Err(e @ (EventError::Malformed(_) | EventError::Unknown)) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

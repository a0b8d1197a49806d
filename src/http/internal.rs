//! Endpoints for the other members of a cluster only (`/internal/...`): every request must carry a valid
//! member signature (`cluster::peer`), checked here rather than by the client-facing gate, which lets these
//! paths through.
//!
//! - `GET /internal/cluster/ping`: the answering member's id and the caller's, as the signature named it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::App;
use crate::cluster::peer;

pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/internal/cluster/ping", get(ping))
}

async fn ping(State(app): State<Arc<App>>, req: Request) -> Response {
    let (cluster, peer) = match caller(&app, &req) {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    Json(serde_json::json!({ "id": cluster.id(), "peer": peer })).into_response()
}

/// This member and the calling member's id, or the refusal: 404 when not clustered (as for any unknown path),
/// 401 when the signature does not hold.
fn caller<'a>(app: &'a App, req: &Request) -> Result<(&'a crate::cluster::Cluster, String), Response> {
    let Some(cluster) = app.cluster.as_deref() else { return Err(StatusCode::NOT_FOUND.into_response()) };
    let header = req.headers().get(peer::HEADER).and_then(|v| v.to_str().ok());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    match peer::verify(cluster.secret(), header, req.method().as_str(), path, now) {
        Ok(member) => Ok((cluster, member)),
        Err(e) => Err((StatusCode::UNAUTHORIZED, Json(serde_json::json!({ "error": e.to_string() }))).into_response()),
    }
}

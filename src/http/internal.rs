//! Endpoints for the other members of a cluster only (`/internal/...`): every request must carry a valid
//! member signature (`cluster::peer`), checked here rather than by the client-facing gate, which lets these
//! paths through.
//!
//! - `GET /internal/cluster/ping`: the answering member's id and the caller's, as the signature named it.
//! - `GET /internal/blobs/<digest>?offset=N`: what this member has of a blob from byte N (its flight, as the bytes
//!   arrive, or storage), with the whole size in `X-Breakwater-Blob-Size`; 404 when it has neither
//!   (`cluster::flights` follows a flight's owner with it).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::App;
use crate::cluster::peer;

pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/internal/cluster/ping", get(ping)).route("/internal/blobs/{digest}", get(blob))
}

async fn blob(State(app): State<Arc<App>>, Path(digest): Path<String>, req: Request) -> Response {
    if let Err(resp) = caller(&app, &req) {
        return resp;
    }
    let Ok(digest) = digest.parse::<crate::oci::Digest>() else {
        return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": "not a digest" }))).into_response();
    };
    let offset = req.uri().query().and_then(|q| q.strip_prefix("offset=")).map(str::parse::<u64>);
    let Some(Ok(offset)) = offset else {
        return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": "expected ?offset=N" }))).into_response();
    };
    match app.proxy.flights().read_from(&digest, offset).await {
        Ok(Some((size, body))) => Response::builder()
            .header(crate::cluster::flights::SIZE_HEADER, size)
            .header(axum::http::header::CONTENT_LENGTH, size - offset)
            .body(Body::from_stream(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, Json(serde_json::json!({ "error": e.to_string() }))).into_response(),
    }
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

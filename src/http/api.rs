//! breakwater's own API (not the distribution API): replication runs and their progress.
//!
//! - `GET /api/replication`: every configured policy with its saved state, live counters, failure count and
//!   first failures (`failures_next` is the path of the next page of failures, when there are more).
//! - `GET /api/replication/{name}`: one of them.
//! - `GET /api/replication/{name}/failures?n=N&last=REPO:TAG`: a page of a policy's failures in (repository,
//!   tag) order after `last` (default and largest `n`: 100 and 1000), with `next` and a `Link` to the next page.
//! - `POST /api/replication/{name}/run`: starts a run now (202), 409 if one is running, 404 if no such policy,
//!   503 once the server is shutting down.
//! - `POST /api/replication/{name}/events`: a source's notifications (`events.rs`).
//! - `GET /api/cluster`: this member's id, every registered member (id, url, start, last heartbeat, alive) and
//!   the blob flights of the cluster (digest, the member fetching it from upstream, its lease's expiry); 404 when
//!   the instance is not a cluster member.
//! - `GET /api/status`: what breakwater is doing now (README, "Watch it"): the blob downloads in flight
//!   (`flights.count`, and the oldest `FLIGHTS_SHOWN` with repository, digest, bytes so far, total, rate,
//!   clients streaming, age), the cache (size against its budget, evictions, the `MOST_PULLED_SHOWN` most pulled
//!   artifacts), each upstream (requests, bytes fetched and served, hits, coalesced and misses with the hit
//!   ratio, stale serves, last success and last error, the last `ratelimit-remaining` it sent or null), and each
//!   replication job (state, counters, rate; its failures are paged by `/api/replication`). Its size does not
//!   grow with the number of flights, artifacts or failures.
//! - `POST /api/gc` (`?dry_run=true` to only report): collects garbage with the `[gc]` settings and answers
//!   with the report (200), or 409 while another collection runs on the metadata store.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::App;
use crate::meta::JobFailure;
use crate::replicate::{JobStatus, StartError, FAILURES_SHOWN};

/// Largest page of failures served.
const MAX_FAILURES_PAGE: u64 = 1000;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/replication", get(list))
        .route("/api/replication/{name}", get(one))
        .route("/api/replication/{name}/failures", get(failures))
        .route("/api/replication/{name}/run", post(start))
        .route("/api/replication/{name}/events", post(super::events::receive))
        .route("/api/gc", post(collect))
        .route("/api/cluster", get(cluster))
        .route("/api/status", get(status))
}

/// Flights listed by `/api/status` at most (the oldest); `flights.count` says how many run, so that a thousand
/// flights stay one small answer.
const FLIGHTS_SHOWN: usize = 100;

/// Most pulled artifacts listed by `/api/status`.
const MOST_PULLED_SHOWN: usize = 10;

async fn status(State(app): State<Arc<App>>) -> Response {
    let (count, shown) = app.proxy.flights().status(FLIGHTS_SHOWN).await;
    let cache_bytes = match app.registry.meta().cache_bytes().await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let upstreams: Vec<_> = app
        .proxy
        .upstreams()
        .iter()
        .map(|u| {
            let mut v = serde_json::to_value(u.stats().view()).unwrap_or_default();
            v["name"] = u.name().into();
            v["url"] = u.config.url.clone().into();
            v["ratelimit_remaining"] = u.ratelimit_remaining().into();
            v
        })
        .collect();
    let (evictions, evicted_bytes) = app.proxy.activity().evictions();
    let jobs: Vec<_> = app
        .replication
        .status()
        .await
        .into_iter()
        .map(|j| {
            serde_json::json!({
                "name": j.name, "running": j.running, "progress": j.progress, "rate": j.rate,
                "failure_count": j.failure_count,
            })
        })
        .collect();
    Json(serde_json::json!({
        "flights": { "count": count, "shown": shown },
        "cache": {
            "bytes": cache_bytes,
            "max_bytes": app.proxy.eviction_policy().max_bytes,
            "evictions": evictions,
            "evicted_bytes": evicted_bytes,
            "most_pulled": app.proxy.activity().most_pulled(MOST_PULLED_SHOWN),
        },
        "upstreams": upstreams,
        "replication": jobs,
    }))
    .into_response()
}

async fn collect(State(app): State<Arc<App>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let dry_run = match q.get("dry_run").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => return error(StatusCode::BAD_REQUEST, format!("dry_run must be true or false, not {other:?}")),
    };
    let options = crate::gc::Options { dry_run, ..app.gc.clone() };
    // A task of its own: a client that goes away does not stop the collection halfway (which would hold every
    // other collector off until its lease lapses).
    let registry = Arc::clone(&app.registry);
    match tokio::spawn(async move { registry.collect(&options).await }).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e @ crate::gc::GcError::Busy)) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("the collection failed: {e}")),
    }
}

async fn cluster(State(app): State<Arc<App>>) -> Response {
    let Some(cluster) = &app.cluster else {
        return error(StatusCode::NOT_FOUND, "this instance is not a cluster member (no --cluster-secret)".into());
    };
    match tokio::try_join!(cluster.members(), cluster.flights()) {
        Ok((members, flights)) => {
            Json(serde_json::json!({ "id": cluster.id(), "members": members, "flights": flights })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// The path of the page of `name`'s failures after `last`, `n` at a time.
fn failures_path(name: &str, n: u64, last: &JobFailure) -> String {
    format!("/api/replication/{name}/failures?n={n}&last={}", super::v2::query_escape(&format!("{}:{}", last.repo, last.tag)))
}

/// A job's status as JSON, with the path of its next page of failures when more follow.
fn status_json(s: JobStatus) -> serde_json::Value {
    let next = s.failures.last().filter(|_| s.more_failures).map(|f| failures_path(&s.name, FAILURES_SHOWN, f));
    let mut v = serde_json::to_value(s).unwrap_or_default();
    v["failures_next"] = next.into();
    v
}

async fn list(State(app): State<Arc<App>>) -> Response {
    let jobs: Vec<_> = app.replication.status().await.into_iter().map(status_json).collect();
    Json(serde_json::json!({ "jobs": jobs })).into_response()
}

async fn one(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.replication.status_of(&name).await {
        Some(s) => Json(status_json(s)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no replication policy named {name}")),
    }
}

async fn failures(State(app): State<Arc<App>>, Path(name): Path<String>, Query(q): Query<HashMap<String, String>>) -> Response {
    let n = match q.get("n").map(|n| n.parse::<u64>()) {
        None => FAILURES_SHOWN,
        Some(Ok(n)) => n.min(MAX_FAILURES_PAGE),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, format!("n must be a non-negative integer, not {:?}", q["n"])),
    };
    // Repository names hold no ':', so the first one separates the repository from the tag (which may be empty).
    let last = match q.get("last").map(|l| l.split_once(':')) {
        None => None,
        Some(Some(pair)) => Some(pair),
        Some(None) => return error(StatusCode::BAD_REQUEST, "last must be REPOSITORY:TAG".into()),
    };
    let page = match app.replication.failures(&name, last, n).await {
        None => return error(StatusCode::NOT_FOUND, format!("no replication policy named {name}")),
        Some(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Some(Ok(p)) => p,
    };
    let next = page.items.last().filter(|_| page.more).map(|f| failures_path(&name, n, f));
    let mut resp = Json(serde_json::json!({ "name": name, "failures": page.items, "next": next.clone() })).into_response();
    if let Some(v) = next.and_then(|p| HeaderValue::from_str(&format!("<{p}>; rel=\"next\"")).ok()) {
        resp.headers_mut().insert(header::LINK, v);
    }
    resp
}

async fn start(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.replication.start(&name).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(serde_json::json!({ "started": name }))).into_response(),
        Err(e) => start_error(e),
    }
}

/// A policy that cannot take a request: unknown (404), already running (409), invalid (422), or the server is
/// shutting down (503).
pub(super) fn start_error(e: StartError) -> Response {
    let status = match e {
        StartError::Unknown(_) => StatusCode::NOT_FOUND,
        StartError::Running(_) => StatusCode::CONFLICT,
        StartError::Invalid(..) => StatusCode::UNPROCESSABLE_ENTITY,
        StartError::ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

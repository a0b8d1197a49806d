//! The HTTP face of breakwater: the distribution API under `/v2/`, plus `/metrics`, `/healthz`, `/readyz`, the
//! API under `/api/` and the status page at `/`.
//!
//! Architecture invariant: this module holds no registry policy. It parses requests, calls `Registry`, and
//! writes the answers (headers, bodies, error JSON) the spec asks for.

pub(crate) mod accept;
mod api;
mod auth;
mod error;
mod events;
mod internal;
mod page;
pub(crate) mod range;
pub(crate) mod route;
pub(crate) mod v2;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::registry::Registry;

/// What every handler needs.
pub struct App {
    pub registry: Arc<Registry>,
    /// Pull-through policy; with no upstreams configured every name is local.
    pub proxy: Arc<crate::proxy::Proxy>,
    /// Replication policies of the config file: their schedules and API-started runs.
    pub replication: Arc<crate::replicate::Scheduler>,
    /// Renders `/metrics`; `None` when the process has no Prometheus recorder (library use in tests).
    pub metrics: Option<PrometheusHandle>,
    /// Access control; `None`: every client may do everything (the default on loopback).
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// Whether clients reach this server over TLS: the scheme of the token realm it sends them to.
    pub https: bool,
    /// What `POST /api/gc` collects with (the `[gc]` settings).
    pub gc: crate::gc::Options,
    /// This instance as a cluster member; `None` when it runs alone.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl App {
    fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }
}

/// The `Range` header value of an upload that holds `size` bytes (`0-<last byte>`; `0-0` when empty, as
/// distribution sends).
fn upload_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v2", any(v2::handle))
        .route("/v2/", any(v2::handle))
        .route("/v2/{*path}", any(v2::handle))
        .route("/", get(page::page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/auth/token", get(auth::token_get).post(auth::token_post))
        .merge(api::routes())
        .merge(internal::routes())
        .layer(middleware::from_fn_with_state(Arc::clone(&app), auth::gate))
        .layer(middleware::from_fn(observe))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    match &app.metrics {
        Some(h) => {
            app.proxy.report_entries();
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.registry.unready().await {
        None => "ready\n".into_response(),
        Some(what) => (StatusCode::SERVICE_UNAVAILABLE, format!("{what}\n")).into_response(),
    }
}

/// The `method` label of a request: the standard methods by name, anything else as `other`, so a client
/// sending made-up methods cannot create label sets without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    static KNOWN: [Method; 9] = [
        Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS,
        Method::CONNECT, Method::TRACE,
    ];
    KNOWN.iter().find(|m| *m == method).map_or("other", |m| m.as_str())
}

/// Counts and logs every request: requests by route, method and status, and bytes served by route.
async fn observe(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let kind = match route::parse(&path) {
        Some(r) => r.kind(),
        None if path == "/" || path == "/metrics" || path == "/healthz" || path == "/readyz" => "ops",
        None if path == "/auth/token" => "token",
        None => "other",
    };
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    metrics::counter!("breakwater_http_requests_total",
        "route" => kind, "method" => method_label(&method), "status" => status.to_string())
    .increment(1);
    if method != axum::http::Method::HEAD {
        let bytes = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        metrics::counter!("breakwater_http_response_bytes_total", "route" => kind).increment(bytes);
    }
    tracing::info!(%method, path, status, elapsed_ms = start.elapsed().as_millis() as u64, "request");
    resp
}

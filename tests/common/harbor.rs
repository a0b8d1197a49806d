//! A stand-in for a Harbor instance, for replication tests (Harbor itself cannot run on these machines): it
//! answers Harbor's project and repository listing API (`/api/v2.0/...`, paged, sorted by name) for a fixed set
//! of repositories, and forwards the distribution API (`/v2/...`) to a real registry that holds them. It
//! counts the listing requests, and refuses `/v2/_catalog` as Harbor does for non-admin robot accounts.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::TryStreamExt;

use super::relay::Background;

struct Shared {
    /// Project name → its repositories' full names, sorted.
    projects: BTreeMap<String, Vec<String>>,
    registry: String,
    client: reqwest::Client,
    api_requests: AtomicUsize,
    catalog_requests: AtomicUsize,
}

pub struct FakeHarbor {
    pub addr: String,
    shared: Arc<Shared>,
    _bg: Background,
}

impl FakeHarbor {
    /// Lists `repos` (full names `project/...`) and forwards `/v2/` to the registry at `registry_addr`.
    pub fn start(registry_addr: &str, repos: &[String]) -> FakeHarbor {
        let mut projects: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in repos {
            let project = r.split_once('/').map_or(r.as_str(), |(p, _)| p).to_string();
            projects.entry(project).or_default().push(r.clone());
        }
        for list in projects.values_mut() {
            list.sort();
        }
        let shared = Arc::new(Shared {
            projects,
            registry: registry_addr.to_string(),
            client: reqwest::Client::new(),
            api_requests: AtomicUsize::new(0),
            catalog_requests: AtomicUsize::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let app_shared = Arc::clone(&shared);
        let bg = Background::spawn("harbor", 2, move || async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = Router::new().fallback(handle).with_state(app_shared);
            let _ = axum::serve(l, app).await;
        });
        FakeHarbor { addr, shared, _bg: bg }
    }

    pub fn api_requests(&self) -> usize {
        self.shared.api_requests.load(Ordering::SeqCst)
    }

    pub fn catalog_requests(&self) -> usize {
        self.shared.catalog_requests.load(Ordering::SeqCst)
    }
}

fn page<T: Clone + serde::Serialize>(items: &[T], q: &HashMap<String, String>) -> Vec<T> {
    let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
    let size: usize = q.get("page_size").and_then(|p| p.parse().ok()).unwrap_or(10).clamp(1, 100);
    items.iter().skip((page - 1) * size).take(size).cloned().collect()
}

async fn handle(State(s): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if path == "/api/v2.0/projects" {
        s.api_requests.fetch_add(1, Ordering::SeqCst);
        let names: Vec<serde_json::Value> = s.projects.keys().map(|p| serde_json::json!({ "name": p })).collect();
        return axum::Json(page(&names, &q)).into_response();
    }
    if let Some(rest) = path.strip_prefix("/api/v2.0/projects/") {
        if let Some(project) = rest.strip_suffix("/repositories") {
            s.api_requests.fetch_add(1, Ordering::SeqCst);
            let repos: Vec<serde_json::Value> =
                s.projects.get(project).into_iter().flatten().map(|r| serde_json::json!({ "name": r })).collect();
            return axum::Json(page(&repos, &q)).into_response();
        }
    }
    if path == "/v2/_catalog" {
        s.catalog_requests.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::UNAUTHORIZED, "catalog needs admin").into_response();
    }
    // The distribution API: forwarded to the registry.
    let url = format!("http://{}{}", s.registry, req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let method = req.method().clone();
    let mut headers = req.headers().clone();
    headers.remove("host");
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    match s.client.request(method, &url).headers(headers).body(body).send().await {
        Ok(r) => {
            let mut resp = Response::builder().status(r.status().as_u16());
            for (k, v) in r.headers() {
                resp = resp.header(k, v);
            }
            resp.body(Body::from_stream(r.bytes_stream().map_err(std::io::Error::other))).unwrap()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

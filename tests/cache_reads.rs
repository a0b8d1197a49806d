//! What a client reads through the pull-through cache, against a real upstream (Debian's `docker-registry`)
//! behind the counting relay: blob HEADs answered by a coalesced upstream HEAD (no download), content
//! negotiation of manifests, where upstream credentials may go, and Docker Hub's rate-limit headers. Every
//! assertion is about requests, bytes and headers, never about time.

mod common;

use std::time::Duration;

use common::oci::{get, metric, pseudo_random, push_blob, sha256, spawn_gets};
use common::relay::Relay;
use common::{Breakwater, Distribution};

/// An upstream registry behind a relay, and a breakwater caching it under the name `up`.
struct Cache {
    upstream: Distribution,
    relay: Relay,
    bw: Breakwater,
    /// The configuration file, kept alive as long as the server that read it.
    _config: Option<tempfile::NamedTempFile>,
}

impl Cache {
    /// With the upstream given on the command line (every `[[upstream]]` option at its default).
    fn start() -> Cache {
        let upstream = Distribution::start();
        let relay = Relay::start(&upstream.addr);
        let spec = format!("up=http://{}", relay.addr);
        let bw = Breakwater::start_with(&["--upstream", &spec]);
        Cache { upstream, relay, bw, _config: None }
    }

    /// With the upstream from a configuration file: `[[upstream]]` with name, url and the lines `extra`.
    fn start_configured(extra: &str) -> Cache {
        let upstream = Distribution::start();
        let relay = Relay::start(&upstream.addr);
        let config = write_config(&format!("[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n{extra}\n", relay.addr));
        let bw = Breakwater::start_with(&["--config", config.path().to_str().unwrap()]);
        Cache { upstream, relay, bw, _config: Some(config) }
    }

    fn upstream_url(&self) -> String {
        format!("http://{}", self.upstream.addr)
    }

    fn bw_url(&self) -> String {
        format!("http://{}", self.bw.addr)
    }

    /// URL of a blob of the cached repository `up/<repo>`.
    fn blob_url(&self, repo: &str, digest: &str) -> String {
        self.bw.url(&format!("/v2/up/{repo}/blobs/{digest}"))
    }

    /// Whether the cache's content store holds the bytes of `digest`.
    fn stores(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.bw.data.path().join("content/blobs/sha256").join(&hex[..2]).join(hex).exists()
    }
}

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f
}

async fn wait_for_metric(base: &str, name: &str, labels: &[&str], at_least: f64) {
    for _ in 0..2000 {
        if metric(base, name, labels).await >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name}{labels:?} never reached {at_least}");
}

async fn head(url: &str) -> reqwest::Response {
    reqwest::Client::new().head(url).send().await.unwrap()
}

// ---- HEAD without a download -----------------------------------------------------------------------------------

/// A HEAD of an uncached blob asks the upstream with one HEAD, downloads nothing and stores nothing, and gives
/// the size and digest; N concurrent HEADs share one upstream HEAD; a GET afterwards downloads it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_head_is_one_upstream_head_and_no_download() {
    let c = Cache::start();
    let blob = pseudo_random(3 << 20, 31);
    let digest = push_blob(&c.upstream_url(), "team/app", &blob).await;
    c.relay.reset();

    let resp = head(&c.blob_url("team/app", &digest)).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-length"].to_str().unwrap(), blob.len().to_string());
    assert_eq!(resp.headers()["docker-content-digest"].to_str().unwrap(), digest);
    assert_eq!(c.relay.count("HEAD", "/blobs/sha256:"), 1, "one upstream HEAD");
    assert_eq!(c.relay.count("GET", "/blobs/sha256:"), 0, "no upstream GET: {:?}", c.relay.requests());
    assert!(!c.stores(&digest), "a HEAD stores nothing");
    assert_eq!(metric(&c.bw_url(), "breakwater_flights_in_progress", &[]).await, 0.0);

    // A herd of HEADs, held at the upstream until all have asked, shares one upstream HEAD.
    c.relay.reset();
    c.relay.hang_on("HEAD /v2/team/app/blobs/");
    const N: usize = 12;
    let mut clients = Vec::new();
    for _ in 0..N {
        let url = c.blob_url("team/app", &digest);
        clients.push(tokio::spawn(async move { head(&url).await }));
    }
    wait_for_metric(&c.bw_url(), "breakwater_cache_requests_total", &["kind=\"blob_head\"", "result=\"coalesced\""], (N - 1) as f64)
        .await;
    c.relay.hang(false);
    for client in clients {
        let resp = client.await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-length"].to_str().unwrap(), blob.len().to_string());
    }
    assert_eq!(c.relay.count("HEAD", "/blobs/sha256:"), 1, "{N} concurrent HEADs: {:?}", c.relay.requests());
    assert_eq!(c.relay.count("GET", "/blobs/sha256:"), 0);
    assert!(!c.stores(&digest));

    // A GET downloads it, once; a HEAD after that is a cache hit.
    let (status, body) = get(&c.blob_url("team/app", &digest)).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digest.clone()));
    assert_eq!(c.relay.count("GET", "/blobs/sha256:"), 1);
    let resp = head(&c.blob_url("team/app", &digest)).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(c.relay.count("HEAD", "/blobs/sha256:"), 1, "the cached blob is answered here");
}

/// Upstream 404s of blobs are remembered like those of manifests: a HEAD (or GET) of a missing blob twice is one
/// upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_blob_is_asked_for_once() {
    let c = Cache::start();
    push_blob(&c.upstream_url(), "team/app", b"something, so that the repository exists").await;
    let missing = sha256(b"never pushed");
    c.relay.reset();
    for _ in 0..2 {
        assert_eq!(head(&c.blob_url("team/app", &missing)).await.status().as_u16(), 404);
    }
    assert_eq!(c.relay.count("", "/blobs/sha256:"), 1, "{:?}", c.relay.requests());

    let other = sha256(b"never pushed either");
    for _ in 0..2 {
        assert_eq!(get(&c.blob_url("team/app", &other)).await.unwrap().0, 404);
    }
    assert_eq!(c.relay.count("", &format!("/blobs/{other}")), 1, "{:?}", c.relay.requests());
}

/// `prefetch_on_head = true` keeps the former behaviour: a HEAD starts the download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_on_head_starts_the_download() {
    let c = Cache::start_configured("prefetch_on_head = true");
    let blob = pseudo_random(1 << 20, 32);
    let digest = push_blob(&c.upstream_url(), "team/app", &blob).await;
    c.relay.reset();
    let resp = head(&c.blob_url("team/app", &digest)).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-length"].to_str().unwrap(), blob.len().to_string());
    assert!(c.relay.wait_for_async("GET", "/blobs/sha256:", 1, Duration::from_secs(30)).await);
    assert_eq!(c.relay.count("HEAD", "/blobs/sha256:"), 0);
    for _ in 0..2000 {
        if c.stores(&digest) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(c.stores(&digest), "the HEAD's download was cached");
}

// ---- content negotiation -----------------------------------------------------------------------------------

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// GETs (or HEADs) a manifest with an `Accept` (none with `None`); returns the status, the error code of a 4xx and
/// the Content-Type of a 2xx.
async fn manifest_with(url: &str, accept: Option<&str>, head: bool) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut req = if head { client.head(url) } else { client.get(url) };
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = resp.bytes().await.unwrap();
    if status >= 400 && !head {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        return (status, v["errors"][0]["code"].as_str().unwrap().to_string());
    }
    (status, content_type)
}

/// A client that accepts only Docker schema2 is told an OCI manifest's tag is unknown, as distribution tells it,
/// through the cache (cold and warm) and from a local repository alike; no `Accept`, `*/*` or the OCI type get
/// it; by digest it is served whatever the Accept (as from distribution).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_is_served_only_to_clients_that_accept_its_type() {
    let c = Cache::start();
    let img = common::oci::push_image(&c.upstream_url(), "team/app", "v1", &[1000], 33).await;
    let upstream_tag = format!("{}/v2/team/app/manifests/v1", c.upstream_url());
    assert_eq!(manifest_with(&upstream_tag, Some(DOCKER_MANIFEST), false).await, (404, "MANIFEST_UNKNOWN".into()), "distribution");
    c.relay.reset();

    let tag = c.bw.url("/v2/up/team/app/manifests/v1");
    // Cold: the upstream is asked (with every stored type), the manifest is cached, this client is refused.
    assert_eq!(manifest_with(&tag, Some(DOCKER_MANIFEST), false).await, (404, "MANIFEST_UNKNOWN".into()));
    assert_eq!(manifest_with(&tag, Some(DOCKER_MANIFEST), true).await.0, 404, "HEAD");
    let gets = c.relay.count("GET", "/manifests/");
    assert_eq!(gets, 1, "the refused client's fetch was cached: {:?}", c.relay.requests());
    for accept in [None, Some("*/*"), Some(OCI_MANIFEST), Some("application/*"), Some(&format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}") as &str)] {
        assert_eq!(manifest_with(&tag, accept, false).await, (200, OCI_MANIFEST.into()), "Accept {accept:?}");
    }
    assert_eq!(manifest_with(&tag, Some(DOCKER_MANIFEST), false).await, (404, "MANIFEST_UNKNOWN".into()), "warm");
    assert_eq!(c.relay.count("", "/manifests/"), gets, "all of that from the cache");
    let by_digest = c.bw.url(&format!("/v2/up/team/app/manifests/{}", img.digest));
    assert_eq!(manifest_with(&by_digest, Some(DOCKER_MANIFEST), false).await, (200, OCI_MANIFEST.into()));

    // A local repository answers the same way.
    let base = c.bw_url();
    let local = common::oci::push_image(&base, "mine/app", "v1", &[500], 34).await;
    let tag = c.bw.url("/v2/mine/app/manifests/v1");
    assert_eq!(manifest_with(&tag, Some(DOCKER_MANIFEST), false).await, (404, "MANIFEST_UNKNOWN".into()));
    assert_eq!(manifest_with(&tag, None, false).await, (200, OCI_MANIFEST.into()));
    let by_digest = c.bw.url(&format!("/v2/mine/app/manifests/{}", local.digest));
    assert_eq!(manifest_with(&by_digest, Some(DOCKER_MANIFEST), true).await, (200, OCI_MANIFEST.into()));
}

/// The client's `Accept` goes upstream after the types the cache stores; clients with different `Accept`s
/// asking at once share one upstream request, and each is answered by what it accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_is_forwarded_and_one_fetch_serves_every_accept() {
    let c = Cache::start();
    common::oci::push_image(&c.upstream_url(), "team/app", "v2", &[1000], 35).await;
    c.relay.reset();
    c.relay.hang_on("GET /v2/team/app/manifests/");
    let tag = c.bw.url("/v2/up/team/app/manifests/v2");
    let picky = tokio::spawn({
        let tag = tag.clone();
        async move { manifest_with(&tag, Some(&format!("{DOCKER_MANIFEST}, application/vnd.example.thing+json")), false).await }
    });
    assert!(c.relay.wait_for_async("GET", "/manifests/v2", 1, Duration::from_secs(30)).await);
    let broad = tokio::spawn({
        let tag = tag.clone();
        async move { manifest_with(&tag, Some(OCI_MANIFEST), false).await }
    });
    wait_for_metric(&c.bw_url(), "breakwater_cache_requests_total", &["kind=\"manifest\"", "result=\"coalesced\""], 1.0).await;
    c.relay.hang(false);
    assert_eq!(picky.await.unwrap(), (404, "MANIFEST_UNKNOWN".into()));
    assert_eq!(broad.await.unwrap(), (200, OCI_MANIFEST.into()));
    let fetches: Vec<_> = c.relay.requests().into_iter().filter(|r| r.path.contains("/manifests/")).collect();
    assert_eq!(fetches.len(), 1, "{fetches:?}");
    let sent = fetches[0].header("accept").unwrap_or("").to_string();
    let types: Vec<&str> = sent.split(',').map(str::trim).collect();
    for t in [OCI_MANIFEST, "application/vnd.oci.image.index.v1+json", DOCKER_MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json"] {
        assert!(types.contains(&t), "{t} in {sent:?}");
    }
    assert_eq!(types.last(), Some(&"application/vnd.example.thing+json"), "the client's own type is forwarded: {sent:?}");
}

// ---- credentials stay home ---------------------------------------------------------------------------------

/// Starts breakwater on an upstream at `url` with `user:pass` and the `[[upstream]]` lines `extra`.
fn start_with_upstream(url: &str, extra: &str) -> (Breakwater, tempfile::NamedTempFile) {
    let config = write_config(&format!(
        "[[upstream]]\nname = \"up\"\nurl = \"{url}\"\nusername = \"puller\"\npassword = \"realm-pw-5Tz\"\n{extra}\n"
    ));
    let bw = Breakwater::start_with(&["--config", config.path().to_str().unwrap()]);
    (bw, config)
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

/// The upstream is `localhost`, its token realm `127.0.0.1`: two hosts, so the token is asked for anonymously,
/// unless `token_realms` allows the realm (by URL or by host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_only_to_the_upstreams_own_token_realm() {
    let upstream = Distribution::start();
    let blob = pseudo_random(10_000, 36);
    let digest = push_blob(&format!("http://{}", upstream.addr), "team/app", &blob).await;
    let relay = Relay::start(&upstream.addr);
    let ts = common::auth::TokenServer::anonymous(Duration::from_secs(600));
    relay.require_bearer(&ts);
    let url = format!("http://localhost:{}", port_of(&relay.addr));
    let cases = [
        (String::new(), false),
        (format!("token_realms = [\"{}\"]", ts.realm()), true),
        ("token_realms = [\"127.0.0.1\"]".to_string(), true),
    ];
    for (extra, credentials_sent) in cases {
        let before = ts.requests().len();
        let (bw, _config) = start_with_upstream(&url, &extra);
        let (status, body) = get(&bw.url(&format!("/v2/up/team/app/blobs/{digest}"))).await.unwrap();
        assert_eq!((status, sha256(&body)), (200, digest.clone()), "{extra:?}");
        let asked = &ts.requests()[before..];
        assert!(!asked.is_empty(), "a token was asked for");
        assert!(asked.iter().all(|r| r.authorization == credentials_sent), "{extra:?}: {asked:?}");
    }
}

/// A blob GET that the upstream redirects to another host (a CDN) does not take the credentials along (reqwest
/// drops `Authorization` when the host changes), while the upstream itself got them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_host_carries_no_credentials() {
    let upstream = Distribution::start();
    let blob = pseudo_random(200_000, 37);
    let digest = push_blob(&format!("http://{}", upstream.addr), "team/app", &blob).await;
    let registry = Relay::start(&upstream.addr);
    let cdn = Relay::start(&upstream.addr);
    registry.require_basic("puller", "realm-pw-5Tz");
    registry.redirect_blobs_to(&cdn.addr);
    let (bw, _config) = start_with_upstream(&format!("http://localhost:{}", port_of(&registry.addr)), "");
    let (status, body) = get(&bw.url(&format!("/v2/up/team/app/blobs/{digest}"))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digest.clone()));
    let redirected: Vec<_> = registry.requests().into_iter().filter(|r| r.status == 307).collect();
    assert_eq!(redirected.len(), 1, "{:?}", registry.requests());
    assert!(redirected[0].authorization, "the upstream got the credentials");
    let cdn_requests = cdn.requests();
    assert_eq!(cdn_requests.len(), 1, "{cdn_requests:?}");
    assert!(!cdn_requests[0].authorization, "credentials went to the CDN: {cdn_requests:?}");
    assert_eq!(cdn_requests[0].body_bytes, blob.len() as u64);
}

// ---- rate-limit awareness ----------------------------------------------------------------------------------

/// A tiny HTTP forwarder that adds Docker Hub's rate-limit headers (`ratelimit-limit: 100;w=21600` and
/// `ratelimit-remaining: N;w=21600`, N settable) to every answer of `target`. Bodies are buffered: it is for
/// manifests and small blobs.
struct RateLimited {
    addr: String,
    remaining: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RateLimited {
    async fn start(target: &str) -> RateLimited {
        use axum::body::Body;
        use axum::extract::{Request, State};
        use axum::response::Response;
        let remaining = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(100));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let state = (client, target.to_string(), remaining.clone());
        type S = (reqwest::Client, String, std::sync::Arc<std::sync::atomic::AtomicU64>);
        async fn forward(State((client, target, remaining)): State<S>, req: Request) -> Response {
            let url = format!("http://{target}{}", req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
            let mut out = client.request(req.method().clone(), url);
            for (k, v) in req.headers() {
                if k != "host" {
                    out = out.header(k, v);
                }
            }
            let body = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap();
            let answer = out.body(body).send().await.unwrap();
            let mut resp = Response::builder().status(answer.status().as_u16());
            for (k, v) in answer.headers() {
                resp = resp.header(k, v);
            }
            let left = remaining.load(std::sync::atomic::Ordering::SeqCst);
            resp = resp.header("ratelimit-limit", "100;w=21600").header("ratelimit-remaining", format!("{left};w=21600"));
            resp.body(Body::from(answer.bytes().await.unwrap())).unwrap()
        }
        let app = axum::Router::new().fallback(forward).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        RateLimited { addr, remaining, task }
    }

    fn set_remaining(&self, n: u64) {
        self.remaining.store(n, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for RateLimited {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Docker Hub's rate-limit headers are exported per upstream; once the remaining count is at most
/// `ratelimit_reserve`, an expired tag is served from the cache with a `Warning` instead of being revalidated,
/// while what the cache does not hold is still fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_rate_limit_defers_tag_revalidations() {
    let upstream = Distribution::start();
    let up = format!("http://{}", upstream.addr);
    let v1 = common::oci::push_image(&up, "team/app", "v1", &[1000], 38).await;
    let relay = Relay::start(&upstream.addr);
    let limited = RateLimited::start(&relay.addr).await;
    // tag_ttl_secs = 0: every pull of a tag revalidates it, unless that is deferred.
    let config = write_config(&format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\ntag_ttl_secs = 0\nratelimit_reserve = 10\n",
        limited.addr
    ));
    let bw = Breakwater::start_with(&["--config", config.path().to_str().unwrap()]);
    let base = format!("http://{}", bw.addr);
    let tag = bw.url("/v2/up/team/app/manifests/v1");
    let pull = |warned: bool| {
        let tag = tag.clone();
        async move {
            let resp = reqwest::Client::new().get(&tag).send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            let warning = resp.headers().get("warning").map(|v| v.to_str().unwrap().to_string());
            assert_eq!(warning.is_some(), warned, "Warning: {warning:?}");
            resp.headers()["docker-content-digest"].to_str().unwrap().to_string()
        }
    };

    limited.set_remaining(50);
    assert_eq!(pull(false).await, v1.digest);
    assert_eq!(metric(&base, "breakwater_upstream_ratelimit_limit", &["upstream=\"up\""]).await, 100.0);
    assert_eq!(metric(&base, "breakwater_upstream_ratelimit_remaining", &["upstream=\"up\""]).await, 50.0);
    // Plenty left: the expired tag is revalidated (one HEAD), which also brings the new count.
    limited.set_remaining(10);
    relay.reset();
    assert_eq!(pull(false).await, v1.digest);
    assert_eq!(relay.count("HEAD", "/manifests/v1"), 1, "{:?}", relay.requests());
    assert_eq!(metric(&base, "breakwater_upstream_ratelimit_remaining", &["upstream=\"up\""]).await, 10.0);
    // The same headroom on /api/status (and so on the status page).
    let (code, body) = get(&bw.url("/api/status")).await.unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["upstreams"][0]["ratelimit_remaining"], 10, "{status}");

    // At the reserve: the tag moves upstream, but the cache serves what it has without asking, with a Warning.
    common::oci::push_image(&up, "team/app", "v1", &[1000], 39).await;
    relay.reset();
    for _ in 0..3 {
        assert_eq!(pull(true).await, v1.digest);
    }
    assert_eq!(relay.count("", "/manifests/"), 0, "no revalidation spent: {:?}", relay.requests());
    assert_eq!(metric(&base, "breakwater_cache_deferred_revalidations_total", &["upstream=\"up\""]).await, 3.0);

    // What the cache does not hold is still fetched.
    let v2 = common::oci::push_image(&up, "team/app", "v2", &[1000], 40).await;
    let resp = reqwest::get(bw.url("/v2/up/team/app/manifests/v2")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["docker-content-digest"].to_str().unwrap(), v2.digest);
    assert_eq!(relay.count("GET", "/manifests/v2"), 1);
}

// ---- What the cache is doing: /api/status --------------------------------------------------------------------

/// `/api/status` shows a download in flight (held slow by the upstream): its digest, its byte count growing
/// between two reads, its total, the clients streaming it; once done, no flight, and the blob in the cache's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_a_flight_in_progress_and_its_clients() {
    let c = Cache::start();
    let blob = pseudo_random(4 << 20, 41);
    let digest = push_blob(&c.upstream_url(), "team/app", &blob).await;
    c.relay.throttle_on("/blobs/", 1 << 20);
    let clients = spawn_gets((0..2).map(|_| c.blob_url("team/app", &digest)));
    let status = || async {
        let (code, body) = get(&c.bw.url("/api/status")).await.unwrap();
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    let flight_bytes = |s: &serde_json::Value| s["flights"]["shown"][0]["bytes"].as_u64().unwrap_or(0);
    let mut first = status().await;
    for _ in 0..500 {
        if first["flights"]["shown"][0]["clients"].as_u64() == Some(2) && flight_bytes(&first) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        first = status().await;
    }
    let flight = &first["flights"]["shown"][0];
    assert_eq!(first["flights"]["count"], 1, "{first}");
    assert_eq!(flight["digest"], digest.as_str());
    assert_eq!(flight["total"], blob.len() as u64);
    assert_eq!(flight["clients"], 2, "{first}");
    assert_eq!(first["upstreams"][0]["name"], "up");
    let mut later = status().await;
    for _ in 0..500 {
        if flight_bytes(&later) > flight_bytes(&first) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        later = status().await;
    }
    assert!(flight_bytes(&later) > flight_bytes(&first), "the byte count grows: {first} then {later}");
    for client in clients {
        assert_eq!(client.await.unwrap(), Ok((200, digest.clone())));
    }
    let mut done = status().await;
    for _ in 0..500 {
        if done["flights"]["count"] == 0 && done["cache"]["bytes"] == blob.len() as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        done = status().await;
    }
    assert_eq!((done["flights"]["count"].as_u64(), done["cache"]["bytes"].as_u64()), (Some(0), Some(blob.len() as u64)), "{done}");
    assert_eq!(done["cache"]["max_bytes"], serde_json::Value::Null, "no budget set");
}

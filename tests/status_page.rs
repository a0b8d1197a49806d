//! The status page at `/`, in a real headless browser (Debian's chromium, driven by chromedriver over WebDriver),
//! against a real upstream (Debian's `docker-registry`) behind the fault-injecting relay: a download held slow
//! shows with its byte count growing, a replication job started with the page's button shows running and then
//! finished with its counts, an upstream that went down shows its error, the page logs no error to the console,
//! and with access control on the page is refused without credentials like `/api/`. `/api/status` is checked
//! at the JSON level too (bytes served against bytes fetched after a herd, hit ratio, most pulled, last error).

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::oci::{get, pseudo_random, push_blob, push_image, spawn_gets, OCI_MANIFEST};
use common::relay::Relay;
use common::{images, Breakwater, Distribution};
use serde_json::Value;

/// How long the page is given to show something (it polls every second).
const SHOWN_WITHIN: Duration = Duration::from_secs(30);

/// An upstream behind a relay cached as `up`, a replication source behind another relay, and a breakwater with
/// the upstream and a policy `mirror` copying the source's `rep/**` into itself.
struct Setup {
    upstream: Distribution,
    relay: Relay,
    source: Distribution,
    source_relay: Relay,
    bw: Breakwater,
    _config: tempfile::NamedTempFile,
}

impl Setup {
    fn start(extra_config: &str) -> Setup {
        let upstream = Distribution::start();
        let relay = Relay::start(&upstream.addr);
        let source = Distribution::start();
        let source_relay = Relay::start(&source.addr);
        let text = format!(
            "{extra_config}\n[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n\n[[replication]]\nname = \"mirror\"\n\
             from = \"http://{}\"\nto = \"local\"\ninclude = [\"rep/**\"]\n",
            relay.addr, source_relay.addr
        );
        let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut config, text.as_bytes()).unwrap();
        let bw = Breakwater::start_with(&["--config", config.path().to_str().unwrap()]);
        Setup { upstream, relay, source, source_relay, bw, _config: config }
    }

    fn upstream_url(&self) -> String {
        format!("http://{}", self.upstream.addr)
    }

    fn blob_url(&self, repo: &str, digest: &str) -> String {
        self.bw.url(&format!("/v2/up/{repo}/blobs/{digest}"))
    }

    async fn status(&self) -> Value {
        let (code, body) = get(&self.bw.url("/api/status")).await.unwrap();
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

/// The page's id for a digest (as its script makes it: anything but letters, digits, `_` and `-` becomes `-`).
fn key(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' }).collect()
}

/// Whether the console holds an error; prints every entry, for the log of a failure.
fn severe(entries: &[common::browser::LogEntry]) -> Vec<String> {
    for e in entries {
        eprintln!("console {}: {}", e.level, e.message);
    }
    entries.iter().filter(|e| e.level == "SEVERE").map(|e| e.message.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_flights_jobs_and_a_down_upstream_without_errors() {
    let s = Setup::start("");
    let blob = pseudo_random(4 << 20, 71);
    let digest = push_blob(&s.upstream_url(), "team/app", &blob).await;
    let other = push_blob(&s.upstream_url(), "team/app", &pseudo_random(1000, 72)).await;
    let src = format!("http://{}", s.source.addr);
    for (i, repo) in ["rep/a", "rep/b"].iter().enumerate() {
        push_image(&src, repo, "v1", &[1 << 20], 80 + i as u64).await;
    }

    let browser = Browser::start().await;
    browser.goto(&s.bw.url("/")).await;
    // The console is read for real: an error logged on purpose is seen (and taken off the log).
    browser.execute("console.error('probe of the console check'); return null;").await;
    assert!(severe(&browser.console().await).iter().any(|m| m.contains("probe of the console check")));
    let state = browser.wait_for("the upstream as ok", SHOWN_WITHIN, || async { browser.text("upstream-state-up").await.filter(|t| t.starts_with("ok")) }).await;
    assert!(state.contains("not asked yet"), "{state}");
    assert_eq!(browser.text("job-state-mirror").await.as_deref(), Some("never run"));

    // (a) A download held slow by the upstream shows, with its clients, and its byte count grows.
    s.relay.throttle_on("/blobs/", 512 << 10);
    let clients = spawn_gets((0..2).map(|_| s.blob_url("team/app", &digest)));
    let (k, bytes_id) = (key(&digest), format!("flight-bytes-{}", key(&digest)));
    let first: u64 = browser
        .wait_for("the flight with bytes and 2 clients", SHOWN_WITHIN, || async {
            let clients = browser.text(&format!("flight-clients-{k}")).await?;
            let bytes: u64 = browser.attribute(&bytes_id, "data-bytes").await?.parse().ok()?;
            (clients == "2" && bytes > 0).then_some(bytes)
        })
        .await;
    let row = browser.text(&format!("flight-{k}")).await.unwrap();
    assert!(row.contains("up/team/app") && row.contains("of 4.0 MiB"), "{row}");
    assert_eq!(browser.text("flights-count").await.as_deref(), Some("1"));
    let later: u64 = browser
        .wait_for("the flight's byte count growing", SHOWN_WITHIN, || async {
            let bytes: u64 = browser.attribute(&bytes_id, "data-bytes").await?.parse().ok()?;
            (bytes > first).then_some(bytes)
        })
        .await;
    assert!(later > first && later <= blob.len() as u64, "{first} then {later}");
    s.relay.clear_faults();
    for client in clients {
        assert_eq!(client.await.unwrap(), Ok((200, digest.clone())));
    }
    browser
        .wait_for("no flight left", SHOWN_WITHIN, || async { (browser.text("flights-count").await? == "0").then_some(()) })
        .await;
    // Two clients were served the blob, fetched once.
    let served = browser.text("upstream-served-up").await.unwrap();
    assert_eq!((served.as_str(), browser.text("upstream-fetched-up").await.as_deref()), ("8.0 MiB", Some("4.0 MiB")));

    // (b) A job started with the page's button runs (its source held slow) and finishes with its counts.
    s.source_relay.throttle_on("/blobs/", 512 << 10);
    assert!(browser.click("job-run-mirror").await, "the Run button");
    browser
        .wait_for("the job running", SHOWN_WITHIN, || async { (browser.text("job-state-mirror").await? == "running").then_some(()) })
        .await;
    assert_eq!(browser.text("job-msg-mirror").await.as_deref(), Some("started"));
    let st = s.status().await;
    let job = &st["replication"][0];
    assert!(job["running"] == true && job["rate"]["artifacts_per_sec"].is_f64() && job["rate"]["bytes_per_sec"].is_f64(), "{st}");
    s.source_relay.clear_faults();
    browser
        .wait_for("the job finished", Duration::from_secs(60), || async { (browser.text("job-state-mirror").await? == "finished").then_some(()) })
        .await;
    let done = browser.text("job-artifacts-mirror").await.unwrap();
    assert_eq!(done, "2 copied, 0 skipped, 0 failed");
    let r = reqwest::Client::new().get(s.bw.url("/v2/rep/a/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "the job copied rep/a");

    // (c) With the upstream down, a pull fails and the page marks the upstream with its error.
    s.relay.down(true);
    let (code, _) = get(&s.blob_url("team/app", &other)).await.unwrap();
    assert_eq!(code, 502, "the upstream is unavailable");
    let state = browser
        .wait_for("the upstream's error", SHOWN_WITHIN, || async { browser.text("upstream-state-up").await.filter(|t| t.starts_with("error")) })
        .await;
    assert!(state.len() > "error at ".len() + 10, "the error says why: {state}");
    assert_eq!(browser.attribute("upstream-up", "class").await.as_deref(), Some("down"));

    // (d) No error on the console, and none caught by the page's own handlers.
    let errors = severe(&browser.console().await);
    assert!(errors.is_empty(), "console errors: {errors:?}");
    assert_eq!(browser.execute("return window.pageErrors;").await, serde_json::json!([]));
}

/// At a hundred and twenty downloads in flight the API lists the oldest hundred and counts all, and the page says
/// how many more there are; with the requests held at the upstream, each is one flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_flights_are_summarised() {
    const N: usize = 120;
    let s = Setup::start("");
    let mut digests = Vec::new();
    for i in 0..N {
        digests.push(push_blob(&s.upstream_url(), "team/many", &pseudo_random(2000, 1000 + i as u64)).await);
    }
    s.relay.hang_on("GET /v2/team/many/blobs/");
    let clients = spawn_gets(digests.iter().map(|d| s.blob_url("team/many", d)));
    let mut status = s.status().await;
    for _ in 0..3000 {
        if status["flights"]["count"] == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        status = s.status().await;
    }
    assert_eq!(status["flights"]["count"], N, "{status}");
    assert_eq!(status["flights"]["shown"].as_array().unwrap().len(), 100);
    let browser = Browser::start().await;
    browser.goto(&s.bw.url("/")).await;
    let more = browser.wait_for("the flights summarised", SHOWN_WITHIN, || async { browser.text("flights-more").await }).await;
    assert_eq!(more, "20 more (the oldest 100 are shown)");
    assert_eq!(browser.text("flights-count").await.as_deref(), Some("120"));
    s.relay.hang(false);
    for (client, d) in clients.into_iter().zip(&digests) {
        assert_eq!(client.await.unwrap(), Ok((200, d.clone())));
    }
    let errors = severe(&browser.console().await);
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

/// With access control on, the page is the admin's, like `/api/`: refused (401, a Basic challenge) without
/// credentials and to a user who is not an admin, served to the admin with its security headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_access_control_the_page_is_the_admins() {
    images::require("htpasswd");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("htpasswd");
    for (i, (user, pass)) in [("root", "root-pw-1"), ("alice", "alice-pw-2")].iter().enumerate() {
        let mut cmd = std::process::Command::new("htpasswd");
        cmd.args(["-B", "-b"]);
        if i == 0 {
            cmd.arg("-c");
        }
        images::run(cmd.arg(&file).args([user, pass]));
    }
    let s = Setup::start(&format!("[auth]\nhtpasswd = \"{}\"\nadmins = [\"root\"]\n", file.display()));
    let http = reqwest::Client::new();
    for path in ["/", "/api/status"] {
        let r = http.get(s.bw.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} without credentials");
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic"), "{path}");
        let r = http.get(s.bw.url(path)).basic_auth("alice", Some("alice-pw-2")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path} for a user who is not an admin");
    }
    let r = http.get(s.bw.url("/")).basic_auth("root", Some("root-pw-1")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-store");
    let csp = h["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.starts_with("default-src 'none'; script-src 'sha256-") && csp.contains("connect-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    let page = r.text().await.unwrap();
    assert!(page.contains("/api/status") && !page.contains("https://"), "the page polls the API and loads nothing else");
}

/// The page makes the admin API a browser's, so a write to `/api/` that another site's page sends (a form or a
/// `fetch`, with the browser's saved credentials) is refused: 403 `DENIED`, and no run starts. The page's own
/// origin, and clients that send no `Origin` (curl, a registry's notifications), are let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_the_api_from_another_site_are_refused() {
    let s = Setup::start("");
    let http = reqwest::Client::new();
    let run = s.bw.url("/api/replication/mirror/run");
    let own = format!("http://{}", s.bw.url("/").trim_start_matches("http://").trim_end_matches('/'));
    for origin in ["http://evil.example", "null", "https://127.0.0.1", &own.replace("http://", "http://x")] {
        let r = http.post(&run).header("origin", origin).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "Origin {origin}");
        let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["errors"][0]["code"], "DENIED", "Origin {origin}: {body}");
    }
    let (_, body) = get(&s.bw.url("/api/replication/mirror")).await.unwrap();
    let job: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(job["running"], false, "a refused request started a run: {job}");
    assert_eq!(s.source_relay.count("GET", "/v2/_catalog"), 0, "a refused request reached the source");
    // The page's own origin, and no Origin at all, start the run (then 409 while it runs).
    let r = http.post(&run).header("origin", &own).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "the page's own origin");
    let r = http.post(&run).send().await.unwrap();
    assert!(matches!(r.status().as_u16(), 202 | 409), "no Origin: {}", r.status());
}

/// `/api/status` at the JSON level: after a herd of N pulls of one blob, the upstream fetched it once and served
/// it N times (the herd's misses, coalesced joins and hits say the same); manifest pulls rank the most pulled;
/// a failed upstream request is its last error; no rate-limit header was sent, so no headroom is known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_counts_what_coalescing_and_the_cache_saved() {
    const N: u64 = 8;
    let s = Setup::start("");
    let blob = pseudo_random(1 << 20, 91);
    let digest = push_blob(&s.upstream_url(), "team/app", &blob).await;
    let image = push_image(&s.upstream_url(), "team/img", "v1", &[1000], 92).await;
    s.relay.hang_on("GET /v2/team/app/blobs/");
    let clients = spawn_gets((0..N).map(|_| s.blob_url("team/app", &digest)));
    assert!(s.relay.wait_for_async("GET", "/v2/team/app/blobs/", 1, Duration::from_secs(20)).await);
    s.relay.hang(false);
    for client in clients {
        assert_eq!(client.await.unwrap(), Ok((200, digest.clone())));
    }
    assert_eq!(s.relay.count("GET", "/v2/team/app/blobs/"), 1, "one upstream download");
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let r = http.get(s.bw.url("/v2/up/team/img/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), image.digest);
    }
    let st = s.status().await;
    let up = &st["upstreams"][0];
    assert_eq!(up["name"], "up");
    assert_eq!(up["bytes_fetched"], blob.len() as u64, "{up}");
    assert_eq!(up["bytes_served"], N * blob.len() as u64, "{up}");
    assert_eq!(up["misses"].as_u64().unwrap(), 2, "the blob and the manifest, once each: {up}");
    assert_eq!(up["hits"].as_u64().unwrap() + up["coalesced"].as_u64().unwrap(), N - 1 + 2, "{up}");
    let ratio = up["hit_ratio"].as_f64().unwrap();
    assert!((ratio - (N + 1) as f64 / (N + 3) as f64).abs() < 1e-9, "{up}");
    assert!(up["requests"].as_u64().unwrap() >= 2 && up["last_success_ms"].as_u64().is_some(), "{up}");
    assert_eq!(up["last_error"], Value::Null);
    assert_eq!(up["stale_serves"], 0);
    assert_eq!(up["ratelimit_remaining"], Value::Null, "the upstream sent no rate-limit header");
    assert_eq!(st["cache"]["most_pulled"][0], serde_json::json!({ "artifact": "up/team/img:v1", "pulls": 3 }), "{st}");
    assert_eq!(st["cache"]["evictions"], 0);
    let job = &st["replication"][0];
    assert_eq!((job["name"].as_str(), job["running"].as_bool(), &job["rate"]), (Some("mirror"), Some(false), &Value::Null), "{st}");

    s.relay.down(true);
    let (code, _) = get(&s.bw.url("/v2/up/team/img/manifests/v2")).await.unwrap();
    assert_eq!(code, 502, "the upstream is unavailable");
    let st = s.status().await;
    let err = &st["upstreams"][0]["last_error"];
    assert!(err["at_ms"].as_u64().unwrap() >= st["upstreams"][0]["last_success_ms"].as_u64().unwrap(), "{st}");
    assert!(!err["message"].as_str().unwrap().is_empty(), "{st}");
}

/// Not a test: makes the README's screenshot, `docs/status-page.png`, of a few downloads in flight (held slow,
/// with several clients each) and a replication job running. Run by hand:
/// `cargo test --test status_page -- --ignored screenshot`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn screenshot() {
    let s = Setup::start("");
    let src = format!("http://{}", s.source.addr);
    for (i, repo) in ["rep/web", "rep/api", "rep/db", "rep/cache"].iter().enumerate() {
        push_image(&src, repo, "v1", &[3 << 20, 1 << 20], 200 + i as u64).await;
    }
    let repos = ["team/web", "team/api", "lib/base"];
    let mut digests = Vec::new();
    for (i, size) in [24 << 20, 16 << 20, 12 << 20].iter().enumerate() {
        digests.push(push_blob(&s.upstream_url(), repos[i], &pseudo_random(*size, 300 + i as u64)).await);
    }
    for (i, (repo, tag, pulls)) in [("lib/base", "1.4", 9), ("team/web", "2024.6", 5), ("team/api", "v3", 2)].iter().enumerate() {
        let image = push_image(&s.upstream_url(), repo, tag, &[1000], 310 + i as u64).await;
        for _ in 0..*pulls {
            let url = s.bw.url(&format!("/v2/up/{repo}/manifests/{tag}"));
            let r = reqwest::Client::new().get(url).header("accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), image.digest);
        }
    }
    s.relay.throttle_on("/blobs/", 1 << 20);
    s.source_relay.throttle_on("/blobs/", 128 << 10);
    let browser = Browser::start().await;
    browser.resize(1400, 900).await;
    browser.goto(&s.bw.url("/")).await;
    assert!(browser.wait_for("the Run button", SHOWN_WITHIN, || async { browser.click("job-run-mirror").await.then_some(true) }).await);
    browser
        .wait_for("the job running", SHOWN_WITHIN, || async { (browser.text("job-state-mirror").await? == "running").then_some(()) })
        .await;
    let herds = digests.iter().enumerate().flat_map(|(i, d)| std::iter::repeat_n(s.blob_url(repos[i], d), [12, 3, 1][i]));
    let clients = spawn_gets(herds.collect::<Vec<_>>());
    let bytes_id = format!("flight-bytes-{}", key(&digests[0]));
    browser
        .wait_for("three flights under way", SHOWN_WITHIN, || async {
            let bytes: u64 = browser.attribute(&bytes_id, "data-bytes").await?.parse().ok()?;
            (browser.text("flights-count").await? == "3" && bytes > 4 << 20).then_some(())
        })
        .await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, browser.screenshot().await).unwrap();
    s.relay.clear_faults();
    s.source_relay.clear_faults();
    for c in clients {
        assert_eq!(c.await.unwrap().map(|(code, _)| code), Ok(200));
    }
}

/// Evictions show in `/api/status`: two blobs of 1 MiB pulled through a cache of 1.5 MB, the first is evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_counts_evictions() {
    let s = Setup::start("[cache]\nmax_bytes = 1_500_000\n");
    let blobs: Vec<Vec<u8>> = (0..2).map(|i| pseudo_random(1 << 20, 500 + i)).collect();
    for blob in &blobs {
        let digest = push_blob(&s.upstream_url(), "team/big", blob).await;
        assert_eq!(get(&s.blob_url("team/big", &digest)).await.unwrap(), (200, blob.clone()));
    }
    let mut st = s.status().await;
    for _ in 0..2000 {
        if st["cache"]["evictions"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        st = s.status().await;
    }
    let cache = &st["cache"];
    assert_eq!((cache["evictions"].as_u64(), cache["evicted_bytes"].as_u64()), (Some(1), Some(1 << 20)), "{st}");
    assert_eq!((cache["bytes"].as_u64(), cache["max_bytes"].as_u64()), (Some(1 << 20), Some(1_500_000)), "{st}");
}

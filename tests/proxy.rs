//! The pull-through cache against a real upstream (Debian's `docker-registry`) reached through a counting,
//! fault-injecting relay: coalescing, resumption, integrity, freshness, availability and eviction. Every
//! assertion is about requests and bytes, never about time.

mod common;

use std::time::Duration;

use common::oci::{get, metric, pseudo_random, push_blob, push_image, sha256};
use common::relay::Relay;
use common::{Breakwater, Distribution};

/// An upstream registry behind a relay, and a breakwater caching it under the name `up`.
struct Cache {
    upstream: Distribution,
    relay: Relay,
    bw: Breakwater,
}

impl Cache {
    fn start(extra: &[&str]) -> Cache {
        let upstream = Distribution::start();
        let relay = Relay::start(&upstream.addr);
        let spec = format!("up=http://{}", relay.addr);
        let mut args = vec!["--upstream", spec.as_str()];
        args.extend_from_slice(extra);
        let bw = Breakwater::start_with(&args);
        Cache { upstream, relay, bw }
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
}

/// Blob GETs the upstream received (uploads excluded).
fn blob_gets(relay: &Relay) -> Vec<common::relay::Recorded> {
    relay.requests().into_iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/sha256:")).collect()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_of_cold_pulls_makes_one_upstream_get() {
    let c = Cache::start(&["--upstream-timeout-secs", "60"]);
    let blob = pseudo_random(6 << 20, 1);
    let digest = push_blob(&c.upstream_url(), "team/app", &blob).await;
    c.relay.reset();
    // Hold the upstream's answer until every client has asked, so all of them are waiting on one flight.
    c.relay.hang_on("/blobs/sha256:");
    const N: usize = 24;
    let mut clients = Vec::new();
    for _ in 0..N {
        let url = c.blob_url("team/app", &digest);
        clients.push(tokio::spawn(async move { get(&url).await }));
    }
    wait_for_metric(&c.bw_url(), "breakwater_cache_requests_total", &["kind=\"blob\"", "result=\"coalesced\""], (N - 1) as f64)
        .await;
    c.relay.hang(false);
    for client in clients {
        let (status, body) = client.await.unwrap().expect("complete body");
        assert_eq!(status, 200);
        assert_eq!(sha256(&body), digest);
    }
    let gets = blob_gets(&c.relay);
    assert_eq!(gets.len(), 1, "one upstream GET for {N} clients: {gets:?}");
    assert_eq!(gets[0].body_bytes, blob.len() as u64, "the blob crossed the uplink once");
    assert_eq!(metric(&c.bw_url(), "breakwater_cache_requests_total", &["kind=\"blob\"", "result=\"miss\""]).await, 1.0);

    // Late joiners are served from storage.
    let (status, body) = get(&c.blob_url("team/app", &digest)).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digest.clone()));
    assert_eq!(blob_gets(&c.relay).len(), 1);
    // The cached blob belongs to a normal repository now.
    let (_, catalog) = get(&c.bw.url("/v2/_catalog")).await.unwrap();
    assert!(String::from_utf8_lossy(&catalog).contains("up/team/app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_range_and_late_joiners_during_a_flight_add_no_upstream_request() {
    let c = Cache::start(&["--upstream-timeout-secs", "2"]);
    let blob = pseudo_random(3 << 20, 2);
    let digest = push_blob(&c.upstream_url(), "team/app", &blob).await;
    c.relay.reset();
    // The upstream sends the first MiB, then goes silent: the flight is in progress with 1 MiB spooled.
    c.relay.stall_after("/blobs/sha256:", 1 << 20, 1);
    let first = tokio::spawn({
        let url = c.blob_url("team/app", &digest);
        async move { get(&url).await }
    });
    assert!(c.relay.wait_for_async("GET", "/blobs/sha256:", 1, Duration::from_secs(30)).await);
    let client = reqwest::Client::new();
    let head = client.head(c.blob_url("team/app", &digest)).send().await.unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(head.headers()["content-length"].to_str().unwrap(), blob.len().to_string());
    let ranged = client.get(c.blob_url("team/app", &digest)).header("range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(ranged.status().as_u16(), 206);
    assert_eq!(ranged.headers()["content-range"].to_str().unwrap(), format!("bytes 1000-1999/{}", blob.len()));
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), &blob[1000..2000]);
    let late = tokio::spawn({
        let url = c.blob_url("team/app", &digest);
        async move { get(&url).await }
    });
    // The stalled body times out; the flight resumes from where it stopped.
    let (status, body) = first.await.unwrap().expect("first client");
    assert_eq!((status, sha256(&body)), (200, digest.clone()));
    let (status, body) = late.await.unwrap().expect("late client");
    assert_eq!((status, sha256(&body)), (200, digest.clone()));
    let gets = blob_gets(&c.relay);
    assert_eq!(gets.len(), 2, "the first GET and one resumption: {gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(gets[1].range.as_deref(), Some("bytes=1048576-"));
    assert_eq!(c.relay.count("HEAD", "/blobs/"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_mid_blob_is_resumed_with_range_and_verifies() {
    let c = Cache::start(&[]);
    let blob = pseudo_random(2 << 20, 3);
    let digest = push_blob(&c.upstream_url(), "team/app", &blob).await;
    c.relay.reset();
    c.relay.cut_after("/blobs/sha256:", 700_000, 1);
    let (status, body) = get(&c.blob_url("team/app", &digest)).await.expect("whole body despite the cut");
    assert_eq!((status, sha256(&body)), (200, digest.clone()));
    let gets = blob_gets(&c.relay);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].range.as_deref(), Some("bytes=700000-"));
    let fetched: u64 = gets.iter().map(|g| g.body_bytes).sum();
    assert_eq!(fetched, blob.len() as u64, "resumption fetched only the missing bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_blob_is_never_cached_and_its_client_is_cut() {
    let c = Cache::start(&[]);
    let blob = pseudo_random(1 << 20, 4);
    let digest = push_blob(&c.upstream_url(), "team/app", &blob).await;
    c.relay.reset();
    c.relay.corrupt("/blobs/sha256:", 12_345, 1);
    match get(&c.blob_url("team/app", &digest)).await {
        Ok((200, body)) => panic!("a corrupt blob was served whole ({} bytes, {})", body.len(), sha256(&body)),
        Ok((status, _)) => assert!(status >= 500, "status {status}"),
        Err(_) => {} // headers were sent, then the connection was cut: what must happen
    }
    // Nothing was cached: the next request fetches again, and gets the real bytes.
    let (status, body) = get(&c.blob_url("team/app", &digest)).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digest.clone()));
    assert_eq!(blob_gets(&c.relay).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_does_not_cancel_the_flight() {
    let c = Cache::start(&["--upstream-timeout-secs", "60"]);
    let blob = pseudo_random(4 << 20, 5);
    let digest = push_blob(&c.upstream_url(), "team/app", &blob).await;
    c.relay.reset();
    c.relay.throttle_on("/blobs/sha256:", 2 << 20);
    // The first client reads a little and goes away.
    let mut first = reqwest::get(c.blob_url("team/app", &digest)).await.unwrap();
    let chunk = first.chunk().await.unwrap().expect("some bytes");
    assert!(!chunk.is_empty());
    drop(first);
    let mut others = Vec::new();
    for _ in 0..3 {
        let url = c.blob_url("team/app", &digest);
        others.push(tokio::spawn(async move { get(&url).await }));
    }
    for o in others {
        let (status, body) = o.await.unwrap().expect("complete body");
        assert_eq!((status, sha256(&body)), (200, digest.clone()));
    }
    assert_eq!(blob_gets(&c.relay).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_coalesce_and_tags_are_trusted_for_their_ttl() {
    let c = Cache::start(&[]);
    let image = push_image(&c.upstream_url(), "team/app", "v1", &[1000], 6).await;
    c.relay.reset();
    c.relay.hang_on("/manifests/");
    let mut clients = Vec::new();
    for _ in 0..10 {
        let url = c.bw.url("/v2/up/team/app/manifests/v1");
        clients.push(tokio::spawn(async move { get(&url).await }));
    }
    wait_for_metric(&c.bw_url(), "breakwater_cache_requests_total", &["kind=\"manifest\"", "result=\"coalesced\""], 9.0).await;
    c.relay.hang(false);
    for client in clients {
        let (status, body) = client.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, image.manifest, "byte for byte");
    }
    assert_eq!(c.relay.count("", "/manifests/"), 1);
    // Within the TTL (default 300 s), a tag costs nothing upstream; a digest never does.
    for path in ["/v2/up/team/app/manifests/v1".to_string(), format!("/v2/up/team/app/manifests/{}", image.digest)] {
        let (status, body) = get(&c.bw.url(&path)).await.unwrap();
        assert_eq!((status, body), (200, image.manifest.clone()));
    }
    assert_eq!(c.relay.count("", "/manifests/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_tag_is_revalidated_with_one_head() {
    let c = Cache::start(&["--tag-ttl-secs", "0"]);
    let v1 = push_image(&c.upstream_url(), "team/app", "latest", &[100], 7).await;
    let (_, body) = get(&c.bw.url("/v2/up/team/app/manifests/latest")).await.unwrap();
    assert_eq!(body, v1.manifest);
    c.relay.reset();
    // Unchanged upstream: a HEAD, no GET.
    let (_, body) = get(&c.bw.url("/v2/up/team/app/manifests/latest")).await.unwrap();
    assert_eq!(body, v1.manifest);
    assert_eq!((c.relay.count("HEAD", "/manifests/latest"), c.relay.count("GET", "/manifests/")), (1, 0));
    // The tag moves upstream: the HEAD sees it, one GET fetches the new manifest.
    let v2 = push_image(&c.upstream_url(), "team/app", "latest", &[200], 8).await;
    c.relay.reset();
    let (_, body) = get(&c.bw.url("/v2/up/team/app/manifests/latest")).await.unwrap();
    assert_eq!(body, v2.manifest);
    assert_eq!((c.relay.count("HEAD", "/manifests/latest"), c.relay.count("GET", "/manifests/latest")), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hung_upstream_still_serves_cached_content() {
    let c = Cache::start(&["--tag-ttl-secs", "0", "--upstream-timeout-secs", "1"]);
    let image = push_image(&c.upstream_url(), "team/app", "v1", &[50_000], 9).await;
    let warm = |path: String| {
        let url = c.bw.url(&path);
        async move { get(&url).await.unwrap() }
    };
    assert_eq!(warm("/v2/up/team/app/manifests/v1".into()).await.0, 200);
    for d in [&image.config_digest, &image.layer_digests[0]] {
        assert_eq!(warm(format!("/v2/up/team/app/blobs/{d}")).await.0, 200);
    }
    for fault in ["down", "hang", "503"] {
        match fault {
            "down" => c.relay.down(true),
            "hang" => c.relay.hang(true),
            _ => c.relay.fail("", 503, None, 100),
        }
        let r = reqwest::get(c.bw.url("/v2/up/team/app/manifests/v1")).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{fault}");
        assert!(r.headers().get("warning").is_some_and(|w| w.to_str().unwrap().starts_with("110")), "{fault}: stale warning");
        assert_eq!(r.bytes().await.unwrap().as_ref(), image.manifest.as_slice());
        let (status, body) = get(&c.bw.url(&format!("/v2/up/team/app/blobs/{}", image.layer_digests[0]))).await.unwrap();
        assert_eq!((status, body), (200, image.layers[0].clone()), "{fault}: blobs come from storage");
        // Something never cached fails clearly rather than hanging.
        let r = reqwest::get(c.bw.url("/v2/up/team/app/manifests/never-cached")).await.unwrap();
        assert!(r.status().as_u16() >= 500, "{fault}: {}", r.status());
        c.relay.clear_faults();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tags_are_negatively_cached() {
    let c = Cache::start(&[]);
    push_image(&c.upstream_url(), "team/app", "v1", &[10], 10).await;
    c.relay.reset();
    for _ in 0..5 {
        let r = reqwest::get(c.bw.url("/v2/up/team/app/manifests/nope")).await.unwrap();
        assert_eq!(r.status().as_u16(), 404);
        assert!(r.text().await.unwrap().contains("MANIFEST_UNKNOWN"));
    }
    assert_eq!(c.relay.count("", "/manifests/nope"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let c = Cache::start(&[]);
    push_image(&c.upstream_url(), "team/app", "v1", &[10], 11).await;
    c.relay.reset();
    c.relay.fail("/manifests/", 429, Some("120"), 1);
    for _ in 0..3 {
        let r = reqwest::get(c.bw.url("/v2/up/team/app/manifests/v1")).await.unwrap();
        assert_eq!(r.status().as_u16(), 429);
        assert!(r.text().await.unwrap().contains("TOOMANYREQUESTS"));
    }
    assert_eq!(c.relay.count("", "/manifests/"), 1, "no request before Retry-After elapses");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_into_an_upstream_namespace_are_refused() {
    let c = Cache::start(&[]);
    let r = reqwest::Client::new().post(c.bw.url("/v2/up/team/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.unwrap().contains("DENIED"));
    // Other names are pushable as usual.
    push_blob(&c.bw_url(), "mine/app", b"local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_budget_and_never_removes_pushed_content() {
    const SIZE: usize = 1 << 20;
    let budget = (2 * SIZE + SIZE / 2).to_string();
    let c = Cache::start(&["--cache-max-bytes", &budget]);
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(SIZE, 100 + i)).collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(push_blob(&c.upstream_url(), "team/app", b).await);
    }
    // Blob 0 is also pushed to breakwater directly: that content must survive eviction.
    push_blob(&c.bw_url(), "mine/app", &blobs[0]).await;
    for d in &digests {
        let (status, body) = get(&c.blob_url("team/app", d)).await.unwrap();
        assert_eq!((status, sha256(&body)), (200, d.clone()));
    }
    wait_for_metric(&c.bw_url(), "breakwater_cache_evictions_total", &[], 1.0).await;
    // The pushed blob is still served from the pushed repository.
    let (status, body) = get(&c.bw.url(&format!("/v2/mine/app/blobs/{}", digests[0]))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digests[0].clone()));
    // Cached bytes on disk stay within the budget: at most two of the three cache-only blobs remain.
    let on_disk = digests[1..]
        .iter()
        .filter(|d| c.bw.data.path().join("content/blobs/sha256").join(&d[7..9]).join(&d[7..]).exists())
        .count();
    assert!(on_disk <= 2, "{on_disk} cache-only blobs on disk with a budget of 2.5 blobs");
    assert!(on_disk >= 1, "the most recent blob stays");
    // The least recently pulled cache-only blob (1) went first; pulling it again fetches it again.
    c.relay.reset();
    let (status, body) = get(&c.blob_url("team/app", &digests[1])).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digests[1].clone()));
    assert_eq!(blob_gets(&c.relay).len(), 1);
}

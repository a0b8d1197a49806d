//! Listings through the pull-through cache, against a real upstream (Debian's `docker-registry`, or a second
//! breakwater where the upstream must page its tags) behind the counting relay: tag lists come from the upstream
//! (paged by us, merged with what the cache holds, coalesced, kept for the tag TTL, served stale with a `Warning`
//! when the upstream is down, `NAME_UNKNOWN` negatively cached), referrers come from the upstream's referrers API
//! or its tag fallback (coalesced, cached, filtered by us), and an upstream's `repositories` allow-list keeps every
//! other name from reaching it. Every assertion is about requests, bytes and digests, never about time.

mod common;

use std::time::Duration;

use common::oci::{get, metric, push_blob, push_image, push_manifest, sha256, Image, OCI_MANIFEST};
use common::relay::Relay;
use common::{Breakwater, Distribution};
use serde_json::{json, Value};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SIG: &str = "application/vnd.example.sig.v1";
const SBOM: &str = "application/vnd.example.sbom.v1";

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
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// What a listing answered: status, JSON body, `Link` and `Warning` headers.
struct Answer {
    status: u16,
    body: Value,
    link: Option<String>,
    warning: Option<String>,
    headers: reqwest::header::HeaderMap,
}

async fn get_json(url: &str) -> Answer {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string());
    let (link, warning) = (header("link"), header("warning"));
    let body = r.bytes().await.unwrap();
    Answer { status, body: serde_json::from_slice(&body).unwrap_or(Value::Null), link, warning, headers }
}

/// The target of `Link: <target>; rel="next"`.
fn link_target(link: &str) -> String {
    assert!(link.ends_with("rel=\"next\""), "{link}");
    link.split(';').next().unwrap().trim().trim_start_matches('<').trim_end_matches('>').to_string()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

/// Follows `Link` from `first` (a path on `bw`) to the end; returns every page's tags.
async fn tag_pages(bw: &Breakwater, first: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut next = Some(first.to_string());
    while let Some(path) = next.take() {
        let a = get_json(&bw.url(&path)).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        out.push(strings(&a.body["tags"]));
        next = a.link.map(|l| link_target(&l));
        assert!(out.len() < 1000, "the Link chain does not end");
    }
    out
}

/// Tags `image` as each of `tags` in `base`'s `repo`.
async fn tag_all(base: &str, repo: &str, image: &Image, tags: &[&str]) {
    for t in tags {
        push_manifest(base, repo, t, OCI_MANIFEST, &image.manifest).await;
    }
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

async fn expect_error(resp: reqwest::Response, status: u16, code: &str) {
    let got = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    assert_eq!(got, status, "{body}");
    assert!(body.contains(code), "{code} expected: {body}");
}

// ---------------------------------------------------------------------------------------------------------------
// Tag lists.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_tag_list_is_the_upstreams_paged_by_us_and_merged_with_the_held_tags() {
    let c = Cache::start(&[]);
    let base = c.upstream_url();
    let image = push_image(&base, "team/app", "v1", &[100], 1).await;
    tag_all(&base, "team/app", &image, &["v2", "latest", "a-first", "Z-upper", "v10"]).await;
    // A tag the cache holds that the upstream no longer has: pulled through the cache, then deleted upstream.
    let gone = push_image(&base, "team/app", "gone", &[100], 2).await;
    let (status, _) = get(&c.bw.url("/v2/up/team/app/manifests/gone")).await.unwrap();
    assert_eq!(status, 200);
    let r = client().delete(format!("{base}/v2/team/app/manifests/{}", gone.digest)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "deleted upstream");
    c.relay.reset();

    let mut want: Vec<String> = ["v1", "v2", "latest", "a-first", "Z-upper", "v10", "gone"].map(String::from).to_vec();
    want.sort();
    // Without n: everything in one answer (byte order), no Link.
    let a = get_json(&c.bw.url("/v2/up/team/app/tags/list")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["name"], "up/team/app");
    assert_eq!(strings(&a.body["tags"]), want);
    assert_eq!(a.link, None);
    assert_eq!(a.warning, None);
    // With n, paged by us: every page bounded, Links with n and last, every tag once.
    let pages = tag_pages(&c.bw, "/v2/up/team/app/tags/list?n=3").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 1]);
    assert_eq!(pages.concat(), want);
    let a = get_json(&c.bw.url("/v2/up/team/app/tags/list?n=2&last=latest")).await;
    assert_eq!(strings(&a.body["tags"]), vec!["v1", "v10"]);
    assert_eq!(link_target(&a.link.unwrap()), "/v2/up/team/app/tags/list?n=2&last=v10");
    let a = get_json(&c.bw.url("/v2/up/team/app/tags/list?n=0")).await;
    assert_eq!((strings(&a.body["tags"]).len(), a.link), (0, None), "n=0: an empty list and no Link");
    // containerd's form names the upstream in ns=; the Link keeps it.
    let a = get_json(&c.bw.url("/v2/team/app/tags/list?ns=up&n=4")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(strings(&a.body["tags"]), want[..4].to_vec());
    assert_eq!(link_target(&a.link.unwrap()), format!("/v2/team/app/tags/list?n=4&last={}&ns=up", want[3]));
    // All of that was one upstream listing (the tag TTL, 300 s by default, covers the rest).
    assert_eq!(c.relay.count("GET", "/tags/list"), 1, "{:?}", c.relay.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_own_tag_pages_are_followed_through_link() {
    // A breakwater upstream pages its tags by 1000 with a Link, as Docker Hub and GHCR do.
    let origin = Breakwater::start_logged(&[], "breakwater=warn", &std::env::temp_dir().join(format!("cache-lists-origin-{}.log", std::process::id())));
    let base = origin.url("");
    let image = push_image(&base, "big/app", "t0000", &[100], 3).await;
    const TAGS: usize = 1205;
    let want: Vec<String> = (0..TAGS).map(|i| format!("t{i:04}")).collect();
    let mut pushes = Vec::new();
    for chunk in want[1..].chunks(150) {
        let (base, manifest, chunk) = (base.clone(), image.manifest.clone(), chunk.to_vec());
        pushes.push(tokio::spawn(async move {
            for t in chunk {
                push_manifest(&base, "big/app", &t, OCI_MANIFEST, &manifest).await;
            }
        }));
    }
    for p in pushes {
        p.await.unwrap();
    }
    let relay = Relay::start(&origin.addr);
    let bw = Breakwater::start_with(&["--upstream", &format!("up=http://{}", relay.addr)]);
    let pages = tag_pages(&bw, "/v2/up/big/app/tags/list").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![1000, 205], "paged by 1000 at most");
    assert_eq!(pages.concat(), want);
    let listings: Vec<String> = relay.requests().into_iter().filter(|r| r.path.contains("/tags/list")).map(|r| r.path).collect();
    assert_eq!(listings.len(), 2, "both upstream pages, once: {listings:?}");
    assert!(listings[1].contains("last=t0999"), "the second follows the upstream's Link: {listings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tag_listings_make_one_upstream_listing_and_the_ttl_serves_the_next() {
    let c = Cache::start(&["--upstream-timeout-secs", "60"]);
    let base = c.upstream_url();
    let image = push_image(&base, "team/app", "v1", &[100], 4).await;
    tag_all(&base, "team/app", &image, &["v2", "v3"]).await;
    c.relay.reset();
    // Hold the upstream's answer until every client has asked.
    c.relay.hang_on("/tags/list");
    const N: usize = 16;
    let mut clients = Vec::new();
    for i in 0..N {
        let url = c.bw.url(if i % 2 == 0 { "/v2/up/team/app/tags/list" } else { "/v2/up/team/app/tags/list?n=2" });
        clients.push(tokio::spawn(async move { get_json(&url).await }));
    }
    let bw_url = c.bw.url("");
    wait_for_metric(&bw_url, "breakwater_cache_requests_total", &["kind=\"tags\"", "result=\"coalesced\""], (N - 1) as f64).await;
    c.relay.hang(false);
    for (i, client) in clients.into_iter().enumerate() {
        let a = client.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        let want = if i % 2 == 0 { vec!["v1", "v2", "v3"] } else { vec!["v1", "v2"] };
        assert_eq!(strings(&a.body["tags"]), want);
    }
    assert_eq!(c.relay.count("GET", "/tags/list"), 1, "one upstream listing for {N} clients");
    // Within the TTL, the next listing costs nothing upstream.
    let a = get_json(&c.bw.url("/v2/up/team/app/tags/list")).await;
    assert_eq!(strings(&a.body["tags"]), vec!["v1", "v2", "v3"]);
    assert_eq!(c.relay.count("", ""), 1);
    assert!(metric(&bw_url, "breakwater_cache_requests_total", &["kind=\"tags\"", "result=\"hit\""]).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_upstream_serves_the_held_tags_with_a_warning() {
    let c = Cache::start(&["--tag-ttl-secs", "0", "--upstream-timeout-secs", "1"]);
    let base = c.upstream_url();
    let image = push_image(&base, "team/app", "a", &[100], 5).await;
    tag_all(&base, "team/app", &image, &["b", "c"]).await;
    let (status, _) = get(&c.bw.url("/v2/up/team/app/manifests/b")).await.unwrap();
    assert_eq!(status, 200);
    let a = get_json(&c.bw.url("/v2/up/team/app/tags/list")).await;
    assert_eq!((strings(&a.body["tags"]), a.warning), (vec!["a".to_string(), "b".into(), "c".into()], None));
    // With a TTL of 0 every listing asks the upstream; when it cannot answer, the held tags are the answer.
    for fault in ["down", "503"] {
        match fault {
            "down" => c.relay.down(true),
            _ => c.relay.fail("", 503, None, 100),
        }
        let a = get_json(&c.bw.url("/v2/up/team/app/tags/list")).await;
        assert_eq!(a.status, 200, "{fault}: {}", a.body);
        assert_eq!(strings(&a.body["tags"]), vec!["b"], "{fault}: the tags the cache holds");
        assert_eq!(a.warning.as_deref(), Some("110 - \"Response is Stale\""), "{fault}");
        // Nothing held: the client learns the upstream is unavailable.
        let a = get_json(&c.bw.url("/v2/up/team/other/tags/list")).await;
        assert!(a.status >= 500, "{fault}: {} {}", a.status, a.body);
        c.relay.clear_faults();
    }
    let a = get_json(&c.bw.url("/v2/up/team/app/tags/list")).await;
    assert_eq!((strings(&a.body["tags"]).len(), a.warning), (3, None), "back up: the upstream's list again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_repositories_are_name_unknown_and_negatively_cached() {
    let c = Cache::start(&[]);
    push_image(&c.upstream_url(), "team/app", "v1", &[10], 6).await;
    c.relay.reset();
    for _ in 0..3 {
        expect_error(client().get(c.bw.url("/v2/up/no/such/tags/list")).send().await.unwrap(), 404, "NAME_UNKNOWN").await;
    }
    assert_eq!(c.relay.count("GET", "/v2/no/such/tags/list"), 1, "asked once, then remembered: {:?}", c.relay.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_list_tags_through_the_cache_shows_the_upstreams_tags() {
    let c = Cache::start(&[]);
    let base = c.upstream_url();
    let image = push_image(&base, "team/app", "1.0", &[100], 7).await;
    tag_all(&base, "team/app", &image, &["1.1", "2.0", "latest"]).await;
    let tmp = common::images::scratch();
    let out = common::images::run(common::images::skopeo(tmp.path()).args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/up/team/app", c.bw.addr),
    ]));
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(strings(&listed["Tags"]), vec!["1.0", "1.1", "2.0", "latest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_mode_lists_the_default_upstreams_tags_and_a_local_repository_wins() {
    let c = Cache::start(&["--default-upstream", "up", "--allow-shadowing", "mine/**"]);
    let base = c.upstream_url();
    let image = push_image(&base, "team/app", "v1", &[100], 8).await;
    tag_all(&base, "team/app", &image, &["v2"]).await;
    push_image(&base, "mine/app", "upstream-only", &[100], 9).await;
    push_image(&c.bw.url(""), "mine/app", "local", &[100], 10).await;
    c.relay.reset();
    let a = get_json(&c.bw.url("/v2/team/app/tags/list")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!((a.body["name"].as_str(), strings(&a.body["tags"])), (Some("team/app"), vec!["v1".to_string(), "v2".into()]));
    // A local repository of the name is what the name means here (as for its manifests): listed alone.
    let a = get_json(&c.bw.url("/v2/mine/app/tags/list")).await;
    assert_eq!(strings(&a.body["tags"]), vec!["local"]);
    assert_eq!(c.relay.count("GET", "/tags/list"), 1, "only team/app was listed upstream: {:?}", c.relay.requests());
}

// ---------------------------------------------------------------------------------------------------------------
// Referrers.

/// An artifact manifest (a signature or SBOM) referring to `subject`, pushed by digest; returns its bytes and
/// digest.
async fn push_artifact(base: &str, repo: &str, subject: &Image, artifact_type: &str, seed: u64) -> (Vec<u8>, String) {
    let empty = push_blob(base, repo, b"{}").await;
    let payload = format!("payload {seed} of {}", subject.digest).into_bytes();
    let layer = push_blob(base, repo, &payload).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2 },
        "layers": [{ "mediaType": artifact_type, "digest": layer, "size": payload.len() }],
        "subject": { "mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.manifest.len() },
        "annotations": { "org.example.seed": seed.to_string() },
    })
    .to_string()
    .into_bytes();
    let digest = push_manifest(base, repo, &sha256(&manifest), OCI_MANIFEST, &manifest).await;
    (manifest, digest)
}

/// The descriptor of an artifact, as a referrers list shows it.
fn descriptor(manifest: &[u8], digest: &str, artifact_type: &str, seed: u64) -> Value {
    json!({
        "mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len(), "artifactType": artifact_type,
        "annotations": { "org.example.seed": seed.to_string() },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_come_from_the_tag_fallback_once_and_the_referring_manifests_pull_by_digest() {
    let c = Cache::start(&[]);
    let base = c.upstream_url();
    let image = push_image(&base, "signed/app", "v1", &[100], 11).await;
    // As cosign and oras do against a registry without the referrers API: the artifacts, then an index of them
    // under the tag sha256-<hex of the subject>.
    let mut want = Vec::new();
    for (seed, t) in [(1, SIG), (2, SBOM), (3, SIG)] {
        let (manifest, digest) = push_artifact(&base, "signed/app", &image, t, seed).await;
        want.push((descriptor(&manifest, &digest, t, seed), manifest));
    }
    want.sort_by(|a, b| a.0["digest"].as_str().cmp(&b.0["digest"].as_str()));
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": want.iter().map(|w| &w.0).collect::<Vec<_>>() });
    let fallback_tag = format!("sha256-{}", image.digest.trim_start_matches("sha256:"));
    push_manifest(&base, "signed/app", &fallback_tag, OCI_INDEX, index.to_string().as_bytes()).await;
    c.relay.reset();

    let path = format!("/v2/up/signed/app/referrers/{}", image.digest);
    let a = get_json(&c.bw.url(&path)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.headers["content-type"], OCI_INDEX);
    assert_eq!(a.body["mediaType"], OCI_INDEX);
    assert_eq!(a.body["manifests"].as_array().unwrap(), &want.iter().map(|w| w.0.clone()).collect::<Vec<_>>());
    assert!(a.headers.get("oci-filters-applied").is_none(), "nothing was filtered");
    // The upstream has no referrers API (404); the fallback tag answered.
    assert_eq!(c.relay.count("GET", "/v2/signed/app/referrers/"), 1);
    assert_eq!(c.relay.count("GET", &format!("/v2/signed/app/manifests/{fallback_tag}")), 1);
    let asked = c.relay.count("", "");
    assert_eq!(asked, 2, "{:?}", c.relay.requests());

    // Cached for the tag TTL: filtered and paged by us, nothing asked upstream.
    let a = get_json(&c.bw.url(&format!("{path}?artifactType={}", SIG.replace('+', "%2B")))).await;
    let sigs: Vec<Value> = want.iter().filter(|w| w.0["artifactType"] == SIG).map(|w| w.0.clone()).collect();
    assert_eq!(a.body["manifests"].as_array().unwrap(), &sigs);
    assert_eq!(a.headers["oci-filters-applied"], "artifactType");
    let a = get_json(&c.bw.url(&format!("{path}?n=2"))).await;
    assert_eq!(a.body["manifests"].as_array().unwrap().len(), 2);
    let next = link_target(&a.link.expect("a Link to the last referrer"));
    assert_eq!(next, format!("{path}?n=2&last={}", want[1].0["digest"].as_str().unwrap()));
    let a = get_json(&c.bw.url(&next)).await;
    assert_eq!((a.body["manifests"].as_array().unwrap(), a.link), (&vec![want[2].0.clone()], None));
    assert_eq!(c.relay.count("", ""), asked, "served from the cached listing");

    // A referring manifest pulls by digest through the normal cached manifest path, byte for byte.
    let art = want[0].0["digest"].as_str().unwrap().to_string();
    let (status, body) = get(&c.bw.url(&format!("/v2/up/signed/app/manifests/{art}"))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, art.clone()));
    assert_eq!(body, want[0].1);
    assert_eq!(c.relay.count("GET", &format!("/manifests/{art}")), 1);
    // Now held locally as well, it is not listed twice.
    let a = get_json(&c.bw.url(&path)).await;
    assert_eq!(a.body["manifests"].as_array().unwrap().len(), 3);

    // A subject without referrers: an empty index (cached as well).
    let other = push_image(&base, "signed/app", "v2", &[100], 12).await;
    for _ in 0..2 {
        let a = get_json(&c.bw.url(&format!("/v2/up/signed/app/referrers/{}", other.digest))).await;
        assert_eq!((a.status, a.body["manifests"].as_array().map(Vec::len)), (200, Some(0)), "{}", a.body);
    }
    assert_eq!(c.relay.count("GET", &format!("/v2/signed/app/referrers/{}", other.digest)), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_come_from_the_upstreams_referrers_api_when_it_has_one() {
    // A breakwater upstream answers the referrers API (distribution 2.8 does not).
    let origin = Breakwater::start_logged(&[], "breakwater=warn", &std::env::temp_dir().join(format!("cache-lists-api-{}.log", std::process::id())));
    let base = origin.url("");
    let image = push_image(&base, "signed/app", "v1", &[100], 14).await;
    let mut want = Vec::new();
    for (seed, t) in [(4, SIG), (5, SBOM)] {
        let (manifest, digest) = push_artifact(&base, "signed/app", &image, t, seed).await;
        want.push(descriptor(&manifest, &digest, t, seed));
    }
    want.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    let relay = Relay::start(&origin.addr);
    let bw = Breakwater::start_with(&["--upstream", &format!("up=http://{}", relay.addr)]);
    let path = format!("/v2/up/signed/app/referrers/{}", image.digest);
    for _ in 0..2 {
        let a = get_json(&bw.url(&path)).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["manifests"].as_array().unwrap(), &want);
    }
    assert_eq!(relay.count("GET", "/v2/signed/app/referrers/"), 1, "asked once: {:?}", relay.requests());
    assert_eq!(relay.count("", "/manifests/"), 0, "no fallback tag where the API answers");
}

// ---------------------------------------------------------------------------------------------------------------
// The allow-list.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_allowed_repositories_of_an_upstream_are_proxied() {
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("breakwater.toml");
    let toml = format!("[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\nrepositories = [\"allowed/**\", \"one/*\"]\n", relay.addr);
    std::fs::write(&config, toml).unwrap();
    let bw = Breakwater::start_with(&["--config", config.to_str().unwrap()]);
    let base = format!("http://{}", upstream.addr);
    let mut images = Vec::new();
    for repo in ["allowed/team/app", "one/app", "denied/app", "one/two/app"] {
        images.push((repo, push_image(&base, repo, "v1", &[100], 13).await));
    }
    relay.reset();
    for (repo, image) in &images[2..] {
        for path in [
            format!("/v2/up/{repo}/manifests/v1"),
            format!("/v2/up/{repo}/manifests/{}", image.digest),
            format!("/v2/up/{repo}/blobs/{}", image.layer_digests[0]),
            format!("/v2/up/{repo}/tags/list"),
            format!("/v2/up/{repo}/referrers/{}", image.digest),
            format!("/v2/{repo}/manifests/v1?ns=up"),
        ] {
            expect_error(client().get(bw.url(&path)).send().await.unwrap(), 404, "NAME_UNKNOWN").await;
        }
    }
    assert_eq!(relay.count("", ""), 0, "nothing outside the allow-list reached the upstream: {:?}", relay.requests());
    for (repo, image) in &images[..2] {
        let (status, body) = get(&bw.url(&format!("/v2/up/{repo}/manifests/v1"))).await.unwrap();
        assert_eq!((status, body), (200, image.manifest.clone()), "{repo}");
        let a = get_json(&bw.url(&format!("/v2/up/{repo}/tags/list"))).await;
        assert_eq!(strings(&a.body["tags"]), vec!["v1"], "{repo}");
    }
}

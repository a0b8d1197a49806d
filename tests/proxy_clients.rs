//! The pull-through cache as clients and operators meet it: upstream authentication (bearer tokens, basic), secrets
//! kept out of logs, blob redirects to a CDN, real clients (skopeo, podman) pulling through it, registry-mirror
//! mode (containerd's `ns=`, the default upstream, podman's mirror configuration) and `breakwater warm`.
//!
//! The upstream is a real Debian `docker-registry` behind the counting relay of `common::relay`; every assertion is
//! about requests, bytes and digests, never about time.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use common::auth::{base64, TokenServer};
use common::images::{self, Podman};
use common::oci::{push_image, push_manifest, sha256, Image, OCI_MANIFEST};
use common::relay::{Recorded, Relay};
use common::{Breakwater, Distribution};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

/// A client with a generous bound, so that a hung server fails the test instead of blocking it forever.
fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).no_proxy().build().expect("client")
}

/// A TOML configuration file in `dir`; returns its path for `--config`.
fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("breakwater.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// Starts breakwater with `--config FILE` (the file written into a fresh temp dir) and extra flags.
fn start_with_config(toml: &str, extra: &[&str]) -> (Breakwater, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), toml);
    let mut args = vec!["--config", path.as_str()];
    args.extend_from_slice(extra);
    (Breakwater::start_with(&args), dir)
}

/// An `[[upstream]]` table.
fn upstream_toml(name: &str, url: &str, extra: &[(&str, Value)]) -> String {
    let mut s = format!("[[upstream]]\nname = {}\nurl = {}\n", json!(name), json!(url));
    for (k, v) in extra {
        s.push_str(&format!("{k} = {v}\n"));
    }
    s.push('\n');
    s
}

/// What a full pull returned.
#[derive(Debug, Default)]
struct Pulled {
    /// Manifest digests, in the order they were fetched.
    manifests: Vec<String>,
    /// Blob digest → size, every blob verified against its digest.
    blobs: BTreeMap<String, u64>,
}

/// A GET through breakwater: status and body.
async fn fetch(url: &str, accept: Option<&str>) -> (u16, Vec<u8>) {
    let mut req = client().get(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap_or_else(|e| panic!("GET {url} body: {e}")).to_vec();
    (status, body)
}

/// Pulls `repo:reference` like a client does: the manifest, then (for an index) every child whose platform
/// `platform` accepts, then every config and layer. Checks every body against its digest. `query` is appended to
/// every URL (e.g. `?ns=up`).
async fn pull(base: &str, repo: &str, reference: &str, query: &str, platform: Option<&str>) -> Pulled {
    let mut out = Pulled::default();
    let mut queue = vec![reference.to_string()];
    while let Some(r) = queue.pop() {
        let url = format!("{base}/v2/{repo}/manifests/{r}{query}");
        let (status, body) = fetch(&url, Some(ACCEPT_ALL)).await;
        assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
        if r.starts_with("sha256:") {
            assert_eq!(sha256(&body), r, "GET {url}: manifest digest");
        }
        out.manifests.push(sha256(&body));
        let m: Value = serde_json::from_slice(&body).expect("manifest JSON");
        if let Some(children) = m["manifests"].as_array() {
            for c in children {
                let p = format!(
                    "{}/{}",
                    c["platform"]["os"].as_str().unwrap_or(""),
                    c["platform"]["architecture"].as_str().unwrap_or("")
                );
                if platform.is_none_or(|want| want == p) {
                    queue.push(c["digest"].as_str().unwrap().to_string());
                }
            }
            continue;
        }
        let mut descriptors = vec![m["config"].clone()];
        descriptors.extend(m["layers"].as_array().cloned().unwrap_or_default());
        for d in descriptors {
            let digest = d["digest"].as_str().unwrap();
            let url = format!("{base}/v2/{repo}/blobs/{digest}{query}");
            let (status, body) = fetch(&url, None).await;
            assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
            assert_eq!(sha256(&body), digest, "GET {url}: blob digest");
            assert_eq!(body.len() as u64, d["size"].as_u64().unwrap(), "GET {url}: blob size");
            out.blobs.insert(digest.to_string(), body.len() as u64);
        }
    }
    out
}

/// Every digest of an image pushed with `push_image`.
fn image_blobs(image: &Image) -> BTreeSet<String> {
    let mut s: BTreeSet<String> = image.layer_digests.iter().cloned().collect();
    s.insert(image.config_digest.clone());
    s
}

/// A failed pull must be a clear error: an error status with an OCI error body.
fn assert_oci_error(what: &str, status: u16, body: &[u8]) -> Value {
    assert!((400..600).contains(&status), "{what}: expected an error status, got {status}");
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {}", String::from_utf8_lossy(body)));
    let code = v["errors"][0]["code"].as_str();
    assert!(code.is_some_and(|c| !c.is_empty()), "{what}: OCI error body without a code: {v}");
    v
}

/// Blob GETs the relay received (uploads excluded).
fn blob_gets(relay: &Relay) -> Vec<Recorded> {
    relay.requests().into_iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/sha256:")).collect()
}

/// The digest at the end of a recorded path.
fn digest_of(r: &Recorded) -> String {
    r.path.split('?').next().unwrap().rsplit('/').next().unwrap().to_string()
}

fn bw_url(bw: &Breakwater) -> String {
    format!("http://{}", bw.addr)
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Bearer token auth
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_upstream_end_to_end() {
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let up = format!("http://{}", upstream.addr);
    let v1 = push_image(&up, "team/app", "v1", &[40_000, 3_000], 21).await;
    let other = push_image(&up, "team/other", "v1", &[5_000], 22).await;

    let ts = TokenServer::start("puller", "bearer-pw-7Hq2", Duration::from_secs(600));
    relay.require_bearer(&ts);
    // tag_ttl_secs = 0: every tag pull revalidates upstream, so the second pull really talks to the upstream.
    let toml = upstream_toml(
        "up",
        &relay.url(""),
        &[("username", json!("puller")), ("password", json!("bearer-pw-7Hq2")), ("tag_ttl_secs", json!(0))],
    );
    let (bw, _cfg) = start_with_config(&toml, &[]);

    // First pull: one challenge, one token for this repository, then manifest and every blob.
    let first = pull(&bw_url(&bw), "up/team/app", "v1", "", None).await;
    assert_eq!(first.manifests, vec![v1.digest.clone()]);
    assert_eq!(first.blobs.keys().cloned().collect::<BTreeSet<_>>(), image_blobs(&v1));
    assert_eq!(ts.issued(), 1, "one token for the first pull: {:?}", ts.requests());
    let tr = ts.requests();
    assert_eq!(tr[0].scopes, vec!["repository:team/app:pull".to_string()]);
    assert!(tr[0].authorization, "the token request carried the configured credentials");
    let served: Vec<Recorded> = relay.requests().into_iter().filter(|r| r.status == 200).collect();
    assert!(!served.is_empty());
    assert!(served.iter().all(|r| r.authorization), "every served upstream request carried the token: {served:?}");

    // Second pull of the same repository within the token's lifetime: the tag is revalidated and a new image's
    // blobs are fetched upstream, all with the cached token.
    let v2 = push_image(&up, "team/app", "v2", &[7_000], 23).await;
    relay.reset();
    let again = pull(&bw_url(&bw), "up/team/app", "v1", "", None).await;
    assert_eq!(again.manifests, vec![v1.digest.clone()]);
    let second = pull(&bw_url(&bw), "up/team/app", "v2", "", None).await;
    assert_eq!(second.manifests, vec![v2.digest.clone()]);
    assert!(relay.count("", "/v2/team/app/") >= 3, "the second pull reached the upstream: {:?}", relay.requests());
    assert_eq!(ts.issued(), 1, "no new token within the token's lifetime: {:?}", ts.requests());
    let unauthorized: Vec<Recorded> = relay.requests().into_iter().filter(|r| r.status == 401).collect();
    assert!(unauthorized.is_empty(), "the cached token was sent up front: {unauthorized:?}");

    // Another repository: a token for its own scope.
    let o = pull(&bw_url(&bw), "up/team/other", "v1", "", None).await;
    assert_eq!(o.manifests, vec![other.digest.clone()]);
    assert_eq!(ts.issued(), 2, "{:?}", ts.requests());
    assert_eq!(ts.requests().last().unwrap().scopes, vec!["repository:team/other:pull".to_string()]);
    assert_eq!(ts.denied(), 0);

    // The upstream forgets every token (a restarted auth service): the next fetch is refused once, a new token is
    // requested, and the pull succeeds.
    ts.revoke_all();
    let v3 = push_image(&up, "team/app", "v3", &[9_000], 36).await;
    let p = pull(&bw_url(&bw), "up/team/app", "v3", "", None).await;
    assert_eq!(p.manifests, vec![v3.digest.clone()]);
    assert_eq!(ts.issued(), 3, "one new token after the revocation: {:?}", ts.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_upstream_with_a_wrong_password_fails_clearly() {
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let image = push_image(&format!("http://{}", upstream.addr), "team/app", "v1", &[1_000], 24).await;
    let ts = TokenServer::start("puller", "right-pw", Duration::from_secs(600));
    relay.require_bearer(&ts);
    let toml = upstream_toml(
        "up",
        &relay.url(""),
        &[("username", json!("puller")), ("password", json!("wrong-pw")), ("timeout_secs", json!(30))],
    );
    let (bw, _cfg) = start_with_config(&toml, &[]);

    let (status, body) = fetch(&bw.url("/v2/up/team/app/manifests/v1"), Some(ACCEPT_ALL)).await;
    let err = assert_oci_error("manifest with a wrong password", status, &body);
    let message = err["errors"][0]["message"].as_str().unwrap_or("").to_lowercase();
    assert!(
        ["credential", "unauthorized", "401", "denied", "auth"].iter().any(|w| message.contains(w)),
        "the error says authentication failed: {err}"
    );
    let (status, body) = fetch(&bw.url(&format!("/v2/up/team/app/blobs/{}", image.layer_digests[0])), None).await;
    assert_oci_error("blob with a wrong password", status, &body);
    assert!(ts.denied() >= 1, "the token server refused the credentials");
    assert_eq!(ts.issued(), 0);
    assert_eq!(relay.requests().iter().filter(|r| r.status == 200).count(), 0, "nothing was served upstream");
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Basic auth
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_upstream_end_to_end() {
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let image = push_image(&format!("http://{}", upstream.addr), "team/app", "v1", &[30_000, 2_000], 25).await;
    relay.require_basic("basic-user", "basic-pw-Kx9");
    let toml = upstream_toml(
        "up",
        &relay.url(""),
        &[("username", json!("basic-user")), ("password", json!("basic-pw-Kx9"))],
    );
    let (bw, _cfg) = start_with_config(&toml, &[]);

    let p = pull(&bw_url(&bw), "up/team/app", "v1", "", None).await;
    assert_eq!(p.manifests, vec![image.digest.clone()]);
    assert_eq!(p.blobs.keys().cloned().collect::<BTreeSet<_>>(), image_blobs(&image));
    let requests = relay.requests();
    let served: Vec<&Recorded> = requests.iter().filter(|r| r.status == 200).collect();
    assert_eq!(served.len(), 1 + image_blobs(&image).len(), "{requests:?}");
    let expected = format!("Basic {}", base64(b"basic-user:basic-pw-Kx9"));
    assert!(served.iter().all(|r| r.header("authorization") == Some(expected.as_str())), "{served:?}");
    // Once challenged, the credentials go up front: at most the first request is answered 401.
    assert!(requests.iter().filter(|r| r.status == 401).count() <= 1, "{requests:?}");

    // A wrong password is a clear error, not a hang.
    let toml = upstream_toml("up", &relay.url(""), &[("username", json!("basic-user")), ("password", json!("nope"))]);
    let (bad, _cfg2) = start_with_config(&toml, &[]);
    let (status, body) = fetch(&bad.url("/v2/up/team/app/manifests/v1"), Some(ACCEPT_ALL)).await;
    assert_oci_error("manifest with a wrong basic password", status, &body);
    let (status, body) = fetch(&bad.url(&format!("/v2/up/team/app/blobs/{}", image.layer_digests[0])), None).await;
    assert_oci_error("blob with a wrong basic password", status, &body);
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Secrets never reach the log
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_tokens_never_appear_in_logs() {
    const BEARER_PW: &str = "Sekrit-Bearer-pw-4f9a1c";
    const BASIC_PW: &str = "Sekrit-Basic-pw-77be20";
    const WRONG_PW: &str = "Sekrit-Wrong-pw-c0ffee";
    let upstream = Distribution::start();
    let up = format!("http://{}", upstream.addr);
    let image = push_image(&up, "team/app", "v1", &[20_000], 26).await;
    // Pulled only with wrong credentials (content cached through another upstream would be served from the cache).
    let refused = push_image(&up, "team/refused", "v1", &[20_000], 35).await;
    let bearer_relay = Relay::start(&upstream.addr);
    let basic_relay = Relay::start(&upstream.addr);
    let ts = TokenServer::start("logger", BEARER_PW, Duration::from_secs(600));
    bearer_relay.require_bearer(&ts);
    basic_relay.require_basic("logger", BASIC_PW);

    let mut toml = String::new();
    for (name, relay, pw) in [
        ("bear", &bearer_relay, BEARER_PW),
        ("bas", &basic_relay, BASIC_PW),
        ("badbear", &bearer_relay, WRONG_PW),
        ("badbas", &basic_relay, WRONG_PW),
    ] {
        toml.push_str(&upstream_toml(
            name,
            &relay.url(""),
            &[("username", json!("logger")), ("password", json!(pw)), ("tag_ttl_secs", json!(0))],
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("breakwater.log");
    let bw = Breakwater::start_logged(&["--config", &config], "trace", &log);

    for name in ["bear", "bas"] {
        let p = pull(&bw_url(&bw), &format!("{name}/team/app"), "v1", "", None).await;
        assert_eq!(p.manifests, vec![image.digest.clone()], "{name}");
        // Again, so the tag is revalidated with the cached credentials.
        pull(&bw_url(&bw), &format!("{name}/team/app"), "v1", "", None).await;
    }
    for name in ["badbear", "badbas"] {
        let (status, body) = fetch(&bw.url(&format!("/v2/{name}/team/refused/manifests/v1")), Some(ACCEPT_ALL)).await;
        assert_oci_error(name, status, &body);
        let url = bw.url(&format!("/v2/{name}/team/refused/blobs/{}", refused.layer_digests[0]));
        let (status, body) = fetch(&url, None).await;
        assert_oci_error(name, status, &body);
    }
    // Let the server write out what it logged, then stop it.
    let _ = fetch(&bw.url("/healthz"), None).await;
    drop(bw);
    let text = std::fs::read_to_string(&log).expect("read log");
    eprintln!("breakwater logged {} lines at trace level", text.lines().count());

    // The log is real: it has the requests in it.
    assert!(text.contains("team/app"), "the log records the pulls ({} bytes)", text.len());
    let mut secrets: Vec<(String, String)> = vec![
        ("bearer password".into(), BEARER_PW.into()),
        ("basic password".into(), BASIC_PW.into()),
        ("wrong password".into(), WRONG_PW.into()),
    ];
    for pw in [BEARER_PW, BASIC_PW, WRONG_PW] {
        secrets.push((format!("basic credentials of {pw}"), base64(format!("logger:{pw}").as_bytes())));
    }
    let mut tokens = BTreeSet::new();
    for r in bearer_relay.requests() {
        if let Some(t) = r.header("authorization").and_then(|a| a.strip_prefix("Bearer ")) {
            tokens.insert(t.trim().to_string());
        }
    }
    assert!(!tokens.is_empty(), "tokens were issued and presented");
    assert_eq!(tokens.len(), ts.issued(), "every issued token was presented upstream");
    for t in &tokens {
        secrets.push((format!("token {t}"), t.clone()));
        // Tokens are `tok-<32 hex>`: a log that prints a prefix of one is leaking it too.
        secrets.push((format!("token body of {t}"), t.trim_start_matches("tok-")[..16].to_string()));
    }
    for (what, secret) in &secrets {
        if let Some(at) = text.find(secret.as_str()) {
            let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            panic!("the {what} appears in the log:\n{}", &text[start..end]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Redirects to a CDN
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirects_to_a_cdn_carry_no_credentials() {
    let upstream = Distribution::start();
    let image = push_image(&format!("http://{}", upstream.addr), "team/app", "v1", &[300_000, 4_000], 27).await;
    let registry = Relay::start(&upstream.addr);
    let cdn = Relay::start(&upstream.addr);
    let ts = TokenServer::start("puller", "cdn-pw", Duration::from_secs(600));
    registry.require_bearer(&ts);
    registry.redirect_blobs_to(&cdn.addr);
    let toml = upstream_toml("up", &registry.url(""), &[("username", json!("puller")), ("password", json!("cdn-pw"))]);
    let (bw, _cfg) = start_with_config(&toml, &[]);

    let p = pull(&bw_url(&bw), "up/team/app", "v1", "", None).await;
    assert_eq!(p.manifests, vec![image.digest.clone()]);
    assert_eq!(p.blobs.keys().cloned().collect::<BTreeSet<_>>(), image_blobs(&image));

    // The registry answered every authorized blob GET with a redirect; the CDN served the bytes.
    let redirected: BTreeSet<String> =
        blob_gets(&registry).iter().filter(|r| r.status == 307).map(digest_of).collect();
    assert_eq!(redirected, image_blobs(&image), "{:?}", registry.requests());
    let cdn_gets = blob_gets(&cdn);
    assert_eq!(cdn_gets.iter().map(digest_of).collect::<BTreeSet<_>>(), image_blobs(&image), "{cdn_gets:?}");
    assert!(cdn_gets.iter().all(|r| r.status == 200 && r.complete));
    let leaked: Vec<Recorded> = cdn.requests().into_iter().filter(|r| r.authorization).collect();
    assert!(leaked.is_empty(), "credentials were sent to the CDN host: {leaked:?}");
    let bytes: u64 = cdn_gets.iter().map(|r| r.body_bytes).sum();
    assert_eq!(bytes, p.blobs.values().sum::<u64>(), "each blob crossed from the CDN once");
    // Served from the cache afterwards: no more upstream traffic.
    registry.reset();
    cdn.reset();
    pull(&bw_url(&bw), "up/team/app", "v1", "", None).await;
    assert_eq!((blob_gets(&registry).len(), cdn.requests().len()), (0, 0));

    // The CDN cuts a download mid-way: the resumption goes through the registry again (which redirects again), asks
    // the CDN for the rest with a Range, and still sends it no credentials.
    let big = push_image(&format!("http://{}", upstream.addr), "team/big", "v1", &[500_000], 37).await;
    let layer = big.layer_digests[0].clone();
    cdn.cut_after(&format!("/blobs/{layer}"), 200_000, 1);
    let (status, body) = fetch(&bw.url(&format!("/v2/up/team/big/blobs/{layer}")), None).await;
    assert_eq!((status, sha256(&body)), (200, layer.clone()));
    let gets: Vec<Recorded> = blob_gets(&cdn).into_iter().filter(|r| r.path.contains(&layer)).collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].range.as_deref(), Some("bytes=200000-"));
    assert_eq!(gets.iter().map(|r| r.body_bytes).sum::<u64>(), 500_000, "only the missing bytes were fetched again");
    let leaked: Vec<Recorded> = cdn.requests().into_iter().filter(|r| r.authorization).collect();
    assert!(leaked.is_empty(), "credentials were sent to the CDN host: {leaked:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// 5. skopeo and podman through the cache
// ---------------------------------------------------------------------------------------------------------------

/// Each blob GET reached the upstream at most once, whatever the clients did.
fn assert_each_blob_fetched_once(relay: &Relay) {
    let mut seen = BTreeMap::<String, usize>::new();
    for r in blob_gets(relay) {
        *seen.entry(digest_of(&r)).or_default() += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "upstream blob GETs per digest: {seen:?}");
}

#[test]
fn skopeo_and_podman_pull_through_the_cache() {
    let dir = images::scratch();
    let tmp = dir.path();
    let layout = tmp.join("src");
    let single = images::build_image(&layout, "single", images::host_arch(), &[("etc/motd", "through the cache\n")]);
    let multi = images::build_multiarch(&tmp.join("multi"));

    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let spec = format!("up=http://{}", relay.addr);
    let bw = Breakwater::start_with(&["--upstream", &spec]);
    images::skopeo_copy(
        tmp,
        &[],
        &images::oci_ref(&layout, "single"),
        &format!("docker://{}/team/app:v1", upstream.addr),
    );
    images::skopeo_copy(
        tmp,
        &["--all"],
        &images::oci_ref(&multi.layout, "multi"),
        &format!("docker://{}/team/multi:v1", upstream.addr),
    );
    let upstream_single = sha256(&images::skopeo_raw(tmp, &format!("docker://{}/team/app:v1", upstream.addr)));
    let upstream_multi = sha256(&images::skopeo_raw(tmp, &format!("docker://{}/team/multi:v1", upstream.addr)));
    assert_eq!((upstream_single.as_str(), upstream_multi.as_str()), (single.as_str(), multi.index.as_str()));
    relay.reset();

    // skopeo, one image.
    let out = tmp.join("out");
    images::run(
        images::skopeo(tmp)
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{}/up/team/app:v1", bw.addr))
            .arg(images::oci_ref(&out, "single")),
    );
    assert_eq!(images::layout_digest(&out, "single"), upstream_single);
    for b in images::layout_image_blobs(&out, &single) {
        images::layout_blob(&out, &b);
    }

    // skopeo --all, a multi-platform index: the index and every child, digests identical.
    images::run(
        images::skopeo(tmp)
            .args(["copy", "--all", "--src-tls-verify=false"])
            .arg(format!("docker://{}/up/team/multi:v1", bw.addr))
            .arg(images::oci_ref(&out, "multi")),
    );
    assert_eq!(images::layout_digest(&out, "multi"), upstream_multi);
    let index: Value = serde_json::from_slice(&images::layout_blob(&out, &upstream_multi)).unwrap();
    let children: BTreeSet<String> =
        index["manifests"].as_array().unwrap().iter().map(|c| c["digest"].as_str().unwrap().to_string()).collect();
    assert_eq!(children, BTreeSet::from([multi.amd64.clone(), multi.arm64.clone()]));
    for child in &children {
        for b in images::layout_image_blobs(&out, child) {
            images::layout_blob(&out, &b);
        }
    }
    assert_each_blob_fetched_once(&relay);

    // podman: an image already cached by skopeo, and the index (podman picks this machine's platform).
    let podman = Podman::new();
    let single_ref = format!("{}/up/team/app:v1", bw.addr);
    let multi_ref = format!("{}/up/team/multi:v1", bw.addr);
    images::run(podman.cmd().args(["pull", "--tls-verify=false", &single_ref]));
    images::run(podman.cmd().args(["pull", "--tls-verify=false", &multi_ref]));
    assert_eq!(podman.inspect(&single_ref)["Digest"], upstream_single.as_str());
    let m = podman.inspect(&multi_ref);
    assert_eq!(m["Digest"], upstream_multi.as_str());
    assert_eq!(m["Architecture"], images::host_arch());
    assert_each_blob_fetched_once(&relay);

    // podman against a cold cache: a fresh breakwater over the same upstream.
    let cold = Breakwater::start_with(&["--upstream", &spec]);
    relay.reset();
    let podman2 = Podman::new();
    let cold_ref = format!("{}/up/team/app:v1", cold.addr);
    images::run(podman2.cmd().args(["pull", "--tls-verify=false", &cold_ref]));
    assert_eq!(podman2.inspect(&cold_ref)["Digest"], upstream_single.as_str());
    let fetched: BTreeSet<String> = blob_gets(&relay).iter().map(digest_of).collect();
    assert_eq!(fetched, images::layout_image_blobs(&out, &single).into_iter().collect(), "podman's blobs came upstream");
    assert_each_blob_fetched_once(&relay);
}

// ---------------------------------------------------------------------------------------------------------------
// 6. Mirror mode
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_style_ns_requests_are_served_from_that_upstream() {
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let image = push_image(&format!("http://{}", upstream.addr), "team/app", "v1", &[10_000], 28).await;
    let spec = format!("up=http://{}", relay.addr);
    let bw = Breakwater::start_with(&["--upstream", &spec]);
    relay.reset();

    // containerd sends the name without the upstream and names the upstream in `ns`.
    let p = pull(&bw_url(&bw), "team/app", "v1", "?ns=up", None).await;
    assert_eq!(p.manifests, vec![image.digest.clone()]);
    assert_eq!(p.blobs.keys().cloned().collect::<BTreeSet<_>>(), image_blobs(&image));
    assert_eq!(relay.count("GET", "/v2/team/app/manifests/v1"), 1, "{:?}", relay.requests());
    assert_eq!(blob_gets(&relay).len(), image_blobs(&image).len());
    // It went into the `up` cache: the prefixed name is a hit.
    relay.reset();
    pull(&bw_url(&bw), "up/team/app", "v1", "", None).await;
    assert_eq!(relay.requests().len(), 0, "{:?}", relay.requests());
    // Without `ns` and without a default upstream, an un-prefixed name is local only (and unknown here).
    let (status, body) = fetch(&bw.url("/v2/team/app/manifests/v1"), Some(ACCEPT_ALL)).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert_eq!(relay.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_upstream_takes_unprefixed_names_that_are_not_local() {
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let up = format!("http://{}", upstream.addr);
    let remote = push_image(&up, "team/app", "v1", &[10_000], 29).await;
    let shadowed = push_image(&up, "team/local", "v1", &[10_000], 30).await;
    let spec = format!("up=http://{}", relay.addr);
    let bw = Breakwater::start_with(&["--upstream", &spec, "--default-upstream", "up", "--allow-shadowing", "team/local"]);
    let local = push_image(&bw_url(&bw), "team/local", "v1", &[12_000], 31).await;
    assert_ne!(local.digest, shadowed.digest);
    relay.reset();

    // Not local: from the default upstream.
    let p = pull(&bw_url(&bw), "team/app", "v1", "", None).await;
    assert_eq!(p.manifests, vec![remote.digest.clone()]);
    assert_eq!(p.blobs.keys().cloned().collect::<BTreeSet<_>>(), image_blobs(&remote));
    assert_eq!(relay.count("GET", "/v2/team/app/manifests/v1"), 1);
    // Local: served locally, the upstream is not asked.
    let p = pull(&bw_url(&bw), "team/local", "v1", "", None).await;
    assert_eq!(p.manifests, vec![local.digest.clone()]);
    assert_eq!(p.blobs.keys().cloned().collect::<BTreeSet<_>>(), image_blobs(&local));
    assert_eq!(relay.count("", "team/local"), 0, "{:?}", relay.requests());
    // A second pull of the upstream image is a cache hit.
    relay.reset();
    pull(&bw_url(&bw), "team/app", "v1", "", None).await;
    assert_eq!(relay.requests().len(), 0, "{:?}", relay.requests());
}

/// podman as a registry-mirror client: `registries.conf` sends docker.io pulls to breakwater first, without any
/// `ns` parameter; the upstream named docker.io is the default, with Docker Hub's `library/` shorthand.
#[test]
fn podman_pulls_through_breakwater_as_a_docker_io_mirror() {
    let dir = images::scratch();
    let tmp = dir.path();
    let layout = tmp.join("src");
    let digest = images::build_image(&layout, "v1", images::host_arch(), &[("etc/motd", "mirrored\n")]);
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    images::skopeo_copy(
        tmp,
        &[],
        &images::oci_ref(&layout, "v1"),
        &format!("docker://{}/library/mirrored:v1", upstream.addr),
    );
    let toml = upstream_toml(
        "docker.io",
        &relay.url(""),
        &[("default", json!(true)), ("library_shorthand", json!(true))],
    );
    let (bw, _cfg) = start_with_config(&toml, &[]);
    relay.reset();

    let podman = Podman::with_registries(&format!(
        "unqualified-search-registries = []\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"registry-1.docker.io\"\n\n\
         [[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
        bw.addr
    ));
    images::run(podman.cmd().args(["pull", "docker.io/library/mirrored:v1"]));
    assert_eq!(podman.inspect("docker.io/library/mirrored:v1")["Digest"], digest.as_str());
    assert_eq!(relay.count("GET", "/v2/library/mirrored/manifests/"), 1, "{:?}", relay.requests());
    let fetched: BTreeSet<String> = blob_gets(&relay).iter().map(digest_of).collect();
    assert_eq!(fetched, images::layout_image_blobs(&layout, &digest).into_iter().collect());

    // The short form resolves to the same image, served from the cache.
    relay.reset();
    images::run(podman.cmd().args(["pull", "docker.io/mirrored:v1"]));
    assert_eq!(podman.inspect("docker.io/mirrored:v1")["Digest"], digest.as_str());
    assert_eq!(blob_gets(&relay).len(), 0);
    // And breakwater itself applies the shorthand to a one-component name: `mirrored` is `library/mirrored`.
    let url = bw.url("/v2/mirrored/manifests/v1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, body) = rt.block_on(fetch(&url, Some(ACCEPT_ALL)));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sha256(&body), digest);
    assert_eq!(relay.count("", "/v2/mirrored/"), 0, "the upstream is only ever asked for library/mirrored");
}

// ---------------------------------------------------------------------------------------------------------------
// 7. breakwater warm
// ---------------------------------------------------------------------------------------------------------------

fn warm(bw: &Breakwater, args: &[&str]) -> String {
    images::run(
        Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args(["warm", "--server", &bw_url(bw)])
            .args(args)
            .env("RUST_LOG", "warn"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_fills_the_cache_so_a_pull_costs_nothing_upstream() {
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let image = push_image(&format!("http://{}", upstream.addr), "team/app", "v1", &[200_000, 30_000, 1_000], 32).await;
    let spec = format!("up=http://{}", relay.addr);
    let bw = Breakwater::start_with(&["--upstream", &spec]);
    relay.reset();

    warm(&bw, &["up/team/app:v1"]);
    let warmed: BTreeSet<String> = blob_gets(&relay).iter().map(digest_of).collect();
    assert_eq!(warmed, image_blobs(&image), "warm fetched every blob");
    let total: u64 = image.layers.iter().map(|l| l.len() as u64).sum::<u64>() + image.config.len() as u64;
    assert_eq!(blob_gets(&relay).iter().map(|r| r.body_bytes).sum::<u64>(), total);

    relay.reset();
    let p = pull(&bw_url(&bw), "up/team/app", "v1", "", None).await;
    assert_eq!(p.manifests, vec![image.digest.clone()]);
    assert_eq!(p.blobs.values().sum::<u64>(), total);
    assert_eq!(relay.requests().len(), 0, "a warmed pull makes no upstream request: {:?}", relay.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_with_a_platform_fetches_only_that_child() {
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let up = format!("http://{}", upstream.addr);
    let amd64 = push_image(&up, "team/multi", "amd64", &[50_000, 2_000], 33).await;
    let arm64 = push_image(&up, "team/multi", "arm64", &[60_000, 3_000], 34).await;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": amd64.digest, "size": amd64.manifest.len(),
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": arm64.digest, "size": arm64.manifest.len(),
             "platform": {"os": "linux", "architecture": "arm64"}},
        ],
    });
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = push_manifest(&up, "team/multi", "v1", OCI_INDEX, &index_bytes).await;
    let spec = format!("up=http://{}", relay.addr);
    let bw = Breakwater::start_with(&["--upstream", &spec]);
    relay.reset();

    warm(&bw, &["--platform", "linux/arm64", "up/team/multi:v1"]);
    let manifest_gets: BTreeSet<String> = relay
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/manifests/"))
        .map(digest_of)
        .collect();
    assert_eq!(manifest_gets, BTreeSet::from(["v1".to_string(), arm64.digest.clone()]), "{:?}", relay.requests());
    let fetched: BTreeSet<String> = blob_gets(&relay).iter().map(digest_of).collect();
    assert_eq!(fetched, image_blobs(&arm64), "only the arm64 child's blobs were fetched");
    assert_eq!(blob_gets(&relay).len(), image_blobs(&arm64).len(), "each once");
    let arm64_bytes: u64 = arm64.layers.iter().map(|l| l.len() as u64).sum::<u64>() + arm64.config.len() as u64;
    assert_eq!(blob_gets(&relay).iter().map(|r| r.body_bytes).sum::<u64>(), arm64_bytes);
    assert!(image_blobs(&amd64).iter().all(|d| relay.count("", d) == 0), "nothing of amd64 was asked for");

    // An arm64 pull is now free upstream.
    relay.reset();
    let p = pull(&bw_url(&bw), "up/team/multi", "v1", "", Some("linux/arm64")).await;
    assert_eq!(p.manifests, vec![index_digest.clone(), arm64.digest.clone()]);
    assert_eq!(relay.requests().len(), 0, "{:?}", relay.requests());
    // The amd64 child was not warmed: pulling it goes upstream.
    pull(&bw_url(&bw), "up/team/multi", "v1", "", Some("linux/amd64")).await;
    let fetched: BTreeSet<String> = blob_gets(&relay).iter().map(digest_of).collect();
    assert_eq!(fetched, image_blobs(&amd64));
}

// ---------------------------------------------------------------------------------------------------------------
// 6b. containerd, directly and as a registry mirror (`ns=`)
// ---------------------------------------------------------------------------------------------------------------

/// containerd pulls (and unpacks) through breakwater by name, and as a docker.io mirror configured with a hosts
/// directory, in which case it sends `?ns=docker.io` on every request: a relay between containerd and breakwater
/// records what it really sent.
#[test]
fn containerd_pulls_through_the_cache_directly_and_as_a_mirror() {
    let dir = images::scratch();
    let tmp = dir.path();
    let layout = tmp.join("src");
    let digest = images::build_image(&layout, "v1", images::host_arch(), &[("etc/motd", "via containerd\n")]);
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    for repo in ["team/app", "library/mirrored"] {
        images::skopeo_copy(tmp, &[], &images::oci_ref(&layout, "v1"), &format!("docker://{}/{repo}:v1", upstream.addr));
    }
    let spec = format!("docker.io=http://{}", relay.addr);
    let bw = Breakwater::start_with(&["--upstream", &spec]);
    let front = Relay::start(&bw.addr);
    relay.reset();
    let ctrd = common::containerd::Containerd::start();

    // By name, plain HTTP.
    let direct = format!("{}/docker.io/team/app:v1", front.addr);
    images::run(ctrd.ctr().args(["images", "pull", "--plain-http", "--snapshotter", "native", &direct]));
    assert_eq!(ctrd.image_digest(&direct).as_deref(), Some(digest.as_str()), "{}", ctrd.log());
    let blobs: BTreeSet<String> = images::layout_image_blobs(&layout, &digest).into_iter().collect();
    let fetched: BTreeSet<String> = blob_gets(&relay).iter().map(digest_of).collect();
    assert_eq!(fetched, blobs);

    // As a mirror: containerd names the upstream in `ns` and breakwater serves it from that upstream.
    relay.reset();
    let hosts = ctrd.hosts_dir("docker.io", "https://registry-1.docker.io", &format!("http://{}", front.addr));
    images::run(
        ctrd.ctr()
            .args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(&hosts)
            .arg("docker.io/library/mirrored:v1"),
    );
    assert_eq!(ctrd.image_digest("docker.io/library/mirrored:v1").as_deref(), Some(digest.as_str()));
    let mirrored: Vec<Recorded> = front.requests().into_iter().filter(|r| r.path.contains("/library/mirrored/")).collect();
    assert!(!mirrored.is_empty(), "containerd asked the mirror: {:?}", front.requests());
    assert!(mirrored.iter().all(|r| r.path.ends_with("?ns=docker.io") && r.status == 200), "{mirrored:?}");
    assert_eq!(relay.count("", "/v2/library/mirrored/manifests/"), 1, "{:?}", relay.requests());
    // The blobs are shared with team/app, already cached: nothing more crossed the uplink.
    assert_eq!(blob_gets(&relay).len(), 0, "{:?}", relay.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_share_one_token_request_and_a_refused_login_is_not_repeated() {
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let up = format!("http://{}", upstream.addr);
    for i in 0..8 {
        push_image(&up, "team/app", &format!("t{i}"), &[1_000], 40 + i).await;
    }
    let ts = TokenServer::start("puller", "right-pw", Duration::from_secs(600));
    relay.require_bearer(&ts);
    let toml = upstream_toml("up", &relay.url(""), &[("username", json!("puller")), ("password", json!("right-pw"))]);
    let (bw, _cfg) = start_with_config(&toml, &[]);
    let mut pulls = Vec::new();
    for i in 0..8 {
        let url = format!("{}/v2/up/team/app/manifests/t{i}", bw_url(&bw));
        pulls.push(tokio::spawn(async move { fetch(&url, None).await.0 }));
    }
    for p in pulls {
        assert_eq!(p.await.unwrap(), 200);
    }
    assert_eq!(ts.issued(), 1, "one token request for one scope: {:?}", ts.requests());

    // With a wrong password, a burst of pulls makes one refused login, not one per pull.
    let toml = upstream_toml("bad", &relay.url(""), &[("username", json!("puller")), ("password", json!("wrong"))]);
    let (bad, _cfg2) = start_with_config(&toml, &[]);
    for i in 0..5 {
        let (status, body) = fetch(&format!("{}/v2/bad/team/app/manifests/t{i}", bw_url(&bad)), None).await;
        assert_oci_error("refused login", status, &body);
    }
    assert_eq!(ts.denied(), 1, "the refusal is remembered: {:?}", ts.requests());
}

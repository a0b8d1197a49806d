//! Self-tests of the test infrastructure in `tests/common/relay.rs` and `tests/common/auth.rs`: a real
//! `docker-registry` behind a `Relay`, driven with plain reqwest, to prove that the relay counts what it relays and
//! that each injected fault does what the pull-through-cache tests will rely on (throttle, delay, hang, stall, cut,
//! corrupt, fail with Retry-After, down, Bearer and Basic auth, cross-host blob redirects).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::auth::TokenServer;
use common::relay::Relay;
use common::Distribution;
use sha2::{Digest, Sha256};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Deterministic, incompressible-looking test data.
fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Monolithic upload through the relay: POST, then PUT to the returned Location with `?digest=`.
async fn push_blob(c: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let digest = digest_of(data);
    let r = c.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202, "POST upload");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    assert!(
        location.starts_with(base),
        "Location {location} must point at the relay {base}"
    );
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "PUT upload");
    digest
}

struct Setup {
    _dist: Distribution,
    relay: Relay,
    c: reqwest::Client,
    base: String,
}

fn setup() -> Setup {
    let dist = Distribution::start();
    let relay = Relay::start(&dist.addr);
    let base = format!("http://{}", relay.addr);
    Setup {
        _dist: dist,
        relay,
        c: client(),
        base,
    }
}

#[tokio::test]
async fn counts_requests_and_bytes() {
    let s = setup();
    let data = blob(300_000, 1);
    let digest = push_blob(&s.c, &s.base, "self/count", &data).await;
    assert_eq!(s.relay.count("POST", "/blobs/uploads/"), 1);
    assert_eq!(s.relay.count("PUT", "/blobs/uploads/"), 1);
    s.relay.reset();
    assert!(s.relay.requests().is_empty());
    assert_eq!(s.relay.body_bytes(), 0);

    let path = format!("/v2/self/count/blobs/{digest}");
    let head = s.c.head(s.relay.url(&path)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], data.len().to_string().as_str());
    let got =
        s.c.get(s.relay.url(&path))
            .header("range", "bytes=0-")
            .send()
            .await
            .unwrap();
    assert!(got.status().is_success());
    let got = got.bytes().await.unwrap();
    assert_eq!(&got[..], &data[..]);

    assert_eq!(s.relay.count("GET", "/blobs/sha256:"), 1);
    assert_eq!(s.relay.count("HEAD", &digest), 1);
    assert_eq!(s.relay.count("", &digest), 2);
    assert_eq!(s.relay.body_bytes(), data.len() as u64);
    let reqs = s.relay.requests();
    assert_eq!(reqs.len(), 2);
    let get = &reqs[1];
    assert_eq!((get.method.as_str(), get.path.as_str()), ("GET", path.as_str()));
    assert_eq!(get.range.as_deref(), Some("bytes=0-"));
    assert!(!get.authorization);
    assert_eq!(get.body_bytes, data.len() as u64);
    assert!(get.complete && !get.aborted, "{get:?}");
    assert!(reqs[0].complete && !reqs[0].aborted, "HEAD: {:?}", reqs[0]);

    // A missing blob is relayed as the target's 404.
    let missing =
        s.c.get(s.relay.url(&format!("/v2/self/count/blobs/{}", digest_of(b"nope"))))
            .send()
            .await
            .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn throttle_limits_bytes_per_window_and_lifts() {
    let s = setup();
    let data = blob(4 << 20, 2);
    let digest = push_blob(&s.c, &s.base, "self/throttle", &data).await;
    s.relay.reset();
    let rate = 1 << 20; // 1 MiB/s
    s.relay.throttle_on("/blobs/sha256:", rate);

    let mut resp =
        s.c.get(s.relay.url(&format!("/v2/self/throttle/blobs/{digest}")))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    let window = Duration::from_millis(400);
    let start = Instant::now();
    while start.elapsed() < window {
        match tokio::time::timeout(window.saturating_sub(start.elapsed()), resp.chunk()).await {
            Ok(chunk) => got.extend_from_slice(&chunk.unwrap().unwrap()),
            Err(_) => break,
        }
    }
    // 400 ms at 1 MiB/s is ~420 kB; allow one slice of burst, but far below 4 MiB. Only the upper bound is
    // asserted: a busy machine can only deliver less, and the throttle's job is to cap.
    let limit = (rate as f64 * 0.4) as usize + 150_000;
    assert!(got.len() < limit, "got {} bytes in the window", got.len());
    assert!(s.relay.body_bytes() < limit as u64);

    // Lifting the throttle speeds up the body already streaming.
    s.relay.throttle(0);
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(digest_of(&got), digest);
    assert_eq!(s.relay.body_bytes(), data.len() as u64);
}

#[tokio::test]
async fn cut_aborts_after_exactly_k_bytes_once() {
    let s = setup();
    let data = blob(2 << 20, 3);
    let digest = push_blob(&s.c, &s.base, "self/cut", &data).await;
    let url = s.relay.url(&format!("/v2/self/cut/blobs/{digest}"));
    for k in [0u64, 1000, 1 << 20] {
        s.relay.reset();
        s.relay.cut_after("GET /v2/self/cut/blobs/", k, 1);
        // HEAD does not consume the cut.
        assert_eq!(s.c.head(&url).send().await.unwrap().status(), 200);
        let mut resp = s.c.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.content_length(),
            Some(data.len() as u64),
            "Content-Length is sent before the cut"
        );
        // A slow reader still gets exactly k bytes: the relay waits for them to drain before aborting.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        let err = loop {
            match resp.chunk().await {
                Ok(Some(c)) => got.extend_from_slice(&c),
                Ok(None) => panic!("body ended cleanly after {} bytes", got.len()),
                Err(e) => break e,
            }
        };
        assert_eq!(
            got.len() as u64,
            k,
            "client saw exactly k bytes before the error ({err})"
        );
        assert_eq!(&got[..], &data[..k as usize]);
        let rec = s.relay.requests().into_iter().find(|r| r.method == "GET").unwrap();
        assert_eq!(rec.body_bytes, k);
        assert!(rec.aborted && !rec.complete, "{rec:?}");

        // Only once: the next GET is whole.
        let whole = s.c.get(&url).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(digest_of(&whole), digest);
    }

    // A ranged resume after a cut works through the relay (what the blob flight will do).
    s.relay.cut_after("/blobs/", 5000, 1);
    let first = s.c.get(&url).send().await.unwrap().bytes().await;
    assert!(first.is_err());
    let rest = s.c.get(&url).header("range", "bytes=5000-").send().await.unwrap();
    assert_eq!(rest.status(), 206);
    assert_eq!(&rest.bytes().await.unwrap()[..], &data[5000..]);
    assert_eq!(s.relay.requests().last().unwrap().range.as_deref(), Some("bytes=5000-"));
}

#[tokio::test]
async fn stall_keeps_the_connection_open_without_bytes() {
    let s = setup();
    let data = blob(200_000, 4);
    let digest = push_blob(&s.c, &s.base, "self/stall", &data).await;
    s.relay.stall_after("/blobs/sha256:", 500, 1);
    let mut resp =
        s.c.get(s.relay.url(&format!("/v2/self/stall/blobs/{digest}")))
            .send()
            .await
            .unwrap();
    let mut got = Vec::new();
    while let Ok(c) = tokio::time::timeout(Duration::from_millis(300), resp.chunk()).await {
        got.extend_from_slice(&c.unwrap().expect("no end of body"));
    }
    assert_eq!(got.len(), 500);
    drop(resp);
    let whole =
        s.c.get(s.relay.url(&format!("/v2/self/stall/blobs/{digest}")))
            .send()
            .await
            .unwrap();
    assert_eq!(digest_of(&whole.bytes().await.unwrap()), digest);
}

#[tokio::test]
async fn corrupt_flips_one_byte_once() {
    let s = setup();
    let data = blob(500_000, 5);
    let digest = push_blob(&s.c, &s.base, "self/corrupt", &data).await;
    let url = s.relay.url(&format!("/v2/self/corrupt/blobs/{digest}"));
    s.relay.corrupt("/blobs/sha256:", 300_001, 1);
    let got = s.c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), data.len());
    assert_ne!(digest_of(&got), digest);
    let diffs: Vec<usize> = (0..data.len()).filter(|&i| got[i] != data[i]).collect();
    assert_eq!(diffs, vec![300_001]);
    let again = s.c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&again), digest);
}

#[tokio::test]
async fn fail_answers_429_with_retry_after_without_the_target() {
    let s = setup();
    let data = blob(1000, 6);
    let digest = push_blob(&s.c, &s.base, "self/fail", &data).await;
    let url = s.relay.url(&format!("/v2/self/fail/blobs/{digest}"));
    s.relay.fail("/blobs/sha256:", 429, Some("1"), 2);
    s.relay.fail("/manifests/", 503, None, 1);
    for _ in 0..2 {
        let r = s.c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
    }
    assert_eq!(s.c.get(&url).send().await.unwrap().status(), 200);
    let r =
        s.c.get(s.relay.url("/v2/self/fail/manifests/latest"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_none());
    // The target's own answer again: the manifest does not exist.
    assert_eq!(
        s.c.get(s.relay.url("/v2/self/fail/manifests/latest"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let statuses: Vec<u16> = s
        .relay
        .requests()
        .iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![429, 429, 200, 503, 404]);
}

#[tokio::test]
async fn delay_hang_and_down() {
    let s = setup();
    let data = blob(1000, 7);
    let digest = push_blob(&s.c, &s.base, "self/hang", &data).await;
    let url = s.relay.url(&format!("/v2/self/hang/blobs/{digest}"));

    s.relay.delay(Duration::from_millis(200));
    let t = Instant::now();
    assert_eq!(s.c.get(&url).send().await.unwrap().status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(200));
    s.relay.delay(Duration::ZERO);

    s.relay.reset();
    s.relay.hang_on("/blobs/sha256:");
    let pending = tokio::spawn({
        let c = s.c.clone();
        let url = url.clone();
        async move { c.get(&url).send().await.map(|r| r.status()) }
    });
    assert!(
        s.relay
            .wait_for_async("GET", "/blobs/sha256:", 1, Duration::from_secs(5))
            .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "a hung request must not be answered");
    assert_eq!(s.relay.requests()[0].status, 0);
    // Other paths are not hung.
    assert_eq!(s.c.get(s.relay.url("/v2/")).send().await.unwrap().status(), 200);
    s.relay.hang(false);
    let status = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);

    // Down: connections (new and pooled) fail; up again: they work.
    s.relay.down(true);
    assert!(s.c.get(&url).send().await.is_err());
    assert!(client().get(&url).send().await.is_err());
    s.relay.down(false);
    assert_eq!(s.c.get(&url).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn bearer_flow_401_token_200_and_expiry() {
    let s = setup();
    let data = blob(1000, 8);
    let digest = push_blob(&s.c, &s.base, "self/bearer", &data).await;
    let tokens = TokenServer::start("alice", "s3cret", Duration::from_millis(600));
    s.relay.require_bearer(&tokens);
    let url = s.relay.url(&format!("/v2/self/bearer/blobs/{digest}"));

    let r = s.c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"{}\",service=\"relay\",scope=\"repository:self/bearer:pull\"",
            tokens.realm()
        )
    );
    let token_url = format!("{}?service=relay&scope=repository:self/bearer:pull", tokens.realm());
    assert_eq!(
        s.c.get(&token_url)
            .basic_auth("alice", Some("wrong"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(s.c.get(&token_url).send().await.unwrap().status(), 401);
    assert_eq!(tokens.denied(), 2);
    let r =
        s.c.get(&token_url)
            .basic_auth("alice", Some("s3cret"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["access_token"], body["token"]);
    assert_eq!(body["expires_in"], 1);
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(tokens.issued(), 1);
    assert_eq!(
        tokens.requests()[2].scopes,
        vec!["repository:self/bearer:pull".to_string()]
    );
    assert!(tokens.validate(&token, "self/bearer"));
    assert!(!tokens.validate(&token, "self/other"));

    let r = s.c.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r.bytes().await.unwrap()), digest);
    assert!(s.relay.requests().last().unwrap().authorization);
    // Wrong scope, and pushes need `push`.
    let other =
        s.c.get(s.relay.url(&format!("/v2/self/other/blobs/{digest}")))
            .bearer_auth(&token)
            .send()
            .await;
    assert_eq!(other.unwrap().status(), 401);
    let post =
        s.c.post(s.relay.url("/v2/self/bearer/blobs/uploads/"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    assert_eq!(post.status(), 401);
    assert!(post.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("scope=\"repository:self/bearer:pull,push\""));
    // `/v2/` takes any live token, and its challenge has no scope.
    let base = s.c.get(s.relay.url("/v2/")).send().await.unwrap();
    assert_eq!(
        base.headers()["www-authenticate"],
        format!("Bearer realm=\"{}\",service=\"relay\"", tokens.realm())
    );
    assert_eq!(
        s.c.get(s.relay.url("/v2/"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Expiry, and revocation.
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert_eq!(s.c.get(&url).bearer_auth(&token).send().await.unwrap().status(), 401);
    let anon = TokenServer::anonymous(Duration::from_secs(60));
    s.relay.require_bearer(&anon);
    let r =
        s.c.get(format!(
            "{}?service=relay&scope=repository:self/bearer:pull",
            anon.realm()
        ))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(s.c.get(&url).bearer_auth(&token).send().await.unwrap().status(), 200);
    anon.revoke_all();
    assert_eq!(s.c.get(&url).bearer_auth(&token).send().await.unwrap().status(), 401);
}

#[tokio::test]
async fn basic_auth() {
    let s = setup();
    s.relay.require_basic("bob", "hunter2");
    let r = s.c.get(s.relay.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"relay\"");
    assert_eq!(
        s.c.get(s.relay.url("/v2/"))
            .basic_auth("bob", Some("nope"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        s.c.get(s.relay.url("/v2/"))
            .basic_auth("bob", Some("hunter2"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let data = blob(1000, 9);
    let digest = digest_of(&data);
    // Uploads work with credentials too (POST + PUT through the relay).
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers({
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(
                "authorization",
                format!("Basic {}", common::auth::base64(b"bob:hunter2"))
                    .parse()
                    .unwrap(),
            );
            h
        })
        .build()
        .unwrap();
    assert_eq!(
        push_blob(&c, &format!("http://{}", s.relay.addr), "self/basic", &data).await,
        digest
    );
    s.relay.no_auth();
    assert_eq!(
        s.c.get(s.relay.url(&format!("/v2/self/basic/blobs/{digest}")))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn blob_redirect_to_cdn_drops_credentials() {
    let dist = Distribution::start();
    let origin = Relay::start(&dist.addr);
    let cdn = Relay::start(&dist.addr);
    let c = client();
    let data = blob(5000, 10);
    let digest = push_blob(&c, &format!("http://{}", origin.addr), "self/cdn", &data).await;
    origin.require_basic("u", "p");
    origin.redirect_blobs_to(&cdn.addr);
    let path = format!("/v2/self/cdn/blobs/{digest}");

    let r = c
        .get(origin.url(&path))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], cdn.url(&path));
    // Unauthenticated: 401 before any redirect.
    assert_eq!(c.get(origin.url(&path)).send().await.unwrap().status(), 401);

    // A client following redirects must not send the origin's credentials to the CDN host.
    let following = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = following
        .get(origin.url(&path))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r.bytes().await.unwrap()), digest);
    assert_eq!(cdn.count("GET", &digest), 1);
    assert!(!cdn.requests()[0].authorization);
    assert!(origin
        .requests()
        .iter()
        .filter(|r| r.status == 307)
        .all(|r| r.authorization));
    // HEAD is not redirected.
    assert_eq!(
        c.head(origin.url(&path))
            .basic_auth("u", Some("p"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// The relay needs no runtime from its caller: a plain `#[test]` with a raw HTTP/1.0 request.
#[test]
fn works_from_a_sync_test() {
    let dist = Distribution::start();
    let relay = Relay::start(&dist.addr);
    let mut stream = std::net::TcpStream::connect(&relay.addr).unwrap();
    stream.write_all(b"GET /v2/ HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    assert_eq!(relay.count("GET", "/v2/"), 1);
    assert!(relay.wait_for("GET", "/v2/", 1, Duration::from_secs(1)));
    let addr = relay.addr.clone();
    drop(relay);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "a dropped relay no longer listens"
    );
}

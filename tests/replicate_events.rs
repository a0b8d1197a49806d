//! Event-driven replication: a real `docker-registry` whose notifications (`notifications.endpoints`) go to
//! `POST /api/replication/NAME/events`; its pushes and deletes reach the destination without a catalog walk or a
//! tag listing (the source is behind a counting `Relay`). Also Harbor's webhook payload, the policy's secret
//! (wrong, missing), malformed bodies, unmatched repositories, and the endpoint under access control.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::oci::push_image;
use common::relay::Relay;
use common::auth::{basic, htpasswd};
use common::{Breakwater, Distribution};
use serde_json::{json, Value};

const SECRET: &str = "events-secret-4c1d9e";
const ENVELOPE: &str = "application/vnd.docker.distribution.events.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn post(url: &str, authorization: Option<&str>, content_type: &str, body: String) -> (u16, Value) {
    let mut r = reqwest::Client::new().post(url).header("content-type", content_type).body(body);
    if let Some(a) = authorization {
        r = r.header("authorization", a);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text)))
}

/// The digest breakwater serves for `repo:reference`, or `None` while it has none.
async fn digest_at(bw: &Breakwater, repo: &str, reference: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .get(bw.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    r.status().is_success().then(|| r.headers()["docker-content-digest"].to_str().unwrap().to_string())
}

/// Polls until `repo:reference` at breakwater is `want` (a digest, or `None`: gone), for at most 30 s.
async fn wait_for(bw: &Breakwater, repo: &str, reference: &str, want: Option<&str>) {
    for _ in 0..600 {
        if digest_at(bw, repo, reference).await.as_deref() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{repo}:{reference} at breakwater never became {want:?} (it is {:?})", digest_at(bw, repo, reference).await);
}

async fn events(bw: &Breakwater, policy: &str) -> Value {
    let r = reqwest::get(bw.url(&format!("/api/replication/{policy}"))).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    v["events"].clone()
}

/// distribution's envelope for one manifest pushed by tag, as the test writes it (the real one has more fields).
fn push_envelope(repo: &str, tag: &str, digest: &str) -> String {
    json!({"events": [{
        "id": "e1", "timestamp": "2026-12-03T14:00:00Z", "action": "push",
        "target": {"mediaType": OCI_MANIFEST, "digest": digest, "size": 1, "repository": repo, "url": "http://x", "tag": tag},
        "request": {"id": "r1", "method": "PUT"}, "actor": {}, "source": {"addr": "x"}
    }]})
    .to_string()
}

/// A `[[replication]]` table copying `include` from `from` into this breakwater, with `extra` lines.
fn policy(name: &str, from: &str, include: &str, extra: &str) -> String {
    format!("[[replication]]\nname = \"{name}\"\nfrom = \"{from}\"\nto = \"local\"\ninclude = [\"{include}\"]\n{extra}\n\n")
}

fn config(dir: &Path, text: &str) -> String {
    let path = dir.join("bw.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifying_source_is_replicated_without_a_walk() {
    // The cycle (the source must know breakwater's port, breakwater the source's) is cut by the relay: it starts
    // in front of nothing and is pointed at the source once that runs.
    let relay = Relay::start("127.0.0.1:9");
    let from = relay.url("");
    let dir = tempfile::tempdir().unwrap();
    let text = [
        policy("mirror", &from, "team/**", &format!("rewrite = [\"team/=copy/\"]\nevents_secret = \"{SECRET}\"")),
        policy("harbor", &from, "team/**", "rewrite = [\"team/=harbor/\"]"),
        policy("elsewhere", &from, "elsewhere/**", "rewrite = [\"team/=nomatch/\"]"),
        policy("newest", &from, "team/**", "rewrite = [\"team/=newest/\"]\nlatest = 1"),
    ];
    let cfg = config(dir.path(), &text.concat());
    let bw = Breakwater::start_with(&["--config", &cfg]);
    let source = Distribution::start_notifying(&bw.url("/api/replication/mirror/events"), &format!("Bearer {SECRET}"));
    relay.retarget(&source.addr);
    let src = source.url("");

    // A push to the source is copied (rewritten) by the notification alone.
    let image = push_image(&src, "team/app", "v1", &[3_000, 70_000], 11).await;
    wait_for(&bw, "copy/app", "v1", Some(&image.digest)).await;
    let pulled = reqwest::get(bw.url(&format!("/v2/copy/app/blobs/{}", image.layer_digests[1]))).await.unwrap().bytes().await.unwrap();
    assert_eq!(pulled.as_ref(), image.layers[1].as_slice(), "the layer's bytes");
    let e = events(&bw, "mirror").await;
    assert_eq!(e["copied"], 1, "{e}");
    assert_eq!(e["failed"], 0, "{e}");
    // distribution also announced the blob pushes (and breakwater's pulls): counted, ignored.
    assert!(e["ignored"].as_u64().unwrap() >= 2, "{e}");

    // Harbor's webhook, posted as Harbor would, to a policy without a secret (access control is off).
    let hook = json!({
        "type": "PUSH_ARTIFACT", "occur_at": 1764770400, "operator": "admin",
        "event_data": {
            "resources": [{"digest": image.digest, "tag": "v1", "resource_url": format!("{}/team/app:v1", source.addr)}],
            "repository": {"date_created": 1764770000, "name": "app", "namespace": "team", "repo_full_name": "team/app", "repo_type": "private"}
        }
    });
    let (status, body) = post(&bw.url("/api/replication/harbor/events"), None, "application/json", hook.to_string()).await;
    assert_eq!((status, &body), (202, &json!({"accepted": 1, "ignored": 0})));
    wait_for(&bw, "harbor/app", "v1", Some(&image.digest)).await;

    // A policy whose repositories do not include the event's: nothing to do, said so, nothing copied.
    let (status, body) = post(&bw.url("/api/replication/elsewhere/events"), None, ENVELOPE, push_envelope("team/app", "v1", &image.digest)).await;
    assert_eq!((status, &body), (202, &json!({"accepted": 0, "ignored": 1})));
    assert_eq!(events(&bw, "elsewhere").await["queued"], 0);
    assert_eq!(digest_at(&bw, "nomatch/app", "v1").await, None);

    // The policy's secret: wrong or missing is refused, and nothing is taken in.
    let before = events(&bw, "mirror").await["received"].clone();
    let (status, body) = post(&bw.url("/api/replication/mirror/events"), Some("Bearer not-the-secret"), ENVELOPE, push_envelope("team/app", "v2", &image.digest)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "{body}");
    assert_eq!(post(&bw.url("/api/replication/mirror/events"), None, ENVELOPE, push_envelope("team/app", "v2", &image.digest)).await.0, 401);
    assert_eq!(events(&bw, "mirror").await["received"], before, "a refused notification is not counted");
    // Malformed bodies (with the secret) are 400 with a JSON error; an unknown policy is 404.
    let auth = format!("Bearer {SECRET}");
    for bad in ["{not json", r#"{"events": 3}"#, r#"{"hello": "world"}"#] {
        let (status, body) = post(&bw.url("/api/replication/mirror/events"), Some(&auth), ENVELOPE, bad.to_string()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{bad}: {body}");
    }
    assert_eq!(post(&bw.url("/api/replication/nope/events"), None, ENVELOPE, push_envelope("a", "b", &image.digest)).await.0, 404);

    // A delete at the source (by digest, as distribution 2.8 deletes) deletes the copy.
    let r = reqwest::Client::new().delete(source.url(&format!("/v2/team/app/manifests/{}", image.digest))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    wait_for(&bw, "copy/app", &image.digest, None).await;
    assert_eq!(digest_at(&bw, "copy/app", "v1").await, None, "the tag went with its manifest");
    assert_eq!(digest_at(&bw, "harbor/app", "v1").await.as_deref(), Some(image.digest.as_str()), "other policies' copies stay");
    let e = events(&bw, "mirror").await;
    assert!(e["deleted"].as_u64().unwrap() >= 1 && e["delete_failed"] == 0, "{e}");

    // None of it walked the source: no catalog, no tag listing.
    assert_eq!(relay.count("GET", "/v2/_catalog"), 0, "{:?}", relay.requests());
    assert_eq!(relay.count("GET", "/tags/list"), 0, "{:?}", relay.requests());
    assert!(relay.count("GET", "/manifests/v1") >= 2, "the copies read the source through the relay: {:?}", relay.requests());

    // With `latest`, an event copies what a walk would for its repository: the latest tags, which takes a listing
    // (of that repository alone).
    let v3 = push_image(&src, "team/app", "v3", &[1_000], 12).await;
    let v2 = push_image(&src, "team/app", "v2", &[1_000], 13).await;
    wait_for(&bw, "copy/app", "v2", Some(&v2.digest)).await;
    let (status, body) = post(&bw.url("/api/replication/newest/events"), None, ENVELOPE, push_envelope("team/app", "v2", &v2.digest)).await;
    assert_eq!((status, &body), (202, &json!({"accepted": 1, "ignored": 0})));
    wait_for(&bw, "newest/app", "v3", Some(&v3.digest)).await;
    assert_eq!(digest_at(&bw, "newest/app", "v2").await, None, "v2 is not among the latest 1");
    assert_eq!(relay.count("GET", "/v2/team/app/tags/list"), 1, "{:?}", relay.requests());
    assert_eq!(relay.count("GET", "/v2/_catalog"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_access_control_an_admin_or_the_policy_secret_may_send_events() {
    let dir = tempfile::tempdir().unwrap();
    let users = htpasswd(dir.path(), &[("root", "root-pw-1"), ("alice", "alice-pw-2")]);
    let users = users.display();
    let text = [
        format!("[auth]\nhtpasswd = \"{users}\"\nadmins = [\"root\"]\n\n"),
        policy("with-secret", "http://127.0.0.1:9", "team/**", &format!("events_secret = \"{SECRET}\"")),
        policy("admins-only", "http://127.0.0.1:9", "team/**", ""),
    ];
    let cfg = config(dir.path(), &text.concat());
    let bw = Breakwater::start_with(&["--config", &cfg, "--auth", "basic"]);
    // Events of a repository the policies do not copy: accepted as nothing to do, so only who may send counts.
    let body = || push_envelope("other/app", "v1", "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    let url = |p: &str| bw.url(&format!("/api/replication/{p}/events"));
    let (root, alice, secret) = (basic("root", "root-pw-1"), basic("alice", "alice-pw-2"), format!("Bearer {SECRET}"));
    let nothing = json!({"accepted": 0, "ignored": 1});

    for (who, auth, want) in [
        ("the secret", Some(secret.as_str()), 202),
        ("an admin", Some(root.as_str()), 202),
        ("no credentials", None, 401),
        ("a wrong secret", Some("Bearer nope"), 401),
        ("a user who is not an admin", Some(alice.as_str()), 403),
    ] {
        let (status, answer) = post(&url("with-secret"), auth, ENVELOPE, body()).await;
        assert_eq!(status, want, "with-secret, {who}: {answer}");
        if want == 202 {
            assert_eq!(answer, nothing, "{who}");
        }
    }
    // A notification that does not fit in the policy's queue is refused whole, with Retry-After, so the sender
    // retries it. (One envelope over the queue's 1024 events: whatever the worker did meanwhile.)
    let many: Vec<Value> = (0..1025).map(|i| json!({"action": "push", "target": {"repository": "team/app", "tag": format!("t{i}")}})).collect();
    let r = reqwest::Client::new()
        .post(url("with-secret"))
        .header("authorization", &secret)
        .header("content-type", ENVELOPE)
        .body(json!({ "events": many }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some(), "{:?}", r.headers());
    let answer: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("full")), "{answer}");
    // Without a secret, only an admin.
    assert_eq!(post(&url("admins-only"), Some(&root), ENVELOPE, body()).await.0, 202);
    assert_eq!(post(&url("admins-only"), Some(&secret), ENVELOPE, body()).await.0, 401, "another policy's secret");
    assert_eq!(post(&url("admins-only"), Some(&alice), ENVELOPE, body()).await.0, 403);
    // The secret opens the events path only: not the policy's status or runs.
    let r = reqwest::Client::new().get(bw.url("/api/replication/with-secret")).header("authorization", &secret).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = reqwest::Client::new().get(bw.url("/api/replication/with-secret")).header("authorization", &root).send().await.unwrap();
    let status: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(status["events"]["received"], 2 + 1025, "{status}");
    assert_eq!(status["events"]["accepted"], 0, "{status}");
    assert_eq!(status["events"]["refused"], 1025, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_event_worker_mid_copy_and_drops_the_queue() {
    // A source that never answers: the worker's first copy hangs on it.
    let relay = Relay::start("127.0.0.1:9");
    relay.hang(true);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &policy("mirror", &relay.url(""), "team/**", ""));
    let log = dir.path().join("bw.log");
    let bw = Breakwater::start_logged(&["--config", &cfg], "breakwater=info", &log);
    let url = bw.url("/api/replication/mirror/events");
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    assert_eq!(post(&url, None, ENVELOPE, push_envelope("team/app", "v1", digest)).await.0, 202);
    assert!(relay.wait_for_async("", "/v2/team/app/manifests/v1", 1, Duration::from_secs(20)).await, "the worker asks the source");
    assert_eq!(post(&url, None, ENVELOPE, push_envelope("team/app", "v2", digest)).await.0, 202);
    assert_eq!(events(&bw, "mirror").await["queued"], 1, "v2 waits behind v1");

    let ok = Command::new("kill").args(["-TERM", &bw.pid().to_string()]).status().unwrap();
    assert!(ok.success());
    let data = bw.stop_after_exit();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("abandoned"), "the worker stopped at the signal, not after the grace period:\n{logged}");

    // The copy cut short is no failure (the next walk copies both tags anyway).
    let bw = Breakwater::start_in(data, &["--config", &cfg]);
    let r = reqwest::get(bw.url("/api/replication/mirror")).await.unwrap();
    let status: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(status["failure_count"], 0, "{status}");
    assert_eq!(status["events"]["received"], 0, "counters start again with the server: {status}");
}

//! Cluster membership (issue 13, item 1): real members (the binary) on one real PostgreSQL database and one
//! real S3 server (s3s-fs). Members register and beat, list each other through `/api/cluster`, leave at once on
//! SIGTERM, turn not alive when killed, share what is stored, and answer `/internal/` only to signed requests.

mod common;

use std::time::{Duration, Instant};

use common::oci::{get, pseudo_random, push_blob, sha256};
use common::pg::PgDatabase;
use common::s3::S3Server;
use common::Breakwater;

const SECRET: &str = "a-cluster-secret-for-the-tests";

/// A member of the cluster on `pg` and `s3` beating every second, with `extra` flags.
fn member(pg: &PgDatabase, s3: &S3Server, log: &std::path::Path, extra: &[&str]) -> Breakwater {
    let url = s3.url("cluster");
    let mut args = vec!["--metadata", pg.url.as_str(), "--storage", url.as_str(), "--cluster-secret", SECRET];
    args.extend_from_slice(extra);
    let config = log.with_extension("toml");
    std::fs::write(&config, "[cluster]\nheartbeat_secs = 1\n").unwrap();
    args.extend_from_slice(&["--config", config.to_str().unwrap()]);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Breakwater::start_env_in(tempfile::tempdir().unwrap(), &args, &env, log)
}

/// `/api/cluster` of `bw`: its id and the members as JSON objects.
async fn view(bw: &Breakwater) -> (String, Vec<serde_json::Value>) {
    let (status, body) = get(&bw.url("/api/cluster")).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (v["id"].as_str().unwrap().to_string(), v["members"].as_array().unwrap().clone())
}

/// Waits (at most 30 s, a hang guard, not a measure) until `cond` holds of `bw`'s view.
async fn wait_for(bw: &Breakwater, what: &str, cond: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, members) = view(bw).await;
        if cond(&members) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {members:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn alive(m: &serde_json::Value) -> bool {
    m["alive"].as_bool().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_register_see_each_other_leave_and_share_their_stores() {
    let pg = PgDatabase::create().await;
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let a = member(&pg, &s3, &tmp.path().join("a.log"), &["--advertise", "http://member-a.internal:5000/"]);
    let b = member(&pg, &s3, &tmp.path().join("b.log"), &[]);
    let c = member(&pg, &s3, &tmp.path().join("c.log"), &[]);
    let mut ids = Vec::new();
    for bw in [&a, &b, &c] {
        let (id, members) = view(bw).await;
        assert_eq!(members.len(), 3, "{members:?}");
        assert!(members.iter().all(alive), "{members:?}");
        let this: Vec<_> = members.iter().filter(|m| m["this"].as_bool().unwrap()).collect();
        assert_eq!((this.len(), this[0]["id"].as_str().unwrap()), (1, id.as_str()));
        ids.push(id);
    }
    let (_, members) = view(&b).await;
    let url_of = |id: &str| members.iter().find(|m| m["id"] == id).unwrap()["url"].as_str().unwrap().to_string();
    assert_eq!(url_of(&ids[0]), "http://member-a.internal:5000", "--advertise, without its trailing slash");
    assert_eq!(url_of(&ids[1]), b.url(""), "the listen address by default");

    // One state: a blob pushed through one member is served by another.
    let blob = pseudo_random(300 * 1024, 13);
    let digest = push_blob(&a.url(""), "shared/app", &blob).await;
    let (status, body) = get(&c.url(&format!("/v2/shared/app/blobs/{digest}"))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digest));

    // SIGTERM: the member leaves at once (its row goes); SIGKILL: it stays listed, and turns not alive once its
    // beats stop.
    let status = std::process::Command::new("kill").args(["-TERM", &c.pid().to_string()]).status().unwrap();
    assert!(status.success());
    c.stop_after_exit();
    wait_for(&a, "the stopped member left", |m| m.len() == 2 && !m.iter().any(|m| m["id"] == ids[2].as_str())).await;
    drop(b);
    wait_for(&a, "the killed member turned not alive", |m| {
        m.len() == 2 && m.iter().any(|m| m["id"] == ids[1].as_str() && !alive(m)) && m.iter().any(|m| m["id"] == ids[0].as_str() && alive(m))
    })
    .await;
}

/// `/internal/` answers signed requests of members only: unsigned, signed with another secret, or an old
/// signature get 401; an instance outside any cluster answers 404, there and at `/api/cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_endpoints_answer_signed_member_requests_only() {
    use breakwater::cluster::peer;
    let pg = PgDatabase::create().await;
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let a = member(&pg, &s3, &tmp.path().join("a.log"), &[]);
    let (id, _) = view(&a).await;
    let path = "/internal/cluster/ping";
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let client = reqwest::Client::new();
    let call = |header: Option<String>| {
        let mut r = client.get(a.url(path));
        if let Some(h) = header {
            r = r.header(peer::HEADER, h);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, body) = call(Some(peer::sign(SECRET, "peer-1", "GET", path, now))).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["id"].as_str(), v["peer"].as_str()), (Some(id.as_str()), Some("peer-1")));
    for (header, expected) in [
        (None, "no x-breakwater-member header"),
        (Some(peer::sign("another-secret-entirely", "peer-1", "GET", path, now)), "wrong signature"),
        (Some(peer::sign(SECRET, "peer-1", "GET", path, now - 600)), "too far"),
        (Some(peer::sign(SECRET, "peer-1", "GET", "/internal/other", now)), "wrong signature"),
    ] {
        let (status, body) = call(header).await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains(expected), "{body}");
    }

    let alone = Breakwater::start();
    assert_eq!(get(&alone.url(path)).await.unwrap().0, 404);
    let (status, body) = get(&alone.url("/api/cluster")).await.unwrap();
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("not a cluster member"));
}

/// A cluster secret without shared stores is refused at start-up: members could not share an SQLite file.
#[test]
fn membership_without_shared_stores_is_refused_at_start_up() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["serve", "--listen", "127.0.0.1:0", "--cluster-secret", SECRET, "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a cluster member needs shared metadata: --metadata postgres://"), "{err}");
}

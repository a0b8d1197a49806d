//! The cluster (issue 13): real members (the binary) on one real PostgreSQL database and one real S3 server
//! (s3s-fs). Members register and beat, list each other through `/api/cluster`, leave at once on SIGTERM, turn
//! not alive when killed, share what is stored, and answer `/internal/` only to signed requests. A cold blob
//! pulled through every member at once is fetched from upstream (a real `docker-registry` behind the counting
//! relay) once for the cluster, and once more, with a `Range`, when the member fetching it is killed. Members work
//! the queue of a distributed replication job (issue 13 item 4), and give their unit back at SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::oci::{get, metric, pseudo_random, push_blob, sha256};
use common::pg::PgDatabase;
use common::relay::Relay;
use common::s3::S3Server;
use common::synthetic::{Options, Synthetic};
use common::{Breakwater, Distribution};

const SECRET: &str = "a-cluster-secret-for-the-tests";

/// A member of the cluster on `pg` and `s3` beating every second, with `extra` flags.
fn member(pg: &PgDatabase, s3: &S3Server, log: &std::path::Path, extra: &[&str]) -> Breakwater {
    member_configured(pg, s3, log, extra, "")
}

/// `member`, with `config` after its `[cluster]` table's `heartbeat_secs` (more of that table, then other tables).
fn member_configured(pg: &PgDatabase, s3: &S3Server, log: &std::path::Path, extra: &[&str], config: &str) -> Breakwater {
    let url = s3.url("cluster");
    let mut args = vec!["--metadata", pg.url.as_str(), "--storage", url.as_str(), "--cluster-secret", SECRET];
    args.extend_from_slice(extra);
    let text = format!("[cluster]\nheartbeat_secs = 1\n{config}");
    let config = log.with_extension("toml");
    std::fs::write(&config, text).unwrap();
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

/// `n` concurrent GETs of `path`, spread round-robin over `members`: for each, the member's index and the sha256
/// of the whole body (or why it failed).
fn herd(members: &[&Breakwater], path: &str, n: usize) -> Vec<tokio::task::JoinHandle<(usize, Result<String, String>)>> {
    (0..n)
        .map(|i| {
            let m = i % members.len();
            let url = members[m].url(path);
            tokio::spawn(async move {
                let got = match get(&url).await {
                    Ok((200, body)) => Ok(sha256(&body)),
                    Ok((status, body)) => Err(format!("{status}: {}", String::from_utf8_lossy(&body))),
                    Err(e) => Err(e),
                };
                (m, got)
            })
        })
        .collect()
}

/// The cluster's blob downloads as `bw`'s `/api/cluster` shows them: (digest, member id).
async fn flights(bw: &Breakwater) -> Vec<(String, String)> {
    let (_, body) = get(&bw.url("/api/cluster")).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["flights"].as_array().unwrap().iter().map(|f| (f["digest"].as_str().unwrap().into(), f["member"].as_str().unwrap().into())).collect()
}

/// Three members caching `up` = a real registry behind a relay.
struct CachingCluster {
    /// First, so that the members stop before the stores they use go (fields drop in order).
    members: Vec<Breakwater>,
    relay: Relay,
    _upstream: Distribution,
    _tmp: tempfile::TempDir,
    _s3: S3Server,
    _pg: PgDatabase,
}

impl CachingCluster {
    async fn start() -> CachingCluster {
        let pg = PgDatabase::create().await;
        let s3 = S3Server::start();
        let tmp = tempfile::tempdir().unwrap();
        let upstream = Distribution::start();
        let relay = Relay::start(&upstream.addr);
        let spec = format!("up=http://{}", relay.addr);
        let members =
            ["a", "b", "c"].iter().map(|m| member(&pg, &s3, &tmp.path().join(format!("{m}.log")), &["--upstream", &spec])).collect();
        CachingCluster { members, relay, _upstream: upstream, _tmp: tmp, _s3: s3, _pg: pg }
    }

    /// Pushes a blob of `len` bytes to the upstream as `lib/app`; its digest.
    async fn upstream_blob(&self, len: usize, seed: u64) -> String {
        push_blob(&format!("http://{}", self.relay.addr), "lib/app", &pseudo_random(len, seed)).await
    }
}

/// A herd of 60 clients spread over three members pulls one cold blob: one upstream GET for the cluster, every
/// client gets the verified bytes, `/api/cluster` names the one member fetching while it runs and nothing after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_blob_pulled_through_every_member_is_fetched_once_for_the_cluster() {
    let c = CachingCluster::start().await;
    let digest = c.upstream_blob(12 * 1024 * 1024, 31).await;
    c.relay.reset();
    // Slow enough that the herd arrives while the download runs: 12 MB at 8 MB/s.
    c.relay.throttle_on("/blobs/", 8 * 1024 * 1024);
    let members: Vec<&Breakwater> = c.members.iter().collect();
    let clients = herd(&members, &format!("/v2/up/lib/app/blobs/{digest}"), 60);

    let deadline = Instant::now() + Duration::from_secs(30);
    let owner = loop {
        let f = flights(&c.members[1]).await;
        if let Some((d, member)) = f.first() {
            assert_eq!((f.len(), d.as_str()), (1, digest.as_str()), "{f:?}");
            break member.clone();
        }
        assert!(Instant::now() < deadline, "no flight showed in /api/cluster");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ids: Vec<String> = futures_util::future::join_all(c.members.iter().map(view)).await.into_iter().map(|(id, _)| id).collect();
    assert!(ids.contains(&owner), "the flight's member {owner} is one of {ids:?}");

    for client in clients {
        let (m, got) = client.await.unwrap();
        assert_eq!(got.as_deref(), Ok(digest.as_str()), "client of member {m}");
    }
    assert_eq!(c.relay.count("GET", "/blobs/"), 1, "one upstream download for the cluster: {:?}", c.relay.requests());
    let (mut led, mut followed) = (0.0, 0.0);
    for bw in &c.members {
        led += metric(&bw.url(""), "breakwater_cluster_flight_attempts_total", &["role=\"led\""]).await;
        followed += metric(&bw.url(""), "breakwater_cluster_flight_attempts_total", &["role=\"followed\""]).await;
    }
    assert_eq!((led, followed), (1.0, 2.0), "one member led, the two others followed it");
    // Each member served from what it spooled itself; the blob is stored once, and later pulls anywhere are hits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !flights(&c.members[0]).await.is_empty() {
        assert!(Instant::now() < deadline, "the finished flight's lease was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for bw in &c.members {
        let (status, body) = get(&bw.url(&format!("/v2/up/lib/app/blobs/{digest}"))).await.unwrap();
        assert_eq!((status, sha256(&body)), (200, digest.clone()));
    }
    assert_eq!(c.relay.count("GET", "/blobs/"), 1, "{:?}", c.relay.requests());
}

/// The member fetching a blob for the cluster is killed (SIGKILL) mid-download: every client of the other two
/// members still gets the verified blob; upstream saw two GETs, the second a `Range` from where the first stopped
/// being relayed, not a new download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetching_member_killed_mid_flight_is_taken_over_with_a_range() {
    let mut c = CachingCluster::start().await;
    let len = 12 * 1024 * 1024;
    let digest = c.upstream_blob(len, 32).await;
    c.relay.reset();
    // 12 MB at 2 MB/s: about 6 s, killed after about 3 MB.
    c.relay.throttle_on("/blobs/", 2 * 1024 * 1024);
    let mut ids = Vec::new();
    for bw in &c.members {
        ids.push(view(bw).await.0);
    }
    let members: Vec<&Breakwater> = c.members.iter().collect();
    let clients = herd(&members, &format!("/v2/up/lib/app/blobs/{digest}"), 30);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.relay.body_bytes() < 3 * 1024 * 1024 {
        assert!(Instant::now() < deadline, "the download did not start: {:?}", c.relay.requests());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let owner = flights(&c.members[0]).await.first().map(|(_, m)| m.clone()).expect("a flight in /api/cluster");
    let killed = ids.iter().position(|id| *id == owner).unwrap();
    drop(c.members.remove(killed));

    let mut survivors = 0;
    for client in clients {
        let (m, got) = client.await.unwrap();
        // The killed member's own clients were cut with it.
        if m != killed {
            assert_eq!(got.as_deref(), Ok(digest.as_str()), "client of member {m}");
            survivors += 1;
        }
    }
    assert_eq!(survivors, 20);
    let mut taken_over = 0.0;
    for bw in &c.members {
        taken_over += metric(&bw.url(""), "breakwater_cluster_flight_attempts_total", &["role=\"taken_over\""]).await;
    }
    assert_eq!(taken_over, 1.0, "one surviving member took the download over");
    let gets: Vec<_> = c.relay.requests().into_iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/")).collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None, "{gets:?}");
    let resumed_at: u64 = gets[1].range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.strip_suffix('-')).and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("a Range resumption: {gets:?}"));
    assert!(resumed_at > 0 && resumed_at <= gets[0].body_bytes, "resumed at {resumed_at} of the {} bytes first relayed", gets[0].body_bytes);
}

/// A tag pulled through each of the three members within its TTL costs one upstream request for the cluster,
/// and a tag the upstream does not have, one 404 for the cluster within the negative TTL: what one member
/// learnt from upstream, every member knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_about_tags_hold_for_every_member() {
    let c = CachingCluster::start().await;
    let image = common::oci::push_image(&format!("http://{}", c.relay.addr), "lib/app", "v1", &[1000], 33).await;
    c.relay.reset();
    for bw in &c.members {
        let (status, body) = get(&bw.url("/v2/up/lib/app/manifests/v1")).await.unwrap();
        assert_eq!((status, sha256(&body)), (200, image.digest.clone()));
    }
    let asked: Vec<_> = c.relay.requests().into_iter().filter(|r| r.path.contains("/manifests/")).collect();
    assert_eq!(asked.len(), 1, "one upstream request for the tag: {asked:?}");

    for bw in &c.members {
        let (status, _) = get(&bw.url("/v2/up/lib/app/manifests/nope")).await.unwrap();
        assert_eq!(status, 404);
    }
    assert_eq!(c.relay.count("", "/manifests/nope"), 1, "one upstream 404 for the cluster: {:?}", c.relay.requests());
}

/// Clients of all three members asking for one cold tag at once: one member asks upstream, the others wait for
/// its answer and serve what it cached (one upstream request), for a tag that exists and for one that does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_tag_asked_of_every_member_at_once_is_asked_upstream_once() {
    let c = CachingCluster::start().await;
    let image = common::oci::push_image(&format!("http://{}", c.relay.addr), "lib/app", "v2", &[1000], 34).await;
    c.relay.reset();
    // Upstream answers late, so that every member has its clients waiting before the first answer.
    c.relay.delay_on("/manifests/", Duration::from_millis(800));
    let members: Vec<&Breakwater> = c.members.iter().collect();
    for (tag, expected) in [("v2", Ok(image.digest.clone())), ("missing", Err(404))] {
        let clients = herd(&members, &format!("/v2/up/lib/app/manifests/{tag}"), 30);
        for client in clients {
            let (m, got) = client.await.unwrap();
            match &expected {
                Ok(digest) => assert_eq!(got.as_ref(), Ok(digest), "client of member {m}"),
                Err(_) => assert!(got.as_ref().is_err_and(|e| e.starts_with("404")), "client of member {m}: {got:?}"),
            }
        }
        let asked = c.relay.count("", &format!("/manifests/{tag}"));
        assert_eq!(asked, 1, "{tag}: one upstream request for the cluster: {:?}", c.relay.requests());
    }
}

/// Eviction is the cluster's: a member evicts only in its turn (while another member holds the turn `evict`,
/// nothing goes, however far over budget), and never a digest another member is downloading (its flight's
/// lease), which it skips for the next candidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_evicts_in_its_turn_and_spares_what_another_member_downloads() {
    const LAYER: usize = 128 << 10;
    let pg = PgDatabase::create().await;
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let mut layers = Vec::new();
    for seed in 0..3 {
        layers.push(push_blob(&format!("http://{}", relay.addr), "team/app", &pseudo_random(LAYER, 95 + seed)).await);
    }
    let spec = format!("up=http://{}", relay.addr);
    let budget = LAYER.to_string();
    let bw = member(&pg, &s3, &tmp.path().join("a.log"), &["--upstream", &spec, "--cache-max-bytes", &budget]);
    let pull = |d: &str| {
        let url = bw.url(&format!("/v2/up/team/app/blobs/{d}"));
        let d = d.to_string();
        async move {
            let (status, body) = get(&url).await.unwrap();
            assert_eq!((status, sha256(&body)), (200, d));
        }
    };
    let db = sqlx::AnyPool::connect(&pg.url).await.unwrap();
    let until = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 + 600_000;
    let hold = |name: String| {
        let db = db.clone();
        async move {
            // Over this member's own lease of the name, if its release has not landed yet.
            sqlx::query(
                "INSERT INTO leases (name, holder, expires_at) VALUES ($1, 'another-member', $2) \
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
            )
                .bind(name)
                .bind(until)
                .execute(&db)
                .await
                .unwrap();
        }
    };
    let base = bw.url("");
    let evictions = || common::oci::metric(&base, "breakwater_cache_evictions_total", &[]);

    hold("evict".into()).await;
    pull(&layers[0]).await;
    // As if another member were downloading it again (its bytes had gone from its view).
    hold(format!("blob:{}", layers[0])).await;
    pull(&layers[1]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(evictions().await, 0.0, "evicted out of turn");

    sqlx::query("DELETE FROM leases WHERE name = 'evict'").execute(&db).await.unwrap();
    pull(&layers[2]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while evictions().await < 1.0 {
        assert!(Instant::now() < deadline, "no eviction in this member's turn");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // layers[0], the oldest, is downloading elsewhere: it stayed, and layers[1] went instead.
    relay.reset();
    pull(&layers[0]).await;
    assert_eq!(relay.count("GET", &layers[0]), 0, "the digest another member downloads was evicted");
    pull(&layers[1]).await;
    assert_eq!(relay.count("GET", &layers[1]), 1, "the next candidate was evicted");
}

/// Issue 13 item 4: `serve` members work the queue of a job that `replicate --distributed` enqueued, when their
/// policies name the job. Two members claim units (the units name who finished them) and every tag is pushed
/// once; a member with `[cluster] replication_work = false` claims none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_members_work_a_distributed_job_and_one_told_not_to_claims_nothing() {
    const N: u64 = 48;
    let pg = PgDatabase::create().await;
    let s3 = S3Server::start();
    let src = Synthetic::start_with(Options { count: N, namespaces: 24, unique_images: true, layer_size: 128 });
    // Slow enough that the starter cannot finish every unit before the members poll the queue.
    src.delay_on("GET /v2/", Duration::from_millis(40));
    let tmp = tempfile::tempdir().unwrap();
    let dst = Breakwater::start_logged(&[], "warn", &tmp.path().join("dst.log"));
    let relay = Relay::start(&dst.addr);
    let policy = format!(
        "[[replication]]\nname = \"M\"\nfrom = \"http://{}\"\nto = \"http://{}\"\nwalkers = 2\nconcurrency = 1\npage_size = 10\n",
        src.addr, relay.addr
    );
    let a = member_configured(&pg, &s3, &tmp.path().join("a.log"), &[], &policy);
    let b = member_configured(&pg, &s3, &tmp.path().join("b.log"), &[], &policy);
    let idle = member_configured(&pg, &s3, &tmp.path().join("c.log"), &[], &format!("replication_work = false\n{policy}"));
    wait_for(&a, "three members", |m| m.len() == 3).await;
    let mut ids = Vec::new();
    for bw in [&a, &b, &idle] {
        ids.push(view(bw).await.0);
    }

    let starter = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["replicate", "--distributed", "--metadata", &pg.url, "--job", "M", "--walkers", "2", "--concurrency", "1"])
        .args(["--page-size", "10", "--from", &format!("http://{}", src.addr), "--to", &format!("http://{}", relay.addr)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&starter.stderr);
    assert!(starter.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&starter.stdout).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}\n{stderr}");

    // 4 units per walker, all done, each naming the worker that finished it.
    let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
    let units: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT state, claimed_by FROM replication_units WHERE job = 'M' ORDER BY unit").fetch_all(&pool).await.unwrap();
    let leases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM leases WHERE name LIKE 'replicate:%'").fetch_one(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(units.len(), 8, "{units:?}");
    assert!(units.iter().all(|(state, by)| state == "done" && by.is_some()), "{units:?}");
    assert_eq!(leases, 0, "every claim's lease released");
    let by = |id: &str| units.iter().filter(|(_, b)| b.as_deref() == Some(id)).count();
    assert!(by(&ids[0]) >= 1 && by(&ids[1]) >= 1, "both working members claimed units: {ids:?} {units:?}");
    assert_eq!(by(&ids[2]), 0, "the member with replication_work = false claimed none: {units:?}");

    // Every tag pushed once, and the destination lists every repository.
    let mut pushes = std::collections::HashMap::<String, usize>::new();
    for r in relay.requests().iter().filter(|r| r.method == "PUT" && r.status == 201 && r.path.ends_with("/manifests/v1")) {
        *pushes.entry(r.path.clone()).or_default() += 1;
    }
    assert_eq!(pushes.len() as u64, N, "tags pushed");
    assert!(pushes.values().all(|c| *c == 1), "tags pushed twice: {pushes:?}");
    let (status, body) = get(&dst.url("/v2/_catalog?n=1000")).await.unwrap();
    assert_eq!(status, 200);
    let catalog: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let names: Vec<String> = (0..N).map(|i| src.name(i)).collect();
    assert_eq!(catalog["repositories"], serde_json::json!(names), "the destination's catalog");
}

/// A member stops cleanly mid-job at SIGTERM: the unit it held is given back and its lease released (the shutdown
/// token stops its queue work), and the job's other worker finishes, pushing no tag twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_member_working_a_job_gives_its_unit_back_and_releases_its_lease() {
    const N: u64 = 48;
    let pg = PgDatabase::create().await;
    let s3 = S3Server::start();
    let src = Synthetic::start_with(Options { count: N, namespaces: 24, unique_images: true, layer_size: 128 });
    src.delay_on("GET /v2/", Duration::from_millis(40));
    let tmp = tempfile::tempdir().unwrap();
    let dst = Breakwater::start_logged(&[], "warn", &tmp.path().join("dst.log"));
    let relay = Relay::start(&dst.addr);
    let policy = format!(
        "[[replication]]\nname = \"S\"\nfrom = \"http://{}\"\nto = \"http://{}\"\nwalkers = 2\nconcurrency = 1\npage_size = 10\n",
        src.addr, relay.addr
    );
    let m = member_configured(&pg, &s3, &tmp.path().join("m.log"), &[], &policy);
    let (id, _) = view(&m).await;
    // Its log in a file: a pipe nobody reads until the end could fill and stall it.
    let starter_log = tmp.path().join("starter.log");
    let starter = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["replicate", "--distributed", "--metadata", &pg.url, "--job", "S", "--walkers", "2", "--concurrency", "1"])
        .args(["--page-size", "10", "--from", &format!("http://{}", src.addr), "--to", &format!("http://{}", relay.addr)])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&starter_log).unwrap())
        .spawn()
        .unwrap();

    let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
    let held = |pool: sqlx::PgPool, id: String| async move {
        let units: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM replication_units WHERE state = 'claimed' AND claimed_by = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
        let leases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM leases WHERE name LIKE 'replicate:%' AND holder = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
        (units, leases)
    };
    // A hang guard, not a measure.
    let deadline = Instant::now() + Duration::from_secs(60);
    while held(pool.clone(), id.clone()).await != (1, 1) {
        assert!(Instant::now() < deadline, "the member never claimed a unit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = std::process::Command::new("kill").args(["-TERM", &m.pid().to_string()]).status().unwrap();
    assert!(status.success());
    tokio::task::spawn_blocking(move || m.stop_after_exit()).await.unwrap();
    assert_eq!(held(pool.clone(), id.clone()).await, (0, 0), "the stopped member holds no unit and no lease");

    let status = tokio::task::spawn_blocking(move || starter.wait_with_output().unwrap().status).await.unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(&starter_log).unwrap());
    let units: Vec<String> = sqlx::query_scalar("SELECT state FROM replication_units WHERE job = 'S'").fetch_all(&pool).await.unwrap();
    pool.close().await;
    assert!(units.len() == 8 && units.iter().all(|s| s == "done"), "{units:?}");
    let mut pushes = std::collections::HashMap::<String, usize>::new();
    for r in relay.requests().iter().filter(|r| r.method == "PUT" && r.status == 201 && r.path.ends_with("/manifests/v1")) {
        *pushes.entry(r.path.clone()).or_default() += 1;
    }
    assert_eq!(pushes.len() as u64, N, "tags pushed");
    assert!(pushes.values().all(|c| *c == 1), "tags pushed twice: {pushes:?}");
}

//! Shutdown: what SIGTERM (and SIGINT) do to the work `breakwater serve` and `breakwater replicate` have in
//! progress. A replication run is stopped with its checkpoint saved and the status `interrupted`, and the next run
//! resumes it; a cache flight no client reads any more is cancelled and leaves nothing behind; schedules start no
//! run once the signal came. Every test runs the real binary; sources are real `docker-registry`s behind the
//! throttling relay (`common/relay.rs`), so the work is reliably in progress when the signal lands. Assertions
//! are about counts, bytes, digests and exit codes; time appears only as deadlock guards.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::oci::{pseudo_random, push_blob, push_image, sha256, Image};
use common::relay::Relay;
use common::{Breakwater, Distribution};
use serde_json::Value;

/// Repositories in the replication sources; each holds one image `v1` of a config blob and one layer.
const REPOS: usize = 6;
/// Bytes of each layer, and how fast the relay lets the source's blobs through: a repository takes about a
/// second, so the signal always finds the run part-way.
const LAYER: usize = 200_000;
const THROTTLE: u64 = 200_000;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().expect("kill");
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// `src/r0` … `src/r5`, each with one `v1`, pushed to the registry at `base`.
async fn push_sources(base: &str) -> Vec<Image> {
    let mut images = Vec::new();
    for i in 0..REPOS {
        images.push(push_image(base, &format!("src/r{i}"), "v1", &[LAYER], 700 + i as u64).await);
    }
    images
}

async fn job(bw: &Breakwater, name: &str) -> Value {
    let r = reqwest::get(bw.url(&format!("/api/replication/{name}"))).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// Polls the job until `done` says so (a deadlock guard of two minutes).
async fn wait_job(bw: &Breakwater, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = job(bw, name).await;
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {name} never got there: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The digest of `repo:v1` in the registry at `base`, if it has one.
async fn tag_digest(base: &str, repo: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .head(format!("{base}/v2/{repo}/manifests/v1"))
        .header("accept", common::oci::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    r.status().is_success().then(|| r.headers()["docker-content-digest"].to_str().unwrap().to_string())
}

/// Every source image is at `dst/copy/rI:v1` with the source's digest.
async fn all_copied(dst: &str, images: &[Image]) {
    for (i, image) in images.iter().enumerate() {
        assert_eq!(tag_digest(dst, &format!("copy/r{i}")).await.as_deref(), Some(image.digest.as_str()), "copy/r{i}");
    }
}

/// Waits (deadlock guard: a minute) for a child to exit by itself and returns its exit code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not exit after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// -------------------------------------------------------------------------------------------------------------
// (a) A run started through the API, interrupted by SIGTERM to the server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_interrupts_an_api_run_which_the_next_run_resumes() {
    let source = Distribution::start();
    let images = push_sources(&format!("http://{}", source.addr)).await;
    let relay = Relay::start(&source.addr);
    relay.throttle_on("/blobs/sha256:", THROTTLE);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bw.toml");
    std::fs::write(
        &config,
        format!(
            "[[replication]]\nname = \"mirror\"\nfrom = \"http://{}\"\nto = \"local\"\ninclude = [\"src/**\"]\nrewrite = [\"src/=copy/\"]\nconcurrency = 1\npage_size = 2\n",
            relay.addr
        ),
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let bw = Breakwater::start_with(&args);
    let r = reqwest::Client::new().post(bw.url("/api/replication/mirror/run")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // Two repositories copied, the rest still to do: the run is in progress.
    wait_job(&bw, "mirror", |j| j["progress"]["copied"].as_u64() >= Some(2)).await;
    signal(bw.pid(), "TERM");
    let data = bw.stop_after_exit();

    let bw = Breakwater::start_in(data, &args);
    let dst = bw.url("");
    let saved = job(&bw, "mirror").await;
    assert_eq!(saved["running"], false, "{saved}");
    assert_eq!(saved["progress"]["status"], "interrupted", "{saved}");
    let copied = saved["progress"]["copied"].as_u64().unwrap();
    assert!((2..REPOS as u64).contains(&copied), "the run was stopped part-way: {saved}");
    // The checkpoint claims only finished work: every repository up to its mark is at the destination, and it
    // counts exactly the copies that are there.
    let mark = saved["progress"]["mark"].as_str().unwrap_or("").to_string();
    let mut present = 0;
    for (i, image) in images.iter().enumerate() {
        let name = format!("src/r{i}");
        let copy = tag_digest(&dst, &format!("copy/r{i}")).await;
        if name.as_str() <= mark.as_str() {
            assert_eq!(copy.as_deref(), Some(image.digest.as_str()), "{name} is before the mark {mark:?}");
        }
        present += copy.is_some() as u64;
    }
    assert_eq!(present, copied, "copies counted by the checkpoint vs tags at the destination: {saved}");

    // The next run resumes: it copies what the first left, nothing twice.
    relay.clear_faults();
    relay.reset();
    let r = reqwest::Client::new().post(bw.url("/api/replication/mirror/run")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let done = wait_job(&bw, "mirror", |j| j["running"] == false && j["progress"]["status"] != "interrupted").await;
    assert_eq!(done["progress"]["status"], "finished", "{done}");
    assert_eq!(done["progress"]["copied"].as_u64(), Some(REPOS as u64), "each artifact copied exactly once: {done}");
    // A resumed run never lists the catalog from its start again.
    let from_start = relay.requests().iter().filter(|r| r.path.contains("/_catalog") && !r.path.contains("last=")).count();
    assert_eq!(from_start, 0, "the second run walked the catalog from the start: {:?}", relay.requests());
    // Layers already copied were not fetched again.
    for (i, image) in images.iter().enumerate().take(2) {
        assert_eq!(relay.count("GET", &image.layer_digests[0]), 0, "src/r{i}'s layer was fetched again");
    }
    all_copied(&dst, &images).await;
}

// -------------------------------------------------------------------------------------------------------------
// (b) `breakwater replicate` stopped by SIGTERM, then `--resume`.

/// `breakwater replicate` from the relay to `dst`, its job state in `data`.
fn replicate(relay: &Relay, dst: &str, data: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_breakwater"));
    c.args(["replicate", "--from", &relay.url(""), "--to", dst, "--job", "J", "--include", "src/**"])
        .args(["--rewrite", "src/=copy/", "--concurrency", "1", "--page-size", "2", "--data"])
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "breakwater=info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

/// The JSON summary `replicate` printed last (read once it has exited: the summary is far smaller than a pipe).
fn summary(child: &mut Child) -> Value {
    let out = BufReader::new(child.stdout.take().unwrap());
    let last = out.lines().map_while(Result::ok).filter(|l| !l.trim().is_empty()).last().unwrap_or_default();
    serde_json::from_str(&last).unwrap_or_else(|e| panic!("no JSON summary ({e}): {last:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_stopped_by_sigterm_exits_143_and_resumes() {
    let source = Distribution::start();
    let images = push_sources(&format!("http://{}", source.addr)).await;
    let relay = Relay::start(&source.addr);
    relay.throttle_on("/blobs/sha256:", THROTTLE);
    let dst = Breakwater::start();
    let dst_url = dst.url("");
    let data = tempfile::tempdir().unwrap();

    let mut run = replicate(&relay, &dst_url, data.path(), &[]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while tag_digest(&dst_url, "copy/r1").await.is_none() {
        assert!(Instant::now() < deadline, "the run never copied two repositories");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(run.id(), "TERM");
    assert_eq!(exit_code(&mut run), Some(143), "SIGTERM: exit 128 + 15");
    let first = summary(&mut run);
    assert_eq!(first["status"], "interrupted", "{first}");
    let copied = first["copied"].as_u64().unwrap();
    assert!((2..REPOS as u64).contains(&copied), "stopped part-way: {first}");
    // What the summary says is what the metadata store keeps.
    let meta = breakwater::meta::open(&format!("sqlite://{}?mode=rwc", data.path().join("metadata.db").display())).await.unwrap();
    let saved = meta.job("J").await.unwrap().expect("the job is saved");
    assert_eq!((saved.status.as_str(), saved.copied), ("interrupted", copied), "{saved:?}");
    drop(meta);

    relay.clear_faults();
    relay.reset();
    let mut resumed = replicate(&relay, &dst_url, data.path(), &["--resume"]).spawn().unwrap();
    let code = exit_code(&mut resumed);
    let second = summary(&mut resumed);
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(second["status"], "finished", "{second}");
    assert_eq!(second["copied"].as_u64(), Some(REPOS as u64), "each artifact copied exactly once: {second}");
    for (i, image) in images.iter().enumerate().take(2) {
        assert_eq!(relay.count("GET", &image.layer_digests[0]), 0, "src/r{i}'s layer was fetched again");
    }
    all_copied(&dst_url, &images).await;
}

// -------------------------------------------------------------------------------------------------------------
// (c) A cache flight that no client reads any more, at SIGTERM.

/// `breakwater fsck` over a stopped server's data directory; its stdout.
fn fsck(data: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["fsck", "--upstream", "up", "--grace-secs", "0", "--data"])
        .arg(data)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Files under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cancels_an_unread_flight_and_leaves_nothing_behind() {
    let upstream = Distribution::start();
    let blob = pseudo_random(4_000_000, 91);
    let digest = push_blob(&format!("http://{}", upstream.addr), "lib/big", &blob).await;
    let relay = Relay::start(&upstream.addr);
    relay.throttle_on("/blobs/sha256:", 100_000);
    let spec = format!("up=http://{}", relay.addr);
    let bw = Breakwater::start_with(&["--upstream", &spec]);
    let url = |bw: &Breakwater| bw.url(&format!("/v2/up/lib/big/blobs/{digest}"));

    // A client starts the pull, reads a little and goes away; the flight goes on filling the cache.
    let client = reqwest::Client::new();
    let mut r = client.get(url(&bw)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(!r.chunk().await.unwrap().unwrap_or_default().is_empty());
    drop(r);
    drop(client);
    let spool = bw.data.path().join("content/spool");
    assert_eq!(files(&spool).len(), 1, "the flight spools");
    signal(bw.pid(), "TERM");
    let data = bw.stop_after_exit();
    assert_eq!(relay.count("GET", &digest), 1);

    // The cancelled flight left no spool, nothing under its digest, and a store fsck finds clean.
    assert!(files(&data.path().join("content/spool")).is_empty(), "spool left behind");
    assert!(files(&data.path().join("content/blobs")).is_empty(), "a partial blob became visible");
    let (code, out) = fsck(data.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("clean"), "{out}");

    // After a restart the blob is fetched again, whole, and only then is it stored.
    relay.clear_faults();
    let bw = Breakwater::start_in(data, &["--upstream", &spec]);
    let body = reqwest::get(url(&bw)).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&body), digest);
    assert_eq!(body.len(), blob.len());
    let gets: Vec<_> = relay.requests().into_iter().filter(|r| r.method == "GET" && r.path.contains(&digest)).collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].header("range"), None, "the second fetch starts over: {:?}", gets[1]);
    signal(bw.pid(), "TERM");
    let data = bw.stop_after_exit();
    let (code, out) = fsck(data.path());
    assert_eq!(code, Some(0), "{out}");
}

// -------------------------------------------------------------------------------------------------------------
// (d) A schedule starts no run once the signal came, even while connections still drain.

/// Sends the head of a monolithic upload and part of its body: a request in progress that holds the server's
/// drain open until the rest is sent.
async fn held_upload(addr: &str, body: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v2/held/blobs/uploads/?digest={} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        sha256(body),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..body.len() / 2]).await.unwrap();
    s.flush().await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_starts_no_run_after_the_signal() {
    const EVERY: u64 = 1;
    let source = Distribution::start();
    push_image(&format!("http://{}", source.addr), "src/r0", "v1", &[1_000], 5).await;
    let relay = Relay::start(&source.addr);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bw.toml");
    std::fs::write(
        &config,
        format!(
            "[[replication]]\nname = \"every\"\nfrom = \"http://{}\"\nto = \"local\"\nrewrite = [\"src/=copy/\"]\nschedule_secs = {EVERY}\n",
            relay.addr
        ),
    )
    .unwrap();
    let bw = Breakwater::start_with(&["--config", config.to_str().unwrap()]);
    // The schedule is running: two runs have listed the catalog, and the second is over.
    assert!(relay.wait_for_async("GET", "/_catalog", 2, Duration::from_secs(60)).await);
    wait_job(&bw, "every", |j| j["running"] == false).await;

    let body = pseudo_random(100_000, 6);
    let mut held = held_upload(&bw.addr, &body).await;
    let before = relay.count("GET", "/_catalog");
    signal(bw.pid(), "TERM");
    // The drain is held open for several schedule periods: on the old code each one started a run.
    tokio::time::sleep(Duration::from_secs(3 * EVERY)).await;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        held.write_all(&body[body.len() / 2..]).await.unwrap();
        let mut resp = [0u8; 12];
        held.read_exact(&mut resp).await.unwrap();
        assert_eq!(&resp, b"HTTP/1.1 201", "the request in progress at the signal completes");
    }
    drop(held);
    bw.stop_after_exit();
    assert_eq!(relay.count("GET", "/_catalog"), before, "a scheduled run started after the signal");
}

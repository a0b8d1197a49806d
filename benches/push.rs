//! Pushing one large blob (issue 10, item 5, and item 3's big-blob half): breakwater against Debian's
//! `docker-registry` (distribution 2.8.2) in the same run, monolithic and chunked, then pulling it back.
//!
//! Run with `cargo bench --bench push`. Environment:
//! - `BENCH_BLOB_MB`: blob size in MB of 10^6 bytes (default `1000`; `5000` for the 5 GB memory check);
//! - `BENCH_CHUNK_MB`: the PATCH size of a chunked push, in MB (default `10`);
//! - `BENCH_REPEAT`: rounds; each round pushes with both modes to both servers, in rotating order, and pulls the
//!   blob back from both (default `3`);
//! - `BENCH_PULL`: `0` skips the pulls (default `1`);
//! - `BENCH_S3`: `1` also measures a breakwater whose blobs live in a local s3s-fs (`--storage s3://...`; issue 11:
//!   its RssAnon during a multi-GB push bounds what a multipart upload holds);
//! - `BENCH_BASELINE_BIN`: another breakwater binary (say, built from an earlier commit) measured in the same run
//!   as `breakwater (baseline)`, for before/after figures under the same load.
//!
//! The blob is 16 MiB of xorshift64 pseudo-random bytes repeated to the size (so the bench never holds more than
//! 16 MiB of it, whatever the size); its sha256 is computed once, before any push. The modes:
//! - monolithic: `POST /v2/<name>/blobs/uploads/`, then `PUT <location>&digest=<d>` with the whole body;
//! - chunked: the POST, then `PATCH <location>` per chunk with `Content-Range` and `Content-Length` (following the
//!   `Location` each answer gives, as distribution's changes), then `PUT <location>&digest=<d>` with no body.
//!
//! Each push ends with a 201 and a HEAD that must report the blob's length; each pull reads the whole body and
//! checks its sha256 (on a thread of its own). Both servers keep their data in a temporary directory on the same
//! filesystem. breakwater fsyncs a blob before it becomes visible; distribution's filesystem driver does not: that
//! difference is part of what is measured. During every push and pull the server's RssAnon (its own memory,
//! without the page cache of files) and VmRSS are sampled every 20 ms; its CPU time comes from `/proc/<pid>/stat`;
//! "other CPU" is the rest of the machine's busy time during the run (other work competing for the CPUs).
//! breakwater logs at `warn` (request lines at info cost nothing here, but the setting matches small_requests).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use support::{cpu_seconds, find_pid_by_cmdline, hex, loadavg, machine, machine_busy_seconds, nproc, source_state, vm_kib};

const REPO: &str = "bench/push";
/// The period of the blob's content: what the bench holds of it.
const PATTERN: usize = 16 << 20;
/// The size of the body chunks the client hands to reqwest.
const SEND_CHUNK: usize = 1 << 20;

fn main() {
    let blob_mb: u64 = support::env_parse("BENCH_BLOB_MB", 1000);
    let chunk_mb: u64 = support::env_parse("BENCH_CHUNK_MB", 10);
    let repeat: usize = support::env_parse("BENCH_REPEAT", 3).max(1);
    let pull: u8 = support::env_parse("BENCH_PULL", 1);
    let size = blob_mb * 1_000_000;
    let chunk = (chunk_mb * 1_000_000).max(1);

    let pattern = Bytes::from(xorshift_bytes(PATTERN, 0x9E37_79B9_7F4A_7C15));
    let t = Instant::now();
    let mut h = Sha256::new();
    for part in Blob::new(&pattern, 0, size) {
        h.update(&part);
    }
    let digest = format!("sha256:{}", hex(&h.finalize()));
    let hash_s = t.elapsed().as_secs_f64();

    println!("== push: one {blob_mb} MB blob, monolithic and in {chunk_mb} MB chunks, then pulled ==");
    println!("machine : {}", machine());
    println!("source  : {}", source_state());
    println!("load    : {} (1, 5, 15 min) at the start", loadavg());
    println!("blob    : {size} bytes, 16 MiB of xorshift64 repeated, {digest} (hashed in {hash_s:.2}s)");
    println!("runs    : {repeat} rounds; in each, both modes to both servers in rotating order, then a pull from each");
    println!();

    let logs = tempfile::tempdir().expect("tempdir");
    let bw = common::Breakwater::start_logged(&[], "warn", &logs.path().join("breakwater.log"));
    let dist = common::Distribution::start();
    let dist_config = dist.dir.path().join("config.yml").display().to_string();
    let mut servers = vec![
        Server { name: "breakwater", base: format!("http://{}", bw.addr), pid: bw.pid() },
        Server {
            name: "distribution 2.8.2",
            base: format!("http://{}", dist.addr),
            pid: find_pid_by_cmdline(&dist_config).expect("pid of docker-registry"),
        },
    ];
    let baseline = std::env::var("BENCH_BASELINE_BIN").ok().filter(|s| !s.is_empty()).map(|bin| Baseline::start(&bin));
    if let Some(b) = &baseline {
        servers.push(Server { name: "breakwater (baseline)", base: format!("http://{}", b.addr), pid: b.child.id() });
    }
    let s3 = (support::env_parse::<u8>("BENCH_S3", 0) != 0).then(common::s3::S3Server::start);
    let bw_s3 = s3.as_ref().map(|s3| {
        let env = s3.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let url = s3.url("bench");
        let log = logs.path().join("breakwater-s3.log");
        common::Breakwater::start_env_in(tempfile::tempdir().expect("tempdir"), &["--storage", &url], &env, &log)
    });
    if let Some(b) = &bw_s3 {
        servers.push(Server { name: "breakwater on S3 (s3s-fs)", base: format!("http://{}", b.addr), pid: b.pid() });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3600)).build().expect("client");

    let mut rows: Vec<Row> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for round in 0..repeat {
        let mut kinds = vec![Kind::Monolithic, Kind::Chunked(chunk)];
        if pull != 0 {
            kinds.push(Kind::Pull);
        }
        for kind in kinds {
            for i in 0..servers.len() {
                let server = &servers[(i + round) % servers.len()];
                let row = measure(server, kind, round + 1, size, || {
                    rt.block_on(run(kind, &client, &server.base, &pattern, size, &digest))
                });
                if let Some(e) = &row.error {
                    failures.push(format!("{} {} round {}: {e}", server.name, kind.name(), round + 1));
                }
                rows.push(row);
            }
        }
    }
    drop(bw);
    drop(dist);
    drop(baseline);
    drop(bw_s3);
    drop(s3);

    print_tables(&rows, &servers, size, repeat);
    println!();
    println!("load at the end: {} (1, 5, 15 min)", loadavg());
    if failures.is_empty() {
        println!("every push answered 201 and HEAD gave the full length; every pull's sha256 verified");
    } else {
        println!("FAILURES ({}):", failures.len());
        for f in &failures {
            println!("  {f}");
        }
        std::process::exit(1);
    }
}

/// Another breakwater binary, started like the harness starts the one built from this tree.
struct Baseline {
    child: std::process::Child,
    addr: String,
    _data: tempfile::TempDir,
}

impl Baseline {
    fn start(bin: &str) -> Baseline {
        use std::io::BufRead as _;
        let data = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data.path())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("BENCH_BASELINE_BIN {bin}: {e}"));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("listen line");
        let addr = line.trim().rsplit("://").next().expect("listen address").to_string();
        println!("baseline: {bin} at {addr}");
        Baseline { child, addr, _data: data }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Server {
    name: &'static str,
    base: String,
    pid: u32,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Monolithic,
    /// PATCHes of this many bytes.
    Chunked(u64),
    Pull,
}

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::Monolithic => "push, monolithic".into(),
            Kind::Chunked(c) => format!("push, {} MB chunks", c / 1_000_000),
            Kind::Pull => "pull".into(),
        }
    }
}

struct Row {
    server: &'static str,
    kind: String,
    round: usize,
    wall: f64,
    server_cpu: f64,
    other_cpu: f64,
    anon_kib: u64,
    rss_kib: u64,
    load: String,
    /// Seconds of the final PUT of a chunked push (the commit alone).
    commit: Option<f64>,
    error: Option<String>,
}

/// Runs `work` while sampling the server's memory, and takes its CPU time and the machine's around it.
fn measure(server: &Server, kind: Kind, round: usize, size: u64, work: impl FnOnce() -> Result<Option<f64>, String>) -> Row {
    let cpu0 = cpu_seconds(server.pid);
    let sys0 = sys_seconds(server.pid);
    let flt0 = minor_faults(server.pid);
    let self0 = cpu_seconds(std::process::id());
    let busy0 = machine_busy_seconds();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, pid) = (stop.clone(), server.pid);
        std::thread::spawn(move || {
            let (mut rss, mut anon) = (0, 0);
            loop {
                rss = rss.max(vm_kib(pid, "VmRSS").unwrap_or(0));
                anon = anon.max(vm_kib(pid, "RssAnon").unwrap_or(0));
                if stop.load(Ordering::Relaxed) {
                    return (rss, anon);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let t = Instant::now();
    let outcome = work();
    let wall = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (rss_kib, anon_kib) = sampler.join().expect("sampler");
    let server_cpu = cpu_seconds(server.pid) - cpu0;
    let server_sys = sys_seconds(server.pid) - sys0;
    let faults = minor_faults(server.pid).saturating_sub(flt0);
    let bench_cpu = cpu_seconds(std::process::id()) - self0;
    let other_cpu = (machine_busy_seconds() - busy0 - server_cpu - bench_cpu).max(0.0);
    let load = loadavg().split_whitespace().next().unwrap_or("?").to_string();
    let row = Row {
        server: server.name,
        kind: kind.name(),
        round,
        wall,
        server_cpu,
        other_cpu,
        anon_kib,
        rss_kib,
        load,
        commit: outcome.as_ref().ok().copied().flatten(),
        error: outcome.err(),
    };
    println!(
        "round {round} {:<22} {:<21} {:>7.2}s {:>6.0} MB/s  server CPU {:.2}s ({:.2} s/GB, of it system {:.2}s, {} minor faults)  RssAnon {:.1} MiB  RSS {:.1} MiB  other CPU {:.2}s  load {}{}{}",
        row.kind,
        row.server,
        wall,
        size as f64 / 1e6 / wall,
        server_cpu,
        server_cpu / (size as f64 / 1e9),
        server_sys,
        faults,
        anon_kib as f64 / 1024.0,
        rss_kib as f64 / 1024.0,
        other_cpu,
        row.load,
        row.commit.map_or(String::new(), |c| format!("  final PUT (commit) {c:.2}s")),
        row.error.as_ref().map_or(String::new(), |e| format!("  FAILED: {e}")),
    );
    row
}

/// stime of the process (all threads), in seconds: the kernel's share of its CPU time (copies, page faults).
fn sys_seconds(pid: u32) -> f64 {
    support::stat_fields(&format!("/proc/{pid}/stat")).and_then(|f| f.get(15 - 3).copied()).map_or(f64::NAN, |t| t as f64 / support::CLK_TCK)
}

/// Minor page faults of the process so far (each a page of fresh memory or of a mapped file touched).
fn minor_faults(pid: u32) -> u64 {
    support::stat_fields(&format!("/proc/{pid}/stat")).and_then(|f| f.get(10 - 3).copied()).unwrap_or(0)
}

fn print_tables(rows: &[Row], servers: &[Server], size: u64, repeat: usize) {
    let gb = size as f64 / 1e9;
    println!();
    println!("Medians over {repeat} rounds (MB = 10^6 bytes; peak memory: the largest of the rounds)");
    println!();
    println!("| what | server | MB/s | wall s | final PUT (commit) s | server CPU s/GB | peak RssAnon MiB | peak RSS MiB | other CPU s |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut kinds: Vec<&str> = Vec::new();
    for r in rows {
        if !kinds.contains(&r.kind.as_str()) {
            kinds.push(&r.kind);
        }
    }
    for kind in kinds {
        for s in servers {
            let runs: Vec<&Row> = rows.iter().filter(|r| r.kind == kind && r.server == s.name).collect();
            let med = |f: &dyn Fn(&Row) -> f64| median(&mut runs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let wall = med(&|r| r.wall);
            let commits: Vec<f64> = runs.iter().filter_map(|r| r.commit).collect();
            let commit = if commits.is_empty() { "-".to_string() } else { format!("{:.2}", median(&mut commits.clone())) };
            println!(
                "| {kind} | {} | {:.0} | {wall:.2} | {commit} | {:.2} | {:.1} | {:.1} | {:.2} |",
                s.name,
                gb * 1000.0 / wall,
                med(&|r| r.server_cpu) / gb,
                runs.iter().map(|r| r.anon_kib).max().unwrap_or(0) as f64 / 1024.0,
                runs.iter().map(|r| r.rss_kib).max().unwrap_or(0) as f64 / 1024.0,
                med(&|r| r.other_cpu),
            );
        }
    }
    println!();
    println!("Every run: load is the 1-minute average at its end");
    println!();
    println!("| what | server | round | wall s | MB/s | server CPU s | RssAnon MiB | other CPU s | load |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.1} | {:.2} | {} |",
            r.kind,
            r.server,
            r.round,
            r.wall,
            gb * 1000.0 / r.wall,
            r.server_cpu,
            r.anon_kib as f64 / 1024.0,
            r.other_cpu,
            r.load
        );
    }
    println!("({} logical CPUs shared by the server, this bench process and whatever else runs)", nproc());
}

/// One push or pull; for a chunked push, the seconds its last request (the commit, a PUT without a body) took.
async fn run(kind: Kind, client: &reqwest::Client, base: &str, pattern: &Bytes, size: u64, digest: &str) -> Result<Option<f64>, String> {
    let mut commit = None;
    match kind {
        Kind::Monolithic => {
            let location = start(client, base).await?;
            finish(client, base, &location, digest, Some(body(pattern, 0, size)), size).await?;
        }
        Kind::Chunked(chunk) => {
            let mut location = start(client, base).await?;
            let mut offset = 0;
            while offset < size {
                let end = (offset + chunk).min(size);
                location = patch(client, base, &location, body(pattern, offset, end), offset, end).await?;
                offset = end;
            }
            // The PUT without a body is the commit alone: verifying (or re-hashing) and making the blob durable.
            let t = Instant::now();
            finish(client, base, &location, digest, None, 0).await?;
            commit = Some(t.elapsed().as_secs_f64());
        }
        Kind::Pull => return pull(client, base, size, digest).await.map(|()| None),
    }
    let resp = client.head(format!("{base}/v2/{REPO}/blobs/{digest}")).send().await.map_err(|e| e.to_string())?;
    let cl = resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
    if resp.status().as_u16() != 200 || cl != Some(size) {
        return Err(format!("HEAD after push: status {}, content-length {cl:?}", resp.status()));
    }
    Ok(commit)
}

/// The bytes `[from, to)` of the blob as a request body of `SEND_CHUNK` slices of the pattern (no copies).
fn body(pattern: &Bytes, from: u64, to: u64) -> reqwest::Body {
    let parts = Blob::new(pattern, from, to).map(Ok::<Bytes, std::io::Error>);
    reqwest::Body::wrap_stream(futures_util::stream::iter(parts))
}

fn absolute(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else {
        format!("{base}{location}")
    }
}

fn location_of(resp: &reqwest::Response) -> Result<String, String> {
    resp.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_string).ok_or_else(|| "no Location".into())
}

async fn start(client: &reqwest::Client, base: &str) -> Result<String, String> {
    let resp = client.post(format!("{base}/v2/{REPO}/blobs/uploads/")).send().await.map_err(|e| e.to_string())?;
    if resp.status().as_u16() != 202 {
        return Err(format!("POST uploads: status {}", resp.status()));
    }
    location_of(&resp)
}

async fn patch(client: &reqwest::Client, base: &str, location: &str, body: reqwest::Body, from: u64, to: u64) -> Result<String, String> {
    let resp = client
        .patch(absolute(base, location))
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("{from}-{}", to - 1))
        .header("content-length", to - from)
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().as_u16() != 202 {
        let status = resp.status();
        return Err(format!("PATCH {from}-{to}: status {status}: {}", resp.text().await.unwrap_or_default()));
    }
    location_of(&resp)
}

async fn finish(
    client: &reqwest::Client,
    base: &str,
    location: &str,
    digest: &str,
    body: Option<reqwest::Body>,
    len: u64,
) -> Result<(), String> {
    let mut url = absolute(base, location);
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str("digest=");
    url.push_str(digest);
    let mut req = client.put(url).header("content-type", "application/octet-stream").header("content-length", len);
    if let Some(body) = body {
        req = req.body(body);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    if resp.status().as_u16() != 201 {
        let status = resp.status();
        return Err(format!("PUT upload: status {status}: {}", resp.text().await.unwrap_or_default()));
    }
    Ok(())
}

async fn pull(client: &reqwest::Client, base: &str, size: u64, digest: &str) -> Result<(), String> {
    let mut resp = client.get(format!("{base}/v2/{REPO}/blobs/{digest}")).send().await.map_err(|e| e.to_string())?;
    if resp.status().as_u16() != 200 {
        return Err(format!("GET: status {}", resp.status()));
    }
    let (tx, hasher) = support::spawn_hasher();
    let (mut ttfb, mut bytes) = (None, 0);
    let mut error = support::read_body(&mut resp, size, Instant::now(), &mut ttfb, &mut bytes, Some(&tx)).await.err();
    drop(tx);
    let want = digest.to_string();
    support::check_digest(Some(hasher), Some(&want), &mut error).await;
    error.map_or(Ok(()), Err)
}

/// The blob's bytes `[from, to)` as slices of the repeated pattern, at most `SEND_CHUNK` each.
struct Blob {
    pattern: Bytes,
    at: u64,
    to: u64,
}

impl Blob {
    fn new(pattern: &Bytes, from: u64, to: u64) -> Blob {
        Blob { pattern: pattern.clone(), at: from, to }
    }
}

impl Iterator for Blob {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.at >= self.to {
            return None;
        }
        let start = (self.at % PATTERN as u64) as usize;
        let len = (SEND_CHUNK - start % SEND_CHUNK).min((self.to - self.at) as usize);
        self.at += len as u64;
        Some(self.pattern.slice(start..start + len))
    }
}

fn xorshift_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

//! Serving one large blob to concurrent clients: breakwater vs Debian's `docker-registry` (distribution 2.8) and,
//! as the ceiling of serving a file from page cache, nginx with `sendfile` (when an nginx binary is found).
//!
//! Run with `cargo bench --bench blob_serve`. Environment:
//! - `BENCH_CLIENTS`: comma-separated client counts (default `1,50`);
//! - `BENCH_BLOB_MB`: blob size in MB of 10^6 bytes (default `200`);
//! - `BENCH_REPEAT`: how many times each client count is measured (default `5`; every repetition is printed, then medians);
//! - `BENCH_DRIVER`: `reqwest` (default: the clients are tasks of this process, which time every first byte) or
//!   `h2load` (the client: `h2load --h1 -c N -n N`, one C process on `BENCH_H2LOAD_THREADS` threads,
//!   default 1, which reports first bytes as min / max / mean only; its body bytes are counted, not hashed);
//! - `BENCH_S3`: `1` adds two breakwaters whose blobs live in a local s3s-fs (issue 11): one streaming the bytes
//!   from the store, one answering `redirect = true` 307s that the clients follow to the store (their figures
//!   are breakwater's process only: s3s-fs's CPU is not in them); with the reqwest driver only;
//! - `BENCH_NGINX`: the nginx binary (default `/usr/sbin/nginx`; Debian's `nginx` package, which need not be
//!   installed: `apt-get download nginx && dpkg-deb -x nginx_*.deb DIR` gives `DIR/usr/sbin/nginx`); `none` skips it.
//!
//! For each registry: push one pseudo-random blob (POST to open an upload session, then a monolithic
//! `PUT <location>&digest=...` with the whole body), do one warm-up GET (sha256 checked) so both serve from page
//! cache, then for each client count N start N concurrent `GET /v2/bench/blob/blobs/<digest>` on fresh
//! connections, each reading the whole body as a stream. Every client checks status, Content-Length and the byte
//! count; client 0 of every run also checks the sha256 of what it read (hashed on a separate thread fed through a bounded
//! channel, so that hashing does not serialize with reading the socket). The server's peak RSS during a run is its
//! VmHWM after the peak was reset through `/proc/<pid>/clear_refs` before the run (cross-checked by sampling
//! VmRSS every 20 ms, and RssAnon, the process's own memory without mapped files' page cache); CPU time comes from
//! `/proc/<pid>/stat`. nginx is a master and its workers: its figures are their sums. Wall time runs from starting the N requests to the last
//! body byte of the slowest client; aggregate throughput is the bytes all clients read divided by that wall time.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use support::{
    check_digest, cpu_seconds, find_pid_by_cmdline, hex, listen_overflows, loadavg, machine, machine_busy_seconds, mib_or_na,
    nproc, pct, read_body, reset_hwm, source_state, spawn_hasher, vm_kib,
};

const REPO: &str = "bench/blob";

fn main() {
    let blob_mb: usize = std::env::var("BENCH_BLOB_MB").ok().map(|s| s.trim().parse().expect("BENCH_BLOB_MB")).unwrap_or(200);
    let clients: Vec<usize> = support::env_list("BENCH_CLIENTS", "1,50");
    assert!(!clients.is_empty() && clients.iter().all(|&n| n > 0), "BENCH_CLIENTS needs positive counts");
    let repeat: usize = std::env::var("BENCH_REPEAT").ok().map(|s| s.trim().parse().expect("BENCH_REPEAT")).unwrap_or(5).max(1);
    let size = blob_mb * 1_000_000;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");

    let t = Instant::now();
    let blob = Bytes::from(xorshift_bytes(size, 0x9E37_79B9_7F4A_7C15));
    let gen_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let digest = format!("sha256:{}", hex(&Sha256::digest(&blob)));
    let hash_s = t.elapsed().as_secs_f64();

    println!("== blob_serve: one {blob_mb} MB blob to concurrent clients ==");
    println!("machine : {}", machine());
    println!("source  : {}", source_state());
    println!("load    : {} (1, 5, 15 min) at the start", loadavg());
    println!(
        "blob    : {size} bytes ({blob_mb} MB, xorshift64 pseudo-random, generated in {gen_s:.2}s), {digest} (hashed in {hash_s:.2}s)"
    );
    println!(
        "clients : {clients:?} concurrent GETs, {repeat} repetitions each, one fresh HTTP/1.1 connection per GET, in the bench process (tokio, {} workers)",
        nproc()
    );
    println!();

    let mut rows: Vec<Row> = Vec::new();
    let mut failures: Vec<String> = Vec::new();

    // Both registries run for the whole benchmark, and their runs are interleaved (alternating which goes first), so
    // that a burst of other work on the machine is less likely to hit only one of them.
    let bw = common::Breakwater::start();
    let dist = common::Distribution::start();
    let dist_config = dist.dir.path().join("config.yml");
    let mut servers = vec![
        Server::new("breakwater", &bw.addr, vec![bw.pid()], &digest),
        Server::new(
            "distribution 2.8.2",
            &dist.addr,
            vec![find_pid_by_cmdline(&dist_config.display().to_string()).expect("pid of docker-registry")],
            &digest,
        ),
    ];
    let s3 = S3Bench::start();
    if let Some(s3) = &s3 {
        servers.push(Server::new("breakwater on S3, streamed", &s3.streamed.addr, vec![s3.streamed.pid()], &digest));
        servers.push(Server::new("breakwater on S3, redirect", &s3.redirect.addr, vec![s3.redirect.pid()], &digest));
    }
    for server in &servers {
        prepare(&rt, server, &blob, &digest, &mut failures);
    }
    // nginx is given the blob as a file (it has no push): it serves what the registries stored, the same bytes.
    let nginx = Nginx::start(&blob, &digest);
    if let Some(ng) = &nginx {
        servers.push(Server::new("nginx (sendfile)", &ng.addr, ng.pids(), &digest));
        let server = servers.last().expect("just pushed");
        println!("-- {} at {} (pids {:?})", server.name, server.base, server.pids);
        prepare_warm(&rt, server, size as u64, &digest, &mut failures);
    }
    for &n in &clients {
        for rep in 1..=repeat {
            // Each repetition starts with the next server, so that no server always runs first (or last).
            let mut order: Vec<&Server> = servers.iter().collect();
            order.rotate_left((rep - 1) % servers.len());
            for server in order {
                rows.push(measure(&rt, server, n, rep, size as u64, &digest, &mut failures));
            }
        }
    }
    drop(bw);
    drop(dist);
    drop(nginx);
    rows.sort_by_key(|r| (servers.iter().position(|s| s.name == r.server), r.n, r.rep));

    println!();
    println!("Results ({blob_mb} MB blob; MB = 10^6 bytes, MiB = 2^20 bytes; times in seconds unless marked ms)");
    println!();
    println!("| server | clients | rep | wall s | aggregate MB/s | Gbit/s | TTFB p50 ms | TTFB p99 ms | TTFB mean ms | TTFB max ms | done p50 s | done p99 s | server peak RSS MiB (VmHWM) | sampled max RSS MiB | sampled max RssAnon MiB | server CPU s | bench-process CPU s | other CPU s | load 1 min | bodies ok |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {}/{} |",
            r.server,
            r.n,
            r.rep,
            r.wall,
            r.mbps,
            r.mbps * 8.0 / 1000.0,
            r.ttfb_p50 * 1000.0,
            r.ttfb_p99 * 1000.0,
            r.ttfb_mean * 1000.0,
            r.ttfb_max * 1000.0,
            r.done_p50,
            r.done_p99,
            mib_or_na(r.hwm),
            r.sampled_max_kib as f64 / 1024.0,
            r.sampled_anon_kib as f64 / 1024.0,
            r.server_cpu,
            r.client_cpu,
            r.other_cpu,
            r.load,
            r.ok,
            r.n
        );
    }
    println!();
    println!("Medians over the {repeat} repetitions (peak RSS: the largest of the repetitions)");
    println!();
    println!(
        "| server | clients | wall s | aggregate MB/s | Gbit/s | TTFB p50 ms | TTFB p99 ms | TTFB mean ms | TTFB max ms | done p50 s | done p99 s | server peak RSS MiB | peak RssAnon MiB | server CPU s | server CPU s per GB served | other CPU s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for server in &servers {
        for &n in &clients {
            let runs: Vec<&Row> = rows.iter().filter(|r| r.server == server.name && r.n == n).collect();
            let med = |f: &dyn Fn(&Row) -> f64| {
                let mut v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
                median(&mut v)
            };
            let peak = runs.iter().filter_map(|r| r.hwm).max().unwrap_or(0) as f64 / 1024.0;
            let anon = runs.iter().map(|r| r.sampled_anon_kib).max().unwrap_or(0) as f64 / 1024.0;
            println!(
                "| {} | {n} | {:.2} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {peak:.1} | {anon:.1} | {:.2} | {:.2} | {:.2} |",
                server.name,
                med(&|r| r.wall),
                med(&|r| r.mbps),
                med(&|r| r.mbps) * 8.0 / 1000.0,
                med(&|r| r.ttfb_p50 * 1000.0),
                med(&|r| r.ttfb_p99 * 1000.0),
                med(&|r| r.ttfb_mean * 1000.0),
                med(&|r| r.ttfb_max * 1000.0),
                med(&|r| r.done_p50),
                med(&|r| r.done_p99),
                med(&|r| r.server_cpu),
                med(&|r| r.server_cpu / (r.n as f64 * size as f64 / 1e9)),
                med(&|r| r.other_cpu),
            );
        }
    }
    println!();
    println!("load at the end: {} (1, 5, 15 min)", loadavg());
    println!("p99 uses the nearest-rank method: with 50 clients it is the slowest client; with 1 client p50 = p99 = that client.");
    println!(
        "CPU columns are user+system seconds during the run: the server process, this bench process (all clients), and the rest of \
         the machine (from /proc/stat; well above 0 means something else competed for the {} CPUs).",
        nproc()
    );
    if failures.is_empty() {
        println!("all bodies complete; sha256 verified by client 0 of every run and by every warm-up GET");
    } else {
        println!("FAILURES ({}):", failures.len());
        for f in &failures {
            println!("  {f}");
        }
        std::process::exit(1);
    }
}

struct Row {
    server: &'static str,
    n: usize,
    rep: usize,
    wall: f64,
    mbps: f64,
    ttfb_p50: f64,
    ttfb_p99: f64,
    ttfb_mean: f64,
    /// The slowest client's first byte.
    ttfb_max: f64,
    done_p50: f64,
    done_p99: f64,
    hwm: Option<u64>,
    sampled_max_kib: u64,
    /// The largest RssAnon sampled: the server's own memory (heap, stacks), without page cache of mapped files.
    sampled_anon_kib: u64,
    server_cpu: f64,
    client_cpu: f64,
    other_cpu: f64,
    /// The 1-minute load average at the end of the run: how busy the machine was.
    load: String,
    ok: usize,
}

/// What one run's clients saw, from either driver.
struct Outcome {
    wall: f64,
    bytes: u64,
    ok: usize,
    errors: Vec<String>,
    ttfb_p50: f64,
    ttfb_p99: f64,
    ttfb_mean: f64,
    ttfb_max: f64,
    done_p50: f64,
    done_p99: f64,
}

fn h2load_driver() -> bool {
    match std::env::var("BENCH_DRIVER").as_deref() {
        Ok("h2load") => true,
        Ok("reqwest") | Err(_) => false,
        Ok(other) => panic!("BENCH_DRIVER: reqwest or h2load, not {other}"),
    }
}

impl Outcome {
    fn reqwest(rt: &tokio::runtime::Runtime, url: &str, n: usize, size: u64, digest: &str) -> Outcome {
        let results = rt.block_on(run_clients(url, n, size, digest));
        let mut errors = Vec::new();
        for (i, r) in results.iter().enumerate() {
            if let Some(e) = &r.error {
                errors.push(format!("client {i}: {e} (read {} of {size} bytes)", r.bytes));
            }
        }
        let mut ttfb: Vec<f64> = results.iter().filter_map(|r| r.ttfb).collect();
        let mut done: Vec<f64> = results.iter().map(|r| r.done).collect();
        Outcome {
            // Wall time: from the moment the N requests are started until the last body byte of the slowest client
            // (the sha256 check that follows is not counted).
            wall: done.iter().copied().fold(0.0, f64::max),
            bytes: results.iter().map(|r| r.bytes).sum(),
            ok: n - errors.len(),
            errors,
            ttfb_mean: ttfb.iter().sum::<f64>() / ttfb.len().max(1) as f64,
            ttfb_max: ttfb.iter().copied().fold(0.0, f64::max),
            ttfb_p50: pct(&mut ttfb, 50.0),
            ttfb_p99: pct(&mut ttfb, 99.0),
            done_p50: pct(&mut done, 50.0),
            done_p99: pct(&mut done, 99.0),
        }
    }

    /// h2load reports no percentiles: p50/p99 are NaN, "done" is its time-for-request mean and max.
    fn h2load(url: &str, n: usize, size: u64) -> Outcome {
        let threads = support::env_parse("BENCH_H2LOAD_THREADS", 1usize);
        let r = match support::h2load(url, n, threads) {
            Ok(r) => r,
            Err(e) => {
                let nan = f64::NAN;
                return Outcome { wall: nan, bytes: 0, ok: 0, errors: vec![e], ttfb_p50: nan, ttfb_p99: nan, ttfb_mean: nan, ttfb_max: nan, done_p50: nan, done_p99: nan };
            }
        };
        let mut errors = Vec::new();
        if r.succeeded != n as u64 || r.data_bytes != n as u64 * size {
            errors.push(format!("h2load: {} of {n} succeeded, {} failed, {} body bytes of {}", r.succeeded, r.failed, r.data_bytes, n as u64 * size));
        }
        Outcome {
            wall: r.wall,
            bytes: r.data_bytes,
            ok: r.succeeded as usize,
            errors,
            ttfb_p50: f64::NAN,
            ttfb_p99: f64::NAN,
            ttfb_mean: r.ttfb[2],
            ttfb_max: r.ttfb[1],
            done_p50: r.request[2],
            done_p99: r.request[1],
        }
    }
}

struct Server {
    name: &'static str,
    base: String,
    /// The processes that serve: one, or nginx's master and workers (whose figures are summed).
    pids: Vec<u32>,
    url: String,
}

impl Server {
    fn new(name: &'static str, addr: &str, pids: Vec<u32>, digest: &str) -> Self {
        let base = format!("http://{addr}");
        let url = format!("{base}/v2/{REPO}/blobs/{digest}");
        Server { name, base, pids, url }
    }

    fn cpu(&self) -> f64 {
        self.pids.iter().map(|&p| cpu_seconds(p)).sum()
    }

    /// A `/proc/PID/status` field summed over the server's processes; `None` if any cannot be read.
    fn kib(&self, field: &str) -> Option<u64> {
        self.pids.iter().map(|&p| vm_kib(p, field)).sum()
    }
}

/// nginx serving the blob as a static file with `sendfile`, as the ceiling of serving from page cache on this
/// machine: a master and one worker per CPU, on a free loopback port, everything in its own temporary directory.
struct Nginx {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx over a copy of `blob` named by its digest, or `None` (with a note) if there is no binary.
    fn start(blob: &[u8], digest: &str) -> Option<Nginx> {
        let bin = std::env::var("BENCH_NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into());
        if bin == "none" || !std::path::Path::new(&bin).exists() {
            println!("-- nginx: no binary at {bin} (BENCH_NGINX), not measured");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs).expect("nginx blob dir");
        std::fs::write(blobs.join(digest), blob).expect("nginx blob file");
        let addr = format!("127.0.0.1:{}", common::free_port());
        let d = dir.path().display();
        // Every path nginx would default to (temp dirs, pid, logs) points into the temporary directory, so that an
        // unpacked, uninstalled package runs too.
        let conf = format!(
            "daemon off; master_process on; worker_processes auto; pid {d}/nginx.pid; error_log {d}/error.log warn;
             events {{ worker_connections 4096; }}
             http {{ access_log off; sendfile on; tcp_nopush on; keepalive_timeout 60;
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
               uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
               server {{ listen {addr}; location /v2/{REPO}/blobs/ {{ alias {d}/blobs/; types {{ }} default_type application/octet-stream; }} }}
             }}
"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("nginx.conf");
        let child = std::process::Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn nginx");
        common::wait_for_port(&addr);
        Some(Nginx { child, addr, _dir: dir })
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        // The workers fork right after the master binds; give them a moment to show up.
        for _ in 0..50 {
            let workers = support::children_of(master);
            if !workers.is_empty() {
                pids.extend(workers);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        pids
    }
}

impl Drop for Nginx {
    /// SIGTERM, not SIGKILL: a killed master would leave its workers running (and serving) as orphans; a
    /// terminated one stops them and exits after they have.
    fn drop(&mut self) {
        let term = std::process::Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        if !term.is_ok_and(|s| s.success()) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Pushes the blob and does the warm-up GET (which also checks the sha256 of what the server returns).
/// An s3s-fs and two breakwaters storing their blobs there (under prefixes of their own), when `BENCH_S3=1`.
struct S3Bench {
    // Field order is drop order: the registries stop before their store.
    streamed: common::Breakwater,
    redirect: common::Breakwater,
    _dir: tempfile::TempDir,
    _server: common::s3::S3Server,
}

impl S3Bench {
    fn start() -> Option<S3Bench> {
        if support::env_parse::<u8>("BENCH_S3", 0) == 0 {
            return None;
        }
        let server = common::s3::S3Server::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let env = server.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let start = |prefix: &str, redirect: bool| {
            let config = dir.path().join(format!("{prefix}.toml"));
            let toml = format!("[storage]\nurl = \"{}\"\nredirect = {redirect}\n", server.url(prefix));
            std::fs::write(&config, toml).expect("write config");
            let log = dir.path().join(format!("{prefix}.log"));
            let args = ["--config", config.to_str().expect("utf-8 path")];
            common::Breakwater::start_env_in(tempfile::tempdir().expect("tempdir"), &args, &env, &log)
        };
        let (streamed, redirect) = (start("streamed", false), start("redirect", true));
        Some(S3Bench { streamed, redirect, _dir: dir, _server: server })
    }
}

fn prepare(rt: &tokio::runtime::Runtime, server: &Server, blob: &Bytes, digest: &str, failures: &mut Vec<String>) {
    let Server { name, base, .. } = server;
    let (name, size) = (*name, blob.len() as u64);
    println!("-- {name} at {base} (pids {:?})", server.pids);

    let t = Instant::now();
    rt.block_on(push(base, blob.clone(), digest)).unwrap_or_else(|e| panic!("{name}: push failed: {e}"));
    let up = t.elapsed().as_secs_f64();
    println!(
        "   push (POST + monolithic PUT): {up:.2}s, {:.0} MB/s; server VmHWM after push {} MiB",
        size as f64 / 1e6 / up,
        mib_or_na(server.kib("VmHWM"))
    );
    prepare_warm(rt, server, size, digest, failures);
}

/// The warm-up GET, which also checks the sha256 of what the server returns.
fn prepare_warm(rt: &tokio::runtime::Runtime, server: &Server, size: u64, digest: &str, failures: &mut Vec<String>) {
    let (name, url) = (server.name, &server.url);
    let t = Instant::now();
    let warm = rt.block_on(run_clients(url, 1, size, digest));
    let w = &warm[0];
    match &w.error {
        None => println!("   warm-up GET: {:.2}s, sha256 ok", t.elapsed().as_secs_f64()),
        Some(e) => {
            println!("   warm-up GET FAILED: {e}");
            failures.push(format!("{name} warm-up: {e}"));
        }
    }
}

/// One measured run: N concurrent clients each GET the whole blob.
fn measure(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    n: usize,
    rep: usize,
    size: u64,
    digest: &str,
    failures: &mut Vec<String>,
) -> Row {
    let (name, url) = (server.name, &server.url);
    let hwm_reset = server.pids.iter().all(|&p| reset_hwm(p));
    let cpu0 = server.cpu();
    let self0 = cpu_seconds(std::process::id());
    let busy0 = machine_busy_seconds();
    let procs0 = all_process_cpu();
    let overflows0 = listen_overflows();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, pids) = (stop.clone(), server.pids.clone());
        std::thread::spawn(move || {
            let sum = |field: &str| pids.iter().map(|&p| vm_kib(p, field).unwrap_or(0)).sum::<u64>();
            let (mut rss, mut anon) = (0, 0);
            loop {
                rss = rss.max(sum("VmRSS"));
                anon = anon.max(sum("RssAnon"));
                if stop.load(Ordering::Relaxed) {
                    return (rss, anon);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let outcome = if h2load_driver() { Outcome::h2load(url, n, size) } else { Outcome::reqwest(rt, url, n, size, digest) };

    stop.store(true, Ordering::Relaxed);
    let (sampled_max_kib, sampled_anon_kib) = sampler.join().unwrap();
    let hwm = if hwm_reset { server.kib("VmHWM") } else { None };
    let server_cpu = server.cpu() - cpu0;
    let client_cpu = cpu_seconds(std::process::id()) - self0;
    // CPU time that neither the server nor the bench process used: other work on the machine disturbing the run.
    let other_cpu = (machine_busy_seconds() - busy0 - server_cpu - client_cpu).max(0.0);
    let mut skip = server.pids.clone();
    skip.push(std::process::id());
    let others = top_other_processes(&procs0, &all_process_cpu(), &skip);
    let overflows = listen_overflows() - overflows0;

    for e in &outcome.errors {
        failures.push(format!("{name} N={n} rep {rep}: {e}"));
    }
    let ok = outcome.ok;
    let row = Row {
        server: name,
        n,
        rep,
        wall: outcome.wall,
        mbps: outcome.bytes as f64 / 1e6 / outcome.wall,
        ttfb_p50: outcome.ttfb_p50,
        ttfb_p99: outcome.ttfb_p99,
        ttfb_mean: outcome.ttfb_mean,
        ttfb_max: outcome.ttfb_max,
        done_p50: outcome.done_p50,
        done_p99: outcome.done_p99,
        hwm,
        sampled_max_kib,
        sampled_anon_kib,
        server_cpu,
        client_cpu,
        other_cpu,
        load: loadavg().split_whitespace().next().unwrap_or("?").to_string(),
        ok,
    };
    println!(
        "   {name:<18} N={n:>3} rep {rep}: wall {:.2}s, {:.0} MB/s ({:.2} Gbit/s), TTFB p50/p99/mean/max {:.1}/{:.1}/{:.1}/{:.1} ms, \
         done p50/p99 {:.2}/{:.2}s, peak RSS {} MiB, RssAnon {:.1} MiB, server CPU {:.2}s, other CPU {:.2}s, load {}, {ok}/{n} ok",
        row.wall,
        row.mbps,
        row.mbps * 8.0 / 1000.0,
        row.ttfb_p50 * 1000.0,
        row.ttfb_p99 * 1000.0,
        row.ttfb_mean * 1000.0,
        row.ttfb_max * 1000.0,
        row.done_p50,
        row.done_p99,
        mib_or_na(hwm),
        sampled_anon_kib as f64 / 1024.0,
        server_cpu,
        other_cpu,
        row.load,
    );
    if !others.is_empty() {
        println!("           other processes busy during the run: {others}");
    }
    if overflows > 0 {
        println!("           {overflows} connections overflowed a listen queue during the run (their SYNs were retried 1 s or more later)");
    }
    row
}

/// Pushes the blob in one piece, then checks with a HEAD that the server has it, at its full length.
async fn push(base: &str, blob: Bytes, digest: &str) -> Result<(), String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().map_err(|e| e.to_string())?;
    let len = blob.len();
    support::push_monolithic(&client, base, REPO, blob, digest).await?;
    let resp = client.head(format!("{base}/v2/{REPO}/blobs/{digest}")).send().await.map_err(|e| e.to_string())?;
    let cl = resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<usize>().ok());
    if resp.status().as_u16() != 200 || cl != Some(len) {
        return Err(format!("HEAD after push: status {}, content-length {cl:?}", resp.status()));
    }
    Ok(())
}

struct ClientResult {
    /// Seconds from the run's start to the first body byte.
    ttfb: Option<f64>,
    /// Seconds from the run's start to the end of the body (or to the failure).
    done: f64,
    bytes: u64,
    error: Option<String>,
}

/// N concurrent GETs of the blob, each on its own connection (a fresh client per run, so none reuses a warm one).
async fn run_clients(url: &str, n: usize, size: u64, digest: &str) -> Vec<ClientResult> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(n).timeout(Duration::from_secs(150)).build().expect("client");
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let url = url.to_string();
            let digest = digest.to_string();
            tokio::spawn(async move { one_client(client, url, size, if i == 0 { Some(digest) } else { None }, t0).await })
        })
        .collect();
    support::join_clients(tasks, |e| ClientResult {
        ttfb: None,
        done: t0.elapsed().as_secs_f64(),
        bytes: 0,
        error: Some(e),
    })
    .await
}

async fn one_client(client: reqwest::Client, url: String, size: u64, check: Option<String>, t0: Instant) -> ClientResult {
    let mut r = ClientResult { ttfb: None, done: 0.0, bytes: 0, error: None };
    // Hashing runs on its own thread, fed the (refcounted, uncopied) chunks through a bounded channel.
    let (tx, hasher) = check.as_ref().map(|_| spawn_hasher()).unzip();
    let outcome: Result<(), String> = async {
        let mut resp = client.get(&url).send().await.map_err(|e| format!("request: {e}"))?;
        if resp.status().as_u16() != 200 {
            return Err(format!("status {}", resp.status()));
        }
        let cl = resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
        if cl != Some(size) {
            return Err(format!("content-length {cl:?}, expected {size}"));
        }
        read_body(&mut resp, size, t0, &mut r.ttfb, &mut r.bytes, tx.as_ref()).await
    }
    .await;
    r.done = t0.elapsed().as_secs_f64();
    drop(tx);
    r.error = outcome.err();
    // The digest is checked after the body's last byte, outside the measured time.
    check_digest(hasher, check.as_ref(), &mut r.error).await;
    r
}

fn xorshift_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = seed;
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    for b in chunks.into_remainder() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// CPU seconds (utime + stime) of every process now, by pid, with its name.
fn all_process_cpu() -> std::collections::HashMap<u32, (String, f64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let name = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')')).map_or("?".to_string(), |(n, _)| n.to_string());
        out.insert(pid, (name, cpu_seconds(pid)));
    }
    out
}

/// The processes other than `skip` that used at least 0.05 s of CPU between two snapshots, busiest first.
fn top_other_processes(
    before: &std::collections::HashMap<u32, (String, f64)>,
    after: &std::collections::HashMap<u32, (String, f64)>,
    skip: &[u32],
) -> String {
    let mut used: Vec<(String, u32, f64)> = after
        .iter()
        .filter(|(pid, _)| !skip.contains(pid))
        .map(|(pid, (name, cpu))| (name.clone(), *pid, cpu - before.get(pid).map_or(0.0, |b| b.1)))
        .filter(|(_, _, d)| *d >= 0.05)
        .collect();
    used.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap());
    used.iter().take(5).map(|(n, p, d)| format!("{n}[{p}] {d:.2}s")).collect::<Vec<_>>().join(", ")
}

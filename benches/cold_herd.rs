//! A cold herd through the pull-through cache (issue 3): N concurrent clients ask a proxy for one large blob it does
//! not have yet; breakwater against Debian's `docker-registry` (distribution 2.8) in proxy mode.
//!
//! Run with `cargo bench --bench cold_herd`. Environment:
//! - `BENCH_CLIENTS`: comma-separated client counts (default `1,50,200`);
//! - `BENCH_BLOB_MB`: blob size in MB of 10^6 bytes (default `200`);
//! - `BENCH_THROTTLE`: upstream pace in bytes per second per connection (default `100000000`; `0` = unthrottled);
//! - `BENCH_CASE_TIMEOUT_SECS`: cap on one case, from the first request to the last body byte (default `300`);
//! - `BENCH_PROXIES`: which proxies to measure (default `breakwater,distribution`; also `cluster3`: three members
//!   of one breakwater cluster on PostgreSQL at 127.0.0.1:5432 and s3s-fs, and `alone3`: three breakwaters each on
//!   its own disk; for both, the N clients are spread round-robin over the three);
//! - `BENCH_WARM`: `1` (default) re-runs the largest N once more on the same, now warm, proxy, to show what serving
//!   the blob to N clients costs on this machine without any upstream in the way; `0` skips it.
//!
//! Set-up: one real upstream (`docker-registry`) holds one pseudo-random blob (generated at run time, pushed
//! directly to it), reached only through the test relay (`tests/common/relay.rs`), which paces every response body
//! to `BENCH_THROTTLE` per connection and records every request and every body byte it relays.
//!
//! Each case is one proxy and one N, on a cold cache: a fresh breakwater (fresh data directory,
//! `--upstream up=http://RELAY`, clients GET `/v2/up/bench/herd/blobs/<digest>`) or a fresh distribution proxy
//! instance (fresh storage, `proxy: remoteurl: http://RELAY`, clients GET `/v2/bench/herd/blobs/<digest>`), the relay's
//! log reset just before the clients start. The N clients start together, each on its own HTTP/1.1 connection,
//! and stream the body to its end without keeping it (status, Content-Length and byte count checked for every
//! client; client 0 also hashes what it read, on a separate thread, and checks the sha256). After the last client
//! finishes, the bench waits for the proxy's upstream requests to end (distribution keeps filling its store in the
//! background) before reading the relay's counters and the proxy's peak RSS (VmHWM in /proc/PID/status; the
//! process is new for every case, so VmHWM covers exactly its start-up and the case).
//!
//! Printed per case: upstream blob GETs and HEADs (and any other upstream request), bytes read from upstream, when
//! the upstream had sent 1x the blob's bytes (for breakwater: when its one download ended), time until all N finish, time to first body byte p50/p99, peak RSS, CPU seconds, and the targets:
//! breakwater makes 1 upstream GET and reads the blob once at every N; all N done within 1.2x the single-client
//! cold time; p99 TTFB within 100 ms of the single client's; peak RSS under 64 MB at N=200.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use common::relay::Relay;
use support::{
    check_digest, cpu_seconds, env_parse, find_pid_by_cmdline, hex, loadavg, machine, machine_busy_seconds, mib_or_na, nproc,
    pct, read_body, reset_hwm, source_state, spawn_hasher, vm_kib,
};

const REPO: &str = "bench/herd";

#[derive(Clone, Copy, PartialEq)]
enum Proxy {
    Breakwater,
    Distribution,
    /// Three breakwater members of one cluster (PostgreSQL on 127.0.0.1:5432, s3s-fs), clients round-robin.
    Cluster3,
    /// Three breakwater instances, each alone on its own disk, clients round-robin: what three caches behind a load
    /// balancer do without a cluster (each coalesces its own clients only).
    Alone3,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Breakwater => "breakwater",
            Proxy::Distribution => "distribution 2.8.2",
            Proxy::Cluster3 => "breakwater cluster of 3",
            Proxy::Alone3 => "3 breakwaters alone",
        }
    }
}

/// A running proxy of either kind; held only to be killed on drop.
#[allow(dead_code)]
enum Running {
    Breakwater(common::Breakwater),
    Distribution(common::Distribution),
    /// Members first: they stop before the stores they use go.
    Several(Vec<common::Breakwater>, Option<Cluster>),
}

struct Row {
    proxy: Proxy,
    size: u64,
    n: usize,
    warm: bool,
    /// From the start of the N requests to the last body byte of the slowest client; `None` if not all finished.
    wall: Option<f64>,
    finished: usize,
    ok: usize,
    ttfb_p50: f64,
    ttfb_p99: f64,
    blob_gets: usize,
    ranged_gets: usize,
    blob_heads: usize,
    other_requests: Vec<String>,
    /// Body bytes of the upstream's blob GET responses.
    upstream_bytes: u64,
    /// Body bytes of every upstream response.
    upstream_all_bytes: u64,
    aborted_upstream: usize,
    settle: f64,
    settled: bool,
    hwm_kib: Option<u64>,
    /// The largest RssAnon sampled (every 20 ms) during the case: the proxy's own memory, without the page cache
    /// of files it maps.
    anon_kib: u64,
    proxy_cpu: f64,
    bench_cpu: f64,
    upstream_cpu: f64,
    other_cpu: f64,
    load: String,
    errors: Vec<String>,
    /// Seconds from the start of the N requests until the upstream had sent 1x the blob's bytes.
    upstream_1x: Option<f64>,
}

fn main() {
    let blob_mb: usize = env_parse("BENCH_BLOB_MB", 200);
    let throttle: u64 = env_parse("BENCH_THROTTLE", 100_000_000);
    let case_timeout = Duration::from_secs(env_parse("BENCH_CASE_TIMEOUT_SECS", 300));
    let warm_rerun = env_parse::<u32>("BENCH_WARM", 1) != 0;
    let clients: Vec<usize> = support::env_list("BENCH_CLIENTS", "1,50,200");
    assert!(!clients.is_empty() && clients.iter().all(|&n| n > 0), "BENCH_CLIENTS needs positive counts");
    let n_max = *clients.iter().max().unwrap();
    let proxies: Vec<Proxy> = std::env::var("BENCH_PROXIES")
        .unwrap_or_else(|_| "breakwater,distribution".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| match s.trim() {
            "breakwater" => Proxy::Breakwater,
            "distribution" => Proxy::Distribution,
            "cluster3" => Proxy::Cluster3,
            "alone3" => Proxy::Alone3,
            other => panic!("BENCH_PROXIES: unknown proxy {other:?} (breakwater, distribution, cluster3, alone3)"),
        })
        .collect();
    let size = (blob_mb * 1_000_000) as u64;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");

    println!("== cold_herd: N concurrent cold pulls of one {blob_mb} MB blob through a pull-through cache ==");
    println!("machine : {}", machine());
    println!("load    : {} at start", loadavg());
    println!("source  : {}", source_state());
    println!(
        "upstream: docker-registry behind the test relay, {} per connection",
        if throttle == 0 { "unthrottled".to_string() } else { format!("throttled to {:.0} MB/s", throttle as f64 / 1e6) }
    );
    println!(
        "clients : {clients:?} concurrent GETs, one fresh HTTP/1.1 connection each, in the bench process (tokio, {} workers); \
         every body streamed and length-checked, client 0's sha256 checked; cap {} s per case",
        nproc(),
        case_timeout.as_secs()
    );

    // The upstream and its content.
    let upstream = common::Distribution::start();
    let upstream_base = format!("http://{}", upstream.addr);
    let upstream_pid = find_pid_by_cmdline(&upstream.dir.path().join("config.yml").display().to_string());
    let t = Instant::now();
    let blob = Bytes::from(common::oci::pseudo_random(size as usize, 0xC01D));
    let digest = format!("sha256:{}", hex(&Sha256::digest(&blob)));
    println!("blob    : {size} bytes, {digest} (generated and hashed in {:.2}s)", t.elapsed().as_secs_f64());
    let t = Instant::now();
    rt.block_on(push(&upstream_base, blob, &digest)).unwrap_or_else(|e| panic!("push to the upstream: {e}"));
    println!("push    : {:.2}s directly to the upstream (not through the relay)", t.elapsed().as_secs_f64());

    let relay = Relay::start(&upstream.addr);
    relay.throttle(throttle);

    // The floor: one client reading the blob straight from the upstream through the throttled relay.
    relay.reset();
    let direct_url = relay.url(&format!("/v2/{REPO}/blobs/{digest}"));
    let direct = rt.block_on(run_clients(&[direct_url], 1, size, &digest, case_timeout));
    match &direct[0].error {
        None => println!(
            "direct  : one client straight from the upstream through the relay (no proxy): {:.2}s, TTFB {:.1} ms, sha256 ok",
            direct[0].done,
            direct[0].ttfb.unwrap_or(f64::NAN) * 1000.0
        ),
        Some(e) => println!("direct  : one client straight from the upstream FAILED: {e}"),
    }
    println!();

    let mut rows: Vec<Row> = Vec::new();
    for &proxy in &proxies {
        for &n in &clients {
            let warm = warm_rerun && n == n_max;
            let (cold, warm_row) = run_case(&rt, proxy, n, warm, &relay, upstream_pid, &digest, size, case_timeout);
            print_case(&cold);
            rows.push(cold);
            if let Some(w) = warm_row {
                print_case(&w);
                rows.push(w);
            }
        }
    }

    println!();
    println!(
        "Results ({blob_mb} MB blob, upstream {}; MB = 10^6 bytes, MiB = 2^20 bytes)",
        if throttle == 0 { "unthrottled".to_string() } else { format!("{:.0} MB/s per connection", throttle as f64 / 1e6) }
    );
    println!();
    println!("| proxy | N | cache | upstream blob GETs | upstream blob HEADs | other upstream requests | blob bytes from upstream (x blob) | upstream sent 1x blob by s | all N done s | TTFB p50 ms | TTFB p99 ms | proxy peak RSS MiB | proxy peak RssAnon MiB | proxy CPU s | bench CPU s | upstream CPU s | other CPU s | load 1/5/15 | bodies ok |");
    println!("|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {}{} | {} | {} | {:.2} GB ({:.2}x){} | {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {}/{} |",
            r.proxy.name(),
            r.n,
            if r.warm { "warm (re-run)" } else { "cold" },
            r.blob_gets,
            if r.ranged_gets > 0 { format!(" ({} ranged)", r.ranged_gets) } else { String::new() },
            r.blob_heads,
            if r.other_requests.is_empty() { "none".to_string() } else { r.other_requests.join(", ") },
            r.upstream_bytes as f64 / 1e9,
            r.upstream_bytes as f64 / size as f64,
            if r.settled { "" } else { " (still flowing)" },
            r.upstream_1x.map_or("-".to_string(), |t| format!("{t:.2}")),
            r.wall.map_or(format!("did not finish in {} s ({}/{} done)", case_timeout.as_secs(), r.finished, r.n), |w| format!("{w:.2}")),
            r.ttfb_p50 * 1000.0,
            r.ttfb_p99 * 1000.0,
            mib_or_na(r.hwm_kib),
            r.anon_kib as f64 / 1024.0,
            r.proxy_cpu,
            r.bench_cpu,
            r.upstream_cpu,
            r.other_cpu,
            r.load,
            r.ok,
            r.n
        );
    }
    println!();
    println!(
        "TTFB: from the start of the N requests to a client's first body byte; p99 is nearest-rank (with N <= 100 it is the \
         slowest client). \"bench CPU\" is this process: the N clients and the relay. \"other CPU\" is the rest of the machine."
    );
    if direct[0].error.is_none() {
        println!("Direct single-client read from the upstream through the relay, no proxy: {:.2}s.", direct[0].done);
    }

    // The targets.
    println!();
    println!("Targets (issue 3):");
    for &proxy in &proxies {
        let cold: Vec<&Row> = rows.iter().filter(|r| r.proxy == proxy && !r.warm).collect();
        let single = cold.iter().find(|r| r.n == 1);
        println!("  {}:", proxy.name());
        for r in &cold {
            let one_get = r.blob_gets == 1;
            let once = r.upstream_bytes == size;
            println!(
                "    N={:>3}: upstream blob GETs {} (target 1: {}), bytes from upstream {:.2}x the blob (target 1x: {})",
                r.n,
                r.blob_gets,
                verdict(one_get),
                r.upstream_bytes as f64 / size as f64,
                verdict(once)
            );
            if let (Some(s), true) = (single, r.n > 1) {
                match (r.wall, s.wall) {
                    (Some(w), Some(w1)) => println!(
                        "           all {} done in {:.2}s = {:.2}x the single client's {:.2}s (target <= 1.2x: {})",
                        r.n,
                        w,
                        w / w1,
                        w1,
                        verdict(w / w1 <= 1.2)
                    ),
                    _ => println!("           all {} done: did not finish in {} s (target <= 1.2x: missed)", r.n, case_timeout.as_secs()),
                }
                let d = (r.ttfb_p99 - s.ttfb_p99) * 1000.0;
                println!(
                    "           TTFB p99 {:.1} ms vs single client {:.1} ms: {:+.1} ms (target <= +100 ms: {})",
                    r.ttfb_p99 * 1000.0,
                    s.ttfb_p99 * 1000.0,
                    d,
                    verdict(d <= 100.0)
                );
            }
            if r.n == 200 || (r.n == n_max && n_max != 200) {
                if let Some(k) = r.hwm_kib {
                    println!(
                        "           peak RSS {:.1} MiB ({:.1} MB) at N={} (target < 64 MB{}: {})",
                        k as f64 / 1024.0,
                        k as f64 * 1024.0 / 1e6,
                        r.n,
                        if r.n == 200 { "" } else { ", which is set for N=200" },
                        verdict((k as f64 * 1024.0) < 64e6)
                    );
                }
            }
        }
    }

    // Issue 10's targets: the cold herd against the same N served warm by the same process, and the one upstream
    // download's pace against one client reading straight from the upstream (the unloaded pace).
    println!();
    println!("Targets (issue 10, items 2, 3 and 4):");
    for &proxy in &proxies {
        for cold in rows.iter().filter(|r| r.proxy == proxy && !r.warm) {
            let Some(warm) = rows.iter().find(|r| r.proxy == proxy && r.warm && r.n == cold.n) else { continue };
            println!("  {} N={}:", proxy.name(), cold.n);
            println!(
                "    TTFB p99 cold {:.1} ms vs warm {:.1} ms: {:.2}x (target <= 2x: {})",
                cold.ttfb_p99 * 1000.0,
                warm.ttfb_p99 * 1000.0,
                cold.ttfb_p99 / warm.ttfb_p99,
                verdict(cold.ttfb_p99 <= 2.0 * warm.ttfb_p99)
            );
            if let (Some(c), Some(w)) = (cold.wall, warm.wall) {
                println!("    all done cold {c:.2}s vs warm {w:.2}s: {:.2}x (target <= 1.1x: {})", c / w, verdict(c <= 1.1 * w));
            }
            if let (Some(up), None) = (cold.upstream_1x, &direct[0].error) {
                let pace = direct[0].done / up;
                println!(
                    "    the upstream download took {up:.2}s against {:.2}s unloaded: {pace:.2}x its unloaded pace (target >= 0.9x: {})",
                    direct[0].done,
                    verdict(pace >= 0.9)
                );
            }
            println!(
                "    peak RssAnon cold {:.1} MiB ({:.1} MB), warm {:.1} MiB (target <= 64 MB at N=800: {})",
                cold.anon_kib as f64 / 1024.0,
                cold.anon_kib as f64 * 1024.0 / 1e6,
                warm.anon_kib as f64 / 1024.0,
                verdict((cold.anon_kib.max(warm.anon_kib) as f64 * 1024.0) <= 64e6)
            );
        }
    }

    let errors: Vec<String> = rows.iter().flat_map(|r| r.errors.iter().cloned()).collect();
    println!();
    if errors.is_empty() {
        println!("all bodies complete and of the right length; sha256 verified for client 0 of every case");
    } else {
        println!("FAILURES ({}):", errors.len());
        for e in errors.iter().take(40) {
            println!("  {e}");
        }
        if errors.len() > 40 {
            println!("  ... and {} more", errors.len() - 40);
        }
    }
    println!("load    : {} at end", loadavg());
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    rt: &tokio::runtime::Runtime,
    proxy: Proxy,
    n: usize,
    warm_rerun: bool,
    relay: &Relay,
    upstream_pid: Option<u32>,
    digest: &str,
    size: u64,
    timeout: Duration,
) -> (Row, Option<Row>) {
    let relay_url = format!("http://{}", relay.addr);
    relay.reset();
    let spec = format!("up=http://{}", relay.addr);
    let path = format!("/v2/up/{REPO}/blobs/{digest}");
    let (running, pids, urls) = match proxy {
        Proxy::Breakwater => {
            let bw = common::Breakwater::start_with(&["--upstream", spec.as_str()]);
            let (pid, url) = (bw.pid(), bw.url(&path));
            (Running::Breakwater(bw), vec![pid], vec![url])
        }
        Proxy::Distribution => {
            let d = common::Distribution::start_proxy(Some(&relay_url));
            let config = d.dir.path().join("config.yml").display().to_string();
            let pid = find_pid_by_cmdline(&config).expect("pid of the docker-registry proxy");
            let url = d.url(&format!("/v2/{REPO}/blobs/{digest}"));
            (Running::Distribution(d), vec![pid], vec![url])
        }
        Proxy::Alone3 => {
            let members: Vec<_> = (0..3).map(|_| common::Breakwater::start_with(&["--upstream", spec.as_str()])).collect();
            let (pids, urls) = members.iter().map(|bw| (bw.pid(), bw.url(&path))).unzip();
            (Running::Several(members, None), pids, urls)
        }
        Proxy::Cluster3 => {
            let (members, stores) = rt.block_on(start_cluster(&spec));
            let (pids, urls) = members.iter().map(|bw| (bw.pid(), bw.url(&path))).unzip();
            (Running::Several(members, Some(stores)), pids, urls)
        }
    };
    let before_start = relay.requests();
    if !before_start.is_empty() {
        let list: Vec<String> = before_start.iter().map(|r| format!("{} {} -> {}", r.method, r.path, r.status)).collect();
        println!("   ({} made {} upstream requests while starting, not counted: {})", proxy.name(), list.len(), list.join(", "));
    }
    let cold = measure(rt, proxy, n, false, relay, &pids, upstream_pid, &urls, digest, size, timeout);
    let warm = warm_rerun.then(|| measure(rt, proxy, n, true, relay, &pids, upstream_pid, &urls, digest, size, timeout));
    drop(running);
    (cold, warm)
}

#[allow(clippy::too_many_arguments)]
fn measure(
    rt: &tokio::runtime::Runtime,
    proxy: Proxy,
    n: usize,
    warm: bool,
    relay: &Relay,
    pids: &[u32],
    upstream_pid: Option<u32>,
    urls: &[String],
    digest: &str,
    size: u64,
    timeout: Duration,
) -> Row {
    let load = loadavg();
    if warm {
        // The cold case's VmHWM has been read: start the warm run's peak from the current RSS.
        for &pid in pids {
            let _ = reset_hwm(pid);
        }
    }
    relay.reset();
    let cpu0: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let self0 = cpu_seconds(std::process::id());
    let up0 = upstream_pid.map_or(0.0, cpu_seconds);
    let busy0 = machine_busy_seconds();

    // A watcher notes when the upstream has sent as many body bytes as the blob has: for breakwater, the moment its
    // one upstream download ended.
    let watching = AtomicBool::new(true);
    let sampler_t0 = Instant::now();
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            while watching.load(Ordering::Relaxed) {
                if relay.body_bytes() >= size {
                    return Some(sampler_t0.elapsed().as_secs_f64());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        });
        let sampler = scope.spawn(|| {
            let mut anon = 0;
            while watching.load(Ordering::Relaxed) {
                for &pid in pids {
                    anon = anon.max(vm_kib(pid, "RssAnon").unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            anon
        });
        let results = rt.block_on(run_clients(urls, n, size, digest, timeout));
        let finished = results.iter().filter(|r| !r.timed_out).count();
        let ok = results.iter().filter(|r| r.error.is_none()).count();
        let wall = (finished == n).then(|| results.iter().map(|r| r.done).fold(0.0, f64::max));

        // Let the proxy's upstream requests end (distribution fills its store in the background; breakwater's flight
        // ends with the body). Every request the relay saw is answered and its body ended or was abandoned.
        let t = Instant::now();
        let settle_limit = Duration::from_secs(if finished == n { 120 } else { 10 });
        let mut settled = false;
        while t.elapsed() < settle_limit {
            let reqs = relay.requests();
            if reqs.iter().all(|r| r.status != 0 && (r.complete || r.aborted)) {
                settled = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let settle = t.elapsed().as_secs_f64();
        // One more beat, so a request that a finished one triggers is seen too.
        std::thread::sleep(Duration::from_millis(200));
        watching.store(false, Ordering::Relaxed);
        let upstream_1x = watcher.join().expect("watcher");
        let anon_kib = sampler.join().expect("sampler");

        // Per process: the largest member's peak.
        let hwm_kib = pids.iter().filter_map(|&p| vm_kib(p, "VmHWM")).max();
        let proxy_cpu = pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>() - cpu0;
        let bench_cpu = cpu_seconds(std::process::id()) - self0;
        let upstream_cpu = upstream_pid.map_or(f64::NAN, |p| cpu_seconds(p) - up0);
        let other_cpu = (machine_busy_seconds() - busy0 - proxy_cpu - bench_cpu - if upstream_cpu.is_nan() { 0.0 } else { upstream_cpu }).max(0.0);

        let reqs = relay.requests();
        let is_blob = |p: &str| p.contains("/blobs/sha256:");
        let blob_gets = reqs.iter().filter(|r| r.method == "GET" && is_blob(&r.path)).count();
        let ranged_gets = reqs.iter().filter(|r| r.method == "GET" && is_blob(&r.path) && r.range.is_some()).count();
        let blob_heads = reqs.iter().filter(|r| r.method == "HEAD" && is_blob(&r.path)).count();
        let aborted_upstream = reqs.iter().filter(|r| r.aborted && r.method == "GET" && is_blob(&r.path)).count();
        let mut other: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for r in reqs.iter().filter(|r| !((r.method == "GET" || r.method == "HEAD") && is_blob(&r.path))) {
            *other.entry(format!("{} {} -> {}", r.method, r.path.split('?').next().unwrap_or(""), r.status)).or_default() += 1;
        }
        let other_requests = other.into_iter().map(|(k, v)| format!("{v}x {k}")).collect();
        let mut statuses: std::collections::BTreeMap<u16, usize> = std::collections::BTreeMap::new();
        for r in reqs.iter().filter(|r| is_blob(&r.path)) {
            *statuses.entry(r.status).or_default() += 1;
        }

        let mut errors = Vec::new();
        for (i, r) in results.iter().enumerate() {
            if let Some(e) = &r.error {
                errors.push(format!(
                    "{} N={n}{} client {i}: {e} (read {} of {size} bytes after {:.2}s)",
                    proxy.name(),
                    if warm { " warm" } else { "" },
                    r.bytes,
                    r.done
                ));
            }
        }
        if statuses.keys().any(|&s| !(200..300).contains(&s)) {
            errors.push(format!("{} N={n}: upstream blob responses by status: {statuses:?}", proxy.name()));
        }
        let mut ttfb: Vec<f64> = results.iter().filter_map(|r| r.ttfb).collect();
        Row {
            proxy,
            size,
            n,
            warm,
            wall,
            finished,
            ok,
            ttfb_p50: pct(&mut ttfb, 50.0),
            ttfb_p99: pct(&mut ttfb, 99.0),
            blob_gets,
            ranged_gets,
            blob_heads,
            other_requests,
            upstream_bytes: reqs.iter().filter(|r| r.method == "GET" && is_blob(&r.path)).map(|r| r.body_bytes).sum(),
            upstream_all_bytes: relay.body_bytes(),
            aborted_upstream,
            settle,
            settled,
            hwm_kib,
            anon_kib,
            proxy_cpu,
            bench_cpu,
            upstream_cpu,
            other_cpu,
            load,
            errors,
            upstream_1x,
        }
    })
}

fn print_case(r: &Row) {
    println!(
        "-- {} N={}{}: {}, TTFB p50/p99 {:.1}/{:.1} ms; upstream: {} blob GETs{}, {} blob HEADs, other {}, {} blob bytes read ({}; {:.2}x the blob; {} bytes in all responses; {} blob GETs aborted){}; \
         peak RSS {} MiB, RssAnon {:.1} MiB; CPU proxy {:.2}s, bench {:.2}s, upstream {:.2}s, other {:.2}s; load {}; {}/{} ok",
        r.proxy.name(),
        r.n,
        if r.warm { " (warm re-run)" } else { " cold" },
        r.wall.map_or(format!("did not finish ({}/{} done)", r.finished, r.n), |w| format!("all done in {w:.2}s")),
        r.ttfb_p50 * 1000.0,
        r.ttfb_p99 * 1000.0,
        r.blob_gets,
        if r.ranged_gets > 0 { format!(" ({} ranged)", r.ranged_gets) } else { String::new() },
        r.blob_heads,
        if r.other_requests.is_empty() { "none".to_string() } else { r.other_requests.join(", ") },
        r.upstream_bytes,
        r.upstream_1x.map_or("never 1x the blob".to_string(), |t| format!("1x the blob sent by {t:.2}s")),
        r.upstream_bytes as f64 / r.size as f64,
        r.upstream_all_bytes,
        r.aborted_upstream,
        if r.settled { format!(", upstream quiet {:.2}s after the last client", r.settle) } else { format!(", upstream still busy {:.0}s after the clients", r.settle) },
        mib_or_na(r.hwm_kib),
        r.anon_kib as f64 / 1024.0,
        r.proxy_cpu,
        r.bench_cpu,
        r.upstream_cpu,
        r.other_cpu,
        r.load,
        r.ok,
        r.n
    );
    for e in r.errors.iter().take(5) {
        println!("   error: {e}");
    }
    if r.errors.len() > 5 {
        println!("   ... {} more errors", r.errors.len() - 5);
    }
}

/// Pushes the blob in one piece straight to the upstream.
async fn push(base: &str, blob: Bytes, digest: &str) -> Result<(), String> {
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(300)).build().map_err(|e| e.to_string())?;
    support::push_monolithic(&client, base, REPO, blob, digest).await
}

struct ClientResult {
    /// Seconds from the start of the N requests to the first body byte.
    ttfb: Option<f64>,
    /// Seconds from the start of the N requests to the end of the body (or to the failure).
    done: f64,
    bytes: u64,
    timed_out: bool,
    error: Option<String>,
}

/// N concurrent GETs of the blob, each on its own connection, spread round-robin over `urls` (one per proxy
/// process), all cut at `timeout` after the start.
async fn run_clients(urls: &[String], n: usize, size: u64, digest: &str, timeout: Duration) -> Vec<ClientResult> {
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(n).build().expect("client");
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let url = urls[i % urls.len()].clone();
            let digest = digest.to_string();
            tokio::spawn(async move { one_client(client, url, size, (i == 0).then_some(digest), t0, deadline).await })
        })
        .collect();
    support::join_clients(tasks, |e| ClientResult {
        ttfb: None,
        done: t0.elapsed().as_secs_f64(),
        bytes: 0,
        timed_out: false,
        error: Some(e),
    })
    .await
}

async fn one_client(
    client: reqwest::Client,
    url: String,
    size: u64,
    check: Option<String>,
    t0: Instant,
    deadline: tokio::time::Instant,
) -> ClientResult {
    let mut r = ClientResult { ttfb: None, done: 0.0, bytes: 0, timed_out: false, error: None };
    // Hashing runs on its own thread, fed the (refcounted, uncopied) chunks through a bounded channel.
    let (tx, hasher) = check.as_ref().map(|_| spawn_hasher()).unzip();
    let work = async {
        let mut resp = client.get(&url).send().await.map_err(|e| format!("request: {e}"))?;
        if resp.status().as_u16() != 200 {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(format!("status {status}: {}", text.chars().take(200).collect::<String>()));
        }
        let cl = resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
        if cl.is_some_and(|cl| cl != size) {
            return Err(format!("content-length {cl:?}, expected {size}"));
        }
        read_body(&mut resp, size, t0, &mut r.ttfb, &mut r.bytes, tx.as_ref()).await?;
        if cl.is_none() {
            return Err("no content-length (body length was right)".into());
        }
        Ok::<(), String>(())
    };
    let outcome = match tokio::time::timeout_at(deadline, work).await {
        Ok(o) => o,
        Err(_) => {
            r.timed_out = true;
            Err("did not finish before the case's time cap".to_string())
        }
    };
    r.done = t0.elapsed().as_secs_f64();
    drop(tx);
    r.error = outcome.err();
    // The digest is checked after the body's last byte, outside the measured time.
    check_digest(hasher, check.as_ref(), &mut r.error).await;
    r
}

/// What a cluster's members share, held as long as they run: their logs, the object store, the database.
#[allow(dead_code)]
struct Cluster {
    logs: tempfile::TempDir,
    s3: common::s3::S3Server,
    pg: common::pg::PgDatabase,
}

/// Three members of one cluster on a fresh PostgreSQL database and a fresh s3s-fs, caching `up` = `spec`.
async fn start_cluster(spec: &str) -> (Vec<common::Breakwater>, Cluster) {
    let pg = common::pg::PgDatabase::create().await;
    let s3 = common::s3::S3Server::start();
    let url = s3.url("bench");
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let logs = tempfile::tempdir().expect("log dir");
    let members = (0..3)
        .map(|i| {
            let args = ["--metadata", pg.url.as_str(), "--storage", url.as_str(), "--cluster-secret", "a-secret-for-the-cold-herd-bench", "--upstream", spec];
            common::Breakwater::start_env_in(tempfile::tempdir().expect("data dir"), &args, &env, &logs.path().join(format!("m{i}.log")))
        })
        .collect();
    (members, Cluster { logs, s3, pg })
}

//! Replication (issue 4): `breakwater replicate` over a million-repository source, through a kill -9 and a
//! `--resume`, and over 2,000 repositories between two real registries against skopeo and the destination's ceiling.
//!
//! Run with `cargo bench --bench replication`. Environment:
//! - `BENCH_PARTS`: any of `a`, `b`, `c`, comma-separated (default `a,b,c`);
//! - `BENCH_MILLION`: repositories of the synthetic source in (a) (default `1000000`); the filter `--include '*000'`
//!   matches 1 in 1,000 of them;
//! - `BENCH_BULK`: repositories of the real source in (b) (default `2000`);
//! - `BENCH_SKOPEO_N`: repositories copied by the sequential skopeo loop (default `200`; the 2,000 figure is
//!   extrapolated from them, and the table says so);
//! - `BENCH_CEILING`: concurrent pusher tasks of the ceiling, comma-separated (default `8,16`);
//! - `BENCH_WALK_N`: repositories of the synthetic source in (c) (default `1000000`); `BENCH_WALK_DELAY_MS`: the
//!   time each of its catalog pages takes (default `50`); `BENCH_WALKERS`: walker counts to time (default `1,8`).
//!
//! (a) Million-repository streaming. The source is `tests/common/synthetic.rs` (generated names `r0000000` ..
//! `r0999999`, every repository with its own small image: config + a 1 KiB layer, one tag `v1`); the destination is
//! a fresh `breakwater serve` behind `tests/common/relay.rs`, which records every request the destination gets.
//! `breakwater replicate --include '*000' --walkers 1` runs as a child process with its other defaults
//! (`--concurrency 8`, `--page-size 1000`): one walker, as when (a) was first measured, so that its "pages listed
//! twice" is the single walk's (partitioned walks are (c)). While it runs the bench polls, every 2 ms: the synthetic source's log for the first manifest
//! GET (the first copy starting), the relay's log for the first tag `PUT .../manifests/v1` answered 201 (the first
//! artifact finished at the destination: this is "first artifact"), and `/proc/PID/status` of the child for VmHWM
//! (peak RSS) and VmRSS. Times are from `spawn()` of the child. Pass 1 runs to the end. Pass 2, on a fresh
//! destination and a fresh job, is killed with SIGKILL once half of the matched tags were PUT at the destination,
//! then run again with `--resume`; the bench then counts
//! - catalog pages listed twice: `last` values of successful catalog requests the source saw in both runs, and, more
//!   strictly, pages of the second run whose repositories had all been finished by the first;
//! - artifacts copied twice: blob uploads (a `PUT .../blobs/uploads/...?digest=D` or a non-mount `POST ...?digest=D`
//!   answered 201) per digest across the two runs, and tags finished (201) in run 1 that run 2 PUT again or whose
//!   blobs it uploaded again.
//!
//! (b) 2,000 repositories between real registries. The source is a Debian `docker-registry` (distribution 2.8.2)
//! holding `bulk/r00000` .. `bulk/r01999`, one tag `v1` each, an OCI image with its own config and a 1-1.5 KiB
//! layer (pushed at set-up, 16 at a time, not timed). Layers are gzip streams (stored blocks, `tar+gzip` media type):
//! with uncompressed layers skopeo gzips them on the way and the copies get other digests. Each method copies all
//! of them into its own fresh `docker-registry`:
//! 1. `breakwater replicate` (default concurrency 8, and `--concurrency 16`), a child process, wall time from spawn
//!    to exit;
//! 2. a sequential loop of `skopeo --insecure-policy copy --src-tls-verify=false --dest-tls-verify=false
//!    docker://SRC/repo:v1 docker://DST/repo:v1` over the first `BENCH_SKOPEO_N` repositories, extrapolated;
//! 3. the ceiling: tokio tasks in the bench process push the same content (prepared in memory before the clock
//!    starts) straight to the destination: per repository two blobs by POST + PUT and the manifest PUT.
//!
//! Every destination is checked afterwards (catalog count, and the manifest digest of a sample of repositories).
//! CPU seconds are the children's utime+stime (replicate, skopeo) and the registries' own, from /proc. Before the
//! timed runs, an untimed probe copies 50 of the repositories through counting relays (into a `docker-registry` and
//! into a breakwater) and pushes 50 with the ceiling's pusher through one: requests per repository to each side.
//!
//! (c) Partitioned walks (issue 14). The synthetic source of (a), every catalog page answered after
//! `BENCH_WALK_DELAY_MS` (distribution rescans its storage for every page), is listed whole by `breakwater
//! replicate --include no-such-repository --walkers W` (pages of 1000; nothing matches, so nothing is copied: the
//! walk alone) for each W, flat names (`r0000000`..) and, with the most walkers, all names under one prefix
//! (`ns0/r0000000`..). Wall time from spawn to exit, peak RSS (VmHWM), catalog requests the source answered.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use common::oci::{pseudo_random, sha256, OCI_MANIFEST};
use common::relay::Relay;
use common::synthetic::{Options, Synthetic};
use support::{cpu_seconds, env_parse, find_pid_by_cmdline, loadavg, machine, source_state, stat_fields, vm_kib, CLK_TCK};

fn main() {
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "a,b,c".into());
    let million: u64 = env_parse("BENCH_MILLION", 1_000_000);
    let bulk: usize = env_parse("BENCH_BULK", 2000);
    let skopeo_n: usize = env_parse::<usize>("BENCH_SKOPEO_N", 200).min(bulk);
    let ceilings: Vec<usize> = support::env_list("BENCH_CEILING", "8,16");
    let started = Instant::now();

    println!("== replication: breakwater replicate, streaming a 1M-repository catalog and copying 2,000 real repositories ==");
    println!("machine : {}", machine());
    println!("load    : {} at start", loadavg());
    println!("source  : {}", source_state());
    println!("binary  : {}", env!("CARGO_BIN_EXE_breakwater"));

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut report = Vec::new();
    if parts.contains('a') {
        report.extend(part_a(&rt, million));
    }
    if parts.contains('b') {
        report.extend(part_b(&rt, bulk, skopeo_n, &ceilings));
    }
    if parts.contains('c') {
        let n: u64 = env_parse("BENCH_WALK_N", 1_000_000);
        let delay: u64 = env_parse("BENCH_WALK_DELAY_MS", 50);
        report.extend(part_c(n, delay, &support::env_list("BENCH_WALKERS", "1,8")));
    }
    if parts.contains('d') {
        let n: u64 = env_parse("BENCH_DIST_N", 4000);
        let delay: u64 = env_parse("BENCH_DIST_DELAY_MS", 5);
        report.extend(part_d(&rt, n, delay));
    }
    println!();
    println!("================================================================ results");
    for l in &report {
        println!("{l}");
    }
    println!("load at end: {}; bench wall time {:.0} s", loadavg(), started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------------------------
// Running `breakwater replicate` and watching it.

/// What one `replicate` child did.
#[derive(Default)]
struct Run {
    wall: f64,
    /// Seconds from spawn to the source's first manifest GET.
    first_src_get: Option<f64>,
    /// Seconds from spawn to the first tag PUT answered 201 at the destination.
    first_dst_put: Option<f64>,
    hwm_kib: Option<u64>,
    rss_max_kib: Option<u64>,
    /// utime + stime of the child (from this process's cutime/cstime across the wait).
    cpu: f64,
    code: Option<i32>,
    killed: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn summary(&self) -> Value {
        let last = self.stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(last).unwrap_or(Value::Null)
    }

    fn n(&self, key: &str) -> u64 {
        self.summary()[key].as_u64().unwrap_or(u64::MAX)
    }

    fn ok(&self) -> bool {
        self.code == Some(0) && self.n("failed") == 0
    }

    fn describe(&self) -> String {
        let lines: Vec<&str> = self.stderr.lines().collect();
        format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr (tail) ---\n{}",
            self.code,
            self.stdout.trim(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }
}

/// Probes polled while a child runs.
#[derive(Default)]
struct Watch<'a> {
    first_src: Option<&'a dyn Fn() -> bool>,
    first_dst: Option<&'a dyn Fn() -> bool>,
    /// SIGKILL the child once this holds.
    kill_when: Option<&'a dyn Fn() -> bool>,
}

fn replicate_args(from: &str, to: &str, data: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> =
        ["replicate", "--from", &format!("http://{from}"), "--to", &format!("http://{to}"), "--data"].iter().map(|s| s.to_string()).collect();
    v.push(data.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_replicate(args: &[String], watch: Watch, timeout: Duration) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::fs::File::create(dir.path().join("stdout")).unwrap();
    let err = std::fs::File::create(dir.path().join("stderr")).unwrap();
    let cpu0 = children_cpu();
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(args)
        .env("RUST_LOG", "breakwater=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn breakwater replicate");
    let pid = child.id();
    let mut r = Run::default();
    let mut last_kill_check = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        let now = t0.elapsed().as_secs_f64();
        if r.first_src_get.is_none() && watch.first_src.is_some_and(|f| f()) {
            r.first_src_get = Some(now);
        }
        if r.first_dst_put.is_none() && watch.first_dst.is_some_and(|f| f()) {
            r.first_dst_put = Some(now);
        }
        if let Some(h) = vm_kib(pid, "VmHWM") {
            r.hwm_kib = Some(h.max(r.hwm_kib.unwrap_or(0)));
        }
        if let Some(v) = vm_kib(pid, "VmRSS") {
            r.rss_max_kib = Some(v.max(r.rss_max_kib.unwrap_or(0)));
        }
        if last_kill_check.elapsed() >= Duration::from_millis(10) {
            last_kill_check = Instant::now();
            if watch.kill_when.is_some_and(|f| f()) {
                let _ = child.kill();
                let _ = child.wait();
                r.killed = true;
                break None;
            }
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("replicate did not finish within {timeout:?}; killed");
            r.killed = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    r.wall = t0.elapsed().as_secs_f64();
    r.cpu = children_cpu() - cpu0;
    r.code = status.and_then(|s| s.code());
    r.stdout = std::fs::read_to_string(dir.path().join("stdout")).unwrap_or_default();
    r.stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    // The probes again, for events of the last 2 ms.
    if r.first_src_get.is_none() && watch.first_src.is_some_and(|f| f()) {
        r.first_src_get = Some(r.wall);
    }
    if r.first_dst_put.is_none() && watch.first_dst.is_some_and(|f| f()) {
        r.first_dst_put = Some(r.wall);
    }
    r
}

/// Blob uploads the relay saw (not mounts), answered 201: digest → count.
fn uploads(relay: &Relay) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in relay.requests() {
        let is_upload =
            r.path.contains("/blobs/uploads/") && (r.method == "PUT" || (r.method == "POST" && !r.path.contains("mount=")));
        if !is_upload || r.status != 201 {
            continue;
        }
        if let Some(d) = digest_param(&r.path) {
            *out.entry(d).or_default() += 1;
        }
    }
    out
}

/// Blob uploads per destination repository (201 only): repo → digests.
fn uploads_by_repo(relay: &Relay) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for r in relay.requests() {
        let is_upload =
            r.path.contains("/blobs/uploads/") && (r.method == "PUT" || (r.method == "POST" && !r.path.contains("mount=")));
        if !is_upload || r.status != 201 {
            continue;
        }
        let repo = r.path.strip_prefix("/v2/").and_then(|p| p.split_once("/blobs/uploads")).map(|(a, _)| a.to_string());
        if let (Some(repo), Some(d)) = (repo, digest_param(&r.path)) {
            out.entry(repo).or_default().push(d);
        }
    }
    out
}

fn digest_param(path: &str) -> Option<String> {
    let q = path.split_once('?')?.1;
    let v = q.split('&').find_map(|kv| kv.strip_prefix("digest="))?;
    Some(v.replace("%3A", ":").replace("%3a", ":"))
}

/// Repositories whose tag `v1` PUT the relay saw answered 201.
fn finished_tags(relay: &Relay) -> BTreeSet<String> {
    relay
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.status == 201 && r.path.ends_with("/manifests/v1"))
        .filter_map(|r| Some(r.path.strip_prefix("/v2/")?.strip_suffix("/manifests/v1")?.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// (a) A million repositories.

fn part_a(rt: &tokio::runtime::Runtime, count: u64) -> Vec<String> {
    let matched_expected = count / 1000;
    println!();
    println!("== (a) {count} repositories (synthetic source), --include '*000' ({matched_expected} match), into breakwater behind the counting relay ==");
    println!("load    : {}", loadavg());
    let src = Synthetic::start_with(Options { count, namespaces: 0, unique_images: true, layer_size: 1024 });
    let mut lines = Vec::new();

    // Pass 1: start to end.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dst = common::Breakwater::start_logged(&[], "breakwater=warn", &tmp.path().join("dst.log"));
    let relay = Relay::start(&dst.addr);
    let args = replicate_args(&src.addr, &relay.addr, &tmp.path().join("jobs"), &["--include", "*000", "--job", "million", "--walkers", "1"]);
    let first_src = || !src.manifest_gets().is_empty();
    let first_dst = || relay.requests().iter().any(|r| r.method == "PUT" && r.status == 201 && r.path.ends_with("/manifests/v1"));
    let p1 = run_replicate(
        &args,
        Watch { first_src: Some(&first_src), first_dst: Some(&first_dst), kill_when: None },
        Duration::from_secs(600),
    );
    let pages1 = src.catalog_pages().len();
    let done1 = finished_tags(&relay).len();
    println!(
        "pass 1  : exit {:?}, wall {:.2} s, first manifest GET at source {}, first tag PUT 201 at destination {}, VmHWM {}, CPU {:.2} s",
        p1.code,
        p1.wall,
        secs(p1.first_src_get),
        secs(p1.first_dst_put),
        mib(p1.hwm_kib),
        p1.cpu
    );
    println!("          summary {}; source saw {pages1} catalog pages; destination has {done1} tags PUT with 201", p1.summary());
    if !p1.ok() {
        println!("          PASS 1 FAILED\n{}", p1.describe());
    }
    let (v1_ok, v1_total) = rt.block_on(verify_synthetic(&format!("http://{}", dst.addr), &src));
    println!("          destination check: {v1_ok}/{v1_total} matched repositories serve v1 with the source's digest");
    drop(relay);
    drop(dst);

    // Pass 2: kill -9 at half, then --resume.
    src.reset();
    let tmp2 = tempfile::tempdir().expect("tempdir");
    let dst2 = common::Breakwater::start_logged(&[], "breakwater=warn", &tmp2.path().join("dst.log"));
    let relay2 = Relay::start(&dst2.addr);
    let args2 = replicate_args(&src.addr, &relay2.addr, &tmp2.path().join("jobs"), &["--include", "*000", "--job", "million-kill", "--walkers", "1"]);
    let half = (matched_expected / 2).max(1) as usize;
    let at_half = || relay2.count("PUT", "/manifests/v1") >= half;
    let k1 = run_replicate(&args2, Watch { kill_when: Some(&at_half), ..Default::default() }, Duration::from_secs(600));
    std::thread::sleep(Duration::from_millis(300));
    let finished1 = finished_tags(&relay2);
    let uploaded1 = uploads(&relay2);
    let boundary = src.seq();
    let pages_run1: Vec<(u64, Option<String>, Option<String>)> = src.catalog_pages();
    println!(
        "pass 2a : {} after {:.2} s; {} tags finished (201) at the kill, {} blobs uploaded, {} catalog pages listed, VmHWM {}",
        if k1.killed { "kill -9".to_string() } else { format!("NOT KILLED (exit {:?})", k1.code) },
        k1.wall,
        finished1.len(),
        uploaded1.len(),
        pages_run1.len(),
        mib(k1.hwm_kib)
    );
    relay2.reset();
    let mut rargs = args2.clone();
    rargs.push("--resume".into());
    let k2 = run_replicate(&rargs, Watch::default(), Duration::from_secs(600));
    let finished2 = finished_tags(&relay2);
    let uploaded2 = uploads(&relay2);
    let by_repo2 = uploads_by_repo(&relay2);
    let pages_run2: Vec<(u64, Option<String>, Option<String>)> = src.catalog_pages().into_iter().filter(|p| p.0 >= boundary).collect();
    println!(
        "pass 2b : --resume exit {:?}, wall {:.2} s, {} tags PUT (201), {} blobs uploaded, {} catalog pages listed, VmHWM {}; summary {}",
        k2.code,
        k2.wall,
        finished2.len(),
        uploaded2.len(),
        pages_run2.len(),
        mib(k2.hwm_kib),
        k2.summary()
    );
    if !k2.ok() {
        println!("          RESUME FAILED\n{}", k2.describe());
    }
    // Pages listed in both runs (same `last`).
    let lasts1: HashSet<Option<String>> = pages_run1.iter().map(|p| p.1.clone()).collect();
    let twice: Vec<Option<String>> = pages_run2.iter().filter(|p| lasts1.contains(&p.1)).map(|p| p.1.clone()).collect();
    // Stricter: pages of run 2 whose every repository (in this catalog: the one matched repository) was finished in run 1.
    let mut finished_pages_again = Vec::new();
    for (_, last, n) in &pages_run2 {
        let n: u64 = n.as_deref().and_then(|n| n.parse().ok()).unwrap_or(100);
        let (start, end) = src.page_range(last.as_deref(), n);
        let matched: Vec<String> = (start..end).map(|i| src.name(i)).filter(|s| s.ends_with("000")).collect();
        if !matched.is_empty() && matched.iter().all(|m| finished1.contains(m)) {
            finished_pages_again.push(last.clone());
        }
    }
    // Artifacts copied twice.
    let mut all = uploaded1.clone();
    for (k, v) in &uploaded2 {
        *all.entry(k.clone()).or_default() += v;
    }
    let blobs_twice = all.values().filter(|c| **c > 1).count();
    let retagged: Vec<&String> = finished2.iter().filter(|r| finished1.contains(*r)).collect();
    let reuploaded_repos: Vec<&String> = by_repo2.keys().filter(|r| finished1.contains(*r)).collect();
    let finished_copied_twice: BTreeSet<&String> = retagged.iter().chain(reuploaded_repos.iter()).copied().collect();
    let union: BTreeSet<&String> = finished1.iter().chain(finished2.iter()).collect();
    let (v2_ok, v2_total) = rt.block_on(verify_synthetic(&format!("http://{}", dst2.addr), &src));
    // Repositories before run 2's first catalog page that run 2 touched: the ones run 1 left unfinished, re-queued.
    let first_start = pages_run2.first().map(|p| src.page_range(p.1.as_deref(), 1000).0).unwrap_or(0);
    let requeued: BTreeSet<String> = relay2
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/manifests/v1"))
        .filter_map(|r| r.path.strip_prefix("/v2/")?.strip_suffix("/manifests/v1").map(str::to_string))
        .filter(|repo| src.index_of(repo).is_some_and(|i| i < first_start))
        .collect();
    let requeued_finished = requeued.iter().filter(|r| finished1.contains(*r)).count();
    let resume_first_page = pages_run2.first().map(|p| p.1.clone());
    println!(
        "resume  : run 2 started its walk after {:?} (run 1 listed up to {:?}); {} page(s) listed in both runs {:?}; \
         {} page(s) of finished repositories listed again {:?}",
        resume_first_page.flatten(),
        pages_run1.last().and_then(|p| p.1.clone()),
        twice.len(),
        twice,
        finished_pages_again.len(),
        finished_pages_again
    );
    println!(
        "          blobs uploaded more than once over both runs: {blobs_twice} (of {} distinct); tags finished in run 1 that run 2 \
         copied again (tag PUT or blob upload): {} {:?}; union of tags PUT with 201 {} of {matched_expected}",
        all.len(),
        finished_copied_twice.len(),
        finished_copied_twice.iter().take(5).collect::<Vec<_>>(),
        union.len()
    );
    println!(
        "          run 2 re-queued {} repositories from before its first page ({} of them had a 201 tag PUT in run 1, costing a HEAD); \
         destination check: {v2_ok}/{v2_total} matched repositories serve v1 with the source's digest",
        requeued.len(),
        requeued_finished
    );

    // Table.
    lines.push(format!("(a) {count} repositories, synthetic source, --include '*000' ({matched_expected} matched), destination breakwater (behind the relay); replicate --walkers 1, other defaults (--concurrency 8, --page-size 1000)"));
    lines.push("| run | wall | first manifest GET at source | first artifact at destination (tag PUT 201) | peak RSS (VmHWM) | CPU | pages | copied |".into());
    lines.push("|---|---|---|---|---|---|---|---|".into());
    lines.push(format!(
        "| pass 1, start to end | {:.2} s | {} | {} | {} | {:.2} s | {} | {} |",
        p1.wall,
        secs(p1.first_src_get),
        secs(p1.first_dst_put),
        mib(p1.hwm_kib),
        p1.cpu,
        pages1,
        p1.n("copied")
    ));
    lines.push(format!(
        "| pass 2, until kill -9 | {:.2} s | - | - | {} | {:.2} s | {} | {} tags finished |",
        k1.wall,
        mib(k1.hwm_kib),
        k1.cpu,
        pages_run1.len(),
        finished1.len()
    ));
    lines.push(format!(
        "| pass 2, --resume | {:.2} s | - | - | {} | {:.2} s | {} | {} (summary, cumulative: {}) |",
        k2.wall,
        mib(k2.hwm_kib),
        k2.cpu,
        pages_run2.len(),
        finished2.len(),
        k2.n("copied")
    ));
    lines.push(format!(
        "resume: catalog pages listed in both runs: {} ({} of them pages whose repositories run 1 had finished); blobs uploaded twice: {blobs_twice}; \
         finished tags copied again: {}; unfinished repositories re-queued by --resume: {}; destination afterwards: {v2_ok}/{v2_total} tags with the source's digest (pass 1: {v1_ok}/{v1_total})",
        twice.len(),
        finished_pages_again.len(),
        finished_copied_twice.len(),
        requeued.len()
    ));
    let first_ok = p1.first_dst_put.is_some_and(|t| t <= 2.0);
    let hwm = p1.hwm_kib.max(k1.hwm_kib).max(k2.hwm_kib);
    let rss_ok = hwm.is_some_and(|h| (h as f64) * 1024.0 < 100.0 * 1024.0 * 1024.0);
    lines.push(format!(
        "target first artifact within 2 s: {} ({}); peak RSS under 100 MB: {} ({} max over the three runs); \
         <= 1 page listed twice: {} ({}); no finished artifact copied twice: {} ({})",
        verdict(first_ok),
        secs(p1.first_dst_put),
        verdict(rss_ok),
        mib(hwm),
        verdict(twice.len() <= 1),
        twice.len(),
        verdict(finished_copied_twice.is_empty() && blobs_twice == 0),
        finished_copied_twice.len()
    ));
    lines.push(String::new());
    lines
}

// ---------------------------------------------------------------------------------------------------------------
// (c) Partitioned walks.

fn part_c(count: u64, delay_ms: u64, walkers: &[usize]) -> Vec<String> {
    println!();
    println!("== (c) listing a {count}-repository catalog whose pages take {delay_ms} ms, walkers {walkers:?} ==");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dst = common::Breakwater::start_logged(&[], "breakwater=warn", &tmp.path().join("dst.log"));
    let most = walkers.iter().copied().max().unwrap_or(1);
    let mut cases: Vec<(&str, u64, usize)> = walkers.iter().map(|&w| ("flat", 0, w)).collect();
    cases.push(("one prefix", 1, most));
    let mut lines = vec![
        format!("(c) {count} repositories (synthetic source), every catalog page {delay_ms} ms, pages of 1000, nothing matched (the walk alone)"),
        "| names | walkers | wall | × 1 walker | peak RSS (VmHWM) | CPU | catalog requests | repos seen | load before |".into(),
        "|---|---|---|---|---|---|---|---|---|".into(),
    ];
    let mut one_walker = None;
    for (shape, namespaces, w) in cases {
        let src = Synthetic::start_with(Options { count, namespaces, unique_images: false, layer_size: 64 });
        src.delay_on("GET /v2/_catalog", Duration::from_millis(delay_ms));
        let load = loadavg();
        let jobs = tmp.path().join(format!("jobs-{shape}-{w}"));
        let ws = w.to_string();
        let args = replicate_args(&src.addr, &dst.addr, &jobs, &["--include", "no-such-repository", "--walkers", &ws, "--job", "walk"]);
        let r = run_replicate(&args, Watch::default(), Duration::from_secs(1800));
        let requests = src.catalog_pages().len();
        if w == 1 && shape == "flat" {
            one_walker = Some(r.wall);
        }
        let speedup = one_walker.map_or("-".to_string(), |t| format!("{:.1}x", t / r.wall));
        println!(
            "{shape}, {w} walker(s): exit {:?}, wall {:.2} s ({speedup}), VmHWM {}, CPU {:.2} s, {requests} catalog requests, summary {} (load before {load})",
            r.code,
            r.wall,
            mib(r.hwm_kib),
            r.cpu,
            r.summary()
        );
        if !r.ok() {
            println!("WALK FAILED\n{}", r.describe());
        }
        lines.push(format!(
            "| {shape} | {w} | {:.2} s | {speedup} | {} | {:.2} s | {requests} | {} | {load} |",
            r.wall,
            mib(r.hwm_kib),
            r.cpu,
            r.n("repos_seen")
        ));
    }
    lines.push(String::new());
    lines
}

fn part_d(rt: &tokio::runtime::Runtime, count: u64, delay_ms: u64) -> Vec<String> {
    println!();
    println!("== (d) distributed replication: {count} repositories, every source request {delay_ms} ms, 1 and 3 workers ==");
    let mut lines = vec![
        format!("(d) {count} repositories (synthetic source, one image each), every source request {delay_ms} ms, job state in PostgreSQL, each process --concurrency 8 --walkers 2 (8 units)"),
        format!("destination: {}", std::env::var("BENCH_DIST_DEST").unwrap_or_else(|_| "breakwater".into())),
        "| workers | wall | repos/s | × 1 worker | workers' CPU | destination CPU | destination catalog | exits | load before |".into(),
        "|---|---|---|---|---|---|---|---|---|".into(),
    ];
    let mut one = None;
    for workers in [1usize, 3] {
        let tmp = tempfile::tempdir().expect("tempdir");
        // The destination: a breakwater (SQLite metadata), or with `BENCH_DIST_DEST=registry` a docker-registry, to
        // tell the workers' pace from the destination's ingest.
        let (bw, reg);
        let (dst_addr, dst_pid) = if std::env::var("BENCH_DIST_DEST").as_deref() == Ok("registry") {
            reg = common::Distribution::start();
            (reg.addr.clone(), registry_pid(&reg))
        } else {
            bw = common::Breakwater::start_logged(&[], "breakwater=warn", &tmp.path().join("dst.log"));
            (bw.addr.clone(), bw.pid())
        };
        let dst_cpu0 = cpu_seconds(dst_pid);
        // 300 two-letter namespaces: units are cut before listing, and names under one prefix would all be one unit.
        let src = Synthetic::start_with(Options { count, namespaces: 300, unique_images: true, layer_size: 512 });
        src.delay_on("GET /v2/", Duration::from_millis(delay_ms));
        let pg = rt.block_on(common::pg::PgDatabase::create());
        let load = loadavg();
        let args = |cmd: &str, extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = [cmd, "--from", &format!("http://{}", src.addr), "--to", &format!("http://{dst_addr}")]
                .iter()
                .map(|s| s.to_string())
                .collect();
            v.extend(["--metadata", &pg.url, "--job", "dist", "--concurrency", "8", "--walkers", "2"].iter().map(|s| s.to_string()));
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let cpu0 = children_cpu();
        let t0 = Instant::now();
        let mut runs = vec![args("replicate", &["--distributed"])];
        runs.extend((1..workers).map(|_| args("worker", &[])));
        let handles: Vec<_> = runs
            .into_iter()
            .map(|a| std::thread::spawn(move || run_replicate(&a, Watch::default(), Duration::from_secs(1800))))
            .collect();
        let done: Vec<Run> = handles.into_iter().map(|h| h.join().expect("worker thread")).collect();
        let wall = t0.elapsed().as_secs_f64();
        let cpu = children_cpu() - cpu0;
        let dst_cpu = cpu_seconds(dst_pid) - dst_cpu0;
        let copied = rt.block_on(catalog_count(&format!("http://{dst_addr}")));
        let exits: Vec<String> = done.iter().map(|r| format!("{:?}", r.code)).collect();
        if workers == 1 {
            one = Some(wall);
        }
        let speedup = one.map_or("-".to_string(), |t| format!("{:.2}x", t / wall));
        println!(
            "{workers} worker(s): wall {wall:.2} s ({:.0} repos/s, {speedup}), CPU {cpu:.2} s (destination {dst_cpu:.2} s), destination catalog {copied}/{count}, exits {exits:?} (load before {load})",
            count as f64 / wall
        );
        for r in done.iter().filter(|r| r.code != Some(0)) {
            println!("A WORKER FAILED\n{}", r.describe());
        }
        lines.push(format!(
            "| {workers} | {wall:.2} s | {:.0} | {speedup} | {cpu:.2} s | {dst_cpu:.2} s | {copied}/{count} | {} | {load} |",
            count as f64 / wall,
            exits.join(" ")
        ));
    }
    lines.push(String::new());
    lines
}

/// HEADs `v1` of every matched (`*000`) repository of the synthetic source at the destination: (right digest, total).
async fn verify_synthetic(base: &str, src: &Synthetic) -> (usize, usize) {
    let c = client();
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut set = tokio::task::JoinSet::new();
    for k in 0..src.count() / 1000 {
        let i = k * 1000;
        let (c, url, want, sem) = (c.clone(), format!("{base}/v2/{}/manifests/v1", src.name(i)), src.image(i).digest, sem.clone());
        set.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let r = c.head(url).header("accept", OCI_MANIFEST).send().await.ok()?;
            (r.status().as_u16() == 200 && r.headers().get("docker-content-digest")?.to_str().ok()? == want).then_some(())
        });
    }
    let (mut ok, mut total) = (0, 0);
    while let Some(r) = set.join_next().await {
        total += 1;
        ok += usize::from(r.ok().flatten().is_some());
    }
    (ok, total)
}

// ---------------------------------------------------------------------------------------------------------------
// (b) 2,000 repositories between real registries.

#[derive(Clone)]
struct Img {
    repo: String,
    config: Bytes,
    config_digest: String,
    layer: Bytes,
    layer_digest: String,
    manifest: Bytes,
    digest: String,
}

fn make_images(n: usize) -> Vec<Img> {
    (0..n)
        .map(|i| {
            let seed = 700_000 + i as u64;
            let config = format!(
                r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[]}},"seed":{seed}}}"#
            )
            .into_bytes();
            let layer = gzip_stored(&pseudo_random(1024 + (i % 512), seed));
            let (config_digest, layer_digest) = (sha256(&config), sha256(&layer));
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
                config.len(),
                layer.len()
            )
            .into_bytes();
            let digest = sha256(&manifest);
            Img {
                repo: format!("bulk/r{i:05}"),
                config: Bytes::from(config),
                config_digest,
                layer: Bytes::from(layer),
                layer_digest,
                manifest: Bytes::from(manifest),
                digest,
            }
        })
        .collect()
}

/// A valid gzip stream of `data` in stored (uncompressed) deflate blocks: layers look compressed to clients, so
/// skopeo copies them as they are instead of compressing them (which would change their digests).
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
        *t = c;
    }
    let crc = !data.iter().fold(!0u32, |c, b| table[((c ^ *b as u32) & 0xff) as usize] ^ (c >> 8));
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(65_535).collect() };
    for (i, chunk) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build().expect("client")
}

async fn push_blob(c: &reqwest::Client, base: &str, repo: &str, bytes: &Bytes, digest: &str) -> Result<(), String> {
    let r = c.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.map_err(|e| e.to_string())?;
    if r.status().as_u16() != 202 {
        return Err(format!("POST upload {repo}: {}", r.status()));
    }
    let loc = r.headers().get("location").and_then(|v| v.to_str().ok()).ok_or("no Location")?.to_string();
    let loc = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status().as_u16() != 201 {
        return Err(format!("PUT upload {repo}: {}", r.status()));
    }
    Ok(())
}

async fn push_image(c: &reqwest::Client, base: &str, img: &Img) -> Result<(), String> {
    push_blob(c, base, &img.repo, &img.config, &img.config_digest).await?;
    push_blob(c, base, &img.repo, &img.layer, &img.layer_digest).await?;
    support::put_manifest(c, base, &img.repo, "v1", img.manifest.clone()).await
}

/// Pushes every image with `width` tasks pulling from a shared index; returns the errors.
async fn push_all(base: &str, imgs: Arc<Vec<Img>>, width: usize) -> Vec<String> {
    let c = client();
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..width {
        let (c, base, imgs, next) = (c.clone(), base.to_string(), imgs.clone(), next.clone());
        set.spawn(async move {
            let mut errors = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(img) = imgs.get(i) else { break };
                if let Err(e) = push_image(&c, &base, img).await {
                    errors.push(e);
                }
            }
            errors
        });
    }
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        errors.extend(r.expect("join"));
    }
    errors
}

/// Repositories in a registry's catalog (following `Link`).
async fn catalog_count(base: &str) -> usize {
    let c = client();
    let mut next = Some("/v2/_catalog?n=1000".to_string());
    let mut n = 0;
    while let Some(path) = next.take() {
        let Ok(r) = c.get(format!("{base}{path}")).send().await else { break };
        let link = r.headers().get("link").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body: Value = r.bytes().await.ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
        n += body["repositories"].as_array().map_or(0, |a| a.len());
        next = link.and_then(|l| Some(l.split_once('<')?.1.split_once('>')?.0.to_string()));
    }
    n
}

/// How many of `imgs` (every `step`-th) the registry serves under `v1` with the source's digest.
async fn check_sample(base: &str, imgs: &[Img], step: usize) -> (usize, usize) {
    let c = client();
    let (mut ok, mut total) = (0, 0);
    for img in imgs.iter().step_by(step) {
        total += 1;
        let r = c
            .head(format!("{base}/v2/{}/manifests/v1", img.repo))
            .header("accept", format!("{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"))
            .send()
            .await;
        if let Ok(r) = r {
            if r.status().as_u16() == 200
                && r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) == Some(img.digest.as_str())
            {
                ok += 1;
            }
        }
    }
    (ok, total)
}

struct Row {
    method: String,
    repos: usize,
    wall: f64,
    /// The time for all `total` repositories, when extrapolated.
    extrapolated: Option<f64>,
    rate: f64,
    rss: Option<u64>,
    tool_cpu: f64,
    src_cpu: f64,
    dst_cpu: f64,
    check: String,
    load: String,
}

fn part_b(rt: &tokio::runtime::Runtime, bulk: usize, skopeo_n: usize, ceilings: &[usize]) -> Vec<String> {
    println!();
    println!("== (b) {bulk} repositories, docker-registry → fresh docker-registry ==");
    let src = common::Distribution::start();
    let src_base = format!("http://{}", src.addr);
    let src_pid = registry_pid(&src);
    let imgs = Arc::new(make_images(bulk));
    let t = Instant::now();
    let errors = rt.block_on(push_all(&src_base, imgs.clone(), 16));
    assert!(errors.is_empty(), "set-up pushes failed: {:?}", &errors[..errors.len().min(5)]);
    let n_src = rt.block_on(catalog_count(&src_base));
    println!("set-up  : {bulk} repositories pushed to the source in {:.1} s (16 at a time; not timed below); source catalog {n_src}", t.elapsed().as_secs_f64());
    assert_eq!(n_src, bulk, "source catalog");
    let step = (bulk / 50).max(1);
    let mut rows: Vec<Row> = Vec::new();
    let mix = request_mix(rt, &src, &imgs);
    println!("{mix}");

    // 1. breakwater replicate.
    for conc in [None, Some(16usize)] {
        wait_quiet();
        let load = loadavg();
        let dst = common::Distribution::start();
        let dst_base = format!("http://{}", dst.addr);
        let dst_pid = registry_pid(&dst);
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = conc.map(|c| c.to_string());
        let mut extra: Vec<&str> = vec!["--job", "bulk"];
        if let Some(c) = &c {
            extra.extend(["--concurrency", c.as_str()]);
        }
        let args = replicate_args(&src.addr, &dst.addr, &tmp.path().join("jobs"), &extra);
        let (s0, d0) = (cpu_seconds(src_pid), cpu_seconds(dst_pid));
        let r = run_replicate(&args, Watch::default(), Duration::from_secs(600));
        let (s1, d1) = (cpu_seconds(src_pid), cpu_seconds(dst_pid));
        let n = rt.block_on(catalog_count(&dst_base));
        let (ok, total) = rt.block_on(check_sample(&dst_base, &imgs, step));
        let method = match conc {
            None => "breakwater replicate (default --concurrency 8)".to_string(),
            Some(c) => format!("breakwater replicate --concurrency {c}"),
        };
        println!(
            "{method}: exit {:?}, {:.2} s, copied {} failed {}, destination catalog {n}, sample digests {ok}/{total}, VmHWM {}, CPU replicate {:.2} s / source registry {:.2} s / destination registry {:.2} s (load {load})",
            r.code,
            r.wall,
            r.n("copied"),
            r.n("failed"),
            mib(r.hwm_kib),
            r.cpu,
            s1 - s0,
            d1 - d0
        );
        if !r.ok() {
            println!("REPLICATE FAILED\n{}", r.describe());
        }
        rows.push(Row {
            method,
            repos: bulk,
            wall: r.wall,
            extrapolated: None,
            rate: bulk as f64 / r.wall,
            rss: r.hwm_kib,
            tool_cpu: r.cpu,
            src_cpu: s1 - s0,
            dst_cpu: d1 - d0,
            check: format!("{}copied {}, catalog {n}, digests {ok}/{total}", if r.ok() { "" } else { "FAILED; " }, r.n("copied")),
            load,
        });
    }

    // 2. A sequential skopeo loop.
    {
        wait_quiet();
        let load = loadavg();
        let dst = common::Distribution::start();
        let dst_base = format!("http://{}", dst.addr);
        let dst_pid = registry_pid(&dst);
        let tmp = tempfile::tempdir().expect("tempdir");
        let version = Command::new("skopeo").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
        let (s0, d0, c0) = (cpu_seconds(src_pid), cpu_seconds(dst_pid), children_cpu());
        let t = Instant::now();
        let mut failures = 0;
        for img in imgs.iter().take(skopeo_n) {
            let out = Command::new("skopeo")
                .args(["--insecure-policy", "--tmpdir"])
                .arg(tmp.path())
                .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
                .arg(format!("docker://{}/{}:v1", src.addr, img.repo))
                .arg(format!("docker://{}/{}:v1", dst.addr, img.repo))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .expect("run skopeo");
            if !out.status.success() {
                failures += 1;
                if failures <= 3 {
                    println!("skopeo failed for {}: {}", img.repo, String::from_utf8_lossy(&out.stderr).trim());
                }
            }
        }
        let wall = t.elapsed().as_secs_f64();
        let (s1, d1, c1) = (cpu_seconds(src_pid), cpu_seconds(dst_pid), children_cpu());
        let n = rt.block_on(catalog_count(&dst_base));
        let (ok, total) = rt.block_on(check_sample(&dst_base, &imgs[..skopeo_n], (skopeo_n / 20).max(1)));
        let method = format!("skopeo copy loop, sequential ({version})");
        println!(
            "{method}: {skopeo_n} repositories in {wall:.2} s ({} failed), destination catalog {n}, sample digests {ok}/{total}, CPU skopeo {:.2} s / source {:.2} s / destination {:.2} s (load {load})",
            failures,
            c1 - c0,
            s1 - s0,
            d1 - d0
        );
        rows.push(Row {
            method,
            repos: skopeo_n,
            wall,
            extrapolated: (skopeo_n < bulk).then(|| wall * bulk as f64 / skopeo_n as f64),
            rate: skopeo_n as f64 / wall,
            rss: None,
            tool_cpu: c1 - c0,
            src_cpu: s1 - s0,
            dst_cpu: d1 - d0,
            check: format!("{failures} failed, catalog {n}, digests {ok}/{total}"),
            load,
        });
    }

    // 3. The destination's ceiling: pushes straight from memory.
    for &width in ceilings {
        wait_quiet();
        let load = loadavg();
        let dst = common::Distribution::start();
        let dst_base = format!("http://{}", dst.addr);
        let dst_pid = registry_pid(&dst);
        let d0 = cpu_seconds(dst_pid);
        let c0 = self_cpu();
        let t = Instant::now();
        let errors = rt.block_on(push_all(&dst_base, imgs.clone(), width));
        let wall = t.elapsed().as_secs_f64();
        let (d1, c1) = (cpu_seconds(dst_pid), self_cpu());
        let n = rt.block_on(catalog_count(&dst_base));
        let (ok, total) = rt.block_on(check_sample(&dst_base, &imgs, step));
        let method = format!("ceiling: {width} tokio tasks pushing from memory");
        println!(
            "{method}: {:.2} s, {} errors, destination catalog {n}, sample digests {ok}/{total}, CPU pusher {:.2} s / destination {:.2} s (load {load})",
            wall,
            errors.len(),
            c1 - c0,
            d1 - d0
        );
        rows.push(Row {
            method,
            repos: bulk,
            wall,
            extrapolated: None,
            rate: bulk as f64 / wall,
            rss: None,
            tool_cpu: c1 - c0,
            src_cpu: 0.0,
            dst_cpu: d1 - d0,
            check: format!("{} errors, catalog {n}, digests {ok}/{total}", errors.len()),
            load,
        });
    }

    // Table.
    let ceiling = rows.iter().filter(|r| r.method.starts_with("ceiling")).map(|r| r.rate).fold(f64::NAN, f64::max);
    let skopeo = rows.iter().find(|r| r.method.starts_with("skopeo")).map(|r| r.rate).unwrap_or(f64::NAN);
    let mut lines = vec![
        mix,
        format!("(b) {bulk} repositories (one tag, OCI image: config + 1-1.5 KiB gzip layer, all distinct), docker-registry 2.8.2 → a fresh docker-registry per method"),
        "| method | repos | wall | time for all | repos/s | × ceiling | × skopeo loop | peak RSS | CPU s: tool / source reg. / dest. reg. | load | check |".into(),
        "|---|---|---|---|---|---|---|---|---|---|---|".into(),
    ];
    for r in &rows {
        lines.push(format!(
            "| {} | {} | {:.2} s | {} | {:.1} | {:.2} | {:.2} | {} | {:.1} / {:.1} / {:.1} | {} | {} |",
            r.method,
            r.repos,
            r.wall,
            match r.extrapolated {
                Some(e) => format!("{e:.0} s (extrapolated from {})", r.repos),
                None => format!("{:.2} s", r.wall),
            },
            r.rate,
            r.rate / ceiling,
            r.rate / skopeo,
            mib(r.rss),
            r.tool_cpu,
            r.src_cpu,
            r.dst_cpu,
            r.load,
            r.check
        ));
    }
    let best_bw = rows.iter().filter(|r| r.method.starts_with("breakwater")).map(|r| r.rate).fold(f64::NAN, f64::max);
    let default_bw = rows.iter().find(|r| r.method.contains("default")).map(|r| r.rate).unwrap_or(f64::NAN);
    lines.push(format!(
        "ceiling = best of the pushers, {ceiling:.1} repos/s. target ≥ 0.8x ceiling: default {} ({:.2}x), best {} ({:.2}x); ~4x the skopeo loop: default {:.1}x, best {:.1}x",
        verdict(default_bw / ceiling >= 0.8),
        default_bw / ceiling,
        verdict(best_bw / ceiling >= 0.8),
        best_bw / ceiling,
        default_bw / skopeo,
        best_bw / skopeo
    ));
    lines
}

/// Requests a relay saw, per repository, by kind: `"METHOD kind" → count / repos`, and the total.
fn per_repo(relay: &Relay, repos: usize) -> (f64, String) {
    let kind = |path: &str| -> &'static str {
        let p = path.split('?').next().unwrap_or("");
        if p == "/v2/" || p == "/v2" {
            "/v2/"
        } else if p.starts_with("/v2/_catalog") {
            "catalog"
        } else if p.ends_with("/tags/list") {
            "tags/list"
        } else if p.contains("/blobs/uploads") {
            "blob upload"
        } else if p.contains("/blobs/") {
            "blob"
        } else if p.contains("/manifests/") {
            "manifest"
        } else {
            "other"
        }
    };
    let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let reqs = relay.requests();
    for q in &reqs {
        *counts.entry(format!("{} {}", q.method, kind(&q.path))).or_default() += 1;
    }
    let list: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {:.2}", *v as f64 / repos as f64)).collect();
    (reqs.len() as f64 / repos as f64, list.join(", "))
}

/// What `replicate` asks of each registry per repository (untimed): 50 of the repositories copied with counting
/// relays in front of the source and of a fresh destination (a `docker-registry`, then a breakwater), against the
/// direct pusher of the ceiling pushing the same 50 from memory to a fresh `docker-registry` through a relay.
fn request_mix(rt: &tokio::runtime::Runtime, src: &common::Distribution, imgs: &Arc<Vec<Img>>) -> String {
    const PROBE: usize = 50;
    if imgs.len() < PROBE {
        return String::new();
    }
    let mut out = format!("request mix (untimed probe: {PROBE} repositories through counting relays), requests per repository:");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dist = common::Distribution::start();
    let bw = common::Breakwater::start_logged(&[], "breakwater=warn", &tmp.path().join("bw.log"));
    for (what, addr) in [("docker-registry", &dist.addr), ("breakwater", &bw.addr)] {
        let (rs, rd) = (Relay::start(&src.addr), Relay::start(addr));
        let args = replicate_args(&rs.addr, &rd.addr, &tmp.path().join(format!("jobs-{what}")), &["--include", "bulk/r000[0-4]?", "--job", "mix"]);
        let r = run_replicate(&args, Watch::default(), Duration::from_secs(120));
        out.push_str(&format!("\n  breakwater replicate into {what} (exit {:?}, copied {}):", r.code, r.n("copied")));
        for (side, relay) in [("source", &rs), ("destination", &rd)] {
            let (total, list) = per_repo(relay, PROBE);
            out.push_str(&format!("\n    {side}: {total:.2} in all ({list}); {} connections", relay.connections()));
        }
    }
    let pushed = common::Distribution::start();
    let rp = Relay::start(&pushed.addr);
    let first: Arc<Vec<Img>> = Arc::new(imgs.iter().take(PROBE).map(Img::clone).collect());
    let errors = rt.block_on(push_all(&format!("http://{}", rp.addr), first, 8));
    let (total, list) = per_repo(&rp, PROBE);
    out.push_str(&format!(
        "\n  the direct pusher (the ceiling's, 8 tasks) into docker-registry ({} errors):\n    destination: {total:.2} in all ({list}); {} connections",
        errors.len(),
        rp.connections()
    ));
    out
}

fn registry_pid(d: &common::Distribution) -> u32 {
    find_pid_by_cmdline(&d.dir.path().join("config.yml").display().to_string()).expect("docker-registry pid")
}

/// Waits (at most 60 s) for the 1-minute load to drop under 1.5 before a timed case; the table shows the load.
fn wait_quiet() {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let l: f64 = loadavg().split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
        if l < 1.5 {
            return;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers.

fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

fn secs(t: Option<f64>) -> String {
    t.map_or("never".into(), |t| format!("{t:.3} s"))
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1} MB", k as f64 * 1024.0 / 1e6))
}

/// utime + stime of this process's waited-for children, in seconds.
fn children_cpu() -> f64 {
    let f = stat_fields("/proc/self/stat").unwrap_or_default();
    let t = |i: usize| f.get(i - 3).copied().unwrap_or(0);
    (t(16) + t(17)) as f64 / CLK_TCK
}

/// utime + stime of this process, in seconds.
fn self_cpu() -> f64 {
    let f = stat_fields("/proc/self/stat").unwrap_or_default();
    let t = |i: usize| f.get(i - 3).copied().unwrap_or(0);
    (t(14) + t(15)) as f64 / CLK_TCK
}

//! Helpers shared by the benchmark programs (`benches/*.rs`), one copy each: describing the machine and the source
//! tree, reading a process's memory and CPU time from /proc, percentiles, environment knobs, and the pieces of a
//! streaming blob client. Included with `#[path = "support/mod.rs"] mod support;`; Cargo does not build this
//! directory as a bench of its own (it only discovers top-level files in `benches/`, and Cargo.toml lists the
//! benches explicitly).
//!
//! Each bench uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::time::Instant;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

/// Clock ticks per second of the times in `/proc/*/stat` and `/proc/stat` (USER_HZ, 100 on Linux).
pub const CLK_TCK: f64 = 100.0;

// ---------------------------------------------------------------------------------------------------------------
// Describing the run: every bench prints the machine, and the long ones the load and the source tree, so that a
// result can be judged (and compared) later.

/// `N logical CPUs, MODEL, kernel X, MEM RAM`, the `machine :` line every bench prints first.
pub fn machine() -> String {
    format!("{} logical CPUs, {}, kernel {}, {}", nproc(), cpu_model(), kernel(), mem_total())
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_else(|| "unknown CPU".into())
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or("?".into(), |s| s.trim().to_string())
}

pub fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("MemTotal:").map(|r| r.trim().to_string())))
        .map_or("? RAM".into(), |m| format!("{m} RAM"))
}

/// The 1, 5 and 15 minute load averages, space-separated: other work on the machine disturbs a run.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The commit the binary was built from, and whether `src/` differs from it (the bench runs the working tree).
pub fn source_state() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown commit".into());
    match git(&["status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"]) {
        Some(s) if s.is_empty() => format!("commit {head}, src/ clean"),
        Some(s) => format!("commit {head} plus uncommitted changes: {}", s.lines().map(str::trim).collect::<Vec<_>>().join("; ")),
        None => format!("commit {head}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Environment knobs.

/// The variable `name` parsed as a `T`; `default` when unset or blank; panics on anything unparsable, so that a
/// typo does not silently measure the default.
pub fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(s) if !s.trim().is_empty() => s.trim().parse().unwrap_or_else(|_| panic!("{name}: cannot parse {s:?}")),
        _ => default,
    }
}

/// The variable `name` as a comma-separated list of integers (`default` when unset; empty items skipped); panics
/// on anything else.
pub fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap_or_else(|e| panic!("{name}: comma-separated integers: {e:?}")))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Processes: memory and CPU time from /proc, so that the registries under test are measured from outside, the
// same way whatever they are written in.

/// A `kB` field of `/proc/PID/status` (`VmHWM`, `VmRSS`, ...), in KiB; `None` if the process or the field is gone.
pub fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// A peak RSS in KiB as MiB with one decimal, `n/a` when it could not be read.
pub fn mib_or_na(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (`echo 5 > /proc/PID/clear_refs`), so that the next
/// VmHWM read covers only what follows.
pub fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The numeric fields of a `/proc/.../stat` file from field 3 (state, the first after the `)` that closes comm,
/// which may itself hold spaces) on; fields that do not parse as numbers (the state letter) become 0. `None` if the
/// file cannot be read.
pub fn stat_fields(path: &str) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')').map_or(0, |i| i + 1)..];
    Some(rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect())
}

/// utime + stime of the process (all threads), in seconds; NaN if the process is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Some(f) = stat_fields(&format!("/proc/{pid}/stat")) else { return f64::NAN };
    // Field 3 is f[0]: utime is field 14, stime 15.
    let ticks = |i: usize| f.get(i - 3).copied().unwrap_or(0);
    (ticks(14) + ticks(15)) as f64 / CLK_TCK
}

/// Busy CPU seconds of the whole machine since boot (all CPUs; user, nice, system, irq, softirq, steal): what the
/// processes a bench measures did not use of it is other work disturbing the run.
pub fn machine_busy_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else { return f64::NAN };
    let Some(line) = s.lines().next().and_then(|l| l.strip_prefix("cpu ")) else { return f64::NAN };
    let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Fields: user nice system idle iowait irq softirq steal ...
    let busy = [0usize, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum::<u64>();
    busy as f64 / CLK_TCK
}

/// The machine's count of connections refused by a full listen queue since boot (`ListenOverflows` of
/// `/proc/net/netstat`; every TCP listener of the machine). A refused connection's client retransmits its SYN a
/// second later, then three: a run whose count moved has first bytes that late for reasons of the backlog, not of
/// the server's scheduling.
pub fn listen_overflows() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/net/netstat") else { return 0 };
    let mut lines = s.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    names.split_whitespace().zip(values.split_whitespace()).find(|(n, _)| *n == "ListenOverflows").and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
}

/// The pid of the process (other than this one) whose command line contains `needle` (used for docker-registry,
/// whose config path is unique to its temporary directory, since `common::Distribution` does not expose the pid).
pub fn find_pid_by_cmdline(needle: &str) -> Option<u32> {
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            return Some(pid);
        }
    }
    None
}

/// The processes whose parent is `pid` (nginx's workers under its master).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        // Field 4 (the parent's pid) is the second after the state.
        .filter(|&p| stat_fields(&format!("/proc/{p}/stat")).and_then(|f| f.get(1).copied()) == Some(u64::from(pid)))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Statistics.

/// Nearest-rank percentile (sorts `v`); NaN for no values. With up to 100 values p99 is the largest.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

// ---------------------------------------------------------------------------------------------------------------
// Blobs: pushing one, and the parts of a client that streams one and checks it.

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Pushes `blob` to `base`'s repository `repo` in one piece: POST to open an upload session, then a monolithic
/// `PUT <location>&digest=...` with the whole body (a relative Location is resolved against `base`).
pub async fn push_monolithic(client: &reqwest::Client, base: &str, repo: &str, blob: Bytes, digest: &str) -> Result<(), String> {
    let resp = client.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.map_err(|e| e.to_string())?;
    if resp.status().as_u16() != 202 {
        return Err(format!("POST uploads: status {}", resp.status()));
    }
    let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).ok_or("POST uploads: no Location")?.to_string();
    let mut put = if location.starts_with("http://") || location.starts_with("https://") { location } else { format!("{base}{location}") };
    put.push(if put.contains('?') { '&' } else { '?' });
    put.push_str("digest=");
    put.push_str(digest);
    let len = blob.len();
    let resp = client
        .put(put)
        .header("content-type", "application/octet-stream")
        .header("content-length", len)
        .body(blob)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().as_u16() != 201 {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("PUT upload: status {status}: {text}"));
    }
    Ok(())
}

/// PUTs manifest `bytes` (an OCI image manifest) as `repo:reference` on `base`; anything but 201 is an error.
pub async fn put_manifest(client: &reqwest::Client, base: &str, repo: &str, reference: &str, bytes: Bytes) -> Result<(), String> {
    let r = client
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(bytes)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status().as_u16() != 201 {
        let status = r.status();
        return Err(format!("PUT manifest {repo}:{reference}: {status} {}", r.text().await.unwrap_or_default()));
    }
    Ok(())
}

/// Awaits the clients' tasks in order; one that panicked or was cancelled becomes `failed("task: <why>")`, called
/// when it is found, so that the failure's time can be taken then.
pub async fn join_clients<T>(tasks: Vec<tokio::task::JoinHandle<T>>, failed: impl Fn(String) -> T) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| failed(format!("task: {e}"))));
    }
    out
}

/// A sha256 of a body computed on its own (blocking) thread, fed the refcounted, uncopied chunks through a bounded
/// channel, so that hashing does not serialize with reading the socket. Drop the sender after the last chunk, then
/// await the handle for the hex digest.
pub fn spawn_hasher() -> (tokio::sync::mpsc::Sender<Bytes>, tokio::task::JoinHandle<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let h = tokio::task::spawn_blocking(move || {
        let mut h = Sha256::new();
        while let Some(c) = rx.blocking_recv() {
            h.update(&c);
        }
        hex(&h.finalize())
    });
    (tx, h)
}

/// Reads `resp`'s body to its end without keeping it: notes the seconds from `t0` to the first body byte in
/// `ttfb`, counts the bytes in `bytes`, hands every chunk to `tx` (a hasher) if given, and checks that the body had
/// `size` bytes.
pub async fn read_body(
    resp: &mut reqwest::Response,
    size: u64,
    t0: Instant,
    ttfb: &mut Option<f64>,
    bytes: &mut u64,
    tx: Option<&tokio::sync::mpsc::Sender<Bytes>>,
) -> Result<(), String> {
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("body: {e}"))? {
        if ttfb.is_none() && !chunk.is_empty() {
            *ttfb = Some(t0.elapsed().as_secs_f64());
        }
        *bytes += chunk.len() as u64;
        if let Some(tx) = tx {
            tx.send(chunk).await.map_err(|_| "hasher thread died".to_string())?;
        }
    }
    if *bytes != size {
        return Err(format!("body {} bytes, expected {size}", *bytes));
    }
    Ok(())
}

/// Waits for the hasher, if any, and, when the client has no error yet, makes a digest other than `want`
/// (`sha256:<hex>`) its error. Called after the body's last byte, outside the measured time.
pub async fn check_digest(hasher: Option<tokio::task::JoinHandle<String>>, want: Option<&String>, error: &mut Option<String>) {
    let hashed = match hasher {
        Some(h) => Some(h.await.expect("hasher task")),
        None => None,
    };
    if let (None, Some(got), Some(want)) = (&*error, hashed, want) {
        if format!("sha256:{got}") != *want {
            *error = Some(format!("body sha256 sha256:{got}, expected {want}"));
        }
    }
}

/// Requests per second `wrk` (Debian's package) measured against `url` with `-t2`, `connections` keep-alive
/// connections for `secs`, sending `headers` (`Name: value`); a run with a non-2xx answer or a socket error is
/// refused, so a figure is never one of errors served fast.
pub fn wrk(url: &str, headers: &[String], connections: usize, secs: u64) -> f64 {
    let mut cmd = std::process::Command::new("wrk");
    cmd.args(["-t2", &format!("-c{connections}"), &format!("-d{secs}s"), "--latency"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    assert!(!text.contains("Non-2xx"), "non-2xx answers from {url}:\n{text}");
    assert!(!text.contains("Socket errors"), "socket errors against {url}:\n{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{text}"))
}

// ---------------------------------------------------------------------------------------------------------------
// h2load (Debian's nghttp2-client), the client for the 800-connection herd: one C process, so that the
// clients cost the machine far less CPU than as many reqwest tasks would.

/// What `h2load --h1 -c N -n N URL` reported: counts, bytes, and its time statistics (seconds).
#[derive(Debug, Clone, Default)]
pub struct H2load {
    pub wall: f64,
    pub succeeded: u64,
    pub failed: u64,
    /// Body bytes received, all requests together.
    pub data_bytes: u64,
    /// Time to first byte, from the start of each client's connect: min, max, mean, sd.
    pub ttfb: [f64; 4],
    /// Time for a whole request (to its last byte): min, max, mean, sd.
    pub request: [f64; 4],
    pub connect: [f64; 4],
}

/// Runs h2load with `n` HTTP/1.1 connections, one GET of `url` each, on `threads` client threads.
pub fn h2load(url: &str, n: usize, threads: usize) -> Result<H2load, String> {
    let out = std::process::Command::new("h2load")
        .args(["--h1", "-c", &n.to_string(), "-n", &n.to_string(), "-t", &threads.to_string(), "-T", "300", url])
        .output()
        .map_err(|e| format!("running h2load: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("h2load exited with {}: {text}{}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    parse_h2load(&text).ok_or_else(|| format!("unparsable h2load output: {text}"))
}

/// A duration as h2load prints it (`812us`, `1.27ms`, `3.05s`), in seconds.
fn h2load_secs(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else {
        (s.strip_suffix('s')?, 1.0)
    };
    Some(num.parse::<f64>().ok()? * scale)
}

fn parse_h2load(text: &str) -> Option<H2load> {
    let mut r = H2load::default();
    let stats = |line: &str| -> Option<[f64; 4]> {
        let v: Vec<f64> = line.split(':').nth(1)?.split_whitespace().take(4).map(h2load_secs).collect::<Option<_>>()?;
        v.try_into().ok()
    };
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            r.wall = h2load_secs(rest.split(',').next()?.trim())?;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(',').map(str::trim) {
                let (num, what) = part.split_once(' ')?;
                match what {
                    "succeeded" => r.succeeded = num.parse().ok()?,
                    "failed" => r.failed = num.parse().ok()?,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("traffic: ") {
            // `..., 15.62GB (16000000000) data`: the exact count is in parentheses before "data".
            let data = rest.rsplit(',').next()?;
            r.data_bytes = data.split_once('(')?.1.split_once(')')?.0.parse().ok()?;
        } else if line.starts_with("time to 1st byte:") {
            r.ttfb = stats(line)?;
        } else if line.starts_with("time for request:") {
            r.request = stats(line)?;
        } else if line.starts_with("time for connect:") {
            r.connect = stats(line)?;
        }
    }
    Some(r)
}

//! Garbage collection (issue 12): a store of `BENCH_GC_IMAGES` images (default 10,000: one config and 9 layers
//! each, so 100,000 blobs and 10,000 manifests) of which 90% are deleted, collected by breakwater online (`breakwater
//! gc` against a running server's stores, while a client keeps pushing) and by distribution 2.8.2 offline
//! (`docker-registry garbage-collect`, with its server stopped, as it requires), in the same run.
//!
//! Run with `cargo bench --bench gc`. Environment: `BENCH_GC_IMAGES` (default 10000), `BENCH_GC_REPOS` (images are
//! spread over this many repositories, default 100), `BENCH_GC_CONCURRENCY` (pushers while populating, default 32).
//!
//! Printed for each collector: wall time, CPU (user + system) and peak RSS of the collecting process (GNU time),
//! and what it removed (breakwater: its summary line; distribution: blob files before and after). For breakwater,
//! a pusher pushes new images one at a time (9 blob uploads and a manifest each) before and during the collection:
//! the latencies of its blob uploads (POST + PUT) and manifest PUTs, baseline against during, are what a push waits
//! on the collector. Afterwards every kept image is pulled from breakwater and checked (manifest and blob digests),
//! and so are the images pushed during the collection.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use common::oci::{pseudo_random, sha256, OCI_MANIFEST};
use support::{loadavg, machine, pct, source_state};

/// Blobs per image: a config and this many layers minus one.
const BLOBS: usize = 10;
const LAYER_BYTES: usize = 200;
/// Claims protect digests this long at least (`gc::CLAIM_HOLD`): the collection waits it out after the deletes.
const CLAIM_HOLD: Duration = Duration::from_secs(61);

struct Image {
    repo: String,
    tag: String,
    manifest: Bytes,
    digest: String,
    blobs: Vec<(String, Bytes)>,
}

fn image(n: usize, repos: usize, salt: u64) -> Image {
    let blobs: Vec<(String, Bytes)> = (0..BLOBS)
        .map(|j| {
            let b = Bytes::from(pseudo_random(LAYER_BYTES, salt + (n * BLOBS + j) as u64));
            (sha256(&b), b)
        })
        .collect();
    let layers: Vec<String> = blobs[1..]
        .iter()
        .map(|(d, b)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{}}}"#, b.len()))
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        blobs[0].0,
        blobs[0].1.len(),
        layers.join(",")
    );
    let manifest = Bytes::from(manifest);
    Image { repo: format!("bench/r{}", n % repos), tag: format!("v{n}"), digest: sha256(&manifest), manifest, blobs }
}

async fn push(client: &reqwest::Client, base: &str, img: &Image, lat: Option<&mut Latencies>) -> Result<(), String> {
    let mut lat = lat;
    for (d, b) in &img.blobs {
        let t = Instant::now();
        support::push_monolithic(client, base, &img.repo, b.clone(), d).await?;
        if let Some(l) = lat.as_deref_mut() {
            l.blob.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let t = Instant::now();
    support::put_manifest(client, base, &img.repo, &img.tag, img.manifest.clone()).await?;
    if let Some(l) = lat {
        l.manifest.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(())
}

async fn delete(client: &reqwest::Client, base: &str, img: &Image) -> Result<(), String> {
    let r = client.delete(format!("{base}/v2/{}/manifests/{}", img.repo, img.digest)).send().await.map_err(|e| e.to_string())?;
    if r.status().as_u16() != 202 {
        return Err(format!("manifest DELETE: {}", r.status()));
    }
    Ok(())
}

/// Runs `f` on every index of `images`, `concurrency` at a time; the first failure panics with its image.
async fn each(
    images: Arc<Vec<Image>>,
    concurrency: usize,
    f: impl Fn(reqwest::Client, Arc<Vec<Image>>, usize) -> tokio::task::JoinHandle<Result<(), String>>,
) {
    use futures_util::StreamExt;
    let client = reqwest::Client::new();
    let tasks = (0..images.len()).map(|i| {
        let handle = f(client.clone(), Arc::clone(&images), i);
        async move { (i, handle.await) }
    });
    let mut results = futures_util::stream::iter(tasks).buffer_unordered(concurrency);
    while let Some((i, r)) = results.next().await {
        r.expect("task").unwrap_or_else(|e| panic!("image {i}: {e}"));
    }
}

#[derive(Default)]
struct Latencies {
    blob: Vec<f64>,
    manifest: Vec<f64>,
}

impl Latencies {
    fn line(&mut self, what: &str) -> String {
        let f = |v: &mut Vec<f64>| {
            if v.is_empty() {
                return "n/a".to_string();
            }
            let max = v.iter().cloned().fold(0.0, f64::max);
            format!("p50 {:.1} / p99 {:.1} / max {:.1} ms (n={})", pct(v, 50.0), pct(v, 99.0), max, v.len())
        };
        format!("{what:<28} blob upload {}; manifest PUT {}", f(&mut self.blob), f(&mut self.manifest))
    }
}

/// `cmd` run under GNU time: (wall s, CPU s, peak RSS MiB, stdout).
fn timed(cmd: &mut std::process::Command) -> (f64, f64, f64, String) {
    let out = cmd.output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed: {stderr}");
    let line = stderr.lines().rev().find(|l| l.starts_with("TIME ")).expect("GNU time's line");
    let f: Vec<f64> = line[5..].split(' ').map(|x| x.parse().expect("number")).collect();
    (f[0], f[1] + f[2], f[3] / 1024.0, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn gnu_time() -> std::process::Command {
    let mut c = std::process::Command::new("/usr/bin/time");
    c.args(["-f", "TIME %e %U %S %M"]);
    c
}

fn count_files(dir: &Path, name: &str) -> usize {
    let mut n = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if e.file_name() == name {
                n += 1;
            }
        }
    }
    n
}

async fn verify(base: &str, img: &Image) -> Result<(), String> {
    let (status, body) = common::oci::get(&format!("{base}/v2/{}/manifests/{}", img.repo, img.tag)).await?;
    if status != 200 || sha256(&body) != img.digest {
        return Err(format!("{}:{} manifest: {status}", img.repo, img.tag));
    }
    for (d, _) in &img.blobs {
        let (status, body) = common::oci::get(&format!("{base}/v2/{}/blobs/{d}", img.repo)).await?;
        if status != 200 || &sha256(&body) != d {
            return Err(format!("{}:{} blob {d}: {status}", img.repo, img.tag));
        }
    }
    Ok(())
}

fn main() {
    let n: usize = support::env_parse("BENCH_GC_IMAGES", 10_000);
    let repos: usize = support::env_parse("BENCH_GC_REPOS", 100).max(1);
    let concurrency: usize = support::env_parse("BENCH_GC_CONCURRENCY", 32).max(1);
    println!("== gc: {n} images ({} blobs, {n} manifests) in {repos} repositories, 90% deleted ==", n * BLOBS);
    println!("machine : {}", machine());
    println!("source  : {}", source_state());
    println!("load    : {} (1, 5, 15 min) at the start", loadavg());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let images = Arc::new((0..n).map(|i| image(i, repos, 1)).collect::<Vec<_>>());
    let doomed = |i: usize| i % 10 != 0;

    let logs = tempfile::tempdir().expect("tempdir");
    let bw = common::Breakwater::start_logged(&[], "warn", &logs.path().join("breakwater.log"));
    let dist = common::Distribution::start();
    for (name, base) in [("breakwater", bw.url("")), ("distribution", dist.url(""))] {
        let t = Instant::now();
        let b = base.clone();
        rt.block_on(each(Arc::clone(&images), concurrency, move |c, imgs, i| {
            let b = b.clone();
            tokio::spawn(async move { push(&c, &b, &imgs[i], None).await })
        }));
        let pushed = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let b = base.clone();
        let gone = Arc::new(images.iter().enumerate().filter(|(i, _)| doomed(*i)).map(|(i, _)| i).collect::<Vec<_>>());
        let targets = Arc::new(gone.iter().map(|&i| image(i, repos, 1)).collect::<Vec<_>>());
        rt.block_on(each(targets, concurrency, move |c, imgs, i| {
            let b = b.clone();
            tokio::spawn(async move { delete(&c, &b, &imgs[i]).await })
        }));
        println!("{name:<13}: pushed in {pushed:.1}s, deleted {} manifests in {:.1}s", gone.len(), t.elapsed().as_secs_f64());
    }
    println!("waiting {}s: the pushes' claims protect their digests that long", CLAIM_HOLD.as_secs());
    std::thread::sleep(CLAIM_HOLD);

    // breakwater, online, with a pusher before and during.
    let base = bw.url("");
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (base, stop, during) = (base.clone(), Arc::clone(&stop), Arc::clone(&during));
        rt.spawn(async move {
            let client = reqwest::Client::new();
            let (mut before, mut while_gc, mut pushed) = (Latencies::default(), Latencies::default(), Vec::new());
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let img = image(1_000_000 + k, 7, 2);
                let lat = if during.load(Ordering::Relaxed) { &mut while_gc } else { &mut before };
                push(&client, &base, &img, Some(lat)).await.expect("push during the collection");
                pushed.push(img);
                k += 1;
            }
            (before, while_gc, pushed)
        })
    };
    std::thread::sleep(Duration::from_secs(10));
    during.store(true, Ordering::Relaxed);
    let data = bw.data.path().display().to_string();
    let (wall, cpu, rss, out) = timed(gnu_time().args([env!("CARGO_BIN_EXE_breakwater"), "gc", "--data", &data, "--grace-secs", "0"]));
    stop.store(true, Ordering::Relaxed);
    let (mut before, mut while_gc, pushed) = rt.block_on(pusher).expect("pusher");
    println!();
    println!("breakwater gc (online)       : {wall:.1}s, CPU {cpu:.1}s, peak RSS {rss:.1} MiB");
    println!("  {}", out.trim().replace('\n', "\n  "));
    println!("  {}", before.line("pushes before the collection"));
    println!("  {}", while_gc.line("pushes during the collection"));
    let kept: Vec<&Image> = images.iter().enumerate().filter(|(i, _)| !doomed(*i)).map(|(_, img)| img).collect();
    let failures: Vec<String> = rt.block_on(async {
        let mut f = Vec::new();
        for img in kept.iter().copied().chain(pushed.iter()) {
            if let Err(e) = verify(&base, img).await {
                f.push(e);
            }
        }
        f
    });
    println!("  verified {} kept and {} concurrently pushed images: {} failures {:?}", kept.len(), pushed.len(), failures.len(), failures.iter().take(3).collect::<Vec<_>>());

    // distribution, offline.
    let root = dist.dir.path();
    let before_blobs = count_files(&root.join("storage/docker/registry/v2/blobs"), "data");
    let config = root.join("config.yml");
    let pid = support::find_pid_by_cmdline(&config.display().to_string()).expect("docker-registry pid");
    let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    std::thread::sleep(Duration::from_millis(500));
    let (wall, cpu, rss, _) = timed(gnu_time().arg(common::registry_binary()).arg("garbage-collect").arg(&config));
    let after_blobs = count_files(&root.join("storage/docker/registry/v2/blobs"), "data");
    println!();
    println!("distribution garbage-collect (offline): {wall:.1}s, CPU {cpu:.1}s, peak RSS {rss:.1} MiB");
    println!("  blob files {before_blobs} -> {after_blobs}: removed {}", before_blobs - after_blobs);
    println!("load    : {} (1, 5, 15 min) at the end", loadavg());
}

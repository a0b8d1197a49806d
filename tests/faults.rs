//! The fault campaign: the store stays sound under broken upstreams and sudden deaths, counted, not timed.
//!
//! Each campaign breaks something many times (an upstream cut at a random byte, a corrupted byte from upstream,
//! `kill -9` of `serve` during pushes and during replication), and after each round checks the two things a
//! registry must never get wrong: every acknowledged push is readable with its digest, and `breakwater fsck`
//! finds a clean store in which every visible blob hashes to its name. The fault points come from a fixed
//! xorshift sequence, so a failing round can be replayed from the seed it prints.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::oci::{get, pseudo_random, push_blob, sha256, OCI_MANIFEST};
use common::relay::Relay;
use common::{Breakwater, Distribution};
use sha2::Digest as _;

/// A reproducible sequence of fault points.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Runs `breakwater fsck --data DIR` and asserts it reports a clean store.
fn assert_fsck_clean(data: &Path, round: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["fsck", "--data"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run breakwater fsck");
    assert!(
        out.status.success(),
        "{round}: fsck found problems ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Re-hashes every file under `content/blobs/<alg>/<hh>/<hex>` and asserts it matches its name; returns how many.
fn assert_blobs_hash_to_their_names(data: &Path, round: &str) -> usize {
    let root = data.join("content").join("blobs").join("sha256");
    let mut checked = 0;
    let Ok(prefixes) = std::fs::read_dir(&root) else { return 0 };
    for prefix in prefixes {
        for file in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(format!("{:x}", sha2::Sha256::digest(&bytes)), name, "{round}: {} holds other bytes", path.display());
            checked += 1;
        }
    }
    checked
}

/// An upstream registry behind a fault-injecting relay, and a breakwater caching it under `up`.
struct Cache {
    upstream: Distribution,
    relay: Relay,
    bw: Breakwater,
}

impl Cache {
    fn start() -> Cache {
        let upstream = Distribution::start();
        let relay = Relay::start(&upstream.addr);
        let spec = format!("up=http://{}", relay.addr);
        let bw = Breakwater::start_with(&["--upstream", &spec, "--upstream-timeout-secs", "30"]);
        Cache { upstream, relay, bw }
    }

    /// Pushes `rounds` blobs upstream, breaking each one's first download with `fault(relay, path, size, dice)`;
    /// every client either gets the blob's exact bytes or a broken body, and a second pull is always exact.
    async fn campaign(self, rounds: u64, seed: u64, fault: impl Fn(&Relay, &str, u64, &mut Dice)) {
        let mut dice = Dice(seed);
        let upstream = format!("http://{}", self.upstream.addr);
        for round in 0..rounds {
            let size = 100_000 + dice.below(400_000);
            let blob = pseudo_random(size as usize, seed + round);
            let digest = push_blob(&upstream, "team/app", &blob).await;
            fault(&self.relay, &format!("/blobs/{digest}"), size, &mut dice);
            let url = self.bw.url(&format!("/v2/up/team/app/blobs/{digest}"));
            let clients: Vec<_> = (0..3).map(|_| tokio::spawn(get_owned(url.clone()))).collect();
            for c in clients {
                match c.await.unwrap() {
                    Ok((200, body)) => assert_eq!(sha256(&body), digest, "round {round} (seed {seed}): wrong bytes served"),
                    Ok((status, _)) => assert!(status >= 500, "round {round}: unexpected status {status}"),
                    Err(_) => {} // the connection was cut: allowed, the client knows it has not got the blob
                }
            }
            self.relay.clear_faults();
            let (status, body) = get(&url).await.expect("second pull completes");
            assert_eq!(status, 200, "round {round}: second pull");
            assert_eq!(sha256(&body), digest, "round {round}: second pull bytes");
        }
        let data = self.bw.stop();
        assert!(assert_blobs_hash_to_their_names(data.path(), "cache campaign") >= rounds as usize);
        assert_fsck_clean(data.path(), "cache campaign");
    }
}

async fn get_owned(url: String) -> Result<(u16, Vec<u8>), String> {
    get(&url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cut_at_a_random_byte_twenty_times() {
    Cache::start()
        .campaign(20, 0x5eed_0001, |relay, path, size, dice| relay.cut_after(path, dice.below(size), 1))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_byte_from_upstream_twenty_times() {
    Cache::start()
        .campaign(20, 0x5eed_0002, |relay, path, size, dice| relay.corrupt(path, dice.below(size), 1))
        .await;
}

/// What a pusher had acknowledged (201 for its manifest) before the server died.
#[derive(Clone)]
struct Acked {
    repo: String,
    tag: String,
    manifest: String,
    blobs: Vec<(String, usize)>,
}

/// Pushes a blob in `chunk`-sized PATCHes (so a kill lands mid-upload), then commits it.
async fn push_chunked(client: &reqwest::Client, base: &str, repo: &str, bytes: &[u8], chunk: usize) -> Result<String, String> {
    let err = |e: reqwest::Error| e.to_string();
    let digest = sha256(bytes);
    let r = client.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.map_err(err)?;
    if r.status().as_u16() != 202 {
        return Err(format!("POST {}", r.status()));
    }
    let mut location = r.headers()["location"].to_str().unwrap().to_string();
    for (i, part) in bytes.chunks(chunk).enumerate() {
        let start = i * chunk;
        let r = client
            .patch(format!("{base}{location}"))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{start}-{}", start + part.len() - 1))
            .body(part.to_vec())
            .send()
            .await
            .map_err(err)?;
        if r.status().as_u16() != 202 {
            return Err(format!("PATCH {}", r.status()));
        }
        location = r.headers()["location"].to_str().unwrap().to_string();
    }
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = client.put(format!("{base}{location}{sep}digest={digest}")).send().await.map_err(err)?;
    if r.status().as_u16() != 201 {
        return Err(format!("PUT {}", r.status()));
    }
    Ok(digest)
}

/// One pusher: images with a config and two chunked layers, tag after tag, until the server dies.
async fn pusher(base: String, id: u64, seed: u64, acked: Arc<Mutex<Vec<Acked>>>) {
    let client = reqwest::Client::new();
    for n in 0.. {
        let repo = format!("kill/p{id}");
        let tag = format!("t{n}");
        let mut blobs = Vec::new();
        for (i, size) in [300_000usize, 700_000].into_iter().enumerate() {
            // Every third image shares its first layer with the other pushers: shared content under a kill.
            let layer_seed = if n % 3 == 0 && i == 0 { seed } else { seed * 1_000_003 + id * 10_007 + n * 31 + i as u64 };
            let layer = pseudo_random(size, layer_seed);
            match push_chunked(&client, &base, &repo, &layer, 64 * 1024).await {
                Ok(d) => blobs.push((d, size)),
                Err(_) => return,
            }
        }
        let config = format!(r#"{{"architecture":"amd64","os":"linux","pusher":{id},"n":{n},"seed":{seed}}}"#);
        let config_digest = sha256(config.as_bytes());
        if client
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={config_digest}"))
            .body(config.clone())
            .send()
            .await
            .map(|r| r.status().as_u16() != 201)
            .unwrap_or(true)
        {
            return;
        }
        let layers: Vec<String> = blobs
            .iter()
            .map(|(d, s)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{s}}}"#))
            .collect();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            layers.join(",")
        );
        let r = client
            .put(format!("{base}/v2/{repo}/manifests/{tag}"))
            .header("content-type", OCI_MANIFEST)
            .body(manifest.clone())
            .send()
            .await;
        if !matches!(r, Ok(ref r) if r.status().as_u16() == 201) {
            return;
        }
        blobs.push((config_digest, config.len()));
        acked.lock().unwrap().push(Acked { repo, tag, manifest: sha256(manifest.as_bytes()), blobs });
    }
}

fn kill9(bw: &Breakwater) {
    let status = Command::new("kill").args(["-9", &bw.pid().to_string()]).status().expect("kill -9");
    assert!(status.success());
}

/// Checks that everything acknowledged before a kill is served, byte for byte, by a restarted server.
async fn assert_acked_served(bw: &Breakwater, acked: &[Acked], round: &str) {
    let client = reqwest::Client::new();
    for a in acked {
        let r = client
            .get(bw.url(&format!("/v2/{}/manifests/{}", a.repo, a.tag)))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{round}: acknowledged {}:{} lost", a.repo, a.tag);
        assert_eq!(sha256(&r.bytes().await.unwrap()), a.manifest, "{round}: {}:{} manifest bytes", a.repo, a.tag);
        for (digest, size) in &a.blobs {
            let (status, body) = get(&bw.url(&format!("/v2/{}/blobs/{digest}", a.repo))).await.unwrap();
            assert_eq!(status, 200, "{round}: blob {digest} of {}:{} lost", a.repo, a.tag);
            assert_eq!((body.len(), sha256(&body)), (*size, digest.clone()), "{round}: blob {digest} bytes");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_during_pushes_twenty_times() {
    let mut dice = Dice(0x5eed_0003);
    let mut data = tempfile::tempdir().unwrap();
    let mut all_acked: Vec<Acked> = Vec::new();
    for round in 0..20u64 {
        let bw = Breakwater::start_in(data, &[]);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let pushers: Vec<_> =
            (0..3).map(|id| tokio::spawn(pusher(bw.url(""), id + 10 * round, 0x5eed_0003 + round, Arc::clone(&acked)))).collect();
        // Kill after a random number of acknowledged images (0: during the very first uploads), while the other
        // pushers are in the middle of their chunks.
        let kill_after = dice.below(4) as usize;
        for _ in 0..6000 {
            if acked.lock().unwrap().len() >= kill_after {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        kill9(&bw);
        for p in pushers {
            p.await.unwrap();
        }
        all_acked.extend(acked.lock().unwrap().iter().cloned());
        data = bw.stop();
        let round_name = format!("kill round {round}");
        let bw = Breakwater::start_in(data, &[]);
        assert_acked_served(&bw, &all_acked, &round_name).await;
        data = bw.stop();
        assert_blobs_hash_to_their_names(data.path(), &round_name);
        assert_fsck_clean(data.path(), &round_name);
    }
    assert!(all_acked.len() >= 10, "the campaign acknowledged only {} images", all_acked.len());
}

/// Starts `breakwater replicate` from `from` into `to` with job state in `jobs`.
fn replicate(from: &str, to: &str, jobs: &Path, resume: bool) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_breakwater"));
    cmd.args(["replicate", "--from", &format!("http://{from}"), "--to", &format!("http://{to}"), "--data"])
        .arg(jobs)
        .args(["--job", "faults", "--concurrency", "4"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    if resume {
        cmd.arg("--resume");
    }
    cmd.spawn().expect("run replicate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_of_the_destination_during_replication_five_times() {
    let src = Distribution::start();
    let src_url = format!("http://{}", src.addr);
    // 24 repositories of two layers each: enough that a kill lands in the middle of the copies.
    let mut expected = Vec::new();
    for r in 0..24u64 {
        let repo = format!("src/r{r:02}");
        let image = common::oci::push_image(&src_url, &repo, "v1", &[200_000, 50_000], 7_000 + r).await;
        expected.push((repo, image));
    }
    let jobs = tempfile::tempdir().unwrap();
    let mut dice = Dice(0x5eed_0004);
    let mut data = tempfile::tempdir().unwrap();
    for round in 0..5 {
        let bw = Breakwater::start_in(data, &[]);
        let mut run = replicate(&src.addr, &bw.addr, jobs.path(), round > 0);
        // Kill the destination once it has received a random number of blob uploads of this run.
        let target = (1 + dice.below(30)) as f64;
        for _ in 0..6000 {
            let uploads = common::oci::metric(&bw.url(""), "breakwater_http_requests_total", &["route=\"upload\""]).await;
            if uploads >= target || run.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        kill9(&bw);
        // The replicator dies too (kill -9 as well): the checkpoint must survive both.
        let _ = run.kill();
        let _ = run.wait();
        data = bw.stop();
        let round_name = format!("replication kill round {round}");
        assert_blobs_hash_to_their_names(data.path(), &round_name);
        assert_fsck_clean(data.path(), &round_name);
    }
    // A last, unbroken run finishes the job, and every repository arrived intact.
    let bw = Breakwater::start_in(data, &[]);
    let mut run = replicate(&src.addr, &bw.addr, jobs.path(), true);
    let status = tokio::task::spawn_blocking(move || run.wait().expect("wait for replicate")).await.unwrap();
    assert!(status.success(), "the resumed replication failed: {status}");
    for (repo, image) in &expected {
        let (status, body) = get(&bw.url(&format!("/v2/{repo}/manifests/v1"))).await.unwrap();
        assert_eq!(status, 200, "{repo}:v1 missing after resume");
        assert_eq!(sha256(&body), image.digest);
        for (digest, bytes) in image.layer_digests.iter().zip(&image.layers) {
            let (status, body) = get(&bw.url(&format!("/v2/{repo}/blobs/{digest}"))).await.unwrap();
            assert_eq!((status, body.len()), (200, bytes.len()), "{repo} blob {digest}");
            assert_eq!(&sha256(&body), digest);
        }
    }
    let data = bw.stop();
    assert_fsck_clean(data.path(), "after the final replication");
}

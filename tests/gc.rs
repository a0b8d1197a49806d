//! Garbage collection (`breakwater gc`, `POST /api/gc`) run as the real binary against stores filled by real
//! pushes (the HTTP API, skopeo), while the server keeps serving: what nothing refers to goes, every image that is
//! still tagged pulls whole, and a collection racing pushes never leaves a manifest without its blobs.
//!
//! The grace period is the default hour. Time passing is simulated the way fsck's tests do it: everything the store
//! recorded (links, manifests, claims, blob files) is moved an hour or two into the past (`age_store`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::images::{scratch, skopeo_copy};
use common::oci::{get, pseudo_random, push_blob, push_manifest, sha256, OCI_MANIFEST};
use common::Breakwater;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What one `breakwater gc` run printed.
struct Gc {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Gc {
    /// The number before `what` in the summary line (`removed 3 blobs`).
    fn count(&self, what: &str) -> u64 {
        let words: Vec<&str> = self.stdout.split_whitespace().collect();
        let i = words.iter().position(|w| *w == what).unwrap_or_else(|| panic!("no {what:?} in {}", self.stdout));
        words[i - 1].trim_start_matches('(').parse().unwrap_or_else(|_| panic!("no count before {what:?} in {}", self.stdout))
    }
}

fn gc_with_env(args: &[&str], env: &[(&str, String)]) -> Gc {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("gc")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .env_remove("BREAKWATER_UPSTREAMS")
        .output()
        .expect("run breakwater gc");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    eprintln!("+ breakwater gc {}\n{stdout}{stderr}", args.join(" "));
    Gc { code: out.status.code().expect("gc exited normally"), stdout, stderr }
}

fn gc(args: &[&str]) -> Gc {
    gc_with_env(args, &[])
}

fn blob_file(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data.join("content").join("blobs").join("sha256").join(&hex[..2]).join(hex)
}

/// Runs SQL statements on a metadata store (a running server shares it).
async fn sql(url: &str, statements: &[&str]) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.expect("open the metadata store");
    for s in statements {
        sqlx::query(s).execute(&pool).await.unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    pool.close().await;
}

/// Moves everything the store recorded `by` into the past: links, manifests and tags, claims, and the blob files'
/// modification times. What a store looks like after `by` of wall-clock time with no activity.
async fn age_store(data: &Path, by: Duration) {
    age_records(&breakwater::config::sqlite_url(data), by).await;
    age_files(&data.join("content").join("blobs"), by);
}

/// The metadata half of `age_store`, on any metadata store.
async fn age_records(url: &str, by: Duration) {
    let (s, ms) = (by.as_secs(), by.as_millis());
    sql(
        url,
        &[
            &format!("UPDATE blob_links SET created_at = created_at - {s}"),
            &format!("UPDATE manifests SET created_at = created_at - {s}"),
            &format!("UPDATE tags SET updated_at = updated_at - {s}"),
            &format!("UPDATE blob_state SET claimed_at = claimed_at - {ms}"),
        ],
    )
    .await;
}

/// Sets the modification time of every file under `dir` `by` into the past (s3s-fs reports a file's as its
/// object's `Last-Modified`).
fn age_files(dir: &Path, by: Duration) {
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                let f = std::fs::File::options().write(true).open(&p).unwrap();
                f.set_modified(SystemTime::now() - by).unwrap();
            }
        }
    }
}

/// An image pushed over the HTTP API from the given layers.
struct Pushed {
    digest: String,
    config: String,
    layers: Vec<String>,
}

fn image_manifest(config_digest: &str, config_len: usize, layers: &[(String, usize)]) -> Vec<u8> {
    let layers: Vec<String> = layers
        .iter()
        .map(|(d, n)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{n}}}"#))
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_len}}},"layers":[{}]}}"#,
        layers.join(",")
    )
    .into_bytes()
}

async fn push_layers(base: &str, repo: &str, reference: &str, layers: &[&[u8]], seed: u64) -> Pushed {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"seed":{seed}}}"#).into_bytes();
    let config_digest = push_blob(base, repo, &config).await;
    let mut descs = Vec::new();
    for l in layers {
        descs.push((push_blob(base, repo, l).await, l.len()));
    }
    let manifest = image_manifest(&config_digest, config.len(), &descs);
    let digest = push_manifest(base, repo, reference, OCI_MANIFEST, &manifest).await;
    Pushed { digest, config: config_digest, layers: descs.into_iter().map(|(d, _)| d).collect() }
}

async fn delete(url: &str) -> u16 {
    reqwest::Client::new().delete(url).send().await.unwrap().status().as_u16()
}

fn fsck_clean(data: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["fsck", "--data"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .env_remove("BREAKWATER_UPSTREAMS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "fsck finds the store clean:\n{stdout}");
    assert!(stdout.contains("clean"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_image_goes_and_the_layer_it_shared_stays() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    let data = bw.data.path().to_path_buf();
    let data_arg = data.display().to_string();
    let shared = pseudo_random(300_000, 1);
    let (only_a, only_b) = (pseudo_random(200_000, 2), pseudo_random(100_000, 3));
    let a = push_layers(&base, "team/a", "v1", &[&shared, &only_a], 10).await;
    let b = push_layers(&base, "team/b", "v1", &[&shared, &only_b], 11).await;
    assert_eq!(a.layers[0], b.layers[0]);

    assert_eq!(delete(&bw.url(&format!("/v2/team/a/manifests/{}", a.digest))).await, 202);
    age_store(&data, Duration::from_secs(2 * 3600)).await;
    let gone = [a.digest.clone(), a.config.clone(), a.layers[1].clone()];

    // A dry run reports what would go and removes nothing.
    let dry = gc(&["--data", &data_arg, "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(dry.stdout.contains("would remove 3 blobs"), "{}", dry.stdout);
    let bytes = std::fs::metadata(blob_file(&data, &a.layers[1])).unwrap().len()
        + std::fs::metadata(blob_file(&data, &a.config)).unwrap().len()
        + std::fs::metadata(blob_file(&data, &a.digest)).unwrap().len();
    assert_eq!(dry.count("bytes)"), bytes);
    for d in &gone {
        assert!(blob_file(&data, d).exists(), "a dry run removed {d}");
    }

    // The real thing, while the server runs: A's own blobs and manifest bytes go, the shared layer stays.
    let run = gc(&["--data", &data_arg]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.count("blobs;"), 7, "A's four blobs and B's three examined: {}", run.stdout);
    assert!(run.stdout.contains("removed 3 blobs"), "{}", run.stdout);
    for d in &gone {
        assert!(!blob_file(&data, d).exists(), "{d} was collected");
    }
    for d in [&b.digest, &b.config, &b.layers[0], &b.layers[1]] {
        assert!(blob_file(&data, d).exists(), "{d} is B's");
    }
    let (status, _) = get(&bw.url(&format!("/v2/team/a/blobs/{}", a.layers[1]))).await.unwrap();
    assert_eq!(status, 404, "A's link to its layer went with the bytes");

    // B pulls whole with a real client, which verifies every digest (the `dir:` transport keeps each blob as it
    // came, named by its digest).
    let tmp = scratch();
    let dir = tmp.path().join("b");
    skopeo_copy(tmp.path(), &[], &format!("docker://{}/team/b:v1", bw.addr), &format!("dir:{}", dir.display()));
    for d in [&b.config, &b.layers[0], &b.layers[1]] {
        let hex = d.strip_prefix("sha256:").unwrap();
        assert_eq!(sha256(&std::fs::read(dir.join(hex)).unwrap_or_else(|e| panic!("skopeo got no {d}: {e}"))), *d);
    }
    fsck_clean(&data);

    // A second collection finds nothing more.
    let again = gc(&["--data", &data_arg]);
    assert!(again.stdout.contains("removed 0 blobs"), "{}", again.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_pushes_and_claims_are_left_alone() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    let data = bw.data.path().to_path_buf();
    let data_arg = data.display().to_string();
    // A layer pushed without a manifest yet (a push in progress), and an unreferenced one pushed an hour ago.
    let young = push_blob(&base, "team/app", &pseudo_random(50_000, 20)).await;
    let old = push_blob(&base, "team/app", &pseudo_random(50_000, 21)).await;
    sql(
        &breakwater::config::sqlite_url(&data),
        &[
            &format!("UPDATE blob_links SET created_at = created_at - 7200 WHERE digest = '{old}'"),
            &format!("UPDATE blob_state SET claimed_at = claimed_at - 7200000 WHERE digest = '{old}'"),
        ],
    )
    .await;
    let f = std::fs::File::options().write(true).open(blob_file(&data, &old)).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(7200)).unwrap();

    // Even with no grace period at all, a digest claimed within the last minute is not collected (a second on,
    // its link and its file are as stale as the old one's; only the claim protects it).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let run = gc(&["--data", &data_arg, "--grace-secs", "0"]);
    assert!(run.stdout.contains("removed 1 blobs"), "{}", run.stdout);
    assert!(!blob_file(&data, &old).exists());
    assert!(blob_file(&data, &young).exists(), "the young push is in progress");
    let (status, body) = get(&bw.url(&format!("/v2/team/app/blobs/{young}"))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, young.clone()));
}

/// A client that pushes an image the way docker and skopeo do, skipping the blobs a HEAD says the repository has,
/// while a collector may be removing exactly those: a push refused because a blob went (`MANIFEST_BLOB_UNKNOWN`,
/// or an upload's commit answering that its bytes went) is pushed again, as a client would. Returns the manifest
/// digest and the attempts it took.
async fn push_until_stored(
    client: reqwest::Client,
    base: String,
    (repo, tag): (String, String),
    layers: Vec<Vec<u8>>,
    seed: u64,
    heads_done: Arc<std::sync::atomic::AtomicUsize>,
) -> (String, u32) {
    let config = format!(r#"{{"os":"linux","architecture":"amd64","seed":{seed}}}"#).into_bytes();
    let descs: Vec<(String, usize)> = std::iter::once(&config).chain(layers.iter()).map(|b| (sha256(b), b.len())).collect();
    let manifest = image_manifest(&descs[0].0, descs[0].1, &descs[1..]);
    'attempt: for attempt in 1..=20u32 {
        for bytes in std::iter::once(&config).chain(layers.iter()) {
            let digest = sha256(bytes);
            let head = client.head(format!("{base}/v2/{repo}/blobs/{digest}")).send().await.unwrap();
            if head.status().as_u16() == 200 {
                continue;
            }
            let r = client.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 202);
            let location = r.headers()["location"].to_str().unwrap().to_string();
            let location = if location.starts_with('/') { format!("{base}{location}") } else { location };
            let sep = if location.contains('?') { '&' } else { '?' };
            let r = client.put(format!("{location}{sep}digest={digest}")).body(bytes.clone()).send().await.unwrap();
            match r.status().as_u16() {
                201 => {}
                400 | 503 => continue 'attempt,
                s => panic!("blob PUT answered {s}: {}", r.text().await.unwrap_or_default()),
            }
        }
        heads_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = client
            .put(format!("{base}/v2/{repo}/manifests/{tag}"))
            .header("content-type", OCI_MANIFEST)
            .body(manifest.clone())
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            201 => return (sha256(&manifest), attempt),
            400 => {
                let text = r.text().await.unwrap_or_default();
                assert!(text.contains("MANIFEST_BLOB_UNKNOWN"), "{text}");
            }
            503 => {}
            s => panic!("manifest PUT answered {s}"),
        }
    }
    panic!("{repo}:{tag} could not be pushed in 20 attempts");
}

/// Runs `breakwater gc` over and over until `stop` is set (at least once); returns the runs and how many of them
/// removed something.
fn collect_until(
    stop: Arc<std::sync::atomic::AtomicBool>,
    data_arg: String,
    start_after: (Arc<std::sync::atomic::AtomicUsize>, usize),
) -> std::thread::JoinHandle<(u32, u32)> {
    std::thread::spawn(move || {
        // Started once pushes are under way: some have checked their blobs and not yet pushed their manifest.
        while start_after.0.load(std::sync::atomic::Ordering::SeqCst) < start_after.1 && !stop.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (mut runs, mut removing) = (0, 0);
        while runs == 0 || !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let r = gc(&["--data", &data_arg]);
            assert_eq!(r.code, 0, "{}", r.stderr);
            removing += u32::from(!r.stdout.contains("removed 0 blobs"));
            runs += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        (runs, removing)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_racing_a_hundred_pushes_never_leaves_a_manifest_without_its_blobs() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    let data = bw.data.path().to_path_buf();
    let data_arg = data.display().to_string();
    // 150 layers pushed without a manifest: garbage once old, until the racing pushes below, into the same
    // repository, find them there (HEAD) and refer to them.
    let layers: Vec<Vec<u8>> = (0..150).map(|i| pseudo_random(2_000 + i * 10, 100 + i as u64)).collect();
    for l in &layers {
        push_blob(&base, "race/app", l).await;
    }
    let mut previous: Vec<(String, String, String)> = Vec::new();
    for round in 0..2u64 {
        // Last round's images go: their layers are garbage again once the store has aged.
        for (repo, _, digest) in previous.drain(..) {
            assert_eq!(delete(&bw.url(&format!("/v2/{repo}/manifests/{digest}"))).await, 202);
        }
        age_store(&data, Duration::from_secs(2 * 3600)).await;

        // Collections one after another, as fast as they go, while 100 pushes reuse those layers.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heads_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let collector = collect_until(Arc::clone(&stop), data_arg.clone(), (Arc::clone(&heads_done), 20));
        let client = reqwest::Client::new();
        let mut pushes = Vec::new();
        for i in 0..100u64 {
            let chosen: Vec<Vec<u8>> = (0..3).map(|k| layers[((i * 7 + k * 31 + round * 11) % 150) as usize].clone()).collect();
            let name = ("race/app".to_string(), format!("round{round}-{i}"));
            let push = push_until_stored(client.clone(), base.clone(), name, chosen, round * 1000 + i, Arc::clone(&heads_done));
            pushes.push(tokio::spawn(push));
        }
        let mut retried = 0;
        for (i, p) in pushes.into_iter().enumerate() {
            let (digest, attempts) = p.await.unwrap();
            retried += u32::from(attempts > 1);
            previous.push(("race/app".to_string(), format!("round{round}-{i}"), digest));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (runs, removing) = tokio::task::spawn_blocking(move || collector.join().unwrap()).await.unwrap();
        eprintln!("round {round}: {runs} collections ({removing} removed something) raced 100 pushes; {retried} pushes were retried");

        // Every image pushed this round pulls whole, and every stored manifest's blobs exist.
        for (repo, tag, digest) in &previous {
            let (status, manifest) = get(&bw.url(&format!("/v2/{repo}/manifests/{tag}"))).await.unwrap();
            assert_eq!((status, sha256(&manifest)), (200, digest.clone()), "{repo}:{tag}");
            let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
            let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
            blobs.extend(m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()));
            for d in blobs {
                let (status, body) = get(&bw.url(&format!("/v2/{repo}/blobs/{d}"))).await.unwrap();
                assert_eq!((status, sha256(&body)), (200, d.clone()), "{repo}:{tag} blob {d}");
            }
        }
        fsck_clean(&data);
    }
}

/// An index pushed by tag over two children pushed by digest, each child with one layer.
struct Index {
    digest: String,
    children: Vec<Pushed>,
}

async fn push_index(base: &str, repo: &str, tag: &str, seed: u64) -> Index {
    let mut children = Vec::new();
    let mut descs = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let layer = pseudo_random(10_000, seed * 10 + i as u64);
        let child = push_layers(base, repo, "placeholder", &[&layer], seed * 10 + i as u64).await;
        // Pushed by tag to get it stored, then untagged: only the index names it.
        assert_eq!(delete(&format!("{base}/v2/{repo}/manifests/placeholder")).await, 202);
        let size = get(&format!("{base}/v2/{repo}/manifests/{}", child.digest)).await.unwrap().1.len();
        descs.push(format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{size},"platform":{{"os":"linux","architecture":"{arch}"}}}}"#,
            child.digest
        ));
        children.push(child);
    }
    let index = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#, descs.join(",")).into_bytes();
    let digest = push_manifest(base, repo, tag, OCI_INDEX, &index).await;
    Index { digest, children }
}

/// A referrer (an artifact manifest whose subject is `subject`), pushed by digest.
async fn push_referrer(base: &str, repo: &str, subject: &str, seed: u64) -> String {
    let subject_len = get(&format!("{base}/v2/{repo}/manifests/{subject}")).await.unwrap().1.len();
    let empty = push_blob(base, repo, b"{}").await;
    let sig = pseudo_random(500, seed);
    let sig_digest = push_blob(base, repo, &sig).await;
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/vnd.example.sig","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty}","size":2}},"layers":[{{"mediaType":"application/vnd.example.sig","digest":"{sig_digest}","size":{}}}],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":{subject_len}}}}}"#,
        sig.len()
    )
    .into_bytes();
    push_manifest(base, repo, &sha256(&m), OCI_MANIFEST, &m).await
}

async fn manifest_status(bw: &Breakwater, repo: &str, digest: &str) -> u16 {
    get(&bw.url(&format!("/v2/{repo}/manifests/{digest}"))).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untagged_manifests_go_by_policy_but_index_children_and_live_referrers_stay() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    let data = bw.data.path().to_path_buf();
    let data_arg = data.display().to_string();
    let index = push_index(&base, "multi/app", "v1", 3).await;
    let child = &index.children[0];
    let live_sig = push_referrer(&base, "multi/app", &child.digest, 70).await;
    // An untagged image with a referrer: both go (the referrer with its subject).
    let lone = push_layers(&base, "multi/app", "lone", &[&pseudo_random(8_000, 71)], 71).await;
    let lone_sig = push_referrer(&base, "multi/app", &lone.digest, 72).await;
    assert_eq!(delete(&bw.url("/v2/multi/app/manifests/lone")).await, 202, "untag, keep the manifest");
    age_store(&data, Duration::from_secs(2 * 3600)).await;

    // Without the policy nothing that is a manifest goes.
    let plain = gc(&["--data", &data_arg]);
    assert!(plain.stdout.contains("and 0 untagged manifests"), "{}", plain.stdout);
    assert_eq!(manifest_status(&bw, "multi/app", &lone.digest).await, 200);

    let run = gc(&["--data", &data_arg, "--delete-untagged"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("and 2 untagged manifests"), "{}", run.stdout);
    for d in [&lone.digest, &lone_sig] {
        assert_eq!(manifest_status(&bw, "multi/app", d).await, 404, "{d} was removed");
    }
    assert!(!blob_file(&data, &lone.layers[0]).exists(), "the untagged image's layer went with it");
    for d in [&index.digest, &index.children[0].digest, &index.children[1].digest, &live_sig] {
        assert_eq!(manifest_status(&bw, "multi/app", d).await, 200, "{d} stays");
    }
    for c in &index.children {
        assert!(blob_file(&data, &c.layers[0]).exists());
    }
    fsck_clean(&data);

    // Untagging the index lets it, its children and the children's referrer go, in one collection.
    assert_eq!(delete(&bw.url("/v2/multi/app/manifests/v1")).await, 202);
    age_store(&data, Duration::from_secs(2 * 3600)).await;
    let run = gc(&["--data", &data_arg, "--delete-untagged"]);
    assert!(run.stdout.contains("and 4 untagged manifests"), "{}", run.stdout);
    for d in [&index.digest, &index.children[0].digest, &index.children[1].digest, &live_sig] {
        assert_eq!(manifest_status(&bw, "multi/app", d).await, 404, "{d} went");
    }
    for c in &index.children {
        assert!(!blob_file(&data, &c.layers[0]).exists());
    }
    fsck_clean(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_stored_before_references_were_kept_are_read_first() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    let data = bw.data.path().to_path_buf();
    let data_arg = data.display().to_string();
    let kept = push_layers(&base, "old/app", "v1", &[&pseudo_random(30_000, 80)], 80).await;
    // What a store migrated from before garbage collection looks like: no references recorded.
    sql(&breakwater::config::sqlite_url(&data), &["DELETE FROM manifest_refs", "UPDATE manifests SET refs_indexed = 0"]).await;
    age_store(&data, Duration::from_secs(2 * 3600)).await;
    let run = gc(&["--data", &data_arg]);
    assert!(run.stdout.contains("removed 0 blobs"), "{}", run.stdout);
    assert!(run.stdout.contains("read the references of 1 older manifests"), "{}", run.stdout);
    for d in [&kept.config, &kept.layers[0], &kept.digest] {
        assert!(blob_file(&data, d).exists());
    }
    // Recorded now: deleting the image lets its blobs go.
    assert_eq!(delete(&bw.url(&format!("/v2/old/app/manifests/{}", kept.digest))).await, 202);
    let run = gc(&["--data", &data_arg]);
    assert!(run.stdout.contains("removed 3 blobs"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_stopped_halfway_is_finished_by_the_next_and_holds_pushes_off_meanwhile() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    let data = bw.data.path().to_path_buf();
    let data_arg = data.display().to_string();
    let layer = pseudo_random(40_000, 90);
    let p = push_layers(&base, "half/app", "v1", &[&layer], 90).await;
    assert_eq!(delete(&bw.url(&format!("/v2/half/app/manifests/{}", p.digest))).await, 202);
    age_store(&data, Duration::from_secs(2 * 3600)).await;
    // What a collector killed between its mark and the removal leaves: the mark, the links gone, the bytes there.
    let d = &p.layers[0];
    sql(
        &breakwater::config::sqlite_url(&data),
        &[&format!("UPDATE blob_state SET deleting = 1 WHERE digest = '{d}'"), &format!("DELETE FROM blob_links WHERE digest = '{d}'")],
    )
    .await;
    // A push of that layer meanwhile waits for the removal to end: it must not link bytes about to go.
    let client = reqwest::Client::new();
    let push = {
        let (client, base, layer, d) = (client.clone(), base.clone(), layer.clone(), d.clone());
        tokio::spawn(async move {
            let r = client.post(format!("{base}/v2/half/app/blobs/uploads/?digest={d}")).body(layer).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!push.is_finished(), "the push waits while the digest is marked");
    let run = gc(&["--data", &data_arg]);
    assert!(run.stdout.contains("finished 1 removals"), "{}", run.stdout);
    assert!(!blob_file(&data, d).exists());
    // It then finds the bytes it was about to rely on gone (its upload was discarded as a duplicate), and says so.
    let (status, body) = push.await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("BLOB_UPLOAD_INVALID") && body.contains("garbage-collected"), "{body}");
    // Pushed again, the layer is stored anew.
    let again = push_blob(&base, "half/app", &layer).await;
    assert!(blob_file(&data, &again).exists());
    let (status, got) = get(&bw.url(&format!("/v2/half/app/blobs/{again}"))).await.unwrap();
    assert_eq!((status, sha256(&got)), (200, again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_collects_with_the_config_and_refuses_a_second_collector() {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "[gc]\ngrace_secs = 3600\ndelete_untagged = true\n").unwrap();
    let bw = Breakwater::start_with(&["--config", cfg.path().to_str().unwrap()]);
    let base = format!("http://{}", bw.addr);
    let data = bw.data.path().to_path_buf();
    let p = push_layers(&base, "api/app", "v1", &[&pseudo_random(12_000, 95)], 95).await;
    assert_eq!(delete(&bw.url("/v2/api/app/manifests/v1")).await, 202, "untagged: the policy removes it");
    age_store(&data, Duration::from_secs(2 * 3600)).await;
    let client = reqwest::Client::new();

    let dry: serde_json::Value = serde_json::from_str(&client.post(bw.url("/api/gc?dry_run=true")).send().await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!((dry["dry_run"].as_bool(), dry["manifests_removed"].as_u64()), (Some(true), Some(1)), "{dry}");
    assert_eq!(manifest_status(&bw, "api/app", &p.digest).await, 200, "a dry run removes nothing");
    let r = client.post(bw.url("/api/gc?dry_run=maybe")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // Another collector holds the lease (as `breakwater gc` on another machine would): refused, nothing done.
    sql(&breakwater::config::sqlite_url(&data), &["INSERT INTO leases (name, holder, expires_at) VALUES ('gc', 'elsewhere', 99999999999999)"]).await;
    let r = client.post(bw.url("/api/gc")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let cli = gc(&["--data", &data.display().to_string()]);
    assert_eq!(cli.code, 1);
    assert!(cli.stderr.contains("another garbage collection is running"), "{}", cli.stderr);
    sql(&breakwater::config::sqlite_url(&data), &["DELETE FROM leases"]).await;

    let done: serde_json::Value = serde_json::from_str(&client.post(bw.url("/api/gc")).send().await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!(done["manifests_removed"].as_u64(), Some(1), "{done}");
    assert_eq!(done["blobs_removed"].as_u64(), Some(3), "{done}");
    assert_eq!(manifest_status(&bw, "api/app", &p.digest).await, 404);
    let metrics = reqwest::get(bw.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("breakwater_gc_blobs_removed_total") && l.ends_with(" 3")), "{metrics}");
}

/// Two images sharing a layer, the first deleted: what the collection of the tests below should remove (A's
/// manifest, config and own layer) and keep (B whole).
struct SharedLayer {
    a: Pushed,
    b: Pushed,
}

async fn two_images_one_deleted(bw: &Breakwater) -> SharedLayer {
    let base = format!("http://{}", bw.addr);
    let shared = pseudo_random(150_000, 31);
    let a = push_layers(&base, "team/a", "v1", &[&shared, &pseudo_random(90_000, 32)], 33).await;
    let b = push_layers(&base, "team/b", "v1", &[&shared, &pseudo_random(80_000, 34)], 35).await;
    assert_eq!(delete(&bw.url(&format!("/v2/team/a/manifests/{}", a.digest))).await, 202);
    SharedLayer { a, b }
}

/// B pulls whole: its manifest by tag and every blob, digests verified.
async fn pulls_whole(bw: &Breakwater, img: &Pushed) {
    let (status, m) = get(&bw.url("/v2/team/b/manifests/v1")).await.unwrap();
    assert_eq!((status, sha256(&m)), (200, img.digest.clone()));
    for d in std::iter::once(&img.config).chain(&img.layers) {
        let (status, body) = get(&bw.url(&format!("/v2/team/b/blobs/{d}"))).await.unwrap();
        assert_eq!((status, sha256(&body)), (200, d.clone()), "blob {d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_object_storage_the_same_blobs_go() {
    let s3 = common::s3::S3Server::start();
    let env = s3.env();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = s3.url("gc");
    let log = tempfile::NamedTempFile::new().unwrap();
    let bw = Breakwater::start_env_in(tempfile::tempdir().unwrap(), &["--storage", &url], &env_refs, log.path());
    let data = bw.data.path().to_path_buf();
    let img = two_images_one_deleted(&bw).await;
    age_records(&breakwater::config::sqlite_url(&data), Duration::from_secs(2 * 3600)).await;
    age_files(&s3.root.path().join(common::s3::BUCKET), Duration::from_secs(2 * 3600));
    let key = |d: &str| format!("gc/blobs/sha256/{}", d.strip_prefix("sha256:").unwrap());

    let args = ["--data", data.to_str().unwrap(), "--storage", &url];
    let run = gc_with_env(&args, &env);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("examined 7 blobs; removed 3 blobs"), "{}", run.stdout);
    let keys = s3.keys();
    for d in [&img.a.digest, &img.a.config, &img.a.layers[1]] {
        assert!(!keys.contains(&key(d)), "{d} was deleted from the bucket: {keys:?}");
    }
    for d in [&img.b.digest, &img.b.config, &img.b.layers[0], &img.b.layers[1]] {
        assert!(keys.contains(&key(d)), "{d} is B's: {keys:?}");
    }
    pulls_whole(&bw, &img.b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_one_collector_runs_at_a_time() {
    let db = common::pg::PgDatabase::create().await;
    let bw = Breakwater::start_with(&["--metadata", &db.url]);
    let data = bw.data.path().to_path_buf();
    let img = two_images_one_deleted(&bw).await;
    // Bytes that no record names at all (what a crash between a write and its record leaves), many of them, so
    // that a collection takes long enough for a second one to start while it runs.
    let orphans = 1500;
    for i in 0..orphans {
        let bytes = pseudo_random(64, 10_000 + i);
        let path = blob_file(&data, &sha256(&bytes));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
    }
    age_records(&db.url, Duration::from_secs(2 * 3600)).await;
    age_files(&data.join("content").join("blobs"), Duration::from_secs(2 * 3600));

    // A collector elsewhere holds the lease: refused, nothing removed.
    sql(&db.url, &["INSERT INTO leases (name, holder, expires_at) VALUES ('gc', 'elsewhere', 99999999999999)"]).await;
    let args = ["--data", data.to_str().unwrap(), "--metadata", &db.url];
    let refused = gc(&args);
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("another garbage collection is running"), "{}", refused.stderr);
    assert!(blob_file(&data, &img.a.layers[1]).exists());
    sql(&db.url, &["DELETE FROM leases"]).await;

    // Two started at once: one collects everything; the other is refused or, if it came after, finds nothing.
    let (first, second) = {
        let spawn = || {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            std::thread::spawn(move || gc(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        };
        let (x, y) = (spawn(), spawn());
        (x.join().unwrap(), y.join().unwrap())
    };
    let mut removed = 0;
    let mut busy = 0;
    for run in [&first, &second] {
        if run.code == 0 {
            let words: Vec<&str> = run.stdout.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "removed").expect("removed N blobs");
            removed += words[i + 1].parse::<u64>().unwrap();
        } else {
            assert!(run.stderr.contains("another garbage collection is running"), "{}", run.stderr);
            busy += 1;
        }
    }
    eprintln!("two collectors at once: {busy} refused");
    assert_eq!(removed, orphans + 3, "every garbage blob removed exactly once");
    for d in [&img.a.digest, &img.a.config, &img.a.layers[1]] {
        assert!(!blob_file(&data, d).exists());
    }
    pulls_whole(&bw, &img.b).await;

    // The config file's [gc] applies to `breakwater gc` too; the caches' namespaces are left to eviction.
    let base = format!("http://{}", bw.addr);
    let untagged = push_layers(&base, "team/b", "old", &[&pseudo_random(5_000, 36)], 37).await;
    let cached = push_layers(&base, "docker.io/library/app", "v1", &[&pseudo_random(5_000, 38)], 39).await;
    for (repo, tag) in [("team/b", "old"), ("docker.io/library/app", "v1")] {
        assert_eq!(delete(&bw.url(&format!("/v2/{repo}/manifests/{tag}"))).await, 202);
    }
    age_records(&db.url, Duration::from_secs(2 * 3600)).await;
    age_files(&data.join("content").join("blobs"), Duration::from_secs(2 * 3600));
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), format!("data = {:?}\nmetadata = {:?}\n[gc]\ndelete_untagged = true\n", data.to_str().unwrap(), db.url)).unwrap();
    let run = gc(&["--config", cfg.path().to_str().unwrap(), "--upstream", "docker.io"]);
    assert!(run.stdout.contains("and 1 untagged manifests"), "{}", run.stdout);
    assert_eq!(manifest_status(&bw, "team/b", &untagged.digest).await, 404);
    assert_eq!(manifest_status(&bw, "docker.io/library/app", &cached.digest).await, 200, "the cache's, not the policy's");
    pulls_whole(&bw, &img.b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_collects_on_its_schedule() {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "[gc]\ninterval_secs = 1\n").unwrap();
    let bw = Breakwater::start_with(&["--config", cfg.path().to_str().unwrap()]);
    let data = bw.data.path().to_path_buf();
    let img = two_images_one_deleted(&bw).await;
    age_store(&data, Duration::from_secs(2 * 3600)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while blob_file(&data, &img.a.layers[1]).exists() {
        assert!(std::time::Instant::now() < deadline, "no scheduled collection removed A's layer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!blob_file(&data, &img.a.config).exists());
    pulls_whole(&bw, &img.b).await;
}

/// The `[gc]` config file of the retention tests: the store and the rules.
fn retention_config(data: &Path, metadata: &str, rules: &str) -> tempfile::NamedTempFile {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), format!("data = {:?}\nmetadata = {metadata:?}\n[gc]\n{rules}", data.to_str().unwrap())).unwrap();
    cfg
}

/// Pushes `n` images tagged `t0`..`t{n-1}` to `repo`, each with `shared` and a layer of its own (from `seed` on),
/// and dates them four hours ago, a minute apart, `t{n-1}` the newest.
async fn many_tags(bw: &Breakwater, url: &str, repo: &str, (n, seed): (u64, u64), shared: &[u8]) -> Vec<Pushed> {
    let base = format!("http://{}", bw.addr);
    let mut pushed = Vec::new();
    for i in 0..n {
        pushed.push(push_layers(&base, repo, &format!("t{i}"), &[shared, &pseudo_random(3_000, seed + i)], seed + i).await);
    }
    let start = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() - 4 * 3600;
    let dates: Vec<String> =
        (0..n).map(|i| format!("UPDATE tags SET updated_at = {} WHERE repo = '{repo}' AND tag = 't{i}'", start + i * 60)).collect();
    sql(url, &dates.iter().map(String::as_str).collect::<Vec<_>>()).await;
    pushed
}

/// The bytes of an image's manifest, config and own layer (`layers[1]`) in the store.
fn own_bytes(data: &Path, p: &Pushed) -> u64 {
    [&p.digest, &p.config, &p.layers[1]].iter().map(|d| std::fs::metadata(blob_file(data, d)).unwrap().len()).sum()
}

/// `repo:tag` pulls whole: its manifest by tag and every blob, digests verified.
async fn pulls_tag_whole(bw: &Breakwater, repo: &str, tag: &str, img: &Pushed) {
    let (status, m) = get(&bw.url(&format!("/v2/{repo}/manifests/{tag}"))).await.unwrap();
    assert_eq!((status, sha256(&m)), (200, img.digest.clone()), "{repo}:{tag}");
    for d in std::iter::once(&img.config).chain(&img.layers) {
        let (status, body) = get(&bw.url(&format!("/v2/{repo}/blobs/{d}"))).await.unwrap();
        assert_eq!((status, sha256(&body)), (200, d.clone()), "{repo}:{tag} blob {d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_tags_and_frees_the_rest() {
    let bw = Breakwater::start();
    let data = bw.data.path().to_path_buf();
    let url = breakwater::config::sqlite_url(&data);
    let shared = pseudo_random(40_000, 499);
    let app = many_tags(&bw, &url, "ret/app", (30, 500), &shared).await;
    let other = many_tags(&bw, &url, "keep/other", (8, 700), &shared).await;
    // Aged as a store is after hours of no activity (the tags keep their dates, set above, older still).
    age_records(&url, Duration::from_secs(2 * 3600)).await;
    sql(&url, &["UPDATE tags SET updated_at = updated_at + 7200"]).await;
    age_files(&data.join("content").join("blobs"), Duration::from_secs(2 * 3600));
    let cfg = retention_config(&data, &url, "[[gc.retention]]\nrepositories = \"ret/*\"\nkeep_last = 5\n");
    let cfg_arg = cfg.path().to_str().unwrap();
    let doomed_bytes: u64 = app[..25].iter().map(|p| own_bytes(&data, p)).sum();

    // A dry run counts the 25 older tags, their manifests and their own bytes, and changes nothing.
    let dry = gc(&["--config", cfg_arg, "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(dry.stdout.contains(&format!("retention: would remove 25 tags and 25 manifests ({doomed_bytes} bytes)")), "{}", dry.stdout);
    for p in &app {
        assert_eq!(manifest_status(&bw, "ret/app", &p.digest).await, 200);
    }

    let run = gc(&["--config", cfg_arg]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains(&format!("retention: removed 25 tags and 25 manifests ({doomed_bytes} bytes)")), "{}", run.stdout);
    assert!(run.stdout.contains(&format!("removed 75 blobs ({doomed_bytes} bytes)")), "{}", run.stdout);
    for (i, p) in app.iter().enumerate().take(25) {
        assert_eq!(get(&bw.url(&format!("/v2/ret/app/manifests/t{i}"))).await.unwrap().0, 404, "t{i} went");
        for d in [&p.digest, &p.config, &p.layers[1]] {
            assert!(!blob_file(&data, d).exists(), "t{i}'s {d} was freed");
        }
    }
    for (i, p) in app.iter().enumerate().skip(25) {
        pulls_tag_whole(&bw, "ret/app", &format!("t{i}"), p).await;
    }
    for (i, p) in other.iter().enumerate() {
        pulls_tag_whole(&bw, "keep/other", &format!("t{i}"), p).await;
    }
    assert!(blob_file(&data, &app[0].layers[0]).exists(), "the shared layer stays");
    fsck_clean(&data);
    let again = gc(&["--config", cfg_arg]);
    assert!(again.stdout.contains("retention: removed 0 tags and 0 manifests (0 bytes)"), "{}", again.stdout);

    // A rule that would delete every tag it matches is refused, by `gc` and by `serve`, before anything is done.
    let bad = retention_config(&data, &url, "[[gc.retention]]\nrepositories = \"ret/*\"\ntags = \"t*\"\n");
    let refused = gc(&["--config", bad.path().to_str().unwrap()]);
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("keeps nothing: give keep_last or keep_within_secs"), "{}", refused.stderr);
    let serve = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config", bad.path().to_str().unwrap()])
        .env_remove("BREAKWATER_UPSTREAMS")
        .output()
        .unwrap();
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("keeps nothing"), "{}", String::from_utf8_lossy(&serve.stderr));
    pulls_tag_whole(&bw, "ret/app", "t29", &app[29]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_retention_keeps_tags_pulled_within_its_window() {
    let db = common::pg::PgDatabase::create().await;
    let data_dir = tempfile::tempdir().unwrap();
    let cfg = retention_config(data_dir.path(), &db.url, "[[gc.retention]]\nrepositories = \"pull/*\"\nkeep_within_secs = 3600\n");
    let log = tempfile::NamedTempFile::new().unwrap();
    let bw = Breakwater::start_env_in(data_dir, &["--config", cfg.path().to_str().unwrap()], &[], log.path());
    let data = bw.data.path().to_path_buf();
    let app = many_tags(&bw, &db.url, "pull/app", (6, 800), &pseudo_random(20_000, 600)).await;
    age_records(&db.url, Duration::from_secs(2 * 3600)).await;
    sql(&db.url, &["UPDATE tags SET updated_at = updated_at + 7200"]).await;
    age_files(&data.join("content").join("blobs"), Duration::from_secs(2 * 3600));
    // Pulled by tag (GET or HEAD) within the hour: kept. By digest: not a pull of the tag.
    let client = reqwest::Client::new();
    for t in ["t1", "t3"] {
        assert_eq!(get(&bw.url(&format!("/v2/pull/app/manifests/{t}"))).await.unwrap().0, 200);
    }
    let head = client.head(bw.url("/v2/pull/app/manifests/t4")).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(manifest_status(&bw, "pull/app", &app[2].digest).await, 200);
    let doomed_bytes: u64 = [0, 2, 5].iter().map(|&i| own_bytes(&data, &app[i])).sum();

    let report = |dry: bool| {
        let client = client.clone();
        let url = bw.url(if dry { "/api/gc?dry_run=true" } else { "/api/gc" });
        async move { serde_json::from_str::<serde_json::Value>(&client.post(url).send().await.unwrap().text().await.unwrap()).unwrap() }
    };
    let dry = report(true).await;
    assert_eq!((dry["tags_removed"].as_u64(), dry["manifests_retired"].as_u64()), (Some(3), Some(3)), "{dry}");
    assert_eq!(dry["retention_bytes"].as_u64(), Some(doomed_bytes), "{dry}");
    for p in &app {
        assert_eq!(manifest_status(&bw, "pull/app", &p.digest).await, 200, "a dry run removes nothing");
    }
    let done = report(false).await;
    assert_eq!((done["tags_removed"].as_u64(), done["retention_bytes"].as_u64()), (Some(3), Some(doomed_bytes)), "{done}");
    assert_eq!(done["bytes_freed"].as_u64(), Some(doomed_bytes), "{done}");
    for i in [0, 2, 5] {
        assert_eq!(manifest_status(&bw, "pull/app", &app[i].digest).await, 404, "t{i} was not pulled");
    }
    for i in [1, 3, 4] {
        pulls_tag_whole(&bw, "pull/app", &format!("t{i}"), &app[i]).await;
    }
    let metrics = reqwest::get(bw.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("breakwater_gc_tags_removed_total") && l.ends_with(" 3")), "{metrics}");
}

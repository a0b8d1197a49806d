//! `breakwater fsck` and the reconciliation sweep inside `serve`, run as the real binary over stores filled by
//! real pushes (the HTTP API, skopeo) and cache pulls, then damaged by hand: every kind of damage is reported with
//! a non-zero exit, `--repair` fixes it, a second check is clean, and what was repaired can be pushed again.
//! In-progress work (young files, a running flight's spool) is never taken for a leftover.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::images::{build_multiarch, oci_ref, scratch, skopeo_copy};
use common::oci::{get, push_blob, push_image, sha256};
use common::{Breakwater, Distribution};

/// What one `breakwater fsck` run did.
struct Fsck {
    code: i32,
    stdout: String,
}

impl Fsck {
    /// The problem lines of one kind.
    fn lines(&self, kind: &str) -> Vec<&str> {
        self.stdout.lines().filter(|l| l.starts_with(&format!("{kind} "))).collect()
    }

    fn has(&self, kind: &str, needle: &str) -> bool {
        self.lines(kind).iter().any(|l| l.contains(needle))
    }
}

fn fsck(args: &[&str]) -> Fsck {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("fsck")
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("BREAKWATER_UPSTREAMS")
        .output()
        .expect("run breakwater fsck");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("+ breakwater fsck {}\n{stdout}{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Fsck { code: out.status.code().expect("fsck exited normally"), stdout }
}

fn data_arg(data: &Path) -> String {
    data.display().to_string()
}

fn content(data: &Path) -> PathBuf {
    data.join("content")
}

fn blob_file(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    content(data).join("blobs").join("sha256").join(&hex[..2]).join(hex)
}

/// Makes a file's contents look two hours old (its mtime; the kernel sets its ctime to now, which fsck also reads,
/// so tests that need abandoned files run with a short or no grace period).
fn age(path: &Path) {
    let f = std::fs::File::options().write(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.set_modified(SystemTime::now() - Duration::from_secs(7200)).expect("set mtime");
}

fn write_old(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    age(path);
}

/// Runs SQL statements on the store's SQLite database (which a running server shares, in WAL mode).
async fn sql(data: &Path, statements: &[&str]) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&breakwater::config::sqlite_url(data)).await.expect("open SQLite");
    for s in statements {
        sqlx::query(s).execute(&pool).await.unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    pool.close().await;
}

async fn count(data: &Path, query: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&breakwater::config::sqlite_url(data)).await.expect("open SQLite");
    let n: i64 = sqlx::query_scalar(query).fetch_one(&pool).await.unwrap_or_else(|e| panic!("{query}: {e}"));
    pool.close().await;
    n
}

/// Opens an upload session in `repo` and returns its id.
async fn open_upload(base: &str, repo: &str) -> String {
    let r = reqwest::Client::new().post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let location = r.headers()["location"].to_str().unwrap();
    location.split('?').next().unwrap().rsplit('/').next().unwrap().to_string()
}

async fn status(method: reqwest::Method, url: &str) -> u16 {
    reqwest::Client::new().request(method, url).send().await.unwrap().status().as_u16()
}

/// Waits (bounded, generously) until `done` holds.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_filled_by_pushes_and_cache_pulls_is_clean_while_serving_and_offline() {
    let upstream = Distribution::start();
    let up_base = format!("http://{}", upstream.addr);
    let cached = push_image(&up_base, "lib/app", "latest", &[3000, 70_000], 11).await;
    let lazy = push_image(&up_base, "lib/lazy", "latest", &[2000], 12).await;
    let spec = format!("up=http://{}", upstream.addr);
    let bw = Breakwater::start_with(&["--upstream", &spec]);
    let base = format!("http://{}", bw.addr);

    // Pushed over the API, and by skopeo (a multi-platform index with its children).
    push_image(&base, "team/app", "v1", &[5000, 100_000], 1).await;
    let tmp = scratch();
    let layout = tmp.path().join("layout");
    build_multiarch(&layout);
    skopeo_copy(tmp.path(), &["--all"], &oci_ref(&layout, "multi"), &format!("docker://{}/team/multi:v1", bw.addr));
    // Pulled through the cache, whole; and another image of which only the manifest has been asked for.
    let (s, _) = get(&bw.url("/v2/up/lib/app/manifests/latest")).await.unwrap();
    assert_eq!(s, 200);
    for d in std::iter::once(&cached.config_digest).chain(&cached.layer_digests) {
        let (s, body) = get(&bw.url(&format!("/v2/up/lib/app/blobs/{d}"))).await.unwrap();
        assert_eq!((s, sha256(&body)), (200, d.clone()));
    }
    assert_eq!(get(&bw.url("/v2/up/lib/lazy/manifests/latest")).await.unwrap().0, 200);
    // A push in progress: a session with its (young) file.
    open_upload(&base, "team/app").await;
    // The cache records its blobs once their flights are done.
    let data = bw.data.path().to_path_buf();
    eventually("cache records written", || async { count(&data, "SELECT COUNT(*) FROM cache_blobs").await == 3 }).await;

    // While serving: clean, given the upstreams (whose repositories may lack blobs nobody pulled yet).
    let d = data_arg(&data);
    let run = fsck(&["--data", &d, "--upstream", &spec]);
    assert_eq!(run.code, 0, "a clean store exits 0");
    assert!(run.stdout.lines().any(|l| l == "clean"));
    assert!(run.stdout.contains("checked "), "a summary of what was checked");
    // Without knowing the upstreams, the lazily cached manifest looks like a pushed one lacking its blobs.
    let blind = fsck(&["--data", &d]);
    assert_eq!(blind.code, 3);
    assert!(blind.has("incomplete-manifest", &format!("up/lib/lazy@{}", lazy.digest)), "{}", blind.stdout);
    assert_eq!(blind.lines("incomplete-manifest").len(), 1);
    // The upstreams (and the data directory) can come from the server's config file instead.
    let config = tmp.path().join("breakwater.toml");
    std::fs::write(&config, format!("data = {:?}\n[[upstream]]\nname = \"up\"\nurl = \"{up_base}\"\n", d)).unwrap();
    assert_eq!(fsck(&["--config", config.to_str().unwrap()]).code, 0);

    // Offline, with the metadata store named explicitly.
    let data_dir = bw.stop();
    let url = breakwater::config::sqlite_url(data_dir.path());
    let offline = fsck(&["--data", &data_arg(data_dir.path()), "--metadata", &url, "--upstream", "up", "--repair"]);
    assert_eq!(offline.code, 0, "nothing to repair in a clean store");
    assert!(offline.stdout.lines().any(|l| l == "clean"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_damage_is_reported_then_repaired_and_the_content_can_be_pushed_again() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    let a = push_image(&base, "team/a", "latest", &[3000, 5000], 1).await;
    let b = push_image(&base, "team/b", "latest", &[4000], 2).await;
    let c = push_image(&base, "team/c", "latest", &[1000], 3).await;
    let loose = push_blob(&base, "team/d", b"a blob no manifest needs").await;
    let session = open_upload(&base, "team/a").await;
    let data_dir = bw.stop();
    let data = data_dir.path();
    let store = content(data);

    // A byte flipped in a layer.
    let corrupt = blob_file(data, &a.layer_digests[0]);
    let mut bytes = std::fs::read(&corrupt).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&corrupt, &bytes).unwrap();
    // A layer a manifest needs, gone; a manifest's bytes, gone; a linked blob, gone.
    std::fs::remove_file(blob_file(data, &b.layer_digests[0])).unwrap();
    std::fs::remove_file(blob_file(data, &c.digest)).unwrap();
    std::fs::remove_file(blob_file(data, &loose)).unwrap();
    // A blob file nothing refers to, and leftovers of interrupted work, all old.
    let orphan_bytes = b"bytes nobody links".to_vec();
    let orphan = blob_file(data, &sha256(&orphan_bytes));
    write_old(&orphan, &orphan_bytes);
    let tmp_file = store.join("tmp").join("9d4bd4c2-1f0e-4c39-8a5e-0d6c3f2b7a11");
    write_old(&tmp_file, b"half a blob");
    let spool_file = store.join("spool").join(format!("{}-0123456789abcdef0123456789abcdef", "ab".repeat(32)));
    write_old(&spool_file, b"half a download");
    let upload_file = store.join("uploads").join("5b0f5a3e-7f43-4d0c-9a57-6f1e2f0d8c21");
    write_old(&upload_file, b"a chunk");
    // A session whose file is gone, a tag pointing at nothing, a cache record without bytes.
    std::fs::remove_file(store.join("uploads").join(&session)).unwrap();
    let ghost = sha256(b"no such manifest");
    let uncached = sha256(b"evicted by hand");
    sql(
        data,
        &[
            "UPDATE uploads SET created_at = created_at - 7200",
            &format!("INSERT INTO tags (repo, tag, digest, updated_at) VALUES ('team/a', 'ghost', '{ghost}', 0)"),
            &format!("INSERT INTO cache_blobs (digest, size, last_access) VALUES ('{uncached}', 9, 0)"),
        ],
    )
    .await;

    let d = data_arg(data);
    let check = fsck(&["--data", &d, "--grace-secs", "0"]);
    assert_eq!(check.code, 3, "damage found and not repaired");
    assert!(check.has("corrupt-blob", &a.layer_digests[0]));
    assert!(check.has("dangling-link", &format!("team/b@{}", b.layer_digests[0])));
    assert!(check.has("incomplete-manifest", &format!("team/b@{}", b.digest)));
    assert!(check.has("dangling-manifest", &format!("team/c@{}", c.digest)));
    assert!(check.has("dangling-link", &format!("team/d@{loose}")));
    assert!(check.has("orphan-blob", &sha256(&orphan_bytes)));
    assert!(check.has("leftover-tmp", &tmp_file.display().to_string()));
    assert!(check.has("leftover-spool", &spool_file.display().to_string()));
    assert!(check.has("orphan-upload-file", &upload_file.display().to_string()));
    assert!(check.has("orphan-upload-session", &session));
    assert!(check.has("dangling-tag", &format!("team/a:ghost -> {ghost}")));
    assert!(check.has("dangling-cache-record", &uncached));
    assert!(check.stdout.contains("12 problems:"), "{}", check.stdout);
    // A check changes nothing.
    assert!(corrupt.exists() && orphan.exists() && tmp_file.exists() && spool_file.exists() && upload_file.exists());

    let repair = fsck(&["--data", &d, "--grace-secs", "0", "--repair"]);
    assert_eq!(repair.code, 2, "everything found was repaired");
    let quarantined = store.join("quarantine").join("sha256").join(a.layer_digests[0].strip_prefix("sha256:").unwrap());
    assert_eq!(std::fs::read(&quarantined).unwrap(), bytes, "the corrupt bytes are kept aside");
    assert!(!corrupt.exists());
    // The corrupt layer's removal makes team/a's manifest incomplete in turn: it goes too.
    assert!(repair.has("incomplete-manifest", &format!("team/a@{}", a.digest)));
    for gone in [&orphan, &tmp_file, &spool_file, &upload_file] {
        assert!(!gone.exists(), "{} removed", gone.display());
    }
    assert_eq!(count(data, "SELECT COUNT(*) FROM uploads").await, 0);
    assert_eq!(count(data, "SELECT COUNT(*) FROM cache_blobs").await, 0);
    assert_eq!(count(data, "SELECT COUNT(*) FROM tags WHERE tag = 'ghost'").await, 0);

    let again = fsck(&["--data", &d, "--grace-secs", "0"]);
    assert_eq!(again.code, 0, "a repaired store is clean");

    // The registry now says exactly what is missing, and takes it again.
    let bw = Breakwater::start_in(data_dir, &[]);
    let base = format!("http://{}", bw.addr);
    let layer_url = bw.url(&format!("/v2/team/a/blobs/{}", a.layer_digests[0]));
    assert_eq!(status(reqwest::Method::HEAD, &layer_url).await, 404);
    assert_eq!(status(reqwest::Method::GET, &bw.url("/v2/team/a/manifests/latest")).await, 404);
    assert_eq!(status(reqwest::Method::GET, &bw.url("/v2/team/c/manifests/latest")).await, 404);
    for (repo, sizes, seed) in [("team/a", [3000, 5000].as_slice(), 1), ("team/b", &[4000], 2), ("team/c", &[1000], 3)] {
        push_image(&base, repo, "latest", sizes, seed).await;
        let (s, _) = get(&bw.url(&format!("/v2/{repo}/manifests/latest"))).await.unwrap();
        assert_eq!(s, 200, "{repo} pushed again");
    }
    let (s, body) = get(&layer_url).await.unwrap();
    assert_eq!((s, sha256(&body)), (200, a.layer_digests[0].clone()), "the once corrupt layer is served whole");
    push_blob(&base, "team/d", b"a blob no manifest needs").await;
    let data_dir = bw.stop();
    assert_eq!(fsck(&["--data", &data_arg(data_dir.path())]).code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_younger_than_the_grace_period_are_work_in_progress() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    push_image(&base, "team/a", "v1", &[2000], 5).await;
    let data_dir = bw.stop();
    let data = data_dir.path();
    let store = content(data);
    // Just written, as by a write, a flight, an upload or a push about to link its blob.
    let young_bytes = b"just stored, about to be linked".to_vec();
    let young_blob = blob_file(data, &sha256(&young_bytes));
    std::fs::create_dir_all(young_blob.parent().unwrap()).unwrap();
    std::fs::write(&young_blob, &young_bytes).unwrap();
    let young = [
        store.join("tmp").join("f3a1c0de-0000-4000-8000-000000000001"),
        store.join("spool").join(format!("{}-00000000000000000000000000000002", "cd".repeat(32))),
        store.join("uploads").join("f3a1c0de-0000-4000-8000-000000000003"),
    ];
    for f in &young {
        std::fs::write(f, b"in progress").unwrap();
    }
    // A commit moves an upload whose last write is long past into tmp/ to link it: recently moved, it is in use.
    let moving = store.join("uploads").join("f3a1c0de-0000-4000-8000-000000000004");
    write_old(&moving, b"an upload idle for hours, being committed");
    let committing = store.join("tmp").join("f3a1c0de-0000-4000-8000-000000000004");
    std::fs::rename(&moving, &committing).unwrap();
    let d = data_arg(data);
    let run = fsck(&["--data", &d, "--repair"]);
    assert_eq!(run.code, 0, "nothing younger than the grace period is a leftover");
    assert!(committing.exists(), "a file just renamed is in use, whatever its mtime");
    assert!(young_blob.exists() && young.iter().all(|f| f.exists()));

    // With no grace at all they are leftovers.
    let none = fsck(&["--data", &d, "--grace-secs", "0"]);
    assert_eq!(none.code, 3);
    assert_eq!(none.lines("orphan-blob").len(), 1);
    assert_eq!(none.lines("leftover-tmp").len(), 2);
    assert_eq!(none.lines("leftover-spool").len(), 1);
    assert_eq!(none.lines("orphan-upload-file").len(), 1);
    assert_eq!(fsck(&["--data", &d, "--grace-secs", "0", "--repair"]).code, 2);
    assert!(!young_blob.exists() && young.iter().all(|f| !f.exists()) && !committing.exists());
    assert_eq!(fsck(&["--data", &d]).code, 0);

    // Not a store: fsck cannot run (1), which is not "problems found".
    let nowhere = fsck(&["--data", &data_arg(&data.join("nowhere"))]);
    assert_eq!(nowhere.code, 1);

    // Many problems of one kind: a bounded number of lines, and a count of the rest.
    for i in 0..130 {
        write_old(&store.join("tmp").join(format!("leftover-{i}")), b"x");
    }
    let many = fsck(&["--data", &d, "--grace-secs", "0"]);
    assert_eq!(many.code, 3);
    assert_eq!(many.lines("leftover-tmp").len(), 100);
    assert!(many.stdout.lines().any(|l| l == "... 30 more leftover-tmp problems not listed"), "{}", many.stdout);
    assert!(many.stdout.lines().any(|l| l == "130 problems: leftover-tmp 130 (0 repaired)"), "{}", many.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_repairs_while_serve_runs_and_keeps_unreferenced_bytes_until_it_stops() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    let a = push_image(&base, "team/a", "latest", &[2000, 3000], 7).await;
    let data = bw.data.path().to_path_buf();
    let corrupt = blob_file(&data, &a.layer_digests[1]);
    let mut bytes = std::fs::read(&corrupt).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&corrupt, &bytes).unwrap();
    let orphan_bytes = b"unreferenced, while a server runs".to_vec();
    let orphan = blob_file(&data, &sha256(&orphan_bytes));
    write_old(&orphan, &orphan_bytes);
    let tmp_file = content(&data).join("tmp").join("00000000-0000-4000-8000-00000000000a");
    write_old(&tmp_file, b"stale");

    let d = data_arg(&data);
    let online = fsck(&["--data", &d, "--grace-secs", "0", "--repair"]);
    assert_eq!(online.code, 3, "the unreferenced blob is left while serving");
    assert!(online.lines("corrupt-blob").iter().any(|l| l.contains(&a.layer_digests[1]) && l.contains("-> moved to")));
    assert!(online.has("orphan-blob", "not repaired: a server is running"));
    assert!(orphan.exists(), "unreferenced bytes are not removed while serving (a mount may be about to link them)");
    assert!(!tmp_file.exists() && !corrupt.exists());

    // The running server sees the repair at once: the layer is missing, and a push of it is served whole.
    let layer_url = bw.url(&format!("/v2/team/a/blobs/{}", a.layer_digests[1]));
    assert_eq!(status(reqwest::Method::HEAD, &layer_url).await, 404);
    push_image(&base, "team/a", "latest", &[2000, 3000], 7).await;
    let (s, body) = get(&layer_url).await.unwrap();
    assert_eq!((s, sha256(&body)), (200, a.layer_digests[1].clone()));
    let rest = fsck(&["--data", &d, "--grace-secs", "0"]);
    assert_eq!(rest.code, 3);
    assert_eq!(rest.stdout.lines().filter(|l| !l.starts_with("checked ")).count(), 2, "only the orphan and the summary");
    assert!(rest.has("orphan-blob", &sha256(&orphan_bytes)));

    // Stopped, the repair takes the unreferenced bytes too; and while a repair holds the store, no server starts.
    let data_dir = bw.stop();
    let offline = fsck(&["--data", &data_arg(data_dir.path()), "--grace-secs", "0", "--repair"]);
    assert_eq!(offline.code, 2);
    assert!(!orphan.exists());
    assert_eq!(fsck(&["--data", &data_arg(data_dir.path())]).code, 0);
    let held = breakwater::fsck::StoreLock::exclusive(&content(data_dir.path())).unwrap().expect("no server runs");
    let refused = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data", &data_arg(data_dir.path())])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a server does not start on a store under repair");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("fsck --repair"), "{}", String::from_utf8_lossy(&refused.stderr));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sweeps_leftovers_at_start_up_and_periodically_but_keeps_unreferenced_blobs() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    push_image(&base, "team/a", "v1", &[2000], 9).await;
    let lost = open_upload(&base, "team/a").await;
    let live = open_upload(&base, "team/a").await;
    let data_dir = bw.stop();
    let data = data_dir.path().to_path_buf();
    let store = content(&data);
    let stray_upload = store.join("uploads").join("6e1f1c7e-3a0b-4b55-9c43-1d2b3c4d5e6f");
    write_old(&stray_upload, b"a chunk of a session nobody has");
    std::fs::remove_file(store.join("uploads").join(&lost)).unwrap();
    let uncached = sha256(b"cache bytes removed by hand");
    sql(
        &data,
        &[
            &format!("UPDATE uploads SET created_at = created_at - 7200 WHERE id = '{lost}'"),
            &format!("INSERT INTO cache_blobs (digest, size, last_access) VALUES ('{uncached}', 5, 0)"),
        ],
    )
    .await;
    let orphan_bytes = b"nobody links me".to_vec();
    let orphan = blob_file(&data, &sha256(&orphan_bytes));
    write_old(&orphan, &orphan_bytes);

    let bw = Breakwater::start_in(data_dir, &["--sweep-interval-secs", "1", "--sweep-grace-secs", "2"]);
    eventually("the start-up sweep removes the upload file without a session", || async { !stray_upload.exists() }).await;
    let q = format!("SELECT COUNT(*) FROM uploads WHERE id = '{lost}'");
    eventually("the session without a file goes", || async { count(&data, &q).await == 0 }).await;
    let q = format!("SELECT COUNT(*) FROM cache_blobs WHERE digest = '{uncached}'");
    eventually("the cache record without bytes goes", || async { count(&data, &q).await == 0 }).await;

    // Later leftovers go at the next sweep; live sessions and unreferenced blob bytes stay.
    let tmp_file = store.join("tmp").join("11111111-2222-4333-8444-555555555555");
    write_old(&tmp_file, b"stale staging file");
    eventually("a periodic sweep removes a stale staging file", || async { !tmp_file.exists() }).await;
    assert!(orphan.exists(), "the sweep never removes blob bytes");
    assert!(store.join("uploads").join(&live).exists());
    assert_eq!(count(&data, &format!("SELECT COUNT(*) FROM uploads WHERE id = '{live}'")).await, 1);
    let r = reqwest::Client::new()
        .get(bw.url(&format!("/v2/team/a/blobs/uploads/{live}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204, "the live session still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_never_touches_the_spool_of_a_running_flight() {
    let upstream = Distribution::start();
    let relay = common::relay::Relay::start(&upstream.addr);
    let image = push_image(&format!("http://{}", upstream.addr), "lib/app", "latest", &[50_000], 21).await;
    let spec = format!("up=http://{}", relay.addr);
    // The sweep's period from the config file this time (the other sweep test gives the flag).
    let config_dir = scratch();
    let config = config_dir.path().join("breakwater.toml");
    std::fs::write(&config, "sweep_interval_secs = 1\nsweep_grace_secs = 2\n").unwrap();
    let bw = Breakwater::start_with(&[
        "--upstream",
        &spec,
        "--upstream-timeout-secs",
        "300",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(get(&bw.url("/v2/up/lib/app/manifests/latest")).await.unwrap().0, 200);

    // The upstream holds the blob's answer back: the flight waits, its spool created and silent.
    relay.hang_on("/blobs/");
    let layer = image.layer_digests[0].clone();
    let url = bw.url(&format!("/v2/up/lib/app/blobs/{layer}"));
    let pull = tokio::spawn(async move { get(&url).await });
    assert!(relay.wait_for("GET", "/blobs/", 1, Duration::from_secs(60)), "the flight asked upstream");
    let spool_dir = content(bw.data.path()).join("spool");
    let mut spool = None;
    eventually("the flight's spool exists", || {
        spool = std::fs::read_dir(&spool_dir).unwrap().flatten().map(|e| e.path()).next();
        let found = spool.is_some();
        async move { found }
    })
    .await;
    let spool = spool.unwrap();
    // Untouched for the sweep's grace period, it looks abandoned by its age alone.
    // A stale staging file, removed by a sweep, marks that a whole sweep ran after the spool looked abandoned.
    let marker = content(bw.data.path()).join("tmp").join("77777777-0000-4000-8000-000000000000");
    write_old(&marker, b"marker");
    eventually("a sweep ran", || async { !marker.exists() }).await;
    assert!(spool.exists(), "the spool of a running flight is never removed");

    relay.hang(false);
    let (s, body) = pull.await.unwrap().unwrap();
    assert_eq!((s, sha256(&body)), (200, layer), "the flight finishes and serves the blob whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_checks_and_repairs_a_store_whose_metadata_is_in_postgres() {
    let db = common::pg::PgDatabase::create().await;
    let bw = Breakwater::start_with(&["--metadata", &db.url]);
    let base = format!("http://{}", bw.addr);
    let image = push_image(&base, "team/pg", "v1", &[1500, 2500], 31).await;
    push_image(&base, "team/pg2", "v1", &[1000], 32).await;
    let data = bw.data.path().to_path_buf();
    std::fs::remove_file(blob_file(&data, &image.layer_digests[1])).unwrap();
    let d = data_arg(&data);
    let check = fsck(&["--data", &d, "--metadata", &db.url]);
    assert_eq!(check.code, 3);
    assert!(check.has("dangling-link", &format!("team/pg@{}", image.layer_digests[1])));
    assert!(check.has("incomplete-manifest", &format!("team/pg@{}", image.digest)));
    assert_eq!(fsck(&["--data", &d, "--metadata", &db.url, "--repair"]).code, 2);
    assert_eq!(fsck(&["--data", &d, "--metadata", &db.url]).code, 0);
    assert_eq!(get(&bw.url("/v2/team/pg2/manifests/v1")).await.unwrap().0, 200, "the intact image is untouched");
    push_image(&base, "team/pg", "v1", &[1500, 2500], 31).await;
    let (s, body) = get(&bw.url(&format!("/v2/team/pg/blobs/{}", image.layer_digests[1]))).await.unwrap();
    assert_eq!((s, sha256(&body)), (200, image.layer_digests[1].clone()));
}

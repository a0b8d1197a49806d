//! `breakwater fsck` on object storage: the real binary against a real s3s-fs (which checks signatures), over a
//! bucket filled by pushes to a breakwater running on it, then damaged by hand by rewriting an object's file under
//! the server's root. A corrupt object is reported and, with `--repair`, deleted with every record of it; an
//! object nothing refers to is reported and never deleted (garbage collection's); settings come from the AWS
//! environment or the config file, and a store that refuses them is an error, not a finding.

mod common;

use std::path::Path;
use std::process::Command;

use breakwater::storage::BlobStore as _;
use common::oci::{get, push_image, sha256};
use common::s3::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use common::Breakwater;

/// What one `breakwater fsck` run did.
struct Fsck {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Fsck {
    /// The problem lines of one kind.
    fn lines(&self, kind: &str) -> Vec<&str> {
        self.stdout.lines().filter(|l| l.starts_with(&format!("{kind} "))).collect()
    }

    fn has(&self, kind: &str, needle: &str) -> bool {
        self.lines(kind).iter().any(|l| l.contains(needle))
    }

    fn said(&self, line: &str) -> bool {
        self.stdout.lines().any(|l| l == line)
    }
}

/// Runs `breakwater fsck ARGS` with exactly the AWS environment `env` (none of the test's own).
fn fsck(args: &[&str], env: &[(&'static str, String)]) -> Fsck {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_breakwater"));
    cmd.arg("fsck").args(args).env("RUST_LOG", "warn").env_remove("BREAKWATER_UPSTREAMS");
    for key in ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"] {
        cmd.env_remove(key);
    }
    let out = cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str()))).output().expect("run breakwater fsck");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    eprintln!("+ breakwater fsck {}\n{stdout}{stderr}", args.join(" "));
    Fsck { code: out.status.code().expect("fsck exited normally"), stdout, stderr }
}

/// A breakwater whose blobs live under `prefix` of `s3`, on the data directory `data` (its SQLite metadata).
fn serve_on(s3: &S3Server, prefix: &str, data: tempfile::TempDir, log: &Path) -> Breakwater {
    let url = s3.url(prefix);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Breakwater::start_env_in(data, &["--storage", &url], &env, log)
}

/// The files of the committed blobs under `prefix`, as (digest, file).
fn blob_files(s3: &S3Server, prefix: &str) -> Vec<(String, std::path::PathBuf)> {
    let blobs = format!("{prefix}/blobs/sha256/");
    let files = s3.keys().into_iter().filter_map(|k| k.strip_prefix(&blobs).map(|hex| (format!("sha256:{hex}"), k.clone())));
    files.map(|(d, k)| (d, s3.root.path().join(BUCKET).join(k))).collect()
}

fn blob_file(s3: &S3Server, prefix: &str, digest: &str) -> std::path::PathBuf {
    s3.root.path().join(BUCKET).join(prefix).join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

async fn count(data: &Path, query: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&breakwater::config::sqlite_url(data)).await.expect("open SQLite");
    let n: i64 = sqlx::query_scalar(query).fetch_one(&pool).await.unwrap_or_else(|e| panic!("{query}: {e}"));
    pool.close().await;
    n
}

/// Stores `bytes` as a blob straight into the bucket (as another instance, or a stranger, could), with no record
/// anywhere of it.
async fn put_unreferenced(s3: &S3Server, prefix: &str, bytes: &[u8]) -> String {
    let mut settings = breakwater::storage::S3Settings::from_url(&s3.url(prefix)).unwrap();
    settings.endpoint = Some(s3.endpoint.clone());
    settings.region = Some("us-east-1".into());
    settings.access_key_id = Some(ACCESS_KEY.into());
    settings.secret_access_key = Some(SECRET_KEY.to_string().into());
    let store = breakwater::storage::S3Store::open(&settings).await.expect("open the bucket");
    let digest = sha256(bytes);
    let body = futures_util::stream::once(std::future::ready(Ok(bytes::Bytes::copy_from_slice(bytes))));
    store.put(&digest.parse().unwrap(), Box::pin(body)).await.expect("put the blob");
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_on_s3_deletes_a_corrupt_object_with_its_records_and_leaves_unreferenced_ones_to_gc() {
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("bw.log");
    let bw = serve_on(&s3, "fs", tempfile::tempdir().unwrap(), &log);
    let base = bw.url("");
    // team/a and team/c are the same image (their layers are stored once, linked twice); team/b has a layer of
    // more than one multipart part.
    let a = push_image(&base, "team/a", "v1", &[3000, 70_000], 1).await;
    push_image(&base, "team/c", "v1", &[3000, 70_000], 1).await;
    let b = push_image(&base, "team/b", "v1", &[9 << 20], 2).await;
    let data_dir = bw.stop();
    let data = data_dir.path();
    let d = data.display().to_string();
    let url = s3.url("fs");
    let env = s3.env();

    // Clean, with every stored blob hashed: 4 of team/a (config, 2 layers, manifest) and 3 of team/b.
    let stored = blob_files(&s3, "fs");
    assert_eq!(stored.len(), 7, "{stored:?}");
    let bytes: u64 = stored.iter().map(|(_, f)| std::fs::metadata(f).unwrap().len()).sum();
    let clean = fsck(&["--data", &d, "--storage", &url, "--concurrency", "3"], &env);
    assert_eq!(clean.code, 0, "a clean store exits 0");
    assert!(clean.said("clean"));
    assert!(clean.said(&format!("checked 7 blobs ({bytes} bytes), 8 links, 3 manifests, 3 tags, 0 cache records, 0 upload sessions")));

    // A byte flipped in the shared layer's object, and a valid blob that nothing refers to.
    let corrupt = &a.layer_digests[1];
    let file = blob_file(&s3, "fs", corrupt);
    let mut rotten = std::fs::read(&file).unwrap();
    rotten[500] ^= 0xff;
    std::fs::write(&file, &rotten).unwrap();
    let orphan_bytes = b"stored by hand, referred to by nothing";
    let orphan = put_unreferenced(&s3, "fs", orphan_bytes).await;

    let check = fsck(&["--data", &d, "--storage", &url, "--grace-secs", "0"], &env);
    assert_eq!(check.code, 3, "damage found and not repaired");
    assert!(check.has("corrupt-blob", &format!("{corrupt}: its bytes hash to {}", sha256(&rotten))), "{}", check.stdout);
    assert!(check.has("orphan-blob", &orphan));
    assert!(check.said("2 problems: corrupt-blob 1 (0 repaired), orphan-blob 1 (0 repaired)"), "{}", check.stdout);
    assert!(file.exists() && blob_file(&s3, "fs", &orphan).exists(), "a check changes nothing");
    // Just stored, the unreferenced blob may be a push about to link it: within the grace period it is not reported.
    let young = fsck(&["--data", &d, "--storage", &url], &env);
    assert_eq!(young.code, 3);
    assert!(young.said("1 problems: corrupt-blob 1 (0 repaired)"), "{}", young.stdout);

    let repair = fsck(&["--data", &d, "--storage", &url, "--grace-secs", "0", "--repair"], &env);
    assert_eq!(repair.code, 3, "unreferenced blobs stay, so problems remain");
    let line = repair.lines("corrupt-blob").concat();
    assert!(line.contains(corrupt) && line.contains("-> deleted from the store; removed 2 links and 0 manifest records"), "{line}");
    assert!(!file.exists(), "the corrupt object is gone from the bucket");
    // Without the layer, the manifests that need it go in turn, as on local disk.
    for repo in ["team/a", "team/c"] {
        assert!(repair.has("incomplete-manifest", &format!("{repo}@{}: lacks {corrupt} -> removed the record", a.digest)), "{}", repair.stdout);
    }
    // What the repair left unreferenced (the two repositories' manifest) and the blob stored by hand stay.
    assert_eq!(repair.lines("orphan-blob").len(), 2, "{}", repair.stdout);
    for unreferenced in [&orphan, &a.digest] {
        assert!(repair.has("orphan-blob", &format!("{unreferenced}: no link")), "{unreferenced}: {}", repair.stdout);
        assert!(blob_file(&s3, "fs", unreferenced).exists(), "{unreferenced} is not deleted");
    }
    assert!(repair.lines("orphan-blob").iter().all(|l| l.contains("-> not repaired: ") && l.contains("breakwater gc")));
    let gc = "unreferenced blobs in object storage are left to garbage collection (`breakwater gc`)";
    assert!(repair.said(gc) && !check.said(gc), "said once, by a repair: {}", repair.stdout);
    assert!(repair.stdout.contains("checked 8 blobs ("), "the blob stored by hand is hashed too: {}", repair.stdout);
    assert!(
        repair.said("5 problems: corrupt-blob 1 (1 repaired), incomplete-manifest 2 (2 repaired), orphan-blob 2 (0 repaired)"),
        "{}",
        repair.stdout
    );
    assert_eq!(count(data, &format!("SELECT COUNT(*) FROM blob_links WHERE digest = '{corrupt}'")).await, 0);
    assert_eq!(count(data, "SELECT COUNT(*) FROM manifests WHERE repo IN ('team/a', 'team/c')").await, 0);
    assert_eq!(count(data, "SELECT COUNT(*) FROM tags WHERE repo IN ('team/a', 'team/c')").await, 0);
    assert_eq!(count(data, "SELECT COUNT(*) FROM manifests WHERE repo = 'team/b'").await, 1, "the intact image is untouched");

    // Clean again, apart from the unreferenced blobs that only a zero grace period shows.
    let again = fsck(&["--data", &d, "--storage", &url], &env);
    assert_eq!(again.code, 0, "a repaired store is clean");
    let now = bytes - rotten.len() as u64 + orphan_bytes.len() as u64;
    assert!(again.said(&format!("checked 7 blobs ({now} bytes), 6 links, 1 manifests, 1 tags, 0 cache records, 0 upload sessions")));
    let strict = fsck(&["--data", &d, "--storage", &url, "--grace-secs", "0", "--concurrency", "1"], &env);
    assert_eq!(strict.code, 3);
    assert!(strict.said("2 problems: orphan-blob 2 (0 repaired)"), "{}", strict.stdout);

    // The registry says the layer is missing, takes it again, and serves it whole.
    let bw = serve_on(&s3, "fs", data_dir, &log);
    let layer_url = bw.url(&format!("/v2/team/a/blobs/{corrupt}"));
    assert_eq!(reqwest::Client::new().head(&layer_url).send().await.unwrap().status(), 404);
    assert_eq!(get(&bw.url("/v2/team/a/manifests/v1")).await.unwrap().0, 404);
    assert_eq!(get(&bw.url(&format!("/v2/team/b/manifests/{}", b.digest))).await.unwrap().0, 200);
    push_image(&bw.url(""), "team/a", "v1", &[3000, 70_000], 1).await;
    let (status, body) = get(&layer_url).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, corrupt.clone()));
    let data_dir = bw.stop();
    let last = fsck(&["--data", &data_dir.path().display().to_string(), "--storage", &url, "--grace-secs", "0"], &env);
    assert_eq!(last.code, 3);
    assert!(last.said("1 problems: orphan-blob 1 (0 repaired)"), "only the blob stored by hand: {}", last.stdout);
    assert!(last.has("orphan-blob", &orphan));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_on_s3_takes_the_config_files_storage_and_fails_on_a_store_that_refuses_it() {
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let bw = serve_on(&s3, "cfg", tempfile::tempdir().unwrap(), &tmp.path().join("bw.log"));
    push_image(&bw.url(""), "team/x", "v1", &[5000], 3).await;
    let data_dir = bw.stop();
    let d = data_dir.path().display().to_string();

    // Everything from the config file, nothing from the environment.
    let config = tmp.path().join("breakwater.toml");
    let storage = format!(
        "[storage]\nurl = \"{}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n",
        s3.url("cfg"),
        s3.endpoint
    );
    std::fs::write(&config, format!("data = {d:?}\n{storage}")).unwrap();
    let from_config = fsck(&["--config", config.to_str().unwrap()], &[]);
    assert_eq!(from_config.code, 0, "{}", from_config.stderr);
    assert!(from_config.said("clean"));
    assert!(from_config.stdout.contains("checked 3 blobs ("), "{}", from_config.stdout);

    // A wrong secret, from the environment or the file: fsck cannot run (1), which is not "problems found".
    let mut wrong = s3.env();
    wrong.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    wrong.push(("AWS_SECRET_ACCESS_KEY", "wrong".into()));
    let refused = fsck(&["--data", &d, "--storage", &s3.url("cfg")], &wrong);
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("opening the S3 store s3://breakwater/cfg") && refused.stderr.contains("403"), "{}", refused.stderr);
    let bad_file = tmp.path().join("bad.toml");
    std::fs::write(&bad_file, format!("data = {d:?}\n{}", storage.replace(SECRET_KEY, "wrong"))).unwrap();
    let refused = fsck(&["--config", bad_file.to_str().unwrap(), "--repair"], &[]);
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("403"), "{}", refused.stderr);

    // Nothing answering at the endpoint.
    let mut nowhere = s3.env();
    nowhere.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    nowhere.push(("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", common::free_port())));
    let unreachable = fsck(&["--data", &d, "--storage", &s3.url("cfg")], &nowhere);
    assert_eq!(unreachable.code, 1);
    assert!(unreachable.stderr.contains("opening the S3 store") && unreachable.stderr.to_lowercase().contains("connect"), "{}", unreachable.stderr);
    assert!(unreachable.stdout.is_empty(), "no report of a store that was not checked: {}", unreachable.stdout);
}

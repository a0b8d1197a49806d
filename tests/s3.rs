//! breakwater on S3-compatible storage (a real s3s-fs, which checks signatures), driven by real clients: skopeo
//! round trips, pulls through presigned redirects by skopeo, podman and containerd, kill -9 in the middle of
//! multipart pushes, the pull-through cache, and start-up and readiness errors.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::images::{self, build_image, build_multiarch, layout_image_blobs, oci_ref, run, scratch, skopeo_copy, skopeo_raw};
use common::oci::{get, pseudo_random, push_blob, sha256};
use common::relay::Relay;
use common::s3::S3Server;
use common::{Breakwater, Distribution};

/// A breakwater whose blobs live under `prefix` of `s3`, with its log in `log` and `extra` flags.
fn start(s3: &S3Server, prefix: &str, extra: &[&str], log: &Path) -> Breakwater {
    start_in(s3, prefix, tempfile::tempdir().unwrap(), extra, log)
}

fn start_in(s3: &S3Server, prefix: &str, data: tempfile::TempDir, extra: &[&str], log: &Path) -> Breakwater {
    let url = s3.url(prefix);
    let mut args = vec!["--storage", url.as_str()];
    args.extend_from_slice(extra);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Breakwater::start_env_in(data, &args, &env, log)
}

/// Object keys under `prefix/` that are not committed blobs (sessions, journals, anything else).
fn leftovers(s3: &S3Server, prefix: &str) -> Vec<String> {
    s3.keys().into_iter().filter(|k| k.starts_with(&format!("{prefix}/")) && !k.starts_with(&format!("{prefix}/blobs/"))).collect()
}

fn blob_keys(s3: &S3Server, prefix: &str) -> Vec<String> {
    s3.keys().into_iter().filter(|k| k.starts_with(&format!("{prefix}/blobs/"))).collect()
}

fn docker(addr: &str, repo: &str, tag: &str) -> String {
    format!("docker://{addr}/{repo}:{tag}")
}

/// skopeo copies a 200 MB-layer OCI image, a multi-platform index and a Docker schema2 image into an S3-backed
/// breakwater and back out: the same digests end to end, every blob in the bucket once, nothing else left there.
#[test]
fn skopeo_round_trips_images_through_s3() {
    let s3 = S3Server::start();
    let tmp = scratch();
    let tmp = tmp.path();
    let log = tmp.join("bw.log");
    let bw = start(&s3, "rt", &[], &log);

    let layout = tmp.join("src");
    let big = pseudo_random(200 << 20, 42);
    let digest = build_image(&layout, "big", images::host_arch(), &[("data.bin", &big)]);
    skopeo_copy(tmp, &[], &oci_ref(&layout, "big"), &docker(&bw.addr, "team/big", "v1"));
    skopeo_copy(tmp, &["--format", "v2s2"], &oci_ref(&layout, "big"), &docker(&bw.addr, "team/docker", "v1"));
    let multi = build_multiarch(&tmp.join("multi"));
    skopeo_copy(tmp, &["--all"], &oci_ref(&multi.layout, "multi"), &docker(&bw.addr, "team/multi", "v1"));

    // Back out into fresh layouts: the manifests are byte-identical, and skopeo verified every blob's digest.
    let out = tmp.join("out");
    skopeo_copy(tmp, &[], &docker(&bw.addr, "team/big", "v1"), &oci_ref(&out, "big"));
    assert_eq!(common::images::layout_digest(&out, "big"), digest);
    assert_eq!(sha256(&skopeo_raw(tmp, &docker(&bw.addr, "team/big", "v1"))), digest);
    skopeo_copy(tmp, &["--all"], &docker(&bw.addr, "team/multi", "v1"), &oci_ref(&out, "multi"));
    assert_eq!(common::images::layout_digest(&out, "multi"), multi.index);
    let raw = skopeo_raw(tmp, &docker(&bw.addr, "team/docker", "v1"));
    assert!(String::from_utf8_lossy(&raw).contains("application/vnd.docker.distribution.manifest.v2+json"));
    skopeo_copy(tmp, &[], &docker(&bw.addr, "team/docker", "v1"), &oci_ref(&out, "docker"));

    // Every blob is stored once under its digest, whatever the repositories holding it.
    let keys = blob_keys(&s3, "rt");
    for d in layout_image_blobs(&layout, &digest) {
        let key = format!("rt/blobs/sha256/{}", d.trim_start_matches("sha256:"));
        assert_eq!(keys.iter().filter(|k| **k == key).count(), 1, "{key} in {keys:?}");
    }
    assert_eq!(leftovers(&s3, "rt"), Vec::<String>::new());
    assert_eq!(s3.multipart_in_progress(), 0);
    drop(bw);
}

/// With `redirect = true`, blob GETs answer 307 to a presigned URL and skopeo, podman and containerd follow it:
/// the bytes come from the store, the digests are the image's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_pull_through_presigned_redirects() {
    let s3 = S3Server::start();
    let tmp = scratch();
    let tmp = tmp.path();
    let config = tmp.join("breakwater.toml");
    std::fs::write(&config, format!("[storage]\nurl = \"{}\"\nredirect = true\nredirect_expiry_secs = 120\n", s3.url("redir"))).unwrap();
    let log = tmp.join("bw.log");
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let bw = Breakwater::start_env_in(tempfile::tempdir().unwrap(), &["--config", config.to_str().unwrap()], &env, &log);

    let layout = tmp.join("src");
    let digest = build_image(&layout, "v1", images::host_arch(), &[("hello.txt", b"through the store".as_slice())]);
    skopeo_copy(tmp, &[], &oci_ref(&layout, "v1"), &docker(&bw.addr, "app", "v1"));
    let blobs = layout_image_blobs(&layout, &digest);

    // The registry itself answers a redirect, with the digest, and the URL serves the exact bytes.
    let layer = &blobs[blobs.len() - 1];
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(bw.url(&format!("/v2/app/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    assert_eq!(resp.headers()["docker-content-digest"], layer.as_str());
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&s3.endpoint) && location.contains("X-Amz-Signature="), "{location}");
    let (status, bytes) = get(&location).await.unwrap();
    assert_eq!((status, sha256(&bytes)), (200, layer.clone()));
    // HEAD is answered here, with no redirect.
    let head = reqwest::Client::new().head(bw.url(&format!("/v2/app/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(head.status(), 200);

    let out = tmp.join("out");
    skopeo_copy(tmp, &[], &docker(&bw.addr, "app", "v1"), &oci_ref(&out, "v1"));
    assert_eq!(common::images::layout_digest(&out, "v1"), digest);

    let podman = images::Podman::new();
    let image = format!("{}/app:v1", bw.addr);
    run(podman.cmd().args(["pull", "--tls-verify=false", &image]));
    assert_eq!(podman.inspect(&image)["Digest"], digest.as_str());

    let ctrd = common::containerd::Containerd::start();
    run(ctrd.ctr().args(["images", "pull", "--plain-http", "--snapshotter", "native", &image]));
    assert_eq!(ctrd.image_digest(&image).as_deref(), Some(digest.as_str()), "{}", ctrd.log());

    // Every client's blob GETs were redirected: none streamed a blob through breakwater.
    let text = std::fs::read_to_string(&log).unwrap();
    let blob_gets: Vec<&str> = text.lines().filter(|l| l.contains("method=GET") && l.contains("/blobs/sha256:")).collect();
    assert!(blob_gets.len() >= 3 * blobs.len(), "three clients' blob GETs logged: {blob_gets:#?}");
    assert!(blob_gets.iter().all(|l| l.contains("status=307")), "{blob_gets:#?}");
}

/// Sends a request head announcing `total` body bytes and then only `sent` of them, and keeps the connection
/// open: a push in the middle of its body.
fn hanging_request(addr: &str, head: &str, total: usize, sent: &[u8]) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "{head}\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\n\r\n").unwrap();
    s.write_all(sent).unwrap();
    s.flush().unwrap();
    s
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// kill -9 in the middle of a chunked push and of a monolithic push, both past their first multipart part:
/// nothing becomes visible, and after the restart the session is purged and both multipart uploads are aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_multipart_pushes_leaves_nothing_visible() {
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("bw.log");
    let bw = start(&s3, "k9", &[], &log);
    let base = bw.url("");
    let blob = pseudo_random(24 << 20, 9);
    let digest = sha256(&blob);
    let client = reqwest::Client::new();

    // A chunked session: one whole PATCH, then one cut short after 12 MiB (a part went out).
    let started = client.post(format!("{base}/v2/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(started.status(), 202);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let first = client.patch(format!("{base}{location}")).body(blob[..3 << 20].to_vec()).send().await.unwrap();
    assert_eq!(first.status(), 202);
    let patch = hanging_request(&bw.addr, &format!("PATCH {location} HTTP/1.1"), blob.len() - (3 << 20), &blob[3 << 20..15 << 20]);
    // A monolithic push of the same blob, also past its first part.
    let post = format!("POST /v2/other/blobs/uploads/?digest={digest} HTTP/1.1");
    let put = hanging_request(&bw.addr, &post, blob.len(), &blob[..12 << 20]);
    wait_until("both pushes have a multipart upload with parts", || s3.multipart_in_progress() >= 2);

    let data = bw.stop(); // SIGKILL
    drop((patch, put));
    assert!(blob_keys(&s3, "k9").is_empty(), "nothing is visible: {:?}", s3.keys());

    // Restarted with a short upload lifetime: the session is purged, the journal of the put swept.
    let bw = start_in(&s3, "k9", data, &["--upload-ttl-secs", "1", "--sweep-interval-secs", "1"], &log);
    wait_until("the leftovers are gone", || leftovers(&s3, "k9").is_empty() && s3.multipart_in_progress() == 0);
    assert!(blob_keys(&s3, "k9").is_empty());
    for repo in ["app", "other"] {
        let head = client.head(bw.url(&format!("/v2/{repo}/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(head.status(), 404, "{repo}");
    }
    // And the blob can still be pushed and read whole.
    assert_eq!(push_blob(&bw.url(""), "app", &blob).await, digest);
    let (status, body) = get(&bw.url(&format!("/v2/app/blobs/{digest}"))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digest));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("aborted abandoned multipart uploads"), "the sweep said what it did");
}

/// The pull-through cache on S3: a herd of cold pulls still costs one upstream GET, the verified blob lands in the
/// bucket, and later pulls read it from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_on_s3_still_makes_one_upstream_get() {
    let s3 = S3Server::start();
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let tmp = tempfile::tempdir().unwrap();
    let spec = format!("up=http://{}", relay.addr);
    let bw = start(&s3, "cache", &["--upstream", &spec, "--upstream-timeout-secs", "60"], &tmp.path().join("bw.log"));
    let blob = pseudo_random(11 << 20, 3);
    let digest = push_blob(&format!("http://{}", upstream.addr), "team/app", &blob).await;
    relay.reset();
    relay.hang_on("/blobs/sha256:");
    let mut clients = Vec::new();
    for _ in 0..16 {
        let url = bw.url(&format!("/v2/up/team/app/blobs/{digest}"));
        clients.push(tokio::spawn(async move { get(&url).await }));
    }
    assert!(relay.wait_for_async("GET", "/blobs/sha256:", 1, Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.hang(false);
    for c in clients {
        let (status, body) = c.await.unwrap().expect("complete body");
        assert_eq!((status, sha256(&body)), (200, digest.clone()));
    }
    let gets = relay.requests().into_iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/sha256:")).count();
    assert_eq!(gets, 1, "one upstream GET for the herd");
    let key = format!("cache/blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    wait_until("the fill is in the bucket", || s3.keys().contains(&key));
    let stored = std::fs::read(s3.root.path().join(common::s3::BUCKET).join(&key)).unwrap();
    assert_eq!(sha256(&stored), digest);
    // Served from the store now, with no new upstream request.
    let (status, body) = get(&bw.url(&format!("/v2/up/team/app/blobs/{digest}"))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digest));
    assert_eq!(relay.requests().into_iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/sha256:")).count(), 1);
}

/// A wrong secret or an unreachable endpoint stops `serve` at start-up with the reason; a store that goes away
/// later turns `/readyz` to 503 naming the blob store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_errors_at_start_up_and_in_readyz() {
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let serve = |env: Vec<(&'static str, String)>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args(["serve", "--listen", "127.0.0.1:0", "--storage", &s3.url("errs"), "--data"])
            .arg(tmp.path())
            .envs(env)
            .output()
            .unwrap()
    };
    let mut env = s3.env();
    env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    env.push(("AWS_SECRET_ACCESS_KEY", "wrong".into()));
    let out = serve(env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("opening the S3 store s3://breakwater/errs") && err.contains("403"), "{err}");
    let mut env = s3.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", common::free_port())));
    let out = serve(env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("opening the S3 store") && err.to_lowercase().contains("connect"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["serve", "--listen", "127.0.0.1:0", "--storage", "s3://no-such-bucket/x", "--data"])
        .arg(tmp.path())
        .envs(s3.env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("s3://no-such-bucket/x") && err.contains("NoSuchBucket"), "{err}");

    let bw = start(&s3, "errs", &[], &tmp.path().join("bw.log"));
    let (status, body) = get(&bw.url("/readyz")).await.unwrap();
    assert_eq!((status, body.as_slice()), (200, b"ready\n".as_slice()));
    drop(s3);
    let (status, body) = get(&bw.url("/readyz")).await.unwrap();
    assert_eq!((status, String::from_utf8_lossy(&body).trim()), (503, "blob store unavailable"));
}

/// `migrate-storage` copies a local store into S3, verifying every blob: a corrupt source file is reported and
/// not copied, a second run copies only what is missing, and a server on the S3 copy (same metadata) serves the
/// image with its digests.
#[test]
fn migrate_storage_copies_a_local_store_resumably() {
    let s3 = S3Server::start();
    let tmp = scratch();
    let tmp = tmp.path();
    let local = Breakwater::start();
    let layout = tmp.join("src");
    let digest = build_image(&layout, "v1", images::host_arch(), &[("a.bin", pseudo_random(7 << 20, 1))]);
    skopeo_copy(tmp, &[], &oci_ref(&layout, "v1"), &docker(&local.addr, "team/app", "v1"));
    skopeo_copy(tmp, &[], &oci_ref(&layout, "v1"), &docker(&local.addr, "other/app", "v1"));
    let data = local.stop();
    let content = data.path().join("content");

    // Rot one blob on the source disk (the layer), keeping its original bytes to put back.
    let blobs = layout_image_blobs(&layout, &digest);
    let layer = blobs.last().unwrap().trim_start_matches("sha256:").to_string();
    let layer_path = content.join("blobs/sha256").join(&layer[..2]).join(&layer);
    let original = std::fs::read(&layer_path).unwrap();
    let mut rotten = original.clone();
    rotten[1000] ^= 0xff;
    std::fs::write(&layer_path, &rotten).unwrap();

    let migrate = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args(["migrate-storage", "--to", &s3.url("mig"), "--from"])
            .arg(format!("file://{}", content.display()))
            .envs(s3.env())
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let stored = blobs.len() + 1; // the image's blobs and its manifest
    let (ok, out) = migrate();
    assert!(!ok, "a corrupt blob fails the run: {out}");
    assert!(out.contains(&format!("failed sha256:{layer}")) && out.contains("corrupt"), "{out}");
    assert!(out.contains(&format!("copied {} blobs", stored - 1)), "{out}");
    assert!(!blob_keys(&s3, "mig").iter().any(|k| k.ends_with(&layer)), "the corrupt blob was not copied");

    std::fs::write(&layer_path, &original).unwrap();
    let (ok, out) = migrate();
    assert!(ok, "{out}");
    assert!(out.contains(&format!("copied 1 blobs ({} bytes), {} already in", original.len(), stored - 1)), "{out}");
    assert_eq!(blob_keys(&s3, "mig").len(), stored);

    // The same metadata over the S3 copy: both repositories serve the image.
    let bw = start_in(&s3, "mig", data, &[], &tmp.join("bw.log"));
    for repo in ["team/app", "other/app"] {
        let out = tmp.join(repo.replace('/', "-"));
        skopeo_copy(tmp, &[], &docker(&bw.addr, repo, "v1"), &oci_ref(&out, "v1"));
        assert_eq!(common::images::layout_digest(&out, "v1"), digest);
    }
}

/// `serve` on `url` with exactly `env` over an environment without AWS settings (HOME included): its failure
/// output. Panics if it starts.
fn start_up_error(url: &str, env: &[(&str, &str)], extra: &[&str]) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--storage", url, "--data"]).arg(data.path()).args(extra);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
        cmd.env_remove(k);
    }
    let out = cmd.envs(env.iter().copied()).output().unwrap();
    assert!(!out.status.success(), "serve started with {env:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A blob pushed to `bw` reads back whole, and is in the bucket under `prefix`.
async fn round_trip(bw: &Breakwater, s3: &S3Server, prefix: &str, seed: u64) {
    let blob = pseudo_random(64 * 1024, seed);
    let digest = push_blob(&bw.url(""), "app", &blob).await;
    let (status, body) = get(&bw.url(&format!("/v2/app/blobs/{digest}"))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, digest.clone()));
    let key = format!("{prefix}/blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    assert!(blob_keys(s3, prefix).contains(&key), "{key} not in the bucket");
}

/// The AWS shared files are read as the AWS CLI reads them: `~/.aws/credentials` and `~/.aws/config` (keys,
/// region, `endpoint_url`), another profile by `AWS_PROFILE`, other files by `AWS_SHARED_CREDENTIALS_FILE` and
/// `AWS_CONFIG_FILE`; the variables win over the files; a missing named profile or one whose credentials come
/// from a role stops start-up with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_shared_files_are_read_as_the_aws_cli_reads_them() {
    use common::s3::{ACCESS_KEY, SECRET_KEY};
    let s3 = S3Server::start();
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    let keys = format!("aws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n");
    std::fs::write(home.path().join(".aws/credentials"), format!("[default]\n{keys}")).unwrap();
    let config = format!(
        "[default]\nregion = us-east-1\nendpoint_url = {}\n\n[profile assumed]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = default\n",
        s3.endpoint
    );
    std::fs::write(home.path().join(".aws/config"), config).unwrap();
    let log = home.path().join("bw.log");
    let bw = Breakwater::start_env_in(tempfile::tempdir().unwrap(), &["--storage", &s3.url("home")], &[("HOME", h)], &log);
    round_trip(&bw, &s3, "home", 1).await;
    drop(bw);

    let elsewhere = tempfile::tempdir().unwrap();
    let (creds, conf) = (elsewhere.path().join("creds"), elsewhere.path().join("conf"));
    std::fs::write(&creds, format!("[ci]\n{keys}")).unwrap();
    std::fs::write(&conf, format!("[profile ci]\nregion = us-east-1\nendpoint_url = {}\n", s3.endpoint)).unwrap();
    let env = [("HOME", h), ("AWS_PROFILE", "ci"), ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()), ("AWS_CONFIG_FILE", conf.to_str().unwrap())];
    let bw = Breakwater::start_env_in(tempfile::tempdir().unwrap(), &["--storage", &s3.url("ci")], &env, &log);
    round_trip(&bw, &s3, "ci", 2).await;
    drop(bw);

    let err = start_up_error(&s3.url("x"), &[("HOME", h), ("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", "wrong")], &[]);
    assert!(err.contains("403"), "the variables did not win over the files: {err}");
    let err = start_up_error(&s3.url("x"), &[("HOME", h), ("AWS_PROFILE", "missing")], &[]);
    assert!(err.contains("AWS_PROFILE=missing: no such profile"), "{err}");
    let err = start_up_error(&s3.url("x"), &[("HOME", h), ("AWS_PROFILE", "assumed")], &[]);
    assert!(err.contains("role_arn, which breakwater does not support"), "{err}");
}

/// An endpoint behind a private CA: refused at start-up until the CA is trusted, then used, whether the CA comes
/// from `[storage] ca_file`, `AWS_CA_BUNDLE` or the profile's `ca_bundle`; a CA file that holds no certificate is
/// an error that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_for_the_store_endpoint() {
    use common::s3::{ACCESS_KEY, SECRET_KEY};
    let s3 = S3Server::start();
    let pki = common::pki::Pki::new(7);
    let front = common::tls_front::TlsFront::start(&pki, s3.addr());
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    let endpoint = front.endpoint();
    let ca = pki.ca();
    let ca = ca.to_str().unwrap();
    let env = [("HOME", h), ("AWS_ENDPOINT_URL", endpoint.as_str()), ("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY), ("AWS_REGION", "us-east-1")];
    let err = start_up_error(&s3.url("ca"), &env, &[]);
    assert!(err.contains("opening the S3 store") && err.to_lowercase().contains("certificate"), "{err}");

    let config = home.path().join("bw.toml");
    std::fs::write(&config, format!("[storage]\nca_file = \"{ca}\"\n")).unwrap();
    let log = home.path().join("bw.log");
    let bw = Breakwater::start_env_in(tempfile::tempdir().unwrap(), &["--storage", &s3.url("ca"), "--config", config.to_str().unwrap()], &env, &log);
    round_trip(&bw, &s3, "ca", 3).await;
    drop(bw);

    let with_bundle: Vec<(&str, &str)> = env.iter().copied().chain([("AWS_CA_BUNDLE", ca)]).collect();
    let bw = Breakwater::start_env_in(tempfile::tempdir().unwrap(), &["--storage", &s3.url("bundle")], &with_bundle, &log);
    round_trip(&bw, &s3, "bundle", 4).await;
    drop(bw);

    std::fs::create_dir(home.path().join(".aws")).unwrap();
    std::fs::write(home.path().join(".aws/config"), format!("[default]\nca_bundle = {ca}\n")).unwrap();
    let bw = Breakwater::start_env_in(tempfile::tempdir().unwrap(), &["--storage", &s3.url("profile")], &env, &log);
    round_trip(&bw, &s3, "profile", 5).await;
    drop(bw);

    let not_pem = home.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let bad: Vec<(&str, &str)> = env.iter().copied().chain([("AWS_CA_BUNDLE", not_pem.to_str().unwrap())]).collect();
    let err = start_up_error(&s3.url("ca"), &bad, &[]);
    assert!(err.contains("CA bundle") && err.contains("not.pem"), "{err}");
}

/// Without keys in the settings, the variables or the files, credentials come from the instance metadata
/// service (IMDSv2, here a stand-in at `AWS_METADATA_ENDPOINT`): temporary keys with a session token, which the
/// S3 server checks as part of each request's signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_instance_metadata() {
    use common::s3::{ACCESS_KEY, SECRET_KEY};
    let s3 = S3Server::start();
    let imds = common::imds::Imds::start(ACCESS_KEY, SECRET_KEY, "session-token-of-the-node");
    let home = tempfile::tempdir().unwrap();
    let env = [
        ("HOME", home.path().to_str().unwrap()),
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_METADATA_ENDPOINT", imds.endpoint.as_str()),
    ];
    let bw = Breakwater::start_env_in(tempfile::tempdir().unwrap(), &["--storage", &s3.url("imds")], &env, &home.path().join("bw.log"));
    round_trip(&bw, &s3, "imds", 6).await;
    assert!(imds.served() >= 1, "the credentials did not come from the metadata service");
    drop(bw);
    let wrong = common::imds::Imds::start(ACCESS_KEY, "not-the-secret", "t");
    let env = [env[0], env[1], env[2], ("AWS_METADATA_ENDPOINT", wrong.endpoint.as_str())];
    let err = start_up_error(&s3.url("imds"), &env, &[]);
    assert!(err.contains("403") && wrong.served() >= 1, "{err}");
}

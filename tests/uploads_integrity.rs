//! Integrity of the upload paths: nothing stored is corrupted or lost, whatever clients do with their upload
//! sessions (concurrent requests on one session, disconnects in the middle of a body, hostile `Content-Range`s,
//! commits of digests the store already holds), and a replication destination's upload offset is read safely.
//!
//! Every test drives the real binary (or the library's own registry client) over real sockets; the races are run
//! many times with varied timing, and what they check is bytes and digests.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{Breakwater, Distribution};

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Deterministic pseudo-random bytes (different seeds give different content).
fn bytes_of(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn client() -> Client {
    Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Pushes `data` into `repo` in one request (`POST ?digest=`).
async fn push_blob(c: &Client, bw: &Breakwater, repo: &str, data: &[u8]) -> String {
    let d = sha256(data);
    let r = c.post(bw.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}"))).body(data.to_vec()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "monolithic push into {repo}");
    d
}

/// Opens an upload session in `repo`; returns its path (`/v2/<repo>/blobs/uploads/<id>`).
async fn open_session(c: &Client, bw: &Breakwater, repo: &str) -> String {
    let r = c.post(bw.url(&format!("/v2/{repo}/blobs/uploads/"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    r.headers()["location"].to_str().unwrap().to_string()
}

async fn patch(c: &Client, bw: &Breakwater, session: &str, data: &[u8]) -> reqwest::Response {
    c.patch(bw.url(session)).header("content-type", "application/octet-stream").body(data.to_vec()).send().await.unwrap()
}

async fn put_digest(c: &Client, bw: &Breakwater, session: &str, digest: &str) -> reqwest::Response {
    c.put(bw.url(&format!("{session}?digest={digest}"))).header("content-length", "0").send().await.unwrap()
}

/// The bytes `repo` serves under `digest`, or the status if not 200.
async fn get_blob(c: &Client, bw: &Breakwater, repo: &str, digest: &str) -> Result<Vec<u8>, StatusCode> {
    let r = c.get(bw.url(&format!("/v2/{repo}/blobs/{digest}"))).send().await.unwrap();
    if r.status() != StatusCode::OK {
        return Err(r.status());
    }
    Ok(r.bytes().await.unwrap().to_vec())
}

async fn error_json(r: reqwest::Response) -> serde_json::Value {
    serde_json::from_slice(&r.bytes().await.unwrap()).expect("a JSON error body")
}

/// Asserts `repo` serves exactly `expected` under its digest.
async fn assert_intact(c: &Client, bw: &Breakwater, repo: &str, expected: &[u8], context: &str) {
    let d = sha256(expected);
    let got = get_blob(c, bw, repo, &d).await.unwrap_or_else(|s| panic!("{context}: GET {repo} {d} answered {s}"));
    assert_eq!(got.len(), expected.len(), "{context}: {repo} serves {} bytes under {d}", got.len());
    assert_eq!(sha256(&got), d, "{context}: {repo} serves other bytes under {d}");
}

/// A request whose body the test writes by hand on a raw connection: it can pause, resume, or vanish mid-body.
struct RawRequest {
    stream: TcpStream,
}

impl RawRequest {
    /// Sends the request line and headers of a `method path` with a body of `content_length` bytes.
    async fn start(addr: &str, method: &str, path: &str, content_length: usize) -> RawRequest {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {content_length}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        RawRequest { stream }
    }

    /// Sends body bytes; false if the server has closed the connection (it may answer an error early).
    async fn send(&mut self, data: &[u8]) -> bool {
        self.stream.write_all(data).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// Reads the answer's status (the server may answer before the body is complete; the rest is not read).
    async fn status(mut self) -> u16 {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(60);
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout_at(deadline.into(), self.stream.read(&mut chunk)).await.expect("an answer").unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf);
        text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line in {text:?}"))
    }
}

/// Polls `cond` until it holds; panics after a generous upper bound (the machine may be loaded).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} did not happen within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn dir_entries(p: &Path) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

/// The reproduced bug: a second PATCH paused mid-body on a session whose bytes already hash to D, a PUT
/// committing D meanwhile, then the PATCH finishing. The PATCH wrote through a buffered append handle that it
/// flushed after the commit had renamed the session's file over the good copy of D in repository `a`: D was
/// then served with 500,000 bytes. Run twenty times with the pause varied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_patch_racing_a_commit_never_changes_a_stored_blob() {
    let bw = Breakwater::start();
    let c = client();
    let d_bytes = bytes_of(1, 300_000);
    let d = push_blob(&c, &bw, "a", &d_bytes).await;
    let junk = bytes_of(2, 200_000);
    let mut put_statuses = Vec::new();
    for i in 0..20u64 {
        let session = open_session(&c, &bw, "b").await;
        assert_eq!(patch(&c, &bw, &session, &d_bytes).await.status(), StatusCode::ACCEPTED);
        let mut second = RawRequest::start(&bw.addr, "PATCH", &session, junk.len()).await;
        second.send(&junk[..100_000]).await;
        // Varied pauses: the PUT lands while the server is still reading the first half, or after.
        tokio::time::sleep(Duration::from_millis(20 + 15 * (i % 7))).await;
        let put = put_digest(&c, &bw, &session, &d).await;
        put_statuses.push(put.status());
        second.send(&junk[100_000..]).await;
        let patched = second.status().await;
        assert_intact(&c, &bw, "a", &d_bytes, &format!("iteration {i}")).await;
        assert!(patched == 202 || patched == 404 || patched == 416, "iteration {i}: the second PATCH answered {patched}");
        if put.status() == StatusCode::CREATED {
            assert_intact(&c, &bw, "b", &d_bytes, &format!("iteration {i}, b")).await;
        } else {
            // A busy session refuses the commit in the spec's format.
            assert_eq!(put.status(), StatusCode::RANGE_NOT_SATISFIABLE, "iteration {i}");
            let body = error_json(put).await;
            assert_eq!(body["errors"][0]["code"], "BLOB_UPLOAD_INVALID", "iteration {i}: {body}");
        }
    }
    // Checked again once every request is over: no late write has landed anywhere.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_intact(&c, &bw, "a", &d_bytes, "after all iterations").await;
    eprintln!("PUT statuses: {put_statuses:?}");
}

/// PATCH handlers cancelled mid-body (the client disconnects) racing commits of the same session, with a digest
/// the store holds already and with a fresh one: a committed blob is never written to afterwards, whatever
/// blocking write the cancelled handler had in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_cancelled_mid_body_racing_commits_never_corrupt_a_blob() {
    let bw = Breakwater::start();
    let c = client();
    let held = bytes_of(10, 300_000);
    push_blob(&c, &bw, "a", &held).await;
    let junk = bytes_of(11, 400_000);
    let mut committed = Vec::new();
    for i in 0..30u64 {
        // Even iterations commit the digest `a` holds; odd ones a digest new to the store.
        let content = if i % 2 == 0 { held.clone() } else { bytes_of(100 + i, 300_000) };
        let digest = sha256(&content);
        let session = open_session(&c, &bw, "b").await;
        assert_eq!(patch(&c, &bw, &session, &content).await.status(), StatusCode::ACCEPTED);
        let mut doomed = Some(RawRequest::start(&bw.addr, "PATCH", &session, junk.len()).await);
        // From nothing to 150 KB of the doomed body arrives before the disconnect.
        if let Some(d) = doomed.as_mut() {
            d.send(&junk[..50_000 * (i as usize % 4)]).await;
        }
        let order = i % 3;
        if order == 0 {
            drop(doomed.take()); // disconnect, then commit
            tokio::time::sleep(Duration::from_millis(i % 5)).await;
        }
        let mut put = put_digest(&c, &bw, &session, &digest).await;
        if order != 0 {
            // The commit arrived mid-body; now disconnect (order 1: at once; 2: after a pause).
            if order == 2 {
                tokio::time::sleep(Duration::from_millis(10 + i % 7)).await;
            }
            drop(doomed.take());
        }
        // A session still busy with the cancelled PATCH refuses the commit; it is retried until the session is free.
        let deadline = Instant::now() + Duration::from_secs(30);
        while put.status() == StatusCode::RANGE_NOT_SATISFIABLE {
            assert!(Instant::now() < deadline, "iteration {i}: the session stayed busy");
            tokio::time::sleep(Duration::from_millis(5)).await;
            put = put_digest(&c, &bw, &session, &digest).await;
        }
        // Committed, or refused because some of the doomed body had landed in the session (it keeps what arrived).
        assert!(
            put.status() == StatusCode::CREATED || put.status() == StatusCode::BAD_REQUEST,
            "iteration {i}: the commit answered {}",
            put.status()
        );
        committed.push((i, put.status().as_u16()));
        assert_intact(&c, &bw, "a", &held, &format!("iteration {i}")).await;
        if let Ok(got) = get_blob(&c, &bw, "b", &digest).await {
            assert_eq!(sha256(&got), digest, "iteration {i}: b serves other bytes under {digest}");
        }
    }
    // Give any straggling write every chance to land, then check every committed blob once more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_intact(&c, &bw, "a", &held, "at the end").await;
    for i in 0..30u64 {
        let content = if i % 2 == 0 { held.clone() } else { bytes_of(100 + i, 300_000) };
        let digest = sha256(&content);
        if let Ok(got) = get_blob(&c, &bw, "b", &digest).await {
            assert_eq!(got.len(), content.len(), "iteration {i}: {digest} grew to {} bytes", got.len());
            assert_eq!(sha256(&got), digest, "iteration {i}: {digest} changed after its commit");
        }
    }
    eprintln!("PUT statuses: {committed:?}");
}

/// One request at a time per session: a PATCH or PUT arriving while a PATCH is mid-body is refused at once with
/// 416 `BLOB_UPLOAD_INVALID`; once the first request ends the session takes requests again.
#[tokio::test]
async fn a_busy_session_refuses_other_requests_in_the_spec_format() {
    let bw = Breakwater::start();
    let c = client();
    let data = bytes_of(20, 1_000_000);
    let session = open_session(&c, &bw, "busy").await;
    let mut slow = RawRequest::start(&bw.addr, "PATCH", &session, data.len()).await;
    assert!(slow.send(&data[..600_000]).await);
    // Once some of its bytes are in the session, the slow PATCH is certainly being served.
    let session_url = bw.url(&session);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.get(&session_url).send().await.unwrap();
        if r.headers()["range"] != "0-0" {
            break;
        }
        assert!(Instant::now() < deadline, "the slow PATCH's bytes never reached the session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = patch(&c, &bw, &session, b"x").await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "a PATCH on a busy session");
    let body = error_json(r).await;
    assert_eq!(body["errors"][0]["code"], "BLOB_UPLOAD_INVALID", "{body}");
    let put = put_digest(&c, &bw, &session, &sha256(&data)).await;
    assert_eq!(put.status(), StatusCode::RANGE_NOT_SATISFIABLE, "a PUT on a busy session");
    let del = c.delete(&session_url).send().await.unwrap();
    assert_eq!(del.status(), StatusCode::RANGE_NOT_SATISFIABLE, "a DELETE on a busy session");
    assert!(slow.send(&data[600_000..]).await);
    assert_eq!(slow.status().await, 202);
    let status = c.get(&session_url).send().await.unwrap();
    assert_eq!(status.headers()["range"], "0-999999", "only the first PATCH's bytes are in the session");
    assert_eq!(put_digest(&c, &bw, &session, &sha256(&data)).await.status(), StatusCode::CREATED);
    assert_intact(&c, &bw, "busy", &data, "after the busy period").await;
}

/// `Content-Range` arithmetic on client input cannot wrap or panic: an end before the start, or an end at
/// u64::MAX, is answered 416 `BLOB_UPLOAD_INVALID`, and the session is unharmed.
#[tokio::test]
async fn hostile_content_ranges_are_refused_with_416() {
    let bw = Breakwater::start();
    let c = client();
    let session = open_session(&c, &bw, "ranges").await;
    for range in ["0-18446744073709551615", "5-2", "18446744073709551615-18446744073709551615"] {
        let r = c
            .patch(bw.url(&session))
            .header("content-type", "application/octet-stream")
            .header("content-range", range)
            .body(b"hello".to_vec())
            .send()
            .await
            .unwrap_or_else(|e| panic!("Content-Range {range}: the server dropped the connection: {e}"));
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "Content-Range {range}");
        assert_eq!(r.headers()["range"], "0-0", "Content-Range {range}: the offset to resume from");
        let body = error_json(r).await;
        assert_eq!(body["errors"][0]["code"], "BLOB_UPLOAD_INVALID", "Content-Range {range}: {body}");
    }
    let r = c.patch(bw.url(&session)).header("content-range", "0-4").body(b"hello".to_vec()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(put_digest(&c, &bw, &session, &sha256(b"hello")).await.status(), StatusCode::CREATED);
}

/// A commit of a digest the store already holds discards the upload: the stored file (its inode) is the one
/// first stored, for chunked uploads, monolithic pushes and manifests alike (content is stored once).
#[tokio::test]
async fn a_commit_of_a_stored_digest_keeps_the_stored_file() {
    use std::os::unix::fs::MetadataExt;
    let bw = Breakwater::start();
    let c = client();
    let data = bytes_of(30, 50_000);
    let d = push_blob(&c, &bw, "one", &data).await;
    let hex = d.strip_prefix("sha256:").unwrap();
    let file = bw.data.path().join("content/blobs/sha256").join(&hex[..2]).join(hex);
    // Held open so that its inode number cannot be reused by a newcomer.
    let original = std::fs::File::open(&file).unwrap();
    let inode = original.metadata().unwrap().ino();
    push_blob(&c, &bw, "two", &data).await;
    let session = open_session(&c, &bw, "three").await;
    assert_eq!(patch(&c, &bw, &session, &data).await.status(), StatusCode::ACCEPTED);
    assert_eq!(put_digest(&c, &bw, &session, &d).await.status(), StatusCode::CREATED);
    assert_eq!(std::fs::metadata(&file).unwrap().ino(), inode, "a push or a commit replaced the stored file");
    for repo in ["one", "two", "three"] {
        assert_intact(&c, &bw, repo, &data, repo).await;
    }
    assert_eq!(dir_entries(&bw.data.path().join("content/uploads")), 0, "the discarded upload is removed");
    assert_eq!(dir_entries(&bw.data.path().join("content/tmp")), 0, "the discarded staging files are removed");
}

/// A client that disconnects in the middle of a monolithic push leaves no staging file in `content/tmp`.
#[tokio::test]
async fn a_push_cancelled_mid_body_leaves_no_staging_file() {
    let bw = Breakwater::start();
    let tmp = bw.data.path().join("content/tmp");
    let data = bytes_of(40, 1_000_000);
    for i in 0..5usize {
        let mut req =
            RawRequest::start(&bw.addr, "POST", &format!("/v2/cut/blobs/uploads/?digest={}", sha256(&data)), data.len()).await;
        req.send(&data[..300_000 + 50_000 * i]).await;
        // Wait until the server is writing the staging file, then vanish.
        eventually("the staging file appears", || dir_entries(&tmp) > 0).await;
        drop(req);
        eventually("the staging file is removed", || dir_entries(&tmp) == 0).await;
    }
}

/// The upload's metadata row is created before its file: when recording the session fails, no file is left in
/// `uploads/` (it would never be purged: purging goes by the rows).
#[tokio::test]
async fn a_failed_session_start_leaves_no_upload_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = breakwater::storage::LocalStore::open(&dir.path().join("content")).await.unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display());
    let meta = breakwater::meta::open(&url).await.unwrap();
    let registry = breakwater::registry::Registry::new(std::sync::Arc::new(store), std::sync::Arc::clone(&meta), true);
    let repo: breakwater::oci::RepoName = "r".parse().unwrap();
    registry.start_upload(&repo).await.expect("a session opens while the database works");
    // Break the metadata store underneath the registry: the uploads table disappears.
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.unwrap();
    sqlx::query("DROP TABLE uploads").execute(&mut conn).await.unwrap();
    drop(conn);
    assert!(registry.start_upload(&repo).await.is_err(), "the session cannot be recorded");
    assert_eq!(dir_entries(&dir.path().join("content/uploads")), 1, "only the first session's file exists");
}

// ---- the replication client's resume offset -------------------------------------------------------------------

fn upstream(url: &str) -> breakwater::upstream::Upstream {
    let config = breakwater::config::upstream("dst", url, 60, 60, false, Some(false)).unwrap();
    breakwater::upstream::Upstream::new(config).unwrap()
}

fn stream_of(data: &[u8]) -> breakwater::storage::ByteStream {
    let b = bytes::Bytes::copy_from_slice(data);
    Box::pin(futures_util::stream::once(async move { Ok(b) }))
}

/// Resumption from a destination's `Range: 0-0`, which both breakwater and distribution send for an empty
/// session *and* for a one-byte one: an empty session resumes at 0 (byte 0 was once skipped: `0-0` was read as
/// offset 1), a one-byte session is resumed on a fresh session (its byte cannot be told from nothing), and a
/// longer one resumes at its length. Every resumed upload commits the exact blob.
async fn resume_keeps_every_byte(base: &str) {
    let dst = upstream(base);
    let repo: breakwater::oci::RepoName = "resume/me".parse().unwrap();
    let data = bytes_of(50, 70_000);
    let digest: breakwater::oci::Digest = sha256(&data).parse().unwrap();
    for already in [0usize, 1, 2, 1000] {
        let location = dst.start_upload(&repo).await.unwrap();
        let location = if already > 0 { dst.patch_blob(&repo, &location, stream_of(&data[..already])).await.unwrap() } else { location };
        let (offset, location) = dst.resume_upload(&repo, &location).await.unwrap();
        match already {
            0 | 1 => assert_eq!(offset, 0, "{base}: a session that reports 0-0 holding {already} bytes resumes at 0"),
            n => assert_eq!(offset, n as u64, "{base}: a session holding {n} bytes"),
        }
        let location = dst.patch_blob(&repo, &location, stream_of(&data[offset as usize..])).await.unwrap();
        dst.finish_blob(&repo, &location, &digest)
            .await
            .unwrap_or_else(|e| panic!("{base}: resuming after {already} bytes committed the wrong bytes: {e}"));
        assert_eq!(dst.blob_size(&repo, &digest).await.unwrap(), Some(data.len() as u64));
    }
}

#[tokio::test]
async fn resuming_after_an_empty_session_keeps_byte_zero_on_breakwater() {
    let bw = Breakwater::start();
    resume_keeps_every_byte(&bw.url("")).await;
}

#[tokio::test]
async fn resuming_after_an_empty_session_keeps_byte_zero_on_distribution() {
    let reg = Distribution::start();
    resume_keeps_every_byte(&reg.url("")).await;
}

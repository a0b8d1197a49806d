//! The storage suite: the same cases against each `BlobStore` backend, local disk and a real S3 server (s3s-fs,
//! which checks signatures), through the library's own types.

mod common;

use std::io;
use std::sync::Arc;

use breakwater::oci::{Algorithm, Digest};
use breakwater::secret::Secret;
use breakwater::storage::{BlobStore, ByteRange, ByteStream, LocalStore, S3Settings, S3Store, StorageError};
use bytes::Bytes;
use futures_util::StreamExt;

use common::s3::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};

/// A backend under test, with what keeps it alive (its directory or its server).
struct Backend {
    store: Arc<dyn BlobStore>,
    /// Opens another store over the same bytes: what a restart, or a second instance, sees.
    reopen: Box<dyn Fn() -> futures_util::future::BoxFuture<'static, Arc<dyn BlobStore>>>,
    /// Whether `open` opens the bytes with the size (local disk) or leaves them to `read` (an object store).
    opens_bytes: bool,
    _keep: Box<dyn std::any::Any>,
}

async fn local() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let store: Arc<dyn BlobStore> = Arc::new(LocalStore::open(&path).await.unwrap());
    let reopen = Box::new(move || {
        let path = path.clone();
        Box::pin(async move { Arc::new(LocalStore::open(&path).await.unwrap()) as Arc<dyn BlobStore> }) as _
    });
    Backend { store, reopen, opens_bytes: true, _keep: Box::new(dir) }
}

/// S3 settings for `server`, with the smallest part size S3 allows (so that a test's few MiB span parts).
fn settings(server: &S3Server, redirect: bool) -> S3Settings {
    let mut s = S3Settings::from_url(&format!("s3://{BUCKET}/suite")).unwrap();
    s.endpoint = Some(server.endpoint.clone());
    s.region = Some("us-east-1".into());
    s.access_key_id = Some(ACCESS_KEY.into());
    s.secret_access_key = Some(Secret::from(SECRET_KEY.to_string()));
    s.part_size = 5 * 1024 * 1024;
    s.redirect = redirect;
    s
}

async fn s3() -> Backend {
    let server = S3Server::start();
    let s = settings(&server, false);
    let store: Arc<dyn BlobStore> = Arc::new(S3Store::open(&s).await.unwrap());
    let reopen = Box::new(move || {
        let s = s.clone();
        Box::pin(async move { Arc::new(S3Store::open(&s).await.unwrap()) as Arc<dyn BlobStore> }) as _
    });
    Backend { store, reopen, opens_bytes: false, _keep: Box::new(server) }
}

fn stream(parts: Vec<io::Result<Bytes>>) -> ByteStream {
    Box::pin(futures_util::stream::iter(parts))
}

/// `data` as a body of `chunk`-byte pieces.
fn chunked(data: &[u8], chunk: usize) -> ByteStream {
    stream(data.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect())
}

async fn collect(s: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = s;
    while let Some(b) = s.next().await {
        out.extend_from_slice(&b.unwrap());
    }
    out
}

/// Pseudo-random bytes (incompressible, and different per seed).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

const MIB: usize = 1024 * 1024;

async fn put_verifies_and_reads_ranges(b: Backend) {
    for len in [11, 3 * MIB, 12 * MIB + 7] {
        let bytes = data(len, len as u64);
        let d = Digest::of(Algorithm::Sha256, &bytes);
        assert_eq!(b.store.put(&d, chunked(&bytes, 64 * 1024 + 3)).await.unwrap(), len as u64);
        assert_eq!(b.store.size(&d).await.unwrap(), Some(len as u64));
        assert_eq!(collect(b.store.read(&d, None).await.unwrap()).await, bytes);
        let r = ByteRange { start: len as u64 / 3, end: len as u64 - 1 };
        assert_eq!(collect(b.store.read(&d, Some(r)).await.unwrap()).await, &bytes[r.start as usize..r.end as usize]);
        // Stored once: putting it again keeps the size and the bytes.
        assert_eq!(b.store.put(&d, chunked(&bytes, MIB)).await.unwrap(), len as u64);
        assert_eq!(collect((b.reopen)().await.read(&d, None).await.unwrap()).await, bytes);
    }
}

/// `open` gives a blob's size and, where the store opens its bytes with it (local disk), streams any window of
/// them: empty, small (read whole), at the 64 KiB border, mapped; a window past the end is an error, not a fault.
async fn open_gives_the_size_and_streams_windows(b: Backend) {
    let absent = Digest::of(Algorithm::Sha256, b"never stored");
    assert!(b.store.open(&absent).await.unwrap().is_none());
    for len in [0, 11, 64 * 1024, 64 * 1024 + 1, 3 * MIB + 5] {
        let bytes = data(len, 7 + len as u64);
        let d = Digest::of(Algorithm::Sha256, &bytes);
        b.store.put(&d, chunked(&bytes, MIB)).await.unwrap();
        let windows = [None, Some((0, len)), Some((len / 3, len)), Some((len / 2, len / 2)), Some((len / 4, len - len / 4))];
        for w in windows {
            let opened = b.store.open(&d).await.unwrap().expect("stored");
            assert_eq!(opened.size, len as u64);
            assert_eq!(opened.bytes.is_some(), b.opens_bytes);
            let Some(opened_bytes) = opened.bytes else { continue };
            let range = w.map(|(s, e)| ByteRange { start: s as u64, end: e as u64 });
            let (s, e) = w.unwrap_or((0, len));
            assert_eq!(collect(opened_bytes.stream(range).unwrap()).await, &bytes[s..e], "{len} bytes, window {w:?}");
        }
        if let Some(opened_bytes) = b.store.open(&d).await.unwrap().and_then(|o| o.bytes) {
            let past = ByteRange { start: 0, end: len as u64 + 1 };
            assert!(opened_bytes.stream(Some(past)).is_err(), "{len} bytes: a window past the end streams");
        }
    }
}

async fn mismatch_and_broken_body_leave_nothing_visible(b: Backend) {
    for len in [100, 11 * MIB] {
        let bytes = data(len, 7);
        let d = Digest::of(Algorithm::Sha256, &bytes);
        let mut wrong = bytes.clone();
        wrong[len / 2] ^= 1;
        let err = b.store.put(&d, chunked(&wrong, MIB)).await.unwrap_err();
        assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err:?}");
        let mut parts: Vec<io::Result<Bytes>> = bytes[..len - 10].chunks(MIB).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        parts.push(Err(io::Error::other("client went away")));
        assert!(matches!(b.store.put(&d, stream(parts)).await.unwrap_err(), StorageError::Body(_)));
        assert_eq!(b.store.size(&d).await.unwrap(), None);
        assert_eq!((b.reopen)().await.size(&d).await.unwrap(), None);
        assert!(matches!(b.store.read(&d, None).await.err(), Some(StorageError::NotFound)));
    }
}

async fn chunked_upload_spans_parts_and_restarts(b: Backend) {
    // 13 MiB in uneven chunks: parts are cut across chunk boundaries, and the tail carries over between requests.
    let bytes = data(13 * MIB + 5, 3);
    let d = Digest::of(Algorithm::Sha256, &bytes);
    b.store.upload_start("u-1").await.unwrap();
    let mut offset = 0;
    let mut store = Arc::clone(&b.store);
    for (i, piece) in bytes.chunks(3 * MIB + 1).enumerate() {
        let claim = store.upload_claim("u-1").unwrap();
        let (size, _claim) = store.upload_append(claim, chunked(piece, 100_000)).await.unwrap();
        offset += piece.len() as u64;
        assert_eq!(size, offset);
        if i == 2 {
            // A restart (or another instance) in the middle of the session sees its bytes.
            store = (b.reopen)().await;
            assert_eq!(store.upload_size("u-1").await.unwrap(), Some(offset));
        }
    }
    // A wrong digest discards the session; nothing becomes visible.
    let wrong = Digest::of(Algorithm::Sha256, b"something else");
    let claim = store.upload_claim("u-1").unwrap();
    assert!(matches!(store.upload_commit(claim, &wrong).await.unwrap_err(), StorageError::DigestMismatch { .. }));
    assert_eq!(store.size(&wrong).await.unwrap(), None);
    assert_eq!(store.upload_size("u-1").await.unwrap(), None);
    // The right one, again from the start.
    store.upload_start("u-2").await.unwrap();
    let claim = store.upload_claim("u-2").unwrap();
    let (_, claim) = store.upload_append(claim, chunked(&bytes[..MIB], 4096)).await.unwrap();
    let (_, claim) = store.upload_append(claim, chunked(&bytes[MIB..], MIB)).await.unwrap();
    assert_eq!(store.upload_commit(claim, &d).await.unwrap(), bytes.len() as u64);
    assert_eq!(collect(store.read(&d, None).await.unwrap()).await, bytes);
    assert_eq!(store.upload_size("u-2").await.unwrap(), None);
}

async fn broken_chunk_keeps_what_arrived(b: Backend) {
    let bytes = data(6 * MIB, 11);
    let d = Digest::of(Algorithm::Sha256, &bytes);
    b.store.upload_start("u-3").await.unwrap();
    let claim = b.store.upload_claim("u-3").unwrap();
    let mut parts: Vec<io::Result<Bytes>> = bytes[..4 * MIB].chunks(MIB).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    parts.push(Err(io::Error::other("cut")));
    assert!(matches!(b.store.upload_append(claim, stream(parts)).await.unwrap_err(), StorageError::Body(_)));
    let kept = b.store.upload_size("u-3").await.unwrap().unwrap();
    assert_eq!(kept, 4 * MIB as u64);
    let claim = b.store.upload_claim("u-3").unwrap();
    let (_, claim) = b.store.upload_append(claim, chunked(&bytes[kept as usize..], MIB)).await.unwrap();
    assert_eq!(b.store.upload_commit(claim, &d).await.unwrap(), bytes.len() as u64);
    assert_eq!(collect(b.store.read(&d, None).await.unwrap()).await, bytes);
}

async fn claims_serialise_and_abort_discards(b: Backend) {
    b.store.upload_start("u-4").await.unwrap();
    let claim = b.store.upload_claim("u-4").unwrap();
    assert!(matches!(b.store.upload_claim("u-4").unwrap_err(), StorageError::Busy));
    let (_, claim) = b.store.upload_append(claim, chunked(&data(6 * MIB, 1), MIB)).await.unwrap();
    b.store.upload_abort(claim).await.unwrap();
    assert_eq!(b.store.upload_size("u-4").await.unwrap(), None);
    // Ids that are not ours never reach a path or key.
    assert!(b.store.upload_size("../etc").await.unwrap_or(None).is_none());
}

async fn adopt_and_delete(b: Backend) {
    let bytes = data(7 * MIB, 5);
    let d = Digest::of(Algorithm::Sha256, &bytes);
    let spool = tempfile::tempdir().unwrap();
    let file = spool.path().join("fill");
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(b.store.adopt_file(&d, &file).await.unwrap(), bytes.len() as u64);
    assert!(!file.exists(), "the spool file is consumed");
    assert_eq!(collect(b.store.read(&d, None).await.unwrap()).await, bytes);
    b.store.delete(&d).await.unwrap();
    assert_eq!(b.store.size(&d).await.unwrap(), None);
    assert_eq!((b.reopen)().await.size(&d).await.unwrap(), None);
    b.store.delete(&d).await.unwrap();
}

async fn listing_pages_in_digest_order(b: Backend) {
    let mut stored = Vec::new();
    for seed in 0..23u64 {
        let bytes = data(100 + seed as usize, 100 + seed);
        let d = Digest::of(if seed % 5 == 0 { Algorithm::Sha512 } else { Algorithm::Sha256 }, &bytes);
        b.store.put(&d, stream(vec![Ok(Bytes::from(bytes.clone()))])).await.unwrap();
        stored.push((d, bytes.len() as u64));
    }
    // An upload in progress and a discarded write are not blobs.
    b.store.upload_start("3f1c2a9e-0000-4000-8000-000000000001").await.unwrap();
    let bad = data(50, 999);
    let wrong = Digest::of(Algorithm::Sha256, b"something else");
    assert!(b.store.put(&wrong, stream(vec![Ok(Bytes::from(bad))])).await.is_err());
    stored.sort();
    let before = std::time::SystemTime::now() + std::time::Duration::from_secs(5);

    let mut listed = Vec::new();
    let mut after: Option<Digest> = None;
    loop {
        let page = b.store.list(after.as_ref(), 4).await.unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.digest.clone());
        listed.extend(page);
    }
    let got: Vec<(Digest, u64)> = listed.iter().map(|l| (l.digest.clone(), l.size)).collect();
    assert_eq!(got, stored, "every blob once, in digest order, with its size");
    assert!(listed.iter().all(|l| l.stored_at <= before && l.stored_at > before - std::time::Duration::from_secs(600)));
    assert_eq!(b.store.list(None, 1000).await.unwrap().len(), stored.len());
    let past_the_end = b.store.list(Some(&stored.last().unwrap().0), 10).await.unwrap();
    assert!(past_the_end.is_empty());

    b.store.delete(&stored[3].0).await.unwrap();
    let after_delete = b.store.list(Some(&stored[2].0), 1).await.unwrap();
    assert_eq!(after_delete[0].digest, stored[4].0, "a removed blob is not listed");
}

async fn delete_many_removes_each_and_skips_the_absent(b: Backend) {
    let mut stored = Vec::new();
    for seed in 0..5u64 {
        let bytes = data(1000 + seed as usize, 300 + seed);
        let d = Digest::of(Algorithm::Sha256, &bytes);
        b.store.put(&d, stream(vec![Ok(Bytes::from(bytes))])).await.unwrap();
        stored.push(d);
    }
    stored.sort();
    let absent = Digest::of(Algorithm::Sha256, b"never stored");
    let gone = [stored[0].clone(), stored[2].clone(), absent, stored[4].clone()];
    let failed = b.store.delete_many(&gone).await;
    assert!(failed.is_empty(), "{failed:?}");
    let left: Vec<Digest> = b.store.list(None, 100).await.unwrap().into_iter().map(|l| l.digest).collect();
    assert_eq!(left, vec![stored[1].clone(), stored[3].clone()]);
    for d in &gone {
        assert_eq!(b.store.size(d).await.unwrap(), None, "{d} is gone, for this handle too");
    }
    assert!(b.store.delete_many(&[]).await.is_empty());
}

macro_rules! on_each_backend {
    ($($case:ident),* $(,)?) => {
        mod local_disk {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() { super::$case(super::local().await).await })*
        }
        mod s3 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() { super::$case(super::s3().await).await })*
        }
    };
}

on_each_backend!(
    put_verifies_and_reads_ranges,
    open_gives_the_size_and_streams_windows,
    mismatch_and_broken_body_leave_nothing_visible,
    chunked_upload_spans_parts_and_restarts,
    broken_chunk_keeps_what_arrived,
    claims_serialise_and_abort_discards,
    adopt_and_delete,
    listing_pages_in_digest_order,
    delete_many_removes_each_and_skips_the_absent,
);

// ---- S3 only ------------------------------------------------------------------------------------------------

/// Everything a finished or discarded write leaves in the bucket: only blobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_leaves_only_blobs_behind() {
    let server = S3Server::start();
    let store = S3Store::open(&settings(&server, false)).await.unwrap();
    let big = data(11 * MIB, 9);
    let d = Digest::of(Algorithm::Sha256, &big);
    store.put(&d, chunked(&big, MIB)).await.unwrap();
    let mut wrong = big.clone();
    wrong[0] ^= 1;
    let _ = store.put(&Digest::of(Algorithm::Sha256, b"x"), chunked(&wrong, MIB)).await.unwrap_err();
    store.upload_start("u-5").await.unwrap();
    let claim = store.upload_claim("u-5").unwrap();
    let (_, claim) = store.upload_append(claim, chunked(&big, MIB)).await.unwrap();
    store.upload_commit(claim, &d).await.unwrap();
    // The abort of a mismatched put runs in the background; let it land.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(server.keys(), vec![format!("suite/blobs/sha256/{}", d.hex())]);
}

/// A redirect URL is presigned: it fetches the blob without credentials, and a tampered one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_redirect_urls_are_presigned() {
    let server = S3Server::start();
    let store = S3Store::open(&settings(&server, true)).await.unwrap();
    let bytes = data(MIB, 2);
    let d = Digest::of(Algorithm::Sha256, &bytes);
    store.put(&d, chunked(&bytes, 65536)).await.unwrap();
    let url = store.redirect(&d).await.unwrap().expect("a redirect URL");
    let got = reqwest::get(&url).await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), bytes.as_slice());
    let tampered = url.replace(d.hex(), &Digest::of(Algorithm::Sha256, b"other").hex().to_string());
    assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 403);
    let off = S3Store::open(&settings(&server, false)).await.unwrap();
    assert_eq!(off.redirect(&d).await.unwrap(), None);
}

/// Wrong credentials and an unreachable endpoint fail at open, with the store's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_open_checks_credentials_and_endpoint() {
    let server = S3Server::start();
    let mut bad = settings(&server, false);
    bad.secret_access_key = Some(Secret::from("wrong".to_string()));
    let err = S3Store::open(&bad).await.err().expect("wrong secret refused").to_string();
    assert!(err.contains("403") || err.to_lowercase().contains("signature"), "{err}");
    let mut gone = settings(&server, false);
    gone.endpoint = Some(format!("http://127.0.0.1:{}", common::free_port()));
    let err = S3Store::open(&gone).await.err().expect("unreachable endpoint refused").to_string();
    assert!(!err.is_empty());
}

/// The object store sweep removes a session that has no row any more (its parts included) and keeps live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_sweep_removes_sessions_without_a_row() {
    let server = S3Server::start();
    let store = S3Store::open(&settings(&server, false)).await.unwrap();
    for id in ["orphan", "alive"] {
        store.upload_start(id).await.unwrap();
        let claim = store.upload_claim(id).unwrap();
        store.upload_append(claim, chunked(&data(7 * MIB, 4), MIB)).await.unwrap();
    }
    assert_eq!(server.multipart_in_progress(), 2);
    let live = |id: String| async move { id == "alive" };
    assert_eq!(store.sweep_abandoned(std::time::Duration::ZERO, live).await.unwrap(), 1);
    assert_eq!(store.upload_size("orphan").await.unwrap(), None);
    assert_eq!(store.upload_size("alive").await.unwrap(), Some(7 * MIB as u64));
    assert_eq!(server.multipart_in_progress(), 1);
    assert!(server.keys().iter().all(|k| !k.contains("orphan")), "{:?}", server.keys());
}

/// A chunked upload's digest is computed while its bytes arrive: the commit does not read the parts back (bytes
/// changed behind the store's back after the appends go unnoticed, which is how the test sees it), while a store
/// without that running digest (a restart, another instance) hashes the stored parts and refuses changed bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_commit_uses_the_digest_computed_while_bytes_arrived() {
    let server = S3Server::start();
    let bytes = data(12 * MIB, 8);
    let d = Digest::of(Algorithm::Sha256, &bytes);
    // Flips one byte in every stored part of every multipart upload in progress (s3s-fs keeps them as files).
    let tamper = || {
        for e in std::fs::read_dir(server.root.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().contains(".part-") {
                let mut b = std::fs::read(e.path()).unwrap();
                b[100] ^= 1;
                std::fs::write(e.path(), b).unwrap();
            }
        }
    };
    for (id, restart) in [("carried", false), ("rehashed", true)] {
        let mut store = S3Store::open(&settings(&server, false)).await.unwrap();
        store.upload_start(id).await.unwrap();
        let claim = store.upload_claim(id).unwrap();
        let (_, claim) = store.upload_append(claim, chunked(&bytes[..7 * MIB], MIB)).await.unwrap();
        let (_, claim) = store.upload_append(claim, chunked(&bytes[7 * MIB..], MIB)).await.unwrap();
        drop(claim);
        tamper();
        if restart {
            store = S3Store::open(&settings(&server, false)).await.unwrap();
        }
        let claim = store.upload_claim(id).unwrap();
        let outcome = store.upload_commit(claim, &d).await;
        if restart {
            assert!(matches!(outcome, Err(StorageError::DigestMismatch { .. })), "{outcome:?}");
        } else {
            assert_eq!(outcome.unwrap(), bytes.len() as u64);
            store.delete(&d).await.unwrap();
        }
    }
}

/// A chunked upload above the copy limit (AWS copies at most 5 GiB in one request) is streamed back into the
/// store under its digest rather than copied there, and that read is its verification: bytes changed behind the
/// store's back after the appends are refused even though the running digest matched (the copy path, which
/// trusts the running digest, would have stored them), and an untouched upload is stored whole, once, with
/// nothing of its session left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_uploads_above_the_copy_limit_are_streamed_under_their_digest() {
    let server = S3Server::start();
    let mut s = settings(&server, false);
    s.copy_limit = 6 * MIB as u64;
    let store = S3Store::open(&s).await.unwrap();
    let bytes = data(13 * MIB, 9);
    let d = Digest::of(Algorithm::Sha256, &bytes);
    for (id, tampered) in [("tampered", true), ("intact", false)] {
        store.upload_start(id).await.unwrap();
        let claim = store.upload_claim(id).unwrap();
        let (_, claim) = store.upload_append(claim, chunked(&bytes[..7 * MIB], MIB)).await.unwrap();
        let (_, claim) = store.upload_append(claim, chunked(&bytes[7 * MIB..], MIB)).await.unwrap();
        drop(claim);
        if tampered {
            let part = std::fs::read_dir(server.root.path()).unwrap().flatten().find(|e| e.file_name().to_string_lossy().contains(".part-"));
            let path = part.expect("a part stored by s3s-fs").path();
            let mut b = std::fs::read(&path).unwrap();
            b[100] ^= 1;
            std::fs::write(&path, b).unwrap();
        }
        let outcome = store.upload_commit(store.upload_claim(id).unwrap(), &d).await;
        if tampered {
            assert!(matches!(outcome, Err(StorageError::DigestMismatch { .. })), "{outcome:?}");
            assert_eq!(store.stat(&d).await.unwrap(), None, "changed bytes became visible");
        } else {
            assert_eq!(outcome.unwrap(), bytes.len() as u64);
        }
    }
    assert_eq!(collect(store.read(&d, None).await.unwrap()).await, bytes);
    assert_eq!(server.multipart_in_progress(), 0);
    let left: Vec<String> = server.keys().into_iter().filter(|k| !k.starts_with("suite/blobs/")).collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A stored blob is never written over: putting it again (a second push of the same layer) only hashes the body,
/// and a wrong body for a stored digest is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_stored_blob_is_not_rewritten() {
    let server = S3Server::start();
    let store = S3Store::open(&settings(&server, false)).await.unwrap();
    let big = data(11 * MIB, 12);
    let d = Digest::of(Algorithm::Sha256, &big);
    store.put(&d, chunked(&big, MIB)).await.unwrap();
    let file = server.root.path().join(BUCKET).join(format!("suite/blobs/sha256/{}", d.hex()));
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(store.put(&d, chunked(&big, MIB)).await.unwrap(), big.len() as u64);
    let mut wrong = big.clone();
    wrong[9 * MIB] ^= 1;
    assert!(matches!(store.put(&d, chunked(&wrong, MIB)).await.unwrap_err(), StorageError::DigestMismatch { .. }));
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), before, "the object was written again");
    assert_eq!(server.multipart_in_progress(), 0);
    assert_eq!(collect(store.read(&d, None).await.unwrap()).await, big);
}

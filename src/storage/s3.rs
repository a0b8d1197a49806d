//! The S3-compatible blob store (AWS S3, MinIO, Ceph RGW, s3s-fs, R2/GCS in S3 mode), through `object_store`.
//!
//! Layout under the configured prefix:
//! - `blobs/<alg>/<hex>`: committed blobs, written only once their bytes were verified;
//! - `uploads/<id>/state`: a chunked upload session (JSON `SessionState`): its multipart upload, the parts sent
//!   so far, and how many bytes sit in `uploads/<id>/tail-<size>`, the end of the upload not yet large enough to
//!   be a part (S3 wants at least 5 MiB per part but the last); named by the upload size it ends at, so that a new
//!   tail never overwrites the one the saved state names (a crash between the two writes leaves a consistent
//!   session);
//! - `uploads/<id>/data`: where a session's multipart upload is completed, to be verified and then copied under
//!   its digest (the digest of a chunked upload is known only at its end, after its key was chosen);
//! - `uploads/put-<uuid>`: the journal of a whole-blob write in progress (its multipart upload), so that one cut
//!   short by a crash is found and aborted by `sweep_abandoned`.
//!
//! Why nothing partial is ever visible: a whole-blob write of more than one part streams into a multipart upload
//! under its final key, which S3 makes visible only at `CompleteMultipartUpload`, sent only after the hash matched
//! (a smaller blob is held in memory, verified, then put in one request); a chunked upload becomes visible under
//! its digest only by the copy that follows its verification.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::aws_profile;
use super::carry::Carry;
use super::{BlobStore, ByteRange, ByteStream, StorageError, StoredBlob, UploadClaim, UploadSessions};
use crate::bounded::BoundedMap;
use crate::oci::Digest;
use crate::secret::Secret;

/// S3's smallest part but the last. Parts are at least this, so any part size a user sets below it is raised.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// Bytes per part by default: each upload in progress holds at most one part (plus a request body chunk) in memory.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// How long a presigned URL of a redirect is valid by default: long enough for a client to start its download
/// (the download itself may last longer), short enough that a leaked URL is soon worthless.
pub const DEFAULT_REDIRECT_EXPIRY: Duration = Duration::from_secs(300);
/// The largest object S3 copies in one `CopyObject` request (AWS refuses more than 5 GiB). A chunked upload
/// above it is moved under its digest by streaming it into a new multipart upload instead.
pub const DEFAULT_COPY_LIMIT: u64 = 5 * 1024 * 1024 * 1024;

/// An S3-compatible store, resolved from flags, the config file and the standard AWS environment.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix of everything breakwater writes (no leading or trailing slash; may be empty).
    pub prefix: String,
    /// The service URL (MinIO, Ceph, s3s-fs...); `AWS_ENDPOINT_URL` otherwise, AWS itself without either.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`) rather than virtual-hosted (`BUCKET.ENDPOINT/KEY`);
    /// by default on whenever an endpoint is given, as MinIO, Ceph and s3s-fs expect.
    pub path_style: Option<bool>,
    /// Static credentials; without them, the AWS environment variables, then the AWS shared files' profile
    /// (`aws_profile`), then container and instance metadata.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// Answer blob GETs with a redirect to a presigned URL instead of streaming the bytes.
    pub redirect: bool,
    pub redirect_expiry: Duration,
    pub part_size: usize,
    /// Chunked uploads larger than this are not copied under their digest by the store (`CopyObject`) but
    /// streamed through breakwater into a multipart upload there (and hashed on the way).
    pub copy_limit: u64,
    /// A PEM file of CAs to trust for the endpoint (a private CA); `AWS_CA_BUNDLE` or the profile's
    /// `ca_bundle` otherwise.
    pub ca_file: Option<PathBuf>,
}

impl S3Settings {
    /// `s3://BUCKET/PREFIX` with everything else at its default.
    pub fn from_url(url: &str) -> Result<S3Settings, String> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| format!("{url}: an S3 storage URL starts with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("{url}: no bucket (s3://BUCKET/PREFIX)"));
        }
        Ok(S3Settings {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            region: None,
            path_style: None,
            access_key_id: None,
            secret_access_key: None,
            redirect: false,
            redirect_expiry: DEFAULT_REDIRECT_EXPIRY,
            part_size: DEFAULT_PART_SIZE,
            copy_limit: DEFAULT_COPY_LIMIT,
            ca_file: None,
        })
    }
}

/// A chunked upload session as stored in `uploads/<id>/state`. Rewritten after every request on the session,
/// always after the parts and tail it names were written: it never names bytes that are not stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SessionState {
    /// The multipart upload at `uploads/<id>/data`, once the upload reached one part.
    multipart: Option<String>,
    /// ETags of the parts sent, in order (part numbers are positions).
    parts: Vec<String>,
    /// Bytes received in all: those in the parts, then the tail's (part sizes are not derived from the current
    /// part size, which a restart with another setting may change).
    size: u64,
    /// Of which the last `tail` bytes are in `uploads/<id>/tail-<size>` rather than in a part.
    tail: u64,
}

/// A whole-blob write in progress, as journaled in `uploads/put-<uuid>`.
#[derive(Debug, Serialize, Deserialize)]
struct PutJournal {
    key: String,
    multipart: String,
}

/// What the store's handles share: request futures and the tasks that outlive them (appends, commits).
struct Inner {
    s3: Arc<AmazonS3>,
    prefix: String,
    sessions: UploadSessions,
    /// Sizes of blobs known to be stored: a blob's size never changes, so a HEAD or a manifest check answers from
    /// here without a request to the store. Entries leave on `delete` (and by the map's bound).
    sizes: BoundedMap<Digest, u64>,
    redirect: Option<Duration>,
    part_size: usize,
    copy_limit: u64,
    /// The digests of sessions computed while their bytes arrive, so that a commit need not read the upload
    /// back from the store (see `carry`).
    carry: Carry,
}

fn store_error(e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound,
        e => StorageError::Io(io::Error::other(e)),
    }
}

/// A handle on the store; clones share the client, the upload claims and the size cache.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

impl S3Store {
    /// Connects to the store and checks, by listing the prefix, that it answers and that the credentials are
    /// accepted: a wrong key or an unreachable endpoint fails here, at start-up, not at the first push.
    pub async fn open(settings: &S3Settings) -> Result<S3Store, StorageError> {
        let s3 = Arc::new(build(settings)?);
        let inner = Inner {
            s3,
            prefix: settings.prefix.clone(),
            sessions: UploadSessions::default(),
            sizes: BoundedMap::new("s3_blob_sizes", crate::bounded::DEFAULT_ENTRIES, None),
            redirect: settings.redirect.then_some(settings.redirect_expiry),
            part_size: settings.part_size.max(MIN_PART_SIZE),
            copy_limit: settings.copy_limit,
            carry: Carry::default(),
        };
        let store = S3Store { inner: Arc::new(inner) };
        store.check().await?;
        Ok(store)
    }

    /// Cleans what a crash or a lost request left in `uploads/`, once older than `grace` (which must exceed the
    /// longest push): whole-blob writes cut short, and upload sessions that `live` says have no session row.
    pub async fn sweep_abandoned<F, Fut>(&self, grace: Duration, live: F) -> Result<u64, StorageError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        self.inner.sweep_abandoned(grace, live).await
    }
}

impl Inner {
    /// Whether the store answers with these credentials (start-up and `/readyz`).
    pub async fn check(&self) -> Result<(), StorageError> {
        // Every error is reported whole (a missing bucket is the store's "not found", not a missing blob).
        self.s3.list_with_delimiter(Some(&self.key("uploads"))).await.map_err(|e| StorageError::Io(io::Error::other(e)))?;
        Ok(())
    }

    fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn blob_key(&self, d: &Digest) -> Key {
        self.key(&format!("blobs/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    /// Keys of upload session `id`; ids come from requests, so only ours pass (`is_upload_id`).
    fn session_key(&self, id: &str, part: &str) -> Result<Key, StorageError> {
        if !super::is_upload_id(id) {
            return Err(StorageError::NotFound);
        }
        Ok(self.key(&format!("uploads/{id}/{part}")))
    }

    async fn exists(&self, d: &Digest) -> Result<Option<u64>, StorageError> {
        if let Some(size) = self.sizes.get(d) {
            return Ok(Some(size));
        }
        match self.s3.head(&self.blob_key(d)).await {
            Ok(meta) => {
                self.sizes.insert(d.clone(), meta.size);
                Ok(Some(meta.size))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn load_state(&self, id: &str) -> Result<SessionState, StorageError> {
        let bytes = self.s3.get(&self.session_key(id, "state")?).await.map_err(store_error)?.bytes().await.map_err(store_error)?;
        serde_json::from_slice(&bytes).map_err(|e| StorageError::Io(io::Error::other(format!("upload {id}: bad session state: {e}"))))
    }

    async fn save_state(&self, id: &str, state: &SessionState) -> Result<(), StorageError> {
        let json = serde_json::to_vec(state).map_err(|e| StorageError::Io(io::Error::other(e)))?;
        self.s3.put(&self.session_key(id, "state")?, PutPayload::from(json)).await.map_err(store_error)?;
        Ok(())
    }

    /// The bytes of session `id` not yet in a part.
    async fn load_tail(&self, id: &str, state: &SessionState) -> Result<Pending, StorageError> {
        let mut buf = Pending::default();
        if state.tail > 0 {
            let tail = self.s3.get(&self.session_key(id, &format!("tail-{}", state.size))?).await.map_err(store_error)?.bytes().await.map_err(store_error)?;
            if tail.len() as u64 != state.tail {
                return Err(StorageError::Io(io::Error::other(format!("upload {id}: tail holds {} bytes, state says {}", tail.len(), state.tail))));
            }
            buf.push(tail);
        }
        Ok(buf)
    }

    /// Sends `part` as the next part of session `id`, creating its multipart upload on the first.
    async fn send_part(&self, id: &str, state: &mut SessionState, part: PutPayload) -> Result<(), StorageError> {
        let data = self.session_key(id, "data")?;
        let multipart = match &state.multipart {
            Some(m) => m.clone(),
            None => {
                let m = self.s3.create_multipart(&data).await.map_err(store_error)?;
                // Recorded at once in the saved state (whose sizes, of before this request, are still true): a
                // crash from here on leaves an upload that the session's abort or purge finds and aborts.
                let mut saved = self.load_state(id).await?;
                saved.multipart = Some(m.clone());
                self.save_state(id, &saved).await?;
                state.multipart = Some(m.clone());
                m
            }
        };
        let PartId { content_id } = self.s3.put_part(&data, &multipart, state.parts.len(), part).await.map_err(store_error)?;
        state.parts.push(content_id);
        Ok(())
    }

    /// Appends `body` to session `id`: full parts go out as they fill, the rest is saved as the tail; the state
    /// is saved last, also when the body broke (what arrived is kept, as on disk).
    async fn append(&self, id: &str, mut body: ByteStream) -> Result<u64, StorageError> {
        let mut state = self.load_state(id).await?;
        let mut buf = self.load_tail(id, &state).await?;
        let old_tail = (state.tail > 0).then_some(state.size);
        // Fed every byte received: all of them are in the saved state at the end, or an error returns early and
        // the running digest is dropped (the commit then hashes the stored bytes).
        let mut running = self.carry.resume(id, state.size);
        let mut failure = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    if let Some(r) = running.as_mut() {
                        r.update(&bytes);
                    }
                    buf.push(bytes);
                    while buf.len() >= self.part_size {
                        // The tail went into this part: from here on it is in a part, not in the tail object.
                        let part = buf.take(self.part_size);
                        state.size += part.content_length() as u64 - state.tail;
                        state.tail = 0;
                        self.send_part(id, &mut state, part).await?;
                    }
                }
                Err(e) => {
                    failure = Some(StorageError::Body(e));
                    break;
                }
            }
        }
        state.size += buf.len() as u64 - state.tail;
        state.tail = buf.len() as u64;
        if state.tail > 0 && old_tail != Some(state.size) {
            let key = self.session_key(id, &format!("tail-{}", state.size))?;
            self.s3.put(&key, buf.take_all()).await.map_err(store_error)?;
        }
        self.save_state(id, &state).await?;
        if let Some(r) = running {
            self.carry.keep(id, state.size, r);
        }
        if let Some(old) = old_tail.filter(|&old| state.tail == 0 || old != state.size) {
            let _ = self.s3.delete(&self.session_key(id, &format!("tail-{old}"))?).await;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(state.size),
        }
    }

    /// Verifies session `id` against `expected` and stores it under its digest; the session's objects go either way.
    async fn commit(&self, id: &str, expected: &Digest) -> Result<u64, StorageError> {
        let mut state = self.load_state(id).await?;
        let carried = self.carry.finish(id, state.size, expected);
        let mut tail = self.load_tail(id, &state).await?;
        let result = if state.multipart.is_none() {
            // Smaller than a part: the whole upload is the tail, in memory.
            self.put_verified(expected, tail).await
        } else {
            if !tail.is_empty() {
                self.send_part(id, &mut state, tail.take_all()).await?;
            }
            self.commit_multipart(id, &state, expected, carried).await
        };
        self.remove_session(id, &state).await;
        result
    }

    async fn commit_multipart(
        &self,
        id: &str,
        state: &SessionState,
        expected: &Digest,
        carried: Option<Digest>,
    ) -> Result<u64, StorageError> {
        let data = self.session_key(id, "data")?;
        let multipart = state.multipart.clone().unwrap_or_default();
        let parts = state.parts.iter().map(|p| PartId { content_id: p.clone() }).collect();
        self.s3.complete_multipart(&data, &multipart, parts).await.map_err(store_error)?;
        if state.size > self.copy_limit {
            // Too big for one CopyObject: read it back into a multipart upload under its digest, hashing it on
            // the way (the one read serves as the verification, so the running digest is not needed; a blob
            // stored already is only hashed).
            let body = self.s3.get(&data).await.map_err(store_error)?.into_stream().map_err(io::Error::other);
            return self.stream_to(expected, Box::pin(body), true).await;
        }
        let (actual, size) = match carried {
            Some(digest) => (digest, state.size),
            None => self.hash_object(&data, expected).await?,
        };
        if &actual != expected {
            return Err(StorageError::DigestMismatch { expected: expected.clone(), actual });
        }
        if self.exists(expected).await?.is_none() {
            self.s3.copy(&data, &self.blob_key(expected)).await.map_err(store_error)?;
        }
        self.sizes.insert(expected.clone(), size);
        Ok(size)
    }

    /// The digest (under `like`'s algorithm) and size of the object at `key`, read back from the store: for the
    /// bytes of a session that arrived on other instances, before a restart, or whose running digest was lost.
    async fn hash_object(&self, key: &Key, like: &Digest) -> Result<(Digest, u64), StorageError> {
        let mut hasher = like.algorithm().hasher();
        let mut size = 0u64;
        let mut stream = self.s3.get(key).await.map_err(store_error)?.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(store_error)?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
        }
        Ok((hasher.finish(), size))
    }

    /// Removes what session `id` left in the store (best effort: the sweep finds what a failure here leaves).
    async fn remove_session(&self, id: &str, state: &SessionState) {
        self.carry.forget(id);
        let Ok(data) = self.session_key(id, "data") else { return };
        if let Some(m) = &state.multipart {
            // Fails harmlessly once the upload was completed.
            let _ = self.s3.abort_multipart(&data, m).await;
        }
        // Everything under the session's prefix: its state, data and every tail (a crash may have left an old one).
        let prefix = self.key(&format!("uploads/{id}"));
        let keys: Vec<Key> = self.s3.list(Some(&prefix)).map_ok(|m| m.location).filter_map(|r| async { r.ok() }).collect().await;
        for k in keys {
            let _ = self.s3.delete(&k).await;
        }
    }

    /// Stores `bytes`, held whole in memory, under `expected` if they hash to it.
    async fn put_verified(&self, expected: &Digest, mut bytes: Pending) -> Result<u64, StorageError> {
        let mut hasher = expected.algorithm().hasher();
        bytes.chunks.iter().for_each(|c| hasher.update(c));
        let actual = hasher.finish();
        if &actual != expected {
            return Err(StorageError::DigestMismatch { expected: expected.clone(), actual });
        }
        let size = bytes.len() as u64;
        if self.exists(expected).await?.is_none() {
            self.s3.put(&self.blob_key(expected), bytes.take_all()).await.map_err(store_error)?;
            self.sizes.insert(expected.clone(), size);
        }
        Ok(size)
    }

    /// Streams `body` to the key of `expected`: one request if it fits in a part, a multipart upload otherwise,
    /// completed only if `verify` (hashing on the way) finds the digest equal. With `verify` off the caller has
    /// verified the bytes already (a cache fill).
    async fn stream_to(&self, expected: &Digest, mut body: ByteStream, verify: bool) -> Result<u64, StorageError> {
        let mut hasher = expected.algorithm().hasher();
        let mut buf = Pending::default();
        let mut upload: Option<JournaledUpload> = None;
        // Set when the blob turns out to be stored already: the rest is only hashed (the client must still send
        // the right bytes), never written over the stored object.
        let mut stored = false;
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(StorageError::Body)?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if stored {
                continue;
            }
            buf.push(chunk);
            while buf.len() >= self.part_size {
                let part = buf.take(self.part_size);
                if upload.is_none() {
                    if self.exists(expected).await?.is_some() {
                        stored = true;
                        buf = Pending::default();
                        break;
                    }
                    upload = Some(JournaledUpload::start(self, expected).await?);
                }
                if let Some(u) = upload.as_mut() {
                    u.send(part).await?;
                }
            }
        }
        let actual = hasher.finish();
        if verify && &actual != expected {
            return Err(StorageError::DigestMismatch { expected: expected.clone(), actual });
        }
        match upload {
            None if stored => {}
            None => {
                if self.exists(expected).await?.is_none() {
                    self.s3.put(&self.blob_key(expected), buf.take_all()).await.map_err(store_error)?;
                }
            }
            Some(mut u) => {
                if !buf.is_empty() {
                    u.send(buf.take_all()).await?;
                }
                u.complete().await?;
            }
        }
        self.sizes.insert(expected.clone(), size);
        Ok(size)
    }

    /// Cleans what a crash or a lost request left in `uploads/`, once older than `grace` (which must exceed the
    /// longest push: a journal's age is that of its write): whole-blob writes, whose multipart upload is aborted by
    /// their journal, and upload sessions that `live` says have no session row any more (a crash between the row's
    /// removal and the objects'). Returns how many were cleaned.
    async fn sweep_abandoned<F, Fut>(&self, grace: Duration, live: F) -> Result<u64, StorageError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let cutoff = unix_seconds_ago(grace);
        let mut listing = self.s3.list(Some(&self.key("uploads")));
        let mut cleaned = 0;
        while let Some(meta) = listing.try_next().await.map_err(store_error)? {
            if meta.last_modified.timestamp() > cutoff {
                continue;
            }
            let name = meta.location.filename().unwrap_or_default().to_string();
            if name.starts_with("put-") {
                self.abort_journaled(&meta.location).await;
                cleaned += 1;
            } else if name == "state" {
                let parts: Vec<_> = meta.location.parts().collect();
                let Some(id) = parts.len().checked_sub(2).map(|i| parts[i].as_ref().to_string()) else { continue };
                if live(id.clone()).await {
                    continue;
                }
                // Under the session's claim, like any request on it; one in progress keeps it.
                let Ok(_claim) = self.sessions.claim(&id) else { continue };
                if let Ok(state) = self.load_state(&id).await {
                    self.remove_session(&id, &state).await;
                    cleaned += 1;
                }
            }
        }
        Ok(cleaned)
    }

    async fn abort_journaled(&self, journal: &Key) {
        if let Ok(got) = self.s3.get(journal).await {
            if let Ok(bytes) = got.bytes().await {
                if let Ok(j) = serde_json::from_slice::<PutJournal>(&bytes) {
                    let _ = self.s3.abort_multipart(&Key::from(j.key), &j.multipart).await;
                }
            }
        }
        let _ = self.s3.delete(journal).await;
    }
}

/// Unix seconds `grace` ago.
fn unix_seconds_ago(grace: Duration) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.saturating_sub(grace).as_secs() as i64
}

/// Bytes waiting to become a part (or a tail, or a small blob): the request body's own buffers, never copied
/// into one (a part goes out as the list of them), so a push holds about one part of them and no reallocated
/// copies of it.
#[derive(Default)]
struct Pending {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Pending {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `n` bytes (at most `len`), splitting the chunk at the boundary without copying it.
    fn take(&mut self, n: usize) -> PutPayload {
        let mut out = Vec::new();
        let mut need = n.min(self.len);
        while need > 0 {
            let Some(mut c) = self.chunks.pop_front() else { break };
            if c.len() > need {
                self.chunks.push_front(c.split_off(need));
            }
            need -= c.len();
            self.len -= c.len();
            out.push(c);
        }
        out.into_iter().collect()
    }

    fn take_all(&mut self) -> PutPayload {
        self.take(self.len)
    }
}

/// A multipart upload under a blob's final key, journaled so that a crash leaves it findable. Dropped before
/// `complete` (an error, a mismatch, a cancelled request), it aborts the upload in the background: nothing of it
/// ever becomes visible.
struct JournaledUpload {
    s3: Arc<AmazonS3>,
    key: Key,
    journal: Key,
    multipart: String,
    parts: Vec<PartId>,
    done: bool,
}

impl JournaledUpload {
    async fn start(store: &Inner, digest: &Digest) -> Result<JournaledUpload, StorageError> {
        let key = store.blob_key(digest);
        let multipart = store.s3.create_multipart(&key).await.map_err(store_error)?;
        let journal = store.key(&format!("uploads/put-{}", uuid::Uuid::new_v4()));
        let upload =
            JournaledUpload { s3: Arc::clone(&store.s3), key, journal, multipart, parts: Vec::new(), done: false };
        let record = PutJournal { key: upload.key.to_string(), multipart: upload.multipart.clone() };
        let json = serde_json::to_vec(&record).map_err(|e| StorageError::Io(io::Error::other(e)))?;
        store.s3.put(&upload.journal, PutPayload::from(json)).await.map_err(store_error)?;
        Ok(upload)
    }

    async fn send(&mut self, part: PutPayload) -> Result<(), StorageError> {
        let id = self.s3.put_part(&self.key, &self.multipart, self.parts.len(), part).await.map_err(store_error)?;
        self.parts.push(id);
        Ok(())
    }

    async fn complete(mut self) -> Result<(), StorageError> {
        let parts = std::mem::take(&mut self.parts);
        self.s3.complete_multipart(&self.key, &self.multipart, parts).await.map_err(store_error)?;
        self.done = true;
        let _ = self.s3.delete(&self.journal).await;
        Ok(())
    }
}

impl Drop for JournaledUpload {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (s3, key, journal, multipart) = (Arc::clone(&self.s3), self.key.clone(), self.journal.clone(), self.multipart.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = s3.abort_multipart(&key, &multipart).await;
                let _ = s3.delete(&journal).await;
            });
        }
    }
}

/// The `object_store` client for `settings`, on top of what the AWS environment says, on top of what the AWS
/// shared files' profile says (the order of every AWS tool: explicit settings, variables, files, metadata).
fn build(settings: &S3Settings) -> Result<AmazonS3, StorageError> {
    let fail = |e: String| StorageError::Io(io::Error::other(e));
    let profile = aws_profile::load(|k| std::env::var(k).ok()).map_err(fail)?.unwrap_or_default();
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&settings.bucket);
    let from_env = |b: &AmazonS3Builder, k: AmazonS3ConfigKey| b.get_config_value(&k).is_some();
    if let Some(e) = settings.endpoint.as_ref().or(profile.endpoint_url.as_ref().filter(|_| !from_env(&b, AmazonS3ConfigKey::Endpoint))) {
        b = b.with_endpoint(e);
    }
    let region_from_env = from_env(&b, AmazonS3ConfigKey::Region) || from_env(&b, AmazonS3ConfigKey::DefaultRegion);
    if let Some(r) = settings.region.as_ref().or(profile.region.as_ref().filter(|_| !region_from_env)) {
        b = b.with_region(r);
    }
    if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
        b = b.with_access_key_id(id).with_secret_access_key(&**secret);
    } else if let (false, Some(id), Some(secret)) =
        (from_env(&b, AmazonS3ConfigKey::AccessKeyId), &profile.access_key_id, &profile.secret_access_key)
    {
        b = b.with_access_key_id(id).with_secret_access_key(secret);
        if let Some(token) = &profile.session_token {
            b = b.with_token(token);
        }
    }
    let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let path_style = settings.path_style.unwrap_or(endpoint.is_some());
    b = b.with_virtual_hosted_style_request(!path_style);
    // A few quick retries: an unreachable store should fail start-up within seconds, not object_store's minutes.
    let retry = object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
        backoff: object_store::BackoffConfig::default(),
    };
    let mut client = object_store::ClientOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(300));
    let ca = settings.ca_file.clone().or_else(|| std::env::var_os("AWS_CA_BUNDLE").map(PathBuf::from)).or(profile.ca_bundle);
    if let Some(path) = ca {
        for cert in trusted(&path).map_err(fail)? {
            client = client.with_root_certificate(cert);
        }
    }
    b = b.with_retry(retry).with_client_options(client);
    // After the client options, which hold this flag too.
    if endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) {
        b = b.with_allow_http(true);
    }
    b.build().map_err(|e| fail(e.to_string()))
}

/// The CAs of PEM file `path`, trusted for the store's endpoint beside the system's.
fn trusted(path: &Path) -> Result<Vec<object_store::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    let certs = object_store::Certificate::from_pem_bundle(&pem).map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("CA bundle {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

#[async_trait::async_trait]
impl BlobStore for S3Store {
    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        self.inner.exists(digest).await
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        self.inner.sizes.remove(digest);
        self.inner.exists(digest).await
    }

    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<ByteStream, StorageError> {
        if range.is_some_and(|r| r.start >= r.end) {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let options = GetOptions { range: range.map(|r| GetRange::Bounded(r.start..r.end)), ..Default::default() };
        let got = self.inner.s3.get_opts(&self.inner.blob_key(digest), options).await.map_err(store_error)?;
        Ok(Box::pin(got.into_stream().map_err(io::Error::other)))
    }

    async fn redirect(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        let Some(expiry) = self.inner.redirect else { return Ok(None) };
        let url = self.inner.s3.signed_url(axum::http::Method::GET, &self.inner.blob_key(digest), expiry).await.map_err(store_error)?;
        Ok(Some(url.to_string()))
    }

    async fn put(&self, expected: &Digest, body: ByteStream) -> Result<u64, StorageError> {
        self.inner.stream_to(expected, body, true).await
    }

    async fn adopt_file(&self, digest: &Digest, path: &Path) -> Result<u64, StorageError> {
        let size = if self.inner.exists(digest).await?.is_some() {
            tokio::fs::metadata(path).await?.len()
        } else {
            let file = tokio::fs::File::open(path).await?;
            let body: ByteStream = Box::pin(tokio_util::io::ReaderStream::with_capacity(file.take(u64::MAX), 256 * 1024));
            self.inner.stream_to(digest, body, false).await?
        };
        let _ = tokio::fs::remove_file(path).await;
        Ok(size)
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.inner.check().await
    }

    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<StoredBlob>, StorageError> {
        let blobs = self.inner.key("blobs");
        // S3 lists keys in byte order, which is digest order under `blobs/<alg>/<hex>`; `start-after` begins a
        // page past the last digest of the one before.
        let offset = after.map_or_else(|| blobs.clone(), |d| self.inner.blob_key(d));
        let mut listing = self.inner.s3.list_with_offset(Some(&blobs), &offset);
        let mut out = Vec::new();
        while let Some(meta) = listing.try_next().await.map_err(store_error)? {
            let mut parts = meta.location.parts().skip(blobs.parts().count());
            let (Some(alg), Some(hex), None) = (parts.next(), parts.next(), parts.next()) else { continue };
            let Ok(digest) = format!("{}:{}", alg.as_ref(), hex.as_ref()).parse::<Digest>() else { continue };
            out.push(StoredBlob { digest, size: meta.size, stored_at: meta.last_modified.into() });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        self.inner.sizes.remove(digest);
        match self.inner.s3.delete(&self.inner.blob_key(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn delete_many(&self, digests: &[Digest]) -> Vec<(Digest, StorageError)> {
        for d in digests {
            self.inner.sizes.remove(d);
        }
        // DeleteObjects, up to 1000 keys a request; object_store answers one result per key, in order.
        let keys: Vec<Result<Key, object_store::Error>> = digests.iter().map(|d| Ok(self.inner.blob_key(d))).collect();
        let results: Vec<_> = self.inner.s3.delete_stream(futures_util::stream::iter(keys).boxed()).collect().await;
        if results.len() != digests.len() {
            // Not one answer per key: which failed is unknown, so each is asked again on its own.
            let mut failed = Vec::new();
            for d in digests {
                if let Err(e) = self.delete(d).await {
                    failed.push((d.clone(), e));
                }
            }
            return failed;
        }
        digests
            .iter()
            .zip(results)
            .filter_map(|(d, r)| match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => Some((d.clone(), store_error(e))),
            })
            .collect()
    }

    async fn upload_start(&self, id: &str) -> Result<(), StorageError> {
        self.inner.save_state(id, &SessionState::default()).await
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError> {
        match self.inner.load_state(id).await {
            Ok(s) => Ok(Some(s.size)),
            Err(StorageError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn upload_claim(&self, id: &str) -> Result<UploadClaim, StorageError> {
        self.inner.session_key(id, "state")?;
        self.inner.sessions.claim(id)
    }

    async fn upload_append(&self, claim: UploadClaim, body: ByteStream) -> Result<(u64, UploadClaim), StorageError> {
        // On a task of its own that holds the claim: a client that goes away drops our future, not the writes of
        // parts, tail and state, which finish (the body ends with an error) before the claim comes free.
        let this = Arc::clone(&self.inner);
        let task = tokio::spawn(async move {
            let r = this.append(claim.id(), body).await;
            (r, claim)
        });
        match task.await {
            Ok((Ok(size), claim)) => Ok((size, claim)),
            Ok((Err(e), _)) => Err(e),
            Err(e) => Err(StorageError::Io(io::Error::other(format!("append task failed: {e}")))),
        }
    }

    async fn upload_commit(&self, claim: UploadClaim, expected: &Digest) -> Result<u64, StorageError> {
        let this = Arc::clone(&self.inner);
        let expected = expected.clone();
        let task = tokio::spawn(async move {
            let r = this.commit(claim.id(), &expected).await;
            drop(claim);
            r
        });
        task.await.map_err(|e| StorageError::Io(io::Error::other(format!("commit task failed: {e}"))))?
    }

    async fn upload_abort(&self, claim: UploadClaim) -> Result<(), StorageError> {
        let state = self.inner.load_state(claim.id()).await?;
        self.inner.remove_session(claim.id(), &state).await;
        Ok(())
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(p: PutPayload) -> Vec<u8> {
        p.into_iter().flat_map(|b| b.to_vec()).collect()
    }

    #[test]
    fn pending_parts_split_chunks_at_their_boundary_in_order() {
        let mut p = Pending::default();
        for c in [&b"abc"[..], b"", b"defgh", b"ij"] {
            p.push(Bytes::copy_from_slice(c));
        }
        assert_eq!(p.len(), 10);
        assert_eq!(bytes_of(p.take(4)), b"abcd");
        assert_eq!(bytes_of(p.take(3)), b"efg");
        assert_eq!(p.len(), 3);
        assert_eq!(bytes_of(p.take(99)), b"hij", "a take beyond the end is the rest");
        assert!(p.is_empty());
        assert_eq!(bytes_of(p.take_all()), b"");
    }
}

//! Content-addressed bytes. A blob is stored once under its digest, whatever the number of repositories that
//! hold it (which repositories do is `meta`'s business).
//!
//! Architecture invariant: a blob becomes readable under its digest only after its bytes were hashed, found
//! equal to the digest, and made durable. Readers never see a partial blob. A stored blob is never replaced
//! (storing its digest again discards the newcomer) nor written to (see `UploadClaim`).

mod aws_profile;
pub mod carry;
mod local;
pub mod migrate;
mod open_maps;
mod s3;

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::Stream;

use crate::oci::Digest;

pub use local::LocalStore;
pub use s3::{S3Settings, S3Store};

/// A stream of bytes moving through breakwater: a request body coming in or a blob going out.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    #[error("content digest {actual} does not match {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// The incoming stream failed (typically the client went away); nothing was committed.
    #[error("reading the request body failed: {0}")]
    Body(io::Error),
    /// Another request holds the upload session (see `UploadClaim`).
    #[error("another request on this upload session is in progress")]
    Busy,
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Whether `id` can be an upload session id (ours are UUIDs: letters, digits, dashes). Ids come from request
/// paths, so every backend checks this before an id reaches a path or a key.
pub fn is_upload_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// An inclusive-exclusive byte window of a blob: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// A committed blob opened for a download (`BlobStore::open`).
pub struct OpenBlob {
    pub size: u64,
    /// The bytes, when the store opened them with the size; `None` means `BlobStore::read` streams them.
    pub bytes: Option<Box<dyn OpenBytes>>,
}

impl OpenBlob {
    /// A blob known by its size only (a HEAD needs no more; a store that opens nothing ahead).
    pub fn sized(size: u64) -> OpenBlob {
        OpenBlob { size, bytes: None }
    }
}

/// The bytes of an opened blob, ready to be streamed with no further trip to another thread.
pub trait OpenBytes: Send + Sync {
    /// Streams all of it, or the window `range` (which the caller has checked against the size).
    fn stream(self: Box<Self>, range: Option<ByteRange>) -> Result<ByteStream, StorageError>;
}

/// A committed blob as a listing of the store shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub digest: Digest,
    pub size: u64,
    /// When its bytes were stored (a file's modification time, an object's `Last-Modified`): what a grace
    /// period is measured from.
    pub stored_at: std::time::SystemTime,
}

/// The upload sessions some request is working on. Each backend keeps one and grants claims from it.
#[derive(Default)]
pub struct UploadSessions {
    busy: Arc<Mutex<HashSet<String>>>,
}

impl UploadSessions {
    /// Claims session `id`, or `Busy` if a claim on it is alive.
    pub fn claim(&self, id: &str) -> Result<UploadClaim, StorageError> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(id.to_string()) {
            return Err(StorageError::Busy);
        }
        Ok(UploadClaim { id: id.to_string(), busy: Arc::clone(&self.busy) })
    }
}

/// Exclusive use of one upload session, for one request: it is what serialises the requests on a session (two
/// PATCHes would interleave their bytes, and a commit must not see an append half done). Appending, committing
/// and aborting take it by value. A backend keeps the claim alive for as long as any write of it can still land,
/// including after the future that asked for the write was dropped (a client that went away): so once a claim
/// is released, nothing writes into the session any more, and a commit holding the next claim is alone with it.
#[derive(Debug)]
pub struct UploadClaim {
    id: String,
    /// The set this claim is registered in; the id leaves it when the claim is dropped.
    busy: Arc<Mutex<HashSet<String>>>,
}

impl UploadClaim {
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for UploadClaim {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// Where blob bytes live. One implementation per backend (`LocalStore`, `S3Store`); the registry
/// logic only sees this trait.
///
/// Uploads are part of the store because their bytes are: a backend keeps partial uploads where it can later
/// commit them cheaply (a rename on disk, a multipart completion on S3).
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of a committed blob, or `None` if it is not stored.
    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StorageError>;

    /// The size of a committed blob asked of the store itself, past any cache of sizes: for a write that must
    /// know the bytes are there now (another process, a collector, may have removed them since they were cached).
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        self.size(digest).await
    }

    /// Streams a committed blob, or the window `range` of it (which the caller has checked against the size).
    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<ByteStream, StorageError>;

    /// Opens a committed blob for a download, `None` if it is not stored: its size and, where the store can
    /// open its bytes in the same trip to another thread (a local file, opened and mapped at once), those bytes,
    /// so that the download needs no second trip. Behind hundreds of busy downloads each trip is a round of the
    /// run queue before a first byte. By default only the size; the bytes come from `read`.
    async fn open(&self, digest: &Digest) -> Result<Option<OpenBlob>, StorageError> {
        Ok(self.size(digest).await?.map(OpenBlob::sized))
    }

    /// A URL where a client may fetch committed blob `digest` itself, for a short while (an object store's
    /// presigned URL), when the store is set to redirect downloads; `None` when its bytes go through breakwater.
    async fn redirect(&self, _digest: &Digest) -> Result<Option<String>, StorageError> {
        Ok(None)
    }

    /// Stores a whole blob from a stream; it becomes visible only if its digest is `expected`. If the store
    /// holds `expected` already, the stored file stays and what was received is discarded (content is stored
    /// once, and a verified blob is never replaced).
    async fn put(&self, expected: &Digest, body: ByteStream) -> Result<u64, StorageError>;

    /// Stores the local file `path` as blob `digest`. The caller has already computed the file's digest while
    /// writing it (a cache fill hashes as it downloads) and guarantees it equals `digest`; the file is consumed
    /// (discarded if `digest` is stored already). No handle may still write to it.
    async fn adopt_file(&self, digest: &Digest, path: &Path) -> Result<u64, StorageError>;

    /// Whether the store answers (for start-up and `/readyz`): an object store with these credentials, say.
    async fn check(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Committed blobs in digest order (algorithm, then hex) after `after`, at most `limit`: a store of any size
    /// is walked page by page in bounded memory (garbage collection, `fsck`). Names that are not a digest (a
    /// stranger's file, say) are not listed.
    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<StoredBlob>, StorageError>;

    /// Removes a committed blob. Removing an absent blob is not an error.
    async fn delete(&self, digest: &Digest) -> Result<(), StorageError>;

    /// Removes committed blobs in as few requests as the store allows (garbage collection), and returns those it
    /// could not remove, with why. Each blob is removed or not on its own: a failure halfway leaves the others
    /// removed and the failed ones whole. Absent blobs are not failures.
    async fn delete_many(&self, digests: &[Digest]) -> Vec<(Digest, StorageError)> {
        let mut failed = Vec::new();
        for d in digests {
            if let Err(e) = self.delete(d).await {
                failed.push((d.clone(), e));
            }
        }
        failed
    }

    /// Creates the empty partial upload `id`.
    async fn upload_start(&self, id: &str) -> Result<(), StorageError>;

    /// Bytes received so far for upload `id`; `None` if it does not exist. While a request appends, this grows.
    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError>;

    /// Claims upload `id` for one request (`Busy` if another request holds it).
    fn upload_claim(&self, id: &str) -> Result<UploadClaim, StorageError>;

    /// Appends a stream to the claimed upload and returns its new size, with the claim. If the stream fails
    /// midway, what arrived is kept (so the client can ask for the offset and resume) and the error is returned.
    /// Dropping the future stops the append; the claim is released only once no write of it can land any more.
    async fn upload_append(&self, claim: UploadClaim, body: ByteStream) -> Result<(u64, UploadClaim), StorageError>;

    /// Verifies the claimed upload against `expected` and makes it the blob `expected` (or, if that is stored
    /// already, discards it). On a mismatch the upload is discarded and nothing becomes visible.
    async fn upload_commit(&self, claim: UploadClaim, expected: &Digest) -> Result<u64, StorageError>;

    /// Discards the claimed upload.
    async fn upload_abort(&self, claim: UploadClaim) -> Result<(), StorageError>;
}

//! Content-addressed bytes. A blob is stored once under its digest, whatever the number of repositories that
//! hold it (which repositories do is `meta`'s business).
//!
//! Architecture invariant: a blob becomes readable under its digest only after its bytes were hashed, found
//! equal to the digest, and made durable. Readers never see a partial blob.

mod local;

use std::io;
use std::path::Path;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;

use crate::oci::Digest;

pub use local::LocalStore;

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
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),
}

/// An inclusive-exclusive byte window of a blob: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// Where blob bytes live. One implementation per backend (local disk now, S3-compatible later); the registry
/// logic only sees this trait.
///
/// Uploads are part of the store because their bytes are: a backend keeps partial uploads where it can later
/// commit them cheaply (a rename on disk, a multipart completion on S3).
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of a committed blob, or `None` if it is not stored.
    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StorageError>;

    /// Streams a committed blob, or the window `range` of it (which the caller has checked against the size).
    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<ByteStream, StorageError>;

    /// Stores a whole blob from a stream; it becomes visible only if its digest is `expected`.
    async fn put(&self, expected: &Digest, body: ByteStream) -> Result<u64, StorageError>;

    /// Stores the local file `path` as blob `digest`. The caller has already computed the file's digest while
    /// writing it (a cache fill hashes as it downloads) and guarantees it equals `digest`; the file is consumed.
    async fn adopt_file(&self, digest: &Digest, path: &Path) -> Result<u64, StorageError>;

    /// Removes a committed blob. Removing an absent blob is not an error.
    async fn delete(&self, digest: &Digest) -> Result<(), StorageError>;

    /// Creates the empty partial upload `id`.
    async fn upload_start(&self, id: &str) -> Result<(), StorageError>;

    /// Bytes received so far for upload `id`; `None` if it does not exist.
    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError>;

    /// Appends a stream to upload `id` and returns its new size. If the stream fails midway, what arrived is
    /// kept (so the client can ask for the offset and resume) and the error is returned.
    async fn upload_append(&self, id: &str, body: ByteStream) -> Result<u64, StorageError>;

    /// Verifies upload `id` against `expected` and makes it the blob `expected`. On a mismatch the upload is
    /// discarded and nothing becomes visible.
    async fn upload_commit(&self, id: &str, expected: &Digest) -> Result<u64, StorageError>;

    /// Discards upload `id`.
    async fn upload_abort(&self, id: &str) -> Result<(), StorageError>;
}

//! Copies the blobs of a local store into another store (`breakwater migrate-storage`), resumably: a blob the
//! destination holds already is skipped, so a run that was stopped (or crashed) is simply run again. Every copy
//! goes through the destination's verifying `put`, so a blob that rotted on the source disk is reported, never
//! copied.
//!
//! Memory stays flat whatever the store's size: the source is walked one `blobs/<alg>/<hh>/` directory at a time
//! (1/256th of the blobs), and at most `concurrency` copies run at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;

use super::{BlobStore, ByteStream, StorageError};
use crate::oci::Digest;

/// What a migration did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub copied: u64,
    pub bytes_copied: u64,
    /// Already in the destination (an earlier run, or pushed there meanwhile).
    pub skipped: u64,
    /// Blobs that could not be copied, with the reason (a digest mismatch: the source file is corrupt).
    pub failed: Vec<(Digest, String)>,
}

/// Copies every blob under `root/blobs/` (a `LocalStore` root) into `to`, `concurrency` at a time; `progress`
/// sees the report after every blob.
pub async fn migrate(
    root: &Path,
    to: Arc<dyn BlobStore>,
    concurrency: usize,
    mut progress: impl FnMut(&MigrateReport),
) -> Result<MigrateReport, StorageError> {
    let mut report = MigrateReport::default();
    for dir in fanout_dirs(&root.join("blobs")).await? {
        let blobs = blobs_in(&dir).await?;
        let mut copies = futures_util::stream::iter(blobs)
            .map(|(digest, path)| {
                let to = Arc::clone(&to);
                async move {
                    let outcome = copy_one(to.as_ref(), &digest, &path).await;
                    (digest, outcome)
                }
            })
            .buffer_unordered(concurrency.max(1));
        while let Some((digest, outcome)) = copies.next().await {
            match outcome {
                Ok(Some(bytes)) => {
                    report.copied += 1;
                    report.bytes_copied += bytes;
                }
                Ok(None) => report.skipped += 1,
                Err(StorageError::DigestMismatch { actual, .. }) => {
                    report.failed.push((digest, format!("the source file's bytes hash to {actual}: it is corrupt")));
                }
                Err(e @ (StorageError::Io(_) | StorageError::Body(_))) => return Err(e),
                Err(e) => report.failed.push((digest, e.to_string())),
            }
            progress(&report);
        }
    }
    Ok(report)
}

/// Copies one blob unless `to` has it; the bytes copied, or `None` when skipped.
async fn copy_one(to: &dyn BlobStore, digest: &Digest, path: &Path) -> Result<Option<u64>, StorageError> {
    if to.size(digest).await?.is_some() {
        return Ok(None);
    }
    let file = tokio::fs::File::open(path).await?;
    let body: ByteStream = Box::pin(tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024));
    Ok(Some(to.put(digest, body).await?))
}

/// `blobs/<alg>/<hh>/` directories, sorted (so that the order, and a log of progress, is the same every run).
async fn fanout_dirs(blobs: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let mut out = Vec::new();
    for alg in sorted_entries(blobs).await? {
        out.extend(sorted_entries(&alg).await?);
    }
    Ok(out)
}

/// The blobs of one fan-out directory: files named by a hex digest of the directory's algorithm. Anything else
/// (a stray file) is left out; `fsck` is the tool that reports such things.
async fn blobs_in(dir: &Path) -> Result<Vec<(Digest, PathBuf)>, StorageError> {
    let alg = dir.parent().and_then(Path::file_name).map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out = Vec::new();
    for path in sorted_entries(dir).await? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Ok(digest) = format!("{alg}:{name}").parse::<Digest>() {
            out.push((digest, path));
        }
    }
    Ok(out)
}

async fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    while let Some(e) = entries.next_entry().await? {
        out.push(e.path());
    }
    out.sort();
    Ok(out)
}

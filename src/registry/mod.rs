//! The registry's rules over `storage` (bytes) and `meta` (everything else): push, pull, mount, delete, list,
//! referrers. Nothing here knows about HTTP; the `http` module translates requests into these calls and
//! `RegistryError`s into the spec's error responses.
//!
//! Architecture invariant: a DELETE request never removes bytes. It unlinks a blob or a manifest from a
//! repository; the bytes stay in the content store (which other repositories, or a push racing with the delete,
//! may share). Only cache eviction removes bytes, and only of digests that no pushed repository links and no
//! manifest record names, checked under the digest's lock (`locks.rs`) that every referencing path shares.

mod error;
mod locks;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;

pub use error::RegistryError;
pub use locks::{DigestLocks, Referencing, Removal};

use crate::meta::{ManifestRecord, Meta, Page};
use crate::oci::{Algorithm, Digest, ManifestInfo, Reference, RepoName, Tag, MAX_MANIFEST_BYTES};
use crate::storage::{BlobStore, ByteRange, ByteStream, OpenBlob, StorageError, UploadClaim};

/// Outcome of a manifest push, for the response headers.
#[derive(Debug)]
pub struct PushedManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

/// A manifest ready to be served: its record and its exact bytes.
#[derive(Debug)]
pub struct Manifest {
    pub record: ManifestRecord,
    pub bytes: Bytes,
}

pub struct Registry {
    store: Arc<dyn BlobStore>,
    meta: Arc<dyn Meta>,
    /// Whether DELETE requests are honoured (operators of shared registries often turn deletes off).
    deletes_enabled: bool,
    /// Keeps eviction from removing bytes while a push or a cache fill makes them referenced.
    locks: DigestLocks,
    /// (repository, tag) pulls recorded in the last `PULL_NOTE_EVERY`: a herd pulling one tag writes its
    /// `pulled_at` once, not once per pull (retention's `keep_within` needs the hour, not the second).
    pulls_noted: crate::bounded::BoundedMap<(String, String), ()>,
}

type Result<T> = std::result::Result<T, RegistryError>;

/// How long a request waits for a collector to finish removing a digest it needs before it answers 503. A
/// removal is one file or object delete; a collector that stopped halfway leaves its mark until the next run.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// A tag's `pulled_at` is written at most this often per instance.
const PULL_NOTE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

impl Registry {
    pub fn new(store: Arc<dyn BlobStore>, meta: Arc<dyn Meta>, deletes_enabled: bool) -> Registry {
        let pulls_noted = crate::bounded::BoundedMap::new("pull_notes", crate::bounded::DEFAULT_ENTRIES, Some(PULL_NOTE_EVERY));
        Registry { store, meta, deletes_enabled, locks: DigestLocks::default(), pulls_noted }
    }

    fn check_deletes(&self) -> Result<()> {
        if self.deletes_enabled {
            Ok(())
        } else {
            Err(RegistryError::Unsupported("deletes are disabled on this registry".into()))
        }
    }

    // ---- blobs -------------------------------------------------------------------------------------------

    /// The size of blob `digest` in `repo`.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        // Asked at once: each is a trip to another thread (the database's, the blocking pool's), and a trip costs
        // a round of the run queue, which behind hundreds of busy downloads is the wait before a first byte.
        let (linked, size) = futures_util::join!(self.meta.blob_linked(repo, digest), self.store.size(digest));
        if !linked? {
            return Err(RegistryError::BlobUnknown);
        }
        size?.ok_or(RegistryError::BlobUnknown)
    }

    /// Blob `digest` of `repo` opened for a download: its size and, where the store opens them at once, its
    /// bytes. The link and the open are asked at once, for the reason `blob_size` gives.
    pub async fn open_blob(&self, repo: &RepoName, digest: &Digest) -> Result<OpenBlob> {
        let (linked, opened) = futures_util::join!(self.meta.blob_linked(repo, digest), self.store.open(digest));
        if !linked? {
            return Err(RegistryError::BlobUnknown);
        }
        opened.map_err(not_found)?.ok_or(RegistryError::BlobUnknown)
    }

    /// Streams blob `digest` (or a window of it) from `repo`.
    pub async fn read_blob(&self, digest: &Digest, range: Option<ByteRange>) -> Result<ByteStream> {
        self.store.read(digest, range).await.map_err(not_found)
    }

    /// Streams an opened blob (or a window of it): from the bytes opened with it, or else from the store.
    pub async fn read_open(&self, digest: &Digest, blob: OpenBlob, range: Option<ByteRange>) -> Result<ByteStream> {
        match blob.bytes {
            Some(bytes) => bytes.stream(range).map_err(not_found),
            None => self.read_blob(digest, range).await,
        }
    }

    /// Where the client may fetch stored blob `digest` from the store itself, if the store redirects downloads.
    pub async fn blob_redirect(&self, digest: &Digest) -> Result<Option<String>> {
        Ok(self.store.redirect(digest).await?)
    }

    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        self.check_deletes()?;
        if self.meta.unlink_blob(repo, digest).await? {
            Ok(())
        } else {
            Err(RegistryError::BlobUnknown)
        }
    }

    // ---- uploads -----------------------------------------------------------------------------------------

    /// Cross-repository mount: links `digest` into `repo` if `from` holds it (or, with no `from`, if any
    /// repository does; spec v1.1 allows that). Returns false when the caller must fall back to an upload.
    pub async fn mount(&self, repo: &RepoName, digest: &Digest, from: Option<&RepoName>) -> Result<bool> {
        let _referencing = self.locks.referencing([digest]).await;
        self.claim([digest], true).await?;
        if let Some(from) = from {
            if !self.meta.blob_linked(from, digest).await? {
                return Ok(false);
            }
        }
        match self.store.stat(digest).await? {
            Some(size) => {
                self.meta.link_blob(repo, digest, size).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Stores a whole blob sent in one request and links it into `repo`.
    pub async fn put_blob(&self, repo: &RepoName, digest: &Digest, body: ByteStream) -> Result<()> {
        let _referencing = self.locks.referencing([digest]).await;
        let size = self.store.put(digest, body).await?;
        self.link_stored(repo, digest, size).await
    }

    /// Opens an upload session in `repo` and returns its id. The row comes first: a file without a row would
    /// never be purged (purging goes by the rows), while a row without a file is answered as unknown and purged.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        self.meta.create_upload(&id, repo).await?;
        if let Err(e) = self.store.upload_start(&id).await {
            let _ = self.meta.delete_upload(&id).await;
            return Err(e.into());
        }
        Ok(id)
    }

    /// Bytes received so far by upload `id` of `repo`.
    pub async fn upload_offset(&self, repo: &RepoName, id: &str) -> Result<u64> {
        match self.meta.upload_repo(id).await? {
            Some(r) if r == repo.as_str() => {}
            _ => return Err(RegistryError::BlobUploadUnknown),
        }
        self.store.upload_size(id).await?.ok_or(RegistryError::BlobUploadUnknown)
    }

    /// Claims upload `id` of `repo` for the current request: one request at a time per session, so chunks cannot
    /// interleave, an offset checked stays true until the append, and a commit is alone with the bytes it
    /// verifies. A busy session is refused at once (`UploadBusy`) rather than waited for: the request holding it
    /// may be a client's slow PATCH that takes minutes.
    async fn claim_upload(&self, repo: &RepoName, id: &str) -> Result<(UploadClaim, u64)> {
        let claim = self.store.upload_claim(id).map_err(|e| match e {
            StorageError::NotFound => RegistryError::BlobUploadUnknown,
            e => e.into(),
        })?;
        let offset = self.upload_offset(repo, id).await?;
        Ok((claim, offset))
    }

    /// Appends a chunk. With `range` (from `Content-Range`, inclusive), the chunk must begin exactly where the
    /// upload ends, and when its length is declared (`Content-Length`) it must be the range's length; otherwise
    /// nothing is appended. Returns the new size.
    pub async fn upload_chunk(
        &self,
        repo: &RepoName,
        id: &str,
        range: Option<(u64, u64)>,
        declared_len: Option<u64>,
        body: ByteStream,
    ) -> Result<u64> {
        let (claim, offset) = self.claim_upload(repo, id).await?;
        continues(range, declared_len, offset)?;
        let (size, _claim) = self.store.upload_append(claim, body).await?;
        Ok(size)
    }

    /// Completes upload `id` with an optional last chunk; the blob becomes visible only if it matches `digest`.
    /// A last chunk with a `range` must continue the upload like any chunk (`upload_chunk`): one that does not
    /// is refused before anything is appended, and the session stays open for the client to resume, rather
    /// than being appended at the wrong offset and failing the digest check, which would lose the session.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        range: Option<(u64, u64)>,
        declared_len: Option<u64>,
        last: Option<ByteStream>,
    ) -> Result<()> {
        let (mut claim, offset) = self.claim_upload(repo, id).await?;
        continues(range, declared_len, offset)?;
        let _referencing = self.locks.referencing([digest]).await;
        if let Some(body) = last {
            claim = self.store.upload_append(claim, body).await?.1;
        }
        let committed = self.store.upload_commit(claim, digest).await;
        // Whatever the outcome, the session is over: a mismatched upload is discarded by the store.
        self.meta.delete_upload(id).await?;
        self.link_stored(repo, digest, committed?).await
    }

    /// Links blob `digest`, which a push has just stored (or found stored, keeping what was there), into `repo`.
    /// A collector may have removed the bytes it found stored before the claim held: then the push failed, and
    /// the client uploads again.
    async fn link_stored(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        self.claim([digest], true).await?;
        if self.store.stat(digest).await?.is_none() {
            return Err(RegistryError::BlobUploadInvalid(format!("{digest} was garbage-collected while it was uploaded; upload it again")));
        }
        Ok(self.meta.link_blob(repo, digest, size).await?)
    }

    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        let (claim, _) = self.claim_upload(repo, id).await?;
        self.meta.delete_upload(id).await?;
        match self.store.upload_abort(claim).await {
            Ok(()) | Err(StorageError::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Discards upload sessions older than `max_age` (clients that went away mid-upload and never came back);
    /// returns how many. A session a request is working on right now is left for a later round.
    pub async fn purge_uploads(&self, max_age: std::time::Duration) -> Result<u64> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let before = now.saturating_sub(max_age.as_secs()) as i64;
        let mut purged = 0;
        loop {
            let stale = self.meta.stale_uploads(before, 1000).await?;
            let mut progressed = false;
            for id in stale {
                let claim = match self.store.upload_claim(&id) {
                    Ok(c) => Some(c),
                    Err(StorageError::Busy) => continue,
                    // An id the store cannot even name has no file: only its row is left to remove.
                    Err(StorageError::NotFound) => None,
                    Err(e) => return Err(e.into()),
                };
                if let Some(claim) = claim {
                    match self.store.upload_abort(claim).await {
                        Ok(()) | Err(StorageError::NotFound) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                self.meta.delete_upload(&id).await?;
                purged += 1;
                progressed = true;
            }
            if !progressed {
                return Ok(purged);
            }
        }
    }

    // ---- manifests ---------------------------------------------------------------------------------------

    /// Validates and stores a manifest pushed to `repo` under `reference`.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<PushedManifest> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::ManifestTooLarge);
        }
        let info = ManifestInfo::parse(&bytes, content_type).map_err(RegistryError::ManifestInvalid)?;
        // Pushed by digest, the manifest is stored under that digest's algorithm; by tag, under sha256.
        let (digest, tag) = match reference {
            Reference::Digest(d) => {
                let actual = Digest::of(d.algorithm(), &bytes);
                if &actual != d {
                    return Err(RegistryError::DigestInvalid(format!("manifest digest is {actual}, not {d}")));
                }
                (actual, None)
            }
            Reference::Tag(t) => (Digest::of(Algorithm::Sha256, &bytes), Some(t)),
        };
        let _referencing = self.locks.referencing(info.blobs.iter().chain(&info.children).chain([&digest])).await;
        // Claimed before they are checked: from here a collector leaves them alone, and one that removed a blob
        // just before has also removed its links, so the check below refuses the manifest.
        self.claim(info.blobs.iter().chain(&info.children).chain([&digest]), true).await?;
        for blob in &info.blobs {
            if !self.blob_present(repo, blob).await? {
                return Err(RegistryError::ManifestBlobUnknown(blob.clone()));
            }
        }
        for child in &info.children {
            if self.meta.manifest(repo, child).await?.is_none() {
                return Err(RegistryError::ManifestBlobUnknown(child.clone()));
            }
        }
        let size = bytes.len() as u64;
        let body: ByteStream = Box::pin(futures_util::stream::once(async move { Ok(bytes) }));
        self.store.put(&digest, body).await?;
        let annotations = annotations_json(&info.annotations)?;
        let record = ManifestRecord {
            digest: digest.clone(),
            media_type: info.media_type,
            size,
            subject: info.subject.clone(),
            artifact_type: info.artifact_type,
            annotations,
        };
        let refs: Vec<Digest> = info.blobs.iter().chain(&info.children).cloned().collect();
        self.meta.put_manifest(repo, &record, Some(&refs), tag).await?;
        Ok(PushedManifest { digest, subject: info.subject })
    }

    /// The record of the manifest `reference` names in `repo` (enough for HEAD).
    pub async fn manifest_record(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestRecord> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => self.meta.resolve_tag(repo, t).await?.ok_or(RegistryError::ManifestUnknown)?,
        };
        self.meta.manifest(repo, &digest).await?.ok_or(RegistryError::ManifestUnknown)
    }

    /// The manifest `reference` names in `repo`, with its bytes.
    pub async fn manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        let record = self.manifest_record(repo, reference).await?;
        let mut stream = self.read_blob(&record.digest, None).await.map_err(|e| match e {
            RegistryError::BlobUnknown => RegistryError::ManifestUnknown,
            e => e,
        })?;
        let mut buf = Vec::with_capacity(record.size as usize);
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.map_err(StorageError::Io)?);
        }
        Ok(Manifest { record, bytes: buf.into() })
    }

    /// Records that `tag` of `repo` (a local repository, not a cache's) was pulled, for retention's
    /// `keep_within`, at most once per `PULL_NOTE_EVERY`. A failed write is logged and forgotten (the next pull
    /// tries again): the pull itself never fails for it.
    pub async fn note_pull(&self, repo: &RepoName, tag: &Tag) {
        let key = (repo.as_str().to_string(), tag.as_str().to_string());
        if self.pulls_noted.get(&key).is_some() {
            return;
        }
        self.pulls_noted.insert(key.clone(), ());
        if let Err(e) = self.meta.note_pull(repo, tag).await {
            tracing::warn!(repo = %repo, tag = %tag, error = %e, "could not record a pull");
            self.pulls_noted.remove(&key);
        }
    }

    /// DELETE by digest removes the manifest and its tags; by tag, only the tag.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        self.check_deletes()?;
        let found = match reference {
            Reference::Digest(d) => self.meta.delete_manifest(repo, d).await?,
            Reference::Tag(t) => self.meta.delete_tag(repo, t).await?,
        };
        if found {
            Ok(())
        } else {
            Err(RegistryError::ManifestUnknown)
        }
    }

    // ---- the cache's way in -------------------------------------------------------------------------------

    /// Records a blob the cache has put in storage as held by `repo`; `BlobUnknown` if eviction removed its bytes
    /// meanwhile (the caller fetches it again).
    pub async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        let _referencing = self.locks.referencing([digest]).await;
        self.claim([digest], false).await?;
        if self.store.stat(digest).await?.is_none() {
            return Err(RegistryError::BlobUnknown);
        }
        Ok(self.meta.link_blob(repo, digest, size).await?)
    }

    /// Stores a manifest fetched from an upstream. Unlike a push, its blobs need not be here yet: a cache
    /// fetches them when they are asked for. The caller has verified `bytes` against `digest`.
    pub async fn cache_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
        tag: Option<&Tag>,
    ) -> Result<()> {
        let info = ManifestInfo::parse(&bytes, Some(media_type)).map_err(RegistryError::ManifestInvalid)?;
        let size = bytes.len() as u64;
        let body: ByteStream = Box::pin(futures_util::stream::once(async move { Ok(bytes) }));
        let _referencing = self.locks.referencing([digest]).await;
        self.claim([digest], false).await?;
        self.store.put(digest, body).await?;
        let record = ManifestRecord {
            digest: digest.clone(),
            media_type: info.media_type,
            size,
            subject: info.subject,
            artifact_type: info.artifact_type,
            annotations: annotations_json(&info.annotations)?,
        };
        let refs: Vec<Digest> = info.blobs.into_iter().chain(info.children).collect();
        Ok(self.meta.put_manifest(repo, &record, Some(&refs), tag).await?)
    }

    /// Points each of `tags` at manifest `digest` of `repo` (a push by digest with `?tag=`), in order; the first
    /// failure stops it (tags set before it stay, as if pushed one request each).
    pub async fn tag_manifest_all(&self, repo: &RepoName, digest: &Digest, tags: &[Tag]) -> Result<()> {
        for tag in tags {
            self.tag_manifest(repo, digest, tag).await?;
        }
        Ok(())
    }

    /// Points `tag` at a manifest `repo` already holds.
    pub async fn tag_manifest(&self, repo: &RepoName, digest: &Digest, tag: &Tag) -> Result<()> {
        // Claimed first, so that the untagged policy cannot remove the record between the lookup and the tag.
        self.claim([digest], true).await?;
        let record = self.meta.manifest(repo, digest).await?.ok_or(RegistryError::ManifestUnknown)?;
        Ok(self.meta.put_manifest(repo, &record, None, Some(tag)).await?)
    }

    /// Collects garbage from this registry's stores (see `crate::gc`).
    pub async fn collect(&self, options: &crate::gc::Options) -> std::result::Result<crate::gc::Report, crate::gc::GcError> {
        crate::gc::collect(self.store.as_ref(), self.meta.as_ref(), options).await
    }

    /// The cache's bookkeeping of what it fetched, for eviction.
    pub fn meta(&self) -> &dyn Meta {
        self.meta.as_ref()
    }

    /// Removes the bytes of the digest `removal` locks from the content store. Only eviction calls this, having
    /// found under that lock that nothing refers to them (see the module's invariant).
    pub async fn remove_content(&self, removal: &Removal) -> Result<()> {
        Ok(self.store.delete(&removal.digest).await?)
    }

    pub async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        Ok(self.meta.resolve_tag(repo, tag).await?)
    }

    // ---- listings ----------------------------------------------------------------------------------------

    pub async fn tags(&self, repo: &RepoName, last: Option<&str>, n: u64) -> Result<Page> {
        if !self.meta.repo_exists(repo).await? {
            return Err(RegistryError::NameUnknown);
        }
        Ok(self.meta.list_tags(repo, last, n).await?)
    }

    pub async fn catalog(&self, last: Option<&str>, n: u64) -> Result<Page> {
        Ok(self.meta.list_repos(last, n).await?)
    }

    /// A page of the manifests in `repo` that refer to `subject`, in digest order after `last`.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        last: Option<&Digest>,
        n: u64,
    ) -> Result<Page<ManifestRecord>> {
        let last = last.map(Digest::to_string);
        Ok(self.meta.referrers(repo, subject, artifact_type, last.as_deref(), n).await?)
    }

    /// Which store does not answer, if one does not (for `/readyz`).
    pub async fn unready(&self) -> Option<&'static str> {
        if self.meta.repo_exists(&"readiness-probe".parse().expect("valid name")).await.is_err() {
            return Some("metadata store unavailable");
        }
        if let Err(e) = self.store.check().await {
            tracing::warn!(error = %e, "the blob store does not answer");
            return Some("blob store unavailable");
        }
        None
    }
}

/// Checks that a chunk with `Content-Range` `range` (inclusive) begins exactly where the upload ends (`offset`)
/// and, when its length is declared (`Content-Length`), is as long as its range.
fn continues(range: Option<(u64, u64)>, declared_len: Option<u64>, offset: u64) -> Result<()> {
    let Some((start, end)) = range else {
        return Ok(());
    };
    // Client input: an end before the start, or at u64::MAX, has no length; refused, never wrapped.
    let len = end.checked_sub(start).and_then(|l| l.checked_add(1));
    let fits = len.is_some_and(|len| declared_len.is_none_or(|d| d == len));
    if start != offset || !fits {
        return Err(RegistryError::UploadOutOfOrder { offset });
    }
    Ok(())
}

/// A manifest's annotations as the JSON text the metadata store keeps for the referrers API.
fn annotations_json(a: &Option<std::collections::BTreeMap<String, String>>) -> Result<Option<String>> {
    a.as_ref().map(|a| serde_json::to_string(a).map_err(|e| RegistryError::ManifestInvalid(e.to_string()))).transpose()
}

// ---- references (eviction's exclusion) -------------------------------------------------------------------------

impl Registry {
    /// Whether `repo` links blob `digest` and its bytes are in the content store. A link alone is not enough
    /// for a manifest to refer to a blob: bytes lost to a fault must not become a manifest nobody can pull.
    async fn blob_present(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        Ok(self.meta.blob_linked(repo, digest).await? && self.store.stat(digest).await?.is_some())
    }

    /// Claims `digests` for this request (see `crate::gc`): until it has recorded its references, a collector
    /// leaves them alone. While a collector is removing one, it waits for the removal to end (the caller then
    /// finds the bytes gone), at most `CLAIM_WAIT`.
    /// `pushed`: for a reference outside the pull-through cache (cache fills pass false: eviction may remove
    /// what they bring, see `Meta::evict_mark`).
    async fn claim<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>, pushed: bool) -> Result<()> {
        let mut left: Vec<&Digest> = digests.into_iter().collect();
        let deadline = std::time::Instant::now() + CLAIM_WAIT;
        loop {
            let refused = self.meta.claim(&left, pushed).await?;
            let Some(first) = refused.first() else { return Ok(()) };
            if std::time::Instant::now() >= deadline {
                return Err(RegistryError::Collecting(first.clone()));
            }
            left.retain(|d| refused.contains(d));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The exclusive lock eviction needs to remove `digest`'s bytes, unless a push or cache fill is making them
    /// referenced right now (then eviction skips the digest).
    pub fn try_removal(&self, digest: &Digest) -> Option<Removal> {
        self.locks.try_remove(digest)
    }
}

/// A store's error for a blob it was asked for, as the registry's: not stored is the blob unknown.
fn not_found(e: StorageError) -> RegistryError {
    match e {
        StorageError::NotFound => RegistryError::BlobUnknown,
        e => e.into(),
    }
}

//! Copying one artifact from the source to the destination: index children before the index, blobs before
//! their manifest, the tag last. The manifest bytes (and so the digests) are unchanged, except that
//! `--platform` cuts the entries of other platforms out of an index (an index whose every platform is kept is
//! copied as it is).
//!
//! Every request that changes nothing is avoided: a tag already at the source's digest costs one HEAD, a blob this
//! run already put in another destination repository is mounted. A small blob costs one or two destination
//! requests and never a HEAD: the whole blob in the upload's POST (the spec's single POST) where the destination
//! takes it, else a mount from the repository itself, which says whether the blob is there and, if not, opens the
//! session the blob is PUT to. A large blob is asked for first (HEAD): its bytes are worth a request.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::filter::{parse_created, Created};
use crate::bounded::BoundedMap;
use crate::flight::Group;
use crate::pace::Pacer;
use crate::oci::{Digest, ManifestInfo, ManifestKind, RepoName};
use crate::storage::ByteStream;
use crate::upstream::{Mount, Posted, RemoteManifest, Upstream, UpstreamError};

/// Blobs up to this size go in one PUT; larger ones stream through PATCH, resumable from the destination's
/// upload offset.
const MONOLITHIC_MAX: u64 = 32 * 1024 * 1024;
/// Attempts of one request (or one blob transfer) before the artifact is recorded as failed.
const ATTEMPTS: u32 = 6;
/// Blobs up to this size (as their descriptor says) are sent without asking whether the destination has them. It
/// is also the most a single POST sends before the destination has said whether it takes one: distribution
/// ignores the body, and Go's HTTP server reads up to 256 KiB of an unread body to keep the connection open (more,
/// and it closes the connection).
const SMALL_BLOB_MAX: u64 = 256 * 1024;
/// Destination repositories remembered as mount sources, at most (a forgotten one costs an upload, not a mount).
const MOUNT_MEMORY: u64 = crate::bounded::DEFAULT_ENTRIES;

/// What copying an artifact came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Copied { bytes: u64 },
    /// The destination tag already points at the source's digest.
    UpToDate,
    /// The destination tag points elsewhere and `--override` is off: left alone.
    Conflict { existing: Digest },
}

/// What the run has learned about the destination's single POST: not tried yet, taken, or answered with a session.
const SINGLE_POST_UNKNOWN: u8 = 0;
const SINGLE_POST_TAKEN: u8 = 1;
const SINGLE_POST_REFUSED: u8 = 2;

/// Whether a failed request is worth trying again.
fn transient(e: &UpstreamError) -> bool {
    matches!(e, UpstreamError::Unavailable(_) | UpstreamError::RateLimited)
}

/// Runs `op` until it succeeds, fails for good, or runs out of attempts; waits with exponential backoff and
/// jitter between attempts, or as long as a registry's `Retry-After` says.
pub async fn retry<T, F, Fut>(registries: [&Upstream; 2], mut op: F) -> Result<T, UpstreamError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && attempt + 1 < ATTEMPTS => {
                let backoff = Duration::from_millis(100u64 << attempt.min(6)).min(Duration::from_secs(5));
                let jittered = backoff.mul_f64(0.5 + fastrand::f64());
                let held = registries.iter().filter_map(|r| r.retry_after_remaining()).max().unwrap_or_default();
                tokio::time::sleep(jittered.max(held)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Everything the copies of one run share.
pub struct Copier {
    pub src: Arc<Upstream>,
    pub dst: Arc<Upstream>,
    /// `os/arch[/variant]` to keep from indexes; empty keeps all (and the index bytes unchanged).
    pub platforms: Vec<String>,
    pub referrers: bool,
    pub override_tags: bool,
    pub dry_run: bool,
    /// Limits the bytes per second read from the source, across all transfers of the run.
    pub bandwidth: Option<Arc<Pacer>>,
    /// The run's cancellation: blob transfers run as tasks of their own (shared by the tags that need them), so
    /// they watch it themselves rather than end with the copy that waits on them.
    pub cancel: tokio_util::sync::CancellationToken,
    /// A destination repository each blob was copied to in this run: the source of a cross-repository mount.
    mounted: BoundedMap<Digest, RepoName>,
    /// One transfer per (destination repository, blob) at a time: tags sharing layers do not upload them twice.
    transfers: Group<(RepoName, Digest), Result<u64, UpstreamError>>,
    /// Whether the destination takes a blob in its upload POST (`SINGLE_POST_*`): once it has answered a single
    /// POST with a session, small blobs go by mount-or-session and PUT, so their bytes are sent once.
    single_post: std::sync::atomic::AtomicU8,
}

impl Copier {
    pub fn new(src: Arc<Upstream>, dst: Arc<Upstream>) -> Copier {
        Copier {
            src,
            dst,
            platforms: Vec::new(),
            referrers: false,
            override_tags: false,
            dry_run: false,
            bandwidth: None,
            cancel: Default::default(),
            mounted: BoundedMap::new("replication_mounts", MOUNT_MEMORY, None),
            transfers: Group::default(),
            single_post: std::sync::atomic::AtomicU8::new(SINGLE_POST_UNKNOWN),
        }
    }

    fn both(&self) -> [&Upstream; 2] {
        [&self.src, &self.dst]
    }

    /// Copies `src_repo:tag` to `dst_repo:tag`. `ask_first`: the destination may hold some of its blobs from an
    /// earlier, unfinished copy (a repository re-queued from a checkpoint, a retried failure), so none is sent
    /// without asking: nothing is uploaded twice.
    pub async fn copy_tag(
        self: &Arc<Self>,
        src_repo: &RepoName,
        dst_repo: &RepoName,
        tag: &str,
        ask_first: bool,
    ) -> Result<Outcome, UpstreamError> {
        let m = retry(self.both(), || self.src.manifest(src_repo, tag, false)).await?;
        let media_type = m.media_type.clone();
        let (bytes, digest) = match self.select_platforms(&m)? {
            Some(reduced) => {
                let d = Digest::of(m.digest.algorithm(), &reduced);
                (reduced, d)
            }
            None => (m.bytes.clone().unwrap_or_default(), m.digest.clone()),
        };
        let existing = retry(self.both(), || self.dst.manifest_digest(dst_repo, tag)).await?;
        match existing {
            Some(d) if d == digest => return Ok(Outcome::UpToDate),
            Some(d) if !self.override_tags => return Ok(Outcome::Conflict { existing: d }),
            _ => {}
        }
        if self.dry_run {
            return Ok(Outcome::Copied { bytes: 0 });
        }
        let mut copied = self.copy_contents(src_repo, dst_repo, &media_type, &bytes, ask_first).await?;
        retry(self.both(), || self.dst.put_manifest(dst_repo, tag, &media_type, bytes.clone())).await?;
        if self.referrers {
            copied += self.copy_referrers(src_repo, dst_repo, &m.digest, ask_first).await?;
        }
        Ok(Outcome::Copied { bytes: copied })
    }

    /// With `--platform` and an index: the index reduced to the kept platforms (new bytes, new digest), or `None`
    /// when nothing changes (not an index, no `--platform`, or every entry kept: the original bytes and digest).
    /// The reduced index is the original text with the dropped entries cut out (see [`drop_entries`]).
    pub fn select_platforms(&self, m: &RemoteManifest) -> Result<Option<Bytes>, UpstreamError> {
        let bytes = m.bytes.clone().unwrap_or_default();
        let is_index = matches!(m.media_type.as_str(), crate::oci::OCI_INDEX | crate::oci::DOCKER_LIST);
        if self.platforms.is_empty() || !is_index {
            return Ok(None);
        }
        let entries = manifest_entries(&bytes).map_err(|e| UpstreamError::Invalid(format!("index: {e}")))?;
        let mut keep = Vec::with_capacity(entries.len());
        for &(start, end) in &entries {
            let d: serde_json::Value = serde_json::from_slice(&bytes[start..end]).map_err(|e| UpstreamError::Invalid(format!("index entry: {e}")))?;
            keep.push(self.keeps_platform(&d["platform"]));
        }
        if keep.iter().all(|k| *k) {
            return Ok(None);
        }
        Ok(Some(Bytes::from(drop_entries(&bytes, &entries, &keep))))
    }

    /// When the source's `repo:tag` was created, for `--latest-by created`: its image config's `created`; for an
    /// index, the newest `created` among the children `--platform` keeps (children that are not images count as
    /// undated). `None` when nothing says (no `created`, not RFC 3339, no config). Each manifest and config is
    /// read with the run's retries.
    pub async fn created(&self, repo: &RepoName, tag: &str) -> Result<Created, UpstreamError> {
        let m = retry(self.both(), || self.src.manifest(repo, tag, false)).await?;
        let bytes = match self.select_platforms(&m)? {
            Some(reduced) => reduced,
            None => m.bytes.clone().unwrap_or_default(),
        };
        let info = ManifestInfo::parse(&bytes, Some(&m.media_type)).map_err(UpstreamError::Invalid)?;
        if info.kind == ManifestKind::Image {
            return self.config_created(repo, &bytes).await;
        }
        let mut newest: Created = None;
        for child in &info.children {
            let reference = child.to_string();
            let c = retry(self.both(), || self.src.manifest(repo, &reference, false)).await?;
            let cb = c.bytes.clone().unwrap_or_default();
            let is_image = ManifestInfo::parse(&cb, Some(&c.media_type)).is_ok_and(|i| i.kind == ManifestKind::Image);
            if is_image {
                newest = newest.max(self.config_created(repo, &cb).await?);
            }
        }
        Ok(newest)
    }

    /// The `created` of the config an image manifest (`manifest`, its bytes) names.
    async fn config_created(&self, repo: &RepoName, manifest: &[u8]) -> Result<Created, UpstreamError> {
        let v: serde_json::Value = serde_json::from_slice(manifest).map_err(|e| UpstreamError::Invalid(format!("manifest: {e}")))?;
        let Some(config) = v["config"]["digest"].as_str().and_then(|d| d.parse::<Digest>().ok()) else { return Ok(None) };
        // A config larger than a small blob is no image config worth reading for a date.
        let bytes = match retry(self.both(), || self.small_bytes(repo, &config)).await {
            Ok(b) => b,
            Err(UpstreamError::Invalid(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        Ok(v["created"].as_str().and_then(parse_created))
    }

    /// Whether an index entry's `platform` is one of `--platform`'s (`os/arch`, or `os/arch/variant`).
    fn keeps_platform(&self, p: &serde_json::Value) -> bool {
        let name = [p["os"].as_str(), p["architecture"].as_str()].iter().flatten().copied().collect::<Vec<_>>().join("/");
        let with_variant = p["variant"].as_str().map(|var| format!("{name}/{var}"));
        self.platforms.iter().any(|want| *want == name || Some(want) == with_variant.as_ref())
    }

    /// Copies what a manifest refers to: an index's children (each pushed by digest), an image's blobs.
    async fn copy_contents(
        self: &Arc<Self>,
        src_repo: &RepoName,
        dst_repo: &RepoName,
        media_type: &str,
        bytes: &[u8],
        ask_first: bool,
    ) -> Result<u64, UpstreamError> {
        let info = ManifestInfo::parse(bytes, Some(media_type)).map_err(UpstreamError::Invalid)?;
        let mut total = 0;
        match info.kind {
            ManifestKind::Index => {
                for child in &info.children {
                    total += self.copy_manifest_by_digest(src_repo, dst_repo, child, ask_first).await?;
                }
            }
            ManifestKind::Image => {
                for (blob, size) in info.blobs.iter().zip(&info.blob_sizes) {
                    total += self.copy_blob(src_repo, dst_repo, blob, *size, ask_first).await?;
                }
            }
        }
        Ok(total)
    }

    /// Copies a manifest the destination may lack, by digest (index children, referrers).
    async fn copy_manifest_by_digest(
        self: &Arc<Self>,
        src_repo: &RepoName,
        dst_repo: &RepoName,
        digest: &Digest,
        ask_first: bool,
    ) -> Result<u64, UpstreamError> {
        let reference = digest.to_string();
        if retry(self.both(), || self.dst.manifest_digest(dst_repo, &reference)).await?.is_some() {
            return Ok(0);
        }
        let m = retry(self.both(), || self.src.manifest(src_repo, &reference, false)).await?;
        let bytes = m.bytes.clone().unwrap_or_default();
        let total = Box::pin(self.copy_contents(src_repo, dst_repo, &m.media_type, &bytes, ask_first)).await?;
        retry(self.both(), || self.dst.put_manifest(dst_repo, &reference, &m.media_type, bytes.clone())).await?;
        Ok(total)
    }

    /// Copies the manifests that refer to `subject` (signatures, SBOMs), after the subject itself.
    async fn copy_referrers(
        self: &Arc<Self>,
        src_repo: &RepoName,
        dst_repo: &RepoName,
        subject: &Digest,
        ask_first: bool,
    ) -> Result<u64, UpstreamError> {
        let referrers = retry(self.both(), || self.src.referrers(src_repo, subject)).await?;
        let mut total = 0;
        for r in referrers {
            total += self.copy_manifest_by_digest(src_repo, dst_repo, &r, ask_first).await?;
        }
        Ok(total)
    }

    /// Makes blob `digest` present in `dst_repo`; returns the bytes transferred (0 if skipped or mounted). `size`
    /// is what the descriptor says.
    async fn copy_blob(
        self: &Arc<Self>,
        src_repo: &RepoName,
        dst_repo: &RepoName,
        digest: &Digest,
        size: Option<u64>,
        ask_first: bool,
    ) -> Result<u64, UpstreamError> {
        let key = (dst_repo.clone(), digest.clone());
        let (this, src_repo, dst_repo, digest) = (Arc::clone(self), src_repo.clone(), dst_repo.clone(), digest.clone());
        let (result, _) = self
            .transfers
            .run(key, move || async move {
                let small = size.is_some_and(|s| s <= SMALL_BLOB_MAX);
                let transfer = retry(this.both(), || async {
                    match small {
                        true => this.transfer_small(&src_repo, &dst_repo, &digest, ask_first).await,
                        false => this.transfer(&src_repo, &dst_repo, &digest).await,
                    }
                });
                let r = match this.cancel.run_until_cancelled(transfer).await {
                    Some(r) => r,
                    None => Err(UpstreamError::Unavailable("the run was interrupted".into())),
                };
                if r.is_ok() {
                    this.mounted.insert(digest, dst_repo);
                }
                r
            })
            .await;
        result.unwrap_or_else(|e| Err(e.into()))
    }

    /// One attempt at making a small blob present, in one or two destination requests: a mount from where this
    /// run put it; else the single POST (unless the destination is known to refuse it, or the blob may be there
    /// already); else a mount from `dst_repo` itself, whose answer is the HEAD's (201: it is there) and whose
    /// session takes the PUT.
    async fn transfer_small(&self, src_repo: &RepoName, dst_repo: &RepoName, digest: &Digest, ask_first: bool) -> Result<u64, UpstreamError> {
        let from = self.mounted.get(digest).filter(|r| r != dst_repo);
        if let Some(from) = from {
            return match self.dst.mount(dst_repo, digest, &from).await? {
                Mount::Mounted => Ok(0),
                Mount::Session(location) => self.put_small(src_repo, dst_repo, digest, &location).await,
            };
        }
        let single = self.single_post.load(std::sync::atomic::Ordering::Relaxed);
        if !ask_first && single != SINGLE_POST_REFUSED {
            let bytes = self.small_bytes(src_repo, digest).await?;
            let size = bytes.len() as u64;
            match self.dst.post_blob(dst_repo, digest, bytes.clone()).await {
                Ok(Posted::Created) => {
                    self.single_post.store(SINGLE_POST_TAKEN, std::sync::atomic::Ordering::Relaxed);
                    return Ok(size);
                }
                // Not taken, but the session it opened takes the PUT: still two requests.
                Ok(Posted::Session(location)) => {
                    self.refuse_single_post("answered with an upload session");
                    self.dst.put_blob_bytes(dst_repo, &location, digest, bytes).await?;
                    return Ok(size);
                }
                // A registry that refuses a body on the POST outright (before any took one): the plain way below.
                Err(UpstreamError::Refused(why)) if single == SINGLE_POST_UNKNOWN => self.refuse_single_post(&why),
                Err(e) => return Err(e),
            }
        }
        match self.dst.mount(dst_repo, digest, dst_repo).await? {
            Mount::Mounted => Ok(0),
            Mount::Session(location) => self.put_small(src_repo, dst_repo, digest, &location).await,
        }
    }

    /// Notes that the destination takes no single POST: the rest of the run does not send small blobs twice.
    fn refuse_single_post(&self, why: &str) {
        let was = self.single_post.swap(SINGLE_POST_REFUSED, std::sync::atomic::Ordering::Relaxed);
        if was != SINGLE_POST_REFUSED {
            tracing::info!(destination = %self.dst.name(), why, "the destination takes no blob in its upload POST; small blobs go by POST and PUT");
        }
    }

    /// A small blob into the session at `location`, in one PUT.
    async fn put_small(&self, src_repo: &RepoName, dst_repo: &RepoName, digest: &Digest, location: &str) -> Result<u64, UpstreamError> {
        let bytes = self.small_bytes(src_repo, digest).await?;
        let size = bytes.len() as u64;
        self.dst.put_blob_bytes(dst_repo, location, digest, bytes).await?;
        Ok(size)
    }

    /// A small blob's bytes from the source, read whole (paced). A source sending more than a small blob's bound is
    /// refused rather than held: the descriptor said it was small.
    async fn small_bytes(&self, src_repo: &RepoName, digest: &Digest) -> Result<Bytes, UpstreamError> {
        let blob = self.src.blob(src_repo, digest, 0).await?;
        let mut body = self.paced(blob.body);
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| UpstreamError::Unavailable(format!("reading {digest}: {e}")))?;
            if (buf.len() + chunk.len()) as u64 > SMALL_BLOB_MAX {
                return Err(UpstreamError::Invalid(format!("{digest} is larger than its descriptor says")));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// One attempt at making a large blob present: HEAD, then mount, then upload.
    async fn transfer(&self, src_repo: &RepoName, dst_repo: &RepoName, digest: &Digest) -> Result<u64, UpstreamError> {
        if self.dst.blob_size(dst_repo, digest).await?.is_some() {
            return Ok(0);
        }
        let from = self.mounted.get(digest).filter(|r| r != dst_repo);
        let location = match from {
            Some(from) => match self.dst.mount(dst_repo, digest, &from).await? {
                Mount::Mounted => return Ok(0),
                Mount::Session(location) => location,
            },
            None => self.dst.start_upload(dst_repo).await?,
        };
        let blob = self.src.blob(src_repo, digest, 0).await?;
        let size = blob.total;
        match size {
            Some(size) if size <= MONOLITHIC_MAX => {
                self.dst.put_blob(dst_repo, &location, digest, size, self.paced(blob.body)).await?;
                Ok(size)
            }
            _ => self.streamed(src_repo, dst_repo, digest, location, blob.body).await,
        }
    }

    /// A large blob: streamed PATCHes, resumed from the destination's offset after a failure.
    async fn streamed(&self, src_repo: &RepoName, dst_repo: &RepoName, digest: &Digest, mut location: String, first: ByteStream) -> Result<u64, UpstreamError> {
        let mut body = Some(first);
        let mut failures = 0;
        loop {
            let stream = match body.take() {
                Some(b) => b,
                None => {
                    let (offset, loc) = self.dst.resume_upload(dst_repo, &location).await?;
                    location = loc;
                    let b = self.src.blob(src_repo, digest, offset).await?;
                    if !b.from_offset && offset > 0 {
                        return Err(UpstreamError::Unavailable("the source ignored Range; restarting the blob".into()));
                    }
                    b.body
                }
            };
            match self.dst.patch_blob(dst_repo, &location, self.paced(stream)).await {
                Ok(loc) => {
                    location = loc;
                    break;
                }
                Err(e) if transient(&e) && failures < ATTEMPTS => {
                    failures += 1;
                    tracing::info!(%digest, error = %e, "blob transfer broke; resuming from the destination's offset");
                }
                Err(e) => return Err(e),
            }
        }
        let (size, _) = self.dst.upload_offset(dst_repo, &location).await?;
        self.dst.finish_blob(dst_repo, &location, digest).await?;
        Ok(size)
    }

    /// The source stream, throttled to the run's bandwidth limit if there is one.
    fn paced(&self, body: ByteStream) -> ByteStream {
        match &self.bandwidth {
            None => body,
            Some(bw) => {
                let bw = Arc::clone(bw);
                Box::pin(body.then(move |chunk| {
                    let bw = Arc::clone(&bw);
                    async move {
                        if let Ok(c) = &chunk {
                            bw.spend(c.len() as f64).await;
                        }
                        chunk
                    }
                }))
            }
        }
    }
}

/// The byte spans of the entries of an index's top-level `manifests` array, in order (empty if it has none).
fn manifest_entries(b: &[u8]) -> Result<Vec<(usize, usize)>, String> {
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return Err("not a JSON object".into());
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b'}') => return Ok(Vec::new()),
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'"') => {}
            _ => return Err(format!("unexpected byte at {i}")),
        }
        let key_end = value_end(b, i)?;
        let is_manifests = &b[i..key_end] == b"\"manifests\"";
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return Err(format!("expected ':' at {i}"));
        }
        i = skip_ws(b, i + 1);
        if is_manifests && b.get(i) == Some(&b'[') {
            return array_entries(b, i);
        }
        i = value_end(b, i)?;
    }
}

/// The spans of the values of the array opening at `b[i]`.
fn array_entries(b: &[u8], mut i: usize) -> Result<Vec<(usize, usize)>, String> {
    let mut out = Vec::new();
    i += 1;
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b']') => return Ok(out),
            Some(b',') => i += 1,
            Some(_) => {
                let end = value_end(b, i)?;
                out.push((i, end));
                i = end;
            }
            None => return Err("unterminated array".into()),
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// Where the JSON value starting at `b[i]` ends (exclusive): strings with their escapes, nested objects and
/// arrays, or a scalar up to the next delimiter.
fn value_end(b: &[u8], mut i: usize) -> Result<usize, String> {
    let mut depth = 0usize;
    let mut in_string = false;
    let start = i;
    while let Some(&c) = b.get(i) {
        i += 1;
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => {
                    in_string = false;
                    if depth == 0 {
                        return Ok(i);
                    }
                }
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n' if depth == 0 => return Ok(i - 1),
            _ => {}
        }
    }
    match depth == 0 && !in_string && i > start {
        true => Ok(i),
        false => Err("truncated JSON value".into()),
    }
}

/// The index text with the entries whose `keep` is false cut out, everything else byte for byte: the kept entries
/// are joined by the text that separated the first two entries of the original (`,` plus its whitespace), so a
/// pretty-printed index stays pretty-printed. What changes: the entries dropped, and their separators.
fn drop_entries(b: &[u8], entries: &[(usize, usize)], keep: &[bool]) -> Vec<u8> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else { return b.to_vec() };
    let sep: &[u8] = match entries.get(1) {
        Some(second) => &b[first.1..second.0],
        None => b",",
    };
    let mut out = Vec::with_capacity(b.len());
    out.extend_from_slice(&b[..first.0]);
    let kept: Vec<&[u8]> = entries.iter().zip(keep).filter(|(_, k)| **k).map(|(&(s, e), _)| &b[s..e]).collect();
    out.extend_from_slice(&kept.join(sep));
    out.extend_from_slice(&b[last.1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_index_entries_keeps_the_rest_of_the_text() {
        let pretty = b"{\n  \"schemaVersion\": 2,\n  \"manifests\": [\n    {\"digest\": \"a\", \"x\": [1, {\"s\": \"]\\\"\"}]},\n    {\"digest\": \"b\"},\n    {\"digest\": \"c\"}\n  ],\n  \"z\": 1\n}";
        let entries = manifest_entries(pretty).unwrap();
        assert_eq!(entries.len(), 3);
        let out = drop_entries(pretty, &entries, &[false, true, true]);
        assert_eq!(String::from_utf8(out).unwrap(), "{\n  \"schemaVersion\": 2,\n  \"manifests\": [\n    {\"digest\": \"b\"},\n    {\"digest\": \"c\"}\n  ],\n  \"z\": 1\n}");
        let out = drop_entries(pretty, &entries, &[true, false, false]);
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        assert_eq!(manifest_entries(b"{\"a\":\"manifests\",\"b\":[1]}").unwrap(), vec![]);
    }
}

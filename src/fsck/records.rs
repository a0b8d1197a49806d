//! The metadata side: records that point at nothing (links, manifest records, tags, cache records, upload
//! sessions), manifests that lack what they reference, and the files of a local store's `uploads/`, `tmp/` and
//! `spool/` that nothing owns. Tables are walked in pages by key (`Meta::*_page`), which stays correct while rows
//! are removed. Records are checked against the store through `BlobStore` (sizes, reads), whatever its backend.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt};

use super::{remove, Action, FsckError, Kind, Options, Run, PAGE};
use crate::meta::Meta;
use crate::oci::{Digest, ManifestInfo, RepoName, Tag, MAX_MANIFEST_BYTES};
use crate::storage::{BlobStore, StorageError};

/// Passes over the manifests at most: removing a manifest can make an index that lists it incomplete, which the
/// next pass removes in turn (nesting deeper than this is not something clients make).
const MANIFEST_PASSES: usize = 8;

fn repo_name(s: &str) -> Option<RepoName> {
    s.parse().ok()
}

fn bad_name(repo: &str) -> Action {
    Action::Left(format!("{repo:?} is not a valid repository name"))
}

/// Whether the store holds each of `digests`, in order, looked up `concurrency` at a time: on object storage each
/// lookup is a request, which would make a walk of the links one round trip per row.
async fn stored(opts: &Options, digests: Vec<Digest>) -> Result<Vec<bool>, FsckError> {
    let lookups = futures_util::stream::iter(digests).map(|d| async move { opts.has_blob(&d).await });
    lookups.buffered(opts.concurrency.max(1)).try_collect().await
}

pub async fn links(run: &mut Run<'_>) -> Result<(), FsckError> {
    let (opts, meta) = (run.opts, run.meta);
    let mut after: Option<(String, String)> = None;
    loop {
        let page = meta.links_page(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), PAGE).await?;
        let Some(last) = page.last() else { return Ok(()) };
        after = Some((last.repo.clone(), last.digest.to_string()));
        let stored = stored(opts, page.iter().map(|l| l.digest.clone()).collect()).await?;
        for (link, stored) in page.into_iter().zip(stored) {
            run.report.checked.links += 1;
            if stored {
                continue;
            }
            let what = format!("{}@{}: the repository links a blob whose bytes are missing", link.repo, link.digest);
            run.problem(Kind::DanglingLink, what, || async move {
                let Some(name) = repo_name(&link.repo) else { return Ok(bad_name(&link.repo)) };
                meta.unlink_blob(&name, &link.digest).await?;
                Ok(Action::Repaired("unlinked (a client pushes it again, the cache fetches it again)".into()))
            })
            .await?;
        }
    }
}

pub async fn manifests(run: &mut Run<'_>) -> Result<(), FsckError> {
    for pass in 0..MANIFEST_PASSES {
        let removed = manifest_pass(run, pass == 0).await?;
        if removed == 0 {
            break;
        }
    }
    Ok(())
}

/// One walk over the manifest records; returns how many it removed.
async fn manifest_pass(run: &mut Run<'_>, first: bool) -> Result<u64, FsckError> {
    let (opts, meta) = (run.opts, run.meta);
    let mut removed = 0;
    let mut after: Option<(String, String)> = None;
    loop {
        let page = meta.manifests_page(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), PAGE).await?;
        let Some(last) = page.last() else { return Ok(removed) };
        after = Some((last.repo.clone(), last.record.digest.to_string()));
        for row in page {
            if first {
                run.report.checked.manifests += 1;
            }
            let (repo, digest) = (row.repo, row.record.digest);
            let (kind, what) = match read_manifest(opts.store.as_ref(), &digest).await? {
                None => (Kind::DanglingManifest, format!("{repo}@{digest}: the manifest's bytes are missing")),
                Some(bytes) => match ManifestInfo::parse(&bytes, Some(&row.record.media_type)) {
                    Err(e) => {
                        let what = format!("{repo}@{digest}: {e}");
                        run.problem(Kind::UnreadableManifest, what, || async {
                            Ok(Action::Left("its bytes match its digest; this version cannot read them".into()))
                        })
                        .await?;
                        continue;
                    }
                    // A cache fetches a manifest's blobs and child manifests when they are first pulled.
                    Ok(_) if opts.is_cache_repo(&repo) => continue,
                    Ok(info) => match missing(opts, meta, &repo, &info).await? {
                        None => continue,
                        Some(lacking) => (Kind::IncompleteManifest, format!("{repo}@{digest}: {lacking}")),
                    },
                },
            };
            let fixed = std::sync::atomic::AtomicBool::new(false);
            run.problem(kind, what, || async {
                let Some(name) = repo_name(&repo) else { return Ok(bad_name(&repo)) };
                meta.delete_manifest(&name, &digest).await?;
                fixed.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(Action::Repaired("removed the record and its tags (push the image again to restore it)".into()))
            })
            .await?;
            removed += u64::from(fixed.into_inner());
        }
    }
}

/// The manifest's bytes, or `None` if they are not in the store. Read with a bound: a manifest is at most
/// `MAX_MANIFEST_BYTES`, whatever the store holds (one byte more is enough for the parse to refuse it).
async fn read_manifest(store: &dyn BlobStore, digest: &Digest) -> Result<Option<Vec<u8>>, FsckError> {
    let mut body = match store.read(digest, None).await {
        Ok(body) => body,
        Err(StorageError::NotFound) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(StorageError::Io)?;
        let room = (MAX_MANIFEST_BYTES + 1).saturating_sub(bytes.len());
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if bytes.len() > MAX_MANIFEST_BYTES {
            break;
        }
    }
    Ok(Some(bytes))
}

/// What a manifest of a pushed repository references but the repository does not hold (the rule a push must
/// pass: blobs linked with their bytes present, child manifests recorded), described; `None` if nothing.
async fn missing(opts: &Options, meta: &dyn Meta, repo: &str, info: &ManifestInfo) -> Result<Option<String>, FsckError> {
    let Some(name) = repo_name(repo) else { return Ok(None) };
    let mut lacking: Vec<&Digest> = Vec::new();
    for blob in &info.blobs {
        if !meta.blob_linked(&name, blob).await? || !opts.has_blob(blob).await? {
            lacking.push(blob);
        }
    }
    for child in &info.children {
        if meta.manifest(&name, child).await?.is_none() {
            lacking.push(child);
        }
    }
    Ok(match lacking.as_slice() {
        [] => None,
        [one] => Some(format!("lacks {one}")),
        [first, rest @ ..] => Some(format!("lacks {first} and {} more", rest.len())),
    })
}

pub async fn tags(run: &mut Run<'_>) -> Result<(), FsckError> {
    let meta = run.meta;
    let mut after: Option<(String, String)> = None;
    loop {
        let page = meta.tags_page(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), PAGE).await?;
        let Some(last) = page.last() else { return Ok(()) };
        after = Some((last.repo.clone(), last.tag.clone()));
        for t in page {
            run.report.checked.tags += 1;
            let Some(name) = repo_name(&t.repo) else { continue };
            if meta.manifest(&name, &t.digest).await?.is_some() {
                continue;
            }
            let what = format!("{}:{} -> {}: the repository holds no such manifest", t.repo, t.tag, t.digest);
            run.problem(Kind::DanglingTag, what, || async move {
                let Ok(tag) = t.tag.parse::<Tag>() else { return Ok(Action::Left(format!("{:?} is not a valid tag", t.tag))) };
                meta.delete_tag(&name, &tag).await?;
                Ok(Action::Repaired("removed the tag".into()))
            })
            .await?;
        }
    }
}

pub async fn cache(run: &mut Run<'_>) -> Result<(), FsckError> {
    let (opts, meta) = (run.opts, run.meta);
    let mut after: Option<String> = None;
    loop {
        let page = meta.cache_page(after.as_deref(), PAGE).await?;
        let Some((last, _)) = page.last() else { return Ok(()) };
        after = Some(last.to_string());
        let stored = stored(opts, page.iter().map(|(d, _)| d.clone()).collect()).await?;
        for ((digest, size), stored) in page.into_iter().zip(stored) {
            run.report.checked.cache_records += 1;
            if stored {
                continue;
            }
            let what = format!("{digest} ({size} bytes): a cache record whose bytes are gone");
            run.problem(Kind::DanglingCache, what, || async move {
                meta.cache_forget(&digest).await?;
                Ok(Action::Repaired("forgot it (the cache's size no longer counts it)".into()))
            })
            .await?;
        }
    }
}

/// Upload sessions whose bytes are gone from the store (a local store's file, an object store's session state),
/// opened before the grace period.
pub async fn uploads(run: &mut Run<'_>) -> Result<(), FsckError> {
    let meta = run.meta;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
    let before = now.saturating_sub(run.opts.grace.as_secs()) as i64;
    let mut after: Option<String> = None;
    loop {
        let page = meta.uploads_page(after.as_deref(), PAGE).await?;
        let Some(last) = page.last() else { return Ok(()) };
        after = Some(last.id.clone());
        for u in page {
            run.report.checked.uploads += 1;
            if u.created_at > before || run.opts.has_upload(&u.id).await? {
                continue;
            }
            let what = format!("{} (repository {}): an upload session whose file is gone", u.id, u.repo);
            run.problem(Kind::OrphanUploadRow, what, || async move {
                meta.delete_upload(&u.id).await?;
                Ok(Action::Repaired("removed the session (its client gets BLOB_UPLOAD_UNKNOWN and starts again)".into()))
            })
            .await?;
        }
    }
}

/// Files of a local store's `uploads/` without a session.
pub async fn upload_files(run: &mut Run<'_>, root: &Path) -> Result<(), FsckError> {
    let meta = run.meta;
    let mut files = OldFiles::open(root, "uploads").await?;
    while let Some((name, path)) = files.next(run.opts).await? {
        if meta.upload_repo(&name).await?.is_some() {
            continue;
        }
        let what = format!("{}: an upload file without a session", path.display());
        run.problem(Kind::OrphanUploadFile, what, || async move {
            remove(&path).await?;
            Ok(Action::Repaired("removed".into()))
        })
        .await?;
    }
    Ok(())
}

/// Files of a local store's `tmp/` (staging of whole-blob writes) or `spool/` (cache fills) that nothing is
/// writing any more.
pub async fn leftovers(run: &mut Run<'_>, root: &Path, dir: &str, kind: Kind) -> Result<(), FsckError> {
    let flights = run.opts.flights.clone();
    let doing = if kind == Kind::LeftoverTmp { "write" } else { "cache fill" };
    let mut files = OldFiles::open(root, dir).await?;
    while let Some((name, path)) = files.next(run.opts).await? {
        // A spool is named `<hex>-<uuid>` after the blob it downloads; a running flight's spool is never touched,
        // however long its upstream takes.
        if let (Some(flights), Some(digest)) = (&flights, spool_digest(&name)) {
            if flights.is_running(&digest).await {
                continue;
            }
        }
        let what = format!("{}: left by an interrupted {doing}", path.display());
        run.problem(kind, what, || async move {
            remove(&path).await?;
            Ok(Action::Repaired("removed".into()))
        })
        .await?;
    }
    Ok(())
}

/// The digest a spool file's name starts with (`<hex>-<uuid>`), for either algorithm.
fn spool_digest(name: &str) -> Option<Digest> {
    let hex = name.split('-').next()?;
    let alg = match hex.len() {
        64 => "sha256",
        128 => "sha512",
        _ => return None,
    };
    format!("{alg}:{hex}").parse().ok()
}

/// The files of one directory of the store last modified before the grace period, read as a stream (never
/// listed whole).
struct OldFiles {
    dir: PathBuf,
    entries: Option<tokio::fs::ReadDir>,
}

impl OldFiles {
    async fn open(root: &Path, dir: &str) -> Result<OldFiles, FsckError> {
        let dir = root.join(dir);
        let entries = match tokio::fs::read_dir(&dir).await {
            Ok(it) => Some(it),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(FsckError::Io { path: dir, source: e }),
        };
        Ok(OldFiles { dir, entries })
    }

    /// The next old file: (name, path).
    async fn next(&mut self, opts: &Options) -> Result<Option<(String, PathBuf)>, FsckError> {
        let Some(entries) = &mut self.entries else { return Ok(None) };
        while let Some(entry) = entries.next_entry().await.map_err(|e| FsckError::Io { path: self.dir.clone(), source: e })? {
            let Ok(md) = entry.metadata().await else { continue };
            if md.is_file() && opts.abandoned(&md) {
                return Ok(Some((entry.file_name().to_string_lossy().into_owned(), entry.path())));
            }
        }
        Ok(None)
    }
}

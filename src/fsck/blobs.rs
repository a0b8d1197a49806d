//! The walk of the blob tree, `blobs/<alg>/<hh>/<hex>`: re-hashing every file (corrupt ones are quarantined),
//! and finding files that nothing refers to.
//!
//! A blocking task lists the directories and hands files on through a bounded channel; a bounded number of
//! checks run at once (hashing reads each file through one fixed buffer), so memory depends on neither the
//! number of blobs nor their size.

use std::io::Read;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{move_aside, remove, Action, FsckError, Kind, Options, Run};
use crate::meta::Meta;
use crate::oci::{Algorithm, Digest};

/// Read buffer of one hashing task.
const HASH_CHUNK: usize = 256 * 1024;
/// Files listed ahead of the checks.
const LISTED_AHEAD: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Re-hash every file against its name.
    Hash,
    /// Look up whether anything refers to each file.
    References,
}

/// A file found in the blob tree.
struct Entry {
    path: PathBuf,
    /// The digest its path names, or `None` for a file where no blob belongs.
    digest: Option<Digest>,
    /// Its metadata as listed (for its age).
    meta: Option<std::fs::Metadata>,
}

/// What checking one file found.
enum Outcome {
    Fine { bytes: u64 },
    Corrupt { digest: Digest, path: PathBuf, actual: Digest },
    Stray(PathBuf),
    Unreadable(PathBuf, std::io::Error),
    Orphan { digest: Digest, path: PathBuf },
    /// Removed by someone else between the listing and the check (eviction, while serving).
    Vanished,
}

pub async fn walk(run: &mut Run<'_>, pass: Pass) -> Result<(), FsckError> {
    let (opts, meta) = (run.opts, run.meta);
    let (tx, rx) = mpsc::channel(LISTED_AHEAD);
    let root = opts.root.join("blobs");
    let lister = tokio::task::spawn_blocking(move || list(&root, &tx));
    let entries = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    // Strays are reported by the first pass of a run only.
    let report_strays = pass == Pass::Hash || !opts.plan.hash_blobs;
    let outcomes = entries
        .map(|e| async move {
            match e {
                Err((path, e)) => Ok(Outcome::Unreadable(path, e)),
                Ok(e) => check(opts, meta, pass, e).await,
            }
        })
        .buffer_unordered(opts.concurrency.max(1));
    let mut outcomes = std::pin::pin!(outcomes);
    while let Some(outcome) = outcomes.next().await {
        opts.progress.inc(1);
        match outcome? {
            Outcome::Fine { bytes } => {
                if pass == Pass::Hash {
                    run.report.checked.blobs += 1;
                    run.report.checked.blob_bytes += bytes;
                }
            }
            Outcome::Vanished => {}
            Outcome::Stray(path) if report_strays => {
                let to = opts.root.join("quarantine").join("stray").join(flat_name(&opts.root, &path));
                let what = format!("{} (not a blob's path)", path.display());
                run.problem(Kind::StrayFile, what, || async move {
                    move_aside(&path, &to).await?;
                    Ok(Action::Repaired(format!("moved to {}", to.display())))
                })
                .await?;
            }
            Outcome::Stray(_) => {}
            Outcome::Unreadable(path, e) => {
                let what = format!("{}: {e}", path.display());
                run.problem(Kind::Unreadable, what, || async { Ok(Action::Left("fix the file's permissions or the disk".into())) })
                    .await?;
            }
            Outcome::Corrupt { digest, path, actual } => {
                run.report.checked.blobs += 1;
                let what = format!("{digest}: its bytes hash to {actual}");
                run.problem(Kind::CorruptBlob, what, || quarantine(opts, meta, digest.clone(), path)).await?;
            }
            Outcome::Orphan { digest, path } => {
                let what = format!("{digest}: no link, manifest record or cache record refers to it");
                run.problem(Kind::OrphanBlob, what, || async move {
                    if !opts.plan.remove_unreferenced_bytes {
                        return Ok(Action::Left(
                            "a server is running on this store; unreferenced bytes are removed only offline".into(),
                        ));
                    }
                    remove(&path).await?;
                    Ok(Action::Repaired("removed".into()))
                })
                .await?;
            }
        }
    }
    lister.await.map_err(|e| FsckError::Io { path: opts.root.join("blobs"), source: std::io::Error::other(e) })?;
    Ok(())
}

/// Checks one file for `pass`.
async fn check(opts: &Options, meta: &dyn Meta, pass: Pass, e: Entry) -> Result<Outcome, FsckError> {
    let Some(digest) = e.digest else { return Ok(Outcome::Stray(e.path)) };
    match pass {
        Pass::Hash => {
            let (path, alg) = (e.path.clone(), digest.algorithm());
            let hashed = tokio::task::spawn_blocking(move || hash_file(&path, alg))
                .await
                .map_err(|j| FsckError::Io { path: e.path.clone(), source: std::io::Error::other(j) })?;
            Ok(match hashed {
                Ok((actual, bytes)) if actual == digest => Outcome::Fine { bytes },
                Ok((actual, _)) => Outcome::Corrupt { digest, path: e.path, actual },
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Outcome::Vanished,
                Err(err) => Outcome::Unreadable(e.path, err),
            })
        }
        Pass::References => {
            // Young files may belong to a write that has stored the bytes and is about to link them.
            if !e.meta.as_ref().is_some_and(|m| opts.abandoned(m)) || meta.bytes_referenced(&digest).await? {
                return Ok(Outcome::Fine { bytes: 0 });
            }
            Ok(Outcome::Orphan { digest, path: e.path })
        }
    }
}

/// Moves a corrupt blob aside to `quarantine/<alg>/<hex>` and removes what referred to it, so that a client
/// pushes it again (a HEAD now says it is missing) and the cache fetches it again.
async fn quarantine(opts: &Options, meta: &dyn Meta, digest: Digest, path: PathBuf) -> Result<Action, FsckError> {
    let to = opts.root.join("quarantine").join(digest.algorithm().as_str()).join(digest.hex());
    move_aside(&path, &to).await?;
    // A push of this very digest may have replaced the corrupt file with a good one since it was hashed; what was
    // moved is checked again, and a good copy goes back.
    let (moved, alg) = (to.clone(), digest.algorithm());
    if let Ok(Ok((actual, _))) = tokio::task::spawn_blocking(move || hash_file(&moved, alg)).await {
        if actual == digest {
            move_aside(&to, &path).await?;
            return Ok(Action::Repaired("a correct copy was stored while fsck ran; kept it".into()));
        }
    }
    let mut links = 0;
    for repo in meta.blob_repos(&digest).await? {
        if let Ok(name) = repo.parse() {
            links += u64::from(meta.unlink_blob(&name, &digest).await?);
        }
    }
    let mut manifests = 0;
    for repo in meta.manifest_repos(&digest).await? {
        if let Ok(name) = repo.parse() {
            manifests += u64::from(meta.delete_manifest(&name, &digest).await?);
        }
    }
    meta.cache_forget(&digest).await?;
    Ok(Action::Repaired(format!(
        "moved to {}; removed {links} links and {manifests} manifest records (with their tags), and any cache record",
        to.display()
    )))
}

/// Hashes a file through one fixed buffer: (digest, size).
fn hash_file(path: &Path, alg: Algorithm) -> std::io::Result<(Digest, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = alg.hasher();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher.finish(), size));
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
}

type Listed = Result<Entry, (PathBuf, std::io::Error)>;

/// Lists `blobs/` (three levels: algorithm, two hex digits, file) into `tx`; returns when done or when nobody
/// listens any more. Files anywhere else in the tree are strays.
fn list(blobs: &Path, tx: &mpsc::Sender<Listed>) {
    let send = |item: Listed| tx.blocking_send(item).is_ok();
    let read = |dir: &Path| std::fs::read_dir(dir).map_err(|e| (dir.to_path_buf(), e));
    let entries = match read(blobs) {
        Ok(it) => it,
        Err(e) => {
            send(Err(e));
            return;
        }
    };
    for alg_dir in entries.flatten() {
        let alg_path = alg_dir.path();
        if !alg_path.is_dir() {
            if !send_stray(&send, alg_path) {
                return;
            }
            continue;
        }
        let alg = alg_dir.file_name().to_string_lossy().into_owned();
        let fan = match read(&alg_path) {
            Ok(it) => it,
            Err(e) => {
                if !send(Err(e)) {
                    return;
                }
                continue;
            }
        };
        for hh_dir in fan.flatten() {
            let hh_path = hh_dir.path();
            if !hh_path.is_dir() {
                if !send_stray(&send, hh_path) {
                    return;
                }
                continue;
            }
            let hh = hh_dir.file_name().to_string_lossy().into_owned();
            let files = match read(&hh_path) {
                Ok(it) => it,
                Err(e) => {
                    if !send(Err(e)) {
                        return;
                    }
                    continue;
                }
            };
            for file in files.flatten() {
                let path = file.path();
                let Ok(meta) = file.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let name = file.file_name().to_string_lossy().into_owned();
                let digest = format!("{alg}:{name}").parse::<Digest>().ok().filter(|d| d.hex().get(..2) == Some(hh.as_str()));
                if !send(Ok(Entry { path, digest, meta: Some(meta) })) {
                    return;
                }
            }
        }
    }
}

fn send_stray(send: &impl Fn(Listed) -> bool, path: PathBuf) -> bool {
    let meta = std::fs::metadata(&path).ok();
    send(Ok(Entry { path, digest: None, meta }))
}

/// A stray file's path below the store root as one file name, for the quarantine.
fn flat_name(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace(['/', '\\'], "_")
}

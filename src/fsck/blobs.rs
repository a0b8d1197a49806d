//! The walk over the stored blobs: re-hashing every one (corrupt ones are quarantined), and finding those that
//! nothing refers to.
//!
//! Only where the blobs come from depends on the store: a local store's tree `blobs/<alg>/<hh>/<hex>` is listed
//! by a blocking task, which also finds files where no blob belongs and what cannot be read (a `BlobStore::list`
//! skips both); any other store is listed through `BlobStore::list`, page by page. The checks and what is done
//! about their findings are the same for both. A bounded number of checks run at once, each hashing through
//! fixed buffers, so memory depends on neither the number of blobs nor their size.

use std::fmt::Display;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::SystemTime;

use futures_util::{stream, Stream, StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use super::{blob_path, last_activity, move_aside, Action, FsckError, Kind, Options, Run};
use crate::meta::Meta;
use crate::oci::{Algorithm, Digest};
use crate::storage::{BlobStore, ByteStream, StorageError};

/// Read buffer of one hashing task (a local file's; an object's stream comes in the chunks it arrives in).
const HASH_CHUNK: usize = 256 * 1024;
/// Files listed ahead of the checks.
const LISTED_AHEAD: usize = 256;
/// Blobs asked of `BlobStore::list` at once.
const LIST_PAGE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Re-hash every blob against its digest.
    Hash,
    /// Look up whether anything refers to each blob.
    References,
}

/// What a listing found.
enum Listed {
    /// A blob, with when it was last touched (for its age), if known.
    Blob { digest: Digest, touched: Option<SystemTime> },
    /// A file of a local blob tree whose path is not a digest's.
    Stray(PathBuf),
    /// Something that could not be read, and why.
    Unreadable(String),
}

/// A listing as the walk reads it; an error ends the walk (the store could not be listed, so the run is not a
/// check of all of it).
type Listing<'a> = Pin<Box<dyn Stream<Item = Result<Listed, FsckError>> + Send + 'a>>;

/// What checking one blob found.
enum Outcome {
    Fine { bytes: u64 },
    Corrupt { digest: Digest, actual: Digest },
    Stray(PathBuf),
    Unreadable(String),
    Orphan(Digest),
    /// Removed by someone else between the listing and the check (eviction, garbage collection).
    Vanished,
}

pub async fn walk(run: &mut Run<'_>, pass: Pass) -> Result<(), FsckError> {
    let (opts, meta) = (run.opts, run.meta);
    // What the listing itself finds (strays, unreadable directories) is reported by the first pass of a run only.
    let first = pass == Pass::Hash || !opts.plan.hash_blobs;
    let outcomes = listing(opts)
        .map(|listed| async move {
            match listed? {
                Listed::Blob { digest, touched } => check(opts, meta, pass, digest, touched).await,
                Listed::Stray(path) => Ok(Outcome::Stray(path)),
                Listed::Unreadable(what) => Ok(Outcome::Unreadable(what)),
            }
        })
        .buffer_unordered(opts.concurrency.max(1));
    let mut outcomes = std::pin::pin!(outcomes);
    while let Some(outcome) = outcomes.next().await {
        opts.progress.inc(1);
        match outcome? {
            Outcome::Fine { bytes } if pass == Pass::Hash => {
                run.report.checked.blobs += 1;
                run.report.checked.blob_bytes += bytes;
            }
            Outcome::Fine { .. } | Outcome::Vanished => {}
            Outcome::Stray(_) | Outcome::Unreadable(_) if !first => {}
            Outcome::Stray(path) => stray(run, path).await?,
            Outcome::Unreadable(what) => {
                let advice = match opts.local {
                    Some(_) => "fix the file's permissions or the disk",
                    None => "the store did not serve it; check again once it does",
                };
                run.problem(Kind::Unreadable, what, || async { Ok(Action::Left(advice.into())) }).await?;
            }
            Outcome::Corrupt { digest, actual } => {
                run.report.checked.blobs += 1;
                let what = format!("{digest}: its bytes hash to {actual}");
                run.problem(Kind::CorruptBlob, what, || quarantine(opts, meta, digest)).await?;
            }
            Outcome::Orphan(digest) => {
                let what = format!("{digest}: no link, manifest record or cache record refers to it");
                run.problem(Kind::OrphanBlob, what, || async move {
                    if let Some(why) = opts.keeps_unreferenced() {
                        return Ok(Action::Left(why.into()));
                    }
                    opts.store.delete(&digest).await?;
                    Ok(Action::Repaired("removed".into()))
                })
                .await?;
            }
        }
    }
    Ok(())
}

/// Checks one blob for `pass`.
async fn check(
    opts: &Options,
    meta: &dyn Meta,
    pass: Pass,
    digest: Digest,
    touched: Option<SystemTime>,
) -> Result<Outcome, FsckError> {
    match pass {
        Pass::Hash => Ok(match hash(opts, &digest).await {
            Hashed::Bytes(actual, bytes) if actual == digest => Outcome::Fine { bytes },
            Hashed::Bytes(actual, _) => Outcome::Corrupt { digest, actual },
            Hashed::Gone => Outcome::Vanished,
            Hashed::Failed(what) => Outcome::Unreadable(what),
        }),
        Pass::References => {
            // Young blobs may belong to a write that has stored the bytes and is about to link them.
            if !touched.is_some_and(|t| opts.abandoned_since(t)) || meta.bytes_referenced(&digest).await? {
                return Ok(Outcome::Fine { bytes: 0 });
            }
            Ok(Outcome::Orphan(digest))
        }
    }
}

/// A file where no blob belongs is moved aside to `quarantine/stray/`.
async fn stray(run: &mut Run<'_>, path: PathBuf) -> Result<(), FsckError> {
    let Some(root) = run.opts.local.clone() else { return Ok(()) };
    let to = root.join("quarantine").join("stray").join(flat_name(&root, &path));
    let what = format!("{} (not a blob's path)", path.display());
    run.problem(Kind::StrayFile, what, || async move {
        move_aside(&path, &to).await?;
        Ok(Action::Repaired(format!("moved to {}", to.display())))
    })
    .await
}

/// Takes a corrupt blob out of the store and removes what referred to it, so that a client pushes it again (a
/// HEAD now says it is missing) and the cache fetches it again.
async fn quarantine(opts: &Options, meta: &dyn Meta, digest: Digest) -> Result<Action, FsckError> {
    let aside = match set_aside(opts, &digest).await? {
        Aside::Kept(why) => return Ok(Action::Repaired(why.into())),
        Aside::Done(how) => how,
    };
    let (links, manifests) = forget(meta, &digest).await?;
    Ok(Action::Repaired(format!(
        "{aside}; removed {links} links and {manifests} manifest records (with their tags), and any cache record"
    )))
}

/// What became of a corrupt blob's bytes.
enum Aside {
    /// Taken out of the store, as described.
    Done(String),
    /// Left in place, because they turned out to hash to their digest.
    Kept(&'static str),
}

async fn set_aside(opts: &Options, digest: &Digest) -> Result<Aside, FsckError> {
    let Some(root) = &opts.local else {
        // `BlobStore` has no rename, so an object is deleted, which cannot be undone: it is read again first, in
        // case the first read came up short without an error; bytes that hash right the second time stay.
        if matches!(hash_object(opts.store.as_ref(), digest).await, Hashed::Bytes(actual, _) if actual == *digest) {
            return Ok(Aside::Kept("read again, its bytes hash to its digest; kept it"));
        }
        opts.store.delete(digest).await?;
        return Ok(Aside::Done("deleted from the store".into()));
    };
    let path = blob_path(root, digest);
    let to = root.join("quarantine").join(digest.algorithm().as_str()).join(digest.hex());
    move_aside(&path, &to).await?;
    // A push of this very digest may have replaced the corrupt file with a good one since it was hashed; what was
    // moved is checked again, and a good copy goes back.
    if matches!(hash_file_async(to.clone(), digest.algorithm()).await, Hashed::Bytes(actual, _) if actual == *digest) {
        move_aside(&to, &path).await?;
        return Ok(Aside::Kept("a correct copy was stored while fsck ran; kept it"));
    }
    Ok(Aside::Done(format!("moved to {}", to.display())))
}

/// Removes every record that refers to the bytes of `digest`: its links, its manifest records (with their tags)
/// and its cache record. Returns how many links and manifest records went.
async fn forget(meta: &dyn Meta, digest: &Digest) -> Result<(u64, u64), FsckError> {
    let mut links = 0;
    for repo in meta.blob_repos(digest).await? {
        if let Ok(name) = repo.parse() {
            links += u64::from(meta.unlink_blob(&name, digest).await?);
        }
    }
    let mut manifests = 0;
    for repo in meta.manifest_repos(digest).await? {
        if let Ok(name) = repo.parse() {
            manifests += u64::from(meta.delete_manifest(&name, digest).await?);
        }
    }
    meta.cache_forget(digest).await?;
    Ok((links, manifests))
}

/// What hashing a stored blob found.
enum Hashed {
    /// The digest of its bytes, and how many there were.
    Bytes(Digest, u64),
    /// It is not stored (any more).
    Gone,
    /// It could not be read: what, and why.
    Failed(String),
}

async fn hash(opts: &Options, digest: &Digest) -> Hashed {
    match &opts.local {
        Some(root) => hash_file_async(blob_path(root, digest), digest.algorithm()).await,
        None => hash_object(opts.store.as_ref(), digest).await,
    }
}

/// A file is read on the blocking pool, through one buffer.
async fn hash_file_async(path: PathBuf, alg: Algorithm) -> Hashed {
    let failed = |e: &dyn Display| Hashed::Failed(format!("{}: {e}", path.display()));
    match tokio::task::spawn_blocking({
        let path = path.clone();
        move || hash_file(&path, alg)
    })
    .await
    {
        Ok(Ok((actual, size))) => Hashed::Bytes(actual, size),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Hashed::Gone,
        Ok(Err(e)) => failed(&e),
        Err(e) => failed(&e),
    }
}

/// An object is streamed from the store and hashed on a task of its own: the checks of a walk all run on the
/// walk's task, and this way `concurrency` objects are hashed on as many cores.
async fn hash_object(store: &dyn BlobStore, digest: &Digest) -> Hashed {
    let failed = |e: &dyn Display| Hashed::Failed(format!("{digest}: {e}"));
    let body = match store.read(digest, None).await {
        Ok(body) => body,
        Err(StorageError::NotFound) => return Hashed::Gone,
        Err(e) => return failed(&e),
    };
    match tokio::spawn(hash_stream(body, digest.algorithm())).await {
        Ok(Ok((actual, size))) => Hashed::Bytes(actual, size),
        Ok(Err(e)) => failed(&e),
        Err(e) => failed(&e),
    }
}

/// Hashes a stream chunk by chunk as it arrives: (digest, size).
async fn hash_stream(mut body: ByteStream, alg: Algorithm) -> std::io::Result<(Digest, u64)> {
    let mut hasher = alg.hasher();
    let mut size = 0u64;
    while let Some(chunk) = body.try_next().await? {
        hasher.update(&chunk);
        size += chunk.len() as u64;
    }
    Ok((hasher.finish(), size))
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

fn listing(opts: &Options) -> Listing<'_> {
    match &opts.local {
        Some(root) => tree_listing(root.join("blobs")),
        None => store_listing(opts.store.as_ref()),
    }
}

/// Every blob of `store`, through `BlobStore::list`: one page in memory at a time.
fn store_listing(store: &dyn BlobStore) -> Listing<'_> {
    // The state is the last digest listed; `None` once the listing is done. A short page is not taken for the
    // last (a backend may end a page early): the walk ends at an empty one.
    let pages = stream::try_unfold(Some(None::<Digest>), move |after| async move {
        let Some(after) = after else { return Ok::<_, FsckError>(None) };
        let page = store.list(after.as_ref(), LIST_PAGE).await?;
        let next = page.last().map(|b| Some(b.digest.clone()));
        let blobs = page.into_iter().map(|b| Ok(Listed::Blob { digest: b.digest, touched: Some(b.stored_at) }));
        Ok(Some((stream::iter(blobs), next)))
    });
    Box::pin(pages.try_flatten())
}

/// A local blob tree, listed by a blocking task ahead of the checks.
fn tree_listing(blobs: PathBuf) -> Listing<'static> {
    let (tx, rx) = mpsc::channel(LISTED_AHEAD);
    let dir = blobs.clone();
    let lister = tokio::task::spawn_blocking(move || list(&dir, &tx));
    let listed = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|l| (Ok(l), rx)) });
    // A lister that died ends the listing early, which must fail the run rather than pass for a complete walk.
    let joined =
        async move { lister.await.map_err(|e| FsckError::Io { path: blobs, source: std::io::Error::other(e) }) };
    let ended = stream::once(joined).filter_map(|joined| async move { joined.err().map(Err) });
    Box::pin(listed.chain(ended))
}

/// Lists `blobs/` (three levels: algorithm, two hex digits, file) into `tx`; returns when done or when nobody
/// listens any more. Files anywhere else in the tree are strays.
fn list(blobs: &Path, tx: &mpsc::Sender<Listed>) {
    let send = |item: Listed| tx.blocking_send(item).is_ok();
    let read = |dir: &Path| std::fs::read_dir(dir).map_err(|e| Listed::Unreadable(format!("{}: {e}", dir.display())));
    let entries = match read(blobs) {
        Ok(it) => it,
        Err(e) => {
            send(e);
            return;
        }
    };
    for alg_dir in entries.flatten() {
        let alg_path = alg_dir.path();
        if !alg_path.is_dir() {
            if !send(Listed::Stray(alg_path)) {
                return;
            }
            continue;
        }
        let alg = alg_dir.file_name().to_string_lossy().into_owned();
        let fan = match read(&alg_path) {
            Ok(it) => it,
            Err(e) => {
                if !send(e) {
                    return;
                }
                continue;
            }
        };
        for hh_dir in fan.flatten() {
            let hh_path = hh_dir.path();
            if !hh_path.is_dir() {
                if !send(Listed::Stray(hh_path)) {
                    return;
                }
                continue;
            }
            let hh = hh_dir.file_name().to_string_lossy().into_owned();
            let files = match read(&hh_path) {
                Ok(it) => it,
                Err(e) => {
                    if !send(e) {
                        return;
                    }
                    continue;
                }
            };
            for file in files.flatten() {
                let Ok(meta) = file.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let name = file.file_name().to_string_lossy().into_owned();
                let digest = format!("{alg}:{name}").parse::<Digest>().ok().filter(|d| d.hex().get(..2) == Some(hh.as_str()));
                let listed = match digest {
                    Some(digest) => Listed::Blob { digest, touched: Some(last_activity(&meta)) },
                    None => Listed::Stray(file.path()),
                };
                if !send(listed) {
                    return;
                }
            }
        }
    }
}

/// A stray file's path below the store root as one file name, for the quarantine.
fn flat_name(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace(['/', '\\'], "_")
}

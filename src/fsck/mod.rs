//! Checking and repairing a store: a blob store (a local content directory in `storage::LocalStore`'s layout,
//! or object storage) against the metadata store, offline or while `serve` runs on it.
//!
//! One walker serves two callers: `breakwater fsck` (everything, with `--repair` to fix what it finds) and the
//! reconciliation sweep inside `serve` (`sweep.rs`: the cheap checks, fixing only leftovers that nothing can be
//! using). What each run checks and may fix is its `Plan`.
//!
//! The passes run in an order that lets one repair leave a store that a second check finds clean:
//! 1. stored blobs are re-hashed (corrupt ones quarantined, which removes what referred to them);
//! 2. records that point at nothing (links, manifest records, tags, cache records, upload sessions) and, in
//!    repositories outside the caches' namespaces, manifests whose blobs or child manifests are gone;
//! 3. what nothing refers to (blobs, and on a local store upload files without a session and leftover staging
//!    and spool files), last, because the passes before may have just made some of them unreferenced.
//!
//! Records are checked through `BlobStore` whatever the backend. A local store's blob tree is walked on disk,
//! which also finds what a listing cannot show (stray and unreadable files); any other store is walked through
//! `BlobStore::list`. On object storage, unreferenced blobs are reported and left to garbage collection: several
//! instances may share a bucket, and no lock spans machines to tell fsck that none of them is about to link one.
//!
//! In-progress work is never taken for an orphan: files and sessions younger than the grace period are left
//! alone (a write in progress keeps its file's modification time fresh), and inside `serve` a spool of a running
//! flight is never touched.

mod blobs;
mod lock;
mod records;
mod sweep;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use lock::{LockError, StoreLock};
pub use sweep::{spawn_sweep, SweepContext};

use crate::flight::BlobFlights;
use crate::meta::{Meta, MetaError};
use crate::oci::Digest;
use crate::storage::{BlobStore, StorageError};

/// How long a file or upload session must have been left alone before it counts as abandoned, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// Rows asked of the metadata store per page: bounds memory whatever the store's size.
const PAGE: u64 = 1000;

/// A kind of problem; the summary counts problems per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A stored blob whose bytes do not hash to its digest.
    CorruptBlob,
    /// A file in the blob tree whose path is not a digest's.
    StrayFile,
    /// A file or object that could not be read (permissions, I/O errors, a store that did not serve it).
    Unreadable,
    /// A blob link whose bytes are not in the content store.
    DanglingLink,
    /// A manifest record whose bytes are not in the content store.
    DanglingManifest,
    /// Manifest bytes that no longer parse (they verified against their digest, so this breakwater cannot read
    /// what an older one accepted; left alone).
    UnreadableManifest,
    /// A manifest in a pushed repository whose blobs or child manifests the repository does not hold.
    IncompleteManifest,
    /// A tag pointing at a manifest its repository does not hold.
    DanglingTag,
    /// A cache record whose bytes are gone.
    DanglingCache,
    /// An upload session whose file is gone.
    OrphanUploadRow,
    /// An upload file without a session.
    OrphanUploadFile,
    /// A stored blob nothing refers to (no link, no manifest record, no cache record).
    OrphanBlob,
    /// A staging file of an interrupted write (`tmp/`).
    LeftoverTmp,
    /// A spool file of an interrupted cache fill (`spool/`).
    LeftoverSpool,
}

impl Kind {
    pub const ALL: [Kind; 14] = [
        Kind::CorruptBlob,
        Kind::StrayFile,
        Kind::Unreadable,
        Kind::DanglingLink,
        Kind::DanglingManifest,
        Kind::UnreadableManifest,
        Kind::IncompleteManifest,
        Kind::DanglingTag,
        Kind::DanglingCache,
        Kind::OrphanUploadRow,
        Kind::OrphanUploadFile,
        Kind::OrphanBlob,
        Kind::LeftoverTmp,
        Kind::LeftoverSpool,
    ];

    /// The name printed in reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::CorruptBlob => "corrupt-blob",
            Kind::StrayFile => "stray-file",
            Kind::Unreadable => "unreadable",
            Kind::DanglingLink => "dangling-link",
            Kind::DanglingManifest => "dangling-manifest",
            Kind::UnreadableManifest => "unreadable-manifest",
            Kind::IncompleteManifest => "incomplete-manifest",
            Kind::DanglingTag => "dangling-tag",
            Kind::DanglingCache => "dangling-cache-record",
            Kind::OrphanUploadRow => "orphan-upload-session",
            Kind::OrphanUploadFile => "orphan-upload-file",
            Kind::OrphanBlob => "orphan-blob",
            Kind::LeftoverTmp => "leftover-tmp",
            Kind::LeftoverSpool => "leftover-spool",
        }
    }

    /// The problems the sweep inside `serve` fixes: leftovers and records of things that are gone, none of
    /// which a request in progress can be using once the grace period has passed.
    fn swept(self) -> bool {
        matches!(
            self,
            Kind::DanglingCache | Kind::OrphanUploadRow | Kind::OrphanUploadFile | Kind::LeftoverTmp | Kind::LeftoverSpool
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was done about a problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Only reported (no repair was asked for).
    Reported,
    /// Fixed, as described.
    Repaired(String),
    /// Repair was asked for but not done, for the reason given.
    Left(String),
}

/// One problem found.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: Kind,
    /// What is wrong, naming the file, record or tag.
    pub what: String,
    pub action: Action,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.what)?;
        match &self.action {
            Action::Reported => Ok(()),
            Action::Repaired(how) => write!(f, " -> {how}"),
            Action::Left(why) => write!(f, " -> not repaired: {why}"),
        }
    }
}

/// Which problems a run fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    Nothing,
    /// `fsck --repair`: everything it can.
    Everything,
    /// The sweep inside `serve`: only `Kind::swept` problems.
    Leftovers,
}

/// What a run checks and fixes.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Re-hash every stored blob (the expensive part: reads the whole content store).
    pub hash_blobs: bool,
    /// Check blob links, manifest records and tags against the content store.
    pub records: bool,
    pub repair: Repair,
    /// Whether unreferenced blob bytes may be removed: only when no server is running on the store, because a
    /// mount checks for bytes and then links them, and a removal in between would leave a link to nothing. Only
    /// a local store can know that (its lock); on any other store they are never removed (`Options::local`).
    pub remove_unreferenced_bytes: bool,
}

/// Everything a run needs, resolved.
pub struct Options {
    /// The blob store checked: its blobs are re-hashed, and records are checked against it.
    pub store: Arc<dyn BlobStore>,
    /// The store's directory when it is a local one (`DATA/content`, `LocalStore`'s layout): its blob tree is
    /// then walked on disk rather than listed, and `uploads/`, `tmp/` and `spool/` are checked for leftovers.
    /// `None` for object storage, whose upload leftovers `S3Store::sweep_abandoned` cleans.
    pub local: Option<PathBuf>,
    /// Upstream names: repositories `<name>/...` are caches, whose manifests may legitimately lack blobs (they
    /// are fetched when first pulled).
    pub cache_namespaces: Vec<String>,
    pub grace: Duration,
    /// Blobs hashed (or checked) at once.
    pub concurrency: usize,
    pub plan: Plan,
    /// The flights of the `serve` this runs in, if any: their spools are never touched.
    pub flights: Option<Arc<BlobFlights>>,
    /// Where progress is shown (`ProgressBar::hidden()` for none).
    pub progress: indicatif::ProgressBar,
}

impl Options {
    /// The default concurrency: on local disk one hashing task per core, a few at most (the disk is usually the
    /// bound); on object storage more, because each read spends most of its time waiting on the network.
    pub fn default_concurrency(local: bool) -> usize {
        if !local {
            return 16;
        }
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8)
    }

    fn repairs(&self, kind: Kind) -> bool {
        match self.plan.repair {
            Repair::Nothing => false,
            Repair::Everything => true,
            Repair::Leftovers => kind.swept(),
        }
    }

    fn is_cache_repo(&self, repo: &str) -> bool {
        repo.split_once('/').is_some_and(|(first, _)| self.cache_namespaces.iter().any(|n| n == first))
    }

    /// Whether a file has been left alone for the grace period.
    fn abandoned(&self, md: &std::fs::Metadata) -> bool {
        self.abandoned_since(last_activity(md))
    }

    /// Whether something last touched at `t` has been left alone for the grace period (a time in the future has
    /// not).
    fn abandoned_since(&self, t: SystemTime) -> bool {
        SystemTime::now().duration_since(t).is_ok_and(|age| age >= self.grace)
    }

    /// Why unreferenced blobs stay if this run is to remove them, or `None` if it may.
    fn keeps_unreferenced(&self) -> Option<&'static str> {
        if self.local.is_none() {
            Some(concat!(
                "fsck never removes blobs from object storage, which several instances may share: ",
                "garbage collection (`breakwater gc`) does"
            ))
        } else if !self.plan.remove_unreferenced_bytes {
            Some("a server is running on this store; unreferenced bytes are removed only offline")
        } else {
            None
        }
    }

    async fn has_blob(&self, d: &Digest) -> Result<bool, FsckError> {
        Ok(self.store.size(d).await?.is_some())
    }

    /// Whether upload session `id` has its bytes in the store (an id that cannot be one of ours has none).
    async fn has_upload(&self, id: &str) -> Result<bool, FsckError> {
        match self.store.upload_size(id).await {
            Ok(size) => Ok(size.is_some()),
            Err(StorageError::NotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// When a file was last touched: written (mtime), or renamed or linked (ctime). Both count, because a store moves
/// files that it stopped writing long ago: a commit renames an upload that was idle for hours into `tmp/` and
/// links it under `blobs/`, and while it does, the file is in use though its mtime is old.
fn last_activity(md: &std::fs::Metadata) -> SystemTime {
    let modified = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let changed = u64::try_from(md.ctime())
            .ok()
            .and_then(|secs| SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, md.ctime_nsec().clamp(0, 999_999_999) as u32)))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        modified.max(changed)
    }
    #[cfg(not(unix))]
    modified
}

/// Where `LocalStore` keeps the bytes of `d`.
fn blob_path(root: &Path, d: &Digest) -> PathBuf {
    root.join("blobs").join(d.algorithm().as_str()).join(&d.hex()[..2]).join(d.hex())
}

/// Problems per kind, and how many of them were repaired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub found: u64,
    pub repaired: u64,
}

/// What was looked at, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    pub blobs: u64,
    pub blob_bytes: u64,
    pub links: u64,
    pub manifests: u64,
    pub tags: u64,
    pub cache_records: u64,
    pub uploads: u64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub counts: BTreeMap<Kind, Count>,
    pub checked: Checked,
}

impl Report {
    pub fn found(&self) -> u64 {
        self.counts.values().map(|c| c.found).sum()
    }

    pub fn repaired(&self) -> u64 {
        self.counts.values().map(|c| c.repaired).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error("{0} is not a content store (it has no blobs/ directory)")]
    NotAStore(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("the blob store: {0}")]
    Store(#[from] StorageError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FsckError + '_ {
    move |source| FsckError::Io { path: path.to_path_buf(), source }
}

/// Where problems go as they are found (the command prints them, the sweep logs them).
pub type Sink<'a> = &'a mut (dyn FnMut(&Problem) + Send);

/// A run in progress: the options, the metadata store, the tally, and where problems go.
struct Run<'a> {
    opts: &'a Options,
    meta: &'a dyn Meta,
    report: Report,
    sink: Sink<'a>,
}

impl Run<'_> {
    /// Records a problem found; `fix` runs only if this run repairs `kind`, and says what it did.
    async fn problem<F, Fut>(&mut self, kind: Kind, what: String, fix: F) -> Result<(), FsckError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Action, FsckError>>,
    {
        let action = if self.opts.repairs(kind) { fix().await? } else { Action::Reported };
        let count = self.report.counts.entry(kind).or_default();
        count.found += 1;
        if matches!(action, Action::Repaired(_)) {
            count.repaired += 1;
        }
        (self.sink)(&Problem { kind, what, action });
        Ok(())
    }

    fn phase(&self, what: &str) {
        self.opts.progress.set_message(what.to_string());
    }
}

/// Checks `opts.store` against `meta` as `opts.plan` says, reporting each problem to `sink`.
pub async fn check(opts: &Options, meta: &dyn Meta, sink: Sink<'_>) -> Result<Report, FsckError> {
    if let Some(root) = opts.local.as_deref().filter(|root| !root.join("blobs").is_dir()) {
        return Err(FsckError::NotAStore(root.to_path_buf()));
    }
    let mut run = Run { opts, meta, report: Report::default(), sink };
    if opts.plan.hash_blobs {
        run.phase("hashing blobs");
        blobs::walk(&mut run, blobs::Pass::Hash).await?;
    }
    if opts.plan.records {
        run.phase("checking links");
        records::links(&mut run).await?;
        run.phase("checking manifests");
        records::manifests(&mut run).await?;
        run.phase("checking tags");
        records::tags(&mut run).await?;
    }
    run.phase("checking cache records");
    records::cache(&mut run).await?;
    run.phase("checking uploads");
    records::uploads(&mut run).await?;
    if let Some(root) = &opts.local {
        records::upload_files(&mut run, root).await?;
        run.phase("looking for leftovers");
        records::leftovers(&mut run, root, "tmp", Kind::LeftoverTmp).await?;
        records::leftovers(&mut run, root, "spool", Kind::LeftoverSpool).await?;
    }
    run.phase("looking for unreferenced blobs");
    blobs::walk(&mut run, blobs::Pass::References).await?;
    Ok(run.report)
}

/// Moves `from` to `to`, creating `to`'s directory.
async fn move_aside(from: &Path, to: &Path) -> Result<(), FsckError> {
    if let Some(dir) = to.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io_error(dir))?;
    }
    tokio::fs::rename(from, to).await.map_err(io_error(from))
}

/// Removes a file; one that is already gone is fine (someone else cleaned it up).
async fn remove(path: &Path) -> Result<(), FsckError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(FsckError::Io { path: path.to_path_buf(), source: e }),
        _ => Ok(()),
    }
}

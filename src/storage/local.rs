//! The local-filesystem blob store: `blobs/<alg>/<hh>/<hex>`, partial uploads in `uploads/`, whole-blob writes
//! staged in `tmp/`. All three live on the same filesystem, so committing is a link, never a copy.
//!
//! A verified file enters `blobs/` from `tmp/` by `hard_link`, which fails rather than replace an existing
//! blob: a blob stored once is never replaced (the newcomer, with the same digest, is discarded). An upload is
//! first renamed from `uploads/` into `tmp/` (under its session's claim, so nothing writes to it), so no path of
//! `uploads/` ever names a committed blob's inode, even after a crash between the steps.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::fs::{self, File};
use tokio_util::io::ReaderStream;

use super::carry::{Carry, Running};
use super::open_maps::{OpenMaps, StoredMap};
use super::{BlobStore, ByteRange, ByteStream, OpenBlob, OpenBytes, StorageError, StoredBlob, UploadClaim, UploadSessions};
use crate::oci::Digest;

/// Blobs up to this size are read into memory whole instead of mapped: for a manifest or a config,
/// one read costs less than a map's syscalls and page faults, and it is no more memory than a read buffer was.
const SMALL_BLOB: usize = 64 * 1024;
/// How much of a mapped blob one slice handed to hyper holds. A slice costs no memory (it points into the map), so
/// large slices mean few polls; bounded because HTTP/2's stuck-response bound (`connection.rs`) sees a client
/// only between slices: one that reads less than this within the idle timeout is taken for one that stopped.
const SERVE_SLICE: usize = 256 * 1024;
/// How much of a mapped blob the kernel is asked at a time to bring into page cache ahead of what is being sent
/// (between one and two of these ahead), so that the copy into the socket, on a runtime thread, finds its pages
/// there instead of waiting for the disk. A multiple of `SERVE_SLICE`.
const READ_AHEAD: usize = 4 * SERVE_SLICE;
/// How much of a request body is gathered into one write (a `writev` of hyper's buffers, then hashed) of a blob or
/// an upload, on a blocking thread while the next batch arrives: large for few trips to the blocking pool; at
/// most two batches (and a chunk) are held per request body.
const WRITE_CHUNK: usize = 256 * 1024;
/// How much of a blob is written before its writeback is started (`Sink::start_writeback`).
const WRITEBACK_AHEAD: u64 = 8 * 1024 * 1024;
/// The read buffer of a commit that has to hash its upload from disk.
const HASH_READ: usize = 1024 * 1024;

pub struct LocalStore {
    root: PathBuf,
    /// Which upload sessions a request is working on (one request at a time per session).
    sessions: UploadSessions,
    /// The running digests of upload sessions, so that a commit need not read its upload back.
    carry: Carry,
    /// The maps of blobs being downloaded, reused by downloads of the same blob that start meanwhile.
    maps: Arc<OpenMaps>,
}

impl LocalStore {
    /// Opens (creating if needed) a store under `root`. Several processes may have one store open at once (a
    /// server, `breakwater gc`, `migrate-storage` reading it), so opening touches nothing in it: what a crash
    /// left in `tmp/` is the reconciliation sweep's to remove once it is older than the grace period, never a
    /// file another process is writing or committing at this moment.
    pub async fn open(root: &Path) -> io::Result<LocalStore> {
        for dir in ["blobs", "uploads", "tmp"] {
            fs::create_dir_all(root.join(dir)).await?;
        }
        Ok(Self::existing(root))
    }

    /// Removes what writes interrupted by a crash left in `tmp/`. Only for a process that knows it is alone on
    /// the store (it holds the store lock exclusively): otherwise these may be another process's writes.
    pub async fn remove_interrupted_writes(root: &Path) -> io::Result<u64> {
        let mut removed = 0;
        let mut entries = match fs::read_dir(root.join("tmp")).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        while let Some(e) = entries.next_entry().await? {
            if fs::remove_file(e.path()).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// A handle on the store under `root` that creates nothing, for `fsck` and its sweep: they check what is
    /// there (a missing directory is a finding, not something to create).
    pub fn existing(root: &Path) -> LocalStore {
        LocalStore { root: root.to_path_buf(), sessions: UploadSessions::default(), carry: Carry::default(), maps: Arc::default() }
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs").join(d.algorithm().as_str()).join(&d.hex()[..2]).join(d.hex())
    }

    /// Upload ids are generated by the registry (UUIDs), but they come back from the network: anything that could
    /// escape the uploads directory is treated as unknown.
    fn upload_path(&self, id: &str) -> Result<PathBuf, StorageError> {
        if !super::is_upload_id(id) {
            return Err(StorageError::NotFound);
        }
        Ok(self.root.join("uploads").join(id))
    }

    /// A fresh name in `tmp/`, removed when the returned guard is dropped.
    fn staging(&self) -> Staged {
        Staged(self.root.join("tmp").join(uuid::Uuid::new_v4().to_string()))
    }

    /// Moves `from` (which no handle writes to any more) into `tmp/`, for `install`. The rename runs in place
    /// rather than on the blocking pool: a cancelled caller must not leave a rename to land after its guard has
    /// removed the staging name (it is one metadata operation).
    fn stage(&self, from: &Path) -> io::Result<Staged> {
        let staged = self.staging();
        std::fs::rename(from, &staged.0)?;
        Ok(staged)
    }

    /// Links a verified, fsynced staging file under its digest and makes the link durable; the staging name is
    /// removed either way. If the digest is stored already, the stored file stays and the staged one is dropped.
    async fn install(&self, staged: Staged, digest: &Digest) -> Result<(), StorageError> {
        let to = self.blob_path(digest);
        let dir = to.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).await?;
        match fs::hard_link(&staged.0, &to).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        drop(staged);
        File::open(dir).await?.sync_all().await?;
        Ok(())
    }
}

/// Committed blobs under `blobs` (`<alg>/<hh>/<hex>`) in digest order after `after`, at most `limit` (see
/// `BlobStore::list`). A page reads only the directories at and after `after`'s, so a walk reads each once or
/// twice. Names that are not a digest in its right place are skipped (they are `fsck`'s to report).
fn list_blobs(blobs: &Path, after: Option<&Digest>, limit: usize) -> io::Result<Vec<StoredBlob>> {
    let mut out = Vec::new();
    // Directory names sort as digests do: algorithm names in the order of `Algorithm`, lowercase hex.
    let after = after.map(|d| (d.algorithm().as_str(), d.hex()));
    for alg in sorted_names(blobs)? {
        if after.is_some_and(|(a, _)| alg.as_str() < a) {
            continue;
        }
        let within = after.filter(|(a, _)| *a == alg).map(|(_, hex)| hex);
        for fan in sorted_names(&blobs.join(&alg))? {
            if within.is_some_and(|hex| fan.as_str() < &hex[..2]) {
                continue;
            }
            let dir = blobs.join(&alg).join(&fan);
            for name in sorted_names(&dir)? {
                if within.is_some_and(|hex| name.as_str() <= hex) {
                    continue;
                }
                let Ok(digest) = format!("{alg}:{name}").parse::<Digest>() else { continue };
                if digest.hex()[..2] != fan {
                    continue;
                }
                let md = match std::fs::metadata(dir.join(&name)) {
                    Ok(md) if md.is_file() => md,
                    Ok(_) => continue,
                    // Removed since the directory was read.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                out.push(StoredBlob { digest, size: md.len(), stored_at: md.modified()? });
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}

/// The names in `dir`, sorted byte-wise; none if it does not exist.
fn sorted_names(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for e in entries {
        if let Ok(name) = e?.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Opens the stored blob at `path` for a download, in the one blocking trip it needs: its size, and its bytes
/// (read whole when small, else a memory map of the file, which hyper writes to the socket straight from page
/// cache: no copy through a buffer of ours, no blocking-pool trip per chunk), which `maps` then shares with the
/// downloads of `digest` that start while it lives. `None` if it is not stored.
fn open_whole(path: &Path, digest: &Digest, maps: &OpenMaps) -> Result<Option<OpenBlob>, StorageError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let metadata = file.metadata()?;
    let size = metadata.len();
    let len = usize::try_from(size).map_err(io::Error::other)?;
    let bytes = if len <= SMALL_BLOB {
        let mut buf = vec![0; len];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0)?;
        Opened::Read(Bytes::from(buf))
    } else {
        // SAFETY: a map is sound while nothing writes to or truncates the file under it. A file under `blobs/` is
        // never written to once linked there (the storage invariant; `UploadClaim` for uploads), and eviction and
        // fsck only unlink it, which leaves a mapped file's pages valid until they are unmapped.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&file)? };
        Opened::Mapped(maps.insert(digest, StoredMap::new(map, &metadata)))
    };
    Ok(Some(OpenBlob { size, bytes: Some(Box::new(bytes)) }))
}

/// A stored blob's bytes as `open_whole` opened them.
enum Opened {
    /// A small blob, read whole.
    Read(Bytes),
    Mapped(Arc<StoredMap>),
}

impl OpenBytes for Opened {
    fn stream(self: Box<Self>, range: Option<ByteRange>) -> Result<ByteStream, StorageError> {
        let size = match &*self {
            Opened::Read(b) => b.len(),
            Opened::Mapped(m) => m.map.len(),
        };
        // A map read past the file's end faults (SIGBUS), so a window the file does not hold is refused here.
        let window = match range {
            None => 0..size,
            Some(r) => match (usize::try_from(r.start), usize::try_from(r.end)) {
                (Ok(start), Ok(end)) if start <= end && end <= size => start..end,
                _ => {
                    let why = format!("bytes {}..{} of a {size}-byte blob", r.start, r.end);
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, why).into());
                }
            },
        };
        if window.is_empty() {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        Ok(match *self {
            Opened::Read(b) => Box::pin(futures_util::stream::once(std::future::ready(Ok(b.slice(window))))),
            Opened::Mapped(m) => Box::pin(MappedSlices::new(m, window)),
        })
    }
}

/// A memory map shared by the slices handed out of it (`Bytes::from_owner` needs its owner to be the bytes).
struct SharedMap(Arc<StoredMap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

/// A window of a mapped blob as a stream of `SERVE_SLICE` slices of it. Each slice keeps the map alive, so the
/// map is unmapped when the stream and the last slice in hyper's queue are gone; while the stream runs, the kernel
/// is asked to read ahead (`MADV_WILLNEED`, which starts the reads and does not wait for them).
struct MappedSlices {
    /// The map itself, for the read-ahead advice.
    map: Arc<StoredMap>,
    /// Where the window starts and ends in the map.
    window: std::ops::Range<usize>,
    /// What is still to be sent, a view of `map` (so `window.end - rest.len()` is where it starts).
    rest: Bytes,
    /// Whether the stream has let the runtime run other tasks since its last slice. It does between slices: a
    /// socket on loopback takes megabytes at once, and without a yield one connection would hold a runtime
    /// thread for all of them while other clients wait for their first bytes (the blocking-pool reads this
    /// replaced yielded at every chunk by themselves).
    yielded: bool,
}

impl MappedSlices {
    fn new(map: Arc<StoredMap>, window: std::ops::Range<usize>) -> MappedSlices {
        let rest = Bytes::from_owner(SharedMap(Arc::clone(&map))).slice(window.clone());
        // The first slice goes out at once: a first byte never waits for the yield.
        let stream = MappedSlices { map, rest, yielded: true, window };
        stream.read_ahead(stream.window.start, 2 * READ_AHEAD);
        stream
    }

    /// Advises the kernel that `[from, from + len)` of the window will be read soon. Only advice: a failure
    /// changes nothing but speed.
    fn read_ahead(&self, from: usize, len: usize) {
        let len = len.min(self.window.end.saturating_sub(from));
        if len > 0 {
            let _ = self.map.map.advise_range(memmap2::Advice::WillNeed, from, len);
        }
    }
}

impl futures_util::Stream for MappedSlices {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        if !self.yielded {
            // A task that wakes itself is put at the back of the run queue: the others run first.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        let n = SERVE_SLICE.min(self.rest.len());
        let slice = self.rest.split_to(n);
        // At each READ_AHEAD boundary of the window, the advice moves on by READ_AHEAD: it stays one to two of
        // them ahead.
        let at = self.window.end - self.rest.len();
        if (at - self.window.start) % READ_AHEAD == 0 {
            self.read_ahead(at + READ_AHEAD, READ_AHEAD);
        }
        Poll::Ready(Some(Ok(slice)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.rest.len().div_ceil(SERVE_SLICE);
        (n, Some(n))
    }
}

/// A file in `tmp/` that is removed when this is dropped: a write that is abandoned (an error, or a request
/// cancelled because its client went away) leaves nothing behind, and an installed file keeps only its name
/// under `blobs/`.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        // One unlink; not worth a trip to the blocking pool. Absent already (renamed or never created) is fine.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A batch of body chunks written with one vectored write: the chunks are hyper's buffers, never copied.
type Batch = Vec<Bytes>;

/// A file being filled from a request body, with the running digest of what it holds (when known) and `held`,
/// what must live exactly as long as a write to the file can still land (an upload's claim). It only ever writes
/// synchronously, on a blocking thread that owns it for the duration of the write: a write is never left in
/// flight by a dropped future, and `held` (dropped after the file, by field order) goes only when none can land.
struct Sink<T> {
    file: std::fs::File,
    /// The file's end, and where the part not yet handed to writeback starts (`start_writeback`).
    end: u64,
    unflushed: u64,
    /// Fed each batch after its write succeeded, so it covers exactly the bytes in the file; `None` once that is
    /// not known (a write failed midway) or was never known (an upload resumed without a carried digest).
    running: Option<Running>,
    held: T,
}

/// A `Sink` between writes (with a spare batch to refill), or away on a blocking thread writing one.
enum Pump<T> {
    Idle(Box<Sink<T>>, Batch),
    Busy(tokio::task::JoinHandle<(Sink<T>, Batch, io::Result<()>)>),
}

impl<T: Send + 'static> Sink<T> {
    /// Writes `batch`, then hashes it, on a blocking thread. If the caller's future is dropped meanwhile, the
    /// thread finishes and then drops the sink (and with it what it holds).
    fn write(mut self, mut batch: Batch) -> Pump<T> {
        Pump::Busy(tokio::task::spawn_blocking(move || {
            let r = write_all_vectored(&mut self.file, &batch);
            if r.is_ok() {
                self.end += batch.iter().map(|b| b.len() as u64).sum::<u64>();
                self.start_writeback();
            }
            match (&r, self.running.as_mut()) {
                (Ok(()), Some(running)) => batch.iter().for_each(|b| running.update(b)),
                // What reached the file is unknown: no digest can be carried past it.
                (Err(_), _) => self.running = None,
                (Ok(()), None) => {}
            }
            batch.clear();
            (self, batch, r)
        }))
    }

    /// A file whose end is `end`, filled from there on.
    fn new(file: std::fs::File, end: u64, running: Option<Running>, held: T) -> Sink<T> {
        Sink { file, end, unflushed: end, running, held }
    }

    /// Once `WRITEBACK_AHEAD` bytes were written since the last time, asks the kernel to start writing them to
    /// disk (`SYNC_FILE_RANGE_WRITE`: it starts the writeback and does not wait for it, except for a full device
    /// queue, which only slows this blocking thread to the disk's pace). Without it the dirty pages of a large
    /// blob would wait for the fsync before the commit, which then writes them all while the client waits. Only
    /// advice: a failure changes nothing but speed, since the commit's fsync makes the file durable whatever.
    fn start_writeback(&mut self) {
        let len = self.end - self.unflushed;
        if len < WRITEBACK_AHEAD {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd as _;
            let (Ok(from), Ok(len)) = (i64::try_from(self.unflushed), i64::try_from(len)) else { return };
            // SAFETY: a plain syscall on a file descriptor this sink owns; it reads no memory of ours.
            unsafe { libc::sync_file_range(self.file.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE) };
        }
        self.unflushed = self.end;
    }

    /// The file's size, read on a blocking thread like the writes.
    async fn size(self) -> Result<(u64, Sink<T>), StorageError> {
        let joined = tokio::task::spawn_blocking(move || {
            let r = self.file.metadata().map(|m| m.len());
            (self, r)
        })
        .await;
        match joined {
            Ok((s, Ok(len))) => Ok((len, s)),
            Ok((_, Err(e))) => Err(e.into()),
            Err(e) => Err(StorageError::Io(io::Error::other(format!("write thread failed: {e}")))),
        }
    }
}

impl<T: Send + 'static> Pump<T> {
    /// The sink, once no write of it is in flight.
    async fn idle(self) -> Result<(Sink<T>, Batch), StorageError> {
        match self {
            Pump::Idle(sink, spare) => Ok((*sink, spare)),
            Pump::Busy(h) => match h.await {
                Ok((sink, spare, Ok(()))) => Ok((sink, spare)),
                Ok((_, _, Err(e))) => Err(e.into()),
                Err(e) => Err(StorageError::Io(io::Error::other(format!("write thread failed: {e}")))),
            },
        }
    }
}

/// Writes every byte of `batch` to `file`, with as few `writev` calls as the kernel allows.
fn write_all_vectored(file: &mut std::fs::File, batch: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = batch.iter().filter(|b| !b.is_empty()).map(|b| io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies `body` to the end of the sink's file, in batches of `WRITE_CHUNK`, one batch written (and hashed) on a
/// blocking thread while the next arrives. Returns the sink once all that arrived is written, with the body's
/// error if it broke (what arrived before the break is written too: an upload keeps it, for a resume).
async fn pump<T: Send + 'static>(sink: Sink<T>, mut body: ByteStream) -> Result<(Sink<T>, Option<StorageError>), StorageError> {
    let mut pump = Pump::Idle(Box::new(sink), Batch::new());
    let (mut batch, mut batched) = (Batch::new(), 0usize);
    let mut failure = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => {
                batched += bytes.len();
                batch.push(bytes);
                if batched >= WRITE_CHUNK {
                    let (sink, spare) = pump.idle().await?;
                    pump = sink.write(std::mem::replace(&mut batch, spare));
                    batched = 0;
                }
            }
            Err(e) => {
                failure = Some(StorageError::Body(e));
                break;
            }
        }
    }
    let (sink, _) = pump.idle().await?;
    let (sink, _) = if batch.is_empty() { (sink, batch) } else { sink.write(batch).idle().await? };
    Ok((sink, failure))
}

/// Hashes the file at `path` under `algorithm` on a blocking thread; with the number of bytes hashed.
async fn hash_file(path: PathBuf, algorithm: crate::oci::Algorithm) -> Result<(Digest, u64), StorageError> {
    let hashed = tokio::task::spawn_blocking(move || -> io::Result<(Digest, u64)> {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = algorithm.hasher();
        let mut buf = vec![0u8; HASH_READ];
        let mut size = 0u64;
        loop {
            let n = match io::Read::read(&mut file, &mut buf) {
                Ok(0) => return Ok((hasher.finish(), size)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            size += n as u64;
        }
    })
    .await;
    match hashed {
        Ok(Ok(h)) => Ok(h),
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(StorageError::Io(io::Error::other(format!("hash thread failed: {e}")))),
    }
}

/// Makes the file at `path` durable (an fsync, on a blocking thread); with its size.
async fn sync_file(path: PathBuf) -> Result<u64, StorageError> {
    let synced = tokio::task::spawn_blocking(move || -> io::Result<u64> {
        let file = std::fs::File::open(path)?;
        file.sync_all()?;
        Ok(file.metadata()?.len())
    })
    .await;
    match synced {
        Ok(Ok(size)) => Ok(size),
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(StorageError::Io(io::Error::other(format!("sync thread failed: {e}")))),
    }
}

#[async_trait::async_trait]
impl BlobStore for LocalStore {
    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        match fs::metadata(self.blob_path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<ByteStream, StorageError> {
        match self.open(digest).await?.and_then(|b| b.bytes) {
            Some(bytes) => bytes.stream(range),
            None => Err(StorageError::NotFound),
        }
    }

    async fn open(&self, digest: &Digest) -> Result<Option<OpenBlob>, StorageError> {
        let path = self.blob_path(digest);
        if let Some(map) = self.maps.get(digest, &path) {
            let size = map.map.len() as u64;
            return Ok(Some(OpenBlob { size, bytes: Some(Box::new(Opened::Mapped(map))) }));
        }
        // Opening, sizing and mapping are the only blocking steps of a download: one trip to the blocking pool.
        let (digest, maps) = (digest.clone(), Arc::clone(&self.maps));
        match tokio::task::spawn_blocking(move || open_whole(&path, &digest, &maps)).await {
            Ok(opened) => opened,
            Err(e) => Err(StorageError::Io(io::Error::other(format!("open thread failed: {e}")))),
        }
    }

    async fn put(&self, expected: &Digest, body: ByteStream) -> Result<u64, StorageError> {
        // Created in place (not on the blocking pool, where a cancelled caller's create could land after the
        // guard's removal): whatever happens to this future from here on, the guard removes the staging file.
        let staged = self.staging();
        let file = std::fs::File::create(&staged.0)?;
        let sink = Sink::new(file, 0, Some(Running::new(expected.algorithm())), ());
        let (mut sink, failure) = pump(sink, body).await?;
        if let Some(e) = failure {
            return Err(e);
        }
        // A put's sink hashes every write it made (only a failed write, which ended the pump, drops the state).
        let Some(running) = sink.running.take() else {
            return Err(StorageError::Io(io::Error::other("a put lost its running digest")));
        };
        let (size, actual) = (running.hashed, running.hasher.finish());
        if &actual != expected {
            return Err(StorageError::DigestMismatch { expected: expected.clone(), actual });
        }
        // Every write has landed (the sink is back): the fsync covers them all before the file gets its name.
        let synced = tokio::task::spawn_blocking(move || sink.file.sync_all()).await;
        synced.map_err(|e| StorageError::Io(io::Error::other(format!("sync thread failed: {e}"))))??;
        self.install(staged, expected).await?;
        Ok(size)
    }

    async fn adopt_file(&self, digest: &Digest, path: &Path) -> Result<u64, StorageError> {
        let file = File::open(path).await?;
        file.sync_all().await?;
        let size = file.metadata().await?.len();
        drop(file);
        match self.stage(path) {
            Ok(staged) => self.install(staged, digest).await?,
            Err(_) => {
                // A spool on another filesystem cannot be renamed in: copy it through the verifying path instead.
                let file = File::open(path).await?;
                let body: ByteStream = Box::pin(ReaderStream::with_capacity(file, WRITE_CHUNK));
                self.put(digest, body).await?;
                let _ = fs::remove_file(path).await;
            }
        }
        Ok(size)
    }

    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<StoredBlob>, StorageError> {
        let (blobs, after) = (self.root.join("blobs"), after.cloned());
        let listed = tokio::task::spawn_blocking(move || list_blobs(&blobs, after.as_ref(), limit)).await;
        Ok(listed.map_err(|e| io::Error::other(format!("listing thread failed: {e}")))??)
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        match fs::remove_file(self.blob_path(digest)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn upload_start(&self, id: &str) -> Result<(), StorageError> {
        File::create(self.upload_path(id)?).await?;
        Ok(())
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError> {
        match fs::metadata(self.upload_path(id)?).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn upload_claim(&self, id: &str) -> Result<UploadClaim, StorageError> {
        self.upload_path(id)?;
        self.sessions.claim(id)
    }

    async fn upload_append(&self, claim: UploadClaim, body: ByteStream) -> Result<(u64, UploadClaim), StorageError> {
        let path = self.upload_path(claim.id())?;
        let opened = tokio::task::spawn_blocking(move || -> io::Result<(std::fs::File, u64)> {
            let file = std::fs::OpenOptions::new().append(true).open(path)?;
            let size = file.metadata()?.len();
            Ok((file, size))
        })
        .await;
        let (file, size) = match opened {
            Ok(Ok(f)) => f,
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => return Err(StorageError::NotFound),
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(StorageError::Io(io::Error::other(format!("open thread failed: {e}")))),
        };
        // The digest of what the session holds, if this instance hashed all of it; the append continues it.
        let running = self.carry.resume(claim.id(), size);
        let (sink, failure) = pump(Sink::new(file, size, running, claim), body).await?;
        let (size, mut sink) = sink.size().await?;
        if let Some(running) = sink.running.take() {
            // What arrived before a broken body is in the file and was hashed: the state covers it either way.
            self.carry.keep(sink.held.id(), size, running);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok((size, sink.held)),
        }
    }

    async fn upload_commit(&self, claim: UploadClaim, expected: &Digest) -> Result<u64, StorageError> {
        let path = self.upload_path(claim.id())?;
        // Durable first: the fsync waits for the writeback of what the appends wrote, which is most of a commit's
        // time, and gives the size the carried digest must cover.
        let size = sync_file(path.clone()).await?;
        // The digest computed while the bytes arrived, if this instance saw all of them arrive; otherwise (a
        // restart, an evicted entry, a write that failed midway, sha512) the stored bytes are hashed, as they
        // may have arrived over many requests and restarts.
        let (actual, size) = match self.carry.finish(claim.id(), size, expected) {
            Some(d) => (d, size),
            None => hash_file(path.clone(), expected.algorithm()).await?,
        };
        if &actual != expected {
            let _ = fs::remove_file(&path).await;
            return Err(StorageError::DigestMismatch { expected: expected.clone(), actual });
        }
        // Out of `uploads/` before it gets a name under `blobs/`, and still under the claim: no request can open
        // it for appending any more.
        let staged = self.stage(&path)?;
        self.install(staged, expected).await?;
        Ok(size)
    }

    async fn upload_abort(&self, claim: UploadClaim) -> Result<(), StorageError> {
        self.carry.forget(claim.id());
        match fs::remove_file(self.upload_path(claim.id())?).await {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound),
            Err(e) => Err(e.into()),
            Ok(()) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn stream(parts: Vec<io::Result<Bytes>>) -> ByteStream {
        Box::pin(futures_util::stream::iter(parts))
    }

    async fn collect(s: ByteStream) -> Vec<u8> {
        let parts: Vec<_> = s.collect().await;
        parts.into_iter().flat_map(|b| b.unwrap().to_vec()).collect()
    }

    #[tokio::test]
    async fn put_verifies_and_reads_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let d = Digest::of(Algorithm::Sha256, b"hello world");
        let n = store.put(&d, stream(vec![Ok(Bytes::from("hello ")), Ok(Bytes::from("world"))])).await.unwrap();
        assert_eq!(n, 11);
        assert_eq!(store.size(&d).await.unwrap(), Some(11));
        assert_eq!(collect(store.read(&d, None).await.unwrap()).await, b"hello world");
        let r = ByteRange { start: 6, end: 11 };
        assert_eq!(collect(store.read(&d, Some(r)).await.unwrap()).await, b"world");
    }

    #[tokio::test]
    async fn mismatch_and_broken_body_leave_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let d = Digest::of(Algorithm::Sha256, b"hello world");
        let err = store.put(&d, stream(vec![Ok(Bytes::from("hello there"))])).await.unwrap_err();
        assert!(matches!(err, StorageError::DigestMismatch { .. }));
        let broken = stream(vec![Ok(Bytes::from("hello ")), Err(io::Error::other("client went away"))]);
        assert!(matches!(store.put(&d, broken).await.unwrap_err(), StorageError::Body(_)));
        assert_eq!(store.size(&d).await.unwrap(), None);
        // No staging file is left behind either.
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn opening_a_store_leaves_another_process_writes_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        // A write in progress in one process (its staging file), and the same store opened by another.
        let staged = dir.path().join("tmp").join("in-progress");
        std::fs::write(&staged, b"half a bl").unwrap();
        let other = LocalStore::open(dir.path()).await.unwrap();
        assert!(staged.exists(), "opening the store removed a write in progress");
        // Nothing of it is visible as a blob, to either.
        let d = Digest::of(Algorithm::Sha256, b"half a blob");
        assert_eq!(store.size(&d).await.unwrap(), None);
        assert_eq!(other.size(&d).await.unwrap(), None);
    }

    #[tokio::test]
    async fn chunked_upload_commits_after_verification() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        store.upload_start("u1").await.unwrap();
        let claim = store.upload_claim("u1").unwrap();
        let (n, claim) = store.upload_append(claim, stream(vec![Ok(Bytes::from("abc"))])).await.unwrap();
        assert_eq!(n, 3);
        let (n, claim) = store.upload_append(claim, stream(vec![Ok(Bytes::from("def"))])).await.unwrap();
        assert_eq!(n, 6);
        let wrong = Digest::of(Algorithm::Sha512, b"abc");
        assert!(store.upload_commit(claim, &wrong).await.is_err());
        assert_eq!(store.upload_size("u1").await.unwrap(), None, "a failed commit discards the upload");

        store.upload_start("u2").await.unwrap();
        let claim = store.upload_claim("u2").unwrap();
        let (_, claim) = store.upload_append(claim, stream(vec![Ok(Bytes::from("abcdef"))])).await.unwrap();
        let d = Digest::of(Algorithm::Sha512, b"abcdef");
        assert_eq!(store.upload_commit(claim, &d).await.unwrap(), 6);
        assert_eq!(collect(store.read(&d, None).await.unwrap()).await, b"abcdef");
        assert!(matches!(store.upload_size("../x").await, Err(StorageError::NotFound)));
        assert!(matches!(store.upload_claim("../x"), Err(StorageError::NotFound)));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    /// Appends each of `parts` to session `id` as a request of its own; returns the claim and the size.
    async fn append_all(store: &LocalStore, id: &str, parts: &[&[u8]]) -> (UploadClaim, u64) {
        let mut claim = store.upload_claim(id).unwrap();
        let mut size = 0;
        for p in parts {
            (size, claim) = store.upload_append(claim, stream(vec![Ok(Bytes::copy_from_slice(p))])).await.unwrap();
        }
        (claim, size)
    }

    /// The digest a commit checks is the one computed while the bytes arrived: the commit does not read the
    /// upload back. Shown by changing the file's bytes behind the store's back after the appends: the commit
    /// still finds the digest of what was appended (before, it re-read the file and found the changed bytes).
    #[tokio::test]
    async fn a_commit_uses_the_digest_computed_while_the_bytes_arrived() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        store.upload_start("u").await.unwrap();
        let (claim, size) = append_all(&store, "u", &[b"abc", b"def"]).await;
        assert_eq!(size, 6);
        std::fs::write(dir.path().join("uploads").join("u"), b"xxxxxx").unwrap();
        let d = Digest::of(Algorithm::Sha256, b"abcdef");
        assert_eq!(store.upload_commit(claim, &d).await.unwrap(), 6, "the commit hashed the file instead");
        assert!(store.carry.is_empty(), "a committed session's digest is not kept");
    }

    /// After a restart (a new store over the same directory) nothing carries the digest of what the session
    /// holds: the appends that follow do not hash, and the commit hashes the stored bytes, so it sees exactly what
    /// is on disk, right or wrong.
    #[tokio::test]
    async fn after_a_restart_the_commit_hashes_the_stored_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let before = LocalStore::open(dir.path()).await.unwrap();
        for id in ["resumed", "changed"] {
            before.upload_start(id).await.unwrap();
        }
        drop(append_all(&before, "resumed", &[b"abc"]).await);
        drop(append_all(&before, "changed", &[b"abcdef"]).await);
        drop(before);

        let after = LocalStore::open(dir.path()).await.unwrap();
        let (claim, size) = append_all(&after, "resumed", &[b"def", b"ghi"]).await;
        assert_eq!(size, 9);
        let d = Digest::of(Algorithm::Sha256, b"abcdefghi");
        assert_eq!(after.upload_commit(claim, &d).await.unwrap(), 9);
        assert_eq!(collect(after.read(&d, None).await.unwrap()).await, b"abcdefghi");

        // The bytes on disk are what the commit checks: changed ones fail it.
        std::fs::write(dir.path().join("uploads").join("changed"), b"xxxxxx").unwrap();
        let claim = after.upload_claim("changed").unwrap();
        let err = after.upload_commit(claim, &Digest::of(Algorithm::Sha256, b"abcdef")).await.unwrap_err();
        assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
    }

    /// A PATCH whose body breaks keeps what arrived, and the digest carried covers exactly those bytes: the
    /// resumed upload commits under the digest of all the bytes, and the blob is those bytes.
    #[tokio::test]
    async fn after_a_broken_body_the_bytes_kept_are_the_bytes_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        store.upload_start("b").await.unwrap();
        let claim = store.upload_claim("b").unwrap();
        // More than a batch before the break, and a part of one: both written, both hashed.
        let first = Bytes::from(vec![7u8; WRITE_CHUNK + 5]);
        let broken = stream(vec![Ok(first.clone()), Ok(Bytes::from("tail")), Err(io::Error::other("client went away"))]);
        assert!(matches!(store.upload_append(claim, broken).await.unwrap_err(), StorageError::Body(_)));
        let kept = store.upload_size("b").await.unwrap().unwrap();
        assert_eq!(kept, first.len() as u64 + 4);

        let (claim, size) = append_all(&store, "b", &[b"rest"]).await;
        let mut all = first.to_vec();
        all.extend_from_slice(b"tailrest");
        assert_eq!(size, all.len() as u64);
        let d = Digest::of(Algorithm::Sha256, &all);
        assert_eq!(store.upload_commit(claim, &d).await.unwrap(), size);
        assert_eq!(collect(store.read(&d, None).await.unwrap()).await, all);
    }

    /// Bodies of many chunks of uneven sizes, across batch boundaries, land whole and in order, through an upload
    /// of several appends and through a put.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uneven_chunks_land_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut all = Vec::new();
        let mut requests: Vec<Vec<Bytes>> = Vec::new();
        for _ in 0..4 {
            let mut parts = Vec::new();
            for _ in 0..40 {
                let len = (next() % (WRITE_CHUNK as u64 / 3)) as usize;
                let part: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                all.extend_from_slice(&part);
                parts.push(Bytes::from(part));
            }
            requests.push(parts);
        }
        store.upload_start("many").await.unwrap();
        let mut claim = store.upload_claim("many").unwrap();
        for parts in &requests {
            claim = store.upload_append(claim, stream(parts.iter().cloned().map(Ok).collect())).await.unwrap().1;
        }
        let d = Digest::of(Algorithm::Sha256, &all);
        assert_eq!(store.upload_commit(claim, &d).await.unwrap(), all.len() as u64);
        assert_eq!(collect(store.read(&d, None).await.unwrap()).await, all);

        let d512 = Digest::of(Algorithm::Sha512, &all);
        let body = stream(requests.concat().into_iter().map(Ok).collect());
        assert_eq!(store.put(&d512, body).await.unwrap(), all.len() as u64);
        assert_eq!(collect(store.read(&d512, None).await.unwrap()).await, all);
    }

    #[tokio::test]
    async fn one_claim_at_a_time_per_session() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        store.upload_start("s").await.unwrap();
        let claim = store.upload_claim("s").unwrap();
        assert!(matches!(store.upload_claim("s"), Err(StorageError::Busy)));
        store.upload_start("other").await.unwrap();
        drop(store.upload_claim("other").unwrap());
        drop(claim);
        drop(store.upload_claim("s").unwrap());
    }

    /// An append whose future is dropped in the middle of the body (the client went away) keeps its claim until
    /// its last write has landed: the next claim, and so a commit, sees a session nothing writes to any more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_append_releases_its_claim_only_when_no_write_can_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(LocalStore::open(dir.path()).await.unwrap());
        for round in 0..50u64 {
            let id = format!("c{round}");
            store.upload_start(&id).await.unwrap();
            let claim = store.upload_claim(&id).unwrap();
            // Large chunks, so that a write is often in flight on the blocking pool when the future is dropped.
            let chunk = Bytes::from(vec![round as u8; 3 * WRITE_CHUNK]);
            let endless: ByteStream = Box::pin(futures_util::stream::repeat_with(move || Ok(chunk.clone())));
            let (s, i) = (std::sync::Arc::clone(&store), id.clone());
            let append = tokio::spawn(async move { s.upload_append(claim, endless).await.map(|(n, _)| n) });
            tokio::time::sleep(std::time::Duration::from_micros(200 * (round % 10))).await;
            append.abort();
            let _ = append.await;
            // Waits for the claim: it comes free only once the append's thread is done with the file.
            let claim = loop {
                match store.upload_claim(&i) {
                    Ok(c) => break c,
                    Err(StorageError::Busy) => tokio::task::yield_now().await,
                    Err(e) => panic!("{e}"),
                }
            };
            let size = store.upload_size(&i).await.unwrap().unwrap();
            let content = std::fs::read(dir.path().join("uploads").join(&i)).unwrap();
            let d = Digest::of(Algorithm::Sha256, &content);
            assert_eq!(store.upload_commit(claim, &d).await.unwrap(), size);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            assert_eq!(store.size(&d).await.unwrap(), Some(size), "round {round}: the blob changed after its commit");
            assert_eq!(Digest::of(Algorithm::Sha256, &collect(store.read(&d, None).await.unwrap()).await), d);
        }
    }

    /// A blob stored once is never replaced: a commit, a put or an adoption of a digest that is stored already
    /// discards the newcomer and leaves the stored file (the same inode) in place.
    #[tokio::test]
    async fn storing_a_stored_digest_again_keeps_the_stored_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let d = Digest::of(Algorithm::Sha256, b"stored once");
        store.put(&d, stream(vec![Ok(Bytes::from("stored once"))])).await.unwrap();
        let path = store.blob_path(&d);
        // Held open so its inode number cannot be reused by a newcomer.
        let original = std::fs::File::open(&path).unwrap();
        let ino = original.metadata().unwrap().ino();

        store.put(&d, stream(vec![Ok(Bytes::from("stored once"))])).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "put replaced the stored file");

        store.upload_start("again").await.unwrap();
        let claim = store.upload_claim("again").unwrap();
        let (_, claim) = store.upload_append(claim, stream(vec![Ok(Bytes::from("stored once"))])).await.unwrap();
        assert_eq!(store.upload_commit(claim, &d).await.unwrap(), 11);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "a commit replaced the stored file");
        assert_eq!(store.upload_size("again").await.unwrap(), None, "the discarded upload is gone");

        let spool = dir.path().join("spool-file");
        std::fs::write(&spool, b"stored once").unwrap();
        assert_eq!(store.adopt_file(&d, &spool).await.unwrap(), 11);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "an adoption replaced the stored file");
        assert!(!spool.exists(), "the adopted file is consumed");

        assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 1, "only blobs/ names the stored file");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(collect(store.read(&d, None).await.unwrap()).await, b"stored once");
    }

    /// A blob of `len` pseudo-random bytes, stored; with its digest.
    async fn stored(store: &LocalStore, len: usize) -> (Digest, Vec<u8>) {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let content: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let d = Digest::of(Algorithm::Sha256, &content);
        store.put(&d, stream(vec![Ok(Bytes::from(content.clone()))])).await.unwrap();
        (d, content)
    }

    /// Mapped reads give the exact bytes of every window: at and across slice and read-ahead boundaries, at
    /// unaligned offsets (a map starts on a page), and either side of the size below which a window is read whole.
    #[tokio::test]
    async fn mapped_reads_give_the_bytes_of_every_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let len = 2 * READ_AHEAD + SERVE_SLICE / 2 + 3;
        let (d, content) = stored(&store, len).await;

        let parts: Vec<Bytes> = store.read(&d, None).await.unwrap().map(|p| p.unwrap()).collect().await;
        assert!(parts.iter().all(|p| !p.is_empty() && p.len() <= SERVE_SLICE), "slices of at most SERVE_SLICE");
        assert_eq!(parts.len(), len.div_ceil(SERVE_SLICE));
        assert_eq!(parts.concat(), content);

        let (s, w) = (SERVE_SLICE as u64, SMALL_BLOB as u64);
        let windows = [
            (0, 1),
            (0, w),
            (0, w + 1),
            (1, w + 2),
            (s - 1, s + 1),
            (s, 2 * s),
            (4097, 4097 + w + 1),
            (READ_AHEAD as u64 - 1, READ_AHEAD as u64 + s + 1),
            (len as u64 - w - 1, len as u64),
            (len as u64 - 1, len as u64),
            (0, len as u64),
        ];
        for (start, end) in windows {
            let got = collect(store.read(&d, Some(ByteRange { start, end })).await.unwrap()).await;
            assert_eq!(got, &content[start as usize..end as usize], "bytes {start}..{end}");
        }
    }

    /// Downloads of one blob that overlap share its map; one that starts after the file under the blob's name was
    /// replaced (removed and stored again, here by a rename as another process could) reads the new file, not the
    /// map an older download still holds.
    #[tokio::test]
    async fn overlapping_downloads_share_a_map_only_of_the_file_the_name_still_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let (d, content) = stored(&store, 3 * SERVE_SLICE).await;
        let mut first = store.read(&d, None).await.unwrap();
        let head = first.next().await.unwrap().unwrap();
        let second = collect(store.read(&d, None).await.unwrap()).await;
        assert_eq!(second, content);
        assert_eq!(store.maps.get(&d, &store.blob_path(&d)).map(|m| m.map.as_ptr()), Some(head.as_ptr()), "one map, shared");

        let other: Vec<u8> = content.iter().map(|b| b ^ 0xff).collect();
        let replacement = dir.path().join("replacement");
        std::fs::write(&replacement, &other).unwrap();
        std::fs::rename(&replacement, store.blob_path(&d)).unwrap();
        assert_eq!(collect(store.read(&d, None).await.unwrap()).await, other, "the file the name names now");
        let rest = collect(first).await;
        assert_eq!([head.to_vec(), rest].concat(), content, "the older download keeps its own file's bytes");
    }

    /// Between two slices the stream yields once, waking itself (so the task goes to the back of the run queue);
    /// the first slice comes at once.
    #[tokio::test]
    async fn mapped_slices_yield_between_slices() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl futures_util::task::ArcWake for Count {
            fn wake_by_ref(me: &Arc<Self>) {
                me.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let (d, content) = stored(&store, 2 * SERVE_SLICE + 1).await;
        let mut body = store.read(&d, None).await.unwrap();
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = futures_util::task::waker(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let mut got = Vec::new();
        let mut polls = Vec::new();
        loop {
            match body.as_mut().poll_next(&mut cx) {
                Poll::Ready(Some(part)) => {
                    got.extend_from_slice(&part.unwrap());
                    polls.push('S');
                }
                Poll::Ready(None) => break,
                Poll::Pending => polls.push('P'),
            }
        }
        assert_eq!(polls.iter().collect::<String>(), "SPSPS");
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 2, "each yield wakes the task");
        assert_eq!(got, content);
    }

    /// A window the file does not hold is an error, never a map read past the file's end (which would fault).
    #[tokio::test]
    async fn a_window_past_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let (d, _) = stored(&store, SMALL_BLOB + 10).await;
        let size = (SMALL_BLOB + 10) as u64;
        for (start, end) in [(0, size + 1), (size - 1, size + SERVE_SLICE as u64), (5, 4)] {
            assert!(matches!(store.read(&d, Some(ByteRange { start, end })).await, Err(StorageError::Io(_))), "{start}..{end}");
        }
        assert!(collect(store.read(&d, Some(ByteRange { start: size, end: size })).await.unwrap()).await.is_empty());
        let (empty, _) = stored(&store, 0).await;
        assert!(collect(store.read(&empty, None).await.unwrap()).await.is_empty());
    }

    /// A blob removed (evicted) while it is being served is served whole: the map keeps the unlinked file's pages.
    #[tokio::test]
    async fn a_blob_removed_while_served_is_served_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let (d, content) = stored(&store, 3 * SERVE_SLICE + 1).await;
        let mut body = store.read(&d, None).await.unwrap();
        let mut got = body.next().await.unwrap().unwrap().to_vec();
        store.delete(&d).await.unwrap();
        assert_eq!(store.size(&d).await.unwrap(), None);
        while let Some(part) = body.next().await {
            got.extend_from_slice(&part.unwrap());
        }
        assert_eq!(got, content);
        assert!(matches!(store.read(&d, None).await, Err(StorageError::NotFound)));
    }

    /// A put whose future is dropped mid-body (the client went away) leaves no staging file behind.
    #[tokio::test]
    async fn a_cancelled_put_leaves_no_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let d = Digest::of(Algorithm::Sha256, b"never arrives");
        let first: ByteStream = Box::pin(futures_util::stream::once(async { Ok(Bytes::from("never ")) }));
        let body: ByteStream = Box::pin(first.chain(futures_util::stream::pending()));
        let put = store.put(&d, body);
        // The body never ends: the put is still running when the timeout drops it.
        assert!(tokio::time::timeout(std::time::Duration::from_millis(100), put).await.is_err());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.size(&d).await.unwrap(), None);
    }
}

//! Who is using a store. A running `serve` holds a shared lock on `content/.lock` for as long as it runs;
//! `fsck --repair` asks for an exclusive one, which it gets only when no server runs on the store. Holding it
//! is what allows removing unreferenced blob bytes (offline, nothing can be about to link them), and it keeps a
//! server from starting on the store until the repair is done. The lock is the kernel's (`flock`), so a process
//! that dies releases it.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// A lock on a store, held until dropped.
#[derive(Debug)]
pub struct StoreLock {
    /// The open lock file; the lock lives as long as this handle.
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{0} is locked by `breakwater fsck --repair`; start the server when it has finished")]
    Busy(PathBuf),
    #[error("locking {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn open(root: &Path) -> Result<(File, PathBuf), LockError> {
    let path = root.join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LockError::Io(path.clone(), e))?;
    Ok((file, path))
}

impl StoreLock {
    /// The lock of a server: shared with other servers on the same store, refused while a repair runs.
    pub fn shared(root: &Path) -> Result<StoreLock, LockError> {
        let (file, path) = open(root)?;
        match file.try_lock_shared() {
            Ok(()) => Ok(StoreLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(LockError::Busy(path)),
            Err(TryLockError::Error(e)) => Err(LockError::Io(path, e)),
        }
    }

    /// `shared`, waiting up to two seconds for an exclusive holder to let go: another process starting on the
    /// store holds the lock exclusively for a moment (see `server::open_store`); a repair holds it for longer.
    pub fn shared_soon(root: &Path) -> Result<StoreLock, LockError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match Self::shared(root) {
                Err(LockError::Busy(_)) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(20)),
                other => return other,
            }
        }
    }

    /// The lock of an offline repair; `None` when a server runs on the store.
    pub fn exclusive(root: &Path) -> Result<Option<StoreLock>, LockError> {
        let (file, path) = open(root)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(StoreLock { _file: file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(LockError::Io(path, e)),
        }
    }
}

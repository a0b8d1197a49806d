//! Maps of stored blobs, shared by the downloads of one digest that overlap in time.
//!
//! A herd of clients pulling one layer would otherwise map the file once each: each map costs its own page tables,
//! a page fault per 64 KiB sent, a `munmap` (and its TLB shootdown) at the end, and a trip to the blocking pool to
//! open it. Here the first download maps the file and every download that starts while a slice of that map is
//! alive reuses it, after one `stat` that checks the path still names the mapped file: a blob removed and stored
//! again (by this process or another, such as `breakwater fsck`) is a new file and gets a new map.
//!
//! The table holds weak references only: a map lives as long as a download (or a slice of it in hyper's queue)
//! needs it, never because it is in the table.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use crate::oci::Digest;

/// How many entries the table may hold before the dead ones are swept out; after a sweep the next one waits
/// until the table has doubled, so a sweep costs O(1) per insert however many blobs are being served.
const FIRST_SWEEP: usize = 256;

/// A stored blob's file, mapped whole.
pub(super) struct StoredMap {
    pub(super) map: memmap2::Mmap,
    /// The mapped file's device and inode: the map is reused only while the blob's path names this file.
    file: (u64, u64),
}

impl StoredMap {
    pub(super) fn new(map: memmap2::Mmap, metadata: &std::fs::Metadata) -> StoredMap {
        StoredMap { map, file: (metadata.dev(), metadata.ino()) }
    }
}

#[derive(Default)]
pub(super) struct OpenMaps {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    maps: HashMap<Digest, Weak<StoredMap>>,
    /// The size at which the next insert sweeps out dead entries.
    sweep_at: usize,
}

impl OpenMaps {
    /// The map of `digest` a download still holds, if `path` still names the file it maps. The check is one
    /// `stat`, made in place: it is what replaces the trip to the blocking pool that opening would cost.
    pub(super) fn get(&self, digest: &Digest, path: &Path) -> Option<Arc<StoredMap>> {
        let live = self.table.lock().ok()?.maps.get(digest)?.upgrade()?;
        let now = std::fs::metadata(path).ok()?;
        ((now.dev(), now.ino()) == live.file).then_some(live)
    }

    /// Makes `map` the one later downloads of `digest` reuse while it lives.
    pub(super) fn insert(&self, digest: &Digest, map: StoredMap) -> Arc<StoredMap> {
        let map = Arc::new(map);
        // A poisoned table only loses the sharing, never a download.
        if let Ok(mut t) = self.table.lock() {
            if t.maps.len() >= t.sweep_at.max(FIRST_SWEEP) {
                t.maps.retain(|_, w| w.strong_count() > 0);
                t.sweep_at = 2 * t.maps.len();
            }
            t.maps.insert(digest.clone(), Arc::downgrade(&map));
        }
        map
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().map(|t| t.maps.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn mapped(path: &Path) -> StoredMap {
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: the test's files are not written while mapped.
        let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
        StoredMap::new(map, &file.metadata().unwrap())
    }

    #[test]
    fn a_map_is_shared_while_it_lives_and_only_for_the_file_it_maps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"first").unwrap();
        let digest = Digest::of(Algorithm::Sha256, b"first");
        let maps = OpenMaps::default();
        let held = maps.insert(&digest, mapped(&path));
        let again = maps.get(&digest, &path).expect("shared while held");
        assert!(Arc::ptr_eq(&held, &again));
        // Another file under the same name (removed and stored again) is not the mapped one.
        std::fs::write(dir.path().join("new"), b"other").unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        assert!(maps.get(&digest, &path).is_none(), "the path names another file now");
        let fresh = maps.insert(&digest, mapped(&path));
        assert_eq!(&fresh.map[..], b"other");
        drop((held, again, fresh));
        assert!(maps.get(&digest, &path).is_none(), "nothing holds a map: none is kept");
    }

    #[test]
    fn dead_entries_are_swept_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"x").unwrap();
        let maps = OpenMaps::default();
        for i in 0..10 * FIRST_SWEEP {
            let digest = Digest::of(Algorithm::Sha256, i.to_string().as_bytes());
            drop(maps.insert(&digest, mapped(&path)));
        }
        assert!(maps.len() <= FIRST_SWEEP, "{} entries for no live map", maps.len());
    }
}

//! `Carry`: the digest of an upload session computed while its bytes arrive, carried from one request of the
//! session to the next, so that a commit does not read the upload back to hash it.
//!
//! It is only ever an optimisation, never a source of truth: an entry says "the first `hashed` bytes of this
//! session hash to this state", and a commit uses it only when `hashed` is the size of the upload it commits.
//! Whenever that cannot be known (the server restarted, the entry was evicted, a write failed midway so that what
//! reached the file is not known, another instance appended to a shared session), there is no entry or its offset
//! does not match, and the commit re-hashes the stored bytes. So no state of this map can make a wrong digest
//! accepted: at worst it costs the read it was meant to save.
//!
//! Backend-independent: a backend feeds the hasher with exactly the bytes that it wrote into the session (after
//! each write succeeded), puts the state back at the end of the append, and takes it at the commit. Every use is
//! under the session's `UploadClaim`, so there is one user of an entry at a time.

use crate::bounded::BoundedMap;
use crate::oci::{Algorithm, Digest, Hasher};

/// How many sessions' running digests are kept at most; beyond, some are forgotten (and their commits re-hash).
/// An entry is a session id and a hasher's state, a few hundred bytes.
pub const CARRY_ENTRIES: u64 = 4096;

/// The algorithm hashed while bytes arrive. The digest a session will be committed under is only known at the
/// commit; sha256 is what clients use (a sha512 commit re-hashes the stored bytes).
pub const CARRIED: Algorithm = Algorithm::Sha256;

/// The running digest of the first `hashed` bytes of a session.
#[derive(Clone)]
pub struct Running {
    pub hashed: u64,
    pub hasher: Hasher,
}

impl Running {
    /// The state of a session that holds no bytes yet.
    pub fn empty() -> Running {
        Running::new(CARRIED)
    }

    /// The state of no bytes hashed under `algorithm` (for a backend's own whole-blob writes).
    pub fn new(algorithm: Algorithm) -> Running {
        Running { hashed: 0, hasher: algorithm.hasher() }
    }

    /// Adds bytes that were just written to the session, in order.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.hashed += bytes.len() as u64;
    }
}

pub struct Carry {
    map: BoundedMap<String, Running>,
}

impl Default for Carry {
    fn default() -> Carry {
        Carry::new(CARRY_ENTRIES)
    }
}

impl Carry {
    pub fn new(capacity: u64) -> Carry {
        Carry { map: BoundedMap::new("upload_digests", capacity, None) }
    }

    /// For an append to session `id`, which holds `size` bytes now: the running digest to continue, if one covers
    /// exactly those bytes; a fresh one if the session is empty; else `None` (this append does not hash, and the
    /// commit will re-hash). The entry leaves the map: until the append puts it back, no commit can use it.
    pub fn resume(&self, id: &str, size: u64) -> Option<Running> {
        match self.take(id, size) {
            Some(r) => Some(r),
            None if size == 0 => Some(Running::empty()),
            None => None,
        }
    }

    /// Keeps the running digest of session `id` after an append that left `size` bytes in it. One that does not
    /// cover exactly those bytes is dropped (it could only mislead a commit).
    pub fn keep(&self, id: &str, size: u64, running: Running) {
        if running.hashed == size {
            self.map.insert(id.to_string(), running);
        } else {
            self.map.remove(id);
        }
    }

    /// For the commit of session `id`, which holds `size` bytes, as `expected`: the digest of those bytes, if the
    /// map holds it under `expected`'s algorithm; `None` means the stored bytes must be hashed. The entry is gone
    /// either way.
    pub fn finish(&self, id: &str, size: u64, expected: &Digest) -> Option<Digest> {
        let running = self.take(id, size)?;
        (expected.algorithm() == CARRIED).then(|| running.hasher.finish())
    }

    /// Forgets session `id` (aborted, or committed).
    pub fn forget(&self, id: &str) {
        self.map.remove(id);
    }

    fn take(&self, id: &str, size: u64) -> Option<Running> {
        let running = self.map.get(id)?;
        self.map.remove(id);
        (running.hashed == size).then_some(running)
    }

    /// Sessions whose running digest is held now.
    pub fn len(&self) -> u64 {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(parts: &[&[u8]]) -> Running {
        let mut r = Running::empty();
        for p in parts {
            r.update(p);
        }
        r
    }

    #[test]
    fn a_running_digest_is_used_only_for_the_bytes_it_covers() {
        let carry = Carry::default();
        let d = Digest::of(CARRIED, b"abcdef");
        carry.keep("s", 6, after(&[b"abc", b"def"]));
        assert_eq!(carry.finish("s", 7, &d), None, "a session that grew since is not covered");
        assert_eq!(carry.finish("s", 6, &d), None, "and the entry is gone");

        carry.keep("s", 6, after(&[b"abcdef"]));
        assert_eq!(carry.finish("s", 6, &d), Some(d.clone()));

        carry.keep("s", 6, after(&[b"abcdef"]));
        assert_eq!(carry.finish("s", 6, &Digest::of(Algorithm::Sha512, b"abcdef")), None, "another algorithm re-hashes");

        carry.keep("s", 5, after(&[b"abcdef"]));
        assert!(carry.is_empty(), "a state that does not cover the session's size is not kept");
    }

    #[test]
    fn an_append_resumes_only_a_matching_state() {
        let carry = Carry::default();
        let r = carry.resume("new", 0).expect("an empty session starts hashing");
        assert_eq!(r.hashed, 0);
        assert!(carry.resume("restarted", 10).is_none(), "bytes hashed by nobody: this session re-hashes at commit");

        carry.keep("s", 3, after(&[b"abc"]));
        assert!(carry.resume("s", 4).is_none(), "another writer appended");
        assert!(carry.resume("s", 3).is_none(), "the mismatched entry was dropped");

        carry.keep("s", 3, after(&[b"abc"]));
        let mut r = carry.resume("s", 3).expect("matching state");
        r.update(b"def");
        carry.keep("s", 6, r);
        assert_eq!(carry.finish("s", 6, &Digest::of(CARRIED, b"abcdef")), Some(Digest::of(CARRIED, b"abcdef")));
    }

    #[test]
    fn holds_a_bounded_number_of_sessions() {
        let carry = Carry::new(64);
        for i in 0..1000 {
            carry.keep(&format!("s{i}"), 0, Running::empty());
        }
        let held = carry.len();
        assert!(held > 0 && held <= 64, "{held} held");
    }
}

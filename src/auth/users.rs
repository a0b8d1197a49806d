//! The users: an htpasswd file (bcrypt entries, as `htpasswd -B` writes them; re-read when it changes) and the
//! config's `[[auth.user]]` entries (bcrypt or argon2 PHC hashes), with their groups.
//!
//! Password checks are deliberately slow (that is what bcrypt and argon2 are for), so a success is remembered
//! for a few minutes under a hash of the name and password: basic auth checks every request, and a client
//! pulling a hundred layers must not cost a hundred bcrypt runs. The memory is forgotten when the file changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};

use crate::bounded::BoundedMap;
use crate::secret::Secret;

/// A user of the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    /// A bcrypt (`$2y$...`) or argon2 (`$argon2id$...`) hash.
    pub password_hash: Secret,
    pub groups: Vec<String>,
}

/// The resolved user settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsersConfig {
    pub htpasswd: Option<PathBuf>,
    pub users: Vec<UserEntry>,
    /// Group name to member names, for htpasswd users (whose file has no groups) and config users alike.
    pub groups: HashMap<String, Vec<String>>,
}

impl UsersConfig {
    pub fn is_empty(&self) -> bool {
        self.htpasswd.is_none() && self.users.is_empty()
    }
}

/// How long a verified password is remembered.
const REMEMBER: Duration = Duration::from_secs(300);
/// How often the htpasswd file's modification time is looked at, at most.
const STAT_EVERY: Duration = Duration::from_secs(1);
/// The bcrypt cost of the hash checked for unknown names when no user has a bcrypt hash (`htpasswd -B`'s).
const DEFAULT_DUMMY_COST: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} line {line}: {why}")]
    Entry { path: String, line: usize, why: String },
}

/// The users as last loaded.
struct Loaded {
    /// Name to (password hash, groups).
    users: HashMap<String, (Secret, Vec<String>)>,
    /// The htpasswd file's modification time and length when read.
    stamp: Option<(SystemTime, u64)>,
    /// A bcrypt hash of a random password, at the cost of the users' hashes: checked for unknown names, so
    /// that a wrong name costs the same time as a wrong password and names cannot be probed.
    dummy: Secret,
    checked: Instant,
}

pub struct Users {
    config: UsersConfig,
    loaded: RwLock<Arc<Loaded>>,
    /// sha256(name, password) of recent successes.
    verified: BoundedMap<[u8; 32], ()>,
}

impl Users {
    pub fn open(config: UsersConfig, memory_entries: u64) -> Result<Users, UsersError> {
        let loaded = load(&config)?;
        Ok(Users {
            config,
            loaded: RwLock::new(Arc::new(loaded)),
            verified: BoundedMap::new("verified_passwords", memory_entries, Some(REMEMBER)),
        })
    }

    /// The groups of `name` if `password` is theirs. Constant-time in the comparison, and as slow for an unknown
    /// name as for a wrong password.
    pub async fn verify(self: &Arc<Self>, name: &str, password: &str) -> Option<Vec<String>> {
        let loaded = self.current();
        let key = remembered_key(name, password);
        let entry = loaded.users.get(name).cloned();
        if entry.is_some() && self.verified.get(&key).is_some() {
            return entry.map(|(_, groups)| groups);
        }
        let hash = entry.as_ref().map_or_else(|| loaded.dummy.clone(), |(h, _)| h.clone());
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || check_hash(&hash, &password)).await.unwrap_or(false);
        match entry {
            Some((_, groups)) if ok => {
                self.verified.insert(key, ());
                Some(groups)
            }
            _ => None,
        }
    }

    /// The groups of user `name` now.
    pub fn groups(&self, name: &str) -> Option<Vec<String>> {
        self.current().users.get(name).map(|(_, groups)| groups.clone())
    }

    /// Whether `name` is a user now (a refresh token outlives neither its user nor a file edit removing them).
    pub fn exists(&self, name: &str) -> bool {
        self.current().users.contains_key(name)
    }

    /// The users, re-read first if the htpasswd file changed. A file that no longer parses keeps the users
    /// loaded before (logged): a half-written edit must not lock everyone out or let anyone in.
    fn current(&self) -> Arc<Loaded> {
        let loaded = Arc::clone(&self.loaded.read().unwrap_or_else(|e| e.into_inner()));
        let Some(path) = &self.config.htpasswd else { return loaded };
        if loaded.checked.elapsed() < STAT_EVERY {
            return loaded;
        }
        let stamp = file_stamp(path);
        let mut slot = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if stamp == slot.stamp {
            *slot = Arc::new(Loaded { stamp, checked: Instant::now(), ..slot.same() });
            return Arc::clone(&slot);
        }
        match load(&self.config) {
            Ok(fresh) => {
                tracing::info!(path = %path.display(), users = fresh.users.len(), "htpasswd file reloaded");
                self.verified.clear();
                *slot = Arc::new(fresh);
            }
            Err(e) => {
                tracing::warn!(error = %e, "htpasswd file changed but cannot be read; keeping the users loaded before");
                *slot = Arc::new(Loaded { stamp, checked: Instant::now(), ..slot.same() });
            }
        }
        Arc::clone(&slot)
    }
}

impl Loaded {
    fn same(&self) -> Loaded {
        Loaded { users: self.users.clone(), stamp: self.stamp, dummy: self.dummy.clone(), checked: self.checked }
    }
}

/// The dummy hash for `users`: the cost of their first bcrypt hash (`$2y$NN$...`).
fn dummy_hash(users: &HashMap<String, (Secret, Vec<String>)>) -> Secret {
    let cost = users
        .values()
        .find_map(|(h, _)| h.strip_prefix("$2").and_then(|r| r.get(2..4)).and_then(|c| c.parse::<u32>().ok()))
        .unwrap_or(DEFAULT_DUMMY_COST);
    let random: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    match bcrypt::hash(random, cost) {
        Ok(h) => Secret::from(h),
        Err(_) => Secret::from(bcrypt::hash(random, DEFAULT_DUMMY_COST).unwrap_or_default()),
    }
}

fn remembered_key(name: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(password.as_bytes());
    h.finalize().into()
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn load(config: &UsersConfig) -> Result<Loaded, UsersError> {
    let mut users = HashMap::new();
    let mut stamp = None;
    if let Some(path) = &config.htpasswd {
        stamp = file_stamp(path);
        let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read { path: path.display().to_string(), source })?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| UsersError::Entry { path: path.display().to_string(), line: i + 1, why: why.to_string() };
            let (name, hash) = line.split_once(':').ok_or_else(|| bad("expected NAME:HASH"))?;
            if !is_supported_hash(hash) {
                return Err(bad("only bcrypt entries are supported (write them with `htpasswd -B`)"));
            }
            users.insert(name.to_string(), (Secret::from(hash), Vec::new()));
        }
    }
    for u in &config.users {
        users.insert(u.name.clone(), (u.password_hash.clone(), u.groups.clone()));
    }
    for (group, members) in &config.groups {
        for m in members {
            if let Some((_, groups)) = users.get_mut(m) {
                if !groups.contains(group) {
                    groups.push(group.clone());
                }
            }
        }
    }
    let dummy = dummy_hash(&users);
    Ok(Loaded { users, stamp, dummy, checked: Instant::now() })
}

/// Whether `hash` is a kind this server checks: bcrypt or argon2.
pub fn is_supported_hash(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2y$", "$argon2id$", "$argon2i$", "$argon2d$"].iter().any(|p| hash.starts_with(p))
}

/// Checks `password` against `hash` (both libraries compare in constant time).
fn check_hash(hash: &str, password: &str) -> bool {
    if hash.starts_with("$argon2") {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        return PasswordHash::new(hash).is_ok_and(|h| argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok());
    }
    bcrypt::verify(password, hash).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dummy_hash_has_the_cost_of_the_users_hashes() {
        let mut users = HashMap::new();
        users.insert("a".to_string(), (Secret::from("$2y$07$abcdefghijklmnopqrstuuFm1g0wQ2l6jvP9v3m0zHh5oQ8yq2e1W"), vec![]));
        assert!(dummy_hash(&users).starts_with("$2b$07$"));
        assert!(dummy_hash(&HashMap::new()).starts_with("$2b$05$"));
    }

    #[tokio::test]
    async fn htpasswd_users_are_checked_and_reloaded_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let alice = bcrypt::hash_with_result("s3cret", 5).unwrap().format_for_version(bcrypt::Version::TwoY);
        std::fs::write(&file, format!("# users\nalice:{alice}\n")).unwrap();
        let mut groups = HashMap::new();
        groups.insert("dev".to_string(), vec!["alice".to_string()]);
        let users = Arc::new(Users::open(UsersConfig { htpasswd: Some(file.clone()), users: vec![], groups }, 100).unwrap());
        assert_eq!(users.verify("alice", "s3cret").await, Some(vec!["dev".to_string()]));
        assert_eq!(users.verify("alice", "wrong").await, None);
        assert_eq!(users.verify("nobody", "s3cret").await, None);

        let bob = bcrypt::hash_with_result("pw", 5).unwrap().format_for_version(bcrypt::Version::TwoY);
        std::fs::write(&file, format!("bob:{bob}\n")).unwrap();
        std::thread::sleep(STAT_EVERY + Duration::from_millis(100));
        // Removed users are gone even though their password was remembered.
        assert_eq!(users.verify("alice", "s3cret").await, None);
        assert!(users.verify("bob", "pw").await.is_some());
        // A broken file keeps the users loaded before.
        std::fs::write(&file, "bob\n").unwrap();
        std::thread::sleep(STAT_EVERY + Duration::from_millis(100));
        assert!(users.verify("bob", "pw").await.is_some());
    }

    #[tokio::test]
    async fn config_users_may_use_argon2() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let hash = argon2::Argon2::default().hash_password(b"pw", &salt).unwrap().to_string();
        let entry = UserEntry { name: "carol".into(), password_hash: hash.as_str().into(), groups: vec!["ops".into()] };
        let users = Arc::new(Users::open(UsersConfig { users: vec![entry], ..Default::default() }, 100).unwrap());
        assert_eq!(users.verify("carol", "pw").await, Some(vec!["ops".to_string()]));
        assert_eq!(users.verify("carol", "nope").await, None);
    }

    #[test]
    fn htpasswd_entries_other_than_bcrypt_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        std::fs::write(&file, "alice:$apr1$abc$def\n").unwrap();
        let err = Users::open(UsersConfig { htpasswd: Some(file), ..Default::default() }, 10).err().unwrap();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}

//! Robot tokens for CI (`breakwater token create|list|revoke`): a named secret with its own narrow grants, kept
//! in the metadata store (so every instance sharing it knows the robot) as a SHA-256 of the secret. A robot
//! logs in like a user, as `robot$NAME` with the secret as its password.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::policy::RobotGrant;
use crate::meta::{Meta, MetaError, RobotRecord};

/// The user-name prefix of robots.
pub const PREFIX: &str = "robot$";
/// The prefix of robot secrets, so that a leaked one is recognisable (secret scanners key on such prefixes).
const SECRET_PREFIX: &str = "bwr_";

#[derive(Debug, thiserror::Error)]
pub enum RobotError {
    #[error("robot name {0:?} must be 1 to 64 of a-z, 0-9, '.', '_' and '-'")]
    BadName(String),
    #[error("a robot needs at least one --scope")]
    NoScope,
    #[error("{0}")]
    BadScope(String),
    #[error("a robot named {0} exists already (revoked robots keep their name)")]
    Exists(String),
    #[error("could not make a secret")]
    Random,
    #[error(transparent)]
    Meta(#[from] MetaError),
}

fn check_name(name: &str) -> Result<(), RobotError> {
    let ok = (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RobotError::BadName(name.to_string()))
    }
}

fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> i64 {
    i64::try_from(super::token::now_secs()).unwrap_or(i64::MAX)
}

/// Creates robot `name` with `scopes` (`GLOB:ACTIONS`), valid for `expires` if given; returns its secret, which
/// exists nowhere else from then on.
pub async fn create(meta: &Arc<dyn Meta>, name: &str, scopes: &[String], expires: Option<Duration>) -> Result<String, RobotError> {
    check_name(name)?;
    if scopes.is_empty() {
        return Err(RobotError::NoScope);
    }
    let grants = scopes.iter().map(|s| RobotGrant::parse(s)).collect::<Result<Vec<_>, _>>().map_err(RobotError::BadScope)?;
    let mut random = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).map_err(|_| RobotError::Random)?;
    let secret = format!("{SECRET_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random));
    let created_at = now();
    let record = RobotRecord {
        name: name.to_string(),
        secret_sha256: hash(&secret),
        scopes: grants.iter().map(RobotGrant::render).collect::<Vec<_>>().join(" "),
        created_at,
        expires_at: expires.map(|d| created_at.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
        revoked_at: None,
    };
    if !meta.create_robot(&record).await? {
        return Err(RobotError::Exists(name.to_string()));
    }
    Ok(secret)
}

/// Whether `record` may log in now.
pub fn usable(record: &RobotRecord) -> bool {
    record.revoked_at.is_none() && record.expires_at.is_none_or(|e| e > now())
}

/// The grants of robot `name` if `secret` is its secret and it is neither revoked nor expired.
pub async fn verify(meta: &Arc<dyn Meta>, name: &str, secret: &str) -> Result<Option<Vec<RobotGrant>>, MetaError> {
    let Some(record) = meta.robot(name).await? else { return Ok(None) };
    let matches: bool = hash(secret).as_bytes().ct_eq(record.secret_sha256.as_bytes()).into();
    if !matches || !usable(&record) {
        return Ok(None);
    }
    Ok(Some(grants(&record)))
}

/// A record's grants (a scope that no longer parses, say after an edit of the database, grants nothing).
pub fn grants(record: &RobotRecord) -> Vec<RobotGrant> {
    record.scopes.split(' ').filter_map(|s| RobotGrant::parse(s).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_robot_logs_in_with_its_secret_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::meta::open(&crate::config::sqlite_url(dir.path())).await.unwrap();
        let secret = create(&meta, "ci", &["ci/**:pull,push".into()], None).await.unwrap();
        assert!(secret.starts_with(SECRET_PREFIX) && secret.len() > 40);
        let stored = meta.robot("ci").await.unwrap().unwrap();
        assert!(!stored.secret_sha256.contains(&secret) && stored.secret_sha256.len() == 64, "only a hash is kept");
        let grants = verify(&meta, "ci", &secret).await.unwrap().expect("the secret logs in");
        assert_eq!(grants[0].render(), "ci/**:pull,push");
        assert!(verify(&meta, "ci", "bwr_wrong").await.unwrap().is_none());
        assert!(verify(&meta, "nobody", &secret).await.unwrap().is_none());
        assert!(matches!(create(&meta, "ci", &["x:pull".into()], None).await, Err(RobotError::Exists(_))));
        assert!(meta.revoke_robot("ci", now()).await.unwrap());
        assert!(verify(&meta, "ci", &secret).await.unwrap().is_none(), "a revoked robot is refused");
        assert!(!meta.revoke_robot("ci", now()).await.unwrap());
    }

    #[tokio::test]
    async fn expired_robots_and_bad_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::meta::open(&crate::config::sqlite_url(dir.path())).await.unwrap();
        let secret = create(&meta, "old", &["a:pull".into()], Some(Duration::ZERO)).await.unwrap();
        assert!(verify(&meta, "old", &secret).await.unwrap().is_none());
        assert!(matches!(create(&meta, "Bad Name", &["a:pull".into()], None).await, Err(RobotError::BadName(_))));
        assert!(matches!(create(&meta, "n", &[], None).await, Err(RobotError::NoScope)));
        assert!(matches!(create(&meta, "n", &["a:fly".into()], None).await, Err(RobotError::BadScope(_))));
        let page = meta.robots(None, 10).await.unwrap();
        assert_eq!(page.items.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), vec!["old"]);
    }
}

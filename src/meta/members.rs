//! The SQL of the cluster (`crate::cluster` has the protocol): one row per member, rewritten at each heartbeat;
//! the leases members list (who fetches what); the upstream checks they share (`cache_checks`).

use sqlx::Row;

use super::sql::SqlMeta;
use super::{Check, Lease, Member, MetaError};
use crate::oci::RepoName;

impl SqlMeta {
    pub(super) async fn beat(&self, m: &Member, now_ms: i64) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO members (id, url, started_at, heartbeat_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET url = excluded.url, heartbeat_at = excluded.heartbeat_at",
        )
        .bind(&m.id)
        .bind(&m.url)
        .bind(m.started_at)
        .bind(now_ms)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub(super) async fn all_members(&self) -> Result<Vec<Member>, MetaError> {
        let rows = sqlx::query("SELECT id, url, started_at, heartbeat_at FROM members ORDER BY id").fetch_all(self.pool()).await?;
        rows.iter()
            .map(|r| Ok(Member { id: r.try_get(0)?, url: r.try_get(1)?, started_at: r.try_get(2)?, heartbeat_at: r.try_get(3)? }))
            .collect()
    }

    pub(super) async fn drop_members(&self, id: Option<&str>, before_ms: i64) -> Result<u64, MetaError> {
        let done = match id {
            Some(id) => sqlx::query("DELETE FROM members WHERE id = $1").bind(id).execute(self.pool()).await?,
            None => sqlx::query("DELETE FROM members WHERE heartbeat_at < $1").bind(before_ms).execute(self.pool()).await?,
        };
        Ok(done.rows_affected())
    }

    pub(super) async fn live_leases(&self, prefix: &str) -> Result<Vec<Lease>, MetaError> {
        // `substr` rather than LIKE: a name's `_` or `%` would be patterns there.
        let rows = sqlx::query(
            "SELECT name, holder, expires_at FROM leases WHERE substr(name, 1, length($1)) = $1 AND expires_at >= $2 ORDER BY name",
        )
        .bind(prefix)
        .bind(super::sql::now_millis())
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|r| Ok(Lease { name: r.try_get(0)?, holder: r.try_get(1)?, expires_at: r.try_get(2)? })).collect()
    }

    pub(super) async fn check_of(&self, repo: &RepoName, reference: &str) -> Result<Option<Check>, MetaError> {
        let row = sqlx::query("SELECT checked_at, found FROM cache_checks WHERE repo = $1 AND reference = $2")
            .bind(repo.as_str())
            .bind(reference)
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| Ok(Check { checked_at: r.try_get(0)?, found: r.try_get::<i64, _>(1)? != 0 })).transpose()
    }

    pub(super) async fn put_check(&self, repo: &RepoName, reference: &str, check: Check) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO cache_checks (repo, reference, checked_at, found) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (repo, reference) DO UPDATE SET checked_at = excluded.checked_at, found = excluded.found",
        )
        .bind(repo.as_str())
        .bind(reference)
        .bind(check.checked_at)
        .bind(i64::from(check.found))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub(super) async fn drop_checks(&self, before_ms: i64) -> Result<u64, MetaError> {
        let done = sqlx::query("DELETE FROM cache_checks WHERE checked_at < $1").bind(before_ms).execute(self.pool()).await?;
        Ok(done.rows_affected())
    }
}

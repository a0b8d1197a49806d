//! The SQL of cluster membership (`crate::cluster` has the protocol): one row per member, rewritten at each
//! heartbeat.

use sqlx::Row;

use super::sql::SqlMeta;
use super::{Member, MetaError};

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
}

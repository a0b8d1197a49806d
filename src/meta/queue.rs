//! The SQL of distributed replication's work queue (`crate::replicate::distributed` has the protocol): a job's
//! units in `replication_units`, claimed with the lease of the same name in `leases` (the one lease mechanism the
//! cluster's flights use too).
//!
//! Claims never wait on one another: PostgreSQL skips the candidate rows other transactions hold
//! (`FOR UPDATE SKIP LOCKED`); SQLite has one writer at a time anyway, so its claim is a `BEGIN IMMEDIATE`
//! transaction that holds the write lock from its first read.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::collect::{Tx, LEASE_TAKE};
use super::schema::Dialect;
use super::sql::{now, now_millis, SqlMeta};
use super::{MetaError, RangeRecord, Unit, UnitCounts, UnitEnd};

const UNIT_COLUMNS: &str =
    "job, unit, range_start, range_end, position, pending, state, attempts, epoch, claimed_by, copied, skipped, bytes, error";

/// The fence every write of a claimed unit carries: the unit is still claimed under the writer's epoch.
const FENCE: &str = "job = $1 AND unit = $2 AND epoch = $3 AND state = 'claimed'";

fn unit_of(r: &AnyRow) -> Result<Unit, MetaError> {
    let pending: String = r.try_get(5)?;
    Ok(Unit {
        job: r.try_get(0)?,
        unit: r.try_get::<i64, _>(1)? as u64,
        start: r.try_get(2)?,
        end: r.try_get(3)?,
        position: r.try_get(4)?,
        pending: serde_json::from_str(&pending).map_err(|e| MetaError::Corrupt(format!("unit pending list: {e}")))?,
        state: r.try_get(6)?,
        attempts: r.try_get::<i64, _>(7)? as u64,
        epoch: r.try_get::<i64, _>(8)? as u64,
        claimed_by: r.try_get(9)?,
        copied: r.try_get::<i64, _>(10)? as u64,
        skipped: r.try_get::<i64, _>(11)? as u64,
        bytes: r.try_get::<i64, _>(12)? as u64,
        error: r.try_get(13)?,
    })
}

impl SqlMeta {
    /// A transaction that may write: on SQLite it takes the write lock at once (a read first, then a write,
    /// would otherwise fail with SQLITE_BUSY when another writer came in between).
    async fn writing(&self) -> Result<Tx<'static>, MetaError> {
        Ok(match self.dialect() {
            Dialect::Sqlite => self.pool().begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool().begin().await?,
        })
    }

    pub(super) async fn enqueue(&self, job: &str, ranges: &[RangeRecord]) -> Result<bool, MetaError> {
        let mut tx = self.writing().await?;
        // The job's row, created if need be and locked (the update changes nothing): a second start waits here
        // until the first has committed its units, then finds them.
        sqlx::query(
            "INSERT INTO replication_jobs (name, pending, status, pages, repos_seen, repos_matched, copied, skipped, failed, \
             bytes, updated_at) VALUES ($1, '[]', 'running', 0, 0, 0, 0, 0, 0, 0, $2) \
             ON CONFLICT (name) DO UPDATE SET status = replication_jobs.status",
        )
        .bind(job)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        let any = sqlx::query("SELECT 1 FROM replication_units WHERE job = $1 LIMIT 1").bind(job).fetch_optional(&mut *tx).await?;
        if any.is_some() {
            tx.rollback().await?;
            return Ok(false);
        }
        for (n, r) in ranges.iter().enumerate() {
            sqlx::query(
                "INSERT INTO replication_units (job, unit, range_start, range_end, position, pending, state, attempts, epoch, \
                 not_before, copied, skipped, bytes) VALUES ($1, $2, $3, $4, $3, '[]', 'pending', 0, 0, 0, 0, 0, 0)",
            )
            .bind(job)
            .bind(n as i64)
            .bind(r.position.clone())
            .bind(r.end.clone())
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE replication_jobs SET status = 'running', updated_at = $2 WHERE name = $1").bind(job).bind(now()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn claim_next(&self, job: &str, holder: &str, prefix: &str, ttl_ms: i64) -> Result<Option<Unit>, MetaError> {
        let now = now_millis();
        let lock = match self.dialect() {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        let mut tx = self.writing().await?;
        // A pending unit past its backoff, or a claimed one whose lease lapsed (its worker died).
        let row = sqlx::query(&format!(
            "SELECT {UNIT_COLUMNS} FROM replication_units u WHERE job = $1 \
             AND ((state = 'pending' AND not_before <= $2) OR state = 'claimed') \
             AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.name = $3 || u.job || ':' || u.unit AND l.expires_at >= $2) \
             ORDER BY unit LIMIT 1{lock}"
        ))
        .bind(job)
        .bind(now)
        .bind(prefix)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let mut unit = unit_of(&row)?;
        let lease = format!("{prefix}{job}:{}", unit.unit);
        let took = sqlx::query(LEASE_TAKE)
            .bind(&lease)
            .bind(holder)
            .bind(now.saturating_add(ttl_ms))
            .bind(now)
            .bind(holder)
            .execute(&mut *tx)
            .await?;
        if took.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
        unit.epoch += 1;
        sqlx::query("UPDATE replication_units SET state = 'claimed', epoch = $3, claimed_by = $4 WHERE job = $1 AND unit = $2")
            .bind(job)
            .bind(unit.unit as i64)
            .bind(unit.epoch as i64)
            .bind(holder)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        unit.state = "claimed".into();
        unit.claimed_by = Some(holder.to_string());
        Ok(Some(unit))
    }

    pub(super) async fn save_position(
        &self,
        job: &str,
        unit: u64,
        epoch: u64,
        position: Option<&str>,
        pending: &[String],
        counts: UnitCounts,
    ) -> Result<bool, MetaError> {
        let done = sqlx::query(&format!(
            "UPDATE replication_units SET position = $4, pending = $5, copied = $6, skipped = $7, bytes = $8 WHERE {FENCE}"
        ))
        .bind(job)
        .bind(unit as i64)
        .bind(epoch as i64)
        .bind(position.map(str::to_string))
        .bind(serde_json::to_string(pending).map_err(|e| MetaError::Corrupt(e.to_string()))?)
        .bind(counts.copied as i64)
        .bind(counts.skipped as i64)
        .bind(counts.bytes as i64)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn settle(&self, job: &str, unit: u64, epoch: u64, end: UnitEnd<'_>) -> Result<bool, MetaError> {
        let set = match end {
            // A done unit keeps the name of the worker that finished it (who did what, after the fact).
            UnitEnd::Done => "state = 'done'",
            UnitEnd::Released => "state = 'pending', claimed_by = NULL",
            UnitEnd::Failed { .. } => {
                "attempts = attempts + 1, claimed_by = NULL, error = $4, not_before = $5, \
                 state = CASE WHEN attempts + 1 >= $6 THEN 'failed' ELSE 'pending' END"
            }
        };
        let sql = format!("UPDATE replication_units SET {set} WHERE {FENCE}");
        let mut q = sqlx::query(&sql).bind(job).bind(unit as i64).bind(epoch as i64);
        if let UnitEnd::Failed { reason, not_before, max_attempts } = end {
            q = q.bind(reason.to_string()).bind(not_before).bind(max_attempts as i64);
        }
        let done = q.execute(self.pool()).await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn job_units(&self, job: &str) -> Result<Vec<Unit>, MetaError> {
        let rows = sqlx::query(&format!("SELECT {UNIT_COLUMNS} FROM replication_units WHERE job = $1 ORDER BY unit"))
            .bind(job)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(unit_of).collect()
    }
}

//! `Meta` over SQL, for SQLite and PostgreSQL alike.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::schema::Dialect;
use super::{Cutoffs, JobFailure, JobRecord, Lease, LinkRow, ManifestRecord, ManifestRow, Meta, MetaError, Page, RobotRecord, TagAge, TagRow, Untagged, UploadRow};
use crate::flight::Group;
use crate::oci::{Digest, RepoName, Tag};

pub struct SqlMeta {
    pool: AnyPool,
    /// Concurrent `blob_linked` lookups of one (repository, digest) share one query. A herd of pulls of one blob
    /// asks the same question hundreds of times at once; each query holds a pool connection for a few rounds of
    /// the runtime's run queue (the answer, the connection's return, the next waiter's wake-up), which behind
    /// hundreds of busy downloads made every herd's first bytes queue on the pool for seconds.
    link_lookups: Group<LinkKey, Result<bool, Arc<str>>>,
    /// Part of every lookup's key, moved on before and after each change of `blob_links` made here: a lookup
    /// that starts after a change has begun never joins one that started before, so the sharing never answers
    /// from before a change the caller could have seen complete (on this instance).
    link_generation: Arc<AtomicU64>,
    /// Where the two dialects' SQL must differ (row locks: `crate::meta::queue`).
    dialect: Dialect,
}

/// A `blob_linked` lookup: the generation of `blob_links`, the repository and the digest.
type LinkKey = (u64, String, String);

/// Moves the link generation on when created and again when dropped (the change done, failed or cancelled).
pub(super) struct LinkChange(Arc<AtomicU64>);

impl LinkChange {
    fn begin(generation: &Arc<AtomicU64>) -> LinkChange {
        generation.fetch_add(1, Ordering::SeqCst);
        LinkChange(Arc::clone(generation))
    }
}

impl Drop for LinkChange {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

pub(super) fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Cache access times are kept in milliseconds: pulls a second apart must still order.
pub(super) use crate::clock::now_ms as now_millis;

pub(super) fn digest_of(s: String) -> Result<Digest, MetaError> {
    Digest::from_str(&s).map_err(|_| MetaError::Corrupt(s))
}

pub(super) fn record(row: &AnyRow) -> Result<ManifestRecord, MetaError> {
    Ok(ManifestRecord {
        digest: digest_of(row.try_get("digest")?)?,
        media_type: row.try_get("media_type")?,
        size: row.try_get::<i64, _>("size")? as u64,
        subject: row.try_get::<Option<String>, _>("subject")?.map(digest_of).transpose()?,
        artifact_type: row.try_get("artifact_type")?,
        annotations: row.try_get("annotations")?,
    })
}

const JOB_COLUMNS: &str =
    "name, mark, status, pages, repos_seen, repos_matched, copied, skipped, failed, bytes, updated_at, position, pending, retries, walk";

fn job_record(r: &AnyRow) -> Result<JobRecord, MetaError> {
    let n = |i: usize| r.try_get::<i64, _>(i).map(|v| v as u64);
    Ok(JobRecord {
        name: r.try_get(0)?,
        mark: r.try_get(1)?,
        status: r.try_get(2)?,
        pages: n(3)?,
        repos_seen: n(4)?,
        repos_matched: n(5)?,
        copied: n(6)?,
        skipped: n(7)?,
        failed: n(8)?,
        bytes: n(9)?,
        updated_at: r.try_get(10)?,
        position: r.try_get(11)?,
        pending: serde_json::from_str(&r.try_get::<String, _>(12)?).map_err(|e| MetaError::Corrupt(format!("pending: {e}")))?,
        retries: n(13)?,
        walk: r
            .try_get::<Option<String>, _>(14)?
            .map(|w| serde_json::from_str(&w).map_err(|e| MetaError::Corrupt(format!("walk: {e}"))))
            .transpose()?,
    })
}

const ROBOT_COLUMNS: &str = "name, secret_sha256, scopes, created_at, expires_at, revoked_at";

fn robot_record(r: &AnyRow) -> Result<RobotRecord, MetaError> {
    Ok(RobotRecord {
        name: r.try_get(0)?,
        secret_sha256: r.try_get(1)?,
        scopes: r.try_get(2)?,
        created_at: r.try_get(3)?,
        expires_at: r.try_get(4)?,
        revoked_at: r.try_get(5)?,
    })
}

/// A page of at most `limit` items from a query that was asked for `limit + 1` rows (the extra row only tells
/// that more follow).
fn page<T>(rows: &[AnyRow], limit: u64, item: impl Fn(&AnyRow) -> Result<T, MetaError>) -> Result<Page<T>, MetaError> {
    let mut items = rows.iter().map(item).collect::<Result<Vec<_>, _>>()?;
    let more = items.len() as u64 > limit;
    items.truncate(limit as usize);
    Ok(Page { items, more })
}

/// The first column as a string (names, tags).
fn name(row: &AnyRow) -> Result<String, MetaError> {
    Ok(row.try_get::<String, _>(0)?)
}

/// `LIMIT` for a page of `limit` items: one more row, to learn whether more follow.
fn limit_plus_one(limit: u64) -> i64 {
    limit.saturating_add(1).min(i64::MAX as u64) as i64
}

impl SqlMeta {
    pub async fn connect(url: &str) -> Result<SqlMeta, MetaError> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Dialect::Postgres
        } else {
            Dialect::Sqlite
        };
        let mut options = AnyPoolOptions::new().max_connections(16);
        if dialect == Dialect::Sqlite {
            // SQLite serialises writers anyway; a few connections serve concurrent readers, and WAL lets them read
            // while one writes. `synchronous=FULL` because a tag that was acknowledged must survive a power cut.
            options = options.max_connections(4).after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode=WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous=FULL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout=10000").execute(&mut *conn).await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(url).await?;
        super::schema::migrate(&pool, dialect).await?;
        Ok(SqlMeta { pool, link_lookups: Group::default(), link_generation: Arc::default(), dialect })
    }

    pub(super) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(super) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Moves the link generation on for a change of `blob_links` (see `link_generation`).
    pub(super) fn link_change(&self) -> LinkChange {
        LinkChange::begin(&self.link_generation)
    }

    async fn ensure_repo<'c, E>(exec: E, repo: &RepoName) -> Result<(), MetaError>
    where
        E: sqlx::Executor<'c, Database = sqlx::Any>,
    {
        sqlx::query("INSERT INTO repositories (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(repo.as_str())
            .bind(now())
            .execute(exec)
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Meta for SqlMeta {
    async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<(), MetaError> {
        let _change = LinkChange::begin(&self.link_generation);
        let mut tx = self.pool.begin().await?;
        Self::ensure_repo(&mut *tx, repo).await?;
        sqlx::query(
            "INSERT INTO blob_links (repo, digest, size, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (repo, digest) DO NOTHING",
        )
        .bind(repo.as_str())
        .bind(digest.to_string())
        .bind(size as i64)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn blob_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError> {
        let key = (self.link_generation.load(Ordering::SeqCst), repo.as_str().to_string(), digest.to_string());
        let pool = self.pool.clone();
        let (repo, digest) = (key.1.clone(), key.2.clone());
        let (shared, _joined) = self
            .link_lookups
            .run(key, move || async move {
                let row = sqlx::query("SELECT 1 FROM blob_links WHERE repo = $1 AND digest = $2")
                    .bind(repo)
                    .bind(digest)
                    .fetch_optional(&pool)
                    .await
                    .map_err(|e| Arc::<str>::from(e.to_string()))?;
                Ok(row.is_some())
            })
            .await;
        match shared {
            Ok(linked) => linked.map_err(MetaError::Shared),
            Err(e) => Err(MetaError::Shared(e.to_string().into())),
        }
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError> {
        let _change = LinkChange::begin(&self.link_generation);
        let done = sqlx::query("DELETE FROM blob_links WHERE repo = $1 AND digest = $2")
            .bind(repo.as_str())
            .bind(digest.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn put_manifest(&self, repo: &RepoName, m: &ManifestRecord, refs: Option<&[Digest]>, tag: Option<&Tag>) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        Self::ensure_repo(&mut *tx, repo).await?;
        sqlx::query(
            "INSERT INTO manifests (repo, digest, media_type, size, subject, artifact_type, annotations, created_at, refs_indexed) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0) ON CONFLICT (repo, digest) DO NOTHING",
        )
        .bind(repo.as_str())
        .bind(m.digest.to_string())
        .bind(&m.media_type)
        .bind(m.size as i64)
        .bind(m.subject.as_ref().map(|d| d.to_string()))
        .bind(m.artifact_type.clone())
        .bind(m.annotations.clone())
        .bind(now())
        .execute(&mut *tx)
        .await?;
        if let Some(refs) = refs {
            Self::insert_refs(&mut tx, repo.as_str(), &m.digest, refs).await?;
        }
        if let Some(tag) = tag {
            sqlx::query(
                "INSERT INTO tags (repo, tag, digest, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
            )
            .bind(repo.as_str())
            .bind(tag.as_str())
            .bind(m.digest.to_string())
            .bind(now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>, MetaError> {
        let row = sqlx::query(
            "SELECT digest, media_type, size, subject, artifact_type, annotations FROM manifests \
             WHERE repo = $1 AND digest = $2",
        )
        .bind(repo.as_str())
        .bind(digest.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>, MetaError> {
        let row = sqlx::query("SELECT digest FROM tags WHERE repo = $1 AND tag = $2")
            .bind(repo.as_str())
            .bind(tag.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get::<String, _>(0).map_err(MetaError::from).and_then(digest_of)).transpose()
    }

    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM manifests WHERE repo = $1 AND digest = $2")
            .bind(repo.as_str())
            .bind(digest.to_string())
            .execute(&mut *tx)
            .await?;
        for sql in ["DELETE FROM tags WHERE repo = $1 AND digest = $2", "DELETE FROM manifest_refs WHERE repo = $1 AND manifest = $2"] {
            sqlx::query(sql).bind(repo.as_str()).bind(digest.to_string()).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, MetaError> {
        let done = sqlx::query("DELETE FROM tags WHERE repo = $1 AND tag = $2")
            .bind(repo.as_str())
            .bind(tag.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        last: Option<&str>,
        limit: u64,
    ) -> Result<Page<ManifestRecord>, MetaError> {
        // Two shapes rather than `($3 IS NULL OR ...)`: PostgreSQL cannot type an untyped NULL parameter.
        const COLUMNS: &str = "SELECT digest, media_type, size, subject, artifact_type, annotations FROM manifests \
                               WHERE repo = $1 AND subject = $2 AND digest > $3";
        let sql = match artifact_type {
            None => format!("{COLUMNS} ORDER BY digest LIMIT $4"),
            Some(_) => format!("{COLUMNS} AND artifact_type = $5 ORDER BY digest LIMIT $4"),
        };
        let mut q = sqlx::query(&sql)
            .bind(repo.as_str())
            .bind(subject.to_string())
            .bind(last.unwrap_or(""))
            .bind(limit_plus_one(limit));
        if let Some(t) = artifact_type {
            q = q.bind(t);
        }
        page(&q.fetch_all(&self.pool).await?, limit, record)
    }

    async fn repo_exists(&self, repo: &RepoName) -> Result<bool, MetaError> {
        let row = sqlx::query("SELECT 1 FROM repositories WHERE name = $1")
            .bind(repo.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn list_tags(&self, repo: &RepoName, last: Option<&str>, limit: u64) -> Result<Page, MetaError> {
        let rows = sqlx::query("SELECT tag FROM tags WHERE repo = $1 AND tag > $2 ORDER BY tag LIMIT $3")
            .bind(repo.as_str())
            .bind(last.unwrap_or(""))
            .bind(limit_plus_one(limit))
            .fetch_all(&self.pool)
            .await?;
        page(&rows, limit, name)
    }

    async fn list_repos(&self, last: Option<&str>, limit: u64) -> Result<Page, MetaError> {
        let rows = sqlx::query("SELECT name FROM repositories WHERE name > $1 ORDER BY name LIMIT $2")
            .bind(last.unwrap_or(""))
            .bind(limit_plus_one(limit))
            .fetch_all(&self.pool)
            .await?;
        page(&rows, limit, name)
    }

    async fn blob_repos(&self, digest: &Digest) -> Result<Vec<String>, MetaError> {
        let rows = sqlx::query("SELECT repo FROM blob_links WHERE digest = $1 ORDER BY repo")
            .bind(digest.to_string())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
    }

    async fn manifest_held(&self, digest: &Digest) -> Result<bool, MetaError> {
        let row = sqlx::query("SELECT 1 FROM manifests WHERE digest = $1 LIMIT 1")
            .bind(digest.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn cache_record(&self, digest: &Digest, size: u64) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO cache_blobs (digest, size, last_access) VALUES ($1, $2, $3) \
             ON CONFLICT (digest) DO UPDATE SET last_access = excluded.last_access",
        )
        .bind(digest.to_string())
        .bind(size as i64)
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn cache_touch(&self, digest: &Digest) -> Result<(), MetaError> {
        sqlx::query("UPDATE cache_blobs SET last_access = $1 WHERE digest = $2")
            .bind(now_millis())
            .bind(digest.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn cache_bytes(&self) -> Result<u64, MetaError> {
        let row = sqlx::query("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM cache_blobs").fetch_one(&self.pool).await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    async fn cache_oldest(&self, limit: u64) -> Result<Vec<(Digest, u64, i64)>, MetaError> {
        let rows = sqlx::query("SELECT digest, size, last_access FROM cache_blobs ORDER BY last_access, digest LIMIT $1")
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((digest_of(r.try_get(0)?)?, r.try_get::<i64, _>(1)? as u64, r.try_get::<i64, _>(2)?)))
            .collect()
    }

    async fn cache_forget(&self, digest: &Digest) -> Result<(), MetaError> {
        sqlx::query("DELETE FROM cache_blobs WHERE digest = $1").bind(digest.to_string()).execute(&self.pool).await?;
        Ok(())
    }

    async fn job(&self, name: &str) -> Result<Option<JobRecord>, MetaError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM replication_jobs WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_record).transpose()
    }

    async fn jobs(&self) -> Result<Vec<JobRecord>, MetaError> {
        let rows = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM replication_jobs ORDER BY name")).fetch_all(&self.pool).await?;
        rows.iter().map(job_record).collect()
    }

    async fn save_job(&self, j: &JobRecord) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO replication_jobs (name, mark, status, pages, repos_seen, repos_matched, copied, skipped, failed, \
             bytes, updated_at, position, pending, retries, walk) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position, pending = excluded.pending, \
             retries = excluded.retries, walk = excluded.walk, \
             mark = excluded.mark, status = excluded.status, pages = excluded.pages, repos_seen = excluded.repos_seen, \
             repos_matched = excluded.repos_matched, copied = excluded.copied, skipped = excluded.skipped, \
             failed = excluded.failed, bytes = excluded.bytes, updated_at = excluded.updated_at",
        )
        .bind(&j.name)
        .bind(j.mark.clone())
        .bind(&j.status)
        .bind(j.pages as i64)
        .bind(j.repos_seen as i64)
        .bind(j.repos_matched as i64)
        .bind(j.copied as i64)
        .bind(j.skipped as i64)
        .bind(j.failed as i64)
        .bind(j.bytes as i64)
        .bind(now())
        .bind(j.position.clone())
        .bind(serde_json::to_string(&j.pending).map_err(|e| MetaError::Corrupt(e.to_string()))?)
        .bind(j.retries as i64)
        .bind(j.walk.as_ref().map(serde_json::to_string).transpose().map_err(|e| MetaError::Corrupt(e.to_string()))?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn reset_job(&self, name: &str) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM replication_jobs WHERE name = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM replication_failures WHERE job = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM replication_units WHERE job = $1").bind(name).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_failure(&self, job: &str, f: &JobFailure) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO replication_failures (job, repo, tag, reason, at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (job, repo, tag) DO UPDATE SET reason = excluded.reason, at = excluded.at",
        )
        .bind(job)
        .bind(&f.repo)
        .bind(&f.tag)
        .bind(&f.reason)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn clear_failure(&self, job: &str, repo: &str, tag: &str) -> Result<bool, MetaError> {
        let done = sqlx::query("DELETE FROM replication_failures WHERE job = $1 AND repo = $2 AND tag = $3")
            .bind(job)
            .bind(repo)
            .bind(tag)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn count_failures(&self, job: &str) -> Result<u64, MetaError> {
        let row = sqlx::query("SELECT COUNT(*) FROM replication_failures WHERE job = $1").bind(job).fetch_one(&self.pool).await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    async fn failures(&self, job: &str, last: Option<(&str, &str)>, limit: u64) -> Result<Page<JobFailure>, MetaError> {
        // Keyset paging over the primary key: (repo, tag) after `last`.
        let (last_repo, last_tag) = last.unwrap_or(("", ""));
        let rows = sqlx::query(
            "SELECT repo, tag, reason FROM replication_failures WHERE job = $1 AND (repo > $2 OR (repo = $2 AND tag > $3)) \
             ORDER BY repo, tag LIMIT $4",
        )
        .bind(job)
        .bind(last_repo)
        .bind(last_tag)
        .bind(limit_plus_one(limit))
        .fetch_all(&self.pool)
        .await?;
        page(&rows, limit, |r| Ok(JobFailure { repo: r.try_get(0)?, tag: r.try_get(1)?, reason: r.try_get(2)? }))
    }

    async fn create_robot(&self, r: &RobotRecord) -> Result<bool, MetaError> {
        let done = sqlx::query(
            "INSERT INTO robots (name, secret_sha256, scopes, created_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, NULL) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&r.name)
        .bind(&r.secret_sha256)
        .bind(&r.scopes)
        .bind(r.created_at)
        .bind(r.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn robot(&self, name: &str) -> Result<Option<RobotRecord>, MetaError> {
        let row = sqlx::query(&format!("SELECT {ROBOT_COLUMNS} FROM robots WHERE name = $1")).bind(name).fetch_optional(&self.pool).await?;
        row.as_ref().map(robot_record).transpose()
    }

    async fn robots(&self, last: Option<&str>, limit: u64) -> Result<Page<RobotRecord>, MetaError> {
        let rows = sqlx::query(&format!("SELECT {ROBOT_COLUMNS} FROM robots WHERE name > $1 ORDER BY name LIMIT $2"))
            .bind(last.unwrap_or(""))
            .bind(limit_plus_one(limit))
            .fetch_all(&self.pool)
            .await?;
        page(&rows, limit, robot_record)
    }

    async fn revoke_robot(&self, name: &str, at: i64) -> Result<bool, MetaError> {
        let done = sqlx::query("UPDATE robots SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL")
            .bind(name)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_upload(&self, id: &str, repo: &RepoName) -> Result<(), MetaError> {
        sqlx::query("INSERT INTO uploads (id, repo, created_at) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(repo.as_str())
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn upload_repo(&self, id: &str) -> Result<Option<String>, MetaError> {
        let row = sqlx::query("SELECT repo FROM uploads WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get::<String, _>(0)).transpose()?)
    }

    async fn stale_uploads(&self, before: i64, limit: u64) -> Result<Vec<String>, MetaError> {
        let rows = sqlx::query("SELECT id FROM uploads WHERE created_at < $1 ORDER BY created_at LIMIT $2")
            .bind(before)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
    }

    async fn delete_upload(&self, id: &str) -> Result<(), MetaError> {
        sqlx::query("DELETE FROM uploads WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    // ---- enumeration, for `fsck` and the reconciliation sweep ---------------------------------------------
    // Keys compare as row values, `(a, b) > ($1, $2)`, which both dialects support and which orders exactly as
    // the `ORDER BY` (same columns, same collations), so no row is skipped or repeated between pages.

    async fn links_page(&self, after: Option<(&str, &str)>, limit: u64) -> Result<Vec<LinkRow>, MetaError> {
        let (repo, digest) = after.unwrap_or(("", ""));
        let rows = sqlx::query(
            "SELECT repo, digest, size FROM blob_links WHERE (repo, digest) > ($1, $2) ORDER BY repo, digest LIMIT $3",
        )
        .bind(repo)
        .bind(digest)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(LinkRow { repo: r.try_get(0)?, digest: digest_of(r.try_get(1)?)?, size: r.try_get::<i64, _>(2)? as u64 }))
            .collect()
    }

    async fn manifests_page(&self, after: Option<(&str, &str)>, limit: u64) -> Result<Vec<ManifestRow>, MetaError> {
        let (repo, digest) = after.unwrap_or(("", ""));
        let rows = sqlx::query(
            "SELECT repo, digest, media_type, size, subject, artifact_type, annotations FROM manifests \
             WHERE (repo, digest) > ($1, $2) ORDER BY repo, digest LIMIT $3",
        )
        .bind(repo)
        .bind(digest)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(ManifestRow { repo: r.try_get("repo")?, record: record(r)? })).collect()
    }

    async fn tags_page(&self, after: Option<(&str, &str)>, limit: u64) -> Result<Vec<TagRow>, MetaError> {
        let (repo, tag) = after.unwrap_or(("", ""));
        let rows = sqlx::query("SELECT repo, tag, digest FROM tags WHERE (repo, tag) > ($1, $2) ORDER BY repo, tag LIMIT $3")
            .bind(repo)
            .bind(tag)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(TagRow { repo: r.try_get(0)?, tag: r.try_get(1)?, digest: digest_of(r.try_get(2)?)? }))
            .collect()
    }

    async fn cache_page(&self, after: Option<&str>, limit: u64) -> Result<Vec<(Digest, u64)>, MetaError> {
        let rows = sqlx::query("SELECT digest, size FROM cache_blobs WHERE digest > $1 ORDER BY digest LIMIT $2")
            .bind(after.unwrap_or(""))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((digest_of(r.try_get(0)?)?, r.try_get::<i64, _>(1)? as u64))).collect()
    }

    async fn uploads_page(&self, after: Option<&str>, limit: u64) -> Result<Vec<UploadRow>, MetaError> {
        let rows = sqlx::query("SELECT id, repo, created_at FROM uploads WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after.unwrap_or(""))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(UploadRow { id: r.try_get(0)?, repo: r.try_get(1)?, created_at: r.try_get(2)? }))
            .collect()
    }

    async fn bytes_referenced(&self, digest: &Digest) -> Result<bool, MetaError> {
        // Four index lookups (blob_links_digest, manifests_digest, the cache's key, manifest_refs_digest); the
        // first hit is enough.
        let row = sqlx::query(
            "SELECT 1 FROM blob_links WHERE digest = $1 UNION ALL SELECT 1 FROM manifests WHERE digest = $2 \
             UNION ALL SELECT 1 FROM cache_blobs WHERE digest = $3 UNION ALL SELECT 1 FROM manifest_refs WHERE digest = $4 LIMIT 1",
        )
        .bind(digest.to_string())
        .bind(digest.to_string())
        .bind(digest.to_string())
        .bind(digest.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    async fn manifest_repos(&self, digest: &Digest) -> Result<Vec<String>, MetaError> {
        let rows = sqlx::query("SELECT repo FROM manifests WHERE digest = $1 ORDER BY repo")
            .bind(digest.to_string())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
    }

    async fn claim(&self, digests: &[&Digest], pushed: bool) -> Result<Vec<Digest>, MetaError> {
        self.claim_digests(digests, pushed).await
    }

    async fn gc_mark(&self, digests: &[Digest], cut: Cutoffs) -> Result<Vec<Digest>, MetaError> {
        self.mark(digests, cut).await
    }

    async fn gc_would_mark(&self, digests: &[Digest], cut: Cutoffs) -> Result<Vec<Digest>, MetaError> {
        self.would_mark(digests, cut).await
    }

    async fn gc_finish(&self, digests: &[Digest]) -> Result<(), MetaError> {
        self.finish(digests).await
    }

    async fn gc_pending(&self, limit: u64) -> Result<Vec<Digest>, MetaError> {
        self.pending(limit).await
    }

    async fn gc_prune_claims(&self, before_ms: i64) -> Result<u64, MetaError> {
        self.prune_claims(before_ms).await
    }

    async fn unindexed_manifests(&self, after: Option<(&str, &str)>, limit: u64) -> Result<Vec<ManifestRow>, MetaError> {
        self.unindexed(after, limit).await
    }

    async fn index_manifest(&self, repo: &str, digest: &Digest, refs: &[Digest]) -> Result<(), MetaError> {
        self.index(repo, digest, refs).await
    }

    async fn untagged_manifests(&self, after: Option<(&str, &str)>, limit: u64, cut: Cutoffs) -> Result<Vec<(String, Digest)>, MetaError> {
        self.untagged(after, limit, cut).await
    }

    async fn gc_remove_manifest(&self, repo: &str, digest: &Digest, cut: Cutoffs, dry_run: bool) -> Result<bool, MetaError> {
        self.remove_manifest(repo, digest, cut, dry_run).await
    }

    async fn evict_mark(&self, digest: &Digest, claims_before_ms: i64) -> Result<bool, MetaError> {
        self.mark_for_eviction(digest, claims_before_ms).await
    }

    async fn member_beat(&self, m: &super::Member, now_ms: i64) -> Result<(), MetaError> {
        self.beat(m, now_ms).await
    }

    async fn members(&self) -> Result<Vec<super::Member>, MetaError> {
        self.all_members().await
    }

    async fn remove_members(&self, id: Option<&str>, before_ms: i64) -> Result<u64, MetaError> {
        self.drop_members(id, before_ms).await
    }

    async fn note_pull(&self, repo: &RepoName, tag: &Tag) -> Result<(), MetaError> {
        self.pulled(repo, tag).await
    }

    async fn tags_by_age(&self, repo: &str, after: Option<(i64, &str)>, limit: u64) -> Result<Vec<TagAge>, MetaError> {
        self.by_age(repo, after, limit).await
    }

    async fn gc_untag(&self, repo: &str, tag: &TagAge, cut: Cutoffs, dry_run: bool) -> Result<Option<Untagged>, MetaError> {
        self.untag(repo, tag, cut, dry_run).await
    }

    async fn lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, MetaError> {
        self.take_lease(name, holder, ttl_ms).await
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), MetaError> {
        self.give_up_lease(name, holder).await
    }

    async fn leases(&self, prefix: &str) -> Result<Vec<Lease>, MetaError> {
        self.live_leases(prefix).await
    }

    async fn cache_check(&self, repo: &RepoName, reference: &str) -> Result<Option<super::Check>, MetaError> {
        self.check_of(repo, reference).await
    }

    async fn record_check(&self, repo: &RepoName, reference: &str, check: super::Check) -> Result<(), MetaError> {
        self.put_check(repo, reference, check).await
    }

    async fn forget_checks(&self, before_ms: i64) -> Result<u64, MetaError> {
        self.drop_checks(before_ms).await
    }

    async fn enqueue_units(&self, job: &str, ranges: &[super::RangeRecord]) -> Result<bool, MetaError> {
        self.enqueue(job, ranges).await
    }

    async fn claim_unit(&self, job: &str, holder: &str, lease_prefix: &str, ttl_ms: i64) -> Result<Option<super::Unit>, MetaError> {
        self.claim_next(job, holder, lease_prefix, ttl_ms).await
    }

    async fn save_unit(
        &self,
        job: &str,
        unit: u64,
        epoch: u64,
        position: Option<&str>,
        pending: &[String],
        counts: super::UnitCounts,
    ) -> Result<bool, MetaError> {
        self.save_position(job, unit, epoch, position, pending, counts).await
    }

    async fn settle_unit(&self, job: &str, unit: u64, epoch: u64, end: super::UnitEnd<'_>) -> Result<bool, MetaError> {
        self.settle(job, unit, epoch, end).await
    }

    async fn units(&self, job: &str) -> Result<Vec<super::Unit>, MetaError> {
        self.job_units(job).await
    }
}

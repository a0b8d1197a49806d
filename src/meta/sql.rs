//! `Meta` over SQL, for SQLite and PostgreSQL alike.

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::schema::Dialect;
use super::{JobFailure, JobRecord, ManifestRecord, Meta, MetaError, Page};
use crate::oci::{Digest, RepoName, Tag};

pub struct SqlMeta {
    pool: AnyPool,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Cache access times are kept in milliseconds: pulls a second apart must still order.
fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn digest_of(s: String) -> Result<Digest, MetaError> {
    Digest::from_str(&s).map_err(|_| MetaError::Corrupt(s))
}

fn record(row: &AnyRow) -> Result<ManifestRecord, MetaError> {
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
    "name, mark, status, pages, repos_seen, repos_matched, copied, skipped, failed, bytes, updated_at, position, pending, retries";

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
    })
}

/// A page of at most `limit` names from a query that was asked for `limit + 1` rows.
fn page(rows: Vec<AnyRow>, limit: u64) -> Result<Page, MetaError> {
    let mut items = rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<Vec<_>, _>>()?;
    let more = items.len() as u64 > limit;
    items.truncate(limit as usize);
    Ok(Page { items, more })
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
        Ok(SqlMeta { pool })
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
        let row = sqlx::query("SELECT 1 FROM blob_links WHERE repo = $1 AND digest = $2")
            .bind(repo.as_str())
            .bind(digest.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError> {
        let done = sqlx::query("DELETE FROM blob_links WHERE repo = $1 AND digest = $2")
            .bind(repo.as_str())
            .bind(digest.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn put_manifest(&self, repo: &RepoName, m: &ManifestRecord, tag: Option<&Tag>) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        Self::ensure_repo(&mut *tx, repo).await?;
        sqlx::query(
            "INSERT INTO manifests (repo, digest, media_type, size, subject, artifact_type, annotations, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (repo, digest) DO NOTHING",
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
        sqlx::query("DELETE FROM tags WHERE repo = $1 AND digest = $2")
            .bind(repo.as_str())
            .bind(digest.to_string())
            .execute(&mut *tx)
            .await?;
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
    ) -> Result<Vec<ManifestRecord>, MetaError> {
        let rows = sqlx::query(
            "SELECT digest, media_type, size, subject, artifact_type, annotations FROM manifests \
             WHERE repo = $1 AND subject = $2 ORDER BY digest",
        )
        .bind(repo.as_str())
        .bind(subject.to_string())
        .fetch_all(&self.pool)
        .await?;
        // Referrer lists are short; filtering here keeps the query one shape for both dialects.
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let r = record(row)?;
            if artifact_type.is_none_or(|want| r.artifact_type.as_deref() == Some(want)) {
                out.push(r);
            }
        }
        Ok(out)
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
            .bind(limit.saturating_add(1) as i64)
            .fetch_all(&self.pool)
            .await?;
        page(rows, limit)
    }

    async fn list_repos(&self, last: Option<&str>, limit: u64) -> Result<Page, MetaError> {
        let rows = sqlx::query("SELECT name FROM repositories WHERE name > $1 ORDER BY name LIMIT $2")
            .bind(last.unwrap_or(""))
            .bind(limit.saturating_add(1) as i64)
            .fetch_all(&self.pool)
            .await?;
        page(rows, limit)
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
             bytes, updated_at, position, pending, retries) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position, pending = excluded.pending, \
             retries = excluded.retries, \
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn reset_job(&self, name: &str) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM replication_jobs WHERE name = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM replication_failures WHERE job = $1").bind(name).execute(&mut *tx).await?;
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

    async fn failures(&self, job: &str) -> Result<Vec<JobFailure>, MetaError> {
        let rows = sqlx::query("SELECT repo, tag, reason FROM replication_failures WHERE job = $1 ORDER BY repo, tag")
            .bind(job)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(JobFailure { repo: r.try_get(0)?, tag: r.try_get(1)?, reason: r.try_get(2)? }))
            .collect()
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
}

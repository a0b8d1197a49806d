//! The SQL of garbage collection (`crate::gc` has the protocol): claims, marks, the references of manifests,
//! the untagged policy's candidates and the collector's lease.
//!
//! Every decision about one digest happens in a transaction that first writes the digest's `blob_state` row:
//! PostgreSQL then holds that row's lock until the commit, and SQLite its one write lock, so a claim and a mark of
//! the same digest never interleave, and each sees what the other committed.

use sqlx::Row;

use super::sql::{digest_of, now_millis, record, SqlMeta};
use super::{Cutoffs, ManifestRow, MetaError};
use crate::oci::Digest;

/// Takes or renews lease `$1` for holder `$2` (= `$5`) until `$3`, unless another holder's is live at `$4`
/// (Unix milliseconds): one row affected if taken. Shared by `Meta::lease` and the replication queue's claims.
pub(super) const LEASE_TAKE: &str = "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
                          ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
                          WHERE leases.expires_at < $4 OR leases.holder = $5";

/// Creates `digest`'s `blob_state` row if needed and locks it for the transaction (the update changes nothing).
pub(super) const LOCK_ROW: &str = "INSERT INTO blob_state (digest, claimed_at, deleting) VALUES ($1, 0, 0) \
                        ON CONFLICT (digest) DO UPDATE SET deleting = blob_state.deleting";

/// Whether anything refers to the bytes of `$1`..`$4`: a manifest record of it, a manifest that lists it, a cache
/// record, or a link that is recent (created at or after `$5`) or in a repository with a manifest whose
/// references are not recorded yet (which might list it).
pub(super) const REFERENCED: &str = "SELECT 1 FROM manifests WHERE digest = $1 \
     UNION ALL SELECT 1 FROM manifest_refs WHERE digest = $2 \
     UNION ALL SELECT 1 FROM cache_blobs WHERE digest = $3 \
     UNION ALL SELECT 1 FROM blob_links l WHERE l.digest = $4 AND (l.created_at >= $5 \
         OR EXISTS (SELECT 1 FROM manifests m WHERE m.repo = l.repo AND m.refs_indexed = 0)) \
     LIMIT 1";

/// Marks `$1` as being removed if it is not already, was not claimed since `$2`, and nothing refers to it
/// (`REFERENCED`'s conditions, `$3`..`$7`): the check and the mark in one statement, which on PostgreSQL locks the
/// row and re-checks it if a claim changed it meanwhile, so a claim and a mark still never interleave.
const MARK: &str = "UPDATE blob_state SET deleting = 1 WHERE digest = $1 AND deleting = 0 AND claimed_at < $2 \
     AND NOT EXISTS (SELECT 1 FROM manifests WHERE digest = $3) \
     AND NOT EXISTS (SELECT 1 FROM manifest_refs WHERE digest = $4) \
     AND NOT EXISTS (SELECT 1 FROM cache_blobs WHERE digest = $5) \
     AND NOT EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = $6 AND (l.created_at >= $7 \
         OR EXISTS (SELECT 1 FROM manifests m WHERE m.repo = l.repo AND m.refs_indexed = 0)))";

/// Digests marked (or cleared) per transaction or statement.
const MARK_BATCH: usize = 32;

/// Whether manifest `$2` of repository `$1` must stay whatever the untagged policy says: a tag points at it, an
/// index of the repository lists it, or it refers to a manifest the repository holds (a live referrer).
const MANIFEST_KEPT: &str = "SELECT 1 FROM tags WHERE repo = $1 AND digest = $2 \
     UNION ALL SELECT 1 FROM manifest_refs WHERE repo = $3 AND digest = $4 \
     UNION ALL SELECT 1 FROM manifests m JOIN manifests s ON s.repo = m.repo AND s.digest = m.subject \
         WHERE m.repo = $5 AND m.digest = $6 \
     LIMIT 1";

/// Whether a claim since `$2` or a removal in progress holds digest `$1`.
pub(super) const HELD: &str = "SELECT 1 FROM blob_state WHERE digest = $1 AND (claimed_at >= $2 OR deleting = 1)";

pub(super) type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

impl SqlMeta {
    pub(super) async fn claim_digests(&self, digests: &[&Digest], pushed: bool) -> Result<Vec<Digest>, MetaError> {
        let mut refused = Vec::new();
        let now = now_millis();
        let pushed_at = if pushed { now } else { 0 };
        // Rows are locked in digest order, as the collector's marks lock them (`mark`): two
        // transactions taking the same rows in different orders could each wait for the other (PostgreSQL then
        // aborts one: "deadlock detected").
        let mut ordered: Vec<&Digest> = digests.to_vec();
        ordered.sort_unstable();
        ordered.dedup();
        let mut tx = self.pool().begin().await?;
        for d in ordered {
            // A digest being removed keeps its mark: the update's condition fails and nothing is written.
            let done = sqlx::query(
                "INSERT INTO blob_state (digest, claimed_at, deleting, pushed_at) VALUES ($1, $2, 0, $3) \
                 ON CONFLICT (digest) DO UPDATE SET claimed_at = excluded.claimed_at, \
                 pushed_at = CASE WHEN excluded.pushed_at > blob_state.pushed_at THEN excluded.pushed_at ELSE blob_state.pushed_at END \
                 WHERE blob_state.deleting = 0",
            )
            .bind(d.to_string())
            .bind(now)
            .bind(pushed_at)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                refused.push((*d).clone());
            }
        }
        tx.commit().await?;
        Ok(refused)
    }

    /// Locks `digest`'s row and says whether it may be collected now: not being removed already, not claimed
    /// since the cut-off, and referred to by nothing.
    async fn collectable(tx: &mut Tx<'_>, digest: &Digest, cut: Cutoffs) -> Result<bool, MetaError> {
        let d = digest.to_string();
        sqlx::query(LOCK_ROW).bind(&d).execute(&mut **tx).await?;
        let state = sqlx::query("SELECT claimed_at, deleting FROM blob_state WHERE digest = $1").bind(&d).fetch_one(&mut **tx).await?;
        if state.try_get::<i64, _>(1)? != 0 || state.try_get::<i64, _>(0)? >= cut.claims_before {
            return Ok(false);
        }
        let used = sqlx::query(REFERENCED)
            .bind(&d)
            .bind(&d)
            .bind(&d)
            .bind(&d)
            .bind(cut.links_before)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(used.is_none())
    }

    pub(super) async fn mark(&self, digests: &[Digest], cut: Cutoffs) -> Result<Vec<Digest>, MetaError> {
        let _change = self.link_change();
        let mut marked = Vec::new();
        // A transaction per few digests: one commit (one fsync on SQLite) for several, while a push waits on the
        // batch (SQLite's one write lock; these rows' locks on PostgreSQL) no longer than a few statements take.
        // In digest order, as claims lock rows (`claim_digests`), so that a mark and a claim never wait on each other
        // in a cycle.
        let mut digests = digests.to_vec();
        digests.sort_unstable();
        for chunk in digests.chunks(MARK_BATCH) {
            let keys: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let mut tx = self.pool().begin().await?;
            // Every digest gets a row to mark (one never claimed has none); existing rows are left as they are.
            let rows = (1..=keys.len()).map(|i| format!("(${i}, 0, 0)")).collect::<Vec<_>>().join(", ");
            let sql = format!("INSERT INTO blob_state (digest, claimed_at, deleting) VALUES {rows} ON CONFLICT (digest) DO NOTHING");
            keys.iter().fold(sqlx::query(&sql), |q, k| q.bind(k)).execute(&mut *tx).await?;
            let mut now_marked = Vec::new();
            for (digest, key) in chunk.iter().zip(&keys) {
                let done = sqlx::query(MARK)
                    .bind(key)
                    .bind(cut.claims_before)
                    .bind(key)
                    .bind(key)
                    .bind(key)
                    .bind(key)
                    .bind(cut.links_before)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 1 {
                    now_marked.push(key);
                    marked.push(digest.clone());
                }
            }
            if !now_marked.is_empty() {
                // Only stale links are left (a recent one is a reference): they go with the bytes.
                let list = (1..=now_marked.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
                let sql = format!("DELETE FROM blob_links WHERE digest IN ({list})");
                now_marked.iter().fold(sqlx::query(&sql), |q, k| q.bind(*k)).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Ok(marked)
    }

    pub(super) async fn would_mark(&self, digests: &[Digest], cut: Cutoffs) -> Result<Vec<Digest>, MetaError> {
        // The same checks in a transaction that is rolled back: a dry run writes nothing.
        let mut tx = self.pool().begin().await?;
        let mut marked = Vec::new();
        for digest in digests {
            if Self::collectable(&mut tx, digest, cut).await? {
                marked.push(digest.clone());
            }
        }
        tx.rollback().await?;
        Ok(marked)
    }

    pub(super) async fn finish(&self, digests: &[Digest]) -> Result<(), MetaError> {
        for chunk in digests.chunks(MARK_BATCH) {
            let list = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let sql = format!("DELETE FROM blob_state WHERE deleting = 1 AND digest IN ({list})");
            chunk.iter().fold(sqlx::query(&sql), |q, d| q.bind(d.to_string())).execute(self.pool()).await?;
        }
        Ok(())
    }

    pub(super) async fn pending(&self, limit: u64) -> Result<Vec<Digest>, MetaError> {
        let rows = sqlx::query("SELECT digest FROM blob_state WHERE deleting = 1 ORDER BY digest LIMIT $1")
            .bind(limit as i64)
            .fetch_all(self.pool())
            .await?;
        rows.into_iter().map(|r| digest_of(r.try_get(0)?)).collect()
    }

    pub(super) async fn prune_claims(&self, before_ms: i64) -> Result<u64, MetaError> {
        let done = sqlx::query("DELETE FROM blob_state WHERE deleting = 0 AND claimed_at < $1").bind(before_ms).execute(self.pool()).await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn unindexed(&self, after: Option<(&str, &str)>, limit: u64) -> Result<Vec<ManifestRow>, MetaError> {
        let (repo, digest) = after.unwrap_or(("", ""));
        let rows = sqlx::query(
            "SELECT repo, digest, media_type, size, subject, artifact_type, annotations FROM manifests \
             WHERE refs_indexed = 0 AND (repo, digest) > ($1, $2) ORDER BY repo, digest LIMIT $3",
        )
        .bind(repo)
        .bind(digest)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|r| Ok(ManifestRow { repo: r.try_get("repo")?, record: record(r)? })).collect()
    }

    /// Inserts the reference rows of manifest `digest` in `repo` and marks its references recorded.
    pub(super) async fn insert_refs(tx: &mut Tx<'_>, repo: &str, digest: &Digest, refs: &[Digest]) -> Result<(), MetaError> {
        for r in refs {
            sqlx::query("INSERT INTO manifest_refs (repo, manifest, digest) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(repo)
                .bind(digest.to_string())
                .bind(r.to_string())
                .execute(&mut **tx)
                .await?;
        }
        sqlx::query("UPDATE manifests SET refs_indexed = 1 WHERE repo = $1 AND digest = $2")
            .bind(repo)
            .bind(digest.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub(super) async fn index(&self, repo: &str, digest: &Digest, refs: &[Digest]) -> Result<(), MetaError> {
        let mut tx = self.pool().begin().await?;
        Self::insert_refs(&mut tx, repo, digest, refs).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn untagged(&self, after: Option<(&str, &str)>, limit: u64, cut: Cutoffs) -> Result<Vec<(String, Digest)>, MetaError> {
        let (repo, digest) = after.unwrap_or(("", ""));
        let rows = sqlx::query(
            "SELECT m.repo, m.digest FROM manifests m WHERE (m.repo, m.digest) > ($1, $2) AND m.created_at < $3 \
             AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo AND t.digest = m.digest) \
             ORDER BY m.repo, m.digest LIMIT $4",
        )
        .bind(repo)
        .bind(digest)
        .bind(cut.links_before)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|r| Ok((r.try_get::<String, _>(0)?, digest_of(r.try_get(1)?)?))).collect()
    }

    pub(super) async fn remove_manifest(&self, repo: &str, digest: &Digest, cut: Cutoffs, dry_run: bool) -> Result<bool, MetaError> {
        let mut tx = self.pool().begin().await?;
        let removed = Self::retire(&mut tx, repo, digest, cut).await?;
        if removed && !dry_run {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(removed)
    }

    /// Locks `digest`'s row and, in `tx`, removes manifest `digest` of `repo` if it may go (`retire_unlocked`).
    /// Returns whether it went; the caller commits or, for a dry run, rolls back.
    pub(super) async fn retire(tx: &mut Tx<'_>, repo: &str, digest: &Digest, cut: Cutoffs) -> Result<bool, MetaError> {
        sqlx::query(LOCK_ROW).bind(digest.to_string()).execute(&mut **tx).await?;
        Self::retire_unlocked(tx, repo, digest, cut).await
    }

    /// Removes manifest `digest` of `repo` (its record and reference rows) in `tx` if it is not held (`HELD`),
    /// was stored before `cut.links_before`, and is not kept (`MANIFEST_KEPT`). Without the row lock, only a
    /// transaction that is rolled back may use it (a dry run: it decides on what is committed, and waits for
    /// no push).
    pub(super) async fn retire_unlocked(tx: &mut Tx<'_>, repo: &str, digest: &Digest, cut: Cutoffs) -> Result<bool, MetaError> {
        let d = digest.to_string();
        let claimed = sqlx::query(HELD).bind(&d).bind(cut.claims_before).fetch_optional(&mut **tx).await?;
        let stored = sqlx::query("SELECT 1 FROM manifests WHERE repo = $1 AND digest = $2 AND created_at < $3")
            .bind(repo)
            .bind(&d)
            .bind(cut.links_before)
            .fetch_optional(&mut **tx)
            .await?;
        let kept = sqlx::query(MANIFEST_KEPT)
            .bind(repo)
            .bind(&d)
            .bind(repo)
            .bind(&d)
            .bind(repo)
            .bind(&d)
            .fetch_optional(&mut **tx)
            .await?;
        if claimed.is_some() || stored.is_none() || kept.is_some() {
            return Ok(false);
        }
        for sql in ["DELETE FROM manifests WHERE repo = $1 AND digest = $2", "DELETE FROM manifest_refs WHERE repo = $1 AND manifest = $2"] {
            sqlx::query(sql).bind(repo).bind(&d).execute(&mut **tx).await?;
        }
        Ok(true)
    }

    pub(super) async fn take_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, MetaError> {
        let now = now_millis();
        let done = sqlx::query(LEASE_TAKE)
        .bind(name)
        .bind(holder)
        .bind(now.saturating_add(ttl_ms))
        .bind(now)
        .bind(holder)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn give_up_lease(&self, name: &str, holder: &str) -> Result<(), MetaError> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2").bind(name).bind(holder).execute(self.pool()).await?;
        Ok(())
    }

    pub(super) async fn mark_for_eviction(&self, digest: &Digest, claims_before_ms: i64) -> Result<bool, MetaError> {
        let d = digest.to_string();
        let mut tx = self.pool().begin().await?;
        sqlx::query(LOCK_ROW).bind(&d).execute(&mut *tx).await?;
        let state = sqlx::query("SELECT pushed_at, deleting FROM blob_state WHERE digest = $1").bind(&d).fetch_one(&mut *tx).await?;
        if state.try_get::<i64, _>(1)? != 0 || state.try_get::<i64, _>(0)? >= claims_before_ms {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("UPDATE blob_state SET deleting = 1 WHERE digest = $1").bind(&d).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }
}

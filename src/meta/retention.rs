//! The SQL of retention policies (`crate::gc::retention` decides which tags go): when tags were pulled, a
//! repository's tags newest first, and the removal of one tag with the manifests only it kept.
//!
//! A tag's removal follows the collector's protocol (`crate::gc`): its transaction first locks the manifest
//! digest's `blob_state` row (`LOCK_ROW`), so a push of that manifest, which claims the digest first, either
//! came before (its claim is seen, the tag stays) or waits until the removal is committed and then stores the
//! manifest anew. The tag is deleted only if it is exactly as read (same digest, `updated_at`, `pulled_at`): a
//! push, a move or a pull since wins.

use std::collections::HashMap;

use sqlx::Row;

use super::collect::{Tx, HELD, LOCK_ROW, REFERENCED};
use super::sql::{digest_of, SqlMeta};
use super::{Cutoffs, MetaError, TagAge, Untagged};
use crate::oci::{Digest, RepoName, Tag};

/// Levels of index children and referrers retired below a tag's manifest at most (an index of indexes with
/// signatures is three); deeper ones are left to the untagged policy.
const RETIRE_DEPTH: usize = 8;

/// What a manifest about to be retired lists (`size`: the blob link's, or the child manifest's record's, `NULL`
/// when neither is in the repository) and which manifests refer to it as their subject.
const LISTED: &str = "SELECT r.digest, COALESCE(m.size, l.size), m.digest FROM manifest_refs r \
     LEFT JOIN manifests m ON m.repo = r.repo AND m.digest = r.digest \
     LEFT JOIN blob_links l ON l.repo = r.repo AND l.digest = r.digest \
     WHERE r.repo = $1 AND r.manifest = $2";

/// What retiring one manifest found: the manifests below it to try next, and the digests (with sizes) whose
/// bytes may have lost their last reference.
#[derive(Default)]
struct Retired {
    below: Vec<Digest>,
    freed: HashMap<String, u64>,
}

impl SqlMeta {
    pub(super) async fn pulled(&self, repo: &RepoName, tag: &Tag) -> Result<(), MetaError> {
        sqlx::query("UPDATE tags SET pulled_at = $1 WHERE repo = $2 AND tag = $3")
            .bind(super::sql::now())
            .bind(repo.as_str())
            .bind(tag.as_str())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub(super) async fn by_age(&self, repo: &str, after: Option<(i64, &str)>, limit: u64) -> Result<Vec<TagAge>, MetaError> {
        // Every stored `updated_at` is below i64::MAX, so the first page starts at the newest tag.
        let (at, tag) = after.unwrap_or((i64::MAX, ""));
        let rows = sqlx::query(
            "SELECT tag, digest, updated_at, pulled_at FROM tags WHERE repo = $1 AND (updated_at, tag) < ($2, $3) \
             ORDER BY updated_at DESC, tag DESC LIMIT $4",
        )
        .bind(repo)
        .bind(at)
        .bind(tag)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok(TagAge { tag: r.try_get(0)?, digest: digest_of(r.try_get(1)?)?, updated_at: r.try_get(2)?, pulled_at: r.try_get(3)? }))
            .collect()
    }

    /// A real run commits the tag's removal with its manifest's retirement, then retires each manifest below in
    /// a transaction of its own: each holds one digest's row at a time, so it can never wait in a cycle with a
    /// push that claims several digests in its own order. A dry run keeps one transaction for the whole tree
    /// (rolled back, so it counts what lies below) and locks nothing, since it writes nothing.
    pub(super) async fn untag(&self, repo: &str, t: &TagAge, cut: Cutoffs, dry_run: bool) -> Result<Option<Untagged>, MetaError> {
        let mut tx = self.pool().begin().await?;
        if !Self::remove_tag(&mut tx, repo, t, cut, !dry_run).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        let mut done = Untagged::default();
        let mut freed = HashMap::new();
        let mut level = vec![t.digest.clone()];
        for _ in 0..RETIRE_DEPTH {
            let mut next = Vec::new();
            for m in &level {
                if let Some(r) = Self::retire_listed(&mut tx, repo, m, cut, !dry_run).await? {
                    done.manifests += 1;
                    next.extend(r.below);
                    freed.extend(r.freed);
                }
                if !dry_run {
                    // Committed after each manifest, retired or kept: its row lock (taken either way) is given
                    // up before the next is taken.
                    done.bytes += Self::unreferenced_bytes(&mut tx, &std::mem::take(&mut freed), cut).await?;
                    tx.commit().await?;
                    tx = self.pool().begin().await?;
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        done.bytes += Self::unreferenced_bytes(&mut tx, &freed, cut).await?;
        if dry_run {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok(Some(done))
    }

    /// Deletes tag `t` in `tx` if it is exactly as read and its manifest is not held by a claim; `lock` takes
    /// the digest's row first (a real run).
    async fn remove_tag(tx: &mut Tx<'_>, repo: &str, t: &TagAge, cut: Cutoffs, lock: bool) -> Result<bool, MetaError> {
        let d = t.digest.to_string();
        if lock {
            sqlx::query(LOCK_ROW).bind(&d).execute(&mut **tx).await?;
        }
        if sqlx::query(HELD).bind(&d).bind(cut.claims_before).fetch_optional(&mut **tx).await?.is_some() {
            return Ok(false);
        }
        // The re-check is the statement's own condition: on PostgreSQL a concurrent change of the row makes the
        // delete re-read it and find it changed; on SQLite nothing else writes meanwhile.
        let done = sqlx::query("DELETE FROM tags WHERE repo = $1 AND tag = $2 AND digest = $3 AND updated_at = $4 AND pulled_at = $5")
            .bind(repo)
            .bind(&t.tag)
            .bind(&d)
            .bind(t.updated_at)
            .bind(t.pulled_at)
            .execute(&mut **tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Retires manifest `digest` of `repo` in `tx` if it may go (`retire`'s checks; without `lock`, a dry run's,
    /// the same checks without the row lock), with what it listed and what referred to it read first.
    async fn retire_listed(tx: &mut Tx<'_>, repo: &str, digest: &Digest, cut: Cutoffs, lock: bool) -> Result<Option<Retired>, MetaError> {
        let d = digest.to_string();
        let size = sqlx::query("SELECT size FROM manifests WHERE repo = $1 AND digest = $2").bind(repo).bind(&d).fetch_optional(&mut **tx).await?;
        let Some(size) = size else { return Ok(None) };
        let mut r = Retired::default();
        r.freed.insert(d.clone(), size.try_get::<i64, _>(0)? as u64);
        for row in sqlx::query(LISTED).bind(repo).bind(&d).fetch_all(&mut **tx).await? {
            let listed: String = row.try_get(0)?;
            if row.try_get::<Option<String>, _>(2)?.is_some() {
                r.below.push(digest_of(listed.clone())?);
            }
            if let Some(size) = row.try_get::<Option<i64>, _>(1)? {
                r.freed.insert(listed, size as u64);
            }
        }
        for row in sqlx::query("SELECT digest FROM manifests WHERE repo = $1 AND subject = $2").bind(repo).bind(&d).fetch_all(&mut **tx).await? {
            r.below.push(digest_of(row.try_get(0)?)?);
        }
        let retired = if lock { Self::retire(tx, repo, digest, cut).await? } else { Self::retire_unlocked(tx, repo, digest, cut).await? };
        Ok(retired.then_some(r))
    }

    /// The sum of the sizes in `freed` of the digests nothing refers to any more, as `gc_would_mark` judges
    /// (without its row lock: this is the report's figure; the sweep decides, under the lock).
    async fn unreferenced_bytes(tx: &mut Tx<'_>, freed: &HashMap<String, u64>, cut: Cutoffs) -> Result<u64, MetaError> {
        let mut bytes = 0;
        for (d, size) in freed {
            let held = sqlx::query(HELD).bind(d).bind(cut.claims_before).fetch_optional(&mut **tx).await?.is_some();
            let used = held
                || sqlx::query(REFERENCED)
                    .bind(d)
                    .bind(d)
                    .bind(d)
                    .bind(d)
                    .bind(cut.links_before)
                    .fetch_optional(&mut **tx)
                    .await?
                    .is_some();
            if !used {
                bytes += size;
            }
        }
        Ok(bytes)
    }
}

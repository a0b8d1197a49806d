//! Everything that is not bytes: repositories, which blobs each repository holds, manifest records, tags, and
//! upload sessions.
//!
//! One implementation, `SqlMeta`, speaks to SQLite (the embedded default) and PostgreSQL (several instances
//! sharing one state) through sqlx's `Any` driver: the SQL is the same for both apart from the schema's column
//! collation, so there is one body of queries to keep right rather than two.

mod collect;
mod members;
mod queue;
mod retention;
mod schema;
mod sql;

pub use sql::SqlMeta;

use crate::oci::{Digest, RepoName, Tag};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("metadata schema migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("metadata store holds an invalid value: {0}")]
    Corrupt(String),
    /// A query shared by concurrent callers failed (`sqlx::Error` cannot be cloned to each of them).
    #[error("metadata store error: {0}")]
    Shared(std::sync::Arc<str>),
}

/// What is known about a manifest stored in a repository (its bytes are in the blob store under `digest`).
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
    /// The manifest's `annotations`, as JSON text, for the referrers API.
    pub annotations: Option<String>,
}

/// The saved state of a replication job: its checkpoint and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct JobRecord {
    pub name: String,
    /// Low-water mark of the catalog walk: every repository up to and including it is finished.
    pub mark: Option<String>,
    /// The walk's position: the last name of the last page whose matched repositories were all handed on. With a
    /// partitioned walk, the lowest position of its ranges (what a breakwater without partitioned walks would
    /// resume from, redoing some work but skipping none).
    pub position: Option<String>,
    /// A partitioned walk's ranges left to list; `None` in a record saved before walks were partitioned, whose
    /// walk is then one range after `position`.
    pub walk: Option<WalkRecord>,
    /// Repositories handed on but not finished at the last save (a resumed run re-queues them).
    pub pending: Vec<String>,
    /// `running`, `interrupted` (stopped by a shutdown; resumable like a crashed run), `finished` or `failed`
    /// (finished with failed items). Free text in the store: a new status needs no migration.
    pub status: String,
    pub pages: u64,
    pub repos_seen: u64,
    pub repos_matched: u64,
    pub copied: u64,
    pub skipped: u64,
    pub failed: u64,
    pub bytes: u64,
    /// Runs that retried this pass's failures after its walk had ended (0 once a walk runs): a scheduled run
    /// retries a failed pass once, then starts a new pass, so an item that keeps failing cannot stop a schedule.
    pub retries: u64,
    pub updated_at: i64,
}

/// What a catalog walk has left to list: everything outside its ranges was handed on.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WalkRecord {
    pub ranges: Vec<RangeRecord>,
    /// The source's catalog was found not sorted: it is walked as one range, in the source's own order.
    #[serde(default)]
    pub unsorted: bool,
}

/// One range of a catalog walk: the names after `position` up to and including `end`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RangeRecord {
    /// The last name handed on from the range, or where it starts; `None`: the catalog's start.
    pub position: Option<String>,
    /// `None`: the catalog's end.
    pub end: Option<String>,
}

/// One unit of a distributed replication job's work: a key range of the source's catalog, `(start, end]`, and
/// where its walk is (`crate::replicate::distributed` has the protocol).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Unit {
    pub job: String,
    /// The unit's number within the job: its lease is `replicate:<job>:<unit>`.
    pub unit: u64,
    /// Where the range starts (exclusive); `None`: the catalog's start.
    pub start: Option<String>,
    /// The range's last name; `None`: the catalog's end.
    pub end: Option<String>,
    /// The checkpoint: the last name of the range handed on (`None`: nothing yet).
    pub position: Option<String>,
    /// Repositories handed on but not finished at the last save: a worker that takes the unit over re-queues them.
    pub pending: Vec<String>,
    /// `pending`, `claimed`, `done` or `failed`.
    pub state: String,
    /// Failed attempts so far.
    pub attempts: u64,
    /// Grows at every claim: saves carry it, so a worker that lost its claim cannot overwrite its successor's.
    pub epoch: u64,
    /// The worker holding the claim; on a `done` unit, the one that finished it.
    pub claimed_by: Option<String>,
    /// Artifacts copied and skipped, and bytes copied, by this unit over all its attempts.
    pub copied: u64,
    pub skipped: u64,
    pub bytes: u64,
    /// Why the last attempt failed.
    pub error: Option<String>,
}

/// The counters a unit's save carries (its attempts' totals).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitCounts {
    pub copied: u64,
    pub skipped: u64,
    pub bytes: u64,
}

/// An item a replication job could not copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobFailure {
    pub repo: String,
    /// Empty when the whole repository failed (its tags could not be listed).
    pub tag: String,
    pub reason: String,
}

/// A robot token (`breakwater token create`): only the SHA-256 of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RobotRecord {
    pub name: String,
    /// Hex SHA-256 of the secret. The secret is 256 random bits, so a fast hash is enough: there is nothing to
    /// guess that a slow one would protect.
    pub secret_sha256: String,
    /// `GLOB:ACTIONS` grants, space-separated.
    pub scopes: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// A page of a sorted listing: the items, and whether more follow (to decide on a `Link` header). Every listing
/// is paged so that no answer grows with what is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T = String> {
    pub items: Vec<T>,
    pub more: bool,
}

#[async_trait::async_trait]
pub trait Meta: Send + Sync + 'static {
    /// Records that `repo` holds blob `digest`, creating the repository if needed.
    async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<(), MetaError>;
    /// Whether `repo` holds blob `digest`.
    async fn blob_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError>;
    /// Removes blob `digest` from `repo`; false if it was not there.
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError>;

    /// Stores a manifest record in `repo` with the digests it refers to (`refs`: config, layers, an index's
    /// children; `None` when the caller does not know them, e.g. re-tagging a stored manifest: a new record is
    /// then left for the collector to index) and, if given, points `tag` at it, in one transaction.
    async fn put_manifest(&self, repo: &RepoName, m: &ManifestRecord, refs: Option<&[Digest]>, tag: Option<&Tag>) -> Result<(), MetaError>;
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>, MetaError>;
    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>, MetaError>;
    /// Removes a manifest and every tag pointing at it; false if it was not there.
    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError>;
    /// Removes a tag (not the manifest); false if it was not there.
    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, MetaError>;
    /// Manifests in `repo` whose subject is `subject`, optionally only those of `artifact_type`, in digest order
    /// after `last`, at most `limit`.
    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        last: Option<&str>,
        limit: u64,
    ) -> Result<Page<ManifestRecord>, MetaError>;

    async fn repo_exists(&self, repo: &RepoName) -> Result<bool, MetaError>;
    /// Tags of `repo` in byte order, after `last`, at most `limit`.
    async fn list_tags(&self, repo: &RepoName, last: Option<&str>, limit: u64) -> Result<Page, MetaError>;
    /// Repository names in byte order, after `last`, at most `limit`.
    async fn list_repos(&self, last: Option<&str>, limit: u64) -> Result<Page, MetaError>;

    /// Every repository that holds blob `digest`.
    async fn blob_repos(&self, digest: &Digest) -> Result<Vec<String>, MetaError>;
    /// Whether any repository holds a manifest record of `digest` (its bytes are then in use, whoever else holds
    /// them as a blob).
    async fn manifest_held(&self, digest: &Digest) -> Result<bool, MetaError>;

    /// Accounts blob `digest` as cache content (fetched from an upstream), accessed now.
    async fn cache_record(&self, digest: &Digest, size: u64) -> Result<(), MetaError>;
    /// Marks cache content as accessed now (eviction removes the least recently pulled first).
    async fn cache_touch(&self, digest: &Digest) -> Result<(), MetaError>;
    /// Total bytes of cache content.
    async fn cache_bytes(&self) -> Result<u64, MetaError>;
    /// The `limit` least recently accessed cache entries: (digest, size, last access in Unix milliseconds).
    async fn cache_oldest(&self, limit: u64) -> Result<Vec<(Digest, u64, i64)>, MetaError>;
    /// Stops accounting `digest` as cache content.
    async fn cache_forget(&self, digest: &Digest) -> Result<(), MetaError>;

    /// The saved state of replication job `name`.
    async fn job(&self, name: &str) -> Result<Option<JobRecord>, MetaError>;
    /// Every replication job's saved state.
    async fn jobs(&self) -> Result<Vec<JobRecord>, MetaError>;
    /// Saves a job's checkpoint and counters.
    async fn save_job(&self, job: &JobRecord) -> Result<(), MetaError>;
    /// Forgets a job's checkpoint, counters and failures (a fresh run).
    async fn reset_job(&self, name: &str) -> Result<(), MetaError>;
    async fn record_failure(&self, job: &str, failure: &JobFailure) -> Result<(), MetaError>;
    /// Forgets a failure (its item was copied since); false if none was recorded.
    async fn clear_failure(&self, job: &str, repo: &str, tag: &str) -> Result<bool, MetaError>;
    /// A job's failures in (repository, tag) order after `last`, at most `limit`.
    async fn failures(&self, job: &str, last: Option<(&str, &str)>, limit: u64) -> Result<Page<JobFailure>, MetaError>;
    /// How many failures job `job` has recorded.
    async fn count_failures(&self, job: &str) -> Result<u64, MetaError>;

    /// Registers upload session `id` for `repo`.
    /// Stores a new robot; `false` (nothing changed) if one of that name exists, revoked or not.
    async fn create_robot(&self, robot: &RobotRecord) -> Result<bool, MetaError>;
    async fn robot(&self, name: &str) -> Result<Option<RobotRecord>, MetaError>;
    /// Robots in name order after `last`.
    async fn robots(&self, last: Option<&str>, limit: u64) -> Result<Page<RobotRecord>, MetaError>;
    /// Marks a robot revoked at `at`; `false` if there is no such robot or it was revoked already.
    async fn revoke_robot(&self, name: &str, at: i64) -> Result<bool, MetaError>;

    async fn create_upload(&self, id: &str, repo: &RepoName) -> Result<(), MetaError>;
    /// The repository upload `id` belongs to, if it exists.
    async fn upload_repo(&self, id: &str) -> Result<Option<String>, MetaError>;
    async fn delete_upload(&self, id: &str) -> Result<(), MetaError>;
    /// Upload sessions created before `before` (Unix seconds), at most `limit`.
    async fn stale_uploads(&self, before: i64, limit: u64) -> Result<Vec<String>, MetaError>;

    // ---- enumeration, for `fsck` and the reconciliation sweep ---------------------------------------------
    // Every table that points at bytes or files is walked in pages by its key, so memory stays bounded however
    // large the store: each method returns the rows after `after` in key order, at most `limit`.

    /// Blob links after (repository, digest) `after`.
    async fn links_page(&self, after: Option<(&str, &str)>, limit: u64) -> Result<Vec<LinkRow>, MetaError>;
    /// Manifest records after (repository, digest) `after`.
    async fn manifests_page(&self, after: Option<(&str, &str)>, limit: u64) -> Result<Vec<ManifestRow>, MetaError>;
    /// Tags after (repository, tag) `after`.
    async fn tags_page(&self, after: Option<(&str, &str)>, limit: u64) -> Result<Vec<TagRow>, MetaError>;
    /// Cache records after digest `after`: (digest, size).
    async fn cache_page(&self, after: Option<&str>, limit: u64) -> Result<Vec<(Digest, u64)>, MetaError>;
    /// Upload sessions after id `after`.
    async fn uploads_page(&self, after: Option<&str>, limit: u64) -> Result<Vec<UploadRow>, MetaError>;
    /// Whether anything refers to the bytes of `digest`: a blob link, a manifest record or a cache record.
    async fn bytes_referenced(&self, digest: &Digest) -> Result<bool, MetaError>;
    /// Every repository that holds a manifest record of `digest`.
    async fn manifest_repos(&self, digest: &Digest) -> Result<Vec<String>, MetaError>;

    // ---- garbage collection (`crate::gc`; the protocol is described there) --------------------------------

    /// Claims `digests` for a write that relies on their bytes from now until it has recorded its reference:
    /// a collector leaves a digest claimed in the last `gc::CLAIM_HOLD` alone. Returns the digests a collector
    /// is removing at this moment, which were not claimed (the caller waits for them, or gives up).
    /// `pushed`: the write makes them referenced outside the pull-through cache (a push, not a cache fill),
    /// which cache eviction respects too (`evict_mark`).
    async fn claim(&self, digests: &[&Digest], pushed: bool) -> Result<Vec<Digest>, MetaError>;
    /// Marks each of `digests` as being removed, unless something refers to it or it was claimed since
    /// `cut.claims_before`; its stale links (older than `cut.links_before`, referred to by no manifest) go with
    /// the mark. Returns the digests marked: their bytes may then be removed, then `gc_finish` called.
    async fn gc_mark(&self, digests: &[Digest], cut: Cutoffs) -> Result<Vec<Digest>, MetaError>;
    /// The digests `gc_mark` would mark (for a dry run; nothing is written).
    async fn gc_would_mark(&self, digests: &[Digest], cut: Cutoffs) -> Result<Vec<Digest>, MetaError>;
    /// Ends the removal of `digests` (their bytes are gone, or their removal failed and they stay unreferenced).
    async fn gc_finish(&self, digests: &[Digest]) -> Result<(), MetaError>;
    /// Marks `digest` as being removed for cache eviction, which judges references its own way (a cached
    /// manifest listing a layer does not keep the layer's bytes): only unless a removal is under way already or
    /// a push claimed it at or after `claims_before_ms` (a cache fill's claim does not count: eviction removes
    /// what fills bring). From then on every write that would refer to it is refused
    /// until `gc_finish`, on every instance sharing the store. Returns whether it was marked.
    async fn evict_mark(&self, digest: &Digest, claims_before_ms: i64) -> Result<bool, MetaError>;
    /// Digests marked as being removed whose removal did not finish (a collector stopped halfway).
    async fn gc_pending(&self, limit: u64) -> Result<Vec<Digest>, MetaError>;
    /// Forgets claims older than `before_ms` (they no longer protect anything).
    async fn gc_prune_claims(&self, before_ms: i64) -> Result<u64, MetaError>;
    /// Manifests whose references are not recorded yet (stored before the collector existed), after `after`.
    async fn unindexed_manifests(&self, after: Option<(&str, &str)>, limit: u64) -> Result<Vec<ManifestRow>, MetaError>;
    /// Records the references of a stored manifest (read from its bytes).
    async fn index_manifest(&self, repo: &str, digest: &Digest, refs: &[Digest]) -> Result<(), MetaError>;
    /// Manifests that no tag points at and that were stored before `cut.links_before`, after (repo, digest)
    /// `after`: candidates of the untagged policy (`gc_remove_manifest` decides).
    async fn untagged_manifests(&self, after: Option<(&str, &str)>, limit: u64, cut: Cutoffs) -> Result<Vec<(String, Digest)>, MetaError>;
    /// Removes the untagged manifest `digest` of `repo` unless it is tagged, the child of an index in `repo`, a
    /// referrer of a manifest `repo` holds, or claimed since `cut.claims_before`. With `dry_run`, only says.
    async fn gc_remove_manifest(&self, repo: &str, digest: &Digest, cut: Cutoffs, dry_run: bool) -> Result<bool, MetaError>;
    /// Records that `tag` of `repo` was pulled (by tag) now, for retention's `keep_within`. Callers write it at
    /// most once an hour per tag (`Registry::note_pull`).
    async fn note_pull(&self, repo: &RepoName, tag: &Tag) -> Result<(), MetaError>;
    /// Tags of `repo` newest first (by `updated_at`, then tag, descending), after `after` (an `updated_at` and a
    /// tag, exclusive), at most `limit`: retention's walk, paged so that memory stays bounded.
    async fn tags_by_age(&self, repo: &str, after: Option<(i64, &str)>, limit: u64) -> Result<Vec<TagAge>, MetaError>;
    /// Removes tag `tag` of `repo` for a retention policy, unless it changed since it was read (pushed, moved or
    /// pulled since: its digest, `updated_at` or `pulled_at` differ) or its manifest was claimed since
    /// `cut.claims_before`; then retires the manifest if nothing else keeps it (`gc_remove_manifest`'s checks),
    /// and with it the index children and referrers that only it kept (8 levels at most). `None` if the tag
    /// stays. With `dry_run`, only says (each tag on its own: see `Untagged`).
    async fn gc_untag(&self, repo: &str, tag: &TagAge, cut: Cutoffs, dry_run: bool) -> Result<Option<Untagged>, MetaError>;

    /// Records that cluster member `m` is alive now (`m.heartbeat_at` is ignored: the store's clock is not
    /// used, the caller's `now_ms` is), creating its row at its first beat.
    async fn member_beat(&self, m: &Member, now_ms: i64) -> Result<(), MetaError>;
    /// Every member's row, by id.
    async fn members(&self) -> Result<Vec<Member>, MetaError>;
    /// Removes member `id`'s row (it leaves), or every row whose last heartbeat is before `before_ms` (`id`
    /// `None`: members gone for good). Returns how many went.
    async fn remove_members(&self, id: Option<&str>, before_ms: i64) -> Result<u64, MetaError>;

    /// Takes (or renews) lease `name` for `holder` until `ttl_ms` from now, unless another holder's lease is
    /// live. Returns whether `holder` holds it.
    async fn lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, MetaError>;
    /// Gives lease `name` up, if `holder` holds it.
    async fn release(&self, name: &str, holder: &str) -> Result<(), MetaError>;
    /// The leases whose names start with `prefix` and that have not expired, by name (a cluster's flights:
    /// who fetches what).
    async fn leases(&self, prefix: &str) -> Result<Vec<Lease>, MetaError>;

    // ---- distributed replication: a job's units in a queue (`crate::replicate::distributed`) -------------

    /// Enqueues job `job`'s units, one per range (numbered in order), unless it has units already: the job's row
    /// is locked first, so that two starts at once enqueue once. Returns whether this call enqueued them.
    async fn enqueue_units(&self, job: &str, ranges: &[RangeRecord]) -> Result<bool, MetaError>;
    /// Claims a unit of `job` for `holder`: one pending past its backoff, or claimed by a worker whose lease
    /// (`lease_prefix<job>:<unit>`) lapsed. Takes that lease for `ttl_ms` and bumps the unit's epoch, in one
    /// transaction (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so workers never wait on each other's candidate).
    async fn claim_unit(&self, job: &str, holder: &str, lease_prefix: &str, ttl_ms: i64) -> Result<Option<Unit>, MetaError>;
    /// Saves a claimed unit's checkpoint; false (nothing written) if `epoch` is no longer the unit's.
    async fn save_unit(&self, job: &str, unit: u64, epoch: u64, position: Option<&str>, pending: &[String], counts: UnitCounts) -> Result<bool, MetaError>;
    /// Ends a claimed unit: `done`, or back to `pending` (`release`: a worker stopping gives it up, no attempt is
    /// counted). False if `epoch` is no longer the unit's.
    async fn settle_unit(&self, job: &str, unit: u64, epoch: u64, state: UnitEnd<'_>) -> Result<bool, MetaError>;
    /// The job's units, by number.
    async fn units(&self, job: &str) -> Result<Vec<Unit>, MetaError>;

    /// What a cluster member last learnt from upstream about `reference` of the cached repository `repo`.
    async fn cache_check(&self, repo: &RepoName, reference: &str) -> Result<Option<Check>, MetaError>;
    /// Records that upstream was asked about `reference` now (`check.checked_at`), and whether it had it.
    async fn record_check(&self, repo: &RepoName, reference: &str, check: Check) -> Result<(), MetaError>;
    /// Forgets checks made before `before_ms`; how many went.
    async fn forget_checks(&self, before_ms: i64) -> Result<u64, MetaError>;
}

/// How a claimed unit ends ([`Meta::settle_unit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitEnd<'a> {
    /// Its range is walked and every repository in it finished.
    Done,
    /// Given up by its worker (stopping): back to `pending` at once, no attempt counted.
    Released,
    /// The attempt failed: one more attempt counted; back to `pending` not before `not_before` (Unix
    /// milliseconds), or `failed` for good once `max_attempts` are reached.
    Failed { reason: &'a str, not_before: i64, max_attempts: u64 },
}

/// An upstream's answer about a cached reference, shared by a cluster's members: when (Unix milliseconds), and
/// whether it had the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub checked_at: i64,
    pub found: bool,
}

/// A lease as held: its name, who holds it, until when (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub expires_at: i64,
}

/// A cluster member as registered: who it is, where the others reach it, since when it runs, when it last beat
/// (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    pub id: String,
    pub url: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
}

/// The instants before which a collector's candidates count as old: links and manifests created before
/// `links_before` (Unix seconds), claims made before `claims_before` (Unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    pub links_before: i64,
    pub claims_before: i64,
}

/// A tag as retention reads it: what it points at, and the instants (Unix seconds) its keep conditions and its
/// re-check under the row lock compare.
#[derive(Debug, Clone, PartialEq)]
pub struct TagAge {
    pub tag: String,
    pub digest: Digest,
    /// Last pushed or moved.
    pub updated_at: i64,
    /// Last pulled by tag (0: never recorded).
    pub pulled_at: i64,
}

/// What removing one tag did (or, in a dry run, would do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Untagged {
    /// Manifests retired with the tag: its own, if no other tag or index kept it, and the children and referrers
    /// that only it kept.
    pub manifests: u64,
    /// Bytes of those manifests and of the blobs they listed that nothing refers to any more (sizes as their
    /// records and links give them): what the sweep of the same run frees, unless a write refers to them first.
    /// A dry run rolls each tag back before the next, so a manifest or blob shared only by tags that all go is
    /// counted by neither: its figures are a lower bound.
    pub bytes: u64,
}

/// A row of `blob_links`: `repo` holds blob `digest` (of `size` bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkRow {
    pub repo: String,
    pub digest: Digest,
    pub size: u64,
}

/// A manifest record with the repository it is in.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestRow {
    pub repo: String,
    pub record: ManifestRecord,
}

/// A tag: `repo:tag` points at manifest `digest`.
#[derive(Debug, Clone, PartialEq)]
pub struct TagRow {
    pub repo: String,
    pub tag: String,
    pub digest: Digest,
}

/// An upload session; `created_at` (Unix seconds) tells a session just opened from one left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadRow {
    pub id: String,
    pub repo: String,
    pub created_at: i64,
}

/// Opens the metadata store named by `url`: `sqlite://PATH` or `postgres://...`.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Meta>, MetaError> {
    Ok(std::sync::Arc::new(SqlMeta::connect(url).await?))
}

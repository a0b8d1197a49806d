//! Versioned schema migrations (`migrations/sqlite`, `migrations/postgres`), against SQLite files and a real
//! PostgreSQL: a database made by the code before migrations existed (its tables, no `_sqlx_migrations`), and one
//! made by migration 1 alone, upgrade with their rows intact; an upgraded database has exactly the schema of a
//! new one; several `breakwater serve` processes starting at once on one database all come up and apply each
//! migration once; and a database from a newer breakwater is refused.

#[path = "common/pg.rs"]
mod pg;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use breakwater::meta::{JobFailure, JobRecord, ManifestRecord, Meta};
use breakwater::oci::{Algorithm, Digest, RepoName, Tag};
use sqlx::{AnyPool, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Db {
    Sqlite,
    Postgres,
}

/// The statements breakwater ran at every start-up before it had migrations (`SCHEMA` in `src/meta/sql.rs`),
/// verbatim, with `{text_key}` the type of names and tags.
const TODAYS_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS repositories (name {text_key} PRIMARY KEY, created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS blob_links (repo {text_key} NOT NULL, digest TEXT NOT NULL, size BIGINT NOT NULL, \
     created_at BIGINT NOT NULL, PRIMARY KEY (repo, digest))",
    "CREATE INDEX IF NOT EXISTS blob_links_digest ON blob_links (digest)",
    "CREATE TABLE IF NOT EXISTS manifests (repo {text_key} NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL, \
     size BIGINT NOT NULL, subject TEXT, artifact_type TEXT, annotations TEXT, created_at BIGINT NOT NULL, \
     PRIMARY KEY (repo, digest))",
    "CREATE INDEX IF NOT EXISTS manifests_digest ON manifests (digest)",
    "CREATE INDEX IF NOT EXISTS manifests_subject ON manifests (repo, subject)",
    "CREATE TABLE IF NOT EXISTS tags (repo {text_key} NOT NULL, tag {text_key} NOT NULL, digest TEXT NOT NULL, \
     updated_at BIGINT NOT NULL, PRIMARY KEY (repo, tag))",
    "CREATE TABLE IF NOT EXISTS uploads (id TEXT PRIMARY KEY, repo TEXT NOT NULL, created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cache_blobs (digest TEXT PRIMARY KEY, size BIGINT NOT NULL, last_access BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS cache_blobs_access ON cache_blobs (last_access)",
    "CREATE TABLE IF NOT EXISTS replication_jobs (name TEXT PRIMARY KEY, mark {text_key}, position {text_key}, \
     pending TEXT NOT NULL, status TEXT NOT NULL, \
     pages BIGINT NOT NULL, repos_seen BIGINT NOT NULL, repos_matched BIGINT NOT NULL, copied BIGINT NOT NULL, \
     skipped BIGINT NOT NULL, failed BIGINT NOT NULL, bytes BIGINT NOT NULL, updated_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS replication_failures (job TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL, \
     reason TEXT NOT NULL, at BIGINT NOT NULL, PRIMARY KEY (job, repo, tag))",
];

/// Every migration version this breakwater has.
const VERSIONS: &[i64] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];

/// A database to test on; removed when dropped.
struct Store {
    db: Db,
    url: String,
    /// The SQLite file's directory (also a `serve` data directory).
    dir: Option<tempfile::TempDir>,
    _pg: Option<pg::PgDatabase>,
}

async fn store(db: Db) -> Store {
    sqlx::any::install_default_drivers();
    match db {
        Db::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = breakwater::config::sqlite_url(dir.path());
            Store { db, url, dir: Some(dir), _pg: None }
        }
        Db::Postgres => {
            let p = pg::PgDatabase::create().await;
            Store { db, url: p.url.clone(), dir: None, _pg: Some(p) }
        }
    }
}

impl Store {
    async fn pool(&self) -> AnyPool {
        sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&self.url).await.unwrap()
    }

    fn migrations_dir(&self) -> PathBuf {
        let d = match self.db {
            Db::Sqlite => "sqlite",
            Db::Postgres => "postgres",
        };
        Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(d)
    }

    /// Creates the schema the way breakwater did before it had migrations.
    async fn make_like_today(&self) {
        let text_key = match self.db {
            Db::Sqlite => "TEXT",
            Db::Postgres => "TEXT COLLATE \"C\"",
        };
        let pool = self.pool().await;
        for stmt in TODAYS_SCHEMA {
            sqlx::query(&stmt.replace("{text_key}", text_key)).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }

    /// Creates the schema with sqlx's migrator and migration 1 alone (what a database made by the first release
    /// with migrations holds).
    async fn make_at_migration_1(&self) {
        let only_first = tempfile::tempdir().unwrap();
        std::fs::copy(self.migrations_dir().join("0001_schema.sql"), only_first.path().join("0001_schema.sql")).unwrap();
        let migrator = sqlx::migrate::Migrator::new(only_first.path()).await.unwrap();
        let pool = self.pool().await;
        migrator.run(&pool).await.unwrap();
        assert_eq!(applied(&pool).await, [1]);
        pool.close().await;
    }
}

async fn applied(pool: &AnyPool) -> Vec<i64> {
    let rows = sqlx::query("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version").fetch_all(pool).await.unwrap();
    rows.iter().map(|r| r.get::<i64, _>(0)).collect()
}

fn digest(s: &str) -> Digest {
    Digest::of(Algorithm::Sha256, s.as_bytes())
}

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

const MEDIA: &str = "application/vnd.oci.image.manifest.v1+json";

/// Rows in every table, written with the SQL the code before migrations used.
async fn insert_rows(pool: &AnyPool) {
    let (m1, sig, layer, cached) = (digest("m1").to_string(), digest("sig").to_string(), digest("layer").to_string(), digest("cached").to_string());
    let q = |sql: &'static str| sqlx::query(sql);
    for name in ["team/app", "team/a-b"] {
        q("INSERT INTO repositories (name, created_at) VALUES ($1, 1)").bind(name).execute(pool).await.unwrap();
    }
    q("INSERT INTO blob_links (repo, digest, size, created_at) VALUES ('team/app', $1, 5, 1)").bind(&layer).execute(pool).await.unwrap();
    q("INSERT INTO manifests (repo, digest, media_type, size, subject, artifact_type, annotations, created_at) \
       VALUES ('team/app', $1, $2, 2, NULL, NULL, '{\"k\":\"v\"}', 1)")
    .bind(&m1)
    .bind(MEDIA)
    .execute(pool)
    .await
    .unwrap();
    q("INSERT INTO manifests (repo, digest, media_type, size, subject, artifact_type, annotations, created_at) \
       VALUES ('team/app', $1, $2, 3, $3, 'application/vnd.example.sig', NULL, 1)")
    .bind(&sig)
    .bind(MEDIA)
    .bind(&m1)
    .execute(pool)
    .await
    .unwrap();
    for tag in ["v1", "B", "a"] {
        q("INSERT INTO tags (repo, tag, digest, updated_at) VALUES ('team/app', $1, $2, 1)").bind(tag).bind(&m1).execute(pool).await.unwrap();
    }
    // A recent session: `serve` discards old ones at start-up.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    q("INSERT INTO uploads (id, repo, created_at) VALUES ('u-1', 'team/app', $1)").bind(now).execute(pool).await.unwrap();
    q("INSERT INTO cache_blobs (digest, size, last_access) VALUES ($1, 7, 1000)").bind(&cached).execute(pool).await.unwrap();
    q("INSERT INTO replication_jobs (name, mark, position, pending, status, pages, repos_seen, repos_matched, copied, \
       skipped, failed, bytes, updated_at) VALUES ('mirror', 'r4', 'r9', '[\"r5\"]', 'running', 3, 30, 20, 15, 4, 1, 12345, 99)")
    .execute(pool)
    .await
    .unwrap();
    q("INSERT INTO replication_failures (job, repo, tag, reason, at) VALUES ('mirror', 'r5', 'v1', 'boom', 1)").execute(pool).await.unwrap();
}

/// Stores the bytes `insert_rows`'s cache record accounts for in the content store of `data`: `serve`'s start-up
/// sweep forgets cache records whose bytes are gone.
fn store_cached_bytes(data: &std::path::Path) {
    let d = digest("cached");
    let dir = data.join("content").join("blobs").join("sha256").join(&d.hex()[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(d.hex()), b"cached").unwrap();
}

/// Reads back, through the current code, everything `insert_rows` wrote; then writes through it.
async fn check_rows(meta: Arc<dyn Meta>) {
    let app = repo("team/app");
    assert!(meta.repo_exists(&app).await.unwrap());
    assert!(meta.repo_exists(&repo("team/a-b")).await.unwrap());
    assert_eq!(meta.list_repos(None, 10).await.unwrap().items, ["team/a-b", "team/app"]);
    assert!(meta.blob_linked(&app, &digest("layer")).await.unwrap());
    let m1 = ManifestRecord {
        digest: digest("m1"),
        media_type: MEDIA.into(),
        size: 2,
        subject: None,
        artifact_type: None,
        annotations: Some(r#"{"k":"v"}"#.into()),
    };
    assert_eq!(meta.manifest(&app, &digest("m1")).await.unwrap(), Some(m1.clone()));
    let refs = meta.referrers(&app, &digest("m1"), None, None, 100).await.unwrap().items;
    assert_eq!(refs.iter().map(|r| r.digest.clone()).collect::<Vec<_>>(), [digest("sig")]);
    assert_eq!(meta.resolve_tag(&app, &"v1".parse::<Tag>().unwrap()).await.unwrap(), Some(digest("m1")));
    // Still byte order (the "C" collation on PostgreSQL survived).
    assert_eq!(meta.list_tags(&app, None, 10).await.unwrap().items, ["B", "a", "v1"]);
    // Migration 5: tags from before it were never pulled, and retention can page them by age and note pulls.
    let by_age = meta.tags_by_age(app.as_str(), None, 10).await.unwrap();
    assert_eq!(by_age.len(), 3);
    assert!(by_age.iter().all(|t| t.pulled_at == 0), "{by_age:?}");
    meta.note_pull(&app, &"v1".parse::<Tag>().unwrap()).await.unwrap();
    assert_eq!(meta.upload_repo("u-1").await.unwrap().as_deref(), Some("team/app"));
    assert_eq!(meta.cache_bytes().await.unwrap(), 7);
    assert_eq!(meta.cache_oldest(10).await.unwrap(), [(digest("cached"), 7, 1000)]);
    let job = meta.job("mirror").await.unwrap().expect("the job survived");
    let want = JobRecord {
        name: "mirror".into(),
        mark: Some("r4".into()),
        position: Some("r9".into()),
        pending: vec!["r5".into()],
        status: "running".into(),
        pages: 3,
        repos_seen: 30,
        repos_matched: 20,
        copied: 15,
        skipped: 4,
        failed: 1,
        bytes: 12345,
        retries: 0, // the column migration 2 added, at its default
        walk: None, // migration 9's: a job saved before walks were partitioned
        updated_at: 99,
    };
    assert_eq!(job, want);
    assert_eq!(meta.failures("mirror", None, 100).await.unwrap().items, [JobFailure { repo: "r5".into(), tag: "v1".into(), reason: "boom".into() }]);

    // And the upgraded database takes writes, the new column included.
    meta.save_job(&JobRecord { retries: 2, status: "failed".into(), ..want }).await.unwrap();
    assert_eq!(meta.job("mirror").await.unwrap().unwrap().retries, 2);
    meta.put_manifest(&app, &ManifestRecord { digest: digest("m2"), ..m1 }, None, Some(&"v2".parse().unwrap())).await.unwrap();
    assert_eq!(meta.list_tags(&app, None, 10).await.unwrap().items, ["B", "a", "v1", "v2"]);
}

/// The database's schema, as text to compare: every table's columns (type, collation, nullability, default)
/// and every index, without sqlx's own table.
async fn schema_of(store: &Store) -> Vec<String> {
    let pool = store.pool().await;
    let rows = match store.db {
        Db::Sqlite => {
            let tables = sqlx::query(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_sqlx%' ESCAPE '\\' ORDER BY name",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let mut out = Vec::new();
            for t in tables {
                let t: String = t.get(0);
                let cols = sqlx::query(&format!(
                    "SELECT name, type, \"notnull\", COALESCE(dflt_value, ''), pk FROM pragma_table_info('{t}') ORDER BY cid"
                ))
                .fetch_all(&pool)
                .await
                .unwrap();
                for c in cols {
                    out.push(format!(
                        "{t}.{} {} notnull={} default={} pk={}",
                        c.get::<String, _>(0),
                        c.get::<String, _>(1),
                        c.get::<i64, _>(2),
                        c.get::<String, _>(3),
                        c.get::<i64, _>(4)
                    ));
                }
            }
            let idx = sqlx::query(
                "SELECT name, tbl_name, COALESCE(sql, '') FROM sqlite_master WHERE type = 'index' \
                 AND tbl_name NOT LIKE '\\_sqlx%' ESCAPE '\\' ORDER BY name",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            out.extend(idx.iter().map(|r| format!("index {} on {}: {}", r.get::<String, _>(0), r.get::<String, _>(1), r.get::<String, _>(2))));
            out
        }
        Db::Postgres => {
            let cols = sqlx::query(
                "SELECT table_name::text, column_name::text, data_type::text, COALESCE(collation_name::text, ''), \
                 is_nullable::text, COALESCE(column_default::text, '') FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY table_name, ordinal_position",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let mut out: Vec<String> = cols.iter().map(|r| (0..6).map(|i| r.get::<String, _>(i)).collect::<Vec<_>>().join(" ")).collect();
            let idx = sqlx::query(
                "SELECT indexname::text, indexdef FROM pg_indexes WHERE schemaname = 'public' \
                 AND tablename <> '_sqlx_migrations' ORDER BY indexname",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            out.extend(idx.iter().map(|r| format!("index {}: {}", r.get::<String, _>(0), r.get::<String, _>(1))));
            out
        }
    };
    pool.close().await;
    assert!(rows.len() > 20, "the schema was read: {rows:?}");
    rows
}

// ---------------------------------------------------------------------------------------------------------------
// Upgrades keep the data.

async fn todays_database_upgrades(db: Db) {
    let s = store(db).await;
    s.make_like_today().await;
    let pool = s.pool().await;
    insert_rows(&pool).await;
    pool.close().await;

    let meta = breakwater::meta::open(&s.url).await.expect("a database made before migrations opens");
    check_rows(meta).await;
    let pool = s.pool().await;
    assert_eq!(applied(&pool).await, VERSIONS);
    pool.close().await;
    // Opening again applies nothing and changes nothing.
    let meta = breakwater::meta::open(&s.url).await.unwrap();
    assert_eq!(meta.job("mirror").await.unwrap().unwrap().retries, 2);

    // The upgraded database has exactly the schema of a new one.
    let fresh = store(db).await;
    breakwater::meta::open(&fresh.url).await.unwrap();
    assert_eq!(schema_of(&s).await, schema_of(&fresh).await);
}

#[tokio::test]
async fn sqlite_database_made_before_migrations_upgrades_with_its_data() {
    todays_database_upgrades(Db::Sqlite).await;
}

#[tokio::test]
async fn postgres_database_made_before_migrations_upgrades_with_its_data() {
    todays_database_upgrades(Db::Postgres).await;
}

async fn first_migration_database_upgrades(db: Db) {
    let s = store(db).await;
    s.make_at_migration_1().await;
    let pool = s.pool().await;
    insert_rows(&pool).await;
    pool.close().await;
    let meta = breakwater::meta::open(&s.url).await.expect("a database at migration 1 opens");
    check_rows(meta).await;
    let pool = s.pool().await;
    assert_eq!(applied(&pool).await, VERSIONS);
    pool.close().await;
}

#[tokio::test]
async fn sqlite_database_at_migration_1_takes_the_later_ones_and_keeps_its_data() {
    first_migration_database_upgrades(Db::Sqlite).await;
}

#[tokio::test]
async fn postgres_database_at_migration_1_takes_the_later_ones_and_keeps_its_data() {
    first_migration_database_upgrades(Db::Postgres).await;
}

/// Migration 1 is the schema the code before migrations made, exactly: the same columns, types, collations,
/// keys and indexes.
async fn first_migration_is_todays_schema(db: Db) {
    let today = store(db).await;
    today.make_like_today().await;
    let first = store(db).await;
    first.make_at_migration_1().await;
    assert_eq!(schema_of(&today).await, schema_of(&first).await);
}

#[tokio::test]
async fn sqlite_first_migration_is_the_schema_made_before_migrations() {
    first_migration_is_todays_schema(Db::Sqlite).await;
}

#[tokio::test]
async fn postgres_first_migration_is_the_schema_made_before_migrations() {
    first_migration_is_todays_schema(Db::Postgres).await;
}

/// A database that a newer breakwater migrated (a version this one does not have) is refused, not half used.
async fn newer_database_is_refused(db: Db) {
    let s = store(db).await;
    breakwater::meta::open(&s.url).await.unwrap();
    let pool = s.pool().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (999, 'from the future', TRUE, $1, 0)",
    )
    .bind(vec![0u8; 48])
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let err = breakwater::meta::open(&s.url).await.err().expect("refused");
    assert!(err.to_string().contains("999"), "the error names the unknown migration: {err}");
}

#[tokio::test]
async fn sqlite_database_from_a_newer_breakwater_is_refused() {
    newer_database_is_refused(Db::Sqlite).await;
}

#[tokio::test]
async fn postgres_database_from_a_newer_breakwater_is_refused() {
    newer_database_is_refused(Db::Postgres).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Several instances starting at once.

/// Starts `n` `breakwater serve` processes at once on one database; each either prints its listening line or
/// exits, and what every one of them did is returned (its stderr when it did not come up).
fn serve_at_once(n: usize, data: &Path, metadata: Option<&str>) -> Vec<Result<Child, String>> {
    let logs = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    for i in 0..n {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_breakwater"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"]).arg(data);
        if let Some(m) = metadata {
            cmd.args(["--metadata", m]);
        }
        let err = std::fs::File::create(logs.path().join(format!("{i}.log"))).unwrap();
        let child = cmd.env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::from(err)).spawn().unwrap();
        children.push(child);
    }
    let mut out = Vec::new();
    for (i, mut child) in children.into_iter().enumerate() {
        use std::io::BufRead;
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        // The first line is the listening line, or nothing (EOF) if the process exited.
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        if line.starts_with("breakwater listening on ") {
            out.push(Ok(child));
        } else {
            let _ = child.wait();
            out.push(Err(std::fs::read_to_string(logs.path().join(format!("{i}.log"))).unwrap_or_default()));
        }
    }
    out
}

/// Every process came up; stops them.
fn all_came_up(round: usize, results: Vec<Result<Child, String>>) {
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Err(log) => failures.push(log),
        }
    }
    assert!(failures.is_empty(), "round {round}: {} instance(s) failed to start:\n{}", failures.len(), failures.join("\n---\n"));
}

const ROUNDS: usize = 8;
const INSTANCES: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_instances_starting_at_once_all_migrate_safely() {
    sqlx::any::install_default_drivers();
    for round in 0..ROUNDS {
        let s = store(Db::Sqlite).await;
        let data = s.dir.as_ref().unwrap().path().to_path_buf();
        // Every other round starts from a database made before migrations, with rows in it.
        let legacy = round % 2 == 1;
        if legacy {
            s.make_like_today().await;
            let pool = s.pool().await;
            insert_rows(&pool).await;
            pool.close().await;
            store_cached_bytes(&data);
        }
        let results = tokio::task::spawn_blocking(move || serve_at_once(INSTANCES, &data, None)).await.unwrap();
        all_came_up(round, results);
        let pool = s.pool().await;
        assert_eq!(applied(&pool).await, VERSIONS, "round {round}");
        pool.close().await;
        if legacy {
            check_rows(breakwater::meta::open(&s.url).await.unwrap()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_instances_starting_at_once_all_migrate_safely() {
    for round in 0..ROUNDS {
        let s = store(Db::Postgres).await;
        let legacy = round % 2 == 1;
        if legacy {
            s.make_like_today().await;
            let pool = s.pool().await;
            insert_rows(&pool).await;
            pool.close().await;
        }
        let data = tempfile::tempdir().unwrap();
        if legacy {
            store_cached_bytes(data.path());
        }
        let url = s.url.clone();
        let dir = data.path().to_path_buf();
        let results = tokio::task::spawn_blocking(move || serve_at_once(INSTANCES, &dir, Some(&url))).await.unwrap();
        all_came_up(round, results);
        let pool = s.pool().await;
        assert_eq!(applied(&pool).await, VERSIONS, "round {round}");
        pool.close().await;
        if legacy {
            check_rows(breakwater::meta::open(&s.url).await.unwrap()).await;
        }
    }
}

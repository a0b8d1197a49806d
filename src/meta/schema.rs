//! The schema, as versioned migrations compiled into the binary (nothing is read from disk at run time).
//!
//! `migrations/sqlite/` and `migrations/postgres/` hold the same changes in each dialect; they differ only where
//! the dialects do (names and tags use the "C" collation on PostgreSQL, so that they sort byte-wise there too).
//! Migration 1 is the schema breakwater created at start-up before it had migrations, verbatim: every statement
//! is `IF NOT EXISTS`, so a database made by that code (its tables present, no `_sqlx_migrations`) takes it as a
//! no-op, keeps its rows, and goes on to the later migrations. sqlx records every applied migration with its
//! checksum in `_sqlx_migrations`: an applied migration must never be edited (start-up refuses a changed one),
//! and a breakwater refuses a database that a newer one migrated (it does not know the newer versions).

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::AnyPool;

use super::MetaError;

/// Which SQL dialect the pool speaks; only the schema differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

/// One migration: version, description, SQL.
type Step = (i64, &'static str, &'static str);

const SQLITE: &[Step] = &[
    (1, "schema", include_str!("../../migrations/sqlite/0001_schema.sql")),
    (2, "replication retries", include_str!("../../migrations/sqlite/0002_replication_retries.sql")),
    (3, "robots", include_str!("../../migrations/sqlite/0003_robots.sql")),
    (4, "garbage collection", include_str!("../../migrations/sqlite/0004_gc.sql")),
    (5, "retention", include_str!("../../migrations/sqlite/0005_retention.sql")),
    (6, "cluster members", include_str!("../../migrations/sqlite/0006_members.sql")),
    (7, "pushed claims", include_str!("../../migrations/sqlite/0007_pushed_claims.sql")),
    (8, "gc indexes", include_str!("../../migrations/sqlite/0008_gc_indexes.sql")),
    (9, "cache checks", include_str!("../../migrations/sqlite/0009_cache_checks.sql")),
    (10, "replication walks", include_str!("../../migrations/sqlite/0010_replication_walks.sql")),
    (11, "replication units", include_str!("../../migrations/sqlite/0011_replication_units.sql")),
];

const POSTGRES: &[Step] = &[
    (1, "schema", include_str!("../../migrations/postgres/0001_schema.sql")),
    (2, "replication retries", include_str!("../../migrations/postgres/0002_replication_retries.sql")),
    (3, "robots", include_str!("../../migrations/postgres/0003_robots.sql")),
    (4, "garbage collection", include_str!("../../migrations/postgres/0004_gc.sql")),
    (5, "retention", include_str!("../../migrations/postgres/0005_retention.sql")),
    (6, "cluster members", include_str!("../../migrations/postgres/0006_members.sql")),
    (7, "pushed claims", include_str!("../../migrations/postgres/0007_pushed_claims.sql")),
    (8, "gc indexes", include_str!("../../migrations/postgres/0008_gc_indexes.sql")),
    (9, "cache checks", include_str!("../../migrations/postgres/0009_cache_checks.sql")),
    (10, "replication walks", include_str!("../../migrations/postgres/0010_replication_walks.sql")),
    (11, "replication units", include_str!("../../migrations/postgres/0011_replication_units.sql")),
];

/// The migrations of one dialect, as sqlx's migrator takes them (`sqlx::migrate!` would do the same at compile
/// time, but it needs sqlx's macros, which build both database drivers a second time for the compiler).
#[derive(Debug)]
struct Embedded(&'static [Step]);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        let steps = self.0;
        Box::pin(async move {
            Ok(steps
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(version, Cow::Borrowed(description), MigrationType::Simple, Cow::Borrowed(sql), false)
                })
                .collect())
        })
    }
}

/// Brings the database's schema up to date. Safe when several instances start at once on one database.
pub(super) async fn migrate(pool: &AnyPool, dialect: Dialect) -> Result<(), MetaError> {
    match dialect {
        Dialect::Postgres => {
            // sqlx holds a PostgreSQL advisory lock (per database) while it checks and applies migrations: a
            // second instance waits, then finds nothing left to apply.
            Migrator::new(Embedded(POSTGRES)).await?.run(pool).await?;
        }
        Dialect::Sqlite => {
            // sqlx takes no lock on SQLite, so two processes could both find a migration unapplied and both run
            // it (the second then fails on its bookkeeping row, or on a snapshot that is no longer current). The
            // whole run is one `BEGIN IMMEDIATE` transaction instead: it holds SQLite's write lock from the
            // start, a second process waits for it (busy_timeout) and then reads the finished state. sqlx runs
            // each migration in a savepoint inside it.
            let migrator = Migrator::new(Embedded(SQLITE)).await?;
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            migrator.run(&mut *tx).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

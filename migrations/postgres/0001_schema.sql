-- The schema as breakwater created it before versioned migrations, verbatim: every statement is idempotent
-- (IF NOT EXISTS), so this applies cleanly to a database that code already made, keeping its data.
-- Names and tags use the "C" collation: they sort byte-wise, as `last=` pagination assumes.
CREATE TABLE IF NOT EXISTS repositories (name TEXT COLLATE "C" PRIMARY KEY, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS blob_links (repo TEXT COLLATE "C" NOT NULL, digest TEXT NOT NULL, size BIGINT NOT NULL, created_at BIGINT NOT NULL, PRIMARY KEY (repo, digest));
CREATE INDEX IF NOT EXISTS blob_links_digest ON blob_links (digest);
CREATE TABLE IF NOT EXISTS manifests (repo TEXT COLLATE "C" NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL, size BIGINT NOT NULL, subject TEXT, artifact_type TEXT, annotations TEXT, created_at BIGINT NOT NULL, PRIMARY KEY (repo, digest));
CREATE INDEX IF NOT EXISTS manifests_digest ON manifests (digest);
CREATE INDEX IF NOT EXISTS manifests_subject ON manifests (repo, subject);
CREATE TABLE IF NOT EXISTS tags (repo TEXT COLLATE "C" NOT NULL, tag TEXT COLLATE "C" NOT NULL, digest TEXT NOT NULL, updated_at BIGINT NOT NULL, PRIMARY KEY (repo, tag));
CREATE TABLE IF NOT EXISTS uploads (id TEXT PRIMARY KEY, repo TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS cache_blobs (digest TEXT PRIMARY KEY, size BIGINT NOT NULL, last_access BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS cache_blobs_access ON cache_blobs (last_access);
CREATE TABLE IF NOT EXISTS replication_jobs (name TEXT PRIMARY KEY, mark TEXT COLLATE "C", position TEXT COLLATE "C", pending TEXT NOT NULL, status TEXT NOT NULL, pages BIGINT NOT NULL, repos_seen BIGINT NOT NULL, repos_matched BIGINT NOT NULL, copied BIGINT NOT NULL, skipped BIGINT NOT NULL, failed BIGINT NOT NULL, bytes BIGINT NOT NULL, updated_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS replication_failures (job TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL, reason TEXT NOT NULL, at BIGINT NOT NULL, PRIMARY KEY (job, repo, tag));

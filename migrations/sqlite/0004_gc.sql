-- Garbage collection (src/gc/). What each manifest refers to: its config and layers, an index's child manifests.
-- A digest any row here names is in use, whatever links say; rows go with their manifest.
CREATE TABLE manifest_refs (
    repo TEXT NOT NULL,
    manifest TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (repo, manifest, digest)
);
CREATE INDEX manifest_refs_digest ON manifest_refs (digest, repo);
-- 1 once a manifest's references are in manifest_refs. Manifests stored before this migration have 0 until the
-- collector reads their bytes and records them; until then their repository's links all count as in use.
ALTER TABLE manifests ADD COLUMN refs_indexed BIGINT NOT NULL DEFAULT 0;
-- One row per digest that a write has claimed or a collector is removing: the row every path that makes a
-- digest referenced and the collector lock in turn, so that the two never interleave. `claimed_at` (Unix ms)
-- is the last time a write relied on the digest's bytes; `deleting` is 1 while a collector removes them.
CREATE TABLE blob_state (
    digest TEXT PRIMARY KEY,
    claimed_at BIGINT NOT NULL,
    deleting BIGINT NOT NULL
);
-- Leases: one collector at a time per metadata store (name 'gc'), whoever holds it renewing it while it runs.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

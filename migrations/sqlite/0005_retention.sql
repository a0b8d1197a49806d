-- Retention policies (src/gc/retention.rs). When a tag was last pulled by tag (Unix seconds; 0: never since this
-- migration), written at most once an hour per tag, so that "kept if pulled within" costs no write per pull.
ALTER TABLE tags ADD COLUMN pulled_at BIGINT NOT NULL DEFAULT 0;
-- A repository's tags newest first, paged by (updated_at, tag): the order in which keep_last counts them.
CREATE INDEX tags_age ON tags (repo, updated_at, tag);

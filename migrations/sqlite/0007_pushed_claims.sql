-- When a write that makes a digest referenced outside the pull-through cache (a push, a mount, a pushed
-- manifest or tag) last claimed it, Unix ms; cache fills only move `claimed_at`. Cache eviction leaves a digest
-- claimed this way recently alone (another instance's push may be about to link it), while a fill's own claim
-- does not stop eviction from removing what it filled.
ALTER TABLE blob_state ADD COLUMN pushed_at BIGINT NOT NULL DEFAULT 0;

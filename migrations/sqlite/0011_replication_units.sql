-- Distributed replication (issue 13 item 4): a job's work as units in a queue that any worker claims. A unit is
-- one key range of the source's catalog, `(range_start, range_end]` (NULL: the catalog's start / end);
-- `position` is its checkpoint (the last name handed on) and `pending` (JSON list) the repositories handed on
-- and not finished at its last save. `state`: pending, claimed, done, failed. `epoch` grows at every claim and
-- fences saves: a worker whose lease lapsed carries an older one. `attempts` counts failed attempts, and
-- `not_before` (Unix milliseconds) holds a failed unit back for its backoff.
CREATE TABLE replication_units (job TEXT NOT NULL, unit BIGINT NOT NULL, range_start TEXT, range_end TEXT, position TEXT, pending TEXT NOT NULL, state TEXT NOT NULL, attempts BIGINT NOT NULL, epoch BIGINT NOT NULL, claimed_by TEXT, not_before BIGINT NOT NULL, copied BIGINT NOT NULL, skipped BIGINT NOT NULL, bytes BIGINT NOT NULL, error TEXT, PRIMARY KEY (job, unit));

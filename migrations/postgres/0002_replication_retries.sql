-- How many runs have retried a replication pass's failures after its walk ended. A scheduled run retries a
-- failed pass's failures (rather than walking the whole source again) once; after that it starts a new pass, so
-- that an item which keeps failing cannot stop a schedule from copying what is new. Existing jobs start at 0.
ALTER TABLE replication_jobs ADD COLUMN retries BIGINT NOT NULL DEFAULT 0;

-- What the cluster's members last learnt from upstream about a cached reference (src/meta/checks.rs): a tag
-- confirmed at `checked_at` (found = 1) is fresh for the upstream's tag TTL on every member, a reference the
-- upstream did not have (found = 0) is answered 404 for the negative TTL. Unix milliseconds.
CREATE TABLE cache_checks (
    repo TEXT NOT NULL,
    reference TEXT NOT NULL,
    checked_at BIGINT NOT NULL,
    found BIGINT NOT NULL,
    PRIMARY KEY (repo, reference)
);

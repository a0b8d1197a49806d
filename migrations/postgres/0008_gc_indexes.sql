-- Indexes for the collector's checks (src/meta/collect.rs): the manifests whose references are not recorded
-- yet, by repository (every blob's check asks whether its repositories hold one: without this, a scan of the
-- repository's manifests per blob), and tags by the manifest they point at (the untagged policy, retention and
-- manifest deletes look tags up by digest).
CREATE INDEX manifests_unindexed ON manifests (repo) WHERE refs_indexed = 0;
CREATE INDEX tags_digest ON tags (repo, digest);

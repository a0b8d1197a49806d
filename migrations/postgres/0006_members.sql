-- Cluster members (src/cluster/): each running member's row, rewritten at every heartbeat; a member whose
-- heartbeat stopped counts as gone, and its row is removed by the others after a while.
CREATE TABLE members (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

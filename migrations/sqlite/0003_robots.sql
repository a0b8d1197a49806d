-- Robot tokens for CI: a name, the SHA-256 of its secret (the secret is shown once, when it is created, and
-- never stored), the scopes it may use (`GLOB:ACTIONS`, space-separated), and when it expires or was revoked.
CREATE TABLE robots (
    name TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);

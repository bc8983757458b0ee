-- The cluster's key store and shared secrets, in PostgreSQL: the tables of
-- dockmirror/auth/schema.sql (version 2), with PostgreSQL's types.
-- Idempotent: every node runs it at start, under an advisory lock.

CREATE TABLE IF NOT EXISTS keys (
    app_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    -- HMAC-SHA256 of the apiKey under a per-key random salt; never the key itself.
    salt BYTEA NOT NULL,
    secret_hash BYTEA NOT NULL,
    -- JSON list of UPSTREAM/PREFIX this key may pull from; NULL: everything.
    repositories TEXT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    -- The key that replaced this one, when it was rotated.
    replaced_by TEXT REFERENCES keys (app_id),
    last_used_at BIGINT,
    use_count BIGINT NOT NULL DEFAULT 0,
    bytes_served BIGINT NOT NULL DEFAULT 0,
    -- Who the key belongs to: a portal identity (github:octocat) or 'operator'.
    owner TEXT NOT NULL DEFAULT 'operator'
);

CREATE INDEX IF NOT EXISTS keys_owner ON keys (owner);

-- Requests and bytes per key and UTC day (days since the epoch), every node's added up.
CREATE TABLE IF NOT EXISTS key_usage_daily (
    app_id TEXT NOT NULL REFERENCES keys (app_id),
    day BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (app_id, day)
);

-- Requests answered per hour (hours since the epoch), all clients of all nodes.
CREATE TABLE IF NOT EXISTS traffic_hourly (
    hour BIGINT PRIMARY KEY,
    requests BIGINT NOT NULL
);

-- Secrets every node shares, made by the first node that needs one:
-- 'token-signing-key' is the PEM of the P-256 key that signs bearer tokens.
CREATE TABLE IF NOT EXISTS cluster_secrets (
    name TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

-- The dockmirror key store, schema version 2 (upgrade-2.sql brings version 1 here).
-- Idempotent, so that two processes creating the database at once agree.
BEGIN IMMEDIATE;

CREATE TABLE IF NOT EXISTS version (version INTEGER NOT NULL);
INSERT INTO version (version) SELECT 2 WHERE NOT EXISTS (SELECT 1 FROM version);

CREATE TABLE IF NOT EXISTS keys (
    app_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    -- HMAC-SHA256 of the apiKey under a per-key random salt; never the key itself.
    salt BLOB NOT NULL,
    secret_hash BLOB NOT NULL,
    -- JSON list of UPSTREAM/PREFIX this key may pull from; NULL: everything.
    repositories TEXT,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    -- The key that replaced this one, when it was rotated.
    replaced_by TEXT REFERENCES keys (app_id),
    last_used_at INTEGER,
    use_count INTEGER NOT NULL DEFAULT 0,
    bytes_served INTEGER NOT NULL DEFAULT 0,
    -- Who the key belongs to: a portal identity (github:octocat) or 'operator'.
    owner TEXT NOT NULL DEFAULT 'operator'
);

CREATE INDEX IF NOT EXISTS keys_owner ON keys (owner);

-- Requests and bytes per key and UTC day (days since the epoch), kept for USAGE_DAYS.
CREATE TABLE IF NOT EXISTS key_usage_daily (
    app_id TEXT NOT NULL REFERENCES keys (app_id),
    day INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (app_id, day)
) WITHOUT ROWID;

-- Requests answered per hour (hours since the epoch), all clients, kept for TRAFFIC_HOURS.
CREATE TABLE IF NOT EXISTS traffic_hourly (
    hour INTEGER PRIMARY KEY,
    requests INTEGER NOT NULL
);

COMMIT;

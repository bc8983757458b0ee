-- The dockmirror key store, schema version 1.
-- Idempotent, so that two processes creating the database at once agree.
BEGIN IMMEDIATE;

CREATE TABLE IF NOT EXISTS version (version INTEGER NOT NULL);
INSERT INTO version (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM version);

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
    bytes_served INTEGER NOT NULL DEFAULT 0
);

COMMIT;

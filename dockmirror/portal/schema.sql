-- The portal's own database: sessions, sign-ins in progress, and users.
-- Idempotent, so that two processes creating the database at once agree.
BEGIN IMMEDIATE;

CREATE TABLE IF NOT EXISTS version (version INTEGER NOT NULL);
INSERT INTO version (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM version);

-- A signed-in browser; only a SHA-256 of the session id is kept.
CREATE TABLE IF NOT EXISTS sessions (
    id_hash BLOB PRIMARY KEY,
    identity TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_identity ON sessions (identity);

-- A sign-in sent to a provider and not back yet, by a SHA-256 of its OAuth state.
CREATE TABLE IF NOT EXISTS logins (
    state_hash BLOB PRIMARY KEY,
    provider TEXT NOT NULL,
    verifier TEXT NOT NULL,
    nonce TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

-- Everyone who signed in once, and who may not any more.
CREATE TABLE IF NOT EXISTS users (
    identity TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    disabled_at INTEGER
);

COMMIT;

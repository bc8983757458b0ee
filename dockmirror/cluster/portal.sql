-- The portal's sessions, sign-ins in progress and users, in PostgreSQL: the
-- tables of dockmirror/portal/schema.sql, with PostgreSQL's types.
-- Idempotent: every node runs it before its first portal query, under an advisory lock.

-- A signed-in browser; only a SHA-256 of the session id is kept.
CREATE TABLE IF NOT EXISTS portal_sessions (
    id_hash BYTEA PRIMARY KEY,
    identity TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS portal_sessions_identity ON portal_sessions (identity);

-- A sign-in sent to a provider and not back yet, by a SHA-256 of its OAuth state:
-- the callback may come back to any node, and is taken once.
CREATE TABLE IF NOT EXISTS portal_logins (
    state_hash BYTEA PRIMARY KEY,
    provider TEXT NOT NULL,
    verifier TEXT NOT NULL,
    nonce TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS portal_logins_created ON portal_logins (created_at);

-- Everyone who signed in once, and who may not any more.
CREATE TABLE IF NOT EXISTS portal_users (
    identity TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    disabled_at BIGINT
);

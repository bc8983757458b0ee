-- The cache index, version 5.  Blob files on disk are the truth for what is
-- cached; these rows add what a file cannot say, and are checked against
-- the files at start.
CREATE TABLE version (version INTEGER NOT NULL);
INSERT INTO version VALUES (5);

-- Every file under blobs/, layers and manifests alike; "used" orders the LRU.
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    used REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX blobs_used ON blobs (used);

-- The media type of the blobs that are manifests.
CREATE TABLE manifests (
    digest TEXT PRIMARY KEY,
    media_type TEXT NOT NULL
) WITHOUT ROWID;

-- Digests an upstream repository proved it has (its answer to a HEAD or a
-- GET of the blob): only these are served from the cache through it.
CREATE TABLE access (
    origin TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (origin, digest)
) WITHOUT ROWID;

-- What a tag pointed to, per media type, and when the upstream said so.
CREATE TABLE tags (
    origin TEXT NOT NULL,
    tag TEXT NOT NULL,
    media_type TEXT NOT NULL,
    digest TEXT NOT NULL,
    checked REAL NOT NULL,
    PRIMARY KEY (origin, tag, media_type)
) WITHOUT ROWID;

-- The objects of the shared storage tier ([storage] backend = "s3") that
-- this node knows of; "used" orders the bucket's LRU.
CREATE TABLE storage_objects (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    used REAL NOT NULL
) WITHOUT ROWID;

-- How far the node applied its cluster's purges (see dockmirror/cluster/index.py):
-- the id of the last one in PostgreSQL's cache_purges, and when it last read them.
CREATE TABLE cluster_purges (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    applied INTEGER NOT NULL,
    polled REAL NOT NULL
);

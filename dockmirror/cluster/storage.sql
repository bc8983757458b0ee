-- The storage bucket's records, shared by the nodes of a cluster (see dockmirror/cluster/storage.py).
-- Applied at every start; each statement is idempotent.

-- The objects the bucket holds: one quota, one LRU order for the whole cluster.
CREATE TABLE IF NOT EXISTS storage_objects (
    digest text PRIMARY KEY,
    size   bigint NOT NULL,
    used   timestamptz NOT NULL DEFAULT now(),
    stored timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS storage_objects_used ON storage_objects (used);

-- Bytes reserved by uploads in progress (by node_url#pid); renewed while they run.
CREATE TABLE IF NOT EXISTS storage_uploads (
    digest   text PRIMARY KEY,
    node_url text NOT NULL,
    size     bigint NOT NULL,
    expires  timestamptz NOT NULL
);

-- Which node (and which process of it: node_url#pid) reads which object now (streams, fills from the bucket, presigned URLs handed
-- out); a node renews its own while it reads.  No object with a live row is evicted.
CREATE TABLE IF NOT EXISTS storage_readers (
    digest   text NOT NULL,
    node_url text NOT NULL,
    expires  timestamptz NOT NULL,
    PRIMARY KEY (digest, node_url)
);

-- When a node last began to list the bucket to reconcile these records with it (one node
-- a day), and how many listings failed in a row (the one in progress among them): the
-- next is tried minutes after a failure, less often as they go on.
CREATE TABLE IF NOT EXISTS storage_listing (
    id     integer PRIMARY KEY CHECK (id = 1),
    listed timestamptz NOT NULL
);
ALTER TABLE storage_listing ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0;

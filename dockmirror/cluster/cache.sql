-- The cache's state shared by the nodes of a cluster (see dockmirror/cluster/).
-- Applied at every start; each statement is idempotent.

-- Who fills what now: written by the node holding the digest's advisory lock.
-- A row outlives a node killed mid-fill; the next holder of the lock replaces it.
CREATE TABLE IF NOT EXISTS fills (
    digest   text PRIMARY KEY,
    node_url text NOT NULL,
    size     bigint NOT NULL,
    started  timestamptz NOT NULL DEFAULT now()
);

-- Which node holds which verified blob in its local cache, and when it was last read.
CREATE TABLE IF NOT EXISTS cache_blobs (
    digest   text NOT NULL,
    node_url text NOT NULL,
    size     bigint NOT NULL,
    used     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (digest, node_url)
);

-- Which upstream repository (origin) proved, by its own answer, that it holds which digest.
CREATE TABLE IF NOT EXISTS cache_access (
    origin text NOT NULL,
    digest text NOT NULL,
    PRIMARY KEY (origin, digest)
);
CREATE INDEX IF NOT EXISTS cache_access_digest ON cache_access (digest);

-- What a tag pointed to, per media type, with the manifest itself, so that a tag
-- resolved by one node is fresh on all until its TTL runs out.
CREATE TABLE IF NOT EXISTS cache_tags (
    origin     text NOT NULL,
    tag        text NOT NULL,
    media_type text NOT NULL,
    digest     text NOT NULL,
    manifest   bytea NOT NULL,
    resolved   double precision NOT NULL,
    PRIMARY KEY (origin, tag, media_type)
);

-- The last result of each piece of work done once for the whole cluster (a tag's
-- fetch or revalidation, a blob's HEAD), left by the node that did it as it lets go
-- of its claim, for a node taking the claim just after.  Rows older than a minute go.
CREATE TABLE IF NOT EXISTS flights (
    flight text PRIMARY KEY,
    result text[] NOT NULL,
    done   timestamptz NOT NULL DEFAULT now()
);

-- The secret node-to-node requests carry, unless [cluster] secret_file names one.
CREATE TABLE IF NOT EXISTS cluster_secret (
    id     integer PRIMARY KEY CHECK (id = 1),
    secret text NOT NULL
);

-- What the operator purged (a repository or a digest), for the processes whose
-- notification of it was lost: each reads those of the last minutes.  Rows go hourly.
CREATE TABLE IF NOT EXISTS cache_purges (
    id     bigserial PRIMARY KEY,
    what   text NOT NULL,
    origin text NOT NULL,
    made   timestamptz NOT NULL DEFAULT now()
);

-- Version 3 to 4: workers sharing the cache evict the blobs least recently
-- used by any of them, read in "used" order.
CREATE INDEX blobs_used ON blobs (used);
UPDATE version SET version = 4;

-- Version 2 to 3: the objects of the shared storage tier, for its quota.
CREATE TABLE storage_objects (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    used REAL NOT NULL
) WITHOUT ROWID;
UPDATE version SET version = 3;

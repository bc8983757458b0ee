-- Version 4 to 5: how far the node applied its cluster's purges, so that a
-- node restarted applies those made while it was down.
CREATE TABLE cluster_purges (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    applied INTEGER NOT NULL,
    polled REAL NOT NULL
);
UPDATE version SET version = 5;

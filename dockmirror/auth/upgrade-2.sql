-- Key store schema version 1 to 2: key owners, daily usage per key, hourly traffic.
-- Run inside the transaction that checked the version is still 1.
ALTER TABLE keys ADD COLUMN owner TEXT NOT NULL DEFAULT 'operator';
CREATE INDEX keys_owner ON keys (owner);
CREATE TABLE key_usage_daily (
    app_id TEXT NOT NULL REFERENCES keys (app_id),
    day INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (app_id, day)
) WITHOUT ROWID;
CREATE TABLE traffic_hourly (
    hour INTEGER PRIMARY KEY,
    requests INTEGER NOT NULL
);
UPDATE version SET version = 2;

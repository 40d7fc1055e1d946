-- See the MySQL migration: jobs stamped with the relay that publishes them,
-- and each relay's watermark and heartbeat.
ALTER TABLE jobs ADD COLUMN accepted_by INTEGER NULL;

CREATE TABLE relay_watermarks (
    relay_id          INTEGER NOT NULL PRIMARY KEY,
    published_through INTEGER NOT NULL,
    heartbeat_at      INTEGER NOT NULL,
    stamps_until      INTEGER NOT NULL
);

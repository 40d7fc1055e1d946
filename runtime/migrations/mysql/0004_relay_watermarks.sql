-- Jobs an API's publish relay publishes start `Queued`, stamped with the relay
-- (accepted_by) instead of being marked `Queued` one by one after their
-- publish. Each relay records here, once per beat, that every job it stamped
-- at or before published_through is on the queue, and that it stamps nothing
-- after stamps_until unless it beats again; when its heartbeat stops, the
-- sweeper republishes its jobs in between (runtime/src/domain/watermark.rs).
ALTER TABLE jobs ADD COLUMN accepted_by BIGINT NULL;

CREATE TABLE relay_watermarks (
    relay_id          BIGINT NOT NULL PRIMARY KEY,
    published_through BIGINT NOT NULL,
    heartbeat_at      BIGINT NOT NULL,
    stamps_until      BIGINT NOT NULL
) ENGINE = InnoDB;

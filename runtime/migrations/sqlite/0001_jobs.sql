CREATE TABLE jobs (
    id              TEXT    NOT NULL PRIMARY KEY,
    client_id       TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    input_key       TEXT    NOT NULL,
    content_type    TEXT    NOT NULL,
    input_sha256    TEXT    NOT NULL,
    input_bytes     INTEGER NOT NULL,
    idempotency_key TEXT    NULL,
    result          TEXT    NULL,
    error           TEXT    NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX jobs_status_updated ON jobs (status, updated_at);

CREATE TABLE idempotency_keys (
    client_id      TEXT    NOT NULL,
    idem_key       TEXT    NOT NULL,
    request_sha256 TEXT    NOT NULL,
    job_id         TEXT    NULL,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (client_id, idem_key)
);

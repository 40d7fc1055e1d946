CREATE TABLE jobs (
    id              CHAR(36)     NOT NULL PRIMARY KEY,
    client_id       VARCHAR(128) NOT NULL,
    status          VARCHAR(16)  NOT NULL,
    attempts        INT          NOT NULL DEFAULT 0,
    input_key       VARCHAR(512) NOT NULL,
    content_type    VARCHAR(128) NOT NULL,
    input_sha256    CHAR(64)     NOT NULL,
    input_bytes     BIGINT       NOT NULL,
    idempotency_key VARCHAR(255) NULL,
    result          LONGTEXT     NULL,
    error           TEXT         NULL,
    created_at      BIGINT       NOT NULL,
    updated_at      BIGINT       NOT NULL,
    KEY jobs_status_updated (status, updated_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE idempotency_keys (
    client_id      VARCHAR(128) NOT NULL,
    idem_key       VARCHAR(255) NOT NULL,
    request_sha256 CHAR(64)     NOT NULL,
    job_id         CHAR(36)     NULL,
    created_at     BIGINT       NOT NULL,
    PRIMARY KEY (client_id, idem_key)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

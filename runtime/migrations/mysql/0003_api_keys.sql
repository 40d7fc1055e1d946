-- API keys made with `ocr-runtime keys create`: the key itself is never
-- stored, only the SHA-256 of the whole token (keys are 256 random bits, so a
-- fast hash is as safe as a slow one and costs nothing per request).
CREATE TABLE api_keys (
    id         CHAR(16)     NOT NULL PRIMARY KEY,
    tenant     VARCHAR(128) NOT NULL,
    key_sha256 CHAR(64)     NOT NULL,
    created_at BIGINT       NOT NULL,
    revoked_at BIGINT       NULL,
    KEY api_keys_tenant (tenant)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- The per-tenant quota counts a tenant's unfinished jobs.
CREATE INDEX jobs_client_status ON jobs (client_id, status);

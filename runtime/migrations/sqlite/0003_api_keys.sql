-- API keys made with `ocr-runtime keys create`: only the SHA-256 of the whole
-- token is stored (see the MySQL migration).
CREATE TABLE api_keys (
    id         TEXT    NOT NULL PRIMARY KEY,
    tenant     TEXT    NOT NULL,
    key_sha256 TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER NULL
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);

-- The per-tenant quota counts a tenant's unfinished jobs.
CREATE INDEX jobs_client_status ON jobs (client_id, status);

-- Idempotency keys expire (server.idempotency_key_ttl_ms): the sweeper deletes
-- them by age, which needs this index on a table of one row per keyed request.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

//! API keys in the job database (`ocr-runtime keys create|list|revoke`):
//! one row per key with the SHA-256 of the key, never the key.

use super::jobs::{query_error, JobStore, StoreError};
use crate::domain::tenant::{NewKey, Tenant};
use serde::Serialize;
use sqlx::Row;

/// A stored key as `keys list` shows it: no secret, not even its hash.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub tenant: String,
    pub created_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<i64>,
}

/// What a lookup by id finds: the tenant and the hash to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub tenant: String,
    pub key_sha256: String,
    pub revoked: bool,
}

impl JobStore {
    /// Stores `key` for `tenant`; the caller shows the key once.
    pub async fn create_key(
        &self,
        tenant: &Tenant,
        key: &NewKey,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let _timer = self.timer("create_key");
        sqlx::query(
            "INSERT INTO api_keys (id, tenant, key_sha256, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(tenant.as_str())
        .bind(key.sha256())
        .bind(now_ms)
        .execute(self.pool())
        .await
        .map_err(query_error("create API key"))?;
        Ok(())
    }

    pub async fn find_key(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let _timer = self.timer("find_key");
        let row = sqlx::query("SELECT tenant, key_sha256, revoked_at FROM api_keys WHERE id = ?")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("find API key"))?;
        row.map(|row| {
            let revoked_at: Option<i64> = row
                .try_get("revoked_at")
                .map_err(query_error("read API key"))?;
            Ok(StoredKey {
                tenant: row.try_get("tenant").map_err(query_error("read API key"))?,
                key_sha256: row
                    .try_get("key_sha256")
                    .map_err(query_error("read API key"))?,
                revoked: revoked_at.is_some(),
            })
        })
        .transpose()
    }

    /// Every key, oldest first; revoked ones included (they say when).
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        let _timer = self.timer("list_keys");
        let rows = sqlx::query(
            "SELECT id, tenant, created_at, revoked_at FROM api_keys ORDER BY created_at, id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list API keys"))?;
        rows.iter()
            .map(|row| {
                Ok(KeyInfo {
                    id: row.try_get("id").map_err(query_error("read API key"))?,
                    tenant: row.try_get("tenant").map_err(query_error("read API key"))?,
                    created_at_ms: row
                        .try_get("created_at")
                        .map_err(query_error("read API key"))?,
                    revoked_at_ms: row
                        .try_get("revoked_at")
                        .map_err(query_error("read API key"))?,
                })
            })
            .collect()
    }

    /// Revokes a key by id (or by the whole key). `false`: no such key, or
    /// already revoked.
    pub async fn revoke_key(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let _timer = self.timer("revoke_key");
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now_ms)
                .bind(id)
                .execute(self.pool())
                .await
                .map_err(query_error("revoke API key"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Keys not revoked (the standalone server makes one when there is none).
    pub async fn count_active_keys(&self) -> Result<u64, StoreError> {
        let _timer = self.timer("count_keys");
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_keys WHERE revoked_at IS NULL")
            .fetch_one(self.pool())
            .await
            .map_err(query_error("count API keys"))?;
        let n: i64 = row.try_get("n").map_err(query_error("read count"))?;
        Ok(n as u64)
    }
}

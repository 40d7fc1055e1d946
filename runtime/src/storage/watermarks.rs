//! Publish relays' watermarks and heartbeats (see [`crate::domain::watermark`]):
//! one row per running API process, written once per beat.

use super::jobs::{query_error, JobStore, StoreError};
use crate::domain::watermark::RelayId;
use crate::domain::{JobId, JobStatus};
use sqlx::Row;

/// A relay's beat: what it vouches for, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayBeat {
    pub relay: RelayId,
    /// Every job the relay stamped at or before this is on the queue (or `Accepted`).
    pub published_through: i64,
    pub heartbeat_at: i64,
    /// The relay stamps no job after this unless a later beat is recorded.
    pub stamps_until: i64,
}

/// Jobs given back per statement: row locks stay short however many there are.
const RETURN_BATCH: i64 = 500;

impl JobStore {
    /// Records a relay's beat, unless a later one is recorded already.
    pub async fn record_beat(&self, beat: RelayBeat) -> Result<(), StoreError> {
        let _timer = self.timer("relay_beat");
        // Only the relay itself writes its row (the sweeper only deletes it),
        // so update-else-insert needs no dialect's upsert.
        let updated = sqlx::query(
            "UPDATE relay_watermarks SET published_through = ?, heartbeat_at = ?, stamps_until = ? \
             WHERE relay_id = ? AND heartbeat_at <= ?",
        )
        .bind(beat.published_through)
        .bind(beat.heartbeat_at)
        .bind(beat.stamps_until)
        .bind(beat.relay.0)
        .bind(beat.heartbeat_at)
        .execute(self.pool())
        .await
        .map_err(query_error("record relay watermark"))?;
        if updated.rows_affected() > 0 {
            return Ok(());
        }
        let inserted = sqlx::query(
            "INSERT INTO relay_watermarks (relay_id, published_through, heartbeat_at, stamps_until) \
             VALUES (?, ?, ?, ?)",
        )
        .bind(beat.relay.0)
        .bind(beat.published_through)
        .bind(beat.heartbeat_at)
        .bind(beat.stamps_until)
        .execute(self.pool())
        .await;
        match inserted {
            Ok(_) => Ok(()),
            // The row is there with a later beat: it stays.
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Ok(()),
            Err(err) => Err(query_error("register relay")(err)),
        }
    }

    /// Relays whose last beat is older than `heard_before_ms`.
    pub async fn silent_relays(&self, heard_before_ms: i64) -> Result<Vec<RelayBeat>, StoreError> {
        let _timer = self.timer("list");
        let rows = sqlx::query(
            "SELECT relay_id, published_through, heartbeat_at, stamps_until FROM relay_watermarks \
             WHERE heartbeat_at < ? ORDER BY heartbeat_at",
        )
        .bind(heard_before_ms)
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list silent relays"))?;
        rows.iter()
            .map(|row| {
                let get = |column| row.try_get::<i64, _>(column).map_err(query_error(column));
                Ok(RelayBeat {
                    relay: RelayId(get("relay_id")?),
                    published_through: get("published_through")?,
                    heartbeat_at: get("heartbeat_at")?,
                    stamps_until: get("stamps_until")?,
                })
            })
            .collect()
    }

    /// Gives the sweeper the jobs of a silent relay whose message may never
    /// have been sent: its `Queued` jobs stamped after its watermark and at
    /// or before its limit go back to `Accepted`, their time kept (they have
    /// waited since then), so the next sweep publishes them. Read on the
    /// `(status, updated_at)` index (a relay's stamp is its jobs' `updated_at`
    /// until something changes them) and changed by id, a batch at a time.
    /// How many went back.
    pub async fn return_unconfirmed_jobs(&self, beat: &RelayBeat) -> Result<u64, StoreError> {
        let _timer = self.timer("requeue");
        let (from, to) = (JobStatus::Queued, JobStatus::Accepted);
        if !from.can_transition_to(to) {
            return Err(StoreError::IllegalTransition { from, to });
        }
        let mut returned = 0;
        loop {
            let rows = sqlx::query(
                "SELECT id FROM jobs WHERE status = ? AND updated_at > ? AND updated_at <= ? \
                 AND accepted_by = ? ORDER BY updated_at LIMIT ?",
            )
            .bind(from.as_str())
            .bind(beat.published_through)
            .bind(beat.stamps_until)
            .bind(beat.relay.0)
            .bind(RETURN_BATCH)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list a silent relay's jobs"))?;
            if rows.is_empty() {
                return Ok(returned);
            }
            let ids = rows
                .iter()
                .map(|row| {
                    let id: String = row.try_get("id").map_err(query_error("read id"))?;
                    id.parse::<JobId>()
                        .map_err(|_| StoreError::Corrupt(format!("job id {id:?}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let placeholders = vec!["?"; ids.len()].join(", ");
            let sql =
                format!("UPDATE jobs SET status = ? WHERE status = ? AND id IN ({placeholders})");
            let mut update = sqlx::query(&sql).bind(to.as_str()).bind(from.as_str());
            for id in &ids {
                update = update.bind(id.to_string());
            }
            let changed = update
                .execute(self.pool())
                .await
                .map_err(query_error("return a silent relay's jobs"))?;
            returned += changed.rows_affected();
            if (ids.len() as i64) < RETURN_BATCH {
                return Ok(returned);
            }
        }
    }

    /// Removes a silent relay's row once its jobs are returned, unless it
    /// beat again meanwhile. Whether it was removed.
    pub async fn forget_relay(&self, beat: &RelayBeat) -> Result<bool, StoreError> {
        let _timer = self.timer("delete");
        let deleted =
            sqlx::query("DELETE FROM relay_watermarks WHERE relay_id = ? AND heartbeat_at = ?")
                .bind(beat.relay.0)
                .bind(beat.heartbeat_at)
                .execute(self.pool())
                .await
                .map_err(query_error("forget a relay"))?;
        Ok(deleted.rows_affected() > 0)
    }
}

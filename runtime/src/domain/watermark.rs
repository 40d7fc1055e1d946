//! Which of one API instance's jobs are known to be on the queue, without a
//! database write per job.
//!
//! A job the API hands to its publish relay is inserted straight as `Queued`
//! and stamped with the instance and a time. The instance then records, a
//! few times a second and in one row for all its jobs, the *watermark*:
//! every job it stamped at or before that time is settled (its message was
//! acknowledged, or its row went back to `Accepted` for the sweeper). If the
//! instance dies, its jobs stamped after the last watermark it recorded are
//! the only ones that may be in the database without a message, and the
//! sweeper republishes exactly those.

use std::collections::BTreeMap;
use std::time::Duration;

/// One run of one API process's publish relay (a new one at every start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayId(pub i64);

impl RelayId {
    pub fn random() -> Self {
        // A UUIDv7's low half is its 62 random bits (and the variant's two):
        // masked to a positive BIGINT.
        RelayId((uuid::Uuid::now_v7().as_u64_pair().1 & i64::MAX as u64) as i64)
    }
}

impl std::fmt::Display for RelayId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// How often a relay records its watermark. A relay silent for
/// `republish_after` is taken for dead, so it beats several times within it;
/// and at most a quarter second apart, since the jobs a dead relay published
/// after its last beat are republished too (duplicates the workers' claims
/// absorb, but work all the same).
pub fn beat_interval(republish_after: Duration) -> Duration {
    (republish_after / 4).clamp(Duration::from_millis(50), Duration::from_millis(250))
}

/// How far past its last recorded beat a relay may stamp jobs. Each beat
/// records `heartbeat_at + window` as the relay's limit, and the relay
/// stamps nothing beyond the limit of its last beat the database took, so a
/// dead relay's jobs all lie at or before the limit in its row. Several beats
/// long, so a slow beat does not stop stamping; well under `republish_after`,
/// so a relay whose beats fail has stopped stamping long before the sweepers
/// take it for dead (and clocks of different hosts may disagree by the rest).
pub fn stamp_window(republish_after: Duration) -> Duration {
    (4 * beat_interval(republish_after)).min(republish_after / 2)
}

/// The stamps of one instance's jobs that are not settled yet.
#[derive(Debug, Default)]
pub struct PublishWatermark {
    /// The latest stamp handed out: stamps never go back, even when the
    /// system clock does.
    last_stamp: i64,
    /// The highest watermark given out: later stamps are above it, so a
    /// recorded watermark never covers a job stamped after it.
    reported: i64,
    /// Stamp -> jobs with that stamp still waiting for their publish.
    pending: BTreeMap<i64, usize>,
}

impl PublishWatermark {
    pub fn new(now_ms: i64) -> Self {
        PublishWatermark {
            last_stamp: now_ms,
            reported: i64::MIN,
            pending: BTreeMap::new(),
        }
    }

    /// Stamps a job about to be written: its creation time, and the time the
    /// watermark is compared with. `None` past `limit` (the relay's last
    /// recorded beat is too old to vouch for the job).
    pub fn stamp(&mut self, now_ms: i64, limit: i64) -> Option<i64> {
        let stamp = now_ms
            .max(self.last_stamp)
            .max(self.reported.saturating_add(1));
        if stamp > limit {
            return None;
        }
        self.last_stamp = stamp;
        *self.pending.entry(stamp).or_default() += 1;
        Some(stamp)
    }

    /// The job stamped `stamp` no longer needs the sweeper: it was published,
    /// its row was never written, or its row is `Accepted` again.
    pub fn settle(&mut self, stamp: i64) {
        if let Some(count) = self.pending.get_mut(&stamp) {
            *count -= 1;
            if *count == 0 {
                self.pending.remove(&stamp);
            }
        }
    }

    /// Every job stamped at or before this time is settled, now and later:
    /// it never decreases, and jobs stamped from now on are above it.
    pub fn watermark(&mut self) -> i64 {
        let watermark = match self.pending.first_key_value() {
            Some((oldest, _)) => oldest - 1,
            None => self.last_stamp,
        };
        self.reported = self.reported.max(watermark);
        watermark
    }

    /// The relay's clock: `now_ms`, or the last stamp if the system clock
    /// went back since (a beat's time is compared with its jobs' stamps).
    pub fn clock(&self, now_ms: i64) -> i64 {
        now_ms.max(self.last_stamp)
    }

    /// Jobs waiting for their publish.
    pub fn pending(&self) -> usize {
        self.pending.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_stops_below_the_oldest_job_still_being_published() {
        let mut marks = PublishWatermark::new(1_000);
        let first = marks.stamp(1_005, i64::MAX).unwrap();
        let second = marks.stamp(1_010, i64::MAX).unwrap();
        assert_eq!(marks.watermark(), 1_004);
        marks.settle(second);
        assert_eq!(marks.watermark(), 1_004, "the older job is still out");
        marks.settle(first);
        assert_eq!(
            marks.watermark(),
            1_010,
            "all settled: up to the last stamp"
        );
        assert_eq!(marks.pending(), 0);
    }

    #[test]
    fn a_job_stamped_after_a_settled_one_in_the_same_millisecond_is_not_covered() {
        let mut marks = PublishWatermark::new(0);
        let first = marks.stamp(7, i64::MAX).unwrap();
        marks.settle(first);
        let covered = marks.watermark();
        let second = marks.stamp(7, i64::MAX).unwrap();
        assert!(second > covered, "{second} <= {covered}");
        assert!(marks.watermark() >= covered, "the watermark went back");
    }

    #[test]
    fn stamps_never_go_back_when_the_clock_does() {
        let mut marks = PublishWatermark::new(0);
        let late = marks.stamp(5_000, i64::MAX).unwrap();
        let stepped_back = marks.stamp(4_000, i64::MAX).unwrap();
        assert_eq!(stepped_back, late);
        marks.settle(late);
        assert_eq!(marks.watermark(), 4_999, "the other job is pending");
        marks.settle(stepped_back);
        assert_eq!(marks.watermark(), 5_000);
        assert!(
            marks.stamp(4_500, i64::MAX).unwrap() > 5_000,
            "below a recorded watermark"
        );
    }

    #[test]
    fn relays_beat_and_stop_stamping_well_before_they_count_as_silent() {
        for (republish_after_ms, beat_ms, window_ms) in [
            (30_000, 250, 1_000),
            (2_000, 250, 1_000),
            (400, 100, 200),
            (100, 50, 50),
        ] {
            let republish_after = Duration::from_millis(republish_after_ms);
            assert_eq!(
                beat_interval(republish_after),
                Duration::from_millis(beat_ms)
            );
            assert_eq!(
                stamp_window(republish_after),
                Duration::from_millis(window_ms)
            );
        }
    }

    #[test]
    fn nothing_is_stamped_past_the_limit_of_the_last_recorded_beat() {
        let mut marks = PublishWatermark::new(0);
        assert_eq!(marks.stamp(900, 1_000), Some(900));
        assert_eq!(marks.stamp(1_001, 1_000), None);
        assert_eq!(marks.pending(), 1, "a refused job is not waited for");
        assert_eq!(marks.stamp(1_000, 1_000), Some(1_000));
    }

    #[test]
    fn the_watermark_never_decreases_whatever_the_order_of_settling() {
        // Every order of settling five jobs stamped over three milliseconds.
        let stamps_at = [10, 10, 11, 12, 12];
        let mut orders = vec![vec![]];
        for _ in 0..stamps_at.len() {
            orders = orders
                .into_iter()
                .flat_map(|order: Vec<usize>| {
                    (0..stamps_at.len())
                        .filter(|i| !order.contains(i))
                        .map(|i| {
                            let mut next = order.clone();
                            next.push(i);
                            next
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
        }
        for order in orders {
            let mut marks = PublishWatermark::new(0);
            let stamps: Vec<i64> = stamps_at
                .iter()
                .map(|&at| {
                    // Watermarks read between stamps, as the heartbeat does.
                    marks.watermark();
                    marks.stamp(at, i64::MAX).unwrap()
                })
                .collect();
            let mut settled = vec![false; stamps.len()];
            let mut last = marks.watermark();
            for i in order {
                marks.settle(stamps[i]);
                settled[i] = true;
                let now = marks.watermark();
                assert!(now >= last, "went back from {last} to {now}");
                for (j, &stamp) in stamps.iter().enumerate() {
                    if stamp <= now {
                        assert!(settled[j], "job {j} is covered but pending");
                    }
                }
                last = now;
            }
        }
    }
}

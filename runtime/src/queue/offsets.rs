//! Which offset a consumer may commit. Messages of one partition can finish
//! out of order (a micro-batch, a retried job), but a committed offset says
//! "everything before this is done": so each partition commits only up to
//! its highest *contiguous* finished offset. Pure bookkeeping, no I/O.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Default)]
pub struct CommitTracker {
    partitions: HashMap<i32, BTreeMap<i64, bool>>,
}

impl CommitTracker {
    /// A message was handed to the application.
    pub fn received(&mut self, partition: i32, offset: i64) {
        // A redelivered offset is pending again, whatever it was before.
        self.partitions
            .entry(partition)
            .or_default()
            .insert(offset, false);
    }

    /// The message at `offset` is done. Returns the offset to commit (the
    /// next one to read) when the contiguous done prefix grew.
    pub fn completed(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let pending = self.partitions.get_mut(&partition)?;
        // Unknown: the partition was revoked since; its new owner redoes it.
        let done = pending.get_mut(&offset)?;
        *done = true;
        let mut commit = None;
        while let Some(entry) = pending.first_entry() {
            if !*entry.get() {
                break;
            }
            commit = Some(*entry.key() + 1);
            entry.remove();
        }
        commit
    }

    /// The partition went to another consumer: forget what is in flight, so a
    /// late completion cannot commit on the new owner's behalf.
    pub fn revoked(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Messages received and not yet completed, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(|p| p.values().filter(|done| !**done).count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_completion_commits_only_the_contiguous_prefix() {
        let mut tracker = CommitTracker::default();
        for offset in 10..14 {
            tracker.received(0, offset);
        }
        assert_eq!(
            tracker.completed(0, 12),
            None,
            "10 and 11 are still running"
        );
        assert_eq!(tracker.completed(0, 10), Some(11));
        assert_eq!(tracker.completed(0, 11), Some(13), "12 was already done");
        assert_eq!(tracker.completed(0, 13), Some(14));
        assert_eq!(tracker.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut tracker = CommitTracker::default();
        tracker.received(0, 5);
        tracker.received(1, 7);
        assert_eq!(tracker.completed(1, 7), Some(8));
        assert_eq!(tracker.in_flight(), 1);
        assert_eq!(tracker.completed(0, 5), Some(6));
    }

    #[test]
    fn completions_after_a_revocation_commit_nothing() {
        let mut tracker = CommitTracker::default();
        tracker.received(2, 0);
        tracker.revoked(2);
        assert_eq!(tracker.completed(2, 0), None);
        assert_eq!(tracker.in_flight(), 0);
    }

    #[test]
    fn a_redelivered_offset_is_pending_again() {
        let mut tracker = CommitTracker::default();
        tracker.received(0, 1);
        tracker.received(0, 2);
        assert_eq!(tracker.completed(0, 2), None);
        tracker.received(0, 2);
        assert_eq!(tracker.completed(0, 1), Some(2), "2 must be redone first");
        assert_eq!(tracker.completed(0, 2), Some(3));
    }

    proptest! {
        /// Whatever order a batch finishes in, a commit never passes an
        /// offset that is not done, and once all are done the commit is past
        /// the last one.
        #[test]
        fn commits_never_pass_an_unfinished_offset(
            order in Just((0..20i64).collect::<Vec<_>>()).prop_shuffle()
        ) {
            let mut tracker = CommitTracker::default();
            for offset in 0..20 {
                tracker.received(0, offset);
            }
            let mut done = std::collections::BTreeSet::new();
            let mut last_commit = 0;
            for offset in order {
                done.insert(offset);
                if let Some(commit) = tracker.completed(0, offset) {
                    prop_assert!(commit > last_commit);
                    prop_assert!((0..commit).all(|o| done.contains(&o)));
                    last_commit = commit;
                }
            }
            prop_assert_eq!(last_commit, 20);
        }
    }
}

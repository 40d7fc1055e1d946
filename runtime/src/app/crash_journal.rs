//! Writer mode keeps no job state in the database, so a worker that an image
//! kills would meet the same image again after every restart, forever. The
//! crash journal remembers, in a folder that outlives the process (in a pod,
//! the `/tmp` emptyDir survives container restarts), which jobs were inside
//! the engine and how often a process died with them there.
//!
//! Two files: `in-engine` lists the jobs of the engine call under way
//! (rewritten before each call, emptied after); `crashes` holds
//! `<job id> <count>` lines. At start-up every job still listed in
//! `in-engine` gets one more crash. No fsync: the files only have to survive
//! the process, not the machine, and the page cache does that.

use crate::domain::JobId;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const IN_ENGINE: &str = "in-engine";
const CRASHES: &str = "crashes";

/// Crash counts per job; without a folder, counts nothing (and remembers nothing).
pub struct CrashJournal {
    dir: Option<PathBuf>,
    crashes: Mutex<HashMap<JobId, u32>>,
}

impl CrashJournal {
    pub fn disabled() -> CrashJournal {
        CrashJournal {
            dir: None,
            crashes: Mutex::new(HashMap::new()),
        }
    }

    /// Opens the journal in `dir` (created if missing) and charges the jobs
    /// a dead process left inside the engine with one crash each.
    pub fn open(dir: &Path) -> std::io::Result<CrashJournal> {
        std::fs::create_dir_all(dir)?;
        let mut crashes = parse_counts(&read_or_empty(&dir.join(CRASHES))?);
        let died_with = read_or_empty(&dir.join(IN_ENGINE))?;
        let mut charged = 0;
        for id in died_with
            .lines()
            .filter_map(|line| line.trim().parse().ok())
        {
            *crashes.entry(id).or_insert(0) += 1;
            charged += 1;
        }
        if charged > 0 {
            tracing::warn!(
                jobs = charged,
                "the previous process died during inference; its jobs will be inferred alone"
            );
        }
        let journal = CrashJournal {
            dir: Some(dir.to_owned()),
            crashes: Mutex::new(crashes),
        };
        journal.save_counts()?;
        std::fs::write(dir.join(IN_ENGINE), "")?;
        Ok(journal)
    }

    /// How often a process died with this job inside the engine.
    pub fn crashes(&self, id: JobId) -> u32 {
        self.lock().get(&id).copied().unwrap_or(0)
    }

    /// Records that `ids` go into the engine now.
    pub fn entering(&self, ids: &[JobId]) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let listed: String = ids.iter().map(|id| format!("{id}\n")).collect();
        std::fs::write(dir.join(IN_ENGINE), listed)
    }

    /// The engine call returned: nobody is inside.
    pub fn left(&self) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        std::fs::write(dir.join(IN_ENGINE), "")
    }

    /// The job is done with (its outcome published): forget its crashes.
    pub fn forget(&self, id: JobId) -> std::io::Result<()> {
        let removed = self.lock().remove(&id).is_some();
        if removed {
            self.save_counts()?;
        }
        Ok(())
    }

    fn save_counts(&self) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let text: String = self
            .lock()
            .iter()
            .map(|(id, count)| format!("{id} {count}\n"))
            .collect();
        std::fs::write(dir.join(CRASHES), text)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, u32>> {
        self.crashes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn read_or_empty(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(err) => Err(err),
    }
}

/// `<id> <count>` lines; anything else (a torn write) is skipped.
fn parse_counts(text: &str) -> HashMap<JobId, u32> {
    text.lines()
        .filter_map(|line| {
            let (id, count) = line.trim().split_once(' ')?;
            Some((id.parse().ok()?, count.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_left_in_the_engine_are_charged_once_per_death() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (JobId::new(), JobId::new());
        let journal = CrashJournal::open(dir.path()).unwrap();
        assert_eq!(journal.crashes(a), 0);
        journal.entering(&[a, b]).unwrap();
        drop(journal); // the process dies inside the engine
        let journal = CrashJournal::open(dir.path()).unwrap();
        assert_eq!((journal.crashes(a), journal.crashes(b)), (1, 1));
        journal.entering(&[a]).unwrap();
        journal.left().unwrap();
        journal.entering(&[b]).unwrap();
        drop(journal); // dies again, with b alone inside
        let journal = CrashJournal::open(dir.path()).unwrap();
        assert_eq!((journal.crashes(a), journal.crashes(b)), (1, 2));
        journal.forget(a).unwrap();
        drop(journal); // a clean restart charges nobody
        let journal = CrashJournal::open(dir.path()).unwrap();
        assert_eq!((journal.crashes(a), journal.crashes(b)), (0, 2));
    }

    #[test]
    fn a_torn_file_is_read_as_far_as_it_makes_sense() {
        let id = JobId::new();
        let counts = parse_counts(&format!("{id} 3\ngarbage\n{id}"));
        assert_eq!(counts.get(&id), Some(&3));
    }

    #[test]
    fn without_a_folder_nothing_is_remembered() {
        let journal = CrashJournal::disabled();
        let id = JobId::new();
        journal.entering(&[id]).unwrap();
        assert_eq!(journal.crashes(id), 0);
    }
}

//! The state file of a client-mode apply: which chunks are loaded into which target, so a re-run
//! resumes without loading a chunk twice or missing one.
//!
//! `<snapshot>/apply-state.<target>.json`, where `<target>` is the target's system identifier and
//! database name encoded like table directories (`naming::table_dir`: readable, injective, one path
//! component). Rewritten atomically (temporary file, fsync, rename, fsync directory) after every change:
//!
//! ```json
//! { "format_version": 1, "snapshot_id": "gen-…",
//!   "target": { "system_identifier": "7301…", "database": "app" },
//!   "truncated": false, "complete": false,
//!   "done": { "data/public.t/000000.copy.zst": 1000 },     // chunk file -> rows loaded
//!   "pending": { "data/public.t/000001.copy.zst": 7471 },  // chunk file -> txid being committed
//!   "updated_at": "2024-03-01T12:00:00Z" }
//! ```
//!
//! Exactly once: before a chunk's transaction commits, its txid goes to `pending` (written and synced);
//! after the commit the chunk moves to `done`. A crash between the two leaves the chunk pending; the
//! next run asks the target `txid_status(txid)`: committed means done, aborted means load it again.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use steep_repl_engine::naming::table_dir;

use crate::error::CliError;

/// The state format this build reads and writes.
pub const STATE_VERSION: u32 = 1;

/// Which database a state file is about: the cluster (system identifier), the database's name and
/// oid (a database dropped and created again under the same name has another oid), and the timeline the
/// cluster was on (a physical copy that was promoted, or a cluster restored from a backup, is on another
/// one: what it holds is not what the state recorded, so it is never resumed into).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub system_identifier: String,
    pub database: String,
    /// 0 in state files written before it was recorded: such a file is never resumed from.
    #[serde(default)]
    pub database_oid: u32,
    #[serde(default)]
    pub timeline: u32,
}

impl Target {
    /// Why a state recorded for `self` cannot be trusted for `now`, if it cannot.
    fn differs_from(&self, now: &Target) -> Option<String> {
        if self.system_identifier != now.system_identifier || self.database != now.database {
            Some(format!("it records the database {} of cluster {}", self.database, self.system_identifier))
        } else if self.database_oid != now.database_oid {
            Some(format!(
                "database {} is not the one it records (oid {} then, {} now): it was dropped and created again",
                now.database, self.database_oid, now.database_oid
            ))
        } else if self.timeline != now.timeline {
            Some(format!(
                "the cluster is on timeline {} and the state was written on timeline {}: it was promoted or \
                 restored since, so the chunks recorded as loaded may not be there",
                now.timeline, self.timeline
            ))
        } else {
            None
        }
    }
}

/// The contents of a state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyState {
    pub format_version: u32,
    pub snapshot_id: String,
    pub target: Target,
    /// The target tables were truncated by this apply (never again on a resume).
    pub truncated: bool,
    /// Every chunk and the sequences are loaded.
    pub complete: bool,
    /// Chunk file -> rows loaded, committed.
    pub done: BTreeMap<String, u64>,
    /// Chunk file -> txid of the transaction that was about to commit it.
    pub pending: BTreeMap<String, i64>,
    pub updated_at: DateTime<Utc>,
}

/// A state file on disk and its contents.
pub struct StateFile {
    pub path: PathBuf,
    pub state: ApplyState,
}

/// Where the state of applying snapshot `dir` into `target` lives.
pub fn path_for(dir: &Path, target: &Target) -> PathBuf {
    dir.join(format!("apply-state.{}.json", table_dir(&target.system_identifier, &target.database)))
}

impl StateFile {
    /// Reads the state of applying `snapshot_id` into `target`, or starts an empty one (not yet saved).
    /// A state file of another snapshot or format is refused, naming the file to remove.
    pub fn open(dir: &Path, snapshot_id: &str, target: &Target) -> Result<StateFile, CliError> {
        let path = path_for(dir, target);
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let state: ApplyState = serde_json::from_slice(&bytes).map_err(|e| {
                    CliError::Other(anyhow::anyhow!(
                        "{}: unreadable apply state ({e}); remove it to start over (with --truncate)",
                        path.display()
                    ))
                })?;
                if let Some(why) = state.target.differs_from(target) {
                    return Err(CliError::Other(anyhow::anyhow!(
                        "{}: cannot resume from this state: {why}; remove it to start over (with --truncate)",
                        path.display()
                    )));
                }
                if state.format_version != STATE_VERSION || state.snapshot_id != snapshot_id {
                    return Err(CliError::Other(anyhow::anyhow!(
                        "{}: records applying snapshot {} (state format {}) into {}/{}, not this one; remove it \
                         to start over (with --truncate)",
                        path.display(),
                        state.snapshot_id,
                        state.format_version,
                        state.target.system_identifier,
                        state.target.database
                    )));
                }
                state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => ApplyState {
                format_version: STATE_VERSION,
                snapshot_id: snapshot_id.to_string(),
                target: target.clone(),
                truncated: false,
                complete: false,
                done: BTreeMap::new(),
                pending: BTreeMap::new(),
                updated_at: Utc::now(),
            },
            Err(e) => return Err(CliError::Io { op: "read", path, source: e }),
        };
        Ok(StateFile { path, state })
    }

    /// Writes the state atomically: temporary file, fsync, rename, fsync directory.
    pub fn save(&mut self) -> Result<(), CliError> {
        self.state.updated_at = Utc::now();
        let mut json = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| CliError::Other(anyhow::anyhow!("encoding {}: {e}", self.path.display())))?;
        json.push(b'\n');
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let written = (|| -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            File::open(dir)?.sync_all()
        })();
        written.map_err(|e| {
            if fs::remove_file(&tmp).is_err() {
                // Already renamed or never created: nothing to clean up.
            }
            CliError::Io { op: "write", path: self.path.clone(), source: e }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            system_identifier: "7301".into(),
            database: "App Db".into(),
            database_oid: 16384,
            timeline: 1,
        }
    }

    #[test]
    fn a_recreated_database_or_a_promoted_copy_is_never_resumed_into() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateFile::open(dir.path(), "gen-1", &target()).unwrap();
        s.state.done.insert("data/public.t/000000.copy.zst".into(), 10);
        s.save().unwrap();
        let recreated = Target { database_oid: 16999, ..target() };
        let err = StateFile::open(dir.path(), "gen-1", &recreated).err().unwrap().to_string();
        assert!(err.contains("dropped and created again"), "{err}");
        let promoted = Target { timeline: 2, ..target() };
        let err = StateFile::open(dir.path(), "gen-1", &promoted).err().unwrap().to_string();
        assert!(err.contains("promoted or restored"), "{err}");
        // A state file from before the oid and timeline were recorded is not trusted either.
        let old = r#"{"format_version":1,"snapshot_id":"gen-1","target":{"system_identifier":"7301","database":"App Db"},
            "truncated":false,"complete":false,"done":{"data/public.t/000000.copy.zst":10},"pending":{},
            "updated_at":"2024-03-01T12:00:00Z"}"#;
        fs::write(&s.path, old).unwrap();
        assert!(StateFile::open(dir.path(), "gen-1", &target()).is_err());
    }

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateFile::open(dir.path(), "gen-1", &target()).unwrap();
        assert_eq!(s.path.file_name().unwrap(), "apply-state.7301.%41pp%20%44b.json");
        assert!(s.state.done.is_empty());
        s.state.done.insert("data/public.t/000000.copy.zst".into(), 10);
        s.state.pending.insert("data/public.t/000001.copy.zst".into(), 12345);
        s.save().unwrap();
        let again = StateFile::open(dir.path(), "gen-1", &target()).unwrap();
        assert_eq!(again.state, s.state);
        let err = StateFile::open(dir.path(), "gen-2", &target()).err().unwrap();
        assert!(err.to_string().contains("records applying snapshot gen-1"), "{err}");
        // Only the state file is left: the temporary file was renamed.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        fs::write(&s.path, b"{oops").unwrap();
        let err = StateFile::open(dir.path(), "gen-1", &target()).err().unwrap();
        assert!(err.to_string().contains("unreadable apply state"), "{err}");
    }
}

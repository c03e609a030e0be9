//! Client mode: the CLI runs the snapshot engine itself, for servers where the extension cannot be
//! installed. Same planner, same chunk files, same manifest as the server's workers (only the
//! manifest's `mode` says `client`), so either side can apply what the other generated.
//!
//! - [`generate`]: one coordinating connection exports a REPEATABLE READ snapshot and holds it (and
//!   ACCESS SHARE locks) until every worker has finished; N worker connections import it and stream
//!   `COPY (SELECT cols FROM ONLY t WHERE ctid range) TO STDOUT` per chunk into the engine's writer.
//! - [`apply`]: N connections stream chunks into `COPY t (cols) FROM STDIN`, one transaction per chunk,
//!   recording finished chunks in a state file next to the snapshot ([`state`]) so a re-run resumes.

pub mod apply;
pub mod generate;
mod pool;
pub mod replication;
mod session;
pub mod state;
mod stats;

use std::hash::BuildHasher;

/// A new operation id, `<prefix>-<16 hex digits>`, like the server's (random per process and call).
pub fn new_id(prefix: &str) -> String {
    let seed = (std::time::SystemTime::now(), std::process::id());
    let v = std::collections::hash_map::RandomState::new().hash_one(seed);
    format!("{prefix}-{v:016x}")
}

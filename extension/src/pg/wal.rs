//! Keeping the WAL writer ahead of a bulk load.
//!
//! A backend that inserts faster than the WAL writer wakes up (every `wal_writer_delay`, 200 ms by
//! default) fills the WAL buffers, and from then on every new WAL page it needs makes it write out
//! the oldest one itself: one 8 kB write under `WALWriteLock` per page, queued behind whoever holds
//! that lock (the WAL writer's fsync, or another backend's write and fsync at the end of a segment).
//! Loading the 1.5 GB `mixed` benchmark with two workers on two cores took about 200 000 such writes
//! (`pg_stat_wal.wal_buffers_full`, pg_restore the same), and each loader spent 10-15% of its time
//! asleep on `WALWriteLock` with its core idle.
//!
//! [`WalWriterNudge`] asks for the WAL to be written the way an asynchronous commit does: each time
//! this backend's WAL has grown by a quarter of `wal_buffers`, it tells the WAL writer how far the WAL
//! goes (`XLogSetAsyncXactLSN`), which wakes the WAL writer to write it out in large pieces from its
//! own process. On the same load `wal_buffers_full` fell to 0 and the idle time went with it (see
//! benches/README.md). It only makes WAL reach the disk sooner; nothing waits for it, and it changes
//! nothing about what is logged or when a transaction counts as committed.

use pgrx::pg_sys;

/// Nudges the WAL writer whenever this backend has written `step` more bytes of WAL.
pub struct WalWriterNudge {
    step: u64,
    last: u64,
}

/// The smallest step: waking the WAL writer more often than this gains nothing.
const MIN_STEP: u64 = 64 * 1024;

impl WalWriterNudge {
    /// A nudge every quarter of `wal_buffers` (at least 64 kB) of this backend's WAL.
    pub fn new() -> Self {
        // SAFETY: XLOGbuffers is a plain int that the postmaster resolves (from wal_buffers = -1 too)
        // before any backend starts, and that never changes afterwards.
        let pages = unsafe { pg_sys::XLOGbuffers }.max(0) as u64;
        let step = (pages * pg_sys::XLOG_BLCKSZ as u64 / 4).max(MIN_STEP);
        WalWriterNudge { step, last: last_record_end() }
    }

    /// Call often during a load (cheap when there is nothing to do): wakes the WAL writer when this
    /// backend's WAL has grown by a step since the last nudge.
    pub fn tick(&mut self) {
        let end = last_record_end();
        if end >= self.last.saturating_add(self.step) {
            // SAFETY: `end` is the end of a WAL record this backend has inserted, so every byte up to
            // it is reserved and will be written; XLogSetAsyncXactLSN only raises the shared
            // asynchronous-commit target under its spinlock and sets the WAL writer's latch.
            unsafe { pg_sys::XLogSetAsyncXactLSN(end) };
            self.last = end;
        } else if end < self.last {
            // A new transaction: XactLastRecEnd starts again from 0.
            self.last = end;
        }
    }
}

impl Default for WalWriterNudge {
    fn default() -> Self {
        Self::new()
    }
}

/// End of the last WAL record this backend inserted in its current transaction (0 before any).
fn last_record_end() -> u64 {
    // SAFETY: XactLastRecEnd is a per-backend global that XLogInsert updates; this process has one
    // thread, so the read cannot race.
    unsafe { pg_sys::XactLastRecEnd }
}

//! Shared memory: fixed slot arrays that leaders, workers and any backend reading progress share.
//!
//! Layout (one `#[repr(C)]` block, zero-filled at server start; every field is an atomic, so any process
//! may read any figure without a lock):
//!
//! ```text
//! Shared
//! ├── magic, supervisor pid and heartbeat, chunk allocator lock
//! ├── jobs:    [JobSlot; MAX_JOBS]          one per running operation (generate or apply)
//! ├── workers: [WorkerSlot; MAX_WORKERS]    one per process working for a job, its own progress
//! └── chunks:  [ChunkSlot; MAX_CHUNKS]      the chunk plans of running jobs, a contiguous range each
//! ```
//!
//! Ownership: a slot is claimed by compare-and-swap of its `state` from FREE and released by storing FREE
//! last. Fixed fields of a job (ids, path, snapshot name) are written by the process that claims the slot
//! before it publishes the slot with a Release store of `state`; readers load `state` with Acquire first.
//! Counters are updated with relaxed `fetch_add`s; readers tolerate figures a moment old.
//!
//! Created with `ShmemInitStruct` (see `pg::request_shmem`), not `pg_shmem_init!`, which builds the value
//! on the postmaster's stack: the chunk array alone is several megabytes.

use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::pg;

/// Most operations that can run at once on one server.
pub const MAX_JOBS: usize = 16;
/// Most processes steep_repl can run at once for all jobs; also the ceiling of `steep_repl.max_workers`.
pub const MAX_WORKERS: usize = 64;
/// Sessions that can wait for one job in `wait_snapshot` with a latch; more just poll.
pub const MAX_WAITERS: usize = 8;
/// Chunk slots shared by all running jobs. At the default 256 MB chunk size this plans 32 TB; a job
/// whose plan does not fit is refused with a hint to raise `steep_repl.chunk_size`.
pub const MAX_CHUNKS: usize = 131_072;

const MAGIC: u64 = 0x5354_4545_5052_0003; // "STEEPR" + layout version 3

/// A slot's state value meaning: free to claim.
pub const FREE: u32 = 0;

/// Value of `ChunkSlot::block_end` for the open-ended last chunk of a table.
pub const OPEN_END: u32 = u32::MAX;

/// A fixed-capacity string in shared memory, written once by a slot's owner before publication.
#[repr(C)]
pub struct ShmemStr<const N: usize> {
    len: AtomicU32,
    bytes: [AtomicU8; N],
}

impl<const N: usize> ShmemStr<N> {
    /// Stores `s`; fails (storing nothing) if it does not fit.
    pub fn set(&self, s: &str) -> Result<(), usize> {
        let b = s.as_bytes();
        if b.len() > N {
            return Err(N);
        }
        for (dst, src) in self.bytes.iter().zip(b) {
            dst.store(*src, Ordering::Relaxed);
        }
        self.len.store(b.len() as u32, Ordering::Release);
        Ok(())
    }

    /// Stores as much of `s` as fits, cut at a character boundary.
    pub fn set_truncated(&self, s: &str) {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let _fits = self.set(&s[..end]);
    }

    /// The stored string.
    pub fn get(&self) -> String {
        let len = (self.len.load(Ordering::Acquire) as usize).min(N);
        let v: Vec<u8> = self.bytes[..len].iter().map(|b| b.load(Ordering::Relaxed)).collect();
        String::from_utf8_lossy(&v).into_owned()
    }

    pub fn clear(&self) {
        self.len.store(0, Ordering::Release);
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum JobKind {
    Generate = 1,
    Apply = 2,
}

/// Lifecycle of a job slot.
pub mod job_state {
    pub const FREE: u32 = super::FREE;
    /// Claimed by `start_*`, leader not yet running.
    pub const STARTING: u32 = 1;
    /// The leader runs the job.
    pub const RUNNING: u32 = 2;
}

/// Phases a job goes through; stored as a number, shown as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Phase {
    Queued = 0,
    Plan = 1,
    Data = 2,
    Sequences = 3,
    Finalizing = 4,
    Complete = 5,
    Failed = 6,
    Cancelled = 7,
    Verify = 8,
    Truncate = 9,
    Analyze = 10,
    Applied = 11,
}

impl Phase {
    pub fn from_u32(v: u32) -> Phase {
        match v {
            1 => Phase::Plan,
            2 => Phase::Data,
            3 => Phase::Sequences,
            4 => Phase::Finalizing,
            5 => Phase::Complete,
            6 => Phase::Failed,
            7 => Phase::Cancelled,
            8 => Phase::Verify,
            9 => Phase::Truncate,
            10 => Phase::Analyze,
            11 => Phase::Applied,
            _ => Phase::Queued,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Plan => "plan",
            Phase::Data => "data",
            Phase::Sequences => "sequences",
            Phase::Finalizing => "finalizing",
            Phase::Complete => "complete",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
            Phase::Verify => "verify",
            Phase::Truncate => "truncate",
            Phase::Analyze => "analyze",
            Phase::Applied => "applied",
        }
    }

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Complete | Phase::Failed | Phase::Cancelled | Phase::Applied)
    }
}

/// Longest job id text (`gen-` or `app-` and 16 hex digits).
pub const JOB_ID_LEN: usize = 20;

/// One running operation.
#[repr(C, align(64))]
pub struct JobSlot {
    pub state: AtomicU32,
    pub kind: AtomicU32,
    pub id: ShmemStr<JOB_ID_LEN>,
    pub database_oid: AtomicU32,
    pub role_oid: AtomicU32,
    /// Transaction id of the `start_*` call; the leader waits for it to commit.
    pub caller_xid: AtomicU32,
    pub leader_pid: AtomicI32,
    /// The leader's latch (`pg::my_latch`): workers set it when a unit is done or they exit, so the
    /// leader notices the end of the data phase at once.
    pub leader_latch: AtomicUsize,
    /// Latches of sessions in `wait_snapshot` (0 = free entry); set when the job's slot is released.
    pub waiters: [AtomicUsize; MAX_WAITERS],
    pub phase: AtomicU32,
    /// Set by cancel_snapshot, by a failing worker, or by the leader on failure: everyone stops.
    pub stop: AtomicU32,
    /// 1 when `stop` was a user's cancel rather than a failure.
    pub cancelled: AtomicU32,
    /// First error of any process of the job (first writer wins through `error_claimed`).
    pub error_claimed: AtomicU32,
    pub error: ShmemStr<1024>,
    pub path: ShmemStr<1024>,
    /// Snapshot to import: given by the caller (empty = export a new one), then the exported one.
    pub snapshot_name: ShmemStr<64>,
    /// Snapshot the data workers import; set by the leader when chunks are published.
    pub export_name: ShmemStr<64>,
    /// The caller's TimeZone, pinned in every worker.
    pub timezone: ShmemStr<64>,
    /// Compression: 0 = none, otherwise the zstd level.
    pub zstd_level: AtomicI32,
    pub parallel_requested: AtomicU32,
    pub workers_launched: AtomicU32,
    /// Chunk plan: slots [chunk_base, chunk_base + chunk_count) of `Shared::chunks`.
    pub chunk_base: AtomicU32,
    pub chunk_count: AtomicU32,
    /// Next chunk index (relative to chunk_base) to hand out.
    pub chunk_cursor: AtomicU32,
    /// 1 once the chunk plan is published and workers may claim.
    pub chunks_ready: AtomicU32,
    /// Chunks whose every unit is done, and how many the job has (an apply may load a chunk in
    /// several units; a generate's units are its chunks).
    pub chunks_done: AtomicU32,
    pub chunks_total: AtomicU32,
    /// Slots of the chunk plan done; the job's data phase ends when this reaches `chunk_count`.
    pub units_done: AtomicU32,
    pub tables_total: AtomicU32,
    pub tables_done: AtomicU32,
    /// Units of work for percent and ETA: heap blocks for generate, raw bytes for apply.
    pub work_total: AtomicU64,
    pub work_done: AtomicU64,
    /// Generate: target raw bytes of a chunk (the caller's steep_repl.chunk_size). Apply: the smallest
    /// unit its tail is cut into (the caller's steep_repl.apply_part_size).
    pub chunk_bytes: AtomicU64,
    /// Pause before each chunk in ms (the caller's steep_repl.chunk_pause).
    pub chunk_pause_ms: AtomicU64,
    pub rows: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub file_bytes: AtomicU64,
    pub started_ms: AtomicU64,
    /// Unix ms of the last progress NOTIFY; whoever moves it forward by CAS sends the next one.
    pub last_notify_ms: AtomicU64,
    /// Phase of the last notification sent; a different current phase forces the next one.
    pub notified_phase: AtomicU32,
    /// Unix ms of the last write of figures into the job's row.
    pub last_persist_ms: AtomicU64,
    /// Options of an apply job (bit 0 verify, bit 1 truncate, bit 2 analyze).
    pub flags: AtomicU32,
    /// Spin lock (0/1) around an apply's chunk claims (see `Shared::claim_chunk_preferring_idle_tables`).
    pub claim_lock: AtomicU32,
}

/// One process working for a job. Written by that process alone.
#[repr(C, align(64))]
pub struct WorkerSlot {
    pub state: AtomicU32,
    pub pid: AtomicI32,
    pub job_slot: AtomicU32,
    /// Chunk being worked on (absolute slot index + 1; 0 = none).
    pub current_chunk: AtomicU32,
    pub rows: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub file_bytes: AtomicU64,
}

/// Lifecycle of a worker slot.
pub mod worker_state {
    pub const FREE: u32 = super::FREE;
    /// Reserved by the leader for a worker being launched.
    pub const LAUNCHING: u32 = 1;
    pub const RUNNING: u32 = 2;
    /// Finished its share and exited cleanly.
    pub const DONE: u32 = 3;
    /// Stopped on an error (recorded in the job).
    pub const FAILED: u32 = 4;
}

/// One planned chunk and, once done, its result.
#[repr(C)]
pub struct ChunkSlot {
    pub relid: AtomicU32,
    /// Index of the table in the leader's plan (for per-table figures).
    pub table: AtomicU32,
    /// Index of the chunk within its table (its file name).
    pub index: AtomicU32,
    pub block_start: AtomicU32,
    /// Exclusive end, or OPEN_END.
    pub block_end: AtomicU32,
    pub state: AtomicU32,
    pub raw_crc32: AtomicU32,
    pub file_crc32: AtomicU32,
    pub rows: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub file_bytes: AtomicU64,
    /// Apply: the unit's rows `[row_start, row_end)` of the chunk (see `steep_repl_engine::schedule`).
    pub row_start: AtomicU64,
    pub row_end: AtomicU64,
    /// Apply: slot index (relative to the job's base) of the first unit of the same chunk.
    pub head: AtomicU32,
    /// Apply, on a chunk's first unit: units of the chunk not yet loaded.
    pub parts_left: AtomicU32,
}

/// Lifecycle of a chunk slot.
pub mod chunk_state {
    pub const PENDING: u32 = 0;
    pub const CLAIMED: u32 = 1;
    pub const DONE: u32 = 2;
}

/// The whole shared block.
#[repr(C)]
pub struct Shared {
    magic: AtomicU64,
    /// Pid of the supervisor background worker, 0 when not running.
    pub supervisor_pid: AtomicI32,
    /// Unix time in ms of the supervisor's last wake-up.
    pub supervisor_heartbeat_ms: AtomicU64,
    /// Spin lock (0/1) around allocating chunk ranges; held for a scan of MAX_JOBS entries only.
    chunk_alloc_lock: AtomicU32,
    pub jobs: [JobSlot; MAX_JOBS],
    pub workers: [WorkerSlot; MAX_WORKERS],
    pub chunks: [ChunkSlot; MAX_CHUNKS],
}

impl Shared {
    /// Claims a free job slot for a new job, returning its index.
    pub fn claim_job_slot(&self) -> Option<usize> {
        self.jobs.iter().position(|j| {
            j.state.compare_exchange(FREE, job_state::STARTING, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        })
    }

    /// Resets every field of a freshly claimed job slot.
    pub fn reset_job(&self, slot: usize) {
        let j = &self.jobs[slot];
        for a in [
            &j.kind,
            &j.database_oid,
            &j.role_oid,
            &j.caller_xid,
            &j.phase,
            &j.stop,
            &j.cancelled,
            &j.error_claimed,
            &j.parallel_requested,
            &j.workers_launched,
            &j.chunk_base,
            &j.chunk_count,
            &j.chunk_cursor,
            &j.chunks_ready,
            &j.chunks_done,
            &j.chunks_total,
            &j.units_done,
            &j.tables_total,
            &j.tables_done,
            &j.flags,
            &j.notified_phase,
            &j.claim_lock,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        for a in [
            &j.work_total,
            &j.work_done,
            &j.chunk_bytes,
            &j.chunk_pause_ms,
            &j.last_persist_ms,
            &j.rows,
            &j.raw_bytes,
            &j.file_bytes,
            &j.started_ms,
            &j.last_notify_ms,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        j.leader_pid.store(0, Ordering::Relaxed);
        j.leader_latch.store(0, Ordering::Relaxed);
        j.zstd_level.store(0, Ordering::Relaxed);
        for s in [&j.error as &dyn ClearStr, &j.path, &j.snapshot_name, &j.export_name, &j.timezone, &j.id] {
            s.clear_str();
        }
    }

    /// The slot of the job with this text id, if it is running.
    pub fn find_job(&self, id: &str) -> Option<usize> {
        self.jobs.iter().position(|j| j.state.load(Ordering::Acquire) != FREE && j.id.get() == id)
    }

    /// Jobs currently holding a slot, as (slot index, slot).
    pub fn active_jobs(&self) -> impl Iterator<Item = (usize, &JobSlot)> {
        self.jobs.iter().enumerate().filter(|(_, j)| j.state.load(Ordering::Acquire) != FREE)
    }

    /// Releases a job slot (and its chunk range), then wakes the sessions waiting for the job to end.
    /// A waiter registers before it checks that the slot still holds its job, so it either sees the
    /// slot free or is woken here.
    pub fn release_job(&self, slot: usize) {
        let j = &self.jobs[slot];
        j.chunk_count.store(0, Ordering::Release);
        j.state.store(FREE, Ordering::SeqCst);
        for w in &j.waiters {
            crate::pg::set_latch(w.swap(0, Ordering::SeqCst));
        }
    }

    /// Registers `latch` as waiting for the end of the job in `slot`; returns the entry to pass to
    /// [`Shared::unwait`], or None when every entry is taken (the caller then just sleeps).
    pub fn wait_on(&self, slot: usize, latch: usize) -> Option<usize> {
        self.jobs[slot]
            .waiters
            .iter()
            .position(|w| w.compare_exchange(0, latch, Ordering::SeqCst, Ordering::Relaxed).is_ok())
    }

    /// Removes a registration made by [`Shared::wait_on`], unless the release already took it.
    pub fn unwait(&self, slot: usize, entry: usize, latch: usize) {
        let _ =
            self.jobs[slot].waiters[entry].compare_exchange(latch, 0, Ordering::SeqCst, Ordering::Relaxed);
    }

    /// Claims a free worker slot for `job_slot`, returning its index, or None when all are taken.
    pub fn claim_worker_slot(&self, job_slot: usize) -> Option<usize> {
        self.workers.iter().position(|w| {
            w.state
                .compare_exchange(FREE, worker_state::LAUNCHING, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
                && {
                    w.job_slot.store(job_slot as u32, Ordering::Relaxed);
                    w.pid.store(0, Ordering::Relaxed);
                    w.current_chunk.store(0, Ordering::Relaxed);
                    w.rows.store(0, Ordering::Relaxed);
                    w.raw_bytes.store(0, Ordering::Relaxed);
                    w.file_bytes.store(0, Ordering::Relaxed);
                    true
                }
        })
    }

    /// Number of worker slots in use, by every job.
    pub fn workers_in_use(&self) -> usize {
        self.workers.iter().filter(|w| w.state.load(Ordering::Acquire) != FREE).count()
    }

    /// Worker slots of one job, as (slot index, slot), whatever their state.
    pub fn job_workers(&self, job_slot: usize) -> impl Iterator<Item = (usize, &WorkerSlot)> {
        self.workers.iter().enumerate().filter(move |(_, w)| {
            w.state.load(Ordering::Acquire) != FREE && w.job_slot.load(Ordering::Relaxed) as usize == job_slot
        })
    }

    /// Allocates `n` contiguous chunk slots for a job, returning the first index.
    pub fn alloc_chunks(&self, job_slot: usize, n: usize) -> Option<usize> {
        if n == 0 {
            return Some(0);
        }
        while self.chunk_alloc_lock.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::hint::spin_loop();
        }
        let mut used: Vec<(usize, usize)> = self
            .jobs
            .iter()
            .enumerate()
            .filter(|(i, j)| *i != job_slot && j.state.load(Ordering::Acquire) != FREE)
            .map(|(_, j)| {
                (
                    j.chunk_base.load(Ordering::Relaxed) as usize,
                    j.chunk_count.load(Ordering::Relaxed) as usize,
                )
            })
            .filter(|(_, c)| *c > 0)
            .collect();
        used.sort_unstable();
        let mut start = 0usize;
        let mut found = None;
        for (b, c) in used.iter().copied().chain(std::iter::once((MAX_CHUNKS, 0))) {
            if b >= start && b - start >= n {
                found = Some(start);
                break;
            }
            start = start.max(b + c);
        }
        if let Some(base) = found {
            let j = &self.jobs[job_slot];
            j.chunk_base.store(base as u32, Ordering::Relaxed);
            j.chunk_count.store(n as u32, Ordering::Release);
        }
        self.chunk_alloc_lock.store(0, Ordering::Release);
        found
    }
}

/// How far past the first pending chunk a claim looks for a table no other worker is loading.
const CLAIM_WINDOW: usize = 256;

impl Shared {
    /// Claims a pending chunk of job `slot` for worker `me`, preferring the earliest pending chunk of a
    /// table no other worker of the job is loading right now (so each table is loaded as one ascending
    /// stream, as pg_restore does, keeping B-tree inserts on their right-most fast path and the table's
    /// extension lock uncontended); a busy table's chunk only when nothing else is pending. Returns the
    /// chunk's index relative to the job's base, or None when no chunk is pending.
    pub fn claim_chunk_preferring_idle_tables(&self, slot: usize, me: usize) -> Option<u32> {
        let job = &self.jobs[slot];
        let base = job.chunk_base.load(Ordering::Acquire) as usize;
        let count = job.chunk_count.load(Ordering::Acquire) as usize;
        while job.claim_lock.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::hint::spin_loop();
        }
        let busy: Vec<u32> = self
            .job_workers(slot)
            .filter(|(i, _)| *i != me)
            .filter_map(|(_, w)| match w.current_chunk.load(Ordering::Acquire) {
                0 => None,
                c => Some(self.chunks[c as usize - 1].table.load(Ordering::Relaxed)),
            })
            .collect();
        let mut first = job.chunk_cursor.load(Ordering::Relaxed) as usize;
        while first < count && self.chunks[base + first].state.load(Ordering::Acquire) != chunk_state::PENDING
        {
            first += 1;
        }
        job.chunk_cursor.store(first as u32, Ordering::Relaxed);
        let pending = |k: &usize| self.chunks[base + k].state.load(Ordering::Acquire) == chunk_state::PENDING;
        let window = first..count.min(first + CLAIM_WINDOW);
        // Skipping ahead must not pull a small unit of the tail before a large one: only units at least
        // half as large as the first pending one qualify (`raw_bytes` holds a pending unit's estimate).
        let size = |k: usize| self.chunks[base + k].raw_bytes.load(Ordering::Relaxed);
        let floor = if first < count { size(first) / 2 } else { 0 };
        let pick = window
            .clone()
            .filter(pending)
            .filter(|&k| size(k) >= floor)
            .find(|&k| !busy.contains(&self.chunks[base + k].table.load(Ordering::Relaxed)))
            .or_else(|| window.clone().find(pending));
        if let Some(k) = pick {
            self.chunks[base + k].state.store(chunk_state::CLAIMED, Ordering::Release);
            self.workers[me].current_chunk.store((base + k + 1) as u32, Ordering::Release);
        }
        job.claim_lock.store(0, Ordering::Release);
        pick.map(|k| k as u32)
    }
}

/// Clearing strings of different capacities through one list.
trait ClearStr {
    fn clear_str(&self);
}

impl<const N: usize> ClearStr for ShmemStr<N> {
    fn clear_str(&self) {
        self.clear();
    }
}

impl JobSlot {
    /// Records the job's first error (later ones are dropped) and tells every process to stop.
    pub fn fail(&self, message: &str) {
        if self.error_claimed.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            self.error.set_truncated(message);
        }
        self.stop.store(1, Ordering::Release);
    }

    /// The recorded error, if any.
    pub fn error_message(&self) -> Option<String> {
        (self.error_claimed.load(Ordering::Acquire) != 0).then(|| self.error.get())
    }

    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Acquire) != 0
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u32(self.phase.load(Ordering::Acquire))
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u32, Ordering::Release);
    }

    pub fn kind(&self) -> JobKind {
        if self.kind.load(Ordering::Acquire) == JobKind::Apply as u32 {
            JobKind::Apply
        } else {
            JobKind::Generate
        }
    }
}

static mut SHARED: *const Shared = std::ptr::null();

/// Registers the shared-memory request and startup hooks. Called once from `_PG_init` during
/// `shared_preload_libraries` processing, and only then.
pub fn init() {
    pg::request_shmem(std::mem::size_of::<Shared>(), on_shmem_startup);
}

/// Runs in the postmaster (and, on EXEC_BACKEND builds, in each child) once shared memory exists.
fn on_shmem_startup(ptr: *mut u8, found: bool) {
    let shared = ptr as *mut Shared;
    if !found {
        // SAFETY: `ptr` points to `size_of::<Shared>()` bytes of fresh, cache-line-aligned shared memory
        // that no other process uses yet (we hold AddinShmemInitLock). All-zero bytes are a valid
        // `Shared`: every field is an atomic integer or an array of them.
        unsafe {
            std::ptr::write_bytes(ptr, 0, std::mem::size_of::<Shared>());
            (*shared).magic.store(MAGIC, Ordering::Release);
        }
    }
    // SAFETY: written once per process, here, before any SQL function of this library can run.
    unsafe { SHARED = shared };
}

/// The shared block, or None when the library was not preloaded (no shared memory was reserved).
pub fn get() -> Option<&'static Shared> {
    // SAFETY: SHARED is either null or set once at startup to a block that lives as long as the server.
    let p = unsafe { SHARED };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null means it points to an initialised `Shared` in shared memory.
    let shared = unsafe { &*p };
    (shared.magic.load(Ordering::Acquire) == MAGIC).then_some(shared)
}

/// The shared block, or a PostgreSQL ERROR saying the library must be preloaded.
pub fn require() -> &'static Shared {
    match get() {
        Some(s) => s,
        None => pg::error_not_preloaded(),
    }
}

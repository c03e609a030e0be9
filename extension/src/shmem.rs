//! Shared memory: fixed slot arrays that leaders, workers and any backend reading progress share.
//!
//! Layout (zero-filled at server start; every field is an atomic, so any process may read any figure
//! without a lock):
//!
//! ```text
//! Shared                                     one block of fixed size
//! ├── magic, supervisor pid and heartbeat, reaper requests, chunk allocator lock
//! ├── jobs:    [JobSlot; MAX_JOBS]          one per running operation (generate or apply)
//! └── workers: [WorkerSlot; MAX_WORKERS]    one per process working for a job, its own progress
//! chunks: [ChunkSlot; steep_repl.max_chunk_slots]   a second block: the chunk plans of running
//!                                            jobs, a contiguous range each
//! ```
//!
//! ## The slot state machine
//!
//! Job and worker slots carry one [`SlotWord`]: a generation number in its high 32 bits and a state
//! in its low 32, changed only by compare-and-swap. Claiming a free slot moves it to the next
//! generation; every later transition and the final release name the generation they expect, so a
//! process holding a stale view (a worker that outlived its job, a supervisor that looked a moment
//! too early) changes nothing. Rules that every path follows:
//!
//! - A slot is claimed by CAS from FREE ([`SlotWord::claim`]); its fixed fields are written by the
//!   claimer before it publishes the slot by launching the process that will use it.
//! - A process attaches to its slot by CAS from the state its launcher left (STARTING, LAUNCHING) to
//!   RUNNING with the generation it was given; if that fails, the slot is not its own and it exits
//!   without writing anything.
//! - A slot is freed ([`SlotWord::free`]) only when no live process can still write to it: a worker
//!   slot once its process has exited, a job slot once its leader has ended and every worker slot of
//!   the job is free. The leader frees both on a normal end; when a process will not exit, the
//!   supervisor frees the slots after it has (see `worker::supervisor`).
//! - Every process registers an exit callback when it attaches (`job::on_exit`), so an ERROR, a
//!   FATAL or a terminate marks its slot and fails its job even where no Rust code gets to run.
//!
//! Counters are updated with relaxed `fetch_add`s; readers tolerate figures a moment old.
//!
//! Created with `ShmemInitStruct` (see `pg::request_shmem`), not `pg_shmem_init!`, which builds the value
//! on the postmaster's stack: the chunk array alone is several megabytes.

use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::pg;

/// Most operations that can run at once on one server.
pub const MAX_JOBS: usize = 16;
/// Most processes steep_repl can run at once for all jobs; also the ceiling of `steep_repl.max_workers`.
pub const MAX_WORKERS: usize = 64;
/// Sessions that can wait for one job in `wait_snapshot` with a latch; more just poll.
pub const MAX_WAITERS: usize = 8;
/// Databases whose interrupted jobs the supervisor can have a reaper look at without waiting; more
/// are taken at the next tick.
pub const MAX_REAP_REQUESTS: usize = 16;
/// How many databases of one server may hold a node registry the supervisor probes.
pub const MAX_NODE_DATABASES: usize = 32;

/// Longest path (bytes) a job can be given: the capacity of [`JobSlot::path`]. Longer paths are
/// refused when the job starts, never cut.
pub const MAX_PATH_BYTES: usize = 1024;

const MAGIC: u64 = 0x5354_4545_5052_0004; // "STEEPR" + layout version 4

/// A slot's state value meaning: free to claim.
pub const FREE: u32 = 0;

/// Value of `ChunkSlot::block_end` for the open-ended last chunk of a table.
pub const OPEN_END: u32 = u32::MAX;

/// A slot's generation and state in one atomic word, changed only by compare-and-swap (see the module
/// documentation).
#[repr(C)]
pub struct SlotWord(AtomicU64);

impl SlotWord {
    fn pack(generation: u32, state: u32) -> u64 {
        (u64::from(generation) << 32) | u64::from(state)
    }

    /// (generation, state) as they are now.
    pub fn get(&self) -> (u32, u32) {
        let w = self.0.load(Ordering::Acquire);
        ((w >> 32) as u32, w as u32)
    }

    pub fn state(&self) -> u32 {
        self.get().1
    }

    /// Whether the slot is in state `state` of generation `generation`.
    pub fn is(&self, generation: u32, state: u32) -> bool {
        self.get() == (generation, state)
    }

    /// Claims a free slot, moving it to the next generation in state `to`; returns that generation.
    pub fn claim(&self, to: u32) -> Option<u32> {
        let w = self.0.load(Ordering::Acquire);
        if w as u32 != FREE {
            return None;
        }
        // Generation 0 is never handed out, so a zeroed argument can never match a live slot.
        let generation = ((w >> 32) as u32).wrapping_add(1).max(1);
        self.0
            .compare_exchange(w, Self::pack(generation, to), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            .then_some(generation)
    }

    /// Moves the slot from `from` to `to` if it is still in `from` of `generation`.
    pub fn transition(&self, generation: u32, from: u32, to: u32) -> bool {
        self.0
            .compare_exchange(
                Self::pack(generation, from),
                Self::pack(generation, to),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Frees the slot if it still belongs to `generation` (whatever its state); false when it was
    /// already free or belongs to another generation by now.
    pub fn free(&self, generation: u32) -> bool {
        loop {
            let w = self.0.load(Ordering::Acquire);
            if (w >> 32) as u32 != generation || w as u32 == FREE {
                return false;
            }
            if self
                .0
                .compare_exchange(w, Self::pack(generation, FREE), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
        }
    }
}

/// A spin lock in shared memory for sections of a few hundred instructions that allocate nothing and
/// call nothing that can raise an ERROR. Released by its guard, also when a panic unwinds through it.
/// Waiters back off to `sched_yield` and then to short sleeps, so a holder that is descheduled does not
/// have every other process burning a core.
#[repr(C)]
pub struct SpinLock(AtomicU32);

/// Holds a [`SpinLock`] until dropped.
pub struct SpinGuard<'a>(&'a SpinLock);

impl SpinLock {
    pub fn lock(&self) -> SpinGuard<'_> {
        let mut tries = 0u32;
        while self.0.compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            tries += 1;
            if tries < 64 {
                std::hint::spin_loop();
            } else if tries < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        SpinGuard(self)
    }
}

impl Drop for SpinGuard<'_> {
    fn drop(&mut self) {
        self.0.0.store(0, Ordering::Release);
    }
}

/// A fixed-capacity string in shared memory, written by a slot's owner before publication.
#[repr(C)]
pub struct ShmemStr<const N: usize> {
    len: AtomicU32,
    bytes: [AtomicU8; N],
}

impl<const N: usize> ShmemStr<N> {
    /// Capacity in bytes.
    pub const CAPACITY: usize = N;

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

    /// Stores as much of `s` as fits, cut at a character boundary. Only for text shown to people
    /// (errors), never for anything a job acts on.
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
    /// Overlap analysis with a peer (PRODUCT.md §10): a coordinator whose scans are generate jobs in
    /// digest mode, one on each node.
    Overlap = 3,
}

/// A generate job in digest mode (an overlap scan): its chunks are digest files, without manifest or
/// sequences (`JobSlot::flags`; apply's flags use other bits).
pub const FLAG_DIGEST: u32 = 1 << 9;

/// An overlap job that goes on to merge the two nodes (`start_merge`): op `merge`.
pub const FLAG_MERGE: u32 = 1 << 10;

/// Lifecycle of a job slot (the state part of its [`SlotWord`]).
pub mod job_state {
    pub const FREE: u32 = super::FREE;
    /// Claimed by `start_*`; the leader is being launched or has not attached yet.
    pub const STARTING: u32 = 1;
    /// The leader attached and runs the job.
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
    /// Generate with a slot: creating it, waiting for the transactions running when it started.
    Slot = 12,
    /// Apply: building the indexes it deferred (after the data, or to restore them after a failure).
    Indexes = 13,
    /// Overlap: both nodes hash their rows (each in its own scan job).
    Scan = 14,
    /// Overlap: the two nodes' digests are compared, top-down.
    Compare = 15,
    /// Merge: differing rows are copied and settled, table by table.
    Merge = 16,
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
            12 => Phase::Slot,
            13 => Phase::Indexes,
            14 => Phase::Scan,
            15 => Phase::Compare,
            16 => Phase::Merge,
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
            Phase::Slot => "slot",
            Phase::Indexes => "indexes",
            Phase::Scan => "scan",
            Phase::Compare => "compare",
            Phase::Merge => "merge",
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
    pub word: SlotWord,
    pub kind: AtomicU32,
    pub id: ShmemStr<JOB_ID_LEN>,
    pub database_oid: AtomicU32,
    pub role_oid: AtomicU32,
    /// Transaction id of the `start_*` call; the leader waits for it to commit.
    pub caller_xid: AtomicU32,
    /// The backend that claimed the slot in `start_*`; while the leader is not known yet, a dead
    /// claimer means the slot was abandoned (its backend died between claim and launch).
    pub claimer_pid: AtomicI32,
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
    /// First error of any process of the job (first writer wins through `error_claimed`): `error` as
    /// every role may read it (no row data), `error_full` for the job's role and superusers.
    pub error_claimed: AtomicU32,
    pub error: ShmemStr<1024>,
    pub error_full: ShmemStr<2048>,
    /// Something the user should know about the job that does not stop it (an apply that will force
    /// checkpoints: `steep_repl_engine::checkpoints`); empty when nothing.
    pub warning: ShmemStr<512>,
    pub path: ShmemStr<MAX_PATH_BYTES>,
    /// Snapshot to import: given by the caller (empty = export a new one), then the exported one.
    pub snapshot_name: ShmemStr<64>,
    /// Snapshot the data workers import; set by the leader when chunks are published.
    pub export_name: ShmemStr<64>,
    /// Generate: the logical replication slot to create and read at (empty = none).
    pub slot_name: ShmemStr<64>,
    /// The caller's TimeZone, pinned in every worker.
    pub timezone: ShmemStr<64>,
    /// Apply: SHA-256 (hex) of the manifest the job was started on; every process that reads the
    /// manifest checks it, so a snapshot directory replaced under a job is refused, not mixed.
    pub manifest_sha256: ShmemStr<64>,
    /// Compression: 0 = none, otherwise the zstd level.
    pub zstd_level: AtomicI32,
    pub parallel_requested: AtomicU32,
    pub workers_launched: AtomicU32,
    /// Chunk plan: slots [chunk_base, chunk_base + chunk_count) of the chunk array.
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
    /// Options of a job (apply: `worker::apply::flags`; generate: `api::snapshot::FLAG_*`).
    pub flags: AtomicU32,
    /// Around an apply's chunk claims (see `Shared::claim_chunk_preferring_idle_tables`).
    pub claim_lock: SpinLock,
}

/// One process working for a job. Written by that process alone (counters), and by its launcher and
/// the supervisor only through the slot word.
#[repr(C, align(64))]
pub struct WorkerSlot {
    pub word: SlotWord,
    pub pid: AtomicI32,
    /// The job this worker serves: its slot index and generation.
    pub job_slot: AtomicU32,
    pub job_gen: AtomicU32,
    /// Chunk being worked on (absolute slot index + 1; 0 = none).
    pub current_chunk: AtomicU32,
    pub rows: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub file_bytes: AtomicU64,
}

/// Lifecycle of a worker slot (the state part of its [`SlotWord`]).
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
    /// Apply: slot index (relative to the job's base) of the first unit of the same table.
    pub table_head: AtomicU32,
    /// Apply, on a table's first unit: units of the table not yet loaded.
    pub table_left: AtomicU32,
    /// Apply, on a table's first unit: whether a worker has claimed or run its ANALYZE
    /// ([`analyze_state`]).
    pub analyze: AtomicU32,
}

/// Where a table's ANALYZE stands in an apply (on its first unit's slot).
pub mod analyze_state {
    /// Not run yet: the leader runs it at the end unless a worker claims it first.
    pub const TODO: u32 = 0;
    /// A worker is running it.
    pub const CLAIMED: u32 = 1;
    /// Run and committed.
    pub const DONE: u32 = 2;
}

/// Lifecycle of a chunk slot.
pub mod chunk_state {
    pub const PENDING: u32 = 0;
    pub const CLAIMED: u32 = 1;
    pub const DONE: u32 = 2;
}

/// The fixed-size shared block.
#[repr(C)]
pub struct Shared {
    magic: AtomicU64,
    /// Pid of the supervisor background worker, 0 when not running.
    pub supervisor_pid: AtomicI32,
    /// Unix time in ms of the supervisor's last wake-up.
    pub supervisor_heartbeat_ms: AtomicU64,
    /// The supervisor's latch, so that a request for it is acted on at once.
    pub supervisor_latch: AtomicUsize,
    /// 1 once the interrupted jobs of every database were reaped after this server start.
    pub startup_reaped: AtomicU32,
    /// Databases (oids) whose `pending`/`running` rows a reaper must look at; 0 = empty entry.
    pub reap_requests: [AtomicU32; MAX_REAP_REQUESTS],
    /// Databases whose `steep_repl.nodes` the supervisor has probed every
    /// `steep_repl.heartbeat_interval`: each entry is a generation (high 32 bits) and a database oid
    /// (low 32 bits, 0 = empty entry). Filled when a `register_node` commits and, after a server start,
    /// by the reaper; an entry whose registry is empty is dropped by its prober, only if no watch
    /// happened since the prober looked (the generation), so a node registered meanwhile is never lost.
    node_databases: [AtomicU64; MAX_NODE_DATABASES],
    /// Around allocating chunk ranges; held for a scan of MAX_JOBS entries only.
    chunk_alloc_lock: SpinLock,
    pub jobs: [JobSlot; MAX_JOBS],
    pub workers: [WorkerSlot; MAX_WORKERS],
}

/// The chunk array, in a block of its own sized by `steep_repl.max_chunk_slots`.
static mut CHUNKS: (*const ChunkSlot, usize) = (std::ptr::null(), 0);

impl Shared {
    /// The chunk slots shared by all running jobs.
    pub fn chunks(&self) -> &'static [ChunkSlot] {
        // SAFETY: CHUNKS is written once per process at shared-memory startup, before any SQL function
        // or worker of this library runs, and points to `len` initialised slots that live as long as the
        // server. A `Shared` exists only after that startup.
        unsafe {
            let (ptr, len) = CHUNKS;
            if ptr.is_null() { &[] } else { std::slice::from_raw_parts(ptr, len) }
        }
    }

    /// Claims a free job slot for a new job: (slot index, generation), the slot in STARTING with
    /// every field reset and `claimer_pid` set to this process.
    pub fn claim_job_slot(&self) -> Option<(usize, u32)> {
        self.jobs.iter().enumerate().find_map(|(i, j)| {
            j.word.claim(job_state::STARTING).map(|generation| {
                j.reset();
                j.claimer_pid.store(pg::my_pid(), Ordering::Release);
                (i, generation)
            })
        })
    }

    /// The slot of the job with this text id, if a job slot holds it.
    pub fn find_job(&self, id: &str) -> Option<usize> {
        self.jobs.iter().position(|j| j.word.state() != FREE && j.id.get() == id)
    }

    /// Jobs currently holding a slot, as (slot index, slot).
    pub fn active_jobs(&self) -> impl Iterator<Item = (usize, &JobSlot)> {
        self.jobs.iter().enumerate().filter(|(_, j)| j.word.state() != FREE)
    }

    /// Frees job slot `slot` of `generation` (and with it its chunk range), then wakes the sessions
    /// waiting for the job to end. Only for a job whose leader has ended or never started and none of
    /// whose workers can still write (see the module documentation). A waiter registers before it
    /// checks that the slot still holds its job, so it either sees the slot free or is woken here.
    pub fn release_job(&self, slot: usize, generation: u32) -> bool {
        self.release_job_in(slot, generation, None)
    }

    /// [`release_job`](Self::release_job), only if the slot is still in state `only_from` (when given):
    /// the supervisor frees a slot whose claimer died only while no leader has attached to it.
    pub fn release_job_in(&self, slot: usize, generation: u32, only_from: Option<u32>) -> bool {
        let j = &self.jobs[slot];
        let freed = match only_from {
            Some(state) => j.word.transition(generation, state, FREE),
            None => j.word.free(generation),
        };
        if !freed {
            return false;
        }
        for w in &j.waiters {
            crate::pg::set_latch(w.swap(0, Ordering::SeqCst));
        }
        true
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
        let _taken_by_release =
            self.jobs[slot].waiters[entry].compare_exchange(latch, 0, Ordering::SeqCst, Ordering::Relaxed);
    }

    /// Claims a free worker slot for job `job_slot` of generation `job_gen`: (slot index, the worker
    /// slot's generation), or None when all are taken.
    pub fn claim_worker_slot(&self, job_slot: usize, job_gen: u32) -> Option<(usize, u32)> {
        self.workers.iter().enumerate().find_map(|(i, w)| {
            w.word.claim(worker_state::LAUNCHING).map(|generation| {
                w.job_slot.store(job_slot as u32, Ordering::Relaxed);
                w.job_gen.store(job_gen, Ordering::Relaxed);
                w.pid.store(0, Ordering::Relaxed);
                w.current_chunk.store(0, Ordering::Relaxed);
                w.rows.store(0, Ordering::Relaxed);
                w.raw_bytes.store(0, Ordering::Relaxed);
                w.file_bytes.store(0, Ordering::Release);
                (i, generation)
            })
        })
    }

    /// Number of worker slots in use, by every job.
    pub fn workers_in_use(&self) -> usize {
        self.workers.iter().filter(|w| w.word.state() != FREE).count()
    }

    /// Worker slots of job `job_slot` (any generation of it when `job_gen` is None), as (slot index,
    /// slot, the worker slot's generation), whatever their state.
    pub fn job_workers(
        &self,
        job_slot: usize,
        job_gen: Option<u32>,
    ) -> impl Iterator<Item = (usize, &WorkerSlot, u32)> {
        self.workers.iter().enumerate().filter_map(move |(i, w)| {
            let (generation, state) = w.word.get();
            let mine = state != FREE
                && w.job_slot.load(Ordering::Relaxed) as usize == job_slot
                && job_gen.is_none_or(|g| w.job_gen.load(Ordering::Relaxed) == g);
            mine.then_some((i, w, generation))
        })
    }

    /// Allocates `n` contiguous chunk slots for a job, returning the first index, or None when no
    /// free range is large enough.
    pub fn alloc_chunks(&self, job_slot: usize, n: usize) -> Option<usize> {
        let capacity = self.chunks().len();
        if n == 0 {
            return Some(0);
        }
        let _guard = self.chunk_alloc_lock.lock();
        // Ranges of the other jobs, on the stack: nothing is allocated while the lock is held.
        let mut used = [(0usize, 0usize); MAX_JOBS];
        let mut k = 0;
        for (i, j) in self.jobs.iter().enumerate() {
            if i == job_slot || j.word.state() == FREE {
                continue;
            }
            let c = j.chunk_count.load(Ordering::Relaxed) as usize;
            if c > 0 {
                used[k] = (j.chunk_base.load(Ordering::Relaxed) as usize, c);
                k += 1;
            }
        }
        let used = &mut used[..k];
        used.sort_unstable();
        let mut start = 0usize;
        let mut found = None;
        for &(b, c) in used.iter().chain(std::iter::once(&(capacity, 0))) {
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
        found
    }

    /// The largest number of chunk slots free in one range now (for error hints).
    pub fn free_chunk_slots(&self) -> usize {
        let used: usize = self
            .jobs
            .iter()
            .filter(|j| j.word.state() != FREE)
            .map(|j| j.chunk_count.load(Ordering::Relaxed) as usize)
            .sum();
        self.chunks().len().saturating_sub(used)
    }

    /// Asks the supervisor to have the interrupted jobs of database `db` reaped.
    pub fn request_reap(&self, db: u32) {
        if db == 0 || self.reap_requests.iter().any(|r| r.load(Ordering::Acquire) == db) {
            pg::set_latch(self.supervisor_latch.load(Ordering::Acquire));
            return;
        }
        for r in &self.reap_requests {
            if r.compare_exchange(0, db, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                break;
            }
        }
        pg::set_latch(self.supervisor_latch.load(Ordering::Acquire));
    }
}

impl Shared {
    /// Has the supervisor probe the nodes registered in database `db` (again: a new generation);
    /// false when [`MAX_NODE_DATABASES`] other databases already have a registry. Only atomics and a
    /// latch: safe in a commit callback.
    pub fn watch_nodes(&self, db: u32) -> bool {
        if db == 0 {
            return false;
        }
        let done = 'found: {
            for d in &self.node_databases {
                let mut w = d.load(Ordering::Acquire);
                while w as u32 == db {
                    match d.compare_exchange(w, next_watch(w, db), Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => break 'found true,
                        Err(now) => w = now,
                    }
                }
            }
            for d in &self.node_databases {
                let w = d.load(Ordering::Acquire);
                if w as u32 == 0
                    && d.compare_exchange(w, next_watch(w, db), Ordering::AcqRel, Ordering::Acquire).is_ok()
                {
                    break 'found true;
                }
            }
            false
        };
        pg::set_latch(self.supervisor_latch.load(Ordering::Acquire));
        done
    }

    /// Whether [`Shared::watch_nodes`] would find room for `db`.
    pub fn room_for_nodes(&self, db: u32) -> bool {
        self.node_databases.iter().any(|d| {
            let w = d.load(Ordering::Acquire) as u32;
            w == db || w == 0
        })
    }

    /// The watched databases, with the word to give [`Shared::unwatch_nodes`].
    pub fn watched_node_databases(&self) -> Vec<(u32, u64)> {
        self.node_databases
            .iter()
            .map(|d| d.load(Ordering::Acquire))
            .filter(|&w| w as u32 != 0)
            .map(|w| (w as u32, w))
            .collect()
    }

    /// The entry of database `db` now, if watched.
    pub fn node_watch(&self, db: u32) -> Option<u64> {
        self.watched_node_databases().into_iter().find(|&(d, _)| d == db).map(|(_, w)| w)
    }

    /// Stops probing the registry of database `db` (found empty), unless it was watched again since
    /// `seen` was read.
    pub fn unwatch_nodes(&self, db: u32, seen: u64) {
        for d in &self.node_databases {
            if d.load(Ordering::Acquire) == seen && seen as u32 == db {
                let _ = d.compare_exchange(seen, seen & !0xffff_ffff, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }
}

/// The next word of a node-database entry: generation + 1, database `db`.
fn next_watch(word: u64, db: u32) -> u64 {
    (((word >> 32) + 1) << 32) | u64::from(db)
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
        let chunks = self.chunks();
        let base = job.chunk_base.load(Ordering::Acquire) as usize;
        let count = job.chunk_count.load(Ordering::Acquire) as usize;
        let _guard = job.claim_lock.lock();
        // Tables other workers of the job load now, on the stack: nothing is allocated under the lock.
        let mut busy = [u32::MAX; MAX_WORKERS];
        let mut nbusy = 0;
        for (i, w) in self.workers.iter().enumerate() {
            if i == me || w.word.state() == FREE || w.job_slot.load(Ordering::Relaxed) as usize != slot {
                continue;
            }
            let c = w.current_chunk.load(Ordering::Acquire) as usize;
            if c > 0 && c <= chunks.len() {
                busy[nbusy] = chunks[c - 1].table.load(Ordering::Relaxed);
                nbusy += 1;
            }
        }
        let busy = &busy[..nbusy];
        let mut first = job.chunk_cursor.load(Ordering::Relaxed) as usize;
        while first < count && chunks[base + first].state.load(Ordering::Acquire) != chunk_state::PENDING {
            first += 1;
        }
        job.chunk_cursor.store(first as u32, Ordering::Relaxed);
        let pending = |k: &usize| chunks[base + k].state.load(Ordering::Acquire) == chunk_state::PENDING;
        let window = first..count.min(first + CLAIM_WINDOW);
        // Skipping ahead must not pull a small unit of the tail before a large one: only units at least
        // half as large as the first pending one qualify (`raw_bytes` holds a pending unit's estimate).
        let size = |k: usize| chunks[base + k].raw_bytes.load(Ordering::Relaxed);
        let floor = if first < count { size(first) / 2 } else { 0 };
        let pick = window
            .clone()
            .filter(pending)
            .filter(|&k| size(k) >= floor)
            .find(|&k| !busy.contains(&chunks[base + k].table.load(Ordering::Relaxed)))
            .or_else(|| window.clone().find(pending));
        if let Some(k) = pick {
            chunks[base + k].state.store(chunk_state::CLAIMED, Ordering::Release);
            self.workers[me].current_chunk.store((base + k + 1) as u32, Ordering::Release);
        }
        pick.map(|k| k as u32)
    }

    /// Apply: the tables of job `slot` with a unit in this run: each one's index in the manifest, the
    /// slot (absolute index) of its first unit, and whether all its units are done.
    pub fn apply_tables(&self, slot: usize) -> Vec<(u32, usize, bool)> {
        let job = &self.jobs[slot];
        let base = job.chunk_base.load(Ordering::Acquire) as usize;
        let count = job.chunk_count.load(Ordering::Acquire) as usize;
        self.chunks()[base..base + count]
            .iter()
            .enumerate()
            .filter(|(k, u)| u.table_head.load(Ordering::Relaxed) as usize == *k)
            .map(|(k, u)| {
                (u.table.load(Ordering::Relaxed), base + k, u.table_left.load(Ordering::Acquire) == 0)
            })
            .collect()
    }

    /// Apply: claims for ANALYZE, of `candidates` (first units' slots, absolute, of tables whose units
    /// are all done), those no one claimed before and that `wanted` accepts (by relid).
    pub fn claim_tables_to_analyze(
        &self,
        candidates: impl IntoIterator<Item = usize>,
        wanted: impl Fn(u32) -> bool,
    ) -> Vec<usize> {
        let chunks = self.chunks();
        candidates
            .into_iter()
            .filter(|&first| {
                let s = &chunks[first];
                s.analyze.load(Ordering::Acquire) == analyze_state::TODO
                    && wanted(s.relid.load(Ordering::Relaxed))
                    && s.analyze
                        .compare_exchange(
                            analyze_state::TODO,
                            analyze_state::CLAIMED,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
            })
            .collect()
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
    /// Resets every field but the slot word, for a slot just claimed.
    fn reset(&self) {
        for a in [
            &self.kind,
            &self.database_oid,
            &self.role_oid,
            &self.caller_xid,
            &self.phase,
            &self.stop,
            &self.cancelled,
            &self.error_claimed,
            &self.parallel_requested,
            &self.workers_launched,
            &self.chunk_base,
            &self.chunk_count,
            &self.chunk_cursor,
            &self.chunks_ready,
            &self.chunks_done,
            &self.chunks_total,
            &self.units_done,
            &self.tables_total,
            &self.tables_done,
            &self.flags,
            &self.notified_phase,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        for a in [
            &self.work_total,
            &self.work_done,
            &self.chunk_bytes,
            &self.chunk_pause_ms,
            &self.last_persist_ms,
            &self.rows,
            &self.raw_bytes,
            &self.file_bytes,
            &self.started_ms,
            &self.last_notify_ms,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.claimer_pid.store(0, Ordering::Relaxed);
        self.leader_pid.store(0, Ordering::Relaxed);
        self.leader_latch.store(0, Ordering::Relaxed);
        self.zstd_level.store(0, Ordering::Relaxed);
        for s in [
            &self.error as &dyn ClearStr,
            &self.error_full,
            &self.warning,
            &self.path,
            &self.snapshot_name,
            &self.export_name,
            &self.slot_name,
            &self.timezone,
            &self.manifest_sha256,
            &self.id,
        ] {
            s.clear_str();
        }
    }

    /// Records the job's first error (later ones are dropped) and tells every process to stop.
    /// `public` is what every role may read (no row data); `full` what the job's role may read.
    pub fn fail_with(&self, public: &str, full: &str) {
        if self.error_claimed.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            self.error.set_truncated(public);
            self.error_full.set_truncated(full);
        }
        self.stop.store(1, Ordering::Release);
    }

    /// [`fail_with`](Self::fail_with) for a message that holds no row data.
    pub fn fail(&self, message: &str) {
        self.fail_with(message, message);
    }

    /// The recorded error as every role may read it, if any.
    pub fn error_message(&self) -> Option<String> {
        (self.error_claimed.load(Ordering::Acquire) != 0).then(|| self.error.get())
    }

    /// The recorded error with its details (for the job's role and superusers), if any.
    pub fn error_message_full(&self) -> Option<String> {
        (self.error_claimed.load(Ordering::Acquire) != 0).then(|| self.error_full.get())
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
        match self.kind.load(Ordering::Acquire) {
            k if k == JobKind::Apply as u32 => JobKind::Apply,
            k if k == JobKind::Overlap as u32 => JobKind::Overlap,
            _ => JobKind::Generate,
        }
    }

    /// The operation's name as `steep_repl.snapshots.op`, progress and NOTIFY show it.
    pub fn op_name(&self) -> &'static str {
        match self.kind() {
            JobKind::Generate if self.flags.load(Ordering::Relaxed) & FLAG_DIGEST != 0 => "overlap_scan",
            JobKind::Generate => "generate",
            JobKind::Apply => "apply",
            JobKind::Overlap if self.flags.load(Ordering::Relaxed) & FLAG_MERGE != 0 => "merge",
            JobKind::Overlap => "overlap",
        }
    }
}

static mut SHARED: *const Shared = std::ptr::null();

/// Registers the shared-memory requests and startup hooks. Called once from `_PG_init` during
/// `shared_preload_libraries` processing, and only then, after the settings are defined.
pub fn init() {
    let chunk_slots = crate::gucs::MAX_CHUNK_SLOTS.get().max(1) as usize;
    pg::request_shmem(
        &[std::mem::size_of::<Shared>(), chunk_slots * std::mem::size_of::<ChunkSlot>()],
        on_shmem_startup,
    );
}

/// Runs in the postmaster (and, on EXEC_BACKEND builds, in each child) once shared memory exists, with
/// the blocks requested by [`init`] and whether they already existed.
fn on_shmem_startup(blocks: &[(*mut u8, usize)], found: bool) {
    let (ptr, len) = blocks[0];
    let (chunks, chunks_len) = blocks[1];
    let shared = ptr as *mut Shared;
    if !found {
        // SAFETY: both blocks are fresh, cache-line-aligned shared memory of the sizes requested that no
        // other process uses yet (we hold AddinShmemInitLock). All-zero bytes are a valid `Shared` and
        // valid `ChunkSlot`s: every field is an atomic integer or an array of them.
        unsafe {
            std::ptr::write_bytes(ptr, 0, len);
            std::ptr::write_bytes(chunks, 0, chunks_len);
            (*shared).magic.store(MAGIC, Ordering::Release);
        }
    }
    // SAFETY: written once per process, here, before any SQL function or worker of this library runs.
    unsafe {
        SHARED = shared;
        CHUNKS = (chunks as *const ChunkSlot, chunks_len / std::mem::size_of::<ChunkSlot>());
    }
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

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn slot_words_move_only_with_the_right_generation() {
        let w = SlotWord(AtomicU64::new(0));
        let g = w.claim(1).expect("free slot claims");
        assert_eq!(g, 1);
        assert!(w.claim(1).is_none(), "a held slot cannot be claimed again");
        assert!(!w.transition(g + 1, 1, 2), "a stale generation moves nothing");
        assert!(w.transition(g, 1, 2));
        assert!(!w.free(g + 1));
        assert!(w.free(g));
        assert!(!w.free(g), "freeing twice does nothing");
        let g2 = w.claim(1).unwrap();
        assert_eq!(g2, g + 1);
        assert!(!w.free(g), "the old generation cannot free the new owner's slot");
        assert!(!w.transition(g, 1, 3));
        assert_eq!(w.get(), (g2, 1));
    }

    #[pg_test]
    fn generation_zero_is_never_handed_out() {
        let w = SlotWord(AtomicU64::new(SlotWord::pack(u32::MAX, FREE)));
        assert_eq!(w.claim(1), Some(1));
    }

    #[pg_test]
    fn spin_lock_guards_release_on_drop_and_unwind() {
        let l = SpinLock(AtomicU32::new(0));
        drop(l.lock());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _g = l.lock();
            panic!("inside");
        }));
        assert!(r.is_err());
        drop(l.lock());
    }
}

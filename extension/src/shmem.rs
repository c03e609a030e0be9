//! Shared memory: fixed slot arrays that the leader, the workers and any backend reading progress share.
//!
//! Layout (one `#[repr(C)]` block, zero-filled at server start, every field an atomic so that any process
//! may read it without a lock):
//!
//! ```text
//! Shared
//! ├── magic, supervisor pid and heartbeat
//! ├── jobs:    [JobSlot; MAX_JOBS]       one per running generate/apply operation
//! └── workers: [WorkerSlot; MAX_WORKERS] one per running dynamic worker, its own progress figures
//! ```
//!
//! Ownership rules: a slot is claimed by compare-and-swap of its `state` from FREE; only its owner writes
//! its other fields (relaxed stores); readers tolerate figures that are a moment old. A slot is released
//! by storing FREE last.
//!
//! The block is created with `ShmemInitStruct` rather than `pg_shmem_init!`, because the latter builds
//! the value on the postmaster's stack before copying it, and slot arrays grow to megabytes.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::pg;

/// Most operations that can run at once on one server.
pub const MAX_JOBS: usize = 16;
/// Most dynamic workers steep_repl can run at once; also the ceiling of `steep_repl.max_workers`.
pub const MAX_WORKERS: usize = 64;

const MAGIC: u64 = 0x5354_4545_5052_0001; // "STEEPR" + layout version 1

/// A slot's lifecycle value: free to claim.
pub const FREE: u32 = 0;

/// One running operation. Fields beyond `state` are written by the slot's owner only.
#[repr(C, align(64))]
#[derive(Default)]
pub struct JobSlot {
    /// FREE, or a non-zero state owned by the job.
    pub state: AtomicU32,
    /// The job's numeric id (its text id is derived from it, see `api`).
    pub job_id: AtomicU64,
    /// Database the job runs in.
    pub database_oid: AtomicU32,
    /// Rows and raw bytes done so far, summed by the leader from its workers.
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
}

/// One running dynamic worker's progress, written by that worker alone.
#[repr(C, align(64))]
#[derive(Default)]
pub struct WorkerSlot {
    pub state: AtomicU32,
    pub pid: AtomicI32,
    /// Index of the job slot this worker serves.
    pub job_slot: AtomicU32,
    pub rows: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
}

/// The whole shared block.
#[repr(C)]
pub struct Shared {
    magic: AtomicU64,
    /// Pid of the supervisor background worker, 0 when not running.
    pub supervisor_pid: AtomicI32,
    /// Unix time in ms of the supervisor's last wake-up.
    pub supervisor_heartbeat_ms: AtomicU64,
    pub jobs: [JobSlot; MAX_JOBS],
    pub workers: [WorkerSlot; MAX_WORKERS],
}

impl Shared {
    /// Claims a free worker slot, returning its index, or None when all are taken.
    pub fn claim_worker_slot(&self, job_slot: u32, state: u32) -> Option<usize> {
        debug_assert_ne!(state, FREE);
        self.workers.iter().position(|w| {
            w.state
                .compare_exchange(FREE, state, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
                && {
                    w.job_slot.store(job_slot, Ordering::Relaxed);
                    w.rows.store(0, Ordering::Relaxed);
                    w.raw_bytes.store(0, Ordering::Relaxed);
                    w.written_bytes.store(0, Ordering::Relaxed);
                    true
                }
        })
    }

    /// Number of worker slots currently in use.
    pub fn workers_in_use(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.state.load(Ordering::Acquire) != FREE)
            .count()
    }

    /// Jobs currently holding a slot, as (slot index, slot).
    pub fn active_jobs(&self) -> impl Iterator<Item = (usize, &JobSlot)> {
        self.jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| j.state.load(Ordering::Acquire) != FREE)
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
        // SAFETY: `ptr` points to `size_of::<Shared>()` bytes of fresh shared memory that no other
        // process can see yet (we hold AddinShmemInitLock). All-zero bytes are a valid `Shared`: every
        // field is an atomic integer.
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

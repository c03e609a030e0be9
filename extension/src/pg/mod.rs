//! Safe wrappers over the PostgreSQL C API. Every `unsafe` call into PostgreSQL that the rest of the
//! extension needs lives here, once, with the invariant it relies on written beside it.

pub mod catalog;
pub mod copy_from;
pub mod rights;
pub mod scan;
pub mod session;
pub mod slot;
pub mod wal;
pub mod xact;

use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The exact line an administrator has to add; quoted in every "not preloaded" error.
pub const PRELOAD_LINE: &str = "shared_preload_libraries = 'steep_repl'";

static PRELOADED: AtomicBool = AtomicBool::new(false);

/// True while `_PG_init` runs as part of `shared_preload_libraries` processing at server start.
pub fn loading_for_preload() -> bool {
    // SAFETY: a plain global bool that the postmaster sets before loading preload libraries and
    // clears after; reading it has no side effects.
    unsafe { pg_sys::process_shared_preload_libraries_in_progress }
}

/// Records that this process's copy of the library was loaded at server start. Backends forked from the
/// postmaster inherit the flag (fork copies memory), so each one knows whether shared memory exists.
pub fn mark_preloaded() {
    PRELOADED.store(true, Ordering::Relaxed);
}

/// Whether the library was loaded through `shared_preload_libraries`.
pub fn is_preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Raises the ERROR that every preload-only function raises when the library was loaded another way.
pub fn error_not_preloaded() -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "steep_repl is not loaded through shared_preload_libraries; this function needs {PRELOAD_LINE}"
        ),
        "steep_repl::pg::error_not_preloaded",
    )
    .set_hint(format!(
        "Add {PRELOAD_LINE} to postgresql.conf (or ALTER SYSTEM SET shared_preload_libraries = 'steep_repl') \
         and restart the server. steep_repl.health() works without it."
    ))
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

type ShmemStartup = fn(&[(*mut u8, usize)], bool);

/// Names of the shared-memory blocks, in the order `request_shmem` takes their sizes.
const SHMEM_NAMES: [&std::ffi::CStr; SHMEM_BLOCKS] = [c"steep_repl shared state", c"steep_repl chunk slots"];
const SHMEM_BLOCKS: usize = 2;
/// Extra bytes requested per block so it can be aligned to a cache line whatever ShmemInitStruct returns.
const SHMEM_ALIGN: usize = 64;

static mut SHMEM_SIZES: [usize; SHMEM_BLOCKS] = [0; SHMEM_BLOCKS];
static mut SHMEM_STARTUP: Option<ShmemStartup> = None;
static mut PREV_SHMEM_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_SHMEM_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;

/// Reserves the shared-memory blocks of `sizes` (bytes each; "steep_repl shared state", then "steep_repl
/// chunk slots") and arranges for `startup` to run, under AddinShmemInitLock, with a cache-line-aligned
/// pointer and the size of each, and whether they already existed. Must be called from `_PG_init` during
/// `shared_preload_libraries` processing.
pub fn request_shmem(sizes: &[usize; SHMEM_BLOCKS], startup: ShmemStartup) {
    // SAFETY: `_PG_init` runs single-threaded in the postmaster before shared memory is created; the
    // statics are written only here and read only by the hooks PostgreSQL calls afterwards. The previous
    // hooks are chained so other preloaded libraries keep working.
    unsafe {
        SHMEM_SIZES = *sizes;
        SHMEM_STARTUP = Some(startup);
        PREV_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup_hook);
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        pg_sys::RequestAddinShmemSpace(shmem_total());
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        {
            PREV_SHMEM_REQUEST_HOOK = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(shmem_request_hook);
        }
    }
}

/// Bytes to reserve for every block, alignment slack included.
fn shmem_total() -> usize {
    // SAFETY: SHMEM_SIZES is written once in `_PG_init`, before PostgreSQL calls any hook.
    let sizes = unsafe { SHMEM_SIZES };
    sizes.iter().map(|s| s + SHMEM_ALIGN).sum()
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pg_guard]
unsafe extern "C-unwind" fn shmem_request_hook() {
    // SAFETY: PostgreSQL calls this hook in the postmaster while shared memory requests are accepted.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(shmem_total());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup_hook() {
    // SAFETY: PostgreSQL calls this hook once shared memory exists. AddinShmemInitLock (slot 21 of the
    // main LWLock array, as in lwlocknames.h) serialises initialisation between processes; the space was
    // reserved by the request above, so ShmemInitStruct cannot run out of it.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP_HOOK {
            prev();
        }
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut blocks = [(std::ptr::null_mut::<u8>(), 0usize); SHMEM_BLOCKS];
        let mut all_found = true;
        for (k, name) in SHMEM_NAMES.iter().enumerate() {
            let size = SHMEM_SIZES[k];
            let mut found = false;
            let raw = pg_sys::ShmemInitStruct(name.as_ptr(), size + SHMEM_ALIGN, &mut found) as *mut u8;
            all_found &= found;
            blocks[k] = (raw.add(raw.align_offset(SHMEM_ALIGN)), size);
        }
        if let Some(startup) = SHMEM_STARTUP {
            startup(&blocks, all_found);
        }
        pg_sys::LWLockRelease(lock);
    }
}

/// This process's id.
pub fn my_pid() -> i32 {
    // SAFETY: set once at process start, read-only afterwards.
    unsafe { pg_sys::MyProcPid }
}

/// A handle on this process's latch that other processes can set: the address of `MyProc->procLatch`,
/// which lives in shared memory mapped at the same address in every process of the server. 0 when the
/// process has no PGPROC.
pub fn my_latch() -> usize {
    // SAFETY: MyProc is set by InitProcess before any extension code runs in a backend or background
    // worker, and stays valid (in shared memory) until the process exits; we only take an address.
    unsafe { if pg_sys::MyProc.is_null() { 0 } else { (&raw mut (*pg_sys::MyProc).procLatch) as usize } }
}

/// Sets the latch `latch` (from [`my_latch`] of some process), waking that process if it waits on it.
/// A latch whose process has exited belongs to a free or reused PGPROC slot: setting it then causes at
/// most a spurious wake-up, which every latch waiter tolerates. 0 is ignored.
pub fn set_latch(latch: usize) {
    if latch == 0 {
        return;
    }
    // SAFETY: `latch` is the address of a PGPROC's procLatch in shared memory (see my_latch), which
    // stays mapped for the life of the server; SetLatch is safe to call on any process's latch.
    unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) }
}

/// The name of the current database's encoding (`UTF8`, `LATIN1`, ...).
pub fn database_encoding() -> String {
    // SAFETY: GetDatabaseEncodingName returns a static string; valid once connected to a database.
    unsafe { std::ffi::CStr::from_ptr(pg_sys::GetDatabaseEncodingName()).to_string_lossy().into_owned() }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `max_worker_processes`, the server-wide pool dynamic workers come from.
pub fn max_worker_processes() -> i32 {
    // SAFETY: a GUC variable, set at server start (PGC_POSTMASTER) and never changed afterwards.
    unsafe { pg_sys::max_worker_processes }
}

/// Whether a process with this pid exists (signal 0 checks without sending anything).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: kill(pid, 0) only checks existence and permission; it sends no signal.
    let rc = unsafe { libc_kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(EPERM)
}

const EPERM: i32 = 1;

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

unsafe extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends (tcop/postgres.c), by its C symbol: the binding pgrx
    /// generates is a Rust wrapper, not a function pointer a signal can call.
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

/// Schema and name of a relation, or None if it no longer exists.
pub fn relation_name(relid: pg_sys::Oid) -> Option<(String, String)> {
    // SAFETY: syscache lookups inside a transaction; both return palloc'd strings or NULL.
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        if name.is_null() {
            return None;
        }
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if nsp.is_null() {
            return None;
        }
        Some((
            std::ffi::CStr::from_ptr(nsp).to_string_lossy().into_owned(),
            std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned(),
        ))
    }
}

/// Takes `lockmode` on a relation by oid for the rest of the transaction (no SQL text involved).
pub fn lock_relation(relid: pg_sys::Oid, lockmode: u32) {
    // SAFETY: inside a transaction; LockRelationOid waits for the lock (or raises an ERROR on deadlock
    // or cancel). Locking the oid of a relation dropped meanwhile is harmless.
    unsafe { pg_sys::LockRelationOid(relid, lockmode as pg_sys::LOCKMODE) };
}

/// Takes `lockmode` on a relation of the current database for the rest of the session: unlike
/// [`lock_relation`] it survives the commits of later transactions. Released by
/// [`unlock_relation_for_session`], or when the process exits (also after an ERROR).
pub fn lock_relation_for_session(relid: pg_sys::Oid, lockmode: u32) {
    // SAFETY: called inside a transaction of a process connected to a database (MyDatabaseId is set);
    // LockRelationIdForSession waits for the lock or raises an ERROR on deadlock or cancel.
    unsafe {
        let mut id = pg_sys::LockRelId { relId: relid, dbId: pg_sys::MyDatabaseId };
        pg_sys::LockRelationIdForSession(&mut id, lockmode as pg_sys::LOCKMODE);
    }
}

/// Releases a lock taken by [`lock_relation_for_session`].
pub fn unlock_relation_for_session(relid: pg_sys::Oid, lockmode: u32) {
    // SAFETY: releases a session lock this process holds (taken by lock_relation_for_session).
    unsafe {
        let mut id = pg_sys::LockRelId { relId: relid, dbId: pg_sys::MyDatabaseId };
        pg_sys::UnlockRelationIdForSession(&mut id, lockmode as pg_sys::LOCKMODE);
    }
}

/// Sends SIGTERM to a process (a worker of ours that must stop now).
pub fn terminate_process(pid: i32) {
    // SAFETY: sends a signal; the pid belongs to one of our own workers, recorded in shared memory.
    unsafe {
        libc_kill(pid, 15);
    }
}

/// Oid of the database this backend is connected to.
pub fn database_oid() -> u32 {
    // SAFETY: set at connection time, read-only afterwards.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Oid of the current user (after SET ROLE / SECURITY DEFINER), whose privileges a job gets.
pub fn current_user_oid() -> u32 {
    // SAFETY: reads the current user id of this backend.
    unsafe { pg_sys::GetUserId() }.to_u32()
}

/// Name of the current user.
pub fn current_user_name() -> String {
    Spi::get_one::<String>("SELECT current_user::text").ok().flatten().unwrap_or_default()
}

/// Runs `callback(code, arg)` when this process exits, whatever the path (normal exit, ERROR or FATAL
/// exit, terminate), before it detaches from shared memory: where a process marks its slot. Callbacks
/// must only touch shared-memory atomics.
pub fn on_exit(callback: unsafe extern "C-unwind" fn(std::ffi::c_int, pg_sys::Datum), arg: pg_sys::Datum) {
    // SAFETY: registers a callback in this process's before_shmem_exit list (a fixed array PostgreSQL
    // owns); the callback is a plain function living as long as the library.
    unsafe { pg_sys::before_shmem_exit(Some(callback), arg) };
}

/// Makes SIGTERM end this process at its next interrupt check, wherever it is (a lock wait, a long
/// COPY), as parallel query workers do: PostgreSQL's `die` handler, then FATAL, then the exit callbacks
/// ([`on_exit`]). For data workers, whose leader cleans up after them.
pub fn die_on_sigterm() {
    // SAFETY: installs PostgreSQL's own SIGTERM handler for a backend-like process; `die` only sets
    // ProcDiePending/InterruptPending and the latch, which CHECK_FOR_INTERRUPTS acts on.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(on_sigterm));
    }
}

/// Set once SIGTERM arrived (PostgreSQL clears ProcDiePending when it acts on it, so exit callbacks
/// could not tell a terminate from another FATAL).
static TERMINATED: AtomicBool = AtomicBool::new(false);

/// Runs in signal context: only an atomic store and PostgreSQL's handler, no allocation, no guard.
unsafe extern "C-unwind" fn on_sigterm(signal: std::ffi::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
    // SAFETY: PostgreSQL's own handler, called as the signal handler it is (async-signal-safe: it sets
    // flags and the latch).
    unsafe { postgres_die(signal) };
}

/// The stop flag of the job a leader runs, for its SIGTERM handler (0 when none).
static LEADER_STOP: std::sync::atomic::AtomicPtr<std::sync::atomic::AtomicU32> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Makes SIGTERM stop this leader's job and interrupt whatever the leader waits in (a lock, a query),
/// while leaving it alive to clean up and record the job's end: the handler sets the job's stop flag
/// (`stop`, which every process of the job and the verification threads look at) and a query cancel,
/// which the next interrupt check turns into an ERROR. While a [`TerminateEndsProcess`] lives (an index
/// build, which may take hours and defers query cancels), SIGTERM ends the process instead, as
/// PostgreSQL's `die` does: a server shutdown must not wait for the build (its record stays for
/// `resume_apply`; the exit callback fails the job). SIGINT keeps PostgreSQL's statement-cancel
/// handler (except while a [`DeferCancel`] lives): `cancel_snapshot` sends it to interrupt a wait at once.
pub fn stop_job_on_sigterm(stop: &'static std::sync::atomic::AtomicU32) {
    LEADER_STOP.store(stop as *const _ as *mut _, Ordering::SeqCst);
    // SAFETY: installs a handler that only stores atomics, sets PostgreSQL's interrupt flags (as its
    // StatementCancelHandler does) and the latch: all async-signal-safe.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(leader_sigterm));
    }
}

/// Runs in signal context: atomics, PostgreSQL's interrupt flags and the latch only.
unsafe extern "C-unwind" fn leader_sigterm(_signal: std::ffi::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
    let stop = LEADER_STOP.load(Ordering::SeqCst);
    // SAFETY: LEADER_STOP points into shared memory, which lives as long as the process; the globals
    // are sig_atomic_t flags PostgreSQL's own handlers set the same way.
    unsafe {
        if !stop.is_null() {
            (*stop).store(1, Ordering::SeqCst);
        }
        if !pg_sys::proc_exit_inprogress {
            pg_sys::InterruptPending = 1;
            pg_sys::QueryCancelPending = 1;
            if TERMINATE_ENDS_PROCESS.load(Ordering::SeqCst) {
                pg_sys::ProcDiePending = 1;
            }
        }
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

/// Whether a leader's SIGTERM ends the process now ([`TerminateEndsProcess`]).
static TERMINATE_ENDS_PROCESS: AtomicBool = AtomicBool::new(false);

/// While it lives, SIGTERM ends a leader at its next interrupt check (PostgreSQL's `die`) instead of
/// stopping its job and leaving it alive to clean up (see [`stop_job_on_sigterm`]): around work that
/// defers query cancels and may take hours, such as an index build. Data workers always die on
/// SIGTERM ([`die_on_sigterm`]).
pub struct TerminateEndsProcess;

impl TerminateEndsProcess {
    // No Default: making one has an effect.
    #[allow(clippy::new_without_default)]
    pub fn new() -> TerminateEndsProcess {
        TERMINATE_ENDS_PROCESS.store(true, Ordering::SeqCst);
        TerminateEndsProcess
    }
}

impl Drop for TerminateEndsProcess {
    fn drop(&mut self) {
        TERMINATE_ENDS_PROCESS.store(false, Ordering::SeqCst);
    }
}

/// Holds query cancels off while it lives: a cancel arriving meanwhile stays pending and takes effect at
/// the first interrupt check after (or is taken back with [`take_cancel_request`]). Used while a job's
/// process connects. Termination (SIGTERM, shutdown) is not held off. Not around anything that may run
/// in parallel: PostgreSQL launches no parallel worker while cancels are held off (see [`DeferCancel`]).
pub struct HoldCancel;

impl HoldCancel {
    // No Default: making one has an effect.
    #[allow(clippy::new_without_default)]
    pub fn new() -> HoldCancel {
        // SAFETY: a process-local counter PostgreSQL reads in ProcessInterrupts; incremented and
        // decremented in pairs (Drop), as the backend does around reading a client message.
        unsafe { pg_sys::QueryCancelHoldoffCount += 1 };
        HoldCancel
    }
}

impl Drop for HoldCancel {
    fn drop(&mut self) {
        // SAFETY: pairs with the increment in `new`. An ERROR resets the counter to zero before it unwinds
        // through here (errfinish), so it is only decremented while positive: never below zero, and never
        // a panic inside a drop that runs during unwinding.
        unsafe {
            let held = pg_sys::QueryCancelHoldoffCount;
            if held > 0 {
                pg_sys::QueryCancelHoldoffCount = held - 1;
            }
        }
    }
}

/// Defers query cancels while it lives: a SIGINT (`cancel_snapshot`, `stop_workers`, `pg_cancel_backend`,
/// a client's cancel request) arriving meanwhile is only recorded, and takes effect at the first interrupt
/// check after the guard is dropped. Used while an index is built and its transaction commits: a cancel
/// must not roll back a build that may have taken hours. Termination (SIGTERM, shutdown) is not deferred.
///
/// Unlike [`HoldCancel`] it leaves PostgreSQL's interrupt counters alone, so `INTERRUPTS_CAN_BE_PROCESSED()`
/// stays true: PostgreSQL 15.x's `InitializeParallelDSM` launches no parallel worker otherwise, which
/// silently made every deferred index build serial, and a parallel build's leader must process its
/// helpers' messages. One at a time in a process (they do not nest).
pub struct DeferCancel {
    previous: pg_sys::pqsigfunc,
}

/// Set by [`defer_cancel`] when a SIGINT arrives while a [`DeferCancel`] lives.
static CANCEL_DEFERRED: AtomicBool = AtomicBool::new(false);

/// Runs in signal context: one atomic store.
unsafe extern "C-unwind" fn defer_cancel(_signal: std::ffi::c_int) {
    CANCEL_DEFERRED.store(true, Ordering::SeqCst);
}

impl DeferCancel {
    // No Default: making one has an effect.
    #[allow(clippy::new_without_default)]
    pub fn new() -> DeferCancel {
        CANCEL_DEFERRED.store(false, Ordering::SeqCst);
        // SAFETY: replaces this process's SIGINT handler (PostgreSQL's StatementCancelHandler in a
        // worker with a database connection) with one that only stores an atomic; `drop` puts the
        // previous one back.
        let previous = unsafe { pg_sys::pqsignal(pg_sys::SIGINT as i32, Some(defer_cancel)) };
        DeferCancel { previous }
    }
}

impl Drop for DeferCancel {
    fn drop(&mut self) {
        // SAFETY: restores the handler saved in `new`, so a SIGINT from here on is handled as usual.
        unsafe { pg_sys::pqsignal(pg_sys::SIGINT as i32, self.previous) };
        // A deferred cancel is sent again, to this process: the restored handler raises it.
        if CANCEL_DEFERRED.swap(false, Ordering::SeqCst) {
            cancel_process(my_pid());
        }
    }
}

/// Takes back a pending query cancel (from SIGINT or a leader's SIGTERM) and says whether there was
/// one: before a leader records its job's end, which a late cancel must not interrupt.
pub fn take_cancel_request() -> bool {
    // SAFETY: plain reads and writes of sig_atomic_t flags, from the main thread.
    unsafe {
        let pending = pg_sys::QueryCancelPending != 0;
        pg_sys::QueryCancelPending = 0;
        pending
    }
}

/// Sends SIGINT (a query cancel) to one of our processes: it interrupts its current wait or statement
/// at its next interrupt check.
pub fn cancel_process(pid: i32) {
    if pid > 0 {
        // SAFETY: sends a signal to a process of ours recorded in shared memory.
        unsafe {
            libc_kill(pid, 2);
        }
    }
}

/// Whether this process was told to terminate (SIGTERM, through [`die_on_sigterm`],
/// [`stop_job_on_sigterm`] or PostgreSQL's `die`).
pub fn dying() -> bool {
    // SAFETY: reads a sig_atomic_t flag set by PostgreSQL's signal handlers.
    TERMINATED.load(Ordering::SeqCst) || unsafe { pg_sys::ProcDiePending != 0 }
}

/// Whether the server is in recovery (a hot standby, or crash recovery still running).
pub fn recovery_in_progress() -> bool {
    // SAFETY: reads shared recovery state; valid in any process attached to shared memory.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// Whether the current transaction is read-only (`BEGIN READ ONLY`, default_transaction_read_only).
pub fn transaction_read_only() -> bool {
    // SAFETY: reads the current transaction's read-only flag.
    unsafe { pg_sys::XactReadOnly }
}

/// Whether `xid` is the current transaction or one of its subtransactions.
pub fn is_current_transaction(xid: u32) -> bool {
    // SAFETY: compares with this backend's transaction state; valid inside a transaction.
    unsafe { pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xid)) }
}

/// Takes `lockmode` on a relation for the rest of the transaction if that is possible at once; false
/// when another session holds, or waits for, a conflicting lock (then nothing is taken). Data workers
/// lock this way: waiting behind a queued lock request whose holder waits for their own leader is a
/// cycle the deadlock detector cannot see (pg_dump's workers use NOWAIT for the same reason).
pub fn try_lock_relation(relid: pg_sys::Oid, lockmode: u32) -> bool {
    // SAFETY: inside a transaction; ConditionalLockRelationOid never waits and takes nothing when it
    // returns false.
    unsafe { pg_sys::ConditionalLockRelationOid(relid, lockmode as pg_sys::LOCKMODE) }
}

/// Who holds or waits for locks on a relation that conflict with our access: "pid 123 (AccessExclusiveLock,
/// waiting)", for the error a worker raises when its NOWAIT lock fails.
pub fn lockers_of(relid: pg_sys::Oid) -> String {
    let rows = Spi::get_one_with_args::<Vec<String>>(
        "SELECT coalesce(pg_catalog.array_agg(pg_catalog.format('pid %s (%s, %s)', l.pid, l.mode, \
         CASE WHEN l.granted THEN 'granted' ELSE 'waiting' END) ORDER BY l.granted, l.pid), '{}') \
         FROM pg_catalog.pg_locks l \
         WHERE l.locktype = 'relation' AND l.relation = $1 \
           AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()) \
           AND l.pid <> pg_catalog.pg_backend_pid() \
           AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')",
        &[relid.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_default();
    if rows.is_empty() { "another session (it has let go since)".to_string() } else { rows.join(", ") }
}

/// Whether a table holds at least one row visible to the active snapshot, read without looking at any
/// row's contents (the first visible tuple ends the scan). A partitioned table, which has no rows of its
/// own, counts as empty (as `SELECT ... FROM ONLY` sees it).
pub fn relation_has_rows(relid: pg_sys::Oid) -> bool {
    // SAFETY: inside a transaction with an active snapshot (an SQL function call). The relation is
    // opened with AccessShareLock and closed (lock kept to the end of the transaction) after the scan
    // ends; only relations with heap storage are scanned.
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let kind = (*(*rel).rd_rel).relkind as u8;
        let has_rows = if kind == pg_sys::RELKIND_RELATION || kind == pg_sys::RELKIND_MATVIEW {
            let scan = pg_sys::heap_beginscan(
                rel,
                pg_sys::GetActiveSnapshot(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE,
            );
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            let found = !tuple.is_null();
            pg_sys::heap_endscan(scan);
            found
        } else {
            false
        };
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        has_rows
    }
}

/// The name of the operating-system user the server runs as (for hints about file permissions).
pub fn server_os_user() -> String {
    // SAFETY: geteuid cannot fail; getpwuid_r writes into the buffers we pass and returns the entry or
    // NULL. The name is copied out before the buffer goes away.
    unsafe {
        let uid = libc::geteuid();
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc == 0 && !result.is_null() && !pwd.pw_name.is_null() {
            std::ffi::CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned()
        } else {
            format!("uid {uid}")
        }
    }
}

/// Releases one `lockmode` lock on a relation taken in this transaction (by [`try_lock_relation`] or
/// [`lock_relation`]) before the transaction ends. Only for locks some other lock of the job keeps
/// covering: a data worker lets go of each table once read, so that a transaction reading many small
/// tables does not fill the lock table, while the leader holds every table for the whole job.
pub fn unlock_relation(relid: pg_sys::Oid, lockmode: u32) {
    // SAFETY: releases a lock this process holds on the relation; a no-op warning if it holds none.
    unsafe { pg_sys::UnlockRelationOid(relid, lockmode as pg_sys::LOCKMODE) };
}

/// The current value of a setting, as SHOW prints it; None when there is no such setting. Needs no
/// snapshot (unlike `current_setting()` through SPI).
pub fn setting(name: &str) -> Option<String> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: GetConfigOption with missing_ok returns NULL for an unknown setting, else a string owned by
    // the GUC machinery that we copy at once; restrict_privileged false is what SHOW does for readable ones.
    unsafe {
        let v = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        (!v.is_null()).then(|| std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned())
    }
}

/// Connects this background worker to database `db` as the bootstrap superuser, also when the
/// database does not allow connections (`datallowconn = false`): for the reaper only.
pub fn connect_bypassing_allowconn(db: u32) {
    // SAFETY: called once, at the start of a background worker registered with database access, as
    // BackgroundWorkerInitializeConnectionByOid requires; InvalidOid as user means the bootstrap superuser.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnectionByOid(
            pg_sys::Oid::from(db),
            pg_sys::InvalidOid,
            pg_sys::BGWORKER_BYPASS_ALLOWCONN,
        )
    };
}

/// Whether row-level security filters what the current user sees of (or may write to) a relation.
pub fn rls_applies(relid: pg_sys::Oid) -> bool {
    // SAFETY: a catalog lookup inside a transaction; with noError = false it may raise an ERROR for a
    // relation that does not exist, which is what callers want.
    unsafe {
        pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, false)
            == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
    }
}

/// This server's system identifier (pg_control_system()), read without the privileges that SQL
/// function needs. As a signed 64-bit number, the way PostgreSQL's SQL functions show it.
pub fn system_identifier() -> i64 {
    // SAFETY: reads a value fixed at initdb from the shared control data; valid in any backend.
    unsafe { pg_sys::GetSystemIdentifier() as i64 }
}

/// Re-reads the configuration files, as a process does on SIGHUP (for `PGC_SIGHUP` settings).
pub fn reload_config() {
    // SAFETY: ProcessConfigFile is what every auxiliary process calls after SIGHUP, outside any
    // transaction, from its main loop.
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
}

/// The PostgreSQL version this library was built for (`server_version_num`, e.g. 150020).
pub fn server_version_num() -> u32 {
    pg_sys::PG_VERSION_NUM
}

/// The server's data directory.
pub fn data_directory() -> std::path::PathBuf {
    // SAFETY: DataDir is set by the postmaster before any backend or worker runs and never changes; it
    // points to a NUL-terminated string.
    let dir = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    std::path::PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()))
}

//! Safe wrappers over the PostgreSQL C API. Every `unsafe` call into PostgreSQL that the rest of the
//! extension needs lives here, once, with the invariant it relies on written beside it.

pub mod catalog;
pub mod copy_from;
pub mod scan;
pub mod session;
pub mod wal;
pub mod xact;

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

type ShmemStartup = fn(*mut u8, bool);

const SHMEM_NAME: &std::ffi::CStr = c"steep_repl shared state";
/// Extra bytes requested so the block can be aligned to a cache line whatever ShmemInitStruct returns.
const SHMEM_ALIGN: usize = 64;

static mut SHMEM_SIZE: usize = 0;
static mut SHMEM_STARTUP: Option<ShmemStartup> = None;
static mut PREV_SHMEM_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_SHMEM_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;

/// Reserves `size` bytes of shared memory named "steep_repl shared state" and arranges for `startup`
/// to run, under AddinShmemInitLock, with a cache-line-aligned pointer to them and whether they already
/// existed. Must be called from `_PG_init` during `shared_preload_libraries` processing.
pub fn request_shmem(size: usize, startup: ShmemStartup) {
    // SAFETY: `_PG_init` runs single-threaded in the postmaster before shared memory is created; the
    // statics are written only here and read only by the hooks PostgreSQL calls afterwards. The previous
    // hooks are chained so other preloaded libraries keep working.
    unsafe {
        SHMEM_SIZE = size + SHMEM_ALIGN;
        SHMEM_STARTUP = Some(startup);
        PREV_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup_hook);
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        pg_sys::RequestAddinShmemSpace(SHMEM_SIZE);
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        {
            PREV_SHMEM_REQUEST_HOOK = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(shmem_request_hook);
        }
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pg_guard]
unsafe extern "C-unwind" fn shmem_request_hook() {
    // SAFETY: PostgreSQL calls this hook in the postmaster while shared memory requests are accepted.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(SHMEM_SIZE);
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
        let mut found = false;
        let raw = pg_sys::ShmemInitStruct(SHMEM_NAME.as_ptr(), SHMEM_SIZE, &mut found) as *mut u8;
        let aligned = raw.add(raw.align_offset(SHMEM_ALIGN));
        if let Some(startup) = SHMEM_STARTUP {
            startup(aligned, found);
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

//! A logical replication slot created inside a background worker, with its initial snapshot used as
//! the current transaction's snapshot: what the walsender's `CREATE_REPLICATION_SLOT name LOGICAL
//! pgoutput (SNAPSHOT 'use')` does, without a replication connection.
//!
//! The slot is created *ephemeral* and stays acquired by this process for the whole job: PostgreSQL
//! drops an ephemeral slot when its process releases it, exits (also on FATAL) or the server restarts,
//! so a job that fails in any way before the end leaves no slot behind. Only when the job has
//! succeeded does [`persist_held`] make it permanent, just before the manifest is written;
//! [`release_held`] then lets go of it for the subscriber, [`drop_held`] removes it if a later step
//! fails.
//!
//! Invariants the calls below rely on (those the walsender checks before `SNAPSHOT 'use'`): a top-level
//! REPEATABLE READ transaction has begun and no snapshot has been taken in it yet; the transaction has
//! no transaction id (it wrote nothing); this process holds no other slot.

use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The output plugin of every slot steep_repl creates (the one `CREATE SUBSCRIPTION` uses).
pub const PLUGIN: &str = "pgoutput";

/// Problems that keep this server or `role` from creating a logical slot named `name`: all of them,
/// each naming the setting or attribute concerned. Empty when a slot can be created. Runs SQL through
/// SPI: call it in the caller's session, before any work.
pub fn check_requirements(name: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = check_name(name) {
        problems.push(e);
    }
    if !crate::pg::rights::is_superuser() && !has_replication_attribute() {
        problems.push(format!(
            "role {:?} may not create replication slots: it needs the REPLICATION attribute (ALTER ROLE ... REPLICATION) or superuser",
            crate::pg::current_user_name()
        ));
    }
    let facts = Spi::get_three_with_args::<String, i64, bool>(
        "SELECT pg_catalog.current_setting('wal_level'), \
                pg_catalog.current_setting('max_replication_slots')::int8 \
                  - (SELECT count(*) FROM pg_catalog.pg_replication_slots), \
                EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1)",
        &[name.into()],
    );
    match facts {
        Ok((level, free, exists)) => {
            if level.as_deref() != Some("logical") {
                problems.push(format!(
                    "wal_level is {:?}: a logical replication slot needs wal_level = logical (set it and restart the server)",
                    level.unwrap_or_default()
                ));
            }
            if free.unwrap_or(0) <= 0 {
                problems.push(
                    "every replication slot is in use (max_replication_slots): raise max_replication_slots by 1 and restart, or drop an unused slot"
                        .to_string(),
                );
            }
            if exists == Some(true) {
                problems.push(format!(
                    "replication slot {name:?} already exists: drop it (pg_drop_replication_slot) or choose another name"
                ));
            }
        }
        Err(e) => problems.push(format!("reading the replication settings: {e}")),
    }
    if crate::pg::recovery_in_progress() {
        problems.push("this server is a standby: logical slots are created on the primary".to_string());
    }
    problems
}

/// PostgreSQL's rule for slot names (the engine's, shared with the CLI).
pub use steep_repl_engine::replica::check_slot_name as check_name;

fn has_replication_attribute() -> bool {
    // SAFETY: a syscache lookup of the current user, inside a transaction.
    unsafe { pg_sys::has_rolreplication(pg_sys::GetUserId()) }
}

/// Creates the ephemeral logical slot `name` with plugin [`PLUGIN`], waits until it is consistent
/// (slot creation waits for the transactions running when it starts: they show as lock waits of this
/// process, so `pg_blocking_pids` names them), and makes its initial snapshot the current
/// transaction's snapshot. Returns the slot's consistent point (`X/Y`). The slot stays held by this
/// process: [`persist_held`], then [`release_held`] or [`drop_held`]. Raises an ERROR on any problem
/// (the ephemeral slot goes with the job's release or the process).
pub fn create_with_snapshot(name: &str) -> String {
    if let Err(e) = check_name(name) {
        error!("{e}");
    }
    // SAFETY: the GetUserId lookup runs inside the transaction the module documentation requires.
    if unsafe { !pg_sys::superuser() && !pg_sys::has_rolreplication(pg_sys::GetUserId()) } {
        error!(
            "must be superuser or a role with the REPLICATION attribute to create replication slot {name:?}"
        );
    }
    let c_name = CString::new(name).unwrap_or_default();
    let c_plugin = CString::new(PLUGIN).unwrap_or_default();
    // SAFETY: the module documentation's invariants hold (the caller began a REPEATABLE READ transaction
    // and took no snapshot; we hold no slot). Each call raises an ERROR on failure, which unwinds
    // through pgrx; an ephemeral slot acquired by then is dropped when this process releases it, which
    // the job's error path does (or process exit).
    unsafe {
        if !pg_sys::MyReplicationSlot.is_null() {
            error!("this process already holds a replication slot");
        }
        pg_sys::CheckLogicalDecodingRequirements();
        create_ephemeral(c_name.as_ptr());
        let mut routine = pg_sys::XLogReaderRoutine {
            page_read: Some(read_local_xlog_page),
            segment_open: Some(wal_segment_open),
            segment_close: Some(wal_segment_close),
        };
        let ctx = pg_sys::CreateInitDecodingContext(
            c_plugin.as_ptr(),
            std::ptr::null_mut(),
            true, // need_full_snapshot: the snapshot reads user tables, not only the catalog
            pg_sys::InvalidXLogRecPtr as pg_sys::XLogRecPtr,
            &mut routine,
            None,
            None,
            None,
        );
        pg_sys::DecodingContextFindStartpoint(ctx);
        let builder = (*ctx).snapshot_builder;
        let snap = pg_sys::ffi::pg_guard_ffi_boundary(|| SnapBuildInitialSnapshot(builder));
        pg_sys::RestoreTransactionSnapshot(snap, pg_sys::MyProc.cast());
        pg_sys::FreeDecodingContext(ctx);
        let lsn = (*pg_sys::MyReplicationSlot).data.confirmed_flush;
        format!("{:X}/{:X}", lsn >> 32, lsn as u32)
    }
}

// snapbuild.h is not among the headers pgrx binds; the declaration is PostgreSQL's (13..18), called
// through pg_guard_ffi_boundary like pgrx's own bindings so that its ERRORs unwind as Rust panics. The three WAL reading callbacks
// are PostgreSQL's own (xlogutils.h, what the SQL slot functions use): declared unguarded because
// PostgreSQL calls them, which pgrx's guarded wrappers cannot be.
unsafe extern "C-unwind" {
    fn SnapBuildInitialSnapshot(builder: *mut pg_sys::SnapBuild) -> pg_sys::Snapshot;
}

unsafe extern "C-unwind" {
    fn read_local_xlog_page(
        state: *mut pg_sys::XLogReaderState,
        target_page: pg_sys::XLogRecPtr,
        req_len: std::ffi::c_int,
        target_rec: pg_sys::XLogRecPtr,
        cur_page: *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn wal_segment_open(
        state: *mut pg_sys::XLogReaderState,
        next_seg_no: pg_sys::XLogSegNo,
        tli_p: *mut pg_sys::TimeLineID,
    );
    fn wal_segment_close(state: *mut pg_sys::XLogReaderState);
}

/// ReplicationSlotCreate as each supported version spells it.
///
/// SAFETY: as `create_with_snapshot`: inside a transaction, no slot held.
unsafe fn create_ephemeral(name: *const std::ffi::c_char) {
    let ephemeral = pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL;
    unsafe {
        #[cfg(feature = "pg13")]
        pg_sys::ReplicationSlotCreate(name, true, ephemeral);
        #[cfg(any(feature = "pg14", feature = "pg15", feature = "pg16"))]
        pg_sys::ReplicationSlotCreate(name, true, ephemeral, false);
        #[cfg(feature = "pg17")]
        pg_sys::ReplicationSlotCreate(name, true, ephemeral, false, false);
        #[cfg(feature = "pg18")]
        pg_sys::ReplicationSlotCreate(name, true, ephemeral, false, false, false);
    }
}

/// Makes the slot this process holds permanent (it survives this process and restarts); it stays held.
pub fn persist_held() {
    // SAFETY: ReplicationSlotPersist requires a held slot, checked first; it marks the slot persistent
    // and saves it to disk.
    unsafe {
        if !pg_sys::MyReplicationSlot.is_null() {
            pg_sys::ReplicationSlotPersist();
        }
    }
}

/// Releases whatever slot this process holds (dropping it if it is still ephemeral). Safe to call when
/// none is held: for error paths that do not know how far slot creation got.
pub fn release_held() {
    // SAFETY: ReplicationSlotRelease requires a held slot, checked first; it drops an ephemeral slot.
    unsafe {
        if !pg_sys::MyReplicationSlot.is_null() {
            pg_sys::ReplicationSlotRelease();
        }
    }
}

/// Drops the slot this process holds, whatever its persistency (the error paths of a job that
/// created one). Nothing when none is held. Never raises: a slot that cannot be dropped (a subscriber
/// took it in the instant between release and drop) is logged with the command that drops it.
pub fn drop_held() {
    // SAFETY: MyReplicationSlot is checked first; its name is copied out before the release (which
    // drops an ephemeral slot and leaves MyReplicationSlot NULL). A persistent slot is then dropped by
    // name, as pg_drop_replication_slot does, after checking it still exists.
    let name = unsafe {
        if pg_sys::MyReplicationSlot.is_null() {
            return;
        }
        let data = &(*pg_sys::MyReplicationSlot).data;
        let name = std::ffi::CStr::from_ptr(data.name.data.as_ptr()).to_owned();
        pg_sys::ReplicationSlotRelease();
        name
    };
    let dropped = crate::pg::xact::try_catch(|| unsafe {
        // SAFETY: see above; ReplicationSlotDrop acquires the slot (nowait) and removes it.
        if !pg_sys::SearchNamedReplicationSlot(name.as_ptr(), true).is_null() {
            pg_sys::ReplicationSlotDrop(name.as_ptr(), true);
        }
    });
    if let Err(c) = dropped {
        log!(
            "steep_repl: could not drop replication slot {:?} of a failed snapshot: {}; drop it with pg_drop_replication_slot",
            name.to_string_lossy(),
            c.full()
        );
    }
}

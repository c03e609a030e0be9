//! The reaper: a short-lived worker the supervisor starts to mark interrupted jobs failed in the tables
//! monitoring reads, so that no `steep_repl.snapshots` or `work_queue` row says `pending` or `running`
//! for a job that no longer runs (after a restart, or after a leader died).
//!
//! With database 0 it connects to no database, lists every database a job can have run in (a scan of
//! the shared catalog `pg_database`), and runs one reaper per database, one after the other. With a
//! database, it connects to it as the bootstrap superuser, pins the search path, and, if steep_repl is
//! installed there, marks its unfinished jobs failed (`job::reap_interrupted`, the same statements the
//! SQL functions run) and tells the supervisor whether the database holds a node registry to probe.
//! It runs no other statement.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pg::{self, catalog, rights};

/// Entry point of a reaper. `arg` is the database oid, or 0 for every database.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_reaper(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = arg.value() as u32;
    if db == 0 {
        BackgroundWorker::connect_worker_to_spi_by_oid(None, None);
        let databases = BackgroundWorker::transaction(catalog::job_databases);
        for db in databases {
            if BackgroundWorker::sigterm_received() {
                return;
            }
            run_one(db);
        }
        return;
    }
    // Also into a database that no longer allows connections: its jobs' rows must still be marked.
    pg::connect_bypassing_allowconn(db);
    let reaped = pg::xact::try_catch(|| {
        BackgroundWorker::transaction(|| {
            rights::pin_session();
            let installed = catalog::steep_repl_installed();
            if installed {
                crate::job::reap_interrupted();
                // After a server start, the supervisor learns here which databases hold a node registry.
                if crate::bookkeeping::nodes::any() {
                    crate::shmem::require().watch_nodes(db);
                }
            }
        })
    });
    if let Err(c) = reaped {
        pg::xact::abort_after_error();
        log!("steep_repl reaper: could not mark interrupted jobs of database {db}: {}", c.full());
    }
}

/// Runs a reaper for `db` and waits (polling, so SIGTERM is heeded) until it has exited.
fn run_one(db: u32) {
    let Some(handle) = crate::worker::supervisor::launch_reaper(db) else {
        log!("steep_repl reaper: no background worker slot free to look at database {db}");
        return;
    };
    for _ in 0..3000 {
        if crate::worker::supervisor::has_exited(&handle) {
            return;
        }
        if BackgroundWorker::sigterm_received() {
            return;
        }
        crate::job::nap(Duration::from_millis(20));
    }
}

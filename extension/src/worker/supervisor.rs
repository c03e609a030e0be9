//! The supervisor: one static background worker per server, started with the postmaster when the
//! library is preloaded. It connects to no database; it keeps a heartbeat in shared memory (so `health()`
//! can tell whether it is alive) and watches the worker slots: a slot whose process has died without
//! releasing it (a crash, `kill -9`) is freed, so its job's leader sees the failure and no slot leaks.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::{pg, shmem};

/// How often the supervisor wakes. One second bounds how long a dead worker's slot stays taken.
const TICK: Duration = Duration::from_secs(1);
/// Restart delay after the supervisor itself crashes.
const RESTART_AFTER: Duration = Duration::from_secs(5);

/// Registers the supervisor with the postmaster. Called from `_PG_init` during preload only.
pub fn register() {
    BackgroundWorkerBuilder::new("steep_repl supervisor")
        .set_type("steep_repl supervisor")
        .set_library("steep_repl")
        .set_function("steep_repl_supervisor_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::PostmasterStart)
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

/// Entry point of the supervisor process.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_supervisor_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let shared = shmem::require();
    shared.supervisor_pid.store(pg::my_pid(), Ordering::Release);
    shared.supervisor_heartbeat_ms.store(pg::now_ms(), Ordering::Release);
    log!("steep_repl supervisor started");

    while BackgroundWorker::wait_latch(Some(TICK)) {
        shared.supervisor_heartbeat_ms.store(pg::now_ms(), Ordering::Release);
        reap_dead_worker_slots(shared);
        reap_dead_leaders(shared);
    }
    shared.supervisor_pid.store(0, Ordering::Release);
}

/// Frees worker slots whose owning process no longer exists.
fn reap_dead_worker_slots(shared: &shmem::Shared) {
    for (i, w) in shared.workers.iter().enumerate() {
        let state = w.state.load(Ordering::Acquire);
        let pid = w.pid.load(Ordering::Acquire);
        if state != shmem::FREE && pid > 0 && !pg::process_alive(pid) {
            log!("steep_repl supervisor: worker slot {i} (pid {pid}) died without releasing its slot; freed");
            w.pid.store(0, Ordering::Release);
            w.state.store(shmem::FREE, Ordering::Release);
        }
    }
}

/// Releases the slots of jobs whose leader died without cleaning up (it crashed outside its error
/// handling): the job is told to stop, and once none of its workers runs, its slots are freed. The
/// job's row is then marked failed by the next steep_repl call in its database (see `job::reap_interrupted`).
fn reap_dead_leaders(shared: &shmem::Shared) {
    for (slot, job) in shared.active_jobs() {
        let pid = job.leader_pid.load(Ordering::Acquire);
        if job.state.load(Ordering::Acquire) != shmem::job_state::RUNNING
            || pid <= 0
            || pg::process_alive(pid)
        {
            continue;
        }
        job.fail("the job's leader process exited unexpectedly");
        let busy = shared.job_workers(slot).any(|(_, w)| {
            let wpid = w.pid.load(Ordering::Acquire);
            wpid > 0 && pg::process_alive(wpid)
        });
        if busy {
            continue;
        }
        log!("steep_repl supervisor: leader of job {} (pid {pid}) died; freeing its slots", job.id.get());
        for (_, w) in shared.job_workers(slot) {
            w.state.store(shmem::FREE, Ordering::Release);
        }
        shared.release_job(slot);
    }
}

//! The supervisor: one static background worker per server, started with the postmaster when the
//! library is preloaded. It connects to no database. It keeps a heartbeat in shared memory (so `health()`
//! can tell whether it is alive) and is the last line of the slot state machine (`crate::shmem`):
//!
//! - a worker slot whose process died while RUNNING (its exit callback could not run) is marked FAILED
//!   and its job told to stop;
//! - a job whose leader died (or whose claiming backend died before the leader was known) is told to
//!   stop; once none of its workers is alive, their slots and the job's are freed, and a reaper is
//!   started in the job's database to mark its row failed;
//! - worker slots left by a job that is gone are freed once their process has exited;
//! - once after every server start, when recovery is over, a reaper looks at every database and marks
//!   the jobs the restart interrupted failed, so no row says `running` once the server is up;
//! - every `steep_repl.heartbeat_interval`, a prober (`crate::worker::prober`) is started in each
//!   database holding a node registry, unless the previous one there still runs: the network waits
//!   are the prober's, so nothing a peer does can stall this loop.
//!
//! It never frees a slot whose process is alive, and every free is a compare-and-swap on the slot's
//! generation, so a slot claimed again meanwhile is never touched.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::job::Entry;
use crate::pg;
use crate::shmem::{self, Shared, job_state, worker_state};

/// How often the supervisor wakes. One second bounds how long a dead process's slot stays taken.
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
    shared.supervisor_latch.store(pg::my_latch(), Ordering::Release);
    shared.supervisor_heartbeat_ms.store(pg::now_ms(), Ordering::Release);
    log!("steep_repl supervisor started");

    let mut reaper: Option<DynamicBackgroundWorker> = None;
    let mut probers = Probers::default();
    while BackgroundWorker::wait_latch(Some(TICK)) {
        if BackgroundWorker::sighup_received() {
            pg::reload_config();
        }
        shared.supervisor_heartbeat_ms.store(pg::now_ms(), Ordering::Release);
        reap_dead_workers(shared);
        reap_dead_leaders(shared);
        start_reaper(shared, &mut reaper);
        probers.tick(shared);
    }
    shared.supervisor_latch.store(0, Ordering::Release);
    shared.supervisor_pid.store(0, Ordering::Release);
}

/// The probers started, one per database with a node registry, and when each database's last round
/// began.
#[derive(Default)]
struct Probers {
    running: Vec<(u32, DynamicBackgroundWorker)>,
    last_round_ms: Vec<(u32, u64)>,
}

impl Probers {
    /// Starts a prober in each watched database whose round is due (a database just registered at
    /// once) and whose previous prober has exited. Not while in recovery (a standby's registry cannot
    /// be written).
    fn tick(&mut self, shared: &Shared) {
        self.running.retain(|(_, h)| !has_exited(h));
        if pg::recovery_in_progress() {
            return;
        }
        let every_ms = crate::gucs::HEARTBEAT_INTERVAL_S.get().max(1) as u64 * 1000;
        let now = pg::now_ms();
        let watched: Vec<u32> = shared.watched_node_databases().into_iter().map(|(db, _)| db).collect();
        self.last_round_ms.retain(|(db, _)| watched.contains(db));
        for db in watched {
            let last = self.last_round_ms.iter().find(|(d, _)| *d == db).map(|&(_, t)| t);
            let due = last.is_none_or(|t| now.saturating_sub(t) >= every_ms);
            if !due || self.running.iter().any(|(r, _)| *r == db) {
                continue;
            }
            self.last_round_ms.retain(|(d, _)| *d != db);
            self.last_round_ms.push((db, now));
            let launched = BackgroundWorkerBuilder::new(&format!("steep_repl prober {db}"))
                .set_type(Entry::Prober.kind())
                .set_library("steep_repl")
                .set_function("steep_repl_prober")
                .set_argument(Some(pg_sys::Datum::from(db as u64)))
                .enable_spi_access()
                .load_dynamic();
            match launched {
                Ok(h) => self.running.push((db, h)),
                // No worker slot free now: the next round tries again.
                Err(_) => log!(
                    "steep_repl supervisor: no background worker slot to probe the nodes of database {db}"
                ),
            }
        }
    }
}

fn alive(pid: i32) -> bool {
    pid > 0 && pg::process_alive(pid)
}

/// Worker slots: a RUNNING one whose process is gone is marked FAILED (its job stops); one whose job is
/// gone is freed once its process has exited.
fn reap_dead_workers(shared: &Shared) {
    for (i, w) in shared.workers.iter().enumerate() {
        let (generation, state) = w.word.get();
        if state == shmem::FREE {
            continue;
        }
        let pid = w.pid.load(Ordering::Acquire);
        let job = &shared.jobs[w.job_slot.load(Ordering::Relaxed) as usize];
        let job_here =
            job.word.state() != shmem::FREE && job.generation() == w.job_gen.load(Ordering::Relaxed);
        if job_here {
            if state == worker_state::RUNNING
                && pid > 0
                && !alive(pid)
                && w.word.transition(generation, worker_state::RUNNING, worker_state::FAILED)
            {
                log!("steep_repl supervisor: worker slot {i} (pid {pid}) died without a word; its job stops");
                job.fail(&format!("worker #{i} (pid {pid}) died"));
                crate::job::wake_leader(job);
            }
        } else if !alive(pid) && w.word.free(generation) {
            log!("steep_repl supervisor: freed worker slot {i} left by a job that has ended");
        }
    }
}

/// Jobs whose leader died (or whose claimer died before launching it): stopped, and once no worker of
/// theirs is alive, freed, with their database's rows reaped.
fn reap_dead_leaders(shared: &Shared) {
    for (slot, job) in shared.active_jobs() {
        let (generation, state) = job.word.get();
        let leader = job.leader_pid.load(Ordering::Acquire);
        let gone = if leader > 0 {
            !alive(leader)
        } else {
            state == job_state::STARTING && !alive(job.claimer_pid.load(Ordering::Acquire))
        };
        if !gone {
            continue;
        }
        if !job.phase().is_terminal() {
            job.fail("the job's leader process exited unexpectedly");
        }
        let mut busy = false;
        for (_, w, wgen) in shared.job_workers(slot, Some(generation)) {
            if alive(w.pid.load(Ordering::Acquire)) {
                busy = true;
            } else {
                w.word.free(wgen);
            }
        }
        if busy {
            continue;
        }
        // With no leader known, free the slot only while it still waits for one: a leader that attaches
        // meanwhile makes this fail, and then it is the leader's.
        let only_from = (leader <= 0).then_some(job_state::STARTING);
        if shared.release_job_in(slot, generation, only_from) {
            log!(
                "steep_repl supervisor: job {} lost its leader (pid {leader}); its slots are freed",
                job.id.get()
            );
            shared.request_reap(job.database_oid.load(Ordering::Acquire));
        }
    }
}

/// Starts a reaper when one is due and none runs: once after server start (for every database, when
/// recovery is over), then for each database a request names.
fn start_reaper(shared: &Shared, reaper: &mut Option<DynamicBackgroundWorker>) {
    if let Some(r) = reaper {
        if !has_exited(r) {
            return;
        }
        *reaper = None;
    }
    if pg::recovery_in_progress() {
        return;
    }
    let db = if shared.startup_reaped.load(Ordering::Acquire) == 0 {
        0 // every database
    } else {
        match shared.reap_requests.iter().find(|r| r.load(Ordering::Acquire) != 0) {
            Some(r) => r.swap(0, Ordering::AcqRel),
            None => return,
        }
    };
    match launch_reaper(db) {
        Some(handle) => {
            if db == 0 {
                shared.startup_reaped.store(1, Ordering::Release);
            }
            *reaper = Some(handle);
        }
        None if db != 0 => shared.request_reap(db), // no worker slot now: again at the next tick
        None => {}
    }
}

/// Whether a worker launched without waiting has exited (or could not start).
pub fn has_exited(handle: &DynamicBackgroundWorker) -> bool {
    matches!(handle.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied))
}

/// Launches a reaper for database `db` (0: every database), without waiting for it.
pub fn launch_reaper(db: u32) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("steep_repl reaper {db}"))
        .set_type(Entry::Reaper.kind())
        .set_library("steep_repl")
        .set_function("steep_repl_reaper")
        .set_argument(Some(pg_sys::Datum::from(db as u64)))
        .enable_spi_access()
        .load_dynamic()
        .ok()
}

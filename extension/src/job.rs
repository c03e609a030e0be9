//! What generate and apply jobs share: ids, launching workers, bookkeeping rows, and the reaper that
//! turns jobs interrupted by a crash or restart into `failed` rows.
//!
//! Bookkeeping (`steep_repl.snapshots`, `steep_repl.work_queue`) is written as the extension's owner, so
//! a caller needs no privileges on those tables; everything else a job does runs as the caller.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::BackgroundWorkerBuilder;
use pgrx::pg_sys;
use pgrx::prelude::*;

use pgrx::bgworkers::BackgroundWorker;

use crate::pg;
use crate::shmem::{self, JobKind, JobSlot, Shared, WorkerSlot, chunk_state, worker_state};

/// A new job id: `gen-` or `app-` and 16 hex digits from the server's strong random source.
pub fn new_job_id(kind: JobKind) -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: writes 8 bytes into a local buffer; returns false only when no random source exists.
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    let n = if ok {
        u64::from_le_bytes(bytes)
    } else {
        crate::pg::now_ms() ^ ((crate::pg::my_pid() as u64) << 40)
    };
    let prefix = match kind {
        JobKind::Generate => "gen",
        JobKind::Apply => "app",
    };
    format!("{prefix}-{n:016x}")
}

/// Which worker entry point to start.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    GenerateLeader,
    GenerateWorker,
    ApplyLeader,
    ApplyWorker,
}

impl Entry {
    fn function(self) -> &'static str {
        match self {
            Entry::GenerateLeader => "steep_repl_generate_leader",
            Entry::GenerateWorker => "steep_repl_generate_worker",
            Entry::ApplyLeader => "steep_repl_apply_leader",
            Entry::ApplyWorker => "steep_repl_apply_worker",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Entry::GenerateLeader | Entry::ApplyLeader => "steep_repl leader",
            Entry::GenerateWorker | Entry::ApplyWorker => "steep_repl worker",
        }
    }
}

/// The argument a worker receives: its job slot, and its worker slot (0xFFFF for a leader).
pub fn pack_arg(job_slot: usize, worker_slot: Option<usize>) -> pg_sys::Datum {
    let w = worker_slot.unwrap_or(0xFFFF);
    pg_sys::Datum::from(((job_slot as u64) << 16) | w as u64)
}

/// Inverse of [`pack_arg`].
pub fn unpack_arg(arg: pg_sys::Datum) -> (usize, Option<usize>) {
    let v = arg.value() as u64;
    let w = (v & 0xFFFF) as usize;
    (((v >> 16) & 0xFFFF) as usize, (w != 0xFFFF).then_some(w))
}

/// Starts one dynamic background worker; false when the server has no free worker slot.
pub fn launch(entry: Entry, job_id: &str, job_slot: usize, worker_slot: Option<usize>) -> bool {
    let name = match worker_slot {
        Some(w) => format!("{} {job_id} #{w}", entry.kind()),
        None => format!("{} {job_id}", entry.kind()),
    };
    BackgroundWorkerBuilder::new(&name)
        .set_type(entry.kind())
        .set_library("steep_repl")
        .set_function(entry.function())
        .set_argument(Some(pack_arg(job_slot, worker_slot)))
        .enable_spi_access()
        .load_dynamic()
        .is_ok()
}

/// Runs `f` as the extension's owner (for bookkeeping rows), restoring the user afterwards.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'steep_repl'",
    )
    .ok()
    .flatten();
    let Some(owner) = owner else {
        error!("the steep_repl extension is not installed in this database; run CREATE EXTENSION steep_repl");
    };
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_ctx = 0;
    // SAFETY: the documented way to switch the current user for internal operations (as PostgreSQL does
    // for RI triggers); SECURITY_LOCAL_USERID_CHANGE forbids SET ROLE meanwhile. Restored below; if `f`
    // raises an ERROR, transaction abort restores the user.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(owner, saved_ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let r = f();
    // SAFETY: restores exactly what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_ctx) };
    r
}

/// Figures persisted in the `snapshots` row.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub phase: String,
    pub tables_total: i32,
    pub tables_done: i32,
    pub chunks_total: i32,
    pub chunks_done: i32,
    pub rows: i64,
    pub bytes: i64,
    pub bytes_written: i64,
}

impl Figures {
    /// The job's live figures from shared memory.
    pub fn of(job: &JobSlot) -> Figures {
        Figures {
            phase: job.phase().as_str().to_string(),
            tables_total: job.tables_total.load(Ordering::Relaxed) as i32,
            tables_done: job.tables_done.load(Ordering::Relaxed) as i32,
            chunks_total: job.chunks_total.load(Ordering::Relaxed) as i32,
            chunks_done: job.chunks_done.load(Ordering::Relaxed) as i32,
            rows: job.rows.load(Ordering::Relaxed) as i64,
            bytes: job.raw_bytes.load(Ordering::Relaxed) as i64,
            bytes_written: job.file_bytes.load(Ordering::Relaxed) as i64,
        }
    }
}

/// Writes the job's figures into its `snapshots` row, with `status` when given (`running` also sets
/// started_at). `end` is Some(error) when the job has ended: error and finished_at are written too.
fn update_row(id: &str, status: Option<&str>, end: Option<Option<&str>>, f: &Figures) {
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE steep_repl.snapshots SET phase = $2, tables_total = $3, tables_done = $4, chunks_total = $5, \
             chunks_done = $6, rows_done = $7, bytes_done = $8, bytes_written = $9, updated_at = now(), \
             status = coalesce($10, status), \
             started_at = CASE WHEN $10 = 'running' THEN coalesce(started_at, now()) ELSE started_at END, \
             error = CASE WHEN $11 THEN $12 ELSE error END, \
             finished_at = CASE WHEN $11 THEN now() ELSE finished_at END \
             WHERE id = $1",
            &[
                id.into(),
                f.phase.as_str().into(),
                f.tables_total.into(),
                f.tables_done.into(),
                f.chunks_total.into(),
                f.chunks_done.into(),
                f.rows.into(),
                f.bytes.into(),
                f.bytes_written.into(),
                status.into(),
                end.is_some().into(),
                end.flatten().into(),
            ],
        )
    })
    .unwrap_or_else(|e| error!("updating steep_repl.snapshots for {id}: {e}"));
}

/// Updates the job's row with live figures (and status/started_at when given). Call in a transaction.
pub fn persist(id: &str, status: Option<&str>, f: &Figures) {
    update_row(id, status, None, f);
    if status == Some("running") {
        as_owner(|| {
            Spi::run_with_args(
                "UPDATE steep_repl.work_queue SET status = 'running', started_at = coalesce(started_at, now()) \
                 WHERE snapshot_id = $1",
                &[id.into()],
            )
        })
        .unwrap_or_else(|e| error!("updating steep_repl.work_queue for {id}: {e}"));
    }
}

/// Records a job's end: `status` is complete, applied, failed or cancelled. Call in a transaction.
pub fn record_end(id: &str, status: &str, error: Option<&str>, f: &Figures) {
    update_row(id, Some(status), Some(error), f);
    let queue_status = if status == "applied" { "complete" } else { status };
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE steep_repl.work_queue SET status = $2, error = $3, finished_at = now() WHERE snapshot_id = $1",
            &[id.into(), queue_status.into(), error.into()],
        )
    })
    .unwrap_or_else(|e| error!("recording the end of {id}: {e}"));
}

/// Marks `pending`/`running` rows whose job no longer runs as failed: after a server restart (the row's
/// postmaster start differs), or when no job slot holds them any more (the leader died). Rows of this
/// database only; cheap when nothing is running.
pub fn reap_interrupted() {
    let running = Spi::connect(|client| -> Result<Vec<(String, bool)>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for row in client.select(
            "SELECT id, postmaster_start = pg_catalog.pg_postmaster_start_time() FROM steep_repl.snapshots \
             WHERE status IN ('pending', 'running')",
            None,
            &[],
        )? {
            v.push((row.get::<String>(1)?.unwrap_or_default(), row.get::<bool>(2)?.unwrap_or(false)));
        }
        Ok(v)
    })
    .unwrap_or_default();
    if running.is_empty() {
        return;
    }
    let shared = shmem::get();
    for (id, same_start) in running {
        let alive = same_start && shared.is_some_and(|s| s.find_job(&id).is_some());
        if alive {
            continue;
        }
        let reason = if same_start {
            "interrupted: the job's leader process ended without recording a result"
        } else {
            "interrupted by a server restart; for an apply, run steep_repl.resume_apply(id) to continue"
        };
        as_owner(|| {
            Spi::run_with_args(
                "UPDATE steep_repl.snapshots SET status = 'failed', error = $2, finished_at = now(), updated_at = now() \
                 WHERE id = $1 AND status IN ('pending', 'running')",
                &[id.as_str().into(), reason.into()],
            )?;
            Spi::run_with_args(
                "UPDATE steep_repl.work_queue SET status = 'failed', error = $2, finished_at = now() \
                 WHERE snapshot_id = $1 AND status IN ('pending', 'running')",
                &[id.as_str().into(), reason.into()],
            )
        })
        .unwrap_or_else(|e| error!("marking {id} interrupted: {e}"));
    }
}

/// Sleeps on the process latch for at most `timeout` (or until set), also reacting to postmaster death.
pub fn nap(timeout: Duration) {
    // SAFETY: MyLatch is this process's latch; WaitLatch with WL_EXIT_ON_PM_DEATH exits the process if
    // the postmaster dies, the documented behaviour for background workers.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis() as i64,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// Waits until the transaction that created a job has ended; true if its row is visible (committed),
/// false if it rolled back (then the job must not run).
pub fn wait_for_caller(job: &JobSlot, id: &str) -> bool {
    let xid = job.caller_xid.load(Ordering::Acquire);
    loop {
        let in_progress = crate::pg::xact::xid_in_progress(xid);
        let visible = pgrx::bgworkers::BackgroundWorker::transaction(|| {
            Spi::get_one_with_args::<bool>(
                "SELECT true FROM steep_repl.snapshots WHERE id = $1",
                &[id.into()],
            )
            .ok()
            .flatten()
            .unwrap_or(false)
        });
        if visible {
            return true;
        }
        if !in_progress {
            return false;
        }
        nap(Duration::from_millis(20));
    }
}

/// How long a launched worker may take to report in before the job fails.
const WORKER_START_TIMEOUT_MS: u64 = 30_000;
/// How long a leader waits for workers to stop after a failure before sending SIGTERM.
const STOP_GRACE_MS: u64 = 5_000;
/// How often a leader looks at its workers.
const LEADER_TICK: Duration = Duration::from_millis(100);

/// Launches up to `max_useful` workers of `entry` for the job: as many as it asked for, capped by
/// `steep_repl.max_workers` and the server's free worker slots. Returns how many started.
pub fn launch_workers(shared: &Shared, slot: usize, entry: Entry, max_useful: usize) -> usize {
    let job = &shared.jobs[slot];
    let id = job.id.get();
    let want = (job.parallel_requested.load(Ordering::Relaxed) as usize).min(max_useful);
    let cap = (crate::gucs::MAX_WORKERS.get().max(1) as usize).saturating_sub(shared.workers_in_use());
    let mut launched = 0usize;
    for _ in 0..want.min(cap) {
        let Some(ws) = shared.claim_worker_slot(slot) else { break };
        if !launch(entry, &id, slot, Some(ws)) {
            shared.workers[ws].state.store(worker_state::FREE, Ordering::Release);
            break;
        }
        launched += 1;
    }
    job.workers_launched.store(launched as u32, Ordering::Relaxed);
    launched
}

/// Waits until every chunk is done or the job stops, failing the job when a worker dies or never starts;
/// calls `on_tick` about every 100 ms (an apply leader publishes progress there).
pub fn watch_workers(shared: &Shared, slot: usize, launch_ms: u64, mut on_tick: impl FnMut(&JobSlot)) {
    let job = &shared.jobs[slot];
    let count = job.chunk_count.load(Ordering::Acquire);
    let base = job.chunk_base.load(Ordering::Acquire) as usize;
    loop {
        if job.units_done.load(Ordering::Acquire) >= count || job.should_stop() {
            return;
        }
        if BackgroundWorker::sigterm_received() {
            job.fail("the job's leader was terminated (SIGTERM: server shutdown or pg_terminate_backend)");
            return;
        }
        let mut active = 0;
        for (i, w) in shared.job_workers(slot) {
            match w.state.load(Ordering::Acquire) {
                worker_state::LAUNCHING => {
                    active += 1;
                    if pg::now_ms().saturating_sub(launch_ms) > WORKER_START_TIMEOUT_MS {
                        job.fail(&format!(
                            "worker #{i} did not start within {} s",
                            WORKER_START_TIMEOUT_MS / 1000
                        ));
                    }
                }
                worker_state::RUNNING => {
                    active += 1;
                    let pid = w.pid.load(Ordering::Acquire);
                    if pid > 0 && !pg::process_alive(pid) {
                        job.fail(&format!("worker #{i} (pid {pid}) exited unexpectedly"));
                    }
                }
                _ => {}
            }
        }
        if active == 0 && job.units_done.load(Ordering::Acquire) < count {
            job.fail("every worker exited before all chunks were written");
        }
        let tables_done = count_tables_done(shared, base, count as usize);
        job.tables_done.store(tables_done, Ordering::Relaxed);
        on_tick(job);
        nap(LEADER_TICK);
    }
}

/// Tables all of whose chunks are done, whatever order the chunks were planned in.
pub fn count_tables_done(shared: &Shared, base: usize, count: usize) -> u32 {
    let slots = &shared.chunks[base..base + count];
    let tables = slots.iter().map(|c| c.table.load(Ordering::Relaxed) as usize + 1).max().unwrap_or(0);
    let (mut seen, mut all_done) = (vec![false; tables], vec![true; tables]);
    for c in slots {
        let t = c.table.load(Ordering::Relaxed) as usize;
        seen[t] = true;
        all_done[t] &= c.state.load(Ordering::Acquire) == chunk_state::DONE;
    }
    seen.iter().zip(&all_done).filter(|(s, d)| **s && **d).count() as u32
}

/// Waits for the job's workers to exit; SIGTERMs any still running after the grace period.
pub fn stop_workers(shared: &Shared, slot: usize) {
    let start = pg::now_ms();
    loop {
        let running: Vec<i32> = shared
            .job_workers(slot)
            .filter(|(_, w)| {
                matches!(w.state.load(Ordering::Acquire), worker_state::RUNNING | worker_state::LAUNCHING)
            })
            .map(|(_, w)| w.pid.load(Ordering::Acquire))
            .filter(|&pid| pid == 0 || pg::process_alive(pid))
            .collect();
        if running.is_empty() {
            return;
        }
        let waited = pg::now_ms().saturating_sub(start);
        if waited > STOP_GRACE_MS {
            for pid in running.into_iter().filter(|&p| p > 0) {
                pg::terminate_process(pid);
            }
            if waited > 2 * STOP_GRACE_MS {
                return;
            }
        }
        nap(Duration::from_millis(50));
    }
}

/// Waits for the job's workers, frees their slots and then the job's slot, after the job has ended.
pub fn release(shared: &Shared, slot: usize) {
    stop_workers(shared, slot);
    for (_, w) in shared.job_workers(slot) {
        w.state.store(worker_state::FREE, Ordering::Release);
    }
    shared.release_job(slot);
}

/// Sleeps `steep_repl.chunk_pause` (as set when the job started), waking early to stop.
pub fn pause_before_chunk(job: &JobSlot) {
    let pause = job.chunk_pause_ms.load(Ordering::Relaxed);
    let until = crate::pg::now_ms() + pause;
    while pause > 0 && !job.should_stop() && crate::pg::now_ms() < until {
        if BackgroundWorker::sigterm_received() {
            job.fail(&format!(
                "worker pid {} was terminated (SIGTERM: server shutdown or pg_terminate_backend)",
                crate::pg::my_pid()
            ));
            return;
        }
        nap(Duration::from_millis((until - crate::pg::now_ms()).clamp(1, 50)));
    }
}

/// Connects this worker to the job's database as the job's role: the caller's privileges, exactly.
pub fn connect_as_caller(job: &JobSlot) {
    let db = pg_sys::Oid::from(job.database_oid.load(Ordering::Acquire));
    let role = pg_sys::Oid::from(job.role_oid.load(Ordering::Acquire));
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), Some(role));
}

/// The life of a job's leader, the same for generate and apply: connect as the caller, wait for the
/// caller's transaction (`on_rollback` cleans up if it rolled back), mark the job running, run `body`
/// under error capture, end any transaction an error or stop left open, then `finish` with the outcome.
pub fn lead(
    arg: pg_sys::Datum,
    on_rollback: impl FnOnce(&JobSlot),
    body: impl FnOnce(&'static Shared, usize) -> Result<(), String> + std::panic::UnwindSafe,
    finish: impl FnOnce(&'static Shared, usize, Result<(), String>),
) {
    let (slot, _) = unpack_arg(arg);
    BackgroundWorker::attach_signal_handlers(
        pgrx::bgworkers::SignalWakeFlags::SIGHUP | pgrx::bgworkers::SignalWakeFlags::SIGTERM,
    );
    let shared = shmem::require();
    let job = &shared.jobs[slot];
    connect_as_caller(job);
    job.leader_pid.store(pg::my_pid(), Ordering::Release);
    job.leader_latch.store(pg::my_latch(), Ordering::Release);
    job.state.store(shmem::job_state::RUNNING, Ordering::Release);
    let id = job.id.get();
    match pg::xact::try_catch(|| wait_for_caller(job, &id)) {
        Ok(true) => {}
        Ok(false) => {
            on_rollback(job);
            release(shared, slot);
            return;
        }
        Err(msg) => {
            pg::xact::abort_after_error();
            log!("steep_repl: leader of {id} could not see its job row: {msg}");
            on_rollback(job);
            release(shared, slot);
            return;
        }
    }
    job.started_ms.store(pg::now_ms(), Ordering::Relaxed);
    job.set_phase(shmem::Phase::Plan);
    let outcome = pg::xact::try_catch(|| {
        BackgroundWorker::transaction(|| persist(&id, Some("running"), &Figures::of(job)));
        crate::progress::publish_if_due(job, true);
        body(shared, slot)
    })
    .and_then(|r| r);
    if outcome.is_err() {
        // An ERROR, or a stop while a transaction was still open: end it (and its locks) before anything
        // is recorded. A no-op when no transaction is open.
        pg::xact::abort_after_error();
    }
    finish(shared, slot, outcome);
    // An apply leader holds session locks on its tables during the data phase; never leave them behind.
    pg::xact::release_all_locks();
}

/// The start of a data worker's life, the same for generate and apply: returns the job slot and this
/// worker's slot, marked running with its pid, connected as the caller.
pub fn start_worker(arg: pg_sys::Datum) -> Option<(&'static Shared, usize, &'static WorkerSlot)> {
    let (slot, Some(ws)) = unpack_arg(arg) else { return None };
    BackgroundWorker::attach_signal_handlers(
        pgrx::bgworkers::SignalWakeFlags::SIGHUP | pgrx::bgworkers::SignalWakeFlags::SIGTERM,
    );
    let shared = shmem::require();
    let me = &shared.workers[ws];
    me.pid.store(pg::my_pid(), Ordering::Release);
    me.state.store(worker_state::RUNNING, Ordering::Release);
    connect_as_caller(&shared.jobs[slot]);
    Some((shared, slot, me))
}

/// The end of a data worker's life: DONE, or FAILED with the error recorded as the job's.
pub fn end_worker(job: &JobSlot, me: &WorkerSlot, result: Result<(), String>) {
    match result {
        Ok(()) => me.state.store(worker_state::DONE, Ordering::Release),
        Err(msg) => {
            pg::xact::abort_after_error();
            job.fail(&msg);
            me.state.store(worker_state::FAILED, Ordering::Release);
        }
    }
    wake_leader(job);
}

/// Wakes the job's leader from its nap in `watch_workers` (a unit is done, or a worker ended).
pub fn wake_leader(job: &JobSlot) {
    pg::set_latch(job.leader_latch.load(Ordering::Acquire));
}

/// How a kind of job ends: what success is called, what a failure cleans up, and what its messages add.
pub struct Ending {
    /// Phase and status of success: Complete/"complete" (generate), Applied/"applied" (apply).
    pub success: (shmem::Phase, &'static str),
    /// Run after a failure or cancel, once the workers have stopped.
    pub cleanup: fn(&JobSlot),
    /// The error recorded for a cancel.
    pub cancelled: fn(&str) -> String,
    /// The error recorded for a failure, from the first error and the job id.
    pub failed: fn(String, &str) -> String,
}

/// Ends a job: on failure, stops its workers and cleans up; records the status and error in its row,
/// sends the last notification, and frees every slot the job held.
pub fn finish(shared: &Shared, slot: usize, outcome: Result<(), String>, ending: &Ending) {
    let job = &shared.jobs[slot];
    let id = job.id.get();
    let (status, error) = match outcome {
        Ok(()) => {
            job.set_phase(ending.success.0);
            (ending.success.1, None)
        }
        Err(msg) => {
            job.fail(&msg);
            let first = job.error_message().unwrap_or(msg);
            stop_workers(shared, slot);
            (ending.cleanup)(job);
            if job.cancelled.load(Ordering::Acquire) != 0 {
                job.set_phase(shmem::Phase::Cancelled);
                ("cancelled", Some((ending.cancelled)(&id)))
            } else {
                job.set_phase(shmem::Phase::Failed);
                ("failed", Some((ending.failed)(first, &id)))
            }
        }
    };
    let recorded = pg::xact::try_catch(|| {
        BackgroundWorker::transaction(|| {
            record_end(&id, status, error.as_deref(), &Figures::of(job));
            crate::progress::notify(job);
        })
    });
    if let Err(e) = recorded {
        pg::xact::abort_after_error();
        log!("steep_repl: could not record the end of {id} ({status}): {e}");
    }
    release(shared, slot);
}

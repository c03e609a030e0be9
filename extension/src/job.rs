//! What generate and apply jobs share: ids, launching processes, the lives of leaders and workers
//! (attach, exit callbacks, release), job errors, and the reaping of jobs interrupted by a crash or a
//! restart.
//!
//! The life of a job, and who frees what (the slot state machine is described in `crate::shmem`):
//!
//! 1. `start_*` (the caller's backend) claims a job slot (STARTING), fills it, launches the leader and
//!    waits until the postmaster has started it, recording its pid. Any ERROR before that frees the
//!    slot again ([`StartGuard`]); a backend that dies in between leaves a slot whose claimer is dead,
//!    which the supervisor frees.
//! 2. The leader attaches (STARTING → RUNNING of its generation), registers an exit callback, connects
//!    as the caller, and waits for the caller's transaction: a rollback means the job never existed.
//! 3. The leader launches workers, each confirmed started before it counts; each worker attaches to
//!    its slot (LAUNCHING → RUNNING) and registers an exit callback that marks the slot FAILED and fails
//!    the job if the process ends without finishing (ERROR, FATAL, terminate).
//! 4. At the end the leader records the outcome, stops the workers (SIGTERM after a grace period:
//!    workers die at the next interrupt check, lock waits included), and frees every slot whose process
//!    has exited. Slots of a process that would not exit are left to the supervisor, which frees them
//!    once it has; nothing is ever freed under a live process.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::bookkeeping::{self, Figures};
use crate::pg::xact::{self, Caught};
use crate::pg::{self, rights};
use crate::shmem::{self, JobKind, JobSlot, Shared, WorkerSlot, chunk_state, job_state, worker_state};

/// A new job id: `gen-` or `app-` and 16 hex digits from the server's strong random source.
pub fn new_job_id(kind: JobKind) -> String {
    let prefix = match kind {
        JobKind::Generate => "gen",
        JobKind::Apply => "app",
        JobKind::Overlap => "ovl",
    };
    new_job_id_with_prefix(prefix)
}

/// A new job id: `prefix`, `-` and 16 hex digits (at most three letters: ids fit [`crate::shmem::JOB_ID_LEN`]).
pub fn new_job_id_with_prefix(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: writes 8 bytes into a local buffer; returns false only when no random source exists.
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    let n = if ok { u64::from_le_bytes(bytes) } else { pg::now_ms() ^ ((pg::my_pid() as u64) << 40) };
    format!("{prefix}-{n:016x}")
}

/// An error that ends a job: `public` is what every role may read (steep_repl.snapshots.error, NOTIFY,
/// snapshot_progress for others), `full` what the job's role and superusers read. They differ only when
/// the error came from PostgreSQL while it handled row data (see [`Caught::public`]).
#[derive(Debug, Clone)]
pub struct JobError {
    pub public: String,
    pub full: String,
}

impl JobError {
    /// An error of steep_repl's own, which holds no row data.
    pub fn plain(message: impl Into<String>) -> JobError {
        let m = message.into();
        JobError { public: m.clone(), full: m }
    }

    /// An error caught from PostgreSQL, with `context` (what was being done) in front when given.
    pub fn caught(context: Option<&str>, c: &Caught) -> JobError {
        match context {
            Some(ctx) => {
                JobError { public: format!("{ctx}: {}", c.public()), full: format!("{ctx}: {}", c.full()) }
            }
            None => JobError { public: c.public(), full: c.full() },
        }
    }

    /// Both texts passed through `f` (which adds words of steep_repl's own).
    pub fn map(self, f: impl Fn(String) -> String) -> JobError {
        JobError { public: f(self.public), full: f(self.full) }
    }
}

impl From<String> for JobError {
    fn from(m: String) -> Self {
        JobError::plain(m)
    }
}

impl From<&str> for JobError {
    fn from(m: &str) -> Self {
        JobError::plain(m)
    }
}

impl JobSlot {
    /// Records `e` as the job's first error (later ones are dropped) and tells every process to stop.
    pub fn fail_job(&self, e: &JobError) {
        self.fail_with(&e.public, &e.full);
    }

    /// The job's first error, both texts.
    pub fn job_error(&self) -> Option<JobError> {
        Some(JobError { public: self.error_message()?, full: self.error_message_full()? })
    }

    /// The generation of this slot now; meaningful to the slot's leader, which holds it.
    pub fn generation(&self) -> u32 {
        self.word.get().0
    }
}

/// Which worker entry point to start.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    GenerateLeader,
    GenerateWorker,
    ApplyLeader,
    ApplyWorker,
    OverlapLeader,
    Reaper,
    Prober,
}

impl Entry {
    fn function(self) -> &'static str {
        match self {
            Entry::GenerateLeader => "steep_repl_generate_leader",
            Entry::GenerateWorker => "steep_repl_generate_worker",
            Entry::ApplyLeader => "steep_repl_apply_leader",
            Entry::ApplyWorker => "steep_repl_apply_worker",
            Entry::OverlapLeader => "steep_repl_overlap_leader",
            Entry::Reaper => "steep_repl_reaper",
            Entry::Prober => "steep_repl_prober",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Entry::GenerateLeader | Entry::ApplyLeader | Entry::OverlapLeader => "steep_repl leader",
            Entry::GenerateWorker | Entry::ApplyWorker => "steep_repl worker",
            Entry::Reaper => "steep_repl reaper",
            Entry::Prober => "steep_repl prober",
        }
    }
}

/// The argument a leader or worker receives: its job slot, its worker slot (None for a leader), and
/// the generation of the slot it is to attach to (the job slot's for a leader, the worker slot's for a
/// worker). Packed into one Datum: generation in bits 32..64, job slot in 16..32, worker slot in 0..16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arg {
    pub job_slot: usize,
    pub worker_slot: Option<usize>,
    pub generation: u32,
}

impl Arg {
    const LEADER: u64 = 0xFFFF;

    pub fn pack(self) -> pg_sys::Datum {
        let w = self.worker_slot.map_or(Self::LEADER, |w| w as u64);
        pg_sys::Datum::from((u64::from(self.generation) << 32) | ((self.job_slot as u64 & 0xFFFF) << 16) | w)
    }

    pub fn unpack(d: pg_sys::Datum) -> Arg {
        let v = d.value() as u64;
        let w = v & 0xFFFF;
        Arg {
            job_slot: ((v >> 16) & 0xFFFF) as usize,
            worker_slot: (w != Self::LEADER).then_some(w as usize),
            generation: (v >> 32) as u32,
        }
    }
}

/// Why a process could not be launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchError {
    /// No background worker slot was free (`max_worker_processes`).
    NoSlot,
    /// The postmaster started it but it exited at once (see the server log), or could not start it.
    ExitedAtOnce,
    PostmasterDied,
}

/// Starts one dynamic background worker and waits until the postmaster has started it; returns its pid.
pub fn launch(entry: Entry, name: &str, arg: pg_sys::Datum) -> Result<i32, LaunchError> {
    let handle = BackgroundWorkerBuilder::new(name)
        .set_type(entry.kind())
        .set_library("steep_repl")
        .set_function(entry.function())
        .set_argument(Some(arg))
        .enable_spi_access()
        .set_notify_pid(pg::my_pid())
        .load_dynamic()
        .map_err(|_| LaunchError::NoSlot)?;
    match handle.wait_for_startup() {
        Ok(pid) => Ok(pid),
        Err(BackgroundWorkerStatus::PostmasterDied) => Err(LaunchError::PostmasterDied),
        Err(_) => Err(LaunchError::ExitedAtOnce),
    }
}

/// Frees a job slot claimed by `start_*` unless [`StartGuard::launched`] was called: any ERROR between
/// claiming the slot and launching its leader (a read-only transaction, a failed insert, no worker
/// slot) leaves no slot behind. Also removes the output directory the call created, when given.
pub struct StartGuard {
    slot: usize,
    generation: u32,
    created_dir: Option<String>,
    created_file: Option<std::path::PathBuf>,
    armed: bool,
}

impl StartGuard {
    pub fn new(slot: usize, generation: u32) -> StartGuard {
        StartGuard { slot, generation, created_dir: None, created_file: None, armed: true }
    }

    /// Also remove `dir` (created by this call) if the start fails.
    pub fn remove_dir_on_failure(&mut self, dir: &str) {
        self.created_dir = Some(dir.to_string());
    }

    /// Also remove `file` (created by this call) if the start fails, before the directory.
    pub fn remove_file_on_failure(&mut self, file: std::path::PathBuf) {
        self.created_file = Some(file);
    }

    /// The leader runs: from now on it owns the slot and the directory.
    pub fn launched(mut self) {
        self.armed = false;
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Only atomics and a directory removal: safe while an ERROR unwinds.
        if let Some(shared) = shmem::get() {
            shared.release_job(self.slot, self.generation);
        }
        if let Some(file) = &self.created_file {
            let _gone = std::fs::remove_file(file);
        }
        if let Some(dir) = &self.created_dir {
            let _not_empty_or_gone = std::fs::remove_dir(dir);
        }
    }
}

/// Launches the leader of the job in `slot` (claimed by the caller, generation `generation`) and
/// records its pid; an ERROR naming what to raise when it cannot start.
pub fn launch_leader(entry: Entry, shared: &Shared, slot: usize, generation: u32) {
    let job = &shared.jobs[slot];
    let id = job.id.get();
    let arg = Arg { job_slot: slot, worker_slot: None, generation };
    match launch(entry, &format!("{} {id}", entry.kind()), arg.pack()) {
        Ok(pid) => {
            let _attached_first =
                job.leader_pid.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed);
        }
        Err(LaunchError::NoSlot) => crate::api::user_error(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("no background worker slot is free to start the leader of {id}"),
            Some(&crate::limits::worker_slots_hint(
                1 + job.parallel_requested.load(Ordering::Relaxed) as usize,
            )),
        ),
        Err(LaunchError::ExitedAtOnce) => crate::api::user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("the leader of {id} exited as soon as it started"),
            Some(
                "The server log says why (for example a role that may not log in, or a database that does not allow connections).",
            ),
        ),
        Err(LaunchError::PostmasterDied) => {
            crate::api::user_error(PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN, "the postmaster died".into(), None)
        }
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

/// Waits until the transaction that created (or resumed) a job has ended; true if it committed with the
/// job's row `pending` (what `start_*` and `resume_apply` leave), false otherwise: rolled back, or the
/// call itself undone by a rollback to a savepoint. Then the job must not run.
pub fn wait_for_caller(job: &JobSlot, id: &str) -> bool {
    let xid = job.caller_xid.load(Ordering::Acquire);
    while xact::xid_in_progress(xid) {
        nap(Duration::from_millis(20));
    }
    if !xact::xid_committed(xid) {
        return false;
    }
    // A cancel of the leader while it waited (pg_cancel_backend, or cancel_snapshot's SIGINT) cancels
    // the job, which now exists: it ends as cancelled once it looks at its stop flag.
    if pg::take_cancel_request() && !job.should_stop() {
        job.cancelled.store(1, Ordering::Release);
        job.fail("cancelled before it began (the leader received a query cancel)");
    }
    BackgroundWorker::transaction(|| bookkeeping::operation(id).is_some_and(|op| op.status == "pending"))
}

/// SQLSTATE query_canceled.
const QUERY_CANCELED: &str = "57014";

/// How long a leader waits for workers to stop after a failure before sending SIGTERM.
const STOP_GRACE_MS: u64 = 5_000;
/// How often a leader looks at its workers.
const LEADER_TICK: Duration = Duration::from_millis(100);

/// Launches up to `max_useful` workers of `entry` for the job: as many as it asked for, capped by
/// `steep_repl.max_workers` and the server's free worker slots. Each counts once the postmaster has
/// started it. Returns how many started.
pub fn launch_workers(shared: &Shared, slot: usize, entry: Entry, max_useful: usize) -> usize {
    let job = &shared.jobs[slot];
    let generation = job.generation();
    let id = job.id.get();
    let want = (job.parallel_requested.load(Ordering::Relaxed) as usize).min(max_useful);
    let cap = (crate::gucs::MAX_WORKERS.get().max(1) as usize).saturating_sub(shared.workers_in_use());
    let mut launched = 0usize;
    for _ in 0..want.min(cap) {
        let Some((ws, wgen)) = shared.claim_worker_slot(slot, generation) else { break };
        let w = &shared.workers[ws];
        let arg = Arg { job_slot: slot, worker_slot: Some(ws), generation: wgen };
        match launch(entry, &format!("{} {id} #{ws}", entry.kind()), arg.pack()) {
            Ok(pid) => {
                let _attached_first = w.pid.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed);
                launched += 1;
            }
            Err(e) => {
                // Its process has exited (or never started): a slot it never attached to is free again;
                // one it attached to was marked DONE or FAILED by the process itself.
                if w.word.is(wgen, worker_state::LAUNCHING) {
                    w.word.free(wgen);
                } else {
                    launched += 1;
                }
                if e != LaunchError::ExitedAtOnce {
                    if e == LaunchError::NoSlot && launched < want {
                        log!(
                            "steep_repl: {id} runs with {launched} of {want} workers: no background worker slot is \
                             free. {}",
                            crate::limits::worker_slots_hint(want - launched)
                        );
                    }
                    break;
                }
            }
        }
    }
    job.workers_launched.store(launched as u32, Ordering::Relaxed);
    launched
}

/// Waits until every chunk is done or the job stops, failing the job when a worker dies; calls
/// `on_tick` about every 100 ms (an apply leader publishes progress there). `tables_done` is kept at
/// `tables_before` (tables a resumed job had finished) plus the tables all of whose chunks are done.
pub fn watch_workers(shared: &Shared, slot: usize, tables_before: u32, mut on_tick: impl FnMut(&JobSlot)) {
    let job = &shared.jobs[slot];
    let generation = job.generation();
    let count = job.chunk_count.load(Ordering::Acquire);
    let base = job.chunk_base.load(Ordering::Acquire) as usize;
    let me = pg::my_pid();
    let mut last_count = 0u64;
    loop {
        if job.units_done.load(Ordering::Acquire) >= count || job.should_stop() {
            return;
        }
        // A cancel (SIGINT) or terminate (SIGTERM, see pg::stop_job_on_sigterm) raises an ERROR here.
        pgrx::check_for_interrupts!();
        let mut active = 0;
        for (i, w, _) in shared.job_workers(slot, Some(generation)) {
            let pid = w.pid.load(Ordering::Acquire);
            match w.word.state() {
                worker_state::LAUNCHING | worker_state::RUNNING if pid != me => {
                    active += 1;
                    if pid > 0 && !pg::process_alive(pid) {
                        job.fail(&format!("worker #{i} (pid {pid}) exited unexpectedly"));
                    }
                }
                _ => {}
            }
        }
        if active == 0 && job.units_done.load(Ordering::Acquire) < count {
            job.fail("every worker exited before all chunks were done");
        }
        // Workers wake the leader at every unit done: count tables (a pass over every chunk slot) at
        // most every tick, not at every wake-up.
        let now = pg::now_ms();
        if now.saturating_sub(last_count) >= LEADER_TICK.as_millis() as u64 {
            job.tables_done
                .store(tables_before + count_tables_done(shared, base, count as usize), Ordering::Relaxed);
            last_count = now;
        }
        on_tick(job);
        nap(LEADER_TICK);
    }
}

/// After the data phase: waits until every worker of the job has finished what it still does (an apply's
/// workers build deferred indexes) and ended, or the job stops; a worker that died fails the job.
pub fn wait_for_workers(shared: &Shared, slot: usize) {
    let job = &shared.jobs[slot];
    let generation = job.generation();
    let me = pg::my_pid();
    loop {
        if job.should_stop() {
            return;
        }
        pgrx::check_for_interrupts!();
        let mut active = 0;
        for (i, w, _) in shared.job_workers(slot, Some(generation)) {
            let pid = w.pid.load(Ordering::Acquire);
            if matches!(w.word.state(), worker_state::LAUNCHING | worker_state::RUNNING) && pid != me {
                active += 1;
                if pid > 0 && !pg::process_alive(pid) {
                    job.fail(&format!("worker #{i} (pid {pid}) exited unexpectedly"));
                }
            }
        }
        if active == 0 {
            return;
        }
        nap(LEADER_TICK);
    }
}

/// Tables all of whose chunks are done, whatever order the chunks were planned in.
pub fn count_tables_done(shared: &Shared, base: usize, count: usize) -> u32 {
    let Some(slots) = shared.chunks().get(base..base + count) else { return 0 };
    let tables = slots.iter().map(|c| c.table.load(Ordering::Relaxed) as usize + 1).max().unwrap_or(0);
    let (mut seen, mut all_done) = (vec![false; tables], vec![true; tables]);
    for c in slots {
        let t = c.table.load(Ordering::Relaxed) as usize;
        seen[t] = true;
        all_done[t] &= c.state.load(Ordering::Acquire) == chunk_state::DONE;
    }
    seen.iter().zip(&all_done).filter(|(s, d)| **s && **d).count() as u32
}

/// Pids of the job's worker processes still alive (this process excluded).
fn live_workers(shared: &Shared, slot: usize, generation: u32) -> Vec<i32> {
    let me = pg::my_pid();
    shared
        .job_workers(slot, Some(generation))
        .map(|(_, w, _)| w.pid.load(Ordering::Acquire))
        .filter(|&pid| pid > 0 && pid != me && pg::process_alive(pid))
        .collect()
}

/// Waits for the job's workers to exit: cancels what each is doing (SIGINT), SIGTERMs those still
/// running after the grace period (they die at their next interrupt check, also inside a lock wait) and
/// gives them as long again.
pub fn stop_workers(shared: &Shared, slot: usize) {
    let generation = shared.jobs[slot].generation();
    let start = pg::now_ms();
    // A query cancel first: a worker waiting on a lock or a row stops at once.
    for pid in live_workers(shared, slot, generation) {
        pg::cancel_process(pid);
    }
    let mut signalled = false;
    loop {
        let running = live_workers(shared, slot, generation);
        if running.is_empty() {
            return;
        }
        let waited = pg::now_ms().saturating_sub(start);
        if waited > STOP_GRACE_MS && !signalled {
            for &pid in &running {
                pg::terminate_process(pid);
            }
            signalled = true;
        }
        if waited > 2 * STOP_GRACE_MS {
            return;
        }
        nap(Duration::from_millis(50));
    }
}

/// After the job has ended: waits for its workers, frees the slot of every worker whose process has
/// exited, and then the job's slot. If a worker is still alive, its slot and the job's are left to
/// the supervisor, which frees them once it has exited.
pub fn release(shared: &Shared, slot: usize) {
    let job = &shared.jobs[slot];
    let generation = job.generation();
    stop_workers(shared, slot);
    let me = pg::my_pid();
    let mut alive = Vec::new();
    for (i, w, wgen) in shared.job_workers(slot, Some(generation)) {
        let pid = w.pid.load(Ordering::Acquire);
        if pid > 0 && pid != me && pg::process_alive(pid) {
            alive.push((i, pid));
        } else {
            w.word.free(wgen);
        }
    }
    if alive.is_empty() {
        shared.release_job(slot, generation);
    } else {
        log!(
            "steep_repl: {} ended but workers {alive:?} (slot, pid) have not exited yet; the supervisor frees \
             their slots once they have",
            job.id.get()
        );
    }
}

/// Sleeps `steep_repl.chunk_pause` (as set when the job started), waking early to stop.
pub fn pause_before_chunk(job: &JobSlot) {
    let pause = job.chunk_pause_ms.load(Ordering::Relaxed);
    let until = pg::now_ms() + pause;
    while pause > 0 && !job.should_stop() && pg::now_ms() < until {
        pgrx::check_for_interrupts!();
        nap(Duration::from_millis((until - pg::now_ms()).clamp(1, 50)));
    }
}

/// Connects this worker to the job's database as the job's role (the caller's privileges, exactly),
/// and pins the session's search path.
pub fn connect_as_caller(job: &JobSlot) {
    let db = pg_sys::Oid::from(job.database_oid.load(Ordering::Acquire));
    let role = pg_sys::Oid::from(job.role_oid.load(Ordering::Acquire));
    // A query cancel can reach the process as soon as it is listed as a backend, before it has
    // connected (cancel_snapshot, pg_cancel_backend): processed here, it would end the process before
    // its job began; held off, it stays pending for the leader's wait_for_caller, which makes it a
    // cancel of the job, or for a worker's first interrupt check.
    let _hold = pg::HoldCancel::new();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), Some(role));
    BackgroundWorker::transaction(rights::pin_session);
}

/// Exit callback of a leader: a leader that ends without having ended its job (FATAL, terminate, a
/// crash of its Rust code outside the error handling) fails the job and terminates its workers (one may
/// be in an index build, which only a terminate interrupts); the supervisor then frees the slots and has
/// the job's row marked failed.
#[pg_guard]
unsafe extern "C-unwind" fn leader_exit(_code: std::ffi::c_int, arg: pg_sys::Datum) {
    let a = Arg::unpack(arg);
    let Some(shared) = shmem::get() else { return };
    let Some(job) = shared.jobs.get(a.job_slot) else { return };
    if job.word.is(a.generation, job_state::RUNNING) && job.leader_pid.load(Ordering::Acquire) == pg::my_pid()
    {
        if !job.phase().is_terminal() {
            job.fail(&format!(
                "the job's leader (pid {}) exited before the job ended{}",
                pg::my_pid(),
                if pg::dying() { " (terminated: server shutdown or pg_terminate_backend)" } else { "" }
            ));
            for pid in live_workers(shared, a.job_slot, job.generation()) {
                pg::terminate_process(pid);
            }
        }
        pg::set_latch(shared.supervisor_latch.load(Ordering::Acquire));
    }
}

/// Exit callback of a data worker: a worker that ends while its slot still says RUNNING (an ERROR
/// outside the error handling, FATAL, terminate) marks it FAILED and fails the job, naming itself.
#[pg_guard]
unsafe extern "C-unwind" fn worker_exit(code: std::ffi::c_int, arg: pg_sys::Datum) {
    let a = Arg::unpack(arg);
    let (Some(shared), Some(ws)) = (shmem::get(), a.worker_slot) else { return };
    let Some(w) = shared.workers.get(ws) else { return };
    if w.pid.load(Ordering::Acquire) != pg::my_pid() || !w.word.is(a.generation, worker_state::RUNNING) {
        return;
    }
    let job = &shared.jobs[w.job_slot.load(Ordering::Relaxed) as usize];
    let why = if pg::dying() {
        " (terminated: server shutdown, pg_terminate_backend, or the leader stopping it)".to_string()
    } else {
        format!(" (exit code {code}; the server log says why)")
    };
    job.fail(&format!("worker #{ws} (pid {}) exited before its work was done{why}", pg::my_pid()));
    w.word.transition(a.generation, worker_state::RUNNING, worker_state::FAILED);
    wake_leader(job);
}

/// The life of a job's leader, the same for generate and apply: attach to the slot, connect as the
/// caller, wait for the caller's transaction (`on_rollback` cleans up if it rolled back), mark the job
/// running, run `body` under error capture, end any transaction an error or stop left open, then
/// `finish` with the outcome.
pub fn lead(
    arg: pg_sys::Datum,
    on_rollback: impl FnOnce(&JobSlot),
    body: impl FnOnce(&'static Shared, usize) -> Result<(), JobError> + std::panic::UnwindSafe,
    finish: impl FnOnce(&'static Shared, usize, Result<(), JobError>),
) {
    let a = Arg::unpack(arg);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    let shared = shmem::require();
    let Some(job) = shared.jobs.get(a.job_slot) else { return };
    pg::stop_job_on_sigterm(&job.stop);
    if a.worker_slot.is_some() || !job.word.transition(a.generation, job_state::STARTING, job_state::RUNNING)
    {
        log!(
            "steep_repl: a leader for job slot {} found the slot no longer waiting for it; exiting",
            a.job_slot
        );
        return;
    }
    job.leader_pid.store(pg::my_pid(), Ordering::Release);
    job.leader_latch.store(pg::my_latch(), Ordering::Release);
    pg::on_exit(leader_exit, arg);
    connect_as_caller(job);
    let id = job.id.get();
    match xact::try_catch(|| wait_for_caller(job, &id)) {
        Ok(true) => {}
        Ok(false) => {
            on_rollback(job);
            release(shared, a.job_slot);
            return;
        }
        Err(c) => {
            xact::abort_after_error();
            log!("steep_repl: leader of {id} could not see its job row: {}", c.full());
            on_rollback(job);
            release(shared, a.job_slot);
            return;
        }
    }
    job.started_ms.store(pg::now_ms(), Ordering::Relaxed);
    job.set_phase(shmem::Phase::Plan);
    let outcome = match xact::try_catch(|| {
        BackgroundWorker::transaction(|| bookkeeping::persist(&id, Some("running"), &Figures::of(job)));
        crate::progress::publish_if_due(job, true);
        match job.job_error() {
            // Cancelled (or failed) before it began: nothing to run.
            Some(e) if job.should_stop() => Err(e),
            _ => body(shared, a.job_slot),
        }
    }) {
        Ok(r) => r,
        Err(c) => {
            if !pg::dying() && c.sqlstate == QUERY_CANCELED {
                // Timeouts are off in our sessions: a query cancel is a cancel (cancel_snapshot, or
                // pg_cancel_backend on the leader).
                job.cancelled.store(1, Ordering::Release);
                job.fail("cancelled (the leader received a query cancel)");
            }
            Err(JobError::caught(None, &c))
        }
    };
    if pg::dying() {
        job.fail("the job's leader was terminated (SIGTERM: server shutdown or pg_terminate_backend)");
    }
    if outcome.is_err() {
        // An ERROR, or a stop while a transaction was still open: end it (and its locks, the apply
        // leader's session locks included) before anything is recorded.
        xact::abort_after_error();
        xact::release_all_locks();
    }
    finish(shared, a.job_slot, outcome);
    xact::release_all_locks();
}

/// The start of a data worker's life, the same for generate and apply: attach to the worker slot
/// (exiting at once if it is not ours any more), register the exit callback, make SIGTERM interrupt
/// anything (lock waits included), connect as the caller. Returns the job slot and this worker's slot.
pub fn start_worker(arg: pg_sys::Datum) -> Option<(&'static Shared, usize, &'static WorkerSlot)> {
    let a = Arg::unpack(arg);
    let ws = a.worker_slot?;
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    pg::die_on_sigterm();
    let shared = shmem::require();
    let me = shared.workers.get(ws)?;
    if !me.word.transition(a.generation, worker_state::LAUNCHING, worker_state::RUNNING) {
        return None;
    }
    me.pid.store(pg::my_pid(), Ordering::Release);
    pg::on_exit(worker_exit, arg);
    let slot = me.job_slot.load(Ordering::Relaxed) as usize;
    connect_as_caller(&shared.jobs[slot]);
    Some((shared, slot, me))
}

/// The end of a data worker's life: DONE, or FAILED with the error recorded as the job's.
pub fn end_worker(job: &JobSlot, me: &WorkerSlot, result: Result<(), JobError>) {
    let generation = me.word.get().0;
    match result {
        Ok(()) => {
            me.word.transition(generation, worker_state::RUNNING, worker_state::DONE);
        }
        Err(e) => {
            xact::abort_after_error();
            job.fail_job(&e);
            me.word.transition(generation, worker_state::RUNNING, worker_state::FAILED);
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
    /// Run after a failure or cancel, once the workers have stopped; returns what it could not undo, which
    /// the recorded error then says.
    pub cleanup: fn(&JobSlot) -> Option<String>,
    /// The error recorded for a cancel.
    pub cancelled: fn(&str) -> String,
    /// The error recorded for a failure, from the first error and the job id.
    pub failed: fn(String, &str) -> String,
}

/// Ends a job: on failure, stops its workers and cleans up; records the status and error in its row,
/// sends the last notification, and frees every slot the job held whose process has exited.
pub fn finish(shared: &Shared, slot: usize, outcome: Result<(), JobError>, ending: &Ending) {
    let job = &shared.jobs[slot];
    let id = job.id.get();
    let (status, error) = match outcome {
        Ok(()) => {
            job.set_phase(ending.success.0);
            (ending.success.1, None)
        }
        Err(e) => {
            job.fail_job(&e);
            let first = job.job_error().unwrap_or(e);
            stop_workers(shared, slot);
            let left = (ending.cleanup)(job).map(|note| format!("; {note}")).unwrap_or_default();
            if job.cancelled.load(Ordering::Acquire) != 0 {
                job.set_phase(shmem::Phase::Cancelled);
                ("cancelled", Some(JobError::plain((ending.cancelled)(&id) + &left)))
            } else {
                job.set_phase(shmem::Phase::Failed);
                ("failed", Some(first.map(|m| (ending.failed)(m, &id) + &left)))
            }
        }
    };
    // A cancel or terminate that came late must not interrupt the recording of the end.
    pg::take_cancel_request();
    let recorded = xact::try_catch(|| {
        BackgroundWorker::transaction(|| {
            let e = error.as_ref().map(|e| (e.public.as_str(), e.full.as_str()));
            bookkeeping::record_end(&id, status, e, &Figures::of(job));
            crate::progress::notify(job);
        })
    });
    let unrecorded = recorded.is_err();
    if let Err(c) = recorded {
        xact::abort_after_error();
        log!("steep_repl: could not record the end of {id} ({status}): {}", c.full());
        if error.is_none() {
            // The row cannot say the job succeeded, so it will say failed: undo what a success left
            // (a generate's manifest), so that the two never disagree.
            let _ = (ending.cleanup)(job);
        }
    }
    let db = job.database_oid.load(Ordering::Acquire);
    release(shared, slot);
    if unrecorded {
        // Once the slot is free, a reaper marks the row failed with the reason.
        shared.request_reap(db);
    }
}

/// Marks `pending`/`running` rows of this database whose job no longer runs as failed: after a server
/// restart (the row's postmaster start differs), or when no job slot holds them any more (the leader
/// died). Cheap when nothing is running. Called by the reaper the supervisor starts, and by the
/// functions that read job status.
pub fn reap_interrupted() {
    let running = bookkeeping::unfinished_operations();
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
            "interrupted: the job's leader process ended without recording a result; for an apply, run \
             steep_repl.resume_apply(id) to continue"
        } else {
            "interrupted by a server restart; for an apply, run steep_repl.resume_apply(id) to continue"
        };
        bookkeeping::mark_interrupted(&id, reason);
    }
}

/// How long each step of a leader took, logged at DEBUG1 (`SET log_min_messages = debug1` in
/// postgresql.conf): where a job's time goes, without a profiler.
pub struct Laps {
    id: String,
    start: u64,
    last: u64,
}

impl Laps {
    pub fn new(id: &str) -> Laps {
        let now = pg::now_ms();
        Laps { id: id.to_string(), start: now, last: now }
    }

    /// Logs the time since the previous lap (and since the start) for `step`.
    pub fn lap(&mut self, step: &str) {
        let now = pg::now_ms();
        debug1!(
            "steep_repl: {} {step}: {} ms ({} ms since the leader began)",
            self.id,
            now.saturating_sub(self.last),
            now.saturating_sub(self.start)
        );
        self.last = now;
    }
}

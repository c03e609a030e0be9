//! Apply: one leader and `parallel` loading workers per job.
//!
//! The leader (connected as the caller) verifies the snapshot (quick check of every chunk file) unless
//! told not to, truncates the targets when asked, and publishes the chunks not yet loaded — largest
//! tables first — as shared-memory chunk slots. Each worker claims chunks through the atomic cursor and,
//! in batches of chunks, each batch one transaction: per chunk it takes ROW EXCLUSIVE on the table
//! without waiting (a DDL queued behind the leader's lock fails the job at once, naming the table and
//! the session), reads the file with `read(2)` (a file truncated or rewritten meanwhile is an error
//! naming it, never a crash), streams the decompressed COPY text into PostgreSQL's COPY FROM (parser,
//! type input, constraints, indexes), checks the file's CRC and the raw CRC, size and row count as the
//! stream ends, and at the end of the batch records every range of rows it loaded in
//! `steep_repl.apply_chunks` before committing. A range is therefore loaded and recorded, or neither:
//! `resume_apply` after any failure loads exactly the rows not recorded. A batch ends after `BATCH_MS`,
//! `BATCH_BYTES`, or as many tables as `max_locks_per_transaction`: small tables share a transaction,
//! large chunks get one each.
//! While it feeds COPY, a worker keeps the WAL writer writing its WAL out (`pg::wal`), so that it does
//! not end up writing WAL pages one at a time itself, waiting on `WALWriteLock`.
//!
//! When the caller is a superuser, workers run with `session_replication_role = replica`, as logical
//! replication's apply workers do: foreign-key and user triggers do not fire, so chunks of parent and
//! child tables load in any order. The result is still consistent because the snapshot is: every row of
//! every table comes from one snapshot of the source, where the constraints held.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use steep_repl_engine::chunk::ChunkReader;
use steep_repl_engine::copy_text::RowRange;
use steep_repl_engine::ident::QualifiedName;
use steep_repl_engine::manifest::Manifest;
use steep_repl_engine::schedule::{self, ChunkWork};
use steep_repl_engine::verify::{ProblemKind, VerifyMode, VerifyOptions, verify_snapshot_with};

use crate::bookkeeping::{self, LoadedRange};
use crate::job::{self, Entry, JobError};
use crate::pg::copy_from::{self, CopySource};
use crate::pg::wal::WalWriterNudge;
use crate::pg::{self, session, xact};
use crate::progress;
use crate::shmem::{JobSlot, Phase, Shared, WorkerSlot, analyze_state, chunk_state, worker_state};
use crate::worker::indexes;

/// Job flags of an apply.
pub mod flags {
    pub const VERIFY: u32 = 1;
    pub const TRUNCATE: u32 = 1 << 1;
    pub const ANALYZE: u32 = 1 << 2;
    /// Workers set session_replication_role = replica (the caller is a superuser).
    pub const REPLICA: u32 = 1 << 3;
    /// A resume_apply: ranges already recorded are skipped; TRUNCATE is set only if the first run asked
    /// for it and never committed it.
    pub const RESUME: u32 = 1 << 4;
}

/// How many problems a "verification failed" error lists before "and N more".
const MAX_LISTED_PROBLEMS: usize = 20;
/// Live progress is folded into the shared counters about this often (bytes).
const PROGRESS_STEP: u64 = 1 << 20;

fn has(job: &JobSlot, flag: u32) -> bool {
    job.flags.load(Ordering::Relaxed) & flag != 0
}

/// Entry point of an apply job's leader. `arg` carries the job slot and its generation.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_apply_leader(arg: pg_sys::Datum) {
    job::lead(arg, |_| {}, run_leader, finish);
}

/// The manifest in the job's directory, refused unless it is the one the job was started on.
fn load_manifest(job: &JobSlot) -> Result<(PathBuf, Manifest), JobError> {
    let dir = PathBuf::from(job.path.get());
    let (m, sha256) = Manifest::load_with_sha256(&dir).map_err(|e| e.to_string())?;
    let expected = job.manifest_sha256.get();
    if sha256 != expected {
        return Err(JobError::plain(format!(
            "{} no longer holds the snapshot this apply started on (its manifest changed): refusing to mix two \
             snapshots",
            dir.display()
        )));
    }
    Ok((dir, m))
}

/// Checks every chunk file before anything is loaded; an error listing the bad ones. Files the server
/// may not read are an error of their own (not a damaged snapshot), naming the server's OS user.
fn verify_files(job: &'static JobSlot, dir: &std::path::Path) -> Result<(), JobError> {
    let options = VerifyOptions {
        mode: VerifyMode::Quick,
        threads: Some(job.parallel_requested.load(Ordering::Relaxed).max(1) as usize),
        signals_to_caller: true,
        // A cancel or terminate stops the verification at the next chunk.
        stop: Some(&job.stop),
    };
    let report = match verify_snapshot_with(dir, &options) {
        Ok(report) => report,
        Err(steep_repl_engine::Error::Stopped) => {
            return Err(job.job_error().unwrap_or_else(|| JobError::plain("stopped during verification")));
        }
        Err(e) => return Err(JobError::plain(format!("verification failed: {e}"))),
    };
    if report.is_ok() {
        return Ok(());
    }
    let denied = |p: &steep_repl_engine::verify::Problem| {
        p.kind == ProblemKind::Io && p.detail.contains("Permission denied")
    };
    if report.problems.iter().all(denied) {
        let first = &report.problems[0];
        return Err(JobError::plain(format!(
            "the server may not read the snapshot's files ({} of them, e.g. {}: {}). {}",
            report.problems.len(),
            first.file.as_deref().unwrap_or("?"),
            first.detail,
            crate::api::server_user_hint(&dir.display().to_string())
        )));
    }
    let mut listed: Vec<String> =
        report.problems.iter().take(MAX_LISTED_PROBLEMS).map(|p| p.to_string()).collect();
    if report.problems.len() > MAX_LISTED_PROBLEMS {
        listed.push(format!("and {} more", report.problems.len() - MAX_LISTED_PROBLEMS));
    }
    Err(JobError::plain(format!("verification failed: {}", listed.join("; "))))
}

/// Tables the leader holds SHARE UPDATE EXCLUSIVE on during the data phase (to keep autovacuum off
/// half-loaded tables): those of at least this much COPY text, the largest first, ...
const SESSION_LOCK_MIN_BYTES: u64 = 1 << 20;

fn run_leader(shared: &'static Shared, slot: usize) -> Result<(), JobError> {
    let job = &shared.jobs[slot];
    let id = job.id.get();
    let mut laps = job::Laps::new(&id);
    let (dir, manifest) = load_manifest(job)?;
    laps.lap("read the manifest");

    if has(job, flags::VERIFY) {
        job.set_phase(Phase::Verify);
        progress::publish_if_due(job, true);
        verify_files(job, &dir)?;
        laps.lap("verified the files");
    }

    let (done, relids, index_settings) = BackgroundWorker::transaction(|| {
        let relids: Vec<pg_sys::Oid> =
            crate::api::apply::target_relids(&manifest).into_iter().map(pg_sys::Oid::from).collect();
        // Indexes an earlier run could not build are tried again.
        bookkeeping::indexes::clear_failures(&id);
        (bookkeeping::loaded_ranges(&id), relids, index_settings(&id))
    });
    if let Some(k) = relids.iter().position(|r| *r == pg_sys::InvalidOid) {
        return Err(JobError::plain(format!("table {} does not exist any more", manifest.tables[k].label())));
    }

    // A resume passes TRUNCATE only when the first run never got to it (see resume_apply).
    if has(job, flags::TRUNCATE) && !manifest.tables.is_empty() {
        stop_point(job)?;
        job.set_phase(Phase::Truncate);
        progress::publish_if_due(job, true);
        truncate(&id, &manifest, &relids)?;
    }

    // While the data loads, the leader holds SHARE UPDATE EXCLUSIVE on the largest target tables, for
    // the session: it does not conflict with the workers' inserts (ROW EXCLUSIVE), but autovacuum skips
    // a table it cannot lock, so it neither vacuums nor analyzes half-loaded tables while competing with
    // the load for CPU and I/O (pg_restore gets the same by loading a table in one transaction, whose
    // rows autovacuum only sees at its commit). Other sessions' VACUUM, ANALYZE and DDL on these tables
    // wait until the data is in. Only tables of at least SESSION_LOCK_MIN_BYTES, and no more of them
    // than max_locks_per_transaction (a database of 100 000 small tables must not fill the server's
    // lock table; autovacuum of a small table is cheap). Released after the data phase, or when the
    // leader exits.
    let mut by_size: Vec<(u64, pg_sys::Oid)> = manifest
        .tables
        .iter()
        .zip(&relids)
        .map(|(t, r)| (t.chunks.iter().map(|c| c.raw_bytes).sum::<u64>(), *r))
        .filter(|(bytes, _)| *bytes >= SESSION_LOCK_MIN_BYTES)
        .collect();
    by_size.sort_unstable_by_key(|b| std::cmp::Reverse(b.0));
    // SAFETY: a GUC-backed global, set at server start.
    by_size.truncate(unsafe { pg_sys::max_locks_per_xact }.max(1) as usize);
    let session_locked: Vec<pg_sys::Oid> = by_size.into_iter().map(|(_, r)| r).collect();
    BackgroundWorker::transaction(|| {
        for &relid in &session_locked {
            pg::lock_relation_for_session(relid, pg_sys::ShareUpdateExclusiveLock);
        }
    });

    // The units still to load, in claiming order: largest tables first, round-robin across tables,
    // small units last and a tail cut finer towards the end (steep_repl_engine::schedule).
    let mut loaded: HashMap<(String, String, i32), Vec<(u64, u64)>> = HashMap::new();
    for (key, range) in done {
        loaded.entry(key).or_default().push(range);
    }
    let work: Vec<ChunkWork> = manifest
        .tables
        .iter()
        .enumerate()
        .flat_map(|(t, table)| {
            let loaded = &loaded;
            table.chunks.iter().map(move |c| ChunkWork {
                table: t,
                chunk: c.index,
                rows: c.rows,
                raw_bytes: c.raw_bytes,
                loaded: loaded
                    .get(&(table.schema.clone(), table.name.clone(), c.index as i32))
                    .cloned()
                    .unwrap_or_default(),
            })
        })
        .collect();
    let workers =
        job.parallel_requested.load(Ordering::Relaxed).min(crate::gucs::MAX_WORKERS.get().max(1) as u32);
    let part_bytes = job.chunk_bytes.load(Ordering::Relaxed).max(1);
    laps.lap("looked up the tables and what was loaded");
    let todo = schedule::schedule(&work, workers, part_bytes);
    let pending_tables: HashSet<usize> = todo.iter().map(|u| u.table).collect();

    // The indexes of the large tables still to load are built after the data (crate::worker::indexes).
    stop_point(job)?;
    let deferred = indexes::defer(&id, index_settings, &manifest, &relids, &pending_tables)?;
    laps.lap(&format!("deferred {deferred} indexes"));
    let tables_complete = (manifest.tables.len() - pending_tables.len()) as u32;
    let base = shared
        .alloc_chunks(slot, todo.len())
        .ok_or_else(|| crate::limits::chunk_slots_error(todo.len(), shared.free_chunk_slots()))?;
    let chunks = shared.chunks();
    let mut work_total = 0u64;
    let mut heads: HashMap<(usize, u32), usize> = HashMap::new();
    let mut table_heads: HashMap<usize, usize> = HashMap::new();
    for (k, u) in todo.iter().enumerate() {
        let head = *heads.entry((u.table, u.chunk)).or_insert(k);
        let table_head = *table_heads.entry(u.table).or_insert(k);
        let s = &chunks[base + k];
        s.relid.store(relids[u.table].to_u32(), Ordering::Relaxed);
        s.table.store(u.table as u32, Ordering::Relaxed);
        s.index.store(u.chunk, Ordering::Relaxed);
        s.row_start.store(u.row_start, Ordering::Relaxed);
        s.row_end.store(u.row_end, Ordering::Relaxed);
        s.head.store(head as u32, Ordering::Relaxed);
        s.parts_left.store(0, Ordering::Relaxed);
        s.table_head.store(table_head as u32, Ordering::Relaxed);
        s.table_left.store(0, Ordering::Relaxed);
        s.analyze.store(analyze_state::TODO, Ordering::Relaxed);
        // Until the unit is done, raw_bytes holds its estimate (claims compare sizes with it).
        s.raw_bytes.store(u.est_bytes, Ordering::Relaxed);
        for a in [&s.rows, &s.file_bytes] {
            a.store(0, Ordering::Relaxed);
        }
        work_total += u.est_bytes;
    }
    for (k, u) in todo.iter().enumerate() {
        let head = heads[&(u.table, u.chunk)];
        chunks[base + head].parts_left.fetch_add(1, Ordering::Relaxed);
        chunks[base + table_heads[&u.table]].table_left.fetch_add(1, Ordering::Relaxed);
        chunks[base + k].state.store(chunk_state::PENDING, Ordering::Release);
    }
    job.chunks_total.store(heads.len() as u32, Ordering::Relaxed);
    job.tables_total.store(manifest.tables.len() as u32, Ordering::Relaxed);
    job.tables_done.store(tables_complete, Ordering::Relaxed);
    job.work_total.store(work_total, Ordering::Relaxed);
    job.chunk_cursor.store(0, Ordering::Relaxed);
    job.chunks_ready.store(1, Ordering::Release);
    job.set_phase(Phase::Data);
    progress::publish_if_due(job, true);

    laps.lap("scheduled and published the units");
    let launched = job::launch_workers(shared, slot, Entry::ApplyWorker, todo.len());
    laps.lap("launched the workers");
    if launched == 0 && !todo.is_empty() {
        // No worker slot free anywhere: the leader loads alone.
        let (ws, wgen) =
            shared.claim_worker_slot(slot, job.generation()).ok_or("no steep_repl worker slot is free")?;
        let me = &shared.workers[ws];
        me.pid.store(pg::my_pid(), Ordering::Release);
        me.word.transition(wgen, worker_state::LAUNCHING, worker_state::RUNNING);
        let loaded = load_chunks(shared, slot, me, &dir, &manifest, None);
        me.word.transition(wgen, worker_state::RUNNING, worker_state::DONE);
        job.workers_launched.store(1, Ordering::Relaxed);
        loaded?;
    }
    // Tables a resumed job had finished before count as done from the start (once: the leader's tick
    // stores its count of this run's finished tables plus these).
    // A table with deferred indexes is let go of once all its rows are in, so that a worker with nothing
    // left to load can build its indexes (ALTER TABLE ... ADD CONSTRAINT waits for this lock) while the
    // others still load.
    let mut held: HashSet<pg_sys::Oid> = session_locked.iter().copied().collect();
    let mut to_build: HashSet<pg_sys::Oid> =
        BackgroundWorker::transaction(|| bookkeeping::indexes::left(&id))
            .into_iter()
            .map(|(d, _)| pg_sys::Oid::from(d.relid))
            .filter(|r| held.contains(r))
            .collect();
    let mut last_release = 0u64;
    job::watch_workers(shared, slot, tables_complete, |job| {
        progress::publish_if_due(job, false);
        let now = pg::now_ms();
        if to_build.is_empty() || now.saturating_sub(last_release) < 200 {
            return;
        }
        last_release = now;
        let loading = tables_loading(shared, job);
        to_build.retain(|relid| {
            if loading.contains(relid) {
                return true;
            }
            pg::unlock_relation_for_session(*relid, pg_sys::ShareUpdateExclusiveLock);
            held.remove(relid);
            false
        });
    });
    if job.should_stop() {
        return Err(job.job_error().unwrap_or_else(|| JobError::plain("stopped")));
    }
    job.tables_done.store(manifest.tables.len() as u32, Ordering::Relaxed);
    BackgroundWorker::transaction(|| {
        for &relid in &held {
            pg::unlock_relation_for_session(relid, pg_sys::ShareUpdateExclusiveLock);
        }
    });

    laps.lap("data phase");
    build_indexes(shared, slot, &id, index_settings)?;
    laps.lap("built the deferred indexes");
    if !manifest.sequences.is_empty() {
        stop_point(job)?;
        job.set_phase(Phase::Sequences);
        progress::publish_if_due(job, true);
        BackgroundWorker::transaction(|| -> Result<(), String> {
            for s in &manifest.sequences {
                let qn = QualifiedName::new(s.schema.clone(), s.name.clone()).to_string();
                Spi::run_with_args(
                    "SELECT pg_catalog.setval($1::pg_catalog.regclass, $2, $3)",
                    &[qn.as_str().into(), s.last_value.into(), s.is_called.into()],
                )
                .map_err(|e| format!("setting sequence {qn}: {e}"))?;
            }
            Ok(())
        })?;
    }
    laps.lap("sequences");
    // The workers analyzed the tables they could (Finishing::analyze_ready); the leader does the rest,
    // and the tables a resumed run had loaded before.
    let chunks = shared.chunks();
    let analyzed: HashSet<usize> = shared
        .apply_tables(slot)
        .into_iter()
        .filter(|(_, first, _)| chunks[*first].analyze.load(Ordering::Acquire) == analyze_state::DONE)
        .map(|(t, _, _)| t as usize)
        .collect();
    let to_analyze: Vec<_> =
        manifest.tables.iter().enumerate().filter(|(t, _)| !analyzed.contains(t)).map(|(_, t)| t).collect();
    if has(job, flags::ANALYZE) && !to_analyze.is_empty() {
        stop_point(job)?;
        job.set_phase(Phase::Analyze);
        progress::publish_if_due(job, true);
        for batch in to_analyze.chunks(ANALYZE_BATCH) {
            let list: Vec<String> = batch
                .iter()
                .map(|t| QualifiedName::new(t.schema.clone(), t.name.clone()).to_string())
                .collect();
            BackgroundWorker::transaction(|| {
                Spi::run(&format!("ANALYZE {}", list.join(", "))).map_err(|e| format!("ANALYZE: {e}"))
            })?;
            if job.should_stop() {
                return Err(job.job_error().unwrap_or_else(|| JobError::plain("stopped")));
            }
        }
    }
    Ok(())
}

/// Empties the target tables in one transaction: one TRUNCATE ONLY per owner, run as that owner (its
/// TRUNCATE triggers never run with the job role's rights), all tables of an owner in one statement so
/// that foreign keys between them do not refuse it. The job's role was checked for TRUNCATE on each.
fn truncate(id: &str, manifest: &Manifest, relids: &[pg_sys::Oid]) -> Result<(), JobError> {
    let done = xact::try_catch(|| {
        BackgroundWorker::transaction(|| {
            let owners = Spi::get_one_with_args::<Vec<pg_sys::Oid>>(
                "SELECT coalesce(pg_catalog.array_agg(c.relowner ORDER BY w.n), '{}') \
                 FROM pg_catalog.unnest($1::pg_catalog.oid[]) WITH ORDINALITY AS w(relid, n) \
                 JOIN pg_catalog.pg_class c ON c.oid = w.relid",
                &[relids.to_vec().into()],
            )
            .unwrap_or_else(|e| error!("reading the owners of the target tables: {e}"))
            .unwrap_or_default();
            let mut by_owner: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
            for (t, owner) in manifest.tables.iter().zip(owners) {
                let name = QualifiedName::new(t.schema.clone(), t.name.clone()).to_string();
                by_owner.entry(owner.to_u32()).or_default().push(name);
            }
            for (owner, tables) in by_owner {
                crate::pg::rights::as_table_owner(pg_sys::Oid::from(owner), || {
                    Spi::run(&format!("TRUNCATE ONLY {}", tables.join(", ")))
                })
                .unwrap_or_else(|e| error!("truncating the target tables: {e}"));
            }
            // Recorded with the truncation itself: a resume truncates again only if this never
            // committed (and then nothing of this apply was loaded yet).
            bookkeeping::mark_truncated(id);
        })
    });
    match done {
        Ok(()) => Ok(()),
        Err(c) if c.sqlstate == crate::limits::OUT_OF_SHARED_MEMORY => {
            xact::abort_after_error();
            Err(JobError::plain(crate::limits::lock_table_error(manifest.tables.len())))
        }
        Err(c) => {
            xact::abort_after_error();
            Err(JobError::caught(Some("truncating the target tables"), &c))
        }
    }
}

/// How apply `id` defers its indexes (from its row's options). Inside a transaction.
fn index_settings(id: &str) -> indexes::Settings {
    bookkeeping::operation(id)
        .map(|op| indexes::Settings::from_options(&op.options))
        .unwrap_or(indexes::Settings { defer_bytes: None, memory_kb: 0 })
}

/// Builds the indexes deferred by this apply (or by the run it resumes) that its workers have not built,
/// with the server's parallel index build, then waits for the workers still building; an error naming
/// every index that could not be built or came out different.
fn build_indexes(
    shared: &Shared,
    slot: usize,
    id: &str,
    settings: indexes::Settings,
) -> Result<(), JobError> {
    let job = &shared.jobs[slot];
    let helpers = job.parallel_requested.load(Ordering::Relaxed).saturating_sub(1);
    let mut announced = false;
    let stop = || job.should_stop();
    let wait = indexes::LockWait { stop: &stop, limit_ms: None, busy_skips: false };
    let mut problems = indexes::build_all(id, settings, helpers, &wait, || {
        if !announced {
            job.set_phase(Phase::Indexes);
            progress::publish_if_due(job, true);
            announced = true;
        }
    });
    job::wait_for_workers(shared, slot);
    stop_point(job)?;
    problems.extend(indexes::left(id));
    if problems.is_empty() { Ok(()) } else { Err(JobError::plain(indexes::problems_note(id, &problems))) }
}

/// How long the clean-up of a failed or cancelled apply waits for a table's lock to restore its indexes.
const RESTORE_LOCK_WAIT_MS: u64 = 30_000;

/// After a failure or cancel: builds the indexes the apply deferred, so that the schema is as it was
/// (not when the server is shutting down: then `resume_apply` builds them). What it could not build.
fn restore_indexes(job: &JobSlot) -> Option<String> {
    let id = job.id.get();
    // The cancel that ended the job must not end its clean-up too.
    pg::take_cancel_request();
    let settings = xact::try_catch(|| BackgroundWorker::transaction(|| index_settings(&id)));
    let Ok(settings) = settings else {
        xact::abort_after_error();
        return Some(format!(
            "its deferred indexes could not be read: steep_repl.resume_apply('{id}') builds them"
        ));
    };
    let helpers = job.parallel_requested.load(Ordering::Relaxed).saturating_sub(1);
    let mut attempts = 0;
    // The job has stopped: only a session holding a table's lock for long ends the wait, after a while
    // (the index stays recorded for resume_apply).
    let never = || false;
    let wait = indexes::LockWait { stop: &never, limit_ms: Some(RESTORE_LOCK_WAIT_MS), busy_skips: false };
    let mut problems = indexes::build_all(&id, settings, helpers, &wait, || {
        if attempts == 0 {
            job.set_phase(Phase::Indexes);
            let _ = xact::try_catch(|| progress::publish_if_due(job, true))
                .map_err(|_| xact::abort_after_error());
        }
        attempts += 1;
    });
    problems.extend(indexes::left(&id));
    // build_all's last attempt finds nothing to build. When that was all, and the job failed building
    // the indexes, its error already names those left.
    let failed_building = job.error_message().is_some_and(|e| e.contains(indexes::PROBLEMS_PREFIX));
    if attempts <= 1 && failed_building {
        return None;
    }
    (!problems.is_empty()).then(|| indexes::problems_note(&id, &problems))
}

/// Between two steps of the leader: a cancel or terminate that arrived during the last one ends the job
/// here, before the next step changes anything.
fn stop_point(job: &JobSlot) -> Result<(), JobError> {
    pgrx::check_for_interrupts!();
    if job.should_stop() {
        return Err(job.job_error().unwrap_or_else(|| JobError::plain("stopped")));
    }
    Ok(())
}

/// How an apply ends: what it loaded stays, and can be resumed.
const ENDING: job::Ending = job::Ending {
    success: (Phase::Applied, "applied"),
    cleanup: restore_indexes,
    cancelled: |id| {
        format!("cancelled by steep_repl.cancel_snapshot(); resume with steep_repl.resume_apply('{id}')")
    },
    failed: |first, id| {
        format!("{first}; chunks loaded so far are kept: resume with steep_repl.resume_apply('{id}')")
    },
};

fn finish(shared: &'static Shared, slot: usize, outcome: Result<(), JobError>) {
    job::finish(shared, slot, outcome, &ENDING);
}

/// Entry point of a loading worker. `arg` carries the job slot, the worker slot and its generation.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_apply_worker(arg: pg_sys::Datum) {
    let Some((shared, slot, me)) = job::start_worker(arg) else { return };
    let job = &shared.jobs[slot];
    let result = xact::try_catch(|| {
        let (dir, manifest) = load_manifest(job)?;
        let mut finishing = Finishing::new(shared, slot);
        load_chunks(shared, slot, me, &dir, &manifest, Some(&mut finishing))?;
        finishing.after_loading()
    })
    .map_err(|c| JobError::caught(None, &c))
    .and_then(|r| r);
    job::end_worker(job, me, result);
}

/// The tables of `job` with a unit not committed yet.
fn tables_loading(shared: &Shared, job: &JobSlot) -> HashSet<pg_sys::Oid> {
    let base = job.chunk_base.load(Ordering::Acquire) as usize;
    let count = job.chunk_count.load(Ordering::Acquire) as usize;
    shared.chunks()[base..base + count]
        .iter()
        .filter(|u| u.state.load(Ordering::Acquire) != chunk_state::DONE)
        .map(|u| pg_sys::Oid::from(u.relid.load(Ordering::Relaxed)))
        .collect()
}

/// Tables one ANALYZE statement of a worker names at most (one transaction, a lock on each table and
/// its indexes, while other workers hold their batches' locks): also at most half of
/// `max_locks_per_transaction`.
const ANALYZE_BATCH: usize = 100;

fn analyze_batch() -> usize {
    // SAFETY: a GUC-backed global, set at server start.
    let max_locks = unsafe { pg_sys::max_locks_per_xact }.max(2) as usize;
    ANALYZE_BATCH.min(max_locks / 2)
}

/// What a worker does for the tables whose rows are all in, so that the leader's last steps are not a
/// serial build of every deferred index and a serial ANALYZE of every table:
/// - between two batches, for the tables whose last unit it has just committed, it builds their
///   deferred indexes (when the job has more than one worker: a single worker keeps loading and leaves
///   the builds to the end, where the leader builds too) and runs their ANALYZE, without ever waiting
///   for a lock: a table locked by someone else (the leader's session lock, released within a tick,
///   another builder, another session) is tried again after the next batch;
/// - once nothing is left to load, it builds what it can of the rest, waiting for tables other workers
///   still load, then analyzes every table whose rows are in and whose indexes are built.
///
/// Indexes are claimed with `FOR UPDATE SKIP LOCKED` on their records, so the leader and the workers
/// never build the same one; a table's ANALYZE is claimed on its first unit's slot
/// ([`Shared::claim_tables_to_analyze`]), once no index of it is left to build (the statistics of an
/// expression index need the index). The leader builds and analyzes whatever is left.
struct Finishing<'a> {
    shared: &'a Shared,
    slot: usize,
    id: String,
    settings: indexes::Settings,
    helpers: u32,
    /// Tables (relids) with deferred indexes when the worker started (only the leader defers, before the
    /// data phase).
    deferred: HashSet<u32>,
    /// Whether to build between batches (more than one worker).
    build_between: bool,
    analyze: bool,
    /// Indexes this worker failed to build, passed over after.
    tried: Vec<(String, String)>,
    /// Tables this worker could not lock for ANALYZE once it had loaded everything (relids): left to the
    /// leader.
    passed: HashSet<u32>,
    /// Completed tables (relids) whose indexes are to be built between batches.
    to_build: Vec<u32>,
    /// Completed tables (first units' slots) to analyze between batches.
    to_analyze: Vec<usize>,
}

impl<'a> Finishing<'a> {
    fn new(shared: &'a Shared, slot: usize) -> Finishing<'a> {
        let job = &shared.jobs[slot];
        let id = job.id.get();
        let (settings, deferred) = BackgroundWorker::transaction(|| {
            let settings = index_settings(&id);
            let deferred: HashSet<u32> = if settings.defer_bytes.is_some() {
                bookkeeping::indexes::left(&id).into_iter().map(|(d, _)| d.relid).collect()
            } else {
                HashSet::new()
            };
            (settings, deferred)
        });
        let parallel = job.parallel_requested.load(Ordering::Relaxed);
        Finishing {
            shared,
            slot,
            id,
            settings,
            helpers: parallel.saturating_sub(1),
            deferred,
            build_between: parallel > 1,
            analyze: has(job, flags::ANALYZE),
            tried: Vec::new(),
            passed: HashSet::new(),
            to_build: Vec::new(),
            to_analyze: Vec::new(),
        }
    }

    fn job(&self) -> &'a JobSlot {
        &self.shared.jobs[self.slot]
    }

    /// Between two batches (no transaction open): `completed` holds the first units' slots of the tables
    /// whose last unit this worker has just committed.
    fn between_batches(&mut self, completed: &mut Vec<usize>) -> Result<(), JobError> {
        let chunks = self.shared.chunks();
        for first in completed.drain(..) {
            let relid = chunks[first].relid.load(Ordering::Relaxed);
            if self.build_between && self.deferred.contains(&relid) {
                self.to_build.push(relid);
            }
            if self.analyze {
                self.to_analyze.push(first);
            }
        }
        if !self.to_build.is_empty() {
            let loading: Vec<pg_sys::Oid> = tables_loading(self.shared, self.job()).into_iter().collect();
            match self.build(&loading, true)? {
                // Tried again after the next batch.
                indexes::Built::Busy => {}
                _ => self.to_build.clear(),
            }
        }
        if !self.to_analyze.is_empty() {
            let candidates = std::mem::take(&mut self.to_analyze);
            self.to_analyze = self.analyze_tables(candidates, false)?;
        }
        Ok(())
    }

    /// Builds deferred indexes of tables not in `loading` until none is left to claim (or, with
    /// `busy_skips`, until one's table is locked by someone else).
    fn build(&mut self, loading: &[pg_sys::Oid], busy_skips: bool) -> Result<indexes::Built, JobError> {
        if self.deferred.is_empty() {
            return Ok(indexes::Built::Nothing);
        }
        let job = self.job();
        let stop = || job.should_stop();
        let wait = indexes::LockWait { stop: &stop, limit_ms: None, busy_skips };
        loop {
            if job.should_stop() || pg::dying() {
                return Ok(indexes::Built::Nothing);
            }
            let failed_before = self.tried.len();
            match indexes::build_next(&self.id, self.settings, self.helpers, loading, &wait, &mut self.tried)
            {
                indexes::Built::One(None) => continue,
                // Claiming failed (no index passed over): the leader builds what is left; trying again
                // here would spin.
                indexes::Built::Failed(m) if self.tried.len() == failed_before => {
                    return Ok(indexes::Built::Failed(m));
                }
                indexes::Built::Failed(_) => continue,
                // Never expected: the job fails saying what differs.
                indexes::Built::One(Some(differs)) => return Err(JobError::plain(differs)),
                other => return Ok(other),
            }
        }
    }

    /// Once no unit is left to claim: builds the deferred indexes of tables whose rows are all in, while
    /// other workers finish loading theirs (waiting for them while an index of theirs is left), then
    /// analyzes what it can. Returns when nothing is left it could do.
    fn after_loading(&mut self) -> Result<(), JobError> {
        let job = self.job();
        while !self.deferred.is_empty() {
            if job.should_stop() || pg::dying() {
                return Ok(());
            }
            let loading: Vec<pg_sys::Oid> = tables_loading(self.shared, job).into_iter().collect();
            if loading.is_empty() && job.phase() == Phase::Data {
                job.set_phase(Phase::Indexes);
                progress::publish_if_due(job, true);
            }
            if let indexes::Built::Failed(_) = self.build(&loading, false)? {
                break;
            }
            if loading.is_empty() {
                break;
            }
            // Indexes left of tables other workers are still loading: wait for their units. None:
            // nothing more to build for this worker.
            let left = BackgroundWorker::transaction(|| bookkeeping::indexes::left(&self.id));
            if !left.iter().any(|(d, error)| error.is_none() && loading.contains(&pg_sys::Oid::from(d.relid)))
            {
                break;
            }
            self.analyze_done_tables()?;
            job::nap(std::time::Duration::from_millis(50));
        }
        self.analyze_done_tables()
    }

    /// Analyzes every table of the job whose rows are all in that no one has analyzed.
    fn analyze_done_tables(&mut self) -> Result<(), JobError> {
        if !self.analyze {
            return Ok(());
        }
        let done: Vec<usize> =
            self.shared.apply_tables(self.slot).into_iter().filter(|t| t.2).map(|t| t.1).collect();
        self.analyze_tables(done, true).map(|_| ())
    }

    /// Runs ANALYZE on those of `candidates` (first units' slots of tables whose rows are all in) whose
    /// deferred indexes are all built and that no one claimed before, in statements of up to
    /// [`analyze_batch`] tables. A table it cannot lock at once is given back: returned (to try again),
    /// or, when `last`, left to the leader. Tables whose indexes are left to build are returned too.
    fn analyze_tables(&mut self, candidates: Vec<usize>, last: bool) -> Result<Vec<usize>, JobError> {
        if !self.analyze || candidates.is_empty() {
            return Ok(Vec::new());
        }
        let job = self.job();
        let chunks = self.shared.chunks();
        let relid_of = |k: usize| chunks[k].relid.load(Ordering::Relaxed);
        let unbuilt: HashSet<u32> = if self.deferred.is_empty() {
            HashSet::new()
        } else {
            BackgroundWorker::transaction(|| bookkeeping::indexes::left(&self.id))
                .into_iter()
                .map(|(d, _)| d.relid)
                .collect()
        };
        let mut again: Vec<usize> =
            candidates.iter().copied().filter(|&k| unbuilt.contains(&relid_of(k))).collect();
        let passed = &self.passed;
        let claimed = self.shared.claim_tables_to_analyze(candidates, |relid| {
            !unbuilt.contains(&relid) && !passed.contains(&relid)
        });
        for batch in claimed.chunks(analyze_batch()) {
            if job.should_stop() || pg::dying() {
                for &k in batch {
                    chunks[k].analyze.store(analyze_state::TODO, Ordering::Release);
                }
                continue;
            }
            let relids: Vec<pg_sys::Oid> = batch.iter().map(|&k| pg_sys::Oid::from(relid_of(k))).collect();
            let locked = BackgroundWorker::transaction(|| -> Result<Vec<bool>, String> {
                let mut names = Vec::new();
                let mut locked = Vec::new();
                for &relid in &relids {
                    let name = if pg::try_lock_relation(relid, pg_sys::ShareUpdateExclusiveLock) {
                        crate::pg::catalog::qualified_name(relid)
                            .map_err(|e| format!("looking up table {}: {e}", relid.to_u32()))?
                    } else {
                        None
                    };
                    locked.push(name.is_some());
                    names.extend(name);
                }
                if !names.is_empty() {
                    let started = pg::now_ms();
                    Spi::run(&format!("ANALYZE {}", names.join(", ")))
                        .map_err(|e| format!("ANALYZE: {e}"))?;
                    debug1!(
                        "steep_repl: {} analyzed {} table(s) in {} ms (pid {})",
                        self.id,
                        names.len(),
                        pg::now_ms().saturating_sub(started),
                        pg::my_pid()
                    );
                }
                Ok(locked)
            })?;
            for (&k, analyzed) in batch.iter().zip(locked) {
                if analyzed {
                    chunks[k].analyze.store(analyze_state::DONE, Ordering::Release);
                    continue;
                }
                chunks[k].analyze.store(analyze_state::TODO, Ordering::Release);
                if last {
                    self.passed.insert(relid_of(k));
                } else {
                    again.push(k);
                }
            }
        }
        Ok(again)
    }
}

/// Pins the settings the snapshot was written with, so type input parses what type output printed.
fn pin_settings(job: &JobSlot, manifest: &Manifest) {
    BackgroundWorker::transaction(|| {
        let tz = manifest.settings.get("TimeZone").cloned().unwrap_or_default();
        session::pin_output_settings(&tz);
        if has(job, flags::REPLICA) {
            session::set("session_replication_role", "replica");
        }
        // A chunk and its apply_chunks record commit together: a commit lost in a crash loses both, and
        // resume_apply loads that chunk again. So the commit need not wait for the WAL flush.
        session::set("synchronous_commit", "off");
    });
}

/// Feeds one chunk to COPY FROM, folding progress into the shared counters and relaying stop requests.
struct ChunkSource<'a> {
    reader: RowRange<ChunkReader>,
    file: &'a str,
    job: &'a JobSlot,
    me: &'a WorkerSlot,
    unreported: u64,
    /// Raw bytes handed to COPY so far.
    fed: u64,
    wal: WalWriterNudge,
}

impl ChunkSource<'_> {
    fn report(&mut self) {
        let n = std::mem::take(&mut self.unreported);
        self.me.raw_bytes.fetch_add(n, Ordering::Relaxed);
        self.job.raw_bytes.fetch_add(n, Ordering::Relaxed);
        self.job.work_done.fetch_add(n, Ordering::Relaxed);
    }
}

impl CopySource for ChunkSource<'_> {
    fn read_into(&mut self, buf: &mut [u8]) -> usize {
        let n = self.reader.read(buf).unwrap_or_else(|e| {
            crate::api::user_error(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("chunk {}: {e}", self.file),
                None,
            )
        });
        self.wal.tick();
        self.unreported += n as u64;
        self.fed += n as u64;
        if self.unreported >= PROGRESS_STEP || n == 0 {
            self.report();
            // A data worker dies here on SIGTERM (its exit callback fails the job).
            pgrx::check_for_interrupts!();
            if pg::dying() {
                let msg = format!(
                    "pid {} was terminated (SIGTERM: server shutdown or pg_terminate_backend)",
                    pg::my_pid()
                );
                self.job.fail(&msg);
                crate::api::user_error(PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN, msg, None);
            }
            if self.job.should_stop() {
                crate::api::user_error(
                    PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                    format!("stopping: {}", self.job.error_message().unwrap_or_else(|| "cancelled".into())),
                    None,
                );
            }
        }
        n
    }
}

/// A batch of loads ends after this long, so that progress is committed and published about as often
/// as `steep_repl.progress_interval` asks, whatever the chunks' sizes...
const BATCH_MS: u64 = 200;
/// ... or after this much COPY text ...
const BATCH_BYTES: u64 = 64 << 20;
// ... or once it has written to `max_locks_per_transaction` tables (each keeps its lock to the commit).

/// A unit loaded in the open batch, to record and count once the batch commits.
struct Done {
    unit: usize,
    table: usize,
    chunk: usize,
    row_start: u64,
    rows: u64,
    fed: u64,
}

/// Claims and loads chunks until none is left or the job stops, in batches of one transaction each.
fn load_chunks(
    shared: &Shared,
    slot: usize,
    me: &WorkerSlot,
    dir: &std::path::Path,
    manifest: &Manifest,
    mut finishing: Option<&mut Finishing<'_>>,
) -> Result<(), JobError> {
    let job = &shared.jobs[slot];
    let me_index =
        shared.workers.iter().position(|w| std::ptr::eq(w, me)).expect("a worker slot of this block");
    pin_settings(job, manifest);
    let id = job.id.get();
    let base = job.chunk_base.load(Ordering::Acquire) as usize;
    let chunks = shared.chunks();
    // SAFETY: a GUC-backed global, set at server start.
    let max_tables = unsafe { pg_sys::max_locks_per_xact }.max(1) as usize;
    // Text from a database of another encoding is converted (and verified) by COPY, as pg_restore's
    // client_encoding would have it; text of the same encoding came out of PostgreSQL in it and is
    // covered by the chunk CRCs, so it loads as it is.
    // A SQL_ASCII source says nothing about its bytes: they load unconverted and are verified against
    // the database encoding, as if no ENCODING were given (COPY would take SQL_ASCII as "anything goes").
    let encoding = manifest
        .settings
        .get("server_encoding")
        .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case(&pg::database_encoding()))
        .filter(|e| !e.eq_ignore_ascii_case("SQL_ASCII"))
        .cloned();
    let mut batch: Vec<Done> = Vec::new();
    let mut batch_tables: HashSet<usize> = HashSet::new();
    // Tables whose last unit this worker committed (their first units' slots).
    let mut completed: Vec<usize> = Vec::new();
    let (mut batch_started, mut batch_bytes) = (0u64, 0u64);
    let pausing = job.chunk_pause_ms.load(Ordering::Relaxed) > 0;
    loop {
        if pausing {
            // A throttled job holds no transaction (nor the table locks of one) while it pauses.
            commit_batch(shared, slot, me, &id, manifest, &mut batch, &mut completed);
            batch_tables.clear();
            if let Some(f) = finishing.as_deref_mut() {
                f.between_batches(&mut completed)?;
            }
        }
        job::pause_before_chunk(job);
        if job.should_stop() {
            break;
        }
        let Some(k) = shared.claim_chunk_preferring_idle_tables(slot, me_index) else { break };
        let s = &chunks[base + k as usize];
        let t = s.table.load(Ordering::Relaxed) as usize;
        let table = &manifest.tables[t];
        let c = s.index.load(Ordering::Relaxed) as usize;
        let entry = &table.chunks[c];
        let relid = pg_sys::Oid::from(s.relid.load(Ordering::Relaxed));
        let columns: Vec<String> = table.columns.iter().map(|c| c.name.clone()).collect();
        let (row_start, row_end) = (s.row_start.load(Ordering::Relaxed), s.row_end.load(Ordering::Relaxed));
        let whole = row_start == 0 && row_end == entry.rows;
        let part = if whole { String::new() } else { format!(" (rows {row_start} to {row_end})") };

        if batch.is_empty() {
            xact::begin_read_committed();
            xact::push_transaction_snapshot();
            (batch_started, batch_bytes) = (pg::now_ms(), 0);
        }
        // The leader may hold a lock on the table; a conflicting request queued since would make a
        // blocking lock here wait for ever (it waits for the leader, which waits for us).
        if !pg::try_lock_relation(relid, pg_sys::RowExclusiveLock) {
            error!(
                "cannot load into {}: a conflicting lock is held or queued on it by {} (DDL such as ALTER TABLE waits for this apply's lock); the apply stops so that it can proceed, and can be resumed",
                table.label(),
                pg::lockers_of(relid)
            );
        }
        let reader = ChunkReader::open_in(dir, entry)
            .unwrap_or_else(|e| error!("chunk {} of {}: {e}", entry.file, table.label()));
        // A unit that runs to the chunk's end reads it to the end, where the reader checks the file's
        // CRC and the raw CRC, size and row count; one that stops earlier checks the rest of the file's
        // bytes through the file CRC before it is kept.
        let count = (row_end != entry.rows).then_some(row_end - row_start);
        let reader = RowRange::new(reader, row_start, count);
        let mut source = ChunkSource {
            reader,
            file: &entry.file,
            job,
            me,
            unreported: 0,
            fed: 0,
            wal: WalWriterNudge::new(),
        };
        let copied = xact::try_catch(std::panic::AssertUnwindSafe(|| {
            copy_from::copy_into(relid, &columns, encoding.as_deref(), &mut source)
        }));
        let rows = match copied {
            Ok(rows) => rows,
            Err(c) => {
                return Err(JobError::caught(
                    Some(&format!("loading chunk {}{part} of {}", entry.file, table.label())),
                    &c,
                ));
            }
        };
        source.report();
        // COPY stops at a line `\.` (its end-of-data marker), which COPY TO never writes as data: a
        // chunk holding one would have the rest of the unit dropped unnoticed, and its end-of-file checks
        // never run. So the unit must be used up exactly where COPY stopped.
        let mut probe = [0u8; 1];
        match source.reader.read(&mut probe) {
            Ok(0) => {}
            Ok(_) => crate::api::user_error(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!(
                    "chunk {}{part} of {}: COPY stopped before the end of its rows (a line \\. in the chunk)",
                    entry.file,
                    table.label()
                ),
                None,
            ),
            Err(e) => crate::api::user_error(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("chunk {}{part} of {}: {e}", entry.file, table.label()),
                None,
            ),
        }
        if count.is_some() {
            source.reader.get_mut().check_file_to_end().unwrap_or_else(|e| {
                crate::api::user_error(
                    PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                    format!("chunk {}{part} of {}: {e}", entry.file, table.label()),
                    None,
                )
            });
        }
        if rows != row_end - row_start {
            error!(
                "chunk {}{part}: loaded {rows} rows, the manifest says {}",
                entry.file,
                row_end - row_start
            );
        }
        let fed = source.fed;
        batch.push(Done { unit: k as usize, table: t, chunk: c, row_start, rows, fed });
        batch_tables.insert(t);
        batch_bytes += fed;
        me.current_chunk.store(0, Ordering::Relaxed);
        if pg::now_ms().saturating_sub(batch_started) >= BATCH_MS
            || batch_bytes >= BATCH_BYTES
            || batch_tables.len() >= max_tables
        {
            commit_batch(shared, slot, me, &id, manifest, &mut batch, &mut completed);
            batch_tables.clear();
            if let Some(f) = finishing.as_deref_mut() {
                f.between_batches(&mut completed)?;
            }
        }
    }
    commit_batch(shared, slot, me, &id, manifest, &mut batch, &mut completed);
    Ok(())
}

/// Records the batch's ranges in `steep_repl.apply_chunks` and commits them with the rows they name,
/// then counts them done.
fn commit_batch(
    shared: &Shared,
    slot: usize,
    me: &WorkerSlot,
    id: &str,
    manifest: &Manifest,
    batch: &mut Vec<Done>,
    completed: &mut Vec<usize>,
) {
    if batch.is_empty() {
        return;
    }
    let job = &shared.jobs[slot];
    let ranges: Vec<LoadedRange> = batch
        .iter()
        .map(|d| {
            let table = &manifest.tables[d.table];
            LoadedRange {
                schema: &table.schema,
                table: &table.name,
                chunk_index: table.chunks[d.chunk].index as i32,
                row_start: d.row_start as i64,
                rows: d.rows as i64,
                raw_bytes: d.fed as i64,
            }
        })
        .collect();
    bookkeeping::record_loaded(id, &ranges);
    xact::pop_snapshot();
    xact::commit();

    let base = job.chunk_base.load(Ordering::Acquire) as usize;
    let chunks = shared.chunks();
    for d in batch.drain(..) {
        let s = &chunks[base + d.unit];
        let head = &chunks[base + s.head.load(Ordering::Relaxed) as usize];
        let chunk_complete = head.parts_left.fetch_sub(1, Ordering::AcqRel) == 1;
        s.rows.store(d.rows, Ordering::Relaxed);
        s.raw_bytes.store(d.fed, Ordering::Relaxed);
        s.state.store(chunk_state::DONE, Ordering::Release);
        let table_head = base + s.table_head.load(Ordering::Relaxed) as usize;
        if chunks[table_head].table_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            completed.push(table_head);
        }
        me.rows.fetch_add(d.rows, Ordering::Relaxed);
        job.rows.fetch_add(d.rows, Ordering::Relaxed);
        if chunk_complete {
            let file_bytes = manifest.tables[d.table].chunks[d.chunk].file_bytes;
            s.file_bytes.store(file_bytes, Ordering::Relaxed);
            job.file_bytes.fetch_add(file_bytes, Ordering::Relaxed);
            job.chunks_done.fetch_add(1, Ordering::AcqRel);
        }
        job.units_done.fetch_add(1, Ordering::AcqRel);
    }
    job::wake_leader(job);
    progress::publish_if_due(job, false);
}

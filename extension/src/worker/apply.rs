//! Apply: one leader and `parallel` loading workers per job.
//!
//! The leader (connected as the caller) verifies the snapshot (quick check of every chunk file) unless
//! told not to, truncates the targets when asked, and publishes the chunks not yet loaded — largest
//! tables first — as shared-memory chunk slots. Each worker claims chunks through the atomic cursor and,
//! per chunk, in one transaction: maps the file, checks its CRC, streams the decompressed COPY text into
//! PostgreSQL's COPY FROM (parser, type input, constraints, indexes), checks the raw CRC, size and row
//! count at the end, and records the chunk in `steep_repl.apply_chunks`. A chunk is therefore loaded
//! and recorded, or neither: `resume_apply` after any failure loads exactly the chunks not recorded.
//!
//! When the caller is a superuser, workers run with `session_replication_role = replica`, as logical
//! replication's apply workers do: foreign-key and user triggers do not fire, so chunks of parent and
//! child tables load in any order. The result is still consistent because the snapshot is: every row of
//! every table comes from one snapshot of the source, where the constraints held.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use steep_repl_engine::chunk::ChunkReader;
use steep_repl_engine::ident::QualifiedName;
use steep_repl_engine::manifest::Manifest;
use steep_repl_engine::verify::{VerifyMode, VerifyOptions, verify_snapshot_with};

use crate::job::{self, Entry};
use crate::pg::copy_from::{self, CopySource};
use crate::pg::{self, session, xact};
use crate::progress;
use crate::shmem::{JobSlot, Phase, Shared, WorkerSlot, chunk_state, worker_state};

/// Job flags of an apply.
pub mod flags {
    pub const VERIFY: u32 = 1;
    pub const TRUNCATE: u32 = 1 << 1;
    pub const ANALYZE: u32 = 1 << 2;
    /// Workers set session_replication_role = replica (the caller is a superuser).
    pub const REPLICA: u32 = 1 << 3;
    /// A resume_apply: chunks already recorded are skipped, nothing is truncated.
    pub const RESUME: u32 = 1 << 4;
}

/// How many problems a "verification failed" error lists before "and N more".
const MAX_LISTED_PROBLEMS: usize = 20;
/// Live progress is folded into the shared counters about this often (bytes).
const PROGRESS_STEP: u64 = 1 << 20;

fn has(job: &JobSlot, flag: u32) -> bool {
    job.flags.load(Ordering::Relaxed) & flag != 0
}

/// Entry point of an apply job's leader. `arg` carries the job slot.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_apply_leader(arg: pg_sys::Datum) {
    job::lead(arg, |_| {}, run_leader, finish);
}

fn load_manifest(job: &JobSlot) -> Result<(PathBuf, Manifest), String> {
    let dir = PathBuf::from(job.path.get());
    let m = Manifest::load(&dir).map_err(|e| e.to_string())?;
    Ok((dir, m))
}

fn run_leader(shared: &'static Shared, slot: usize) -> Result<(), String> {
    let job = &shared.jobs[slot];
    let id = job.id.get();
    let (dir, manifest) = load_manifest(job)?;

    if has(job, flags::VERIFY) {
        job.set_phase(Phase::Verify);
        progress::publish_if_due(job, true);
        let options = VerifyOptions {
            mode: VerifyMode::Quick,
            threads: Some(job.parallel_requested.load(Ordering::Relaxed).max(1) as usize),
        };
        let report = verify_snapshot_with(&dir, &options).map_err(|e| format!("verification failed: {e}"))?;
        if !report.is_ok() {
            let mut listed: Vec<String> =
                report.problems.iter().take(MAX_LISTED_PROBLEMS).map(|p| p.to_string()).collect();
            if report.problems.len() > MAX_LISTED_PROBLEMS {
                listed.push(format!("and {} more", report.problems.len() - MAX_LISTED_PROBLEMS));
            }
            return Err(format!("verification failed: {}", listed.join("; ")));
        }
    }

    let (done, relids) = BackgroundWorker::transaction(|| -> Result<_, String> {
        let done = Spi::connect(|client| -> Result<Vec<(String, String, i32)>, pgrx::spi::Error> {
            let mut v = Vec::new();
            for r in client.select(
                "SELECT schema_name, table_name, chunk_index FROM steep_repl.apply_chunks WHERE apply_id = $1",
                None,
                &[id.as_str().into()],
            )? {
                v.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<i32>(3)?.unwrap_or(-1),
                ));
            }
            Ok(v)
        })
        .map_err(|e| format!("reading the chunks already loaded: {e}"))?;
        let mut relids = Vec::with_capacity(manifest.tables.len());
        for t in &manifest.tables {
            let qn = QualifiedName::new(t.schema.clone(), t.name.clone()).to_string();
            let oid =
                Spi::get_one_with_args::<pg_sys::Oid>("SELECT to_regclass($1)::oid", &[qn.as_str().into()])
                    .map_err(|e| format!("looking up {qn}: {e}"))?
                    .ok_or_else(|| format!("table {qn} does not exist any more"))?;
            relids.push(oid);
        }
        Ok((done, relids))
    })?;

    if has(job, flags::TRUNCATE) && !has(job, flags::RESUME) && !manifest.tables.is_empty() {
        job.set_phase(Phase::Truncate);
        progress::publish_if_due(job, true);
        let list: Vec<String> = manifest
            .tables
            .iter()
            .map(|t| QualifiedName::new(t.schema.clone(), t.name.clone()).to_string())
            .collect();
        BackgroundWorker::transaction(|| {
            Spi::run(&format!("TRUNCATE ONLY {}", list.join(", ")))
                .map_err(|e| format!("truncating the target tables: {e}"))
        })?;
    }

    // The chunks still to load: largest tables first, and round-robin across tables, so that workers
    // running at the same moment load different tables. Two COPYs into one table contend for its
    // extension lock and the right-most pages of its indexes; into two tables they do not.
    let mut order: Vec<usize> = (0..manifest.tables.len()).collect();
    order.sort_by(|&a, &b| manifest.tables[b].raw_bytes.cmp(&manifest.tables[a].raw_bytes).then(a.cmp(&b)));
    let done: std::collections::HashSet<(String, String, i32)> = done.into_iter().collect();
    let is_done = |t: usize, c: u32| {
        let tt = &manifest.tables[t];
        done.contains(&(tt.schema.clone(), tt.name.clone(), c as i32))
    };
    let mut queues: Vec<std::collections::VecDeque<(usize, u32)>> = Vec::new();
    let mut tables_complete = 0u32;
    for &t in &order {
        let pending: std::collections::VecDeque<(usize, u32)> = manifest.tables[t]
            .chunks
            .iter()
            .map(|c| c.index)
            .filter(|&c| !is_done(t, c))
            .map(|c| (t, c))
            .collect();
        if pending.is_empty() {
            tables_complete += 1;
        } else {
            queues.push(pending);
        }
    }
    let mut todo: Vec<(usize, u32)> = Vec::new();
    while queues.iter().any(|q| !q.is_empty()) {
        for q in queues.iter_mut() {
            todo.extend(q.pop_front());
        }
    }
    let base = shared.alloc_chunks(slot, todo.len()).ok_or_else(|| {
        format!(
            "the snapshot has {} chunks to load, more than the free chunk slots of this server",
            todo.len()
        )
    })?;
    let mut work_total = 0u64;
    for (k, &(t, c)) in todo.iter().enumerate() {
        let s = &shared.chunks[base + k];
        s.relid.store(relids[t].to_u32(), Ordering::Relaxed);
        s.table.store(t as u32, Ordering::Relaxed);
        s.index.store(c, Ordering::Relaxed);
        for a in [&s.rows, &s.raw_bytes, &s.file_bytes] {
            a.store(0, Ordering::Relaxed);
        }
        s.state.store(chunk_state::PENDING, Ordering::Release);
        work_total += manifest.tables[t].chunks[c as usize].raw_bytes;
    }
    job.tables_total.store(manifest.tables.len() as u32, Ordering::Relaxed);
    job.tables_done.store(tables_complete, Ordering::Relaxed);
    job.work_total.store(work_total, Ordering::Relaxed);
    job.chunk_cursor.store(0, Ordering::Relaxed);
    job.chunks_ready.store(1, Ordering::Release);
    job.set_phase(Phase::Data);
    progress::publish_if_due(job, true);

    let launched = job::launch_workers(shared, slot, Entry::ApplyWorker, todo.len());
    let launch_ms = pg::now_ms();
    if launched == 0 && !todo.is_empty() {
        // No worker slot free anywhere: the leader loads alone.
        let ws = shared.claim_worker_slot(slot).ok_or("no steep_repl worker slot is free")?;
        let me = &shared.workers[ws];
        me.pid.store(pg::my_pid(), Ordering::Release);
        me.state.store(worker_state::RUNNING, Ordering::Release);
        load_chunks(shared, slot, me, &dir, &manifest);
        me.state.store(worker_state::DONE, Ordering::Release);
        job.workers_launched.store(1, Ordering::Relaxed);
    }
    let base_tables = tables_complete;
    job::watch_workers(shared, slot, launch_ms, |job| {
        job.tables_done.fetch_add(base_tables, Ordering::Relaxed);
        progress::publish_if_due(job, false);
    });
    if job.should_stop() {
        return Err(job.error_message().unwrap_or_else(|| "stopped".into()));
    }
    job.tables_done.store(manifest.tables.len() as u32, Ordering::Relaxed);

    if !manifest.sequences.is_empty() {
        job.set_phase(Phase::Sequences);
        progress::publish_if_due(job, true);
        BackgroundWorker::transaction(|| -> Result<(), String> {
            for s in &manifest.sequences {
                let qn = QualifiedName::new(s.schema.clone(), s.name.clone()).to_string();
                Spi::run_with_args(
                    "SELECT pg_catalog.setval($1::regclass, $2, $3)",
                    &[qn.as_str().into(), s.last_value.into(), s.is_called.into()],
                )
                .map_err(|e| format!("setting sequence {qn}: {e}"))?;
            }
            Ok(())
        })?;
    }
    if has(job, flags::ANALYZE) && !manifest.tables.is_empty() {
        job.set_phase(Phase::Analyze);
        progress::publish_if_due(job, true);
        for batch in manifest.tables.chunks(100) {
            let list: Vec<String> = batch
                .iter()
                .map(|t| QualifiedName::new(t.schema.clone(), t.name.clone()).to_string())
                .collect();
            BackgroundWorker::transaction(|| {
                Spi::run(&format!("ANALYZE {}", list.join(", "))).map_err(|e| format!("ANALYZE: {e}"))
            })?;
            if job.should_stop() {
                return Err(job.error_message().unwrap_or_else(|| "stopped".into()));
            }
        }
    }
    Ok(())
}

/// How an apply ends: what it loaded stays, and can be resumed.
const ENDING: job::Ending = job::Ending {
    success: (Phase::Applied, "applied"),
    cleanup: |_| {},
    cancelled: |id| {
        format!("cancelled by steep_repl.cancel_snapshot(); resume with steep_repl.resume_apply('{id}')")
    },
    failed: |first, id| {
        format!("{first}; chunks loaded so far are kept: resume with steep_repl.resume_apply('{id}')")
    },
};

fn finish(shared: &'static Shared, slot: usize, outcome: Result<(), String>) {
    job::finish(shared, slot, outcome, &ENDING);
}

/// Entry point of a loading worker. `arg` carries the job slot and the worker slot.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_apply_worker(arg: pg_sys::Datum) {
    let Some((shared, slot, me)) = job::start_worker(arg) else { return };
    let job = &shared.jobs[slot];
    let result = xact::try_catch(|| {
        let (dir, manifest) = load_manifest(job).unwrap_or_else(|e| error!("{e}"));
        load_chunks(shared, slot, me, &dir, &manifest);
    });
    job::end_worker(job, me, result);
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
    reader: ChunkReader,
    file: &'a str,
    job: &'a JobSlot,
    me: &'a WorkerSlot,
    unreported: u64,
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
        let n = self.reader.read(buf).unwrap_or_else(|e| error!("chunk {}: {e}", self.file));
        self.unreported += n as u64;
        if self.unreported >= PROGRESS_STEP || n == 0 {
            self.report();
            if BackgroundWorker::sigterm_received() {
                let msg = format!(
                    "worker pid {} was terminated (SIGTERM: server shutdown or pg_terminate_backend)",
                    pg::my_pid()
                );
                self.job.fail(&msg);
                error!("{msg}");
            }
            if self.job.should_stop() {
                error!("stopping: {}", self.job.error_message().unwrap_or_else(|| "cancelled".into()));
            }
        }
        n
    }
}

/// Claims and loads chunks until none is left or the job stops; one transaction per chunk.
fn load_chunks(shared: &Shared, slot: usize, me: &WorkerSlot, dir: &std::path::Path, manifest: &Manifest) {
    let job = &shared.jobs[slot];
    let me_index =
        shared.workers.iter().position(|w| std::ptr::eq(w, me)).expect("a worker slot of this block");
    pin_settings(job, manifest);
    let id = job.id.get();
    let base = job.chunk_base.load(Ordering::Acquire) as usize;
    loop {
        job::pause_before_chunk(job);
        if job.should_stop() {
            return;
        }
        let Some(k) = shared.claim_chunk_preferring_idle_tables(slot, me_index) else { return };
        let s = &shared.chunks[base + k as usize];
        let table = &manifest.tables[s.table.load(Ordering::Relaxed) as usize];
        let entry = &table.chunks[s.index.load(Ordering::Relaxed) as usize];
        let relid = pg_sys::Oid::from(s.relid.load(Ordering::Relaxed));
        let columns: Vec<String> = table.columns.iter().map(|c| c.name.clone()).collect();

        xact::begin_read_committed();
        xact::push_transaction_snapshot();
        let reader = ChunkReader::open_in(dir, entry)
            .unwrap_or_else(|e| error!("chunk {} of {}: {e}", entry.file, table.label()));
        let mut source = ChunkSource { reader, file: &entry.file, job, me, unreported: 0 };
        let rows = copy_from::copy_into(relid, &columns, &mut source);
        source.report();
        if rows != entry.rows {
            error!("chunk {}: loaded {rows} rows, the manifest says {}", entry.file, entry.rows);
        }
        job::as_owner(|| {
            Spi::run_with_args(
                "INSERT INTO steep_repl.apply_chunks (apply_id, schema_name, table_name, chunk_index, rows_loaded, raw_bytes) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    id.as_str().into(),
                    table.schema.as_str().into(),
                    table.name.as_str().into(),
                    (entry.index as i32).into(),
                    (rows as i64).into(),
                    (entry.raw_bytes as i64).into(),
                ],
            )
        })
        .unwrap_or_else(|e| error!("recording chunk {} as loaded: {e}", entry.file));
        xact::pop_snapshot();
        xact::commit();

        s.rows.store(rows, Ordering::Relaxed);
        s.raw_bytes.store(entry.raw_bytes, Ordering::Relaxed);
        s.file_bytes.store(entry.file_bytes, Ordering::Relaxed);
        s.state.store(chunk_state::DONE, Ordering::Release);
        me.rows.fetch_add(rows, Ordering::Relaxed);
        job.rows.fetch_add(rows, Ordering::Relaxed);
        job.file_bytes.fetch_add(entry.file_bytes, Ordering::Relaxed);
        job.chunks_done.fetch_add(1, Ordering::AcqRel);
        me.current_chunk.store(0, Ordering::Relaxed);
        progress::publish_if_due(job, false);
    }
}

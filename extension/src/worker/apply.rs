//! Apply: one leader and `parallel` loading workers per job.
//!
//! The leader (connected as the caller) verifies the snapshot (quick check of every chunk file) unless
//! told not to, truncates the targets when asked, and publishes the chunks not yet loaded — largest
//! tables first — as shared-memory chunk slots. Each worker claims chunks through the atomic cursor and,
//! per chunk, in one transaction: maps the file, checks its CRC, streams the decompressed COPY text into
//! PostgreSQL's COPY FROM (parser, type input, constraints, indexes), checks the raw CRC, size and row
//! count at the end, and records the chunk in `steep_repl.apply_chunks`. A chunk is therefore loaded
//! and recorded, or neither: `resume_apply` after any failure loads exactly the chunks not recorded.
//! While it feeds COPY, a worker keeps the WAL writer writing its WAL out (`pg::wal`), so that it does
//! not end up writing WAL pages one at a time itself, waiting on `WALWriteLock`.
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
use steep_repl_engine::copy_text::RowRange;
use steep_repl_engine::ident::QualifiedName;
use steep_repl_engine::manifest::Manifest;
use steep_repl_engine::schedule::{self, ChunkWork};
use steep_repl_engine::verify::{VerifyMode, VerifyOptions, verify_snapshot_with};

use crate::job::{self, Entry};
use crate::pg::copy_from::{self, CopySource};
use crate::pg::wal::WalWriterNudge;
use crate::pg::{self, session, xact};
use crate::progress;
use crate::shmem::{JobSlot, Phase, Shared, WorkerSlot, chunk_state, worker_state};

/// A range of rows an earlier run recorded: (schema, table, chunk index) and rows `[start, end)`.
type Loaded = ((String, String, i32), (u64, u64));

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
        let done = Spi::connect(|client| -> Result<Vec<Loaded>, pgrx::spi::Error> {
            let mut v = Vec::new();
            for r in client.select(
                "SELECT schema_name, table_name, chunk_index, row_start, rows_loaded \
                 FROM steep_repl.apply_chunks WHERE apply_id = $1",
                None,
                &[id.as_str().into()],
            )? {
                let start = r.get::<i64>(4)?.unwrap_or(0).max(0) as u64;
                v.push((
                    (
                        r.get::<String>(1)?.unwrap_or_default(),
                        r.get::<String>(2)?.unwrap_or_default(),
                        r.get::<i32>(3)?.unwrap_or(-1),
                    ),
                    (start, start + r.get::<i64>(5)?.unwrap_or(0).max(0) as u64),
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

    // While the data loads, the leader holds SHARE UPDATE EXCLUSIVE on every target table, for the
    // session: it does not conflict with the workers' inserts (ROW EXCLUSIVE), but autovacuum skips a
    // table it cannot lock, so it neither vacuums nor analyzes half-loaded tables while competing with
    // the load for CPU and I/O (pg_restore gets the same by loading a table in one transaction, whose
    // rows autovacuum only sees at its commit). Other sessions' VACUUM, ANALYZE and DDL on these tables
    // wait until the data is in. Released after the data phase, or when the leader exits.
    BackgroundWorker::transaction(|| {
        for &relid in &relids {
            pg::lock_relation_for_session(relid, pg_sys::ShareUpdateExclusiveLock);
        }
    });

    // The units still to load, in claiming order: largest tables first, round-robin across tables,
    // small units last and a tail cut finer towards the end (steep_repl_engine::schedule).
    let mut loaded: std::collections::HashMap<(String, String, i32), Vec<(u64, u64)>> =
        std::collections::HashMap::new();
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
    let todo = schedule::schedule(&work, workers, part_bytes);
    let pending_tables: std::collections::HashSet<usize> = todo.iter().map(|u| u.table).collect();
    let tables_complete = (manifest.tables.len() - pending_tables.len()) as u32;
    let base = shared.alloc_chunks(slot, todo.len()).ok_or_else(|| {
        format!(
            "the snapshot has {} chunks to load, more than the free chunk slots of this server",
            todo.len()
        )
    })?;
    let mut work_total = 0u64;
    let mut heads: std::collections::HashMap<(usize, u32), usize> = std::collections::HashMap::new();
    for (k, u) in todo.iter().enumerate() {
        let head = *heads.entry((u.table, u.chunk)).or_insert(k);
        let s = &shared.chunks[base + k];
        s.relid.store(relids[u.table].to_u32(), Ordering::Relaxed);
        s.table.store(u.table as u32, Ordering::Relaxed);
        s.index.store(u.chunk, Ordering::Relaxed);
        s.row_start.store(u.row_start, Ordering::Relaxed);
        s.row_end.store(u.row_end, Ordering::Relaxed);
        s.head.store(head as u32, Ordering::Relaxed);
        s.parts_left.store(0, Ordering::Relaxed);
        // Until the unit is done, raw_bytes holds its estimate (claims compare sizes with it).
        s.raw_bytes.store(u.est_bytes, Ordering::Relaxed);
        for a in [&s.rows, &s.file_bytes] {
            a.store(0, Ordering::Relaxed);
        }
        work_total += u.est_bytes;
    }
    for (k, u) in todo.iter().enumerate() {
        let head = heads[&(u.table, u.chunk)];
        shared.chunks[base + head].parts_left.fetch_add(1, Ordering::Relaxed);
        shared.chunks[base + k].state.store(chunk_state::PENDING, Ordering::Release);
    }
    job.chunks_total.store(heads.len() as u32, Ordering::Relaxed);
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
    BackgroundWorker::transaction(|| {
        for &relid in &relids {
            pg::unlock_relation_for_session(relid, pg_sys::ShareUpdateExclusiveLock);
        }
    });

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
        let n = self.reader.read(buf).unwrap_or_else(|e| error!("chunk {}: {e}", self.file));
        self.wal.tick();
        self.unreported += n as u64;
        self.fed += n as u64;
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
    // Text from a database of another encoding is converted (and verified) by COPY, as pg_restore's
    // client_encoding would have it; text of the same encoding came out of PostgreSQL in it and is
    // covered by the chunk CRCs, so it loads as it is.
    let encoding = manifest
        .settings
        .get("server_encoding")
        .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case(&pg::database_encoding()))
        .cloned();
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
        let (row_start, row_end) = (s.row_start.load(Ordering::Relaxed), s.row_end.load(Ordering::Relaxed));
        let whole = row_start == 0 && row_end == entry.rows;
        let part = if whole { String::new() } else { format!(" (rows {row_start} to {row_end})") };

        xact::begin_read_committed();
        xact::push_transaction_snapshot();
        let reader = ChunkReader::open_in(dir, entry)
            .unwrap_or_else(|e| error!("chunk {} of {}: {e}", entry.file, table.label()));
        // A unit that runs to the chunk's end reads it to the end, where the reader checks the raw
        // CRC, size and row count; one that stops earlier is covered by the file CRC checked at open.
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
        let rows = copy_from::copy_into(relid, &columns, encoding.as_deref(), &mut source);
        source.report();
        if rows != row_end - row_start {
            error!(
                "chunk {}{part}: loaded {rows} rows, the manifest says {}",
                entry.file,
                row_end - row_start
            );
        }
        let fed = source.fed;
        job::as_owner(|| {
            Spi::run_with_args(
                "INSERT INTO steep_repl.apply_chunks \
                 (apply_id, schema_name, table_name, chunk_index, row_start, rows_loaded, raw_bytes) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    id.as_str().into(),
                    table.schema.as_str().into(),
                    table.name.as_str().into(),
                    (entry.index as i32).into(),
                    (row_start as i64).into(),
                    (rows as i64).into(),
                    (fed as i64).into(),
                ],
            )
        })
        .unwrap_or_else(|e| error!("recording chunk {}{part} as loaded: {e}", entry.file));
        xact::pop_snapshot();
        xact::commit();

        let head = &shared.chunks[base + s.head.load(Ordering::Relaxed) as usize];
        let chunk_complete = head.parts_left.fetch_sub(1, Ordering::AcqRel) == 1;
        s.rows.store(rows, Ordering::Relaxed);
        s.raw_bytes.store(fed, Ordering::Relaxed);
        s.state.store(chunk_state::DONE, Ordering::Release);
        me.rows.fetch_add(rows, Ordering::Relaxed);
        job.rows.fetch_add(rows, Ordering::Relaxed);
        if chunk_complete {
            s.file_bytes.store(entry.file_bytes, Ordering::Relaxed);
            job.file_bytes.fetch_add(entry.file_bytes, Ordering::Relaxed);
            job.chunks_done.fetch_add(1, Ordering::AcqRel);
        }
        job.units_done.fetch_add(1, Ordering::AcqRel);
        job::wake_leader(job);
        me.current_chunk.store(0, Ordering::Relaxed);
        progress::publish_if_due(job, false);
    }
}

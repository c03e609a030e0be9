//! Generate: one leader and `parallel` data workers per job.
//!
//! The leader (connected as the caller) waits for the caller's transaction to commit, then opens one
//! REPEATABLE READ read-only transaction that it keeps for the whole data phase: it takes ACCESS SHARE
//! locks on every table (before its snapshot exists, so no DDL can commit between snapshot and lock),
//! lists the tables under the snapshot, exports the snapshot, plans chunks with the engine, publishes
//! them as shared-memory chunk slots, and launches the data workers. Each data worker claims chunks with
//! an atomic cursor (fast workers take more) and reads them in batches: one transaction that imports the
//! exported snapshot serves chunks for up to `BATCH_MS` (a 20-row table costs a file, not a transaction
//! and a snapshot import). Per chunk it takes ACCESS SHARE on the table without waiting (a DDL queued
//! behind the leader's lock fails the job at once, naming the table and the session, instead of a
//! three-way wait the deadlock detector cannot see), scans the block range into a chunk file, and lets
//! go of that lock (the leader's covers the table). Small chunk files are made durable all together by
//! one `syncfs` at the end rather than by two fsyncs each. When every chunk is done, the leader reads the
//! sequences, commits, syncs, and writes the manifest last.
//!
//! Any failure (an ERROR, SIGTERM, a crashed worker) or a cancel sets the job's `stop` flag; every
//! process checks it at least once per megabyte of output. The leader then removes what the job wrote,
//! records the first error, and frees every slot.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use steep_repl_engine::chunk::{ChunkWriter, Compression, Durability, FsSync, WriterScratch};
use steep_repl_engine::filter::TablePattern;
use steep_repl_engine::ident::QualifiedName;
use steep_repl_engine::manifest::{
    ChunkEntry, FORMAT_VERSION, Manifest, Mode, Parallelism, SequenceEntry, SnapshotInfo, Source, TableEntry,
};
use steep_repl_engine::naming::{chunk_rel_path, table_dir};
use steep_repl_engine::plan;

use crate::job::{self, Entry, JobError};
use crate::pg::catalog::{self, TableMeta};
use crate::pg::scan::{self, ScanObserver};
use crate::pg::{self, session, xact};
use crate::progress;
use crate::shmem::{self, JobSlot, Phase, Shared, WorkerSlot, chunk_state, worker_state};

/// Entry point of a generate job's leader. `arg` carries the job slot.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_generate_leader(arg: pg_sys::Datum) {
    // A rolled-back start_snapshot never existed: remove the directory it created.
    job::lead(arg, |job| drop(remove_output(job)), run_leader, finish);
}

/// Entry point of a data worker. `arg` carries the job slot, the worker slot and its generation.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_generate_worker(arg: pg_sys::Datum) {
    let Some((shared, slot, me)) = job::start_worker(arg) else { return };
    let job = &shared.jobs[slot];
    let tz = job.timezone.get();
    let result = xact::try_catch(|| {
        BackgroundWorker::transaction(|| session::pin_output_settings(&tz));
        progress::publish_if_due(job, false);
        scan_chunks(shared, slot, me, true)
    })
    .map_err(|c| JobError::caught(None, &c))
    .and_then(|r| r);
    job::end_worker(job, me, result);
}

fn compression_of(job: &JobSlot) -> Compression {
    match job.zstd_level.load(Ordering::Relaxed) {
        0 => Compression::None,
        level => Compression::Zstd { level },
    }
}

/// The table patterns and options recorded by start_snapshot in the job's row.
fn job_patterns(id: &str) -> Result<Vec<TablePattern>, String> {
    let list = Spi::get_one_with_args::<Vec<String>>(
        "SELECT coalesce(array(SELECT jsonb_array_elements_text(options->'tables')), '{}') \
         FROM steep_repl.snapshots WHERE id = $1",
        &[id.into()],
    )
    .map_err(|e| format!("reading the options of {id}: {e}"))?
    .unwrap_or_default();
    list.iter().map(|p| p.parse::<TablePattern>().map_err(|e| e.to_string())).collect()
}

/// Takes ACCESS SHARE on every table of `oids` for the rest of the transaction; a full lock table
/// becomes an error naming `max_locks_per_transaction` and the value this job needs.
fn lock_tables(oids: &[u32], total: usize) -> Result<(), JobError> {
    if !crate::limits::locks_fit(total) {
        return Err(JobError::plain(crate::limits::lock_table_error(total)));
    }
    let locked = xact::try_catch(|| {
        for &oid in oids {
            pg::lock_relation(pg_sys::Oid::from(oid), pg_sys::AccessShareLock);
        }
    });
    match locked {
        Ok(()) => Ok(()),
        Err(c) if c.sqlstate == crate::limits::OUT_OF_SHARED_MEMORY => {
            Err(JobError::plain(crate::limits::lock_table_error(total)))
        }
        Err(c) => Err(JobError::caught(Some("locking the tables"), &c)),
    }
}

/// The leader's work from planning to the manifest. Runs inside try_catch.
fn run_leader(shared: &'static Shared, slot: usize) -> Result<(), JobError> {
    let job = &shared.jobs[slot];
    let id = job.id.get();
    let out_dir = PathBuf::from(job.path.get());
    let compression = compression_of(job);

    // Tables as of now, to lock before the snapshot is taken.
    let mut laps = job::Laps::new(&id);
    let (patterns, prelisted, server) = BackgroundWorker::transaction(|| -> Result<_, String> {
        let patterns = job_patterns(&id)?;
        let prelisted = catalog::list_tables(&patterns, false).map_err(|e| e.to_string())?;
        Ok((patterns, prelisted, catalog::server_info()?))
    })?;

    let slot_name = job.slot_name.get();
    if !slot_name.is_empty() {
        // Said (and committed, NOTIFY being transactional) before the wait slot creation may begin.
        job.set_phase(Phase::Slot);
        BackgroundWorker::transaction(|| progress::notify(job));
    }
    xact::begin_repeatable_read(true);
    let given = job.snapshot_name.get();
    if !given.is_empty() {
        xact::import_snapshot(&given);
    }
    let prelisted_oids: Vec<u32> = prelisted.iter().map(|t| t.oid).collect();
    laps.lap("listed the tables");
    lock_tables(&prelisted_oids, prelisted_oids.len())?;
    laps.lap("locked them");
    // With a slot, the transaction's snapshot is the slot's initial one (taken after the locks, as a
    // new one would be), and the manifest's LSN is the slot's consistent point.
    let slot_lsn = (!slot_name.is_empty()).then(|| pg::slot::create_with_snapshot(&slot_name));
    if slot_lsn.is_some() {
        laps.lap("created the replication slot");
        job.set_phase(Phase::Plan);
    }
    // Taking the transaction snapshot now, after the locks; tables created since the pre-list get
    // locked at once. SPI queries below run under this snapshot.
    xact::push_transaction_snapshot();
    let mut tables = catalog::list_tables(&patterns, true).map_err(|e| e.to_string())?;
    let prelisted_set: HashSet<u32> = prelisted_oids.iter().copied().collect();
    let new_oids: Vec<u32> = tables.iter().map(|t| t.oid).filter(|o| !prelisted_set.contains(o)).collect();
    lock_tables(&new_oids, prelisted_oids.len() + new_oids.len())?;
    let lsn = match slot_lsn {
        Some(lsn) => lsn,
        None => Spi::get_one::<String>(steep_repl_engine::catalog::LSN_SQL)
            .map_err(|e| format!("reading the WAL position: {e}"))?
            .unwrap_or_default(),
    };
    let exported = Spi::get_one::<String>("SELECT pg_catalog.pg_export_snapshot()")
        .map_err(|e| format!("exporting the snapshot: {e}"))?
        .unwrap_or_default();

    // Plan and publish.
    laps.lap("listed again under the snapshot and exported it");
    let (plan, chunk_bytes) = steep_repl_engine::catalog::plan_snapshot(
        &tables,
        job.chunk_bytes.load(Ordering::Relaxed),
        job.parallel_requested.load(Ordering::Relaxed),
    )
    .map_err(|e| e.to_string())?;
    job.chunk_bytes.store(chunk_bytes, Ordering::Relaxed);
    // Where each planned table is in `tables`.
    let by_name: HashMap<(&str, &str), usize> =
        tables.iter().enumerate().map(|(i, t)| ((t.schema.as_str(), t.name.as_str()), i)).collect();
    let order: Vec<usize> = plan
        .tables
        .iter()
        .map(|s| {
            by_name.get(&(s.schema.as_str(), s.name.as_str())).copied().ok_or("planned table is not listed")
        })
        .collect::<Result<_, _>>()?;
    drop(by_name);
    let metas: Vec<&TableMeta> = order.iter().map(|&i| &tables[i]).collect();
    let base = shared
        .alloc_chunks(slot, plan.chunks.len())
        .ok_or_else(|| crate::limits::chunk_slots_error(plan.chunks.len(), shared.free_chunk_slots()))?;
    let chunks = shared.chunks();
    for (k, c) in plan.chunks.iter().enumerate() {
        let s = &chunks[base + k];
        s.relid.store(metas[c.table].oid, Ordering::Relaxed);
        s.table.store(c.table as u32, Ordering::Relaxed);
        s.index.store(c.index, Ordering::Relaxed);
        s.block_start.store(c.block_start, Ordering::Relaxed);
        s.block_end.store(c.block_end.unwrap_or(shmem::OPEN_END), Ordering::Relaxed);
        for a in [&s.rows, &s.raw_bytes, &s.file_bytes] {
            a.store(0, Ordering::Relaxed);
        }
        s.state.store(chunk_state::PENDING, Ordering::Release);
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(out_dir.join("data"))
        .map_err(|e| format!("creating {}: {e}", out_dir.join("data").display()))?;
    // Opened before any chunk is written, so that every later syncfs reports the write-back errors of
    // all of them.
    let fs_sync = FsSync::open(&out_dir).map_err(|e| e.to_string())?;
    // An overlap scan's digest files are working files: nothing to make durable while it runs.
    let digest_mode = job.flags.load(Ordering::Relaxed) & shmem::FLAG_DIGEST != 0;
    job.tables_total.store(metas.len() as u32, Ordering::Relaxed);
    job.work_total.store(metas.iter().map(|m| u64::from(m.blocks.max(1))).sum(), Ordering::Relaxed);
    job.export_name.set(&exported).map_err(|_| format!("snapshot name {exported:?} too long"))?;
    job.chunk_cursor.store(0, Ordering::Relaxed);
    job.chunks_total.store(plan.chunks.len() as u32, Ordering::Relaxed);
    job.chunks_ready.store(1, Ordering::Release);
    job.set_phase(Phase::Data);

    // Workers: as many as asked, the plan can use, and the server and steep_repl.max_workers allow.
    laps.lap("planned and published the chunks");
    let launched = job::launch_workers(shared, slot, Entry::GenerateWorker, plan.chunks.len());
    laps.lap("launched the workers");
    // The column lists for the manifest, read while the workers read the data (the tables are locked:
    // their columns are those of the snapshot).
    drop(metas);
    catalog::fill_columns(&mut tables)?;
    let metas: Vec<&TableMeta> = order.iter().map(|&i| &tables[i]).collect();
    laps.lap("read the column lists");
    if launched == 0 && !plan.chunks.is_empty() {
        // No worker slot free anywhere: the leader scans alone, under its own snapshot.
        session::pin_output_settings(&job.timezone.get());
        let me = leader_worker_slot(shared, slot)?;
        let scanned = scan_chunks(shared, slot, me, false);
        me.word.transition(me.word.get().0, worker_state::RUNNING, worker_state::DONE);
        scanned?;
    }
    // While the workers write, make what they wrote durable a second at a time (small chunks are
    // renamed without fsync, Durability::DeferSmall), so that little is left for the last syncfs.
    let mut last_sync = pg::now_ms();
    let mut sync_error = None;
    job::watch_workers(shared, slot, 0, |job| {
        if !digest_mode && sync_error.is_none() && pg::now_ms().saturating_sub(last_sync) >= 1000 {
            if let Err(e) = fs_sync.sync() {
                job.fail(&e.to_string());
                sync_error = Some(e);
            }
            last_sync = pg::now_ms();
        }
    });
    laps.lap("data phase");
    if job.should_stop() {
        return Err(job.job_error().unwrap_or_else(|| JobError::plain("stopped")));
    }

    job.tables_done.store(metas.len() as u32, Ordering::Relaxed);
    if digest_mode {
        // An overlap scan: its digest files are working files, read by the overlap job; no sequences,
        // no manifest, no fsync (a crash fails the overlap, which scans again).
        xact::pop_snapshot();
        xact::commit();
        return Ok(());
    }

    // Sequences under the same snapshot, then let go of it.
    let stopped = |job: &JobSlot| -> Result<(), JobError> {
        pgrx::check_for_interrupts!();
        match job.should_stop() {
            true => Err(job.job_error().unwrap_or_else(|| JobError::plain("stopped"))),
            false => Ok(()),
        }
    };
    stopped(job)?;
    job.set_phase(Phase::Sequences);
    let table_oids: Vec<u32> = metas.iter().map(|m| m.oid).collect();
    let sequences = catalog::list_sequences(&patterns, &table_oids).map_err(|e| e.to_string())?;
    xact::pop_snapshot();
    xact::commit();

    job.set_phase(Phase::Finalizing);
    progress::publish_if_due(job, true);
    laps.lap("sequences");
    let slot_name = (!slot_name.is_empty()).then_some(slot_name);
    let manifest = build_manifest(
        shared,
        slot,
        &plan,
        &metas,
        sequences,
        &server,
        SnapshotInfo {
            lsn,
            exported_snapshot: exported,
            plugin: slot_name.as_ref().map(|_| pg::slot::PLUGIN.to_string()),
            replication_slot: slot_name,
        },
        compression,
    );
    laps.lap("built the manifest");
    // Small chunks were renamed without fsync (Durability::DeferSmall): make them all durable at once,
    // before the manifest says the snapshot is complete.
    fs_sync.sync().map_err(|e| e.to_string())?;
    laps.lap("synced the files");
    stopped(job)?;
    // A slot becomes permanent before the manifest names it; any failure from here on drops it
    // (remove_output).
    pg::slot::persist_held();
    manifest.write_atomic(&out_dir).map_err(|e| e.to_string())?;
    laps.lap("wrote the manifest");
    // A cancel that came while the manifest was written still wins: the job ends cancelled, and a
    // cancelled snapshot never has a manifest (finish removes it).
    stopped(job)?;
    // Complete: the directory is no longer being written.
    let _gone = std::fs::remove_file(out_dir.join(steep_repl_engine::chunk::WRITER_FILE));
    Ok(())
}

/// A worker slot for the leader when it scans itself.
fn leader_worker_slot(shared: &'static Shared, slot: usize) -> Result<&'static WorkerSlot, JobError> {
    let job = &shared.jobs[slot];
    let (ws, wgen) = shared
        .claim_worker_slot(slot, job.generation())
        .ok_or_else(|| format!("no steep_repl worker slot is free (all {} in use)", shmem::MAX_WORKERS))?;
    let w = &shared.workers[ws];
    w.pid.store(pg::my_pid(), Ordering::Release);
    w.word.transition(wgen, worker_state::LAUNCHING, worker_state::RUNNING);
    Ok(w)
}

/// Reports scan progress into the worker's and the job's counters and relays stop requests.
struct Observer<'a> {
    job: &'a JobSlot,
    me: &'a WorkerSlot,
}

impl ScanObserver for Observer<'_> {
    fn progress(&mut self, rows: u64, bytes: u64, blocks: u64) {
        self.me.rows.fetch_add(rows, Ordering::Relaxed);
        self.me.raw_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.job.rows.fetch_add(rows, Ordering::Relaxed);
        self.job.raw_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.job.work_done.fetch_add(blocks, Ordering::Relaxed);
    }

    fn should_stop(&mut self) -> Option<String> {
        // A data worker dies here on SIGTERM (its exit callback fails the job); the leader scanning
        // alone keeps its own SIGTERM flag, read below.
        pgrx::check_for_interrupts!();
        if pg::dying() {
            let msg = format!(
                "worker pid {} was terminated (SIGTERM: server shutdown or pg_terminate_backend)",
                pg::my_pid()
            );
            self.job.fail(&msg);
            return Some(msg);
        }
        if self.job.should_stop() {
            return Some(if self.job.cancelled.load(Ordering::Acquire) != 0 {
                "cancelled".to_string()
            } else {
                "stopping: another process of this job failed".to_string()
            });
        }
        None
    }
}

/// A data worker's batch of chunks ends after this long (or `BATCH_BYTES`), so progress is published
/// and committed about as often as `steep_repl.progress_interval` asks, whatever the chunks' sizes.
const BATCH_MS: u64 = 200;
/// ... or after this much COPY text.
const BATCH_BYTES: u64 = 64 << 20;

/// Claims and writes chunks until none is left or the job stops. With `own_transactions`, chunks are
/// read in batches, each in a transaction that imports the job's exported snapshot (data workers);
/// without, in the current transaction and snapshot (the leader scanning alone).
fn scan_chunks(
    shared: &Shared,
    slot: usize,
    me: &WorkerSlot,
    own_transactions: bool,
) -> Result<(), JobError> {
    let job = &shared.jobs[slot];
    while job.chunks_ready.load(Ordering::Acquire) == 0 {
        if job.should_stop() {
            return Ok(());
        }
        job::nap(Duration::from_millis(10));
    }
    let base = job.chunk_base.load(Ordering::Acquire) as usize;
    let count = job.chunk_count.load(Ordering::Acquire);
    let out_dir = PathBuf::from(job.path.get());
    let compression = compression_of(job);
    let snapshot = job.export_name.get();
    let chunks = shared.chunks();
    // (started at, raw bytes) of the open batch, if any.
    let mut batch: Option<(u64, u64)> = None;
    // One compressor and one set of buffers for every chunk this process writes.
    let mut scratch = WriterScratch::default();
    let pausing = job.chunk_pause_ms.load(Ordering::Relaxed) > 0;
    // Digest mode (an overlap scan): the key columns of each table, read once per table.
    let mut digest_keys = (job.flags.load(Ordering::Relaxed) & shmem::FLAG_DIGEST != 0)
        .then(|| crate::api::overlap::DigestKeys::of_job(&job.id.get()));
    loop {
        if job.should_stop() {
            break;
        }
        if pausing {
            // A throttled job holds no transaction while it pauses.
            end_batch(&mut batch);
        }
        job::pause_before_chunk(job);
        if job.should_stop() {
            break;
        }
        let k = job.chunk_cursor.fetch_add(1, Ordering::AcqRel);
        if k >= count {
            break;
        }
        let c = &chunks[base + k as usize];
        c.state.store(chunk_state::CLAIMED, Ordering::Release);
        me.current_chunk.store(base as u32 + k + 1, Ordering::Relaxed);
        if own_transactions && batch.is_none() {
            xact::begin_repeatable_read(true);
            xact::import_snapshot(&snapshot);
            xact::push_transaction_snapshot();
            batch = Some((pg::now_ms(), 0));
        } else if !own_transactions {
            xact::push_transaction_snapshot();
        }
        let relid = pg_sys::Oid::from(c.relid.load(Ordering::Relaxed));
        let Some((schema, name)) = pg::relation_name(relid) else {
            error!("table with oid {} disappeared during the snapshot", relid.to_u32());
        };
        // The leader holds ACCESS SHARE on the table; a conflicting request queued since would make a
        // blocking lock here wait for ever (it waits for the leader, which waits for us).
        if !pg::try_lock_relation(relid, pg_sys::AccessShareLock) {
            error!(
                "cannot read {}: a conflicting lock is held or queued on it by {} (DDL such as ALTER TABLE waits for this snapshot's lock); the snapshot stops so that it can proceed",
                QualifiedName::new(schema.clone(), name.clone()),
                pg::lockers_of(relid)
            );
        }
        if pg::rls_applies(relid) {
            // The leader refused such tables when it listed them; a policy added since is refused here.
            error!(
                "row-level security hides rows of {} from the job's role; a snapshot must hold every row",
                QualifiedName::new(schema.clone(), name.clone())
            );
        }
        let index = c.index.load(Ordering::Relaxed);
        let end = c.block_end.load(Ordering::Relaxed);
        let (start, end) = (c.block_start.load(Ordering::Relaxed), (end != shmem::OPEN_END).then_some(end));
        let mut observer = Observer { job, me };
        let stats = match digest_keys.as_mut() {
            None => {
                let rel_path = chunk_rel_path(&table_dir(&schema, &name), index, &compression);
                let mut writer = ChunkWriter::create_with(&out_dir, &rel_path, compression, &mut scratch)
                    .unwrap_or_else(|e| error!("chunk {index} of {schema}.{name}: {e}"));
                scan::copy_block_range(relid, start, end, &mut writer, &mut observer);
                writer
                    .finish_into(Durability::DeferSmall, &mut scratch)
                    .unwrap_or_else(|e| error!("chunk {index} of {schema}.{name}: {e}"))
            }
            Some(keys) => {
                let key = keys.fields_of(relid, &schema, &name);
                crate::api::overlap::scan_digest(&out_dir, &schema, &name, index, key, |w| {
                    scan::copy_block_range(relid, start, end, w, &mut observer);
                })
            }
        };
        pg::unlock_relation(relid, pg_sys::AccessShareLock);
        if !own_transactions {
            xact::pop_snapshot();
        }
        c.rows.store(stats.rows, Ordering::Relaxed);
        c.raw_bytes.store(stats.raw_bytes, Ordering::Relaxed);
        c.file_bytes.store(stats.file_bytes, Ordering::Relaxed);
        c.raw_crc32.store(stats.raw_crc32, Ordering::Relaxed);
        c.file_crc32.store(stats.file_crc32, Ordering::Relaxed);
        c.state.store(chunk_state::DONE, Ordering::Release);
        me.file_bytes.fetch_add(stats.file_bytes, Ordering::Relaxed);
        job.file_bytes.fetch_add(stats.file_bytes, Ordering::Relaxed);
        job.chunks_done.fetch_add(1, Ordering::AcqRel);
        job.units_done.fetch_add(1, Ordering::AcqRel);
        job::wake_leader(job);
        me.current_chunk.store(0, Ordering::Relaxed);
        if let Some((started, bytes)) = batch.as_mut() {
            *bytes += stats.raw_bytes;
            if pg::now_ms().saturating_sub(*started) >= BATCH_MS || *bytes >= BATCH_BYTES {
                end_batch(&mut batch);
                progress::publish_if_due(job, false);
            }
        }
    }
    end_batch(&mut batch);
    Ok(())
}

/// Ends a data worker's open batch transaction, if any.
fn end_batch(batch: &mut Option<(u64, u64)>) {
    if batch.take().is_some() {
        xact::pop_snapshot();
        xact::commit();
    }
}

#[allow(clippy::too_many_arguments)]
fn build_manifest(
    shared: &Shared,
    slot: usize,
    plan: &plan::Plan,
    metas: &[&TableMeta],
    sequences: Vec<SequenceEntry>,
    server: &catalog::ServerInfo,
    snapshot: SnapshotInfo,
    compression: Compression,
) -> Manifest {
    let job = &shared.jobs[slot];
    let base = job.chunk_base.load(Ordering::Acquire) as usize;
    let chunks = shared.chunks();
    let mut tables: Vec<TableEntry> =
        metas.iter().map(|m| TableEntry::new(m.schema.clone(), m.name.clone(), m.columns.clone())).collect();
    for (k, c) in plan.chunks.iter().enumerate() {
        let s = &chunks[base + k];
        let file = chunk_rel_path(&tables[c.table].dir, c.index, &compression);
        tables[c.table].chunks.push(ChunkEntry {
            index: c.index,
            file,
            block_start: c.block_start,
            block_end: c.block_end,
            rows: s.rows.load(Ordering::Relaxed),
            raw_bytes: s.raw_bytes.load(Ordering::Relaxed),
            file_bytes: s.file_bytes.load(Ordering::Relaxed),
            raw_crc32: s.raw_crc32.load(Ordering::Relaxed),
            file_crc32: s.file_crc32.load(Ordering::Relaxed),
        });
    }
    tables.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    let mut settings: std::collections::BTreeMap<String, String> =
        steep_repl_engine::copy_text::PINNED_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    settings.insert("TimeZone".into(), job.timezone.get());
    settings.insert("server_encoding".into(), server.server_encoding.clone());
    let started = chrono::DateTime::from_timestamp_millis(job.started_ms.load(Ordering::Relaxed) as i64)
        .unwrap_or_else(chrono::Utc::now);
    let mut m = Manifest {
        format_version: FORMAT_VERSION,
        snapshot_id: job.id.get(),
        created_at: started,
        finished_at: chrono::Utc::now(),
        source: Source {
            server_version: server.server_version.clone(),
            server_version_num: server.server_version_num,
            database: server.database.clone(),
            system_identifier: server.system_identifier.clone(),
        },
        snapshot,
        settings,
        compression,
        parallel: Parallelism {
            requested: job.parallel_requested.load(Ordering::Relaxed),
            used: job.workers_launched.load(Ordering::Relaxed).max(1),
        },
        chunk_size_bytes: job.chunk_bytes.load(Ordering::Relaxed),
        mode: Mode::Direct,
        tables,
        sequences: sequences
            .into_iter()
            .map(|s| SequenceEntry {
                schema: s.schema,
                name: s.name,
                last_value: s.last_value,
                is_called: s.is_called,
            })
            .collect(),
        totals: Default::default(),
    };
    m.refresh_totals();
    m
}

/// How a generate ends: a failed or cancelled one removes everything it wrote.
const ENDING: job::Ending = job::Ending {
    success: (Phase::Complete, "complete"),
    cleanup: remove_output,
    cancelled: |_| "cancelled by steep_repl.cancel_snapshot()".to_string(),
    failed: |first, _| first,
};

fn finish(shared: &'static Shared, slot: usize, outcome: Result<(), JobError>) {
    // A completed job's slot was persisted: let go of it before the job is said complete, so that a
    // subscriber never finds it in use. A failed job's is dropped by remove_output.
    if outcome.is_ok() {
        pg::slot::release_held();
    }
    job::finish(shared, slot, outcome, &ENDING);
    pg::slot::release_held();
}

/// Removes what a failed or cancelled job wrote: its replication slot, the manifest (if any), `data/`,
/// leftover temp files, and the directory itself if start_snapshot created it.
fn remove_output(job: &JobSlot) -> Option<String> {
    pg::slot::drop_held();
    let path = job.path.get();
    let dir = Path::new(&path);
    if dir.as_os_str().is_empty() {
        return None;
    }
    // Only a directory this job is writing (its writer file names it): never another job's output.
    let writer = dir.join(steep_repl_engine::chunk::WRITER_FILE);
    match std::fs::read_to_string(&writer) {
        Ok(owner) if owner.trim() == job.id.get() => {}
        _ => return None,
    }
    remove_written(dir);
    if job.flags.load(Ordering::Relaxed) & crate::api::snapshot::FLAG_CREATED_DIR != 0 {
        let _not_empty = std::fs::remove_dir(dir);
    }
    None
}

/// Removes what a generate writes into `dir`: the manifest, `data/`, temp files and the writer file,
/// leaving anything else. The caller has checked that the writer file names a job whose output this is.
pub(crate) fn remove_written(dir: &Path) {
    let _absent = std::fs::remove_file(dir.join(steep_repl_engine::manifest::MANIFEST_FILE));
    let _absent = std::fs::remove_dir_all(dir.join("data"));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if steep_repl_engine::chunk::is_temp_file_name(&e.file_name().to_string_lossy()) {
                let _absent = std::fs::remove_file(e.path());
            }
        }
    }
    let _absent = std::fs::remove_file(dir.join(steep_repl_engine::chunk::WRITER_FILE));
}

//! Client-mode apply: the server's apply, run in the CLI over ordinary connections.
//!
//! Before any row changes: the manifest must load and validate; unless `--no-verify`, every chunk file
//! passes the quick check (size and CRC); every table and sequence exists on the target with compatible
//! columns (the engine's `compat` rules, as the extension); the role may INSERT (and TRUNCATE); the
//! target tables are empty (unless `--truncate`). An advisory lock keeps two applies of one snapshot
//! into one database apart.
//!
//! Then N connections take chunks, largest tables first, and stream each through the engine's
//! `ChunkReader` (which checks every byte against the manifest's CRCs) into `COPY t (cols) FROM STDIN`,
//! one transaction per chunk. A reader thread per chunk feeds a bounded queue, so memory stays bounded
//! whatever the chunk size. Finished chunks are recorded in the state file ([`super::state`]) with the
//! exactly-once protocol described there; a re-run of the same command resumes. Sequences are set last,
//! then the tables are analyzed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use steep_repl_engine::chunk::ChunkReader;
use steep_repl_engine::compat;
use steep_repl_engine::error::ManifestError;
use steep_repl_engine::ident::{QualifiedName, quote_ident};
use steep_repl_engine::manifest::{ChunkEntry, Manifest};
use steep_repl_engine::schema;
use steep_repl_engine::verify::{VerifyMode, verify_snapshot};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_postgres::Client;

use super::session;
use super::state::{StateFile, Target};
use super::stats::Stats;
use crate::conn::ConnSpec;
use crate::error::CliError;
use crate::progress::{Reporter, Started, Summary};
use crate::signals::Interrupt;

/// Decompressed bytes per message from a reader thread.
const READ_BYTES: usize = 1 << 20;
/// Messages queued per worker between its reader thread and the connection.
const READ_QUEUE: usize = 4;
/// How often the reporter is updated.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// What to apply.
#[derive(Debug, Clone)]
pub struct ApplyJob {
    pub conn: ConnSpec,
    /// Local snapshot directory.
    pub input: PathBuf,
    /// Worker connections.
    pub parallel: u32,
    /// Quick-check every chunk file before loading anything.
    pub verify: bool,
    /// Empty the target tables first.
    pub truncate: bool,
    /// ANALYZE the tables at the end.
    pub analyze: bool,
}

/// Loads a manifest for applying: any problem is a verification failure listing every problem.
pub fn load_manifest(dir: &Path) -> Result<Manifest, CliError> {
    Manifest::load(dir).map_err(|e| {
        let problems = match &e {
            ManifestError::Invalid { problems, .. } => problems.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        };
        CliError::VerifyFailed { dir: dir.to_path_buf(), problems }
    })
}

/// Runs the job on `coordinator` (an open connection to the target) and reports it.
pub async fn run(
    job: &ApplyJob,
    coordinator: Client,
    reason: String,
    reporter: &mut dyn Reporter,
    interrupt: &mut Interrupt,
) -> Result<(), CliError> {
    let dir = std::path::absolute(&job.input).map_err(CliError::io("resolve", &job.input))?;
    let id = super::new_id("app");
    let path = dir.display().to_string();
    reporter.started(&Started {
        op: "apply".into(),
        id: id.clone(),
        mode: "client".into(),
        path: Some(path.clone()),
        reason,
    });
    let started = std::time::Instant::now();
    let result = apply(job, &coordinator, &dir, &id, reporter, interrupt).await;
    drop(coordinator);
    match result {
        Ok(summary) => {
            reporter.finish(&summary);
            Ok(())
        }
        Err(e) => {
            reporter.finish(&Summary::failed("apply", id, path, &e, started.elapsed().as_secs_f64()));
            Err(e)
        }
    }
}

/// The tables, columns and sequences of `schemas` as a target check reads them: with the schema
/// fingerprints' catalog query and the kinds `schema::TARGET_KINDS`, as the extension's apply does.
pub(crate) async fn target_objects(
    client: &Client,
    schemas: &[String],
) -> Result<Vec<schema::SchemaObject>, CliError> {
    let kinds: Vec<&str> = schema::TARGET_KINDS.to_vec();
    let version: String = client
        .query_one("SELECT pg_catalog.current_setting('server_version_num')", &[])
        .await
        .map_err(CliError::query("reading the server's version"))?
        .get(0);
    let sql = schema::fingerprint_sql(version.parse().unwrap_or(0));
    let rows = client
        .query(sql.as_str(), &[&schemas, &kinds])
        .await
        .map_err(CliError::query("reading tables, columns and sequences"))?;
    Ok(rows
        .iter()
        .map(|r| schema::SchemaObject {
            kind: r.get(0),
            schema: r.get(1),
            table: r.get(2),
            name: r.get(3),
            definition: r.get(4),
            column_type: r.get(5),
            generated: r.get(6),
        })
        .collect())
}

/// Every check of the module documentation that needs the target; fails listing every problem.
async fn check_target(client: &Client, m: &Manifest, truncate: bool) -> Result<(), CliError> {
    // Read with the schema fingerprints' query, as the extension's apply does.
    let objects = target_objects(client, &compat::target_schemas(m)).await?;
    let (targets, sequences) = compat::targets_from_schema(&objects);
    let problems = compat::check_target(m, &targets, &sequences);
    if !problems.is_empty() {
        return Err(CliError::SchemaMismatch {
            problems: problems.iter().map(ToString::to_string).collect(),
        });
    }
    let mut denied = Vec::new();
    for t in &m.tables {
        let qn = QualifiedName::new(t.schema.clone(), t.name.clone()).to_string();
        let ok: bool = client
            .query_one(
                "SELECT pg_catalog.has_table_privilege($1, 'INSERT') \
                 AND (NOT $2 OR pg_catalog.has_table_privilege($1, 'TRUNCATE'))",
                &[&qn, &truncate],
            )
            .await
            .map_err(CliError::query(format!("checking privileges on {qn}")))?
            .get(0);
        if !ok {
            denied.push(format!("{qn} ({})", if truncate { "INSERT, TRUNCATE" } else { "INSERT" }));
        }
    }
    if !denied.is_empty() {
        return Err(CliError::Other(anyhow::anyhow!(
            "permission denied: applying needs {}",
            denied.join(", ")
        )));
    }
    Ok(())
}

/// Tables among `tables` that hold rows.
async fn non_empty(client: &Client, tables: &[QualifiedName]) -> Result<Vec<String>, CliError> {
    let mut full = Vec::new();
    for qn in tables {
        let has_rows: bool = client
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM ONLY {qn})"), &[])
            .await
            .map_err(CliError::query(format!("checking whether {qn} is empty")))?
            .get(0);
        if has_rows {
            full.push(qn.to_string());
        }
    }
    Ok(full)
}

/// One chunk to load.
struct LoadJob {
    table: usize,
    entry: ChunkEntry,
    sql: String,
    label: String,
}

/// What the workers share.
struct Work {
    dir: PathBuf,
    chunks: Vec<LoadJob>,
    cursor: AtomicUsize,
    state: Mutex<StateFile>,
    tables_left: Vec<AtomicU64>,
    stats: Stats,
}

/// Resolves chunks left pending by an interrupted run: committed ones are done, aborted ones are
/// loaded again; an unknown outcome (too old to tell) is an error naming the chunk.
/// What `steep_repl_engine::checkpoints` says of loading `copy_bytes` into the target with `workers`
/// connections: the settings that would force checkpoints during it, and values that avoid them.
async fn checkpoint_warning(
    client: &Client,
    copy_bytes: u64,
    workers: u32,
) -> Result<Option<String>, CliError> {
    use steep_repl_engine::checkpoints::{self, Estimate, Settings};
    let row = client
        .query_one(checkpoints::SETTINGS_SQL, &[])
        .await
        .map_err(CliError::query("reading the target's checkpoint settings"))?;
    let Some(settings) = Settings::from_row(row.get(0), row.get(1), row.get(2)) else {
        return Ok(None);
    };
    let estimate = Estimate::of(copy_bytes, workers.max(1));
    Ok(checkpoints::warning(estimate, &checkpoints::advise(estimate, settings)))
}

async fn resolve_pending(
    client: &Client,
    state: &mut StateFile,
    reporter: &mut dyn Reporter,
) -> Result<(), CliError> {
    let pending: Vec<(String, i64)> = state.state.pending.iter().map(|(f, t)| (f.clone(), *t)).collect();
    for (file, txid) in pending {
        let status: Option<String> = client
            .query_one("SELECT pg_catalog.txid_status($1)", &[&txid])
            .await
            .map_err(CliError::query(format!("asking the target about transaction {txid}")))?
            .get(0);
        match status.as_deref() {
            Some("committed") => {
                reporter.note(&format!("{file}: its transaction {txid} committed before the interruption"));
                state.state.done.insert(file.clone(), 0);
            }
            Some("aborted") => {}
            other => {
                return Err(CliError::Other(anyhow::anyhow!(
                    "{}: whether chunk {file} was loaded is unknown (transaction {txid} is {}); check the table, \
                     then remove the state file and apply again with --truncate",
                    state.path.display(),
                    other.unwrap_or("too old to tell")
                )));
            }
        }
        state.state.pending.remove(&file);
    }
    state.save()
}

/// Everything after `run`'s reporting; returns the summary.
async fn apply(
    job: &ApplyJob,
    coord: &Client,
    dir: &Path,
    id: &str,
    reporter: &mut dyn Reporter,
    interrupt: &mut Interrupt,
) -> Result<Summary, CliError> {
    let cancelled =
        |detail: String| CliError::Cancelled { op: "apply".into(), id: id.to_string(), detail: Some(detail) };
    let m = load_manifest(dir)?;
    let all_chunks: u64 = m.tables.iter().map(|t| t.chunks.len() as u64).sum();
    let raw_total: u64 = m.tables.iter().map(|t| t.raw_bytes).sum();
    let row = coord
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_catalog.pg_control_system()), \
             pg_catalog.current_database()::text, \
             (SELECT d.oid::int8 FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()), \
             ('x' || pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::int8",
            &[],
        )
        .await
        .map_err(CliError::query("identifying the target"))?;
    let target = Target {
        system_identifier: row.get::<_, Option<String>>(0).unwrap_or_default(),
        database: row.get(1),
        database_oid: row.get::<_, Option<i64>>(2).unwrap_or(0) as u32,
        timeline: row.get::<_, Option<i64>>(3).unwrap_or(0) as u32,
    };
    let locked: bool = coord
        .query_one(
            "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtextextended($1, 0))",
            &[&format!("steep-repl apply {}", m.snapshot_id)],
        )
        .await
        .map_err(CliError::query("taking the apply's advisory lock"))?
        .get(0);
    if !locked {
        return Err(CliError::Other(anyhow::anyhow!(
            "another steep-repl apply of snapshot {} into database {} is running",
            m.snapshot_id,
            target.database
        )));
    }
    check_target(coord, &m, job.truncate).await?;

    let mut state = StateFile::open(dir, &m.snapshot_id, &target)?;
    if state.state.complete {
        reporter.note(&format!(
            "snapshot {} is already applied into database {} ({}); nothing to do",
            m.snapshot_id,
            target.database,
            state.path.display()
        ));
        return Ok(Summary {
            op: "apply".into(),
            id: id.to_string(),
            mode: "client".into(),
            status: "applied".into(),
            path: Some(dir.display().to_string()),
            error: None,
            exit_code: 0,
            elapsed_s: 0.0,
            tables: m.totals.tables,
            chunks: m.totals.chunks,
            rows: m.totals.rows,
            bytes: m.totals.raw_bytes,
            bytes_written: m.totals.file_bytes,
            bytes_per_s: 0.0,
        });
    }
    if job.verify {
        reporter.note(&format!("verifying {} chunk files (size and CRC) before loading", all_chunks));
        let d = dir.to_path_buf();
        let report = tokio::select! {
            r = tokio::task::spawn_blocking(move || verify_snapshot(&d, VerifyMode::Quick)) => {
                r.map_err(|e| CliError::Other(anyhow::anyhow!("verification thread: {e}")))?
            }
            sig = interrupt.recv() => return Err(cancelled(format!("{sig} during verification; nothing was loaded"))),
        };
        if !report.is_ok() {
            return Err(CliError::VerifyFailed {
                dir: dir.to_path_buf(),
                problems: report.problems.iter().map(ToString::to_string).collect(),
            });
        }
    }

    resolve_pending(coord, &mut state, reporter).await?;
    let resuming = !state.state.done.is_empty();
    if resuming {
        reporter.note(&format!(
            "resuming: {} of {all_chunks} chunks are already loaded ({})",
            state.state.done.len(),
            state.path.display()
        ));
    }

    let left: u64 = m
        .tables
        .iter()
        .flat_map(|t| &t.chunks)
        .filter(|c| !state.state.done.contains_key(&c.file))
        .map(|c| c.raw_bytes)
        .sum();
    if let Some(w) = checkpoint_warning(coord, left, job.parallel).await? {
        reporter.note(&format!("warning: {w}"));
    }

    // Tables that this apply has not started: they must be empty, or be emptied.
    let qualified: Vec<QualifiedName> =
        m.tables.iter().map(|t| QualifiedName::new(t.schema.clone(), t.name.clone())).collect();
    let untouched: Vec<QualifiedName> = m
        .tables
        .iter()
        .zip(&qualified)
        .filter(|(t, _)| !t.chunks.iter().any(|c| state.state.done.contains_key(&c.file)))
        .map(|(_, q)| q.clone())
        .collect();
    let settings = session::pinned(
        m.settings.get("TimeZone").map(String::as_str).unwrap_or(""),
        m.settings.get("server_encoding").map(String::as_str).unwrap_or(""),
    );
    session::run(coord, &settings, "pinning session settings").await?;
    let replica = match coord.batch_execute("SET session_replication_role = replica").await {
        Ok(()) => true,
        Err(e) if e.code().is_some_and(|c| c.code() == "42501") => {
            reporter.note(
                "session_replication_role = replica was refused (it needs a superuser): loading with triggers \
                 and foreign keys on, so related tables must load in an order their constraints allow",
            );
            false
        }
        Err(e) => return Err(CliError::query("SET session_replication_role = replica")(e)),
    };
    if job.truncate && !state.state.truncated && !resuming {
        if !qualified.is_empty() {
            let list: Vec<String> = qualified.iter().map(ToString::to_string).collect();
            session::run(
                coord,
                &format!("TRUNCATE ONLY {}", list.join(", ")),
                "truncating the target tables",
            )
            .await?;
        }
        state.state.truncated = true;
        state.save()?;
    } else {
        if job.truncate {
            reporter.note("resuming: the target tables are not truncated again");
        }
        let full = non_empty(coord, &untouched).await?;
        if !full.is_empty() {
            return Err(CliError::Other(anyhow::anyhow!(
                "target tables are not empty: {}; use --truncate to empty them first",
                full.join(", ")
            )));
        }
    }

    // Work list: largest tables first, chunks by index, those not loaded yet.
    let mut order: Vec<usize> = (0..m.tables.len()).collect();
    order.sort_by(|&a, &b| {
        m.tables[b].raw_bytes.cmp(&m.tables[a].raw_bytes).then_with(|| qualified[a].cmp(&qualified[b]))
    });
    let mut chunks = Vec::new();
    let mut tables_left: Vec<AtomicU64> = (0..m.tables.len()).map(|_| AtomicU64::new(0)).collect();
    let (mut done_units, mut done_rows, mut done_chunks) = (0u64, 0u64, 0u64);
    for &t in &order {
        let table = &m.tables[t];
        let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let sql = format!("COPY {} ({}) FROM STDIN", qualified[t], cols.join(", "));
        for c in &table.chunks {
            if state.state.done.contains_key(&c.file) {
                done_units += c.raw_bytes;
                done_rows += c.rows;
                done_chunks += 1;
                continue;
            }
            *tables_left[t].get_mut() += 1;
            chunks.push(LoadJob {
                table: t,
                entry: c.clone(),
                sql: sql.clone(),
                label: format!("chunk {} of {} ({})", c.index, qualified[t], c.file),
            });
        }
    }
    let n = (job.parallel as usize).min(chunks.len());
    let stats = Stats::new("apply", id, n, (raw_total, all_chunks, m.tables.len() as u64));
    stats.work_done.store(done_units, Ordering::Relaxed);
    stats.rows.store(done_rows, Ordering::Relaxed);
    stats.chunks_done.store(done_chunks, Ordering::Relaxed);
    stats.tables_done.store(
        tables_left.iter().filter(|l| l.load(Ordering::Relaxed) == 0).count() as u64,
        Ordering::Relaxed,
    );
    let work = Arc::new(Work {
        dir: dir.to_path_buf(),
        chunks,
        cursor: AtomicUsize::new(0),
        state: Mutex::new(state),
        tables_left,
        stats,
    });
    work.stats.set_phase("data");
    let mut worker_settings = settings.clone();
    if replica {
        worker_settings.push_str(&session::set("session_replication_role", "replica"));
    }
    let mut workers = Vec::with_capacity(n);
    for _ in 0..n {
        let open = async {
            let c = job.conn.connect().await?;
            session::run(&c, &worker_settings, "pinning worker settings").await?;
            Ok::<Client, CliError>(c)
        };
        tokio::select! {
            c = open => workers.push(c?),
            sig = interrupt.recv() => return Err(cancelled(format!("{sig} while opening worker connections"))),
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut set: JoinSet<Result<(), CliError>> = JoinSet::new();
    for (w, client) in workers.into_iter().enumerate() {
        set.spawn(worker(w, client, Arc::clone(&work), stop_rx.clone()));
    }
    let failure = super::pool::run_workers(
        set,
        &stop_tx,
        interrupt,
        |sig| {
            cancelled(format!(
                "{sig}; the chunks loaded so far are kept: run the same command again to resume"
            ))
        },
        REPORT_EVERY,
        || reporter.update(&work.stats.update("running")),
    )
    .await;
    if let Some(e) = failure {
        if !matches!(e, CliError::Cancelled { .. } | CliError::VerifyFailed { .. } | CliError::Engine { .. })
        {
            reporter.note("the chunks loaded so far are kept: run the same command again to resume");
        }
        return Err(e);
    }

    work.stats.set_phase("sequences");
    reporter.update(&work.stats.update("running"));
    for s in &m.sequences {
        let qn = QualifiedName::new(s.schema.clone(), s.name.clone()).to_string();
        coord
            .query_one(
                "SELECT pg_catalog.setval($1::text::regclass, $2, $3)",
                &[&qn, &s.last_value, &s.is_called],
            )
            .await
            .map_err(CliError::query(format!("setting sequence {qn}")))?;
    }
    if job.analyze && !qualified.is_empty() {
        work.stats.set_phase("analyze");
        reporter.update(&work.stats.update("running"));
        let list: Vec<String> = qualified.iter().map(ToString::to_string).collect();
        session::run(coord, &format!("ANALYZE {}", list.join(", ")), "analyzing the loaded tables").await?;
    }
    {
        let mut state =
            work.state.lock().map_err(|_| CliError::Other(anyhow::anyhow!("a worker panicked")))?;
        state.state.complete = true;
        state.save()?;
    }
    reporter.update(&work.stats.update("applied"));
    let elapsed = work.stats.elapsed_s();
    let loaded = work.stats.bytes.load(Ordering::Relaxed);
    Ok(Summary {
        op: "apply".into(),
        id: id.to_string(),
        mode: "client".into(),
        status: "applied".into(),
        path: Some(dir.display().to_string()),
        error: None,
        exit_code: 0,
        elapsed_s: elapsed,
        tables: m.totals.tables,
        chunks: m.totals.chunks,
        rows: work.stats.rows.load(Ordering::Relaxed),
        bytes: loaded,
        bytes_written: work.stats.file_bytes.load(Ordering::Relaxed),
        bytes_per_s: loaded as f64 / elapsed.max(1e-3),
    })
}

/// Takes chunks from the shared cursor until none is left or the job stops.
async fn worker(
    w: usize,
    client: Client,
    work: Arc<Work>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), CliError> {
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let k = work.cursor.fetch_add(1, Ordering::Relaxed);
        let Some(chunk) = work.chunks.get(k) else {
            return Ok(());
        };
        if !load_chunk(w, &client, &work, chunk, &mut stop).await? {
            return Ok(());
        }
        work.stats.file_bytes.fetch_add(chunk.entry.file_bytes, Ordering::Relaxed);
        work.stats.chunk_done(w, chunk.entry.raw_bytes);
        if work.tables_left[chunk.table].fetch_sub(1, Ordering::Relaxed) == 1 {
            work.stats.tables_done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The reader thread of one chunk: checked, decompressed bytes into the queue, or the check that failed.
fn read_chunk(dir: &Path, entry: &ChunkEntry, tx: mpsc::Sender<Result<Bytes, steep_repl_engine::Error>>) {
    let send = |msg| tx.blocking_send(msg).is_ok();
    let mut reader = match ChunkReader::open_in(dir, entry) {
        Ok(r) => r,
        Err(e) => {
            if !send(Err(e)) {
                // The loader stopped; nobody waits for this error.
            }
            return;
        }
    };
    loop {
        let mut buf = vec![0u8; READ_BYTES];
        match reader.read_checked(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if !send(Ok(Bytes::from(buf))) {
                    return;
                }
            }
            Err(e) => {
                if !send(Err(steep_repl_engine::Error::Chunk(e))) {
                    // The loader stopped; nobody waits for this error.
                }
                return;
            }
        }
    }
}

/// How feeding a chunk into COPY ended.
enum Fed {
    All,
    Stopped,
    Failed(CliError),
}

/// Loads one chunk in one transaction and records it; `false` when the job stopped meanwhile (the
/// chunk's transaction is rolled back).
async fn load_chunk(
    w: usize,
    client: &Client,
    work: &Work,
    chunk: &LoadJob,
    stop: &mut watch::Receiver<bool>,
) -> Result<bool, CliError> {
    let label = chunk.label.as_str();
    session::run(client, "BEGIN", label).await?;
    let sink = client.copy_in::<_, Bytes>(&chunk.sql).await.map_err(CliError::query(label))?;
    let mut sink = Box::pin(sink);
    let (tx, mut rx) = mpsc::channel(READ_QUEUE);
    let (dir, entry) = (work.dir.clone(), chunk.entry.clone());
    let reader = tokio::task::spawn_blocking(move || read_chunk(&dir, &entry, tx));
    let mut loaded = 0u64;
    let fed = loop {
        let msg = tokio::select! {
            biased;
            _ = stop.changed() => break Fed::Stopped,
            msg = rx.recv() => msg,
        };
        match msg {
            Some(Ok(bytes)) => {
                loaded += bytes.len() as u64;
                work.stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if let Some(slot) = work.stats.in_flight.get(w) {
                    slot.store(loaded, Ordering::Relaxed);
                }
                if let Err(e) = sink.send(bytes).await {
                    break Fed::Failed(CliError::query(label)(e));
                }
            }
            Some(Err(e)) => break Fed::Failed(CliError::engine(label)(e)),
            None => break Fed::All,
        }
    };
    drop(rx);
    if reader.await.is_err() {
        return Err(CliError::Other(anyhow::anyhow!("{label}: the reader thread failed")));
    }
    let failed = match fed {
        Fed::All => match sink.as_mut().finish().await {
            Ok(rows) if rows == chunk.entry.rows => None,
            Ok(rows) => Some(CliError::Other(anyhow::anyhow!(
                "{label}: COPY loaded {rows} rows, the manifest records {}",
                chunk.entry.rows
            ))),
            Err(e) => Some(CliError::query(label)(e)),
        },
        Fed::Stopped => {
            drop(sink); // an unfinished COPY is aborted when its sink is dropped
            session::run(client, "ROLLBACK", label).await?;
            return Ok(false);
        }
        Fed::Failed(e) => Some(e),
    };
    if let Some(e) = failed {
        drop(sink);
        if client.batch_execute("ROLLBACK").await.is_err() {
            // The connection is gone: the server rolls the transaction back itself.
        }
        return Err(e);
    }
    let rows = chunk.entry.rows;
    let txid: i64 = client
        .query_one("SELECT pg_catalog.txid_current()", &[])
        .await
        .map_err(CliError::query(label))?
        .get(0);
    let file = chunk.entry.file.clone();
    record(work, |s| {
        s.pending.insert(file.clone(), txid);
    })?;
    session::run(client, "COMMIT", label).await?;
    work.stats.rows.fetch_add(rows, Ordering::Relaxed);
    record(work, |s| {
        s.pending.remove(&file);
        s.done.insert(file.clone(), rows);
    })
    .map(|()| true)
}

/// Changes the shared state and saves it.
fn record(work: &Work, change: impl FnOnce(&mut super::state::ApplyState)) -> Result<(), CliError> {
    let mut state = work.state.lock().map_err(|_| CliError::Other(anyhow::anyhow!("a worker panicked")))?;
    change(&mut state.state);
    state.save()
}

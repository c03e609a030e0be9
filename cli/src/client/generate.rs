//! Client-mode generate: the server's generate, run in the CLI over ordinary connections.
//!
//! 1. The coordinator lists the tables (the engine's `TABLES_SQL` and selection rules, as the
//!    extension), opens `REPEATABLE READ READ ONLY`, takes `ACCESS SHARE` locks on them *before* its
//!    snapshot exists (LOCK TABLE takes no snapshot), lists them again under the snapshot (locking any
//!    table created in between), reads the WAL position and exports the snapshot. It keeps that
//!    transaction, and so the locks and the snapshot, open until every chunk is written, then reads the
//!    sequences under it.
//! 2. The engine's planner splits the tables into ctid block ranges (`--chunk-size`).
//! 3. N worker connections import the snapshot and, per chunk taken from a shared cursor (largest tables
//!    first), stream `COPY (SELECT cols FROM ONLY t WHERE ctid >= '(a,0)'::tid AND ctid < '(b,0)'::tid)
//!    TO STDOUT` (the last chunk of a table only has the lower bound) into the engine's `ChunkWriter` on a
//!    blocking thread, through a bounded queue: when the disk is slower than the network, the queue
//!    fills, the connection stops being read and the server waits. Memory per worker stays below
//!    `(WRITE_QUEUE + 1) * BATCH_BYTES` plus the writer's buffers.
//! 4. The manifest (mode `client`) is written last, atomically. A failure or Ctrl-C removes everything
//!    written.
//!
//! Byte identity with the server's chunks: same columns (no dropped or generated ones), `FROM ONLY` (an
//! inheritance parent's own rows only), the same pinned settings and time zone, `client_encoding` set
//! to the server encoding (no conversion), and rows in physical order (a TID range scan; no parallel
//! plan, no synchronized scan).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use steep_repl_engine::catalog::{
    self, LSN_SQL, SEQUENCES_SQL, SERVER_INFO_SQL, SelectionError, SequenceRow, TABLES_SQL, TableMeta,
    TableRow,
};
use steep_repl_engine::chunk::{ChunkStats, ChunkWriter, Compression, remove_leftover_temp_files};
use steep_repl_engine::copy_text::PINNED_SETTINGS;
use steep_repl_engine::filter::TablePattern;
use steep_repl_engine::ident::{QualifiedName, quote_ident, quote_literal};
use steep_repl_engine::manifest::{
    ChunkEntry, FORMAT_VERSION, Manifest, Mode, Parallelism, SnapshotInfo, Source, TableEntry,
};
use steep_repl_engine::naming::{chunk_rel_path, table_dir};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_postgres::Client;

use super::replication::ReplicationConn;
use super::session;
use super::stats::Stats;
use crate::conn::ConnSpec;
use crate::error::CliError;
use crate::progress::{Reporter, Started, Summary};
use crate::signals::Interrupt;

/// COPY rows gathered before they are handed to the writer thread.
const BATCH_BYTES: usize = 1 << 20;
/// Batches queued per worker between the connection and its writer thread (the backpressure bound).
const WRITE_QUEUE: usize = 4;
/// Largest number of tables named in one LOCK TABLE statement.
const LOCK_BATCH: usize = 500;
/// How often the reporter is updated.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    pub conn: ConnSpec,
    /// Local snapshot directory (created; must be new or empty).
    pub output: PathBuf,
    /// Worker connections.
    pub parallel: u32,
    pub compression: Compression,
    /// Table patterns (none: every user table).
    pub patterns: Vec<TablePattern>,
    /// Target raw chunk size.
    pub chunk_bytes: u64,
    /// Create this permanent logical slot (through a replication connection) and read at its
    /// consistent point; dropped again if the job fails.
    pub slot: Option<String>,
}

/// Runs the job on `coordinator` (an open connection to the source) and reports it.
pub async fn run(
    job: &GenerateJob,
    coordinator: Client,
    reason: String,
    reporter: &mut dyn Reporter,
    interrupt: &mut Interrupt,
) -> Result<(), CliError> {
    let id = super::new_id("gen");
    let out = OutputDir::prepare(&job.output)?;
    let path = out.path.display().to_string();
    reporter.started(&Started {
        op: "generate".into(),
        id: id.clone(),
        mode: "client".into(),
        path: Some(path.clone()),
        reason,
    });
    let started = std::time::Instant::now();
    // Set once this run's replication connection has begun creating the slot: only then is a slot of
    // that name this run's to drop on failure (another run's is never touched).
    let slot_created = AtomicBool::new(false);
    let result = generate(job, &coordinator, &out.path, &id, reporter, interrupt, &slot_created).await;
    drop(coordinator);
    match result {
        Ok(summary) => {
            reporter.finish(&summary);
            Ok(())
        }
        Err(e) => {
            if let Err(cleanup) = out.remove_partial() {
                reporter.note(&format!("could not remove the partial snapshot {path}: {cleanup}"));
            }
            if let Some(slot) = job.slot.as_ref().filter(|_| slot_created.load(Ordering::Acquire))
                && let Err(cleanup) = drop_slot(&job.conn, slot).await
            {
                reporter.note(&format!("could not drop replication slot {slot}: {cleanup}"));
            }
            reporter.finish(&Summary::failed(
                "generate",
                id.clone(),
                path,
                &e,
                started.elapsed().as_secs_f64(),
            ));
            Err(e)
        }
    }
}

/// Drops replication slot `name` of a failed job, waiting a few seconds for the connection that
/// created it to go away (a cancelled creation ends its command first).
async fn drop_slot(conn: &ConnSpec, name: &str) -> Result<(), CliError> {
    let client = conn.connect().await?;
    for _ in 0..50 {
        let row = client
            .query_opt("SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = $1", &[&name])
            .await
            .map_err(CliError::query("reading pg_replication_slots"))?;
        match row.map(|r| r.get::<_, bool>(0)) {
            None => return Ok(()),
            Some(false) => {
                client
                    .execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&name])
                    .await
                    .map_err(CliError::query(format!("dropping replication slot {name}")))?;
                return Ok(());
            }
            Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Err(CliError::Other(anyhow::anyhow!(
        "replication slot {name} is still in use; drop it with pg_drop_replication_slot"
    )))
}

/// Returns (as the error to fail with) once a lock cycle the server cannot see forms while the slot is
/// created: slot creation (`walsender`) waits for a transaction that itself waits for a lock held by
/// the coordinator (`coord`), which waits for slot creation in this process. Checked twice a second on
/// a connection of its own; never returns otherwise.
async fn lock_cycle(conn: &ConnSpec, coord: i32, walsender: i32) -> CliError {
    let client = match conn.connect().await {
        Ok(c) => c,
        Err(_) => return std::future::pending().await,
    };
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let row = client
            .query_opt(
                "SELECT w.pid, pg_catalog.left(coalesce(a.query, ''), 200) \
                 FROM pg_catalog.unnest(pg_catalog.pg_blocking_pids($2)) AS w(pid) \
                 LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = w.pid \
                 WHERE $1 = ANY (pg_catalog.pg_blocking_pids(w.pid)) LIMIT 1",
                &[&coord, &walsender],
            )
            .await;
        if let Ok(Some(r)) = row {
            let (pid, query): (i32, String) = (r.get(0), r.get(1));
            return CliError::Other(anyhow::anyhow!(
                "the replication slot waits for the transaction of pid {pid}, which waits for a lock this snapshot holds ({query}); \
                 run again once that transaction has ended"
            ));
        }
    }
}

/// The output directory and whether this run created it.
struct OutputDir {
    path: PathBuf,
    created: bool,
}

impl OutputDir {
    /// Same rules as the server: the parent must exist; the directory must be missing (created 0700)
    /// or empty.
    fn prepare(path: &Path) -> Result<Self, CliError> {
        let path = std::path::absolute(path).map_err(CliError::io("resolve", path))?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            return Err(CliError::Other(anyhow::anyhow!(
                "the parent directory of --output does not exist: {}",
                parent.display()
            )));
        }
        match std::fs::read_dir(&path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(CliError::Other(anyhow::anyhow!(
                        "--output {} exists and is not empty; a snapshot is never written over another",
                        path.display()
                    )));
                }
                Ok(OutputDir { path, created: false })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(CliError::io("create", &path))?;
                Ok(OutputDir { path, created: true })
            }
            Err(e) => Err(CliError::Io { op: "open", path, source: e }),
        }
    }

    /// Removes what this run wrote: the directory when it created it, else everything inside (it was
    /// empty before).
    fn remove_partial(&self) -> std::io::Result<()> {
        if self.created {
            return std::fs::remove_dir_all(&self.path);
        }
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
}

/// Facts about the source (the engine's `SERVER_INFO_SQL`).
struct ServerInfo {
    server_version: String,
    server_version_num: u32,
    database: String,
    system_identifier: String,
    encoding: String,
    timezone: String,
    block_size: u64,
}

async fn server_info(client: &Client) -> Result<ServerInfo, CliError> {
    let r = client.query_one(SERVER_INFO_SQL, &[]).await.map_err(CliError::query("reading server facts"))?;
    Ok(ServerInfo {
        server_version: r.try_get(0).unwrap_or_default(),
        server_version_num: r.try_get::<_, i32>(1).unwrap_or(0).max(0) as u32,
        database: r.try_get(2).unwrap_or_default(),
        system_identifier: r.try_get::<_, Option<String>>(3).ok().flatten().unwrap_or_default(),
        encoding: r.try_get(4).unwrap_or_default(),
        timezone: r.try_get(5).unwrap_or_default(),
        block_size: r.try_get::<_, i64>(6).unwrap_or(8192).max(1) as u64,
    })
}

async fn table_rows(client: &Client) -> Result<Vec<TableRow>, CliError> {
    let rows = client.query(TABLES_SQL, &[]).await.map_err(CliError::query("listing tables"))?;
    let n =
        |r: &tokio_postgres::Row, i| r.try_get::<_, Option<i64>>(i).ok().flatten().unwrap_or(0).max(0) as u64;
    Ok(rows
        .iter()
        .map(|r| TableRow {
            oid: n(r, 0) as u32,
            schema: r.try_get(1).unwrap_or_default(),
            name: r.try_get(2).unwrap_or_default(),
            relkind: r.try_get(3).unwrap_or_default(),
            heap_bytes: n(r, 4),
            toast_bytes: n(r, 5),
            est_rows: n(r, 6),
            can_select: r.try_get::<_, Option<bool>>(7).ok().flatten().unwrap_or(false),
            column_names: r.try_get::<_, Option<Vec<String>>>(8).ok().flatten().unwrap_or_default(),
            column_types: r.try_get::<_, Option<Vec<String>>>(9).ok().flatten().unwrap_or_default(),
            extension_member: r.try_get::<_, Option<bool>>(10).ok().flatten().unwrap_or(false),
            rls_active: r.try_get::<_, Option<bool>>(11).ok().flatten().unwrap_or(false),
        })
        .collect())
}

pub(crate) async fn sequence_rows(client: &Client) -> Result<Vec<SequenceRow>, CliError> {
    let rows = client.query(SEQUENCES_SQL, &[]).await.map_err(CliError::query("listing sequences"))?;
    Ok(rows
        .iter()
        .map(|r| SequenceRow {
            schema: r.try_get(0).unwrap_or_default(),
            name: r.try_get(1).unwrap_or_default(),
            start_value: r.try_get::<_, Option<i64>>(2).ok().flatten().unwrap_or(1),
            last_value: r.try_get::<_, Option<i64>>(3).ok().flatten(),
            can_select: r.try_get::<_, Option<bool>>(4).ok().flatten().unwrap_or(false),
            owner_table: r.try_get::<_, Option<i64>>(5).ok().flatten().map(|o| o as u32),
        })
        .collect())
}

fn selection_error(e: SelectionError) -> CliError {
    CliError::Other(anyhow::anyhow!("cannot snapshot: {e}"))
}

/// Locks `tables`: LOCK TABLE ONLY for tables (before the snapshot, it takes none); materialized views
/// cannot be LOCKed and get their ACCESS SHARE lock from a `SELECT ... LIMIT 0`.
async fn lock(
    client: &Client,
    tables: &[&TableMeta],
    relkinds: &HashMap<u32, String>,
) -> Result<(), CliError> {
    let (plain, views): (Vec<&&TableMeta>, Vec<&&TableMeta>) =
        tables.iter().partition(|t| relkinds.get(&t.oid).map(String::as_str) != Some("m"));
    for batch in plain.chunks(LOCK_BATCH) {
        let names: Vec<String> = batch.iter().map(|t| qualified(t).to_string()).collect();
        let sql = format!("LOCK TABLE ONLY {} IN ACCESS SHARE MODE", names.join(", ONLY "));
        session::run(client, &sql, "locking the tables").await?;
    }
    for v in views {
        let sql = format!("SELECT FROM {} LIMIT 0", qualified(v));
        session::run(client, &sql, &format!("locking {}", qualified(v))).await?;
    }
    Ok(())
}

fn qualified(t: &TableMeta) -> QualifiedName {
    QualifiedName::new(t.schema.clone(), t.name.clone())
}

/// The snapshot, taken and exported, with what it contains.
struct Taken {
    info: ServerInfo,
    tables: Vec<TableMeta>,
    lsn: String,
    exported: String,
}

/// Step 1 (see the module documentation). With a slot, the snapshot is the slot's: the replication
/// connection creates it (after the tables are locked, as a new snapshot would be taken after them)
/// and the coordinating transaction imports it before its first query; the LSN is the slot's
/// consistent point.
async fn take_snapshot(
    job: &GenerateJob,
    coord: &Client,
    slot_created: &AtomicBool,
) -> Result<Taken, CliError> {
    let info = server_info(coord).await?;
    let rows = table_rows(coord).await?;
    let relkinds: HashMap<u32, String> = rows.iter().map(|r| (r.oid, r.relkind.clone())).collect();
    let prelisted = catalog::select_tables(rows, &job.patterns, info.block_size).map_err(selection_error)?;
    session::run(coord, &session::pinned(&info.timezone, ""), "pinning session settings").await?;
    let replication = match &job.slot {
        Some(_) => {
            let spec = job.conn.clone();
            Some(
                tokio::task::spawn_blocking(move || ReplicationConn::connect(&spec))
                    .await
                    .map_err(|e| CliError::Other(anyhow::anyhow!("replication connection thread: {e}")))??,
            )
        }
        None => None,
    };
    // (Read before the transaction: SET TRANSACTION SNAPSHOT must come before its first query.)
    let coord_pid: i32 = coord
        .query_one("SELECT pg_catalog.pg_backend_pid()", &[])
        .await
        .map_err(CliError::query("reading the coordinator's pid"))?
        .get(0);
    session::run(
        coord,
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        "starting the snapshot transaction",
    )
    .await?;
    // A materialized view is locked by a query, which would take a snapshot: with a slot, those are
    // locked once the slot's snapshot is imported.
    let prelocked: Vec<&TableMeta> = prelisted
        .iter()
        .filter(|t| job.slot.is_none() || relkinds.get(&t.oid).map(String::as_str) != Some("m"))
        .collect();
    lock(coord, &prelocked, &relkinds).await?;
    let slot_lsn = match (&job.slot, replication) {
        (Some(name), Some(replication)) => {
            slot_created.store(true, Ordering::Release);
            let walsender = replication.backend_pid();
            let (replication, created) = tokio::select! {
                r = replication.create_slot(name) => match r {
                    Ok(created) => created,
                    Err(e) => {
                        // Another's slot of that name: not ours to drop.
                        if e.to_string().contains("already exists") {
                            slot_created.store(false, Ordering::Release);
                        }
                        return Err(e);
                    }
                },
                cycle = lock_cycle(&job.conn, coord_pid, walsender) => return Err(cycle),
            };
            let sql = format!("SET TRANSACTION SNAPSHOT {}", quote_literal(&created.snapshot_name));
            session::run(coord, &sql, "importing the slot's snapshot").await?;
            drop(replication);
            Some(created.consistent_point)
        }
        _ => None,
    };
    // The first statement that needs a snapshot: from here on everything reads under it.
    let rows = table_rows(coord).await?;
    let mut relkinds = relkinds;
    relkinds.extend(rows.iter().map(|r| (r.oid, r.relkind.clone())));
    let tables = catalog::select_tables(rows, &job.patterns, info.block_size).map_err(selection_error)?;
    let late: Vec<&TableMeta> = tables.iter().filter(|t| !prelocked.iter().any(|p| p.oid == t.oid)).collect();
    lock(coord, &late, &relkinds).await?;
    let lsn: String = match slot_lsn {
        Some(lsn) => lsn,
        None => {
            coord.query_one(LSN_SQL, &[]).await.map_err(CliError::query("reading the WAL position"))?.get(0)
        }
    };
    let exported: String = coord
        .query_one("SELECT pg_catalog.pg_export_snapshot()", &[])
        .await
        .map_err(CliError::query("exporting the snapshot"))?
        .get(0);
    Ok(Taken { info, tables, lsn, exported })
}

/// One planned chunk, ready to run.
struct ChunkJob {
    table: usize,
    sql: String,
    rel_path: String,
    label: String,
    /// Heap blocks the chunk covers (progress units).
    units: u64,
    /// Heap plus TOAST bytes per block of its table (to estimate progress inside a chunk).
    bytes_per_block: u64,
}

/// What the workers share.
struct Work {
    dir: PathBuf,
    compression: Compression,
    chunks: Vec<ChunkJob>,
    cursor: AtomicUsize,
    results: Mutex<Vec<Option<ChunkStats>>>,
    tables_left: Vec<AtomicU64>,
    stats: Stats,
}

/// The COPY statement of chunk `[start, end)` of a table.
fn copy_sql(t: &TableMeta, start: u32, end: Option<u32>) -> String {
    let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let range = match end {
        Some(e) => format!("ctid >= '({start},0)'::tid AND ctid < '({e},0)'::tid"),
        None => format!("ctid >= '({start},0)'::tid"),
    };
    format!("COPY (SELECT {} FROM ONLY {} WHERE {range}) TO STDOUT", cols.join(", "), qualified(t))
}

/// Opens `n` worker connections that have imported `exported`; keeps going with fewer when the
/// server refuses some connections (e.g. max_connections), failing only when none opens.
async fn open_workers(
    conn: &ConnSpec,
    n: usize,
    settings: &str,
    exported: &str,
    reporter: &mut dyn Reporter,
) -> Result<Vec<Client>, CliError> {
    let open = |_| async {
        let client = conn.connect().await?;
        session::run(&client, settings, "pinning worker settings").await?;
        session::run(
            &client,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            "starting a worker transaction",
        )
        .await?;
        let sql = format!("SET TRANSACTION SNAPSHOT {}", quote_literal(exported));
        session::run(&client, &sql, "importing the exported snapshot").await?;
        Ok::<Client, CliError>(client)
    };
    let results = futures_util::future::join_all((0..n).map(open)).await;
    let mut clients = Vec::new();
    let mut refused = None;
    for r in results {
        match r {
            Ok(c) => clients.push(c),
            Err(e @ CliError::Connect { .. }) => refused = Some(e),
            Err(e) => return Err(e),
        }
    }
    match (clients.is_empty(), refused) {
        (true, Some(e)) => Err(e),
        (false, Some(e)) => {
            reporter
                .note(&format!("only {} of {n} worker connections opened ({e}); continuing", clients.len()));
            Ok(clients)
        }
        _ => Ok(clients),
    }
}

/// Steps 1 to 4; returns the summary.
async fn generate(
    job: &GenerateJob,
    coord: &Client,
    dir: &Path,
    id: &str,
    reporter: &mut dyn Reporter,
    interrupt: &mut Interrupt,
    slot_created: &AtomicBool,
) -> Result<Summary, CliError> {
    let created_at = chrono::Utc::now();
    let cancelled = |detail: &str| CliError::Cancelled {
        op: "generate".into(),
        id: id.to_string(),
        detail: Some(detail.into()),
    };
    let taken = tokio::select! {
        r = take_snapshot(job, coord, slot_created) => r?,
        sig = interrupt.recv() => return Err(cancelled(&format!("{sig} while taking the snapshot"))),
    };
    let Taken { info, tables, lsn, exported } = taken;

    // The planning rule the server's generate uses, so both modes plan identical chunks.
    let (plan, chunk_bytes) =
        steep_repl_engine::catalog::plan_snapshot(&tables, job.chunk_bytes, job.parallel)
            .map_err(|e| CliError::engine("planning chunks")(e.into()))?;
    let metas: Vec<&TableMeta> = plan
        .tables
        .iter()
        .filter_map(|s| tables.iter().find(|t| t.schema == s.schema && t.name == s.name))
        .collect();
    if metas.len() != plan.tables.len() {
        return Err(CliError::Other(anyhow::anyhow!("the planner returned a table that was not listed")));
    }
    let chunks: Vec<ChunkJob> = plan
        .chunks
        .iter()
        .map(|c| {
            let t = metas[c.table];
            let end = c.block_end.unwrap_or(t.blocks);
            ChunkJob {
                table: c.table,
                sql: copy_sql(t, c.block_start, c.block_end),
                rel_path: chunk_rel_path(&table_dir(&t.schema, &t.name), c.index, &job.compression),
                label: format!("chunk {} of {}", c.index, qualified(t)),
                units: u64::from(end.saturating_sub(c.block_start)).max(1),
                bytes_per_block: (t.heap_bytes.saturating_add(t.toast_bytes) / u64::from(t.blocks.max(1)))
                    .max(1),
            }
        })
        .collect();
    let n = (job.parallel as usize).min(chunks.len());
    let settings =
        format!("{}{}", session::pinned(&info.timezone, &info.encoding), session::READ_IN_PHYSICAL_ORDER);
    let workers = tokio::select! {
        r = open_workers(&job.conn, n, &settings, &exported, reporter) => r?,
        sig = interrupt.recv() => return Err(cancelled(&format!("{sig} while opening worker connections"))),
    };
    let used = workers.len();
    let mut tables_left: Vec<AtomicU64> = (0..metas.len()).map(|_| AtomicU64::new(0)).collect();
    for c in &chunks {
        *tables_left[c.table].get_mut() += 1;
    }
    let totals = (chunks.iter().map(|c| c.units).sum(), chunks.len() as u64, metas.len() as u64);
    let work = Arc::new(Work {
        dir: dir.to_path_buf(),
        compression: job.compression,
        results: Mutex::new(vec![None; chunks.len()]),
        chunks,
        cursor: AtomicUsize::new(0),
        tables_left,
        stats: Stats::new("generate", id, used, totals),
    });
    work.stats.set_phase("data");

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut set: JoinSet<Result<(), CliError>> = JoinSet::new();
    for (w, client) in workers.into_iter().enumerate() {
        set.spawn(worker(w, client, Arc::clone(&work), stop_rx.clone()));
    }
    let failure = super::pool::run_workers(
        set,
        &stop_tx,
        interrupt,
        |sig| cancelled(&format!("{sig}; the partial snapshot was removed")),
        REPORT_EVERY,
        || reporter.update(&work.stats.update("running")),
    )
    .await;
    if let Some(e) = failure {
        return Err(e);
    }

    work.stats.set_phase("sequences");
    reporter.update(&work.stats.update("running"));
    let table_oids: Vec<u32> = metas.iter().map(|m| m.oid).collect();
    let sequences = catalog::select_sequences(sequence_rows(coord).await?, &job.patterns, &table_oids)
        .map_err(selection_error)?;
    session::run(coord, "COMMIT", "ending the snapshot transaction").await?;

    work.stats.set_phase("finalizing");
    reporter.update(&work.stats.update("running"));
    let mut entries: Vec<TableEntry> =
        metas.iter().map(|m| TableEntry::new(m.schema.clone(), m.name.clone(), m.columns.clone())).collect();
    {
        let mut results =
            work.results.lock().map_err(|_| CliError::Other(anyhow::anyhow!("a worker panicked")))?;
        for (k, c) in plan.chunks.iter().enumerate() {
            let stats = results[k].take().ok_or_else(|| {
                CliError::Other(anyhow::anyhow!("{} was never written", work.chunks[k].label))
            })?;
            entries[c.table].chunks.push(ChunkEntry::from_stats(c.index, c.block_start, c.block_end, stats));
        }
    }
    entries.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    let mut settings: BTreeMap<String, String> =
        PINNED_SETTINGS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    settings.insert("TimeZone".into(), info.timezone.clone());
    settings.insert("server_encoding".into(), info.encoding.clone());
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        snapshot_id: id.to_string(),
        created_at,
        finished_at: chrono::Utc::now(),
        source: Source {
            server_version: info.server_version,
            server_version_num: info.server_version_num,
            database: info.database,
            system_identifier: info.system_identifier,
        },
        snapshot: SnapshotInfo {
            lsn,
            exported_snapshot: exported,
            plugin: job.slot.as_ref().map(|_| super::replication::PLUGIN.to_string()),
            replication_slot: job.slot.clone(),
        },
        settings,
        compression: job.compression,
        parallel: Parallelism { requested: job.parallel, used: used.max(1) as u32 },
        chunk_size_bytes: chunk_bytes,
        mode: Mode::Client,
        tables: entries,
        sequences,
        totals: Default::default(),
    };
    manifest.refresh_totals();
    let dir_owned = dir.to_path_buf();
    let to_write = manifest.clone();
    tokio::task::spawn_blocking(move || -> Result<(), CliError> {
        remove_leftover_temp_files(&dir_owned).map_err(CliError::engine("cleaning temporary files"))?;
        to_write.write_atomic(&dir_owned).map_err(|e| CliError::engine("writing the manifest")(e.into()))
    })
    .await
    .map_err(|e| CliError::Other(anyhow::anyhow!("writing the manifest: {e}")))??;

    let u = work.stats.update("complete");
    reporter.update(&u);
    let elapsed = work.stats.elapsed_s();
    Ok(Summary {
        op: "generate".into(),
        id: id.to_string(),
        mode: "client".into(),
        status: "complete".into(),
        path: Some(dir.display().to_string()),
        error: None,
        exit_code: 0,
        elapsed_s: elapsed,
        tables: manifest.totals.tables,
        chunks: manifest.totals.chunks,
        rows: manifest.totals.rows,
        bytes: manifest.totals.raw_bytes,
        bytes_written: manifest.totals.file_bytes,
        bytes_per_s: manifest.totals.raw_bytes as f64 / elapsed.max(1e-3),
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
            break;
        };
        let Some(stats) = copy_chunk(w, &client, &work, chunk, &mut stop).await? else {
            return Ok(());
        };
        work.stats.file_bytes.fetch_add(stats.file_bytes, Ordering::Relaxed);
        work.stats.chunk_done(w, chunk.units);
        if work.tables_left[chunk.table].fetch_sub(1, Ordering::Relaxed) == 1 {
            work.stats.tables_done.fetch_add(1, Ordering::Relaxed);
        }
        match work.results.lock() {
            Ok(mut results) => results[k] = Some(stats),
            Err(_) => return Err(CliError::Other(anyhow::anyhow!("a worker panicked"))),
        }
    }
    session::run(&client, "COMMIT", "ending a worker transaction").await
}

/// A message to a chunk's writer thread.
enum ToWriter {
    Data(Vec<u8>),
    Finish,
}

/// The writer thread: everything received goes into the chunk file; without `Finish` the file is
/// abandoned (its temporary file removed) and `None` returned.
fn write_chunk(
    dir: &Path,
    rel_path: &str,
    compression: Compression,
    mut rx: mpsc::Receiver<ToWriter>,
) -> Result<Option<ChunkStats>, steep_repl_engine::Error> {
    let mut writer = ChunkWriter::create(dir, rel_path, compression)?;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            ToWriter::Data(bytes) => writer
                .write_all(&bytes)
                .map_err(|e| steep_repl_engine::Error::io("write", dir.join(rel_path), e))?,
            ToWriter::Finish => return writer.finish().map(Some),
        }
    }
    writer.abort();
    Ok(None)
}

/// How the reading side of a chunk ended.
enum ReadEnd {
    Done,
    Stopped,
    WriterGone,
}

/// Streams one chunk into its file; `None` when the job stopped meanwhile.
async fn copy_chunk(
    w: usize,
    client: &Client,
    work: &Work,
    chunk: &ChunkJob,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<ChunkStats>, CliError> {
    let (tx, rx) = mpsc::channel::<ToWriter>(WRITE_QUEUE);
    let (dir, rel, compression) = (work.dir.clone(), chunk.rel_path.clone(), work.compression);
    let writer = tokio::task::spawn_blocking(move || write_chunk(&dir, &rel, compression, rx));
    let read = read_chunk(w, client, work, chunk, stop, &tx).await;
    drop(tx);
    let written =
        writer.await.map_err(|e| CliError::Other(anyhow::anyhow!("{}: writer thread: {e}", chunk.label)))?;
    let written = written.map_err(CliError::engine(chunk.label.clone()))?;
    match (read?, written) {
        (ReadEnd::Done, Some(stats)) => Ok(Some(stats)),
        (ReadEnd::Stopped, _) => Ok(None),
        (_, _) => Err(CliError::Other(anyhow::anyhow!("{}: the writer stopped early", chunk.label))),
    }
}

/// The reading side of [`copy_chunk`]: COPY rows, batched, into the writer's queue.
async fn read_chunk(
    w: usize,
    client: &Client,
    work: &Work,
    chunk: &ChunkJob,
    stop: &mut watch::Receiver<bool>,
    tx: &mpsc::Sender<ToWriter>,
) -> Result<ReadEnd, CliError> {
    let stream = client.copy_out(&chunk.sql).await.map_err(CliError::query(chunk.label.clone()))?;
    let mut stream = std::pin::pin!(stream);
    let mut buf = Vec::with_capacity(BATCH_BYTES + BATCH_BYTES / 8);
    let (mut rows, mut chunk_bytes) = (0u64, 0u64);
    let stats = &work.stats;
    loop {
        let item = tokio::select! {
            biased;
            _ = stop.changed() => return Ok(ReadEnd::Stopped),
            item = stream.next() => item,
        };
        let last = match item {
            Some(Ok(row)) => {
                buf.extend_from_slice(&row);
                rows += 1;
                false
            }
            Some(Err(e)) => return Err(CliError::query(chunk.label.clone())(e)),
            None => true,
        };
        if buf.len() >= BATCH_BYTES || (last && !buf.is_empty()) {
            chunk_bytes += buf.len() as u64;
            stats.rows.fetch_add(rows, Ordering::Relaxed);
            stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            rows = 0;
            if let Some(slot) = stats.in_flight.get(w) {
                slot.store((chunk_bytes / chunk.bytes_per_block).min(chunk.units), Ordering::Relaxed);
            }
            let batch = std::mem::replace(&mut buf, Vec::with_capacity(BATCH_BYTES + BATCH_BYTES / 8));
            if tx.send(ToWriter::Data(batch)).await.is_err() {
                return Ok(ReadEnd::WriterGone);
            }
        }
        if last {
            break;
        }
    }
    if tx.send(ToWriter::Finish).await.is_err() {
        return Ok(ReadEnd::WriterGone);
    }
    Ok(ReadEnd::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use steep_repl_engine::manifest::Column;

    #[test]
    fn copy_statements_quote_everything() {
        let t = TableMeta {
            oid: 1,
            schema: "My Schema".into(),
            name: "odd\"name".into(),
            blocks: 10,
            heap_bytes: 81920,
            toast_bytes: 0,
            est_rows: 5,
            columns: vec![
                Column { name: "id".into(), type_name: "integer".into() },
                Column { name: "Weird Col".into(), type_name: "text".into() },
            ],
        };
        assert_eq!(
            copy_sql(&t, 0, Some(4)),
            "COPY (SELECT \"id\", \"Weird Col\" FROM ONLY \"My Schema\".\"odd\"\"name\" \
             WHERE ctid >= '(0,0)'::tid AND ctid < '(4,0)'::tid) TO STDOUT"
        );
        assert!(copy_sql(&t, 4, None).ends_with("WHERE ctid >= '(4,0)'::tid) TO STDOUT"));
    }

    #[test]
    fn output_dir_rules() {
        let base = tempfile::tempdir().unwrap();
        let fresh = base.path().join("snap");
        let out = OutputDir::prepare(&fresh).unwrap();
        assert!(out.created && fresh.is_dir());
        std::fs::create_dir_all(fresh.join("data/x")).unwrap();
        std::fs::write(fresh.join("data/x/1"), b"x").unwrap();
        let err = OutputDir::prepare(&fresh).err().unwrap();
        assert!(err.to_string().contains("not empty"), "{err}");
        out.remove_partial().unwrap();
        assert!(!fresh.exists());
        let err = OutputDir::prepare(&base.path().join("no/such")).err().unwrap();
        assert!(err.to_string().contains("parent directory"), "{err}");
        std::fs::create_dir(&fresh).unwrap();
        let kept = OutputDir::prepare(&fresh).unwrap();
        std::fs::write(fresh.join("manifest.json"), b"{}").unwrap();
        kept.remove_partial().unwrap();
        assert!(fresh.is_dir() && std::fs::read_dir(&fresh).unwrap().next().is_none());
    }
}

//! Bookkeeping: every statement steep_repl runs on its own tables, in one place.
//!
//! Writes go through [`rights::as_owner`] (a caller needs no privileges on these tables, and PUBLIC may
//! only read them); reads of the PUBLIC-readable tables run as the caller. Either way every statement
//! runs with `search_path` pinned to `pg_catalog, pg_temp` (by the SQL function's definition, by the
//! worker's session, and again by `as_owner`) and names its tables with their schema and its
//! functions and casts with `pg_catalog`, so nothing resolves through a schema a role controls.
//!
//! The tables (extension/sql/schema.sql): `snapshots` (one row per operation), `work_queue` (its
//! queue entry), `apply_chunks` (ranges of rows an apply has loaded, committed with the rows),
//! `apply_targets` (which apply last loaded each table), `apply_deferred_indexes` (indexes an apply
//! builds after its data, [`indexes`]), and `operation_errors` (the full text of an
//! error whose public form in `snapshots.error` leaves out row data; readable by the owner alone).
//! The node registry's statements (`nodes`, extension/sql/nodes.sql) are in [`nodes`].

pub mod indexes;
pub mod nodes;
pub mod overlap;
pub mod replica;

use std::sync::atomic::Ordering;

use pgrx::prelude::*;

use crate::pg::rights::as_owner;
use crate::shmem::JobSlot;

/// Figures persisted in an operation's row.
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

/// A new operation's row.
pub struct NewOperation<'a> {
    pub id: &'a str,
    /// `generate` or `apply`.
    pub op: &'a str,
    pub path: &'a str,
    pub parallel: i32,
    pub compression: &'a str,
    /// JSON object of the operation's options.
    pub options: &'a str,
    pub role_name: &'a str,
    pub tables_total: i32,
    pub chunks_total: i32,
}

/// Inserts an operation's row and its work-queue entry, `pending`, in the current transaction.
pub fn insert_operation(o: &NewOperation) {
    as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO steep_repl.snapshots (id, op, status, phase, path, parallel_requested, compression, \
             options, role_name, tables_total, chunks_total, role_oid) \
             VALUES ($1, $2, 'pending', 'queued', $3, $4, $5, $6::pg_catalog.jsonb, $7, $8, $9, $10)",
            &[
                o.id.into(),
                o.op.into(),
                o.path.into(),
                o.parallel.into(),
                o.compression.into(),
                o.options.into(),
                o.role_name.into(),
                o.tables_total.into(),
                o.chunks_total.into(),
                pgrx::pg_sys::Oid::from(crate::pg::current_user_oid()).into(),
            ],
        )?;
        Spi::run_with_args(
            "INSERT INTO steep_repl.work_queue (snapshot_id, op, payload) VALUES ($1, $2, $3::pg_catalog.jsonb)",
            &[o.id.into(), o.op.into(), o.options.into()],
        )
    })
    .unwrap_or_else(|e| error!("recording operation {}: {e}", o.id));
}

/// Writes the job's figures into its row, with `status` when given (`running` also sets started_at
/// and the queue entry's status). `end` is Some((public error, full error)) when the job has ended:
/// error and finished_at are written too, and the full text goes to `operation_errors` when it differs.
fn update_row(id: &str, status: Option<&str>, end: Option<Option<(&str, &str)>>, f: &Figures) {
    let public = end.flatten().map(|(p, _)| p);
    let full = end.flatten().map(|(_, full)| full).filter(|full| Some(*full) != public);
    as_owner(|| -> Result<(), pgrx::spi::Error> {
        Spi::run_with_args(
            "UPDATE steep_repl.snapshots SET phase = $2, tables_total = $3, tables_done = $4, chunks_total = $5, \
             chunks_done = $6, rows_done = $7, bytes_done = $8, bytes_written = $9, updated_at = pg_catalog.now(), \
             status = coalesce($10, status), \
             started_at = CASE WHEN $10 = 'running' THEN coalesce(started_at, pg_catalog.now()) ELSE started_at END, \
             error = CASE WHEN $11 THEN $12 ELSE error END, \
             finished_at = CASE WHEN $11 THEN pg_catalog.now() ELSE finished_at END \
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
                public.into(),
            ],
        )?;
        if status == Some("running") {
            Spi::run_with_args(
                "UPDATE steep_repl.work_queue SET status = 'running', \
                 started_at = coalesce(started_at, pg_catalog.now()) WHERE snapshot_id = $1",
                &[id.into()],
            )?;
        }
        if end.is_some() {
            Spi::run_with_args("DELETE FROM steep_repl.operation_errors WHERE id = $1", &[id.into()])?;
            if let Some(full) = full {
                Spi::run_with_args(
                    "INSERT INTO steep_repl.operation_errors (id, error) VALUES ($1, $2)",
                    &[id.into(), full.into()],
                )?;
            }
        }
        Ok(())
    })
    .unwrap_or_else(|e| error!("updating steep_repl.snapshots for {id}: {e}"));
}

/// Updates the job's row with live figures (and status/started_at when given). Call in a transaction.
pub fn persist(id: &str, status: Option<&str>, f: &Figures) {
    update_row(id, status, None, f);
}

/// Records a job's end: `status` is complete, applied, failed or cancelled; `error` is (what every role
/// may read, the full text). Call in a transaction.
pub fn record_end(id: &str, status: &str, error: Option<(&str, &str)>, f: &Figures) {
    update_row(id, Some(status), Some(error), f);
    let queue_status = if status == "applied" { "complete" } else { status };
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE steep_repl.work_queue SET status = $2, error = $3, finished_at = pg_catalog.now() \
             WHERE snapshot_id = $1",
            &[id.into(), queue_status.into(), error.map(|(public, _)| public).into()],
        )
    })
    .unwrap_or_else(|e| error!("recording the end of {id}: {e}"));
}

/// Records, in the transaction that emptied them, that apply `id` has truncated its target tables.
pub fn mark_truncated(id: &str) {
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE steep_repl.snapshots SET options = options || '{\"truncated\": true}'::pg_catalog.jsonb \
             WHERE id = $1",
            &[id.into()],
        )
    })
    .unwrap_or_else(|e| error!("recording that {id} truncated its tables: {e}"));
}

/// `pending`/`running` operations of this database: (id, whether the row was written under the current
/// server start).
pub fn unfinished_operations() -> Vec<(String, bool)> {
    Spi::connect(|client| -> Result<Vec<(String, bool)>, pgrx::spi::Error> {
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
    .unwrap_or_default()
}

/// Marks an unfinished operation failed with `reason` (it stays as it is if it has ended meanwhile).
pub fn mark_interrupted(id: &str, reason: &str) {
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE steep_repl.snapshots SET status = 'failed', finished_at = pg_catalog.now(), \
             updated_at = pg_catalog.now(), error = $2 OPERATOR(pg_catalog.||) coalesce(( \
               SELECT pg_catalog.format('; %s deferred indexes are not built yet (%s): \
                                         steep_repl.resume_apply(%L) builds them', \
                                        pg_catalog.count(*), pg_catalog.string_agg(d.index_name, ', '), $1) \
               FROM steep_repl.apply_deferred_indexes d WHERE d.apply_id = $1 HAVING pg_catalog.count(*) > 0), '') \
             WHERE id = $1 AND status IN ('pending', 'running')",
            &[id.into(), reason.into()],
        )?;
        Spi::run_with_args(
            "UPDATE steep_repl.work_queue SET status = 'failed', error = $2, finished_at = pg_catalog.now() \
             WHERE snapshot_id = $1 AND status IN ('pending', 'running')",
            &[id.into(), reason.into()],
        )?;
        // A generate with a slot that died after making the slot permanent (just before its manifest)
        // leaves that slot behind, retaining WAL for ever: it goes with the job. Only a slot of this
        // database that nobody uses, and only when this role may drop slots (else the next reap, by
        // the supervisor, does it).
        Spi::run_with_args(
            "SELECT pg_catalog.pg_drop_replication_slot(s.slot_name) FROM steep_repl.snapshots o \
             JOIN pg_catalog.pg_replication_slots s ON s.slot_name = (o.options->>'slot') \
             WHERE o.id = $1 AND o.op = 'generate' AND NOT s.active \
               AND s.database = pg_catalog.current_database() \
               AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER \
                           AND (r.rolsuper OR r.rolreplication))",
            &[id.into()],
        )
    })
    .unwrap_or_else(|e| error!("marking {id} interrupted: {e}"));
}

/// What the row of an operation says about it.
#[derive(Debug, Clone)]
pub struct Operation {
    pub op: String,
    pub status: String,
    pub path: String,
    pub role_name: String,
    /// The role's oid (None for rows written before it was recorded).
    pub role_oid: Option<u32>,
    pub parallel: i32,
    pub options: serde_json::Value,
}

impl Operation {
    /// Whether the current user may act for the operation's role: read its full error, cancel or
    /// resume it (the role itself, its members, superusers). Decided by the role's oid; for rows from
    /// before it was recorded, by name.
    pub fn current_user_acts_for_role(&self) -> bool {
        let role = self.role_oid.or_else(|| {
            Spi::get_one_with_args::<pgrx::pg_sys::Oid>(
                "SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = $1::pg_catalog.name",
                &[self.role_name.as_str().into()],
            )
            .ok()
            .flatten()
            .map(|o| o.to_u32())
        });
        match role {
            Some(r) => crate::pg::rights::acts_for(r),
            None => crate::pg::rights::is_superuser(),
        }
    }
}

/// The operation `id`, if it exists.
pub fn operation(id: &str) -> Option<Operation> {
    Spi::connect(|c| -> Result<Option<Operation>, pgrx::spi::Error> {
        let t = c.select(
            "SELECT op, status, path, role_name::pg_catalog.text, parallel_requested, options::pg_catalog.text, \
             role_oid FROM steep_repl.snapshots WHERE id = $1",
            Some(1),
            &[id.into()],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let r = t.first();
        Ok(Some(Operation {
            op: r.get::<String>(1)?.unwrap_or_default(),
            status: r.get::<String>(2)?.unwrap_or_default(),
            path: r.get::<String>(3)?.unwrap_or_default(),
            role_name: r.get::<String>(4)?.unwrap_or_default(),
            role_oid: r.get::<pgrx::pg_sys::Oid>(7)?.map(|o| o.to_u32()),
            parallel: r.get::<i32>(5)?.unwrap_or(4),
            options: r
                .get::<String>(6)?
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or(serde_json::Value::Null),
        }))
    })
    .unwrap_or_else(|e| error!("reading operation {id}: {e}"))
}

/// Moves a failed or cancelled apply back to `pending` for a resume, atomically: of two concurrent
/// resumes, the second waits for the first's transaction and then finds the row `pending` and is
/// refused. Returns the row as it was, or the status that made the resume impossible.
pub fn begin_resume(id: &str) -> Result<Operation, String> {
    let moved = as_owner(|| {
        Spi::get_one_with_args::<String>(
            "UPDATE steep_repl.snapshots SET status = 'pending', phase = 'queued', error = NULL, \
             finished_at = NULL, updated_at = pg_catalog.now(), \
             postmaster_start = pg_catalog.pg_postmaster_start_time() \
             WHERE id = $1 AND op = 'apply' AND status IN ('failed', 'cancelled') RETURNING id",
            &[id.into()],
        )
    })
    .unwrap_or_else(|e| error!("recording the resume of {id}: {e}"));
    let row = operation(id).ok_or_else(|| "missing".to_string())?;
    if moved.is_none() {
        return Err(row.status);
    }
    as_owner(|| {
        Spi::run_with_args("DELETE FROM steep_repl.operation_errors WHERE id = $1", &[id.into()])?;
        Spi::run_with_args(
            "UPDATE steep_repl.work_queue SET status = 'pending', error = NULL, finished_at = NULL \
             WHERE snapshot_id = $1",
            &[id.into()],
        )
    })
    .unwrap_or_else(|e| error!("recording the resume of {id}: {e}"));
    Ok(row)
}

/// The tables of `$2` (oids) that apply `$1` does not hold, with their holder ('' when none).
const NOT_HELD_SQL: &str = "SELECT w.relid, coalesce(t.apply_id, '') \
     FROM pg_catalog.unnest($2::pg_catalog.oid[]) AS w(relid) \
     LEFT JOIN steep_repl.apply_targets t ON t.relid OPERATOR(pg_catalog.=) w.relid \
     WHERE t.apply_id IS DISTINCT FROM $1";

/// The tables of `relids` that apply `id` no longer holds (another apply loaded them since, or they were
/// created again), each with its holder ('' when none): what `claim_targets` refuses a resume for.
pub fn not_held(id: &str, relids: &[u32]) -> Vec<(u32, String)> {
    let oids: Vec<pgrx::pg_sys::Oid> = relids.iter().map(|&r| pgrx::pg_sys::Oid::from(r)).collect();
    Spi::connect(|c| -> Result<Vec<(u32, String)>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for r in c.select(NOT_HELD_SQL, None, &[id.into(), oids.into()])? {
            v.push((
                r.get::<pgrx::pg_sys::Oid>(1)?.map(|o| o.to_u32()).unwrap_or(0),
                r.get::<String>(2)?.unwrap_or_default(),
            ));
        }
        Ok(v)
    })
    .unwrap_or_else(|e| error!("reading which apply holds the tables of {id}: {e}"))
}

/// Makes apply `id` the holder of the target tables `relids` (`steep_repl.apply_targets`), in the
/// current transaction. A table held by another apply that is still pending or running is not taken:
/// such tables are returned with their holder, and the caller refuses to start (the transaction then
/// rolls back, undoing any claim made here).
///
/// Two concurrent calls for the same table serialise on its row: the claim rows are locked first (a
/// concurrent claim's uncommitted row makes this wait for its transaction), and only then, in a
/// statement of its own (a fresh snapshot under READ COMMITTED), are the holders' statuses read, so a
/// holder that committed meanwhile is seen as the pending apply it is. (Under REPEATABLE READ the wait
/// ends in a serialization failure instead: refused too.)
///
/// With `resume`, the apply must already hold every table (no other apply loaded one since it stopped);
/// tables it does not hold are returned with their holder (empty if nobody holds them, e.g. a table
/// dropped and created again).
pub fn claim_targets(id: &str, relids: &[u32], resume: bool) -> Vec<(u32, String)> {
    let oids: Vec<pgrx::pg_sys::Oid> = relids.iter().map(|&r| pgrx::pg_sys::Oid::from(r)).collect();
    let rows = |c: &mut pgrx::spi::SpiClient, sql: &str| -> Result<Vec<(u32, String)>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for r in c.update(sql, None, &[id.into(), oids.clone().into()])? {
            v.push((
                r.get::<pgrx::pg_sys::Oid>(1)?.map(|o| o.to_u32()).unwrap_or(0),
                r.get::<String>(2)?.unwrap_or_default(),
            ));
        }
        Ok(v)
    };
    as_owner(|| {
        Spi::connect_mut(|c| -> Result<Vec<(u32, String)>, pgrx::spi::Error> {
            if !resume {
                c.update(
                    "INSERT INTO steep_repl.apply_targets (relid, apply_id) \
                     SELECT w.relid, $1 FROM pg_catalog.unnest($2::pg_catalog.oid[]) AS w(relid) \
                     ON CONFLICT (relid) DO NOTHING",
                    None,
                    &[id.into(), oids.clone().into()],
                )?;
            }
            c.update(
                "SELECT FROM steep_repl.apply_targets WHERE relid = ANY ($2::pg_catalog.oid[]) \
                 AND apply_id IS DISTINCT FROM $1 FOR UPDATE",
                None,
                &[id.into(), oids.clone().into()],
            )?;
            if resume {
                return rows(c, NOT_HELD_SQL);
            }
            let refused = rows(
                c,
                "SELECT t.relid, t.apply_id FROM steep_repl.apply_targets t \
                 JOIN steep_repl.snapshots s ON s.id = t.apply_id \
                 WHERE t.relid = ANY ($2::pg_catalog.oid[]) AND t.apply_id <> $1 \
                   AND s.status IN ('pending', 'running')",
            )?;
            if refused.is_empty() {
                // Indexes the applies this one supersedes deferred and never built (one crashed, or
                // failed building them, and was not resumed) are this apply's to build now, on these
                // tables and on their others too: once it holds one of their tables, those applies can
                // no longer be resumed. (The caller refuses to start when its role cannot build one.)
                c.update(
                    "UPDATE steep_repl.apply_deferred_indexes SET apply_id = $1 \
                     WHERE apply_id IN (SELECT t.apply_id FROM steep_repl.apply_targets t \
                                        WHERE t.relid = ANY ($2::pg_catalog.oid[]) AND t.apply_id <> $1)",
                    None,
                    &[id.into(), oids.clone().into()],
                )?;
                c.update(
                    "UPDATE steep_repl.apply_targets SET apply_id = $1 \
                     WHERE relid = ANY ($2::pg_catalog.oid[]) AND apply_id <> $1",
                    None,
                    &[id.into(), oids.clone().into()],
                )?;
            }
            Ok(refused)
        })
    })
    .unwrap_or_else(|e| error!("claiming the target tables of {id}: {e}"))
}

/// One range of rows of one chunk, loaded by an apply.
pub struct LoadedRange<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    pub chunk_index: i32,
    pub row_start: i64,
    pub rows: i64,
    pub raw_bytes: i64,
}

/// Records ranges of rows apply `id` loaded, in the transaction that loaded them (so a range is loaded
/// and recorded, or neither).
pub fn record_loaded(id: &str, ranges: &[LoadedRange]) {
    if ranges.is_empty() {
        return;
    }
    let schemas: Vec<&str> = ranges.iter().map(|r| r.schema).collect();
    let tables: Vec<&str> = ranges.iter().map(|r| r.table).collect();
    let chunks: Vec<i32> = ranges.iter().map(|r| r.chunk_index).collect();
    let starts: Vec<i64> = ranges.iter().map(|r| r.row_start).collect();
    let rows: Vec<i64> = ranges.iter().map(|r| r.rows).collect();
    let bytes: Vec<i64> = ranges.iter().map(|r| r.raw_bytes).collect();
    as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO steep_repl.apply_chunks \
             (apply_id, schema_name, table_name, chunk_index, row_start, rows_loaded, raw_bytes) \
             SELECT $1, s, t, c, r, n, b FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]), \
             pg_catalog.unnest($3::pg_catalog.text[]), pg_catalog.unnest($4::pg_catalog.int4[]), \
             pg_catalog.unnest($5::pg_catalog.int8[]), pg_catalog.unnest($6::pg_catalog.int8[]), \
             pg_catalog.unnest($7::pg_catalog.int8[])) AS u(s, t, c, r, n, b)",
            &[
                id.into(),
                schemas.into(),
                tables.into(),
                chunks.into(),
                starts.into(),
                rows.into(),
                bytes.into(),
            ],
        )
    })
    .unwrap_or_else(|e| error!("recording the chunks {id} loaded: {e}"));
}

/// A range of rows an earlier run of an apply recorded: (schema, table, chunk index) and rows
/// `[start, end)`.
pub type Loaded = ((String, String, i32), (u64, u64));

/// Every range apply `id` has recorded as loaded.
pub fn loaded_ranges(id: &str) -> Vec<Loaded> {
    Spi::connect(|client| -> Result<Vec<Loaded>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for r in client.select(
            "SELECT schema_name, table_name, chunk_index, row_start, rows_loaded \
             FROM steep_repl.apply_chunks WHERE apply_id = $1",
            None,
            &[id.into()],
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
    .unwrap_or_else(|e| error!("reading the chunks {id} already loaded: {e}"))
}

/// The full text of operation `id`'s error, where it differs from the public one.
pub fn full_error(id: &str) -> Option<String> {
    as_owner(|| {
        Spi::get_one_with_args::<String>(
            "SELECT error FROM steep_repl.operation_errors WHERE id = $1",
            &[id.into()],
        )
    })
    .ok()
    .flatten()
}

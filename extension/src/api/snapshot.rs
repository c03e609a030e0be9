//! `start_snapshot`, `cancel_snapshot`, `list_operations`, `operation_error` and the helpers behind
//! `wait_snapshot`.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use steep_repl_engine::chunk::Compression;
use steep_repl_engine::filter::TablePattern;

use crate::api::{check_parallel, check_path, no_job_slot, require_file_role, require_startable, user_error};
use crate::bookkeeping::{self, NewOperation};
use crate::job::{self, Entry, StartGuard};
use crate::pg::{self, catalog, rights, xact};
use crate::shmem::{self, JobKind, Phase};

/// The largest chunk of an overlap scan: a worker sorts one chunk's row digests in memory (about 40
/// bytes and the key per row).
pub const DIGEST_CHUNK_BYTES: u64 = 64 << 20;

/// Job flag: start_snapshot created the output directory (so a failed job may remove it).
pub const FLAG_CREATED_DIR: u32 = 1 << 8;

/// Prepares the output directory: the parent must exist; the target must be missing (created, 0700), an
/// empty directory, or hold only what a generate of this database left when it ended failed or cancelled
/// without a manifest (a server restart in the middle: cleared here). Returns whether it was created.
fn prepare_output_dir(path: &str) -> bool {
    let p = Path::new(path);
    let parent = p.parent().unwrap_or(Path::new("/"));
    if !parent.is_dir() {
        user_error(
            PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
            format!("the parent directory of output_path does not exist: {}", parent.display()),
            None,
        );
    }
    match std::fs::read_dir(p) {
        Ok(mut entries) => {
            if entries.next().is_some() && !clear_leftovers(p) {
                if let Ok(writer) = std::fs::read_to_string(p.join(steep_repl_engine::chunk::WRITER_FILE)) {
                    // The file's text is shown only when it is a job id: anyone who can write there wrote it.
                    let writer = writer.trim();
                    let who = if !writer.is_empty()
                        && writer.len() <= 64
                        && writer.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    {
                        format!("snapshot {writer}")
                    } else {
                        "another job".to_string()
                    };
                    user_error(
                        PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                        format!("output_path {path} is being written by {who}"),
                        Some(
                            "Give a new directory. A failed or cancelled snapshot's directory may be used again; \
                             a writer file left by another server's job must be removed by hand.",
                        ),
                    );
                }
                user_error(
                    PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                    format!("output_path {path} exists and is not empty"),
                    Some("Give a new directory, or an empty one; a snapshot is never written over another."),
                );
            }
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(p) {
                user_error(
                    PgSqlErrorCode::ERRCODE_IO_ERROR,
                    format!("cannot create output directory {path}: {e}"),
                    None,
                );
            }
            true
        }
        Err(e) => user_error(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("cannot use output_path {path}: {e}"),
            if p.exists() && !p.is_dir() { Some("It exists and is not a directory.") } else { None },
        ),
    }
}

/// Clears `dir` when all it holds is what a generate job of this database wrote before it ended failed or
/// cancelled (its writer file names it; no manifest): its `data/`, temp files and writer file. Whether it
/// did (false: the directory holds something else, and is left alone).
fn clear_leftovers(dir: &Path) -> bool {
    use steep_repl_engine::chunk::{WRITER_FILE, is_temp_file_name};
    let Ok(writer) = std::fs::read_to_string(dir.join(WRITER_FILE)) else { return false };
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let names: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if !names.iter().all(|n| n == WRITER_FILE || n == "data" || is_temp_file_name(n)) {
        return false;
    }
    let ended = Spi::get_one_with_args::<bool>(
        "SELECT s.status OPERATOR(pg_catalog.=) ANY ('{failed,cancelled}'::pg_catalog.text[]) \
         FROM steep_repl.snapshots s WHERE s.id OPERATOR(pg_catalog.=) $1 AND s.op OPERATOR(pg_catalog.=) 'generate'",
        &[writer.trim().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !ended {
        return false;
    }
    crate::worker::generate::remove_written(dir);
    std::fs::read_dir(dir).map(|mut e| e.next().is_none()).unwrap_or(false)
}

/// Bytes still free on the file system holding `path` (or its nearest existing ancestor), for a caller
/// choosing how to stage a snapshot there (`steep-repl replica init`). Needs what writing a snapshot
/// there needs: superuser or pg_write_server_files.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn free_space(path: &str) -> i64 {
    require_file_role("pg_write_server_files", "look at the server's file systems");
    let path = check_path("path", path);
    match steep_repl_engine::space::free_bytes(Path::new(&path)) {
        Ok(bytes) => bytes.min(i64::MAX as u64) as i64,
        Err(e) => user_error(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("cannot read the free space of {path}: {e}"),
            None,
        ),
    }
}

/// Starts a snapshot of this database into `output_path` in background workers; returns its id at once.
///
/// `parallel`: data workers (1..64; fewer when the server has fewer free worker slots; the manifest
/// records both). `compression`: `zstd`, `zstd:N` (1..22) or `none`. `tables`: patterns like pg_dump -t
/// (`schema.table`, `*`, `?`, double quotes); NULL for every user table. `snapshot`: an already exported
/// snapshot to read under, instead of a new one. `slot`: create this permanent logical replication
/// slot (plugin `pgoutput`) and read every chunk at its consistent point, so the data is exactly the
/// state at the LSN the manifest records and the slot streams everything committed after it (PRODUCT.md
/// §7); needs superuser or REPLICATION and `wal_level = logical`. A failed or cancelled job drops it.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn start_snapshot(
    output_path: &str,
    parallel: default!(i32, 4),
    compression: default!(&str, "'zstd:1'"),
    tables: default!(Option<Vec<String>>, "NULL"),
    snapshot: default!(Option<&str>, "NULL"),
    slot: default!(Option<&str>, "NULL"),
) -> String {
    shmem::require();
    job::reap_interrupted();
    require_startable("start a snapshot");
    require_file_role("pg_write_server_files", "write snapshot files on the server");
    let path = check_path("output_path", output_path);
    check_parallel(parallel);
    let compression = Compression::from_str(compression).unwrap_or_else(|e| {
        user_error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("compression: {e}"), None)
    });
    let patterns_text = tables.unwrap_or_default();
    let patterns: Vec<TablePattern> = patterns_text
        .iter()
        .map(|t| {
            t.parse::<TablePattern>().unwrap_or_else(|e| {
                user_error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None)
            })
        })
        .collect();
    // Listing reads every table's size, which locks it until the end of this transaction: a database
    // of more tables than the lock table holds fails here, as the snapshot itself would.
    // (Counted first: after the ERROR, no further query may run in this transaction.)
    let tables = Spi::get_one::<i64>(
        "SELECT count(*) FROM pg_catalog.pg_class c WHERE c.relkind IN ('r', 'm', 'p') \
         AND c.relnamespace OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace",
    )
    .ok()
    .flatten()
    .unwrap_or(0);
    if !crate::limits::locks_fit(tables.max(0) as usize) {
        user_error(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            crate::limits::lock_table_error(tables.max(0) as usize),
            None,
        );
    }
    let listed = match xact::try_catch(|| {
        crate::pg::session::with_settings(&[("jit", "off")], || catalog::list_tables(&patterns, false))
    }) {
        Ok(listed) => listed,
        Err(c) if c.sqlstate == crate::limits::OUT_OF_SHARED_MEMORY => {
            user_error(
                PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
                format!("out of shared memory: {}", crate::limits::lock_table_error(tables.max(0) as usize)),
                None,
            );
        }
        Err(c) => user_error(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, c.full(), None),
    };
    if let Err(e) = listed {
        let code = if e.permission_only {
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
        } else {
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE
        };
        user_error(code, e.to_string(), None);
    }
    let snapshot = snapshot.map(str::trim).filter(|s| !s.is_empty());
    if let Some(s) = snapshot
        && (s.len() > 63 || !s.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
    {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("snapshot {s:?} is not a snapshot name as pg_export_snapshot() returns"),
            None,
        );
    }
    let slot_name = slot.map(str::trim).filter(|s| !s.is_empty());
    if let Some(name) = slot_name {
        if snapshot.is_some() {
            user_error(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "snapshot and slot cannot be given together: a slot's data is read at the slot's own snapshot".into(),
                None,
            );
        }
        let problems = crate::pg::slot::check_requirements(name);
        if !problems.is_empty() {
            user_error(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("cannot create replication slot {name:?}: {}", problems.join("; ")),
                None,
            );
        }
    }
    let created = prepare_output_dir(&path);
    launch_generate(GenerateRequest {
        path: &path,
        created_dir: created,
        parallel,
        compression,
        patterns: &patterns_text,
        snapshot,
        slot: slot_name,
        digest: None,
    })
}

/// What a generate job is started with, checked by its caller.
pub(crate) struct GenerateRequest<'a> {
    pub path: &'a str,
    /// The caller created `path` (a failed job removes it).
    pub created_dir: bool,
    pub parallel: i32,
    pub compression: Compression,
    /// Table patterns (empty: every user table).
    pub patterns: &'a [String],
    pub snapshot: Option<&'a str>,
    pub slot: Option<&'a str>,
    /// Digest mode (an overlap scan, `crate::api::overlap`): the tables' key columns, recorded in the
    /// job's options; chunks become digest files.
    pub digest: Option<serde_json::Value>,
}

/// Claims a job slot, records the operation and launches the leader of a generate job; returns its id.
pub(crate) fn launch_generate(req: GenerateRequest<'_>) -> String {
    let shared = shmem::require();
    let GenerateRequest {
        path,
        created_dir: created,
        parallel,
        compression,
        patterns,
        snapshot,
        slot,
        digest,
    } = req;
    let path = path.to_string();
    let patterns_text = patterns.to_vec();
    let slot_name = slot;
    // An overlap scan prints times in UTC, so that two nodes' rows compare alike whatever their settings.
    let timezone = match digest {
        Some(_) => "UTC".to_string(),
        None => Spi::get_one::<String>("SELECT pg_catalog.current_setting('TimeZone')")
            .ok()
            .flatten()
            .unwrap_or_default(),
    };

    let Some((slot, generation)) = shared.claim_job_slot() else {
        if created {
            let _not_empty = std::fs::remove_dir(&path);
        }
        no_job_slot();
    };
    // From here on, an ERROR frees the slot and removes the directory this call created.
    let mut guard = StartGuard::new(slot, generation);
    if created {
        guard.remove_dir_on_failure(&path);
    }
    let job = &shared.jobs[slot];
    let id = job::new_job_id(JobKind::Generate);
    // The directory is this job's: a second start_snapshot into it (racing the check above) finds this
    // file and stops.
    let writer = Path::new(&path).join(steep_repl_engine::chunk::WRITER_FILE);
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&writer) {
        Ok(mut f) => {
            guard.remove_file_on_failure(writer.clone());
            if let Err(e) = std::io::Write::write_all(&mut f, id.as_bytes()) {
                user_error(
                    PgSqlErrorCode::ERRCODE_IO_ERROR,
                    format!("cannot write {}: {e}", writer.display()),
                    None,
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => user_error(
            PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
            format!("another snapshot is being written into {path}"),
            Some("Give a new directory, or an empty one; a snapshot is never written over another."),
        ),
        Err(e) => user_error(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("cannot write {}: {e}", writer.display()),
            None,
        ),
    }
    let _fits = job.id.set(&id);
    job.kind.store(JobKind::Generate as u32, Ordering::Relaxed);
    job.database_oid.store(pg::database_oid(), Ordering::Relaxed);
    job.role_oid.store(pg::current_user_oid(), Ordering::Relaxed);
    job.caller_xid.store(xact::top_xid(), Ordering::Relaxed);
    if job.path.set(&path).is_err() || job.timezone.set(&timezone).is_err() {
        user_error(PgSqlErrorCode::ERRCODE_NAME_TOO_LONG, "output_path or TimeZone is too long".into(), None);
    }
    let _checked_above = job.snapshot_name.set(snapshot.unwrap_or(""));
    let _checked_above = job.slot_name.set(slot_name.unwrap_or(""));
    job.zstd_level.store(
        match compression {
            Compression::None => 0,
            Compression::Zstd { level } => level,
        },
        Ordering::Relaxed,
    );
    job.parallel_requested.store(parallel as u32, Ordering::Relaxed);
    let mut chunk_bytes = crate::gucs::CHUNK_SIZE_KB.get() as u64 * 1024;
    if digest.is_some() {
        // A digest file is sorted in memory: its chunk bounds a worker's memory.
        chunk_bytes = chunk_bytes.min(DIGEST_CHUNK_BYTES);
    }
    job.chunk_bytes.store(chunk_bytes, Ordering::Relaxed);
    job.chunk_pause_ms.store(crate::gucs::CHUNK_PAUSE_MS.get().max(0) as u64, Ordering::Relaxed);
    let digest_flag = if digest.is_some() { shmem::FLAG_DIGEST } else { 0 };
    job.flags.store(if created { FLAG_CREATED_DIR } else { 0 } | digest_flag, Ordering::Relaxed);
    job.set_phase(Phase::Queued);

    let options = serde_json::json!({
        "tables": patterns_text,
        "snapshot": snapshot,
        "slot": slot_name,
        "chunk_size_bytes": job.chunk_bytes.load(Ordering::Relaxed),
        "timezone": timezone,
        "digest": digest,
    })
    .to_string();
    bookkeeping::insert_operation(&NewOperation {
        id: &id,
        op: job.op_name(),
        path: &path,
        parallel,
        compression: &compression.to_string(),
        options: &options,
        role_name: &pg::current_user_name(),
        tables_total: 0,
        chunks_total: 0,
    });
    job::launch_leader(Entry::GenerateLeader, shared, slot, generation);
    guard.launched();
    id
}

/// Asks a running operation (generate or apply) to stop. Its workers stop within about a second, it
/// removes what it wrote (generate) or keeps what it committed (apply, resumable), and ends as
/// `cancelled`. Returns false when the operation had already ended.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
pub(crate) fn cancel_snapshot(id: &str) -> bool {
    let shared = shmem::require();
    job::reap_interrupted();
    let Some(op) = bookkeeping::operation(id) else {
        user_error(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no operation with id {id:?}"), None);
    };
    if !matches!(op.status.as_str(), "pending" | "running") {
        return false;
    }
    let Some(slot) = shared.find_job(id) else {
        return false;
    };
    let job = &shared.jobs[slot];
    if !rights::acts_for(job.role_oid.load(Ordering::Acquire)) {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to cancel {id}, started by role {}", op.role_name),
            Some("Only that role, its members and superusers may cancel it."),
        );
    }
    job.cancelled.store(1, Ordering::Release);
    job.fail("cancelled by steep_repl.cancel_snapshot()");
    // Interrupt whatever the job's processes wait in (a lock, a row, the verification): each one stops
    // at its next interrupt check, not only between chunks.
    pg::cancel_process(job.leader_pid.load(Ordering::Acquire));
    for (_, w, _) in shared.job_workers(slot, Some(job.word.get().0)) {
        pg::cancel_process(w.pid.load(Ordering::Acquire));
    }
    job::wake_leader(job);
    true
}

/// The error of operation `id` as the caller may read it: the full text (with the DETAIL PostgreSQL
/// gave, such as the key of a duplicate row) for the role that started it, its members and superusers;
/// for everyone else the text of `steep_repl.snapshots.error`, which never holds row data.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn operation_error(id: &str) -> Option<String> {
    let op = bookkeeping::operation(id)?;
    let public = Spi::get_one_with_args::<String>(
        "SELECT error FROM steep_repl.snapshots WHERE id = $1",
        &[id.into()],
    )
    .ok()
    .flatten();
    let may_read = op.current_user_acts_for_role();
    if may_read { bookkeeping::full_error(id).or(public) } else { public }
}

/// Marks operations interrupted by a crash or a server restart as failed; used by wait_snapshot and
/// list_operations so no row stays `running` forever.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn reap_interrupted() {
    job::reap_interrupted();
}

/// Sleeps until the running operation `id` ends (its job slot is released) or `timeout_ms` passes;
/// returns at once when `id` is not running. Used by `wait_snapshot` between two looks at the row, so
/// that it returns as soon as an operation ends instead of on a polling tick.
#[pg_extern(volatile, name = "_wait_for_end")]
#[search_path(pg_catalog, pg_temp)]
fn wait_for_end(id: &str, timeout_ms: i32) {
    let shared = shmem::require();
    let Some(slot) = shared.find_job(id) else { return };
    // A job waits for the transaction that started it to commit: waiting for it inside that same
    // transaction would wait for ever (e.g. SELECT wait_snapshot(start_snapshot(...))).
    if pg::is_current_transaction(shared.jobs[slot].caller_xid.load(Ordering::Acquire)) {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("operation {id} was started by this transaction and only begins once it commits"),
            Some("Commit first, then wait for it (in a new statement outside that transaction)."),
        );
    }
    let latch = pg::my_latch();
    let Some(entry) = shared.wait_on(slot, latch) else {
        job::nap(std::time::Duration::from_millis(timeout_ms.clamp(0, 1000) as u64));
        return;
    };
    // Registered first, checked second: a release after the check sets our latch.
    if shared.find_job(id) == Some(slot) {
        job::nap(std::time::Duration::from_millis(timeout_ms.max(0) as u64));
    }
    shared.unwait(slot, entry, latch);
    pgrx::check_for_interrupts!();
}

extension_sql!(
    r#"
-- Blocks until operation `id` (generate or apply) has ended, and returns its row. Each check reads
-- committed state afresh, so call it in READ COMMITTED (the default), not inside a REPEATABLE READ
-- transaction. Raises query_canceled (57014) after timeout_s seconds.
CREATE FUNCTION steep_repl.wait_snapshot(id text, timeout_s integer DEFAULT 86400)
RETURNS steep_repl.snapshots
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r steep_repl.snapshots;
    deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
BEGIN
    IF timeout_s IS NULL OR timeout_s < 0 THEN
        RAISE EXCEPTION 'timeout_s must be zero or more, got %', timeout_s USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        PERFORM steep_repl.reap_interrupted();
        SELECT * INTO r FROM steep_repl.snapshots s WHERE s.id = wait_snapshot.id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no operation with id %', quote_literal(wait_snapshot.id) USING ERRCODE = 'undefined_object';
        END IF;
        IF r.status NOT IN ('pending', 'running') THEN
            -- The full error (with row data) for those who may read it, the public one for others.
            r.error := steep_repl.operation_error(r.id);
            RETURN r;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RAISE EXCEPTION 'timed out after % s waiting for operation %', timeout_s, wait_snapshot.id
                USING ERRCODE = 'query_canceled',
                      HINT = 'The operation keeps running; wait again, or stop it with steep_repl.cancel_snapshot(id).';
        END IF;
        PERFORM steep_repl._wait_for_end(wait_snapshot.id,
            least(1000, greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp()) * 1000)))::int);
    END LOOP;
END
$$;

-- Operation history, newest first: the work queue rows, optionally of one status.
CREATE FUNCTION steep_repl.list_operations(status text DEFAULT NULL, lim integer DEFAULT 100)
RETURNS SETOF steep_repl.work_queue
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF status IS NOT NULL AND status NOT IN ('pending', 'running', 'complete', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'status must be one of pending, running, complete, failed, cancelled; got %', quote_literal(status)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM steep_repl.reap_interrupted();
    RETURN QUERY SELECT * FROM steep_repl.work_queue q
        WHERE list_operations.status IS NULL OR q.status = list_operations.status
        ORDER BY q.id DESC LIMIT greatest(lim, 0);
END
$$;
"#,
    name = "wait_and_list",
    requires = ["schema", reap_interrupted, wait_for_end, operation_error]
);

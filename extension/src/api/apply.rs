//! `start_apply` and `resume_apply`: load a snapshot into existing tables, in background workers.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use steep_repl_engine::compat::{self, Mismatch, TargetColumn, TargetTable};
use steep_repl_engine::ident::QualifiedName;
use steep_repl_engine::manifest::Manifest;

use crate::api::snapshot::{check_path, require_file_role, user_error};
use crate::job::{self, Entry};
use crate::pg::{self, xact};
use crate::shmem::{self, JobKind, Phase};
use crate::worker::apply::flags;

/// The snapshot's manifest, or an ERROR that says why it cannot be applied.
fn load_manifest(path: &str) -> Manifest {
    Manifest::load(std::path::Path::new(path)).unwrap_or_else(|e| {
        let msg = e.to_string();
        let code = if msg.contains("incomplete") || msg.contains("No such file") {
            PgSqlErrorCode::ERRCODE_UNDEFINED_FILE
        } else {
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED
        };
        user_error(code, format!("cannot apply {path}: {msg}"), None)
    })
}

/// Checks the target tables and sequences against the manifest; one ERROR lists every problem.
fn check_schema(m: &Manifest) {
    let schemas: Vec<String> = m.tables.iter().map(|t| t.schema.clone()).collect();
    let names: Vec<String> = m.tables.iter().map(|t| t.name.clone()).collect();
    let mut targets: Vec<TargetTable> = Vec::new();
    Spi::connect(|client| -> Result<(), pgrx::spi::Error> {
        for r in client.select(compat::TARGET_TABLES_SQL, None, &[schemas.into(), names.into()])? {
            let schema = r.get::<String>(1)?.unwrap_or_default();
            let name = r.get::<String>(2)?.unwrap_or_default();
            if targets.last().is_none_or(|t| t.schema != schema || t.name != name) {
                targets.push(TargetTable { schema, name, columns: Vec::new() });
            }
            if let Some(col) = r.get::<String>(3)? {
                targets.last_mut().expect("pushed above").columns.push(TargetColumn {
                    name: col,
                    type_name: r.get::<String>(4)?.unwrap_or_default(),
                    generated: r.get::<bool>(5)?.unwrap_or(false),
                });
            }
        }
        Ok(())
    })
    .unwrap_or_else(|e| error!("reading the target tables: {e}"));
    let seq_schemas: Vec<String> = m.sequences.iter().map(|s| s.schema.clone()).collect();
    let seq_names: Vec<String> = m.sequences.iter().map(|s| s.name.clone()).collect();
    let mut sequences = Vec::new();
    Spi::connect(|client| -> Result<(), pgrx::spi::Error> {
        for r in client.select(compat::TARGET_SEQUENCES_SQL, None, &[seq_schemas.into(), seq_names.into()])? {
            sequences.push(QualifiedName::new(
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
            ));
        }
        Ok(())
    })
    .unwrap_or_else(|e| error!("reading the target sequences: {e}"));
    let problems = compat::check_target(m, &targets, &sequences);
    if !problems.is_empty() {
        let missing =
            problems.iter().any(|p| matches!(p, Mismatch::MissingTable(_) | Mismatch::MissingSequence(_)));
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        user_error(
            if missing {
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE
            } else {
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH
            },
            format!("the target does not match the snapshot ({} problems): {}", list.len(), list.join("; ")),
            Some("Create the schema first (for example pg_dump --schema-only on the source), then apply."),
        );
    }
}

/// Checks the caller's privileges on every target table; one ERROR lists every table lacking one.
fn check_privileges(m: &Manifest, truncate: bool) {
    let names: Vec<String> =
        m.tables.iter().map(|t| QualifiedName::new(t.schema.clone(), t.name.clone()).to_string()).collect();
    let privs = if truncate { "INSERT, TRUNCATE" } else { "INSERT" };
    let missing: Vec<String> = Spi::get_one_with_args::<Vec<String>>(
        "SELECT coalesce(array_agg(q ORDER BY n), '{}') FROM unnest($1::text[]) WITH ORDINALITY AS t(q, n) \
         WHERE NOT (pg_catalog.has_table_privilege(q, 'INSERT') \
                    AND ($2 = false OR pg_catalog.has_table_privilege(q, 'TRUNCATE')))",
        &[names.into(), truncate.into()],
    )
    .unwrap_or_else(|e| error!("checking privileges on the target tables: {e}"))
    .unwrap_or_default()
    .into_iter()
    .map(|q| format!("{q} ({privs})"))
    .collect();
    if !missing.is_empty() {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied: applying needs {}", missing.join(", ")),
            None,
        );
    }
}

/// Refuses target tables that already hold rows.
fn check_empty(m: &Manifest) {
    let mut full = Vec::new();
    for t in &m.tables {
        let qn = QualifiedName::new(t.schema.clone(), t.name.clone()).to_string();
        let has_rows = Spi::get_one::<bool>(&format!("SELECT EXISTS (SELECT 1 FROM ONLY {qn})"))
            .unwrap_or_else(|e| error!("checking whether {qn} is empty: {e}"))
            .unwrap_or(false);
        if has_rows {
            full.push(qn);
        }
    }
    if !full.is_empty() {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("target tables are not empty: {}", full.join(", ")),
            Some("Pass truncate => true to empty them first, or apply into empty tables."),
        );
    }
}

fn is_superuser() -> bool {
    Spi::get_one::<bool>("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Claims a job slot for `id`, fills it, and launches the leader; an ERROR when no slot is free.
fn launch_apply(id: &str, path: &str, parallel: i32, job_flags: u32) {
    let shared = shmem::require();
    let Some(slot) = shared.claim_job_slot() else {
        user_error(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("too many steep_repl operations are running (at most {})", shmem::MAX_JOBS),
            None,
        );
    };
    shared.reset_job(slot);
    let job = &shared.jobs[slot];
    let _fits = job.id.set(id);
    job.kind.store(JobKind::Apply as u32, Ordering::Relaxed);
    job.database_oid.store(pg::database_oid(), Ordering::Relaxed);
    job.role_oid.store(pg::current_user_oid(), Ordering::Relaxed);
    job.caller_xid.store(xact::top_xid(), Ordering::Relaxed);
    job.path.set_truncated(path);
    job.parallel_requested.store(parallel as u32, Ordering::Relaxed);
    job.flags.store(job_flags, Ordering::Relaxed);
    job.chunk_pause_ms.store(crate::gucs::CHUNK_PAUSE_MS.get().max(0) as u64, Ordering::Relaxed);
    job.chunk_bytes.store(crate::gucs::APPLY_PART_SIZE_KB.get().max(1) as u64 * 1024, Ordering::Relaxed);
    job.set_phase(Phase::Queued);
    if !job::launch(Entry::ApplyLeader, id, slot, None) {
        shared.release_job(slot);
        user_error(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            "no background worker slot is free to start the apply's leader".into(),
            Some("Raise max_worker_processes (needs a restart) or wait for other workers to finish."),
        );
    }
}

/// Applies the snapshot in `input_path` to the existing tables of this database, in background workers;
/// returns its id at once.
///
/// Before any row changes, and right here: the manifest must load and validate; every table and sequence
/// must exist with the snapshot's columns and compatible types (one error lists every problem); target
/// tables must be empty unless `truncate`; the caller needs pg_read_server_files (or superuser) and
/// INSERT (and TRUNCATE when asked) on every table. With `verify` (default), the job's first phase checks
/// every chunk file and fails, naming every bad chunk, before loading anything. `analyze_tables` runs ANALYZE on
/// the loaded tables at the end.
#[pg_extern(volatile)]
fn start_apply(
    input_path: &str,
    parallel: default!(i32, 4),
    verify: default!(bool, true),
    truncate: default!(bool, false),
    analyze_tables: default!(bool, true),
) -> String {
    shmem::require();
    job::reap_interrupted();
    require_file_role("pg_read_server_files", "read snapshot files on the server");
    let path = check_path("input_path", input_path);
    if !(1..=64).contains(&parallel) {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("parallel must be between 1 and 64, got {parallel}"),
            None,
        );
    }
    let m = load_manifest(&path);
    check_schema(&m);
    check_privileges(&m, truncate);
    if !truncate {
        check_empty(&m);
    }
    let mut job_flags = 0;
    for (on, f) in [
        (verify, flags::VERIFY),
        (truncate, flags::TRUNCATE),
        (analyze_tables, flags::ANALYZE),
        (is_superuser(), flags::REPLICA),
    ] {
        if on {
            job_flags |= f;
        }
    }
    let id = job::new_job_id(JobKind::Apply);
    let options = serde_json::json!({
        "verify": verify, "truncate": truncate, "analyze": analyze_tables,
        "snapshot_id": m.snapshot_id, "replica_mode": job_flags & flags::REPLICA != 0,
    })
    .to_string();
    let caller = pg::current_user_name();
    job::as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO steep_repl.snapshots (id, op, status, phase, path, parallel_requested, compression, options, role_name, \
             tables_total, chunks_total) VALUES ($1, 'apply', 'pending', 'queued', $2, $3, $4, $5::jsonb, $6, $7, $8)",
            &[
                id.as_str().into(),
                path.as_str().into(),
                parallel.into(),
                m.compression.to_string().as_str().into(),
                options.as_str().into(),
                caller.as_str().into(),
                (m.tables.len() as i32).into(),
                (m.totals.chunks as i32).into(),
            ],
        )?;
        Spi::run_with_args(
            "INSERT INTO steep_repl.work_queue (snapshot_id, op, payload) VALUES ($1, 'apply', $2::jsonb)",
            &[id.as_str().into(), options.as_str().into()],
        )
    })
    .unwrap_or_else(|e| error!("recording operation {id}: {e}"));
    launch_apply(&id, &path, parallel, job_flags);
    id
}

/// Continues a failed or cancelled apply: loads only the chunks not yet recorded as loaded (each chunk's
/// rows and its record committed together), so no row is duplicated or lost. Same id.
#[pg_extern(volatile)]
fn resume_apply(id: &str) -> String {
    shmem::require();
    job::reap_interrupted();
    let row = Spi::get_three_with_args::<String, String, String>(
        "SELECT op, status, path FROM steep_repl.snapshots WHERE id = $1",
        &[id.into()],
    )
    .unwrap_or((None, None, None));
    let (Some(op), Some(status), Some(path)) = row else {
        user_error(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no operation with id {id:?}"), None);
    };
    if op != "apply" {
        user_error(PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, format!("{id} is a {op}, not an apply"), None);
    }
    match status.as_str() {
        "failed" | "cancelled" => {}
        "applied" => user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{id} is already applied"),
            None,
        ),
        _ => user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{id} is still {status}; cancel it first or wait for it"),
            None,
        ),
    }
    let (parallel, verify, analyze, role) = Spi::connect(|c| -> Result<_, pgrx::spi::Error> {
        let r = c
            .select(
                "SELECT parallel_requested, coalesce((options->>'verify')::bool, true), \
                 coalesce((options->>'analyze')::bool, true), role_name::text FROM steep_repl.snapshots WHERE id = $1",
                Some(1),
                &[id.into()],
            )?
            .first();
        Ok((r.get::<i32>(1)?.unwrap_or(4), r.get::<bool>(2)?.unwrap_or(true), r.get::<bool>(3)?.unwrap_or(true), r.get::<String>(4)?.unwrap_or_default()))
    })
    .unwrap_or_else(|e| error!("reading operation {id}: {e}"));
    let member = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_has_role(current_user, $1::name, 'MEMBER')",
        &[role.as_str().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !member {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to resume {id}, started by role {role}"),
            None,
        );
    }
    require_file_role("pg_read_server_files", "read snapshot files on the server");
    let m = load_manifest(&path);
    check_schema(&m);
    check_privileges(&m, false);
    let mut job_flags = flags::RESUME;
    for (on, f) in [(verify, flags::VERIFY), (analyze, flags::ANALYZE), (is_superuser(), flags::REPLICA)] {
        if on {
            job_flags |= f;
        }
    }
    job::as_owner(|| {
        Spi::run_with_args(
            "UPDATE steep_repl.snapshots SET status = 'pending', phase = 'queued', error = NULL, finished_at = NULL, \
             updated_at = now(), postmaster_start = pg_catalog.pg_postmaster_start_time() WHERE id = $1",
            &[id.into()],
        )?;
        Spi::run_with_args(
            "UPDATE steep_repl.work_queue SET status = 'pending', error = NULL, finished_at = NULL WHERE snapshot_id = $1",
            &[id.into()],
        )
    })
    .unwrap_or_else(|e| error!("recording the resume of {id}: {e}"));
    launch_apply(id, &path, parallel, job_flags);
    id.to_string()
}

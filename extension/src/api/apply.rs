//! `start_apply` and `resume_apply`: load a snapshot into existing tables, in background workers.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use steep_repl_engine::compat::{self, Mismatch};
use steep_repl_engine::ident::QualifiedName;
use steep_repl_engine::manifest::Manifest;
use steep_repl_engine::schema::SchemaObject;

use crate::api::{check_parallel, check_path, no_job_slot, require_file_role, require_startable, user_error};
use crate::bookkeeping::{self, NewOperation};
use crate::job::{self, Entry, StartGuard};
use crate::pg::{self, rights, xact};
use crate::shmem::{self, JobKind, Phase};
use crate::worker::apply::flags;

/// The snapshot's manifest and the SHA-256 of its bytes, or an ERROR that says why it cannot be applied.
pub fn load_manifest(path: &str) -> (Manifest, String) {
    Manifest::load_with_sha256(std::path::Path::new(path)).unwrap_or_else(|e| {
        let msg = e.to_string();
        let code = if msg.contains("incomplete") || msg.contains("No such file") {
            PgSqlErrorCode::ERRCODE_UNDEFINED_FILE
        } else if msg.contains("Permission denied") {
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
        } else {
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED
        };
        let hint = msg.contains("Permission denied").then(|| crate::api::server_user_hint(path));
        user_error(code, format!("cannot apply {path}: {msg}"), hint.as_deref())
    })
}

/// Checks the target tables and sequences against the manifest; one ERROR lists every problem.
fn check_schema(m: &Manifest) {
    // Read with the schema fingerprints' query: one catalog query, the same view of a schema as a
    // compare_schema.
    let objects: Vec<SchemaObject> = crate::api::schema::local_objects(
        Some(&compat::target_schemas(m)),
        Some(&steep_repl_engine::schema::TARGET_KINDS),
    );
    let (targets, sequences) = compat::targets_from_schema(&objects);
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
    let sequences: Vec<String> = m
        .sequences
        .iter()
        .map(|s| QualifiedName::new(s.schema.clone(), s.name.clone()).to_string())
        .collect();
    let privs = if truncate { "INSERT, TRUNCATE" } else { "INSERT" };
    let query = |sql: &str, args: Vec<pgrx::datum::DatumWithOid>| -> Vec<String> {
        Spi::get_one_with_args::<Vec<String>>(sql, &args)
            .unwrap_or_else(|e| error!("checking privileges on the target: {e}"))
            .unwrap_or_default()
    };
    let mut missing: Vec<String> = query(
        "SELECT coalesce(pg_catalog.array_agg(q ORDER BY n), '{}') \
         FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS t(q, n) \
         WHERE NOT (pg_catalog.has_table_privilege(q, 'INSERT') \
                    AND ($2 = false OR pg_catalog.has_table_privilege(q, 'TRUNCATE')))",
        vec![names.into(), truncate.into()],
    )
    .into_iter()
    .map(|q| format!("{q} ({privs})"))
    .collect();
    // Sequences are set at the end of the load (setval): refuse now rather than after loading it all.
    missing.extend(
        query(
            "SELECT coalesce(pg_catalog.array_agg(q ORDER BY n), '{}') \
             FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS t(q, n) \
             WHERE NOT pg_catalog.has_sequence_privilege(q, 'UPDATE')",
            vec![sequences.into()],
        )
        .into_iter()
        .map(|q| format!("sequence {q} (UPDATE)")),
    );
    if !missing.is_empty() {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied: applying needs {}", missing.join(", ")),
            None,
        );
    }
}

/// The oids of the manifest's tables in this database, in manifest order (they exist: `check_schema`
/// passed).
pub(crate) fn target_relids(m: &Manifest) -> Vec<u32> {
    let schemas: Vec<&str> = m.tables.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = m.tables.iter().map(|t| t.name.as_str()).collect();
    let oids = Spi::get_one_with_args::<Vec<pgrx::pg_sys::Oid>>(
        "SELECT coalesce(pg_catalog.array_agg(coalesce(c.oid, 0) ORDER BY w.k), '{}') \
         FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[])) \
              WITH ORDINALITY AS w(s, t, k) \
         LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = w.s \
         LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.t",
        &[schemas.into(), names.into()],
    )
    .unwrap_or_else(|e| error!("looking up the target tables: {e}"))
    .unwrap_or_default();
    oids.into_iter().map(|o| o.to_u32()).collect()
}

/// Refuses target tables that already hold rows. Checked without reading any row's contents (the caller
/// has INSERT on each table, checked before), one table at a time, in a few microseconds each.
fn check_empty(m: &Manifest, relids: &[u32]) {
    // A table whose files are empty has no rows: known from a stat, without opening it (a target of
    // many thousands of fresh tables is checked in milliseconds); any other is scanned to its first row.
    let oids: Vec<pgrx::pg_sys::Oid> = relids.iter().map(|&r| pgrx::pg_sys::Oid::from(r)).collect();
    let paths = Spi::get_one_with_args::<Vec<Option<String>>>(
        "SELECT coalesce(pg_catalog.array_agg(pg_catalog.pg_relation_filepath(w.r) ORDER BY w.k), '{}') \
         FROM pg_catalog.unnest($1::pg_catalog.oid[]) WITH ORDINALITY AS w(r, k)",
        &[oids.into()],
    )
    .unwrap_or_else(|e| error!("looking up the target tables' files: {e}"))
    .unwrap_or_default();
    let full: Vec<String> = m
        .tables
        .iter()
        .zip(relids)
        .zip(paths.iter().map(Option::as_deref).chain(std::iter::repeat(None)))
        .filter(|((_, relid), path)| {
            crate::pg::catalog::fork_bytes(*path) > 0
                && pg::relation_has_rows(pgrx::pg_sys::Oid::from(**relid))
        })
        .map(|((t, _), _)| QualifiedName::new(t.schema.clone(), t.name.clone()).to_string())
        .collect();
    if !full.is_empty() {
        let shown: Vec<&str> = full.iter().take(20).map(String::as_str).collect();
        let more = if full.len() > 20 { format!(" and {} more", full.len() - 20) } else { String::new() };
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("target tables are not empty: {}{more}", shown.join(", ")),
            Some("Pass truncate => true to empty them first, or apply into empty tables."),
        );
    }
}

/// Makes the apply the holder of its target tables, or refuses naming the tables another apply is
/// loading (or, for a resume, has loaded since).
fn claim_targets(id: &str, m: &Manifest, relids: &[u32], resume: bool) {
    let refused = bookkeeping::claim_targets(id, relids, resume);
    if refused.is_empty() {
        if !resume {
            refuse_unbuildable(id);
        }
        return;
    }
    let name_of = |relid: u32| {
        m.tables
            .iter()
            .zip(relids)
            .find(|(_, r)| **r == relid)
            .map(|(t, _)| QualifiedName::new(t.schema.clone(), t.name.clone()).to_string())
            .unwrap_or_else(|| relid.to_string())
    };
    let list: Vec<String> = refused
        .iter()
        .take(20)
        .map(|(relid, holder)| match holder.as_str() {
            "" => format!("{} (not loaded by {id})", name_of(*relid)),
            h => format!("{} (by {h})", name_of(*relid)),
        })
        .collect();
    let more = if refused.len() > 20 { format!(" and {} more", refused.len() - 20) } else { String::new() };
    if resume {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "cannot resume {id}: other applies have loaded its tables since: {}{more}",
                list.join(", ")
            ),
            Some("Start a new apply of the snapshot instead (with truncate => true)."),
        );
    }
    user_error(
        PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
        format!("target tables are being loaded by another apply: {}{more}", list.join(", ")),
        Some("Wait for it to end (steep_repl.wait_snapshot(id)), or cancel it."),
    );
}

/// Refuses (rolling the claim back) when apply `id` took over deferred indexes that its role cannot build:
/// the role does not act for their tables' owners. Asked as the caller.
fn refuse_unbuildable(id: &str) {
    let names = Spi::get_one_with_args::<Vec<String>>(
        "SELECT coalesce(pg_catalog.array_agg(pg_catalog.format('%I on %I.%I', d.index_name, d.schema_name, \
                d.table_name) ORDER BY 1), '{}') \
         FROM steep_repl.apply_deferred_indexes d \
         JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.relid \
         WHERE d.apply_id OPERATOR(pg_catalog.=) $1 AND NOT pg_catalog.pg_has_role(c.relowner, 'USAGE')",
        &[id.into()],
    )
    .unwrap_or_else(|e| error!("reading the deferred indexes of the target tables: {e}"))
    .unwrap_or_default();
    if !names.is_empty() {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "an earlier apply of these tables left indexes unbuilt that this role cannot build (it does not act for their tables' owners): {}",
                names.join(", ")
            ),
            Some(
                "Run the apply as a role that does (or a superuser), or re-create them from steep_repl.apply_deferred_indexes first.",
            ),
        );
    }
}

/// COPY text apply `id` has loaded already.
fn loaded_bytes(id: &str) -> u64 {
    Spi::get_one_with_args::<i64>(
        "SELECT coalesce(pg_catalog.sum(raw_bytes), 0)::pg_catalog.int8 FROM steep_repl.apply_chunks WHERE apply_id = $1",
        &[id.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(0)
    .max(0) as u64
}

/// Warns (to the caller, and in the server log) when loading what is left of the snapshot will force
/// checkpoints, naming the setting to raise and a value that avoids them; the warning, if any, for the
/// job's progress. `steep_repl_engine::checkpoints` holds the estimate.
fn warn_about_checkpoints(m: &Manifest, loaded_bytes: u64, parallel: i32) -> Option<String> {
    use steep_repl_engine::checkpoints::{self, Estimate, Settings};
    let total: u64 = m.tables.iter().flat_map(|t| &t.chunks).map(|c| c.raw_bytes).sum();
    let estimate = Estimate::of(total.saturating_sub(loaded_bytes), parallel.max(1) as u32);
    let (wal_mb, target, timeout) = Spi::get_three::<i64, f64, i64>(checkpoints::SETTINGS_SQL).ok()?;
    let settings = Settings::from_row(wal_mb, target, timeout)?;
    let warning = checkpoints::warning(estimate, &checkpoints::advise(estimate, settings))?;
    pgrx::warning!("{warning}");
    Some(warning)
}

/// Claims a job slot for `id`, fills it, and launches the leader; an ERROR (with the slot freed) when
/// it cannot start.
fn launch_apply(
    id: &str,
    path: &str,
    parallel: i32,
    job_flags: u32,
    manifest_sha256: &str,
    part_bytes: u64,
    warning: Option<&str>,
) {
    let shared = shmem::require();
    let Some((slot, generation)) = shared.claim_job_slot() else { no_job_slot() };
    let guard = StartGuard::new(slot, generation);
    let job = &shared.jobs[slot];
    let _fits = job.id.set(id);
    job.kind.store(JobKind::Apply as u32, Ordering::Relaxed);
    job.database_oid.store(pg::database_oid(), Ordering::Relaxed);
    job.role_oid.store(pg::current_user_oid(), Ordering::Relaxed);
    job.caller_xid.store(xact::top_xid(), Ordering::Relaxed);
    if job.path.set(path).is_err() || job.manifest_sha256.set(manifest_sha256).is_err() {
        user_error(PgSqlErrorCode::ERRCODE_NAME_TOO_LONG, format!("input_path {path:?} is too long"), None);
    }
    job.parallel_requested.store(parallel as u32, Ordering::Relaxed);
    job.flags.store(job_flags, Ordering::Relaxed);
    job.chunk_pause_ms.store(crate::gucs::CHUNK_PAUSE_MS.get().max(0) as u64, Ordering::Relaxed);
    job.chunk_bytes.store(part_bytes.max(1), Ordering::Relaxed);
    job.warning.set_truncated(warning.unwrap_or_default());
    job.set_phase(Phase::Queued);
    job::launch_leader(Entry::ApplyLeader, shared, slot, generation);
    guard.launched();
}

/// Applies the snapshot in `input_path` to the existing tables of this database, in background workers;
/// returns its id at once.
///
/// Before any row changes, and right here: the manifest must load and validate; every table and sequence
/// must exist with the snapshot's columns and compatible types (one error lists every problem); target
/// tables must be empty unless `truncate`, and not being loaded by another apply; the caller needs
/// pg_read_server_files (or superuser) and INSERT (and TRUNCATE when asked) on every table. With `verify`
/// (default), the job's first phase checks every chunk file and fails, naming every bad chunk, before
/// loading anything. `analyze_tables` runs ANALYZE on the loaded tables at the end.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn start_apply(
    input_path: &str,
    parallel: default!(i32, 4),
    verify: default!(bool, true),
    truncate: default!(bool, false),
    analyze_tables: default!(bool, true),
) -> String {
    shmem::require();
    job::reap_interrupted();
    require_startable("start an apply");
    require_file_role("pg_read_server_files", "read snapshot files on the server");
    let path = check_path("input_path", input_path);
    check_parallel(parallel);
    let (m, sha256) = load_manifest(&path);
    let relids = crate::pg::session::with_settings(&[("jit", "off")], || {
        check_schema(&m);
        check_privileges(&m, truncate);
        let relids = target_relids(&m);
        if !truncate {
            check_empty(&m, &relids);
        }
        relids
    });
    let mut job_flags = 0;
    for (on, f) in [
        (verify, flags::VERIFY),
        (truncate, flags::TRUNCATE),
        (analyze_tables, flags::ANALYZE),
        (rights::is_superuser(), flags::REPLICA),
    ] {
        if on {
            job_flags |= f;
        }
    }
    let part_bytes = crate::gucs::APPLY_PART_SIZE_KB.get().max(1) as u64 * 1024;
    let warning = warn_about_checkpoints(&m, 0, parallel);
    let id = job::new_job_id(JobKind::Apply);
    let (index_defer_bytes, index_memory_kb) = crate::worker::indexes::Settings::from_gucs().to_json();
    let options = serde_json::json!({
        "verify": verify, "truncate": truncate, "analyze": analyze_tables,
        "snapshot_id": m.snapshot_id, "replica_mode": job_flags & flags::REPLICA != 0,
        "manifest_sha256": sha256, "part_size_bytes": part_bytes,
        "index_defer_bytes": index_defer_bytes, "index_memory_kb": index_memory_kb,
        "warning": warning,
    })
    .to_string();
    bookkeeping::insert_operation(&NewOperation {
        id: &id,
        op: "apply",
        path: &path,
        parallel,
        compression: &m.compression.to_string(),
        options: &options,
        role_name: &pg::current_user_name(),
        tables_total: m.tables.len() as i32,
        chunks_total: m.totals.chunks as i32,
    });
    claim_targets(&id, &m, &relids, false);
    launch_apply(&id, &path, parallel, job_flags, &sha256, part_bytes, warning.as_deref());
    id
}

/// Continues a failed or cancelled apply: loads only the rows not yet recorded as loaded (each range of
/// rows and its record committed together), so no row is duplicated or lost. Same id. Refused while the
/// apply runs (also when another resume_apply of it is under way), when the snapshot directory holds
/// another snapshot than the one the apply started on, and when another apply has loaded one of its
/// tables since.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn resume_apply(id: &str) -> String {
    let shared = shmem::require();
    job::reap_interrupted();
    require_startable("resume an apply");
    let Some(op) = bookkeeping::operation(id) else {
        user_error(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no operation with id {id:?}"), None);
    };
    if op.op != "apply" {
        user_error(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{id} is a {}, not an apply", op.op),
            None,
        );
    }
    let not_resumable = |status: &str| -> ! {
        match status {
            "applied" => user_error(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("{id} is already applied"),
                None,
            ),
            s => user_error(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "{id} is {s}: it is running (or being resumed by another session); cancel it or wait for it"
                ),
                None,
            ),
        }
    };
    if !matches!(op.status.as_str(), "failed" | "cancelled") || shared.find_job(id).is_some() {
        not_resumable(&op.status);
    }
    if !op.current_user_acts_for_role() {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to resume {id}, started by role {}", op.role_name),
            Some("Only that role, its members and superusers may resume it."),
        );
    }
    require_file_role("pg_read_server_files", "read snapshot files on the server");
    let (m, sha256) = load_manifest(&op.path);
    let started_on = op.options.get("manifest_sha256").and_then(|v| v.as_str()).unwrap_or_default();
    if started_on != sha256 {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "cannot resume {id}: {} no longer holds the snapshot it started on (its manifest differs)",
                op.path
            ),
            Some("Apply the snapshot that is there now with start_apply(..., truncate => true)."),
        );
    }
    let option = |key: &str| op.options.get(key).and_then(|v| v.as_bool());
    // An apply asked to truncate whose first run stopped before the truncation committed must still
    // truncate: the tables may hold rows it was meant to replace (nothing of its own is loaded yet).
    let truncate = option("truncate").unwrap_or(false) && !option("truncated").unwrap_or(false);
    check_schema(&m);
    check_privileges(&m, truncate);
    let relids = target_relids(&m);
    let mut job_flags = flags::RESUME;
    for (on, f) in [
        (option("verify").unwrap_or(true), flags::VERIFY),
        (option("analyze").unwrap_or(true), flags::ANALYZE),
        (truncate, flags::TRUNCATE),
        (rights::is_superuser(), flags::REPLICA),
    ] {
        if on {
            job_flags |= f;
        }
    }
    // The ranges of rows must line up with those recorded: the part size the apply started with.
    let part_bytes = op
        .options
        .get("part_size_bytes")
        .and_then(|v| v.as_u64())
        .unwrap_or(crate::gucs::APPLY_PART_SIZE_KB.get().max(1) as u64 * 1024);
    if let Err(status) = bookkeeping::begin_resume(id) {
        not_resumable(&status);
    }
    claim_targets(id, &m, &relids, true);
    let warning = warn_about_checkpoints(&m, loaded_bytes(id), op.parallel);
    launch_apply(id, &op.path, op.parallel, job_flags, &sha256, part_bytes, warning.as_deref());
    id.to_string()
}

//! The SQL surface of schema `steep_repl`, one file per family of functions, and the checks they share.
//!
//! Every function here runs as its caller with `search_path` pinned to `pg_catalog, pg_temp` by its
//! definition (`#[search_path(pg_catalog, pg_temp)]`), so no statement inside resolves a name through a
//! schema the caller controls (see `crate::pg::rights`).

pub mod apply;
pub mod health;
pub mod merge;
pub mod nodes;
pub mod overlap;
pub mod progress;
pub mod replica;
pub mod schema;
pub mod snapshot;

use std::path::{Component, Path};

use pgrx::prelude::*;

use crate::pg::{self, rights};
use crate::shmem;

/// Raises an ERROR with a SQLSTATE and an optional hint.
pub fn user_error(code: PgSqlErrorCode, message: String, hint: Option<&str>) -> ! {
    let mut r = pgrx::pg_sys::panic::ErrorReport::new(code, message, "steep_repl::api");
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// Superuser or a member of `role` (pg_write_server_files / pg_read_server_files).
pub fn require_file_role(role: &str, what: &str) {
    let ok = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_has_role(current_user, $1::pg_catalog.name, 'USAGE')",
        &[role.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !ok {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to {what}"),
            Some(&format!("Only superusers and members of {role} may do this.")),
        );
    }
}

/// Refuses, before anything is written, what would make a job fail to start: a server in recovery, a
/// read-only transaction (the job's row could not be written), and a current role its workers cannot
/// connect as (no LOGIN, e.g. after `SET ROLE` to a group role).
pub fn require_startable(what: &str) {
    if pg::recovery_in_progress() {
        user_error(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot {what} while the server is in recovery (a hot standby)"),
            Some("Run it on the primary."),
        );
    }
    if pg::transaction_read_only() {
        user_error(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot {what} in a read-only transaction"),
            Some("The job's row is written in the calling transaction; call it in a read-write transaction."),
        );
    }
    let role = pg::current_user_oid();
    if !rights::role_can_login(role) {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "cannot {what} as role {}: the job's workers connect as the current role, which may not log in",
                pg::current_user_name()
            ),
            Some("Run it as a role with LOGIN (for example RESET ROLE first)."),
        );
    }
}

/// Checks an absolute, normalised path without `..`, not longer than a job can hold, and returns it
/// without trailing slashes.
pub fn check_path(arg: &str, path: &str) -> String {
    let p = Path::new(path);
    if path.is_empty() || !p.is_absolute() {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{arg} must be an absolute path, got {path:?}"),
            Some("Paths are on the database server's file system, e.g. '/data/snap'."),
        );
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{arg} must not contain '..': {path:?}"),
            None,
        );
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.len() > shmem::MAX_PATH_BYTES {
        user_error(
            PgSqlErrorCode::ERRCODE_NAME_TOO_LONG,
            format!("{arg} is {} bytes long; at most {} are supported", trimmed.len(), shmem::MAX_PATH_BYTES),
            Some("Use a shorter path (a symbolic link to the directory works)."),
        );
    }
    if path.contains('\0') {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{arg} contains a NUL byte"),
            None,
        );
    }
    trimmed.to_string()
}

/// Checks `parallel` against its documented range.
pub fn check_parallel(parallel: i32) {
    if !(1..=64).contains(&parallel) {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("parallel must be between 1 and 64, got {parallel}"),
            None,
        );
    }
}

/// The hint for a snapshot file the server cannot read or write: the server's OS user and the path.
pub fn server_user_hint(path: &str) -> String {
    format!(
        "The server runs as the operating-system user \"{}\", which must be able to read {path} and \
         everything under it (a snapshot written by another user, e.g. by the CLI in client mode, needs its \
         ownership or permissions changed).",
        pg::server_os_user()
    )
}

/// The error every `start_*` raises when all job slots are taken.
pub fn no_job_slot() -> ! {
    user_error(
        PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
        format!("too many steep_repl operations are running (at most {} at once)", shmem::MAX_JOBS),
        Some("Wait for one to finish: SELECT * FROM steep_repl.snapshot_progress()."),
    )
}

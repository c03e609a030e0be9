//! Where rights change: the one place steep_repl acts with the extension owner's rights, and the search
//! path every statement of steep_repl runs under.
//!
//! Who runs what:
//! - Every SQL function of the extension runs as its caller, with `search_path` pinned to
//!   [`SAFE_SEARCH_PATH`] by the function definition (`#[search_path]`), so no statement inside
//!   resolves a function, operator or type through a schema the caller controls.
//! - Background workers (leaders, data workers) connect as the role that started the job: its
//!   privileges on tables apply exactly. They pin [`SAFE_SEARCH_PATH`] for their session at start
//!   ([`pin_session`]), overriding any `ALTER ROLE ... SET search_path`.
//! - Bookkeeping (`steep_repl.snapshots`, `work_queue`, `apply_chunks`, `apply_targets`,
//!   `operation_errors`) is written as the extension's owner, through [`as_owner`] alone, which pins
//!   the search path again for the duration and marks the context security-restricted; the statements
//!   themselves live in `crate::bookkeeping` and qualify every name.
//! - The supervisor's reaper connects as the bootstrap superuser, pins [`SAFE_SEARCH_PATH`], and runs
//!   only the bookkeeping statements that mark interrupted jobs failed.

use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The search path every steep_repl statement runs under: the system catalog first, temporary objects
/// last (never before a catalog name), nothing a role can create objects in.
pub const SAFE_SEARCH_PATH: &str = "pg_catalog, pg_temp";

/// Pins the settings of a background worker's session, overriding what `ALTER ROLE/DATABASE ... SET`
/// gave it: `search_path` to [`SAFE_SEARCH_PATH`]; no statement, lock or idle-in-transaction timeout
/// and read-write transactions, as pg_dump and pg_restore set for their sessions (a job's long COPY or
/// its leader's wait for a table must not be cut short, and its bookkeeping must be able to write).
/// Call inside a transaction.
pub fn pin_session() {
    crate::pg::session::set("search_path", SAFE_SEARCH_PATH);
    for (name, value) in [
        ("statement_timeout", "0"),
        ("lock_timeout", "0"),
        ("idle_in_transaction_session_timeout", "0"),
        ("default_transaction_read_only", "off"),
        // Catalog queries over many thousands of relations look expensive enough to be JIT-compiled,
        // which then costs more than running them.
        ("jit", "off"),
    ] {
        crate::pg::session::set(name, value);
    }
}

/// The extension's owner, read from `pg_extension` under the pinned search path.
fn extension_owner() -> pg_sys::Oid {
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT e.extowner FROM pg_catalog.pg_extension e \
         WHERE e.extname OPERATOR(pg_catalog.=) 'steep_repl'::pg_catalog.name",
    )
    .ok()
    .flatten();
    match owner {
        Some(o) => o,
        None => error!(
            "the steep_repl extension is not installed in this database; run CREATE EXTENSION steep_repl"
        ),
    }
}

/// Restores what [`as_owner`] changed, on the normal path. On an ERROR, transaction (or subtransaction)
/// abort restores the user id, security context and settings itself, so nothing is done while a panic
/// unwinds (PostgreSQL cleans up).
struct Restore {
    user: pg_sys::Oid,
    sec_context: i32,
    nest_level: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // SAFETY: restores exactly what as_owner saved, in the same transaction, in reverse order of the
        // changes; AtEOXact_GUC(true, level) pops the settings made since NewGUCNestLevel, as
        // fmgr_security_definer does after a SECURITY DEFINER function with SET clauses.
        unsafe {
            pg_sys::SetUserIdAndSecContext(self.user, self.sec_context);
            pg_sys::AtEOXact_GUC(true, self.nest_level);
        }
    }
}

/// Runs `f` with the extension owner's rights, for bookkeeping statements only. Inside, `search_path`
/// is [`SAFE_SEARCH_PATH`] whatever the caller set, the user id is the owner's, and the context is
/// security-restricted (no `SET ROLE`, no temporary objects), as PostgreSQL does for a SECURITY DEFINER
/// function with `SET search_path` or for maintenance commands run as a table's owner.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let name = CString::new("search_path").expect("no NUL");
    let value = CString::new(SAFE_SEARCH_PATH).expect("no NUL");
    let mut user = pg_sys::InvalidOid;
    let mut sec_context = 0;
    // SAFETY: inside a transaction (every caller is an SQL function or a worker between
    // StartTransactionCommand and commit). NewGUCNestLevel/set_config_option with GUC_ACTION_SAVE is how
    // PostgreSQL applies a function's SET clause; the nest level is popped by Restore or by the abort.
    let nest_level = unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context);
        level
    };
    let restore = Restore { user, sec_context, nest_level };
    // The owner is looked up under the pinned path, as the caller: nothing of the caller's resolves.
    let owner = extension_owner();
    // SAFETY: the documented way to switch the current user for internal operations (RI triggers,
    // maintenance commands); SECURITY_LOCAL_USERID_CHANGE forbids SET ROLE meanwhile and
    // SECURITY_RESTRICTED_OPERATION forbids temporary objects and other session-state changes. Restored
    // by `restore`, or by transaction abort if `f` raises an ERROR.
    unsafe {
        pg_sys::SetUserIdAndSecContext(
            owner,
            sec_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    let r = f();
    drop(restore);
    r
}

/// Whether the current user has the privileges of `role` (directly, through membership with
/// inheritance, or as a superuser): who may see a job's full errors, cancel it or resume it.
pub fn acts_for(role: u32) -> bool {
    // SAFETY: a catalog lookup inside a transaction; has_privs_of_role is true for superusers.
    unsafe { pg_sys::has_privs_of_role(pg_sys::GetUserId(), pg_sys::Oid::from(role)) }
}

/// Whether `role` may log in: background workers connect as the job's role, and a role without LOGIN
/// cannot be connected as (the worker would exit at once).
pub fn role_can_login(role: u32) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT r.rolcanlogin FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) $1",
        &[pg_sys::Oid::from(role).into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Whether the current user is a superuser.
pub fn is_superuser() -> bool {
    // SAFETY: reads the current user's rolsuper through the syscache, inside a transaction.
    unsafe { pg_sys::superuser() }
}

/// Runs `f` as `owner`, the owner of a target table, in a security-restricted context: how a job runs
/// what that owner controls — its triggers (also ENABLE ALWAYS ones under `session_replication_role =
/// replica`), CHECK constraints, index expressions and TRUNCATE triggers — while loading or truncating
/// its table. That code then never runs with the rights of the job's role (a superuser's, say), which
/// a table owner could otherwise borrow by writing a CHECK that calls a function of theirs; PostgreSQL
/// does the same for maintenance commands (ANALYZE, REFRESH MATERIALIZED VIEW) and, since 16, for
/// logical replication's apply workers. The job's role has been checked for INSERT (and TRUNCATE) on
/// the table beforehand. Restored afterwards, or by transaction abort on an ERROR.
pub fn as_table_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut sec_context = 0;
    // SAFETY: as in `as_owner`: save, switch with SECURITY_LOCAL_USERID_CHANGE and
    // SECURITY_RESTRICTED_OPERATION, restore by the guard on the normal path; abort restores on ERROR.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context);
        if owner == user {
            return f();
        }
        pg_sys::SetUserIdAndSecContext(
            owner,
            sec_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    let restore = RestoreUser { user, sec_context };
    let r = f();
    drop(restore);
    r
}

/// Restores the user and security context saved by [`as_table_owner`], except while a panic unwinds.
struct RestoreUser {
    user: pg_sys::Oid,
    sec_context: i32,
}

impl Drop for RestoreUser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // SAFETY: restores exactly what was saved, in the same transaction.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.sec_context) };
    }
}

//! Transactions and snapshots driven by hand, for background workers.
//!
//! A worker cannot import a snapshot through `Spi` or `BackgroundWorker::transaction` (both take a
//! snapshot before our code runs). These functions start the transaction themselves, set REPEATABLE READ
//! before any snapshot exists, import or export, and clean up after errors.

use pgrx::PgSqlErrorCode;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

/// Starts a top-level REPEATABLE READ transaction, read-only when asked. No snapshot is taken yet.
pub fn begin_repeatable_read(read_only: bool) {
    // SAFETY: called outside any transaction (bgworker main loop). Setting XactIsoLevel/XactReadOnly right
    // after StartTransactionCommand, before anything takes a snapshot, is what SET TRANSACTION does.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::XactIsoLevel = pg_sys::XACT_REPEATABLE_READ as i32;
        pg_sys::XactReadOnly = read_only;
    }
}

/// Releases every heavyweight lock this process holds, session-level ones included, by starting a
/// transaction and aborting it (an abort releases session locks too). For the end of a process that
/// took session locks (`pg::lock_relation_for_session`): a clean exit with no transaction open would
/// leave them in the shared lock table.
pub fn release_all_locks() {
    // SAFETY: called outside any transaction; StartTransactionCommand followed by
    // AbortCurrentTransaction is a complete, empty transaction whose abort runs ProcReleaseLocks.
    unsafe {
        pg_sys::StartTransactionCommand();
        pg_sys::AbortCurrentTransaction();
    }
}

/// Starts a READ COMMITTED read-write transaction (for COPY FROM, bookkeeping).
pub fn begin_read_committed() {
    // SAFETY: called outside any transaction; defaults of a new transaction are the session's (READ
    // COMMITTED unless default_transaction_isolation says otherwise, which workers do not set).
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
    }
}

/// Imports an exported snapshot into the transaction just begun (as SET TRANSACTION SNAPSHOT).
/// Raises an ERROR if the exporting transaction is gone or the name is invalid.
pub fn import_snapshot(name: &str) {
    let c = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: must run in a REPEATABLE READ transaction before any snapshot was taken (begin_* above);
    // ImportSnapshot validates the name and raises an ERROR on any problem.
    unsafe { pg_sys::ImportSnapshot(c.as_ptr()) };
}

/// Pushes the transaction snapshot as the active snapshot (heap scans and TOAST fetches need one).
pub fn push_transaction_snapshot() {
    // SAFETY: inside a transaction; GetTransactionSnapshot returns the (imported) transaction snapshot.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
}

/// Pops the snapshot pushed by `push_transaction_snapshot`.
pub fn pop_snapshot() {
    // SAFETY: paired with push_transaction_snapshot in the same transaction.
    unsafe { pg_sys::PopActiveSnapshot() };
}

/// Commits the current transaction.
pub fn commit() {
    // SAFETY: a transaction started by begin_* is in progress.
    unsafe { pg_sys::CommitTransactionCommand() };
}

/// After catching an ERROR: forgets the error and aborts whatever transaction is open, so the next one
/// can start clean.
pub fn abort_after_error() {
    // SAFETY: FlushErrorState only clears the error stack; AbortCurrentTransaction copes with any
    // transaction state, including none and a failed one, and releases locks, buffers and memory.
    unsafe {
        pg_sys::FlushErrorState();
        pg_sys::AbortCurrentTransaction();
    }
}

/// Whether a transaction is open.
pub fn in_transaction() -> bool {
    // SAFETY: reads transaction state only.
    unsafe { pg_sys::IsTransactionState() }
}

/// The top-level transaction id of the current transaction, assigning one if needed.
pub fn top_xid() -> u32 {
    // SAFETY: inside a transaction (an SQL function call).
    unsafe { pg_sys::GetTopTransactionId() }.into_inner()
}

/// Whether a transaction that is no longer running committed.
pub fn xid_committed(xid: u32) -> bool {
    // SAFETY: reads the commit log; valid for an xid that is not in progress any more.
    unsafe { pg_sys::TransactionIdDidCommit(pg_sys::TransactionId::from(xid)) }
}

/// Whether a transaction is still running.
pub fn xid_in_progress(xid: u32) -> bool {
    // SAFETY: reads the proc array.
    unsafe { pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(xid)) }
}

/// An ERROR (or panic) caught by [`try_catch`]: what it says, and what of it every role may read.
#[derive(Debug, Clone)]
pub struct Caught {
    /// The SQLSTATE, e.g. `23505`.
    pub sqlstate: String,
    /// Its condition name, e.g. `unique_violation`.
    pub condition: String,
    pub message: String,
    pub detail: Option<String>,
    /// Whether the text may quote row data (see [`Caught::public`]).
    pub may_hold_data: bool,
}

/// SQLSTATEs whose messages are steep_repl's own even when PostgreSQL hands them back (an ERROR raised
/// in a COPY data callback comes back through COPY as PostgreSQL's), or PostgreSQL's fixed wording
/// without values: a chunk that failed its checks (`data_corrupted`, also PostgreSQL's "invalid page"),
/// a stop or cancel (`query_canceled`, also timeouts), a terminate (`admin_shutdown`).
const WORDED_BY_US: [&str; 3] = ["XX001", "57014", "57P01"];

impl Caught {
    fn from_report(code: PgSqlErrorCode, message: &str, detail: Option<&str>, ours: bool) -> Caught {
        let sqlstate = unpack_sqlstate(code as i32);
        let condition = format!("{code:?}").trim_start_matches("ERRCODE_").to_ascii_lowercase();
        let may_hold_data = !ours && !WORDED_BY_US.contains(&sqlstate.as_str());
        Caught {
            sqlstate,
            condition,
            message: message.to_string(),
            detail: detail.filter(|d| !d.is_empty()).map(str::to_string),
            may_hold_data,
        }
    }

    /// The message with its detail: for the job's role, superusers and the server log.
    pub fn full(&self) -> String {
        match &self.detail {
            Some(d) => format!("{} ({})", self.message, d),
            None => self.message.clone(),
        }
    }

    /// What every role may read. steep_repl's own messages name files, tables, settings and processes,
    /// never a value of a row: they are shown whole. A message PostgreSQL raised while a job ran
    /// (COPY's type input, a constraint, a user's trigger or CHECK expression, a `regclass` value that
    /// names no relation) can quote row data in its text or its DETAIL, whatever its SQLSTATE class:
    /// only its condition name and SQLSTATE are shown (`unique_violation (SQLSTATE 23505)`), with the
    /// context steep_repl adds (which chunk of which table).
    pub fn public(&self) -> String {
        if self.may_hold_data {
            format!(
                "{} (SQLSTATE {}; the full message is shown to the job's role)",
                self.condition, self.sqlstate
            )
        } else {
            self.message.clone()
        }
    }
}

/// The five characters of a SQLSTATE packed by PostgreSQL's MAKE_SQLSTATE (six bits each, first
/// character lowest).
fn unpack_sqlstate(mut packed: i32) -> String {
    let mut s = String::with_capacity(5);
    for _ in 0..5 {
        s.push(char::from(((packed & 0x3F) as u8).wrapping_add(b'0')));
        packed >>= 6;
    }
    s
}

/// Runs `f`, turning a PostgreSQL ERROR or a Rust panic inside it into `Err`. The caller must then call
/// [`abort_after_error`] before starting another transaction.
pub fn try_catch<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, Caught> {
    PgTryBuilder::new(move || Ok(f())).catch_others(|e| Err(caught(&e))).execute()
}

/// What a caught error says.
pub fn caught(e: &CaughtError) -> Caught {
    let (report, ours) = match e {
        CaughtError::PostgresError(r) => (r, false),
        CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => (r, true),
    };
    Caught::from_report(report.sql_error_code(), report.message(), report.detail(), ours)
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn sqlstates_unpack_and_data_stays_private() {
        assert_eq!(super::unpack_sqlstate(PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION as i32), "23505");
        let c = super::Caught::from_report(
            PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
            "duplicate key value violates unique constraint \"t_pkey\"",
            Some("Key (ssn)=(123-45-6789) already exists."),
            false,
        );
        assert!(!c.public().contains("123-45"), "{}", c.public());
        assert!(c.public().contains("unique_violation (SQLSTATE 23505"), "{}", c.public());
        assert!(c.full().contains("123-45-6789"));
        let c = super::Caught::from_report(
            PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
            "invalid input syntax for type integer: \"secret\"",
            None,
            false,
        );
        assert_eq!(c.sqlstate, "22P02");
        assert!(!c.public().contains("secret"), "{}", c.public());
        assert!(c.public().contains("invalid_text_representation"), "{}", c.public());
        // A class that is usually names only, carrying a value from a row (a regclass column).
        let c = super::Caught::from_report(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            "relation \"s.people_123-45-6789\" does not exist",
            None,
            false,
        );
        assert!(!c.public().contains("123"), "{}", c.public());
        // steep_repl's own messages are shown whole.
        let c = super::Caught::from_report(
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            "cannot load into t",
            None,
            true,
        );
        assert_eq!(c.public(), "cannot load into t");
    }
}

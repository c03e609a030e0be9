//! Transactions and snapshots driven by hand, for background workers.
//!
//! A worker cannot import a snapshot through `Spi` or `BackgroundWorker::transaction` (both take a
//! snapshot before our code runs). These functions start the transaction themselves, set REPEATABLE READ
//! before any snapshot exists, import or export, and clean up after errors.

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

/// Whether a transaction is still running.
pub fn xid_in_progress(xid: u32) -> bool {
    // SAFETY: reads the proc array.
    unsafe { pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(xid)) }
}

/// Runs `f`, turning a PostgreSQL ERROR or a Rust panic inside it into `Err(message)`. The caller must
/// then call [`abort_after_error`] before starting another transaction.
pub fn try_catch<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, String> {
    PgTryBuilder::new(move || Ok(f())).catch_others(|e| Err(caught_message(&e))).execute()
}

/// The message of a caught error, with its detail when there is one.
pub fn caught_message(e: &CaughtError) -> String {
    let report = match e {
        CaughtError::PostgresError(r)
        | CaughtError::ErrorReport(r)
        | CaughtError::RustPanic { ereport: r, .. } => r,
    };
    match report.detail() {
        Some(d) if !d.is_empty() => format!("{} ({})", report.message(), d),
        _ => report.message().to_string(),
    }
}

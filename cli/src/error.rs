//! CLI errors and the exit codes of PRODUCT.md §5. Every error is converted to an exit code once, in
//! `main`; messages never contain a password.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

/// Everything went well.
pub const EXIT_OK: u8 = 0;
/// Any error without a more specific code, including a job that failed.
pub const EXIT_ERROR: u8 = 1;
/// Bad usage (clap exits with 2 by itself for argument errors).
pub const EXIT_USAGE: u8 = 2;
/// The target schema does not match the snapshot, or two nodes differ (`schema compare`, `overlap`).
pub const EXIT_SCHEMA_MISMATCH: u8 = 3;
/// The job was cancelled.
pub const EXIT_CANCELLED: u8 = 4;
/// Waiting timed out.
pub const EXIT_TIMEOUT: u8 = 5;
/// The server could not be reached or refused the connection.
pub const EXIT_CONNECTION: u8 = 6;
/// A snapshot failed verification.
pub const EXIT_VERIFY_FAILED: u8 = 7;
/// Ctrl-C detached from a job that keeps running (128 + SIGINT, the shell's convention).
pub const EXIT_DETACHED: u8 = 130;

/// The job error text with which the server reports a snapshot that failed verification.
pub const VERIFICATION_FAILED_PREFIX: &str = "verification failed:";

/// An error that ends the command.
#[derive(Debug, Error)]
pub enum CliError {
    /// The connection could not be established: names the target, never the password.
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    /// A connection parameter (from -d or the PG* environment) is malformed.
    #[error("invalid connection parameters: {0}")]
    ConnParams(String),
    /// The server answered with an error to a query.
    #[error("{context}: {}", query_message(.source))]
    Query {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The command line asks for something that cannot be done (found after parsing).
    #[error("{0}")]
    Usage(String),
    /// The target database's tables do not match the snapshot; every problem is listed.
    #[error("the target schema does not match the snapshot ({} problem(s)):{}", .problems.len(), Lines(.problems))]
    SchemaMismatch { problems: Vec<String> },
    /// `replica init`'s preflight found problems (every one is listed); nothing was changed. Exit 3 when
    /// they are all schema problems of the target, else 1.
    #[error("replica preflight failed ({} problem(s)), nothing was changed:{}", .problems.len(), Lines(.problems))]
    Preflight { problems: Vec<String>, schema_only: bool },
    /// Two nodes' schemas differ (`schema compare`, `schema diff`); the differences were printed.
    #[error("the schema differs from {peer}'s in {count} object(s)")]
    SchemaDiffers { peer: String, count: usize },
    /// Two nodes' rows differ (`overlap`), or some tables were not compared (skipped for want of a key,
    /// or truncated by a limit); the tables were printed.
    #[error("{}", overlap_message(.peer, *.differ, *.not_compared))]
    OverlapDiffers { peer: String, differ: usize, not_compared: usize },
    /// The snapshot failed verification; every problem is listed.
    #[error("{}: verification failed ({} problem(s)):{}", .dir.display(), .problems.len(), Lines(.problems))]
    VerifyFailed { dir: PathBuf, problems: Vec<String> },
    /// The job ended as failed on the server or in this process.
    #[error("{op} {id} failed: {error}")]
    JobFailed { op: String, id: String, error: String },
    /// The job was cancelled.
    #[error("{op} {id} was cancelled{}", .detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Cancelled { op: String, id: String, detail: Option<String> },
    /// Following the job timed out (it keeps running on the server, when it runs there).
    #[error("stopped waiting for {id} after {seconds} s{}", Hints(.hints))]
    TimedOut { id: String, seconds: u64, hints: Vec<String> },
    /// Ctrl-C detached from a job that keeps running on the server.
    #[error("detached from {id}; it keeps running on the server{}", Hints(.hints))]
    Detached { id: String, hints: Vec<String> },
    /// The connection was lost and could not be re-established.
    #[error("lost the connection to {target} while following {id} and could not reconnect: {reason}{}", Hints(.hints))]
    ConnectionLost { target: String, id: String, reason: String, hints: Vec<String> },
    /// A snapshot-format operation failed (names the file, table or chunk).
    #[error("{context}: {source}")]
    Engine {
        context: String,
        #[source]
        source: steep_repl_engine::Error,
    },
    /// A file operation failed.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Connect { .. } | CliError::ConnParams(_) | CliError::ConnectionLost { .. } => {
                EXIT_CONNECTION
            }
            CliError::Query { source, .. } if is_connection_error(source) => EXIT_CONNECTION,
            CliError::Query { source, .. } if sqlstate(source) == Some("57014") => EXIT_TIMEOUT,
            CliError::Usage(_) => EXIT_USAGE,
            CliError::SchemaMismatch { .. }
            | CliError::SchemaDiffers { .. }
            | CliError::OverlapDiffers { .. } => EXIT_SCHEMA_MISMATCH,
            CliError::Preflight { schema_only: true, .. } => EXIT_SCHEMA_MISMATCH,
            CliError::Preflight { .. } => EXIT_ERROR,
            CliError::VerifyFailed { .. } => EXIT_VERIFY_FAILED,
            CliError::JobFailed { error, .. } if error.starts_with(VERIFICATION_FAILED_PREFIX) => {
                EXIT_VERIFY_FAILED
            }
            CliError::Cancelled { .. } => EXIT_CANCELLED,
            CliError::TimedOut { .. } => EXIT_TIMEOUT,
            CliError::Detached { .. } => EXIT_DETACHED,
            CliError::Engine { source: steep_repl_engine::Error::Chunk(_), .. } => EXIT_VERIFY_FAILED,
            CliError::Engine { source: steep_repl_engine::Error::Manifest(_), .. } => EXIT_VERIFY_FAILED,
            CliError::Query { .. }
            | CliError::JobFailed { .. }
            | CliError::Engine { .. }
            | CliError::Io { .. }
            | CliError::Other(_) => EXIT_ERROR,
        }
    }

    /// Wraps a query error with what was being done.
    pub fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CliError {
        let context = context.into();
        move |source| CliError::Query { context, source }
    }

    /// Wraps an engine error with what was being done.
    pub fn engine(context: impl Into<String>) -> impl FnOnce(steep_repl_engine::Error) -> CliError {
        let context = context.into();
        move |source| CliError::Engine { context, source }
    }

    /// A file error on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CliError {
        let path = path.into();
        move |source| CliError::Io { op, path, source }
    }

    /// True when the error means the server connection is gone (so following may reconnect).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            CliError::Query { source, .. } => is_connection_error(source),
            CliError::Connect { .. } | CliError::ConnectionLost { .. } => true,
            _ => false,
        }
    }

    /// The SQLSTATE of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            CliError::Query { source, .. } => sqlstate(source),
            _ => None,
        }
    }

    /// The server's message for a server error (without the context), if this is one.
    pub fn server_message(&self) -> Option<String> {
        match self {
            CliError::Query { source, .. } => source.as_db_error().map(|d| d.message().to_string()),
            _ => None,
        }
    }
}

/// The SQLSTATE of a server error.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().map(|d| d.code().code())
}

/// A closed connection, or a server error of class 08 (connection exception) or 57P01..57P03
/// (shutdown, crash, cannot connect now).
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match sqlstate(e) {
        Some(code) => code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03"),
        // A client-side I/O error (reset, broken pipe) has no SQLSTATE.
        None => std::error::Error::source(e).is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()),
    }
}

/// The server's message with its detail and hint, or the client error.
fn query_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_string();
            if let Some(d) = db.detail() {
                s.push_str(&format!("\nDETAIL: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("\nHINT: {h}"));
            }
            s
        }
        None => {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                let text = s.to_string();
                if !reason.contains(&text) {
                    reason = format!("{reason}: {text}");
                }
                source = s.source();
            }
            reason
        }
    }
}

/// `2 table(s) differ from node b's; 1 table(s) not compared with node b's (skipped or truncated)`.
fn overlap_message(peer: &str, differ: usize, not_compared: usize) -> String {
    let mut parts = Vec::new();
    if differ > 0 {
        parts.push(format!("{differ} table(s) differ from {peer}'s"));
    }
    if not_compared > 0 {
        parts.push(format!("{not_compared} table(s) not compared with {peer}'s (skipped or truncated)"));
    }
    parts.join("; ")
}

/// Problems, one per indented line.
struct Lines<'a>(&'a [String]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Follow-up commands, one per line.
struct Hints<'a>(&'a [String]);

impl fmt::Display for Hints<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for h in self.0 {
            write!(f, "\n  {h}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let e = CliError::SchemaMismatch { problems: vec!["a".into(), "b".into()] };
        assert_eq!(e.exit_code(), EXIT_SCHEMA_MISMATCH);
        assert!(e.to_string().ends_with("(2 problem(s)):\n  - a\n  - b"), "{e}");
        let e = CliError::JobFailed {
            op: "apply".into(),
            id: "app-1".into(),
            error: "verification failed: chunk x".into(),
        };
        assert_eq!(e.exit_code(), EXIT_VERIFY_FAILED);
        let e = CliError::JobFailed { op: "apply".into(), id: "app-1".into(), error: "disk full".into() };
        assert_eq!(e.exit_code(), EXIT_ERROR);
        let e = CliError::Detached { id: "gen-1".into(), hints: vec!["follow: x".into()] };
        assert_eq!(e.exit_code(), EXIT_DETACHED);
        assert!(e.to_string().contains("\n  follow: x"));
        assert_eq!(
            CliError::Cancelled { op: "generate".into(), id: "g".into(), detail: None }.exit_code(),
            4
        );
        assert_eq!(CliError::TimedOut { id: "g".into(), seconds: 3, hints: vec![] }.exit_code(), 5);
        assert_eq!(CliError::Usage("x".into()).exit_code(), EXIT_USAGE);
        let e = CliError::OverlapDiffers { peer: "node b".into(), differ: 2, not_compared: 1 };
        assert_eq!(e.exit_code(), EXIT_SCHEMA_MISMATCH);
        assert_eq!(
            e.to_string(),
            "2 table(s) differ from node b's; 1 table(s) not compared with node b's (skipped or truncated)"
        );
        let e = CliError::OverlapDiffers { peer: "the peer".into(), differ: 0, not_compared: 3 };
        assert_eq!(e.to_string(), "3 table(s) not compared with the peer's (skipped or truncated)");
        assert_eq!(EXIT_OK, 0);
    }
}

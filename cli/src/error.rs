//! CLI errors and the exit codes of PRODUCT.md §5.

use thiserror::Error;

/// Everything went well.
#[allow(dead_code)]
pub const EXIT_OK: u8 = 0;
/// Any error without a more specific code.
pub const EXIT_ERROR: u8 = 1;
/// Bad usage (clap exits with 2 by itself for argument errors).
#[allow(dead_code)]
pub const EXIT_USAGE: u8 = 2;
/// The target schema does not match the snapshot.
#[allow(dead_code)]
pub const EXIT_SCHEMA_MISMATCH: u8 = 3;
/// The job was cancelled.
#[allow(dead_code)]
pub const EXIT_CANCELLED: u8 = 4;
/// Waiting timed out.
#[allow(dead_code)]
pub const EXIT_TIMEOUT: u8 = 5;
/// The server could not be reached or refused the connection.
pub const EXIT_CONNECTION: u8 = 6;
/// A snapshot failed verification.
#[allow(dead_code)]
pub const EXIT_VERIFY_FAILED: u8 = 7;

/// An error that ends the command. Messages never contain a password.
#[derive(Debug, Error)]
pub enum CliError {
    /// The connection could not be established: names the target, never the password.
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    /// A connection parameter (from -d or the PG* environment) is malformed.
    #[error("invalid connection parameters: {0}")]
    ConnParams(String),
    /// The server answered with an error to a query.
    #[error("{context}: {source}")]
    Query {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Connect { .. } | CliError::ConnParams(_) => EXIT_CONNECTION,
            CliError::Query { source, .. } if source.is_closed() => EXIT_CONNECTION,
            CliError::Query { .. } | CliError::Other(_) => EXIT_ERROR,
        }
    }

    /// Wraps a query error with what was being done.
    pub fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CliError {
        let context = context.into();
        move |source| CliError::Query { context, source }
    }
}

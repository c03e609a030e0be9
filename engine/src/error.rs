//! Typed errors of the engine.
//!
//! Every error names what it is about: the file (absolute or snapshot-relative path), the table
//! (`"schema"."name"`) or the chunk concerned, and for checksum failures which check failed with
//! both the expected and the found value. Callers convert them once at their boundary: the extension
//! into a PostgreSQL `ERROR` with a SQLSTATE, the CLI into an exit code.
//!
//! Chunk check failures travel through `std::io::Read` as an [`std::io::Error`] of kind
//! [`std::io::ErrorKind::InvalidData`] wrapping a [`ChunkError`]; [`ChunkError::from_io`] gets the
//! typed error back out.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Any failure of an engine operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O call failed on `path`.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "write", "fsync", "rename", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A compression specification that is not `none`, `zstd` or `zstd:N` with N in 1..=22.
    #[error("invalid compression {input:?}: {reason} (expected none, zstd or zstd:N with N in 1..=22)")]
    InvalidCompression {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A chunk path that is not a normalised relative path below `data/`.
    #[error("unsafe chunk path {path:?}: {reason}")]
    UnsafePath {
        /// The path given.
        path: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// The chunk planner refused its input.
    #[error(transparent)]
    Plan(#[from] PlanError),

    /// A chunk file failed one of its checks.
    #[error(transparent)]
    Chunk(#[from] ChunkError),

    /// The manifest is missing, unreadable, of another format version, or inconsistent.
    #[error(transparent)]
    Manifest(#[from] ManifestError),

    /// Verification was told to stop before it checked every chunk.
    #[error("verification stopped before the end")]
    Stopped,

    /// The verifier's thread pool could not be started.
    #[error("cannot start {threads} verification threads: {reason}")]
    ThreadPool {
        /// Threads asked for.
        threads: usize,
        /// Why rayon refused.
        reason: String,
    },
}

impl Error {
    /// Builds an [`Error::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }
}

/// Why the chunk planner refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A target chunk size of 0 bytes cannot be planned for.
    #[error("target chunk size must be greater than 0 bytes")]
    ZeroChunkSize,
    /// The same table was given twice.
    #[error("table {table} is listed twice")]
    DuplicateTable {
        /// `"schema"."name"` of the table.
        table: String,
    },
}

/// A chunk file that failed a check, naming the file and the check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {check}", file.display())]
pub struct ChunkError {
    /// The chunk file (as opened, usually `<snapshot>/data/<table-dir>/<NNNNNN>.copy.zst`).
    pub file: PathBuf,
    /// The check that failed.
    pub check: ChunkCheck,
}

impl ChunkError {
    /// Wraps this error into an `io::Error` of kind `InvalidData`, as `std::io::Read` requires.
    pub fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }

    /// Returns the chunk error carried by an `io::Error` made by [`ChunkError::into_io`], if any.
    pub fn from_io(error: &io::Error) -> Option<&ChunkError> {
        error.get_ref().and_then(|inner| inner.downcast_ref::<ChunkError>())
    }
}

/// Which check of a chunk file failed, with the expected and found values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkCheck {
    /// The file on disk has another size than the manifest records.
    FileSize {
        /// Bytes recorded in the manifest.
        expected: u64,
        /// Bytes found on disk.
        found: u64,
    },
    /// The CRC-32 of the file's bytes differs from the manifest.
    FileCrc {
        /// CRC recorded in the manifest.
        expected: u32,
        /// CRC computed now.
        found: u32,
    },
    /// The CRC-32 of the decompressed bytes differs from the manifest.
    RawCrc {
        /// CRC recorded in the manifest.
        expected: u32,
        /// CRC computed now.
        found: u32,
    },
    /// The decompressed stream has another length than the manifest records.
    RawSize {
        /// Bytes recorded in the manifest.
        expected: u64,
        /// Bytes decompressed (when larger, at least this many).
        found: u64,
    },
    /// The decompressed stream has another number of rows (newlines) than the manifest records.
    RowCount {
        /// Rows recorded in the manifest.
        expected: u64,
        /// Rows counted.
        found: u64,
    },
    /// The zstd stream could not be decoded.
    Decompress(String),
    /// Reading the file failed after it was opened (an I/O error of the device or file system).
    Read(String),
    /// The file name ends neither in `.copy.zst` nor in `.copy`, so its encoding is unknown.
    UnknownEncoding,
}

impl fmt::Display for ChunkCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkCheck::FileSize { expected, found } if found < expected => {
                write!(f, "truncated: expected {expected} bytes, found {found}")
            }
            ChunkCheck::FileSize { expected, found } => {
                write!(f, "file too long: expected {expected} bytes, found {found}")
            }
            ChunkCheck::FileCrc { expected, found } => {
                write!(f, "file CRC mismatch: expected 0x{expected:08x}, found 0x{found:08x}")
            }
            ChunkCheck::RawCrc { expected, found } => {
                write!(f, "decompressed CRC mismatch: expected 0x{expected:08x}, found 0x{found:08x}")
            }
            ChunkCheck::RawSize { expected, found } => {
                write!(f, "decompressed size mismatch: expected {expected} bytes, found {found}")
            }
            ChunkCheck::RowCount { expected, found } => {
                write!(f, "row count mismatch: expected {expected} rows, found {found}")
            }
            ChunkCheck::Decompress(reason) => write!(f, "zstd decompression failed: {reason}"),
            ChunkCheck::Read(reason) => write!(f, "read failed: {reason}"),
            ChunkCheck::UnknownEncoding => {
                write!(f, "file name ends neither in .copy.zst nor in .copy")
            }
        }
    }
}

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// There is no `manifest.json`: the snapshot never finished.
    #[error(
        "{}: incomplete snapshot: no manifest.json (it is written last; a snapshot without it is never applied)",
        dir.display()
    )]
    Missing {
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// `manifest.json` is not valid JSON of the expected shape.
    #[error("{}: malformed manifest: {reason}", path.display())]
    Malformed {
        /// Path of `manifest.json`.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The manifest was written by a newer steep-repl.
    #[error(
        "{}: written by a newer steep-repl (format_version {found}, this build reads {})",
        path.display(),
        crate::manifest::FORMAT_VERSION
    )]
    NewerFormat {
        /// Path of `manifest.json`.
        path: PathBuf,
        /// The version found.
        found: u64,
    },
    /// The manifest's `format_version` is missing, 0 or not a number.
    #[error(
        "{}: unknown format_version {found} (this build reads {})",
        path.display(),
        crate::manifest::FORMAT_VERSION
    )]
    UnknownFormat {
        /// Path of `manifest.json`.
        path: PathBuf,
        /// What was found, as JSON text (`missing` when absent).
        found: String,
    },
    /// The manifest parsed but breaks one or more consistency rules; all of them are listed.
    #[error("{}: invalid manifest, {} problem(s):{}", path.display(), problems.len(), ProblemList(problems))]
    Invalid {
        /// Path of `manifest.json`.
        path: PathBuf,
        /// Every rule broken, each naming its table and chunk.
        problems: Vec<ManifestProblem>,
    },
    /// `manifest.json` exists but could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// One broken manifest rule, naming the table and chunk it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestProblem {
    /// `"schema"."name"` of the table concerned, if any.
    pub table: Option<String>,
    /// Index of the chunk concerned, if any.
    pub chunk: Option<u32>,
    /// What is wrong.
    pub detail: String,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(table) = &self.table {
            write!(f, "table {table}")?;
            if let Some(chunk) = self.chunk {
                write!(f, " chunk {chunk}")?;
            }
            write!(f, ": ")?;
        }
        f.write_str(&self.detail)
    }
}

/// Formats a list of problems as indented lines.
struct ProblemList<'a>(&'a [ManifestProblem]);

/// How many problems a message lists before "and N more": a hostile manifest can break a rule millions
/// of times, and an error message must stay small (inside PostgreSQL, a message over 1 GB is fatal).
pub const MAX_LISTED_PROBLEMS: usize = 20;

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in self.0.iter().take(MAX_LISTED_PROBLEMS) {
            write!(f, "\n  - {problem}")?;
        }
        if self.0.len() > MAX_LISTED_PROBLEMS {
            write!(f, "\n  - and {} more", self.0.len() - MAX_LISTED_PROBLEMS)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_errors_name_file_and_check() {
        let e = ChunkError {
            file: PathBuf::from("/s/data/public.t/000000.copy.zst"),
            check: ChunkCheck::FileCrc { expected: 0xdead_beef, found: 0x0000_0001 },
        };
        assert_eq!(
            e.to_string(),
            "/s/data/public.t/000000.copy.zst: file CRC mismatch: expected 0xdeadbeef, found 0x00000001"
        );
        let short = ChunkCheck::FileSize { expected: 10, found: 4 };
        assert_eq!(short.to_string(), "truncated: expected 10 bytes, found 4");
        let io = e.clone().into_io();
        assert_eq!(io.kind(), io::ErrorKind::InvalidData);
        assert_eq!(ChunkError::from_io(&io), Some(&e));
    }

    #[test]
    fn invalid_manifest_lists_every_problem() {
        let e = ManifestError::Invalid {
            path: PathBuf::from("/s/manifest.json"),
            problems: vec![
                ManifestProblem {
                    table: Some("\"public\".\"t\"".into()),
                    chunk: Some(2),
                    detail: "block range starts at 7, expected 8".into(),
                },
                ManifestProblem {
                    table: None,
                    chunk: None,
                    detail: "totals.rows is 3, chunks sum to 4".into(),
                },
            ],
        };
        let text = e.to_string();
        assert!(text.contains("2 problem(s)"), "{text}");
        assert!(text.contains("table \"public\".\"t\" chunk 2: block range"), "{text}");
        assert!(text.contains("\n  - totals.rows"), "{text}");
    }
}

//! Snapshot verification: the checks behind `steep-repl snapshot verify` and apply's pre-check.
//!
//! - [`VerifyMode::Quick`]: for every chunk of the manifest, the file exists, is a regular file,
//!   has the recorded size and the recorded CRC-32 of its bytes (read with `read(2)`, never
//!   mapped, so a file changed during the check is a problem, never a `SIGBUS`).
//! - [`VerifyMode::Deep`]: Quick, then decompresses each chunk and checks the recorded raw size,
//!   raw CRC-32 and row count ([`ChunkReader`]).
//!
//! Both modes also check the manifest ([`Manifest::validate`]) and list every entry under `data/`
//! that the manifest does not name (extra or renamed files, leftover temporary files of an
//! interrupted writer, symbolic links). Chunks are checked in parallel with rayon. Every problem
//! is reported, not just the first; a missing or unreadable manifest is itself a problem, so the
//! report is the single answer to "can this snapshot be applied?".

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

use std::sync::atomic::{AtomicU32, Ordering};

use rayon::prelude::*;
use serde::Serialize;

use crate::chunk::{ChunkReader, check_file, is_temp_file_name};
use crate::error::{ChunkCheck, Error, ManifestError};
use crate::manifest::{ChunkEntry, Manifest, TableEntry};
use crate::naming::{DATA_DIR, check_rel_path};

/// How thoroughly to check chunk files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// File size and file CRC-32.
    Quick,
    /// Quick, plus decompression, raw size, raw CRC-32 and row count.
    Deep,
}

/// Options of [`verify_snapshot_with`].
#[derive(Clone, Copy, Debug)]
pub struct VerifyOptions {
    /// How thoroughly to check chunks.
    pub mode: VerifyMode,
    /// Threads checking chunks; `None` uses rayon's global pool (one thread per core).
    pub threads: Option<usize>,
    /// With `threads`: the helper threads block every signal that can be blocked, so that signals sent
    /// to the process are handled by the thread that called, never by a helper. Needed inside a
    /// process whose signal handlers assume one thread (a PostgreSQL backend).
    pub signals_to_caller: bool,
    /// When given: once it holds a value other than 0, no further chunk is checked and the
    /// verification ends with [`Error::Stopped`] (a cancel of the job it runs for).
    pub stop: Option<&'static AtomicU32>,
}

/// What kind of problem a [`Problem`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// No `manifest.json`: the snapshot is incomplete and is never applied.
    MissingManifest,
    /// `manifest.json` is not JSON of the expected shape, or cannot be read.
    MalformedManifest,
    /// `manifest.json` has a format version this build does not read.
    UnsupportedFormat,
    /// The manifest parsed but breaks a consistency rule ([`Manifest::validate`]).
    InvalidManifest,
    /// A chunk file named by the manifest does not exist.
    MissingChunk,
    /// A snapshot path is a symbolic link, directory or special file where a regular file (or a
    /// directory) is expected.
    NotRegular,
    /// A chunk file's size differs from the manifest (truncated or grown).
    SizeMismatch,
    /// A chunk file's CRC-32 differs from the manifest.
    FileCrcMismatch,
    /// A chunk's decompressed CRC-32 differs from the manifest.
    RawCrcMismatch,
    /// A chunk's decompressed size differs from the manifest.
    RawSizeMismatch,
    /// A chunk's row count differs from the manifest.
    RowCountMismatch,
    /// A chunk's zstd stream is invalid.
    Decompress,
    /// A file or directory under `data/` the manifest does not name.
    ExtraFile,
    /// An I/O error other than a missing file.
    Io,
}

impl ProblemKind {
    /// Stable snake_case name (as in JSON output).
    pub fn as_str(&self) -> &'static str {
        match self {
            ProblemKind::MissingManifest => "missing_manifest",
            ProblemKind::MalformedManifest => "malformed_manifest",
            ProblemKind::UnsupportedFormat => "unsupported_format",
            ProblemKind::InvalidManifest => "invalid_manifest",
            ProblemKind::MissingChunk => "missing_chunk",
            ProblemKind::NotRegular => "not_regular",
            ProblemKind::SizeMismatch => "size_mismatch",
            ProblemKind::FileCrcMismatch => "file_crc_mismatch",
            ProblemKind::RawCrcMismatch => "raw_crc_mismatch",
            ProblemKind::RawSizeMismatch => "raw_size_mismatch",
            ProblemKind::RowCountMismatch => "row_count_mismatch",
            ProblemKind::Decompress => "decompress",
            ProblemKind::ExtraFile => "extra_file",
            ProblemKind::Io => "io",
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing wrong with a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What kind of problem.
    pub kind: ProblemKind,
    /// `"schema"."name"` of the table concerned, if any.
    pub table: Option<String>,
    /// Snapshot-relative path of the file concerned, if any.
    pub file: Option<String>,
    /// What exactly is wrong, with expected and found values where there are some.
    pub detail: String,
}

impl Problem {
    fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Problem { kind, table: None, file: None, detail: detail.into() }
    }

    fn at(mut self, table: Option<String>, file: Option<String>) -> Self {
        self.table = table;
        self.file = file;
        self
    }
}

impl fmt::Display for Problem {
    /// `kind: table "s"."t" data/…/000001.copy.zst: detail`, leaving out what is not known.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.kind)?;
        match (&self.table, &self.file) {
            (Some(table), Some(file)) => write!(f, "table {table} {file}: ")?,
            (Some(table), None) => write!(f, "table {table}: ")?,
            (None, Some(file)) => write!(f, "{file}: ")?,
            (None, None) => {}
        }
        f.write_str(&self.detail)
    }
}

/// The outcome of verifying a snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// The mode used.
    pub mode: VerifyMode,
    /// Every problem found: manifest problems first, then chunks in manifest order, then extra
    /// entries by path. Empty when the snapshot is sound.
    pub problems: Vec<Problem>,
    /// Chunk files checked (whether or not they passed).
    pub chunks_checked: u64,
    /// File bytes whose CRC was computed.
    pub file_bytes_checked: u64,
    /// Decompressed bytes checked (Deep only).
    pub raw_bytes_checked: u64,
    /// The manifest, when it could be read (even if it has problems).
    #[serde(skip)]
    pub manifest: Option<Manifest>,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Bytes checked for one chunk.
struct Checked {
    file_bytes: u64,
    raw_bytes: u64,
}

/// Verifies the snapshot in `dir` using rayon's global thread pool. See the module documentation.
pub fn verify_snapshot(dir: &Path, mode: VerifyMode) -> VerifyReport {
    run(dir, mode, None)
}

/// Verifies the snapshot in `dir` with `options.threads` threads (or the global pool). Fails only
/// if the thread pool cannot be started; problems with the snapshot are in the report.
pub fn verify_snapshot_with(dir: &Path, options: &VerifyOptions) -> Result<VerifyReport, Error> {
    let stopped = || options.stop.is_some_and(|s| s.load(Ordering::Acquire) != 0);
    let report = match options.threads {
        None => run(dir, options.mode, options.stop),
        Some(threads) => {
            let mut builder = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("steep-verify-{i}"));
            if options.signals_to_caller {
                builder = builder.start_handler(|_| {
                    crate::helper_thread::block_all_signals();
                });
            }
            // Threads inherit their creator's mask: blocked from their first instruction on when
            // signals go to the caller (start_handler blocks them again, for threads started later).
            let old = options.signals_to_caller.then(crate::helper_thread::block_all_signals);
            let pool = builder.build();
            if let Some(old) = old {
                crate::helper_thread::restore_signals(&old);
            }
            let pool = pool.map_err(|e| Error::ThreadPool { threads, reason: e.to_string() })?;
            pool.install(|| run(dir, options.mode, options.stop))
        }
    };
    if stopped() { Err(Error::Stopped) } else { Ok(report) }
}

/// Checks one chunk of `table` in the snapshot `dir`: what apply runs before loading it.
pub fn verify_chunk(
    dir: &Path,
    table: &TableEntry,
    chunk: &ChunkEntry,
    mode: VerifyMode,
) -> Result<(), Problem> {
    check_chunk(dir, table, chunk, mode).map(|_| ())
}

fn run(dir: &Path, mode: VerifyMode, stop: Option<&AtomicU32>) -> VerifyReport {
    let mut report = VerifyReport {
        mode,
        problems: Vec::new(),
        chunks_checked: 0,
        file_bytes_checked: 0,
        raw_bytes_checked: 0,
        manifest: None,
    };
    let manifest = match Manifest::read(dir) {
        Ok(manifest) => manifest,
        Err(e) => {
            let kind = match &e {
                ManifestError::Missing { .. } => ProblemKind::MissingManifest,
                ManifestError::NewerFormat { .. } | ManifestError::UnknownFormat { .. } => {
                    ProblemKind::UnsupportedFormat
                }
                ManifestError::Malformed { .. }
                | ManifestError::Invalid { .. }
                | ManifestError::Io { .. } => ProblemKind::MalformedManifest,
            };
            report.problems.push(Problem::new(kind, e.to_string()));
            return report;
        }
    };
    for problem in manifest.validate() {
        report.problems.push(Problem {
            kind: ProblemKind::InvalidManifest,
            table: problem.table.clone(),
            file: None,
            detail: match problem.chunk {
                Some(chunk) => format!("chunk {chunk}: {}", problem.detail),
                None => problem.detail,
            },
        });
    }

    // Only chunks whose path is safe are opened; unsafe ones were reported above.
    let jobs: Vec<(&TableEntry, &ChunkEntry)> = manifest
        .tables
        .iter()
        .flat_map(|t| t.chunks.iter().map(move |c| (t, c)))
        .filter(|(_, c)| check_rel_path(&c.file).is_ok())
        .collect();
    let stopped = || stop.is_some_and(|s| s.load(Ordering::Acquire) != 0);
    let results: Vec<Result<Checked, Problem>> = jobs
        .par_iter()
        .with_max_len(1)
        .filter(|_| !stopped())
        .map(|(table, chunk)| check_chunk(dir, table, chunk, mode))
        .collect();
    if stopped() {
        return report;
    }
    for result in results {
        report.chunks_checked += 1;
        match result {
            Ok(checked) => {
                report.file_bytes_checked += checked.file_bytes;
                report.raw_bytes_checked += checked.raw_bytes;
            }
            Err(problem) => report.problems.push(problem),
        }
    }
    report.problems.extend(find_extra_entries(dir, &jobs));
    report.manifest = Some(manifest);
    report
}

fn check_chunk(
    dir: &Path,
    table: &TableEntry,
    chunk: &ChunkEntry,
    mode: VerifyMode,
) -> Result<Checked, Problem> {
    let located = |p: Problem| p.at(Some(table.label()), Some(chunk.file.clone()));
    if let Err(reason) = check_rel_path(&chunk.file) {
        return Err(located(Problem::new(
            ProblemKind::InvalidManifest,
            format!("unsafe chunk path, not opened: {reason}"),
        )));
    }
    // Nothing is read through a symbolic link: no byte (nor size, nor CRC in a message) of a file
    // outside the snapshot.
    if let Err(e) = crate::chunk::check_chunk_dirs(dir, &chunk.file) {
        return Err(located(Problem::new(ProblemKind::NotRegular, e.to_string())));
    }
    let path = chunk.path_in(dir);
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(located(Problem::new(
                ProblemKind::NotRegular,
                "is a symbolic link, not a regular file",
            )));
        }
        Ok(meta) if !meta.is_file() => {
            return Err(located(Problem::new(ProblemKind::NotRegular, "is not a regular file")));
        }
        Ok(_) => {}
        Err(e) => return Err(located(io_problem(&e))),
    }
    let result = match mode {
        VerifyMode::Quick => check_file(&path, chunk).map(|file_bytes| Checked { file_bytes, raw_bytes: 0 }),
        VerifyMode::Deep => ChunkReader::open(&path, chunk).and_then(|mut reader| {
            reader.check_to_end()?;
            Ok(Checked { file_bytes: reader.file_bytes(), raw_bytes: reader.raw_bytes_read() })
        }),
    };
    result.map_err(|e| located(error_problem(&e)))
}

fn io_problem(e: &io::Error) -> Problem {
    if e.kind() == io::ErrorKind::NotFound {
        Problem::new(ProblemKind::MissingChunk, "missing: no such file")
    } else {
        Problem::new(ProblemKind::Io, e.to_string())
    }
}

fn error_problem(e: &Error) -> Problem {
    match e {
        Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => io_problem(source),
        Error::Chunk(chunk) => {
            let kind = match &chunk.check {
                ChunkCheck::FileSize { .. } => ProblemKind::SizeMismatch,
                ChunkCheck::FileCrc { .. } => ProblemKind::FileCrcMismatch,
                ChunkCheck::RawCrc { .. } => ProblemKind::RawCrcMismatch,
                ChunkCheck::RawSize { .. } => ProblemKind::RawSizeMismatch,
                ChunkCheck::RowCount { .. } => ProblemKind::RowCountMismatch,
                ChunkCheck::Decompress(_) => ProblemKind::Decompress,
                ChunkCheck::Read(_) => ProblemKind::Io,
                ChunkCheck::UnknownEncoding => ProblemKind::InvalidManifest,
            };
            Problem::new(kind, chunk.check.to_string())
        }
        other => Problem::new(ProblemKind::Io, other.to_string()),
    }
}

/// Lists every entry under `data/` that is not one of the chunk files of `jobs` (or their
/// directories), sorted by path.
fn find_extra_entries(dir: &Path, jobs: &[(&TableEntry, &ChunkEntry)]) -> Vec<Problem> {
    // data/<table-dir>/<file>, as split from each (already checked) chunk path.
    let mut expected: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (_, chunk) in jobs {
        let mut parts = chunk.file.splitn(3, '/');
        if let (Some(_data), Some(table_dir), Some(name)) = (parts.next(), parts.next(), parts.next()) {
            expected.entry(table_dir).or_default().insert(name);
        }
    }
    let mut problems = Vec::new();
    let data = dir.join(DATA_DIR);
    if fs::symlink_metadata(&data).is_ok_and(|m| !m.is_dir()) {
        problems.push(
            Problem::new(ProblemKind::NotRegular, "is a symbolic link or a file, not a directory")
                .at(None, Some(DATA_DIR.to_string())),
        );
        return problems;
    }
    let entries = match fs::read_dir(&data) {
        Ok(entries) => entries,
        // No data/ at all: every chunk is already reported missing.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return problems,
        Err(e) => {
            problems.push(
                Problem::new(ProblemKind::Io, format!("cannot list {DATA_DIR}/: {e}"))
                    .at(None, Some(DATA_DIR.to_string())),
            );
            return problems;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                problems.push(
                    Problem::new(ProblemKind::Io, format!("cannot list {DATA_DIR}/: {e}"))
                        .at(None, Some(DATA_DIR.to_string())),
                );
                continue;
            }
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{DATA_DIR}/{name}");
        let file_type = match entry.file_type() {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem::new(ProblemKind::Io, e.to_string()).at(None, Some(rel)));
                continue;
            }
        };
        match expected.get(name.as_str()) {
            Some(files) if file_type.is_dir() => {
                list_table_dir(&entry.path(), &rel, files, &mut problems);
            }
            Some(_) => problems.push(
                Problem::new(
                    ProblemKind::NotRegular,
                    "table directory is a symbolic link or a file, not a directory",
                )
                .at(None, Some(rel)),
            ),
            None => problems.push(extra(&name, &rel, file_type)),
        }
    }
    problems.sort_by(|a, b| a.file.cmp(&b.file));
    problems
}

fn list_table_dir(path: &Path, rel_dir: &str, files: &HashSet<&str>, problems: &mut Vec<Problem>) {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) => {
            problems.push(
                Problem::new(ProblemKind::Io, format!("cannot list directory: {e}"))
                    .at(None, Some(rel_dir.to_string())),
            );
            return;
        }
    };
    for entry in entries {
        match entry.and_then(|e| Ok((e.file_name(), e.file_type()?))) {
            Ok((name, file_type)) => {
                let name = name.to_string_lossy().into_owned();
                // Expected names are checked (type, size, CRC) by check_chunk.
                if !files.contains(name.as_str()) {
                    problems.push(extra(&name, &format!("{rel_dir}/{name}"), file_type));
                }
            }
            Err(e) => problems.push(
                Problem::new(ProblemKind::Io, format!("cannot list directory: {e}"))
                    .at(None, Some(rel_dir.to_string())),
            ),
        }
    }
}

fn extra(name: &str, rel: &str, file_type: fs::FileType) -> Problem {
    let detail = if file_type.is_dir() {
        "directory not named by the manifest"
    } else if file_type.is_symlink() {
        "symbolic link not named by the manifest"
    } else if is_temp_file_name(name) {
        "leftover temporary file of an interrupted write, not named by the manifest"
    } else {
        "file not named by the manifest (extra or renamed)"
    };
    Problem::new(ProblemKind::ExtraFile, detail).at(None, Some(rel.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_display_kind_table_file_and_detail() {
        let p = Problem::new(ProblemKind::FileCrcMismatch, "file CRC mismatch: expected 0x1, found 0x2")
            .at(Some("\"public\".\"t\"".into()), Some("data/public.t/000000.copy.zst".into()));
        assert_eq!(
            p.to_string(),
            "file_crc_mismatch: table \"public\".\"t\" data/public.t/000000.copy.zst: \
             file CRC mismatch: expected 0x1, found 0x2"
        );
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["kind"], "file_crc_mismatch");
        assert_eq!(Problem::new(ProblemKind::MissingManifest, "x").to_string(), "missing_manifest: x");
    }

    #[test]
    fn missing_directory_is_a_missing_manifest() {
        let report = verify_snapshot(Path::new("/nonexistent/steep-repl/snapshot"), VerifyMode::Quick);
        assert_eq!(report.problems.len(), 1);
        assert_eq!(report.problems[0].kind, ProblemKind::MissingManifest);
        assert!(!report.is_ok());
    }
}

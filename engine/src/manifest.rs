//! `manifest.json`: the description of a finished snapshot (format version 1, PRODUCT.md §3).
//!
//! The manifest is written last, atomically (temporary file, fsync, rename, fsync directory), so
//! a snapshot directory without `manifest.json` is incomplete and is never applied.
//!
//! JSON layout (all sizes in bytes, all CRCs CRC-32/IEEE as unsigned 32-bit numbers):
//!
//! ```json
//! {
//!   "format_version": 1,                       // this module reads exactly 1; newer is refused
//!   "snapshot_id": "…",                        // id returned by start_snapshot / printed by the CLI
//!   "created_at": "2024-03-01T12:00:00Z",      // RFC 3339, UTC: when generation started
//!   "finished_at": "2024-03-01T12:05:00Z",     // when the last chunk was written
//!   "source": {
//!     "server_version": "16.2",                // SHOW server_version
//!     "server_version_num": 160002,            // SHOW server_version_num
//!     "database": "app",                       // current_database()
//!     "system_identifier": "7301…"             // pg_control_system(), a string: it exceeds 2^53
//!   },
//!   "snapshot": {
//!     "lsn": "0/3000148",                      // WAL position the snapshot corresponds to
//!     "exported_snapshot": "00000003-0000001B-1", // pg_export_snapshot() name all workers used
//!     "replication_slot": "steep_slot",        // slot created with the snapshot, or null
//!     "plugin": "pgoutput"                     // that slot's output plugin, or null
//!   },
//!   "settings": { "DateStyle": "ISO", "TimeZone": "UTC", … }, // session settings COPY ran under
//!   "compression": "zstd:1",                   // "none" or "zstd:N"
//!   "parallel": { "requested": 8, "used": 8 }, // workers asked for and actually run
//!   "chunk_size_bytes": 268435456,             // target raw chunk size the plan used
//!   "mode": "direct",                          // "direct" (server workers) or "client" (CLI)
//!   "tables": [ {
//!     "schema": "public", "name": "orders",    // unquoted identifiers
//!     "dir": "public.orders",                  // naming::table_dir(schema, name)
//!     "columns": [ { "name": "id", "type": "bigint" } ], // COPY column list, in order
//!     "rows": 10, "raw_bytes": 420, "file_bytes": 160,   // sums over the chunks
//!     "chunks": [ {
//!       "index": 0,                            // 0..n, contiguous
//!       "file": "data/public.orders/000000.copy.zst", // naming::chunk_rel_path(dir, index, compression)
//!       "block_start": 0, "block_end": null,   // [start, end) heap blocks; null = open-ended (last only)
//!       "rows": 10, "raw_bytes": 420, "file_bytes": 160,
//!       "raw_crc32": 123, "file_crc32": 456
//!     } ]
//!   } ],
//!   "sequences": [ { "schema": "public", "name": "orders_id_seq", "last_value": 10, "is_called": true } ],
//!   "totals": { "tables": 1, "chunks": 1, "rows": 10, "raw_bytes": 420, "file_bytes": 160 }
//! }
//! ```
//!
//! [`Manifest::validate`] checks every structural rule (see its documentation) and reports all
//! problems at once; [`Manifest::load`] refuses a manifest with any.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkStats, Compression, create_temp_file, fsync_dir};
use crate::error::{Error, ManifestError, ManifestProblem};
use crate::ident::QualifiedName;
use crate::naming::{check_rel_path, chunk_rel_path, table_dir};

/// The manifest format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// File name of the manifest in the snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The largest chunk (raw or file bytes) a manifest may record: 1 TiB, far above any chunk a writer
/// plans, and low enough that sums over every chunk a manifest can hold never overflow.
pub const MAX_CHUNK_BYTES: u64 = 1 << 40;

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1 bytes); longer names cannot be a table's.
pub const MAX_NAME_BYTES: usize = 63;

/// A string from the manifest as messages show it: cut to a readable length (a hostile manifest can
/// hold megabytes in one field, and every message about it must stay small).
fn shown(s: &str) -> String {
    const MAX: usize = 120;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &s[..end], s.len())
}

/// What is wrong with a name from the manifest as a PostgreSQL identifier, if anything.
fn name_problem(what: &str, name: &str) -> Option<String> {
    if name.is_empty() {
        Some(format!("{what} is empty"))
    } else if name.len() > MAX_NAME_BYTES {
        Some(format!("{what} {} is longer than {MAX_NAME_BYTES} bytes", shown(name)))
    } else if name.contains('\0') {
        Some(format!("{what} {} contains a NUL byte", shown(name)))
    } else {
        None
    }
}

/// The largest manifest any reader accepts: 1 GiB, about ten million chunks. A snapshot directory is
/// untrusted input (the server reads it inside PostgreSQL): a larger file is refused before it is read.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// A snapshot's manifest. See the module documentation for the meaning of every field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] when written by this build.
    pub format_version: u32,
    /// The snapshot's id.
    pub snapshot_id: String,
    /// When generation started.
    pub created_at: DateTime<Utc>,
    /// When the last chunk was written.
    pub finished_at: DateTime<Utc>,
    /// The server the snapshot was taken from.
    pub source: Source,
    /// The MVCC snapshot all chunks were read under.
    pub snapshot: SnapshotInfo,
    /// Session settings COPY ran under (the pinned ones, `TimeZone`, `server_encoding`, ...).
    pub settings: BTreeMap<String, String>,
    /// How chunk files are stored.
    pub compression: Compression,
    /// Workers requested and used.
    pub parallel: Parallelism,
    /// Target raw chunk size the plan used.
    pub chunk_size_bytes: u64,
    /// Where the generating workers ran.
    pub mode: Mode,
    /// Every table, with its chunks.
    pub tables: Vec<TableEntry>,
    /// Every sequence's state at the snapshot.
    pub sequences: Vec<SequenceEntry>,
    /// Sums over all tables.
    pub totals: Totals,
}

/// The source server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// `server_version`, e.g. `16.2`.
    pub server_version: String,
    /// `server_version_num`, e.g. `160002`.
    pub server_version_num: u32,
    /// Database name.
    pub database: String,
    /// `pg_control_system().system_identifier`, as a decimal string.
    pub system_identifier: String,
}

/// The MVCC snapshot the chunks were read under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// WAL position (`X/Y`) the snapshot corresponds to; logical replication starts there.
    pub lsn: String,
    /// Name of the exported snapshot every worker imported.
    pub exported_snapshot: String,
    /// Replication slot created with the snapshot, if one was. Then `lsn` is that slot's consistent
    /// point (its `confirmed_flush_lsn` at creation): the data holds exactly the transactions committed
    /// before it, and the slot streams exactly those committed after it.
    #[serde(default)]
    pub replication_slot: Option<String>,
    /// The slot's output plugin (`pgoutput`), when there is a slot.
    #[serde(default)]
    pub plugin: Option<String>,
}

/// Worker counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parallelism {
    /// Workers asked for.
    pub requested: u32,
    /// Workers that actually ran (fewer when worker slots or chunks ran short).
    pub used: u32,
}

/// Where a snapshot was generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// In the server's background workers (`--direct`, `start_snapshot`).
    Direct,
    /// In the CLI over client connections (`--client`).
    Client,
}

/// One column of a table's COPY column list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// Column name, unquoted.
    pub name: String,
    /// Type as `format_type(atttypid, atttypmod)` prints it, e.g. `numeric(12,2)`.
    #[serde(rename = "type")]
    pub type_name: String,
}

/// One table of the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// Schema name, unquoted.
    pub schema: String,
    /// Table name, unquoted.
    pub name: String,
    /// Directory under `data/`: [`table_dir`]`(schema, name)`.
    pub dir: String,
    /// The COPY column list, in order (generated and dropped columns excluded).
    pub columns: Vec<Column>,
    /// Sum of the chunks' rows.
    pub rows: u64,
    /// Sum of the chunks' raw bytes.
    pub raw_bytes: u64,
    /// Sum of the chunks' file bytes.
    pub file_bytes: u64,
    /// The chunks, by index.
    pub chunks: Vec<ChunkEntry>,
}

/// One chunk file of a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// 0-based index within the table.
    pub index: u32,
    /// Snapshot-relative path: [`chunk_rel_path`]`(table.dir, index, compression)`.
    pub file: String,
    /// First heap block of the range.
    pub block_start: u32,
    /// End of the range (exclusive); `None` (JSON null) only for the last, open-ended chunk.
    pub block_end: Option<u32>,
    /// Rows in the chunk.
    pub rows: u64,
    /// Decompressed size.
    pub raw_bytes: u64,
    /// File size.
    pub file_bytes: u64,
    /// CRC-32 of the decompressed bytes.
    pub raw_crc32: u32,
    /// CRC-32 of the file's bytes.
    pub file_crc32: u32,
}

/// A sequence's state at the snapshot, to be set with `setval(seq, last_value, is_called)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceEntry {
    /// Schema name, unquoted.
    pub schema: String,
    /// Sequence name, unquoted.
    pub name: String,
    /// `last_value`.
    pub last_value: i64,
    /// `is_called`.
    pub is_called: bool,
}

/// Sums over the whole snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Number of tables.
    pub tables: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Rows.
    pub rows: u64,
    /// Decompressed bytes.
    pub raw_bytes: u64,
    /// File bytes.
    pub file_bytes: u64,
}

impl ChunkEntry {
    /// The manifest entry for a chunk written by [`crate::ChunkWriter`].
    pub fn from_stats(index: u32, block_start: u32, block_end: Option<u32>, stats: ChunkStats) -> Self {
        ChunkEntry {
            index,
            file: stats.file,
            block_start,
            block_end,
            rows: stats.rows,
            raw_bytes: stats.raw_bytes,
            file_bytes: stats.file_bytes,
            raw_crc32: stats.raw_crc32,
            file_crc32: stats.file_crc32,
        }
    }

    /// Absolute path of the chunk file in `snapshot_dir`. Only meaningful for a validated manifest
    /// (whose files are checked to stay inside `data/`).
    pub fn path_in(&self, snapshot_dir: &Path) -> PathBuf {
        snapshot_dir.join(&self.file)
    }
}

impl TableEntry {
    /// An entry with no chunks yet; `dir` is derived from the names.
    pub fn new(schema: impl Into<String>, name: impl Into<String>, columns: Vec<Column>) -> Self {
        let schema = schema.into();
        let name = name.into();
        TableEntry {
            dir: table_dir(&schema, &name),
            schema,
            name,
            columns,
            rows: 0,
            raw_bytes: 0,
            file_bytes: 0,
            chunks: Vec::new(),
        }
    }

    /// `"schema"."name"`, for messages.
    pub fn label(&self) -> String {
        QualifiedName::new(self.schema.as_str(), self.name.as_str()).to_string()
    }

    /// `(rows, raw_bytes, file_bytes)` summed over the chunks (saturating).
    pub fn chunk_sums(&self) -> (u64, u64, u64) {
        self.chunks.iter().fold((0u64, 0u64, 0u64), |(r, raw, file), c| {
            (r.saturating_add(c.rows), raw.saturating_add(c.raw_bytes), file.saturating_add(c.file_bytes))
        })
    }

    /// Sets `rows`, `raw_bytes` and `file_bytes` to the sums over the chunks.
    pub fn refresh_totals(&mut self) {
        (self.rows, self.raw_bytes, self.file_bytes) = self.chunk_sums();
    }
}

impl Manifest {
    /// Totals computed from the chunks of every table (saturating).
    pub fn compute_totals(&self) -> Totals {
        let mut totals = Totals { tables: self.tables.len() as u64, ..Totals::default() };
        for table in &self.tables {
            let (rows, raw, file) = table.chunk_sums();
            totals.chunks = totals.chunks.saturating_add(table.chunks.len() as u64);
            totals.rows = totals.rows.saturating_add(rows);
            totals.raw_bytes = totals.raw_bytes.saturating_add(raw);
            totals.file_bytes = totals.file_bytes.saturating_add(file);
        }
        totals
    }

    /// Sets every table's sums and the manifest's totals from the chunks.
    pub fn refresh_totals(&mut self) {
        for table in &mut self.tables {
            table.refresh_totals();
        }
        self.totals = self.compute_totals();
    }

    /// Checks every structural rule and returns every problem found (empty when valid):
    ///
    /// - `format_version` is [`FORMAT_VERSION`];
    /// - each table's `dir` is `table_dir(schema, name)`; no two tables share `(schema, name)` or
    ///   `dir`; no table has two columns of the same name;
    /// - each table has at least one chunk; chunk indexes are `0..n` in order; block ranges start at
    ///   0, are contiguous and non-empty, and only the last chunk is (and must be) open-ended;
    /// - each chunk `file` is a normalised relative path inside `data/` (no `..`, no absolute path,
    ///   no backslash) equal to `chunk_rel_path(table_dir(schema, name), index, compression)`, and
    ///   no file is listed twice;
    /// - for `compression = none`, each chunk's file size and CRC equal its raw size and CRC;
    /// - each table's `rows`, `raw_bytes`, `file_bytes` equal the sums over its chunks, and `totals`
    ///   equal the sums over all tables;
    /// - no sequence is listed twice.
    pub fn validate(&self) -> Vec<ManifestProblem> {
        let mut problems = Vec::new();
        let mut problem = |table: Option<&TableEntry>, chunk: Option<u32>, detail: String| {
            let label = table.map(|t| {
                if t.schema.len() + t.name.len() > 2 * MAX_NAME_BYTES {
                    format!("{}.{}", shown(&t.schema), shown(&t.name))
                } else {
                    t.label()
                }
            });
            problems.push(ManifestProblem { table: label, chunk, detail });
        };
        if self.format_version != FORMAT_VERSION {
            problem(
                None,
                None,
                format!("format_version is {}, expected {FORMAT_VERSION}", self.format_version),
            );
        }
        let mut names = HashSet::new();
        let mut dirs = HashSet::new();
        let mut files = HashSet::new();
        for table in &self.tables {
            let t = Some(table);
            for p in [name_problem("schema", &table.schema), name_problem("table name", &table.name)]
                .into_iter()
                .flatten()
            {
                problem(t, None, p);
            }
            let expected_dir = table_dir(&table.schema, &table.name);
            if table.dir != expected_dir {
                problem(t, None, format!("dir is {}, expected {}", shown(&table.dir), shown(&expected_dir)));
            }
            if !names.insert((table.schema.as_str(), table.name.as_str())) {
                problem(t, None, "table listed twice".to_string());
            }
            if !dirs.insert(table.dir.as_str()) {
                problem(t, None, format!("dir {:?} used by another table", table.dir));
            }
            let mut columns = HashSet::new();
            for column in &table.columns {
                if let Some(p) = name_problem("column name", &column.name) {
                    problem(t, None, p);
                } else if !columns.insert(column.name.as_str()) {
                    problem(t, None, format!("column {} listed twice", shown(&column.name)));
                }
                if column.type_name.len() > 4 * MAX_NAME_BYTES || column.type_name.contains('\0') {
                    problem(t, None, format!("column type {} is not a type name", shown(&column.type_name)));
                }
            }
            if table.chunks.is_empty() {
                problem(
                    t,
                    None,
                    "has no chunks (every table has at least one, the last open-ended)".to_string(),
                );
            }
            let last = table.chunks.len().saturating_sub(1);
            let mut previous_end: Option<Option<u32>> = None;
            for (position, chunk) in table.chunks.iter().enumerate() {
                let c = Some(chunk.index);
                if u32::try_from(position).ok() != Some(chunk.index) {
                    problem(t, c, format!("chunk at position {position} has index {}", chunk.index));
                }
                match check_rel_path(&chunk.file) {
                    Err(reason) => {
                        problem(t, c, format!("unsafe file path {}: {reason}", shown(&chunk.file)))
                    }
                    Ok(()) => {
                        let expected = chunk_rel_path(&expected_dir, chunk.index, &self.compression);
                        if chunk.file != expected {
                            problem(
                                t,
                                c,
                                format!("file is {}, expected {}", shown(&chunk.file), shown(&expected)),
                            );
                        }
                    }
                }
                if !files.insert(chunk.file.as_str()) {
                    problem(t, c, format!("file {} listed twice", shown(&chunk.file)));
                }
                if chunk.raw_bytes > MAX_CHUNK_BYTES || chunk.file_bytes > MAX_CHUNK_BYTES {
                    problem(
                        t,
                        c,
                        format!(
                            "raw_bytes {} or file_bytes {} is more than a chunk can be ({MAX_CHUNK_BYTES})",
                            chunk.raw_bytes, chunk.file_bytes
                        ),
                    );
                }
                if chunk.rows > chunk.raw_bytes {
                    problem(
                        t,
                        c,
                        format!(
                            "{} rows in {} bytes (every row ends in a newline)",
                            chunk.rows, chunk.raw_bytes
                        ),
                    );
                }
                match previous_end {
                    None if chunk.block_start != 0 => problem(
                        t,
                        c,
                        format!("first chunk starts at block {}, expected 0", chunk.block_start),
                    ),
                    Some(Some(end)) if chunk.block_start != end => problem(
                        t,
                        c,
                        format!(
                            "starts at block {}, but the previous chunk ends at block {end}",
                            chunk.block_start
                        ),
                    ),
                    _ => {}
                }
                match chunk.block_end {
                    None if position != last => {
                        problem(t, c, "open-ended (block_end null) but not the last chunk".to_string())
                    }
                    Some(end) if position == last => {
                        problem(t, c, format!("last chunk must be open-ended, but ends at block {end}"))
                    }
                    Some(end) if end <= chunk.block_start => {
                        problem(t, c, format!("empty block range [{}, {end})", chunk.block_start))
                    }
                    _ => {}
                }
                previous_end = Some(chunk.block_end);
                if self.compression == Compression::None
                    && (chunk.file_bytes != chunk.raw_bytes || chunk.file_crc32 != chunk.raw_crc32)
                {
                    problem(
                        t,
                        c,
                        "uncompressed chunk whose file size or CRC differs from its raw size or CRC"
                            .to_string(),
                    );
                }
            }
            let (rows, raw, file) = table.chunk_sums();
            for (field, recorded, sum) in [
                ("rows", table.rows, rows),
                ("raw_bytes", table.raw_bytes, raw),
                ("file_bytes", table.file_bytes, file),
            ] {
                if recorded != sum {
                    problem(t, None, format!("{field} is {recorded}, but its chunks sum to {sum}"));
                }
            }
        }
        let computed = self.compute_totals();
        for (field, recorded, sum) in [
            ("tables", self.totals.tables, computed.tables),
            ("chunks", self.totals.chunks, computed.chunks),
            ("rows", self.totals.rows, computed.rows),
            ("raw_bytes", self.totals.raw_bytes, computed.raw_bytes),
            ("file_bytes", self.totals.file_bytes, computed.file_bytes),
        ] {
            if recorded != sum {
                problem(None, None, format!("totals.{field} is {recorded}, but the tables sum to {sum}"));
            }
        }
        let mut sequences = HashSet::new();
        for sequence in &self.sequences {
            for p in [
                name_problem("sequence schema", &sequence.schema),
                name_problem("sequence name", &sequence.name),
            ]
            .into_iter()
            .flatten()
            {
                problem(None, None, p);
            }
            if !sequences.insert((sequence.schema.as_str(), sequence.name.as_str())) {
                problem(
                    None,
                    None,
                    format!(
                        "sequence {} listed twice",
                        QualifiedName::new(sequence.schema.as_str(), sequence.name.as_str())
                    ),
                );
            }
        }
        problems
    }

    /// Reads and parses `dir/manifest.json` and checks its format version, without
    /// [`validate`](Self::validate). For tools that want to report validation problems themselves
    /// (verify); everything else uses [`load`](Self::load).
    pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
        Self::read_text(dir).and_then(|(path, text)| Self::parse(path, &text))
    }

    /// The bytes of `dir/manifest.json`, refusing one larger than [`MAX_MANIFEST_BYTES`] before reading it.
    fn read_text(dir: &Path) -> Result<(PathBuf, Vec<u8>), ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let (file, meta) = match crate::chunk::open_regular(&path) {
            Ok(opened) => opened,
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing { dir: dir.to_path_buf() });
            }
            Err(Error::Io { op, source, .. }) => return Err(ManifestError::Io { op, path, source }),
            Err(other) => {
                return Err(ManifestError::Io {
                    op: "open",
                    path,
                    source: io::Error::other(other.to_string()),
                });
            }
        };
        let len = meta.len();
        if len > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Malformed {
                path,
                reason: format!("{len} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have"),
            });
        }
        let mut text = Vec::with_capacity(len as usize);
        io::Read::read_to_end(&mut io::Read::take(file, MAX_MANIFEST_BYTES + 1), &mut text)
            .map_err(|source| ManifestError::Io { op: "read", path: path.clone(), source })?;
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Malformed {
                path,
                reason: format!("more than the {MAX_MANIFEST_BYTES} bytes a manifest may have"),
            });
        }
        Ok((path, text))
    }

    fn parse(path: PathBuf, text: &[u8]) -> Result<Manifest, ManifestError> {
        let malformed =
            |e: serde_json::Error| ManifestError::Malformed { path: path.clone(), reason: e.to_string() };
        // The version decides how to read the rest, so look at it first.
        #[derive(Deserialize)]
        struct VersionOnly {
            format_version: Option<serde_json::Value>,
        }
        let version: VersionOnly = serde_json::from_slice(text).map_err(malformed)?;
        match version.format_version {
            None => {
                return Err(ManifestError::UnknownFormat { path, found: "missing".to_string() });
            }
            Some(value) => match value.as_u64() {
                Some(v) if v == u64::from(FORMAT_VERSION) => {}
                Some(v) if v > u64::from(FORMAT_VERSION) => {
                    return Err(ManifestError::NewerFormat { path, found: v });
                }
                _ => {
                    return Err(ManifestError::UnknownFormat { path, found: value.to_string() });
                }
            },
        }
        serde_json::from_slice(text).map_err(malformed)
    }

    /// [`load`](Self::load), also returning the SHA-256 (lower-case hex) of the manifest's bytes: the
    /// identity of a snapshot, so that a job started on one can refuse another put in its place.
    pub fn load_with_sha256(dir: &Path) -> Result<(Manifest, String), ManifestError> {
        use sha2::Digest;
        let (path, text) = Self::read_text(dir)?;
        let digest = sha2::Sha256::digest(&text);
        let hex = digest.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let manifest = Self::parse(path.clone(), &text)?;
        let problems = manifest.validate();
        if !problems.is_empty() {
            return Err(ManifestError::Invalid { path, problems });
        }
        Ok((manifest, hex))
    }

    /// Reads `dir/manifest.json` and refuses it unless it is complete, of format version 1 and
    /// passes every rule of [`validate`](Self::validate) (all problems are listed in the error).
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        Self::load_with_sha256(dir).map(|(manifest, _)| manifest)
    }

    /// Validates the manifest, then writes it as `dir/manifest.json` atomically: pretty JSON to a
    /// temporary file in `dir`, fsync, rename, fsync `dir`. Refuses (writing nothing) a manifest
    /// that [`load`](Self::load) would refuse.
    pub fn write_atomic(&self, dir: &Path) -> Result<(), ManifestError> {
        let final_path = dir.join(MANIFEST_FILE);
        let problems = self.validate();
        if !problems.is_empty() {
            return Err(ManifestError::Invalid { path: final_path, problems });
        }
        let mut json = serde_json::to_vec_pretty(self)
            .map_err(|e| ManifestError::Malformed { path: final_path.clone(), reason: e.to_string() })?;
        json.push(b'\n');
        let io_error = |op, path: &Path, source| ManifestError::Io { op, path: path.to_path_buf(), source };
        let (mut file, tmp_path) = create_temp_file(dir, MANIFEST_FILE).map_err(|e| match e {
            Error::Io { op, path, source } => io_error(op, &path, source),
            other => io_error("create", dir, io::Error::other(other.to_string())),
        })?;
        let written = file
            .write_all(&json)
            .and_then(|()| file.sync_all())
            .and_then(|()| fs::rename(&tmp_path, &final_path));
        drop(file);
        if let Err(e) = written {
            if fs::remove_file(&tmp_path).is_err() {
                // Best effort: the write already failed and that error is what matters.
            }
            return Err(io_error("write", &tmp_path, e));
        }
        fsync_dir(dir).map_err(|e| io_error("fsync directory", dir, e))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid manifest: one table of two chunks, one empty table, one sequence.
    pub(crate) fn sample() -> Manifest {
        let compression = Compression::Zstd { level: 1 };
        let mut orders = TableEntry::new(
            "public",
            "orders",
            vec![
                Column { name: "id".into(), type_name: "bigint".into() },
                Column { name: "note".into(), type_name: "text".into() },
            ],
        );
        for (index, (start, end)) in [(0, Some(4)), (4, None)].into_iter().enumerate() {
            let index = index as u32;
            orders.chunks.push(ChunkEntry {
                index,
                file: chunk_rel_path(&orders.dir, index, &compression),
                block_start: start,
                block_end: end,
                rows: 10 + u64::from(index),
                raw_bytes: 100,
                file_bytes: 40,
                raw_crc32: 1,
                file_crc32: 2,
            });
        }
        let mut empty = TableEntry::new("Sales", "Empty Table", vec![]);
        empty.chunks.push(ChunkEntry {
            index: 0,
            file: chunk_rel_path(&empty.dir, 0, &compression),
            block_start: 0,
            block_end: None,
            rows: 0,
            raw_bytes: 0,
            file_bytes: 9,
            raw_crc32: 0,
            file_crc32: 3,
        });
        let mut manifest = Manifest {
            format_version: FORMAT_VERSION,
            snapshot_id: "snap-1".into(),
            created_at: DateTime::from_timestamp(1_709_294_400, 0).unwrap_or_default(),
            finished_at: DateTime::from_timestamp(1_709_294_700, 0).unwrap_or_default(),
            source: Source {
                server_version: "16.2".into(),
                server_version_num: 160_002,
                database: "app".into(),
                system_identifier: "7301234567890123456".into(),
            },
            snapshot: SnapshotInfo {
                lsn: "0/3000148".into(),
                exported_snapshot: "00000003-0000001B-1".into(),
                replication_slot: None,
                plugin: None,
            },
            settings: [("DateStyle", "ISO"), ("TimeZone", "UTC")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            compression,
            parallel: Parallelism { requested: 2, used: 2 },
            chunk_size_bytes: crate::plan::DEFAULT_CHUNK_BYTES,
            mode: Mode::Direct,
            tables: vec![orders, empty],
            sequences: vec![SequenceEntry {
                schema: "public".into(),
                name: "orders_id_seq".into(),
                last_value: 11,
                is_called: true,
            }],
            totals: Totals::default(),
        };
        manifest.refresh_totals();
        manifest
    }

    fn details(m: &Manifest) -> Vec<String> {
        m.validate().iter().map(ToString::to_string).collect()
    }

    fn assert_one_problem(m: &Manifest, needle: &str) {
        let problems = details(m);
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "expected a problem containing {needle:?}, got {problems:#?}"
        );
    }

    #[test]
    fn sample_is_valid_and_round_trips() {
        let m = sample();
        assert_eq!(details(&m), Vec::<String>::new());
        let dir = tempfile::tempdir().unwrap();
        m.write_atomic(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        let text = fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(text.contains("\"compression\": \"zstd:1\""), "{text}");
        assert!(text.contains("\"type\": \"bigint\""), "{text}");
        assert!(text.contains("\"mode\": \"direct\""), "{text}");
        assert!(text.contains("\"block_end\": null"), "{text}");
        assert!(text.contains("\"replication_slot\": null"), "{text}");
        // Only manifest.json is left: the temporary file was renamed.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn missing_newer_unknown_and_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let err = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("incomplete snapshot: no manifest.json"), "{err}");

        let path = dir.path().join(MANIFEST_FILE);
        let mut value = serde_json::to_value(sample()).unwrap();
        value["format_version"] = 2.into();
        value["tables"] = "new layout".into();
        fs::write(&path, value.to_string()).unwrap();
        let err = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("written by a newer steep-repl (format_version 2, this build reads 1)"),
            "{err}"
        );

        for bad in [serde_json::json!(0), serde_json::json!("1"), serde_json::json!(-1)] {
            value["format_version"] = bad;
            fs::write(&path, value.to_string()).unwrap();
            let err = Manifest::load(dir.path()).unwrap_err();
            assert!(matches!(err, ManifestError::UnknownFormat { .. }), "{err}");
        }
        fs::write(&path, "{\"snapshot_id\": 1}").unwrap();
        let err = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unknown format_version missing"), "{err}");

        fs::write(&path, "{\"format_version\": 1, \"snapshot_id\": ").unwrap();
        let err = Manifest::load(dir.path()).unwrap_err();
        assert!(matches!(err, ManifestError::Malformed { .. }), "{err}");

        let mut value = serde_json::to_value(sample()).unwrap();
        value["compression"] = "lz4".into();
        fs::write(&path, value.to_string()).unwrap();
        let err = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("malformed manifest") && err.contains("lz4"), "{err}");
    }

    #[test]
    fn each_rule_is_reported() {
        let mut m = sample();
        m.format_version = 3;
        assert_one_problem(&m, "format_version is 3");

        let mut m = sample();
        m.tables[0].dir = "../etc".into();
        assert_one_problem(&m, "dir is \"../etc\", expected \"public.orders\"");

        let mut m = sample();
        m.tables[1] = m.tables[0].clone();
        m.refresh_totals();
        assert_one_problem(&m, "table listed twice");
        assert_one_problem(&m, "used by another table");
        assert_one_problem(&m, "listed twice");

        let mut m = sample();
        m.tables[0].columns[1].name = "id".into();
        assert_one_problem(&m, "column \"id\" listed twice");

        let mut m = sample();
        m.tables[1].chunks.clear();
        m.refresh_totals();
        assert_one_problem(&m, "has no chunks");

        let mut m = sample();
        m.tables[0].chunks[1].index = 5;
        assert_one_problem(&m, "position 1 has index 5");

        for (bad, reason) in [
            ("/etc/passwd", "absolute path"),
            ("data/public.orders/../../x", ".. component"),
            ("data\\public.orders\\000001.copy.zst", "backslash"),
            ("other/000001.copy.zst", "not inside data/"),
        ] {
            let mut m = sample();
            m.tables[0].chunks[1].file = bad.into();
            assert_one_problem(&m, reason);
        }
        let mut m = sample();
        m.tables[0].chunks[1].file = "data/public.orders/000007.copy.zst".into();
        assert_one_problem(&m, "expected \"data/public.orders/000001.copy.zst\"");
        let mut m = sample();
        m.compression = Compression::None;
        assert_one_problem(&m, "expected \"data/public.orders/000000.copy\"");
        assert_one_problem(&m, "uncompressed chunk whose file size");

        let mut m = sample();
        m.tables[0].chunks[0].block_start = 1;
        assert_one_problem(&m, "first chunk starts at block 1, expected 0");
        let mut m = sample();
        m.tables[0].chunks[1].block_start = 5;
        assert_one_problem(&m, "starts at block 5, but the previous chunk ends at block 4");
        let mut m = sample();
        m.tables[0].chunks[0].block_end = None;
        assert_one_problem(&m, "open-ended (block_end null) but not the last chunk");
        let mut m = sample();
        m.tables[0].chunks[1].block_end = Some(9);
        assert_one_problem(&m, "last chunk must be open-ended, but ends at block 9");
        let mut m = sample();
        m.tables[0].chunks[0].block_end = Some(0);
        m.tables[0].chunks[1].block_start = 0;
        assert_one_problem(&m, "empty block range [0, 0)");

        let mut m = sample();
        m.tables[0].rows += 1;
        assert_one_problem(&m, "table \"public\".\"orders\": rows is 22, but its chunks sum to 21");
        let mut m = sample();
        m.totals.file_bytes = 1;
        assert_one_problem(&m, "totals.file_bytes is 1, but the tables sum to 89");
        let mut m = sample();
        m.sequences.push(m.sequences[0].clone());
        assert_one_problem(&m, "sequence \"public\".\"orders_id_seq\" listed twice");
    }

    #[test]
    fn load_reports_all_problems_at_once() {
        let mut m = sample();
        m.tables[0].chunks[1].file = "../../x".into();
        m.tables[0].rows = 0;
        m.totals.tables = 7;
        let dir = tempfile::tempdir().unwrap();
        // write_atomic refuses an invalid manifest and leaves nothing behind.
        assert!(matches!(m.write_atomic(dir.path()), Err(ManifestError::Invalid { .. })));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        fs::write(dir.path().join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        match Manifest::load(dir.path()) {
            Err(ManifestError::Invalid { problems, .. }) => {
                assert_eq!(problems.len(), 3, "{problems:#?}");
                assert_eq!(problems[0].table.as_deref(), Some("\"public\".\"orders\""));
                assert_eq!(problems[0].chunk, Some(1));
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
}

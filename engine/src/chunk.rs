//! Chunk files: one contiguous block range of one table, as COPY TEXT, optionally zstd-compressed.
//!
//! Format (version 1, PRODUCT.md §3):
//!
//! - `compression = zstd[:N]`, file `data/<table-dir>/<NNNNNN>.copy.zst`: one or more standard zstd
//!   frames (RFC 8878) whose concatenated content is the chunk's COPY TEXT. The writer cuts the
//!   text into frames of [`ZSTD_FRAME_BYTES`] (4 MiB; the last one shorter, an empty chunk is one
//!   empty frame), each compressed independently, with its content size in the frame header and
//!   without the optional zstd content checksum (the manifest's CRCs cover it). `zstd -dc` reads
//!   the concatenation as one stream. Independent frames let zstd compress each from one
//!   contiguous buffer (about 13% faster at level 1 than streaming through its window buffer, for
//!   0.1% larger output) while memory stays bounded; readers must accept any frame sizes.
//! - `compression = none`, file `data/<table-dir>/<NNNNNN>.copy`: the COPY TEXT itself.
//!
//! The content is exactly what `COPY (SELECT cols FROM t WHERE ctid in the range) TO STDOUT` prints:
//! rows of tab-separated escaped fields, each ending in `\n`, no header, no `\.` trailer
//! ([`crate::copy_text`]).
//!
//! Checks recorded in the manifest per chunk ([`crate::manifest::ChunkEntry`]): file size, CRC-32
//! (IEEE, as computed by `crc32fast`, the same as zlib's `crc32`) of the file's bytes, size and
//! CRC-32 of the decompressed bytes, and the number of rows (newlines).
//!
//! Writing ([`ChunkWriter`]) goes to `.<file>.tmp-<pid>-<n>` in the final directory and becomes
//! visible under its final name only after the data is fsynced (then the directory is fsynced
//! after the rename), so a final name never holds a partial file. A writer dropped before
//! [`ChunkWriter::finish`] removes its temporary file.
//!
//! Reading ([`ChunkReader`]) maps the file, checks its size and CRC before handing out a single
//! byte, then streams decompressed bytes while checking size, CRC and row count as they pass.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Mmap, MmapOptions};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zstd::bulk::Compressor;
use zstd::stream::raw::{self, InBuffer, Operation, OutBuffer};
use zstd::zstd_safe::CParameter;

use crate::copy_text;
use crate::error::{ChunkCheck, ChunkError, Error, Result};
use crate::manifest::ChunkEntry;
use crate::naming;

/// Lowest zstd level accepted (zstd's negative "fast" levels are not offered).
pub const MIN_ZSTD_LEVEL: i32 = 1;
/// Highest zstd level accepted (`zstd --ultra -22`).
pub const MAX_ZSTD_LEVEL: i32 = 22;
/// File suffix of a zstd chunk.
pub const ZSTD_SUFFIX: &str = ".copy.zst";
/// File suffix of an uncompressed chunk.
pub const PLAIN_SUFFIX: &str = ".copy";

/// Uncompressed bytes per zstd frame: each frame is compressed in one call from one contiguous
/// buffer. 4 MiB is past the point where a larger frame improves the ratio measurably at the
/// default level (a 512 KiB window at level 1) and keeps the writer's memory near 9 MiB.
pub const ZSTD_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Bytes an uncompressed chunk's writer gathers before one `write(2)`: large enough that small
/// writes (PostgreSQL's COPY hands over one row at a time) cost a `memcpy` only.
const PLAIN_BATCH_BYTES: usize = 256 * 1024;
/// Decompressed bytes per step when the reader checks a whole chunk itself.
const DRAIN_BUFFER_BYTES: usize = 256 * 1024;

/// How a chunk's COPY TEXT is stored.
///
/// Text form (`FromStr`/`Display`, and the manifest's JSON string): `none`, or `zstd:N` with
/// `N` in 1..=22; `zstd` alone means `zstd:1`. Parsing ignores ASCII case and surrounding spaces;
/// display always gives the canonical lower-case `zstd:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Plain COPY TEXT, file suffix `.copy`.
    None,
    /// zstd at `level`, file suffix `.copy.zst`.
    Zstd {
        /// zstd compression level, 1..=22.
        level: i32,
    },
}

impl Default for Compression {
    /// `zstd:1`, the product default (PRODUCT.md §3): the fastest level, about 4:1 on typical data.
    fn default() -> Self {
        Compression::Zstd { level: 1 }
    }
}

impl Compression {
    /// File-name suffix of chunks stored this way: `.copy.zst` or `.copy`.
    pub fn file_suffix(&self) -> &'static str {
        match self {
            Compression::None => PLAIN_SUFFIX,
            Compression::Zstd { .. } => ZSTD_SUFFIX,
        }
    }
}

impl FromStr for Compression {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self> {
        let invalid =
            |reason: &str| Error::InvalidCompression { input: input.to_string(), reason: reason.to_string() };
        let text = input.trim().to_ascii_lowercase();
        match text.as_str() {
            "none" => return Ok(Compression::None),
            "zstd" => return Ok(Compression::default()),
            _ => {}
        }
        let Some(level) = text.strip_prefix("zstd:") else {
            return Err(invalid("unknown method"));
        };
        let level: i32 = level.parse().map_err(|_| invalid("the level is not a whole number"))?;
        if !(MIN_ZSTD_LEVEL..=MAX_ZSTD_LEVEL).contains(&level) {
            return Err(invalid("the level is out of range"));
        }
        Ok(Compression::Zstd { level })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl Serialize for Compression {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What [`ChunkWriter::finish`] reports about the chunk it wrote; the manifest records these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkStats {
    /// Snapshot-relative path of the file, as given to [`ChunkWriter::create`].
    pub file: String,
    /// Rows (newlines) written.
    pub rows: u64,
    /// Uncompressed bytes written.
    pub raw_bytes: u64,
    /// Size of the file.
    pub file_bytes: u64,
    /// CRC-32 of the uncompressed bytes.
    pub raw_crc32: u32,
    /// CRC-32 of the file's bytes.
    pub file_crc32: u32,
}

/// A file being written that CRCs and counts every byte it passes on.
struct CrcFile {
    file: File,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl CrcFile {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.crc.update(data);
        self.bytes += data.len() as u64;
        Ok(())
    }
}

/// Where the writer's raw bytes go, a batch at a time.
enum Sink {
    /// Batches are written as they are.
    Plain(CrcFile),
    /// Each batch becomes one zstd frame, compressed into `out` then written.
    Zstd { compressor: Compressor<'static>, out: Vec<u8>, frames: u64, file: CrcFile },
}

impl Sink {
    /// Bytes per batch ([`Sink::consume`] call), except the last.
    fn batch_bytes(&self) -> usize {
        match self {
            Sink::Plain(_) => PLAIN_BATCH_BYTES,
            Sink::Zstd { .. } => ZSTD_FRAME_BYTES,
        }
    }

    fn consume(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(file) => file.write_all(data),
            Sink::Zstd { compressor, out, frames, file } => {
                // `out` holds compress_bound(ZSTD_FRAME_BYTES), so a frame always fits.
                compressor.compress_to_buffer(data, out)?;
                *frames += 1;
                file.write_all(out)
            }
        }
    }

    /// Writes what is still needed to end the stream (an empty frame if there was no data, so the
    /// file is valid zstd); returns the file.
    fn finish(mut self) -> io::Result<CrcFile> {
        if let Sink::Zstd { frames: 0, .. } = self {
            self.consume(&[])?;
        }
        match self {
            Sink::Plain(file) | Sink::Zstd { file, .. } => Ok(file),
        }
    }
}

/// A zstd compressor at `level` writing the content size and no content checksum (the manifest's
/// CRCs cover the data).
fn new_compressor(level: i32) -> io::Result<Compressor<'static>> {
    let mut compressor = Compressor::new(level)?;
    compressor.set_parameter(CParameter::ChecksumFlag(false))?;
    compressor.set_parameter(CParameter::ContentSizeFlag(true))?;
    Ok(compressor)
}

/// Counter making temporary names unique within this process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Marker inside the names of temporary chunk files: `.<file>.tmp-<pid>-<n>`.
pub const TEMP_MARKER: &str = ".tmp-";

/// Creates a new temporary file `.<final_name>.tmp-<pid>-<n>` in `dir` for writing.
///
/// A name left behind by a crashed process whose pid is reused is skipped, not overwritten.
pub(crate) fn create_temp_file(dir: &Path, final_name: &str) -> Result<(File, PathBuf)> {
    const ATTEMPTS: u32 = 64;
    let mut attempt = 0;
    loop {
        let tmp_path = dir.join(format!(
            ".{final_name}{TEMP_MARKER}{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match OpenOptions::new().write(true).create_new(true).open(&tmp_path) {
            Ok(file) => return Ok((file, tmp_path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => return Err(Error::io("create", &tmp_path, e)),
        }
    }
}

/// Removes every writer temporary file (see [`is_temp_file_name`]) left in the table directories
/// of `snapshot_dir/data` by interrupted writes, and returns how many it removed.
///
/// Generate calls this before writing the manifest (and resume before continuing), so a finished
/// snapshot holds no leftovers; `verify` reports any it finds as extra files. It must not run
/// while writers are active in the same snapshot directory.
pub fn remove_leftover_temp_files(snapshot_dir: &Path) -> Result<u64> {
    let data = snapshot_dir.join(naming::DATA_DIR);
    let tables = match fs::read_dir(&data) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("list", &data, e)),
    };
    let mut removed = 0;
    for table in tables {
        let table = table.map_err(|e| Error::io("list", &data, e))?;
        let is_dir = table.file_type().map_err(|e| Error::io("stat", table.path(), e))?.is_dir();
        if !is_dir {
            continue;
        }
        let dir = table.path();
        for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            if is_temp_file_name(&entry.file_name().to_string_lossy()) {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// True when `name` (a file name, not a path) looks like a writer's temporary file.
pub fn is_temp_file_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARKER)
}

/// Streaming sink for one chunk file: write COPY TEXT into it, then [`finish`](Self::finish).
///
/// Promises:
/// - the final name appears only after all data is on disk (fsync file, rename, fsync directory);
/// - dropped or [`abort`](Self::abort)ed before `finish` (error path, panic, cancel), it removes its
///   temporary file and leaves nothing under the final name;
/// - memory stays bounded whatever the chunk size: for zstd one frame of input and one of output
///   (2 × 4 MiB) plus the zstd context for the level, for `none` 256 KiB;
/// - small writes are cheap: they are gathered, then checksummed, counted and compressed a frame
///   at a time; large writes are processed in place without a copy.
pub struct ChunkWriter {
    sink: Option<Sink>,
    pending: Vec<u8>,
    raw_crc: crc32fast::Hasher,
    rows: u64,
    raw_bytes: u64,
    rel_path: String,
    tmp_path: PathBuf,
    final_path: PathBuf,
    dir_path: PathBuf,
}

impl ChunkWriter {
    /// Starts writing the chunk `root_dir/rel_path` (`rel_path` as made by
    /// [`naming::chunk_rel_path`]): checks the path is a normalised path inside `data/` whose suffix
    /// matches `compression`, creates the parent directories and the temporary file.
    pub fn create(root_dir: &Path, rel_path: &str, compression: Compression) -> Result<Self> {
        naming::check_rel_path(rel_path)
            .map_err(|reason| Error::UnsafePath { path: rel_path.to_string(), reason })?;
        if !rel_path.ends_with(compression.file_suffix())
            || (compression == Compression::None && rel_path.ends_with(ZSTD_SUFFIX))
        {
            return Err(Error::UnsafePath {
                path: rel_path.to_string(),
                reason: "file suffix does not match the compression",
            });
        }
        let final_path = root_dir.join(rel_path);
        let (Some(dir_path), Some(file_name)) = (final_path.parent(), final_path.file_name()) else {
            return Err(Error::UnsafePath { path: rel_path.to_string(), reason: "has no file name" });
        };
        let dir_path = dir_path.to_path_buf();
        fs::create_dir_all(&dir_path).map_err(|e| Error::io("create directory", &dir_path, e))?;
        let (file, tmp_path) = create_temp_file(&dir_path, &file_name.to_string_lossy())?;
        let file = CrcFile { file, crc: crc32fast::Hasher::new(), bytes: 0 };
        let sink = match compression {
            Compression::None => Sink::Plain(file),
            Compression::Zstd { level } => match new_compressor(level) {
                Ok(compressor) => Sink::Zstd {
                    compressor,
                    out: Vec::with_capacity(zstd::zstd_safe::compress_bound(ZSTD_FRAME_BYTES)),
                    frames: 0,
                    file,
                },
                Err(e) => {
                    // The writer does not exist yet, so its drop cannot clean up.
                    drop(file);
                    remove_best_effort(&tmp_path);
                    return Err(Error::io("start zstd compressor for", &tmp_path, e));
                }
            },
        };
        Ok(ChunkWriter {
            pending: Vec::with_capacity(sink.batch_bytes()),
            sink: Some(sink),
            raw_crc: crc32fast::Hasher::new(),
            rows: 0,
            raw_bytes: 0,
            rel_path: rel_path.to_string(),
            tmp_path,
            final_path,
            dir_path,
        })
    }

    /// Uncompressed bytes accepted so far (for progress reporting).
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes + self.pending.len() as u64
    }

    /// Snapshot-relative path of the chunk being written.
    pub fn rel_path(&self) -> &str {
        &self.rel_path
    }

    /// Checksums, counts and compresses `data`, which follows everything consumed before.
    fn consume(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(sink) = self.sink.as_mut() else {
            return Err(io::Error::other(format!(
                "{}: chunk writer already finished or aborted",
                self.tmp_path.display()
            )));
        };
        if !matches!(sink, Sink::Plain(_)) {
            // For plain chunks the raw bytes are the file bytes: one CRC serves both.
            self.raw_crc.update(data);
        }
        self.rows += copy_text::count_rows(data);
        self.raw_bytes += data.len() as u64;
        sink.consume(data).map_err(|e| self.io_error("write", e))
    }

    fn consume_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let result = self.consume(&pending);
        self.pending = pending;
        self.pending.clear();
        result
    }

    fn io_error(&self, op: &'static str, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), Error::io(op, &self.tmp_path, e))
    }

    /// Completes the chunk: ends the zstd frame, fsyncs the file, renames it to its final name,
    /// fsyncs the directory, and returns what the manifest records about it.
    ///
    /// On error the temporary file is removed and nothing appears under the final name.
    pub fn finish(mut self) -> Result<ChunkStats> {
        self.consume_pending().map_err(|e| Error::io("write", &self.tmp_path, e))?;
        let Some(sink) = self.sink.take() else {
            return Err(Error::io(
                "finish",
                &self.tmp_path,
                io::Error::other("chunk writer already finished or aborted"),
            ));
        };
        let is_plain = matches!(sink, Sink::Plain(_));
        // From here on `self.sink` is None, so drop would not remove the file: do it on error.
        let result = (|| {
            let file = sink.finish().map_err(|e| Error::io("write", &self.tmp_path, e))?;
            file.file.sync_all().map_err(|e| Error::io("fsync", &self.tmp_path, e))?;
            Ok::<_, Error>(file)
        })();
        let file = match result {
            Ok(file) => file,
            Err(e) => {
                remove_best_effort(&self.tmp_path);
                return Err(e);
            }
        };
        let CrcFile { file: handle, crc, bytes: file_bytes } = file;
        drop(handle);
        if let Err(e) = fs::rename(&self.tmp_path, &self.final_path) {
            remove_best_effort(&self.tmp_path);
            return Err(Error::io("rename to final name", &self.tmp_path, e));
        }
        fsync_dir(&self.dir_path).map_err(|e| Error::io("fsync directory", &self.dir_path, e))?;
        let file_crc32 = crc.finalize();
        let raw_crc32 = if is_plain { file_crc32 } else { self.raw_crc.clone().finalize() };
        Ok(ChunkStats {
            file: self.rel_path.clone(),
            rows: self.rows,
            raw_bytes: self.raw_bytes,
            file_bytes,
            raw_crc32,
            file_crc32,
        })
    }

    /// Abandons the chunk: closes and removes the temporary file. Same as dropping the writer,
    /// spelled out.
    pub fn abort(self) {
        drop(self);
    }
}

impl Write for ChunkWriter {
    /// Takes all of `data`. Whole batches are processed in place when nothing is pending; the rest
    /// is gathered, and processed once a batch (a zstd frame, or 256 KiB uncompressed) is full.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let batch = self.sink.as_ref().map_or(PLAIN_BATCH_BYTES, Sink::batch_bytes);
        let mut rest = data;
        while !rest.is_empty() {
            if self.pending.is_empty() && rest.len() >= batch {
                let (whole, tail) = rest.split_at(batch);
                self.consume(whole)?;
                rest = tail;
                continue;
            }
            let take = (batch - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == batch {
                self.consume_pending()?;
            }
        }
        Ok(data.len())
    }

    /// Processes gathered bytes now. For zstd this ends the current frame early (a slightly lower
    /// ratio); nothing becomes durable before [`ChunkWriter::finish`].
    fn flush(&mut self) -> io::Result<()> {
        self.consume_pending()
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            // Close the file before removing it.
            drop(sink);
            remove_best_effort(&self.tmp_path);
        }
    }
}

/// Removes a temporary file whose contents are being abandoned. A failure cannot be reported
/// from the paths that call this (drop, or while returning another error); a file left behind is
/// reported by `verify` as an extra file and never mistaken for a chunk (its name starts with `.`).
fn remove_best_effort(path: &Path) {
    if fs::remove_file(path).is_err() {
        // Nothing more can be done here; see above.
    }
}

/// fsyncs a directory so a rename inside it survives a crash.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// The bytes of a file opened for checking: a read-only map, or nothing for an empty file
/// (mapping 0 bytes is an error on Linux).
pub(crate) enum FileBytes {
    Empty,
    Mapped(Mmap),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Empty => &[],
            FileBytes::Mapped(map) => map,
        }
    }
}

/// Maps `file` (of `len` bytes) read-only.
#[allow(unsafe_code)]
fn map_read_only(file: &File, len: u64) -> io::Result<FileBytes> {
    if len == 0 {
        return Ok(FileBytes::Empty);
    }
    // SAFETY: memmap2 requires that the mapped file is not modified or truncated while the map is
    // alive, or reads through it may see changing bytes or fault (SIGBUS). Chunk files are written
    // once under a temporary name and never modified after the rename to their final name; only
    // an outside process tampering with a finished snapshot can break this, as for any reader of
    // a memory-mapped file. The map is read-only and private to this process.
    let map = unsafe { MmapOptions::new().populate().map(file)? };
    // Advice only tunes read-ahead; the map is correct whether or not the kernel takes it.
    if map.advise(memmap2::Advice::Sequential).is_err() {
        // Ignored on purpose, see above.
    }
    Ok(FileBytes::Mapped(map))
}

/// Opens `path` and checks its size and CRC against `expected`; returns its bytes.
///
/// Missing or unreadable files give [`Error::Io`] (kind `NotFound` for a missing one); size and
/// CRC failures give [`Error::Chunk`].
pub(crate) fn open_checked(path: &Path, expected: &ChunkEntry) -> Result<(FileBytes, u32)> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            "open",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let chunk_error = |check| Error::Chunk(ChunkError { file: path.to_path_buf(), check });
    if meta.len() != expected.file_bytes {
        return Err(chunk_error(ChunkCheck::FileSize { expected: expected.file_bytes, found: meta.len() }));
    }
    let bytes = map_read_only(&file, meta.len()).map_err(|e| Error::io("map", path, e))?;
    if bytes.len() as u64 != expected.file_bytes {
        // The file changed between stat and map.
        return Err(chunk_error(ChunkCheck::FileSize {
            expected: expected.file_bytes,
            found: bytes.len() as u64,
        }));
    }
    let crc = crc32fast::hash(&bytes);
    if crc != expected.file_crc32 {
        return Err(chunk_error(ChunkCheck::FileCrc { expected: expected.file_crc32, found: crc }));
    }
    Ok((bytes, crc))
}

/// Where a [`ChunkReader`] stands.
enum ReadState {
    Reading,
    Done,
    Failed(ChunkError),
}

/// Checked streaming reader of one chunk file.
///
/// [`open`](Self::open) fails unless the file's size and CRC-32 match the manifest entry, so no byte
/// of a damaged file is ever handed out. `Read` then yields the decompressed COPY TEXT while
/// checking it; at the end of the stream (or as soon as it grows past the recorded size) it checks
/// the decompressed size, CRC-32 and row count, and reports a failure as an `io::Error` of kind
/// `InvalidData` wrapping a [`ChunkError`] (see [`ChunkError::from_io`]). A consumer that loads
/// data must treat that error as fatal for everything read from this chunk (the extension rolls
/// back the chunk's transaction).
///
/// The encoding (zstd or plain) is taken from the suffix of `expected.file`.
pub struct ChunkReader {
    path: PathBuf,
    bytes: FileBytes,
    file_crc32: u32,
    expected_raw_bytes: u64,
    expected_raw_crc32: u32,
    expected_rows: u64,
    decoder: Option<raw::Decoder<'static>>,
    pos: usize,
    frame_done: bool,
    raw_crc: crc32fast::Hasher,
    raw_bytes: u64,
    rows: u64,
    state: ReadState,
}

impl ChunkReader {
    /// Opens the chunk file at `path` (the snapshot directory joined with `expected.file`), maps
    /// it, and checks its size and then its CRC against `expected`.
    pub fn open(path: &Path, expected: &ChunkEntry) -> Result<Self> {
        let zstd = if expected.file.ends_with(ZSTD_SUFFIX) {
            true
        } else if expected.file.ends_with(PLAIN_SUFFIX) {
            false
        } else {
            return Err(Error::Chunk(ChunkError {
                file: path.to_path_buf(),
                check: ChunkCheck::UnknownEncoding,
            }));
        };
        let (bytes, file_crc32) = open_checked(path, expected)?;
        let decoder = if zstd {
            Some(raw::Decoder::new().map_err(|e| Error::io("start zstd decoder for", path, e))?)
        } else {
            None
        };
        Ok(ChunkReader {
            path: path.to_path_buf(),
            bytes,
            file_crc32,
            expected_raw_bytes: expected.raw_bytes,
            expected_raw_crc32: expected.raw_crc32,
            expected_rows: expected.rows,
            decoder,
            pos: 0,
            frame_done: true,
            raw_crc: crc32fast::Hasher::new(),
            raw_bytes: 0,
            rows: 0,
            state: ReadState::Reading,
        })
    }

    /// Opens chunk `expected` of the snapshot in `snapshot_dir`, refusing (before any file system
    /// access) a `file` that is not a normalised relative path inside `data/`. Use this rather
    /// than [`open`](Self::open) with a path joined by hand.
    pub fn open_in(snapshot_dir: &Path, expected: &ChunkEntry) -> Result<Self> {
        naming::check_rel_path(&expected.file)
            .map_err(|reason| Error::UnsafePath { path: expected.file.clone(), reason })?;
        Self::open(&expected.path_in(snapshot_dir), expected)
    }

    /// Decompressed bytes handed out so far.
    pub fn raw_bytes_read(&self) -> u64 {
        self.raw_bytes
    }

    /// Rows (newlines) handed out so far.
    pub fn rows_read(&self) -> u64 {
        self.rows
    }

    /// Size of the chunk file.
    pub fn file_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn error(&self, check: ChunkCheck) -> ChunkError {
        ChunkError { file: self.path.clone(), check }
    }

    /// Reads to the end without handing anything out, running every check.
    ///
    /// Plain chunks are checked in place, without copying.
    pub fn check_to_end(&mut self) -> Result<(), ChunkError> {
        if self.decoder.is_none() && self.pos == 0 && matches!(self.state, ReadState::Reading) {
            let bytes: &[u8] = &self.bytes;
            let rows = copy_text::count_rows(bytes);
            let len = bytes.len();
            self.rows = rows;
            self.raw_bytes = len as u64;
            self.pos = len;
        }
        let mut buf = vec![0u8; DRAIN_BUFFER_BYTES];
        while self.read_checked(&mut buf)? > 0 {}
        Ok(())
    }

    /// `Read::read` with the typed error.
    pub fn read_checked(&mut self, buf: &mut [u8]) -> Result<usize, ChunkError> {
        match &self.state {
            ReadState::Reading => {}
            ReadState::Done => return Ok(0),
            ReadState::Failed(e) => return Err(e.clone()),
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let result = self.next_bytes(buf).and_then(|n| {
            if n == 0 { self.final_checks().map(|()| 0) } else { self.account(&buf[..n]).map(|()| n) }
        });
        match result {
            Ok(0) => self.state = ReadState::Done,
            Ok(_) => {}
            Err(ref e) => self.state = ReadState::Failed(e.clone()),
        }
        result
    }

    /// Fills `buf` with the next decompressed bytes; 0 at the end of the stream.
    fn next_bytes(&mut self, buf: &mut [u8]) -> Result<usize, ChunkError> {
        let data: &[u8] = &self.bytes;
        let Some(decoder) = self.decoder.as_mut() else {
            let n = buf.len().min(data.len() - self.pos);
            buf[..n].copy_from_slice(&data[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        };
        loop {
            let mut input = InBuffer::around(&data[self.pos..]);
            let mut output = OutBuffer::around(&mut *buf);
            let hint = match decoder.run(&mut input, &mut output) {
                Ok(hint) => hint,
                Err(e) => {
                    return Err(ChunkError {
                        file: self.path.clone(),
                        check: ChunkCheck::Decompress(e.to_string()),
                    });
                }
            };
            let (consumed, produced) = (input.pos(), output.pos());
            self.pos += consumed;
            if consumed > 0 || produced > 0 {
                self.frame_done = hint == 0;
            }
            if produced > 0 {
                return Ok(produced);
            }
            if self.pos == data.len() {
                if !self.frame_done {
                    return Err(ChunkError {
                        file: self.path.clone(),
                        check: ChunkCheck::Decompress("the file ends inside a zstd frame".to_string()),
                    });
                }
                return Ok(0);
            }
            if consumed == 0 {
                return Err(ChunkError {
                    file: self.path.clone(),
                    check: ChunkCheck::Decompress("the decoder makes no progress".to_string()),
                });
            }
        }
    }

    fn account(&mut self, raw: &[u8]) -> Result<(), ChunkError> {
        self.raw_bytes += raw.len() as u64;
        if self.raw_bytes > self.expected_raw_bytes {
            return Err(
                self.error(ChunkCheck::RawSize { expected: self.expected_raw_bytes, found: self.raw_bytes })
            );
        }
        if self.decoder.is_some() {
            self.raw_crc.update(raw);
        }
        self.rows += copy_text::count_rows(raw);
        Ok(())
    }

    fn final_checks(&self) -> Result<(), ChunkError> {
        if self.raw_bytes != self.expected_raw_bytes {
            return Err(
                self.error(ChunkCheck::RawSize { expected: self.expected_raw_bytes, found: self.raw_bytes })
            );
        }
        let raw_crc = if self.decoder.is_some() { self.raw_crc.clone().finalize() } else { self.file_crc32 };
        if raw_crc != self.expected_raw_crc32 {
            return Err(self.error(ChunkCheck::RawCrc { expected: self.expected_raw_crc32, found: raw_crc }));
        }
        if self.rows != self.expected_rows {
            return Err(self.error(ChunkCheck::RowCount { expected: self.expected_rows, found: self.rows }));
        }
        Ok(())
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_checked(buf).map_err(ChunkError::into_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_forms_and_suffixes() {
        assert_eq!("zstd".parse::<Compression>().ok(), Some(Compression::default()));
        assert_eq!(Compression::default().to_string(), "zstd:1");
        assert_eq!("None".parse::<Compression>().ok(), Some(Compression::None));
        assert_eq!(Compression::None.file_suffix(), ".copy");
        assert_eq!(Compression::Zstd { level: 19 }.file_suffix(), ".copy.zst");
        let err = "zstd:0".parse::<Compression>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("\"zstd:0\": the level is out of range"), "{err}");
    }

    #[test]
    fn temp_names() {
        let dir = tempfile::tempdir().unwrap();
        let (_file, path) = create_temp_file(dir.path(), "000001.copy.zst").unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".000001.copy.zst.tmp-"), "{name}");
        assert!(is_temp_file_name(&name));
        assert!(!is_temp_file_name("000001.copy.zst"));
        assert!(!is_temp_file_name(".hidden"));
        // A name taken by someone else is skipped.
        let (_again, other) = create_temp_file(dir.path(), "000001.copy.zst").unwrap();
        assert_ne!(path, other);
    }

    #[test]
    fn small_writes_are_batched_into_frames() {
        let dir = tempfile::tempdir().unwrap();
        let compression = Compression::Zstd { level: 1 };
        let rel = naming::chunk_rel_path("public.t", 0, &compression);
        let mut writer = ChunkWriter::create(dir.path(), &rel, compression).unwrap();
        for _ in 0..1000 {
            writer.write_all(b"1\tx\n").unwrap();
        }
        assert_eq!(writer.raw_bytes(), 4000);
        assert_eq!(writer.rel_path(), rel);
        let stats = writer.finish().unwrap();
        assert_eq!((stats.rows, stats.raw_bytes), (1000, 4000));
        assert_eq!(stats.raw_crc32, crc32fast::hash(&b"1\tx\n".repeat(1000)));
        let file = fs::read(dir.path().join(&rel)).unwrap();
        assert_eq!(stats.file_crc32, crc32fast::hash(&file));
        // One frame, with its content size in the header.
        assert_eq!(zstd::zstd_safe::get_frame_content_size(&file).ok(), Some(Some(4000)));
    }
}

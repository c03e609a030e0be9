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
//! Reading ([`ChunkReader`]) reads the file with plain `read(2)` calls (never a memory map, so a
//! file changed under the reader gives an error, not a `SIGBUS`) and streams decompressed bytes
//! while checking the file's CRC and length and the decompressed size, CRC and row count as they
//! pass.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Whether the file (and its name) is already durable; false when [`Durability::DeferSmall`] left
    /// it to a later [`FsSync::sync`].
    pub synced: bool,
}

/// When a finished chunk becomes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file, rename it, fsync its directory, before `finish` returns.
    Now,
    /// As `Now` for files of at least [`SYNC_NOW_BYTES`]; smaller files are renamed without fsync,
    /// and the writer of the snapshot must call [`FsSync::sync`] (opened before the first such file)
    /// before the manifest is written.
    /// An fsync of a file and of its directory costs about a millisecond whatever the size, which for
    /// a database of 20 000 small tables was most of a snapshot's time; one `syncfs` at the end makes
    /// them all durable for the price of a few. The manifest is written last either way, so a crash
    /// before it leaves an incomplete snapshot, never a complete one with a missing chunk.
    DeferSmall,
}

/// Files at least this large are fsynced when finished even under [`Durability::DeferSmall`]: their
/// fsync costs little next to their writing, and it keeps the work left for the end bounded.
pub const SYNC_NOW_BYTES: u64 = 8 << 20;

/// A handle on the file system holding a snapshot directory, to make durable at once every file
/// written on it (Linux `syncfs`): how a snapshot whose small chunks were finished with
/// [`Durability::DeferSmall`] becomes durable.
///
/// Open it **before** writing the first deferred chunk and keep it until the last sync: the kernel
/// reports to a `syncfs` the write-back errors of the file system since the descriptor was opened,
/// so an error in the background write-back of a chunk renamed earlier is reported by the next
/// [`FsSync::sync`], never lost.
#[derive(Debug)]
pub struct FsSync {
    dir: PathBuf,
    fd: File,
}

impl FsSync {
    /// Opens the directory `dir` (which must exist) for later syncs.
    pub fn open(dir: &Path) -> Result<FsSync> {
        let fd = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
        Ok(FsSync { dir: dir.to_path_buf(), fd })
    }

    /// Makes every file written on the file system so far durable; fails with any write-back error
    /// the file system met since [`FsSync::open`] (or since the previous sync reported one).
    #[allow(unsafe_code)]
    pub fn sync(&self) -> Result<()> {
        // SAFETY: syncfs takes a file descriptor we own for the duration of the call and touches no
        // memory of ours.
        let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&self.fd)) };
        if rc != 0 {
            return Err(Error::io("syncfs", &self.dir, io::Error::last_os_error()));
        }
        Ok(())
    }
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
    Zstd { compressor: Compressor<'static>, level: i32, out: Vec<u8>, frames: u64, file: CrcFile },
}

/// A compressor and buffers that [`ChunkWriter`]s can borrow and give back
/// ([`ChunkWriter::create_with`], [`ChunkWriter::finish_into`]), so that a process writing many small
/// chunks sets them up once rather than once per chunk (a zstd context and two 4 MiB buffers cost
/// more than compressing a small table).
#[derive(Default)]
pub struct WriterScratch {
    compressor: Option<(i32, Compressor<'static>)>,
    out: Vec<u8>,
    pending: Vec<u8>,
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
            Sink::Zstd { compressor, out, frames, file, .. } => {
                // `out` holds compress_bound(ZSTD_FRAME_BYTES), so a frame always fits.
                compressor.compress_to_buffer(data, out)?;
                *frames += 1;
                file.write_all(out)
            }
        }
    }

    /// Writes what is still needed to end the stream (an empty frame if there was no data, so the
    /// file is valid zstd); returns the file, and the compressor and buffer for reuse.
    fn finish(mut self, scratch: &mut WriterScratch) -> io::Result<CrcFile> {
        if let Sink::Zstd { frames: 0, .. } = self {
            self.consume(&[])?;
        }
        match self {
            Sink::Plain(file) => Ok(file),
            Sink::Zstd { file, compressor, level, out, .. } => {
                scratch.compressor = Some((level, compressor));
                scratch.out = out;
                Ok(file)
            }
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

/// The file a server job keeps in a snapshot directory while it writes it, holding the job's id: a second
/// job refuses the directory, a failed job removes only what it wrote itself, and a new snapshot may clear
/// the leftovers of a job that ended without a manifest. Removed once the manifest is written; never part
/// of a complete snapshot.
pub const WRITER_FILE: &str = ".steep-repl-writer";

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
        Self::create_with(root_dir, rel_path, compression, &mut WriterScratch::default())
    }

    /// [`create`](Self::create), taking the compressor and buffers from `scratch` when it has them
    /// (give them back with [`finish_into`](Self::finish_into)).
    pub fn create_with(
        root_dir: &Path,
        rel_path: &str,
        compression: Compression,
        scratch: &mut WriterScratch,
    ) -> Result<Self> {
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
        let reused = match scratch.compressor.take() {
            Some((l, c)) if compression == (Compression::Zstd { level: l }) => Some(c),
            _ => None,
        };
        let sink = match compression {
            Compression::None => Sink::Plain(file),
            Compression::Zstd { level } => match reused.map(Ok).unwrap_or_else(|| new_compressor(level)) {
                Ok(compressor) => Sink::Zstd {
                    compressor,
                    level,
                    out: {
                        let mut out = std::mem::take(&mut scratch.out);
                        out.clear();
                        out.reserve(zstd::zstd_safe::compress_bound(ZSTD_FRAME_BYTES));
                        out
                    },
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
        let mut pending = std::mem::take(&mut scratch.pending);
        pending.clear();
        pending.reserve(sink.batch_bytes());
        Ok(ChunkWriter {
            pending,
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
    pub fn finish(self) -> Result<ChunkStats> {
        self.finish_with(Durability::Now)
    }

    /// [`finish`](Self::finish), with the fsyncs as `durability` says.
    pub fn finish_with(self, durability: Durability) -> Result<ChunkStats> {
        self.finish_into(durability, &mut WriterScratch::default())
    }

    /// [`finish_with`](Self::finish_with), giving the compressor and buffers back to `scratch` for the
    /// next chunk.
    pub fn finish_into(mut self, durability: Durability, scratch: &mut WriterScratch) -> Result<ChunkStats> {
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
        let mut synced = false;
        let result = (|| {
            let file = sink.finish(scratch).map_err(|e| Error::io("write", &self.tmp_path, e))?;
            if durability == Durability::Now || file.bytes >= SYNC_NOW_BYTES {
                file.file.sync_all().map_err(|e| Error::io("fsync", &self.tmp_path, e))?;
                synced = true;
            }
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
        if synced {
            fsync_dir(&self.dir_path).map_err(|e| Error::io("fsync directory", &self.dir_path, e))?;
        }
        scratch.pending = std::mem::take(&mut self.pending);
        let file_crc32 = crc.finalize();
        let raw_crc32 = if is_plain { file_crc32 } else { self.raw_crc.clone().finalize() };
        Ok(ChunkStats {
            file: self.rel_path.clone(),
            rows: self.rows,
            raw_bytes: self.raw_bytes,
            file_bytes,
            raw_crc32,
            file_crc32,
            synced,
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

/// Bytes read from a chunk file per `read(2)`: large enough that the system call and the copy out
/// of the page cache cost little next to the CRC and the decompression, small enough that a reader
/// holds about 1 MiB.
const FILE_READ_BYTES: usize = 1 << 20;

/// A chunk file read front to back with plain `read(2)` calls, every byte passing through a running
/// CRC-32, its length held to what the manifest records.
///
/// Never a memory map: a file that is truncated, rewritten or deleted while it is read gives an
/// error naming the file and what changed, never a `SIGBUS` (a mapped file that shrinks faults on
/// the next page touched, which inside PostgreSQL kills the server; PRODUCT.md §6).
struct CheckedFile {
    path: PathBuf,
    file: File,
    expected_len: u64,
    expected_crc: u32,
    read: u64,
    crc: crc32fast::Hasher,
    /// Set once the end was reached and checked.
    ended: bool,
}

impl CheckedFile {
    /// Opens `path`, refusing anything but a regular file of exactly `expected.file_bytes` bytes.
    ///
    /// Missing or unreadable files give [`Error::Io`] (kind `NotFound` for a missing one); a size
    /// that differs gives [`Error::Chunk`].
    fn open(path: &Path, expected: &ChunkEntry) -> Result<Self> {
        let (file, meta) = open_regular(path)?;
        if meta.len() != expected.file_bytes {
            return Err(Error::Chunk(ChunkError {
                file: path.to_path_buf(),
                check: ChunkCheck::FileSize { expected: expected.file_bytes, found: meta.len() },
            }));
        }
        Ok(CheckedFile {
            path: path.to_path_buf(),
            file,
            expected_len: expected.file_bytes,
            expected_crc: expected.file_crc32,
            read: 0,
            crc: crc32fast::Hasher::new(),
            ended: false,
        })
    }

    fn error(&self, check: ChunkCheck) -> ChunkError {
        ChunkError { file: self.path.clone(), check }
    }

    /// Reads the next bytes of the file into `buf` (which must not be empty); 0 once all the
    /// recorded bytes were read, the file was found to end there and its CRC matched.
    fn read_block(&mut self, buf: &mut [u8]) -> Result<usize, ChunkError> {
        if self.read == self.expected_len {
            self.check_end()?;
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.expected_len - self.read).unwrap_or(usize::MAX));
        let n = loop {
            match self.file.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.error(ChunkCheck::Read(e.to_string()))),
            }
        };
        if n == 0 {
            // The file shrank after it was opened.
            return Err(self.error(ChunkCheck::FileSize { expected: self.expected_len, found: self.read }));
        }
        self.crc.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }

    /// At the recorded end: the file must end here (it did not grow) and its CRC must match.
    fn check_end(&mut self) -> Result<(), ChunkError> {
        if self.ended {
            return Ok(());
        }
        let mut probe = [0u8; 1];
        let more = loop {
            match self.file.read(&mut probe) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.error(ChunkCheck::Read(e.to_string()))),
            }
        };
        if more > 0 {
            let found = self.file.metadata().map(|m| m.len()).unwrap_or(self.expected_len + 1);
            return Err(self.error(ChunkCheck::FileSize {
                expected: self.expected_len,
                found: found.max(self.expected_len + 1),
            }));
        }
        let crc = self.crc.clone().finalize();
        if crc != self.expected_crc {
            return Err(self.error(ChunkCheck::FileCrc { expected: self.expected_crc, found: crc }));
        }
        self.ended = true;
        Ok(())
    }

    /// Reads whatever is left of the file through the CRC alone and runs the end checks.
    fn check_rest(&mut self, buf: &mut Vec<u8>) -> Result<(), ChunkError> {
        if buf.len() < FILE_READ_BYTES {
            buf.resize(FILE_READ_BYTES, 0);
        }
        while self.read_block(buf)? > 0 {}
        Ok(())
    }
}

/// Opens `path` for reading as a regular file, never following a symbolic link at its last component
/// and never waiting: a named pipe (which would block `open` until a writer comes, holding a worker,
/// a cancel and even a server shutdown) or a device is refused, as is a link (which could lead outside
/// the snapshot). Returns the file and its metadata, taken from the open descriptor.
pub(crate) fn open_regular(path: &Path) -> Result<(File, fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Error::io("open", path, io::Error::new(io::ErrorKind::InvalidInput, "is a symbolic link"))
            } else {
                Error::io("open", path, e)
            }
        })?;
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            "open",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    // Back to blocking reads (O_NONBLOCK does nothing for a regular file, but say what we mean).
    #[allow(unsafe_code)]
    // SAFETY: fcntl on a descriptor this function owns; F_GETFL/F_SETFL only change its status flags.
    unsafe {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok((file, meta))
}

/// Checks that the directories between `snapshot_dir` and the chunk file `rel_path` (`data/` and the
/// table's directory) are directories, not symbolic links: a link would make a reader read files from
/// outside the snapshot.
pub(crate) fn check_chunk_dirs(snapshot_dir: &Path, rel_path: &str) -> Result<()> {
    let mut dir = snapshot_dir.to_path_buf();
    let parts: Vec<&str> = rel_path.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        dir.push(part);
        let meta = fs::symlink_metadata(&dir).map_err(|e| Error::io("stat", &dir, e))?;
        if !meta.is_dir() {
            let what =
                if meta.file_type().is_symlink() { "is a symbolic link" } else { "is not a directory" };
            return Err(Error::io("open", &dir, io::Error::new(io::ErrorKind::InvalidInput, what)));
        }
    }
    Ok(())
}

/// Checks that the chunk file at `path` is a regular file of the recorded size and CRC-32, reading
/// it through once (no map, see [`ChunkReader`]). Returns the number of bytes checked.
///
/// Missing or unreadable files give [`Error::Io`] (kind `NotFound` for a missing one); size and
/// CRC failures, also those caused by the file changing while it is read, give [`Error::Chunk`].
pub fn check_file(path: &Path, expected: &ChunkEntry) -> Result<u64> {
    let mut file = CheckedFile::open(path, expected)?;
    let mut buf = Vec::new();
    file.check_rest(&mut buf)?;
    Ok(file.read)
}

/// Where a [`ChunkReader`] stands.
enum ReadState {
    Reading,
    Done,
    Failed(ChunkError),
}

/// Checked streaming reader of one chunk file.
///
/// [`open`](Self::open) fails unless the file is a regular file of the size the manifest records.
/// `Read` then yields the decompressed COPY TEXT while checking everything as it passes: the
/// file's CRC-32 over every byte read, and at the end of the stream (or as soon as it grows past
/// the recorded size) the file's length, the decompressed size, CRC-32 and row count. A failure
/// comes as an `io::Error` of kind `InvalidData` wrapping a [`ChunkError`] (see
/// [`ChunkError::from_io`]).
///
/// Bytes are handed out before the whole file has been checked, so a consumer that loads data must
/// treat an error as fatal for everything read from this chunk (the extension loads a chunk in one
/// transaction and rolls it back). A consumer that stops before the end of the stream (a range of
/// rows, [`crate::copy_text::RowRange`]) calls [`check_file_to_end`](Self::check_file_to_end)
/// before it keeps what it read.
///
/// The file is read with `read(2)`, never mapped: a file truncated or rewritten under the reader
/// (an rsync still running, a network file system, an operator's mistake) gives a size or CRC error
/// naming the file, not a `SIGBUS`.
///
/// The encoding (zstd or plain) is taken from the suffix of `expected.file`.
pub struct ChunkReader {
    file: CheckedFile,
    /// Bytes read from the file and not yet passed on: `input[input_pos..input_len]`.
    input: Vec<u8>,
    input_pos: usize,
    input_len: usize,
    expected_raw_bytes: u64,
    expected_raw_crc32: u32,
    expected_rows: u64,
    decoder: Option<raw::Decoder<'static>>,
    frame_done: bool,
    raw_crc: crc32fast::Hasher,
    raw_bytes: u64,
    rows: u64,
    state: ReadState,
}

impl ChunkReader {
    /// Opens the chunk file at `path` (the snapshot directory joined with `expected.file`) and
    /// checks that it is a regular file of the recorded size.
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
        let file = CheckedFile::open(path, expected)?;
        let decoder = if zstd {
            Some(raw::Decoder::new().map_err(|e| Error::io("start zstd decoder for", path, e))?)
        } else {
            None
        };
        Ok(ChunkReader {
            file,
            input: Vec::new(),
            input_pos: 0,
            input_len: 0,
            expected_raw_bytes: expected.raw_bytes,
            expected_raw_crc32: expected.raw_crc32,
            expected_rows: expected.rows,
            decoder,
            frame_done: true,
            raw_crc: crc32fast::Hasher::new(),
            raw_bytes: 0,
            rows: 0,
            state: ReadState::Reading,
        })
    }

    /// Opens chunk `expected` of the snapshot in `snapshot_dir`, refusing (before any file system
    /// access) a `file` that is not a normalised relative path inside `data/`, and then any symbolic
    /// link on the way (`data/`, the table's directory, the file). Use this rather than
    /// [`open`](Self::open) with a path joined by hand.
    pub fn open_in(snapshot_dir: &Path, expected: &ChunkEntry) -> Result<Self> {
        naming::check_rel_path(&expected.file)
            .map_err(|reason| Error::UnsafePath { path: expected.file.clone(), reason })?;
        check_chunk_dirs(snapshot_dir, &expected.file)?;
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
        self.file.expected_len
    }

    fn error(&self, check: ChunkCheck) -> ChunkError {
        self.file.error(check)
    }

    /// Reads to the end without handing anything out, running every check.
    pub fn check_to_end(&mut self) -> Result<(), ChunkError> {
        let mut buf = vec![0u8; DRAIN_BUFFER_BYTES];
        while self.read_checked(&mut buf)? > 0 {}
        Ok(())
    }

    /// For a consumer that stopped before the end of the stream: reads the rest of the file
    /// through its CRC alone (no decompression) and checks the file's length and CRC-32, so that
    /// what was read is known to come from the file the manifest describes.
    pub fn check_file_to_end(&mut self) -> Result<(), ChunkError> {
        if let ReadState::Failed(e) = &self.state {
            return Err(e.clone());
        }
        let mut buf = std::mem::take(&mut self.input);
        let result = self.file.check_rest(&mut buf);
        self.input_pos = 0;
        self.input_len = 0;
        if let Err(e) = &result {
            self.state = ReadState::Failed(e.clone());
        }
        result
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
        // A check on the decompressed stream failed: if the file itself differs from what was written
        // (its size or CRC), that is the cause to report, not its consequence.
        let result = match result {
            Err(e) if !matches!(e.check, ChunkCheck::FileSize { .. } | ChunkCheck::FileCrc { .. }) => {
                let mut buf = std::mem::take(&mut self.input);
                match self.file.check_rest(&mut buf) {
                    Err(
                        file_error @ ChunkError {
                            check: ChunkCheck::FileSize { .. } | ChunkCheck::FileCrc { .. },
                            ..
                        },
                    ) => Err(file_error),
                    _ => Err(e),
                }
            }
            other => other,
        };
        match result {
            Ok(0) => self.state = ReadState::Done,
            Ok(_) => {}
            Err(ref e) => self.state = ReadState::Failed(e.clone()),
        }
        result
    }

    /// Makes sure unread file bytes are buffered; false at the end of the file (its length and
    /// CRC then checked).
    fn fill_input(&mut self) -> Result<bool, ChunkError> {
        if self.input_pos < self.input_len {
            return Ok(true);
        }
        if self.input.len() < FILE_READ_BYTES {
            self.input.resize(FILE_READ_BYTES, 0);
        }
        let n = self.file.read_block(&mut self.input)?;
        self.input_pos = 0;
        self.input_len = n;
        Ok(n > 0)
    }

    /// Fills `buf` with the next decompressed bytes; 0 at the end of the stream.
    fn next_bytes(&mut self, buf: &mut [u8]) -> Result<usize, ChunkError> {
        if self.decoder.is_none() {
            if !self.fill_input()? {
                return Ok(0);
            }
            let n = buf.len().min(self.input_len - self.input_pos);
            buf[..n].copy_from_slice(&self.input[self.input_pos..self.input_pos + n]);
            self.input_pos += n;
            return Ok(n);
        }
        loop {
            if !self.fill_input()? {
                if !self.frame_done {
                    return Err(
                        self.error(ChunkCheck::Decompress("the file ends inside a zstd frame".to_string()))
                    );
                }
                return Ok(0);
            }
            let decoder = self.decoder.as_mut().expect("checked above");
            let mut input = InBuffer::around(&self.input[self.input_pos..self.input_len]);
            let mut output = OutBuffer::around(&mut *buf);
            let hint = match decoder.run(&mut input, &mut output) {
                Ok(hint) => hint,
                Err(e) => return Err(self.error(ChunkCheck::Decompress(e.to_string()))),
            };
            let (consumed, produced) = (input.pos(), output.pos());
            self.input_pos += consumed;
            if consumed > 0 || produced > 0 {
                self.frame_done = hint == 0;
            }
            if produced > 0 {
                return Ok(produced);
            }
            if consumed == 0 {
                return Err(self.error(ChunkCheck::Decompress("the decoder makes no progress".to_string())));
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
        self.raw_crc.update(raw);
        self.rows += copy_text::count_rows(raw);
        Ok(())
    }

    fn final_checks(&self) -> Result<(), ChunkError> {
        if self.raw_bytes != self.expected_raw_bytes {
            return Err(
                self.error(ChunkCheck::RawSize { expected: self.expected_raw_bytes, found: self.raw_bytes })
            );
        }
        let raw_crc = self.raw_crc.clone().finalize();
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

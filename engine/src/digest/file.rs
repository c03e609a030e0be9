//! Digest files: the row digests of one chunk of one table, sorted by key hash, with key texts.
//!
//! # Layout (version 1, all integers little-endian)
//!
//! ```text
//! header, 64 bytes
//!   0..8    magic "SRDIGEST"
//!   8..12   format version, 1
//!   12..16  record size, 44
//!   16..24  record count N
//!   24..32  key text bytes K
//!   32..40  COPY text bytes digested (informative)
//!   40..56  zero
//!   56..60  CRC-32 (IEEE, crc32fast) of everything after the header
//!   60..64  CRC-32 of header bytes 0..60
//! records, N × 44 bytes, sorted by (key_hash, row_hash)
//!   key_hash u128 | row_hash u128 | key_off u64 | key_len u32
//! key text, K bytes: record i's key text is bytes key_off..key_off+key_len; the records'
//!   ranges follow each other in record order from 0 and cover all K bytes
//! ```
//!
//! The file size must be exactly `64 + 44·N + K`; [`TableDigests::open`] checks it before reading
//! anything else, then reads the whole file once (CRC, order, key ranges) and keeps in memory only
//! every [`FENCE`]th key hash, and the digests of the table's nodes at one shallow depth summed over
//! all its files (a [`Summary`], at most 2 MiB a table). Queries about nodes above that depth are
//! answered from the summary; the others read the record ranges they need with positional reads and
//! check them against the kept key hashes, so a file changed after it was opened is noticed
//! ([`TableDigests::fault`]) rather than trusted. Nothing is ever allocated from a length read from
//! a file before that length has been checked against the file's size.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{DigestError, FANOUT, KeyFields, Node, RowDigest, Width, digest_line};
use crate::chunk::TEMP_MARKER;
use crate::copy_text::ROW_END;
use crate::digest::Digest;

const MAGIC: [u8; 8] = *b"SRDIGEST";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const RECORD_LEN: usize = 44;
/// One key hash in memory per this many records: 16 bytes per 64 records (2.5 MB for 10 million
/// rows), and a query for a small node reads about two blocks of 64 records (5.6 KB).
const FENCE: usize = 64;
/// Most records read by one positional read while scanning a range (44 KiB).
const SCAN_RECORDS: usize = 1024;
/// Buffer size of the sequential reads and writes of whole files.
const IO_BUFFER: usize = 1 << 16;
/// Deepest [`Summary`]: 16⁴ = 65 536 node digests (2 MiB), whatever the table's size.
const SUMMARY_MAX_DEPTH: u8 = 4;
/// Rows a [`Summary`] node holds at least on average: a table of fewer rows than 16 times its
/// nodes keeps a shallower summary, so that a small table's summary stays smaller than its files.
const SUMMARY_ROWS_PER_NODE: u64 = 16;

/// Counter making temporary names unique within this process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One record of a digest file.
#[derive(Debug, Clone, Copy)]
struct Record {
    digest: RowDigest,
    key_off: u64,
    key_len: u32,
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        out[0..16].copy_from_slice(&self.digest.key_hash.to_le_bytes());
        out[16..32].copy_from_slice(&self.digest.row_hash.to_le_bytes());
        out[32..40].copy_from_slice(&self.key_off.to_le_bytes());
        out[40..44].copy_from_slice(&self.key_len.to_le_bytes());
        out
    }

    fn decode(b: &[u8; RECORD_LEN]) -> Record {
        let mut h = [0u8; 16];
        h.copy_from_slice(&b[0..16]);
        let key_hash = u128::from_le_bytes(h);
        h.copy_from_slice(&b[16..32]);
        let row_hash = u128::from_le_bytes(h);
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[32..40]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&b[40..44]);
        Record {
            digest: RowDigest { key_hash, row_hash },
            key_off: u64::from_le_bytes(off),
            key_len: u32::from_le_bytes(len),
        }
    }
}

/// The header fields that vary.
#[derive(Debug, Clone, Copy)]
struct Header {
    count: u64,
    key_bytes: u64,
    raw_bytes: u64,
    body_crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(RECORD_LEN as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.count.to_le_bytes());
        out[24..32].copy_from_slice(&self.key_bytes.to_le_bytes());
        out[32..40].copy_from_slice(&self.raw_bytes.to_le_bytes());
        out[56..60].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32fast::hash(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let u32_at = |at: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[at..at + 4]);
            u32::from_le_bytes(a)
        };
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        if b[0..8] != MAGIC {
            return Err("not a digest file (bad magic)".into());
        }
        let crc = crc32fast::hash(&b[0..60]);
        if crc != u32_at(60) {
            return Err(format!("header CRC-32 is {crc:08x}, header says {:08x}", u32_at(60)));
        }
        if u32_at(8) != VERSION {
            return Err(format!("format version {} (this build reads {VERSION})", u32_at(8)));
        }
        if u32_at(12) as usize != RECORD_LEN {
            return Err(format!("record size {} (expected {RECORD_LEN})", u32_at(12)));
        }
        Ok(Header { count: u64_at(16), key_bytes: u64_at(24), raw_bytes: u64_at(32), body_crc: u32_at(56) })
    }
}

/// What [`DigestWriter::finish`] wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct DigestStats {
    /// Rows (COPY lines) digested.
    pub rows: u64,
    /// COPY text bytes received, `\n`s included.
    pub raw_bytes: u64,
    /// Size of the digest file.
    pub file_bytes: u64,
    /// CRC-32 (IEEE) of the whole digest file as written, header included.
    pub file_crc32: u32,
}

/// A row being collected: its hashes and where its key text is in the writer's key buffer.
#[derive(Debug, Clone, Copy)]
struct Entry {
    digest: RowDigest,
    key_off: u64,
    key_len: u32,
}

/// Collects the digests of one chunk's COPY text and writes them to a digest file.
///
/// COPY text is fed through [`std::io::Write`]; a line may be split across writes at any byte.
/// Memory is proportional to the chunk's rows (32 bytes of hashes, 16 of bookkeeping and the key
/// text per row); the caller bounds the chunk size. [`DigestWriter::finish`] writes
/// `<dir>/<rel_path>` through a temporary name (`.<name>.tmp-<pid>-<n>`, as chunk files) in the
/// same directory and a rename, so no reader sees a partial file under the final name; there is
/// no fsync (working files). A writer dropped before `finish` removes its temporary file.
#[derive(Debug)]
pub struct DigestWriter {
    key: KeyFields,
    final_path: PathBuf,
    tmp: Option<(File, PathBuf)>,
    /// The start of a line whose `\n` has not arrived yet.
    partial: Vec<u8>,
    entries: Vec<Entry>,
    key_texts: Vec<u8>,
    scratch: Vec<u8>,
    raw_bytes: u64,
    /// Set by the first line that could not be digested; every later call fails with it.
    failed: Option<String>,
}

impl DigestWriter {
    /// Starts a digest file `<dir>/<rel_path>`: checks that `rel_path` is a plain relative path
    /// (no `..`, not absolute), creates its parent directories (mode 0700) and the temporary file.
    pub fn create(dir: &Path, rel_path: &Path, key: KeyFields) -> Result<DigestWriter, DigestError> {
        let plain = rel_path.components().all(|c| matches!(c, Component::Normal(_)));
        let file_name = match rel_path.file_name() {
            Some(name) if plain => name.to_string_lossy().into_owned(),
            _ => {
                return Err(DigestError::Io {
                    path: rel_path.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a digest file path must be relative, without `..`, and name a file",
                    ),
                });
            }
        };
        let final_path = dir.join(rel_path);
        let parent = final_path.parent().unwrap_or(dir).to_path_buf();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(|source| DigestError::Io { path: parent.clone(), source })?;
        let tmp = create_temp_file(&parent, &file_name)?;
        Ok(DigestWriter {
            key,
            final_path,
            tmp: Some(tmp),
            partial: Vec::new(),
            entries: Vec::new(),
            key_texts: Vec::new(),
            scratch: Vec::new(),
            raw_bytes: 0,
            failed: None,
        })
    }

    /// Digests one complete line (without `\n`).
    fn add_line(&mut self, line: &[u8]) -> Result<(), DigestError> {
        let digest = digest_line(line, &self.key, &mut self.scratch)?;
        let key_len = u32::try_from(self.scratch.len()).map_err(|_| DigestError::Line {
            reason: format!("key text of {} bytes is longer than 4 GiB", self.scratch.len()),
        })?;
        let key_off = self.key_texts.len() as u64;
        self.key_texts.extend_from_slice(&self.scratch);
        self.entries.push(Entry { digest, key_off, key_len });
        Ok(())
    }

    /// Sorts the digests and writes the file, then renames it to its final name.
    ///
    /// [`DigestError::Line`] when a line could not be digested or the text does not end with a
    /// `\n` (a truncated last line); then, as on any error, nothing appears under the final name.
    pub fn finish(mut self) -> Result<DigestStats, DigestError> {
        if let Some(reason) = self.failed.take() {
            return Err(DigestError::Line { reason });
        }
        if !self.partial.is_empty() {
            return Err(DigestError::Line {
                reason: format!(
                    "the COPY text ends with an incomplete line of {} bytes (no final \\n)",
                    self.partial.len()
                ),
            });
        }
        let Some((file, tmp_path)) = self.tmp.as_ref() else {
            return Err(DigestError::Line { reason: "digest writer already finished".into() });
        };
        let io_err = |source: io::Error| DigestError::Io { path: tmp_path.clone(), source };

        self.entries.sort_unstable_by_key(|e| e.digest);
        let mut body_crc = crc32fast::Hasher::new();
        let mut out = BufWriter::with_capacity(IO_BUFFER, file);
        out.write_all(&[0u8; HEADER_LEN]).map_err(io_err)?;
        let mut key_off = 0u64;
        for e in &self.entries {
            let record = Record { digest: e.digest, key_off, key_len: e.key_len }.encode();
            body_crc.update(&record);
            out.write_all(&record).map_err(io_err)?;
            key_off += u64::from(e.key_len);
        }
        for e in &self.entries {
            // In range: key_off and key_len were taken from key_texts when the entry was added.
            let start = e.key_off as usize;
            let text = &self.key_texts[start..start + e.key_len as usize];
            body_crc.update(text);
            out.write_all(text).map_err(io_err)?;
        }
        out.flush().map_err(io_err)?;
        drop(out);

        let header = Header {
            count: self.entries.len() as u64,
            key_bytes: key_off,
            raw_bytes: self.raw_bytes,
            body_crc: body_crc.clone().finalize(),
        }
        .encode();
        file.write_all_at(&header, 0).map_err(io_err)?;
        let mut file_crc = crc32fast::Hasher::new();
        file_crc.update(&header);
        file_crc.combine(&body_crc);
        let file_bytes = (HEADER_LEN + self.entries.len() * RECORD_LEN) as u64 + key_off;

        fs::rename(tmp_path, &self.final_path)
            .map_err(|source| DigestError::Io { path: self.final_path.clone(), source })?;
        self.tmp = None;
        Ok(DigestStats {
            rows: self.entries.len() as u64,
            raw_bytes: self.raw_bytes,
            file_bytes,
            file_crc32: file_crc.finalize(),
        })
    }
}

impl Write for DigestWriter {
    /// Takes COPY text; fails (kind `InvalidData`) from the first line that cannot be digested on.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(reason) = &self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason.clone()));
        }
        self.raw_bytes += buf.len() as u64;
        let mut rest = buf;
        while let Some(end) = memchr::memchr(ROW_END, rest) {
            let (line, tail) = rest.split_at(end);
            let result = if self.partial.is_empty() {
                self.add_line(line)
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                let result = self.add_line(&whole);
                whole.clear();
                self.partial = whole;
                result
            };
            if let Err(e) = result {
                let reason = e.to_string();
                self.failed = Some(reason.clone());
                return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
            }
            rest = &tail[1..];
        }
        self.partial.extend_from_slice(rest);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for DigestWriter {
    fn drop(&mut self) {
        if let Some((file, path)) = self.tmp.take() {
            drop(file);
            if fs::remove_file(&path).is_err() {
                // Nothing more can be done in a drop; the name starts with `.` and holds
                // TEMP_MARKER, so leftover sweeps recognise it.
            }
        }
    }
}

/// Creates a new temporary file `.<final_name>.tmp-<pid>-<n>` in `dir`.
fn create_temp_file(dir: &Path, final_name: &str) -> Result<(File, PathBuf), DigestError> {
    const ATTEMPTS: u32 = 64;
    let mut attempt = 0;
    loop {
        let path = dir.join(format!(
            ".{final_name}{TEMP_MARKER}{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < ATTEMPTS => attempt += 1,
            Err(source) => return Err(DigestError::Io { path, source }),
        }
    }
}

/// One opened, validated digest file.
#[derive(Debug)]
struct DigestFile {
    path: PathBuf,
    file: File,
    count: u64,
    key_bytes: u64,
    /// Key hash of records 0, FENCE, 2·FENCE, ...
    fences: Vec<u128>,
}

/// The digest files of one table on one side, opened read-only and validated.
///
/// Any number of files, zero meaning an empty table; their key ranges may overlap. After
/// [`TableDigests::open`] the queries cannot fail: if a file cannot be read or turns out to have
/// changed since it was opened, the answer leaves its rows out and [`TableDigests::fault`] reports
/// the first such problem (the [`Side`](super::Side) implementation turns it into an error).
#[derive(Debug)]
pub struct TableDigests {
    files: Vec<DigestFile>,
    total: Digest,
    summary: Summary,
    fault: Mutex<Option<(PathBuf, String)>>,
}

/// The digest of every node at one depth of the tree, over all of a table's files, taken while they
/// are validated at open. The top levels of a comparison ask about every node above the depth where
/// differences thin out; this answers them without another pass over the files.
#[derive(Debug)]
struct Summary {
    depth: u8,
    /// Node `i` at `depth` is `nodes[i]`: `FANOUT^depth` digests.
    nodes: Vec<Digest>,
}

impl Summary {
    /// The deepest summary, up to [`SUMMARY_MAX_DEPTH`], whose nodes hold at least
    /// [`SUMMARY_ROWS_PER_NODE`] of `rows` each on average; all zero.
    fn for_rows(rows: u64) -> Summary {
        let mut depth = 0u8;
        let mut nodes = 1u64;
        while depth < SUMMARY_MAX_DEPTH && nodes * FANOUT as u64 * SUMMARY_ROWS_PER_NODE <= rows {
            depth += 1;
            nodes *= FANOUT as u64;
        }
        Summary { depth, nodes: vec![Digest::default(); FANOUT.pow(u32::from(depth))] }
    }

    /// The index at `depth` of the node holding `key_hash`: its top `4·depth` bits.
    fn index(&self, key_hash: u128) -> usize {
        if self.depth == 0 {
            return 0;
        }
        // At most 16 bits (SUMMARY_MAX_DEPTH = 4), so the cast cannot truncate.
        (key_hash >> (128 - 4 * u32::from(self.depth))) as usize
    }

    fn add(&mut self, r: &RowDigest) {
        let i = self.index(r.key_hash);
        if let Some(node) = self.nodes.get_mut(i) {
            node.add_row(r.row_hash);
        }
    }

    /// The digest of `node` when it is a valid node no deeper than the summary.
    fn node(&self, node: Node) -> Option<Digest> {
        if node.depth > self.depth || !node.is_valid() {
            return None;
        }
        let shift = 4 * u32::from(self.depth - node.depth);
        let first = usize::try_from(node.index).ok()?.checked_shl(shift)?;
        let covered = self.nodes.get(first..first + (1usize << shift))?;
        let mut digest = Digest::default();
        covered.iter().for_each(|d| digest.merge(d));
        Some(digest)
    }

    /// The digests of `node`'s children when they are no deeper than the summary.
    fn children(&self, node: Node) -> Option<[Digest; FANOUT]> {
        if node.depth >= self.depth || !node.is_valid() {
            return None;
        }
        let children = node.children();
        let mut out = [Digest::default(); FANOUT];
        for (d, child) in out.iter_mut().zip(children) {
            *d = self.node(child)?;
        }
        Some(out)
    }
}

impl TableDigests {
    /// Opens and validates each file: header (magic, version, header CRC), that the size matches
    /// the header, that records are sorted and their key ranges consistent, and the body CRC-32.
    /// A bad file gives [`DigestError::Format`] naming its path; an unreadable one
    /// [`DigestError::Io`].
    pub fn open(paths: &[PathBuf]) -> Result<TableDigests, DigestError> {
        // Every header first: the summary's depth follows the table's row count.
        let mut headers = Vec::with_capacity(paths.len());
        for path in paths {
            headers.push(open_header(path)?);
        }
        let rows = headers.iter().fold(0u64, |n, (_, h)| n.saturating_add(h.count));
        let mut summary = Summary::for_rows(rows);
        let mut files = Vec::with_capacity(paths.len());
        let mut total = Digest::default();
        for (path, (file, header)) in paths.iter().zip(headers) {
            let (file, digest) = read_body(path, file, header, &mut summary)?;
            total.merge(&digest);
            files.push(file);
        }
        Ok(TableDigests { files, total, summary, fault: Mutex::new(None) })
    }

    /// Digest of all rows in all files.
    pub fn total(&self) -> Digest {
        self.total
    }

    /// For each node, the digests of its FANOUT children (see [`Node::children`]).
    ///
    /// From memory for a node above the summary's depth; otherwise per file, a search over the
    /// in-memory key hashes to the node's range, then one pass over that range.
    pub fn children(&self, nodes: &[Node]) -> Vec<[Digest; FANOUT]> {
        let mut windows = self.windows();
        let mut out = vec![[Digest::default(); FANOUT]; nodes.len()];
        for i in in_key_order(nodes) {
            let node = nodes[i];
            if let Some(children) = self.summary.children(node) {
                out[i] = children;
                continue;
            }
            let (lo, hi) = node.bounds();
            for (f, w) in self.files.iter().zip(windows.iter_mut()) {
                self.scan(f, lo, hi, w, |r| {
                    out[i][node.child_of(r.digest.key_hash)].add_row(r.digest.row_hash);
                });
            }
        }
        out
    }

    /// For each node, the digests of its rows, sorted.
    pub fn rows(&self, nodes: &[Node]) -> Vec<Vec<RowDigest>> {
        let mut windows = self.windows();
        let mut out = vec![Vec::new(); nodes.len()];
        for i in in_key_order(nodes) {
            let (lo, hi) = nodes[i].bounds();
            for (f, w) in self.files.iter().zip(windows.iter_mut()) {
                self.scan(f, lo, hi, w, |r| out[i].push(r.digest));
            }
            out[i].sort_unstable();
        }
        out
    }

    /// The whole key hash and key text of each key in the files whose hash at `width`
    /// ([`Width::key`]) is one of `key_hashes`: once per key, in no particular order; hashes
    /// matching no key are left out. At `Full` that is one key per hash present.
    pub fn keys(&self, key_hashes: &[u128], width: Width) -> Vec<(u128, Vec<u8>)> {
        let mut wanted: Vec<u128> = key_hashes.iter().map(|&h| width.key(h)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for f in &self.files {
            // The wanted hashes are sorted: the window moves forward through the file.
            let mut w = Window::default();
            for &hash in &wanted {
                let (lo, hi) = width.key_range(hash);
                let mut firsts: Vec<Record> = Vec::new();
                self.scan(f, lo, hi, &mut w, |r| {
                    if firsts.last().is_none_or(|l| l.digest.key_hash != r.digest.key_hash) {
                        firsts.push(*r);
                    }
                });
                for r in firsts {
                    if !seen.insert(r.digest.key_hash) {
                        continue;
                    }
                    match read_key(f, &r) {
                        Ok(text) => out.push((r.digest.key_hash, text)),
                        Err(reason) => self.note_fault(&f.path, reason),
                    }
                }
            }
        }
        out
    }

    /// The digest of the rows of all `nodes` together (each row once per node that holds it: pass
    /// disjoint nodes).
    pub fn sums(&self, nodes: &[Node]) -> Digest {
        let mut total = Digest::default();
        let mut deeper = Vec::new();
        for &node in nodes {
            match self.summary.node(node) {
                Some(digest) => total.merge(&digest),
                None => deeper.push(node),
            }
        }
        for digest in self.children(&deeper).iter().flatten() {
            total.merge(digest);
        }
        total
    }

    /// The first problem met by a query since open (a file unreadable or changed since it was
    /// opened), as [`DigestError::Format`]; `None` when every answer so far was complete.
    pub fn fault(&self) -> Option<DigestError> {
        let fault = self.fault.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        fault
            .as_ref()
            .map(|(path, reason)| DigestError::Format { path: path.clone(), reason: reason.clone() })
    }

    fn note_fault(&self, path: &Path, reason: String) {
        let mut fault = self.fault.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if fault.is_none() {
            *fault = Some((path.to_path_buf(), reason));
        }
    }

    /// One read window per file, for one query.
    fn windows(&self) -> Vec<Window> {
        self.files.iter().map(|_| Window::default()).collect()
    }

    /// Calls `visit` for each record of `f` whose key hash is in `lo..=hi`, in file order.
    fn scan(&self, f: &DigestFile, lo: u128, hi: u128, w: &mut Window, mut visit: impl FnMut(&Record)) {
        if let Err(reason) = scan_file(f, lo, hi, w, &mut visit) {
            self.note_fault(&f.path, reason);
        }
    }
}

fn scan_file(
    f: &DigestFile,
    lo: u128,
    hi: u128,
    w: &mut Window,
    visit: &mut impl FnMut(&Record),
) -> Result<(), String> {
    if lo > hi {
        return Ok(());
    }
    let count = f.count as usize;
    let (mut i, end) = match w.resume {
        // Ranges asked in key order: the previous one ended at record `at`, and every record before
        // it has a key hash at most its `hi`, below this `lo`. Gallop forward from there (the next
        // range is usually close), and stop at the first hash above hi.
        Some((prev_hi, at)) if prev_hi < lo => {
            let block = first_block_from(&f.fences, lo, at / FENCE);
            (at.max(block * FENCE), count)
        }
        _ => {
            // Blocks before `first_block` hold only hashes below lo, blocks from `end_block` on only
            // hashes above hi (the fences are each block's first hash, and blocks are sorted).
            let first_block = f.fences.partition_point(|&k| k < lo).saturating_sub(1);
            let end_block = f.fences.partition_point(|&k| k <= hi);
            (first_block * FENCE, count.min(end_block * FENCE))
        }
    };
    let mut prev: Option<RowDigest> = None;
    w.resume = None;
    while i < end {
        if i < w.start || i >= w.start + w.len {
            // Read the records from i on (the next ranges of a query in key order are read from the
            // same window: one read serves many small nodes).
            let n = SCAN_RECORDS.min(count - i);
            w.buf.resize(n * RECORD_LEN, 0);
            let at = (HEADER_LEN + i * RECORD_LEN) as u64;
            f.file.read_exact_at(&mut w.buf, at).map_err(|e| format!("reading records at byte {at}: {e}"))?;
            (w.start, w.len) = (i, n);
        }
        let k = i - w.start;
        let bytes: &[u8; RECORD_LEN] =
            w.buf[k * RECORD_LEN..(k + 1) * RECORD_LEN].try_into().map_err(|_| "short record".to_string())?;
        let r = Record::decode(bytes);
        let changed = (i % FENCE == 0 && f.fences.get(i / FENCE) != Some(&r.digest.key_hash))
            || prev.is_some_and(|p| p > r.digest);
        if changed {
            return Err(format!("record {i} differs from when the file was opened (file changed?)"));
        }
        prev = Some(r.digest);
        if r.digest.key_hash > hi {
            w.resume = Some((hi, i));
            return Ok(());
        }
        if r.digest.key_hash >= lo {
            visit(&r);
        }
        i += 1;
    }
    w.resume = Some((hi, i));
    Ok(())
}

/// Records of one file read ahead for a query: `len` records from record `start`; and where the last
/// range scanned ended (its `hi`, and the index of the first record past it).
#[derive(Debug, Default)]
struct Window {
    buf: Vec<u8>,
    start: usize,
    len: usize,
    resume: Option<(u128, usize)>,
}

/// The last block at or after `from` whose first hash is below `lo` (or `from` when there is none):
/// where a scan for `lo` starts, found by galloping from `from`.
fn first_block_from(fences: &[u128], lo: u128, from: usize) -> usize {
    let n = fences.len();
    if from >= n {
        return from;
    }
    let (mut b, mut step) = (from, 1usize);
    while b + step < n && fences[b + step] < lo {
        b += step;
        step = step.saturating_mul(2);
    }
    let upto = b.saturating_add(step).min(n);
    b + fences[b..upto].partition_point(|&k| k < lo).saturating_sub(1)
}

/// Indices of `nodes` in the order of their key ranges (so each file's window moves forward).
fn in_key_order(nodes: &[Node]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| nodes[i].bounds().0);
    order
}

/// Reads the key text of record `r`, checking its range against the validated key text size.
fn read_key(f: &DigestFile, r: &Record) -> Result<Vec<u8>, String> {
    let end = r.key_off.checked_add(u64::from(r.key_len));
    if end.is_none_or(|end| end > f.key_bytes) {
        return Err("a key range lies outside the key text (file changed?)".into());
    }
    let at = HEADER_LEN as u64 + f.count * RECORD_LEN as u64 + r.key_off;
    let mut text = vec![0u8; r.key_len as usize];
    f.file.read_exact_at(&mut text, at).map_err(|e| format!("reading key text at byte {at}: {e}"))?;
    Ok(text)
}

/// Opens one digest file and validates its header and size (see the module documentation).
fn open_header(path: &Path) -> Result<(File, Header), DigestError> {
    let io_err = |source: io::Error| DigestError::Io { path: path.to_path_buf(), source };
    let bad = |reason: String| DigestError::Format { path: path.to_path_buf(), reason };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len < HEADER_LEN as u64 {
        return Err(bad(format!("{len} bytes, shorter than the {HEADER_LEN}-byte header")));
    }
    let mut header = [0u8; HEADER_LEN];
    file.read_exact_at(&mut header, 0).map_err(|e| read_error(path, e))?;
    let header = Header::decode(&header).map_err(bad)?;
    let expected = header
        .count
        .checked_mul(RECORD_LEN as u64)
        .and_then(|r| r.checked_add(HEADER_LEN as u64))
        .and_then(|r| r.checked_add(header.key_bytes));
    if expected != Some(len) {
        return Err(bad(format!(
            "header says {} records and {} key text bytes, which does not match the file size {len}",
            header.count, header.key_bytes
        )));
    }

    Ok((file, header))
}

/// An I/O error reading `path`, where an early end of file means the file shrank.
fn read_error(path: &Path, e: io::Error) -> DigestError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        let reason = "shorter than its header says (truncated while being read?)".into();
        DigestError::Format { path: path.to_path_buf(), reason }
    } else {
        DigestError::Io { path: path.to_path_buf(), source: e }
    }
}

/// Validates the body of a digest file opened by [`open_header`] (see the module documentation),
/// adding its rows to `summary`; returns the file and the digest of all its rows.
fn read_body(
    path: &Path,
    file: File,
    header: Header,
    summary: &mut Summary,
) -> Result<(DigestFile, Digest), DigestError> {
    let bad = |reason: String| DigestError::Format { path: path.to_path_buf(), reason };
    let read_err = |e: io::Error| read_error(path, e);
    let mut reader = BufReader::with_capacity(IO_BUFFER, &file);
    reader.seek_relative(HEADER_LEN as i64).map_err(read_err)?;
    // open_header checked that count·RECORD_LEN fits in the file, so these fit in memory terms
    // as the file does.
    let count = header.count as usize;
    let mut fences = Vec::with_capacity(count.div_ceil(FENCE));
    let mut crc = crc32fast::Hasher::new();
    let mut total = Digest::default();
    let mut prev: Option<RowDigest> = None;
    let mut next_off = 0u64;
    let mut record = [0u8; RECORD_LEN];
    for i in 0..count {
        reader.read_exact(&mut record).map_err(read_err)?;
        crc.update(&record);
        let r = Record::decode(&record);
        if prev.is_some_and(|p| p > r.digest) {
            return Err(bad(format!("records {} and {i} are not sorted by key hash", i - 1)));
        }
        if r.key_off != next_off {
            return Err(bad(format!("record {i}: key text offset {} (expected {next_off})", r.key_off)));
        }
        next_off = match next_off.checked_add(u64::from(r.key_len)) {
            Some(end) if end <= header.key_bytes => end,
            _ => return Err(bad(format!("record {i}: key text range ends past the key text"))),
        };
        if i % FENCE == 0 {
            fences.push(r.digest.key_hash);
        }
        prev = Some(r.digest);
        total.add_row(r.digest.row_hash);
        summary.add(&r.digest);
    }
    if next_off != header.key_bytes {
        return Err(bad(format!("records use {next_off} key text bytes, header says {}", header.key_bytes)));
    }
    let mut left = header.key_bytes;
    let mut chunk = vec![0u8; IO_BUFFER];
    while left > 0 {
        let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        reader.read_exact(&mut chunk[..n]).map_err(read_err)?;
        crc.update(&chunk[..n]);
        left -= n as u64;
    }
    let found = crc.finalize();
    if found != header.body_crc {
        return Err(bad(format!("body CRC-32 is {found:08x}, header says {:08x}", header.body_crc)));
    }
    Ok((
        DigestFile {
            path: path.to_path_buf(),
            file,
            count: header.count,
            key_bytes: header.key_bytes,
            fences,
        },
        total,
    ))
}

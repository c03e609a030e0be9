//! Row digests and the key-hash tree used by overlap analysis: comparing one table between two
//! servers by key without moving its rows.
//!
//! # Hashes
//!
//! Each row is taken in its COPY TEXT form ([`crate::copy_text`]): fields separated by a raw tab,
//! escaped so that splitting on raw bytes is exact. From a line (without its `\n`):
//!
//! - the **key text** is the raw, still escaped bytes of the key fields ([`KeyFields`], in key
//!   order) joined by one tab; NULL stays the two bytes `\N`, so NULL and `''` differ. A field of a
//!   type whose equal values can print differently is first brought to one form ([`KeyText::Number`]:
//!   `1.50` and `1.5`, `-0` and `0`), so that one key always has one key text;
//! - `key_hash` = XXH3-128 of the key text with seed [`KEY_SEED`] ([`key_hash`]);
//! - `row_hash` = XXH3-128 of the whole line with seed [`ROW_SEED`] ([`row_hash`]).
//!
//! The two seeds separate the domains: a key text equal to a whole line (a one-column table)
//! still hashes differently as a key and as a row. Both seeds are part of the format: both
//! servers must use the same ones, so they never change.
//!
//! # Tree
//!
//! The key-hash space is a tree of fanout [`FANOUT`] = 16: a [`Node`] at depth `d` holds the key
//! hashes whose top `4·d` bits equal its index; the root (depth 0) holds all of them; at
//! [`MAX_DEPTH`] = 32 a node holds one key hash. A node's [`Digest`] is (row count, sum of row hashes
//! mod 2¹²⁸): additive and independent of row order, and — unlike XOR — two equal rows do not
//! cancel, nor do swapped values between rows.
//!
//! # Pieces
//!
//! - [`DigestWriter`] turns one chunk's COPY text into a digest file (records sorted by key hash,
//!   with their key texts; layout in the `file` submodule's documentation);
//! - [`TableDigests`] reads the digest files of one table and answers the tree queries;
//! - [`wire`] encodes queries and answers as text for a SQL connection;
//! - [`compare()`] walks the tree top-down between two [`Side`]s and classifies differing keys.
//!
//! # Example: compare two one-file tables
//!
//! ```
//! use std::io::Write;
//! use std::path::Path;
//! use steep_repl_engine::digest::{self, Category, DigestWriter, KeyFields, Limits, TableDigests};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let open = |name: &str, copy_text: &[u8]| -> Result<TableDigests, digest::DigestError> {
//!     let rel = Path::new(name).join("0.digest");
//!     let mut writer = DigestWriter::create(dir.path(), &rel, KeyFields::new(vec![0])?)?;
//!     writer.write_all(copy_text).map_err(|e| digest::DigestError::Line { reason: e.to_string() })?;
//!     writer.finish()?;
//!     TableDigests::open(&[dir.path().join(rel)])
//! };
//! let mut local = open("local", b"1\tAnn\n2\tBob\n3\t\\N\n")?;
//! let mut peer = open("peer", b"1\tAnn\n2\tRob\n4\tEve\n")?;
//!
//! let result = digest::compare(&mut local, &mut peer, &Limits::default(), &mut || Ok(()))?;
//! assert_eq!((result.matched, result.conflict, result.local_only, result.peer_only), (1, 1, 1, 1));
//! assert!(result.keys.contains(&(Category::Conflict, b"2".to_vec())));
//! # Ok(())
//! # }
//! ```

mod compare;
mod file;
pub mod wire;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use compare::{Category, Comparison, CountingSide, DENSE_CHILDREN, Limits, Side, SideCounts, compare};
pub use file::{DigestStats, DigestWriter, TableDigests};

use crate::copy_text::DELIMITER;

/// Children per tree node: one per value of the next 4 bits of the key hash.
pub const FANOUT: usize = 16;

/// Depth of the deepest nodes: 128 bits of key hash at 4 bits per level. A node at this depth
/// holds exactly one key hash and is never split.
pub const MAX_DEPTH: u8 = 32;

/// Key-hash bits consumed per tree level (log2 of [`FANOUT`]).
const LEVEL_BITS: u32 = 4;

/// XXH3-128 seed of key hashes: the ASCII bytes `srepkey1` read little-endian. Part of the format.
pub const KEY_SEED: u64 = u64::from_le_bytes(*b"srepkey1");

/// XXH3-128 seed of row hashes: the ASCII bytes `sreprow1` read little-endian. Part of the format.
pub const ROW_SEED: u64 = u64::from_le_bytes(*b"sreprow1");

/// Any failure of digest writing, reading, encoding or comparison.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// An operating-system I/O call failed on `path`.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A digest file that is not one, is truncated, corrupt, or changed since it was opened.
    #[error("invalid digest file {}: {reason}", path.display())]
    Format {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A COPY line that cannot be digested (fewer fields than a key position, ...), or key
    /// positions that are not acceptable.
    #[error("cannot digest row: {reason}")]
    Line {
        /// What is wrong.
        reason: String,
    },

    /// Encoded text (see [`wire`]) that is not valid.
    #[error("invalid digest encoding: {0}")]
    Wire(String),

    /// One side of a comparison failed or answered inconsistently.
    #[error("{0}")]
    Side(String),

    /// The comparison was stopped (cancelled) by its caller.
    #[error("stopped: {0}")]
    Stopped(String),

    /// Narrow fingerprints ([`Width::Narrow`]) could not tell two things apart: two keys sharing the
    /// top 64 bits of their hash, or nodes taken as equal whose full sums differ. [`compare()`]
    /// then compares the table again at [`Width::Full`]; callers never see this error.
    #[error("fingerprint collision: {0}")]
    Collision(String),
}

/// How much of each hash a side's answers carry: what crosses the network when one side is a peer.
///
/// - [`Width::Full`]: node sums and key hashes whole (128 bits).
/// - [`Width::Narrow`]: node sums reduced to their low 64 bits (still additive: the low 64 bits of a
///   sum are the sum of the low 64 bits), key hashes of rows to their top 64 bits. Row hashes are
///   always whole, so two rows are only ever taken as equal on 128 bits.
///
/// [`compare()`] works at `Narrow` and checks the 128-bit sums once for the whole table at the end;
/// whatever narrow fingerprints could not tell apart is found there or as a repeated key
/// ([`DigestError::Collision`]), and the table is compared again at `Full`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Width {
    /// 64-bit node fingerprints and row key hashes.
    #[default]
    Narrow,
    /// Whole 128-bit sums and key hashes.
    Full,
}

impl Width {
    /// Bytes of a node sum or row key hash at this width.
    pub fn bytes(self) -> usize {
        match self {
            Width::Narrow => 8,
            Width::Full => 16,
        }
    }

    /// A node sum as answered at this width (its low bits).
    pub fn sum(self, sum: u128) -> u128 {
        match self {
            Width::Narrow => sum & u128::from(u64::MAX),
            Width::Full => sum,
        }
    }

    /// A key hash as answered at this width (its top bits, the rest zero).
    pub fn key(self, key_hash: u128) -> u128 {
        match self {
            Width::Narrow => key_hash & !u128::from(u64::MAX),
            Width::Full => key_hash,
        }
    }

    /// The inclusive range of full key hashes that [`Width::key`] maps to `narrowed`.
    pub fn key_range(self, narrowed: u128) -> (u128, u128) {
        match self {
            Width::Narrow => (self.key(narrowed), self.key(narrowed) | u128::from(u64::MAX)),
            Width::Full => (narrowed, narrowed),
        }
    }

    /// A digest as answered at this width.
    pub fn digest(self, d: Digest) -> Digest {
        Digest { rows: d.rows, sum: self.sum(d.sum) }
    }

    /// A row digest as answered at this width (key hash narrowed, row hash whole).
    pub fn row(self, r: RowDigest) -> RowDigest {
        RowDigest { key_hash: self.key(r.key_hash), row_hash: r.row_hash }
    }

    /// The deepest node worth splitting at this width: below it narrowed key hashes no longer
    /// say which child a row is in.
    pub fn max_depth(self) -> u8 {
        match self {
            Width::Narrow => 16,
            Width::Full => MAX_DEPTH,
        }
    }
}

/// How a key field's printed value enters the key text.
///
/// Two rows have the same key when the key's index says their values are equal; for most types
/// equal values print alike, and the printed text is the key. For the others one form is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyText {
    /// As printed.
    #[default]
    Exact,
    /// A number whose equal values can print differently: `numeric` without a declared scale
    /// (`1.5`, `1.50`) and `real`/`double precision` (`-0`, `0`). Trailing zeros of a fraction, then
    /// a bare point, are dropped (not in exponent notation), and `-0` becomes `0`. `NaN`, the
    /// infinities and `\N` are left alone.
    Number,
}

impl KeyText {
    /// How to take a key column of type `format_type` (as `pg_catalog.format_type` prints it);
    /// `None` for a type whose equal values can print differently in ways no one form is chosen
    /// for here (`interval`: `1 mon` and `30 days`; `citext`: `A` and `a`; `jsonb`: `1.0` and
    /// `1.00` inside; arrays of numbers): a key of such a type cannot be compared by its text.
    pub fn of_type(format_type: &str) -> Option<KeyText> {
        match format_type {
            "numeric" | "real" | "double precision" => Some(KeyText::Number),
            "interval" | "citext" | "jsonb" | "json" => None,
            t if t.ends_with("[]") && KeyText::of_type(t.trim_end_matches("[]")) != Some(KeyText::Exact) => {
                None
            }
            t if t.starts_with("interval") => None,
            _ => Some(KeyText::Exact),
        }
    }

    /// Appends `field` (raw COPY text) to `out` in this form.
    fn push(self, out: &mut Vec<u8>, field: &[u8]) {
        let mut f = field;
        if self == KeyText::Number {
            if f.contains(&b'.') && !f.iter().any(|b| matches!(b, b'e' | b'E')) {
                while let [rest @ .., b'0'] = f {
                    f = rest;
                }
                if let [rest @ .., b'.'] = f {
                    f = rest;
                }
            }
            if f == b"-0" {
                f = b"0";
            }
        }
        out.extend_from_slice(f);
    }
}

/// Positions (0-based) of the key fields in a table's COPY line, in key order, each with its
/// [`KeyText`]; non-empty, no duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFields {
    positions: Vec<usize>,
    texts: Vec<KeyText>,
    /// True when `positions` is strictly increasing, so one pass over a line finds them all.
    increasing: bool,
}

impl KeyFields {
    /// Checks and wraps key positions, each taken as printed; [`DigestError::Line`] when empty or
    /// with a duplicate.
    pub fn new(positions: Vec<usize>) -> Result<KeyFields, DigestError> {
        let texts = vec![KeyText::Exact; positions.len()];
        KeyFields::with_texts(positions, texts)
    }

    /// [`KeyFields::new`] with the form of each field (`texts[i]` for `positions[i]`; missing ones
    /// are [`KeyText::Exact`]).
    pub fn with_texts(positions: Vec<usize>, mut texts: Vec<KeyText>) -> Result<KeyFields, DigestError> {
        if positions.is_empty() {
            return Err(DigestError::Line { reason: "no key fields given".into() });
        }
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(DigestError::Line { reason: format!("key field {} given twice", w[0]) });
        }
        texts.resize(positions.len(), KeyText::Exact);
        let increasing = sorted == positions;
        Ok(KeyFields { positions, texts, increasing })
    }

    /// The key positions, in key order.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }
}

/// Digest of a set of rows: how many, and the sum of their row hashes mod 2¹²⁸.
///
/// Equal sets of rows (as multisets of lines) have equal digests; [`Digest::merge`] of the digests
/// of disjoint sets is the digest of their union.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    /// Number of rows.
    pub rows: u64,
    /// Sum of the rows' [`row_hash`]es, wrapping at 2¹²⁸.
    pub sum: u128,
}

impl Digest {
    /// Adds one row.
    pub fn add_row(&mut self, row_hash: u128) {
        self.rows = self.rows.wrapping_add(1);
        self.sum = self.sum.wrapping_add(row_hash);
    }

    /// Adds the rows of `other` (wrapping adds, never panics).
    pub fn merge(&mut self, other: &Digest) {
        self.rows = self.rows.wrapping_add(other.rows);
        self.sum = self.sum.wrapping_add(other.sum);
    }
}

/// A node of the key-hash tree: the key hashes whose top `4·depth` bits equal `index`.
///
/// A valid node ([`Node::is_valid`]) has `depth <= MAX_DEPTH` and `index < 16^depth`. The methods
/// never panic, also on invalid nodes (their answers are then meaningless).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    /// Depth in the tree, 0 (root) to [`MAX_DEPTH`].
    pub depth: u8,
    /// The node's key-hash prefix, `4·depth` bits.
    pub index: u128,
}

impl Node {
    /// The root: every key hash.
    pub const ROOT: Node = Node { depth: 0, index: 0 };

    /// Number of low key-hash bits below this node's prefix (128 for the root).
    fn free_bits(self) -> u32 {
        128 - LEVEL_BITS * u32::from(self.depth.min(MAX_DEPTH))
    }

    /// True when `depth <= MAX_DEPTH` and `index` fits in `4·depth` bits.
    pub fn is_valid(self) -> bool {
        self.depth <= MAX_DEPTH
            && (self.depth == MAX_DEPTH || self.index >> (LEVEL_BITS * u32::from(self.depth)) == 0)
    }

    /// The FANOUT children, in key-hash order (child `i` holds the hashes whose next 4 bits are `i`).
    ///
    /// A node at [`MAX_DEPTH`] holds a single key hash and cannot be split: callers never expand
    /// it ([`compare()`] settles it by rows). For it this returns `[self; FANOUT]`, and
    /// [`Node::child_of`] returns 0 ([`TableDigests::children`] reports all its rows in child 0).
    pub fn children(self) -> [Node; FANOUT] {
        if self.depth >= MAX_DEPTH {
            return [self; FANOUT];
        }
        let mut out = [self; FANOUT];
        for (i, child) in (0u128..).zip(out.iter_mut()) {
            *child = Node { depth: self.depth + 1, index: (self.index << LEVEL_BITS) | i };
        }
        out
    }

    /// True when `key_hash` lies in this node.
    pub fn contains(self, key_hash: u128) -> bool {
        let free = self.free_bits();
        free >= 128 || key_hash >> free == self.index
    }

    /// The inclusive range `(lo, hi)` of key hashes in this node.
    pub fn bounds(self) -> (u128, u128) {
        let free = self.free_bits();
        if free >= 128 {
            return (0, u128::MAX);
        }
        let lo = self.index << free;
        let low_mask = if free == 0 { 0 } else { u128::MAX >> (128 - free) };
        (lo, lo | low_mask)
    }

    /// Which of [`Node::children`] holds `key_hash` (assumed to lie in this node); 0 at
    /// [`MAX_DEPTH`].
    pub fn child_of(self, key_hash: u128) -> usize {
        if self.depth >= MAX_DEPTH {
            return 0;
        }
        let shift = self.free_bits() - LEVEL_BITS;
        // Masked to 4 bits, so the cast cannot truncate.
        ((key_hash >> shift) & 0xF) as usize
    }
}

/// The two hashes of one row.
///
/// Ordered by key hash, then row hash: the order of records in digest files and of the lists
/// [`TableDigests::rows`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowDigest {
    /// [`key_hash`] of the row's key text.
    pub key_hash: u128,
    /// [`row_hash`] of the row's whole line.
    pub row_hash: u128,
}

/// XXH3-128 of a key text, with seed [`KEY_SEED`].
pub fn key_hash(key_text: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(key_text, KEY_SEED)
}

/// XXH3-128 of a COPY line without its `\n`, with seed [`ROW_SEED`].
pub fn row_hash(line: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(line, ROW_SEED)
}

/// Splits one COPY line (without its `\n`) into its key text, left in `key_text` (cleared first),
/// and returns the row's hashes.
///
/// [`DigestError::Line`] when the line has fewer fields than a key position needs. The line is not
/// otherwise checked: a trailing `\n` would be taken as part of the last field.
pub fn digest_line(line: &[u8], key: &KeyFields, key_text: &mut Vec<u8>) -> Result<RowDigest, DigestError> {
    key_text.clear();
    if key.increasing {
        // One pass: fields in order, picking the key positions as they come.
        let mut wanted = key.positions.iter().copied().zip(key.texts.iter().copied()).peekable();
        for (n, field) in fields(line).enumerate() {
            if let Some(&(_, text)) = wanted.peek().filter(|(p, _)| *p == n) {
                if n != key.positions[0] {
                    key_text.push(DELIMITER);
                }
                text.push(key_text, field);
                wanted.next();
                if wanted.peek().is_none() {
                    break;
                }
            }
        }
        if let Some((missing, _)) = wanted.next() {
            return Err(missing_field(line, missing));
        }
    } else {
        for (k, (&pos, text)) in key.positions.iter().zip(&key.texts).enumerate() {
            let field = fields(line).nth(pos).ok_or_else(|| missing_field(line, pos))?;
            if k > 0 {
                key_text.push(DELIMITER);
            }
            text.push(key_text, field);
        }
    }
    Ok(RowDigest { key_hash: key_hash(key_text), row_hash: row_hash(line) })
}

/// The fields of a line: the bytes between raw tabs.
fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|&b| b == DELIMITER)
}

fn missing_field(line: &[u8], pos: usize) -> DigestError {
    DigestError::Line {
        reason: format!(
            "the line has {} fields, key field {} (0-based) is missing",
            fields(line).count(),
            pos
        ),
    }
}

//! Binary encodings of tree queries and answers, for sending over a SQL connection.
//!
//! Each message starts with one tag byte naming what it holds (and, for answers whose size depends
//! on a [`Width`], at which width), so bytes of one kind are never read as another. Integers are
//! LEB128 varints or fixed-size little-endian. Decoding checks every length against the bytes
//! actually present, allocates nothing beyond them, and never panics: anything malformed is
//! [`DigestError::Wire`]. Answers travel as `bytea` in libpq's binary result format; queries, being
//! small, as base64 text inside the statement ([`to_text`], [`from_text`]).
//!
//! ```text
//! nodes     'N' count  { depth u8, index: ceil(depth/2) bytes LE }
//! digest    'D' digest(16)
//! children  'C' (Full) | 'c' (Narrow)  count  { 16 × digest(w) }
//! rows      'R' (Full) | 'r' (Narrow)  lists  { len { key_hash(w, prefix-shared), row_hash 16 LE } }
//! hashes    'H' (Full) | 'h' (Narrow)  count  { key_hash(w, prefix-shared) }
//! keys      'K' count  { key_hash 16 LE, len, len bytes }
//!
//! w = Width::bytes(): 16 (Full) or 8 (Narrow)
//! digest(w)  = varint(rows·2 + (sum ≠ 0)) [low w bytes of sum, LE, when ≠ 0]   an empty digest is 1 byte
//! key_hash(w, prefix-shared) = s u8 (0..=w), then the w−s next bytes of the hash, big-endian: the
//!              top s bytes are those of the previous key hash in the same message (0 at the start);
//!              at Narrow the low 8 bytes are not sent and read as zero (Width::key)
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{Digest, DigestError, FANOUT, MAX_DEPTH, Node, RowDigest, Width};

const TAG_NODES: u8 = b'N';
const TAG_DIGEST: u8 = b'D';
const TAG_KEYS: u8 = b'K';

fn tag_children(width: Width) -> u8 {
    match width {
        Width::Full => b'C',
        Width::Narrow => b'c',
    }
}

fn tag_rows(width: Width) -> u8 {
    match width {
        Width::Full => b'R',
        Width::Narrow => b'r',
    }
}

fn tag_hashes(width: Width) -> u8 {
    match width {
        Width::Full => b'H',
        Width::Narrow => b'h',
    }
}

/// Base64 text of an encoded message, to put in a statement.
pub fn to_text(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The message in base64 `text` ([`to_text`]).
pub fn from_text(text: &str) -> Result<Vec<u8>, DigestError> {
    STANDARD.decode(text.trim_ascii()).map_err(|e| wire(format!("not base64: {e}")))
}

/// Encodes tree nodes.
pub fn encode_nodes(nodes: &[Node]) -> Vec<u8> {
    let mut out = start(TAG_NODES, nodes.len());
    for node in nodes {
        let depth = node.depth.min(MAX_DEPTH);
        out.push(depth);
        let n = index_bytes(depth);
        out.extend_from_slice(&node.index.to_le_bytes()[..n]);
    }
    out
}

/// Decodes [`encode_nodes`] bytes; every node must be valid ([`Node::is_valid`]).
pub fn decode_nodes(bytes: &[u8]) -> Result<Vec<Node>, DigestError> {
    let mut r = Reader::new(bytes, TAG_NODES)?;
    let count = r.count(1)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let depth = r.u8()?;
        if depth > MAX_DEPTH {
            return Err(wire(format!("node depth {depth} exceeds {MAX_DEPTH}")));
        }
        let mut index = [0u8; 16];
        index[..index_bytes(depth)].copy_from_slice(r.take(index_bytes(depth))?);
        let node = Node { depth, index: u128::from_le_bytes(index) };
        if !node.is_valid() {
            return Err(wire(format!("node index too large for depth {depth}")));
        }
        out.push(node);
    }
    r.end()?;
    Ok(out)
}

/// Encodes one whole (128-bit) digest.
pub fn encode_digest(digest: &Digest) -> Vec<u8> {
    let mut out = vec![TAG_DIGEST];
    put_digest(&mut out, digest, Width::Full);
    out
}

/// Decodes [`encode_digest`] bytes.
pub fn decode_digest(bytes: &[u8]) -> Result<Digest, DigestError> {
    let mut r = Reader::new(bytes, TAG_DIGEST)?;
    let digest = r.digest(Width::Full)?;
    r.end()?;
    Ok(digest)
}

/// Encodes the children digests of several nodes at `width` (sums narrowed by [`Width::sum`]).
pub fn encode_children(children: &[[Digest; FANOUT]], width: Width) -> Vec<u8> {
    let mut out = start(tag_children(width), children.len());
    for digest in children.iter().flatten() {
        put_digest(&mut out, digest, width);
    }
    out
}

/// Decodes [`encode_children`] bytes of the given width.
pub fn decode_children(bytes: &[u8], width: Width) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
    let mut r = Reader::new(bytes, tag_children(width))?;
    let count = r.count(FANOUT)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut node = [Digest::default(); FANOUT];
        for digest in &mut node {
            *digest = r.digest(width)?;
        }
        out.push(node);
    }
    r.end()?;
    Ok(out)
}

/// Encodes the row digests of several nodes, key hashes at `width` ([`Width::key`]).
pub fn encode_rows(rows: &[Vec<RowDigest>], width: Width) -> Vec<u8> {
    let mut out = start(tag_rows(width), rows.len());
    let mut prev = 0u128;
    for list in rows {
        put_varint(&mut out, list.len() as u128);
        for row in list {
            put_shared_hash(&mut out, &mut prev, row.key_hash, width);
            out.extend_from_slice(&row.row_hash.to_le_bytes());
        }
    }
    out
}

/// Decodes [`encode_rows`] bytes of the given width.
pub fn decode_rows(bytes: &[u8], width: Width) -> Result<Vec<Vec<RowDigest>>, DigestError> {
    let mut r = Reader::new(bytes, tag_rows(width))?;
    let lists = r.count(1)?;
    let mut out = Vec::with_capacity(lists);
    let mut prev = 0u128;
    for _ in 0..lists {
        let len = r.count(17)?;
        let mut list = Vec::with_capacity(len);
        for _ in 0..len {
            let key_hash = r.shared_hash(&mut prev, width)?;
            let row_hash = r.u128_le()?;
            list.push(RowDigest { key_hash, row_hash });
        }
        out.push(list);
    }
    r.end()?;
    Ok(out)
}

/// Encodes key hashes at `width` (cheapest when sorted).
pub fn encode_hashes(hashes: &[u128], width: Width) -> Vec<u8> {
    let mut out = start(tag_hashes(width), hashes.len());
    let mut prev = 0u128;
    for &hash in hashes {
        put_shared_hash(&mut out, &mut prev, hash, width);
    }
    out
}

/// Decodes [`encode_hashes`] bytes of the given width.
pub fn decode_hashes(bytes: &[u8], width: Width) -> Result<Vec<u128>, DigestError> {
    let mut r = Reader::new(bytes, tag_hashes(width))?;
    let count = r.count(1)?;
    let mut out = Vec::with_capacity(count);
    let mut prev = 0u128;
    for _ in 0..count {
        out.push(r.shared_hash(&mut prev, width)?);
    }
    r.end()?;
    Ok(out)
}

/// Encodes whole key hashes with their key texts.
pub fn encode_keys(keys: &[(u128, Vec<u8>)]) -> Vec<u8> {
    let mut out = start(TAG_KEYS, keys.len());
    for (hash, text) in keys {
        out.extend_from_slice(&hash.to_le_bytes());
        put_varint(&mut out, text.len() as u128);
        out.extend_from_slice(text);
    }
    out
}

/// Decodes [`encode_keys`] bytes.
pub fn decode_keys(bytes: &[u8]) -> Result<Vec<(u128, Vec<u8>)>, DigestError> {
    let mut r = Reader::new(bytes, TAG_KEYS)?;
    let count = r.count(17)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let hash = r.u128_le()?;
        let len = r.count(1)?;
        out.push((hash, r.take(len)?.to_vec()));
    }
    r.end()?;
    Ok(out)
}

/// Bytes of a node index at `depth`: 4 bits per level, rounded up.
fn index_bytes(depth: u8) -> usize {
    usize::from(depth.min(MAX_DEPTH)).div_ceil(2)
}

fn wire(reason: impl Into<String>) -> DigestError {
    DigestError::Wire(reason.into())
}

fn start(tag: u8, count: usize) -> Vec<u8> {
    let mut out = vec![tag];
    put_varint(&mut out, count as u128);
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7F) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_digest(out: &mut Vec<u8>, digest: &Digest, width: Width) {
    let sum = width.sum(digest.sum);
    let has_sum = sum != 0;
    put_varint(out, (u128::from(digest.rows) << 1) | u128::from(has_sum));
    if has_sum {
        out.extend_from_slice(&sum.to_le_bytes()[..width.bytes()]);
    }
}

fn put_shared_hash(out: &mut Vec<u8>, prev: &mut u128, hash: u128, width: Width) {
    let hash = width.key(hash);
    let shared = (((*prev ^ hash).leading_zeros() / 8) as usize).min(width.bytes());
    out.push(shared as u8);
    out.extend_from_slice(&hash.to_be_bytes()[shared..width.bytes()]);
    *prev = hash;
}

/// Reads a decoded message, checking every length against what is left.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], tag: u8) -> Result<Reader<'a>, DigestError> {
        match bytes.split_first() {
            Some((&found, rest)) if found == tag => Ok(Reader { bytes: rest }),
            Some((&found, _)) => {
                Err(wire(format!("message kind {:?}, expected {:?}", char::from(found), char::from(tag))))
            }
            None => Err(wire("empty message")),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DigestError> {
        if n > self.bytes.len() {
            return Err(wire(format!("needs {n} more bytes, {} left", self.bytes.len())));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DigestError> {
        Ok(self.take(1)?[0])
    }

    fn u128_le(&mut self) -> Result<u128, DigestError> {
        let mut b = [0u8; 16];
        b.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(b))
    }

    fn varint(&mut self) -> Result<u128, DigestError> {
        let mut v = 0u128;
        for i in 0..19u32 {
            let b = self.u8()?;
            let bits = u128::from(b & 0x7F);
            let shift = 7 * i;
            if shift >= 126 && bits >> (128 - shift) != 0 {
                return Err(wire("varint exceeds 128 bits"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(wire("varint longer than 19 bytes"))
    }

    /// A count of items each at least `min_item_bytes` long: checked against the bytes left, so
    /// it can size an allocation.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, DigestError> {
        let v = self.varint()?;
        let fits = usize::try_from(v)
            .ok()
            .filter(|&n| n.checked_mul(min_item_bytes).is_some_and(|need| need <= self.bytes.len()));
        fits.ok_or_else(|| wire(format!("count {v} exceeds the {} bytes left", self.bytes.len())))
    }

    fn digest(&mut self, width: Width) -> Result<Digest, DigestError> {
        let v = self.varint()?;
        let rows = u64::try_from(v >> 1).map_err(|_| wire("row count exceeds 64 bits"))?;
        let sum = if v & 1 == 1 {
            let mut b = [0u8; 16];
            b[..width.bytes()].copy_from_slice(self.take(width.bytes())?);
            let sum = u128::from_le_bytes(b);
            if sum == 0 {
                return Err(wire("digest sum marked present but zero"));
            }
            sum
        } else {
            0
        };
        Ok(Digest { rows, sum })
    }

    fn shared_hash(&mut self, prev: &mut u128, width: Width) -> Result<u128, DigestError> {
        let shared = usize::from(self.u8()?);
        let w = width.bytes();
        if shared > w {
            return Err(wire(format!("key hash shares {shared} bytes (at most {w})")));
        }
        let mut b = prev.to_be_bytes();
        b[shared..w].copy_from_slice(self.take(w - shared)?);
        *prev = u128::from_be_bytes(b);
        Ok(*prev)
    }

    fn end(&self) -> Result<(), DigestError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(wire(format!("{} bytes left after the message", self.bytes.len())))
        }
    }
}

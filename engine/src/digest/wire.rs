//! Text encodings of tree queries and answers, for sending over a SQL connection.
//!
//! Each is standard base64 (with padding, no newlines) of a compact binary form that starts with
//! one tag byte naming what it holds, so text of one kind is never read as another. Integers are
//! LEB128 varints or fixed-size little-endian. Decoding checks every length against the bytes
//! actually present, allocates nothing beyond them, and never panics: anything malformed is
//! [`DigestError::Wire`].
//!
//! ```text
//! nodes     'N' count  { depth u8, index: ceil(depth/2) bytes LE }
//! digest    'D' digest
//! children  'C' count  { 16 × digest }
//! rows      'R' lists  { len { key_hash (prefix-shared), row_hash 16 LE } }
//! hashes    'H' count  { key_hash (prefix-shared) }
//! keys      'K' count  { key_hash 16 LE, len, len bytes }
//!
//! digest     = varint(rows·2 + (sum ≠ 0)) [sum 16 LE, when ≠ 0]    an empty digest is 1 byte
//! key_hash (prefix-shared) = s u8 (0..=16), then the 16−s low bytes, big-endian: the top s
//!              bytes are those of the previous key hash in the same message (0 at the start)
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{Digest, DigestError, FANOUT, MAX_DEPTH, Node, RowDigest};

const TAG_NODES: u8 = b'N';
const TAG_DIGEST: u8 = b'D';
const TAG_CHILDREN: u8 = b'C';
const TAG_ROWS: u8 = b'R';
const TAG_HASHES: u8 = b'H';
const TAG_KEYS: u8 = b'K';

/// Encodes tree nodes.
pub fn encode_nodes(nodes: &[Node]) -> String {
    let mut out = start(TAG_NODES, nodes.len());
    for node in nodes {
        let depth = node.depth.min(MAX_DEPTH);
        out.push(depth);
        let n = index_bytes(depth);
        out.extend_from_slice(&node.index.to_le_bytes()[..n]);
    }
    STANDARD.encode(out)
}

/// Decodes [`encode_nodes`] text; every node must be valid ([`Node::is_valid`]).
pub fn decode_nodes(text: &str) -> Result<Vec<Node>, DigestError> {
    let bytes = decode_base64(text)?;
    let mut r = Reader::new(&bytes, TAG_NODES)?;
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

/// Encodes one digest.
pub fn encode_digest(digest: &Digest) -> String {
    let mut out = vec![TAG_DIGEST];
    put_digest(&mut out, digest);
    STANDARD.encode(out)
}

/// Decodes [`encode_digest`] text.
pub fn decode_digest(text: &str) -> Result<Digest, DigestError> {
    let bytes = decode_base64(text)?;
    let mut r = Reader::new(&bytes, TAG_DIGEST)?;
    let digest = r.digest()?;
    r.end()?;
    Ok(digest)
}

/// Encodes the children digests of several nodes.
pub fn encode_children(children: &[[Digest; FANOUT]]) -> String {
    let mut out = start(TAG_CHILDREN, children.len());
    for digest in children.iter().flatten() {
        put_digest(&mut out, digest);
    }
    STANDARD.encode(out)
}

/// Decodes [`encode_children`] text.
pub fn decode_children(text: &str) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
    let bytes = decode_base64(text)?;
    let mut r = Reader::new(&bytes, TAG_CHILDREN)?;
    let count = r.count(FANOUT)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut node = [Digest::default(); FANOUT];
        for digest in &mut node {
            *digest = r.digest()?;
        }
        out.push(node);
    }
    r.end()?;
    Ok(out)
}

/// Encodes the row digests of several nodes.
pub fn encode_rows(rows: &[Vec<RowDigest>]) -> String {
    let mut out = start(TAG_ROWS, rows.len());
    let mut prev = 0u128;
    for list in rows {
        put_varint(&mut out, list.len() as u128);
        for row in list {
            put_shared_hash(&mut out, &mut prev, row.key_hash);
            out.extend_from_slice(&row.row_hash.to_le_bytes());
        }
    }
    STANDARD.encode(out)
}

/// Decodes [`encode_rows`] text.
pub fn decode_rows(text: &str) -> Result<Vec<Vec<RowDigest>>, DigestError> {
    let bytes = decode_base64(text)?;
    let mut r = Reader::new(&bytes, TAG_ROWS)?;
    let lists = r.count(1)?;
    let mut out = Vec::with_capacity(lists);
    let mut prev = 0u128;
    for _ in 0..lists {
        let len = r.count(17)?;
        let mut list = Vec::with_capacity(len);
        for _ in 0..len {
            let key_hash = r.shared_hash(&mut prev)?;
            let row_hash = r.u128_le()?;
            list.push(RowDigest { key_hash, row_hash });
        }
        out.push(list);
    }
    r.end()?;
    Ok(out)
}

/// Encodes key hashes (cheapest when sorted).
pub fn encode_hashes(hashes: &[u128]) -> String {
    let mut out = start(TAG_HASHES, hashes.len());
    let mut prev = 0u128;
    for &hash in hashes {
        put_shared_hash(&mut out, &mut prev, hash);
    }
    STANDARD.encode(out)
}

/// Decodes [`encode_hashes`] text.
pub fn decode_hashes(text: &str) -> Result<Vec<u128>, DigestError> {
    let bytes = decode_base64(text)?;
    let mut r = Reader::new(&bytes, TAG_HASHES)?;
    let count = r.count(1)?;
    let mut out = Vec::with_capacity(count);
    let mut prev = 0u128;
    for _ in 0..count {
        out.push(r.shared_hash(&mut prev)?);
    }
    r.end()?;
    Ok(out)
}

/// Encodes key hashes with their key texts.
pub fn encode_keys(keys: &[(u128, Vec<u8>)]) -> String {
    let mut out = start(TAG_KEYS, keys.len());
    for (hash, text) in keys {
        out.extend_from_slice(&hash.to_le_bytes());
        put_varint(&mut out, text.len() as u128);
        out.extend_from_slice(text);
    }
    STANDARD.encode(out)
}

/// Decodes [`encode_keys`] text.
pub fn decode_keys(text: &str) -> Result<Vec<(u128, Vec<u8>)>, DigestError> {
    let bytes = decode_base64(text)?;
    let mut r = Reader::new(&bytes, TAG_KEYS)?;
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

fn decode_base64(text: &str) -> Result<Vec<u8>, DigestError> {
    STANDARD.decode(text.trim_ascii()).map_err(|e| wire(format!("not base64: {e}")))
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

fn put_digest(out: &mut Vec<u8>, digest: &Digest) {
    let has_sum = digest.sum != 0;
    put_varint(out, (u128::from(digest.rows) << 1) | u128::from(has_sum));
    if has_sum {
        out.extend_from_slice(&digest.sum.to_le_bytes());
    }
}

fn put_shared_hash(out: &mut Vec<u8>, prev: &mut u128, hash: u128) {
    let shared = ((*prev ^ hash).leading_zeros() / 8) as usize;
    out.push(shared as u8);
    out.extend_from_slice(&hash.to_be_bytes()[shared..]);
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

    fn digest(&mut self) -> Result<Digest, DigestError> {
        let v = self.varint()?;
        let rows = u64::try_from(v >> 1).map_err(|_| wire("row count exceeds 64 bits"))?;
        let sum = if v & 1 == 1 {
            let sum = self.u128_le()?;
            if sum == 0 {
                return Err(wire("digest sum marked present but zero"));
            }
            sum
        } else {
            0
        };
        Ok(Digest { rows, sum })
    }

    fn shared_hash(&mut self, prev: &mut u128) -> Result<u128, DigestError> {
        let shared = usize::from(self.u8()?);
        if shared > 16 {
            return Err(wire(format!("key hash shares {shared} bytes (at most 16)")));
        }
        let mut b = prev.to_be_bytes();
        b[shared..].copy_from_slice(self.take(16 - shared)?);
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

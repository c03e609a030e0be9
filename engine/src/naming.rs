//! Names of directories and files inside a snapshot.
//!
//! Layout (PRODUCT.md §3):
//!
//! ```text
//! <snapshot>/data/<table-dir>/<NNNNNN>.copy.zst     compression zstd[:N]
//! <snapshot>/data/<table-dir>/<NNNNNN>.copy         compression none
//! ```
//!
//! `NNNNNN` is the 0-based chunk index, zero-padded to at least 6 digits.
//!
//! `<table-dir>` ([`table_dir`]) is `<schema>.<table>`, each part percent-encoded byte by byte:
//!
//! - bytes `a`–`z`, `0`–`9` and `_` are kept (so ordinary lower-case identifiers read as themselves);
//! - every other byte (upper case, `.`, `-`, `%`, `/`, `\`, space, quotes, each byte of a non-ASCII
//!   character, ...) becomes `%XX` with upper-case hex digits;
//! - an empty part (impossible in PostgreSQL, handled for completeness) is written as a lone `%`.
//!
//! Properties: the unescaped `.` separating the parts can never occur inside a part, so the
//! encoding is exactly reversible ([`parse_table_dir`]) and therefore injective. The result never
//! contains `/`, `\`, NUL or upper-case letters outside `%XX` escapes and is never `.` or `..`, so it
//! is one path component that cannot escape `data/`. Because names keep only lower-case letters and
//! escapes always use upper-case hex, two different names stay different even on a case-insensitive
//! file system (lower-casing is reversible on this alphabet).
//!
//! Long names: when the encoded form would exceed [`MAX_READABLE_DIR_BYTES`] (two 63-byte names of
//! escaped bytes encode to about 380 bytes, beyond the usual 255-byte NAME_MAX) it is cut after at
//! most [`TRUNCATED_PREFIX_BYTES`] bytes, never inside an escape, and `~` plus the first 32 hex
//! digits (128 bits) of SHA-256 of `schema NUL table` is appended. `~` is always escaped in the
//! readable form, so a hashed name never equals a readable one; two hashed names collide only if
//! the 128-bit hashes do, which is unique in practice. Hashed names are not reversible.

use sha2::{Digest, Sha256};

use crate::chunk::Compression;

/// Name of the directory under the snapshot root that holds one directory per table.
pub const DATA_DIR: &str = "data";

/// Longest readable (un-hashed) table directory name, in bytes.
pub const MAX_READABLE_DIR_BYTES: usize = 200;

/// Bytes of readable prefix kept in a hashed (too long) table directory name.
pub const TRUNCATED_PREFIX_BYTES: usize = 160;

/// Hex digits of SHA-256 appended to a hashed table directory name.
const HASH_HEX_DIGITS: usize = 32;

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn is_kept(byte: u8) -> bool {
    byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_'
}

fn encode_part(out: &mut String, part: &str) {
    if part.is_empty() {
        out.push('%');
        return;
    }
    for &byte in part.as_bytes() {
        if is_kept(byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX_UPPER[usize::from(byte >> 4)]));
            out.push(char::from(HEX_UPPER[usize::from(byte & 0x0F)]));
        }
    }
}

/// Directory name (one path component) under `data/` for table `schema.table`.
///
/// Readable, injective and safe for any identifier; see the module documentation for the exact
/// encoding and the hashed form of very long names. The result is at most 255 bytes, contains only
/// `[a-z0-9_.%~A-F]`, and is never `.` or `..`.
pub fn table_dir(schema: &str, table: &str) -> String {
    let mut out = String::with_capacity(schema.len() + table.len() + 1);
    encode_part(&mut out, schema);
    out.push('.');
    encode_part(&mut out, table);
    if out.len() <= MAX_READABLE_DIR_BYTES {
        return out;
    }
    // Cut at TRUNCATED_PREFIX_BYTES, backing off so no `%XX` escape is split.
    let bytes = out.as_bytes();
    let mut cut = TRUNCATED_PREFIX_BYTES;
    if bytes[cut - 1] == b'%' {
        cut -= 1;
    } else if bytes[cut - 2] == b'%' {
        cut -= 2;
    }
    let mut hasher = Sha256::new();
    hasher.update(schema.as_bytes());
    hasher.update([0u8]);
    hasher.update(table.as_bytes());
    let digest = hasher.finalize();
    out.truncate(cut);
    out.push('~');
    for byte in digest.iter().take(HASH_HEX_DIGITS / 2) {
        out.push(char::from(HEX_UPPER[usize::from(byte >> 4)].to_ascii_lowercase()));
        out.push(char::from(HEX_UPPER[usize::from(byte & 0x0F)].to_ascii_lowercase()));
    }
    out
}

fn decode_part(part: &str) -> Option<String> {
    if part == "%" {
        return Some(String::new());
    }
    if part.is_empty() {
        return None;
    }
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if is_kept(byte) {
            out.push(byte);
            i += 1;
        } else if byte == b'%' {
            let high = hex_upper_value(*bytes.get(i + 1)?)?;
            let low = hex_upper_value(*bytes.get(i + 2)?)?;
            let decoded = high * 16 + low;
            // A byte that would have been kept must not appear escaped: one encoding per name.
            if is_kept(decoded) {
                return None;
            }
            out.push(decoded);
            i += 3;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_upper_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Reverses [`table_dir`]: `Some((schema, table))` for a readable directory name, `None` for a
/// hashed (truncated) name or anything [`table_dir`] cannot have produced.
pub fn parse_table_dir(dir: &str) -> Option<(String, String)> {
    let (schema, table) = dir.split_once('.')?;
    let schema = decode_part(schema)?;
    let table = decode_part(table)?;
    (table_dir(&schema, &table) == dir).then_some((schema, table))
}

/// File name of chunk `index` for `compression`: `000042.copy.zst`, or `000042.copy` for `none`.
pub fn chunk_file_name(index: u32, compression: &Compression) -> String {
    format!("{index:06}{}", compression.file_suffix())
}

/// Snapshot-relative path of a chunk file: `data/<table_dir>/<chunk_file_name>`, always with `/`.
pub fn chunk_rel_path(table_dir: &str, index: u32, compression: &Compression) -> String {
    format!("{DATA_DIR}/{table_dir}/{}", chunk_file_name(index, compression))
}

/// Checks that `rel` is a normalised relative path strictly inside `data/`: components separated
/// by single `/`, none empty, `.` or `..`, no backslash, no NUL, not absolute. Returns the rule
/// broken.
pub fn check_rel_path(rel: &str) -> Result<(), &'static str> {
    if rel.is_empty() {
        return Err("empty path");
    }
    if rel.starts_with('/') {
        return Err("absolute path");
    }
    if rel.contains('\\') {
        return Err("contains a backslash");
    }
    if rel.contains('\0') {
        return Err("contains a NUL byte");
    }
    let mut components = rel.split('/');
    if components.next() != Some(DATA_DIR) {
        return Err("not inside data/");
    }
    let mut rest = 0;
    for component in components {
        match component {
            "" => return Err("empty path component (// or trailing /)"),
            "." | ".." => return Err("contains a . or .. component"),
            _ => rest += 1,
        }
    }
    if rest == 0 {
        return Err("names data/ itself, not a file inside it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_and_reversible() {
        let cases = [
            ("public", "orders", "public.orders"),
            ("public", "Orders", "public.%4Frders"),
            ("my schema", "a.b", "my%20schema.a%2Eb"),
            ("s", "../../etc", "s.%2E%2E%2F%2E%2E%2Fetc"),
            ("s", "q\"uote'\\", "s.q%22uote%27%5C"),
            ("s", "grüße", "s.gr%C3%BC%C3%9Fe"),
            ("", "", "%.%"),
            ("a%41", "x~", "a%2541.x%7E"),
        ];
        for (schema, table, expected) in cases {
            assert_eq!(table_dir(schema, table), expected);
            assert_eq!(parse_table_dir(expected), Some((schema.to_string(), table.to_string())));
        }
    }

    #[test]
    fn long_names_are_hashed_and_bounded() {
        let schema = "É".repeat(31); // 62 bytes, each encoded as %XX
        let table = "\"".repeat(63);
        let dir = table_dir(&schema, &table);
        assert!(dir.len() <= MAX_READABLE_DIR_BYTES, "{}", dir.len());
        assert!(dir.contains('~'));
        assert_eq!(parse_table_dir(&dir), None);
        let other = table_dir(&schema, &"\"".repeat(62));
        assert_ne!(dir, other);
        // The readable prefix never ends inside an escape.
        let prefix = dir.split('~').next().unwrap_or_default();
        assert!(!prefix.ends_with('%'));
        assert!(prefix.len() <= TRUNCATED_PREFIX_BYTES);
        // 63-byte plain names fit readable.
        let plain = table_dir(&"s".repeat(63), &"t".repeat(63));
        assert_eq!(plain.len(), 127);
    }

    #[test]
    fn chunk_paths() {
        let zstd = Compression::Zstd { level: 1 };
        assert_eq!(chunk_file_name(7, &zstd), "000007.copy.zst");
        assert_eq!(chunk_file_name(1_234_567, &Compression::None), "1234567.copy");
        assert_eq!(chunk_rel_path("public.t", 0, &zstd), "data/public.t/000000.copy.zst");
        assert_eq!(check_rel_path("data/public.t/000000.copy.zst"), Ok(()));
        for bad in [
            "",
            "/data/x",
            "data\\x",
            "data/../x",
            "data/./x",
            "data//x",
            "data/x/",
            "other/x",
            "data",
            "data/",
        ] {
            assert!(check_rel_path(bad).is_err(), "{bad}");
        }
    }
}

//! PostgreSQL COPY TEXT format: the one place in steep-repl that knows its rules.
//!
//! Format (PostgreSQL documentation, "COPY", section "Text Format"; the server's
//! `CopyAttributeOutText` and `CopyReadAttributesText` in `src/backend/commands/copyto.c` and
//! `copyfromparse.c`):
//!
//! ```text
//! row    = field *( DELIMITER field ) ROW_END        DELIMITER = 0x09 (tab), ROW_END = 0x0A (\n)
//! field  = NULL | escaped-bytes                       NULL = the two bytes `\N`
//! ```
//!
//! On output PostgreSQL escapes exactly these bytes with a backslash:
//!
//! | byte | `\\` (0x5C) | 0x08 | 0x0C | 0x0A | 0x0D | 0x09 | 0x0B |
//! |------|-------------|------|------|------|------|------|------|
//! | out  | `\\`        | `\b` | `\f` | `\n` | `\r` | `\t` | `\v` |
//!
//! Every other byte, other control characters and non-ASCII bytes included, is written unchanged.
//! So a raw tab always separates fields and a raw newline always ends a row: the number of rows of a
//! chunk is the number of `\n` bytes in it ([`count_rows`]). Snapshot chunks carry no header line
//! and no `\.` trailer.
//!
//! On input PostgreSQL additionally accepts `\NNN` (1–3 octal digits), `\xH` / `\xHH` (hex) and
//! `\c` for any other `c` meaning `c` itself; [`unescape_field`] implements all of them.
//!
//! Type output and input depend on session settings; [`PINNED_SETTINGS`] lists the values both
//! generate and apply set, so the text is deterministic and reloads to the same values.

/// The field text that means SQL NULL.
pub const NULL: &[u8] = b"\\N";
/// The byte separating fields of a row.
pub const DELIMITER: u8 = b'\t';
/// The byte ending every row, including the last.
pub const ROW_END: u8 = b'\n';

/// Session settings generate and apply both pin, so that every type's text output is
/// deterministic and its input reads it back to the same value.
///
/// `TimeZone` is not pinned here: generate records the caller's time zone in the manifest's
/// `settings` and apply sets that same value.
///
/// - `DateStyle=ISO`: dates and timestamps as `2024-03-01 12:34:56.123456+00`, independent of locale
///   order (MDY/DMY), which would otherwise make `01/02/2024` ambiguous on input.
/// - `IntervalStyle=postgres`: the only interval style every PostgreSQL reads back exactly.
/// - `bytea_output=hex`: `\x…`, the cheapest lossless bytea form.
/// - `extra_float_digits=3`: shortest exact round-trip float output (PostgreSQL 12+ default, set
///   explicitly because clients such as pg_dump change it).
pub const PINNED_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "3"),
];

/// Name of the session setting generate records in the manifest's `settings` (from the caller's
/// session) and apply sets to the recorded value; not part of [`PINNED_SETTINGS`].
pub const TIME_ZONE_SETTING: &str = "TimeZone";

/// For each byte, the letter that follows the backslash when it is escaped, or 0 when the byte is
/// written unchanged.
const ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    table[b'\\' as usize] = b'\\';
    table[0x08] = b'b';
    table[0x0C] = b'f';
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[0x0B] = b'v';
    table
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// True when some byte of the little-endian word `w` may need escaping: a byte below 0x10 or a
/// backslash. Exact "has byte less than n" / "has byte equal to n" bit tricks (Sean Anderson,
/// "Bit Twiddling Hacks"); false positives (0x00–0x07, 0x0E, 0x0F) are sorted out per byte.
#[inline(always)]
fn word_may_need_escape(w: u64) -> bool {
    let below_0x10 = w.wrapping_sub(ONES * 0x10) & !w & HIGHS;
    let x = w ^ (ONES * u64::from(b'\\'));
    let backslash = x.wrapping_sub(ONES) & !x & HIGHS;
    (below_0x10 | backslash) != 0
}

/// Appends `value` to `out` escaped as one COPY TEXT field (not NULL; write [`NULL`] for that).
///
/// Produces byte for byte what PostgreSQL's `COPY ... TO` prints for a value whose type output is
/// `value`. Runs of bytes that need no escaping are copied in bulk; the scan looks at 8 bytes per
/// step.
pub fn escape_into(out: &mut Vec<u8>, value: &[u8]) {
    out.reserve(value.len());
    let len = value.len();
    let mut run_start = 0;
    let mut i = 0;
    while i < len {
        // Fast path: skip whole words that contain nothing to escape.
        while let Some(word) = value.get(i..i + 8) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            if word_may_need_escape(u64::from_le_bytes(bytes)) {
                break;
            }
            i += 8;
        }
        // Slow path: up to 8 bytes one by one.
        let end = len.min(i + 8);
        while i < end {
            let escaped = ESCAPE[usize::from(value[i])];
            if escaped != 0 {
                out.extend_from_slice(&value[run_start..i]);
                out.extend_from_slice(&[b'\\', escaped]);
                run_start = i + 1;
            }
            i += 1;
        }
    }
    out.extend_from_slice(&value[run_start..]);
}

/// Appends one whole row: each field escaped ([`None`] as [`NULL`]), separated by [`DELIMITER`],
/// ended by [`ROW_END`].
pub fn write_row(out: &mut Vec<u8>, fields: &[Option<&[u8]>]) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(DELIMITER);
        }
        match field {
            Some(value) => escape_into(out, value),
            None => out.extend_from_slice(NULL),
        }
    }
    out.push(ROW_END);
}

/// Number of rows in COPY TEXT `raw`: the number of [`ROW_END`] bytes (embedded newlines are always
/// escaped, so each row ends with exactly one raw newline).
///
/// Uses `memchr`'s vectorised byte count (runtime-selected AVX2/SSE2 on x86-64), about 35 GB/s on
/// one core, independent of how dense the newlines are.
pub fn count_rows(raw: &[u8]) -> u64 {
    memchr::memchr_iter(ROW_END, raw).count() as u64
}

/// Splits COPY TEXT into rows, each without its [`ROW_END`]. Bytes after the last newline (an
/// incomplete row) are yielded as a final row.
pub fn split_rows(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = raw.strip_suffix(&[ROW_END]).unwrap_or(raw);
    let empty = raw.is_empty();
    body.split(|&b| b == ROW_END).filter(move |_| !empty)
}

/// Splits one row (without its newline) into its still-escaped fields.
pub fn split_fields(row: &[u8]) -> impl Iterator<Item = &[u8]> {
    row.split(|&b| b == DELIMITER)
}

/// Decodes one escaped field: `None` for [`NULL`], otherwise the value's bytes, following
/// PostgreSQL's input rules (`\b \f \n \r \t \v`, `\NNN` octal, `\xHH` hex, `\c` for `c`).
pub fn unescape_field(field: &[u8]) -> Option<Vec<u8>> {
    if field == NULL {
        return None;
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let byte = field[i];
        i += 1;
        if byte != b'\\' {
            out.push(byte);
            continue;
        }
        let Some(&next) = field.get(i) else {
            // A trailing lone backslash: keep it, as there is nothing it could escape.
            out.push(b'\\');
            break;
        };
        i += 1;
        match next {
            b'0'..=b'7' => {
                let mut value = u32::from(next - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                // PostgreSQL keeps the low 8 bits (`\777` is 0xFF).
                out.push((value & 0xFF) as u8);
            }
            b'x' => match field.get(i).and_then(|&d| hex_value(d)) {
                Some(high) => {
                    i += 1;
                    let mut value = high;
                    if let Some(low) = field.get(i).and_then(|&d| hex_value(d)) {
                        value = value * 16 + low;
                        i += 1;
                    }
                    out.push(value);
                }
                None => out.push(b'x'),
            },
            b'b' => out.push(0x08),
            b'f' => out.push(0x0C),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0B),
            other => out.push(other),
        }
    }
    Some(out)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Reads rows `[start, start + count)` of the COPY TEXT that `inner` yields: skips the first `start`
/// rows, then passes bytes through unchanged until `count` rows have ended, or to the end of `inner`
/// when `count` is `None` (so that a checking reader underneath still sees its end).
///
/// Rows are counted by [`ROW_END`] bytes, which is exact for COPY TEXT. If `inner` ends early the
/// reader ends too; the caller notices through its row count.
pub struct RowRange<R> {
    inner: R,
    skip: u64,
    left: Option<u64>,
    /// Bytes read past the skipped rows while skipping, not yet handed out.
    held: Vec<u8>,
    held_pos: usize,
}

/// Size of the reads that skip rows.
const SKIP_READ: usize = 256 * 1024;

impl<R: std::io::Read> RowRange<R> {
    /// Reads rows `[start, start + count)` of `inner` (all rows from `start` on when `count` is `None`).
    pub fn new(inner: R, start: u64, count: Option<u64>) -> Self {
        RowRange { inner, skip: start, left: count, held: Vec::new(), held_pos: 0 }
    }

    /// The reader underneath.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The reader underneath, mutably (to run its end-of-file checks after a range that stops
    /// before the end).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    fn skip_rows(&mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; SKIP_READ];
        while self.skip > 0 {
            let n = self.inner.read(&mut buf)?;
            if n == 0 {
                self.skip = 0;
                self.left = Some(0);
                return Ok(());
            }
            let mut ends = memchr::memchr_iter(ROW_END, &buf[..n]);
            let before = self.skip;
            match ends.nth(usize::try_from(before - 1).unwrap_or(usize::MAX)) {
                Some(at) => {
                    self.skip = 0;
                    buf.truncate(n);
                    buf.drain(..=at);
                    self.held = buf;
                    self.held_pos = 0;
                    return Ok(());
                }
                None => self.skip -= count_rows(&buf[..n]),
            }
        }
        Ok(())
    }

    /// Keeps at most the bytes of `out[..n]` up to the end of the `left`-th row, counting it down.
    fn limit(&mut self, out: &[u8], n: usize) -> usize {
        let Some(left) = self.left else { return n };
        let mut ends = memchr::memchr_iter(ROW_END, &out[..n]);
        match ends.nth(usize::try_from(left.saturating_sub(1)).unwrap_or(usize::MAX)) {
            Some(at) if left > 0 => {
                self.left = Some(0);
                at + 1
            }
            _ => {
                self.left = Some(left - count_rows(&out[..n]));
                n
            }
        }
    }
}

impl<R: std::io::Read> std::io::Read for RowRange<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.skip > 0 {
            self.skip_rows()?;
        }
        if self.left == Some(0) || out.is_empty() {
            return Ok(0);
        }
        if self.held_pos < self.held.len() {
            let n = out.len().min(self.held.len() - self.held_pos);
            out[..n].copy_from_slice(&self.held[self.held_pos..self.held_pos + n]);
            self.held_pos += n;
            return Ok(self.limit(out, n));
        }
        let n = self.inner.read(out)?;
        Ok(self.limit(out, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escape(value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        escape_into(&mut out, value);
        out
    }

    /// Reference implementation: PostgreSQL's CopyAttributeOutText, byte by byte.
    fn escape_reference(value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in value {
            match b {
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0C => out.extend_from_slice(b"\\f"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x0B => out.extend_from_slice(b"\\v"),
                other => out.push(other),
            }
        }
        out
    }

    #[test]
    fn matches_postgresql_output() {
        // `COPY (SELECT E'...') TO STDOUT` on PostgreSQL 16, server encoding UTF8.
        let cases: &[(&[u8], &[u8])] = &[
            (b"plain text", b"plain text"),
            (b"a\tb", b"a\\tb"),
            (b"line1\nline2", b"line1\\nline2"),
            (b"cr\r\nlf", b"cr\\r\\nlf"),
            (b"back\\slash", b"back\\\\slash"),
            (b"\\N", b"\\\\N"),
            (b"\x08\x0c\x0b", b"\\b\\f\\v"),
            // Other control characters are not escaped.
            (b"\x01\x07\x1b\x7f", b"\x01\x07\x1b\x7f"),
            ("grüße 東京 🐘".as_bytes(), "grüße 東京 🐘".as_bytes()),
            // bytea in hex output: the backslash of \x is doubled.
            (b"\\x00ff", b"\\\\x00ff"),
            (b"{\"k\": \"v\\n\"}", b"{\"k\": \"v\\\\n\"}"),
            (b"", b""),
        ];
        for (value, expected) in cases {
            assert_eq!(escape(value), expected.to_vec(), "escaping {:?}", String::from_utf8_lossy(value));
            assert_eq!(unescape_field(expected).as_deref(), Some(*value));
        }
    }

    #[test]
    fn fast_path_agrees_with_reference_at_every_alignment() {
        let specials = [b'\\', 0x08, 0x0C, b'\n', b'\r', b'\t', 0x0B, 0x00, 0x0E, 0x0F, 0x10, b'a'];
        for len in 0..40 {
            for pos in 0..len {
                for &special in &specials {
                    let mut value = vec![b'x'; len];
                    value[pos] = special;
                    assert_eq!(escape(&value), escape_reference(&value), "len {len} pos {pos}");
                }
            }
        }
        let all: Vec<u8> = (0..=255u8).cycle().take(2048).collect();
        assert_eq!(escape(&all), escape_reference(&all));
        assert_eq!(unescape_field(&escape(&all)), Some(all));
    }

    #[test]
    fn rows_fields_and_null() {
        let mut out = Vec::new();
        write_row(&mut out, &[Some(b"1"), None, Some(b"a\tb")]);
        write_row(&mut out, &[Some(b"")]);
        assert_eq!(out, b"1\t\\N\ta\\tb\n\n");
        assert_eq!(count_rows(&out), 2);
        let rows: Vec<&[u8]> = split_rows(&out).collect();
        assert_eq!(rows, vec![&b"1\t\\N\ta\\tb"[..], &b""[..]]);
        let fields: Vec<Option<Vec<u8>>> = split_fields(rows[0]).map(unescape_field).collect();
        assert_eq!(fields, vec![Some(b"1".to_vec()), None, Some(b"a\tb".to_vec())]);
        assert_eq!(split_rows(b"").count(), 0);
        assert_eq!(count_rows(b""), 0);
    }

    #[test]
    fn unescape_accepts_postgresql_input_forms() {
        assert_eq!(unescape_field(b"\\101\\x41\\x4a\\q\\7"), Some(b"AAJq\x07".to_vec()));
        assert_eq!(unescape_field(b"\\xg"), Some(b"xg".to_vec()));
        assert_eq!(unescape_field(b"end\\"), Some(b"end\\".to_vec()));
        assert_eq!(unescape_field(b"\\\\N"), Some(b"\\N".to_vec()));
    }

    #[test]
    fn count_rows_matches_naive_count() {
        let raw = vec![b'\n'; 8 * 255 * 3 + 5];
        assert_eq!(count_rows(&raw), raw.len() as u64);
        let mixed: Vec<u8> = (0..100_000u32)
            .map(|i| match i % 7 {
                0 => b'\n',
                1 => 0x8A,
                2 => 0x0B,
                3 => 0x09,
                _ => (i % 251) as u8,
            })
            .collect();
        for len in [0, 1, 7, 8, 9, 2039, 2040, 2041, 4096, mixed.len()] {
            let naive = mixed[..len].iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(count_rows(&mixed[..len]), naive, "len {len}");
        }
    }

    /// A reader that hands out at most `step` bytes per call, to cross every boundary.
    struct Dribble<'a>(&'a [u8], usize);

    impl std::io::Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn read_range(text: &[u8], step: usize, start: u64, count: Option<u64>, out_step: usize) -> Vec<u8> {
        let mut r = RowRange::new(Dribble(text, step), start, count);
        let mut got = Vec::new();
        let mut buf = vec![0u8; out_step];
        loop {
            let n = std::io::Read::read(&mut r, &mut buf).unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn row_range_skips_and_stops_at_row_ends() {
        let text = b"a\tb\t1\nrow1\tx\n\n\\N\tlast\n";
        assert_eq!(read_range(text, 3, 0, None, 5), text.to_vec());
        assert_eq!(read_range(text, 3, 1, Some(1), 5), b"row1\tx\n".to_vec());
        assert_eq!(read_range(text, 100, 2, Some(1), 100), b"\n".to_vec());
        assert_eq!(read_range(text, 1, 3, None, 1), b"\\N\tlast\n".to_vec());
        assert_eq!(read_range(text, 7, 4, None, 7), Vec::<u8>::new());
        assert_eq!(read_range(text, 7, 9, Some(2), 7), Vec::<u8>::new());
        assert_eq!(read_range(text, 7, 0, Some(0), 7), Vec::<u8>::new());
    }

    proptest::proptest! {
        #[test]
        fn row_range_is_the_slice_of_rows(
            rows in proptest::collection::vec(proptest::collection::vec(0u8..=255, 0..40), 0..60),
            start in 0u64..70,
            count in proptest::option::of(0u64..70),
            step in 1usize..300,
            out_step in 1usize..300,
        ) {
            let rows: Vec<Vec<u8>> = rows
                .into_iter()
                .map(|r| { let mut r: Vec<u8> = r.into_iter().filter(|&b| b != ROW_END).collect(); r.push(ROW_END); r })
                .collect();
            let text = rows.concat();
            let from = (start as usize).min(rows.len());
            let to = count.map_or(rows.len(), |c| (from + c as usize).min(rows.len()));
            let want = rows[from..to].concat();
            proptest::prop_assert_eq!(read_range(&text, step, start, count, out_step), want);
        }
    }
}

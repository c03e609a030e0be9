//! Tests of the digest module: hashing, files, queries against brute force, wire, comparison.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;
use crate::copy_text;

type Row = Vec<Option<Vec<u8>>>;

fn line_of(row: &Row) -> Vec<u8> {
    let fields: Vec<Option<&[u8]>> = row.iter().map(|f| f.as_deref()).collect();
    let mut out = Vec::new();
    copy_text::write_row(&mut out, &fields);
    out.pop();
    out
}

fn copy_of(rows: &[Row]) -> Vec<u8> {
    let mut out = Vec::new();
    for row in rows {
        out.extend_from_slice(&line_of(row));
        out.push(b'\n');
    }
    out
}

fn key0() -> KeyFields {
    KeyFields::new(vec![0]).expect("valid key")
}

fn row(id: u64, a: Option<&str>, b: Option<&str>) -> Row {
    vec![
        Some(id.to_string().into_bytes()),
        a.map(|s| s.as_bytes().to_vec()),
        b.map(|s| s.as_bytes().to_vec()),
    ]
}

/// Writes `rows` as `files` digest files (contiguous slices), feeding each in `piece`-byte writes.
fn write_files(dir: &Path, name: &str, rows: &[Row], files: usize, piece: usize) -> Vec<PathBuf> {
    let per = rows.len().div_ceil(files.max(1)).max(1);
    let mut paths = Vec::new();
    let mut slices: Vec<&[Row]> = rows.chunks(per).collect();
    while slices.len() < files {
        slices.push(&[]);
    }
    for (i, slice) in slices.into_iter().enumerate() {
        let rel = PathBuf::from(format!("{name}/{i}.digest"));
        let mut w = DigestWriter::create(dir, &rel, key0()).expect("create");
        for part in copy_of(slice).chunks(piece.max(1)) {
            w.write_all(part).expect("write");
        }
        w.finish().expect("finish");
        paths.push(dir.join(rel));
    }
    paths
}

fn table(dir: &Path, name: &str, rows: &[Row], files: usize) -> TableDigests {
    TableDigests::open(&write_files(dir, name, rows, files, 7)).expect("open")
}

fn brute(rows: &[Row]) -> Vec<(RowDigest, Vec<u8>)> {
    let mut key_text = Vec::new();
    rows.iter()
        .map(|r| {
            let d = digest_line(&line_of(r), &key0(), &mut key_text).expect("digest");
            (d, key_text.clone())
        })
        .collect()
}

fn field() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        6 => proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'\t'), Just(b'\n'), Just(b'\\'), Just(b'N')], 0..4)
            .prop_map(Some),
    ]
}

// ---- hashing and lines ----

#[test]
fn key_text_joins_key_fields_in_key_order() {
    let line = b"1\tAnn\\tLee\tx";
    let mut text = Vec::new();
    digest_line(line, &KeyFields::new(vec![1, 0]).expect("key"), &mut text).expect("digest");
    assert_eq!(text, b"Ann\\tLee\t1");
    let d = digest_line(line, &KeyFields::new(vec![0, 2]).expect("key"), &mut text).expect("digest");
    assert_eq!(text, b"1\tx");
    assert_eq!(d.key_hash, key_hash(b"1\tx"));
    assert_eq!(d.row_hash, row_hash(line));
    assert_ne!(key_hash(b"1\tx"), row_hash(b"1\tx"), "domains are separated");
}

#[test]
fn equal_numbers_have_one_key_text() {
    let number = |field: &str| {
        let key = KeyFields::with_texts(vec![0, 1], vec![KeyText::Number]).expect("key");
        let mut text = Vec::new();
        digest_line(format!("{field}\t2.50\tv").as_bytes(), &key, &mut text).expect("digest");
        String::from_utf8(text).expect("utf8")
    };
    // The second key field is taken as printed (its form was not given).
    for (printed, key) in [
        ("1.50", "1.5\t2.50"),
        ("1.5", "1.5\t2.50"),
        ("100.000", "100\t2.50"),
        ("100", "100\t2.50"),
        ("-0", "0\t2.50"),
        ("-0.000", "0\t2.50"),
        ("0.0", "0\t2.50"),
        ("1.50e+20", "1.50e+20\t2.50"),
        ("NaN", "NaN\t2.50"),
        ("-Infinity", "-Infinity\t2.50"),
        ("\\N", "\\N\t2.50"),
    ] {
        assert_eq!(number(printed), key, "{printed}");
    }
    // Key fields out of line order take the same path.
    let key = KeyFields::with_texts(vec![1, 0], vec![KeyText::Number, KeyText::Exact]).expect("key");
    let mut text = Vec::new();
    digest_line(b"7.0\t8.0", &key, &mut text).expect("digest");
    assert_eq!(text, b"8\t7.0");
    assert_eq!(KeyText::of_type("numeric"), Some(KeyText::Number));
    assert_eq!(KeyText::of_type("double precision"), Some(KeyText::Number));
    assert_eq!(KeyText::of_type("numeric(10,2)"), Some(KeyText::Exact));
    assert_eq!(KeyText::of_type("text"), Some(KeyText::Exact));
    assert_eq!(KeyText::of_type("integer[]"), Some(KeyText::Exact));
    for unusable in [
        "interval",
        "interval day to second",
        "interval(3)",
        "citext",
        "jsonb",
        "numeric[]",
        "real[]",
        "citext[]",
    ] {
        assert_eq!(KeyText::of_type(unusable), None, "{unusable}");
    }
}

#[test]
fn short_line_is_an_error() {
    let mut text = Vec::new();
    let err = digest_line(b"1\tx", &KeyFields::new(vec![2]).expect("key"), &mut text);
    assert!(matches!(err, Err(DigestError::Line { .. })), "{err:?}");
    let err = digest_line(b"1\tx", &KeyFields::new(vec![3, 0]).expect("key"), &mut text);
    assert!(matches!(err, Err(DigestError::Line { .. })), "{err:?}");
}

#[test]
fn null_and_empty_differ() {
    let mut text = Vec::new();
    let key = KeyFields::new(vec![1]).expect("key");
    let null = digest_line(b"1\t\\N", &key, &mut text).expect("digest");
    let empty = digest_line(b"1\t", &key, &mut text).expect("digest");
    assert_ne!(null.key_hash, empty.key_hash);
    assert_ne!(null.row_hash, empty.row_hash);
}

#[test]
fn key_fields_are_checked() {
    assert!(KeyFields::new(vec![]).is_err());
    assert!(KeyFields::new(vec![1, 0, 1]).is_err());
    assert_eq!(KeyFields::new(vec![2, 0]).expect("key").positions(), &[2, 0]);
}

#[test]
fn nodes_partition_the_hash_space() {
    assert_eq!(Node::ROOT.bounds(), (0, u128::MAX));
    let leaf = Node { depth: MAX_DEPTH, index: 12345 };
    assert_eq!(leaf.bounds(), (12345, 12345));
    assert_eq!(leaf.children(), [leaf; FANOUT]);
    assert_eq!(leaf.child_of(12345), 0);
    let kids = Node::ROOT.children();
    assert_eq!(kids[0].bounds().0, 0);
    assert_eq!(kids[15].bounds().1, u128::MAX);
    for w in kids.windows(2) {
        assert_eq!(w[0].bounds().1 + 1, w[1].bounds().0);
    }
    assert!(!Node { depth: 1, index: 16 }.is_valid());
    assert!(!Node { depth: 33, index: 0 }.is_valid());
}

proptest! {
    #[test]
    fn node_methods_agree(hash in any::<u128>(), depth in 0u8..MAX_DEPTH) {
        let node = Node { depth, index: if depth == 0 { 0 } else { hash >> (128 - 4 * u32::from(depth)) } };
        prop_assert!(node.is_valid());
        prop_assert!(node.contains(hash));
        let (lo, hi) = node.bounds();
        prop_assert!(lo <= hash && hash <= hi);
        let child = node.children()[node.child_of(hash)];
        prop_assert!(child.contains(hash));
        prop_assert_eq!(child.bounds().0 >= lo && child.bounds().1 <= hi, true);
    }
}

// ---- writer ----

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn writes_split_anywhere_give_the_same_file(
        rows in proptest::collection::vec((0u64..50, field(), field()), 0..30),
        piece in 1usize..40,
    ) {
        let rows: Vec<Row> = rows.into_iter().map(|(k, a, b)| vec![Some(k.to_string().into_bytes()), a, b]).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let text = copy_of(&rows);
        let mut whole = DigestWriter::create(dir.path(), Path::new("a/whole"), key0()).expect("create");
        whole.write_all(&text).expect("write");
        let stats = whole.finish().expect("finish");
        let split = write_files(dir.path(), "b", &rows, 1, piece);
        let a = std::fs::read(dir.path().join("a/whole")).expect("read");
        let b = std::fs::read(&split[0]).expect("read");
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(stats.rows, rows.len() as u64);
        prop_assert_eq!(stats.raw_bytes, text.len() as u64);
        prop_assert_eq!(stats.file_bytes, a.len() as u64);
        prop_assert_eq!(stats.file_crc32, crc32fast::hash(&a));
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn final_name_appears_only_at_finish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = DigestWriter::create(dir.path(), Path::new("t/0.digest"), key0()).expect("create");
    w.write_all(b"1\ta\n2\tb\n").expect("write");
    assert!(!dir.path().join("t/0.digest").exists());
    let stats = w.finish().expect("finish");
    assert_eq!((stats.rows, stats.raw_bytes), (2, 8));
    assert_eq!(names_in(&dir.path().join("t")), vec!["0.digest".to_string()]);

    // Dropped before finish: nothing left.
    let mut w = DigestWriter::create(dir.path(), Path::new("u/0.digest"), key0()).expect("create");
    w.write_all(b"1\ta\n").expect("write");
    drop(w);
    assert!(names_in(&dir.path().join("u")).is_empty());
}

#[test]
fn truncated_last_line_and_bad_lines_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = DigestWriter::create(dir.path(), Path::new("0.digest"), key0()).expect("create");
    w.write_all(b"1\ta\n2\tb").expect("write");
    assert!(matches!(w.finish(), Err(DigestError::Line { .. })));
    assert!(names_in(dir.path()).is_empty());

    let key = KeyFields::new(vec![2]).expect("key");
    let mut w = DigestWriter::create(dir.path(), Path::new("1.digest"), key).expect("create");
    assert!(w.write_all(b"1\ta\tb\n2\tb\n").is_err());
    assert!(matches!(w.finish(), Err(DigestError::Line { .. })));
    assert!(names_in(dir.path()).is_empty());

    for bad in ["../x", "/abs", "", "a/../b"] {
        assert!(DigestWriter::create(dir.path(), Path::new(bad), key0()).is_err(), "{bad}");
    }
}

// ---- reading hostile files ----

const HEADER: usize = 64;

/// Recomputes both CRCs of a digest file image, so only the other checks can catch a change.
fn reseal(bytes: &mut [u8]) {
    let body = crc32fast::hash(&bytes[HEADER..]);
    bytes[56..60].copy_from_slice(&body.to_le_bytes());
    let head = crc32fast::hash(&bytes[0..60]);
    bytes[60..64].copy_from_slice(&head.to_le_bytes());
}

fn sample_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    let rows: Vec<Row> = (0..40).map(|i| row(i, Some("x"), None)).collect();
    let path = write_files(dir, "s", &rows, 1, 1000).remove(0);
    let bytes = std::fs::read(&path).expect("read");
    (path, bytes)
}

fn assert_format_error(path: &Path, bytes: &[u8], what: &str) {
    std::fs::write(path, bytes).expect("write");
    match TableDigests::open(&[path.to_path_buf()]) {
        Err(DigestError::Format { path: p, reason }) => {
            assert_eq!(p, path, "{what}");
            assert!(!reason.is_empty());
        }
        other => panic!("{what}: expected a format error, got {other:?}"),
    }
}

#[test]
fn open_rejects_damaged_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, good) = sample_file(dir.path());
    assert_eq!(TableDigests::open(std::slice::from_ref(&path)).expect("open").total().rows, 40);

    assert_format_error(&path, &good[..good.len() - 1], "truncated");
    assert_format_error(&path, &good[..10], "shorter than a header");
    assert_format_error(&path, b"", "empty");
    assert_format_error(&path, b"id\tname\n1\tAnn\n", "not a digest file");

    let mut flipped = good.clone();
    flipped[HEADER + 100] ^= 0x20;
    assert_format_error(&path, &flipped, "flipped body byte");
    let mut flipped = good.clone();
    flipped[20] ^= 1;
    assert_format_error(&path, &flipped, "flipped header byte");

    let mut huge = good.clone();
    huge[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    reseal(&mut huge);
    assert_format_error(&path, &huge, "huge record count");

    let mut unsorted = good.clone();
    let (a, b) = (HEADER, HEADER + 44);
    let first: Vec<u8> = unsorted[a..a + 32].to_vec();
    let second: Vec<u8> = unsorted[b..b + 32].to_vec();
    unsorted[a..a + 32].copy_from_slice(&second);
    unsorted[b..b + 32].copy_from_slice(&first);
    reseal(&mut unsorted);
    assert_format_error(&path, &unsorted, "unsorted records");

    let mut bad_key = good.clone();
    bad_key[HEADER + 40] = 0xFF; // key_len of record 0
    reseal(&mut bad_key);
    assert_format_error(&path, &bad_key, "key range past the key text");
}

#[test]
fn missing_file_is_an_io_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = TableDigests::open(&[dir.path().join("nope")]);
    assert!(matches!(err, Err(DigestError::Io { .. })), "{err:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300),
                                edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
                                cut in any::<usize>()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, &bytes).expect("write");
        prop_assert!(TableDigests::open(std::slice::from_ref(&path)).is_err());

        // A valid file, edited and resealed or cut: never a panic, and when it opens its
        // queries do not panic either.
        let (path, mut good) = sample_file(dir.path());
        for (at, value) in edits {
            let len = good.len();
            good[at % len] = value;
        }
        reseal(&mut good);
        good.truncate(cut % (good.len() + 1));
        std::fs::write(&path, &good).expect("write");
        if let Ok(t) = TableDigests::open(std::slice::from_ref(&path)) {
            let nodes = Node::ROOT.children();
            let _children = t.children(&nodes);
            let _rows = t.rows(&nodes);
            let _keys = t.keys(&[0, u128::MAX], Width::Narrow);
        }
    }
}

#[test]
fn file_changed_after_open_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: Vec<Row> = (0..300).map(|i| row(i, Some("x"), None)).collect();
    let path = write_files(dir.path(), "c", &rows, 1, 4096).remove(0);
    let mut t = TableDigests::open(std::slice::from_ref(&path)).expect("open");
    // Rewrite in place (same inode): every record's key hash changed.
    let mut bytes = std::fs::read(&path).expect("read");
    for b in &mut bytes[HEADER..HEADER + 300 * 44] {
        *b = b.wrapping_add(1);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(&bytes[..HEADER + 100 * 44]))
        .expect("rewrite");
    // Rows are always read from the file (children of the top nodes come from the summary taken at
    // open).
    let answer = Side::rows(&mut t, &[Node::ROOT], Width::Narrow);
    assert!(matches!(answer, Err(DigestError::Format { .. })), "{answer:?}");
}

#[test]
fn summary_answers_agree_with_the_files() {
    // 5 000 rows keep a summary of depth 2 (256 nodes of about 20 rows): the children of the nodes
    // at depths 0 and 1 and the sums of nodes down to depth 2 come from it, deeper ones from the
    // files; both must agree with brute force.
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: Vec<Row> = (0..5000).map(|i| row(i, Some("v"), (i % 3 == 0).then_some("w"))).collect();
    let t = table(dir.path(), "s", &rows, 3);
    let all = brute(&rows);
    let mut nodes = vec![Node::ROOT];
    for depth in 1..=3u8 {
        let last = nodes.clone();
        nodes.extend(last.iter().filter(|n| n.depth == depth - 1).flat_map(|n| n.children()));
    }
    let children = t.children(&nodes);
    for (k, node) in nodes.iter().enumerate() {
        let mut want = [Digest::default(); FANOUT];
        let mut sum = Digest::default();
        for (d, _) in all.iter().filter(|(d, _)| node.contains(d.key_hash)) {
            want[node.child_of(d.key_hash)].add_row(d.row_hash);
            sum.add_row(d.row_hash);
        }
        assert_eq!(children[k], want, "children of {node:?}");
        assert_eq!(t.sums(&[*node]), sum, "sum of {node:?}");
    }
    // Disjoint nodes (as `sums` asks): depth-3 nodes outside root children 9 and 10, and those two.
    let deep = nodes.iter().copied().filter(|n| n.depth == 3 && !(9..=10).contains(&(n.index >> 8)));
    let mixed: Vec<Node> = deep.step_by(7).chain(Node::ROOT.children().into_iter().skip(9).take(2)).collect();
    let mut want = Digest::default();
    for (d, _) in all.iter().filter(|(d, _)| mixed.iter().any(|n| n.contains(d.key_hash))) {
        want.add_row(d.row_hash);
    }
    assert_eq!(t.sums(&mixed), want);
    // An invalid node is never indexed out of the summary (its answer is meaningless, as for
    // the files).
    let invalid = [Node { depth: 1, index: 1 << 40 }, Node { depth: 2, index: u128::MAX }];
    assert_eq!(t.children(&invalid).len(), 2);
    let _ = t.sums(&invalid);
    assert!(t.fault().is_none());
}

// ---- queries against brute force ----

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn queries_match_brute_force(
        rows in proptest::collection::vec((0u64..400, field()), 0..400),
        files in 0usize..5,
        probes in proptest::collection::vec(any::<u128>(), 1..20),
    ) {
        let rows: Vec<Row> = rows.into_iter().map(|(k, a)| vec![Some(k.to_string().into_bytes()), a]).collect();
        let files = if rows.is_empty() { files } else { files.max(1) };
        let dir = tempfile::tempdir().expect("tempdir");
        let t = table(dir.path(), "q", &rows, files);
        let all = brute(&rows);

        let mut total = Digest::default();
        for (d, _) in &all {
            total.add_row(d.row_hash);
        }
        prop_assert_eq!(t.total(), total);

        let mut nodes = vec![Node::ROOT];
        nodes.extend(Node::ROOT.children());
        for (i, (d, _)) in all.iter().enumerate().take(10) {
            let depth = [2u8, 3, 5, 31, MAX_DEPTH][i % 5];
            nodes.push(Node { depth, index: d.key_hash >> (128 - 4 * u32::from(depth)) });
        }
        for &p in &probes {
            nodes.push(Node { depth: 2, index: p >> 120 });
        }
        let children = t.children(&nodes);
        let node_rows = t.rows(&nodes);
        for (k, node) in nodes.iter().enumerate() {
            let mut want_children = [Digest::default(); FANOUT];
            let mut want_rows = Vec::new();
            for (d, _) in all.iter().filter(|(d, _)| node.contains(d.key_hash)) {
                want_children[node.child_of(d.key_hash)].add_row(d.row_hash);
                want_rows.push(*d);
            }
            want_rows.sort_unstable();
            prop_assert_eq!(children[k], want_children);
            prop_assert_eq!(&node_rows[k], &want_rows);
        }

        let mut asked: Vec<u128> = all.iter().take(30).map(|(d, _)| d.key_hash).collect();
        asked.extend(&probes);
        asked.extend(asked.clone()); // duplicates in the question
        let mut got = t.keys(&asked, Width::Full);
        got.sort();
        let mut want: Vec<(u128, Vec<u8>)> = all.iter().take(30).map(|(d, k)| (d.key_hash, k.clone())).collect();
        want.sort();
        want.dedup();
        prop_assert_eq!(&got, &want);
        // Narrowed hashes find the same keys (no two of these few keys share their top 64 bits).
        let narrow: Vec<u128> = asked.iter().map(|&h| Width::Narrow.key(h)).collect();
        let mut got = t.keys(&narrow, Width::Narrow);
        got.sort();
        prop_assert_eq!(&got, &want);
        let sum = t.sums(&Node::ROOT.children());
        prop_assert_eq!(sum, total);
        prop_assert!(t.fault().is_none());
    }
}

// ---- wire ----

fn some_digests() -> Vec<[Digest; FANOUT]> {
    let mut node = [Digest::default(); FANOUT];
    node[1] = Digest { rows: 3, sum: 77 };
    node[15] = Digest { rows: u64::MAX, sum: u128::MAX };
    node[7] = Digest { rows: 0, sum: 5 };
    vec![node, [Digest::default(); FANOUT]]
}

proptest! {
    #[test]
    fn wire_round_trips(
        hashes in proptest::collection::vec(any::<u128>(), 0..40),
        depths in proptest::collection::vec(0u8..=MAX_DEPTH, 0..40),
        splits in proptest::collection::vec(0usize..5, 0..8),
        texts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..10),
        rows in any::<u64>(), sum in any::<u128>(),
    ) {
        let nodes: Vec<Node> = depths.iter().zip(hashes.iter().chain(std::iter::repeat(&7)))
            .map(|(&depth, &h)| Node { depth, index: if depth == 0 { 0 } else { h >> (128 - 4 * u32::from(depth)) } })
            .collect();
        prop_assert_eq!(wire::decode_nodes(&wire::encode_nodes(&nodes)).expect("nodes"), nodes.clone());
        let text = wire::to_text(&wire::encode_nodes(&nodes));
        prop_assert_eq!(wire::decode_nodes(&wire::from_text(&text).expect("base64")).expect("nodes"), nodes);
        let d = Digest { rows, sum };
        prop_assert_eq!(wire::decode_digest(&wire::encode_digest(&d)).expect("digest"), d);
        let keys: Vec<(u128, Vec<u8>)> = hashes.iter().copied().zip(texts).collect();
        prop_assert_eq!(wire::decode_keys(&wire::encode_keys(&keys)).expect("keys"), keys);

        for width in [Width::Full, Width::Narrow] {
            let narrowed: Vec<u128> = hashes.iter().map(|&h| width.key(h)).collect();
            prop_assert_eq!(wire::decode_hashes(&wire::encode_hashes(&hashes, width), width).expect("hashes"), narrowed);
            let mut lists = Vec::new();
            let mut it = hashes.iter();
            for &n in &splits {
                let list: Vec<RowDigest> = it.by_ref().take(n).map(|&h| RowDigest { key_hash: h, row_hash: !h }).collect();
                lists.push(list);
            }
            let want: Vec<Vec<RowDigest>> = lists.iter().map(|l| l.iter().map(|r| width.row(*r)).collect()).collect();
            prop_assert_eq!(wire::decode_rows(&wire::encode_rows(&lists, width), width).expect("rows"), want);
            let children = some_digests();
            let want: Vec<[Digest; FANOUT]> = children.iter().map(|n| n.map(|d| width.digest(d))).collect();
            prop_assert_eq!(wire::decode_children(&wire::encode_children(&children, width), width).expect("children"), want);
        }
    }

    #[test]
    fn wire_garbage_is_rejected_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..60), tag in proptest::sample::select(b"NDCcRrHhK".to_vec())) {
        let mut tagged = vec![tag];
        tagged.extend(&bytes);
        for b in [bytes.as_slice(), tagged.as_slice()] {
            let _nodes = wire::decode_nodes(b);
            let _keys = wire::decode_keys(b);
            let _digest = wire::decode_digest(b);
            for width in [Width::Full, Width::Narrow] {
                let _children = wire::decode_children(b, width);
                let _rows = wire::decode_rows(b, width);
                let _hashes = wire::decode_hashes(b, width);
            }
        }
        let _text = wire::from_text(&String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn wire_rejects_wrong_kind_and_bad_lengths() {
    let nodes = wire::encode_nodes(&[Node::ROOT]);
    assert!(matches!(wire::decode_hashes(&nodes, Width::Full), Err(DigestError::Wire(_))));
    assert!(wire::from_text("not base64!").is_err());
    assert!(wire::decode_nodes(b"").is_err());
    // A width other than the one asked for.
    let narrow = wire::encode_children(&some_digests(), Width::Narrow);
    assert!(matches!(wire::decode_children(&narrow, Width::Full), Err(DigestError::Wire(_))));
    let narrow = wire::encode_rows(&[vec![]], Width::Narrow);
    assert!(matches!(wire::decode_rows(&narrow, Width::Full), Err(DigestError::Wire(_))));
    // A count far beyond the bytes present.
    assert!(wire::decode_keys(&[b'K', 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]).is_err());
    // A node deeper than MAX_DEPTH, an index too large for its depth.
    assert!(wire::decode_nodes(&[b'N', 1, 33]).is_err());
    assert!(wire::decode_nodes(&[b'N', 1, 1, 0x10]).is_err());
    // Trailing bytes.
    assert!(wire::decode_digest(&[b'D', 0, 0]).is_err());
    // A narrow key hash sharing more than its 8 bytes.
    assert!(wire::decode_hashes(&[b'h', 1, 9], Width::Narrow).is_err());
    // An over-long varint.
    assert!(
        wire::decode_hashes(
            &[
                b'H', 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F
            ],
            Width::Full
        )
        .is_err()
    );
    // Empty digests cost one byte; narrow sums eight.
    let empty = wire::encode_children(&[[Digest::default(); FANOUT]], Width::Narrow);
    assert_eq!(empty.len(), 2 + FANOUT);
    let one = wire::encode_children(&[[Digest { rows: 1, sum: u128::MAX }; FANOUT]], Width::Narrow);
    assert_eq!(one.len(), 2 + FANOUT * 9);
}

// ---- compare ----

/// What compare must find, computed by grouping both tables' rows by key text.
fn expected(local: &[Row], peer: &[Row]) -> (Comparison, BTreeSet<(&'static str, Vec<u8>)>) {
    let group = |rows: &[Row]| {
        let mut map: BTreeMap<Vec<u8>, Vec<u128>> = BTreeMap::new();
        for (d, k) in brute(rows) {
            map.entry(k).or_default().push(d.row_hash);
        }
        for v in map.values_mut() {
            v.sort_unstable();
        }
        map
    };
    let (l, p) = (group(local), group(peer));
    let mut c =
        Comparison { local_rows: local.len() as u64, peer_rows: peer.len() as u64, ..Comparison::default() };
    let mut keys = BTreeSet::new();
    for (k, lh) in &l {
        match p.get(k) {
            Some(ph) if ph == lh => c.matched += lh.len() as u64,
            Some(_) => {
                c.conflict += 1;
                keys.insert((Category::Conflict.as_str(), k.clone()));
            }
            None => {
                c.local_only += lh.len() as u64;
                keys.insert((Category::LocalOnly.as_str(), k.clone()));
            }
        }
    }
    for (k, ph) in &p {
        if !l.contains_key(k) {
            c.peer_only += ph.len() as u64;
            keys.insert((Category::PeerOnly.as_str(), k.clone()));
        }
    }
    (c, keys)
}

fn run_compare(local: &mut (dyn Side + Send), peer: &mut dyn Side, limits: &Limits) -> Comparison {
    compare(local, peer, limits, &mut || Ok(())).expect("compare")
}

fn assert_as_expected(got: &Comparison, local: &[Row], peer: &[Row]) {
    let (want, want_keys) = expected(local, peer);
    let counts =
        |c: &Comparison| (c.local_rows, c.peer_rows, c.matched, c.conflict, c.local_only, c.peer_only);
    assert_eq!(counts(got), counts(&want));
    let got_keys: BTreeSet<(&'static str, Vec<u8>)> =
        got.keys.iter().map(|(c, k)| (c.as_str(), k.clone())).collect();
    assert_eq!(got_keys.len(), got.keys.len(), "each differing key once");
    assert_eq!(got_keys, want_keys);
    assert!(!got.keys_truncated);
}

fn base_rows(n: u64) -> Vec<Row> {
    (0..n).map(|i| row(i, Some(&format!("name {i}")), if i % 3 == 0 { None } else { Some("") })).collect()
}

#[test]
fn identical_tables_all_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = base_rows(500);
    let mut l = table(dir.path(), "l", &rows, 3);
    let mut p = CountingSide::new(table(dir.path(), "p", &rows, 2));
    let c = run_compare(&mut l, &mut p, &Limits::default());
    assert_eq!((c.matched, c.conflict, c.local_only, c.peer_only), (500, 0, 0, 0));
    assert!(c.keys.is_empty());
    assert_eq!(p.counts.calls, 1, "only the total is asked");

    // Both empty: zero files on one side, one empty file on the other.
    let mut l = table(dir.path(), "le", &[], 0);
    let mut p = table(dir.path(), "pe", &[], 1);
    let c = run_compare(&mut l, &mut p, &Limits::default());
    assert_eq!((c.local_rows, c.peer_rows, c.matched), (0, 0, 0));
}

#[test]
fn mutation_suite_is_classified_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = base_rows(2000);
    let mut peer = local.clone();
    peer[5][1] = Some(b"changed".to_vec()); // one column updated
    peer[6][2] = Some(Vec::new()); // NULL -> ''
    peer[7][2] = None; // '' -> NULL
    peer[9][1] = Some(b"tab\there\nnew line\\back".to_vec());
    let (a, b) = (peer[11][1].clone(), peer[12][1].clone()); // values swapped between rows
    peer[11][1] = b;
    peer[12][1] = a;
    peer.retain(|r| r[0].as_deref() != Some(b"13")); // deleted ...
    peer.push(row(100_000, Some("inserted"), None)); // ... and another inserted
    let dup = peer.iter().find(|r| r[0].as_deref() == Some(b"14")).cloned().expect("row 14");
    peer.push(dup); // duplicated ...
    peer.retain(|r| r[0].as_deref() != Some(b"16")); // ... and another deleted
    // The keys with the lowest and highest key hash changed.
    let hashes: Vec<u128> = brute(&peer).iter().map(|(d, _)| d.key_hash).collect();
    let lowest = (0..peer.len()).min_by_key(|&i| hashes[i]).expect("rows");
    let highest = (0..peer.len()).max_by_key(|&i| hashes[i]).expect("rows");
    peer[lowest][1] = Some(b"low".to_vec());
    peer[highest][1] = Some(b"high".to_vec());

    for limits in [
        Limits::default(),
        Limits {
            leaf_rows: 1,
            sparse_leaf_rows: 0,
            saturated_leaf_rows: 2,
            batch_nodes: 3,
            batch_rows: 5,
            ..Limits::default()
        },
    ] {
        let mut l = table(dir.path(), "l", &local, 4);
        let mut p = table(dir.path(), "p", &peer, 3);
        let c = run_compare(&mut l, &mut p, &limits);
        assert_as_expected(&c, &local, &peer);
        assert_eq!(c.conflict, 9); // 5, 6, 7, 9, 11, 12, 14, lowest, highest
        assert_eq!((c.local_only, c.peer_only), (2, 1));
        assert_eq!(c.matched, 2000 - 9 - 2);
        assert!(c.keys.contains(&(Category::PeerOnly, b"100000".to_vec())));
        assert!(c.keys.contains(&(Category::LocalOnly, b"13".to_vec())));
        assert!(c.keys.contains(&(Category::Conflict, b"14".to_vec())));
    }
}

#[test]
fn few_differences_exchange_little() {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = base_rows(20_000);
    let mut peer = local.clone();
    for i in 0..20 {
        peer[i * 997][1] = Some(b"different".to_vec());
    }
    let mut l = table(dir.path(), "l", &local, 4);
    let mut p = CountingSide::new(table(dir.path(), "p", &peer, 4));
    let c = run_compare(&mut l, &mut p, &Limits::default());
    assert_as_expected(&c, &local, &peer);
    assert_eq!((c.conflict, c.matched), (20, 19_980));
    assert!(c.local_only + c.matched + c.conflict == c.local_rows);
    assert_eq!(c.width, Width::Narrow, "unique keys, no collision: one pass at the narrow width");
    assert!(p.counts.rows < 500, "{:?}", p.counts);
    assert!(p.counts.digests < 2000, "{:?}", p.counts);
    assert_eq!(p.counts.keys, 0, "conflict keys come from the local side");
}

#[test]
fn cancel_check_stops_the_comparison() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut l = table(dir.path(), "l", &base_rows(100), 1);
    let mut p = table(dir.path(), "p", &base_rows(90), 1);
    let mut calls = 0;
    let mut check = || {
        calls += 1;
        if calls > 3 { Err(DigestError::Stopped("cancelled".into())) } else { Ok(()) }
    };
    let r = compare(&mut l, &mut p, &Limits::default(), &mut check);
    assert!(matches!(r, Err(DigestError::Stopped(_))), "{r:?}");
}

#[test]
fn key_texts_are_capped_but_counts_stay_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = base_rows(300);
    let peer: Vec<Row> = local.iter().skip(100).cloned().collect();
    let mut l = table(dir.path(), "l", &local, 2);
    let mut p = table(dir.path(), "p", &peer, 2);
    let c = run_compare(&mut l, &mut p, &Limits { max_keys: 10, ..Limits::default() });
    assert_eq!((c.local_only, c.matched, c.peer_only), (100, 200, 0));
    assert_eq!(c.keys.len(), 10);
    assert!(c.keys_truncated);
}

/// A peer whose answers do not add up is refused.
struct Liar(TableDigests);

impl Side for Liar {
    fn total(&mut self) -> Result<Digest, DigestError> {
        Side::total(&mut self.0)
    }
    fn children(&mut self, nodes: &[Node], width: Width) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        let mut answer = Side::children(&mut self.0, nodes, width)?;
        if let Some(first) = answer.first_mut() {
            first[0].rows += 1;
        }
        Ok(answer)
    }
    fn rows(&mut self, nodes: &[Node], width: Width) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        Side::rows(&mut self.0, nodes, width)
    }
    fn keys(&mut self, key_hashes: &[u128], width: Width) -> Result<Vec<(u128, Vec<u8>)>, DigestError> {
        Side::keys(&mut self.0, key_hashes, width)
    }
    fn sums(&mut self, nodes: &[Node]) -> Result<Digest, DigestError> {
        Side::sums(&mut self.0, nodes)
    }
}

#[test]
fn inconsistent_peer_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut l = table(dir.path(), "l", &base_rows(100), 1);
    let mut p = Liar(table(dir.path(), "p", &base_rows(99), 1));
    let r = compare(&mut l, &mut p, &Limits::default(), &mut || Ok(()));
    assert!(matches!(r, Err(DigestError::Side(_))), "{r:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn compare_agrees_with_brute_force(
        base in proptest::collection::vec((field(), field()), 0..150),
        actions in proptest::collection::vec(0u8..12, 150),
        inserts in proptest::collection::vec((1000u64..1100, field()), 0..5),
        leaf_rows in 0u64..20,
        batch_nodes in 1usize..6,
        batch_rows in 1u64..40,
        files in (1usize..4, 1usize..4),
    ) {
        let local: Vec<Row> = base.into_iter().enumerate().map(|(i, (a, b))| vec![Some(i.to_string().into_bytes()), a, b]).collect();
        let mut peer = Vec::new();
        for (r, &act) in local.iter().zip(&actions) {
            match act {
                0 => {}                                              // deleted
                1 => peer.push(vec![r[0].clone(), Some(b"upd".to_vec()), r[2].clone()]),
                2 => { peer.push(r.clone()); peer.push(r.clone()); } // duplicated
                3 => peer.push(vec![r[0].clone(), r[2].clone(), r[1].clone()]),
                _ => peer.push(r.clone()),
            }
        }
        let mut seen = BTreeSet::new();
        for (k, a) in inserts {
            if seen.insert(k) {
                peer.push(vec![Some(k.to_string().into_bytes()), a, None]);
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits { leaf_rows, sparse_leaf_rows: leaf_rows / 3, saturated_leaf_rows: leaf_rows * 4, batch_nodes, batch_rows, max_keys: 1_000, ..Limits::default() };
        let mut l = table(dir.path(), "l", &local, files.0);
        let mut p = table(dir.path(), "p", &peer, files.1);
        let c = run_compare(&mut l, &mut p, &limits);
        assert_as_expected(&c, &local, &peer);
        // Local keys are unique: every local row is matched, in a conflict, or local only.
        prop_assert_eq!(c.matched + c.conflict + c.local_only, c.local_rows);
        if local == peer {
            prop_assert_eq!(c.matched, c.local_rows);
        }
    }
}

#[test]
fn one_sided_rows_beyond_the_key_limit_are_counted_without_fetching_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = base_rows(5000);
    let mut l = table(dir.path(), "l", &rows, 3);
    let mut p = CountingSide::new(table(dir.path(), "p", &[], 1));
    let limits = Limits { max_keys: 10, batch_nodes: 16, ..Limits::default() };
    let c = run_compare(&mut l, &mut p, &limits);
    assert_eq!((c.local_rows, c.peer_rows, c.matched, c.local_only, c.peer_only), (5000, 0, 0, 5000, 0));
    assert!(c.keys_truncated);
    assert_eq!(c.keys.iter().filter(|(cat, _)| *cat == Category::LocalOnly).count(), 10);
    // Once ten keys were listed, the rest was counted from digests: far fewer than 5000 rows asked for.
    assert!(p.counts.nodes < 2000, "{:?}", p.counts);
}

#[test]
fn small_batches_give_the_same_result_as_large_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = base_rows(3000);
    let mut peer = base_rows(3000);
    for (i, r) in peer.iter_mut().enumerate() {
        if i % 97 == 0 {
            *r = row(i as u64, Some("changed"), None);
        }
    }
    peer.truncate(2900);
    let mut l = table(dir.path(), "l", &local, 2);
    let mut p = table(dir.path(), "p", &peer, 3);
    let small = Limits { batch_nodes: 3, batch_rows: 20, leaf_rows: 4, ..Limits::default() };
    let c = run_compare(&mut l, &mut p, &small);
    assert_as_expected(&c, &local, &peer);
}

/// A side held in memory as row digests, to build hash coincidences that real hashes never give.
struct Mem {
    rows: Vec<RowDigest>,
    texts: BTreeMap<u128, Vec<u8>>,
}

impl Mem {
    fn new(rows: &[(u128, u128)], texts: &[&[u8]]) -> Mem {
        let mut rows: Vec<RowDigest> =
            rows.iter().map(|&(key_hash, row_hash)| RowDigest { key_hash, row_hash }).collect();
        rows.sort_unstable();
        let texts = texts.iter().map(|t| (super::key_hash(t), t.to_vec())).collect();
        Mem { rows, texts }
    }

    fn in_node(&self, node: Node) -> impl Iterator<Item = &RowDigest> {
        self.rows.iter().filter(move |r| node.contains(r.key_hash))
    }
}

impl Side for Mem {
    fn total(&mut self) -> Result<Digest, DigestError> {
        self.sums(&[Node::ROOT])
    }
    fn children(&mut self, nodes: &[Node], width: Width) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        Ok(nodes
            .iter()
            .map(|&n| {
                let mut out = [Digest::default(); FANOUT];
                for r in self.in_node(n) {
                    out[n.child_of(r.key_hash)].add_row(r.row_hash);
                }
                out.map(|d| width.digest(d))
            })
            .collect())
    }
    fn rows(&mut self, nodes: &[Node], width: Width) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        Ok(nodes
            .iter()
            .map(|&n| {
                let mut list: Vec<RowDigest> = self.in_node(n).map(|r| width.row(*r)).collect();
                list.sort_unstable();
                list
            })
            .collect())
    }
    fn keys(&mut self, key_hashes: &[u128], width: Width) -> Result<Vec<(u128, Vec<u8>)>, DigestError> {
        Ok(self
            .texts
            .iter()
            .filter(|(h, _)| key_hashes.contains(&width.key(**h)))
            .map(|(h, t)| (*h, t.clone()))
            .collect())
    }
    fn sums(&mut self, nodes: &[Node]) -> Result<Digest, DigestError> {
        let mut d = Digest::default();
        for &n in nodes {
            self.in_node(n).for_each(|r| d.add_row(r.row_hash));
        }
        Ok(d)
    }
}

#[test]
fn row_hashes_differing_only_above_the_narrow_bits_are_found_at_full_width() {
    // Key 1's rows differ by 2^64: every narrow sum on its path is equal, the whole sums are not.
    let k1 = super::key_hash(b"1");
    let k2 = super::key_hash(b"2");
    let mut local = Mem::new(&[(k1, 10), (k2, 20)], &[b"1", b"2"]);
    let mut peer = Mem::new(&[(k1, 10 + (1u128 << 64)), (k2, 20)], &[b"1", b"2"]);
    let c = run_compare(&mut local, &mut peer, &Limits::default());
    assert_eq!(c.width, Width::Full, "the whole-sum check sent it to full width");
    assert_eq!((c.matched, c.conflict, c.local_only, c.peer_only), (1, 1, 0, 0));
    assert_eq!(c.keys, vec![(Category::Conflict, b"1".to_vec())]);
}

#[test]
fn keys_sharing_their_narrow_hash_are_told_apart_at_full_width() {
    // A second key with the top 64 bits of key 1's hash (no text needed: it matches).
    let k1 = super::key_hash(b"1");
    let twin = Width::Narrow.key(k1) | 0x5;
    let mut local = Mem::new(&[(k1, 10), (twin, 30)], &[b"1"]);
    let mut peer = Mem::new(&[(k1, 11), (twin, 30)], &[b"1"]);
    let c = run_compare(&mut local, &mut peer, &Limits::default());
    assert_eq!(c.width, Width::Full);
    assert_eq!((c.matched, c.conflict, c.local_only, c.peer_only), (1, 1, 0, 0));
    assert_eq!(c.keys, vec![(Category::Conflict, b"1".to_vec())]);

    // The same, the twins on the peer only.
    let mut local = Mem::new(&[(k1, 10)], &[b"1"]);
    let mut peer = Mem::new(&[(k1, 10), (twin, 30)], &[b"1"]);
    let r = compare(&mut local, &mut peer, &Limits::default(), &mut || Ok(()));
    // The twin has no key text anywhere: at full width the peer cannot name it, and says so.
    assert!(matches!(r, Err(DigestError::Side(_))), "{r:?}");
}

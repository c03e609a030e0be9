//! Property tests: chunk files round-trip any bytes, and any damage is caught.

mod common;

use std::fs;
use std::io::{Read, Write};

use proptest::prelude::*;
use proptest::sample::Index;
use steep_repl_engine::{
    ChunkCheck, ChunkEntry, ChunkError, ChunkReader, ChunkWriter, Compression, ProblemKind, VerifyMode,
    chunk_rel_path, verify_snapshot,
};

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        Just(Compression::Zstd { level: 1 }),
        Just(Compression::Zstd { level: 3 }),
    ]
}

/// Bytes with plenty of newlines, tabs and backslashes, and sometimes long runs.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..4096),
        prop::collection::vec(prop::sample::select(b"ab\n\t\\x".to_vec()), 0..8192),
        (any::<u8>(), 0usize..600_000).prop_map(|(b, n)| vec![b; n]),
    ]
}

/// Writes `data` in pieces of the given sizes (cycled), returns the manifest entry.
fn write_chunk(dir: &std::path::Path, compression: Compression, data: &[u8], pieces: &[usize]) -> ChunkEntry {
    let rel = chunk_rel_path("public.t", 0, &compression);
    let mut writer = ChunkWriter::create(dir, &rel, compression).unwrap();
    let mut rest = data;
    let mut sizes = pieces.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).clamp(1, rest.len());
        writer.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
    }
    let stats = writer.finish().unwrap();
    ChunkEntry::from_stats(0, 0, None, stats)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn any_bytes_round_trip(
        data in payload(),
        compression in compression(),
        pieces in prop::collection::vec(1usize..300_000, 1..6),
        read_size in 1usize..100_000,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let entry = write_chunk(dir.path(), compression, &data, &pieces);
        prop_assert_eq!(entry.raw_bytes, data.len() as u64);
        prop_assert_eq!(entry.raw_crc32, crc32fast::hash(&data));
        prop_assert_eq!(entry.rows, data.iter().filter(|&&b| b == b'\n').count() as u64);
        let path = entry.path_in(dir.path());
        let file = fs::read(&path).unwrap();
        prop_assert_eq!(entry.file_bytes, file.len() as u64);
        prop_assert_eq!(entry.file_crc32, crc32fast::hash(&file));
        match compression {
            Compression::None => prop_assert_eq!(&file, &data),
            Compression::Zstd { .. } => prop_assert_eq!(&zstd::decode_all(&file[..]).unwrap(), &data),
        }
        // Only the final file is left in the directory.
        prop_assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

        let mut reader = ChunkReader::open(&path, &entry).unwrap();
        let mut back = Vec::new();
        let mut buf = vec![0u8; read_size];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 { break; }
            back.extend_from_slice(&buf[..n]);
        }
        prop_assert_eq!(&back, &data);
        prop_assert_eq!(reader.rows_read(), entry.rows);
        prop_assert_eq!(reader.read(&mut buf).unwrap(), 0);

        let mut reader = ChunkReader::open(&path, &entry).unwrap();
        prop_assert_eq!(reader.check_to_end(), Ok(()));
    }

    #[test]
    fn any_damage_is_caught_by_quick_verify(
        data in prop::collection::vec(any::<u8>(), 0..20_000),
        compression in compression(),
        damage in 0u8..3,
        at in any::<Index>(),
        bit in 0u8..8,
        extra in any::<u8>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let manifest = common::build_snapshot(
            dir.path(),
            compression,
            &[common::TableSpec { schema: "public", name: "t", chunks: vec![data] }],
        );
        let entry = &manifest.tables[0].chunks[0];
        let path = entry.path_in(dir.path());
        let mut file = fs::read(&path).unwrap();
        let expected_kind = match damage {
            0 if !file.is_empty() => {
                let i = at.index(file.len());
                file[i] ^= 1 << bit;
                ProblemKind::FileCrcMismatch
            }
            1 if !file.is_empty() => {
                file.truncate(at.index(file.len()));
                ProblemKind::SizeMismatch
            }
            _ => {
                file.push(extra);
                ProblemKind::SizeMismatch
            }
        };
        fs::write(&path, &file).unwrap();
        let report = verify_snapshot(dir.path(), VerifyMode::Quick);
        prop_assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        prop_assert_eq!(report.problems[0].kind, expected_kind);
        prop_assert_eq!(report.problems[0].file.as_deref(), Some(entry.file.as_str()));
        // The reader fails too, at open (size) or by the end of the stream (CRC).
        let read = ChunkReader::open(&path, entry)
            .map_err(|e| e.to_string())
            .and_then(|mut r| r.check_to_end().map_err(|e| e.to_string()));
        prop_assert!(read.is_err());
    }
}

#[test]
fn reader_reports_each_raw_check() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::text_rows(1000, 50, 1);
    for compression in [Compression::None, Compression::Zstd { level: 1 }] {
        let entry = write_chunk(dir.path(), compression, &data, &[7]);
        let path = entry.path_in(dir.path());
        let cases: Vec<(ChunkEntry, ChunkCheck)> = vec![
            (
                ChunkEntry { rows: entry.rows + 1, ..entry.clone() },
                ChunkCheck::RowCount { expected: entry.rows + 1, found: entry.rows },
            ),
            (
                ChunkEntry { raw_crc32: !entry.raw_crc32, ..entry.clone() },
                ChunkCheck::RawCrc { expected: !entry.raw_crc32, found: entry.raw_crc32 },
            ),
            (
                ChunkEntry { raw_bytes: entry.raw_bytes + 5, ..entry.clone() },
                ChunkCheck::RawSize { expected: entry.raw_bytes + 5, found: entry.raw_bytes },
            ),
        ];
        for (expected, check) in cases {
            let mut reader = ChunkReader::open(&path, &expected).unwrap();
            let mut out = Vec::new();
            let err = reader.read_to_end(&mut out).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
            let typed = ChunkError::from_io(&err).unwrap();
            assert_eq!(typed.check, check, "{compression}");
            assert!(err.to_string().contains("000000.copy"), "{err}");
            // The failure sticks.
            assert!(reader.read(&mut [0u8; 16]).is_err());
        }
        // A raw size smaller than the stream is caught as soon as it is passed.
        let short = ChunkEntry { raw_bytes: 10, ..entry.clone() };
        let mut reader = ChunkReader::open(&path, &short).unwrap();
        let mut buf = vec![0u8; 4096];
        let err = loop {
            match reader.read_checked(&mut buf) {
                Ok(0) => panic!("no error"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert!(matches!(err.check, ChunkCheck::RawSize { expected: 10, .. }), "{err}");
        assert!(reader.raw_bytes_read() <= 4096 + 10);
        fs::remove_file(&path).unwrap();
    }
}

/// Incompressible bytes, so that a chunk file is several of the reader's 1 MiB reads long.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Opens the chunk, reads `first` bytes, lets `change` alter the file, then reads on: the error,
/// which must name the file.
fn read_while_changing(
    path: &std::path::Path,
    entry: &ChunkEntry,
    first: usize,
    change: impl FnOnce(),
) -> Result<Vec<u8>, ChunkError> {
    let mut reader = ChunkReader::open(path, entry).unwrap();
    let mut out = vec![0u8; first];
    let mut got = 0;
    while got < first {
        let n = reader.read_checked(&mut out[got..])?;
        assert!(n > 0, "the stream ended before {first} bytes");
        got += n;
    }
    change();
    let mut rest = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read_checked(&mut buf)?;
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&buf[..n]);
    }
    out.extend(rest);
    Ok(out)
}

#[test]
fn a_file_changed_under_the_reader_is_an_error_never_a_fault() {
    // Chunks used to be read through a memory map: a file truncated under it raised SIGBUS, which
    // inside PostgreSQL killed the server. Every change must now be an error naming the file.
    let dir = tempfile::tempdir().unwrap();
    let data = noise(5 << 20);
    for compression in [Compression::None, Compression::Zstd { level: 1 }] {
        let entry = write_chunk(dir.path(), compression, &data, &[1 << 20]);
        let path = entry.path_in(dir.path());
        let original = fs::read(&path).unwrap();
        assert!(original.len() > 3 << 20, "the file must span several reads");

        // Truncated to 100 bytes after the first megabyte was handed out.
        let err = read_while_changing(&path, &entry, 1 << 20, || {
            fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
        })
        .unwrap_err();
        assert!(matches!(err.check, ChunkCheck::FileSize { found, .. } if found < entry.file_bytes), "{err}");
        assert!(err.to_string().contains("000000.copy"), "{err}");

        // Rewritten in place with other bytes of the same length.
        fs::write(&path, &original).unwrap();
        let err = read_while_changing(&path, &entry, 1 << 20, || {
            let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(original.len() as u64 - 10)).unwrap();
            f.write_all(&[0xAA; 10]).unwrap();
        })
        .unwrap_err();
        assert!(
            matches!(
                err.check,
                ChunkCheck::FileCrc { .. } | ChunkCheck::Decompress(_) | ChunkCheck::RawCrc { .. }
            ),
            "{err}"
        );

        // Grown at the end.
        fs::write(&path, &original).unwrap();
        let err = read_while_changing(&path, &entry, 1 << 20, || {
            fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"more").unwrap();
        })
        .unwrap_err();
        assert!(matches!(err.check, ChunkCheck::FileSize { found, .. } if found > entry.file_bytes), "{err}");

        // Removed: the open file still reads whole and checks out (nothing was lost).
        fs::write(&path, &original).unwrap();
        let back = read_while_changing(&path, &entry, 1 << 20, || fs::remove_file(&path).unwrap()).unwrap();
        assert_eq!(back, data);
    }
}

#[test]
fn a_partial_read_checks_the_rest_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = noise(4 << 20);
    for compression in [Compression::None, Compression::Zstd { level: 1 }] {
        let entry = write_chunk(dir.path(), compression, &data, &[1 << 20]);
        let path = entry.path_in(dir.path());
        let mut file = fs::read(&path).unwrap();
        // Sound: the rest of the file checks out.
        let mut reader = ChunkReader::open(&path, &entry).unwrap();
        reader.read_exact(&mut [0u8; 1000]).unwrap();
        assert_eq!(reader.check_file_to_end(), Ok(()));
        // Damaged past the part read: the partial reader still finds it.
        let last = file.len() - 1;
        file[last] ^= 0x01;
        fs::write(&path, &file).unwrap();
        let mut reader = ChunkReader::open(&path, &entry).unwrap();
        reader.read_exact(&mut [0u8; 1000]).unwrap();
        let err = reader.check_file_to_end().unwrap_err();
        assert!(matches!(err.check, ChunkCheck::FileCrc { .. }), "{err}");
        // And the failure sticks.
        assert!(reader.read(&mut [0u8; 16]).is_err());
        fs::remove_file(&path).unwrap();
    }
}

#[test]
fn corrupt_zstd_with_matching_crc_is_a_decompress_error() {
    // A manifest that vouches for a file that is not zstd at all.
    let dir = tempfile::tempdir().unwrap();
    let rel = chunk_rel_path("public.t", 0, &Compression::Zstd { level: 1 });
    let path = dir.path().join(&rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, b"this is not zstd\n").unwrap();
    let entry = ChunkEntry {
        index: 0,
        file: rel,
        block_start: 0,
        block_end: None,
        rows: 1,
        raw_bytes: 17,
        file_bytes: 17,
        raw_crc32: crc32fast::hash(b"this is not zstd\n"),
        file_crc32: crc32fast::hash(b"this is not zstd\n"),
    };
    let mut reader = ChunkReader::open(&path, &entry).unwrap();
    let err = reader.check_to_end().unwrap_err();
    assert!(matches!(err.check, ChunkCheck::Decompress(_)), "{err}");

    // A frame cut short (CRC recomputed to match) is reported as such.
    let full = zstd::encode_all(&common::text_rows(5000, 40, 3)[..], 1).unwrap();
    let cut = &full[..full.len() / 2];
    fs::write(&path, cut).unwrap();
    let entry = ChunkEntry {
        file_bytes: cut.len() as u64,
        file_crc32: crc32fast::hash(cut),
        raw_bytes: 5000 * 41,
        ..entry
    };
    let mut reader = ChunkReader::open(&path, &entry).unwrap();
    let err = reader.check_to_end().unwrap_err();
    assert!(err.to_string().contains("ends inside a zstd frame"), "{err}");
}

#[test]
fn dropped_or_aborted_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for compression in [Compression::None, Compression::Zstd { level: 3 }] {
        let rel = chunk_rel_path("public.t", 0, &compression);
        let mut writer = ChunkWriter::create(dir.path(), &rel, compression).unwrap();
        writer.write_all(&common::text_rows(100_000, 20, 0)).unwrap();
        drop(writer);
        let mut writer = ChunkWriter::create(dir.path(), &rel, compression).unwrap();
        writer.write_all(b"x\n").unwrap();
        writer.abort();
        let result = std::panic::catch_unwind(|| {
            let mut writer = ChunkWriter::create(dir.path(), &rel, compression).unwrap();
            writer.write_all(b"x\n").unwrap();
            panic!("worker died");
        });
        assert!(result.is_err());
        let left: Vec<_> =
            fs::read_dir(dir.path().join("data/public.t")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

#[test]
fn writer_refuses_unsafe_paths_and_mismatched_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let zstd = Compression::Zstd { level: 1 };
    for bad in ["../x.copy.zst", "/tmp/x.copy.zst", "data/../../x.copy.zst", "data/a\\b.copy.zst"] {
        assert!(ChunkWriter::create(dir.path(), bad, zstd).is_err(), "{bad}");
    }
    assert!(ChunkWriter::create(dir.path(), "data/t/000000.copy", zstd).is_err());
    assert!(ChunkWriter::create(dir.path(), "data/t/000000.copy.zst", Compression::None).is_err());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn compression_text_forms() {
    let parse = |s: &str| s.parse::<Compression>();
    assert_eq!(parse("none").unwrap(), Compression::None);
    assert_eq!(parse("zstd").unwrap(), Compression::Zstd { level: 1 });
    assert_eq!(parse(" ZSTD:22 ").unwrap(), Compression::Zstd { level: 22 });
    assert_eq!(parse("zstd:3").unwrap().to_string(), "zstd:3");
    for bad in ["zstd:0", "zstd:23", "zstd:-1", "zstd:", "zstd:x", "gzip", "", "zstd:1:2"] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(err.contains("invalid compression"), "{bad}: {err}");
    }
    let json = serde_json::to_string(&Compression::Zstd { level: 7 }).unwrap();
    assert_eq!(json, "\"zstd:7\"");
    assert_eq!(serde_json::from_str::<Compression>("\"none\"").unwrap(), Compression::None);
    assert!(serde_json::from_str::<Compression>("\"zstd:99\"").is_err());
}

#[test]
fn multi_frame_chunks_round_trip() {
    // More than two frames, written through every path: tiny writes, a frame-crossing write, a
    // write of several whole frames.
    let data = common::text_rows(150_000, 70, 5); // about 10.6 MiB
    let frame = steep_repl_engine::chunk::ZSTD_FRAME_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let compression = Compression::Zstd { level: 1 };
    let rel = chunk_rel_path("public.t", 0, &compression);
    let mut writer = ChunkWriter::create(dir.path(), &rel, compression).unwrap();
    let (head, rest) = data.split_at(1000);
    for byte in head.chunks(1) {
        writer.write_all(byte).unwrap();
    }
    let (middle, tail) = rest.split_at(frame + 17);
    writer.write_all(middle).unwrap();
    writer.write_all(tail).unwrap();
    let entry = ChunkEntry::from_stats(0, 0, None, writer.finish().unwrap());
    let path = entry.path_in(dir.path());
    let file = fs::read(&path).unwrap();
    assert_eq!(zstd::decode_all(&file[..]).unwrap(), data);
    let mut back = Vec::new();
    ChunkReader::open(&path, &entry).unwrap().read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(entry.rows, 150_000);

    // An empty chunk is one valid, empty zstd frame.
    let rel = chunk_rel_path("public.t", 1, &compression);
    let entry = ChunkEntry::from_stats(
        1,
        0,
        None,
        ChunkWriter::create(dir.path(), &rel, compression).unwrap().finish().unwrap(),
    );
    let file = fs::read(entry.path_in(dir.path())).unwrap();
    assert!(!file.is_empty());
    assert!(zstd::decode_all(&file[..]).unwrap().is_empty());
    assert_eq!((entry.rows, entry.raw_bytes), (0, 0));
}

//! Verifier scenarios: every kind of damage is found, and all of them together in one report.

mod common;

use std::fs;

use common::{TableSpec, build_snapshot, text_rows};
use steep_repl_engine::{
    ChunkReader, Compression, MANIFEST_FILE, Manifest, ProblemKind, VerifyMode, VerifyOptions,
    remove_leftover_temp_files, verify_chunk, verify_snapshot, verify_snapshot_with,
};

fn three_tables(dir: &std::path::Path, compression: Compression) -> Manifest {
    build_snapshot(
        dir,
        compression,
        &[
            TableSpec {
                schema: "public",
                name: "orders",
                chunks: vec![text_rows(2000, 60, 1), text_rows(1500, 60, 2), text_rows(10, 5, 3)],
            },
            TableSpec {
                schema: "Sales",
                name: "Line Items",
                chunks: vec![text_rows(3000, 30, 4), text_rows(0, 0, 0)],
            },
            TableSpec { schema: "public", name: "empty", chunks: vec![Vec::new()] },
        ],
    )
}

fn kinds(report: &steep_repl_engine::VerifyReport) -> Vec<ProblemKind> {
    report.problems.iter().map(|p| p.kind).collect()
}

#[test]
fn sound_snapshot_passes_both_modes() {
    for compression in [Compression::None, Compression::Zstd { level: 1 }, Compression::Zstd { level: 9 }] {
        let dir = tempfile::tempdir().unwrap();
        let manifest = three_tables(dir.path(), compression);
        for mode in [VerifyMode::Quick, VerifyMode::Deep] {
            let report = verify_snapshot(dir.path(), mode);
            assert!(report.is_ok(), "{compression} {mode:?}: {:#?}", report.problems);
            assert_eq!(report.chunks_checked, 6);
            assert_eq!(report.file_bytes_checked, manifest.totals.file_bytes);
            let raw = if mode == VerifyMode::Deep { manifest.totals.raw_bytes } else { 0 };
            assert_eq!(report.raw_bytes_checked, raw);
            assert_eq!(report.manifest.as_ref(), Some(&manifest));
        }
        let report = verify_snapshot_with(
            dir.path(),
            &VerifyOptions { mode: VerifyMode::Deep, threads: Some(3), signals_to_caller: true, stop: None },
        )
        .unwrap();
        assert!(report.is_ok());
    }
}

#[test]
fn every_kind_of_damage_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = three_tables(dir.path(), Compression::Zstd { level: 1 });
    let orders = &manifest.tables[0];
    let sales = &manifest.tables[1];
    let path = |t: usize, c: usize| manifest.tables[t].chunks[c].path_in(dir.path());

    // Missing: chunk 0 of orders removed.
    fs::remove_file(path(0, 0)).unwrap();
    // Truncated: chunk 1 of orders cut short.
    let bytes = fs::read(path(0, 1)).unwrap();
    fs::write(path(0, 1), &bytes[..bytes.len() - 3]).unwrap();
    // Corrupted: one bit flipped in chunk 0 of sales.
    let mut bytes = fs::read(path(1, 0)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    fs::write(path(1, 0), &bytes).unwrap();
    // Renamed: chunk 1 of sales moved to another index (missing + extra).
    let renamed = path(1, 1).with_file_name("000009.copy.zst");
    fs::rename(path(1, 1), &renamed).unwrap();
    // Extra: a stray file, a leftover temporary file, a stray directory.
    fs::write(dir.path().join("data/public.orders/notes.txt"), b"hi").unwrap();
    fs::write(dir.path().join("data/public.orders/.000003.copy.zst.tmp-123-0"), b"partial").unwrap();
    fs::create_dir(dir.path().join("data/public.gone")).unwrap();

    let report = verify_snapshot(dir.path(), VerifyMode::Quick);
    let text: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        kinds(&report),
        vec![
            ProblemKind::MissingChunk,
            ProblemKind::SizeMismatch,
            ProblemKind::FileCrcMismatch,
            ProblemKind::MissingChunk,
            ProblemKind::ExtraFile,
            ProblemKind::ExtraFile,
            ProblemKind::ExtraFile,
            ProblemKind::ExtraFile,
        ],
        "{text:#?}"
    );
    assert_eq!(report.problems[0].table.as_deref(), Some("\"public\".\"orders\""));
    assert_eq!(report.problems[0].file.as_deref(), Some(orders.chunks[0].file.as_str()));
    assert!(text[1].contains("truncated: expected"), "{}", text[1]);
    assert!(text[2].contains("file CRC mismatch: expected 0x"), "{}", text[2]);
    assert_eq!(report.problems[3].file.as_deref(), Some(sales.chunks[1].file.as_str()));
    let extras: Vec<&str> = report.problems[4..].iter().filter_map(|p| p.file.as_deref()).collect();
    assert_eq!(
        extras,
        vec![
            "data/%53ales.%4Cine%20%49tems/000009.copy.zst",
            "data/public.gone",
            "data/public.orders/.000003.copy.zst.tmp-123-0",
            "data/public.orders/notes.txt",
        ]
    );
    assert!(text[6].contains("leftover temporary file"), "{}", text[6]);

    // Deep finds the same (the damaged chunks fail their file checks before decompression).
    let deep = verify_snapshot(dir.path(), VerifyMode::Deep);
    assert_eq!(kinds(&deep), kinds(&report));
}

#[test]
fn deep_finds_what_quick_cannot() {
    // A manifest whose file checks match but raw figures lie: only Deep sees it.
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = three_tables(dir.path(), Compression::Zstd { level: 1 });
    manifest.tables[0].chunks[0].rows += 1;
    manifest.tables[0].chunks[1].raw_crc32 ^= 1;
    manifest.tables[1].chunks[0].raw_bytes -= 1;
    manifest.refresh_totals();
    manifest.write_atomic(dir.path()).unwrap();
    assert!(verify_snapshot(dir.path(), VerifyMode::Quick).is_ok());
    let deep = verify_snapshot(dir.path(), VerifyMode::Deep);
    assert_eq!(
        kinds(&deep),
        vec![ProblemKind::RowCountMismatch, ProblemKind::RawCrcMismatch, ProblemKind::RawSizeMismatch],
        "{:#?}",
        deep.problems
    );

    // verify_chunk checks one chunk for apply.
    let t = &manifest.tables[0];
    let err = verify_chunk(dir.path(), t, &t.chunks[0], VerifyMode::Deep).unwrap_err();
    assert_eq!(err.kind, ProblemKind::RowCountMismatch);
    assert!(verify_chunk(dir.path(), t, &t.chunks[0], VerifyMode::Quick).is_ok());
    assert!(verify_chunk(dir.path(), t, &t.chunks[2], VerifyMode::Deep).is_ok());
}

#[test]
fn manifest_problems_and_chunk_problems_together() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = three_tables(dir.path(), Compression::None);
    // Damage a chunk, and break totals and a path in the manifest by hand.
    let victim = manifest.tables[2].chunks[0].path_in(dir.path());
    fs::write(&victim, b"x\n").unwrap();
    let mut value = serde_json::to_value(&manifest).unwrap();
    value["totals"]["rows"] = 1.into();
    value["tables"][0]["chunks"][2]["file"] = "data/../../../etc/passwd".into();
    fs::write(dir.path().join(MANIFEST_FILE), value.to_string()).unwrap();
    let report = verify_snapshot(dir.path(), VerifyMode::Quick);
    let text: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        kinds(&report),
        vec![
            ProblemKind::InvalidManifest,
            ProblemKind::InvalidManifest,
            ProblemKind::SizeMismatch,
            // The real chunk 2 of orders is now named by no (safe) manifest entry.
            ProblemKind::ExtraFile,
        ],
        "{text:#?}"
    );
    assert!(text[0].contains("chunk 2: unsafe file path"), "{}", text[0]);
    assert!(text[1].contains("totals.rows is 1"), "{}", text[1]);
    assert_eq!(report.chunks_checked, 5);
}

#[test]
fn missing_malformed_and_newer_manifest() {
    let dir = tempfile::tempdir().unwrap();
    three_tables(dir.path(), Compression::Zstd { level: 1 });
    let manifest_path = dir.path().join(MANIFEST_FILE);
    let good = fs::read(&manifest_path).unwrap();

    fs::remove_file(&manifest_path).unwrap();
    let report = verify_snapshot(dir.path(), VerifyMode::Deep);
    assert_eq!(kinds(&report), vec![ProblemKind::MissingManifest]);
    assert!(report.problems[0].detail.contains("incomplete snapshot"));
    assert!(report.manifest.is_none());

    fs::write(&manifest_path, &good[..good.len() / 2]).unwrap();
    let report = verify_snapshot(dir.path(), VerifyMode::Quick);
    assert_eq!(kinds(&report), vec![ProblemKind::MalformedManifest]);

    let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
    value["format_version"] = 2.into();
    fs::write(&manifest_path, value.to_string()).unwrap();
    let report = verify_snapshot(dir.path(), VerifyMode::Quick);
    assert_eq!(kinds(&report), vec![ProblemKind::UnsupportedFormat]);
    assert!(report.problems[0].detail.contains("newer steep-repl"));
}

#[cfg(unix)]
#[test]
fn symlinks_are_not_followed_silently() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = three_tables(dir.path(), Compression::Zstd { level: 1 });
    let chunk = manifest.tables[0].chunks[2].path_in(dir.path());
    let elsewhere = dir.path().join("elsewhere.zst");
    fs::rename(&chunk, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &chunk).unwrap();
    let report = verify_snapshot(dir.path(), VerifyMode::Quick);
    assert_eq!(kinds(&report), vec![ProblemKind::NotRegular], "{:#?}", report.problems);
}

#[test]
fn leftover_temp_files_are_reported_then_removed() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = three_tables(dir.path(), Compression::Zstd { level: 1 });
    let table_dir = dir.path().join("data").join(&manifest.tables[1].dir);
    fs::write(table_dir.join(".000001.copy.zst.tmp-99-3"), b"partial").unwrap();
    fs::write(table_dir.join(".000000.copy.zst.tmp-99-4"), b"").unwrap();
    let report = verify_snapshot(dir.path(), VerifyMode::Quick);
    assert_eq!(kinds(&report), vec![ProblemKind::ExtraFile, ProblemKind::ExtraFile]);
    assert_eq!(remove_leftover_temp_files(dir.path()).unwrap(), 2);
    assert!(verify_snapshot(dir.path(), VerifyMode::Deep).is_ok());
    assert_eq!(remove_leftover_temp_files(dir.path()).unwrap(), 0);
}

#[test]
fn open_in_refuses_paths_outside_data() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = three_tables(dir.path(), Compression::None);
    let good = &manifest.tables[0].chunks[0];
    let mut reader = ChunkReader::open_in(dir.path(), good).unwrap();
    reader.check_to_end().unwrap();
    for bad in ["../manifest.json", "/etc/passwd", "data/../manifest.json"] {
        let mut entry = good.clone();
        entry.file = bad.into();
        let err = ChunkReader::open_in(dir.path(), &entry).err().unwrap();
        assert!(err.to_string().contains("unsafe chunk path"), "{err}");
    }
}

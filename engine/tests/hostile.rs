//! A snapshot directory is untrusted input (the server reads it inside PostgreSQL): hostile manifests
//! and files give bounded, clear errors; nothing blocks, nothing leads outside the directory.

mod common;

use std::fs;
use std::os::unix::fs::symlink;

use common::{TableSpec, build_snapshot, text_rows};
use steep_repl_engine::{
    ChunkReader, Compression, MANIFEST_FILE, Manifest, ProblemKind, VerifyMode, verify_snapshot,
};

fn one_table(dir: &std::path::Path) -> Manifest {
    build_snapshot(
        dir,
        Compression::Zstd { level: 1 },
        &[TableSpec {
            schema: "public",
            name: "t",
            chunks: vec![text_rows(100, 20, 1), text_rows(50, 20, 2)],
        }],
    )
}

fn write_manifest(dir: &std::path::Path, m: &Manifest) {
    fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(m).unwrap()).unwrap();
}

#[test]
fn a_named_pipe_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let m = one_table(dir.path());
    let chunk = &m.tables[0].chunks[0];
    let path = chunk.path_in(dir.path());
    fs::remove_file(&path).unwrap();
    let status = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
    assert!(status.success());
    // Opening a pipe for reading would wait for a writer for ever; it must be refused at once.
    let Err(err) = ChunkReader::open_in(dir.path(), chunk) else { panic!("a pipe is refused") };
    let err = err.to_string();
    assert!(err.contains("not a regular file"), "{err}");
    let report = verify_snapshot(dir.path(), VerifyMode::Quick);
    assert!(report.problems.iter().any(|p| p.kind == ProblemKind::NotRegular), "{:?}", report.problems);
    // A manifest that is a pipe too.
    fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
    std::process::Command::new("mkfifo").arg(dir.path().join(MANIFEST_FILE)).status().unwrap();
    let Err(err) = Manifest::load(dir.path()) else { panic!("a pipe is refused") };
    let err = err.to_string();
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn nothing_is_read_through_a_symbolic_link() {
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = one_table(dir.path());
    let chunk = &m.tables[0].chunks[0];
    // The chunk file is a link to a file outside.
    let path = chunk.path_in(dir.path());
    fs::rename(&path, outside.path().join("x")).unwrap();
    symlink(outside.path().join("x"), &path).unwrap();
    let err = ChunkReader::open_in(dir.path(), chunk).err().unwrap().to_string();
    assert!(err.contains("symbolic link"), "{err}");
    fs::remove_file(&path).unwrap();
    fs::rename(outside.path().join("x"), &path).unwrap();
    assert!(ChunkReader::open_in(dir.path(), chunk).is_ok());
    // data/ itself is a link to a copy outside.
    let data = dir.path().join("data");
    fs::rename(&data, outside.path().join("data")).unwrap();
    symlink(outside.path().join("data"), &data).unwrap();
    let err = ChunkReader::open_in(dir.path(), chunk).err().unwrap().to_string();
    assert!(err.contains("symbolic link"), "{err}");
    let report = verify_snapshot(dir.path(), VerifyMode::Quick);
    assert!(!report.is_ok());
    assert!(
        report.problems.iter().all(|p| !p.detail.contains("CRC")),
        "nothing of the outside file may show: {:?}",
        report.problems
    );
}

#[test]
fn hostile_values_are_refused_by_validation() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = one_table(dir.path());
    m.tables[0].chunks[0].raw_bytes = 1 << 63;
    m.tables[0].chunks[1].raw_bytes = 1 << 63;
    m.refresh_totals();
    write_manifest(dir.path(), &m);
    let err = Manifest::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("more than a chunk can be"), "{err}");

    let mut m = one_table(dir.path());
    m.tables[0].chunks[0].rows = m.tables[0].chunks[0].raw_bytes + 1;
    m.refresh_totals();
    write_manifest(dir.path(), &m);
    let err = Manifest::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("every row ends in a newline"), "{err}");

    let mut m = one_table(dir.path());
    m.tables[0].columns[0].name = "a\0b".into();
    m.tables[0].name = "x".repeat(1_000_000);
    write_manifest(dir.path(), &m);
    let err = Manifest::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("NUL") && err.contains("longer than 63 bytes"), "{}", &err[..err.len().min(2000)]);
    assert!(err.len() < 10_000, "a message about a huge name stays small: {} bytes", err.len());
}

#[test]
fn a_million_problems_make_a_short_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = one_table(dir.path());
    let chunk = m.tables[0].chunks[0].clone();
    m.tables[0].chunks = vec![chunk; 200_000];
    write_manifest(dir.path(), &m);
    let err = Manifest::load(dir.path()).err().unwrap().to_string();
    assert!(err.len() < 20_000, "{} bytes", err.len());
    assert!(err.contains("more"), "{}", &err[..err.len().min(2000)]);
}

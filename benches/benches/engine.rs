//! Engine benchmarks for capacity planning; see `benches/README.md` for figures and how to use them.
//!
//! Run: `cargo bench -p steep-repl-benches` (a few minutes on 2 cores). Every group reports
//! throughput in bytes per second of the figure named in its comment, on one thread unless
//! the benchmark name says otherwise.

use std::fs;
use std::hint::black_box;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use steep_repl_benches::{mixed_input, split_at_rows, write_snapshot};
use steep_repl_engine::copy_text::{count_rows, escape_into, split_fields, split_rows, unescape_field};
use steep_repl_engine::plan::{DEFAULT_CHUNK_BYTES, TableStats, plan};
use steep_repl_engine::{
    ChunkReader, ChunkWriter, Compression, VerifyMode, VerifyOptions, chunk_rel_path, verify_snapshot_with,
};

/// Size of the writer and reader input: 64 MiB of mixed OLTP COPY text.
const INPUT_BYTES: usize = 64 * 1024 * 1024;
/// Bytes per write call for the "large writes" writer benchmarks (a COPY buffer's worth).
const WRITE_BYTES: usize = 64 * 1024;

fn configure() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

/// Writes `pieces` (one `write_all` each) as one chunk under `dir`. The previous iteration's file is
/// removed before timing: a snapshot writes new files, and replacing one would add the cost of
/// freeing the old file to the measurement.
fn bench_writer(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    dir: &Path,
    compression: Compression,
    pieces: &[&[u8]],
) {
    let rel = chunk_rel_path("public.orders", 0, &compression);
    let final_path = dir.join(&rel);
    group.bench_function(id, |b| {
        b.iter_batched(
            || match fs::remove_file(&final_path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => panic!("{e}"),
                _ => {}
            },
            |()| {
                let mut writer = ChunkWriter::create(dir, &rel, compression).expect("create");
                for piece in pieces {
                    writer.write_all(piece).expect("write");
                }
                black_box(writer.finish().expect("finish"))
            },
            BatchSize::PerIteration,
        )
    });
}

/// Throughput: raw (uncompressed) bytes in.
fn writer(c: &mut Criterion) {
    let input = mixed_input(INPUT_BYTES, 1);
    let large: Vec<&[u8]> = input.chunks(WRITE_BYTES).collect();
    // PostgreSQL's COPY TO callback hands over one row per call: the small-write path.
    let rows: Vec<&[u8]> = input.split_inclusive(|&b| b == b'\n').collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut group = c.benchmark_group("writer");
    group.throughput(Throughput::Bytes(input.len() as u64));

    // The bar: ChunkWriter at zstd:1 must reach 90% of zstd alone at level 1 into a sink.
    group.bench_function("baseline_bare_zstd1_to_sink", |b| {
        b.iter(|| {
            let mut encoder = zstd::stream::write::Encoder::new(io::sink(), 1).expect("encoder");
            encoder.write_all(&input).expect("compress");
            black_box(encoder.finish().expect("finish"));
        })
    });
    let zstd1 = Compression::Zstd { level: 1 };
    for compression in [zstd1, Compression::Zstd { level: 3 }, Compression::None] {
        let id = BenchmarkId::new("chunk_writer_64k_writes", compression);
        bench_writer(&mut group, id, dir.path(), compression, &large);
    }
    let id = BenchmarkId::new("chunk_writer_row_writes", zstd1);
    bench_writer(&mut group, id, dir.path(), zstd1, &rows);
    // The same in memory (tmpfs), where write and fsync cost no device time: the writer's CPU
    // overhead over bare compression.
    if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
        let id = BenchmarkId::new("chunk_writer_64k_writes_tmpfs", zstd1);
        bench_writer(&mut group, id, shm.path(), zstd1, &large);
    }
    group.finish();
}

/// Throughput: raw (decompressed) bytes out, read through `std::io::Read` in 64 KiB reads as the
/// apply side does, with every check.
fn reader_deep(c: &mut Criterion) {
    let input = mixed_input(INPUT_BYTES, 2);
    let mut group = c.benchmark_group("reader_deep");
    group.throughput(Throughput::Bytes(input.len() as u64));
    for compression in [Compression::Zstd { level: 1 }, Compression::None] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let manifest = write_snapshot(dir.path(), &[&input], compression).expect("snapshot");
        let entry = &manifest.tables[0].chunks[0];
        let path = entry.path_in(dir.path());
        group.bench_function(BenchmarkId::from_parameter(compression), |b| {
            let mut buf = vec![0u8; 64 * 1024];
            b.iter(|| {
                let mut reader = ChunkReader::open(&path, entry).expect("open");
                while reader.read(&mut buf).expect("read") > 0 {}
                black_box(reader.rows_read());
            })
        });
    }
    group.finish();
}

/// Throughput: quick = file bytes, deep = raw bytes; one verification thread ("per core") and
/// two threads.
fn verify(c: &mut Criterion) {
    let input = mixed_input(4 * INPUT_BYTES, 3);
    let chunks = split_at_rows(&input, 16);
    for compression in [Compression::Zstd { level: 1 }, Compression::None] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let manifest = write_snapshot(dir.path(), &chunks, compression).expect("snapshot");
        for (group_name, mode, bytes) in [
            ("verify_quick", VerifyMode::Quick, manifest.totals.file_bytes),
            ("verify_deep", VerifyMode::Deep, manifest.totals.raw_bytes),
        ] {
            let mut group = c.benchmark_group(group_name);
            group.throughput(Throughput::Bytes(bytes));
            for threads in [1, 2] {
                let options =
                    VerifyOptions { mode, threads: Some(threads), signals_to_caller: false, stop: None };
                let id = BenchmarkId::new(format!("{compression}"), format!("{threads}_threads"));
                group.bench_function(id, |b| {
                    b.iter(|| {
                        let report = verify_snapshot_with(dir.path(), &options).expect("pool");
                        assert!(report.is_ok(), "{:?}", report.problems);
                        black_box(report.chunks_checked);
                    })
                });
            }
            group.finish();
        }
    }
}

/// Throughput: tables planned.
fn planner(c: &mut Criterion) {
    const TABLES: u64 = 100_000;
    let tables: Vec<TableStats> = (0..TABLES)
        .map(|i| {
            // A skewed mix: most tables tiny, a few large (sizes from a fixed formula).
            let heap = (i * 2_654_435_761 % 1_000_003) * (1 + u64::from(i % 97 == 0) * 50_000);
            TableStats {
                schema: format!("schema_{}", i % 50),
                name: format!("table_{i}"),
                blocks: u32::try_from(heap / 8192).unwrap_or(u32::MAX),
                heap_bytes: heap,
                toast_bytes: heap / 10,
                est_rows: heap / 100,
            }
        })
        .collect();
    let mut group = c.benchmark_group("planner");
    group.throughput(Throughput::Elements(TABLES));
    group.bench_function("100k_tables_256MiB", |b| {
        b.iter(|| black_box(plan(tables.clone(), DEFAULT_CHUNK_BYTES).expect("plan").chunks.len()))
    });
    group.finish();
}

/// Throughput: unescaped value bytes in (escape), COPY text bytes in (count_rows).
fn copy_text(c: &mut Criterion) {
    let input = mixed_input(16 * 1024 * 1024, 4);
    // Realistic field values: the fixture's fields, unescaped.
    let values: Vec<Vec<u8>> = split_rows(&input).flat_map(split_fields).filter_map(unescape_field).collect();
    let value_bytes: u64 = values.iter().map(|v| v.len() as u64).sum();
    let mut group = c.benchmark_group("copy_text_escape");
    group.throughput(Throughput::Bytes(value_bytes));
    group.bench_function("escape_into_fields", |b| {
        let mut out = Vec::with_capacity(input.len());
        b.iter(|| {
            out.clear();
            for value in &values {
                escape_into(&mut out, value);
            }
            black_box(out.len());
        })
    });
    let long: Vec<u8> = values.concat();
    group.bench_function("escape_into_one_long_value", |b| {
        let mut out = Vec::with_capacity(long.len() * 2);
        b.iter(|| {
            out.clear();
            escape_into(&mut out, &long);
            black_box(out.len());
        })
    });
    group.finish();

    let mut group = c.benchmark_group("copy_text_count_rows");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("count_rows", |b| b.iter(|| black_box(count_rows(&input))));
    group.finish();
}

criterion_group! {
    name = benches;
    config = configure();
    targets = writer, reader_deep, verify, planner, copy_text
}
criterion_main!(benches);

//! Checks the writer bar on a shared machine: ChunkWriter at zstd:1 against zstd alone at level 1
//! into a byte-counting `io::sink`, on the same 64 MiB of mixed OLTP COPY text, runs interleaved
//! and the best of each kept (so load from other processes affects both sides alike).
//!
//! `cargo run --release -p steep-repl-benches --example writer_bar [rounds] [dir]`; `dir` defaults
//! to the system temporary directory (use a directory on the disk snapshots will be written to).

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Instant;

use steep_repl_benches::mixed_input;
use steep_repl_engine::{ChunkWriter, Compression, chunk_rel_path};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(12);
    let base: PathBuf = args.next().map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let input = mixed_input(64 << 20, 1);
    let mib = input.len() as f64 / (1024.0 * 1024.0);
    let compression = Compression::Zstd { level: 1 };
    let rel = chunk_rel_path("public.orders", 0, &compression);
    let dir = tempfile::tempdir_in(&base)?;

    let (mut bare, mut writer) = (f64::MAX, f64::MAX);
    let (mut bare_bytes, mut writer_bytes) = (0, 0);
    for _ in 0..rounds {
        let start = Instant::now();
        let mut encoder = zstd::stream::write::Encoder::new(CountingSink(0), 1)?;
        encoder.write_all(&input)?;
        bare_bytes = encoder.finish()?.0;
        bare = bare.min(start.elapsed().as_secs_f64());

        // A snapshot writes new files; replacing last round's file would add the cost of freeing it.
        remove_if_present(&dir.path().join(&rel))?;
        let start = Instant::now();
        let mut chunk = ChunkWriter::create(dir.path(), &rel, compression)?;
        for piece in input.chunks(64 * 1024) {
            chunk.write_all(piece)?;
        }
        writer_bytes = chunk.finish()?.file_bytes;
        writer = writer.min(start.elapsed().as_secs_f64());
    }
    let ratio = bare / writer;
    let size = |bytes: u64| format!("{bytes} bytes, {:.3}:1", input.len() as f64 / bytes as f64);
    println!("input: {mib:.0} MiB mixed OLTP COPY text; chunk files in {}", base.display());
    println!("bare zstd:1 to sink: {:.0} MiB/s ({})", mib / bare, size(bare_bytes));
    println!(
        "ChunkWriter zstd:1 (CRCs, rows, write, fsync, rename): {:.0} MiB/s ({})",
        mib / writer,
        size(writer_bytes)
    );
    println!("ratio: {:.1}% (bar 90%: {})", 100.0 * ratio, if ratio >= 0.9 { "met" } else { "not met" });
    Ok(())
}

fn remove_if_present(path: &std::path::Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `io::sink` that counts what it swallows.
struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

//! Helpers for the engine benchmarks (`benches/engine.rs`): inputs and snapshot directories.

use std::io::Write;
use std::path::Path;

use steep_repl_engine::{
    ChunkEntry, ChunkWriter, Column, Compression, FORMAT_VERSION, Manifest, Mode, Parallelism, Result,
    SnapshotInfo, Source, TableEntry, Totals, chunk_rel_path,
};
use steep_repl_fixtures::mixed_oltp_copy_text;

/// At least `bytes` of mixed OLTP COPY text, cut at a row boundary.
pub fn mixed_input(bytes: usize, seed: u64) -> Vec<u8> {
    // About 170 bytes per row; generate a little more than needed and cut after a newline.
    let mut data = mixed_oltp_copy_text(bytes / 150 + 1000, seed);
    let cut =
        data[bytes.min(data.len())..].iter().position(|&b| b == b'\n').map_or(data.len(), |p| bytes + p + 1);
    data.truncate(cut);
    data
}

/// Splits COPY text into `parts` pieces of about equal size, each ending at a row boundary.
pub fn split_at_rows(data: &[u8], parts: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(parts);
    let mut rest = data;
    for i in 0..parts {
        let left = parts - i;
        if left == 1 {
            out.push(rest);
            break;
        }
        let target = rest.len() / left;
        let cut = rest[target..].iter().position(|&b| b == b'\n').map_or(rest.len(), |p| target + p + 1);
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

/// Writes a one-table snapshot into `dir` whose chunks are `chunks`, and its manifest.
pub fn write_snapshot(dir: &Path, chunks: &[&[u8]], compression: Compression) -> Result<Manifest> {
    let mut table = TableEntry::new(
        "public",
        "orders",
        ["id", "account_id", "created_at", "amount", "status", "note", "payload"]
            .iter()
            .map(|name| Column { name: (*name).to_string(), type_name: "text".to_string() })
            .collect(),
    );
    let n = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
    for (index, data) in (0..n).zip(chunks) {
        let rel = chunk_rel_path(&table.dir, index, &compression);
        let mut writer = ChunkWriter::create(dir, &rel, compression)?;
        writer.write_all(data).map_err(|e| steep_repl_engine::Error::io("write", dir.join(&rel), e))?;
        let stats = writer.finish()?;
        let end = (index + 1 < n).then_some((index + 1) * 1000);
        table.chunks.push(ChunkEntry::from_stats(index, index * 1000, end, stats));
    }
    let now = chrono::Utc::now();
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        snapshot_id: "bench".into(),
        created_at: now,
        finished_at: now,
        source: Source {
            server_version: "16".into(),
            server_version_num: 160_000,
            database: "bench".into(),
            system_identifier: "0".into(),
        },
        snapshot: SnapshotInfo {
            lsn: "0/0".into(),
            exported_snapshot: "bench".into(),
            replication_slot: None,
            plugin: None,
        },
        settings: Default::default(),
        compression,
        parallel: Parallelism { requested: 1, used: 1 },
        chunk_size_bytes: 0,
        mode: Mode::Client,
        tables: vec![table],
        sequences: Vec::new(),
        totals: Totals::default(),
    };
    manifest.refresh_totals();
    manifest.write_atomic(dir)?;
    Ok(manifest)
}

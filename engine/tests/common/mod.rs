//! Helpers shared by the integration tests: build small snapshots on disk.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use steep_repl_engine::{
    ChunkEntry, ChunkWriter, Column, Compression, FORMAT_VERSION, Manifest, Mode, Parallelism, SnapshotInfo,
    Source, TableEntry, Totals, chunk_rel_path,
};

/// One table to write: schema, name, and the COPY text of each chunk.
pub struct TableSpec<'a> {
    pub schema: &'a str,
    pub name: &'a str,
    pub chunks: Vec<Vec<u8>>,
}

/// Writes every chunk and a valid manifest (chunk i covers blocks [i, i+1), the last open-ended).
pub fn build_snapshot(dir: &Path, compression: Compression, tables: &[TableSpec<'_>]) -> Manifest {
    let mut entries = Vec::new();
    for spec in tables {
        let mut table = TableEntry::new(
            spec.schema,
            spec.name,
            vec![Column { name: "line".into(), type_name: "text".into() }],
        );
        let n = spec.chunks.len() as u32;
        for (i, data) in spec.chunks.iter().enumerate() {
            let index = i as u32;
            let rel = chunk_rel_path(&table.dir, index, &compression);
            let mut writer = ChunkWriter::create(dir, &rel, compression).unwrap();
            writer.write_all(data).unwrap();
            let stats = writer.finish().unwrap();
            let end = if index + 1 == n { None } else { Some(index + 1) };
            table.chunks.push(ChunkEntry::from_stats(index, index, end, stats));
        }
        entries.push(table);
    }
    let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        snapshot_id: "test".into(),
        created_at: now,
        finished_at: now,
        source: Source {
            server_version: "16.2".into(),
            server_version_num: 160_002,
            database: "test".into(),
            system_identifier: "1".into(),
        },
        snapshot: SnapshotInfo {
            lsn: "0/1".into(),
            exported_snapshot: "00000003-00000002-1".into(),
            replication_slot: Some("slot".into()),
            plugin: Some("pgoutput".into()),
        },
        settings: Default::default(),
        compression,
        parallel: Parallelism { requested: 1, used: 1 },
        chunk_size_bytes: 1 << 20,
        mode: Mode::Client,
        tables: entries,
        sequences: vec![],
        totals: Totals::default(),
    };
    manifest.refresh_totals();
    manifest.write_atomic(dir).unwrap();
    manifest
}

/// `n` rows of text, `width` bytes each plus the newline, varying with `seed`.
pub fn text_rows(n: usize, width: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * (width + 1));
    for i in 0..n {
        for j in 0..width {
            out.push(b'a' + ((i + j + usize::from(seed)) % 26) as u8);
        }
        out.push(b'\n');
    }
    out
}

//! steep-repl engine: the snapshot format, in pure Rust (no PostgreSQL library).
//!
//! Shared by the `steep_repl` extension (background workers) and the `steep-repl` CLI (client mode,
//! `snapshot verify`, `snapshot inspect`), so both read and write exactly the same format
//! (PRODUCT.md §3):
//!
//! - [`copy_text`]: PostgreSQL COPY TEXT rules (escaping, rows, pinned session settings);
//! - [`plan`]: splitting tables into block-range chunks;
//! - [`naming`]: table directory and chunk file names;
//! - [`chunk`]: writing and reading checksummed, compressed chunk files;
//! - [`manifest`]: `manifest.json`, its validation and atomic writing;
//! - [`verify`]: checking a whole snapshot, quickly or deeply, in parallel;
//! - [`checkpoints`]: whether a load will force checkpoints, and the settings that avoid them;
//! - [`schema`]: schema fingerprints, read by one catalog query, and their comparison between nodes;
//! - [`overlap`]: which tables an overlap analysis compares between two nodes, and by which key;
//! - [`helper_thread`]: threads that never take the host process's signals;
//! - [`digest`]: row digests, digest files and the key-hash tree that compares a table between two
//!   servers by key without moving rows.
//!
//! # Example: write a one-table snapshot and verify it
//!
//! ```
//! use std::io::Write;
//! use steep_repl_engine::{
//!     ChunkEntry, ChunkWriter, Column, Compression, Manifest, Mode, Parallelism, SnapshotInfo,
//!     Source, TableEntry, TableStats, Totals, VerifyMode, chunk_rel_path, copy_text, plan,
//!     verify_snapshot, FORMAT_VERSION,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let compression: Compression = "zstd:1".parse()?;
//!
//! // Plan: one small table, one chunk.
//! let stats = TableStats {
//!     schema: "public".into(), name: "users".into(),
//!     blocks: 1, heap_bytes: 8192, toast_bytes: 0, est_rows: 2,
//! };
//! let plan = plan::plan(vec![stats], plan::DEFAULT_CHUNK_BYTES)?;
//!
//! let mut table = TableEntry::new("public", "users", vec![
//!     Column { name: "id".into(), type_name: "bigint".into() },
//!     Column { name: "name".into(), type_name: "text".into() },
//! ]);
//! for planned in &plan.chunks {
//!     // In the server, COPY ... TO writes these bytes.
//!     let mut rows = Vec::new();
//!     copy_text::write_row(&mut rows, &[Some(b"1"), Some(b"Ann\tLee")]);
//!     copy_text::write_row(&mut rows, &[Some(b"2"), None]);
//!
//!     let rel = chunk_rel_path(&table.dir, planned.index, &compression);
//!     let mut writer = ChunkWriter::create(dir.path(), &rel, compression)?;
//!     writer.write_all(&rows)?;
//!     let stats = writer.finish()?;
//!     table.chunks.push(ChunkEntry::from_stats(
//!         planned.index, planned.block_start, planned.block_end, stats,
//!     ));
//! }
//!
//! let now = chrono::Utc::now();
//! let mut manifest = Manifest {
//!     format_version: FORMAT_VERSION,
//!     snapshot_id: "example".into(),
//!     created_at: now,
//!     finished_at: now,
//!     source: Source {
//!         server_version: "16.2".into(), server_version_num: 160002,
//!         database: "app".into(), system_identifier: "7301234567890123456".into(),
//!     },
//!     snapshot: SnapshotInfo {
//!         lsn: "0/3000148".into(), exported_snapshot: "00000003-0000001B-1".into(),
//!         replication_slot: None,
//!         plugin: None,
//!     },
//!     settings: Default::default(),
//!     compression,
//!     parallel: Parallelism { requested: 1, used: 1 },
//!     chunk_size_bytes: plan::DEFAULT_CHUNK_BYTES,
//!     mode: Mode::Client,
//!     tables: vec![table],
//!     sequences: vec![],
//!     totals: Totals::default(),
//! };
//! manifest.refresh_totals();
//! manifest.write_atomic(dir.path())?; // last, atomically
//!
//! let report = verify_snapshot(dir.path(), VerifyMode::Deep);
//! assert!(report.is_ok(), "{:?}", report.problems);
//! assert_eq!(report.chunks_checked, 1);
//! assert_eq!(Manifest::load(dir.path())?.totals.rows, 2);
//! # Ok(())
//! # }
//! ```

pub mod catalog;
pub mod checkpoints;
pub mod chunk;
pub mod compat;
pub mod copy_text;
pub mod digest;
pub mod error;
pub mod filter;
pub mod helper_thread;
pub mod ident;
pub mod manifest;
pub mod merge;
pub mod naming;
pub mod overlap;
pub mod plan;
pub mod replica;
pub mod schedule;
pub mod schema;
pub mod space;
pub mod verify;

/// The `chrono` this crate's timestamps ([`Manifest::created_at`]) are made of.
pub use chrono;
pub use chunk::{ChunkReader, ChunkStats, ChunkWriter, Compression, remove_leftover_temp_files};
pub use error::{ChunkCheck, ChunkError, Error, ManifestError, ManifestProblem, PlanError, Result};
pub use manifest::{
    ChunkEntry, Column, FORMAT_VERSION, MANIFEST_FILE, Manifest, Mode, Parallelism, SequenceEntry,
    SnapshotInfo, Source, TableEntry, Totals,
};
pub use naming::{chunk_file_name, chunk_rel_path, parse_table_dir, table_dir};
pub use plan::{DEFAULT_CHUNK_BYTES, Plan, PlannedChunk, TableStats};
pub use verify::{
    Problem, ProblemKind, VerifyMode, VerifyOptions, VerifyReport, verify_chunk, verify_snapshot,
    verify_snapshot_with,
};

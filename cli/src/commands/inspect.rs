//! `steep-repl snapshot inspect DIR`: what a snapshot holds, from its manifest (offline).

use std::path::Path;

use serde_json::{Value, json};
use steep_repl_engine::manifest::{Manifest, Mode};

use crate::error::CliError;
use crate::output::{self, outln};

/// Describes the snapshot. A manifest that breaks a rule is still described, then the command exits 7
/// listing the problems; a missing or unreadable one exits 7 at once.
pub fn run(dir: &Path, json_out: bool) -> Result<(), CliError> {
    let m = Manifest::read(dir)
        .map_err(|e| CliError::VerifyFailed { dir: dir.to_path_buf(), problems: vec![e.to_string()] })?;
    let problems: Vec<String> = m.validate().iter().map(ToString::to_string).collect();
    let t = &m.totals;
    let mode = match m.mode {
        Mode::Direct => "direct",
        Mode::Client => "client",
    };
    let duration = (m.finished_at - m.created_at).num_milliseconds().max(0) as f64 / 1000.0;
    if json_out {
        let tables: Vec<Value> = m
            .tables
            .iter()
            .map(|x| {
                json!({
                    "schema": x.schema, "name": x.name, "columns": x.columns.len(), "chunks": x.chunks.len(),
                    "rows": x.rows, "raw_bytes": x.raw_bytes, "file_bytes": x.file_bytes,
                    "ratio": ratio(x.raw_bytes, x.file_bytes),
                })
            })
            .collect();
        outln!(
            "{}",
            json!({
                "dir": dir.display().to_string(),
                "snapshot_id": m.snapshot_id,
                "format_version": m.format_version,
                "mode": mode,
                "created_at": m.created_at,
                "finished_at": m.finished_at,
                "duration_s": duration,
                "source": m.source,
                "lsn": m.snapshot.lsn,
                "exported_snapshot": m.snapshot.exported_snapshot,
                "replication_slot": m.snapshot.replication_slot,
                "compression": m.compression.to_string(),
                "chunk_size_bytes": m.chunk_size_bytes,
                "parallel": m.parallel,
                "totals": t,
                "ratio": ratio(t.raw_bytes, t.file_bytes),
                "tables": tables,
                "sequences": m.sequences,
                "problems": problems,
            })
        );
    } else {
        let field = |k: &str, v: String| outln!("{k:<12} {v}");
        field("snapshot", format!("{} ({mode} mode, format {})", m.snapshot_id, m.format_version));
        field("directory", dir.display().to_string());
        field(
            "created",
            format!(
                "{}, finished {} ({})",
                m.created_at.to_rfc3339(),
                m.finished_at.to_rfc3339(),
                output::duration(duration)
            ),
        );
        field(
            "source",
            format!(
                "PostgreSQL {}, database {}, system identifier {}",
                m.source.server_version, m.source.database, m.source.system_identifier
            ),
        );
        field(
            "lsn",
            format!(
                "{} (exported snapshot {}, replication slot {})",
                m.snapshot.lsn,
                m.snapshot.exported_snapshot,
                m.snapshot.replication_slot.as_deref().unwrap_or("none")
            ),
        );
        field(
            "compression",
            format!(
                "{}, chunk size {}, parallel {} requested / {} used",
                m.compression,
                output::bytes(m.chunk_size_bytes),
                m.parallel.requested,
                m.parallel.used
            ),
        );
        field(
            "totals",
            format!(
                "{} tables, {} chunks, {} rows, {} COPY text, {} on disk ({})",
                t.tables,
                t.chunks,
                output::count(t.rows),
                output::bytes(t.raw_bytes),
                output::bytes(t.file_bytes),
                output::ratio(t.raw_bytes, t.file_bytes)
            ),
        );
        field("sequences", m.sequences.len().to_string());
        outln!("");
        let width = m.tables.iter().map(|x| x.label().chars().count()).max().unwrap_or(5).max(5);
        outln!(
            "{:<width$} {:>7} {:>14} {:>11} {:>11} {:>7}",
            "table",
            "chunks",
            "rows",
            "raw",
            "file",
            "ratio"
        );
        for x in &m.tables {
            outln!(
                "{:<width$} {:>7} {:>14} {:>11} {:>11} {:>7}",
                x.label(),
                x.chunks.len(),
                output::count(x.rows),
                output::bytes(x.raw_bytes),
                output::bytes(x.file_bytes),
                output::ratio(x.raw_bytes, x.file_bytes)
            );
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::VerifyFailed { dir: dir.to_path_buf(), problems })
    }
}

fn ratio(raw: u64, file: u64) -> Option<f64> {
    (file > 0).then(|| (raw as f64 / file as f64 * 100.0).round() / 100.0)
}

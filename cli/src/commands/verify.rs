//! `steep-repl snapshot verify DIR [--deep]`: the engine's verifier, offline (no connection).

use std::path::Path;

use serde_json::json;

use crate::error::CliError;
use crate::output::{self, outln};

/// Checks the snapshot; exits 7 listing every problem.
pub async fn run(dir: &Path, deep: bool, json: bool) -> Result<(), CliError> {
    use steep_repl_engine::verify::{VerifyMode, verify_snapshot};
    let mode = if deep { VerifyMode::Deep } else { VerifyMode::Quick };
    let d = dir.to_path_buf();
    let report = tokio::task::spawn_blocking(move || verify_snapshot(&d, mode))
        .await
        .map_err(|e| CliError::Other(anyhow::anyhow!("verification thread: {e}")))?;
    let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    if json {
        outln!(
            "{}",
            json!({
                "dir": dir.display().to_string(),
                "ok": report.is_ok(),
                "mode": report.mode,
                "chunks_checked": report.chunks_checked,
                "file_bytes_checked": report.file_bytes_checked,
                "raw_bytes_checked": report.raw_bytes_checked,
                "problems": report.problems,
            })
        );
    } else if report.is_ok() {
        outln!(
            "{}: ok ({} check of {} chunks, {} read{})",
            dir.display(),
            if deep { "deep" } else { "quick" },
            report.chunks_checked,
            output::bytes(report.file_bytes_checked),
            if deep {
                format!(", {} decompressed", output::bytes(report.raw_bytes_checked))
            } else {
                String::new()
            }
        );
    }
    if report.is_ok() { Ok(()) } else { Err(CliError::VerifyFailed { dir: dir.to_path_buf(), problems }) }
}

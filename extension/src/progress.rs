//! Progress: the JSON published on channel `steep_repl_progress`, its rate limit, and the periodic
//! persistence of figures into the job's row.
//!
//! Payload (PRODUCT.md §4), at most 8000 bytes (PostgreSQL's NOTIFY limit; a long error is cut):
//! `{"op","id","phase","status","percent","tables_done","tables_total","chunks_done","chunks_total",
//!   "rows","bytes","bytes_per_s","eta_s","error"}`.
//!
//! NOTIFY is transactional: it is delivered when the sending transaction commits. A generate leader holds
//! one transaction (the exported snapshot) for the whole data phase, so during that phase the data
//! workers publish, between chunks, whichever of them first moves `last_notify_ms` forward.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use serde_json::json;

use crate::bookkeeping::{self, Figures};
use crate::gucs;
use crate::shmem::{JobSlot, Phase};

/// The notification channel.
pub const CHANNEL: &str = "steep_repl_progress";
/// PostgreSQL's payload limit is 8000 bytes; stay below it.
const MAX_PAYLOAD: usize = 7900;
/// Figures are written to the job's row at most this often (and at every phase change and the end).
const PERSIST_EVERY_MS: u64 = 3_000;

/// Status text of a job in a phase.
pub fn status_of(job: &JobSlot) -> &'static str {
    match job.phase() {
        Phase::Complete => "complete",
        Phase::Applied => "applied",
        Phase::Failed => "failed",
        Phase::Cancelled => "cancelled",
        _ => "running",
    }
}

/// Percent done, from the job's work units (blocks for generate, bytes for apply).
pub fn percent(job: &JobSlot) -> f64 {
    match job.phase() {
        Phase::Complete | Phase::Applied => 100.0,
        _ => {
            let total = job.work_total.load(Ordering::Relaxed);
            let done = job.work_done.load(Ordering::Relaxed).min(total);
            if total == 0 { 0.0 } else { (done as f64 * 1000.0 / total as f64).floor() / 10.0 }
        }
    }
}

/// (bytes per second, seconds left) from the elapsed time and the work still to do.
pub fn rate_and_eta(job: &JobSlot) -> (f64, Option<f64>) {
    let elapsed_ms = crate::pg::now_ms().saturating_sub(job.started_ms.load(Ordering::Relaxed)).max(1);
    let bytes = job.raw_bytes.load(Ordering::Relaxed) as f64;
    let rate = bytes * 1000.0 / elapsed_ms as f64;
    let total = job.work_total.load(Ordering::Relaxed) as f64;
    let done = job.work_done.load(Ordering::Relaxed) as f64;
    let eta = (done > 0.0 && total > done).then(|| (total - done) / done * elapsed_ms as f64 / 1000.0);
    (rate, if job.phase().is_terminal() { Some(0.0) } else { eta })
}

/// The payload for the job's current state.
pub fn payload(job: &JobSlot) -> String {
    let f = Figures::of(job);
    let (rate, eta) = rate_and_eta(job);
    let op = job.op_name();
    let mut error = job.error_message();
    loop {
        let v = json!({
            "op": op,
            "id": job.id.get(),
            "phase": f.phase,
            "status": status_of(job),
            "percent": percent(job),
            "tables_done": f.tables_done,
            "tables_total": f.tables_total,
            "chunks_done": f.chunks_done,
            "chunks_total": f.chunks_total,
            "rows": f.rows,
            "bytes": f.bytes,
            "bytes_per_s": rate.round(),
            "eta_s": eta.map(|e| e.round()),
            "error": error,
            "warning": Some(job.warning.get()).filter(|w| !w.is_empty()),
        });
        let s = v.to_string();
        match &mut error {
            Some(e) if s.len() > MAX_PAYLOAD => {
                let cut = e.len().saturating_sub(s.len() - MAX_PAYLOAD + 3);
                let mut end = cut;
                while !e.is_char_boundary(end) {
                    end -= 1;
                }
                e.truncate(end);
                e.push_str("...");
            }
            _ => return s,
        }
    }
}

/// Sends a NOTIFY with the job's state in the current transaction (delivered at its commit).
pub fn notify(job: &JobSlot) {
    let p = payload(job);
    Spi::run_with_args("SELECT pg_catalog.pg_notify($1, $2)", &[CHANNEL.into(), p.as_str().into()])
        .unwrap_or_else(|e| error!("sending progress notification: {e}"));
}

/// If `steep_repl.progress_interval` has passed since the last notification of this job (or `force`),
/// claims the turn and sends one in a short transaction of its own, persisting figures every few
/// seconds. Must be called outside any transaction.
pub fn publish_if_due(job: &JobSlot, force: bool) {
    let now = crate::pg::now_ms();
    let phase = job.phase.load(Ordering::Acquire);
    let force = force || job.notified_phase.swap(phase, Ordering::AcqRel) != phase;
    let last = job.last_notify_ms.load(Ordering::Acquire);
    let interval = gucs::PROGRESS_INTERVAL_MS.get().max(1) as u64;
    if !force && now.saturating_sub(last) < interval {
        return;
    }
    if job.last_notify_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_err() && !force
    {
        return; // another process took this turn
    }
    let persist =
        force || now.saturating_sub(job.last_persist_ms.load(Ordering::Relaxed)) >= PERSIST_EVERY_MS;
    if persist {
        job.last_persist_ms.store(now, Ordering::Relaxed);
    }
    let id = job.id.get();
    pgrx::bgworkers::BackgroundWorker::transaction(|| {
        if persist {
            bookkeeping::persist(&id, None, &Figures::of(job));
        }
        notify(job);
    });
}

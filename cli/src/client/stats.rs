//! Live figures of a client-mode job, shared by its workers and turned into [`Update`]s for the
//! reporter every half second.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::progress::Update;

/// Counters of one job. Work units measure progress: heap blocks for generate (as the server's
/// workers count), raw bytes for apply.
pub struct Stats {
    started: Instant,
    op: &'static str,
    id: String,
    phase: Mutex<&'static str>,
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    pub file_bytes: AtomicU64,
    pub chunks_done: AtomicU64,
    pub tables_done: AtomicU64,
    /// Units of finished chunks.
    pub work_done: AtomicU64,
    /// Units of each worker's chunk in progress (an estimate).
    pub in_flight: Vec<AtomicU64>,
    pub work_total: u64,
    pub chunks_total: u64,
    pub tables_total: u64,
}

impl Stats {
    /// Counters for `workers` workers.
    pub fn new(op: &'static str, id: &str, workers: usize, totals: (u64, u64, u64)) -> Self {
        let (work_total, chunks_total, tables_total) = totals;
        Stats {
            started: Instant::now(),
            op,
            id: id.to_string(),
            phase: Mutex::new("plan"),
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            file_bytes: AtomicU64::new(0),
            chunks_done: AtomicU64::new(0),
            tables_done: AtomicU64::new(0),
            work_done: AtomicU64::new(0),
            in_flight: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            work_total,
            chunks_total,
            tables_total,
        }
    }

    /// Enters `phase`.
    pub fn set_phase(&self, phase: &'static str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
    }

    /// Seconds since the job started.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// A chunk of `units` work units finished on worker `w`.
    pub fn chunk_done(&self, w: usize, units: u64) {
        self.work_done.fetch_add(units, Ordering::Relaxed);
        if let Some(slot) = self.in_flight.get(w) {
            slot.store(0, Ordering::Relaxed);
        }
        self.chunks_done.fetch_add(1, Ordering::Relaxed);
    }

    /// The current figures, with `status`.
    pub fn update(&self, status: &str) -> Update {
        let phase = self.phase.lock().map(|p| *p).unwrap_or("data");
        let partial: u64 = self.in_flight.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        let done = (self.work_done.load(Ordering::Relaxed) + partial).min(self.work_total);
        let terminal = crate::progress::is_terminal(status);
        let percent = if status == "complete" || status == "applied" {
            100.0
        } else if self.work_total == 0 {
            0.0
        } else {
            (done as f64 * 1000.0 / self.work_total as f64).floor() / 10.0
        };
        let elapsed = self.elapsed_s().max(1e-3);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let eta = if terminal {
            Some(0.0)
        } else if done > 0 && self.work_total > done {
            Some((self.work_total - done) as f64 / done as f64 * elapsed)
        } else {
            None
        };
        Update {
            op: self.op.to_string(),
            id: self.id.clone(),
            phase: if terminal { status.to_string() } else { phase.to_string() },
            status: status.to_string(),
            percent,
            tables_done: self.tables_done.load(Ordering::Relaxed),
            tables_total: self.tables_total,
            chunks_done: self.chunks_done.load(Ordering::Relaxed),
            chunks_total: self.chunks_total,
            rows: self.rows.load(Ordering::Relaxed),
            bytes,
            bytes_per_s: (bytes as f64 / elapsed).round(),
            eta_s: eta.map(f64::round),
            error: None,
            current_tables: None,
            warning: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_eta() {
        let s = Stats::new("generate", "gen-1", 2, (200, 4, 2));
        s.set_phase("data");
        s.chunk_done(0, 50);
        s.in_flight[1].store(50, Ordering::Relaxed);
        let u = s.update("running");
        assert_eq!(u.percent, 50.0);
        assert_eq!(u.chunks_done, 1);
        assert_eq!(u.phase, "data");
        assert!(u.eta_s.is_some());
        assert_eq!(s.update("complete").percent, 100.0);
        assert_eq!(s.update("complete").phase, "complete");
    }
}

//! Progress of an operation and the three ways of showing it. Producers (the direct-mode follower, the
//! client-mode engine) build [`Update`]s and a final [`Summary`]; a [`Reporter`] decides how they look:
//!
//! - [`BarReporter`]: a live indicatif bar on a terminal (stderr): phase, percent, rows, MB/s, ETA,
//!   tables and chunks;
//! - [`PlainReporter`]: a line on stderr every few seconds and on every phase change, for logs;
//! - [`JsonReporter`]: one JSON object per line on stdout: `{"event":"started",...}`, then
//!   `{"event":"progress",...}` for every change (the NOTIFY payload's fields), then
//!   `{"event":"summary",...}`;
//! - [`QuietReporter`]: no progress at all, for commands whose `--json` output is one document at the
//!   end (`overlap`); notes still go to stderr.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::output;

/// Seconds between two plain progress lines (a phase change prints at once).
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// One observation of an operation: the fields of the `steep_repl_progress` payload (PRODUCT.md §4),
/// also what `snapshot_progress()` returns and what client mode computes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Update {
    pub op: String,
    pub id: String,
    pub phase: String,
    pub status: String,
    pub percent: f64,
    pub tables_done: u64,
    pub tables_total: u64,
    pub chunks_done: u64,
    pub chunks_total: u64,
    pub rows: u64,
    pub bytes: u64,
    pub bytes_per_s: f64,
    pub eta_s: Option<f64>,
    pub error: Option<String>,
    /// Tables being worked on now, when the source says (`snapshot_progress` does, NOTIFY does not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_tables: Option<Vec<String>>,
    /// What the user should know that does not stop the operation (an apply that will force checkpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl Update {
    /// Reads a payload or a row turned into JSON; `None` when it is not an object with an `id`.
    pub fn from_json(v: &Value) -> Option<Update> {
        let obj = v.as_object()?;
        let text = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        let num = |k: &str| obj.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let whole = |k: &str| num(k).max(0.0) as u64;
        let id = obj.get("id")?.as_str()?.to_string();
        Some(Update {
            op: text("op"),
            id,
            phase: text("phase"),
            status: text("status"),
            percent: num("percent"),
            tables_done: whole("tables_done"),
            tables_total: whole("tables_total"),
            chunks_done: whole("chunks_done"),
            chunks_total: whole("chunks_total"),
            rows: whole("rows"),
            bytes: whole("bytes"),
            bytes_per_s: num("bytes_per_s"),
            eta_s: obj.get("eta_s").and_then(Value::as_f64),
            error: obj.get("error").and_then(Value::as_str).map(str::to_string),
            current_tables: obj
                .get("current_tables")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()),
            warning: obj.get("warning").and_then(Value::as_str).filter(|w| !w.is_empty()).map(str::to_string),
        })
    }

    /// True when the operation has ended: complete (generate), applied (apply), failed or cancelled.
    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.status)
    }
}

/// True for the statuses an operation ends in.
pub fn is_terminal(status: &str) -> bool {
    matches!(status, "complete" | "applied" | "failed" | "cancelled")
}

/// How an operation was started, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct Started {
    pub op: String,
    pub id: String,
    /// `direct` or `client`.
    pub mode: String,
    /// Snapshot directory (on the server in direct mode).
    pub path: Option<String>,
    /// Why this mode, in words.
    pub reason: String,
}

/// The outcome of an operation, shown once at the end (also when it failed or was cancelled).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub op: String,
    pub id: String,
    pub mode: String,
    pub status: String,
    pub path: Option<String>,
    pub error: Option<String>,
    pub exit_code: u8,
    pub elapsed_s: f64,
    pub tables: u64,
    pub chunks: u64,
    pub rows: u64,
    /// Uncompressed COPY text bytes.
    pub bytes: u64,
    /// Chunk file bytes (written by generate, read by apply).
    pub bytes_written: u64,
    pub bytes_per_s: f64,
}

impl Summary {
    /// The summary of a client-mode `op` that ended with `error` (cancelled or failed) after `elapsed_s`.
    pub fn failed(
        op: &str,
        id: String,
        path: String,
        error: &crate::error::CliError,
        elapsed_s: f64,
    ) -> Summary {
        let cancelled = matches!(error, crate::error::CliError::Cancelled { .. });
        Summary {
            op: op.into(),
            id,
            mode: "client".into(),
            status: if cancelled { "cancelled" } else { "failed" }.into(),
            path: Some(path),
            error: Some(error.to_string()),
            exit_code: error.exit_code(),
            elapsed_s,
            tables: 0,
            chunks: 0,
            rows: 0,
            bytes: 0,
            bytes_written: 0,
            bytes_per_s: 0.0,
        }
    }
}

/// Where progress goes.
pub trait Reporter: Send {
    /// The operation started.
    fn started(&mut self, s: &Started);
    /// A new observation (possibly unchanged).
    fn update(&mut self, u: &Update);
    /// A remark for the user (reconnecting, server notices, mode choice); always on stderr.
    fn note(&mut self, msg: &str);
    /// The operation ended.
    fn finish(&mut self, s: &Summary);
}

/// The reporter for this process: JSON when asked, a bar on a terminal, plain lines otherwise.
pub fn reporter(json: bool) -> Box<dyn Reporter> {
    if json {
        Box::new(JsonReporter::default())
    } else if std::io::stderr().is_terminal() {
        Box::new(BarReporter::new())
    } else {
        Box::new(PlainReporter::new())
    }
}

fn eprint_line(msg: &str) {
    let mut err = std::io::stderr().lock();
    if writeln!(err, "{msg}").is_err() {
        // stderr is gone; nothing else can report it.
    }
}

fn print_line(msg: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{msg}").and_then(|()| out.flush()).is_err() {
        // stdout closed (e.g. `| head`): the exit code still tells the outcome.
    }
}

/// `12.3% · 1,234 rows · 45.6 MB/s · ETA 1m05s · tables 3/10 · chunks 12/40`; for an overlap analysis
/// (no chunks; its bytes are what crossed the network) `12.3% · 1,234 rows · 4.5 KiB exchanged · tables 3/10`.
fn figures(u: &Update) -> String {
    let eta = match u.eta_s {
        Some(e) if !u.is_terminal() && u.percent > 0.0 => format!(" · ETA {}", output::duration(e)),
        _ => String::new(),
    };
    if u.op == "overlap" {
        return format!(
            "{:.1}% · {} rows · {} exchanged{eta} · tables {}/{}",
            u.percent,
            output::count(u.rows),
            output::bytes(u.bytes),
            u.tables_done,
            u.tables_total
        );
    }
    format!(
        "{:.1}% · {} rows · {}{eta} · tables {}/{} · chunks {}/{}",
        u.percent,
        output::count(u.rows),
        output::rate(u.bytes_per_s),
        u.tables_done,
        u.tables_total,
        u.chunks_done,
        u.chunks_total
    )
}

fn started_line(s: &Started) -> String {
    let path = s.path.as_deref().map(|p| format!(" at {p}")).unwrap_or_default();
    format!("{} {} started{path} ({} mode: {})", s.op, s.id, s.mode, s.reason)
}

fn summary_line(s: &Summary) -> String {
    if s.op == "overlap" {
        return format!(
            "overlap {} {} in {} ({} mode): {} tables compared, {} rows hashed, {} exchanged",
            s.id,
            s.status,
            output::duration(s.elapsed_s),
            s.mode,
            s.tables,
            output::count(s.rows),
            output::bytes(s.bytes)
        );
    }
    let what = if s.op == "apply" { "loaded" } else { "written" };
    format!(
        "{} {} {} in {} ({} mode): {} tables, {} chunks, {} rows, {} of COPY text, {} {what} ({}), {}",
        s.op,
        s.id,
        s.status,
        output::duration(s.elapsed_s),
        s.mode,
        s.tables,
        s.chunks,
        output::count(s.rows),
        output::bytes(s.bytes),
        output::bytes(s.bytes_written),
        output::ratio(s.bytes, s.bytes_written),
        output::rate(s.bytes_per_s)
    )
}

/// A live bar on stderr.
pub struct BarReporter {
    bar: ProgressBar,
    /// The tables last reported as being worked on (kept across updates that do not say).
    current: Vec<String>,
}

impl BarReporter {
    fn new() -> Self {
        let bar = ProgressBar::with_draw_target(Some(1000), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{spinner} {prefix} [{bar:20}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        BarReporter { bar, current: Vec::new() }
    }
}

impl Reporter for BarReporter {
    fn started(&mut self, s: &Started) {
        self.bar.println(started_line(s));
        self.bar.set_prefix(format!("{:<10}", "starting"));
    }

    fn update(&mut self, u: &Update) {
        self.bar.set_prefix(format!("{:<10}", u.phase));
        self.bar.set_position((u.percent.clamp(0.0, 100.0) * 10.0) as u64);
        if let Some(t) = &u.current_tables {
            self.current = t.clone();
        }
        let now = if self.current.is_empty() || u.is_terminal() {
            String::new()
        } else {
            format!(" · on {}", self.current.join(", "))
        };
        self.bar.set_message(format!("{}{now}", figures(u)));
    }

    fn note(&mut self, msg: &str) {
        self.bar.println(msg);
    }

    fn finish(&mut self, s: &Summary) {
        self.bar.finish_and_clear();
        if s.exit_code == 0 {
            print_line(&summary_line(s));
        }
    }
}

/// Plain lines on stderr every few seconds and at every phase change.
pub struct PlainReporter {
    start: Instant,
    last_at: Option<Instant>,
    last_phase: String,
}

impl PlainReporter {
    fn new() -> Self {
        PlainReporter { start: Instant::now(), last_at: None, last_phase: String::new() }
    }
}

impl Reporter for PlainReporter {
    fn started(&mut self, s: &Started) {
        eprint_line(&started_line(s));
    }

    fn update(&mut self, u: &Update) {
        let due = self.last_at.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
        if !due && u.phase == self.last_phase && !u.is_terminal() {
            return;
        }
        self.last_at = Some(Instant::now());
        self.last_phase.clone_from(&u.phase);
        eprint_line(&format!(
            "[{:>7}] {} {} {}",
            output::duration(self.start.elapsed().as_secs_f64()),
            u.id,
            u.phase,
            figures(u)
        ));
    }

    fn note(&mut self, msg: &str) {
        eprint_line(msg);
    }

    fn finish(&mut self, s: &Summary) {
        if s.exit_code == 0 {
            print_line(&summary_line(s));
        }
    }
}

/// One JSON object per line on stdout.
#[derive(Default)]
pub struct JsonReporter {
    last: Option<Update>,
}

fn tagged(event: &str, value: impl Serialize) -> String {
    let mut map = Map::new();
    map.insert("event".into(), Value::from(event));
    if let Ok(Value::Object(fields)) = serde_json::to_value(value) {
        map.extend(fields);
    }
    Value::Object(map).to_string()
}

impl Reporter for JsonReporter {
    fn started(&mut self, s: &Started) {
        // Which mode and why goes to stderr in every output style.
        eprint_line(&started_line(s));
        print_line(&tagged("started", s));
    }

    fn update(&mut self, u: &Update) {
        if self.last.as_ref() == Some(u) {
            return;
        }
        print_line(&tagged("progress", u));
        self.last = Some(u.clone());
    }

    fn note(&mut self, msg: &str) {
        eprint_line(msg);
    }

    fn finish(&mut self, s: &Summary) {
        print_line(&tagged("summary", s));
    }
}

/// No progress: which mode and why, and notes, on stderr; nothing on stdout (the command prints its
/// own document at the end).
pub struct QuietReporter;

impl Reporter for QuietReporter {
    fn started(&mut self, s: &Started) {
        eprint_line(&started_line(s));
    }

    fn update(&mut self, _u: &Update) {}

    fn note(&mut self, msg: &str) {
        eprint_line(msg);
    }

    fn finish(&mut self, _s: &Summary) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_parses() {
        let v: Value = serde_json::from_str(
            r#"{"op":"generate","id":"gen-1","phase":"data","status":"running","percent":42.5,
                "tables_done":1,"tables_total":3,"chunks_done":4,"chunks_total":9,"rows":1000,
                "bytes":123456,"bytes_per_s":2000000.0,"eta_s":12.0,"error":null}"#,
        )
        .unwrap();
        let u = Update::from_json(&v).unwrap();
        assert_eq!(u.id, "gen-1");
        assert_eq!(u.chunks_total, 9);
        assert_eq!(u.eta_s, Some(12.0));
        assert!(!u.is_terminal());
        let line = figures(&u);
        assert!(line.starts_with("42.5% · 1,000 rows · 2.0 MB/s · ETA 12s"), "{line}");
        assert!(Update::from_json(&serde_json::json!({"no": "id"})).is_none());
        let tagged = tagged("progress", &u);
        assert!(tagged.starts_with(r#"{"event":"progress","op":"generate""#), "{tagged}");
    }

    #[test]
    fn overlap_figures() {
        let v = serde_json::json!({"op": "overlap", "id": "ovl-1", "phase": "compare", "status": "running",
            "percent": 50.0, "tables_done": 2, "tables_total": 4, "rows": 12345, "bytes": 2048});
        let u = Update::from_json(&v).unwrap();
        assert_eq!(figures(&u), "50.0% · 12,345 rows · 2.0 KiB exchanged · tables 2/4");
    }
}

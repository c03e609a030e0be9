//! The node registry (PRODUCT.md §8): what a probe asks a peer and what its answer means. Probes go
//! through [`crate::peer`]; their outcomes are stored by [`crate::bookkeeping::nodes`]. Who probes: the
//! supervisor's prober every `steep_repl.heartbeat_interval` (`crate::worker::prober`), and
//! `steep_repl.heartbeat(node_id)` on demand.

use std::time::{Duration, Instant};

use crate::peer::{self, Op, PeerError, Rows};

/// Failed probes in a row after which a peer is `unreachable`.
pub const UNREACHABLE_AFTER: i32 = 3;

/// The probe's first statement: the peer's clock, alone, so that its round trip is the network's and
/// the clock offset is measured over it.
pub const CLOCK_SQL: &str = "SELECT (pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) \
     OPERATOR(pg_catalog.*) 1000)::pg_catalog.float8 AS now_ms";

/// The probe's second statement: the peer's version, its steep_repl health and replication state.
/// Every name is qualified (and the session's search path is pinned by `crate::peer` before it runs).
pub const PROBE_SQL: &str = "SELECT pg_catalog.current_setting('server_version') AS server_version, \
     (SELECT pg_catalog.row_to_json(h)::pg_catalog.text FROM steep_repl.health() h) AS health, \
     steep_repl.replication_state()::pg_catalog.text AS replication";

/// The longest text kept of a peer's answer field or error (a peer is hostile input like any file).
const MAX_FIELD: usize = 2000;
/// The longest health/replication document kept from a peer.
const MAX_DOCUMENT: usize = 256 * 1024;

/// What a probe of a peer found.
#[derive(Debug)]
pub enum Outcome {
    /// The peer answered: `healthy`, or `degraded` with the reason in `error`.
    Answered(Answer),
    /// The peer could not be reached, or did not answer in time.
    Failed { error: String },
    /// The probe was stopped (shutdown, query cancel) before it ended: nothing is known.
    Interrupted,
}

/// A peer's answer to [`PROBE_SQL`].
#[derive(Debug, Default)]
pub struct Answer {
    /// `healthy` or `degraded`.
    pub status: &'static str,
    /// None when not measured (the peer answered with an error).
    pub rtt_ms: Option<f64>,
    /// The peer's clock minus ours, estimated at the middle of the round trip.
    pub clock_offset_ms: Option<f64>,
    pub server_version: Option<String>,
    pub system_identifier: Option<i64>,
    pub extension_version: Option<String>,
    /// Why the peer is `degraded`.
    pub error: Option<String>,
    /// `{"health": ..., "replication": ...}` as the peer reported them (JSON text).
    pub peer_health: Option<String>,
}

/// A peer's text made safe to store: no NUL (PostgreSQL text cannot hold one), at most `max` bytes.
fn cut(s: &str, max: usize) -> String {
    let s: String = s.chars().filter(|&c| c != '\0').collect();
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A peer's JSON made safe to store as jsonb: every string without NUL (jsonb refuses `\u0000`).
fn clean_json(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(s.replace('\0', "")),
        Value::Array(a) => Value::Array(a.into_iter().map(clean_json).collect()),
        Value::Object(o) => {
            Value::Object(o.into_iter().map(|(k, v)| (k.replace('\0', ""), clean_json(v))).collect())
        }
        other => other,
    }
}

/// Probes every peer `(node_id, conninfo)` at once; each ends by `timeout`. `interrupt` is checked at
/// least every [`peer::SLICE`]; when it fails, the unfinished probes fail with its error.
pub fn probe_all(
    peers: &[(String, String)],
    timeout: Duration,
    interrupt: &mut dyn FnMut() -> Result<(), PeerError>,
) -> Vec<(String, Outcome)> {
    let mut ops: Vec<Op> = peers.iter().map(|(_, c)| Op::new(c, &[CLOCK_SQL, PROBE_SQL])).collect();
    peer::run_all(&mut ops, Instant::now() + timeout, interrupt);
    peers.iter().zip(ops).map(|((id, _), op)| (id.clone(), interpret(&op))).collect()
}

/// What a finished probe means.
fn interpret(op: &Op) -> Outcome {
    match op.outcome() {
        Err(e @ PeerError::Statement(_)) => {
            // Reached, but the probe failed there (steep_repl missing or broken): degraded.
            Outcome::Answered(Answer {
                status: "degraded",
                error: Some(cut(&format!("the probe failed on the peer: {e}"), MAX_FIELD)),
                ..Answer::default()
            })
        }
        Err(PeerError::Interrupted(_)) => Outcome::Interrupted,
        Err(e) => Outcome::Failed { error: cut(&e.to_string(), MAX_FIELD) },
        Ok(()) => match op.rows() {
            [clock, rows] if !clock.rows.is_empty() && !rows.rows.is_empty() => {
                Outcome::Answered(answer(clock, rows))
            }
            _ => Outcome::Answered(Answer {
                status: "degraded",
                error: Some("the peer's probe returned no row".into()),
                ..Answer::default()
            }),
        },
    }
}

fn answer(clock: &Rows, rows: &Rows) -> Answer {
    let rtt = clock.elapsed.as_secs_f64() * 1000.0;
    let peer_now = clock.get(0, "now_ms").and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite());
    let clock_offset_ms = peer_now.map(|p| p - (clock.sent_unix_ms + rtt / 2.0));
    let rtt_ms = Some(rtt);
    let health: Option<serde_json::Value> =
        rows.get(0, "health").filter(|h| h.len() <= MAX_DOCUMENT).and_then(|h| serde_json::from_str(h).ok());
    let replication: Option<serde_json::Value> = rows
        .get(0, "replication")
        .filter(|h| h.len() <= MAX_DOCUMENT)
        .and_then(|h| serde_json::from_str(h).ok())
        .map(clean_json);
    let field =
        |k: &str| health.as_ref().and_then(|h| h.get(k)).and_then(|v| v.as_str()).map(|s| cut(s, MAX_FIELD));
    let peer_status = field("status");
    let system_identifier = health
        .as_ref()
        .and_then(|h| h.get("system_identifier"))
        .and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())));
    let (status, error) = match peer_status.as_deref() {
        Some("ok") => ("healthy", None),
        Some(other) => ("degraded", Some(format!("the peer's steep_repl reports: {other}"))),
        None => ("degraded", Some("the peer's health() gave no status".to_string())),
    };
    let doc = serde_json::json!({ "health": health, "replication": replication });
    Answer {
        status,
        rtt_ms,
        clock_offset_ms,
        server_version: rows.get(0, "server_version").map(|s| cut(s, MAX_FIELD)),
        system_identifier,
        extension_version: field("extension_version"),
        error,
        peer_health: Some(doc.to_string()),
    }
}

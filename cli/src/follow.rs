//! Following a server-side operation (direct mode and `snapshot progress --follow`).
//!
//! The follower LISTENs on `steep_repl_progress` (keeping the notifications whose `id` is the
//! operation's) for promptness, and also polls `steep_repl.snapshot_progress(id)` every
//! [`POLL_EVERY`] for liveness: during a generate's data phase the server only notifies between
//! chunks. When the operation reaches a terminal status it reads the persisted row
//! (`wait_snapshot`) for the summary. A lost connection is re-established with a bounded backoff
//! and following resumes; Ctrl-C (or SIGTERM) detaches without cancelling and a `--timeout` stops
//! waiting, both naming the commands that follow or cancel the operation.

use std::time::Duration;

use serde_json::Value;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_postgres::Client;

use crate::conn::{ConnSpec, Listener, ServerEvent};
use crate::error::{
    CliError, EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, EXIT_VERIFY_FAILED, VERIFICATION_FAILED_PREFIX,
};
use crate::output::{self, shell_quote};
use crate::progress::{Reporter, Summary, Update};
use crate::signals::Interrupt;

/// The channel steep_repl publishes progress on (PRODUCT.md §4).
pub const CHANNEL: &str = "steep_repl_progress";
/// How often `snapshot_progress(id)` is polled besides listening (about the server's NOTIFY interval).
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// A poll that takes longer than this is treated as a lost connection.
const POLL_TIMEOUT: Duration = Duration::from_secs(15);
/// Reconnection attempts before giving up (about a minute in all with the backoff below).
const RECONNECT_ATTEMPTS: u32 = 10;
/// First and longest pause between reconnection attempts (doubling in between).
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// How long to wait for the persisted row once the live status is terminal.
const FINAL_WAIT_S: i32 = 60;

/// The persisted outcome of an operation (its `steep_repl.snapshots` row).
#[derive(Debug, Clone)]
pub struct Final {
    pub op: String,
    pub status: String,
    pub path: String,
    pub error: Option<String>,
    pub rows: u64,
    pub bytes: u64,
    pub bytes_written: u64,
    pub chunks_done: u64,
    pub tables_done: u64,
    pub elapsed_s: f64,
}

impl Final {
    /// Reports the outcome and turns it into the command's result (exit codes of §5).
    pub fn conclude(self, id: &str, mode: &str, reporter: &mut dyn Reporter) -> Result<(), CliError> {
        let exit_code = match self.status.as_str() {
            "complete" | "applied" => EXIT_OK,
            "cancelled" => EXIT_CANCELLED,
            _ if self.error.as_deref().is_some_and(|e| e.starts_with(VERIFICATION_FAILED_PREFIX)) => {
                EXIT_VERIFY_FAILED
            }
            _ => EXIT_ERROR,
        };
        reporter.finish(&Summary {
            op: self.op.clone(),
            id: id.to_string(),
            mode: mode.to_string(),
            status: self.status.clone(),
            path: Some(self.path.clone()),
            error: self.error.clone(),
            exit_code,
            elapsed_s: self.elapsed_s,
            tables: self.tables_done,
            chunks: self.chunks_done,
            rows: self.rows,
            bytes: self.bytes,
            bytes_written: self.bytes_written,
            bytes_per_s: if self.elapsed_s > 0.0 { self.bytes as f64 / self.elapsed_s } else { 0.0 },
        });
        match self.status.as_str() {
            "complete" | "applied" => Ok(()),
            "cancelled" => Err(CliError::Cancelled { op: self.op, id: id.to_string(), detail: self.error }),
            _ => Err(CliError::JobFailed {
                op: self.op,
                id: id.to_string(),
                error: self.error.unwrap_or_else(|| format!("ended as {}", self.status)),
            }),
        }
    }
}

/// The commands that follow or cancel operation `id` on this server (no password in them).
pub fn hints(conn: &ConnSpec, id: &str) -> Vec<String> {
    let d = shell_quote(&conn.public_conninfo());
    vec![
        format!("follow it: steep-repl snapshot progress {id} --follow -d {d}"),
        format!("cancel it: steep-repl snapshot cancel {id} -d {d}"),
    ]
}

/// What to follow and how.
pub struct Follow<'a> {
    pub conn: &'a ConnSpec,
    pub id: &'a str,
    /// Stop following after this long (exit 5).
    pub timeout: Option<Duration>,
    pub reporter: &'a mut dyn Reporter,
    pub interrupt: &'a mut Interrupt,
}

enum Step {
    Event(Option<ServerEvent>),
    Tick,
}

/// Follows the operation until it ends and returns its persisted row. `listener` is a connection that
/// already LISTENs on [`CHANNEL`] (one is opened when `None`).
pub async fn follow(f: Follow<'_>, listener: Option<Listener>) -> Result<Final, CliError> {
    let Follow { conn, id, timeout: limit, reporter, interrupt } = f;
    let deadline = limit.map(|t| Instant::now() + t);
    let mut listener = match listener {
        Some(l) => l,
        None => conn.connect_listening(CHANNEL).await?,
    };
    // A warning is shown once, whether it came as a server WARNING (start_apply raises it) or in progress.
    let mut warned: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let step = tokio::select! {
            biased;
            _ = interrupt.recv() => return Err(CliError::Detached { id: id.to_string(), hints: hints(conn, id) }),
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                return Err(CliError::TimedOut {
                    id: id.to_string(),
                    seconds: limit.map(|t| t.as_secs()).unwrap_or(0),
                    hints: hints(conn, id),
                });
            }
            ev = listener.events.recv() => Step::Event(ev),
            _ = tick.tick() => Step::Tick,
        };
        let update = match step {
            Step::Event(Some(ServerEvent::Notification { channel, payload })) if channel == CHANNEL => {
                match serde_json::from_str::<Value>(&payload).ok().as_ref().and_then(Update::from_json) {
                    Some(u) if u.id == id => Some(u),
                    _ => None,
                }
            }
            Step::Event(Some(ServerEvent::Notification { .. })) => None,
            Step::Event(Some(ServerEvent::Notice(msg))) => {
                reporter.note(&format!("server {msg}"));
                warned.push(msg);
                None
            }
            Step::Event(Some(ServerEvent::Lost(reason))) => {
                listener = reconnect(conn, id, &reason, reporter, interrupt).await?;
                None
            }
            Step::Event(None) => {
                listener = reconnect(conn, id, "connection closed", reporter, interrupt).await?;
                None
            }
            Step::Tick => match timeout(POLL_TIMEOUT, poll(&listener.client, id)).await {
                Ok(Ok(u)) => Some(u),
                Ok(Err(e)) if e.is_connection_lost() => {
                    listener = reconnect(conn, id, &e.to_string(), reporter, interrupt).await?;
                    None
                }
                Ok(Err(e)) => return Err(e),
                Err(_elapsed) => {
                    let reason = format!("no answer within {} s", POLL_TIMEOUT.as_secs());
                    listener = reconnect(conn, id, &reason, reporter, interrupt).await?;
                    None
                }
            },
        };
        if let Some(u) = update {
            if let Some(w) = u.warning.as_deref().filter(|w| !warned.iter().any(|seen| seen.contains(w))) {
                reporter.note(&format!("server WARNING: {w}"));
                warned.push(w.to_string());
            }
            reporter.update(&u);
            if u.is_terminal() {
                break;
            }
        }
    }
    loop {
        match final_row(&listener.client, id).await {
            Ok(row) => return Ok(row),
            Err(e) if e.is_connection_lost() => {
                listener = reconnect(conn, id, &e.to_string(), reporter, interrupt).await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The live progress of `id` (or its persisted figures once it has ended).
pub async fn poll(client: &Client, id: &str) -> Result<Update, CliError> {
    let row = client
        .query_opt("SELECT * FROM steep_repl.snapshot_progress($1)", &[&id])
        .await
        .map_err(CliError::query(format!("steep_repl.snapshot_progress('{id}')")))?
        .ok_or_else(|| CliError::Other(anyhow::anyhow!("no operation with id {id:?}")))?;
    Update::from_json(&Value::Object(output::row_to_json(&row)))
        .ok_or_else(|| CliError::Other(anyhow::anyhow!("snapshot_progress('{id}') returned no id")))
}

/// The persisted row of an operation that has ended.
async fn final_row(client: &Client, id: &str) -> Result<Final, CliError> {
    let row = client
        .query_one(
            "SELECT w.op, w.status, w.path, w.error, w.rows_done, w.bytes_done, w.bytes_written, \
                    w.chunks_done::int8, \
                    (CASE WHEN w.status IN ('complete', 'applied') \
                          THEN greatest(w.tables_done, w.tables_total) ELSE w.tables_done END)::int8, \
                    coalesce(extract(epoch FROM w.finished_at - w.started_at), 0)::float8 \
             FROM steep_repl.wait_snapshot($1, $2) w",
            &[&id, &FINAL_WAIT_S],
        )
        .await
        .map_err(CliError::query(format!("steep_repl.wait_snapshot('{id}')")))?;
    let n = |i: usize| row.try_get::<_, Option<i64>>(i).ok().flatten().unwrap_or(0).max(0) as u64;
    Ok(Final {
        op: row.try_get(0).unwrap_or_default(),
        status: row.try_get(1).unwrap_or_default(),
        path: row.try_get(2).unwrap_or_default(),
        error: row.try_get(3).ok().flatten(),
        rows: n(4),
        bytes: n(5),
        bytes_written: n(6),
        chunks_done: n(7),
        tables_done: n(8),
        elapsed_s: row.try_get::<_, Option<f64>>(9).ok().flatten().unwrap_or(0.0),
    })
}

/// Re-establishes the listening connection with a bounded exponential backoff.
async fn reconnect(
    conn: &ConnSpec,
    id: &str,
    reason: &str,
    reporter: &mut dyn Reporter,
    interrupt: &mut Interrupt,
) -> Result<Listener, CliError> {
    let mut delay = BACKOFF_FIRST;
    let mut last = reason.to_string();
    for attempt in 1..=RECONNECT_ATTEMPTS {
        reporter.note(&format!(
            "connection lost ({last}); reconnecting in {} (attempt {attempt}/{RECONNECT_ATTEMPTS})",
            output::duration(delay.as_secs_f64())
        ));
        tokio::select! {
            _ = interrupt.recv() => return Err(CliError::Detached { id: id.to_string(), hints: hints(conn, id) }),
            _ = sleep(delay) => {}
        }
        match conn.connect_listening(CHANNEL).await {
            Ok(l) => {
                reporter.note(&format!("reconnected; following {id} again"));
                return Ok(l);
            }
            Err(e) => last = e.to_string(),
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
    Err(CliError::ConnectionLost {
        target: conn.target(),
        id: id.to_string(),
        reason: last,
        hints: hints(conn, id),
    })
}

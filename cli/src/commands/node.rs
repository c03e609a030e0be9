//! `steep-repl node register|unregister|list|status|heartbeat`: the node registry, which lives in the
//! server (`steep_repl.nodes`, probed by the supervisor); every subcommand is one SQL call.

use serde_json::{Map, Value};

use crate::config::NodeAction;
use crate::conn::ConnSpec;
use crate::error::CliError;
use crate::output::{self, outln};

/// Text casts keep the types the CLI converts to JSON to a few plain ones.
const STATUS_SQL: &str = "\
SELECT node_id, name, status, to_char(last_seen, 'YYYY-MM-DD HH24:MI:SSOF') AS last_seen,
       seconds_since_seen, rtt_ms, clock_offset_ms, server_version, extension_version,
       replication::text AS replication
FROM steep_repl.node_status($1)";

const LIST_SQL: &str = "\
SELECT node_id, name, is_local, priority, status, conninfo,
       to_char(last_seen, 'YYYY-MM-DD HH24:MI:SSOF') AS last_seen, failures, last_error
FROM steep_repl.nodes ORDER BY is_local DESC, priority DESC, node_id";

const REGISTER_SQL: &str = "\
SELECT node_id, name, conninfo, priority, is_local, status,
       to_char(registered_at, 'YYYY-MM-DD HH24:MI:SSOF') AS registered_at
FROM steep_repl.register_node($1, $2, $3, $4, $5)";

pub async fn run(conn: &ConnSpec, action: NodeAction, json: bool) -> Result<(), CliError> {
    let client = conn.connect().await?;
    match action {
        NodeAction::Register { id, name, conninfo, priority, local } => {
            let row = client
                .query_one(REGISTER_SQL, &[&id, &name, &conninfo, &priority, &local])
                .await
                .map_err(CliError::query(format!("registering node {id}")))?;
            let fields = output::row_to_json(&row);
            if json {
                outln!("{}", Value::Object(fields));
            } else {
                outln!("registered node {id}");
                output::print_fields(&fields);
            }
            Ok(())
        }
        NodeAction::Unregister { id } => {
            let removed: bool = client
                .query_one("SELECT steep_repl.unregister_node($1)", &[&id])
                .await
                .map_err(CliError::query(format!("unregistering node {id}")))?
                .get(0);
            if json {
                outln!("{}", serde_json::json!({ "node_id": id, "unregistered": removed }));
            }
            if !removed {
                return Err(CliError::Other(anyhow::anyhow!("no node {id} is registered")));
            }
            if !json {
                outln!("unregistered node {id}");
            }
            Ok(())
        }
        NodeAction::List => {
            let rows = client.query(LIST_SQL, &[]).await.map_err(CliError::query(
                "reading steep_repl.nodes (it needs the rights of a superuser; \
                 `steep-repl node status` shows the nodes to every role)",
            ))?;
            let objects: Vec<Map<String, Value>> = rows.iter().map(output::row_to_json).collect();
            if json {
                outln!("{}", Value::Array(objects.into_iter().map(Value::Object).collect()));
                return Ok(());
            }
            if objects.is_empty() {
                outln!("no nodes registered");
                return Ok(());
            }
            outln!(
                "{:<20} {:<6} {:>4} {:<12} {:<25}  name / conninfo",
                "node",
                "local",
                "prio",
                "status",
                "last seen"
            );
            for o in &objects {
                let local = if o.get("is_local") == Some(&Value::Bool(true)) { "yes" } else { "" };
                outln!(
                    "{:<20} {:<6} {:>4} {:<12} {:<25}  {} {}",
                    text(o, "node_id"),
                    local,
                    text(o, "priority"),
                    text(o, "status"),
                    text(o, "last_seen"),
                    text(o, "name"),
                    o.get("conninfo").and_then(Value::as_str).map(|c| format!("({c})")).unwrap_or_default()
                );
            }
            Ok(())
        }
        NodeAction::Status { id } => {
            let rows = client
                .query(STATUS_SQL, &[&id])
                .await
                .map_err(CliError::query("steep_repl.node_status()"))?;
            let mut objects: Vec<Map<String, Value>> = rows.iter().map(output::row_to_json).collect();
            for o in &mut objects {
                // The replication document as JSON, not as a string holding JSON.
                if let Some(Value::String(r)) = o.get("replication") {
                    let parsed = serde_json::from_str(r).unwrap_or(Value::Null);
                    o.insert("replication".into(), parsed);
                }
            }
            let bad: Vec<String> = objects
                .iter()
                .filter(|o| text(o, "status") != "healthy")
                .map(|o| format!("{} is {}", text(o, "node_id"), text(o, "status")))
                .collect();
            if json {
                outln!("{}", Value::Array(objects.into_iter().map(Value::Object).collect()));
            } else if objects.is_empty() {
                outln!("no nodes registered");
            } else {
                print_status(&objects);
            }
            if bad.is_empty() { Ok(()) } else { Err(CliError::Other(anyhow::anyhow!("{}", bad.join(", ")))) }
        }
        NodeAction::Heartbeat { id } => {
            let answered: bool = client
                .query_one("SELECT steep_repl.heartbeat($1)", &[&id])
                .await
                .map_err(CliError::query("steep_repl.heartbeat()"))?
                .get(0);
            let who = id.as_deref().unwrap_or("the local node");
            if json {
                outln!("{}", serde_json::json!({ "node_id": id, "answered": answered }));
            } else if answered {
                outln!("{who} answered");
            }
            if answered {
                Ok(())
            } else {
                Err(CliError::Other(anyhow::anyhow!(
                    "{who} did not answer (steep-repl node list shows the last error)"
                )))
            }
        }
    }
}

fn text(o: &Map<String, Value>, k: &str) -> String {
    match o.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => "-".to_string(),
    }
}

fn ms(o: &Map<String, Value>, k: &str) -> String {
    o.get(k).and_then(Value::as_f64).map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".into())
}

/// One line per node: the figures a DBA scans first; replication in one summary column.
fn print_status(objects: &[Map<String, Value>]) {
    outln!(
        "{:<20} {:<12} {:>10} {:>10} {:>12} {:<10} {:<8}  replication",
        "node",
        "status",
        "seen ago",
        "rtt",
        "clock offset",
        "server",
        "steep"
    );
    for o in objects {
        let ago = o
            .get("seconds_since_seen")
            .and_then(Value::as_f64)
            .map(output::duration)
            .unwrap_or_else(|| "never".into());
        let repl = o.get("replication").map(replication_summary).unwrap_or_else(|| "-".into());
        outln!(
            "{:<20} {:<12} {:>10} {:>10} {:>12} {:<10} {:<8}  {}",
            text(o, "node_id"),
            text(o, "status"),
            ago,
            ms(o, "rtt_ms"),
            ms(o, "clock_offset_ms"),
            text(o, "server_version").split_whitespace().next().unwrap_or("-"),
            text(o, "extension_version"),
            repl
        );
    }
}

/// `2 slots (max 1.2 MiB retained), 1 subscription (1 not streaming)`.
fn replication_summary(r: &Value) -> String {
    let slots = r.get("slots").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    let subs = r.get("subscriptions").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    if r.is_null() {
        return "-".into();
    }
    let retained = slots.iter().filter_map(|s| s.get("retained_wal_bytes").and_then(Value::as_u64)).max();
    let down = subs.iter().filter(|s| s.get("state").and_then(Value::as_str) != Some("streaming")).count();
    let mut out = format!("{} slot{}", slots.len(), if slots.len() == 1 { "" } else { "s" });
    if let Some(b) = retained {
        out.push_str(&format!(" (max {} retained)", output::bytes(b)));
    }
    out.push_str(&format!(", {} subscription{}", subs.len(), if subs.len() == 1 { "" } else { "s" }));
    if down > 0 {
        out.push_str(&format!(" ({down} not streaming)"));
    }
    out
}

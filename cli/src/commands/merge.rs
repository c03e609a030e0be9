//! `steep-repl merge`: reconciles this server and a peer to the union of their rows (PRODUCT.md §10).
//! The merge runs in the server (`steep_repl.start_merge`), which connects to the peer itself; this
//! command starts it, follows it like an overlap analysis ([`crate::follow`]: Ctrl-C detaches), then
//! prints `merge_result`: per table, the node written to, the action and the rows (for a dry run, what
//! would be done). Exit 0 once the merge has completed.

use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::commands::overlap::{follow_to_end, require_extension};
use crate::config::MergeConfig;
use crate::error::CliError;
use crate::follow::CHANNEL;
use crate::output::{self, outln};
use crate::progress::Started;
use crate::signals::Interrupt;

const RESULT_SQL: &str = "\
SELECT schema_name, table_name, node, action, rows, sample_keys::text AS sample_keys
FROM steep_repl.merge_result($1)";

/// One row of `merge_result`.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub table: String,
    /// `local` (this server) or `peer`.
    pub node: String,
    /// `insert`, `update` or `park`.
    pub action: String,
    pub rows: i64,
    pub sample_keys: Value,
}

pub async fn run(cfg: MergeConfig, json: bool) -> Result<(), CliError> {
    let mut interrupt = Interrupt::new()?;
    let listener = cfg.conn.connect_listening(CHANNEL).await?;
    let db = cfg.conn.config.get_dbname().unwrap_or("?").to_string();
    let reason = require_extension(&listener.client, &db, "merge").await?;
    let patterns: Option<Vec<String>> = if cfg.patterns.is_empty() {
        None
    } else {
        Some(cfg.patterns.iter().map(|p| p.as_str().to_string()).collect())
    };
    let parallel = cfg.parallel as i32;
    let id: String = listener
        .client
        .query_one(
            "SELECT steep_repl.start_merge($1::text, $2::text[], $3::text, $4::bool, $5::int4)",
            &[&cfg.peer, &patterns, &cfg.strategy, &cfg.dry_run, &parallel],
        )
        .await
        .map_err(CliError::query("steep_repl.start_merge"))?
        .get(0);
    let job = Started { op: "merge".into(), id: id.clone(), mode: "direct".into(), path: None, reason };
    follow_to_end(&cfg.conn, listener, job, cfg.timeout, json, &mut interrupt).await?;

    let client = cfg.conn.connect().await?;
    let actions = read_actions(&client, &id).await?;
    if json {
        outln!("{}", document(&id, cfg.dry_run, &actions));
    } else {
        for line in lines(cfg.dry_run, &actions) {
            outln!("{line}");
        }
    }
    Ok(())
}

async fn read_actions(client: &Client, id: &str) -> Result<Vec<Action>, CliError> {
    let rows = client
        .query(RESULT_SQL, &[&id])
        .await
        .map_err(CliError::query(format!("steep_repl.merge_result('{id}')")))?;
    Ok(rows
        .iter()
        .map(|r| {
            let o = output::row_to_json(r);
            let text = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            Action {
                table: format!("{}.{}", text("schema_name"), text("table_name")),
                node: text("node"),
                action: text("action"),
                rows: o.get("rows").and_then(Value::as_i64).unwrap_or(0),
                sample_keys: serde_json::from_str(&text("sample_keys")).unwrap_or(Value::Null),
            }
        })
        .collect())
}

/// What the `node`/`action` pair means, for people.
fn describe(node: &str, action: &str) -> String {
    let node = if node == "local" { "this server" } else { "the peer" };
    match action {
        "insert" => format!("rows copied to {node}"),
        "update" => format!("conflicts settled on {node}"),
        "park" => "conflicts parked for a person (steep_repl.merge_conflicts)".to_string(),
        other => format!("{other} on {node}"),
    }
}

/// The text report: one line per table and action, then a total.
pub fn lines(dry_run: bool, actions: &[Action]) -> Vec<String> {
    let verb = if dry_run { "would be" } else { "were" };
    let mut out = Vec::new();
    if actions.is_empty() {
        out.push("nothing to merge: every compared table has the same rows on both nodes".to_string());
        return out;
    }
    let width = actions.iter().map(|a| a.table.len()).max().unwrap_or(5).max(5);
    for a in actions {
        out.push(format!("{:<width$}  {:>10}  {}", a.table, a.rows, describe(&a.node, &a.action)));
    }
    let total: i64 = actions.iter().map(|a| a.rows).sum();
    out.push(format!(
        "{total} rows {verb} written{}",
        if dry_run { " (dry run: nothing was changed)" } else { "" }
    ));
    out
}

/// The `--json` document.
pub fn document(id: &str, dry_run: bool, actions: &[Action]) -> Value {
    let list: Vec<Value> = actions
        .iter()
        .map(|a| {
            json!({"table": a.table, "node": a.node, "action": a.action, "rows": a.rows, "sample_keys": a.sample_keys})
        })
        .collect();
    json!({"id": id, "dry_run": dry_run, "actions": list, "rows": actions.iter().map(|a| a.rows).sum::<i64>()})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(node: &str, action: &str, rows: i64) -> Action {
        Action {
            table: "app.t".into(),
            node: node.into(),
            action: action.into(),
            rows,
            sample_keys: json!([]),
        }
    }

    #[test]
    fn report_names_each_action_and_the_total() {
        let a = [action("peer", "insert", 3), action("local", "update", 2), action("local", "park", 1)];
        let l = lines(true, &a);
        assert!(l[0].contains("rows copied to the peer") && l[0].contains('3'), "{l:?}");
        assert!(l[1].contains("conflicts settled on this server"), "{l:?}");
        assert!(l[2].contains("parked"), "{l:?}");
        assert_eq!(l[3], "6 rows would be written (dry run: nothing was changed)");
        assert_eq!(
            lines(false, &[])[0],
            "nothing to merge: every compared table has the same rows on both nodes"
        );
        let d = document("mrg-1", false, &a);
        assert_eq!(d["rows"], 6);
        assert_eq!(d["actions"][0]["node"], "peer");
    }
}

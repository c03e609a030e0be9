//! `steep-repl snapshot list`: the server's operation history (`list_operations`), newest first.

use serde_json::Value;

use crate::conn::ConnSpec;
use crate::error::CliError;
use crate::output::{self, outln};

/// Columns shown, from `list_operations` joined with the operation's row (path, phase).
const LIST_SQL: &str = "\
SELECT q.snapshot_id AS id, q.op, q.status, s.phase, s.path,
       to_char(q.enqueued_at, 'YYYY-MM-DD HH24:MI:SSOF') AS enqueued_at,
       to_char(q.finished_at, 'YYYY-MM-DD HH24:MI:SSOF') AS finished_at,
       s.rows_done AS rows, s.bytes_done AS bytes, q.error
FROM steep_repl.list_operations($1, $2) q
LEFT JOIN steep_repl.snapshots s ON s.id = q.snapshot_id
ORDER BY q.id DESC";

/// Prints the operations: a table, or a JSON array.
pub async fn run(conn: &ConnSpec, status: Option<&str>, limit: i32, json: bool) -> Result<(), CliError> {
    let client = conn.connect().await?;
    let rows = client
        .query(LIST_SQL, &[&status, &limit])
        .await
        .map_err(CliError::query("steep_repl.list_operations()"))?;
    let objects: Vec<Value> = rows.iter().map(|r| Value::Object(output::row_to_json(r))).collect();
    if json {
        outln!("{}", Value::Array(objects));
        return Ok(());
    }
    if objects.is_empty() {
        outln!("no operations");
        return Ok(());
    }
    let text = |v: &Value, k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => "-".to_string(),
    };
    outln!(
        "{:<22} {:<8} {:<9} {:<10} {:<25} {:>14} {:>10}  path / error",
        "id",
        "op",
        "status",
        "phase",
        "enqueued",
        "rows",
        "size"
    );
    for o in &objects {
        let rows = o.get("rows").and_then(Value::as_u64).map(output::count).unwrap_or_else(|| "-".into());
        let size = o.get("bytes").and_then(Value::as_u64).map(output::bytes).unwrap_or_else(|| "-".into());
        let tail = match o.get("error").and_then(Value::as_str) {
            Some(e) => format!("{}  error: {e}", text(o, "path")),
            None => text(o, "path"),
        };
        outln!(
            "{:<22} {:<8} {:<9} {:<10} {:<25} {:>14} {:>10}  {tail}",
            text(o, "id"),
            text(o, "op"),
            text(o, "status"),
            text(o, "phase"),
            text(o, "enqueued_at"),
            rows,
            size
        );
    }
    Ok(())
}

//! `steep-repl snapshot cancel ID`.

use crate::output::outln;
use serde_json::json;

use crate::conn::ConnSpec;
use crate::error::CliError;

/// Asks the server to stop the operation. Succeeds when the request was taken or the operation had
/// already ended (saying which); fails for an unknown id or a missing privilege.
pub async fn run(conn: &ConnSpec, id: &str, json: bool) -> Result<(), CliError> {
    let client = conn.connect().await?;
    let requested: bool = client
        .query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id])
        .await
        .map_err(CliError::query(format!("steep_repl.cancel_snapshot('{id}')")))?
        .get(0);
    let status: Option<String> = client
        .query_opt("SELECT status FROM steep_repl.snapshots WHERE id = $1", &[&id])
        .await
        .map_err(CliError::query(format!("reading the status of {id}")))?
        .map(|r| r.get(0));
    if json {
        outln!("{}", json!({ "id": id, "cancel_requested": requested, "status": status }));
    } else if requested {
        outln!("cancel requested for {id}; its workers stop within about a second");
    } else {
        outln!("{id} had already ended ({})", status.as_deref().unwrap_or("unknown"));
    }
    Ok(())
}

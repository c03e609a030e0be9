//! `steep-repl health`: is steep_repl installed, preloaded and healthy on the server?

use serde_json::Value;

use crate::conn::ConnSpec;
use crate::error::CliError;
use crate::output::{self, outln};

/// Prints `steep_repl.health()`. Exits non-zero when the extension is missing from the database or the
/// server reports anything but `ok`, so scripts can use it as a check.
pub async fn run(conn: &ConnSpec, json: bool) -> Result<(), CliError> {
    let client = conn.connect().await?;
    let installed = client
        .query_opt("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'steep_repl'", &[])
        .await
        .map_err(CliError::query("checking for the steep_repl extension"))?;
    if installed.is_none() {
        let db = conn.config.get_dbname().unwrap_or("?").to_string();
        return Err(CliError::Other(anyhow::anyhow!(
            "the steep_repl extension is not installed in database {db}; run CREATE EXTENSION steep_repl \
             (and set shared_preload_libraries = 'steep_repl' on the server)"
        )));
    }
    let row = client
        .query_one("SELECT * FROM steep_repl.health()", &[])
        .await
        .map_err(CliError::query("steep_repl.health()"))?;
    let fields = output::row_to_json(&row);
    if json {
        outln!("{}", Value::Object(fields.clone()));
    } else {
        output::print_fields(&fields);
    }
    match fields.get("status").and_then(Value::as_str) {
        Some("ok") => Ok(()),
        Some(status) => Err(CliError::Other(anyhow::anyhow!("server status: {status}"))),
        None => Err(CliError::Other(anyhow::anyhow!("health() returned no status"))),
    }
}

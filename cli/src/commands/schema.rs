//! `steep-repl schema capture|compare|diff`: schema fingerprints, read and compared in the server
//! (`steep_repl.capture_fingerprints`, `steep_repl.compare_schema`), which connects to the peer itself.

use serde_json::{Map, Value};

use crate::config::SchemaAction;
use crate::conn::ConnSpec;
use crate::error::CliError;
use crate::output::{self, outln};

const COMPARE_SQL: &str = "\
SELECT kind, schema_name, table_name, object_name, status, local_definition, peer_definition
FROM steep_repl.compare_schema($1, $2)";

pub async fn run(conn: &ConnSpec, action: SchemaAction, json: bool) -> Result<(), CliError> {
    let client = conn.connect().await?;
    match action {
        SchemaAction::Capture { node } => {
            let n: i64 = client
                .query_one("SELECT steep_repl.capture_fingerprints($1)", &[&node])
                .await
                .map_err(CliError::query("steep_repl.capture_fingerprints()"))?
                .get(0);
            let who = node.as_deref().unwrap_or("the local node");
            if json {
                outln!("{}", serde_json::json!({ "node_id": node, "objects": n }));
            } else {
                outln!(
                    "captured {} schema objects of {who} into steep_repl.schema_fingerprints",
                    output::count(n as u64)
                );
            }
            Ok(())
        }
        SchemaAction::Compare { peer, all, schemas } => {
            let schemas = (!schemas.is_empty()).then_some(schemas);
            let rows = compare(&client, &peer, schemas.as_deref()).await?;
            let differ = rows.iter().filter(|r| r["status"] != "match").count();
            let shown: Vec<&Map<String, Value>> =
                rows.iter().filter(|r| all || r["status"] != "match").collect();
            if json {
                outln!("{}", Value::Array(shown.iter().map(|r| Value::Object((*r).clone())).collect()));
            } else {
                for r in &shown {
                    print_object(r);
                }
                outln!(
                    "{} objects compared: {} match, {differ} differ",
                    output::count(rows.len() as u64),
                    output::count((rows.len() - differ) as u64)
                );
            }
            if differ > 0 {
                Err(CliError::SchemaDiffers { peer: shown_peer(&peer), count: differ })
            } else {
                Ok(())
            }
        }
        SchemaAction::Diff { peer, schema, table } => {
            let rows = compare(&client, &peer, Some(std::slice::from_ref(&schema))).await?;
            let of_table: Vec<&Map<String, Value>> =
                rows.iter().filter(|r| r["table_name"].as_str() == Some(table.as_str())).collect();
            if of_table.is_empty() {
                return Err(CliError::Other(anyhow::anyhow!(
                    "table {schema}.{table} exists on neither side"
                )));
            }
            let differ = of_table.iter().filter(|r| r["status"] != "match").count();
            if json {
                outln!("{}", Value::Array(of_table.iter().map(|r| Value::Object((*r).clone())).collect()));
            } else {
                for r in &of_table {
                    print_object(r);
                }
                outln!("{schema}.{table}: {} objects, {differ} differ", of_table.len());
            }
            if differ > 0 {
                Err(CliError::SchemaDiffers { peer: shown_peer(&peer), count: differ })
            } else {
                Ok(())
            }
        }
    }
}

async fn compare(
    client: &tokio_postgres::Client,
    peer: &str,
    schemas: Option<&[String]>,
) -> Result<Vec<Map<String, Value>>, CliError> {
    let schemas: Option<Vec<String>> = schemas.map(<[String]>::to_vec);
    let rows = client
        .query(COMPARE_SQL, &[&peer, &schemas])
        .await
        .map_err(CliError::query("steep_repl.compare_schema()"))?;
    Ok(rows.iter().map(output::row_to_json).collect())
}

/// A node id as given; a conninfo is not repeated (it may name hosts and users).
pub fn shown_peer(peer: &str) -> String {
    if peer.contains('=') || peer.contains("://") { "the peer".to_string() } else { format!("node {peer}") }
}

/// `mismatch   column     app.orders.amount` and, for differences, both definitions.
fn print_object(r: &Map<String, Value>) {
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("");
    let name = match r.get("table_name").and_then(Value::as_str) {
        Some(t) if s("kind") != "table" && s("kind") != "partition" => {
            format!("{}.{t}.{}", s("schema_name"), s("object_name"))
        }
        _ if s("kind") == "schema" => s("object_name").to_string(),
        _ => format!("{}.{}", s("schema_name"), s("object_name")),
    };
    outln!("{:<11} {:<11} {name}", s("status"), s("kind"));
    if s("status") != "match" {
        for (side, key) in [("local", "local_definition"), ("peer ", "peer_definition")] {
            match r.get(key).and_then(Value::as_str) {
                Some(d) => outln!("    {side}: {d}"),
                None => outln!("    {side}: (absent)"),
            }
        }
    }
}

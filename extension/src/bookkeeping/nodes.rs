//! Statements on the node registry, `steep_repl.nodes` (extension/sql/nodes.sql).
//!
//! The table is not readable by PUBLIC (its conninfo says where the server connects with its own
//! credentials): reads and writes here run as the extension owner through [`as_owner`], or in the
//! prober, which connects as the bootstrap superuser with its session pinned. Every statement runs with
//! `search_path` pinned to `pg_catalog, pg_temp`.

use pgrx::prelude::*;

use crate::nodes::{Outcome, UNREACHABLE_AFTER};
use crate::pg::rights::as_owner;

/// A registered node, as the prober needs it.
#[derive(Debug, Clone)]
pub struct Node {
    pub node_id: String,
    pub conninfo: Option<String>,
    pub is_local: bool,
}

/// Every registered node.
pub fn list() -> Vec<Node> {
    as_owner(|| {
        Spi::connect(|client| -> Result<Vec<Node>, pgrx::spi::Error> {
            let mut v = Vec::new();
            for row in client.select(
                "SELECT node_id, conninfo, is_local FROM steep_repl.nodes ORDER BY priority DESC, node_id",
                None,
                &[],
            )? {
                v.push(Node {
                    node_id: row.get::<String>(1)?.unwrap_or_default(),
                    conninfo: row.get::<String>(2)?,
                    is_local: row.get::<bool>(3)?.unwrap_or(false),
                });
            }
            Ok(v)
        })
    })
    .unwrap_or_else(|e| error!("reading steep_repl.nodes: {e}"))
}

/// One node by id.
pub fn get(node_id: &str) -> Option<Node> {
    list().into_iter().find(|n| n.node_id == node_id)
}

/// What the local node's row records of this server.
pub struct LocalFacts<'a> {
    pub healthy: bool,
    pub server_version: &'a str,
    pub system_identifier: i64,
    pub extension_version: Option<&'a str>,
}

/// Beats for the local node: `last_seen` now, its status and versions. False when no node is local.
pub fn beat_local(f: &LocalFacts<'_>) -> bool {
    as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "UPDATE steep_repl.nodes SET last_seen = pg_catalog.now(), last_probe = pg_catalog.now(), \
                 status = CASE WHEN $1 THEN 'healthy' ELSE 'degraded' END, failures = 0, \
                 last_error = CASE WHEN $1 THEN NULL ELSE 'the steep_repl supervisor is not running' END, \
                 rtt_ms = 0, clock_offset_ms = 0, server_version = $2, system_identifier = $3, \
                 extension_version = $4 \
             WHERE is_local RETURNING true",
            &[
                f.healthy.into(),
                f.server_version.into(),
                f.system_identifier.into(),
                f.extension_version.into(),
            ],
        )
    })
    .map(|r| r.unwrap_or(false))
    .unwrap_or_else(|e| error!("recording the local heartbeat in steep_repl.nodes: {e}"))
}

/// Records the outcome of a probe of peer `node_id`: an answer sets its status and figures and clears
/// its failures; a failure to reach it counts one more failure in a row and makes it `unreachable` at
/// [`UNREACHABLE_AFTER`]; a peer that was reached but answered with an error is `degraded`.
/// `conninfo` is the one probed: a probe of an endpoint the node no longer has is not recorded.
pub fn record_probe(node_id: &str, conninfo: &str, outcome: &Outcome) {
    let r = as_owner(|| match outcome {
        Outcome::Answered(a) => Spi::run_with_args(
            "UPDATE steep_repl.nodes SET status = $2, failures = 0, last_seen = pg_catalog.now(), \
                 last_probe = pg_catalog.now(), rtt_ms = COALESCE($3, rtt_ms), \
                 clock_offset_ms = COALESCE($4, clock_offset_ms), server_version = COALESCE($5, server_version), \
                 system_identifier = COALESCE($6, system_identifier), \
                 extension_version = COALESCE($7, extension_version), last_error = $8, \
                 peer_health = COALESCE($9::pg_catalog.jsonb, peer_health) \
             WHERE node_id = $1 AND NOT is_local AND conninfo = $10",
            &[
                node_id.into(),
                a.status.into(),
                a.rtt_ms.into(),
                a.clock_offset_ms.into(),
                a.server_version.as_deref().into(),
                a.system_identifier.into(),
                a.extension_version.as_deref().into(),
                a.error.as_deref().into(),
                a.peer_health.as_deref().into(),
                conninfo.into(),
            ],
        ),
        Outcome::Failed { error } => Spi::run_with_args(
            "UPDATE steep_repl.nodes SET failures = failures + 1, last_probe = pg_catalog.now(), \
                 last_error = $2, \
                 status = CASE WHEN failures + 1 >= $3 THEN 'unreachable' ELSE status END \
             WHERE node_id = $1 AND NOT is_local AND conninfo = $4",
            &[node_id.into(), error.as_str().into(), UNREACHABLE_AFTER.into(), conninfo.into()],
        ),
        Outcome::Interrupted => Ok(()),
    });
    r.unwrap_or_else(|e| error!("recording the probe of node {node_id} in steep_repl.nodes: {e}"));
}

/// Whether any node is registered in this database.
pub fn any() -> bool {
    as_owner(|| Spi::get_one::<bool>("SELECT EXISTS (SELECT FROM steep_repl.nodes)"))
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// (node id, peers registered, peers unreachable) for `health()`.
pub fn summary() -> (Option<String>, i64, i64) {
    as_owner(|| {
        Spi::connect(|client| -> Result<(Option<String>, i64, i64), pgrx::spi::Error> {
            let row = client
                .select(
                    "SELECT (SELECT node_id FROM steep_repl.nodes WHERE is_local), \
                            count(*) FILTER (WHERE NOT is_local), \
                            count(*) FILTER (WHERE NOT is_local AND status = 'unreachable') \
                     FROM steep_repl.nodes",
                    None,
                    &[],
                )?
                .first();
            Ok((row.get::<String>(1)?, row.get::<i64>(2)?.unwrap_or(0), row.get::<i64>(3)?.unwrap_or(0)))
        })
    })
    .unwrap_or((None, 0, 0))
}

/// Replaces the stored fingerprints of node `node_id` with those of `rows`, in one statement.
pub fn store_fingerprints(node_id: &str, rows: &[steep_repl_engine::schema::SchemaObject]) {
    let kinds: Vec<&str> = rows.iter().map(|o| o.kind.as_str()).collect();
    let schemas: Vec<&str> = rows.iter().map(|o| o.schema.as_str()).collect();
    let tables: Vec<Option<&str>> = rows.iter().map(|o| o.table.as_deref()).collect();
    let names: Vec<&str> = rows.iter().map(|o| o.name.as_str()).collect();
    let definitions: Vec<&str> = rows.iter().map(|o| o.definition.as_str()).collect();
    let fingerprints: Vec<String> =
        rows.iter().map(|o| steep_repl_engine::schema::fingerprint(&o.definition)).collect();
    as_owner(|| {
        Spi::run_with_args("DELETE FROM steep_repl.schema_fingerprints WHERE node_id = $1", &[node_id.into()])?;
        Spi::run_with_args(
            "INSERT INTO steep_repl.schema_fingerprints \
                 (node_id, kind, schema_name, table_name, object_name, definition, fingerprint) \
             SELECT $1, k, s, t, o, d, f \
             FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) AS x(k, s, t, o, d, f)",
            &[
                node_id.into(),
                kinds.into(),
                schemas.into(),
                tables.into(),
                names.into(),
                definitions.into(),
                fingerprints.into(),
            ],
        )
    })
    .unwrap_or_else(|e| error!("storing the fingerprints of node {node_id}: {e}"));
}

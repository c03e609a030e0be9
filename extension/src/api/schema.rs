//! Schema fingerprints (PRODUCT.md §9): `schema_fingerprint`, `capture_fingerprints`, `compare_schema`.
//! The catalog query and the comparison rules are the engine's (`steep_repl_engine::schema`), the same
//! for this server and for the peer, which is read over a connection from `crate::peer` (no steep_repl
//! needed there).
//!
//! Rights: `schema_fingerprint` reads catalogs every role may read, as its caller. Capturing into
//! `steep_repl.schema_fingerprints` and comparing with a peer (the server connects with its own
//! credentials) are for superusers: EXECUTE is revoked from PUBLIC.

use std::time::{Duration, Instant};

use pgrx::prelude::*;
use steep_repl_engine::schema::{self, SchemaObject};

use crate::api::user_error;
use crate::bookkeeping::nodes as book;
use crate::gucs;
use crate::peer::{Conn, PeerError, Pending};

/// The least time a peer is given to read its fingerprints (a database of tens of thousands of tables
/// takes seconds); `steep_repl.peer_timeout` when larger.
const PEER_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// This database's schema objects (of `schemas`, of `kinds`; None: all), in no particular order. The apply's target
/// check reads the target through this too (`crate::api::apply`).
pub(crate) fn local_objects(schemas: Option<&[String]>, kinds: Option<&[&str]>) -> Vec<SchemaObject> {
    let schemas: Option<Vec<String>> = schemas.map(<[String]>::to_vec);
    let kinds: Option<Vec<String>> = kinds.map(|k| k.iter().map(|s| s.to_string()).collect());
    // The same settings as on the peer (how constants print; no JIT for many small lookups).
    crate::pg::session::with_settings(schema::DEPARSE_SETTINGS, || {
        Spi::connect(|client| {
            let mut v = Vec::new();
            let sql = schema::fingerprint_sql(server_version_num());
            for r in client.select(&sql, None, &[schemas.into(), kinds.into()])? {
                v.push(SchemaObject {
                    kind: r.get::<String>(1)?.unwrap_or_default(),
                    schema: r.get::<String>(2)?.unwrap_or_default(),
                    table: r.get::<String>(3)?,
                    name: r.get::<String>(4)?.unwrap_or_default(),
                    definition: r.get::<String>(5)?.unwrap_or_default(),
                    column_type: r.get::<String>(6)?,
                    generated: r.get::<bool>(7)?.unwrap_or(false),
                });
            }
            Ok::<_, pgrx::spi::Error>(v)
        })
    })
    .unwrap_or_else(|e| error!("reading the schema's catalogs: {e}"))
}

/// This server's `server_version_num`.
fn server_version_num() -> u32 {
    crate::pg::setting("server_version_num").and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Who a `peer` argument names: a registered node (its id shown in errors) or a conninfo.
pub(crate) fn resolve_peer(peer: &str) -> (String, String) {
    if let Some(n) = book::get(peer) {
        if n.is_local {
            user_error(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("node {peer} is this server (the local node), not a peer"),
                None,
            );
        }
        return (format!("node {peer}"), n.conninfo.unwrap_or_default());
    }
    if peer.contains('=') || peer.starts_with("postgres://") || peer.starts_with("postgresql://") {
        return ("the peer".to_string(), peer.to_string());
    }
    user_error(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("no node {peer} is registered, and it is not a conninfo"),
        Some("Name a node of steep_repl.node_status(), or give 'host=... dbname=...'."),
    )
}

fn interrupt() -> impl FnMut() -> Result<(), PeerError> {
    || {
        pgrx::check_for_interrupts!();
        Ok(())
    }
}

fn peer_failure(who: &str, e: PeerError) -> ! {
    user_error(
        PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
        format!("reading the schema of {who}: {e}"),
        Some(
            "steep_repl.peer_timeout bounds the connection; the server connects with its own credentials \
             (~/.pgpass of its OS user).",
        ),
    )
}

/// Learns the peer's version and sends it the fingerprint query (of `schemas`); the answer is read by
/// [`peer_answer`], so that the peer works while this server reads its own catalogs.
fn peer_start<'c>(who: &str, conn: &'c Conn, schemas: Option<&[String]>) -> Pending<'c> {
    let timeout = Duration::from_secs(gucs::PEER_TIMEOUT_S.get().max(1) as u64);
    let answer = conn
        .query(
            "SELECT pg_catalog.current_setting('server_version_num')",
            Instant::now() + timeout,
            &mut interrupt(),
        )
        .unwrap_or_else(|e| peer_failure(who, e));
    let version =
        answer.rows.first().and_then(|r| r.first().cloned().flatten()).and_then(|v| v.parse::<u32>().ok());
    let Some(version) = version else {
        peer_failure(who, PeerError::Statement("its server_version_num is not a number".into()))
    };
    // The same settings as here, so that constants in expressions print alike.
    let sql = format!("{}{}", schema::deparse_settings_sql(), schema::fingerprint_sql_for(version, schemas));
    conn.start(&sql, peer_deadline())
}

/// Connects to the peer.
fn peer_connect(who: &str, conninfo: &str) -> Conn {
    let timeout = Duration::from_secs(gucs::PEER_TIMEOUT_S.get().max(1) as u64);
    Conn::connect(conninfo, Instant::now() + timeout, &mut interrupt())
        .unwrap_or_else(|e| peer_failure(who, e))
}

fn peer_deadline() -> Instant {
    Instant::now() + Duration::from_secs(gucs::PEER_TIMEOUT_S.get().max(1) as u64).max(PEER_READ_TIMEOUT)
}

/// The peer's objects from its answer to the fingerprint query, in no particular order.
fn peer_answer(who: &str, pending: Pending<'_>) -> Vec<SchemaObject> {
    let rows = pending.finish(&mut interrupt()).unwrap_or_else(|e| peer_failure(who, e));
    rows.rows
        .into_iter()
        .map(|r| {
            let mut it = r.into_iter();
            let mut next = || it.next().flatten();
            SchemaObject {
                kind: next().unwrap_or_default(),
                schema: next().unwrap_or_default(),
                table: next(),
                name: next().unwrap_or_default(),
                definition: next().unwrap_or_default(),
                column_type: next(),
                generated: next().as_deref() == Some("t"),
            }
        })
        .collect()
}

/// The statement behind `schema_fingerprint()` for this server: the engine's catalog query, hashed and
/// sorted in SQL, so the rows go straight from the executor to the caller.
#[pg_extern(name = "_fingerprint_sql", stable, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn fingerprint_sql_text() -> String {
    schema::fingerprint_listing_sql(server_version_num())
}

/// Stores the fingerprints of a node in `steep_repl.schema_fingerprints`, replacing its previous
/// capture: this server's (`node_id` NULL or the local node's id) or a registered peer's. Returns the
/// number of objects stored.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn capture_fingerprints(node_id: default!(Option<&str>, "NULL")) -> i64 {
    let local = book::list().into_iter().find(|n| n.is_local);
    let (id, rows) = match node_id {
        None => match local {
            Some(n) => (n.node_id, local_objects(None, None)),
            None => user_error(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                "no local node is registered to capture the fingerprints of".into(),
                Some(
                    "Register this server first: SELECT steep_repl.register_node('id', is_local => true); or name a node.",
                ),
            ),
        },
        Some(id) if local.as_ref().is_some_and(|n| n.node_id == id) => {
            (id.to_string(), local_objects(None, None))
        }
        Some(id) => {
            if book::get(id).is_none() {
                user_error(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                    format!("no node {id} is registered"),
                    None,
                );
            }
            let (who, conninfo) = resolve_peer(id);
            let conn = peer_connect(&who, &conninfo);
            let pending = peer_start(&who, &conn, None);
            (id.to_string(), peer_answer(&who, pending))
        }
    };
    book::store_fingerprints(&id, &rows);
    rows.len() as i64
}

/// Compares this server's schema with a peer's (`peer`: a registered node id or a conninfo), object by
/// object: `match`, `local_only`, `peer_only` or `mismatch`, with both definitions. An object inside a
/// schema or table only one side has is not listed again.
#[allow(clippy::type_complexity)]
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn compare_schema(
    peer: &str,
    schemas: default!(Option<Vec<String>>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(kind, String),
        name!(schema_name, String),
        name!(table_name, Option<String>),
        name!(object_name, String),
        name!(status, String),
        name!(local_definition, Option<String>),
        name!(peer_definition, Option<String>),
    ),
> {
    let (who, conninfo) = resolve_peer(peer);
    // The peer reads its catalogs while this server reads its own.
    let conn = peer_connect(&who, &conninfo);
    let pending = peer_start(&who, &conn, schemas.as_deref());
    let local = local_objects(schemas.as_deref(), None);
    let theirs = peer_answer(&who, pending);
    let rows = schema::compare(&local, &theirs);
    TableIterator::new(
        rows.into_iter()
            .map(|c| (c.kind, c.schema, c.table, c.name, c.status.as_str().to_string(), c.local, c.peer)),
    )
}

extension_sql!(
    r#"
-- One row per schema object of the user schemas (or of `schemas`), with its canonical definition and
-- the SHA-256 of it: the same schema gives the same rows on any server of the same major version
-- (steep_repl_engine::schema documents what each kind holds). One catalog query, under the settings
-- of steep_repl_engine::schema::DEPARSE_SETTINGS (how constants print; no JIT for tens of thousands of
-- small catalog lookups).
CREATE FUNCTION steep_repl.schema_fingerprint(schemas text[] DEFAULT NULL)
RETURNS TABLE (kind text, schema_name text, table_name text, object_name text, definition text,
               fingerprint text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET jit = off
SET "TimeZone" = 'UTC'
SET "DateStyle" = 'ISO, YMD'
SET "IntervalStyle" = 'postgres'
SET extra_float_digits = 3
SET bytea_output = 'hex'
SET lc_monetary = 'C'
AS $$
BEGIN
    RETURN QUERY EXECUTE steep_repl._fingerprint_sql() USING schema_fingerprint.schemas, NULL::text[];
END
$$;

REVOKE EXECUTE ON FUNCTION steep_repl.capture_fingerprints(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.compare_schema(text, text[]) FROM PUBLIC;
"#,
    name = "schema_rights",
    requires = ["schema_fingerprints", capture_fingerprints, compare_schema, fingerprint_sql_text]
);

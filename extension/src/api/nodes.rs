//! The node registry's SQL functions (PRODUCT.md §8): `register_node`, `unregister_node`, `heartbeat`,
//! `node_status`, `replication_state`.
//!
//! Rights: registering, unregistering and probing on demand are for superusers (EXECUTE is revoked from
//! PUBLIC): a registered conninfo makes the server connect with its own credentials (its password
//! file). `node_status` and `replication_state` are for every role and show no conninfo and no error
//! text (which can name hosts and users); the registry itself is read as the extension owner
//! (`crate::bookkeeping::nodes`).

use std::time::Duration;

use pgrx::JsonB;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::api::user_error;
use crate::bookkeeping::nodes::{self as book, LocalFacts};
use crate::nodes::{self, Outcome};
use crate::peer::{self, PeerError};
use crate::pg::{self, rights};
use crate::{gucs, shmem};

/// Checks a node about to be registered (called by `register_node`): the conninfo parses and holds no
/// password, and this database's registry is probed by the supervisor from now on.
#[pg_extern(name = "_check_node")]
#[search_path(pg_catalog, pg_temp)]
fn check_node(node_id: &str, conninfo: Option<&str>, is_local: bool) {
    let shared = shmem::require();
    if !is_local && conninfo.is_none_or(|c| c.trim().is_empty()) {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("node {node_id} needs a conninfo: the supervisor connects to every peer with it"),
            Some(
                "Give conninfo => 'host=... port=... dbname=... user=...', or is_local => true for this server.",
            ),
        );
    }
    if let Some(c) = conninfo {
        if let Err(e) = peer::check_conninfo(c) {
            user_error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("node {node_id}: {e}"), None);
        }
    }
    let db = pg::database_oid();
    if shared.room_for_nodes(db) {
        // Watched once the registration commits: a prober started before would find the registry
        // without this node, and one started after sees it.
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
            if let Some(s) = shmem::get() {
                s.watch_nodes(db);
            }
        });
    } else {
        user_error(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "nodes are registered in {} other databases of this server already, the most steep_repl probes",
                shmem::MAX_NODE_DATABASES
            ),
            Some("Keep the node registry in one database of each server."),
        );
    }
}

/// Whether the supervisor is alive (it beats every second).
pub fn supervisor_running() -> bool {
    supervisor_heartbeat_ms().is_some()
}

/// The supervisor's last heartbeat (Unix ms), or None when it is not running.
fn supervisor_heartbeat_ms() -> Option<u64> {
    let s = shmem::get()?;
    let beat = s.supervisor_heartbeat_ms.load(std::sync::atomic::Ordering::Acquire);
    let alive = s.supervisor_pid.load(std::sync::atomic::Ordering::Acquire) > 0
        && pg::now_ms().saturating_sub(beat) < crate::api::health::SUPERVISOR_STALE_MS;
    alive.then_some(beat)
}

/// Beats for the local node (the supervisor's prober and `heartbeat()`); false when none is local.
pub fn beat_local() -> bool {
    let server_version = pg::setting("server_version").unwrap_or_default();
    let extension_version = Spi::get_one::<String>(
        "SELECT extversion::text FROM pg_catalog.pg_extension WHERE extname = 'steep_repl'",
    )
    .ok()
    .flatten();
    book::beat_local(&LocalFacts {
        healthy: supervisor_running(),
        server_version: &server_version,
        system_identifier: pg::system_identifier(),
        extension_version: extension_version.as_deref(),
    })
}

/// How long one probe may take: `steep_repl.peer_timeout`, and no longer than a heartbeat interval.
pub fn probe_timeout() -> Duration {
    let t = gucs::PEER_TIMEOUT_S.get().max(1);
    let every = gucs::HEARTBEAT_INTERVAL_S.get().max(1);
    Duration::from_secs(t.min(every) as u64)
}

/// Beats now: for the local node (NULL or the local node's id), or probes peer `node_id` at once and
/// records what it found. Returns whether the node answered.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn heartbeat(node_id: default!(Option<&str>, "NULL")) -> bool {
    shmem::require();
    let node = match node_id {
        None => None,
        Some(id) => match book::get(id) {
            Some(n) => Some(n),
            None => user_error(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("no node {id} is registered"),
                Some("See steep_repl.node_status() for the registered nodes."),
            ),
        },
    };
    match node {
        Some(n) if !n.is_local => {
            let conninfo = n.conninfo.unwrap_or_default();
            let t = Duration::from_secs(gucs::PEER_TIMEOUT_S.get().max(1) as u64);
            let mut interrupt = || -> Result<(), PeerError> {
                pgrx::check_for_interrupts!();
                Ok(())
            };
            let (_, outcome) = nodes::probe_all(&[(n.node_id.clone(), conninfo.clone())], t, &mut interrupt)
                .pop()
                .expect("one probe");
            book::record_probe(&n.node_id, &conninfo, &outcome);
            matches!(outcome, Outcome::Answered(_))
        }
        _ => {
            if !beat_local() {
                user_error(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                    "no local node is registered".into(),
                    Some(
                        "Register this server first: SELECT steep_repl.register_node('id', is_local => true).",
                    ),
                );
            }
            supervisor_running()
        }
    }
}

/// After how long without a recorded probe a peer's last status is no longer shown (then `unknown`):
/// three heartbeats plus a probe's timeout, when probing has stopped (supervisor down, recovery).
fn stale_after_s() -> f64 {
    let every = gucs::HEARTBEAT_INTERVAL_S.get().max(1) as f64;
    3.0 * every + probe_timeout().as_secs_f64()
}

/// Every registered node (or one) as every role may see it: no conninfo, no error text. For the local
/// node, status and last_seen are live (the supervisor's heartbeat) and replication is read now; for a
/// peer they are what the last probe found, and its status is `unknown` once no probe was recorded
/// for three heartbeats (probing has stopped: a status that old is not shown as current).
#[allow(clippy::type_complexity)]
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn node_status(
    node_id: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(node_id, String),
        name!(name, Option<String>),
        name!(status, String),
        name!(last_seen, Option<TimestampWithTimeZone>),
        name!(seconds_since_seen, Option<f64>),
        name!(rtt_ms, Option<f64>),
        name!(clock_offset_ms, Option<f64>),
        name!(server_version, Option<String>),
        name!(extension_version, Option<String>),
        name!(replication, Option<JsonB>),
    ),
> {
    let beat = supervisor_heartbeat_ms();
    let rows = rights::as_owner(|| {
        Spi::connect(|client| {
            let mut v = Vec::new();
            for row in client.select(
                "WITH n AS ( \
                   SELECT n.*, CASE WHEN n.is_local THEN \
                       CASE WHEN $2 IS NULL THEN n.last_seen \
                            ELSE greatest(n.last_seen, to_timestamp($2 / 1000.0)) END \
                       ELSE n.last_seen END AS seen \
                   FROM steep_repl.nodes n WHERE $1::text IS NULL OR n.node_id = $1) \
                 SELECT node_id, name, \
                        CASE WHEN is_local THEN CASE WHEN $2 IS NULL THEN 'degraded' ELSE 'healthy' END \
                             WHEN last_probe IS NULL OR last_probe < clock_timestamp() - make_interval(secs => $3) \
                             THEN 'unknown' ELSE status END, \
                        seen, extract(epoch FROM clock_timestamp() - seen)::float8, \
                        rtt_ms, clock_offset_ms, server_version, extension_version, \
                        CASE WHEN is_local THEN steep_repl.replication_state() \
                             ELSE peer_health -> 'replication' END \
                 FROM n ORDER BY is_local DESC, priority DESC, node_id",
                None,
                &[node_id.into(), beat.map(|b| b as f64).into(), stale_after_s().into()],
            )? {
                v.push((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?,
                    row.get::<String>(3)?.unwrap_or_default(),
                    row.get::<TimestampWithTimeZone>(4)?,
                    row.get::<f64>(5)?,
                    row.get::<f64>(6)?,
                    row.get::<f64>(7)?,
                    row.get::<String>(8)?,
                    row.get::<String>(9)?,
                    row.get::<JsonB>(10)?,
                ));
            }
            Ok::<_, pgrx::spi::Error>(v)
        })
    })
    .unwrap_or_else(|e| error!("reading steep_repl.nodes: {e}"));
    if let (Some(id), true) = (node_id, rows.is_empty()) {
        user_error(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no node {id} is registered"), None);
    }
    TableIterator::new(rows)
}

extension_sql!(
    r#"
-- This server's replication as every role may see it (pg_replication_slots and pg_stat_subscription
-- are readable by PUBLIC): each slot with the WAL it retains, each subscription of this database with
-- its state ('streaming', 'down': enabled but no worker, 'disabled') and how long ago its worker last
-- reported an end position.
CREATE FUNCTION steep_repl.replication_state() RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
SELECT jsonb_build_object(
    'slots', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'slot_name', s.slot_name, 'slot_type', s.slot_type, 'plugin', s.plugin,
                   'database', s.database, 'active', s.active, 'wal_status', s.wal_status,
                   'retained_wal_bytes',
                   pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                                        ELSE pg_current_wal_lsn() END, s.restart_lsn)::bigint)
                 ORDER BY s.slot_name)
        FROM pg_replication_slots s), '[]'::jsonb),
    'subscriptions', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'subscription', sub.subname, 'enabled', sub.subenabled,
                   'state', CASE WHEN NOT sub.subenabled THEN 'disabled'
                                 WHEN st.pid IS NULL THEN 'down' ELSE 'streaming' END,
                   'received_lsn', st.received_lsn, 'latest_end_lsn', st.latest_end_lsn,
                   'seconds_since_latest_end',
                   extract(epoch FROM clock_timestamp() - st.latest_end_time)::float8)
                 ORDER BY sub.subname)
        FROM pg_subscription sub
        LEFT JOIN pg_stat_subscription st ON st.subid = sub.oid AND st.relid IS NULL
        WHERE sub.subdbid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())),
        '[]'::jsonb))
$$;

-- Registers a node (or updates it: same node_id), returning its row. conninfo: how this server
-- reaches the node (never with a password); is_local: this server itself (at most one).
CREATE FUNCTION steep_repl.register_node(node_id text, name text DEFAULT NULL, conninfo text DEFAULT NULL,
                                         priority integer DEFAULT 50, is_local boolean DEFAULT false)
RETURNS steep_repl.nodes
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r steep_repl.nodes;
    other text;
BEGIN
    IF node_id IS NULL OR node_id !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid node id %: 1 to 63 letters, digits, _ . or -, starting with a letter or digit',
            quote_nullable(node_id) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF priority IS NULL OR priority NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'priority of node % must be between 1 and 100, got %', node_id, priority
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF is_local THEN
        SELECT n.node_id INTO other FROM steep_repl.nodes n
            WHERE n.is_local AND n.node_id <> register_node.node_id;
        IF FOUND THEN
            RAISE EXCEPTION 'node % is already the local node of this server', other
                USING ERRCODE = 'unique_violation',
                      HINT = 'Unregister it first, or register this node with is_local => false.';
        END IF;
    END IF;
    PERFORM steep_repl._check_node(node_id, conninfo, coalesce(is_local, false));
    INSERT INTO steep_repl.nodes AS n (node_id, name, conninfo, priority, is_local)
    VALUES (register_node.node_id, register_node.name, register_node.conninfo, register_node.priority,
            coalesce(register_node.is_local, false))
    ON CONFLICT ON CONSTRAINT nodes_pkey DO UPDATE
        SET name = EXCLUDED.name, priority = EXCLUDED.priority, is_local = EXCLUDED.is_local,
            conninfo = EXCLUDED.conninfo,
            -- A node reached another way starts afresh.
            status = CASE WHEN n.conninfo IS DISTINCT FROM EXCLUDED.conninfo OR n.is_local <> EXCLUDED.is_local
                          THEN 'unknown' ELSE n.status END,
            failures = CASE WHEN n.conninfo IS DISTINCT FROM EXCLUDED.conninfo THEN 0 ELSE n.failures END
    RETURNING * INTO r;
    RETURN r;
END
$$;
REVOKE EXECUTE ON FUNCTION steep_repl.register_node(text, text, text, integer, boolean) FROM PUBLIC;

-- Removes a node from the registry; false when it was not registered.
CREATE FUNCTION steep_repl.unregister_node(node_id text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM steep_repl.nodes n WHERE n.node_id = unregister_node.node_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM steep_repl.schema_fingerprints f WHERE f.node_id = unregister_node.node_id;
    RETURN true;
END
$$;
REVOKE EXECUTE ON FUNCTION steep_repl.unregister_node(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.heartbeat(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl._check_node(text, text, boolean) FROM PUBLIC;
"#,
    name = "node_registry",
    requires = ["nodes", "schema_fingerprints", check_node, heartbeat]
);

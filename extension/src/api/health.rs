//! `steep_repl.version()` and `steep_repl.health()`: answer whether or not the library is preloaded.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;

use crate::{gucs, pg, shmem};

/// A supervisor heartbeat older than this means the supervisor is not running (it beats every second).
pub const SUPERVISOR_STALE_MS: u64 = 5_000;

/// The version of the loaded library (which may differ from the installed SQL objects' version after an
/// upgrade without `ALTER EXTENSION ... UPDATE`).
#[pg_extern(immutable, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[cfg(any(test, feature = "pg_test"))]
pub(crate) fn version_for_tests() -> &'static str {
    version()
}

/// One row describing the state of steep_repl on this server.
///
/// - `status`: `ok`; `not preloaded` (SQL API limited to this function); `degraded: ...` with the reason.
/// - `workers_running`: steep_repl dynamic workers holding a shared-memory slot now.
/// - `free_worker_slots`: how many more workers a job could start now: the smaller of what is left of
///   `max_worker_processes` (counting every background worker of the server, as pg_stat_activity shows
///   them) and what is left of `steep_repl.max_workers`. An estimate: other extensions and parallel
///   queries take slots at any moment.
/// - `system_identifier`: this server's (pg_control_system), which tells a physical clone from its origin.
/// - `node_id`, `peers_total`, `peers_unreachable`: the node registry (`node_status()` has the details).
/// - `replication_slots`, `max_slot_retained_bytes`: slots on this server and the most WAL one of them
///   holds back from removal; `subscriptions_not_streaming`: enabled subscriptions of this database
///   whose apply worker is not running.
#[allow(clippy::type_complexity)]
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn health() -> TableIterator<
    'static,
    (
        name!(status, String),
        name!(extension_version, Option<String>),
        name!(library_version, String),
        name!(pg_version, String),
        name!(preloaded, bool),
        name!(supervisor_running, bool),
        name!(workers_running, i32),
        name!(free_worker_slots, i32),
        name!(active_operations, i64),
        name!(last_error, Option<String>),
        name!(system_identifier, i64),
        name!(node_id, Option<String>),
        name!(peers_total, i64),
        name!(peers_unreachable, i64),
        name!(replication_slots, i64),
        name!(max_slot_retained_bytes, Option<i64>),
        name!(subscriptions_not_streaming, i64),
    ),
> {
    let preloaded = pg::is_preloaded();
    if preloaded {
        // Monitoring reads active_operations: rows of jobs that no longer run are marked first.
        crate::job::reap_interrupted();
    }
    let shared = shmem::get();
    let supervisor_running = shared.is_some_and(|s| {
        s.supervisor_pid.load(Ordering::Acquire) > 0
            && pg::now_ms().saturating_sub(s.supervisor_heartbeat_ms.load(Ordering::Acquire))
                < SUPERVISOR_STALE_MS
    });
    let ours_running = shared.map_or(0, |s| s.workers_in_use()) as i32;

    let extension_version = Spi::get_one::<String>(
        "SELECT extversion::text FROM pg_catalog.pg_extension WHERE extname = 'steep_repl'",
    )
    .unwrap_or(None);
    let pg_version = Spi::get_one::<String>("SELECT pg_catalog.version()").ok().flatten().unwrap_or_default();
    // Background workers of any kind currently running: their backend_type is their bgw_type, so they
    // are the rows whose type is none of PostgreSQL's own process kinds.
    let bgworkers_running = Spi::get_one::<i64>(
        "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type NOT IN \
         ('client backend', 'autovacuum launcher', 'autovacuum worker', 'background writer', 'checkpointer', \
          'walwriter', 'archiver', 'startup', 'walreceiver', 'walsender', 'logger', 'standalone backend')",
    )
    .ok()
    .flatten()
    .unwrap_or(0) as i32;
    // Workers that connect to no database (our supervisor among them) are missing from pg_stat_activity.
    let supervisor_slot = i32::from(supervisor_running);
    let free_server = (pg::max_worker_processes() - bgworkers_running - supervisor_slot).max(0);
    let free_ours = if preloaded { (gucs::MAX_WORKERS.get() - ours_running).max(0) } else { 0 };
    let free_worker_slots = free_server.min(free_ours);

    let active_operations = Spi::get_one::<i64>(
        "SELECT count(*) FROM steep_repl.snapshots WHERE status IN ('pending', 'running')",
    )
    .ok()
    .flatten()
    .unwrap_or(0);
    let last_error = Spi::get_one::<String>(
        "SELECT id || ': ' || error FROM steep_repl.snapshots WHERE error IS NOT NULL \
         ORDER BY coalesce(finished_at, updated_at) DESC LIMIT 1",
    )
    .ok()
    .flatten();

    let (node_id, peers_total, peers_unreachable) = crate::bookkeeping::nodes::summary();
    let (replication_slots, max_slot_retained_bytes, subscriptions_not_streaming) = Spi::connect(|client| {
        let row = client
            .select(
                "SELECT (SELECT count(*) FROM pg_replication_slots), \
                        (SELECT max(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                                                         ELSE pg_current_wal_lsn() END, restart_lsn))::bigint \
                           FROM pg_replication_slots), \
                        (SELECT count(*) FROM pg_subscription sub \
                           WHERE sub.subenabled \
                             AND sub.subdbid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database()) \
                             AND NOT EXISTS (SELECT FROM pg_stat_subscription st \
                                             WHERE st.subid = sub.oid AND st.relid IS NULL AND st.pid IS NOT NULL))",
                None,
                &[],
            )?
            .first();
        Ok::<_, pgrx::spi::Error>((
            row.get::<i64>(1)?.unwrap_or(0),
            row.get::<i64>(2)?,
            row.get::<i64>(3)?.unwrap_or(0),
        ))
    })
    .unwrap_or((0, None, 0));

    let status = if !preloaded {
        "not preloaded".to_string()
    } else if !supervisor_running {
        "degraded: supervisor worker not running".to_string()
    } else if extension_version.as_deref().is_some_and(|v| v != version()) {
        format!(
            "degraded: library {} but SQL objects {}; run ALTER EXTENSION steep_repl UPDATE",
            version(),
            extension_version.as_deref().unwrap_or("?")
        )
    } else {
        "ok".to_string()
    };

    TableIterator::once((
        status,
        extension_version,
        version().to_string(),
        pg_version,
        preloaded,
        supervisor_running,
        ours_running,
        free_worker_slots,
        active_operations,
        last_error,
        pg::system_identifier(),
        node_id,
        peers_total,
        peers_unreachable,
        replication_slots,
        max_slot_retained_bytes,
        subscriptions_not_streaming,
    ))
}

//! The prober: a short-lived worker the supervisor starts every `steep_repl.heartbeat_interval` in each
//! database that holds a node registry. It connects as the bootstrap superuser, pins its session, beats
//! for the local node, probes every peer at once (`crate::nodes::probe_all`, each probe bounded by
//! `steep_repl.peer_timeout` and by the interval), records what it found, and exits. Probing in a
//! process of its own keeps the supervisor's own heartbeat and slot reaping moving whatever a peer
//! does; a prober still running when the next round is due is left to finish, not doubled.

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::bookkeeping::nodes as book;
use crate::peer::PeerError;
use crate::pg::{self, catalog, rights};
use crate::shmem;

/// Entry point of a prober. `arg` is the database oid.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_prober(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = arg.value() as u32;
    let shared = shmem::require();
    // SIGTERM ends it wherever it waits (a row lock held by an open transaction, say): it has nothing
    // to clean up, and shutdown must not wait for it.
    pg::die_on_sigterm();
    // Read before the registry: a node registered after this is seen by the next round, and keeps
    // this prober from dropping the database's entry.
    let seen = shared.node_watch(db);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);

    // Who to probe; the local beat. An empty registry (or no steep_repl here) ends the probing.
    let peers = BackgroundWorker::transaction(|| {
        rights::pin_session();
        // No wait on a row lock longer than a round.
        let every = crate::gucs::HEARTBEAT_INTERVAL_S.get().max(1);
        crate::pg::session::set("lock_timeout", &format!("{every}s"));
        let installed = catalog::steep_repl_installed();
        if !installed {
            return None;
        }
        let nodes = book::list();
        if nodes.is_empty() {
            return None;
        }
        crate::api::nodes::beat_local();
        Some(
            nodes
                .into_iter()
                .filter(|n| !n.is_local)
                .map(|n| (n.node_id, n.conninfo.unwrap_or_default()))
                .collect::<Vec<_>>(),
        )
    });
    let Some(peers) = peers else {
        if let Some(seen) = seen {
            shared.unwatch_nodes(db, seen);
        }
        return;
    };
    if peers.is_empty() {
        return;
    }
    let mut interrupt = || -> Result<(), PeerError> {
        if BackgroundWorker::sigterm_received() || pg::dying() {
            return Err(PeerError::Interrupted("the server is shutting down".into()));
        }
        Ok(())
    };
    let outcomes = crate::nodes::probe_all(&peers, crate::api::nodes::probe_timeout(), &mut interrupt);
    if outcomes.iter().any(|(_, o)| matches!(o, crate::nodes::Outcome::Interrupted)) {
        return;
    }
    // The session's settings pinned in the first transaction still hold.
    BackgroundWorker::transaction(|| {
        for ((node_id, outcome), (_, conninfo)) in outcomes.iter().zip(&peers) {
            book::record_probe(node_id, conninfo, outcome);
        }
    });
}

//! `subscribe`: the target's half of the LSN hand-off (PRODUCT.md §7).
//!
//! After a completed apply of a snapshot taken with a slot (`start_snapshot(..., slot => ...)`), the
//! subscription is created on that slot without a copy (`create_slot = false, copy_data = false`,
//! disabled), its replication origin (`pg_<subscription oid>`) is advanced to the slot's consistent
//! point recorded in the manifest, sequences are set from the manifest, and it is enabled. The data holds
//! exactly the transactions committed before that point and the slot streams exactly those committed
//! after it, so nothing is lost or applied twice.
//!
//! Before any change, the publisher is asked (through [`crate::peer`], with the server's credentials,
//! bounded by `steep_repl.peer_timeout`) whether it is the server the snapshot came from, whether the
//! slot is still at the snapshot's LSN (a slot consumed in between would skip those changes) and
//! whether the publications exist: every problem is listed in one error.

use std::time::{Duration, Instant};

use pgrx::prelude::*;
use steep_repl_engine::ident::QualifiedName;
use steep_repl_engine::manifest::Manifest;
use steep_repl_engine::replica::{
    HandOff, PublisherFacts, hand_off_statements, publisher_check_sql, publisher_problems,
};

use crate::api::{check_path, require_file_role, user_error};
use crate::bookkeeping::replica as book;
use crate::gucs;
use crate::peer::{Conn, PeerError};

extension_sql!(
    r#"
-- The public name: returns the LSN the subscription starts from.
CREATE FUNCTION steep_repl.subscribe(
    subscription text,
    conninfo text,
    publications text[],
    snapshot_path text,
    enabled boolean DEFAULT true
) RETURNS pg_catalog.pg_lsn
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT steep_repl._subscribe(subscription, conninfo, publications, snapshot_path, enabled)::pg_catalog.pg_lsn $$;
COMMENT ON FUNCTION steep_repl.subscribe(text, text, text[], text, boolean) IS
  'Start logical replication from a snapshot taken with a slot and applied here, at the slot''s LSN';
-- It makes this server connect out with its own credentials: not for every role.
REVOKE ALL ON FUNCTION steep_repl.subscribe(text, text, text[], text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION steep_repl._subscribe(text, text, text[], text, boolean) FROM PUBLIC;
"#,
    name = "subscribe",
    requires = [_subscribe, "subscriptions"]
);

/// The work of `steep_repl.subscribe` (see the module documentation); returns the start LSN as text.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn _subscribe(
    subscription: &str,
    conninfo: &str,
    publications: Vec<String>,
    snapshot_path: &str,
    enabled: bool,
) -> String {
    // SAFETY: reads the transaction state of this backend.
    if unsafe { pgrx::pg_sys::IsTransactionBlock() } {
        user_error(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "steep_repl.subscribe cannot run inside a transaction block".into(),
            Some(
                "Run it as a statement of its own: a replication origin advanced in a transaction that rolls \
                 back later would leave its position behind.",
            ),
        );
    }
    // Before anything else: a superuser. The publisher check below connects with this server's own
    // credentials (its ~/.pgpass, peer or certificate authentication) to a host the caller names, and
    // conninfos with passwords are refused, so PostgreSQL 16's non-superuser subscriptions (which must
    // carry a password: password_required) cannot be made here anyway.
    if !crate::pg::rights::is_superuser() {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to subscribe: the hand-off needs a superuser".into(),
            Some("It makes this server connect to the publisher with its own credentials."),
        );
    }
    if subscription.is_empty() || subscription.len() > 63 {
        invalid(format!("subscription name {subscription:?} must be 1 to 63 bytes long"));
    }
    let publications: Vec<String> = publications.into_iter().filter(|p| !p.is_empty()).collect();
    if publications.is_empty() {
        invalid("publications must name at least one publication on the source".into());
    }
    if let Err(e) = crate::peer::check_conninfo(conninfo) {
        invalid(format!("conninfo: {e}"));
    }
    require_file_role("pg_read_server_files", "read snapshot files on the server");
    let path = check_path("snapshot_path", snapshot_path);
    let (m, sha256) = crate::api::apply::load_manifest(&path);
    let Some(slot) = m.snapshot.replication_slot.clone() else {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("snapshot {} at {path} was taken without a replication slot", m.snapshot_id),
            Some("Take it with steep_repl.start_snapshot(..., slot => 'name') on the source."),
        );
    };
    let Some(apply_id) = book::applied_apply(&path, &m.snapshot_id, &sha256) else {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "this database holds no completed apply of snapshot {} at {path}: the hand-off follows the data",
                m.snapshot_id
            ),
            Some("Run steep_repl.start_apply on this path and wait until its status is 'applied'."),
        );
    };
    if let Some((lsn, at)) = book::handed_off(subscription, &m.snapshot_id) {
        user_error(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!(
                "subscription {subscription:?} was already started from snapshot {} (at LSN {lsn}, {at}); a hand-off is never made twice",
                m.snapshot_id
            ),
            Some("To start again, drop the subscription, then take and apply a new snapshot."),
        );
    }
    // The tables must still hold what that apply loaded: an apply run into them since (another snapshot,
    // or this one again with truncate, finished or not) leaves data that the slot's LSN does not match.
    let relids = crate::api::apply::target_relids(&m);
    let held_elsewhere = crate::bookkeeping::not_held(&apply_id, &relids);
    let not_held: Vec<String> = m
        .tables
        .iter()
        .zip(&relids)
        .filter_map(|(t, relid)| {
            let name = QualifiedName::new(t.schema.clone(), t.name.clone());
            let holder = held_elsewhere.iter().find(|(r, _)| r == relid).map(|(_, h)| h.as_str());
            match (*relid, holder) {
                (0, _) => Some(format!("{name} (dropped since)")),
                (_, None) => None,
                (_, Some("")) => Some(format!("{name} (created again since)")),
                (_, Some(h)) => Some(format!("{name} (loaded by apply {h} since)")),
            }
        })
        .collect();
    if !not_held.is_empty() {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "apply {apply_id} of snapshot {} no longer holds every table: {}",
                m.snapshot_id,
                not_held.join(", ")
            ),
            Some("Apply the snapshot again (truncate => true) and wait until its status is 'applied'."),
        );
    }
    // One slot feeds one subscription: a second one on it would split the changes between the two.
    if let Some(user) = book::slot_subscriber(&slot) {
        user_error(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("replication slot {slot:?} of snapshot {} is already used by {user}", m.snapshot_id),
            Some("A snapshot's slot starts one subscription; take a new snapshot for another."),
        );
    }
    check_publisher(conninfo, &m, &slot, &publications);

    book::record_hand_off(&book::HandOff {
        subscription,
        snapshot_id: &m.snapshot_id,
        snapshot_path: &path,
        apply_id: &apply_id,
        slot_name: &slot,
        start_lsn: &m.snapshot.lsn,
        publications: &publications,
    });
    let statements = hand_off_statements(&HandOff {
        subscription,
        conninfo,
        publications: &publications,
        slot: &slot,
        lsn: &m.snapshot.lsn,
        sequences: &m.sequences,
        enabled,
    });
    for sql in &statements {
        Spi::run(sql).unwrap_or_else(|e| error!("handing off subscription {subscription:?}: {e}"));
    }
    m.snapshot.lsn
}

fn invalid(message: String) -> ! {
    user_error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, None)
}

/// Asks the publisher whether the hand-off can work; one ERROR lists every problem.
fn check_publisher(conninfo: &str, m: &Manifest, slot: &str, publications: &[String]) {
    let timeout = Duration::from_secs(gucs::PEER_TIMEOUT_S.get().max(1) as u64);
    let mut interrupt = || -> Result<(), PeerError> {
        pgrx::check_for_interrupts!();
        Ok(())
    };
    let failed = |e: PeerError| -> ! {
        user_error(
            PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            format!("checking the publisher: {e}"),
            Some(
                "The subscription connects with this server's credentials (~/.pgpass of its OS user); \
                 steep_repl.peer_timeout bounds the check.",
            ),
        )
    };
    let conn =
        Conn::connect(conninfo, Instant::now() + timeout, &mut interrupt).unwrap_or_else(|e| failed(e));
    let version = conn
        .query(
            "SELECT pg_catalog.current_setting('server_version_num')",
            Instant::now() + timeout,
            &mut interrupt,
        )
        .unwrap_or_else(|e| failed(e));
    let version: u32 = version
        .rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rows = conn
        .query(&publisher_check_sql(m, slot, publications, version), Instant::now() + timeout, &mut interrupt)
        .unwrap_or_else(|e| failed(e));
    let facts = PublisherFacts::from_columns(|c| rows.get(0, c).map(str::to_string));
    let problems = publisher_problems(&facts, m, slot);
    if !problems.is_empty() {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("cannot subscribe ({} problems): {}", problems.len(), problems.join("; ")),
            None,
        );
    }
}

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
use steep_repl_engine::ident::{QualifiedName, quote_ident, quote_literal};
use steep_repl_engine::manifest::Manifest;

use crate::api::{check_path, require_file_role, user_error};
use crate::bookkeeping::replica::{self as book, HandOff};
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
    check_publisher(conninfo, &m, &slot, &publications);

    book::record_hand_off(&HandOff {
        subscription,
        snapshot_id: &m.snapshot_id,
        snapshot_path: &path,
        apply_id: &apply_id,
        slot_name: &slot,
        start_lsn: &m.snapshot.lsn,
        publications: &publications,
    });
    let pubs: Vec<String> = publications.iter().map(|p| quote_ident(p)).collect();
    run(
        &format!(
            "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} \
             WITH (create_slot = false, slot_name = {}, copy_data = false, enabled = false)",
            quote_ident(subscription),
            quote_literal(conninfo),
            pubs.join(", "),
            quote_literal(&slot),
        ),
        "creating the subscription",
    );
    set_sequences(&m);
    // Last but the enabling: nothing that can fail comes between the advance and the end.
    let origin = Spi::get_one_with_args::<String>(
        "SELECT 'pg_' OPERATOR(pg_catalog.||) s.oid::text FROM pg_catalog.pg_subscription s \
         JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) s.subdbid \
         WHERE s.subname OPERATOR(pg_catalog.=) $1::pg_catalog.name \
           AND d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()",
        &[subscription.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("subscription {subscription:?} was created but cannot be found"));
    Spi::run_with_args(
        "SELECT pg_catalog.pg_replication_origin_advance($1, $2::pg_catalog.pg_lsn)",
        &[origin.as_str().into(), m.snapshot.lsn.as_str().into()],
    )
    .unwrap_or_else(|e| error!("advancing replication origin {origin} to {}: {e}", m.snapshot.lsn));
    if enabled {
        run(&format!("ALTER SUBSCRIPTION {} ENABLE", quote_ident(subscription)), "enabling the subscription");
    }
    m.snapshot.lsn
}

fn invalid(message: String) -> ! {
    user_error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, None)
}

fn run(sql: &str, what: &str) {
    Spi::run(sql).unwrap_or_else(|e| error!("{what}: {e}"));
}

/// Sets every sequence of the manifest to its value at the snapshot.
fn set_sequences(m: &Manifest) {
    for s in &m.sequences {
        let q = QualifiedName::new(s.schema.clone(), s.name.clone()).to_string();
        Spi::run_with_args(
            "SELECT pg_catalog.setval($1::pg_catalog.regclass, $2, $3)",
            &[q.as_str().into(), s.last_value.into(), s.is_called.into()],
        )
        .unwrap_or_else(|e| error!("setting sequence {q}: {e}"));
    }
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
    let sql = format!(
        "SELECT (SELECT system_identifier::text FROM pg_catalog.pg_control_system()) AS sysid, \
                s.slot_name IS NOT NULL AS slot_exists, s.plugin::text AS plugin, s.slot_type AS slot_type, \
                s.database::text AS database, s.confirmed_flush_lsn::text AS lsn, s.active::text AS active, \
                pg_catalog.array_to_string(ARRAY(SELECT p FROM pg_catalog.unnest({pubs}) p \
                  WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = p)), ',') AS missing \
         FROM (SELECT 1) one LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = {slot}",
        pubs = steep_repl_engine::schema::text_array_literal(Some(publications)),
        slot = quote_literal(slot),
    );
    let rows = conn.query(&sql, Instant::now() + timeout, &mut interrupt).unwrap_or_else(|e| failed(e));
    let get = |c: &str| rows.get(0, c).unwrap_or_default().to_string();
    let mut problems = Vec::new();
    if get("sysid") != m.source.system_identifier {
        problems.push(format!(
            "the publisher is not the server the snapshot was taken on (system identifier {} against {} in the manifest)",
            get("sysid"),
            m.source.system_identifier
        ));
    }
    if get("slot_exists") != "t" {
        problems.push(format!("replication slot {slot:?} does not exist on the publisher"));
    } else {
        if get("slot_type") != "logical" || get("plugin") != crate::pg::slot::PLUGIN {
            problems.push(format!("replication slot {slot:?} is not a logical pgoutput slot"));
        }
        if get("database") != m.source.database {
            problems.push(format!(
                "replication slot {slot:?} belongs to database {:?}, the snapshot to {:?}",
                get("database"),
                m.source.database
            ));
        }
        if get("lsn") != m.snapshot.lsn {
            problems.push(format!(
                "replication slot {slot:?} is at {}, no longer at the snapshot's LSN {}: the changes in between were consumed elsewhere and would be missing",
                get("lsn"),
                m.snapshot.lsn
            ));
        }
        if get("active") == "true" {
            problems.push(format!("replication slot {slot:?} is in use by another connection"));
        }
    }
    let missing = get("missing");
    if !missing.is_empty() {
        problems.push(format!("publication(s) {missing} do not exist on the publisher"));
    }
    if !problems.is_empty() {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("cannot subscribe ({} problems): {}", problems.len(), problems.join("; ")),
            None,
        );
    }
}

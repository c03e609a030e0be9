//! Statements on `steep_repl.subscriptions` (extension/sql/subscriptions.sql) and the apply rows a
//! hand-off needs. Writes run as the extension owner through [`as_owner`]; every statement runs with
//! `search_path` pinned to `pg_catalog, pg_temp`.

use pgrx::prelude::*;

use crate::pg::rights::as_owner;

/// The id of a completed (`applied`) apply in this database of the snapshot `snapshot_id` read from
/// `path`, whose manifest had SHA-256 `manifest_sha256` (the same bytes as now), if there is one.
pub fn applied_apply(path: &str, snapshot_id: &str, manifest_sha256: &str) -> Option<String> {
    Spi::connect(|client| -> Result<Option<String>, pgrx::spi::Error> {
        let t = client.select(
            "SELECT id FROM steep_repl.snapshots \
             WHERE op = 'apply' AND status = 'applied' AND path = $1 \
               AND database_name OPERATOR(pg_catalog.=) pg_catalog.current_database() \
               AND options->>'snapshot_id' = $2 AND options->>'manifest_sha256' = $3 \
             ORDER BY finished_at DESC LIMIT 1",
            Some(1),
            &[path.into(), snapshot_id.into(), manifest_sha256.into()],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        t.first().get::<String>(1)
    })
    .unwrap_or_else(|e| error!("reading the applies of {path}: {e}"))
}

/// A subscription of this cluster (any database) on a slot named `slot`, as "subscription S in
/// database D", if there is one.
pub fn slot_subscriber(slot: &str) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT (SELECT pg_catalog.format('subscription %I in database %I', s.subname, d.datname) \
         FROM pg_catalog.pg_subscription s JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) s.subdbid \
         WHERE s.subslotname OPERATOR(pg_catalog.=) $1 ORDER BY 1 LIMIT 1)",
        &[slot.into()],
    )
    .unwrap_or_else(|e| error!("reading the subscriptions of slot {slot}: {e}"))
}

/// A hand-off already made: (start LSN, when), if `subscription` was started from `snapshot_id`.
pub fn handed_off(subscription: &str, snapshot_id: &str) -> Option<(String, String)> {
    Spi::connect(|client| -> Result<Option<(String, String)>, pgrx::spi::Error> {
        let t = client.select(
            "SELECT start_lsn::text, created_at::text FROM steep_repl.subscriptions \
             WHERE subscription = $1 AND snapshot_id = $2",
            Some(1),
            &[subscription.into(), snapshot_id.into()],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let r = t.first();
        Ok(Some((r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?.unwrap_or_default())))
    })
    .unwrap_or_else(|e| error!("reading steep_repl.subscriptions: {e}"))
}

/// What [`record_hand_off`] stores.
pub struct HandOff<'a> {
    pub subscription: &'a str,
    pub snapshot_id: &'a str,
    pub snapshot_path: &'a str,
    pub apply_id: &'a str,
    pub slot_name: &'a str,
    pub start_lsn: &'a str,
    pub publications: &'a [String],
}

/// Records a hand-off, in the caller's transaction (it commits or rolls back with the subscription).
pub fn record_hand_off(h: &HandOff<'_>) {
    as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO steep_repl.subscriptions (subscription, snapshot_id, snapshot_path, apply_id, \
             slot_name, start_lsn, publications, role_name) \
             VALUES ($1, $2, $3, $4, $5, $6::pg_catalog.pg_lsn, $7, $8)",
            &[
                h.subscription.into(),
                h.snapshot_id.into(),
                h.snapshot_path.into(),
                h.apply_id.into(),
                h.slot_name.into(),
                h.start_lsn.into(),
                h.publications.to_vec().into(),
                crate::pg::current_user_name().into(),
            ],
        )
    })
    .unwrap_or_else(|e| error!("recording the hand-off of subscription {:?}: {e}", h.subscription));
}

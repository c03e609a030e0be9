//! The LSN hand-off of a logical replica started from a snapshot (PRODUCT.md §7), as SQL text: what
//! the extension's `steep_repl.subscribe` runs through SPI and what the CLI runs in client mode, so both
//! make the same hand-off and refuse the same publishers.
//!
//! The snapshot was read at the slot's consistent point (its LSN is in the manifest): the data holds
//! exactly the transactions committed before it, and the slot streams exactly those committed after.
//! The subscription is created on that slot without a copy and disabled, sequences are set from the
//! manifest, its replication origin (`pg_<subscription oid>`) is advanced to the LSN, and it is
//! enabled, all in one transaction.

use crate::ident::{QualifiedName, quote_ident, quote_literal};
use crate::manifest::{Manifest, SequenceEntry};

/// What one hand-off needs.
#[derive(Debug, Clone)]
pub struct HandOff<'a> {
    pub subscription: &'a str,
    /// How the subscriber reaches the publisher.
    pub conninfo: &'a str,
    pub publications: &'a [String],
    /// The manifest's slot and LSN.
    pub slot: &'a str,
    pub lsn: &'a str,
    pub sequences: &'a [SequenceEntry],
    /// Enable the subscription at the end (else it stays disabled, ready).
    pub enabled: bool,
}

/// The statements of the hand-off, in order, to run in one transaction. The origin advance fails
/// (naming the subscription) rather than doing nothing if the subscription cannot be found.
pub fn hand_off_statements(h: &HandOff<'_>) -> Vec<String> {
    let pubs: Vec<String> = h.publications.iter().map(|p| quote_ident(p)).collect();
    let mut v = vec![format!(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} \
         WITH (create_slot = false, slot_name = {}, copy_data = false, enabled = false)",
        quote_ident(h.subscription),
        quote_literal(h.conninfo),
        pubs.join(", "),
        quote_literal(h.slot),
    )];
    for s in h.sequences {
        let q = QualifiedName::new(s.schema.clone(), s.name.clone()).to_string();
        v.push(format!(
            "SELECT pg_catalog.setval({}::pg_catalog.regclass, {}, {})",
            quote_literal(&q),
            s.last_value,
            s.is_called
        ));
    }
    v.push(format!(
        "SELECT pg_catalog.pg_replication_origin_advance(\
           coalesce((SELECT 'pg_' OPERATOR(pg_catalog.||) s.oid::pg_catalog.text \
                     FROM pg_catalog.pg_subscription s \
                     JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) s.subdbid \
                     WHERE s.subname OPERATOR(pg_catalog.=) {sub} \
                       AND d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()), \
                    {missing}), \
           {lsn}::pg_catalog.pg_lsn)",
        sub = quote_literal(h.subscription),
        missing = quote_literal(&format!("subscription {} not found", h.subscription)),
        lsn = quote_literal(h.lsn),
    ));
    if h.enabled {
        v.push(format!("ALTER SUBSCRIPTION {} ENABLE", quote_ident(h.subscription)));
    }
    v
}

/// The query that asks the publisher for the facts [`publisher_problems`] checks: one row with
/// columns sysid, slot_exists, plugin, slot_type, database, lsn, active, missing (publications
/// absent, comma-separated).
pub fn publisher_check_sql(slot: &str, publications: &[String]) -> String {
    format!(
        "SELECT (SELECT system_identifier::pg_catalog.text FROM pg_catalog.pg_control_system()) AS sysid, \
                (s.slot_name IS NOT NULL)::pg_catalog.text AS slot_exists, s.plugin::pg_catalog.text AS plugin, \
                s.slot_type AS slot_type, s.database::pg_catalog.text AS database, \
                s.confirmed_flush_lsn::pg_catalog.text AS lsn, s.active::pg_catalog.text AS active, \
                pg_catalog.array_to_string(ARRAY(SELECT p FROM pg_catalog.unnest({pubs}) p \
                  WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname OPERATOR(pg_catalog.=) p)), ',') AS missing \
         FROM (SELECT 1) one LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name OPERATOR(pg_catalog.=) {slot}",
        pubs = crate::schema::text_array_literal(Some(publications)),
        slot = quote_literal(slot),
    )
}

/// The publisher's answer to [`publisher_check_sql`], as text (`slot_exists` and `active` are
/// `true`/`false`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherFacts {
    pub sysid: String,
    pub slot_exists: String,
    pub plugin: String,
    pub slot_type: String,
    pub database: String,
    pub lsn: String,
    pub active: String,
    pub missing: String,
}

/// Every reason the publisher cannot take the hand-off of `manifest` (taken with `slot`): another
/// server, a missing or foreign slot, a slot that moved past the snapshot's LSN (the changes in
/// between were consumed elsewhere and would be missing), a slot in use, missing publications.
pub fn publisher_problems(f: &PublisherFacts, manifest: &Manifest, slot: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if f.sysid != manifest.source.system_identifier {
        problems.push(format!(
            "the publisher is not the server the snapshot was taken on (system identifier {} against {} in the manifest)",
            f.sysid, manifest.source.system_identifier
        ));
    }
    if f.slot_exists != "true" {
        problems.push(format!("replication slot {slot:?} does not exist on the publisher"));
    } else {
        if f.slot_type != "logical" || f.plugin != "pgoutput" {
            problems.push(format!("replication slot {slot:?} is not a logical pgoutput slot"));
        }
        if f.database != manifest.source.database {
            problems.push(format!(
                "replication slot {slot:?} belongs to database {:?}, the snapshot to {:?}",
                f.database, manifest.source.database
            ));
        }
        if f.lsn != manifest.snapshot.lsn {
            problems.push(format!(
                "replication slot {slot:?} is at {}, no longer at the snapshot's LSN {}: the changes in between were consumed elsewhere and would be missing",
                f.lsn, manifest.snapshot.lsn
            ));
        }
        if f.active == "true" {
            problems.push(format!("replication slot {slot:?} is in use by another connection"));
        }
    }
    if !f.missing.is_empty() {
        problems.push(format!("publication(s) {} do not exist on the publisher", f.missing));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_quote_every_name_and_end_enabled() {
        let seqs =
            vec![SequenceEntry { schema: "s".into(), name: "q\"x".into(), last_value: 42, is_called: true }];
        let pubs = vec!["p'1".to_string(), "P2".to_string()];
        let h = HandOff {
            subscription: "Sub",
            conninfo: "host=a dbname='b c'",
            publications: &pubs,
            slot: "sub",
            lsn: "0/16B3748",
            sequences: &seqs,
            enabled: true,
        };
        let v = hand_off_statements(&h);
        assert_eq!(v.len(), 4);
        assert!(v[0].starts_with(
            "CREATE SUBSCRIPTION \"Sub\" CONNECTION 'host=a dbname=''b c''' PUBLICATION \"p'1\", \"P2\""
        ));
        assert!(v[0].contains("create_slot = false, slot_name = 'sub', copy_data = false, enabled = false"));
        assert!(v[1].contains("'\"s\".\"q\"\"x\"'::pg_catalog.regclass, 42, true"));
        assert!(
            v[2].contains("'0/16B3748'::pg_catalog.pg_lsn")
                && v[2].contains("s.subname OPERATOR(pg_catalog.=) 'Sub'")
        );
        assert_eq!(v[3], "ALTER SUBSCRIPTION \"Sub\" ENABLE");
        assert_eq!(hand_off_statements(&HandOff { enabled: false, ..h }).len(), 3);
    }
}

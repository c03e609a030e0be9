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

/// PostgreSQL's rule for replication slot names (ReplicationSlotValidateName): 1 to 63 bytes of
/// lower-case letters, digits and underscores. The error names the slot.
pub fn check_slot_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("replication slot name {name:?} must be 1 to 63 characters long"));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err(format!(
            "replication slot name {name:?} may contain only lower-case letters, digits and underscores"
        ));
    }
    Ok(())
}

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

/// The query that asks the publisher for the facts [`publisher_problems`] checks, for a hand-off of
/// `manifest` at its slot through `publications`; `version` is the publisher's `server_version_num`
/// (row filters exist from 15 on). One row of text columns: sysid, slot_exists, plugin, slot_type,
/// database, lsn, lsn_matches, active, missing (publications absent), partial (publications that do
/// not publish every action), unpublished (tables of the snapshot the publications leave out),
/// unexpected (tables they publish that the snapshot does not hold), filtered (tables published with
/// a row filter); lists comma-separated.
pub fn publisher_check_sql(manifest: &Manifest, slot: &str, publications: &[String], version: u32) -> String {
    let schemas: Vec<String> = manifest.tables.iter().map(|t| t.schema.clone()).collect();
    let names: Vec<String> = manifest.tables.iter().map(|t| t.name.clone()).collect();
    let pubs = crate::schema::text_array_literal(Some(publications));
    let snapshot_tables = format!(
        "ROWS FROM (pg_catalog.unnest({}), pg_catalog.unnest({})) AS w(s, t)",
        crate::schema::text_array_literal(Some(&schemas)),
        crate::schema::text_array_literal(Some(&names))
    );
    let filtered = if version >= 150000 {
        format!(
            "(SELECT pg_catalog.string_agg(DISTINCT pg_catalog.format('%I.%I', pt.schemaname, pt.tablename), ', ') \
              FROM pg_catalog.pg_publication_tables pt WHERE pt.pubname OPERATOR(pg_catalog.=) ANY ({pubs}) \
              AND pt.rowfilter IS NOT NULL)"
        )
    } else {
        "NULL::pg_catalog.text".to_string()
    };
    format!(
        "SELECT (SELECT system_identifier::pg_catalog.text FROM pg_catalog.pg_control_system()) AS sysid, \
                (s.slot_name IS NOT NULL)::pg_catalog.text AS slot_exists, s.plugin::pg_catalog.text AS plugin, \
                s.slot_type AS slot_type, s.database::pg_catalog.text AS database, \
                s.confirmed_flush_lsn::pg_catalog.text AS lsn, \
                (s.confirmed_flush_lsn OPERATOR(pg_catalog.=) {lsn}::pg_catalog.pg_lsn)::pg_catalog.text AS lsn_matches, \
                s.active::pg_catalog.text AS active, \
                pg_catalog.array_to_string(ARRAY(SELECT p FROM pg_catalog.unnest({pubs}) p \
                  WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname OPERATOR(pg_catalog.=) p)), ', ') AS missing, \
                (SELECT pg_catalog.string_agg(pubname::pg_catalog.text, ', ') FROM pg_catalog.pg_publication \
                  WHERE pubname OPERATOR(pg_catalog.=) ANY ({pubs}) \
                    AND NOT (pubinsert AND pubupdate AND pubdelete AND pubtruncate)) AS partial, \
                (SELECT pg_catalog.string_agg(pg_catalog.format('%I.%I', w.s, w.t), ', ') FROM {snapshot_tables} \
                  JOIN pg_catalog.pg_namespace n ON n.nspname OPERATOR(pg_catalog.=) w.s \
                  JOIN pg_catalog.pg_class c ON c.relnamespace OPERATOR(pg_catalog.=) n.oid AND c.relname OPERATOR(pg_catalog.=) w.t \
                  WHERE c.relkind OPERATOR(pg_catalog.=) 'r' AND c.relpersistence OPERATOR(pg_catalog.=) 'p' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables pt \
                    WHERE pt.pubname OPERATOR(pg_catalog.=) ANY ({pubs}) AND pt.schemaname OPERATOR(pg_catalog.=) w.s \
                      AND pt.tablename OPERATOR(pg_catalog.=) w.t)) AS unpublished, \
                (SELECT pg_catalog.string_agg(DISTINCT pg_catalog.format('%I.%I', pt.schemaname, pt.tablename), ', ') \
                  FROM pg_catalog.pg_publication_tables pt WHERE pt.pubname OPERATOR(pg_catalog.=) ANY ({pubs}) \
                  AND NOT EXISTS (SELECT 1 FROM {snapshot_tables} WHERE w.s OPERATOR(pg_catalog.=) pt.schemaname \
                    AND w.t OPERATOR(pg_catalog.=) pt.tablename)) AS unexpected, \
                {filtered} AS filtered \
         FROM (SELECT 1) one LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name OPERATOR(pg_catalog.=) {slot}",
        lsn = quote_literal(&manifest.snapshot.lsn),
        slot = quote_literal(slot),
    )
}

/// The publisher's answer to [`publisher_check_sql`], as text (booleans as `true`/`false`, NULL as
/// empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherFacts {
    pub sysid: String,
    pub slot_exists: String,
    pub plugin: String,
    pub slot_type: String,
    pub database: String,
    pub lsn: String,
    pub lsn_matches: String,
    pub active: String,
    pub missing: String,
    pub partial: String,
    pub unpublished: String,
    pub unexpected: String,
    pub filtered: String,
}

impl PublisherFacts {
    /// The column names of [`publisher_check_sql`], in order.
    pub const COLUMNS: [&'static str; 13] = [
        "sysid",
        "slot_exists",
        "plugin",
        "slot_type",
        "database",
        "lsn",
        "lsn_matches",
        "active",
        "missing",
        "partial",
        "unpublished",
        "unexpected",
        "filtered",
    ];

    /// Builds the facts from a lookup of each column's text (None for NULL).
    pub fn from_columns(mut get: impl FnMut(&str) -> Option<String>) -> PublisherFacts {
        let mut g = |c: &str| get(c).unwrap_or_default();
        PublisherFacts {
            sysid: g("sysid"),
            slot_exists: g("slot_exists"),
            plugin: g("plugin"),
            slot_type: g("slot_type"),
            database: g("database"),
            lsn: g("lsn"),
            lsn_matches: g("lsn_matches"),
            active: g("active"),
            missing: g("missing"),
            partial: g("partial"),
            unpublished: g("unpublished"),
            unexpected: g("unexpected"),
            filtered: g("filtered"),
        }
    }
}

/// Every reason the publisher cannot take the hand-off of `manifest` (taken with `slot`): another
/// server; a missing or foreign slot, one that moved past the snapshot's LSN (the changes in between
/// were consumed elsewhere and would be missing) or is in use; publications that are missing, leave
/// out a table of the snapshot (its later changes would never arrive), publish a table the snapshot
/// does not hold (its rows before the LSN would be missing), filter rows, or skip an action.
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
        if f.lsn_matches != "true" {
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
    if !f.partial.is_empty() {
        problems.push(format!(
            "publication(s) {} do not publish every INSERT, UPDATE, DELETE and TRUNCATE: the replica would drift",
            f.partial
        ));
    }
    if !f.unpublished.is_empty() {
        problems.push(format!(
            "the publications leave out table(s) of the snapshot: {} (their changes would never arrive)",
            f.unpublished
        ));
    }
    if !f.unexpected.is_empty() {
        problems.push(format!(
            "the publications publish table(s) the snapshot does not hold: {} (their rows from before the snapshot would be missing)",
            f.unexpected
        ));
    }
    if !f.filtered.is_empty() {
        problems
            .push(format!("the publications filter rows of {}: the replica would not be a copy", f.filtered));
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

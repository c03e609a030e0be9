//! What a snapshot contains: the catalog queries that both the extension (through SPI) and the CLI's
//! client mode (over the wire) run, and the rules that turn their rows into tables and sequences, so
//! both modes select exactly the same relations.
//!
//! Included: ordinary tables and leaf partitions (relkind `r`; a partitioned parent has no storage),
//! unlogged tables. Excluded: views, foreign tables, temporary tables, partitioned parents, system
//! schemas, schema `steep_repl`, and tables that belong to an extension (CREATE EXTENSION recreates them).
//! A materialized view or an extension's table is included only when a pattern names it without
//! wildcards. Every pattern must match something; every selected relation must be readable.

use crate::filter::TablePattern;
use crate::ident::QualifiedName;
use crate::manifest::{Column, SequenceEntry};

/// The query of [`TABLES_SQL`] with the expressions of its heap and TOAST size columns, of its two
/// column-list columns, and the joins those need.
macro_rules! tables_sql {
    ($heap:expr, $toast:expr, $names:expr, $types:expr, $joins:expr) => {
        concat!(
            "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text, ",
            $heap,
            ", ",
            $toast,
            ",
       greatest(c.reltuples, 0)::int8,
       pg_catalog.has_table_privilege(c.oid, 'SELECT') AND pg_catalog.has_schema_privilege(n.oid, 'USAGE'), ",
            $names,
            ", ",
            $types,
            ",
       c.oid IN (SELECT d.objid FROM pg_catalog.pg_depend d
                 WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.deptype = 'e'),
       c.relrowsecurity AND pg_catalog.row_security_active(c.oid)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace ",
            $joins,
            "
WHERE c.relkind IN ('r', 'm', 'f', 'p') AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'steep_repl')
  AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp_'
ORDER BY 2, 3"
        )
    };
}

/// The COPY column list of each table (names and `format_type` text, in column order).
macro_rules! columns_join {
    () => {
        "LEFT JOIN LATERAL (
    SELECT array_agg(a.attname::text ORDER BY a.attnum) AS names,
           array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) AS types
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
) cols ON true"
    };
}

/// Lists candidate relations. Columns, in order: oid (int8), schema (text), name (text), relkind (text),
/// heap bytes (int8), TOAST bytes (int8), estimated rows (int8), SELECT allowed (bool), COPY column
/// names (text[]), their types as `format_type` prints them (text[]), member of an extension (bool),
/// row-level security filtering what this role sees (bool).
pub const TABLES_SQL: &str = tables_sql!(
    "pg_catalog.pg_relation_size(c.oid)::int8",
    "(CASE WHEN c.reltoastrelid <> 0 THEN pg_catalog.pg_total_relation_size(c.reltoastrelid) ELSE 0 END)::int8",
    "coalesce(cols.names, '{}')",
    "coalesce(cols.types, '{}')",
    columns_join!()
);

/// [`TABLES_SQL`] for a reader on the server itself, with where the files of the table and of its TOAST
/// table are (text `<tablespace oid>/<relfilenode>`; NULL without storage) in place of their sizes, for
/// the reader to stat them: `pg_relation_size` opens (and locks, until the end of the transaction)
/// every relation, which for a database of many thousands of tables costs more than snapshotting them.
/// Sizes only guide the plan: the last chunk of a table is open-ended, so a table that grew since is
/// still read whole.
///
/// Without the column lists (empty): they cost a catalog index scan per table, which a reader on the
/// server runs apart ([`COLUMNS_SQL`]), while its workers already read the data (the tables are locked,
/// so no column changes meanwhile).
pub const TABLES_BY_FILE_SQL: &str = tables_sql!(
    "CASE WHEN c.relfilenode <> 0 THEN c.reltablespace::text || '/' || c.relfilenode::text END",
    "CASE WHEN t.relfilenode <> 0 THEN t.reltablespace::text || '/' || t.relfilenode::text END",
    "'{}'::text[]",
    "'{}'::text[]",
    "LEFT JOIN pg_catalog.pg_class t ON t.oid = c.reltoastrelid"
);

/// The COPY column lists of the tables whose oids are `$1` (oid[]), as [`TABLES_SQL`] gives them, one
/// row per column in column order: oid (int8), name (text), type (text). One index scan over
/// `pg_attribute` for them all (half the cost of a lateral aggregate per table).
pub const COLUMNS_SQL: &str = "\
SELECT a.attrelid::int8, a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod)
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = ANY ($1::pg_catalog.oid[]) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attrelid, a.attnum";

/// [`TABLES_BY_FILE_SQL`] with no file locations (NULL) and no column lists (empty): which tables exist
/// and may be read, to check a selection or to lock them, at a fraction of the cost.
pub const TABLES_BRIEF_SQL: &str =
    tables_sql!("NULL::text", "NULL::text", "'{}'::text[]", "'{}'::text[]", "");

/// One row of [`TABLES_SQL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRow {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub relkind: String,
    pub heap_bytes: u64,
    pub toast_bytes: u64,
    pub est_rows: u64,
    /// SELECT on the table and USAGE on its schema.
    pub can_select: bool,
    pub column_names: Vec<String>,
    pub column_types: Vec<String>,
    pub extension_member: bool,
    /// Row-level security filters what this role sees of the table.
    pub rls_active: bool,
}

/// A table selected for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMeta {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// Heap blocks now (heap bytes / block size).
    pub blocks: u32,
    pub heap_bytes: u64,
    pub toast_bytes: u64,
    pub est_rows: u64,
    /// COPY's default column list: no dropped, no generated columns.
    pub columns: Vec<Column>,
}

/// Why a selection failed: every problem found, each naming the pattern or relation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct SelectionError {
    pub problems: Vec<String>,
    /// True when the only problems are missing privileges.
    pub permission_only: bool,
}

/// Applies the inclusion rules and `patterns` (none = every user table) to the rows of [`TABLES_SQL`].
pub fn select_tables(
    rows: Vec<TableRow>,
    patterns: &[TablePattern],
    block_size: u64,
) -> Result<Vec<TableMeta>, SelectionError> {
    let mut matched = vec![false; patterns.len()];
    let (mut problems, mut no_select, mut tables) = (Vec::new(), Vec::new(), Vec::new());
    let mut rls = Vec::new();
    // Patterns without wildcards are looked up, the others matched one by one: a selection that
    // names thousands of tables (an overlap scan names each) costs a lookup per table, not a product.
    let mut literal: std::collections::HashMap<(Option<String>, String), Vec<usize>> = Default::default();
    let mut globs = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        match p.literal() {
            Some(key) => literal.entry(key).or_default().push(i),
            None => globs.push(i),
        }
    }
    for row in rows {
        let mut hits: Vec<usize> =
            globs.iter().copied().filter(|&i| patterns[i].matches(&row.schema, &row.name)).collect();
        for key in [(Some(row.schema.clone()), row.name.clone()), (None, row.name.clone())] {
            if let Some(found) = literal.get(&key) {
                hits.extend(found);
            }
        }
        if !patterns.is_empty() && hits.is_empty() {
            continue;
        }
        for &i in &hits {
            matched[i] = true;
        }
        let named = hits.iter().any(|&i| patterns[i].is_literal());
        let qualified = QualifiedName::new(row.schema.clone(), row.name.clone()).to_string();
        let include = match row.relkind.as_str() {
            "r" => !row.extension_member || named,
            "m" => named,
            "p" => false, // its leaf partitions are tables of their own
            _ => {
                if named {
                    problems.push(format!("{qualified} is a foreign table; its data is not in this server"));
                }
                false
            }
        };
        if !include {
            continue;
        }
        if !row.can_select {
            no_select.push(qualified);
            continue;
        }
        if row.rls_active {
            rls.push(qualified);
            continue;
        }
        tables.push(TableMeta {
            oid: row.oid,
            blocks: (row.heap_bytes / block_size.max(1)).min(u64::from(u32::MAX)) as u32,
            heap_bytes: row.heap_bytes,
            toast_bytes: row.toast_bytes,
            est_rows: row.est_rows,
            columns: row
                .column_names
                .into_iter()
                .zip(row.column_types)
                .map(|(name, type_name)| Column { name, type_name })
                .collect(),
            schema: row.schema,
            name: row.name,
        });
    }
    for (p, m) in patterns.iter().zip(&matched) {
        if !m {
            problems.push(format!("no table matches {:?}", p.as_str()));
        }
    }
    let permission_only = problems.is_empty() && !(no_select.is_empty() && rls.is_empty());
    if !no_select.is_empty() {
        problems.push(format!(
            "permission denied: SELECT (and USAGE on its schema) is needed on {}",
            no_select.join(", ")
        ));
    }
    if !rls.is_empty() {
        problems.push(format!(
            "row-level security hides rows of {} from this role, and a snapshot must hold every row: run it as \
             the tables' owner or a role with BYPASSRLS (as pg_dump requires)",
            rls.join(", ")
        ));
    }
    if problems.is_empty() { Ok(tables) } else { Err(SelectionError { problems, permission_only }) }
}

/// Plans the chunks of a snapshot of `tables` for `workers` workers: the chunk size rule of
/// [`crate::plan::effective_chunk_bytes`] applied to `target_chunk_bytes`, then [`crate::plan::plan`].
/// Direct and client mode both call this, so for the same tables they plan the same chunks. Returns the
/// plan and the chunk size used (recorded in the manifest).
pub fn plan_snapshot(
    tables: &[TableMeta],
    target_chunk_bytes: u64,
    workers: u32,
) -> Result<(crate::plan::Plan, u64), crate::error::PlanError> {
    let total: u64 = tables.iter().map(|t| t.heap_bytes + t.toast_bytes).sum();
    let chunk_bytes = crate::plan::effective_chunk_bytes(target_chunk_bytes, total, workers);
    let stats = tables
        .iter()
        .map(|t| crate::plan::TableStats {
            schema: t.schema.clone(),
            name: t.name.clone(),
            blocks: t.blocks,
            heap_bytes: t.heap_bytes,
            toast_bytes: t.toast_bytes,
            est_rows: t.est_rows,
        })
        .collect();
    Ok((crate::plan::plan(stats, chunk_bytes)?, chunk_bytes))
}

/// Lists sequences. Columns: schema (text), name (text), start value (int8), last value or NULL when
/// never called or not readable (int8), SELECT allowed (bool), oid of the owning table if any (int8).
pub const SEQUENCES_SQL: &str = "\
SELECT n.nspname::text, c.relname::text, s.seqstart,
       CASE WHEN pg_catalog.has_sequence_privilege(c.oid, 'SELECT')
            THEN pg_catalog.pg_sequence_last_value(c.oid) END,
       pg_catalog.has_sequence_privilege(c.oid, 'SELECT'),
       (SELECT d.refobjid::int8 FROM pg_catalog.pg_depend d
        WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
          AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_sequence s ON s.seqrelid = c.oid
WHERE c.relkind = 'S' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'steep_repl')
  AND n.nspname !~ '^pg_temp_'
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend e
                  WHERE e.classid = 'pg_catalog.pg_class'::regclass AND e.objid = c.oid AND e.deptype = 'e')
ORDER BY 1, 2";

/// One row of [`SEQUENCES_SQL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceRow {
    pub schema: String,
    pub name: String,
    pub start_value: i64,
    pub last_value: Option<i64>,
    pub can_select: bool,
    pub owner_table: Option<u32>,
}

/// Sequences to record: with patterns, those owned by a selected table (serial and identity columns)
/// and those a pattern matches; without, every user sequence. A never-called sequence is recorded with
/// its start value and `is_called = false`, as `setval(seq, start, false)` restores it.
pub fn select_sequences(
    rows: Vec<SequenceRow>,
    patterns: &[TablePattern],
    table_oids: &[u32],
) -> Result<Vec<SequenceEntry>, SelectionError> {
    let (mut out, mut denied) = (Vec::new(), Vec::new());
    for r in rows {
        let selected = patterns.is_empty()
            || r.owner_table.is_some_and(|o| table_oids.contains(&o))
            || patterns.iter().any(|p| p.matches(&r.schema, &r.name));
        if !selected {
            continue;
        }
        if !r.can_select {
            denied.push(QualifiedName::new(r.schema, r.name).to_string());
            continue;
        }
        out.push(SequenceEntry {
            last_value: r.last_value.unwrap_or(r.start_value),
            is_called: r.last_value.is_some(),
            schema: r.schema,
            name: r.name,
        });
    }
    if denied.is_empty() {
        Ok(out)
    } else {
        Err(SelectionError {
            problems: vec![format!("permission denied: SELECT is needed on sequences {}", denied.join(", "))],
            permission_only: true,
        })
    }
}

/// Server facts for the manifest. Columns: server_version, server_version_num (int4), database,
/// system identifier, server_encoding, TimeZone, block size (int8).
pub const SERVER_INFO_SQL: &str = "\
SELECT current_setting('server_version'), current_setting('server_version_num')::int4,
       current_database()::text, (SELECT system_identifier::text FROM pg_catalog.pg_control_system()),
       current_setting('server_encoding'), current_setting('TimeZone'), current_setting('block_size')::int8";

/// The snapshot's position in the WAL, whether on a primary or a standby.
pub const LSN_SQL: &str = "SELECT (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                           ELSE pg_catalog.pg_current_wal_lsn() END)::text";

#[cfg(test)]
mod tests {
    use super::*;

    fn row(schema: &str, name: &str, relkind: &str) -> TableRow {
        TableRow {
            oid: 1,
            schema: schema.into(),
            name: name.into(),
            relkind: relkind.into(),
            heap_bytes: 8192 * 3,
            toast_bytes: 0,
            est_rows: 10,
            can_select: true,
            column_names: vec!["a".into()],
            column_types: vec!["integer".into()],
            extension_member: false,
            rls_active: false,
        }
    }

    fn pats(p: &[&str]) -> Vec<TablePattern> {
        p.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn default_selection_rules() {
        let mut ext = row("public", "ext_cfg", "r");
        ext.extension_member = true;
        let rows = vec![
            row("public", "t", "r"),
            row("public", "mv", "m"),
            row("public", "parent", "p"),
            row("public", "ft", "f"),
            ext,
        ];
        let got = select_tables(rows, &[], 8192).unwrap();
        assert_eq!(got.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["t"]);
        assert_eq!(got[0].blocks, 3);
        assert_eq!(got[0].columns[0].type_name, "integer");
    }

    #[test]
    fn named_matview_is_included_and_foreign_table_refused() {
        let rows = vec![row("public", "mv", "m"), row("public", "ft", "f")];
        let got = select_tables(rows.clone(), &pats(&["mv"]), 8192).unwrap();
        assert_eq!(got.len(), 1);
        let err = select_tables(rows, &pats(&["ft"]), 8192).unwrap_err();
        assert!(err.to_string().contains("foreign table"), "{err}");
        let none = select_tables(vec![row("public", "mv", "m")], &pats(&["m*"]), 8192).unwrap();
        assert!(none.is_empty(), "a wildcard does not pull in materialized views");
    }

    #[test]
    fn every_problem_is_reported() {
        let mut secret = row("s", "secret", "r");
        secret.can_select = false;
        let err = select_tables(vec![secret], &pats(&["s.*", "nosuch"]), 8192).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.to_string().contains("\"s\".\"secret\""));
        assert!(err.to_string().contains("\"nosuch\""));
        assert!(!err.permission_only);
    }

    #[test]
    fn tables_filtered_by_row_level_security_are_refused() {
        let mut hidden = row("s", "accounts", "r");
        hidden.rls_active = true;
        let err = select_tables(vec![hidden, row("s", "open", "r")], &pats(&[]), 8192).unwrap_err();
        assert!(err.permission_only);
        assert!(err.to_string().contains("row-level security hides rows of \"s\".\"accounts\""), "{err}");
        assert!(!err.to_string().contains("open"), "{err}");
    }

    #[test]
    fn plan_snapshot_shrinks_chunks_of_small_snapshots_for_both_modes() {
        let mb = 1u64 << 20;
        let big = TableMeta {
            oid: 1,
            schema: "public".into(),
            name: "big".into(),
            blocks: (2048 * mb / 8192) as u32,
            heap_bytes: 2048 * mb,
            toast_bytes: 0,
            est_rows: 1,
            columns: vec![],
        };
        let (plan, chunk) = plan_snapshot(std::slice::from_ref(&big), 256 * mb, 2).unwrap();
        assert_eq!(chunk, 64 * mb, "2 GB over 2 workers: 16 chunks each");
        assert_eq!(plan.chunks.len(), 32);
        let (plan, chunk) = plan_snapshot(std::slice::from_ref(&big), 256 * mb, 1).unwrap();
        assert_eq!((chunk, plan.chunks.len()), (128 * mb, 16));
        assert!(plan_snapshot(&[big.clone(), big], 256 * mb, 2).is_err(), "a table listed twice");
    }

    #[test]
    fn sequences_follow_their_tables() {
        let rows = vec![
            SequenceRow {
                schema: "public".into(),
                name: "t_id_seq".into(),
                start_value: 1,
                last_value: Some(5),
                can_select: true,
                owner_table: Some(7),
            },
            SequenceRow {
                schema: "public".into(),
                name: "other".into(),
                start_value: 3,
                last_value: None,
                can_select: true,
                owner_table: None,
            },
        ];
        let got = select_sequences(rows.clone(), &pats(&["t"]), &[7]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].last_value, got[0].is_called), (5, true));
        let all = select_sequences(rows, &[], &[]).unwrap();
        assert_eq!((all[1].last_value, all[1].is_called), (3, false));
    }
}

//! What to snapshot, read from the catalogs through SPI: tables with their sizes and COPY column lists,
//! sequences, and facts about the server.
//!
//! Included: ordinary tables and leaf partitions (relkind `r`; a partitioned parent has no storage),
//! unlogged tables. Excluded: views, foreign tables, temporary tables, partitioned parents, system
//! schemas, schema `steep_repl`, and tables that belong to an extension (CREATE EXTENSION recreates them);
//! a materialized view or an extension's table is included only when a pattern names it without
//! wildcards.

use pgrx::prelude::*;
use steep_repl_engine::filter::TablePattern;
use steep_repl_engine::ident::quote_ident;
use steep_repl_engine::manifest::Column;

/// One table to snapshot.
#[derive(Debug, Clone)]
pub struct TableMeta {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub blocks: u32,
    pub heap_bytes: u64,
    pub toast_bytes: u64,
    pub est_rows: u64,
    /// COPY's default column list: no dropped, no generated columns.
    pub columns: Vec<Column>,
}

/// One sequence to record.
#[derive(Debug, Clone)]
pub struct SequenceMeta {
    pub schema: String,
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

const TABLES_SQL: &str = "\
SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text,
       pg_catalog.pg_relation_size(c.oid)::int8,
       CASE WHEN c.reltoastrelid <> 0 THEN pg_catalog.pg_total_relation_size(c.reltoastrelid) ELSE 0 END::int8,
       greatest(c.reltuples, 0)::int8,
       pg_catalog.has_table_privilege(c.oid, 'SELECT'),
       coalesce(cols.names, '{}'), coalesce(cols.types, '{}'),
       EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
               WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN LATERAL (
    SELECT array_agg(a.attname::text ORDER BY a.attnum) AS names,
           array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) AS types
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
) cols ON true
WHERE c.relkind IN ('r', 'm', 'f', 'p') AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'steep_repl')
  AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp_'
ORDER BY 2, 3";

/// Lists the tables to snapshot. With `patterns` empty: every user table. Errors name every pattern that
/// matched nothing, every named relation that cannot be snapshotted, and every table the current user
/// may not SELECT from.
pub fn list_tables(patterns: &[TablePattern]) -> Result<Vec<TableMeta>, String> {
    let block_size = pgrx::pg_sys::BLCKSZ as u64;
    let mut tables = Vec::new();
    let mut matched = vec![false; patterns.len()];
    let mut problems = Vec::new();
    let mut no_select = Vec::new();
    Spi::connect(|client| -> Result<(), pgrx::spi::Error> {
        for row in client.select(TABLES_SQL, None, &[])? {
            let oid = row.get::<i64>(1)?.unwrap_or(0) as u32;
            let schema = row.get::<String>(2)?.unwrap_or_default();
            let name = row.get::<String>(3)?.unwrap_or_default();
            let relkind = row.get::<String>(4)?.unwrap_or_default();
            let ext_member = row.get::<bool>(11)?.unwrap_or(false);
            let hits: Vec<usize> = patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| p.matches(&schema, &name))
                .map(|(i, _)| i)
                .collect();
            let named = hits.iter().any(|&i| patterns[i].is_literal());
            if !patterns.is_empty() && hits.is_empty() {
                continue;
            }
            for &i in &hits {
                matched[i] = true;
            }
            let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
            let include = match relkind.as_str() {
                "r" => !ext_member || named,
                "m" => named,
                "p" => false, // its leaf partitions are tables of their own
                _ => {
                    if named {
                        problems
                            .push(format!("{qualified} is a foreign table; its data is not in this server"));
                    }
                    false
                }
            };
            if !include {
                continue;
            }
            if !row.get::<bool>(8)?.unwrap_or(false) {
                no_select.push(qualified);
                continue;
            }
            let names = row.get::<Vec<String>>(9)?.unwrap_or_default();
            let types = row.get::<Vec<String>>(10)?.unwrap_or_default();
            let heap_bytes = row.get::<i64>(5)?.unwrap_or(0).max(0) as u64;
            tables.push(TableMeta {
                oid,
                schema,
                name,
                blocks: (heap_bytes / block_size) as u32,
                heap_bytes,
                toast_bytes: row.get::<i64>(6)?.unwrap_or(0).max(0) as u64,
                est_rows: row.get::<i64>(7)?.unwrap_or(0).max(0) as u64,
                columns: names
                    .into_iter()
                    .zip(types)
                    .map(|(name, type_name)| Column { name, type_name })
                    .collect(),
            });
        }
        Ok(())
    })
    .map_err(|e| format!("listing tables: {e}"))?;
    for (p, m) in patterns.iter().zip(&matched) {
        if !m {
            problems.push(format!("no table matches {:?}", p.as_str()));
        }
    }
    if !no_select.is_empty() {
        problems.push(format!("permission denied: SELECT is needed on {}", no_select.join(", ")));
    }
    if problems.is_empty() { Ok(tables) } else { Err(problems.join("; ")) }
}

const SEQUENCES_SQL: &str = "\
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

/// Lists sequences with their current state. With patterns: the sequences owned by a selected table
/// (serial and identity columns) and those a pattern matches; without: every user sequence.
pub fn list_sequences(patterns: &[TablePattern], table_oids: &[u32]) -> Result<Vec<SequenceMeta>, String> {
    let mut out = Vec::new();
    let mut denied = Vec::new();
    Spi::connect(|client| -> Result<(), pgrx::spi::Error> {
        for row in client.select(SEQUENCES_SQL, None, &[])? {
            let schema = row.get::<String>(1)?.unwrap_or_default();
            let name = row.get::<String>(2)?.unwrap_or_default();
            let owner = row.get::<i64>(6)?.map(|o| o as u32);
            let selected = patterns.is_empty()
                || owner.is_some_and(|o| table_oids.contains(&o))
                || patterns.iter().any(|p| p.matches(&schema, &name));
            if !selected {
                continue;
            }
            if !row.get::<bool>(5)?.unwrap_or(false) {
                denied.push(format!("{}.{}", quote_ident(&schema), quote_ident(&name)));
                continue;
            }
            let last = row.get::<i64>(4)?;
            out.push(SequenceMeta {
                schema,
                name,
                last_value: last.or(row.get::<i64>(3)?).unwrap_or(1),
                is_called: last.is_some(),
            });
        }
        Ok(())
    })
    .map_err(|e| format!("listing sequences: {e}"))?;
    if denied.is_empty() {
        Ok(out)
    } else {
        Err(format!("permission denied: SELECT is needed on sequences {}", denied.join(", ")))
    }
}

/// Facts about the server recorded in the manifest.
#[derive(Debug, Clone, Default)]
pub struct ServerInfo {
    pub server_version: String,
    pub server_version_num: u32,
    pub database: String,
    pub system_identifier: String,
    pub server_encoding: String,
    pub timezone: String,
}

/// Reads the server facts of the manifest.
pub fn server_info() -> Result<ServerInfo, String> {
    Spi::connect(|client| -> Result<ServerInfo, pgrx::spi::Error> {
        let row = client
            .select(
                "SELECT current_setting('server_version'), current_setting('server_version_num')::int4, \
                 current_database()::text, (SELECT system_identifier::text FROM pg_catalog.pg_control_system()), \
                 current_setting('server_encoding'), current_setting('TimeZone')",
                Some(1),
                &[],
            )?
            .first();
        Ok(ServerInfo {
            server_version: row.get::<String>(1)?.unwrap_or_default(),
            server_version_num: row.get::<i32>(2)?.unwrap_or(0) as u32,
            database: row.get::<String>(3)?.unwrap_or_default(),
            system_identifier: row.get::<String>(4)?.unwrap_or_default(),
            server_encoding: row.get::<String>(5)?.unwrap_or_default(),
            timezone: row.get::<String>(6)?.unwrap_or_default(),
        })
    })
    .map_err(|e| format!("reading server facts: {e}"))
}

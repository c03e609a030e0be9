//! `steep_repl.apply_deferred_indexes`: the indexes an apply dropped to build after its data (see
//! `crate::worker::indexes`). A record is written in the transaction that drops its index and deleted in
//! the one that re-creates it.

use pgrx::prelude::*;

use crate::pg::rights::as_owner;

/// An index an apply has dropped, and the statements that re-create it exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferred {
    pub schema: String,
    pub table: String,
    /// The table's oid when the index was deferred (a table dropped and re-created meanwhile is not it).
    pub relid: u32,
    pub index: String,
    pub statements: Vec<String>,
    /// Its full definition (index, constraint, storage options, tablespace, owner) as it was, to compare
    /// the re-created one with.
    pub definition: String,
}

/// Records that apply `id` dropped `d`'s index, in the transaction that drops it. A record of the same
/// index left from before (someone re-created it by hand, and a resume dropped it again) is replaced.
pub fn record(id: &str, d: &Deferred) {
    as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO steep_repl.apply_deferred_indexes \
             (apply_id, relid, schema_name, table_name, index_name, statements, definition) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (apply_id, schema_name, index_name) DO UPDATE SET relid = EXCLUDED.relid, \
               table_name = EXCLUDED.table_name, statements = EXCLUDED.statements, \
               definition = EXCLUDED.definition, deferred_at = EXCLUDED.deferred_at, last_error = NULL",
            &[
                id.into(),
                pgrx::pg_sys::Oid::from(d.relid).into(),
                d.schema.as_str().into(),
                d.table.as_str().into(),
                d.index.as_str().into(),
                d.statements.clone().into(),
                d.definition.as_str().into(),
            ],
        )
    })
    .unwrap_or_else(|e| error!("recording that {id} deferred index {}: {e}", d.index));
}

fn deferred_of(r: &pgrx::spi::SpiHeapTupleData<'_>) -> Result<Deferred, pgrx::spi::Error> {
    Ok(Deferred {
        schema: r.get::<String>(1)?.unwrap_or_default(),
        table: r.get::<String>(2)?.unwrap_or_default(),
        relid: r.get::<pgrx::pg_sys::Oid>(3)?.map(|o| o.to_u32()).unwrap_or_default(),
        index: r.get::<String>(4)?.unwrap_or_default(),
        statements: r.get::<Vec<String>>(5)?.unwrap_or_default(),
        definition: r.get::<String>(6)?.unwrap_or_default(),
    })
}

/// Locks the record of one index apply `id` deferred, to build it in the current transaction: not of a
/// table in `loading`, not locked by another process (`SKIP LOCKED`: a builder in another process has
/// it), not failed in this run nor in `tried` (schema, index: failed in this process); the largest
/// table's first. None when there is none.
pub fn claim(id: &str, loading: &[pgrx::pg_sys::Oid], tried: &[(String, String)]) -> Option<Deferred> {
    let schemas: Vec<&str> = tried.iter().map(|t| t.0.as_str()).collect();
    let indexes: Vec<&str> = tried.iter().map(|t| t.1.as_str()).collect();
    as_owner(|| {
        Spi::connect_mut(|client| -> Result<Option<Deferred>, pgrx::spi::Error> {
            let t = client.update(
                "SELECT d.schema_name, d.table_name, d.relid, d.index_name, d.statements, d.definition \
                 FROM steep_repl.apply_deferred_indexes d \
                 LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.relid \
                 WHERE d.apply_id OPERATOR(pg_catalog.=) $1 AND d.last_error IS NULL \
                   AND d.relid OPERATOR(pg_catalog.<>) ALL ($2::pg_catalog.oid[]) \
                   AND NOT EXISTS (SELECT FROM ROWS FROM (pg_catalog.unnest($3::pg_catalog.text[]), \
                                                         pg_catalog.unnest($4::pg_catalog.text[])) AS t(s, i) \
                                   WHERE t.s OPERATOR(pg_catalog.=) d.schema_name \
                                     AND t.i OPERATOR(pg_catalog.=) d.index_name) \
                 ORDER BY coalesce(c.relpages, 0) DESC, d.relid, d.index_name \
                 LIMIT 1 FOR UPDATE OF d SKIP LOCKED",
                None,
                &[id.into(), loading.to_vec().into(), schemas.into(), indexes.into()],
            )?;
            match t.into_iter().next() {
                Some(r) => deferred_of(&r).map(Some),
                None => Ok(None),
            }
        })
    })
    .unwrap_or_else(|e| error!("claiming an index {id} deferred: {e}"))
}

/// Records why `d`'s index could not be built (the rest of this run passes it over).
pub fn mark_failed(id: &str, d: &Deferred, error: &str) {
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE steep_repl.apply_deferred_indexes SET last_error = $4 \
             WHERE apply_id OPERATOR(pg_catalog.=) $1 AND schema_name OPERATOR(pg_catalog.=) $2 \
               AND index_name OPERATOR(pg_catalog.=) $3",
            &[id.into(), d.schema.as_str().into(), d.index.as_str().into(), error.into()],
        )
    })
    .unwrap_or_else(|e| error!("recording that index {} could not be built: {e}", d.index));
}

/// Makes every index of apply `id` that failed to build eligible again (a resume tries them again).
pub fn clear_failures(id: &str) {
    as_owner(|| {
        Spi::run_with_args(
            "UPDATE steep_repl.apply_deferred_indexes SET last_error = NULL \
             WHERE apply_id OPERATOR(pg_catalog.=) $1 AND last_error IS NOT NULL",
            &[id.into()],
        )
    })
    .unwrap_or_else(|e| error!("clearing the index failures of {id}: {e}"));
}

/// The indexes apply `id` has deferred and not re-created, with the error of a failed build.
pub fn left(id: &str) -> Vec<(Deferred, Option<String>)> {
    Spi::connect(|client| -> Result<Vec<(Deferred, Option<String>)>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for r in client.select(
            "SELECT schema_name, table_name, relid, index_name, statements, definition, last_error \
             FROM steep_repl.apply_deferred_indexes WHERE apply_id OPERATOR(pg_catalog.=) $1 \
             ORDER BY schema_name, index_name",
            None,
            &[id.into()],
        )? {
            v.push((deferred_of(&r)?, r.get::<String>(7)?));
        }
        Ok(v)
    })
    .unwrap_or_else(|e| error!("reading the indexes {id} deferred: {e}"))
}

/// Deletes the record of `d`, in the transaction that re-created its index.
pub fn forget(id: &str, d: &Deferred) {
    as_owner(|| {
        Spi::run_with_args(
            "DELETE FROM steep_repl.apply_deferred_indexes \
             WHERE apply_id OPERATOR(pg_catalog.=) $1 AND schema_name OPERATOR(pg_catalog.=) $2 \
               AND index_name OPERATOR(pg_catalog.=) $3",
            &[id.into(), d.schema.as_str().into(), d.index.as_str().into()],
        )
    })
    .unwrap_or_else(|e| error!("recording that {id} re-created index {}: {e}", d.index));
}

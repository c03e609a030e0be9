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
}

/// Records that apply `id` dropped `d`'s index, in the transaction that drops it.
pub fn record(id: &str, d: &Deferred) {
    as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO steep_repl.apply_deferred_indexes \
             (apply_id, relid, schema_name, table_name, index_name, statements) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                id.into(),
                pgrx::pg_sys::Oid::from(d.relid).into(),
                d.schema.as_str().into(),
                d.table.as_str().into(),
                d.index.as_str().into(),
                d.statements.clone().into(),
            ],
        )
    })
    .unwrap_or_else(|e| error!("recording that {id} deferred index {}: {e}", d.index));
}

/// The indexes apply `id` has deferred and not re-created yet, largest tables first.
pub fn pending(id: &str) -> Vec<Deferred> {
    Spi::connect(|client| -> Result<Vec<Deferred>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for r in client.select(
            "SELECT d.schema_name, d.table_name, d.relid, d.index_name, d.statements \
             FROM steep_repl.apply_deferred_indexes d \
             LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.relid \
             WHERE d.apply_id OPERATOR(pg_catalog.=) $1 \
             ORDER BY coalesce(c.relpages, 0) DESC, d.relid, d.index_name",
            None,
            &[id.into()],
        )? {
            v.push(Deferred {
                schema: r.get::<String>(1)?.unwrap_or_default(),
                table: r.get::<String>(2)?.unwrap_or_default(),
                relid: r.get::<pgrx::pg_sys::Oid>(3)?.map(|o| o.to_u32()).unwrap_or_default(),
                index: r.get::<String>(4)?.unwrap_or_default(),
                statements: r.get::<Vec<String>>(5)?.unwrap_or_default(),
            });
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

/// How many indexes apply `id` has deferred and not re-created.
pub fn count_pending(id: &str) -> i64 {
    Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.count(*) FROM steep_repl.apply_deferred_indexes WHERE apply_id OPERATOR(pg_catalog.=) $1",
        &[id.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(0)
}

//! `steep_repl.overlap_results` and `steep_repl.overlap_keys`: what an overlap analysis found (see
//! `crate::worker::overlap`). A table's row and its keys are written in one transaction, when its
//! comparison ends.

use pgrx::prelude::*;
use steep_repl_engine::copy_text;
use steep_repl_engine::ident::quote_literal;

use crate::pg::rights::as_owner;

/// The outcome of one table.
#[derive(Debug, Clone, Default)]
pub struct TableResult {
    pub schema: String,
    pub table: String,
    pub local_rows: Option<i64>,
    pub peer_rows: Option<i64>,
    pub matched: Option<i64>,
    pub conflict: Option<i64>,
    pub local_only: Option<i64>,
    pub peer_only: Option<i64>,
    pub bytes_exchanged: i64,
    /// `compared`, `skipped` or `truncated`.
    pub status: &'static str,
    pub detail: Option<String>,
}

/// Differing keys of one table: category and the key's COPY text fields (tab-separated, escaped).
pub struct Keys<'a> {
    /// Key columns and their types (`format_type` under `search_path = pg_catalog`), in key order.
    pub columns: &'a [String],
    pub types: &'a [String],
    pub keys: &'a [(&'static str, Vec<u8>)],
}

/// The built-in type to read a key value back as, for a key column of type `format_type` (as printed
/// under `search_path = pg_catalog`, where these names can only be the built-in types): the types whose
/// JSON form is not a string.
fn builtin_json_type(format_type: &str) -> Option<&'static str> {
    Some(match format_type {
        "smallint" => "pg_catalog.int2",
        "integer" => "pg_catalog.int4",
        "bigint" => "pg_catalog.int8",
        "real" => "pg_catalog.float4",
        "double precision" => "pg_catalog.float8",
        "boolean" => "pg_catalog.bool",
        t if t == "numeric" || t.starts_with("numeric(") => "pg_catalog.numeric",
        _ => return None,
    })
}

/// Keys written per statement.
const KEYS_PER_INSERT: usize = 10_000;

/// Records `r` (and `keys`, as JSON objects of the key columns with their types' JSON form) for
/// overlap analysis `id`, in the current transaction.
pub fn record(id: &str, r: &TableResult, keys: Option<Keys<'_>>) {
    as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO steep_repl.overlap_results (overlap_id, schema_name, table_name, local_rows, \
             peer_rows, match, conflict, local_only, peer_only, bytes_exchanged, status, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            &[
                id.into(),
                r.schema.as_str().into(),
                r.table.as_str().into(),
                r.local_rows.into(),
                r.peer_rows.into(),
                r.matched.into(),
                r.conflict.into(),
                r.local_only.into(),
                r.peer_only.into(),
                r.bytes_exchanged.into(),
                r.status.into(),
                r.detail.clone().into(),
            ],
        )?;
        let Some(k) = keys else { return Ok(()) };
        if k.keys.is_empty() {
            return Ok(());
        }
        // jsonb_build_object('col', value, ...): a number, boolean or NULL as JSON's own, anything else as
        // its text. Only built-in types are read back (this runs as the extension's owner: the input
        // function of a domain or a user's type, or a user's cast to json, would run with its rights).
        let n = k.columns.len();
        let pairs: Vec<String> = (0..n)
            .map(|i| {
                let value = match builtin_json_type(&k.types[i]) {
                    Some(t) => format!("(k.f{i})::{t}"),
                    None => format!("k.f{i}"),
                };
                format!("{}::pg_catalog.text, {value}", quote_literal(&k.columns[i]))
            })
            .collect();
        let fields: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
        let casts: Vec<String> =
            (0..n).map(|i| format!("pg_catalog.unnest(${}::pg_catalog.text[])", i + 5)).collect();
        let sql = format!(
            "INSERT INTO steep_repl.overlap_keys (overlap_id, schema_name, table_name, category, key) \
             SELECT $1, $2, $3, k.c, pg_catalog.jsonb_build_object({}) \
             FROM ROWS FROM (pg_catalog.unnest($4::pg_catalog.text[]), {}) AS k(c, {})",
            pairs.join(", "),
            casts.join(", "),
            fields.join(", ")
        );
        for batch in k.keys.chunks(KEYS_PER_INSERT) {
            let categories: Vec<String> = batch.iter().map(|(c, _)| c.to_string()).collect();
            let mut columns: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(batch.len()); n];
            for (_, text) in batch {
                let mut fields = copy_text::split_fields(text);
                for col in columns.iter_mut() {
                    let value = fields
                        .next()
                        .and_then(copy_text::unescape_field)
                        .map(|v| String::from_utf8_lossy(&v).into_owned());
                    col.push(value);
                }
            }
            let mut args: Vec<pgrx::datum::DatumWithOid> =
                vec![id.into(), r.schema.as_str().into(), r.table.as_str().into(), categories.into()];
            for col in columns {
                args.push(col.into());
            }
            Spi::run_with_args(&sql, &args)?;
        }
        Ok::<(), pgrx::spi::Error>(())
    })
    .unwrap_or_else(|e| error!("recording the overlap of {}.{}: {e}", r.schema, r.table));
}

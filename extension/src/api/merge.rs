//! Merge of two nodes (PRODUCT.md §10, second part): `start_merge`, `merge_result`, and the two
//! functions each node runs for the merge's coordinator, `merge_rows` (read rows by key) and
//! `merge_write` (write rows, audited, in one transaction).
//!
//! How a merge runs (see `crate::worker::overlap`): it is an overlap analysis that lists every
//! differing key, followed, table by table (parents before children along foreign keys), by batches of
//! keys: the rows of one-sided keys are read where they are and inserted on the other node; the rows of
//! conflicting keys are settled by the strategy. Rows travel as COPY text printed under the pinned output
//! settings in UTC, and are loaded on the receiving node with COPY into a temporary table, then one
//! `INSERT ... ON CONFLICT DO NOTHING` or `UPDATE` that also writes `steep_repl.merge_audit`: a batch is
//! one transaction, applied and audited whole or not at all. Writes run with
//! `session_replication_role = replica` under the replication origin `steep_merge`, so subscriptions
//! with `origin = none` never send them back.

use pgrx::prelude::*;
use steep_repl_engine::copy_text::{self, PINNED_SETTINGS};
use steep_repl_engine::ident::{quote_ident, quote_literal};
use steep_repl_engine::merge::Strategy;

use crate::api::overlap::{Coordinator, launch_coordinator};
use crate::api::user_error;
use crate::bookkeeping;
use crate::pg::copy_from::{CopySource, copy_into_as};
use crate::pg::{rights, session};
use crate::shmem::FLAG_MERGE;

/// The replication origin every merge write runs under.
pub const MERGE_ORIGIN: &str = "steep_merge";

fn require_superuser(what: &str) {
    if !rights::is_superuser() {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("only a superuser may {what}"),
            Some("A merge reads and writes every row of the merged tables on both nodes, with triggers off."),
        );
    }
}

/// What a merge needs to know of one table on this node.
struct Table {
    /// `schema.table`, quoted.
    name: String,
    /// The table's owner: every piece of code the table's definition brings (triggers, CHECKs, domain
    /// CHECKs, casts to json) runs as this role, never as the merge's superuser.
    owner: pg_sys::Oid,
    /// Columns GENERATED ALWAYS AS IDENTITY: inserted with OVERRIDING SYSTEM VALUE, never updated.
    identity_always: Vec<String>,
    /// COPY's column list (not dropped, not generated), in order, unquoted.
    columns: Vec<String>,
    /// The key columns, in key order, unquoted.
    key: Vec<String>,
    /// For each key column, its equality operator as `OPERATOR(schema.=)` (from the key index's
    /// operator class: never resolved through a search path).
    key_ops: Vec<String>,
}

impl Table {
    /// Looks `schema_name.table_name` up; an ERROR when it is missing or `key` is not the columns of its
    /// primary key or replica identity index.
    fn load(schema_name: &str, table_name: &str, key: &[String]) -> Table {
        // A plain table only: FROM ONLY and UPDATE ONLY on a partitioned parent would touch nothing.
        let found = Spi::get_two_with_args::<pg_sys::Oid, pg_sys::Oid>(
            "SELECT c.oid, c.relowner FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
             ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'r'",
            &[schema_name.into(), table_name.into()],
        );
        let (relid, owner) = match found {
            Ok((Some(relid), Some(owner))) => (relid, owner),
            _ => user_error(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("table {schema_name}.{table_name} does not exist (or is not a plain table)"),
                None,
            ),
        };
        let identity_always = Spi::get_one_with_args::<Vec<String>>(
            "SELECT pg_catalog.array_agg(a.attname::pg_catalog.text) FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attidentity = 'a'",
            &[relid.into()],
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        let columns = crate::pg::catalog::copy_columns(relid)
            .unwrap_or_else(|e| error!("reading the columns of {schema_name}.{table_name}: {e}"));
        // The key index: the primary key, else the replica identity index; its columns with the
        // equality operator of each column's operator class.
        let ops: Vec<(String, String)> = Spi::connect(|client| {
            let rows = client.select(
                "WITH x AS (SELECT i.indexrelid, i.indkey, i.indclass FROM pg_catalog.pg_index i \
                  WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident) \
                  ORDER BY i.indisprimary DESC LIMIT 1) \
                 SELECT a.attname::pg_catalog.text, \
                        pg_catalog.format('OPERATOR(%I.%s)', n.nspname, o.oprname) \
                 FROM x CROSS JOIN LATERAL pg_catalog.generate_subscripts(x.indkey, 1) AS s(i) \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = $1 AND a.attnum = x.indkey[s.i] \
                 JOIN pg_catalog.pg_opclass c ON c.oid = x.indclass[s.i] \
                 JOIN pg_catalog.pg_amop ao ON ao.amopfamily = c.opcfamily AND ao.amoplefttype = c.opcintype \
                  AND ao.amoprighttype = c.opcintype AND ao.amopstrategy = 3 \
                 JOIN pg_catalog.pg_operator o ON o.oid = ao.amopopr \
                 JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace \
                 ORDER BY s.i",
                None,
                &[relid.into()],
            )?;
            let mut out = Vec::new();
            for r in rows {
                out.push((r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?.unwrap_or_default()));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .unwrap_or_else(|e| error!("reading the key of {schema_name}.{table_name}: {e}"));
        let index_columns: Vec<&String> = ops.iter().map(|(c, _)| c).collect();
        if index_columns != key.iter().collect::<Vec<_>>() {
            user_error(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!(
                    "{schema_name}.{table_name}: the key ({}) is not its primary key or replica identity index ({})",
                    key.join(", "),
                    index_columns.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
                ),
                None,
            );
        }
        Table {
            name: format!("{}.{}", quote_ident(schema_name), quote_ident(table_name)),
            owner,
            identity_always,
            columns,
            key: key.to_vec(),
            key_ops: ops.into_iter().map(|(_, op)| op).collect(),
        }
    }

    /// `a.k1 OPERATOR(..) b.k1 AND ...`
    fn key_join(&self, a: &str, b: &str) -> String {
        self.key
            .iter()
            .zip(&self.key_ops)
            .map(|(k, op)| format!("{a}.{q} {op} {b}.{q}", q = quote_ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `jsonb_build_object('k1', alias.k1, ...)`
    fn key_json(&self, alias: &str) -> String {
        let pairs: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("{}::pg_catalog.text, {alias}.{}", quote_literal(k), quote_ident(k)))
            .collect();
        format!("pg_catalog.jsonb_build_object({})", pairs.join(", "))
    }

    fn column_list(&self, alias: Option<&str>) -> String {
        let prefix = alias.map(|a| format!("{a}.")).unwrap_or_default();
        self.columns.iter().map(|c| format!("{prefix}{}", quote_ident(c))).collect::<Vec<_>>().join(", ")
    }
}

/// Feeds a byte slice to COPY FROM.
struct Bytes<'a> {
    data: &'a [u8],
}

impl CopySource for Bytes<'_> {
    fn read_into(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        n
    }
}

/// The settings rows are printed and parsed under on both nodes.
fn pinned() -> Vec<(&'static str, &'static str)> {
    let mut s: Vec<(&str, &str)> = PINNED_SETTINGS.to_vec();
    s.push(("TimeZone", "UTC"));
    s
}

/// Creates (again) the temporary table `pg_temp.<name>`, dropped at commit, which `t`'s owner may read
/// and fill: with `columns` of `t`, loaded with `data` (COPY text of those columns, COPY's code running
/// as `t`'s owner); or, with `columns` empty, the jsonb columns key, old_row and new_row, where the
/// owner's statements leave what the audit records.
fn load_temp(name: &str, t: &Table, columns: &[String], data: &[u8]) {
    let list = columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
    let create = if columns.is_empty() {
        format!(
            "CREATE TEMPORARY TABLE {name} (key pg_catalog.jsonb, old_row pg_catalog.jsonb, \
             new_row pg_catalog.jsonb) ON COMMIT DROP"
        )
    } else {
        format!(
            "CREATE TEMPORARY TABLE {name} ON COMMIT DROP AS SELECT {list} FROM ONLY {} WITH NO DATA",
            t.name
        )
    };
    let owner_name = Spi::get_one_with_args::<String>(
        "SELECT rolname::pg_catalog.text FROM pg_catalog.pg_roles WHERE oid = $1",
        &[t.owner.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("the owner of {} has disappeared", t.name));
    Spi::run(&format!("DROP TABLE IF EXISTS pg_temp.{name}"))
        .and_then(|_| Spi::run(&create))
        .and_then(|_| {
            Spi::run(&format!("GRANT SELECT, INSERT ON pg_temp.{name} TO {}", quote_ident(&owner_name)))
        })
        .unwrap_or_else(|e| error!("creating a temporary table for {}: {e}", t.name));
    if columns.is_empty() {
        return;
    }
    let relid =
        Spi::get_one::<pg_sys::Oid>(&format!("SELECT 'pg_temp.{name}'::pg_catalog.regclass::pg_catalog.oid"))
            .ok()
            .flatten()
            .unwrap_or_else(|| error!("the temporary table {name} has disappeared"));
    copy_into_as(relid, columns, None, &mut Bytes { data }, Some(t.owner));
}

/// The rows of `schema_name.table_name` whose key is one of `keys`, as COPY text in COPY's column order.
/// `key_columns` names the table's key (its primary key or replica identity index, in order) and `keys`
/// holds one COPY text line per key (the key columns' fields). Printed under the pinned output settings
/// in UTC, as the other node prints them. Superusers only.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn merge_rows(schema_name: &str, table_name: &str, key_columns: Vec<String>, keys: &[u8]) -> Vec<u8> {
    require_superuser("read rows for a merge");
    rows_by_key(schema_name, table_name, &key_columns, keys)
}

/// [`merge_rows`], callable in this process.
pub fn rows_by_key(schema_name: &str, table_name: &str, key_columns: &[String], keys: &[u8]) -> Vec<u8> {
    let t = Table::load(schema_name, table_name, key_columns);
    session::with_settings(&pinned(), || {
        load_temp("steep_merge_keys", &t, &t.key, keys);
        let from = format!("ONLY {} t JOIN pg_temp.steep_merge_keys k ON {}", t.name, t.key_join("t", "k"));
        copy_text_of(&t, &from, &[])
    })
}

/// The rows of `SELECT t.<columns> FROM <from>` (`t` naming a row of `t`'s type) as COPY text in COPY's
/// column order, printed by the columns' output functions as `t`'s owner.
fn copy_text_of(t: &Table, from: &str, args: &[pgrx::datum::DatumWithOid]) -> Vec<u8> {
    let values: Vec<String> = t
        .columns
        .iter()
        .map(|c| {
            // num_nulls, not IS NULL: a composite value whose fields are all NULL is not NULL.
            let q = quote_ident(c);
            format!(
                "CASE WHEN pg_catalog.num_nulls(t.{q}) = 1 THEN NULL ELSE pg_catalog.format('%s', t.{q}) END"
            )
        })
        .collect();
    let sql = format!("SELECT {} FROM {from}", values.join(", "));
    let mut out = Vec::new();
    rights::as_table_owner(t.owner, || {
        Spi::connect(|client| {
            let rows = client.select(&sql, None, args)?;
            let n = t.columns.len();
            for r in rows {
                for i in 1..=n {
                    if i > 1 {
                        out.push(copy_text::DELIMITER);
                    }
                    match r.get::<String>(i)? {
                        None => out.extend_from_slice(copy_text::NULL),
                        Some(v) => copy_text::escape_into(&mut out, v.as_bytes()),
                    }
                }
                out.push(copy_text::ROW_END);
            }
            Ok::<(), pgrx::spi::Error>(())
        })
    })
    .unwrap_or_else(|e| error!("reading rows of {}: {e}", t.name));
    out
}

/// Writes `rows` (COPY text in COPY's column order, as `merge_rows` prints them) into
/// `schema_name.table_name` for merge `merge_id`, in the calling transaction, and records each row
/// changed in `steep_repl.merge_audit`: `mode` `insert` (rows whose key is absent; a key present by now
/// is left alone) or `update` (the rows with those keys: every column but those generated always as
/// identity, a key column only where it prints otherwise, as 1.50 and 1.5 do; when `decided_by` is
/// `last-modified:<column>`, only where that column here is not newer than the row's, so a change made
/// since the decision is kept), or `park` (nothing written: both rows go to
/// `steep_repl.merge_conflicts`). Runs with `session_replication_role =
/// replica` under the replication origin `steep_merge`. Returns the rows written (or parked).
/// Superusers only.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn merge_write(
    merge_id: &str,
    schema_name: &str,
    table_name: &str,
    key_columns: Vec<String>,
    mode: &str,
    category: &str,
    decided_by: &str,
    rows: &[u8],
) -> i64 {
    require_superuser("write rows for a merge");
    write_rows(merge_id, schema_name, table_name, &key_columns, mode, category, decided_by, rows)
}

/// [`merge_write`], callable in this process (as a superuser).
#[allow(clippy::too_many_arguments)]
pub fn write_rows(
    merge_id: &str,
    schema_name: &str,
    table_name: &str,
    key_columns: &[String],
    mode: &str,
    category: &str,
    decided_by: &str,
    rows: &[u8],
) -> i64 {
    if !matches!(category, "conflict" | "local_only" | "peer_only") {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("unknown category {category:?}"),
            None,
        );
    }
    let t = Table::load(schema_name, table_name, key_columns);
    let mut settings = pinned();
    settings.push(("session_replication_role", "replica"));
    session::with_superuser_settings(&settings, || {
        load_temp("steep_merge_rows", &t, &t.columns, rows);
        load_temp("steep_merge_done", &t, &[], &[]);
        // The data statement runs as the table's owner (its triggers, CHECKs and casts to json are its
        // code) and leaves what the audit records in steep_merge_done; the audit rows are written by
        // the extension's owner.
        let done = |old: &str, new: &str, from: &str| {
            format!(
                "INSERT INTO pg_temp.steep_merge_done (key, old_row, new_row) SELECT {}, {old}, {new} FROM {from}",
                t.key_json("n")
            )
        };
        let sql = match mode {
            "insert" => {
                let overriding = if t.identity_always.is_empty() { "" } else { "OVERRIDING SYSTEM VALUE" };
                let key = t.key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ");
                // ON CONFLICT on the key only: a row that breaks another unique constraint fails the
                // batch rather than vanish unaudited.
                format!(
                    "WITH n AS (INSERT INTO {name} AS t ({cols}) {overriding} SELECT {cols} FROM pg_temp.steep_merge_rows \
                     ON CONFLICT ({key}) DO NOTHING RETURNING t.*) {done}",
                    name = t.name,
                    cols = t.column_list(None),
                    done = done("NULL", "pg_catalog.to_jsonb(n.*)", "n"),
                )
            }
            "update" => {
                let updatable: Vec<&String> =
                    t.columns.iter().filter(|c| !t.identity_always.contains(c)).collect();
                if updatable.is_empty() {
                    return 0;
                }
                let set_cols = updatable.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
                // A key column takes the chosen row's value only where it prints otherwise (1.50 and
                // 1.5 are one numeric key): the rows then print alike on both nodes. Where it prints
                // the same it keeps its own datum, so the update stays a HOT update when it can.
                let src_cols = updatable
                    .iter()
                    .map(|c| {
                        let q = quote_ident(c);
                        if t.key.contains(c) {
                            format!(
                                "CASE WHEN t.{q}::pg_catalog.text OPERATOR(pg_catalog.=) s.{q}::pg_catalog.text \
                                 THEN t.{q} ELSE s.{q} END"
                            )
                        } else {
                            format!("s.{q}")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                // last-modified: a row that became newer here since the decision keeps its value.
                let guard = match decided_by.strip_prefix("last-modified:") {
                    Some(column) if t.columns.iter().any(|c| c == column) => {
                        let q = quote_ident(column);
                        format!(" AND (t.{q} IS NULL OR s.{q} >= t.{q})")
                    }
                    Some(column) => user_error(
                        PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                        format!("{} has no column {column} (strategy last-modified)", t.name),
                        None,
                    ),
                    None => String::new(),
                };
                format!(
                    "WITH o AS (SELECT t.* FROM ONLY {name} t JOIN pg_temp.steep_merge_rows s ON {join_ts}), \
                     n AS (UPDATE ONLY {name} t SET ({set_cols}) = ROW({src_cols}) FROM pg_temp.steep_merge_rows s \
                      WHERE {join_ts}{guard} RETURNING t.*) {done}",
                    name = t.name,
                    join_ts = t.key_join("t", "s"),
                    done = done(
                        "pg_catalog.to_jsonb(o.*)",
                        "pg_catalog.to_jsonb(n.*)",
                        &format!("n JOIN o ON {}", t.key_join("n", "o"))
                    ),
                )
            }
            "park" => format!(
                "INSERT INTO pg_temp.steep_merge_done (key, old_row, new_row) SELECT {key}, \
                 pg_catalog.to_jsonb(n.*), pg_catalog.to_jsonb(s.*) FROM ONLY {name} n \
                 JOIN pg_temp.steep_merge_rows s ON {join}",
                key = t.key_json("n"),
                name = t.name,
                join = t.key_join("n", "s"),
            ),
            other => user_error(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("unknown merge write mode {other:?} (insert, update or park)"),
                None,
            ),
        };
        with_origin(|| {
            rights::as_table_owner(t.owner, || Spi::run(&sql))
                .unwrap_or_else(|e| error!("merging rows into {}: {e}", t.name));
        });
        let record = if mode == "park" {
            "INSERT INTO steep_repl.merge_conflicts (merge_id, schema_name, table_name, key, local_row, peer_row) \
             SELECT $1, $2, $3, d.key, d.old_row, d.new_row FROM pg_temp.steep_merge_done d \
             ON CONFLICT DO NOTHING RETURNING 1"
                .to_string()
        } else {
            format!(
                "INSERT INTO steep_repl.merge_audit (merge_id, schema_name, table_name, key, category, action, \
                 old_row, new_row, decided_by) SELECT $1, $2, $3, d.key, $4, '{}', d.old_row, d.new_row, $5 \
                 FROM pg_temp.steep_merge_done d RETURNING 1",
                if mode == "insert" { "insert" } else { "update" }
            )
        };
        rights::as_owner(|| {
            Spi::get_one_with_args::<i64>(
                &format!("WITH a AS ({record}) SELECT pg_catalog.count(*) FROM a"),
                &[merge_id.into(), schema_name.into(), table_name.into(), category.into(), decided_by.into()],
            )
        })
        .unwrap_or_else(|e| error!("recording the merge of {}: {e}", t.name))
        .unwrap_or(0)
    })
}

/// How long a merge write waits for the replication origin while another session holds it.
const ORIGIN_WAIT_S: i32 = 60;

/// What `pg_replication_origin_session_reset()` does (replication/origin.h is not in pgrx's bindings).
mod origin_ffi {
    unsafe extern "C-unwind" {
        pub fn replorigin_session_reset();
        pub static mut replorigin_session_origin: u16;
        pub static mut replorigin_session_origin_lsn: u64;
        pub static mut replorigin_session_origin_timestamp: i64;
    }
}

/// Transaction-abort callback of [`with_origin`]: releases this session's replication origin.
fn release_origin_on_abort() {
    // SAFETY: the globals are this backend's; a session origin is set (non-zero) only by
    // pg_replication_origin_session_setup, after which replorigin_session_reset is valid. Called from
    // AbortTransaction, after the transaction's locks are released: the reset takes and releases one
    // LWLock, as pg_replication_origin_session_reset() does.
    unsafe {
        if origin_ffi::replorigin_session_origin != 0 {
            origin_ffi::replorigin_session_reset();
            origin_ffi::replorigin_session_origin = 0;
            origin_ffi::replorigin_session_origin_lsn = 0;
            origin_ffi::replorigin_session_origin_timestamp = 0;
        }
    }
}

/// Runs `f` with this session's replication origin set to [`MERGE_ORIGIN`] (created if missing), reset
/// afterwards. An origin is held by one session at a time, server-wide: merge writes on one server (the
/// two sides of a merge between two databases of one server, or two merges) take turns, each waiting up
/// to [`ORIGIN_WAIT_S`] for the other's batch to end.
fn with_origin<R>(f: impl FnOnce() -> R) -> R {
    // The wait loop is PL/pgSQL: its exception block is a subtransaction, the one safe way to retry
    // after "already active".
    Spi::run(&format!(
        "SELECT pg_catalog.pg_replication_origin_session_reset() WHERE pg_catalog.pg_replication_origin_session_is_setup(); \
         DO $steep$ \
         DECLARE deadline timestamptz := pg_catalog.clock_timestamp() + interval '{wait} s'; \
         BEGIN \
           IF pg_catalog.pg_replication_origin_oid({o}) IS NULL THEN \
             BEGIN PERFORM pg_catalog.pg_replication_origin_create({o}); \
             EXCEPTION WHEN unique_violation THEN NULL; END; \
           END IF; \
           LOOP \
             BEGIN PERFORM pg_catalog.pg_replication_origin_session_setup({o}); RETURN; \
             EXCEPTION WHEN object_in_use THEN \
               IF pg_catalog.clock_timestamp() > deadline THEN \
                 RAISE EXCEPTION 'the replication origin % is in use by another session for over {wait} s (a merge \
                   writing on this server, or a session where a merge write failed: it is released when that \
                   session ends)', {o}; \
               END IF; \
               PERFORM pg_catalog.pg_sleep(0.01); \
             END; \
           END LOOP; \
         END $steep$",
        o = quote_literal(MERGE_ORIGIN),
        wait = ORIGIN_WAIT_S,
    ))
    .unwrap_or_else(|e| error!("setting up the replication origin {MERGE_ORIGIN}: {e}"));
    // Should the transaction abort before the reset below, release the origin then: otherwise this
    // session would keep tagging its writes with it (subscriptions with origin = none would drop them)
    // and keep other merges waiting.
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, release_origin_on_abort);
    let r = f();
    Spi::run("SELECT pg_catalog.pg_replication_origin_session_reset()")
        .unwrap_or_else(|e| error!("resetting the replication origin: {e}"));
    r
}

/// Starts merging this node and `peer` (a node name or conninfo) to the union of their rows, for the
/// tables matching `tables` (default: every table with a primary key or replica identity index on both
/// nodes). Conflicts are settled by `strategy`: `prefer-local`, `prefer-remote`,
/// `last-modified:<column>` or `manual`. `dry_run` writes nothing and records the plan
/// (`merge_result`). Returns the operation id (op `merge`); `wait_snapshot`, `cancel_snapshot` and
/// `snapshot_progress` work on it. Superusers only.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn start_merge(
    peer: &str,
    tables: default!(Option<Vec<String>>, "NULL"),
    strategy: default!(&str, "'prefer-local'"),
    dry_run: default!(bool, false),
    parallel: default!(i32, 4),
) -> String {
    require_superuser("start a merge");
    let parsed: Strategy = strategy.parse().unwrap_or_else(|e: steep_repl_engine::merge::StrategyError| {
        user_error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None)
    });
    let (who, conninfo, patterns) = crate::api::overlap::checked_peer_and_tables(peer, tables);
    let options = serde_json::json!({ "strategy": parsed.name(), "dry_run": dry_run });
    let kind = Coordinator { op: "merge", prefix: "mrg", flags: FLAG_MERGE, what: "start a merge" };
    launch_coordinator(kind, peer, &who, &conninfo, &patterns, parallel, options)
}

/// What merge `id` did (or, for a dry run, would do): per table, node written to and action, the rows and
/// up to ten sample keys. Superusers only.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn merge_result(
    id: &str,
) -> TableIterator<
    'static,
    (
        name!(schema_name, String),
        name!(table_name, String),
        name!(node, String),
        name!(action, String),
        name!(rows, i64),
        name!(sample_keys, pgrx::JsonB),
    ),
> {
    require_superuser("read a merge's result");
    match bookkeeping::operation(id) {
        Some(op) if op.op == "merge" => {}
        Some(op) => user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("operation {id} is a {}, not a merge", op.op),
            None,
        ),
        None => user_error(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no operation {id}"), None),
    }
    let rows = rights::as_owner(|| {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT schema_name, table_name, node, action, rows, sample_keys FROM steep_repl.merge_plan \
                 WHERE merge_id = $1 ORDER BY schema_name, table_name, node, action",
                None,
                &[id.into()],
            )?;
            let mut out = Vec::new();
            for r in rows {
                out.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<String>(3)?.unwrap_or_default(),
                    r.get::<String>(4)?.unwrap_or_default(),
                    r.get::<i64>(5)?.unwrap_or(0),
                    r.get::<pgrx::JsonB>(6)?.unwrap_or(pgrx::JsonB(serde_json::json!([]))),
                ));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    })
    .unwrap_or_else(|e| error!("reading merge {id}: {e}"));
    TableIterator::new(rows)
}

/// The COPY text line of a key given as a JSON object of the key columns (as `merge_conflicts.key`
/// holds it): each column's value in key order, strings as they are, numbers and booleans as JSON
/// prints them, null as NULL.
fn key_line(key_columns: &[String], key: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in key_columns.iter().enumerate() {
        if i > 0 {
            out.push(copy_text::DELIMITER);
        }
        match key.get(c) {
            None | Some(serde_json::Value::Null) => out.extend_from_slice(copy_text::NULL),
            Some(serde_json::Value::String(s)) => copy_text::escape_into(&mut out, s.as_bytes()),
            Some(v) => copy_text::escape_into(&mut out, v.to_string().as_bytes()),
        }
    }
    out.push(copy_text::ROW_END);
    out
}

/// Settles a conflict that a `manual` merge parked in `steep_repl.merge_conflicts`: `side` `peer`
/// writes the peer's parked row here; `local` writes this node's current row to the peer (`peer`: the
/// node name or conninfo, as given to `start_merge`). The write is audited in `merge_audit` on the node
/// it changes (`decided_by` `resolve`) and the parked row marked resolved, in this transaction (and,
/// for `local`, one transaction on the peer). Returns whether it was settled: false when no such
/// conflict is parked, or the row to overwrite is gone.
/// Superusers only.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn resolve_merge_conflict(
    merge_id: &str,
    schema_name: &str,
    table_name: &str,
    key: pgrx::JsonB,
    side: &str,
    peer: default!(Option<&str>, "NULL"),
) -> bool {
    require_superuser("resolve a merge conflict");
    if !matches!(side, "local" | "peer") {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("side must be 'local' or 'peer', not {side:?}"),
            None,
        );
    }
    let parked = rights::as_owner(|| {
        Spi::connect_mut(|client| {
            let rows = client.update(
                "SELECT c.peer_row FROM steep_repl.merge_conflicts c \
                 WHERE c.merge_id = $1 AND c.schema_name = $2 AND c.table_name = $3 AND c.key = $4 \
                 AND c.resolved IS NULL FOR UPDATE",
                Some(1),
                &[merge_id.into(), schema_name.into(), table_name.into(), pgrx::JsonB(key.0.clone()).into()],
            )?;
            let mut found = None;
            for r in rows {
                found = r.get::<pgrx::JsonB>(1)?;
            }
            Ok::<_, pgrx::spi::Error>(found)
        })
    })
    .unwrap_or_else(|e| error!("reading the parked conflict: {e}"));
    let Some(peer_row) = parked else { return false };
    let key_columns: Vec<String> = match key.0.as_object() {
        Some(o) => {
            // The key's columns in the order of the table's key index.
            let mut cols: Vec<String> = o.keys().cloned().collect();
            let order = key_index_columns(schema_name, table_name);
            cols.sort_by_key(|c| order.iter().position(|k| k == c).unwrap_or(usize::MAX));
            cols
        }
        None => user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "key must be a JSON object".into(),
            None,
        ),
    };
    let t = Table::load(schema_name, table_name, &key_columns);
    let written = match side {
        "peer" => {
            // The parked row as COPY text, read back through the table's own type as its owner.
            let rows = session::with_settings(&pinned(), || {
                copy_text_of(
                    &t,
                    &format!("pg_catalog.jsonb_populate_record(NULL::{}, $1) t", t.name),
                    &[pgrx::JsonB(peer_row.0.clone()).into()],
                )
            });
            write_rows(
                merge_id,
                schema_name,
                table_name,
                &key_columns,
                "update",
                "conflict",
                "resolve",
                &rows,
            )
        }
        _ => {
            let Some(peer) = peer else {
                user_error(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    "side 'local' writes this node's row to the peer: name the peer".into(),
                    None,
                )
            };
            let (who, conninfo) = crate::api::schema::resolve_peer(peer);
            let row = rows_by_key(schema_name, table_name, &key_columns, &key_line(&key_columns, &key.0));
            if row.is_empty() {
                user_error(
                    PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
                    format!("{}: no row with key {} here any more", t.name, key.0),
                    None,
                );
            }
            crate::worker::overlap::write_to_peer(
                &who,
                &conninfo,
                merge_id,
                schema_name,
                table_name,
                &key_columns,
                &row,
            )
            .unwrap_or_else(|e| error!("{e}"))
        }
    };
    if written == 0 {
        // The row is gone on the side written (deleted since): nothing was settled.
        return false;
    }
    rights::as_owner(|| {
        Spi::run_with_args(
            "UPDATE steep_repl.merge_conflicts SET resolved = $5, resolved_at = pg_catalog.now() \
             WHERE merge_id = $1 AND schema_name = $2 AND table_name = $3 AND key = $4",
            &[merge_id.into(), schema_name.into(), table_name.into(), key.into(), side.into()],
        )
    })
    .unwrap_or_else(|e| error!("marking the conflict resolved: {e}"));
    true
}

/// The sequences of this node or the peer: schema, name, the sequence's own last_value and is_called
/// (read from each sequence, in one statement, through query_to_xml), min, max, increment.
const SEQUENCES_SQL: &str = "SELECT s.schemaname::pg_catalog.text, s.sequencename::pg_catalog.text, \
    (pg_catalog.xpath('/row/last_value/text()', x.x))[1]::pg_catalog.text, \
    (pg_catalog.xpath('/row/is_called/text()', x.x))[1]::pg_catalog.text, \
    s.min_value::pg_catalog.text, s.max_value::pg_catalog.text, s.increment_by::pg_catalog.text \
    FROM pg_catalog.pg_sequences s CROSS JOIN LATERAL pg_catalog.query_to_xml(pg_catalog.format( \
    'SELECT last_value, is_called FROM %I.%I', s.schemaname, s.sequencename), false, true, '') AS x(x) \
    WHERE s.schemaname NOT IN ('pg_catalog', 'information_schema', 'steep_repl')";

/// What stands in the way of linking this node and `peer` both ways after a merge (`steep-repl merge
/// --bidirectional`): one row per problem, with what to do about it; no row when nothing does. Checks
/// both servers' version (subscriptions with `origin = none` need PostgreSQL 16), `wal_level`, and every
/// sequence present on both nodes: two copies that can still hand out a same value would make both nodes
/// insert the same keys. Superusers only.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn merge_preflight(peer: &str) -> TableIterator<'static, (name!(node, String), name!(problem, String))> {
    require_superuser("check two nodes before linking them");
    let (who, conninfo) = crate::api::schema::resolve_peer(peer);
    let theirs = crate::worker::overlap::peer_rows(
        &who,
        &conninfo,
        &[
            "SELECT pg_catalog.current_setting('server_version_num'), pg_catalog.current_setting('wal_level')",
            SEQUENCES_SQL,
        ],
    )
    .unwrap_or_else(|e| error!("{e}"));
    let mine_settings = Spi::get_two::<String, String>(
        "SELECT pg_catalog.current_setting('server_version_num'), pg_catalog.current_setting('wal_level')",
    )
    .unwrap_or_else(|e| error!("reading this server's settings: {e}"));
    let mut problems = Vec::new();
    let settings = [
        ("local", mine_settings.0.unwrap_or_default(), mine_settings.1.unwrap_or_default()),
        (
            "peer",
            theirs[0].first().and_then(|r| r[0].clone()).unwrap_or_default(),
            theirs[0].first().and_then(|r| r[1].clone()).unwrap_or_default(),
        ),
    ];
    for (node, version, wal_level) in settings {
        let v: i64 = version.parse().unwrap_or(0);
        if v < 160000 {
            problems.push((
                node.to_string(),
                format!(
                    "PostgreSQL {}.{} cannot subscribe with origin = none (PostgreSQL 16 and later): each node would \
                     send the other's changes back; upgrade both nodes to 16 or later to replicate both ways",
                    v / 10000,
                    v % 10000 / 100
                ),
            ));
        }
        if wal_level != "logical" {
            problems.push((
                node.to_string(),
                format!("wal_level is {wal_level}: set wal_level = logical and restart the server"),
            ));
        }
    }
    let parse = |r: &[Option<String>]| -> Option<((String, String), steep_repl_engine::merge::Sequence)> {
        let num = |i: usize| r.get(i).cloned().flatten().and_then(|v| v.parse::<i64>().ok());
        Some((
            (r.first()?.clone()?, r.get(1)?.clone()?),
            steep_repl_engine::merge::Sequence {
                last_value: num(2)?,
                is_called: r.get(3).cloned().flatten().as_deref() == Some("true"),
                min_value: num(4)?,
                max_value: num(5)?,
                increment_by: num(6)?,
            },
        ))
    };
    let mine: Vec<Vec<Option<String>>> = Spi::connect(|client| {
        let rows = client.select(SEQUENCES_SQL, None, &[])?;
        let mut out = Vec::new();
        for r in rows {
            let mut row = Vec::new();
            for i in 1..=7 {
                row.push(r.get::<String>(i)?);
            }
            out.push(row);
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| error!("reading this server's sequences: {e}"));
    let peer_seqs: std::collections::HashMap<(String, String), steep_repl_engine::merge::Sequence> =
        theirs[1].iter().filter_map(|r| parse(r)).collect();
    for row in &mine {
        let Some((name, here)) = parse(row) else { continue };
        let Some(there) = peer_seqs.get(&name) else { continue };
        if steep_repl_engine::merge::sequences_collide(&here, there) {
            let q = format!("{}.{}", quote_ident(&name.0), quote_ident(&name.1));
            let next = |s: &steep_repl_engine::merge::Sequence| {
                if s.is_called { s.last_value.saturating_add(s.increment_by) } else { s.last_value }
            };
            let top = next(&here).max(next(there)).saturating_add(1);
            problems.push((
                "both".to_string(),
                format!(
                    "sequence {q} would hand out the same values on both nodes (next {} step {} here, next {} step {} \
                     on the peer): interleave them, e.g. ALTER SEQUENCE {q} INCREMENT BY 2 RESTART WITH {} here and \
                     ... RESTART WITH {} on the peer, or give each node its own MINVALUE/MAXVALUE range",
                    next(&here),
                    here.increment_by,
                    next(there),
                    there.increment_by,
                    top + top.rem_euclid(2),
                    top + 1 - top.rem_euclid(2),
                ),
            ));
        }
    }
    TableIterator::new(problems)
}

/// The columns of the primary key (else the replica identity index) of a table, in index order.
fn key_index_columns(schema_name: &str, table_name: &str) -> Vec<String> {
    Spi::get_one_with_args::<Vec<String>>(
        "SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY s.i) FROM \
         (SELECT i.indrelid, i.indkey FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indrelid \
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2 \
          AND (i.indisprimary OR i.indisreplident) ORDER BY i.indisprimary DESC LIMIT 1) x \
         CROSS JOIN LATERAL pg_catalog.generate_subscripts(x.indkey, 1) AS s(i) \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[s.i]",
        &[schema_name.into(), table_name.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_default()
}

pgrx::extension_sql!(
    r#"
-- A merge reads and writes every row of the merged tables on both nodes.
REVOKE EXECUTE ON FUNCTION steep_repl.start_merge(text, text[], text, boolean, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.merge_result(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.merge_rows(text, text, text[], bytea) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.merge_write(text, text, text, text[], text, text, text, bytea) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.resolve_merge_conflict(text, text, text, jsonb, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.merge_preflight(text) FROM PUBLIC;
"#,
    name = "merge_rights",
    requires = [start_merge, merge_result, merge_rows, merge_write, resolve_merge_conflict, merge_preflight]
);

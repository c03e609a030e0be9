//! Runs the engine's catalog queries through SPI (the selection rules live in
//! `steep_repl_engine::catalog`, shared with the CLI's client mode).

use pgrx::pg_sys;
use pgrx::prelude::*;
use steep_repl_engine::catalog::{
    self, SEQUENCES_SQL, SERVER_INFO_SQL, SelectionError, SequenceRow, TABLES_BRIEF_SQL, TABLES_BY_FILE_SQL,
    TableRow,
};
use steep_repl_engine::filter::TablePattern;
use steep_repl_engine::manifest::SequenceEntry;

pub use steep_repl_engine::catalog::TableMeta;

/// The path (relative to the data directory) of the first file of a relation's main fork, from its
/// `<tablespace oid>/<relfilenode>` as [`TABLES_BY_FILE_SQL`] gives it (tablespace 0: the database's).
fn main_fork_path(location: &str) -> Option<String> {
    let (spc, node) = location.split_once('/')?;
    let (spc, node) = (spc.parse::<u32>().ok()?, node.parse::<u32>().ok()?);
    // SAFETY: GetRelationPath only formats a path (palloc'd, copied out at once) from the numbers it is
    // given; MyDatabaseId and MyDatabaseTableSpace are set once connected to a database.
    unsafe {
        let spc = if spc == 0 { pg_sys::MyDatabaseTableSpace } else { pg_sys::Oid::from(spc) };
        let p = pg_sys::GetRelationPath(
            pg_sys::MyDatabaseId,
            spc,
            pg_sys::Oid::from(node),
            pg_sys::InvalidBackendId,
            pg_sys::ForkNumber::MAIN_FORKNUM,
        );
        let path = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        pg_sys::pfree(p.cast());
        Some(path)
    }
}

/// Bytes of a relation's main fork, from its files (the first segment at `path`, relative to the data
/// directory, which is every backend's working directory; then `path.1`, `path.2`, ...). No relation is
/// opened or locked. 0 without storage (`path` NULL) or when the file is gone meanwhile.
pub(crate) fn fork_bytes(path: Option<&str>) -> u64 {
    let Some(path) = path else { return 0 };
    // A relation's file is cut into segments of RELSEG_SIZE blocks; the next one exists only when this
    // one is full.
    let segment_bytes = u64::from(pg_sys::RELSEG_SIZE) * u64::from(pg_sys::BLCKSZ);
    let mut total = 0u64;
    for segment in 0u32.. {
        let file = if segment == 0 { path.to_string() } else { format!("{path}.{segment}") };
        match std::fs::metadata(&file) {
            Ok(m) => {
                total += m.len();
                if m.len() < segment_bytes {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    total
}

/// Lists the tables to snapshot under the current snapshot. With `sized`, with their column lists and
/// their sizes read from their files, for the plan; without, only which tables there are and whether
/// they may be read (checking a selection, or locking the tables, needs no more).
pub fn list_tables(patterns: &[TablePattern], sized: bool) -> Result<Vec<TableMeta>, SelectionError> {
    let size = |location: Option<String>| fork_bytes(location.as_deref().and_then(main_fork_path).as_deref());
    let sql = if sized { TABLES_BY_FILE_SQL } else { TABLES_BRIEF_SQL };
    let rows = Spi::connect(|client| -> Result<Vec<TableRow>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for r in client.select(sql, None, &[])? {
            v.push(TableRow {
                oid: r.get::<i64>(1)?.unwrap_or(0) as u32,
                schema: r.get::<String>(2)?.unwrap_or_default(),
                name: r.get::<String>(3)?.unwrap_or_default(),
                relkind: r.get::<String>(4)?.unwrap_or_default(),
                heap_bytes: size(r.get::<String>(5)?),
                toast_bytes: size(r.get::<String>(6)?),
                est_rows: r.get::<i64>(7)?.unwrap_or(0).max(0) as u64,
                can_select: r.get::<bool>(8)?.unwrap_or(false),
                column_names: r.get::<Vec<String>>(9)?.unwrap_or_default(),
                column_types: r.get::<Vec<String>>(10)?.unwrap_or_default(),
                extension_member: r.get::<bool>(11)?.unwrap_or(false),
                rls_active: r.get::<bool>(12)?.unwrap_or(false),
            });
        }
        Ok(v)
    })
    .map_err(|e| SelectionError { problems: vec![format!("listing tables: {e}")], permission_only: false })?;
    catalog::select_tables(rows, patterns, pgrx::pg_sys::BLCKSZ as u64)
}

/// Lists the sequences to record, with their current state.
pub fn list_sequences(
    patterns: &[TablePattern],
    table_oids: &[u32],
) -> Result<Vec<SequenceEntry>, SelectionError> {
    let rows = Spi::connect(|client| -> Result<Vec<SequenceRow>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for r in client.select(SEQUENCES_SQL, None, &[])? {
            v.push(SequenceRow {
                schema: r.get::<String>(1)?.unwrap_or_default(),
                name: r.get::<String>(2)?.unwrap_or_default(),
                start_value: r.get::<i64>(3)?.unwrap_or(1),
                last_value: r.get::<i64>(4)?,
                can_select: r.get::<bool>(5)?.unwrap_or(false),
                owner_table: r.get::<i64>(6)?.map(|o| o as u32),
            });
        }
        Ok(v)
    })
    .map_err(|e| SelectionError {
        problems: vec![format!("listing sequences: {e}")],
        permission_only: false,
    })?;
    catalog::select_sequences(rows, patterns, table_oids)
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
        let row = client.select(SERVER_INFO_SQL, Some(1), &[])?.first();
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

/// Whether steep_repl is installed in the current database. Call inside a transaction.
pub fn steep_repl_installed() -> bool {
    Spi::get_one::<bool>(
        "SELECT true FROM pg_catalog.pg_extension e \
         WHERE e.extname OPERATOR(pg_catalog.=) 'steep_repl'::pg_catalog.name",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Oids of every database a job can have run in, read from the shared catalog `pg_database` (works in a
/// process connected to no database): all but templates that refuse connections (template0). Call
/// inside a transaction.
pub fn job_databases() -> Vec<u32> {
    let mut out = Vec::new();
    // SAFETY: inside a transaction; pg_database is a shared catalog any process attached to shared
    // memory may scan with a catalog snapshot (as the autovacuum launcher does). The scan and the
    // relation are closed before returning; tuples are read while the scan holds their buffer.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            // GETSTRUCT: the fixed part of the row follows the tuple header.
            let data = (*tuple).t_data;
            let form =
                (data as *const u8).add((*data).t_hoff as usize) as *const pg_sys::FormData_pg_database;
            if (*form).datallowconn || !(*form).datistemplate {
                out.push((*form).oid.to_u32());
            }
        }
        pg_sys::heap_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    out
}

/// The schema-qualified, quoted name of relation `relid` now, or None when it no longer exists. Read
/// under a lock on it, so that it stays the name until the transaction ends.
pub fn qualified_name(relid: pg_sys::Oid) -> Result<Option<String>, pgrx::spi::Error> {
    Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[relid.into()],
    )
}

/// The COPY column list of table `relid` (not dropped, not generated), in column order.
pub fn copy_columns(relid: pg_sys::Oid) -> Result<Vec<String>, pgrx::spi::Error> {
    Spi::get_one_with_args::<Vec<String>>(
        "SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY a.attnum) \
         FROM pg_catalog.pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 \
         AND NOT a.attisdropped AND a.attgenerated = ''",
        &[relid.into()],
    )
    .map(Option::unwrap_or_default)
}

/// Fills in the COPY column lists of `tables` (listed with [`list_tables`] `sized`, which leaves them
/// out), in one query. Call while the tables are locked, so their columns are those of the snapshot.
pub fn fill_columns(tables: &mut [TableMeta]) -> Result<(), String> {
    let oids: Vec<pg_sys::Oid> = tables.iter().map(|t| pg_sys::Oid::from(t.oid)).collect();
    let mut by_oid: std::collections::HashMap<u32, Vec<steep_repl_engine::manifest::Column>> =
        std::collections::HashMap::with_capacity(tables.len());
    Spi::connect(|client| -> Result<(), pgrx::spi::Error> {
        for r in client.select(steep_repl_engine::catalog::COLUMNS_SQL, None, &[oids.into()])? {
            let oid = r.get::<i64>(1)?.unwrap_or(0) as u32;
            let name = r.get::<String>(2)?.unwrap_or_default();
            let type_name = r.get::<String>(3)?.unwrap_or_default();
            by_oid.entry(oid).or_default().push(steep_repl_engine::manifest::Column { name, type_name });
        }
        Ok(())
    })
    .map_err(|e| format!("reading the tables' columns: {e}"))?;
    for t in tables {
        t.columns = by_oid.remove(&t.oid).unwrap_or_default();
    }
    Ok(())
}

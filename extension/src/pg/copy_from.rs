//! Loading COPY TEXT into a table with PostgreSQL's own COPY FROM, fed by a Rust reader.
//!
//! PG15's `BeginCopyFrom` takes a data-source callback, the way logical replication's table sync feeds
//! COPY: a parse state with the relation as a range table entry, `BeginCopyFrom` with the callback and
//! the column list, `CopyFrom`, `EndCopyFrom`. Rows go through PostgreSQL's parser, type input functions,
//! constraints, indexes and (unless `session_replication_role = replica`) triggers, with no temporary
//! file. The callback has no user-data argument, so the current source is held in a process-wide slot for
//! the duration of one load (a backend runs one COPY at a time).

use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Where a load's bytes come from. `read_into` fills `buf` with at least one byte, or returns 0 at the
/// end; it raises a PostgreSQL ERROR on failure (a corrupt chunk, a cancel).
pub trait CopySource {
    fn read_into(&mut self, buf: &mut [u8]) -> usize;
}

static mut SOURCE: Option<*mut dyn CopySource> = None;

#[pg_guard]
unsafe extern "C-unwind" fn copy_source_cb(
    outbuf: *mut std::ffi::c_void,
    minread: std::ffi::c_int,
    maxread: std::ffi::c_int,
) -> std::ffi::c_int {
    // SAFETY: COPY passes a buffer of `maxread` bytes; SOURCE is set by `copy_into` for exactly the
    // duration of the CopyFrom call that invokes this callback, on this process's only thread.
    unsafe {
        let Some(src) = SOURCE else { error!("steep_repl: COPY data requested with no source") };
        let buf = std::slice::from_raw_parts_mut(outbuf as *mut u8, maxread.max(0) as usize);
        let mut n = 0usize;
        while n < minread.max(1) as usize && n < buf.len() {
            let k = (*src).read_into(&mut buf[n..]);
            if k == 0 {
                break;
            }
            n += k;
        }
        n as std::ffi::c_int
    }
}

/// Restores the source slot even when the load raises an ERROR (unwinding through this guard).
struct SourceGuard;

impl Drop for SourceGuard {
    fn drop(&mut self) {
        // SAFETY: single-threaded backend; clearing the slot set by copy_into.
        unsafe { SOURCE = None };
    }
}

/// Loads everything `source` yields into `relid` as COPY TEXT for `columns`, in the current transaction
/// (which must have an active snapshot): the current user must have INSERT on the table, and the rows go
/// in as the table's owner, in a security-restricted context (see `rights::as_table_owner`). Returns the number of rows loaded.
/// `encoding` names the encoding of the text when it is not the database's (COPY's `ENCODING` option:
/// PostgreSQL converts and verifies it); `None` loads the bytes as they are.
/// Raises an ERROR when the user lacks INSERT, when row-level security applies, or on any bad row.
pub fn copy_into(
    relid: pg_sys::Oid,
    columns: &[String],
    encoding: Option<&str>,
    source: &mut dyn CopySource,
) -> u64 {
    copy_into_as(relid, columns, encoding, source, None)
}

/// [`copy_into`], running COPY's code (type input, domain CHECKs, triggers) as `run_as` instead of the
/// table's owner: for a temporary table holding rows bound for another table, whose owner must be the
/// one whose code runs.
pub fn copy_into_as(
    relid: pg_sys::Oid,
    columns: &[String],
    encoding: Option<&str>,
    source: &mut dyn CopySource,
    run_as: Option<pg_sys::Oid>,
) -> u64 {
    // SAFETY: inside a transaction. The relation is opened with RowExclusiveLock (what INSERT takes)
    // and closed after EndCopyFrom; the parse state, column list and strings are palloc'd in the current
    // memory context and live until the transaction ends. The source pointer stays valid for the whole
    // CopyFrom call because `source` outlives this function's body, and the guard clears it afterwards.
    unsafe {
        if pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_INSERT as pg_sys::AclMode)
            != pg_sys::AclResult::ACLCHECK_OK
        {
            let name = crate::pg::relation_name(relid).map(|(s, n)| format!("{s}.{n}")).unwrap_or_default();
            error!("permission denied for table {name}: INSERT is needed to apply a snapshot");
        }
        if crate::pg::rls_applies(relid) {
            let name = crate::pg::relation_name(relid).map(|(s, n)| format!("{s}.{n}")).unwrap_or_default();
            error!(
                "row-level security is enabled for table {name} and applies to this role; COPY FROM cannot load it"
            );
        }
        let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        let nsitem = pg_sys::addRangeTableEntryForRelation(
            pstate,
            rel,
            pg_sys::RowExclusiveLock as i32,
            std::ptr::null_mut(),
            false,
            false,
        );
        pg_sys::addNSItemToQuery(pstate, nsitem, true, true, true);
        let mut attnames: *mut pg_sys::List = std::ptr::null_mut();
        for c in columns {
            let name = CString::new(c.as_str()).unwrap_or_default();
            attnames = pg_sys::lappend(attnames, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
        }
        let mut options: *mut pg_sys::List = std::ptr::null_mut();
        if let Some(enc) = encoding {
            let enc = CString::new(enc).unwrap_or_default();
            let value = pg_sys::makeString(pg_sys::pstrdup(enc.as_ptr())).cast();
            options = pg_sys::lappend(
                options,
                pg_sys::makeDefElem(pg_sys::pstrdup(c"encoding".as_ptr()), value, -1).cast(),
            );
        }
        let _guard = SourceGuard;
        SOURCE = Some(std::mem::transmute::<*mut dyn CopySource, *mut (dyn CopySource + 'static)>(
            source as *mut dyn CopySource,
        ));
        // The table owner's code (triggers, CHECK and index expressions) runs as the owner, never with
        // the job role's rights (see rights::as_table_owner); the job's role was checked for INSERT above.
        let owner = run_as.unwrap_or((*(*rel).rd_rel).relowner);
        let rows = crate::pg::rights::as_table_owner(owner, || {
            let cstate = pg_sys::BeginCopyFrom(
                pstate,
                rel,
                std::ptr::null_mut(),
                std::ptr::null(),
                false,
                Some(copy_source_cb),
                attnames,
                options,
            );
            let rows = pg_sys::CopyFrom(cstate);
            pg_sys::EndCopyFrom(cstate);
            rows
        });
        pg_sys::free_parsestate(pstate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        rows
    }
}

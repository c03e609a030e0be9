//! Reading one ctid block range of a heap table as COPY TEXT.
//!
//! PG15's `BeginCopyTo` cannot write to a callback, so rows are formatted here: a heap scan limited to
//! `[block_start, block_end)` (no synchronized scans, so it starts exactly at `block_start`), each tuple
//! deformed, each column of COPY's default column list (no dropped, no generated columns) passed through
//! its type's output function, and escaped by `steep_repl_engine::copy_text` — the one place those rules
//! live. The output is byte-identical to `COPY (SELECT <columns> FROM t WHERE ctid in range) TO STDOUT`
//! run with the same session settings (see `session`).
//!
//! Memory stays bounded: every per-row allocation (detoasted values, output strings) goes into a memory
//! context reset after the row, and output is handed to the sink in blocks of `FLUSH_BYTES`.
//!
//! Speed: pgrx guards every call into PostgreSQL with a sigsetjmp; at several calls per row and one per
//! value that guard cost as much as the formatting. The row loop therefore runs under one guard per
//! batch of rows (up to `FLUSH_BYTES` of output), and the hottest types (integers, bool, text, uuid) are
//! printed directly instead of through fmgr and a palloc'd string.

use std::ffi::CStr;
use std::io::Write;

use pgrx::PgMemoryContexts;
use pgrx::pg_sys;
use pgrx::prelude::*;
use steep_repl_engine::copy_text;

/// Output is passed to the sink in blocks of about this size: large enough that the zstd encoder and the
/// file see few, large writes; small enough that progress moves every few milliseconds.
pub const FLUSH_BYTES: usize = 1 << 20;

/// What one range scan produced.
#[derive(Debug, Default, Clone, Copy)]
pub struct RangeStats {
    pub rows: u64,
    pub raw_bytes: u64,
    /// Blocks of the range actually scanned (the open-ended last chunk scans to the current end).
    pub blocks: u64,
}

/// Callbacks a range scan reports to; called after each flushed block of output.
pub trait ScanObserver {
    /// `rows`, `bytes` and `blocks` are increments since the previous call.
    fn progress(&mut self, rows: u64, bytes: u64, blocks: u64);
    /// Whether to stop now (cancel, another worker's failure, SIGTERM). Checked at every flush.
    fn should_stop(&mut self) -> Option<String>;
}

/// How each column is printed: a direct writer for the hottest types (no fmgr call, no palloc), the
/// type's output function for everything else. Each direct writer prints exactly what the output function
/// prints (checked byte for byte against COPY by the tests).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    Int2,
    Int4,
    Int8,
    Bool,
    /// text, varchar, bpchar: the stored bytes (in the database encoding), detoasted.
    Text,
    Uuid,
    Generic,
}

struct Col {
    att: usize,
    out: Out,
    finfo: pg_sys::FmgrInfo,
}

/// What one batch of rows needs; only raw pointers and plain data, nothing with a destructor.
struct Batch<'a> {
    scan: pg_sys::TableScanDesc,
    tupdesc: pg_sys::TupleDesc,
    values: *mut pg_sys::Datum,
    nulls: *mut bool,
    cols: &'a mut [Col],
    row_ctx: pg_sys::MemoryContext,
    rows: u64,
}

/// Unguarded bindings of the functions the row loop calls. They are only ever called from
/// `fill_batch`, which runs inside one `pg_guard_ffi_boundary`: an ERROR raised by any of them longjmps
/// to that boundary, skipping only `fill_batch`'s own frame, which owns nothing that needs dropping.
mod raw {
    use pgrx::pg_sys::{
        Datum, FmgrInfo, HeapTuple, MemoryContext, ScanDirection, TableScanDesc, TupleDesc, varlena,
    };
    use std::ffi::c_char;

    unsafe extern "C-unwind" {
        pub fn heap_getnext(scan: TableScanDesc, direction: ScanDirection::Type) -> HeapTuple;
        pub fn heap_deform_tuple(tuple: HeapTuple, desc: TupleDesc, values: *mut Datum, isnull: *mut bool);
        pub fn OutputFunctionCall(flinfo: *mut FmgrInfo, val: Datum) -> *mut c_char;
        pub fn MemoryContextReset(context: MemoryContext);
        pub fn pg_detoast_datum_packed(datum: *mut varlena) -> *mut varlena;
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Formats rows into `buf` until it holds `limit` bytes or the scan ends; returns whether rows remain.
///
/// SAFETY: call only through `pg_guard_ffi_boundary` (see `raw`), in a transaction with an active
/// snapshot, with `b` describing an open heap scan. Locals here are plain values and borrows.
unsafe fn fill_batch(b: &mut Batch<'_>, buf: &mut Vec<u8>, limit: usize) -> bool {
    unsafe {
        while buf.len() < limit {
            let tuple = raw::heap_getnext(b.scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                return false;
            }
            let caller_ctx = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = b.row_ctx;
            raw::heap_deform_tuple(tuple, b.tupdesc, b.values, b.nulls);
            let mut allocated = false;
            for (k, col) in b.cols.iter_mut().enumerate() {
                if k > 0 {
                    buf.push(copy_text::DELIMITER);
                }
                if *b.nulls.add(col.att) {
                    buf.extend_from_slice(copy_text::NULL);
                    continue;
                }
                let v = *b.values.add(col.att);
                match col.out {
                    Out::Int2 => {
                        buf.extend_from_slice(itoa::Buffer::new().format(v.value() as i16).as_bytes())
                    }
                    Out::Int4 => {
                        buf.extend_from_slice(itoa::Buffer::new().format(v.value() as i32).as_bytes())
                    }
                    Out::Int8 => {
                        buf.extend_from_slice(itoa::Buffer::new().format(v.value() as i64).as_bytes())
                    }
                    Out::Bool => buf.push(if v.value() & 0xff != 0 { b't' } else { b'f' }),
                    Out::Text => {
                        let orig = v.cast_mut_ptr::<pg_sys::varlena>();
                        let p = raw::pg_detoast_datum_packed(orig);
                        allocated |= p != orig;
                        let len = pgrx::varlena::varsize_any_exhdr(p);
                        let data = pgrx::varlena::vardata_any(p) as *const u8;
                        copy_text::escape_into(buf, std::slice::from_raw_parts(data, len));
                    }
                    Out::Uuid => {
                        let bytes = std::slice::from_raw_parts(v.cast_mut_ptr::<u8>() as *const u8, 16);
                        for (i, byte) in bytes.iter().enumerate() {
                            if matches!(i, 4 | 6 | 8 | 10) {
                                buf.push(b'-');
                            }
                            buf.push(HEX[(byte >> 4) as usize]);
                            buf.push(HEX[(byte & 0xf) as usize]);
                        }
                    }
                    Out::Generic => {
                        let s = raw::OutputFunctionCall(&mut col.finfo, v);
                        allocated = true;
                        copy_text::escape_into(buf, CStr::from_ptr(s).to_bytes());
                    }
                }
            }
            buf.push(copy_text::ROW_END);
            pg_sys::CurrentMemoryContext = caller_ctx;
            if allocated {
                raw::MemoryContextReset(b.row_ctx);
            }
            b.rows += 1;
        }
        true
    }
}

/// Scans blocks `[block_start, block_end)` of `relid` (`None`: to the table's current end) under the
/// active snapshot, writing COPY TEXT rows to `out`. Raises a PostgreSQL ERROR on any failure, including
/// a write error of `out` or a stop request.
pub fn copy_block_range(
    relid: pg_sys::Oid,
    block_start: u32,
    block_end: Option<u32>,
    out: &mut dyn Write,
    observer: &mut dyn ScanObserver,
) -> RangeStats {
    let mut stats = RangeStats::default();
    let mut buf: Vec<u8> = Vec::with_capacity(FLUSH_BYTES + 64 * 1024);
    let row_ctx = PgMemoryContexts::new("steep_repl chunk row");

    // SAFETY: we are in a transaction with an active snapshot (pushed by the caller). The relation is
    // opened with AccessShareLock and closed at the end; the scan is ended before that. The row loop runs
    // in fill_batch under one guard per batch (see `raw`).
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let tupdesc = (*rel).rd_att;
        let natts = (*tupdesc).natts as usize;
        let attrs = (*tupdesc).attrs.as_slice(natts);
        let mut cols: Vec<Col> = Vec::with_capacity(natts);
        for (i, att) in attrs.iter().enumerate() {
            if att.attisdropped || att.attgenerated != 0 {
                continue;
            }
            let out = match att.atttypid {
                pg_sys::INT2OID => Out::Int2,
                pg_sys::INT4OID => Out::Int4,
                pg_sys::INT8OID => Out::Int8,
                pg_sys::BOOLOID => Out::Bool,
                pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Out::Text,
                pg_sys::UUIDOID => Out::Uuid,
                _ => Out::Generic,
            };
            let mut finfo = pg_sys::FmgrInfo::default();
            if out == Out::Generic {
                let mut func = pg_sys::InvalidOid;
                let mut is_varlena = false;
                pg_sys::getTypeOutputInfo(att.atttypid, &mut func, &mut is_varlena);
                pg_sys::fmgr_info(func, &mut finfo);
            }
            cols.push(Col { att: i, out, finfo });
        }

        let nblocks = pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM);
        let end = block_end.map_or(nblocks, |e| e.min(nblocks));
        if block_start < end {
            let flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN
                | pg_sys::ScanOptions::SO_ALLOW_STRAT
                | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE;
            let scan = pg_sys::heap_beginscan(
                rel,
                pg_sys::GetActiveSnapshot(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                flags,
            );
            pg_sys::heap_setscanlimits(scan, block_start, end - block_start);
            let hscan = scan as pg_sys::HeapScanDesc;
            let mut values: Vec<pg_sys::Datum> = vec![pg_sys::Datum::from(0usize); natts];
            let mut nulls: Vec<bool> = vec![false; natts];
            let mut batch = Batch {
                scan,
                tupdesc,
                values: values.as_mut_ptr(),
                nulls: nulls.as_mut_ptr(),
                cols: &mut cols,
                row_ctx: row_ctx.value(),
                rows: 0,
            };
            let mut last_block = block_start;
            loop {
                let before = (batch.rows, buf.len());
                let more = pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
                    fill_batch(&mut batch, &mut buf, FLUSH_BYTES)
                });
                let (rows, bytes) = (batch.rows - before.0, (buf.len() - before.1) as u64);
                let block = if more { (*hscan).rs_cblock } else { end };
                flush(out, &mut buf, relid);
                let blocks = u64::from(block.saturating_sub(last_block));
                last_block = block;
                observer.progress(rows, bytes, blocks);
                stats.rows += rows;
                stats.raw_bytes += bytes;
                stats.blocks += blocks;
                if !more {
                    break;
                }
                if let Some(why) = observer.should_stop() {
                    pg_sys::heap_endscan(scan);
                    pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                    error!("{why}");
                }
            }
            pg_sys::heap_endscan(scan);
        }
        // Releasing the lock early is safe: the job's leader holds AccessShareLock on every table until
        // the data phase ends, so no DDL can slip in; workers then hold one lock at a time, not thousands.
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    stats
}

fn flush(out: &mut dyn Write, buf: &mut Vec<u8>, relid: pg_sys::Oid) {
    if buf.is_empty() {
        return;
    }
    if let Err(e) = out.write_all(buf) {
        error!("writing chunk of table with oid {}: {e}", relid.to_u32());
    }
    buf.clear();
}

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
//! context reset after each row, and output is handed to the sink in blocks of `FLUSH_BYTES`.

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
    let mut row_ctx = PgMemoryContexts::new("steep_repl chunk row");

    // SAFETY: we are in a transaction with an active snapshot (pushed by the caller). The relation is
    // opened with AccessShareLock and closed at the end; tuples returned by heap_getnext stay valid
    // until the next call, and deformed values point into them or into row_ctx, which is reset only
    // after the row has been formatted. Output strings are read before the reset.
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let tupdesc = (*rel).rd_att;
        let natts = (*tupdesc).natts as usize;
        let attrs = (*tupdesc).attrs.as_slice(natts);
        let mut columns: Vec<(usize, pg_sys::FmgrInfo)> = Vec::with_capacity(natts);
        for (i, att) in attrs.iter().enumerate() {
            if att.attisdropped || att.attgenerated != 0 {
                continue;
            }
            let mut func = pg_sys::InvalidOid;
            let mut is_varlena = false;
            pg_sys::getTypeOutputInfo(att.atttypid, &mut func, &mut is_varlena);
            let mut finfo = pg_sys::FmgrInfo::default();
            pg_sys::fmgr_info(func, &mut finfo);
            columns.push((i, finfo));
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
            let (mut rows_since, mut bytes_since, mut last_block) = (0u64, 0u64, block_start);
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let before = buf.len();
                row_ctx.switch_to(|_| {
                    pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
                    for (k, (att, finfo)) in columns.iter_mut().enumerate() {
                        if k > 0 {
                            buf.push(copy_text::DELIMITER);
                        }
                        if nulls[*att] {
                            buf.extend_from_slice(copy_text::NULL);
                        } else {
                            let s = pg_sys::OutputFunctionCall(finfo, values[*att]);
                            copy_text::escape_into(&mut buf, CStr::from_ptr(s).to_bytes());
                        }
                    }
                    buf.push(copy_text::ROW_END);
                });
                row_ctx.reset();
                rows_since += 1;
                bytes_since += (buf.len() - before) as u64;
                if buf.len() >= FLUSH_BYTES {
                    let block = (*hscan).rs_cblock;
                    flush(out, &mut buf, relid);
                    let blocks = block.saturating_sub(last_block) as u64;
                    last_block = block;
                    observer.progress(rows_since, bytes_since, blocks);
                    stats.rows += rows_since;
                    stats.raw_bytes += bytes_since;
                    stats.blocks += blocks;
                    (rows_since, bytes_since) = (0, 0);
                    if let Some(why) = observer.should_stop() {
                        pg_sys::heap_endscan(scan);
                        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                        error!("{why}");
                    }
                }
            }
            pg_sys::heap_endscan(scan);
            flush(out, &mut buf, relid);
            let blocks = end.saturating_sub(last_block) as u64;
            observer.progress(rows_since, bytes_since, blocks);
            stats.rows += rows_since;
            stats.raw_bytes += bytes_since;
            stats.blocks += blocks;
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

//! Chunk planner: splits each table into contiguous heap-block ranges of about the target size.
//!
//! A chunk is the unit of parallel work and the unit of a chunk file: rows whose `ctid` lies in
//! blocks `[block_start, block_end)` of one table. The last chunk of every table is open-ended
//! (`block_end = None`, i.e. `ctid >= '(block_start,0)'`) so rows in blocks added after the
//! statistics were read are not lost.
//!
//! Rules:
//! - chunks per table = ceil((heap_bytes + toast_bytes) / target_chunk_bytes), at least 1 and at
//!   most `blocks` (a block cannot be split); a table with 0 blocks gets the single chunk
//!   `[0, None)`;
//! - the `blocks` are split evenly: chunk `i` of `n` starts at block `floor(i * blocks / n)`;
//! - tables are sorted largest first by `heap_bytes + toast_bytes`, ties broken by `(schema, name)`,
//!   and chunks listed table by table in that order, by index. Largest first lets a pool of workers
//!   that takes chunks in order finish close together. The order depends only on the input set,
//!   not on its order.

use crate::error::PlanError;
use crate::ident::QualifiedName;

/// Target raw (uncompressed COPY TEXT) size of one chunk: 256 MiB, the default of the
/// `steep_repl.chunk_size` setting (PRODUCT.md §4). Table sizes on disk stand in for COPY sizes,
/// which are of the same order.
pub const DEFAULT_CHUNK_BYTES: u64 = 256 * 1024 * 1024;

/// What the planner needs to know about one table (from `pg_class` / `pg_relation_size`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableStats {
    /// Schema name, unquoted.
    pub schema: String,
    /// Table name, unquoted.
    pub name: String,
    /// Heap blocks (`pg_relation_size(main) / BLCKSZ`) when planned.
    pub blocks: u32,
    /// Heap size in bytes.
    pub heap_bytes: u64,
    /// TOAST size in bytes (table and index), which COPY also reads.
    pub toast_bytes: u64,
    /// Estimated rows (`reltuples`), for progress estimates only.
    pub est_rows: u64,
}

impl TableStats {
    /// Bytes COPY is expected to read: heap plus TOAST (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.heap_bytes.saturating_add(self.toast_bytes)
    }
}

/// One planned chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedChunk {
    /// Index into [`Plan::tables`].
    pub table: usize,
    /// 0-based index of the chunk within its table.
    pub index: u32,
    /// First block of the range.
    pub block_start: u32,
    /// End of the range (exclusive); `None` only for the last chunk of a table (open-ended).
    pub block_end: Option<u32>,
}

/// The planner's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The input tables, sorted largest first (see the module documentation).
    pub tables: Vec<TableStats>,
    /// Every chunk, table by table in the order of `tables`, each table's by index.
    pub chunks: Vec<PlannedChunk>,
}

impl Plan {
    /// The chunks of table `table` (an index into [`Plan::tables`]).
    pub fn chunks_of(&self, table: usize) -> impl Iterator<Item = &PlannedChunk> {
        self.chunks.iter().filter(move |c| c.table == table)
    }
}

/// Number of chunks for one table.
fn chunk_count(table: &TableStats, target_chunk_bytes: u64) -> u32 {
    if table.blocks == 0 {
        return 1;
    }
    let wanted = table.total_bytes().div_ceil(target_chunk_bytes).max(1);
    u32::try_from(wanted).unwrap_or(u32::MAX).min(table.blocks)
}

/// A snapshot small for its parallelism gets smaller chunks, so that every worker has at least this many.
pub const MIN_CHUNKS_PER_WORKER: u64 = 16;
/// The smallest chunk size [`effective_chunk_bytes`] shrinks to.
pub const MIN_ADAPTIVE_CHUNK_BYTES: u64 = 8 << 20;

/// The chunk size to plan with: `target` (`steep_repl.chunk_size`, `--chunk-size`), or less when the
/// snapshot is small for `workers`, so that each worker gets at least [`MIN_CHUNKS_PER_WORKER`] chunks and
/// one large last chunk does not leave the other workers idle (apply later loads with the same
/// granularity); never below [`MIN_ADAPTIVE_CHUNK_BYTES`] unless `target` itself is smaller. From about
/// 8 GB per worker up, this is `target`.
///
/// ```
/// use steep_repl_engine::plan::effective_chunk_bytes;
/// const MB: u64 = 1 << 20;
/// assert_eq!(effective_chunk_bytes(256 * MB, 100_000 * MB, 8), 256 * MB);   // large: unchanged
/// assert_eq!(effective_chunk_bytes(256 * MB, 2048 * MB, 2), 64 * MB);       // 2 GB, 2 workers
/// assert_eq!(effective_chunk_bytes(256 * MB, 10 * MB, 2), 8 * MB);          // tiny: the floor
/// assert_eq!(effective_chunk_bytes(64 * 1024, 10 * MB, 2), 64 * 1024);      // an explicit small target
/// ```
pub fn effective_chunk_bytes(target: u64, total_bytes: u64, workers: u32) -> u64 {
    let spread = total_bytes / (u64::from(workers.max(1)) * MIN_CHUNKS_PER_WORKER);
    target.min(spread.max(MIN_ADAPTIVE_CHUNK_BYTES)).max(1)
}

/// Plans chunks of about `target_chunk_bytes` for `tables` (see the module documentation).
///
/// Fails if `target_chunk_bytes` is 0 or a table appears twice.
pub fn plan(mut tables: Vec<TableStats>, target_chunk_bytes: u64) -> Result<Plan, PlanError> {
    if target_chunk_bytes == 0 {
        return Err(PlanError::ZeroChunkSize);
    }
    tables.sort_by(|a, b| {
        b.total_bytes()
            .cmp(&a.total_bytes())
            .then_with(|| a.schema.cmp(&b.schema))
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut names: Vec<(&str, &str)> = tables.iter().map(|t| (t.schema.as_str(), t.name.as_str())).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(PlanError::DuplicateTable {
            table: QualifiedName::new(pair[0].0, pair[0].1).to_string(),
        });
    }

    let mut chunks = Vec::new();
    for (table_index, table) in tables.iter().enumerate() {
        let n = chunk_count(table, target_chunk_bytes);
        let blocks = u64::from(table.blocks);
        let start_of = |i: u32| -> u32 {
            // i <= n <= blocks, so the quotient is at most `blocks` and fits in u32.
            u32::try_from(u64::from(i) * blocks / u64::from(n)).unwrap_or(table.blocks)
        };
        for i in 0..n {
            let block_end = if i + 1 == n { None } else { Some(start_of(i + 1)) };
            chunks.push(PlannedChunk { table: table_index, index: i, block_start: start_of(i), block_end });
        }
    }
    Ok(Plan { tables, chunks })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(schema: &str, name: &str, blocks: u32, heap: u64, toast: u64) -> TableStats {
        TableStats {
            schema: schema.into(),
            name: name.into(),
            blocks,
            heap_bytes: heap,
            toast_bytes: toast,
            est_rows: 0,
        }
    }

    #[test]
    fn splits_evenly_and_orders_largest_first() {
        let p = plan(
            vec![
                stats("public", "small", 10, 80_000, 0),
                stats("public", "big", 100, 800_000, 200_000),
                stats("public", "empty", 0, 0, 0),
                stats("a", "small", 10, 80_000, 0),
            ],
            300_000,
        )
        .unwrap();
        let names: Vec<String> = p.tables.iter().map(|t| format!("{}.{}", t.schema, t.name)).collect();
        assert_eq!(names, ["public.big", "a.small", "public.small", "public.empty"]);
        let big: Vec<_> = p.chunks_of(0).map(|c| (c.index, c.block_start, c.block_end)).collect();
        assert_eq!(big, [(0, 0, Some(25)), (1, 25, Some(50)), (2, 50, Some(75)), (3, 75, None)]);
        assert_eq!(
            p.chunks_of(3).copied().collect::<Vec<_>>(),
            [PlannedChunk { table: 3, index: 0, block_start: 0, block_end: None }]
        );
    }

    #[test]
    fn never_more_chunks_than_blocks() {
        let p = plan(vec![stats("s", "toasty", 3, 24_576, 10_000_000_000)], 1024).unwrap();
        assert_eq!(p.chunks.len(), 3);
        assert_eq!(p.chunks[2].block_end, None);
    }

    #[test]
    fn rejects_zero_target_and_duplicates() {
        assert_eq!(plan(vec![], 0), Err(PlanError::ZeroChunkSize));
        let dup = plan(vec![stats("s", "t", 1, 10, 0), stats("s", "t", 2, 20, 0)], DEFAULT_CHUNK_BYTES);
        assert_eq!(dup, Err(PlanError::DuplicateTable { table: "\"s\".\"t\"".into() }));
    }
}

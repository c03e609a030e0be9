//! Apply scheduling: which rows of which chunks a parallel apply loads, in which order, in how many units.
//!
//! A **unit** is a range of rows `[row_start, row_end)` of one chunk, loaded in one transaction and
//! recorded with its range, so that an interrupted apply resumes with exactly the rows not recorded.
//! [`schedule`] turns the chunks of a snapshot, and the ranges an earlier run already loaded, into
//! units in the order workers should claim them:
//!
//! - **Largest tables first, `workers` tables at a time, round-robin among them**; when one has no
//!   unit left, the next largest takes its place. Workers running at the same moment then load
//!   different tables: two COPYs into one table contend for its extension lock and the right-most
//!   pages of its indexes; into two tables they do not. And tables are completed one after another,
//!   the largest first, instead of all at the end: the indexes an apply builds after the data are
//!   built for one table while the next ones load, and what is left at the end is the build of a
//!   smaller table's.
//! - **Small units last**, largest first: chunks smaller than `min_part_bytes` (small tables) fill the
//!   gaps at the end.
//! - **A tail that shrinks.** Workers start the last units at different moments and finish when their
//!   unit does; a whole chunk at the end leaves the others idle for up to a chunk's load time. So,
//!   walking back from the end, a unit followed by `after` bytes of work is cut to at most
//!   `max(after / workers, min_part_bytes)` bytes: the final units are `min_part_bytes` long and grow
//!   geometrically towards the bulk, and every worker ends within about one small unit of the others.
//!   The cuts are made in rows, in proportion to the chunk's raw bytes; the pieces of one chunk stay
//!   in row order.
//!
//! A chunk with no rows is one unit `[0, 0)`; it counts as loaded once any range of it is recorded.

/// Default smallest unit the tail is cut into: a few tens of milliseconds of COPY.
pub const MIN_PART_BYTES: u64 = 4 << 20;

/// One chunk of the snapshot, and what an earlier run loaded of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkWork {
    /// Index of the chunk's table in the manifest.
    pub table: usize,
    /// Index of the chunk within its table.
    pub chunk: u32,
    /// Rows of the chunk (from the manifest).
    pub rows: u64,
    /// Raw (COPY TEXT) bytes of the chunk (from the manifest).
    pub raw_bytes: u64,
    /// Row ranges `[start, end)` already loaded, in any order (empty for a fresh apply).
    pub loaded: Vec<(u64, u64)>,
}

/// Rows `[row_start, row_end)` of one chunk, to load in one transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unit {
    pub table: usize,
    pub chunk: u32,
    pub row_start: u64,
    pub row_end: u64,
    /// Estimated raw bytes of the range (the chunk's bytes in proportion to rows).
    pub est_bytes: u64,
}

/// The row ranges of a chunk of `rows` rows not covered by `loaded`, in order. A chunk of 0 rows has
/// the one range `[0, 0)` missing until anything is recorded for it.
pub fn missing_ranges(rows: u64, loaded: &[(u64, u64)]) -> Vec<(u64, u64)> {
    if rows == 0 {
        return if loaded.is_empty() { vec![(0, 0)] } else { Vec::new() };
    }
    let mut loaded: Vec<(u64, u64)> = loaded.iter().map(|&(s, e)| (s.min(rows), e.min(rows))).collect();
    loaded.sort_unstable();
    let mut missing = Vec::new();
    let mut at = 0u64;
    for (s, e) in loaded {
        if s > at {
            missing.push((at, s));
        }
        at = at.max(e);
    }
    if at < rows {
        missing.push((at, rows));
    }
    missing
}

fn est(chunk: &ChunkWork, start: u64, end: u64) -> u64 {
    if chunk.rows == 0 {
        return chunk.raw_bytes;
    }
    (u128::from(chunk.raw_bytes) * u128::from(end - start) / u128::from(chunk.rows)) as u64
}

/// The units still to load, in claiming order (see the module documentation). `chunks` may be in any
/// order; `workers` is how many load at once (1 = no tail cutting).
pub fn schedule(chunks: &[ChunkWork], workers: u32, min_part_bytes: u64) -> Vec<Unit> {
    let min_part = min_part_bytes.max(1);
    let mut chunks: Vec<&ChunkWork> = chunks.iter().collect();
    chunks.sort_by_key(|c| (c.table, c.chunk));
    let units_of = |c: &ChunkWork| -> Vec<Unit> {
        missing_ranges(c.rows, &c.loaded)
            .into_iter()
            .map(|(s, e)| Unit {
                table: c.table,
                chunk: c.chunk,
                row_start: s,
                row_end: e,
                est_bytes: est(c, s, e),
            })
            .collect()
    };

    // Per table, its big units in row order; the table's weight is what is left of it.
    let mut tables: Vec<(u64, usize, std::collections::VecDeque<Unit>)> = Vec::new();
    let mut position: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut small: Vec<Unit> = Vec::new();
    for c in &chunks {
        for u in units_of(c) {
            if u.est_bytes < min_part {
                small.push(u);
                continue;
            }
            let k = *position.entry(u.table).or_insert_with(|| {
                tables.push((0, u.table, std::collections::VecDeque::new()));
                tables.len() - 1
            });
            tables[k].0 += u.est_bytes;
            tables[k].2.push_back(u);
        }
    }
    tables.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut waiting: std::collections::VecDeque<_> = tables.into_iter().collect();
    let lanes = workers.max(1) as usize;
    let mut rotation = Vec::with_capacity(lanes);
    let mut order: Vec<Unit> = Vec::new();
    // Each round takes one unit of every table in the rotation; an emptied table leaves it, and the
    // largest one waiting takes its place.
    loop {
        while rotation.len() < lanes {
            match waiting.pop_front() {
                Some(t) => rotation.push(t),
                None => break,
            }
        }
        if rotation.is_empty() {
            break;
        }
        for (_, _, q) in rotation.iter_mut() {
            order.extend(q.pop_front());
        }
        rotation.retain(|(_, _, q)| !q.is_empty());
    }
    small.sort_by(|a, b| {
        b.est_bytes.cmp(&a.est_bytes).then((a.table, a.chunk, a.row_start).cmp(&(
            b.table,
            b.chunk,
            b.row_start,
        )))
    });
    order.extend(small);
    if workers <= 1 {
        return order;
    }

    let chunk_of = |u: &Unit| -> &ChunkWork {
        let k = chunks.partition_point(|c| (c.table, c.chunk) < (u.table, u.chunk));
        chunks[k]
    };
    let p = u64::from(workers);
    let mut reversed: Vec<Unit> = Vec::with_capacity(order.len());
    let mut after = 0u64;
    for mut u in order.into_iter().rev() {
        loop {
            let limit = (after / p).max(min_part);
            let len = u.row_end - u.row_start;
            if u.est_bytes <= limit || len < 2 {
                after += u.est_bytes;
                reversed.push(u);
                break;
            }
            let c = chunk_of(&u);
            let piece_rows = ((u128::from(len) * u128::from(limit) / u128::from(u.est_bytes.max(1))) as u64)
                .clamp(1, len - 1);
            let cut = u.row_end - piece_rows;
            let piece = Unit { row_start: cut, est_bytes: est(c, cut, u.row_end), ..u };
            after += piece.est_bytes;
            reversed.push(piece);
            u.row_end = cut;
            u.est_bytes = est(c, u.row_start, cut);
        }
    }
    reversed.reverse();
    reversed
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn chunk(table: usize, chunk: u32, rows: u64, mb: u64) -> ChunkWork {
        ChunkWork { table, chunk, rows, raw_bytes: mb * MB, loaded: Vec::new() }
    }

    #[test]
    fn missing_ranges_are_the_complement() {
        assert_eq!(missing_ranges(10, &[]), [(0, 10)]);
        assert_eq!(missing_ranges(10, &[(3, 5), (0, 2)]), [(2, 3), (5, 10)]);
        assert_eq!(missing_ranges(10, &[(0, 10)]), []);
        assert_eq!(missing_ranges(10, &[(5, 10), (0, 5)]), []);
        assert_eq!(missing_ranges(0, &[]), [(0, 0)]);
        assert_eq!(missing_ranges(0, &[(0, 0)]), []);
    }

    #[test]
    fn one_worker_loads_one_table_after_another_then_small_units_uncut() {
        let chunks = [
            chunk(0, 0, 100, 40),
            chunk(0, 1, 100, 40),
            chunk(1, 0, 100, 40),
            chunk(2, 0, 10, 1),
            chunk(3, 0, 10, 2),
        ];
        let order: Vec<(usize, u32)> =
            schedule(&chunks, 1, 4 * MB).iter().map(|u| (u.table, u.chunk)).collect();
        assert_eq!(order, [(0, 0), (0, 1), (1, 0), (3, 0), (2, 0)]);
    }

    #[test]
    fn two_workers_load_two_tables_at_a_time_and_complete_them_one_after_another() {
        // Tables of 6, 4 and 2 chunks of 40 MB.
        let chunks: Vec<ChunkWork> = [(0, 6), (1, 4), (2, 2)]
            .iter()
            .flat_map(|&(t, n)| (0..n).map(move |c| chunk(t, c, 400_000, 40)))
            .collect();
        let units = schedule(&chunks, 2, 4 * MB);
        let tables: Vec<usize> = units.iter().map(|u| u.table).collect();
        assert_eq!(&tables[..10], [0, 1, 0, 1, 0, 1, 0, 1, 0, 2], "{tables:?}");
        let last_of = |t: usize| tables.iter().rposition(|&x| x == t).unwrap();
        let first_of = |t: usize| tables.iter().position(|&x| x == t).unwrap();
        // The largest two first; the third starts only when one of them is done, and is done last.
        assert!(
            last_of(1) < first_of(2) && first_of(2) < last_of(0) && last_of(0) < last_of(2),
            "{tables:?}"
        );
    }

    #[test]
    fn the_tail_shrinks_towards_the_end() {
        let chunks: Vec<ChunkWork> = (0..10).map(|i| chunk(i % 2, i as u32 / 2, 400_000, 40)).collect();
        let units = schedule(&chunks, 2, 4 * MB);
        assert!(units.len() > 10, "the tail is cut: {units:?}");
        let last = units.last().unwrap();
        assert!(last.est_bytes <= 4 * MB + MB / 10, "last unit {last:?}");
        // Walking back from the end, no unit is larger than the work after it shared by the workers
        // (or the smallest part).
        let mut after = 0u64;
        for u in units.iter().rev() {
            assert!(u.est_bytes <= (after / 2).max(4 * MB) + MB / 10, "{u:?} after {after}");
            after += u.est_bytes;
        }
        // The bulk is untouched.
        assert_eq!((units[0].row_start, units[0].row_end), (0, 400_000));
    }

    proptest::proptest! {
        #[test]
        fn units_cover_exactly_the_missing_rows(
            sizes in proptest::collection::vec((0u64..5000, 0u64..64), 1..30),
            loaded_cut in proptest::collection::vec(0u64..5000, 0..30),
            workers in 1u32..9,
            min_part_mb in 1u64..9,
        ) {
            let chunks: Vec<ChunkWork> = sizes
                .iter()
                .enumerate()
                .map(|(i, &(rows, mb))| {
                    let mut c = chunk(i % 4, (i / 4) as u32, rows, mb);
                    if let Some(&cut) = loaded_cut.get(i) {
                        if rows > 0 && cut % 3 == 0 { c.loaded = vec![(0, cut % rows)]; }
                        if rows > 0 && cut % 3 == 1 { c.loaded = vec![(cut % rows, rows)]; }
                    }
                    c
                })
                .collect();
            let units = schedule(&chunks, workers, min_part_mb * MB);
            for c in &chunks {
                let mine: Vec<(u64, u64)> = units
                    .iter()
                    .filter(|u| (u.table, u.chunk) == (c.table, c.chunk))
                    .map(|u| (u.row_start, u.row_end))
                    .collect();
                let in_order = mine.windows(2).all(|w| w[0].1 <= w[1].0);
                proptest::prop_assert!(in_order, "pieces of a chunk overlap or are out of order: {:?}", mine);
                let want = missing_ranges(c.rows, &c.loaded);
                let inside = mine.iter().all(|&(s, e)| want.iter().any(|&(ws, we)| ws <= s && e <= we));
                proptest::prop_assert!(inside, "{:?} outside the missing {:?}", mine, want);
                let len = |v: &[(u64, u64)]| v.iter().map(|(s, e)| e - s).sum::<u64>();
                proptest::prop_assert_eq!(len(&mine), len(&want));
                proptest::prop_assert_eq!(mine.is_empty(), want.is_empty());
            }
        }
    }
}

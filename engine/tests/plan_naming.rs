//! Property tests of the planner and of table directory naming.

use std::collections::HashSet;

use proptest::prelude::*;
use steep_repl_engine::plan::{TableStats, plan};
use steep_repl_engine::{PlanError, parse_table_dir, table_dir};

fn table_stats() -> impl Strategy<Value = Vec<TableStats>> {
    prop::collection::vec(
        (
            0u32..3000,
            prop_oneof![0u64..10_000_000, any::<u64>()],
            prop_oneof![Just(0u64), 0u64..50_000_000, any::<u64>()],
        ),
        0..12,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (blocks, heap, toast))| TableStats {
                schema: format!("s{}", i % 3),
                name: format!("t{i}"),
                blocks,
                heap_bytes: heap,
                toast_bytes: toast,
                est_rows: 0,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_block_covered_exactly_once(
        tables in table_stats(),
        target in prop_oneof![1u64..100_000, 1u64..u64::MAX],
    ) {
        let p = plan(tables.clone(), target).unwrap();
        prop_assert_eq!(p.tables.len(), tables.len());
        for (t, stats) in p.tables.iter().enumerate() {
            let chunks: Vec<_> = p.chunks_of(t).collect();
            prop_assert!(!chunks.is_empty());
            prop_assert!(chunks.len() as u64 <= u64::from(stats.blocks.max(1)));
            let mut covered = vec![0u32; stats.blocks as usize];
            for (i, c) in chunks.iter().enumerate() {
                prop_assert_eq!(c.index as usize, i);
                let last = i + 1 == chunks.len();
                prop_assert_eq!(c.block_end.is_none(), last);
                let end = c.block_end.unwrap_or(stats.blocks);
                prop_assert!(stats.blocks == 0 || c.block_start < end, "empty chunk {:?}", c);
                for b in c.block_start..end {
                    covered[b as usize] += 1;
                }
            }
            prop_assert!(covered.iter().all(|&n| n == 1));
            // Even split: chunk sizes differ by at most one block.
            if stats.blocks > 0 {
                let sizes: Vec<u32> = chunks
                    .iter()
                    .map(|c| c.block_end.unwrap_or(stats.blocks) - c.block_start)
                    .collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                prop_assert!(max - min <= 1, "{:?}", sizes);
            }
        }
        // Largest first, chunks grouped by table in order.
        for w in p.tables.windows(2) {
            prop_assert!(w[0].total_bytes() >= w[1].total_bytes());
        }
        let order: Vec<usize> = p.chunks.iter().map(|c| c.table).collect();
        let mut sorted = order.clone();
        sorted.sort();
        prop_assert_eq!(order, sorted);
        // Deterministic whatever the input order.
        let mut reversed = tables;
        reversed.reverse();
        prop_assert_eq!(plan(reversed, target).unwrap(), p);
    }

    #[test]
    fn table_dir_is_injective_and_safe(
        a in (any::<String>(), any::<String>()),
        b in (any::<String>(), any::<String>()),
        long in (".{0,63}", ".{0,63}"),
    ) {
        let a = (a.0.replace('\0', ""), a.1.replace('\0', ""));
        let b = (b.0.replace('\0', ""), b.1.replace('\0', ""));
        for (schema, name) in [&a, &b, &long] {
            let dir = table_dir(schema, name);
            prop_assert!(dir.len() <= 255);
            prop_assert!(!dir.contains('/') && !dir.contains('\\') && !dir.contains('\0'));
            prop_assert!(dir != "." && dir != "..");
            prop_assert!(dir.bytes().all(|c| c.is_ascii_graphic()));
            if !dir.contains('~') {
                prop_assert_eq!(parse_table_dir(&dir), Some((schema.clone(), name.clone())));
            }
        }
        let (da, db) = (table_dir(&a.0, &a.1), table_dir(&b.0, &b.1));
        prop_assert_eq!(da == db, a == b);
        prop_assert_eq!(da.eq_ignore_ascii_case(&db), a == b);
    }

    #[test]
    fn names_differing_in_case_or_punctuation_stay_distinct(
        base in "[a-zA-Z0-9_. -]{1,63}",
        flip in any::<prop::sample::Index>(),
    ) {
        let i = flip.index(base.len());
        let mut other: Vec<u8> = base.clone().into_bytes();
        other[i] = if other[i].is_ascii_uppercase() {
            other[i].to_ascii_lowercase()
        } else if other[i].is_ascii_lowercase() {
            other[i].to_ascii_uppercase()
        } else {
            b'.'
        };
        let other = String::from_utf8(other).unwrap();
        let da = table_dir("s", &base).to_ascii_lowercase();
        let db = table_dir("s", &other).to_ascii_lowercase();
        prop_assert_eq!(da == db, base == other);
    }
}

#[test]
fn planner_rejects_zero_target() {
    assert_eq!(plan(vec![], 0), Err(PlanError::ZeroChunkSize));
}

#[test]
fn many_names_distinct_after_case_folding() {
    let mut seen = HashSet::new();
    let names = ["a", "A", "a.b", "a%2Eb", "a b", "a_b", "ä", "Ä", ".", "..", "%", "~", "a~"];
    for schema in names {
        for table in names {
            assert!(seen.insert(table_dir(schema, table).to_ascii_lowercase()));
        }
    }
}

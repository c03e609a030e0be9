//! Apply inside the server (issue 5): round trips compared row for row, refusals before any row
//! changes, and exactly-once resume after a killed worker or a cancel.

use steep_repl_testkit as harness;

use harness::*;
use steep_repl_engine::manifest::Manifest;

const ALL_TYPES: &str = include_str!("../../fixtures/sql/all_types.sql");

const MORE: &str = r#"
CREATE TABLE measurements (id bigserial, at date NOT NULL, v numeric) PARTITION BY RANGE (at);
CREATE TABLE measurements_2023 PARTITION OF measurements FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO measurements (at, v) SELECT date '2023-01-01' + (g % 700), g / 7.0 FROM generate_series(1, 20000) g;
CREATE TABLE empty_one (a int, b text);
CREATE SCHEMA "Odd Schema";
CREATE TABLE "Odd Schema"."ta""ble.x" ("Col A" int, "select" text, "ünï" text);
INSERT INTO "Odd Schema"."ta""ble.x" SELECT g, E'line\nbreak ' || g, 'ü' FROM generate_series(1, 300) g;
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent (id));
INSERT INTO parent SELECT generate_series(1, 5000);
INSERT INTO child SELECT g, g FROM generate_series(1, 5000) g;
CREATE UNLOGGED TABLE scratch (k text); INSERT INTO scratch VALUES ('u1'), ('u2');
SELECT setval('measurements_id_seq', 987654);
"#;

/// Generates a snapshot of `db` into a fresh path and returns the path.
fn generate(cluster: &Cluster, db: &str, name: &str, setup: &[&str]) -> std::path::PathBuf {
    let mut c = cluster.client(db);
    let dir = snapshot_path(name);
    let id = start_snapshot(&mut c, setup, &dir, ", parallel => 2");
    let (status, error) = wait_for(&mut c, &id, 120);
    assert_eq!(status, "complete", "generate: {error:?}");
    dir
}

fn start_apply(
    client: &mut harness::postgres::Client,
    setup: &[&str],
    dir: &std::path::Path,
    args: &str,
) -> Result<String, String> {
    for s in setup {
        client.batch_execute(s).unwrap();
    }
    client
        .query_one(&format!("SELECT steep_repl.start_apply('{}'{args})", dir.display()), &[])
        .map(|r| r.get(0))
        .map_err(|e| db_message(&e))
}

#[test]
fn round_trip_is_exact_for_types_partitions_toast_and_odd_names() {
    let cluster = preloaded();
    cluster.fresh_db("app_src", true);
    cluster
        .client("app_src")
        .batch_execute(&format!("{ALL_TYPES}{MORE}"))
        .unwrap_or_else(|e| panic!("{}", db_message(&e)));
    let dir = generate(cluster, "app_src", "app_roundtrip", &["SET steep_repl.chunk_size = '64kB'"]);
    cluster.fresh_db("app_dst", false);
    copy_schema(cluster, "app_src", "app_dst");
    let mut d = cluster.client("app_dst");
    // A tiny apply_part_size cuts the end of the job into many ranges of rows of the last chunks.
    let id =
        start_apply(&mut d, &["SET steep_repl.apply_part_size = '1kB'"], &dir, ", parallel => 2").unwrap();
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, "applied", "{error:?}");
    assert_same_rows(cluster, "app_src", "app_dst", &dir);
    let m = Manifest::load(&dir).unwrap();
    let names: Vec<String> = m.tables.iter().map(|t| t.name.clone()).collect();
    assert!(
        names.contains(&"measurements_2024".to_string()) && !names.contains(&"measurements".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"empty_one".to_string()) && names.contains(&"scratch".to_string()));
    let seq: (i64, bool) = d
        .query_one("SELECT last_value, is_called FROM measurements_id_seq", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(seq, (987654, true));
    let (units, chunks, rows): (i64, i64, i64) = d
        .query_one(
            "SELECT count(*), count(DISTINCT (schema_name, table_name, chunk_index)), sum(rows_loaded)::int8 \
             FROM steep_repl.apply_chunks WHERE apply_id = $1",
            &[&id],
        )
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!((chunks as u64, rows as u64), (m.totals.chunks, m.totals.rows));
    assert!(units > chunks, "the tail was cut into ranges of rows: {units} units for {chunks} chunks");
    let (done, total): (i32, i32) = d
        .query_one("SELECT chunks_done, chunks_total FROM steep_repl.snapshots WHERE id = $1", &[&id])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (done as u64, total as u64),
        (m.totals.chunks, m.totals.chunks),
        "progress counts chunks, not units"
    );
    // Every loaded table was analyzed (by the workers as their tables completed, or by the leader).
    let not_analyzed: Vec<String> = m
        .tables
        .iter()
        .filter(|t| {
            let last: Option<String> = d
                .query_one(
                    "SELECT last_analyze::text FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2",
                    &[&t.schema, &t.name],
                )
                .unwrap()
                .get(0);
            last.is_none()
        })
        .map(|t| t.label())
        .collect();
    assert!(not_analyzed.is_empty(), "not analyzed: {not_analyzed:?}");
}

#[test]
fn text_from_a_latin1_database_is_converted_into_a_utf8_one() {
    let cluster = preloaded();
    let mut admin = cluster.client("postgres");
    admin.batch_execute("DROP DATABASE IF EXISTS app_latin1_src WITH (FORCE)").unwrap();
    admin
        .batch_execute(
            "CREATE DATABASE app_latin1_src ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .unwrap();
    let mut s = cluster.client("app_latin1_src");
    // The client speaks UTF8; the server stores LATIN1 bytes (é = 0xE9), and the snapshot holds them.
    s.batch_execute(
        "CREATE EXTENSION steep_repl; \
         CREATE TABLE t (id int PRIMARY KEY, name text); \
         INSERT INTO t VALUES (1, 'café'), (2, 'Ångström ÿ'), (3, 'plain')",
    )
    .unwrap();
    let dir = generate(cluster, "app_latin1_src", "app_latin1", &[]);
    let m = Manifest::load(&dir).unwrap();
    assert_eq!(m.settings.get("server_encoding").map(String::as_str), Some("LATIN1"));
    cluster.fresh_db("app_utf8_dst", true);
    let mut d = cluster.client("app_utf8_dst");
    d.batch_execute("CREATE TABLE t (id int PRIMARY KEY, name text)").unwrap();
    let id = start_apply(&mut d, &[], &dir, "").unwrap();
    let (status, error) = wait_for(&mut d, &id, 60);
    assert_eq!(status, "applied", "{error:?}");
    let rows: Vec<(i32, String, i32)> = d
        .query("SELECT id, name, octet_length(name) FROM t ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [(1, "café".to_string(), 5), (2, "Ångström ÿ".to_string(), 13), (3, "plain".to_string(), 5)]
    );
}

#[test]
fn a_corrupted_chunk_is_refused_before_any_row_changes() {
    let cluster = preloaded();
    cluster.fresh_db("app_corrupt_src", true);
    cluster
        .client("app_corrupt_src")
        .batch_execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 20000) g")
        .unwrap();
    let dir = generate(cluster, "app_corrupt_src", "app_corrupt", &["SET steep_repl.chunk_size = '64kB'"]);
    let m = Manifest::load(&dir).unwrap();
    let victim = m.tables[0].chunks[3].path_in(&dir);
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    cluster.fresh_db("app_corrupt_dst", false);
    copy_schema(cluster, "app_corrupt_src", "app_corrupt_dst");
    let mut d = cluster.client("app_corrupt_dst");
    let id = start_apply(&mut d, &[], &dir, ", parallel => 2").unwrap();
    let (status, error) = wait_for(&mut d, &id, 60);
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(error.starts_with("verification failed:"), "{error}");
    assert!(error.contains(&m.tables[0].chunks[3].file), "names the bad chunk: {error}");
    let n: i64 = d.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 0, "no row changed");
}

#[test]
fn schema_mismatches_are_all_listed() {
    let cluster = preloaded();
    cluster.fresh_db("app_mismatch_src", true);
    cluster
        .client("app_mismatch_src")
        .batch_execute(
            "CREATE TABLE a (id int, note text); INSERT INTO a VALUES (1, 'x');
             CREATE TABLE b (id int, amount numeric(10,2), extra text); INSERT INTO b VALUES (1, 2.5, 'e');
             CREATE TABLE c (id int);",
        )
        .unwrap();
    let dir = generate(cluster, "app_mismatch_src", "app_mismatch", &[]);
    cluster.fresh_db("app_mismatch_dst", true);
    let mut d = cluster.client("app_mismatch_dst");
    d.batch_execute("CREATE TABLE a (id int, note text); CREATE TABLE b (id int, amount integer)").unwrap();
    let err = start_apply(&mut d, &[], &dir, "").unwrap_err();
    assert!(err.contains("3 problems"), "{err}");
    assert!(err.contains("\"public\".\"c\" does not exist"), "{err}");
    assert!(err.contains("\"amount\""), "{err}");
    assert!(err.contains("\"extra\""), "{err}");
}

#[test]
fn non_empty_targets_are_refused_unless_truncate() {
    let cluster = preloaded();
    cluster.fresh_db("app_full_src", true);
    cluster
        .client("app_full_src")
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)")
        .unwrap();
    let dir = generate(cluster, "app_full_src", "app_full", &[]);
    cluster.fresh_db("app_full_dst", true);
    let mut d = cluster.client("app_full_dst");
    d.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (-1), (-2)").unwrap();
    let err = start_apply(&mut d, &[], &dir, "").unwrap_err();
    assert!(err.contains("not empty") && err.contains("\"public\".\"t\""), "{err}");
    let id = start_apply(&mut d, &[], &dir, ", truncate => true, analyze_tables => false").unwrap();
    let (status, error) = wait_for(&mut d, &id, 60);
    assert_eq!(status, "applied", "{error:?}");
    let (n, min): (i64, i32) =
        d.query_one("SELECT count(*), min(id) FROM t", &[]).map(|r| (r.get(0), r.get(1))).unwrap();
    assert_eq!((n, min), (100, 1));
}

/// Interrupts an apply (a killed worker or a cancel) once some chunks are loaded, or with
/// `in_cut_tail` once the first range of a chunk cut into several has committed (so that chunk is
/// partly loaded), then resumes it and checks every row arrived exactly once.
fn interrupted_then_resumed(interrupt: &str, in_cut_tail: bool) {
    let cluster = preloaded();
    let tag = if in_cut_tail { format!("{interrupt}_tail") } else { interrupt.to_string() };
    let (src, dst) = (format!("app_{tag}_src"), format!("app_{tag}_dst"));
    cluster.fresh_db(&src, true);
    cluster
        .client(&src)
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, h text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 60000) g")
        .unwrap();
    // The cut tail is the last two chunks or so: with fewer, larger chunks and a longer pause it lasts
    // seconds, so a busy machine still sees it partly loaded before the cancel lands.
    let (chunk_size, pause) = if in_cut_tail { ("256kB", "400ms") } else { ("64kB", "150ms") };
    let dir = generate(
        cluster,
        &src,
        &format!("app_{tag}"),
        &[&format!("SET steep_repl.chunk_size = '{chunk_size}'")],
    );
    cluster.fresh_db(&dst, false);
    copy_schema(cluster, &src, &dst);
    let mut d = cluster.client(&dst);
    let pause = format!("SET steep_repl.chunk_pause = '{pause}'");
    let setup = [pause.as_str(), "SET steep_repl.apply_part_size = '1kB'"];
    let id = start_apply(&mut d, &setup, &dir, ", parallel => 2").unwrap();
    // Let a few chunks commit (or the first cut range of a chunk), then interrupt.
    let tail = Manifest::load(&dir).unwrap();
    let progressed = |d: &mut harness::postgres::Client| -> bool {
        if in_cut_tail {
            // The last chunk is cut into the most pieces (about a third of it, then two ninths, ...
            // down to a few 1kB ones). Once a piece past its start has committed and a quarter of it
            // or more is still to load, that rest is several units away, each behind a 400ms pause:
            // the cancel lands while the chunk is partly loaded.
            let last = &tail.tables[0].chunks;
            let (index, rows) = (last.len() as i32 - 1, last[last.len() - 1].rows as i64);
            let (loaded, cut): (i64, bool) = d
                .query_one(
                    "SELECT coalesce(sum(rows_loaded), 0)::int8, coalesce(bool_or(row_start > 0), false) \
                     FROM steep_repl.apply_chunks WHERE apply_id = $1 AND chunk_index = $2",
                    &[&id, &index],
                )
                .map(|r| (r.get(0), r.get(1)))
                .unwrap();
            cut && loaded * 4 <= rows * 3
        } else {
            let done: i32 = d
                .query_one("SELECT chunks_done FROM steep_repl.snapshot_progress($1)", &[&id])
                .unwrap()
                .get(0);
            done >= 3
        }
    };
    let mut ok = false;
    for _ in 0..1500 {
        ok = progressed(&mut d);
        if ok {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(ok, "apply made no progress");
    // While the data loads, the leader keeps autovacuum (and other VACUUM, ANALYZE, DDL) off the table.
    let sue_locks = |d: &mut harness::postgres::Client| -> i64 {
        d.query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND relation = 't'::regclass \
             AND mode = 'ShareUpdateExclusiveLock' AND granted",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(sue_locks(&mut d), 1);
    if interrupt == "kill" {
        let pids: Vec<i32> =
            d.query_one("SELECT worker_pids FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
        assert!(pids.len() >= 2, "{pids:?}");
        d.query_one("SELECT pg_terminate_backend($1)", &[&pids[1]]).unwrap();
    } else {
        let ok: bool = d.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get(0);
        assert!(ok);
    }
    let (status, _) = wait_for(&mut d, &id, 60);
    assert_eq!(status, if interrupt == "kill" { "failed" } else { "cancelled" });
    // ... and lets go when the job ends, however it ends.
    let mut left = sue_locks(&mut d);
    for _ in 0..250 {
        if left == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        left = sue_locks(&mut d);
    }
    assert_eq!(left, 0, "the leader released its session lock");
    let partial: i64 = d.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert!(partial > 0 && partial < 60000, "partially loaded: {partial}");
    let loaded: i64 = d
        .query_one(
            "SELECT coalesce(sum(rows_loaded), 0)::int8 FROM steep_repl.apply_chunks WHERE apply_id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(partial, loaded, "every committed row is recorded, nothing more");
    if in_cut_tail {
        let m = Manifest::load(&dir).unwrap();
        let per_chunk: Vec<(i32, i64)> = d
            .query(
                "SELECT chunk_index, sum(rows_loaded)::int8 FROM steep_repl.apply_chunks WHERE apply_id = $1 \
                 GROUP BY 1",
                &[&id],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let partly = per_chunk.iter().any(|&(c, n)| (n as u64) < m.tables[0].chunks[c as usize].rows);
        assert!(partly, "a chunk is partly loaded when the apply stops: {per_chunk:?}");
    }
    d.batch_execute("RESET steep_repl.chunk_pause").unwrap();
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap().get(0);
    assert_eq!(again, id);
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, "applied", "{error:?}");
    assert_same_rows(cluster, &src, &dst, &dir);
    let err = d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap_err();
    assert!(db_message(&err).contains("already applied"));
}

#[test]
fn a_killed_worker_then_resume_loads_each_row_once() {
    interrupted_then_resumed("kill", false);
}

#[test]
fn a_cancel_in_the_cut_tail_then_resume_loads_each_row_once() {
    interrupted_then_resumed("cancel", true);
}

#[test]
fn a_cancel_then_resume_loads_each_row_once() {
    interrupted_then_resumed("cancel", false);
}

#[test]
fn an_incomplete_snapshot_is_never_applied() {
    let cluster = preloaded();
    cluster.fresh_db("app_incomplete", true);
    let dir = snapshot_path("app_incomplete");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let mut d = cluster.client("app_incomplete");
    let err = start_apply(&mut d, &[], &dir, "").unwrap_err();
    assert!(err.contains("manifest.json"), "{err}");
}

#[test]
fn inheritance_children_are_neither_counted_nor_truncated() {
    let cluster = preloaded();
    cluster.fresh_db("app_inh_src", true);
    cluster
        .client("app_inh_src")
        .batch_execute(
            "CREATE TABLE parent (id int, note text); CREATE TABLE child (extra int) INHERITS (parent);
             INSERT INTO parent SELECT g, 'p' FROM generate_series(1, 50) g;
             INSERT INTO child SELECT g, 'c', g FROM generate_series(1, 7) g;",
        )
        .unwrap();
    let mut c = cluster.client("app_inh_src");
    let dir = snapshot_path("app_inh");
    let id = start_snapshot(&mut c, &[], &dir, ", tables => ARRAY['parent']");
    assert_eq!(wait_for(&mut c, &id, 60).0, "complete");
    assert_eq!(Manifest::load(&dir).unwrap().tables[0].rows, 50, "the parent's own rows only");
    cluster.fresh_db("app_inh_dst", false);
    copy_schema(cluster, "app_inh_src", "app_inh_dst");
    let mut d = cluster.client("app_inh_dst");
    d.batch_execute("INSERT INTO child VALUES (-1, 'kept', -1)").unwrap();
    // The parent holds no rows of its own: not refused, though SELECT FROM parent sees the child's.
    let id = start_apply(&mut d, &[], &dir, "").unwrap();
    assert_eq!(wait_for(&mut d, &id, 60).0, "applied");
    // TRUNCATE of the parent leaves the child, which is not in the snapshot, alone.
    let id = start_apply(&mut d, &[], &dir, ", truncate => true").unwrap();
    assert_eq!(wait_for(&mut d, &id, 60).0, "applied");
    let (own, child): (i64, i64) = d
        .query_one("SELECT (SELECT count(*) FROM ONLY parent), (SELECT count(*) FROM child)", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((own, child), (50, 1));
}

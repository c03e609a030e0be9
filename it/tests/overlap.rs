//! Overlap analysis between two clusters (issue 14, PRODUCT.md §10): identical tables match; each of a
//! suite of mutations made on the peer lands in exactly its category with exactly its key; a snapshot
//! is never torn by concurrent writes; a cancel stops both nodes' scans; a peer that goes away fails
//! the job with a clear error; other roles are refused.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use steep_repl_testkit as harness;

use harness::*;

/// Tables of every key kind the issue names, filled alike on both nodes by [`FILL`].
const SCHEMA: &str = r#"
CREATE SCHEMA app;
CREATE TABLE app.ints (id int PRIMARY KEY, a int, b text, at timestamptz);
CREATE TABLE app.comp (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE app.texts (k text COLLATE "C" PRIMARY KEY, v text);
CREATE TABLE app.uuids (u uuid PRIMARY KEY, v int);
CREATE TABLE app.nums (n numeric PRIMARY KEY, v text);
CREATE TABLE app.floats (f float8 PRIMARY KEY, v text);
CREATE COLLATION app.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
CREATE TABLE app.ci_keys (k text COLLATE app.ci PRIMARY KEY, v text);
CREATE TABLE app.ri (a int NOT NULL, b int NOT NULL, v text);
CREATE UNIQUE INDEX ri_ab ON app.ri (a, b);
ALTER TABLE app.ri REPLICA IDENTITY USING INDEX ri_ab;
CREATE TABLE app.nokey (a int, b text);
CREATE TABLE "Odd Schema"."odd.Name" ("Key" int PRIMARY KEY, v text);
"#;

const FILL: &str = r#"
INSERT INTO app.ints SELECT g, g % 13, CASE WHEN g % 7 = 0 THEN NULL ELSE 'v' || g END,
    timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute' FROM generate_series(1, 5000) g;
INSERT INTO app.comp SELECT g % 50, 'b' || g, 'v' || g FROM generate_series(1, 500) g;
INSERT INTO app.texts SELECT 'k' || g, 'v' || g FROM generate_series(1, 300) g;
INSERT INTO app.texts VALUES (E'tab\there', 'x'), (E'new\nline', 'y'), (E'back\\slash', 'z');
INSERT INTO app.uuids SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, g FROM generate_series(1, 300) g;
INSERT INTO app.nums SELECT g / 2.0, 'v' || g FROM generate_series(1, 300) g;
INSERT INTO app.floats SELECT g / 4.0, 'v' || g FROM generate_series(-20, 20) g;
INSERT INTO app.ci_keys SELECT 'k' || g, 'v' || g FROM generate_series(1, 10) g;
INSERT INTO app.ri SELECT g % 20, g, 'v' || g FROM generate_series(1, 300) g;
INSERT INTO app.nokey SELECT g, 'v' || g FROM generate_series(1, 100) g;
INSERT INTO "Odd Schema"."odd.Name" SELECT g, 'v' || g FROM generate_series(1, 100) g;
"#;

/// A difference: (table, category, key as JSON).
type Difference = (&'static str, &'static str, &'static str);

/// Each mutation made on the peer, and the differences it must give.
const MUTATIONS: &[(&str, &[Difference])] = &[
    ("UPDATE app.ints SET a = a + 1 WHERE id = 10", &[("ints", "conflict", r#"{"id": 10}"#)]),
    ("UPDATE app.ints SET b = '' WHERE id = 14", &[("ints", "conflict", r#"{"id": 14}"#)]),
    ("UPDATE app.ints SET b = NULL WHERE id = 15", &[("ints", "conflict", r#"{"id": 15}"#)]),
    ("UPDATE app.ints SET b = E'x\ty' WHERE id = 30", &[("ints", "conflict", r#"{"id": 30}"#)]),
    ("UPDATE app.ints SET b = E'line\nbreak' WHERE id = 31", &[("ints", "conflict", r#"{"id": 31}"#)]),
    ("UPDATE app.ints SET b = E'back\\slash' WHERE id = 32", &[("ints", "conflict", r#"{"id": 32}"#)]),
    (
        "UPDATE app.ints SET b = CASE id WHEN 40 THEN 'v41' ELSE 'v40' END WHERE id IN (40, 41)",
        &[("ints", "conflict", r#"{"id": 40}"#), ("ints", "conflict", r#"{"id": 41}"#)],
    ),
    ("DELETE FROM app.ints WHERE id = 50", &[("ints", "local_only", r#"{"id": 50}"#)]),
    ("INSERT INTO app.ints VALUES (100000, 1, 'new', now())", &[("ints", "peer_only", r#"{"id": 100000}"#)]),
    ("INSERT INTO app.ints VALUES (100001, 1, 'dup', now()); DELETE FROM app.ints WHERE id = 100001", &[]),
    (
        "UPDATE app.ints SET at = at + interval '1 second' WHERE id = 1",
        &[("ints", "conflict", r#"{"id": 1}"#)],
    ),
    ("DELETE FROM app.ints WHERE id = 5000", &[("ints", "local_only", r#"{"id": 5000}"#)]),
    (
        "UPDATE app.comp SET v = 'changed' WHERE a = 3 AND b = 'b3'",
        &[("comp", "conflict", r#"{"a": 3, "b": "b3"}"#)],
    ),
    ("DELETE FROM app.comp WHERE a = 4 AND b = 'b4'", &[("comp", "local_only", r#"{"a": 4, "b": "b4"}"#)]),
    (
        "UPDATE app.texts SET v = 'changed' WHERE k = E'tab\there'",
        &[("texts", "conflict", r#"{"k": "tab\there"}"#)],
    ),
    ("DELETE FROM app.texts WHERE k = E'new\nline'", &[("texts", "local_only", r#"{"k": "new\nline"}"#)]),
    ("INSERT INTO app.texts VALUES ('K1', 'case')", &[("texts", "peer_only", r#"{"k": "K1"}"#)]),
    (
        "INSERT INTO app.uuids VALUES ('ffffffff-ffff-ffff-ffff-ffffffffffff', 0)",
        &[("uuids", "peer_only", r#"{"u": "ffffffff-ffff-ffff-ffff-ffffffffffff"}"#)],
    ),
    ("DELETE FROM app.nums WHERE n = 1.5", &[("nums", "local_only", r#"{"n": 1.5}"#)]),
    // The same key printed with another scale (2.5000000000000000 here, 2.50 there): one key, its row
    // changed.
    ("UPDATE app.nums SET n = 2.50 WHERE n = 2.5", &[("nums", "conflict", r#"{"n": 2.5}"#)]),
    // -0 equals 0 as a key.
    ("UPDATE app.floats SET f = '-0' WHERE f = 0", &[("floats", "conflict", r#"{"f": 0}"#)]),
    ("DELETE FROM app.floats WHERE f = -1.25", &[("floats", "local_only", r#"{"f": -1.25}"#)]),
    ("UPDATE app.ri SET v = 'changed' WHERE a = 2 AND b = 2", &[("ri", "conflict", r#"{"a": 2, "b": 2}"#)]),
    (
        r#"UPDATE "Odd Schema"."odd.Name" SET v = NULL WHERE "Key" = 7"#,
        &[("odd.Name", "conflict", r#"{"Key": 7}"#)],
    ),
];

fn setup(c: &mut postgres::Client) {
    c.batch_execute(&format!("CREATE SCHEMA \"Odd Schema\"; {SCHEMA} {FILL}")).unwrap();
}

/// Runs start_overlap to its end; returns the id.
fn overlap(c: &mut postgres::Client, peer: &str, args: &str) -> String {
    let id: String = c
        .query_one(&format!("SELECT steep_repl.start_overlap($1{args})"), &[&peer])
        .unwrap_or_else(|e| panic!("start_overlap: {}", db_message(&e)))
        .get(0);
    let (status, error) = wait_for(c, &id, 120);
    assert_eq!(status, "complete", "{error:?}");
    id
}

/// (table, status, local_rows, peer_rows, match, conflict, local_only, peer_only)
type ResultRow =
    (String, String, Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<i64>);

/// (table, conflict, local_only, peer_only)
type Counts = (String, Option<i64>, Option<i64>, Option<i64>);

fn results(c: &mut postgres::Client, id: &str) -> Vec<ResultRow> {
    c.query(
        "SELECT table_name, status, local_rows, peer_rows, match, conflict, local_only, peer_only \
         FROM steep_repl.overlap_result($1)",
        &[&id],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7)))
    .collect()
}

/// Overlap scans of this node still pending or running.
fn scans_running(c: &mut postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM steep_repl.snapshots WHERE op = 'overlap_scan' AND status IN ('pending', 'running')",
        &[],
    )
    .unwrap()
    .get(0)
}

fn keys(c: &mut postgres::Client, id: &str) -> BTreeSet<(String, String, String)> {
    c.query("SELECT table_name, category, key::text FROM steep_repl.overlap_rows($1, lim => 100000)", &[&id])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[test]
fn identical_tables_match_and_each_mutation_lands_in_its_category() {
    let local = preloaded();
    // Another time zone and date style on the peer: rows must hash alike all the same.
    let peer = dedicated_with("overlap_peer", "timezone = 'Asia/Tokyo'\ndatestyle = 'SQL, DMY'\n");
    local.fresh_db("ovl", true);
    peer.fresh_db("ovl", true);
    let mut l = local.client("ovl");
    let mut p = peer.client("ovl");
    setup(&mut l);
    setup(&mut p);
    // Several chunks per table, so several workers hash each side.
    for c in [&mut l, &mut p] {
        c.batch_execute("ALTER DATABASE ovl SET steep_repl.chunk_size = '64kB'").unwrap();
    }
    let peer_conninfo = peer.conninfo_for("ovl");

    // Identical: every compared table matches entirely; the table without a key is skipped.
    let id = overlap(&mut l, &peer_conninfo, "");
    let r = results(&mut l, &id);
    assert_eq!(r.len(), 10, "{r:#?}");
    for (table, status, lr, pr, m, conflict, lo, po) in &r {
        if table == "nokey" || table == "ci_keys" {
            assert_eq!(status, "skipped");
            continue;
        }
        assert_eq!(status, "compared", "{table}");
        assert_eq!(lr, pr, "{table}");
        assert_eq!(m, lr, "{table}");
        assert_eq!((conflict, lo, po), (&Some(0), &Some(0), &Some(0)), "{table}");
    }
    assert!(keys(&mut l, &id).is_empty());
    // A key under a nondeterministic collation is never compared as text.
    let why: String = l
        .query_one("SELECT detail FROM steep_repl.overlap_result($1) WHERE table_name = 'ci_keys'", &[&id])
        .unwrap()
        .get(0);
    assert!(why.contains("nondeterministic collation ci"), "{why}");
    let identical_bytes: i64 = l
        .query_one("SELECT sum(bytes_exchanged)::int8 FROM steep_repl.overlap_result($1)", &[&id])
        .unwrap()
        .get(0);

    // Every mutation on the peer at once: exactly the expected keys, each in its category.
    for (sql, _) in MUTATIONS {
        p.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e)));
    }
    let expected: BTreeSet<(String, String, String)> = MUTATIONS
        .iter()
        .flat_map(|(_, e)| e.iter())
        .map(|(t, c, k)| {
            let key: serde_json::Value = serde_json::from_str(k).unwrap();
            (t.to_string(), c.to_string(), key.to_string())
        })
        .collect();
    let id = overlap(&mut l, &peer_conninfo, ", parallel => 3");
    let found: BTreeSet<(String, String, String)> = keys(&mut l, &id)
        .into_iter()
        .map(|(t, c, k)| (t, c, serde_json::from_str::<serde_json::Value>(&k).unwrap().to_string()))
        .collect();
    let missing: Vec<_> = expected.difference(&found).collect();
    let extra: Vec<_> = found.difference(&expected).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing: {missing:#?}\nunexpected: {extra:#?}");
    // The counts agree with the keys, and every row is accounted for on both sides.
    for (table, status, lr, pr, m, conflict, lo, po) in results(&mut l, &id) {
        if status == "skipped" {
            continue;
        }
        let count = |cat: &str| expected.iter().filter(|(t, c, _)| *t == table && c == cat).count() as i64;
        assert_eq!(conflict, Some(count("conflict")), "{table}");
        assert_eq!(lo, Some(count("local_only")), "{table}");
        assert_eq!(po, Some(count("peer_only")), "{table}");
        assert_eq!(m.unwrap() + conflict.unwrap() + lo.unwrap(), lr.unwrap(), "{table}: local rows");
        assert_eq!(m.unwrap() + conflict.unwrap() + po.unwrap(), pr.unwrap(), "{table}: peer rows");
    }
    let (ints_local, ints_peer): (i64, i64) = l
        .query_one(
            "SELECT local_rows, peer_rows FROM steep_repl.overlap_result($1) WHERE table_name = 'ints'",
            &[&id],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((ints_local, ints_peer), (5000, 4999));
    // Only digests and the differing keys crossed: far less than the rows themselves.
    let bytes: i64 = l
        .query_one("SELECT sum(bytes_exchanged)::int8 FROM steep_repl.overlap_result($1)", &[&id])
        .unwrap()
        .get(0);
    assert!(identical_bytes < 20_000, "{identical_bytes} bytes exchanged for identical tables");
    assert!(bytes < 200_000, "{bytes} bytes exchanged for {} differences", expected.len());

    // The synchronous form gives the same counts.
    let sync: Vec<Counts> = l
        .query(
            "SELECT table_name, conflict, local_only, peer_only FROM steep_repl.analyze_overlap($1) \
             WHERE status = 'compared' ORDER BY table_name COLLATE \"C\"",
            &[&peer_conninfo],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let mut job: Vec<Counts> = results(&mut l, &id)
        .into_iter()
        .filter(|r| r.1 == "compared")
        .map(|r| (r.0, r.5, r.6, r.7))
        .collect();
    job.sort();
    assert_eq!(sync, job);
    // Neither node keeps a scan once the analysis has ended.
    for c in [&mut l, &mut p] {
        assert_eq!(scans_running(c), 0);
    }
    // Deleting an operation deletes its results and their keys.
    let count_keys = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM steep_repl.overlap_keys WHERE overlap_id = $1", &[&id])
            .unwrap()
            .get(0)
    };
    assert_eq!(count_keys(&mut l), expected.len() as i64);
    l.execute("DELETE FROM steep_repl.snapshots WHERE id = $1", &[&id]).unwrap();
    assert_eq!(count_keys(&mut l), 0);
    // A table list selects tables on both sides.
    let id = overlap(&mut l, &peer_conninfo, ", tables => ARRAY['app.comp']");
    let r = results(&mut l, &id);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].0.as_str(), r[0].5), ("comp", Some(1)));
}

#[test]
fn concurrent_writes_never_tear_a_snapshot() {
    let local = preloaded();
    let peer = dedicated_with("overlap_tear", "");
    local.fresh_db("ovl_tear", true);
    peer.fresh_db("ovl_tear", true);
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, a int, pad text); \
               INSERT INTO t SELECT g, 0, repeat('x', 200) FROM generate_series(1, 20000) g; \
               ALTER DATABASE ovl_tear SET steep_repl.chunk_size = '64kB'";
    local.client("ovl_tear").batch_execute(ddl).unwrap();
    peer.client("ovl_tear").batch_execute(ddl).unwrap();
    // On the peer, each transaction flips the same 100 rows spread over the whole table between 0 and
    // 1: under one snapshot, either all of them differ from this node or none does.
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, flips, conninfo) = (stop.clone(), flips.clone(), peer.conninfo_for("ovl_tear"));
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
            let mut v = 1;
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute(&format!("UPDATE t SET a = {v} WHERE id % 200 = 0")).unwrap();
                flips.fetch_add(1, Ordering::Relaxed);
                v = 1 - v;
            }
        })
    };
    let mut l = local.client("ovl_tear");
    let peer_conninfo = peer.conninfo_for("ovl_tear");
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        let id = overlap(&mut l, &peer_conninfo, ", parallel => 3");
        let r = results(&mut l, &id);
        let conflict = r[0].5.unwrap();
        assert!(
            conflict == 0 || conflict == 100,
            "a torn snapshot: {conflict} of the 100 rows flipped together"
        );
        seen.insert(conflict);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(flips.load(Ordering::Relaxed) > 4, "the writer did not run during the analyses");
}

#[test]
fn a_cancel_stops_both_nodes_and_a_vanished_peer_fails_the_job() {
    let local = preloaded();
    let peer = dedicated_with("overlap_gone", "");
    local.fresh_db("ovl_cancel", true);
    peer.fresh_db("ovl_cancel", true);
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, pad text); \
               INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g; \
               ALTER DATABASE ovl_cancel SET steep_repl.chunk_size = '64kB'; \
               ALTER DATABASE ovl_cancel SET steep_repl.chunk_pause = 200";
    local.client("ovl_cancel").batch_execute(ddl).unwrap();
    peer.client("ovl_cancel").batch_execute(ddl).unwrap();
    let mut l = local.client("ovl_cancel");
    let mut p = peer.client("ovl_cancel");
    let peer_conninfo = peer.conninfo_for("ovl_cancel");
    let id: String = l.query_one("SELECT steep_repl.start_overlap($1)", &[&peer_conninfo]).unwrap().get(0);
    wait_for_phase(&mut l, &id, &["scan"]);
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    assert!(l.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get::<_, bool>(0));
    let (status, _) = wait_for(&mut l, &id, 30);
    assert_eq!(status, "cancelled");
    assert!(asked.elapsed() < Duration::from_secs(5), "the cancel took {:?}", asked.elapsed());
    // Both nodes' scans have ended (cancelled, their files removed).
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in [&mut l, &mut p] {
        loop {
            if scans_running(c) == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "an overlap scan still runs after the cancel");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // A peer that goes away during the scan fails the job, naming the connection.
    let id: String = l.query_one("SELECT steep_repl.start_overlap($1)", &[&peer_conninfo]).unwrap().get(0);
    wait_for_phase(&mut l, &id, &["scan"]);
    drop(p);
    peer.stop();
    let (status, error) = wait_for(&mut l, &id, 60);
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("the peer") || error.contains("connect"), "{error}");
}

#[test]
fn only_superusers_may_analyze_an_overlap() {
    let local = preloaded();
    local.fresh_db("ovl_rights", true);
    let mut c = local.client("ovl_rights");
    c.batch_execute("DROP ROLE IF EXISTS ovl_user; CREATE ROLE ovl_user LOGIN").unwrap();
    let mut u = postgres::Client::connect(
        &local.conninfo_for("ovl_rights").replace("user=postgres", "user=ovl_user"),
        postgres::NoTls,
    )
    .unwrap();
    for sql in [
        "SELECT steep_repl.start_overlap('host=localhost')",
        "SELECT * FROM steep_repl.analyze_overlap('host=localhost')",
        "SELECT steep_repl.start_overlap_scan('[]')",
        "SELECT steep_repl.overlap_scan_request('x', 's', 't', 'total')",
        "SELECT * FROM steep_repl.overlap_result('x')",
    ] {
        let e = u.query(sql, &[]).expect_err(sql);
        assert!(db_message(&e).contains("permission denied"), "{sql}: {}", db_message(&e));
    }
}

#[test]
fn a_peer_running_another_version_is_refused_with_both_versions_named() {
    // Two databases of one cluster stand for the two nodes; the peer's catalog says another version.
    let cluster = preloaded();
    cluster.fresh_db("ovl_ver_l", true);
    cluster.fresh_db("ovl_ver_p", true);
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 10) g";
    let mut l = cluster.client("ovl_ver_l");
    let mut p = cluster.client("ovl_ver_p");
    l.batch_execute(ddl).unwrap();
    p.batch_execute(ddl).unwrap();
    let ours: String =
        l.query_one("SELECT extversion FROM pg_extension WHERE extname = 'steep_repl'", &[]).unwrap().get(0);
    p.batch_execute("UPDATE pg_extension SET extversion = '0.0.1-old' WHERE extname = 'steep_repl'").unwrap();
    let peer = cluster.conninfo_for("ovl_ver_p");
    let e = l.query("SELECT * FROM steep_repl.analyze_overlap($1)", &[&peer]).expect_err("another version");
    let msg = db_message(&e);
    assert!(msg.contains("steep_repl 0.0.1-old") && msg.contains(&format!("this node {ours}")), "{msg}");
    // The same versions again: compared.
    p.batch_execute(&format!("UPDATE pg_extension SET extversion = '{ours}' WHERE extname = 'steep_repl'"))
        .unwrap();
    let statuses: Vec<String> = l
        .query("SELECT status FROM steep_repl.analyze_overlap($1)", &[&peer])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["compared"]);
}

#[test]
fn differing_keys_are_recorded_without_running_code_of_the_key_type() {
    // A key of a domain type whose CHECK calls a function: recording a differing key (as the extension's
    // owner) must not run it, as a cast back to the domain would.
    let cluster = preloaded();
    let ddl = "CREATE TABLE calls (at timestamptz DEFAULT clock_timestamp()); \
               CREATE FUNCTION noisy(v int) RETURNS boolean LANGUAGE plpgsql AS \
                 $$ BEGIN INSERT INTO calls DEFAULT VALUES; RETURN v > 0; END $$; \
               CREATE DOMAIN dkey AS int CHECK (noisy(VALUE)); \
               CREATE TABLE t (id dkey PRIMARY KEY, v text); \
               INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g";
    for db in ["ovl_dom_a", "ovl_dom_b"] {
        cluster.fresh_db(db, true);
        cluster.client(db).batch_execute(ddl).unwrap();
    }
    let mut a = cluster.client("ovl_dom_a");
    let mut b = cluster.client("ovl_dom_b");
    b.batch_execute("DELETE FROM t WHERE id = 7; INSERT INTO t VALUES (99, 'new')").unwrap();
    let calls =
        |c: &mut postgres::Client| -> i64 { c.query_one("SELECT count(*) FROM calls", &[]).unwrap().get(0) };
    let before = calls(&mut a);
    let id = overlap(&mut a, &cluster.conninfo_for("ovl_dom_b"), "");
    assert_eq!(calls(&mut a), before, "the domain's CHECK ran while the keys were recorded");
    let found = keys(&mut a, &id);
    let want: BTreeSet<(String, String, String)> = [
        ("t".to_string(), "local_only".to_string(), r#"{"id": "7"}"#.to_string()),
        ("t".to_string(), "peer_only".to_string(), r#"{"id": "99"}"#.to_string()),
    ]
    .into_iter()
    .collect();
    assert_eq!(found, want);
}

//! Generate inside the server (issue 4): byte identity with COPY, consistency under concurrent writes,
//! cancel, a killed worker, privileges, bad paths, and fewer worker slots than asked.

mod harness;

use harness::*;
use steep_repl_engine::manifest::Manifest;

const ALL_TYPES: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (a int, b text);
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE "All Types" (
    id serial PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, n numeric(20,6), nbig numeric, f4 float4, f8 float8, m money,
    c char(5), vc varchar(20), t text, by bytea, "name col" name, ch "char",
    d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz, iv interval,
    u uuid, j json, jb jsonb, x xml, ip inet, cid cidr, mac macaddr, mac8 macaddr8,
    pt point, ln line, ls lseg, bx box, pth path, pg polygon, ci circle,
    bt bit(8), vb varbit(16), tsv tsvector, tsq tsquery, r int4range, mr int4multirange, tsr tstzrange,
    arr int[], tarr text[], jarr jsonb[], e mood, comp pair, dom posint, oidc oid, rc regclass, pl pg_lsn,
    dropme text,
    gen int GENERATED ALWAYS AS (i4 * 2) STORED
);
ALTER TABLE "All Types" DROP COLUMN dropme;
INSERT INTO "All Types" (b) VALUES (NULL);
INSERT INTO "All Types" (b, i2, i4, i8, n, nbig, f4, f8, m, c, vc, t, by, "name col", ch, d, tm, tmtz, ts, tstz, iv,
    u, j, jb, x, ip, cid, mac, mac8, pt, ln, ls, bx, pth, pg, ci, bt, vb, tsv, tsq, r, mr, tsr, arr, tarr, jarr,
    e, comp, dom, oidc, rc, pl)
VALUES
  (true, -32768, 1073741823, -9223372036854775808, 12345678901234.123456, 'NaN', 'Infinity', -0.0, '$1,234.56',
   'ab', E'tab\there', E'back\\slash \b \f \n \r \t \v end', '\x00ff10', 'nm', 'x', '2024-02-29', '23:59:59.999999',
   '12:00+05:30', '1999-12-31 23:59:59.5', '2000-01-01 00:00:00+00', '1 year 2 mons 3 days 04:05:06.789',
   'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"k": [1, "two", null]}', '{"b": 2, "a": "\u00e9"}', '<a b="c">d</a>',
   '192.168.1.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', '(1.5,-2)', '{1,2,3}',
   '[(0,0),(1,1)]', '((0,0),(2,2))', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))', '<(0,0),5>', B'10101010',
   B'1101', 'a fat cat', 'fat & rat', '[1,10)', '{[1,3), [5,7)}', '[2020-01-01,2021-01-01)',
   '{1,NULL,3}', E'{"x y","q\\"uote",NULL,"back\\\\slash"}', ARRAY['{"a":1}'::jsonb], 'happy', ROW(1, E'c,d\t"'),
   7, 42, 'pg_class', '16/B374D848'),
  (false, 0, 0, 0, 0, -0.000001, '-Infinity', 'NaN', '-$0.01', 'ünï', '日本語', repeat('x', 3) || E'\u2603', '\x',
   '', '"', '4713-01-01 BC', '00:00', '00:00-12', 'infinity', '-infinity', '-1 day +02:03', 
   '00000000-0000-0000-0000-000000000000', '[]', '{}', '<r/>', '::1', '::/0', '00:00:00:00:00:00',
   '00:00:00:00:00:00:00:00', '(0,0)', '{1,-1,0}', '[(1,2),(3,4)]', '((1,1),(0,0))', '((0,0),(1,1))', '((0,0))',
   '<(1,1),0>', B'00000000', B'', '', 'a', 'empty', '{}', '(,)', '{}', '{}', '{}', 'sad', ROW(NULL, NULL),
   1, 0, '-', '0/0');
-- TOAST: a value too large and too random to stay inline.
INSERT INTO "All Types" (t, by, jb, tarr)
SELECT string_agg(md5(g::text), E'\t') , decode(string_agg(md5(g::text), ''), 'hex'),
       jsonb_build_object('k', string_agg(md5(g::text), '')), array_agg(md5(g::text))
FROM generate_series(1, 20000) g;
"#;

fn column_list(dir: &std::path::Path, schema: &str, name: &str) -> String {
    let m = Manifest::load(dir).expect("manifest");
    let t = m.tables.iter().find(|t| t.schema == schema && t.name == name).expect("table in manifest");
    t.columns.iter().map(|c| steep_repl_engine::ident::quote_ident(&c.name)).collect::<Vec<_>>().join(", ")
}

#[test]
fn chunks_are_byte_identical_to_copy_for_every_type() {
    let cluster = preloaded();
    cluster.fresh_db("gen_types", true);
    let mut c = cluster.client("gen_types");
    c.batch_execute(ALL_TYPES).unwrap_or_else(|e| panic!("{}", db_message(&e)));
    // A multi-chunk table too, with a forced small chunk size.
    c.batch_execute(
        "CREATE TABLE multi AS SELECT g AS id, md5(g::text) AS h, g * 1.5 AS f FROM generate_series(1, 60000) g;
         DELETE FROM multi WHERE id % 11 = 0;",
    )
    .unwrap();
    let dir = snapshot_path("gen_types");
    let id = start_snapshot(
        &mut c,
        &["SET TimeZone = 'America/New_York'", "SET steep_repl.chunk_size = '64kB'"],
        &dir,
        ", parallel => 2, compression => 'zstd:3'",
    );
    let (status, error) = wait_for(&mut c, &id, 120);
    assert_eq!(status, "complete", "error: {error:?}");

    let m = Manifest::load(&dir).expect("manifest loads and validates");
    assert_eq!(m.snapshot_id, id);
    assert_eq!(m.settings.get("TimeZone").map(String::as_str), Some("America/New_York"));
    let types = m.tables.iter().find(|t| t.name == "All Types").expect("All Types in manifest");
    let names: Vec<&str> = types.columns.iter().map(|c| c.name.as_str()).collect();
    assert!(!names.contains(&"gen") && !names.contains(&"dropme"), "{names:?}");
    assert!(names.contains(&"name col"));
    let multi = m.tables.iter().find(|t| t.name == "multi").unwrap();
    assert!(multi.chunks.len() > 10, "forced small chunks: {}", multi.chunks.len());
    assert_eq!(multi.rows, 60000 - 60000 / 11);

    let mut check = cluster.client("gen_types");
    pin_session(&mut check, "America/New_York");
    for (schema, name) in [("public", "All Types"), ("public", "multi")] {
        let cols = column_list(&dir, schema, name);
        let expected = copy_out(
            &mut check,
            &format!(
                "SELECT {cols} FROM {} ORDER BY ctid",
                steep_repl_engine::ident::QualifiedName::new(schema, name)
            ),
        );
        let ours = table_bytes(&dir, schema, name);
        assert!(
            ours == expected,
            "{schema}.{name}: {} bytes from chunks, {} from COPY",
            ours.len(),
            expected.len()
        );
    }
    // The offline verifier agrees.
    let report =
        steep_repl_engine::verify::verify_snapshot(&dir, steep_repl_engine::verify::VerifyMode::Deep);
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn concurrent_writes_never_leak_into_the_snapshot() {
    let cluster = preloaded();
    cluster.fresh_db("gen_consistency", true);
    let mut c = cluster.client("gen_consistency");
    c.batch_execute(
        "CREATE TABLE acct (id int PRIMARY KEY, v int NOT NULL, tag text NOT NULL);
         INSERT INTO acct SELECT g, g, 'before' FROM generate_series(1, 50000) g;",
    )
    .unwrap();
    let dir = snapshot_path("gen_consistency");
    let id = start_snapshot(
        &mut c,
        &["SET steep_repl.chunk_size = '64kB'", "SET steep_repl.chunk_pause = '30ms'"],
        &dir,
        ", parallel => 2",
    );
    wait_for_phase(&mut c, &id, &["data", "sequences", "finalizing", "complete"]);
    // The snapshot exists now; everything below commits after it and must not be seen.
    let mut w = cluster.client("gen_consistency");
    for round in 0..20 {
        w.batch_execute(&format!(
            "INSERT INTO acct SELECT g, -g, 'after' FROM generate_series({a}, {b}) g;
             UPDATE acct SET v = v + 1000000, tag = 'changed' WHERE id % 20 = {round};
             DELETE FROM acct WHERE id % 97 = {round};",
            a = 100000 + round * 100,
            b = 100000 + round * 100 + 99
        ))
        .unwrap();
    }
    let (status, error) = wait_for(&mut c, &id, 120);
    assert_eq!(status, "complete", "{error:?}");
    let bytes = table_bytes(&dir, "public", "acct");
    let text = String::from_utf8(bytes).unwrap();
    let mut ids = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f[2], "before", "a row written after the snapshot leaked in: {line}");
        assert_eq!(f[0], f[1], "an update made after the snapshot leaked in: {line}");
        ids.push(f[0].parse::<i32>().unwrap());
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=50000).collect::<Vec<_>>(), "every row committed before the snapshot is there once");
}

#[test]
fn imported_snapshot_is_honoured() {
    let cluster = preloaded();
    cluster.fresh_db("gen_imported", true);
    let mut holder = cluster.client("gen_imported");
    holder
        .batch_execute("CREATE TABLE t (id int, s text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5000) g;")
        .unwrap();
    holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    let name: String = holder.query_one("SELECT pg_export_snapshot()", &[]).unwrap().get(0);
    let mut w = cluster.client("gen_imported");
    w.batch_execute("UPDATE t SET s = 'later' WHERE id <= 2500; INSERT INTO t VALUES (0, 'new')").unwrap();
    let mut c = cluster.client("gen_imported");
    let dir = snapshot_path("gen_imported");
    let id = start_snapshot(&mut c, &[], &dir, &format!(", parallel => 2, snapshot => '{name}'"));
    let (status, error) = wait_for(&mut c, &id, 60);
    assert_eq!(status, "complete", "{error:?}");
    pin_session(&mut holder, "UTC");
    let expected = copy_out(&mut holder, "SELECT id, s FROM t ORDER BY ctid");
    holder.batch_execute("COMMIT").unwrap();
    assert!(table_bytes(&dir, "public", "t") == expected, "chunks differ from the exported snapshot's view");
    let m = Manifest::load(&dir).unwrap();
    assert!(!m.snapshot.exported_snapshot.is_empty());
}

#[test]
fn cancel_stops_workers_and_leaves_nothing() {
    let cluster = preloaded();
    cluster.fresh_db("gen_cancel", true);
    let mut c = cluster.client("gen_cancel");
    c.batch_execute(
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 100000) g",
    )
    .unwrap();
    let dir = snapshot_path("gen_cancel");
    let id = start_snapshot(
        &mut c,
        &["SET steep_repl.chunk_size = '64kB'", "SET steep_repl.chunk_pause = '200ms'"],
        &dir,
        ", parallel => 2",
    );
    wait_for_phase(&mut c, &id, &["data"]);
    let cancelled: bool = c.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get(0);
    assert!(cancelled);
    let (status, error) = wait_for(&mut c, &id, 30);
    assert_eq!(status, "cancelled");
    assert!(error.unwrap_or_default().contains("cancel"));
    assert!(!dir.exists(), "a cancelled snapshot leaves no directory it created");
    let again: bool = c.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get(0);
    assert!(!again, "cancelling an ended job returns false");
    let err = c.query_one("SELECT steep_repl.cancel_snapshot('gen-nope')", &[]).unwrap_err();
    assert!(db_message(&err).contains("no operation with id"));
    // Every slot is free again.
    let running: i64 = c
        .query_one("SELECT count(*) FROM steep_repl.snapshot_progress() WHERE id = $1", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(running, 0);
}

#[test]
fn a_terminated_worker_fails_the_job_cleanly() {
    let cluster = preloaded();
    cluster.fresh_db("gen_sigterm", true);
    let mut c = cluster.client("gen_sigterm");
    c.batch_execute(
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 100000) g",
    )
    .unwrap();
    let dir = snapshot_path("gen_sigterm");
    let id = start_snapshot(
        &mut c,
        &["SET steep_repl.chunk_size = '64kB'", "SET steep_repl.chunk_pause = '200ms'"],
        &dir,
        ", parallel => 2",
    );
    wait_for_phase(&mut c, &id, &["data"]);
    let mut victim = 0;
    for _ in 0..200 {
        let pids: Vec<i32> =
            c.query_one("SELECT worker_pids FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
        if pids.len() >= 2 {
            victim = pids[1];
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(victim > 0, "no data worker seen");
    let done: bool = c.query_one("SELECT pg_terminate_backend($1)", &[&victim]).unwrap().get(0);
    assert!(done);
    let (status, error) = wait_for(&mut c, &id, 30);
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("terminated") || error.contains("exited"), "{error}");
    assert!(!dir.exists(), "no partial snapshot is left behind");
    let row = c.query_one("SELECT last_error FROM steep_repl.health()", &[]).unwrap();
    let last: Option<String> = row.get(0);
    assert!(last.is_some());
}

#[test]
fn privileges_are_enforced_and_nothing_is_written() {
    let cluster = preloaded();
    cluster.fresh_db("gen_privs", true);
    let mut c = cluster.client("gen_privs");
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE nopriv LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         DO $$ BEGIN CREATE ROLE writer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT pg_write_server_files TO writer;
         CREATE TABLE open_t (a int); INSERT INTO open_t VALUES (1), (2);
         CREATE TABLE secret (a int); INSERT INTO secret VALUES (42);
         GRANT SELECT ON open_t TO writer, nopriv;
         GRANT USAGE ON SCHEMA steep_repl TO writer, nopriv;",
    )
    .unwrap();
    let as_role = |role: &str| {
        postgres::Client::connect(
            &format!("{} user={role}", cluster.conninfo_for("gen_privs")),
            postgres::NoTls,
        )
        .expect("connect as role")
    };
    // No pg_write_server_files: refused.
    let dir = snapshot_path("gen_privs_nopriv");
    let err = as_role("nopriv")
        .query_one(&format!("SELECT steep_repl.start_snapshot('{}')", dir.display()), &[])
        .unwrap_err();
    assert!(db_message(&err).contains("permission denied to write snapshot files"), "{}", db_message(&err));
    assert!(!dir.exists());
    // Allowed to write files but not to read every table: the error lists the table.
    let dir = snapshot_path("gen_privs_writer");
    let err = as_role("writer")
        .query_one(&format!("SELECT steep_repl.start_snapshot('{}')", dir.display()), &[])
        .unwrap_err();
    assert!(db_message(&err).contains("\"public\".\"secret\""), "{}", db_message(&err));
    assert!(!dir.exists());
    // Restricted to what it may read, the same role succeeds, running as itself.
    let mut w = as_role("writer");
    let id = start_snapshot(&mut w, &[], &dir, ", tables => ARRAY['open_t']");
    let (status, error) = wait_for(&mut w, &id, 60);
    assert_eq!(status, "complete", "{error:?}");
    let m = Manifest::load(&dir).unwrap();
    assert_eq!(m.tables.len(), 1);
    assert_eq!(m.tables[0].rows, 2);
    let role: String =
        c.query_one("SELECT role_name::text FROM steep_repl.snapshots WHERE id = $1", &[&id]).unwrap().get(0);
    assert_eq!(role, "writer");
}

#[test]
fn bad_arguments_are_refused_with_clear_errors() {
    let cluster = preloaded();
    cluster.fresh_db("gen_badargs", true);
    let mut c = cluster.client("gen_badargs");
    c.batch_execute("CREATE TABLE t (a int)").unwrap();
    let full = snapshot_path("gen_badargs_full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("something"), b"x").unwrap();
    let missing_parent = snapshot_path("gen_badargs_none").join("deeper");
    let cases: Vec<(String, &str)> = vec![
        ("SELECT steep_repl.start_snapshot('relative/snap')".into(), "must be an absolute path"),
        (format!("SELECT steep_repl.start_snapshot('{}')", full.display()), "exists and is not empty"),
        (format!("SELECT steep_repl.start_snapshot('{}')", missing_parent.display()), "parent directory"),
        ("SELECT steep_repl.start_snapshot('/root/steep-repl-denied/x')".into(), "parent directory"),
        ("SELECT steep_repl.start_snapshot('/root/steep-repl-denied')".into(), "/root/steep-repl-denied"),
        ("SELECT steep_repl.start_snapshot('/tmp/x/../y')".into(), "'..'"),
        (
            "SELECT steep_repl.start_snapshot('/tmp/steep-never', parallel => 0)".into(),
            "parallel must be between 1 and 64",
        ),
        ("SELECT steep_repl.start_snapshot('/tmp/steep-never', compression => 'lz4')".into(), "compression"),
        (
            "SELECT steep_repl.start_snapshot('/tmp/steep-never', compression => 'zstd:99')".into(),
            "compression",
        ),
        (
            "SELECT steep_repl.start_snapshot('/tmp/steep-never', tables => ARRAY['nosuch'])".into(),
            "no table matches \"nosuch\"",
        ),
        (
            "SELECT steep_repl.start_snapshot('/tmp/steep-never', tables => ARRAY['a.b.c'])".into(),
            "too many dotted names",
        ),
        (
            "SELECT steep_repl.start_snapshot('/tmp/steep-never', snapshot => 'x;y')".into(),
            "not a snapshot name",
        ),
    ];
    for (sql, want) in cases {
        let err = c.query_one(sql.as_str(), &[]).expect_err(&sql);
        assert!(db_message(&err).contains(want), "{sql}: {}", db_message(&err));
    }
    assert!(!std::path::Path::new("/tmp/steep-never").exists(), "nothing created for refused calls");
    assert!(std::fs::read_dir(&full).unwrap().count() == 1, "an existing directory is untouched");
}

#[test]
fn fewer_worker_slots_than_asked_still_completes() {
    let cluster = dedicated("limits");
    let conninfo = cluster.fresh_db("gen_limits", true);
    let _ = conninfo;
    let mut c = cluster.client("gen_limits");
    c.batch_execute("ALTER SYSTEM SET steep_repl.max_workers = 2").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    c.batch_execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 30000) g")
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let dir = snapshot_path("gen_limits");
    let id = start_snapshot(&mut c, &["SET steep_repl.chunk_size = '64kB'"], &dir, ", parallel => 8");
    let (status, error) = wait_for(&mut c, &id, 60);
    assert_eq!(status, "complete", "{error:?}");
    let m = Manifest::load(&dir).unwrap();
    assert_eq!(m.parallel.requested, 8);
    assert_eq!(m.parallel.used, 2, "capped by steep_repl.max_workers");
    assert_eq!(m.tables[0].rows, 30000);
}

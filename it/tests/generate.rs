//! Generate inside the server (issue 4): byte identity with COPY, consistency under concurrent writes,
//! cancel, a killed worker, privileges, bad paths, and fewer worker slots than asked.

use steep_repl_testkit as harness;

use harness::*;
use steep_repl_engine::manifest::Manifest;

const ALL_TYPES: &str = include_str!("../../fixtures/sql/all_types.sql");

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
        harness::postgres::Client::connect(
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

#[test]
fn progress_is_pushed_over_listen_notify() {
    let cluster = preloaded();
    cluster.fresh_db("gen_notify", true);
    let mut c = cluster.client("gen_notify");
    c.batch_execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 50000) g")
        .unwrap();
    let mut listener = cluster.client("gen_notify");
    listener.batch_execute("LISTEN steep_repl_progress").unwrap();
    let dir = snapshot_path("gen_notify");
    let id = start_snapshot(
        &mut c,
        &[
            "SET steep_repl.chunk_size = '64kB'",
            "SET steep_repl.progress_interval = '50ms'",
            "SET steep_repl.chunk_pause = '20ms'",
        ],
        &dir,
        ", parallel => 2",
    );
    let (status, _) = wait_for(&mut c, &id, 60);
    assert_eq!(status, "complete");
    let mut seen = Vec::new();
    let mut notes = listener.notifications();
    use harness::postgres::fallible_iterator::FallibleIterator;
    let mut it = notes.timeout_iter(std::time::Duration::from_millis(500));
    while let Ok(Some(n)) = it.next() {
        assert!(n.payload().len() <= 8000);
        let v: serde_json::Value = serde_json::from_str(n.payload()).expect("payload is JSON");
        if v["id"] == id.as_str() {
            seen.push(v);
        }
    }
    assert!(seen.len() >= 3, "a notification per phase at least: {seen:?}");
    for key in [
        "op",
        "id",
        "phase",
        "status",
        "percent",
        "tables_done",
        "tables_total",
        "chunks_done",
        "chunks_total",
        "rows",
        "bytes",
        "bytes_per_s",
        "eta_s",
        "error",
    ] {
        assert!(seen[0].get(key).is_some(), "missing {key}: {}", seen[0]);
    }
    let phases: Vec<&str> = seen.iter().filter_map(|v| v["phase"].as_str()).collect();
    assert!(phases.contains(&"plan") && phases.contains(&"data"), "{phases:?}");
    let last = seen.last().unwrap();
    assert_eq!(last["status"], "complete");
    assert_eq!(last["percent"], 100.0);
    assert_eq!(last["op"], "generate");
    assert_eq!(last["rows"], 50000);
}

#[test]
fn a_server_restart_fails_running_jobs_with_the_reason() {
    let cluster = dedicated("restart");
    cluster.fresh_db("gen_restart", true);
    let mut c = cluster.client("gen_restart");
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, h text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 60000) g").unwrap();
    let dir = snapshot_path("gen_restart");
    let id = start_snapshot(
        &mut c,
        &["SET steep_repl.chunk_size = '64kB'", "SET steep_repl.chunk_pause = '200ms'"],
        &dir,
        ", parallel => 2",
    );
    wait_for_phase(&mut c, &id, &["data"]);
    // An apply of an earlier snapshot, interrupted by the same restart, then resumed.
    let done = snapshot_path("gen_restart_src");
    let gid = start_snapshot(&mut c, &["RESET steep_repl.chunk_pause"], &done, ", parallel => 2");
    assert_eq!(wait_for(&mut c, &gid, 60).0, "complete");
    cluster.fresh_db("gen_restart_dst", true);
    let mut d = cluster.client("gen_restart_dst");
    d.batch_execute("CREATE TABLE t (id int PRIMARY KEY, h text); SET steep_repl.chunk_pause = '200ms'")
        .unwrap();
    let aid: String =
        d.query_one(&format!("SELECT steep_repl.start_apply('{}')", done.display()), &[]).unwrap().get(0);
    wait_for_phase(&mut d, &aid, &["data"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop((c, d));
    cluster.restart();

    let mut c = cluster.client("gen_restart");
    let (status, error) = wait_for(&mut c, &id, 10);
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("server restart") || error.contains("server shutdown"), "{error}");
    let mut d = cluster.client("gen_restart_dst");
    let (status, error) = wait_for(&mut d, &aid, 10);
    assert_eq!(status, "failed");
    assert!(error.unwrap_or_default().contains("resume_apply"));
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&aid]).unwrap().get(0);
    assert_eq!(wait_for(&mut d, &again, 60).0, "applied");
    let (n, distinct): (i64, i64) =
        d.query_one("SELECT count(*), count(DISTINCT id) FROM t", &[]).map(|r| (r.get(0), r.get(1))).unwrap();
    assert_eq!((n, distinct), (60000, 60000));
    // No stale slot is left: health is ok and nothing runs.
    let (status, active): (String, i64) = c
        .query_one("SELECT status, active_operations FROM steep_repl.health()", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((status.as_str(), active), ("ok", 0));
    // The failed snapshot's directory (chunks, no manifest) is cleared by a new snapshot into it.
    assert!(!dir.join("manifest.json").exists());
    let again = start_snapshot(&mut c, &["RESET steep_repl.chunk_pause"], &dir, ", parallel => 2");
    assert_eq!(wait_for(&mut c, &again, 60), ("complete".to_string(), None));
    assert!(dir.join("manifest.json").exists());
    assert!(!dir.join(".steep-repl-writer").exists(), "a complete snapshot keeps no writer file");
}

#[test]
fn a_second_snapshot_into_a_directory_being_written_is_refused() {
    let cluster = preloaded();
    cluster.fresh_db("gen_twice", true);
    let mut c = cluster.client("gen_twice");
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000)")
        .unwrap();
    // A transaction holding an xid keeps slot creation waiting: the first job sits in phase slot with
    // nothing written yet.
    let mut blocker = cluster.client("gen_twice");
    blocker.batch_execute("BEGIN; SELECT pg_current_xact_id()").unwrap();
    let dir = snapshot_path("gen_twice");
    let first = start_snapshot(&mut c, &[], &dir, ", 1, slot => 'gen_twice'");
    wait_for_phase(&mut c, &first, &["slot"]);
    let e = c
        .query_one(&format!("SELECT steep_repl.start_snapshot('{}', 1)", dir.display()), &[])
        .expect_err("a second snapshot into the same directory");
    let msg = db_message(&e);
    assert!(msg.contains(&format!("being written by snapshot {first}")), "{msg}");
    blocker.batch_execute("COMMIT").unwrap();
    assert_eq!(wait_for(&mut c, &first, 60), ("complete".to_string(), None));
    assert!(dir.join("manifest.json").exists());
    assert!(!dir.join(".steep-repl-writer").exists());
    c.batch_execute("SELECT pg_drop_replication_slot('gen_twice')").unwrap();
}

#[test]
fn progress_names_the_tables_being_read() {
    let cluster = preloaded();
    cluster.fresh_db("gen_current", true);
    let mut c = cluster.client("gen_current");
    c.batch_execute(
        r#"CREATE TABLE "Big One" AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 300000) g"#,
    )
    .unwrap();
    let dir = snapshot_path("gen_current");
    let id = start_snapshot(&mut c, &["SET steep_repl.chunk_size = '256kB'"], &dir, ", parallel => 2");
    let mut watcher = cluster.client("gen_current");
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..5000 {
        let row = watcher
            .query_one("SELECT status, current_tables FROM steep_repl.snapshot_progress($1)", &[&id])
            .unwrap();
        let (status, tables): (String, Vec<String>) = (row.get(0), row.get(1));
        if !tables.is_empty() {
            seen = tables;
            break;
        }
        if status != "running" {
            break;
        }
    }
    assert_eq!(seen, vec![r#""public"."Big One""#.to_string()], "the table being read is named, quoted");
    assert_eq!(wait_for(&mut c, &id, 60).0, "complete");
    let after: Vec<String> =
        c.query_one("SELECT current_tables FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
    assert!(after.is_empty(), "nothing is being read once the job has ended");
}

//! `steep-repl snapshot generate` end to end on real clusters: direct mode with JSON progress, verify and
//! inspect; client mode byte-identical to direct mode; the automatic mode choice; cancel (exit 4),
//! Ctrl-C (detach, exit 130, then follow), a lost connection (reconnect), a follow timeout (exit 5), and
//! Ctrl-C in client mode (cancel and clean up).

mod harness;

use std::io::BufReader;
use std::path::Path;

use harness::*;
use serde_json::Value;
use steep_repl_engine::manifest::{Manifest, Mode};

/// Tables the mixed fixture lacks: quoted identifiers, inheritance (FROM ONLY matters), partitions, an
/// empty table, a table without columns, and a materialized view (not included unless named).
const EXTRA: &str = r#"
CREATE SCHEMA "Odd Schema";
CREATE TABLE "Odd Schema"."we""ird.name ✓" (id int, "Col A" text, ts timestamptz);
INSERT INTO "Odd Schema"."we""ird.name ✓"
SELECT g, E'v\t' || g, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 hour' FROM generate_series(1, 3000) g;
CREATE TABLE parent (id int, note text);
CREATE TABLE child (extra int) INHERITS (parent);
INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 500) g;
INSERT INTO child SELECT g, 'c' || g, g FROM generate_series(1, 300) g;
CREATE TABLE empty_t (a int);
CREATE TABLE nocols ();
INSERT INTO nocols DEFAULT VALUES;
INSERT INTO nocols DEFAULT VALUES;
CREATE TABLE part (id int, k int) PARTITION BY RANGE (k);
CREATE TABLE part_1 PARTITION OF part FOR VALUES FROM (0) TO (100);
CREATE TABLE part_2 PARTITION OF part FOR VALUES FROM (100) TO (200);
INSERT INTO part SELECT g, g % 200 FROM generate_series(1, 2000) g;
CREATE MATERIALIZED VIEW mv AS SELECT id FROM parent;
ANALYZE;
"#;

/// A source database: the mixed fixture (scale 1), every type, and [`EXTRA`].
fn source_db(cluster: &Cluster, db: &str) -> String {
    let conninfo = cluster.fresh_db(db, true);
    load_fixture(cluster, db, "mixed.sql", 1);
    load_fixture(cluster, db, "all_types.sql", 1);
    cluster.client(db).batch_execute(EXTRA).unwrap_or_else(|e| panic!("{}", db_message(&e)));
    conninfo
}

/// A small source: one table of `rows` rows (about 1 MB per 10 000 rows), for jobs made slow with
/// `steep_repl.chunk_pause` and `--chunk-size 64kB`.
fn slow_source(cluster: &Cluster, db: &str, rows: u32) -> String {
    let conninfo = cluster.fresh_db(db, true);
    cluster
        .client(db)
        .batch_execute(&format!(
            "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((-g)::text) AS h FROM generate_series(1, {rows}) g"
        ))
        .unwrap();
    conninfo
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn events_of(lines: &[Value], kind: &str) -> Vec<Value> {
    lines.iter().filter(|v| v["event"] == kind).cloned().collect()
}

#[test]
fn direct_generate_with_json_progress_then_verify_and_inspect() {
    let cluster = preloaded();
    let conninfo = source_db(cluster, "cli_gen_direct");
    let dir = snapshot_path("cli_gen_direct");
    let out = steep_repl(&[
        "snapshot",
        "generate",
        "--direct",
        "--json",
        "--parallel",
        "2",
        "--chunk-size",
        "256kB",
        "--output",
        path_str(&dir),
        "-d",
        &conninfo,
    ]);
    assert!(out.status.success(), "exit {:?}\n{}", out.status.code(), stderr(&out));
    let lines = json_lines(&out);
    let started = &lines[0];
    assert_eq!(started["event"], "started", "{lines:?}");
    assert_eq!(started["mode"], "direct");
    assert_eq!(started["op"], "generate");
    let id = started["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("gen-"), "{id}");
    let progress = events_of(&lines, "progress");
    assert!(!progress.is_empty(), "at least the final state is reported");
    assert!(progress.iter().all(|p| p["id"] == id.as_str()), "only this job's progress: {progress:?}");
    assert_eq!(progress.last().unwrap()["status"], "complete");
    let summary = lines.last().unwrap();
    assert_eq!(summary["event"], "summary", "{summary}");
    assert_eq!(summary["status"], "complete");
    assert_eq!(summary["exit_code"], 0);

    let m = Manifest::load(&dir).expect("a complete, valid manifest");
    assert_eq!(m.snapshot_id, id);
    assert_eq!(m.mode, Mode::Direct);
    assert_eq!(m.parallel.requested, 2);
    assert_eq!(m.chunk_size_bytes, 256 * 1024);
    assert_eq!(summary["rows"], m.totals.rows);
    assert_eq!(summary["chunks"], m.totals.chunks);
    let names: Vec<String> = m.tables.iter().map(|t| format!("{}.{}", t.schema, t.name)).collect();
    for want in
        ["Odd Schema.we\"ird.name ✓", "public.child", "public.parent", "public.part_1", "public.nocols"]
    {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n == "public.mv" || n == "public.part"), "{names:?}");
    let accounts = m.tables.iter().find(|t| t.name == "accounts").unwrap();
    assert!(accounts.chunks.len() > 5, "--chunk-size 256kB splits accounts: {}", accounts.chunks.len());

    let out = steep_repl(&["snapshot", "verify", path_str(&dir), "--deep", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["chunks_checked"], m.totals.chunks);
    assert_eq!(v["raw_bytes_checked"], m.totals.raw_bytes);

    let out = steep_repl(&["snapshot", "inspect", path_str(&dir), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["snapshot_id"], id.as_str());
    assert_eq!(v["mode"], "direct");
    assert_eq!(v["lsn"], m.snapshot.lsn.as_str());
    assert_eq!(v["totals"]["rows"], m.totals.rows);
    assert_eq!(v["tables"].as_array().unwrap().len(), m.tables.len());
    let out = steep_repl(&["snapshot", "inspect", path_str(&dir)]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains(&m.snapshot.lsn), "{text}");
    assert!(text.contains("\"Odd Schema\".\"we\"\"ird.name ✓\""), "{text}");
    assert!(text.contains(&format!("{} tables", m.totals.tables)), "{text}");

    // The operation is in the server's history, in JSON too.
    let out = steep_repl(&["snapshot", "list", "--json", "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let mine = list.as_array().unwrap().iter().find(|o| o["id"] == id.as_str()).expect("listed");
    assert_eq!(mine["status"], "complete");
    let out = steep_repl(&["snapshot", "progress", &id, "--json", "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["status"], "complete");
}

#[test]
fn client_mode_writes_the_same_bytes_as_direct_mode() {
    let cluster = preloaded();
    let conninfo = source_db(cluster, "cli_gen_identity");
    // A caller's time zone that is not the server's: both modes must print timestamps in it.
    let with_tz = format!("{conninfo} options='-c TimeZone=America/New_York'");
    let direct = snapshot_path("cli_identity_direct");
    let client = snapshot_path("cli_identity_client");
    for (dir, mode) in [(&direct, "--direct"), (&client, "--client")] {
        let out = steep_repl(&[
            "snapshot",
            "generate",
            mode,
            "--parallel",
            "3",
            "--chunk-size",
            "128kB",
            "--compression",
            "zstd:3",
            "--output",
            path_str(dir),
            "-d",
            &with_tz,
        ]);
        assert!(out.status.success(), "{mode}: exit {:?}\n{}", out.status.code(), stderr(&out));
        assert!(stderr(&out).contains(&format!("{} mode", &mode[2..])), "{mode}: {}", stderr(&out));
    }
    let d = Manifest::load(&direct).unwrap();
    let c = Manifest::load(&client).unwrap();
    assert_eq!((d.mode, c.mode), (Mode::Direct, Mode::Client));
    assert_eq!(c.settings, d.settings, "same pinned settings, time zone and encoding");
    assert_eq!(c.settings.get("TimeZone").map(String::as_str), Some("America/New_York"));
    assert_eq!(c.compression, d.compression);
    assert_eq!(c.sequences, d.sequences);
    assert_eq!(c.parallel.requested, 3);
    assert_eq!(c.tables.len(), d.tables.len());
    for (dt, ct) in d.tables.iter().zip(&c.tables) {
        assert_eq!((&ct.schema, &ct.name, &ct.dir), (&dt.schema, &dt.name, &dt.dir));
        assert_eq!(ct.columns, dt.columns, "{}", dt.label());
        let ranges = |t: &steep_repl_engine::manifest::TableEntry| {
            t.chunks
                .iter()
                .map(|k| (k.file.clone(), k.block_start, k.block_end, k.rows, k.raw_crc32))
                .collect::<Vec<_>>()
        };
        assert_eq!(ranges(ct), ranges(dt), "{}: same chunks, rows and raw CRCs", dt.label());
        let (db, cb) =
            (table_bytes(&direct, &dt.schema, &dt.name), table_bytes(&client, &ct.schema, &ct.name));
        assert!(db == cb, "{}: {} bytes direct, {} client", dt.label(), db.len(), cb.len());
    }
    assert!(d.tables.iter().any(|t| t.chunks.len() > 3), "multi-chunk tables are compared");
    let out = steep_repl(&["snapshot", "verify", "--deep", path_str(&client)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(": ok"), "{}", stdout(&out));
}

#[test]
fn without_a_mode_flag_the_server_decides_and_the_cli_says_why() {
    let cluster = preloaded();
    let with_ext = slow_source(cluster, "cli_auto_ext", 1000);
    let dir = snapshot_path("cli_auto_ext");
    let out = steep_repl(&["snapshot", "generate", "--output", path_str(&dir), "-d", &with_ext]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("direct mode: steep_repl") && err.contains("preloaded"), "{err}");
    assert_eq!(Manifest::load(&dir).unwrap().mode, Mode::Direct);

    let conninfo = cluster.fresh_db("cli_auto_noext", false);
    cluster.client("cli_auto_noext").batch_execute("CREATE TABLE t AS SELECT 1 AS a").unwrap();
    let dir = snapshot_path("cli_auto_noext");
    let out = steep_repl(&["snapshot", "generate", "--output", path_str(&dir), "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("client mode: the steep_repl extension is not installed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(Manifest::load(&dir).unwrap().mode, Mode::Client);
    // --direct where the extension is missing says what to do.
    let out = steep_repl(&["snapshot", "generate", "--direct", "--output", "/tmp/never-x", "-d", &conninfo]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("CREATE EXTENSION steep_repl"), "{}", stderr(&out));

    let other = not_preloaded();
    let conninfo = other.fresh_db("cli_auto_nopreload", true);
    other.client("cli_auto_nopreload").batch_execute("CREATE TABLE t AS SELECT 1 AS a").unwrap();
    let dir = snapshot_path("cli_auto_nopreload");
    let out = steep_repl(&["snapshot", "generate", "--output", path_str(&dir), "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("client mode: steep_repl") && stderr(&out).contains("not preloaded"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_cancelled_job_exits_4() {
    let cluster = preloaded();
    let conninfo = slow_source(cluster, "cli_cancel", 40_000);
    let dir = snapshot_path("cli_cancel");
    let slow = format!("{conninfo} options='-c steep_repl.chunk_pause=200ms'");
    let mut child = steep_repl_spawn(&[
        "snapshot",
        "generate",
        "--direct",
        "--json",
        "--chunk-size",
        "64kB",
        "--parallel",
        "2",
        "--output",
        path_str(&dir),
        "-d",
        &slow,
    ]);
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let started: Value =
        serde_json::from_str(&read_until(&mut reader, "the started event", |_| true)).unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    read_until(&mut reader, "the data phase", |l| l.contains("\"phase\":\"data\""));
    let out = steep_repl(&["snapshot", "cancel", &id, "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cancel requested"), "{}", stdout(&out));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let lines: Vec<Value> = rest.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary = events_of(&lines, "summary");
    assert_eq!(summary.len(), 1, "{rest}");
    assert_eq!(summary[0]["status"], "cancelled");
    assert_eq!(summary[0]["exit_code"], 4);
    assert_eq!(lines.last().unwrap()["event"], "error");
    assert!(stderr(&out).contains("was cancelled"), "{}", stderr(&out));
    assert!(!dir.exists(), "a cancelled generate leaves nothing");
    // Cancelling it again: already ended.
    let out = steep_repl(&["snapshot", "cancel", &id, "-d", &conninfo]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("already ended (cancelled)"), "{}", stdout(&out));
}

#[test]
fn ctrl_c_detaches_and_the_job_can_be_followed_to_its_end() {
    let cluster = preloaded();
    let conninfo = slow_source(cluster, "cli_detach", 20_000);
    let dir = snapshot_path("cli_detach");
    let secret = format!("{conninfo} password=hunter2 options='-c steep_repl.chunk_pause=150ms'");
    let mut child = steep_repl_spawn(&[
        "snapshot",
        "generate",
        "--direct",
        "--json",
        "--chunk-size",
        "64kB",
        "--parallel",
        "2",
        "--output",
        path_str(&dir),
        "-d",
        &secret,
    ]);
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let started: Value =
        serde_json::from_str(&read_until(&mut reader, "the started event", |_| true)).unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("detached from {id}; it keeps running")), "{err}");
    assert!(err.contains(&format!("steep-repl snapshot progress {id} --follow -d '")), "{err}");
    assert!(err.contains(&format!("steep-repl snapshot cancel {id} -d '")), "{err}");
    assert!(!err.contains("hunter2"), "password printed: {err}");

    // The printed command follows the job, which kept running, to its end.
    let out = steep_repl(&["snapshot", "progress", &id, "--follow", "--json", "-d", &conninfo]);
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), stderr(&out));
    let lines = json_lines(&out);
    let summary = lines.last().unwrap();
    assert_eq!(summary["event"], "summary", "{lines:?}");
    assert_eq!(summary["status"], "complete");
    assert_eq!(Manifest::load(&dir).unwrap().tables[0].rows, 20_000);
}

#[test]
fn a_lost_connection_is_reestablished_and_following_resumes() {
    let cluster = preloaded();
    let conninfo = slow_source(cluster, "cli_reconnect", 20_000);
    let dir = snapshot_path("cli_reconnect");
    let slow = format!("{conninfo} options='-c steep_repl.chunk_pause=150ms'");
    let mut child = steep_repl_spawn(&[
        "snapshot",
        "generate",
        "--direct",
        "--json",
        "--chunk-size",
        "64kB",
        "--parallel",
        "2",
        "--output",
        path_str(&dir),
        "-d",
        &slow,
    ]);
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    read_until(&mut reader, "the data phase", |l| l.contains("\"phase\":\"data\""));
    let killed: i64 = cluster
        .client("postgres")
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = 'cli_reconnect' AND application_name = 'steep-repl'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(killed >= 1, "the CLI's session was found");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "exit {:?}: {err}", out.status.code());
    assert!(err.contains("connection lost") && err.contains("reconnected"), "{err}");
    let last: Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "complete", "{rest}");
}

#[test]
fn following_times_out_with_exit_5() {
    let cluster = preloaded();
    let conninfo = slow_source(cluster, "cli_timeout", 40_000);
    let dir = snapshot_path("cli_timeout");
    let slow = format!("{conninfo} options='-c steep_repl.chunk_pause=500ms'");
    let out = steep_repl(&[
        "snapshot",
        "generate",
        "--direct",
        "--detach",
        "--chunk-size",
        "64kB",
        "--parallel",
        "1",
        "--output",
        path_str(&dir),
        "-d",
        &slow,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    assert!(id.starts_with("gen-"), "--detach prints the id: {id}");
    assert!(stderr(&out).contains(&format!("snapshot cancel {id}")), "{}", stderr(&out));
    let out = steep_repl(&["snapshot", "progress", &id, "--follow", "--timeout", "1", "-d", &conninfo]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("stopped waiting for {id} after 1 s")), "{}", stderr(&out));
    let out = steep_repl(&["snapshot", "cancel", &id, "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = steep_repl(&["snapshot", "progress", &id, "--follow", "-d", &conninfo]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

#[test]
fn ctrl_c_cancels_a_client_mode_generate_and_removes_its_output() {
    let cluster = preloaded();
    let conninfo = slow_source(cluster, "cli_client_int", 1000);
    // A session holding an exclusive lock keeps the generate waiting for its own lock.
    let mut holder = cluster.client("cli_client_int");
    holder.batch_execute("BEGIN; LOCK TABLE big IN ACCESS EXCLUSIVE MODE").unwrap();
    let dir = snapshot_path("cli_client_int");
    let mut child = steep_repl_spawn(&[
        "snapshot",
        "generate",
        "--client",
        "--json",
        "--output",
        path_str(&dir),
        "-d",
        &conninfo,
    ]);
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    read_until(&mut reader, "the started event", |l| l.contains("\"started\""));
    let waiting = || -> i64 {
        cluster
            .client("postgres")
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'cli_client_int' \
                 AND application_name = 'steep-repl' AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    for _ in 0..500 {
        if waiting() > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(waiting(), 1, "the generate waits for its lock");
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("was cancelled"), "{}", stderr(&out));
    assert!(!dir.exists(), "the partial snapshot is removed");
    holder.batch_execute("COMMIT").unwrap();
}

#[test]
fn table_patterns_select_the_same_tables_in_both_modes() {
    let cluster = preloaded();
    let conninfo = cluster.fresh_db("cli_patterns", true);
    cluster
        .client("cli_patterns")
        .batch_execute(
            r#"CREATE SCHEMA sales;
               CREATE TABLE sales.orders (id serial PRIMARY KEY, v int);
               CREATE TABLE sales.items (id int);
               CREATE TABLE public.other (id int);
               CREATE TABLE "Mixed Case" (id int);
               CREATE SEQUENCE sales.loose;
               INSERT INTO sales.orders (v) SELECT g FROM generate_series(1, 100) g;
               INSERT INTO "Mixed Case" VALUES (1);"#,
        )
        .unwrap();
    let mut seen = Vec::new();
    for mode in ["--direct", "--client"] {
        let dir = snapshot_path(&format!("cli_patterns{mode}"));
        let out = steep_repl(&[
            "snapshot",
            "generate",
            mode,
            "-t",
            "sales.*",
            "--table",
            "\"Mixed Case\"",
            "--output",
            path_str(&dir),
            "-d",
            &conninfo,
        ]);
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        let m = Manifest::load(&dir).unwrap();
        let tables: Vec<String> = m.tables.iter().map(|t| format!("{}.{}", t.schema, t.name)).collect();
        let sequences: Vec<String> = m.sequences.iter().map(|s| format!("{}.{}", s.schema, s.name)).collect();
        seen.push((tables, sequences));
    }
    assert_eq!(seen[0], seen[1], "both modes select alike");
    assert_eq!(seen[0].0, ["public.Mixed Case", "sales.items", "sales.orders"]);
    assert_eq!(seen[0].1, ["sales.loose", "sales.orders_id_seq"]);
    // A pattern that matches nothing is an error in both modes, and nothing is left behind.
    for mode in ["--direct", "--client"] {
        let dir = snapshot_path(&format!("cli_patterns_none{mode}"));
        let out = steep_repl(&[
            "snapshot",
            "generate",
            mode,
            "-t",
            "nosuch",
            "--output",
            path_str(&dir),
            "-d",
            &conninfo,
        ]);
        assert_eq!(out.status.code(), Some(1), "{mode}: {}", stderr(&out));
        assert!(stderr(&out).contains("no table matches \"nosuch\""), "{mode}: {}", stderr(&out));
        assert!(!dir.exists(), "{mode}");
    }
}

//! `steep-repl replica init` end to end on two clusters (issue 12, PRODUCT.md §7): while a workload
//! writes on the source, the replica is initialised, catches up and holds every row and sequence of the
//! source; the snapshot is exactly the state at the slot's consistent point and the subscription applies
//! exactly what came after; failures and reruns leave neither a second slot nor a second apply; every
//! preflight problem is refused before any change.

mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use harness::*;

/// The two clusters every test here shares (each test in databases of its own).
fn pair() -> &'static (Cluster, Cluster) {
    static P: OnceLock<(Cluster, Cluster)> = OnceLock::new();
    P.get_or_init(|| (dedicated("replica_src"), dedicated("replica_dst")))
}

/// A pgbench-like schema: accounts, two ledgers written in pairs, a history with a text key.
const SCHEMA: &str = r#"
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text);
CREATE TABLE ledger_a (id bigserial PRIMARY KEY, account int NOT NULL, amount int NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE ledger_b (id bigserial PRIMARY KEY, account int NOT NULL, amount int NOT NULL, pair bigint);
CREATE TABLE tags (k text COLLATE "C", n int, v text, PRIMARY KEY (k, n));
CREATE SEQUENCE batch_seq;
"#;

/// The source's rows at the start.
const DATA: &str = r#"
INSERT INTO accounts SELECT g, 1000, 'acct ' || g FROM generate_series(1, 20000) g;
INSERT INTO ledger_a (account, amount) SELECT g % 20000 + 1, 1 FROM generate_series(1, 5000) g;
INSERT INTO ledger_b (account, amount, pair) SELECT g % 20000 + 1, -1, g FROM generate_series(1, 5000) g;
INSERT INTO tags SELECT 'k' || (g % 50), g, E'tab\there' FROM generate_series(1, 2000) g;
"#;

/// Writes on the source until stopped: transfers plus paired ledger inserts, updates and deletes.
fn workload(conninfo: String, stop: Arc<AtomicBool>, commits: Arc<AtomicU64>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).expect("workload connect");
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let (from, to) = ((i * 7919) % 20000 + 1, (i * 104729) % 20000 + 1);
            let sql = format!(
                "BEGIN;
                 UPDATE accounts SET balance = balance - 5 WHERE id = {from};
                 UPDATE accounts SET balance = balance + 5 WHERE id = {to};
                 WITH a AS (INSERT INTO ledger_a (account, amount) VALUES ({from}, -5) RETURNING id)
                   INSERT INTO ledger_b (account, amount, pair) SELECT {to}, 5, id FROM a;
                 UPDATE tags SET v = v || 'x' WHERE k = 'k{k}' AND n = {n};
                 DELETE FROM ledger_a WHERE id = {del};
                 INSERT INTO tags VALUES ('new{i}', {i}, NULL);
                 SELECT nextval('batch_seq');
                 COMMIT;",
                k = i % 50,
                n = (i % 2000) + 1,
                del = (i % 4000) + 1,
            );
            c.batch_execute(&sql).expect("workload transaction");
            commits.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Every table's rows (sorted COPY lines) and every sequence's state, to compare two databases.
fn contents(conninfo: &str) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut c = postgres::Client::connect(conninfo, postgres::NoTls).expect("connect");
    let mut out = Vec::new();
    for t in ["accounts", "ledger_a", "ledger_b", "tags"] {
        out.push((t.to_string(), sorted_rows(&mut c, t, "*")));
    }
    for s in ["batch_seq", "ledger_a_id_seq", "ledger_b_id_seq"] {
        let r =
            c.query_one(&format!("SELECT last_value::text || ' ' || is_called::text FROM {s}"), &[]).unwrap();
        out.push((s.to_string(), vec![r.get::<_, String>(0).into_bytes()]));
    }
    out
}

fn scalar<T: for<'a> postgres::types::FromSql<'a>>(conninfo: &str, sql: &str) -> T {
    let mut c = postgres::Client::connect(conninfo, postgres::NoTls).expect("connect");
    c.query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e))).get(0)
}

fn setup(db: &str) -> (String, String) {
    let (src, dst) = pair();
    let s = src.fresh_db(db, true);
    let d = dst.fresh_db(db, true);
    for c in [&s, &d] {
        let mut c = postgres::Client::connect(c, postgres::NoTls).unwrap();
        c.batch_execute(SCHEMA).unwrap_or_else(|e| panic!("schema: {}", db_message(&e)));
    }
    let mut c = postgres::Client::connect(&s, postgres::NoTls).unwrap();
    c.batch_execute(DATA).unwrap_or_else(|e| panic!("data: {}", db_message(&e)));
    (s, d)
}

#[test]
fn replica_init_under_writes_gives_an_identical_replica_and_reruns_do_nothing_twice() {
    under_writes("rep_writes", "--direct");
}

#[test]
fn client_mode_replica_init_under_writes_gives_an_identical_replica() {
    under_writes("rep_client", "--client");
}

/// Init while the workload writes, stop it, rerun init (catch-up only), compare everything.
fn under_writes(name: &str, mode: &str) {
    let (s, d) = setup(name);
    let dir = snapshot_path(name);
    let dir = dir.to_str().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = workload(s.clone(), stop.clone(), commits.clone());
    thread::sleep(Duration::from_millis(500));
    let before = commits.load(Ordering::Relaxed);
    let init = |json: bool| {
        let mut args = vec!["replica", "init", mode, "--source", &s, "--target", &d, "--dir", dir];
        args.extend(["--parallel", "2", "--subscription", name, "--timeout", "120"]);
        if json {
            args.insert(0, "--json");
        }
        steep_repl(&args)
    };
    let out = init(false);
    assert!(out.status.success(), "replica init: {}\n{}", stderr(&out), stdout(&out));
    assert!(stdout(&out).contains("caught up"), "{}", stdout(&out));
    // A directory with room: the snapshot, read once, is staged uncompressed, and says so.
    assert!(stderr(&out).contains("uncompressed ("), "{}", stderr(&out));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(std::path::Path::new(dir).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["compression"], "none", "{}", manifest["compression"]);
    // The source kept writing during the whole init, and after it.
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(commits.load(Ordering::Relaxed) > before + 20, "the workload barely ran");

    // Writes stopped: the same command again only waits for catch-up and copies sequence values.
    let out = init(true);
    assert!(out.status.success(), "rerun: {}", stderr(&out));
    let summary: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().last().unwrap()).expect("JSON summary");
    assert_eq!(summary["caught_up"], true, "{summary}");
    assert!(stderr(&out).contains("already started"), "{}", stderr(&out));

    // Every row and sequence identical; one slot, one snapshot, one apply, one hand-off.
    assert_eq!(contents(&s), contents(&d));
    let one = |c: &str, sql: &str| assert_eq!(scalar::<i64>(c, sql), 1, "{sql}");
    one(&s, &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{name}'"));
    if mode == "--direct" {
        one(&s, "SELECT count(*) FROM steep_repl.snapshots WHERE op = 'generate'");
        one(&d, "SELECT count(*) FROM steep_repl.snapshots WHERE op = 'apply'");
        one(&d, "SELECT count(*) FROM steep_repl.subscriptions");
    }
    // The subscriber never hit a conflict (an overlap would be a duplicate key).
    let errors = format!("SELECT apply_error_count FROM pg_stat_subscription_stats WHERE subname = '{name}'");
    assert_eq!(scalar::<i64>(&d, &errors), 0);
    let status = steep_repl(&["--json", "replica", "status", "--target", &d]);
    assert!(status.status.success(), "{}", stderr(&status));
    let list: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(list[0]["subscription"], name);
    assert_eq!(list[0]["state"], "streaming");
    drop_subscription(&d, name);
}

/// Waits (up to a minute: slot creation waits for the transactions of the other tests' workloads on
/// a busy machine) until the job reads data; on timeout, says what it waited for.
fn wait_for_data_phase(c: &mut postgres::Client, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .query_one("SELECT phase, waiting_for::text FROM steep_repl.snapshot_progress($1)", &[&id])
            .unwrap_or_else(|e| panic!("snapshot_progress({id}): {}", db_message(&e)));
        let (phase, waiting): (String, String) = (r.get(0), r.get(1));
        if phase == "data" {
            return;
        }
        assert!(Instant::now() < deadline, "job {id} still in phase {phase} (waiting for pids {waiting})");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Drops a subscription and its slot on the source (the slot goes with it: slot_name is set).
/// `steep-repl replica init` from `source` to `target` through `dir`, subscription (and slot) `subscription`.
fn replica_init(source: &str, target: &str, dir: &str, subscription: &str) -> std::process::Output {
    steep_repl(&[
        "replica",
        "init",
        "--source",
        source,
        "--target",
        target,
        "--dir",
        dir,
        "--subscription",
        subscription,
        "--timeout",
        "120",
    ])
}

fn drop_subscription(target: &str, name: &str) {
    let mut c = postgres::Client::connect(target, postgres::NoTls).unwrap();
    c.batch_execute(&format!("DROP SUBSCRIPTION {name}")).unwrap_or_else(|e| panic!("{}", db_message(&e)));
}

/// Inserts ids 1, 2, 3, ... into `seqtest`, one transaction each, until stopped.
fn counter(conninfo: String, stop: Arc<AtomicBool>) -> thread::JoinHandle<i32> {
    thread::spawn(move || {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            c.execute("INSERT INTO seqtest VALUES ($1)", &[&i]).unwrap();
        }
        i
    })
}

#[test]
fn the_snapshot_is_the_slot_consistent_point_and_the_subscription_applies_what_follows() {
    let (s, d) = setup("rep_exact");
    for c in [&s, &d] {
        postgres::Client::connect(c, postgres::NoTls)
            .unwrap()
            .batch_execute("CREATE TABLE seqtest (id int PRIMARY KEY)")
            .unwrap();
    }
    let mut src = postgres::Client::connect(&s, postgres::NoTls).unwrap();
    // FOR ALL TABLES would also publish steep_repl's own tables, which no snapshot holds.
    src.batch_execute(
        "CREATE PUBLICATION rep_all FOR ALL TABLES; CREATE PUBLICATION rep_exact FOR TABLES IN SCHEMA public",
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = counter(s.clone(), stop.clone());
    thread::sleep(Duration::from_millis(300));
    let dir = snapshot_path("rep_exact");
    let id = start_snapshot(&mut src, &[], &dir, ", 2, slot => 'rep_exact'");
    assert_eq!(wait_for(&mut src, &id, 120), ("complete".to_string(), None));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let lsn = manifest["snapshot"]["lsn"].as_str().unwrap().to_string();
    assert_eq!(manifest["snapshot"]["replication_slot"], "rep_exact");
    assert_eq!(manifest["snapshot"]["plugin"], "pgoutput");
    // The manifest's LSN is the slot's consistent point (nothing consumed it yet).
    let confirmed: String = src
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'rep_exact'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(confirmed, lsn);

    let mut dst = postgres::Client::connect(&d, postgres::NoTls).unwrap();
    let dir_s = dir.to_str().unwrap();
    // subscribe('rep_exact') through `publication`: the start LSN, or the error's text.
    let subscribe = |dst: &mut postgres::Client, publication: &str| -> Result<String, String> {
        dst.query_one(
            "SELECT steep_repl.subscribe('rep_exact', $1, ARRAY[$3::text], $2)::text",
            &[&s, &dir_s, &publication],
        )
        .map(|r| r.get(0))
        .map_err(|e| db_message(&e))
    };
    // Refused before the apply: the hand-off follows the data.
    let e = subscribe(&mut dst, "rep_exact").unwrap_err();
    assert!(e.contains("no completed apply"), "{e}");
    let apply: String = dst.query_one("SELECT steep_repl.start_apply($1, 2)", &[&dir_s]).unwrap().get(0);
    assert_eq!(wait_for(&mut dst, &apply, 120).0, "applied");
    // The snapshot holds a contiguous prefix 1..k of the sequential inserts: one consistent snapshot.
    let (n, max): (i64, Option<i32>) = {
        let r = dst.query_one("SELECT count(*), max(id) FROM seqtest", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(Some(n as i32), max.or(Some(0)), "the snapshot has a gap");
    // Another apply into one of the tables since (a snapshot without a slot): that data is not the
    // slot's point, refused naming the table; the snapshot applied again (truncate), it is.
    let other = snapshot_path("rep_exact_other");
    let gen_other = start_snapshot(&mut src, &[], &other, ", 1, tables => ARRAY['public.seqtest']");
    assert_eq!(wait_for(&mut src, &gen_other, 120).0, "complete");
    let other_s = other.to_str().unwrap();
    let again: String =
        dst.query_one("SELECT steep_repl.start_apply($1, 1, truncate => true)", &[&other_s]).unwrap().get(0);
    assert_eq!(wait_for(&mut dst, &again, 120).0, "applied");
    let e = subscribe(&mut dst, "rep_exact").unwrap_err();
    assert!(e.contains("no longer holds every table") && e.contains("seqtest") && e.contains(&again), "{e}");
    let apply: String =
        dst.query_one("SELECT steep_repl.start_apply($1, 2, truncate => true)", &[&dir_s]).unwrap().get(0);
    assert_eq!(wait_for(&mut dst, &apply, 120).0, "applied");
    // A subscription already on the slot (made by hand, never connected): a second one is refused.
    dst.batch_execute(&format!(
        "CREATE SUBSCRIPTION squatter CONNECTION '{s}' PUBLICATION rep_exact WITH (connect = false, slot_name = 'rep_exact')"
    ))
    .unwrap();
    let e = subscribe(&mut dst, "rep_exact").unwrap_err();
    assert!(e.contains("already used by subscription squatter"), "{e}");
    dst.batch_execute("ALTER SUBSCRIPTION squatter SET (slot_name = NONE); DROP SUBSCRIPTION squatter")
        .unwrap();
    let e = subscribe(&mut dst, "rep_all").unwrap_err();
    assert!(e.contains("publish table(s) the snapshot does not hold") && e.contains("steep_repl"), "{e}");
    assert_eq!(subscribe(&mut dst, "rep_exact").unwrap(), lsn);
    // A second hand-off is refused.
    let e = subscribe(&mut dst, "rep_exact").unwrap_err();
    assert!(e.contains("never made twice"), "{e}");
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    // Every id exactly once (the key refuses a repeat, and an overlap would stop the subscriber), none missing.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (count, max): (i64, Option<i32>) = {
            let r = dst.query_one("SELECT count(*), max(id) FROM seqtest", &[]).unwrap();
            (r.get(0), r.get(1))
        };
        if count == last as i64 && max == Some(last) {
            break;
        }
        assert!(Instant::now() < deadline, "target has {count} rows (max {max:?}), the source {last}");
        thread::sleep(Duration::from_millis(100));
    }
    let errors: i64 = dst
        .query_one(
            "SELECT apply_error_count FROM pg_stat_subscription_stats WHERE subname = 'rep_exact'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(errors, 0);
    drop_subscription(&d, "rep_exact");
}

#[test]
fn a_cancelled_snapshot_drops_its_slot_and_a_rerun_after_the_apply_repeats_nothing() {
    let (s, d) = setup("rep_rerun");
    let mut src = postgres::Client::connect(&s, postgres::NoTls).unwrap();
    // Cancel during the data phase: the slot goes with the job.
    let dir = snapshot_path("rep_cancel");
    let id =
        start_snapshot(&mut src, &["SET steep_repl.chunk_pause = 2000"], &dir, ", 1, slot => 'rep_cancel'");
    wait_for_data_phase(&mut src, &id);
    assert_eq!(
        src.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'rep_cancel'", &[])
            .unwrap()
            .get::<_, i64>(0),
        1,
        "the slot exists while the job runs"
    );
    src.execute("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap();
    assert_eq!(wait_for(&mut src, &id, 60).0, "cancelled");
    assert_eq!(
        src.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'rep_cancel'", &[])
            .unwrap()
            .get::<_, i64>(0),
        0,
        "a cancelled snapshot leaves no slot"
    );
    src.batch_execute("RESET steep_repl.chunk_pause").unwrap();

    // As if init had been interrupted right after the apply: snapshot and apply done by hand, with
    // the names init uses. The rerun applies nothing again and creates no slot.
    let dir = snapshot_path("rep_rerun");
    let dir_s = dir.to_str().unwrap();
    src.batch_execute("CREATE PUBLICATION steep_repl_pub FOR TABLES IN SCHEMA public").unwrap();
    let id = start_snapshot(&mut src, &[], &dir, ", 2, slot => 'rep_rerun'");
    assert_eq!(wait_for(&mut src, &id, 120).0, "complete");
    let mut dst = postgres::Client::connect(&d, postgres::NoTls).unwrap();
    let apply: String = dst.query_one("SELECT steep_repl.start_apply($1, 2)", &[&dir_s]).unwrap().get(0);
    assert_eq!(wait_for(&mut dst, &apply, 120).0, "applied");
    let out = replica_init(&s, &d, dir_s, "rep_rerun");
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("already complete"), "{err}");
    assert_eq!(
        scalar::<i64>(
            &s,
            "SELECT count(*) FROM steep_repl.snapshots WHERE op = 'generate' AND status = 'complete'"
        ),
        1
    );
    assert_eq!(scalar::<i64>(&d, "SELECT count(*) FROM steep_repl.snapshots WHERE op = 'apply'"), 1);
    assert_eq!(
        scalar::<i64>(
            &s,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ('rep_rerun', 'rep_cancel')"
        ),
        1
    );
    assert_eq!(contents(&s), contents(&d));
    drop_subscription(&d, "rep_rerun");

    // A publication dropped after the snapshot's slot was made: a rerun does not make it again (it would
    // not cover the slot's first changes); it says how to start over.
    dst.batch_execute("TRUNCATE accounts, ledger_a, ledger_b, tags").unwrap();
    let dir = snapshot_path("rep_nopub");
    let dir_s = dir.to_str().unwrap();
    let id = start_snapshot(&mut src, &[], &dir, ", 1, slot => 'rep_nopub'");
    assert_eq!(wait_for(&mut src, &id, 120).0, "complete");
    src.batch_execute("DROP PUBLICATION steep_repl_pub").unwrap();
    let out = replica_init(&s, &d, dir_s, "rep_nopub");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("was dropped on the source after the snapshot's slot rep_nopub"), "{err}");
    assert_eq!(scalar::<i64>(&s, "SELECT count(*) FROM pg_publication WHERE pubname = 'steep_repl_pub'"), 0);
    src.batch_execute("SELECT pg_drop_replication_slot('rep_nopub')").unwrap();
}

#[test]
fn preflight_refuses_every_problem_before_any_change() {
    let (s, d) = setup("rep_pre");
    let dir = snapshot_path("rep_pre");
    let dir = dir.to_str().unwrap();
    let mut src = postgres::Client::connect(&s, postgres::NoTls).unwrap();
    let mut dst = postgres::Client::connect(&d, postgres::NoTls).unwrap();
    src.batch_execute("CREATE TABLE nokey (a int, b text)").unwrap();
    dst.batch_execute(
        "CREATE TABLE nokey (a int, b text); INSERT INTO accounts VALUES (1, 1, 'x'); ALTER TABLE tags DROP COLUMN v",
    )
    .unwrap();
    let init = |extra: &[&str]| {
        let mut args = vec![
            "replica",
            "init",
            "--source",
            &s,
            "--target",
            &d,
            "--dir",
            dir,
            "--subscription",
            "rep_pre",
        ];
        args.extend_from_slice(extra);
        steep_repl(&args)
    };
    let out = init(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("\"public\".\"nokey\" has neither a primary key nor a replica identity"), "{err}");
    assert!(err.contains("\"public\".\"tags\" has no column \"v\""), "{err}");
    // The emptiness check comes once the schema matches.
    dst.batch_execute("ALTER TABLE tags ADD COLUMN v text").unwrap();
    src.batch_execute("ALTER TABLE nokey REPLICA IDENTITY FULL").unwrap();
    let out = init(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("table \"public\".\"accounts\" is not empty"), "{}", stderr(&out));
    // Nothing was changed on either side.
    assert_eq!(scalar::<i64>(&s, "SELECT count(*) FROM pg_publication"), 0);
    assert_eq!(scalar::<i64>(&s, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'rep_pre'"), 0);
    assert_eq!(scalar::<i64>(&s, "SELECT count(*) FROM steep_repl.snapshots"), 0);
    assert_eq!(
        scalar::<i64>(
            &d,
            "SELECT count(*) FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid WHERE d.datname = current_database()"
        ),
        0
    );
    assert!(!std::path::Path::new(dir).exists());

    // An existing publication that leaves a table out is refused, naming it.
    src.batch_execute("CREATE PUBLICATION rep_pre_pub FOR TABLE accounts").unwrap();
    let out = init(&["--publication", "rep_pre_pub"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("publication rep_pre_pub leaves out"), "{}", stderr(&out));
    assert!(stderr(&out).contains("\"public\".\"ledger_a\""), "{}", stderr(&out));

    // subscribe() is not for every role: it makes the server connect out with its own credentials.
    dst.batch_execute(
        "DO $$ BEGIN CREATE ROLE rep_nobody LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    .unwrap();
    let nobody = d.replace("user=postgres", "user=rep_nobody");
    let mut c = postgres::Client::connect(&nobody, postgres::NoTls).unwrap();
    let e = c
        .query_one("SELECT steep_repl.subscribe('x', 'host=/nonexistent', '{p}', '/tmp/x')::text", &[])
        .unwrap_err();
    assert!(db_message(&e).contains("permission denied"), "{}", db_message(&e));
}

#[test]
fn a_source_without_logical_wal_is_refused_naming_the_setting() {
    let src = dedicated_with("replica_walrep", "wal_level = replica");
    let s = src.fresh_db("rep_wal", true);
    let (_, dst) = pair();
    let d = dst.fresh_db("rep_wal", true);
    for c in [&s, &d] {
        postgres::Client::connect(c, postgres::NoTls)
            .unwrap()
            .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
            .unwrap();
    }
    let dir = snapshot_path("rep_wal");
    let out =
        steep_repl(&["replica", "init", "--source", &s, "--target", &d, "--dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("wal_level is replica"), "{}", stderr(&out));
    // The server refuses the same on its own, naming the setting.
    let mut c = postgres::Client::connect(&s, postgres::NoTls).unwrap();
    let e = c
        .query_one("SELECT steep_repl.start_snapshot($1, 1, slot => 'x')", &[&dir.to_str().unwrap()])
        .unwrap_err();
    assert!(db_message(&e).contains("wal_level = logical"), "{}", db_message(&e));
    assert_eq!(scalar::<i64>(&s, "SELECT count(*) FROM pg_publication"), 0);
}

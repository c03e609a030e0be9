//! Job lifecycle (issues 11 and 17): failed starts leave no slot, a leader that cannot run fails its job
//! at once, DDL queued behind a job ends the job instead of hanging it, exactly-once under concurrent
//! resumes and applies, honest status after a crash, and snapshot files changed under an apply never
//! take the server down.

use std::time::{Duration, Instant};

use steep_repl_testkit as harness;

use harness::*;

fn sql_err(c: &mut postgres::Client, sql: &str) -> String {
    match c.batch_execute(sql) {
        Ok(()) => panic!("{sql}: succeeded, an error was expected"),
        Err(e) => db_message(&e),
    }
}

/// A source database with one table of `rows` rows and a snapshot of it; returns the snapshot path.
fn snapshot_of(cluster: &Cluster, db: &str, rows: i32, chunk_size: &str) -> std::path::PathBuf {
    cluster.fresh_db(db, true);
    let mut c = cluster.client(db);
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, h text); \
         INSERT INTO t SELECT g, md5(g::text) || md5((g + 1)::text) FROM generate_series(1, {rows}) g"
    ))
    .unwrap();
    let dir = snapshot_path(db);
    let id = start_snapshot(
        &mut c,
        &[&format!("SET steep_repl.chunk_size = '{chunk_size}'")],
        &dir,
        ", parallel => 2",
    );
    let (status, error) = wait_for(&mut c, &id, 120);
    assert_eq!(status, "complete", "{error:?}");
    dir
}

/// A target database with the table of `snapshot_of`, empty.
fn target(cluster: &Cluster, db: &str) -> postgres::Client {
    cluster.fresh_db(db, true);
    let mut d = cluster.client(db);
    d.batch_execute("CREATE TABLE t (id int PRIMARY KEY, h text)").unwrap();
    d
}

fn apply(d: &mut postgres::Client, dir: &std::path::Path, args: &str) -> Result<String, String> {
    d.query_one(&format!("SELECT steep_repl.start_apply('{}'{args})", dir.display()), &[])
        .map(|r| r.get(0))
        .map_err(|e| db_message(&e))
}

/// No job of this database holds a row `pending`/`running` or a slot (other tests share the cluster).
fn no_job_left(c: &mut postgres::Client) {
    let pending: i64 = c
        .query_one("SELECT count(*) FROM steep_repl.snapshots WHERE status IN ('pending', 'running')", &[])
        .unwrap()
        .get(0);
    assert_eq!(pending, 0, "rows still pending or running");
    let held: i64 = c
        .query_one(
            "SELECT count(*) FROM steep_repl.snapshot_progress() p JOIN steep_repl.snapshots s USING (id) \
             WHERE p.status = 'running'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "a job slot is still held");
}

/// Nothing runs on the whole server: no job slot, no worker (for tests with a cluster of their own).
fn server_idle(c: &mut postgres::Client) {
    no_job_left(c);
    let (running, workers): (i64, i32) = c
        .query_one("SELECT active_operations, workers_running FROM steep_repl.health()", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((running, workers), (0, 0));
    let progress: i64 =
        c.query_one("SELECT count(*) FROM steep_repl.snapshot_progress()", &[]).unwrap().get(0);
    assert_eq!(progress, 0, "a job slot is still held");
}

#[test]
fn failed_starts_leave_no_slot_behind() {
    let cluster = dedicated("failed_starts");
    cluster.fresh_db("starts", true);
    let mut c = cluster.client("starts");
    c.batch_execute(
        "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000); \
         DROP ROLE IF EXISTS grp; CREATE ROLE grp NOLOGIN; GRANT pg_write_server_files TO grp; \
         GRANT SELECT ON t TO grp; GRANT USAGE ON SCHEMA steep_repl TO grp",
    )
    .unwrap();
    let dir = snapshot_path("failed_starts");
    let start = format!("SELECT steep_repl.start_snapshot('{}')", dir.display());
    for _ in 0..8 {
        let e = sql_err(&mut c, &format!("BEGIN READ ONLY; {start}"));
        assert!(e.contains("read-only transaction"), "{e}");
        c.batch_execute("ROLLBACK").unwrap();
        let e = sql_err(&mut c, &format!("SET ROLE grp; {start}"));
        assert!(e.contains("may not log in"), "{e}");
        c.batch_execute("RESET ROLE").unwrap();
    }
    // An ERROR after the slot is claimed (here: the row's insert fails) frees it and removes the
    // directory the call created.
    c.batch_execute(
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT ON steep_repl.work_queue FOR EACH ROW EXECUTE FUNCTION public.refuse()",
    )
    .unwrap();
    for _ in 0..20 {
        let e = sql_err(&mut c, &start);
        assert!(e.contains("refused"), "{e}");
        assert!(!dir.exists(), "the output directory was left behind");
    }
    c.batch_execute("DROP TRIGGER refuse ON steep_repl.work_queue").unwrap();
    server_idle(&mut c);
    // Sixteen slots in all: were any leaked, these would be refused.
    for k in 0..17 {
        let d = snapshot_path(&format!("failed_starts_ok{k}"));
        let id = start_snapshot(&mut c, &[], &d, ", parallel => 1");
        let (status, error) = wait_for(&mut c, &id, 60);
        assert_eq!(status, "complete", "{error:?}");
    }
    server_idle(&mut c);
}

#[test]
fn a_leader_that_cannot_connect_fails_its_job_at_once() {
    let cluster = dedicated("leader_dies");
    cluster.fresh_db("noconn", true);
    let mut c = cluster.client("noconn");
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)").unwrap();
    cluster.client("postgres").batch_execute("ALTER DATABASE noconn ALLOW_CONNECTIONS false").unwrap();
    let dir = snapshot_path("leader_dies");
    let id = start_snapshot(&mut c, &[], &dir, "");
    // The leader exits as it connects; the supervisor frees its slot and has the row marked, without
    // anyone calling a steep_repl function.
    let started = Instant::now();
    let mut status = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        status = c.query_one("SELECT status FROM steep_repl.snapshots WHERE id = $1", &[&id]).unwrap().get(0);
        if status == "failed" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status, "failed");
    let (status, error) = wait_for(&mut c, &id, 5);
    assert_eq!(status, "failed", "{error:?}");
    let cancelled: bool = c.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get(0);
    assert!(!cancelled);
    cluster.client("postgres").batch_execute("ALTER DATABASE noconn ALLOW_CONNECTIONS true").unwrap();
    server_idle(&mut c);
}

#[test]
fn waiting_in_the_starting_transaction_is_refused_at_once() {
    let cluster = preloaded();
    cluster.fresh_db("wait_self", true);
    let mut c = cluster.client("wait_self");
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)").unwrap();
    let dir = snapshot_path("wait_self");
    let started = Instant::now();
    let e = sql_err(
        &mut c,
        &format!("SELECT steep_repl.wait_snapshot(steep_repl.start_snapshot('{}'))", dir.display()),
    );
    assert!(e.contains("started by this transaction"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The statement rolled back: the job never existed, and its directory is gone.
    let n: i64 = c.query_one("SELECT count(*) FROM steep_repl.snapshots", &[]).unwrap().get(0);
    assert_eq!(n, 0);
    for _ in 0..100 {
        if !dir.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dir.exists());
}

#[test]
fn over_long_paths_are_refused_not_cut() {
    let cluster = preloaded();
    cluster.fresh_db("long_path", true);
    let mut c = cluster.client("long_path");
    let long = format!("/tmp/{}", "a/".repeat(600));
    let e = sql_err(&mut c, &format!("SELECT steep_repl.start_snapshot('{long}')"));
    assert!(e.contains("at most 1024"), "{e}");
    let e = sql_err(&mut c, &format!("SELECT steep_repl.start_apply('{long}')"));
    assert!(e.contains("at most 1024"), "{e}");
}

/// Runs `ALTER TABLE t ADD COLUMN` from another session while a job holds the table, and returns how
/// the ALTER ended (it must go through once the job has stepped aside).
fn alter_behind(cluster: &Cluster, db: &str) -> std::thread::JoinHandle<Result<(), String>> {
    let conninfo = cluster.conninfo_for(db);
    std::thread::spawn(move || {
        let mut a = postgres::Client::connect(&conninfo, postgres::NoTls).map_err(|e| e.to_string())?;
        a.batch_execute("SET lock_timeout = '60s'; ALTER TABLE t ADD COLUMN added int")
            .map_err(|e| db_message(&e))
    })
}

#[test]
fn ddl_queued_behind_a_generate_ends_it_instead_of_hanging() {
    let cluster = preloaded();
    cluster.fresh_db("ddl_gen", true);
    let mut c = cluster.client("ddl_gen");
    c.batch_execute("CREATE TABLE t (id int, h text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 60000) g")
        .unwrap();
    let dir = snapshot_path("ddl_gen");
    let id = start_snapshot(
        &mut c,
        &["SET steep_repl.chunk_size = '64kB'", "SET steep_repl.chunk_pause = '300ms'"],
        &dir,
        ", parallel => 2",
    );
    wait_for_phase(&mut c, &id, &["data"]);
    let alter = alter_behind(cluster, "ddl_gen");
    let (status, error) = wait_for(&mut c, &id, 30);
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("\"t\"") && error.contains("pid "), "{error}");
    assert_eq!(alter.join().unwrap(), Ok(()), "the ALTER did not get through");
    assert!(!dir.join("manifest.json").exists());
}

#[test]
fn ddl_queued_behind_an_apply_ends_it_and_a_resume_finishes() {
    let cluster = preloaded();
    let dir = snapshot_of(cluster, "ddl_app_src", 60000, "64kB");
    let mut d = target(cluster, "ddl_app_dst");
    d.batch_execute("SET steep_repl.chunk_pause = '300ms'").unwrap();
    let id = apply(&mut d, &dir, ", parallel => 2").unwrap();
    wait_for_phase(&mut d, &id, &["data"]);
    std::thread::sleep(Duration::from_millis(400));
    let alter = alter_behind(cluster, "ddl_app_dst");
    let (status, error) = wait_for(&mut d, &id, 30);
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("\"t\"") && error.contains("pid "), "{error}");
    assert_eq!(alter.join().unwrap(), Ok(()), "the ALTER did not get through");
    // The added column is nullable: the snapshot's columns still load, and the resume finishes.
    d.batch_execute("RESET steep_repl.chunk_pause").unwrap();
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap().get(0);
    let (status, error) = wait_for(&mut d, &again, 60);
    assert_eq!(status, "applied", "{error:?}");
    let (n, distinct): (i64, i64) =
        d.query_one("SELECT count(*), count(DISTINCT id) FROM t", &[]).map(|r| (r.get(0), r.get(1))).unwrap();
    assert_eq!((n, distinct), (60000, 60000));
}

/// A cancelled apply of 60 000 rows, some of them loaded.
fn cancelled_apply(cluster: &Cluster, tag: &str) -> (std::path::PathBuf, postgres::Client, String) {
    let dir = snapshot_of(cluster, &format!("{tag}_src"), 60000, "64kB");
    let mut d = target(cluster, &format!("{tag}_dst"));
    d.batch_execute("SET steep_repl.chunk_pause = '200ms'").unwrap();
    let id = apply(&mut d, &dir, ", parallel => 2").unwrap();
    for _ in 0..500 {
        let done: i32 =
            d.query_one("SELECT chunks_done FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
        if done >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get::<_, bool>(0));
    assert_eq!(wait_for(&mut d, &id, 30).0, "cancelled");
    d.batch_execute("RESET steep_repl.chunk_pause").unwrap();
    (dir, d, id)
}

#[test]
fn concurrent_resumes_run_one_job() {
    let cluster = preloaded();
    let (_dir, mut d, id) = cancelled_apply(cluster, "two_resumes");
    // The first resume's transaction is still open when the second one asks.
    d.batch_execute(&format!("BEGIN; SELECT steep_repl.resume_apply('{id}')")).unwrap();
    let conninfo = cluster.conninfo_for("two_resumes_dst");
    let id2 = id.clone();
    let second = std::thread::spawn(move || {
        let mut e = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        e.query_one("SELECT steep_repl.resume_apply($1)", &[&id2]).map(|_| ()).map_err(|e| db_message(&e))
    });
    std::thread::sleep(Duration::from_millis(500));
    d.batch_execute("COMMIT").unwrap();
    let refused = second.join().unwrap().expect_err("the second resume must be refused");
    assert!(refused.contains("running") || refused.contains("pending"), "{refused}");
    let (status, error) = wait_for(&mut d, &id, 60);
    assert_eq!(status, "applied", "{error:?}");
    let (n, distinct): (i64, i64) =
        d.query_one("SELECT count(*), count(DISTINCT id) FROM t", &[]).map(|r| (r.get(0), r.get(1))).unwrap();
    assert_eq!((n, distinct), (60000, 60000));
}

#[test]
fn concurrent_applies_into_one_table_run_one() {
    let cluster = preloaded();
    let dir = snapshot_of(cluster, "two_applies_src", 20000, "64kB");
    let mut d = target(cluster, "two_applies_dst");
    d.batch_execute(&format!("BEGIN; SELECT steep_repl.start_apply('{}')", dir.display())).unwrap();
    let conninfo = cluster.conninfo_for("two_applies_dst");
    let path = dir.display().to_string();
    let second = std::thread::spawn(move || {
        let mut e = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        e.query_one(&format!("SELECT steep_repl.start_apply('{path}')"), &[])
            .map(|_| ())
            .map_err(|e| db_message(&e))
    });
    std::thread::sleep(Duration::from_millis(500));
    d.batch_execute("COMMIT").unwrap();
    let refused = second.join().unwrap().expect_err("the second apply must be refused");
    assert!(refused.contains("being loaded by another apply") && refused.contains("\"t\""), "{refused}");
    let id: String = d
        .query_one("SELECT id FROM steep_repl.snapshots WHERE op = 'apply' ORDER BY created_at LIMIT 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(wait_for(&mut d, &id, 60).0, "applied");
    let n: i64 = d.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 20000);
}

#[test]
fn a_resume_refuses_a_snapshot_replaced_under_it() {
    let cluster = preloaded();
    let (dir, mut d, id) = cancelled_apply(cluster, "replaced");
    // Another snapshot of the same table (different rows) moved into the same directory.
    let mut s = cluster.client("replaced_src");
    s.batch_execute("DELETE FROM t WHERE id % 2 = 0").unwrap();
    let other = snapshot_path("replaced_other");
    let gid = start_snapshot(&mut s, &[], &other, "");
    assert_eq!(wait_for(&mut s, &gid, 60).0, "complete");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::rename(&other, &dir).unwrap();
    let e = d
        .query_one("SELECT steep_repl.resume_apply($1)", &[&id])
        .map(|_| ())
        .map_err(|e| db_message(&e))
        .expect_err("the resume must be refused");
    assert!(e.contains("no longer holds the snapshot"), "{e}");
    let status: String =
        d.query_one("SELECT status FROM steep_repl.snapshots WHERE id = $1", &[&id]).unwrap().get(0);
    assert_eq!(status, "cancelled");
}

#[test]
fn a_cancel_while_a_worker_waits_on_a_row_lock_frees_everything() {
    let cluster = preloaded();
    let dir = snapshot_of(cluster, "rowlock_src", 20000, "64kB");
    let mut d = target(cluster, "rowlock_dst");
    // Another session inserts, and holds uncommitted, a key the snapshot has: COPY waits on it.
    let mut blocker = cluster.client("rowlock_dst");
    blocker.batch_execute("BEGIN; INSERT INTO t VALUES (1, 'mine')").unwrap();
    let id = apply(&mut d, &dir, ", parallel => 2, truncate => false").unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    loop {
        let waiting: i64 = d
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'steep_repl worker' AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no worker ever waited on the lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get::<_, bool>(0));
    let (status, _) = wait_for(&mut d, &id, 60);
    assert_eq!(status, "cancelled");
    blocker.batch_execute("ROLLBACK").unwrap();
    no_job_left(&mut d);
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap().get(0);
    assert_eq!(wait_for(&mut d, &again, 60).0, "applied");
    let n: i64 = d.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 20000);
}

#[test]
fn after_a_crash_no_row_says_running() {
    let cluster = dedicated("crash");
    let dir = snapshot_of(&cluster, "crash_src", 60000, "64kB");
    let mut c = cluster.client("crash_src");
    let gdir = snapshot_path("crash_gen");
    let gid = start_snapshot(
        &mut c,
        &["SET steep_repl.chunk_size = '64kB'", "SET steep_repl.chunk_pause = '300ms'"],
        &gdir,
        ", parallel => 2",
    );
    wait_for_phase(&mut c, &gid, &["data"]);
    let mut d = target(&cluster, "crash_dst");
    d.batch_execute("SET steep_repl.chunk_pause = '300ms'").unwrap();
    let aid = apply(&mut d, &dir, ", parallel => 2").unwrap();
    wait_for_phase(&mut d, &aid, &["data"]);
    drop((c, d));
    cluster.crash_restart();
    // Nobody calls a steep_repl function: the supervisor's reaper marks both rows.
    for (db, id) in [("crash_src", &gid), ("crash_dst", &aid)] {
        let mut c = cluster.client(db);
        let started = Instant::now();
        let (status, queue): (String, String) = loop {
            let r = c
                .query_one(
                    "SELECT s.status, q.status FROM steep_repl.snapshots s \
                     JOIN steep_repl.work_queue q ON q.snapshot_id = s.id WHERE s.id = $1",
                    &[id],
                )
                .unwrap();
            let (s, q): (String, String) = (r.get(0), r.get(1));
            if s == "failed" || started.elapsed() > Duration::from_secs(30) {
                break (s, q);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!((status.as_str(), queue.as_str()), ("failed", "failed"), "{db}");
        let error: String =
            c.query_one("SELECT error FROM steep_repl.snapshots WHERE id = $1", &[id]).unwrap().get(0);
        assert!(error.contains("restart"), "{error}");
    }
    let mut d = cluster.client("crash_dst");
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&aid]).unwrap().get(0);
    assert_eq!(wait_for(&mut d, &again, 60).0, "applied");
    let n: i64 = d.query_one("SELECT count(DISTINCT id) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 60000);
}

/// Changes every chunk file of `dir` with `change` while an apply of it runs, in the middle of reading
/// them: chunks of several megabytes, so that a reader is inside a file when it changes (a memory-mapped
/// reader faulted there, SIGBUS, and the postmaster restarted every process).
fn apply_while_changing(tag: &str, change: fn(&std::path::Path)) -> String {
    let cluster = preloaded();
    // A crash-restart of the server would end this connection (the start time does not change then).
    let mut sentinel = cluster.client("postgres");
    let before = cluster.started_at();
    let dir = snapshot_of(cluster, &format!("{tag}_src"), 250_000, "8MB");
    let files = walk(&dir.join("data"));
    assert!(files.len() >= 3, "{files:?}");
    let mut d = target(cluster, &format!("{tag}_dst"));
    // Each worker pauses before each chunk, so that chunks are still to be read when the files change
    // however fast the machine loads the first ones (unpaced, a fast load sometimes finished first).
    d.batch_execute("SET steep_repl.chunk_pause = 150").unwrap();
    let id = apply(&mut d, &dir, ", parallel => 2").unwrap();
    wait_for_phase(&mut d, &id, &["data"]);
    std::thread::sleep(Duration::from_millis(200));
    for file in &files {
        change(file);
    }
    let (status, error) = wait_for(&mut d, &id, 60);
    assert!(sentinel.simple_query("SELECT 1").is_ok(), "the server crashed");
    assert_eq!(cluster.started_at(), before, "the server restarted");
    assert_eq!(status, "failed", "{error:?}");
    let error = error.unwrap_or_default();
    assert!(error.contains(".copy.zst"), "the chunk is not named: {error}");
    error
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn chunks_truncated_during_an_apply_fail_it_without_a_crash() {
    apply_while_changing("trunc", |p| {
        std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(100).unwrap();
    });
}

#[test]
fn chunks_rewritten_during_an_apply_fail_it_without_a_crash() {
    apply_while_changing("rewrite", |p| {
        let len = std::fs::metadata(p).unwrap().len() as usize;
        std::fs::write(p, vec![0x5a; len]).unwrap();
    });
}

#[test]
fn chunks_deleted_during_an_apply_fail_it_without_a_crash() {
    let error = apply_while_changing("deleted", |p| std::fs::remove_file(p).unwrap());
    assert!(error.contains("No such file") || error.contains("missing"), "{error}");
}

#[test]
fn chunks_truncated_as_an_apply_starts_fail_it_in_verify_or_load() {
    let cluster = preloaded();
    let mut sentinel = cluster.client("postgres");
    let before = cluster.started_at();
    let dir = snapshot_of(cluster, "trunc_verify_src", 60000, "64kB");
    let mut d = target(cluster, "trunc_verify_dst");
    let id = apply(&mut d, &dir, ", parallel => 2").unwrap();
    for p in walk(&dir.join("data")) {
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(10).unwrap();
    }
    let (status, error) = wait_for(&mut d, &id, 60);
    assert_eq!(status, "failed", "{error:?}");
    assert!(error.unwrap_or_default().contains(".copy.zst"));
    assert!(sentinel.simple_query("SELECT 1").is_ok(), "the server crashed");
    assert_eq!(cluster.started_at(), before, "the server restarted");
}

#[test]
fn a_rolled_back_resume_does_not_run() {
    let cluster = preloaded();
    let (_dir, mut d, id) = cancelled_apply(cluster, "rb_resume");
    let before: i64 = d.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    d.batch_execute(&format!("BEGIN; SELECT steep_repl.resume_apply('{id}'); SELECT pg_sleep(1); ROLLBACK"))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    no_job_left(&mut d);
    let (status, after): (String, i64) = d
        .query_one(
            "SELECT (SELECT status FROM steep_repl.snapshots WHERE id = $1), (SELECT count(*) FROM t)",
            &[&id],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((status.as_str(), after), ("cancelled", before));
    // Undone by a rollback to a savepoint, with the transaction committing: not run either.
    d.batch_execute(&format!(
        "BEGIN; SAVEPOINT s; SELECT steep_repl.resume_apply('{id}'); ROLLBACK TO s; COMMIT"
    ))
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    no_job_left(&mut d);
    let after: i64 = d.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(after, before);
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap().get(0);
    assert_eq!(wait_for(&mut d, &again, 60).0, "applied");
}

/// The pid of a job's leader, from its progress.
fn leader_pid(c: &mut postgres::Client, id: &str) -> i32 {
    for _ in 0..500 {
        let pids: Vec<i32> =
            c.query_one("SELECT worker_pids FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
        if let Some(&p) = pids.first() {
            return p;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no leader pid for {id}");
}

#[test]
fn a_cancel_interrupts_the_leaders_lock_wait_and_a_resume_still_truncates() {
    let cluster = preloaded();
    let dir = snapshot_of(cluster, "cancel_trunc_src", 20000, "64kB");
    // A target without a key that already holds the snapshot's rows: only a truncation keeps them single.
    cluster.fresh_db("cancel_trunc_dst", true);
    let mut d = cluster.client("cancel_trunc_dst");
    d.batch_execute("CREATE TABLE t (id int, h text)").unwrap();
    let rows_of =
        |d: &mut postgres::Client| -> i64 { d.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0) };
    let mut holder = cluster.client("cancel_trunc_dst");
    holder.batch_execute("BEGIN; LOCK t IN ACCESS SHARE MODE").unwrap();
    let id = apply(&mut d, &dir, ", truncate => true").unwrap();
    wait_for_phase(&mut d, &id, &["truncate"]);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert!(d.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get::<_, bool>(0));
    let (status, _) = wait_for(&mut d, &id, 30);
    assert_eq!(status, "cancelled");
    assert!(started.elapsed() < Duration::from_secs(10), "the cancel waited for the lock holder");
    holder.batch_execute("COMMIT").unwrap();
    // The truncation never committed; fill the table as if rows had been there all along.
    d.batch_execute("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 500) g").unwrap();
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap().get(0);
    assert_eq!(wait_for(&mut d, &again, 60).0, "applied");
    assert_eq!(rows_of(&mut d), 20000, "the resume did not truncate first");
}

#[test]
fn terminating_a_leader_that_waits_for_a_lock_fails_its_job_promptly() {
    let cluster = preloaded();
    let dir = snapshot_of(cluster, "term_leader_src", 2000, "64kB");
    let mut d = target(cluster, "term_leader_dst");
    // Another session's lock makes the leader's TRUNCATE wait.
    let mut holder = cluster.client("term_leader_dst");
    holder.batch_execute("BEGIN; LOCK t IN ACCESS SHARE MODE").unwrap();
    let id = apply(&mut d, &dir, ", truncate => true").unwrap();
    let pid = leader_pid(&mut d, &id);
    wait_for_phase(&mut d, &id, &["truncate"]);
    std::thread::sleep(Duration::from_millis(300));
    d.query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    let (status, error) = wait_for(&mut d, &id, 20);
    assert_eq!(status, "failed");
    assert!(error.unwrap_or_default().contains("terminated"));
    holder.batch_execute("COMMIT").unwrap();
    no_job_left(&mut d);
    // The truncation never happened, and a resume does it.
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap().get(0);
    assert_eq!(wait_for(&mut d, &again, 60).0, "applied");
    let n: i64 = d.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 2000);
}

#[test]
fn a_cancel_of_the_leader_before_the_caller_commits_cancels_the_job() {
    let cluster = preloaded();
    cluster.fresh_db("cancel_early", true);
    let mut c = cluster.client("cancel_early");
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)").unwrap();
    let dir = snapshot_path("cancel_early");
    c.batch_execute("BEGIN").unwrap();
    let id = start_snapshot(&mut c, &[], &dir, "");
    let pid = leader_pid(&mut c, &id);
    // The leader's pid is published before it has connected; until it has, pg_cancel_backend does not
    // know it as a backend (a WARNING and false) and sends nothing, so ask again until it does.
    let mut other = cluster.client("cancel_early");
    let mut sent = false;
    for _ in 0..500 {
        sent = other.query_one("SELECT pg_cancel_backend($1)", &[&pid]).unwrap().get(0);
        if sent {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sent, "pg_cancel_backend never reached the leader {pid}");
    std::thread::sleep(Duration::from_millis(300));
    c.batch_execute("COMMIT").unwrap();
    let (status, error) = wait_for(&mut c, &id, 20);
    assert_eq!(status, "cancelled", "{error:?}");
    assert!(!dir.join("manifest.json").exists());
    no_job_left(&mut c);
}

#[test]
fn timeouts_and_read_only_defaults_of_the_role_do_not_break_a_job() {
    let cluster = preloaded();
    let dir = snapshot_of(cluster, "role_settings_src", 20000, "64kB");
    let mut d = target(cluster, "role_settings_dst");
    d.batch_execute(
        "ALTER DATABASE role_settings_dst SET default_transaction_read_only = on;          ALTER DATABASE role_settings_dst SET statement_timeout = '1ms';          ALTER DATABASE role_settings_dst SET lock_timeout = '1ms';          ALTER DATABASE role_settings_dst SET idle_in_transaction_session_timeout = '1ms'",
    )
    .unwrap();
    // The caller's own session is read-write; the job's workers get the database's settings.
    d.batch_execute("SET default_transaction_read_only = off; SET statement_timeout = 0").unwrap();
    let id = apply(&mut d, &dir, ", parallel => 2").unwrap();
    let (status, error) = wait_for(&mut d, &id, 60);
    assert_eq!(status, "applied", "{error:?}");
    let n: i64 = d.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 20000);
    d.batch_execute("ALTER DATABASE role_settings_dst RESET ALL").unwrap();
}

/// Runs a `start_snapshot` statement, again while the only error is that no worker slot is free (one
/// held by the supervisor's reaper right after a start, or by a leader still exiting), for 10 s at most.
fn start_once_a_slot_is_free(c: &mut postgres::Client, sql: &str) -> String {
    for _ in 0..100 {
        match c.query_one(sql, &[]) {
            Ok(r) => return r.get(0),
            Err(e) if db_message(&e).contains("no background worker slot") => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{sql}: {}", db_message(&e)),
        }
    }
    panic!("{sql}: no worker slot became free in 10 s");
}

#[test]
fn server_limits_name_the_setting_to_raise_and_a_value() {
    let cluster = dedicated_with(
        "limits",
        "max_locks_per_transaction = 10\nsteep_repl.max_chunk_slots = 1024\nmax_worker_processes = 3",
    );
    cluster.fresh_db("limits", true);
    let mut c = cluster.client("limits");
    c.batch_execute(
        "CREATE TABLE small (id int); INSERT INTO small SELECT generate_series(1, 100); \
         CREATE TABLE big (id int, v text); INSERT INTO big SELECT g, repeat('x', 500) FROM generate_series(1, 150000) g",
    )
    .unwrap();

    // Worker slots: the logical replication launcher and the supervisor take two of the three, a
    // running job's leader the last one. Right after the server starts, the supervisor's reaper
    // holds the third for a moment: wait for it to go.
    c.batch_execute("SET steep_repl.chunk_pause = '10s'").unwrap();
    let held = start_once_a_slot_is_free(
        &mut c,
        &format!(
            "SELECT steep_repl.start_snapshot('{}', tables => ARRAY['small'])",
            snapshot_path("limits_held").display()
        ),
    );
    wait_for_phase(&mut c, &held, &["data"]);
    let e = sql_err(
        &mut c,
        &format!("SELECT steep_repl.start_snapshot('{}')", snapshot_path("limits_second").display()),
    );
    assert!(e.contains("no background worker slot"), "{e}");
    let hint: String = {
        let err = c
            .query_one(
                &format!("SELECT steep_repl.start_snapshot('{}')", snapshot_path("limits_third").display()),
                &[],
            )
            .unwrap_err();
        err.as_db_error().and_then(|d| d.hint()).unwrap_or_default().to_string()
    };
    assert!(hint.contains("max_worker_processes (now 3"), "{hint}");
    assert!(c.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&held]).unwrap().get::<_, bool>(0));
    assert_eq!(wait_for(&mut c, &held, 30).0, "cancelled");
    c.batch_execute("RESET steep_repl.chunk_pause").unwrap();

    // Chunk slots: 36 MB in 64 kB chunks is more than 1024.
    // The cancelled leader's process may still be exiting.
    c.batch_execute("SET steep_repl.chunk_size = '64kB'").unwrap();
    let id = start_once_a_slot_is_free(
        &mut c,
        &format!(
            "SELECT steep_repl.start_snapshot('{}', tables => ARRAY['big'])",
            snapshot_path("limits_chunks").display()
        ),
    );
    let (status, error) = wait_for(&mut c, &id, 60);
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("steep_repl.max_chunk_slots to about"), "{error}");

    // Locks: a snapshot locks every table; 1500 tables are more than 10 x the backends.
    c.batch_execute(
        "DO $$ BEGIN FOR i IN 1..1500 LOOP EXECUTE format('CREATE TABLE many_%s (id int)', i); \
         IF i % 100 = 0 THEN COMMIT; END IF; END LOOP; END $$",
    )
    .unwrap();
    let e = sql_err(
        &mut c,
        &format!("SELECT steep_repl.start_snapshot('{}')", snapshot_path("limits_locks").display()),
    );
    assert!(e.contains("Raise max_locks_per_transaction to about"), "{e}");
    let wanted: i64 = e
        .split("Raise max_locks_per_transaction to about ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(wanted > 10, "{e}");
}

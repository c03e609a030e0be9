//! Apply builds the indexes of large tables after the data (issue 16): afterwards, and after a cancel or a
//! killed worker in the middle of the load, every index and constraint exists with its name, definition,
//! tablespace, clustering, replica identity and comments, and `resume_apply` finishes the job.

use steep_repl_testkit as harness;

use harness::*;

/// Tables with every kind of index the deferral handles, and some it must leave alone.
const SCHEMA: &str = r#"
CREATE SCHEMA "Ix S";
CREATE TABLE "Ix S".main (id bigint PRIMARY KEY, code text NOT NULL, email text, score int, tags text[],
                          created timestamptz, note text);
CREATE UNIQUE INDEX main_code ON "Ix S".main (code) INCLUDE (score) WITH (fillfactor = 70);
CREATE INDEX "main lower" ON "Ix S".main (lower(email)) WHERE score > 10;
CREATE INDEX main_tags ON "Ix S".main USING gin (tags);
CREATE INDEX main_created ON "Ix S".main (created DESC NULLS LAST, id);
ALTER TABLE "Ix S".main ADD CONSTRAINT main_email_key UNIQUE (email) DEFERRABLE INITIALLY DEFERRED;
COMMENT ON INDEX "Ix S"."main lower" IS 'for the login page';
COMMENT ON CONSTRAINT main_pkey ON "Ix S".main IS 'the key';
ALTER TABLE "Ix S".main CLUSTER ON main_created;
CREATE TABLE ri (a int NOT NULL, b text NOT NULL, v text);
CREATE UNIQUE INDEX ri_ab ON ri (a, b);
ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_ab;
ALTER TABLE ri ADD CONSTRAINT ri_nnd UNIQUE NULLS NOT DISTINCT (a, b) WITH (fillfactor = 80);
CREATE TABLE parent (id int PRIMARY KEY, label text);
CREATE TABLE child (id int, parent_id int NOT NULL REFERENCES parent (id), v text,
                    CONSTRAINT child_pkey PRIMARY KEY (id) WITH (fillfactor = 90));
CREATE INDEX child_parent ON child (parent_id);
CREATE TABLE spans (id int PRIMARY KEY, r int4range, EXCLUDE USING gist (r WITH &&));
"#;

const DATA: &str = r#"
INSERT INTO "Ix S".main SELECT g, 'c' || g, CASE WHEN g % 7 = 0 THEN NULL ELSE 'u' || g || '@x' END, g % 50,
       ARRAY['t' || (g % 13), 't' || (g % 5)], timestamptz '2024-01-01' + g * interval '1 minute',
       repeat('n', g % 40) FROM generate_series(1, 40000) g;
INSERT INTO ri SELECT g % 1000, 'b' || (g / 1000), 'v' FROM generate_series(1, 20000) g;
INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 5000) g;
INSERT INTO child SELECT g, 1 + g % 5000, md5(g::text) FROM generate_series(1, 30000) g;
INSERT INTO spans SELECT g, int4range(g * 10, g * 10 + 5) FROM generate_series(1, 5000) g;
"#;

/// Every index and constraint of the user tables, as text that differs if anything about one differs:
/// name, definition, tablespace, validity, clustering, replica identity, comment, and its oid apart.
fn schema_of(c: &mut postgres::Client) -> (Vec<String>, Vec<(String, u32)>) {
    let defs = c
        .query(
            "SELECT format('%s %s %s valid=%s ready=%s clustered=%s replident=%s ts=%s comment=%s options=%s owner=%s', \
                    i.indrelid::regclass, ic.relname, pg_get_indexdef(i.indexrelid), i.indisvalid, i.indisready, \
                    i.indisclustered, i.indisreplident, coalesce(ic.reltablespace, 0), \
                    obj_description(i.indexrelid, 'pg_class'), ic.reloptions, ic.relowner::regrole) \
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname IN ('public', 'Ix S') \
             UNION ALL \
             SELECT format('%s constraint %s %s validated=%s deferrable=%s deferred=%s comment=%s', \
                    conrelid::regclass, conname, pg_get_constraintdef(oid), convalidated, condeferrable, \
                    condeferred, obj_description(oid, 'pg_constraint')) \
             FROM pg_constraint WHERE connamespace IN (SELECT oid FROM pg_namespace \
                                                      WHERE nspname IN ('public', 'Ix S')) \
             UNION ALL \
             SELECT format('%s replica identity %s', oid::regclass, relreplident) FROM pg_class \
             WHERE relnamespace IN (SELECT oid FROM pg_namespace WHERE nspname IN ('public', 'Ix S')) \
               AND relkind = 'r' \
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let oids = c
        .query(
            "SELECT ic.relname::text, ic.oid FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
             JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace \
             WHERE n.nspname IN ('public', 'Ix S') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, postgres::types::Oid>(1)))
        .collect();
    (defs, oids)
}

fn oid_of(oids: &[(String, u32)], name: &str) -> u32 {
    oids.iter().find(|(n, _)| n == name).map(|(_, o)| *o).unwrap_or_else(|| panic!("no index {name}"))
}

/// Indexes whose oid changed (they were dropped and built again).
fn rebuilt(before: &[(String, u32)], after: &[(String, u32)]) -> Vec<String> {
    before.iter().filter(|(n, o)| oid_of(after, n) != *o).map(|(n, _)| n.clone()).collect()
}

/// Polls `check` every 20 ms, for up to 30 s, until it is true; whether it became true.
fn poll_until(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..1500 {
        if check() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

fn deferred_of_main(d: &mut postgres::Client, id: &str) -> i64 {
    d.query_one(
        "SELECT count(*) FROM steep_repl.apply_deferred_indexes WHERE apply_id = $1 AND table_name = 'main'",
        &[&id],
    )
    .unwrap()
    .get(0)
}

fn pending_records(d: &mut postgres::Client, id: &str) -> i64 {
    d.query_one("SELECT count(*) FROM steep_repl.apply_deferred_indexes WHERE apply_id = $1", &[&id])
        .unwrap()
        .get(0)
}

/// Starts an apply of `dir` with two workers that defers every index, each worker pausing `pause` before
/// each chunk (and `more` settings, if any); its id.
fn start_paused_apply(d: &mut postgres::Client, dir: &std::path::Path, pause: &str, more: &str) -> String {
    d.batch_execute(&format!(
        "SET steep_repl.apply_index_defer_size = 0; SET steep_repl.chunk_pause = '{pause}'; {more}"
    ))
    .unwrap();
    d.query_one(&format!("SELECT steep_repl.start_apply('{}', parallel => 2)", dir.display()), &[])
        .unwrap()
        .get(0)
}

/// Whether apply `id` has loaded `n` chunks before poll_until gives up.
fn loaded_chunks(d: &mut postgres::Client, id: &str, n: i32) -> bool {
    poll_until(|| {
        let done: i32 =
            d.query_one("SELECT chunks_done FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
        done >= n
    })
}

/// Source and target databases holding SCHEMA (the source also DATA), and a snapshot of the source.
fn prepare(cluster: &Cluster, tag: &str, chunk_size: &str) -> (String, String, std::path::PathBuf) {
    prepare_from(
        cluster,
        tag,
        &format!("{SCHEMA}{DATA}"),
        &[&format!("SET steep_repl.chunk_size = '{chunk_size}'")],
    )
}

/// A source database made by `sql`, a snapshot of it taken with two workers after `settings`, and a
/// target database holding the source's schema.
fn prepare_from(
    cluster: &Cluster,
    tag: &str,
    sql: &str,
    settings: &[&str],
) -> (String, String, std::path::PathBuf) {
    let (src, dst) = (format!("ixd_{tag}_src"), format!("ixd_{tag}_dst"));
    cluster.fresh_db(&src, true);
    cluster.client(&src).batch_execute(sql).unwrap_or_else(|e| panic!("{}", db_message(&e)));
    let mut c = cluster.client(&src);
    let dir = snapshot_path(&format!("ixd_{tag}"));
    let id = start_snapshot(&mut c, settings, &dir, ", parallel => 2");
    let (status, error) = wait_for(&mut c, &id, 120);
    assert_eq!(status, "complete", "generate: {error:?}");
    cluster.fresh_db(&dst, false);
    copy_schema(cluster, &src, &dst);
    (src, dst, dir)
}

#[test]
fn indexes_built_after_the_data_are_exactly_as_they_were() {
    let cluster = preloaded();
    let (src, dst, dir) = prepare(cluster, "ok", "256kB");
    let mut d = cluster.client(&dst);
    let (defs_before, oids_before) = schema_of(&mut d);
    d.batch_execute("SET steep_repl.apply_index_defer_size = 0").unwrap();
    let id: String = d
        .query_one(&format!("SELECT steep_repl.start_apply('{}', parallel => 2)", dir.display()), &[])
        .unwrap()
        .get(0);
    let (status, error) = wait_for(&mut d, &id, 180);
    assert_eq!(status, "applied", "{error:?}");
    assert_same_rows(cluster, &src, &dst, &dir);
    let (defs_after, oids_after) = schema_of(&mut d);
    assert_eq!(defs_before, defs_after, "every index and constraint is as it was");
    let mut again = rebuilt(&oids_before, &oids_after);
    again.sort();
    // Built after the data: every index of main and ri, child's; kept: parent's key (child's foreign key
    // depends on it) and the exclusion constraint's index. child_pkey and spans_pkey are plain keys.
    assert_eq!(
        again,
        [
            "child_parent",
            "child_pkey",
            "main lower",
            "main_code",
            "main_created",
            "main_email_key",
            "main_pkey",
            "main_tags",
            "ri_ab",
            "ri_nnd",
            "spans_pkey"
        ],
        "the indexes built after the data"
    );
    assert_eq!(pending_records(&mut d, &id), 0);
    // Every table was analyzed, and after its indexes were built: the expression index has statistics.
    let not_analyzed: Vec<String> = d
        .query(
            "SELECT relname::text FROM pg_stat_user_tables WHERE schemaname <> 'steep_repl' AND last_analyze IS NULL",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(not_analyzed.is_empty(), "not analyzed: {not_analyzed:?}");
    let expression_stats: i64 = d
        .query_one(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'Ix S' AND tablename = 'main lower'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(expression_stats, 1, "ANALYZE ran after the expression index was built");
    // The rebuilt indexes hold every row: an index-only lookup finds the last one.
    d.batch_execute("SET enable_seqscan = off").unwrap();
    let n: i64 =
        d.query_one(r#"SELECT count(*) FROM "Ix S".main WHERE code = 'c39999'"#, &[]).unwrap().get(0);
    assert_eq!(n, 1);
    // The default size defers nothing for tables this small.
    cluster.fresh_db("ixd_small_dst", false);
    copy_schema(cluster, &src, "ixd_small_dst");
    let mut s = cluster.client("ixd_small_dst");
    let (_, small_before) = schema_of(&mut s);
    let id: String = s
        .query_one(&format!("SELECT steep_repl.start_apply('{}', parallel => 2)", dir.display()), &[])
        .unwrap()
        .get(0);
    let (status, error) = wait_for(&mut s, &id, 180);
    assert_eq!(status, "applied", "{error:?}");
    let (_, small_after) = schema_of(&mut s);
    assert!(rebuilt(&small_before, &small_after).is_empty());
}

/// Interrupts an apply that deferred its indexes in the middle of its data phase; the schema must be as
/// it was once the job has ended, and resume_apply must finish the load and build the indexes again.
fn interrupted(interrupt: &str) {
    let cluster = preloaded();
    let (src, dst, dir) = prepare(cluster, interrupt, "64kB");
    let mut d = cluster.client(&dst);
    let (defs_before, oids_before) = schema_of(&mut d);
    let id = start_paused_apply(&mut d, &dir, "150ms", "");
    assert!(loaded_chunks(&mut d, &id, 3), "apply made no progress");
    // In the data phase the deferred indexes are gone, and recorded.
    assert!(pending_records(&mut d, &id) >= 10);
    if interrupt == "kill" {
        let pids: Vec<i32> =
            d.query_one("SELECT worker_pids FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
        d.query_one("SELECT pg_terminate_backend($1)", &[&pids[pids.len() - 1]]).unwrap();
    } else {
        assert!(d.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get::<_, bool>(0));
    }
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, if interrupt == "kill" { "failed" } else { "cancelled" }, "{error:?}");
    let (defs_stopped, _) = schema_of(&mut d);
    assert_eq!(defs_before, defs_stopped, "the schema is as it was when the job has ended");
    assert_eq!(pending_records(&mut d, &id), 0);
    let partial: i64 = d.query_one(r#"SELECT count(*) FROM "Ix S".main"#, &[]).unwrap().get(0);
    let total: i64 =
        cluster.client(&src).query_one(r#"SELECT count(*) FROM "Ix S".main"#, &[]).unwrap().get(0);
    assert!(partial < total, "stopped in the middle: {partial} of {total}");

    d.batch_execute("RESET steep_repl.chunk_pause").unwrap();
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap().get(0);
    assert_eq!(again, id);
    let (status, error) = wait_for(&mut d, &id, 180);
    assert_eq!(status, "applied", "{error:?}");
    assert_same_rows(cluster, &src, &dst, &dir);
    let (defs_after, oids_after) = schema_of(&mut d);
    assert_eq!(defs_before, defs_after);
    assert!(rebuilt(&oids_before, &oids_after).contains(&"main_pkey".to_string()));
    assert_eq!(pending_records(&mut d, &id), 0);
}

#[test]
fn a_cancel_during_the_load_restores_the_indexes_and_resume_finishes() {
    interrupted("cancel");
}

#[test]
fn a_killed_worker_restores_the_indexes_and_resume_finishes() {
    interrupted("kill");
}

/// A target whose unique index `t_code` the snapshot's rows violate (the source has no such index and a
/// duplicate code), after an apply that deferred it and failed building it: (target client, apply id,
/// the target's indexes as they were before the apply).
fn failed_on_a_duplicate(cluster: &Cluster, tag: &str) -> (postgres::Client, String, Vec<String>) {
    let (src, dst) = (format!("ixd_{tag}_src"), format!("ixd_{tag}_dst"));
    cluster.fresh_db(&src, true);
    cluster
        .client(&src)
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, code text); \
             INSERT INTO t SELECT g, 'c' || g FROM generate_series(1, 20000) g; UPDATE t SET code = 'c1' WHERE id = 2",
        )
        .unwrap();
    let mut c = cluster.client(&src);
    let dir = snapshot_path(&format!("ixd_{tag}"));
    let id = start_snapshot(&mut c, &[], &dir, ", parallel => 2");
    assert_eq!(wait_for(&mut c, &id, 120).0, "complete");
    cluster.fresh_db(&dst, false);
    copy_schema(cluster, &src, &dst);
    let mut d = cluster.client(&dst);
    d.batch_execute("CREATE UNIQUE INDEX t_code ON t (code)").unwrap();
    let (defs_before, _) = schema_of(&mut d);
    d.batch_execute("SET steep_repl.apply_index_defer_size = 0").unwrap();
    let id: String = d
        .query_one(&format!("SELECT steep_repl.start_apply('{}', parallel => 2)", dir.display()), &[])
        .unwrap()
        .get(0);
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("t_code") && error.contains("resume_apply"), "{error}");
    let left: Vec<String> = d
        .query("SELECT index_name FROM steep_repl.apply_deferred_indexes WHERE apply_id = $1", &[&id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["t_code"]);
    (d, id, defs_before)
}

/// A unique index that the loaded rows violate cannot be built: the job fails naming it, the index stays
/// recorded (not silently lost), and once the duplicate is gone resume_apply builds it.
#[test]
fn an_index_the_data_violates_is_reported_and_built_by_resume() {
    let cluster = preloaded();
    let (mut d, id, defs_before) = failed_on_a_duplicate(cluster, "dup");
    d.batch_execute("DELETE FROM t WHERE id = 2").unwrap();
    d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap();
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, "applied", "{error:?}");
    assert_eq!(schema_of(&mut d).0, defs_before);
}

/// An apply (deferring every table's indexes) that has loaded its data and whose build of main's indexes
/// waits for the lock of another session, which read main once they were deferred and keeps its
/// transaction open: (target client, apply id, that session, the target's indexes as they were).
fn index_phase_waiting_for_a_lock(
    cluster: &Cluster,
    tag: &str,
) -> (postgres::Client, String, postgres::Client, Vec<String>) {
    let (_src, dst, dir) = prepare(cluster, tag, "256kB");
    let mut d = cluster.client(&dst);
    let (defs_before, _) = schema_of(&mut d);
    let id = start_paused_apply(&mut d, &dir, "100ms", "");
    assert!(poll_until(|| deferred_of_main(&mut d, &id) > 0), "main's indexes were deferred");
    let mut blocker = cluster.client(&dst);
    blocker.batch_execute(r#"BEGIN; SELECT count(*) FROM "Ix S".main"#).unwrap();
    // The data goes in; main's indexes wait for the blocker's lock.
    let waiting = poll_until(|| {
        let phase: String =
            d.query_one("SELECT phase FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
        phase == "indexes" && deferred_of_main(&mut d, &id) > 0
    });
    assert!(waiting, "the job reached its index phase with main's indexes left");
    (d, id, blocker, defs_before)
}

/// An index put back by hand exactly as it was, after the job failed building it: resume_apply takes it
/// as built and ends the job.
#[test]
fn an_index_put_back_by_hand_is_taken_as_built() {
    let cluster = preloaded();
    let (mut d, id, defs_before) = failed_on_a_duplicate(cluster, "byhand");
    d.batch_execute("DELETE FROM t WHERE id = 2; CREATE UNIQUE INDEX t_code ON t (code)").unwrap();
    d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap();
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, "applied", "{error:?}");
    assert_eq!(schema_of(&mut d).0, defs_before);
    assert_eq!(pending_records(&mut d, &id), 0);
}

/// An apply that failed building an index, then superseded by an apply of another snapshot holding only
/// some of its tables: the new apply takes the unbuilt index over (the first can no longer be resumed) and
/// builds it, failing while the rows still violate it; once they no longer do, its resume builds it.
#[test]
fn a_new_apply_takes_over_the_indexes_its_predecessor_left_unbuilt() {
    let cluster = preloaded();
    let (src, dst) = ("ixd_over_src", "ixd_over_dst");
    cluster.fresh_db(src, true);
    let mut c = cluster.client(src);
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, code text); CREATE TABLE u (id int PRIMARY KEY); \
         INSERT INTO t SELECT g, 'c' || g FROM generate_series(1, 20000) g; UPDATE t SET code = 'c1' WHERE id = 2; \
         INSERT INTO u SELECT generate_series(1, 20000)",
    )
    .unwrap();
    let (both, only_u) = (snapshot_path("ixd_over_both"), snapshot_path("ixd_over_u"));
    let id = start_snapshot(&mut c, &[], &both, ", parallel => 2");
    assert_eq!(wait_for(&mut c, &id, 120).0, "complete");
    let id = start_snapshot(&mut c, &[], &only_u, ", 1, tables => ARRAY['public.u']");
    assert_eq!(wait_for(&mut c, &id, 120).0, "complete");
    cluster.fresh_db(dst, false);
    copy_schema(cluster, src, dst);
    let mut d = cluster.client(dst);
    d.batch_execute("CREATE UNIQUE INDEX t_code ON t (code); SET steep_repl.apply_index_defer_size = 0")
        .unwrap();
    let (defs_before, _) = schema_of(&mut d);
    let first: String = d
        .query_one("SELECT steep_repl.start_apply($1, parallel => 2)", &[&both.to_str().unwrap()])
        .unwrap()
        .get(0);
    assert_eq!(wait_for(&mut d, &first, 120).0, "failed");
    assert_eq!(pending_records(&mut d, &first), 1, "t_code is left to build");
    // A role that may load u but does not act for t's owner could not build t_code: refused, nothing
    // taken over.
    d.batch_execute(
        "DROP ROLE IF EXISTS ixd_loader; CREATE ROLE ixd_loader LOGIN IN ROLE pg_read_server_files; \
         GRANT SELECT, INSERT, TRUNCATE ON u TO ixd_loader",
    )
    .unwrap();
    let mut loader = postgres::Client::connect(
        &cluster.conninfo_for(dst).replace("user=postgres", "user=ixd_loader"),
        postgres::NoTls,
    )
    .unwrap();
    let e = loader
        .query_one("SELECT steep_repl.start_apply($1, 1, truncate => true)", &[&only_u.to_str().unwrap()])
        .expect_err("a role that cannot build t_code");
    let msg = db_message(&e);
    assert!(msg.contains("cannot build") && msg.contains("t_code"), "{msg}");
    assert_eq!(pending_records(&mut d, &first), 1, "nothing was taken over");
    let second: String = d
        .query_one("SELECT steep_repl.start_apply($1, 1, truncate => true)", &[&only_u.to_str().unwrap()])
        .unwrap()
        .get(0);
    let (status, error) = wait_for(&mut d, &second, 120);
    assert_eq!(status, "failed", "t_code cannot be built while the rows violate it");
    assert!(error.unwrap_or_default().contains("t_code"));
    assert_eq!((pending_records(&mut d, &first), pending_records(&mut d, &second)), (0, 1));
    d.batch_execute("DELETE FROM t WHERE id = 2").unwrap();
    d.query_one("SELECT steep_repl.resume_apply($1)", &[&second]).unwrap();
    let (status, error) = wait_for(&mut d, &second, 120);
    assert_eq!(status, "applied", "{error:?}");
    assert_eq!(schema_of(&mut d).0, defs_before);
}

/// A table renamed while its indexes wait to be built, and another table created under its old name: the
/// indexes are built on neither (their statements name the table) and the job fails saying so. Renamed
/// back, resume_apply builds them.
#[test]
fn a_table_renamed_before_its_index_build_gets_no_index_elsewhere() {
    let cluster = preloaded();
    let (mut d, id, mut blocker, defs_before) = index_phase_waiting_for_a_lock(cluster, "renamed");
    blocker
        .batch_execute(
            r#"ALTER TABLE "Ix S".main RENAME TO main_old; CREATE TABLE "Ix S".main (LIKE "Ix S".main_old); COMMIT"#,
        )
        .unwrap();
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains(r#"is now named "Ix S"."main_old""#), "{error}");
    let on_new: i64 = d
        .query_one("SELECT count(*) FROM pg_indexes WHERE schemaname = 'Ix S' AND tablename = 'main'", &[])
        .unwrap()
        .get(0);
    assert_eq!(on_new, 0, "an index was built on a table it never belonged to");
    d.batch_execute(
        r#"DROP TABLE "Ix S".main; ALTER TABLE "Ix S".main_old RENAME TO main; RESET steep_repl.chunk_pause"#,
    )
    .unwrap();
    d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap();
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, "applied", "{error:?}");
    assert_eq!(schema_of(&mut d).0, defs_before);
    assert_eq!(pending_records(&mut d, &id), 0);
}

/// A load that will force checkpoints is told so before it starts: a WARNING to the caller and in the
/// server log, and the job's progress, each naming max_wal_size and a value that avoids them.
#[test]
fn a_load_that_will_force_checkpoints_names_the_setting_and_a_value() {
    let cluster = dedicated_with("ixd_wal", "max_wal_size = 32MB\nmin_wal_size = 32MB");
    cluster.fresh_db("wal_src", true);
    // About 24 MB of COPY text: some 31 MB of WAL, where max_wal_size = 32MB checkpoints every 16.8 MB.
    cluster
        .client("wal_src")
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, repeat('x', 110) FROM generate_series(1, 200000) g")
        .unwrap();
    let mut c = cluster.client("wal_src");
    let dir = snapshot_path("ixd_wal");
    let id = start_snapshot(&mut c, &[], &dir, ", parallel => 2");
    assert_eq!(wait_for(&mut c, &id, 120).0, "complete");
    cluster.fresh_db("wal_dst", false);
    copy_schema(&cluster, "wal_src", "wal_dst");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = notices.clone();
    let mut config: postgres::Config = cluster.conninfo_for("wal_dst").parse().unwrap();
    config.notice_callback(move |n| seen.lock().unwrap().push(n.message().to_string()));
    let mut d = config.connect(postgres::NoTls).unwrap();
    let id: String = d
        .query_one(&format!("SELECT steep_repl.start_apply('{}', parallel => 2)", dir.display()), &[])
        .unwrap()
        .get(0);
    let warned = notices.lock().unwrap().clone();
    assert!(
        warned.iter().any(|w| w.contains("max_wal_size = 32MB forces about") && w.contains("set max_wal_size = '1GB'")),
        "{warned:?}"
    );
    let progress: Option<String> =
        d.query_one("SELECT warning FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
    assert!(progress.unwrap_or_default().contains("max_wal_size"));
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, "applied", "{error:?}");
    // Still there once the job has ended, and in the log.
    let persisted: Option<String> =
        d.query_one("SELECT warning FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
    assert!(persisted.unwrap_or_default().contains("max_wal_size"));
    assert!(cluster.server_log().contains("forces about"), "the warning is in the server log");
}

/// A session holding a lock on a loaded table keeps the index build waiting, but never holds the job
/// past a cancel: the wait for the lock is cancellable, and once the session lets go the clean-up builds
/// the indexes, so the schema is as it was.
#[test]
fn a_cancel_ends_a_wait_for_a_table_lock_before_an_index_build() {
    let cluster = preloaded();
    let (mut d, id, mut blocker, defs_before) = index_phase_waiting_for_a_lock(cluster, "lockwait");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(d.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get::<_, bool>(0));
    // The cancel ends the workers' waits while the blocker still holds its lock: only the leader is left,
    // restoring the indexes (it waits for the lock too).
    let workers_gone = poll_until(|| {
        let pids: Vec<i32> =
            d.query_one("SELECT worker_pids FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
        pids.len() <= 1
    });
    assert!(workers_gone, "the workers stopped waiting for the lock at the cancel");
    let status: String =
        d.query_one("SELECT status FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
    assert_eq!(status, "running", "the clean-up waits for the blocker's lock");
    blocker.batch_execute("COMMIT").unwrap();
    let (status, error) = wait_for(&mut d, &id, 60);
    assert_eq!(status, "cancelled", "{error:?}");
    assert_eq!(schema_of(&mut d).0, defs_before, "the schema is as it was");
    assert_eq!(pending_records(&mut d, &id), 0);
}

/// A table `slow` of 20 000 rows with an expression index `slow_v` whose expression sleeps 50 ms a row in a
/// database where `steep_test.slow_index = on`: building it there takes about 1 000 s of sleep.
const SLOW_INDEX: &str = "
CREATE FUNCTION public.slow_id(v int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$
BEGIN
  IF current_setting('steep_test.slow_index', true) = 'on' THEN PERFORM pg_sleep(0.05); END IF;
  RETURN v;
END $$;
CREATE TABLE slow (id int PRIMARY KEY, v int, pad text);
INSERT INTO slow SELECT g, g, repeat('p', 200) FROM generate_series(1, 20000) g;
CREATE INDEX slow_v ON slow (public.slow_id(v));
";

/// `resume_apply(id)` of a failed apply from `src` into `dst` (snapshot `dir`) ends applied, with every
/// row of the source and every index and constraint as `defs_before` lists them, and no record left.
fn resume_restores_the_schema(
    cluster: &Cluster,
    d: &mut postgres::Client,
    (src, dst, dir): (&str, &str, &std::path::Path),
    id: &str,
    defs_before: &[String],
) {
    let again: String = d.query_one("SELECT steep_repl.resume_apply($1)", &[&id]).unwrap().get(0);
    let (status, error) = wait_for(d, &again, 180);
    assert_eq!(status, "applied", "{error:?}");
    assert_same_rows(cluster, src, dst, dir);
    let (defs_after, _) = schema_of(d);
    assert_eq!(defs_before, defs_after, "every index is back as it was");
    assert_eq!(pending_records(d, id), 0);
}

/// A leader stops in the middle of an index build when it is terminated (SIGTERM, as a server shutdown
/// sends it), instead of building on for as long as the index takes: the index stays recorded and
/// `resume_apply` builds it. Here the build is the leader's restoring of the indexes after a cancel (only
/// the leader does that), of an index whose expression sleeps 50 ms a row in the target database.
#[test]
fn a_terminated_leader_stops_in_the_middle_of_an_index_build() {
    let cluster = preloaded();
    let (src, dst, dir) = prepare_from(cluster, "term", SLOW_INDEX, &["SET steep_repl.chunk_size = '64kB'"]);
    let mut d = cluster.client(&dst);
    let (defs_before, _) = schema_of(&mut d);
    // Jobs connect to the database after this, and take its settings: the expression sleeps there.
    d.batch_execute(&format!("ALTER DATABASE {dst} SET steep_test.slow_index = on")).unwrap();
    let id = start_paused_apply(&mut d, &dir, "150ms", "");
    assert!(loaded_chunks(&mut d, &id, 10), "apply made no progress");
    let leader: i32 =
        d.query_one("SELECT worker_pids[1] FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
    assert!(d.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get::<_, bool>(0));
    // At least 10 chunks of about 300 rows are in: at 50 ms a row, building slow_v takes more than a minute
    // even with a helper process, twice as long as poll_until waits for the leader to be gone.
    let building = poll_until(|| {
        d.query_one(
            "SELECT count(*) > 0 FROM pg_stat_progress_create_index WHERE pid = $1 AND phase LIKE 'building%'",
            &[&leader],
        )
        .unwrap()
        .get(0)
    });
    assert!(building, "the leader is building an index");
    d.query_one("SELECT pg_terminate_backend($1)", &[&leader]).unwrap();
    let gone = poll_until(|| {
        d.query_one("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", &[&leader]).unwrap().get(0)
    });
    assert!(gone, "the leader stopped building when terminated");
    let (status, error) = wait_for(&mut d, &id, 60);
    assert!(status == "failed" || status == "cancelled", "{status}: {error:?}");
    assert!(pending_records(&mut d, &id) >= 1, "slow_v stays recorded");

    d.batch_execute(&format!(
        "ALTER DATABASE {dst} RESET steep_test.slow_index; RESET steep_repl.chunk_pause"
    ))
    .unwrap();
    resume_restores_the_schema(cluster, &mut d, (&src, &dst, &dir), &id, &defs_before);
}

/// With more than one worker, a table whose rows are all in gets its indexes built and its ANALYZE run
/// while the other tables still load, not all at the end.
#[test]
fn a_completed_table_is_indexed_and_analyzed_while_others_load() {
    let cluster = preloaded();
    let (src, dst, dir) = prepare(cluster, "early", "64kB");
    let mut d = cluster.client(&dst);
    let (defs_before, _) = schema_of(&mut d);
    // Chunks of 64kB count as large units (not as small ones, loaded last in any order) when the smallest
    // part is smaller: the tables then load two at a time, largest first.
    let id = start_paused_apply(&mut d, &dir, "100ms", "SET steep_repl.apply_part_size = '16kB'");
    let tables_with_records = |d: &mut postgres::Client| -> i64 {
        d.query_one(
            "SELECT count(DISTINCT relid) FROM steep_repl.apply_deferred_indexes WHERE apply_id = $1",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    let phase = |d: &mut postgres::Client| -> String {
        d.query_one("SELECT phase FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0)
    };
    assert!(poll_until(|| phase(&mut d) == "data"), "the data phase began");
    let deferred_tables = tables_with_records(&mut d);
    assert!(deferred_tables >= 3, "the indexes of {deferred_tables} tables were deferred");
    let (mut built_early, mut analyzed_early) = (false, false);
    poll_until(|| {
        let (phase, done, total): (String, i32, i32) = d
            .query_one(
                "SELECT phase, chunks_done, chunks_total FROM steep_repl.snapshot_progress($1)",
                &[&id],
            )
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .unwrap();
        // Well before the end of the data (not merely a worker with nothing left to load while another
        // loads its last chunk).
        if phase != "data" || done * 5 > total * 4 {
            return true;
        }
        built_early |= tables_with_records(&mut d) < deferred_tables;
        analyzed_early |= d
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_user_tables WHERE schemaname <> 'steep_repl' \
                 AND last_analyze IS NOT NULL",
                &[],
            )
            .unwrap()
            .get::<_, bool>(0);
        built_early && analyzed_early
    });
    assert!(built_early, "a table's indexes were built with a fifth of the chunks still to load");
    assert!(analyzed_early, "a table was analyzed with a fifth of the chunks still to load");
    let (status, error) = wait_for(&mut d, &id, 180);
    assert_eq!(status, "applied", "{error:?}");
    assert_same_rows(cluster, &src, &dst, &dir);
    let (defs_after, _) = schema_of(&mut d);
    assert_eq!(defs_before, defs_after, "every index and constraint is as it was");
}

/// A leader terminated in the middle of its own index build at the end of the load (which ends its
/// process at once, without the job's usual clean-up) takes the job's worker with it: the worker, building
/// another index, would otherwise build on for as long as that takes, for a job that has failed (only a
/// terminate interrupts a build). `resume_apply` then finishes the job.
#[test]
fn a_leader_terminated_in_an_index_build_takes_its_workers_with_it() {
    let cluster = preloaded();
    let sql = format!(
        "{SLOW_INDEX}
         CREATE TABLE slow2 (id int PRIMARY KEY, v int, pad text);
         INSERT INTO slow2 SELECT g, g, repeat('q', 200) FROM generate_series(1, 20000) g;
         CREATE INDEX slow2_v ON slow2 (public.slow_id(v));"
    );
    let (src, dst, dir) = prepare_from(cluster, "lexit", &sql, &[]);
    let mut d = cluster.client(&dst);
    let (defs_before, _) = schema_of(&mut d);
    d.batch_execute(&format!("ALTER DATABASE {dst} SET steep_test.slow_index = on")).unwrap();
    // One worker: it builds only once everything is loaded, side by side with the leader, each claiming
    // one of the two slow indexes.
    d.batch_execute("SET steep_repl.apply_index_defer_size = 0").unwrap();
    let id: String = d
        .query_one(&format!("SELECT steep_repl.start_apply('{}', parallel => 1)", dir.display()), &[])
        .unwrap()
        .get(0);
    let mut pids: Vec<i32> = Vec::new();
    let both_building = poll_until(|| {
        pids = d
            .query_one("SELECT worker_pids FROM steep_repl.snapshot_progress($1)", &[&id])
            .map(|r| r.get(0))
            .unwrap_or_default();
        let building: Vec<i32> = d
            .query(
                "SELECT pid FROM pg_stat_progress_create_index WHERE pid = ANY($1) AND phase LIKE 'building%'",
                &[&pids],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        pids.len() >= 2 && building.len() >= 2 && building.contains(&pids[0])
    });
    assert!(both_building, "the leader and the worker each build a slow index (pids {pids:?})");
    d.query_one("SELECT pg_terminate_backend($1)", &[&pids[0]]).unwrap();
    let gone = poll_until(|| {
        d.query_one("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = ANY($1)", &[&pids]).unwrap().get(0)
    });
    assert!(gone, "the leader and its worker ({pids:?}) are gone after the leader was terminated");
    let (status, error) = wait_for(&mut d, &id, 60);
    assert_eq!(status, "failed", "{error:?}");
    assert!(pending_records(&mut d, &id) >= 2, "both slow indexes stay recorded");

    d.batch_execute(&format!("ALTER DATABASE {dst} RESET steep_test.slow_index")).unwrap();
    resume_restores_the_schema(cluster, &mut d, (&src, &dst, &dir), &id, &defs_before);
}

/// A table `par` of 4 000 rows whose index `par_v` can be built in parallel (`parallel_workers = 1`, an
/// expression that is PARALLEL SAFE) and sleeps 5 ms a row in a database where `steep_test.slow_index =
/// on`: about 20 s of sleep, shared by the build's participants.
const PARALLEL_SLOW_INDEX: &str = "
CREATE FUNCTION public.slow_ps(v int) RETURNS int IMMUTABLE PARALLEL SAFE LANGUAGE plpgsql AS $$
BEGIN
  IF current_setting('steep_test.slow_index', true) = 'on' THEN PERFORM pg_sleep(0.005); END IF;
  RETURN v;
END $$;
CREATE TABLE par (id int PRIMARY KEY, v int, pad text) WITH (parallel_workers = 1);
INSERT INTO par SELECT g, g, repeat('p', 200) FROM generate_series(1, 4000) g;
CREATE INDEX par_v ON par (public.slow_ps(v));
";

/// A deferred index is built with the server's parallel index build (a helper process works for the
/// builder), and a cancel arriving in the middle of the build waits for it instead of throwing it away.
/// Both failed together before: the builder held query cancels off, and PostgreSQL launches no parallel
/// worker for a process that cannot process interrupts, so every build was serial.
#[test]
fn a_deferred_index_is_built_in_parallel_and_a_cancel_waits_for_the_build() {
    let cluster = preloaded();
    let (src, dst, dir) = prepare_from(cluster, "par", PARALLEL_SLOW_INDEX, &[]);
    let mut d = cluster.client(&dst);
    let (defs_before, _) = schema_of(&mut d);
    d.batch_execute(&format!("ALTER DATABASE {dst} SET steep_test.slow_index = on")).unwrap();
    let id = start_paused_apply(&mut d, &dir, "0", "");
    // The builder: one of the job's processes building an index of par with a parallel worker of its own,
    // seen at it twice 500 ms apart (par_v, then: par_pkey takes no time).
    let building = |d: &mut postgres::Client| -> Option<(i32, u32)> {
        d.query_opt(
            "SELECT p.pid, p.index_relid FROM pg_stat_progress_create_index p \
             JOIN pg_stat_activity a ON a.leader_pid = p.pid AND a.backend_type = 'parallel worker' \
             WHERE p.pid = ANY((SELECT worker_pids FROM steep_repl.snapshot_progress($1))::int[]) \
             AND p.relid = 'par'::regclass LIMIT 1",
            &[&id],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
    };
    let (mut seen, mut since) = (None, std::time::Instant::now());
    let parallel = poll_until(|| {
        let now = building(&mut d);
        if now != seen {
            (seen, since) = (now, std::time::Instant::now());
        }
        seen.is_some() && since.elapsed() >= std::time::Duration::from_millis(500)
    });
    assert!(parallel, "par_v is built by a job process with a parallel worker");
    assert!(d.query_one("SELECT steep_repl.cancel_snapshot($1)", &[&id]).unwrap().get::<_, bool>(0));
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(building(&mut d), seen, "the build of par_v goes on after the cancel, in the same process");
    let (status, error) = wait_for(&mut d, &id, 120);
    assert_eq!(status, "cancelled", "{error:?}");
    let (defs_after, _) = schema_of(&mut d);
    assert_eq!(defs_before, defs_after, "every index is there as it was");
    assert_eq!(pending_records(&mut d, &id), 0);
    assert_same_rows(cluster, &src, &dst, &dir);
    d.batch_execute(&format!("ALTER DATABASE {dst} RESET steep_test.slow_index")).unwrap();
}

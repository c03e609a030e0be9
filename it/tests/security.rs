//! Security (issue 17): no role reaches the extension owner's rights through its search path, and no role
//! reads row data it may not SELECT through steep_repl's errors, notifications or progress.

use std::time::Duration;

use steep_repl_testkit as harness;

use harness::postgres::fallible_iterator::FallibleIterator;
use harness::*;

/// A schema of traps for a role's search path: every name the bookkeeping statements use unqualified
/// (now(), =, coalesce's operands, ::jsonb, pg_postmaster_start_time) is shadowed by one that makes its
/// caller superuser, and logs that it ran.
fn plant_traps(c: &mut postgres::Client, schema: &str, victim: &str) {
    c.batch_execute(&format!(
        r#"
        CREATE SCHEMA {schema};
        CREATE TABLE {schema}.ran (at timestamptz DEFAULT clock_timestamp(), what text);
        GRANT ALL ON {schema}.ran TO PUBLIC;
        CREATE FUNCTION {schema}.escalate(what text) RETURNS boolean LANGUAGE plpgsql AS $f$
        BEGIN
            INSERT INTO {schema}.ran (what) VALUES (what);
            BEGIN
                EXECUTE 'ALTER ROLE {victim} SUPERUSER';
            EXCEPTION WHEN OTHERS THEN
                NULL;
            END;
            RETURN true;
        END $f$;
        CREATE FUNCTION {schema}.now() RETURNS timestamptz LANGUAGE plpgsql AS $f$
        BEGIN PERFORM {schema}.escalate('now'); RETURN pg_catalog.now(); END $f$;
        CREATE FUNCTION {schema}.pg_postmaster_start_time() RETURNS timestamptz LANGUAGE plpgsql AS $f$
        BEGIN PERFORM {schema}.escalate('pg_postmaster_start_time'); RETURN pg_catalog.pg_postmaster_start_time(); END $f$;
        CREATE FUNCTION {schema}.texteq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $f$
        BEGIN PERFORM {schema}.escalate('='); RETURN a OPERATOR(pg_catalog.=) b; END $f$;
        CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.texteq);
        CREATE DOMAIN {schema}.jsonb AS pg_catalog.text CHECK ({schema}.escalate('jsonb'));
        GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO PUBLIC;
        "#
    ))
    .unwrap_or_else(|e| panic!("planting traps: {}", db_message(&e)));
}

fn is_superuser(c: &mut postgres::Client, role: &str) -> bool {
    c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role]).unwrap().get(0)
}

fn traps_sprung(c: &mut postgres::Client, schema: &str) -> Vec<String> {
    c.query(&format!("SELECT what FROM {schema}.ran ORDER BY at"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A login role with a password-less connection (trust auth) to the test cluster.
fn role_client(cluster: &Cluster, db: &str, role: &str) -> postgres::Client {
    let conninfo = cluster.conninfo_for(db).replace("user=postgres", &format!("user={role}"));
    postgres::Client::connect(&conninfo, postgres::NoTls)
        .unwrap_or_else(|e| panic!("connecting as {role}: {e}"))
}

#[test]
fn a_role_cannot_become_superuser_through_start_apply() {
    let cluster = preloaded();
    cluster.fresh_db("sec_apply_src", true);
    let mut s = cluster.client("sec_apply_src");
    s.batch_execute(
        "CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g",
    )
    .unwrap();
    let dir = snapshot_path("sec_apply");
    let gid = start_snapshot(&mut s, &[], &dir, ", parallel => 1");
    assert_eq!(wait_for(&mut s, &gid, 60).0, "complete");

    cluster.fresh_db("sec_apply_dst", true);
    let mut admin = cluster.client("sec_apply_dst");
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS mallory; CREATE ROLE mallory LOGIN; GRANT pg_read_server_files TO mallory; \
             CREATE TABLE t (id int, v text); GRANT INSERT, SELECT ON t TO mallory; GRANT CREATE ON DATABASE sec_apply_dst TO mallory",
        )
        .unwrap();
    let mut m = role_client(cluster, "sec_apply_dst", "mallory");
    plant_traps(&mut m, "evil", "mallory");
    admin.batch_execute("ALTER ROLE mallory SET search_path = evil, pg_catalog").unwrap();
    // The role setting applies to new sessions, and to the job's workers, which connect as mallory.
    let mut m = role_client(cluster, "sec_apply_dst", "mallory");
    let id: String = m
        .query_one(&format!("SELECT steep_repl.start_apply('{}', parallel => 2)", dir.display()), &[])
        .unwrap_or_else(|e| panic!("start_apply: {}", db_message(&e)))
        .get(0);
    let (status, error) = wait_for(&mut m, &id, 60);
    // Also every function mallory may call that touches bookkeeping rows as the owner.
    for sql in [
        format!("SELECT * FROM steep_repl.snapshot_progress('{id}')"),
        "SELECT * FROM steep_repl.list_operations()".to_string(),
        format!("SELECT steep_repl.cancel_snapshot('{id}')"),
        format!("SELECT steep_repl.operation_error('{id}')"),
        "SELECT * FROM steep_repl.health()".to_string(),
    ] {
        m.batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e)));
    }
    admin.batch_execute("ALTER ROLE mallory RESET search_path").unwrap();
    assert!(!is_superuser(&mut admin, "mallory"), "mallory became superuser");
    assert_eq!(traps_sprung(&mut admin, "evil"), Vec::<String>::new(), "a trap ran");
    assert_eq!(status, "applied", "{error:?}");
    let n: i64 = admin.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 500);
}

#[test]
fn reaping_interrupted_jobs_runs_none_of_the_callers_functions() {
    let cluster = preloaded();
    cluster.fresh_db("sec_reap", true);
    let mut admin = cluster.client("sec_reap");
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS eve; CREATE ROLE eve LOGIN; CREATE SCHEMA eve AUTHORIZATION eve; \
             GRANT CREATE ON DATABASE sec_reap TO eve",
        )
        .unwrap();
    let mut e = role_client(cluster, "sec_reap", "eve");
    plant_traps(&mut e, "eve_traps", "eve");
    // Rows that look like jobs interrupted by a restart: reaping them runs as the extension owner.
    admin
        .batch_execute(
            "INSERT INTO steep_repl.snapshots (id, op, status, path, parallel_requested, postmaster_start) VALUES \
             ('gen-00000000000000a1', 'generate', 'running', '/tmp/x', 1, '2000-01-01'), \
             ('app-00000000000000a2', 'apply', 'pending', '/tmp/y', 1, '2000-01-01'), \
             ('gen-00000000000000a3', 'generate', 'running', '/tmp/z', 1, '2000-01-01'); \
             INSERT INTO steep_repl.work_queue (snapshot_id, op, status) VALUES \
             ('gen-00000000000000a1', 'generate', 'running'), ('app-00000000000000a2', 'apply', 'pending')",
        )
        .unwrap();
    e.batch_execute("SET search_path = eve_traps, pg_catalog").unwrap();
    e.batch_execute("SELECT * FROM steep_repl.list_operations()").unwrap();
    let r =
        e.query_one("SELECT status FROM steep_repl.wait_snapshot('gen-00000000000000a3', 5)", &[]).unwrap();
    assert_eq!(r.get::<_, String>(0), "failed");
    e.batch_execute("SELECT * FROM steep_repl.snapshot_progress('app-00000000000000a2')").unwrap();
    assert!(!is_superuser(&mut admin, "eve"), "eve became superuser");
    assert_eq!(traps_sprung(&mut admin, "eve_traps"), Vec::<String>::new(), "a trap ran");
    let left: i64 = admin
        .query_one("SELECT count(*) FROM steep_repl.snapshots WHERE status IN ('pending', 'running')", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the interrupted rows were reaped");
}

#[test]
fn row_data_in_errors_is_shown_only_to_the_jobs_role() {
    let cluster = preloaded();
    cluster.fresh_db("sec_leak_src", true);
    let mut s = cluster.client("sec_leak_src");
    // The source has no unique constraint; the target does, so the load fails on a duplicate key.
    s.batch_execute(
        "CREATE TABLE people (id int, ssn text); \
         INSERT INTO people SELECT g, 'ssn-' || g FROM generate_series(1, 2000) g; \
         INSERT INTO people VALUES (9999, '123-45-6789'), (10000, '123-45-6789')",
    )
    .unwrap();
    let dir = snapshot_path("sec_leak");
    let gid = start_snapshot(&mut s, &[], &dir, ", parallel => 1");
    assert_eq!(wait_for(&mut s, &gid, 60).0, "complete");

    cluster.fresh_db("sec_leak_dst", true);
    let mut admin = cluster.client("sec_leak_dst");
    admin
        .batch_execute(
            "CREATE TABLE people (id int, ssn text UNIQUE); DROP ROLE IF EXISTS bob; CREATE ROLE bob LOGIN",
        )
        .unwrap();
    let mut bob = role_client(cluster, "sec_leak_dst", "bob");
    bob.batch_execute("LISTEN steep_repl_progress").unwrap();
    let id: String = admin
        .query_one(&format!("SELECT steep_repl.start_apply('{}', parallel => 1)", dir.display()), &[])
        .unwrap()
        .get(0);
    let (status, full) = wait_for(&mut admin, &id, 60);
    assert_eq!(status, "failed");
    let full = full.unwrap_or_default();
    // The job's role (here a superuser) sees the detail, as PostgreSQL gave it.
    assert!(full.contains("123-45-6789"), "{full}");
    assert!(full.contains("people_ssn_key"), "{full}");

    // Bob may not SELECT from people: nothing he can read holds the key.
    let public: String =
        bob.query_one("SELECT error FROM steep_repl.snapshots WHERE id = $1", &[&id]).unwrap().get(0);
    assert!(!public.contains("123-45"), "{public}");
    assert!(public.contains("unique_violation") && public.contains("people"), "{public}");
    let via_wait: Option<String> =
        bob.query_one("SELECT error FROM steep_repl.wait_snapshot($1, 5)", &[&id]).unwrap().get(0);
    assert!(!via_wait.unwrap_or_default().contains("123-45"));
    let via_fn: Option<String> =
        bob.query_one("SELECT steep_repl.operation_error($1)", &[&id]).unwrap().get(0);
    assert!(!via_fn.unwrap_or_default().contains("123-45"));
    let via_progress: Option<String> =
        bob.query_one("SELECT error FROM steep_repl.snapshot_progress($1)", &[&id]).unwrap().get(0);
    assert!(!via_progress.unwrap_or_default().contains("123-45"));
    let denied = bob.query("SELECT * FROM steep_repl.operation_errors", &[]);
    assert!(denied.is_err(), "the full errors table is readable by PUBLIC");
    let mut payloads = Vec::new();
    for n in bob.notifications().timeout_iter(Duration::from_millis(500)).iterator() {
        payloads.push(n.unwrap().payload().to_string());
    }
    assert!(payloads.iter().any(|p| p.contains(&id)), "no notification reached bob: {payloads:?}");
    for p in &payloads {
        assert!(!p.contains("123-45"), "a NOTIFY payload holds row data: {p}");
    }
    // The full text is for the job's role and its members.
    let owner_view: Option<String> =
        admin.query_one("SELECT steep_repl.operation_error($1)", &[&id]).unwrap().get(0);
    assert!(owner_view.unwrap_or_default().contains("123-45-6789"));
}

#[test]
fn a_superusers_apply_runs_the_table_owners_code_as_the_owner() {
    let cluster = preloaded();
    cluster.fresh_db("sec_owner_src", true);
    let mut s = cluster.client("sec_owner_src");
    s.batch_execute(
        "CREATE SCHEMA m; CREATE TABLE m.t (x int); INSERT INTO m.t SELECT generate_series(1, 100)",
    )
    .unwrap();
    let dir = snapshot_path("sec_owner");
    let gid = start_snapshot(&mut s, &[], &dir, "");
    assert_eq!(wait_for(&mut s, &gid, 60).0, "complete");

    cluster.fresh_db("sec_owner_dst", true);
    let mut admin = cluster.client("sec_owner_dst");
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS owner_mal; CREATE ROLE owner_mal LOGIN; \
             CREATE SCHEMA m AUTHORIZATION owner_mal; CREATE TABLE ran_as (who text); GRANT INSERT ON ran_as TO PUBLIC",
        )
        .unwrap();
    let mut o = role_client(cluster, "sec_owner_dst", "owner_mal");
    // A CHECK constraint calling the owner's function: it makes whoever runs it superuser if it can.
    o.batch_execute(
        "CREATE FUNCTION m.pwn(int) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $f$ BEGIN \
           INSERT INTO public.ran_as VALUES (current_user); \
           IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN \
             EXECUTE 'ALTER ROLE owner_mal SUPERUSER'; END IF; RETURN true; END $f$; \
         CREATE TABLE m.t (x int CHECK (m.pwn(x)))",
    )
    .unwrap();
    let id: String = admin
        .query_one(&format!("SELECT steep_repl.start_apply('{}', truncate => true)", dir.display()), &[])
        .unwrap()
        .get(0);
    let (status, error) = wait_for(&mut admin, &id, 60);
    assert_eq!(status, "applied", "{error:?}");
    assert!(!is_superuser(&mut admin, "owner_mal"), "the table owner became superuser");
    let who: Vec<String> =
        admin.query("SELECT DISTINCT who FROM ran_as", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(who, vec!["owner_mal".to_string()], "the CHECK ran as someone else than the table's owner");
    let n: i64 = admin.query_one("SELECT count(*) FROM m.t", &[]).unwrap().get(0);
    assert_eq!(n, 100);
}

#[test]
fn a_snapshot_never_holds_rows_its_role_may_not_see() {
    let cluster = preloaded();
    cluster.fresh_db("sec_rls", true);
    let mut admin = cluster.client("sec_rls");
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS rls_reader; CREATE ROLE rls_reader LOGIN; GRANT pg_write_server_files TO rls_reader; \
             CREATE TABLE accounts (owner text, ssn text); \
             INSERT INTO accounts VALUES ('rls_reader', '111'), ('victim', '222-22-2222'); \
             ALTER TABLE accounts ENABLE ROW LEVEL SECURITY; \
             CREATE POLICY own ON accounts USING (owner = current_user); GRANT SELECT ON accounts TO rls_reader; \
             CREATE SCHEMA hid; CREATE TABLE hid.t (v text); INSERT INTO hid.t VALUES ('hidden-secret'); \
             GRANT SELECT ON hid.t TO rls_reader",
        )
        .unwrap();
    let mut r = role_client(cluster, "sec_rls", "rls_reader");
    for (table, expect) in [("public.accounts", "row-level security"), ("hid.t", "USAGE")] {
        let dir = snapshot_path(&format!("sec_rls_{}", table.replace('.', "_")));
        let e = r
            .query_one(
                &format!("SELECT steep_repl.start_snapshot('{}', tables => ARRAY['{table}'])", dir.display()),
                &[],
            )
            .map(|_| ())
            .map_err(|e| db_message(&e))
            .expect_err("the snapshot must be refused");
        assert!(e.contains(expect), "{e}");
        assert!(!dir.join("data").exists());
    }
}

#[test]
fn values_named_by_a_failed_load_stay_private() {
    let cluster = preloaded();
    cluster.fresh_db("sec_regclass_src", true);
    let mut s = cluster.client("sec_regclass_src");
    s.batch_execute(
        "CREATE SCHEMA s; CREATE TABLE s.secret_named_relation_4242 (); CREATE TABLE s.r (x regclass); \
         INSERT INTO s.r VALUES ('s.secret_named_relation_4242')",
    )
    .unwrap();
    let dir = snapshot_path("sec_regclass");
    let gid = start_snapshot(&mut s, &[], &dir, ", tables => ARRAY['s.r']");
    assert_eq!(wait_for(&mut s, &gid, 60).0, "complete");
    cluster.fresh_db("sec_regclass_dst", true);
    let mut admin = cluster.client("sec_regclass_dst");
    admin
        .batch_execute("CREATE SCHEMA s; CREATE TABLE s.r (x regclass); DROP ROLE IF EXISTS peeker; CREATE ROLE peeker LOGIN")
        .unwrap();
    let id: String =
        admin.query_one(&format!("SELECT steep_repl.start_apply('{}')", dir.display()), &[]).unwrap().get(0);
    let (status, full) = wait_for(&mut admin, &id, 60);
    assert_eq!(status, "failed");
    assert!(full.unwrap_or_default().contains("secret_named_relation_4242"));
    let mut p = role_client(cluster, "sec_regclass_dst", "peeker");
    for sql in [
        "SELECT error FROM steep_repl.snapshots WHERE id = $1",
        "SELECT steep_repl.operation_error($1)",
        "SELECT error FROM steep_repl.snapshot_progress($1)",
    ] {
        let e: Option<String> = p.query_one(sql, &[&id]).unwrap().get(0);
        let e = e.unwrap_or_default();
        assert!(!e.contains("4242"), "{sql}: {e}");
        assert!(e.contains("undefined_table"), "{sql}: {e}");
    }
    let last: Option<String> = p.query_one("SELECT last_error FROM steep_repl.health()", &[]).unwrap().get(0);
    assert!(!last.unwrap_or_default().contains("4242"));
}

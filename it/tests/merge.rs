//! Merging two diverged clusters (issue 15, PRODUCT.md §10 second part): for each conflict strategy the
//! two nodes end with the union of their rows, each conflicting row holding the value its strategy
//! chose, every action audited once on the node it changed; a second merge does nothing; a dry run
//! changes no row; other roles are refused.

use steep_repl_testkit as harness;

use harness::*;

/// A parent and a child along a foreign key, a composite key and a text key.
const SCHEMA: &str = r#"
CREATE SCHEMA app;
CREATE TABLE app.parent (id int PRIMARY KEY, name text, updated_at timestamptz);
CREATE TABLE app.child (id int PRIMARY KEY, parent_id int REFERENCES app.parent, v text);
CREATE TABLE app.comp (a int, b text, v text, updated_at timestamptz, PRIMARY KEY (a, b));
CREATE TABLE app.texts (k text COLLATE "C" PRIMARY KEY, v text, updated_at timestamptz);
"#;

/// What both nodes hold before they diverge.
const COMMON: &str = r#"
INSERT INTO app.parent SELECT g, 'p' || g, timestamptz '2024-01-01 00:00:00+00' FROM generate_series(1, 200) g;
INSERT INTO app.child SELECT g, 1 + g % 200, 'c' || g FROM generate_series(1, 400) g;
INSERT INTO app.comp SELECT g % 10, 'b' || g, 'v' || g, timestamptz '2024-01-01 00:00:00+00' FROM generate_series(1, 100) g;
INSERT INTO app.texts SELECT 'k' || g, 'v' || g, timestamptz '2024-01-01 00:00:00+00' FROM generate_series(1, 100) g;
INSERT INTO app.texts VALUES (E'tab\there', 'x', timestamptz '2024-01-01 00:00:00+00');
"#;

/// Changes on this node: one-sided rows (a parent with its child), and conflicts, of which the local
/// side is newer for ids 1, 3 and the peer newer for ids 2, 4 (see PEER).
const LOCAL: &str = r#"
INSERT INTO app.parent VALUES (1000, 'local only', now());
INSERT INTO app.child VALUES (1000, 1000, 'local child');
UPDATE app.parent SET name = 'L1', updated_at = '2024-06-01 00:00:00+00' WHERE id = 1;
UPDATE app.parent SET name = 'L2', updated_at = '2024-02-01 00:00:00+00' WHERE id = 2;
UPDATE app.comp SET v = 'L', updated_at = '2024-06-01 00:00:00+00' WHERE a = 3 AND b = 'b3';
UPDATE app.texts SET v = 'L', updated_at = '2024-02-01 00:00:00+00' WHERE k = E'tab\there';
"#;

const PEER: &str = r#"
INSERT INTO app.parent VALUES (2000, 'peer only', now());
INSERT INTO app.child VALUES (2000, 2000, 'peer child'), (2001, 5, E'peer\nchild');
INSERT INTO app.comp VALUES (7, 'peer', 'only', now());
UPDATE app.parent SET name = 'P1', updated_at = '2024-03-01 00:00:00+00' WHERE id = 1;
UPDATE app.parent SET name = 'P2', updated_at = '2024-07-01 00:00:00+00' WHERE id = 2;
UPDATE app.comp SET v = 'P', updated_at = '2024-03-01 00:00:00+00' WHERE a = 3 AND b = 'b3';
UPDATE app.texts SET v = 'P', updated_at = '2024-07-01 00:00:00+00' WHERE k = E'tab\there';
"#;

/// One-sided rows: 2 on this node, 4 on the peer; conflicts: 4.
const LOCAL_ONLY: i64 = 2;
const PEER_ONLY: i64 = 4;
const CONFLICTS: i64 = 4;

/// The conflicting rows' chosen values (parent 1, parent 2, comp (3, b3), texts tab) per strategy.
fn chosen(strategy: &str) -> [&'static str; 4] {
    match strategy {
        "prefer-local" => ["L1", "L2", "L", "L"],
        "prefer-remote" => ["P1", "P2", "P", "P"],
        _ => ["L1", "P2", "L", "P"], // last-modified:updated_at
    }
}

fn values(c: &mut postgres::Client) -> [String; 4] {
    let one = |c: &mut postgres::Client, sql: &str| -> String { c.query_one(sql, &[]).unwrap().get(0) };
    [
        one(c, "SELECT name FROM app.parent WHERE id = 1"),
        one(c, "SELECT name FROM app.parent WHERE id = 2"),
        one(c, "SELECT v FROM app.comp WHERE a = 3 AND b = 'b3'"),
        one(c, "SELECT v FROM app.texts WHERE k = E'tab\\there'"),
    ]
}

/// Every row of the four tables, as text in UTC, in key order (an md5 of it: short to show).
fn contents(c: &mut postgres::Client) -> String {
    c.batch_execute("SET TimeZone = 'UTC'").unwrap();
    c.query_one(
        "SELECT md5(concat_ws('|', (SELECT string_agg(t::text, ',' ORDER BY id) FROM app.parent t), \
         (SELECT string_agg(t::text, ',' ORDER BY id) FROM app.child t), \
         (SELECT string_agg(t::text, ',' ORDER BY a, b) FROM app.comp t), \
         (SELECT string_agg(t::text, ',' ORDER BY k) FROM app.texts t)))",
        &[],
    )
    .unwrap()
    .get(0)
}

fn audit_count(c: &mut postgres::Client, id: &str) -> i64 {
    c.query_one("SELECT count(*) FROM steep_repl.merge_audit WHERE merge_id = $1", &[&id]).unwrap().get(0)
}

/// Runs start_merge to its end; returns the id.
fn merge(c: &mut postgres::Client, peer: &str, strategy: &str, dry_run: bool) -> String {
    let id: String = c
        .query_one(
            "SELECT steep_repl.start_merge($1, strategy => $2, dry_run => $3, parallel => 2)",
            &[&peer, &strategy, &dry_run],
        )
        .unwrap_or_else(|e| panic!("start_merge: {}", db_message(&e)))
        .get(0);
    let (status, error) = wait_for(c, &id, 120);
    assert_eq!(status, "complete", "{error:?}");
    id
}

/// (node, action) → rows, from merge_result.
fn plan(c: &mut postgres::Client, id: &str) -> Vec<(String, String, String, i64)> {
    c.query("SELECT table_name, node, action, rows FROM steep_repl.merge_result($1) WHERE rows > 0", &[&id])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// (conflict, local_only, peer_only) summed over the tables analyze_overlap compares.
fn differences(c: &mut postgres::Client, peer: &str) -> (i64, i64, i64) {
    let r = c
        .query_one(
            "SELECT sum(conflict)::int8, sum(local_only)::int8, sum(peer_only)::int8 FROM steep_repl.analyze_overlap($1) \
             WHERE status = 'compared'",
            &[&peer],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn diverged(local: &Cluster, peer: &Cluster, db: &str) -> (postgres::Client, postgres::Client, String) {
    local.fresh_db(db, true);
    peer.fresh_db(db, true);
    let mut l = local.client(db);
    let mut p = peer.client(db);
    for (c, changes) in [(&mut l, LOCAL), (&mut p, PEER)] {
        c.batch_execute(&format!("{SCHEMA} {COMMON} {changes}")).unwrap();
    }
    let conninfo = peer.conninfo_for(db);
    (l, p, conninfo)
}

#[test]
fn each_strategy_merges_to_the_union_audited_once() {
    let local = preloaded();
    let peer = dedicated_with("merge_peer", "timezone = 'Asia/Tokyo'\n");
    for (n, strategy) in ["prefer-local", "prefer-remote", "last-modified:updated_at"].into_iter().enumerate()
    {
        let (mut l, mut p, conninfo) = diverged(local, &peer, &format!("mrg{n}"));
        assert_eq!(differences(&mut l, &conninfo), (CONFLICTS, LOCAL_ONLY, PEER_ONLY));

        let id = merge(&mut l, &conninfo, strategy, false);
        assert_eq!(differences(&mut l, &conninfo), (0, 0, 0), "{strategy}: only matches after the merge");
        assert_eq!(values(&mut l), chosen(strategy).map(String::from), "{strategy}: local values");
        assert_eq!(values(&mut p), chosen(strategy).map(String::from), "{strategy}: peer values");
        assert_eq!(contents(&mut l), contents(&mut p), "{strategy}: both nodes hold the same rows");
        // One audit row per action, on the node it changed.
        let (la, pa) = (audit_count(&mut l, &id), audit_count(&mut p, &id));
        assert_eq!(la + pa, LOCAL_ONLY + PEER_ONLY + CONFLICTS, "{strategy}: {la} + {pa} audit rows");
        let inserted_here: i64 = l
            .query_one(
                "SELECT count(*) FROM steep_repl.merge_audit WHERE merge_id = $1 AND action = 'insert' \
                 AND category = 'peer_only' AND old_row IS NULL AND new_row IS NOT NULL",
                &[&id],
            )
            .unwrap()
            .get(0);
        assert_eq!(inserted_here, PEER_ONLY);
        // The parents' conflicts were settled on whichever node lost them, with the old and new row.
        let mut updated: Vec<(String, String, String)> = Vec::new();
        for c in [&mut l, &mut p] {
            let rows = c
                .query(
                    "SELECT old_row->>'name', new_row->>'name', decided_by FROM steep_repl.merge_audit \
                     WHERE merge_id = $1 AND table_name = 'parent' AND action = 'update' AND category = 'conflict'",
                    &[&id],
                )
                .unwrap();
            updated.extend(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))));
        }
        assert_eq!(updated.len(), 2, "{updated:?}");
        for (old, new, by) in &updated {
            assert_ne!(old, new);
            assert_eq!(by, strategy);
        }
        // The merge's plan says what was done.
        let total: i64 = plan(&mut l, &id).iter().map(|r| r.3).sum();
        assert_eq!(total, LOCAL_ONLY + PEER_ONLY + CONFLICTS, "{:?}", plan(&mut l, &id));
        // The writes ran under the replication origin steep_merge.
        let origin: i64 = l
            .query_one("SELECT count(*) FROM pg_replication_origin WHERE roname = 'steep_merge'", &[])
            .unwrap()
            .get(0);
        assert_eq!(origin, 1);

        // A second merge finds nothing to do.
        let again = merge(&mut l, &conninfo, strategy, false);
        assert!(plan(&mut l, &again).is_empty(), "{:?}", plan(&mut l, &again));
        assert_eq!(audit_count(&mut l, &again) + audit_count(&mut p, &again), 0);
    }
}

#[test]
fn manual_parks_conflicts_and_merges_the_rest() {
    let local = preloaded();
    let peer = dedicated_with("merge_manual", "");
    let (mut l, mut p, conninfo) = diverged(local, &peer, "mrg_manual");
    let before_local = values(&mut l);
    let before_peer = values(&mut p);
    let id = merge(&mut l, &conninfo, "manual", false);
    // One-sided rows merged, conflicts untouched on both nodes and parked here with both rows.
    assert_eq!(differences(&mut l, &conninfo), (CONFLICTS, 0, 0));
    assert_eq!(values(&mut l), before_local);
    assert_eq!(values(&mut p), before_peer);
    let parked: Vec<(String, String, String)> = l
        .query(
            "SELECT table_name, local_row->>'name', peer_row->>'name' FROM steep_repl.merge_conflicts \
             WHERE merge_id = $1 AND resolved IS NULL ORDER BY table_name, key::text",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get::<_, Option<String>>(1).unwrap_or_default(),
                r.get::<_, Option<String>>(2).unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(parked.len() as i64, CONFLICTS, "{parked:?}");
    assert!(parked.contains(&("parent".into(), "L1".into(), "P1".into())), "{parked:?}");
    assert_eq!(audit_count(&mut l, &id) + audit_count(&mut p, &id), LOCAL_ONLY + PEER_ONLY);

    // A person settles two: parent 1 takes the peer's row here, parent 2 this node's row on the peer.
    let resolve = |c: &mut postgres::Client, key: &str, side: &str| -> bool {
        c.query_one(
            "SELECT steep_repl.resolve_merge_conflict($1, 'app', 'parent', $2::text::jsonb, $3, $4)",
            &[&id, &key, &side, &conninfo],
        )
        .unwrap_or_else(|e| panic!("resolve {key} {side}: {}", db_message(&e)))
        .get(0)
    };
    assert!(resolve(&mut l, r#"{"id": 1}"#, "peer"));
    assert!(resolve(&mut l, r#"{"id": 2}"#, "local"));
    assert!(!resolve(&mut l, r#"{"id": 2}"#, "local"), "a resolved conflict is not parked any more");
    let name = |c: &mut postgres::Client, id: i32| -> String {
        c.query_one("SELECT name FROM app.parent WHERE id = $1", &[&id]).unwrap().get(0)
    };
    assert_eq!((name(&mut l, 1), name(&mut p, 1)), ("P1".to_string(), "P1".to_string()));
    assert_eq!((name(&mut l, 2), name(&mut p, 2)), ("L2".to_string(), "L2".to_string()));
    let resolved: i64 = l
        .query_one(
            "SELECT count(*) FROM steep_repl.merge_audit WHERE merge_id = $1 AND decided_by = 'resolve'",
            &[&id],
        )
        .unwrap()
        .get(0);
    let resolved_peer: i64 = p
        .query_one(
            "SELECT count(*) FROM steep_repl.merge_audit WHERE merge_id = $1 AND decided_by = 'resolve'",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!((resolved, resolved_peer), (1, 1));
    assert_eq!(differences(&mut l, &conninfo), (CONFLICTS - 2, 0, 0));
}

#[test]
fn a_dry_run_changes_no_row_and_reports_the_plan() {
    let local = preloaded();
    let peer = dedicated_with("merge_dry", "");
    let (mut l, mut p, conninfo) = diverged(local, &peer, "mrg_dry");
    let (before_l, before_p) = (contents(&mut l), contents(&mut p));
    let id = merge(&mut l, &conninfo, "prefer-remote", true);
    assert_eq!((contents(&mut l), contents(&mut p)), (before_l, before_p));
    assert_eq!(audit_count(&mut l, &id) + audit_count(&mut p, &id), 0);
    let mut got = plan(&mut l, &id);
    got.sort();
    assert_eq!(
        got,
        vec![
            ("child".into(), "local".into(), "insert".into(), 2),
            ("child".into(), "peer".into(), "insert".into(), 1),
            ("comp".into(), "local".into(), "insert".into(), 1),
            ("comp".into(), "local".into(), "update".into(), 1),
            ("parent".into(), "local".into(), "insert".into(), 1),
            ("parent".into(), "local".into(), "update".into(), 2),
            ("parent".into(), "peer".into(), "insert".into(), 1),
            ("texts".into(), "local".into(), "update".into(), 1),
        ]
    );
    let sample: String = l
        .query_one(
            "SELECT sample_keys::text FROM steep_repl.merge_result($1) WHERE table_name = 'parent' AND node = 'peer'",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(sample, r#"[{"id": "1000"}]"#);
    // Parents come before their children.
    let order: Vec<String> = l
        .query("SELECT table_name FROM steep_repl.overlap_result($1) ORDER BY table_name", &[&id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order.len(), 4);
}

#[test]
fn only_superusers_may_merge() {
    let local = preloaded();
    local.fresh_db("mrg_rights", true);
    let mut c = local.client("mrg_rights");
    c.batch_execute(
        "DROP ROLE IF EXISTS mrg_user; CREATE ROLE mrg_user LOGIN; CREATE TABLE t (id int PRIMARY KEY, v text); \
         GRANT ALL ON t TO mrg_user; SET ROLE mrg_user",
    )
    .unwrap();
    for sql in [
        "SELECT steep_repl.start_merge('dbname=x')",
        "SELECT steep_repl.merge_rows('public', 't', ARRAY['id'], '\\x310a')",
        "SELECT steep_repl.merge_write('m', 'public', 't', ARRAY['id'], 'insert', 'peer_only', 'union', '\\x310976310a')",
    ] {
        let e = c.batch_execute(sql).expect_err(sql);
        assert!(db_message(&e).contains("permission denied"), "{sql}: {}", db_message(&e));
    }
    c.batch_execute("RESET ROLE").unwrap();
    // A bad strategy is named.
    let e = c
        .batch_execute("SELECT steep_repl.start_merge('dbname=x', strategy => 'newest')")
        .expect_err("strategy");
    assert!(db_message(&e).contains("unknown merge strategy \"newest\""), "{}", db_message(&e));
}

#[test]
fn preflight_names_colliding_sequences_and_what_replicating_both_ways_needs() {
    let local = preloaded();
    let peer = dedicated_with("merge_preflight", "");
    local.fresh_db("mrg_pre", true);
    peer.fresh_db("mrg_pre", true);
    let mut l = local.client("mrg_pre");
    let mut p = peer.client("mrg_pre");
    for c in [&mut l, &mut p] {
        c.batch_execute(
            "CREATE SEQUENCE same; SELECT nextval('same'); \
             CREATE SEQUENCE mixed INCREMENT BY 2; CREATE SEQUENCE apart MINVALUE 1 MAXVALUE 1000",
        )
        .unwrap();
    }
    // Odd here, even there: never the same value. Disjoint ranges: neither.
    l.batch_execute("ALTER SEQUENCE mixed RESTART WITH 1").unwrap();
    p.batch_execute("ALTER SEQUENCE mixed RESTART WITH 2; ALTER SEQUENCE apart MINVALUE 1001 MAXVALUE 2000 START WITH 1001 RESTART WITH 1001")
        .unwrap();
    let conninfo = peer.conninfo_for("mrg_pre");
    let problems: Vec<(String, String)> = l
        .query("SELECT node, problem FROM steep_repl.merge_preflight($1)", &[&conninfo])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let sequences: Vec<&(String, String)> =
        problems.iter().filter(|(_, p)| p.starts_with("sequence")).collect();
    assert_eq!(sequences.len(), 1, "{problems:#?}");
    assert!(
        sequences[0].1.contains("\"public\".\"same\"") && sequences[0].1.contains("INCREMENT BY 2"),
        "{sequences:?}"
    );
    // PostgreSQL 15 on both: origin = none is missing, and said so for each node.
    let version: Vec<&String> =
        problems.iter().filter(|(_, p)| p.contains("origin = none")).map(|(n, _)| n).collect();
    assert_eq!(version, vec!["local", "peer"], "{problems:#?}");
}

#[test]
fn batches_follow_each_other_in_both_directions() {
    // More keys than one batch holds, in every direction: batches of one direction overlap (one read
    // while the other node writes), and each lands whole.
    let local = preloaded();
    let peer = dedicated_with("merge_batches", "");
    local.fresh_db("mrg_many", true);
    peer.fresh_db("mrg_many", true);
    let mut l = local.client("mrg_many");
    let mut p = peer.client("mrg_many");
    for c in [&mut l, &mut p] {
        c.batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 30000) g",
        )
        .unwrap();
    }
    l.batch_execute("INSERT INTO t SELECT g, 'local' FROM generate_series(100001, 125000) g").unwrap();
    p.batch_execute(
        "INSERT INTO t SELECT g, 'peer' FROM generate_series(200001, 225000) g; UPDATE t SET v = 'P' WHERE id <= 25000",
    )
    .unwrap();
    let conninfo = peer.conninfo_for("mrg_many");
    let id = merge(&mut l, &conninfo, "prefer-remote", false);
    assert_eq!(differences(&mut l, &conninfo), (0, 0, 0));
    for c in [&mut l, &mut p] {
        let (n, changed): (i64, i64) = c
            .query_one("SELECT count(*), count(*) FILTER (WHERE v = $1) FROM t", &[&"P"])
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        assert_eq!((n, changed), (80_000, 25_000));
    }
    assert_eq!(audit_count(&mut l, &id), 25_000 + 25_000, "peer-only inserted and conflicts updated here");
    assert_eq!(audit_count(&mut p, &id), 25_000, "local-only inserted on the peer");
}

#[test]
fn a_table_owners_code_runs_as_that_owner_and_odd_columns_merge() {
    let local = preloaded();
    let peer = dedicated_with("merge_owner", "");
    for c in [local, &peer] {
        c.fresh_db("mrg_owner", true);
    }
    let mut l = local.client("mrg_owner");
    let mut p = peer.client("mrg_owner");
    // An unprivileged owner whose ENABLE ALWAYS trigger (fired even under session_replication_role =
    // replica) notes who runs it; columns named like the statements' aliases; an identity column.
    for c in [&mut l, &mut p] {
        c.batch_execute(
            "DROP ROLE IF EXISTS mrg_owner; CREATE ROLE mrg_owner; GRANT CREATE ON SCHEMA public TO mrg_owner; \
             SET ROLE mrg_owner; \
             CREATE TABLE seen (who text, super bool); \
             CREATE TABLE t (id int PRIMARY KEY, n text, o text, s text, g int GENERATED ALWAYS AS IDENTITY); \
             CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               INSERT INTO public.seen SELECT current_user, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user; \
               RETURN NEW; END $$; \
             CREATE TRIGGER note BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION note(); \
             ALTER TABLE t ENABLE ALWAYS TRIGGER note; \
             INSERT INTO t (id, n, o, s) SELECT g, 'n', 'o', 's' FROM generate_series(1, 10) g; \
             RESET ROLE; TRUNCATE seen",
        )
        .unwrap();
    }
    l.batch_execute(
        "INSERT INTO t (id, n, o, s) VALUES (100, 'here', 'only', 'x'); UPDATE t SET n = 'L' WHERE id = 1",
    )
    .unwrap();
    p.batch_execute(
        "INSERT INTO t (id, n, o, s) VALUES (200, 'peer', 'only', 'y'); UPDATE t SET o = 'P' WHERE id = 2",
    )
    .unwrap();
    l.batch_execute("TRUNCATE seen").unwrap();
    p.batch_execute("TRUNCATE seen").unwrap();
    let conninfo = peer.conninfo_for("mrg_owner");
    let id = merge(&mut l, &conninfo, "prefer-local", false);
    assert_eq!(differences(&mut l, &conninfo), (0, 0, 0));
    for c in [&mut l, &mut p] {
        let seen: Vec<(String, bool)> = c
            .query("SELECT DISTINCT who, super FROM seen", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(seen, vec![("mrg_owner".to_string(), false)], "the trigger ran as the table's owner only");
        // The audit keeps whole rows, not a column that happens to share an alias's name.
        let rows: Vec<String> = c
            .query("SELECT new_row::text FROM steep_repl.merge_audit WHERE merge_id = $1", &[&id])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            !rows.is_empty() && rows.iter().all(|r| r.contains("\"id\"") && r.contains("\"g\"")),
            "{rows:?}"
        );
    }
    let row: (String, String) =
        p.query_one("SELECT n, o FROM t WHERE id = 2", &[]).map(|r| (r.get(0), r.get(1))).unwrap();
    assert_eq!(row, ("n".to_string(), "o".to_string()), "prefer-local: the local row wins on the peer");

    // A write that fails leaves this session without the merge's replication origin.
    let e = l
        .batch_execute(
            "SELECT steep_repl.merge_write('m', 'public', 't', ARRAY['id'], 'insert', 'peer_only', 'union', \
             convert_to(E'not a number\\tx\\ty\\tz\\t1\\n', 'UTF8'))",
        )
        .expect_err("a bad row");
    assert!(db_message(&e).contains("invalid input syntax"), "{}", db_message(&e));
    let held: bool = l.query_one("SELECT pg_replication_origin_session_is_setup()", &[]).unwrap().get(0);
    assert!(!held, "the origin is released when the write's transaction aborts");
}

#[test]
fn a_merge_under_concurrent_writes_converges_once_writes_stop() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let local = preloaded();
    let peer = dedicated_with("merge_writes", "");
    let (mut l, mut p, conninfo) = diverged(local, &peer, "mrg_writes");
    // Writers on both nodes, each in its own key range of app.parent and updating app.texts, during the
    // merge.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = |conninfo: String, base: i32, stop: Arc<AtomicBool>| {
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                c.batch_execute(&format!(
                    "INSERT INTO app.parent VALUES ({}, 'w', now()); UPDATE app.texts SET v = 'w{i}' WHERE k = 'k{}'",
                    base + i,
                    i % 50 + 1
                ))
                .unwrap();
            }
            i
        })
    };
    let wl = writer(local.conninfo_for("mrg_writes"), 10_000, stop.clone());
    let wp = writer(peer.conninfo_for("mrg_writes"), 20_000, stop.clone());
    merge(&mut l, &conninfo, "prefer-local", false);
    stop.store(true, Ordering::Relaxed);
    let (nl, np) = (wl.join().unwrap(), wp.join().unwrap());
    assert!(nl > 0 && np > 0, "both writers ran during the merge");
    // Writes stopped: one more merge brings both nodes to the same rows.
    merge(&mut l, &conninfo, "prefer-local", false);
    assert_eq!(differences(&mut l, &conninfo), (0, 0, 0));
    assert_eq!(contents(&mut l), contents(&mut p));
    let parents: i64 = l.query_one("SELECT count(*) FROM app.parent", &[]).unwrap().get(0);
    assert_eq!(parents, 200 + 2 + i64::from(nl) + i64::from(np), "every writer's row, once");
}

#[test]
fn last_modified_keeps_a_row_that_became_newer_since_the_decision() {
    let local = preloaded();
    local.fresh_db("mrg_guard", true);
    let mut c = local.client("mrg_guard");
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text, at timestamptz); \
         INSERT INTO t VALUES (1, 'now', '2024-06-01 00:00:00+00'), (2, 'old', '2024-01-01 00:00:00+00')",
    )
    .unwrap();
    // Rows decided as winners at 2024-03-01: row 1 has been changed since (June), row 2 not.
    let rows = "1\\twinner\\t2024-03-01 00:00:00+00\\n2\\twinner\\t2024-03-01 00:00:00+00\\n";
    let n: i64 = c
        .query_one(
            &format!(
                "SELECT steep_repl.merge_write('m', 'public', 't', ARRAY['id'], 'update', 'conflict', \
                 'last-modified:at', convert_to(E'{rows}', 'UTF8'))"
            ),
            &[],
        )
        .unwrap_or_else(|e| panic!("{}", db_message(&e)))
        .get(0);
    assert_eq!(n, 1);
    let v: Vec<String> =
        c.query("SELECT v FROM t ORDER BY id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(v, vec!["now", "winner"]);
    let e = c
        .batch_execute(&format!(
            "SELECT steep_repl.merge_write('m', 'public', 't', ARRAY['id'], 'update', 'conflict', \
             'last-modified:nope', convert_to(E'{rows}', 'UTF8'))"
        ))
        .expect_err("unknown column");
    assert!(db_message(&e).contains("has no column nope"), "{}", db_message(&e));
}

#[test]
fn a_row_breaking_another_unique_constraint_fails_the_merge_and_what_was_done_stays_recorded() {
    let local = preloaded();
    let peer = dedicated_with("merge_unique", "");
    for c in [local, &peer] {
        c.fresh_db("mrg_unique", true);
    }
    let mut l = local.client("mrg_unique");
    let mut p = peer.client("mrg_unique");
    // Only this node has the unique email: the peer's extra row repeats a shared row's email.
    l.batch_execute(
        "CREATE TABLE u (id int PRIMARY KEY, email text UNIQUE); INSERT INTO u VALUES (1, 'a'), (2, 'b'), (10, 'x')",
    )
    .unwrap();
    p.batch_execute(
        "CREATE TABLE u (id int PRIMARY KEY, email text); INSERT INTO u VALUES (1, 'a'), (2, 'b'), (20, 'a')",
    )
    .unwrap();
    let conninfo = peer.conninfo_for("mrg_unique");
    let id: String = l
        .query_one("SELECT steep_repl.start_merge($1, strategy => 'prefer-local')", &[&conninfo])
        .unwrap()
        .get(0);
    let (status, error) = wait_for(&mut l, &id, 120);
    assert_eq!(status, "failed", "{error:?}");
    // The job's role reads the whole message; the operation's row, which every role reads, only its kind.
    assert!(error.as_deref().unwrap_or_default().contains("u_email_key"), "{error:?}");
    let public: String =
        l.query_one("SELECT error FROM steep_repl.snapshots WHERE id = $1", &[&id]).unwrap().get(0);
    assert!(public.contains("unique_violation") && !public.contains("(email)"), "{public}");
    // The row this node had alone reached the peer before, and merge_result says so; nothing vanished.
    let done: Vec<(String, String, i64)> = l
        .query("SELECT node, action, rows FROM steep_repl.merge_result($1)", &[&id])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(done, vec![("peer".to_string(), "insert".to_string(), 1)]);
    let on_peer: i64 = p.query_one("SELECT count(*) FROM u WHERE id = 10", &[]).unwrap().get(0);
    assert_eq!(on_peer, 1);
    let here: i64 = l.query_one("SELECT count(*) FROM u WHERE id = 20", &[]).unwrap().get(0);
    assert_eq!(here, 0, "the batch that failed left nothing");
}

#[test]
fn a_numeric_key_printed_with_another_scale_is_one_key() {
    let local = preloaded();
    let peer = dedicated_with("merge_numeric", "");
    for (n, strategy) in ["prefer-remote", "last-modified:at"].into_iter().enumerate() {
        let db = format!("mrg_num{n}");
        local.fresh_db(&db, true);
        peer.fresh_db(&db, true);
        let mut l = local.client(&db);
        let mut p = peer.client(&db);
        // m: a key and other columns. ko (prefer-remote only: it has no time column): a table of its
        // key only, where the scale is the only difference.
        let with_ko = strategy == "prefer-remote";
        let ko = |v: &str| {
            if with_ko {
                format!("CREATE TABLE ko (k numeric PRIMARY KEY); INSERT INTO ko VALUES ({v});")
            } else {
                String::new()
            }
        };
        let ddl = "CREATE TABLE m (k numeric PRIMARY KEY, v text, at timestamptz)";
        l.batch_execute(&format!(
            "{ddl}; INSERT INTO m VALUES (1.50, 'L', '2024-01-01 00:00:00+00'); {}",
            ko("2.50")
        ))
        .unwrap();
        p.batch_execute(&format!(
            "{ddl}; INSERT INTO m VALUES (1.5, 'P', '2024-06-01 00:00:00+00'), (3, 'peer', '2024-01-01 00:00:00+00'); {}",
            ko("2.5")
        ))
        .unwrap();
        let conninfo = peer.conninfo_for(&db);
        // 1.50 here and 1.5 there are one key: a conflict, not a row on each side only.
        let conflicts = if with_ko { 2 } else { 1 };
        assert_eq!(differences(&mut l, &conninfo), (conflicts, 0, 1), "{strategy}");
        merge(&mut l, &conninfo, strategy, false);
        // The peer's row wins by either strategy, its key's scale included; no key is added twice, the
        // peer's only row is copied.
        let all = if with_ko {
            "SELECT format('%s|%s', k, v) FROM m UNION ALL SELECT format('%s|ko', k) FROM ko ORDER BY 1"
        } else {
            "SELECT format('%s|%s', k, v) FROM m ORDER BY 1"
        };
        let expected: &[&str] = if with_ko { &["1.5|P", "2.5|ko", "3|peer"] } else { &["1.5|P", "3|peer"] };
        for c in [&mut l, &mut p] {
            let rows: Vec<String> = c.query(all, &[]).unwrap().iter().map(|r| r.get(0)).collect();
            assert_eq!(rows, expected, "{strategy}");
        }
        // Both nodes now print every row alike: nothing left to merge.
        assert_eq!(differences(&mut l, &conninfo), (0, 0, 0), "{strategy}");
    }
}

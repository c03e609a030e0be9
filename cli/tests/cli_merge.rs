//! `steep-repl merge` end to end on two clusters (issue 15, PRODUCT.md §10): a dry run prints the plan
//! and changes nothing, the merge writes it, a second merge finds nothing to do; a bad strategy is a
//! usage error of the server's naming.

mod harness;

use harness::*;

fn one(conninfo: &str, sql: &str) -> i64 {
    let mut c = postgres::Client::connect(conninfo, postgres::NoTls).unwrap();
    c.query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e))).get(0)
}

#[test]
fn merge_prints_the_plan_then_does_it() {
    let local = preloaded();
    let peer = dedicated("cli_merge_peer");
    let l = local.fresh_db("cli_merge", true);
    let p = peer.fresh_db("cli_merge", true);
    for (c, extra) in [
        (&l, "INSERT INTO t VALUES (1000, 'here'); UPDATE t SET v = 'L' WHERE id = 1"),
        (&p, "INSERT INTO t VALUES (2000, 'there'), (2001, 'there'); UPDATE t SET v = 'P' WHERE id = 1"),
    ] {
        let mut c = postgres::Client::connect(c, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g; {extra}"
        ))
        .unwrap();
    }
    let peer_conninfo = peer.conninfo_for("cli_merge");

    // Dry run: the plan, nothing written.
    let out = steep_repl(&[
        "--json",
        "merge",
        "-d",
        &l,
        "--peer",
        &peer_conninfo,
        "--strategy",
        "prefer-remote",
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["dry_run"], true);
    assert_eq!(doc["rows"], 4, "{doc}");
    assert_eq!(one(&l, "SELECT count(*) FROM t"), 101);
    assert_eq!(one(&p, "SELECT count(*) FROM t"), 102);

    // The merge: the union on both nodes, the peer's row 1 everywhere.
    let out = steep_repl(&["merge", "-d", &l, "--peer", &peer_conninfo, "--strategy", "prefer-remote"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rows copied to this server") && text.contains("4 rows were written"), "{text}");
    for c in [&l, &p] {
        assert_eq!(one(c, "SELECT count(*) FROM t"), 103);
        assert_eq!(one(c, "SELECT count(*) FROM t WHERE id = 1 AND v = 'P'"), 1);
    }

    // Nothing left to do.
    let out = steep_repl(&["merge", "-d", &l, "--peer", &peer_conninfo, "--strategy", "prefer-remote"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to merge"));

    // A strategy the server does not know.
    let out = steep_repl(&["merge", "-d", &l, "--peer", &peer_conninfo, "--strategy", "newest"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown merge strategy"));
}

//! `steep-repl node ...` end to end: register, list, status, heartbeat and unregister against a real
//! cluster, in text and JSON, with the exit codes scripts rely on.

mod harness;

use harness::*;
use serde_json::Value;

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(out)))
}

#[test]
fn node_commands_register_show_probe_and_remove() {
    let cluster = preloaded();
    let conninfo = cluster.fresh_db("cli_nodes", true);
    let peer = cluster.fresh_db("cli_nodes_peer", true);

    let out = steep_repl(&["node", "register", "here", "--local", "--name", "this server", "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("registered node here"), "{}", stdout(&out));
    let out = steep_repl(&[
        "--json",
        "node",
        "register",
        "there",
        "--conninfo",
        &peer,
        "--priority",
        "60",
        "-d",
        &conninfo,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["priority"], 60);

    // A password in the conninfo: refused, exit 1, never echoed.
    let out =
        steep_repl(&["node", "register", "bad", "--conninfo", "host=x password=sekrit", "-d", &conninfo]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("password") && !stderr(&out).contains("sekrit"), "{}", stderr(&out));
    // A bad priority is a usage error.
    let out = steep_repl(&["node", "register", "bad", "--priority", "0", "-d", &conninfo]);
    assert_eq!(out.status.code(), Some(2));

    // Probe the peer now, then both are healthy.
    let out = steep_repl(&["node", "heartbeat", "there", "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = steep_repl(&["node", "heartbeat", "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = steep_repl(&["--json", "node", "status", "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    let nodes = json(&out);
    let ids: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["node_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["here", "there"]);
    assert!(nodes[1]["rtt_ms"].as_f64().is_some(), "{nodes}");
    assert!(nodes[1]["replication"]["slots"].is_array(), "{nodes}");
    let out = steep_repl(&["node", "status", "there", "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("healthy"), "{}", stdout(&out));
    let out = steep_repl(&["node", "list", "-d", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("there") && stdout(&out).contains("cli_nodes_peer"), "{}", stdout(&out));

    // A peer that is not there: heartbeat exits 1, status exits 1 once it is unreachable.
    let out = steep_repl(&[
        "node",
        "register",
        "gone",
        "--conninfo",
        "host=/nonexistent port=1 dbname=x",
        "-d",
        &conninfo,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for _ in 0..3 {
        let out = steep_repl(&["node", "heartbeat", "gone", "-d", &conninfo]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    }
    let out = steep_repl(&["node", "status", "-d", &conninfo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("gone is unreachable"), "{}", stderr(&out));

    for id in ["gone", "there", "here"] {
        let out = steep_repl(&["node", "unregister", id, "-d", &conninfo]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = steep_repl(&["node", "unregister", "here", "-d", &conninfo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no node here"), "{}", stderr(&out));
    let out = steep_repl(&["node", "status", "-d", &conninfo]);
    assert!(stdout(&out).contains("no nodes registered"), "{}", stdout(&out));
}

#[test]
fn schema_commands_compare_diff_and_capture() {
    let cluster = preloaded();
    let local = cluster.fresh_db("cli_schema_a", true);
    let peer = cluster.fresh_db("cli_schema_b", true);
    for db in ["cli_schema_a", "cli_schema_b"] {
        cluster
            .client(db)
            .batch_execute(
                "CREATE SCHEMA s; CREATE TABLE s.orders (id int PRIMARY KEY, amount numeric(10,2) NOT NULL); \
                 CREATE INDEX orders_amount ON s.orders (amount); CREATE TABLE s.other (a int)",
            )
            .unwrap();
    }
    let out = steep_repl(&["schema", "compare", "--peer", &peer, "-d", &local]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("0 differ"), "{}", stdout(&out));

    cluster
        .client("cli_schema_b")
        .batch_execute("ALTER TABLE s.orders ALTER amount TYPE numeric(12,2)")
        .unwrap();
    let out = steep_repl(&["schema", "compare", "--peer", &peer, "-d", &local]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stdout(&out).contains("mismatch    column      s.orders.amount"), "{}", stdout(&out));
    assert!(stdout(&out).contains("numeric(12,2)"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("s.other"), "matches are listed only with --all");
    let out = steep_repl(&["--json", "schema", "compare", "--all", "--peer", &peer, "-d", &local]);
    assert_eq!(out.status.code(), Some(3));
    let rows = json(&out);
    assert!(rows.as_array().unwrap().iter().any(|r| r["table_name"] == "other" && r["status"] == "match"));

    let out = steep_repl(&["schema", "diff", "--peer", &peer, "--table", "s.other", "-d", &local]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = steep_repl(&["schema", "diff", "--peer", &peer, "--table", "s.orders", "-d", &local]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stdout(&out).contains("orders_amount") && stdout(&out).contains("1 differ"), "{}", stdout(&out));
    let out = steep_repl(&["schema", "diff", "--peer", &peer, "--table", "s.nope", "-d", &local]);
    assert_eq!(out.status.code(), Some(1));

    let out = steep_repl(&["schema", "capture", "-d", &local]);
    assert_eq!(out.status.code(), Some(1), "no local node yet");
    assert!(stderr(&out).contains("no local node"), "{}", stderr(&out));
    let out = steep_repl(&["node", "register", "cap", "--local", "-d", &local]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = steep_repl(&["--json", "schema", "capture", "-d", &local]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(json(&out)["objects"].as_i64().unwrap() >= 8);
}

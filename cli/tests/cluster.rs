//! End-to-end tests: the steep-repl binary against real PostgreSQL clusters.

mod harness;

use harness::*;

#[test]
fn health_over_the_wire_with_preload() {
    let cluster = preloaded();
    let conninfo = cluster.fresh_db("health_ok", true);
    let out = steep_repl(&["health", "--json", "-d", &conninfo]);
    assert!(out.status.success(), "exit {:?}\n{}", out.status.code(), stderr(&out));
    let v: serde_json::Value =
        serde_json::from_str(stdout(&out).trim()).expect("health --json prints one JSON object");
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["preloaded"], true);
    assert_eq!(v["supervisor_running"], true);
    assert_eq!(v["extension_version"], env!("CARGO_PKG_VERSION"));
    assert!(v["pg_version"].as_str().unwrap().starts_with("PostgreSQL 15"), "{v}");
    assert_eq!(v["workers_running"], 0);
    assert!(v["free_worker_slots"].as_i64().unwrap() > 0, "{v}");

    // The human form shows the same fields, one per line.
    let out = steep_repl(&["health", "-d", &conninfo]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.lines().any(|l| l.starts_with("status") && l.trim_end().ends_with("ok")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("preloaded") && l.trim_end().ends_with("true")), "{text}");
}

#[test]
fn health_without_preload_reports_it_and_fails() {
    let cluster = not_preloaded();
    let conninfo = cluster.fresh_db("health_nopreload", true);
    let out = steep_repl(&["health", "--json", "-d", &conninfo]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["preloaded"], false);
    assert_eq!(v["status"], "not preloaded");
    assert!(stderr(&out).contains("not preloaded"), "{}", stderr(&out));
}

#[test]
fn preload_only_functions_name_the_setting() {
    let cluster = not_preloaded();
    cluster.fresh_db("progress_nopreload", true);
    let mut client = cluster.client("progress_nopreload");
    let err = client.query("SELECT * FROM steep_repl.snapshot_progress()", &[]).unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert!(db.message().contains("shared_preload_libraries = 'steep_repl'"), "{}", db.message());
    assert!(db.hint().unwrap_or("").contains("restart"), "{:?}", db.hint());
    assert_eq!(db.code().code(), "55000"); // object_not_in_prerequisite_state
}

#[test]
fn missing_extension_is_explained() {
    let cluster = preloaded();
    let conninfo = cluster.fresh_db("no_extension", false);
    let out = steep_repl(&["health", "-d", &conninfo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("CREATE EXTENSION steep_repl"), "{}", stderr(&out));
}

#[test]
fn environment_variables_like_psql() {
    let cluster = preloaded();
    cluster.fresh_db("env_conn", true);
    // Take host and port from the cluster's conninfo and pass them through PG* variables only.
    let field = |k: &str| {
        cluster
            .conninfo
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steep-repl"))
        .args(["health", "--json"])
        .env("PGHOST", field("host"))
        .env("PGPORT", field("port"))
        .env("PGUSER", "postgres")
        .env("PGDATABASE", "env_conn")
        .env_remove("PGSSLMODE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["status"], "ok");
}

#[test]
fn unreachable_server_exits_6_naming_host_and_port() {
    // Port 1 on loopback: nothing listens there.
    let out = steep_repl(&["health", "-d", "host=127.0.0.1 port=1 user=u dbname=d password=hunter2"]);
    assert_eq!(out.status.code(), Some(6));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("host 127.0.0.1 port 1"), "{err}");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
}

#[test]
fn bad_usage_exits_2() {
    let out = steep_repl(&["health", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let out = steep_repl(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = steep_repl(&["--version"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains(env!("CARGO_PKG_VERSION")));
    let out = steep_repl(&["--help"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("health"));
}

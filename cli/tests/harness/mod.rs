//! The CLI tests' harness: the shared test kit (real clusters, snapshot helpers) plus a runner for the
//! steep-repl binary built for this test run.

#![allow(dead_code, unused_imports)]

use std::process::{Command, Output};

pub use steep_repl_testkit::*;

/// Runs the steep-repl binary built for this test run.
pub fn steep_repl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_steep-repl"))
        .args(args)
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATABASE")
        .env_remove("PGUSER")
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .output()
        .expect("running steep-repl")
}

/// Starts the steep-repl binary with stdout and stderr piped (for tests that signal or follow it).
pub fn steep_repl_spawn(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_steep-repl"))
        .args(args)
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATABASE")
        .env_remove("PGUSER")
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting steep-repl")
}

/// Every stdout line of a `--json` run, parsed (a line that is not JSON fails the test).
pub fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Loads `fixtures/sql/<file>` into database `db` with psql (`-v scale=N`).
pub fn load_fixture(cluster: &Cluster, db: &str, file: &str, scale: u32) {
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", &format!("scale={scale}"), "-d"])
        .arg(cluster.conninfo_for(db))
        .arg("-f")
        .arg(repo_root().join("fixtures/sql").join(file))
        .output()
        .expect("running psql");
    assert!(out.status.success(), "loading {file} into {db}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Sends SIGINT (Ctrl-C) to a child process.
pub fn interrupt(child: &std::process::Child) {
    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("running kill");
    assert!(ok.success(), "kill -INT {}", child.id());
}

/// Reads a child's stdout line by line until `pred` accepts a line (returned), or the stream ends
/// (panics, with what was read). The reader is handed back for reading the rest.
pub fn read_until(
    reader: &mut impl std::io::BufRead,
    what: &str,
    mut pred: impl FnMut(&str) -> bool,
) -> String {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("reading child output");
        assert!(n > 0, "the output ended before {what}:\n{seen}");
        if pred(&line) {
            return line;
        }
        seen.push_str(&line);
    }
}

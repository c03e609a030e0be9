//! Test harness: real PostgreSQL 15 clusters started by `scripts/pg.sh`, with the steep_repl library
//! installed by `cargo pgrx install` (scripts/test.sh does that first). Clusters are shared by the tests
//! of one binary, each test working in a database of its own, and stopped when the process exits.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// A running cluster.
pub struct Cluster {
    pub name: String,
    /// conninfo of its `postgres` database.
    pub conninfo: String,
}

impl Cluster {
    /// conninfo of another database of this cluster.
    pub fn conninfo_for(&self, db: &str) -> String {
        self.conninfo
            .replace("dbname=postgres", &format!("dbname={db}"))
    }

    /// Creates a fresh database (dropping one of the same name), optionally with the extension.
    pub fn fresh_db(&self, db: &str, with_extension: bool) -> String {
        let mut c = self.client("postgres");
        // Separate statements: CREATE DATABASE refuses to run inside a multi-statement batch.
        for sql in [
            format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"),
            format!("CREATE DATABASE \"{db}\""),
        ] {
            c.batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e)));
        }
        if with_extension {
            self.client(db)
                .batch_execute("CREATE EXTENSION steep_repl")
                .unwrap_or_else(|e| {
                    panic!("CREATE EXTENSION steep_repl in {db}: {}", db_message(&e))
                });
        }
        self.conninfo_for(db)
    }

    /// A synchronous client on one database.
    pub fn client(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.conninfo_for(db), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to {db} on cluster {}: {e}", self.name))
    }
}

/// The server's message when there is one, else the client error.
pub fn db_message(e: &postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

fn base_dir() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("steep-repl-it-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating cluster base dir");
        dir
    })
}

static STARTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn pg_sh(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(repo_root().join("scripts/pg.sh"))
        .args(args)
        .env("STEEP_PG_BASE", base_dir())
        .output()
        .expect("running scripts/pg.sh")
}

extern "C" fn stop_all_clusters() {
    let names = STARTED.lock().map(|v| v.clone()).unwrap_or_default();
    for name in names {
        let _status_ignored_at_exit = pg_sh(&["destroy", &name]);
    }
    let _ignored = std::fs::remove_dir_all(base_dir());
}

fn start(name: &str, preload: bool) -> Cluster {
    assert!(
        Path::new("/usr/share/postgresql/15/extension/steep_repl.control").exists(),
        "the steep_repl extension is not installed into PostgreSQL 15: run `cargo pgrx install -p steep_repl \
         --pg-config /usr/bin/pg_config` (scripts/test.sh does)"
    );
    let mut args = vec!["start", name];
    if !preload {
        args.push("--no-preload");
    }
    let out = pg_sh(&args);
    assert!(
        out.status.success(),
        "scripts/pg.sh start {name} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut started = STARTED.lock().expect("cluster list lock");
    if started.is_empty() {
        // SAFETY: registering a plain extern "C" fn with no captured state; it runs once at exit.
        #[allow(unsafe_code)]
        unsafe {
            libc::atexit(stop_all_clusters);
        }
    }
    started.push(name.to_string());
    Cluster {
        name: name.to_string(),
        conninfo: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    }
}

/// The shared cluster with `shared_preload_libraries = 'steep_repl'`.
pub fn preloaded() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| start("preload", true))
}

/// The shared cluster without the preload.
pub fn not_preloaded() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| start("nopreload", false))
}

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

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

//! Test kit: real PostgreSQL 15 clusters started by `scripts/pg.sh`, with the steep_repl library
//! installed by `cargo pgrx install` (scripts/test.sh does that first). Clusters are shared by the tests
//! of one test binary, each test working in a database of its own, and stopped when the process exits.
//! Used by the SQL-level tests (`it/`) and the CLI's end-to-end tests (`cli/tests`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use postgres;
use std::sync::{Mutex, OnceLock};

/// A running cluster.
pub struct Cluster {
    pub name: String,
    /// conninfo of its `postgres` database.
    pub conninfo: String,
    /// Extra postgresql.conf lines it was started with (kept across restarts).
    conf: Option<String>,
}

impl Cluster {
    /// conninfo of another database of this cluster.
    pub fn conninfo_for(&self, db: &str) -> String {
        self.conninfo.replace("dbname=postgres", &format!("dbname={db}"))
    }

    /// Creates a fresh database (dropping one of the same name), optionally with the extension.
    pub fn fresh_db(&self, db: &str, with_extension: bool) -> String {
        let mut c = self.client("postgres");
        // Separate statements: CREATE DATABASE refuses to run inside a multi-statement batch.
        for sql in
            [format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"), format!("CREATE DATABASE \"{db}\"")]
        {
            c.batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e)));
        }
        if with_extension {
            self.client(db)
                .batch_execute("CREATE EXTENSION steep_repl")
                .unwrap_or_else(|e| panic!("CREATE EXTENSION steep_repl in {db}: {}", db_message(&e)));
        }
        self.conninfo_for(db)
    }

    /// The cluster's server log so far.
    pub fn server_log(&self) -> String {
        String::from_utf8_lossy(&pg_sh(&["log", &self.name]).stdout).into_owned()
    }

    /// Restarts the cluster (fast shutdown: running jobs are interrupted).
    pub fn restart(&self) {
        let out = pg_sh_with(&["start", &self.name], self.conf.as_deref());
        assert!(out.status.success(), "restarting {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    /// Stops the cluster (fast shutdown); [`Cluster::restart`] starts it again.
    pub fn stop(&self) {
        let out = pg_sh(&["stop", &self.name]);
        assert!(out.status.success(), "stopping {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    /// Stops the cluster as a crash would (`pg_ctl stop -m immediate`: no shutdown checkpoint, every
    /// process killed) and starts it again; it runs crash recovery before accepting connections.
    pub fn crash_restart(&self) {
        let out = pg_sh(&["stop", &self.name, "--immediate"]);
        assert!(out.status.success(), "stopping {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        self.restart();
    }

    /// The server's start time (`pg_postmaster_start_time()`): unchanged as long as the server has not
    /// restarted, also not through a crash.
    pub fn started_at(&self) -> String {
        self.client("postgres")
            .query_one("SELECT pg_postmaster_start_time()::text", &[])
            .map(|r| r.get(0))
            .unwrap_or_else(|e| panic!("reading the start time of {}: {}", self.name, db_message(&e)))
    }

    /// A synchronous client on one database.
    pub fn client(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.conninfo_for(db), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to {db} on cluster {}: {e}", self.name))
    }
}

/// The server's message when there is one, else the client error.
pub fn db_message(e: &postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit/ has a parent").to_path_buf()
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
    pg_sh_with(args, None)
}

/// Runs scripts/pg.sh with the test clusters' base dir, and extra postgresql.conf lines when given.
fn pg_sh_with(args: &[&str], conf: Option<&str>) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/pg.sh")).args(args).env("STEEP_PG_BASE", base_dir());
    match conf {
        Some(c) => cmd.env("STEEP_PG_CONF", c),
        None => cmd.env_remove("STEEP_PG_CONF"),
    };
    cmd.output().expect("running scripts/pg.sh")
}

extern "C" fn stop_all_clusters() {
    let names = STARTED.lock().map(|v| v.clone()).unwrap_or_default();
    for name in names {
        let _status_ignored_at_exit = pg_sh(&["destroy", &name]);
    }
    let _ignored = std::fs::remove_dir_all(base_dir());
}

fn start(name: &str, preload: bool) -> Cluster {
    start_with(name, preload, None)
}

fn start_with(name: &str, preload: bool, conf: Option<&str>) -> Cluster {
    assert!(
        Path::new("/usr/share/postgresql/15/extension/steep_repl.control").exists(),
        "the steep_repl extension is not installed into PostgreSQL 15: run `cargo pgrx install -p steep_repl \
         --pg-config /usr/bin/pg_config` (scripts/test.sh does)"
    );
    let mut args = vec!["start", name];
    if !preload {
        args.push("--no-preload");
    }
    let out = pg_sh_with(&args, conf);
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
        conf: conf.map(str::to_string),
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

/// A fresh path for a snapshot directory, in a parent the `postgres` OS user may write into; the
/// directory itself does not exist yet.
pub fn snapshot_path(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let parent = base_dir().join("snapshots");
    std::fs::create_dir_all(&parent).expect("creating snapshot parent dir");
    std::fs::set_permissions(base_dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod base");
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o777)).expect("chmod snapshot parent");
    let p = parent.join(name);
    let _absent = std::fs::remove_dir_all(&p);
    p
}

/// Starts a cluster of its own (for tests that change server-wide settings).
pub fn dedicated(name: &str) -> Cluster {
    start(name, true)
}

/// Starts a generate job through SQL after running `setup` statements in the same session (SET ...),
/// returning its id.
pub fn start_snapshot(client: &mut postgres::Client, setup: &[&str], path: &Path, args: &str) -> String {
    for s in setup {
        client.batch_execute(s).unwrap_or_else(|e| panic!("{s}: {}", db_message(&e)));
    }
    let sql = format!("SELECT steep_repl.start_snapshot('{}'{args})", path.display());
    let row = client.query_one(&sql, &[]).unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e)));
    row.get(0)
}

/// Waits for an operation to end (at most `timeout_s`); returns (status, error).
pub fn wait_for(client: &mut postgres::Client, id: &str, timeout_s: i32) -> (String, Option<String>) {
    let row = client
        .query_one("SELECT status, error FROM steep_repl.wait_snapshot($1, $2)", &[&id, &timeout_s])
        .unwrap_or_else(|e| panic!("wait_snapshot({id}): {}", db_message(&e)));
    (row.get(0), row.get(1))
}

/// Polls snapshot_progress until the job's phase is `phase` or later than `plan`/`queued`.
pub fn wait_for_phase(client: &mut postgres::Client, id: &str, phases: &[&str]) -> String {
    for _ in 0..600 {
        let phase: String = client
            .query_one("SELECT phase FROM steep_repl.snapshot_progress($1)", &[&id])
            .map(|r| r.get(0))
            .unwrap_or_else(|e| panic!("snapshot_progress({id}): {}", db_message(&e)));
        if phases.contains(&phase.as_str()) {
            return phase;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("job {id} never reached phase {phases:?}");
}

/// The decompressed, CRC-checked contents of one table's chunks, concatenated in chunk order.
pub fn table_bytes(dir: &Path, schema: &str, name: &str) -> Vec<u8> {
    use std::io::Read;
    let m = steep_repl_engine::manifest::Manifest::load(dir).unwrap_or_else(|e| panic!("manifest: {e}"));
    let t = m
        .tables
        .iter()
        .find(|t| t.schema == schema && t.name == name)
        .unwrap_or_else(|| panic!("{schema}.{name} is not in the manifest"));
    let mut out = Vec::new();
    for c in &t.chunks {
        let mut r = steep_repl_engine::chunk::ChunkReader::open(&c.path_in(dir), c).expect("open chunk");
        r.read_to_end(&mut out).unwrap_or_else(|e| panic!("reading {}: {e}", c.file));
    }
    out
}

/// What `COPY (sql) TO STDOUT` prints in this session.
pub fn copy_out(client: &mut postgres::Client, sql: &str) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    client
        .copy_out(&format!("COPY ({sql}) TO STDOUT"))
        .unwrap_or_else(|e| panic!("COPY ({sql}): {}", db_message(&e)))
        .read_to_end(&mut out)
        .expect("reading COPY output");
    out
}

/// The output settings generate pins, plus a time zone, for a session that compares with COPY.
pub fn pin_session(client: &mut postgres::Client, timezone: &str) {
    client
        .batch_execute(&format!(
            "SET DateStyle = ISO; SET IntervalStyle = postgres; SET bytea_output = hex; \
             SET extra_float_digits = 3; SET TimeZone = '{timezone}'"
        ))
        .expect("pinning session settings");
}

/// Copies the schema (no data) of one database into another with pg_dump | psql.
pub fn copy_schema(cluster: &Cluster, from_db: &str, to_db: &str) {
    copy_schema_between(&cluster.conninfo_for(from_db), &cluster.conninfo_for(to_db));
}

/// Copies the schema (no data) of database `from` into database `to` (conninfos, possibly of two
/// clusters) with pg_dump | psql.
pub fn copy_schema_between(from: &str, to: &str) {
    let dump = Command::new("pg_dump")
        .args(["--schema-only", "--no-owner", "--no-privileges", "-d", from])
        .output()
        .expect("running pg_dump");
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    let mut psql = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", to, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("running psql");
    use std::io::Write;
    psql.stdin.take().expect("stdin").write_all(&dump.stdout).expect("feeding psql");
    assert!(psql.wait().expect("psql").success(), "restoring the schema into {to} failed");
}

/// Asserts that every table of the snapshot in `dir` holds the same rows in databases `src` and `dst` of
/// `cluster` (compared sorted, on the manifest's columns).
pub fn assert_same_rows(cluster: &Cluster, src: &str, dst: &str, dir: &Path) {
    let m = steep_repl_engine::manifest::Manifest::load(dir).unwrap();
    let (mut a, mut b) = (cluster.client(src), cluster.client(dst));
    for t in &m.tables {
        let q = steep_repl_engine::ident::QualifiedName::new(t.schema.clone(), t.name.clone()).to_string();
        let cols = t
            .columns
            .iter()
            .map(|c| steep_repl_engine::ident::quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let (ra, rb) = (sorted_rows(&mut a, &q, &cols), sorted_rows(&mut b, &q, &cols));
        assert_eq!(ra.len(), rb.len(), "{q}: row counts differ");
        assert!(ra == rb, "{q}: rows differ");
    }
}

/// The rows of `qualified` (a table, or `ONLY table`) as sorted COPY lines (pinned settings): equal lists mean EXCEPT ALL is empty in
/// both directions.
pub fn sorted_rows(client: &mut postgres::Client, qualified: &str, columns: &str) -> Vec<Vec<u8>> {
    pin_session(client, "UTC");
    let bytes = copy_out(client, &format!("SELECT {columns} FROM {qualified}"));
    let mut lines: Vec<Vec<u8>> =
        bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect();
    lines.sort();
    lines
}

/// Standard output of a finished command, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error of a finished command, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Starts a cluster of its own with extra postgresql.conf lines (`STEEP_PG_CONF`), e.g. small limits.
pub fn dedicated_with(name: &str, conf: &str) -> Cluster {
    start_with(name, true, Some(conf))
}

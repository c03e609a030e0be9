//! Command-line arguments. Parsing only: nothing here connects or touches files. Values that have a
//! syntax of their own (compression, table patterns, sizes) are parsed here, so a bad one is a usage
//! error (exit 2) before anything else happens; [`crate::config`] turns the result into what runs.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use steep_repl_engine::chunk::Compression;
use steep_repl_engine::filter::TablePattern;

/// steep-repl: consistent, parallel, compressed and checksummed PostgreSQL snapshots, generated and
/// applied inside the server.
#[derive(Debug, Parser)]
#[command(name = "steep-repl", version, about, long_about = None, after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Print machine-readable JSON instead of text (progress: one object per line).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "\
Examples:
  steep-repl snapshot generate --parallel 8 --direct -d \"host=src dbname=app\" --output /data/snap
  steep-repl snapshot apply --input /data/snap --parallel 8 -d \"host=replica dbname=app\"
  steep-repl snapshot verify /data/snap --deep
  steep-repl health -d \"host=db1 dbname=app user=postgres\"

Exit codes: 0 ok, 1 error or job failed, 2 usage, 3 schema mismatch or data differs, 4 cancelled,
5 timeout, 6 connection error, 7 verification failed, 130 detached by Ctrl-C (the job keeps running).";

/// How to reach the server: like psql, `-d` takes a conninfo string or a URI, and anything it leaves out
/// comes from PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD and PGSSLMODE.
#[derive(Debug, Args, Clone, Default)]
pub struct ConnArgs {
    /// Connection string ("host=... dbname=..."), URI (postgresql://user@host:port/db) or database name.
    #[arg(short = 'd', long = "dbname", global = true, value_name = "CONNINFO")]
    pub dbname: Option<String>,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show whether steep_repl is installed, preloaded and healthy on the server.
    #[command(after_help = "Example:\n  steep-repl health -d postgresql://postgres@localhost:5432/app")]
    Health,
    /// Generate, apply, watch and check snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// The node registry: this server and its peers, with heartbeats and health.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Schema fingerprints: capture them, compare this server's schema with a peer's.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Start a logical replica from a snapshot with an exact LSN hand-off, and watch it.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Compare this server's rows with a peer's, table by table and key by key: match, conflict, only
    /// here, only on the peer.
    #[command(after_help = OVERLAP_HELP)]
    Overlap(OverlapArgs),
    /// Reconcile this server and a peer to the union of their rows: rows on one side only are copied to
    /// the other, conflicts settled by a strategy, every change audited on the node it changed.
    #[command(after_help = MERGE_HELP)]
    Merge(MergeArgs),
}

const MERGE_HELP: &str = "\
Examples:
  steep-repl merge --peer replica-2 --strategy prefer-local --dry-run -d \"dbname=app\"
  steep-repl merge --peer \"host=10.0.0.12 dbname=app\" --table 'sales.*' --strategy last-modified:updated_at

Strategies for a key present on both nodes with different rows:
  prefer-local              this server's row is written to the peer
  prefer-remote             the peer's row is written here
  last-modified:<column>    the row with the newer value of that date or timestamp column wins on both
                            nodes (ties and NULLs: this server's row)
  manual                    neither node is changed; both rows are parked in steep_repl.merge_conflicts
Rows on one side only are copied to the other; nothing is ever deleted. Each batch of keys is one
transaction on the node it writes, run with session_replication_role = replica under the replication
origin steep_merge, and recorded row by row in steep_repl.merge_audit there. A dry run changes no row
and prints the plan. Needs a superuser and steep_repl installed and preloaded on both servers.";

/// `merge`: runs in the server (`-d`), which connects to the peer itself.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The peer: a registered node id or a conninfo (no password).
    #[arg(long, value_name = "CONN|NODE")]
    pub peer: String,
    /// Only tables matching this pattern, pg_dump -t style (repeatable; default: every user table).
    #[arg(short = 't', long = "table", value_name = "PATTERN", value_parser = parse_pattern)]
    pub tables: Vec<TablePattern>,
    /// How conflicts are settled: prefer-local, prefer-remote, last-modified:<column> or manual.
    #[arg(long, value_name = "STRATEGY")]
    pub strategy: String,
    /// Change nothing: print what the merge would do.
    #[arg(long)]
    pub dry_run: bool,
    /// Background workers hashing rows on each node, 1 to 64.
    #[arg(short = 'j', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    #[command(flatten)]
    pub wait: WaitArgs,
}

const OVERLAP_HELP: &str = "\
Examples:
  steep-repl overlap --peer replica-2 -d \"dbname=app\"
  steep-repl overlap --peer \"host=10.0.0.12 dbname=app\" --table 'sales.*' --detailed --limit 100
  steep-repl overlap --peer replica-2 --json > overlap.json

Each node hashes its own rows in its own background workers; only digests, and the keys of the rows
that differ, cross the network. Tables without a primary key or replica identity index are listed as
skipped. Needs a superuser and steep_repl installed and preloaded on both servers. Ctrl-C detaches (the
analysis keeps running) and prints how to follow or cancel it.

Exits 0 when every table was compared and is identical, 3 when anything differs or a table was not
compared (skipped, or truncated by a limit).";

/// `overlap`: runs in the server (`-d`), which connects to the peer itself.
#[derive(Debug, Args)]
pub struct OverlapArgs {
    /// The peer: a registered node id or a conninfo (no password).
    #[arg(long, value_name = "CONN|NODE")]
    pub peer: String,
    /// Only tables matching this pattern, pg_dump -t style (repeatable; default: every user table).
    #[arg(short = 't', long = "table", value_name = "PATTERN", value_parser = parse_pattern)]
    pub tables: Vec<TablePattern>,
    /// Background workers hashing rows on each node, 1 to 64.
    #[arg(short = 'j', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// Also list the keys of the rows that differ, by table and category.
    #[arg(long)]
    pub detailed: bool,
    /// With --detailed: at most this many keys per table and category.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        requires = "detailed",
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub limit: u32,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `steep-repl replica ...`.
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Publication, snapshot with a slot, apply, subscription at the slot's LSN, catch-up: one command.
    #[command(after_help = REPLICA_INIT_HELP)]
    Init(ReplicaInitArgs),
    /// Subscriptions of the target: state, received and applied LSN, lag.
    #[command(after_help = "Example:\n  steep-repl replica status --target \"host=replica dbname=app\"")]
    Status(ReplicaStatusArgs),
    /// Copy the source's sequence values to the target (logical replication carries none): at switchover,
    /// once writes on the source have stopped and the subscription has caught up.
    #[command(
        after_help = "Example:\n  steep-repl replica sync-sequences --source \"host=src dbname=app\" --target \"host=replica dbname=app\""
    )]
    SyncSequences(ReplicaSyncArgs),
}

/// `replica sync-sequences`.
#[derive(Debug, Args)]
pub struct ReplicaSyncArgs {
    /// The source (publisher): conninfo or URI.
    #[arg(long, value_name = "CONNINFO")]
    pub source: String,
    /// The target (subscriber): conninfo or URI.
    #[arg(long, value_name = "CONNINFO")]
    pub target: String,
    /// Only the sequences of tables matching this pattern, and sequences it matches (repeatable).
    #[arg(short = 't', long = "table", value_name = "PATTERN", value_parser = parse_pattern)]
    pub tables: Vec<TablePattern>,
}

const REPLICA_INIT_HELP: &str = "\
Examples:
  steep-repl replica init --source \"host=src dbname=app\" --target \"host=replica dbname=app\" \\
      --dir /shared/snap --parallel 8
  steep-repl replica init --source ... --target ... --dir /shared/snap --table 'sales.*' --json

Steps: preflight of both servers (every problem listed at once), publication on the source (FOR ALL
TABLES, or the selected tables), snapshot with a logical slot, apply on the target, subscription at the
slot's LSN, wait for catch-up. DIR is a path both servers see (shared storage). Running the same
command again after a failure or Ctrl-C continues from the last completed step: a finished apply is
never repeated and no second slot is created.";

/// `replica init`.
#[derive(Debug, Args)]
pub struct ReplicaInitArgs {
    /// The source (publisher): conninfo or URI.
    #[arg(long, value_name = "CONNINFO")]
    pub source: String,
    /// The target (subscriber): conninfo or URI.
    #[arg(long, value_name = "CONNINFO")]
    pub target: String,
    /// Snapshot directory, a path both servers see.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Workers for the snapshot and the apply, 1 to 64.
    #[arg(short = 'j', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// Chunk compression of the snapshot: auto, zstd (level 1), zstd:N (N in 1..=22) or none. The snapshot
    /// is read once, by the apply: auto stages it uncompressed (no CPU spent compressing and
    /// decompressing) when DIR has three times the tables' size free, and with zstd:1 otherwise.
    #[arg(long, default_value = "auto", value_parser = parse_staging)]
    pub compression: Staging,
    /// Publication on the source (created when missing).
    #[arg(long, default_value = "steep_repl_pub", value_name = "NAME")]
    pub publication: String,
    /// Subscription on the target; also the name of the replication slot on the source.
    #[arg(long, default_value = "steep_repl_sub", value_name = "NAME")]
    pub subscription: String,
    /// The conninfo the target server uses to reach the source (default: --source without password).
    #[arg(long, value_name = "CONNINFO")]
    pub publisher_conninfo: Option<String>,
    /// Only tables matching this pattern, pg_dump -t style (repeatable).
    #[arg(short = 't', long = "table", value_name = "PATTERN", value_parser = parse_pattern)]
    pub tables: Vec<TablePattern>,
    #[command(flatten)]
    pub mode: ModeArgs,
    /// Return once the subscription is enabled, without waiting for catch-up.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `replica status`.
#[derive(Debug, Args)]
pub struct ReplicaStatusArgs {
    /// The target (subscriber): conninfo or URI.
    #[arg(long, value_name = "CONNINFO")]
    pub target: String,
}

/// `steep-repl schema ...`: runs in the server (`-d`), which reads the peer's catalogs itself.
#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Store the fingerprints of this server (or of a registered peer) in steep_repl.schema_fingerprints.
    #[command(after_help = "Examples:\n  steep-repl schema capture -d \"dbname=app\"\n  \
                            steep-repl schema capture --node replica-2")]
    Capture(SchemaCaptureArgs),
    /// Compare this server's schema with a peer's, object by object; differences only unless --all.
    #[command(after_help = "Examples:\n  steep-repl schema compare --peer replica-2 -d \"dbname=app\"\n  \
                            steep-repl schema compare --peer \"host=10.0.0.12 dbname=app\" --schema sales --json\n\n\
                            Exits 3 when anything differs, 0 when the schemas are identical.")]
    Compare(SchemaCompareArgs),
    /// Show one table's objects (columns, constraints, indexes, triggers) on both sides.
    #[command(after_help = "Example:\n  steep-repl schema diff --peer replica-2 --table sales.orders\n\n\
                            Exits 3 when the table differs.")]
    Diff(SchemaDiffArgs),
}

/// `schema capture`.
#[derive(Debug, Args)]
pub struct SchemaCaptureArgs {
    /// A registered node to capture (default: this server, the local node).
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
}

/// `schema compare`.
#[derive(Debug, Args)]
pub struct SchemaCompareArgs {
    /// The peer: a registered node id or a conninfo (no password).
    #[arg(long, value_name = "CONN|NODE")]
    pub peer: String,
    /// Also list the objects that match.
    #[arg(long)]
    pub all: bool,
    /// Only this schema (repeatable; default: every user schema).
    #[arg(long = "schema", value_name = "NAME")]
    pub schemas: Vec<String>,
}

/// `schema diff`.
#[derive(Debug, Args)]
pub struct SchemaDiffArgs {
    /// The peer: a registered node id or a conninfo (no password).
    #[arg(long, value_name = "CONN|NODE")]
    pub peer: String,
    /// The table, as schema.table (public when no schema is given).
    #[arg(long, value_name = "SCHEMA.TABLE")]
    pub table: String,
}

/// `steep-repl node ...`: runs in the server (the registry and the probes live there).
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Register a node (or update it): this server with --local, or a peer with --conninfo.
    #[command(after_help = NODE_REGISTER_HELP)]
    Register(NodeRegisterArgs),
    /// Remove a node from the registry.
    #[command(after_help = "Example:\n  steep-repl node unregister replica-2 -d \"dbname=app\"")]
    Unregister(NodeIdArg),
    /// List the registered nodes with how the server reaches them (needs rights on steep_repl.nodes).
    #[command(after_help = "Example:\n  steep-repl node list -d \"dbname=app\"")]
    List,
    /// Show every node (or one) as the last heartbeat saw it: status, last seen, RTT, clock offset.
    #[command(after_help = "Examples:\n  steep-repl node status -d \"dbname=app\"\n  \
                            steep-repl node status replica-2 --json\n\n\
                            Exits 1 when a node shown is unreachable or degraded.")]
    Status(NodeOptionalIdArg),
    /// Beat now: for the local node, or probe one peer at once.
    #[command(after_help = "Examples:\n  steep-repl node heartbeat -d \"dbname=app\"\n  \
                            steep-repl node heartbeat replica-2\n\n\
                            Exits 1 when the node does not answer.")]
    Heartbeat(NodeOptionalIdArg),
}

const NODE_REGISTER_HELP: &str = "\
Examples:
  steep-repl node register primary --local --name \"app primary\" -d \"dbname=app\"
  steep-repl node register replica-2 --conninfo \"host=10.0.0.12 dbname=app user=steep\" --priority 60

A conninfo holding a password is refused: the server connects to its peers with the password file of
its operating-system user (~/.pgpass of postgres) or the one named by passfile=.";

/// `node register`.
#[derive(Debug, Args)]
pub struct NodeRegisterArgs {
    /// Node id: 1 to 63 letters, digits, _ . or -.
    pub id: String,
    /// A readable name.
    #[arg(long)]
    pub name: Option<String>,
    /// How this server reaches the node (key=value or URI, no password).
    #[arg(long, value_name = "CONNINFO")]
    pub conninfo: Option<String>,
    /// 1 to 100 (default 50).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub priority: i32,
    /// This node is the server the command connects to.
    #[arg(long)]
    pub local: bool,
}

/// A node id.
#[derive(Debug, Args)]
pub struct NodeIdArg {
    /// Node id.
    pub id: String,
}

/// An optional node id.
#[derive(Debug, Args)]
pub struct NodeOptionalIdArg {
    /// Node id (default: every node for status, the local node for heartbeat).
    pub id: Option<String>,
}

/// `steep-repl snapshot ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a consistent snapshot of a database into a directory.
    #[command(after_help = GENERATE_HELP)]
    Generate(GenerateArgs),
    /// Load a snapshot into existing, empty tables of a database.
    #[command(after_help = APPLY_HELP)]
    Apply(ApplyArgs),
    /// Show the progress of a running (or the outcome of a finished) operation.
    #[command(after_help = "Examples:\n  steep-repl snapshot progress gen-0123456789abcdef\n  \
                            steep-repl snapshot progress gen-0123456789abcdef --follow --json")]
    Progress(ProgressArgs),
    /// List recent operations (the server's work queue, newest first).
    #[command(after_help = "Example:\n  steep-repl snapshot list --status running -d \"dbname=app\"")]
    List(ListArgs),
    /// Ask a running operation to stop (generate removes its output; apply stays resumable).
    #[command(after_help = "Example:\n  steep-repl snapshot cancel gen-0123456789abcdef -d \"dbname=app\"")]
    Cancel(CancelArgs),
    /// Check a snapshot directory offline: manifest, every chunk's size and CRC (no connection).
    #[command(after_help = "Examples:\n  steep-repl snapshot verify /data/snap\n  \
                            steep-repl snapshot verify /data/snap --deep --json\n\n\
                            Exits 7 listing every problem when the snapshot is damaged or incomplete.")]
    Verify(VerifyArgs),
    /// Describe a snapshot directory offline: tables, chunks, rows, sizes, ratio, LSN.
    #[command(after_help = "Example:\n  steep-repl snapshot inspect /data/snap --json")]
    Inspect(InspectArgs),
}

const GENERATE_HELP: &str = "\
Examples:
  steep-repl snapshot generate --parallel 8 --direct -d \"host=src dbname=app\" --output /data/snap
  steep-repl snapshot generate --client --table 'sales.*' --compression zstd:3 --output ./snap

--direct runs the job in the server's background workers (the output path is on the server); --client
runs it in this process over N connections sharing one exported snapshot (the path is local). Without
either: direct when steep_repl is installed and preloaded on the server, otherwise client.
Ctrl-C detaches from a direct job (it keeps running) and cancels a client-mode one.";

const APPLY_HELP: &str = "\
Examples:
  steep-repl snapshot apply --input /data/snap --parallel 8 -d \"host=replica dbname=app\"
  steep-repl snapshot apply --client --truncate --input ./snap -d \"dbname=app_copy\"

The target tables must exist (e.g. pg_dump --schema-only | psql) and be empty unless --truncate. A
client-mode apply records finished chunks in <input>/apply-state.<target>.json: run the same command
again to resume without loading any chunk twice. A direct apply resumes with --resume ID.";

/// Where a job runs.
#[derive(Debug, Args, Clone, Copy, Default)]
#[command(group(ArgGroup::new("mode").args(["direct", "client"])))]
pub struct ModeArgs {
    /// Run in the server's background workers (needs steep_repl installed and preloaded).
    #[arg(long)]
    pub direct: bool,
    /// Run in this process over ordinary connections (for servers without the extension).
    #[arg(long)]
    pub client: bool,
}

/// How long to follow a job.
#[derive(Debug, Args, Clone, Copy, Default)]
pub struct WaitArgs {
    /// Stop following after this many seconds and exit 5 (a direct job keeps running).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
}

/// `snapshot generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Snapshot directory to create (must not exist, or be empty; its parent must exist).
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Workers (server background workers or client connections), 1 to 64.
    #[arg(short = 'j', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// Chunk compression: zstd (level 1), zstd:N (N in 1..=22) or none.
    #[arg(long, default_value = "zstd:1", value_parser = parse_compression)]
    pub compression: Compression,
    /// Only tables matching this pattern, pg_dump -t style: [schema.]name with * and ?, "quoted" for
    /// case (repeatable).
    #[arg(short = 't', long = "table", value_name = "PATTERN", value_parser = parse_pattern)]
    pub tables: Vec<TablePattern>,
    /// Target uncompressed size of one chunk: bytes, or with kB, MB, GB, TB (at least 64kB).
    /// Default: the server's steep_repl.chunk_size (direct), 256MB (client).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub chunk_size: Option<u64>,
    /// Start the job and print its id without following it (direct mode only).
    #[arg(long, conflicts_with = "client")]
    pub detach: bool,
    #[command(flatten)]
    pub mode: ModeArgs,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `snapshot apply`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["input", "resume"])))]
pub struct ApplyArgs {
    /// Snapshot directory to load (on the server in direct mode, local in client mode).
    #[arg(short, long, value_name = "DIR")]
    pub input: Option<PathBuf>,
    /// Workers (server background workers or client connections), 1 to 64.
    #[arg(short = 'j', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// Skip checking every chunk's size and CRC before loading (chunks are still checked as they load).
    #[arg(long)]
    pub no_verify: bool,
    /// Empty the target tables first (otherwise non-empty target tables are refused).
    #[arg(long)]
    pub truncate: bool,
    /// Do not ANALYZE the loaded tables at the end.
    #[arg(long)]
    pub no_analyze: bool,
    /// Continue a failed or cancelled direct-mode apply (steep_repl.resume_apply) instead of starting one.
    #[arg(long, value_name = "ID", conflicts_with_all = ["client", "truncate", "no_verify"])]
    pub resume: Option<String>,
    /// Start the job and print its id without following it (direct mode only).
    #[arg(long, conflicts_with = "client")]
    pub detach: bool,
    #[command(flatten)]
    pub mode: ModeArgs,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `snapshot progress`.
#[derive(Debug, Args)]
pub struct ProgressArgs {
    /// Operation id (gen-... or app-...).
    pub id: String,
    /// Keep following until the operation ends; exit with its outcome's code.
    #[arg(short, long)]
    pub follow: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `snapshot list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only operations in this state.
    #[arg(long, value_parser = ["pending", "running", "complete", "failed", "cancelled"])]
    pub status: Option<String>,
    /// At most this many operations.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i32).range(1..))]
    pub limit: i32,
}

/// `snapshot cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Operation id (gen-... or app-...).
    pub id: String,
}

/// `snapshot verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Also decompress every chunk and check its raw size, raw CRC and row count.
    #[arg(long)]
    pub deep: bool,
}

/// `snapshot inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Snapshot directory.
    pub dir: PathBuf,
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    s.parse::<Compression>().map_err(|e| e.to_string())
}

/// How `replica init` compresses its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    /// By the room in DIR (`steep_repl_engine::space::replica_staging`).
    Auto,
    Fixed(Compression),
}

fn parse_staging(s: &str) -> Result<Staging, String> {
    if s == "auto" { Ok(Staging::Auto) } else { parse_compression(s).map(Staging::Fixed) }
}

fn parse_pattern(s: &str) -> Result<TablePattern, String> {
    s.parse::<TablePattern>().map_err(|e| e.to_string())
}

/// Smallest chunk size accepted: the minimum of the server's `steep_repl.chunk_size` setting.
pub const MIN_CHUNK_BYTES: u64 = 64 * 1024;

/// Parses a size like PostgreSQL's memory settings: a number of bytes, or a number followed by B, kB,
/// MB, GB or TB (powers of 1024; case and spaces are forgiven).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 256MB, 64kB, 1GB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        "t" | "tb" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} (use B, kB, MB, GB or TB)")),
    };
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes < MIN_CHUNK_BYTES {
        return Err(format!("{s:?} is below the minimum of 64kB"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MB"), Ok(256 << 20));
        assert_eq!(parse_size("64kB"), Ok(64 << 10));
        assert_eq!(parse_size(" 1 gb"), Ok(1 << 30));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("1kB").unwrap_err().contains("minimum"));
        assert!(parse_size("12XB").unwrap_err().contains("unit"));
        assert!(parse_size("MB").is_err());
        assert!(parse_size("99999999999TB").unwrap_err().contains("too large"));
    }

    #[test]
    fn generate_flags() {
        let cli = Cli::try_parse_from([
            "steep-repl",
            "snapshot",
            "generate",
            "--output",
            "/x",
            "--parallel",
            "8",
            "--direct",
            "-t",
            "a.*",
            "--table",
            "b",
            "--compression",
            "none",
        ])
        .unwrap();
        let Command::Snapshot(SnapshotCommand::Generate(g)) = cli.command else { panic!("not generate") };
        assert_eq!(g.parallel, 8);
        assert!(g.mode.direct && !g.mode.client);
        assert_eq!(g.tables.len(), 2);
        assert_eq!(g.compression, Compression::None);
    }

    #[test]
    fn replica_init_compression_is_auto_unless_given() {
        let base =
            ["steep-repl", "replica", "init", "--source", "host=a", "--target", "host=b", "--dir", "/x"];
        let parse = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let Command::Replica(ReplicaCommand::Init(r)) = Cli::try_parse_from(args).unwrap().command else {
                panic!("not replica init")
            };
            r.compression
        };
        assert_eq!(parse(&[]), Staging::Auto);
        assert_eq!(parse(&["--compression", "auto"]), Staging::Auto);
        assert_eq!(parse(&["--compression", "none"]), Staging::Fixed(Compression::None));
        assert_eq!(parse(&["--compression", "zstd:3"]), Staging::Fixed(Compression::Zstd { level: 3 }));
        let bad: Vec<&str> = base.iter().chain(&["--compression", "lz4"]).copied().collect();
        assert!(Cli::try_parse_from(bad).is_err());
    }

    #[test]
    fn overlap_flags() {
        let cli =
            Cli::try_parse_from(["steep-repl", "overlap", "--peer", "replica-2", "-t", "sales.*"]).unwrap();
        let Command::Overlap(o) = cli.command else { panic!("not overlap") };
        assert_eq!((o.peer.as_str(), o.parallel, o.detailed, o.limit), ("replica-2", 4, false, 1000));
        assert_eq!(o.tables.len(), 1);
        let cli = Cli::try_parse_from([
            "steep-repl",
            "overlap",
            "--peer",
            "host=b dbname=app",
            "--detailed",
            "--limit",
            "5",
            "-j",
            "2",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        let Command::Overlap(o) = cli.command else { panic!("not overlap") };
        assert!(o.detailed);
        assert_eq!((o.limit, o.parallel), (5, 2));
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &["steep-repl", "snapshot", "generate", "--output", "/x", "--direct", "--client"][..],
            &["steep-repl", "snapshot", "generate", "--output", "/x", "--parallel", "0"],
            &["steep-repl", "snapshot", "generate", "--output", "/x", "--compression", "lz4"],
            &["steep-repl", "snapshot", "generate"],
            &["steep-repl", "snapshot", "apply"],
            &["steep-repl", "snapshot", "apply", "--input", "/x", "--resume", "app-1", "--truncate"],
            &["steep-repl", "snapshot", "verify"],
            &["steep-repl", "overlap"],
            &["steep-repl", "overlap", "--peer", "p", "--limit", "10"],
            &["steep-repl", "overlap", "--peer", "p", "--detailed", "--limit", "0"],
            &["steep-repl", "overlap", "--peer", "p", "--parallel", "65"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} should be refused");
        }
    }
}

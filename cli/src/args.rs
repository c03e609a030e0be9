//! Command-line arguments. Parsing only: nothing here connects or touches files.

use clap::{Args, Parser, Subcommand};

/// steep-repl: consistent, parallel, compressed and checksummed PostgreSQL snapshots, generated and
/// applied inside the server.
#[derive(Debug, Parser)]
#[command(name = "steep-repl", version, about, long_about = None, after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "\
Examples:
  steep-repl health -d \"host=db1 dbname=app user=postgres\"
  PGHOST=db1 PGDATABASE=app steep-repl health --json";

/// How to reach the server: like psql, `-d` takes a conninfo string or a URI, and anything it leaves out
/// comes from PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD and PGSSLMODE.
#[derive(Debug, Args, Clone, Default)]
pub struct ConnArgs {
    /// Connection string ("host=... dbname=...") or URI (postgresql://user@host:port/db).
    #[arg(short = 'd', long = "dbname", global = true, value_name = "CONNINFO")]
    pub dbname: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show whether steep_repl is installed, preloaded and healthy on the server.
    #[command(after_help = "Example:\n  steep-repl health -d postgresql://postgres@localhost:5432/app")]
    Health,
}

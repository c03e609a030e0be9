//! From parsed arguments to what runs: resolves the connection (only for commands that connect) and
//! gathers each command's settings into one value its module runs.

use std::path::PathBuf;
use std::time::Duration;

use steep_repl_engine::chunk::Compression;
use steep_repl_engine::filter::TablePattern;

use crate::args::{Cli, Command, NodeCommand, ReplicaCommand, SchemaCommand, SnapshotCommand};
use crate::conn::ConnSpec;
use crate::error::CliError;
use crate::mode::ModeChoice;

/// `snapshot generate`.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub conn: ConnSpec,
    pub output: PathBuf,
    pub parallel: u32,
    pub compression: Compression,
    pub patterns: Vec<TablePattern>,
    /// `--chunk-size`, when given.
    pub chunk_size: Option<u64>,
    pub mode: ModeChoice,
    pub detach: bool,
    pub timeout: Option<Duration>,
}

/// `snapshot apply`.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    pub conn: ConnSpec,
    pub input: Option<PathBuf>,
    /// `--resume ID` (direct mode).
    pub resume: Option<String>,
    pub parallel: u32,
    pub verify: bool,
    pub truncate: bool,
    pub analyze: bool,
    pub mode: ModeChoice,
    pub detach: bool,
    pub timeout: Option<Duration>,
}

/// `replica init`.
#[derive(Debug, Clone)]
pub struct ReplicaInitConfig {
    pub source: ConnSpec,
    pub target: ConnSpec,
    pub dir: PathBuf,
    pub parallel: u32,
    /// Of the snapshot's chunks; None: chosen by the room in DIR (`steep_repl_engine::space`).
    pub compression: Option<Compression>,
    pub publication: String,
    pub subscription: String,
    /// What the target server connects to the source with.
    pub publisher_conninfo: String,
    pub patterns: Vec<TablePattern>,
    pub mode: ModeChoice,
    pub wait: bool,
    pub timeout: Option<Duration>,
}

/// `overlap`.
#[derive(Debug, Clone)]
pub struct OverlapConfig {
    pub conn: ConnSpec,
    /// A registered node id or a conninfo, passed to the server as given.
    pub peer: String,
    pub patterns: Vec<TablePattern>,
    pub parallel: u32,
    /// List the keys that differ.
    pub detailed: bool,
    /// At most this many keys per table and category.
    pub limit: u32,
    pub timeout: Option<Duration>,
}

/// `merge`.
#[derive(Debug, Clone)]
pub struct MergeConfig {
    pub conn: ConnSpec,
    /// A registered node id or a conninfo, passed to the server as given.
    pub peer: String,
    pub patterns: Vec<TablePattern>,
    /// As the server takes it (checked there).
    pub strategy: String,
    pub dry_run: bool,
    pub parallel: u32,
    pub timeout: Option<Duration>,
}

/// What to run.
#[derive(Debug, Clone)]
pub enum Action {
    Health(ConnSpec),
    Generate(GenerateConfig),
    Apply(ApplyConfig),
    Progress { conn: ConnSpec, id: String, follow: bool, timeout: Option<Duration> },
    List { conn: ConnSpec, status: Option<String>, limit: i32 },
    Cancel { conn: ConnSpec, id: String },
    Verify { dir: PathBuf, deep: bool },
    Inspect { dir: PathBuf },
    Node { conn: ConnSpec, action: NodeAction },
    Schema { conn: ConnSpec, action: SchemaAction },
    ReplicaInit(ReplicaInitConfig),
    ReplicaStatus { target: ConnSpec },
    ReplicaSyncSequences { source: ConnSpec, target: ConnSpec, patterns: Vec<TablePattern> },
    Overlap(OverlapConfig),
    Merge(MergeConfig),
}

/// `schema ...`.
#[derive(Debug, Clone)]
pub enum SchemaAction {
    Capture { node: Option<String> },
    Compare { peer: String, all: bool, schemas: Vec<String> },
    Diff { peer: String, schema: String, table: String },
}

/// `node ...`.
#[derive(Debug, Clone)]
pub enum NodeAction {
    Register { id: String, name: Option<String>, conninfo: Option<String>, priority: i32, local: bool },
    Unregister { id: String },
    List,
    Status { id: Option<String> },
    Heartbeat { id: Option<String> },
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Machine-readable output.
    pub json: bool,
    pub action: Action,
}

impl Config {
    /// True for commands whose `--json` output is a stream of `{"event": ...}` lines (generate,
    /// apply, progress --follow); their last line always tells how they ended.
    pub fn streams_events(&self) -> bool {
        matches!(
            self.action,
            Action::Generate(_)
                | Action::Apply(_)
                | Action::Progress { follow: true, .. }
                | Action::ReplicaInit(_)
        )
    }

    /// Builds the configuration; `env` looks up PG* variables (the process environment in `main`).
    pub fn build(cli: Cli, env: impl Fn(&str) -> Option<String>) -> Result<Config, CliError> {
        let conn = || ConnSpec::resolve(cli.conn.dbname.as_deref(), &env);
        let seconds = |t: Option<u64>| t.map(Duration::from_secs);
        let action = match cli.command {
            Command::Health => Action::Health(conn()?),
            Command::Snapshot(SnapshotCommand::Generate(g)) => Action::Generate(GenerateConfig {
                conn: conn()?,
                output: g.output,
                parallel: g.parallel,
                compression: g.compression,
                patterns: g.tables,
                chunk_size: g.chunk_size,
                mode: g.mode.into(),
                detach: g.detach,
                timeout: seconds(g.wait.timeout),
            }),
            Command::Snapshot(SnapshotCommand::Apply(a)) => Action::Apply(ApplyConfig {
                conn: conn()?,
                input: a.input,
                resume: a.resume,
                parallel: a.parallel,
                verify: !a.no_verify,
                truncate: a.truncate,
                analyze: !a.no_analyze,
                mode: a.mode.into(),
                detach: a.detach,
                timeout: seconds(a.wait.timeout),
            }),
            Command::Snapshot(SnapshotCommand::Progress(p)) => Action::Progress {
                conn: conn()?,
                id: p.id,
                follow: p.follow,
                timeout: seconds(p.wait.timeout),
            },
            Command::Snapshot(SnapshotCommand::List(l)) => {
                Action::List { conn: conn()?, status: l.status, limit: l.limit }
            }
            Command::Snapshot(SnapshotCommand::Cancel(c)) => Action::Cancel { conn: conn()?, id: c.id },
            Command::Snapshot(SnapshotCommand::Verify(v)) => Action::Verify { dir: v.dir, deep: v.deep },
            Command::Snapshot(SnapshotCommand::Inspect(i)) => Action::Inspect { dir: i.dir },
            Command::Node(n) => Action::Node {
                conn: conn()?,
                action: match n {
                    NodeCommand::Register(r) => NodeAction::Register {
                        id: r.id,
                        name: r.name,
                        conninfo: r.conninfo,
                        priority: r.priority,
                        local: r.local,
                    },
                    NodeCommand::Unregister(u) => NodeAction::Unregister { id: u.id },
                    NodeCommand::List => NodeAction::List,
                    NodeCommand::Status(s) => NodeAction::Status { id: s.id },
                    NodeCommand::Heartbeat(h) => NodeAction::Heartbeat { id: h.id },
                },
            },
            Command::Replica(ReplicaCommand::Init(r)) => {
                let source = ConnSpec::resolve(Some(&r.source), &env)?;
                let target = ConnSpec::resolve(Some(&r.target), &env)?;
                for (what, name) in [("--publication", &r.publication), ("--subscription", &r.subscription)] {
                    if name.is_empty() || name.len() > 63 {
                        return Err(CliError::Usage(format!("{what} must be 1 to 63 bytes long")));
                    }
                }
                // The subscription's name is also the slot's, which PostgreSQL restricts.
                if let Err(e) = steep_repl_engine::replica::check_slot_name(&r.subscription) {
                    return Err(CliError::Usage(format!(
                        "--subscription names the replication slot too: {e}"
                    )));
                }
                // The target server keeps this conninfo in pg_subscription, readable by others: its
                // password belongs in that server's ~/.pgpass (subscribe refuses one too, but only
                // after the snapshot and the apply).
                if let Some(c) = &r.publisher_conninfo
                    && c.parse::<tokio_postgres::Config>()
                        .map(|c| c.get_password().is_some())
                        .unwrap_or(false)
                {
                    return Err(CliError::Usage(
                        "--publisher-conninfo must not hold a password: the target server reads it from its own ~/.pgpass"
                            .into(),
                    ));
                }
                Action::ReplicaInit(ReplicaInitConfig {
                    publisher_conninfo: r.publisher_conninfo.unwrap_or_else(|| source.public_conninfo()),
                    source,
                    target,
                    dir: r.dir,
                    parallel: r.parallel,
                    compression: match r.compression {
                        crate::args::Staging::Auto => None,
                        crate::args::Staging::Fixed(c) => Some(c),
                    },
                    publication: r.publication,
                    subscription: r.subscription,
                    patterns: r.tables,
                    mode: r.mode.into(),
                    wait: !r.no_wait,
                    timeout: seconds(r.wait.timeout),
                })
            }
            Command::Replica(ReplicaCommand::SyncSequences(r)) => Action::ReplicaSyncSequences {
                source: ConnSpec::resolve(Some(&r.source), &env)?,
                target: ConnSpec::resolve(Some(&r.target), &env)?,
                patterns: r.tables,
            },
            Command::Replica(ReplicaCommand::Status(r)) => {
                Action::ReplicaStatus { target: ConnSpec::resolve(Some(&r.target), &env)? }
            }
            Command::Overlap(o) => Action::Overlap(OverlapConfig {
                conn: conn()?,
                peer: o.peer,
                patterns: o.tables,
                parallel: o.parallel,
                detailed: o.detailed,
                limit: o.limit,
                timeout: seconds(o.wait.timeout),
            }),
            Command::Merge(m) => Action::Merge(MergeConfig {
                conn: conn()?,
                peer: m.peer,
                patterns: m.tables,
                strategy: m.strategy,
                dry_run: m.dry_run,
                parallel: m.parallel,
                timeout: seconds(m.wait.timeout),
            }),
            Command::Schema(sc) => Action::Schema {
                conn: conn()?,
                action: match sc {
                    SchemaCommand::Capture(c) => SchemaAction::Capture { node: c.node },
                    SchemaCommand::Compare(c) => {
                        SchemaAction::Compare { peer: c.peer, all: c.all, schemas: c.schemas }
                    }
                    SchemaCommand::Diff(d) => {
                        let (schema, table) = match d.table.split_once('.') {
                            Some((s, t)) if !s.is_empty() && !t.is_empty() => (s.to_string(), t.to_string()),
                            None if !d.table.is_empty() => ("public".to_string(), d.table.clone()),
                            _ => {
                                return Err(CliError::Usage(format!(
                                    "--table wants schema.table or table, not {:?}",
                                    d.table
                                )));
                            }
                        };
                        SchemaAction::Diff { peer: d.peer, schema, table }
                    }
                },
            },
        };
        Ok(Config { json: cli.json, action })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn offline_commands_need_no_connection() {
        // A broken PGPORT only matters to commands that connect.
        let env = |k: &str| (k == "PGPORT").then(|| "fifty".to_string());
        let cli = Cli::try_parse_from(["steep-repl", "snapshot", "verify", "/x", "--deep"]).unwrap();
        assert!(matches!(Config::build(cli, env).unwrap().action, Action::Verify { deep: true, .. }));
        let cli = Cli::try_parse_from(["steep-repl", "health"]).unwrap();
        assert_eq!(Config::build(cli, env).unwrap_err().exit_code(), crate::error::EXIT_CONNECTION);
    }

    #[test]
    fn apply_flags_become_settings() {
        let cli = Cli::try_parse_from([
            "steep-repl",
            "--json",
            "snapshot",
            "apply",
            "--input",
            "/s",
            "--no-verify",
            "--truncate",
            "--client",
            "--timeout",
            "9",
        ])
        .unwrap();
        let c = Config::build(cli, |_| None).unwrap();
        assert!(c.json);
        let Action::Apply(a) = c.action else { panic!("not apply") };
        assert!(!a.verify && a.truncate && a.analyze);
        assert_eq!(a.mode, ModeChoice::Client);
        assert_eq!(a.timeout, Some(Duration::from_secs(9)));
    }

    #[test]
    fn overlap_flags_become_settings() {
        let cli = Cli::try_parse_from([
            "steep-repl",
            "--json",
            "overlap",
            "--peer",
            "replica-2",
            "--table",
            "sales.*",
            "--detailed",
            "--timeout",
            "30",
        ])
        .unwrap();
        let c = Config::build(cli, |_| None).unwrap();
        // One JSON document at the end, not a stream of events.
        assert!(c.json && !c.streams_events());
        let Action::Overlap(o) = c.action else { panic!("not overlap") };
        assert_eq!(o.peer, "replica-2");
        assert_eq!(o.patterns.len(), 1);
        assert!(o.detailed);
        assert_eq!((o.limit, o.parallel), (1000, 4));
        assert_eq!(o.timeout, Some(Duration::from_secs(30)));
    }
}

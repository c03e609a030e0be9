//! One module per command; `run` dispatches.

mod apply;
mod cancel;
mod generate;
mod health;
mod inspect;
mod list;
mod merge;
mod node;
mod overlap;
mod progress;
mod replica;
mod schema;
mod verify;

use crate::config::{Action, Config};
use crate::error::CliError;

/// Runs the configured command.
pub async fn run(config: Config) -> Result<(), CliError> {
    let json = config.json;
    match config.action {
        Action::Health(conn) => health::run(&conn, json).await,
        Action::Generate(cfg) => generate::run(cfg, json).await,
        Action::Apply(cfg) => apply::run(cfg, json).await,
        Action::Progress { conn, id, follow, timeout } => {
            progress::run(&conn, &id, follow, timeout, json).await
        }
        Action::List { conn, status, limit } => list::run(&conn, status.as_deref(), limit, json).await,
        Action::Cancel { conn, id } => cancel::run(&conn, &id, json).await,
        Action::Verify { dir, deep } => verify::run(&dir, deep, json).await,
        Action::Inspect { dir } => inspect::run(&dir, json),
        Action::Node { conn, action } => node::run(&conn, action, json).await,
        Action::Schema { conn, action } => schema::run(&conn, action, json).await,
        Action::ReplicaInit(cfg) => replica::init(cfg, json).await,
        Action::ReplicaStatus { target } => replica::status(&target, json).await,
        Action::ReplicaSyncSequences { source, target, patterns } => {
            replica::sync_sequences_command(&source, &target, &patterns, json).await
        }
        Action::Overlap(cfg) => overlap::run(cfg, json).await,
        Action::Merge(cfg) => merge::run(cfg, json).await,
    }
}

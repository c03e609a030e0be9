//! One module per command; `run` dispatches.

mod health;

use crate::args::{Cli, Command};
use crate::conn::ConnSpec;
use crate::error::CliError;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let conn = || ConnSpec::resolve(cli.conn.dbname.as_deref(), |k| std::env::var(k).ok());
    match cli.command {
        Command::Health => health::run(&conn()?, cli.json).await,
    }
}

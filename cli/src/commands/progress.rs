//! `steep-repl snapshot progress ID [--follow]`.

use std::time::Duration;

use serde_json::Value;

use crate::conn::ConnSpec;
use crate::error::CliError;
use crate::follow::{self, Follow};
use crate::output::{self, outln};
use crate::progress;
use crate::signals::Interrupt;

/// Prints the operation's progress once, or follows it to its end (exiting with its outcome's code).
pub async fn run(
    conn: &ConnSpec,
    id: &str,
    follow_it: bool,
    timeout: Option<Duration>,
    json: bool,
) -> Result<(), CliError> {
    if follow_it {
        let mut interrupt = Interrupt::new()?;
        let mut reporter = progress::reporter(json);
        let end = follow::follow(
            Follow { conn, id, timeout, reporter: reporter.as_mut(), interrupt: &mut interrupt },
            None,
        )
        .await?;
        return end.conclude(id, "direct", reporter.as_mut());
    }
    let client = conn.connect().await?;
    let row = client
        .query_opt("SELECT * FROM steep_repl.snapshot_progress($1)", &[&id])
        .await
        .map_err(CliError::query(format!("steep_repl.snapshot_progress('{id}')")))?
        .ok_or_else(|| CliError::Other(anyhow::anyhow!("no operation with id {id:?}")))?;
    let fields = output::row_to_json(&row);
    if json {
        outln!("{}", Value::Object(fields));
    } else {
        output::print_fields(&fields);
    }
    Ok(())
}

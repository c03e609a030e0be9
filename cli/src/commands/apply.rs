//! `steep-repl snapshot apply`: direct (`start_apply` / `resume_apply` in the server, followed by
//! LISTEN) or client mode.

use crate::client::apply::{self as client_apply, ApplyJob};
use crate::commands::generate::{detached, server_path};
use crate::config::ApplyConfig;
use crate::error::{CliError, VERIFICATION_FAILED_PREFIX};
use crate::follow::{self, CHANNEL, Follow};
use crate::mode::{self, Mode, ModeChoice};
use crate::progress::{self, Reporter, Started};
use crate::signals::Interrupt;

/// Runs `snapshot apply`.
pub async fn run(cfg: ApplyConfig, json: bool) -> Result<(), CliError> {
    if let (ModeChoice::Direct, Some(input)) = (cfg.mode, &cfg.input) {
        server_path(input, "--input")?;
    }
    let mut interrupt = Interrupt::new()?;
    let mut reporter = progress::reporter(json);
    let client = cfg.conn.connect().await?;
    let db = cfg.conn.config.get_dbname().unwrap_or("?").to_string();
    let choice = if cfg.resume.is_some() { ModeChoice::Direct } else { cfg.mode };
    let (mode, reason) = mode::choose(&client, choice, &db).await?;
    match (mode, &cfg.input) {
        (Mode::Direct, _) => {
            drop(client);
            direct(&cfg, reason, reporter.as_mut(), &mut interrupt, json).await
        }
        (Mode::Client, Some(input)) => {
            let job = ApplyJob {
                conn: cfg.conn.clone(),
                input: input.clone(),
                parallel: cfg.parallel,
                verify: cfg.verify,
                truncate: cfg.truncate,
                analyze: cfg.analyze,
            };
            client_apply::run(&job, client, reason, reporter.as_mut(), &mut interrupt).await
        }
        (Mode::Client, None) => Err(CliError::Usage("--input is required in client mode".into())),
    }
}

/// Maps the synchronous errors of `start_apply` for snapshot `path` onto the exit codes of §5.
fn start_error(path: &str, e: tokio_postgres::Error) -> CliError {
    let err = CliError::query("steep_repl.start_apply")(e);
    let dir = std::path::PathBuf::from(path);
    let message = err.server_message().unwrap_or_default();
    match err.sqlstate() {
        // Missing tables or sequences, column mismatches: one message listing every problem.
        Some("42P01") | Some("42804") => {
            let problems = message
                .split_once("): ")
                .map(|(_, list)| list.split("; ").map(str::to_string).collect())
                .unwrap_or_else(|| vec![message.clone()]);
            CliError::SchemaMismatch { problems }
        }
        // An incomplete snapshot, a manifest that fails its checks.
        Some("58P01") | Some("XX001") => CliError::VerifyFailed { dir, problems: vec![message] },
        _ if message.starts_with(VERIFICATION_FAILED_PREFIX) => {
            CliError::VerifyFailed { dir, problems: vec![message] }
        }
        _ => err,
    }
}

/// Starts (or resumes) the job in the server and follows it.
async fn direct(
    cfg: &ApplyConfig,
    reason: String,
    reporter: &mut dyn Reporter,
    interrupt: &mut Interrupt,
    json: bool,
) -> Result<(), CliError> {
    let listener = cfg.conn.connect_listening(CHANNEL).await?;
    let (id, path): (String, Option<String>) = match (&cfg.resume, &cfg.input) {
        (Some(id), _) => {
            let row = listener
                .client
                .query_one("SELECT steep_repl.resume_apply($1)", &[id])
                .await
                .map_err(CliError::query(format!("steep_repl.resume_apply('{id}')")))?;
            (row.get(0), None)
        }
        (None, Some(input)) => {
            let path = server_path(input, "--input")?;
            let parallel = cfg.parallel as i32;
            let row = listener
                .client
                .query_one(
                    "SELECT steep_repl.start_apply($1::text, $2::int4, $3::bool, $4::bool, $5::bool)",
                    &[&path, &parallel, &cfg.verify, &cfg.truncate, &cfg.analyze],
                )
                .await
                .map_err(|e| start_error(&path, e))?;
            (row.get(0), Some(path))
        }
        (None, None) => return Err(CliError::Usage("give --input DIR or --resume ID".into())),
    };
    reporter.started(&Started { op: "apply".into(), id: id.clone(), mode: "direct".into(), path, reason });
    if cfg.detach {
        return detached(&cfg.conn, &id, reporter, json);
    }
    let end = follow::follow(
        Follow { conn: &cfg.conn, id: &id, timeout: cfg.timeout, reporter, interrupt },
        Some(listener),
    )
    .await?;
    end.conclude(&id, "direct", reporter)
}

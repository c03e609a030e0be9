//! `steep-repl snapshot generate`: direct (server workers, followed by LISTEN) or client mode.

use crate::output::outln;
use std::path::Path;

use crate::client::generate::{self as client_generate, GenerateJob};
use crate::config::GenerateConfig;
use crate::error::CliError;
use crate::follow::{self, CHANNEL, Follow};
use crate::mode::{self, Mode, ModeChoice};
use crate::progress::{self, Reporter, Started};
use crate::signals::Interrupt;
use steep_repl_engine::plan::DEFAULT_CHUNK_BYTES;

/// Runs `snapshot generate`.
pub async fn run(cfg: GenerateConfig, json: bool) -> Result<(), CliError> {
    if cfg.mode == ModeChoice::Direct {
        server_path(&cfg.output, "--output")?;
    }
    let mut interrupt = Interrupt::new()?;
    let mut reporter = progress::reporter(json);
    let client = cfg.conn.connect().await?;
    let db = cfg.conn.config.get_dbname().unwrap_or("?").to_string();
    let (mode, reason) = mode::choose(&client, cfg.mode, &db).await?;
    match mode {
        Mode::Direct => {
            drop(client);
            direct(&cfg, reason, reporter.as_mut(), &mut interrupt, json).await
        }
        Mode::Client => {
            let job = GenerateJob {
                conn: cfg.conn.clone(),
                output: cfg.output.clone(),
                parallel: cfg.parallel,
                compression: cfg.compression,
                patterns: cfg.patterns.clone(),
                chunk_bytes: cfg.chunk_size.unwrap_or(DEFAULT_CHUNK_BYTES),
                slot: None,
            };
            client_generate::run(&job, client, reason, reporter.as_mut(), &mut interrupt).await
        }
    }
}

/// A server-side path as SQL text: absolute (it is resolved on the server) and valid UTF-8.
pub fn server_path(path: &Path, flag: &str) -> Result<String, CliError> {
    if !path.is_absolute() {
        return Err(CliError::Usage(format!(
            "{flag} {} must be an absolute path: in direct mode it is a path on the database server (use \
             --client to write on this machine)",
            path.display()
        )));
    }
    path.to_str()
        .map(|s| s.trim_end_matches('/').to_string())
        .ok_or_else(|| CliError::Usage(format!("{flag} {} is not valid UTF-8", path.display())))
}

/// Starts the job with `start_snapshot` and follows it.
async fn direct(
    cfg: &GenerateConfig,
    reason: String,
    reporter: &mut dyn Reporter,
    interrupt: &mut Interrupt,
    json: bool,
) -> Result<(), CliError> {
    let path = server_path(&cfg.output, "--output")?;
    let listener = cfg.conn.connect_listening(CHANNEL).await?;
    if let Some(bytes) = cfg.chunk_size {
        let sql = format!("SET steep_repl.chunk_size = '{}kB'", bytes.div_ceil(1024));
        listener.client.batch_execute(&sql).await.map_err(CliError::query(sql.clone()))?;
    }
    let patterns: Option<Vec<String>> = if cfg.patterns.is_empty() {
        None
    } else {
        Some(cfg.patterns.iter().map(|p| p.as_str().to_string()).collect())
    };
    let parallel = cfg.parallel as i32;
    let compression = cfg.compression.to_string();
    let id: String = listener
        .client
        .query_one(
            "SELECT steep_repl.start_snapshot($1::text, $2::int4, $3::text, $4::text[])",
            &[&path, &parallel, &compression, &patterns],
        )
        .await
        .map_err(CliError::query("steep_repl.start_snapshot"))?
        .get(0);
    reporter.started(&Started {
        op: "generate".into(),
        id: id.clone(),
        mode: "direct".into(),
        path: Some(path),
        reason,
    });
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

/// `--detach`: prints the id on stdout (in JSON mode the `started` event holds it) and how to follow
/// or cancel the job on stderr.
pub fn detached(
    conn: &crate::conn::ConnSpec,
    id: &str,
    reporter: &mut dyn Reporter,
    json: bool,
) -> Result<(), CliError> {
    if !json {
        outln!("{id}");
    }
    for h in follow::hints(conn, id) {
        reporter.note(&h);
    }
    Ok(())
}

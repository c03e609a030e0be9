//! Direct or client mode: what the flags ask for, or else what the server offers.

use tokio_postgres::Client;

use crate::args::ModeArgs;
use crate::error::CliError;

/// Where a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In the server's background workers.
    Direct,
    /// In this process, over ordinary connections.
    Client,
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeChoice {
    Direct,
    Client,
    Auto,
}

impl From<ModeArgs> for ModeChoice {
    fn from(m: ModeArgs) -> Self {
        match (m.direct, m.client) {
            (true, _) => ModeChoice::Direct,
            (_, true) => ModeChoice::Client,
            _ => ModeChoice::Auto,
        }
    }
}

/// What the server says about steep_repl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSupport {
    /// Installed in this database and preloaded: version.
    Ready(String),
    /// Installed (version) but the library is not in shared_preload_libraries.
    NotPreloaded(String),
    /// Not installed in this database.
    NotInstalled,
}

/// Asks the server whether steep_repl is installed in this database and preloaded.
pub async fn server_support(client: &Client) -> Result<ServerSupport, CliError> {
    let version: Option<String> = client
        .query_opt("SELECT extversion::text FROM pg_catalog.pg_extension WHERE extname = 'steep_repl'", &[])
        .await
        .map_err(CliError::query("checking for the steep_repl extension"))?
        .map(|r| r.get(0));
    let Some(version) = version else {
        return Ok(ServerSupport::NotInstalled);
    };
    let preloaded: bool = client
        .query_one("SELECT preloaded FROM steep_repl.health()", &[])
        .await
        .map_err(CliError::query("steep_repl.health()"))?
        .try_get::<_, Option<bool>>(0)
        .ok()
        .flatten()
        .unwrap_or(false);
    Ok(if preloaded { ServerSupport::Ready(version) } else { ServerSupport::NotPreloaded(version) })
}

/// Decides the mode and says why. `--direct` on a server without the extension is an error naming
/// what is missing; `--client` is always possible.
pub async fn choose(client: &Client, choice: ModeChoice, db: &str) -> Result<(Mode, String), CliError> {
    if choice == ModeChoice::Client {
        return Ok((Mode::Client, "--client given".to_string()));
    }
    let support = server_support(client).await?;
    match (choice, support) {
        (ModeChoice::Client, _) => Ok((Mode::Client, "--client given".to_string())),
        (ModeChoice::Direct, ServerSupport::Ready(v)) => {
            Ok((Mode::Direct, format!("--direct given, steep_repl {v}")))
        }
        (ModeChoice::Auto, ServerSupport::Ready(v)) => {
            Ok((Mode::Direct, format!("steep_repl {v} is installed in database {db} and preloaded")))
        }
        (ModeChoice::Direct, ServerSupport::NotPreloaded(_)) => Err(CliError::Other(anyhow::anyhow!(
            "--direct needs steep_repl preloaded: set shared_preload_libraries = 'steep_repl' on the server and \
             restart it, or use --client"
        ))),
        (ModeChoice::Direct, ServerSupport::NotInstalled) => Err(CliError::Other(anyhow::anyhow!(
            "--direct needs the steep_repl extension in database {db}: run CREATE EXTENSION steep_repl (with \
             shared_preload_libraries = 'steep_repl'), or use --client"
        ))),
        (_, ServerSupport::NotPreloaded(v)) => Ok((
            Mode::Client,
            format!(
                "steep_repl {v} is installed in database {db} but not preloaded (shared_preload_libraries)"
            ),
        )),
        (_, ServerSupport::NotInstalled) => {
            Ok((Mode::Client, format!("the steep_repl extension is not installed in database {db}")))
        }
    }
}

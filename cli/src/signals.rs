//! Ctrl-C (SIGINT) and SIGTERM, caught from the moment an [`Interrupt`] exists, so a signal that
//! arrives while a job is being started is not lost (the default action would kill the process and
//! leave the user without the job's id).

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::error::CliError;

/// Receives SIGINT and SIGTERM.
pub struct Interrupt {
    int: Signal,
    term: Signal,
}

impl Interrupt {
    /// Installs the handlers (must run inside the runtime).
    pub fn new() -> Result<Self, CliError> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| CliError::Other(anyhow::anyhow!("cannot catch {name}: {e}")))
        };
        Ok(Interrupt {
            int: install(SignalKind::interrupt(), "SIGINT")?,
            term: install(SignalKind::terminate(), "SIGTERM")?,
        })
    }

    /// Waits for the next signal and names it. Cancel-safe (usable in `select!`).
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

//! `steep-repl`: the command-line front of steep-repl. It parses arguments ([`args`]), builds the
//! configuration of one command ([`config`]) and runs it ([`commands`]); errors carry their exit code
//! ([`error`]). Direct mode drives the server's workers and follows them ([`follow`]); client mode runs
//! the engine in this process ([`client`]); [`progress`] shows either.

mod args;
mod client;
mod commands;
mod config;
mod conn;
mod error;
mod follow;
mod mode;
mod output;
mod progress;
mod signals;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let config = match config::Config::build(cli, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("steep-repl: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("steep-repl: cannot start the async runtime: {e}");
            return ExitCode::from(error::EXIT_ERROR);
        }
    };
    let json_events = config.json && config.streams_events();
    let result = runtime.block_on(commands::run(config));
    // Writer and reader threads have finished by now; do not wait for idle blocking threads.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("steep-repl: {e}");
            if json_events {
                // The last line of JSON output always says how the command ended.
                output::outln!(
                    "{}",
                    serde_json::json!({ "event": "error", "exit_code": e.exit_code(), "message": e.to_string() })
                );
            }
            ExitCode::from(e.exit_code())
        }
    }
}

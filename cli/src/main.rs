//! `steep-repl`: the command-line front of steep-repl. It parses arguments ([`args`]), builds a
//! connection configuration ([`conn`]) and runs one command ([`commands`]); errors carry their exit code
//! ([`error`]).

mod args;
mod commands;
mod conn;
mod error;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("steep-repl: cannot start the async runtime: {e}");
            return ExitCode::from(error::EXIT_ERROR);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("steep-repl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

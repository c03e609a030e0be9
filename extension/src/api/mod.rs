//! The SQL surface of schema `steep_repl`, one file per family of functions.

pub mod apply;
pub mod health;
pub mod progress;
pub mod snapshot;

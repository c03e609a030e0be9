//! Background worker entry points.

pub mod generate;
pub mod supervisor;

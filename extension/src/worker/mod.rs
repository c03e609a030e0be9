//! Background worker entry points.

pub mod apply;
pub mod generate;
pub mod supervisor;

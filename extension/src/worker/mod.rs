//! Background worker entry points.

pub mod supervisor;

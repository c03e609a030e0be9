//! Background worker entry points.

pub mod apply;
pub mod generate;
pub mod indexes;
pub mod merge;
pub mod overlap;
pub mod prober;
pub mod reaper;
pub mod supervisor;

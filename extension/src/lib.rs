//! `steep_repl`: the PostgreSQL side of steep-repl.
//!
//! This crate only translates PostgreSQL into engine calls; the snapshot format lives in
//! `steep_repl_engine`. Layout:
//! - [`api`]: the SQL surface, one file per family of functions;
//! - [`pg`]: every call into PostgreSQL's C API that needs `unsafe`, each wrapped once with its invariant;
//!   [`pg::rights`] is the one place where rights change;
//! - [`bookkeeping`]: every statement on steep_repl's own tables;
//! - [`job`]: the lives of leaders and workers, shared by every kind of job; [`limits`]: the server
//!   limits a job can hit and the settings to raise;
//! - [`shmem`]: the shared-memory slot arrays that workers coordinate through;
//! - [`worker`]: background worker entry points;
//! - [`gucs`]: the `steep_repl.*` settings;
//! - [`peer`]: every connection from this server to another; [`nodes`]: what a probe of a peer asks and
//!   what its answer means.
//!
//! Most of the SQL API needs `shared_preload_libraries = 'steep_repl'` (shared memory and workers can only
//! be set up at server start). Loaded any other way, `health()` still answers and reports
//! `preloaded = false`, and everything else raises an error that says so.

use pgrx::prelude::*;

pub mod api;
pub mod bookkeeping;
pub mod gucs;
pub mod job;
pub mod limits;
pub mod nodes;
pub mod peer;
pub mod pg;
pub mod progress;
pub mod shmem;
pub mod worker;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../sql/nodes.sql", name = "nodes", requires = ["schema"]);
pgrx::extension_sql_file!("../sql/subscriptions.sql", name = "subscriptions", requires = ["schema"]);
pgrx::extension_sql_file!(
    "../sql/schema_fingerprints.sql",
    name = "schema_fingerprints",
    requires = ["schema"]
);
pgrx::extension_sql_file!("../sql/overlap.sql", name = "overlap", requires = ["schema"]);
pgrx::extension_sql_file!("../sql/merge.sql", name = "merge", requires = ["schema"]);

/// Called by PostgreSQL when the library is loaded: at server start under `shared_preload_libraries`, or
/// on first use in a backend otherwise.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    if pg::loading_for_preload() {
        shmem::init();
        worker::supervisor::register();
        pg::mark_preloaded();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`: settings for the test cluster it starts.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'steep_repl'", "max_worker_processes = 32", "wal_level = logical"]
    }
}

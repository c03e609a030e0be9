//! `#[pg_test]`s: run inside a cluster started by `cargo pgrx test` with the library preloaded (see
//! `pg_test::postgresql_conf_options` in lib.rs). Each test runs in a transaction that is rolled back.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn version_matches_crate() {
        assert_eq!(crate::api::health::version_for_tests(), env!("CARGO_PKG_VERSION"));
        let sql_version = Spi::get_one::<String>("SELECT steep_repl.version()").unwrap();
        assert_eq!(sql_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    }

    #[pg_test]
    fn health_reports_preloaded_server() {
        let (status, preloaded, ext_version) = Spi::get_three::<String, bool, String>(
            "SELECT status, preloaded, extension_version FROM steep_repl.health()",
        )
        .unwrap();
        assert_eq!(preloaded, Some(true));
        assert_eq!(ext_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
        // The supervisor may still be starting when the first test runs; either way the status names it.
        let status = status.unwrap();
        assert!(status == "ok" || status.contains("supervisor"), "unexpected status {status:?}");
        let pg_version =
            Spi::get_one::<String>("SELECT pg_version FROM steep_repl.health()").unwrap().unwrap();
        assert!(pg_version.starts_with("PostgreSQL "), "{pg_version}");
    }

    #[pg_test]
    fn health_reaps_dead_operations_and_shows_the_last_error() {
        Spi::run(
            "INSERT INTO steep_repl.snapshots (id, op, status, path, parallel_requested, error, finished_at) VALUES \
             ('g1', 'generate', 'running', '/tmp/a', 2, NULL, NULL), \
             ('g2', 'generate', 'failed', '/tmp/b', 2, 'disk full', now() - interval '1 minute')",
        )
        .unwrap();
        // g1 says it runs, but no job of this server holds it: health() reaps it first, so it is
        // neither counted as active nor left looking alive.
        let (active, last_error) =
            Spi::get_two::<i64, String>("SELECT active_operations, last_error FROM steep_repl.health()")
                .unwrap();
        assert_eq!(active, Some(0));
        let last_error = last_error.unwrap_or_default();
        assert!(last_error.starts_with("g1: interrupted: the job's leader process ended"), "{last_error}");
        let g1 = Spi::get_one::<String>("SELECT status FROM steep_repl.snapshots WHERE id = 'g1'").unwrap();
        assert_eq!(g1.as_deref(), Some("failed"));
        Spi::run("DELETE FROM steep_repl.snapshots WHERE id = 'g1'").unwrap();
        let last_error = Spi::get_one::<String>("SELECT last_error FROM steep_repl.health()").unwrap();
        assert_eq!(last_error.as_deref(), Some("g2: disk full"));
    }

    #[pg_test]
    fn free_worker_slots_bounded_by_settings() {
        let (free, max_workers) = Spi::get_two::<i32, i32>(
            "SELECT free_worker_slots, current_setting('steep_repl.max_workers')::int FROM steep_repl.health()",
        )
        .unwrap();
        let free = free.unwrap();
        assert!(free >= 0 && free <= max_workers.unwrap(), "free {free}");
    }

    #[pg_test]
    fn settings_have_documented_defaults() {
        assert_eq!(Spi::get_one::<String>("SHOW steep_repl.chunk_size").unwrap().as_deref(), Some("256MB"));
        assert_eq!(
            Spi::get_one::<String>("SHOW steep_repl.progress_interval").unwrap().as_deref(),
            Some("500ms")
        );
        assert_eq!(Spi::get_one::<String>("SHOW steep_repl.max_workers").unwrap().as_deref(), Some("8"));
        Spi::run("SET steep_repl.chunk_size = '1MB'").unwrap();
        assert_eq!(Spi::get_one::<String>("SHOW steep_repl.chunk_size").unwrap().as_deref(), Some("1MB"));
    }

    #[pg_test(
        error = "1 kB is outside the valid range for parameter \"steep_repl.chunk_size\" (64 .. 1073741823)"
    )]
    fn chunk_size_has_a_floor() {
        Spi::run("SET steep_repl.chunk_size = '1kB'").unwrap();
    }

    #[pg_test]
    fn work_queue_has_partial_index_on_pending() {
        let def =
            Spi::get_one::<String>("SELECT pg_get_indexdef('steep_repl.work_queue_pending_idx'::regclass)")
                .unwrap()
                .unwrap();
        assert!(def.contains("WHERE (status = 'pending'::text)"), "{def}");
    }

    #[pg_test]
    fn status_values_are_constrained() {
        let r = std::panic::catch_unwind(|| {
            Spi::run(
                "INSERT INTO steep_repl.snapshots (id, op, status, path, parallel_requested) VALUES ('x', 'generate', 'bogus', '/t', 1)",
            )
        });
        assert!(r.is_err() || r.unwrap().is_err());
    }

    #[pg_test]
    fn progress_is_empty_without_jobs() {
        let n = Spi::get_one::<i64>("SELECT count(*) FROM steep_repl.snapshot_progress()").unwrap();
        assert_eq!(n, Some(0));
    }

    #[pg_test]
    fn supervisor_worker_is_running() {
        // The supervisor connects to no database, so pg_stat_activity never lists it; its heartbeat in
        // shared memory is what health() reads. It may still be starting when the first test runs.
        let mut running = false;
        for _ in 0..50 {
            running = Spi::get_one::<bool>("SELECT supervisor_running FROM steep_repl.health()").unwrap()
                == Some(true);
            if running {
                break;
            }
            Spi::run("SELECT pg_sleep(0.1)").unwrap();
        }
        assert!(running, "supervisor heartbeat never seen");
        let status = Spi::get_one::<String>("SELECT status FROM steep_repl.health()").unwrap();
        assert_eq!(status.as_deref(), Some("ok"));
    }
}

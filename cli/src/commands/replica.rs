//! `steep-repl replica init` and `replica status` (PRODUCT.md §7).
//!
//! `init` runs, in order: a preflight of both servers that lists every problem at once and changes
//! nothing; the publication on the source (created when missing, before the slot); a snapshot with a
//! logical slot (`start_snapshot(..., slot => subscription)`); the apply on the target; the hand-off
//! (`steep_repl.subscribe` on the target, which checks the publisher and advances the subscription's
//! origin to the slot's consistent point); and a wait until the subscription has caught up with the
//! source's WAL position taken just after the hand-off.
//!
//! Every step's state lives in the servers' own tables, so a rerun of the same command continues from
//! the last completed step: the source's `steep_repl.snapshots` says whether a snapshot of DIR with this
//! slot completed (or still runs: it is followed), the target's whether its apply completed (or runs, or
//! failed: it is followed or resumed), and the target's `steep_repl.subscriptions` whether the hand-off
//! was made. A finished apply is never repeated and no second slot is created.

use std::time::{Duration, Instant};

use serde_json::json;
use steep_repl_engine::catalog;
use steep_repl_engine::chunk::Compression;
use steep_repl_engine::compat;
use steep_repl_engine::filter::TablePattern;
use steep_repl_engine::ident::{QualifiedName, quote_ident};
use steep_repl_engine::manifest::{Manifest, SequenceEntry};
use steep_repl_engine::plan::DEFAULT_CHUNK_BYTES;
use steep_repl_engine::replica::{
    HandOff, PublisherFacts, hand_off_statements, publisher_check_sql, publisher_problems,
};
use tokio_postgres::Client;

use crate::client::apply::{self as client_apply, ApplyJob};
use crate::client::generate::{self as client_generate, GenerateJob};
use crate::commands::generate::server_path;
use crate::config::ReplicaInitConfig;
use crate::conn::ConnSpec;
use crate::error::CliError;
use crate::follow::{self, CHANNEL, Follow};
use crate::mode::{self, ModeChoice, ServerSupport};
use crate::output::{self, outln};
use crate::progress::{self, Reporter, Started};
use crate::signals::Interrupt;

/// How often the catch-up wait looks at the subscription.
const CATCH_UP_POLL: Duration = Duration::from_millis(200);

/// An operation row of `steep_repl.snapshots`: id and status.
#[derive(Debug, Clone)]
struct Op {
    id: String,
    status: String,
}

/// Runs `replica init`.
pub async fn init(cfg: ReplicaInitConfig, json: bool) -> Result<(), CliError> {
    let started = Instant::now();
    let mut interrupt = Interrupt::new()?;
    let mut reporter = progress::reporter(json);
    let source = cfg.source.connect().await?;
    let target = cfg.target.connect().await?;
    // Asked once: the lookups of earlier steps read steep_repl's tables only where it is ready (the
    // preflight names what is missing).
    let (source_ready, target_ready) = (has_steep_repl(&source).await?, has_steep_repl(&target).await?);
    let direct = match cfg.mode {
        ModeChoice::Direct => true,
        ModeChoice::Client => false,
        ModeChoice::Auto => source_ready && target_ready,
    };
    if !direct {
        reporter.note(&format!(
            "replica: client mode ({}): the data moves through this machine, in {}",
            if cfg.mode == ModeChoice::Client {
                "--client given"
            } else {
                "steep_repl is not ready on both servers"
            },
            cfg.dir.display()
        ));
        return init_client(&cfg, source, target, reporter.as_mut(), &mut interrupt, started, json).await;
    }
    let dir = server_path(&cfg.dir, "--dir")?;
    let slot = cfg.subscription.as_str();

    let handed_off = match target_ready {
        true => hand_off_made(&target, &cfg.subscription, &dir).await?,
        false => None,
    };
    let generate = match source_ready {
        true => latest_generate(&source, &dir, slot).await?,
        false => None,
    };
    let apply = match (&generate, target_ready) {
        (Some(g), true) => latest_apply(&target, &dir, &g.id).await?,
        _ => None,
    };
    let start_lsn = match handed_off {
        Some(lsn) => {
            reporter.note(&format!(
                "replica: subscription {} was already started from {dir} at {lsn}; waiting for catch-up",
                cfg.subscription
            ));
            lsn
        }
        None => {
            let applied = apply.as_ref().is_some_and(|a| a.status == "applied");
            let generated = generate.as_ref().is_some_and(|g| g.status == "complete");
            reporter.note("replica: [1/6] preflight");
            let done = Done {
                snapshot: generate.as_ref().is_some_and(|g| g.status == "complete" || is_running(&g.status)),
                apply: apply.is_some(),
            };
            let tables = preflight(&cfg, &source, &target, true, done).await?;

            reporter.note(&format!("replica: [2/6] publication {}", cfg.publication));
            ensure_publication(&source, &cfg, &tables, done.snapshot).await?;

            let snapshot_id = match generate {
                Some(g) if generated => {
                    reporter.note(&format!("replica: [3/6] snapshot {} of {dir} already complete", g.id));
                    g.id
                }
                Some(g) if is_running(&g.status) => {
                    reporter.note(&format!("replica: [3/6] snapshot {} still runs; following it", g.id));
                    run_job(&cfg.source, &g.id, "generate", &dir, &mut *reporter, &mut interrupt, &cfg)
                        .await?;
                    g.id
                }
                _ => {
                    let (compression, why) = staging(&source, &cfg, &tables, &dir, true).await;
                    reporter.note(&format!(
                        "replica: [3/6] snapshot of the source into {dir} with slot {slot}, {why}"
                    ));
                    let id = start_generate(&source, &cfg, &dir, compression).await?;
                    run_job(&cfg.source, &id, "generate", &dir, &mut *reporter, &mut interrupt, &cfg).await?;
                    id
                }
            };

            match apply {
                Some(a) if applied => {
                    reporter.note(&format!("replica: [4/6] apply {} already complete", a.id));
                }
                Some(a) if is_running(&a.status) => {
                    reporter.note(&format!("replica: [4/6] apply {} still runs; following it", a.id));
                    run_job(&cfg.target, &a.id, "apply", &dir, &mut *reporter, &mut interrupt, &cfg).await?;
                }
                Some(a) => {
                    reporter.note(&format!("replica: [4/6] resuming apply {} ({})", a.id, a.status));
                    let id: String =
                        query_one(&target, "SELECT steep_repl.resume_apply($1)", &[&a.id]).await?;
                    run_job(&cfg.target, &id, "apply", &dir, &mut *reporter, &mut interrupt, &cfg).await?;
                }
                None => {
                    reporter.note(&format!("replica: [4/6] apply of snapshot {snapshot_id} into the target"));
                    let parallel = cfg.parallel as i32;
                    let id: String =
                        query_one(&target, "SELECT steep_repl.start_apply($1, $2)", &[&dir, &parallel])
                            .await?;
                    run_job(&cfg.target, &id, "apply", &dir, &mut *reporter, &mut interrupt, &cfg).await?;
                }
            }

            reporter.note(&format!("replica: [5/6] subscription {} at the slot's LSN", cfg.subscription));
            let publications = vec![cfg.publication.clone()];
            query_one::<String>(
                &target,
                "SELECT steep_repl.subscribe($1, $2, $3, $4)::text",
                &[&cfg.subscription, &cfg.publisher_conninfo, &publications, &dir],
            )
            .await?
        }
    };

    finish(&cfg, &source, &target, &mut interrupt, started, &dir, &start_lsn, json).await
}

/// The end of both modes: the catch-up wait (unless --no-wait), sequences set again, the summary.
#[allow(clippy::too_many_arguments)]
async fn finish(
    cfg: &ReplicaInitConfig,
    source: &Client,
    target: &Client,
    interrupt: &mut Interrupt,
    started: Instant,
    dir: &str,
    start_lsn: &str,
    json: bool,
) -> Result<(), CliError> {
    let caught_up = if cfg.wait {
        // Notes go to stderr, as the reporters' do.
        eprintln!("replica: [6/6] waiting for the subscription to catch up");
        let c = catch_up(cfg, source, target, interrupt, started).await?;
        let n = sync_sequences(source, target, &cfg.patterns).await?;
        eprintln!(
            "replica: {n} sequence(s) set from the source (logical replication carries none: run `steep-repl replica sync-sequences` again at switchover)"
        );
        Some(c)
    } else {
        None
    };
    let elapsed = started.elapsed().as_secs_f64();
    let summary = json!({
        "event": "replica",
        "subscription": cfg.subscription,
        "publication": cfg.publication,
        "slot": cfg.subscription,
        "dir": dir,
        "start_lsn": start_lsn,
        "caught_up": caught_up.is_some(),
        "caught_up_lsn": caught_up.as_ref().map(|c| c.lsn.clone()),
        "lag_bytes": caught_up.as_ref().map(|c| c.lag_bytes),
        "elapsed_s": elapsed,
    });
    if json {
        outln!("{summary}");
    } else {
        match caught_up {
            Some(c) => outln!(
                "replica: subscription {} streams from {start_lsn}; caught up with {} in {} (lag now {})",
                cfg.subscription,
                c.lsn,
                output::duration(elapsed),
                output::bytes(c.lag_bytes)
            ),
            None => outln!(
                "replica: subscription {} enabled at {start_lsn}; follow it with: steep-repl replica status --target {}",
                cfg.subscription,
                output::shell_quote(&cfg.target.public_conninfo())
            ),
        }
    }
    Ok(())
}

/// Steps already done, for the preflight: what no longer needs checking.
#[derive(Debug, Clone, Copy)]
struct Done {
    /// A snapshot with the slot completed or runs (the slot exists and is ours).
    snapshot: bool,
    /// An apply of it completed, runs or can be resumed (the target is no longer empty).
    apply: bool,
}

/// Client mode: the snapshot is generated into the local DIR through a replication connection that
/// creates the slot, applied from there (resumable through its state file), and the hand-off is made
/// over the target connection with the same statements `steep_repl.subscribe` runs. The steps' state:
/// DIR's manifest (snapshot complete, with this slot), its apply state file (apply complete), and the
/// target's subscription on that slot (hand-off made).
async fn init_client(
    cfg: &ReplicaInitConfig,
    source: Client,
    target: Client,
    reporter: &mut dyn Reporter,
    interrupt: &mut Interrupt,
    started: Instant,
    json: bool,
) -> Result<(), CliError> {
    let slot = cfg.subscription.as_str();
    let dir = std::path::absolute(&cfg.dir).map_err(CliError::io("resolve", &cfg.dir))?;
    let dir_text = dir.display().to_string();
    let manifest = Manifest::load(&dir).ok().filter(|m| m.snapshot.replication_slot.as_deref() == Some(slot));
    let subscribed: Option<String> = target
        .query_opt(
            "SELECT s.subslotname::text FROM pg_catalog.pg_subscription s \
             JOIN pg_catalog.pg_database d ON d.oid = s.subdbid AND d.datname = pg_catalog.current_database() \
             WHERE s.subname = $1",
            &[&cfg.subscription],
        )
        .await
        .map_err(CliError::query("reading the target's subscriptions"))?
        .map(|r| r.get(0));
    if let (Some(m), Some(on)) = (&manifest, &subscribed)
        && on == slot
    {
        reporter.note(&format!(
            "replica: subscription {} was already started from {dir_text} at {}; waiting for catch-up",
            cfg.subscription, m.snapshot.lsn
        ));
        let lsn = m.snapshot.lsn.clone();
        return finish(cfg, &source, &target, interrupt, started, &dir_text, &lsn, json).await;
    }
    let state_exists = std::fs::read_dir(&dir)
        .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with("apply-state.")))
        .unwrap_or(false);
    reporter.note("replica: [1/6] preflight");
    let tables =
        preflight(cfg, &source, &target, false, Done { snapshot: manifest.is_some(), apply: state_exists })
            .await?;
    reporter.note(&format!("replica: [2/6] publication {}", cfg.publication));
    ensure_publication(&source, cfg, &tables, manifest.is_some()).await?;
    let manifest = match manifest {
        Some(m) => {
            reporter
                .note(&format!("replica: [3/6] snapshot {} in {dir_text} already complete", m.snapshot_id));
            m
        }
        None => {
            let (compression, why) = staging(&source, cfg, &tables, &dir_text, false).await;
            reporter.note(&format!(
                "replica: [3/6] snapshot of the source into {dir_text} with slot {slot}, {why}"
            ));
            let job = GenerateJob {
                conn: cfg.source.clone(),
                output: dir.clone(),
                parallel: cfg.parallel,
                compression,
                patterns: cfg.patterns.clone(),
                chunk_bytes: DEFAULT_CHUNK_BYTES,
                slot: Some(slot.to_string()),
            };
            let coordinator = cfg.source.connect().await?;
            client_generate::run(&job, coordinator, "replica init".into(), reporter, interrupt).await?;
            Manifest::load(&dir).map_err(|e| CliError::Other(anyhow::anyhow!("{}: {e}", dir.display())))?
        }
    };
    reporter.note(&format!("replica: [4/6] apply of snapshot {} into the target", manifest.snapshot_id));
    let job = ApplyJob {
        conn: cfg.target.clone(),
        input: dir.clone(),
        parallel: cfg.parallel,
        verify: true,
        truncate: false,
        analyze: true,
    };
    let coordinator = cfg.target.connect().await?;
    client_apply::run(&job, coordinator, "replica init".into(), reporter, interrupt).await?;

    reporter.note(&format!("replica: [5/6] subscription {} at the slot's LSN", cfg.subscription));
    let publications = vec![cfg.publication.clone()];
    let version: String =
        query_one(&source, "SELECT pg_catalog.current_setting('server_version_num')", &[]).await?;
    let sql = publisher_check_sql(&manifest, slot, &publications, version.parse().unwrap_or(0));
    let row = source.query_one(sql.as_str(), &[]).await.map_err(CliError::query("checking the publisher"))?;
    let facts = PublisherFacts::from_columns(|c| {
        PublisherFacts::COLUMNS
            .iter()
            .position(|x| *x == c)
            .and_then(|i| row.try_get::<_, Option<String>>(i).ok().flatten())
    });
    let problems = publisher_problems(&facts, &manifest, slot);
    if !problems.is_empty() {
        return Err(CliError::Other(anyhow::anyhow!("cannot subscribe: {}", problems.join("; "))));
    }
    let statements = hand_off_statements(&HandOff {
        subscription: &cfg.subscription,
        conninfo: &cfg.publisher_conninfo,
        publications: &publications,
        slot,
        lsn: &manifest.snapshot.lsn,
        sequences: &manifest.sequences,
        enabled: true,
    });
    let mut sql = String::from("BEGIN;");
    for st in &statements {
        sql.push_str(st);
        sql.push(';');
    }
    sql.push_str("COMMIT;");
    if let Err(e) = target.batch_execute(&sql).await {
        let _rolled_back = target.batch_execute("ROLLBACK").await;
        return Err(CliError::query("handing off the subscription")(e));
    }
    let lsn = manifest.snapshot.lsn.clone();
    finish(cfg, &source, &target, interrupt, started, &dir_text, &lsn, json).await
}

fn is_running(status: &str) -> bool {
    matches!(status, "pending" | "running")
}

async fn query_one<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<T, CliError> {
    let row = client.query_one(sql, params).await.map_err(CliError::query(sql.to_string()))?;
    row.try_get(0).map_err(CliError::query(sql.to_string()))
}

/// The LSN of the hand-off already made for `subscription` from `dir`, if the subscription exists.
async fn hand_off_made(target: &Client, subscription: &str, dir: &str) -> Result<Option<String>, CliError> {
    let row = target
        .query_opt(
            "SELECT r.start_lsn::text FROM steep_repl.subscriptions r \
             JOIN pg_catalog.pg_subscription s ON s.subname = r.subscription \
             JOIN pg_catalog.pg_database d ON d.oid = s.subdbid AND d.datname = pg_catalog.current_database() \
             WHERE r.subscription = $1 AND r.snapshot_path = $2 ORDER BY r.created_at DESC LIMIT 1",
            &[&subscription, &dir],
        )
        .await
        .map_err(CliError::query("reading the target's hand-offs"))?;
    Ok(row.map(|r| r.get(0)))
}

async fn has_steep_repl(client: &Client) -> Result<bool, CliError> {
    Ok(matches!(mode::server_support(client).await?, ServerSupport::Ready(_)))
}

/// The newest snapshot of `dir` taken with `slot` on the source.
async fn latest_generate(source: &Client, dir: &str, slot: &str) -> Result<Option<Op>, CliError> {
    let row = source
        .query_opt(
            "SELECT id, status FROM steep_repl.snapshots \
             WHERE op = 'generate' AND path = $1 AND options->>'slot' = $2 \
             ORDER BY created_at DESC LIMIT 1",
            &[&dir, &slot],
        )
        .await
        .map_err(CliError::query("reading the source's snapshots"))?;
    Ok(row.map(|r| Op { id: r.get(0), status: r.get(1) }))
}

/// The newest apply of snapshot `snapshot_id` from `dir` in the target.
async fn latest_apply(target: &Client, dir: &str, snapshot_id: &str) -> Result<Option<Op>, CliError> {
    let row = target
        .query_opt(
            "SELECT id, status FROM steep_repl.snapshots \
             WHERE op = 'apply' AND path = $1 AND options->>'snapshot_id' = $2 \
               AND database_name = pg_catalog.current_database() \
             ORDER BY created_at DESC LIMIT 1",
            &[&dir, &snapshot_id],
        )
        .await
        .map_err(CliError::query("reading the target's applies"))?;
    Ok(row.map(|r| Op { id: r.get(0), status: r.get(1) }))
}

/// A source table as the preflight sees it.
struct SourceTable {
    oid: u32,
    name: QualifiedName,
    /// Whether UPDATE and DELETE can be published: a primary key, a replica identity index, or FULL.
    identity: bool,
    partitioned: bool,
    /// Logged (unlogged tables cannot be published: their data is copied once, never replicated).
    permanent: bool,
}

const SOURCE_TABLES_SQL: &str = "\
SELECT n.nspname::text, c.relname::text, c.relkind = 'p', \
       CASE c.relreplident \
         WHEN 'f' THEN true \
         WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
         WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) \
         ELSE false END, \
       c.oid::int8, c.relpersistence = 'p' \
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
WHERE c.relkind IN ('r', 'p') \
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'steep_repl') AND n.nspname NOT LIKE 'pg\\_%' \
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass \
                  AND d.objid = c.oid AND d.deptype = 'e')";

/// The source's user tables that `patterns` select (all when empty).
async fn source_tables(source: &Client, patterns: &[TablePattern]) -> Result<Vec<SourceTable>, CliError> {
    let rows =
        source.query(SOURCE_TABLES_SQL, &[]).await.map_err(CliError::query("listing the source's tables"))?;
    Ok(rows
        .iter()
        .map(|r| SourceTable {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            partitioned: r.get(2),
            identity: r.get(3),
            oid: r.get::<_, i64>(4) as u32,
            permanent: r.get(5),
        })
        .filter(|t| patterns.is_empty() || patterns.iter().any(|p| p.matches(&t.name.schema, &t.name.name)))
        .collect())
}

/// One query's facts about a server.
async fn facts(client: &Client, sql: &str) -> Result<tokio_postgres::Row, CliError> {
    client.query_one(sql, &[]).await.map_err(CliError::query(sql.to_string()))
}

/// Every check of §7's preflight that still matters at this step; one error lists every problem.
/// Returns the source tables the selection takes (the publication is made of them).
async fn preflight(
    cfg: &ReplicaInitConfig,
    source: &Client,
    target: &Client,
    direct: bool,
    done: Done,
) -> Result<Vec<SourceTable>, CliError> {
    let mut problems: Vec<String> = Vec::new();
    let mut schema_problems = 0usize;
    let slot = cfg.subscription.as_str();
    for (who, client) in [("source", source), ("target", target)].into_iter().filter(|_| direct) {
        match mode::server_support(client).await? {
            ServerSupport::Ready(_) => {}
            ServerSupport::NotPreloaded(_) => problems.push(format!(
                "{who}: steep_repl is installed but not preloaded (shared_preload_libraries = 'steep_repl', then restart)"
            )),
            ServerSupport::NotInstalled => {
                problems.push(format!("{who}: steep_repl is not installed in this database (CREATE EXTENSION steep_repl)"))
            }
        }
    }
    let snapshot_done = done.snapshot;
    let s = facts(
        source,
        &format!(
            "SELECT pg_catalog.current_setting('wal_level'), \
                    (SELECT rolsuper OR rolreplication FROM pg_catalog.pg_roles WHERE rolname = current_user), \
                    pg_catalog.current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_catalog.pg_replication_slots)::int, \
                    pg_catalog.current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_catalog.pg_stat_replication)::int, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = {})",
            steep_repl_engine::ident::quote_literal(slot)
        ),
    )
    .await?;
    let (wal_level, may_replicate, free_slots, free_senders, slot_exists): (String, bool, i32, i32, bool) =
        (s.get(0), s.get(1), s.get(2), s.get(3), s.get(4));
    if wal_level != "logical" {
        problems.push(format!(
            "source: wal_level is {wal_level}; logical replication needs wal_level = logical (then restart)"
        ));
    }
    if !may_replicate {
        problems.push(
            "source: the role needs the REPLICATION attribute or superuser to create a replication slot"
                .into(),
        );
    }
    if !snapshot_done {
        if free_slots <= 0 {
            problems
                .push("source: every replication slot is in use: raise max_replication_slots by 1".into());
        }
        if slot_exists {
            problems.push(format!(
                "source: replication slot {slot} already exists and no snapshot of {} uses it: drop it or choose another --subscription",
                cfg.dir.display()
            ));
        }
    }
    if free_senders <= 0 {
        problems.push("source: every WAL sender is in use: raise max_wal_senders by 1".into());
    }
    let tables = source_tables(source, &cfg.patterns).await?;
    if tables.is_empty() {
        problems.push("source: no table matches".into());
    }
    let publication_exists: bool = query_one(
        source,
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)",
        &[&cfg.publication],
    )
    .await?;
    if publication_exists {
        problems.extend(publication_problems(source, cfg, &tables).await?);
    }
    for t in publishable(&tables).into_iter().filter(|t| !t.identity) {
        problems.push(format!(
            "source: table {} has neither a primary key nor a replica identity: its UPDATEs and DELETEs cannot be replicated (add a primary key, or ALTER TABLE ... REPLICA IDENTITY)",
            t.name
        ));
    }
    let t = facts(
        target,
        "SELECT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), \
                pg_catalog.current_setting('server_version_num')::int",
    )
    .await?;
    let (superuser, target_version): (bool, i32) = (t.get(0), t.get(1));
    if !superuser && target_version < 160000 {
        problems.push("target: creating a subscription needs a superuser on PostgreSQL 15".into());
    }
    let subscription_exists: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_subscription s JOIN pg_catalog.pg_database d \
             ON d.oid = s.subdbid WHERE d.datname = pg_catalog.current_database() AND s.subname = $1)",
            &[&cfg.subscription],
        )
        .await
        .map_err(CliError::query("reading the target's subscriptions"))?
        .get(0);
    if subscription_exists {
        problems.push(format!(
            "target: subscription {} already exists and was not started from {}: drop it or choose another --subscription",
            cfg.subscription,
            cfg.dir.display()
        ));
    }
    // The target's tables: the same catalog query on both sides, the same check as an apply's.
    let wanted: Vec<QualifiedName> =
        tables.iter().filter(|t| !t.partitioned).map(|t| t.name.clone()).collect();
    let mut schemas: Vec<String> = tables.iter().map(|t| t.name.schema.clone()).collect();
    schemas.sort();
    schemas.dedup();
    let (src_tables, _) = compat::targets_from_schema(&client_apply::target_objects(source, &schemas).await?);
    let wanted_tables: Vec<_> = src_tables
        .into_iter()
        .filter(|t| wanted.iter().any(|w| w.schema == t.schema && w.name == t.name))
        .collect();
    let sequences: Vec<QualifiedName> = source_sequences(source, &cfg.patterns, &tables)
        .await?
        .into_iter()
        .map(|s| QualifiedName::new(s.schema, s.name))
        .collect();
    for s in &sequences {
        if !schemas.contains(&s.schema) {
            schemas.push(s.schema.clone());
        }
    }
    let (dst_tables, dst_sequences) =
        compat::targets_from_schema(&client_apply::target_objects(target, &schemas).await?);
    for p in compat::check_tables(&wanted_tables, &sequences, &dst_tables, &dst_sequences) {
        schema_problems += 1;
        problems.push(format!("target: {p}"));
    }
    if !done.apply && schema_problems == 0 {
        for name in non_empty(target, &wanted).await? {
            problems.push(format!(
                "target: table {name} is not empty: a replica starts from empty tables (TRUNCATE it first)"
            ));
        }
    }
    if problems.is_empty() {
        return Ok(tables);
    }
    let schema_only = schema_problems == problems.len();
    Err(CliError::Preflight { problems, schema_only })
}

/// The tables of `names` that hold at least one row, a few hundred per query.
async fn non_empty(client: &Client, names: &[QualifiedName]) -> Result<Vec<String>, CliError> {
    let mut found = Vec::new();
    for batch in names.chunks(200) {
        let parts: Vec<String> = batch
            .iter()
            .map(|n| {
                format!(
                    "SELECT {} WHERE EXISTS (SELECT 1 FROM {n})",
                    steep_repl_engine::ident::quote_literal(&n.to_string())
                )
            })
            .collect();
        let sql = parts.join(" UNION ALL ");
        for r in client
            .query(sql.as_str(), &[])
            .await
            .map_err(CliError::query("checking that the target is empty"))?
        {
            found.push(r.get::<_, String>(0));
        }
    }
    Ok(found)
}

/// The source's sequences that go with the selection (all, or those of the selected tables and those
/// the patterns match), with their values now.
async fn source_sequences(
    source: &Client,
    patterns: &[TablePattern],
    tables: &[SourceTable],
) -> Result<Vec<SequenceEntry>, CliError> {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rows = crate::client::generate::sequence_rows(source).await?;
    catalog::select_sequences(rows, patterns, &oids)
        .map_err(|e| CliError::Other(anyhow::anyhow!("reading the source's sequences: {e}")))
}

/// Copies the current values of the source's sequences (of the selection) to the target, in one
/// transaction: logical replication carries no sequence, so they are set at the hand-off (from the
/// manifest), again once caught up, and at switchover by `replica sync-sequences`. Returns how many.
pub async fn sync_sequences(
    source: &Client,
    target: &Client,
    patterns: &[TablePattern],
) -> Result<usize, CliError> {
    let tables = source_tables(source, patterns).await?;
    let sequences = source_sequences(source, patterns, &tables).await?;
    let mut sql = String::from("BEGIN;");
    for s in &sequences {
        let q = QualifiedName::new(s.schema.clone(), s.name.clone()).to_string();
        sql.push_str(&format!(
            "SELECT pg_catalog.setval({}::pg_catalog.regclass, {}, {});",
            steep_repl_engine::ident::quote_literal(&q),
            s.last_value,
            s.is_called
        ));
    }
    sql.push_str("COMMIT;");
    target.batch_execute(&sql).await.map_err(CliError::query("setting the target's sequences"))?;
    Ok(sequences.len())
}

/// Creates the publication when missing, for exactly the tables the snapshot takes (the selection's
/// permanent plain tables and partitions). Not `FOR ALL TABLES`: that would also publish extensions'
/// tables (steep_repl's own bookkeeping among them), which no snapshot holds.
///
/// `slot_made`: the snapshot, and so its slot, exists already (a rerun). A publication missing then was
/// dropped after the slot: one created now would come after the slot's consistent point, and pgoutput,
/// which reads publications as of each change it decodes, fails on the changes before it. Refused.
async fn ensure_publication(
    source: &Client,
    cfg: &ReplicaInitConfig,
    tables: &[SourceTable],
    slot_made: bool,
) -> Result<(), CliError> {
    let exists: bool = query_one(
        source,
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)",
        &[&cfg.publication],
    )
    .await?;
    if exists {
        return Ok(());
    }
    if slot_made {
        return Err(CliError::Other(anyhow::anyhow!(
            "publication {} was dropped on the source after the snapshot's slot {} was created: a publication \
             made again now would not cover the slot's first changes, and the subscription would stop on them. \
             Start over: drop the slot on the source (SELECT pg_drop_replication_slot('{}')), empty the \
             target's tables and remove {}",
            cfg.publication,
            cfg.subscription,
            cfg.subscription.replace('\'', "''"),
            cfg.dir.display()
        )));
    }
    let names: Vec<String> = publishable(tables).iter().map(|t| t.name.to_string()).collect();
    let sql = format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(&cfg.publication), names.join(", "));
    source
        .batch_execute(&sql)
        .await
        .map_err(CliError::query(format!("creating publication {}", cfg.publication)))
}

/// The tables a publication carries: permanent plain tables and partitions (a partitioned table's
/// changes are published through its partitions; unlogged tables cannot be published).
fn publishable(tables: &[SourceTable]) -> Vec<&SourceTable> {
    tables.iter().filter(|t| !t.partitioned && t.permanent).collect()
}

/// What is wrong with an existing publication for this selection: tables it leaves out or adds, row
/// filters, actions it skips.
async fn publication_problems(
    source: &Client,
    cfg: &ReplicaInitConfig,
    tables: &[SourceTable],
) -> Result<Vec<String>, CliError> {
    let version: String =
        query_one(source, "SELECT pg_catalog.current_setting('server_version_num')", &[]).await?;
    let filter =
        if version.parse::<u32>().unwrap_or(0) >= 150000 { "pt.rowfilter IS NOT NULL" } else { "false" };
    let rows = source
        .query(
            &format!(
                "SELECT pt.schemaname::text, pt.tablename::text, {filter} FROM pg_catalog.pg_publication_tables pt \
                 WHERE pt.pubname = $1"
            ),
            &[&cfg.publication],
        )
        .await
        .map_err(CliError::query("reading the publication's tables"))?;
    let published: Vec<(QualifiedName, bool)> = rows
        .iter()
        .map(|r| (QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)), r.get(2)))
        .collect();
    let wanted = publishable(tables);
    let mut problems = Vec::new();
    let left_out: Vec<String> = wanted
        .iter()
        .filter(|t| !published.iter().any(|(p, _)| *p == t.name))
        .map(|t| t.name.to_string())
        .collect();
    if !left_out.is_empty() {
        problems.push(format!(
            "source: publication {} leaves out {} (their changes would never arrive): ALTER PUBLICATION ... ADD TABLE",
            cfg.publication,
            left_out.join(", ")
        ));
    }
    let extra: Vec<String> = published
        .iter()
        .filter(|(p, _)| !wanted.iter().any(|t| t.name == *p))
        .map(|(p, _)| p.to_string())
        .collect();
    if !extra.is_empty() {
        problems.push(format!(
            "source: publication {} also publishes {}, which the snapshot does not take (their earlier rows would be missing): use --table or another publication",
            cfg.publication,
            extra.join(", ")
        ));
    }
    let filtered: Vec<String> = published.iter().filter(|(_, f)| *f).map(|(p, _)| p.to_string()).collect();
    if !filtered.is_empty() {
        problems.push(format!(
            "source: publication {} filters rows of {}: the replica would not be a copy",
            cfg.publication,
            filtered.join(", ")
        ));
    }
    let partial: bool = query_one(
        source,
        "SELECT NOT (pubinsert AND pubupdate AND pubdelete AND pubtruncate) FROM pg_catalog.pg_publication WHERE pubname = $1",
        &[&cfg.publication],
    )
    .await?;
    if partial {
        problems.push(format!(
            "source: publication {} does not publish every INSERT, UPDATE, DELETE and TRUNCATE",
            cfg.publication
        ));
    }
    Ok(problems)
}

/// The snapshot's compression, and the words saying which and why: as `--compression` gave it, or
/// (auto) uncompressed when `dir` (on the source server, or here) has room for it
/// (`steep_repl_engine::space::replica_staging`), zstd:1 otherwise or when the room cannot be read.
async fn staging(
    source: &Client,
    cfg: &ReplicaInitConfig,
    tables: &[SourceTable],
    dir: &str,
    on_server: bool,
) -> (Compression, String) {
    if let Some(c) = cfg.compression {
        return (c, format!("compression {c}"));
    }
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let table_bytes = source
        .query_one(
            "SELECT coalesce(sum(pg_catalog.pg_table_size(o)), 0)::int8 FROM pg_catalog.unnest($1::pg_catalog.oid[]) o",
            &[&oids],
        )
        .await
        .map(|r| r.get::<_, i64>(0).max(0) as u64);
    let free = if on_server {
        source
            .query_one("SELECT steep_repl.free_space($1)", &[&dir])
            .await
            .map(|r| r.get::<_, i64>(0).max(0) as u64)
            .map_err(|e| e.to_string())
    } else {
        steep_repl_engine::space::free_bytes(std::path::Path::new(dir)).map_err(|e| e.to_string())
    };
    match (table_bytes, free) {
        (Ok(table_bytes), Ok(free)) => {
            let c = steep_repl_engine::space::replica_staging(free, table_bytes);
            let how = if c == Compression::None { "uncompressed" } else { "compressed with zstd:1" };
            (
                c,
                format!(
                    "{how} ({} free there, tables of {} on disk; --compression chooses)",
                    output::bytes(free),
                    output::bytes(table_bytes)
                ),
            )
        }
        (Err(e), _) => {
            (Compression::Zstd { level: 1 }, format!("compressed with zstd:1 (tables' size unknown: {e})"))
        }
        (_, Err(e)) => {
            (Compression::Zstd { level: 1 }, format!("compressed with zstd:1 (free space unknown: {e})"))
        }
    }
}

/// Starts the snapshot with the slot; returns its id.
async fn start_generate(
    source: &Client,
    cfg: &ReplicaInitConfig,
    dir: &str,
    compression: Compression,
) -> Result<String, CliError> {
    let patterns: Option<Vec<String>> = if cfg.patterns.is_empty() {
        None
    } else {
        Some(cfg.patterns.iter().map(|p| p.as_str().to_string()).collect())
    };
    let parallel = cfg.parallel as i32;
    let compression = compression.to_string();
    query_one(
        source,
        "SELECT steep_repl.start_snapshot($1::text, $2::int4, $5::text, $3::text[], NULL, $4::text)",
        &[&dir, &parallel, &patterns, &cfg.subscription, &compression],
    )
    .await
}

/// Follows job `id` on the server of `conn` until it ends; an unsuccessful end is an error.
async fn run_job(
    conn: &ConnSpec,
    id: &str,
    op: &str,
    dir: &str,
    reporter: &mut dyn Reporter,
    interrupt: &mut Interrupt,
    cfg: &ReplicaInitConfig,
) -> Result<(), CliError> {
    reporter.started(&Started {
        op: op.into(),
        id: id.to_string(),
        mode: "direct".into(),
        path: Some(dir.to_string()),
        reason: "replica init".into(),
    });
    let listener = conn.connect_listening(CHANNEL).await?;
    let end = follow::follow(Follow { conn, id, timeout: cfg.timeout, reporter, interrupt }, Some(listener))
        .await?;
    end.conclude(id, "direct", reporter)
}

/// Where the subscription stood when it had caught up.
struct CaughtUp {
    lsn: String,
    lag_bytes: u64,
}

/// Waits until the subscription has received everything the source had written just after the
/// hand-off: its `latest_end_lsn` (or the slot's confirmed position) passes that WAL position.
async fn catch_up(
    cfg: &ReplicaInitConfig,
    source: &Client,
    target: &Client,
    interrupt: &mut Interrupt,
    started: Instant,
) -> Result<CaughtUp, CliError> {
    let goal: String = query_one(source, "SELECT pg_catalog.pg_current_wal_lsn()::text", &[]).await?;
    loop {
        let received: Option<String> = target
            .query_opt(
                "SELECT st.latest_end_lsn::text FROM pg_catalog.pg_stat_subscription st \
                 WHERE st.subname = $1 AND st.relid IS NULL AND st.latest_end_lsn >= $2::text::pg_lsn",
                &[&cfg.subscription, &goal],
            )
            .await
            .map_err(CliError::query("reading pg_stat_subscription"))?
            .map(|r| r.get(0));
        let confirmed: Option<String> = source
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots \
                 WHERE slot_name = $1 AND confirmed_flush_lsn >= $2::text::pg_lsn",
                &[&cfg.subscription, &goal],
            )
            .await
            .map_err(CliError::query("reading pg_replication_slots"))?
            .map(|r| r.get(0));
        if let Some(lsn) = received.or(confirmed) {
            let lag: i64 = query_one(
                source,
                "SELECT greatest(0, pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), $1::text::pg_lsn))::int8",
                &[&lsn],
            )
            .await?;
            return Ok(CaughtUp { lsn, lag_bytes: lag.max(0) as u64 });
        }
        if let Some(limit) = cfg.timeout
            && started.elapsed() > limit
        {
            return Err(CliError::TimedOut {
                id: cfg.subscription.clone(),
                seconds: limit.as_secs(),
                hints: vec![format!(
                    "watch it: steep-repl replica status --target {}",
                    output::shell_quote(&cfg.target.public_conninfo())
                )],
            });
        }
        tokio::select! {
            _ = interrupt.recv() => {
                return Err(CliError::Detached {
                    id: cfg.subscription.clone(),
                    hints: vec![format!(
                        "the subscription is enabled; watch it: steep-repl replica status --target {}",
                        output::shell_quote(&cfg.target.public_conninfo())
                    )],
                });
            }
            _ = tokio::time::sleep(CATCH_UP_POLL) => {}
        }
    }
}

/// Runs `replica sync-sequences`.
pub async fn sync_sequences_command(
    source: &ConnSpec,
    target: &ConnSpec,
    patterns: &[TablePattern],
    json: bool,
) -> Result<(), CliError> {
    let (s, t) = (source.connect().await?, target.connect().await?);
    let n = sync_sequences(&s, &t, patterns).await?;
    if json {
        outln!("{}", json!({ "sequences_set": n }));
    } else {
        outln!("{n} sequence(s) set on the target from the source");
    }
    Ok(())
}

/// Runs `replica status`: one line (or JSON object) per subscription of the target database.
pub async fn status(target: &ConnSpec, json: bool) -> Result<(), CliError> {
    let client = target.connect().await?;
    let with_steep = has_steep_repl(&client).await?;
    let hand_off = if with_steep {
        "(SELECT r.start_lsn::text FROM steep_repl.subscriptions r WHERE r.subscription = s.subname \
          ORDER BY r.created_at DESC LIMIT 1)"
    } else {
        "NULL::text"
    };
    let sql = format!(
        "SELECT s.subname::text AS subscription, s.subenabled AS enabled, \
                CASE WHEN NOT s.subenabled THEN 'disabled' WHEN st.pid IS NULL THEN 'down' ELSE 'streaming' END AS state, \
                st.pid AS pid, st.received_lsn::text AS received_lsn, st.latest_end_lsn::text AS latest_end_lsn, \
                extract(epoch FROM pg_catalog.now() - st.last_msg_receipt_time)::float8 AS last_message_age_s, \
                extract(epoch FROM st.last_msg_receipt_time - st.last_msg_send_time)::float8 AS transit_s, \
                {hand_off} AS start_lsn, \
                (SELECT count(*) FROM pg_catalog.pg_subscription_rel sr WHERE sr.srsubid = s.oid AND sr.srsubstate <> 'r')::int8 AS tables_not_ready \
         FROM pg_catalog.pg_subscription s \
         JOIN pg_catalog.pg_database d ON d.oid = s.subdbid AND d.datname = pg_catalog.current_database() \
         LEFT JOIN pg_catalog.pg_stat_subscription st ON st.subid = s.oid AND st.relid IS NULL \
         ORDER BY s.subname"
    );
    let rows = client.query(sql.as_str(), &[]).await.map_err(CliError::query("reading the subscriptions"))?;
    if json {
        let list: Vec<_> = rows.iter().map(output::row_to_json).collect();
        outln!("{}", serde_json::Value::Array(list.into_iter().map(serde_json::Value::Object).collect()));
        return Ok(());
    }
    if rows.is_empty() {
        outln!("no subscription in this database");
    }
    for r in &rows {
        let fields = output::row_to_json(r);
        output::print_fields(&fields);
        outln!("");
    }
    Ok(())
}

//! Indexes an apply builds after the data instead of maintaining them row by row.
//!
//! Loading rows into a table with a B-tree costs one index insert per row and index (about a fifth of a
//! load's CPU on the bench datasets); building the index once the rows are in is one sort, run by the
//! server's parallel index build. pg_restore and pgcopydb order a restore that way. An apply does the
//! same for the tables it loads that are large enough to gain (`steep_repl.apply_index_defer_size`):
//!
//! 1. **Defer** (leader, before the data phase): each eligible index or key constraint is dropped in the
//!    transaction that records, in `steep_repl.apply_deferred_indexes`, the statements that re-create it
//!    exactly: its definition from `pg_get_indexdef`/`pg_get_constraintdef` (under a `search_path` of
//!    `pg_catalog` only, so every name in them is qualified), its tablespace, `CLUSTER ON`, `REPLICA
//!    IDENTITY USING INDEX` and its comments. A table the leader cannot lock at once keeps its indexes.
//! 2. **Build** (a worker, as soon as the table's rows are all in, while other tables still load; the
//!    leader, after the data phase, whatever is left; and the leader after a failure or a cancel, before
//!    the job ends):
//!    each recorded index is re-created in one transaction that also deletes its record, so it exists or
//!    is recorded, never neither. Then the statements are generated again from the new index and must
//!    equal the recorded ones: the schema is what it was, or the job says what differs.
//!
//! A crash between the two leaves the records; `resume_apply` builds them (and says so before).
//!
//! Eligible: valid, live B-tree or other indexes of ordinary tables the caller owns (or acts for), plain
//! or backing a PRIMARY KEY or UNIQUE constraint, on which nothing else depends (a foreign key that
//! references it, for one; the index and the triggers of a deferrable constraint are its own parts), not attached to a partitioned index, without per-column statistics targets
//! or security labels. Exclusion constraints stay. Everything else keeps its index during the load.

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use steep_repl_engine::ident::quote_ident;
use steep_repl_engine::manifest::Manifest;

use crate::bookkeeping::indexes::{self as records, Deferred};
use crate::job::JobError;
use crate::pg::{self, xact};

/// One row per eligible index of the tables in `$1` (oids): the table's schema, name and oid, the index's
/// name, the statement that drops it, the statements that re-create it exactly, and its full definition
/// (index, constraint, storage options), compared after the rebuild. A key constraint is re-created as
/// its index (`pg_get_indexdef`, with its storage options) and `ADD CONSTRAINT ... USING INDEX`. Read
/// under `search_path = pg_catalog, pg_temp` (the leader's session), so the definitions name every
/// object with its schema, and under pg_dump's output settings ([`eligible`]), so constants print the
/// same whatever the role's settings. `$2`: the index to describe instead (by oid), for checking a
/// re-created one.
const ELIGIBLE_SQL: &str = "\
SELECT tn.nspname::pg_catalog.text, t.relname::pg_catalog.text, t.oid, ic.relname::pg_catalog.text,
       CASE WHEN c.oid IS NULL THEN pg_catalog.format('DROP INDEX %I.%I', tn.nspname, ic.relname)
            ELSE pg_catalog.format('ALTER TABLE %I.%I DROP CONSTRAINT %I', tn.nspname, t.relname, c.conname)
       END,
       pg_catalog.array_remove(ARRAY[
         pg_catalog.format('SET LOCAL default_tablespace = %L', coalesce(ts.spcname, '')),
         pg_catalog.pg_get_indexdef(i.indexrelid),
         CASE WHEN c.oid IS NOT NULL
              THEN pg_catalog.format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s USING INDEX %I%s%s', tn.nspname,
                                     t.relname, c.conname,
                                     CASE c.contype WHEN 'p' THEN 'PRIMARY KEY' ELSE 'UNIQUE' END, ic.relname,
                                     CASE WHEN c.condeferrable THEN ' DEFERRABLE' ELSE '' END,
                                     CASE WHEN c.condeferred THEN ' INITIALLY DEFERRED' ELSE '' END) END,
         CASE WHEN i.indisclustered
              THEN pg_catalog.format('ALTER TABLE %I.%I CLUSTER ON %I', tn.nspname, t.relname, ic.relname) END,
         CASE WHEN i.indisreplident
              THEN pg_catalog.format('ALTER TABLE %I.%I REPLICA IDENTITY USING INDEX %I', tn.nspname, t.relname,
                                     ic.relname) END,
         CASE WHEN di.description IS NOT NULL
              THEN pg_catalog.format('COMMENT ON INDEX %I.%I IS %L', tn.nspname, ic.relname, di.description) END,
         CASE WHEN dc.description IS NOT NULL
              THEN pg_catalog.format('COMMENT ON CONSTRAINT %I ON %I.%I IS %L', c.conname, tn.nspname, t.relname,
                                     dc.description) END
       ], NULL),
       pg_catalog.concat_ws(' | ', pg_catalog.pg_get_indexdef(i.indexrelid), pg_catalog.pg_get_constraintdef(c.oid),
                            'reloptions ' OPERATOR(pg_catalog.||) coalesce(ic.reloptions::pg_catalog.text, ''),
                            'tablespace ' OPERATOR(pg_catalog.||) coalesce(ts.spcname::pg_catalog.text, ''),
                            'owner ' OPERATOR(pg_catalog.||) ic.relowner::pg_catalog.regrole::pg_catalog.text)
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
LEFT JOIN pg_catalog.pg_tablespace ts ON ts.oid = ic.reltablespace
LEFT JOIN pg_catalog.pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
                                    AND c.contype OPERATOR(pg_catalog.<>) 'f'
LEFT JOIN pg_catalog.pg_description di ON di.objoid = i.indexrelid AND di.objsubid = 0
                                      AND di.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
LEFT JOIN pg_catalog.pg_description dc ON dc.objoid = c.oid AND dc.objsubid = 0
                                      AND dc.classoid = 'pg_catalog.pg_constraint'::pg_catalog.regclass
WHERE CASE WHEN $2::pg_catalog.oid IS NULL THEN i.indrelid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.oid[])
                                           AND i.indisvalid AND i.indisready AND i.indislive
           ELSE i.indexrelid OPERATOR(pg_catalog.=) $2::pg_catalog.oid END
  AND t.relkind OPERATOR(pg_catalog.=) 'r' AND ic.relkind OPERATOR(pg_catalog.=) 'i'
  AND (c.oid IS NULL OR c.contype OPERATOR(pg_catalog.=) ANY ('{p,u}'::pg_catalog.\"char\"[]))
  -- A key's index re-created by ADD CONSTRAINT ... USING INDEX, which takes B-trees only (PostgreSQL 18's
  -- WITHOUT OVERLAPS keys use GiST).
  AND (c.oid IS NULL OR EXISTS (SELECT FROM pg_catalog.pg_am am WHERE am.oid OPERATOR(pg_catalog.=) ic.relam
                                  AND am.amname OPERATOR(pg_catalog.=) 'btree'))
  AND pg_catalog.pg_has_role(t.relowner, 'USAGE')
  AND (ts.oid IS NULL OR pg_catalog.has_tablespace_privilege(ts.oid, 'CREATE'))
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_inherits h WHERE h.inhrelid OPERATOR(pg_catalog.=) i.indexrelid)
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                  WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                    AND d.refobjid OPERATOR(pg_catalog.=) i.indexrelid)
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                  WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_constraint'::pg_catalog.regclass
                    AND d.refobjid OPERATOR(pg_catalog.=) c.oid
                    AND d.deptype OPERATOR(pg_catalog.<>) 'i')
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) i.indexrelid
                    AND coalesce(a.attstattarget::pg_catalog.int4, -1) OPERATOR(pg_catalog.<>) -1)
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                  WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                    AND d.objid OPERATOR(pg_catalog.=) i.indexrelid AND d.deptype OPERATOR(pg_catalog.=) 'x')
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_seclabel l WHERE l.objoid OPERATOR(pg_catalog.=) i.indexrelid
                    AND l.classoid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass)
ORDER BY t.oid, ic.relname";

/// An index to defer: its record, and the statement that drops it.
struct Eligible {
    deferred: Deferred,
    drop: String,
}

fn eligible(relids: &[pg_sys::Oid], index: Option<pg_sys::Oid>) -> Vec<Eligible> {
    crate::pg::session::with_settings(steep_repl_engine::copy_text::PINNED_SETTINGS, || {
        eligible_as_pinned(relids, index)
    })
}

fn eligible_as_pinned(relids: &[pg_sys::Oid], index: Option<pg_sys::Oid>) -> Vec<Eligible> {
    Spi::connect(|client| -> Result<Vec<Eligible>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for row in client.select(ELIGIBLE_SQL, None, &[relids.to_vec().into(), index.into()])? {
            v.push(Eligible {
                deferred: Deferred {
                    schema: row.get::<String>(1)?.unwrap_or_default(),
                    table: row.get::<String>(2)?.unwrap_or_default(),
                    relid: row.get::<pg_sys::Oid>(3)?.map(|o| o.to_u32()).unwrap_or_default(),
                    index: row.get::<String>(4)?.unwrap_or_default(),
                    statements: row.get::<Vec<String>>(6)?.unwrap_or_default(),
                    definition: row.get::<String>(7)?.unwrap_or_default(),
                },
                drop: row.get::<String>(5)?.unwrap_or_default(),
            });
        }
        Ok(v)
    })
    .unwrap_or_else(|e| error!("reading the target tables' indexes: {e}"))
}

/// How an apply defers and builds its indexes, as recorded in its options when it started.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The smallest table (bytes of COPY text in the snapshot) whose indexes are deferred; None: never.
    pub defer_bytes: Option<u64>,
    /// `maintenance_work_mem` of the builds in kB; 0: the server's.
    pub memory_kb: i64,
}

impl Settings {
    /// From the caller's session (`steep_repl.apply_index_defer_size`, `steep_repl.apply_index_memory`).
    pub fn from_gucs() -> Settings {
        let kb = crate::gucs::APPLY_INDEX_DEFER_SIZE_KB.get();
        Settings {
            defer_bytes: (kb >= 0).then_some(kb as u64 * 1024),
            memory_kb: crate::gucs::APPLY_INDEX_MEMORY_KB.get().max(0) as i64,
        }
    }

    /// As an operation's options record them (`index_defer_bytes`: -1 for never).
    pub fn to_json(self) -> (i64, i64) {
        (self.defer_bytes.map(|b| b as i64).unwrap_or(-1), self.memory_kb)
    }

    /// From an operation's options; an apply recorded before these existed defers nothing.
    pub fn from_options(options: &serde_json::Value) -> Settings {
        let bytes = options.get("index_defer_bytes").and_then(|v| v.as_i64()).unwrap_or(-1);
        Settings {
            defer_bytes: (bytes >= 0).then_some(bytes as u64),
            memory_kb: options.get("index_memory_kb").and_then(|v| v.as_i64()).unwrap_or(0).max(0),
        }
    }
}

/// Drops the eligible indexes of the manifest's large tables that have rows still to load (`to_load`:
/// indexes into the manifest's tables), recording how to re-create each; returns how many. One transaction per table, so a table's indexes and their records commit together.
pub fn defer(
    id: &str,
    settings: Settings,
    manifest: &Manifest,
    relids: &[pg_sys::Oid],
    to_load: &std::collections::HashSet<usize>,
) -> Result<usize, JobError> {
    let Some(min) = settings.defer_bytes else { return Ok(0) };
    let mut large: Vec<(u64, pg_sys::Oid)> = manifest
        .tables
        .iter()
        .zip(relids)
        .enumerate()
        .filter(|(k, _)| to_load.contains(k))
        .map(|(_, (t, r))| (t.chunks.iter().map(|c| c.raw_bytes).sum::<u64>(), *r))
        .filter(|(bytes, _)| *bytes >= min && *bytes > 0)
        .collect();
    large.sort_unstable_by_key(|l| std::cmp::Reverse(l.0));
    let mut deferred = 0;
    for (_, relid) in large {
        let done = xact::try_catch(|| {
            BackgroundWorker::transaction(|| {
                // A table someone else is using keeps its indexes: never wait here (nor deadlock with a
                // session that waits for this apply).
                if !pg::try_lock_relation(relid, pg_sys::AccessExclusiveLock) {
                    return 0;
                }
                let list = eligible(&[relid], None);
                for e in &list {
                    Spi::run(&e.drop).unwrap_or_else(|err| error!("{}: {err}", e.drop));
                    records::record(id, &e.deferred);
                }
                list.len()
            })
        });
        match done {
            Ok(n) => deferred += n,
            Err(c) => {
                xact::abort_after_error();
                let name = pg::relation_name(relid).map(|(s, t)| format!("{s}.{t}")).unwrap_or_default();
                return Err(JobError::caught(Some(&format!("deferring the indexes of {name}")), &c));
            }
        }
    }
    Ok(deferred)
}

/// What one attempt to build a deferred index came to.
pub enum Built {
    /// An index was built (with a message when it came out different from what it was).
    One(Option<String>),
    /// An index could not be built: its record keeps the error, and later attempts of this run pass it
    /// over (`resume_apply` tries it again).
    Failed(String),
    /// No index is left that may be built now (the rest are being built by other processes, are waiting
    /// for their tables' data, or failed).
    Nothing,
    /// The index claimed was left for later: its table's lock is taken (only with
    /// [`LockWait::busy_skips`]).
    Busy,
}

/// Claims one deferred index of apply `id` whose table is not in `loading` (oids of tables whose rows are
/// still being loaded) and that no other process is building (`FOR UPDATE SKIP LOCKED` on its record),
/// largest table first, and builds it in the transaction that deletes its record. `helpers`: the parallel
/// index build's helper processes. `wait`: how long to wait for the table's lock. `tried`: indexes this
/// process has failed to build, passed over (grows with each failure). Call outside any transaction.
pub fn build_next(
    id: &str,
    settings: Settings,
    helpers: u32,
    loading: &[pg_sys::Oid],
    wait: &LockWait<'_>,
    tried: &mut Vec<(String, String)>,
) -> Built {
    let mut claimed: Option<Deferred> = None;
    let mut hold: Option<(pg::DeferCancel, pg::TerminateEndsProcess)> = None;
    let built = xact::try_catch(std::panic::AssertUnwindSafe(|| {
        BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
            let d = records::claim(id, loading, tried)?;
            claimed = Some(d.clone());
            // The table's lock first, while a cancel still ends the wait (a session holding a lock on it
            // for long would otherwise hold the job, and queue every later reader behind this request).
            if !lock_table(&d, wait) {
                return None;
            }
            // From here to the commit, a cancel waits: it must not roll back a finished build. Deferred,
            // not held off: with cancels held off PostgreSQL would build the index serially.
            hold = Some((pg::DeferCancel::new(), pg::TerminateEndsProcess::new()));
            pg::take_cancel_request();
            // A terminate that came before the hold (whose cancel was just taken back) ends it here.
            if pg::dying() {
                error!(
                    "terminated (SIGTERM: server shutdown or pg_terminate_backend) before building {}",
                    d.index
                );
            }
            let started = pg::now_ms();
            let differs = rebuild(id, &d, settings.memory_kb, helpers);
            debug1!(
                "steep_repl: {id} built index {} on {}.{} in {} ms (pid {})",
                d.index,
                d.schema,
                d.table,
                pg::now_ms().saturating_sub(started),
                pg::my_pid()
            );
            Some(differs)
        }))
    }));
    drop(hold);
    match (built, claimed) {
        (Ok(None), Some(_)) if !(wait.stop)() => Built::Busy,
        (Ok(None), _) => Built::Nothing,
        (Ok(Some(differs)), _) => Built::One(differs),
        (Err(_), Some(_)) if (wait.stop)() => {
            // Stopped (a cancel while it waited for the lock): not a failure of this index, which the
            // clean-up builds.
            xact::abort_after_error();
            Built::Nothing
        }
        (Err(c), Some(d)) => {
            xact::abort_after_error();
            tried.push((d.schema.clone(), d.index.clone()));
            let message =
                format!("{} on {}.{} could not be built: {}", d.index, d.schema, d.table, c.public());
            let recorded =
                xact::try_catch(|| BackgroundWorker::transaction(|| records::mark_failed(id, &d, &message)));
            if recorded.is_err() {
                xact::abort_after_error();
            }
            Built::Failed(message)
        }
        (Err(c), None) => {
            xact::abort_after_error();
            Built::Failed(format!("claiming a deferred index: {}", c.public()))
        }
    }
}

/// How a builder waits for the lock on a table that another session holds.
pub struct LockWait<'a> {
    /// Ends the wait with an ERROR when true (the job was cancelled or failed).
    pub stop: &'a dyn Fn() -> bool,
    /// Ends the wait with an ERROR naming the lock holders after this long; None: no limit.
    pub limit_ms: Option<u64>,
    /// Does not wait at all: an index whose table's lock is taken is left for later ([`Built::Busy`]).
    /// For a worker that still has rows to load.
    pub busy_skips: bool,
}

/// Takes ACCESS EXCLUSIVE on `d`'s table (what ALTER TABLE ... ADD CONSTRAINT takes; CREATE INDEX takes
/// less) without queueing behind other sessions: tries, and naps between tries, until it gets it or
/// `wait` says to stop (false) or its time is up (an ERROR).
fn lock_table(d: &Deferred, wait: &LockWait<'_>) -> bool {
    let relid = pg_sys::Oid::from(d.relid);
    let start = pg::now_ms();
    while !pg::try_lock_relation(relid, pg_sys::AccessExclusiveLock) {
        pgrx::check_for_interrupts!();
        if (wait.stop)() || wait.busy_skips {
            return false;
        }
        if wait.limit_ms.is_some_and(|limit| pg::now_ms().saturating_sub(start) > limit) {
            error!(
                "could not lock {}.{} to build {} on it: held by {}",
                d.schema,
                d.table,
                d.index,
                pg::lockers_of(relid)
            );
        }
        crate::job::nap(std::time::Duration::from_millis(50));
    }
    true
}

/// Runs `d`'s statements and deletes its record, in the caller's transaction; then reads the new index's
/// definition back: a message when it differs from what was recorded.
fn rebuild(id: &str, d: &Deferred, memory_kb: i64, helpers: u32) -> Option<String> {
    // A table dropped since has no index of ours to restore.
    let Some((schema, table)) = pg::relation_name(pg_sys::Oid::from(d.relid)) else {
        records::forget(id, d);
        return None;
    };
    // The statements name the table: renamed or moved since (and maybe another table under its old
    // name), they would build the index elsewhere. The record stays, with this error, for the DBA.
    if (schema.as_str(), table.as_str()) != (d.schema.as_str(), d.table.as_str()) {
        error!(
            "{}.{} is now named {}.{}: its index {} is not re-created (its statements name the table); \
             rename it back and run steep_repl.resume_apply('{id}'), or re-create the index from \
             steep_repl.apply_deferred_indexes",
            quote_ident(&d.schema),
            quote_ident(&d.table),
            quote_ident(&schema),
            quote_ident(&table),
            quote_ident(&d.index)
        );
    }
    // Already there exactly as it was (re-created by hand): nothing left to do.
    if let Some(existing) = index_oid(d) {
        let now = eligible(&[], Some(existing));
        if now.first().is_some_and(|e| {
            e.deferred.relid == d.relid
                && e.deferred.statements == d.statements
                && e.deferred.definition == d.definition
        }) {
            records::forget(id, d);
            return None;
        }
    }
    if memory_kb > 0 {
        Spi::run(&format!("SET LOCAL maintenance_work_mem = {memory_kb}")).unwrap_or_else(|e| error!("{e}"));
    }
    Spi::run(&format!("SET LOCAL max_parallel_maintenance_workers = {helpers}"))
        .unwrap_or_else(|e| error!("{e}"));
    for s in &d.statements {
        Spi::run(s).unwrap_or_else(|e| error!("{s}: {e}"));
    }
    records::forget(id, d);
    let now = index_oid(d).map(|i| eligible(&[], Some(i))).unwrap_or_default();
    match now.first() {
        Some(e) if e.deferred.statements == d.statements && e.deferred.definition == d.definition => None,
        Some(e) => Some(format!(
            "{} on {}.{} was re-created but differs: it was {:?} ({}), it is {:?} ({})",
            d.index,
            d.schema,
            d.table,
            d.statements,
            d.definition,
            e.deferred.statements,
            e.deferred.definition
        )),
        None => Some(format!("{} on {}.{} was re-created but is not found", d.index, d.schema, d.table)),
    }
}

/// The index named as `d`'s in its schema, if there is one now.
fn index_oid(d: &Deferred) -> Option<pg_sys::Oid> {
    Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT pg_catalog.to_regclass(pg_catalog.format('%I.%I', $1::pg_catalog.text, $2::pg_catalog.text))::pg_catalog.oid",
        &[d.schema.as_str().into(), d.index.as_str().into()],
    )
    .ok()
    .flatten()
}

/// Builds every index apply `id` has deferred that is not being built by another process and has not
/// failed in this run, largest tables first, one transaction each; `on_index` runs before each attempt.
/// Returns a message per index that came out different; [`left`] says what is still missing.
pub fn build_all(
    id: &str,
    settings: Settings,
    helpers: u32,
    wait: &LockWait<'_>,
    mut on_index: impl FnMut(),
) -> Vec<String> {
    let mut differs = Vec::new();
    let mut tried = Vec::new();
    while !pg::dying() {
        on_index();
        let failed_before = tried.len();
        match build_next(id, settings, helpers, &[], wait, &mut tried) {
            Built::One(None) => {}
            // A failure that passed no index over (claiming one failed): trying again would spin.
            Built::Failed(_) if tried.len() == failed_before => break,
            Built::Failed(_) => {}
            Built::One(Some(d)) => differs.push(d),
            Built::Nothing | Built::Busy => break,
        }
    }
    differs
}

/// One message per index apply `id` deferred and has not built (with the error of a failed build).
/// Once no process builds any more.
pub fn left(id: &str) -> Vec<String> {
    match xact::try_catch(|| BackgroundWorker::transaction(|| records::left(id))) {
        Ok(left) => left
            .into_iter()
            .map(|(d, error)| {
                error.unwrap_or_else(|| format!("{} on {}.{} (not built)", d.index, d.schema, d.table))
            })
            .collect(),
        Err(c) => {
            xact::abort_after_error();
            vec![format!("reading the indexes left to build: {}", c.public())]
        }
    }
}

/// How [`problems_note`] begins.
pub const PROBLEMS_PREFIX: &str = "indexes not as they were: ";

/// What an error message says about indexes still deferred after `problems`.
pub fn problems_note(id: &str, problems: &[String]) -> String {
    format!(
        "{PROBLEMS_PREFIX}{}; those not built are listed in steep_repl.apply_deferred_indexes, and \
         steep_repl.resume_apply('{id}') builds them",
        problems.join("; ")
    )
}

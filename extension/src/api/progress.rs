//! `steep_repl.snapshot_progress()`: live figures of running operations, read from shared memory.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;

use crate::bookkeeping::Figures;
use crate::pg::rights;
use crate::progress;
use crate::shmem;

type ProgressRow = (
    String,
    String,
    String,
    String,
    f64,
    i32,
    i32,
    i32,
    i32,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    i32,
    Vec<i32>,
    Vec<String>,
    Option<String>,
    Vec<i32>,
    Option<String>,
);

/// Live progress of one operation (`id`) or of all running ones (`id` NULL), read from shared memory
/// without touching any table. For an id that is no longer running, its last persisted figures.
/// `worker_pids` lists the leader first, then the data workers running now; `current_tables` the tables
/// those workers are reading (generate) or loading (apply) at this moment; `waiting_for` the processes
/// the leader waits for (in phase `slot`: the transactions that were running when the slot's creation
/// began, which it must outlive); `warning` what the user should know that does not stop the job (an
/// apply that will force checkpoints, naming the setting to raise).
/// Needs the library preloaded.
#[allow(clippy::type_complexity)]
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn snapshot_progress(
    id: default!(Option<String>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(id, String),
        name!(op, String),
        name!(phase, String),
        name!(status, String),
        name!(percent, f64),
        name!(tables_done, i32),
        name!(tables_total, i32),
        name!(chunks_done, i32),
        name!(chunks_total, i32),
        name!(rows, i64),
        name!(bytes, i64),
        name!(bytes_written, i64),
        name!(bytes_per_s, i64),
        name!(eta_s, Option<i64>),
        name!(workers, i32),
        name!(worker_pids, Vec<i32>),
        name!(current_tables, Vec<String>),
        name!(error, Option<String>),
        name!(waiting_for, Vec<i32>),
        name!(warning, Option<String>),
    ),
> {
    let shared = shmem::require();
    let mut rows: Vec<ProgressRow> = Vec::new();
    for (slot, job) in shared.active_jobs() {
        let job_id = job.id.get();
        if job_id.is_empty() || id.as_deref().is_some_and(|want| want != job_id) {
            continue;
        }
        let f = Figures::of(job);
        let (rate, eta) = progress::rate_and_eta(job);
        let mut pids: Vec<i32> = shared
            .job_workers(slot, None)
            .filter(|(_, w, _)| w.word.state() == shmem::worker_state::RUNNING)
            .map(|(_, w, _)| w.pid.load(Ordering::Relaxed))
            .filter(|&p| p > 0)
            .collect();
        let workers = pids.len() as i32;
        // The tables the workers are reading or loading right now (each worker names its chunk); only
        // for jobs of this database, whose catalog names them.
        let mut current: Vec<String> = Vec::new();
        let here = job.database_oid.load(Ordering::Acquire) == crate::pg::database_oid();
        for (_, w, _) in shared.job_workers(slot, None).filter(|_| here) {
            let c = w.current_chunk.load(Ordering::Acquire) as usize;
            if c == 0 || c > shared.chunks().len() {
                continue;
            }
            let relid = pgrx::pg_sys::Oid::from(shared.chunks()[c - 1].relid.load(Ordering::Relaxed));
            if let Some((schema, name)) = crate::pg::relation_name(relid) {
                let q = steep_repl_engine::ident::QualifiedName::new(schema, name).to_string();
                if !current.contains(&q) {
                    current.push(q);
                }
            }
        }
        let leader = job.leader_pid.load(Ordering::Relaxed);
        if leader > 0 && !pids.contains(&leader) {
            pids.insert(0, leader);
        }
        let op = job.op_name();
        let waiting_for = if leader > 0 && job.phase() == shmem::Phase::Slot {
            Spi::get_one_with_args::<Vec<i32>>("SELECT pg_catalog.pg_blocking_pids($1)", &[leader.into()])
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        rows.push((
            job_id,
            op.into(),
            f.phase,
            progress::status_of(job).into(),
            progress::percent(job),
            f.tables_done,
            f.tables_total,
            f.chunks_done,
            f.chunks_total,
            f.rows,
            f.bytes,
            f.bytes_written,
            rate as i64,
            eta.map(|e| e as i64),
            workers,
            pids,
            current,
            // The full error only for the job's role, its members and superusers.
            if rights::acts_for(job.role_oid.load(Ordering::Acquire)) {
                job.error_message_full()
            } else {
                job.error_message()
            },
            waiting_for,
            Some(job.warning.get()).filter(|w| !w.is_empty()),
        ));
    }
    if let (Some(want), true) = (id.as_deref(), rows.is_empty()) {
        crate::job::reap_interrupted();
        let persisted = Spi::connect(|client| -> Result<Option<ProgressRow>, pgrx::spi::Error> {
            let t = client.select(
                "SELECT id, op, phase, status, CASE WHEN status IN ('complete', 'applied') THEN 100 ELSE 0 END::float8, \
                 tables_done, tables_total, chunks_done, chunks_total, rows_done, bytes_done, bytes_written, \
                 CASE WHEN finished_at > started_at THEN (bytes_done / extract(epoch FROM finished_at - started_at))::int8 \
                 ELSE 0 END, steep_repl.operation_error(id), options->>'warning' FROM steep_repl.snapshots WHERE id = $1",
                Some(1),
                &[want.into()],
            )?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<String>(3)?.unwrap_or_default(),
                r.get::<String>(4)?.unwrap_or_default(),
                r.get::<f64>(5)?.unwrap_or(0.0),
                r.get::<i32>(6)?.unwrap_or(0),
                r.get::<i32>(7)?.unwrap_or(0),
                r.get::<i32>(8)?.unwrap_or(0),
                r.get::<i32>(9)?.unwrap_or(0),
                r.get::<i64>(10)?.unwrap_or(0),
                r.get::<i64>(11)?.unwrap_or(0),
                r.get::<i64>(12)?.unwrap_or(0),
                r.get::<i64>(13)?.unwrap_or(0),
                Some(0),
                0,
                Vec::new(),
                Vec::new(),
                r.get::<String>(14)?,
                Vec::new(),
                r.get::<String>(15)?,
            )))
        })
        .unwrap_or_else(|e| error!("reading operation {want}: {e}"));
        match persisted {
            Some(row) => rows.push(row),
            None => error!("no operation with id {want:?}"),
        }
    }
    TableIterator::new(rows)
}

//! `steep_repl.snapshot_progress()`: live figures of running operations, read from shared memory.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;

use crate::shmem;

/// Live progress of one running operation (`id`) or of all of them (`id` NULL), read from shared
/// memory without touching any table. Needs the library preloaded.
#[allow(clippy::type_complexity)]
#[pg_extern]
fn snapshot_progress(
    id: default!(Option<String>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(id, String),
        name!(workers, i32),
        name!(rows, i64),
        name!(bytes, i64),
    ),
> {
    let shared = shmem::require();
    let mut rows = Vec::new();
    for (slot, job) in shared.active_jobs() {
        let job_id = format!("{:016x}", job.job_id.load(Ordering::Relaxed));
        if id.as_deref().is_some_and(|want| want != job_id) {
            continue;
        }
        let workers = shared
            .workers
            .iter()
            .filter(|w| {
                w.state.load(Ordering::Acquire) != shmem::FREE
                    && w.job_slot.load(Ordering::Relaxed) as usize == slot
            })
            .count() as i32;
        rows.push((
            job_id,
            workers,
            job.rows.load(Ordering::Relaxed) as i64,
            job.bytes.load(Ordering::Relaxed) as i64,
        ));
    }
    TableIterator::new(rows)
}

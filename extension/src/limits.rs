//! Server limits a job can run into, and the hints that say which setting to raise and to roughly what
//! value for that job: the lock table (`max_locks_per_transaction`), background worker slots
//! (`max_worker_processes`), and steep_repl's chunk slots (`steep_repl.max_chunk_slots`).

use pgrx::pg_sys;

use crate::pg;

/// Locks the server's shared lock table holds, about: `max_locks_per_transaction` × (`MaxBackends` +
/// `max_prepared_transactions`), PostgreSQL's sizing of it (any backend may use more than its share).
fn lock_table_size() -> (i64, i64, i64) {
    // SAFETY: GUC-backed globals, set at server start and read-only afterwards.
    let (per_xact, backends) = unsafe { (pg_sys::max_locks_per_xact as i64, pg_sys::MaxBackends as i64) };
    let prepared = pg::setting("max_prepared_transactions").and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    (per_xact, backends + prepared, per_xact * (backends + prepared))
}

/// The message and hint for a job that must hold `locks` locks at once (a snapshot holds one per table
/// for its whole duration, as pg_dump does) when the lock table is, or would be, full.
pub fn lock_table_error(locks: usize) -> String {
    let (per_xact, slots, size) = lock_table_size();
    // Room for the job plus a quarter more for everything else the server does meanwhile, rounded up
    // to a multiple of 64.
    let wanted = ((locks as i64 * 5 / 4) + slots.max(1) - 1) / slots.max(1);
    let wanted = wanted.max(per_xact + 1);
    let wanted = (wanted + 63) / 64 * 64;
    format!(
        "the job must hold {locks} table locks at once (one per table, for the whole snapshot, as pg_dump \
         does), and the server's lock table holds about {size} (max_locks_per_transaction = {per_xact} × \
         {slots} backend slots). Raise max_locks_per_transaction to about {wanted} (needs a restart), or \
         snapshot fewer tables at once (tables => ...)."
    )
}

/// Whether `locks` more locks can possibly fit in the lock table (a cheap check before taking them).
pub fn locks_fit(locks: usize) -> bool {
    let (_, _, size) = lock_table_size();
    (locks as i64) < size
}

/// The SQLSTATE of "out of shared memory", which is how a full lock table shows.
pub const OUT_OF_SHARED_MEMORY: &str = "53200";

/// The hint of every "no background worker slot" message: what to raise, to roughly what.
pub fn worker_slots_hint(needed: usize) -> String {
    format!(
        "Raise max_worker_processes (now {}; needs a restart) by at least {needed}: each steep_repl job uses \
         one leader plus its parallel workers, taken from the same pool as parallel query and logical \
         replication workers. Or wait for other workers to finish.",
        pg::max_worker_processes()
    )
}

/// The message for a plan of `needed` chunk slots that does not fit in the `free` slots left.
pub fn chunk_slots_error(needed: usize, free: usize) -> String {
    let configured = crate::gucs::MAX_CHUNK_SLOTS.get() as usize;
    let wanted = (configured + needed.saturating_sub(free)).next_power_of_two();
    format!(
        "the job needs {needed} chunk slots and {free} of the server's {configured} are free (every table is \
         at least one chunk; other running jobs hold the rest). Raise steep_repl.max_chunk_slots to about \
         {wanted} (needs a restart; {} bytes of shared memory each), raise steep_repl.chunk_size if the \
         tables are large, or wait for other jobs to end.",
        std::mem::size_of::<crate::shmem::ChunkSlot>()
    )
}

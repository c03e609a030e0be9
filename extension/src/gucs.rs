//! The `steep_repl.*` settings. Each is registered once, in `_PG_init`.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Default target raw (uncompressed COPY text) size of one chunk, in kB: 256 MB, from PRODUCT.md §4.
/// Large enough that per-chunk costs (a file, an fsync, a manifest entry) vanish against the data, small
/// enough that a 100 GB table still splits into hundreds of chunks that spread over workers.
pub const DEFAULT_CHUNK_SIZE_KB: i32 = 256 * 1024;

/// `steep_repl.chunk_size`: target raw size of a chunk. Settable per session (USERSET); the value in the
/// caller's session when a job starts is the one the job uses.
pub static CHUNK_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_CHUNK_SIZE_KB);

/// `steep_repl.progress_interval`: the least time between two progress NOTIFYs of one job, in ms.
/// 500 ms (PRODUCT.md §4) keeps a progress bar lively without flooding listeners.
pub static PROGRESS_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(500);

/// Upper bound on dynamic workers all steep_repl jobs together may run. It is also the size of the
/// shared-memory worker slot array, so the GUC's maximum is [`crate::shmem::MAX_WORKERS`].
pub static MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(8);

/// `steep_repl.overlap_max_keys`: how many differing keys an overlap analysis lists per table and
/// category (default 100 000); the counts stay exact beyond it. The value in the caller's session when
/// `start_overlap` runs is the one the job uses.
pub static OVERLAP_MAX_KEYS: GucSetting<i32> = GucSetting::<i32>::new(100_000);

/// `steep_repl.chunk_pause`: each worker pauses this long before starting each chunk, in ms (default 0).
/// A throttle for snapshots of a busy primary; tests use it to keep a job running long enough to cancel.
/// The value in the caller's session when a job starts is the one the job uses.
pub static CHUNK_PAUSE_MS: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `steep_repl.apply_part_size`: the smallest unit, in kB, an apply cuts the end of its work into
/// (default 4 MB, see `steep_repl_engine::schedule`), so that its workers finish close together. The
/// value in the caller's session when an apply starts or resumes is the one it uses.
pub static APPLY_PART_SIZE_KB: GucSetting<i32> =
    GucSetting::<i32>::new((steep_repl_engine::schedule::MIN_PART_BYTES / 1024) as i32);

/// `steep_repl.apply_index_defer_size`: an apply drops the indexes of each table with at least this much
/// COPY text in the snapshot, in kB, and builds them after the data (default 8 MB; -1: never; see
/// `crate::worker::indexes`). The value in the caller's session when an apply starts is the one it and
/// its resumes use (recorded in the operation's options).
pub static APPLY_INDEX_DEFER_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(8 * 1024);

/// `steep_repl.apply_index_memory`: `maintenance_work_mem` of the index builds at the end of an apply,
/// in kB (default 512 MB; 0: the server's). Recorded like `apply_index_defer_size`.
pub static APPLY_INDEX_MEMORY_KB: GucSetting<i32> = GucSetting::<i32>::new(512 * 1024);

/// `steep_repl.max_chunk_slots`: chunk slots in shared memory, shared by all running jobs (each chunk
/// of a running generate, each unit of a running apply takes one). Set at server start. The default,
/// 131 072 slots (about 11 MB), plans 32 TB at the default chunk size, or a database of about 130 000
/// tables (every table is at least one chunk).
pub static MAX_CHUNK_SLOTS: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_MAX_CHUNK_SLOTS);

/// `steep_repl.heartbeat_interval`: how often, in seconds, the supervisor beats for the local node and
/// probes every registered peer (PRODUCT.md §8: default 10 s; changed by a reload).
pub static HEARTBEAT_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(10);

/// `steep_repl.peer_timeout`: the longest, in seconds, a connection to a peer and one statement on it
/// may take (a probe, a heartbeat, a schema compare's catalog query). A probe also ends by the next
/// heartbeat, whichever comes first.
pub static PEER_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(5);

/// Default of `steep_repl.max_chunk_slots`.
pub const DEFAULT_MAX_CHUNK_SLOTS: i32 = 131_072;

/// Registers every setting. Safe to call in any backend: custom GUCs are per process. Settings that
/// size shared memory exist only when the library is preloaded (PostgreSQL refuses to define a
/// server-start setting later, and without the preload there is no shared memory to size).
pub fn init() {
    if crate::pg::loading_for_preload() {
        GucRegistry::define_int_guc(
            c"steep_repl.max_chunk_slots",
            c"Chunk slots in shared memory, shared by all running jobs.",
            c"Each chunk of a running snapshot, each unit of a running apply takes one; every table is at least one chunk. Needs a restart.",
            &MAX_CHUNK_SLOTS,
            1024,
            64 * 1024 * 1024,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"steep_repl.chunk_size",
        c"Target uncompressed size of one snapshot chunk.",
        c"Tables are split into ctid block ranges of about this much COPY text (heap plus TOAST bytes).",
        &CHUNK_SIZE_KB,
        64,           // 64 kB: small enough for tests that need many chunks
        i32::MAX / 2, // about 1 TB
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"steep_repl.progress_interval",
        c"Least time between two progress notifications of one job.",
        c"Progress is published on channel steep_repl_progress at most this often, and on every phase change.",
        &PROGRESS_INTERVAL_MS,
        50,
        60_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"steep_repl.overlap_max_keys",
        c"Most differing keys an overlap analysis lists per table and category.",
        c"Counts stay exact beyond it; overlap_result's detail says the list was cut.",
        &OVERLAP_MAX_KEYS,
        0,
        100_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"steep_repl.chunk_pause",
        c"Pause of each worker before each chunk (throttle).",
        c"Slows a job down to spare a busy server; 0 disables.",
        &CHUNK_PAUSE_MS,
        0,
        3_600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"steep_repl.apply_part_size",
        c"Smallest unit the end of an apply is cut into.",
        c"The last chunks of an apply are loaded in ranges of rows that shrink to about this much COPY text, so that workers finish together.",
        &APPLY_PART_SIZE_KB,
        1,
        i32::MAX / 2,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"steep_repl.apply_index_defer_size",
        c"Tables with at least this much COPY text get their indexes built after the data.",
        c"An apply drops the indexes and key constraints of such tables before loading and re-creates them exactly afterwards, with a parallel build; -1 never does.",
        &APPLY_INDEX_DEFER_SIZE_KB,
        -1,
        i32::MAX / 2,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"steep_repl.apply_index_memory",
        c"maintenance_work_mem of the index builds at the end of an apply.",
        c"0 uses the server's maintenance_work_mem.",
        &APPLY_INDEX_MEMORY_KB,
        0,
        i32::MAX / 2,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"steep_repl.heartbeat_interval",
        c"How often the supervisor beats for the local node and probes every registered peer.",
        c"A peer is unreachable after 3 failed probes in a row and healthy again on the next success.",
        &HEARTBEAT_INTERVAL_S,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"steep_repl.peer_timeout",
        c"Longest wait for a connection to a peer and for one statement on it.",
        c"Probes also end by the next heartbeat.",
        &PEER_TIMEOUT_S,
        1,
        3_600,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"steep_repl.max_workers",
        c"Most dynamic background workers all steep_repl jobs together may use.",
        c"Jobs asking for more run with fewer workers. Also bounded by max_worker_processes.",
        &MAX_WORKERS,
        1,
        crate::shmem::MAX_WORKERS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

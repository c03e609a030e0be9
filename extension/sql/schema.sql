-- steep_repl schema: operation history and work queue.
-- Created by CREATE EXTENSION steep_repl (the control file places everything in schema steep_repl).

-- One row per generate or apply operation, keyed by its id. Progress figures are persisted every few
-- seconds while the operation runs; live figures come from shared memory (steep_repl.snapshot_progress).
CREATE TABLE steep_repl.snapshots (
    id                 text        PRIMARY KEY,
    op                 text        NOT NULL CHECK (op IN ('generate', 'apply', 'overlap', 'overlap_scan', 'merge')),
    status             text        NOT NULL DEFAULT 'pending'
                                   CHECK (status IN ('pending', 'running', 'complete', 'applied', 'failed', 'cancelled')),
    phase              text        NOT NULL DEFAULT 'queued',
    path               text        NOT NULL,
    database_name      name        NOT NULL DEFAULT current_database(),
    role_name          name        NOT NULL DEFAULT current_user,
    -- The role's oid: who may read the full error, cancel or resume is decided by it, not by a name
    -- that a role created later could take.
    role_oid           oid,
    parallel_requested integer     NOT NULL,
    parallel_used      integer,
    compression        text,
    options            jsonb       NOT NULL DEFAULT '{}',
    tables_total       integer     NOT NULL DEFAULT 0,
    tables_done        integer     NOT NULL DEFAULT 0,
    chunks_total       integer     NOT NULL DEFAULT 0,
    chunks_done        integer     NOT NULL DEFAULT 0,
    rows_done          bigint      NOT NULL DEFAULT 0,
    bytes_done         bigint      NOT NULL DEFAULT 0,
    bytes_written      bigint      NOT NULL DEFAULT 0,
    snapshot_lsn       pg_lsn,
    exported_snapshot  text,
    error              text,
    -- The server start this operation ran under: a 'running' row from an earlier start was interrupted
    -- by a restart and is reported as failed.
    postmaster_start   timestamptz NOT NULL DEFAULT pg_postmaster_start_time(),
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX snapshots_status_idx ON steep_repl.snapshots (status, created_at DESC);

-- The queue background workers take operations from: pending -> running -> complete | failed | cancelled.
CREATE TABLE steep_repl.work_queue (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    snapshot_id  text        NOT NULL REFERENCES steep_repl.snapshots (id) ON DELETE CASCADE,
    op           text        NOT NULL CHECK (op IN ('generate', 'apply', 'overlap', 'overlap_scan', 'merge')),
    status       text        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'running', 'complete', 'failed', 'cancelled')),
    priority     integer     NOT NULL DEFAULT 0,
    payload      jsonb       NOT NULL DEFAULT '{}',
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    error        text
);
-- Workers look only for pending rows; keep that lookup small however long the history grows.
CREATE INDEX work_queue_pending_idx ON steep_repl.work_queue (priority DESC, id) WHERE status = 'pending';
CREATE INDEX work_queue_snapshot_idx ON steep_repl.work_queue (snapshot_id);

-- Operation history is readable by every role, as pg_stat_activity is; only steep_repl's own functions
-- (running as the extension owner) write it.
GRANT USAGE ON SCHEMA steep_repl TO PUBLIC;
GRANT SELECT ON steep_repl.snapshots, steep_repl.work_queue TO PUBLIC;

-- Chunks an apply has loaded, each as one or more ranges of rows (the tail of a job is cut into smaller
-- units, see steep_repl_engine::schedule). Each row commits in the same transaction as the rows it
-- names, so a range is either loaded and recorded or neither: resume_apply(id) loads exactly the rows
-- not listed here.
CREATE TABLE steep_repl.apply_chunks (
    apply_id     text        NOT NULL REFERENCES steep_repl.snapshots (id) ON DELETE CASCADE,
    schema_name  text        NOT NULL,
    table_name   text        NOT NULL,
    chunk_index  integer     NOT NULL,
    row_start    bigint      NOT NULL DEFAULT 0,  -- a chunk may be loaded in several ranges of rows
    rows_loaded  bigint      NOT NULL,
    raw_bytes    bigint      NOT NULL,
    loaded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),  -- when the chunk's load ended
    PRIMARY KEY (apply_id, schema_name, table_name, chunk_index, row_start)
);
GRANT SELECT ON steep_repl.apply_chunks TO PUBLIC;

-- Which apply last loaded each table (by oid): the one that may resume into it. start_apply takes a table
-- over only from an apply that is no longer pending or running (two concurrent applies into one table
-- serialise on its row here, and the second is refused); resume_apply needs every table still held by
-- itself, so it never loads into a table another apply has loaded since it stopped.
CREATE TABLE steep_repl.apply_targets (
    relid     oid  PRIMARY KEY,
    apply_id  text NOT NULL REFERENCES steep_repl.snapshots (id) ON DELETE CASCADE
);
CREATE INDEX apply_targets_apply_idx ON steep_repl.apply_targets (apply_id);
GRANT SELECT ON steep_repl.apply_targets TO PUBLIC;

-- Indexes and key constraints an apply dropped before loading its large tables, to build them once the
-- data is in (a sort-based build, in parallel, instead of one B-tree insert per row). `statements` re-create
-- each exactly as it was (name, definition, tablespace, clustering, replica identity, comments); a row is
-- deleted in the transaction that ran them. So a row here is an index that is missing right now: the
-- apply builds it before it ends, also when it fails or is cancelled, and resume_apply builds any that a
-- crash left behind. Builders claim rows with FOR UPDATE SKIP LOCKED, so several build at once.
CREATE TABLE steep_repl.apply_deferred_indexes (
    apply_id     text   NOT NULL REFERENCES steep_repl.snapshots (id) ON DELETE CASCADE,
    relid        oid    NOT NULL,
    schema_name  text   NOT NULL,
    table_name   text   NOT NULL,
    index_name   text   NOT NULL,
    statements   text[] NOT NULL,
    definition   text   NOT NULL,  -- index, constraint, storage options, tablespace, owner: compared after
    deferred_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    -- Why the last attempt to build it failed (a duplicate key the loaded rows hold); the rest of that
    -- run passes it over, resume_apply tries again.
    last_error   text,
    PRIMARY KEY (apply_id, schema_name, index_name)
);
GRANT SELECT ON steep_repl.apply_deferred_indexes TO PUBLIC;

-- The full text of an operation's error where it differs from steep_repl.snapshots.error, which every
-- role may read and which therefore never holds row data (a failed load's "Key (ssn)=(...) already
-- exists", a value that failed to parse). Readable by the extension owner alone; the job's role and
-- superusers read it through steep_repl.operation_error(id), wait_snapshot and snapshot_progress.
CREATE TABLE steep_repl.operation_errors (
    id     text PRIMARY KEY REFERENCES steep_repl.snapshots (id) ON DELETE CASCADE,
    error  text NOT NULL
);
REVOKE ALL ON steep_repl.operation_errors FROM PUBLIC;

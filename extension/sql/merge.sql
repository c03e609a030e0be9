-- Merge of two nodes (PRODUCT.md §10, second part): what start_merge did or, for a dry run, would do.
-- The merge's own row is in steep_repl.snapshots (op 'merge'): status, progress, error.

-- The plan of a merge, per table, node changed and action: rows, and up to ten sample keys. Written on the
-- node that ran start_merge, for a dry run (what would be done) and a real one (what was done).
CREATE TABLE steep_repl.merge_plan (
    merge_id     text    NOT NULL REFERENCES steep_repl.snapshots (id) ON DELETE CASCADE,
    schema_name  text    NOT NULL,
    table_name   text    NOT NULL,
    -- The node written to: 'local' (the node that ran start_merge) or 'peer'.
    node         text    NOT NULL CHECK (node IN ('local', 'peer')),
    -- insert (a one-sided row copied over), update (a conflict settled by the strategy), park (a
    -- conflict left for a person: steep_repl.merge_conflicts).
    action       text    NOT NULL CHECK (action IN ('insert', 'update', 'park')),
    rows         bigint  NOT NULL,
    sample_keys  jsonb   NOT NULL DEFAULT '[]',
    PRIMARY KEY (merge_id, schema_name, table_name, node, action)
);

-- One row per row a merge changed on this node, written in the transaction that changed it. `category`
-- is seen from the node that ran the merge (conflict, local_only, peer_only); `decided_by` names the
-- strategy (or 'union' for a one-sided row, 'resolve' for a parked conflict a person settled).
CREATE TABLE steep_repl.merge_audit (
    merge_id     text         NOT NULL,
    schema_name  text         NOT NULL,
    table_name   text         NOT NULL,
    key          jsonb        NOT NULL,
    category     text         NOT NULL CHECK (category IN ('conflict', 'local_only', 'peer_only')),
    action       text         NOT NULL CHECK (action IN ('insert', 'update')),
    old_row      jsonb,
    new_row      jsonb,
    decided_by   text         NOT NULL,
    at           timestamptz  NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX merge_audit_merge_idx ON steep_repl.merge_audit (merge_id, schema_name, table_name);

-- Conflicts a merge with strategy 'manual' left for a person, with both rows; resolve_merge_conflict()
-- settles one by choosing a side.
CREATE TABLE steep_repl.merge_conflicts (
    merge_id     text         NOT NULL,
    schema_name  text         NOT NULL,
    table_name   text         NOT NULL,
    key          jsonb        NOT NULL,
    local_row    jsonb,
    peer_row     jsonb,
    -- NULL while parked; 'local' or 'peer' once resolved.
    resolved     text         CHECK (resolved IN ('local', 'peer')),
    resolved_at  timestamptz,
    PRIMARY KEY (merge_id, schema_name, table_name, key)
);

-- Rows are user data: only the extension owner reads these tables directly; superusers through the
-- functions.
REVOKE ALL ON steep_repl.merge_plan, steep_repl.merge_audit, steep_repl.merge_conflicts FROM PUBLIC;

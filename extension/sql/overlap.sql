-- Overlap analysis (PRODUCT.md §10): what start_overlap found, per table and per differing key.
-- Written by the overlap job's leader when the comparison of a table ends; rows of the same operation
-- in steep_repl.snapshots (op 'overlap') hold its status, progress and error.

-- One row per table an overlap operation looked at. `status`: compared (every row of both sides was
-- compared), skipped (no usable key, absent or different on one side: `detail` says which), truncated
-- (a limit stopped the comparison: never to be read as matching). The counts are rows, except
-- `conflict`, which counts keys present on both sides with different rows.
CREATE TABLE steep_repl.overlap_results (
    overlap_id       text    NOT NULL REFERENCES steep_repl.snapshots (id) ON DELETE CASCADE,
    schema_name      text    NOT NULL,
    table_name       text    NOT NULL,
    local_rows       bigint,
    peer_rows        bigint,
    match            bigint,
    conflict         bigint,
    local_only       bigint,
    peer_only        bigint,
    -- What crossed the network for this table: requests sent and answers received, as text.
    bytes_exchanged  bigint  NOT NULL DEFAULT 0,
    status           text    NOT NULL CHECK (status IN ('compared', 'skipped', 'truncated')),
    detail           text,
    PRIMARY KEY (overlap_id, schema_name, table_name)
);

-- The keys of the rows that differ, by category (conflict, local_only, peer_only), as an object of the
-- key columns. At most steep_repl.overlap_max_keys (default 100 000) per table and category are kept; the counts in
-- overlap_results stay exact beyond that, and `detail` there says the list is cut.
CREATE TABLE steep_repl.overlap_keys (
    overlap_id   text  NOT NULL,
    schema_name  text  NOT NULL,
    table_name   text  NOT NULL,
    category     text  NOT NULL CHECK (category IN ('conflict', 'local_only', 'peer_only')),
    key          jsonb NOT NULL
);
CREATE INDEX overlap_keys_lookup_idx ON steep_repl.overlap_keys (overlap_id, table_name, category);

-- Keys go with their table's result row. Not a foreign key: its check would run once per inserted key
-- (up to 100 000 per table and category, several seconds per analysis). The leader inserts a table's
-- keys right after its result row, in the same transaction; this trigger deletes them with it (also
-- when the operation's row in steep_repl.snapshots is deleted and the results go by cascade).
CREATE FUNCTION steep_repl.overlap_keys_cleanup() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM steep_repl.overlap_keys k
     USING gone
     WHERE k.overlap_id = gone.overlap_id
       AND k.schema_name = gone.schema_name
       AND k.table_name = gone.table_name;
    RETURN NULL;
END
$$;
CREATE TRIGGER overlap_keys_cleanup AFTER DELETE ON steep_repl.overlap_results
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION steep_repl.overlap_keys_cleanup();
-- TRUNCATE fires no DELETE trigger: emptying the results empties the keys.
CREATE FUNCTION steep_repl.overlap_keys_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    TRUNCATE steep_repl.overlap_keys;
    RETURN NULL;
END
$$;
CREATE TRIGGER overlap_keys_truncate AFTER TRUNCATE ON steep_repl.overlap_results
    FOR EACH STATEMENT EXECUTE FUNCTION steep_repl.overlap_keys_truncate();

-- Key values are row data: only the extension owner reads these tables directly; superusers read them
-- through overlap_result() and overlap_rows().
REVOKE ALL ON steep_repl.overlap_results, steep_repl.overlap_keys FROM PUBLIC;

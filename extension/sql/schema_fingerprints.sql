-- Schema fingerprints captured per node (PRODUCT.md §9): what steep_repl.capture_fingerprints() read
-- from a node, to compare later or to keep as a record of a schema at a point in time. One capture per
-- node: a new one replaces the old in the same transaction, and unregister_node removes a node's.
-- Not readable by PUBLIC: a peer's definitions (defaults, CHECK expressions) are the peer's catalog,
-- which local roles may have no right to see.
CREATE TABLE steep_repl.schema_fingerprints (
    node_id      text        NOT NULL,
    captured_at  timestamptz NOT NULL DEFAULT now(),
    kind         text        NOT NULL,
    schema_name  text        NOT NULL,
    table_name   text,
    object_name  text        NOT NULL,
    definition   text        NOT NULL,
    fingerprint  text        NOT NULL
);
CREATE INDEX schema_fingerprints_node_idx ON steep_repl.schema_fingerprints (node_id, kind, schema_name);
REVOKE ALL ON steep_repl.schema_fingerprints FROM PUBLIC;

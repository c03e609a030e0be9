-- Logical replicas started from a snapshot (PRODUCT.md §7): one row per hand-off made by
-- steep_repl.subscribe(). The primary key is what refuses a second hand-off of the same snapshot to the
-- same subscription (a second origin advance would skip or repeat transactions).
CREATE TABLE steep_repl.subscriptions (
    subscription  name        NOT NULL,
    snapshot_id   text        NOT NULL,
    snapshot_path text        NOT NULL,
    -- The completed apply of that snapshot in this database that the hand-off followed.
    apply_id      text        NOT NULL,
    slot_name     name        NOT NULL,
    -- The slot's consistent point: the origin was advanced to it, so the first transaction applied is
    -- the first one committed after it.
    start_lsn     pg_lsn      NOT NULL,
    publications  text[]      NOT NULL,
    role_name     name        NOT NULL DEFAULT current_user,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, snapshot_id)
);
GRANT SELECT ON steep_repl.subscriptions TO PUBLIC;

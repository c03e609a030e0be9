-- steep_repl node registry (PRODUCT.md §8): this node and its peers, as the supervisor last saw them.

-- One row per node. The supervisor's prober beats for the local node and probes every peer each
-- steep_repl.heartbeat_interval; a peer is 'unreachable' after 3 failed probes in a row and 'healthy'
-- again on the next success; 'degraded' when it answers but its steep_repl is not healthy.
-- conninfo never holds a password (register_node refuses one): passwords come from the password file
-- of the server's operating-system user or from passfile=.
CREATE TABLE steep_repl.nodes (
    node_id            text        PRIMARY KEY
                                   CHECK (node_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    name               text,
    conninfo           text,
    priority           integer     NOT NULL DEFAULT 50 CHECK (priority BETWEEN 1 AND 100),
    is_local           boolean     NOT NULL DEFAULT false,
    status             text        NOT NULL DEFAULT 'unknown'
                                   CHECK (status IN ('healthy', 'degraded', 'unreachable', 'unknown')),
    last_seen          timestamptz,
    rtt_ms             double precision,
    clock_offset_ms    double precision,
    server_version     text,
    system_identifier  bigint,
    extension_version  text,
    registered_at      timestamptz NOT NULL DEFAULT now(),
    -- Probe bookkeeping: failed probes in a row, the last one's error, when the last probe ended, and
    -- the peer's own health() and replication state as it reported them.
    failures           integer     NOT NULL DEFAULT 0,
    last_error         text,
    last_probe         timestamptz,
    peer_health        jsonb,
    CHECK (is_local OR conninfo IS NOT NULL)
);
-- At most one local node.
CREATE UNIQUE INDEX nodes_one_local_idx ON steep_repl.nodes (is_local) WHERE is_local;

-- Connection strings say where the server connects with its own credentials: not for PUBLIC. Roles see
-- the cluster through steep_repl.node_status(), which shows no conninfo.
REVOKE ALL ON steep_repl.nodes FROM PUBLIC;

//! Schema fingerprints (PRODUCT.md §9): one canonical text per schema object, read from PostgreSQL's
//! own deparsing functions in a single catalog query, and the comparison of two such lists.
//!
//! Shared by the extension (`schema_fingerprint`, `capture_fingerprints`, `compare_schema`, which runs
//! [`fingerprint_sql`] locally and on the peer) and the CLI, so every side reads schemas with the same
//! query and compares them with the same rules.
//!
//! Canonical text: the definitions come from `format_type`, `pg_get_expr`, `pg_get_indexdef`,
//! `pg_get_constraintdef`, `pg_get_triggerdef` and `pg_get_partkeydef`, run with `search_path` pinned
//! to `pg_catalog, pg_temp`, so every user object in them is schema-qualified the same way on any
//! server of the same major version. Nothing that legitimately differs between two copies of one
//! schema enters them: no oid, no owner, no privilege, no statistics, no column position.

use std::collections::HashMap;

/// The objects of the user schemas, one row each: `kind, schema_name, table_name, object_name,
/// definition`, then `column_type` (`format_type` of a column, NULL for other kinds) and `generated`
/// (a generated column), in no particular order ([`fingerprint`] hashes a definition). Run it
/// with JIT off (it is tens of thousands of small catalog lookups that JIT compilation only slows) and
/// with [`DEPARSE_SETTINGS`], which fix how the constants inside expressions print.
///
/// `$1` (text[]): the schemas to read, NULL for every user schema (all but `pg_catalog`,
/// `information_schema`, `pg_toast`, temporary schemas, `steep_repl` and schemas of extensions).
/// `$2` (text[]): NULL for a fingerprint (every kind, full definitions); or the kinds a target check
/// reads ([`TARGET_KINDS`]), whose rows then carry only what the check needs (names, the kind of table
/// as the definition of a table row, `column_type` and `generated`), at the cost of a plain catalog join. Objects that belong to an
/// extension are left out. Run it with `search_path = pg_catalog, pg_temp`.
///
/// Kinds, and what `table_name` and `object_name` hold:
/// - `schema`: NULL, the schema;
/// - `table` (also partitioned and foreign tables): the table, the table; its definition has the kind,
///   persistence, partition key, inheritance parents and replica identity;
/// - `column`: the table, the column: type with typmod, collation when not the type's, NOT NULL,
///   DEFAULT or GENERATED expression, identity;
/// - `constraint`: the table, the constraint (`pg_get_constraintdef`);
/// - `index`: the table, the index (`pg_get_indexdef`), except indexes that implement a primary key,
///   unique or exclusion constraint (the constraint stands for them);
/// - `sequence`: NULL, the sequence: type, start, increment, bounds, cache, cycle, owning column;
/// - `partition`: the partition, the partition: its parent and bound;
/// - `trigger`: the table, the trigger (`pg_get_triggerdef`) and whether and when it fires.
const FINGERPRINT_SQL_TEMPLATE: &str = r#"
WITH want AS (
    SELECT $2::pg_catalog.text[] AS kinds, $2::pg_catalog.text[] IS NULL AS complete
), ns AS (
    SELECT n.oid, n.nspname::pg_catalog.text AS nspname FROM pg_catalog.pg_namespace n
    WHERE n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema', 'pg_toast', 'steep_repl'])
      AND n.nspname OPERATOR(pg_catalog.!~) '^pg_(toast_)?temp_'
      AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                      WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_namespace'::pg_catalog.regclass
                        AND d.objid OPERATOR(pg_catalog.=) n.oid AND d.deptype OPERATOR(pg_catalog.=) 'e')
      AND ($1::pg_catalog.text[] IS NULL OR n.nspname::pg_catalog.text OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[]))
), rel AS (
    SELECT c.oid, c.relname::pg_catalog.text AS relname, c.relkind, c.relpersistence, c.relispartition, c.relreplident,
           c.relpartbound, ns.nspname
    FROM pg_catalog.pg_class c JOIN ns ON c.relnamespace OPERATOR(pg_catalog.=) ns.oid
    WHERE c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p', 'f', 'S']::pg_catalog."char"[])
      AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                      WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                        AND d.objid OPERATOR(pg_catalog.=) c.oid AND d.deptype OPERATOR(pg_catalog.=) 'e')
), tab AS (
    SELECT * FROM rel WHERE relkind OPERATOR(pg_catalog.<>) 'S'
), objs AS (
    SELECT 'schema'::pg_catalog.text AS kind, ns.nspname AS schema_name, NULL::pg_catalog.text AS table_name,
           ns.nspname AS object_name, 'schema'::pg_catalog.text AS definition,
           NULL::pg_catalog.text AS column_type, false AS generated
    FROM ns WHERE (SELECT kinds IS NULL OR 'schema' OPERATOR(pg_catalog.=) ANY (kinds) FROM want)
  UNION ALL
    SELECT 'table', t.nspname, t.relname, t.relname,
           CASE WHEN NOT (SELECT complete FROM want) THEN
               CASE t.relkind WHEN 'p' THEN 'partitioned table' WHEN 'f' THEN 'foreign table' ELSE 'table' END
           ELSE pg_catalog.concat_ws('; ',
               CASE t.relkind WHEN 'p' THEN 'partitioned table' WHEN 'f' THEN 'foreign table' ELSE 'table' END,
               CASE t.relpersistence WHEN 'u' THEN 'unlogged' END,
               'partition key ' OPERATOR(pg_catalog.||) pg_catalog.pg_get_partkeydef(t.oid),
               (SELECT 'inherits ' OPERATOR(pg_catalog.||) pg_catalog.string_agg(
                           pg_catalog.quote_ident(pn.nspname) OPERATOR(pg_catalog.||) '.'
                           OPERATOR(pg_catalog.||) pg_catalog.quote_ident(p.relname), ', ' ORDER BY i.inhseqno)
                FROM pg_catalog.pg_inherits i
                JOIN pg_catalog.pg_class p ON p.oid OPERATOR(pg_catalog.=) i.inhparent
                JOIN pg_catalog.pg_namespace pn ON pn.oid OPERATOR(pg_catalog.=) p.relnamespace
                WHERE i.inhrelid OPERATOR(pg_catalog.=) t.oid AND NOT t.relispartition),
               'replica identity ' OPERATOR(pg_catalog.||) CASE t.relreplident
                   WHEN 'd' THEN 'default' WHEN 'f' THEN 'full' WHEN 'n' THEN 'nothing'
                   WHEN 'i' THEN (SELECT 'index ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(ic.relname)
                                  FROM pg_catalog.pg_index x
                                  JOIN pg_catalog.pg_class ic ON ic.oid OPERATOR(pg_catalog.=) x.indexrelid
                                  WHERE x.indrelid OPERATOR(pg_catalog.=) t.oid AND x.indisreplident) END) END,
           NULL, false
    FROM tab t WHERE (SELECT kinds IS NULL OR 'table' OPERATOR(pg_catalog.=) ANY (kinds) FROM want)
  UNION ALL
    SELECT 'column', t.nspname, t.relname, a.attname::pg_catalog.text,
           CASE WHEN NOT (SELECT complete FROM want) THEN '' ELSE pg_catalog.concat_ws(' ',
               pg_catalog.format_type(a.atttypid, a.atttypmod),
               CASE WHEN a.attcollation OPERATOR(pg_catalog.<>) ty.typcollation THEN
                   'COLLATE ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(cn.nspname) OPERATOR(pg_catalog.||) '.'
                   OPERATOR(pg_catalog.||) pg_catalog.quote_ident(co.collname) END,
               CASE WHEN a.attnotnull THEN 'NOT NULL' END,
               CASE WHEN a.attgenerated OPERATOR(pg_catalog.=) 's' THEN
                        'GENERATED ALWAYS AS (' OPERATOR(pg_catalog.||) pg_catalog.pg_get_expr(ad.adbin, ad.adrelid)
                        OPERATOR(pg_catalog.||) ') STORED'
                    -- A default that names no column is deparsed without opening its table (which
                    -- pg_get_expr does for a relation's expression): the same text, without building
                    -- the relation cache of every table.
                    WHEN a.atthasdef THEN 'DEFAULT ' OPERATOR(pg_catalog.||) pg_catalog.pg_get_expr(ad.adbin,
                        CASE WHEN pg_catalog.strpos(ad.adbin::pg_catalog.text, '{VAR ') OPERATOR(pg_catalog.>) 0
                             THEN ad.adrelid ELSE 0 END) END,
               CASE a.attidentity WHEN 'a' THEN 'GENERATED ALWAYS AS IDENTITY'
                                  WHEN 'd' THEN 'GENERATED BY DEFAULT AS IDENTITY' END) END,
           -- The bare type, for a target check only.
           CASE WHEN NOT (SELECT complete FROM want) THEN pg_catalog.format_type(a.atttypid, a.atttypmod) END,
           a.attgenerated OPERATOR(pg_catalog.<>) ''
    FROM tab t
    JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) t.oid
         AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
    JOIN pg_catalog.pg_type ty ON ty.oid OPERATOR(pg_catalog.=) a.atttypid
    LEFT JOIN pg_catalog.pg_collation co ON co.oid OPERATOR(pg_catalog.=) a.attcollation
    LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid OPERATOR(pg_catalog.=) co.collnamespace
    LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid OPERATOR(pg_catalog.=) a.attrelid
         AND ad.adnum OPERATOR(pg_catalog.=) a.attnum
    WHERE (SELECT kinds IS NULL OR 'column' OPERATOR(pg_catalog.=) ANY (kinds) FROM want)
  UNION ALL
    SELECT 'constraint', t.nspname, t.relname, c.conname::pg_catalog.text, pg_catalog.pg_get_constraintdef(c.oid), NULL, false
    FROM tab t JOIN pg_catalog.pg_constraint c ON c.conrelid OPERATOR(pg_catalog.=) t.oid
    WHERE (SELECT kinds IS NULL OR 'constraint' OPERATOR(pg_catalog.=) ANY (kinds) FROM want)
  UNION ALL
    SELECT 'index', t.nspname, t.relname, ic.relname::pg_catalog.text,
           CASE WHEN plain.ok THEN
               'CREATE ' OPERATOR(pg_catalog.||) CASE WHEN x.indisunique THEN 'UNIQUE ' ELSE '' END
               OPERATOR(pg_catalog.||) 'INDEX ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(ic.relname)
               OPERATOR(pg_catalog.||) ' ON ' OPERATOR(pg_catalog.||) CASE WHEN ic.relkind OPERATOR(pg_catalog.=) 'I' THEN 'ONLY ' ELSE '' END
               OPERATOR(pg_catalog.||) pg_catalog.quote_ident(t.nspname) OPERATOR(pg_catalog.||) '.'
               OPERATOR(pg_catalog.||) pg_catalog.quote_ident(t.relname) OPERATOR(pg_catalog.||) ' USING '
               OPERATOR(pg_catalog.||) pg_catalog.quote_ident(am.amname) OPERATOR(pg_catalog.||) ' ('
               OPERATOR(pg_catalog.||) plain.cols OPERATOR(pg_catalog.||) ')'
               OPERATOR(pg_catalog.||) COALESCE(' WHERE ' OPERATOR(pg_catalog.||) pg_catalog.pg_get_expr(x.indpred, x.indrelid), '')
           ELSE pg_catalog.pg_get_indexdef(x.indexrelid) END
           OPERATOR(pg_catalog.||) CASE WHEN x.indisvalid THEN '' ELSE ' (invalid)' END, NULL, false
    FROM tab t
    JOIN pg_catalog.pg_index x ON x.indrelid OPERATOR(pg_catalog.=) t.oid
    JOIN pg_catalog.pg_class ic ON ic.oid OPERATOR(pg_catalog.=) x.indexrelid
    JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) ic.relam
    -- The common index (plain columns, default operator class and collation, default order, no
    -- INCLUDE, options or NULLS NOT DISTINCT) written here exactly as pg_get_indexdef writes it, which
    -- would otherwise look up every column's default operator class with a catalog scan: a third of a
    -- fingerprint's time on a database of tens of thousands of indexes. Any other goes to pg_get_indexdef.
    LEFT JOIN LATERAL (
        SELECT pg_catalog.bool_and(x.indkey[k] OPERATOR(pg_catalog.<>) 0 AND opc.opcdefault
                                   AND opc.opcintype OPERATOR(pg_catalog.=) a.atttypid
                                   AND x.indcollation[k] OPERATOR(pg_catalog.=) a.attcollation
                                   AND x.indoption[k] OPERATOR(pg_catalog.=) 0) AS ok,
               pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY k) AS cols
        FROM pg_catalog.generate_series(0, x.indnkeyatts OPERATOR(pg_catalog.-) 1) AS k
        LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) x.indrelid
             AND a.attnum OPERATOR(pg_catalog.=) x.indkey[k]
        LEFT JOIN pg_catalog.pg_opclass opc ON opc.oid OPERATOR(pg_catalog.=) x.indclass[k]
    ) plain ON x.indnatts OPERATOR(pg_catalog.=) x.indnkeyatts AND ic.reloptions IS NULL{NULLS_NOT_DISTINCT}
           AND NOT EXISTS (SELECT FROM pg_catalog.pg_attribute ia
                           WHERE ia.attrelid OPERATOR(pg_catalog.=) x.indexrelid AND ia.attoptions IS NOT NULL)
    WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_constraint c
                      WHERE c.conrelid OPERATOR(pg_catalog.=) t.oid
                        AND c.conindid OPERATOR(pg_catalog.=) x.indexrelid
                        AND c.contype OPERATOR(pg_catalog.=) ANY (ARRAY['p', 'u', 'x']::pg_catalog."char"[]))
      AND (SELECT kinds IS NULL OR 'index' OPERATOR(pg_catalog.=) ANY (kinds) FROM want)
  UNION ALL
    SELECT 'sequence', r.nspname, NULL, r.relname,
           CASE WHEN NOT (SELECT complete FROM want) THEN '' ELSE pg_catalog.concat_ws(' ', pg_catalog.format_type(s.seqtypid, NULL),
               'START', s.seqstart, 'INCREMENT', s.seqincrement, 'MINVALUE', s.seqmin, 'MAXVALUE', s.seqmax,
               'CACHE', s.seqcache, CASE WHEN s.seqcycle THEN 'CYCLE' ELSE 'NO CYCLE' END,
               (SELECT 'OWNED BY ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(on_.nspname)
                       OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(oc.relname)
                       OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(oa.attname)
                FROM pg_catalog.pg_depend d
                JOIN pg_catalog.pg_class oc ON oc.oid OPERATOR(pg_catalog.=) d.refobjid
                JOIN pg_catalog.pg_namespace on_ ON on_.oid OPERATOR(pg_catalog.=) oc.relnamespace
                JOIN pg_catalog.pg_attribute oa ON oa.attrelid OPERATOR(pg_catalog.=) d.refobjid
                     AND oa.attnum OPERATOR(pg_catalog.=) d.refobjsubid
                WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                  AND d.objid OPERATOR(pg_catalog.=) r.oid
                  AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                  AND d.deptype OPERATOR(pg_catalog.=) ANY (ARRAY['a', 'i']::pg_catalog."char"[])
                LIMIT 1)) END, NULL, false
    FROM rel r JOIN pg_catalog.pg_sequence s ON s.seqrelid OPERATOR(pg_catalog.=) r.oid
    WHERE (SELECT kinds IS NULL OR 'sequence' OPERATOR(pg_catalog.=) ANY (kinds) FROM want)
  UNION ALL
    SELECT 'partition', t.nspname, t.relname, t.relname,
           'PARTITION OF ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(pn.nspname) OPERATOR(pg_catalog.||) '.'
           OPERATOR(pg_catalog.||) pg_catalog.quote_ident(p.relname) OPERATOR(pg_catalog.||) ' '
           OPERATOR(pg_catalog.||) pg_catalog.pg_get_expr(t.relpartbound, t.oid), NULL, false
    FROM tab t
    JOIN pg_catalog.pg_inherits i ON i.inhrelid OPERATOR(pg_catalog.=) t.oid
    JOIN pg_catalog.pg_class p ON p.oid OPERATOR(pg_catalog.=) i.inhparent
    JOIN pg_catalog.pg_namespace pn ON pn.oid OPERATOR(pg_catalog.=) p.relnamespace
    WHERE t.relispartition AND (SELECT kinds IS NULL OR 'partition' OPERATOR(pg_catalog.=) ANY (kinds) FROM want)
  UNION ALL
    SELECT 'trigger', t.nspname, t.relname, tg.tgname::pg_catalog.text,
           pg_catalog.pg_get_triggerdef(tg.oid) OPERATOR(pg_catalog.||) CASE tg.tgenabled
               WHEN 'O' THEN ' (enabled)' WHEN 'D' THEN ' (disabled)'
               WHEN 'R' THEN ' (enabled replica)' WHEN 'A' THEN ' (enabled always)' END, NULL, false
    FROM tab t JOIN pg_catalog.pg_trigger tg ON tg.tgrelid OPERATOR(pg_catalog.=) t.oid AND NOT tg.tgisinternal
    WHERE (SELECT kinds IS NULL OR 'trigger' OPERATOR(pg_catalog.=) ANY (kinds) FROM want)
)
SELECT kind, schema_name, table_name, object_name, definition, column_type, generated
FROM objs
"#;

/// [`FINGERPRINT_SQL_TEMPLATE`] for a server of `server_version_num` (a column that PostgreSQL 15 added
/// is read only where it exists). Parameters `$1` and `$2` as documented there.
pub fn fingerprint_sql(server_version_num: u32) -> String {
    let nnd = if server_version_num >= 150_000 { " AND NOT x.indnullsnotdistinct" } else { "" };
    FINGERPRINT_SQL_TEMPLATE.replace("{NULLS_NOT_DISTINCT}", nnd)
}

/// The listing `schema_fingerprint()` returns: [`fingerprint_sql`]'s rows with the SHA-256 of each
/// definition (as [`fingerprint`] computes it, for a UTF-8 database), sorted by bytes (kind, schema, table with none first, name) as [`compare`] orders its rows.
pub fn fingerprint_listing_sql(server_version_num: u32) -> String {
    format!(
        "SELECT o.kind, o.schema_name, o.table_name, o.object_name, o.definition, \
                pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(o.definition, 'UTF8')), 'hex') \
         FROM ({}) o \
         ORDER BY o.kind COLLATE \"C\", o.schema_name COLLATE \"C\", o.table_name COLLATE \"C\" NULLS FIRST, \
                  o.object_name COLLATE \"C\"",
        fingerprint_sql(server_version_num)
    )
}

/// The settings the fingerprint query runs under on every side: constants in defaults, CHECK
/// expressions, index predicates and partition bounds print through their types' output functions,
/// which follow these (a `timestamptz` bound prints differently under another TimeZone).
pub const DEPARSE_SETTINGS: &[(&str, &str)] = &[
    ("search_path", "pg_catalog, pg_temp"),
    ("jit", "off"),
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
];

/// `SET` statements for [`DEPARSE_SETTINGS`], for a connection (values are fixed, simple literals;
/// `search_path` is a list, written unquoted).
pub fn deparse_settings_sql() -> String {
    DEPARSE_SETTINGS
        .iter()
        .map(
            |(k, v)| {
                if *k == "search_path" { format!("SET {k} = {v}; ") } else { format!("SET {k} = '{v}'; ") }
            },
        )
        .collect()
}

/// The fingerprint of a definition: SHA-256 of its UTF-8 text, in hex (computed here rather than in
/// the query, which would cost a microsecond of the server's time per object).
pub fn fingerprint(definition: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(definition.as_bytes());
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// One schema object as [`fingerprint_sql`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaObject {
    pub kind: String,
    pub schema: String,
    /// The table the object belongs to (None for schemas and sequences).
    pub table: Option<String>,
    pub name: String,
    pub definition: String,
    /// For a column: its type as `format_type` prints it.
    pub column_type: Option<String>,
    /// For a column: whether it is generated.
    pub generated: bool,
}

impl SchemaObject {
    fn key(&self) -> (&str, &str, Option<&str>, &str) {
        (&self.kind, &self.schema, self.table.as_deref(), &self.name)
    }
}

/// How an object compares between the local node and the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Match,
    /// Only on the local node.
    LocalOnly,
    /// Only on the peer.
    PeerOnly,
    /// On both, with different definitions.
    Mismatch,
}

impl Status {
    /// As `compare_schema` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Match => "match",
            Status::LocalOnly => "local_only",
            Status::PeerOnly => "peer_only",
            Status::Mismatch => "mismatch",
        }
    }
}

/// One row of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub kind: String,
    pub schema: String,
    pub table: Option<String>,
    pub name: String,
    pub status: Status,
    pub local: Option<String>,
    pub peer: Option<String>,
}

/// Compares two fingerprint lists object by object (kind, schema, table, name). An object inside a
/// schema or table that exists on one side only is not listed again: the schema or table row says it,
/// so each difference is named once, as the object that differs. Sorted by kind, schema, table, name.
pub fn compare(local: &[SchemaObject], peer: &[SchemaObject]) -> Vec<Comparison> {
    let peer_by_key: HashMap<_, &SchemaObject> = peer.iter().map(|o| (o.key(), o)).collect();
    let local_by_key: HashMap<_, &SchemaObject> = local.iter().map(|o| (o.key(), o)).collect();
    let schemas = |side: &[SchemaObject]| -> std::collections::HashSet<String> {
        side.iter().filter(|o| o.kind == "schema").map(|o| o.schema.clone()).collect()
    };
    let tables = |side: &[SchemaObject]| -> std::collections::HashSet<(String, String)> {
        side.iter().filter(|o| o.kind == "table").map(|o| (o.schema.clone(), o.name.clone())).collect()
    };
    let (local_schemas, peer_schemas) = (schemas(local), schemas(peer));
    let (local_tables, peer_tables) = (tables(local), tables(peer));
    // Whether `o`, present on one side only, is inside a schema or table that side alone has.
    let implied = |o: &SchemaObject,
                   mine_s: &std::collections::HashSet<String>,
                   theirs_s: &std::collections::HashSet<String>,
                   mine_t: &std::collections::HashSet<(String, String)>,
                   theirs_t: &std::collections::HashSet<(String, String)>| {
        if o.kind != "schema" && mine_s.contains(&o.schema) && !theirs_s.contains(&o.schema) {
            return true;
        }
        match &o.table {
            Some(t) if o.kind != "table" => {
                let k = (o.schema.clone(), t.clone());
                mine_t.contains(&k) && !theirs_t.contains(&k)
            }
            _ => false,
        }
    };
    let mut out = Vec::new();
    for o in local {
        let (status, peer_def) = match peer_by_key.get(&o.key()) {
            Some(p) if p.definition == o.definition => (Status::Match, Some(p.definition.clone())),
            Some(p) => (Status::Mismatch, Some(p.definition.clone())),
            None => {
                if implied(o, &local_schemas, &peer_schemas, &local_tables, &peer_tables) {
                    continue;
                }
                (Status::LocalOnly, None)
            }
        };
        out.push(Comparison {
            kind: o.kind.clone(),
            schema: o.schema.clone(),
            table: o.table.clone(),
            name: o.name.clone(),
            status,
            local: Some(o.definition.clone()),
            peer: peer_def,
        });
    }
    for p in peer {
        if local_by_key.contains_key(&p.key())
            || implied(p, &peer_schemas, &local_schemas, &peer_tables, &local_tables)
        {
            continue;
        }
        out.push(Comparison {
            kind: p.kind.clone(),
            schema: p.schema.clone(),
            table: p.table.clone(),
            name: p.name.clone(),
            status: Status::PeerOnly,
            local: None,
            peer: Some(p.definition.clone()),
        });
    }
    out.sort_by(|a, b| (&a.kind, &a.schema, &a.table, &a.name).cmp(&(&b.kind, &b.schema, &b.table, &b.name)));
    out
}

/// [`fingerprint_sql`] with its parameters written in (every kind), for a connection that sends
/// statements without parameters (a peer's).
pub fn fingerprint_sql_for(server_version_num: u32, schemas: Option<&[String]>) -> String {
    // $2 first: the literal written for $1 may hold "$2" itself.
    fingerprint_sql(server_version_num).replace("$2", "NULL").replace("$1", &text_array_literal(schemas))
}

/// The kinds a target check needs ([`crate::compat::targets_from_schema`]): `$2` of
/// [`fingerprint_sql`] for an apply.
pub const TARGET_KINDS: [&str; 3] = ["table", "column", "sequence"];

/// A SQL literal for a `text[]` (for a statement sent without parameters): `NULL` for None, else
/// `ARRAY[...]::pg_catalog.text[]` with every element quoted as a standard-conforming string literal.
pub fn text_array_literal(values: Option<&[String]>) -> String {
    match values {
        None => "NULL::pg_catalog.text[]".to_string(),
        Some(v) => {
            let items: Vec<String> = v.iter().map(|s| format!("'{}'", s.replace('\'', "''"))).collect();
            format!("ARRAY[{}]::pg_catalog.text[]", items.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(kind: &str, schema: &str, table: Option<&str>, name: &str, def: &str) -> SchemaObject {
        SchemaObject {
            kind: kind.into(),
            schema: schema.into(),
            table: table.map(str::to_string),
            name: name.into(),
            definition: def.into(),
            column_type: None,
            generated: false,
        }
    }

    #[test]
    fn each_difference_is_named_once() {
        let local = vec![
            o("schema", "public", None, "public", "schema"),
            o("schema", "extra", None, "extra", "schema"),
            o("table", "extra", Some("x"), "x", "table"),
            o("column", "extra", Some("x"), "id", "integer"),
            o("table", "public", Some("t"), "t", "table"),
            o("column", "public", Some("t"), "id", "integer NOT NULL"),
            o("column", "public", Some("t"), "v", "text"),
            o("table", "public", Some("only_here"), "only_here", "table"),
            o("column", "public", Some("only_here"), "a", "integer"),
        ];
        let peer = vec![
            o("schema", "public", None, "public", "schema"),
            o("table", "public", Some("t"), "t", "table"),
            o("column", "public", Some("t"), "id", "bigint NOT NULL"),
            o("column", "public", Some("t"), "w", "text"),
        ];
        let c = compare(&local, &peer);
        let shown: Vec<(&str, &str, &str)> =
            c.iter().map(|c| (c.kind.as_str(), c.name.as_str(), c.status.as_str())).collect();
        assert_eq!(
            shown,
            [
                ("column", "id", "mismatch"),
                ("column", "v", "local_only"),
                ("column", "w", "peer_only"),
                ("schema", "extra", "local_only"),
                ("schema", "public", "match"),
                ("table", "only_here", "local_only"),
                ("table", "t", "match"),
            ]
        );
        let id = &c[0];
        assert_eq!(
            (id.local.as_deref(), id.peer.as_deref()),
            (Some("integer NOT NULL"), Some("bigint NOT NULL"))
        );
    }

    #[test]
    fn identical_lists_all_match() {
        let l = vec![
            o("schema", "s", None, "s", "schema"),
            o("index", "s", Some("t"), "i", "CREATE INDEX i ON s.t"),
        ];
        assert!(compare(&l, &l).iter().all(|c| c.status == Status::Match));
    }

    #[test]
    fn deparse_settings_and_parameters() {
        let sql = deparse_settings_sql();
        assert!(sql.starts_with("SET search_path = pg_catalog, pg_temp; "), "{sql}");
        assert!(sql.contains("SET TimeZone = 'UTC'; "), "{sql}");
        let q = fingerprint_sql_for(150_000, Some(&["a$2".to_string()]));
        assert!(q.contains("ARRAY['a$2']") && !q.contains("$1"), "a literal is never rewritten");
        assert!(q.contains("indnullsnotdistinct"));
        assert!(!fingerprint_sql(140_000).contains("indnullsnotdistinct"));
    }

    #[test]
    fn array_literals_quote_every_element() {
        assert_eq!(text_array_literal(None), "NULL::pg_catalog.text[]");
        assert_eq!(
            text_array_literal(Some(&["a".into(), "it's".into()])),
            "ARRAY['a', 'it''s']::pg_catalog.text[]"
        );
    }
}

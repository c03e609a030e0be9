//! Which tables an overlap analysis compares, and by which key (PRODUCT.md §10): the catalog query both
//! nodes answer ([`TABLE_KEYS_SQL`]), its rows ([`TableKeys`]), and the pairing of this node's tables
//! with the peer's ([`pair`]): a table is compared only when it has a usable key here and the same
//! COPY column list (names and types, in order) on both nodes; every other table is listed as skipped
//! with the reason, never guessed.
//!
//! The rows themselves are hashed and compared by [`crate::digest`].

use serde::{Deserialize, Serialize};

use crate::digest::{DigestError, KeyFields, KeyText};
use crate::filter::TablePattern;
use crate::ident::QualifiedName;

/// One row per ordinary table (partitions included, partitioned parents not: their rows live in the
/// partitions) of the user schemas, all columns text so that this server (SPI) and a peer (libpq text
/// results) read it alike: schema, name, `columns` (a JSON array of `[name, type]` in COPY column
/// order: no dropped or generated column), `key` (a JSON object `{kind, index, columns,
/// nondeterministic}` for the primary key, else the replica identity index; NULL when there is
/// neither; a column name is null for an expression; `nondeterministic` lists the key's collations
/// that are not deterministic, null when none).
pub const TABLE_KEYS_SQL: &str = "\
SELECT n.nspname::text, c.relname::text,
  (SELECT pg_catalog.json_agg(pg_catalog.json_build_array(a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod))
          ORDER BY a.attnum)
     FROM pg_catalog.pg_attribute a
    WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0
      AND NOT a.attisdropped AND a.attgenerated OPERATOR(pg_catalog.=) '')::text,
  (SELECT pg_catalog.json_build_object(
            'kind', CASE WHEN i.indisprimary THEN 'primary key' ELSE 'replica identity' END,
            'index', ic.relname,
            'columns', (SELECT pg_catalog.json_agg(a.attname ORDER BY k.ord)
                          FROM pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY k(attnum, ord)
                          LEFT JOIN pg_catalog.pg_attribute a
                            ON a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.=) k.attnum
                         WHERE k.ord OPERATOR(pg_catalog.<=) i.indnkeyatts),
            'nondeterministic', (SELECT pg_catalog.json_agg(DISTINCT co.collname)
                                   FROM pg_catalog.unnest(i.indcollation::pg_catalog.oid[]) k(coll)
                                   JOIN pg_catalog.pg_collation co ON co.oid OPERATOR(pg_catalog.=) k.coll
                                  WHERE NOT co.collisdeterministic))::text
     FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid OPERATOR(pg_catalog.=) i.indexrelid
    WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisvalid AND i.indisunique
      AND (i.indisprimary OR (i.indisreplident AND c.relreplident OPERATOR(pg_catalog.=) 'i'))
    ORDER BY i.indisprimary DESC LIMIT 1)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE c.relkind OPERATOR(pg_catalog.=) 'r'
  AND n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema', 'steep_repl'])
  AND n.nspname OPERATOR(pg_catalog.!~) '^pg_(toast|temp_|toast_temp_)'
ORDER BY 1, 2";

/// A table's key as [`TABLE_KEYS_SQL`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// `primary key` or `replica identity`.
    pub kind: String,
    /// The index's name.
    pub index: String,
    /// Its key columns in order; `None` for an expression.
    pub columns: Vec<Option<String>>,
    /// The names of its collations that are not deterministic (equal keys may then differ in their
    /// text); `None` when there are none.
    #[serde(default)]
    pub nondeterministic: Option<Vec<String>>,
}

/// One row of [`TABLE_KEYS_SQL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableKeys {
    pub schema: String,
    pub name: String,
    /// COPY column list: (name, type) in order.
    pub columns: Vec<(String, String)>,
    pub key: Option<Key>,
}

impl TableKeys {
    /// Reads one row of [`TABLE_KEYS_SQL`] (four text values, as either side returns them).
    pub fn from_row(
        schema: Option<String>,
        name: Option<String>,
        columns: Option<String>,
        key: Option<String>,
    ) -> Result<TableKeys, String> {
        let schema = schema.ok_or("a table without a schema name")?;
        let name = name.ok_or("a table without a name")?;
        let columns: Vec<(String, String)> = match columns {
            None => Vec::new(),
            Some(c) => {
                serde_json::from_str(&c).map_err(|e| format!("column list of {schema}.{name}: {e}"))?
            }
        };
        let key: Option<Key> = match key {
            None => None,
            Some(k) => Some(serde_json::from_str(&k).map_err(|e| format!("key of {schema}.{name}: {e}"))?),
        };
        Ok(TableKeys { schema, name, columns, key })
    }

    pub fn qualified(&self) -> QualifiedName {
        QualifiedName::new(self.schema.clone(), self.name.clone())
    }
}

/// A table both nodes hold alike, to compare by `key` (column names), found at `positions` of the COPY
/// column list on both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compared {
    pub schema: String,
    pub name: String,
    pub key: Vec<String>,
    /// Types of the key columns, for showing keys (`format_type`).
    pub key_types: Vec<String>,
    pub positions: Vec<usize>,
    /// How each key column's value enters the key text (from its type).
    pub key_texts: Vec<KeyText>,
}

impl Compared {
    /// The key fields of this table's COPY lines, as both nodes take them.
    pub fn key_fields(&self) -> Result<KeyFields, DigestError> {
        KeyFields::with_texts(self.positions.clone(), self.key_texts.clone())
    }
}

/// A table left out, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub schema: String,
    pub name: String,
    pub reason: String,
}

/// The outcome of [`pair`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pairing {
    pub compared: Vec<Compared>,
    pub skipped: Vec<Skipped>,
}

/// Pairs this node's tables with the peer's, among those `patterns` select (all when empty), in name
/// order. Skipped: a table without a primary key or replica identity index here, a key on an
/// expression or on a generated column, a key with a nondeterministic collation (keys equal under it
/// can differ in their text, and no one text can be chosen for them), a table absent on one node, or
/// one whose column lists differ (names, types or order: rows would not be comparable as COPY text).
pub fn pair(local: &[TableKeys], peer: &[TableKeys], patterns: &[TablePattern]) -> Pairing {
    let selected =
        |t: &TableKeys| patterns.is_empty() || patterns.iter().any(|p| p.matches(&t.schema, &t.name));
    let mut out = Pairing::default();
    let find = |list: &'_ [TableKeys], t: &TableKeys| -> Option<usize> {
        list.iter().position(|o| o.schema == t.schema && o.name == t.name)
    };
    for t in local.iter().filter(|t| selected(t)) {
        let skip = |reason: String| Skipped { schema: t.schema.clone(), name: t.name.clone(), reason };
        let Some(p) = find(peer, t).map(|i| &peer[i]) else {
            out.skipped.push(skip("absent on the peer".into()));
            continue;
        };
        let Some(key) = &t.key else {
            out.skipped
                .push(skip("no primary key or replica identity index: rows cannot be paired by key".into()));
            continue;
        };
        let mut names = Vec::with_capacity(key.columns.len());
        let mut problem = None;
        for c in &key.columns {
            match c {
                None => problem = Some(format!("its {} {} has an expression", key.kind, key.index)),
                Some(c) => names.push(c.clone()),
            }
        }
        // Either node's key: the column lists do not show collations.
        for (k, whose) in [(Some(key), "its"), (p.key.as_ref(), "the peer's")] {
            if let Some((k, c)) = k.and_then(|k| Some((k, k.nondeterministic.as_ref()?.first()?))) {
                problem = Some(format!(
                    "{whose} {} {} uses the nondeterministic collation {c}: keys equal under it can differ in their text",
                    k.kind, k.index
                ));
            }
        }
        if let Some(why) = problem {
            out.skipped.push(skip(why));
            continue;
        }
        if t.columns != p.columns {
            out.skipped.push(skip(format!("columns differ: {}", column_difference(&t.columns, &p.columns))));
            continue;
        }
        let mut positions = Vec::with_capacity(names.len());
        let mut key_types = Vec::with_capacity(names.len());
        let mut key_texts = Vec::with_capacity(names.len());
        for n in &names {
            match t.columns.iter().position(|(c, _)| c == n) {
                Some(i) => {
                    let ty = &t.columns[i].1;
                    let Some(text) = KeyText::of_type(ty) else {
                        problem = Some(format!(
                            "key column {n} of {} {} is of type {ty}: equal keys can print differently",
                            key.kind, key.index
                        ));
                        break;
                    };
                    positions.push(i);
                    key_types.push(ty.clone());
                    key_texts.push(text);
                }
                None => {
                    problem = Some(format!("key column {n} of {} {} is generated", key.kind, key.index));
                    break;
                }
            }
        }
        if let Some(why) = problem {
            out.skipped.push(skip(why));
            continue;
        }
        out.compared.push(Compared {
            schema: t.schema.clone(),
            name: t.name.clone(),
            key: names,
            key_types,
            positions,
            key_texts,
        });
    }
    for p in peer.iter().filter(|t| selected(t)) {
        if find(local, p).is_none() {
            out.skipped.push(Skipped {
                schema: p.schema.clone(),
                name: p.name.clone(),
                reason: "absent on this node".into(),
            });
        }
    }
    out.skipped.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    out
}

/// The first difference between two column lists, for a person to read.
fn column_difference(local: &[(String, String)], peer: &[(String, String)]) -> String {
    for (i, (l, p)) in local.iter().zip(peer).enumerate() {
        if l != p {
            return format!("column {} is {} {} here and {} {} on the peer", i + 1, l.0, l.1, p.0, p.1);
        }
    }
    format!("{} columns here, {} on the peer", local.len(), peer.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, cols: &[(&str, &str)], key: Option<&[Option<&str>]>) -> TableKeys {
        TableKeys {
            schema: "public".into(),
            name: name.into(),
            columns: cols.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            key: key.map(|k| Key {
                kind: "primary key".into(),
                index: format!("{name}_pkey"),
                columns: k.iter().map(|c| c.map(str::to_string)).collect(),
                nondeterministic: None,
            }),
        }
    }

    #[test]
    fn pairs_tables_with_a_usable_key_and_the_same_columns() {
        let cols = [("a", "integer"), ("b", "text")];
        let local = vec![
            table("ok", &cols, Some(&[Some("b"), Some("a")])),
            table("nokey", &cols, None),
            table("expr", &cols, Some(&[None])),
            table("differ", &cols, Some(&[Some("a")])),
            table("gen", &cols, Some(&[Some("c")])),
            table("gone", &cols, Some(&[Some("a")])),
            table("peer_nondet", &cols, Some(&[Some("a")])),
            table("ival", &[("a", "interval"), ("b", "text")], Some(&[Some("a")])),
            TableKeys {
                key: Some(Key {
                    nondeterministic: Some(vec!["ci".into()]),
                    ..table("x", &cols, Some(&[Some("b")])).key.unwrap()
                }),
                ..table("nondet", &cols, None)
            },
        ];
        let peer = vec![
            table("ok", &cols, Some(&[Some("a")])),
            table("nokey", &cols, None),
            table("expr", &cols, None),
            table("differ", &[("a", "bigint"), ("b", "text")], Some(&[Some("a")])),
            table("gen", &cols, None),
            table("extra", &cols, None),
            TableKeys {
                key: Some(Key {
                    nondeterministic: Some(vec!["ci2".into()]),
                    ..table("x", &cols, Some(&[Some("a")])).key.unwrap()
                }),
                ..table("peer_nondet", &cols, None)
            },
            table("nondet", &cols, Some(&[Some("b")])),
            table("ival", &[("a", "interval"), ("b", "text")], Some(&[Some("a")])),
        ];
        let p = pair(&local, &peer, &[]);
        assert_eq!(p.compared.len(), 1);
        assert_eq!(p.compared[0].positions, vec![1, 0]);
        assert_eq!(p.compared[0].key_types, vec!["text".to_string(), "integer".to_string()]);
        assert_eq!(p.compared[0].key_texts, vec![KeyText::Exact, KeyText::Exact]);
        let reasons: Vec<(&str, &str)> =
            p.skipped.iter().map(|s| (s.name.as_str(), s.reason.as_str())).collect();
        assert_eq!(reasons.len(), 9, "{reasons:?}");
        assert!(reasons.iter().any(|(n, r)| *n == "peer_nondet" && r.contains("the peer's primary key")));
        assert!(reasons.iter().any(|(n, r)| *n == "ival" && r.contains("of type interval")));
        assert!(reasons.iter().any(|(n, r)| *n == "nondet" && r.contains("nondeterministic collation ci")));
        assert!(reasons.iter().any(|(n, r)| *n == "nokey" && r.contains("no primary key")));
        assert!(reasons.iter().any(|(n, r)| *n == "expr" && r.contains("expression")));
        assert!(
            reasons
                .iter()
                .any(|(n, r)| *n == "differ" && r.contains("column 1 is a integer here and a bigint"))
        );
        assert!(reasons.iter().any(|(n, r)| *n == "gen" && r.contains("generated")));
        assert!(reasons.iter().any(|(n, r)| *n == "gone" && r.contains("absent on the peer")));
        assert!(reasons.iter().any(|(n, r)| *n == "extra" && r.contains("absent on this node")));
    }

    #[test]
    fn patterns_select_tables_on_both_sides() {
        let cols = [("a", "integer")];
        let local = vec![table("t1", &cols, Some(&[Some("a")])), table("u1", &cols, Some(&[Some("a")]))];
        let peer = vec![table("t1", &cols, Some(&[Some("a")])), table("t2", &cols, None)];
        let p = pair(&local, &peer, &["t*".parse().unwrap()]);
        assert_eq!(p.compared.len(), 1);
        assert_eq!(p.skipped.len(), 1);
        assert_eq!(p.skipped[0].name, "t2");
    }

    #[test]
    fn reads_rows_as_the_query_gives_them() {
        let t = TableKeys::from_row(
            Some("s".into()),
            Some("t".into()),
            Some(r#"[["id","integer"],["v","text"]]"#.into()),
            Some(r#"{"kind":"primary key","index":"t_pkey","columns":["id",null]}"#.into()),
        )
        .unwrap();
        assert_eq!(t.columns[1], ("v".to_string(), "text".to_string()));
        assert_eq!(t.key.unwrap().columns, vec![Some("id".to_string()), None]);
        assert!(TableKeys::from_row(Some("s".into()), Some("t".into()), Some("[1".into()), None).is_err());
    }
}

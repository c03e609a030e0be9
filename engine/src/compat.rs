//! Whether a target database can receive a snapshot: every table present with the snapshot's columns
//! and compatible types, and every sequence present. Used by the extension's `start_apply` and by the
//! CLI's client-mode apply, so both refuse the same targets with the same list of problems. The target
//! is read with the schema fingerprints' catalog query ([`crate::schema::fingerprint_sql`], see
//! [`targets_from_schema`]), so a compare and an apply see a schema the same way.
//!
//! Compatible types: the same type once type modifiers are set aside (`character varying(20)` and
//! `character varying(50)`, `numeric(10,2)` and `numeric`), since COPY text carries values, not
//! declarations; a value that does not fit still fails loudly at load time. The target may have more
//! columns than the snapshot (they get their defaults); a snapshot column that is generated on the target
//! cannot be loaded.

use crate::ident::QualifiedName;
use crate::manifest::Manifest;

/// The target's tables (plain and partitioned: a foreign table is no target) and sequences, from
/// the rows of [`crate::schema::fingerprint_sql`] read with the kinds [`crate::schema::TARGET_KINDS`]:
/// a target is read with the same catalog query and the same canonical names as a schema compare.
pub fn targets_from_schema(
    objects: &[crate::schema::SchemaObject],
) -> (Vec<TargetTable>, Vec<QualifiedName>) {
    let mut tables: Vec<TargetTable> = Vec::new();
    let mut index: std::collections::HashMap<(&str, &str), usize> = std::collections::HashMap::new();
    let mut sequences = Vec::new();
    for o in objects {
        match o.kind.as_str() {
            "table" if !o.definition.starts_with("foreign table") => {
                index.insert((o.schema.as_str(), o.name.as_str()), tables.len());
                tables.push(TargetTable {
                    schema: o.schema.clone(),
                    name: o.name.clone(),
                    columns: Vec::new(),
                });
            }
            "sequence" => sequences.push(QualifiedName::new(o.schema.clone(), o.name.clone())),
            _ => {}
        }
    }
    for o in objects.iter().filter(|o| o.kind == "column") {
        let Some(table) = o.table.as_deref() else { continue };
        if let Some(&i) = index.get(&(o.schema.as_str(), table)) {
            tables[i].columns.push(TargetColumn {
                name: o.name.clone(),
                type_name: o.column_type.clone().unwrap_or_default(),
                generated: o.generated,
            });
        }
    }
    (tables, sequences)
}

/// The schemas a target check reads: every schema of the snapshot's tables and sequences, once.
pub fn target_schemas(manifest: &Manifest) -> Vec<String> {
    let mut v: Vec<String> = manifest
        .tables
        .iter()
        .map(|t| t.schema.clone())
        .chain(manifest.sequences.iter().map(|s| s.schema.clone()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// One column of a target table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetColumn {
    pub name: String,
    /// As `format_type(atttypid, atttypmod)` prints it.
    pub type_name: String,
    pub generated: bool,
}

/// A target table as found in the target database (absent tables are simply not listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTable {
    pub schema: String,
    pub name: String,
    pub columns: Vec<TargetColumn>,
}

/// What is wrong with a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    MissingTable(QualifiedName),
    MissingColumn {
        table: QualifiedName,
        column: String,
    },
    TypeMismatch {
        table: QualifiedName,
        column: String,
        snapshot: String,
        target: String,
    },
    GeneratedColumn {
        table: QualifiedName,
        column: String,
    },
    /// The snapshot lists no column for a table the target gives columns to: COPY with no column list
    /// would fill the target's columns in order with whatever the chunks hold.
    NoColumns {
        table: QualifiedName,
        target_columns: usize,
    },
    MissingSequence(QualifiedName),
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::MissingTable(t) => write!(f, "table {t} does not exist"),
            Mismatch::MissingColumn { table, column } => write!(f, "table {table} has no column {column:?}"),
            Mismatch::TypeMismatch { table, column, snapshot, target } => {
                write!(f, "column {column:?} of {table} is {target}, the snapshot has {snapshot}")
            }
            Mismatch::GeneratedColumn { table, column } => {
                write!(f, "column {column:?} of {table} is generated on the target and cannot be loaded")
            }
            Mismatch::NoColumns { table, target_columns } => write!(
                f,
                "the snapshot has no columns for table {table}, which has {target_columns} on the target"
            ),
            Mismatch::MissingSequence(s) => write!(f, "sequence {s} does not exist"),
        }
    }
}

/// A type name without its modifiers: every parenthesised group removed, spaces normalised.
pub fn base_type(type_name: &str) -> String {
    let mut out = String::with_capacity(type_name.len());
    let mut depth = 0usize;
    for c in type_name.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether a column of the snapshot's type `snapshot` loads into the target's type `target` (type
/// modifiers aside). Both are `format_type` text. steep-repl reads the catalog with `search_path` pinned
/// to `pg_catalog, pg_temp`, so a type outside `pg_catalog` is schema-qualified on both sides; snapshots
/// written before that carry the name as the source's search path showed it, possibly unqualified, which
/// matches a target type of that name in any schema.
pub fn types_match(snapshot: &str, target: &str) -> bool {
    let (s, t) = (base_type(snapshot), base_type(target));
    s == t || (!s.contains('.') && t.ends_with(&s) && t[..t.len() - s.len()].ends_with('.'))
}

/// Every problem that keeps `manifest` from loading into the target described by `tables` and
/// `sequences` (the qualified names of sequences that exist there). Empty: compatible.
pub fn check_target(
    manifest: &Manifest,
    tables: &[TargetTable],
    sequences: &[QualifiedName],
) -> Vec<Mismatch> {
    let wanted: Vec<TargetTable> = manifest
        .tables
        .iter()
        .map(|t| TargetTable {
            schema: t.schema.clone(),
            name: t.name.clone(),
            columns: t
                .columns
                .iter()
                .map(|c| TargetColumn {
                    name: c.name.clone(),
                    type_name: c.type_name.clone(),
                    generated: false,
                })
                .collect(),
        })
        .collect();
    let wanted_sequences: Vec<QualifiedName> =
        manifest.sequences.iter().map(|s| QualifiedName::new(s.schema.clone(), s.name.clone())).collect();
    check_tables(&wanted, &wanted_sequences, tables, sequences)
}

/// Every problem that keeps the source tables `wanted` (their generated columns set aside: COPY
/// leaves them out) and sequences `wanted_sequences` from loading into the target's `tables` and
/// `sequences`: what [`check_target`] checks for a snapshot, and `replica init` for a source read with
/// the same catalog query before any snapshot exists. Empty: compatible.
pub fn check_tables(
    wanted: &[TargetTable],
    wanted_sequences: &[QualifiedName],
    tables: &[TargetTable],
    sequences: &[QualifiedName],
) -> Vec<Mismatch> {
    let mut problems = Vec::new();
    let by_name: std::collections::HashMap<(&str, &str), &TargetTable> =
        tables.iter().map(|x| ((x.schema.as_str(), x.name.as_str()), x)).collect();
    let sequences: std::collections::HashSet<&QualifiedName> = sequences.iter().collect();
    for t in wanted {
        let qn = QualifiedName::new(t.schema.clone(), t.name.clone());
        let Some(target) = by_name.get(&(t.schema.as_str(), t.name.as_str())) else {
            problems.push(Mismatch::MissingTable(qn));
            continue;
        };
        let columns: Vec<&TargetColumn> = t.columns.iter().filter(|c| !c.generated).collect();
        let loadable = target.columns.iter().filter(|x| !x.generated).count();
        if columns.is_empty() && loadable > 0 {
            problems.push(Mismatch::NoColumns { table: qn.clone(), target_columns: loadable });
        }
        for c in columns {
            match target.columns.iter().find(|x| x.name == c.name) {
                None => problems.push(Mismatch::MissingColumn { table: qn.clone(), column: c.name.clone() }),
                Some(x) if x.generated => {
                    problems.push(Mismatch::GeneratedColumn { table: qn.clone(), column: c.name.clone() })
                }
                Some(x) if !types_match(&c.type_name, &x.type_name) => {
                    problems.push(Mismatch::TypeMismatch {
                        table: qn.clone(),
                        column: c.name.clone(),
                        snapshot: c.type_name.clone(),
                        target: x.type_name.clone(),
                    })
                }
                Some(_) => {}
            }
        }
    }
    for qn in wanted_sequences {
        if !sequences.contains(qn) {
            problems.push(Mismatch::MissingSequence(qn.clone()));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_and_old_unqualified_type_names() {
        assert!(types_match("public.mood", "public.mood"));
        assert!(types_match("mood", "public.mood"));
        assert!(types_match("mood[]", "public.mood[]"));
        assert!(types_match("\"My Type\"", "\"S\".\"My Type\""));
        assert!(!types_match("a.mood", "b.mood"));
        assert!(!types_match("public.mood", "mood2"));
        assert!(!types_match("ood", "public.mood"));
        assert!(types_match("character varying(3)", "character varying(10)"));
    }

    #[test]
    fn targets_come_from_fingerprint_rows() {
        use crate::schema::SchemaObject;
        let row =
            |kind: &str, table: Option<&str>, name: &str, def: &str, ty: Option<&str>, generated: bool| {
                SchemaObject {
                    kind: kind.into(),
                    schema: "s".into(),
                    table: table.map(str::to_string),
                    name: name.into(),
                    definition: def.into(),
                    column_type: ty.map(str::to_string),
                    generated,
                }
            };
        let objects = vec![
            row("column", Some("t"), "a", "integer NOT NULL", Some("integer"), false),
            row("column", Some("t"), "g", "integer GENERATED ALWAYS AS (a) STORED", Some("integer"), true),
            row("column", Some("f"), "x", "text", Some("text"), false),
            row("index", Some("t"), "i", "CREATE INDEX i ON s.t USING btree (a)", None, false),
            row("sequence", None, "q", "bigint START 1", None, false),
            row("table", Some("f"), "f", "foreign table; replica identity default", None, false),
            row("table", Some("p"), "p", "partitioned table; partition key RANGE (a)", None, false),
            row("table", Some("t"), "t", "table; replica identity default", None, false),
        ];
        let (tables, sequences) = targets_from_schema(&objects);
        let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["p", "t"], "a foreign table is no target");
        let t = &tables[1];
        assert_eq!(t.columns.len(), 2);
        assert_eq!((t.columns[0].type_name.as_str(), t.columns[1].generated), ("integer", true));
        assert_eq!(sequences, [QualifiedName::new("s".to_string(), "q".to_string())]);
    }

    #[test]
    fn base_types() {
        assert_eq!(base_type("character varying(20)"), "character varying");
        assert_eq!(base_type("timestamp(3) without time zone"), "timestamp without time zone");
        assert_eq!(base_type("numeric(10,2)[]"), "numeric[]");
        assert_eq!(base_type("text"), "text");
    }
}

//! Whether a target database can receive a snapshot: every table present with the snapshot's columns
//! and compatible types, and every sequence present. Used by the extension's `start_apply` and by the
//! CLI's client-mode apply, so both refuse the same targets with the same list of problems.
//!
//! Compatible types: the same type once type modifiers are set aside (`character varying(20)` and
//! `character varying(50)`, `numeric(10,2)` and `numeric`), since COPY text carries values, not
//! declarations; a value that does not fit still fails loudly at load time. The target may have more
//! columns than the snapshot (they get their defaults); a snapshot column that is generated on the target
//! cannot be loaded.

use crate::ident::QualifiedName;
use crate::manifest::Manifest;

/// Reads the target tables among those wanted, with their columns. Parameters: `$1` schemas (text[]),
/// `$2` table names (text[]), pairwise. Columns: schema, table, column name (NULL for a table without
/// columns), `format_type` of the column, generated (bool). Rows grouped by table, columns in order.
pub const TARGET_TABLES_SQL: &str = "\
SELECT n.nspname::text, c.relname::text, a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod),
       a.attgenerated <> ''
FROM unnest($1::text[], $2::text[]) AS want(s, t)
JOIN pg_catalog.pg_namespace n ON n.nspname = want.s
JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = want.t AND c.relkind IN ('r', 'p')
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY 1, 2, a.attnum";

/// Reads which of the wanted sequences exist on the target. Parameters as [`TARGET_TABLES_SQL`];
/// columns: schema, name.
pub const TARGET_SEQUENCES_SQL: &str = "\
SELECT n.nspname::text, c.relname::text FROM unnest($1::text[], $2::text[]) AS want(s, t)
JOIN pg_catalog.pg_namespace n ON n.nspname = want.s
JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = want.t AND c.relkind = 'S'";

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
    let mut problems = Vec::new();
    let by_name: std::collections::HashMap<(&str, &str), &TargetTable> =
        tables.iter().map(|x| ((x.schema.as_str(), x.name.as_str()), x)).collect();
    let sequences: std::collections::HashSet<&QualifiedName> = sequences.iter().collect();
    for t in &manifest.tables {
        let qn = QualifiedName::new(t.schema.clone(), t.name.clone());
        let Some(target) = by_name.get(&(t.schema.as_str(), t.name.as_str())) else {
            problems.push(Mismatch::MissingTable(qn));
            continue;
        };
        let loadable = target.columns.iter().filter(|x| !x.generated).count();
        if t.columns.is_empty() && loadable > 0 {
            problems.push(Mismatch::NoColumns { table: qn.clone(), target_columns: loadable });
        }
        for c in &t.columns {
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
    for s in &manifest.sequences {
        let qn = QualifiedName::new(s.schema.clone(), s.name.clone());
        if !sequences.contains(&qn) {
            problems.push(Mismatch::MissingSequence(qn));
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
    fn base_types() {
        assert_eq!(base_type("character varying(20)"), "character varying");
        assert_eq!(base_type("timestamp(3) without time zone"), "timestamp without time zone");
        assert_eq!(base_type("numeric(10,2)[]"), "numeric[]");
        assert_eq!(base_type("text"), "text");
    }
}

//! The one quoting path for identifiers that reach SQL text.
//!
//! Every schema, table, column or sequence name that steep-repl puts into SQL goes through
//! [`quote_ident`] (or [`QualifiedName`]'s `Display`), which always double-quotes: correct for any name,
//! whatever its case, keywords, spaces, dots or quotes.
//!
//! ```
//! use steep_repl_engine::ident::{quote_ident, QualifiedName};
//! assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
//! assert_eq!(QualifiedName::new("Sales", "order items").to_string(), r#""Sales"."order items""#);
//! ```

use std::fmt;

/// `ident` in double quotes with inner double quotes doubled, as PostgreSQL's `quote_ident` when quoting
/// is needed (here: always).
pub fn quote_ident(ident: &str) -> String {
    let mut s = String::with_capacity(ident.len() + 2);
    s.push('"');
    for c in ident.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// A schema-qualified name; displays quoted, ready for SQL text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        QualifiedName { schema: schema.into(), name: name.into() }
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// A string as an SQL literal (single quotes doubled; `E''` form when it holds a backslash), for the
/// rare statement that cannot take a parameter (`SET`, `COPY ... TO` options).
pub fn quote_literal(s: &str) -> String {
    let escaped = s.replace('\'', "''");
    if s.contains('\\') { format!("E'{}'", escaped.replace('\\', "\\\\")) } else { format!("'{escaped}'") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(quote_ident(""), "\"\"");
        assert_eq!(quote_ident("a\"\"b"), "\"a\"\"\"\"b\"");
        assert_eq!(QualifiedName::new("s.x", "Ünïcode ✓").to_string(), "\"s.x\".\"Ünïcode ✓\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
    }
}

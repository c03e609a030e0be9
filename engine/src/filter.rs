//! Table selection patterns, with pg_dump's `-t` rules: `[schema.]name`, where `*` matches any run of
//! characters and `?` any one character; text in double quotes is taken literally and keeps its case
//! (`""` inside quotes is one quote); text outside quotes is folded to lower case. A pattern without a
//! schema matches tables of that name in every schema.
//!
//! ```
//! use steep_repl_engine::filter::TablePattern;
//! let p: TablePattern = "sales.order*".parse().unwrap();
//! assert!(p.matches("sales", "orders_2024"));
//! assert!(!p.matches("public", "orders"));
//! let q: TablePattern = r#""My Schema"."Odd.Name""#.parse().unwrap();
//! assert!(q.matches("My Schema", "Odd.Name"));
//! ```

use std::fmt;
use std::str::FromStr;

/// One parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePattern {
    source: String,
    schema: Option<Glob>,
    name: Glob,
}

/// A pattern that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    One,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Glob(Vec<Tok>);

impl Glob {
    fn is_literal(&self) -> bool {
        self.0.iter().all(|t| matches!(t, Tok::Lit(_)))
    }

    /// The text a literal glob matches.
    fn literal_text(&self) -> Option<String> {
        self.0.iter().map(|t| if let Tok::Lit(c) = t { Some(*c) } else { None }).collect()
    }

    fn matches(&self, s: &str) -> bool {
        let text: Vec<char> = s.chars().collect();
        let pat = &self.0;
        // Classic wildcard matching with one backtrack point for the last `*`.
        let (mut p, mut t) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match pat.get(p) {
                Some(Tok::Lit(c)) if *c == text[t] => {
                    p += 1;
                    t += 1;
                }
                Some(Tok::One) => {
                    p += 1;
                    t += 1;
                }
                Some(Tok::Any) => {
                    star = Some((p, t));
                    p += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        pat[p..].iter().all(|t| *t == Tok::Any)
    }
}

impl FromStr for TablePattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| PatternError { pattern: s.to_string(), reason };
        let mut parts: Vec<Vec<Tok>> = vec![Vec::new()];
        let mut chars = s.trim().chars().peekable();
        let mut in_quotes = false;
        while let Some(c) = chars.next() {
            let cur = parts.last_mut().expect("parts is never empty");
            if in_quotes {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        cur.push(Tok::Lit('"'));
                    } else {
                        in_quotes = false;
                    }
                } else {
                    cur.push(Tok::Lit(c));
                }
                continue;
            }
            match c {
                '"' => in_quotes = true,
                '.' => parts.push(Vec::new()),
                '*' => cur.push(Tok::Any),
                '?' => cur.push(Tok::One),
                c => cur.extend(c.to_lowercase().map(Tok::Lit)),
            }
        }
        if in_quotes {
            return Err(err("unterminated double quote"));
        }
        if parts.len() > 2 {
            return Err(err("too many dotted names (use schema.table)"));
        }
        if parts.iter().any(Vec::is_empty) {
            return Err(err("empty schema or table name"));
        }
        let name = Glob(parts.pop().expect("one part at least"));
        let schema = parts.pop().map(Glob);
        Ok(TablePattern { source: s.to_string(), schema, name })
    }
}

impl TablePattern {
    /// Whether the table `schema.name` is selected by this pattern.
    pub fn matches(&self, schema: &str, name: &str) -> bool {
        self.schema.as_ref().is_none_or(|g| g.matches(schema)) && self.name.matches(name)
    }

    /// Whether the pattern has no wildcard (it names one table, or one per schema when unqualified).
    pub fn is_literal(&self) -> bool {
        self.name.is_literal() && self.schema.as_ref().is_none_or(Glob::is_literal)
    }

    /// For a pattern without wildcards, the schema (None: any) and name it matches exactly.
    pub fn literal(&self) -> Option<(Option<String>, String)> {
        let name = self.name.literal_text()?;
        match &self.schema {
            None => Some((None, name)),
            Some(g) => Some((Some(g.literal_text()?), name)),
        }
    }

    /// The pattern as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TablePattern {
        s.parse().unwrap()
    }

    #[test]
    fn unquoted_is_case_folded() {
        assert!(p("Public.Users").matches("public", "users"));
        assert!(!p("Public.Users").matches("public", "Users"));
    }

    #[test]
    fn quoted_keeps_case_dots_and_wildcards_literal() {
        assert!(p(r#""Users""#).matches("public", "Users"));
        assert!(p(r#""a.b*""#).matches("x", "a.b*"));
        assert!(!p(r#""a.b*""#).matches("x", "a.bc"));
        assert!(p(r#""say ""hi""""#).matches("s", r#"say "hi""#));
    }

    #[test]
    fn wildcards() {
        assert!(p("*").matches("any", "thing"));
        assert!(p("s*.t?").matches("sales", "t1"));
        assert!(!p("s*.t?").matches("sales", "t12"));
        assert!(p("*_log").matches("a", "audit_log"));
        assert!(p("a*b*c").matches("s", "aXbYbZc"));
        assert!(!p("a*b*c").matches("s", "aXbYbZ"));
    }

    #[test]
    fn literal_patterns_give_what_they_match() {
        let p = |s: &str| s.parse::<TablePattern>().unwrap();
        assert_eq!(p("Sales.Orders").literal(), Some((Some("sales".into()), "orders".into())));
        assert_eq!(p(r#""My ""S"".Odd.Name""#).literal(), Some((None, "My \"S\".Odd.Name".into())));
        assert_eq!(
            p(r#""My ""S"""."Odd.Name""#).literal(),
            Some((Some("My \"S\"".into()), "Odd.Name".into()))
        );
        assert_eq!(p("orders").literal(), Some((None, "orders".into())));
        assert_eq!(p("order*").literal(), None);
        assert_eq!(p("s?.orders").literal(), None);
        assert_eq!(p(r#""a*b""#).literal(), Some((None, "a*b".into())));
    }

    #[test]
    fn unqualified_matches_every_schema() {
        assert!(p("orders").matches("a", "orders"));
        assert!(p("orders").matches("b", "orders"));
        assert!(p("orders").is_literal());
        assert!(!p("order?").is_literal());
    }

    #[test]
    fn bad_patterns_are_named() {
        for bad in ["a.b.c", "\"open", "a.", ".b", ""] {
            let e = bad.parse::<TablePattern>().unwrap_err();
            assert_eq!(e.pattern, bad);
        }
    }
}

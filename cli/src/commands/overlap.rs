//! `steep-repl overlap`: compares this server's rows with a peer's, table by table and key by key
//! (PRODUCT.md §10). The analysis runs in the server (`steep_repl.start_overlap`), which connects to the
//! peer itself; this command starts it, follows it as a direct-mode snapshot is followed
//! ([`crate::follow`]: Ctrl-C detaches, `--timeout` stops waiting), then reads `overlap_result` (one row
//! per table) and, with `--detailed`, `overlap_rows` (the keys that differ). Direct mode only: each node
//! hashes its own rows in its own background workers, so both need steep_repl.
//!
//! Exit codes: 0 when every table was compared and is identical, 3 ([`CliError::OverlapDiffers`]) when
//! a table differs or was not compared (skipped for want of a key, truncated by a limit).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_postgres::Client;

use crate::commands::schema::shown_peer;
use crate::config::OverlapConfig;
use crate::conn::{ConnSpec, Listener};
use crate::error::CliError;
use crate::follow::{self, CHANNEL, Follow};
use crate::mode::{self, ServerSupport};
use crate::output::{self, outln};
use crate::progress::{self, QuietReporter, Reporter, Started};
use crate::signals::Interrupt;

const RESULT_SQL: &str = "\
SELECT schema_name, table_name, local_rows, peer_rows, match, conflict, local_only, peer_only,
       bytes_exchanged, status, detail
FROM steep_repl.overlap_result($1)";

/// The keys of one table and category. `overlap_rows` takes `schema.table` (split at the first dot) or a
/// bare table name, so the schema is checked here too.
const ROWS_SQL: &str = "\
SELECT key::text AS key FROM steep_repl.overlap_rows($1, $2, $3, $4) WHERE schema_name = $5";

/// The categories of keys that differ, as `overlap_rows` names them, and as this command shows them.
const CATEGORIES: [(&str, &str); 3] =
    [("conflict", "conflict"), ("local_only", "only here"), ("peer_only", "only on the peer")];

/// One row of `overlap_result`: a table and what its comparison found. The counts are NULL (`None`) for
/// a skipped table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableResult {
    pub schema_name: String,
    pub table_name: String,
    pub local_rows: Option<u64>,
    pub peer_rows: Option<u64>,
    #[serde(rename = "match")]
    pub matched: Option<u64>,
    pub conflict: Option<u64>,
    pub local_only: Option<u64>,
    pub peer_only: Option<u64>,
    pub bytes_exchanged: u64,
    /// `compared`, `skipped` or `truncated`.
    pub status: String,
    pub detail: Option<String>,
}

impl TableResult {
    /// `schema.table`, as the server names it.
    pub fn name(&self) -> String {
        format!("{}.{}", self.schema_name, self.table_name)
    }

    /// Every row of both sides was compared (a truncated table's counts are partial).
    pub fn compared(&self) -> bool {
        self.status == "compared"
    }

    /// The count of one category (`conflict`, `local_only`, `peer_only`), 0 when NULL.
    pub fn count(&self, category: &str) -> u64 {
        match category {
            "conflict" => self.conflict,
            "local_only" => self.local_only,
            "peer_only" => self.peer_only,
            _ => None,
        }
        .unwrap_or(0)
    }

    /// Rows that differ: conflicts, and rows on one side only.
    pub fn differing(&self) -> u64 {
        CATEGORIES.iter().map(|(c, _)| self.count(c)).sum()
    }
}

/// The TOTAL row: table counts, and the sums of the compared tables (a truncated table's partial
/// counts and a skipped table's NULLs are left out); `bytes_exchanged` sums every table, since each
/// one's bytes did cross the network.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub tables: usize,
    pub compared: usize,
    /// Compared tables with at least one row that differs.
    pub differ: usize,
    pub skipped: usize,
    pub truncated: usize,
    pub local_rows: u64,
    pub peer_rows: u64,
    #[serde(rename = "match")]
    pub matched: u64,
    pub conflict: u64,
    pub local_only: u64,
    pub peer_only: u64,
    pub bytes_exchanged: u64,
}

impl Totals {
    /// Tables that were not compared in full: skipped, truncated, or in a status this CLI does not know.
    pub fn not_compared(&self) -> usize {
        self.tables - self.compared
    }
}

/// Sums the per-table results.
pub fn totals(tables: &[TableResult]) -> Totals {
    let mut t = Totals { tables: tables.len(), ..Totals::default() };
    for r in tables {
        t.bytes_exchanged += r.bytes_exchanged;
        match r.status.as_str() {
            "skipped" => t.skipped += 1,
            "truncated" => t.truncated += 1,
            _ => {}
        }
        if !r.compared() {
            continue;
        }
        t.compared += 1;
        if r.differing() > 0 {
            t.differ += 1;
        }
        let n = |v: Option<u64>| v.unwrap_or(0);
        t.local_rows += n(r.local_rows);
        t.peer_rows += n(r.peer_rows);
        t.matched += n(r.matched);
        t.conflict += n(r.conflict);
        t.local_only += n(r.local_only);
        t.peer_only += n(r.peer_only);
    }
    t
}

/// The command's outcome: `Ok` only when every table was compared and none differs (exit 0), else
/// [`CliError::OverlapDiffers`] (exit 3). `peer` is the peer as messages name it.
pub fn verdict(total: &Totals, peer: &str) -> Result<(), CliError> {
    if total.differ == 0 && total.not_compared() == 0 {
        Ok(())
    } else {
        Err(CliError::OverlapDiffers {
            peer: peer.to_string(),
            differ: total.differ,
            not_compared: total.not_compared(),
        })
    }
}

/// The keys of one table and category that differ, as far as `--limit` lets them be listed.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyGroup {
    pub schema_name: String,
    pub table_name: String,
    /// `conflict`, `local_only` or `peer_only`.
    pub category: String,
    /// How many keys of this category the table has (from `overlap_result`).
    pub total: u64,
    /// The keys listed: objects of the key columns, e.g. `{"id": 42}`.
    pub keys: Vec<Value>,
}

impl KeyGroup {
    /// Fewer keys listed than there are.
    pub fn cut(&self) -> bool {
        (self.keys.len() as u64) < self.total
    }
}

/// The groups to list: every table and category with a key that differs, in the results' order.
pub fn key_groups_wanted(tables: &[TableResult]) -> Vec<KeyGroup> {
    let mut groups = Vec::new();
    for t in tables {
        for (category, _) in CATEGORIES {
            let total = t.count(category);
            if total > 0 {
                groups.push(KeyGroup {
                    schema_name: t.schema_name.clone(),
                    table_name: t.table_name.clone(),
                    category: category.to_string(),
                    total,
                    keys: Vec::new(),
                });
            }
        }
    }
    groups
}

/// Runs `overlap`.
pub async fn run(cfg: OverlapConfig, json: bool) -> Result<(), CliError> {
    let mut interrupt = Interrupt::new()?;
    let listener = cfg.conn.connect_listening(CHANNEL).await?;
    let db = cfg.conn.config.get_dbname().unwrap_or("?").to_string();
    let reason = require_extension(&listener.client, &db, "overlap").await?;
    let patterns: Option<Vec<String>> = if cfg.patterns.is_empty() {
        None
    } else {
        Some(cfg.patterns.iter().map(|p| p.as_str().to_string()).collect())
    };
    let parallel = cfg.parallel as i32;
    let id: String = listener
        .client
        .query_one(
            "SELECT steep_repl.start_overlap($1::text, $2::text[], $3::int4)",
            &[&cfg.peer, &patterns, &parallel],
        )
        .await
        .map_err(CliError::query("steep_repl.start_overlap"))?
        .get(0);
    let job = Started { op: "overlap".into(), id: id.clone(), mode: "direct".into(), path: None, reason };
    follow_to_end(&cfg.conn, listener, job, cfg.timeout, json, &mut interrupt).await?;

    // The analysis has ended: its results stay on the server, so an interrupt now only stops reading.
    let results = async {
        let client = cfg.conn.connect().await?;
        let tables = read_results(&client, &id).await?;
        let groups =
            if cfg.detailed { Some(read_keys(&client, &id, &tables, cfg.limit).await?) } else { None };
        Ok::<_, CliError>((tables, groups))
    };
    let (tables, groups) = tokio::select! {
        r = results => r?,
        _ = interrupt.recv() => {
            return Err(CliError::Other(anyhow::anyhow!(
                "interrupted while reading the results of {id}; they stay on the server: \
                 SELECT * FROM steep_repl.overlap_result('{id}')"
            )));
        }
    };
    let total = totals(&tables);
    if tables.is_empty() && patterns.is_some() {
        return Err(CliError::Other(anyhow::anyhow!(
            "no table on this server or the peer matches the --table patterns ({id} compared nothing)"
        )));
    }
    if json {
        outln!("{}", document(&id, &tables, &total, groups.as_deref(), cfg.detailed.then_some(cfg.limit)));
    } else {
        for line in table_lines(&tables, &total) {
            outln!("{line}");
        }
        if let Some(groups) = &groups {
            for line in key_lines(groups, cfg.limit) {
                outln!("{line}");
            }
        }
        if total.differ == 0 && total.not_compared() == 0 {
            outln!("identical: every table has the same rows on both nodes ({} compared)", total.compared);
        }
    }
    verdict(&total, &shown_peer(&cfg.peer))
}

/// Reports the server job `job` as started and follows it to its end (see [`crate::follow`]): a live
/// report, or none with `--json`; an error unless it completed.
pub(crate) async fn follow_to_end(
    conn: &ConnSpec,
    listener: Listener,
    job: Started,
    timeout: Option<std::time::Duration>,
    json: bool,
    interrupt: &mut Interrupt,
) -> Result<(), CliError> {
    let mut reporter: Box<dyn Reporter> =
        if json { Box::new(QuietReporter) } else { progress::reporter(false) };
    let id = job.id.clone();
    reporter.started(&job);
    let end = follow::follow(
        Follow { conn, id: &id, timeout, reporter: reporter.as_mut(), interrupt },
        Some(listener),
    )
    .await?;
    end.conclude(&id, "direct", reporter.as_mut())
}

/// Checks that the analysis can run in this server, and says so for the `started` line.
pub(crate) async fn require_extension(client: &Client, db: &str, command: &str) -> Result<String, CliError> {
    match mode::server_support(client).await? {
        ServerSupport::Ready(v) => Ok(format!("steep_repl {v} is installed in database {db} and preloaded")),
        ServerSupport::NotPreloaded(v) => Err(CliError::Other(anyhow::anyhow!(
            "steep-repl {command} runs in the server's background workers: steep_repl {v} is installed in \
             database {db} but not preloaded; set shared_preload_libraries = 'steep_repl' on the server and \
             restart it"
        ))),
        ServerSupport::NotInstalled => Err(CliError::Other(anyhow::anyhow!(
            "steep-repl {command} runs in the server and needs the steep_repl extension in database {db}: run \
             CREATE EXTENSION steep_repl (with shared_preload_libraries = 'steep_repl'); the peer needs it too"
        ))),
    }
}

async fn read_results(client: &Client, id: &str) -> Result<Vec<TableResult>, CliError> {
    let rows = client
        .query(RESULT_SQL, &[&id])
        .await
        .map_err(CliError::query(format!("steep_repl.overlap_result('{id}')")))?;
    rows.iter()
        .map(|r| {
            serde_json::from_value(Value::Object(output::row_to_json(r))).map_err(|e| {
                CliError::Other(anyhow::anyhow!(
                    "steep_repl.overlap_result('{id}') returned a row this CLI cannot read: {e}"
                ))
            })
        })
        .collect()
}

/// The keys of every table and category that differs, at most `limit` of each.
async fn read_keys(
    client: &Client,
    id: &str,
    tables: &[TableResult],
    limit: u32,
) -> Result<Vec<KeyGroup>, CliError> {
    let lim = i32::try_from(limit).unwrap_or(i32::MAX);
    let mut groups = key_groups_wanted(tables);
    for g in &mut groups {
        // `overlap_rows` splits its table argument at the first dot: a schema with a dot in its name is
        // matched by table name alone (and the schema filtered here).
        let table = if g.schema_name.contains('.') {
            g.table_name.clone()
        } else {
            format!("{}.{}", g.schema_name, g.table_name)
        };
        let rows = client
            .query(ROWS_SQL, &[&id, &table, &g.category, &lim, &g.schema_name])
            .await
            .map_err(CliError::query(format!("steep_repl.overlap_rows('{id}')")))?;
        g.keys = rows
            .iter()
            .map(|r| {
                let text: String = r.try_get(0).unwrap_or_default();
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            })
            .collect();
    }
    Ok(groups)
}

/// The JSON document: `{"id", "tables": [...], "total": {...}}`, and with `--detailed` `"keys"` (one
/// object per key: schema_name, table_name, category, key) and `"keys_limit"`.
fn document(
    id: &str,
    tables: &[TableResult],
    total: &Totals,
    groups: Option<&[KeyGroup]>,
    limit: Option<u32>,
) -> Value {
    let mut doc = Map::new();
    doc.insert("id".into(), Value::from(id));
    doc.insert("tables".into(), serde_json::to_value(tables).unwrap_or(Value::Null));
    doc.insert("total".into(), serde_json::to_value(total).unwrap_or(Value::Null));
    if let Some(groups) = groups {
        let keys: Vec<Value> = groups
            .iter()
            .flat_map(|g| {
                g.keys.iter().map(|k| {
                    serde_json::json!({
                        "schema_name": g.schema_name,
                        "table_name": g.table_name,
                        "category": g.category,
                        "key": k,
                    })
                })
            })
            .collect();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("keys_limit".into(), Value::from(limit));
    }
    Value::Object(doc)
}

/// A count, or `-` for NULL.
fn cell(v: Option<u64>) -> String {
    v.map(output::count).unwrap_or_else(|| "-".into())
}

/// The status column: the server's status, with its detail when there is one.
fn status_cell(r: &TableResult) -> String {
    match r.detail.as_deref().filter(|d| !d.is_empty()) {
        Some(d) => format!("{}: {d}", r.status),
        None => r.status.clone(),
    }
}

/// `3 compared (1 differs), 1 skipped, 1 truncated`.
fn total_status(t: &Totals) -> String {
    let mut s = format!("{} compared", t.compared);
    if t.compared > 0 {
        s.push_str(&format!(" ({} differ{})", t.differ, if t.differ == 1 { "s" } else { "" }));
    }
    for (n, what) in [(t.skipped, "skipped"), (t.truncated, "truncated")] {
        if n > 0 {
            s.push_str(&format!(", {n} {what}"));
        }
    }
    let other = t.not_compared() - t.skipped - t.truncated;
    if other > 0 {
        s.push_str(&format!(", {other} not compared"));
    }
    s
}

/// The per-table table with a TOTAL row, columns sized to their widest cell, counts right-aligned.
pub fn table_lines(tables: &[TableResult], total: &Totals) -> Vec<String> {
    if tables.is_empty() {
        return vec!["no tables to compare".to_string()];
    }
    const HEADER: [&str; 9] = [
        "table",
        "rows here",
        "rows on peer",
        "match",
        "conflict",
        "only here",
        "only on peer",
        "exchanged",
        "status",
    ];
    let mut grid: Vec<[String; 9]> = Vec::with_capacity(tables.len() + 2);
    grid.push(HEADER.map(str::to_string));
    for r in tables {
        grid.push([
            r.name(),
            cell(r.local_rows),
            cell(r.peer_rows),
            cell(r.matched),
            cell(r.conflict),
            cell(r.local_only),
            cell(r.peer_only),
            output::bytes(r.bytes_exchanged),
            status_cell(r),
        ]);
    }
    grid.push([
        "TOTAL".to_string(),
        output::count(total.local_rows),
        output::count(total.peer_rows),
        output::count(total.matched),
        output::count(total.conflict),
        output::count(total.local_only),
        output::count(total.peer_only),
        output::bytes(total.bytes_exchanged),
        total_status(total),
    ]);
    let mut widths = [0usize; 9];
    for row in &grid {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    grid.iter()
        .map(|row| {
            let mut line = format!("{:<w$}", row[0], w = widths[0]);
            for (c, w) in row[1..8].iter().zip(&widths[1..8]) {
                line.push_str(&format!("  {c:>w$}"));
            }
            line.push_str(&format!("  {}", row[8]));
            line
        })
        .collect()
}

/// The keys that differ, by table and category, saying where the list is cut.
pub fn key_lines(groups: &[KeyGroup], limit: u32) -> Vec<String> {
    let mut lines = Vec::new();
    if groups.is_empty() {
        return lines;
    }
    lines.push(String::new());
    lines.push(format!("keys that differ (at most {} per table and category):", output::count(limit.into())));
    for g in groups {
        let shown = CATEGORIES.iter().find(|(c, _)| *c == g.category).map_or(g.category.as_str(), |(_, s)| s);
        let cut = if g.cut() {
            format!(", first {} shown", output::count(g.keys.len() as u64))
        } else {
            String::new()
        };
        let noun = if g.total == 1 { "key" } else { "keys" };
        lines.push(format!(
            "{}.{}  {shown}: {} {noun}{cut}",
            g.schema_name,
            g.table_name,
            output::count(g.total)
        ));
        for k in &g.keys {
            lines.push(format!("    {k}"));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compared(name: &str, local: u64, peer: u64, m: u64, c: u64, lo: u64, po: u64) -> TableResult {
        TableResult {
            schema_name: "app".into(),
            table_name: name.into(),
            local_rows: Some(local),
            peer_rows: Some(peer),
            matched: Some(m),
            conflict: Some(c),
            local_only: Some(lo),
            peer_only: Some(po),
            bytes_exchanged: 1536,
            status: "compared".into(),
            detail: None,
        }
    }

    fn skipped(name: &str) -> TableResult {
        TableResult {
            schema_name: "app".into(),
            table_name: name.into(),
            local_rows: None,
            peer_rows: None,
            matched: None,
            conflict: None,
            local_only: None,
            peer_only: None,
            bytes_exchanged: 0,
            status: "skipped".into(),
            detail: Some("no primary key or replica identity index".into()),
        }
    }

    #[test]
    fn reads_result_rows_as_the_server_names_them() {
        let row = serde_json::json!({
            "schema_name": "app", "table_name": "t", "local_rows": 10, "peer_rows": 9, "match": 8,
            "conflict": 1, "local_only": 1, "peer_only": 0, "bytes_exchanged": 100, "status": "compared",
            "detail": null
        });
        let r: TableResult = serde_json::from_value(row.clone()).unwrap();
        assert_eq!(r.matched, Some(8));
        assert_eq!(r.differing(), 2);
        assert_eq!(serde_json::to_value(&r).unwrap(), row);
        let s: TableResult = serde_json::from_value(serde_json::json!({
            "schema_name": "app", "table_name": "u", "local_rows": null, "peer_rows": null, "match": null,
            "conflict": null, "local_only": null, "peer_only": null, "bytes_exchanged": 0, "status": "skipped",
            "detail": "no key"
        }))
        .unwrap();
        assert_eq!((s.local_rows, s.differing(), s.compared()), (None, 0, false));
    }

    #[test]
    fn totals_sum_the_compared_tables() {
        let mut truncated = compared("big", 1000, 1000, 10, 5, 0, 0);
        truncated.status = "truncated".into();
        let tables = vec![
            compared("a", 10, 10, 10, 0, 0, 0),
            compared("b", 1200, 1100, 1000, 50, 150, 50),
            skipped("c"),
            truncated,
        ];
        let t = totals(&tables);
        assert_eq!(
            (t.tables, t.compared, t.differ, t.skipped, t.truncated, t.not_compared()),
            (4, 2, 1, 1, 1, 2)
        );
        assert_eq!((t.local_rows, t.peer_rows, t.matched), (1210, 1110, 1010));
        assert_eq!((t.conflict, t.local_only, t.peer_only), (50, 150, 50));
        // Every table's bytes crossed the network, the truncated one's too.
        assert_eq!(t.bytes_exchanged, 3 * 1536);
        assert_eq!(total_status(&t), "2 compared (1 differs), 1 skipped, 1 truncated");
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["match"], 1010);
    }

    #[test]
    fn exit_decision() {
        let same = vec![compared("a", 3, 3, 3, 0, 0, 0), compared("b", 0, 0, 0, 0, 0, 0)];
        assert!(verdict(&totals(&same), "node b").is_ok());
        assert!(verdict(&totals(&[]), "node b").is_ok());
        for (tables, differ, not_compared) in [
            (vec![compared("a", 3, 3, 2, 1, 0, 0)], 1, 0),
            (vec![compared("a", 3, 2, 2, 0, 1, 0)], 1, 0),
            (vec![compared("a", 2, 3, 2, 0, 0, 1)], 1, 0),
            (vec![compared("a", 3, 3, 3, 0, 0, 0), skipped("b")], 0, 1),
            (
                vec![
                    TableResult { status: "truncated".into(), ..compared("a", 3, 3, 3, 0, 0, 0) },
                    skipped("b"),
                ],
                0,
                2,
            ),
        ] {
            let e = verdict(&totals(&tables), "node b").unwrap_err();
            assert_eq!(e.exit_code(), crate::error::EXIT_SCHEMA_MISMATCH);
            let CliError::OverlapDiffers { differ: d, not_compared: n, .. } = e else { panic!("{e}") };
            assert_eq!((d, n), (differ, not_compared), "{tables:?}");
        }
    }

    #[test]
    fn renders_the_table() {
        let tables = vec![compared("orders", 1_234_567, 1_234_560, 1_234_500, 7, 60, 53), skipped("log")];
        let lines = table_lines(&tables, &totals(&tables));
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert_eq!(
            lines[0],
            "table       rows here  rows on peer      match  conflict  only here  only on peer  exchanged  status"
        );
        assert_eq!(
            lines[1],
            "app.orders  1,234,567     1,234,560  1,234,500         7         60            53    1.5 KiB  compared"
        );
        assert_eq!(
            lines[2],
            "app.log             -             -          -         -          -             -        0 B  \
             skipped: no primary key or replica identity index"
        );
        assert_eq!(
            lines[3],
            "TOTAL       1,234,567     1,234,560  1,234,500         7         60            53    1.5 KiB  \
             1 compared (1 differs), 1 skipped"
        );
        assert_eq!(table_lines(&[], &Totals::default()), vec!["no tables to compare".to_string()]);
    }

    #[test]
    fn lists_keys_by_table_and_category() {
        let tables = vec![compared("a", 3, 3, 3, 0, 0, 0), compared("b", 5, 4, 1, 2, 2, 1)];
        let mut groups = key_groups_wanted(&tables);
        let wanted: Vec<(&str, &str, u64)> =
            groups.iter().map(|g| (g.table_name.as_str(), g.category.as_str(), g.total)).collect();
        assert_eq!(wanted, [("b", "conflict", 2), ("b", "local_only", 2), ("b", "peer_only", 1)]);
        groups[0].keys = vec![serde_json::json!({"id": 1}), serde_json::json!({"id": 2})];
        groups[1].keys = vec![serde_json::json!({"id": 3})];
        groups[2].keys = vec![serde_json::json!({"id": 9})];
        assert!(!groups[0].cut() && groups[1].cut());
        let lines = key_lines(&groups, 1);
        assert_eq!(
            lines,
            [
                "",
                "keys that differ (at most 1 per table and category):",
                "app.b  conflict: 2 keys",
                "    {\"id\":1}",
                "    {\"id\":2}",
                "app.b  only here: 2 keys, first 1 shown",
                "    {\"id\":3}",
                "app.b  only on the peer: 1 key",
                "    {\"id\":9}",
            ]
        );
        assert!(key_lines(&[], 10).is_empty());

        let total = totals(&tables);
        let doc = document("ovl-1", &tables, &total, Some(&groups), Some(1));
        assert_eq!(doc["id"], "ovl-1");
        assert_eq!(doc["tables"][1]["conflict"], 2);
        assert_eq!(doc["total"]["differ"], 1);
        assert_eq!(doc["keys"].as_array().map(Vec::len), Some(4));
        assert_eq!(
            doc["keys"][2],
            serde_json::json!({"schema_name": "app", "table_name": "b", "category": "local_only", "key": {"id": 3}})
        );
        assert_eq!(doc["keys_limit"], 1);
        let plain = document("ovl-1", &tables, &total, None, None);
        assert!(plain.get("keys").is_none() && plain.get("keys_limit").is_none());
    }
}

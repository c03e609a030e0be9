//! The merge step of a `start_merge` job: once the overlap coordinator (`crate::worker::overlap`) has
//! compared a table and listed every differing key, its rows are copied and settled here, in batches of
//! keys, each batch one transaction on the node it writes (see `crate::api::merge`).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use steep_repl_engine::copy_text;
use steep_repl_engine::digest::{Category, Comparison};
use steep_repl_engine::ident::quote_literal;
use steep_repl_engine::merge::{self, Strategy, Winner};
use steep_repl_engine::overlap::Compared;

use crate::job::JobError;
use crate::pg::rights::as_owner;
use crate::worker::overlap::Peer;

/// Keys per batch: one transaction on the node written.
const BATCH_KEYS: usize = 10_000;

/// Sample keys recorded per table, node and action.
const SAMPLE_KEYS: usize = 10;

/// What a merge was asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub strategy: Strategy,
    pub dry_run: bool,
}

/// Which node a batch is read from or written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Local,
    Peer,
}

impl Node {
    fn as_str(self) -> &'static str {
        match self {
            Node::Local => "local",
            Node::Peer => "peer",
        }
    }
}

/// Rows written to one node by one action, with sample keys.
struct Entry {
    node: &'static str,
    action: &'static str,
    rows: i64,
    samples: Vec<Vec<u8>>,
}

/// Rows written per node and action, for `steep_repl.merge_plan`.
#[derive(Default)]
struct Tally {
    entries: Vec<Entry>,
}

impl Tally {
    fn add(&mut self, node: Node, action: &'static str, rows: i64, keys: &[Vec<u8>]) {
        let at = match self.entries.iter().position(|e| (e.node, e.action) == (node.as_str(), action)) {
            Some(i) => i,
            None => {
                self.entries.push(Entry { node: node.as_str(), action, rows: 0, samples: Vec::new() });
                self.entries.len() - 1
            }
        };
        let e = &mut self.entries[at];
        e.rows += rows;
        for k in keys.iter().take(SAMPLE_KEYS.saturating_sub(e.samples.len())) {
            e.samples.push(k.clone());
        }
    }
}

/// The key text of a line as a JSON object of the key columns (values as text; NULL as null).
fn key_object(columns: &[String], key_text: &[u8]) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    for (c, f) in columns.iter().zip(copy_text::split_fields(key_text)) {
        let v = copy_text::unescape_field(f).map_or(serde_json::Value::Null, |b| {
            serde_json::Value::String(String::from_utf8_lossy(&b).into_owned())
        });
        o.insert(c.clone(), v);
    }
    serde_json::Value::Object(o)
}

/// Key texts as COPY text, one line each.
fn key_lines(keys: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.iter().map(|k| k.len() + 1).sum());
    for k in keys {
        out.extend_from_slice(k);
        out.push(copy_text::ROW_END);
    }
    out
}

fn text_array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| quote_literal(i)).collect();
    format!("ARRAY[{}]::pg_catalog.text[]", quoted.join(", "))
}

fn bytea(data: &[u8]) -> String {
    format!("pg_catalog.decode('{}', 'base64')", steep_repl_engine::digest::wire::to_text(data))
}

/// An error met while handling `t`'s rows: its message may quote row data (a COPY context, a value), so
/// other roles read only where it happened.
fn row_error(t: &Compared, where_: &str, e: impl std::fmt::Display) -> JobError {
    JobError {
        public: format!(
            "merging {}.{}: {where_} failed (the full message is shown to the job's role)",
            t.schema, t.name
        ),
        full: format!("merging {}.{}: {where_}: {e}", t.schema, t.name),
    }
}

/// One table's merge on both nodes.
struct Merger<'a, 's> {
    id: &'a str,
    peer: &'a Peer<'s>,
    t: &'a Compared,
    tally: Tally,
}

impl Merger<'_, '_> {
    /// The rows of `keys` on the peer, as COPY text, running `meanwhile` while the peer works.
    fn peer_rows_while(&self, keys: &[Vec<u8>], meanwhile: &mut dyn FnMut()) -> Result<Vec<u8>, JobError> {
        let sql = format!(
            "SELECT steep_repl.merge_rows({}, {}, {}, {})",
            quote_literal(&self.t.schema),
            quote_literal(&self.t.name),
            text_array(&self.t.key),
            bytea(&key_lines(keys))
        );
        Ok(self
            .peer
            .request_while(&sql, meanwhile)
            .map_err(|e| row_error(self.t, "reading rows on the peer", e))?
            .unwrap_or_default())
    }

    /// Writes `rows` on the peer in one transaction there, running `meanwhile` while the peer works;
    /// the rows written.
    fn peer_write_while(
        &self,
        mode: &str,
        category: Category,
        decided_by: &str,
        rows: &[u8],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<i64, JobError> {
        if rows.is_empty() {
            meanwhile();
            return Ok(0);
        }
        let sql = format!(
            "SELECT steep_repl.merge_write({}, {}, {}, {}, {}, {}, {}, {})",
            quote_literal(self.id),
            quote_literal(&self.t.schema),
            quote_literal(&self.t.name),
            text_array(&self.t.key),
            quote_literal(mode),
            quote_literal(category.as_str()),
            quote_literal(decided_by),
            bytea(rows)
        );
        let answer = self
            .peer
            .query_while(&sql, meanwhile)
            .map_err(|e| row_error(self.t, "writing rows on the peer", e))?;
        let n = answer.rows.into_iter().next().and_then(|r| r.into_iter().next().flatten());
        Ok(n.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// Reads the rows of `keys` on `from` and writes them with `mode` on the other node, batch by
    /// batch, each batch one transaction there (in a dry run, counts them). The peer's part of each
    /// step overlaps this node's: this node reads the next batch while the peer writes one, or
    /// writes one while the peer reads the next. Tallied under `action`.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &mut self,
        from: Node,
        mode: &str,
        action: &'static str,
        category: Category,
        decided_by: &str,
        keys: &[Vec<u8>],
        dry_run: bool,
    ) -> Result<(), JobError> {
        let to = if from == Node::Local { Node::Peer } else { Node::Local };
        let batches: Vec<&[Vec<u8>]> = keys.chunks(BATCH_KEYS).collect();
        // Each batch written is recorded in merge_plan at once: a merge that fails later still shows
        // what it did.
        if dry_run {
            for b in &batches {
                self.tally.add(to, action, b.len() as i64, b);
            }
        } else if from == Node::Local {
            let mut rows = match batches.first() {
                Some(b) => self.rows(Node::Local, b)?,
                None => Vec::new(),
            };
            for (i, b) in batches.iter().enumerate() {
                let mut next = None;
                let n = self.peer_write_while(mode, category, decided_by, &rows, &mut || {
                    if let Some(b) = batches.get(i + 1) {
                        next = Some(self.rows(Node::Local, b));
                    }
                })?;
                self.tally.add(to, action, n, b);
                self.record();
                if let Some(r) = next {
                    rows = r?;
                }
            }
        } else {
            let mut pending: Option<(&[Vec<u8>], Vec<u8>)> = None;
            for b in &batches {
                let mut wrote = None;
                let rows = self.peer_rows_while(b, &mut || {
                    if let Some((keys, r)) = pending.take() {
                        wrote = Some((keys, self.write(Node::Local, mode, category, decided_by, &r)));
                    }
                })?;
                if let Some((keys, n)) = wrote {
                    self.tally.add(to, action, n?, keys);
                    self.record();
                }
                pending = Some((b, rows));
            }
            if let Some((keys, r)) = pending {
                let n = self.write(Node::Local, mode, category, decided_by, &r)?;
                self.tally.add(to, action, n, keys);
                self.record();
            }
        }
        Ok(())
    }

    /// The rows of `keys` on `node`, as COPY text.
    fn rows(&self, node: Node, keys: &[Vec<u8>]) -> Result<Vec<u8>, JobError> {
        let data = key_lines(keys);
        match node {
            Node::Local => BackgroundWorker::transaction(|| {
                Spi::get_one_with_args::<Vec<u8>>(
                    "SELECT steep_repl.merge_rows($1, $2, $3, $4)",
                    &[
                        self.t.schema.as_str().into(),
                        self.t.name.as_str().into(),
                        self.t.key.clone().into(),
                        data.as_slice().into(),
                    ],
                )
            })
            .map(Option::unwrap_or_default)
            .map_err(|e| row_error(self.t, "reading rows here", e)),
            Node::Peer => self.peer_rows_while(keys, &mut || {}),
        }
    }

    /// Writes `rows` on `node` in one transaction there; the rows written.
    fn write(
        &self,
        node: Node,
        mode: &str,
        category: Category,
        decided_by: &str,
        rows: &[u8],
    ) -> Result<i64, JobError> {
        if rows.is_empty() {
            return Ok(0);
        }
        match node {
            Node::Local => BackgroundWorker::transaction(AssertUnwindSafe(|| {
                Spi::get_one_with_args::<i64>(
                    "SELECT steep_repl.merge_write($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        self.id.into(),
                        self.t.schema.as_str().into(),
                        self.t.name.as_str().into(),
                        self.t.key.clone().into(),
                        mode.into(),
                        category.as_str().into(),
                        decided_by.into(),
                        rows.into(),
                    ],
                )
            }))
            .map(|n| n.unwrap_or(0))
            .map_err(|e| row_error(self.t, "writing rows here", e)),
            Node::Peer => self.peer_write_while(mode, category, decided_by, rows, &mut || {}),
        }
    }

    /// Copies the rows of one-sided `keys` from `from` to the other node (or, in a dry run, counts them).
    fn copy_over(
        &mut self,
        from: Node,
        category: Category,
        keys: &[Vec<u8>],
        dry_run: bool,
    ) -> Result<(), JobError> {
        self.transfer(from, "insert", "insert", category, "union", keys, dry_run)
    }

    /// Settles conflicting `keys` by `strategy`.
    fn settle(&mut self, strategy: &Strategy, keys: &[Vec<u8>], dry_run: bool) -> Result<(), JobError> {
        let decided_by = strategy.name();
        let (from, mode) = match strategy {
            Strategy::PreferLocal => (Node::Local, "update"),
            Strategy::PreferRemote => (Node::Peer, "update"),
            Strategy::Manual => (Node::Peer, "park"),
            Strategy::LastModified(_) => (Node::Local, ""),
        };
        if !mode.is_empty() {
            let action = if mode == "park" { "park" } else { "update" };
            return self.transfer(from, mode, action, Category::Conflict, &decided_by, keys, dry_run);
        }
        for batch in keys.chunks(BATCH_KEYS) {
            match strategy {
                Strategy::PreferLocal | Strategy::PreferRemote | Strategy::Manual => {}
                Strategy::LastModified(column) => {
                    let (to_peer, to_local) = self.decide_by_time(column, batch)?;
                    for (to, rows, keys) in
                        [(Node::Peer, to_peer.0, to_peer.1), (Node::Local, to_local.0, to_local.1)]
                    {
                        let n = if dry_run {
                            keys.len() as i64
                        } else {
                            self.write(to, "update", Category::Conflict, &decided_by, &rows)?
                        };
                        if !keys.is_empty() {
                            self.tally.add(to, "update", n, &keys);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads both nodes' rows of `keys` and splits them by the newer `column`: (rows to write on the
    /// peer and their keys, rows to write here and their keys).
    #[allow(clippy::type_complexity)]
    fn decide_by_time(
        &self,
        column: &str,
        keys: &[Vec<u8>],
    ) -> Result<((Vec<u8>, Vec<Vec<u8>>), (Vec<u8>, Vec<Vec<u8>>)), JobError> {
        let columns = local_columns(&self.t.schema, &self.t.name)?;
        let position = columns.iter().position(|c| c == column).ok_or_else(|| {
            JobError::plain(format!(
                "{}.{} has no column {column} (strategy last-modified)",
                self.t.schema, self.t.name
            ))
        })?;
        let fields = self.t.key_fields().map_err(|e| JobError::plain(e.to_string()))?;
        let local = self.rows(Node::Local, keys)?;
        let peer = self.rows(Node::Peer, keys)?;
        let bad = |e: String| row_error(self.t, "pairing the rows of a conflict", e);
        let l: HashMap<Vec<u8>, &[u8]> = merge::lines_by_key(&local, &fields).map_err(bad)?;
        let p: HashMap<Vec<u8>, &[u8]> = merge::lines_by_key(&peer, &fields).map_err(bad)?;
        let (mut to_peer, mut to_local) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for k in keys {
            // A key gone from either side since the comparison is left for the next merge.
            let (Some(lr), Some(pr)) = (l.get(k), p.get(k)) else { continue };
            let winner = merge::newer(lr, pr, position).map_err(|e| {
                bad(format!("column {column}: {e} (last-modified needs a date or timestamp column)"))
            })?;
            let (target, line) = match winner {
                Winner::Local => (&mut to_peer, lr),
                Winner::Peer => (&mut to_local, pr),
            };
            target.0.extend_from_slice(line);
            target.0.push(copy_text::ROW_END);
            target.1.push(k.clone());
        }
        Ok((to_peer, to_local))
    }

    /// Adds the tally so far to `steep_repl.merge_plan` (sample keys: those of the first batch
    /// recorded) and empties it.
    fn record(&mut self) {
        let entries = std::mem::take(&mut self.tally.entries);
        BackgroundWorker::transaction(AssertUnwindSafe(|| {
            as_owner(|| {
                for Entry { node, action, rows, samples } in &entries {
                    let sample: Vec<serde_json::Value> =
                        samples.iter().map(|k| key_object(&self.t.key, k)).collect();
                    Spi::run_with_args(
                        "INSERT INTO steep_repl.merge_plan AS p (merge_id, schema_name, table_name, node, action, rows, \
                         sample_keys) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (merge_id, schema_name, \
                         table_name, node, action) DO UPDATE SET rows = p.rows + excluded.rows",
                        &[
                            self.id.into(),
                            self.t.schema.as_str().into(),
                            self.t.name.as_str().into(),
                            (*node).into(),
                            (*action).into(),
                            (*rows).into(),
                            pgrx::JsonB(serde_json::Value::Array(sample)).into(),
                        ],
                    )
                    .unwrap_or_else(|e| error!("recording the merge of {}.{}: {e}", self.t.schema, self.t.name));
                }
            })
        }));
    }
}

/// COPY's column list of a table here.
fn local_columns(schema: &str, name: &str) -> Result<Vec<String>, JobError> {
    BackgroundWorker::transaction(|| {
        Spi::get_one_with_args::<Vec<String>>(
            "SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY a.attnum) \
             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''",
            &[schema.into(), name.into()],
        )
    })
    .map(Option::unwrap_or_default)
    .map_err(|e| JobError::plain(format!("reading the columns of {schema}.{name}: {e}")))
}

/// Merges one compared table: one-sided rows copied over, conflicts settled by the plan's strategy.
pub fn merge_table(
    id: &str,
    peer: &Peer<'_>,
    t: &Compared,
    c: &Comparison,
    plan: &Plan,
) -> Result<(), JobError> {
    let mut by: HashMap<Category, Vec<Vec<u8>>> = HashMap::new();
    for (cat, k) in &c.keys {
        by.entry(*cat).or_default().push(k.clone());
    }
    let mut m = Merger { id, peer, t, tally: Tally::default() };
    let none = Vec::new();
    m.copy_over(
        Node::Local,
        Category::LocalOnly,
        by.get(&Category::LocalOnly).unwrap_or(&none),
        plan.dry_run,
    )?;
    m.copy_over(Node::Peer, Category::PeerOnly, by.get(&Category::PeerOnly).unwrap_or(&none), plan.dry_run)?;
    m.settle(&plan.strategy, by.get(&Category::Conflict).unwrap_or(&none), plan.dry_run)?;
    m.record();
    Ok(())
}

/// The compared tables in merge order: parents before the tables whose foreign keys reference them
/// (as this node's catalog says); the tables on a foreign-key cycle last, named in the second list.
pub fn merge_order(compared: Vec<Compared>) -> Result<(Vec<Compared>, Vec<String>), JobError> {
    let edges: Vec<(String, String, String, String)> = BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT cn.nspname::pg_catalog.text, c.relname::pg_catalog.text, pn.nspname::pg_catalog.text, \
                 p.relname::pg_catalog.text FROM pg_catalog.pg_constraint k \
                 JOIN pg_catalog.pg_class c ON c.oid = k.conrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace \
                 JOIN pg_catalog.pg_class p ON p.oid = k.confrelid JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace \
                 WHERE k.contype = 'f'",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in rows {
                out.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<String>(3)?.unwrap_or_default(),
                    r.get::<String>(4)?.unwrap_or_default(),
                ));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    })
    .map_err(|e| JobError::plain(format!("reading foreign keys: {e}")))?;
    let index: HashMap<(&str, &str), usize> =
        compared.iter().enumerate().map(|(i, t)| ((t.schema.as_str(), t.name.as_str()), i)).collect();
    let pairs: Vec<(usize, usize)> = edges
        .iter()
        .filter_map(|(cs, cn, ps, pn)| {
            Some((*index.get(&(cs.as_str(), cn.as_str()))?, *index.get(&(ps.as_str(), pn.as_str()))?))
        })
        .collect();
    let (order, cyclic) = merge::parents_first(compared.len(), &pairs);
    let cyclic_names =
        cyclic.iter().map(|&i| format!("{}.{}", compared[i].schema, compared[i].name)).collect();
    let mut slots: Vec<Option<Compared>> = compared.into_iter().map(Some).collect();
    let ordered = order.into_iter().filter_map(|i| slots[i].take()).collect();
    Ok((ordered, cyclic_names))
}

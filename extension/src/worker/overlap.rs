//! The overlap analysis coordinator (PRODUCT.md §10, first part; SQL side in `crate::api::overlap`).
//!
//! The leader of an `overlap` job connects to the peer (through `crate::peer`), reads both nodes'
//! tables and keys with the same catalog query and pairs them (`steep_repl_engine::overlap`), starts an
//! overlap scan on each node (the peer's over the connection, this node's in its own transaction:
//! each runs its own background workers under its own snapshot), waits for both, then compares each
//! table top-down (`steep_repl_engine::digest::compare`): this node's digest files are read here, the
//! peer's digests of the tree nodes that differ are asked for with `overlap_scan_request`, so only
//! digests and the keys that differ cross the network. Each table's outcome and keys are recorded when
//! its comparison ends; both scans are dropped at the end, also after a failure or a cancel.
//!
//! `analyze_overlap` runs the same comparison in the caller's backend, this node's side scanned there
//! under the statement's snapshot (one process), the peer's in its own workers.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use steep_repl_engine::digest::{
    self, Comparison, Digest, DigestError, FANOUT, Limits, Node, RowDigest, Side, TableDigests, Width,
};
use steep_repl_engine::filter::TablePattern;
use steep_repl_engine::helper_thread;
use steep_repl_engine::ident::quote_literal;
use steep_repl_engine::overlap::{self as pairing, Compared, Pairing, TABLE_KEYS_SQL, TableKeys};

use crate::api::overlap::{ScanTable, scan_base};
use crate::bookkeeping::overlap::{self as book, Keys, TableResult};
use crate::bookkeeping::{self, Figures};
use crate::gucs;
use crate::job::{self, JobError};
use crate::peer::{Conn, PeerError, Pending, Rows};
use crate::pg::{self, scan, session, xact};
use crate::progress;
use crate::shmem::{JobSlot, Phase, Shared};
use crate::worker::merge;

/// The longest one request to the peer may take (a level of a large table's tree).
const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Progress of an overlap job, in thousandths: the scans (both nodes' average) count for `SCAN_WORK`,
/// the comparison for the rest, table by table.
const WORK_TOTAL: u64 = 1000;
const SCAN_WORK: f64 = 800.0;
/// How often the scans' states are looked at.
const POLL: Duration = Duration::from_millis(200);

/// Entry point of an overlap job's leader.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn steep_repl_overlap_leader(arg: pg_sys::Datum) {
    job::lead(arg, |_| {}, run_leader, finish);
}

const ENDING: job::Ending = job::Ending {
    success: (Phase::Complete, "complete"),
    cleanup: |_| None,
    cancelled: |_| "cancelled by steep_repl.cancel_snapshot()".to_string(),
    failed: |first, _| first,
};

fn finish(shared: &'static Shared, slot: usize, outcome: Result<(), JobError>) {
    job::finish(shared, slot, outcome, &ENDING);
}

/// A connection to the peer that counts the bytes it exchanges, and stops when `stop` says so.
pub struct Peer<'s> {
    conn: Conn,
    who: String,
    conninfo: String,
    /// Bytes sent and received since the last [`Peer::take_bytes`].
    bytes: Cell<u64>,
    stop: &'s dyn Fn() -> Option<String>,
}

impl Peer<'_> {
    pub(crate) fn query(&self, sql: &str) -> Result<Rows, String> {
        self.query_while(sql, &mut || {})
    }

    /// [`Peer::query`], running `meanwhile` once the statement is sent and before its answer is read.
    pub(crate) fn query_while(&self, sql: &str, meanwhile: &mut dyn FnMut()) -> Result<Rows, String> {
        let rows = self.exchange(self.conn.start(sql, Instant::now() + PEER_REQUEST_TIMEOUT), meanwhile)?;
        let got: usize = rows.rows.iter().flatten().map(|v| v.as_ref().map_or(0, String::len)).sum();
        self.bytes.set(self.bytes.get() + (sql.len() + got) as u64);
        Ok(rows)
    }

    /// Runs one statement whose first value is `bytea`, fetched in binary (its bytes as they are, not
    /// as hex text), running `meanwhile` once it is sent; that value.
    pub(crate) fn request_while(
        &self,
        sql: &str,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Option<Vec<u8>>, String> {
        let pending = self.conn.start_binary(sql, Instant::now() + PEER_REQUEST_TIMEOUT);
        let rows = self.exchange(pending, meanwhile)?;
        let got: usize = rows.raw.iter().flatten().map(|v| v.as_ref().map_or(0, Vec::len)).sum();
        self.bytes.set(self.bytes.get() + (sql.len() + got) as u64);
        Ok(rows.raw.into_iter().next().and_then(|r| r.into_iter().next().flatten()))
    }

    /// Runs `meanwhile`, then waits for `pending`'s answer, stopping when `stop` says so.
    fn exchange(&self, pending: Pending<'_>, meanwhile: &mut dyn FnMut()) -> Result<Rows, String> {
        let stop = self.stop;
        let mut interrupt = || match stop() {
            Some(why) => Err(PeerError::Interrupted(why)),
            None => Ok(()),
        };
        meanwhile();
        pending.finish(&mut interrupt).map_err(|e| format!("{}: {e}", self.who))
    }

    /// The first value of the first row.
    pub(crate) fn value(&self, sql: &str) -> Result<Option<String>, String> {
        Ok(self.query(sql)?.rows.into_iter().next().and_then(|r| r.into_iter().next().flatten()))
    }

    fn take_bytes(&self) -> u64 {
        self.bytes.replace(0)
    }
}

/// Connects to the peer and checks that it can take part: steep_repl installed at this node's
/// version, the same server encoding (rows are compared as bytes), a superuser session.
pub fn connect<'s>(
    who: &str,
    conninfo: &str,
    stop: &'s dyn Fn() -> Option<String>,
) -> Result<Peer<'s>, JobError> {
    let timeout = Duration::from_secs(gucs::PEER_TIMEOUT_S.get().max(1) as u64);
    let mut interrupt = || match stop() {
        Some(why) => Err(PeerError::Interrupted(why)),
        None => Ok(()),
    };
    // libpq's message names the host, port and user: for the job's role only.
    let conn = Conn::connect(conninfo, Instant::now() + timeout, &mut interrupt).map_err(|e| JobError {
        public: format!("cannot connect to {who} (the full message is shown to the job's role)"),
        full: format!("connecting to {who}: {e}"),
    })?;
    let peer = Peer { conn, who: who.to_string(), conninfo: conninfo.to_string(), bytes: Cell::new(0), stop };
    let rows = peer.query(
        "SELECT (SELECT e.extversion FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'steep_repl'), \
         pg_catalog.current_setting('server_encoding'), \
         (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)",
    )?;
    let Some(theirs) = rows.get(0, "extversion") else {
        return Err(JobError::plain(format!(
            "steep_repl is not installed in {who}'s database: each node hashes its own rows in its own workers (CREATE EXTENSION steep_repl there)"
        )));
    };
    // Both nodes must read the scan specification and print keys the same way: a peer of another
    // version could ignore a field it does not know (a key form) and report differences that are not.
    let ours = Spi::get_one::<String>(
        "SELECT e.extversion FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'steep_repl'",
    )
    .map_err(|e| JobError::plain(e.to_string()))?
    .unwrap_or_default();
    if theirs != ours {
        return Err(JobError::plain(format!(
            "{who} runs steep_repl {theirs} and this node {ours}: overlap and merge need the same version on both nodes \
             (ALTER EXTENSION steep_repl UPDATE on the older one)"
        )));
    }
    let encoding = Spi::get_one::<String>("SELECT pg_catalog.current_setting('server_encoding')")
        .map_err(|e| JobError::plain(e.to_string()))?
        .unwrap_or_default();
    let theirs = rows.get(0, "current_setting").unwrap_or_default();
    if theirs != encoding {
        return Err(JobError::plain(format!(
            "{who} stores text as {theirs} and this server as {encoding}: rows cannot be compared as bytes"
        )));
    }
    if rows.get(0, "rolsuper") != Some("t") {
        return Err(JobError::plain(format!(
            "the role steep_repl connects to {who} as is not a superuser there"
        )));
    }
    peer.take_bytes();
    Ok(peer)
}

/// This node's tables and keys (in a transaction).
fn local_tables() -> Result<Vec<TableKeys>, String> {
    Spi::connect(|c| -> Result<Vec<TableKeys>, String> {
        let mut v = Vec::new();
        for r in c.select(TABLE_KEYS_SQL, None, &[]).map_err(|e| e.to_string())? {
            let get = |i: usize| r.get::<String>(i).map_err(|e| e.to_string());
            v.push(TableKeys::from_row(get(1)?, get(2)?, get(3)?, get(4)?)?);
        }
        Ok(v)
    })
}

/// The peer's tables and keys.
fn peer_tables(peer: &Peer<'_>) -> Result<Vec<TableKeys>, String> {
    let rows = peer.query(TABLE_KEYS_SQL)?;
    rows.rows
        .into_iter()
        .map(|r| {
            let mut it = r.into_iter();
            let mut next = || it.next().flatten();
            TableKeys::from_row(next(), next(), next(), next())
        })
        .collect()
}

/// The tables to compare and those skipped.
pub fn pair_tables(peer: &Peer<'_>, patterns: &[String]) -> Result<Pairing, String> {
    let patterns: Vec<TablePattern> = patterns
        .iter()
        .map(|p| p.parse::<TablePattern>().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let theirs = peer_tables(peer)?;
    let ours = local_tables()?;
    Ok(pairing::pair(&ours, &theirs, &patterns))
}

/// The scan specification of the compared tables.
fn scan_spec(compared: &[Compared]) -> serde_json::Value {
    let tables: Vec<ScanTable> = compared
        .iter()
        .map(|t| ScanTable {
            schema: t.schema.clone(),
            table: t.name.clone(),
            key: t.key.clone(),
            key_texts: t.key_texts.clone(),
        })
        .collect();
    serde_json::to_value(tables).unwrap_or_default()
}

/// Starts the peer's overlap scan; returns its id.
pub fn start_peer_scan(peer: &Peer<'_>, compared: &[Compared], parallel: i32) -> Result<String, String> {
    let spec = scan_spec(compared).to_string();
    peer.value(&format!(
        "SELECT steep_repl.start_overlap_scan({}::pg_catalog.jsonb, {parallel})",
        quote_literal(&spec)
    ))?
    .ok_or_else(|| format!("{} returned no scan id", peer.who))
}

/// The state of a scan: status, error, rows read so far.
struct ScanState {
    status: String,
    error: Option<String>,
    rows: u64,
    /// How far it has read (0..100).
    percent: f64,
}

impl ScanState {
    fn ended(&self) -> bool {
        !matches!(self.status.as_str(), "pending" | "running")
    }
}

const SCAN_STATE_SQL: &str = "SELECT s.status, s.error, s.rows_done, \
     (SELECT p.percent FROM steep_repl.snapshot_progress(s.id) p) AS percent \
     FROM steep_repl.snapshots s WHERE s.id = ";

fn peer_scan_state(peer: &Peer<'_>, id: &str) -> Result<ScanState, String> {
    let rows = peer.query(&format!("{SCAN_STATE_SQL}{}", quote_literal(id)))?;
    if rows.rows.is_empty() {
        return Err(format!("{}'s overlap scan {id} has disappeared", peer.who));
    }
    Ok(ScanState {
        status: rows.get(0, "status").unwrap_or_default().to_string(),
        error: rows.get(0, "error").map(str::to_string),
        rows: rows.get(0, "rows_done").and_then(|r| r.parse().ok()).unwrap_or(0),
        percent: rows.get(0, "percent").and_then(|r| r.parse().ok()).unwrap_or(0.0),
    })
}

fn local_scan_state(id: &str) -> Result<ScanState, String> {
    Spi::connect(|c| -> Result<ScanState, String> {
        let t = c.select(&format!("{SCAN_STATE_SQL}$1"), Some(1), &[id.into()]).map_err(|e| e.to_string())?;
        if t.is_empty() {
            return Err(format!("this node's overlap scan {id} has disappeared"));
        }
        let r = t.first();
        Ok(ScanState {
            status: r.get::<String>(1).map_err(|e| e.to_string())?.unwrap_or_default(),
            error: r.get::<String>(2).map_err(|e| e.to_string())?,
            rows: r.get::<i64>(3).map_err(|e| e.to_string())?.unwrap_or(0).max(0) as u64,
            percent: r.get::<f64>(4).map_err(|e| e.to_string())?.unwrap_or(0.0),
        })
    })
}

/// Waits until the peer's scan has completed; `tick` is told the rows it has read so far.
fn wait_peer_scan(
    peer: &Peer<'_>,
    id: &str,
    mut tick: impl FnMut(u64) -> Result<(), String>,
) -> Result<(), String> {
    loop {
        let s = peer_scan_state(peer, id)?;
        tick(s.rows)?;
        if s.ended() {
            return scan_outcome(&format!("{}'s", peer.who), id, &s);
        }
        job::nap(POLL);
    }
}

fn scan_outcome(whose: &str, id: &str, s: &ScanState) -> Result<(), String> {
    match s.status.as_str() {
        "complete" => Ok(()),
        other => Err(format!(
            "{whose} overlap scan {id} {other}{}",
            s.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        )),
    }
}

/// One table of the peer's scan, as a side of a comparison.
struct PeerTable<'p, 's> {
    peer: &'p Peer<'s>,
    scan: &'p str,
    schema: &'p str,
    table: &'p str,
    /// The table's total, when asked for ahead of the comparison (see [`compare_table`]).
    total: Option<Digest>,
}

impl PeerTable<'_, '_> {
    /// Sends one request (`arg`: an encoded query) and returns the peer's answer bytes, running
    /// `meanwhile` while the peer works on it.
    fn request_while(
        &self,
        what: &str,
        arg: &[u8],
        width: Width,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<u8>, DigestError> {
        let sql = format!(
            "SELECT steep_repl.overlap_scan_request({}, {}, {}, '{what}', '{}', {})",
            quote_literal(self.scan),
            quote_literal(self.schema),
            quote_literal(self.table),
            digest::wire::to_text(arg),
            width == Width::Narrow,
        );
        self.peer.request_while(&sql, meanwhile).map_err(DigestError::Side)?.ok_or_else(|| {
            DigestError::Side(format!("{} answered nothing to a {what} request", self.peer.who))
        })
    }

    fn request(&self, what: &str, arg: &[u8], width: Width) -> Result<Vec<u8>, DigestError> {
        self.request_while(what, arg, width, &mut || {})
    }
}

impl Side for PeerTable<'_, '_> {
    fn total(&mut self) -> Result<Digest, DigestError> {
        match self.total.take() {
            Some(total) => Ok(total),
            None => digest::wire::decode_digest(&self.request("total", &[], Width::Full)?),
        }
    }

    fn children(&mut self, nodes: &[Node], width: Width) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        self.children_while(nodes, width, &mut || {})
    }

    fn rows(&mut self, nodes: &[Node], width: Width) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        self.rows_while(nodes, width, &mut || {})
    }

    fn keys(&mut self, key_hashes: &[u128], width: Width) -> Result<Vec<(u128, Vec<u8>)>, DigestError> {
        let arg = digest::wire::encode_hashes(key_hashes, width);
        digest::wire::decode_keys(&self.request("keys", &arg, width)?)
    }

    fn sums(&mut self, nodes: &[Node]) -> Result<Digest, DigestError> {
        digest::wire::decode_digest(&self.request("sums", &digest::wire::encode_nodes(nodes), Width::Full)?)
    }

    fn children_while(
        &mut self,
        nodes: &[Node],
        width: Width,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        let answer = self.request_while("children", &digest::wire::encode_nodes(nodes), width, meanwhile)?;
        // A digest takes at most 27 bytes: refuse a longer answer before decoding it, so that a peer
        // cannot make this process reserve many times what it sent.
        if answer.len() > 32 + nodes.len() * FANOUT * 27 {
            return Err(DigestError::Wire(format!(
                "{} answered {} bytes to a children request for {} nodes",
                self.peer.who,
                answer.len(),
                nodes.len()
            )));
        }
        check_len(digest::wire::decode_children(&answer, width)?, nodes.len(), "children")
    }

    fn rows_while(
        &mut self,
        nodes: &[Node],
        width: Width,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        let answer = self.request_while("rows", &digest::wire::encode_nodes(nodes), width, meanwhile)?;
        check_len(digest::wire::decode_rows(&answer, width)?, nodes.len(), "rows")
    }
}

fn check_len<T>(got: Vec<T>, want: usize, what: &str) -> Result<Vec<T>, DigestError> {
    if got.len() != want {
        return Err(DigestError::Wire(format!("the peer answered {} {what} for {want} nodes", got.len())));
    }
    Ok(got)
}

/// Compares one table: this node's digest files in `local_dir` against the peer's scan.
pub fn compare_table(
    local_dir: &Path,
    peer: &Peer<'_>,
    peer_scan: &str,
    t: &Compared,
    limits: &Limits,
    stop: &dyn Fn() -> Option<String>,
) -> Result<(Comparison, u64), String> {
    let files = crate::api::overlap::table_files(local_dir, &t.schema, &t.name);
    let mut remote = PeerTable { peer, scan: peer_scan, schema: &t.schema, table: &t.name, total: None };
    peer.take_bytes();
    // Both sides open (and check) their digest files at once: the peer on its first request, this
    // node on a helper thread (pure Rust: no PostgreSQL call) meanwhile.
    let (opened, total) = helper_thread::run_beside(
        || TableDigests::open(&files),
        || remote.request("total", &[], Width::Full).and_then(|a| digest::wire::decode_digest(&a)),
    );
    let opened = opened.unwrap_or_else(|| TableDigests::open(&files));
    let mut local = opened.map_err(|e| format!("this node's digests of {}.{}: {e}", t.schema, t.name))?;
    remote.total = Some(total.map_err(|e| format!("comparing {}.{}: {e}", t.schema, t.name))?);
    let mut check = || match stop() {
        Some(why) => Err(DigestError::Stopped(why)),
        None => Ok(()),
    };
    let c = digest::compare(&mut local, &mut remote, limits, &mut check)
        .map_err(|e| format!("comparing {}.{}: {e}", t.schema, t.name))?;
    Ok((c, peer.take_bytes()))
}

/// The recorded form of a comparison.
pub fn table_result(t: &Compared, c: &Comparison, bytes: u64, limits: &Limits) -> TableResult {
    TableResult {
        schema: t.schema.clone(),
        table: t.name.clone(),
        local_rows: Some(c.local_rows as i64),
        peer_rows: Some(c.peer_rows as i64),
        matched: Some(c.matched as i64),
        conflict: Some(c.conflict as i64),
        local_only: Some(c.local_only as i64),
        peer_only: Some(c.peer_only as i64),
        bytes_exchanged: bytes as i64,
        status: "compared",
        detail: {
            let mut notes = Vec::new();
            if c.keys_truncated {
                notes.push(format!("only the first {} keys of each category are listed", limits.max_keys));
            }
            if c.width == Width::Full && limits.width != Width::Full {
                notes.push(
                    "64-bit fingerprints collided: compared again on whole 128-bit digests".to_string(),
                );
            }
            (!notes.is_empty()).then(|| notes.join("; "))
        },
    }
}

/// The recorded form of a skipped table.
pub fn skipped_result(schema: &str, table: &str, reason: &str) -> TableResult {
    TableResult {
        schema: schema.to_string(),
        table: table.to_string(),
        status: "skipped",
        detail: Some(reason.to_string()),
        ..Default::default()
    }
}

/// How long dropping the peer's scan may take at the end.
const DROP_TIMEOUT: Duration = Duration::from_secs(10);

/// Drops a scan of the peer over a connection of its own (the comparison's may be in the middle of a
/// statement a cancel interrupted), heeding only a terminate; a failure is logged (the peer may be
/// gone: its scan directories are swept after a week).
fn drop_peer_scan(peer: &Peer<'_>, id: &str) {
    let mut interrupt =
        || if pg::dying() { Err(PeerError::Interrupted("terminated".into())) } else { Ok(()) };
    let deadline = Instant::now() + DROP_TIMEOUT;
    let sql = format!("SELECT steep_repl.drop_overlap_scan({})", quote_literal(id));
    let dropped = Conn::connect(&peer.conninfo, deadline, &mut interrupt)
        .and_then(|conn| conn.query(&sql, deadline, &mut interrupt));
    if let Err(e) = dropped {
        log!("steep_repl: could not drop the overlap scan {id} of {}: {e}", peer.who);
    }
}

/// What the leader started and must drop.
#[derive(Default)]
struct Started {
    local: Option<String>,
    peer: Option<String>,
}

fn run_leader(shared: &'static Shared, slot: usize) -> Result<(), JobError> {
    let job = &shared.jobs[slot];
    let id = job.id.get();
    let conninfo = job.path.get();
    let (who, patterns, limits, plan) = BackgroundWorker::transaction(|| -> Result<_, String> {
        let op = bookkeeping::operation(&id).ok_or("the operation's row has disappeared")?;
        let patterns: Vec<String> = op.options["tables"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if op.op == "merge" {
            let strategy = op.options["strategy"].as_str().unwrap_or_default();
            let strategy =
                strategy.parse().map_err(|e: steep_repl_engine::merge::StrategyError| e.to_string())?;
            let plan = merge::Plan { strategy, dry_run: op.options["dry_run"].as_bool().unwrap_or(true) };
            // A merge needs every differing key.
            return Ok((op.path, patterns, Limits { max_keys: usize::MAX, ..Limits::default() }, Some(plan)));
        }
        let max_keys = op.options["max_keys"].as_u64().map_or(Limits::default().max_keys, |n| n as usize);
        Ok((op.path, patterns, Limits { max_keys, ..Limits::default() }, None))
    })?;
    let stop = || -> Option<String> {
        if pg::dying() {
            return Some("the leader was terminated".into());
        }
        job.should_stop().then(|| {
            if job.cancelled.load(Ordering::Acquire) != 0 { "cancelled".into() } else { "stopping".into() }
        })
    };
    // In a transaction: the check of the peer reads this server's encoding.
    let peer = BackgroundWorker::transaction(AssertUnwindSafe(|| connect(&who, &conninfo, &stop)))?;
    let mut started = Started::default();
    let outcome = xact::try_catch(AssertUnwindSafe(|| {
        compare_all(job, &id, &peer, &patterns, &limits, plan.as_ref(), &stop, &mut started)
    }));
    let outcome = match outcome {
        Ok(r) => r,
        Err(c) => {
            xact::abort_after_error();
            if !pg::dying() && c.sqlstate == "57014" {
                // A query cancel of the leader (pg_cancel_backend): the job is cancelled.
                job.cancelled.store(1, Ordering::Release);
                job.fail("cancelled (the leader received a query cancel)");
            }
            Err(JobError::caught(None, &c))
        }
    };
    // Both scans end here, whatever happened: a running one is cancelled, a complete one removed.
    pg::take_cancel_request();
    if let Some(p) = &started.peer {
        drop_peer_scan(&peer, p);
    }
    if let Some(l) = &started.local {
        let l = l.clone();
        let dropped = xact::try_catch(|| {
            BackgroundWorker::transaction(|| {
                Spi::get_one_with_args::<bool>(
                    "SELECT steep_repl.drop_overlap_scan($1)",
                    &[l.as_str().into()],
                )
            })
        });
        if let Err(c) = dropped {
            xact::abort_after_error();
            log!("steep_repl: {id} could not drop its overlap scan {l}: {}", c.full());
        }
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
fn compare_all(
    job: &JobSlot,
    id: &str,
    peer: &Peer<'_>,
    patterns: &[String],
    limits: &Limits,
    plan: Option<&merge::Plan>,
    stop: &dyn Fn() -> Option<String>,
    started: &mut Started,
) -> Result<(), JobError> {
    let parallel = job.parallel_requested.load(Ordering::Relaxed) as i32;
    job.set_phase(Phase::Plan);
    let mut pairing = BackgroundWorker::transaction(AssertUnwindSafe(|| pair_tables(peer, patterns)))?;
    // A merge goes parents first along foreign keys.
    let mut cyclic = Vec::new();
    if plan.is_some() {
        let (ordered, on_cycle) = merge::merge_order(std::mem::take(&mut pairing.compared))?;
        pairing.compared = ordered;
        cyclic = on_cycle;
    }
    BackgroundWorker::transaction(|| {
        for s in &pairing.skipped {
            book::record(id, &skipped_result(&s.schema, &s.name, &s.reason), None);
        }
    });
    job.tables_total.store(pairing.compared.len() as u32, Ordering::Relaxed);
    if pairing.compared.is_empty() {
        return Ok(());
    }
    // Both scans: the peer's first (it starts working while this node starts its own).
    job.work_total.store(WORK_TOTAL, Ordering::Relaxed);
    job.set_phase(Phase::Scan);
    BackgroundWorker::transaction(|| progress::notify(job));
    let peer_scan = start_peer_scan(peer, &pairing.compared, parallel)?;
    started.peer = Some(peer_scan.clone());
    let spec = scan_spec(&pairing.compared);
    let local_scan = BackgroundWorker::transaction(|| {
        Spi::get_one_with_args::<String>(
            "SELECT steep_repl.start_overlap_scan($1::pg_catalog.jsonb, $2)",
            &[pgrx::JsonB(spec).into(), parallel.into()],
        )
    })
    .map_err(|e| format!("starting this node's overlap scan: {e}"))?
    .ok_or("starting this node's overlap scan returned no id")?;
    started.local = Some(local_scan.clone());
    let stopped = || -> Result<(), String> {
        pgrx::check_for_interrupts!();
        match stop() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    };
    let mut local_done = false;
    loop {
        stopped()?;
        let local = BackgroundWorker::transaction(|| local_scan_state(&local_scan))?;
        let theirs = peer_scan_state(peer, &peer_scan)?;
        job.rows.store(local.rows + theirs.rows, Ordering::Relaxed);
        let read = |s: &ScanState| if s.status == "complete" { 100.0 } else { s.percent };
        job.work_done.store(((read(&local) + read(&theirs)) * SCAN_WORK / 200.0) as u64, Ordering::Relaxed);
        if local.ended() && !local_done {
            scan_outcome("this node's", &local_scan, &local)?;
            local_done = true;
        }
        if theirs.ended() {
            scan_outcome(&format!("{}'s", peer.who), &peer_scan, &theirs)?;
            if local_done {
                break;
            }
        }
        progress::publish_if_due(job, false);
        job::nap(POLL);
    }
    let local_dir = BackgroundWorker::transaction(|| bookkeeping::operation(&local_scan))
        .map(|op| PathBuf::from(op.path))
        .ok_or("this node's overlap scan has disappeared")?;
    if !crate::api::overlap::is_scan_dir(&local_dir) {
        return Err(JobError::plain(format!(
            "overlap scan {local_scan} has a directory outside the scan base"
        )));
    }

    job.set_phase(Phase::Compare);
    BackgroundWorker::transaction(|| progress::notify(job));
    let mut compared_rows = 0u64;
    for t in &pairing.compared {
        stopped()?;
        let (c, bytes) = compare_table(&local_dir, peer, &peer_scan, t, limits, stop)?;
        compared_rows += c.local_rows + c.peer_rows;
        let keys: Vec<(&'static str, Vec<u8>)> = match plan {
            // A merge lists its keys in merge_plan and merge_audit, not here.
            Some(_) => Vec::new(),
            None => c.keys.iter().map(|(cat, k)| (cat.as_str(), k.clone())).collect(),
        };
        let mut result = table_result(t, &c, bytes, limits);
        if plan.is_some() {
            result.detail = None;
            if cyclic.contains(&format!("{}.{}", t.schema, t.name)) {
                result.detail = Some("on a foreign-key cycle: merged after the other tables".into());
            }
        }
        if let Some(plan) = plan {
            stopped()?;
            job.set_phase(Phase::Merge);
            merge::merge_table(id, peer, t, &c, plan)?;
        }
        BackgroundWorker::transaction(AssertUnwindSafe(|| {
            session::with_settings(&[("TimeZone", "UTC")], || {
                book::record(id, &result, Some(Keys { columns: &t.key, types: &t.key_types, keys: &keys }))
            });
            let done = job.tables_done.fetch_add(1, Ordering::Relaxed) + 1;
            let compared = (WORK_TOTAL as f64 - SCAN_WORK) * f64::from(done) / pairing.compared.len() as f64;
            job.work_done.store(SCAN_WORK as u64 + compared as u64, Ordering::Relaxed);
            job.raw_bytes.fetch_add(bytes, Ordering::Relaxed);
            bookkeeping::persist(id, None, &Figures::of(job));
        }));
        progress::publish_if_due(job, false);
    }
    job.rows.store(compared_rows, Ordering::Relaxed);
    Ok(())
}

/// Writes `rows` (COPY text) over the peer's rows with the same keys, as one `merge_write` there
/// (`resolve_merge_conflict` choosing this node's row), from a backend.
pub fn write_to_peer(
    who: &str,
    conninfo: &str,
    merge_id: &str,
    schema: &str,
    table: &str,
    key: &[String],
    rows: &[u8],
) -> Result<i64, String> {
    let stop = || -> Option<String> {
        pgrx::check_for_interrupts!();
        None
    };
    let peer = connect(who, conninfo, &stop).map_err(|e| e.full)?;
    let keys: Vec<String> = key.iter().map(|k| quote_literal(k)).collect();
    let sql = format!(
        "SELECT steep_repl.merge_write({}, {}, {}, ARRAY[{}]::pg_catalog.text[], 'update', 'conflict', 'resolve', \
         pg_catalog.decode('{}', 'base64'))",
        quote_literal(merge_id),
        quote_literal(schema),
        quote_literal(table),
        keys.join(", "),
        digest::wire::to_text(rows)
    );
    Ok(peer.value(&sql)?.and_then(|n| n.parse().ok()).unwrap_or(0))
}

/// Runs each statement on the peer from a backend and returns their rows (text).
pub fn peer_rows(
    who: &str,
    conninfo: &str,
    statements: &[&str],
) -> Result<Vec<Vec<Vec<Option<String>>>>, String> {
    let stop = || -> Option<String> {
        pgrx::check_for_interrupts!();
        None
    };
    let peer = connect(who, conninfo, &stop).map_err(|e| e.full)?;
    statements.iter().map(|sql| peer.query(sql).map(|r| r.rows)).collect()
}

/// Blocks per digest file of `analyze_overlap`'s own side (64 MB of heap: about as much COPY text as an
/// overlap scan's chunk).
const ANALYZE_RANGE_BLOCKS: u32 = 8192;

/// Reports nothing, stops on a query cancel: the scan of `analyze_overlap`'s own side.
struct Interruptible;

impl scan::ScanObserver for Interruptible {
    fn progress(&mut self, _rows: u64, _bytes: u64, _blocks: u64) {}

    fn should_stop(&mut self) -> Option<String> {
        pgrx::check_for_interrupts!();
        None
    }
}

/// Removes a directory when dropped (also while an ERROR unwinds).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _gone = std::fs::remove_dir_all(&self.0);
    }
}

/// `analyze_overlap`: the comparison in the caller's backend. This node's tables are scanned here under
/// the statement's snapshot; the peer's in its own overlap scan. Nothing is recorded.
pub fn analyze(who: &str, conninfo: &str, patterns: &[String]) -> Vec<TableResult> {
    let stop = || -> Option<String> {
        pgrx::check_for_interrupts!();
        None
    };
    let fail = |e: String| -> ! { error!("{e}") };
    let peer = connect(who, conninfo, &stop).unwrap_or_else(|e| fail(e.full));
    let pairing = pair_tables(&peer, patterns).unwrap_or_else(|e| fail(e));
    let mut results: Vec<TableResult> =
        pairing.skipped.iter().map(|s| skipped_result(&s.schema, &s.name, &s.reason)).collect();
    if !pairing.compared.is_empty() {
        let peer_scan = start_peer_scan(&peer, &pairing.compared, 4).unwrap_or_else(|e| fail(e));
        let compared =
            xact::try_catch(AssertUnwindSafe(|| analyze_compared(&peer, &peer_scan, &pairing.compared)));
        // The peer's scan is dropped whatever happened here (a cancel included), then the error raised.
        drop_peer_scan(&peer, &peer_scan);
        match compared {
            Ok(Ok(mut r)) => results.append(&mut r),
            Ok(Err(e)) => fail(e),
            Err(c) if c.sqlstate == "57014" => {
                crate::api::user_error(PgSqlErrorCode::ERRCODE_QUERY_CANCELED, c.message.clone(), None)
            }
            Err(c) => fail(c.full()),
        }
    }
    results.sort_by(|a, b| (&a.schema, &a.table).cmp(&(&b.schema, &b.table)));
    results
}

fn analyze_compared(
    peer: &Peer<'_>,
    peer_scan: &str,
    compared: &[Compared],
) -> Result<Vec<TableResult>, String> {
    let base = scan_base();
    std::fs::create_dir_all(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
    let dir = base.join(format!("analyze-{}-{}", pg::my_pid(), pg::now_ms()));
    let _remove = RemoveOnDrop(dir.clone());
    let mut pinned: Vec<(&str, &str)> = steep_repl_engine::copy_text::PINNED_SETTINGS.to_vec();
    pinned.push(("TimeZone", "UTC"));
    session::with_settings(&pinned, || -> Result<(), String> {
        for t in compared {
            let qualified = steep_repl_engine::ident::QualifiedName::new(t.schema.clone(), t.name.clone());
            let relid = Spi::get_one_with_args::<pg_sys::Oid>(
                "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid",
                &[qualified.to_string().into()],
            )
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{qualified} has disappeared"))?;
            // In ranges of blocks, one digest file each, as an overlap scan's chunks: a digest file is
            // sorted in memory.
            let blocks = Spi::get_one_with_args::<i64>(
                "SELECT pg_catalog.pg_relation_size($1) / pg_catalog.current_setting('block_size')::int8",
                &[relid.into()],
            )
            .map_err(|e| e.to_string())?
            .unwrap_or(0)
            .clamp(0, i64::from(u32::MAX)) as u32;
            let mut start = 0u32;
            let mut index = 0u32;
            loop {
                let end = start.saturating_add(ANALYZE_RANGE_BLOCKS);
                // The last range is open-ended, as a snapshot's last chunk is.
                let last = end >= blocks;
                let key = t.key_fields().map_err(|e| e.to_string())?;
                crate::api::overlap::scan_digest(&dir, &t.schema, &t.name, index, key, |w| {
                    scan::copy_block_range(relid, start, (!last).then_some(end), w, &mut Interruptible);
                });
                if last {
                    break;
                }
                start = end;
                index += 1;
            }
        }
        Ok(())
    })?;
    wait_peer_scan(peer, peer_scan, |_| {
        pgrx::check_for_interrupts!();
        Ok(())
    })?;
    let stop = || -> Option<String> {
        pgrx::check_for_interrupts!();
        None
    };
    let mut out = Vec::with_capacity(compared.len());
    for t in compared {
        // Nothing is listed: no key text is fetched.
        let limits = Limits { max_keys: 0, ..Limits::default() };
        let (c, bytes) = compare_table(&dir, peer, peer_scan, t, &limits, &stop)?;
        out.push(TableResult { detail: None, ..table_result(t, &c, bytes, &limits) });
    }
    Ok(out)
}

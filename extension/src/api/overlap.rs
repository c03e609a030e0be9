//! Overlap analysis (PRODUCT.md §10, first part): `start_overlap`, `overlap_result`, `overlap_rows`,
//! `analyze_overlap`, and the scan side every node serves to the other: `start_overlap_scan`,
//! `overlap_scan_request`, `drop_overlap_scan`.
//!
//! How a comparison runs (`crate::worker::overlap` coordinates it):
//!
//! 1. Each node scans the compared tables in an **overlap scan**: a generate job in digest mode, with its
//!    own background workers, ctid chunks and one exported snapshot, whose chunks become digest files
//!    (`steep_repl_engine::digest`: per row, 128-bit hashes of the key's and of the row's COPY text,
//!    sorted by key hash) under `<data directory>/pg_steep_repl/overlap/`. No row leaves the node.
//! 2. The coordinator compares the two nodes' digests top-down over the key-hash tree, asking the peer
//!    with `overlap_scan_request` for the digests of the nodes that differ, then for the row digests of
//!    small differing nodes, then for the key text of the keys that differ: only those cross the network.
//! 3. Results go to `steep_repl.overlap_results` and `steep_repl.overlap_keys`, and both scans are
//!    dropped.
//!
//! Rights: the peer is reached with the server's own credentials and key values are row data, so every
//! function here is for superusers (checked, and EXECUTE revoked from PUBLIC).

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use steep_repl_engine::chunk::ChunkStats;
use steep_repl_engine::digest::{self, DigestWriter, KeyFields, KeyText, TableDigests, Width};
use steep_repl_engine::naming::table_dir;

use crate::api::snapshot::{GenerateRequest, launch_generate};
use crate::api::{check_parallel, require_startable, user_error};
use crate::bookkeeping::{self, NewOperation};
use crate::job::{self, Entry, StartGuard};
use crate::pg::{self, rights, xact};
use crate::shmem::{self, JobKind, Phase};

/// Where overlap scans keep their digest files, under the data directory.
pub const SCAN_BASE: &str = "pg_steep_repl/overlap";

/// Scan directories older than this are removed by the next `start_overlap_scan` (a coordinator that
/// died before dropping its scans).
const STALE_SCAN_SECS: u64 = 7 * 24 * 3600;

fn require_superuser(what: &str) {
    if !rights::is_superuser() {
        user_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("only superusers may {what}"),
            Some(
                "Overlap analysis reads every row of the compared tables on both nodes and connects to the peer with the server's own credentials.",
            ),
        );
    }
}

/// The directory overlap scans write under.
pub fn scan_base() -> PathBuf {
    pg::data_directory().join(SCAN_BASE)
}

/// Whether `dir` is a scan directory `start_overlap_scan` creates: `scan-...` right under
/// [`scan_base`] (checked before anything is read from it or removed).
pub fn is_scan_dir(dir: &Path) -> bool {
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("scan-") && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    named && dir.parent() == Some(scan_base().as_path())
}

/// Where chunk `index` of `schema.name` goes in a scan directory.
fn digest_rel_path(schema: &str, name: &str, index: u32) -> String {
    format!("data/{}/{index:06}.digest", table_dir(schema, name))
}

/// The digest files of `schema.name` in scan directory `dir`, in name order.
pub fn table_files(dir: &Path, schema: &str, name: &str) -> Vec<PathBuf> {
    let table = dir.join("data").join(table_dir(schema, name));
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&table) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "digest"))
            .collect(),
        // A table whose chunks held nothing still has files; no directory means no chunk was planned.
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// The key columns of the tables an overlap scan reads: from the job's options, as positions in each
/// table's COPY column list (read under the worker's snapshot, once per table).
pub struct DigestKeys {
    id: String,
    /// Per table (schema, name): its key columns, and how each enters the key text.
    spec: Option<HashMap<(String, String), SpecKey>>,
    positions: HashMap<u32, (Vec<usize>, Vec<KeyText>)>,
}

/// A table's key columns in a scan's specification, and how each enters the key text.
type SpecKey = (Vec<String>, Vec<KeyText>);

impl DigestKeys {
    /// For the scan job `id`; nothing is read until the first table.
    pub fn of_job(id: &str) -> DigestKeys {
        DigestKeys { id: id.to_string(), spec: None, positions: HashMap::new() }
    }

    /// The key fields of table `relid` (`schema.name`); an ERROR when the job did not ask for it or a
    /// key column is not in its COPY column list. Runs in a transaction.
    pub fn fields_of(&mut self, relid: pg_sys::Oid, schema: &str, name: &str) -> KeyFields {
        if self.spec.is_none() {
            let raw = Spi::get_one_with_args::<pgrx::JsonB>(
                "SELECT options->'digest' FROM steep_repl.snapshots WHERE id = $1",
                &[self.id.as_str().into()],
            )
            .unwrap_or_else(|e| error!("reading the tables of overlap scan {}: {e}", self.id))
            .map(|j| j.0);
            let spec = parse_spec(raw.as_ref()).unwrap_or_else(|e| error!("overlap scan {}: {e}", self.id));
            self.spec = Some(spec.into_iter().map(|t| ((t.schema, t.table), (t.key, t.key_texts))).collect());
        }
        let (positions, texts) = match self.positions.get(&relid.to_u32()) {
            Some(p) => p.clone(),
            None => {
                let spec = self.spec.as_ref().map(|s| s.get(&(schema.to_string(), name.to_string())));
                let Some(Some((key, texts))) = spec else {
                    error!("overlap scan {} did not ask for {schema}.{name}", self.id)
                };
                let columns = crate::pg::catalog::copy_columns(relid)
                    .unwrap_or_else(|e| error!("reading the columns of {schema}.{name}: {e}"));
                let mut p = Vec::with_capacity(key.len());
                for k in key {
                    match columns.iter().position(|c| c == k) {
                        Some(i) => p.push(i),
                        None => error!(
                            "{schema}.{name} has no column {k} in its COPY column list (dropped, renamed or generated since the overlap began)"
                        ),
                    }
                }
                self.positions.insert(relid.to_u32(), (p.clone(), texts.clone()));
                (p, texts.clone())
            }
        };
        KeyFields::with_texts(positions, texts).unwrap_or_else(|e| error!("key of {schema}.{name}: {e}"))
    }
}

/// One table of an overlap scan's specification.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScanTable {
    pub schema: String,
    pub table: String,
    pub key: Vec<String>,
    /// How each key column enters the key text; both nodes are given the same.
    #[serde(default)]
    pub key_texts: Vec<KeyText>,
}

fn parse_spec(v: Option<&serde_json::Value>) -> Result<Vec<ScanTable>, String> {
    let v = v.ok_or("no table specification")?;
    let tables: Vec<ScanTable> = serde_json::from_value(v.clone())
        .map_err(|e| format!("the table specification is not valid: {e}"))?;
    if tables.is_empty() {
        return Err("the table specification names no table".into());
    }
    for t in &tables {
        if t.key.is_empty() {
            return Err(format!("no key columns given for {}.{}", t.schema, t.table));
        }
    }
    Ok(tables)
}

/// Scans one chunk into a digest file: `scan` writes the chunk's COPY text into the writer.
pub fn scan_digest(
    out_dir: &Path,
    schema: &str,
    name: &str,
    index: u32,
    key: KeyFields,
    scan: impl FnOnce(&mut dyn std::io::Write),
) -> ChunkStats {
    let rel = digest_rel_path(schema, name, index);
    let mut w = DigestWriter::create(out_dir, Path::new(&rel), key)
        .unwrap_or_else(|e| error!("digest {index} of {schema}.{name}: {e}"));
    scan(&mut w);
    let s = w.finish().unwrap_or_else(|e| error!("digest {index} of {schema}.{name}: {e}"));
    ChunkStats {
        file: rel,
        rows: s.rows,
        raw_bytes: s.raw_bytes,
        file_bytes: s.file_bytes,
        raw_crc32: 0,
        file_crc32: s.file_crc32,
        synced: true,
    }
}

/// Removes scan directories left by coordinators that died (older than a week).
fn sweep_stale_scans(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > STALE_SCAN_SECS);
        if old {
            let _gone = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Starts an overlap scan of this node (the scan side of `start_overlap`, which calls it on both nodes):
/// `spec` is a JSON array of `{"schema", "table", "key": [columns]}`. The rows of those tables are read
/// under one snapshot by `parallel` workers and hashed into digest files; nothing else is written.
/// Returns the scan's id (op `overlap_scan`), to pass to `overlap_scan_request` once it is complete
/// and to `drop_overlap_scan` at the end.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn start_overlap_scan(spec: pgrx::JsonB, parallel: default!(i32, 4)) -> String {
    shmem::require();
    job::reap_interrupted();
    require_superuser("start an overlap scan");
    require_startable("start an overlap scan");
    check_parallel(parallel);
    let tables = parse_spec(Some(&spec.0))
        .unwrap_or_else(|e| user_error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e, None));
    let patterns: Vec<String> = tables
        .iter()
        .map(|t| format!("\"{}\".\"{}\"", t.schema.replace('"', "\"\""), t.table.replace('"', "\"\"")))
        .collect();
    let base = scan_base();
    if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&base) {
        user_error(PgSqlErrorCode::ERRCODE_IO_ERROR, format!("creating {}: {e}", base.display()), None);
    }
    sweep_stale_scans(&base);
    let mut random = [0u8; 8];
    // SAFETY: fills a local buffer from the server's random source.
    let _weak_ok = unsafe { pg_sys::pg_strong_random(random.as_mut_ptr().cast(), random.len()) };
    let dir = base.join(format!("scan-{:016x}-{}", u64::from_le_bytes(random), pg::my_pid()));
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        user_error(PgSqlErrorCode::ERRCODE_IO_ERROR, format!("creating {}: {e}", dir.display()), None);
    }
    let spec_value = serde_json::to_value(&tables).unwrap_or_default();
    launch_generate(GenerateRequest {
        path: &dir.to_string_lossy(),
        created_dir: true,
        parallel,
        compression: steep_repl_engine::chunk::Compression::None,
        patterns: &patterns,
        snapshot: None,
        slot: None,
        digest: Some(spec_value),
    })
}

/// An overlap scan's directory, once it is complete; an ERROR naming what is wrong otherwise.
fn complete_scan_dir(id: &str) -> PathBuf {
    let Some(op) = bookkeeping::operation(id) else {
        user_error(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no overlap scan {id}"), None)
    };
    if op.op != "overlap_scan" {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("operation {id} is a {}, not an overlap scan", op.op),
            None,
        );
    }
    if op.status != "complete" {
        user_error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("overlap scan {id} is {}, not complete", op.status),
            None,
        );
    }
    let dir = PathBuf::from(&op.path);
    if !is_scan_dir(&dir) {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("overlap scan {id} has a directory outside {}", scan_base().display()),
            None,
        );
    }
    dir
}

/// The digests of one table of one scan, opened: (scan id, schema, table) and the digests.
type OpenTable = Option<((String, String, String), TableDigests)>;

thread_local! {
    /// The digests of the table last asked about: a comparison asks about one table many times.
    static OPEN: std::cell::RefCell<OpenTable> =
        const { std::cell::RefCell::new(None) };
}

/// Answers one request of a comparison about `schema_name.table_name` of the complete overlap scan `id`
/// (see `steep_repl_engine::digest::wire` for the encodings; `arg` is base64, the answer bytes):
/// `total` (the table's digest), `sums` (`arg`: nodes; the digest of all their rows), `children`
/// (`arg`: nodes; the digests of their children), `rows` (`arg`: nodes; their rows' digests) or `keys`
/// (`arg`: key hashes; the key text of the keys with those hashes). `narrow` answers `children`, `rows`
/// and `keys` at the narrow width (`digest::Width`).
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn overlap_scan_request(
    id: &str,
    schema_name: &str,
    table_name: &str,
    request: &str,
    arg: default!(&str, "''"),
    narrow: default!(bool, false),
) -> Vec<u8> {
    require_superuser("read an overlap scan");
    let dir = complete_scan_dir(id);
    let key = (id.to_string(), schema_name.to_string(), table_name.to_string());
    let bad = |e: digest::DigestError| -> ! {
        user_error(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!("overlap scan {id}, table {schema_name}.{table_name}: {e}"),
            None,
        )
    };
    OPEN.with(|cell| {
        let mut open = cell.borrow_mut();
        if open.as_ref().is_none_or(|(k, _)| *k != key) {
            *open = None;
            let files = table_files(&dir, schema_name, table_name);
            let digests = TableDigests::open(&files).unwrap_or_else(|e| bad(e));
            *open = Some((key.clone(), digests));
        }
        let Some((_, d)) = open.as_ref() else { unreachable!("opened above") };
        let width = if narrow { Width::Narrow } else { Width::Full };
        let arg = digest::wire::from_text(arg).unwrap_or_else(|e| bad(e));
        let nodes = || digest::wire::decode_nodes(&arg).unwrap_or_else(|e| bad(e));
        let answer = match request {
            "total" => digest::wire::encode_digest(&d.total()),
            "sums" => digest::wire::encode_digest(&d.sums(&nodes())),
            "children" => digest::wire::encode_children(&d.children(&nodes()), width),
            "rows" => digest::wire::encode_rows(&d.rows(&nodes()), width),
            "keys" => {
                let hashes = digest::wire::decode_hashes(&arg, width).unwrap_or_else(|e| bad(e));
                digest::wire::encode_keys(&d.keys(&hashes, width))
            }
            other => user_error(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("unknown overlap scan request {other:?} (total, sums, children, rows or keys)"),
                None,
            ),
        };
        // A file changed or cut under a query: say so rather than answer from part of it.
        if let Some(e) = d.fault() {
            bad(e)
        }
        answer
    })
}

/// Ends overlap scan `id`: cancels it while it runs (its failure removes its files), removes its
/// directory once it has ended. Returns whether anything was there.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn drop_overlap_scan(id: &str) -> bool {
    require_superuser("drop an overlap scan");
    OPEN.with(|cell| *cell.borrow_mut() = None);
    let Some(op) = bookkeeping::operation(id) else { return false };
    if op.op != "overlap_scan" {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("operation {id} is a {}, not an overlap scan", op.op),
            None,
        );
    }
    if matches!(op.status.as_str(), "pending" | "running") {
        return crate::api::snapshot::cancel_snapshot(id);
    }
    let dir = PathBuf::from(&op.path);
    if !is_scan_dir(&dir) || !dir.exists() {
        return false;
    }
    std::fs::remove_dir_all(&dir).is_ok()
}

/// Starts an overlap analysis of this node against `peer` (a registered node id or a conninfo; the
/// peer needs steep_repl too): each selected table (`tables`: patterns as for start_snapshot; NULL:
/// every table with a primary key or replica identity index) is compared by key, rows as COPY text
/// under one snapshot per node. Returns the operation's id (op `overlap`) at once; progress, wait,
/// cancel and history work as for a snapshot; results come from `overlap_result(id)` and
/// `overlap_rows(id)`.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn start_overlap(
    peer: &str,
    tables: default!(Option<Vec<String>>, "NULL"),
    parallel: default!(i32, 4),
) -> String {
    require_superuser("start an overlap analysis");
    let (who, conninfo, patterns) = checked_peer_and_tables(peer, tables);
    let options = serde_json::json!({ "max_keys": crate::gucs::OVERLAP_MAX_KEYS.get().max(0) });
    let kind = Coordinator { op: "overlap", prefix: "ovl", flags: 0, what: "start an overlap analysis" };
    launch_coordinator(kind, peer, &who, &conninfo, &patterns, parallel, options)
}

/// What kind of coordinator job [`launch_coordinator`] starts.
pub(crate) struct Coordinator {
    /// `steep_repl.snapshots.op`.
    pub op: &'static str,
    /// The id's prefix (three letters).
    pub prefix: &'static str,
    /// `JobSlot::flags` (0 for an overlap analysis, `FLAG_MERGE` for a merge).
    pub flags: u32,
    /// What errors say the caller was doing ("start a merge").
    pub what: &'static str,
}

/// Starts an overlap coordinator job against the peer `peer` (`who` and `conninfo` as
/// [`checked_peer_and_tables`] resolved it) once its caller has checked the rest: claims a job slot,
/// records the operation with `options` plus the peer as the caller named it and the table patterns,
/// and launches the leader. Returns the operation's id.
pub(crate) fn launch_coordinator(
    kind: Coordinator,
    peer: &str,
    who: &str,
    conninfo: &str,
    patterns: &[String],
    parallel: i32,
    mut options: serde_json::Value,
) -> String {
    let shared = shmem::require();
    job::reap_interrupted();
    require_startable(kind.what);
    check_parallel(parallel);
    let Some((slot, generation)) = shared.claim_job_slot() else { crate::api::no_job_slot() };
    let guard = StartGuard::new(slot, generation);
    let job = &shared.jobs[slot];
    let id = job::new_job_id_with_prefix(kind.prefix);
    let _fits = job.id.set(&id);
    job.kind.store(JobKind::Overlap as u32, Ordering::Relaxed);
    job.database_oid.store(pg::database_oid(), Ordering::Relaxed);
    job.role_oid.store(pg::current_user_oid(), Ordering::Relaxed);
    job.caller_xid.store(xact::top_xid(), Ordering::Relaxed);
    // The conninfo stays in shared memory: the operation's row, which every role reads, names the peer
    // only as the caller did.
    if job.path.set(conninfo).is_err() {
        user_error(PgSqlErrorCode::ERRCODE_NAME_TOO_LONG, "the peer's conninfo is too long".into(), None);
    }
    job.parallel_requested.store(parallel as u32, Ordering::Relaxed);
    job.flags.store(kind.flags, Ordering::Relaxed);
    job.set_phase(Phase::Queued);
    let shown_peer = if who.starts_with("node ") { peer.to_string() } else { "(conninfo)".to_string() };
    options["peer"] = shown_peer.into();
    options["tables"] = patterns.into();
    bookkeeping::insert_operation(&NewOperation {
        id: &id,
        op: kind.op,
        path: who,
        parallel,
        compression: "",
        options: &options.to_string(),
        role_name: &pg::current_user_name(),
        tables_total: 0,
        chunks_total: 0,
    });
    job::launch_leader(Entry::OverlapLeader, shared, slot, generation);
    guard.launched();
    id
}

/// The peer (`who` it is, its conninfo) and the table patterns of an overlap analysis, checked: an
/// ERROR naming a pattern that does not parse, an unknown node, or a conninfo holding a password.
pub(crate) fn checked_peer_and_tables(
    peer: &str,
    tables: Option<Vec<String>>,
) -> (String, String, Vec<String>) {
    let patterns = tables.unwrap_or_default();
    for p in &patterns {
        if let Err(e) = p.parse::<steep_repl_engine::filter::TablePattern>() {
            user_error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None);
        }
    }
    let (who, conninfo) = crate::api::schema::resolve_peer(peer);
    if let Err(e) = crate::peer::check_conninfo(&conninfo) {
        user_error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("{who}: {e}"), None);
    }
    (who, conninfo, patterns)
}

/// Checks that `id` is an overlap operation.
fn require_overlap(id: &str) {
    match bookkeeping::operation(id) {
        Some(op) if op.op == "overlap" || op.op == "merge" => {}
        Some(op) => user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("operation {id} is a {}, not an overlap analysis", op.op),
            None,
        ),
        None => {
            user_error(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no overlap analysis {id}"), None)
        }
    }
}

type ResultRow = (
    name!(schema_name, String),
    name!(table_name, String),
    name!(local_rows, Option<i64>),
    name!(peer_rows, Option<i64>),
    name!(matched, Option<i64>),
    name!(conflict, Option<i64>),
    name!(local_only, Option<i64>),
    name!(peer_only, Option<i64>),
    name!(bytes_exchanged, i64),
    name!(status, String),
    name!(detail, Option<String>),
);

/// The per-table results of overlap analysis `id`, in name order (tables compared so far while it runs);
/// `steep_repl.overlap_result(id)` shows them with the column `match`.
#[allow(clippy::type_complexity)]
#[pg_extern(stable, name = "_overlap_result")]
#[search_path(pg_catalog, pg_temp)]
fn overlap_result(
    id: &str,
) -> TableIterator<
    'static,
    (
        name!(schema_name, String),
        name!(table_name, String),
        name!(local_rows, Option<i64>),
        name!(peer_rows, Option<i64>),
        name!(matched, Option<i64>),
        name!(conflict, Option<i64>),
        name!(local_only, Option<i64>),
        name!(peer_only, Option<i64>),
        name!(bytes_exchanged, i64),
        name!(status, String),
        name!(detail, Option<String>),
    ),
> {
    require_superuser("read overlap results");
    require_overlap(id);
    let rows = Spi::connect(|c| -> Result<Vec<ResultRow>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT schema_name, table_name, local_rows, peer_rows, match, conflict, local_only, peer_only, \
             bytes_exchanged, status, detail FROM steep_repl.overlap_results WHERE overlap_id = $1 \
             ORDER BY schema_name, table_name",
            None,
            &[id.into()],
        )? {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<i64>(3)?,
                r.get::<i64>(4)?,
                r.get::<i64>(5)?,
                r.get::<i64>(6)?,
                r.get::<i64>(7)?,
                r.get::<i64>(8)?,
                r.get::<i64>(9)?.unwrap_or(0),
                r.get::<String>(10)?.unwrap_or_default(),
                r.get::<String>(11)?,
            ));
        }
        Ok(v)
    })
    .unwrap_or_else(|e| error!("reading the results of {id}: {e}"));
    TableIterator::new(rows)
}

/// The keys of overlap analysis `id` that differ: of one table (`table_name`: its name, or `schema.table`
/// with both parts unquoted) and
/// category (`conflict`, `local_only`, `peer_only`) when given, at most `lim`.
#[pg_extern(stable)]
#[search_path(pg_catalog, pg_temp)]
fn overlap_rows(
    id: &str,
    table_name: default!(Option<&str>, "NULL"),
    category: default!(Option<&str>, "NULL"),
    lim: default!(i32, 1000),
) -> TableIterator<
    'static,
    (name!(schema_name, String), name!(table_name, String), name!(category, String), name!(key, pgrx::JsonB)),
> {
    require_superuser("read overlap results");
    require_overlap(id);
    if let Some(c) = category
        && !matches!(c, "conflict" | "local_only" | "peer_only" | "match")
    {
        user_error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("category {c:?} is not one of conflict, local_only, peer_only"),
            None,
        );
    }
    let rows = Spi::connect(|c| -> Result<Vec<_>, pgrx::spi::Error> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT schema_name, table_name, category, key FROM steep_repl.overlap_keys \
             WHERE overlap_id = $1 \
             AND ($2::text IS NULL OR table_name = $2 OR schema_name || '.' || table_name = $2) \
             AND ($3::text IS NULL OR category = $3) \
             ORDER BY schema_name, table_name, category LIMIT greatest($4, 0)",
            None,
            &[id.into(), table_name.into(), category.into(), lim.into()],
        )? {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<String>(3)?.unwrap_or_default(),
                r.get::<pgrx::JsonB>(4)?.unwrap_or(pgrx::JsonB(serde_json::Value::Null)),
            ));
        }
        Ok(v)
    })
    .unwrap_or_else(|e| error!("reading the keys of {id}: {e}"));
    TableIterator::new(rows)
}

/// Compares this node with `peer` as `start_overlap` does, and returns the same rows as
/// `overlap_result`, at once: this node's tables are hashed in this session under the statement's
/// snapshot (one process: `start_overlap` uses parallel workers), the peer's in its own workers.
/// Nothing is recorded; use `start_overlap` and `overlap_rows` to list the keys that differ.
/// `steep_repl.analyze_overlap(peer, tables)` shows the rows with the column `match`.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, name = "_analyze_overlap")]
#[search_path(pg_catalog, pg_temp)]
fn analyze_overlap(
    peer: &str,
    tables: default!(Option<Vec<String>>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(schema_name, String),
        name!(table_name, String),
        name!(local_rows, Option<i64>),
        name!(peer_rows, Option<i64>),
        name!(matched, Option<i64>),
        name!(conflict, Option<i64>),
        name!(local_only, Option<i64>),
        name!(peer_only, Option<i64>),
        name!(bytes_exchanged, i64),
        name!(status, String),
        name!(detail, Option<String>),
    ),
> {
    shmem::require();
    require_superuser("analyze an overlap");
    let (who, conninfo, patterns) = checked_peer_and_tables(peer, tables);
    let rows = crate::worker::overlap::analyze(&who, &conninfo, &patterns)
        .into_iter()
        .map(|r| {
            (
                r.schema,
                r.table,
                r.local_rows,
                r.peer_rows,
                r.matched,
                r.conflict,
                r.local_only,
                r.peer_only,
                r.bytes_exchanged,
                r.status.to_string(),
                r.detail,
            )
        })
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

extension_sql!(
    r#"
-- The per-table results of an overlap analysis (PRODUCT.md §10), with the column named `match`.
CREATE FUNCTION steep_repl.overlap_result(id text)
RETURNS TABLE (schema_name text, table_name text, local_rows bigint, peer_rows bigint, "match" bigint,
               conflict bigint, local_only bigint, peer_only bigint, bytes_exchanged bigint, status text,
               detail text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM steep_repl._overlap_result(id) $$;

-- start_overlap and overlap_result in one call, synchronously (this node's side in this session).
CREATE FUNCTION steep_repl.analyze_overlap(peer text, tables text[] DEFAULT NULL)
RETURNS TABLE (schema_name text, table_name text, local_rows bigint, peer_rows bigint, "match" bigint,
               conflict bigint, local_only bigint, peer_only bigint, bytes_exchanged bigint, status text,
               detail text)
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM steep_repl._analyze_overlap(peer, tables) $$;

-- Overlap analysis reads every row on both nodes and reaches the peer with the server's credentials.
REVOKE EXECUTE ON FUNCTION steep_repl.start_overlap(text, text[], integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.start_overlap_scan(jsonb, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.overlap_scan_request(text, text, text, text, text, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.drop_overlap_scan(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl._overlap_result(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.overlap_result(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.overlap_rows(text, text, text, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl._analyze_overlap(text, text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION steep_repl.analyze_overlap(text, text[]) FROM PUBLIC;
"#,
    name = "overlap_rights",
    requires = [
        "overlap",
        start_overlap,
        start_overlap_scan,
        overlap_scan_request,
        drop_overlap_scan,
        overlap_result,
        overlap_rows,
        analyze_overlap
    ]
);

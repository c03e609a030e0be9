//! Connections from this server to another PostgreSQL server: the one place every server-to-server
//! connection of steep_repl goes through (node probes, heartbeats, and later schema compare, overlap
//! analysis and merge).
//!
//! It uses libpq, PostgreSQL's own client library (as dblink, postgres_fdw and logical replication's
//! walreceiver do), so a conninfo means exactly what it means to psql: URIs, `service=`, `passfile=`,
//! every `sslmode`, the server's `~/.pgpass`. What it adds:
//!
//! - **No stored or printed password.** [`check_conninfo`] parses a conninfo with libpq and refuses one
//!   that carries a password; passwords come from the password file of the server's OS user or from
//!   `passfile=`. libpq's error messages never contain the password.
//! - **Every wait is bounded and interruptible.** The connection is non-blocking; each wait for the
//!   socket is a `poll` of at most [`SLICE`], and between two slices the caller's `interrupt` check runs
//!   (a backend checks for query cancel, a worker for shutdown). A peer that accepts TCP but never
//!   answers costs its deadline, never more.
//! - **Many peers at once.** [`run_all`] drives several connections together, so one hanging peer
//!   delays no other.
//! - **A pinned session on the peer.** Before the caller's first statement, the session's
//!   `search_path` is set to `pg_catalog, pg_temp`, `standard_conforming_strings` on, JIT off (our
//!   catalog queries are many small lookups) and `statement_timeout` to the deadline, so a name in our
//!   statements never resolves through a schema the peer's role controls and a statement we gave up on
//!   does not run on forever.
//!
//! Results are text (libpq's text format), or bytes for a statement sent with [`Conn::start_binary`]
//! (libpq's binary format: a `bytea` arrives as its bytes, not as hex), at most [`MAX_RESULT_BYTES`]
//! per statement: a peer is treated as hostile input like any file.

use std::ffi::{CStr, CString, c_char};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use pq_sys as pq;

/// The longest a single wait for a peer's socket lasts before the caller's interrupt check runs.
pub const SLICE: Duration = Duration::from_millis(100);

/// The most result bytes accepted from one statement of a peer.
pub const MAX_RESULT_BYTES: usize = 256 << 20;

/// What went wrong talking to a peer. The message never holds a password.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The conninfo cannot be used (unparseable, or holds a password).
    #[error("{0}")]
    Conninfo(String),
    /// The connection could not be made (refused, authentication, TLS, unknown host...).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The deadline passed while connecting or waiting for an answer.
    #[error("no answer within {0:.1} s")]
    Timeout(f64),
    /// The peer answered a statement with an error.
    #[error("{0}")]
    Statement(String),
    /// The connection broke, or the peer sent something we cannot accept.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The caller's interrupt check asked to stop (shutdown).
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl PeerError {
    /// Whether the peer could not be reached at all (as opposed to answering with an error).
    pub fn unreachable(&self) -> bool {
        matches!(self, PeerError::Connect(_) | PeerError::Timeout(_) | PeerError::Lost(_))
    }
}

/// Parses `conninfo` (key=value pairs or a URI) with libpq and refuses one that holds a password.
pub fn check_conninfo(conninfo: &str) -> Result<(), PeerError> {
    let c = CString::new(conninfo).map_err(|_| PeerError::Conninfo("conninfo contains a NUL byte".into()))?;
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: PQconninfoParse reads a NUL-terminated string and returns an array terminated by an entry
    // with a NULL keyword (or NULL with *err set); both are freed below with libpq's own functions.
    let opts = unsafe { pq::PQconninfoParse(c.as_ptr(), &mut err) };
    if opts.is_null() {
        let msg = take_libpq_string(err).unwrap_or_else(|| "out of memory".into());
        return Err(PeerError::Conninfo(format!("invalid conninfo: {}", msg.trim_end())));
    }
    let mut has_password = false;
    let mut i = 0;
    loop {
        // SAFETY: `opts` is the array returned above, read up to its terminating entry.
        let o = unsafe { &*opts.add(i) };
        if o.keyword.is_null() {
            break;
        }
        // SAFETY: keyword and val are NUL-terminated strings owned by the array (val may be NULL).
        let key = unsafe { CStr::from_ptr(o.keyword) };
        let secret = matches!(key.to_bytes(), b"password" | b"sslpassword");
        if secret && !o.val.is_null() && unsafe { *o.val } != 0 {
            has_password = true;
        }
        i += 1;
    }
    // SAFETY: frees the array PQconninfoParse returned, once.
    unsafe { pq::PQconninfoFree(opts) };
    if has_password {
        return Err(PeerError::Conninfo(
            "a conninfo holding a password is refused: it would be stored and shown; put the password in \
             the password file of the server's operating-system user (~/.pgpass) or name one with passfile="
                .into(),
        ));
    }
    Ok(())
}

/// Frees a string libpq allocated and returns it.
fn take_libpq_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string malloc'ed by libpq, freed once with PQfreemem.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    unsafe { pq::PQfreemem(p.cast()) };
    Some(s)
}

/// The rows of a statement's result, as text (`None` for NULL).
#[derive(Debug, Clone, Default)]
pub struct Rows {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// One vector of values per row, in column order.
    pub rows: Vec<Vec<Option<String>>>,
    /// For a statement sent with [`Conn::start_binary`], its values as sent (binary format), in place
    /// of `rows` (which stays empty).
    pub raw: Vec<Vec<Option<Vec<u8>>>>,
    /// Unix time in ms when the statement was sent.
    pub sent_unix_ms: f64,
    /// From sending the statement to reading its last result: one round trip plus the peer's work.
    pub elapsed: Duration,
}

impl Rows {
    /// The value of column `name` in row `row`, if that column exists and is not NULL.
    pub fn get(&self, row: usize, name: &str) -> Option<&str> {
        let col = self.columns.iter().position(|c| c == name)?;
        self.rows.get(row)?.get(col)?.as_deref()
    }
}

/// An open connection to a peer. Dropping it closes the connection.
pub struct Conn {
    raw: NonNull<pq::PGconn>,
    /// The `statement_timeout` (ms) the last [`Conn::start_binary`] left in the peer's session, with
    /// `search_path` pinned; `None` when unknown (a text statement or a failure since).
    binary_timeout_ms: std::cell::Cell<Option<u64>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: the connection is ours and freed once; PQfinish does not block on a non-blocking
        // connection.
        unsafe { pq::PQfinish(self.raw.as_ptr()) };
    }
}

impl Conn {
    fn error_message(&self) -> String {
        // SAFETY: PQerrorMessage returns a string owned by the connection, valid until the next call.
        let m = unsafe { CStr::from_ptr(pq::PQerrorMessage(self.raw.as_ptr())) };
        let s = m.to_string_lossy();
        let s = s.trim_end();
        if s.is_empty() { "unknown error".to_string() } else { s.to_string() }
    }

    fn socket(&self) -> i32 {
        // SAFETY: reads the socket of a live connection.
        unsafe { pq::PQsocket(self.raw.as_ptr()) }
    }

    /// Opens a connection, waiting at most until `deadline`, and pins the peer session (see the module
    /// documentation).
    pub fn connect(
        conninfo: &str,
        deadline: Instant,
        interrupt: &mut dyn FnMut() -> Result<(), PeerError>,
    ) -> Result<Conn, PeerError> {
        let mut ops = [Op::new(conninfo, &[])];
        run_all(&mut ops, deadline, interrupt);
        let [op] = ops;
        match op.ex.outcome {
            Some(Err(e)) => Err(e),
            _ => op.conn.ok_or_else(|| PeerError::Lost("connection closed".into())),
        }
    }

    /// Runs `sql` (one statement, or several separated by semicolons, without parameters) and returns
    /// the rows of the last one, waiting at most until `deadline`.
    pub fn query(
        &self,
        sql: &str,
        deadline: Instant,
        interrupt: &mut dyn FnMut() -> Result<(), PeerError>,
    ) -> Result<Rows, PeerError> {
        self.start(sql, deadline).finish(interrupt)
    }

    /// Sends `sql` and returns at once: the peer works on it while this process does something else
    /// (its own half of a comparison); [`Pending::finish`] collects the answer. `deadline` bounds the
    /// whole exchange, and the peer's `statement_timeout` is set to it.
    pub fn start(&self, sql: &str, deadline: Instant) -> Pending<'_> {
        let budget = deadline.saturating_duration_since(Instant::now()).as_secs_f64();
        // The peer gives up when we do.
        let ms = (budget * 1000.0).ceil().max(1.0) as u64;
        // These settings last only if the statement succeeds (one implicit transaction).
        self.binary_timeout_ms.set(None);
        let mut ex = Exchange::new(vec![Statement::text(format!(
            "SET search_path = pg_catalog, pg_temp; SET statement_timeout = {ms}; {sql}"
        ))]);
        ex.start_next_statement(self);
        // Push the statement out now (it is small); the answer is read by `finish`.
        let _ = ex.advance(self, budget);
        Pending { conn: self, ex, deadline, budget }
    }

    /// [`Conn::start`] for one statement (no semicolons) whose results come back in libpq's binary
    /// format, in [`Rows::raw`]: each value as the peer's send function writes it (a `bytea` as its
    /// bytes). The session settings are set by a statement of their own first, unless the previous
    /// binary request left them as this one needs them (its `statement_timeout` within a second
    /// above this budget): then `sql` goes out at once and the peer works on it while the caller
    /// does its own part.
    pub fn start_binary(&self, sql: &str, deadline: Instant) -> Pending<'_> {
        let budget = deadline.saturating_duration_since(Instant::now()).as_secs_f64();
        // Whole seconds, so that requests with the same timeout ask for the same setting.
        let ms = (budget.ceil().max(1.0) as u64).saturating_mul(1000);
        let mut statements = Vec::with_capacity(2);
        if self.binary_timeout_ms.get().is_none_or(|set| set < ms || set > ms + 1000) {
            let settings = format!("SET search_path = pg_catalog, pg_temp; SET statement_timeout = {ms}");
            statements.push(Statement::text(settings));
        }
        statements.push(Statement { sql: sql.to_string(), binary: true });
        // Cleared again by `finish` if the exchange fails.
        self.binary_timeout_ms.set(Some(ms));
        let mut ex = Exchange::new(statements);
        ex.start_next_statement(self);
        let _ = ex.advance(self, budget);
        Pending { conn: self, ex, deadline, budget }
    }
}

/// One statement string to send, and whether its results come in binary format.
struct Statement {
    sql: String,
    binary: bool,
}

impl Statement {
    fn text(sql: String) -> Statement {
        Statement { sql, binary: false }
    }
}

/// A statement sent with [`Conn::start`], not yet answered.
pub struct Pending<'c> {
    conn: &'c Conn,
    ex: Exchange,
    deadline: Instant,
    budget: f64,
}

impl Pending<'_> {
    /// Waits for the answer (at most until the deadline given to [`Conn::start`]) and returns the rows
    /// of the last statement.
    pub fn finish(self, interrupt: &mut dyn FnMut() -> Result<(), PeerError>) -> Result<Rows, PeerError> {
        let Pending { conn, ex, deadline, budget } = self;
        let cell = std::cell::RefCell::new(ex);
        drive(1, deadline, interrupt, &mut |_| cell.borrow_mut().advance(conn, budget), &mut |_, e| {
            cell.borrow_mut().finish(Err(e))
        });
        let mut ex = cell.into_inner();
        match ex.outcome.take() {
            Some(Err(e)) => {
                conn.binary_timeout_ms.set(None);
                Err(e)
            }
            _ => Ok(ex.rows.pop().unwrap_or_default()),
        }
    }
}

enum Stage {
    /// Just started: wait for the socket to be writable before the first `PQconnectPoll`.
    Started,
    /// Waiting for `PQconnectPoll`.
    Connecting,
    /// Flushing the statement out (non-blocking send).
    Sending,
    /// Waiting for the result.
    Reading,
    /// Finished: `outcome` is set.
    Done,
}

/// The statements to run on one connection and what came back.
struct Exchange {
    stage: Stage,
    /// Statements still to run, the next one last.
    statements: Vec<Statement>,
    /// Whether the running statement's results are in binary format.
    binary: bool,
    /// The rows of each statement run by the caller, in order.
    rows: Vec<Rows>,
    /// Whether the statement running is the session-pinning one (its result is not the caller's).
    pinning: bool,
    /// When the running statement was sent.
    sent: Instant,
    /// The peer's error for the running statement, reported once its results are all read (so the
    /// connection stays usable).
    failed: Option<PeerError>,
    /// The rows of the running statement received so far.
    partial: Rows,
    /// Bytes received for the running statement (see `read_result`).
    received: usize,
    outcome: Option<Result<(), PeerError>>,
}

impl Exchange {
    fn new(mut statements: Vec<Statement>) -> Exchange {
        statements.reverse();
        Exchange {
            stage: Stage::Done,
            statements,
            binary: false,
            rows: vec![],
            pinning: false,
            sent: Instant::now(),
            failed: None,
            partial: Rows::default(),
            received: 0,
            outcome: None,
        }
    }

    fn finish(&mut self, r: Result<(), PeerError>) {
        if self.outcome.is_none() {
            self.outcome = Some(r);
        }
        self.stage = Stage::Done;
    }

    /// Sends the next statement, or finishes when none is left.
    fn start_next_statement(&mut self, conn: &Conn) {
        let Some(Statement { sql, binary }) = self.statements.pop() else {
            self.finish(Ok(()));
            return;
        };
        let Ok(c) = CString::new(sql) else {
            self.finish(Err(PeerError::Statement("statement contains a NUL byte".into())));
            return;
        };
        // SAFETY: a live, idle connection; the string outlives the call (libpq copies it). Single-row
        // mode, set right after sending as libpq requires, hands rows over one by one. Without
        // parameters the NULL arrays are never read; result format 1 is binary.
        let sent = unsafe {
            if binary {
                let (types, values) = (std::ptr::null(), std::ptr::null());
                let (lengths, formats) = (std::ptr::null(), std::ptr::null());
                pq::PQsendQueryParams(conn.raw.as_ptr(), c.as_ptr(), 0, types, values, lengths, formats, 1)
            } else {
                pq::PQsendQuery(conn.raw.as_ptr(), c.as_ptr())
            }
        };
        if sent == 0 {
            self.finish(Err(PeerError::Lost(conn.error_message())));
            return;
        }
        self.binary = binary;
        // SAFETY: as above, immediately after PQsendQuery.
        unsafe { pq::PQsetSingleRowMode(conn.raw.as_ptr()) };
        self.partial = Rows::default();
        self.received = 0;
        self.stage = Stage::Sending;
        self.sent = Instant::now();
        if !self.pinning {
            let sent_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
            self.rows.push(Rows { sent_unix_ms, ..Rows::default() });
        }
    }

    /// Does all the work possible without waiting; returns the socket and whether to wait for it to be
    /// readable (true) or writable (false), or None once finished.
    fn advance(&mut self, conn: &Conn, timeout_s: f64) -> Option<(i32, bool)> {
        let raw = conn.raw.as_ptr();
        loop {
            match self.stage {
                Stage::Done => return None,
                Stage::Started => {
                    self.stage = Stage::Connecting;
                    return Some((conn.socket(), false));
                }
                // SAFETY: a connection being established, polled as libpq documents.
                Stage::Connecting => match unsafe { pq::PQconnectPoll(raw) } {
                    pq::PostgresPollingStatusType::PGRES_POLLING_READING => {
                        return Some((conn.socket(), true));
                    }
                    pq::PostgresPollingStatusType::PGRES_POLLING_WRITING => {
                        return Some((conn.socket(), false));
                    }
                    pq::PostgresPollingStatusType::PGRES_POLLING_OK => {
                        // Pin the session before any statement of the caller.
                        let ms = (timeout_s * 1000.0).ceil().max(1.0) as u64;
                        self.statements.push(Statement::text(format!(
                            "SET search_path = pg_catalog, pg_temp; SET standard_conforming_strings = on; \
                             SET jit = off; SET statement_timeout = {ms}"
                        )));
                        self.pinning = true;
                        self.start_next_statement(conn);
                    }
                    _ => self.finish(Err(PeerError::Connect(conn.error_message()))),
                },
                // SAFETY: a live connection with a statement queued.
                Stage::Sending => match unsafe { pq::PQflush(raw) } {
                    0 => self.stage = Stage::Reading,
                    1 => return Some((conn.socket(), false)),
                    _ => self.finish(Err(PeerError::Lost(conn.error_message()))),
                },
                Stage::Reading => {
                    // SAFETY: a live connection; PQconsumeInput reads what the socket has without
                    // blocking.
                    if unsafe { pq::PQconsumeInput(raw) } == 0 {
                        self.finish(Err(PeerError::Lost(conn.error_message())));
                        continue;
                    }
                    match self.collect_results(conn) {
                        Err(e) => self.finish(Err(e)),
                        Ok(false) => return Some((conn.socket(), true)),
                        Ok(true) => {
                            self.pinning = false;
                            self.start_next_statement(conn);
                        }
                    }
                }
            }
        }
    }

    /// Reads every result available without blocking; true once the statement's last result is read.
    /// Rows arrive one by one (single-row mode), so what a peer sends is counted as it comes and a
    /// peer that sends too much is cut off before it is buffered. Of a statement string with several
    /// statements, the rows of the last one that returns rows are kept.
    fn collect_results(&mut self, conn: &Conn) -> Result<bool, PeerError> {
        let raw = conn.raw.as_ptr();
        loop {
            // SAFETY: results are only fetched while PQisBusy says fetching will not block.
            if unsafe { pq::PQisBusy(raw) } != 0 {
                return Ok(false);
            }
            // SAFETY: as above; each result is cleared once below.
            let res = unsafe { pq::PQgetResult(raw) };
            if res.is_null() {
                if let Some(e) = self.failed.take() {
                    return Err(e);
                }
                if !self.pinning {
                    if let Some(last) = self.rows.last_mut() {
                        last.elapsed = self.sent.elapsed();
                    }
                }
                return Ok(true);
            }
            let r = read_result(res, &mut self.partial, &mut self.received, self.binary);
            // SAFETY: frees the result once.
            unsafe { pq::PQclear(res) };
            match r {
                Got::Row | Got::Command => {}
                Got::Rows => {
                    let done = std::mem::take(&mut self.partial);
                    if !self.pinning {
                        if let Some(last) = self.rows.last_mut() {
                            last.columns = done.columns;
                            last.rows = done.rows;
                            last.raw = done.raw;
                        }
                    }
                }
                // The statement failed on the peer; the rest of its results are read so that the
                // connection stays usable.
                Got::Failed(e) => {
                    self.partial = Rows::default();
                    self.failed.get_or_insert(e);
                }
                // Nothing more may be read from this connection (a COPY the peer started, a result
                // too large): stop now, the caller drops it.
                Got::Fatal(e) => return Err(e),
            }
        }
    }
}

/// One connection and the statements to run on it, driven by [`run_all`].
pub struct Op {
    conn: Option<Conn>,
    ex: Exchange,
}

impl Op {
    /// Connects to `conninfo`, pins the session, then runs `statements` in order (each may hold several
    /// statements separated by semicolons; no parameters). Nothing happens before [`run_all`].
    pub fn new(conninfo: &str, statements: &[&str]) -> Op {
        let mut ex = Exchange::new(statements.iter().map(|s| Statement::text(s.to_string())).collect());
        match open(conninfo) {
            Ok(conn) => {
                ex.stage = Stage::Started;
                Op { conn: Some(conn), ex }
            }
            Err(e) => {
                ex.finish(Err(e));
                Op { conn: None, ex }
            }
        }
    }

    /// The rows of each statement run, in order.
    pub fn rows(&self) -> &[Rows] {
        &self.ex.rows
    }

    /// `Ok` once every statement ran; the error that ended the operation otherwise.
    pub fn outcome(&self) -> Result<(), &PeerError> {
        match &self.ex.outcome {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// The open connection, for more statements ([`Conn::query`]); None after an error.
    pub fn into_conn(self) -> Option<Conn> {
        if self.outcome().is_err() { None } else { self.conn }
    }

    fn advance(&mut self, timeout_s: f64) -> Option<(i32, bool)> {
        let conn = self.conn.as_ref()?;
        self.ex.advance(conn, timeout_s)
    }
}

/// Starts a non-blocking connection to `conninfo` (checked first).
fn open(conninfo: &str) -> Result<Conn, PeerError> {
    check_conninfo(conninfo)?;
    let conninfo_c =
        CString::new(conninfo).map_err(|_| PeerError::Conninfo("conninfo contains a NUL byte".into()))?;
    // Array entries before the expanded conninfo are defaults it may override; those after it win.
    let keys =
        [c"application_name".as_ptr(), c"dbname".as_ptr(), c"client_encoding".as_ptr(), std::ptr::null()];
    let values = [c"steep_repl".as_ptr(), conninfo_c.as_ptr(), c"UTF8".as_ptr(), std::ptr::null()];
    // SAFETY: NULL-terminated arrays of NUL-terminated strings that outlive the call; libpq copies what
    // it keeps. expand_dbname = 1 expands the conninfo given as dbname.
    let raw = unsafe { pq::PQconnectStartParams(keys.as_ptr(), values.as_ptr(), 1) };
    let conn = NonNull::new(raw)
        .map(|raw| Conn { raw, binary_timeout_ms: std::cell::Cell::new(None) })
        .ok_or_else(|| PeerError::Connect("out of memory".into()))?;
    // SAFETY: reads the status of the connection just allocated.
    if unsafe { pq::PQstatus(conn.raw.as_ptr()) } == pq::ConnStatusType::CONNECTION_BAD {
        return Err(PeerError::Connect(conn.error_message()));
    }
    // SAFETY: a live connection; non-blocking mode makes every send return at once. The notice
    // processor drops the peer's notices, which libpq would otherwise print into this server's log.
    unsafe {
        pq::PQsetnonblocking(conn.raw.as_ptr(), 1);
        pq::PQsetNoticeProcessor(conn.raw.as_ptr(), Some(ignore_notice), std::ptr::null_mut());
    }
    Ok(conn)
}

/// A libpq notice processor that drops the notice: a peer's messages are not ours to log.
unsafe extern "C" fn ignore_notice(_arg: *mut std::ffi::c_void, _message: *const c_char) {}

/// What one result brought.
enum Got {
    /// One row (single-row mode), added to the partial result.
    Row,
    /// The end of a statement's rows: the partial result is complete.
    Rows,
    /// A statement without rows.
    Command,
    /// The peer's error for the statement.
    Failed(PeerError),
    /// Something after which the connection cannot be used.
    Fatal(PeerError),
}

/// Reads one result into `partial` (its `raw` values when `binary`), counting what was received in
/// `received` (bytes, with a fixed cost per value and per row, so that a peer cannot send unbounded
/// NULLs or empty strings for free).
fn read_result(res: *mut pq::PGresult, partial: &mut Rows, received: &mut usize, binary: bool) -> Got {
    // SAFETY: `res` is a live result; every accessor below reads inside its bounds.
    unsafe {
        let status = pq::PQresultStatus(res);
        match status {
            pq::ExecStatusType::PGRES_SINGLE_TUPLE | pq::ExecStatusType::PGRES_TUPLES_OK => {
                let nf = pq::PQnfields(res).max(0) as usize;
                let nt = pq::PQntuples(res).max(0) as usize;
                if partial.columns.is_empty() && nf > 0 {
                    for f in 0..nf {
                        partial
                            .columns
                            .push(CStr::from_ptr(pq::PQfname(res, f as i32)).to_string_lossy().into_owned());
                    }
                }
                for t in 0..nt {
                    *received += 32;
                    // The value of field f, counted in `received`.
                    let mut value = |f: usize| -> Option<&[u8]> {
                        *received += 16;
                        if pq::PQgetisnull(res, t as i32, f as i32) != 0 {
                            return None;
                        }
                        let len = pq::PQgetlength(res, t as i32, f as i32).max(0) as usize;
                        *received += len;
                        let p = pq::PQgetvalue(res, t as i32, f as i32) as *const u8;
                        Some(std::slice::from_raw_parts(p, len))
                    };
                    if binary {
                        partial.raw.push((0..nf).map(|f| value(f).map(<[u8]>::to_vec)).collect());
                    } else {
                        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                        partial.rows.push((0..nf).map(|f| value(f).map(text)).collect());
                    }
                }
                if *received > MAX_RESULT_BYTES {
                    return Got::Fatal(PeerError::Lost(format!(
                        "the peer sent more than {} MB for one statement",
                        MAX_RESULT_BYTES >> 20
                    )));
                }
                if status == pq::ExecStatusType::PGRES_SINGLE_TUPLE { Got::Row } else { Got::Rows }
            }
            pq::ExecStatusType::PGRES_COMMAND_OK | pq::ExecStatusType::PGRES_EMPTY_QUERY => Got::Command,
            pq::ExecStatusType::PGRES_FATAL_ERROR | pq::ExecStatusType::PGRES_NONFATAL_ERROR => {
                let m = CStr::from_ptr(pq::PQresultErrorMessage(res)).to_string_lossy();
                let m = m.trim_end();
                let m = if m.is_empty() { "the peer reported an error".to_string() } else { m.to_string() };
                let code = pq::PQresultErrorField(res, pq::PG_DIAG_SQLSTATE as i32);
                let code = if code.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(code).to_string_lossy().into_owned()
                };
                // Cancelled, shutting down, out of connections: the peer is not answering, whatever
                // it said.
                if code.starts_with("57") || code.starts_with("08") || code.starts_with("53") {
                    Got::Failed(PeerError::Lost(m))
                } else {
                    Got::Failed(PeerError::Statement(m))
                }
            }
            other => Got::Fatal(PeerError::Lost(format!("unexpected answer from the peer ({other:?})"))),
        }
    }
}

/// Drives every operation until each has finished or `deadline` passes, waiting on all their sockets
/// together in slices of at most [`SLICE`] and calling `interrupt` between slices. Operations still
/// running at the deadline end with [`PeerError::Timeout`]; when `interrupt` fails, every unfinished one
/// ends with its error.
pub fn run_all(ops: &mut [Op], deadline: Instant, interrupt: &mut dyn FnMut() -> Result<(), PeerError>) {
    let budget = deadline.saturating_duration_since(Instant::now()).as_secs_f64();
    let n = ops.len();
    let cell = std::cell::RefCell::new(ops);
    drive(n, deadline, interrupt, &mut |i| cell.borrow_mut()[i].advance(budget), &mut |i, e| {
        let mut ops = cell.borrow_mut();
        ops[i].ex.finish(Err(e));
        ops[i].conn = None;
    });
}

/// The wait loop behind [`run_all`] and [`Conn::query`]: `advance(i)` does what item `i` can do
/// without waiting and says which socket it waits for; it is called again only once that socket is
/// ready (libpq's rule for `PQconnectPoll`). `fail(i, e)` ends an item.
fn drive(
    n: usize,
    deadline: Instant,
    interrupt: &mut dyn FnMut() -> Result<(), PeerError>,
    advance: &mut dyn FnMut(usize) -> Option<(i32, bool)>,
    fail: &mut dyn FnMut(usize, PeerError),
) {
    let started = Instant::now();
    // What each unfinished item waits for.
    let mut waits: Vec<Option<(i32, bool)>> = (0..n).map(|i| step(i, advance, fail)).collect();
    loop {
        let owners: Vec<usize> = (0..n).filter(|&i| waits[i].is_some()).collect();
        if owners.is_empty() {
            return;
        }
        if let Err(e) = interrupt() {
            let why = e.to_string();
            for &i in &owners {
                fail(i, PeerError::Interrupted(why.clone()));
            }
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            let waited = now.duration_since(started).as_secs_f64();
            for &i in &owners {
                fail(i, PeerError::Timeout(waited));
            }
            return;
        }
        let mut fds: Vec<libc::pollfd> = owners
            .iter()
            .map(|&i| {
                let (fd, read) = waits[i].expect("waiting");
                libc::pollfd { fd, events: if read { libc::POLLIN } else { libc::POLLOUT }, revents: 0 }
            })
            .collect();
        let wait = deadline.duration_since(now).min(SLICE);
        // SAFETY: `fds` is a valid array of pollfd of the given length for the duration of the call.
        let ready = unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.as_millis().max(1) as i32)
        };
        if ready <= 0 {
            continue; // timeout of the slice, or EINTR (a signal): check interrupts and the deadline
        }
        for (k, &i) in owners.iter().enumerate() {
            // Readable, writable, or an error or hang-up libpq will report when it next tries.
            if fds[k].revents != 0 {
                waits[i] = step(i, advance, fail);
            }
        }
    }
}

/// Advances item `i`; a socket libpq cannot give is the end of it.
fn step(
    i: usize,
    advance: &mut dyn FnMut(usize) -> Option<(i32, bool)>,
    fail: &mut dyn FnMut(usize, PeerError),
) -> Option<(i32, bool)> {
    match advance(i) {
        Some((fd, _)) if fd < 0 => {
            fail(i, PeerError::Lost("the connection has no socket".into()));
            None
        }
        w => w,
    }
}

/// A deadline `timeout` from now.
pub fn deadline(timeout: Duration) -> Instant {
    Instant::now() + timeout
}

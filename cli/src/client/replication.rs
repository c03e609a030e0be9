//! A logical replication connection (`replication=database`) to the source, for one command:
//! `CREATE_REPLICATION_SLOT name LOGICAL pgoutput (SNAPSHOT 'export')`, which creates a permanent slot
//! and exports the snapshot of its consistent point. tokio-postgres cannot open such a connection, so
//! this goes through libpq (the library the extension's peer connections use too).
//!
//! The exported snapshot lives only until this connection runs another command or closes: the caller
//! imports it (`SET TRANSACTION SNAPSHOT`) in its coordinating transaction, which then keeps it, before
//! dropping the connection. Slot creation waits for the transactions running when it starts; it runs on
//! a blocking thread and Ctrl-C cancels it through libpq's cancel request.
//!
//! The only module of the CLI that opts out of the workspace's `unsafe_code` lint: the libpq calls,
//! each with the invariant it relies on beside it.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};
use std::ptr::NonNull;

use pq_sys as pq;
use tokio_postgres::config::Host;

use crate::conn::{ConnSpec, TlsMode};
use crate::error::CliError;

/// The slot's output plugin (the one `CREATE SUBSCRIPTION` uses).
pub const PLUGIN: &str = "pgoutput";

/// A slot just created: its consistent point and the name of the exported snapshot of it.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub consistent_point: String,
    pub snapshot_name: String,
}

/// An open replication connection. Closed on drop.
pub struct ReplicationConn {
    raw: NonNull<pq::PGconn>,
}

// SAFETY: a libpq connection may be used from any thread as long as one thread uses it at a time,
// which ownership guarantees (it moves into the blocking task and back).
unsafe impl Send for ReplicationConn {}

impl Drop for ReplicationConn {
    fn drop(&mut self) {
        // SAFETY: the connection is ours and freed once.
        unsafe { pq::PQfinish(self.raw.as_ptr()) };
    }
}

/// libpq's cancel handle for a connection: usable from another thread while the connection waits.
struct Canceller(*mut pq::PGcancel);

// SAFETY: PQcancel is documented as safe to call from another thread (or a signal handler).
unsafe impl Send for Canceller {}

impl Canceller {
    fn cancel(&self) {
        let mut buf = [0 as c_char; 256];
        // SAFETY: the handle is live until drop; buf is writable for its length.
        unsafe { pq::PQcancel(self.0, buf.as_mut_ptr(), buf.len() as i32) };
    }
}

/// Sends the cancel request when dropped while still armed.
struct CancelOnDrop(Option<Canceller>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.cancel();
        }
    }
}

impl Drop for Canceller {
    fn drop(&mut self) {
        // SAFETY: frees the handle PQgetCancel returned, once.
        unsafe { pq::PQfreeCancel(self.0) };
    }
}

impl ReplicationConn {
    /// Connects to `spec` in logical replication mode (blocking; connect_timeout applies).
    pub fn connect(spec: &ConnSpec) -> Result<ReplicationConn, CliError> {
        let c = &spec.config;
        let mut params: Vec<(&str, String)> = Vec::new();
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(n) => n.clone(),
                Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        if !hosts.is_empty() {
            params.push(("host", hosts.join(",")));
        }
        if let Some(p) = c.get_ports().first() {
            params.push(("port", p.to_string()));
        }
        if let Some(u) = c.get_user() {
            params.push(("user", u.to_string()));
        }
        if let Some(d) = c.get_dbname() {
            params.push(("dbname", d.to_string()));
        }
        if let Some(pw) = c.get_password() {
            params.push(("password", String::from_utf8_lossy(pw).into_owned()));
        }
        if let Some(t) = c.get_connect_timeout() {
            params.push(("connect_timeout", t.as_secs().max(1).to_string()));
        }
        let sslmode = match spec.tls {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        };
        params.push(("sslmode", sslmode.to_string()));
        params.push(("replication", "database".to_string()));
        params.push(("application_name", "steep-repl".to_string()));
        let owned: Vec<(CString, CString)> = params
            .iter()
            .map(|(k, v)| {
                Ok((CString::new(*k).unwrap_or_default(), CString::new(v.as_str()).map_err(|_| nul(k))?))
            })
            .collect::<Result<_, CliError>>()?;
        let mut keys: Vec<*const c_char> = owned.iter().map(|(k, _)| k.as_ptr()).collect();
        let mut values: Vec<*const c_char> = owned.iter().map(|(_, v)| v.as_ptr()).collect();
        keys.push(std::ptr::null());
        values.push(std::ptr::null());
        // SAFETY: both arrays are NULL-terminated and point into `owned`, alive for the call.
        let raw = unsafe { pq::PQconnectdbParams(keys.as_ptr(), values.as_ptr(), 0) };
        let raw = NonNull::new(raw)
            .ok_or_else(|| CliError::Connect { target: spec.target(), reason: "out of memory".into() })?;
        let conn = ReplicationConn { raw };
        // SAFETY: a live connection.
        if unsafe { pq::PQstatus(conn.raw.as_ptr()) } != pq::ConnStatusType::CONNECTION_OK {
            return Err(CliError::Connect {
                target: format!("{} in replication mode", spec.target()),
                reason: conn.error_message(),
            });
        }
        Ok(conn)
    }

    /// The pid of the server process behind this connection (its walsender).
    pub fn backend_pid(&self) -> i32 {
        // SAFETY: a live connection.
        unsafe { pq::PQbackendPID(self.raw.as_ptr()) }
    }

    fn error_message(&self) -> String {
        // SAFETY: a string owned by the connection, valid until the next call on it.
        let m = unsafe { CStr::from_ptr(pq::PQerrorMessage(self.raw.as_ptr())) };
        m.to_string_lossy().trim_end().to_string()
    }

    /// Creates the permanent logical slot `name` and exports its snapshot. Dropping the returned future
    /// before it ends (Ctrl-C) cancels the wait for older transactions through libpq's cancel request;
    /// a slot created in that instant is the caller's to drop, as on any failure after this.
    pub async fn create_slot(self, name: &str) -> Result<(ReplicationConn, CreatedSlot), CliError> {
        // SAFETY: a live connection; the handle is freed by Canceller's drop.
        let mut canceller = CancelOnDrop(Some(Canceller(unsafe { pq::PQgetCancel(self.raw.as_ptr()) })));
        // The name is checked by the caller (lower-case letters, digits, underscores).
        let sql = format!("CREATE_REPLICATION_SLOT \"{name}\" LOGICAL {PLUGIN} (SNAPSHOT 'export')");
        let task = tokio::task::spawn_blocking(move || {
            let r = self.exec_one_row(&sql);
            (self, r)
        });
        let joined = task.await;
        canceller.0 = None;
        let (conn, row) =
            joined.map_err(|e| CliError::Other(anyhow::anyhow!("slot creation thread: {e}")))?;
        let row =
            row.map_err(|e| CliError::Other(anyhow::anyhow!("creating replication slot {name}: {e}")))?;
        // Columns: slot_name, consistent_point, snapshot_name, output_plugin.
        match (row.get(1).cloned().flatten(), row.get(2).cloned().flatten()) {
            (Some(consistent_point), Some(snapshot_name)) => {
                Ok((conn, CreatedSlot { consistent_point, snapshot_name }))
            }
            _ => Err(CliError::Other(anyhow::anyhow!(
                "creating replication slot {name}: the server returned no consistent point or snapshot"
            ))),
        }
    }

    /// Runs one command and returns its single row (text values).
    fn exec_one_row(&self, sql: &str) -> Result<Vec<Option<String>>, String> {
        let c = CString::new(sql).map_err(|_| "command contains a NUL byte".to_string())?;
        // SAFETY: a live connection and a NUL-terminated command; the result is cleared below.
        let res = unsafe { pq::PQexec(self.raw.as_ptr(), c.as_ptr()) };
        if res.is_null() {
            return Err(self.error_message());
        }
        // SAFETY: `res` is a live result until PQclear.
        let out = unsafe {
            let status = pq::PQresultStatus(res);
            if status != pq::ExecStatusType::PGRES_TUPLES_OK {
                let m =
                    CStr::from_ptr(pq::PQresultErrorMessage(res)).to_string_lossy().trim_end().to_string();
                Err(if m.is_empty() { self.error_message() } else { m })
            } else if pq::PQntuples(res) < 1 {
                Err("no row returned".to_string())
            } else {
                let n = pq::PQnfields(res);
                Ok((0..n)
                    .map(|i| {
                        (pq::PQgetisnull(res, 0, i) == 0)
                            .then(|| CStr::from_ptr(pq::PQgetvalue(res, 0, i)).to_string_lossy().into_owned())
                    })
                    .collect())
            }
        };
        // SAFETY: frees the result once.
        unsafe { pq::PQclear(res) };
        out
    }
}

fn nul(key: &str) -> CliError {
    CliError::ConnParams(format!("{key} contains a NUL byte"))
}

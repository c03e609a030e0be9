//! Session settings of client-mode connections: the same pinned output settings as the server's
//! workers (so COPY text is byte-identical), and no server-side timeout that would kill a long job.

use steep_repl_engine::copy_text::PINNED_SETTINGS;
use steep_repl_engine::ident::{quote_ident, quote_literal};
use tokio_postgres::Client;

use crate::error::CliError;

/// `SET name = 'value'` for one setting, both quoted.
pub fn set(name: &str, value: &str) -> String {
    format!("SET {} = {};", quote_ident(name), quote_literal(value))
}

/// The pinned output settings, the time zone and the client encoding, plus no statement or
/// idle-in-transaction timeouts (a coordinator sits idle in its transaction for the whole job).
///
/// `client_encoding` is the server encoding the COPY text is (generate: the source's, so no conversion
/// happens and bytes match what the server's workers write; apply: the snapshot's, so the target converts).
pub fn pinned(timezone: &str, client_encoding: &str) -> String {
    let mut sql = String::new();
    for (name, value) in PINNED_SETTINGS {
        sql.push_str(&set(name, value));
    }
    if !timezone.is_empty() {
        sql.push_str(&set("TimeZone", timezone));
    }
    if !client_encoding.is_empty() {
        sql.push_str(&set("client_encoding", client_encoding));
    }
    for name in ["statement_timeout", "idle_in_transaction_session_timeout"] {
        sql.push_str(&set(name, "0"));
    }
    sql
}

/// Extra settings of generate's reading sessions: rows come out in physical order, as the server's
/// block-range scan writes them (no parallel plan, no synchronized scan starting mid-table).
pub const READ_IN_PHYSICAL_ORDER: &str =
    "SET max_parallel_workers_per_gather = 0; SET synchronize_seqscans = off;";

/// Runs `sql` (several statements) on `client`.
pub async fn run(client: &Client, sql: &str, context: &str) -> Result<(), CliError> {
    client.batch_execute(sql).await.map_err(CliError::query(context.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_quoted() {
        let sql = pinned("America/New_York", "UTF8");
        assert!(sql.starts_with("SET \"DateStyle\" = 'ISO';"), "{sql}");
        assert!(sql.contains("SET \"TimeZone\" = 'America/New_York';"), "{sql}");
        assert!(sql.contains("SET \"client_encoding\" = 'UTF8';"), "{sql}");
        assert_eq!(set("TimeZone", "x'; DROP"), "SET \"TimeZone\" = 'x''; DROP';");
    }
}

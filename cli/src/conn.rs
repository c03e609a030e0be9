//! Connection settings, resolved like psql: `-d` is a conninfo string, a URI or a bare database name;
//! whatever it leaves out comes from PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD and PGSSLMODE, then
//! libpq's defaults (the unix socket in /var/run/postgresql, port 5432, the OS user).
//!
//! `sslmode` takes libpq's six values; tokio-postgres knows three, so the mode is taken out of the string
//! here and mapped onto a TLS connector: `disable`; `allow`/`prefer` (TLS when offered, unverified, as
//! libpq); `require` (TLS, unverified); `verify-ca` (chain checked); `verify-full` (chain and host name).

use std::time::Duration;

use steep_repl_engine::ident::quote_ident;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{AsyncMessage, Client, Config, Connection};

use crate::error::CliError;

/// Run on every connection the CLI opens (see `ConnSpec::connect`).
const SAFE_SEARCH_PATH: &str = "SET search_path = pg_catalog, pg_temp";

/// Default time to wait for a server before giving up (libpq waits forever; a CLI should not).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    fn parse(s: &str) -> Result<Self, CliError> {
        Ok(match s {
            "disable" => TlsMode::Disable,
            "allow" => TlsMode::Allow,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(CliError::ConnParams(format!(
                    "sslmode \"{other}\" is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnSpec {
    pub config: Config,
    pub tls: TlsMode,
}

impl ConnSpec {
    /// Resolves `-d` and the environment (`env` is a lookup, so tests need not touch the process env).
    pub fn resolve(dbname_arg: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Result<Self, CliError> {
        let mut tls = None;
        let mut config = match dbname_arg {
            None => Config::new(),
            Some(s) if is_uri(s) || s.contains('=') => {
                let (rest, mode) = if is_uri(s) { take_uri_sslmode(s) } else { take_keyword_sslmode(s)? };
                tls = mode.map(|m| TlsMode::parse(&m)).transpose()?;
                rest.parse::<Config>().map_err(|e| CliError::ConnParams(format!("-d: {e}")))?
            }
            Some(s) => {
                let mut c = Config::new();
                c.dbname(s.trim());
                c
            }
        };
        let nonempty = |k: &str| env(k).filter(|v| !v.is_empty());
        if config.get_hosts().is_empty() {
            let hosts = nonempty("PGHOST").unwrap_or_else(|| "/var/run/postgresql".to_string());
            for h in hosts.split(',') {
                config.host(h.trim());
            }
        }
        if config.get_ports().is_empty() {
            let port = match nonempty("PGPORT") {
                Some(p) => p
                    .trim()
                    .parse::<u16>()
                    .map_err(|_| CliError::ConnParams(format!("PGPORT \"{p}\" is not a port number")))?,
                None => 5432,
            };
            config.port(port);
        }
        if config.get_user().is_none() {
            let user =
                nonempty("PGUSER").or_else(|| nonempty("USER")).unwrap_or_else(|| "postgres".to_string());
            config.user(&user);
        }
        if config.get_dbname().is_none() {
            let db = nonempty("PGDATABASE").or_else(|| config.get_user().map(str::to_string));
            if let Some(db) = db {
                config.dbname(&db);
            }
        }
        if config.get_password().is_none()
            && let Some(pw) = env("PGPASSWORD")
        {
            config.password(pw);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        config.application_name("steep-repl");
        let tls = match tls {
            Some(t) => t,
            None => match nonempty("PGSSLMODE") {
                Some(m) => TlsMode::parse(&m)?,
                None => TlsMode::Prefer,
            },
        };
        config.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Allow | TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        Ok(ConnSpec { config, tls })
    }

    /// "host H port P" (or "socket /dir/.s.PGSQL.P") for messages; never includes the password.
    pub fn target(&self) -> String {
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(name) => format!("host {name} port {port}"),
                #[cfg(unix)]
                Host::Unix(dir) => format!("socket {}/.s.PGSQL.{port}", dir.display()),
            })
            .collect();
        let db = self.config.get_dbname().unwrap_or("?");
        let user = self.config.get_user().unwrap_or("?");
        format!("{} (database {db}, user {user})", hosts.join(", "))
    }

    /// A conninfo string for this target without any password, for commands printed to the user
    /// (`-d '...'`): host, port, user, dbname and sslmode, each quoted as libpq requires.
    pub fn public_conninfo(&self) -> String {
        let mut parts = Vec::new();
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(dir) => dir.display().to_string(),
            })
            .collect();
        if !hosts.is_empty() {
            parts.push(format!("host={}", conninfo_value(&hosts.join(","))));
        }
        if let Some(port) = self.config.get_ports().first() {
            parts.push(format!("port={port}"));
        }
        if let Some(user) = self.config.get_user() {
            parts.push(format!("user={}", conninfo_value(user)));
        }
        if let Some(db) = self.config.get_dbname() {
            parts.push(format!("dbname={}", conninfo_value(db)));
        }
        let mode = match self.tls {
            TlsMode::Disable => Some("disable"),
            TlsMode::Allow => Some("allow"),
            TlsMode::Prefer => None,
            TlsMode::Require => Some("require"),
            TlsMode::VerifyCa => Some("verify-ca"),
            TlsMode::VerifyFull => Some("verify-full"),
        };
        if let Some(m) = mode {
            parts.push(format!("sslmode={m}"));
        }
        parts.join(" ")
    }

    /// Opens one connection and drives it on the runtime. The returned client closes when dropped.
    pub async fn connect(&self) -> Result<Client, CliError> {
        self.connect_with(None).await
    }

    /// Opens a connection that has run `LISTEN channel`; notifications (and the server's notices, and
    /// the loss of the connection) arrive on the returned receiver.
    pub async fn connect_listening(&self, channel: &str) -> Result<Listener, CliError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = self.connect_with(Some(tx)).await?;
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
            .await
            .map_err(CliError::query(format!("LISTEN {channel}")))?;
        Ok(Listener { client, events: rx })
    }

    async fn connect_with(&self, events: Option<Events>) -> Result<Client, CliError> {
        let client = self.open(events).await?;
        // Every statement of the CLI names its objects with their schema; with the search path pinned,
        // nothing resolves through a schema the role controls, and catalog text (type names in the
        // manifest) comes out the same as from the server's workers, which pin the same path.
        client
            .batch_execute(SAFE_SEARCH_PATH)
            .await
            .map_err(CliError::query("pinning the search path".to_string()))?;
        Ok(client)
    }

    async fn open(&self, events: Option<Events>) -> Result<Client, CliError> {
        let fail = |e: tokio_postgres::Error| CliError::Connect {
            target: self.target(),
            reason: connect_reason(&e),
        };
        if self.tls == TlsMode::Disable {
            let (client, connection) = self.config.connect(tokio_postgres::NoTls).await.map_err(fail)?;
            tokio::spawn(drive(connection, events));
            return Ok(client);
        }
        let mut builder = native_tls::TlsConnector::builder();
        match self.tls {
            TlsMode::VerifyFull => {}
            TlsMode::VerifyCa => {
                builder.danger_accept_invalid_hostnames(true);
            }
            _ => {
                builder.danger_accept_invalid_certs(true).danger_accept_invalid_hostnames(true);
            }
        }
        let connector =
            builder.build().map_err(|e| CliError::ConnParams(format!("cannot set up TLS: {e}")))?;
        let tls = postgres_native_tls::MakeTlsConnector::new(connector);
        let (client, connection) = self.config.connect(tls).await.map_err(fail)?;
        tokio::spawn(drive(connection, events));
        Ok(client)
    }
}

/// What a listening connection reports besides query results.
#[derive(Debug)]
pub enum ServerEvent {
    /// A NOTIFY on a channel this session listens to.
    Notification { channel: String, payload: String },
    /// A NOTICE, WARNING or similar message from the server.
    Notice(String),
    /// The connection ended (the reason, when there was an error).
    Lost(String),
}

type Events = mpsc::UnboundedSender<ServerEvent>;

/// A client whose connection has run LISTEN, and the events it received.
pub struct Listener {
    /// The client, usable for queries.
    pub client: Client,
    /// Notifications, notices and the end of the connection.
    pub events: mpsc::UnboundedReceiver<ServerEvent>,
}

/// Drives a connection until it ends, forwarding asynchronous messages when someone listens.
async fn drive<S, T>(mut connection: Connection<S, T>, events: Option<Events>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let send = |event: ServerEvent| {
        if let Some(tx) = &events
            && tx.send(event).is_err()
        {
            // The listener is gone; keep driving the connection for its remaining queries.
        }
    };
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => send(ServerEvent::Notification {
                channel: n.channel().to_string(),
                payload: n.payload().to_string(),
            }),
            Some(Ok(AsyncMessage::Notice(db))) => {
                send(ServerEvent::Notice(format!("{}: {}", db.severity(), db.message())))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                send(ServerEvent::Lost(connect_reason(&e)));
                return;
            }
            None => {
                send(ServerEvent::Lost("the server closed the connection".to_string()));
                return;
            }
        }
    }
}

/// A conninfo value, single-quoted when it holds spaces, quotes or backslashes (libpq's rules).
fn conninfo_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\']) {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The most useful line of a connection error: the server's message when it sent one, else the I/O
/// cause ("Connection refused").
fn connect_reason(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason = s.to_string();
        source = s.source();
    }
    reason
}

fn is_uri(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Splits a libpq keyword/value connection string into its pairs, as libpq reads it: `keyword = value`
/// separated by white space; a value is a run of non-space characters, or single-quoted; a backslash
/// takes the next character literally in both. The errors never quote the string (it may hold a
/// password).
fn parse_keywords(s: &str) -> Result<Vec<(String, String)>, CliError> {
    let syntax = |what: &str| {
        CliError::ConnParams(format!(
            "-d: {what} in the connection string (quote values with spaces: keyword='a value')"
        ))
    };
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return Err(syntax("a keyword without \"=\""));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(syntax("a quoted value without its closing quote")),
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// Takes `sslmode` (the last one, as libpq) out of a keyword/value connection string: (the rest,
/// rewritten with libpq's quoting; the mode).
fn take_keyword_sslmode(s: &str) -> Result<(String, Option<String>), CliError> {
    let mut mode = None;
    let mut rest = Vec::new();
    for (key, value) in parse_keywords(s)? {
        if key == "sslmode" {
            mode = Some(value);
        } else {
            rest.push(format!("{key}={}", conninfo_value(&value)));
        }
    }
    Ok((rest.join(" "), mode))
}

/// Takes `sslmode` out of a URI's query (`?a=b&sslmode=...`): (the URI without it, the mode). Only the
/// query is looked at: the user name and password before the host are never taken apart.
fn take_uri_sslmode(uri: &str) -> (String, Option<String>) {
    let Some((base, query)) = uri.split_once('?') else {
        return (uri.to_string(), None);
    };
    let mut mode = None;
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        if percent_decode(key) == "sslmode" {
            mode = Some(percent_decode(value));
        } else {
            kept.push(param);
        }
    }
    let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    (rest, mode)
}

/// Decodes `%XX` escapes (anything malformed is kept as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) =
                (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn conninfo_wins_over_environment() {
        let spec = ConnSpec::resolve(
            Some("host=db1 port=6000 dbname=app user=alice"),
            env_of(&[("PGHOST", "other"), ("PGPORT", "7000"), ("PGUSER", "bob")]),
        )
        .unwrap();
        assert_eq!(spec.target(), "host db1 port 6000 (database app, user alice)");
    }

    #[test]
    fn environment_fills_gaps() {
        let spec = ConnSpec::resolve(
            None,
            env_of(&[
                ("PGHOST", "db2"),
                ("PGPORT", "6543"),
                ("PGDATABASE", "shop"),
                ("PGUSER", "carol"),
                ("PGPASSWORD", "s3cret"),
            ]),
        )
        .unwrap();
        assert_eq!(spec.target(), "host db2 port 6543 (database shop, user carol)");
        assert_eq!(spec.config.get_password(), Some(&b"s3cret"[..]));
        assert!(!spec.target().contains("s3cret"));
    }

    #[test]
    fn uri_and_bare_dbname() {
        let spec = ConnSpec::resolve(Some("postgresql://dave:pw@h:5544/inv"), env_of(&[])).unwrap();
        assert_eq!(spec.target(), "host h port 5544 (database inv, user dave)");
        let spec = ConnSpec::resolve(Some("inventory"), env_of(&[("PGUSER", "erin")])).unwrap();
        assert_eq!(spec.target(), "socket /var/run/postgresql/.s.PGSQL.5432 (database inventory, user erin)");
    }

    #[test]
    fn libpq_ssl_modes() {
        let spec = ConnSpec::resolve(Some("host=h sslmode=verify-full dbname=x"), env_of(&[])).unwrap();
        assert_eq!(spec.tls, TlsMode::VerifyFull);
        let spec = ConnSpec::resolve(Some("postgresql://h/x?sslmode=disable"), env_of(&[])).unwrap();
        assert_eq!(spec.tls, TlsMode::Disable);
        let spec = ConnSpec::resolve(None, env_of(&[("PGSSLMODE", "require")])).unwrap();
        assert_eq!(spec.tls, TlsMode::Require);
        let err = ConnSpec::resolve(None, env_of(&[("PGSSLMODE", "sometimes")])).unwrap_err();
        assert!(err.to_string().contains("sometimes"));
    }

    #[test]
    fn public_conninfo_never_has_the_password() {
        let spec = ConnSpec::resolve(
            Some("host=/tmp/my sock port=5 user=o'k dbname=app password=hunter2 sslmode=require"),
            env_of(&[]),
        );
        // A space in an unquoted value is a conninfo syntax error; quote it as libpq wants.
        assert!(spec.is_err());
        let spec = ConnSpec::resolve(
            Some("host='/tmp/my sock' port=5 user=ok dbname=app password=hunter2 sslmode=require"),
            env_of(&[]),
        )
        .unwrap();
        let shown = spec.public_conninfo();
        assert_eq!(shown, "host='/tmp/my sock' port=5 user=ok dbname=app sslmode=require");
        assert!(!shown.contains("hunter2"));
        let again = ConnSpec::resolve(Some(&shown), env_of(&[])).unwrap();
        assert_eq!(again.target(), spec.target());
        assert_eq!(conninfo_value("it's"), "'it\\'s'");
    }

    #[test]
    fn sslmode_is_a_keyword_never_a_substring() {
        // A password holding "sslmode=" neither turns TLS off nor shows up in an error.
        let spec = ConnSpec::resolve(
            Some("host=h dbname=x password='pa sslmode=disable ss' sslmode=require"),
            env_of(&[]),
        )
        .unwrap();
        assert_eq!(spec.tls, TlsMode::Require);
        assert_eq!(spec.config.get_password(), Some(&b"pa sslmode=disable ss"[..]));
        let spec = ConnSpec::resolve(Some("host=h dbname=x password=sslmode=disable"), env_of(&[])).unwrap();
        assert_eq!(spec.tls, TlsMode::Prefer);
        assert_eq!(spec.config.get_password(), Some(&b"sslmode=disable"[..]));
        let err =
            ConnSpec::resolve(Some("host=h password='hunter2 sslmode=bogus' sslmode=nope"), env_of(&[]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("\"nope\"") && !err.contains("hunter2"), "{err}");
        let err = ConnSpec::resolve(Some("host=h password='hunter2"), env_of(&[])).unwrap_err().to_string();
        assert!(!err.contains("hunter2") && err.contains("closing quote"), "{err}");
        // In a URI only the query is read; the password stays whole.
        let spec =
            ConnSpec::resolve(Some("postgresql://u:pw%26sslmode%3Ddisable@h/x?sslmode=require"), env_of(&[]))
                .unwrap();
        assert_eq!(spec.tls, TlsMode::Require);
        assert_eq!(spec.config.get_password(), Some(&b"pw&sslmode=disable"[..]));
        let spec =
            ConnSpec::resolve(Some("postgresql://h/x?application_name=a&sslmode=verify-ca"), env_of(&[]))
                .unwrap();
        assert_eq!(spec.tls, TlsMode::VerifyCa);
        // Backslashes escape, as in libpq.
        let pairs = parse_keywords(r"a=x\ y b = 'it\'s' c=''").unwrap();
        assert_eq!(
            pairs,
            vec![("a".into(), "x y".into()), ("b".into(), "it's".into()), ("c".into(), "".into())]
        );
    }

    #[test]
    fn bad_port_is_named() {
        let err = ConnSpec::resolve(None, env_of(&[("PGPORT", "fifty")])).unwrap_err();
        assert!(err.to_string().contains("PGPORT \"fifty\""), "{err}");
        assert_eq!(err.exit_code(), crate::error::EXIT_CONNECTION);
    }
}

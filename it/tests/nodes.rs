//! The node registry, heartbeats and health (issue 13, PRODUCT.md §8), between two real clusters whose
//! supervisors probe each other every second.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use steep_repl_testkit as harness;

use harness::*;

/// Probes every second, each bounded by 2 s (and so by the interval, 1 s).
const CONF: &str = "steep_repl.heartbeat_interval = 1\nsteep_repl.peer_timeout = 2\n";

fn node_field(c: &mut postgres::Client, node: &str, field: &str) -> Option<String> {
    let sql = format!("SELECT {field}::text FROM steep_repl.node_status($1)");
    c.query_one(&sql, &[&node]).unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e))).get(0)
}

/// Polls until node `node` seen from `c` has `status`, for at most `within`; returns the time it took.
fn wait_status(c: &mut postgres::Client, node: &str, status: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let now = node_field(c, node, "status").unwrap_or_default();
        if now == status {
            return start.elapsed();
        }
        if start.elapsed() > within {
            let err: Option<String> = c
                .query_one("SELECT last_error FROM steep_repl.nodes WHERE node_id = $1", &[&node])
                .map(|r| r.get(0))
                .unwrap_or(None);
            panic!("node {node} still {now} after {within:?}, not {status} (last error: {err:?})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn register(c: &mut postgres::Client, id: &str, conninfo: Option<&str>, local: bool) {
    c.query_one(
        "SELECT steep_repl.register_node($1, name => $1, conninfo => $2, is_local => $3)",
        &[&id, &conninfo, &local],
    )
    .unwrap_or_else(|e| panic!("register_node({id}): {}", db_message(&e)));
}

fn err(c: &mut postgres::Client, sql: &str) -> String {
    match c.batch_execute(sql) {
        Ok(()) => panic!("{sql} succeeded"),
        Err(e) => db_message(&e),
    }
}

#[test]
fn two_nodes_see_each_other_go_unreachable_and_come_back() {
    let a = dedicated_with("nodes_a", CONF);
    let b = dedicated_with("nodes_b", CONF);
    a.fresh_db("reg", true);
    b.fresh_db("reg", true);
    let mut ca = a.client("reg");
    let mut cb = b.client("reg");
    register(&mut ca, "a", None, true);
    register(&mut ca, "b", Some(&b.conninfo_for("reg")), false);
    register(&mut cb, "b", None, true);
    register(&mut cb, "a", Some(&a.conninfo_for("reg")), false);

    // Both healthy within two intervals (plus the time a worker takes to start).
    wait_status(&mut ca, "b", "healthy", Duration::from_secs(5));
    wait_status(&mut cb, "a", "healthy", Duration::from_secs(5));
    let b_sysid: i64 = cb.query_one("SELECT system_identifier FROM steep_repl.health()", &[]).unwrap().get(0);
    let row = ca
        .query_one(
            "SELECT rtt_ms, clock_offset_ms, server_version, extension_version, system_identifier \
             FROM steep_repl.nodes WHERE node_id = 'b'",
            &[],
        )
        .unwrap();
    let rtt: f64 = row.get(0);
    let offset: f64 = row.get(1);
    assert!(rtt > 0.0 && rtt < 2000.0, "rtt {rtt}");
    assert!(offset.abs() < 1000.0, "same machine, clock offset {offset} ms");
    assert!(row.get::<_, String>(2).starts_with("15"), "server version");
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("0.1.0"));
    assert_eq!(row.get::<_, i64>(4), b_sysid, "the peer's system identifier");
    // The local node is healthy and seen just now; health() counts the peer.
    assert_eq!(node_field(&mut ca, "a", "status").as_deref(), Some("healthy"));
    let h =
        ca.query_one("SELECT node_id, peers_total, peers_unreachable FROM steep_repl.health()", &[]).unwrap();
    assert_eq!(
        (h.get::<_, Option<String>>(0).as_deref(), h.get::<_, i64>(1), h.get::<_, i64>(2)),
        (Some("a"), 1, 0)
    );

    // B stops: unreachable within 3 intervals plus the timeout (and a worker start or two).
    b.stop();
    let took = wait_status(&mut ca, "b", "unreachable", Duration::from_secs(12));
    eprintln!("unreachable after {took:?}");
    let h = ca.query_one("SELECT peers_unreachable FROM steep_repl.health()", &[]).unwrap();
    assert_eq!(h.get::<_, i64>(0), 1);
    let last_error: Option<String> =
        ca.query_one("SELECT last_error FROM steep_repl.nodes WHERE node_id = 'b'", &[]).unwrap().get(0);
    assert!(last_error.is_some_and(|e| e.contains("connect")), "the reason is kept");

    // B back: healthy at the next success.
    b.restart();
    wait_status(&mut ca, "b", "healthy", Duration::from_secs(8));

    // A restarts: probing resumes without anyone registering again.
    a.restart();
    let mut ca = a.client("reg");
    let before: String = ca
        .query_one("SELECT last_probe::text FROM steep_repl.nodes WHERE node_id = 'b'", &[])
        .unwrap()
        .get(0);
    let start = Instant::now();
    loop {
        let now: String = ca
            .query_one("SELECT last_probe::text FROM steep_repl.nodes WHERE node_id = 'b'", &[])
            .unwrap()
            .get(0);
        if now != before {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no probe after the restart");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ca.query_one("SELECT steep_repl.heartbeat('b')", &[]).unwrap().get::<_, bool>(0));
    assert!(ca.query_one("SELECT steep_repl.unregister_node('b')", &[]).unwrap().get::<_, bool>(0));
    assert!(!ca.query_one("SELECT steep_repl.unregister_node('b')", &[]).unwrap().get::<_, bool>(0));
}

#[test]
fn a_peer_that_never_answers_stalls_nothing() {
    let a = dedicated_with("nodes_hang", CONF);
    let b = preloaded();
    a.fresh_db("reg", true);
    b.fresh_db("hang_peer", true);
    // Accepts TCP connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let mut ca = a.client("reg");
    register(&mut ca, "a", None, true);
    register(
        &mut ca,
        "silent",
        Some(&format!("host=127.0.0.1 port={port} dbname=x user=postgres sslmode=disable")),
        false,
    );
    register(&mut ca, "good", Some(&b.conninfo_for("hang_peer")), false);

    wait_status(&mut ca, "good", "healthy", Duration::from_secs(5));
    wait_status(&mut ca, "silent", "unreachable", Duration::from_secs(12));
    // Meanwhile the local heartbeat kept moving and the good peer stayed healthy.
    for _ in 0..6 {
        let ago: f64 = node_field(&mut ca, "a", "seconds_since_seen").unwrap().parse().unwrap();
        assert!(ago < 2.5, "the local heartbeat stalled: seen {ago} s ago");
        assert_eq!(node_field(&mut ca, "good", "status").as_deref(), Some("healthy"));
        let ago: f64 = node_field(&mut ca, "good", "seconds_since_seen").unwrap().parse().unwrap();
        assert!(ago < 3.5, "the good peer was not probed for {ago} s");
        std::thread::sleep(Duration::from_millis(500));
    }
    let why: String =
        ca.query_one("SELECT last_error FROM steep_repl.nodes WHERE node_id = 'silent'", &[]).unwrap().get(0);
    assert!(why.contains("no answer"), "{why}");
    // A heartbeat on demand ends by the timeout, saying the peer did not answer; a cancel ends it sooner.
    let start = Instant::now();
    assert!(!ca.query_one("SELECT steep_repl.heartbeat('silent')", &[]).unwrap().get::<_, bool>(0));
    // Bounds far from the expected times (2 s, 0.3 s), so that a loaded machine does not fail them,
    // and far below a hang.
    assert!(start.elapsed() < Duration::from_secs(15), "heartbeat took {:?}", start.elapsed());
    ca.batch_execute("SET steep_repl.peer_timeout = 60; SET statement_timeout = 300").unwrap();
    let start = Instant::now();
    let e = err(&mut ca, "SELECT steep_repl.heartbeat('silent')");
    assert!(e.contains("statement timeout"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "cancel took {:?} (the peer timeout is 60 s)",
        start.elapsed()
    );
    // The server still shuts down promptly with a silent peer registered.
    let start = Instant::now();
    a.stop();
    assert!(start.elapsed() < Duration::from_secs(10), "shutdown took {:?}", start.elapsed());
}

#[test]
fn conninfos_with_passwords_are_refused_and_roles_see_only_status() {
    let c = preloaded();
    c.fresh_db("reg_rights", true);
    let mut s = c.client("reg_rights");
    for bad in [
        "host=localhost dbname=app password=hunter2",
        "postgresql://app:hunter2@localhost/app",
        "host=localhost password='hunter2' user=x",
    ] {
        let e = err(
            &mut s,
            &format!("SELECT steep_repl.register_node('p', conninfo => '{}')", bad.replace('\'', "''")),
        );
        assert!(e.contains("password"), "{e}");
        assert!(!e.contains("hunter2"), "the password is echoed: {e}");
    }
    let e = err(&mut s, "SELECT steep_repl.register_node('p', conninfo => 'host')");
    assert!(e.contains("invalid conninfo"), "{e}");
    let e = err(&mut s, "SELECT steep_repl.register_node('p')");
    assert!(e.contains("needs a conninfo"), "{e}");
    let e = err(&mut s, "SELECT steep_repl.register_node('bad id', is_local => true)");
    assert!(e.contains("invalid node id"), "{e}");
    register(&mut s, "here", None, true);
    let e = err(&mut s, "SELECT steep_repl.register_node('other', is_local => true)");
    assert!(e.contains("already the local node"), "{e}");
    register(&mut s, "peer", Some("host=/nonexistent port=1 dbname=x"), false);
    assert_eq!(s.query("SELECT FROM steep_repl.nodes", &[]).unwrap().len(), 2);

    s.batch_execute(
        "DROP ROLE IF EXISTS node_reader; CREATE ROLE node_reader LOGIN; \
         GRANT CONNECT ON DATABASE reg_rights TO node_reader",
    )
    .unwrap();
    let mut r = postgres::Client::connect(
        &c.conninfo_for("reg_rights").replace("user=postgres", "user=node_reader"),
        postgres::NoTls,
    )
    .unwrap();
    let e = err(&mut r, "SELECT * FROM steep_repl.nodes");
    assert!(e.contains("permission denied"), "{e}");
    for f in [
        "SELECT steep_repl.register_node('x', is_local => true)",
        "SELECT steep_repl.unregister_node('peer')",
        "SELECT steep_repl.heartbeat('peer')",
    ] {
        let e = err(&mut r, f);
        assert!(e.contains("permission denied"), "{f}: {e}");
    }
    // What PUBLIC may see: ids, names, status, timings, versions; never a conninfo or an error text.
    let rows = r.query("SELECT node_id, status FROM steep_repl.node_status()", &[]).unwrap();
    let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, ["here", "peer"]);
    let cols: Vec<String> = r.query("SELECT * FROM steep_repl.node_status('peer')", &[]).unwrap()[0]
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    assert!(!cols.iter().any(|c| c.contains("conninfo") || c.contains("error")), "{cols:?}");
    let h = r.query_one("SELECT node_id, peers_total FROM steep_repl.health()", &[]).unwrap();
    assert_eq!((h.get::<_, Option<String>>(0).as_deref(), h.get::<_, i64>(1)), (Some("here"), 1));
    s.batch_execute("DELETE FROM steep_repl.nodes").unwrap();
}

/// A fake PostgreSQL server: trusts anyone, then answers every query with a COPY (which leaves libpq
/// returning a COPY result forever) or, for `flood`, with endless rows of NULLs.
fn fake_server(flood: bool) -> u16 {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut len = [0u8; 4];
                if s.read_exact(&mut len).is_err() {
                    return;
                }
                let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                if s.read_exact(&mut startup).is_err() {
                    return;
                }
                // AuthenticationOk, ReadyForQuery (idle).
                let _ = s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I']);
                loop {
                    let mut tag = [0u8; 1];
                    if s.read_exact(&mut tag).is_err() || s.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                    if s.read_exact(&mut body).is_err() {
                        return;
                    }
                    if tag[0] != b'Q' {
                        continue;
                    }
                    if flood {
                        // RowDescription of one text column "x", then rows of one NULL, forever.
                        let mut rd = vec![b'T'];
                        let fields: Vec<u8> = [
                            &[0u8, 1][..],
                            b"x\0",
                            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 25, 255, 255, 255, 255, 255, 255, 0, 0],
                        ]
                        .concat();
                        rd.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
                        rd.extend_from_slice(&fields);
                        if s.write_all(&rd).is_err() {
                            return;
                        }
                        let row = [b'D', 0, 0, 0, 10, 0, 1, 255, 255, 255, 255];
                        let many: Vec<u8> = row.iter().copied().cycle().take(row.len() * 10_000).collect();
                        while s.write_all(&many).is_ok() {}
                        return;
                    }
                    // CopyOutResponse, text, no columns; then silence.
                    let _ = s.write_all(&[b'H', 0, 0, 0, 7, 0, 0, 0]);
                }
            });
        }
    });
    port
}

#[test]
fn a_hostile_peer_gets_an_error_not_a_hang() {
    let c = preloaded();
    c.fresh_db("hostile", true);
    let mut s = c.client("hostile");
    for (id, flood) in [("copier", false), ("flooder", true)] {
        let port = fake_server(flood);
        register(
            &mut s,
            id,
            Some(&format!("host=127.0.0.1 port={port} dbname=x user=x sslmode=disable gssencmode=disable")),
            false,
        );
        let start = Instant::now();
        let answered: bool = s.query_one("SELECT steep_repl.heartbeat($1)", &[&id]).unwrap().get(0);
        let took = start.elapsed();
        assert!(!answered, "{id} did not really answer");
        assert!(took < Duration::from_secs(30), "{id}: heartbeat took {took:?}");
        let why: String =
            s.query_one("SELECT last_error FROM steep_repl.nodes WHERE node_id = $1", &[&id]).unwrap().get(0);
        assert!(why.contains("unexpected answer") || why.contains("more than"), "{id}: {why}");
        // The session is still usable, and so is the server.
        assert_eq!(s.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0), 1);
    }
    s.batch_execute("DELETE FROM steep_repl.nodes").unwrap();
}

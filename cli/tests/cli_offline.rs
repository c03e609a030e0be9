//! Offline commands and usage: `snapshot verify` on a damaged snapshot (exit 7, every problem listed),
//! on an incomplete one, `snapshot inspect`, connection errors (exit 6, never a password), bad flags
//! (exit 2) and the help of every command.

mod harness;

use std::path::Path;

use harness::*;
use serde_json::Value;
use steep_repl_engine::manifest::Manifest;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A snapshot of three tables, written by the CLI in client mode.
fn snapshot(name: &str) -> std::path::PathBuf {
    let cluster = preloaded();
    let conninfo = cluster.fresh_db(name, false);
    cluster
        .client(name)
        .batch_execute(
            "CREATE TABLE a AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 20000) g;
             CREATE TABLE b AS SELECT g AS id FROM generate_series(1, 1000) g;
             CREATE TABLE c AS SELECT g AS id, repeat('x', 100) AS pad FROM generate_series(1, 3000) g;",
        )
        .unwrap();
    let dir = snapshot_path(name);
    let out = steep_repl(&[
        "snapshot",
        "generate",
        "--client",
        "--chunk-size",
        "64kB",
        "--output",
        path_str(&dir),
        "-d",
        &conninfo,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    dir
}

#[test]
fn verify_lists_every_problem_and_exits_7() {
    let dir = snapshot("cli_verify");
    let m = Manifest::load(&dir).unwrap();
    let out = steep_repl(&["snapshot", "verify", path_str(&dir)]);
    assert!(out.status.success(), "{}", stderr(&out));

    let a = m.tables.iter().find(|t| t.name == "a").unwrap();
    assert!(a.chunks.len() >= 3, "{}", a.chunks.len());
    let (truncated, flipped, deleted) =
        (a.chunks[0].path_in(&dir), a.chunks[1].path_in(&dir), a.chunks[2].path_in(&dir));
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let mut bytes = std::fs::read(&flipped).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&flipped, bytes).unwrap();
    std::fs::remove_file(&deleted).unwrap();
    std::fs::write(dir.join("data").join(&a.dir).join("stray.copy.zst"), b"junk").unwrap();

    for deep in [false, true] {
        let mut args = vec!["snapshot", "verify", path_str(&dir)];
        if deep {
            args.push("--deep");
        }
        let out = steep_repl(&args);
        assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("verification failed (4 problem(s))"), "{err}");
        for needle in [&a.chunks[0].file, &a.chunks[1].file, &a.chunks[2].file, &"stray.copy.zst".to_string()]
        {
            assert!(err.contains(needle.as_str()), "{needle} not named: {err}");
        }
        assert!(err.contains("truncated") && err.contains("CRC mismatch"), "{err}");
    }
    let out = steep_repl(&["snapshot", "verify", "--json", path_str(&dir)]);
    assert_eq!(out.status.code(), Some(7));
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["ok"], false);
    let kinds: Vec<&str> =
        v["problems"].as_array().unwrap().iter().map(|p| p["kind"].as_str().unwrap()).collect();
    for kind in ["size_mismatch", "file_crc_mismatch", "missing_chunk", "extra_file"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }

    // Without its manifest a snapshot is incomplete: verify and inspect both refuse it.
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let out = steep_repl(&["snapshot", "verify", path_str(&dir)]);
    assert_eq!(out.status.code(), Some(7));
    assert!(stderr(&out).contains("incomplete snapshot"), "{}", stderr(&out));
    let out = steep_repl(&["snapshot", "inspect", path_str(&dir)]);
    assert_eq!(out.status.code(), Some(7));
    assert!(stderr(&out).contains("incomplete snapshot"), "{}", stderr(&out));
}

#[test]
fn inspect_describes_tables_sizes_and_position() {
    let dir = snapshot("cli_inspect");
    let m = Manifest::load(&dir).unwrap();
    let out = steep_repl(&["snapshot", "inspect", path_str(&dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        m.snapshot_id.as_str(),
        "client mode",
        m.snapshot.lsn.as_str(),
        "3 tables",
        "\"public\".\"a\"",
        "zstd:1",
        "20,000",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let out = steep_repl(&["snapshot", "inspect", "--json", path_str(&dir)]);
    assert!(out.status.success());
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["totals"]["chunks"], m.totals.chunks);
    assert_eq!(v["source"]["database"], "cli_inspect");
    let a = v["tables"].as_array().unwrap().iter().find(|t| t["name"] == "a").unwrap();
    assert_eq!(a["rows"], 20000);
    assert!(a["ratio"].as_f64().unwrap() > 1.0, "{a}");
}

#[test]
fn an_unreachable_server_exits_6_without_printing_the_password() {
    let refused = "host=127.0.0.1 port=1 user=u dbname=d password=hunter2 connect_timeout=5";
    for args in [
        vec!["snapshot", "generate", "--output", "/tmp/never", "-d", refused],
        vec!["snapshot", "apply", "--input", "/tmp/never", "-d", refused],
        vec!["snapshot", "progress", "gen-0", "--follow", "-d", refused],
        vec!["snapshot", "list", "-d", refused],
        vec!["snapshot", "cancel", "gen-0", "-d", refused],
    ] {
        let out = steep_repl(&args);
        assert_eq!(out.status.code(), Some(6), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("cannot connect to host 127.0.0.1 port 1"), "{args:?}: {err}");
        assert!(!err.contains("hunter2") && !stdout(&out).contains("hunter2"), "password leaked: {err}");
    }
    assert!(!Path::new("/tmp/never").exists());
}

#[test]
fn bad_flags_exit_2() {
    let cases: &[&[&str]] = &[
        &["snapshot", "generate", "--output", "/x", "--direct", "--client"],
        &["snapshot", "generate", "--output", "/x", "--parallel", "0"],
        &["snapshot", "generate", "--output", "/x", "--parallel", "65"],
        &["snapshot", "generate", "--output", "/x", "--compression", "lz4"],
        &["snapshot", "generate", "--output", "/x", "--compression", "zstd:99"],
        &["snapshot", "generate", "--output", "/x", "--chunk-size", "1kB"],
        &["snapshot", "generate", "--output", "/x", "--table", "a.b.c"],
        &["snapshot", "generate", "--output", "/x", "--client", "--detach"],
        &["snapshot", "generate"],
        &["snapshot", "apply"],
        &["snapshot", "apply", "--input", "/x", "--resume", "app-1"],
        &["snapshot", "apply", "--resume", "app-1", "--client"],
        &["snapshot", "progress"],
        &["snapshot", "verify"],
        &["snapshot", "list", "--status", "sleeping"],
        &["snapshot", "frobnicate"],
        // In direct mode paths are on the server: a relative one is refused before connecting.
        &["snapshot", "generate", "--direct", "--output", "relative/dir", "-d", "host=127.0.0.1 port=1"],
        &["snapshot", "apply", "--direct", "--input", "relative/dir", "-d", "host=127.0.0.1 port=1"],
    ];
    for args in cases {
        let out = steep_repl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} says why");
    }
}

#[test]
fn every_command_has_help_with_an_example() {
    for cmd in [
        &["health"][..],
        &["snapshot", "generate"],
        &["snapshot", "apply"],
        &["snapshot", "progress"],
        &["snapshot", "list"],
        &["snapshot", "cancel"],
        &["snapshot", "verify"],
        &["snapshot", "inspect"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = steep_repl(&args);
        assert!(out.status.success(), "{args:?}");
        let text = stdout(&out);
        assert!(text.contains("steep-repl "), "{args:?} has an example:\n{text}");
        assert!(text.contains("Example"), "{args:?}:\n{text}");
    }
}

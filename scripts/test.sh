#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (scripts/setup.sh) and runs every test of steep-repl:
#   1. cargo fmt --check and cargo clippy -D warnings over the whole workspace
#   2. unit and property tests of the engine, fixtures and CLI
#   3. #[pg_test]s inside a PostgreSQL 15 started by `cargo pgrx test` (library preloaded)
#   4. integration tests on real clusters from scripts/pg.sh, with the extension installed into
#      PostgreSQL 15: the SQL API (it/tests) and the steep-repl binary end to end (cli/tests)
# Exits non-zero on the first failure; each runner prints its own summary.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n=== %s\n' "$*"; }

step "setup"
bash scripts/setup.sh

step "format"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "unit and property tests (engine, fixtures, cli)"
cargo test -p steep-repl-engine -p steep-repl-fixtures -p steep-repl-benches
cargo test -p steep-repl-cli --bins

step "pg_tests (cargo pgrx test pg15, library preloaded)"
pgtest_dir=$(mktemp -d /tmp/steep-repl-pgtest.XXXXXX)
chmod 755 "$pgtest_dir"; chown postgres "$pgtest_dir"
trap 'rm -rf "$pgtest_dir"' EXIT
# initdb refuses root: run the test cluster as the postgres OS user, in a fresh data dir.
cargo pgrx test pg15 -p steep_repl --runas postgres --pgdata "$pgtest_dir/data"

step "integration tests: SQL API on real clusters"
cargo pgrx install -p steep_repl --pg-config /usr/bin/pg_config
cargo test -p steep-repl-it

step "integration tests: the steep-repl binary end to end"
cargo test -p steep-repl-cli --tests

step "all tests passed"

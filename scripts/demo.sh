#!/usr/bin/env bash
# The first thing to run on a fresh Debian 12 machine: sets up, builds and installs the extension,
# starts a local PostgreSQL 15 cluster with steep_repl preloaded, creates the extension in database
# `demo`, and shows `steep-repl health`. A second run reuses what exists.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
echo "demo: building and installing the extension (release)"
cargo pgrx install --release -p steep_repl --pg-config /usr/bin/pg_config >/dev/null
cargo build --release -p steep-repl-cli
conninfo=$(bash scripts/pg.sh start demo)
echo "demo: cluster 'demo' running: $conninfo"
psql "$conninfo" -XqAt -c "SELECT 1 FROM pg_database WHERE datname = 'demo'" | grep -q 1 \
  || psql "$conninfo" -Xq -c "CREATE DATABASE demo"
demo_conn="${conninfo/dbname=postgres/dbname=demo}"
psql "$demo_conn" -Xq -c "CREATE EXTENSION IF NOT EXISTS steep_repl"
echo
./target/release/steep-repl health -d "$demo_conn"
echo
echo "demo: stop the cluster with: scripts/pg.sh stop demo   (or destroy it: scripts/pg.sh destroy demo)"

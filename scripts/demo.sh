#!/usr/bin/env bash
# The first thing to run on a fresh Debian 12 machine. It sets up (scripts/setup.sh), builds and installs
# the extension and the CLI (release), starts a local PostgreSQL 15 cluster `demo` with steep_repl
# preloaded (scripts/pg.sh), creates database `demo` from fixtures/sql/mixed.sql (about 1 GB of mixed
# tables: pgbench-like accounts, a wide mixed-type table, a TOAST-heavy table, a hundred small tables),
# then:
#   1. steep-repl snapshot generate --parallel 8 --direct      (the server's workers write the snapshot)
#   2. steep-repl snapshot apply into database demo_copy       (schema from pg_dump --schema-only)
#   3. checks that both databases hold the same rows: per table count(*) and an order-independent hash
#   4. prints a short summary: time, throughput, sizes, compression ratio
# The cluster is configured for a bulk load first (max_wal_size, checkpoint_timeout, maintenance_work_mem,
# shared_buffers), and says so.
# A second run reuses the cluster and the demo database (rebuilt only when its scale changes).
#
#   bash scripts/demo.sh [--scale N]      N: fixture scale, default 30 (about 1 GB on disk, 0.7 GB of COPY text)
#
# STEEP_DEMO_SKIP_BUILD=1 skips setup and the extension's installation (when both are done already);
# STEEP_PG_BASE moves the cluster (default /tmp/steep-repl-pg).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scale=30
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) scale="$2"; shift ;;
    *) echo "usage: bash scripts/demo.sh [--scale N]" >&2; exit 2 ;;
  esac
  shift
done
[[ "$scale" =~ ^[1-9][0-9]*$ ]] || { echo "demo: --scale must be a positive whole number" >&2; exit 2; }

say() { printf '\ndemo: %s\n' "$*"; }
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

if [ "${STEEP_DEMO_SKIP_BUILD:-0}" != 1 ]; then
  bash scripts/setup.sh
  say "building and installing the extension (release; the first build takes several minutes)"
  cargo pgrx install --release -p steep_repl --pg-config /usr/bin/pg_config >/dev/null
fi
say "building the CLI (release)"
cargo build --release -p steep-repl-cli
cli=./target/release/steep-repl

base="${STEEP_PG_BASE:-/tmp/steep-repl-pg}"
# Prepared as a DBA prepares a server for a bulk load. With the defaults (max_wal_size = 1GB,
# checkpoint_timeout = 5min) the apply below forces a checkpoint every ~540 MB of WAL and runs at a
# fraction of its speed ("checkpoints are occurring too frequently" in the log); start_apply warns, naming
# the setting, when a server is not prepared.
export STEEP_PG_CONF="max_wal_size = 8GB
checkpoint_timeout = 30min
maintenance_work_mem = 512MB
shared_buffers = 1GB"
conninfo=$(bash scripts/pg.sh start demo)
say "cluster 'demo' running: $conninfo"
say "configured for a bulk load: $(printf '%s' "$STEEP_PG_CONF" | paste -sd, - | sed 's/,/, /g') (the defaults would force a checkpoint every ~540 MB of WAL during the apply)"
db() { echo "${conninfo/dbname=postgres/dbname=$1}"; }
q() { PGOPTIONS="-c client_min_messages=warning" psql "$(db "$1")" -XqAt -v ON_ERROR_STOP=1 -c "$2"; }

# --- the source database, built once per scale ---------------------------------------------------
marker="steep-repl demo mixed.sql scale $scale"
current=$(q postgres "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = 'demo'")
if [ "$current" = "$marker" ]; then
  say "reusing database demo ($marker)"
else
  say "creating database demo from fixtures/sql/mixed.sql, scale $scale (a few minutes)"
  q postgres "DROP DATABASE IF EXISTS demo WITH (FORCE)"
  q postgres "CREATE DATABASE demo"
  psql "$(db demo)" -Xq -v ON_ERROR_STOP=1 -v scale="$scale" -f fixtures/sql/mixed.sql >/dev/null
  q demo "CREATE EXTENSION steep_repl"
  q demo "VACUUM (ANALYZE)"
  q postgres "COMMENT ON DATABASE demo IS '$marker'"
fi
q demo "CREATE EXTENSION IF NOT EXISTS steep_repl"
db_size=$(q demo "SELECT pg_database_size('demo')")
echo
$cli health -d "$(db demo)"

# --- 1. generate -------------------------------------------------------------------------------
work="$base/demo-work"
mkdir -p "$work"; chmod 777 "$work"     # the server's postgres user writes the snapshot here
snap="$work/snapshot"
rm -rf "$snap"
# The planner shrinks chunks below the 256MB default for a database this small, so all 8 workers get work.
say "steep-repl snapshot generate --parallel 8 --direct --output $snap"
t0=$(now)
$cli snapshot generate --parallel 8 --direct --output "$snap" -d "$(db demo)"
gen_s=$(secs "$t0" "$(now)")
$cli snapshot verify "$snap"

# --- 2. apply into a fresh copy of the schema ---------------------------------------------------
say "creating database demo_copy with demo's schema (pg_dump --schema-only | psql)"
q postgres "DROP DATABASE IF EXISTS demo_copy WITH (FORCE)"
q postgres "CREATE DATABASE demo_copy"
pg_dump --schema-only "$(db demo)" | psql "$(db demo_copy)" -Xq -v ON_ERROR_STOP=1 >/dev/null
say "steep-repl snapshot apply --parallel 8 --input $snap"
t0=$(now)
$cli snapshot apply --parallel 8 --input "$snap" -d "$(db demo_copy)"
apply_s=$(secs "$t0" "$(now)")

# --- 3. same rows on both sides ----------------------------------------------------------------
say "comparing every table: count(*) and an order-independent hash of its rows"
check_sql=$(q demo "SELECT string_agg(format(
    'SELECT %L AS t, count(*) AS n, md5(string_agg(md5(x::text), '''' ORDER BY md5(x::text))) AS h FROM %I.%I x',
    n.nspname || '.' || c.relname, n.nspname, c.relname), E'\nUNION ALL ' ORDER BY n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'steep_repl')
    AND n.nspname !~ '^pg_toast'")
src_sums=$(psql "$(db demo)" -XqAt -v ON_ERROR_STOP=1 -c "$check_sql ORDER BY 1")
dst_sums=$(psql "$(db demo_copy)" -XqAt -v ON_ERROR_STOP=1 -c "$check_sql ORDER BY 1")
tables=$(printf '%s\n' "$src_sums" | wc -l)
if [ "$src_sums" != "$dst_sums" ]; then
  echo "demo: MISMATCH between demo and demo_copy:" >&2
  diff <(printf '%s\n' "$src_sums") <(printf '%s\n' "$dst_sums") >&2 || true
  exit 1
fi
rows=$(printf '%s\n' "$src_sums" | awk -F'|' '{s += $2} END {print s}')
echo "demo: all $tables tables match ($rows rows)"

# --- 4. summary --------------------------------------------------------------------------------
inspect=$($cli snapshot inspect --json "$snap")
field() { printf '%s' "$inspect" | grep -o "\"totals\":{[^}]*}" | grep -o "\"$1\":[0-9]*" | cut -d: -f2; }
raw=$(field raw_bytes); file=$(field file_bytes); chunks=$(field chunks)
mb() { echo "scale=1; $1 / 1048576" | bc; }
rate() { echo "scale=1; $1 / 1000000 / $2" | bc; }
say "summary"
printf '  %-22s %s MiB on disk, %s tables, %s rows\n' "source database" "$(mb "$db_size")" "$tables" "$rows"
printf '  %-22s %s chunks, %s MiB of COPY text -> %s MiB written (ratio %s)\n' "snapshot" "$chunks" \
  "$(mb "$raw")" "$(mb "$file")" "$(echo "scale=2; $raw / $file" | bc)"
printf '  %-22s %6.1f s   %s MB/s of COPY text\n' "generate (8 workers)" "$gen_s" "$(rate "$raw" "$gen_s")"
printf '  %-22s %6.1f s   %s MB/s of COPY text\n' "apply (8 workers)" "$apply_s" "$(rate "$raw" "$apply_s")"
echo
echo "demo: snapshot in $snap; look inside with: $cli snapshot inspect $snap"
echo "demo: stop the cluster with: scripts/pg.sh stop demo   (or destroy it: scripts/pg.sh destroy demo)"

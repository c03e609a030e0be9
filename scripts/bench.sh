#!/usr/bin/env bash
# Side-by-side benchmarks of steep-repl against its peers, in one run, on one local cluster.
#
#   scripts/bench.sh [generate|apply|client|copy|ready|many|schema|replica|overlap|merge|all] [--mixed-scale N]
#                    [--onebig-scale N] [--wide-scale N] [--many-tables N] [--schema-tables N] [--parallel N]
#                    [--overlap-rows N] [--merge-rows N] [--rounds N] [--keep]
#
#   generate  start_snapshot(parallel => N) to completion   vs  pg_dump -Fd -j N -Z 1
#   apply     start_apply(parallel => N, analyze_tables => false)  vs  pg_restore -j N --data-only
#             both into the same pre-created schema with its indexes and keys (emptied in between);
#             steep-repl's time includes building the indexes it deferred; then the time until a target is
#             ready: into an empty database, pg_dump --schema-only | psql and start_apply (with ANALYZE)
#             vs pg_restore -j N of the same dump (schema, data, indexes, constraints; no ANALYZE)
#   client    steep-repl snapshot generate --client --parallel N (the CLI runs the engine)  vs  pg_dump
#             (mixed database only)
#   copy      a full copy: direct generate then apply  vs  pgcopydb copy table-data --table-jobs N,
#             into the same pre-created schema (mixed database only)
#   ready     a ready copy into an empty database (schema, data, indexes, constraints; ANALYZE for ours and
#             pgcopydb): pg_dump --schema-only | psql, start_snapshot (staged uncompressed, as replica init
#             stages it when the directory has room), start_apply  vs  pg_dump -Fd -j N -Z 1 then
#             pg_restore -j N  vs  pgcopydb clone --table-jobs N --index-jobs N. Not part of `all`.
#   schema    schema fingerprints of a database of --schema-tables tables (default 10 000, 3 indexes each;
#             fixtures/sql/fingerprint.sql): schema_fingerprint() vs pg_dump --schema-only, and
#             compare_schema() against a copy vs pg_dump --schema-only of both and diff
#   many      a database of --many-tables small tables (default 20 000, 20 rows each; fixtures/sql/many.sql):
#             start_snapshot vs pg_dump -Fd -j N -Z 1 -a, then start_apply vs pg_restore -j N --data-only
#             into the same pre-created schema (a fresh copy of it for every run). Not part of `all`.
#   overlap   overlap analysis between two databases of the cluster (`ovl_a`, and `ovl_b` made from it as
#             a template), each holding a pgbench_accounts-like table of --overlap-rows rows (default 10
#             million) and the mixed
#             dataset: start_overlap(parallel => N) with the tables identical, then with 0.1% of the rows
#             of every table changed on one side (scattered), then 50%; wall time, bytes exchanged, and
#             the CPU floor (COPY every compared table TO '/dev/null' on both sides, divided by the
#             cores). Not part of `all`.
#   merge     start_merge(prefer-local) between two databases made from one holding a --merge-rows-row
#             (default 1 million) pgbench_accounts-like table, the peer with 100 000 rows updated and
#             100 000 inserted, whole (comparison included)  vs  COPY of the same 200 000 rows into an
#             empty table of the same shape. Not part of `all`.
#   replica   a logical replica from start until caught up, source and target on two clusters (the second,
#             `bench_target`, started like the first): steep-repl replica init --parallel N (snapshot with a
#             slot, apply, hand-off, catch-up)  vs  CREATE SUBSCRIPTION ... (copy_data = true, defaults) until
#             every table is ready and the subscription has caught up; same pre-created schema, on the
#             mixed and onebig datasets; also replica init --compression zstd:1 (the default, auto, stages
#             the snapshot uncompressed when DIR has room). Not part of `all`.
#
# Datasets (fixtures/sql): `mixed` (pgbench-like accounts, a wide mixed-type table, a TOAST-heavy table,
# a hundred small tables), `onebig` (one large table) and `wide` (pgbench at scale 50 and a 3-million-row
# table of jsonb, numeric, arrays, bytea and more, where type input dominates a load), scaled to take tens
# of seconds here. `generate`, `client` and `copy` use mixed and onebig. Data is
# VACUUM FREEZE ANALYZEd and prewarmed into shared_buffers before timing, so every tool reads the same
# warm pages. Each measurement runs --rounds times (default 3), alternating the tools run by run so
# that a drift of the machine's speed hits both alike; each tool's fastest run and its median run are
# reported (ratios of both), and every run is printed. Prints wall times, ratios and output sizes, and appends them to target/bench/results.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

what=all; overlap_rows=10000000; merge_rows=1000000; mixed_scale=64; onebig_scale=40; wide_scale=50; many_tables=20000; schema_tables=10000; parallel=2; rounds=3; keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    generate|apply|client|copy|ready|many|schema|replica|overlap|merge|all) what="$1" ;;
    --mixed-scale) mixed_scale="$2"; shift ;;
    --wide-scale) wide_scale="$2"; shift ;;
    --onebig-scale) onebig_scale="$2"; shift ;;
    --many-tables) many_tables="$2"; shift ;;
    --overlap-rows) overlap_rows="$2"; shift ;;
    --merge-rows) merge_rows="$2"; shift ;;
    --schema-tables) schema_tables="$2"; shift ;;
    --parallel) parallel="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --keep) keep=1 ;;
    *) echo "usage: scripts/bench.sh [generate|apply|client|copy|ready|many|schema|replica|overlap|merge|all] [--mixed-scale N] [--onebig-scale N] [--wide-scale N] [--many-tables N] [--schema-tables N] [--parallel N] [--overlap-rows N] [--merge-rows N] [--rounds N] [--keep]" >&2; exit 2 ;;
  esac
  shift
done
case "$rounds" in ''|*[!0-9]*|0) echo "bench: --rounds wants a positive number, not '$rounds'" >&2; exit 2 ;; esac

bash scripts/setup.sh >/dev/null
if [ "${STEEP_BENCH_SKIP_BUILD:-0}" != 1 ]; then
  echo "bench: building and installing the extension (release)"
  cargo pgrx install --release -p steep_repl --pg-config /usr/bin/pg_config >/dev/null
fi
cargo build --release -q -p steep-repl-cli
cli="$PWD/target/release/steep-repl"

export STEEP_PG_BASE="${STEEP_BENCH_BASE:-/tmp/steep-repl-bench}"
# max_locks_per_transaction: a snapshot of many tables holds a lock on each (pg_dump too), and PostgreSQL's
# lock table holds max_locks_per_transaction x (max_connections + ...) locks: 1024 covers 100 000 tables.
export STEEP_PG_CONF="shared_buffers = 3GB
max_wal_size = 16GB
checkpoint_timeout = 30min
maintenance_work_mem = 512MB
max_locks_per_transaction = 1024"
conn=$(bash scripts/pg.sh start bench)
db() { echo "${conn/dbname=postgres/dbname=$1}"; }
q() { psql "$(db "$1")" -XqAt -v ON_ERROR_STOP=1 -c "$2"; }
now() { date +%s.%N; }
work="$STEEP_PG_BASE/work"
mkdir -p "$work"; chmod 777 "$work"
results=target/bench/results.txt
mkdir -p target/bench

ensure_dataset() { # name sqlfile scale
  local name=$1 file=$2 scale=$3 marker
  marker=$(q postgres "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '$name'" || true)
  if [ "$marker" = "steep-repl bench $file scale $scale" ]; then return; fi
  echo "bench: building dataset $name ($file, scale $scale)"
  q postgres "DROP DATABASE IF EXISTS $name WITH (FORCE)"
  q postgres "CREATE DATABASE $name"
  psql "$(db "$name")" -Xq -v ON_ERROR_STOP=1 -v scale="$scale" -f "fixtures/sql/$file" >/dev/null
  q "$name" "CREATE EXTENSION steep_repl"
  q "$name" "VACUUM (FREEZE, ANALYZE)"
  q postgres "COMMENT ON DATABASE $name IS 'steep-repl bench $file scale $scale'"
}

prewarm() {
  q "$1" "CREATE EXTENSION IF NOT EXISTS pg_prewarm"
  q "$1" "SELECT sum(pg_prewarm(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND c.relkind IN ('r', 't', 'i')" >/dev/null
}

time_ours_generate() { # db outdir
  rm -rf "$2"
  local t0 id status
  t0=$(now)
  id=$(q "$1" "SELECT steep_repl.start_snapshot('$2', parallel => $parallel)")
  status=$(q "$1" "SELECT status || coalesce(': ' || error, '') FROM steep_repl.wait_snapshot('$id')")
  [ "$status" = complete ] || { echo "bench: steep-repl generate failed: $status" >&2; exit 1; }
  echo "$(now) - $t0" | bc
}

time_pg_dump() { # db outdir [extra pg_dump options]
  rm -rf "$2"
  local t0; t0=$(now)
  pg_dump -Fd -j "$parallel" -Z 1 ${3:-} -f "$2" -d "$(db "$1")"
  echo "$(now) - $t0" | bc
}

empty_target() { # target db
  if [ "$(q postgres "SELECT count(*) FROM pg_database WHERE datname = '${1}_tpl'")" = 1 ]; then
    # A schema of many tables: a fresh copy of it is faster than truncating every table.
    q postgres "DROP DATABASE IF EXISTS $1 WITH (FORCE)"
    q postgres "CREATE DATABASE $1 TEMPLATE ${1}_tpl STRATEGY FILE_COPY"
    return
  fi
  q "$1" "$EMPTY_TABLES_SQL"
  q "$1" "CHECKPOINT"
}

# Empties every user table and steep_repl's history of operations and hand-offs (run in one database).
EMPTY_TABLES_SQL="DO \$\$ DECLARE r record; BEGIN
  FOR r IN SELECT format('%I.%I', schemaname, tablename) AS t FROM pg_tables
           WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'steep_repl') LOOP
    EXECUTE 'TRUNCATE ' || r.t;
  END LOOP;
  DELETE FROM steep_repl.snapshots; DELETE FROM steep_repl.subscriptions; END \$\$"

# WAL pages that backends had to write themselves because the WAL buffers were full (pg_stat_wal).
wal_full() { q "$1" "SELECT wal_buffers_full FROM pg_stat_wal"; }

time_ours_apply() { # target snapdir
  empty_target "$1"
  local t0 id status w0
  w0=$(wal_full "$1")
  t0=$(now)
  id=$(q "$1" "SELECT steep_repl.start_apply('$2', parallel => $parallel, analyze_tables => false)")
  status=$(q "$1" "SELECT status || coalesce(': ' || error, '') FROM steep_repl.wait_snapshot('$id')")
  [ "$status" = applied ] || { echo "bench: steep-repl apply failed: $status" >&2; exit 1; }
  echo "$(now) - $t0" | bc
  sleep 1 # backends report WAL statistics at most once a second
  echo $(( $(wal_full "$1") - w0 )) > "$work/wal_full.ours"
}

time_pg_restore() { # target dumpdir
  empty_target "$1"
  local t0 w0; w0=$(wal_full "$1"); t0=$(now)
  pg_restore -j "$parallel" --data-only -d "$(db "$1")" "$2"
  echo "$(now) - $t0" | bc
  sleep 1
  echo $(( $(wal_full "$1") - w0 )) > "$work/wal_full.peer"
}

time_ours_apply_ready() { # source target snapdir: schema into an empty database, then apply with ANALYZE
  fresh_target "$2"
  local t0 id status; t0=$(now)
  pg_dump --schema-only -d "$(db "$1")" | psql "$(db "$2")" -Xq -v ON_ERROR_STOP=1 >/dev/null
  id=$(q "$2" "SELECT steep_repl.start_apply('$3', parallel => $parallel)")
  status=$(q "$2" "SELECT status || coalesce(': ' || error, '') FROM steep_repl.wait_snapshot('$id')")
  [ "$status" = applied ] || { echo "bench: steep-repl apply failed: $status" >&2; exit 1; }
  echo "$(now) - $t0" | bc
}

time_pg_restore_full() { # target dumpdir: the whole dump into an empty database
  fresh_target "$1"
  local t0; t0=$(now)
  pg_restore -j "$parallel" -d "$(db "$1")" "$2"
  echo "$(now) - $t0" | bc
}

time_ours_client() { # db outdir
  rm -rf "$2"
  local t0; t0=$(now)
  "$cli" snapshot generate --client --parallel "$parallel" --output "$2" -d "$(db "$1")" >/dev/null 2>&1 \
    || { echo "bench: steep-repl client generate failed" >&2; exit 1; }
  echo "$(now) - $t0" | bc
}

time_ours_copy() { # source target snapdir
  empty_target "$2"
  rm -rf "$3"
  local t0 id status
  t0=$(now)
  id=$(q "$1" "SELECT steep_repl.start_snapshot('$3', parallel => $parallel)")
  status=$(q "$1" "SELECT status || coalesce(': ' || error, '') FROM steep_repl.wait_snapshot('$id')")
  [ "$status" = complete ] || { echo "bench: steep-repl generate failed: $status" >&2; exit 1; }
  id=$(q "$2" "SELECT steep_repl.start_apply('$3', parallel => $parallel, analyze_tables => false)")
  status=$(q "$2" "SELECT status || coalesce(': ' || error, '') FROM steep_repl.wait_snapshot('$id')")
  [ "$status" = applied ] || { echo "bench: steep-repl apply failed: $status" >&2; exit 1; }
  echo "$(now) - $t0" | bc
}

uri() { echo "postgresql://postgres@127.0.0.1:$(cat "$STEEP_PG_BASE/bench/port")/$1"; }

time_pgcopydb() { # source target workdir
  empty_target "$2"
  rm -rf "$3"
  local t0; t0=$(now)
  pgcopydb copy table-data --source "$(uri "$1")" --target "$(uri "$2")" --table-jobs "$parallel" \
    --dir "$3" >"$3.log" 2>&1 || { echo "bench: pgcopydb failed (log: $3.log)" >&2; tail -5 "$3.log" >&2; exit 1; }
  echo "$(now) - $t0" | bc
}

fresh_target() { # db: an empty database of that name; every tool then starts with nothing left to write
  q postgres "DROP DATABASE IF EXISTS $1 WITH (FORCE)"
  q postgres "CREATE DATABASE $1"
  q postgres CHECKPOINT
  sync
}

time_ours_ready() { # source target snapdir
  fresh_target "$2"
  rm -rf "$3"
  local t0 id status
  t0=$(now)
  pg_dump --schema-only -d "$(db "$1")" | psql "$(db "$2")" -Xq -v ON_ERROR_STOP=1 >/dev/null
  id=$(q "$1" "SELECT steep_repl.start_snapshot('$3', parallel => $parallel, compression => 'none')")
  status=$(q "$1" "SELECT status || coalesce(': ' || error, '') FROM steep_repl.wait_snapshot('$id')")
  [ "$status" = complete ] || { echo "bench: steep-repl generate failed: $status" >&2; exit 1; }
  id=$(q "$2" "SELECT steep_repl.start_apply('$3', parallel => $parallel)")
  status=$(q "$2" "SELECT status || coalesce(': ' || error, '') FROM steep_repl.wait_snapshot('$id')")
  [ "$status" = applied ] || { echo "bench: steep-repl apply failed: $status" >&2; exit 1; }
  echo "$(now) - $t0" | bc
}

time_dump_restore_ready() { # source target dumpdir
  fresh_target "$2"
  rm -rf "$3"
  local t0; t0=$(now)
  pg_dump -Fd -j "$parallel" -Z 1 -f "$3" -d "$(db "$1")"
  pg_restore -j "$parallel" -d "$(db "$2")" "$3"
  echo "$(now) - $t0" | bc
}

time_pgcopydb_ready() { # source target workdir
  fresh_target "$2"
  rm -rf "$3"
  local t0; t0=$(now)
  pgcopydb clone --source "$(uri "$1")" --target "$(uri "$2")" --table-jobs "$parallel" --index-jobs "$parallel" \
    --dir "$3" >"$3.log" 2>&1 || { echo "bench: pgcopydb clone failed (log: $3.log)" >&2; tail -5 "$3.log" >&2; exit 1; }
  echo "$(now) - $t0" | bc
}

min() { echo "if ($1 < $2) $1 else $2" | bc; }
# median "12.3s, 10.1s, 11.0s": the middle run (the lower middle of an even count).
median() { printf '%s\n' "$1" | tr ',' '\n' | tr -d ' s' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# alternate "OURS COMMAND" "PEER COMMAND": runs them one after the other, $rounds times, each after a
# sync (untimed). Sets a and b (each one's fastest wall time) and runs_a and runs_b (every run, in order).
alternate() {
  local i x y
  a=""; b=""; runs_a=""; runs_b=""
  for i in $(seq 1 "$rounds"); do
    # Each run starts with nothing of the previous one left to write out: the write-back of the other
    # tool's output (tens of thousands of files for `many`) would otherwise fall into this run's time,
    # and into steep-repl's syncfs.
    sync; x=$(eval "$1")
    sync; y=$(eval "$2")
    runs_a="$runs_a${runs_a:+, }${x}s"; runs_b="$runs_b${runs_b:+, }${y}s"
    if [ -z "$a" ]; then a=$x; b=$y; else a=$(min "$a" "$x"); b=$(min "$b" "$y"); fi
  done
}
# alternate3 "OURS" "PEER B" "PEER C": as alternate, for three tools; also sets c and runs_c.
alternate3() {
  local i x y z
  a=""; b=""; c=""; runs_a=""; runs_b=""; runs_c=""
  for i in $(seq 1 "$rounds"); do
    sync; x=$(eval "$1")
    sync; y=$(eval "$2")
    sync; z=$(eval "$3")
    runs_a="$runs_a${runs_a:+, }${x}s"; runs_b="$runs_b${runs_b:+, }${y}s"; runs_c="$runs_c${runs_c:+, }${z}s"
    if [ -z "$a" ]; then a=$x; b=$y; c=$z; else a=$(min "$a" "$x"); b=$(min "$b" "$y"); c=$(min "$c" "$z"); fi
  done
}
ratio() { echo "scale=3; $1 / $2" | bc; }
# "best X.XXXx, median Y.YYYx" of the last alternate/alternate3 for tools a and b (or c, given "c").
ratios() {
  local other_best=$b other_runs=$runs_b
  if [ "${1:-b}" = c ]; then other_best=$c; other_runs=$runs_c; fi
  echo "best $(ratio "$a" "$other_best")x, median $(ratio "$(median "$runs_a")" "$(median "$other_runs")")x"
}
size() { du -sb "$1" | cut -f1; }
mb() { echo "scale=1; $1 / 1048576" | bc; }

report() { printf '%s\n' "$*" | tee -a "$results"; }
report ""
report "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) steep-repl bench: $what, parallel $parallel, $(nproc) cores, PostgreSQL $(q postgres 'SHOW server_version')"

bench_many() {
  local dbname=bench_many target=bench_many_target ours_dir="$work/many.steep" dump_dir="$work/many.dump"
  ensure_dataset "$dbname" many.sql "$many_tables"
  q "$dbname" "DROP EXTENSION IF EXISTS steep_repl CASCADE; CREATE EXTENSION steep_repl"
  local marker; marker="steep-repl bench many target $many_tables"
  if [ "$(q postgres "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '${target}_tpl'" || true)" != "$marker" ]; then
    echo "bench: building the empty target schema of $many_tables tables"
    q postgres "DROP DATABASE IF EXISTS ${target}_tpl"
    q postgres "CREATE DATABASE ${target}_tpl"
    pg_dump --schema-only -d "$(db "$dbname")" | psql "$(db "${target}_tpl")" -Xq -v ON_ERROR_STOP=1 >/dev/null
    q postgres "COMMENT ON DATABASE ${target}_tpl IS '$marker'"
  fi
  q "${target}_tpl" "DROP EXTENSION IF EXISTS steep_repl CASCADE; CREATE EXTENSION steep_repl"
  prewarm "$dbname"
  # Every run writes a new directory, and all are removed at the end: removing tens of thousands of
  # files and directories just before a run makes ext4 skip its recently freed inodes for a while, which
  # slowed the next run's file creation (ours two per table, pg_dump's one) by up to 5x here.
  rm -rf "$work"/many.run.*
  alternate 'time_ours_generate "$dbname" "$(fresh_dir ours)"' 'time_pg_dump "$dbname" "$(fresh_dir dump)" -a'
  ours_dir=$(cat "$work/many.last.ours"); dump_dir=$(cat "$work/many.last.dump")
  report "generate many ($many_tables tables of 20 rows):"
  report "  steep-repl start_snapshot  ${a}s (runs $runs_a)  output $(mb "$(size "$ours_dir")") MB"
  report "  pg_dump -Fd -j$parallel -Z1 -a   ${b}s (runs $runs_b)  output $(mb "$(size "$dump_dir")") MB"
  report "  ratio steep-repl / pg_dump: $(ratio "$a" "$b")x"
  alternate 'time_ours_apply "$target" "$ours_dir"' 'time_pg_restore "$target" "$dump_dir"'
  report "apply many ($many_tables tables of 20 rows, into the pre-created schema):"
  report "  steep-repl start_apply     ${a}s (runs $runs_a)"
  report "  pg_restore -j$parallel --data-only ${b}s (runs $runs_b)"
  report "  ratio steep-repl / pg_restore: $(ratio "$a" "$b")x"
  [ "$keep" = 1 ] || rm -rf "$work"/many.run.*
}

# A path for one run's output, new (it does not exist yet), remembered as the last of its kind.
fresh_dir() { # ours|dump
  local d; d=$(mktemp -u "$work/many.run.$1.XXXXXX")
  echo "$d" > "$work/many.last.$1"
  echo "$d"
}

bench_schema() {
  local a_db=bench_schema b_db=bench_schema_copy
  ensure_dataset "$a_db" fingerprint.sql "$schema_tables"
  q "$a_db" "DROP EXTENSION IF EXISTS steep_repl CASCADE; CREATE EXTENSION steep_repl"
  q postgres "DROP DATABASE IF EXISTS $b_db WITH (FORCE)"
  q postgres "CREATE DATABASE $b_db TEMPLATE $a_db"
  local objects; objects=$(q "$a_db" "SELECT count(*) FROM steep_repl.schema_fingerprint()")
  local indexes; indexes=$(q "$a_db" "SELECT count(*) FROM pg_index x JOIN pg_class c ON c.oid = x.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'fp'")
  # Statements the server ran for one fingerprint: the function's own statement counts are in
  # pg_stat_user_functions only for SQL functions, so count what it runs through SPI by design: one.
  alternate 'time_sql "$a_db" "SELECT count(*) FROM steep_repl.schema_fingerprint()"' \
            'time_cmd pg_dump --schema-only -d "$(db "$a_db")" -f "$work/schema.a.sql"'
  report "schema fingerprint ($schema_tables tables, $indexes indexes, $objects objects, 1 catalog query):"
  report "  steep-repl schema_fingerprint()  ${a}s (runs $runs_a)"
  report "  pg_dump --schema-only           ${b}s (runs $runs_b)"
  report "  ratio steep-repl / pg_dump: $(ratio "$a" "$b")x"
  alternate 'time_sql "$a_db" "SELECT count(*) FROM steep_repl.compare_schema('"'"'$(db "$b_db")'"'"')"' \
            'time_cmd bash -c "pg_dump --schema-only -d \"$(db "$a_db")\" -f \"$work/schema.a.sql\" & pg_dump --schema-only -d \"$(db "$b_db")\" -f \"$work/schema.b.sql\"; wait; diff -q \"$work/schema.a.sql\" \"$work/schema.b.sql\" >/dev/null || true"'
  report "schema compare (two databases of $schema_tables tables, identical):"
  report "  steep-repl compare_schema()     ${a}s (runs $runs_a)"
  report "  pg_dump --schema-only x2 + diff ${b}s (runs $runs_b)"
  report "  ratio steep-repl / pg_dump+diff: $(ratio "$a" "$b")x"
  rm -f "$work"/schema.*.sql
}

time_sql() { # db sql
  local t0; t0=$(now)
  q "$1" "$2" >/dev/null
  echo "$(now) - $t0" | bc
}

time_cmd() { # command...
  local t0; t0=$(now)
  "$@" >/dev/null
  echo "$(now) - $t0" | bc
}

# The second cluster, for replica: the same settings as the first.
target_conn() { # db
  local c; c=$(bash scripts/pg.sh url bench_target)
  echo "${c/dbname=postgres/dbname=$1}"
}
tq() { psql "$(target_conn "$1")" -XqAt -v ON_ERROR_STOP=1 -c "$2"; }

# Empties the replica database: no subscription, empty tables, no steep_repl history; and the source:
# no slot left by an earlier run.
reset_replica() { # source_db replica_db
  local sub
  for sub in $(tq "$2" "SELECT subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid WHERE d.datname = current_database()"); do
    tq "$2" "DROP SUBSCRIPTION $sub"
  done
  q "$1" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'bench\_%' AND NOT active" >/dev/null
  tq "$2" "$EMPTY_TABLES_SQL"
  tq "$2" "CHECKPOINT"
  q "$1" "DELETE FROM steep_repl.snapshots"
}

time_ours_replica() { # source_db replica_db dir [compression; default: the command's own (auto)]
  reset_replica "$1" "$2"
  rm -rf "$3"
  local t0; t0=$(now)
  "$cli" replica init --direct --source "$(db "$1")" --target "$(target_conn "$2")" --dir "$3" \
    --parallel "$parallel" --compression "${4:-auto}" --subscription bench_ours --publication bench_pub >"$work/replica-${4:-auto}.log" 2>&1 \
    || { echo "bench: steep-repl replica init failed:" >&2; tail -5 "$work/replica-${4:-auto}.log" >&2; exit 1; }
  echo "$(now) - $t0" | bc
}

time_native_replica() { # source_db replica_db
  reset_replica "$1" "$2"
  local t0 goal; t0=$(now)
  tq "$2" "CREATE SUBSCRIPTION bench_native CONNECTION '$(db "$1")' PUBLICATION bench_pub"
  while :; do
    if [ "$(tq "$2" "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = 'bench_native' AND r.srsubstate <> 'r'")" = 0 ]; then
      goal=${goal:-$(q "$1" "SELECT pg_current_wal_lsn()")}
      [ "$(tq "$2" "SELECT coalesce(latest_end_lsn >= '$goal', false) FROM pg_stat_subscription WHERE subname = 'bench_native' AND relid IS NULL")" = t ] && break
    fi
    sleep 0.1
  done
  echo "$(now) - $t0" | bc
}

# Overlap analysis: ovl_a holds the datasets; ovl_b is a copy of it (CREATE DATABASE ... TEMPLATE) with
# a share of the rows changed. Each run of start_overlap is timed to its end (wait_snapshot).
overlap_changes() { # db modulus: change the rows whose key is a multiple of the modulus in every table
  local m=$2 i sql
  sql="UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % $m = 0;
       UPDATE accounts SET abalance = abalance + 1 WHERE aid % $m = 0;
       UPDATE orders SET amount = amount + 1 WHERE id % $m = 0;
       UPDATE documents SET title = title || 'x' WHERE id % $m = 0;"
  for i in $(seq -w 1 100); do
    if [ "$m" -ge 1000 ]; then sql="$sql UPDATE small_$i SET label = label || 'x' WHERE id = $(( (10#$i * 7) % 1000 + 1 ));"
    else sql="$sql UPDATE small_$i SET label = label || 'x' WHERE id % $m = 0;"; fi
  done
  q "$1" "$sql"
  q "$1" "VACUUM"
}
time_ours_overlap() { # db peer_db: prints seconds; leaves the id in $work/overlap.id
  local t0 id status
  t0=$(now)
  id=$(q "$1" "SELECT steep_repl.start_overlap('$(db "$2")', parallel => $parallel)")
  status=$(q "$1" "SELECT status FROM steep_repl.wait_snapshot('$id')")
  [ "$status" = complete ] || { echo "bench: overlap $id ended $status: $(q "$1" "SELECT error FROM steep_repl.snapshots WHERE id = '$id'")" >&2; exit 1; }
  echo "$id" >"$work/overlap.id"
  echo "$(now) - $t0" | bc
}
overlap_floor() { # db...: COPY every table with a key TO '/dev/null' in each db, summed, divided by the cores
  local total=0 t d tables
  for d in "$@"; do
    tables=$(q "$d" "SELECT string_agg(format('COPY %I.%I TO %L;', n.nspname, c.relname, '/dev/null'), ' ')
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.relkind = 'r' AND n.nspname = 'public'
                       AND EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)")
    t=$(time_sql "$d" "$tables")
    total=$(echo "$total + $t" | bc)
  done
  echo "scale=2; $total / $(nproc)" | bc
}
bench_overlap() {
  local marker="steep-repl bench overlap mixed $mixed_scale accounts $overlap_rows" got id
  got=$(q postgres "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = 'ovl_a'" || true)
  if [ "$got" != "$marker" ]; then
    echo "bench: building dataset ovl_a (mixed scale $mixed_scale and a $overlap_rows-row pgbench_accounts)"
    q postgres "DROP DATABASE IF EXISTS ovl_a WITH (FORCE)"
    q postgres "CREATE DATABASE ovl_a"
    psql "$(db ovl_a)" -Xq -v ON_ERROR_STOP=1 -v scale="$mixed_scale" -f fixtures/sql/mixed.sql >/dev/null
    q ovl_a "CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int NOT NULL, abalance int NOT NULL, filler char(84));
             INSERT INTO pgbench_accounts SELECT g, (g - 1) / 100000 + 1, 0, '' FROM generate_series(1, $overlap_rows) g"
    q ovl_a "VACUUM (FREEZE, ANALYZE)"
    q postgres "COMMENT ON DATABASE ovl_a IS '$marker'"
  fi
  q ovl_a "DROP EXTENSION IF EXISTS steep_repl CASCADE; CREATE EXTENSION steep_repl"
  local rows size
  rows=$(q ovl_a "SELECT sum(reltuples)::int8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'")
  size=$(q ovl_a "SELECT pg_size_pretty(sum(pg_table_size(c.oid))) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'")
  local identical=""
  for share in ${STEEP_BENCH_OVERLAP_SHARES:-identical 1000 2}; do
    q postgres "DROP DATABASE IF EXISTS ovl_b WITH (FORCE)"
    q postgres "CREATE DATABASE ovl_b TEMPLATE ovl_a"
    [ "$share" = identical ] || overlap_changes ovl_b "$share"
    prewarm ovl_a; prewarm ovl_b
    local floor runs="" best="" x i
    floor=$(overlap_floor ovl_a ovl_b)
    for i in $(seq 1 "$rounds"); do
      sync; x=$(time_ours_overlap ovl_a ovl_b)
      runs="$runs${runs:+, }${x}s"
      if [ -z "$best" ]; then best=$x; else best=$(min "$best" "$x"); fi
    done
    id=$(cat "$work/overlap.id")
    local label
    case "$share" in identical) label="identical" ;; 1000) label="0.1% of rows changed" ;; *) label="50% of rows changed" ;; esac
    report "overlap ovl_a vs ovl_b, $label ($rows rows a side, tables $size a side):"
    report "  start_overlap(parallel => $parallel)  ${best}s (runs $runs)   CPU floor ${floor}s"
    report "  wall / CPU floor: best $(ratio "$best" "$floor")x, median $(ratio "$(median "$runs")" "$floor")x"
    report "  exchanged $(q ovl_a "SELECT pg_size_pretty(sum(bytes_exchanged)) || ' (' || sum(bytes_exchanged) || ' bytes)' FROM steep_repl.overlap_result('$id')")"
    report "  found: $(q ovl_a "SELECT format('%s compared, %s skipped; match %s, conflict %s, local_only %s, peer_only %s', count(*) FILTER (WHERE status = 'compared'), count(*) FILTER (WHERE status = 'skipped'), sum(match), sum(conflict), sum(local_only), sum(peer_only)) FROM steep_repl.overlap_result('$id')")"
    if [ "$share" = identical ]; then identical=$(median "$runs"); fi
    if [ "$share" = 2 ]; then report "  50% changed / identical (medians): $(ratio "$(median "$runs")" "$identical")x"; fi
  done
  q postgres "DROP DATABASE IF EXISTS ovl_b WITH (FORCE)"
}

# Merge: mrg_a holds a pgbench_accounts-like table of --merge-rows rows (default 1 million); each run
# makes mrg_l and mrg_p from it (CREATE DATABASE ... TEMPLATE), then on mrg_p updates 100 000 rows
# (conflicts) and inserts 100 000 (rows on the peer only). start_merge(strategy => 'prefer-local') from
# mrg_l writes the conflicts on mrg_p and the one-sided rows on mrg_l, whole (comparison included), to its
# end. The reference: COPY of the same 200 000 rows out of mrg_p into an empty table of the same shape.
merge_pair() { # makes mrg_l and mrg_p, diverged
  q postgres "DROP DATABASE IF EXISTS mrg_l WITH (FORCE)"
  q postgres "DROP DATABASE IF EXISTS mrg_p WITH (FORCE)"
  q postgres "CREATE DATABASE mrg_l TEMPLATE mrg_a"
  q postgres "CREATE DATABASE mrg_p TEMPLATE mrg_a"
  q mrg_p "UPDATE accounts SET abalance = abalance + 1 WHERE aid % ($merge_rows / 100000) = 0;
           INSERT INTO accounts SELECT g, 1, 0, '' FROM generate_series($merge_rows + 1, $merge_rows + 100000) g"
  q mrg_p "VACUUM ANALYZE accounts"
  q mrg_l "VACUUM ANALYZE accounts"
}
time_ours_merge() {
  local t0 id status plan
  merge_pair
  prewarm mrg_l; prewarm mrg_p
  sync
  t0=$(now)
  id=$(q mrg_l "SELECT steep_repl.start_merge('$(db mrg_p)', strategy => 'prefer-local', parallel => $parallel)")
  status=$(q mrg_l "SELECT status FROM steep_repl.wait_snapshot('$id')")
  [ "$status" = complete ] || { echo "bench: merge $id ended $status: $(q mrg_l "SELECT error FROM steep_repl.snapshots WHERE id = '$id'")" >&2; exit 1; }
  echo "$(now) - $t0" | bc
  plan=$(q mrg_l "SELECT string_agg(format('%s %s %s', node, action, rows), ', ' ORDER BY node, action) FROM steep_repl.merge_result('$id')")
  echo "$plan" >"$work/merge.plan"
}
time_copy_merge_rows() {
  local t0
  merge_pair
  q mrg_l "CREATE TABLE copy_target (LIKE accounts INCLUDING ALL)"
  prewarm mrg_p
  sync
  t0=$(now)
  psql "$(db mrg_p)" -Xq -v ON_ERROR_STOP=1 -c "COPY (SELECT * FROM accounts WHERE aid % ($merge_rows / 100000) = 0 OR aid > $merge_rows) TO STDOUT" \
    | psql "$(db mrg_l)" -Xq -v ON_ERROR_STOP=1 -c "COPY copy_target FROM STDIN"
  echo "$(now) - $t0" | bc
}
bench_merge() {
  q postgres "DROP DATABASE IF EXISTS mrg_a WITH (FORCE)"
  q postgres "CREATE DATABASE mrg_a"
  q mrg_a "CREATE TABLE accounts (aid int PRIMARY KEY, bid int NOT NULL, abalance int NOT NULL, filler char(84));
           INSERT INTO accounts SELECT g, (g - 1) / 100000 + 1, 0, '' FROM generate_series(1, $merge_rows) g;
           CREATE EXTENSION steep_repl"
  q mrg_a "VACUUM (FREEZE, ANALYZE)"
  alternate 'time_ours_merge' 'time_copy_merge_rows'
  report "merge mrg_l with mrg_p ($merge_rows rows; 100000 conflicting, 100000 on the peer only):"
  report "  start_merge(prefer-local, parallel => $parallel)  ${a}s (runs $runs_a)"
  report "  COPY of the same 200000 rows into an empty table  ${b}s (runs $runs_b)"
  report "  ratio merge / COPY: $(ratio "$a" "$b")x"
  report "  rows written by the last merge: $(cat "$work/merge.plan")"
  q postgres "DROP DATABASE IF EXISTS mrg_l WITH (FORCE)"
  q postgres "DROP DATABASE IF EXISTS mrg_p WITH (FORCE)"
}

bench_replica() {
  local spec name file scale dbname replica
  bash scripts/pg.sh start bench_target >/dev/null
  for spec in "onebig:onebig.sql:$onebig_scale" "mixed:mixed.sql:$mixed_scale"; do
    IFS=: read -r name file scale <<<"$spec"
    dbname="bench_$name"; replica="bench_${name}_replica"
    ensure_dataset "$dbname" "$file" "$scale"
    q "$dbname" "DROP EXTENSION IF EXISTS steep_repl CASCADE; CREATE EXTENSION steep_repl"
    # The datasets live in schema public; FOR ALL TABLES would also publish steep_repl's own tables.
    q "$dbname" "DROP PUBLICATION IF EXISTS bench_pub; CREATE PUBLICATION bench_pub FOR TABLES IN SCHEMA public"
    if [ "$(tq postgres "SELECT count(*) FROM pg_database WHERE datname = '$replica'")" = 0 ]; then
      tq postgres "CREATE DATABASE $replica"
      pg_dump --schema-only -d "$(db "$dbname")" | psql "$(target_conn "$replica")" -Xq -v ON_ERROR_STOP=1 >/dev/null
    fi
    tq "$replica" "DROP EXTENSION IF EXISTS steep_repl CASCADE; CREATE EXTENSION steep_repl"
    prewarm "$dbname"
    alternate3 'time_ours_replica "$dbname" "$replica" "$work/$name.replica"' 'time_native_replica "$dbname" "$replica"' \
      'time_ours_replica "$dbname" "$replica" "$work/$name.replica" zstd:1'
    report "replica $name (start until caught up, source and target on two clusters):"
    report "  steep-repl replica init -j$parallel  ${a}s (runs $runs_a; $(grep -o 'uncompressed ([^)]*)\|compressed with zstd:1 ([^)]*)' "$work/replica-auto.log" | head -1))"
    report "  CREATE SUBSCRIPTION (copy_data)  ${b}s (runs $runs_b)"
    report "  steep-repl replica init -j$parallel --compression zstd:1  ${c}s (runs $runs_c)"
    report "  ratio steep-repl / native: $(ratios)"
    report "  ratio steep-repl --compression zstd:1 / native: best $(ratio "$c" "$b")x, median $(ratio "$(median "$runs_c")" "$(median "$runs_b")")x"
    reset_replica "$dbname" "$replica"
    rm -rf "$work/$name.replica"
  done
}

if [ "$what" = replica ]; then
  bench_replica
  echo "bench: results appended to $results (clusters 'bench' and 'bench_target' left running; stop them with STEEP_PG_BASE=$STEEP_PG_BASE scripts/pg.sh stop NAME)"
  exit 0
fi

if [ "$what" = schema ]; then
  bench_schema
  echo "bench: results appended to $results (cluster 'bench' left running; stop it with STEEP_PG_BASE=$STEEP_PG_BASE scripts/pg.sh stop bench)"
  exit 0
fi

if [ "$what" = merge ]; then
  bench_merge
  echo "bench: results appended to $results (cluster 'bench' left running; stop it with STEEP_PG_BASE=$STEEP_PG_BASE scripts/pg.sh stop bench)"
  exit 0
fi

if [ "$what" = overlap ]; then
  bench_overlap
  echo "bench: results appended to $results (cluster 'bench' left running; stop it with STEEP_PG_BASE=$STEEP_PG_BASE scripts/pg.sh stop bench)"
  exit 0
fi

if [ "$what" = many ]; then
  bench_many
  echo "bench: results appended to $results (cluster 'bench' left running; stop it with STEEP_PG_BASE=$STEEP_PG_BASE scripts/pg.sh stop bench)"
  exit 0
fi

for spec in "mixed:mixed.sql:$mixed_scale" "onebig:onebig.sql:$onebig_scale" "wide:wide.sql:$wide_scale"; do
  IFS=: read -r name file scale <<<"$spec"
  case "$name:$what" in wide:apply|wide:ready|wide:all) ;; wide:*) continue ;; esac
  dbname="bench_$name"
  ensure_dataset "$dbname" "$file" "$scale"
  # The SQL objects must match the library just installed (the version number does not move in development).
  q "$dbname" "DROP EXTENSION IF EXISTS steep_repl CASCADE; CREATE EXTENSION steep_repl"
  prewarm "$dbname"
  raw=$(q "$dbname" "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'")
  ours_dir="$work/$name.steep"; dump_dir="$work/$name.dump"

  need_target=0
  case "$what" in apply|copy|all) need_target=1 ;; esac
  if [ "$need_target" = 1 ]; then
    target="${dbname}_target"
    if [ "$(q postgres "SELECT count(*) FROM pg_database WHERE datname = '$target'")" = 0 ]; then
      q postgres "CREATE DATABASE $target"
      pg_dump --schema-only -d "$(db "$dbname")" | psql "$(db "$target")" -Xq -v ON_ERROR_STOP=1 >/dev/null
    fi
    q "$target" "DROP EXTENSION IF EXISTS steep_repl CASCADE; CREATE EXTENSION steep_repl"
  fi

  if [ "$what" = client ] || [ "$what" = all ]; then
    if [ "$name" = mixed ]; then
      alternate 'time_ours_client "$dbname" "$ours_dir.client"' 'time_pg_dump "$dbname" "$dump_dir"'
      report "client-mode generate $name (the CLI runs the engine over $parallel connections):"
      report "  steep-repl --client        ${a}s (runs $runs_a)  output $(mb "$(size "$ours_dir.client")") MB"
      report "  pg_dump -Fd -j$parallel -Z1      ${b}s (runs $runs_b)"
      report "  ratio steep-repl client / pg_dump: $(ratio "$a" "$b")x"
      rm -rf "$ours_dir.client"
    fi
  fi

  if [ "$what" = copy ] || [ "$what" = all ]; then
    if [ "$name" = mixed ]; then
      alternate 'time_ours_copy "$dbname" "$target" "$ours_dir.copy"' 'time_pgcopydb "$dbname" "$target" "$work/pgcopydb"'
      report "full copy $name (generate + apply into the pre-created schema):"
      report "  steep-repl generate+apply  ${a}s (runs $runs_a)"
      report "  pgcopydb copy table-data --table-jobs $parallel  ${b}s (runs $runs_b)"
      report "  ratio steep-repl / pgcopydb: $(ratio "$a" "$b")x"
      rm -rf "$ours_dir.copy" "$work/pgcopydb"
    fi
  fi

  if [ "$what" = ready ]; then
    target="${dbname}_ready"
    alternate3 'time_ours_ready "$dbname" "$target" "$ours_dir.ready"' \
      'time_dump_restore_ready "$dbname" "$target" "$dump_dir.ready"' \
      'time_pgcopydb_ready "$dbname" "$target" "$work/pgcopydb.ready"'
    report "ready copy $name into an empty database (schema, data, indexes, constraints):"
    report "  steep-repl schema + start_snapshot (uncompressed) + start_apply (with ANALYZE)  ${a}s (runs $runs_a)"
    report "  pg_dump -Fd -j$parallel -Z1 + pg_restore -j$parallel (no ANALYZE)        ${b}s (runs $runs_b)"
    report "  pgcopydb clone --table-jobs $parallel --index-jobs $parallel (with VACUUM ANALYZE)  ${c}s (runs $runs_c)"
    report "  ratio steep-repl / pg_dump+pg_restore: $(ratios b)   steep-repl / pgcopydb: $(ratios c)"
    rm -rf "$ours_dir.ready" "$dump_dir.ready" "$work/pgcopydb.ready"
    q postgres "DROP DATABASE IF EXISTS $target WITH (FORCE)"
    continue
  fi
  case "$what" in client|copy) continue ;; esac
  if [ "$what" != apply ] || [ ! -f "$ours_dir/manifest.json" ] || [ ! -f "$dump_dir/toc.dat" ]; then
    alternate 'time_ours_generate "$dbname" "$ours_dir"' 'time_pg_dump "$dbname" "$dump_dir"'
    rows=$(python3 -c "import json,sys; m=json.load(open('$ours_dir/manifest.json')); t=m['totals']; print(t['rows'], t['raw_bytes'])")
    read -r nrows rawbytes <<<"$rows"
    if [ "$what" != apply ]; then
      report "generate $name (tables $raw on disk, $nrows rows, $(mb "$rawbytes") MB COPY text):"
      report "  steep-repl start_snapshot  ${a}s (runs $runs_a)  output $(mb "$(size "$ours_dir")") MB"
      report "  pg_dump -Fd -j$parallel -Z1      ${b}s (runs $runs_b)  output $(mb "$(size "$dump_dir")") MB"
      report "  ratio steep-repl / pg_dump: $(ratio "$a" "$b")x   throughput $(echo "scale=1; $rawbytes / 1048576 / $a" | bc) MB/s of COPY text"
    fi
  fi

  if [ "$what" != generate ]; then
    alternate 'time_ours_apply "$target" "$ours_dir"' 'time_pg_restore "$target" "$dump_dir"'
    report "apply $name (into the pre-created schema with its indexes and keys):"
    report "  steep-repl start_apply     ${a}s (runs $runs_a)"
    report "  pg_restore -j$parallel --data-only ${b}s (runs $runs_b)"
    report "  ratio steep-repl / pg_restore: $(ratios)"
    report "  WAL pages written by backends because the WAL buffers were full (last run): steep-repl $(cat "$work/wal_full.ours"), pg_restore $(cat "$work/wal_full.peer")"
    alternate 'time_ours_apply_ready "$dbname" "${dbname}_ready" "$ours_dir"' 'time_pg_restore_full "${dbname}_ready" "$dump_dir"'
    report "ready $name from the snapshot or dump into an empty database (schema, data, indexes, constraints):"
    report "  pg_dump --schema-only | psql + start_apply (with ANALYZE)  ${a}s (runs $runs_a)"
    report "  pg_restore -j$parallel (no ANALYZE)                          ${b}s (runs $runs_b)"
    report "  ratio steep-repl / pg_restore: $(ratios)"
    q postgres "DROP DATABASE IF EXISTS ${dbname}_ready WITH (FORCE)"
  fi
done

[ "$keep" = 1 ] || rm -rf "$work"/*.steep "$work"/*.dump
echo "bench: results appended to $results (cluster 'bench' left running; stop it with STEEP_PG_BASE=$STEEP_PG_BASE scripts/pg.sh stop bench)"

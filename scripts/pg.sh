#!/usr/bin/env bash
# Local PostgreSQL 15 clusters for tests, the demo and benchmarks.
#
#   scripts/pg.sh start NAME [--no-preload]  initdb if needed, start, print a conninfo on stdout
#   scripts/pg.sh stop NAME [--immediate]    stop (data kept); --immediate: no shutdown checkpoint, as a crash
#   scripts/pg.sh destroy NAME               stop and remove everything
#   scripts/pg.sh url NAME                   print the conninfo of a running cluster
#   scripts/pg.sh psql NAME [psql args...]   run psql against it
#   scripts/pg.sh log NAME                   print the server log
#
# Each cluster lives in $STEEP_PG_BASE/NAME (default /tmp/steep-repl-pg/NAME): data/, sock/ (its own
# unix-socket dir), server.log, port. It runs as the `postgres` OS user (PostgreSQL refuses root),
# listens on 127.0.0.1 and its socket dir on a free port, with shared_preload_libraries = 'steep_repl'
# (unless --no-preload), wal_level = logical and max_worker_processes = 32. Extra settings can be
# passed in STEEP_PG_CONF (lines appended to postgresql.conf).
set -euo pipefail

BASE="${STEEP_PG_BASE:-/tmp/steep-repl-pg}"
PGBIN="${PGBIN:-$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)}"
RUN_AS="${STEEP_PG_OS_USER:-postgres}"

die() { echo "pg.sh: $*" >&2; exit 1; }
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

as_pg() {
  if [ "$(id -un)" = "$RUN_AS" ]; then "$@"
  elif [ "$(id -u)" -eq 0 ]; then
    if command -v runuser >/dev/null 2>&1; then runuser -u "$RUN_AS" -- "$@"; else sudo -u "$RUN_AS" -- "$@"; fi
  else sudo -u "$RUN_AS" -- "$@"; fi
}

valid_name() { [[ "$1" =~ ^[A-Za-z0-9_-]+$ ]] || die "cluster name '$1' may only contain letters, digits, '_' and '-'"; }

free_port() {
  local p
  for p in $(seq 54321 54999); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! grep -qx "$p" "$BASE"/*/port 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  die "no free port in 54321..54999"
}

conninfo() { echo "host=$1/sock port=$(cat "$1/port") user=$RUN_AS dbname=postgres"; }

cmd_start() {
  local name="$1"; shift; local preload=1
  for a in "$@"; do case "$a" in --no-preload) preload=0 ;; *) die "unknown option $a" ;; esac; done
  valid_name "$name"
  local dir="$BASE/$name"
  mkdir -p "$BASE"; chmod 755 "$BASE"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    rm -rf "$dir"; mkdir -p "$dir/sock"; chown -R "$RUN_AS" "$dir"; chmod 700 "$dir"
    # Serialise port choice between clusters started at the same moment (parallel tests).
    ( flock 9; free_port > "$dir/port" ) 9>"$BASE/.port.lock"
    as_pg "$PGBIN/initdb" -D "$dir/data" -U "$RUN_AS" --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; die "initdb failed for $name"; }
  fi
  [ -f "$dir/port" ] || free_port > "$dir/port"
  local port; port=$(cat "$dir/port")
  local conf="$dir/data/postgresql.auto.conf.steep"
  {
    echo "port = $port"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$dir/sock'"
    echo "wal_level = logical"
    echo "max_worker_processes = 32"
    echo "max_wal_senders = 10"
    echo "max_replication_slots = 10"
    if [ "$preload" = 1 ]; then echo "shared_preload_libraries = 'steep_repl'"; else echo "shared_preload_libraries = ''"; fi
    [ -n "${STEEP_PG_CONF:-}" ] && printf '%s\n' "$STEEP_PG_CONF"
  } > "$conf"
  chown "$RUN_AS" "$conf"
  grep -q "include_if_exists = 'postgresql.auto.conf.steep'" "$dir/data/postgresql.conf" \
    || echo "include_if_exists = 'postgresql.auto.conf.steep'" >> "$dir/data/postgresql.conf"
  if as_pg "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    as_pg "$PGBIN/pg_ctl" -D "$dir/data" -w -m fast restart -l "$dir/server.log" >/dev/null \
      || { tail -20 "$dir/server.log" >&2; die "restart of $name failed"; }
  else
    as_pg "$PGBIN/pg_ctl" -D "$dir/data" -w -t 60 start -l "$dir/server.log" >/dev/null \
      || { tail -20 "$dir/server.log" >&2; die "start of $name failed (log: $dir/server.log)"; }
  fi
  conninfo "$dir"
}

cmd_stop() {
  valid_name "$1"; local dir="$BASE/$1"; local mode=fast
  case "${2:-}" in "") ;; --immediate) mode=immediate ;; *) die "unknown option $2" ;; esac
  [ -d "$dir/data" ] || return 0
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -w -m "$mode" stop >/dev/null 2>&1 || true
}

cmd_destroy() { cmd_stop "$1"; rm -rf "${BASE:?}/$1"; }

cmd_url() {
  valid_name "$1"; local dir="$BASE/$1"
  [ -f "$dir/port" ] || die "no cluster named $1 (start it with: scripts/pg.sh start $1)"
  conninfo "$dir"
}

[ $# -ge 1 ] || usage
cmd="$1"; shift
case "$cmd" in
  start) [ $# -ge 1 ] || usage; cmd_start "$@" ;;
  stop) [ $# -ge 1 ] && [ $# -le 2 ] || usage; cmd_stop "$@" ;;
  destroy) [ $# -eq 1 ] || usage; cmd_destroy "$1" ;;
  url) [ $# -eq 1 ] || usage; cmd_url "$1" ;;
  psql) [ $# -ge 1 ] || usage; n="$1"; shift; psql "$(cmd_url "$n")" -X -v ON_ERROR_STOP=1 "$@" ;;
  log) [ $# -eq 1 ] || usage; cat "$BASE/$1/server.log" ;;
  *) usage ;;
esac

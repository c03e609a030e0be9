#!/usr/bin/env bash
# Idempotent machine setup for steep-repl on Debian 12.
#
# Installs only what is missing: PostgreSQL 15, its server headers and libpq (the extension connects to
# peers with it), clang/libclang (pgrx's bindgen),
# pkg-config, sudo (cargo pgrx test --runas), zstd, pgcopydb (benchmark peer), cargo-pgrx 0.16.1, and runs
# `cargo pgrx init --pg15 /usr/bin/pg_config` once. A second run finishes in seconds and says what it skipped.
set -euo pipefail

PGRX_VERSION=0.16.1
PG_CONFIG=/usr/bin/pg_config
APT_PACKAGES=(postgresql-15 postgresql-server-dev-15 libpq-dev clang libclang-dev pkg-config libssl-dev sudo zstd pgcopydb bc)

log() { printf 'setup: %s\n' "$*"; }

# --- apt packages -------------------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    :
  else
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Debian's postgresql-common creates and starts a "main" cluster on install; we never use it.
  $SUDO mkdir -p /etc/postgresql-common
  if [ ! -f /etc/postgresql-common/createcluster.conf ] || ! grep -q '^create_main_cluster *= *false' /etc/postgresql-common/createcluster.conf; then
    echo 'create_main_cluster = false' | $SUDO tee -a /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "skipped apt: all of ${APT_PACKAGES[*]} already installed"
fi

# --- cargo-pgrx ---------------------------------------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if command -v cargo-pgrx >/dev/null 2>&1 && cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  log "skipped cargo-pgrx: $(cargo pgrx --version) already installed"
else
  log "installing cargo-pgrx $PGRX_VERSION (takes about 5 minutes on 2 cores)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# --- cargo pgrx init (local pg_config only; a bare init would try to download sources) -----------
PGRX_HOME="${PGRX_HOME:-$HOME/.pgrx}"
if [ -f "$PGRX_HOME/config.toml" ] && grep -q "pg15 *= *\"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
  log "skipped cargo pgrx init: $PGRX_HOME/config.toml already points pg15 at $PG_CONFIG"
else
  log "cargo pgrx init --pg15 $PG_CONFIG"
  cargo pgrx init --pg15 "$PG_CONFIG"
fi

log "ok"

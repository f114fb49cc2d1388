#!/usr/bin/env bash
# make test: install what the suite needs, then run every tier (gpu only where a GPU exists).
# PostgreSQL, Redis, Chromium: used where they run, installed and started where they do not.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_venv "dev"

pg_ready() { "$PY" - "$1" <<'PYEOF' 2>/dev/null
import sys, psycopg
psycopg.connect(sys.argv[1], connect_timeout=2).close()
PYEOF
}

ensure_postgres() {
  # Prints a DATABASE_URL for a role that may create the test database.
  if [ -n "${TEST_DATABASE_URL:-}" ]; then
    pg_ready "$TEST_DATABASE_URL" || die "TEST_DATABASE_URL does not answer"
    echo "$TEST_DATABASE_URL"; return
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    is_root_debian || die "no PostgreSQL on 127.0.0.1:5432; start one or set TEST_DATABASE_URL"
    apt_install postgresql
    say "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start >&2
    for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.1; done
  fi
  # A role of our own with a password works whether the server trusts local TCP or not.
  local url="postgres://labsite_test:labsite_test@127.0.0.1:5432/postgres"
  if ! pg_ready "$url"; then
    if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
      runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -c \
        "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='labsite_test') THEN CREATE ROLE labsite_test LOGIN CREATEDB PASSWORD 'labsite_test'; END IF; END \$\$;" >&2
    fi
    pg_ready "$url" || url="postgres://postgres@127.0.0.1:5432/postgres"
    pg_ready "$url" || die "cannot connect to PostgreSQL on 127.0.0.1:5432; set TEST_DATABASE_URL"
  fi
  echo "${url%/postgres}/labsite"
}

export REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/15}"
ensure_redis "$REDIS_URL"
DATABASE_URL=$(ensure_postgres)
apt_install chromium openssh-server openssh-client iproute2 munge slurm-wlm slurmdbd mariadb-server shellcheck
ensure_run_user
export LABSITE_DATA_DIR="$ROOT/.test-data"
rm -rf "$LABSITE_DATA_DIR"
mkdir -p "$LABSITE_DATA_DIR"

say "unit tier on SQLite (the embedded default)"
env -u DATABASE_URL "$PY" -m pytest tests/unit -q -p no:cacheprovider -x "$@"

say "all tiers on PostgreSQL + Redis + Celery + Chromium"
DATABASE_URL="$DATABASE_URL" "$PY" -m pytest tests -q -p no:cacheprovider "$@"

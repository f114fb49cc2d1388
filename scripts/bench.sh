#!/usr/bin/env bash
# make bench: benchmarks against the real harness (PostgreSQL, Redis); tables in bench-results/.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_venv "dev"
# The same PostgreSQL set-up as the tests, on a scratch database of its own.
source <(sed -n '/^pg_ready()/,/^}/p; /^ensure_postgres()/,/^}/p' scripts/test.sh)
export REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/15}"
ensure_redis "$REDIS_URL"
ensure_run_user
base=$(ensure_postgres)
admin_url="${base%/labsite}/postgres"
fresh_db() {
  "$PY" - "$admin_url" <<'PYEOF'
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as c:
    c.execute("DROP DATABASE IF EXISTS labsite_bench WITH (FORCE)")
    c.execute("CREATE DATABASE labsite_bench")
PYEOF
  "$PY" manage.py migrate --noinput -v0
}
export DATABASE_URL="${base%/labsite}/labsite_bench"
export LABSITE_DATA_DIR="$ROOT/.test-data/bench"
mkdir -p "$LABSITE_DATA_DIR"
# BENCH="sched burst" make bench runs only those.
for name in ${BENCH:-api runs sched burst}; do
  [ -f "tests/bench/bench_$name.py" ] || die "no benchmark named $name"
  fresh_db
  "$PY" "tests/bench/bench_$name.py"
done

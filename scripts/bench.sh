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
# BENCH_DATABASE and BENCH_DATA_DIR keep two benches on one machine apart (and out of the way of
# make test, which deletes .test-data when it starts).
db_name="${BENCH_DATABASE:-labsite_bench}"
[[ $db_name =~ ^[a-z_][a-z0-9_]*$ ]] || die "BENCH_DATABASE must be a plain name"
fresh_db() {
  "$PY" - "$admin_url" "$db_name" <<'PYEOF'
import sys, psycopg
from psycopg import sql
name = sql.Identifier(sys.argv[2])
with psycopg.connect(sys.argv[1], autocommit=True) as c:
    c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
    c.execute(sql.SQL("CREATE DATABASE {}").format(name))
PYEOF
  "$PY" manage.py migrate --noinput -v0
}
export DATABASE_URL="${base%/labsite}/$db_name"
# This machine's Redis and PostgreSQL answer local users without a password: trust the bench's
# members on the local host, as the tests do (tests/conftest.py).
export LABSITE_LOCAL_TRUST_MEMBERS="${LABSITE_LOCAL_TRUST_MEMBERS:-true}"
export LABSITE_DATA_DIR="${BENCH_DATA_DIR:-$ROOT/.test-data/bench}"
mkdir -p "$LABSITE_DATA_DIR"
# The SSH benches start sshd test hosts in network namespaces; research-agent (the peer of
# bench_reads) keeps its runs in tmux windows; bench_slurm starts a single-node Slurm.
apt_install openssh-server openssh-client iproute2 tmux munge slurm-wlm
# BENCH="sched burst" make bench runs only those.
for name in ${BENCH:-api reads runs sched burst slurm scale}; do
  [ -f "tests/bench/bench_$name.py" ] || die "no benchmark named $name"
  fresh_db
  "$PY" "tests/bench/bench_$name.py"
done

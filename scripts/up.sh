#!/usr/bin/env bash
# make up: set everything up on the embedded default (SQLite, local Redis, the local host) and run
# web + worker + beat in the foreground. One command, one Ctrl-C.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
ensure_venv ""
ensure_redis "$REDIS_URL"
ensure_run_user
say "migrating the database"
"$PY" manage.py migrate --noinput -v0
"$PY" manage.py collectstatic --noinput -v0
"$PY" manage.py bootstrap
exec "$PY" manage.py serve

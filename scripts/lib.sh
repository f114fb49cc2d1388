# Shared helpers for make up / make test: idempotent, quiet when nothing is missing.
# shellcheck shell=bash
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'labsite: %s\n' "$*" >&2; exit 1; }

is_root_debian() { [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; }

APT_UPDATED=""
apt_install() {
  # apt_install PKG... : install only the packages that are missing (root on Debian only).
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  is_root_debian || die "missing packages: ${missing[*]}; install them (e.g. sudo apt-get install ${missing[*]}) and run again"
  say "installing ${missing[*]}"
  if [ -z "$APT_UPDATED" ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

find_python() {
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  die "Python 3.11 is needed (apt-get install python3 python3-venv)"
}

ensure_venv() {
  # ensure_venv EXTRA : a venv with the project installed; reinstalls when pyproject.toml changes.
  local extra="${1:-}" stamp="$VENV/.installed"
  local want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)$extra"
  if [ ! -x "$PY" ]; then
    local python; python=$(find_python)
    if ! "$python" -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"; apt_install python3-venv; "$python" -m venv "$VENV"
    fi
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing Python dependencies into .venv"
    "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT${extra:+[$extra]}" 2>&1 | grep -v "is ignored" >&2 || true
    "$PY" -c "import django, celery, rest_framework" || die "pip install failed"
    echo "$want" > "$stamp"
  fi
}

redis_ping() { "$PY" - "$1" <<'PYEOF' 2>/dev/null
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1, socket_timeout=1).ping()
PYEOF
}

ensure_redis() {
  # ensure_redis URL : a Redis answers at URL, or (root on Debian, local URL) one is started.
  local url="$1"
  redis_ping "$url" && return 0
  case "$url" in
    redis://127.0.0.1:6379*|redis://localhost:6379*) ;;
    *) die "no Redis answers at $url; start it or set REDIS_URL" ;;
  esac
  is_root_debian || die "no Redis answers at $url; install and start redis-server (or set REDIS_URL)"
  apt_install redis-server
  say "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/labsite.log >/dev/null
  for _ in $(seq 50); do redis_ping "$url" && return 0; sleep 0.1; done
  die "redis-server did not answer at $url"
}

ensure_run_user() {
  # ensure_run_user : the unprivileged Unix user that the local host's runs execute as (root on
  # Debian creates it; elsewhere the local host then takes admins' runs only, see the README).
  local name="${LABSITE_LOCAL_RUN_USER:-labsite-run}"
  [ -n "$name" ] || return 0
  id -u "$name" >/dev/null 2>&1 && return 0
  is_root_debian || { say "no user $name: the local host will take admins' runs only"; return 0; }
  say "creating the Unix user $name for runs on this machine"
  useradd --system --user-group --create-home --home-dir "/var/lib/$name" \
    --shell /usr/sbin/nologin "$name"
  chmod 700 "/var/lib/$name"
}

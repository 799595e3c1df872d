#!/usr/bin/env bash
# The whole suite, as `make test` and CI run it: lint, types, then unit + integration + e2e (slow) tests, with branch
# coverage (printed; the floor is fail_under in pyproject.toml). Arguments go to pytest: `scripts/test.sh -m "not slow"`
# or a test path runs a subset, which reports its coverage without being held to the whole suite's floor (add `-n 2`
# to run it on two cores).
# Starts a throw-away PostgreSQL server on a loopback port for the integration tests and always stops it.
# In CI (CI=true) a test that lacks its PostgreSQL server or root fails instead of skipping (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT

if [ -z "${AMIFORGE_SKIP_LINT:-}" ]; then  # set it to iterate on tests alone
    echo "== ruff"; $V/ruff format --check src tests bench; $V/ruff check src tests bench
    echo "== mypy --strict src"; $V/mypy src
    echo "== mypy --strict tests"; $V/mypy tests
    echo "== import-linter: the floors (docs/architecture.md §2)"; $V/lint-imports
fi

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [ -n "$pgbin" ] && [ -x "$pgbin/pg_ctl" ]; then
    pgdir=$(mktemp -d /tmp/amiforge-pg.XXXXXX)
    as_pg=()
    # Set before anything can fail, so the throw-away cluster and its folder never outlive the run.
    cleanup+=('"${as_pg[@]}" "$pgbin/pg_ctl" -s -D "$pgdir/data" -m immediate stop 2>/dev/null || true; rm -rf "$pgdir"')
    chmod 755 "$pgdir"
    [ "$(id -u)" -eq 0 ] && { chown postgres: "$pgdir"; as_pg=(runuser -u postgres --); }
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "${as_pg[@]}" "$pgbin/initdb" --no-sync -A trust -U postgres -D "$pgdir/data" >/dev/null
    "${as_pg[@]}" "$pgbin/pg_ctl" -s -w -D "$pgdir/data" -l "$pgdir/log" \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $pgdir -c fsync=off" start
    export AMIFORGE_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
    echo "== PostgreSQL $(basename "$(dirname "$pgbin")") on 127.0.0.1:$port"
else
    echo "== PostgreSQL server not installed: its tests skip here and fail in CI (scripts/bootstrap.sh --test installs it)"
fi

# Coverage data of this process and of every Python subprocess it starts (absolute: subprocesses may chdir) goes to
# a private folder that goes away with the run.
covdir=$(mktemp -d /tmp/amiforge-cov.XXXXXX)
cleanup+=('rm -rf "$covdir"')
export COVERAGE_FILE="$covdir/.coverage"
cov=(--cov=amiforge --cov-branch)
# The slowest tests are listed after each part: where the suite's time goes (its budget is 30 minutes on 2 cores).
slowest=(--durations=20 --durations-min=5)

if [ $# -gt 0 ]; then
    echo "== pytest $*"
    $V/python -m pytest "${cov[@]}" --cov-report=term:skip-covered --cov-fail-under=0 "${slowest[@]}" "$@"
    exit
fi
# The unit and integration tests on every core (pytest-xdist); then the e2e tests (marker slow) one at a time and
# alone: their guests' readiness is timed (rollout gates), and a core taken by a unit test would skew it. Coverage
# adds up over both parts and is held to its floor at the end.
# Both parts run even when the first fails (CI shows every failure at once); the exit status is the first failure's.
# Workers: one a core, at most 8 (each PostgreSQL test holds a few connections of the server's 100). A test file's
# tests all run on one worker, one at a time (--dist loadfile): some share host state within their file (the ssh
# tests find their upload folders by globbing /dev/shm and /tmp).
status=0
echo "== pytest: unit and integration tests, on every core (at most 8)"
$V/python -m pytest "${cov[@]}" --cov-report= --cov-fail-under=0 -n auto --maxprocesses=8 --dist loadfile \
    -m "not slow and not live" "${slowest[@]}" || status=$?
echo "== pytest: e2e tests (real mmdebstrap, QEMU, Prometheus), one at a time"
$V/python -m pytest "${cov[@]}" --cov-append --cov-report=term:skip-covered -m "slow or live" "${slowest[@]}" \
    || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
exit "$status"

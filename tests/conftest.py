"""Fixtures shared by the unit and integration suites, and what a test needs from the machine.

A test whose prerequisite is missing (a PostgreSQL server, root, the shared OSV records) skips on a developer's
machine and FAILS in CI (`CI=true`, which .ci/run sets): CI must run the whole suite, never pass by skipping it.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_ENV = "AMIFORGE_TEST_POSTGRES_URL"
BOOTSTRAP = "scripts/bootstrap.sh --test"

# --- prerequisites: skip locally, fail in CI ------------------------------------------------------------------


def in_ci() -> bool:
    """CI=true (or 1, yes): set by CI systems and by .ci/run. Unset, empty, false, 0, no or off: a local run."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def required_or_skip(present: bool, missing: str, fix: str) -> None:
    """Nothing when the prerequisite is present; otherwise skip the test locally, fail it in CI.

    `missing` names what is missing, `fix` how to get it; both are in the message either way."""
    if present:
        return
    message = f"{missing} (fix: {fix})"
    if in_ci():
        pytest.fail(f"CI=true, so this cannot be skipped: {message}", pytrace=False)
    pytest.skip(message)


def postgres_installed() -> bool:
    """A PostgreSQL server as Debian installs it, where scripts/test.sh looks for one."""
    return any(os.access(path, os.X_OK) for path in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))


def require_postgres() -> str:
    """The base URL of the throw-away PostgreSQL server scripts/test.sh started (skip locally / fail in CI if none)."""
    url = os.environ.get(POSTGRES_ENV, "")
    if postgres_installed():
        missing = f"{POSTGRES_ENV} is not set, so there is no PostgreSQL server to test against"
        fix = "run the suite through scripts/test.sh (make test), which starts a throw-away server and sets it"
    else:
        missing = "no PostgreSQL server is installed (no /usr/lib/postgresql/*/bin/pg_ctl)"
        fix = f"{BOOTSTRAP} installs it (make test runs it), then scripts/test.sh starts a throw-away server"
    required_or_skip(bool(url), missing, fix)
    return url


def require_root(why: str) -> None:
    """Root, for tests that mount, chroot or ignore file modes the way the local provider does."""
    required_or_skip(
        os.geteuid() == 0,
        f"these tests need root ({why}) and run as uid {os.geteuid()}",
        f"run the suite as root: sudo make test ({BOOTSTRAP} installs the tools they use)",
    )


# --- registry backends ----------------------------------------------------------------------------------------


def _backends() -> list[object]:
    # PostgreSQL is always a parameter, so a run without a server reports it (skipped locally, failed in CI).
    return [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres")]


def _postgres_schema_url(base_url: str) -> Iterator[str]:
    """A URL whose connections see only a brand-new schema (via search_path); dropped afterwards."""
    schema = f"amiforge_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = sa.make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(params=_backends())
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        # A directory that does not exist yet: open_store must create it.
        yield f"sqlite:///{tmp_path / 'state' / 'registry.db'}"
    else:
        yield from _postgres_schema_url(require_postgres())


# Real OSV records for Debian live in the workspace's shared data, beside the checkout (present in CI).
OSV_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "osv-debian"


def osv_missing_means_failure() -> None:
    """Outside CI a missing shared/ only skips; in CI (where it is always laid out) it is a failure."""
    required_or_skip(
        OSV_DIR.is_dir(),
        f"real OSV records not present at {OSV_DIR}",
        "put the workspace's shared/ folder (data/osv-debian) beside the checkout, as CI does",
    )


@pytest.fixture
def _osv_records() -> Path:
    osv_missing_means_failure()
    return OSV_DIR


# The tests that read them skip outside CI; in CI a missing record folder fails them, never passes quietly.
needs_osv = pytest.mark.usefixtures("_osv_records")


# One synthetic OSV record for a package no image has: vulnerability data that matches nothing, so a test's gates
# judge a scan made against *some* data (a scan against none fails closed, see policy.gate._stale_data).
SYNTHETIC_OSV_RECORD = {
    "id": "TEST-2026-0001",
    "modified": "2026-01-01T00:00:00Z",
    "summary": "synthetic advisory for tests (matches no real package)",
    "affected": [
        {
            "package": {"ecosystem": "Debian:12", "name": "amiforge-test-no-such-package"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1.0-1"}]}],
        }
    ],
}


def synthetic_osv(folder: Path) -> Path:
    """A folder holding SYNTHETIC_OSV_RECORD, for `vulndb import` (its age: now, the file's modification time)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "TEST-2026-0001.json").write_text(json.dumps(SYNTHETIC_OSV_RECORD))
    return folder


# /etc/os-release of a Debian 12 image, for test image roots (a scan matches advisories for the image's release).
DEBIAN_12_OS_RELEASE = (
    'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n'
)

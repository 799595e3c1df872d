"""Fixtures shared by the unit and integration suites."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_ENV = "AMIFORGE_TEST_POSTGRES_URL"


def _backends() -> list[object]:
    params: list[object] = [pytest.param("sqlite", id="sqlite")]
    if os.environ.get(POSTGRES_ENV):
        params.append(pytest.param("postgres", id="postgres"))
    return params


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
        yield from _postgres_schema_url(os.environ[POSTGRES_ENV])


# Real OSV records for Debian live in the workspace's shared data, beside the checkout (present in CI).
OSV_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "osv-debian"


def osv_missing_means_failure() -> None:
    """Outside CI a missing shared/ only skips; in CI (where it is always laid out) it is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"real OSV records missing at {OSV_DIR}: CI lays shared/ beside the checkout")


# Skip the tests that read them only outside CI; in CI a missing record folder must fail, never pass quietly.
needs_osv = pytest.mark.skipif(
    not OSV_DIR.is_dir() and not os.environ.get("CI"), reason=f"real OSV records not present at {OSV_DIR}"
)

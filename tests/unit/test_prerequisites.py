"""What a test does when the machine lacks something it needs: skip on a developer's machine, fail in CI (CI=true)."""

from __future__ import annotations

import os

import pytest

import tests.conftest as prerequisites
from tests.conftest import POSTGRES_ENV, _backends, in_ci, require_postgres, require_root, required_or_skip

Skipped = pytest.skip.Exception
Failed = pytest.fail.Exception


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("TRUE", True), ("yes", True),
                                                 ("", False), ("false", False), ("0", False), ("no", False),
                                                 ("off", False), (None, False)])  # fmt: skip
def test_in_ci_reads_the_ci_variable(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected


@pytest.mark.parametrize("ci", [None, "true"])
def test_a_present_prerequisite_neither_skips_nor_fails(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    required_or_skip(True, "the thing", "install it")  # returns: no skip, no failure


def test_a_missing_prerequisite_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(Skipped, match=r"the thing is missing \(fix: scripts/bootstrap.sh --test\)"):
        required_or_skip(False, "the thing is missing", "scripts/bootstrap.sh --test")


def test_a_missing_prerequisite_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match=r"CI=true.*the thing is missing \(fix: scripts/bootstrap.sh --test\)") as e:
        required_or_skip(False, "the thing is missing", "scripts/bootstrap.sh --test")
    assert not e.value.pytrace  # the message is the whole story: no traceback into the helper


def test_no_postgres_server_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    monkeypatch.setattr(prerequisites, "postgres_installed", lambda: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match=r"no PostgreSQL server is installed.*scripts/bootstrap.sh --test"):
        require_postgres()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(Skipped, match=r"no PostgreSQL server is installed.*scripts/bootstrap.sh --test"):
        require_postgres()


def test_postgres_installed_but_not_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    monkeypatch.setattr(prerequisites, "postgres_installed", lambda: True)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match=rf"{POSTGRES_ENV} is not set.*scripts/test.sh"):
        require_postgres()


def test_postgres_url_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(POSTGRES_ENV, "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    monkeypatch.setenv("CI", "true")
    assert require_postgres() == "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def test_postgres_is_always_a_backend_so_its_absence_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    # conftest types _backends() as list[object]; its items are pytest.param()s, which have ids (hence the ignore).
    assert [p.id for p in _backends()] == ["sqlite", "postgres"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("uid", "ci", "outcome"), [(0, "true", None), (0, None, None), (1000, None, Skipped),
                                                    (1000, "true", Failed)])  # fmt: skip
def test_root_decision(
    monkeypatch: pytest.MonkeyPatch, uid: int, ci: str | None, outcome: type[BaseException] | None
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: uid)  # the os module conftest's require_root reads
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    if outcome is None:
        require_root("loop mounts")
    else:
        with pytest.raises(outcome, match=r"need root \(loop mounts\) and run as uid 1000.*sudo make test"):
            require_root("loop mounts")

"""`images list` and `events` show the newest 50 unless --limit N or --all, and say on stderr how many more there
are and how to see them; --json honours the same limit. `channels` flags revoked ancestors from one read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from amiforge.model import Status
from amiforge.settings import load_settings
from amiforge.store.sql import SqlStore, open_store
from tests.cli_harness import Cli, isolate, make_cli


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    isolate(tmp_path, monkeypatch)
    return make_cli(monkeypatch, capsys)


def _store() -> SqlStore:
    return open_store(load_settings().registry_url)


@pytest.fixture
def sixty(cli: Cli) -> list[str]:
    """60 versions, web@1..web@40 and api@1..api@20 interleaved (two web, one api); 70 events. Refs, newest first."""
    refs = []
    with _store() as store:
        for n in range(60):
            name = "api" if n % 3 == 2 else "web"
            v = store.create_version(name=name, recipe_digest="r", recipe_path="r.yaml", provider="local", tags={},
                                     parent=None)  # fmt: skip
            refs.append(v.ref)
        for n in range(70):
            store.append_event("TEST", actor="TEST", ref="web@1" if n < 12 else "web@2", data={"n": n})
    return refs[::-1]


def _listed(out: str) -> list[str]:
    return [line.split("│")[0].strip() for line in out.splitlines() if "│" in line]


def test_images_list_shows_the_newest_50_and_says_how_to_see_the_rest(cli: Cli, sixty: list[str]) -> None:
    r = cli("images", "list")
    assert r.code == 0, r.err
    assert _listed(r.out) == sixty[:50]
    assert r.err.strip() == (
        "showing the newest 50 of 60 versions; 10 more: `amiforge images list --limit N` shows the newest N, "
        "`amiforge images list --all` every one"
    )
    assert "more" not in r.out


@pytest.mark.parametrize(("argv", "shown", "more"), [
    (("--limit", "7"), 7, 53),
    (("--limit", "59"), 59, 1),
    (("--limit", "60"), 60, 0),
    (("--limit", "61"), 60, 0),
    (("--all",), 60, 0),
])  # fmt: skip
def test_images_list_limit_and_all(cli: Cli, sixty: list[str], argv: tuple[str, ...], shown: int, more: int) -> None:
    r = cli("images", "list", *argv)
    assert r.code == 0, r.err
    assert _listed(r.out) == sixty[:shown]
    if more:
        assert f"showing the newest {shown} of 60 versions; {more} more:" in r.err
    else:
        assert r.err == ""


def test_images_list_json_honours_the_limit(cli: Cli, sixty: list[str]) -> None:
    r = cli("images", "list", "--json")
    assert [row["ref"] for row in r.json()] == sixty[:50]  # stdout stays one JSON document
    assert "10 more" in r.err
    assert [row["ref"] for row in cli("images", "list", "--json", "--limit", "3").json()] == sixty[:3]
    everything = cli("images", "list", "--json", "--all")
    assert [row["ref"] for row in everything.json()] == sixty
    assert everything.err == ""


def test_images_list_of_one_name(cli: Cli, sixty: list[str]) -> None:
    r = cli("images", "list", "--name", "web", "--limit", "5")
    assert _listed(r.out) == ["web@40", "web@39", "web@38", "web@37", "web@36"]
    assert r.err.strip() == (
        "showing the newest 5 of 40 versions of web; 35 more: `amiforge images list --name web --limit N` shows the "
        "newest N, `amiforge images list --name web --all` every one"
    )
    assert _listed(cli("images", "list", "--name", "api").out) == [f"api@{n}" for n in range(20, 0, -1)]


def test_limit_and_all_together_are_bad_input(cli: Cli, sixty: list[str]) -> None:
    for command in (("images", "list"), ("events",)):
        r = cli(*command, "--limit", "5", "--all")
        assert r.code == 2
        assert "--limit and --all contradict each other" in r.err
        bad = cli(*command, "--limit", "0")
        assert bad.code == 2 and "--limit" in bad.err


def test_events_show_the_newest_50_unless_asked(cli: Cli, sixty: list[str]) -> None:
    r = cli("events", "--json")
    assert [e["seq"] for e in r.json()] == list(range(21, 71))
    assert "showing the newest 50 of 70 events; 20 more: `amiforge events --limit N`" in r.err
    assert [e["seq"] for e in cli("events", "--json", "--all").json()] == list(range(1, 71))
    text = cli("events", "--limit", "3")
    assert [line.split()[0] for line in text.out.splitlines()[2:]] == ["68", "69", "70"]
    assert "3 of 70 events; 67 more" in text.err
    mine = cli("events", "web@1", "--limit", "10", "--json")
    assert [e["seq"] for e in mine.json()] == list(range(3, 13))
    assert "showing the newest 10 of 12 events of web@1; 2 more: `amiforge events web@1 --limit N`" in mine.err
    assert cli("events", "web@1", "--json").err == ""


def test_events_verify_counts_without_reading_the_log_twice(cli: Cli, sixty: list[str]) -> None:
    r = cli("events", "--verify", "--json")
    assert r.json() == {"ok": True, "events": 70}


def test_channels_flag_revoked_versions_and_ancestors(cli: Cli) -> None:
    with _store() as store:
        ids = {}
        for ref, parent in (("web@1", None), ("web@2", "web@1"), ("web@3", "web@2"), ("api@1", None)):
            name = ref.split("@")[0]
            v = store.create_version(name=name, recipe_digest="r", recipe_path="r.yaml", provider="local", tags={},
                                     parent=parent)  # fmt: skip
            ids[ref] = store.transition(v.id, Status.BUILT, expect=Status.BAKING).id
        store.move_channel("web", "dev", ids["web@2"], expect_current=None, actor="t", reason="r")
        store.move_channel("web", "dev", ids["web@3"], expect_current=ids["web@2"], actor="t", reason="r")
        store.move_channel("web", "prod", ids["web@1"], expect_current=None, actor="t", reason="r")
        store.move_channel("api", "dev", ids["api@1"], expect_current=None, actor="t", reason="r")
        store.transition(ids["web@1"], Status.REVOKED, expect=Status.BUILT)
    r = cli("channels", "--json")
    assert r.code == 0, r.err
    flags = {(p["name"], p["channel"]): p["flags"] for p in r.json()}
    assert flags == {
        ("api", "dev"): [],
        ("web", "dev"): ["current web@3: ancestor web@1 is revoked", "rollback web@2: ancestor web@1 is revoked"],
        ("web", "prod"): ["current web@1 is revoked"],
    }
    text = cli("channels")
    assert re.search(r"web\s+│ prod\s+│ web@1\s+│.*current web@1 is revoked", text.out)
    assert json.loads(cli("channels", "--name", "api", "--json").out)[0]["flags"] == []

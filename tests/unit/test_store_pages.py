"""Listings a page at a time: versions and events newest first, `limit`, the keyset cursor `before`, and counts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from amiforge.model import ImageVersion
from amiforge.store.sql import SqlStore, open_store


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    with open_store(store_url) as s:
        yield s


def _new(store: SqlStore, name: str) -> ImageVersion:
    v = store.create_version(
        name=name, recipe_digest="r", recipe_path=f"{name}.yaml", provider="local", tags={"t": name}, parent=None,
        recipe='{"name": "' + name + '"}',
    )  # fmt: skip
    store.append_log(v.id, f"log of {v.ref}\n")
    return v


@pytest.fixture
def seeded(store: SqlStore) -> list[ImageVersion]:
    """23 versions, web and api interleaved (web@1, api@1, web@2, …, web@12): ids follow creation."""
    made = []
    for n in range(23):
        made.append(_new(store, "web" if n % 2 == 0 else "api"))
    return made


def _pages(store: SqlStore, name: str | None, size: int) -> list[list[str]]:
    pages: list[list[str]] = []
    before = None
    while True:
        page = store.list_versions(name, limit=size, before=before, summary=True)
        if not page:
            return pages
        pages.append([v.ref for v in page])
        before = page[-1].id


def test_pages_walk_every_version_newest_first_exactly_once(store: SqlStore, seeded: list[ImageVersion]) -> None:
    newest_first = [v.ref for v in reversed(seeded)]
    assert [v.ref for v in store.list_versions()] == newest_first
    for size in (1, 5, 22, 23, 24, 100):
        pages = _pages(store, None, size)
        assert [ref for page in pages for ref in page] == newest_first, size
        assert [len(p) for p in pages] == [size] * (23 // size) + ([23 % size] if 23 % size else [])
    web = [v.ref for v in reversed(seeded) if v.name == "web"]
    assert web[:3] == ["web@12", "web@11", "web@10"]
    assert _pages(store, "web", 5) == [web[0:5], web[5:10], web[10:12]]
    assert _pages(store, "db", 5) == []


def test_a_page_boundary_holds_while_new_versions_arrive(store: SqlStore, seeded: list[ImageVersion]) -> None:
    first = store.list_versions("web", limit=4)
    assert [v.ref for v in first] == ["web@12", "web@11", "web@10", "web@9"]
    _new(store, "web")  # web@13 lands between two pages: the keyset cursor neither repeats nor skips
    second = store.list_versions("web", limit=4, before=first[-1].id)
    assert [v.ref for v in second] == ["web@8", "web@7", "web@6", "web@5"]
    assert store.list_versions("web", limit=4, before=seeded[0].id) == []  # nothing older than web@1
    assert store.list_versions("web", limit=0) == []


def test_summary_leaves_out_log_and_recipe_and_nothing_else(store: SqlStore, seeded: list[ImageVersion]) -> None:
    (full,) = store.list_versions("api", limit=1)
    (brief,) = store.list_versions("api", limit=1, summary=True)
    assert (full.log, full.recipe) == ("log of api@11\n", '{"name": "api"}')
    assert (brief.log, brief.recipe) == ("", "")
    assert brief == full.__class__(**{**vars(full), "log": "", "recipe": ""})
    assert store.get_version("api@11") == full


def test_counts(store: SqlStore, seeded: list[ImageVersion]) -> None:
    assert store.count_versions() == 23
    assert (store.count_versions("web"), store.count_versions("api"), store.count_versions("db")) == (12, 11, 0)


def test_event_pages(store: SqlStore) -> None:
    for n in range(1, 31):
        store.append_event("TEST", actor="TEST", ref="web@1" if n % 3 == 0 else "web@2", data={"n": n})
    assert [e.seq for e in store.events(limit=4)] == [27, 28, 29, 30]  # the newest, oldest first
    assert [e.seq for e in store.events(limit=4, before=27)] == [23, 24, 25, 26]
    assert [e.seq for e in store.events(before=4)] == [1, 2, 3]
    assert [e.seq for e in store.events("web@1", limit=3)] == [24, 27, 30]
    assert [e.seq for e in store.events("web@1", limit=3, before=24)] == [15, 18, 21]
    assert (store.count_events(), store.count_events("web@1"), store.count_events("web@2")) == (30, 10, 20)
    assert (store.count_events(before=11), store.count_events("web@1", before=11), store.count_events("x")) == (
        10,
        3,
        0,
    )

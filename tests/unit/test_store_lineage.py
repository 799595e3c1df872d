"""Lineage in the store: ancestry, descendants and revoked ancestors, each one query however deep the history
(versions.parent_id and revoked_ancestors, migration 0006), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from amiforge.errors import ConfigError, NotFound
from amiforge.model import ImageVersion, Status
from amiforge.store.schema import revoked_ancestors_table, versions_table
from amiforge.store.sql import SqlStore, open_store


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    with open_store(store_url) as s:
        yield s


def _new(
    store: SqlStore, name: str = "web", parent: str | None = None, *, status: Status = Status.BUILT
) -> ImageVersion:
    v = store.create_version(
        name=name, recipe_digest="r", recipe_path=f"{name}.yaml", provider="local", tags={}, parent=parent
    )
    if status is Status.BAKING:
        return v
    v = store.transition(v.id, Status.BUILT, expect=Status.BAKING)
    if status is Status.REVOKED:
        v = store.transition(v.id, Status.REVOKED, expect=Status.BUILT)
    return v


def _refs(versions: list[ImageVersion]) -> list[str]:
    return [v.ref for v in versions]


def test_parent_id_is_resolved_when_a_version_is_created(store: SqlStore) -> None:
    web1 = _new(store)
    web2 = _new(store, parent="web@1")
    with store.engine.connect() as conn:
        links = dict(conn.execute(sa.select(versions_table.c.id, versions_table.c.parent_id)).all())
    assert links == {web1.id: None, web2.id: web1.id}
    assert web2.parent == "web@1"


def test_a_parent_that_cannot_be_linked_is_refused_and_nothing_is_created(store: SqlStore) -> None:
    _new(store)
    with pytest.raises(NotFound, match="web@99"):
        _new(store, parent="web@99")  # no such version
    with pytest.raises(ConfigError, match="NAME@N"):
        _new(store, parent="web:dev")  # a channel ref: a link nobody could follow once the channel moves
    assert [v.ref for v in store.list_versions("web")] == ["web@1"]


def test_ancestry_of_a_long_chain_is_nearest_first(store: SqlStore) -> None:
    chain = [_new(store, status=Status.BAKING)]
    for _ in range(149):
        chain.append(_new(store, parent=chain[-1].ref, status=Status.BAKING))
    tip = chain[-1]
    assert _refs(store.ancestry(tip.id)) == [f"web@{n}" for n in range(149, 0, -1)]
    assert store.ancestry(chain[0].id) == []
    assert _refs(store.descendants(chain[0].id)) == [f"web@{n}" for n in range(150, 1, -1)]
    assert store.descendants(tip.id) == []
    # Versions read by lineage queries leave out the build log and the recipe.
    assert all(v.log == "" and v.recipe == "" for v in store.ancestry(tip.id))
    assert store.ancestry(10**9) == [] and store.descendants(10**9) == []


def test_branches_and_other_images(store: SqlStore) -> None:
    #        web@1
    #       /     \
    #   web@2     web@3
    #     |         |
    #   web@4     web@5       api@1 ← api@2 (parent web@5: another image)
    web1 = _new(store)
    web2 = _new(store, parent="web@1")
    web3 = _new(store, parent="web@1")
    web4 = _new(store, parent="web@2")
    web5 = _new(store, parent="web@3")
    api1 = _new(store, "api")
    api2 = _new(store, "api", parent="web@5")
    assert _refs(store.ancestry(web4.id)) == ["web@2", "web@1"]
    assert _refs(store.ancestry(web5.id)) == ["web@3", "web@1"]
    assert _refs(store.ancestry(api2.id)) == ["web@5", "web@3", "web@1"]
    assert _refs(store.descendants(web1.id)) == ["api@2", "web@5", "web@4", "web@3", "web@2"]
    assert _refs(store.descendants(web2.id)) == ["web@4"]
    assert _refs(store.descendants(web3.id)) == ["api@2", "web@5"]
    assert store.descendants(api1.id) == []


def test_revoked_ancestors_follow_revocations_before_and_after_a_version_is_made(store: SqlStore) -> None:
    web1 = _new(store)
    web2 = _new(store, parent="web@1")
    web3 = _new(store, parent="web@2")
    sibling = _new(store, parent="web@1")  # web@4, on another branch
    store.transition(web2.id, Status.REVOKED, expect=Status.BUILT)  # after web@3 was made
    web5 = _new(store, parent="web@3")  # made after the revocation: inherits it
    store.transition(web1.id, Status.REVOKED, expect=Status.BUILT)
    web6 = _new(store, parent="web@5")
    ids = [web1.id, web2.id, web3.id, sibling.id, web5.id, web6.id]
    assert store.revoked_ancestors(ids) == {
        web1.id: [],
        web2.id: ["web@1"],
        web3.id: ["web@2", "web@1"],
        sibling.id: ["web@1"],
        web5.id: ["web@2", "web@1"],
        web6.id: ["web@2", "web@1"],
    }
    # A revoked version retired later is no longer flagged as a revoked ancestor.
    store.transition(web2.id, Status.RETIRED, expect=Status.REVOKED)
    assert store.revoked_ancestors([web6.id, 10**9]) == {web6.id: ["web@1"], 10**9: []}
    assert store.revoked_ancestors([]) == {}


def test_a_version_made_from_a_revoked_parent_has_it_as_revoked_ancestor(store: SqlStore) -> None:
    _new(store, status=Status.REVOKED)
    child = _new(store, parent="web@1")
    grandchild = _new(store, parent="web@2")
    assert store.revoked_ancestors([child.id, grandchild.id]) == {child.id: ["web@1"], grandchild.id: ["web@1"]}


def test_a_hand_made_cycle_cannot_make_lineage_queries_loop(store: SqlStore) -> None:
    a = _new(store)
    b = _new(store, parent="web@1")
    c = _new(store, parent="web@2")
    with store.engine.begin() as conn:  # web@1's parent becomes web@3: a cycle no amiforge can make
        conn.execute(versions_table.update().where(versions_table.c.id == a.id).values(parent_id=c.id))
        conn.execute(versions_table.update().where(versions_table.c.id == c.id).values(parent_id=c.id))
    assert _refs(store.ancestry(b.id)) == ["web@1"]  # links that go up in id are not followed
    assert store.ancestry(c.id) == []
    assert _refs(store.descendants(a.id)) == ["web@2"]
    store.transition(a.id, Status.REVOKED, expect=Status.BUILT)  # the revocation's walk ends too
    assert store.revoked_ancestors([b.id, c.id]) == {b.id: ["web@1"], c.id: []}


def test_version_states_resolve_many_refs_at_once(store: SqlStore) -> None:
    web1 = _new(store)
    web2 = _new(store, parent="web@1", status=Status.REVOKED)
    api1 = _new(store, "api", status=Status.BAKING)
    states = store.version_states(["web@1", "web@2", "api@1", "web@9", "nope", "web:dev", "web@" + "9" * 19])
    assert states == {"web@1": (web1.id, Status.BUILT), "web@2": (web2.id, Status.REVOKED),
                      "api@1": (api1.id, Status.BAKING)}  # fmt: skip
    assert store.version_states([]) == {}
    many = [f"web@{n}" for n in range(1, 1200)]
    assert set(store.version_states(many)) == {"web@1", "web@2"}


def test_revoking_records_every_descendant_once(store: SqlStore) -> None:
    root = _new(store)
    previous = root
    for _ in range(40):
        previous = _new(store, parent=previous.ref)
    store.transition(root.id, Status.REVOKED, expect=Status.BUILT)
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(revoked_ancestors_table.c.version_id, revoked_ancestors_table.c.ancestor_id)
        ).all()
    assert sorted(rows) == [(root.id + i, root.id) for i in range(1, 41)]

"""SqlStore checks that only mean something on a real PostgreSQL server: true write concurrency (no file lock
to serialise writers), concurrent migrations, a non-UTC session time zone, an unreachable server.

The store's core behaviour also runs against PostgreSQL from tests/unit/test_store.py when the same variable
is set. Set AMIFORGE_TEST_POSTGRES_URL=postgresql+psycopg://user@host:port/db to run; each test gets a fresh
schema (selected through search_path) that is dropped afterwards.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from amiforge.errors import InfraError, StateError
from amiforge.model import ImageVersion, Status
from amiforge.store.sql import SqlStore, open_store
from tests.conftest import require_postgres

POSTGRES_ENV = "AMIFORGE_TEST_POSTGRES_URL"
BASE_URL = os.environ.get(POSTGRES_ENV, "")


@pytest.fixture(autouse=True)
def _postgres_server() -> None:
    """Skipped without a server locally; in CI (CI=true) a missing server fails every test here."""
    require_postgres()


def _with_options(url: str, options: str) -> str:
    return sa.make_url(url).update_query_dict({"options": options}).render_as_string(hide_password=False)


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"amiforge_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(BASE_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        admin.dispose()


@pytest.fixture
def pg_url(schema: str) -> str:
    return _with_options(BASE_URL, f"-csearch_path={schema}")


def _in_threads(n: int, work: Callable[[int], None]) -> None:
    """Run work(0..n-1) in n threads released together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    failures: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as e:  # a thread's exception is otherwise lost
            failures.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


def _new(store: SqlStore, name: str = "web") -> ImageVersion:
    return store.create_version(
        name=name, recipe_digest="r", recipe_path="recipe.yaml", provider="local", tags={}, parent=None
    )


def test_concurrent_migrations_on_a_fresh_schema(pg_url: str) -> None:
    stores: list[SqlStore] = []
    _in_threads(4, lambda _: stores.append(open_store(pg_url)))
    try:
        with stores[0].engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
        assert versions == [_script_head()]
    finally:
        for s in stores:
            s.close()


def test_concurrent_creators_get_distinct_numbers(pg_url: str) -> None:
    open_store(pg_url).close()
    numbers: list[int] = []

    def create(_: int) -> None:
        with open_store(pg_url) as s:
            numbers.extend(_new(s).number for _ in range(6))

    _in_threads(4, create)
    assert sorted(numbers) == list(range(1, 25))


def test_concurrent_appenders_keep_one_chain(pg_url: str) -> None:
    open_store(pg_url).close()

    def append(i: int) -> None:
        with open_store(pg_url) as s:
            for j in range(5):
                s.append_event("tick", actor=f"worker-{i}", data={"j": j})

    _in_threads(4, append)
    with open_store(pg_url) as s:
        assert [e.seq for e in s.events()] == list(range(1, 21))
        assert s.verify_events() == []


def test_exactly_one_concurrent_transition_wins(pg_url: str) -> None:
    with open_store(pg_url) as s:
        v = s.transition(_new(s).id, Status.BUILT, expect=Status.BAKING, digest="d" * 64)
    outcomes: list[str] = []

    def advance(_: int) -> None:
        with open_store(pg_url) as mine:
            try:
                mine.transition(v.id, Status.TESTED, expect=Status.BUILT)
                outcomes.append("won")
            except StateError:
                outcomes.append("lost")

    _in_threads(4, advance)
    assert sorted(outcomes) == ["lost", "lost", "lost", "won"]


def test_a_revocation_racing_new_descendants_reaches_every_one(pg_url: str) -> None:
    """Creating a version from a parent and revoking an ancestor take one lock: whichever commits first, the new
    version ends up with the revoked ancestor (the revocation sees it, or it inherits the revocation)."""
    with open_store(pg_url) as s:
        root = s.transition(_new(s).id, Status.BUILT, expect=Status.BAKING)
        s.create_version(name="web", recipe_digest="r", recipe_path="r.yaml", provider="local", tags={},
                         parent="web@1")  # fmt: skip
    made: list[int] = []

    def work(i: int) -> None:
        with open_store(pg_url) as mine:
            if i == 0:
                mine.transition(root.id, Status.REVOKED, expect=Status.BUILT)
                return
            for _ in range(4):
                made.append(mine.create_version(name="web", recipe_digest="r", recipe_path="r.yaml", provider="local",
                                                tags={}, parent="web@2").id)  # fmt: skip

    _in_threads(4, work)
    with open_store(pg_url) as s:
        reach = s.revoked_ancestors(made)
    assert len(made) == 12
    assert reach == {version_id: ["web@1"] for version_id in made}


def test_timestamps_are_utc_whatever_the_session_time_zone(schema: str) -> None:
    url = _with_options(BASE_URL, f"-csearch_path={schema} -cTimeZone=Asia/Tokyo")
    with open_store(url) as s:
        created = _new(s)
        event = s.append_event("bake.started", actor="t", ref=created.ref)
        again = s.get_version(created.ref)
        assert again == created
        assert again.created_at.utcoffset() == timedelta(0)
        assert s.events() == [event]
        assert s.verify_events() == []  # the hash covers `at`, so its isoformat must not drift


def test_unreachable_server_is_a_retryable_infra_error() -> None:
    url = sa.make_url(BASE_URL).set(host="127.0.0.1", port=1).render_as_string(hide_password=False)
    with pytest.raises(InfraError) as err:
        open_store(url)
    assert err.value.retryable
    assert isinstance(err.value.__cause__, sa.exc.SQLAlchemyError)


def _script_head() -> str:
    """The newest revision among the migration scripts: an opened store must be at it."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from amiforge.store.sql import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    (head,) = ScriptDirectory.from_config(config).get_heads()
    return str(head)

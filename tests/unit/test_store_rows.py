"""The one generic row mapper (store/rows.py): fields by column name, converters, computed fields, and damage reports
that name the table and the row, for a single row and for a whole result."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from amiforge.errors import InfraError
from amiforge.model import LayerRecord, Status
from amiforge.store.rows import Computed, json_object, row_mapper
from amiforge.store.sql import SqlStore, open_store


@dataclass(frozen=True)
class Thing:
    id: int
    status: Status
    label: str
    size: int | None = None
    note: str = "none"


things = row_mapper(Thing, "things", status=Status, label=Computed(lambda row: f"{row['name']}#{row['id']}"))


def test_fields_by_name_with_converters_defaults_and_computed_fields() -> None:
    row = {"id": 7, "status": "built", "name": "web", "size": 3, "extra": "ignored"}
    assert things(row) == Thing(id=7, status=Status.BUILT, label="web#7", size=3)


def test_a_row_that_cannot_be_mapped_names_its_table_and_row() -> None:
    with pytest.raises(InfraError, match=r"the registry's things row id=7 is damaged: ValueError: 'exploded'") as e:
        things({"id": 7, "status": "exploded", "name": "web"})
    assert e.value.fix is not None and "restore it from a backup" in e.value.fix
    with pytest.raises(InfraError, match=r"things row id=8 is damaged: KeyError: .*no column 'status'"):
        things({"id": 8, "name": "web"})
    with pytest.raises(InfraError, match=r"things row id=\? is damaged"):
        things({"status": "built", "name": "web"})


def test_a_converter_for_no_field_is_a_mistake_at_once() -> None:
    with pytest.raises(TypeError, match="Thing has no field colour"):
        row_mapper(Thing, "things", colour=str)


def test_a_whole_result_maps_alike_and_names_the_damaged_row() -> None:
    engine = sa.create_engine("sqlite://")
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER, status TEXT, name TEXT, note TEXT)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1, 'built', 'a', 'n1'), (2, 'signed', 'b', NULL)")
        assert things.each(conn.exec_driver_sql("SELECT * FROM t ORDER BY id")) == [
            Thing(1, Status.BUILT, "a#1", note="n1"),
            Thing(2, Status.SIGNED, "b#2", note=None),  # type: ignore[arg-type]  # a NULL passes through as it is
        ]
        conn.exec_driver_sql("INSERT INTO t VALUES (3, 'melted', 'c', NULL)")
        with pytest.raises(InfraError, match="things row id=3 is damaged: ValueError"):
            things.each(conn.exec_driver_sql("SELECT * FROM t ORDER BY id"))
        with pytest.raises(InfraError, match=r"things row id=1 is damaged: KeyError: .*no column 'status'"):
            things.each(conn.exec_driver_sql("SELECT id, name FROM t ORDER BY id"))


def test_json_object_refuses_what_is_not_an_object() -> None:
    assert json_object(None) == {}
    assert json_object({"a": 1}) == {"a": 1}
    with pytest.raises(TypeError, match="expected a JSON object, found list"):
        json_object([1])


# --- through the store: damage in each table still names the row ------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    """web@1, web@2 (child of web@1), api@1; a layer and an event each."""
    with open_store(f"sqlite:///{tmp_path / 'registry.db'}") as s:
        for name, parent in (("web", None), ("web", "web@1"), ("api", None)):
            v = s.create_version(name=name, recipe_digest="r", recipe_path="r.yaml", provider="local", tags={},
                                 parent=parent)  # fmt: skip
            s.record_layers(v.id, [LayerRecord(0, "k" * 64, "base", True, 1.0, 10)])
            s.append_event("TEST", actor="TEST", ref=v.ref, data={"n": v.id})
        yield s


def _damage(store: SqlStore, sql: str) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql(sql)


def test_store_reads_name_the_damaged_version(store: SqlStore) -> None:
    _damage(store, "UPDATE versions SET status = 'exploded' WHERE id = 2")
    assert [v.ref for v in store.list_versions("api")] == ["api@1"]  # other rows read fine
    assert [v.ref for v in store.ancestry(2)] == ["web@1"]  # its parent reads fine
    reads: list[Callable[[], object]] = [
        lambda: store.list_versions(),
        lambda: store.list_versions(limit=5, summary=True),
        lambda: store.list_versions("web", limit=1, before=3),
        lambda: store.get_version("web@2"),
        lambda: store.descendants(1),
    ]
    for read in reads:
        with pytest.raises(InfraError, match=r"versions row id=2 is damaged: ValueError: 'exploded' is not a valid"):
            read()


def test_store_reads_name_the_damaged_layer_and_event(store: SqlStore) -> None:
    _damage(store, "UPDATE layers SET seconds = 'slow' WHERE version_id = 3")
    _damage(store, "UPDATE events SET data = '[1, 2]' WHERE seq = 2")
    _damage(store, "UPDATE versions SET tags = '\"a string\"' WHERE id = 1")
    with pytest.raises(InfraError, match="layers row index=0 is damaged: ValueError"):
        store.layers(3)
    with pytest.raises(InfraError, match="events row seq=2 is damaged: TypeError: expected a JSON object, found list"):
        store.events(limit=10)
    assert [e.seq for e in store.events("web@1")] == [1]
    with pytest.raises(InfraError, match="versions row id=1 is damaged: TypeError: expected a JSON object, found str"):
        store.get_version("web@1")


def test_store_reads_name_an_undecodable_time(store: SqlStore) -> None:
    _damage(store, "UPDATE versions SET created_at = 'yesterday' WHERE id = 3")
    with pytest.raises(InfraError, match="versions row id=3: created_at is not a date and time"):
        store.list_versions(limit=1)
    assert store.get_version("web@1").created_at < datetime.now(UTC)

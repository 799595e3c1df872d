"""The registry's JSON columns (store/schema.py: orjson, with the json module where orjson reads or writes otherwise):
values come back as they went in, old rows written by the json module still read, and what neither can store is
refused, not changed."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amiforge.store.schema import UndecodableValue, decode_json, encode_json
from amiforge.store.sql import open_store


def test_integers_past_64_bits_come_back_exact() -> None:
    value = {"n": 2**70, "m": -(2**65), "small": 2**63}
    assert decode_json(encode_json(value)) == value
    assert isinstance(decode_json(encode_json(value))["n"], int)


def test_rows_the_json_module_wrote_still_read() -> None:
    assert decode_json('{"a": 1, "b": [1, 2]}') == {"a": 1, "b": [1, 2]}  # its spacing
    assert math.isnan(decode_json('{"x": NaN}')["x"])  # NaN, which orjson refuses
    assert decode_json(b'{"a": "\\u00e9"}') == {"a": "é"}  # bytes, as some drivers hand them over
    with pytest.raises(UndecodableValue):
        decode_json("{not json")


def test_what_the_json_module_refused_is_refused_still_and_its_other_forms_are_kept() -> None:
    with pytest.raises(TypeError):
        encode_json({"at": datetime(2026, 1, 1, tzinfo=UTC)})  # a datetime must be made a string by the caller
    assert decode_json(encode_json({1: "a"})) == {"1": "a"}  # non-string keys, as json.dumps writes them
    assert encode_json({"x": float("nan")}) == '{"x":null}'  # NaN is not JSON: null


def test_an_event_with_a_big_integer_reads_back_exact_and_its_chain_verifies(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 'registry.db'}") as store:
        store.append_event("test.big", actor="test", data={"n": 2**70})
        (event,) = store.events()
        assert event.data == {"n": 2**70}
        assert store.verify_events() == []

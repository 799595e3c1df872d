"""The one duration grammar (amiforge.durations), and that recipes, policies and strategies read it alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from amiforge.durations import FORMS, format_duration, parse_duration, seconds_of
from amiforge.errors import ConfigError, Problem
from amiforge.policy import parse_policy
from amiforge.recipe import parse_recipe
from amiforge.strategy import parse_strategy


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1h2m3s", 3723.0),
        ("1.5s", 1.5),
        (" 45s ", 45.0),
        ("30", 30.0),
        (90, 90.0),
        (2.5, 2.5),
    ],
)
def test_durations_parse(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "2 minutes",
        "90sec",
        "1w",
        "30s1m",
        "1m1m",
        "-5s",
        "0s",
        0,
        -1,
        True,
        None,
        [],
        "1h 2m",
        float("nan"),
        float("inf"),
        "inf",
        10**400,
    ],
)
def test_bad_durations_list_the_accepted_forms(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(value)
    shown = caught.value.diagnostics()  # what a person reads: the message, then the fix
    assert "90s" in shown and "1h30m" in shown and "1d12h" in shown


@pytest.mark.parametrize("value", ["367d", "999999999999h", 10**12])
def test_durations_longer_than_a_year_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="is longer than 366d"):
        parse_duration(value)


def test_one_grammar_takes_days() -> None:
    assert parse_duration("1d12h") == 129600.0


@pytest.mark.parametrize("seconds", [0.0, 0.5, 1.5, 90.0, 93784.5, 0.0015, 1.000001, 366 * 86400.0])
def test_formatted_durations_read_back_as_the_same_value(seconds: float) -> None:
    assert seconds_of(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


def test_a_flag_is_named_and_a_file_field_is_not_repeated() -> None:
    with pytest.raises(ConfigError, match=r"^--min-age 'soon' is not a positive duration$"):
        parse_duration("soon", what="--min-age")
    with pytest.raises(ConfigError, match=r"^'soon' is not a positive duration$"):
        parse_duration("soon", what="")  # inside a file the problem's field names it


# ----------------------------------------------------------------------------------------------------------
# The same grammar in all three files


def _recipe(tmp_path: Path, value: str) -> object:
    return parse_recipe(f"name: web\nchecks:\n  ready_within: {value}\n", tmp_path / "recipe.yaml").checks.ready_within


def _policy(tmp_path: Path, value: str) -> object:
    text = f"channels:\n  dev: {{}}\n  qa:\n    after: dev\n    min_soak: {value}\n"
    return parse_policy(text, tmp_path / "policy.yaml").channels["qa"].min_soak


def _strategy(tmp_path: Path, value: str) -> object:
    return parse_strategy(f"waves: [1, 100%]\nbake_time: {value}\n", tmp_path / "strategy.yaml").bake_time


FILES: dict[str, tuple[Callable[[Path, str], object], str]] = {
    "recipe": (_recipe, "checks.ready_within"),
    "policy": (_policy, "channels.qa.min_soak"),
    "strategy": (_strategy, "bake_time"),
}


@pytest.mark.parametrize("value", ["90s", "1m30s", "0.01d", "0d1h", "1h", "3600"])
def test_every_file_reads_the_same_seconds(tmp_path: Path, value: str) -> None:
    expected = parse_duration(value)
    assert _recipe(tmp_path, value) == expected
    assert _policy(tmp_path, value) == timedelta(seconds=expected)
    assert _strategy(tmp_path, value) == expected


def test_days_work_in_a_recipe_and_its_own_bounds_say_so(tmp_path: Path) -> None:
    assert _recipe(tmp_path, "0.01d") == 864.0  # the recipe reads days like every other file
    assert _policy(tmp_path, "1d12h") == timedelta(days=1, hours=12)
    assert _strategy(tmp_path, "1d") == 86400.0
    # 1d is a duration; it is the boot test's own limit that refuses it, by field, with the fix.
    with pytest.raises(ConfigError) as caught:
        _recipe(tmp_path, "1d")
    (problem,) = caught.value.problems
    assert problem.field == "checks.ready_within"
    assert problem.message == "ready_within is 1d; a boot test waits between 1s and 1h"
    assert problem.fix is not None and "from 1s to 1h" in problem.fix


def _problem(tmp_path: Path, file: str, value: str) -> Problem:
    read, field = FILES[file]
    with pytest.raises(ConfigError) as caught:
        read(tmp_path, value)
    (problem,) = caught.value.problems
    assert problem.field == field
    return problem


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("2 minutes", "'2 minutes'"),
        ("1w", "'1w'"),
        ("30s1m", "'30s1m'"),
        ("1h 2m", "'1h 2m'"),
        ("-5s", "'-5s'"),
        ("inf", "'inf'"),
        (".inf", "inf"),
        (".nan", "nan"),
        ("true", "True"),
        ("[]", "[]"),
    ],
)
def test_the_same_bad_input_is_the_same_error_in_every_file(tmp_path: Path, value: str, shown: str) -> None:
    problems = {file: _problem(tmp_path, file, value) for file in FILES}
    # Only what each field allows differs: a boot cannot take no time at all; a soak or a bake time can.
    assert problems["recipe"].message == f"{shown} is not a positive duration"
    assert problems["policy"].message == problems["strategy"].message == f"{shown} is not a duration"
    assert {p.fix for p in problems.values()} == {f"use {FORMS}"}


@pytest.mark.parametrize("value", ["367d", "999999999999h", "99999999999"])
def test_the_same_endless_duration_is_the_same_error_in_every_file(tmp_path: Path, value: str) -> None:
    problems = {file: _problem(tmp_path, file, value) for file in FILES}
    assert len({p.message for p in problems.values()}) == 1
    assert all(p.message.endswith("is longer than 366d") for p in problems.values())
    assert {p.fix for p in problems.values()} == {"use a duration of at most 366d"}

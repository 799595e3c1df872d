"""Fuzzing the edges a hostile user reaches: recipe, policy and strategy files, and command lines.

Whatever comes in, the answer is a value or an amiforge error with an exit code of its own — never exit 70 (an
internal error) and never a traceback. The shapes mix the keys each file knows with values chosen to break
parsers: numbers too big to convert or to hold, inf and nan, markup, control characters, deep nesting.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amiforge.errors import ConfigError
from amiforge.policy import parse_policy
from amiforge.recipe import parse_recipe
from amiforge.strategy import parse_strategy
from tests.cli_harness import Cli, isolate, make_cli

HUGE = "HUGE-INTEGER"
HOSTILE_SCALARS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.just(HUGE),  # a number with more digits than Python converts (put in after dumping)
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "",
            " ",
            "[/]",
            "[bold]x[/]",
            "90s",
            "1d",
            "0",
            "-1",
            "inf",
            ".nan",
            "1e309",
            "25%",
            "100%",
            "web@1",
            "../../etc/passwd",
            "/dev/zero",
            "a" * 300,
            "\x1b[31m",
            "ü€𝄞",
            "null",
            "~",
            "yes",
            "0o777",
            "99999999999999h",
        ]
    ),
    st.text(max_size=20),
    st.booleans(),
    st.none(),
)

RECIPE_KEYS = [
    "name",
    "description",
    "base",
    "provider",
    "steps",
    "checks",
    "tags",
    "type",
    "region",
    "source",
    "packages",
    "file",
    "src",
    "dest",
    "mode",
    "shell",
    "service",
    "enable",
    "user",
    "ready_within",
    "units",
    "commands",
    "run",
    "expect_exit",
    "http",
    "port",
    "path",
    "distribution",
    "regions",
    "publish",
]
POLICY_KEYS = [
    "channels",
    "dev",
    "staging",
    "prod",
    "after",
    "min_soak",
    "max_cve_severity",
    "fixed_only",
    "unknown_cve_severity",
    "allow_secrets",
    "waivers",
    "finding",
    "package",
    "reason",
    "by",
    "expires",
]
STRATEGY_KEYS = [
    "waves",
    "bake_time",
    "gates",
    "boot_success_rate",
    "time_to_ready_p95",
    "alarms",
    "error_budget",
    "slo",
    "max_burn_rate",
    "mode",
    "min_healthy_percentage",
]


def documents(keys: list[str]) -> st.SearchStrategy[str]:
    """YAML documents built from a file's own keys and hostile values, nested a few levels."""
    tree = st.recursive(
        HOSTILE_SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.sampled_from(keys), children, max_size=5),
        ),
        max_leaves=25,
    )
    top = st.dictionaries(st.sampled_from(keys), tree, min_size=1, max_size=6)
    return top.map(lambda data: yaml.safe_dump(data, allow_unicode=True).replace(HUGE, "9" * 5000))


def raw_text() -> st.SearchStrategy[str]:
    """Text that is not a document at all: fragments, deep nesting, aliases, control characters."""
    return st.one_of(
        st.text(max_size=200),
        st.integers(min_value=1, max_value=5000).map(lambda n: "[" * n),
        st.integers(min_value=1, max_value=3000).map(lambda n: "a:\n" + "  " * n + "b: 1"),
        st.just("a: &x [1, 2]\nb: [*x, *x, *x, *x]\n" * 3),
        st.just("name: web\nchecks: {ready_within: " + "9" * 5000 + "}\n"),
    )


FILES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Not measured for coverage (pytest-cov's no_cover): under a tracer PyYAML's pure-Python scanner, quadratic on the deep
# flow collections generated here, runs 3-10x slower, which alone would add minutes to `make test`.
@pytest.mark.no_cover
@pytest.mark.parametrize(
    ("parse", "keys"),
    [(parse_recipe, RECIPE_KEYS), (parse_policy, POLICY_KEYS), (parse_strategy, STRATEGY_KEYS)],
    ids=["recipe", "policy", "strategy"],
)
def test_any_file_is_a_value_or_a_config_error(parse: Callable[[str, Path], object], keys: list[str]) -> None:
    @FILES
    @given(text=st.one_of(documents(keys), raw_text()))
    def run(text: str) -> None:
        try:
            parse(text, Path("/nonexistent/input.yaml"))
        except ConfigError as e:
            assert e.problems or e.fix, "a refusal must say what to fix"

    with _untraced():
        run()


@contextmanager
def _untraced() -> Iterator[None]:
    """No tracer at all while the block runs. In a pytest-xdist worker two coverage collectors run (pytest-cov's, and
    the one coverage's `patch = ["subprocess"]` starts in every Python subprocess); no_cover stops pytest-cov's, and
    coverage then resumes the other: the test ran 5x slower under `make test` than alone."""
    tracer = sys.gettrace()
    sys.settrace(None)
    try:
        yield
    finally:
        sys.settrace(tracer)  # coverage's CTracer puts itself back the C way on the next call


# --- command lines ---------------------------------------------------------------------------------------------

COMMANDS = [
    ["images", "list"],
    ["images", "show"],
    ["images", "diff"],
    ["events"],
    ["channels"],
    ["scan"],
    ["sbom"],
    ["sign"],
    ["verify"],
    ["promote"],
    ["revoke"],
    ["rollout", "status"],
    ["rollout", "start"],
    ["rollout", "pause"],
    ["rollback"],
    ["incident"],
    ["gc"],
    ["keys", "trust"],
    ["keys", "list"],
    ["keys", "generate"],
    ["keys", "revoke"],
    ["vulndb", "import"],
    ["vulndb", "status"],
    ["recipe", "validate"],
    ["import", "packer"],
    ["fleet", "show"],
    ["fleet", "list"],
    ["distribute"],
    ["doctor"],
    ["recipe", "schema"],
]
OPTIONS = [
    "--json",
    "--name",
    "--region",
    "--limit",
    "--hours",
    "--min-age",
    "--max",
    "--channel",
    "--version",
    "--target",
    "--strategy",
    "--reason",
    "--key",
    "--import",
    "--dir",
    "--waves",
    "--bake-time",
    "--format",
    "-o",
    "--recipe",
    "--build",
    "--kms-key",
    "--kms-region",
    "--apply",
    "--all",
    "--verify",
    "--to",
]
VALUES = [
    "web@1",
    "web@0",
    "web@99999999999999999999",
    "web@" + "9" * 5000,
    "web:dev",
    "sha256:",
    "deadbeef",
    "[/]",
    "inf",
    "nan",
    "-1",
    "1e309",
    "99999999999999999999",
    "",
    " ",
    "x" * 300,
    "eu-west-1",
    "a b",
    "a/../b",
    "/dev/zero",
    "/dev/null",
    "local:web",
    "aws:eu-west-1/x",
    "aws:",
    "1,25%,100%",
    "999999h",
    "0",
    "spdx",
    "ü€",
    "FIFO",  # FIFOs in the working directory: wherever a file goes, it must never block
    "FIFO.json",
    "FIFO.zip",
]


@pytest.fixture
def fuzz_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    isolate(tmp_path, monkeypatch)
    for name in ("FIFO", "FIFO.json", "FIFO.zip"):
        os.mkfifo(tmp_path / name)  # relative to the working directory, as the tokens name them
    yield make_cli(monkeypatch, capsys)


class _Hang(Exception):
    pass


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise _Hang("the command did not finish in 30 s")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(COMMANDS),
    rest=st.lists(st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES)), max_size=6),
)
def test_no_command_line_ends_in_an_internal_error(fuzz_cli: Cli, command: list[str], rest: list[str]) -> None:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        result = fuzz_cli(*command, *rest)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    shown = result.out + result.err
    assert result.code != 70, f"amiforge {' '.join(command + rest)!r} -> internal error:\n{shown[-2000:]}"
    assert "Traceback (most recent call last)" not in shown
    assert result.code in (0, 2, 3, 4, 5), f"unexpected exit {result.code}: {shown[-500:]}"

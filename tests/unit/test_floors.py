"""The import-linter contracts (pyproject.toml) cover every module: a new module cannot slip past the boto3 rule
by not being listed, and every floor of the layers contract names a package that exists."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "amiforge"
# What may import boto3: the AWS provider and the AWS API layer.
EXEMPT = ("amiforge.providers.aws", "amiforge.awsapi")


def _contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def _modules() -> list[str]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(found)


def _covered(module: str, source: str, *, as_package: bool) -> bool:
    return module == source or (as_package and module.startswith(source + "."))


def test_every_module_but_the_aws_ones_is_held_to_the_boto3_rule() -> None:
    boto = [c for c in _contracts() if c["type"] == "forbidden" and "boto3" in c["forbidden_modules"]]
    assert boto, "the boto3 contract is gone"
    uncovered = [
        m
        for m in _modules()
        if not any(_covered(m, e, as_package=True) for e in EXEMPT)
        and not any(
            _covered(m, source, as_package=c.get("as_packages", True)) for c in boto for source in c["source_modules"]
        )
    ]
    assert uncovered == [], f"add these to a boto3 contract's source_modules in pyproject.toml: {uncovered}"


def test_the_floors_name_packages_that_exist() -> None:
    [layers] = [c for c in _contracts() if c["type"] == "layers"]
    modules = set(_modules())
    named = [name.strip() for floor in layers["layers"] for name in floor.replace(":", "|").split("|")]
    assert [n for n in named if n not in modules] == []
    top = {m.split(".")[1] for m in modules if m.count(".") >= 1 and not m.endswith("__main__")}
    assert top <= {n.split(".")[1] for n in named}, "a top-level package or module is on no floor"

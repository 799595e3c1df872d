"""What a scanner is, and how scanners report bad input.

A scanner looks at an image — its root filesystem and the package list (the SBOM) read from it — and returns findings.
Findings are values (docs/architecture.md §3, §7): a scanner never decides what a finding means for a channel;
the scan gate does.

Errors: there is no scanner-specific error family. Input a scanner reads that is malformed (a dpkg database, an advisory
feed, a Trivy or Grype report) is a `ConfigError` carrying one `Problem` per defect, each naming the file, the field and
the fix, all collected before raising. A tool or service that fails to answer is the caller's `InfraError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from amiforge.errors import ConfigError, Problem
from amiforge.model import Finding, Package


class Scanner(Protocol):
    """Turns an image's files and its package list into findings."""

    # A read-only property so that a class attribute, a ClassVar or a dataclass field all satisfy it.
    @property
    def name(self) -> str: ...

    def scan(self, rootfs: Path, packages: Sequence[Package]) -> list[Finding]: ...


def malformed(what: str, problems: Sequence[Problem], *, fix: str | None = None) -> ConfigError:
    """The one error every scanner input parser raises: `what` is malformed, with every problem found."""
    count = len(problems)
    noun = "problem" if count == 1 else "problems"
    return ConfigError(f"{what} is malformed ({count} {noun})", problems=problems, fix=fix)

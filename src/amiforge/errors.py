"""The whole error tree. Every error a user can see is an AmiforgeError.

Each family fixes the process exit code (docs/architecture.md §6) and the HTTP status the web app answers with.
`diagnostics()` is what a person reads: what went wrong and how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where it is (file, line, field), what is wrong, and the fix."""

    message: str
    file: str | None = None
    line: int | None = None
    field: str | None = None
    fix: str | None = None

    def render(self) -> str:
        where = self.file or ""
        if self.file and self.line is not None:
            where += f":{self.line}"
        head = f"{where}: " if where else ""
        field = f"{self.field}: " if self.field else ""
        tail = f" (fix: {self.fix})" if self.fix else ""
        return f"{head}{field}{self.message}{tail}"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "message": self.message,
            "fix": self.fix,
        }


class AmiforgeError(Exception):
    """Base of every error amiforge raises on purpose."""

    exit_code: int = 1
    http_status: int = 500
    kind: str = "error"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def diagnostics(self) -> str:
        text = self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text

    def as_dict(self) -> dict[str, object]:
        return {"error": self.kind, "message": self.message, "fix": self.fix, "exit_code": self.exit_code}


class ConfigError(AmiforgeError):
    """Bad recipe, policy, settings or arguments. Carries every problem found, not just the first."""

    exit_code = 2
    http_status = 400
    kind = "config"

    def __init__(self, message: str, *, problems: Sequence[Problem] = (), fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.problems = list(problems)

    def diagnostics(self) -> str:
        lines = [self.message]
        lines += [f"  - {p.render()}" for p in self.problems]
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {**super().as_dict(), "problems": [p.as_dict() for p in self.problems]}


class NotFound(AmiforgeError):
    """An unknown version, channel, target or file."""

    exit_code = 3
    http_status = 404
    kind = "not_found"


class StateError(AmiforgeError):
    """An illegal transition, or one lost to a concurrent writer (compare-and-set)."""

    exit_code = 3
    http_status = 409
    kind = "state"


@dataclass(frozen=True)
class GateFailure:
    """One failed item of a gate: a boot check, a finding, a signature."""

    name: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "detail": self.detail}


class GateFailed(AmiforgeError):
    """A gate (boot test, scan, signature, canary, blast radius) said no. Lists each offending item."""

    exit_code = 4
    http_status = 422
    kind = "gate"

    def __init__(self, gate: str, failures: Sequence[GateFailure], *, fix: str | None = None) -> None:
        super().__init__(f"{gate} gate failed: {len(failures)} item(s)", fix=fix)
        self.gate = gate
        self.failures = list(failures)

    def diagnostics(self) -> str:
        lines = [self.message] + [f"  - {f.name}: {f.detail}" for f in self.failures]
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {**super().as_dict(), "gate": self.gate, "failures": [f.as_dict() for f in self.failures]}


_INFRA_FIX = "`amiforge doctor` checks this machine's tools and the registry; rerun with --debug for the details"


class InfraError(AmiforgeError):
    """A provider, the store or an external tool failed. Says whether retrying can help."""

    exit_code = 5
    http_status = 502
    kind = "infra"

    def __init__(self, message: str, *, retryable: bool = False, fix: str | None = None) -> None:
        # Never without a way forward: where the raiser knows none better, the checks amiforge itself offers.
        super().__init__(message, fix=fix or _INFRA_FIX)
        self.retryable = retryable

    def diagnostics(self) -> str:
        text = super().diagnostics()
        return text + ("\n  a retry may help" if self.retryable else "")

    def as_dict(self) -> dict[str, object]:
        return {**super().as_dict(), "retryable": self.retryable}


class PartlyDone(AmiforgeError):
    """An operation over several places (regions, accounts) failed at one after it had done others: `error` is that
    failure, and `done` what did happen, for the caller to record before it reports `error`. Whoever does not unwrap
    it sees the failure itself: its message, fix, exit code and kind are `error`'s."""

    def __init__(self, error: AmiforgeError, done: Sequence[Mapping[str, object]]) -> None:
        super().__init__(error.message, fix=error.fix)
        self.error = error
        self.done = tuple(done)
        self.exit_code, self.http_status, self.kind = error.exit_code, error.http_status, error.kind

    def diagnostics(self) -> str:
        return self.error.diagnostics()

    def as_dict(self) -> dict[str, object]:
        return self.error.as_dict()


class ToolMissing(InfraError):
    """A system tool amiforge needs (qemu, mmdebstrap, …) is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"required tool '{tool}' is not installed",
            fix=f"apt-get install {package}  (`make demo` installs everything; `amiforge doctor` lists the rest)",
        )
        self.tool = tool
        self.package = package

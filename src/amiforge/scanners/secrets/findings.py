"""The closed table of secret and residue rules, and how a match becomes a reported Finding.

Every finding names one rule of `RULES`; detectors (`content`, `paths`, `raw`) report `Hit`s, and the walk turns
them into Findings with `make_finding()`. A finding never carries a secret: `redact()` keeps at most a token's
well-known prefix and its length. `dedupe()` keeps one finding per place where rules overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from amiforge.model import Finding, FindingKind, Severity

__all__ = ["RULES", "Hit", "Rule", "dedupe", "is_placeholder", "line_of", "make_finding", "redact"]


@dataclass(frozen=True)
class Rule:
    id: str
    kind: FindingKind
    severity: Severity
    title: str

    @property
    def source(self) -> str:
        return "residue" if self.kind is FindingKind.RESIDUE else "secrets"


_S, _R = FindingKind.SECRET, FindingKind.RESIDUE
RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        Rule("private-key", _S, Severity.CRITICAL, "private key"),
        Rule("aws-access-key", _S, Severity.HIGH, "AWS access key id"),
        Rule("aws-credentials", _S, Severity.CRITICAL, "AWS credentials file with a secret access key"),
        Rule("gcp-service-account-key", _S, Severity.CRITICAL, "GCP service-account key file"),
        Rule("azure-client-secret", _S, Severity.CRITICAL, "Azure client secret"),
        Rule("azure-token-cache", _S, Severity.HIGH, "Azure CLI token cache"),
        Rule("netrc-password", _S, Severity.HIGH, "password in a netrc-format file"),
        Rule("kubeconfig-credentials", _S, Severity.HIGH, "kubeconfig with user credentials"),
        Rule("docker-config-auth", _S, Severity.HIGH, "Docker registry credentials"),
        Rule("dotenv-secret", _S, Severity.HIGH, "secret in an environment file"),
        Rule("github-token", _S, Severity.HIGH, "GitHub token"),
        Rule("gitlab-token", _S, Severity.HIGH, "GitLab token"),
        Rule("slack-token", _S, Severity.HIGH, "Slack token or webhook"),
        Rule("database-url-password", _S, Severity.HIGH, "database URL with a password"),
        Rule("unreadable", _S, Severity.UNKNOWN, "file or directory could not be read, so it was not scanned"),
        Rule("ssh-host-key", _R, Severity.HIGH, "SSH host private key (every clone would share it)"),
        Rule("machine-id", _R, Severity.MEDIUM, "machine-id is set (every clone would share it)"),
        Rule("systemd-credential-secret", _R, Severity.HIGH, "systemd credential host secret"),
        Rule("shell-history", _R, Severity.MEDIUM, "shell or tool history left in a home directory"),
        Rule("cloud-init-state", _R, Severity.MEDIUM, "cloud-init instance state left behind"),
        Rule("cloud-init-user-data", _R, Severity.HIGH, "cloud-init user-data left behind"),
        Rule("unexpected-authorized-keys", _R, Severity.HIGH, "authorized_keys the recipe did not put there"),
    )
}


@dataclass(frozen=True)
class Hit:
    """One match inside a file, before it becomes a Finding. `pos` is a character offset into the text."""

    rule: str
    pos: int | None
    redacted: str | None
    title: str | None = None  # overrides the rule's title
    severity: Severity | None = None  # overrides the rule's severity


def make_finding(
    rule_id: str,
    path: str,
    *,
    line: int | None,
    redacted: str | None,
    title: str | None = None,
    severity: Severity | None = None,
    source: str | None = None,
) -> Finding:
    rule = RULES[rule_id]
    return Finding(
        kind=rule.kind,
        id=rule.id,
        severity=severity or rule.severity,
        title=title or rule.title,
        source=source or rule.source,
        path=path,
        line=line,
        redacted=redacted,
    )


def redact(value: str) -> str:
    # Four characters of a long token are its well-known prefix (ghp_, AKIA, xoxb): they say what it is without
    # helping anyone use it. A short value (a password) shows nothing but its length.
    shown = value[:4] if len(value) >= 16 else ""
    return f"{shown}…({len(value)} chars)"


# Values that documentation, templates and examples put where a password goes; flagging them would bury real
# findings under every README that shows a connection string.
_PLACEHOLDER = re.compile(
    r"(?:password|passwd|pass|pwd|secret|changeme|change_?me|example|none|null|your[_-]?\w*|[x*.]+|<[^>]*>"
    r"|\$\{?[\w:.-]*\}?|%\(?\w*\)?s|%s|\{\{?[^}]*\}\}?|\[[^\]]*\])",
    re.IGNORECASE,
)


def is_placeholder(value: str) -> bool:
    return not value or value.startswith("$") or _PLACEHOLDER.fullmatch(value) is not None


def line_of(text: str, pos: int) -> int:
    """1-based line of character offset `pos` in `text`."""
    return text.count("\n", 0, pos) + 1


def dedupe(findings: list[Finding]) -> list[Finding]:
    """One finding per (path, line): where rules overlap (an Azure secret in a .env file) the most severe wins,
    then the earlier rule in the table (the more specific one)."""
    order = {rule_id: i for i, rule_id in enumerate(RULES)}
    best: dict[tuple[str | None, int | str | None], Finding] = {}
    for f in findings:
        key = (f.path, f.line if f.line is not None else f.id)
        old = best.get(key)
        if old is None or (-f.severity.rank, order[f.id]) < (-old.severity.rank, order[old.id]):
            best[key] = f
    return sorted(best.values(), key=lambda f: (f.path or "", f.line or 0, f.id))

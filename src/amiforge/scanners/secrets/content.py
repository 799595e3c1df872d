"""The content detectors: credentials recognised by what a file says, wherever it is.

Private keys (a PEM/PGP/PuTTY header *followed by a key body*), AWS key ids (with their secret nearby), GitHub,
GitLab and Slack tokens (detect-secrets' own patterns, run with `finditer` here: its `analyze_line` may call a
plugin's `verify()`, a network request from a build host), database URLs with a password, Azure client secrets,
GCP service-account keys and kubeconfigs. Each rule of `CONTENT_RULES` is gated by literal-prefixed byte patterns,
so the detailed patterns only run on the few files that can match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.slack import SlackDetector

from amiforge.model import Severity
from amiforge.scanners.secrets.findings import Hit, is_placeholder, line_of, redact

__all__ = ["CONTENT_RULES", "KEY_LABEL", "ContentRule", "kube_credentials"]

# so character offsets are byte offsets and nothing fails to decode).

# A PEM or PGP armour header followed by a key body: up to 4 armour header lines (Proc-Type, DEK-Info, Version,
# a blank line), then a line of base64. The `\\n` branch is a key inside a JSON or YAML string.
KEY_LABEL = r"(?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY|PGP PRIVATE KEY BLOCK"
_PEM_KEY = re.compile(
    rf"-----BEGIN (?P<label>{KEY_LABEL})-----[ \t]*"
    r"(?:\r?\n(?:[^\r\n]{0,100}\r?\n){0,4}?|(?:\\r)?\\n)"
    r"[A-Za-z0-9+/]{40}"
)
_SSH2_KEY = re.compile(r"---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\r?\n(?:[^\r\n]{0,100}\r?\n){0,4}?[A-Za-z0-9+/]{40}")
_PUTTY_KEY = re.compile(r"PuTTY-User-Key-File-\d: [^\r\n]+\r?\n(?:[^\r\n]{0,200}\r?\n){0,40}?Private-Lines: \d+")


def _private_keys(text: str) -> Iterator[Hit]:
    for m in _PEM_KEY.finditer(text):
        # A NUL right before the header makes it a C string in a binary: libraries compile in self-test keys
        # (libgnutls has several). A key file, or a key pasted into a text file, starts at 0 or after text.
        if m.start() > 0 and text[m.start() - 1] == "\x00":
            continue
        yield Hit("private-key", m.start(), f"-----BEGIN {m['label']}----- …")
    for m in _SSH2_KEY.finditer(text):
        yield Hit("private-key", m.start(), "---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ---- …")
    for m in _PUTTY_KEY.finditer(text):
        yield Hit("private-key", m.start(), "PuTTY-User-Key-File …")


def _bounded(pattern: re.Pattern[str], before: str = r"A-Za-z0-9_", after: str = r"A-Za-z0-9_") -> re.Pattern[str]:
    # detect-secrets' patterns have no word boundaries; without them a token pattern matches inside any longer
    # run of letters and digits (base64 blobs, hashes).
    return re.compile(rf"(?<![{before}])(?:{pattern.pattern})(?![{after}])", pattern.flags)


_AWS_KEY_ID = _bounded(AWSKeyDetector.denylist[0], "A-Z0-9", "A-Z0-9")
# A secret access key: 40 characters of base64 alphabet, standing alone. Mixed case and a digit or /+ tell it
# from a hex digest (git and sha1 sums are 40 hex characters).
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_AWS_SECRET_NEAR_LINES = 20


def _aws_secret_like(s: str) -> bool:
    return (
        any(c.islower() for c in s)
        and any(c.isupper() for c in s)
        and any(c.isdigit() or c in "/+" for c in s)
        and not re.fullmatch(r"[0-9a-fA-F]{40}", s)
    )


def _aws_keys(text: str) -> Iterator[Hit]:
    secrets: list[tuple[int, bool]] | None = None  # (line, keyword-labelled) of each secret key candidate
    for m in _AWS_KEY_ID.finditer(text):
        key_id = m.group()
        # AKIA: long-term keys, ASIA: temporary (STS) keys. The other prefixes detect-secrets knows (A3T, ABIA,
        # ACCA) are not access key ids one can sign requests with. AWS's documentation examples end in EXAMPLE
        # and ship inside botocore and the AWS CLI.
        if not key_id.startswith(("AKIA", "ASIA")) or key_id.endswith("EXAMPLE"):
            continue
        if secrets is None:  # only files with a real key id pay for the unanchored secret search
            secrets = _aws_secret_candidates(text)
        line = line_of(text, m.start())
        if any(labelled or abs(ln - line) <= _AWS_SECRET_NEAR_LINES for ln, labelled in secrets):
            title = "AWS access key id with its secret access key"
            yield Hit("aws-access-key", m.start(), redact(key_id), title, Severity.CRITICAL)
        else:
            yield Hit("aws-access-key", m.start(), redact(key_id))


def _aws_secret_candidates(text: str) -> list[tuple[int, bool]]:
    found = []
    for m in _AWS_SECRET.finditer(text):
        if _aws_secret_like(m.group()):
            line_start = text.rfind("\n", 0, m.start()) + 1
            found.append((line_of(text, m.start()), "secret" in text[line_start : m.start()].lower()))
    return found


_GITHUB_TOKEN = _bounded(GitHubTokenDetector.denylist[0])
_GITHUB_PAT = re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,255}(?![A-Za-z0-9_])")
_GITLAB_TOKENS = tuple(_bounded(p, after=r"A-Za-z0-9_\-") for p in GitLabTokenDetector.denylist)
_SLACK = tuple(_bounded(p, after=r"A-Za-z0-9_\-") for p in SlackDetector.denylist)
_SLACK_MIN_LEN = 24  # the token pattern alone accepts "xoxo-1-a"; real tokens are 50+ characters


def _token_hits(rule: str, patterns: Sequence[re.Pattern[str]], text: str, min_len: int = 0) -> Iterator[Hit]:
    for pattern in patterns:
        for m in pattern.finditer(text):
            if len(m.group()) >= min_len:
                yield Hit(rule, m.start(), redact(m.group()))


def _github(text: str) -> Iterator[Hit]:
    return _token_hits("github-token", (_GITHUB_TOKEN, _GITHUB_PAT), text)


def _gitlab(text: str) -> Iterator[Hit]:
    return _token_hits("gitlab-token", _GITLAB_TOKENS, text)


def _slack(text: str) -> Iterator[Hit]:
    return _token_hits("slack-token", _SLACK, text, _SLACK_MIN_LEN)


_URL_USERINFO = re.compile(r"://(?P<user>[^\s/@:'\"<>]*):(?P<password>[^\s/@'\"<>]+)@(?P<host>[A-Za-z0-9.\-\[\]:]*)")
_DB_SCHEME = re.compile(r"(?<![A-Za-z0-9+.-])(?:postgres(?:ql)?|mysql|mariadb|mongodb(?:\+srv)?|rediss?|amqps?)\Z")


def _database_urls(text: str) -> Iterator[Hit]:
    for m in _URL_USERINFO.finditer(text):
        scheme = _DB_SCHEME.search(text, max(0, m.start() - 16), m.start())
        if scheme is None or is_placeholder(m["password"]):
            continue
        redacted = f"{scheme.group()}://{m['user']}:…({len(m['password'])} chars)@{m['host']}"
        yield Hit("database-url-password", scheme.start(), redacted)


_AZURE_SECRET = re.compile(r"AZURE_CLIENT_SECRET[\"']?\s*[:=]\s*[\"']?(?P<value>[^\s\"'#,;]+)")


def _azure_client_secret(text: str) -> Iterator[Hit]:
    for m in _AZURE_SECRET.finditer(text):
        if not is_placeholder(m["value"]):
            yield Hit("azure-client-secret", m.start(), f"AZURE_CLIENT_SECRET=…({len(m['value'])} chars)")


_GCP_TYPE = re.compile(r"\"type\"\s*:\s*\"service_account\"")
_GCP_KEY = re.compile(r"\"private_key\"\s*:\s*\"(?P<value>[^\"]*PRIVATE KEY[^\"]*)\"")
_GCP_EMAIL = re.compile(r"\"client_email\"\s*:\s*\"(?P<value>[^\"]{1,200})\"")


def _gcp_service_account(text: str) -> Iterator[Hit]:
    if _GCP_TYPE.search(text) is None:
        return
    for m in _GCP_KEY.finditer(text):
        email = _GCP_EMAIL.search(text)
        who = f" of {email['value']}" if email else ""  # the account name is not a secret, and says whose key
        yield Hit("gcp-service-account-key", m.start(), f"private_key{who} …({len(m['value'])} chars)")


# kubeconfig: a YAML document `kind: Config` with user credentials (a bearer token, a client key, a password).
_KUBE_CONFIG = re.compile(r"^kind:\s*[\"']?Config[\"']?\s*$", re.MULTILINE)
_KUBE_CRED = re.compile(
    r"^[ \t-]*(?P<field>token|client-key-data|password):[ \t]*[\"']?(?P<value>[^\s\"'#]+)", re.MULTILINE
)


def kube_credentials(text: str) -> Iterator[Hit]:
    for m in _KUBE_CRED.finditer(text):
        if not is_placeholder(m["value"]):
            yield Hit("kubeconfig-credentials", m.start("field"), f"{m['field']}: …({len(m['value'])} chars)")


def _kubeconfig_by_content(text: str) -> Iterator[Hit]:
    if _KUBE_CONFIG.search(text) is not None:
        yield from kube_credentials(text)


@dataclass(frozen=True)
class ContentRule:
    gates: tuple[re.Pattern[bytes], ...]  # each with a literal prefix; the rule runs if any matches
    find: Callable[[str], Iterator[Hit]]
    claims_file: bool = False  # the file is one credential: its other matches are parts of it, not more findings


def _gates(*patterns: bytes) -> tuple[re.Pattern[bytes], ...]:
    return tuple(re.compile(p) for p in patterns)


CONTENT_RULES: tuple[ContentRule, ...] = (
    ContentRule(_gates(rb"service_account"), _gcp_service_account, claims_file=True),
    ContentRule(_gates(rb"kind:[ \t]*[\"']?Config"), _kubeconfig_by_content, claims_file=True),
    ContentRule(_gates(rb"PRIVATE KEY", rb"PuTTY-User-Key-File-", rb"---- BEGIN SSH2"), _private_keys),
    ContentRule(_gates(rb"AKIA", rb"ASIA"), _aws_keys),
    ContentRule(_gates(rb"gh[pousr]_", rb"github_pat_"), _github),
    ContentRule(_gates(rb"gl(?:pat|dt|ft|soat|rt|cbt|imt|ptt|agent|oas)-", rb"GR1348941"), _gitlab),
    ContentRule(_gates(rb"xox", rb"hooks\.slack\.com"), _slack),
    ContentRule(_gates(rb"://[^\s/@:'\"<>]*:[^\s/@'\"<>]+@"), _database_urls),
    ContentRule(_gates(rb"AZURE_CLIENT_SECRET"), _azure_client_secret),
)

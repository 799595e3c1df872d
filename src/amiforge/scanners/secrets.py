"""Secrets and build residue inside an image: what must never ship in a golden image (DESIGN.md §5).

- `scan_tree(rootfs)` reads the files of an image's root filesystem (a directory) and reports credentials
  (kind SECRET, source "secrets") and leftovers that break clones (kind RESIDUE, source "residue").
- `scan_raw(disk)` reads a disk image file as bytes and reports key material, including what sits in blocks a
  filesystem has freed: deleted is not erased. It is meant for images imported from elsewhere; amiforge's own
  bakes make a fresh filesystem with `mkfs.ext4 -d`, which never carries deleted data.

Findings are values; the scan gate decides what they mean. A finding never carries a secret: `redacted` holds
at most a recognisable prefix of a token (e.g. "ghp_") and its length, or a PEM header.

Where each rule comes from:
- detect-secrets supplies the token formats it maintains: AWS access key ids (AWSKeyDetector), GitHub tokens
  (GitHubTokenDetector), GitLab tokens (GitLabTokenDetector), Slack tokens and webhooks (SlackDetector). We run
  their `denylist` patterns ourselves with `finditer`, because `analyze_line` may call a plugin's `verify()` (a
  network request to AWS or Slack from a build host) and `analyze_string` yields capture groups ("ghp") rather
  than the token and where it is.
- Own rules for the rest: private keys (a PEM/PGP/PuTTY header *followed by a key body*, so the many programs and
  documents that merely mention "BEGIN RSA PRIVATE KEY" stay quiet; detect-secrets' PrivateKeyDetector matches the
  bare header and misses PKCS#8 "ENCRYPTED PRIVATE KEY"), the AWS secret key next to an id, GitHub fine-grained
  tokens (github_pat_), database URLs with a password, Azure client secrets, GCP service-account keys, and the
  file formats that are credentials by where they live (~/.aws/credentials, .netrc, kubeconfig, .env, Docker and
  Azure token caches), plus every residue rule.
- Not used: detect-secrets' high-entropy and keyword plugins. On a Debian root filesystem they fire on every
  checksum, base64 blob and manual page that says "password".

Speed: a root filesystem is tens of thousands of files. Each content rule is gated by literal-prefixed byte
patterns (CPython's regex engine searches a literal prefix at memory speed, while an alternation of many
alternatives is an order of magnitude slower), so the detailed patterns only run on the few files that can match.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.slack import SlackDetector

from amiforge.errors import ConfigError, InfraError, NotFound
from amiforge.imagefs import resolve_inside
from amiforge.model import Finding, FindingKind, Severity

__all__ = ["DEFAULT_MAX_FILE_BYTES", "DEFAULT_RAW_CHUNK", "scan_raw", "scan_tree"]

MiB = 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 2 * MiB
DEFAULT_RAW_CHUNK = 8 * MiB

# Kernel and runtime filesystems: mount points in a running system, never content of an image.
_SKIP_TOP = frozenset({"proc", "sys", "dev", "run"})


# ----------------------------------------------------------------------------------------------------------
# Rules: a closed table. Every finding names one of these ids.


@dataclass(frozen=True)
class _Rule:
    id: str
    kind: FindingKind
    severity: Severity
    title: str

    @property
    def source(self) -> str:
        return "residue" if self.kind is FindingKind.RESIDUE else "secrets"


_S, _R = FindingKind.SECRET, FindingKind.RESIDUE
_RULES: dict[str, _Rule] = {
    r.id: r
    for r in (
        _Rule("private-key", _S, Severity.CRITICAL, "private key"),
        _Rule("aws-access-key", _S, Severity.HIGH, "AWS access key id"),
        _Rule("aws-credentials", _S, Severity.CRITICAL, "AWS credentials file with a secret access key"),
        _Rule("gcp-service-account-key", _S, Severity.CRITICAL, "GCP service-account key file"),
        _Rule("azure-client-secret", _S, Severity.CRITICAL, "Azure client secret"),
        _Rule("azure-token-cache", _S, Severity.HIGH, "Azure CLI token cache"),
        _Rule("netrc-password", _S, Severity.HIGH, "password in a netrc-format file"),
        _Rule("kubeconfig-credentials", _S, Severity.HIGH, "kubeconfig with user credentials"),
        _Rule("docker-config-auth", _S, Severity.HIGH, "Docker registry credentials"),
        _Rule("dotenv-secret", _S, Severity.HIGH, "secret in an environment file"),
        _Rule("github-token", _S, Severity.HIGH, "GitHub token"),
        _Rule("gitlab-token", _S, Severity.HIGH, "GitLab token"),
        _Rule("slack-token", _S, Severity.HIGH, "Slack token or webhook"),
        _Rule("database-url-password", _S, Severity.HIGH, "database URL with a password"),
        _Rule("unreadable", _S, Severity.UNKNOWN, "file or directory could not be read, so it was not scanned"),
        _Rule("ssh-host-key", _R, Severity.HIGH, "SSH host private key (every clone would share it)"),
        _Rule("machine-id", _R, Severity.MEDIUM, "machine-id is set (every clone would share it)"),
        _Rule("systemd-credential-secret", _R, Severity.HIGH, "systemd credential host secret"),
        _Rule("shell-history", _R, Severity.MEDIUM, "shell or tool history left in a home directory"),
        _Rule("cloud-init-state", _R, Severity.MEDIUM, "cloud-init instance state left behind"),
        _Rule("cloud-init-user-data", _R, Severity.HIGH, "cloud-init user-data left behind"),
        _Rule("unexpected-authorized-keys", _R, Severity.HIGH, "authorized_keys the recipe did not put there"),
    )
}


@dataclass(frozen=True)
class _Hit:
    """One match inside a file, before it becomes a Finding. `pos` is a character offset into the text."""

    rule: str
    pos: int | None
    redacted: str | None
    title: str | None = None  # overrides the rule's title
    severity: Severity | None = None  # overrides the rule's severity


def _finding(
    rule_id: str,
    path: str,
    *,
    line: int | None,
    redacted: str | None,
    title: str | None = None,
    severity: Severity | None = None,
    source: str | None = None,
) -> Finding:
    rule = _RULES[rule_id]
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


def _redact(value: str) -> str:
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


def _placeholder(value: str) -> bool:
    return not value or value.startswith("$") or _PLACEHOLDER.fullmatch(value) is not None


# ----------------------------------------------------------------------------------------------------------
# Content rules: gated by literal-prefixed byte patterns, then matched on the text (latin-1: one char per byte,
# so character offsets are byte offsets and nothing fails to decode).

# A PEM or PGP armour header followed by a key body: up to 4 armour header lines (Proc-Type, DEK-Info, Version,
# a blank line), then a line of base64. The `\\n` branch is a key inside a JSON or YAML string.
_KEY_LABEL = r"(?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY|PGP PRIVATE KEY BLOCK"
_PEM_KEY = re.compile(
    rf"-----BEGIN (?P<label>{_KEY_LABEL})-----[ \t]*"
    r"(?:\r?\n(?:[^\r\n]{0,100}\r?\n){0,4}?|(?:\\r)?\\n)"
    r"[A-Za-z0-9+/]{40}"
)
_SSH2_KEY = re.compile(r"---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\r?\n(?:[^\r\n]{0,100}\r?\n){0,4}?[A-Za-z0-9+/]{40}")
_PUTTY_KEY = re.compile(r"PuTTY-User-Key-File-\d: [^\r\n]+\r?\n(?:[^\r\n]{0,200}\r?\n){0,40}?Private-Lines: \d+")


def _private_keys(text: str) -> Iterator[_Hit]:
    for m in _PEM_KEY.finditer(text):
        # A NUL right before the header makes it a C string in a binary: libraries compile in self-test keys
        # (libgnutls has several). A key file, or a key pasted into a text file, starts at 0 or after text.
        if m.start() > 0 and text[m.start() - 1] == "\x00":
            continue
        yield _Hit("private-key", m.start(), f"-----BEGIN {m['label']}----- …")
    for m in _SSH2_KEY.finditer(text):
        yield _Hit("private-key", m.start(), "---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ---- …")
    for m in _PUTTY_KEY.finditer(text):
        yield _Hit("private-key", m.start(), "PuTTY-User-Key-File …")


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


def _aws_keys(text: str) -> Iterator[_Hit]:
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
        line = _line_of(text, m.start())
        if any(labelled or abs(ln - line) <= _AWS_SECRET_NEAR_LINES for ln, labelled in secrets):
            title = "AWS access key id with its secret access key"
            yield _Hit("aws-access-key", m.start(), _redact(key_id), title, Severity.CRITICAL)
        else:
            yield _Hit("aws-access-key", m.start(), _redact(key_id))


def _aws_secret_candidates(text: str) -> list[tuple[int, bool]]:
    found = []
    for m in _AWS_SECRET.finditer(text):
        if _aws_secret_like(m.group()):
            line_start = text.rfind("\n", 0, m.start()) + 1
            found.append((_line_of(text, m.start()), "secret" in text[line_start : m.start()].lower()))
    return found


_GITHUB_TOKEN = _bounded(GitHubTokenDetector.denylist[0])
_GITHUB_PAT = re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,255}(?![A-Za-z0-9_])")
_GITLAB_TOKENS = tuple(_bounded(p, after=r"A-Za-z0-9_\-") for p in GitLabTokenDetector.denylist)
_SLACK = tuple(_bounded(p, after=r"A-Za-z0-9_\-") for p in SlackDetector.denylist)
_SLACK_MIN_LEN = 24  # the token pattern alone accepts "xoxo-1-a"; real tokens are 50+ characters


def _token_hits(rule: str, patterns: Sequence[re.Pattern[str]], text: str, min_len: int = 0) -> Iterator[_Hit]:
    for pattern in patterns:
        for m in pattern.finditer(text):
            if len(m.group()) >= min_len:
                yield _Hit(rule, m.start(), _redact(m.group()))


def _github(text: str) -> Iterator[_Hit]:
    return _token_hits("github-token", (_GITHUB_TOKEN, _GITHUB_PAT), text)


def _gitlab(text: str) -> Iterator[_Hit]:
    return _token_hits("gitlab-token", _GITLAB_TOKENS, text)


def _slack(text: str) -> Iterator[_Hit]:
    return _token_hits("slack-token", _SLACK, text, _SLACK_MIN_LEN)


_URL_USERINFO = re.compile(r"://(?P<user>[^\s/@:'\"<>]*):(?P<password>[^\s/@'\"<>]+)@(?P<host>[A-Za-z0-9.\-\[\]:]*)")
_DB_SCHEME = re.compile(r"(?<![A-Za-z0-9+.-])(?:postgres(?:ql)?|mysql|mariadb|mongodb(?:\+srv)?|rediss?|amqps?)\Z")


def _database_urls(text: str) -> Iterator[_Hit]:
    for m in _URL_USERINFO.finditer(text):
        scheme = _DB_SCHEME.search(text, max(0, m.start() - 16), m.start())
        if scheme is None or _placeholder(m["password"]):
            continue
        redacted = f"{scheme.group()}://{m['user']}:…({len(m['password'])} chars)@{m['host']}"
        yield _Hit("database-url-password", scheme.start(), redacted)


_AZURE_SECRET = re.compile(r"AZURE_CLIENT_SECRET[\"']?\s*[:=]\s*[\"']?(?P<value>[^\s\"'#,;]+)")


def _azure_client_secret(text: str) -> Iterator[_Hit]:
    for m in _AZURE_SECRET.finditer(text):
        if not _placeholder(m["value"]):
            yield _Hit("azure-client-secret", m.start(), f"AZURE_CLIENT_SECRET=…({len(m['value'])} chars)")


_GCP_TYPE = re.compile(r"\"type\"\s*:\s*\"service_account\"")
_GCP_KEY = re.compile(r"\"private_key\"\s*:\s*\"(?P<value>[^\"]*PRIVATE KEY[^\"]*)\"")
_GCP_EMAIL = re.compile(r"\"client_email\"\s*:\s*\"(?P<value>[^\"]{1,200})\"")


def _gcp_service_account(text: str) -> Iterator[_Hit]:
    if _GCP_TYPE.search(text) is None:
        return
    for m in _GCP_KEY.finditer(text):
        email = _GCP_EMAIL.search(text)
        who = f" of {email['value']}" if email else ""  # the account name is not a secret, and says whose key
        yield _Hit("gcp-service-account-key", m.start(), f"private_key{who} …({len(m['value'])} chars)")


# kubeconfig: a YAML document `kind: Config` with user credentials (a bearer token, a client key, a password).
_KUBE_CONFIG = re.compile(r"^kind:\s*[\"']?Config[\"']?\s*$", re.MULTILINE)
_KUBE_CRED = re.compile(
    r"^[ \t-]*(?P<field>token|client-key-data|password):[ \t]*[\"']?(?P<value>[^\s\"'#]+)", re.MULTILINE
)


def _kube_credentials(text: str) -> Iterator[_Hit]:
    for m in _KUBE_CRED.finditer(text):
        if not _placeholder(m["value"]):
            yield _Hit("kubeconfig-credentials", m.start("field"), f"{m['field']}: …({len(m['value'])} chars)")


def _kubeconfig_by_content(text: str) -> Iterator[_Hit]:
    if _KUBE_CONFIG.search(text) is not None:
        yield from _kube_credentials(text)


@dataclass(frozen=True)
class _ContentRule:
    gates: tuple[re.Pattern[bytes], ...]  # each with a literal prefix; the rule runs if any matches
    find: Callable[[str], Iterator[_Hit]]
    claims_file: bool = False  # the file is one credential: its other matches are parts of it, not more findings


def _gates(*patterns: bytes) -> tuple[re.Pattern[bytes], ...]:
    return tuple(re.compile(p) for p in patterns)


_CONTENT_RULES: tuple[_ContentRule, ...] = (
    _ContentRule(_gates(rb"service_account"), _gcp_service_account, claims_file=True),
    _ContentRule(_gates(rb"kind:[ \t]*[\"']?Config"), _kubeconfig_by_content, claims_file=True),
    _ContentRule(_gates(rb"PRIVATE KEY", rb"PuTTY-User-Key-File-", rb"---- BEGIN SSH2"), _private_keys),
    _ContentRule(_gates(rb"AKIA", rb"ASIA"), _aws_keys),
    _ContentRule(_gates(rb"gh[pousr]_", rb"github_pat_"), _github),
    _ContentRule(_gates(rb"gl(?:pat|dt|ft|soat|rt|cbt|imt|ptt|agent|oas)-", rb"GR1348941"), _gitlab),
    _ContentRule(_gates(rb"xox", rb"hooks\.slack\.com"), _slack),
    _ContentRule(_gates(rb"://[^\s/@:'\"<>]*:[^\s/@'\"<>]+@"), _database_urls),
    _ContentRule(_gates(rb"AZURE_CLIENT_SECRET"), _azure_client_secret),
)


# ----------------------------------------------------------------------------------------------------------
# Path rules: files that are a credential or residue because of where they are.

_HISTORY_NAMES = frozenset({".lesshst", ".viminfo", ".wget-hsts"})
_HISTORY = re.compile(r"\.\w[\w.-]*_history")
_ENV_TEMPLATES = frozenset({"example", "sample", "template", "dist", "defaults", "tmpl"})
_ENV_LINE = re.compile(
    r"^[ \t]*(?:export[ \t]+)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(?P<value>[^\r\n]*)$", re.MULTILINE
)
_ENV_SECRET_NAME = re.compile(r"(?:^|_)(?:PASSWORD|PASSWD|SECRET|TOKEN|KEY|APIKEY)$", re.IGNORECASE)
_NETRC_PASSWORD = re.compile(r"(?:^|\s)password\s+(?P<value>\S+)")
_AWS_CREDS_SECRET = re.compile(r"^[ \t]*aws_secret_access_key[ \t]*=[ \t]*(?P<value>\S+)", re.MULTILINE)
_DOCKER_AUTH = re.compile(r"\"(?P<field>auth|identitytoken|registrytoken)\"\s*:\s*\"(?P<value>[^\"]+)\"")
_SSH_KEY_TYPE = re.compile(r"(?:^|\s)(?P<type>(?:ssh|ecdsa|sk-ssh|sk-ecdsa)-[\w@.-]+)\s+(?P<blob>[A-Za-z0-9+/]+=*)")


def _is_dotenv(ipath: PurePosixPath) -> bool:
    name = ipath.name
    if str(ipath) == "/etc/environment" or name == ".env":
        return True
    if name.startswith(".env."):
        return name[5:].lower() not in _ENV_TEMPLATES  # .env.example and friends are templates
    return name.endswith(".env") and len(name) > 4


def _dotenv(text: str) -> Iterator[_Hit]:
    for m in _ENV_LINE.finditer(text):
        if not _ENV_SECRET_NAME.search(m["name"]):
            continue
        value = m["value"].strip().strip("\"'")
        if not _placeholder(value):
            yield _Hit("dotenv-secret", m.start("name"), f"{m['name']}=…({len(value)} chars)")


def _netrc(text: str) -> Iterator[_Hit]:
    for m in _NETRC_PASSWORD.finditer(text):
        if not _placeholder(m["value"]):
            yield _Hit("netrc-password", m.start("value"), f"password …({len(m['value'])} chars)")


def _aws_credentials(text: str) -> Iterator[_Hit]:
    for m in _AWS_CREDS_SECRET.finditer(text):
        yield _Hit("aws-credentials", m.start(), f"aws_secret_access_key = …({len(m['value'])} chars)")


def _docker_config(text: str) -> Iterator[_Hit]:
    for m in _DOCKER_AUTH.finditer(text):
        yield _Hit("docker-config-auth", m.start(), f'"{m["field"]}": …({len(m["value"])} chars)')


def _azure_cache(text: str) -> Iterator[_Hit]:
    if text.strip() not in ("", "[]", "{}"):
        yield _Hit("azure-token-cache", None, None)


def _ssh_fingerprint(blob: str) -> str:
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return "unparsable key"
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def _authorized_keys(text: str) -> Iterator[_Hit]:
    for m in _SSH_KEY_TYPE.finditer(text):
        line_start = text.rfind("\n", 0, m.start("type")) + 1
        if text[line_start : m.start("type")].lstrip().startswith("#"):
            continue
        # A public key is no secret; its fingerprint is what a person compares with the keys they know.
        yield _Hit("unexpected-authorized-keys", m.start("type"), f"{m['type']} {_ssh_fingerprint(m['blob'])}")
        return  # one finding per file: the file itself is the problem


@dataclass(frozen=True)
class _PathRule:
    """`find` reads the file; None means the file is a finding by its path alone (if it is not empty)."""

    find: Callable[[str], Iterator[_Hit]] | None
    rule: str
    claims_file: bool


def _path_rule(ipath: PurePosixPath, in_home: bool) -> _PathRule | None:
    """Which path rule, if any, a regular file is subject to. Called for every file: cheap tests first."""
    name, parent = ipath.name, ipath.parent
    if in_home and (name in _HISTORY_NAMES or _HISTORY.fullmatch(name)):
        return _PathRule(None, "shell-history", claims_file=False)
    if name in ("authorized_keys", "authorized_keys2"):
        return _PathRule(_authorized_keys, "unexpected-authorized-keys", claims_file=False)
    if parent.name == ".aws" and name == "credentials":
        return _PathRule(_aws_credentials, "aws-credentials", claims_file=True)
    if name in (".netrc", "_netrc") or str(ipath) == "/etc/apt/auth.conf" or str(parent) == "/etc/apt/auth.conf.d":
        return _PathRule(_netrc, "netrc-password", claims_file=True)
    if (
        (parent.name == ".kube" and name == "config")
        or (str(parent) == "/etc/kubernetes" and name.endswith(".conf"))
        or str(ipath) == "/etc/rancher/k3s/k3s.yaml"
    ):
        return _PathRule(_kube_credentials, "kubeconfig-credentials", claims_file=True)
    if parent.name == ".docker" and name == "config.json":
        return _PathRule(_docker_config, "docker-config-auth", claims_file=True)
    if parent.name == ".azure" and (name == "accessTokens.json" or name.startswith("msal_token_cache")):
        return _PathRule(_azure_cache, "azure-token-cache", claims_file=True)
    if _is_dotenv(ipath):
        return _PathRule(_dotenv, "dotenv-secret", claims_file=False)
    text_path = str(ipath)
    if text_path.startswith("/etc/ssh/ssh_host_") and name.endswith("_key"):
        return _PathRule(None, "ssh-host-key", claims_file=True)
    if text_path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        return _PathRule(None, "machine-id", claims_file=True)
    if text_path == "/var/lib/systemd/credential.secret":
        return _PathRule(None, "systemd-credential-secret", claims_file=True)
    # Seeds (/var/lib/cloud/seed) are configuration an image ships on purpose; instance data is a past boot's.
    if (
        text_path.startswith("/var/lib/cloud/")
        and not text_path.startswith("/var/lib/cloud/seed/")
        and name.startswith("user-data.txt")
    ):
        return _PathRule(None, "cloud-init-user-data", claims_file=False)
    return None


# ----------------------------------------------------------------------------------------------------------
# The tree walk


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _inside(root: Path, image_path: str) -> Path | None:
    """Host path of an image path, following the image's own symlinks; None if the image's links are broken."""
    try:
        return resolve_inside(root, image_path)
    except (ConfigError, OSError):
        return None


def _home_dirs(root: Path) -> tuple[frozenset[Path], frozenset[Path]]:
    """(homes, home parents): /root, every home in /etc/passwd, and /home (whose children are homes)."""
    homes: set[Path] = set()
    for image_path in ["/root", *_passwd_homes(root)]:
        host = _inside(root, image_path)
        if host is not None:
            homes.add(host)
    parent = _inside(root, "/home")
    return frozenset(homes), frozenset({parent} if parent is not None else ())


def _passwd_homes(root: Path) -> list[str]:
    passwd = _inside(root, "/etc/passwd")
    if passwd is None:
        return []
    try:
        data = _read_regular(passwd, 1 * MiB)
    except OSError:
        return []
    if data is None:
        return []
    homes = []
    for line in data.decode("latin-1").splitlines():
        fields = line.split(":")
        # Daemons use "/" or /nonexistent; "/" would make every dot-file at the root a history candidate.
        if len(fields) >= 6 and fields[5].startswith("/") and fields[5] not in ("/", "/nonexistent"):
            homes.append(fields[5])
    return homes


def _read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file, opened without following a symlink; None if it is not a regular file."""
    # O_NOFOLLOW: a file swapped for a symlink between walk and open must not lead outside the tree.
    # O_NONBLOCK: a FIFO that appeared in the meantime must not hang the scan.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        remaining = limit
        while remaining > 0:
            chunk = fh.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


class _TreeScan:
    def __init__(self, rootfs: Path, max_file_bytes: int, expected_authorized_keys: Collection[str]) -> None:
        # Absolute, never resolve(): a scan's root is often /proc/<pid>/root/… (an image mounted in another mount
        # namespace), and resolving that magic link would land on the empty host directory instead.
        self.root = Path(os.path.abspath(rootfs))
        self.max_file_bytes = max_file_bytes
        self.homes, self.home_parents = _home_dirs(self.root)
        self.expected_keys = {p for p in (_inside(self.root, e) for e in expected_authorized_keys) if p is not None}
        self.findings: list[Finding] = []

    def run(self) -> list[Finding]:
        if not self.root.is_dir():
            raise NotFound(f"image root {self.root} is not a directory", fix="pass the directory of a root filesystem")
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False, onerror=self._walk_error):
            here = Path(dirpath)
            rel = here.relative_to(self.root).as_posix()
            image_dir = PurePosixPath("/" if rel == "." else "/" + rel)
            if rel == ".":
                dirnames[:] = [d for d in dirnames if d not in _SKIP_TOP]
            dirnames.sort()
            if str(image_dir) == "/var/lib/cloud":
                self._cloud_instance_dir(here, image_dir, "instance")
            elif str(image_dir) == "/var/lib/cloud/instances":
                for d in dirnames:
                    self._cloud_instance_dir(here, image_dir, d)
            for name in sorted(filenames):
                self._file(here / name, image_dir / name)
        return _dedupe(self.findings)

    def _walk_error(self, err: OSError) -> None:
        where = self._image_path(Path(err.filename)) if err.filename else "/"
        self.findings.append(
            _finding(
                "unreadable", where, line=None, redacted=None, title=f"directory could not be read: {err.strerror}"
            )
        )

    def _image_path(self, host: Path) -> str:
        rel = host.relative_to(self.root).as_posix()
        return "/" if rel == "." else "/" + rel

    def _cloud_instance_dir(self, here: Path, image_dir: PurePosixPath, name: str) -> None:
        try:
            st = os.lstat(here / name)
        except FileNotFoundError:
            return
        # /var/lib/cloud/instance is normally a symlink to instances/<id>, which is reported itself.
        if stat.S_ISDIR(st.st_mode):
            self.findings.append(_finding("cloud-init-state", str(image_dir / name), line=None, redacted=None))

    def _file(self, host: Path, ipath: PurePosixPath) -> None:
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            return  # removed while we walked
        except OSError as e:
            self._unreadable(ipath, e)
            return
        if not stat.S_ISREG(st.st_mode):
            return  # symlinks (never followed), devices, sockets, FIFOs
        in_home = host.parent in self.homes or host.parent.parent in self.home_parents
        path_rule = _path_rule(ipath, in_home)
        if st.st_size > self.max_file_bytes:
            # Too big to read whole and match line by line, but not skipped: key material is looked for in
            # overlapping chunks, as on a raw disk (binaries' compiled-in PEM strings are told apart the same way).
            for chunk_hit in scan_raw(host):
                offset = (chunk_hit.path or "").rsplit("@", 1)[-1]
                self.findings.append(replace(chunk_hit, path=f"{ipath}@{offset}", source="secrets"))
            if path_rule is None:
                return
        data: bytes | None = None
        if st.st_size <= self.max_file_bytes:
            try:
                data = _read_regular(host, self.max_file_bytes)
            except FileNotFoundError:
                return
            except OSError as e:
                self._unreadable(ipath, e)
                return
            if data is None:
                return
        text: str | None = None if data is None else data.decode("latin-1")
        path_hits: list[_Hit] = []
        content_hits: list[_Hit] = []
        claimed = False
        if path_rule is not None:
            path_hits, claimed = self._path_hits(path_rule, host, st.st_size, text)
        if text is not None and data is not None and not claimed:
            for rule in _CONTENT_RULES:
                if not any(g.search(data) for g in rule.gates):
                    continue
                found = list(rule.find(text))
                if found and rule.claims_file:
                    content_hits = found
                    break
                content_hits.extend(found)
        for hit in path_hits + content_hits:
            line = None if hit.pos is None or text is None else _line_of(text, hit.pos)
            self.findings.append(
                _finding(hit.rule, str(ipath), line=line, redacted=hit.redacted, title=hit.title, severity=hit.severity)
            )

    def _path_hits(self, rule: _PathRule, host: Path, size: int, text: str | None) -> tuple[list[_Hit], bool]:
        if rule.rule == "unexpected-authorized-keys" and host in self.expected_keys:
            return [], False
        if rule.rule == "machine-id":
            # systemd treats "uninitialized" like an empty file: a fresh id on first boot.
            if text is not None and text.strip() in ("", "uninitialized"):
                return [], False
        elif rule.find is None:
            if size == 0:
                return [], False
        elif text is None:
            # Too big to read: a file at this path is treated as what its path says (fail closed).
            title = f"{_RULES[rule.rule].title} (not read: larger than {self.max_file_bytes} bytes)"
            return [_Hit(rule.rule, None, None, title)], rule.claims_file
        else:
            found = list(rule.find(text))
            return found, rule.claims_file and bool(found)
        return [_Hit(rule.rule, None, None)], rule.claims_file

    def _unreadable(self, ipath: PurePosixPath, err: OSError) -> None:
        self.findings.append(
            _finding(
                "unreadable", str(ipath), line=None, redacted=None, title=f"file could not be read: {err.strerror}"
            )
        )


def _dedupe(findings: list[Finding]) -> list[Finding]:
    """One finding per (path, line): where rules overlap (an Azure secret in a .env file) the most severe wins,
    then the earlier rule in the table (the more specific one)."""
    order = {rule_id: i for i, rule_id in enumerate(_RULES)}
    best: dict[tuple[str | None, int | str | None], Finding] = {}
    for f in findings:
        key = (f.path, f.line if f.line is not None else f.id)
        old = best.get(key)
        if old is None or (-f.severity.rank, order[f.id]) < (-old.severity.rank, order[old.id]):
            best[key] = f
    return sorted(best.values(), key=lambda f: (f.path or "", f.line or 0, f.id))


def scan_tree(
    rootfs: Path,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    expected_authorized_keys: Collection[str] = (),
) -> list[Finding]:
    """Secrets and residue in the root filesystem at `rootfs`, sorted by path and line.

    Symlinks are never followed; /proc, /sys, /dev and /run are skipped, and so are device nodes, sockets and
    FIFOs. Files larger than `max_file_bytes` are not read, but a file whose path alone makes it a finding
    (a history, a host key, ~/.aws/credentials, …) is still reported. `expected_authorized_keys` lists the image
    paths of authorized_keys files the recipe put there on purpose (resolved through the image's own symlinks);
    any other non-empty authorized_keys is a finding. A file that cannot be read is an `unreadable` finding: a
    scan that could not look is not a clean scan. Raises NotFound if `rootfs` is not a directory.
    """
    return _TreeScan(rootfs, max_file_bytes, expected_authorized_keys).run()


# ----------------------------------------------------------------------------------------------------------
# Raw disk bytes

# Each pattern has a literal prefix so the engine searches it at memory speed; a single alternation would be
# several times slower. Lengths are bounded (see _RAW_MAX_MATCH) so that chunk overlap can be exact.
_RAW_PEM = re.compile(
    rb"-----BEGIN (?P<label>" + _KEY_LABEL.encode() + rb")-----[ \t]{0,8}"
    rb"(?:\r?\n(?:[^\r\n]{0,100}\r?\n){0,4}?|(?:\\r)?\\n)[A-Za-z0-9+/]{40}"
)
_RAW_AWS = (re.compile(rb"AKIA[A-Z0-9]{16}(?![A-Z0-9])"), re.compile(rb"ASIA[A-Z0-9]{16}(?![A-Z0-9])"))
# A binary OpenSSH key (as ssh-keygen writes it before base64, or as it sits in memory dumped to swap): the magic,
# then the length-prefixed cipher name. ssh binaries also hold the bare magic string; they never hold this.
_RAW_OPENSSH = re.compile(rb"openssh-key-v1\x00\x00\x00\x00[\x04-\x20](?:none|aes|chacha|3des)")
_RAW_MAX_MATCH = 1024  # longest possible match of the patterns above, with its lookahead
_RAW_LEAD = 64  # bytes kept before a buffer's owned region, so a match's lookbehind check sees real data
# Smallest block a filesystem puts file data on (a 512-byte sector; ext4 uses 4096 on a 4096-aligned partition).
_RAW_FILE_ALIGN = 512


def _raw_hits(buf: bytes, base: int) -> Iterator[tuple[int, str, Severity, str]]:
    """(offset in buf, rule id, severity, redacted) of every marker in `buf`, which starts at file offset `base`."""
    for m in _RAW_PEM.finditer(buf):
        # A file's data starts on a block boundary; a key inside a file follows text. A header that does neither
        # but follows a NUL is a C string in a binary (libgnutls compiles in self-test keys), not a key file.
        at = m.start()
        if (base + at) % _RAW_FILE_ALIGN != 0 and buf[at - 1 : at] == b"\x00":
            continue
        yield at, "private-key", Severity.CRITICAL, f"-----BEGIN {m['label'].decode()}----- …"
    for pattern in _RAW_AWS:
        for m in pattern.finditer(buf):
            key_id = m.group().decode()
            before = buf[m.start() - 1 : m.start()]
            if (before and (before.isupper() or before.isdigit())) or key_id.endswith("EXAMPLE"):
                continue
            yield m.start(), "aws-access-key", Severity.HIGH, _redact(key_id)
    for m in _RAW_OPENSSH.finditer(buf):
        yield m.start(), "private-key", Severity.CRITICAL, "openssh-key-v1 (binary OpenSSH private key) …"


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of `path` that hold data (holes of a sparse file are skipped)."""
    extents: list[tuple[int, int]] = []
    with path.open("rb") as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        try:
            while pos < size:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = os.lseek(fd, start, os.SEEK_HOLE)
                extents.append((start, end))
                pos = end
        except OSError:  # no more data (ENXIO), or a filesystem without SEEK_DATA: treat as all data
            if not extents and pos == 0:
                return [(0, size)]
    return extents


def scan_raw(
    path: Path, *, chunk: int = DEFAULT_RAW_CHUNK, ranges: Sequence[tuple[int, int]] | None = None
) -> list[Finding]:
    """Key material anywhere in the raw bytes of a disk image file, including freed blocks.

    Markers: a PEM/PGP private-key header followed by a key body, AWS access key ids (AKIA/ASIA), and binary
    OpenSSH keys (`openssh-key-v1\\0`). Sequential `chunk`-sized reads; consecutive reads overlap so a marker across a
    boundary is found exactly once. Findings have path f"{path}@{offset}" and source "raw-disk".
    `ranges` limits the scan to those [start, end) byte ranges (e.g. a filesystem's free blocks, where deleted files
    leave their data); by default every data extent of the file (holes of a sparse file hold nothing).
    Reads a raw image or an uncompressed qcow2 (compressed clusters and encrypted images show nothing).
    Raises NotFound for a missing file, InfraError if it cannot be read.
    """
    overlap = _RAW_MAX_MATCH + _RAW_LEAD
    if chunk <= overlap:
        raise ConfigError(f"scan_raw chunk must be larger than {overlap} bytes, got {chunk}")
    findings: list[Finding] = []
    try:
        extents = data_extents(path)
        # Holes of a sparse file hold only zeros: scan the data extents, within `ranges` when given.
        regions = extents if ranges is None else _intersect(sorted(ranges), extents)
        with path.open("rb") as fh:
            for start, end in regions:
                fh.seek(start)
                findings += _scan_region(fh, path, start, end, chunk)
    except FileNotFoundError as e:
        raise NotFound(f"disk image {path} does not exist", fix="pass the path of a raw or qcow2 file") from e
    except OSError as e:
        raise InfraError(f"cannot read disk image {path}: {e.strerror}", retryable=False) from e
    return findings


def _intersect(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intersection of two sorted lists of disjoint [start, end) ranges."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _scan_region(fh: BinaryIO, path: Path, start: int, end: int, chunk: int) -> list[Finding]:
    findings: list[Finding] = []
    buf = b""
    base = start  # file offset of buf[0]
    pos = start
    while True:
        data = fh.read(min(chunk, end - pos))
        pos += len(data)
        final = pos >= end or not data
        buf += data
        # This buffer owns matches starting in [own_from, own_to); the next one starts at own_to - lead.
        own_from = 0 if base == start else _RAW_LEAD
        own_to = len(buf) if final else len(buf) - _RAW_MAX_MATCH
        for offset, rule_id, severity, redacted in sorted(_raw_hits(buf, base)):
            if own_from <= offset < own_to:
                findings.append(
                    _finding(
                        rule_id,
                        f"{path}@{base + offset}",
                        line=None,
                        redacted=redacted,
                        severity=severity,
                        source="raw-disk",
                    )
                )
        if final:
            return findings
        keep_from = own_to - _RAW_LEAD
        base += keep_from
        buf = buf[keep_from:]

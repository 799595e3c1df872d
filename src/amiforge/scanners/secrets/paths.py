"""The path detectors: files that are a credential or build residue because of where they are.

Histories in a home, authorized_keys, ~/.aws/credentials, netrc files, kubeconfigs, Docker and Azure token caches,
.env files, SSH host keys, machine-id, systemd's credential secret and cloud-init instance data. `path_rule()`
says which rule, if any, a file is subject to; the walk reads the file only when the rule needs its content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from amiforge.scanners.secrets.content import kube_credentials
from amiforge.scanners.secrets.findings import Hit, is_placeholder

__all__ = ["PathRule", "path_rule"]


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


def _dotenv(text: str) -> Iterator[Hit]:
    for m in _ENV_LINE.finditer(text):
        if not _ENV_SECRET_NAME.search(m["name"]):
            continue
        value = m["value"].strip().strip("\"'")
        if not is_placeholder(value):
            yield Hit("dotenv-secret", m.start("name"), f"{m['name']}=…({len(value)} chars)")


def _netrc(text: str) -> Iterator[Hit]:
    for m in _NETRC_PASSWORD.finditer(text):
        if not is_placeholder(m["value"]):
            yield Hit("netrc-password", m.start("value"), f"password …({len(m['value'])} chars)")


def _aws_credentials(text: str) -> Iterator[Hit]:
    for m in _AWS_CREDS_SECRET.finditer(text):
        yield Hit("aws-credentials", m.start(), f"aws_secret_access_key = …({len(m['value'])} chars)")


def _docker_config(text: str) -> Iterator[Hit]:
    for m in _DOCKER_AUTH.finditer(text):
        yield Hit("docker-config-auth", m.start(), f'"{m["field"]}": …({len(m["value"])} chars)')


def _azure_cache(text: str) -> Iterator[Hit]:
    if text.strip() not in ("", "[]", "{}"):
        yield Hit("azure-token-cache", None, None)


def _ssh_fingerprint(blob: str) -> str:
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return "unparsable key"
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def _authorized_keys(text: str) -> Iterator[Hit]:
    for m in _SSH_KEY_TYPE.finditer(text):
        line_start = text.rfind("\n", 0, m.start("type")) + 1
        if text[line_start : m.start("type")].lstrip().startswith("#"):
            continue
        # A public key is no secret; its fingerprint is what a person compares with the keys they know.
        yield Hit("unexpected-authorized-keys", m.start("type"), f"{m['type']} {_ssh_fingerprint(m['blob'])}")
        return  # one finding per file: the file itself is the problem


@dataclass(frozen=True)
class PathRule:
    """`find` reads the file; None means the file is a finding by its path alone (if it is not empty)."""

    find: Callable[[str], Iterator[Hit]] | None
    rule: str
    claims_file: bool


def path_rule(ipath: PurePosixPath, in_home: bool) -> PathRule | None:
    """Which path rule, if any, a regular file is subject to. Called for every file: cheap tests first."""
    name, parent = ipath.name, ipath.parent
    if in_home and (name in _HISTORY_NAMES or _HISTORY.fullmatch(name)):
        return PathRule(None, "shell-history", claims_file=False)
    if name in ("authorized_keys", "authorized_keys2"):
        return PathRule(_authorized_keys, "unexpected-authorized-keys", claims_file=False)
    if parent.name == ".aws" and name == "credentials":
        return PathRule(_aws_credentials, "aws-credentials", claims_file=True)
    if name in (".netrc", "_netrc") or str(ipath) == "/etc/apt/auth.conf" or str(parent) == "/etc/apt/auth.conf.d":
        return PathRule(_netrc, "netrc-password", claims_file=True)
    if (
        (parent.name == ".kube" and name == "config")
        or (str(parent) == "/etc/kubernetes" and name.endswith(".conf"))
        or str(ipath) == "/etc/rancher/k3s/k3s.yaml"
    ):
        return PathRule(kube_credentials, "kubeconfig-credentials", claims_file=True)
    if parent.name == ".docker" and name == "config.json":
        return PathRule(_docker_config, "docker-config-auth", claims_file=True)
    if parent.name == ".azure" and (name == "accessTokens.json" or name.startswith("msal_token_cache")):
        return PathRule(_azure_cache, "azure-token-cache", claims_file=True)
    if _is_dotenv(ipath):
        return PathRule(_dotenv, "dotenv-secret", claims_file=False)
    text_path = str(ipath)
    if text_path.startswith("/etc/ssh/ssh_host_") and name.endswith("_key"):
        return PathRule(None, "ssh-host-key", claims_file=True)
    if text_path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        return PathRule(None, "machine-id", claims_file=True)
    if text_path == "/var/lib/systemd/credential.secret":
        return PathRule(None, "systemd-credential-secret", claims_file=True)
    # Seeds (/var/lib/cloud/seed) are configuration an image ships on purpose; instance data is a past boot's.
    if (
        text_path.startswith("/var/lib/cloud/")
        and not text_path.startswith("/var/lib/cloud/seed/")
        and name.startswith("user-data.txt")
    ):
        return PathRule(None, "cloud-init-user-data", claims_file=False)
    return None

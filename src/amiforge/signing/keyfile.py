"""Ed25519 key files: generate a key pair, sign with the private key file, verify against trusted public keys.

The private key is an unencrypted PKCS#8 PEM file created with mode 0600 and never overwritten; the public key is a
SubjectPublicKeyInfo PEM file. A key is named by its fingerprint, `ed25519:` + the first 16 hex digits of the
sha256 of the raw 32-byte public key, so the same key has the same id wherever its PEM is stored.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from amiforge.errors import ConfigError
from amiforge.inputs import KIB, read_input
from amiforge.model import TrustedKey
from amiforge.signing.interface import signature_failure

ALGORITHM = "ed25519"
# A PEM Ed25519 key is a few hundred bytes; a key file bigger than this is something else.
MAX_KEY_FILE = 64 * KIB
KEY_ID_PREFIX = "ed25519:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(public_key: Ed25519PublicKey) -> str:
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode("ascii")


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA-{key.key_size} key"
    return f"a {type(key).__name__} key"


@dataclass(frozen=True)
class KeyInfo:
    """A generated key pair: where its files are and the id envelopes and trusted keys will name it by."""

    key_id: str
    algorithm: str
    private_path: Path
    public_path: Path
    public_key_pem: str


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL makes "refuse to overwrite" atomic, and the mode is set at creation so the private key is never
    # readable by others, not even between open and chmod. fchmod then undoes a umask that removed owner bits.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:  # owns fd from here; write() loops until every byte is written
        os.fchmod(fd, mode)
        f.write(data)


def generate_keypair(directory: Path, name: str) -> KeyInfo:
    """Create NAME.key (PKCS#8 PEM, 0600) and NAME.pub in `directory`; ConfigError if either already exists."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"invalid key name {name!r}",
            fix="use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit",
        )
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    if directory.exists() and not directory.is_dir():
        raise ConfigError(
            f"{directory} is not a directory, so the key files cannot go in it",
            fix="pass --dir a directory (it is made if missing), e.g. --dir ~/.config/amiforge/keys",
        )
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"key file {path} already exists; refusing to overwrite a key",
                fix="choose another key name, or move the old key away first (signatures it made stay verifiable "
                "only while its public key is trusted)",
            )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = _public_pem(key.public_key())
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_new(private_path, private_pem, 0o600)
        try:
            _write_new(public_path, public_pem.encode("ascii"), 0o644)
        except BaseException:
            # A private key without its public half is useless and confusing; do not leave one behind.
            private_path.unlink(missing_ok=True)
            raise
    except FileExistsError as e:
        raise ConfigError(
            f"{e.filename} already exists; refusing to overwrite it",
            fix="choose another key name or directory (a component of --dir may be a file)",
        ) from e
    except OSError as e:
        raise ConfigError(
            f"cannot write key files in {directory}: {e.strerror or e}",
            fix="choose a directory you can write to",
        ) from e
    return KeyInfo(key_id_of(key.public_key()), ALGORITHM, private_path, public_path, public_pem)


def read_public_key(path: Path) -> tuple[str, str]:
    """(key id, PEM) of an Ed25519 public key file; ConfigError naming the file for anything else."""
    fix = "give the NAME.pub file that `amiforge keys generate` wrote"
    data = read_input(path, what="public key file", max_bytes=MAX_KEY_FILE, fix=fix)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"public key file {path} is not a PEM public key", fix=fix) from e
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key file {path} holds {_describe_key(key)}, not an Ed25519 key", fix=fix)
    return key_id_of(key), _public_pem(key)


class KeyfileSigner:
    """Signs with an Ed25519 private key (usually loaded from a key file with `from_file`)."""

    algorithm = ALGORITHM

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id_of(private_key.public_key())

    @classmethod
    def from_file(cls, path: Path) -> KeyfileSigner:
        fix = "point the signing key setting at a file made by `amiforge keys generate`"
        data = read_input(path, what="signing key file", max_bytes=MAX_KEY_FILE, fix=fix)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as e:
            # cryptography raises TypeError for an encrypted key loaded without a password.
            raise ConfigError(
                f"signing key file {path} is encrypted; amiforge needs an unencrypted key", fix=fix
            ) from e
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ConfigError(f"signing key file {path} is not a PEM private key", fix=fix) from e
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(
                f"signing key file {path} holds {_describe_key(key)}, not an Ed25519 key",
                fix=fix,
            )
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_key_pem(self) -> str:
        return _public_pem(self._key.public_key())


class KeyfileVerifier:
    """Verifies Ed25519 signatures against trusted public keys (key id -> SubjectPublicKeyInfo PEM).

    Each PEM is checked against its key id when the verifier is built, so a registry row that pairs an id with
    another key is a ConfigError, not a silent trust in the wrong key."""

    def __init__(self, public_keys: Mapping[str, str | bytes], revoked: Collection[str] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key_id, pem in public_keys.items():
            data = pem.encode("ascii") if isinstance(pem, str) else pem
            try:
                key = serialization.load_pem_public_key(data)
            except (ValueError, UnsupportedAlgorithm) as e:
                raise ConfigError(f"trusted key {key_id}: not a PEM public key") from e
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"trusted key {key_id}: not an Ed25519 public key")
            if key_id_of(key) != key_id:
                raise ConfigError(
                    f"trusted key {key_id}: the PEM is the key {key_id_of(key)}",
                    fix="register the public key under its own id",
                )
            self._keys[key_id] = key
        self._revoked = frozenset(revoked)

    @classmethod
    def from_trusted_keys(cls, keys: Iterable[TrustedKey]) -> KeyfileVerifier:
        """The Ed25519 keys of the registry's trusted keys; a key with `revoked_at` set is revoked."""
        keys = [k for k in keys if k.algorithm == ALGORITHM]
        return cls({k.key_id: k.public_key for k in keys}, {k.key_id for k in keys if k.revoked_at is not None})

    def verify(self, data: bytes, signature: bytes, key_id: str) -> None:
        if key_id in self._revoked:
            raise signature_failure(key_id, "the key is revoked", fix="re-sign the version with a current key")
        key = self._keys.get(key_id)
        if key is None:
            raise signature_failure(key_id, "unknown key id: no trusted Ed25519 public key has this id")
        try:
            key.verify(signature, data)
        except InvalidSignature as e:
            raise signature_failure(key_id, "the signature does not verify over this payload") from e

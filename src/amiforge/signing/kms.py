"""AWS KMS signing: an ECC_NIST_P256 SIGN_VERIFY key signs with ECDSA_SHA_256; verification is local.

The only module of `signing/` that talks to AWS, through `amiforge.awsapi` (its clients and error table).

Signing sends KMS the sha256 of the message with `MessageType=DIGEST`, never the message itself: KMS refuses RAW
messages over 4096 bytes, and what gets signed is a DSSE PAE of a whole statement, which grows with every artifact
and region. For ECDSA_SHA_256, signing the digest is the same signature KMS would make over the raw message, so
anyone can verify it with the public key alone.

`KmsVerifier` verifies locally with `cryptography` against the key's public key, fetched once with GetPublicKey and
cached (or passed in from the registry's trusted keys), so verification needs no KMS call, no kms:Verify permission
and no network once the key is known. IAM: the signer needs kms:DescribeKey and kms:Sign (and kms:GetPublicKey to
export its public key); the verifier kms:GetPublicKey unless it is given the public keys.

Clients come from an `AwsSession` (awsapi/clients.py), so KMS calls get what every other AWS call of amiforge gets:
the settings' profile, standard retries with the settings' attempts per call, the user agent and call logging.
`session_for(settings, region)` makes that session from the settings; the service layer passes it in (it may not
import awsapi itself). Every call goes through `awsapi.clients.call`, so every botocore error goes through the one
AWS error table (awsapi/errors.py), keyed by the error code; message text is never inspected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from amiforge.awsapi.clients import AwsSession, call
from amiforge.awsapi.errors import error_for_code
from amiforge.errors import AmiforgeError, ConfigError, InfraError, NotFound
from amiforge.model import TrustedKey
from amiforge.settings import Settings
from amiforge.signing.interface import signature_failure

ALGORITHM = "ecdsa-p256-sha256"
KEY_ID_PREFIX = "kms:"
KEY_SPEC = "ECC_NIST_P256"
SIGNING_ALGORITHM = "ECDSA_SHA_256"
KEY_USAGE = "SIGN_VERIFY"


# --- errors: the one AWS error table (awsapi/errors.py) decides every KMS error ---------------------


# DescribeKey reports a key that cannot sign through its state, not an error; it is mapped as the error code KMS
# itself would answer Sign with, so the table above stays the only place that decides.
# Any other state (PendingDeletion, PendingImport, …) is what KMS reports as KMSInvalidStateException.
_STATE_CODES: Mapping[str, str] = {"Disabled": "DisabledException", "Unavailable": "KeyUnavailableException"}


def _error(code: str, action: str, key: str, detail: str = "") -> AmiforgeError:
    return error_for_code(code, f"kms:{action}", f"key {key}", detail)


def _region_of(reference: str) -> str | None:
    """The region of a key or alias ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), None for a bare id or alias."""
    parts = reference.split(":")
    return parts[3] if reference.startswith("arn:") and len(parts) >= 6 and parts[3] else None


def session_for(settings: Settings, region: str) -> AwsSession:
    """The session KMS signing runs in (`AwsSession.from_settings`, as the AWS provider's): the service layer asks
    for it here because it may not import awsapi itself."""
    return AwsSession.from_settings(settings, region)


# --- signer -----------------------------------------------------------------------------------------------------


class KmsSigner:
    """Signs with an AWS KMS ECC_NIST_P256 key. Accepts a key id, key ARN, alias name or alias ARN.

    `key_id` is `kms:` + the key's ARN, resolved once with DescribeKey: an alias can be repointed, so envelopes
    and trusted keys name the key itself. DescribeKey also lets a disabled or wrong-type key fail with a clear
    message before anything is signed.

    The KMS client is `session`'s (see `session_for`): the settings' profile, roles and attempts per call always
    apply, so there is no way to build a signer that ignores them."""

    algorithm = ALGORITHM

    def __init__(self, key_id_or_arn: str, region: str, *, session: AwsSession) -> None:
        arn_region = _region_of(key_id_or_arn)
        if arn_region is not None and arn_region != region:
            raise ConfigError(
                f"KMS key {key_id_or_arn} is in region {arn_region}, but the signer was configured for {region}",
                fix="use the key's own region",
            )
        self._reference = key_id_or_arn
        self._region = region
        self.session = session
        self._arn: str | None = None

    def _kms(self) -> Any:
        return self.session.client("kms", self._region)  # cached by the session

    def _resolve(self) -> str:
        """The key's ARN, after checking once that the key can sign the way amiforge signs."""
        if self._arn is not None:
            return self._arn
        meta = call(self._kms(), "DescribeKey", f"key {self._reference}", KeyId=self._reference)["KeyMetadata"]
        arn = str(meta["Arn"])
        state = str(meta.get("KeyState", "Enabled"))
        if state != "Enabled":
            raise _error(_STATE_CODES.get(state, "KMSInvalidStateException"), "DescribeKey", arn, f"key state {state}")
        usage = meta.get("KeyUsage")
        spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec")
        algorithms = meta.get("SigningAlgorithms")
        if usage != KEY_USAGE or spec != KEY_SPEC or (algorithms is not None and SIGNING_ALGORITHM not in algorithms):
            raise ConfigError(
                f"KMS key {arn} is a {spec} key for {usage}; amiforge signs with {SIGNING_ALGORITHM}",
                fix=f"create a key with --key-spec {KEY_SPEC} --key-usage {KEY_USAGE}",
            )
        self._arn = arn
        return arn

    @property
    def key_id(self) -> str:
        return KEY_ID_PREFIX + self._resolve()

    def sign(self, data: bytes) -> bytes:
        arn = self._resolve()
        # DIGEST, not RAW: see the module docstring (RAW is capped at 4096 bytes).
        digest = hashlib.sha256(data).digest()
        response = call(
            self._kms(),
            "Sign",
            f"key {arn}",
            KeyId=arn,
            Message=digest,
            MessageType="DIGEST",
            SigningAlgorithm=SIGNING_ALGORITHM,
        )
        signature = response["Signature"]
        if not isinstance(signature, bytes):
            raise InfraError(f"KMS Sign on key {arn} returned no signature bytes")
        return signature

    def public_key_pem(self) -> str:
        """The key's public half as SubjectPublicKeyInfo PEM, for the registry's trusted keys."""
        arn = self._resolve()
        der = call(self._kms(), "GetPublicKey", f"key {arn}", KeyId=arn)["PublicKey"]
        key = serialization.load_der_public_key(der)
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# --- verifier ---------------------------------------------------------------------------------------------------


class KmsVerifier:
    """Verifies `kms:` signatures locally with each key's public key (ECDSA P-256, SHA-256).

    Public keys come from `public_keys` (key id -> PEM, e.g. the registry's trusted keys) or else from KMS
    GetPublicKey, once per key: after that, verification works offline. A key unknown to KMS fails the gate;
    other KMS errors are mapped by the one table (a disabled key is a ConfigError, throttling an InfraError).

    Clients: `session`'s, for the key's region (see `session_for`): a key ARN names its region, and KMS only answers
    for keys of the region it is asked in."""

    def __init__(
        self,
        region: str,
        *,
        session: AwsSession,
        public_keys: Mapping[str, str | bytes] | None = None,
        revoked: Collection[str] = (),
    ) -> None:
        self._region = region
        self._session = session
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for key_id, pem in (public_keys or {}).items():
            data = pem.encode("ascii") if isinstance(pem, str) else pem
            try:
                loaded = serialization.load_pem_public_key(data)
            except (ValueError, UnsupportedAlgorithm) as e:
                raise ConfigError(f"trusted key {key_id}: not a PEM public key") from e
            self._keys[key_id] = self._check_p256(key_id, loaded)
        self._revoked = frozenset(revoked)

    @classmethod
    def from_trusted_keys(
        cls,
        region: str,
        keys: Iterable[TrustedKey],
        *,
        session: AwsSession,
    ) -> KmsVerifier:
        """The KMS keys of the registry's trusted keys; a key with `revoked_at` set is revoked."""
        keys = [k for k in keys if k.algorithm == ALGORITHM and k.key_id.startswith(KEY_ID_PREFIX)]
        return cls(
            region,
            session=session,
            public_keys={k.key_id: k.public_key for k in keys},
            revoked={k.key_id for k in keys if k.revoked_at is not None},
        )

    @staticmethod
    def _check_p256(key_id: str, key: object) -> ec.EllipticCurvePublicKey:
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise signature_failure(key_id, f"the key is not an {KEY_SPEC} public key")
        return key

    def _kms(self, region: str) -> Any:
        return self._session.client("kms", region)  # cached by the session

    def _public_key(self, key_id: str) -> ec.EllipticCurvePublicKey:
        cached = self._keys.get(key_id)
        if cached is not None:
            return cached
        reference = key_id.removeprefix(KEY_ID_PREFIX)
        client = self._kms(_region_of(reference) or self._region)
        try:
            response = call(client, "GetPublicKey", f"key {reference}", KeyId=reference)
        except NotFound as e:
            raise signature_failure(key_id, "unknown key id: KMS has no such key") from e
        usage = response.get("KeyUsage")
        if usage is not None and usage != KEY_USAGE:
            raise signature_failure(key_id, f"the KMS key is for {usage}, not {KEY_USAGE}")
        try:
            loaded = serialization.load_der_public_key(response["PublicKey"])
        except (ValueError, UnsupportedAlgorithm) as e:
            raise InfraError(f"KMS GetPublicKey on key {reference} returned an unreadable public key") from e
        key = self._keys[key_id] = self._check_p256(key_id, loaded)
        return key

    def public_key_pem(self, key_id: str) -> str:
        key = self._public_key(key_id)
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def verify(self, data: bytes, signature: bytes, key_id: str) -> None:
        if not key_id.startswith(KEY_ID_PREFIX):
            raise signature_failure(key_id, f"not a KMS key id (expected '{KEY_ID_PREFIX}…')")
        if key_id in self._revoked:
            raise signature_failure(key_id, "the key is revoked", fix="re-sign the version with a current key")
        key = self._public_key(key_id)
        try:
            # KMS signed sha256(data) with MessageType=DIGEST: exactly ECDSA-with-SHA-256 over `data`.
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as e:
            raise signature_failure(key_id, "the signature does not verify over this payload") from e

"""KMS signing under moto (in-process, no network): an ECC_NIST_P256 SIGN_VERIFY key signs a DSSE envelope through
`KmsSigner`, `KmsVerifier` checks it locally, and KMS errors come out as amiforge errors through the one table.

moto 5.2.5 does not implement `MessageType=DIGEST`: it hashes the digest again, so its signature is over
sha256(sha256(message)) and fails any offline check (see notes/moto.md, and the canary test below). The
`digest_mode` fixture emulates what real KMS does for DIGEST (sign the given digest, prehashed) so the signer's
real request path can be tested end to end. moto also ignores key state when signing and never throttles; those
answers are injected with a botocore `before-send` hook, which goes through botocore's real error parsing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from moto import mock_aws
from moto.kms.responses import KmsResponse
from moto.kms.utils import ECDSAPrivateKey
from moto_emulation import no_backoff

from amiforge.awsapi.clients import AwsSession
from amiforge.errors import ConfigError, GateFailed, InfraError, NotFound
from amiforge.lifecycle.sign import kms_signer
from amiforge.scanners.sbom import sbom_digest
from amiforge.settings import Settings
from amiforge.signing.interface import (
    Manifest,
    ManifestArtifact,
    canonical_statement,
    open_envelope,
    sign_envelope,
    statement,
)
from amiforge.signing.kms import KmsSigner, KmsVerifier, session_for

REGION = "eu-west-1"
ACCOUNT = "123456789012"
D = "ab" * 32


@pytest.fixture
def session(aws_env: None) -> Iterator[AwsSession]:
    """The session signers and verifiers run in (they take no other). One attempt per call: injected throttling must
    come back at once, not after botocore's backoff sleeps."""
    with mock_aws():
        yield AwsSession(REGION, boto_session=boto3.Session(region_name=REGION), max_attempts=1)


@pytest.fixture
def kms(session: AwsSession) -> Any:
    """The session's KMS client: the very client its signers and verifiers use (errors injected on it reach them)."""
    return session.client("kms", REGION)


@pytest.fixture
def digest_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make moto's Sign honour MessageType=DIGEST for ECDSA keys, as real KMS does.

    Real KMS signs the 32 given bytes as a SHA-256 digest (no second hash). This reaches into moto's key object for
    the private key, the smallest emulation that keeps the signer's request unchanged."""
    original = KmsResponse.sign

    def sign(self: KmsResponse) -> str:
        if self._get_param("MessageType") != "DIGEST":
            return original(self)
        key_id = self._get_param("KeyId")
        self._validate_key_id(key_id)
        key = self.kms_backend.describe_key(key_id)
        digest = self._get_param("Message")
        assert self._get_param("SigningAlgorithm") == "ECDSA_SHA_256" and len(digest) == 32
        assert isinstance(key.private_key, ECDSAPrivateKey)
        private = key.private_key.private_key
        signature = private.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        return json.dumps(
            {"KeyId": key.arn, "Signature": base64.b64encode(signature).decode(), "SigningAlgorithm": "ECDSA_SHA_256"}
        )

    monkeypatch.setattr(KmsResponse, "sign", sign)


@pytest.fixture
def key_arn(kms: Any) -> str:
    meta = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY", Description="amiforge test")["KeyMetadata"]
    return str(meta["Arn"])


def make_manifest() -> Manifest:
    return Manifest(
        name="web",
        ref="web@1",
        digest=D,
        artifacts=(ManifestArtifact("aws", REGION, "ami-0123456789abcdef0", D),),
        recipe_digest=D,
        sbom_digest=D,
        findings_summary={"cve:high": 0},
        parent=None,
        builder="test",
        built_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


class _Raw:
    """The smallest raw body botocore's response parser accepts."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def inject(client: Any, operation: str, code: str, status: int = 400) -> None:
    """Answer every `operation` call with a KMS JSON error `code`, before moto sees the request."""
    body = json.dumps({"__type": code, "message": "injected by the test"}).encode()

    def handler(request: Any, **_: Any) -> AWSResponse:
        return AWSResponse(request.url, status, {"Content-Type": "application/x-amz-json-1.1"}, _Raw(body))

    client.meta.events.register_first(f"before-send.kms.{operation}", handler)


# --- signing and verifying --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("digest_mode")
def test_kms_sign_then_verify_offline(session: AwsSession, kms: Any, key_arn: str) -> None:
    signer = KmsSigner(key_arn, REGION, session=session)
    assert signer.key_id == f"kms:{key_arn}"
    assert signer.algorithm == "ecdsa-p256-sha256"

    manifest = make_manifest()
    envelope = sign_envelope(canonical_statement(manifest), signer)
    verifier = KmsVerifier(REGION, session=session)
    assert open_envelope(envelope, verifier, trusted_key_ids={signer.key_id}) == statement(manifest)

    pem = signer.public_key_pem()  # what the registry's trusted keys would hold

    # The public key is cached: with KMS failing the same verifier still verifies.
    inject(kms, "GetPublicKey", "KMSInternalException", 500)
    open_envelope(envelope, verifier, trusted_key_ids={signer.key_id})

    # A verifier given the public key never calls KMS at all (GetPublicKey fails by now).
    offline = KmsVerifier(REGION, session=session, public_keys={signer.key_id: pem})
    open_envelope(envelope, offline, trusted_key_ids={signer.key_id})


@pytest.mark.usefixtures("digest_mode")
def test_kms_signature_is_plain_ecdsa_sha256_over_the_message(session: AwsSession, kms: Any, key_arn: str) -> None:
    # What makes local verification sound: a DIGEST-mode signature of sha256(m) is ECDSA-with-SHA-256 over m.
    signer = KmsSigner(key_arn, REGION, session=session)
    message = b"x" * 10_000  # larger than the 4096 bytes KMS accepts as a RAW message
    signature = signer.sign(message)
    public = serialization.load_pem_public_key(signer.public_key_pem().encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    public.verify(signature, hashlib.sha256(message).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))


def test_signer_resolves_an_alias_to_the_key_arn(session: AwsSession, kms: Any, key_arn: str) -> None:
    kms.create_alias(AliasName="alias/amiforge-signing", TargetKeyId=key_arn)
    assert KmsSigner("alias/amiforge-signing", REGION, session=session).key_id == f"kms:{key_arn}"


@pytest.mark.usefixtures("digest_mode")
@pytest.mark.parametrize("part", ["payload", "signature"])
def test_tampered_envelope_fails(session: AwsSession, kms: Any, key_arn: str, part: str) -> None:
    signer = KmsSigner(key_arn, REGION, session=session)
    envelope = sign_envelope(canonical_statement(make_manifest()), signer)
    if part == "payload":
        payload = bytearray(base64.b64decode(envelope["payload"]))
        payload[30] ^= 1
        envelope["payload"] = base64.b64encode(bytes(payload)).decode()
    else:
        sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
        sig[-3] ^= 1
        envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(GateFailed) as caught:
        open_envelope(envelope, KmsVerifier(REGION, session=session), trusted_key_ids={signer.key_id})
    assert caught.value.exit_code == 4
    assert "does not verify" in caught.value.diagnostics()


@pytest.mark.usefixtures("digest_mode")
def test_revoked_and_foreign_keys_fail_verification(session: AwsSession, kms: Any, key_arn: str) -> None:
    signer = KmsSigner(key_arn, REGION, session=session)
    envelope = sign_envelope(canonical_statement(make_manifest()), signer)
    revoked = KmsVerifier(REGION, session=session, revoked={signer.key_id})
    with pytest.raises(GateFailed) as caught:
        open_envelope(envelope, revoked, trusted_key_ids={signer.key_id})
    assert "the key is revoked" in caught.value.diagnostics()

    # Another real key, claiming the signature: it does not verify.
    other = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    envelope["signatures"][0]["keyid"] = f"kms:{other}"
    with pytest.raises(GateFailed) as caught:
        open_envelope(envelope, KmsVerifier(REGION, session=session), trusted_key_ids={f"kms:{other}"})
    assert "does not verify" in caught.value.diagnostics()


def test_verifier_with_a_key_kms_does_not_know_fails_the_gate(session: AwsSession, kms: Any) -> None:
    key_id = f"kms:arn:aws:kms:{REGION}:{ACCOUNT}:key/{uuid.uuid4()}"
    with pytest.raises(GateFailed) as caught:
        KmsVerifier(REGION, session=session).verify(b"m", b"sig", key_id)
    assert "unknown key id: KMS has no such key" in caught.value.diagnostics()
    # KMS's answer, through the one error table (NotFound), is kept as the cause.
    assert isinstance(caught.value.__cause__, NotFound) and isinstance(caught.value.__cause__.__cause__, ClientError)


def test_verifier_refuses_a_key_of_the_wrong_kind(session: AwsSession, kms: Any) -> None:
    rsa = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    with pytest.raises(GateFailed) as caught:
        KmsVerifier(REGION, session=session).verify(b"m", b"sig", f"kms:{rsa}")
    assert "not an ECC_NIST_P256 public key" in caught.value.diagnostics()


# --- errors -----------------------------------------------------------------------------------------------------


def test_unknown_key_is_not_found(session: AwsSession, kms: Any) -> None:
    with pytest.raises(NotFound) as caught:
        KmsSigner(f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{uuid.uuid4()}", REGION, session=session).sign(b"m")
    assert "NotFoundException" in caught.value.message
    assert caught.value.exit_code == 3
    assert isinstance(caught.value.__cause__, ClientError)


def test_disabled_key_is_refused_before_signing(session: AwsSession, kms: Any, key_arn: str) -> None:
    kms.disable_key(KeyId=key_arn.rsplit("/", 1)[1])  # moto 5.2.5 disable_key takes only the bare key id
    with pytest.raises(ConfigError) as caught:
        KmsSigner(key_arn, REGION, session=session).sign(b"m")
    assert "DisabledException" in caught.value.message and "key state Disabled" in caught.value.message
    assert "enable-key" in caught.value.diagnostics()


def test_wrong_key_spec_is_refused(session: AwsSession, kms: Any) -> None:
    arn = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    with pytest.raises(ConfigError, match="RSA_2048"):
        KmsSigner(arn, REGION, session=session).sign(b"m")


def test_region_mismatch_is_a_config_error(session: AwsSession) -> None:
    with pytest.raises(ConfigError, match="is in region us-east-1"):
        KmsSigner(f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{uuid.uuid4()}", REGION, session=session)


def test_signer_and_verifier_need_a_session() -> None:
    """No fallback to a bare AwsSession(region): a signer or verifier built without the settings' session (profile,
    roles, attempts per call) would quietly sign with the default credential chain."""
    key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{uuid.uuid4()}"
    with pytest.raises(TypeError, match="session"):
        KmsSigner(key, REGION)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="session"):
        KmsVerifier(REGION)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="session"):
        KmsVerifier.from_trusted_keys(REGION, [])  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("code", "family", "retryable"),
    [
        ("NotFoundException", NotFound, None),
        ("DisabledException", ConfigError, None),
        ("AccessDeniedException", ConfigError, None),
        ("KMSInvalidStateException", ConfigError, None),
        ("ThrottlingException", InfraError, True),
        ("KMSInternalException", InfraError, True),
        ("SomethingNewException", InfraError, False),  # unknown codes are reported, never promised a retry
    ],
)
def test_sign_errors_map_through_the_table(
    session: AwsSession, kms: Any, key_arn: str, code: str, family: type[Exception], retryable: bool | None
) -> None:
    signer = KmsSigner(key_arn, REGION, session=session)
    assert signer.key_id  # DescribeKey answered by moto; only Sign fails
    inject(kms, "Sign", code)
    with pytest.raises(family) as caught:
        signer.sign(b"m")
    error = caught.value
    assert type(error) is family
    assert code in str(error)
    assert isinstance(error.__cause__, ClientError)
    if retryable is not None:
        assert isinstance(error, InfraError) and error.retryable is retryable


def test_get_public_key_errors_map_through_the_table(session: AwsSession, kms: Any, key_arn: str) -> None:
    inject(kms, "GetPublicKey", "AccessDeniedException")
    with pytest.raises(ConfigError, match="AccessDeniedException") as caught:
        KmsVerifier(REGION, session=session).verify(b"m", b"s", f"kms:{key_arn}")
    assert "kms:GetPublicKey" in caught.value.diagnostics()


# --- the session: profile, roles and attempts per call from the settings ----------------------------------------

PROFILE_KEY = "AKIAPROFILE00000TEST"


@pytest.fixture
def profiled_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings naming a profile (whose credentials differ from the environment's) and 3 attempts per AWS call."""
    config = tmp_path / "aws-config"
    config.write_text(
        f"[profile amiforge-signing]\nregion = {REGION}\naws_access_key_id = {PROFILE_KEY}\n"
        "aws_secret_access_key = testing\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    no_backoff(monkeypatch)  # the retries below must not sleep
    return Settings(data_dir=tmp_path, aws_profile="amiforge-signing", aws_max_attempts=3)


def throttle(client: Any, operation: str) -> list[int]:
    """Answer every `operation` send with ThrottlingException (botocore retries it); returns the sends seen."""
    sends: list[int] = []

    def handler(request: Any, **_: Any) -> AWSResponse:
        sends.append(1)
        body = json.dumps({"__type": "ThrottlingException", "message": "injected"}).encode()
        return AWSResponse(request.url, 400, {"Content-Type": "application/x-amz-json-1.1"}, _Raw(body))

    client.meta.events.register_first(f"before-send.kms.{operation}", handler)
    return sends


def test_lifecycle_kms_signer_runs_in_the_settings_session(kms: Any, key_arn: str, profiled_settings: Settings) -> None:
    """`amiforge sign --kms-key` (lifecycle.sign.kms_signer) signs through an AwsSession made from the settings: the
    profile's credentials, and the settings' attempts per call (not a bare client's defaults)."""
    signer = kms_signer(key_arn, REGION, profiled_settings)
    assert isinstance(signer, KmsSigner)
    assert signer.key_id == f"kms:{key_arn}"  # DescribeKey answered through that session
    assert signer.session.boto_session.profile_name == "amiforge-signing"
    assert signer.session.boto_session.get_credentials().access_key == PROFILE_KEY
    sends = throttle(signer.session.client("kms", REGION), "Sign")  # the very client the signer uses
    with pytest.raises(InfraError, match="ThrottlingException") as caught:
        signer.sign(b"m")
    assert len(sends) == 3 and caught.value.retryable


def test_verifier_runs_in_the_session_it_is_given(kms: Any, key_arn: str, profiled_settings: Settings) -> None:
    session = session_for(profiled_settings, REGION)
    verifier = KmsVerifier.from_trusted_keys(REGION, [], session=session)
    sends = throttle(session.client("kms", REGION), "GetPublicKey")
    with pytest.raises(InfraError, match="ThrottlingException"):
        verifier.public_key_pem(f"kms:{key_arn}")
    assert len(sends) == 3


# --- the moto gap the digest_mode fixture covers ----------------------------------------------------------------


def test_canary_moto_still_double_hashes_digest_messages(session: AwsSession, kms: Any, key_arn: str) -> None:
    """If this fails, moto now implements MessageType=DIGEST: drop the `digest_mode` emulation."""
    message = b"amiforge"
    signature = KmsSigner(key_arn, REGION, session=session).sign(message)
    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key_arn)["PublicKey"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    with pytest.raises(InvalidSignature):
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    # What moto signed instead: the digest, hashed once more.
    public.verify(signature, hashlib.sha256(message).digest(), ec.ECDSA(hashes.SHA256()))


def test_lifecycle_signs_with_kms_and_verifies_offline_from_the_registry(
    session: AwsSession, kms: Any, key_arn: str, digest_mode: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sign(signer=KmsSigner) trusts the KMS public key in the registry; verify needs no AWS call after that."""
    from datetime import UTC, datetime

    import amiforge.providers as providers
    from amiforge.inputs import file_sha256 as sha256_file
    from amiforge.lifecycle.sign import sign, trust_key, verify
    from amiforge.model import Artifact, ScanRecord, Status
    from amiforge.settings import Settings
    from amiforge.signing.kms import KmsSigner
    from amiforge.store.sql import open_store

    class DigestOnly:
        name = "local"

        def __init__(self, settings: Settings) -> None:
            pass

        def current_digest(self, artifact: Artifact) -> str:
            return sha256_file(Path(artifact.location))

    monkeypatch.setattr(providers, "PROVIDERS", {"local": DigestOnly})
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    settings = Settings(data_dir=tmp_path)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"TEST disk image\n" * 64)
    digest = sha256_file(disk)
    v = store.create_version(name="web", recipe_digest="a" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None)  # fmt: skip
    store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=digest, size_bytes=disk.stat().st_size)
    store.add_artifact(v.id, Artifact("local", "local", str(disk), digest, disk.stat().st_size))
    store.transition(v.id, Status.TESTED, expect=Status.BUILT)
    store.add_scan(v.id, ScanRecord(datetime.now(UTC), (), "{}", sbom_digest("{}"), (), "none"))
    store.transition(v.id, Status.SCANNED, expect=Status.TESTED)

    signer = KmsSigner(key_arn, REGION, session=session)
    with pytest.raises(ConfigError, match="not trusted"):  # `keys trust --kms-key` comes first
        sign("web@1", store=store, settings=settings, signer=signer)
    trust_key(store, key_id=signer.key_id, algorithm=signer.algorithm, public_key_pem=signer.public_key_pem(),
              actor="TEST")  # fmt: skip
    record = sign("web@1", store=store, settings=settings, signer=signer)
    assert record.key_id == f"kms:{key_arn}"
    (trusted,) = store.signing_keys()
    assert trusted.key_id == record.key_id and "BEGIN PUBLIC KEY" in trusted.public_key
    assert verify("web@1", store=store, settings=settings).signature.key_id == record.key_id

    store.revoke_key(record.key_id, "rotated", actor="TEST")
    with pytest.raises(GateFailed):
        verify("web@1", store=store, settings=settings)

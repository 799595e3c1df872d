"""sign / verify: a DSSE envelope over an in-toto statement (SLSA provenance) of the version's manifest.

Signing refuses an artifact whose bytes no longer match the registry; verifying recomputes every artifact's
digest from its bytes and compares the signed manifest with what the registry says now. Either returns or
raises GateFailed — it never quietly passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from amiforge.errors import ConfigError, GateFailed, GateFailure
from amiforge.lifecycle.runs import recorded_copies
from amiforge.lifecycle.views import findings_summary
from amiforge.model import (
    Artifact,
    ImageVersion,
    ScanRecord,
    SignatureRecord,
    Status,
    TrustedKey,
    check_aws_region,
    require_status,
)
from amiforge.providers import provider_for
from amiforge.settings import Settings
from amiforge.signing.interface import (
    GATE,
    Manifest,
    ManifestArtifact,
    MultiVerifier,
    Signer,
    Verifier,
    canonical_statement,
    manifest_from_statement,
    open_envelope,
    sign_envelope,
)
from amiforge.signing.keyfile import KeyfileSigner, KeyfileVerifier, KeyInfo, generate_keypair, read_public_key
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

SIGNABLE = (Status.SCANNED, Status.SIGNED)


def _not_signable_fix(version: ImageVersion) -> str:
    if version.status in (Status.BUILT, Status.FAILED):
        return f"boot-test it, then scan it: amiforge test {version.ref} && amiforge scan {version.ref}"
    if version.status is Status.TESTED:
        return f"scan it first: amiforge scan {version.ref}"
    return f"sign another version: amiforge images list --name {version.name}"


BUILDER = "urn:amiforge:builder"


@dataclass(frozen=True)
class VerifyOutcome:
    version: ImageVersion
    signature: SignatureRecord
    manifest: Manifest
    # The findings the registry holds now differ from those the signature states, over the same SBOM: what is known
    # about the packages changed since signing (new advisories, a rescan), not the image. The gates judge the new
    # findings; the signature still vouches for the bytes.
    findings_now: Mapping[str, int] | None = None


def _fail(detail: str, name: str = "signature", fix: str | None = None) -> GateFailed:
    return GateFailed(GATE, [GateFailure(name, detail)], fix=fix)


def manifest_of(version: ImageVersion, artifacts: list[Artifact], scan: ScanRecord) -> Manifest:
    """The manifest as the registry describes the version now (what a signature must still match)."""
    assert version.digest is not None
    return Manifest(
        name=version.name,
        ref=version.ref,
        digest=version.digest,
        artifacts=tuple(ManifestArtifact(a.provider, a.region, a.location, a.digest) for a in artifacts),
        recipe_digest=version.recipe_digest,
        sbom_digest=scan.sbom_digest,
        findings_summary=findings_summary(scan.findings),
        parent=version.parent,
        builder=f"{BUILDER}:{version.provider}",
        built_at=version.created_at,
    )


def _facts(ref: str, store: Store) -> tuple[ImageVersion, list[Artifact], ScanRecord]:
    version = store.get_version(ref)
    scan = store.latest_scan(version.id)
    if scan is None:
        raise _fail(f"{version.ref} has not been scanned", "scan", fix=f"amiforge scan {version.ref}")
    return version, store.artifacts(version.id), scan


def check_artifact_bytes(version: ImageVersion, artifacts: list[Artifact], settings: Settings) -> None:
    """Every artifact's bytes must still hash to the digest the registry recorded."""
    failures = []
    for a in artifacts:
        actual = provider_for(a.provider, settings).current_digest(a)
        if actual != a.digest:
            failures.append(
                GateFailure(f"artifact {a.location}", f"bytes hash to {actual[:16]}…, recorded {a.digest[:16]}…")
            )
    if failures:
        raise GateFailed(
            GATE,
            failures,
            fix="the artifact's bytes changed after it was built (damage or tampering: find out why first); then "
            f"bake the recipe again: amiforge bake {version.recipe_path} (locally, a damaged cached disk is rebuilt)",
        )


def _public_pem(signer: Signer) -> str:
    """Both our signers can say their public key; the registry stores it so verification works offline."""
    public_key_pem = getattr(signer, "public_key_pem", None)
    if not callable(public_key_pem):
        raise ConfigError(f"signer {signer.key_id} cannot export its public key")
    return str(public_key_pem())


def kms_signer(key: str, region: str | None, settings: Settings) -> Signer:
    """A KMS signer whose AWS calls honour the settings' profile, roles and attempts per call."""
    if not region:
        raise ConfigError("a KMS key needs its region", fix="set AMIFORGE_KMS_REGION (or pass --kms-region)")
    check_aws_region(region, what="the KMS key's region")
    # Imported here: boto3 costs ~0.3 s of start-up, which only KMS users should pay.
    from amiforge.signing.kms import KmsSigner, session_for

    return KmsSigner(key, region, session=session_for(settings, region))


def _verifier(keys: list[TrustedKey], settings: Settings) -> MultiVerifier:
    verifiers: dict[str, Verifier] = {"ed25519": KeyfileVerifier.from_trusted_keys(keys)}
    if any(k.key_id.startswith("kms:") for k in keys):
        from amiforge.signing.kms import KmsVerifier, session_for

        # Verifies offline with the public keys the registry holds; the region is only for keys it lacks.
        region = settings.kms_region or "us-east-1"
        verifiers["kms"] = KmsVerifier.from_trusted_keys(region, keys, session=session_for(settings, region))
    return MultiVerifier(verifiers)


def trust_key(store: Store, *, key_id: str, algorithm: str, public_key_pem: str, actor: str) -> tuple[TrustedKey, bool]:
    """Add a public key to the registry's trust root: an explicit, audited act (never a side effect of signing).
    Returns the trusted key and whether this call added it (trusting a trusted key again changes nothing)."""
    return store.add_key(TrustedKey(key_id, algorithm, public_key_pem, datetime.now(UTC)), actor=actor)


def trust_public_key(
    store: Store,
    *,
    public_key: Path | None = None,
    kms_key: str | None = None,
    kms_region: str | None = None,
    actor: str,
    settings: Settings,
) -> tuple[TrustedKey, bool]:
    """Trust either an Ed25519 public key file (NAME.pub, PEM) or an AWS KMS key (its public key is fetched once
    and kept, so verification needs no KMS call). Audited as `key.added`; see `trust_key`."""
    if (public_key is None) == (kms_key is None):
        raise ConfigError("give either a public key file or --kms-key", fix="amiforge keys trust keys/team.pub")
    if kms_key is not None:
        signer = kms_signer(kms_key, kms_region, settings)
        key_id, algorithm, pem = signer.key_id, signer.algorithm, _public_pem(signer)
    else:
        assert public_key is not None
        key_id, pem = read_public_key(public_key)
        algorithm = "ed25519"
    return trust_key(store, key_id=key_id, algorithm=algorithm, public_key_pem=pem, actor=actor)


def revoke_trusted_key(store: Store, key_id: str, *, reason: str, actor: str) -> TrustedKey:
    """Stop trusting a key: every signature it made stops verifying. Audited as `key.revoked`."""
    if not reason.strip():
        raise ConfigError("revoking a key needs a reason", fix='amiforge keys revoke KEY_ID --reason "why"')
    return store.revoke_key(key_id, reason, actor=actor)


def default_signer(settings: Settings, store: Store, *, create: bool) -> Signer:
    if settings.kms_key:
        return kms_signer(settings.kms_key, settings.kms_region, settings)
    path = settings.signing_key_path
    if not path.is_file():
        # Only a registry that trusts no key yet may get one made for it; otherwise a missing or mistyped key path
        # would silently add a new key to a team's trust root.
        if not create or store.signing_keys():
            raise ConfigError(
                f"no signing key at {path}",
                fix="set AMIFORGE_SIGNING_KEY to your Ed25519 key file (one the registry trusts: amiforge keys list), "
                "or make one: amiforge keys generate",
            )
        # First pipeline run on a fresh install: make the default key and trust it, in the audit log.
        new_trusted_key(store, path.parent, path.stem, actor=settings.actor)
    return KeyfileSigner.from_file(path)


def new_trusted_key(store: Store, directory: Path, name: str, *, actor: str) -> KeyInfo:
    """Make an Ed25519 key pair in `directory` and trust it. If the registry cannot record the trust, the new key
    files are removed again: a key nobody trusts would only block the next try ("already exists")."""
    info = generate_keypair(directory, name)
    try:
        trust_key(store, key_id=info.key_id, algorithm=info.algorithm, public_key_pem=info.public_key_pem, actor=actor)
    except BaseException:
        for made in (info.private_path, info.public_path):
            made.unlink(missing_ok=True)
        raise
    return info


def sign(
    ref: str,
    *,
    store: Store,
    settings: Settings,
    key: Path | None = None,
    signer: Signer | None = None,
    create_key: bool = False,
) -> SignatureRecord:
    # The state first: a version that is not scanned yet is in the wrong state (exit 3), not a failed gate.
    current = store.get_version(ref)
    require_status(current, SIGNABLE, doing="signed", fix=_not_signable_fix(current))
    version, artifacts, scan = _facts(current.ref, store)  # NAME@N: a channel ref could move in between
    check_artifact_bytes(version, artifacts, settings)
    if signer is None:
        signer = KeyfileSigner.from_file(key) if key else default_signer(settings, store, create=create_key)
    now = datetime.now(UTC)
    trusted = next((k for k in store.signing_keys() if k.key_id == signer.key_id), None)
    if trusted is None:
        # Signing must not widen the trust root: a signature by a key nobody trusted could never verify anyway.
        raise ConfigError(
            f"signing key {signer.key_id} is not trusted by this registry",
            fix="trust it first: amiforge keys trust PATH.pub (or --kms-key KEY for a KMS key)",
        )
    if trusted.public_key.strip() != _public_pem(signer).strip():
        raise ConfigError(f"the registry trusts a different public key as {signer.key_id}")
    if trusted.revoked_at is not None:
        # add_key returns the registry's row: a revoked key stays revoked, so its signature could never verify.
        raise ConfigError(
            f"signing key {signer.key_id} is revoked ({trusted.revoked_reason or 'no reason recorded'}); "
            "a signature it makes would never verify",
            fix="make a new key (amiforge keys generate --name NEW) and sign with --key or AMIFORGE_SIGNING_KEY",
        )
    logger.info("sign %s with %s (%d artifact(s))", version.ref, signer.key_id, len(artifacts))
    statement = canonical_statement(manifest_of(version, artifacts, scan))
    envelope = sign_envelope(statement, signer)
    record = store.add_signature(
        version.id,
        SignatureRecord(
            signer.key_id, json.dumps(envelope, sort_keys=True), hashlib.sha256(statement).hexdigest(), now
        ),
    )
    if version.status == Status.SCANNED:
        store.transition(version.id, Status.SIGNED, expect=Status.SCANNED)
    store.append_event(
        "sign", actor=settings.actor, ref=version.ref, data={"key": signer.key_id, "statement": record.statement_digest}
    )
    return record


def verify(ref: str, *, store: Store, settings: Settings) -> VerifyOutcome:
    version, artifacts, scan = _facts(ref, store)
    if version.status == Status.REVOKED:
        raise _fail(f"{version.ref} is revoked", "revoked", fix="promote another version")
    signatures = store.signatures(version.id)
    if not signatures:
        raise _fail(f"{version.ref} carries no signature", fix=f"amiforge sign {version.ref}")
    keys = store.signing_keys()
    trusted = {k.key_id for k in keys if k.revoked_at is None}
    verifier = _verifier(keys, settings)
    signature = signatures[-1]
    statement = open_envelope(signature.envelope, verifier, trusted_key_ids=trusted)
    signed = manifest_from_statement(statement)
    # Copies made by `distribute` after signing are not in the signed manifest; each must be a recorded copy of an
    # artifact that is. Everything else is compared as signed, and every artifact's digest is checked below.
    signed_at = {(a.provider, a.region, a.location) for a in signed.artifacts}
    signed_locations = {location for _, _, location in signed_at}
    copies = recorded_copies(version, store)
    extra = [a for a in artifacts if (a.provider, a.region, a.location) not in signed_at]
    unexplained = [a for a in extra if copies.get(a.location) not in signed_locations]
    if unexplained:
        raise GateFailed(
            GATE,
            [
                GateFailure(f"artifact {a.location}", "not in the signed manifest, nor a copy of one")
                for a in unexplained
            ],
            fix=f"amiforge sign {version.ref} again if these artifacts are genuine",
        )
    now = manifest_of(version, [a for a in artifacts if a not in extra], scan)
    findings_now = None
    if now.sbom_digest == signed.sbom_digest and now.findings_summary != signed.findings_summary:
        # Findings are what today's vulnerability data says of the signed packages: they change without the image
        # changing (a rescan), and a rollback in an incident must not need a new signature for that.
        findings_now, now = now.findings_summary, replace(now, findings_summary=signed.findings_summary)
    if canonical_statement(signed) != canonical_statement(now):
        differences = [
            GateFailure(field, f"signed {getattr(signed, field)!r}, registry now {getattr(now, field)!r}")
            for field in ("digest", "artifacts", "recipe_digest", "sbom_digest", "findings_summary", "parent")
            if getattr(signed, field) != getattr(now, field)
        ]
        raise GateFailed(
            GATE,
            differences or [GateFailure("manifest", "differs")],
            fix=f"amiforge sign {version.ref} again after a rescan",
        )
    check_artifact_bytes(version, artifacts, settings)
    return VerifyOutcome(version, signature, signed, findings_now)

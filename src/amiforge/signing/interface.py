"""What a signature covers and how it travels: the manifest, its in-toto statement, and the DSSE envelope.

A version is signed over one canonical byte string (RFC 8785 JSON): an in-toto Statement v1 whose subjects are the
image (its ref and disk digest) and every physical copy of it, with a SLSA provenance v1 predicate that records the
recipe digest, the SBOM digest, the parent version, the findings summary, the builder and the build time. The statement
travels in a DSSE envelope; what is signed is DSSE's pre-authentication encoding (PAE) of the payload type and
the statement bytes, so a signature can never be replayed as a signature over a different payload type.

Implementations of `Signer` and `Verifier` (Ed25519 key files, AWS KMS) live beside this module. Verification
returns or raises `GateFailed`; it never quietly passes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, TypedDict, cast, runtime_checkable

import rfc8785

from amiforge.errors import ConfigError, GateFailed, GateFailure, Problem

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
# SLSA wants a URI naming the build process; a URN promises no web page we might not keep.
BUILD_TYPE = "urn:amiforge:build-type:bake:v1"
SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
PARENT_URI_PREFIX = "amiforge:"
GATE = "signature"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_REF = re.compile(r"(?P<name>[^@\s]+)@(?P<number>[1-9][0-9]*)")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


# --- signer and verifier ----------------------------------------------------------------------------------------


@runtime_checkable
class Signer(Protocol):
    """Signs bytes with one key. `key_id` names the key in envelopes and in the registry's trusted keys."""

    # Read-only properties, so an implementation may compute them (KMS resolves an alias to the key's ARN).
    @property
    def key_id(self) -> str: ...

    @property
    def algorithm(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


@runtime_checkable
class Verifier(Protocol):
    """Checks one signature. Returns on success; raises GateFailed for a bad signature, an unknown or a revoked key."""

    def verify(self, data: bytes, signature: bytes, key_id: str) -> None: ...


def signature_failure(key_id: str, detail: str, *, fix: str | None = None) -> GateFailed:
    """The GateFailed every verifier raises, so `open_envelope` can collect the reasons of several signatures."""
    return GateFailed(GATE, [GateFailure(key_id, detail)], fix=fix)


class MultiVerifier:
    """Routes each key id to the verifier of its scheme (the text before the first ':', e.g. `ed25519`, `kms`).

    Lets one trusted-key set mix key files and KMS keys; a key id of no known scheme fails the gate."""

    def __init__(self, verifiers: Mapping[str, Verifier]) -> None:
        self._verifiers = dict(verifiers)

    def verify(self, data: bytes, signature: bytes, key_id: str) -> None:
        scheme = key_id.partition(":")[0]
        verifier = self._verifiers.get(scheme)
        if verifier is None:
            known = ", ".join(sorted(self._verifiers)) or "none"
            raise signature_failure(key_id, f"no verifier for key scheme '{scheme}' (known: {known})")
        verifier.verify(data, signature, key_id)


# --- the manifest and its statement -----------------------------------------------------------------------------


class ManifestArtifact(NamedTuple):
    """One physical copy of the image, as the manifest records it. `Manifest` also converts plain 4-tuples."""

    provider: str
    region: str
    location: str  # local: path of the disk image; aws: ami id
    digest: str  # sha256 hex

    @property
    def subject_name(self) -> str:
        return f"{self.provider}:{self.region}:{self.location}"


def _sha256_hex(value: str, what: str) -> str:
    digest = value.removeprefix("sha256:").lower()
    if not _HEX64.fullmatch(digest):
        raise ValueError(f"manifest {what}: expected a sha256 hex digest, got {value!r}")
    return digest


def _iso_utc(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Manifest:
    """Everything a signature vouches for about one version. Digests are sha256 hex (a `sha256:` prefix is dropped).

    Artifacts are kept sorted and the findings summary read-only, so equal content gives an equal manifest and
    the same canonical bytes whatever order the caller collected them in."""

    name: str
    ref: str  # NAME@N
    digest: str  # sha256 of the disk image
    artifacts: tuple[ManifestArtifact, ...]
    recipe_digest: str
    sbom_digest: str
    findings_summary: Mapping[str, int] = field(hash=False)  # severity or kind -> count
    parent: str | None  # ref of the version this one succeeds
    builder: str  # who or what built it: a host, a CI job, a person
    built_at: datetime  # timezone-aware; rendered as ISO 8601 UTC

    def __post_init__(self) -> None:
        # Invalid input here is a programming error in the caller (these come from the store), hence ValueError.
        match = _REF.fullmatch(self.ref)
        if match is None or match["name"] != self.name:
            raise ValueError(f"manifest ref {self.ref!r} is not {self.name}@N")
        if self.parent is not None and _REF.fullmatch(self.parent) is None:
            raise ValueError(f"manifest parent {self.parent!r} is not NAME@N")
        if self.built_at.tzinfo is None or self.built_at.utcoffset() is None:
            raise ValueError("manifest built_at must be timezone-aware")
        if not self.builder:
            raise ValueError("manifest builder must not be empty")
        for kind, count in self.findings_summary.items():
            if not isinstance(kind, str) or isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"manifest findings_summary: {kind!r} -> {count!r} is not a name -> count >= 0")
        artifacts = []
        for item in self.artifacts:
            provider, region, location, digest = item
            artifacts.append(ManifestArtifact(provider, region, location, _sha256_hex(digest, f"artifact {location}")))
        object.__setattr__(self, "artifacts", tuple(sorted(artifacts)))
        object.__setattr__(self, "digest", _sha256_hex(self.digest, "digest"))
        object.__setattr__(self, "recipe_digest", _sha256_hex(self.recipe_digest, "recipe_digest"))
        object.__setattr__(self, "sbom_digest", _sha256_hex(self.sbom_digest, "sbom_digest"))
        object.__setattr__(self, "findings_summary", MappingProxyType(dict(sorted(self.findings_summary.items()))))


class CanonicalJsonError(ConfigError):
    """A value RFC 8785 cannot represent, so it can be neither signed nor compared with what was signed.

    `field` of its one problem is the JSON path of the offending member (`$.predicate.…`)."""


# rfc8785 0.1.4 raises its CanonicalizationError for most refusals, but a bare UnicodeEncodeError for a member name
# holding a lone surrogate (it sorts names by their UTF-16 encoding before checking them).
_REFUSALS = (rfc8785.CanonicalizationError, UnicodeEncodeError)


def canonical_json(value: object) -> bytes:
    """The one serialisation signatures cover: RFC 8785 (JSON Canonicalization Scheme), by the rfc8785 library.

    Members sorted by the UTF-16 code units of their names, no whitespace, UTF-8, ECMAScript number forms. What
    manifests hold (ASCII names; strings, integers, objects, arrays) comes out byte for byte as the hand-written
    serialiser amiforge used before, so earlier signatures still verify. A value RFC 8785 has no form for (NaN or an
    infinity, an integer beyond ±(2**53 - 1), text that is not valid Unicode, a non-JSON type) raises
    `CanonicalJsonError` naming the member, never a bare library error."""
    try:
        return rfc8785.dumps(cast(Any, value))
    except _REFUSALS as e:
        where, reason = _unrepresentable(value, "$")
        raise CanonicalJsonError(
            f"cannot canonicalise the content to sign (RFC 8785): {where}: {reason}",
            problems=[Problem(reason, field=where)],
            fix="signed content must be plain JSON: valid Unicode text, integers within ±(2**53 - 1), finite "
            "numbers; correct the value named (a path, for one, must be valid UTF-8)",
        ) from e


def _unrepresentable(value: object, path: str) -> tuple[str, str]:
    """The JSON path of the innermost member of `value` that RFC 8785 refuses, and why (only run after a failure)."""
    members: list[tuple[str, object]] = []
    if isinstance(value, dict):
        for key, member in value.items():
            if not isinstance(key, str):
                return path, f"member name {key!r} is not a string"
            name = f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_:-]*", key) else f"{path}[{key!r}]"
            members += [(name, key), (name, member)]
    elif isinstance(value, list | tuple):
        members = [(f"{path}[{i}]", member) for i, member in enumerate(value)]
    for where, member in members:
        try:
            rfc8785.dumps(cast(Any, member))
        except _REFUSALS:
            return _unrepresentable(member, where)
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    if isinstance(value, int):
        reason = f"integer {shown} is beyond ±(2**53 - 1), the integers JSON numbers hold exactly (RFC 8785 §3.2.2.3)"
    elif isinstance(value, float):
        reason = f"number {shown} has no JSON form (RFC 8785 §3.2.2.3 allows finite numbers only)"
    elif isinstance(value, str):
        reason = f"text {shown} is not valid Unicode (a lone surrogate, e.g. from bytes in another encoding)"
    else:
        reason = f"a {type(value).__name__} has no JSON form"
    return path, reason


def statement(manifest: Manifest) -> dict[str, Any]:
    """The in-toto Statement v1 (SLSA provenance v1 predicate) for a manifest, as a JSON-ready dict."""
    subjects: list[dict[str, Any]] = [{"name": manifest.ref, "digest": {"sha256": manifest.digest}}]
    for a in manifest.artifacts:
        subjects.append(
            {
                "name": a.subject_name,
                "digest": {"sha256": a.digest},
                "annotations": {"provider": a.provider, "region": a.region, "location": a.location},
            }
        )
    dependencies: list[dict[str, Any]] = [
        {"name": "sbom", "digest": {"sha256": manifest.sbom_digest}, "mediaType": SBOM_MEDIA_TYPE}
    ]
    if manifest.parent is not None:
        # Only the parent's ref is known here; its own signed manifest carries its digest.
        dependencies.append({"name": "parent", "uri": PARENT_URI_PREFIX + manifest.parent})
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": SLSA_PROVENANCE_V1,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "image": manifest.name,
                    "recipe": {"digest": {"sha256": manifest.recipe_digest}},
                },
                # internalParameters is the one free-form object SLSA leaves to the builder; consumers that do not
                # know amiforge ignore it, while the scan outcome stays covered by the same signature.
                "internalParameters": {"amiforge": {"findingsSummary": dict(manifest.findings_summary)}},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": manifest.builder},
                # The bake's start time is not part of the manifest, so startedOn is left out rather than guessed.
                "metadata": {"invocationId": manifest.ref, "finishedOn": _iso_utc(manifest.built_at)},
            },
        },
    }


def canonical_statement(manifest: Manifest) -> bytes:
    """The exact bytes a signature covers: the same manifest always gives the same bytes."""
    return canonical_json(statement(manifest))


def manifest_from_statement(parsed: Mapping[str, Any]) -> Manifest:
    """Read a manifest back from a (verified) statement; GateFailed if it is not one amiforge wrote.

    `canonical_statement(manifest_from_statement(s))` gives back the signed bytes, which is how a verifier compares
    what was signed with what the registry says now."""
    try:
        if parsed["_type"] != STATEMENT_TYPE or parsed["predicateType"] != SLSA_PROVENANCE_V1:
            raise ValueError(f"statement is {parsed['_type']!r} / {parsed['predicateType']!r}")
        build = parsed["predicate"]["buildDefinition"]
        run = parsed["predicate"]["runDetails"]
        image, *copies = parsed["subject"]
        deps = {d["name"]: d for d in build["resolvedDependencies"]}
        parent_uri = deps["parent"]["uri"] if "parent" in deps else None
        if parent_uri is not None and not parent_uri.startswith(PARENT_URI_PREFIX):
            raise ValueError(f"parent uri {parent_uri!r}")
        manifest = Manifest(
            name=build["externalParameters"]["image"],
            ref=image["name"],
            digest=image["digest"]["sha256"],
            artifacts=tuple(
                ManifestArtifact(
                    c["annotations"]["provider"],
                    c["annotations"]["region"],
                    c["annotations"]["location"],
                    c["digest"]["sha256"],
                )
                for c in copies
            ),
            recipe_digest=build["externalParameters"]["recipe"]["digest"]["sha256"],
            sbom_digest=deps["sbom"]["digest"]["sha256"],
            findings_summary=build["internalParameters"]["amiforge"]["findingsSummary"],
            parent=parent_uri.removeprefix(PARENT_URI_PREFIX) if parent_uri is not None else None,
            builder=run["builder"]["id"],
            built_at=datetime.fromisoformat(run["metadata"]["finishedOn"]),
        )
        # What a verifier does next is compare canonical bytes: a statement that has none fails here, as a gate.
        canonical_statement(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise GateFailed(
            GATE,
            [GateFailure("statement", f"not an amiforge manifest statement ({type(e).__name__}: {e})")],
        ) from e
    except CanonicalJsonError as e:
        detail = f"has no RFC 8785 canonical form: {e.problems[0].field}: {e.problems[0].message}"
        raise GateFailed(GATE, [GateFailure("statement", detail)]) from e
    return manifest


# --- DSSE envelopes ---------------------------------------------------------------------------------------------


class EnvelopeSignature(TypedDict):
    keyid: str
    sig: str  # base64


class Envelope(TypedDict):
    """A DSSE envelope as JSON: payload and signatures are base64 (standard alphabet, padded)."""

    payload: str
    payloadType: str
    signatures: list[EnvelopeSignature]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body.

    Lengths are byte counts in ASCII decimal; this, not the payload alone, is what gets signed."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_envelope(statement_bytes: bytes, signer: Signer) -> Envelope:
    """Wrap statement bytes in a DSSE envelope signed by `signer`."""
    try:
        parsed = json.loads(statement_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"refusing to sign: the statement is not JSON ({e})") from e
    if not isinstance(parsed, dict) or parsed.get("_type") != STATEMENT_TYPE:
        # The payload type promises an in-toto statement; never sign something that would break that promise.
        raise ValueError(f"refusing to sign: the payload is not an in-toto statement ({STATEMENT_TYPE})")
    signature = signer.sign(pae(IN_TOTO_PAYLOAD_TYPE, statement_bytes))
    return {
        "payload": base64.b64encode(statement_bytes).decode("ascii"),
        "payloadType": IN_TOTO_PAYLOAD_TYPE,
        "signatures": [{"keyid": signer.key_id, "sig": base64.b64encode(signature).decode("ascii")}],
    }


def _b64decode(text: str) -> bytes:
    # DSSE allows the standard and the URL-safe alphabet; anything else is refused rather than skipped, which is
    # what a bare b64decode would do with stray characters.
    std = text.replace("-", "+").replace("_", "/")
    std += "=" * (-len(std) % 4)
    if not _B64.fullmatch(std):
        raise ValueError("characters outside the base64 alphabet")
    try:
        return base64.b64decode(std, validate=True)
    except binascii.Error as e:
        raise ValueError(str(e)) from e


def _malformed(where: str, detail: str) -> GateFailed:
    return GateFailed(
        GATE,
        [GateFailure(where, detail)],
        fix="the envelope is damaged or was not written by amiforge: sign the version again",
    )


def open_envelope(
    envelope: Mapping[str, object] | str | bytes,
    verifier: Verifier,
    *,
    trusted_key_ids: Collection[str],
) -> dict[str, Any]:
    """Verify a DSSE envelope and return the statement it carries.

    At least one signature must come from a trusted key and verify (the verifier refuses revoked keys). Signatures
    from other keys are reported but cannot make a bad envelope good. Anything malformed fails the gate naming the
    field; the payload is parsed only after a signature over it has verified."""
    if isinstance(envelope, str | bytes):
        try:
            envelope = json.loads(envelope)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _malformed("envelope", f"not JSON: {e}") from e
    if not isinstance(envelope, Mapping):
        raise _malformed("envelope", f"expected a JSON object, got {type(envelope).__name__}")

    payload_type = envelope.get("payloadType")
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise _malformed("payloadType", f"expected {IN_TOTO_PAYLOAD_TYPE!r}, got {payload_type!r}")
    payload_text = envelope.get("payload")
    if not isinstance(payload_text, str) or not payload_text:
        raise _malformed("payload", "missing or not a string")
    try:
        payload = _b64decode(payload_text)
    except ValueError as e:
        raise _malformed("payload", f"not valid base64: {e}") from e
    signatures = envelope.get("signatures")
    if not isinstance(signatures, Sequence) or isinstance(signatures, str) or not signatures:
        raise _malformed("signatures", "missing, empty or not a list")

    parsed_signatures: list[tuple[str, bytes]] = []
    for i, entry in enumerate(signatures):
        where = f"signatures[{i}]"
        if not isinstance(entry, Mapping):
            raise _malformed(where, "not an object")
        keyid, sig_text = entry.get("keyid"), entry.get("sig")
        if not isinstance(keyid, str) or not keyid:
            raise _malformed(f"{where}.keyid", "missing or not a string")
        if not isinstance(sig_text, str) or not sig_text:
            raise _malformed(f"{where}.sig", "missing or not a string")
        try:
            parsed_signatures.append((keyid, _b64decode(sig_text)))
        except ValueError as e:
            raise _malformed(f"{where}.sig", f"not valid base64: {e}") from e

    if not trusted_key_ids:
        raise GateFailed(
            GATE,
            [GateFailure("trusted keys", "no trusted key ids were given, so no signature can be accepted")],
            fix="add the signing key to the trusted keys (`amiforge keys …`)",
        )

    message = pae(payload_type, payload)
    failures: list[GateFailure] = []
    verified = False
    for i, (keyid, sig) in enumerate(parsed_signatures):
        where = f"signatures[{i}]"
        if keyid not in trusted_key_ids:
            failures.append(GateFailure(where, f"key {keyid} is not a trusted key id"))
            continue
        try:
            verifier.verify(message, sig, keyid)
        except GateFailed as e:
            failures += [GateFailure(where, f"{f.name}: {f.detail}") for f in e.failures]
            continue
        verified = True
        break
    if not verified:
        raise GateFailed(
            GATE,
            failures,
            fix="the envelope needs a valid signature by a trusted, non-revoked key over this exact payload",
        )

    try:
        parsed = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _malformed("payload", f"signed, but not JSON: {e}") from e
    if not isinstance(parsed, dict) or parsed.get("_type") != STATEMENT_TYPE:
        raise _malformed("payload", f"signed, but not an in-toto statement ({STATEMENT_TYPE})")
    return parsed

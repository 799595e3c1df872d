"""Signed manifests with real Ed25519 key files: key generation, canonical statements, DSSE envelopes, and every
way an envelope can be wrong (each must fail the signature gate, exit code 4, naming what failed)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from amiforge.errors import ConfigError, GateFailed
from amiforge.model import TrustedKey
from amiforge.signing.interface import (
    IN_TOTO_PAYLOAD_TYPE,
    SLSA_PROVENANCE_V1,
    STATEMENT_TYPE,
    CanonicalJsonError,
    Manifest,
    MultiVerifier,
    Signer,
    Verifier,
    canonical_json,
    canonical_statement,
    manifest_from_statement,
    open_envelope,
    pae,
    sign_envelope,
    statement,
)
from amiforge.signing.keyfile import KeyfileSigner, KeyfileVerifier, generate_keypair, read_public_key

D1, D2, D3, D4, D5 = (c * 64 for c in "12345")
BUILT_AT = datetime(2025, 3, 1, 12, 30, 45, tzinfo=timezone(timedelta(hours=2)))


def make_manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = {
        "name": "web",
        "ref": "web@3",
        "digest": D1,
        "artifacts": (
            ("local", "eu-a", "/data/regions/eu-a/web/1.qcow2", D1),
            ("aws", "eu-west-1", "ami-0123456789abcdef0", D2),
        ),
        "recipe_digest": D3,
        "sbom_digest": D4,
        "findings_summary": {"cve:high": 2, "cve:low": 7, "secret": 0},
        "parent": "web@2",
        "builder": "ci.example.org/jürgen",
        "built_at": BUILT_AT,
    }
    fields.update(changes)
    return Manifest(**fields)


def new_signer() -> KeyfileSigner:
    return KeyfileSigner(Ed25519PrivateKey.generate())


def verifier_for(*signers: KeyfileSigner, revoked: tuple[str, ...] = ()) -> KeyfileVerifier:
    return KeyfileVerifier({s.key_id: s.public_key_pem() for s in signers}, revoked)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# --- key files ----------------------------------------------------------------------------------------------------


def test_generate_keypair_writes_private_0600_and_public(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path / "keys", "release")

    assert info.private_path == tmp_path / "keys" / "release.key"
    assert stat.S_IMODE(info.private_path.stat().st_mode) == 0o600
    assert info.private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert info.public_path.read_text() == info.public_key_pem
    assert info.public_key_pem.startswith("-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    assert info.algorithm == "ed25519"

    signer = KeyfileSigner.from_file(info.private_path)
    assert signer.key_id == info.key_id
    public = serialization.load_pem_public_key(info.public_key_pem.encode())
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert info.key_id == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    assert isinstance(signer, Signer)


def test_generate_keypair_mode_is_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        info = generate_keypair(tmp_path, "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(info.private_path.stat().st_mode) == 0o600


def test_generate_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    first = generate_keypair(tmp_path, "release")
    before = first.private_path.read_bytes()

    with pytest.raises(ConfigError, match="already exists") as caught:
        generate_keypair(tmp_path, "release")
    assert str(first.private_path) in caught.value.message
    assert caught.value.exit_code == 2
    assert first.private_path.read_bytes() == before


def test_generate_keypair_refuses_when_only_the_public_file_exists(tmp_path: Path) -> None:
    (tmp_path / "release.pub").write_text("someone else's key")
    with pytest.raises(ConfigError, match=r"release\.pub already exists"):
        generate_keypair(tmp_path, "release")
    assert not (tmp_path / "release.key").exists()


@pytest.mark.parametrize("name", ["../escape", "", "a/b", ".hidden"])
def test_generate_keypair_rejects_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid key name"):
        generate_keypair(tmp_path, name)


def test_signer_from_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(ConfigError, match="does not exist") as caught:
        KeyfileSigner.from_file(path)
    assert str(path) in caught.value.message


def test_signer_from_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not a file") as caught:
        KeyfileSigner.from_file(tmp_path)  # a directory: unreadable as a file, even for root
    assert str(tmp_path) in caught.value.message


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_key_files_must_be_small_regular_files(tmp_path: Path, kind: str) -> None:
    """A FIFO would block the read forever, /dev/zero would never end: both are refused at once."""
    path = tmp_path / "team.pub"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        with open(path, "wb") as f:
            f.truncate(1 << 30)  # sparse: a gigabyte that costs nothing on disk
    expected = {"fifo": "is a named pipe", "device": "is a character device", "huge": "is larger than 64 KiB"}
    for read in (read_public_key, KeyfileSigner.from_file):
        with pytest.raises(ConfigError, match=expected[kind]):
            read(path)


def test_signer_from_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("not a key")
    with pytest.raises(ConfigError, match=r"bad\.key is not a PEM private key"):
        KeyfileSigner.from_file(path)


def test_signer_from_wrong_key_type(tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match=r"ec\.key holds an EC secp256r1 key, not an Ed25519 key"):
        KeyfileSigner.from_file(path)


def test_signer_from_encrypted_key(tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="encrypted"):
        KeyfileSigner.from_file(path)


def test_verifier_refuses_a_key_registered_under_another_id() -> None:
    a, b = new_signer(), new_signer()
    with pytest.raises(ConfigError, match=f"the PEM is the key {b.key_id}"):
        KeyfileVerifier({a.key_id: b.public_key_pem()})


def test_verifier_refuses_a_non_ed25519_public_key() -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        KeyfileVerifier({"ed25519:0000000000000000": pem})


def test_verifier_from_trusted_keys_treats_revoked_at_as_revoked() -> None:
    good, old = new_signer(), new_signer()
    now = datetime(2025, 1, 1, tzinfo=UTC)
    verifier = KeyfileVerifier.from_trusted_keys(
        [
            TrustedKey(good.key_id, "ed25519", good.public_key_pem(), now),
            TrustedKey(old.key_id, "ed25519", old.public_key_pem(), now, revoked_at=now, revoked_reason="leaked"),
            TrustedKey("kms:arn:aws:kms:x", "ecdsa-p256-sha256", "ignored", now),
        ]
    )
    verifier.verify(b"m", good.sign(b"m"), good.key_id)
    with pytest.raises(GateFailed, match="signature gate failed"):
        verifier.verify(b"m", old.sign(b"m"), old.key_id)


# --- canonical statement ------------------------------------------------------------------------------------------


def test_pae_known_answers() -> None:
    # By hand: "DSSEv1" SP len(type) SP type SP len(body) SP body, lengths in bytes.
    assert pae("t", b"hi") == b"DSSEv1 1 t 2 hi"
    assert pae("t", b"") == b"DSSEv1 1 t 0 "
    # The DSSE spec's own example: len("http://example.com/HelloWorld") = 7 + 11 + 11 = 29.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    # "ü" is two bytes in UTF-8: the length counts bytes, not characters.
    assert pae("ü", b"\x00") == b"DSSEv1 2 \xc3\xbc 1 \x00"


def test_canonical_statement_is_stable_across_orderings() -> None:
    a = make_manifest()
    b = make_manifest(
        artifacts=tuple(reversed(a.artifacts)),
        findings_summary={"secret": 0, "cve:low": 7, "cve:high": 2},
    )
    assert a == b
    assert canonical_statement(a) == canonical_statement(b)

    # A dict built in another key order serialises identically.
    shuffled = json.loads(canonical_statement(a), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert canonical_json(shuffled) == canonical_statement(a)


def test_canonical_statement_bytes_are_compact_sorted_utf8() -> None:
    data = canonical_statement(make_manifest())
    text = data.decode("utf-8")
    assert text.startswith('{"_type":"https://in-toto.io/Statement/v1","predicate":{')
    assert ": " not in text and ", " not in text and "\n" not in text
    assert "jürgen" in text  # ensure_ascii=False: UTF-8, not \u escapes
    assert canonical_json(json.loads(data)) == data


def test_canonical_statement_changes_with_any_field() -> None:
    base = canonical_statement(make_manifest())
    variants = [
        make_manifest(digest=D5),
        make_manifest(recipe_digest=D5),
        make_manifest(sbom_digest=D5),
        make_manifest(parent=None),
        make_manifest(builder="someone-else"),
        make_manifest(built_at=BUILT_AT + timedelta(seconds=1)),
        make_manifest(findings_summary={"cve:high": 3, "cve:low": 7, "secret": 0}),
        make_manifest(artifacts=(("aws", "eu-west-1", "ami-0123456789abcdef0", D2),)),
    ]
    assert len({base, *(canonical_statement(m) for m in variants)}) == len(variants) + 1


def test_statement_shape() -> None:
    s = statement(make_manifest())
    assert s["_type"] == STATEMENT_TYPE
    assert s["predicateType"] == SLSA_PROVENANCE_V1
    assert s["subject"][0] == {"name": "web@3", "digest": {"sha256": D1}}
    # Artifacts follow the image, sorted: aws before local.
    assert [x["name"] for x in s["subject"][1:]] == [
        "aws:eu-west-1:ami-0123456789abcdef0",
        "local:eu-a:/data/regions/eu-a/web/1.qcow2",
    ]
    build, run = s["predicate"]["buildDefinition"], s["predicate"]["runDetails"]
    assert build["externalParameters"]["recipe"] == {"digest": {"sha256": D3}}
    assert {d["name"] for d in build["resolvedDependencies"]} == {"sbom", "parent"}
    assert build["internalParameters"]["amiforge"]["findingsSummary"] == {"cve:high": 2, "cve:low": 7, "secret": 0}
    assert run["builder"] == {"id": "ci.example.org/jürgen"}
    assert run["metadata"] == {"invocationId": "web@3", "finishedOn": "2025-03-01T10:30:45Z"}


def test_manifest_round_trips_through_its_statement() -> None:
    for m in (make_manifest(), make_manifest(parent=None, artifacts=(), findings_summary={})):
        back = manifest_from_statement(json.loads(canonical_statement(m)))
        assert back == m
        assert canonical_statement(back) == canonical_statement(m)


def test_manifest_normalises_sha256_prefix_and_case() -> None:
    m = make_manifest(digest="sha256:" + "A" * 64)
    assert m.digest == "a" * 64


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"ref": "api@3"}, "is not web@N"),
        ({"ref": "web@0"}, "is not web@N"),
        ({"parent": "web"}, "parent"),
        ({"digest": "abc"}, "digest"),
        ({"artifacts": (("aws", "r", "ami-1", "zz"),)}, "artifact ami-1"),
        ({"built_at": datetime(2025, 1, 1)}, "timezone-aware"),
        ({"findings_summary": {"cve": -1}}, "findings_summary"),
        ({"findings_summary": {"cve": True}}, "findings_summary"),
        ({"builder": ""}, "builder"),
    ],
)
def test_manifest_rejects_bad_fields(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_manifest(**changes)


def test_manifest_from_a_foreign_statement_fails_the_gate() -> None:
    with pytest.raises(GateFailed, match="signature gate failed") as caught:
        manifest_from_statement({"_type": STATEMENT_TYPE, "predicateType": "https://example.com/other", "subject": []})
    assert "not an amiforge manifest statement" in caught.value.diagnostics()


# --- RFC 8785 (JCS): the canonical form signatures cover ----------------------------------------------------------


# The serialiser amiforge used before rfc8785, kept only to prove that what it signed still comes out byte for byte.
def _legacy_canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# RFC 8785 §3.2.2: the example of the whole scheme (numbers, string escapes, literals), input and canonical output.
RFC_3_2_2_INPUT = r"""{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}"""
RFC_3_2_2_OUTPUT = '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
RFC_3_2_2_OUTPUT += r'"string":"€$\u000f\nA' + "'" + r'B\"\\\\\"/"}'

# RFC 8785 §3.2.3: property sorting by UTF-16 code units; the values in the order the RFC expects after sorting.
RFC_3_2_3_INPUT = r"""{
  "\u20ac": "Euro Sign",
  "\r": "Carriage Return",
  "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "1": "One",
  "\ud83d\ude00": "Emoji: Grinning Face",
  "\u0080": "Control",
  "\u00f6": "Latin Small Letter O With Diaeresis"
}"""
RFC_3_2_3_ORDER = [
    "Carriage Return",
    "One",
    "Control",
    "Latin Small Letter O With Diaeresis",
    "Euro Sign",
    "Emoji: Grinning Face",
    "Hebrew Letter Dalet With Dagesh",
]

# RFC 8785 Appendix B: IEEE 754 doubles (hex, big-endian) and their canonical JSON numbers; None: no JSON form.
RFC_APPENDIX_B = [
    ("0000000000000000", "0"),  # zero
    ("8000000000000000", "0"),  # minus zero
    ("0000000000000001", "5e-324"),  # min pos number
    ("8000000000000001", "-5e-324"),  # min neg number
    ("7fefffffffffffff", "1.7976931348623157e+308"),  # max pos number
    ("ffefffffffffffff", "-1.7976931348623157e+308"),  # max neg number
    ("4340000000000000", "9007199254740992"),  # max pos int
    ("c340000000000000", "-9007199254740992"),  # max neg int
    ("4430000000000000", "295147905179352830000"),  # ~2**68
    ("7fffffffffffffff", None),  # NaN
    ("7ff0000000000000", None),  # Infinity
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]

# The RFC author's reference test data (github.com/cyberphone/json-canonicalization, testdata/input → output).
JCS_TESTDATA = {
    "arrays": (
        '[\n  56,\n  {\n    "d": true,\n    "10": null,\n    "1": [ ]\n  }\n]',
        '[56,{"1":[],"10":null,"d":true}]',
    ),
    "french": (
        '{\n  "peach": "This sorting order",\n  "péché": "is wrong according to French",\n'
        '  "pêche": "but canonicalization MUST",\n  "sin":   "ingnore locale"\n}\n',
        '{"peach":"This sorting order","péché":"is wrong according to French","pêche":"but canonicalization MUST",'
        '"sin":"ingnore locale"}',
    ),
    "structures": (
        '{\n  "1": {"f": {"f": "hi","F": 5} ,"\\n": 56.0},\n  "10": { },\n  "": "empty",\n  "a": { },\n'
        '  "111": [ { } ],\n  "A": { }\n}',
        '{"":"empty","1":{"\\n":56,"f":{"F":5,"f":"hi"}},"10":{},"111":[{}],"A":{},"a":{}}',
    ),
    "unicode": ('{\n  "Unnormalized Unicode":"\\u1e0d\\u0307"\n}\n', '{"Unnormalized Unicode":"\u1e0d\u0307"}'),
    "values": (
        '{\n  "numbers": [1E30, 4.50, 333333333.33333329, 2e-3, 0.000000000000000000000000001],\n'
        '  "escaping": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",\n'
        '  "literals": [null, true, false]\n}',
        '{"escaping":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/","literals":[null,true,false],'
        '"numbers":[1e+30,4.5,333333333.3333333,0.002,1e-27]}',
    ),
    "weird": (
        '{\n  "\\u20ac": "Euro Sign",\n  "1": "One",\n  "\\u0080": "Control\\u007f",\n  "\\ud83d\\ude02": "Smiley",\n'
        '  "\\u00f6": "Latin Small Letter O With Diaeresis",\n  "\\ufb33": "Hebrew Letter Dalet With Dagesh",\n'
        '  "</script>": "Browser Challenge"\n}\n',
        '{"1":"One","</script>":"Browser Challenge","\u0080":"Control\u007f","ö":"Latin Small Letter O With Diaeresis",'
        '"€":"Euro Sign","\U0001f602":"Smiley","\ufb33":"Hebrew Letter Dalet With Dagesh"}',
    ),
}


def test_rfc8785_section_3_2_2_example() -> None:
    assert canonical_json(json.loads(RFC_3_2_2_INPUT)) == RFC_3_2_2_OUTPUT.encode("utf-8")


def test_rfc8785_section_3_2_3_sorts_by_utf16_code_units() -> None:
    out = canonical_json(json.loads(RFC_3_2_3_INPUT))
    assert [value for _, value in json.loads(out, object_pairs_hook=list)] == RFC_3_2_3_ORDER
    # Code-point order (what the hand-written serialiser did) puts U+FB33 before U+1F600: the one place it differed.
    assert _legacy_canonical_json(json.loads(RFC_3_2_3_INPUT)) != out


@pytest.mark.parametrize(("ieee_hex", "expected"), RFC_APPENDIX_B, ids=[h for h, _ in RFC_APPENDIX_B])
def test_rfc8785_appendix_b_numbers(ieee_hex: str, expected: str | None) -> None:
    (number,) = struct.unpack(">d", bytes.fromhex(ieee_hex))
    if expected is None:
        with pytest.raises(CanonicalJsonError, match=r"\$\[0\]: number (nan|inf) has no JSON form") as e:
            canonical_json([number])
        assert e.value.exit_code == 2 and e.value.problems[0].field == "$[0]"
    else:
        assert canonical_json(number) == expected.encode()
        assert canonical_json({"n": [number]}) == b'{"n":[' + expected.encode() + b"]}"


@pytest.mark.parametrize("name", sorted(JCS_TESTDATA))
def test_rfc8785_reference_testdata(name: str) -> None:
    given_text, expected = JCS_TESTDATA[name]
    assert canonical_json(json.loads(given_text)) == expected.encode("utf-8")


def test_floats_are_where_rfc8785_and_the_old_serialiser_differ() -> None:
    # No manifest holds a float (findings are integer counts), so no signed statement ever had one; recorded here so
    # that adding a float to a manifest is a conscious change of the signed bytes.
    for number, jcs, old in [
        (56.0, b"56", b"56.0"),
        (1e-6, b"0.000001", b"1e-06"),
        (2.0**68, b"295147905179352830000", b"2.9514790517935283e+20"),
    ]:
        assert canonical_json(number) == jcs
        assert _legacy_canonical_json(number) == old


def test_statement_bytes_are_unchanged_from_before_rfc8785() -> None:
    # sha256 of canonical_statement(make_manifest()) and its Ed25519 signature (a fixed test key) as the hand-written
    # serialiser made them, before canonical_json used rfc8785: the bytes, and so every earlier signature, still hold.
    payload = canonical_statement(make_manifest())
    assert hashlib.sha256(payload).hexdigest() == "b925d9c9d84a876061b1ae3a2e01f180f1ed4874777521447b3154082a337fd6"
    assert payload == _legacy_canonical_json(statement(make_manifest()))
    signer = KeyfileSigner(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    signed_before = {
        "payload": b64(payload),
        "payloadType": IN_TOTO_PAYLOAD_TYPE,
        "signatures": [
            {
                "keyid": "ed25519:56475aa75463474c",
                "sig": "TOHiCdXGruJzI5449IfwhQ+opr2Nmd5v2mn1q0IW/j4S47bMTaa81S2Y2sP7Eq5ec0QZzWtlRrRbAQyDUWewDg==",
            }
        ],
    }
    assert sign_envelope(payload, signer) == signed_before
    opened = open_envelope(signed_before, verifier_for(signer), trusted_key_ids={signer.key_id})
    assert canonical_statement(manifest_from_statement(opened)) == payload


_json_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_manifest_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | _json_text,
    lambda inner: (
        st.lists(inner, max_size=4)
        # Names within the Basic Multilingual Plane: there UTF-16 order is code-point order (RFC 8785 §3.2.3).
        | st.dictionaries(
            st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=6), inner, max_size=4
        )
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_manifest_like)
def test_rfc8785_equals_the_old_serialiser_on_what_manifests_hold(value: object) -> None:
    # Strings (any Unicode, control characters included), safe integers, literals, arrays and objects with BMP names:
    # the kinds of value a statement is made of. Same bytes, so no signature made before the switch changes meaning.
    assert canonical_json(value) == _legacy_canonical_json(value)


@pytest.mark.parametrize(
    ("value", "where", "reason"),
    [
        ({"a": [1, {"b": float("nan")}]}, "$.a[1].b", "number nan has no JSON form"),
        ({"n": float("-inf")}, "$.n", "number -inf has no JSON form"),
        ({"count": 2**53}, "$.count", "integer 9007199254740992 is beyond"),
        ([-(2**53)], "$[0]", "integer -9007199254740992 is beyond"),
        ({"path": "/data/\udcff.qcow2"}, "$.path", "is not valid Unicode"),
        ({"bad\udcffname": 1}, "$['bad\\udcffname']", "is not valid Unicode"),
        ({"x": {1: "one"}}, "$.x", "member name 1 is not a string"),
        ({"x": {1, 2}}, "$.x", "a set has no JSON form"),
    ],
)
def test_values_rfc8785_cannot_represent_are_config_errors_naming_the_member(
    value: object, where: str, reason: str
) -> None:
    with pytest.raises(CanonicalJsonError) as e:
        canonical_json(value)
    err = e.value
    assert isinstance(err, ConfigError) and err.exit_code == 2  # bad input, exit 2: never a traceback
    assert err.problems[0].field == where and reason in err.problems[0].message
    assert where in err.message and err.fix
    # rfc8785's own error, or the UnicodeEncodeError it lets out for a name with a lone surrogate.
    assert isinstance(err.__cause__, rfc8785.CanonicalizationError | UnicodeEncodeError)


def test_a_manifest_rfc8785_cannot_represent_is_refused_when_signing() -> None:
    huge = make_manifest(findings_summary={"cve:high": 2**53})
    with pytest.raises(CanonicalJsonError) as e:
        canonical_statement(huge)
    assert (
        e.value.problems[0].field == "$.predicate.buildDefinition.internalParameters.amiforge.findingsSummary.cve:high"
    )
    # A disk path that is not UTF-8 (os.fsdecode gives lone surrogates) names the subject it is in.
    odd = make_manifest(artifacts=(("local", "eu-a", "/data/\udcff.qcow2", D1),))
    with pytest.raises(CanonicalJsonError, match=r"\$\.subject\[1\]"):
        canonical_statement(odd)


def test_a_signed_statement_rfc8785_cannot_represent_fails_the_gate() -> None:
    parsed = json.loads(canonical_statement(make_manifest()))
    parsed["predicate"]["buildDefinition"]["internalParameters"]["amiforge"]["findingsSummary"]["cve:high"] = 2**60
    with pytest.raises(GateFailed) as e:
        manifest_from_statement(parsed)
    (failure,) = e.value.failures
    assert failure.name == "statement" and "no RFC 8785 canonical form" in failure.detail
    assert "findingsSummary.cve:high" in failure.detail


# --- envelopes ----------------------------------------------------------------------------------------------------


def test_sign_and_open_round_trip() -> None:
    signer = new_signer()
    manifest = make_manifest()
    envelope = sign_envelope(canonical_statement(manifest), signer)

    assert envelope["payloadType"] == IN_TOTO_PAYLOAD_TYPE
    assert base64.b64decode(envelope["payload"]) == canonical_statement(manifest)
    assert [s["keyid"] for s in envelope["signatures"]] == [signer.key_id]

    verifier = verifier_for(signer)
    assert isinstance(verifier, Verifier)
    opened = open_envelope(envelope, verifier, trusted_key_ids={signer.key_id})
    assert opened == statement(manifest)
    assert manifest_from_statement(opened) == manifest

    # The form the registry stores (JSON text) opens the same way.
    assert open_envelope(json.dumps(envelope), verifier, trusted_key_ids=[signer.key_id]) == opened


def test_signature_covers_pae_not_the_bare_payload() -> None:
    signer = new_signer()
    payload = canonical_statement(make_manifest())
    envelope = sign_envelope(payload, signer)
    sig = base64.b64decode(envelope["signatures"][0]["sig"])
    verifier_for(signer).verify(pae(IN_TOTO_PAYLOAD_TYPE, payload), sig, signer.key_id)
    with pytest.raises(GateFailed):
        verifier_for(signer).verify(payload, sig, signer.key_id)


def test_url_safe_unpadded_base64_is_accepted() -> None:
    signer = new_signer()
    envelope = sign_envelope(canonical_statement(make_manifest()), signer)
    envelope["payload"] = base64.urlsafe_b64encode(base64.b64decode(envelope["payload"])).decode().rstrip("=")
    assert open_envelope(envelope, verifier_for(signer), trusted_key_ids={signer.key_id})["_type"] == STATEMENT_TYPE


def test_one_good_trusted_signature_is_enough() -> None:
    good, stranger = new_signer(), new_signer()
    payload = canonical_statement(make_manifest())
    envelope = sign_envelope(payload, stranger)
    envelope["signatures"].append(sign_envelope(payload, good)["signatures"][0])
    open_envelope(envelope, verifier_for(good, stranger), trusted_key_ids={good.key_id})


def test_multi_verifier_routes_by_scheme() -> None:
    signer = new_signer()
    envelope = sign_envelope(canonical_statement(make_manifest()), signer)
    multi = MultiVerifier({"ed25519": verifier_for(signer)})
    open_envelope(envelope, multi, trusted_key_ids={signer.key_id})
    with pytest.raises(GateFailed, match="signature gate failed") as caught:
        multi.verify(b"m", b"s", "kms:arn:aws:kms:r:1:key/k")
    assert "no verifier for key scheme 'kms'" in caught.value.diagnostics()


def test_sign_envelope_refuses_a_payload_that_is_not_a_statement() -> None:
    with pytest.raises(ValueError, match="not an in-toto statement"):
        sign_envelope(b'{"hello": 1}', new_signer())
    with pytest.raises(ValueError, match="not JSON"):
        sign_envelope(b"\xff", new_signer())


# Each case: (build the envelope to open, verifier, trusted ids) -> a failure whose diagnostics mention `expect`.
Case = Callable[[KeyfileSigner, KeyfileSigner], tuple[Any, Verifier, set[str]]]


def _signed(signer: KeyfileSigner) -> dict[str, Any]:
    return dict(sign_envelope(canonical_statement(make_manifest()), signer))


def _flip_payload(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    env = _signed(s)
    env["payload"] = b64(flip(base64.b64decode(env["payload"]), 40))
    return env, verifier_for(s), {s.key_id}


def _flip_signature(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    env = _signed(s)
    sig = base64.b64decode(env["signatures"][0]["sig"])
    env["signatures"] = [{"keyid": s.key_id, "sig": b64(flip(sig, 5))}]
    return env, verifier_for(s), {s.key_id}


def _wrong_key(s: KeyfileSigner, other: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    env = _signed(other)  # made by another key, but claiming to be the trusted one
    env["signatures"] = [{"keyid": s.key_id, "sig": env["signatures"][0]["sig"]}]
    return env, verifier_for(s, other), {s.key_id}


def _revoked_key(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    return _signed(s), verifier_for(s, revoked=(s.key_id,)), {s.key_id}


def _untrusted_key(s: KeyfileSigner, other: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    return _signed(other), verifier_for(s, other), {s.key_id}


def _key_unknown_to_verifier(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    return _signed(s), verifier_for(), {s.key_id}


def _no_trusted_keys(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    return _signed(s), verifier_for(s), set()


def _missing_payload(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    env = _signed(s)
    del env["payload"]
    return env, verifier_for(s), {s.key_id}


def _bad_base64_payload(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    env = _signed(s)
    env["payload"] = "!!not base64!!"
    return env, verifier_for(s), {s.key_id}


def _bad_base64_signature(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    env = _signed(s)
    env["signatures"] = [{"keyid": s.key_id, "sig": "@@@"}]
    return env, verifier_for(s), {s.key_id}


def _missing_keyid(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    env = _signed(s)
    env["signatures"] = [{"sig": env["signatures"][0]["sig"]}]
    return env, verifier_for(s), {s.key_id}


def _no_signatures(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    env = _signed(s)
    env["signatures"] = []
    return env, verifier_for(s), {s.key_id}


def _wrong_payload_type(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    env = _signed(s)
    env["payloadType"] = "application/json"
    return env, verifier_for(s), {s.key_id}


def _not_json(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    return "{not json", verifier_for(s), {s.key_id}


def _not_an_object(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    return [1, 2], verifier_for(s), {s.key_id}


def _signed_garbage(s: KeyfileSigner, _: KeyfileSigner) -> tuple[Any, Verifier, set[str]]:
    # A valid signature over something that is not a statement: still refused, after verification.
    payload = b"\x00 not json"
    sig = s.sign(pae(IN_TOTO_PAYLOAD_TYPE, payload))
    env = {
        "payload": b64(payload),
        "payloadType": IN_TOTO_PAYLOAD_TYPE,
        "signatures": [{"keyid": s.key_id, "sig": b64(sig)}],
    }
    return env, verifier_for(s), {s.key_id}


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        (_flip_payload, "signatures[0]: ed25519:"),  # names the signature and its key …
        (_flip_payload, "does not verify"),  # … and why
        (_flip_signature, "does not verify"),
        (_wrong_key, "does not verify"),
        (_revoked_key, "is revoked"),
        (_untrusted_key, "is not a trusted key id"),
        (_key_unknown_to_verifier, "unknown key id"),
        (_no_trusted_keys, "no trusted key ids"),
        (_missing_payload, "payload: missing"),
        (_bad_base64_payload, "payload: not valid base64"),
        (_bad_base64_signature, "signatures[0].sig: not valid base64"),
        (_missing_keyid, "signatures[0].keyid: missing"),
        (_no_signatures, "signatures: missing, empty"),
        (_wrong_payload_type, "payloadType: expected"),
        (_not_json, "envelope: not JSON"),
        (_not_an_object, "envelope: expected a JSON object"),
        (_signed_garbage, "payload: signed, but not JSON"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_tampered_or_malformed_envelopes_fail_the_gate(case: Case, expect: str) -> None:
    envelope, verifier, trusted = case(new_signer(), new_signer())
    with pytest.raises(GateFailed) as caught:
        open_envelope(envelope, verifier, trusted_key_ids=trusted)
    error = caught.value
    assert error.exit_code == 4
    assert error.gate == "signature"
    assert error.failures
    assert expect in error.diagnostics()


def test_revoked_key_fails_even_with_a_valid_signature() -> None:
    signer = new_signer()
    envelope = _signed(signer)
    open_envelope(envelope, verifier_for(signer), trusted_key_ids={signer.key_id})
    with pytest.raises(GateFailed, match="signature gate failed") as caught:
        open_envelope(envelope, verifier_for(signer, revoked=(signer.key_id,)), trusted_key_ids={signer.key_id})
    assert "the key is revoked" in caught.value.diagnostics()


def test_signing_is_deterministic_for_ed25519() -> None:
    # Ed25519 signatures are deterministic, so re-signing an unchanged manifest gives the same envelope.
    signer = new_signer()
    assert _signed(signer) == _signed(signer)
    assert _signed(signer) != dict(sign_envelope(canonical_statement(replace(make_manifest(), builder="x")), signer))

"""scan → sign → verify → promote → revoke, and the pipeline, over a fake provider and a real SQLite registry.

The fake provider's `inspect` shows a small root filesystem built in tmp_path (a dpkg status naming packages the
real OSV records in ../shared/data/osv-debian affect), and its `current_digest` hashes a small file standing for
the disk: flipping one byte of that file is the tamper test. Versions are seeded through the store API up to
`tested`; everything after that runs the real lifecycle functions. Advisory ids and fixed versions are read from
the real records, never invented.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import amiforge.providers
from amiforge.errors import ConfigError, GateFailed, StateError
from amiforge.lifecycle.boottest import boot_test
from amiforge.lifecycle.pipeline import run_pipeline
from amiforge.lifecycle.promote import promote, revoke
from amiforge.lifecycle.release import releasable
from amiforge.lifecycle.rescan import rescan
from amiforge.lifecycle.scan import scan, scan_gate
from amiforge.lifecycle.sign import manifest_of, sign, trust_key, verify
from amiforge.lifecycle.views import channel_flags, findings_summary
from amiforge.lifecycle.vulndb import import_files
from amiforge.model import (
    Artifact,
    BootReport,
    ChannelPointer,
    CheckResult,
    FindingKind,
    ImageVersion,
    LayerRecord,
    Leftover,
    SignatureRecord,
    Status,
)
from amiforge.policy import default_policy
from amiforge.providers.interface import BakeResult, ImageView, Provider, RunContext
from amiforge.recipe import Checks, Recipe, load_recipe
from amiforge.scanners.sbom import sbom_digest
from amiforge.scanners.vulns import dpkg_compare
from amiforge.settings import Settings
from amiforge.signing.interface import canonical_statement, sign_envelope
from amiforge.signing.keyfile import KeyfileSigner, generate_keypair
from amiforge.store.sql import SqlStore, open_store
from tests.conftest import DEBIAN_12_OS_RELEASE, OSV_DIR, needs_osv, synthetic_osv

ACTOR = "TEST-0001@test"
SECRET_PATH = "/opt/app/deploy.pem"


PASSING = BootReport(
    time_to_ready=3.5,
    checks=(CheckResult("ready", "ready", True, "ready after 3.5s"),),
    console="AMIFORGE-READY 3.5\n",
    accel="tcg",
    started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    duration=7.0,
)


# --- the real advisories the image is made vulnerable to --------------------------------------------------


def osv_fixed(advisory_id: str, ecosystem: str) -> tuple[str, str]:
    """(source package, fixed version) of the real record's entry for `ecosystem`."""
    record = json.loads((OSV_DIR / f"{advisory_id}.json").read_text())
    assert record["id"] == advisory_id
    for entry in record["affected"]:
        if entry["package"]["ecosystem"] == ecosystem:
            fixed = [e["fixed"] for r in entry["ranges"] for e in r["events"] if "fixed" in e]
            return entry["package"]["name"], fixed[0]
    raise AssertionError(f"{advisory_id} has no {ecosystem} entry")


def just_below(version: str) -> str:
    below = version + "~"  # '~' sorts before the end of a version: the closest version lower than `version`
    assert dpkg_compare(below, version) < 0
    return below


@dataclass(frozen=True)
class Vulnerable:
    """DSA-5474-1 (Debian:12, fixed) and CVE-2024-10524 (Debian:12, no fix) match; DLA-3008-1 is for Debian 9
    only, so an openssl below its fix must not match on this Debian 12 image."""

    microcode: str
    microcode_fixed: str
    microcode_installed: str
    openssl_installed: str

    @classmethod
    def from_records(cls) -> Vulnerable:
        microcode, fixed = osv_fixed("DSA-5474-1", "Debian:12")
        openssl, openssl_fixed = osv_fixed("DLA-3008-1", "Debian:9")
        assert openssl == "openssl"
        return cls(microcode, fixed, just_below(fixed), just_below(openssl_fixed))

    def dpkg_status(self) -> str:
        return textwrap.dedent(
            f"""\
            Package: base-files
            Status: install ok installed
            Architecture: amd64
            Version: 12.4+deb12u5

            Package: {self.microcode}
            Status: install ok installed
            Architecture: amd64
            Version: {self.microcode_installed}

            Package: openssl
            Status: install ok installed
            Architecture: amd64
            Version: {self.openssl_installed}

            Package: wget
            Status: install ok installed
            Architecture: amd64
            Source: wget (1.21.3-1)
            Version: 1.21.3-1+b2

            Package: removed-tool
            Status: deinstall ok config-files
            Architecture: amd64
            Version: 1.0-1
            """
        )


def private_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def key_body_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, index: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


# --- the world: fake provider, rootfs, disks, registry ----------------------------------------------------


@dataclass
class World:
    tmp: Path
    root: Path
    url: str
    store: SqlStore
    settings: Settings
    vulnerable: Vulnerable
    raw_disk: bool = True  # inspect shows the disk as the raw bytes, as the local provider does
    inspected: list[str] = field(default_factory=list)

    def disk(self, label: str, content: bytes | None = None) -> Path:
        path = self.tmp / "disks" / f"{label}.img"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if content is not None else (f"disk of {label}\n".encode() * 64))
        return path

    def plant(self, image_path: str, text: str) -> None:
        host = self.root / image_path.lstrip("/")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_text(text)

    def seed(
        self, name: str = "web", *, parent: str | None = None, tested: bool = True, disk: Path | None = None
    ) -> ImageVersion:
        """NAME@N through the store API: built with the disk's digest, an artifact, a passing boot report."""
        v = self.store.create_version(
            name=name,
            recipe_digest="a" * 64,
            recipe_path=f"/recipes/{name}/recipe.yaml",
            provider="local",
            tags={},
            parent=parent,
            recipe="{}",
        )
        disk = disk or self.disk(f"{name}-{v.number}")
        digest = sha256_file(disk)
        self.store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=digest, size_bytes=disk.stat().st_size)
        self.store.add_artifact(v.id, Artifact("local", "local", str(disk), digest, disk.stat().st_size))
        if not tested:
            return self.store.get_version(v.ref)
        self.store.add_boot_report(v.id, PASSING)
        return self.store.transition(v.id, Status.TESTED, expect=Status.BUILT)

    def signed(self, name: str = "web", *, parent: str | None = None) -> ImageVersion:
        v = self.seed(name, parent=parent)
        scan(v.ref, store=self.store, settings=self.settings)
        sign(v.ref, store=self.store, settings=self.settings)
        return self.store.get_version(v.ref)

    def with_policy(self, text: str) -> None:
        path = self.tmp / "policy.yaml"
        path.write_text(textwrap.dedent(text))
        self.settings = self.settings.model_copy(update={"policy": path})

    def kinds(self, ref: str | None = None) -> list[str]:
        return [e.kind for e in self.store.events(ref)]


class FakeProvider:
    name: ClassVar[str] = "local"

    def __init__(self, settings: Settings, world: World) -> None:
        self.settings = settings
        self.world = world

    def preflight(self, recipe: Recipe) -> None:
        assert recipe.provider.type == "local"

    def bake(self, recipe: Recipe, ctx: RunContext) -> BakeResult:
        disk = self.world.disk(f"{recipe.name}-{ctx.run_id}")
        ctx.log("disk: done")
        digest = sha256_file(disk)
        artifact = Artifact("local", "local", str(disk), digest, disk.stat().st_size)
        return BakeResult(artifact, (LayerRecord(0, "b" * 64, "base: debian bookworm minbase", False, 0.1, 1),))

    def boot_test(self, artifact: Artifact, checks: Checks, ctx: RunContext, spec: object) -> BootReport:
        assert Path(artifact.location).is_file()
        return PASSING

    @contextmanager
    def inspect(self, artifact: Artifact) -> Iterator[ImageView]:
        self.world.inspected.append(artifact.location)
        yield ImageView(self.world.root, Path(artifact.location) if self.world.raw_disk else None)

    def current_digest(self, artifact: Artifact) -> str:
        return sha256_file(Path(artifact.location))


@pytest.fixture
def world(bare_world: World) -> World:
    """A world whose registry holds vulnerability data (one synthetic advisory that matches nothing)."""
    import_files("osv", synthetic_osv(bare_world.tmp / "osv"), store=bare_world.store, settings=bare_world.settings)
    return bare_world


@pytest.fixture
def bare_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    for key in list(os.environ):
        if key.startswith("AMIFORGE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no amiforge.toml here
    vulnerable = Vulnerable.from_records() if OSV_DIR.is_dir() else Vulnerable("intel-microcode", "2", "1", "1")
    root = tmp_path / "rootfs"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(vulnerable.dpkg_status())
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("localhost\n")
    (root / "etc/os-release").write_text(DEBIAN_12_OS_RELEASE)
    (root / "etc/machine-id").write_text("")  # empty: a fresh id on first boot, not residue
    signer = generate_keypair(tmp_path / "keys", "signer")
    settings = Settings(data_dir=tmp_path / "data", actor=ACTOR, signing_key=signer.private_path)
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with open_store(url) as store:
        # The registry trusts the signer's key up front, as `amiforge keys generate` does.
        trust_key(
            store,
            key_id=signer.key_id,
            algorithm=signer.algorithm,
            public_key_pem=signer.public_key_pem,
            actor=ACTOR,
        )
        w = World(tmp_path, root, url, store, settings, vulnerable)

        def factory(s: Settings) -> Provider:
            return FakeProvider(s, w)

        # The lifecycle verbs find providers through amiforge.providers.provider_for, which reads this.
        monkeypatch.setattr(amiforge.providers, "PROVIDERS", {"local": factory})
        yield w


# --- scan ---------------------------------------------------------------------------------------------------


@needs_osv
def test_scan_reads_packages_and_matches_the_real_osv_advisory(world: World) -> None:
    imported, _ = import_files("osv", OSV_DIR, store=world.store, settings=world.settings)
    assert imported.count == len(list(OSV_DIR.glob("*.json"))) + 1  # merged with the fixture's synthetic record
    v = world.seed()

    outcome = scan(v.ref, store=world.store, settings=world.settings)

    assert outcome.version.status is Status.SCANNED
    assert world.store.get_version(v.ref).status is Status.SCANNED
    record = outcome.scan
    # Installed packages only (config-files is not on disk), sorted by name.
    assert [(p.name, p.version) for p in record.packages] == [
        ("base-files", "12.4+deb12u5"),
        ("intel-microcode", world.vulnerable.microcode_installed),
        ("openssl", world.vulnerable.openssl_installed),
        ("wget", "1.21.3-1+b2"),
    ]
    cves = {f.id: f for f in record.findings if f.kind is FindingKind.CVE}
    # DLA-3008-1 is a Debian 9 advisory: the openssl below its fix is not vulnerable on Debian 12.
    assert set(cves) == {"DSA-5474-1", "CVE-2024-10524"}
    dsa = cves["DSA-5474-1"]
    assert (dsa.package, dsa.installed, dsa.fixed, dsa.source) == (
        world.vulnerable.microcode,
        world.vulnerable.microcode_installed,
        world.vulnerable.microcode_fixed,
        "osv",
    )
    assert dsa.title == "intel-microcode - security update"
    wget = cves["CVE-2024-10524"]
    assert (wget.package, wget.installed, wget.fixed) == ("wget", "1.21.3-1+b2", None)
    assert [f for f in record.findings if f.kind is not FindingKind.CVE] == []

    # The SBOM lists every package by purl, and its digest is what a signature will cover.
    assert record.sbom_digest == sbom_digest(record.sbom)
    bom = json.loads(record.sbom)
    image = bom["metadata"]["component"]
    assert (image["name"], image["version"], image["bom-ref"]) == ("web", "1", "image:web@1")
    purls = {c["purl"] for c in bom["components"]}
    assert any(p.startswith("pkg:deb/debian/intel-microcode@") for p in purls)
    assert len(purls) == 4
    assert record.vulndb == f"osv: {imported.count} record(s) as of {imported.as_of:%Y-%m-%d %H:%M} UTC"
    assert record.vulndb_as_of == {"osv": imported.as_of} and record.release == "12"
    stored = world.store.latest_scan(v.id)
    assert stored is not None and stored.findings == record.findings

    [event] = [e for e in world.store.events(v.ref) if e.kind == "scan.completed"]
    assert event.actor == ACTOR
    assert event.data["packages"] == 4
    assert event.data["findings"] == {"cve": 2, "cve:unknown": 2}
    assert world.inspected == [str(world.tmp / "disks" / "web-1.img")]


def test_scan_without_advisories_records_the_sbom_and_its_gate_fails_closed(bare_world: World) -> None:
    v = bare_world.seed()
    outcome = scan(v.ref, store=bare_world.store, settings=bare_world.settings)
    assert outcome.scan.findings == ()
    assert len(outcome.scan.packages) == 4
    assert outcome.scan.vulndb == "no vulnerability data (amiforge vulndb update, or vulndb import PATH)"
    decision = scan_gate(outcome.scan, policy=default_policy(), now=datetime.now(UTC), ref=v.ref)
    assert not decision.passed
    assert [(u.name, "matched against no advisories" in u.detail) for u in decision.unmet] == [("vulndb", True)]


def test_a_version_is_scanned_before_its_boot_test_and_the_scan_stands_once_it_passes(world: World) -> None:
    v = world.seed(tested=False)
    outcome = scan(v.ref, store=world.store, settings=world.settings)
    assert outcome.version.status is Status.BUILT  # a scan never stands in for the boot test
    assert world.store.latest_scan(v.id) == outcome.scan and world.kinds(v.ref)[-1] == "scan.completed"
    with pytest.raises(StateError, match="only scanned or signed versions can be signed"):
        sign(v.ref, store=world.store, settings=world.settings)
    tested = boot_test(v.ref, store=world.store, settings=world.settings)
    # The scan read the same immutable bytes: the passed test moves the version on to scanned, and says which scan.
    assert tested.version.status is Status.SCANNED
    assert world.store.events(v.ref)[-1].data["scan"] == outcome.scan.id
    sign(v.ref, store=world.store, settings=world.settings)
    assert world.store.get_version(v.ref).status is Status.SIGNED


def test_a_failed_version_with_an_artifact_is_scanned_and_stays_failed(world: World) -> None:
    v = world.seed(tested=False)
    world.store.transition(v.id, Status.FAILED, expect=Status.BUILT)
    assert scan(v.ref, store=world.store, settings=world.settings).version.status is Status.FAILED


def test_scan_of_a_version_still_baking_is_a_state_error(world: World) -> None:
    v = world.store.create_version(
        name="web", recipe_digest="a" * 64, recipe_path="/r.yaml", provider="local", tags={}, parent=None
    )
    with pytest.raises(StateError) as e:
        scan(v.ref, store=world.store, settings=world.settings)
    assert e.value.exit_code == 3
    assert e.value.message == ("web@1 is baking; only built, tested, scanned, signed or failed versions can be scanned")
    assert world.store.latest_scan(v.id) is None and "scan.completed" not in world.kinds()
    assert world.inspected == []  # refused before the artifact was opened


def test_planted_private_key_is_a_redacted_secret_in_the_tree_and_on_the_raw_disk(world: World) -> None:
    pem = private_key_pem()
    world.plant(SECRET_PATH, pem)
    disk = world.disk("web-keyed", b"\0" * 4096 + pem.encode() + b"\0" * 512)
    v = world.seed(disk=disk)

    outcome = scan(v.ref, store=world.store, settings=world.settings)

    secrets = [f for f in outcome.scan.findings if f.kind is FindingKind.SECRET]
    assert [(f.id, f.line, f.source) for f in secrets] == [
        ("private-key", 1, "secrets"),
        ("private-key", None, "raw-disk"),
    ]
    in_tree, on_disk = secrets
    assert in_tree.path == SECRET_PATH
    # An offset into the artifact's disk, named without the host path the provider happened to read it from.
    assert on_disk.path is not None and on_disk.path.endswith("@4096") and "/" not in on_disk.path
    assert {f.redacted for f in secrets} == {"-----BEGIN PRIVATE KEY----- …"}
    stored = repr(world.store.latest_scan(v.id))
    for line in key_body_lines(pem):
        assert line not in stored
    assert str(disk) not in stored

    decision = scan_gate(outcome.scan, policy=default_policy(), now=datetime.now(UTC))
    assert decision.channel == "dev"
    assert not decision.passed
    assert [u.name for u in decision.unmet] == [
        f"secret private-key at {SECRET_PATH}",
        f"secret private-key at {on_disk.path}",
    ]


# --- sign / verify ------------------------------------------------------------------------------------------


def test_sign_then_verify(world: World) -> None:
    v = world.seed()
    scanned = scan(v.ref, store=world.store, settings=world.settings)
    signer = KeyfileSigner.from_file(world.settings.signing_key_path)

    record = sign(v.ref, store=world.store, settings=world.settings)

    assert record.key_id == signer.key_id
    assert world.store.get_version(v.ref).status is Status.SIGNED
    [trusted] = world.store.signing_keys()
    assert (trusted.key_id, trusted.revoked_at) == (signer.key_id, None)
    version = world.store.get_version(v.ref)
    statement = canonical_statement(manifest_of(version, world.store.artifacts(v.id), scanned.scan))
    assert record.statement_digest == hashlib.sha256(statement).hexdigest()
    [event] = [e for e in world.store.events(v.ref) if e.kind == "sign"]
    assert event.data == {"key": signer.key_id, "statement": record.statement_digest}

    outcome = verify(v.ref, store=world.store, settings=world.settings)
    assert outcome.signature.key_id == signer.key_id
    assert outcome.manifest.digest == v.digest
    assert outcome.manifest.sbom_digest == scanned.scan.sbom_digest
    assert [a.location for a in outcome.manifest.artifacts] == [str(world.tmp / "disks" / "web-1.img")]


def test_flipping_one_byte_of_the_disk_fails_verify_and_promote(world: World) -> None:
    v = world.signed()
    [artifact] = world.store.artifacts(v.id)
    verify(v.ref, store=world.store, settings=world.settings)

    flip_byte(Path(artifact.location))

    with pytest.raises(GateFailed) as e:
        verify(v.ref, store=world.store, settings=world.settings)
    assert e.value.exit_code == 4
    [failure] = e.value.failures
    assert failure.name == f"artifact {artifact.location}"
    assert f"recorded {artifact.digest[:16]}" in failure.detail

    with pytest.raises(GateFailed) as refused:
        promote(v.ref, "dev", store=world.store, settings=world.settings)
    assert [f.name for f in refused.value.failures] == ["signature"]
    assert f"artifact {artifact.location}" in refused.value.failures[0].detail
    assert world.store.channels("web") == []
    [event] = [e for e in world.store.events(v.ref) if e.kind == "promote.refused"]
    assert event.data["channel"] == "dev"

    # Signing again does not launder changed bytes: sign checks them too.
    with pytest.raises(GateFailed) as resign:
        sign(v.ref, store=world.store, settings=world.settings)
    assert [f.name for f in resign.value.failures] == [f"artifact {artifact.location}"]


def test_a_revoked_key_no_longer_verifies(world: World) -> None:
    v = world.signed()
    key_id = world.store.signatures(v.id)[-1].key_id
    world.store.revoke_key(key_id, "laptop stolen", actor="TEST")

    with pytest.raises(GateFailed) as e:
        verify(v.ref, store=world.store, settings=world.settings)
    assert e.value.exit_code == 4
    assert [f.name for f in e.value.failures] == ["trusted keys"]  # the only key is revoked: none is trusted

    # With another trusted key in the registry the envelope's own key is named as not trusted.
    other_info = generate_keypair(world.tmp / "keys", "other")
    other = KeyfileSigner.from_file(other_info.private_path)
    sign_other = world.settings.model_copy(update={"signing_key": world.tmp / "keys" / "other.key"})
    w2 = world.seed()
    scan(w2.ref, store=world.store, settings=world.settings)
    with pytest.raises(ConfigError, match="not trusted"):  # signing never widens the trust root by itself
        sign(w2.ref, store=world.store, settings=sign_other)
    trust_key(world.store, key_id=other.key_id, algorithm=other.algorithm, public_key_pem=other_info.public_key_pem,
              actor=ACTOR)  # fmt: skip
    sign(w2.ref, store=world.store, settings=sign_other)
    with pytest.raises(GateFailed) as again:
        verify(v.ref, store=world.store, settings=world.settings)
    assert [(f.name, f.detail) for f in again.value.failures] == [
        ("signatures[0]", f"key {key_id} is not a trusted key id")
    ]
    assert other.key_id != key_id


def test_signing_with_a_revoked_key_is_refused(world: World) -> None:
    v = world.signed()
    key_id = world.store.signatures(v.id)[-1].key_id
    world.store.revoke_key(key_id, "laptop stolen", actor="TEST")
    v2 = world.seed()
    scan(v2.ref, store=world.store, settings=world.settings)

    # A signature by a revoked key could never verify: signing must not mark the version signed with one.
    with pytest.raises(ConfigError) as e:
        sign(v2.ref, store=world.store, settings=world.settings)

    assert e.value.message.startswith(f"signing key {key_id} is revoked (laptop stolen)")
    assert "amiforge keys generate" in (e.value.fix or "")
    assert world.store.get_version(v2.ref).status is Status.SCANNED
    assert world.store.signatures(v2.id) == []
    assert [e.ref for e in world.store.events() if e.kind == "sign"] == [v.ref]


def _forge(world: World, v: ImageVersion, signer: KeyfileSigner, *, key_id: str | None = None) -> None:
    """Record a signature over the version's true manifest, made by `signer` (its envelope optionally naming
    another key id)."""
    scan_record = world.store.latest_scan(v.id)
    assert scan_record is not None
    version = world.store.get_version(v.ref)
    statement = canonical_statement(manifest_of(version, world.store.artifacts(v.id), scan_record))
    envelope = sign_envelope(statement, signer)
    if key_id is not None:
        envelope["signatures"] = [{"keyid": key_id, "sig": envelope["signatures"][0]["sig"]}]
    world.store.add_signature(
        v.id,
        SignatureRecord(
            key_id or signer.key_id,
            json.dumps(envelope),
            hashlib.sha256(statement).hexdigest(),
            datetime.now(UTC),
        ),
    )


def test_an_envelope_signed_by_a_key_not_in_the_registry_fails(world: World) -> None:
    v = world.signed()
    stranger = KeyfileSigner.from_file(generate_keypair(world.tmp / "elsewhere", "stranger").private_path)
    _forge(world, v, stranger)

    with pytest.raises(GateFailed) as e:
        verify(v.ref, store=world.store, settings=world.settings)
    assert [(f.name, f.detail) for f in e.value.failures] == [
        ("signatures[0]", f"key {stranger.key_id} is not a trusted key id")
    ]


def test_an_envelope_made_by_the_wrong_key_under_a_trusted_key_id_fails(world: World) -> None:
    v = world.signed()
    trusted = world.store.signatures(v.id)[-1].key_id
    stranger = KeyfileSigner.from_file(generate_keypair(world.tmp / "elsewhere", "stranger").private_path)
    _forge(world, v, stranger, key_id=trusted)

    with pytest.raises(GateFailed) as e:
        verify(v.ref, store=world.store, settings=world.settings)
    [failure] = e.value.failures
    assert failure.name == "signatures[0]"
    assert failure.detail == f"{trusted}: the signature does not verify over this payload"


def test_a_rescan_after_signing_fails_verify_until_signed_again(world: World) -> None:
    v = world.signed()
    first = world.store.latest_scan(v.id)
    assert first is not None
    # The image now shows another package set (as a rescan with newer advisories or another reader would).
    status = world.root / "var/lib/dpkg/status"
    status.write_text(status.read_text().replace("Version: 12.4+deb12u5", "Version: 12.4+deb12u6"))

    rescanned = scan(v.ref, store=world.store, settings=world.settings)

    assert rescanned.version.status is Status.SIGNED  # a rescan does not demote
    assert rescanned.scan.sbom_digest != first.sbom_digest
    with pytest.raises(GateFailed) as e:
        verify(v.ref, store=world.store, settings=world.settings)
    assert [f.name for f in e.value.failures] == ["sbom_digest"]
    assert e.value.fix == f"amiforge sign {v.ref} again after a rescan"

    sign(v.ref, store=world.store, settings=world.settings)
    assert verify(v.ref, store=world.store, settings=world.settings).manifest.sbom_digest == rescanned.scan.sbom_digest


def test_findings_that_change_over_the_same_packages_leave_the_signature_whole(world: World) -> None:
    v = world.signed()
    # Tomorrow's data: a (synthetic) advisory for base-files, which the image holds; the image itself is unchanged.
    record = {"id": "TEST-2026-0002", "modified": "2026-12-01T00:00:00Z", "summary": "synthetic",
              "affected": [{"package": {"ecosystem": "Debian:12", "name": "base-files"},
                            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}]}]}]}  # fmt: skip
    (world.tmp / "new-osv").mkdir()
    (world.tmp / "new-osv" / "TEST-2026-0002.json").write_text(json.dumps(record))
    import_files("osv", world.tmp / "new-osv", store=world.store, settings=world.settings)
    (again,) = rescan([v.ref], store=world.store, settings=world.settings)
    assert [f.id for f in again.new] == ["TEST-2026-0002"]

    outcome = verify(v.ref, store=world.store, settings=world.settings)  # the bytes are what was signed
    assert outcome.findings_now == findings_summary(again.scan.findings) != outcome.manifest.findings_summary


def test_sign_refuses_a_version_that_was_not_scanned(world: World) -> None:
    v = world.seed()
    with pytest.raises(StateError) as e:  # the wrong state for the command: exit 3, as everywhere
        sign(v.ref, store=world.store, settings=world.settings)
    assert e.value.exit_code == 3 and e.value.fix == f"scan it first: amiforge scan {v.ref}"
    assert world.store.signatures(v.id) == []


# --- promote ------------------------------------------------------------------------------------------------


def test_old_vulnerability_data_blocks_promote_but_never_a_rollout_or_a_rollback(bare_world: World) -> None:
    folder = synthetic_osv(bare_world.tmp / "old-osv")
    month_ago = time.time() - 30 * 86400
    for file in folder.iterdir():
        os.utime(file, (month_ago, month_ago))  # a file's age is its modification time
    state, _ = import_files("osv", folder, store=bare_world.store, settings=bare_world.settings)
    assert (datetime.now(UTC) - state.as_of).days == 30
    v = bare_world.signed()

    with pytest.raises(GateFailed) as refused:
        promote(v.ref, "dev", store=bare_world.store, settings=bare_world.settings)
    assert [f.name for f in refused.value.failures] == ["vulndb"]
    assert "the osv data the scan of web@1 used is 30d" in refused.value.failures[0].detail
    # A channel already took what a rollout (or a rollback, in an incident) deploys: the findings still gate, the
    # age of the data does not.
    releasable(bare_world.store.get_version(v.ref), store=bare_world.store, settings=bare_world.settings,
               action="rolled out")  # fmt: skip


def test_promote_a_clean_signed_version_to_dev(world: World) -> None:
    v = world.signed()

    outcome = promote(v.ref, "dev", store=world.store, settings=world.settings, reason="first")

    assert outcome.moved and outcome.decision.passed
    p = outcome.pointer
    assert (p.name, p.channel, p.current, p.previous, p.moved_by, p.reason) == ("web", "dev", "web@1", None, ACTOR,
                                                                                  "first")  # fmt: skip
    [event] = [e for e in world.store.events(v.ref) if e.kind == "promote"]
    assert event.data == {"channel": "dev", "previous": None, "reason": "first"}
    # Again: nothing moves.
    assert not promote(v.ref, "dev", store=world.store, settings=world.settings).moved

    # The next version takes dev; the old one becomes the rollback image.
    v2 = world.signed(parent=v.ref)
    moved = promote(v2.ref, "dev", store=world.store, settings=world.settings)
    assert (moved.pointer.current, moved.pointer.previous) == ("web@2", "web@1")
    assert world.store.verify_events() == []


def test_promote_of_an_unsigned_version_is_refused(world: World) -> None:
    v = world.seed()
    scan(v.ref, store=world.store, settings=world.settings)
    with pytest.raises(GateFailed) as e:
        promote(v.ref, "dev", store=world.store, settings=world.settings)
    [failure] = e.value.failures
    assert failure.name == "signature"
    assert "web@1 carries no signature" in failure.detail


def test_staging_refuses_a_version_that_never_was_in_dev(world: World) -> None:
    v = world.signed()
    with pytest.raises(GateFailed) as e:
        promote(v.ref, "staging", store=world.store, settings=world.settings)
    assert [f.name for f in e.value.failures] == ["after"]
    assert "web@1 has never been in dev" in e.value.failures[0].detail


def test_staging_is_refused_until_the_soak_in_dev_is_over(world: World) -> None:
    v = world.signed()
    entered = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    with open_store(world.url, clock=lambda: entered) as past:
        promote(v.ref, "dev", store=past, settings=world.settings)
    assert world.store.channel_entries(v.id) == {"dev": entered}

    with pytest.raises(GateFailed) as e:
        promote(v.ref, "staging", store=world.store, settings=world.settings)

    [failure] = e.value.failures
    assert failure.name == "soak"
    ready = (entered + timedelta(hours=1)).isoformat(timespec="seconds")
    assert failure.detail.startswith("web@1 has been in dev for 30m")
    assert re.search(r" of the 1h staging requires: (30m|29m5\ds) left ", failure.detail), failure.detail
    assert failure.detail.endswith(f" left (promote after {ready})")
    assert [p.channel for p in world.store.channels("web")] == ["dev"]


def test_staging_takes_a_version_that_soaked_two_hours_in_dev(world: World) -> None:
    v = world.signed()
    with open_store(world.url, clock=lambda: datetime.now(UTC) - timedelta(hours=2)) as past:
        promote(v.ref, "dev", store=past, settings=world.settings)

    outcome = promote(v.ref, "staging", store=world.store, settings=world.settings)

    assert outcome.moved and outcome.pointer.current == "web@1"
    assert [(p.channel, p.current) for p in world.store.channels("web")] == [("dev", "web@1"), ("staging", "web@1")]
    # prod wants a day in staging.
    with pytest.raises(GateFailed) as e:
        promote(v.ref, "prod", store=world.store, settings=world.settings)
    assert [f.name for f in e.value.failures] == ["soak"]


WAIVER_POLICY = """\
    channels:
      dev: {{}}
      staging: {{after: dev, min_soak: 1h}}
    waivers:
      - finding: private-key
        path: {path}
        reason: throw-away key of a test fixture
        by: TEST-0001
        expires: {expires}
    """


def test_an_expired_waiver_does_not_excuse_the_secret(world: World) -> None:
    world.plant(SECRET_PATH, private_key_pem())
    world.with_policy(WAIVER_POLICY.format(path=SECRET_PATH, expires="2020-01-31"))
    v = world.signed()

    with pytest.raises(GateFailed) as e:
        promote(v.ref, "dev", store=world.store, settings=world.settings)

    [failure] = e.value.failures
    assert failure.name == f"secret private-key at {SECRET_PATH}"
    assert f"the waiver for private-key ({SECRET_PATH}) by TEST-0001, expires 2020-01-31 has EXPIRED" in failure.detail
    assert "waiver.used" not in world.kinds()
    assert world.store.channels() == []


def test_a_valid_waiver_lets_the_secret_through_and_is_recorded(world: World) -> None:
    world.plant(SECRET_PATH, private_key_pem())
    expires = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
    world.with_policy(WAIVER_POLICY.format(path=SECRET_PATH, expires=expires))
    v = world.signed()

    outcome = promote(v.ref, "dev", store=world.store, settings=world.settings)

    assert outcome.moved and outcome.pointer.current == "web@1"
    [waiver] = outcome.decision.waivers_used
    assert waiver.finding == "private-key"
    [event] = [e for e in world.store.events(v.ref) if e.kind == "waiver.used"]
    assert event.data == {
        "channel": "dev",
        "waiver": f"waiver for private-key ({SECRET_PATH}) by TEST-0001, expires {expires}",
    }
    assert event.actor == ACTOR


def test_without_a_waiver_the_secret_blocks_dev(world: World) -> None:
    world.plant(SECRET_PATH, private_key_pem())
    v = world.signed()
    with pytest.raises(GateFailed) as e:
        promote(v.ref, "dev", store=world.store, settings=world.settings)
    assert [f.name for f in e.value.failures] == [f"secret private-key at {SECRET_PATH}"]


def test_a_version_with_a_revoked_parent_is_refused(world: World) -> None:
    parent = world.signed()
    child = world.signed(parent=parent.ref)
    revoke(parent.ref, store=world.store, settings=world.settings, reason="bad base")

    with pytest.raises(GateFailed) as e:
        promote(child.ref, "dev", store=world.store, settings=world.settings)
    assert [f.name for f in e.value.failures] == ["revoked-ancestor"]
    assert "web@2 descends from revoked web@1" in e.value.failures[0].detail


def test_a_revoked_version_is_never_promoted(world: World) -> None:
    v = world.signed()
    revoke(v.ref, store=world.store, settings=world.settings, reason="CVE in the wild")
    with pytest.raises(GateFailed) as e:
        promote(v.ref, "dev", store=world.store, settings=world.settings)
    names = [f.name for f in e.value.failures]
    assert names[0] == "revoked"
    assert "signature" in names  # verify refuses a revoked version as well
    with pytest.raises(GateFailed) as verified:
        verify(v.ref, store=world.store, settings=world.settings)
    assert [f.name for f in verified.value.failures] == ["revoked"]


def test_revoke_flags_the_channels_holding_the_version_or_a_descendant(world: World) -> None:
    world.with_policy("channels:\n  dev: {}\n  qa: {}\n")
    v1 = world.signed()
    v2 = world.signed(parent=v1.ref)
    v3 = world.seed(parent=v2.ref)  # a grandchild, tested only
    unrelated = world.signed()  # web@4, no parent
    promote(v1.ref, "dev", store=world.store, settings=world.settings)
    promote(v2.ref, "qa", store=world.store, settings=world.settings)
    other = world.signed("api")
    promote(other.ref, "dev", store=world.store, settings=world.settings)

    with pytest.raises(ConfigError):
        revoke(v1.ref, store=world.store, settings=world.settings, reason="  ")
    outcome = revoke(v1.ref, store=world.store, settings=world.settings, reason="leaked key")

    assert outcome.version.status is Status.REVOKED
    assert [(p.channel, p.current) for p in outcome.flagged_channels] == [("dev", "web@1"), ("qa", "web@2")]
    assert sorted(outcome.flagged_versions) == [v2.ref, v3.ref]
    assert unrelated.ref not in outcome.flagged_versions
    flagged = [(e.ref, e.data) for e in world.store.events() if e.kind == "channel.flagged"]
    assert flagged == [
        ("web@1", {"channel": "web:dev", "because": "web@1 revoked: leaked key"}),
        ("web@2", {"channel": "web:qa", "because": "web@1 revoked: leaked key"}),
    ]
    children = sorted((e.ref or "", e.data["because"]) for e in world.store.events() if e.kind == "version.flagged")
    assert children == [("web@2", "ancestor web@1 revoked"), ("web@3", "ancestor web@1 revoked")]
    flags = {(p.name, p.channel): channel_flags(p, world.store) for p in world.store.channels()}
    assert flags == {
        ("api", "dev"): [],
        ("web", "dev"): ["current web@1 is revoked"],
        ("web", "qa"): ["current web@2: ancestor web@1 is revoked"],
    }
    # Revoking twice is a state error, not a second set of events.
    with pytest.raises(StateError):
        revoke(v1.ref, store=world.store, settings=world.settings, reason="again")
    assert world.kinds().count("revoke") == 1


def test_a_channel_moved_underneath_a_promote_is_a_state_error(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = world.signed()
    v2 = world.signed(parent=v1.ref)
    racer = world.seed(parent=v2.ref)
    promote(v1.ref, "dev", store=world.store, settings=world.settings)
    real_move = world.store.move_channel

    def move_after_someone_else(
        name: str, channel: str, version_id: int, *, expect_current: int | None, actor: str, reason: str
    ) -> ChannelPointer:
        # Between promote's read of the pointer and its compare-and-set, another writer moves dev.
        real_move("web", "dev", racer.id, expect_current=v1.id, actor="other@host", reason="race")
        return real_move(name, channel, version_id, expect_current=expect_current, actor=actor, reason=reason)

    monkeypatch.setattr(world.store, "move_channel", move_after_someone_else)

    with pytest.raises(StateError) as e:
        promote(v2.ref, "dev", store=world.store, settings=world.settings)

    assert "web:dev moved meanwhile" in e.value.message
    [pointer] = world.store.channels("web", "dev")
    assert (pointer.current, pointer.previous, pointer.moved_by) == ("web@3", "web@1", "other@host")
    assert [e.data["channel"] for e in world.store.events(v2.ref) if e.kind == "promote"] == []


# --- pipeline -----------------------------------------------------------------------------------------------

RECIPE = """\
name: web
steps:
  - packages: [nginx]
checks:
  ready_within: 30s
"""


def test_pipeline_bakes_tests_scans_signs_with_a_new_default_key_and_promotes(world: World) -> None:
    settings = Settings(data_dir=world.tmp / "data", actor=ACTOR)  # no key configured: the default is made
    key_path = settings.signing_key_path
    assert key_path == world.tmp / "data" / "keys" / "amiforge.key" and not key_path.exists()
    recipe_path = world.tmp / "recipe" / "recipe.yaml"
    recipe_path.parent.mkdir()
    recipe_path.write_text(RECIPE)
    # This registry already trusts a key: no new one is made (it would widen the trust root), the pipeline stops.
    with pytest.raises(ConfigError, match="no signing key"):
        run_pipeline(load_recipe(recipe_path), store=world.store, settings=settings, promote_to="dev")
    assert not key_path.exists()
    world.store = open_store(f"sqlite:///{world.tmp / 'fresh.db'}")  # a registry that trusts no key yet
    import_files("osv", synthetic_osv(world.tmp / "osv"), store=world.store, settings=settings)

    outcome = run_pipeline(load_recipe(recipe_path), store=world.store, settings=settings, promote_to="dev")

    assert outcome.baked.version.ref == "web@1"
    assert outcome.baked.version.status is Status.TESTED
    assert outcome.baked.report is not None and outcome.baked.report.passed
    assert outcome.scanned.version.status is Status.SCANNED
    assert len(outcome.scanned.scan.packages) == 4
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert outcome.signature.key_id == KeyfileSigner.from_file(key_path).key_id
    trusted = world.store.signing_keys()
    assert [k.key_id for k in trusted] == [outcome.signature.key_id]
    assert outcome.promoted is not None
    assert (outcome.promoted.pointer.channel, outcome.promoted.pointer.current) == ("dev", "web@1")
    assert world.store.get_version("web@1").status is Status.SIGNED
    assert world.kinds("web@1") == ["bake.started", "bake.built", "test.passed", "scan.completed", "sign", "promote"]
    assert [e.kind for e in world.store.events() if e.kind == "key.added"] == ["key.added"]
    assert [e.kind for e in world.store.events() if e.ref is None][:1] == ["vulndb.import"]
    assert verify("web@1", store=world.store, settings=settings).manifest.digest == outcome.baked.version.digest

    # A second run reuses the key it made, and the new version becomes dev with web@1 as rollback.
    again = run_pipeline(load_recipe(recipe_path), store=world.store, settings=settings, promote_to="dev")
    assert again.signature.key_id == outcome.signature.key_id
    assert again.promoted is not None
    assert (again.promoted.pointer.current, again.promoted.pointer.previous) == ("web@2", "web@1")
    assert world.store.get_version("web@2").parent == "web@1"


def test_pipeline_without_promote_stops_at_signed(world: World) -> None:
    recipe_path = world.tmp / "recipe.yaml"
    recipe_path.write_text(RECIPE)
    outcome = run_pipeline(load_recipe(recipe_path), store=world.store, settings=world.settings)
    assert outcome.promoted is None
    assert world.store.get_version(outcome.scanned.version.ref).status is Status.SIGNED
    assert world.store.channels() == []


def test_pipeline_stops_at_a_failing_scan_gate_and_does_not_sign(world: World) -> None:
    world.plant("/opt/app/deploy.env", "DB_PASSWORD=TEST-synthetic-password\n")  # a secret: dev refuses it
    recipe_path = world.tmp / "recipe.yaml"
    recipe_path.write_text(RECIPE)
    with pytest.raises(GateFailed) as stopped:
        run_pipeline(load_recipe(recipe_path), store=world.store, settings=world.settings, promote_to="dev")
    assert any("deploy.env" in f.detail or "deploy.env" in f.name for f in stopped.value.failures)
    version = world.store.get_version("web@1")
    assert version.status is Status.SCANNED
    assert world.store.signatures(version.id) == []
    assert world.store.channels() == []


def test_what_a_scan_could_not_clean_up_is_recorded_and_returned(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    v = world.seed()
    viewed = FakeProvider.inspect

    @contextmanager
    def leaky(self: FakeProvider, artifact: Artifact) -> Iterator[ImageView]:
        with viewed(self, artifact) as view:
            yield view
        # As the local provider's inspect does when its scratch copy of the disk will not go.
        view.leftovers.append(
            Leftover("temporary directory", "/scratch/TEST-0001", "rm -rf /scratch/TEST-0001", "busy")
        )

    monkeypatch.setattr(FakeProvider, "inspect", leaky)
    outcome = scan(v.ref, store=world.store, settings=world.settings)
    assert [x.where for x in outcome.orphaned] == ["/scratch/TEST-0001"]
    (orphaned,) = [e for e in world.store.events(v.ref) if e.kind == "orphaned"]
    assert orphaned.data["where"] == "/scratch/TEST-0001"
    assert orphaned.data["run"] == world.store.events(v.ref)[-2].data["run"]  # the scan's own run


def test_a_revoked_version_is_not_scanned_again(world: World) -> None:
    """A new scan record would change what its signature covers; a version out of use is left as it is."""
    v = world.signed()
    revoke(v.ref, store=world.store, settings=world.settings, reason="TEST")
    with pytest.raises(StateError, match="only built, tested, scanned, signed or failed versions can be scanned"):
        scan(v.ref, store=world.store, settings=world.settings)

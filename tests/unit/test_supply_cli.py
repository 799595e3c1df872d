"""The supply-chain commands in-process: scan, sbom, vulndb, keys, sign, verify, promote, revoke, channels.

`amiforge.cli.app.main(argv)` runs against a private data dir (a real SQLite registry) with the rich consoles
swapped for in-memory ones, and a fake provider whose `inspect` shows a small root filesystem built in tmp_path
and whose `current_digest` hashes a small file standing for the disk. Versions are seeded through the store up
to `tested`; the commands do the rest. Advisories are the real OSV records in ../shared/data/osv-debian.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import amiforge.providers
from amiforge.model import Artifact, BootReport, CheckResult, ImageVersion, LayerRecord, Status
from amiforge.providers.interface import BakeResult, ImageView, Provider, RunContext
from amiforge.recipe import Checks, Recipe
from amiforge.recipe import Provider as ProviderSpec
from amiforge.settings import Settings, load_settings
from amiforge.store.sql import SqlStore, open_store
from tests.cli_harness import Cli, make_cli
from tests.conftest import DEBIAN_12_OS_RELEASE, OSV_DIR, needs_osv, synthetic_osv

SECRET_PATH = "/srv/app/id_deploy.pem"
FINDING_KINDS = {"cve", "secret", "residue", "policy"}


PASSING = BootReport(
    time_to_ready=3.5,
    checks=(CheckResult("ready", "ready", True, "ready after 3.5s"),),
    console="AMIFORGE-READY 3.5\n",
    accel="tcg",
    started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    duration=7.0,
)


def microcode_fix() -> tuple[str, str, str]:
    """(package, fixed, installed just below fixed) from the real DSA-5474-1 record's Debian 12 entry."""
    if not OSV_DIR.is_dir():
        return "intel-microcode", "2", "1"
    record = json.loads((OSV_DIR / "DSA-5474-1.json").read_text())
    [entry] = [a for a in record["affected"] if a["package"]["ecosystem"] == "Debian:12"]
    [fixed] = [e["fixed"] for r in entry["ranges"] for e in r["events"] if "fixed" in e]
    return entry["package"]["name"], fixed, fixed + "~"  # '~' sorts before the end: just below the fix


def dpkg_status(microcode: str, installed: str) -> str:
    return textwrap.dedent(
        f"""\
        Package: base-files
        Status: install ok installed
        Architecture: amd64
        Version: 12.4+deb12u5

        Package: {microcode}
        Status: install ok installed
        Architecture: amd64
        Version: {installed}

        Package: libc6
        Status: install ok installed
        Architecture: amd64
        Source: glibc
        Version: 2.36-9+deb12u7
        """
    )


def private_key_pem() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode("ascii")
    )


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Image:
    """The one image the fake provider shows, whatever the artifact."""

    root: Path
    disks: Path


class FakeProvider:
    name: ClassVar[str] = "local"

    def __init__(self, settings: Settings, image: Image) -> None:
        self.settings = settings
        self.image = image

    # The commands under test start from seeded versions and never bake; bake and boot test make the fake a whole
    # Provider all the same (provider_for returns one): a disk file under `disks`, one base layer, a passing boot.
    def preflight(self, recipe: Recipe) -> None:
        assert recipe.provider.type == "local"

    def bake(self, recipe: Recipe, ctx: RunContext) -> BakeResult:
        disk = self.image.disks / f"{recipe.name}-{ctx.run_id}.img"
        disk.write_bytes(f"disk of {recipe.name}\n".encode() * 64)
        digest = sha256_file(disk)
        artifact = Artifact("local", "local", str(disk), digest, disk.stat().st_size)
        return BakeResult(artifact, (LayerRecord(0, "b" * 64, "base: debian bookworm minbase", False, 0.1, 1),))

    def boot_test(self, artifact: Artifact, checks: Checks, ctx: RunContext, spec: ProviderSpec) -> BootReport:
        assert Path(artifact.location).is_file()
        return PASSING

    @contextmanager
    def inspect(self, artifact: Artifact) -> Iterator[ImageView]:
        yield ImageView(self.image.root, Path(artifact.location))

    def current_digest(self, artifact: Artifact) -> str:
        return sha256_file(Path(artifact.location))


def fake_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dpkg: str) -> Image:
    """A Debian 12 root holding the packages `dpkg` (a dpkg status file) lists, shown by the fake provider."""
    root = tmp_path / "rootfs"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(dpkg)
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text(DEBIAN_12_OS_RELEASE)
    img = Image(root, tmp_path / "disks")
    img.disks.mkdir()

    def factory(settings: Settings) -> Provider:
        return FakeProvider(settings, img)

    monkeypatch.setattr(amiforge.providers, "PROVIDERS", {"local": factory})
    return img


@pytest.fixture
def image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Image:
    microcode, _, installed = microcode_fix()
    return fake_image(tmp_path, monkeypatch, dpkg_status(microcode, installed))


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image: Image) -> Iterator[Path]:
    for key in list(os.environ):
        if key.startswith("AMIFORGE_"):
            monkeypatch.delenv(key)
    data = tmp_path / "data"
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(data))
    monkeypatch.setenv("AMIFORGE_ACTOR", "tester@unit")
    monkeypatch.chdir(tmp_path)
    yield data
    os.environ.pop("AMIFORGE_DEBUG", None)


@pytest.fixture
def bare_cli(data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """The CLI on a registry without vulnerability data."""
    return make_cli(monkeypatch, capsys)


@pytest.fixture
def cli(bare_cli: Cli, tmp_path: Path) -> Cli:
    """The CLI on a registry holding vulnerability data: one synthetic advisory that matches nothing."""
    imported = bare_cli("vulndb", "import", str(synthetic_osv(tmp_path / "osv")))
    assert imported.code == 0, imported.err
    return bare_cli


@contextmanager
def registry() -> Iterator[SqlStore]:
    with open_store(load_settings().registry_url) as store:
        yield store


def seed(image: Image, name: str = "web", *, tested: bool = True, parent: str | None = None) -> ImageVersion:
    """NAME@N through the store: built (digest of a fresh disk file), an artifact, a passing boot report."""
    with registry() as store:
        v = store.create_version(name=name, recipe_digest="a" * 64, recipe_path=f"/recipes/{name}.yaml",
                                 provider="local", tags={}, parent=parent, recipe="{}")  # fmt: skip
        disk = image.disks / f"{name}-{v.number}.img"
        disk.write_bytes(f"disk of {v.ref}\n".encode() * 64)
        digest = sha256_file(disk)
        store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=digest, size_bytes=disk.stat().st_size)
        store.add_artifact(v.id, Artifact("local", "local", str(disk), digest, disk.stat().st_size))
        if tested:
            store.add_boot_report(v.id, PASSING)
            store.transition(v.id, Status.TESTED, expect=Status.BUILT)
        return store.get_version(v.ref)


def signed(cli: Cli, image: Image, name: str = "web", *, parent: str | None = None) -> ImageVersion:
    v = seed(image, name, parent=parent)
    assert cli("scan", v.ref, "--json").code == 0
    r = cli("sign", v.ref, "--json")
    assert r.code == 0, r.err
    return v


@pytest.fixture
def key_id(cli: Cli) -> str:
    r = cli("keys", "generate", "--json")
    assert r.code == 0, r.err
    return str(r.json()["key_id"])


# --- scan ---------------------------------------------------------------------------------------------------


@needs_osv
def test_scan_json_contract_on_a_clean_image(cli: Cli, image: Image) -> None:
    imported = cli("vulndb", "import", str(OSV_DIR), "--json")
    assert imported.code == 0, imported.err
    v = seed(image)

    r = cli("scan", "web@1", "--json")

    assert r.code == 0, r.err
    doc = r.json()
    assert set(doc) == {"version", "digest", "packages", "sbom_digest", "vulndb", "findings", "gate", "orphaned"}
    assert doc["orphaned"] == []
    assert (doc["version"], doc["digest"], doc["packages"]) == ("web@1", v.digest, 3)
    for finding in doc["findings"]:
        assert finding["kind"] in FINDING_KINDS
        assert finding["id"] and finding["severity"]
        assert finding.get("package") or finding.get("path")
    microcode, fixed, installed = microcode_fix()
    assert [(f["kind"], f["id"], f["package"], f["installed"], f["fixed"]) for f in doc["findings"]] == [
        ("cve", "DSA-5474-1", microcode, installed, fixed)
    ]
    # dev, the entry channel, allows every CVE severity: the gate passes.
    assert doc["gate"] == {"channel": "dev", "passed": True, "reasons": []}
    with registry() as store:
        assert store.get_version("web@1").status is Status.SCANNED

    text = cli("scan", "web@1")  # a rescan, for a person
    assert text.code == 0, text.err
    assert "web@1 scanned: 3 packages, 1 finding(s)" in text.out
    assert f"{installed} → fix {fixed}" in text.out
    assert "scan gate (dev): passed" in text.out


def test_scan_with_a_planted_key_exits_4_and_never_prints_the_key(cli: Cli, image: Image) -> None:
    pem = private_key_pem()
    planted = image.root / SECRET_PATH.lstrip("/")
    planted.parent.mkdir(parents=True)
    planted.write_text(pem)
    seed(image)

    r = cli("scan", "web@1", "--json")

    assert r.code == 4
    doc = r.json()  # still one JSON document on stdout
    [secret] = doc["findings"]
    assert secret == {
        "kind": "secret",
        "id": "private-key",
        "severity": "critical",
        "title": "private key",
        "path": SECRET_PATH,
        "line": 1,
        "redacted": "-----BEGIN PRIVATE KEY----- …",
        "source": "secrets",
    }
    assert doc["gate"]["passed"] is False
    [reason] = doc["gate"]["reasons"]
    assert reason.startswith(f"secret private-key at {SECRET_PATH}: private key: a secret in the image")
    text = cli("scan", "web@1")
    assert text.code == 4
    assert "scan gate (dev): FAILED" in text.out
    body = [line for line in pem.splitlines() if not line.startswith("-----")]
    assert len(body) >= 2
    for line in body:
        for shown in (r.out, r.err, text.out, text.err):
            assert line not in shown


def test_scan_of_an_untested_version_reads_it_and_keeps_it_built(cli: Cli, image: Image) -> None:
    seed(image, tested=False)
    r = cli("scan", "web@1", "--json")
    assert r.code == 0
    assert r.json()["version"] == "web@1" and r.json()["packages"] == 3  # the image's dpkg status lists three
    assert cli("images", "show", "web@1", "--json").json()["version"]["status"] == "built"


def test_scan_of_a_version_still_baking_exits_3(cli: Cli, image: Image) -> None:
    with registry() as store:
        store.create_version(name="web", recipe_digest="a" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None)  # fmt: skip
    r = cli("scan", "web@1", "--json")
    assert r.code == 3
    assert r.json()["error"] == "state" and r.json()["fix"] == "wait for its bake to finish"


# --- sbom ---------------------------------------------------------------------------------------------------


def test_sbom_spdx_and_cyclonedx(cli: Cli, image: Image, tmp_path: Path) -> None:
    v = seed(image)
    missing = cli("sbom", "web@1", "--json")
    assert missing.code == 3
    assert missing.json()["message"] == "web@1 has no SBOM yet"
    assert cli("scan", "web@1", "--json").code == 0

    r = cli("sbom", "web@1", "--format", "spdx")

    assert r.code == 0, r.err
    doc = r.json()
    assert doc["spdxVersion"] == "SPDX-2.3"
    assert doc["name"] == "web@1"
    microcode, _, installed = microcode_fix()
    packages = {p["name"]: p for p in doc["packages"]}
    assert set(packages) == {"web", "base-files", microcode, "libc6"}
    assert packages[microcode]["versionInfo"] == installed
    assert packages["libc6"]["sourceInfo"] == "built from source package glibc 2.36-9+deb12u7"
    assert packages["web"]["checksums"] == [{"algorithm": "SHA256", "checksumValue": v.digest}]
    assert packages["web"]["versionInfo"] == "1"
    assert "web@web" not in r.out  # the image is named web@1, not web@web@1

    cyclonedx = cli("sbom", "web@1", "-o", str(tmp_path / "bom.json"))
    assert cyclonedx.code == 0, cyclonedx.err
    bom = json.loads((tmp_path / "bom.json").read_text())
    assert bom["bomFormat"] == "CycloneDX"
    assert (bom["metadata"]["component"]["name"], bom["metadata"]["component"]["version"]) == ("web", "1")
    assert sorted(c["name"] for c in bom["components"]) == sorted(["base-files", microcode, "libc6"])
    with registry() as store:
        record = store.latest_scan(v.id)
    assert record is not None and (tmp_path / "bom.json").read_text() == record.sbom


# --- vulndb -------------------------------------------------------------------------------------------------


def test_vulndb_import_of_a_malformed_file_exits_2_naming_it(bare_cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps({"id": "TEST-0001", "affected": "not a list", "modified": "yesterday"}))

    r = bare_cli("vulndb", "import", str(bad), "--json")

    assert r.code == 2
    doc = r.json()
    assert doc["error"] == "config"
    assert doc["message"] == f"OSV advisories at {bad} is malformed (2 problems)"
    assert {p["file"] for p in doc["problems"]} == {str(bad)}
    assert sorted(p["field"] for p in doc["problems"]) == ["affected", "modified"]
    status = bare_cli("vulndb", "status", "--json").json()
    assert status["advisories"] == 0
    assert [(s["name"], s["state"], s["age_days"]) for s in status["sources"]] == [
        ("osv", None, None), ("debian", None, None), ("cve", None, None)
    ]  # fmt: skip

    text = bare_cli("vulndb", "import", str(tmp_path / "nowhere"))
    assert text.code == 2
    assert f"no osv data at {tmp_path / 'nowhere'}" in text.err


@needs_osv
def test_vulndb_status_counts_the_imported_advisories(bare_cli: Cli) -> None:
    assert "never imported" in bare_cli("vulndb", "status").out
    count = len(list(OSV_DIR.glob("*.json")))

    imported = bare_cli("vulndb", "import", str(OSV_DIR), "--json")
    assert imported.code == 0, imported.err
    state = imported.json()["source"]
    assert (state["name"], state["count"], state["origin"]) == ("osv", count, str(OSV_DIR))
    newest = max(f.stat().st_mtime for f in OSV_DIR.glob("*.json"))
    assert datetime.fromisoformat(state["as_of"]).timestamp() == pytest.approx(newest)  # the files' age

    r = bare_cli("vulndb", "status", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["advisories"] == count
    osv = doc["sources"][0]
    assert osv["name"] == "osv" and osv["state"]["count"] == count
    assert osv["age_days"] == pytest.approx((datetime.now(UTC).timestamp() - newest) / 86400, abs=0.01)
    # Importing the same records again replaces them: the count does not double.
    assert bare_cli("vulndb", "import", str(OSV_DIR), "--json").json()["source"]["count"] == count
    row = next(line for line in bare_cli("vulndb", "status").out.splitlines() if line.strip().startswith("osv"))
    assert [cell.strip() for cell in row.split("│")][:3] == ["osv", str(count), f"{osv['age_days']:.1f} day(s)"]


# --- keys, sign, verify -------------------------------------------------------------------------------------


def test_keys_generate_then_list_shows_it_trusted(cli: Cli, data_dir: Path, key_id: str) -> None:
    assert key_id.startswith("ed25519:") and len(key_id) == len("ed25519:") + 16
    private = data_dir / "keys" / "amiforge.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (data_dir / "keys" / "amiforge.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")

    r = cli("keys", "list", "--json")

    assert r.code == 0, r.err
    [key] = r.json()
    assert set(key) == {"key_id", "algorithm", "added_at", "revoked_at", "revoked_reason"}  # no key material
    assert (key["key_id"], key["algorithm"], key["revoked_at"]) == (key_id, "ed25519", None)
    assert f"{key_id}  ed25519" in cli("keys", "list").out and "trusted" in cli("keys", "list").out
    again = cli("keys", "generate", "--json")
    assert again.code == 2
    assert again.json()["message"] == f"key file {private} already exists; refusing to overwrite a key"


def test_keys_trust_adds_a_public_key_file_and_refuses_anything_else(cli: Cli, tmp_path: Path) -> None:
    from amiforge.signing.keyfile import generate_keypair

    team = generate_keypair(tmp_path / "team-keys", "team")
    r = cli("keys", "trust", str(team.public_path), "--json")
    assert r.code == 0, r.err
    assert r.json()["key_id"] == team.key_id
    assert [k["key_id"] for k in cli("keys", "list", "--json").json()] == [team.key_id]
    not_a_key = tmp_path / "junk.pub"
    not_a_key.write_text("hello\n")
    bad = cli("keys", "trust", str(not_a_key), "--json")
    assert bad.code == 2 and str(not_a_key) in bad.json()["message"]
    neither = cli("keys", "trust", "--json")
    assert neither.code == 2


def test_revoking_the_key_makes_verify_exit_4(cli: Cli, image: Image, key_id: str) -> None:
    signed(cli, image)
    ok = cli("verify", "web@1", "--json")
    assert ok.code == 0, ok.err
    with registry() as store:
        digest = store.get_version("web@1").digest
    assert ok.json() == {"ok": True, "version": "web@1", "key_id": key_id, "digest": digest,
                         "findings_signed": {}, "findings_now": None}  # fmt: skip

    revoked = cli("keys", "revoke", key_id, "--reason", "x", "--json")
    assert revoked.code == 0, revoked.err
    assert (revoked.json()["key_id"], revoked.json()["revoked_reason"]) == (key_id, "x")
    assert revoked.json()["revoked_at"] is not None

    r = cli("verify", "web@1", "--json")

    assert r.code == 4
    doc = r.json()
    assert (doc["error"], doc["gate"]) == ("gate", "signature")
    assert doc["failures"] == [
        {"name": "trusted keys", "detail": "no trusted key ids were given, so no signature can be accepted"}
    ]
    resign = cli("sign", "web@1", "--json")  # the revoked default key must not sign again
    assert resign.code == 2
    assert resign.json()["message"].startswith(f"signing key {key_id} is revoked (x)")
    [listed] = cli("keys", "list", "--json").json()
    assert listed["revoked_reason"] == "x"
    assert cli("keys", "revoke", key_id, "--reason", "twice").code == 3
    assert cli("keys", "revoke", "ed25519:0000000000000000", "--reason", "x").code == 3
    with registry() as store:
        assert [e.data for e in store.events() if e.kind == "key.revoked"] == [{"key": key_id, "reason": "x"}]


def test_verify_after_a_byte_of_the_disk_changed_exits_4_naming_the_artifact(
    cli: Cli, image: Image, key_id: str
) -> None:
    signed(cli, image)
    disk = image.disks / "web-1.img"
    data = bytearray(disk.read_bytes())
    data[7] ^= 0x20
    disk.write_bytes(bytes(data))

    r = cli("verify", "web@1")

    assert r.code == 4
    assert "signature gate failed: 1 item(s)" in r.err
    assert f"artifact {disk}: bytes hash to" in r.err
    promoted = cli("promote", "web@1", "--channel", "dev", "--json")
    assert promoted.code == 4
    assert [f["name"] for f in promoted.json()["failures"]] == ["signature"]
    assert cli("channels", "--json").json() == []


def test_sign_without_a_key_exits_2_with_the_fix(cli: Cli, image: Image, data_dir: Path) -> None:
    seed(image)
    assert cli("scan", "web@1", "--json").code == 0
    r = cli("sign", "web@1", "--json")
    assert r.code == 2
    doc = r.json()
    assert doc["message"] == f"no signing key at {data_dir / 'keys' / 'amiforge.key'}"
    assert "amiforge keys generate" in doc["fix"]


# --- promote, channels, revoke ------------------------------------------------------------------------------


def test_promote_to_an_unknown_channel_exits_2_listing_the_channels(cli: Cli, image: Image, key_id: str) -> None:
    signed(cli, image)
    r = cli("promote", "web@1", "--channel", "nosuch", "--json")
    assert r.code == 2
    doc = r.json()
    assert doc["message"] == "channel 'nosuch' is not in the policy; channels: dev, staging, prod"
    assert doc["fix"] == "use one of: dev, staging, prod; or add channels.nosuch to the policy"
    text = cli("promote", "web@1", "--channel", "nosuch")
    assert text.code == 2
    assert "channels: dev, staging, prod" in text.err


def test_promote_revoke_and_channels_show_the_flags(cli: Cli, image: Image, key_id: str) -> None:
    signed(cli, image)
    signed(cli, image, parent="web@1")

    first = cli("promote", "web@1", "--channel", "dev", "--reason", "try it", "--json")
    assert first.code == 0, first.err
    assert first.json()["moved"] is True
    assert first.json()["pointer"]["current"] == "web@1"
    second = cli("promote", "web@2", "--channel", "dev")
    assert second.code == 0, second.err
    assert "promoted web@2 to dev (previous: web@1)" in second.out
    staging = cli("promote", "web@2", "--channel", "staging", "--json")
    assert staging.code == 4
    [soak] = staging.json()["failures"]
    assert soak["name"] == "soak" and " left (promote after " in soak["detail"]

    revoked = cli("revoke", "web@1", "--reason", "leaked key", "--json")

    assert revoked.code == 0, revoked.err
    doc = revoked.json()
    assert doc["version"] == "web@1"
    assert [(p["channel"], p["current"]) for p in doc["flagged_channels"]] == [("dev", "web@2")]
    assert doc["flagged_versions"] == ["web@2"]
    channels = cli("channels", "--json")
    assert channels.code == 0, channels.err
    [dev] = channels.json()
    assert (dev["name"], dev["channel"], dev["current"], dev["previous"]) == ("web", "dev", "web@2", "web@1")
    # Both the current image (a descendant) and the rollback image (the revoked one itself) are flagged.
    assert dev["flags"] == ["current web@2: ancestor web@1 is revoked", "rollback web@1 is revoked"]
    assert "rollback web@1 is revoked" in cli("channels").out
    again = cli("promote", "web@1", "--channel", "dev", "--json")
    assert again.code == 4
    assert again.json()["failures"][0]["name"] == "revoked"
    with registry() as store:
        assert store.get_version("web@1").status is Status.REVOKED
        kinds = [e.kind for e in store.events()]
    assert kinds.count("channel.flagged") == 1 and kinds.count("version.flagged") == 1
    assert kinds.count("promote.refused") == 2

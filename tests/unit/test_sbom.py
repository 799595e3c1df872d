"""dpkg status parsing, package URLs, and the CycloneDX / SPDX documents made from a package list."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cyclonedx.exception import MissingOptionalDependencyException
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from hypothesis import given, settings
from hypothesis import strategies as st
from packageurl import PackageURL
from spdx_tools.spdx.parser.error import SPDXParsingError
from spdx_tools.spdx.parser.json.json_parser import parse_from_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from amiforge.errors import ConfigError
from amiforge.model import Package
from amiforge.scanners.sbom import (
    cyclonedx_sbom,
    parse_dpkg_status,
    purl,
    read_dpkg_status,
    sbom_digest,
    spdx_sbom,
)
from tests.conftest import OSV_DIR, osv_missing_means_failure, required_or_skip

STATUS = """\
Package: libssl3
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: same
Source: openssl
Version: 3.0.15-1~deb12u1
Depends: libc6 (>= 2.34)
Description: Secure Sockets Layer toolkit - shared libraries
 This package is part of the OpenSSL project's implementation of the SSL
 and TLS cryptographic protocols for secure communication over the
 .
 Internet.

Package: old-tool
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1
Conffiles:
 /etc/old-tool.conf 0123456789abcdef0123456789abcdef

Package: half
Status: install reinstreq half-installed
Architecture: amd64
Version: 2.0-1

Package: libc6
Status: install ok installed
Architecture: i386
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u9

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u9

Package: zlib1g
Status: hold ok installed
Architecture: amd64
Source: zlib (1:1.2.13.dfsg-1)
Version: 1:1.2.13.dfsg-1+b1

Package: adduser
Status: install ok installed
Architecture: all
Version: 3.134
"""

TS = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
DIGEST = "ab" * 32


def test_parse_status_keeps_installed_and_reads_source() -> None:
    pkgs = parse_dpkg_status(STATUS)
    assert [(p.name, p.arch) for p in pkgs] == [
        ("adduser", "all"),
        ("libc6", "amd64"),
        ("libc6", "i386"),
        ("libssl3", "amd64"),
        ("zlib1g", "amd64"),  # "hold ok installed" is installed
    ]
    by = {(p.name, p.arch): p for p in pkgs}
    assert by["libssl3", "amd64"] == Package("libssl3", "3.0.15-1~deb12u1", "amd64", "openssl", None)
    assert by["zlib1g", "amd64"].source == "zlib"
    assert by["zlib1g", "amd64"].source_version == "1:1.2.13.dfsg-1"
    assert by["adduser", "all"].source is None
    assert by["adduser", "all"].source_name == "adduser"


def test_parse_status_problems_name_file_line_and_field() -> None:
    text = "Package: a\nStatus: install ok installed\nArchitecture: amd64\n\nPackage: b\nStatus: install ok installed\n"
    text += "Architecture: amd64\nVersion: 1.0\nSource: bad source (x y)\n"
    with pytest.raises(ConfigError) as e:
        parse_dpkg_status(text, file="img/var/lib/dpkg/status")
    problems = e.value.problems
    assert [(p.file, p.line, p.field) for p in problems] == [
        ("img/var/lib/dpkg/status", 1, "Version"),
        ("img/var/lib/dpkg/status", 5, "Source"),
    ]
    assert "'a'" in problems[0].message and problems[0].fix
    assert e.value.exit_code == 2


def test_missing_status_says_no_dpkg_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        read_dpkg_status(tmp_path)
    assert "no dpkg database" in e.value.message
    assert e.value.problems[0].file == str(tmp_path / "var/lib/dpkg/status")
    assert e.value.fix


def test_read_status_from_a_rootfs(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(STATUS)
    assert read_dpkg_status(tmp_path) == parse_dpkg_status(STATUS)


_name = st.from_regex(r"[a-z0-9][a-z0-9+.-]{0,12}", fullmatch=True)
_version = st.from_regex(r"([1-9]:)?[0-9][0-9a-z.+~]{0,6}(-[0-9a-z+.~]{1,5})?", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_name, _version, st.sampled_from(["amd64", "all", "i386"]), st.none() | _name), max_size=8))
def test_parse_status_round_trips(rows: list[tuple[str, str, str, str | None]]) -> None:
    stanzas, expected = [], {}
    for name, version, arch, source in rows:
        extra = f"Source: {source}\n" if source else ""
        stanzas.append(
            f"Package: {name}\nStatus: install ok installed\nArchitecture: {arch}\n{extra}Version: {version}\n"
            "Description: x\n more\n"
        )
        expected[name, arch] = Package(name, version, arch, source)
    # dpkg never writes two stanzas for one (name, arch); the last one written stands in for that here.
    dedup = {(n, a): s for (n, _, a, _), s in zip(rows, stanzas, strict=True)}
    got = parse_dpkg_status("\n".join(dedup.values()))
    assert got == sorted(expected.values(), key=lambda p: (p.name, p.arch))


# --- the host's real dpkg database, checked against dpkg-query --------------------------------------------------

HOST_STATUS = Path("/var/lib/dpkg/status")


def _host_inventory() -> list[Package]:
    """The packages installed on this machine: a real dpkg status file (hundreds of packages on a Debian host)."""
    required_or_skip(HOST_STATUS.is_file(), f"no dpkg database at {HOST_STATUS}", "run the suite on Debian, as CI does")
    return read_dpkg_status(Path("/"))


def test_real_dpkg_status_matches_dpkg_query() -> None:
    ours = _host_inventory()
    required_or_skip(
        shutil.which("dpkg-query") is not None, "dpkg-query is missing", "run the suite on Debian, as CI does"
    )
    out = subprocess.run(
        [
            "dpkg-query",
            "-W",
            "-f=${db:Status-Status}\t${Package}\t${Architecture}\t${Version}\t${source:Package}\t${source:Version}\n",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LC_ALL": "C"},
    ).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    theirs = {(r[1], r[2], r[3]) for r in rows if r[0] == "installed"}
    assert ours and {(p.name, p.arch, p.version) for p in ours} == theirs
    sources = {(r[1], r[2]): (r[4], r[5]) for r in rows if r[0] == "installed"}
    for p in ours:
        assert (p.source_name, p.source_version or p.version) == sources[p.name, p.arch], p


# --- package URLs ---------------------------------------------------------------------------------------------


def test_purl_plain_and_with_upstream() -> None:
    assert purl(Package("adduser", "3.134", "all")) == "pkg:deb/debian/adduser@3.134?arch=all&distro=debian-12"
    assert (
        purl(Package("libssl3", "3.0.15-1~deb12u1", "amd64", "openssl"))
        == "pkg:deb/debian/libssl3@3.0.15-1~deb12u1?arch=amd64&distro=debian-12&upstream=openssl"
    )


def test_purl_escaping_epoch_plus_and_source_version() -> None:
    pkg = Package("zlib1g", "1:1.2.13.dfsg-1+b1", "amd64", "zlib", "1:1.2.13.dfsg-1")
    text = purl(pkg, distro="debian-12")
    # As in the purl spec's deb examples: '+' is percent-encoded, the epoch colon is not.
    assert (
        text == "pkg:deb/debian/zlib1g@1:1.2.13.dfsg-1%2Bb1?arch=amd64&distro=debian-12&upstream=zlib%401:1.2.13.dfsg-1"
    )
    parsed = PackageURL.from_string(text)
    assert parsed.version == pkg.version
    assert parsed.qualifiers == {"arch": "amd64", "distro": "debian-12", "upstream": "zlib@1:1.2.13.dfsg-1"}
    # binNMU of a same-named source: upstream carries the source version only.
    assert purl(Package("foo", "1.0-1+b1", "amd64", "foo", "1.0-1")).endswith("&upstream=foo%401.0-1")


# --- CycloneDX ------------------------------------------------------------------------------------------------


def cyclonedx_errors(text: str) -> str | None:
    """cyclonedx-python-lib's strict JSON schema validation, for the spec version the document says; None when valid.

    The validator needs the library's `json-validation` extra (jsonschema), which the dev extra declares."""
    version = SchemaVersion.from_version(json.loads(text)["specVersion"])
    try:
        error = JsonStrictValidator(version).validate_str(text)
    except MissingOptionalDependencyException as e:
        pytest.fail(f"cyclonedx-python-lib[json-validation] is not installed ({e}): run scripts/bootstrap.sh --test")
    return None if error is None else str(error)[:3000]


def test_cyclonedx_validates_and_lists_every_package() -> None:
    pkgs = parse_dpkg_status(STATUS)
    text = cyclonedx_sbom(pkgs, image_name="web", image_version="3", digest=DIGEST, timestamp=TS)
    assert cyclonedx_errors(text) is None
    doc = json.loads(text)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", doc["serialNumber"])
    meta = doc["metadata"]
    assert meta["timestamp"].startswith("2025-01-02T03:04:05")
    assert meta["component"]["type"] == "operating-system"
    assert (meta["component"]["name"], meta["component"]["version"]) == ("web", "3")
    assert meta["component"]["hashes"] == [{"alg": "SHA-256", "content": DIGEST}]
    comps = {c["purl"]: c for c in doc["components"]}
    assert set(comps) == {purl(p) for p in pkgs}
    assert all(c["type"] == "library" for c in comps.values())
    libssl = comps[purl(pkgs[3])]
    assert {p["name"]: p["value"] for p in libssl["properties"]} == {
        "amiforge:package:arch": "amd64",
        "amiforge:package:source": "openssl",
    }
    image_deps = next(d for d in doc["dependencies"] if d["ref"] == meta["component"]["bom-ref"])
    assert sorted(image_deps["dependsOn"]) == sorted(comps)


def test_cyclonedx_validator_is_live() -> None:
    # Guards the check above against a validator that accepts anything.
    text = cyclonedx_sbom(parse_dpkg_status(STATUS), image_name="web", image_version="3", digest=DIGEST, timestamp=TS)
    doc = json.loads(text)
    doc["components"][0]["type"] = "not-a-type"
    assert cyclonedx_errors(json.dumps(doc)) is not None


def test_cyclonedx_is_deterministic() -> None:
    pkgs = parse_dpkg_status(STATUS)
    args = {"image_name": "web", "image_version": "3", "digest": DIGEST}
    first = cyclonedx_sbom(pkgs, timestamp=TS, **args)
    # Same input, another order, an equal instant in another zone: same bytes.
    same_instant = TS.astimezone(timezone(timedelta(hours=2)))
    assert cyclonedx_sbom(list(reversed(pkgs)), timestamp=same_instant, **args) == first
    later = cyclonedx_sbom(pkgs, timestamp=TS + timedelta(seconds=1), **args)
    assert later != first
    assert json.loads(later)["serialNumber"] == json.loads(first)["serialNumber"]
    other = cyclonedx_sbom(pkgs, timestamp=TS, image_name="web", image_version="3", digest="cd" * 32)
    assert json.loads(other)["serialNumber"] != json.loads(first)["serialNumber"]


def test_cyclonedx_of_no_packages_validates() -> None:
    text = cyclonedx_sbom([], image_name="empty", image_version="1", digest="sha256:" + DIGEST, timestamp=TS)
    assert cyclonedx_errors(text) is None
    assert json.loads(text)["metadata"]["component"]["hashes"][0]["content"] == DIGEST


# --- SPDX -----------------------------------------------------------------------------------------------------


def test_spdx_shape() -> None:
    pkgs = [*parse_dpkg_status(STATUS), Package("libstdc++6", "12.2.0-14", "amd64", "gcc-12")]
    doc = json.loads(spdx_sbom(pkgs, image_name="web", image_version="3", digest=DIGEST, timestamp=TS))
    assert doc["spdxVersion"] == "SPDX-2.3"
    assert doc["dataLicense"] == "CC0-1.0"
    assert doc["SPDXID"] == "SPDXRef-DOCUMENT"
    assert doc["documentNamespace"].startswith("https://") and "#" not in doc["documentNamespace"]
    assert doc["creationInfo"] == {"created": "2025-01-02T03:04:05Z", "creators": ["Tool: amiforge-0.1.0"]}
    ids = [p["SPDXID"] for p in doc["packages"]]
    assert len(ids) == len(set(ids)) == len(pkgs) + 1
    assert all(re.fullmatch(r"SPDXRef-[A-Za-z0-9.-]+", i) for i in ids)
    image, *members = doc["packages"]
    assert image["checksums"] == [{"algorithm": "SHA256", "checksumValue": DIGEST}]
    for entry in members:
        assert entry["downloadLocation"] == entry["licenseConcluded"] == "NOASSERTION"
        (ref,) = entry["externalRefs"]
        assert ref["referenceCategory"] == "PACKAGE-MANAGER" and ref["referenceType"] == "purl"
    assert {e["externalRefs"][0]["referenceLocator"] for e in members} == {purl(p) for p in pkgs}
    rels = doc["relationships"]
    assert {
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image["SPDXID"],
    } in rels
    contained = {r["relatedSpdxElement"] for r in rels if r["relationshipType"] == "CONTAINS"}
    assert contained == {e["SPDXID"] for e in members}


def test_spdx_is_deterministic_and_digest_is_sha256() -> None:
    pkgs = parse_dpkg_status(STATUS)
    a = spdx_sbom(pkgs, image_name="web", image_version="3", digest=DIGEST, timestamp=TS)
    b = spdx_sbom(list(reversed(pkgs)), image_name="web", image_version="3", digest=DIGEST, timestamp=TS)
    assert a == b
    assert sbom_digest(a) == hashlib.sha256(a.encode()).hexdigest()
    assert sbom_digest(a) != sbom_digest(a + " ")


def spdx_errors(text: str, tmp_path: Path) -> list[str]:
    """spdx-tools' verdict on an SPDX JSON document: its JSON parser, then full validation; [] when valid."""
    path = tmp_path / "sbom.spdx.json"
    path.write_text(text, encoding="utf-8")
    try:
        document = parse_from_file(str(path))
    except SPDXParsingError as e:
        return [f"parse: {m}" for m in e.messages]
    return [f"{m.context.spdx_id or ''}: {m.validation_message}" for m in validate_full_spdx_document(document)]


def test_spdx_validates(tmp_path: Path) -> None:
    pkgs = [*parse_dpkg_status(STATUS), Package("libstdc++6", "12.2.0-14", "amd64", "gcc-12")]
    for packages, digest in [(pkgs, DIGEST), ([], "sha256:" + DIGEST), (pkgs, "ami-0123456789abcdef0")]:
        text = spdx_sbom(packages, image_name="web", image_version="3", digest=digest, timestamp=TS)
        assert spdx_errors(text, tmp_path) == []


def test_spdx_validator_is_live(tmp_path: Path) -> None:
    # Guards the checks against a validator that accepts anything: a relationship to an element that is not there.
    doc = json.loads(
        spdx_sbom(parse_dpkg_status(STATUS), image_name="web", image_version="3", digest=DIGEST, timestamp=TS)
    )
    doc["relationships"][1]["relatedSpdxElement"] = "SPDXRef-Package-nowhere"
    assert any("SPDXRef-Package-nowhere" in m for m in spdx_errors(json.dumps(doc), tmp_path))
    doc = json.loads(spdx_sbom([], image_name="web", image_version="3", digest=DIGEST, timestamp=TS))
    del doc["documentNamespace"]
    assert spdx_errors(json.dumps(doc), tmp_path) != []


# --- realistic inventories: each ecosystem's own validator ----------------------------------------------------


def _osv_inventory() -> list[Package]:
    """Every Debian package version the real OSV records in the shared data name (affected and fixed): a century of
    Debian version strings (epochs, ~, +, backports, security updates), read where they lie, never copied here."""
    osv_missing_means_failure()
    packages = set()
    for record in sorted(OSV_DIR.glob("*.json")):
        for affected in json.loads(record.read_text(encoding="utf-8")).get("affected", []):
            if not affected["package"]["ecosystem"].startswith("Debian"):
                continue
            name = affected["package"]["name"]
            fixed = [e["fixed"] for r in affected.get("ranges", []) for e in r.get("events", []) if "fixed" in e]
            packages |= {Package(name, v, "amd64", name) for v in [*affected.get("versions", []), *fixed]}
    assert len(packages) > 50, f"expected the shared OSV records at {OSV_DIR} to name dozens of package versions"
    return sorted(packages, key=lambda p: (p.name, p.version))


@pytest.mark.parametrize("inventory", [_host_inventory, _osv_inventory], ids=["host-dpkg-status", "osv-debian"])
def test_sboms_of_real_inventories_pass_their_ecosystems_validators(
    inventory: Callable[[], list[Package]], tmp_path: Path
) -> None:
    packages = inventory()
    image = {"image_name": "web", "image_version": "12", "digest": "sha256:" + DIGEST}

    spdx = spdx_sbom(packages, **image, timestamp=TS)
    assert spdx_errors(spdx, tmp_path) == []
    spdx_doc = json.loads(spdx)
    assert len(spdx_doc["packages"]) == len(set(packages)) + 1  # the image and each package

    cdx = cyclonedx_sbom(packages, **image, timestamp=TS)
    assert cyclonedx_errors(cdx) is None
    cdx_doc = json.loads(cdx)
    assert {c["purl"] for c in cdx_doc["components"]} == {purl(p) for p in packages}

"""The image's bill of materials: the installed Debian packages and the two SBOM documents made from them.

Owns reading `var/lib/dpkg/status` from an image root, the package URL of a Debian package, CycloneDX 1.6 JSON (through
cyclonedx-python-lib) and SPDX 2.3 JSON (written here; the shape is small), and the digest a signed manifest records.
Both documents are deterministic: the same packages, image and timestamp give the same bytes, so the SBOM digest is a
stable part of what gets signed.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

import amiforge
from amiforge.errors import ConfigError, Problem
from amiforge.imagefs import read_inside
from amiforge.model import Package
from amiforge.scanners.interface import malformed
from amiforge.scanners.vulns import is_dpkg_version

DPKG_STATUS = "var/lib/dpkg/status"
DEFAULT_DISTRO = "debian-12"

# Serial numbers and SPDX namespaces are UUIDv5 under this fixed namespace, so the same image gives the same ids.
_NAMESPACE = uuid.UUID("6f1c3a52-5d0e-4c57-9a59-0b8f5c2e7d41")
_SOURCE_RE = re.compile(r"^(?P<name>[^\s()]+)(?:\s+\((?P<version>[^\s()]+)\))?$")
_SPDX_ID_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --- dpkg status ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stanza:
    line: int  # 1-based line of the stanza's first field
    fields: dict[str, str]  # field names lower-cased: deb822 field names are case-insensitive


def _stanzas(text: str, file: str, problems: list[Problem]) -> Iterator[_Stanza]:
    fields: dict[str, str] = {}
    start = 0
    last: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            if fields:
                yield _Stanza(start, fields)
            fields, last = {}, None
            continue
        if raw[0] in " \t":
            # A continuation line (long Description, Conffiles): part of the previous field's value.
            if last is None:
                problems.append(Problem("continuation line with no field before it", file=file, line=number))
            else:
                fields[last] += "\n" + raw[1:]
            continue
        name, sep, value = raw.partition(":")
        if not sep or not name or " " in name:
            problems.append(Problem(f"not a 'Field: value' line: {raw[:60]!r}", file=file, line=number))
            continue
        if not fields:
            start = number
        last = name.lower()
        fields[last] = value.strip()
    if fields:
        yield _Stanza(start, fields)


def parse_dpkg_status(text: str, *, file: str = DPKG_STATUS) -> list[Package]:
    """Installed packages from the text of a dpkg status file; `file` names it in errors."""
    problems: list[Problem] = []
    packages: list[Package] = []
    for stanza in _stanzas(text, file, problems):
        f = stanza.fields
        status = f.get("status", "").split()
        # "install ok installed" and "hold ok installed" are on disk; config-files, half-installed, unpacked… are not.
        if not status or status[-1] != "installed":
            continue
        where = f"package {f['package']!r}" if "package" in f else "a stanza"
        missing = [k for k in ("package", "version", "architecture") if not f.get(k)]
        for key in missing:
            problems.append(
                Problem(
                    f"{where} is installed but has no {key.capitalize()}",
                    file=file,
                    line=stanza.line,
                    field=key.capitalize(),
                    fix="repair the dpkg database in the image (dpkg --audit) and bake again",
                )
            )
        if missing:
            continue
        if not is_dpkg_version(f["version"]):
            problems.append(
                Problem(
                    f"{where}: not a Debian version: {f['version']!r}", file=file, line=stanza.line, field="Version"
                )
            )
            continue
        source, source_version = None, None
        if f.get("source"):
            m = _SOURCE_RE.match(f["source"])
            if m is None or (m["version"] is not None and not is_dpkg_version(m["version"])):
                problems.append(
                    Problem(
                        f"{where}: Source must be 'name' or 'name (version)', got {f['source']!r}",
                        file=file,
                        line=stanza.line,
                        field="Source",
                    )
                )
                continue
            source, source_version = m["name"], m["version"]
        packages.append(Package(f["package"], f["version"], f["architecture"], source, source_version))
    if problems:
        raise malformed(f"dpkg status file {file}", problems)
    return sorted(packages, key=lambda p: (p.name, p.arch))


def read_dpkg_status(rootfs: Path) -> list[Package]:
    """The packages installed in the image rooted at `rootfs`, sorted by name then architecture."""
    path = rootfs / DPKG_STATUS
    try:
        data = read_inside(rootfs, "/" + str(DPKG_STATUS).lstrip("/"))
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(
            f"the image at {rootfs} has no dpkg database",
            problems=[Problem("file not found", file=str(path))],
            fix="amiforge scans Debian-based images only: bake from a Debian base, and check the image root is mounted",
        ) from None
    # Field names and values dpkg relies on are ASCII; free text (descriptions) may be anything.
    return parse_dpkg_status(data.decode("utf-8", errors="replace"), file=str(path))


# --- package URLs ---------------------------------------------------------------------------------------------


def purl(pkg: Package, distro: str = DEFAULT_DISTRO) -> str:
    """`pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=DISTRO[&upstream=SOURCE[@SOURCE_VERSION]]`.

    Escaping follows the purl spec through packageurl ('+' becomes %2B; an epoch colon stays, as in the spec's own
    `attr@1:2.4.47-2`). `upstream` is not in the deb type definition, but Syft and Trivy emit it and scanners match
    Debian advisories by source package, so it carries the source name (and version where it differs).
    """
    qualifiers = {"arch": pkg.arch, "distro": distro}
    upstream = _upstream(pkg)
    if upstream:
        qualifiers["upstream"] = upstream
    return PackageURL(
        type="deb", namespace="debian", name=pkg.name, version=pkg.version, qualifiers=qualifiers
    ).to_string()


def _upstream(pkg: Package) -> str | None:
    name_differs = pkg.source_name != pkg.name
    version_differs = pkg.source_version is not None and pkg.source_version != pkg.version
    if not (name_differs or version_differs):
        return None
    return f"{pkg.source_name}@{pkg.source_version}" if version_differs else pkg.source_name


# --- SBOM documents -------------------------------------------------------------------------------------------


def _utc(ts: datetime) -> datetime:
    # A naive timestamp is taken as UTC (what the store keeps) rather than the host's local time, which would make
    # the document depend on where it was generated.
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _sha256_hex(digest: str) -> str | None:
    hexpart = digest.removeprefix("sha256:").lower()
    return hexpart if _HEX64.match(hexpart) else None


def _document_uuid(image_name: str, image_version: str, digest: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{image_name}\n{image_version}\n{digest}")


def cyclonedx_sbom(
    packages: Sequence[Package],
    *,
    image_name: str,
    image_version: str,
    digest: str,
    timestamp: datetime,
    distro: str = DEFAULT_DISTRO,
) -> str:
    """CycloneDX 1.6 JSON: the image as an operating-system component, each package a library with its purl."""
    image_hash = _sha256_hex(digest)
    image_ref = f"image:{image_name}@{image_version}"
    image = Component(
        type=ComponentType.OPERATING_SYSTEM,
        name=image_name,
        version=image_version,
        bom_ref=image_ref,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=image_hash)] if image_hash else None,
        properties=[Property(name="amiforge:distro", value=distro), Property(name="amiforge:digest", value=digest)],
    )
    tool = Component(type=ComponentType.APPLICATION, name="amiforge", version=amiforge.__version__)
    bom = Bom(
        serial_number=_document_uuid(image_name, image_version, digest),
        metadata=BomMetaData(component=image, timestamp=_utc(timestamp)),
    )
    bom.metadata.tools.components.add(tool)
    components: list[Component] = []
    for pkg in _unique(packages):
        ref = purl(pkg, distro)
        props = [Property(name="amiforge:package:arch", value=pkg.arch)]
        if pkg.source:
            props.append(Property(name="amiforge:package:source", value=pkg.source))
        if pkg.source_version:
            props.append(Property(name="amiforge:package:source-version", value=pkg.source_version))
        components.append(
            Component(
                type=ComponentType.LIBRARY,
                name=pkg.name,
                version=pkg.version,
                bom_ref=ref,  # the purl is unique per (name, version, arch) and stable across runs
                purl=PackageURL.from_string(ref),
                properties=props,
            )
        )
    bom.components.update(components)
    bom.register_dependency(image, components)
    return JsonV1Dot6(bom).output_as_string(indent=2)


def spdx_sbom(
    packages: Sequence[Package],
    *,
    image_name: str,
    image_version: str,
    digest: str,
    timestamp: datetime,
    distro: str = DEFAULT_DISTRO,
) -> str:
    """SPDX 2.3 JSON: the document DESCRIBES the image package, which CONTAINS one package per installed package."""
    doc_uuid = _document_uuid(image_name, image_version, digest)
    image_id = "SPDXRef-Image"
    image_hash = _sha256_hex(digest)
    image: dict[str, object] = {
        "SPDXID": image_id,
        "name": image_name,
        "versionInfo": image_version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "comment": f"{distro} machine image, digest {digest}",
    }
    if image_hash:
        image["checksums"] = [{"algorithm": "SHA256", "checksumValue": image_hash}]
    spdx_packages: list[dict[str, object]] = [image]
    relationships: list[dict[str, str]] = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": image_id}
    ]
    for pkg in _unique(packages):
        ref = purl(pkg, distro)
        spdx_id = _spdx_id(pkg, ref)
        entry: dict[str, object] = {
            "SPDXID": spdx_id,
            "name": pkg.name,
            "versionInfo": pkg.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "LIBRARY",
            "externalRefs": [
                {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": ref}
            ],
        }
        if pkg.source:
            entry["sourceInfo"] = f"built from source package {pkg.source} {pkg.source_version or pkg.version}"
        spdx_packages.append(entry)
        relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": spdx_id})
    document = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image_name}@{image_version}",
        # A URI unique to this document, as the spec asks; it need not resolve.
        "documentNamespace": f"https://spdx.org/spdxdocs/amiforge-{image_name}-{image_version}-{doc_uuid}",
        "creationInfo": {
            "created": _utc(timestamp).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "creators": [f"Tool: amiforge-{amiforge.__version__}"],
        },
        "documentDescribes": [image_id],
        "packages": spdx_packages,
        "relationships": relationships,
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _unique(packages: Sequence[Package]) -> list[Package]:
    # Sorted so that the caller's order never changes the bytes; duplicates would make non-unique SPDX/bom refs.
    return sorted(set(packages), key=lambda p: (p.name, p.arch, p.version, p.source or "", p.source_version or ""))


def _spdx_id(pkg: Package, ref: str) -> str:
    # SPDX ids allow only [A-Za-z0-9.-]; package names may hold '+' (libstdc++6), so keep a readable part and make it
    # unique with a short hash of the purl.
    readable = _SPDX_ID_UNSAFE.sub("-", f"{pkg.name}-{pkg.arch}")
    return f"SPDXRef-Package-deb-{readable}-{hashlib.sha256(ref.encode()).hexdigest()[:12]}"


def sbom_digest(text: str) -> str:
    """sha256 hex of an SBOM document's UTF-8 bytes: what a signed manifest records."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

"""OSV advisories for Debian: loading (real records), dpkg version order, matching, and Trivy/Grype report import.

The real records are read where they live (../shared/data/osv-debian, see its SOURCE.md); they are never copied into
the project. Synthetic records and reports use obviously made-up ids (TEST-0001 …).
"""

from __future__ import annotations

import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from debian.debian_support import version_compare
from hypothesis import given, settings
from hypothesis import strategies as st

from amiforge.errors import ConfigError
from amiforge.model import FindingKind, Package, Severity, Status
from amiforge.policy import Candidate, default_policy, evaluate
from amiforge.scanners.interface import Scanner
from amiforge.scanners.vulns import (
    Advisory,
    AffectedPackage,
    OsvScanner,
    cvss_severity,
    dpkg_compare,
    dpkg_identity,
    import_report,
    is_dpkg_version,
    load_osv,
    match,
    severity_from_word,
)
from tests.conftest import OSV_DIR, needs_osv, osv_missing_means_failure

REAL_IDS = {
    "CVE-2024-10524",
    "DLA-0001-1",
    "DLA-3008-1",
    "DLA-3012-1",
    "DLA-3022-1",
    "DLA-3051-1",
    "DSA-135",
    "DSA-3029-1",
    "DSA-5474-1",
    "DTSA-1-1",
}


@pytest.fixture(scope="module")
def real() -> list[Advisory]:
    if not OSV_DIR.is_dir():
        osv_missing_means_failure()
        pytest.skip(f"real OSV records not present at {OSV_DIR}")
    return load_osv(OSV_DIR)


# --- dpkg version order ---------------------------------------------------------------------------------------

ORDER = [
    ("1.0~rc1", "1.0", -1),  # tilde sorts before the release
    ("1.0~~", "1.0~", -1),
    ("1:0.9", "2.0", 1),  # an epoch outranks everything after it
    ("2:1.0", "1:9.9", 1),
    ("0:1.0", "1.0", 0),  # epoch 0 is no epoch
    ("1.0", "1.0-0", 0),  # an absent revision is revision 0
    ("2.36-9+deb12u1", "2.36-9+deb12u2", -1),
    ("2.36-9+deb12u2", "2.36-9+deb12u10", -1),  # numeric parts compare as numbers
    ("1.10", "1.9", 1),
    ("1.0-1", "1.0-1+b1", -1),  # a binNMU is newer than its source upload
    ("1.0-1~bpo12+1", "1.0-1", -1),  # backports sort before the release they backport
    ("3.20230808.1~deb12u1", "3.20230808.1", -1),
    ("1.1.0l-1~deb9u6", "1.1.0l-1", -1),
    ("1.0a", "1.0", 1),  # letters sort after the end of the string
    ("1.0.0", "1.0", 1),
    ("2005.08.R1-0.1", "2005.08.R1-0.1etch1", -1),
    ("7.88.1-10+deb12u5", "7.88.1-10+deb12u12", -1),
]


@pytest.mark.parametrize(("a", "b", "expected"), ORDER)
def test_dpkg_order(a: str, b: str, expected: int) -> None:
    assert dpkg_compare(a, b) == expected
    assert dpkg_compare(b, a) == -expected
    assert (dpkg_identity(a) == dpkg_identity(b)) == (expected == 0)


# Versions built from the characters dpkg treats differently: digits (compared as numbers, leading zeros too),
# letters, other symbols, `~`, an optional epoch and revision.
_PART = st.text(alphabet="0019a~.+", min_size=1, max_size=6).filter(lambda t: t[0].isdigit())
_VERSIONS = st.builds(
    lambda epoch, upstream, revision: f"{epoch}{upstream}{revision}",
    st.sampled_from(["", "0:", "1:", "01:"]),
    _PART,
    st.one_of(st.just(""), _PART.map(lambda r: f"-{r}")),
).filter(is_dpkg_version)


@settings(max_examples=400, deadline=None)
@given(_VERSIONS, _VERSIONS)
def test_dpkg_identity_is_equality_as_dpkg_compares(a: str, b: str) -> None:
    """The set-membership key agrees with python-debian's own comparison (not the cached one under test)."""
    assert (dpkg_identity(a) == dpkg_identity(b)) == (version_compare(a, b) == 0)
    assert dpkg_compare(a, b) == (version_compare(a, b) > 0) - (version_compare(a, b) < 0)


# --- real records ---------------------------------------------------------------------------------------------


def test_all_real_records_load(real: list[Advisory]) -> None:
    assert {a.id for a in real} == REAL_IDS
    by = {a.id: a for a in real}
    assert by["DLA-3008-1"].summary == "openssl - security update"
    assert by["DLA-3008-1"].identifiers == ("CVE-2022-1292", "DEBIAN-CVE-2022-1292")  # from `upstream`
    assert by["DSA-3029-1"].aliases == ("CVE-2014-3616",)
    assert by["DTSA-1-1"].identifiers == ("CVE-2005-2626", "CVE-2005-2627")  # CVEs in `related`
    assert by["CVE-2024-10524"].identifiers == ()  # its `related` are other distributions' advisories
    assert by["CVE-2024-10524"].title.startswith("Applications that use Wget")  # no summary: first part of details
    dsa = by["DSA-5474-1"]
    assert [(e.ecosystem, e.name, e.introduced, e.fixed) for e in dsa.affected] == [
        ("Debian:11", "intel-microcode", "0", "3.20230808.1~deb11u1"),
        ("Debian:12", "intel-microcode", "0", "3.20230808.1~deb12u1"),
    ]
    assert dsa.modified is not None and dsa.modified.year == 2026
    # None of these records rates itself; wget's Debian urgency is "not yet assigned".
    assert {a.severity for a in real} == {Severity.UNKNOWN}


# (record, Debian release, source package, a binary it builds, affected version, first fixed version, extra versions
# that must not be affected — an epoch, or the release without the "~debNuM" suffix)
CASES = [
    ("DLA-0001-1", "6.0", "gnutls26", "libgnutls26", "2.8.6-1+squeeze3", "2.8.6-1+squeeze4", ["1:2.8.6-1"]),
    ("DLA-3008-1", "9", "openssl", "libssl1.1", "1.1.0l-1~deb9u5", "1.1.0l-1~deb9u6", ["1.1.0l-1"]),
    ("DLA-3012-1", "9", "libxml2", "libxml2", "2.9.4+dfsg1-2.2+deb9u6", "2.9.4+dfsg1-2.2+deb9u7", []),
    ("DLA-3022-1", "9", "dpkg", "libdpkg-perl", "1.18.25", "1.18.26", ["1:1.0"]),
    ("DLA-3051-1", "9", "tzdata", "tzdata", "2021a-0+deb9u3", "2021a-0+deb9u4", ["2021b-0+deb9u1"]),
    ("DSA-135", "3.0", "libapache-mod-ssl", "libapache-mod-ssl", "2.8.9-1", "2.8.9-2", []),
    ("DSA-3029-1", "7", "nginx", "nginx-common", "1.2.1-2.2+wheezy2", "1.2.1-2.2+wheezy3", ["1.2.1-2.2+wheezy3+b1"]),
    ("DSA-5474-1", "12", "intel-microcode", "intel-microcode", "3.20230512.1~deb12u1", "3.20230808.1~deb12u1",
     ["3.20230808.1"]),
    ("DSA-5474-1", "11", "intel-microcode", "intel-microcode", "3.20230808.1~deb10u1", "3.20230808.1~deb11u1", []),
    ("DTSA-1-1", "4.0", "kismet", "kismet", "2005.08.R1-0.1", "2005.08.R1-0.1etch1", []),
    ("CVE-2024-10524", "13", "wget", "wget", "1.24.5-2", "1.25.0-1", ["1.25.0-2"]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}@{c[1]}" for c in CASES])
def test_real_record_match_decisions(
    real: list[Advisory], case: tuple[str, str, str, str, str, str, list[str]]
) -> None:
    adv_id, release, source, binary, below, fixed, safe = case
    advisory = next(a for a in real if a.id == adv_id)

    def findings(version: str) -> list[str | None]:
        pkg = Package(binary, version, "amd64", source if source != binary else None)
        return [f.fixed for f in match([pkg], [advisory], release=release)]

    assert findings(below) == [fixed], f"{below} is before the fix {fixed}: affected"
    assert findings(fixed) == [], f"{fixed} is the fix: not affected"
    for version in safe:
        assert findings(version) == [], f"{version} sorts after {fixed}: not affected"


def test_real_unfixed_bookworm_record(real: list[Advisory]) -> None:
    wget = next(a for a in real if a.id == "CVE-2024-10524")
    for version in ("1.21.3-1", "1.21.3-1+deb12u1", "1:0.1"):
        (f,) = match([Package("wget", version, "amd64")], [wget], release="12")
        assert (f.fixed, f.installed, f.package) == (None, version, "wget")
    # Alpine entries of the same record never match a Debian package.
    assert match([Package("wget", "1.21.4-r0", "amd64")], [wget], release="v3.21") == []


def test_real_finding_fields_and_release_filter(real: list[Advisory]) -> None:
    pkgs = [
        Package("libssl1.1", "1.1.0l-1~deb9u5", "amd64", "openssl"),
        Package("libssl1.1", "1.1.0l-1~deb9u5", "i386", "openssl"),  # multiarch: still one finding
        Package("openssl", "1.1.0l-1~deb9u5", "amd64"),
        Package("libc6", "2.24-11+deb9u4", "amd64", "glibc"),
    ]
    found = match(pkgs, real, release="9")
    assert [(f.id, f.package) for f in found] == [("DLA-3008-1", "libssl1.1"), ("DLA-3008-1", "openssl")]
    f = found[0]
    assert f.kind is FindingKind.CVE and f.source == "osv"
    assert (f.installed, f.fixed, f.severity) == ("1.1.0l-1~deb9u5", "1.1.0l-1~deb9u6", Severity.UNKNOWN)
    assert f.title == "openssl - security update"
    assert "CVE-2022-1292" in f.aliases
    assert f.key == "DLA-3008-1:libssl1.1"
    # The same packages on bookworm: the stretch advisory does not apply.
    assert match(pkgs, real, release="12") == []


def test_source_version_is_what_is_compared(real: list[Advisory]) -> None:
    dla = [a for a in real if a.id == "DLA-3022-1"]
    # A binary whose own version is unrelated to its source's (dpkg records "Source: dpkg (1.18.25)").
    (f,) = match([Package("some-binary", "5.0-1", "amd64", "dpkg", "1.18.25")], dla, release="9")
    assert (f.package, f.installed, f.fixed) == ("some-binary", "5.0-1", "1.18.26")
    # binNMU of a fixed upload: fixed.
    assert match([Package("dpkg", "1.18.26+b1", "amd64", "dpkg", "1.18.26")], dla, release="9") == []


# --- synthetic records: range semantics, ecosystems, severity -------------------------------------------------


def _record(adv_id: str, affected: list[dict[str, object]], **extra: object) -> dict[str, object]:
    return {
        "id": adv_id,
        "modified": "2025-01-01T00:00:00Z",
        "summary": f"{adv_id} summary",
        "affected": affected,
        **extra,
    }


def _entry(name: str, events: list[dict[str, str]], ecosystem: str = "Debian:12", **extra: object) -> dict[str, object]:
    return {
        "package": {"name": name, "ecosystem": ecosystem},
        "ranges": [{"type": "ECOSYSTEM", "events": events}],
        **extra,
    }


def _load(tmp_path: Path, *records: dict[str, object]) -> list[Advisory]:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(list(records)))
    return load_osv(path)


def _affected(advisories: list[Advisory], version: str, name: str = "foo", release: str = "12") -> list[str | None]:
    return [f.fixed for f in match([Package(name, version, "amd64")], advisories, release=release)]


def test_multiple_intervals_out_of_order_events(tmp_path: Path) -> None:
    advs = _load(
        tmp_path,
        _record(
            "TEST-0001",
            [_entry("foo", [{"fixed": "3.0"}, {"introduced": "2.0"}, {"fixed": "1.0"}, {"introduced": "0"}])],
        ),
    )
    assert _affected(advs, "0.5") == ["1.0"]
    assert _affected(advs, "1.0") == []
    assert _affected(advs, "1.5") == []
    assert _affected(advs, "2.0") == ["3.0"]
    assert _affected(advs, "2.9~rc1") == ["3.0"]
    assert _affected(advs, "3.0") == []


def test_last_affected_and_listed_versions(tmp_path: Path) -> None:
    advs = _load(
        tmp_path,
        _record("TEST-0002", [_entry("foo", [{"introduced": "1.0"}, {"last_affected": "1.5"}])]),
        _record("TEST-0003", [{"package": {"name": "bar", "ecosystem": "Debian:12"}, "versions": ["2.0-1", "2.0-3"]}]),
    )
    assert _affected(advs, "0.9") == []
    assert _affected(advs, "1.0") == [None]
    assert _affected(advs, "1.5") == [None]
    assert _affected(advs, "1.5-1") == []
    assert _affected(advs, "2.0-1", name="bar") == [None]
    assert _affected(advs, "2.0-2", name="bar") == []


def test_bare_debian_only_when_no_release_entry(tmp_path: Path) -> None:
    advs = _load(
        tmp_path,
        _record(
            "TEST-0004",
            [
                _entry("foo", [{"introduced": "0"}, {"fixed": "2.0"}], ecosystem="Debian"),
                _entry("foo", [{"introduced": "0"}, {"fixed": "1.0"}], ecosystem="Debian:12"),
                _entry("bar", [{"introduced": "0"}, {"fixed": "2.0"}], ecosystem="Debian"),
                _entry("baz", [{"introduced": "0"}, {"fixed": "2.0"}], ecosystem="Ubuntu:22.04"),
            ],
        ),
    )
    assert _affected(advs, "1.5") == []  # the Debian:12 entry (fixed 1.0) wins over the bare one
    assert _affected(advs, "0.5") == ["1.0"]
    assert _affected(advs, "1.5", name="bar") == ["2.0"]  # only a bare entry: it applies
    assert _affected(advs, "1.5", name="bar", release="11") == ["2.0"]
    assert _affected(advs, "1.5", name="baz") == []


def test_withdrawn_never_matches(tmp_path: Path) -> None:
    advs = _load(
        tmp_path, _record("TEST-0005", [_entry("foo", [{"introduced": "0"}])], withdrawn="2025-02-01T00:00:00Z")
    )
    assert advs[0].withdrawn is not None
    assert _affected(advs, "1.0") == []


def test_severity_sources(tmp_path: Path) -> None:
    cvss = [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}]
    cvss2 = [{"type": "CVSS_V2", "score": "AV:N/AC:L/Au:N/C:C/I:C/A:C"}]
    every = [{"introduced": "0"}]
    records = [
        _record("TEST-0010", [_entry("foo", every)], severity=cvss),
        _record("TEST-0011", [_entry("foo", every, ecosystem_specific={"urgency": "low"})], severity=cvss),
        _record("TEST-0012", [_entry("foo", every, database_specific={"urgency": "unimportant"})]),
        _record("TEST-0013", [_entry("foo", every, ecosystem_specific={"urgency": "not yet assigned"})]),
        _record("TEST-0014", [_entry("foo", every)], database_specific={"severity": "MODERATE"}),
        _record("TEST-0015", [_entry("foo", every)], severity=cvss2),
    ]
    advs = {a.id: a for a in _load(tmp_path, *records)}
    assert advs["TEST-0010"].severity is Severity.CRITICAL
    assert advs["TEST-0011"].severity is Severity.CRITICAL  # the record's own rating
    assert advs["TEST-0012"].severity is Severity.NEGLIGIBLE  # no own rating: its entries' highest
    assert advs["TEST-0013"].severity is Severity.UNKNOWN
    assert advs["TEST-0014"].severity is Severity.MEDIUM
    assert advs["TEST-0015"].severity is Severity.HIGH  # CVSS v2 10.0: v2 has no "critical"
    found = {f.id: f.severity for f in match([Package("foo", "1.0", "amd64")], list(advs.values()))}
    # Debian's own urgency for the matched release beats the generic CVSS rating.
    assert found == {
        "TEST-0010": Severity.CRITICAL,
        "TEST-0011": Severity.LOW,
        "TEST-0012": Severity.NEGLIGIBLE,
        "TEST-0013": Severity.UNKNOWN,
        "TEST-0014": Severity.MEDIUM,
        "TEST-0015": Severity.HIGH,
    }


@pytest.mark.parametrize(
    ("kind", "vector", "severity"),
    [
        ("CVSS_V3", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", Severity.CRITICAL),  # 9.8
        ("CVSS_V3", "CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:C/C:L/I:L/A:N", Severity.MEDIUM),  # 6.4
        ("CVSS_V3", "CVSS:3.0/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N", Severity.MEDIUM),  # 5.5
        ("CVSS_V3", "CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:U/C:L/I:N/A:N", Severity.LOW),  # 3.1
        ("CVSS_V3", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N", Severity.NEGLIGIBLE),  # 0.0
        ("CVSS_V2", "AV:N/AC:L/Au:N/C:P/I:P/A:P", Severity.HIGH),  # 7.5
        ("CVSS_V2", "AV:N/AC:L/Au:N/C:C/I:C/A:C", Severity.HIGH),  # 10.0: v2 has no "critical" band
        ("CVSS_V2", "AV:N/AC:M/Au:N/C:N/I:P/A:N", Severity.MEDIUM),  # 4.3
        ("CVSS_V2", "AV:N/AC:L/Au:N/C:N/I:N/A:N", Severity.NEGLIGIBLE),  # 0.0: no impact
        ("CVSS_V4", "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:H/SI:H/SA:H", Severity.CRITICAL),  # 10.0
        ("CVSS_V4", "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N/E:U", Severity.HIGH),  # 8.1
        ("CVSS_V4", "CVSS:4.0/AV:P/AC:H/AT:P/PR:H/UI:A/VC:L/VI:N/VA:N/SC:N/SI:N/SA:N", Severity.LOW),  # 1.0
    ],
)
def test_cvss_vectors_are_scored_by_version(kind: str, vector: str, severity: Severity) -> None:
    assert cvss_severity(kind, vector) is severity


def test_cvss_other_inputs() -> None:
    assert cvss_severity("CVSS_V3", "CVSS:3.1/AV:N") is None  # incomplete
    # A v4 vector given as v3 is not scored as v3 (and the other way round).
    assert cvss_severity("CVSS_V3", "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N") is None
    assert cvss_severity("CVSS_V4", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H") is None
    assert cvss_severity("Ubuntu", "high") is None
    assert severity_from_word("low**") is Severity.LOW
    assert severity_from_word("end-of-life") is Severity.UNKNOWN


V4_CRITICAL = "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:H/SI:H/SA:H"
V4_LOW = "CVSS:4.0/AV:P/AC:H/AT:P/PR:H/UI:A/VC:L/VI:N/VA:N/SC:N/SI:N/SA:N"
V3_MEDIUM = "CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:C/C:L/I:L/A:N"


def _prod_gate(tmp_path: Path, severity: list[dict[str, str]]) -> tuple[Severity, bool]:
    """One synthetic advisory rated only by `severity`, fixed in 2.0, matched against foo 1.0 and judged by the
    built-in policy's prod rules (with everything else about the version in order)."""
    record = _record("TEST-0040", [_entry("foo", [{"introduced": "0"}, {"fixed": "2.0"}])], severity=severity)
    (finding,) = match([Package("foo", "1.0", "amd64")], _load(tmp_path, record))
    candidate = Candidate(
        ref="web@1",
        status=Status.SIGNED,
        boot_test_passed=True,
        findings=(finding,),
        signature_error=None,
        scanned=True,
        revoked=False,
        revoked_ancestors=(),
        entered={"staging": datetime(2026, 1, 1, tzinfo=UTC)},
        vulndb_as_of={"osv": datetime(2026, 2, 1, tzinfo=UTC)},
    )
    decision = evaluate(default_policy(), "prod", candidate, now=datetime(2026, 2, 1, tzinfo=UTC))
    return finding.severity, decision.passed


def test_a_v4_only_critical_fails_the_default_prod_gate(tmp_path: Path) -> None:
    assert _prod_gate(tmp_path, [{"type": "CVSS_V4", "score": V4_CRITICAL}]) == (Severity.CRITICAL, False)


def test_a_v4_only_low_passes_the_default_prod_gate(tmp_path: Path) -> None:
    assert _prod_gate(tmp_path, [{"type": "CVSS_V4", "score": V4_LOW}]) == (Severity.LOW, True)


def test_v3_and_v4_on_one_advisory_the_higher_wins(tmp_path: Path) -> None:
    both = [{"type": "CVSS_V3", "score": V3_MEDIUM}, {"type": "CVSS_V4", "score": V4_CRITICAL}]
    assert _prod_gate(tmp_path, both) == (Severity.CRITICAL, False)
    both = [{"type": "CVSS_V4", "score": V4_LOW}, {"type": "CVSS_V3", "score": V3_MEDIUM}]
    assert _prod_gate(tmp_path, both) == (Severity.MEDIUM, True)


@pytest.mark.parametrize("score", ["nan", "inf", "-1", "11", "CVSS:4.0/garbage"])
def test_scores_off_the_scale_rate_nothing(tmp_path: Path, score: str) -> None:
    # Unknown, so the policy's unknown_cve_severity (high by default) judges it: prod fails closed.
    assert _prod_gate(tmp_path, [{"type": "CVSS_V4", "score": score}]) == (Severity.UNKNOWN, False)


def test_osv_scanner_is_a_scanner(real: list[Advisory], tmp_path: Path) -> None:
    scanner: Scanner = OsvScanner(tuple(real), release="12")
    assert scanner.name == "osv"
    found = scanner.scan(tmp_path, [Package("intel-microcode", "3.20230512.1~deb12u1", "amd64")])
    assert [(f.id, f.fixed) for f in found] == [("DSA-5474-1", "3.20230808.1~deb12u1")]


def test_affected_package_direct() -> None:
    entry = AffectedPackage("Debian:12", "foo", "1:1.0", fixed="1:1.2")
    assert not entry.affects("2.0")  # no epoch: before 1:1.0
    assert entry.affects("1:1.1~rc1")
    assert not entry.affects("1:1.2")


# --- loading: sources and malformed input ---------------------------------------------------------------------


@needs_osv
def test_zip_import_matches_folder(tmp_path: Path) -> None:
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(OSV_DIR.glob("*.json")):
            z.writestr(f.name, f.read_bytes())
        z.writestr("README.txt", "not a record")  # only *.json members are records
    assert load_osv(archive) == load_osv(OSV_DIR)


@needs_osv
def test_single_file_import() -> None:
    (advisory,) = load_osv(OSV_DIR / "DSA-5474-1.json")
    assert advisory.id == "DSA-5474-1"


def test_malformed_records_name_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "a-bad.json").write_text('{"id": "TEST-0020",\n "affected": [}')
    (tmp_path / "b-noid.json").write_text(json.dumps({"summary": "no id", "affected": []}))
    (tmp_path / "c-notlist.json").write_text(json.dumps({"id": "TEST-0021", "affected": "Debian:12 foo"}))
    (tmp_path / "d-badversion.json").write_text(
        json.dumps(_record("TEST-0022", [_entry("foo", [{"introduced": "0"}, {"fixed": "1.0 beta"}])]))
    )
    (tmp_path / "e-event.json").write_text(
        json.dumps(_record("TEST-0023", [_entry("foo", [{"introduced": "0", "fixed": "1.0"}])]))
    )
    (tmp_path / "f-good.json").write_text(json.dumps(_record("TEST-0024", [_entry("foo", [{"introduced": "0"}])])))
    with pytest.raises(ConfigError) as e:
        load_osv(tmp_path)
    problems = {(Path(p.file or "").name, p.field): p for p in e.value.problems}
    assert set(problems) == {
        ("a-bad.json", None),
        ("b-noid.json", "id"),
        ("c-notlist.json", "affected"),
        ("d-badversion.json", "affected[0].ranges[0].events[1].fixed"),
        ("e-event.json", "affected[0].ranges[0].events[0]"),
    }
    assert problems["a-bad.json", None].line == 2
    assert "array" in problems["c-notlist.json", "affected"].message
    text = e.value.diagnostics()
    assert "5 problems" in text and "c-notlist.json: affected: must be an array" in text
    assert e.value.fix


def test_malformed_zip_member_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("TEST-0030.json", json.dumps(_record("TEST-0030", [])))
        z.writestr("TEST-0031.json", json.dumps({"id": 31}))
    with pytest.raises(ConfigError) as e:
        load_osv(archive)
    (p,) = e.value.problems
    assert (p.file, p.field) == (f"{archive}!TEST-0031.json", "id")


@pytest.mark.parametrize("name", ["missing.json", "records.tar", "broken.zip", "empty-dir"])
def test_unreadable_sources(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "records.tar":
        path.write_text("x")
    elif name == "broken.zip":
        path.write_bytes(b"PK not really")
    elif name == "empty-dir":
        path.mkdir()
    with pytest.raises(ConfigError) as e:
        load_osv(path)
    assert e.value.problems[0].file == str(path)


def test_latest_modified_wins(tmp_path: Path) -> None:
    old = _record("TEST-0040", [], summary="old")
    new = {**_record("TEST-0040", [], summary="new"), "modified": "2025-06-01T00:00:00Z"}
    (tmp_path / "1.json").write_text(json.dumps(new))
    (tmp_path / "2.json").write_text(json.dumps(old))
    (advisory,) = load_osv(tmp_path)
    assert advisory.summary == "new"


# --- Trivy and Grype reports ----------------------------------------------------------------------------------

TRIVY = {
    "SchemaVersion": 2,
    "ArtifactName": "web.qcow2",
    "Results": [
        {
            "Target": "web (debian 12.8)",
            "Class": "os-pkgs",
            "Type": "debian",
            "Vulnerabilities": [
                {
                    "VulnerabilityID": "TEST-0001",
                    "VendorIDs": ["TEST-DSA-0001"],
                    "PkgName": "libssl3",
                    "InstalledVersion": "3.0.15-1~deb12u1",
                    "FixedVersion": "3.0.16-1~deb12u1",
                    "Severity": "HIGH",
                    "Title": "synthetic issue one",
                },
                {
                    "VulnerabilityID": "TEST-0002",
                    "PkgName": "wget",
                    "InstalledVersion": "1.21.3-1+b2",
                    "FixedVersion": "",
                    "Severity": "LOW",
                },
            ],
        },
        {"Target": "second target", "Vulnerabilities": [{"VulnerabilityID": "TEST-0001", "PkgName": "libssl3",
                                                          "InstalledVersion": "3.0.15-1~deb12u1"}]},
        {"Target": "clean", "Class": "lang-pkgs", "Vulnerabilities": None},
    ],
}  # fmt: skip

GRYPE = {
    "matches": [
        {
            "vulnerability": {
                "id": "TEST-0003",
                "severity": "Critical",
                "description": "synthetic issue three\nmore text",
                "fix": {"versions": ["2.36-9+deb12u10"], "state": "fixed"},
            },
            "relatedVulnerabilities": [{"id": "TEST-0004"}],
            "artifact": {"name": "libc6", "version": "2.36-9+deb12u9", "type": "deb"},
        },
        {
            "vulnerability": {
                "id": "TEST-0005",
                "severity": "Negligible",
                "fix": {"versions": [], "state": "not-fixed"},
            },
            "artifact": {"name": "bash", "version": "5.2.15-2+b7", "type": "deb"},
        },
    ],
    "descriptor": {"name": "grype"},
}


def test_trivy_import(tmp_path: Path) -> None:
    path = tmp_path / "trivy.json"
    path.write_text(json.dumps(TRIVY))
    found = import_report(path)
    assert [(f.id, f.package, f.installed, f.fixed, f.severity, f.source) for f in found] == [
        ("TEST-0001", "libssl3", "3.0.15-1~deb12u1", "3.0.16-1~deb12u1", Severity.HIGH, "trivy"),
        ("TEST-0002", "wget", "1.21.3-1+b2", None, Severity.LOW, "trivy"),
    ]
    assert found[0].title == "synthetic issue one" and found[0].aliases == ("TEST-DSA-0001",)
    assert found[1].title == "TEST-0002"
    assert all(f.kind is FindingKind.CVE for f in found)


def test_grype_import(tmp_path: Path) -> None:
    path = tmp_path / "grype.json"
    path.write_text(json.dumps(GRYPE))
    found = import_report(path)
    assert [(f.id, f.package, f.installed, f.fixed, f.severity, f.source) for f in found] == [
        ("TEST-0005", "bash", "5.2.15-2+b7", None, Severity.NEGLIGIBLE, "grype"),
        ("TEST-0003", "libc6", "2.36-9+deb12u9", "2.36-9+deb12u10", Severity.CRITICAL, "grype"),
    ]
    assert found[1].title == "synthetic issue three" and found[1].aliases == ("TEST-0004",)


def test_malformed_reports(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(TRIVY))
    del bad["Results"][0]["Vulnerabilities"][1]["PkgName"]
    bad["Results"][1]["Vulnerabilities"] = "none"
    path = tmp_path / "trivy.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError) as e:
        import_report(path)
    assert {(p.file, p.field) for p in e.value.problems} == {
        (str(path), "Results[0].Vulnerabilities[1].PkgName"),
        (str(path), "Results[1].Vulnerabilities"),
    }

    grype = tmp_path / "grype.json"
    grype.write_text(json.dumps({"matches": [{"vulnerability": {"id": "TEST-0006"}}]}))
    with pytest.raises(ConfigError) as e:
        import_report(grype)
    assert [p.field for p in e.value.problems] == ["matches[0].artifact"]

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"vulnerabilities": []}))
    with pytest.raises(ConfigError, match="neither a Trivy nor a Grype") as e:
        import_report(other)
    assert e.value.problems[0].file == str(other)

    broken = tmp_path / "broken.json"
    broken.write_text("{\n\n  oops")
    with pytest.raises(ConfigError) as e:
        import_report(broken)
    assert (e.value.problems[0].file, e.value.problems[0].line) == (str(broken), 3)

    with pytest.raises(ConfigError):
        import_report(tmp_path / "absent.json")

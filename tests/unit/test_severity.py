"""Which severity a CVE has (Debian's urgency, CVSS, the scanner's word) and how the gate judges it: the policy's
severity_source, Debian's minor issues, and the age of the vulnerability data. Ids are synthetic (CVE-2999-…)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from amiforge.errors import ConfigError
from amiforge.lifecycle.rescan import release_of
from amiforge.model import CvssScore, DebianVerdict, Finding, FindingKind, Package, ScanRecord, Severity, Status
from amiforge.policy import Candidate, Policy, default_policy, evaluate, parse_policy, rated, urgency_severity
from amiforge.scanners.ratings import RatingMemo, cve_ids, debian_release, not_affected, rate
from amiforge.scanners.sbom import sbom_digest

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CRITICAL_V31 = CvssScore("3.1", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8, Severity.CRITICAL, "cna")
LOW_V31 = CvssScore("3.1", "CVSS:3.1/AV:L/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N", 1.8, Severity.LOW, "nvd")


def cve(
    id: str = "CVE-2999-0001",
    *,
    severity: Severity = Severity.UNKNOWN,
    debian: DebianVerdict | None = None,
    cvss: CvssScore | None = None,
    fixed: str | None = "1.2-1",
    package: str = "libexample1",
    aliases: tuple[str, ...] = (),
) -> Finding:
    return Finding(FindingKind.CVE, id, severity, f"{id} (synthetic)", "osv", package=package, installed="1.0-1",
                   fixed=fixed, aliases=aliases, debian=debian, cvss=cvss)  # fmt: skip


def judged(finding: Finding, channel: str = "prod", policy: Policy | None = None) -> list[str]:
    """The unmet gate items of a version whose only problem could be `finding`."""
    candidate = Candidate(
        ref="web@1", status=Status.SIGNED, boot_test_passed=True, findings=(finding,), signature_error=None,
        scanned=True, revoked=False, revoked_ancestors=(), entered={"dev": NOW - timedelta(days=9),
        "staging": NOW - timedelta(days=2)}, vulndb_as_of={"osv": NOW - timedelta(hours=1)},
    )  # fmt: skip
    return [f"{u.name}: {u.detail}" for u in evaluate(policy or default_policy(), channel, candidate, now=NOW).unmet]


# --- urgency and the choice of rating -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("urgency", "severity"),
    [("unimportant", Severity.NEGLIGIBLE), ("low", Severity.LOW), ("low**", None), ("High", Severity.HIGH),
     ("medium", Severity.MEDIUM), ("high", Severity.HIGH), ("not yet assigned", None), ("end-of-life", None),
     ("some future word", None)],
)  # fmt: skip
def test_debian_urgencies_map_to_severities_and_unassigned_rates_nothing(urgency: str, severity: Severity) -> None:
    assert urgency_severity(urgency) == severity


def test_debian_first_by_default_then_the_scanner_then_cvss() -> None:
    low = DebianVerdict("open", "low")
    both = cve(severity=Severity.MEDIUM, debian=low, cvss=CRITICAL_V31)
    assert rated(both) == (Severity.LOW, "debian")
    assert rated(both, "cvss") == (Severity.CRITICAL, "cvss")
    assert rated(both, "max") == (Severity.CRITICAL, "cvss")
    # Debian has not rated it yet: the scanner's own word (OSV carries Debian's urgency when there is one) …
    unassigned = replace(both, debian=DebianVerdict("open", "not yet assigned"))
    assert rated(unassigned) == (Severity.MEDIUM, "osv")
    # … and with no word either, CVSS.
    assert rated(replace(unassigned, severity=Severity.UNKNOWN)) == (Severity.CRITICAL, "cvss")
    assert rated(cve()) == (Severity.UNKNOWN, None)
    assert rated(cve(), "max") == (Severity.UNKNOWN, None)


def test_a_severity_the_rating_chose_is_not_taken_for_the_scanners_own_word() -> None:
    # Rated once from CVSS, a finding asked again under `debian` still finds no scanner rating: CVSS again.
    once = cve(severity=Severity.CRITICAL, cvss=CRITICAL_V31, debian=DebianVerdict("open", "not yet assigned"))
    once = replace(once, severity_source="cvss")
    assert rated(once, "debian") == (Severity.CRITICAL, "cvss")
    assert rated(replace(once, cvss=LOW_V31), "debian") == (Severity.LOW, "cvss")


# --- the gate ---------------------------------------------------------------------------------------------------


def test_the_default_prod_gate_passes_unimportant_and_low_and_fails_a_high() -> None:
    unimportant = cve(debian=DebianVerdict("open", "unimportant"), cvss=CRITICAL_V31)
    low = cve("CVE-2999-0002", debian=DebianVerdict("open", "low"), cvss=CRITICAL_V31)
    high = cve("CVE-2999-0003", debian=DebianVerdict("open", "high"), cvss=LOW_V31)
    assert judged(unimportant) == [] and judged(low) == []
    (failure,) = judged(high)
    assert failure.startswith("cve CVE-2999-0003 in libexample1: CVE-2999-0003 (synthetic): severity high (debian) is")
    # The same findings judged by CVSS: the critical ones fail (unimportant stays out: Debian's verdict, not a rating).
    by_cvss = default_policy().model_copy(update={"severity_source": "cvss"})
    assert judged(unimportant, policy=by_cvss) == [] and len(judged(low, policy=by_cvss)) == 1
    assert judged(high, policy=by_cvss) == []


def test_debian_minor_issues_are_shown_but_count_only_where_the_policy_says() -> None:
    for note in ("postponed", "ignored", "no-dsa: minor issue"):
        no_dsa = cve(debian=DebianVerdict("open", "high", None, note), severity=Severity.HIGH)
        assert judged(no_dsa) == [], note
    strict = parse_policy(
        "channels:\n  prod: {max_cve_severity: medium, count_debian_minor: true}\n", Path("policy.yaml")
    )
    assert len(judged(cve(debian=DebianVerdict("open", "high", None, "postponed")), policy=strict)) == 1
    assert len(judged(cve(debian=DebianVerdict("open", "unimportant"), cvss=CRITICAL_V31), policy=strict)) == 0
    by_cvss = strict.model_copy(update={"severity_source": "cvss"})
    assert len(judged(cve(debian=DebianVerdict("open", "unimportant"), cvss=CRITICAL_V31), policy=by_cvss)) == 1


def _aged(as_of: dict[str, datetime], channel: str = "staging", policy: Policy | None = None) -> list[str]:
    candidate = Candidate(
        ref="web@1", status=Status.SIGNED, boot_test_passed=True, findings=(), signature_error=None, scanned=True,
        revoked=False, revoked_ancestors=(), entered={"dev": NOW - timedelta(days=9)}, vulndb_as_of=as_of,
    )  # fmt: skip
    return [u.detail for u in evaluate(policy or default_policy(), channel, candidate, now=NOW).unmet]


def test_data_older_than_max_vulndb_age_fails_closed_and_says_what_to_run() -> None:
    assert _aged({"osv": NOW - timedelta(days=7)}) == []
    (stale,) = _aged({"osv": NOW - timedelta(days=7, seconds=1)})
    assert stale == (
        "the osv data the scan of web@1 used is 7d1s old; staging allows 7d (max_vulndb_age): "
        "run `amiforge vulndb update`, then `amiforge rescan web@1`"
    )
    assert len(_aged({"osv": NOW - timedelta(hours=1), "debian": NOW - timedelta(days=30)})) == 1
    (none,) = _aged({})
    assert "matched against no advisories" in none
    (none_but_debian,) = _aged({"debian": NOW})  # Debian's verdicts alone match nothing
    assert "matched against no advisories" in none_but_debian
    assert _aged({"osv": NOW + timedelta(minutes=4)}) == []  # another machine's clock, a little ahead
    (future,) = _aged({"osv": NOW + timedelta(days=1)})
    assert "claims to be from 2026-06-02T12:00:00+00:00, later than now" in future
    loose = parse_policy("channels:\n  staging: {max_vulndb_age: 30d}\n", Path("p.yaml"))
    assert _aged({"osv": NOW - timedelta(days=29)}, policy=loose) == []


def test_policy_fields_are_checked_with_their_place() -> None:
    with pytest.raises(ConfigError) as bad:
        parse_policy("severity_source: nvd\nchannels:\n  dev: {max_vulndb_age: 0s}\n", Path("p.yaml"))
    fields = sorted(str(p.field) for p in bad.value.problems)
    assert fields == ["channels.dev.max_vulndb_age", "severity_source"]
    assert parse_policy("severity_source: max\nchannels: {dev: }\n", Path("p.yaml")).severity_source == "max"


# --- rating findings with the registry's data ----------------------------------------------------------------


PACKAGES = [Package("libexample1", "1.0-1+b1", "amd64", "example", "1.0-1"), Package("tool", "2.0-1", "amd64")]


def test_rate_takes_the_source_packages_verdict_and_the_preferred_cvss() -> None:
    finding = cve(aliases=("CVE-2999-0001",), fixed=None)
    verdicts = {("example", "CVE-2999-0001"): DebianVerdict("open", "medium", "1.1-1")}
    scores = {"CVE-2999-0001": [LOW_V31, CRITICAL_V31]}
    (kept,), dropped = rate([finding], PACKAGES, verdicts, scores, severity_source="debian")
    assert dropped == []
    assert kept.debian == verdicts[("example", "CVE-2999-0001")] and kept.cvss == CRITICAL_V31
    assert (kept.severity, kept.severity_source) == (Severity.MEDIUM, "debian")
    assert kept.fixed == "1.1-1"  # the tracker knows a fix OSV did not list


def test_a_rating_memo_gives_what_rating_afresh_gives_and_tells_source_versions_and_sources_apart() -> None:
    verdicts = {("example", "CVE-2999-0001"): DebianVerdict("resolved", "medium", "1.0-2")}
    scores = {"CVE-2999-0001": [CRITICAL_V31]}
    # One binary of source `example` at 1.0-1 (affected), another at 1.0-2 (Debian: fixed there), and the same
    # binary name at another binary version built from the same source version.
    older = [Package("libexample1", "1.0-1+b1", "amd64", "example", "1.0-1")]
    fixed = [Package("libexample1", "1.0-2", "amd64", "example", None)]
    rebuilt = [Package("libexample1", "1.0-1+b2", "amd64", "example", "1.0-1")]
    memo = RatingMemo()
    for packages in (older, fixed, rebuilt, older):
        finding = replace(cve(fixed=None), installed=packages[0].version)
        for source in ("debian", "cvss"):
            remembered = rate([finding], packages, verdicts, scores, severity_source=source, memo=memo)
            assert remembered == rate([finding], packages, verdicts, scores, severity_source=source)
    assert rate([replace(cve(fixed=None), installed="1.0-2")], fixed, verdicts, scores, severity_source="debian",
                memo=memo)[0] == []  # fixed there, though 1.0-1 was rated before  # fmt: skip
    (by_cvss,), _ = rate([replace(cve(fixed=None), installed="1.0-1+b1")], older, verdicts, scores,
                         severity_source="cvss", memo=memo)  # fmt: skip
    assert (by_cvss.severity, by_cvss.severity_source) == (Severity.CRITICAL, "cvss")
    assert len(memo.ratings) == 4  # (1.0-1, 1.0-2) × (debian, cvss): the rebuilt binary was rated from memory


def test_what_debian_says_is_fixed_in_the_installed_version_is_left_out() -> None:
    fixed_below = {("example", "CVE-2999-0001"): DebianVerdict("resolved", "low", "0.9-1")}
    never = {("example", "CVE-2999-0001"): DebianVerdict("resolved", "unimportant", "0")}
    for verdicts in (fixed_below, never):
        kept, dropped = rate([cve()], PACKAGES, verdicts, {}, severity_source="debian")
        assert (kept, [f.id for f in dropped]) == ([], ["CVE-2999-0001"])
    # Fixed only in a later version: still affected.
    later = {("example", "CVE-2999-0001"): DebianVerdict("resolved", "low", "1.0-2")}
    (still,), dropped = rate([cve()], PACKAGES, later, {}, severity_source="debian")
    assert dropped == [] and still.severity is Severity.LOW
    assert not_affected(DebianVerdict("open", "low", "0"), "1.0") is False  # only a resolved verdict says so


def test_an_advisory_covering_several_cves_takes_the_worst_that_still_affects() -> None:
    dsa = cve("DSA-9999-1", aliases=("CVE-2999-0001", "CVE-2999-0002", "CVE-2999-0003"))
    assert cve_ids(dsa) == ("CVE-2999-0001", "CVE-2999-0002", "CVE-2999-0003")
    verdicts = {
        ("example", "CVE-2999-0001"): DebianVerdict("open", "low"),
        ("example", "CVE-2999-0002"): DebianVerdict("open", "high", None, "postponed"),  # minor: ranks below
        ("example", "CVE-2999-0003"): DebianVerdict("resolved", "high", "0.5-1"),  # fixed here: not counted
    }
    (kept,), _ = rate([dsa], PACKAGES, verdicts, {}, severity_source="debian")
    assert kept.debian == verdicts[("example", "CVE-2999-0001")] and kept.severity is Severity.LOW
    # Only minor ones left: the finding is minor.
    del verdicts[("example", "CVE-2999-0001")]
    (kept,), _ = rate([replace(dsa, aliases=dsa.aliases[1:])], PACKAGES, verdicts, {}, severity_source="debian")
    assert kept.debian is not None and kept.debian.minor


def test_findings_that_are_not_cves_pass_through_and_packages_dpkg_does_not_know_get_no_debian_verdict() -> None:
    secret = Finding(FindingKind.SECRET, "private-key", Severity.CRITICAL, "key", "secrets", path="/k")
    # A Trivy finding for a pip package that shares a name with a Debian source package: Debian's verdict (and its
    # fixed version) is about Debian's package, not this one.
    pip = replace(cve(package="requests", severity=Severity.CRITICAL, fixed=None), source="trivy", installed="2.31.0")
    verdicts = {("requests", "CVE-2999-0001"): DebianVerdict("resolved", "low", "2.28.1+dfsg-1")}
    kept, dropped = rate([secret, pip], PACKAGES, verdicts, {}, severity_source="debian")
    assert dropped == [] and kept[0] is secret
    assert (kept[1].severity, kept[1].severity_source, kept[1].debian, kept[1].fixed) == (
        Severity.CRITICAL, "trivy", None, None)  # fmt: skip
    # A version dpkg could never hold is not compared at all (no traceback from the version parser).
    odd = [Package("libexample1", "not a version!", "amd64", "example", "not a version!")]
    (kept_odd,), _ = rate([cve()], odd, {("example", "CVE-2999-0001"): DebianVerdict("open", "high")}, {},
                          severity_source="debian")  # fmt: skip
    assert kept_odd.debian is None


def test_an_advisory_is_rated_by_its_worst_cve_each_rated_on_its_own() -> None:
    dsa = cve("DSA-9999-1", aliases=("CVE-2999-0001", "CVE-2999-0002", "CVE-2999-0003"))
    verdicts = {
        ("example", "CVE-2999-0001"): DebianVerdict("open", "unimportant"),  # minor
        ("example", "CVE-2999-0003"): DebianVerdict("resolved", "high", "0.5-1"),  # fixed here
    }
    # CVE-2999-0002: Debian has not triaged it, CVSS says critical. It is what the advisory is: not a minor issue.
    scores = {"CVE-2999-0002": [CRITICAL_V31], "CVE-2999-0003": [CRITICAL_V31]}
    (kept,), _ = rate([dsa], PACKAGES, verdicts, scores, severity_source="debian")
    assert (kept.severity, kept.severity_source, kept.debian) == (Severity.CRITICAL, "cvss", None)
    assert judged(kept) != []  # fails prod
    # The fixed CVE's CVSS never counts: with CVE-2999-0002 rated low, the advisory is low.
    (low,), _ = rate([dsa], PACKAGES, verdicts, {**scores, "CVE-2999-0002": [LOW_V31]}, severity_source="cvss")
    assert (low.severity, low.cvss) == (Severity.LOW, LOW_V31)


def test_unrated_cves_of_an_advisory_make_the_gate_judge_it_as_unknown() -> None:
    dsa = cve("DSA-9999-2", aliases=("CVE-2999-0001", "CVE-2999-0002"))
    verdicts = {("example", "CVE-2999-0001"): DebianVerdict("open", "low")}
    (kept,), _ = rate([dsa], PACKAGES, verdicts, {}, severity_source="debian")
    assert (kept.severity, kept.unrated_cves) == (Severity.LOW, ("CVE-2999-0002",))
    (failure,) = judged(kept)  # prod allows medium; an unrated CVE is judged high (unknown_cve_severity)
    assert "CVE-2999-0002 unrated, judged high" in failure
    assert judged(kept, "dev") == []  # dev allows critical


def test_the_scanners_own_word_survives_a_rating_and_counts_again_under_max() -> None:
    trivy = replace(cve(severity=Severity.CRITICAL, package="libexample1"), source="trivy")
    verdicts = {("example", "CVE-2999-0001"): DebianVerdict("open", "low")}
    (kept,), _ = rate([trivy], PACKAGES, verdicts, {}, severity_source="debian")
    assert (kept.severity, kept.reported) == (Severity.LOW, Severity.CRITICAL)
    assert rated(kept, "max") == (Severity.CRITICAL, "trivy")
    # Only NVD's copy (low**) and nothing else: it counts, named for what it is.
    nvd_copy = cve(debian=DebianVerdict("open", "high**"))
    assert rated(nvd_copy) == (Severity.HIGH, "debian (nvd)")
    assert rated(replace(nvd_copy, cvss=LOW_V31)) == (Severity.LOW, "cvss")


def test_the_release_comes_from_the_images_os_release(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "usr/lib/os-release").write_text('ID=debian\nVERSION_ID="13"\nVERSION_CODENAME=trixie\n')
    (tmp_path / "etc/os-release").symlink_to("../usr/lib/os-release")
    assert debian_release(tmp_path) == ("13", "trixie")
    (tmp_path / "usr/lib/os-release").write_text("ID=ubuntu\nVERSION_ID=24.04\nVERSION_CODENAME=noble\n")
    with pytest.raises(ConfigError, match=r"ID='ubuntu', VERSION_ID='24\.04'"):
        debian_release(tmp_path)
    (tmp_path / "usr/lib/os-release").write_text("ID=debian\nVERSION_ID=" + "1" * 40 + "\nVERSION_CODENAME=x\n")
    with pytest.raises(ConfigError, match="not a Debian release"):
        debian_release(tmp_path)  # nothing an image's builder wrote goes further unchecked
    (tmp_path / "usr/lib/os-release").write_text("ID=debian\nVERSION_CODENAME=sid\n")  # unstable: no release
    with pytest.raises(ConfigError, match="not a Debian release"):
        debian_release(tmp_path)
    (tmp_path / "etc/os-release").unlink()
    (tmp_path / "usr/lib/os-release").unlink()
    with pytest.raises(ConfigError, match="no os-release"):
        debian_release(tmp_path)


def test_a_scan_from_before_releases_were_recorded_is_placed_by_its_base_files() -> None:
    def scan_of(packages: list[Package], release: str | None = None) -> ScanRecord:
        return ScanRecord(NOW, tuple(packages), "{}", sbom_digest("{}"), (), "osv", release=release)

    assert release_of(scan_of([Package("base-files", "12.4+deb12u5", "amd64")])) == "12"
    assert release_of(scan_of([Package("base-files", "13.8", "amd64")])) == "13"
    assert release_of(scan_of([Package("base-files", "12.4", "amd64")], release="11")) == "11"  # recorded wins
    assert release_of(scan_of([Package("zlib1g", "1:1.2.13.dfsg-1", "amd64")])) is None

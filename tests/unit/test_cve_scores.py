"""CVSS ratings from CVE JSON 5 records and NVD API 2.0 pages: sources, scoring, skips, problems, files, preference.

All records are synthetic, in the real shapes (tests/fixtures/vulndb/README.md): CVE ids use the years 2999/2998
(CVE-2999-0001 …) so none can be mistaken for a real advisory.
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from amiforge.errors import ConfigError
from amiforge.model import CvssScore, Severity
from amiforge.scanners import cve_scores
from amiforge.scanners.cve_scores import CveRating, CveScores, load_cve_scores, parse_cve_document, preferred

FIXTURES = Path(__file__).parents[1] / "fixtures" / "vulndb"
RECORD = FIXTURES / "cve-record.json"
REJECTED = FIXTURES / "cve-record-rejected.json"
NVD_PAGE = FIXTURES / "nvd-page.json"

V31_CRITICAL = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"  # 9.8
V31_HIGH = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H"  # 7.5
V31_LOW = "CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:U/C:L/I:N/A:N"  # 3.1
V30_MEDIUM = "CVSS:3.0/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N"  # 5.5
V40_HIGH = "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:N/VI:N/VA:H/SC:N/SI:N/SA:N"  # 8.7
V40_CRITICAL = "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N"  # 9.3
V2_HIGH = "AV:N/AC:L/Au:N/C:P/I:P/A:P"  # 7.5
V2_MEDIUM = "AV:N/AC:L/Au:N/C:N/I:N/A:P"  # 5.0
V2_LOW = "AV:L/AC:L/Au:N/C:P/I:N/A:N"  # 2.1


def _s(version: str, vector: str, score: float, severity: Severity, source: str) -> CvssScore:
    return CvssScore(version=version, vector=vector, score=score, severity=severity, source=source)


def _rows(scores: CveScores) -> list[tuple[str, str, str, float, Severity, str]]:
    return [
        (r.cve, r.score.version, r.score.vector, r.score.score, r.score.severity, r.score.source)
        for r in scores.ratings
    ]


def _record(
    cve: str = "CVE-2999-0001", *, cna_metrics: Any = None, adp: Any = None, state: str = "PUBLISHED"
) -> dict[str, Any]:
    cna: dict[str, Any] = {
        "providerMetadata": {"orgId": "00000000-0000-4000-8000-000000000001", "shortName": "example"}
    }
    if cna_metrics is not None:
        cna["metrics"] = cna_metrics
    containers: dict[str, Any] = {"cna": cna}
    if adp is not None:
        containers["adp"] = adp
    return {
        "dataType": "CVE_RECORD",
        "dataVersion": "5.1",
        "cveMetadata": {"cveId": cve, "assignerOrgId": "00000000-0000-4000-8000-000000000001", "state": state},
        "containers": containers,
    }


def _v31(vector: str, **extra: Any) -> dict[str, Any]:
    return {"cvssV3_1": {"version": "3.1", "vectorString": vector, "baseScore": 0.0, "baseSeverity": "NONE", **extra}}


def _parse(document: Any, origin: str = "doc.json") -> CveScores:
    return parse_cve_document(json.dumps(document).encode(), origin=origin)


def _problems(document: Any) -> list[tuple[str | None, str]]:
    with pytest.raises(ConfigError) as caught:
        _parse(document)
    assert all(p.file == "doc.json" for p in caught.value.problems)
    return [(p.field, p.message) for p in caught.value.problems]


# --- CVE JSON 5 records ---------------------------------------------------------------------------------------


def test_cve_record_cna_and_adp_ratings() -> None:
    scores = parse_cve_document(RECORD.read_bytes(), origin=str(RECORD))
    assert _rows(scores) == [
        ("CVE-2999-0001", "4.0", V40_HIGH, 8.7, Severity.HIGH, "cna"),
        ("CVE-2999-0001", "3.1", V31_HIGH, 7.5, Severity.HIGH, "cna"),
        ("CVE-2999-0001", "2.0", V2_MEDIUM, 5.0, Severity.MEDIUM, "cna"),
        # The "CVE Program Container" ADP carries no metrics; CISA's SSVC `other` metric is no CVSS rating.
        ("CVE-2999-0001", "3.1", V31_CRITICAL, 9.8, Severity.CRITICAL, "adp:CISA-ADP"),
    ]
    assert scores.skipped == []


def test_the_score_comes_from_the_vector_not_the_record() -> None:
    # The fixture's CNA v3.1 object says baseScore 5.3 / MEDIUM; its vector scores 7.5 / HIGH.
    record = json.loads(RECORD.read_bytes())
    assert record["containers"]["cna"]["metrics"][1]["cvssV3_1"]["baseScore"] == 5.3
    rating = parse_cve_document(RECORD.read_bytes(), origin="r.json").ratings[1]
    assert (rating.score.score, rating.score.severity) == (7.5, Severity.HIGH)
    # And with the record's numbers removed, or absurd, the same rating.
    for base in ({}, {"baseScore": 10.0, "baseSeverity": "CRITICAL"}):
        metric = {"cvssV3_1": {"version": "3.1", "vectorString": V31_LOW, **base}}
        assert _rows(_parse(_record(cna_metrics=[metric]))) == [
            ("CVE-2999-0001", "3.1", V31_LOW, 3.1, Severity.LOW, "cna")
        ]


def test_v4_v3_v2_vectors_are_scored_by_their_version() -> None:
    metrics = [
        {"cvssV4_0": {"version": "4.0", "vectorString": V40_CRITICAL, "baseScore": 1.0, "baseSeverity": "LOW"}},
        {"cvssV3_0": {"version": "3.0", "vectorString": V30_MEDIUM, "baseScore": 1.0, "baseSeverity": "LOW"}},
        {"cvssV2_0": {"version": "2.0", "vectorString": V2_LOW, "baseScore": 9.0}},
        # v2 has no critical band: 10.0 is high.
        {"cvssV2_0": {"version": "2.0", "vectorString": "(AV:N/AC:L/Au:N/C:C/I:C/A:C)", "baseScore": 10.0}},
        {"cvssV2_0": {"version": "2.0", "vectorString": "CVSS:2.0/" + V2_HIGH, "baseScore": 7.5}},
        # A 3.0 vector filed as cvssV3_1: the vector says which version was scored.
        {"cvssV3_1": {"version": "3.1", "vectorString": "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N"}},
    ]
    assert [(v, s, sev) for _, v, _, s, sev, _ in _rows(_parse(_record(cna_metrics=metrics)))] == [
        ("4.0", 9.3, Severity.CRITICAL),
        ("3.0", 5.5, Severity.MEDIUM),
        ("2.0", 2.1, Severity.LOW),
        ("2.0", 10.0, Severity.HIGH),
        ("2.0", 7.5, Severity.HIGH),
        ("3.0", 0.0, Severity.NEGLIGIBLE),
    ]


def test_a_rejected_record_rates_nothing() -> None:
    assert parse_cve_document(REJECTED.read_bytes(), origin="r.json") == CveScores([], [])
    # Even with metrics left in it.
    assert _parse(_record(cna_metrics=[_v31(V31_CRITICAL)], state="REJECTED")) == CveScores([], [])


def test_a_record_of_an_unknown_state_is_skipped_with_its_reason() -> None:
    scores = _parse(_record(cna_metrics=[_v31(V31_CRITICAL)], state="RESERVED"))
    assert scores.ratings == []
    assert scores.skipped == [
        "doc.json: cveMetadata.state: CVE-2999-0001 is 'RESERVED', neither PUBLISHED nor REJECTED"
    ]


def test_a_broken_vector_skips_that_rating_only_with_file_and_field() -> None:
    adp = [{"providerMetadata": {"orgId": "00000000-0000-4000-8000-000000000003", "shortName": "CISA-ADP"},
            "metrics": [_v31("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:Q")]}]  # fmt: skip
    metrics = [_v31("CVSS:3.1/AV:N/AC:L"), _v31(V31_HIGH), {"cvssV4_0": {"version": "4.0", "vectorString": V31_HIGH}}]
    scores = _parse(_record(cna_metrics=metrics, adp=adp), origin="cves/2999/0xxx/CVE-2999-0001.json")
    assert _rows(scores) == [("CVE-2999-0001", "3.1", V31_HIGH, 7.5, Severity.HIGH, "cna")]
    assert len(scores.skipped) == 3
    first, second, third = scores.skipped
    assert first.startswith(
        "cves/2999/0xxx/CVE-2999-0001.json: containers.cna.metrics[0].cvssV3_1.vectorString: "
        "CVSS vector 'CVSS:3.1/AV:N/AC:L' does not parse: "
    )
    assert "Missing mandatory metrics" in first
    assert second.startswith(
        f"cves/2999/0xxx/CVE-2999-0001.json: containers.cna.metrics[2].cvssV4_0.vectorString: CVSS vector '{V31_HIGH}'"
    )
    assert third.startswith("cves/2999/0xxx/CVE-2999-0001.json: containers.adp[0].metrics[0].cvssV3_1.vectorString: ")


def test_an_adp_without_a_short_name_is_named_by_its_org_id() -> None:
    adp = [{"providerMetadata": {"orgId": "00000000-0000-4000-8000-000000000004"}, "metrics": [_v31(V31_LOW)]}]
    assert [r.score.source for r in _parse(_record(adp=adp)).ratings] == ["adp:00000000-0000-4000-8000-000000000004"]


def test_an_array_of_records() -> None:
    document = [
        _record("CVE-2999-0001", cna_metrics=[_v31(V31_LOW)]),
        _record("CVE-2999-0002", cna_metrics=[_v31(V31_HIGH)]),
    ]
    assert [(r.cve, r.score.score) for r in _parse(document).ratings] == [
        ("CVE-2999-0001", 3.1),
        ("CVE-2999-0002", 7.5),
    ]


def test_equal_ratings_are_one_and_share_one_score() -> None:
    document = [
        _record("CVE-2999-0001", cna_metrics=[_v31(V31_HIGH), _v31(V31_HIGH)]),  # listed twice by its CNA
        _record("CVE-2999-0002", cna_metrics=[_v31(V31_HIGH)]),
    ]
    ratings = _parse(document).ratings
    assert [r.cve for r in ratings] == ["CVE-2999-0001", "CVE-2999-0002"]
    assert ratings[0].score is ratings[1].score  # one CvssScore for every CVE rated alike (memory)
    assert not hasattr(ratings[0], "__dict__")


def test_structural_problems_are_reported_at_once_by_field() -> None:
    good = _record("CVE-2999-0005", cna_metrics=[_v31(V31_LOW)])
    no_id = _record(cna_metrics=[_v31(V31_LOW)])
    del no_id["cveMetadata"]["cveId"]
    bad_id = _record("CVE-99-1")
    metrics_object = _record("CVE-2999-0002", cna_metrics={"cvssV3_1": {}})
    bad_items = _record(
        "CVE-2999-0003",
        cna_metrics=[7, {"cvssV3_1": {"version": "3.1"}}, {"cvssV3_1": {"vectorString": 31}}, {"cvssV3_1": "x"}],
        adp=[{"providerMetadata": {"dateUpdated": "2999-01-01T00:00:00Z"}, "metrics": [_v31(V31_LOW)]}, "adp"],
    )
    no_containers = _record("CVE-2999-0004")
    del no_containers["containers"]
    no_cna = _record("CVE-2999-0006")
    no_cna["containers"] = {"adp": []}
    no_state = _record("CVE-2999-0007")
    del no_state["cveMetadata"]["state"]
    no_meta = _record("CVE-2999-0008")
    no_meta["cveMetadata"] = ["CVE-2999-0008"]
    document = [good, no_id, bad_id, metrics_object, bad_items, no_containers, no_cna, no_state, no_meta, {"id": "x"}]
    with pytest.raises(ConfigError) as caught:
        _parse(document)
    assert [(p.field, p.message) for p in caught.value.problems] == [
        ("[1].cveMetadata.cveId", "is required and missing"),
        ("[2].cveMetadata.cveId", "not a CVE id: 'CVE-99-1'"),
        ("[3].containers.cna.metrics", "must be an array, got object"),
        ("[4].containers.cna.metrics[0]", "must be an object, got number"),
        ("[4].containers.cna.metrics[1].cvssV3_1.vectorString", "is required and missing"),
        ("[4].containers.cna.metrics[2].cvssV3_1.vectorString", "must be a string, got number"),
        ("[4].containers.cna.metrics[3].cvssV3_1", "must be an object, got string"),
        ("[4].containers.adp[0].providerMetadata", "needs a shortName or an orgId to name the ADP"),
        ("[4].containers.adp[1]", "must be an object, got string"),
        ("[5].containers", "is required and missing"),
        ("[6].containers.cna", "is required and missing"),
        ("[7].cveMetadata.state", "is required and missing"),
        ("[8].cveMetadata", "must be an object, got array"),
        ("[9]", "must be a CVE record (dataType CVE_RECORD), got object"),
    ]
    assert caught.value.message == "the CVE ratings in doc.json is malformed (14 problems)"


# --- NVD API 2.0 ----------------------------------------------------------------------------------------------


def test_nvd_page_primary_and_secondary() -> None:
    scores = parse_cve_document(NVD_PAGE.read_bytes(), origin=str(NVD_PAGE))
    assert _rows(scores) == [
        ("CVE-2999-0001", "4.0", V40_HIGH, 8.7, Severity.HIGH, "nvd-secondary:cna@example.org"),
        ("CVE-2999-0001", "3.1", V31_CRITICAL, 9.8, Severity.CRITICAL, "nvd"),
        ("CVE-2999-0001", "3.1", V31_HIGH, 7.5, Severity.HIGH, "nvd-secondary:cna@example.org"),
        ("CVE-2999-0001", "2.0", V2_HIGH, 7.5, Severity.HIGH, "nvd"),
        # CVE-2999-0002 awaits analysis (no metrics); CVE-2998-0003 is Rejected; 0004's record says 9.9, its vector 5.5.
        ("CVE-2998-0004", "3.0", V30_MEDIUM, 5.5, Severity.MEDIUM, "nvd"),
    ]
    assert scores.skipped == []


def _nvd(*cves: dict[str, Any]) -> dict[str, Any]:
    return {
        "resultsPerPage": len(cves),
        "startIndex": 0,
        "totalResults": len(cves),
        "format": "NVD_CVE",
        "version": "2.0",
        "timestamp": "2999-01-06T00:00:00.000",
        "vulnerabilities": [{"cve": c} for c in cves],
    }


def _nvd_metric(vector: str, *, source: str = "nvd@nist.gov", kind: str = "Primary") -> dict[str, Any]:
    return {"source": source, "type": kind, "cvssData": {"version": "3.1", "vectorString": vector, "baseScore": 1.0}}


def test_nvd_broken_vector_is_skipped_with_its_path() -> None:
    page = _nvd(
        {"id": "CVE-2999-0001", "metrics": {"cvssMetricV31": [_nvd_metric("CVSS:3.1/XX"), _nvd_metric(V31_LOW)]}}
    )
    scores = _parse(page, origin="page-0.json")
    assert _rows(scores) == [("CVE-2999-0001", "3.1", V31_LOW, 3.1, Severity.LOW, "nvd")]
    assert len(scores.skipped) == 1
    assert scores.skipped[0].startswith(
        "page-0.json: vulnerabilities[0].cve.metrics.cvssMetricV31[0].cvssData.vectorString: "
        "CVSS vector 'CVSS:3.1/XX' does not parse: "
    )


def test_nvd_structural_problems_are_reported_at_once_by_field() -> None:
    page = _nvd(
        {"id": "CVE-2999-0001", "metrics": {"cvssMetricV31": [{"source": "nvd@nist.gov", "type": "Primary"}]}},
        {"metrics": {}},
        {"id": "CVE-2999-0003", "metrics": {"cvssMetricV31": {"source": "nvd@nist.gov"}}},
        {"id": "CVE-2999-0004", "metrics": {"cvssMetricV2": [_nvd_metric(V2_LOW, kind="Tertiary")]}},
        {"id": "CVE-2999-0005", "metrics": {"cvssMetricV30": [{"cvssData": {"vectorString": V30_MEDIUM}}]}},
        {"id": "CVE-2999-0006", "metrics": "none"},
        {"id": "CVE-2999-0007", "metrics": {"cvssMetricV40": [{"source": "s", "type": "Secondary", "cvssData": {}}]}},
    )
    page["vulnerabilities"].append({"kve": {}})
    page["vulnerabilities"].append(3)
    assert _problems(page) == [
        ("vulnerabilities[0].cve.metrics.cvssMetricV31[0].cvssData", "is required and missing"),
        ("vulnerabilities[1].cve.id", "is required and missing"),
        ("vulnerabilities[2].cve.metrics.cvssMetricV31", "must be an array, got object"),
        ("vulnerabilities[3].cve.metrics.cvssMetricV2[0].type", "must be Primary or Secondary, got 'Tertiary'"),
        ("vulnerabilities[4].cve.metrics.cvssMetricV30[0].source", "is required and missing"),
        ("vulnerabilities[4].cve.metrics.cvssMetricV30[0].type", "is required and missing"),
        ("vulnerabilities[5].cve.metrics", "must be an object, got string"),
        ("vulnerabilities[6].cve.metrics.cvssMetricV40[0].cvssData.vectorString", "is required and missing"),
        ("vulnerabilities[7].cve", "is required and missing"),
        ("vulnerabilities[8]", "must be an object, got number"),
    ]
    assert _problems({"format": "NVD_CVE", "version": "2.0"}) == [("vulnerabilities", "is required and missing")]
    assert _problems({"format": "NVD_CVE", "vulnerabilities": {}}) == [
        ("vulnerabilities", "must be an array, got object")
    ]


def test_a_document_of_neither_shape_is_refused() -> None:
    documents: list[object] = [{"CVE_Items": []}, {"id": "CVE-2999-0001"}, "CVE-2999-0001", {"dataType": "CVE"}]
    for document in documents:
        with pytest.raises(ConfigError) as caught:
            _parse(document)
        assert caught.value.message == "doc.json holds no CVE ratings amiforge can read"
    with pytest.raises(ConfigError, match="is not valid JSON"):
        parse_cve_document(b'{"dataType": "CVE_RECORD",', origin="doc.json")


# --- preference -----------------------------------------------------------------------------------------------


def test_preferred_newest_version_first_then_source() -> None:
    cna31 = _s("3.1", V31_LOW, 3.1, Severity.LOW, "cna")
    nvd31 = _s("3.1", V31_CRITICAL, 9.8, Severity.CRITICAL, "nvd")
    adp31 = _s("3.1", V31_HIGH, 7.5, Severity.HIGH, "adp:CISA-ADP")
    sec31 = _s("3.1", V31_HIGH, 7.5, Severity.HIGH, "nvd-secondary:cna@example.org")
    sec40 = _s("4.0", V40_HIGH, 8.7, Severity.HIGH, "nvd-secondary:cna@example.org")
    nvd30 = _s("3.0", V30_MEDIUM, 5.5, Severity.MEDIUM, "nvd")
    cna2 = _s("2.0", V2_HIGH, 7.5, Severity.HIGH, "cna")
    assert preferred([]) is None
    assert preferred([nvd31, adp31, sec31, cna31]) is cna31  # the CNA's, even when the NVD rates higher
    assert preferred([sec31, adp31, nvd31]) is nvd31
    assert preferred([sec31, adp31]) is adp31
    assert preferred([sec31]) is sec31
    assert preferred([cna31, nvd31, sec40]) is sec40  # the newest version wins over any source
    assert preferred([cna2, nvd30]) is nvd30
    assert preferred([cna2]) is cna2
    # Equal on version and source: the higher score, whatever the order.
    adp_low = _s("3.1", V31_LOW, 3.1, Severity.LOW, "adp:other")
    assert preferred([adp_low, adp31]) is adp31
    assert preferred([adp31, adp_low]) is adp31


# --- files ----------------------------------------------------------------------------------------------------


def _cvelist(root: Path) -> None:
    """A cvelistV5-like tree: cves/<year>/<bucket>/CVE-….json, with the delta files cvelistV5 keeps beside them."""
    (root / "cves" / "2999" / "0xxx").mkdir(parents=True)
    (root / "cves" / "2998" / "1xxx").mkdir(parents=True)
    (root / "cves" / "2999" / "0xxx" / "CVE-2999-0001.json").write_bytes(RECORD.read_bytes())
    (root / "cves" / "2999" / "0xxx" / "CVE-2999-0009.json").write_bytes(REJECTED.read_bytes())
    (root / "cves" / "2998" / "1xxx" / "CVE-2998-1000.json").write_text(
        json.dumps(_record("CVE-2998-1000", cna_metrics=[_v31(V31_LOW), _v31("CVSS:3.1/broken")]))
    )
    (root / "cves" / "delta.json").write_text(json.dumps({"fetchTime": "2999-01-06T00:00:00Z", "new": []}))
    (root / "cves" / "README.txt").write_text("not JSON, not read")


EXPECTED_TREE = [
    ("CVE-2998-1000", "3.1", V31_LOW, 3.1, Severity.LOW, "cna"),
    ("CVE-2999-0001", "4.0", V40_HIGH, 8.7, Severity.HIGH, "cna"),
    ("CVE-2999-0001", "3.1", V31_HIGH, 7.5, Severity.HIGH, "cna"),
    ("CVE-2999-0001", "2.0", V2_MEDIUM, 5.0, Severity.MEDIUM, "cna"),
    ("CVE-2999-0001", "3.1", V31_CRITICAL, 9.8, Severity.CRITICAL, "adp:CISA-ADP"),
]


def test_a_folder_is_read_recursively(tmp_path: Path) -> None:
    _cvelist(tmp_path)
    scores = load_cve_scores(tmp_path)
    assert _rows(scores) == EXPECTED_TREE
    cves = tmp_path / "cves"
    assert [s.split(": ", 1)[0] for s in scores.skipped] == [
        f"{cves}/2998/1xxx/CVE-2998-1000.json",
        f"{cves}/delta.json",
    ]
    assert "containers.cna.metrics[1].cvssV3_1.vectorString" in scores.skipped[0]
    assert "neither a CVE JSON 5 record" in scores.skipped[1]


def test_a_zip_reads_like_the_folder(tmp_path: Path) -> None:
    _cvelist(tmp_path / "tree")
    archive = tmp_path / "cves.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for file in sorted((tmp_path / "tree").rglob("*")):
            if file.is_file():
                z.write(file, file.relative_to(tmp_path / "tree").as_posix())
    scores = load_cve_scores(archive)
    assert _rows(scores) == EXPECTED_TREE
    assert [s.split(": ", 1)[0] for s in scores.skipped] == [
        f"{archive}!cves/2998/1xxx/CVE-2998-1000.json",
        f"{archive}!cves/delta.json",
    ]


def test_one_file_and_an_nvd_page_next_to_records(tmp_path: Path) -> None:
    assert _rows(load_cve_scores(RECORD)) == EXPECTED_TREE[1:]
    (tmp_path / "nvd").mkdir()
    (tmp_path / "nvd" / "page-0.json").write_bytes(NVD_PAGE.read_bytes())
    (tmp_path / "CVE-2999-0001.json").write_bytes(RECORD.read_bytes())
    ratings = load_cve_scores(tmp_path).ratings
    assert [r.score.source for r in ratings if r.cve == "CVE-2999-0001"] == [
        "cna",
        "cna",
        "cna",
        "adp:CISA-ADP",
        "nvd-secondary:cna@example.org",
        "nvd",
        "nvd-secondary:cna@example.org",
        "nvd",
    ]
    best = preferred([r.score for r in ratings if r.cve == "CVE-2999-0001"])
    assert best == _s("4.0", V40_HIGH, 8.7, Severity.HIGH, "cna")


def test_a_single_file_of_neither_shape_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "delta.json"
    other.write_text(json.dumps({"fetchTime": "2999-01-06T00:00:00Z"}))
    with pytest.raises(ConfigError, match="holds no CVE ratings"):
        load_cve_scores(other)


def test_problems_from_every_file_are_collected(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"dataType": "CVE_RECORD",\n "cveMetadata": ')
    bad = copy.deepcopy(_record("CVE-2999-0002"))
    bad["containers"]["cna"]["metrics"] = "none"
    (tmp_path / "b.json").write_text(json.dumps(bad))
    (tmp_path / "c.json").write_bytes(RECORD.read_bytes())
    with pytest.raises(ConfigError) as caught:
        load_cve_scores(tmp_path)
    assert [(Path(p.file or "").name, p.line, p.field) for p in caught.value.problems] == [
        ("a.json", 2, None),
        ("b.json", None, "containers.cna.metrics"),
    ]


@pytest.mark.parametrize("name", ["missing.json", "records.tar", "broken.zip", "empty-dir", "only-other-json"])
def test_unreadable_sources(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "broken.zip":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif name == "records.tar":
        path.write_bytes(b"")
    elif name == "empty-dir":
        path.mkdir()
    elif name == "only-other-json":
        path.mkdir()
        (path / "delta.json").write_text("{}")
    with pytest.raises(ConfigError) as caught:
        load_cve_scores(path)
    expected = {
        "missing.json": "no CVE records at",
        "records.tar": "cannot read CVE ratings from",
        "broken.zip": "cannot read the CVE archive",
        "empty-dir": "no CVE records or NVD pages found in",
        "only-other-json": "no CVE records or NVD pages found in",
    }[name]
    assert caught.value.message.startswith(expected)


def test_archive_caps_are_checked_before_unpacking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "cves.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("cves/2999/0xxx/CVE-2999-0001.json", RECORD.read_bytes())
        z.writestr("cves/2999/0xxx/CVE-2999-0002.json", RECORD.read_bytes())
    size = len(RECORD.read_bytes())
    monkeypatch.setattr(cve_scores, "MAX_CVE_FILE", size - 1)
    with pytest.raises(ConfigError) as caught:
        load_cve_scores(archive)
    (problem,) = caught.value.problems
    assert problem.message.startswith("cves/2999/0xxx/CVE-2999-0001.json unpacks to more than ")
    assert str(size - 1) in problem.message or f"{(size - 1) // 1024} KiB" in problem.message
    monkeypatch.setattr(cve_scores, "MAX_CVE_FILE", size)
    monkeypatch.setattr(cve_scores, "MAX_CVE_ARCHIVE", 2 * size - 1)
    with pytest.raises(ConfigError, match="is not a CVE export"):
        load_cve_scores(archive)
    monkeypatch.setattr(cve_scores, "MAX_CVE_ARCHIVE", 2 * size)
    assert len(load_cve_scores(archive).ratings) == 4  # the two files are the same CVE's: equal ratings are one


def test_a_file_over_the_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cve_scores, "MAX_CVE_FILE", 1024)
    with pytest.raises(ConfigError, match="larger than 1 KiB"):
        load_cve_scores(RECORD)


def test_rating_values() -> None:
    rating = CveRating("CVE-2999-0001", _s("3.1", V31_LOW, 3.1, Severity.LOW, "cna"))
    assert rating == CveRating("CVE-2999-0001", _s("3.1", V31_LOW, 3.1, Severity.LOW, "cna"))
    assert len({rating, CveRating("CVE-2999-0001", _s("3.1", V31_LOW, 3.1, Severity.LOW, "cna"))}) == 1

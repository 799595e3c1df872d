"""The Debian Security Tracker's JSON export: every field, the release filter, no-dsa notes, and malformed input.

All data is synthetic, in the tracker's real shape (tests/fixtures/vulndb/README.md): CVE ids use the year 2999
(CVE-2999-0001 …) and the TEMP id is TEMP-0000000-TEST01, so none can be mistaken for a real advisory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from amiforge.errors import ConfigError
from amiforge.model import DebianVerdict
from amiforge.scanners import debian_tracker
from amiforge.scanners.debian_tracker import (
    DEBIAN_RELEASES,
    TrackerEntry,
    codename_of,
    load_tracker,
    parse_tracker,
    verdict,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "vulndb" / "debian-tracker.json"

OPENSSL_1 = "Synthetic test flaw in the TLS record layer (not a real CVE)."
OPENSSL_2 = "Synthetic test flaw in a command-line tool (not a real CVE)."
ZLIB_3 = "Synthetic test flaw in contrib code Debian does not build (not a real CVE)."
WGET_4 = "Synthetic test flaw in URL parsing (not a real CVE)."

EXPECTED = [
    TrackerEntry("openssl", "CVE-2999-0001", "bookworm", "resolved", "high", "3.0.16-1~deb12u1", None, OPENSSL_1),
    TrackerEntry("openssl", "CVE-2999-0001", "trixie", "resolved", "high", "3.4.1-1", None, OPENSSL_1),
    TrackerEntry("openssl", "CVE-2999-0001", "sid", "resolved", "high", "3.4.1-1", None, OPENSSL_1),
    TrackerEntry("openssl", "CVE-2999-0002", "bookworm", "open", "low", None, "postponed", OPENSSL_2),
    TrackerEntry(
        "openssl",
        "CVE-2999-0002",
        "trixie",
        "open",
        "low",
        None,
        "no-dsa: Minor issue; can be fixed via point release",
        OPENSSL_2,
    ),
    TrackerEntry("openssl", "CVE-2999-0002", "sid", "resolved", "low", "3.5.0-1", None, OPENSSL_2),
    TrackerEntry("zlib", "CVE-2999-0003", "bookworm", "open", "unimportant", None, "ignored", ZLIB_3),
    TrackerEntry("wget", "CVE-2999-0004", "bullseye", "undetermined", "not yet assigned", None, None, WGET_4),
    TrackerEntry("wget", "CVE-2999-0004", "bookworm", "resolved", "unimportant", "0", None, WGET_4),
    TrackerEntry("wget", "CVE-2999-0004", "trixie", "open", "medium**", None, None, WGET_4),
    TrackerEntry("wget", "TEMP-0000000-TEST01", "bullseye", "open", "end-of-life", None, None, ""),
]


def _doc(releases: dict[str, Any], *, package: str = "openssl", cve: str = "CVE-2999-0001") -> bytes:
    return json.dumps({package: {cve: {"description": "synthetic", "releases": releases}}}).encode()


def _release(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"status": "open", "repositories": {"bookworm": "3.0.15-1~deb12u1"}, "urgency": "low"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}  # `...`: leave the key out


def _one(release: dict[str, Any]) -> TrackerEntry:
    entries = parse_tracker(_doc({"bookworm": release}), origin="t.json")
    assert len(entries) == 1
    return entries[0]


def _problems(data: bytes, **kwargs: Any) -> list[tuple[str | None, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_tracker(data, origin="tracker.json", **kwargs)
    assert all(p.file == "tracker.json" for p in caught.value.problems)
    return [(p.field, p.message) for p in caught.value.problems]


# --- the fields -----------------------------------------------------------------------------------------------


def test_every_field_of_the_fixture_is_read() -> None:
    assert load_tracker(FIXTURE) == EXPECTED


def test_compact_pretty_and_other_encodings_read_alike() -> None:
    document = json.loads(FIXTURE.read_bytes())
    compact = json.dumps(document, separators=(",", ":")).encode()
    # utf-8 with a BOM and utf-16 are valid JSON files too: read by the whole-document path, the same entries.
    for data in (compact, b"\xef\xbb\xbf" + compact, json.dumps(document, indent=1).encode("utf-16")):
        assert parse_tracker(data, origin="t.json") == EXPECTED


def test_release_filter_keeps_only_the_given_codenames() -> None:
    bookworm = load_tracker(FIXTURE, releases={"bookworm"})
    assert [(e.package, e.cve) for e in bookworm] == [
        ("openssl", "CVE-2999-0001"),
        ("openssl", "CVE-2999-0002"),
        ("zlib", "CVE-2999-0003"),
        ("wget", "CVE-2999-0004"),
    ]
    assert {e.release for e in bookworm} == {"bookworm"}
    two = load_tracker(FIXTURE, releases=["bullseye", "trixie"])
    assert [(e.cve, e.release) for e in two] == [
        ("CVE-2999-0001", "trixie"),
        ("CVE-2999-0002", "trixie"),
        ("CVE-2999-0004", "bullseye"),
        ("CVE-2999-0004", "trixie"),
        ("TEMP-0000000-TEST01", "bullseye"),
    ]
    assert load_tracker(FIXTURE, releases=()) == []
    assert load_tracker(FIXTURE, releases={"buster"}) == []


def test_resolved_with_fixed_version_zero_means_never_affected() -> None:
    entry = next(e for e in EXPECTED if e.cve == "CVE-2999-0004" and e.release == "bookworm")
    assert verdict(entry) == DebianVerdict(status="resolved", urgency="unimportant", fixed_version="0", no_dsa=None)
    assert _one(_release(status="resolved", fixed_version="0", urgency="not yet assigned")).fixed_version == "0"


def test_verdict_maps_every_field() -> None:
    entry = EXPECTED[3]
    assert verdict(entry) == DebianVerdict(status="open", urgency="low", fixed_version=None, no_dsa="postponed")
    assert verdict(entry).minor  # no DSA planned
    assert not verdict(EXPECTED[0]).minor
    assert verdict(EXPECTED[6]).minor  # unimportant (and ignored)


def test_a_fixed_version_is_read_only_for_resolved_entries() -> None:
    # The tracker writes fixed_version for resolved entries only; one elsewhere is never taken for a fix.
    assert _one(_release(status="open", fixed_version="3.0.16-1~deb12u1")).fixed_version is None
    assert _one(_release(status="resolved", fixed_version="3.0.16-1~deb12u1")).fixed_version == "3.0.16-1~deb12u1"
    assert _one(_release(status="resolved")).fixed_version is None  # resolved, but no version given
    assert _one(_release(status="resolved", fixed_version="")).fixed_version is None


@pytest.mark.parametrize(
    ("note", "reason", "expected"),
    [
        (..., ..., None),
        ("Minor issue", "postponed", "postponed"),
        ("Minor issue", "ignored", "ignored"),
        ("Minor issue", "", "no-dsa: Minor issue"),
        ("Minor issue", ..., "no-dsa: Minor issue"),
        (..., "postponed", "postponed"),
        (..., "", "no-dsa"),
        ("", "", "no-dsa"),
        ("  Minor\n   issue  ", "", "no-dsa: Minor issue"),  # one line
        ("Minor issue", "deferred", "deferred"),  # a reason word Debian may add later is kept
        ("x" * 300, "", "no-dsa: " + "x" * 117 + "..."),  # short enough to read in a table
    ],
)
def test_no_dsa_notes_and_reasons(note: Any, reason: Any, expected: str | None) -> None:
    assert _one(_release(nodsa=note, nodsa_reason=reason)).no_dsa == expected


@pytest.mark.parametrize(
    "urgency", ["unimportant", "low", "medium", "high", "not yet assigned", "end-of-life", "low**"]
)
def test_known_urgencies_are_kept_as_published(urgency: str) -> None:
    assert _one(_release(urgency=urgency)).urgency == urgency


def test_an_unknown_urgency_is_kept_and_does_not_fail() -> None:
    entry = _one(_release(urgency="critical-ish"))
    assert entry.urgency == "critical-ish"
    assert verdict(entry).urgency == "critical-ish"
    assert not verdict(entry).minor


def test_unknown_keys_at_every_level_are_ignored() -> None:
    data = json.dumps(
        {
            "openssl": {
                "CVE-2999-0001": {
                    "description": "synthetic",
                    "cvss": {"future": True},
                    "releases": {"bookworm": _release(next_point_update=True, exploited=["maybe"])},
                }
            }
        }
    ).encode()
    assert [e.status for e in parse_tracker(data, origin="t.json")] == ["open"]


def test_empty_and_absent_release_lists_give_no_entries() -> None:
    # The tracker writes {} when no supported release has the issue; an older export wrote [].
    data = json.dumps({"wget": {"CVE-2999-0001": {"releases": {}}, "CVE-2999-0002": {"releases": []}}}).encode()
    assert parse_tracker(data, origin="t.json") == []
    assert parse_tracker(b"{}", origin="t.json") == []
    assert parse_tracker(b' \n{ "wget" : { } }\n', origin="t.json") == []


def test_entries_are_small_and_share_their_words() -> None:
    entries = load_tracker(FIXTURE)
    assert not hasattr(entries[0], "__dict__")  # slots: about a million of these in the real export
    with pytest.raises(dataclasses.FrozenInstanceError):
        entries[0].status = "open"  # type: ignore[misc]
    # Repeated words are one string each, not one per entry.
    resolved = [e.status for e in entries if e.status == "resolved"]
    assert len(resolved) == 5 and all(s is resolved[0] for s in resolved)
    bookworm = [e.release for e in entries if e.release == "bookworm"]
    assert len(bookworm) == 4 and all(r is bookworm[0] for r in bookworm)


# --- malformed input ------------------------------------------------------------------------------------------


def test_every_malformed_value_is_reported_at_once_with_its_path() -> None:
    document = {
        "openssl": {
            "CVE-2999-0001": {
                "description": 5,
                "debianbug": "999000001",
                "scope": ["remote"],
                "releases": {
                    "bookworm": _release(status="fixed"),
                    "trixie": _release(status=...),
                    "sid": _release(urgency=3),
                    "forky": _release(status="resolved", fixed_version="not a version!"),
                    "bullseye": _release(repositories={"bullseye": 12, "bullseye-security": "1:"}),
                    "buster": _release(repositories=["1.0-1"]),
                    "duke": _release(nodsa=1),
                    "experimental": None,
                },
            },
            "CVE-2999-0002": "open",
            "CVE-2999-0003": {"releases": ["bookworm"]},
            "CVE-2999-0004": {"releases": {"bookworm": _release(urgency="", nodsa_reason=["postponed"])}},
        },
        "zlib": ["CVE-2999-0005"],
        "wget": {"CVE-2999-0006": {"debianbug": True, "releases": {"bookworm": _release()}}},
    }
    with pytest.raises(ConfigError) as caught:
        parse_tracker(json.dumps(document).encode(), origin="tracker.json")
    error = caught.value
    found = [(p.field, p.message) for p in error.problems]
    assert found == [
        ("openssl.CVE-2999-0001.description", "must be a string, got number"),
        ("openssl.CVE-2999-0001.scope", "must be a string, got array"),
        ("openssl.CVE-2999-0001.debianbug", "must be a Debian bug number, got string"),
        (
            "openssl.CVE-2999-0001.releases.bookworm.status",
            "unknown status 'fixed': expected resolved, open or undetermined",
        ),
        ("openssl.CVE-2999-0001.releases.trixie.status", "is required and missing"),
        ("openssl.CVE-2999-0001.releases.sid.urgency", "must be a string, got number"),
        ("openssl.CVE-2999-0001.releases.forky.fixed_version", "not a Debian version: 'not a version!'"),
        ("openssl.CVE-2999-0001.releases.bullseye.repositories.bullseye", "must be a version string, got number"),
        ("openssl.CVE-2999-0001.releases.bullseye.repositories.bullseye-security", "not a Debian version: '1:'"),
        ("openssl.CVE-2999-0001.releases.buster.repositories", "must be an object of suites, got array"),
        ("openssl.CVE-2999-0001.releases.duke.nodsa", "must be a string, got number"),
        ("openssl.CVE-2999-0001.releases.experimental", "must be an object, got null"),
        ("openssl.CVE-2999-0002", "must be an object, got string"),
        ("openssl.CVE-2999-0003.releases", "must be an object of releases, got array"),
        ("openssl.CVE-2999-0004.releases.bookworm.urgency", "is required and missing"),
        ("openssl.CVE-2999-0004.releases.bookworm.nodsa_reason", "must be a string, got array"),
        ("zlib", "must be an object of CVEs, got array"),
        ("wget.CVE-2999-0006.debianbug", "must be a Debian bug number, got boolean"),
    ]
    assert all(p.file == "tracker.json" for p in error.problems)
    assert error.message == "the Debian Security Tracker file tracker.json is malformed (18 problems)"
    assert error.fix is not None and "security-tracker.debian.org/tracker/data/json" in error.fix


def test_a_release_left_out_by_the_filter_is_not_checked() -> None:
    data = _doc({"bookworm": _release(), "sid": _release(status="bogus")})
    assert [e.release for e in parse_tracker(data, origin="t.json", releases={"bookworm"})] == ["bookworm"]
    assert _problems(data) == [
        ("openssl.CVE-2999-0001.releases.sid.status", "unknown status 'bogus': expected resolved, open or undetermined")
    ]


@pytest.mark.parametrize(
    ("text", "kind"), [("[]", "array"), ('"openssl"', "string"), ("42", "number"), ("null", "null")]
)
def test_a_top_level_that_is_not_an_object_is_not_the_tracker(text: str, kind: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tracker(text.encode(), origin="t.json")
    assert caught.value.message == "t.json is not the Debian Security Tracker's JSON"
    assert [p.message for p in caught.value.problems] == [
        f"expected an object of source packages at the top level, got {kind}"
    ]


@pytest.mark.parametrize(
    "data",
    [
        b'{"openssl": {"CVE-2999-0001": {}},\n "zlib": {',  # cut off mid-file
        b'{"openssl": {}} trailing',
        b'{"openssl": {}, }',
        b'{"openssl" {}}',
        b'{"openssl": NaN}',
        b"",
        b"\xff\xfe\xfa",
    ],
)
def test_invalid_json_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tracker(data, origin="t.json")
    assert "is not valid JSON" in caught.value.message
    assert caught.value.problems and caught.value.problems[0].file == "t.json"


def test_a_syntax_error_names_its_line() -> None:
    data = b'{\n  "openssl": {\n    "CVE-2999-0001": {"releases": {}},\n  }\n}\n'
    with pytest.raises(ConfigError) as caught:
        parse_tracker(data, origin="t.json")
    assert [p.line for p in caught.value.problems] == [4]


def test_load_tracker_refuses_a_missing_or_oversized_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_tracker(tmp_path / "json")
    big = tmp_path / "json"
    big.write_bytes(FIXTURE.read_bytes())
    monkeypatch.setattr(debian_tracker, "MAX_TRACKER", 1024)
    with pytest.raises(ConfigError, match="larger than 1 KiB"):
        load_tracker(big)


# --- releases -------------------------------------------------------------------------------------------------


def test_debian_release_codenames() -> None:
    assert dict(DEBIAN_RELEASES) == {"10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
    with pytest.raises(TypeError):
        DEBIAN_RELEASES["15"] = "duke"  # type: ignore[index]


@pytest.mark.parametrize(
    ("version_id", "codename"),
    [
        ("12", "bookworm"),
        ("13", "trixie"),
        ("11", "bullseye"),
        ("10", "buster"),
        ("14", "forky"),
        ("12.5", "bookworm"),  # /etc/debian_version gives the point release
        (" 13\n", "trixie"),
        ("9", None),
        ("sid", None),
        ("trixie/sid", None),
        ("", None),
    ],
)
def test_codename_of(version_id: str, codename: str | None) -> None:
    assert codename_of(version_id) == codename

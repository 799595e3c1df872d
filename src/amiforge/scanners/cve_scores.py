"""CVSS ratings of CVEs, from CVE records (cve.org, CVEProject/cvelistV5) and from the NVD's API 2.0.

Two shapes are read, recognised by their own markers:

- a CVE JSON 5 record (`"dataType": "CVE_RECORD"`, CVEProject/cve-schema `CVE_Record_Format.json`), or a JSON array of
  them: `containers.cna.metrics[]` and `containers.adp[].metrics[]` hold `cvssV4_0`, `cvssV3_1`, `cvssV3_0` and
  `cvssV2_0` objects (`version`, `vectorString`, `baseScore`, …); an ADP names itself in `providerMetadata.shortName`.
  A REJECTED record rates nothing.
- a page of the NVD CVE API 2.0 or one of its 2.0 data feeds (`"format": "NVD_CVE"`): `vulnerabilities[].cve.metrics`
  holds `cvssMetricV40`, `cvssMetricV31`, `cvssMetricV30` and `cvssMetricV2` arrays of
  `{"source", "type": "Primary" | "Secondary", "cvssData": {"version", "vectorString", "baseScore", …}}`.

A score is always the `cvss` library's scoring of the vector, never the record's baseScore or baseSeverity (those are
typed by hand and sometimes wrong). A vector the library refuses skips that one rating, with the reason, so a few
broken vectors in real data never fail an import; a record of the wrong shape is a Problem like any malformed input.
Everything here is pure: no database, no network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cvss import CVSS2, CVSS3, CVSS4, CVSSError

from amiforge.errors import ConfigError, Problem
from amiforge.inputs import MIB, json_type, parse_json, read_input, zip_json_members
from amiforge.model import CvssScore, Severity
from amiforge.scanners.interface import malformed
from amiforge.scanners.vulns import _Ctx, _obj, _objects, _str, severity_from_score, severity_from_word

_FIX = "give CVE JSON 5 records (cvelistV5's cves/ folder, or its cves.zip) or NVD CVE API 2.0 JSON pages"
_CVE_ID = re.compile(r"CVE-[0-9]{4}-[0-9]{4,19}")  # cve-schema's cveId pattern

# Caps: a CVE record is a few KiB, an NVD API page (2,000 CVEs at most) tens of MiB, an NVD yearly feed some hundreds.
# One file is in memory at a time, so the archive cap bounds the work a zip may ask for, not memory.
MAX_CVE_FILE = 512 * MIB
MAX_CVE_ARCHIVE = 16 << 30


@dataclass(frozen=True, slots=True)
class CveRating:
    """One CVSS rating of one CVE."""

    cve: str
    score: CvssScore


@dataclass(frozen=True)
class CveScores:
    """The ratings read, and one reason per rating left out (a vector that does not parse, a record of a state we
    do not know, a file that is neither format), each naming its file and field."""

    ratings: list[CveRating] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# --- choosing one rating --------------------------------------------------------------------------------------

_VERSION_RANK: Mapping[str, int] = {"4.0": 0, "3.1": 1, "3.0": 2, "2.0": 3}


def _source_rank(source: str) -> int:
    # The CNA knows the product (often it makes it) and scores what it ships; the NVD re-scores many CVEs from the
    # description alone, often higher; an ADP (CISA's) scores when nobody else has; a CNA's score as the NVD lists it
    # (Secondary) is a copy, its first publication comes from the CVE record.
    if source == "cna":
        return 0
    if source == "nvd":
        return 1
    if source.startswith("adp:"):
        return 2
    if source.startswith("nvd-secondary:"):
        return 3
    return 4


def preferred(scores: Sequence[CvssScore]) -> CvssScore | None:
    """The rating a gate uses when a CVE has several: the newest CVSS version (4.0, 3.1, 3.0, 2.0: each version
    rates the same flaw more precisely than the one before), then by source: cna, nvd, adp:*, nvd-secondary:*.
    Between ratings equal on both, the higher score: a gate must not pass on the milder of two equal claims."""
    return min(
        scores,
        key=lambda s: (_VERSION_RANK.get(s.version, len(_VERSION_RANK)), _source_rank(s.source), -s.score),
        default=None,
    )


# --- scoring a vector -----------------------------------------------------------------------------------------


def _score(kind: type[CVSS2] | type[CVSS3] | type[CVSS4], vector: str) -> tuple[str, float, Severity]:
    """(version, base score, rating) of `vector` as the library scores it; CVSSError if it is not a valid vector."""
    if kind is CVSS2:
        # NVD and CVE records give v2 vectors bare; some tools wrap them in parentheses or prefix "CVSS:2.0/".
        scored2 = CVSS2(vector.strip().strip("()").removeprefix("CVSS:2.0/"))
        score = float(scored2.base_score)
        # v2's own bands (7.0–10.0 is high: v2 has no critical), as vulns.cvss_severity rates them.
        return "2.0", score, Severity.NEGLIGIBLE if score == 0.0 else severity_from_word(str(scored2.severities()[0]))
    if kind is CVSS3:
        scored3 = CVSS3(vector.strip())
        score = float(scored3.base_score)
        # The vector says 3.0 or 3.1: the version scored is the vector's, whatever the field it came in.
        return f"3.{scored3.minor_version}", score, severity_from_score(score)
    score = float(CVSS4(vector.strip()).base_score)
    return "4.0", score, severity_from_score(score)


class _Scorer:
    """Scores vectors once each: real data repeats a few thousand vectors over hundreds of thousands of CVEs, so
    equal ratings share one CvssScore (frozen, so sharing is safe) and the library parses each vector once."""

    def __init__(self) -> None:
        self._seen: dict[tuple[type[object], str, str], CvssScore | str] = {}

    def rate(self, kind: type[CVSS2] | type[CVSS3] | type[CVSS4], vector: str, source: str) -> CvssScore | str:
        """The rating, or why the vector does not parse."""
        key = (kind, vector, source)
        found = self._seen.get(key)
        if found is None:
            try:
                version, score, severity = _score(kind, vector)
                found = CvssScore(version=version, vector=vector, score=score, severity=severity, source=source)
            except CVSSError as e:
                found = str(e) or type(e).__name__
            self._seen[key] = found
        return found


# --- reading --------------------------------------------------------------------------------------------------

# CVE JSON 5 metric keys and NVD metric arrays -> the library class that scores their vectors.
_CVE5_METRICS = (("cvssV4_0", CVSS4), ("cvssV3_1", CVSS3), ("cvssV3_0", CVSS3), ("cvssV2_0", CVSS2))
_NVD_METRICS = (("cvssMetricV40", CVSS4), ("cvssMetricV31", CVSS3), ("cvssMetricV30", CVSS3), ("cvssMetricV2", CVSS2))


class _Reader:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.scorer = _Scorer()
        self.ratings: dict[CveRating, None] = {}  # ordered, and one of each: a CNA may list one vector twice
        self.skipped: list[str] = []

    def result(self) -> CveScores:
        return CveScores(ratings=list(self.ratings), skipped=self.skipped)

    def read(self, origin: str, data: bytes, *, strict: bool) -> bool:
        """Read one file's ratings; False if it is neither format (a Problem when `strict`, else a skip)."""
        ctx = _Ctx(origin, self.problems)
        try:
            document = parse_json(data, file=origin, what="CVE file", fix=_FIX)
        except ConfigError as e:
            if strict:
                raise
            self.problems.extend(e.problems)  # collected with the other files' problems
            return True
        if isinstance(document, list):
            for i, record in enumerate(document):
                if isinstance(record, dict) and record.get("dataType") == "CVE_RECORD":
                    self._cve_record(ctx, record, f"[{i}]")
                else:
                    ctx.bad(f"[{i}]", f"must be a CVE record (dataType CVE_RECORD), got {json_type(record)}")
            return True
        if isinstance(document, dict) and document.get("dataType") == "CVE_RECORD":
            self._cve_record(ctx, document, "")
            return True
        if isinstance(document, dict) and document.get("format") == "NVD_CVE":
            self._nvd_page(ctx, document)
            return True
        what = "neither a CVE JSON 5 record (dataType CVE_RECORD) nor an NVD API 2.0 page (format NVD_CVE)"
        if strict:
            raise ConfigError(
                f"{origin} holds no CVE ratings amiforge can read",
                problems=[Problem(f"{what}, got {json_type(document)}", file=origin)],
                fix=_FIX,
            )
        self.skipped.append(f"{origin}: {what}")
        return False

    def _add(
        self,
        ctx: _Ctx,
        cve: str,
        kind: type[CVSS2] | type[CVSS3] | type[CVSS4],
        metric: Mapping[str, object],
        where: str,
        source: str,
    ) -> None:
        """The rating of one CVSS object (`vectorString` in `metric`), or a skip naming file and field."""
        vector = _str(ctx, metric, "vectorString", where, required=True)
        if vector is None:
            return
        rated = self.scorer.rate(kind, vector, source)
        if isinstance(rated, str):
            self.skipped.append(f"{ctx.file}: {where}.vectorString: CVSS vector {vector!r} does not parse: {rated}")
        else:
            self.ratings[CveRating(cve, rated)] = None

    @staticmethod
    def _required(ctx: _Ctx, obj: Mapping[str, object], key: str, path: str) -> Mapping[str, object] | None:
        """obj[key] as an object; a Problem if it is missing or not an object."""
        if obj.get(key) is None:
            ctx.bad(f"{path}.{key}" if path else key, "is required and missing")
            return None
        return _obj(ctx, obj, key, path)

    def _cve_id(self, ctx: _Ctx, obj: Mapping[str, object], key: str, where: str) -> str | None:
        cve = _str(ctx, obj, key, where, required=True)
        if cve is not None and not _CVE_ID.fullmatch(cve):
            ctx.bad(f"{where}.{key}" if where else key, f"not a CVE id: {cve!r}")
            return None
        return cve

    # CVE JSON 5 ---------------------------------------------------------------------------------------------

    def _cve_record(self, ctx: _Ctx, record: Mapping[str, object], path: str) -> None:
        meta_at = f"{path}.cveMetadata" if path else "cveMetadata"
        meta = self._required(ctx, record, "cveMetadata", path)
        if meta is None:
            return
        cve = self._cve_id(ctx, meta, "cveId", meta_at)
        state = _str(ctx, meta, "state", meta_at, required=True)
        if cve is None or state is None or state == "REJECTED":
            return
        if state != "PUBLISHED":
            self.skipped.append(f"{ctx.file}: {meta_at}.state: {cve} is {state!r}, neither PUBLISHED nor REJECTED")
            return
        containers_at = f"{path}.containers" if path else "containers"
        containers = self._required(ctx, record, "containers", path)
        if containers is None:
            return
        cna = self._required(ctx, containers, "cna", containers_at)
        if cna is not None:
            self._cve5_metrics(ctx, cve, cna, f"{containers_at}.cna", "cna")
        for where, adp in _objects(ctx, containers, "adp", containers_at):
            provider = _obj(ctx, adp, "providerMetadata", where)
            # The schema requires orgId and makes shortName optional; every ADP publishing today gives both.
            name = _str(ctx, provider, "shortName", f"{where}.providerMetadata") if provider is not None else None
            name = name or (_str(ctx, provider, "orgId", f"{where}.providerMetadata") if provider is not None else None)
            if name is None:
                ctx.bad(f"{where}.providerMetadata", "needs a shortName or an orgId to name the ADP")
                continue
            self._cve5_metrics(ctx, cve, adp, where, f"adp:{name}")

    def _cve5_metrics(self, ctx: _Ctx, cve: str, container: Mapping[str, object], where: str, source: str) -> None:
        for mwhere, metric in _objects(ctx, container, "metrics", where):
            # A metric holds one CVSS object (the schema allows several); `other` (SSVC, a vendor's scale) is no CVSS.
            for key, kind in _CVE5_METRICS:
                cvss = _obj(ctx, metric, key, mwhere)
                if cvss is not None:
                    self._add(ctx, cve, kind, cvss, f"{mwhere}.{key}", source)

    # NVD API 2.0 --------------------------------------------------------------------------------------------

    def _nvd_page(self, ctx: _Ctx, page: Mapping[str, object]) -> None:
        if page.get("vulnerabilities") is None:
            ctx.bad("vulnerabilities", "is required and missing")
            return
        for where, item in _objects(ctx, page, "vulnerabilities", ""):
            cve_at = f"{where}.cve"
            item_cve = self._required(ctx, item, "cve", where)
            if item_cve is None:
                continue
            cve = self._cve_id(ctx, item_cve, "id", cve_at)
            if cve is None or item_cve.get("vulnStatus") == "Rejected":
                continue
            metrics = _obj(ctx, item_cve, "metrics", cve_at)
            if metrics is None:
                continue  # not scored yet: the NVD's backlog
            for key, kind in _NVD_METRICS:
                for mwhere, metric in _objects(ctx, metrics, key, f"{cve_at}.metrics"):
                    source = _str(ctx, metric, "source", mwhere, required=True)
                    rank = _str(ctx, metric, "type", mwhere, required=True)
                    data = self._required(ctx, metric, "cvssData", mwhere)
                    if rank is not None and rank not in ("Primary", "Secondary"):
                        ctx.bad(f"{mwhere}.type", f"must be Primary or Secondary, got {rank!r}")
                        continue
                    if source is None or rank is None or data is None:
                        continue
                    # Primary: the NVD's own analysis; Secondary: another organisation's (the CNA's) as NVD lists it.
                    label = "nvd" if rank == "Primary" else f"nvd-secondary:{source}"
                    self._add(ctx, cve, kind, data, f"{mwhere}.cvssData", label)


def parse_cve_document(data: bytes, *, origin: str) -> CveScores:
    """The ratings in one JSON document: a CVE JSON 5 record, a JSON array of them, or an NVD API 2.0 page.

    Raises ConfigError for a document of neither shape, or listing every structural problem by JSON field.
    """
    reader = _Reader()
    reader.read(origin, data, strict=True)
    if reader.problems:
        raise malformed(f"the CVE ratings in {origin}", reader.problems, fix=_FIX)
    return reader.result()


# --- files ----------------------------------------------------------------------------------------------------


def _read(file: Path) -> bytes:
    return read_input(file, what="CVE file", max_bytes=MAX_CVE_FILE, fix=_FIX)


def _sources(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name for errors, bytes) of every JSON file: a folder's *.json at any depth (cvelistV5 files records as
    cves/2024/10xxx/CVE-2024-10524.json), one .json, or a .zip's *.json members. One file's bytes at a time."""
    if path.is_dir():
        # os.walk does not follow links to folders: a link loop or a link out of the tree is never walked. Sorted by
        # path, as a .zip's members are, so both give the same order.
        names = (Path(root, name) for root, _, files in os.walk(path) for name in files if name.endswith(".json"))
        for file in sorted(names):
            yield str(file), _read(file)
    elif path.suffix == ".zip":
        yield from zip_json_members(
            path, what="CVE archive", fix=_FIX, max_member=MAX_CVE_FILE, max_total=MAX_CVE_ARCHIVE,
            refusal="the archive {path} is not a CVE export",
        )  # fmt: skip
    else:
        yield str(path), _read(path)


def load_cve_scores(path: Path) -> CveScores:
    """The ratings in a .json file, in every *.json under a folder (recursively), or in a .zip's *.json members.

    In a folder or archive, a JSON file of neither shape (cvelistV5's delta.json, say) is skipped with its reason; a
    single file must be one. Raises ConfigError listing every structural problem, by file and JSON field.
    """
    if not path.exists():
        raise ConfigError(
            f"no CVE records at {path}", problems=[Problem("file or folder not found", file=str(path))], fix=_FIX
        )
    if not path.is_dir() and path.suffix not in (".json", ".zip"):
        raise ConfigError(
            f"cannot read CVE ratings from {path}",
            problems=[Problem("expected a folder, a .json file or a .zip archive", file=str(path))],
            fix=_FIX,
        )
    single = not path.is_dir() and path.suffix == ".json"
    reader = _Reader()
    read = 0
    for name, data in _sources(path):
        read += reader.read(name, data, strict=single)
    if read == 0:
        raise ConfigError(
            f"no CVE records or NVD pages found in {path}",
            problems=[Problem("no *.json file of either format", file=str(path))],
            fix=_FIX,
        )
    if reader.problems:
        raise malformed(f"the CVE ratings at {path}", reader.problems, fix=_FIX)
    return reader.result()

"""Vulnerability-data benchmark (`make bench-vulndb`): importing the three sources at their published size, and
`rescan` of 100 versions × 1,000 packages against its 5 s target.

What it measures, each in a fresh child process (so one figure's memory peak never mixes with another's), on one
SQLite registry that was empty before the first import (each source's tables are empty before its own import):

  1. `import_source("osv", all.zip)`: a synthetic osv.dev `Debian/all.zip`;
  2. `import_source("debian", json)`: a synthetic Debian Security Tracker export (`tracker/data/json`);
  3. `import_source("cve", folder)`: a folder of synthetic NVD CVE API 2.0 pages (2,000 CVEs a page, the API's
     largest page);
  4. `rescan()`: 100 versions (34 images; each version current in one channel, dev, staging or prod, through the
     store API), each with a scan of 1,000 Debian packages and release "12", against the data imported above.

Time is wall time (time.perf_counter) of the call alone: opening the registry, imports of modules and generating
the data are not counted. Peak memory is the child's peak resident set size (VmHWM of /proc/self/status, which counts
the interpreter and its imports too; "before" is the same figure just before the call). tracemalloc is not used: it
slows this allocation-heavy code down several times.

The rescan is stopped after --rescan-budget seconds (240 by default, so the whole run stays under ~10 minutes): the
versions it finished (each one's new scan is committed as it is made) give the time a version and a projection for
all; --rescan-budget 0 lets it finish. When the rescan misses its target, a copy of the registry with only
--profile-versions channel pointers left is rescanned under cProfile and the top costs are printed with file:line.

Sizes at --scale 1 (--scale 0.1 runs everything at a tenth for a quick look; the rescan target is then pro rata):

- osv `Debian/all.zip`: 60,000 records (85% DEBIAN-CVE, 9% DSA, 5.5% DLA, 0.5% DTSA), 2.7 KB each on average,
  pretty-printed as osv.dev writes them: 157 MiB unpacked, 44 MiB zipped. No published count or size was found:
  an ESTIMATE (osv.dev issue #5587 counts 30,531 Debian records modified on one day, so there are more than that).
- tracker JSON: 83,000 (package, CVE) issues, 398,209 release entries, 68 MiB of compact JSON. PUBLISHED size: public
  projects that download it say ~63, ~70 and ~80 MB (e.g. bigjakk/nexara, "a new ~80 MB Debian tracker download").
  The entry count follows from the size and the shape (~150 bytes a release entry); no published count was found.
- NVD: 300,000 CVEs (the brief's figure for the NVD's catalogue, not checked against a published count) in 150
  pages, ~2.3 KB a CVE: 669 MiB. The bytes are an ESTIMATE.
- images: 1,000 binary packages from 565 source packages each (1.77 binaries a source, as the 749 packages from 423
  sources of this Debian 12 machine); half of an image's source packages are named by an advisory, among them one
  named by 6,000 (as `linux` is; one binary, as linux-libc-dev), so ~10,000 advisories name an image's packages and
  a version has ~900 CVE findings: an ESTIMATE of a realistic share.

The data is synthetic and deterministic for --seed: CVE ids are CVE-2990-00000 … CVE-2992-99999 (years 2990–2999,
five digits: no such CVEs exist), advisories DEBIAN-CVE-<that CVE>, TEST-DSA-…, TEST-DLA-…, TEST-DTSA-…, tracker-only
ids TEMP-2990000-…, source packages `synthNNNN` (named by advisories) and `synthq…` (named by none), CNAs
`…@synthetic.test`. The shapes are the real ones: the osv records follow /work/shared/data/osv-debian/*.json (ranges,
`versions` lists, urgencies, database_specific.source), the tracker follows scanners/debian_tracker.py's description
of `_get_json`, the NVD pages follow the CVE API 2.0 (descriptions, metrics with every cvssData field, weaknesses,
configurations, references), and the packages follow dpkg's (binaries under source packages, epochs, binNMUs).

Results go to BENCHMARKS.md by hand. --data DIR keeps the generated files there and reuses them on the next run with
the same --scale and --seed (generating takes about a minute at --scale 1).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import math
import os
import platform
import pstats
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from measured import tree_state

RESCAN_TARGET_S = 5.0
ACTOR = "bench@synthetic"
GENERATOR = 1  # bump when the generated data changes, so --data regenerates

# Sizes at --scale 1 (see the module docstring for where each comes from).
OSV_RECORDS = 60_000
TRACKER_ISSUES = 83_000  # (package, CVE) issues: ~70 MB of compact JSON with the shape below
NVD_CVES = 300_000
NVD_PAGE = 2_000
VERSIONS = 100
PACKAGES = 1_000
SOURCES = 565  # source packages of one image: 1,000 binaries at 1.77 a source
MAX_BINARIES = 17  # binaries of one source package (gcc-12 has 17 on this machine)
UNIVERSE = 8_000  # source packages the advisories name
KERNEL_SHARE = 0.10  # of the osv records, naming the one package with most (as `linux` has)
AFFECTED_SHARE = 0.5  # of an image's source packages, named by an advisory
AFFECTED_FROM = 3_000  # an image's other named packages are drawn from the universe's first N ranks
SPECIFIC_SHARE = 0.15  # of an image's source packages, its own (the rest are shared by every image)
OLDER_SHARE = (0.0, 0.15, 0.30)  # dev, staging, prod: named source packages one update behind
CHANNELS = ("dev", "staging", "prod")

DATE = datetime(2026, 11, 30, tzinfo=UTC)  # every published/modified date: synthetic


def cve_id(n: int) -> str:
    """The n-th synthetic CVE id: CVE-2990-00000 … (100,000 a year, years 2990–2999)."""
    return f"CVE-{2990 + n // 100_000}-{n % 100_000:05d}"


def universe_name(rank: int) -> str:
    return f"synth{rank:04d}"


@dataclass(frozen=True)
class Sizes:
    scale: float
    osv_records: int
    tracker_issues: int
    nvd_cves: int
    versions: int
    universe: int
    affected_from: int

    @classmethod
    def at(cls, scale: float) -> Sizes:
        def n(x: int, least: int) -> int:
            return max(least, round(x * scale))

        universe = n(UNIVERSE, 1_000)
        return cls(scale, n(OSV_RECORDS, 500), n(TRACKER_ISSUES, 1_000), n(NVD_CVES, 2_000), n(VERSIONS, 3),
                   universe, min(universe - 1, n(AFFECTED_FROM, 600)))  # fmt: skip


# --- Debian versions ----------------------------------------------------------------------------------------------


@cache
def history(name: str, seed: int) -> tuple[str, ...]:
    """Versions of one source package in bookworm, oldest first (dpkg order): a few upstream releases, the one
    bookworm shipped, then its security/point updates (+deb12uN). The last is the newest."""
    rng = random.Random(f"{seed}-history-{name}")
    epoch = rng.choices(["", "1:", "2:"], [85, 12, 3])[0]
    major, minor, patch, rev = rng.randint(1, 9), rng.randint(0, 30), rng.randint(3, 20), rng.randint(1, 5)
    updates = rng.choices(range(7), [30, 20, 15, 12, 10, 8, 5])[0]
    # Earlier upstream releases (osv.dev lists every version before a fix, so these make its `versions` lists).
    older = [f"{epoch}{major - 1}.{m}.{p}-{r}" for m in range(6) for p in range(3) for r in (1, 2)]
    older += [f"{epoch}{major}.{minor}.{p}-1" for p in range(patch - 3, patch)]
    shipped = f"{epoch}{major}.{minor}.{patch}-{rev}"
    return (*older, shipped, *(f"{shipped}+deb12u{u}" for u in range(1, updates + 1)))


def next_update(versions: Sequence[str]) -> str:
    """The update after the newest (a fix not installed anywhere yet)."""
    newest = versions[-1]
    if "+deb12u" in newest:
        head, number = newest.rsplit("+deb12u", 1)
        return f"{head}+deb12u{int(number) + 1}"
    return f"{newest}+deb12u1"


def other_release(versions: Sequence[str], suffix: str, bump: int) -> list[str]:
    """Versions of the same package in another release (bullseye's are older, trixie's newer)."""
    epoch, _, rest = versions[-1].rpartition(":")
    epoch = f"{epoch}:" if epoch else ""
    major, minor, _patch = rest.split("-", 1)[0].split(".")
    minor_n = max(0, int(minor) + bump)
    return [f"{epoch}{major}.{minor_n}.{p}-{r}{suffix}" for p in range(6) for r in (1, 2)]


# --- packages of the images ---------------------------------------------------------------------------------------


def image_sources(sizes: Sizes, seed: int, image: int) -> list[str]:
    """The source packages of one image: a part shared by every image, and its own."""
    common_rng = random.Random(f"{seed}-common")
    own_rng = random.Random(f"{seed}-image-{image}")
    specific = round(SOURCES * SPECIFIC_SHARE)
    common = SOURCES - specific
    named_common = round(common * AFFECTED_SHARE)
    named_own = round(specific * AFFECTED_SHARE)
    # The package with most advisories (the kernel) is in every image; the others named are drawn from the
    # universe's first ranks (packages an image has are the much-used ones, which have the advisories).
    shared = [0, *common_rng.sample(range(1, sizes.affected_from + 1), named_common - 1)]
    taken = set(shared)
    own_pool = [r for r in range(1, sizes.affected_from + 1) if r not in taken]
    named = shared + own_rng.sample(own_pool, named_own)
    quiet = [f"synthq{q:03d}" for q in range(common - named_common)]
    quiet += [f"synthq{image:02d}x{q:03d}" for q in range(specific - named_own)]
    return [universe_name(r) for r in named] + quiet


def image_packages(sizes: Sizes, seed: int, image: int, position: int) -> list[Any]:
    """1,000 binary packages of one image's version: `position` 0 is the newest (dev); older positions have some of
    their named source packages one update behind."""
    from amiforge.model import Package

    sources = image_sources(sizes, seed, image)
    rng = random.Random(f"{seed}-binaries-{image}")
    counts = [1] * len(sources)
    weights = [rng.paretovariate(1.3) for _ in sources]
    weights[0] = 0.0  # the kernel-like package: one binary (as linux-libc-dev is the one built from `linux`)
    while sum(counts) < PACKAGES:
        i = rng.choices(range(len(sources)), weights)[0]
        if counts[i] < MAX_BINARIES:
            counts[i] += 1
    behind = random.Random(f"{seed}-behind-{image}-{position}")
    packages = []
    for source, count in zip(sources, counts, strict=True):
        versions = history(source, seed)
        old = source.startswith("synth") and not source.startswith("synthq") and len(versions) > 1
        installed = versions[-2] if old and behind.random() < OLDER_SHARE[position] else versions[-1]
        for k in range(count):
            name = source if k == 0 else f"lib{source}-{k}"
            arch = "all" if rng.random() < 0.2 else "amd64"
            if arch == "amd64" and rng.random() < 0.08:  # a binNMU: dpkg records the source version apart
                packages.append(Package(name, f"{installed}+b1", arch, source, installed))
            else:
                packages.append(Package(name, installed, arch, source if name != source else None, None))
    return packages


# --- osv.dev Debian/all.zip ---------------------------------------------------------------------------------------

URGENCIES = (("unimportant", 25), ("low", 20), ("medium", 15), ("high", 5), ("not yet assigned", 30),
             ("end-of-life", 1), ("low**", 2), ("medium**", 2))  # fmt: skip
WORDS = ("buffer", "overflow", "in", "the", "parser", "of", "allows", "remote", "attackers", "to", "cause", "a",
         "denial", "service", "via", "crafted", "input", "heap", "use-after-free", "function", "when", "handling",
         "synthetic", "flaw", "component", "memory", "corruption", "out-of-bounds", "read", "write", "NULL",
         "pointer", "dereference", "integer", "certificate", "validation", "path", "traversal")  # fmt: skip


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high))).capitalize() + "."


@dataclass(frozen=True)
class Pair:
    """One (source package, CVE) of a DEBIAN-CVE record, as the tracker will say it for bookworm."""

    package: str
    cve: str
    status: str  # resolved | open
    fixed: str | None  # resolved: the fixed version ("0": never affected)
    urgency: str
    description: str


def _affected(package: str, ecosystem: str, fixed: str | None, versions: list[str], urgency: str,
              source: str) -> dict[str, Any]:  # fmt: skip
    events: list[dict[str, str]] = [{"introduced": "0"}] + ([{"fixed": fixed}] if fixed else [])
    return {
        "package": {"name": package, "ecosystem": ecosystem, "purl": f"pkg:deb/debian/{package}?arch=source"},
        "ranges": [{"type": "ECOSYSTEM", "events": events}],
        "versions": versions,
        "ecosystem_specific": {"urgency": urgency},
        "database_specific": {"source": source},
    }


def _bookworm(rng: random.Random, versions: Sequence[str]) -> tuple[str | None, str]:
    """(fixed version or None, tracker status) of one CVE in bookworm, relative to the newest installed."""
    roll = rng.random()
    if roll < 0.15:
        return "0", "resolved"  # never affected: osv lists no Debian:12 entry
    if roll < 0.87 or len(versions) < 2:
        return rng.choice(versions[:-1] or versions), "resolved"  # fixed long ago: affects no image
    if roll < 0.93:
        return versions[-1], "resolved"  # fixed by the newest update: affects the versions one behind
    if roll < 0.96:
        return next_update(versions), "resolved"  # fixed in an update not installed yet
    return None, "open"


def osv_records(sizes: Sizes, seed: int) -> Iterator[tuple[dict[str, Any], list[Pair]]]:
    """The advisories, each with the (package, CVE) pairs the tracker says the same of."""
    rng = random.Random(f"{seed}-osv")
    ids = list(range(sizes.nvd_cves))
    rng.shuffle(ids)
    cves = iter(ids)
    kinds = rng.choices(["DEBIAN-CVE", "DSA", "DLA", "DTSA"], [850, 90, 55, 5], k=sizes.osv_records)
    ranks = range(1, sizes.universe)
    zipf = list(itertools.accumulate(1 / r for r in ranks))
    kernel = round(sizes.osv_records * KERNEL_SHARE)
    fixes_by_package: dict[str, list[str]] = {}
    counters = dict.fromkeys(("DSA", "DLA", "DTSA"), 0)
    for j, kind in enumerate(kinds):
        names = [universe_name(0 if j < kernel else rng.choices(ranks, cum_weights=zipf)[0])]
        if kind == "DEBIAN-CVE" and rng.random() < 0.1:
            names.append(universe_name(rng.choices(ranks, cum_weights=zipf)[0]))
        modified = (DATE - timedelta(seconds=rng.randint(0, 86_400 * 400))).isoformat().replace("+00:00", "Z")
        if kind == "DEBIAN-CVE":
            cve = cve_id(next(cves))
            record_id = f"DEBIAN-CVE-{cve.removeprefix('CVE-')}"
            source = f"https://storage.googleapis.com/debian-osv/debian-cve-osv/{record_id}.json"
            details = sentence(rng, 15, 60)
            affected, pairs = [], []
            for name in dict.fromkeys(names):
                versions = history(name, seed)
                urgency = rng.choices([u for u, _ in URGENCIES], [w for _, w in URGENCIES])[0]
                fixed, status = _bookworm(rng, versions)
                pairs.append(Pair(name, cve, status, fixed, urgency, details[:200]))
                if fixed is not None and fixed != "0":
                    fixes_by_package.setdefault(name, []).append(cve)
                if rng.random() < 0.7:
                    old = other_release(versions, "+deb11u1", -2)
                    affected.append(_affected(name, "Debian:11", rng.choice([*old, None]), old, urgency, source))
                if fixed != "0":
                    listed = list(versions[: versions.index(fixed)] if fixed in versions else versions)
                    affected.append(_affected(name, "Debian:12", fixed, listed, urgency, source))
                new = other_release(versions, "", 1)
                affected.append(_affected(name, "Debian:13", rng.choice([new[-1], None]), new[:3], urgency, source))
            record: dict[str, Any] = {"schema_version": "1.7.3", "id": record_id, "modified": modified,
                                      "published": modified, "upstream": [cve], "details": details,
                                      "affected": affected}  # fmt: skip
            yield record, pairs
            continue
        # DSA/DLA/DTSA: an update of one package fixing CVEs of it (those of its DEBIAN-CVE records, when known).
        counters[kind] += 1
        record_id = f"TEST-{kind}-{counters[kind]:05d}-1"
        name = names[0]
        known = fixes_by_package.get(name, [])
        fixed_cves = rng.sample(known, min(len(known), rng.randint(1, 4))) or [cve_id(next(cves))]
        versions = history(name, seed)
        source = f"https://storage.googleapis.com/debian-osv/{kind.lower()}-osv/{record_id}.json"
        if kind == "DSA":
            ecosystem, fixed = "Debian:12", rng.choice(versions[-3:])
            listed = list(versions[: versions.index(fixed)])
        else:  # DLA, DTSA: releases before bookworm, so they never match release 12
            old = other_release(versions, "+deb11u1", -2)
            ecosystem, fixed, listed = ("Debian:11" if kind == "DLA" else "Debian:10"), old[-1], old[:-1]
        affected = [_affected(name, ecosystem, fixed, listed, "", source)]
        del affected[0]["ecosystem_specific"]
        yield {"schema_version": "1.7.3", "id": record_id, "published": modified, "modified": modified,
               "upstream": [*fixed_cves, *(f"DEBIAN-{c}" for c in fixed_cves)],
               "summary": f"{name} - security update", "affected": affected}, []  # fmt: skip


def write_osv(sizes: Sizes, seed: int, path: Path) -> tuple[list[Pair], dict[str, int]]:
    pairs: list[Pair] = []
    raw = 0
    count = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for record, more in osv_records(sizes, seed):
            data = json.dumps(record, indent=2)
            archive.writestr(f"{record['id']}.json", data)
            raw += len(data)
            count += 1
            pairs += more
    return pairs, {"records": count, "unpacked": raw, "bytes": path.stat().st_size}


# --- the Debian Security Tracker's JSON ---------------------------------------------------------------------------


def _release(rng: random.Random, status: str, fixed: str | None, urgency: str, installed: str,
             suite: str) -> dict[str, Any]:  # fmt: skip
    entry: dict[str, Any] = {"status": status, "repositories": {suite: installed}}
    if rng.random() < 0.3:
        entry["repositories"][f"{suite}-security"] = installed
    if status == "resolved" and fixed is not None:
        entry["fixed_version"] = fixed
    entry["urgency"] = urgency
    if status == "open" and rng.random() < 0.4:
        reason = rng.choice(["", "postponed", "ignored"])
        entry["nodsa"] = "" if reason else sentence(rng, 4, 12)
        entry["nodsa_reason"] = reason
    if status == "open" and rng.random() < 0.1:
        entry["next_point_update"] = True
    return entry


def tracker_document(sizes: Sizes, seed: int, pairs: Sequence[Pair]) -> dict[str, dict[str, Any]]:
    """package -> CVE -> issue: the DEBIAN-CVE pairs first, then tracker-only issues to the published size."""
    rng = random.Random(f"{seed}-tracker")
    document: dict[str, dict[str, Any]] = {}
    for p in pairs[: sizes.tracker_issues]:
        versions = history(p.package, seed)
        releases: dict[str, Any] = {}
        if rng.random() < 0.7:
            releases["bullseye"] = _release(rng, "resolved", other_release(versions, "+deb11u1", -2)[-1], p.urgency,
                                            other_release(versions, "+deb11u1", -2)[-1], "bullseye")  # fmt: skip
        releases["bookworm"] = _release(rng, p.status, p.fixed, p.urgency, versions[-1], "bookworm")
        newer = other_release(versions, "", 1)
        for codename in ("trixie", "forky", "sid"):
            releases[codename] = _release(rng, "resolved", newer[0], p.urgency, newer[-1], codename)
        issue: dict[str, Any] = {"description": p.description, "scope": rng.choice(["local", "remote"])}
        if rng.random() < 0.3:
            issue["debianbug"] = rng.randint(900_000, 1_100_000)
        issue["releases"] = releases
        document.setdefault(p.package, {})[p.cve] = issue
    # Tracker-only issues: CVEs no advisory names (most never affected, or unimportant), and TEMP- ids.
    used = {p.cve for p in pairs}
    spare = (cve_id(n) for n in range(sizes.nvd_cves) if cve_id(n) not in used)
    zipf = list(itertools.accumulate(1 / r for r in range(1, sizes.universe)))
    for i in range(max(0, sizes.tracker_issues - len(pairs))):
        package = universe_name(rng.choices(range(1, sizes.universe), cum_weights=zipf)[0])
        cve = f"TEMP-2990000-{i:06X}" if rng.random() < 0.05 else next(spare, f"TEMP-2990001-{i:06X}")
        versions = history(package, seed)
        urgency = rng.choice(["unimportant", "not yet assigned", "low"])
        releases = {codename: _release(rng, "resolved", "0", urgency, versions[-1], codename)
                    for codename in ("bullseye", "bookworm", "trixie", "forky", "sid")}  # fmt: skip
        document.setdefault(package, {})[cve] = {"description": sentence(rng, 6, 25), "scope": "remote",
                                                 "releases": releases}  # fmt: skip
    return dict(sorted(document.items()))


def write_tracker(sizes: Sizes, seed: int, pairs: Sequence[Pair], path: Path) -> dict[str, int]:
    document = tracker_document(sizes, seed, pairs)
    # Compact, as the tracker serves it.
    path.write_text(json.dumps(document, separators=(",", ":")))
    issues = sum(len(cves) for cves in document.values())
    entries = sum(len(issue["releases"]) for cves in document.values() for issue in cves.values())
    return {"packages": len(document), "issues": issues, "release_entries": entries, "bytes": path.stat().st_size}


# --- NVD CVE API 2.0 pages ----------------------------------------------------------------------------------------

_V31 = (("AV", "NALP", "attackVector", ("NETWORK", "ADJACENT_NETWORK", "LOCAL", "PHYSICAL")),
        ("AC", "LH", "attackComplexity", ("LOW", "HIGH")), ("PR", "NLH", "privilegesRequired", ("NONE", "LOW", "HIGH")),
        ("UI", "NR", "userInteraction", ("NONE", "REQUIRED")), ("S", "UC", "scope", ("UNCHANGED", "CHANGED")),
        ("C", "NLH", "confidentialityImpact", ("NONE", "LOW", "HIGH")),
        ("I", "NLH", "integrityImpact", ("NONE", "LOW", "HIGH")),
        ("A", "NLH", "availabilityImpact", ("NONE", "LOW", "HIGH")))  # fmt: skip
_V2 = (("AV", "LAN", "accessVector", ("LOCAL", "ADJACENT_NETWORK", "NETWORK")),
       ("AC", "HML", "accessComplexity", ("HIGH", "MEDIUM", "LOW")),
       ("Au", "MSN", "authentication", ("MULTIPLE", "SINGLE", "NONE")),
       ("C", "NPC", "confidentialityImpact", ("NONE", "PARTIAL", "COMPLETE")),
       ("I", "NPC", "integrityImpact", ("NONE", "PARTIAL", "COMPLETE")),
       ("A", "NPC", "availabilityImpact", ("NONE", "PARTIAL", "COMPLETE")))  # fmt: skip
_V40 = (("AV", "NALP"), ("AC", "LH"), ("AT", "NP"), ("PR", "NLH"), ("UI", "NPA"), ("VC", "HLN"), ("VI", "HLN"),
        ("VA", "HLN"), ("SC", "HLN"), ("SI", "HLN"), ("SA", "HLN"))  # fmt: skip


@cache
def _scored(kind: str, vector: str) -> tuple[float, str]:
    """(base score, rating) as the `cvss` library scores the vector: what NVD would have written beside it."""
    from cvss import CVSS2, CVSS3, CVSS4

    if kind == "2.0":
        v2 = CVSS2(vector)
        return float(v2.base_score), str(v2.severities()[0]).upper()
    scored = CVSS3(vector) if kind == "3.1" else CVSS4(vector)
    score = float(scored.base_score)
    rating = (
        "CRITICAL" if score >= 9 else "HIGH" if score >= 7 else "MEDIUM" if score >= 4 else "LOW" if score else "NONE"
    )
    return score, rating


def _cvss_data(rng: random.Random, kind: str) -> dict[str, Any]:
    if kind in ("3.1", "2.0"):
        metrics = _V31 if kind == "3.1" else _V2
        picks = [(key, letters[i], field, words[i]) for key, letters, field, words in metrics
                 for i in [rng.randrange(len(letters))]]  # fmt: skip
        vector = ("CVSS:3.1/" if kind == "3.1" else "") + "/".join(f"{key}:{letter}" for key, letter, _, _ in picks)
        score, rating = _scored(kind, vector)
        data: dict[str, Any] = {"version": kind, "vectorString": vector, "baseScore": score}
        if kind == "3.1":
            data["baseSeverity"] = rating
        data.update({field: word for _, _, field, word in picks})
        return data
    # CVSS 4.0: a few hundred distinct vectors, as real data repeats them (and v4 scoring is slow).
    pool = random.Random(rng.randrange(300))
    vector = "CVSS:4.0/" + "/".join(f"{key}:{pool.choice(letters)}" for key, letters in _V40)
    score, rating = _scored(kind, vector)
    return {"version": "4.0", "vectorString": vector, "baseScore": score, "baseSeverity": rating}


def nvd_cve(rng: random.Random, n: int) -> dict[str, Any]:
    cve = cve_id(n)
    cna = f"cna-{rng.randrange(60):02d}@synthetic.test"
    published = (DATE - timedelta(days=rng.randint(0, 9_000))).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    status = rng.choices(["Analyzed", "Modified", "Awaiting Analysis", "Deferred", "Rejected"], [55, 20, 15, 5, 5])[0]
    item: dict[str, Any] = {"id": cve, "sourceIdentifier": cna, "published": published, "lastModified": published,
                            "vulnStatus": status, "cveTags": []}  # fmt: skip
    if status == "Rejected":
        item["descriptions"] = [{"lang": "en", "value": "** REJECT ** Synthetic: this candidate was withdrawn."}]
        item["metrics"] = {}
        item["references"] = []
        return {"cve": item}
    item["descriptions"] = [{"lang": "en", "value": sentence(rng, 20, 70)}]
    if rng.random() < 0.4:
        item["descriptions"].append({"lang": "es", "value": sentence(rng, 20, 70)})
    metrics: dict[str, Any] = {}
    if status in ("Analyzed", "Modified") or rng.random() < 0.5:
        metrics["cvssMetricV31"] = []
        if status in ("Analyzed", "Modified"):
            data = _cvss_data(rng, "3.1")
            metrics["cvssMetricV31"].append({"source": "nvd@nist.gov", "type": "Primary", "cvssData": data,
                                             "exploitabilityScore": 3.9, "impactScore": 5.9})  # fmt: skip
        if rng.random() < 0.45:
            metrics["cvssMetricV31"].append({"source": cna, "type": "Secondary", "cvssData": _cvss_data(rng, "3.1"),
                                             "exploitabilityScore": 2.8, "impactScore": 3.6})  # fmt: skip
        if not metrics["cvssMetricV31"]:
            del metrics["cvssMetricV31"]
    if n % 100_000 < 30_000 and rng.random() < 0.5:  # the oldest have a CVSS v2 rating too
        data2 = _cvss_data(rng, "2.0")
        metrics["cvssMetricV2"] = [{"source": "nvd@nist.gov", "type": "Primary", "cvssData": data2,
                                    "baseSeverity": "MEDIUM", "exploitabilityScore": 10.0, "impactScore": 6.4,
                                    "acInsufInfo": False, "obtainAllPrivilege": False, "obtainUserPrivilege": False,
                                    "obtainOtherPrivilege": False, "userInteractionRequired": False}]  # fmt: skip
    if rng.random() < 0.05:
        metrics["cvssMetricV40"] = [{"source": cna, "type": "Secondary", "cvssData": _cvss_data(rng, "4.0")}]
    item["metrics"] = metrics
    item["weaknesses"] = [
        {
            "source": "nvd@nist.gov",
            "type": "Primary",
            "description": [{"lang": "en", "value": f"CWE-{rng.choice([20, 79, 119, 125, 787, 416])}"}],
        }
    ]
    vendor = f"vendor{rng.randrange(5_000)}"
    item["configurations"] = [{"nodes": [{"operator": "OR", "negate": False, "cpeMatch": [
        {"vulnerable": True, "criteria": f"cpe:2.3:a:{vendor}:product{k}:*:*:*:*:*:*:*:*",
         "versionEndExcluding": f"{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}",
         "matchCriteriaId": f"{rng.getrandbits(128):032X}"} for k in range(rng.randint(1, 3))]}]}]  # fmt: skip
    item["references"] = [{"url": f"https://{vendor}.synthetic.test/advisories/{cve}/{k}", "source": cna,
                           "tags": rng.sample(["Patch", "Vendor Advisory", "Third Party Advisory", "Mailing List",
                                               "Exploit"], rng.randint(0, 2))}
                          for k in range(rng.randint(1, 8))]  # fmt: skip
    return {"cve": item}


def write_nvd(sizes: Sizes, seed: int, folder: Path) -> dict[str, int]:
    folder.mkdir()
    rng = random.Random(f"{seed}-nvd")
    total = 0
    pages = math.ceil(sizes.nvd_cves / NVD_PAGE)
    stamp = DATE.strftime("%Y-%m-%dT%H:%M:%S.000")
    for page in range(pages):
        start = page * NVD_PAGE
        items = [nvd_cve(rng, n) for n in range(start, min(sizes.nvd_cves, start + NVD_PAGE))]
        document = {"resultsPerPage": len(items), "startIndex": start, "totalResults": sizes.nvd_cves,
                    "format": "NVD_CVE", "version": "2.0", "timestamp": stamp, "vulnerabilities": items}  # fmt: skip
        file = folder / f"nvd-cves-{page:04d}.json"
        file.write_text(json.dumps(document, separators=(",", ":")))
        total += file.stat().st_size
    return {"cves": sizes.nvd_cves, "pages": pages, "bytes": total}


def generate(sizes: Sizes, seed: int, data: Path) -> dict[str, Any]:
    """Write the three sources' files under `data` (reused when its manifest says the same scale and seed)."""
    manifest = data / "manifest.json"
    wanted = {"generator": GENERATOR, "scale": sizes.scale, "seed": seed}
    if manifest.exists():
        kept = json.loads(manifest.read_text())
        if {k: kept.get(k) for k in wanted} == wanted:
            print(f"reusing the generated data in {data}", flush=True)
            return dict(kept["stats"])
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    stats: dict[str, Any] = {}
    started = time.perf_counter()
    pairs, stats["osv"] = write_osv(sizes, seed, data / "all.zip")
    print(f"  osv all.zip: {stats['osv']['records']:,} records in {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    stats["debian"] = write_tracker(sizes, seed, pairs, data / "tracker.json")
    print(f"  tracker json: {stats['debian']['release_entries']:,} release entries in "
          f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    started = time.perf_counter()
    stats["cve"] = write_nvd(sizes, seed, data / "nvd")
    print(f"  NVD pages: {stats['cve']['cves']:,} CVEs in {time.perf_counter() - started:.1f} s", flush=True)
    manifest.write_text(json.dumps({**wanted, "stats": stats}, indent=2))
    return stats


# --- the child processes: one figure each -------------------------------------------------------------------------


def peak_rss(pid: int | str = "self") -> int:
    """A process's peak resident set size so far, in bytes: VmHWM of /proc/PID/status.

    Not getrusage's ru_maxrss: Linux carries the parent's peak over into a child across fork and exec, so a child
    started by a parent of 400 MiB would report at least that."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def child_import(url: str, source: str, path: Path) -> dict[str, Any]:
    from amiforge.lifecycle.vulndb import import_source
    from amiforge.store.sql import open_store

    with open_store(url) as store:
        before = peak_rss()
        started = time.perf_counter()
        state, skipped = import_source(source, path, store=store, actor=ACTOR)  # type: ignore[arg-type]
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak": peak_rss(), "before": before, "count": state.count, "skipped": len(skipped)}


def version_layout(sizes: Sizes) -> list[tuple[int, int]]:
    """(image, position) of each version, in the order they are made: position 2 (prod, the oldest) first, then 1
    (staging), then 0 (dev, the newest); each is current in CHANNELS[position]."""
    return [(i // len(CHANNELS) + 1, len(CHANNELS) - 1 - i % len(CHANNELS)) for i in range(sizes.versions)]


def advisories_naming(engine: Any, packages: set[str]) -> int:
    """How many advisories name one of these source packages (what a scan of them reads and parses)."""
    import sqlalchemy as sa

    query = sa.text("SELECT count(DISTINCT advisory_id) FROM advisory_packages WHERE package IN :names")
    with engine.connect() as conn:
        found = conn.execute(query.bindparams(sa.bindparam("names", expanding=True)), {"names": sorted(packages)})
        return int(found.scalar_one())


def child_seed(url: str, sizes: Sizes, seed: int, data_dir: Path) -> dict[str, Any]:
    """Versions through the store API, each with a scan of its 1,000 packages and release 12, current in a channel.

    The scans are "yesterday's": their CVE findings are those of the first image's newest package list against the
    data imported (computed once, as every image shares most of its packages), so today's rescan has something to
    compare with without paying for a hundred scans here; likewise the SBOM text is made once per image."""
    from amiforge.lifecycle.promote import policy_of
    from amiforge.lifecycle.scan import vulnerabilities
    from amiforge.lifecycle.views import vulndb_label
    from amiforge.model import ScanRecord, Status
    from amiforge.scanners.sbom import cyclonedx_sbom, sbom_digest
    from amiforge.settings import Settings
    from amiforge.store.sql import open_store

    settings = Settings(data_dir=data_dir, actor=ACTOR)
    started = time.perf_counter()
    per_image: dict[int, int] = {}
    with open_store(url) as store:
        first = image_packages(sizes, seed, 1, 0)
        yesterday = vulnerabilities(first, "12", [], store=store, policy=policy_of(settings))
        label = vulndb_label(store)
        parents: dict[int, str] = {}
        sboms: dict[int, str] = {}
        for image, position in version_layout(sizes):
            name = f"bench-{image:02d}"
            packages = image_packages(sizes, seed, image, position)
            if image not in per_image:
                per_image[image] = advisories_naming(store.engine, {p.source_name for p in packages})
            v = store.create_version(name=name, recipe_digest=f"{image:064x}", recipe_path=f"/bench/{name}.yaml",
                                     provider="local", tags={}, parent=parents.get(image), recipe="{}")  # fmt: skip
            digest = f"{v.id:064x}"
            store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=digest, size_bytes=2 << 30)
            store.transition(v.id, Status.TESTED, expect=Status.BUILT)
            now = datetime.now(UTC)
            if image not in sboms:  # 0.8 s each: one per image (its first version's), not one per version
                sboms[image] = cyclonedx_sbom(packages, image_name=name, image_version=str(v.number), digest=digest,
                                              timestamp=now)  # fmt: skip
            sbom = sboms[image]
            store.add_scan(v.id, ScanRecord(now, tuple(packages), sbom, sbom_digest(sbom), tuple(yesterday.findings),
                                            label, vulndb_as_of=yesterday.as_of, release="12"))  # fmt: skip
            store.transition(v.id, Status.SCANNED, expect=Status.TESTED)
            store.move_channel(name, CHANNELS[position], v.id, expect_current=None, actor=ACTOR, reason="bench seed")
            parents[image] = v.ref
    counts = sorted(per_image.values())
    return {"seconds": time.perf_counter() - started, "versions": sizes.versions, "images": len(per_image),
            "yesterday_findings": len(yesterday.findings), "advisories_min": counts[0],
            "advisories_median": counts[len(counts) // 2], "advisories_max": counts[-1]}  # fmt: skip


def child_rescan(url: str, data_dir: Path, profile: Path | None = None) -> dict[str, Any]:
    from amiforge.lifecycle.rescan import rescan
    from amiforge.settings import Settings
    from amiforge.store.sql import open_store

    settings = Settings(data_dir=data_dir, actor=ACTOR)
    with open_store(url) as store:
        before = peak_rss()
        profiler = cProfile.Profile() if profile else None
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        results = rescan(store=store, settings=settings)
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - started
    if profiler and profile:
        profiler.dump_stats(str(profile))
    findings = [len(r.scan.findings) for r in results]
    return {"seconds": seconds, "peak": peak_rss(), "before": before, "versions": len(results),
            "packages": sum(len(r.scan.packages) for r in results), "findings": sum(findings),
            "new": sum(len(r.new) for r in results), "gone": sum(len(r.gone) for r in results),
            "flagged": sum(len(r.flagged) for r in results)}  # fmt: skip


def run_child(*argv: str, budget: float | None = None) -> dict[str, Any]:
    """This script as a child process (`--child …`); its last stdout line is the figure, as JSON. A child still
    running after `budget` seconds is stopped: the result then says so ("stopped"), with its peak RSS so far."""
    child = subprocess.Popen([sys.executable, __file__, "--child", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = child.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        peak = peak_rss(child.pid)
        child.terminate()
        child.communicate()
        return {"stopped": True, "seconds": budget, "peak": peak}
    except BaseException:  # this process is being stopped: its child with it
        child.kill()
        child.wait()
        raise
    if child.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed ({child.returncode}):\n{out}{err}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def child_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="vulndb_bench.py --child")
    parser.add_argument("what", choices=["import", "seed", "rescan"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--source")
    parser.add_argument("--path", type=Path)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=2990)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args(argv)
    if args.what == "import":
        result = child_import(args.url, args.source, args.path)
    elif args.what == "seed":
        result = child_seed(args.url, Sizes.at(args.scale), args.seed, args.data_dir)
    else:
        result = child_rescan(args.url, args.data_dir, args.profile)
    print(json.dumps(result))


# --- the profile of a rescan that misses its target ---------------------------------------------------------------


def profile_rescan(db: Path, data_dir: Path, keep: int, work: Path, top: int) -> list[str]:
    """Rescan a copy of the registry with only `keep` channel pointers left (spread over the images) under
    cProfile; the top costs."""
    copy = work / "profile.db"
    # SQLite's backup, not a file copy: the registry is in WAL mode, and a stopped rescan leaves its WAL behind.
    with contextlib.closing(sqlite3.connect(db)) as source, contextlib.closing(sqlite3.connect(copy)) as conn:
        source.backup(conn)
        # Spread over the images and channels: a rescan reads the advisories of every target's packages at once.
        pointers = [r[0] for r in conn.execute("SELECT version_id FROM channels ORDER BY version_id")]
        step = (len(pointers) - 1) / max(1, keep - 1)
        picked = (min(len(pointers) - 1, round(i * step) + i % len(CHANNELS)) for i in range(keep))
        ids = sorted({pointers[k] for k in picked})
        conn.execute(f"DELETE FROM channels WHERE version_id NOT IN ({','.join('?' * len(ids))})", ids)
        conn.commit()
    stats_file = work / "rescan.prof"
    result = run_child("rescan", "--url", f"sqlite:///{copy}", "--data-dir", str(data_dir),
                       "--profile", str(stats_file))  # fmt: skip
    copy.unlink()
    out = io.StringIO()
    stats = pstats.Stats(str(stats_file), stream=out)
    total = sum(t for (_, _, t, _, _) in stats.stats.values())  # type: ignore[attr-defined]
    lines = [f"cProfile of rescan over {result['versions']} versions: {result['seconds']:.1f} s under the profiler "
             f"({total:.1f} s of function time)", "", "by own time (tottime):"]  # fmt: skip
    lines += _top(stats, "tottime", top)
    lines += ["", "by cumulative time, amiforge's own functions:"]
    lines += _top(stats, "cumulative", top, only="amiforge")
    return lines


def _where(func: tuple[str, int, str]) -> str:
    file, line, name = func
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{line} {name}" if line else name


def _top(stats: pstats.Stats, key: str, n: int, only: str | None = None) -> list[str]:
    rows = stats.stats.items()  # type: ignore[attr-defined]
    index = 2 if key == "tottime" else 3
    ranked = sorted(rows, key=lambda kv: kv[1][index], reverse=True)
    if only:
        ranked = [kv for kv in ranked if f"/{only}/" in kv[0][0]]
    out = [f"  {'own s':>7} {'cum s':>7} {'calls':>10}  where"]
    for func, (_cc, calls, tottime, cumtime, _callers) in ranked[:n]:
        out.append(f"  {tottime:7.2f} {cumtime:7.2f} {calls:>10,}  {_where(func)}")
    return out


# --- the parent -----------------------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="every size times this (0.1: a quick look)")
    parser.add_argument("--seed", type=int, default=2990, help="of the synthetic data")
    parser.add_argument("--data", type=Path, help="keep the generated files here, and reuse them when they match")
    parser.add_argument(
        "--rescan-budget",
        type=float,
        default=240.0,
        help="stop the rescan after this many seconds and project the rest (0: no limit)",
    )
    parser.add_argument("--profile-versions", type=int, default=4, help="versions in the profiled rescan")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="profile the rescan: when it misses its target (auto), always or never")  # fmt: skip
    parser.add_argument("--top", type=int, default=15, help="rows of each profile table")
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    for key in [k for k in os.environ if k.startswith("AMIFORGE_")]:
        del os.environ[key]

    sizes = Sizes.at(args.scale)
    work = Path(tempfile.mkdtemp(prefix="amiforge-bench-vulndb-", dir="/var/tmp"))
    data = args.data or work / "sources"
    db = work / "registry.db"
    url = f"sqlite:///{db}"
    try:
        print(f"{tree_state()}\ngenerating (scale {args.scale}, seed {args.seed}) …", flush=True)
        started = time.perf_counter()
        stats = generate(sizes, args.seed, data)
        print(f"  generated in {time.perf_counter() - started:.1f} s", flush=True)

        from amiforge.store.sql import open_store

        with open_store(url):
            pass  # the schema, so no import pays for the migrations
        figures: dict[str, dict[str, Any]] = {}
        for source, path in (("osv", data / "all.zip"), ("debian", data / "tracker.json"), ("cve", data / "nvd")):
            print(f"import {source} …", flush=True)
            figures[source] = run_child("import", "--url", url, "--source", source, "--path", str(path))
            f = figures[source]
            print(f"  {f['seconds']:.1f} s, peak RSS {mib(f['peak'])} ({mib(f['before'])} before), "
                  f"{f['count']:,} records, {f['skipped']} skipped", flush=True)  # fmt: skip
        print(f"seeding {sizes.versions} versions …", flush=True)
        seeded = run_child("seed", "--url", url, "--scale", str(args.scale), "--seed", str(args.seed),
                           "--data-dir", str(work / "data"))  # fmt: skip
        low, middle, high = (f"{seeded[f'advisories_{k}']:,}" for k in ("min", "median", "max"))
        print(f"  {seeded['seconds']:.1f} s; advisories naming an image's source packages: min {low}, median "
              f"{middle}, max {high}; CVE findings of bench-01's newest version: {seeded['yesterday_findings']:,}",
              flush=True)  # fmt: skip
        print(f"rescan{f' (stopped after {args.rescan_budget:g} s)' if args.rescan_budget else ''} …", flush=True)
        with sqlite3.connect(db) as conn:
            last_scan = conn.execute("SELECT max(id) FROM scans").fetchone()[0]
        budget = args.rescan_budget or None
        figures["rescan"] = r = run_child("rescan", "--url", url, "--data-dir", str(work / "data"), budget=budget)
        if r.get("stopped"):
            # Each version's new scan is committed as it is made: count those, and project the whole from them.
            with sqlite3.connect(db) as conn:
                done = conn.execute("SELECT count(*) FROM scans WHERE id > ?", (last_scan,)).fetchone()[0]
            # None finished: the budget a version is then only a lower bound.
            r.update(versions=done, projected=r["seconds"] / max(done, 1) * sizes.versions, at_least=done == 0)
            bound = "at least " if r["at_least"] else ""
            print(f"  stopped: {done} of {sizes.versions} versions in {r['seconds']:g} s, peak RSS {mib(r['peak'])}; "
                  f"projected {bound}{r['projected']:.0f} s for all", flush=True)  # fmt: skip
        else:
            print(f"  {r['seconds']:.1f} s, peak RSS {mib(r['peak'])}; {r['versions']} versions, {r['findings']:,} "
                  f"CVE findings ({r['new']:,} new, {r['gone']:,} gone), {r['flagged']} channel(s) flagged",
                  flush=True)  # fmt: skip

        target = RESCAN_TARGET_S * args.scale
        rescan_seconds = r.get("projected", r["seconds"])
        profile: list[str] = []
        if args.profile == "always" or (args.profile == "auto" and rescan_seconds > target):
            print(f"profiling a rescan of {args.profile_versions} versions …", flush=True)
            profile = profile_rescan(db, work / "data", args.profile_versions, work, args.top)

        o, d, c = stats["osv"], stats["debian"], stats["cve"]
        print("\n| figure | data | time | per record | peak RSS (before) |")
        print("| --- | --- | ---: | ---: | ---: |")
        for source, what in (
            ("osv", f"all.zip: {o['records']:,} records, {mib(o['bytes'])} ({mib(o['unpacked'])} unpacked)"),
            ("debian", f"tracker JSON: {d['issues']:,} issues, {d['release_entries']:,} release entries, "
                       f"{mib(d['bytes'])}"),
            ("cve", f"NVD API 2.0: {c['cves']:,} CVEs in {c['pages']} pages, {mib(c['bytes'])}"),
        ):  # fmt: skip
            f = figures[source]
            per = f["seconds"] / max(1, f["count"]) * 1e6
            print(f"| import {source} | {what}, {f['count']:,} rows | {f['seconds']:.1f} s | {per:,.0f} µs "
                  f"| {mib(f['peak'])} ({mib(f['before'])}) |")  # fmt: skip
        print("\n| figure | time | per version | peak RSS | target | ratio |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        ratio = rescan_seconds / target
        shown = f"**{ratio:.2f}**" if ratio > 1 else f"{ratio:.2f}"
        if r.get("stopped"):
            bound = "≥ " if r["at_least"] else ""
            when = f"stopped at {r['seconds']:g} s after {r['versions']}; projected **{bound}{rescan_seconds:.0f} s**"
        else:
            when = f"{r['seconds']:.1f} s"
        each = f"{'≥ ' if r.get('at_least') else ''}{r['seconds'] / max(1, r['versions']):.2f} s"
        print(f"| rescan {sizes.versions} versions × {PACKAGES:,} packages | {when} | {each} "
              f"| {mib(r['peak'])} | {target:g} s | {shown} |")  # fmt: skip
        if profile:
            print("\n" + "\n".join(profile))
        print(
            f"\nmachine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f}"
            f" GiB, {platform.machine()}, Linux {os.uname().release}, Python {platform.python_version()}, SQLite "
            f"{sqlite3.sqlite_version}; load average {os.getloadavg()[0]:.2f}; date {time.strftime('%Y-%m-%d')}; "
            f"registry {mib(db.stat().st_size)}; {tree_state()}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

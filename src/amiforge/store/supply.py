"""The supply chain: scans (SBOM, packages, findings), the vulnerability database (raw OSV advisories), the signing
keys the registry trusts, and signatures. Trusting and revoking a key record their event in the same transaction.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from amiforge.errors import InfraError, NotFound, StateError
from amiforge.model import (
    AdvisoryHead,
    AdvisoryRange,
    ChangelogEntry,
    CvssScore,
    DebianVerdict,
    Finding,
    FindingKind,
    Package,
    ScanRecord,
    Severity,
    SignatureRecord,
    StoredAdvisory,
    TrustedKey,
    VulnDbImport,
    VulnDbSource,
)
from amiforge.store.base import StoreCore, inserted_id
from amiforge.store.boundary import RESTORE
from amiforge.store.events import append_in
from amiforge.store.rows import row_mapper
from amiforge.store.schema import (
    advisories_table,
    advisory_packages_table,
    advisory_ranges_table,
    cve_scores_table,
    debian_tracker_table,
    sboms_table,
    scans_table,
    signatures_table,
    signing_keys_table,
    vulndb_imports_table,
    vulndb_sources_table,
)

# What `scans.sbom` holds since 0008: the document is in `sboms`, under the scan's sbom_digest (a CycloneDX document
# is never empty; scans made before hold their own copy).
_IN_SBOMS = ""

# Rows per INSERT of a bulk load: the Debian tracker alone is ~10^6 rows.
_BULK = 10_000


def _finding_row(f: Finding) -> dict[str, Any]:
    """A finding as its scan row stores it: the fields it has (a field at its default is left out, and `_finding`
    gives it back; a rescan writes ~100,000 findings, most of them without a path, line, CVSS rating …)."""
    # Severity and FindingKind are StrEnums: the members are written as their values (`.value` is an enum
    # descriptor call each).
    row: dict[str, Any] = {"kind": f.kind, "id": f.id, "severity": f.severity, "title": f.title, "source": f.source}
    if f.package is not None:
        row["package"] = f.package
    if f.installed is not None:
        row["installed"] = f.installed
    if f.fixed is not None:
        row["fixed"] = f.fixed
    if f.aliases:
        row["aliases"] = f.aliases
    if f.path is not None:
        row["path"] = f.path
    if f.line is not None:
        row["line"] = f.line
    if f.redacted is not None:
        row["redacted"] = f.redacted
    if f.severity_source is not None:
        row["severity_source"] = f.severity_source
    if f.debian is not None:
        row["debian"] = (f.debian.status, f.debian.urgency, f.debian.fixed_version, f.debian.no_dsa)
    if f.cvss is not None:
        row["cvss"] = (f.cvss.version, f.cvss.vector, f.cvss.score, f.cvss.severity, f.cvss.source)
    if f.reported is not None:
        row["reported"] = f.reported
    if f.unrated_cves:
        row["unrated_cves"] = f.unrated_cves
    return row


# Member by value: a dict lookup, where calling the enum (Severity("high")) goes through EnumType.__call__.
_KINDS = {k.value: k for k in FindingKind}
_SEVERITIES = {s.value: s for s in Severity}


def _severity(value: str) -> Severity:
    return _SEVERITIES.get(value) or Severity(value)  # a value that is none: the enum's own ValueError


def _finding(d: Mapping[str, Any]) -> Finding:
    get = d.get
    debian, cvss, reported = get("debian"), get("cvss"), get("reported")
    return Finding(
        kind=_KINDS.get(d["kind"]) or FindingKind(d["kind"]),
        id=d["id"],
        severity=_severity(d["severity"]),
        title=d["title"],
        source=d["source"],
        package=get("package"),
        installed=get("installed"),
        fixed=get("fixed"),
        aliases=tuple(get("aliases") or ()),
        path=get("path"),
        line=get("line"),
        redacted=get("redacted"),
        severity_source=get("severity_source"),
        debian=None if debian is None else DebianVerdict(*debian),
        cvss=None if cvss is None else _cvss(cvss),
        reported=None if reported is None else _severity(reported),
        unrated_cves=tuple(get("unrated_cves") or ()),
    )


def _findings(value: Iterable[Mapping[str, Any]]) -> tuple[Finding, ...]:
    return tuple(_finding(f) for f in value)


def _head_row(head: AdvisoryHead) -> dict[str, Any]:
    return {"title": head.title, "identifiers": list(head.identifiers), "severity": head.severity.value,
            "withdrawn": head.withdrawn}  # fmt: skip


def _cvss(row: Sequence[Any]) -> CvssScore:
    version, vector, score, severity, source = row
    return CvssScore(version, vector, float(score), _severity(severity), source)


def _changelogs(value: object) -> dict[str, tuple[ChangelogEntry, ...]]:
    if not isinstance(value, dict):
        return {}  # NULL: a scan made before changelogs were read
    return {pkg: tuple(ChangelogEntry(v, tuple(cves)) for v, cves in entries) for pkg, entries in value.items()}


def _as_of(value: object) -> dict[str, datetime]:
    return {k: datetime.fromisoformat(v) for k, v in value.items()} if isinstance(value, dict) else {}


scan_from_row = row_mapper(
    ScanRecord,
    "scans",
    packages=lambda value: tuple(Package(*p) for p in value),
    findings=lambda value: _findings(value),
    changelogs=_changelogs,
    vulndb_as_of=_as_of,
)
vulndb_source_from_row = row_mapper(VulnDbSource, "vulndb_sources", key="name")
key_from_row = row_mapper(TrustedKey, "signing_keys", key="key_id")
signature_from_row = row_mapper(SignatureRecord, "signatures")
vulndb_import_from_row = row_mapper(VulnDbImport, "vulndb_imports")


class SupplyChain(StoreCore):
    # scans

    def add_scan(self, version_id: int, scan: ScanRecord) -> ScanRecord:
        """Record a scan; its SBOM document is kept once per sha256 (`scan.sbom_digest`, which must be its sha256)."""
        if hashlib.sha256(scan.sbom.encode()).hexdigest() != scan.sbom_digest:
            raise StateError(
                f"the scan's SBOM does not have the sha256 it names ({scan.sbom_digest[:12]}…)",
                fix="this is a bug in amiforge: report it with the command that failed",
            )
        with self._guard(f"record a scan of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            known = conn.execute(sa.select(sboms_table.c.digest).where(sboms_table.c.digest == scan.sbom_digest))
            if known.first() is None:  # (sending the ~700 KB document to find it there costs more than asking)
                # Two scans of the same packages racing to store one document: the second finds it there.
                insert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(sboms_table)
                conn.execute(insert.values(digest=scan.sbom_digest, document=scan.sbom).on_conflict_do_nothing())
            result = conn.execute(
                scans_table.insert().values(
                    version_id=version_id,
                    scanned_at=scan.scanned_at,
                    packages=[[p.name, p.version, p.arch, p.source, p.source_version] for p in scan.packages],
                    sbom=_IN_SBOMS,
                    sbom_digest=scan.sbom_digest,
                    findings=[_finding_row(f) for f in scan.findings],
                    vulndb=scan.vulndb,
                    changelogs={
                        pkg: [[e.version, list(e.cves)] for e in entries] for pkg, entries in scan.changelogs.items()
                    },
                    vulndb_as_of={k: v.isoformat() for k, v in scan.vulndb_as_of.items()},
                    release=scan.release,
                )
            )
            return replace(scan, id=inserted_id(result), version_id=version_id)

    def latest_scan(self, version_id: int) -> ScanRecord | None:
        s = scans_table
        # A scan made before 0008 holds its own copy of the document; a later one, its digest.
        document = sa.func.coalesce(sa.func.nullif(s.c.sbom, _IN_SBOMS), sboms_table.c.document)
        columns = [c for c in s.c if c.name != "sbom"] + [document.label("sbom")]
        query = (
            sa.select(*columns)
            .select_from(s.outerjoin(sboms_table, sboms_table.c.digest == s.c.sbom_digest))
            .where(s.c.version_id == version_id)
            .order_by(s.c.id.desc())
            .limit(1)
        )
        with self._guard(f"read the scan of version {version_id}"), self._read() as conn:
            row = conn.execute(query).mappings().one_or_none()
            return None if row is None else scan_from_row(row)

    def latest_scan_ids(self, version_ids: Collection[int]) -> dict[int, int]:
        """The id of each version's latest scan (versions never scanned are absent), in one read."""
        s = scans_table
        found: dict[int, int] = {}
        ids = list(version_ids)
        with self._guard("read the latest scans' ids"), self._read() as conn:
            for start in range(0, len(ids), 500):
                query = (
                    sa.select(s.c.version_id, sa.func.max(s.c.id))
                    .where(s.c.version_id.in_(ids[start : start + 500]))
                    .group_by(s.c.version_id)
                )
                found.update({int(v): int(i) for v, i in conn.execute(query)})
        return found

    def scan_findings(self, scan_id: int) -> tuple[Finding, ...]:
        """The findings of one scan (a scan never changes: a reader may keep them by its id)."""
        with self._guard(f"read the findings of scan {scan_id}"), self._read() as conn:
            value = conn.execute(sa.select(scans_table.c.findings).where(scans_table.c.id == scan_id)).scalar()
        if value is None:
            raise NotFound(f"no scan {scan_id}")
        try:
            return _findings(value)
        except (KeyError, ValueError, TypeError) as e:
            raise InfraError(
                f"the registry's scans row id={scan_id} is damaged: {type(e).__name__}: {e}", fix=RESTORE
            ) from e

    # the vulnerability database

    def import_advisories(
        self,
        source: str,
        records: Sequence[StoredAdvisory],
        *,
        state: VulnDbSource | None = None,
        replace_all: bool = False,
    ) -> VulnDbImport:
        """Store advisories (the raw OSV record, and what matching needs of it); a re-imported id is replaced.
        `replace_all`: the records are the whole dataset (an update), so every other advisory goes, in the same
        transaction. `state`: the osv source's new row (its count is taken from the table)."""
        now = self._now()
        with self._guard(f"import advisories from {source}"), self._write() as conn:
            import_id = inserted_id(
                conn.execute(vulndb_imports_table.insert().values(source=source, imported_at=now, count=len(records)))
            )
            if replace_all:
                for table in (advisory_ranges_table, advisory_packages_table, advisories_table):
                    conn.execute(table.delete())
            else:
                self._delete_advisories(conn, [r.id for r in records])
            for chunk in range(0, len(records), _BULK):
                part = records[chunk : chunk + _BULK]
                conn.execute(advisories_table.insert(), [{"id": r.id, "import_id": import_id, "modified": r.modified,
                                                          "record": dict(r.record), **_head_row(r.head)}
                                                         for r in part])  # fmt: skip
                self._insert_parsed(conn, part)
            if state is not None:
                self._set_source(conn, state, advisories_table)
        return VulnDbImport(import_id, source, now, len(records))

    @staticmethod
    def _delete_advisories(conn: sa.Connection, ids: Sequence[str]) -> None:
        SupplyChain._delete_parsed(conn, ids)
        for chunk in range(0, len(ids), 500):
            conn.execute(advisories_table.delete().where(advisories_table.c.id.in_(ids[chunk : chunk + 500])))

    @staticmethod
    def _delete_parsed(conn: sa.Connection, ids: Sequence[str]) -> None:
        """The ranges and package links of these advisories."""
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            conn.execute(advisory_ranges_table.delete().where(advisory_ranges_table.c.advisory_id.in_(part)))
            conn.execute(advisory_packages_table.delete().where(advisory_packages_table.c.advisory_id.in_(part)))

    @staticmethod
    def _insert_parsed(conn: sa.Connection, records: Sequence[StoredAdvisory]) -> None:
        """The ranges of these advisories, and the source packages they name (inserted after the advisories)."""
        ranges = [{"advisory_id": r.id, "ecosystem": a.ecosystem, "package": a.package, "introduced": a.introduced,
                   "fixed": a.fixed, "last_affected": a.last_affected, "versions": list(a.versions) or None,
                   "severity": a.severity.value} for r in records for a in r.ranges]  # fmt: skip
        links = [{"advisory_id": r.id, "package": p} for r in records for p in sorted({a.package for a in r.ranges})]
        for rows, table in ((ranges, advisory_ranges_table), (links, advisory_packages_table)):
            for chunk in range(0, len(rows), _BULK):
                conn.execute(table.insert(), rows[chunk : chunk + _BULK])

    def unparsed_advisories(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Up to `limit` advisories imported before their parsed form was kept (registries older than 0008):
        (id, raw record)."""
        query = sa.select(advisories_table.c.id, advisories_table.c.record).where(advisories_table.c.title.is_(None))
        with self._guard("read advisories"), self._read() as conn:
            return [(i, r) for i, r in conn.execute(query.order_by(advisories_table.c.id).limit(limit))]

    def store_parsed(self, records: Sequence[StoredAdvisory]) -> int:
        """Keep the parsed form of advisories stored without it (their raw record unchanged): their head, and their
        ranges and package links replaced. One an import replaced meanwhile keeps its own, newer, parse: only rows
        still unparsed are written (a concurrent parse of the same rows waits, then finds them done). How many."""
        with self._guard("store parsed advisories"), self._write() as conn:
            unparsed = advisories_table.c.title.is_(None)
            fresh = [
                r
                for r in records
                if conn.execute(
                    advisories_table.update().where(advisories_table.c.id == r.id, unparsed).values(_head_row(r.head))
                ).rowcount
                == 1
            ]
            self._delete_parsed(conn, [r.id for r in fresh])
            self._insert_parsed(conn, fresh)
        return len(fresh)

    def advisory_ranges(
        self, packages: Collection[str], ecosystems: Collection[str]
    ) -> tuple[dict[str, AdvisoryHead], list[AdvisoryRange]]:
        """The ranges in these ecosystems of these (source) packages, of advisories not withdrawn, and the heads of
        those advisories by id."""
        names = sorted(set(packages))
        r, a = advisory_ranges_table, advisories_table
        heads: dict[str, AdvisoryHead] = {}
        ranges: list[AdvisoryRange] = []
        with self._guard("read advisories"), self._read() as conn:
            for chunk in range(0, len(names), 500):
                part = names[chunk : chunk + 500]
                wanted = sa.and_(r.c.package.in_(part), r.c.ecosystem.in_(sorted(ecosystems)),
                                 a.c.withdrawn.is_(False))  # fmt: skip
                query = sa.select(
                    r.c.advisory_id,
                    r.c.ecosystem,
                    r.c.package,
                    r.c.introduced,
                    r.c.fixed,
                    r.c.last_affected,
                    r.c.versions,
                    r.c.severity,
                ).join(a, a.c.id == r.c.advisory_id)
                for aid, eco, pkg, introduced, fixed, last, versions, severity in conn.execute(
                    query.where(wanted)
                ).all():
                    ranges.append(AdvisoryRange(aid, eco, pkg, introduced, fixed, last, tuple(versions or ()),
                                                _severity(severity)))  # fmt: skip
            ids = sorted({x.advisory_id for x in ranges})
            for at in range(0, len(ids), 500):
                heads_query = sa.select(a.c.id, a.c.title, a.c.identifiers, a.c.severity)
                for aid, title, identifiers, severity in conn.execute(
                    heads_query.where(a.c.id.in_(ids[at : at + 500]))
                ).all():
                    heads[aid] = AdvisoryHead(aid, title, tuple(identifiers), _severity(severity), False)
        ranges.sort(key=lambda x: (x.advisory_id, x.package))
        return heads, ranges

    def _set_source(self, conn: sa.Connection, state: VulnDbSource, table: sa.Table) -> None:
        """Record the source's new state, its count read from its table (in the caller's transaction)."""
        count = int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
        row = {
            "origin": state.origin,
            "as_of": state.as_of,
            "imported_at": self._now(),
            "sha256": state.sha256,
            "size": state.size,
            "count": count,
        }
        done = conn.execute(vulndb_sources_table.update().where(vulndb_sources_table.c.name == state.name).values(row))
        if done.rowcount == 0:
            conn.execute(vulndb_sources_table.insert().values(name=state.name, **row))

    def _replace(self, what: str, table: sa.Table, rows: Iterable[dict[str, Any]], state: VulnDbSource) -> VulnDbSource:
        """Replace every row of a source's `table` with `rows` (inserted _BULK at a time) and record its new state,
        in one transaction: a failure midway keeps the previous data whole."""
        with self._guard(f"import {what}"), self._write() as conn:
            conn.execute(table.delete())
            it = iter(rows)
            while batch := list(itertools.islice(it, _BULK)):
                conn.execute(table.insert(), batch)
            self._set_source(conn, state, table)
        return self._source(state.name)

    def replace_debian_tracker(
        self,
        entries: Iterable[tuple[str, str, str, DebianVerdict]],
        state: VulnDbSource,
    ) -> VulnDbSource:
        """The Debian tracker's verdicts (package, CVE, release codename, verdict), replacing every earlier one."""
        rows = (
            {"package": package, "cve": cve, "release": release, "status": v.status, "urgency": v.urgency,
             "fixed_version": v.fixed_version, "no_dsa": v.no_dsa}
            for package, cve, release, v in entries
        )  # fmt: skip
        return self._replace("the Debian Security Tracker's data", debian_tracker_table, rows, state)

    def debian_verdicts(self, packages: Collection[str], release: str) -> dict[tuple[str, str], DebianVerdict]:
        """(source package, CVE) -> Debian's verdict on `release` (a codename), for these packages."""
        names = sorted(set(packages))
        t = debian_tracker_table
        found: dict[tuple[str, str], DebianVerdict] = {}
        with self._guard("read the Debian tracker's verdicts"), self._read() as conn:
            for chunk in range(0, len(names), 500):
                query = sa.select(t.c.package, t.c.cve, t.c.status, t.c.urgency, t.c.fixed_version, t.c.no_dsa).where(
                    t.c.release == release, t.c.package.in_(names[chunk : chunk + 500])
                )
                for package, cve, status, urgency, fixed, no_dsa in conn.execute(query).all():
                    found[(package, cve)] = DebianVerdict(status, urgency, fixed, no_dsa)
        return found

    def replace_cve_scores(self, scores: Iterable[tuple[str, CvssScore]], state: VulnDbSource) -> VulnDbSource:
        """CVSS ratings (CVE, rating), replacing every earlier one."""
        # One rating per (CVE, publisher, version): a later duplicate (NVD pages overlap) replaces it.
        rows = {
            (cve, r.source, r.version): {"cve": cve, "source": r.source, "version": r.version, "vector": r.vector,
                                         "score": r.score, "severity": r.severity.value}
            for cve, r in scores
        }  # fmt: skip
        return self._replace("CVSS ratings", cve_scores_table, rows.values(), state)

    def cve_scores(self, cves: Collection[str]) -> dict[str, list[CvssScore]]:
        """CVE -> its CVSS ratings, for these CVEs."""
        ids = sorted(set(cves))
        t = cve_scores_table
        found: dict[str, list[CvssScore]] = {}
        with self._guard("read CVSS ratings"), self._read() as conn:
            for chunk in range(0, len(ids), 500):
                query = sa.select(t.c.cve, t.c.version, t.c.vector, t.c.score, t.c.severity, t.c.source).where(
                    t.c.cve.in_(ids[chunk : chunk + 500])
                )
                for cve, *row in conn.execute(query).all():
                    found.setdefault(cve, []).append(_cvss(row))
        return found

    def vulndb_sources(self) -> list[VulnDbSource]:
        with self._guard("list the vulnerability sources"), self._read() as conn:
            rows = conn.execute(sa.select(vulndb_sources_table).order_by(vulndb_sources_table.c.name)).mappings()
            return [vulndb_source_from_row(r) for r in rows]

    def _source(self, name: str) -> VulnDbSource:
        return next(s for s in self.vulndb_sources() if s.name == name)

    def all_advisories(self) -> list[dict[str, Any]]:
        """Every advisory's raw record, by id (an export of the whole osv source)."""
        with self._guard("read advisories"), self._read() as conn:
            query = sa.select(advisories_table.c.record).order_by(advisories_table.c.id)
            return [record for (record,) in conn.execute(query)]

    def vulndb_imports(self) -> list[VulnDbImport]:
        with self._guard("list advisory imports"), self._read() as conn:
            rows = conn.execute(sa.select(vulndb_imports_table).order_by(vulndb_imports_table.c.id)).mappings()
            return [vulndb_import_from_row(r) for r in rows]

    def advisory_count(self) -> int:
        with self._guard("count advisories"), self._read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(advisories_table)).scalar_one())

    # signing keys and signatures

    def add_key(self, key: TrustedKey, *, actor: str) -> tuple[TrustedKey, bool]:
        """Trust `key`; (the trusted key, whether this call added it). Adding it and its `key.added` event are one
        transaction, and the existence check is inside it: callers racing to trust one key record it once."""
        for attempt in (1, 2):
            try:
                with self._guard(f"trust key {key.key_id}"), self._write() as conn:
                    row = conn.execute(
                        sa.select(signing_keys_table).where(signing_keys_table.c.key_id == key.key_id)
                    ).mappings().one_or_none()  # fmt: skip
                    if row is not None:
                        if row["public_key"].strip() != key.public_key.strip():
                            raise StateError(
                                f"a different public key is already trusted as {key.key_id}",
                                fix="key ids are derived from the public key; this should not happen — check the "
                                "key files",
                            )
                        return key_from_row(row), False
                    conn.execute(
                        signing_keys_table.insert().values(
                            key_id=key.key_id, algorithm=key.algorithm, public_key=key.public_key, added_at=key.added_at
                        )
                    )
                    append_in(conn, "key.added", at=self._now(), actor=actor, ref=None,
                              data={"key": key.key_id, "algorithm": key.algorithm})  # fmt: skip
                return key, True
            except InfraError as e:
                # PostgreSQL: a concurrent insert of the same key won the race; read it back as existing.
                if attempt == 2 or not isinstance(e.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def signing_keys(self) -> list[TrustedKey]:
        with self._guard("list signing keys"), self._read() as conn:
            rows = conn.execute(sa.select(signing_keys_table).order_by(signing_keys_table.c.added_at)).mappings()
            return [key_from_row(r) for r in rows]

    def revoke_key(self, key_id: str, reason: str, *, actor: str) -> TrustedKey:
        """Stop trusting a key; the `key.revoked` event is recorded in the same transaction."""
        now = self._now()
        with self._guard(f"revoke key {key_id}"), self._write() as conn:
            result = conn.execute(
                signing_keys_table.update()
                .where(signing_keys_table.c.key_id == key_id, signing_keys_table.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason=reason)
            )
            row = conn.execute(
                sa.select(signing_keys_table).where(signing_keys_table.c.key_id == key_id)
            ).mappings().one_or_none()  # fmt: skip
            if row is None:
                raise NotFound(f"no signing key {key_id}", fix="`amiforge keys list` shows the trusted keys")
            if result.rowcount == 0:
                raise StateError(
                    f"key {key_id} was already revoked at {row['revoked_at']:%Y-%m-%d %H:%M}Z",
                    fix="nothing to do: its signatures no longer verify",
                )
            append_in(
                conn, "key.revoked", at=self._now(), actor=actor, ref=None, data={"key": key_id, "reason": reason}
            )
            return key_from_row(row)

    def add_signature(self, version_id: int, signature: SignatureRecord) -> SignatureRecord:
        with self._guard(f"record a signature of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            result = conn.execute(
                signatures_table.insert().values(
                    version_id=version_id,
                    key_id=signature.key_id,
                    envelope=signature.envelope,
                    statement_digest=signature.statement_digest,
                    signed_at=signature.signed_at,
                )
            )
            return replace(signature, id=inserted_id(result), version_id=version_id)

    def signatures(self, version_id: int) -> list[SignatureRecord]:
        query = sa.select(signatures_table).where(signatures_table.c.version_id == version_id).order_by(
            signatures_table.c.id
        )  # fmt: skip
        with self._guard(f"list signatures of version {version_id}"), self._read() as conn:
            return signature_from_row.each(conn.execute(query))

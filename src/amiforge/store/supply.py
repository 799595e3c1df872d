"""The supply chain: scans (SBOM, packages, findings), the vulnerability database (raw OSV advisories), the signing
keys the registry trusts, and signatures. Trusting and revoking a key record their event in the same transaction.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from amiforge.errors import InfraError, NotFound, StateError
from amiforge.model import (
    ChangelogEntry,
    CvssScore,
    DebianVerdict,
    Finding,
    FindingKind,
    Package,
    ScanRecord,
    Severity,
    SignatureRecord,
    TrustedKey,
    VulnDbImport,
    VulnDbSource,
)
from amiforge.store.base import StoreCore, inserted_id
from amiforge.store.events import append_in
from amiforge.store.rows import row_mapper
from amiforge.store.schema import (
    advisories_table,
    advisory_packages_table,
    cve_scores_table,
    debian_tracker_table,
    scans_table,
    signatures_table,
    signing_keys_table,
    vulndb_imports_table,
    vulndb_sources_table,
)

# Rows per INSERT of a bulk load: the Debian tracker alone is ~10^6 rows.
_BULK = 10_000


def _finding_row(f: Finding) -> dict[str, Any]:
    return {
        "kind": f.kind.value,
        "id": f.id,
        "severity": f.severity.value,
        "title": f.title,
        "source": f.source,
        "package": f.package,
        "installed": f.installed,
        "fixed": f.fixed,
        "aliases": list(f.aliases),
        "path": f.path,
        "line": f.line,
        "redacted": f.redacted,
        "severity_source": f.severity_source,
        "debian": None if f.debian is None else [f.debian.status, f.debian.urgency, f.debian.fixed_version,
                                                 f.debian.no_dsa],
        "cvss": None if f.cvss is None else [f.cvss.version, f.cvss.vector, f.cvss.score, f.cvss.severity.value,
                                             f.cvss.source],
        "reported": None if f.reported is None else f.reported.value,
        "unrated_cves": list(f.unrated_cves),
    }  # fmt: skip


def _finding(d: Mapping[str, Any]) -> Finding:
    return Finding(
        kind=FindingKind(d["kind"]),
        id=d["id"],
        severity=Severity(d["severity"]),
        title=d["title"],
        source=d["source"],
        package=d.get("package"),
        installed=d.get("installed"),
        fixed=d.get("fixed"),
        aliases=tuple(d.get("aliases") or ()),
        path=d.get("path"),
        line=d.get("line"),
        redacted=d.get("redacted"),
        severity_source=d.get("severity_source"),
        debian=None if d.get("debian") is None else DebianVerdict(*d["debian"]),
        cvss=None if d.get("cvss") is None else _cvss(d["cvss"]),
        reported=None if d.get("reported") is None else Severity(d["reported"]),
        unrated_cves=tuple(d.get("unrated_cves") or ()),
    )


def _cvss(row: Sequence[Any]) -> CvssScore:
    version, vector, score, severity, source = row
    return CvssScore(version, vector, float(score), Severity(severity), source)


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
    findings=lambda value: tuple(_finding(f) for f in value),
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
        with self._guard(f"record a scan of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            result = conn.execute(
                scans_table.insert().values(
                    version_id=version_id,
                    scanned_at=scan.scanned_at,
                    packages=[[p.name, p.version, p.arch, p.source, p.source_version] for p in scan.packages],
                    sbom=scan.sbom,
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
        query = (
            sa.select(scans_table).where(scans_table.c.version_id == version_id).order_by(scans_table.c.id.desc())
        ).limit(1)
        with self._guard(f"read the scan of version {version_id}"), self._read() as conn:
            row = conn.execute(query).mappings().one_or_none()
            return None if row is None else scan_from_row(row)

    # the vulnerability database

    def import_advisories(
        self,
        source: str,
        records: Sequence[tuple[str, str, Mapping[str, Any], Sequence[str]]],
        *,
        state: VulnDbSource | None = None,
        replace_all: bool = False,
    ) -> VulnDbImport:
        """Store raw OSV records (id, modified, record, source packages it names); a re-imported id is replaced.
        `replace_all`: the records are the whole dataset (an update), so every other advisory goes, in the same
        transaction. `state`: the osv source's new row (its count is taken from the table)."""
        now = self._now()
        with self._guard(f"import advisories from {source}"), self._write() as conn:
            import_id = inserted_id(
                conn.execute(vulndb_imports_table.insert().values(source=source, imported_at=now, count=len(records)))
            )
            if replace_all:
                conn.execute(advisory_packages_table.delete())
                conn.execute(advisories_table.delete())
            else:
                ids = [r[0] for r in records]
                for chunk in range(0, len(ids), 500):
                    part = ids[chunk : chunk + 500]
                    conn.execute(
                        advisory_packages_table.delete().where(advisory_packages_table.c.advisory_id.in_(part))
                    )
                    conn.execute(advisories_table.delete().where(advisories_table.c.id.in_(part)))
            for chunk in range(0, len(records), _BULK):
                part_records = records[chunk : chunk + _BULK]
                conn.execute(
                    advisories_table.insert(),
                    [
                        {"id": i, "import_id": import_id, "modified": m, "record": dict(r)}
                        for i, m, r, _ in part_records
                    ],
                )
                links = [{"advisory_id": i, "package": p} for i, _, _, pkgs in part_records for p in sorted(set(pkgs))]
                if links:
                    conn.execute(advisory_packages_table.insert(), links)
            if state is not None:
                self._set_source(conn, state, advisories_table)
        return VulnDbImport(import_id, source, now, len(records))

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
                for package, cve, status, urgency, fixed, no_dsa in conn.execute(query):
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
                for cve, *row in conn.execute(query):
                    found.setdefault(cve, []).append(_cvss(row))
        return found

    def vulndb_sources(self) -> list[VulnDbSource]:
        with self._guard("list the vulnerability sources"), self._read() as conn:
            rows = conn.execute(sa.select(vulndb_sources_table).order_by(vulndb_sources_table.c.name)).mappings()
            return [vulndb_source_from_row(r) for r in rows]

    def _source(self, name: str) -> VulnDbSource:
        return next(s for s in self.vulndb_sources() if s.name == name)

    def advisories_for(self, packages: Collection[str]) -> list[dict[str, Any]]:
        """The raw records of every advisory naming one of these (source) package names."""
        names = sorted(set(packages))
        found: dict[str, dict[str, Any]] = {}
        with self._guard("read advisories"), self._read() as conn:
            for chunk in range(0, len(names), 500):
                query = (
                    sa.select(advisories_table.c.id, advisories_table.c.record)
                    .join(advisory_packages_table, advisory_packages_table.c.advisory_id == advisories_table.c.id)
                    .where(advisory_packages_table.c.package.in_(names[chunk : chunk + 500]))
                )
                for advisory_id, record in conn.execute(query):
                    found[advisory_id] = record
        return [found[k] for k in sorted(found)]

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

"""Versions and what a bake records about each: artifacts, layers, boot reports.

Versions are NAME@N, numbered per name atomically; a ref resolves as `NAME@N`, `NAME:CHANNEL` (the channel's current
version) or a digest prefix; states move by compare-and-set (`transition`). Listings are newest first, a page at a
time when asked (`limit`, and `before`: the id of the last version of the previous page).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from amiforge.errors import ConfigError, NotFound, Problem, StateError
from amiforge.model import (
    IMAGE_NAME_PATTERN,
    Artifact,
    BootReport,
    CheckResult,
    ImageVersion,
    LayerRecord,
    Status,
    check_transition,
)
from amiforge.store.base import VERSION_SUMMARY, StoreCore, advisory_key, inserted_id, version_from_row
from amiforge.store.boundary import out_of_range
from amiforge.store.lineage import inherit_revocations, lock_lineage, record_revocation
from amiforge.store.rows import Row, float_or_none, row_mapper
from amiforge.store.schema import (
    artifacts_table,
    aware,
    boot_reports_table,
    channels_table,
    layers_table,
    versions_table,
)

_CREATE_ATTEMPTS = 5
_MIN_PREFIX = 8
_REF_NAME_AT_N = re.compile(rf"^(?P<name>{IMAGE_NAME_PATTERN})@(?P<number>[1-9][0-9]*)$")
_REF_CHANNEL = re.compile(rf"^{IMAGE_NAME_PATTERN}:[a-z0-9][a-z0-9-]*$")
_HEX = re.compile(r"^[0-9a-f]+$")
# (name, number, id, status) of the versions named by :pairs, a JSON list of [name, number]; SQLite, PostgreSQL.
_WANTED_VERSIONS = (
    sa.text(
        "SELECT v.name, v.number, v.id, v.status FROM json_each(:pairs) AS w JOIN versions AS v "
        "ON v.name = json_extract(w.value, '$[0]') AND v.number = json_extract(w.value, '$[1]')"
    ),
    sa.text(
        "SELECT v.name, v.number, v.id, v.status FROM jsonb_array_elements(CAST(:pairs AS jsonb)) AS w(value) "
        "JOIN versions AS v ON v.name = w.value ->> 0 AND v.number = CAST(w.value ->> 1 AS integer)"
    ),
)


def _checks(value: Any) -> tuple[CheckResult, ...]:
    return tuple(
        CheckResult(name=c["name"], kind=c["kind"], passed=bool(c["passed"]), detail=c["detail"]) for c in value
    )


artifact_from_row = row_mapper(Artifact, "artifacts", size_bytes=int)
layer_from_row = row_mapper(LayerRecord, "layers", key="index", index=int, hit=bool, seconds=float, size_bytes=int)
boot_report_from_row = row_mapper(
    BootReport, "boot_reports", time_to_ready=float_or_none, checks=_checks, duration=float
)


def _ref_of(row: Row) -> str:
    return f"{row['name']}@{row['number']}"


def name_at_n(ref: str) -> tuple[str, int] | None:
    """(name, number) of a `NAME@N` ref; None for any other form, and for a number beyond the database's integers
    (more than 18 digits: `get_version` calls that bad input)."""
    match = _REF_NAME_AT_N.match(ref.strip())
    if match is None or len(match["number"]) > 18:
        return None
    return match["name"], int(match["number"])


def _digest_prefix(ref: str) -> str:
    """The hex digest prefix a non-NAME@N ref stands for; ConfigError if it is no valid ref at all."""
    hexpart = ref[len("sha256:") :] if ref.lower().startswith("sha256:") else ref
    hexpart = hexpart.lower()
    if not hexpart or not _HEX.match(hexpart):
        raise ConfigError(
            f"{ref!r} is not a version reference",
            fix="use NAME@N, NAME:CHANNEL or a digest prefix (at least 8 hex characters, optionally after sha256:)",
        )
    if len(hexpart) < _MIN_PREFIX:
        raise ConfigError(
            f"digest prefix {hexpart!r} is too short ({len(hexpart)} characters)",
            fix=f"use NAME@N or a digest prefix of at least {_MIN_PREFIX} hex characters",
        )
    return hexpart


_NEXT_HEX = dict(zip("0123456789abcdef", "123456789abcdefg", strict=True))


def _starts_with(column: sa.ColumnElement[str | None], prefix: str) -> sa.ColumnElement[bool]:
    """`column` starts with `prefix` (lower-case hex at its end), as a range that ix_versions_digest serves: a bare
    LIKE uses no index (SQLite's LIKE ignores case; PostgreSQL's needs the C collation). The LIKE stays, as the exact
    test. The two bounds differ only in their last character, a digit or a letter, which every collation orders as
    its bytes do."""
    upper = prefix[:-1] + _NEXT_HEX[prefix[-1]]
    return (column >= prefix) & (column < upper) & column.startswith(prefix)


class Versions(StoreCore):
    # versions

    def create_version(
        self,
        *,
        name: str,
        recipe_digest: str,
        recipe_path: str,
        provider: str,
        tags: Mapping[str, str],
        parent: str | None,
        recipe: str = "",
    ) -> ImageVersion:
        parent_key = name_at_n(parent) if parent is not None else None
        if parent is not None and parent_key is None:
            # Lineage links by NAME@N; a channel or digest ref would be a link nobody could follow later.
            raise ConfigError(f"parent {parent[:80]!r} is not NAME@N", fix="name the parent version as NAME@N")
        with self._guard(f"create a version of {name}"):
            for attempt in range(1, _CREATE_ATTEMPTS + 1):
                now = self._now()
                try:
                    with self._write() as conn:
                        if conn.dialect.name == "postgresql":
                            # Serialise creators of one name; the IntegrityError retry stays a backstop.
                            conn.execute(
                                sa.select(sa.func.pg_advisory_xact_lock(advisory_key(f"amiforge-version:{name}")))
                            )
                        parent_row = None
                        if parent_key is not None:
                            lock_lineage(conn)  # a revocation of an ancestor lands wholly before or after this
                            parent_row = conn.execute(
                                sa.select(versions_table.c.id, versions_table.c.status).where(
                                    versions_table.c.name == parent_key[0], versions_table.c.number == parent_key[1]
                                )
                            ).one_or_none()
                            if parent_row is None:
                                raise NotFound(f"parent {parent} is not a version of this registry")
                        top = conn.execute(
                            sa.select(sa.func.max(versions_table.c.number)).where(versions_table.c.name == name)
                        ).scalar_one()
                        result = conn.execute(
                            versions_table.insert().values(
                                name=name,
                                number=(top or 0) + 1,
                                status=Status.BAKING.value,
                                recipe_digest=recipe_digest,
                                recipe_path=recipe_path,
                                recipe=recipe,
                                provider=provider,
                                parent=parent,
                                parent_id=parent_row.id if parent_row is not None else None,
                                tags=dict(tags),
                                log="",
                                created_at=now,
                                updated_at=now,
                            )
                        )
                        version_id = inserted_id(result)
                        if parent_row is not None:
                            inherit_revocations(
                                conn, version_id, parent_row.id, parent_revoked=parent_row.status == Status.REVOKED
                            )
                        return self._require_version(conn, version_id)
                except IntegrityError:
                    # A concurrent creator took the same number (PostgreSQL; SQLite writers are serialised).
                    if attempt == _CREATE_ATTEMPTS:
                        raise
                    time.sleep(0.01 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def get_version(self, ref: str) -> ImageVersion:
        """The version a ref names: `NAME@N`, `NAME:CHANNEL` (the channel's current version) or a digest prefix."""
        text = ref.strip()
        match = _REF_NAME_AT_N.match(text)
        if match and len(match["number"]) > 18:  # beyond the database's integers (and Python's int() of huge text)
            raise out_of_range(f"look up {text[:40]}")
        key = name_at_n(text)
        if key is not None:
            where = (versions_table.c.name == key[0]) & (versions_table.c.number == key[1])
            with self._guard(f"look up {text}"), self._read() as conn:
                row = conn.execute(sa.select(versions_table).where(where)).mappings().one_or_none()
            if row is None:
                raise NotFound(
                    f"no image version {text}",
                    fix="`amiforge images list` shows the known versions",
                )
            return version_from_row(row)
        if not text.lower().startswith("sha256:") and _REF_CHANNEL.match(text):
            name, channel = text.split(":", 1)
            query = sa.select(versions_table).join(channels_table, channels_table.c.version_id == versions_table.c.id)
            query = query.where(channels_table.c.name == name, channels_table.c.channel == channel)
            with self._guard(f"look up {text}"), self._read() as conn:
                row = conn.execute(query).mappings().one_or_none()
            if row is None:
                raise NotFound(
                    f"image {name!r} has no channel {channel!r}",
                    fix="`amiforge channels` lists the channels; use NAME@N for a version in none",
                )
            return version_from_row(row)
        return self._by_digest_prefix(text, _digest_prefix(text))

    def _by_digest_prefix(self, ref: str, prefix: str) -> ImageVersion:
        # Digests may be stored bare or as "sha256:<hex>"; a prefix matches either spelling.
        where = sa.or_(
            _starts_with(versions_table.c.digest, prefix), _starts_with(versions_table.c.digest, "sha256:" + prefix)
        )
        with self._guard(f"look up {ref}"), self._read() as conn:
            found = version_from_row.each(
                conn.execute(sa.select(versions_table).where(where).order_by(versions_table.c.id))
            )
        if not found:
            raise NotFound(
                f"no image version has a digest starting with {prefix}",
                fix="`amiforge images list` shows the known versions and their digests",
            )
        if len(found) > 1:
            raise ConfigError(
                f"digest prefix {prefix} is ambiguous: it matches {len(found)} versions",
                problems=[Problem(message=f"{v.ref} has digest {v.digest}", field="ref") for v in found],
                fix="give more characters of the digest, or use NAME@N",
            )
        return found[0]

    def version_tally(self) -> list[tuple[str, str, int]]:
        """(image name, status, how many versions) in one grouped read."""
        v = versions_table
        query = sa.select(v.c.name, v.c.status, sa.func.count()).group_by(v.c.name, v.c.status)
        with self._guard("count versions by state"), self._read() as conn:
            return [(str(n), str(s), int(c)) for n, s, c in conn.execute(query.order_by(v.c.name, v.c.status))]

    def version_heads(self, version_ids: Collection[int]) -> dict[int, tuple[str, int, str | None]]:
        """(name, number, digest) of each of these versions, in one read; ids naming no version are absent."""
        v = versions_table
        ids = sorted(set(version_ids))
        found: dict[int, tuple[str, int, str | None]] = {}
        with self._guard("read versions' names"), self._read() as conn:
            for start in range(0, len(ids), 500):
                query = sa.select(v.c.id, v.c.name, v.c.number, v.c.digest).where(v.c.id.in_(ids[start : start + 500]))
                found.update({int(i): (str(n), int(num), d) for i, n, num, d in conn.execute(query)})
        return found

    def version_states(self, refs: Collection[str]) -> dict[str, tuple[int, Status]]:
        """(id, status) of the versions these `NAME@N` refs name, in one read however many there are. A ref that names
        no version, or is not NAME@N, is absent from the result."""
        keys: dict[tuple[str, int], str] = {}
        for ref in refs:
            key = name_at_n(ref)
            if key is not None:
                keys[key] = ref
        if not keys:
            return {}
        # The wanted (name, number) pairs go in as one JSON parameter, joined to uq_versions_name_number: one index
        # search per pair, and a statement that costs nothing to compile however many pairs there are (a VALUES list
        # or an OR per name takes longer to compile than to run).
        query = _WANTED_VERSIONS[self._engine.dialect.name == "postgresql"]
        found: dict[str, tuple[int, Status]] = {}
        with self._guard("look up versions"), self._read() as conn:
            for name, number, version_id, status in conn.execute(query, {"pairs": json.dumps(sorted(keys))}):
                found[keys[(name, number)]] = (version_id, Status(status))
        return found

    def list_versions(
        self,
        name: str | None = None,
        *,
        limit: int | None = None,
        before: int | None = None,
        summary: bool = False,
        statuses: Collection[Status] | None = None,
        name_contains: str | None = None,
    ) -> list[ImageVersion]:
        """Newest first (by id). `limit`: at most that many; `before`: only versions older than the one with this
        id (the keyset cursor: pass the id of the last version of the previous page). `summary`: leave out each
        version's build log and recipe (they read as empty), which a listing never shows. `statuses`: only those;
        `name_contains`: only image names holding that text (a search)."""
        query = sa.select(*(VERSION_SUMMARY if summary else versions_table.columns)).order_by(
            versions_table.c.id.desc()
        )
        if name is not None:
            query = query.where(versions_table.c.name == name)
        if statuses is not None:
            query = query.where(versions_table.c.status.in_(sorted(s.value for s in statuses)))
        if name_contains:
            query = query.where(versions_table.c.name.contains(name_contains, autoescape=True))
        if before is not None:
            query = query.where(versions_table.c.id < before)
        if limit is not None:
            query = query.limit(max(limit, 0))
        with self._guard("list versions"), self._read() as conn:
            return version_from_row.each(conn.execute(query))

    def count_versions(self, name: str | None = None) -> int:
        """How many versions (of `name`) the registry holds."""
        query = sa.select(sa.func.count()).select_from(versions_table)
        if name is not None:
            query = query.where(versions_table.c.name == name)
        with self._guard("count versions"), self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def latest(self, name: str, statuses: Sequence[Status]) -> ImageVersion | None:
        if not statuses:
            return None
        query = (
            sa.select(versions_table)
            .where(versions_table.c.name == name, versions_table.c.status.in_([s.value for s in statuses]))
            .order_by(versions_table.c.number.desc())
            .limit(1)
        )
        with self._guard(f"find the latest version of {name}"), self._read() as conn:
            row = conn.execute(query).mappings().one_or_none()
        return None if row is None else version_from_row(row)

    def transition(
        self,
        version_id: int,
        target: Status,
        *,
        expect: Status,
        digest: str | None = None,
        size_bytes: int | None = None,
    ) -> ImageVersion:
        check_transition(expect, target)
        values: dict[str, object] = {"status": target.value, "updated_at": self._now()}
        if digest is not None:
            values["digest"] = digest
        if size_bytes is not None:
            values["size_bytes"] = size_bytes
        with self._guard(f"move version {version_id} to {target}"), self._write() as conn:
            if target == Status.REVOKED:
                lock_lineage(conn)  # no descendant is being created meanwhile
            # The compare-and-set: the row changes only if nobody moved it since the caller looked.
            result = conn.execute(
                versions_table.update()
                .where(versions_table.c.id == version_id, versions_table.c.status == expect.value)
                .values(**values)
            )
            current = self._require_version(conn, version_id)
            if result.rowcount == 0:
                raise StateError(
                    f"{current.ref} is now '{current.status}', not '{expect}': another worker changed it first",
                    fix=f"re-read the version (`amiforge images show {current.ref}`) and decide again",
                )
            if target == Status.REVOKED:
                record_revocation(conn, version_id)
            return current

    def append_log(self, version_id: int, text: str) -> None:
        with self._guard(f"append to the log of version {version_id}"), self._write() as conn:
            result = conn.execute(
                versions_table.update().where(versions_table.c.id == version_id).values(log=versions_table.c.log + text)
            )
            if result.rowcount == 0:
                raise self._not_found(version_id)

    # artifacts, layers, boot reports

    def add_artifact(self, version_id: int, artifact: Artifact) -> Artifact:
        created_at = aware(artifact.created_at, "created_at") if artifact.created_at else self._now()
        with self._guard(f"record an artifact of version {version_id}"), self._write() as conn:
            version = self._require_version(conn, version_id)
            # Idempotent for a resumed run: recording the same copy twice returns the first record.
            existing = (
                conn.execute(
                    sa.select(artifacts_table).where(
                        artifacts_table.c.version_id == version_id,
                        artifacts_table.c.provider == artifact.provider,
                        artifacts_table.c.region == artifact.region,
                        artifacts_table.c.location == artifact.location,
                    )
                )
                .mappings()
                .one_or_none()
            )
            if existing is not None:
                if existing["digest"] != artifact.digest:
                    raise StateError(
                        f"{version.ref} already has an artifact at {artifact.region}:{artifact.location} "
                        f"with digest {existing['digest']}, not {artifact.digest}",
                        fix="an artifact's content never changes; give the new copy a new location",
                    )
                return artifact_from_row(existing)
            result = conn.execute(
                artifacts_table.insert().values(
                    version_id=version_id,
                    provider=artifact.provider,
                    region=artifact.region,
                    location=artifact.location,
                    digest=artifact.digest,
                    size_bytes=artifact.size_bytes,
                    kernel=artifact.kernel,
                    initrd=artifact.initrd,
                    created_at=created_at,
                )
            )
            artifact_id = inserted_id(result)
        return replace(artifact, id=artifact_id, version_id=version_id, created_at=created_at)

    def artifacts(self, version_id: int) -> list[Artifact]:
        query = (
            sa.select(artifacts_table).where(artifacts_table.c.version_id == version_id).order_by(artifacts_table.c.id)
        )
        with self._guard(f"list the artifacts of version {version_id}"), self._read() as conn:
            return artifact_from_row.each(conn.execute(query))

    def provider_artifacts(self, provider: str) -> list[tuple[str, Artifact]]:
        query = (
            sa.select(artifacts_table, versions_table.c.name, versions_table.c.number)
            .join(versions_table, versions_table.c.id == artifacts_table.c.version_id)
            .where(artifacts_table.c.provider == provider)
            .order_by(artifacts_table.c.id)
        )
        with self._guard(f"list the {provider} artifacts"), self._read() as conn:
            return [(_ref_of(r), artifact_from_row(r)) for r in conn.execute(query).mappings()]

    def record_layers(self, version_id: int, layers: Sequence[LayerRecord]) -> None:
        with self._guard(f"record the layers of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            # Replace, not append: a resumed bake records its layers again and must not duplicate them.
            conn.execute(layers_table.delete().where(layers_table.c.version_id == version_id))
            if layers:
                conn.execute(
                    layers_table.insert(),
                    [
                        {
                            "version_id": version_id,
                            "index": layer.index,
                            "key": layer.key,
                            "description": layer.description,
                            "hit": layer.hit,
                            "seconds": layer.seconds,
                            "size_bytes": layer.size_bytes,
                        }
                        for layer in layers
                    ],
                )

    def layers(self, version_id: int) -> list[LayerRecord]:
        query = sa.select(layers_table).where(layers_table.c.version_id == version_id).order_by(layers_table.c["index"])
        with self._guard(f"list the layers of version {version_id}"), self._read() as conn:
            return layer_from_row.each(conn.execute(query))

    def layer_keys(self, *, excluding: Collection[Status] = ()) -> set[str]:
        """The key of every layer any version records, but versions in `excluding` states; one read."""
        query = (
            sa.select(layers_table.c.key)
            .distinct()
            .join(versions_table, versions_table.c.id == layers_table.c.version_id)
        )
        if excluding:
            query = query.where(versions_table.c.status.not_in(sorted(s.value for s in excluding)))
        with self._guard("list the layers versions use"), self._read() as conn:
            return set(conn.execute(query).scalars())

    def add_boot_report(self, version_id: int, report: BootReport) -> BootReport:
        started_at = aware(report.started_at, "started_at")
        checks = [{"name": c.name, "kind": c.kind, "passed": c.passed, "detail": c.detail} for c in report.checks]
        with self._guard(f"record a boot report of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            result = conn.execute(
                boot_reports_table.insert().values(
                    version_id=version_id,
                    time_to_ready=report.time_to_ready,
                    checks=checks,
                    console=report.console,
                    accel=report.accel,
                    started_at=started_at,
                    duration=report.duration,
                )
            )
            report_id = inserted_id(result)
        return replace(report, id=report_id, version_id=version_id, started_at=started_at)

    def boot_reports(self, version_id: int) -> list[BootReport]:
        query = (
            sa.select(boot_reports_table)
            .where(boot_reports_table.c.version_id == version_id)
            .order_by(boot_reports_table.c.id)
        )
        with self._guard(f"list the boot reports of version {version_id}"), self._read() as conn:
            return boot_report_from_row.each(conn.execute(query))

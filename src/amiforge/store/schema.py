"""The registry's tables (their history lives in `migrations/`) and the column type they share.

Kept apart from the store's code so the migrations, the store and its tests all read one definition.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Dialect


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime, what: str) -> datetime:
    # Naive datetimes are a programming error: we cannot know which zone they meant.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got naive {value.isoformat()}")
    return value.astimezone(UTC)


class UndecodableValue(ValueError):
    """A value the registry holds that cannot be read back (JSON that is not JSON, a time that is not a time): the
    registry was changed outside amiforge. Raised only while decoding rows, so the store can tell it from a bug."""


# The registry's JSON columns go through orjson, several times faster than the json module both ways (a scan row
# holds ~1,000 packages and ~1,000 findings, and a rescan of 100 versions reads and writes a hundred of them).
# Integers orjson would read as floats (past 64 bits: 20 digits or more) are read by the json module instead. Found
# by mapping every digit to "0" and the rest to " " (bytes.translate: C speed, ~0.6 ms for a scan's 450 KB of
# findings, where a regular expression took 6 ms).
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_INTEGER = b"0" * 20


def decode_json(text: str | bytes) -> Any:
    """The engine's JSON deserializer: like json.loads, but a damaged value raises UndecodableValue."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _LONG_INTEGER not in data.translate(_DIGITS):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # NaN and Infinity, which the json module wrote before 0008: read below
    try:
        return json.loads(text)
    except ValueError as e:
        raise UndecodableValue("a JSON column holds something that is not JSON") from e


# What orjson would write where the json module refused (datetimes, dataclasses): passed through to json.dumps, which
# refuses them still, so a value the registry cannot read back as it was is a bug caught here.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def encode_json(value: Any) -> str:
    """The engine's JSON serializer: what json.dumps writes, as orjson writes it (compact). A value orjson does not
    take (integers past 64 bits, dict keys that are not strings, datetimes, dataclasses) goes to the json module.
    NaN is written as null (the json module wrote NaN, which is not JSON and PostgreSQL refuses)."""
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        return json.dumps(value)


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC in, aware UTC out. SQLite stores no zone, so results are tagged UTC on the way back."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return aware(value, "timestamp")

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], datetime | None] | None:
        decode = super().result_processor(dialect, coltype)
        if decode is None:
            return None
        checked = decode

        def process(value: Any) -> datetime | None:
            try:
                return checked(value)
            except (ValueError, TypeError) as e:
                raise UndecodableValue(f"{value!r} is not a date and time") from e

        return process

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = sa.MetaData()

versions_table = sa.Table(
    "versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("recipe_digest", sa.String(128), nullable=False),
    sa.Column("recipe_path", sa.Text, nullable=False),
    sa.Column("recipe", sa.Text, nullable=False, server_default=""),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("digest", sa.String(128), nullable=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=True),
    sa.Column("parent", sa.String(128), nullable=True),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("log", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    # The id of `parent` (0006), resolved when the version is created, so ancestry is one indexed recursive query.
    # Always smaller than the version's own id (a parent exists before its child): lineage queries follow only such
    # links, so even a hand-edited cycle cannot make them loop. NULL when `parent` names no version as NAME@N.
    # No foreign key: SQLite cannot add one to an existing table that other tables reference.
    sa.Column("parent_id", sa.Integer, nullable=True),
    sa.UniqueConstraint("name", "number", name="uq_versions_name_number"),
    sa.Index("ix_versions_digest", "digest"),
    sa.Index("ix_versions_parent_id", "parent_id"),  # children of a version (descendants)
    sa.Index("ix_versions_name_id", "name", "id"),  # one image's versions, newest first, a page at a time
)

artifacts_table = sa.Table(
    "artifacts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("versions.id", name="fk_artifacts_version"),
        nullable=False,
    ),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("region", sa.String(128), nullable=False),
    sa.Column("location", sa.Text, nullable=False),
    sa.Column("digest", sa.String(128), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("kernel", sa.Text, nullable=True),
    sa.Column("initrd", sa.Text, nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("version_id", "provider", "region", "location", name="uq_artifacts_copy"),
)

layers_table = sa.Table(
    "layers",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("versions.id", name="fk_layers_version"),
        nullable=False,
    ),
    sa.Column("index", sa.Integer, nullable=False),
    sa.Column("key", sa.String(128), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("hit", sa.Boolean, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("version_id", "index", name="uq_layers_version_index"),
)

boot_reports_table = sa.Table(
    "boot_reports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("versions.id", name="fk_boot_reports_version"),
        nullable=False,
    ),
    # No `passed` column: the verdict is derived from `checks` (BootReport.passed), never stored apart (0005).
    sa.Column("time_to_ready", sa.Float, nullable=True),
    sa.Column("checks", sa.JSON, nullable=False),
    sa.Column("console", sa.Text, nullable=False),
    sa.Column("accel", sa.String(16), nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("duration", sa.Float, nullable=False),
    sa.Index("ix_boot_reports_version_id", "version_id"),
)

events_table = sa.Table(
    "events",
    metadata,
    # Chosen by the appender (head.seq + 1), never by the database: the hash covers it.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("ref", sa.String(128), nullable=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index("ix_events_ref", "ref"),
)

# One row (id = 1): seq and hash of the newest event. Appenders lock it by updating it, which serialises them,
# and verify_events compares it with the last row, so deleting the newest events is detected too.
event_head_table = sa.Table(
    "event_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.CheckConstraint("id = 1", name="ck_event_head_single_row"),
)


# --- supply chain (migration 0002) ----------------------------------------------------------------------------


def _version_fk(table: str) -> sa.Column[int]:
    return sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name=f"fk_{table}_version"), nullable=False)


scans_table = sa.Table(
    "scans",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    _version_fk("scans"),
    sa.Column("scanned_at", UtcDateTime, nullable=False),
    sa.Column("packages", sa.JSON, nullable=False),
    sa.Column("sbom", sa.Text, nullable=False),  # "": the document is in `sboms` under sbom_digest (since 0008)
    sa.Column("sbom_digest", sa.String(64), nullable=False),
    sa.Column("findings", sa.JSON, nullable=False),
    sa.Column("vulndb", sa.Text, nullable=False),
    sa.Column("changelogs", sa.JSON, nullable=True),  # source package -> [[version, [CVE ids]]]; NULL: not read
    sa.Column("vulndb_as_of", sa.JSON, nullable=True),  # source name -> ISO time of its data; NULL: none recorded
    sa.Column("release", sa.String(32), nullable=True),  # os-release VERSION_ID; NULL: not recorded
    sa.Index("ix_scans_version_id", "version_id"),
)

# SBOM documents by their sha256: a rescan records a new scan of the same packages, and a version's scans share
# one document (~700 KB for 1,000 packages) instead of a copy each.
sboms_table = sa.Table(
    "sboms",
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("document", sa.Text, nullable=False),
)

vulndb_imports_table = sa.Table(
    "vulndb_imports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("imported_at", UtcDateTime, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
)

# The raw OSV record, as imported; one row per advisory id (a newer import replaces it). Beside it, what a finding
# takes from it (title, identifiers, severity, withdrawn), parsed at import; NULL on a record imported before 0008,
# which the service layer parses once and fills in (the partial index finds those without reading the records).
advisories_table = sa.Table(
    "advisories",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("import_id", sa.Integer, sa.ForeignKey("vulndb_imports.id", name="fk_advisories_import"), nullable=False),
    sa.Column("modified", sa.String(64), nullable=False),
    sa.Column("record", sa.JSON, nullable=False),
    sa.Column("title", sa.Text, nullable=True),
    sa.Column("identifiers", sa.JSON, nullable=True),
    sa.Column("severity", sa.String(16), nullable=True),
    sa.Column("withdrawn", sa.Boolean, nullable=True),
    sa.Index("ix_advisories_unparsed", "id", sqlite_where=sa.text("title IS NULL"),
             postgresql_where=sa.text("title IS NULL")),
)  # fmt: skip

# Each advisory's affected intervals of Debian source packages, parsed at import: what matching reads (a scan of a
# thousand packages reads ~10,000 advisories; their raw JSON took seconds to decode and validate again).
advisory_ranges_table = sa.Table(
    "advisory_ranges",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("advisory_id", sa.String(128), sa.ForeignKey("advisories.id", name="fk_advisory_ranges_advisory"),
              nullable=False),
    sa.Column("ecosystem", sa.String(64), nullable=False),
    sa.Column("package", sa.String(256), nullable=False),
    sa.Column("introduced", sa.Text, nullable=True),
    sa.Column("fixed", sa.Text, nullable=True),
    sa.Column("last_affected", sa.Text, nullable=True),
    sa.Column("versions", sa.JSON(none_as_null=True), nullable=True),  # NULL when the entry lists none (most)
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Index("ix_advisory_ranges_package", "package", "ecosystem"),
    sa.Index("ix_advisory_ranges_advisory", "advisory_id"),
)  # fmt: skip

# Which (source) packages each advisory names (any release). Nothing reads it since 0008 (matching reads
# advisory_ranges); imports still write it so that a downgrade to 0007 leaves the links that revision matches by.
advisory_packages_table = sa.Table(
    "advisory_packages",
    metadata,
    sa.Column("advisory_id", sa.String(128), sa.ForeignKey("advisories.id", name="fk_advisory_packages_advisory"),
              primary_key=True),
    sa.Column("package", sa.String(256), primary_key=True),
    sa.Index("ix_advisory_packages_package", "package"),
)  # fmt: skip

# The data each vulnerability source holds now (one row per source: an update replaces it whole).
vulndb_sources_table = sa.Table(
    "vulndb_sources",
    metadata,
    sa.Column("name", sa.String(16), primary_key=True),
    sa.Column("origin", sa.Text, nullable=False),
    sa.Column("as_of", UtcDateTime, nullable=False),
    sa.Column("imported_at", UtcDateTime, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
)

# The Debian Security Tracker's verdict on one CVE in one source package on one release (codename).
debian_tracker_table = sa.Table(
    "debian_tracker",
    metadata,
    sa.Column("package", sa.String(256), primary_key=True),
    sa.Column("cve", sa.String(64), primary_key=True),
    sa.Column("release", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("urgency", sa.String(64), nullable=False),
    sa.Column("fixed_version", sa.String(256), nullable=True),
    sa.Column("no_dsa", sa.Text, nullable=True),
)

# CVSS ratings of CVEs, one per (CVE, publisher, CVSS version), scored from the vector.
cve_scores_table = sa.Table(
    "cve_scores",
    metadata,
    sa.Column("cve", sa.String(64), primary_key=True),
    sa.Column("source", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(8), primary_key=True),
    sa.Column("vector", sa.Text, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
)

signing_keys_table = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("key_id", sa.String(128), primary_key=True),
    sa.Column("algorithm", sa.String(64), nullable=False),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("added_at", UtcDateTime, nullable=False),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Column("revoked_reason", sa.Text, nullable=True),
)

signatures_table = sa.Table(
    "signatures",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    _version_fk("signatures"),
    sa.Column("key_id", sa.String(128), nullable=False),
    sa.Column("envelope", sa.Text, nullable=False),
    sa.Column("statement_digest", sa.String(64), nullable=False),
    sa.Column("signed_at", UtcDateTime, nullable=False),
    sa.Index("ix_signatures_version_id", "version_id"),
)

# Long operations that must resume (distribute; rollouts later): one row per attempt. Attempts of the same operation
# on the same version share `run_id`, so a rerun adopts what an earlier attempt created (cloud tags, client tokens).
operations_table = sa.Table(
    "operations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    _version_fk("operations"),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Index("ix_operations_version_id", "version_id"),
)

# Rollouts (lifecycle/rollout.py): the controller's durable state machine, its replacements and its decisions.
rollouts_table = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("target", sa.String(200), nullable=False),
    _version_fk("rollouts"),
    sa.Column("strategy", sa.JSON, nullable=False),
    sa.Column("waves", sa.JSON, nullable=False),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("requested", sa.String(16), nullable=True),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Column("detail", sa.JSON, nullable=False),
    # A rollback (`amiforge rollback`): the rollout whose change it undoes (M6 counts that one as rolled back). No
    # foreign key (migrations/versions/r0010): the store checks the rollout exists, and rollouts are never deleted.
    sa.Column("undoes", sa.Integer, nullable=True),
    # Who drives it now (migration 0013): a controller's lease, renewed while it runs (lifecycle/rollout.py).
    sa.Column("controller", sa.String(200), nullable=True),
    sa.Column("controller_seen_at", UtcDateTime, nullable=True),
    sa.Index("ix_rollouts_target", "target"),
    sa.Index("ix_rollouts_undoes", "undoes"),
)

rollout_replacements_table = sa.Table(
    "rollout_replacements",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", name="fk_replacements_rollout"), nullable=False),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("old_member", sa.String(128), nullable=False),
    sa.Column("old_version", sa.String(80), nullable=True),
    sa.Column("token", sa.String(128), nullable=False, unique=True),
    sa.Column("new_member", sa.String(128), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Index("ix_rollout_replacements_rollout_id", "rollout_id"),
)

rollout_decisions_table = sa.Table(
    "rollout_decisions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", name="fk_decisions_rollout"), nullable=False),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("numbers", sa.JSON, nullable=False),
    sa.Index("ix_rollout_decisions_rollout_id", "rollout_id"),
)

# The pointer per (image name, channel); `previous_version_id` is the rollback image.
channels_table = sa.Table(
    "channels",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("channel", sa.String(32), primary_key=True),
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_channels_version"), nullable=False),
    sa.Column("previous_version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_channels_previous"),
              nullable=True),
    sa.Column("moved_at", UtcDateTime, nullable=False),
    sa.Column("moved_by", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)  # fmt: skip

# Every pointer move, for soak times ("in staging since …") and history.
channel_moves_table = sa.Table(
    "channel_moves",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("channel", sa.String(32), nullable=False),
    _version_fk("channel_moves"),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index("ix_channel_moves_version_id", "version_id"),
)

# Which ancestors of each version have been revoked (0006), so `channels` flags every pointer from one indexed read
# instead of walking each ancestry. A row (version, ancestor) is written when the ancestor is revoked (for every
# descendant it has then) and when a version is created (its parent's rows, and the parent itself if revoked).
# Readers keep only rows whose ancestor is still `revoked` (a revoked version may be retired later).
revoked_ancestors_table = sa.Table(
    "revoked_ancestors",
    metadata,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_revoked_ancestors_version"),
              primary_key=True),
    sa.Column("ancestor_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_revoked_ancestors_ancestor"),
              primary_key=True),
)  # fmt: skip


# --- telemetry (migration 0009) ---------------------------------------------------------------------------------

# One row per boot of a version on a target (a boot test, a fleet member, an instance): what M1-M4 are computed
# from over a window. A row only moves forward (outcome, stop and replacement set once; heartbeats advance).
boots_table = sa.Table(
    "boots",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    _version_fk("boots"),
    sa.Column("target", sa.String(200), nullable=False),  # boot-test | local:NAME | aws:REGION/GROUP
    sa.Column("instance", sa.String(128), nullable=False),
    sa.Column("launched_at", UtcDateTime, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=True),  # ready | failed | timeout; NULL: still booting
    sa.Column("time_to_ready", sa.Float, nullable=True),
    sa.Column("ended_at", UtcDateTime, nullable=True),
    sa.Column("stopped_at", UtcDateTime, nullable=True),
    sa.Column("replaced", sa.Boolean, nullable=False),
    sa.Column("last_heartbeat_at", UtcDateTime, nullable=True),
    sa.Column("detail", sa.Text, nullable=False),
    # {kernel, userspace, the slowest units: seconds} as the guest's systemd measured them (migration 0011)
    sa.Column("timeline", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("console_tail", sa.JSON(none_as_null=True), nullable=True),  # a failed boot's last console lines
    sa.UniqueConstraint("target", "instance", name="uq_boots_target_instance"),
    sa.Index("ix_boots_version_launched", "version_id", "launched_at"),
    sa.Index("ix_boots_stopped", "stopped_at"),  # a window's boots: those still running and those stopped in it
    sa.Index("ix_boots_ended", "ended_at"),  # the latest outcomes (on-call: recent failed boots)
    # Boots still running (NULL stopped_at): what each collection reconciles, and M4's denominator.
    sa.Index("ix_boots_running", "target", sqlite_where=sa.text("stopped_at IS NULL"),
             postgresql_where=sa.text("stopped_at IS NULL")),
)  # fmt: skip

# Every boot of a version on a target since the registry began, kept as counters (what Prometheus scrapes, without
# reading a million boots): outcomes, replacements, and times to ready per whole second (ceil -> count, JSON).
boot_totals_table = sa.Table(
    "boot_totals",
    metadata,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", name="fk_boot_totals_version"), primary_key=True),
    sa.Column("target", sa.String(200), primary_key=True),
    sa.Column("ready", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("timeout", sa.Integer, nullable=False),
    sa.Column("replaced", sa.Integer, nullable=False),
    sa.Column("ttr_sum", sa.Float, nullable=False),
    sa.Column("ttr_seconds", sa.JSON, nullable=False),
)  # fmt: skip


# --- tokens of the web console and API (migration 0012) ------------------------------------------------------------

# Only the SHA-256 of a token's secret: the secret itself is printed once, at `amiforge tokens create`.
api_tokens_table = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Column("last_used_at", UtcDateTime, nullable=True),
)

# A browser session: the SHA-256 of its own random secret (the cookie), the token it was opened with, when it ends.
# Logging out deletes it; revoking the token ends it at the next request.
api_sessions_table = sa.Table(
    "api_sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("token_id", sa.Integer, sa.ForeignKey("api_tokens.id", name="fk_api_sessions_token"), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Index("ix_api_sessions_expires_at", "expires_at"),
)

# The way out of each artifact (lifecycle/retire.py, migration 0014): one row per artifact once it is deprecated,
# moved on by compare-and-set on `stage`, each move recorded as an event in the same transaction.
retirements_table = sa.Table(
    "retirements",
    metadata,
    sa.Column(
        "artifact_id",
        sa.Integer,
        sa.ForeignKey("artifacts.id", name="fk_retirements_artifact"),
        primary_key=True,
        autoincrement=False,
    ),
    _version_fk("retirements"),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("deprecated_at", UtcDateTime, nullable=False),
    sa.Column("deregistered_at", UtcDateTime, nullable=True),
    sa.Column("purged_at", UtcDateTime, nullable=True),
    sa.Column("snapshots", sa.JSON, nullable=False),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Index("ix_retirements_version_id", "version_id"),
)

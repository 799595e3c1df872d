"""What every registry backend offers. One implementation today: sql.py (SQLite or PostgreSQL).

Listings that can grow without bound (versions, events) read a page at a time when asked: `limit` keeps the newest
that many, and `before` (a keyset cursor: the id, or seq, of the oldest item of the page already shown) continues
below it. Versions read by listings and lineage queries leave out the build log and the recipe (read as empty)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from amiforge.model import (
    AdvisoryHead,
    AdvisoryRange,
    ApiToken,
    Artifact,
    BootObservation,
    BootRecord,
    BootReport,
    BootTotals,
    ChannelPointer,
    CvssScore,
    DebianVerdict,
    Event,
    Finding,
    ImageVersion,
    LayerRecord,
    Operation,
    Retirement,
    Rollout,
    RolloutDecision,
    RolloutReplacement,
    ScanRecord,
    SignatureRecord,
    Status,
    StoredAdvisory,
    TrustedKey,
    VulnDbImport,
    VulnDbSource,
)


class Store(Protocol):
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
        """`recipe` is the recipe as baked (canonical JSON), so a later `test` uses the checks it was built with.

        Allocate NAME@N (N = 1 + highest N of that name, atomically) in state `baking`."""
        ...

    def get_version(self, ref: str) -> ImageVersion:
        """Resolve `NAME@N`, or a digest prefix (≥ 8 hex chars, unique).

        Raises NotFound (or ConfigError if the ref is malformed or the prefix is ambiguous)."""
        ...

    def version_states(self, refs: Collection[str]) -> dict[str, tuple[int, Status]]:
        """(id, status) of the versions these NAME@N refs name, in one read; a ref naming no version (or not NAME@N)
        is absent from the result."""
        ...

    def version_heads(self, version_ids: Collection[int]) -> dict[int, tuple[str, int, str | None]]:
        """(name, number, digest) of each of these versions, in one read; ids naming no version are absent."""
        ...

    def version_tally(self) -> list[tuple[str, str, int]]:
        """(image name, status, how many versions) in one grouped read."""
        ...

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
        """Newest first (by id); at most `limit`, only ids below `before`; `summary`: without build log and recipe;
        `statuses`: only those; `name_contains`: image names holding that text."""
        ...

    def count_versions(self, name: str | None = None) -> int: ...

    def ancestry(self, version_id: int, *, limit: int | None = None) -> list[ImageVersion]:
        """Parent, grandparent, … (nearest first; the nearest `limit`), in one query; without build log and recipe."""
        ...

    def children(self, version_id: int) -> list[str]:
        """NAME@N of each version baked from this one (not their own children), newest first."""
        ...

    def descendants(self, version_id: int) -> list[ImageVersion]:
        """Every version baked from this one, from those, … (newest first), in one query; without log and recipe."""
        ...

    def revoked_ancestors(self, version_ids: Collection[int]) -> dict[int, list[str]]:
        """For each id: NAME@N of its ancestors revoked now (nearest first), for any number of versions in one read."""
        ...

    def latest(self, name: str, statuses: Sequence[Status]) -> ImageVersion | None:
        """The highest-numbered version of `name` in one of `statuses`."""
        ...

    def transition(
        self,
        version_id: int,
        target: Status,
        *,
        expect: Status,
        digest: str | None = None,
        size_bytes: int | None = None,
    ) -> ImageVersion:
        """Compare-and-set: move the version to `target` only if it is still in `expect`.
        Illegal step (model.TRANSITIONS) or lost race -> StateError. Optional fields are set in the same UPDATE."""
        ...

    def append_log(self, version_id: int, text: str) -> None: ...

    def add_artifact(self, version_id: int, artifact: Artifact) -> Artifact: ...

    def artifacts(self, version_id: int) -> list[Artifact]: ...

    def provider_artifacts(self, provider: str) -> list[tuple[str, Artifact]]:
        """Every artifact of `provider` in the registry, with its version's NAME@N, in one read."""
        ...

    def record_layers(self, version_id: int, layers: Sequence[LayerRecord]) -> None: ...

    def layers(self, version_id: int) -> list[LayerRecord]: ...

    def layer_keys(self, *, excluding: Collection[Status] = ()) -> set[str]:
        """The key of every layer any version records, but versions in `excluding` states; one read."""
        ...

    def add_boot_report(self, version_id: int, report: BootReport) -> BootReport: ...

    def boot_reports(self, version_id: int) -> list[BootReport]:
        """Oldest first."""
        ...

    def append_event(
        self, kind: str, *, actor: str, ref: str | None = None, data: Mapping[str, object] | None = None
    ) -> Event:
        """Append to the hash chain: hash = sha256(prev_hash + canonical JSON of the event's fields)."""
        ...

    def events(
        self,
        ref: str | None = None,
        *,
        limit: int | None = None,
        before: int | None = None,
        kinds: Collection[str] | None = None,
        refs: Collection[str] | None = None,
    ) -> list[Event]:
        """Oldest first; with `ref`, only events about that version (by exact NAME@N); with `kinds`, only those
        kinds; `limit`: the newest that many; `before`: only seqs below it."""
        ...

    def count_events(self, ref: str | None = None, *, before: int | None = None) -> int: ...

    def verify_events(self) -> list[str]:
        """Recompute the chain; return one message per broken link (empty list = intact)."""
        ...

    # --- supply chain ---------------------------------------------------------------------------------------

    def add_scan(self, version_id: int, scan: ScanRecord) -> ScanRecord: ...

    def latest_scan(self, version_id: int) -> ScanRecord | None: ...

    def latest_scan_ids(self, version_ids: Collection[int]) -> dict[int, int]:
        """The id of each version's latest scan; versions never scanned are absent."""
        ...

    def scan_findings(self, scan_id: int) -> tuple[Finding, ...]:
        """The findings of one scan (immutable: safe to keep by its id)."""
        ...

    def import_advisories(
        self,
        source: str,
        records: Sequence[StoredAdvisory],
        *,
        state: VulnDbSource | None = None,
        replace_all: bool = False,
    ) -> VulnDbImport:
        """Advisories (raw OSV record and parsed form); a re-imported id replaces the old.
        `replace_all`: they are the whole dataset; `state`: the osv source's new row, in the same transaction."""
        ...

    def unparsed_advisories(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """(id, raw record) of up to `limit` advisories stored without their parsed form (imported before 0008)."""
        ...

    def store_parsed(self, records: Sequence[StoredAdvisory]) -> int:
        """The parsed form of advisories stored without it (those still without it: how many)."""
        ...

    def advisory_ranges(
        self, packages: Collection[str], ecosystems: Collection[str]
    ) -> tuple[dict[str, AdvisoryHead], list[AdvisoryRange]]:
        """Ranges of these source packages in these ecosystems, of advisories not withdrawn; their heads by id."""
        ...

    def replace_debian_tracker(
        self, entries: Iterable[tuple[str, str, str, DebianVerdict]], state: VulnDbSource
    ) -> VulnDbSource:
        """Debian's verdicts (package, CVE, release codename, verdict), replacing all earlier ones atomically."""
        ...

    def debian_verdicts(self, packages: Collection[str], release: str) -> dict[tuple[str, str], DebianVerdict]: ...

    def replace_cve_scores(self, scores: Iterable[tuple[str, CvssScore]], state: VulnDbSource) -> VulnDbSource:
        """CVSS ratings (CVE, rating), replacing all earlier ones atomically."""
        ...

    def cve_scores(self, cves: Collection[str]) -> dict[str, list[CvssScore]]: ...

    def vulndb_sources(self) -> list[VulnDbSource]: ...

    def all_advisories(self) -> list[dict[str, Any]]: ...

    def vulndb_imports(self) -> list[VulnDbImport]: ...

    def advisory_count(self) -> int: ...

    def add_key(self, key: TrustedKey, *, actor: str) -> tuple[TrustedKey, bool]:
        """Trust a key (idempotent); whether this call added it. Records `key.added` in the same transaction."""
        ...

    def signing_keys(self) -> list[TrustedKey]: ...

    def revoke_key(self, key_id: str, reason: str, *, actor: str) -> TrustedKey:
        """Stop trusting a key; records `key.revoked` in the same transaction."""
        ...

    def add_signature(self, version_id: int, signature: SignatureRecord) -> SignatureRecord: ...

    def signatures(self, version_id: int) -> list[SignatureRecord]: ...

    def begin_operation(self, kind: str, version_id: int, *, actor: str, new_run_id: str) -> Operation:
        """A new attempt at `kind` on the version, `running`. It takes the run id of the version's earlier
        attempts at the same kind, if any (so the rerun adopts their work), else `new_run_id`."""
        ...

    def update_operation(self, operation_id: int, state: str, detail: Mapping[str, object]) -> Operation:
        """Record progress (`running`) or the end (`done`/`failed`) of an attempt, with what it did so far."""
        ...

    def operations(self, version_id: int, kind: str | None = None) -> list[Operation]: ...

    # rollouts (lifecycle/rollout.py)

    def create_rollout(
        self,
        target: str,
        version_id: int,
        *,
        strategy: Mapping[str, object],
        waves: Sequence[int],
        actor: str,
        undoes: int | None = None,
    ) -> Rollout:
        """A new `running` rollout (a rollback names the rollout it `undoes`); StateError if the target has another
        rollout running or paused."""
        ...

    def get_rollout(self, rollout_id: int) -> Rollout: ...

    def rollouts(self, *, target: str | None = None, version_id: int | None = None) -> list[Rollout]: ...

    def claim_rollout(
        self, rollout_id: int, owner: str, *, expect: str | None, expect_seen: datetime | None = None
    ) -> bool:
        """Make `owner` the controller of a live rollout whose controller is still `expect`, last renewed at
        `expect_seen` (compare-and-set: a renewal in between makes it fail); False if it is no longer so."""
        ...

    def renew_rollout(self, rollout_id: int, owner: str, *, release: bool = False) -> bool:
        """Renew `owner`'s lease on the rollout (or give it up: `release`); False if it no longer holds it."""
        ...

    def rollout_page(
        self, *, limit: int, before: int | None = None, states: Collection[str] | None = None
    ) -> list[Rollout]:
        """Newest first: at most `limit` rollouts with ids below `before` (the keyset cursor), in `states` if given."""
        ...

    def rollout_tally(self) -> list[tuple[str, str, str, bool, bool, int]]:
        """(image, target, state, is a rollback, was undone by one, count) of every rollout ever started."""
        ...

    def update_rollout(
        self,
        rollout_id: int,
        *,
        expect: str,
        state: str | None = None,
        wave: int | None = None,
        detail: Mapping[str, object] | None = None,
        clear_request: bool = False,
    ) -> Rollout:
        """Compare-and-set on the state (StateError if it is no longer `expect`)."""
        ...

    def request_rollout(self, rollout_id: int, request: str) -> Rollout:
        """Ask the controller to `pause` or `abort` (it acts between steps); StateError once the rollout is over."""
        ...

    def plan_replacements(
        self, rollout_id: int, wave: int, kind: str, items: Sequence[tuple[str, str | None, str]]
    ) -> list[RolloutReplacement]:
        """Record (old member, old version, token) to replace; a token recorded before is kept as it is."""
        ...

    def finish_replacement(self, token: str, *, new_member: str, state: str) -> RolloutReplacement: ...

    def replacements(self, rollout_id: int) -> list[RolloutReplacement]: ...

    def add_decision(
        self, rollout_id: int, wave: int, *, passed: bool, action: str, numbers: Mapping[str, object]
    ) -> RolloutDecision: ...

    def decisions(self, rollout_id: int) -> list[RolloutDecision]: ...

    def move_channel(
        self, name: str, channel: str, version_id: int, *, expect_current: int | None, actor: str, reason: str
    ) -> ChannelPointer:
        """Compare-and-set on the current pointer (None: the channel has none yet); old current -> previous."""
        ...

    def channels(self, name: str | None = None, channel: str | None = None) -> list[ChannelPointer]: ...

    def channel_entries(self, version_id: int) -> dict[str, datetime]: ...

    # telemetry (store/telemetry.py)

    def record_boots(self, target: str, observations: Sequence[BootObservation]) -> int:
        """Record what is known now of these boots on `target` (only what moves each forward: an outcome, a stop,
        a replacement set once; a later heartbeat), with their totals, in one transaction; how many changed."""
        ...

    def stop_boots(
        self, target: str, *, keep: Collection[str], at: datetime, launched_before: datetime | None = None
    ) -> list[str]:
        """Mark the boots on `target` still running, but for the instances in `keep` (and those launched since
        `launched_before`), as stopped at `at`."""
        ...

    def running_targets(self) -> list[str]:
        """Targets with a boot not known to have stopped."""
        ...

    def boots_in_window(
        self,
        start: datetime,
        end: datetime,
        *,
        version_ids: Collection[int] | None = None,
        targets: Collection[str] | None = None,
    ) -> list[BootRecord]:
        """Boots alive at some time in [start, end), oldest launch first."""
        ...

    def boot_totals(self, version_ids: Iterable[int] | None = None) -> list[BootTotals]:
        """Every (version, target)'s totals since the registry began (or only these versions')."""
        ...

    def running_members(self) -> list[tuple[int, str, datetime | None]]:
        """(version id, target, last heartbeat) of every boot not known to have stopped."""
        ...

    def recent_boots(self, since: datetime, limit: int) -> list[BootRecord]:
        """The newest `limit` boots decided since `since`, newest first."""
        ...

    def versions_with_boots(self) -> list[tuple[int, str, int]]:
        """(id, image name, number) of every version that has booted anywhere."""
        ...

    # tokens of the web console and API (store/tokens.py)

    def add_token(self, name: str, role: str, secret_sha256: str, *, actor: str) -> ApiToken:
        """A new token; StateError if the name is taken (revoked tokens keep their names)."""
        ...

    def tokens(self) -> list[ApiToken]:
        """Every token, revoked ones too, oldest first."""
        ...

    def token_by_secret(self, secret_sha256: str) -> ApiToken | None:
        """The token whose secret hashes to this, revoked or not; its last use is recorded (at most once a minute)."""
        ...

    def revoke_token(self, name: str) -> tuple[ApiToken, bool]:
        """Revoke the named token; (token, False) if it was already revoked."""
        ...

    def add_session(self, token_id: int, secret_sha256: str, expires_at: datetime) -> None:
        """A session of the token, until `expires_at`; sessions that have ended are deleted on the way."""
        ...

    def session_token(self, secret_sha256: str) -> ApiToken | None:
        """The token of the live session whose secret hashes to this (None: unknown or ended)."""
        ...

    def end_session(self, secret_sha256: str) -> bool: ...

    # retirements (lifecycle/retire.py)

    def retirements(self, artifact_ids: Collection[int] | None = None) -> dict[int, Retirement]:
        """artifact id → its retirement, for every artifact on its way out (or only those of `artifact_ids`)."""
        ...

    def advance_retirement(
        self,
        artifact_id: int,
        stage: str,
        *,
        expect: str | None,
        run_id: str,
        actor: str,
        ref: str,
        data: Mapping[str, object],
        snapshots: Sequence[str] = (),
        at: datetime | None = None,
    ) -> Retirement:
        """Move the artifact to `stage` if it is still at `expect` (None: not on its way out yet), recording the
        `retire.<stage>` event in the same transaction (and, at `deprecated`, a built to signed version becomes
        deprecated in it too); StateError on a lost race or a step out of order."""
        ...

    def reopen_retirement(
        self,
        artifact_id: int,
        *,
        run_id: str,
        actor: str,
        ref: str,
        data: Mapping[str, object],
        version_status: Status | None = None,
    ) -> Retirement:
        """A deregistered artifact brought back: deprecated again from now, a retired version `version_status`
        again (`retire.restored` recorded with it, in one transaction)."""
        ...

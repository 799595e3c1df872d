"""Read-only views of the registry that commands (and, later, the web console) show: summaries, flags and histories
computed from what the store holds. Nothing here writes, and nothing here imports a provider, a scanner or the
policy engine, so a read command stays quick to start."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from amiforge.errors import ConfigError, NotFound
from amiforge.lifecycle.runs import recorded_leftovers
from amiforge.model import (
    ChannelPointer,
    Event,
    Finding,
    FindingKind,
    ImageVersion,
    Leftover,
    RemovedFile,
    Status,
    VulnDbSource,
)
from amiforge.store.interface import Store

# --- which version a command names ----------------------------------------------------------------------------------


def version_named(store: Store, *, ref: str | None, channel: str | None) -> ImageVersion:
    """The version `--version NAME@N` names, or the current version of `--channel IMAGE:CHANNEL`; exactly one."""
    if (channel is None) == (ref is None):
        raise ConfigError(
            "pass exactly one of --channel IMAGE:CHANNEL or --version NAME@N", fix="e.g. --channel web:dev"
        )
    if ref is not None:
        return store.get_version(ref)
    image, sep, name = str(channel).partition(":")
    if not (sep and image and name):
        raise ConfigError(f"--channel {channel!r} is not IMAGE:CHANNEL", fix="e.g. --channel web:dev")
    pointers = store.channels(image, name)
    if not pointers:
        raise NotFound(
            f"image {image!r} has no channel {name!r}",
            fix=f"`amiforge channels` lists them; `amiforge promote {image}@N --channel {name}` makes it",
        )
    return store.get_version(pointers[0].current)


# --- a version's findings ------------------------------------------------------------------------------------------


def findings_summary(findings: list[Finding] | tuple[Finding, ...]) -> dict[str, int]:
    """kind -> count and cve:<severity> -> count: what a manifest and a diff show."""
    counts: Counter[str] = Counter(f.kind.value for f in findings)
    counts.update(f"cve:{f.severity.value}" for f in findings if f.kind.value == "cve")
    return dict(sorted(counts.items()))


def vulndb_label(store: Store) -> str:
    """Which vulnerability data a scan matched against, in one line: each source's records and age."""
    return sources_label(store.vulndb_sources())


def sources_label(sources: Sequence[VulnDbSource]) -> str:
    """vulndb_label of these sources' states."""
    if not sources:
        return "no vulnerability data (amiforge vulndb update, or vulndb import PATH)"
    return "; ".join(f"{s.name}: {s.count} record(s) as of {s.as_of:%Y-%m-%d %H:%M} UTC" for s in sources)


def finding_json(f: Finding) -> Mapping[str, object]:
    """The JSON contract other tools read: kind, id, severity, and package or path, plus the rest."""
    data: dict[str, object] = {"kind": f.kind.value, "id": f.id, "severity": f.severity.value, "title": f.title}
    for key in ("package", "installed", "fixed", "path", "line", "redacted", "source"):
        value = getattr(f, key)
        if value is not None:
            data[key] = value
    if f.aliases:
        data["aliases"] = list(f.aliases)
    if f.kind is FindingKind.CVE:
        data["severity_source"] = f.severity_source  # None: nothing rated it (the gate judges it as unknown)
    if f.debian is not None:
        data["debian"] = {
            "status": f.debian.status,
            "urgency": f.debian.urgency,
            "fixed_version": f.debian.fixed_version,
            "no_dsa": f.debian.no_dsa,
            "minor": f.debian.minor,
        }
    if f.cvss is not None:
        data["cvss"] = {
            "version": f.cvss.version,
            "vector": f.cvss.vector,
            "score": f.cvss.score,
            "severity": f.cvss.severity.value,
            "source": f.cvss.source,
        }
    return data


# --- a version's history ------------------------------------------------------------------------------------------


def generalised_of(events: Iterable[Event]) -> tuple[RemovedFile, ...]:
    """What generalisation removed in the version's last bake, as its `bake.built` event recorded it."""
    built = next((e for e in reversed(list(events)) if e.kind == "bake.built"), None)
    items = built.data.get("generalised") if built is not None else None
    if not isinstance(items, list):
        return ()  # not built, or built before generalisation reported what it removed
    return tuple(RemovedFile(str(i.get("path")), str(i.get("kind"))) for i in items if isinstance(i, dict))


def leftovers_of(store: Store, events: Sequence[Event]) -> list[tuple[Leftover, bool]]:
    """Each leftover a version's `events` recorded, and whether gc has removed it since (it stays part of the
    version's history, marked as removed). gc's own events are read only when there are leftovers to look up."""
    recorded = [leftover for _, leftover in recorded_leftovers(events)]
    gone = collected(store.events(kinds={"gc.applied"})) if recorded else set()
    return [(leftover, _collected_key(leftover) in gone) for leftover in recorded]


def _collected_key(leftover: Leftover) -> str:
    # A directory is named by its whole path (which may hold spaces); a cloud resource by its id, then its region.
    return leftover.where if leftover.what == "temporary directory" else leftover.where.split(" ", 1)[0]


def collected(events: Iterable[Event]) -> set[str]:
    """Ids (paths, instance, image, snapshot and volume ids) gc has removed, or found gone, according to the log."""
    ids: set[str] = set()
    for event in events:
        outcomes = event.data.get("outcomes") if event.kind == "gc.applied" else None
        for o in outcomes if isinstance(outcomes, list) else []:
            if isinstance(o, dict) and o.get("outcome") in ("deleted", "gone"):
                ids.add(str(o.get("id")))
    return ids


# --- channels ------------------------------------------------------------------------------------------------------


def channel_flags(pointer: ChannelPointer, store: Store) -> list[str]:
    """Why a channel pointer needs attention: its version, its rollback version, or an ancestor is revoked."""
    return channels_flags([pointer], store)[0]


def channels_flags(pointers: Sequence[ChannelPointer], store: Store) -> list[list[str]]:
    """`channel_flags` of each pointer, from three reads whatever their number and the depth of their histories:
    revocations, and a current version the latest rescan judging its channel found that channel refuses."""
    refs = {ref for p in pointers for ref in (p.current, p.previous) if ref is not None}
    states = store.version_states(refs)
    for missing in refs - states.keys():
        version = store.get_version(missing)  # a ref one read cannot resolve: NotFound names it
        states[missing] = (version.id, version.status)
    revoked = store.revoked_ancestors([version_id for version_id, _ in states.values()])
    rescanned = _refused_since_rescan(store, {p.current for p in pointers})
    flags: list[list[str]] = []
    for pointer in pointers:
        mine = []
        for role, ref in (("current", pointer.current), ("rollback", pointer.previous)):
            if ref is None:
                continue
            version_id, status = states[ref]
            if status == Status.REVOKED:
                mine.append(f"{role} {ref} is revoked")
            mine += [f"{role} {ref}: ancestor {a} is revoked" for a in revoked[version_id]]
        reasons = rescanned.get((pointer.current, pointer.channel))
        if reasons is not None:
            mine.append(f"current {pointer.current} fails {pointer.channel}'s gate since a rescan: {reasons}")
        flags.append(mine)
    return flags


def _refused_since_rescan(store: Store, refs: set[str]) -> dict[tuple[str, str], str]:
    """(ref, channel) -> why, where the latest rescan that judged that channel found the version refused there."""
    found: dict[tuple[str, str], str] = {}
    for e in store.events(kinds=("rescan.completed", "rescan.flagged"), refs=refs):
        if e.ref is None:
            continue
        if e.kind == "rescan.completed":
            judged = e.data.get("judged")
            for channel in judged if isinstance(judged, list) else ():
                found.pop((e.ref, str(channel)), None)  # judged again: its own flag event follows if it still fails
        else:
            reasons = e.data.get("reasons")
            shown = "; ".join(str(r) for r in reasons[:2]) if isinstance(reasons, list) else ""
            found[(e.ref, str(e.data.get("channel")))] = shown or "see amiforge rescan"
    return found

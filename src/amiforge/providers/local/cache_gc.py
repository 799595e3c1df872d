"""`amiforge cache gc`: the bake cache's entries no kept version uses.

The cache (`<data>/cache/`, notes/local-backend.md) holds the base root file systems (`base/KEY/`), one folder per
recipe step (`layers/KEY/`) and the record of the disk last made from each top layer (`images/KEY.json`). An entry
goes when no version the registry keeps records its key, it is older than the minimum age, and (for an image
record) its disk is gone or its key unused. An entry is renamed out of place first, so a bake never finds half of
one: it finds it whole, or misses and builds it again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path

from amiforge.providers.interface import CacheEntry, CachePlan
from amiforge.providers.local.tools import cached_size, remove_tree

# Folders of the cache that hold entries named by their key; what else is there (scratch, probes) is not ours.
_FOLDERS = ("base", "layers")


def _age(path: Path, now: datetime) -> timedelta:
    return now - datetime.fromtimestamp(path.stat().st_mtime, UTC)


def plan_cache_gc(cache: Path, keep: Collection[str], *, min_age: timedelta, now: datetime) -> CachePlan:
    """What `cache gc` removes: entries whose key no kept version records, older than `min_age`. Reads only."""
    wanted = set(keep)
    entries: list[CacheEntry] = []
    kept = 0
    kept_bytes = 0
    for folder in _FOLDERS:
        root = cache / folder
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # a step being built (.tmp-…), or something not ours
            size = cached_size(entry)
            if entry.name in wanted or _age(entry, now) < min_age:
                kept += 1
                kept_bytes += size
                continue
            entries.append(CacheEntry(folder, entry.name, str(entry), size, "no kept version uses it"))
    records = cache / "images"
    if records.is_dir():
        for record in sorted(records.glob("*.json")):
            key = record.stem
            disk = _disk_of(record)
            if key in wanted and disk is not None and disk.is_file():
                continue
            why = "its disk is gone" if disk is None or not disk.is_file() else "no kept version uses its layers"
            if _age(record, now) >= min_age:
                entries.append(CacheEntry("images", key, str(record), 0, why))
    return CachePlan(str(cache), tuple(entries), kept, kept_bytes)


def _disk_of(record: Path) -> Path | None:
    try:
        data = json.loads(record.read_text())
        return Path(str(data["qcow2"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def apply_cache_gc(plan: CachePlan) -> list[CacheEntry]:
    """Remove the plan's entries (a folder is renamed aside, then removed); the entries removed."""
    removed = []
    for entry in plan.entries:
        path = Path(entry.path)
        if not path.exists():
            continue
        if entry.folder == "images":
            path.unlink(missing_ok=True)
        else:
            aside = path.with_name(f".gc-{path.name}-{os.getpid()}")
            os.rename(path, aside)
            remove_tree(aside)
        removed.append(entry)
    return removed

"""What every benchmark prints about the code it measured (shared by the bench scripts, which run from bench/)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def tree_state() -> str:
    """The amiforge measured: its commit, and whether its src/ had changes not committed yet (measured too)."""
    import amiforge

    where = Path(amiforge.__file__).parent

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=where, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return f"amiforge from {where}"
    changed = git("status", "--short", "--", ".").splitlines()
    return f"commit {commit}" + (f" + uncommitted changes to {len(changed)} file(s) of src/" if changed else "")

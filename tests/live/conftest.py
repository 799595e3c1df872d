"""Fixtures of the live AWS suite: the sandbox's settings, a boto3 session, the CLI with a session-wide registry, the
one baked version every test shares (and its removal at the end of the session), and a per-test cleanup stack.

Nothing here runs unless a test asks for it, and every test of the suite is skipped without AMIFORGE_LIVE_AWS=1;
`live` checks the opt-in once more, so no fixture can reach AWS without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from typing import Any

import pytest

from tests.live.aws_live import OPT_IN, Amiforge, Baked, LiveConfig, discard_registered, ensure_signed, sweep


@pytest.fixture(scope="session")
def live() -> LiveConfig:
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"{OPT_IN}=1 runs the live suite")
    return LiveConfig.from_env(os.environ)


@pytest.fixture(scope="session")
def aws(live: LiveConfig) -> Any:
    import boto3  # only here: the live suite is the one place tests talk to AWS themselves

    # The account amiforge works in: AMIFORGE_AWS_PROFILE if set, else the standard chain, as amiforge takes it.
    return boto3.Session(profile_name=os.environ.get("AMIFORGE_AWS_PROFILE") or None, region_name=live.region)


@pytest.fixture(scope="session")
def amiforge(tmp_path_factory: pytest.TempPathFactory) -> Amiforge:
    return Amiforge(tmp_path_factory.mktemp("amiforge-live"))


@pytest.fixture(scope="session")
def baked(live: LiveConfig, aws: Any, amiforge: Amiforge) -> Iterator[Baked]:
    """Bake (and boot-test) the session's version once. At the end of the session, whatever happened: `amiforge gc`
    first (amiforge's own leftovers, such as a builder a failed bake could not terminate), then every image the
    registry holds for the recipe (the bake's, its copies, adopted ones), then whatever still has the session tag."""
    recipe = amiforge.home / "recipe.yaml"
    recipe.write_text(live.recipe())
    with ExitStack() as stack:  # callbacks run last-registered first, each even if another failed
        stack.callback(sweep, aws, live)
        stack.callback(discard_registered, aws, amiforge, live.name)
        regions = [arg for region in live.regions for arg in ("--region", region)]
        stack.callback(partial(amiforge, "gc", *regions, "--apply", "--min-age", "1s"))
        outcome = amiforge("bake", str(recipe))
        ref = f"{outcome['version']['name']}@{outcome['version']['number']}"
        yield Baked(ref, amiforge.images(ref)[live.region], outcome, recipe)


@pytest.fixture
def signed(baked: Baked, amiforge: Amiforge) -> str:
    """The baked version, scanned and signed (by this test or an earlier one): what distribute, promote and rollouts
    take. Its ref."""
    ensure_signed(amiforge, baked.ref)
    return baked.ref


@pytest.fixture
def cleanup() -> Iterator[ExitStack]:
    """Register a resource's removal the moment it exists: `cleanup.callback(delete_x, client, id)`. At the end of
    the test, pass or fail, the removals run last-registered first (a group before its launch template), every one
    even when another fails."""
    with ExitStack() as stack:
        yield stack

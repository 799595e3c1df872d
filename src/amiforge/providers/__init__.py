"""Where images are made and run: `local` (mmdebstrap + QEMU, the default) and `aws` (EC2)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from amiforge.errors import ConfigError
from amiforge.providers.interface import Provider
from amiforge.settings import Settings

C = TypeVar("C")

# Each provider is imported on first use: boto3 costs a third of a second at start-up, the local provider's scanners
# and QEMU code a tenth; a command that needs neither (or only one) should not pay for them.


def _local(settings: Settings) -> Provider:
    from amiforge.providers.local.provider import LocalProvider

    return LocalProvider(settings)


def _aws(settings: Settings) -> Provider:
    from amiforge.providers.aws.provider import AwsProvider

    return AwsProvider(settings)


# The closed set of providers, by the `provider.type` a recipe names. No string-import plugin magic.
PROVIDERS: Mapping[str, Callable[[Settings], Provider]] = {
    "local": _local,
    "aws": _aws,
}


def provider_for(kind: str, settings: Settings) -> Provider:
    """The provider a recipe (or a recorded version) names; ConfigError if this install has none by that name."""
    factory = PROVIDERS.get(kind)
    if factory is None:
        raise ConfigError(
            f"provider {kind!r} is not available in this version of amiforge",
            fix=f"use one of: {', '.join(sorted(PROVIDERS))} (e.g. provider: {{type: local}})",
        )
    return factory(settings)


def capable(kind: str, settings: Settings, protocol: type[C]) -> C | None:
    """The provider `kind` if it has the capability `protocol` (a runtime-checkable protocol of interface.py), else
    None; ConfigError for a provider this install does not have."""
    provider = provider_for(kind, settings)
    return provider if isinstance(provider, protocol) else None


def capable_of(settings: Settings, protocol: type[C]) -> Callable[[str], C | None]:
    """`capable` for each provider, each made once: a run's steps share what its survey learnt."""
    made: dict[str, C | None] = {}

    def find(kind: str) -> C | None:
        if kind not in made:
            made[kind] = capable(kind, settings, protocol)
        return made[kind]

    return find

"""Where images are made and run. `local` (mmdebstrap + QEMU) is the default; `aws` comes later."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from amiforge.providers.interface import Provider
from amiforge.providers.local.provider import LocalProvider
from amiforge.settings import Settings

# The closed set of providers, by the `provider.type` a recipe names. No string-import plugin magic.
PROVIDERS: Mapping[str, Callable[[Settings], Provider]] = {
    "local": LocalProvider,
}

"""What the command modules share: options, and opening settings and the registry once per command."""

from __future__ import annotations

import typer

from amiforge.settings import Settings, load_settings
from amiforge.store.sql import SqlStore, open_store

JsonOption = typer.Option(False, "--json", help="Print one JSON document on stdout instead of text.")


def open_registry() -> tuple[Settings, SqlStore]:
    settings = load_settings()
    return settings, open_store(settings.registry_url)

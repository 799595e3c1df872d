"""The console's vendored files are byte for byte what VENDORED.md says came from the npm registry, and the pages
load exactly those (no CDN, nothing else)."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

from amiforge.web.pages import HTMX

STATIC = resources.files("amiforge.web") / "static"


def test_each_vendored_file_has_the_recorded_sha256() -> None:
    table = (STATIC / "VENDORED.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \| [^|]+ \|$", table, flags=re.M)
    assert [name for name, _ in rows] == [HTMX]
    for name, digest in rows:
        assert hashlib.sha256((STATIC / name).read_bytes()).hexdigest() == digest, name


def test_the_pages_load_scripts_and_styles_only_from_static() -> None:
    templates = resources.files("amiforge.web") / "templates"
    for page in templates.iterdir():
        text = page.read_text()
        for url in re.findall(r'(?:src|href)="([^"{]+)"', text):
            assert not url.startswith(("http:", "https:", "//")), (page.name, url)
        assert "<script>" not in text and "<style" not in text and " on" + "click=" not in text, page.name

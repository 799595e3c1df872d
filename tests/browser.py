"""Driving Debian's Chromium (headless) with Playwright, for the web console's tests (unit and e2e): the browser's
flags, a tab that records dialogs and script errors, screenshots checked as PNGs, and axe-core served to the page
from its own origin (so the pages' strict CSP stays on while it runs)."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Dialog, Page, Route, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# Root needs --no-sandbox; the rest keep Chromium off the network (this machine has none) and out of its updaters.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
AXE = ROOT / ".cache" / "axe-core" / "package" / "axe.min.js"
AXE_PATH = "/__test__/axe.min.js"  # served to the page by a route of this test, never by the server
AXE_TAGS = ["wcag2a", "wcag2aa"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def screenshot_folder(tmp_path: Path) -> Path:
    """Where the pages' screenshots go: $AMIFORGE_SCREENSHOTS if set (to keep them), else the test's tmp_path."""
    kept = os.environ.get("AMIFORGE_SCREENSHOTS")
    folder = Path(kept) if kept else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Tab:
    """A browser context of its own (its own cookies) and its page, which records every dialog and script error."""

    context: BrowserContext
    page: Page
    screenshots: Path
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def on_console(self, message: ConsoleMessage) -> None:
        # A 401 or 422 page is what some steps expect; anything else said as an error (a CSP refusal) is a finding.
        if message.type == "error" and "the server responded with a status of" not in message.text:
            self.errors.append(message.text)

    def log_in(self, secret: str) -> None:
        self.page.get_by_label("Token").fill(secret)
        self.page.get_by_role("button", name="Log in").click()
        expect(self.page).not_to_have_url(re.compile(r"/login"))

    def shot(self, name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        self.page.screenshot(path=path, full_page=True)
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), path
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
        assert width > 0 and height > 0 and len(data) > 1000, (path, width, height, len(data))
        return path

    def axe(self) -> list[dict[str, Any]]:
        """axe-core's WCAG 2 A/AA violations on the page as it is now."""
        if not self.page.evaluate("() => typeof window.axe === 'object'"):
            self.page.add_script_tag(url=AXE_PATH)
        found = self.page.evaluate(
            """async (tags) => {
                const result = await axe.run(document, {runOnly: {type: "tag", values: tags},
                                                        resultTypes: ["violations"]});
                return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                                    targets: v.nodes.map(n => n.target.join(" "))}));
            }""",
            AXE_TAGS,
        )
        return cast(list[dict[str, Any]], found)

    def serve_axe(self, source: str) -> None:
        def fulfil(route: Route) -> None:
            route.fulfill(status=200, content_type="text/javascript; charset=utf-8", body=source)

        self.page.route(f"**{AXE_PATH}", fulfil)


@contextmanager
def open_tab(browser: Browser, base_url: str, screenshots: Path) -> Iterator[Tab]:
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.set_default_timeout(10_000)
        opened = Tab(context, page, screenshots)
        page.on("dialog", opened.on_dialog)
        page.on("console", opened.on_console)
        page.on("pageerror", lambda error: opened.errors.append(str(error)))
        yield opened
    finally:
        context.close()

"""A real browser for the page tests: Playwright for Python driving Debian's chromium.

Playwright's own browser download cannot reach its host here, so the browser is the
distribution's (`make test` installs it) and is launched through ``executable_path``. Every
request a page makes is recorded, so a test can prove it loads nothing from outside
127.0.0.1. Screenshots go to ``tests/artifacts/`` (ignored by git, kept by CI as artifacts).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, sync_playwright

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = os.environ.get("CST_CHROMIUM", "/usr/bin/chromium")
# As root in a container chromium needs --no-sandbox; the rest keep it from calling Google's
# services, which this machine's closed network refuses (noisy and slow otherwise).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


# Module scope, not session: while sync Playwright is open its event loop counts as running in
# this thread, and the asyncio tests of other modules (asyncio.run, pytest-asyncio) would fail.
# For the same reason a browser test module must not run asyncio itself.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class RecordedPage:
    """A page in a fresh context, with every request URL it made."""

    def __init__(self, context: BrowserContext, page: Page):
        self.context, self.page = context, page
        self.requests: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))

    def outside_hosts(self) -> list[str]:
        """Every request that went anywhere but 127.0.0.1 (data: and blob: URLs are local)."""
        return [url for url in self.requests
                if urlsplit(url).scheme not in ("data", "blob") and urlsplit(url).hostname != "127.0.0.1"]

    def screenshot(self, name: str, element: Locator | None = None) -> Path:
        """The whole page, or only ``element``, as ``tests/artifacts/<name>.png``."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        if element is not None:
            element.screenshot(path=str(path))
        else:
            self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def new_page(browser: Browser) -> Iterator:
    """``new_page(width=1280, height=800, locale="en-US", **context_options)``: a recorded page in its
    own context (say ``http_credentials={"username": ..., "password": ...}`` for basic auth)."""
    contexts: list[BrowserContext] = []

    def make(width: int = 1280, height: int = 800, locale: str = "en-US", **options) -> RecordedPage:
        context = browser.new_context(viewport={"width": width, "height": height}, locale=locale, **options)
        contexts.append(context)
        return RecordedPage(context, context.new_page())

    yield make
    for context in contexts:
        context.close()


def sign_in_to_admin_page(new_page, url: str, key: str, width: int = 1280, locale: str = "en-US",
                          lang: str | None = None) -> RecordedPage:
    """The admin page of the `cst serve` at ``url``, signed in with ``key`` (in ``lang`` when given)."""
    recorded = new_page(width=width, locale=locale)
    page = recorded.page
    if lang is not None:
        page.add_init_script(f"localStorage.setItem('cst-lang', '{lang}')")
    page.goto(url + "/")
    page.fill("#key", key)
    page.press("#key", "Enter")
    return recorded

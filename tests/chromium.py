"""What the browser tests share: Debian's Chromium driven by Playwright (`playwright install` is never
needed), a free localhost port, and the rule that a missing piece skips the test except in CI."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require(condition: bool, message: str) -> None:
    """Skip when ``condition`` fails, except in CI (CI=true), where the test must run: fail instead."""
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def require_chromium() -> None:
    require(CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium chromium-driver")


def launch(playwright):
    """Headless Chromium through Playwright."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=60_000
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

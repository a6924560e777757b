"""Notebook 01 in a real JupyterLab, driven by headless Chromium: it opens as a notebook, runs, and the slice
viewer responds.

A JupyterLab server on 127.0.0.1 serves a temporary copy of notebooks/01 (its data and outputs go to the
temporary folder); Playwright drives Debian's /usr/bin/chromium (`playwright install` is never needed).
The test opens the `.py` file, which the shipped settings open as a notebook (jupytext), runs all cells,
checks that no cell raised, moves the viewer's slider with the keyboard and waits for a new picture.
The screenshot goes to runs/browser/ (CI keeps it as an artifact). Without Chromium the test skips,
except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from chromium import free_port, launch, require_chromium

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_data_preparation.py"
SCREENSHOT = REPO / "runs" / "browser" / "01_data_preparation.png"
SHIPPED_SETTINGS = REPO / "jupyter" / "overrides.json"  # `make venv` installs it as INSTALLED_SETTINGS
INSTALLED_SETTINGS = Path(sys.prefix) / "share/jupyter/lab/settings/overrides.d/m3d-lite.json"
# user settings of the test server: no autosave (JupyterLab would rewrite the file), no news pop-up,
# every cell in the DOM (the default windowing leaves cells out of view unrendered)
USER_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}
# the notebook's state, read through the app object that --LabApp.expose_app_in_browser puts on window
NOTEBOOK_STATE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    if (!panel || !panel.context) return null;  // no document open yet
    if (!panel.hasClass("jp-NotebookPanel")) return {is_notebook: false, ready: true};  // e.g. as text
    const cells = Array.from(panel.content.model.cells).map(cell => cell.toJSON());
    const code = cells.filter(cell => cell.cell_type === "code");
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    return {
        is_notebook: panel.hasClass("jp-NotebookPanel"),
        ready: panel.context.isReady,
        kernel: kernel ? kernel.status : "none",
        code_cells: code.length,
        executed: code.filter(cell => cell.execution_count !== null).length,
        errors: code.flatMap(cell => cell.outputs.filter(o => o.output_type === "error")
            .map(o => `In [${cell.execution_count}] ${o.ename}: ${o.evalue}`)),
    };
}"""


def require_chromium_and_settings() -> None:
    """Skip without Chromium (fail in CI); fail when `make venv` has not installed the lab settings."""
    require_chromium()
    installed = INSTALLED_SETTINGS.read_text() if INSTALLED_SETTINGS.is_file() else ""
    if installed != SHIPPED_SETTINGS.read_text():
        pytest.fail(f"{INSTALLED_SETTINGS} is missing or stale: run `make venv` (it opens *.py as notebooks)")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    """A JupyterLab server on a copy of notebook 01; yields its URL with the token."""
    require_chromium_and_settings()
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, notebooks / NOTEBOOK)
    for name, settings in USER_SETTINGS.items():
        path = tmp_path / "user-settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    port, token = free_port(), "m3d-lite-browser-test"
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "M3D_LITE_DATA_DIR": str(tmp_path / "data"),  # the notebook's phantom dataset
    }
    options = {
        "ServerApp.ip": "127.0.0.1",
        "ServerApp.port": port,
        "ServerApp.port_retries": 0,  # a busy port fails instead of silently moving
        "ServerApp.root_dir": notebooks,
        "IdentityProvider.token": token,
        "LabApp.expose_app_in_browser": True,  # window.jupyterapp, read by NOTEBOOK_STATE
        "LabApp.check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
        "LabApp.extension_manager": "readonly",
    }
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        *(f"--{k}={v}" for k, v in options.items()),
    ]
    command += ["--allow-root"] if os.geteuid() == 0 else []
    log_path = tmp_path / "jupyterlab.log"
    log = open(log_path, "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=notebooks)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"{url}/lab/tree/{NOTEBOOK}?token={token}"
    finally:
        try:
            kernels = psutil.Process(server.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kernels = []
        server.kill()
        for kernel in kernels:
            kernel.kill()
        psutil.wait_procs(kernels, timeout=10)
        server.wait()
        log.close()


def wait_for(page, predicate, timeout: float, what: str):
    """Poll `predicate(page)` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate(page)
        if value:
            return value
        page.wait_for_timeout(250)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def viewer_image(page) -> str:
    """The data URL of the slice viewer's picture ('' while it has none)."""
    image = page.locator(".widget-output img").last
    return image.get_attribute("src") or "" if image.count() else ""


def open_notebook(playwright, url: str):
    """Start Chromium and open `url`; one retry, since a cold browser start sometimes times out."""
    for attempt in (1, 2):
        try:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, timeout=60_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
            return browser, page
        except Exception:
            if attempt == 2:
                raise
            browser.close()


@pytest.mark.slow
def test_notebook_01_runs_in_jupyterlab_and_the_viewer_responds(lab: str):
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    with sync_playwright() as playwright:
        browser, page = open_notebook(playwright, lab)
        try:
            state = wait_for(
                page, lambda p: (s := p.evaluate(NOTEBOOK_STATE)) and s["ready"] and s, 60, "the notebook"
            )
            assert state["is_notebook"], f"{NOTEBOOK} did not open as a notebook (jupytext default viewer)"
            assert state["code_cells"] > 10, state
            wait_for(page, lambda p: p.evaluate(NOTEBOOK_STATE)["kernel"] == "idle", 60, "the kernel")

            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            state = wait_for(
                page,
                lambda p: (
                    (s := p.evaluate(NOTEBOOK_STATE))["executed"] == s["code_cells"]
                    and s["kernel"] == "idle"
                    and s
                ),
                240,
                "all cells to run",
            )
            assert state["errors"] == [], state["errors"]

            before = wait_for(page, viewer_image, 30, "the slice viewer's picture")
            handle = page.locator(".widget-slider .noUi-handle").last
            handle.scroll_into_view_if_needed()
            handle.focus()
            page.keyboard.press("ArrowRight")
            wait_for(page, lambda p: viewer_image(p) != before, 30, "a new slice")
            wait_for(page, lambda p: p.evaluate(NOTEBOOK_STATE)["kernel"] == "idle", 30, "the redraw")
            after = viewer_image(page)
            assert after.startswith("data:image/png;base64,") and after != before

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
    print(f"browser test: {time.perf_counter() - start:.1f} s, screenshot {SCREENSHOT}")

"""`m3d-lite demo` in a real browser: upload a phantom NIfTI, ask for a segmentation, see the answer and the
overlay, download the mask and check that it lies on the upload's grid; a broken file gets a message and
the page keeps serving.

The app runs as `m3d-lite demo` in a subprocess on a free localhost port, with a ci model whose saved
generation config biases decoding towards `[SEG]` (a random model would rarely write it) and whose mask
decoder is biased to paint, so that the answer has a mask. Playwright drives Debian's /usr/bin/chromium;
screenshots go to runs/browser/ (CI keeps them). Without Chromium or Gradio the test skips, except in CI
(CI=true), where it fails.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from chromium import free_port, launch, require, require_chromium

from m3d_lite.models import build_lamed, save_lamed

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "runs" / "browser"


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    """A saved ci LaMed whose greedy answers are `[SEG]`s and whose masks are not empty."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        torch.manual_seed(0)
        model, tokenizer = build_lamed("ci", llm="tiny-llama", segmentation=True)
    with torch.no_grad():
        model.seg_module.mask_decoder.txt_align_upscaled_embedding.bias.fill_(5.0)
    model.generation_config.sequence_bias = [[[model.config.seg_token_id], 100.0]]
    return save_lamed(model.eval(), tokenizer, tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture
def demo_url(seg_model: Path, phantom8: Path, tmp_path: Path) -> Iterator[str]:
    """`m3d-lite demo` on a free localhost port, offering phantom8's test volume; yields its URL."""
    require_chromium()
    require(importlib.util.find_spec("gradio") is not None, 'gradio is missing: pip install "m3d-lite[demo]"')
    port = free_port()
    command = [Path(sys.executable).parent / "m3d-lite", "demo", "--model", seg_model, "--port", str(port)]
    command += ["--data", phantom8]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"m3d-lite demo did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.kill()
        server.wait()


def text_of(page, selector: str) -> str:
    element = page.locator(selector)
    return element.inner_text() if element.count() else ""


def views_image(page) -> str:
    """The data URL of the three-plane picture ('' while there is none)."""
    image = page.locator("#views img")
    return (image.first.get_attribute("src") or "") if image.count() else ""


def pick(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.mark.slow
def test_upload_segment_download_then_a_broken_file(demo_url: str, phantom8: Path, tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    scan = phantom8 / "raw" / "phantom_00000" / "ct.nii.gz"
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file\n" * 40)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
            expect.set_options(timeout=30_000)
            page.goto(demo_url, timeout=60_000)
            upload = page.locator("#scan input[type=file]")
            upload.wait_for(state="attached", timeout=60_000)

            upload.set_input_files(scan)
            expect(page.locator("#status")).to_contain_text("ct.nii.gz (40x96x96) loaded")
            expect(page.locator("#views img")).to_be_visible()
            before = views_image(page)

            pick(page, "#task", "segmentation")
            expect(page.locator("#target input")).to_have_value("liver")
            page.locator("#ask").click()
            expect(page.locator("#details")).to_contain_text("mask:")
            assert page.locator("#answer textarea").input_value().startswith("[SEG]")
            assert "Can you segment the liver in this image?" in text_of(page, "#details")
            assert views_image(page).startswith("data:image/") and views_image(page) != before  # the overlay

            with page.expect_download() as download:
                page.locator("#mask a").first.click()
            mask_path = tmp_path / download.value.suggested_filename
            download.value.save_as(mask_path)
            page.wait_for_timeout(500)  # let the fade-in of the new outputs finish
            page.screenshot(path=str(SCREENSHOTS / "demo_answer.png"), full_page=True)

            page.locator("#scan button[aria-label='Clear']").click()  # brings the file input back
            upload.set_input_files(broken)
            expect(page.locator("#status")).to_contain_text("broken.nii.gz: SimpleITK cannot read it")
            assert str(tmp_path) not in text_of(page, "#status")  # the server's temp folder is not shown
            page.screenshot(path=str(SCREENSHOTS / "demo_error.png"), full_page=True)

            pick(page, "#example", "phantom_00007")  # the app still serves: the phantom test volume loads
            expect(page.locator("#status")).to_contain_text("ct.nii.gz (40x96x96) loaded")
        finally:
            browser.close()

    assert mask_path.name == "ct_mask.nii.gz"
    written, source = sitk.ReadImage(str(mask_path)), sitk.ReadImage(str(scan))
    assert written.GetSize() == source.GetSize() and written.GetSpacing() == source.GetSpacing()
    assert written.GetOrigin() == source.GetOrigin() and written.GetDirection() == source.GetDirection()
    assert sitk.GetArrayFromImage(written).any()
    print(f"demo browser test: {time.perf_counter() - start:.1f} s, screenshots in {SCREENSHOTS}")

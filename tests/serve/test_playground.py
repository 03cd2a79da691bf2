"""The playground page at ``/``, driven in headless Chromium (Debian's chromium, through playwright)."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")


def test_playground_generates_an_image_with_step_previews(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_selector("#model option[value='lcm'], #model option:text('lcm')", state="attached")
            page.select_option("#model", "lcm")
            for field, value in (("#prompt", "a red barn"), ("#width", "64"), ("#height", "64"), ("#steps", "4"),
                                 ("#seed", "5"), ("#partials", "2")):
                page.fill(field, value)
            page.click("#go")
            page.wait_for_selector("#result img", timeout=60_000)
            assert page.locator("#previews img").count() == 2
            size = page.eval_on_selector("#result img", "img => [img.naturalWidth, img.naturalHeight]")
            assert size == [64, 64]
            assert "seed 5" in page.inner_text("#status")
            # image-to-image: upload a picture, the result has its size
            Image.new("RGB", (96, 64), (200, 40, 40)).save(tmp_path / "in.png")
            page.set_input_files("#image", str(tmp_path / "in.png"))
            page.click("#go")
            page.wait_for_function("document.querySelector('#result img') && "
                                   "document.querySelector('#result img').naturalWidth === 96", timeout=60_000)
            assert not errors, errors
        finally:
            browser.close()

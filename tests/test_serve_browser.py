"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by selenium.

The real server runs (uvicorn in a thread on a free loopback port); the test picks three photos through the page
(one over the server's pixel cap), cloaks them, waits for the before / after / JPEG-75 views and the refusal, and
checks the "download all" ZIP. Skipped only where
Chromium is missing outside CI; in CI (CI set) a missing browser fails. NOCLONE_SERVE_SCREENSHOT=PATH also writes
the page's screenshot there (docs/img/serve-page.png is made that way).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return "chromium / chromium-driver not installed (bash scripts/install_browser.sh)"
    return None


@pytest.fixture
def browser(tmp_path):
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,1000", "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


class _Server:
    """uvicorn serving `application` on a free loopback port, in a thread, for the length of a `with`."""

    def __init__(self, application):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def _wait(driver, condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    status = driver.execute_script("return document.getElementById('status').textContent")
    raise AssertionError(f"timed out waiting for {what} (page status: {status!r})")


def test_page_cloaks_photos_and_downloads_them(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from noclone.sandbox.render import render
    from noclone.serve import Limits, app

    photos = tmp_path / "photos"
    photos.mkdir()
    portrait = render("person", 11, 0, size=240)
    portrait.save(photos / "portrait.jpg", quality=92)
    render("person", 5, 1, size=64).save(photos / "render.png")  # a sandbox-sized render: no warning for it
    render("person", 6, 2, size=320).save(photos / "large.png")  # over this server's pixel cap: refused
    paths = [photos / "portrait.jpg", photos / "render.png", photos / "large.png"]

    with _Server(app("rid", limits=Limits(max_pixels=300 * 300))) as url:
        browser.get(url + "/")
        _wait(browser, lambda: browser.execute_script("return document.querySelectorAll('#method option').length"),
              what="the methods list")
        banner = browser.find_element(By.ID, "model-warning")
        assert banner.is_displayed() and "not expected to protect real photos" in banner.text
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))
        assert "3 photo(s)" in browser.find_element(By.ID, "picked").text
        assert browser.find_element(By.ID, "strength").get_attribute("value") == "standard"
        browser.find_element(By.ID, "cloak").click()
        _wait(browser, lambda: browser.find_element(By.ID, "status").text.startswith("Done"), what="the cloak")
        assert browser.find_element(By.ID, "status").text == "Done: 2 photo(s) cloaked, 1 refused (see below)."
        assert browser.find_element(By.ID, "progress").get_attribute("value") == "100"
        refused = browser.find_element(By.CSS_SELECTOR, "#results .card.refused")
        assert "large.png" in refused.text and "pixel limit" in refused.text
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .card:not(.refused)")
        assert sorted(c.get_attribute("data-name") for c in cards) == ["portrait.png", "render.png"]
        sizes = {"portrait.png": (240, 240), "render.png": (64, 64)}
        for card in cards:
            name = card.get_attribute("data-name")
            for cls in ("before", "after", "jpeg75"):
                img = card.find_element(By.CSS_SELECTOR, f"img.{cls}")
                _wait(browser, lambda img=img: browser.execute_script("return arguments[0].complete && "
                                                                      "arguments[0].naturalWidth > 0", img),
                      what=f"{name} {cls}")
                natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
                assert tuple(natural) == sizes[name], (name, cls, natural)
            warnings = card.find_elements(By.CSS_SELECTOR, ".photo-warning")
            assert bool(warnings) == (name == "portrait.png")
        _wait(browser, lambda: all(c.find_element(By.CSS_SELECTOR, ".kept").text for c in cards),
              what="the JPEG-75 figure")

        shot = os.environ.get("NOCLONE_SERVE_SCREENSHOT")
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1200, min(max(height + 40, 700), 2400))
        browser.save_screenshot(str(tmp_path / "page.png"))
        if shot:
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(shot)

        browser.find_element(By.ID, "download-all").click()
        target = browser.downloads / "noclone-cloaked.zip"
        _wait(browser, lambda: target.exists() and not list(browser.downloads.glob("*.crdownload")),
              what="the download")

    with zipfile.ZipFile(target) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == ["portrait.png", "render.png"]
        for name, source in (("portrait.png", paths[0]), ("render.png", paths[1])):  # the refused one is not in it
            with Image.open(io.BytesIO(archive.read(name))) as out, Image.open(source) as original:
                assert out.format == "PNG" and out.size == original.size and not out.info.get("exif")
                diff = np.abs(np.asarray(out.convert("RGB"), np.int16) - np.asarray(original.convert("RGB"), np.int16))
                assert 0 < diff.max() <= 8


def test_page_with_a_token_runs_a_job_method(browser, tmp_path, tiny_model_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from noclone.sandbox.render import render
    from noclone.serve import app

    photo = tmp_path / "me.png"
    render("person", 8, 0, size=48).save(photo)
    application = app("rid,photoguard", model=str(tiny_model_dir), token="tok3n",
                      cloak_settings={"photoguard": {"steps": 3}})
    with _Server(application) as url:
        browser.get(url + "/")
        _wait(browser, lambda: "needs an access token" in browser.find_element(By.ID, "status").text,
              what="the token request")
        assert browser.find_element(By.ID, "cloak").get_attribute("disabled")
        browser.find_element(By.ID, "token").send_keys("tok3n")
        browser.find_element(By.ID, "token-save").click()
        _wait(browser, lambda: browser.execute_script("return document.querySelectorAll('#method option').length"),
              what="the methods list")
        Select(browser.find_element(By.ID, "method")).select_by_value("photoguard")
        Select(browser.find_element(By.ID, "strength")).select_by_value("light")
        browser.find_element(By.ID, "files").send_keys(str(photo))
        browser.find_element(By.ID, "cloak").click()
        _wait(browser, lambda: browser.find_element(By.ID, "status").text.startswith("Done"), what="the job")
        card = browser.find_element(By.CSS_SELECTOR, "#results .card")
        assert card.get_attribute("data-name") == "me.png"
        img = card.find_element(By.CSS_SELECTOR, "img.after")
        _wait(browser, lambda: browser.execute_script("return arguments[0].naturalWidth", img) == 48,
              what="the cloaked photo")
        assert browser.find_element(By.ID, "progress").get_attribute("value") == "100"
        assert not browser.find_elements(By.CSS_SELECTOR, ".photo-warning")  # a model of its own: no warning

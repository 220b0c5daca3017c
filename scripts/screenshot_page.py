"""Screenshot the top of a local HTML page with headless Chromium (selenium), e.g. the demo's report:

    .venv/bin/python scripts/screenshot_page.py noclone-demo/report.html docs/img/demo-report.png

Needs Debian's chromium + chromium-driver (bash scripts/install_browser.sh) and selenium.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 1400) -> Path:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(Path(page).resolve().as_uri())
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args()
    print(screenshot(Path(args.page), Path(args.out), args.width, args.height))


if __name__ == "__main__":
    main()

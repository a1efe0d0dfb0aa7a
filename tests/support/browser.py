"""A real headless Chromium driven by selenium (Debian's `chromium` and
`chromium-driver`, installed by `setup.sh --test`), and where screenshots go.

`browser` is a module-scoped fixture; its console log is read with
`console_errors(browser)`. Screenshots go to build/test-output/ in the checkout
(RKLLM_TEST_OUTPUT elsewhere), kept after the run.
"""
from __future__ import annotations

import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def output_dir() -> str:
    folder = os.environ.get("RKLLM_TEST_OUTPUT") or os.path.join(ROOT, "build", "test-output")
    os.makedirs(folder, exist_ok=True)
    return folder


def console_errors(driver) -> list:
    """The browser console's errors since the last call (warnings are not errors)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: `sudo ./setup.sh --test` installs Debian's "
                        f"chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()

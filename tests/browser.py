"""Headless Chromium (Debian's chromium and chromium-driver) for the report's browser test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def chromium(profile: Path) -> Iterator[object]:
    """A Selenium session of headless Chromium; skips when Selenium or Chromium is missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def open_result(browser, i: int, shown_before: set[str], attempts: int = 6) -> str:
    """Click the i-th result's eye and return the key of what it shows, which must be new.

    A click can land while the page is still re-rendering (a slow machine) and be lost, so an
    unanswered click is repeated; a result that never shows fails after all attempts."""
    from selenium.common.exceptions import WebDriverException  # TimeoutException included
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for _ in range(attempts):
        try:
            browser.find_elements(By.CSS_SELECTOR, 'a[iconname="eye"]')[i].click()
            return WebDriverWait(browser, 10).until(lambda b: _new_shown(b, shown_before))
        except WebDriverException:
            continue
    raise AssertionError(f"result {i} never showed anything new (seen: {sorted(shown_before)})")


def _new_shown(browser, shown_before: set[str]) -> str | bool:
    """The key of a result on screen that was not shown before, or False."""
    return next((key for key in _shown(browser) if key not in shown_before), False)


def _shown(browser) -> list[str]:
    """Keys of the results on screen: decoded PNGs (by their data) and HTML pages in iframes."""
    return browser.execute_script(
        """
        const images = Array.from(document.images).filter(
            i => i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 100);
        const frames = Array.from(document.querySelectorAll('iframe'));
        return images.map(i => 'img:' + i.src.length + ':' + i.src.slice(-64)).concat(
            frames.map(f => 'iframe:' + f.src.length + ':' + f.src.slice(-64)));
        """
    )

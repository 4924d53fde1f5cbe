"""Test helper: open a page in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium).

    with open_page(tmp_path / "report.html", tmp_path / "shot.png") as page:
        assert page.console_errors == []
        assert all(img["natural_width"] > 0 for img in page.images)
        page.run("return document.title")

`open_page` skips the calling test (with the reason) when selenium, chromium or chromedriver is missing; `.ci/run`
installs them. The screenshot is taken once the page has loaded (and `wait_for`, a CSS selector, is present); it
covers the whole page height up to `max_height` pixels.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_CANDIDATES = ("chromedriver",)
_IMAGES_JS = ("return Array.from(document.images).map(img => ({src_prefix: img.src.slice(0, 40), "
              "natural_width: img.naturalWidth, complete: img.complete}));")


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) executables, or None."""
    browser = next((shutil.which(name) for name in CHROMIUM_CANDIDATES if shutil.which(name)), None)
    driver = next((shutil.which(name) for name in DRIVER_CANDIDATES if shutil.which(name)), None)
    return (browser, driver) if browser and driver else None


@dataclass
class PageResult:
    """A loaded page: what the browser logged and the page's images; `run`/`click` act on it while it is open."""

    driver: object
    console_errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    screenshot: Path | None = None

    def run(self, js: str, *args):
        """Run JavaScript in the page (use `return ...` to get a value back)."""
        return self.driver.execute_script(js, *args)

    def click(self, css: str) -> None:
        """Click the first element matching a CSS selector."""
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.CSS_SELECTOR, css).click()

    def wait_for(self, css: str, timeout: float = 30, text: str | None = None) -> None:
        """Wait until an element matching `css` exists (and, with `text`, contains it)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        locator = (By.CSS_SELECTOR, css)
        condition = ec.text_to_be_present_in_element(locator, text) if text else ec.presence_of_element_located(locator)
        WebDriverWait(self.driver, timeout).until(condition)

    def new_console_errors(self) -> list[str]:
        """Console errors logged since the last call (SEVERE entries of the browser log)."""
        errors = [entry["message"] for entry in self.driver.get_log("browser") if entry.get("level") == "SEVERE"]
        self.console_errors += errors
        return errors

    def refresh_images(self) -> list[dict]:
        self.images = [{"src_prefix": i["src_prefix"], "natural_width": i["natural_width"]}
                       for i in self.run(_IMAGES_JS)]
        return self.images

    def take_screenshot(self, path: Path, width: int = 1280, max_height: int = 4000) -> Path:
        """A PNG of the page at `width` px, as tall as the page (at most `max_height`)."""
        height = int(self.run("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"))
        self.driver.set_window_size(width, max(600, min(height, max_height)))
        time.sleep(0.2)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return Path(path)

    def close(self) -> None:
        self.driver.quit()

    def __enter__(self) -> "PageResult":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BrowserUnavailable(RuntimeError):
    """selenium, chromium or chromedriver is missing (the message says which and how to get it)."""


def open_page(url_or_path: str | Path, screenshot: Path | None, wait_for: str | None = None, timeout: float = 30,
              width: int = 1280, max_height: int = 4000, skip_if_missing: bool = True) -> PageResult:
    """Open a URL (or a local file, as file://) in headless Chromium; wait until the page and its images have
    loaded (and `wait_for` exists); collect console errors and images; take the screenshot. Close it (or use `with`).
    Without a browser: skip the calling test, or (`skip_if_missing=False`, for scripts) raise `BrowserUnavailable`.
    """
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')", skip_if_missing)
    paths = browser_paths()
    if paths is None:
        _unavailable("no chromium + chromedriver on this machine (.ci/run installs them: apt-get install chromium "
                     "chromium-driver)", skip_if_missing)
    browser, driver_path = paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},900", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    page = PageResult(driver=driver)
    try:
        driver.set_page_load_timeout(timeout)
        target = str(url_or_path)
        if "://" not in target:
            target = Path(target).resolve().as_uri()
        driver.get(target)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the document and every image finished (loaded or failed)
            state = page.run("return document.readyState")
            if state == "complete" and all(i["complete"] for i in page.run(_IMAGES_JS)):
                break
            time.sleep(0.1)
        if wait_for:
            page.wait_for(wait_for, timeout=max(1.0, deadline - time.monotonic()))
        page.new_console_errors()
        page.refresh_images()
        if screenshot is not None:
            page.screenshot = page.take_screenshot(screenshot, width=width, max_height=max_height)
    except BaseException:
        driver.quit()
        raise
    return page


def _unavailable(reason: str, skip: bool) -> None:
    if skip:
        pytest.skip(reason)
    raise BrowserUnavailable(reason)

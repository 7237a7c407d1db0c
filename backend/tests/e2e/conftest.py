"""The chat page in a real headless Chromium (Debian's, driven through its chromedriver)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.conftest import LiveServer, Servers
from tests.waiting import engine_idle, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 800)

# Headless, and quiet: without the background-networking flags Chromium keeps trying to
# reach its update, sync and safe-browsing services, which a closed network never answers.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """A fresh browser per test: its own profile, so no key or theme is remembered."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        raise RuntimeError("Chromium and chromedriver are not installed: run `make chromium`")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    # The console, to find what the page's Content-Security-Policy blocked.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    # The page's own area at exactly this size (the window's is larger by its frame), so
    # that screenshots have it.
    metrics = {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots_dir(tmp_path: Path) -> Path:
    """Where the tests save the page's screenshots: a folder of the test's own, unless
    ``CHATBOT_SCREENSHOTS_DIR`` names one (``make screenshots`` names docs/screenshots, the
    pictures the README shows)."""
    named = os.environ.get("CHATBOT_SCREENSHOTS_DIR")
    folder = Path(named) if named else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def idle_live_server(live_server: LiveServer) -> LiveServer:
    """The shared real-model server, once a stream an earlier test left has been cancelled
    (its engine queue holds one request)."""
    engine = live_server.state.engine
    wait_until(lambda: engine_idle(engine), timeout=60)
    return live_server


@pytest.fixture(scope="module")
def slow_server(module_server: Servers) -> str:
    """A server on the simulated engine (a timing model, not a language model), for what
    needs an answer that is still being written seconds later: the small real model's
    answers are a dozen tokens. It writes 400 tokens at 20 a second."""
    return module_server(
        engine="simulated",
        simulated_decode_tokens_per_s=20,
        simulated_answer_tokens=400,
        max_tokens=400,
    ).url

"""The django-debug-toolbar panel: what it records for a request, that it records
nothing otherwise, and the panel itself in a real browser (headless Chromium)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

import django_pgpool
from django_pgpool import observers
from django_pgpool.debug_toolbar import start_recording, stop_recording
from testproject.library.models import Author
from testsupport.pgserver import ensure_server
from testsupport.servers import Library, free_port, library_database, project_env, running

from .helpers import REPO, pool_options, query_one

SCREENSHOT = REPO / "docs" / "debug-toolbar-panel.png"


@pytest.fixture
def recording(fresh_pools: None) -> Iterator[Any]:
    connection.close()
    recording, token = start_recording()
    try:
        yield recording
    finally:
        stop_recording(recording, token)


@pytest.mark.django_db(transaction=True)
def test_each_checkout_of_the_request_is_recorded_with_its_wait_reuse_and_pool_state(
    recording: Any,
) -> None:
    with pool_options(release="request"):  # one checkout per request, as counted below
        first_pid = checkouts_of_two_requests()
    first, second = recording.checkouts
    assert first["alias"] == second["alias"] == "default"
    assert first["backend_pid"] == second["backend_pid"] == first_pid
    assert not first["reused"] and second["reused"]  # min_size 1: opened for the first
    assert second["reset_pending"]
    assert second["age_s"] >= first["age_s"] >= 0
    assert 0 < second["wait_ms"] < 1000
    assert (second["in_use"], second["waiting"]) == (1, 0)


def checkouts_of_two_requests() -> int:
    """Two requests' checkouts; the backend pid of the first."""
    Author.objects.count()
    first_pid = int(query_one(connection, "SELECT pg_backend_pid()"))
    connection.close()  # dirty: its reset is sent now and read at the next checkout
    Author.objects.count()
    connection.close()
    return first_pid


@pytest.mark.django_db(transaction=True)
def test_a_pool_warning_logged_during_the_request_is_recorded(recording: Any) -> None:
    logging.getLogger("django_pgpool").warning("pool %r: something to see", "default")
    logging.getLogger("django_pgpool").info("not a warning")
    assert recording.warnings == [
        {"level": "WARNING", "message": "pool 'default': something to see"}
    ]


@pytest.mark.django_db(transaction=True)
def test_checkouts_of_other_requests_are_not_recorded(recording: Any) -> None:
    def another_request() -> None:
        Author.objects.count()
        connection.close()

    elsewhere = threading.Thread(target=another_request)
    elsewhere.start()
    elsewhere.join()
    assert recording.checkouts == []


def test_without_a_recording_the_pool_has_no_observer_and_the_logger_no_handler() -> None:
    recording, token = start_recording()
    assert observers._observers and observers.WATCHING
    stop_recording(recording, token)
    assert observers._observers == []
    assert not any(
        type(handler).__name__ == "_WarningsHandler"
        for handler in logging.getLogger("django_pgpool").handlers
    )
    # Nothing else watches either, unless the metrics' timings were switched on.
    from django_pgpool.counters import timings_enabled

    assert bool(observers.WATCHING) == timings_enabled()


# ---------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """The system's Chromium and its WebDriver (Debian: chromium, chromium-driver)."""
    pytest.importorskip("selenium", reason="selenium (the test extra) drives the browser")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
            ".ci/run installs it where it can): the panel is not checked in a browser"
        )
    return browser, driver


@pytest.fixture(scope="module")
def library() -> Iterator[Library]:
    with library_database(ensure_server(), "pgpool_toolbar", books=5) as library:
        yield library


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_panel_shows_in_the_toolbar_of_a_real_browser_with_the_wait(
    chromium: tuple[str, str], library: Library, tmp_path: Path
) -> None:
    browser, driver_path = chromium
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    port = free_port()
    env = project_env(library.name, TESTPROJECT_DEBUG_TOOLBAR="1")
    args = [
        sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}", "--noreload",
    ]  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=1280,800", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(argument)
    with running(args, env=env, log_path=tmp_path / "runserver.log", port=port) as server:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        try:
            # The first request opens the pool's connection; the second reuses it.
            driver.get(f"http://127.0.0.1:{port}/books/page/")
            driver.get(f"http://127.0.0.1:{port}/books/page/")
            wait = WebDriverWait(driver, 20)
            root = wait.until(lambda d: d.find_element(By.ID, "djDebugRoot").shadow_root)
            button = wait.until(lambda d: root.find_element(By.CSS_SELECTOR, "#djdt-PoolPanel a"))
            nav = button.text
            button.click()
            panel = root.find_element(By.CSS_SELECTOR, "#PoolPanel")
            content = panel.find_element(By.CSS_SELECTOR, ".djdt-scroll")
            wait.until(lambda d: "Waited" in content.text)
            title = panel.find_element(By.CSS_SELECTOR, "h3").text
            total = panel.find_element(By.CSS_SELECTOR, ".djdt-pgpool-total-wait").text
            cells = panel.find_elements(By.CSS_SELECTOR, ".djdt-pgpool-wait")
            waits = [cell.text for cell in cells]
            body = panel.text
            driver.save_screenshot(str(tmp_path / "panel.png"))
        finally:
            driver.quit()
        log = server.log()

    assert title == "Connection pool", log
    assert re.fullmatch(r"\d+\.\d{3} ms", total), body
    assert nav.startswith("Connection pool") and f"{total} wait, 1 connection" in nav, nav
    assert waits == [total], body
    assert "reused" in body and "The pool logged no warning" in body, body
    if os.environ.get("PGPOOL_UPDATE_SCREENSHOT"):
        shutil.copyfile(tmp_path / "panel.png", SCREENSHOT)


def test_the_docs_show_the_panels_screenshot() -> None:
    assert SCREENSHOT.read_bytes().startswith(b"\x89PNG")
    assert "(debug-toolbar-panel.png)" in (REPO / "docs" / "configuration.md").read_text()
    assert django_pgpool  # the package the panel belongs to

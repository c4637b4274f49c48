"""The dashboard at /ui/ in a real headless browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import requests

from tests.support.harness import fake_cmd

CHROMIUM = "/usr/bin/chromium"
REQUIRE_BROWSER = "BERTH_REQUIRE_BROWSER"  # scripts/test.sh sets it once it has installed chromium


@pytest.fixture
def chromium_path() -> str:
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None:
        if os.environ.get(REQUIRE_BROWSER):
            pytest.fail(f"{REQUIRE_BROWSER} is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("no chromium (apt-get install chromium)")
    pytest.importorskip("playwright")
    return path


def running(b) -> list[str]:
    response = requests.get(b.url + "/running", headers={"Authorization": "Bearer dash-key"}, timeout=5)
    return [entry["model"] for entry in response.json()["running"]]


def config(start_port: int, tmp_path) -> str:
    return f"""
startPort: {start_port}
apiKeys: [dash-key]
models:
  a:
    cmd: {fake_cmd('a')}
    ttl: 120
    memory: {{ram: 1GiB}}
    capabilities: {{in: [text, image]}}
  b:
    cmd: {fake_cmd('b')}
    memory: {{ram: 1GiB}}
"""


def test_dashboard_loads_unloads_streams_logs_and_chats(berth, start_port, tmp_path, chromium_path):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    b = berth(config(start_port, tmp_path))
    refused = requests.get(b.url + "/ui/", timeout=5)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(b.url + "/ui/api/running", timeout=5).status_code == 401
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"])
        try:
            context = browser.new_context(http_credentials={"username": "anyone", "password": "dash-key"},
                                          viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.goto(b.url + "/ui")  # redirects to /ui/
            row = page.locator('tr[data-model="a"]')
            expect(row.locator(".state")).to_have_text("stopped")
            expect(row.locator(".planned")).to_contain_text("host 1024 MiB (declared)")
            expect(row.locator(".model .badge.vision")).to_have_text("vision")  # takes images
            expect(page.locator('tr[data-model="b"] .model')).to_have_text("b")  # no badge

            row.locator("button.load").click()
            expect(row.locator(".state")).to_have_text("ready", timeout=20_000)
            assert running(b) == ["a"]
            expect(row.locator(".ttl")).to_have_text(re.compile(r"^\d+ s$"))
            expect(row.locator(".measured")).to_contain_text("host")

            page.select_option("#log-source", "a")
            expect(page.locator("#logs")).to_contain_text("fake server a starting", timeout=10_000)

            page.select_option("#chat-model", "a")
            page.click("#chat-send")
            expect(page.locator("#chat-output")).to_have_text("tok0 tok1 tok2 tok3 tok4 ", timeout=10_000)
            latest = page.locator("#requests tbody tr").first
            expect(latest).to_contain_text("/v1/chat/completions")
            expect(latest).to_contain_text("200")

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            row.locator("button.unload").click()
            expect(row.locator(".state")).to_have_text("stopped", timeout=20_000)
            assert running(b) == []

            stranger = browser.new_context()  # no credentials: the browser is challenged and cannot answer
            with pytest.raises(PlaywrightError, match="AUTH"):
                stranger.new_page().goto(b.url + "/ui/")
        finally:
            browser.close()

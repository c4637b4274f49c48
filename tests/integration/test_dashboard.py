"""The dashboard at /ui/ in a real headless browser: Debian's chromium driven by Playwright.

With BERTH_SCREENSHOTS=docs/images the views' screenshots are also written there (README shows one)."""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.support.harness import fake_cmd, free_port

CHROMIUM = "/usr/bin/chromium"
REQUIRE_BROWSER = "BERTH_REQUIRE_BROWSER"  # scripts/test.sh sets it once it has installed chromium
SCREENSHOTS = "BERTH_SCREENSHOTS"  # a folder to write the views' screenshots into as well (docs/images)


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
            refused_by_policy: list[str] = []  # the page must work under its own Content-Security-Policy
            page.on("console", lambda message: refused_by_policy.append(message.text)
                    if "Content Security Policy" in message.text else None)
            shown = page.goto(b.url + "/ui")  # redirects to /ui/
            assert shown is not None and "frame-ancestors 'none'" in shown.headers["content-security-policy"]
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
            assert refused_by_policy == []

            stranger = browser.new_context()  # no credentials: the browser is challenged and cannot answer
            with pytest.raises(PlaywrightError, match="AUTH"):
                stranger.new_page().goto(b.url + "/ui/")
        finally:
            browser.close()


# A page on another site that tries what issue 22 reproduced against a keyless berth: read a chat answer, load a
# model with a text/plain POST, unload everything with an <img>, load a model with another, and frame the dashboard.
HOSTILE_PAGE = """<!doctype html><title>evil</title>
<iframe id="dashboard" src="BERTH/ui/"></iframe>
<script>
const berth = "BERTH";
const image = (path) => new Promise((done) => { const img = new Image(); img.onload = img.onerror = done;
                                                img.src = berth + path; });
(async () => {
  const results = {};
  try {
    const answer = await fetch(berth + "/v1/chat/completions", {method: "POST", headers: {"Content-Type": "text/plain"},
                                                                body: JSON.stringify({model: "b", messages: []})});
    results.chat = "read: " + await answer.text();
  } catch (error) { results.chat = "refused: " + error; }
  await fetch(berth + "/models/load", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                       body: JSON.stringify({model: "b"})}).catch(() => {});
  await image("/unload");
  await image("/upstream/b/props");
  window.results = results;
})();
</script>"""


@contextmanager
def hostile_site(berth_url: str) -> Iterator[str]:
    """The page above, served on `localhost` (another site than berth's 127.0.0.1 to a browser)."""
    body = HOSTILE_PAGE.replace("BERTH", berth_url).encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_page_of_another_site_can_neither_use_nor_frame_a_keyless_berth(berth, start_port, chromium_path):
    from playwright.sync_api import sync_playwright

    b = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n"
              f"  b: {{cmd: \"{fake_cmd('b', '--echo-cors')}\"}}\n"
              "groups: {both: {swap: false, exclusive: false, members: [a, b]}}\n")
    assert requests.post(b.url + "/models/load", json={"model": "a"}, timeout=30).status_code == 200
    with hostile_site(b.url) as evil, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(evil)
            results = page.wait_for_function("window.results", timeout=30_000).json_value()
            assert results["chat"].startswith("refused"), results
            framed = [frame for frame in page.frames if frame is not page.main_frame]
            assert len(framed) == 1 and framed[0].locator("#models").count() == 0
        finally:
            browser.close()
    models = requests.get(b.url + "/running", timeout=5).json()["running"]
    assert [entry["model"] for entry in models] == ["a"]  # not unloaded, and b never loaded


def test_the_dashboard_shows_a_key_only_what_its_scopes_allow(berth, start_port, tmp_path, chromium_path):
    from playwright.sync_api import expect, sync_playwright

    restricted = config(start_port, tmp_path).replace(
        "apiKeys: [dash-key]", "apiKeys:\n  - dash-key\n  - {name: chat, key: chat-key, models: [a], scopes: [inference]}")
    b = berth(restricted, env={"BERTH_HOME": str(tmp_path / "home")})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"])
        try:
            context = browser.new_context(http_credentials={"username": "anyone", "password": "chat-key"})
            page = context.new_page()
            page.goto(b.url + "/ui/")
            expect(page.locator("#whoami")).to_have_text("key chat: inference")
            row = page.locator('tr[data-model="a"]')
            expect(row.locator(".state")).to_have_text("stopped")
            expect(page.locator('tr[data-model="b"]')).to_have_count(0)  # not one of its models
            expect(row.locator("button")).to_have_count(0)  # loading and unloading are admin's
            for hidden in ("#logs", "#requests", "#devices"):
                expect(page.locator(hidden)).to_be_hidden()
            page.select_option("#chat-model", "a")
            page.click("#chat-send")
            expect(page.locator("#chat-output")).to_have_text("tok0 tok1 tok2 tok3 tok4 ", timeout=20_000)
            usage = page.locator('#usage tr[data-key="chat"]')
            expect(usage.locator(".requests")).to_have_text("1")
            expect(usage.locator(".completion")).to_have_text("5")
            hour = usage.locator("svg.plot g")  # the plot: this hour's bar, the one hour it used
            expect(hour).to_have_count(1)
            expect(hour).to_have_attribute("data-completion", "5")
            expect(hour).to_have_attribute("data-prompt", usage.locator(".prompt").inner_text())
            assert float(hour.locator("rect.completion-bar").get_attribute("height") or 0) > 0
            expect(page.locator("#usage tbody tr")).to_have_count(1)  # its own usage only
        finally:
            browser.close()


def save_view(target, tmp_path, name: str, **options) -> None:
    """A screenshot of one view (a page or a section) into the test's folder, and into $BERTH_SCREENSHOTS as
    dashboard-NAME.png when that is set."""
    shot = tmp_path / f"dashboard-{name}.png"
    target.screenshot(path=str(shot), **options)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folder = os.environ.get(SCREENSHOTS)
    if folder:
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(shot, os.path.join(folder, shot.name))


@contextmanager
def dashboard_page(chromium_path: str, key: str, width: int, height: int) -> Iterator:
    """A page of a headless chromium logged in with `key`, in a window of that size; closed whatever happens."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"])
        try:
            context = browser.new_context(http_credentials={"username": "anyone", "password": key},
                                          viewport={"width": width, "height": height})
            yield context.new_page()
        finally:
            browser.close()


def rivals(start_port: int) -> str:
    """Two models that cannot be resident together: 1 GiB each in a 1.5 GiB budget."""
    return f"""
startPort: {start_port}
captureBodies: true
memory: {{budget: {{ram: 1.5GiB}}, headroom: 0}}
apiKeys:
  - dash-key
  - {{name: chat, key: chat-key, models: [a], scopes: [inference]}}
models:
  a:
    cmd: {fake_cmd('a', '--playground')}
    memory: {{ram: 1GiB}}
  b:
    cmd: {fake_cmd('b', '--playground')}
    memory: {{ram: 1GiB}}
    capabilities: {{in: [text, image], out: [text]}}
"""


def test_the_memory_map_and_timeline_show_an_eviction_and_why_and_the_playground_streams(
        berth, start_port, tmp_path, chromium_path):
    from playwright.sync_api import expect

    b = berth(rivals(start_port), env={"BERTH_HOME": str(tmp_path / "home")})  # its own usage only
    with dashboard_page(chromium_path, "dash-key", 1280, 900) as page:
        refused = []  # what the page's Content-Security-Policy blocked: nothing may be
        page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(b.url + "/ui/")
        assert "script-src 'self'" in requests.get(b.url + "/ui/", headers={"Authorization": "Bearer dash-key"},
                                                   timeout=5).headers["Content-Security-Policy"]
        host = page.locator('.device[data-device="host"]')
        expect(host.locator("h3")).to_contain_text("budget 1.5 GiB")
        expect(host.locator(".share")).to_have_count(0)

        page.select_option("#chat-model", "a")
        expect(page.locator("#image-row")).to_be_hidden()  # a takes no images
        expect(host.locator(".next")).to_contain_text("next: a needs 1.0 GiB (declared): fits beside what runs")
        page.click("#chat-send")
        expect(page.locator("#chat-output")).to_have_text("tok0 tok1 tok2 tok3 tok4 ", timeout=20_000)
        share = host.locator('.share[data-model="a"]')
        expect(share).to_have_attribute("data-source", "declared")
        expect(host.locator(".facts")).to_contain_text("planned in use 1.0 GiB of 1.5 GiB")
        expect(host.locator(".facts")).to_contain_text("a 1.0 GiB declared")
        share.hover()
        expect(page.locator("#tooltip")).to_contain_text("planned 1.0 GiB (declared)")
        page.select_option("#chat-model", "b")
        expect(host.locator(".next")).to_contain_text("next: b needs 1.0 GiB (declared): 512 MiB more than is left")
        save_view(page.locator("#memory"), tmp_path, "memory")

        expect(page.locator("#image-row")).to_be_visible()  # b takes images, as /v1/models says
        image = tmp_path / "dot.png"
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
        page.set_input_files("#play-image", str(image))
        page.click("#chat-send")  # b cannot fit beside a: a is evicted for it
        expect(page.locator("#chat-output")).to_have_text("tok0 tok1 tok2 tok3 tok4 ", timeout=20_000)
        stop = page.locator('#events tr[data-kind="stop"][data-model="a"]')
        expect(stop.locator(".kind")).to_have_text("stop (memory)")
        expect(stop.locator(".why")).to_contain_text(
            re.compile(r"^evicted for b: needs 1\.0 GiB on host \(512\.0 MiB short\), a idle \d+ s, "
                       r"least recently used$"))
        expect(page.locator('.lane[data-model="a"] .mark.stop.memory')).to_have_count(1)
        expect(host.locator('.share[data-model="b"]')).to_be_visible()
        expect(host.locator('.share[data-model="a"]')).to_have_count(0)
        save_view(page.locator("#timeline"), tmp_path, "timeline")

        latest = page.locator("#requests tbody tr").first
        expect(latest).to_contain_text("/v1/chat/completions")
        expect(latest.locator(".ttft")).to_have_text(re.compile(r"^\d+ ms$"))
        latest.locator("button.details").click()
        expect(page.locator("#request-detail")).to_contain_text('"text": "Name three colors."')
        expect(page.locator("#request-detail")).to_contain_text('"url": "data:image/png;base64,[48 bytes]"')
        expect(page.locator("#request-detail")).to_contain_text("tok4")
        save_view(page.locator("#activity"), tmp_path, "activity")

        for mode, first, second, shown in (
                ("embeddings", "red apple", "red apple", "vector size 12\ncosine similarity 1.0000"),
                ("rerank", "green tea", "black coffee\ngreen tea leaves", "2.000  green tea leaves\n0.000  black coffee"),
                ("completion", "Once", None, "word0 word1 word2 word3 word4 ")):
            page.select_option("#play-mode", mode)
            page.fill("#chat-input", first)
            if second is not None:
                page.fill("#play-second", second)
            page.click("#chat-send")
            expect(page.locator("#chat-output")).to_have_text(shown, timeout=20_000)
        save_view(page.locator("#playground"), tmp_path, "playground")
        page.evaluate("window.scrollTo(0, 0)")  # the header stays at the top of the page
        save_view(page, tmp_path, "overview", full_page=True)
        assert refused == []


def test_a_narrow_window_with_an_inference_key_shows_its_playground_and_nothing_it_may_not_see(
        berth, start_port, tmp_path, chromium_path):
    from playwright.sync_api import expect

    b = berth(rivals(start_port), env={"BERTH_HOME": str(tmp_path / "home")})
    with dashboard_page(chromium_path, "chat-key", 390, 844) as page:
        page.goto(b.url + "/ui/")
        expect(page.locator("#whoami")).to_have_text("key chat: inference")
        for hidden in ("#memory", "#timeline", "#activity", "#logs"):
            expect(page.locator(hidden)).to_be_hidden()
        page.select_option("#chat-model", "a")
        page.click("#chat-send")
        expect(page.locator("#chat-output")).to_have_text("tok0 tok1 tok2 tok3 tok4 ", timeout=20_000)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # nothing sideways
        save_view(page, tmp_path, "narrow", full_page=True)

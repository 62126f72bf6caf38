"""The admin web UI (web/static, served at /admin) in a real headless Chromium against a live gateway.

Playwright drives Debian's chromium (no `playwright install`, no browser download). The gateway is the
module's own: the embedded model, the embedded semantic-cache store, an admin key. The tests sign in with a
wrong key and with the right one, send chat requests through the openai client and watch the pages follow,
invalidate an entry from the Entries page and check that the question then misses, and save a full-page
screenshot of every page (1366x768 viewport), into docs/screenshots/admin-<page>.png with
BLENDGATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from support import BLEND_ALWAYS, EMBEDDED, GatewayProcess, find_chromium

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the admin UI test needs Playwright: pip install playwright (the test uses Debian's chromium; "
           "do not run `playwright install`)")
expect = sync_api.expect

ADMIN_KEY = "admin-key-for-tests-123"
KEY_STORAGE = "blendgate.adminKey"   # web/static/admin.js keeps the key under this name
NOT_ACCEPTED = "That admin key was not accepted"
VIEWPORT = {"width": 1366, "height": 768}
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
MAX_TOKENS = 16
QUESTION = "What is the capital of France?"
DOCUMENTS = ["The Nile is about 6,650 km long and flows north into the Mediterranean Sea.",
             "Mount Kilimanjaro, in Tanzania, is the highest mountain in Africa at 5,895 m."]
# The browser's own report of a response with an error status (not something the page logged or threw).
BROWSER_401 = re.compile(r"^Failed to load resource: the server responded with a status of 401\b")
NUMBER = re.compile(r"^\d{1,3}(,\d{3})*$")
PERCENT = re.compile(r"^\d{1,3}(\.\d)?\s?%$")


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("the admin UI test needs Debian's chromium and it is not installed (apt-get install chromium); "
                    "it was not installed here because that needs root and apt-get")
    return found


@pytest.fixture(scope="module")
def admin_gateway(workdir: Path, model_cache_dir: Path) -> Iterator[GatewayProcess]:
    config = {
        "admin_key": ADMIN_KEY,
        "retrieval": {"data_dir": str(workdir / "admin-ui-collections")},
        "chunk_cache": BLEND_ALWAYS,
        "semantic_cache": {"enabled": True},  # no redis_url: the embedded entry store
    }
    process = GatewayProcess("admin-ui", config, workdir, model_cache_dir).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/screenshots when BLENDGATE_SCREENSHOTS=1 (to refresh the README's pictures), else a temporary
    folder: an ordinary test run leaves the checkout as it was."""
    if os.environ.get("BLENDGATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")


class Console:
    """Everything the page logs to the console, and every uncaught error, from the moment it is attached."""

    def __init__(self, page) -> None:
        self.messages: list[tuple[str, str]] = []
        page.on("console", lambda message: self.messages.append((message.type, message.text)))
        page.on("pageerror", lambda error: self.messages.append(("pageerror", str(error))))

    def problems(self) -> list[tuple[str, str]]:
        return [(kind, text) for kind, text in self.messages if kind in ("error", "warning", "pageerror")]


def ask(gateway: GatewayProcess, question: str, **extra: Any):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed", max_retries=0, timeout=120)
    return client.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=MAX_TOKENS, **extra)


def cache_report(completion) -> dict:
    return completion.model_extra["blendgate"]["semantic_cache"]


def stored_entry(gateway: GatewayProcess, question: str, timeout_s: float = 15.0) -> dict:
    """The entry of `question` once the gateway has stored it (answers are stored in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        listed = httpx.get(f"{gateway.url}/admin/api/semantic-cache/entries", params={"search": question},
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
        exact = [entry for entry in listed["data"] if entry["query"] == question]
        if exact:
            return exact[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no entry was stored for {question!r}: {listed}")
        time.sleep(0.1)


def count(page, testid: str) -> int:
    text = page.get_by_test_id(testid).inner_text().strip()
    assert NUMBER.match(text), f"{testid} shows {text!r}, not a count"
    return int(text.replace(",", ""))


def open_view(page, name: str) -> None:
    page.get_by_test_id(f"nav-{name}").click()
    expect(page.get_by_test_id(f"view-{name}")).to_be_visible()
    expect(page.get_by_test_id(f"nav-{name}")).to_have_attribute("aria-current", "page")


def test_a_wrong_key_shows_only_the_login_prompt(admin_gateway: GatewayProcess, browser, screenshots: Path) -> None:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    console = Console(page)
    try:
        page.goto(f"{admin_gateway.url}/admin")
        expect(page.get_by_test_id("login-key")).to_be_visible()
        expect(page.get_by_test_id("app")).to_be_hidden()
        expect(page.get_by_test_id("login-message")).to_be_hidden()
        page.screenshot(path=str(screenshots / "admin-login.png"), full_page=True)

        page.get_by_test_id("login-key").fill("not-the-admin-key")
        page.get_by_test_id("login-submit").click()
        expect(page.get_by_test_id("login-message")).to_contain_text(NOT_ACCEPTED)
        expect(page.get_by_test_id("app")).to_be_hidden()
        expect(page.get_by_test_id("requests-total")).to_be_hidden()
        # Not just hidden: nothing of the gateway's was ever put into the page.
        assert page.get_by_test_id("requests-total").text_content() == "—"
        assert page.get_by_test_id("entries-table").locator("tbody tr").count() == 0
        assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") is None

        # A stale key left in the tab's storage is refused the same way when the page loads.
        page.evaluate(f"sessionStorage.setItem('{KEY_STORAGE}', 'a-key-that-was-rotated')")
        page.reload()
        expect(page.get_by_test_id("login-message")).to_contain_text(NOT_ACCEPTED)
        expect(page.get_by_test_id("app")).to_be_hidden()
        assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") is None
    finally:
        context.close()
    # The only console lines allowed are Chromium's own reports of the two 401 answers the test asked for.
    problems = console.problems()
    assert all(kind == "error" and BROWSER_401.match(text) for kind, text in problems), problems
    assert len(problems) <= 2, problems


def test_pages_follow_the_gateway_and_invalidate_entries(admin_gateway: GatewayProcess, browser,
                                                         screenshots: Path) -> None:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    console = Console(page)
    try:
        page.goto(f"{admin_gateway.url}/admin")
        page.get_by_test_id("login-key").fill(ADMIN_KEY)
        page.get_by_test_id("login-submit").click()
        expect(page.get_by_test_id("view-overview")).to_be_visible()
        expect(page.get_by_test_id("login")).to_be_hidden()
        expect(page.get_by_test_id("requests-total")).to_have_text(NUMBER)
        # The key is kept for the tab: a reload stays signed in.
        page.reload()
        expect(page.get_by_test_id("view-overview")).to_be_visible()
        expect(page.get_by_test_id("semantic-hits")).to_have_text(NUMBER)
        hits_before = count(page, "semantic-hits")
        requests_before = count(page, "requests-total")

        # The same question twice: a miss whose answer is stored, then a hit on the stored entry.
        first = ask(admin_gateway, QUESTION)
        assert cache_report(first)["status"] == "miss", cache_report(first)
        entry = stored_entry(admin_gateway, QUESTION)
        second = ask(admin_gateway, QUESTION)
        hit = cache_report(second)
        assert hit["status"] == "hit" and hit["entry_id"] == entry["id"], hit
        assert second.choices[0].message.content == first.choices[0].message.content
        # The overview polls every 2 s: the hit counter follows without a reload.
        expect(page.get_by_test_id("semantic-hits")).to_have_text(str(hits_before + 1), timeout=20_000)
        expect(page.get_by_test_id("semantic-hit-rate")).to_have_text(PERCENT)
        expect(page.get_by_test_id("ttft-hit")).to_have_text(re.compile(r"^[\d.,]+ (ms|s)$"))
        expect(page.get_by_test_id("ttft-miss")).to_have_text(re.compile(r"^[\d.,]+ (ms|s)$"))
        page.wait_for_function(
            "([id, least]) => Number(document.querySelector(`[data-testid=\"${id}\"]`).textContent"
            ".replace(/,/g, '')) >= least", arg=["requests-total", requests_before + 2], timeout=20_000)
        assert count(page, "tokens-saved") >= 1

        # Two questions over the same inline documents: the second reuses the documents' chunk KV caches.
        ask(admin_gateway, "How long is the Nile?", extra_body={"documents": DOCUMENTS})
        ask(admin_gateway, "Which is the highest mountain in Africa?", extra_body={"documents": DOCUMENTS})
        expect(page.get_by_test_id("chunk-hit-rate")).to_have_text(PERCENT, timeout=20_000)

        open_view(page, "semantic-cache")
        expect(page.get_by_test_id("semantic-store")).to_have_text("Embedded")
        expect(page.get_by_test_id(f"category-hits-{hit['category']}")).to_have_text("1")
        expect(page.get_by_test_id("semantic-categories").locator(f"tr[data-category='{hit['category']}']")
               ).to_be_visible()
        page.screenshot(path=str(screenshots / "admin-semantic-cache.png"), full_page=True)

        open_view(page, "chunk-cache")
        model = page.get_by_test_id(f"chunk-model-{EMBEDDED}")
        expect(model).to_be_visible()
        tiers = page.get_by_test_id(f"chunk-tiers-{EMBEDDED}")
        expect(tiers.locator("tr[data-tier='cpu']")).to_be_visible()
        expect(tiers.locator("tr[data-tier='disk']")).to_be_visible()
        expect(page.get_by_test_id(f"chunk-collections-{EMBEDDED}")).to_contain_text("(inline)")
        top_tier = page.get_by_test_id(f"chunk-top-{EMBEDDED}").locator("tbody tr").first.locator("td").last
        expect(top_tier).to_have_text(re.compile(r"^(cpu|disk)$"))
        page.screenshot(path=str(screenshots / "admin-chunk-cache.png"), full_page=True)

        open_view(page, "entries")
        row = page.get_by_test_id("entry-row").filter(has_text=QUESTION)
        expect(row).to_have_count(1)
        expect(row).to_have_attribute("data-entry-id", entry["id"])
        page.screenshot(path=str(screenshots / "admin-entries.png"), full_page=True)
        page.get_by_test_id("entries-search").fill("capital of france")
        expect(page.get_by_test_id("entry-row")).to_have_count(1)
        row.get_by_test_id(f"invalidate-{entry['id']}").click()
        expect(page.get_by_test_id("toast")).to_contain_text("invalidated")
        expect(page.get_by_test_id("entry-row")).to_have_count(0)   # the list was read again
        expect(page.get_by_test_id("entries-table")).to_contain_text("No entries match")

        # The identical request no longer finds an answer: it goes to the model again.
        again = cache_report(ask(admin_gateway, QUESTION))
        assert again["status"] == "miss" and "entry_id" not in again, again

        open_view(page, "configuration")
        config = page.get_by_test_id("config-json")
        expect(config).to_contain_text('"admin_key": "***"')
        expect(config).to_contain_text('"semantic_cache"')
        assert ADMIN_KEY not in page.content()
        page.screenshot(path=str(screenshots / "admin-configuration.png"), full_page=True)

        # Last, the overview with a few snapshots drawn.
        open_view(page, "overview")
        expect(page.get_by_test_id("chart-requests").locator("canvas")).to_be_visible()
        expect(page.locator("#chart-requests-empty")).to_be_hidden(timeout=10_000)
        expect(page.get_by_test_id("chart-hit-rates").locator("canvas")).to_be_visible()
        page.wait_for_timeout(4_000)
        page.screenshot(path=str(screenshots / "admin-overview.png"), full_page=True)

        page.get_by_test_id("logout").click()
        expect(page.get_by_test_id("login-key")).to_be_visible()
        expect(page.get_by_test_id("app")).to_be_hidden()
    finally:
        context.close()
    assert console.problems() == [], console.problems()

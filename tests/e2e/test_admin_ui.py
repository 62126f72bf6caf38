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
from support import BLEND_ALWAYS, EMBEDDED, REPO, GatewayProcess, find_chromium

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the admin UI test needs Playwright: pip install playwright (the test uses Debian's chromium; "
           "do not run `playwright install`)")
expect = sync_api.expect

ADMIN_KEY = "admin-key-for-tests-123"
KEY_STORAGE = "blendgate.adminKey"   # web/static/admin.js keeps the key under this name
NOT_ACCEPTED = "That admin key was not accepted"
VIEWPORT = {"width": 1366, "height": 768}
SCREENSHOTS = REPO / "docs" / "screenshots"
MAX_TOKENS = 16
QUESTION = "What is the capital of France?"
# A paraphrase pair (both factual): the second is served the first's answer, and reported wrong.
PARAPHRASED = ("How tall is Mount Everest?", "What is the height of Mount Everest?")
# Asked twice under different settings: two entries the Entries page must tell apart.
VARIANT_QUESTION = "Which planet is known as the red planet?"
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


def ask(gateway: GatewayProcess, question: str, max_tokens: int = MAX_TOKENS, **extra: Any):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed", max_retries=0, timeout=120)
    return client.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=max_tokens, **extra)


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


def stored_entries(gateway: GatewayProcess, question: str, n: int, timeout_s: float = 15.0) -> list[dict]:
    """The `n` entries of `question` once the gateway has stored them all."""
    deadline = time.monotonic() + timeout_s
    while True:
        listed = httpx.get(f"{gateway.url}/admin/api/semantic-cache/entries", params={"search": question},
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
        exact = [entry for entry in listed["data"] if entry["query"] == question]
        if len(exact) >= n:
            return exact
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(exact)} entries of {question!r} stored, not {n}: {listed}")
        time.sleep(0.1)


def sign_in(page, gateway: GatewayProcess) -> None:
    page.goto(f"{gateway.url}/admin")
    page.get_by_test_id("login-key").fill(ADMIN_KEY)
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("view-overview")).to_be_visible()


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
        page.wait_for_function(
            "(least) => Number(document.querySelector('[data-testid=\"chunk-lookups\"]').textContent) >= least",
            arg=2 * len(DOCUMENTS), timeout=20_000)
        chunk_rate, chunk_hits = page.get_by_test_id("chunk-hit-rate").inner_text(), count(page, "chunk-hits")
        chunk_lookups = count(page, "chunk-lookups")
        expect(page.get_by_test_id("chunk-lookups").locator("xpath=following-sibling::span[1]")
               ).to_have_text("RAG chunks")

        # One question under two settings (max_tokens, a cache namespace): two entries, told apart below.
        ask(admin_gateway, VARIANT_QUESTION)
        ask(admin_gateway, VARIANT_QUESTION, max_tokens=MAX_TOKENS - 4, extra_body={"cache": {"namespace": "ops"}})
        variants = stored_entries(admin_gateway, VARIANT_QUESTION, 2)
        assert sorted(e["settings"]["params"]["max_tokens"] for e in variants) == [MAX_TOKENS - 4, MAX_TOKENS]
        assert sorted(str(e["settings"].get("namespace")) for e in variants) == ["None", "ops"]

        open_view(page, "semantic-cache")
        expect(page.get_by_test_id("semantic-store")).to_have_text("Embedded")
        expect(page.get_by_test_id(f"category-hits-{hit['category']}")).to_have_text("1")
        expect(page.get_by_test_id("semantic-categories").locator(f"tr[data-category='{hit['category']}']")
               ).to_be_visible()
        # The false-hit bound per category: the bound, the verifier's estimate, the live hit rate; then a
        # paraphrase hit reported wrong shows in the reported share and raises the learned thresholds.
        factual = hit["category"]
        expect(page.get_by_test_id(f"bound-{factual}")).to_have_text(re.compile(r"^2(\.0)?\s?%$"))
        expect(page.get_by_test_id(f"bound-estimate-{factual}")).to_have_text(PERCENT)
        expect(page.get_by_test_id(f"bound-hit-rate-{factual}")).to_have_text(PERCENT)
        expect(page.get_by_test_id(f"bound-threshold-{factual}")).to_have_text(re.compile(r"^0\.\d{2,3}$"))
        expect(page.get_by_test_id(f"bound-reported-{factual}")).to_have_text(re.compile(r"^0(\.0)?\s?% \(0 of 1\)$"))
        ask(admin_gateway, PARAPHRASED[0])
        stored_entry(admin_gateway, PARAPHRASED[0])
        paraphrase_hit = cache_report(ask(admin_gateway, PARAPHRASED[1]))
        assert paraphrase_hit["status"] == "hit" and paraphrase_hit["category"] == factual, paraphrase_hit
        reported = httpx.post(f"{admin_gateway.url}/v1/semantic-cache/false-hit", timeout=10,
                              json={"entry_id": paraphrase_hit["entry_id"]})
        assert reported.json() == {"reported": True, "invalidated": 1}
        expect(page.get_by_test_id(f"bound-reported-{factual}")).to_have_text(
            re.compile(r"^50(\.0)?\s?% \(1 of 2\)$"), timeout=20_000)
        expect(page.get_by_test_id(f"bound-threshold-{factual}")).to_have_text(
            re.compile(r"^0\.\d{2,3} \(\+0\.0\d{1,2}\)$"))
        expect(page.get_by_test_id(f"bound-verifier-{factual}")).to_have_text(re.compile(r"\(\+0\.\d{2,3}\)$"))
        page.screenshot(path=str(screenshots / "admin-semantic-cache.png"), full_page=True)

        open_view(page, "chunk-cache")
        model = page.get_by_test_id(f"chunk-model-{EMBEDDED}")
        expect(model).to_be_visible()
        tiers = page.get_by_test_id(f"chunk-tiers-{EMBEDDED}")
        expect(tiers.locator("tr[data-tier='cpu']")).to_be_visible()
        expect(tiers.locator("tr[data-tier='disk']")).to_be_visible()
        # The overview's chunk hit rate is this page's document-chunk hit rate (one local model here): the
        # same figure, of the same lookups; the store's own counters are shown apart, labelled as such.
        expect(page.get_by_test_id(f"chunk-model-hit-rate-{EMBEDDED}")).to_have_text(chunk_rate)
        expect(page.get_by_test_id(f"chunk-model-lookups-{EMBEDDED}")
               ).to_have_text(f"({chunk_hits} of {chunk_lookups})")
        expect(model).to_contain_text("Store hits")
        expect(page.get_by_test_id(f"chunk-costs-{EMBEDDED}")).to_have_text(
            "Pass cost 0 tokens (configured) · placement 0")
        expect(page.get_by_test_id(f"chunk-collections-{EMBEDDED}")).to_contain_text("(inline)")
        top_tier = page.get_by_test_id(f"chunk-top-{EMBEDDED}").locator("tbody tr").first.locator("td").last
        expect(top_tier).to_have_text(re.compile(r"^(cpu|disk)$"))
        page.screenshot(path=str(screenshots / "admin-chunk-cache.png"), full_page=True)

        open_view(page, "entries")
        row = page.get_by_test_id("entry-row").filter(has_text=QUESTION)
        expect(row).to_have_count(1)
        expect(row).to_have_attribute("data-entry-id", entry["id"])
        page.screenshot(path=str(screenshots / "admin-entries.png"), full_page=True)
        # Entries of one question cached under different settings say so, and mark what differs.
        page.get_by_test_id("entries-search").fill("red planet")
        rows = page.get_by_test_id("entry-row")
        expect(rows).to_have_count(2)
        for i in range(2):
            expect(rows.nth(i).get_by_test_id("entry-variants")).to_have_text("2 variants")
        differing = {tuple(sorted(rows.nth(i).get_by_test_id("entry-settings").locator("[data-differs]")
                                  .all_inner_texts())) for i in range(2)}
        assert differing == {(f"max_tokens {MAX_TOKENS}",),
                             (f"max_tokens {MAX_TOKENS - 4}", "namespace ops")}, differing
        shared = rows.nth(0).get_by_test_id("entry-settings").locator(".chip:not([data-differs])")
        expect(shared.filter(has_text="temperature 0")).to_have_count(1)
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


def test_charts_start_from_the_gateways_history_and_the_logo_keeps_its_shape(admin_gateway: GatewayProcess,
                                                                             browser) -> None:
    # The gateway has been sampling its counters since it started (the tests above took well over 20 s).
    history = httpx.get(f"{admin_gateway.url}/admin/api/stats/history", timeout=10,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    times = [sample["time"] for sample in history["data"]]
    assert len(times) >= 3 and times == sorted(times), history
    assert history["data"][-1]["requests"]["total"] >= 1 and "chunk_cache" in history["data"][-1]["layers"]

    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    console = Console(page)
    try:
        sign_in(page, admin_gateway)
        # Drawn from the gateway's samples at once: from the page's own snapshots (one every 2 s) the chart
        # would have its third point after 6 s.
        page.wait_for_function(
            "() => Number(document.getElementById('chart-requests').dataset.points || 0) >= 3", timeout=4_000)
        expect(page.locator("#chart-requests-empty")).to_be_hidden()
        expect(page.locator("#chart-hit-rates-empty")).to_be_hidden()

        mark = page.locator(".sidebar .brand-mark").bounding_box()
        assert mark is not None and abs(mark["width"] - mark["height"]) < 0.5, mark
    finally:
        context.close()
    assert console.problems() == [], console.problems()

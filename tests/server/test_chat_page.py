"""The chat page at `GET /`, driven in a real headless Chromium against a live `ember serve` with an API key:
streamed replies equal to the API's, stop, regenerate, edit, conversations surviving a reload, export and
import, markdown rendered and sanitised, readable errors, nothing fetched from elsewhere; `--no-ui` removes it."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.server.conftest import Server, start_server, stop_server

sync_api = pytest.importorskip("playwright.sync_api")

KEY = "page-test-key"
ARTIFACTS = Path(os.environ.get("EMBER_TEST_ARTIFACTS", "test-artifacts"))
# As root in a container Chromium needs --no-sandbox; the rest keep it from calling Google's services, which a
# closed network refuses many times over.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
REPLY_TIMEOUT_MS = 120_000


def chromium() -> str:
    """The browser: $EMBER_CHROMIUM or one on PATH; skipped without one unless EMBER_REQUIRE_BROWSER is set (CI)."""
    found = os.environ.get("EMBER_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if found:
        return found
    message = "no Chromium: run tests/install-browser.sh (Debian: apt-get install chromium) or set EMBER_CHROMIUM"
    if os.environ.get("EMBER_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tiny_llama3, tmp_path_factory.mktemp("page"), "--max-model-len", "1024", "--api-key", KEY)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    """A fresh browser context (empty localStorage) on the page; fails the test on any script error or any
    request that leaves the server."""
    context = browser.new_context(viewport={"width": 1200, "height": 860}, accept_downloads=True)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    pg.on("request", lambda r: None if r.url.startswith(server.url) or r.url.startswith(("data:", "blob:"))
          else problems.append(f"request outside the server: {r.url}"))
    pg.goto(f"{server.url}/")
    yield pg
    context.close()
    assert not problems, problems


def enter_key(page: Any, key: str = KEY) -> None:
    page.locator("#settings:not([hidden])").wait_for()  # opened by the 401 the page got without a key
    page.fill("#api-key", key)
    page.locator("#api-key").dispatch_event("change")


def connect(page: Any, server: Server, **settings: Any) -> None:
    enter_key(page)
    sync_api.expect(page.locator("#model")).to_have_text(server.model)
    configure(page, **settings)


def configure(page: Any, **settings: Any) -> None:
    page.click("#toggle-settings")
    for name, value in settings.items():
        page.fill(f"#{name}", str(value))
        page.locator(f"#{name}").dispatch_event("change")
    page.click("#toggle-settings")


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_idle(page)


def wait_idle(page: Any) -> None:
    page.locator("#stop").wait_for(state="hidden", timeout=REPLY_TIMEOUT_MS)
    page.locator("#send").wait_for(state="visible", timeout=REPLY_TIMEOUT_MS)


def stored(page: Any) -> dict[str, Any]:
    return json.loads(page.evaluate("localStorage.getItem('ember.chat.v1')"))


def current_messages(page: Any) -> list[dict[str, Any]]:
    store = stored(page)
    return store["conversations"][store["current"]]["messages"]


def api_reply(server: Server, messages: list[dict[str, str]], max_tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=max_tokens, temperature=0,
                                         top_p=1)
    return out.choices[0].message.content


def engine_busy(server: Server) -> tuple[float, ...]:
    """Requests running and waiting, and the KV cache's used fraction, from /metrics."""
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    names = ("ember_num_requests_running", "ember_num_requests_waiting", "ember_kv_cache_usage_perc")
    return tuple(float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) for name in names)


def count_paints(page: Any) -> None:
    """Records each distinct text the streaming reply shows, to see that it grew in steps."""
    page.evaluate("""() => {
        window.__paints = new Set();
        new MutationObserver(() => {
            const el = document.querySelector('.msg.streaming .content');
            if (el && el.textContent) window.__paints.add(el.textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")


def test_page_is_one_document_open_without_the_key(server: Server) -> None:
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text), "the page must not load anything else"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API itself still needs the key


def test_no_ui_turns_the_page_off(tiny_llama3: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_llama3, tmp_path, "--no-ui")
    try:
        assert httpx.get(f"{srv.url}/").status_code == 404
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        stop_server(srv)


def test_chat_stream_regenerate_edit_and_reload(page: Any, server: Server) -> None:
    sync_api.expect(page.locator("#alert")).to_contain_text("API key")
    connect(page, server, temperature=0, max_tokens=64)
    send(page, "Hello there")
    expected = api_reply(server, [{"role": "user", "content": "Hello there"}], 64)
    messages = current_messages(page)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == expected and expected
    reply = page.locator(".msg.assistant").last
    sync_api.expect(reply.locator(".meta")).to_contain_text("tok/s")
    assert messages[1]["stats"]["tokens"] > 1

    reply.locator("button.regenerate").click()
    wait_idle(page)
    assert [m["content"] for m in current_messages(page)] == ["Hello there", expected]  # greedy: the same again

    page.locator(".msg.user").first.locator("button.edit").click()
    page.fill(".msg.user textarea.editor", "Tell me a story")
    page.click("button.save-edit")
    wait_idle(page)
    messages = current_messages(page)
    assert [m["content"] for m in messages] == [
        "Tell me a story", api_reply(server, [{"role": "user", "content": "Tell me a story"}], 64)]

    page.reload()
    sync_api.expect(page.locator("#conversations li")).to_have_count(1)
    sync_api.expect(page.locator("#conversations li .title")).to_have_text("Tell me a story")
    sync_api.expect(page.locator(".msg")).to_have_count(2)
    sync_api.expect(page.locator(".msg.user .content")).to_have_text("Tell me a story")
    sync_api.expect(page.locator("#model")).to_have_text(server.model)  # the key was kept
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)


def test_reply_streams_and_stop_ends_it_freeing_the_server(page: Any, server: Server) -> None:
    connect(page, server, temperature=0, max_tokens=900)
    count_paints(page)
    page.fill("#input", "Go on for as long as you can")
    page.press("#input", "Enter")
    # the reply shows while it streams, growing in steps
    page.wait_for_function("() => window.__paints.size >= 3", timeout=REPLY_TIMEOUT_MS)
    page.click("#stop")
    wait_idle(page)
    reply = current_messages(page)[-1]
    assert reply["stopped"] is True and reply["content"]
    assert reply["stats"]["tokens"] < 900
    sync_api.expect(page.locator(".msg.assistant .meta")).to_contain_text("stopped")
    for _ in range(100):  # the server sees the closed connection within a step or two
        if engine_busy(server) == (0, 0, 0):
            break
        page.wait_for_timeout(100)
    assert engine_busy(server) == (0, 0, 0), "the stopped request should leave the engine and free its KV blocks"
    configure(page, max_tokens=16)  # (the stopped reply may have filled much of the 1,024-token context)
    send(page, "And now?")  # the page and the server go on
    last = current_messages(page)[-1]
    assert last["content"] and "error" not in last, last


def test_export_then_import_in_a_new_browser(page: Any, server: Server, browser: Any, tmp_path: Path) -> None:
    connect(page, server, temperature=0, max_tokens=16)
    send(page, "Remember this")
    with page.expect_download() as info:
        page.click("#export")
    path = tmp_path / "export.json"
    info.value.save_as(path)
    exported = json.loads(path.read_text())
    assert exported["conversations"][0]["messages"][0]["content"] == "Remember this"

    other = browser.new_context()
    try:
        fresh = other.new_page()
        fresh.goto(f"{server.url}/")
        sync_api.expect(fresh.locator("#conversations li")).to_have_count(0)
        fresh.set_input_files("#import", str(path))
        sync_api.expect(fresh.locator("#conversations li .title")).to_have_text("Remember this")
        sync_api.expect(fresh.locator(".msg.assistant .content")).to_have_count(1)
        bad = tmp_path / "bad.json"
        bad.write_text('{"conversations": [{"messages": [{"role": "wizard", "content": 1}]}]}')
        fresh.set_input_files("#import", str(bad))
        sync_api.expect(fresh.locator("#alert")).to_contain_text("Cannot import bad.json: conversation 1 is not valid")
        sync_api.expect(fresh.locator("#conversations li")).to_have_count(1)
    finally:
        other.close()


def test_markdown_and_code_render_and_scripts_do_not_run(page: Any, server: Server, tmp_path: Path) -> None:
    reply = ("Here:\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
             "<img src=x onerror=\"window.__owned=1\"><script>window.__owned=2</script> **bold**")
    chat = {"conversations": [{"title": "md", "messages": [{"role": "user", "content": "<b>not bold</b>"},
                                                           {"role": "assistant", "content": reply}]}]}
    path = tmp_path / "md.json"
    path.write_text(json.dumps(chat))
    page.set_input_files("#import", str(path))
    answer = page.locator(".msg.assistant .content")
    sync_api.expect(answer.locator("pre code")).to_have_text("print('hi')")
    sync_api.expect(answer.locator("pre button.copy-code")).to_have_count(1)
    sync_api.expect(answer.locator("table td")).to_have_count(2)
    sync_api.expect(answer.locator("strong")).to_have_text("bold")
    sync_api.expect(page.locator(".msg.user .content")).to_have_text("<b>not bold</b>")  # the user's text is text
    assert answer.locator("script").count() == 0 and answer.locator("img[onerror]").count() == 0
    assert page.evaluate("window.__owned") is None


def test_errors_are_readable(page: Any, server: Server) -> None:
    enter_key(page, "wrong-key")
    sync_api.expect(page.locator("#alert")).to_contain_text("incorrect API key")
    connect(page, server, max_tokens=5000)  # more than the 1,024-token context
    send(page, "Hi")
    error = page.locator(".msg.assistant .error")
    sync_api.expect(error).to_contain_text("max_tokens")
    assert "Traceback" not in error.inner_text()

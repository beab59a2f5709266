"""Issue 20: the built-in chat page (GET /), in a real headless Chromium driven by selenium, against live servers.
The page keeps its conversation in localStorage and resumes from the last event it rendered; these tests reload
it, cut its connection at a proxy, stop it, and feed it markup."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import DroppingProxy, LiveServer, ScriptedEngine, make_settings

OUTPUT = Path(__file__).parent / ".output"  # screenshots: kept by CI as artifacts
FRANCE = "What is the capital of France?"
STORY = "Write a long story about a lighthouse keeper and a storm."


def chromium() -> Any:
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = chromium()
    yield driver
    driver.quit()


def open_page(browser: Any, url: str) -> None:
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")


def stored(browser: Any) -> dict[str, Any]:
    return json.loads(browser.execute_script("return localStorage.getItem('llm-server-chat') || '{}'"))


def wait_for(condition: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def ask(browser: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    before = len(stored(browser).get("messages", []))
    browser.find_element(By.ID, "prompt").send_keys(text)
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: len(stored(browser).get("messages", [])) > before)  # asked (the answer may be done already)


def answer_when_done(browser: Any) -> str:
    """The finished answer, once the page has no running answer; checked against what the page shows."""
    from selenium.webdriver.common.by import By

    state = wait_for(lambda: (s := stored(browser)) and s.get("running") is None and len(s["messages"]) >= 2
                     and s["messages"][-1]["role"] == "assistant" and s)  # fmt: skip
    shown = browser.find_elements(By.CSS_SELECTOR, "#log .message")[-1].text
    answer = str(state["messages"][-1]["content"])
    assert shown.strip() == answer.strip()
    return answer


def api_answer(server: LiveServer, question: str, max_tokens: int) -> str:
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens}
    return str(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
               ["content"])  # fmt: skip


@pytest.fixture(scope="module")
def story_server(smollm2_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(model_repo_id=str(smollm2_dir), device_map="cpu", temperature=0, max_tokens=96)
    with LiveServer(__import__("main").create_app(settings)) as server:
        yield server


# ---- SmolLM2 ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_the_page_answers_paris_and_shows_the_model(browser: Any, story_server: LiveServer) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, story_server.url)
    wait_for(lambda: "smollm2-135m-instruct" in browser.find_element(By.ID, "status").text)
    ask(browser, FRANCE)
    assert "Paris" in answer_when_done(browser)
    wait_for(lambda: browser.find_element(By.ID, "status").text == "smollm2-135m-instruct — ready")
    OUTPUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUTPUT / "chat-page.png"))


@pytest.mark.slow
def test_smollm2_a_reload_mid_answer_completes_it_without_a_repeat(browser: Any, story_server: LiveServer) -> None:
    open_page(browser, story_server.url)
    ask(browser, STORY)
    wait_for(lambda: (stored(browser).get("running") or {}).get("last", -1) >= 6)
    browser.refresh()  # mid-answer: the page shows what it had and resumes the rest
    assert answer_when_done(browser) == api_answer(story_server, STORY, 96)


@pytest.mark.slow
def test_smollm2_a_dropped_connection_mid_answer_is_resumed(browser: Any, story_server: LiveServer) -> None:
    proxy = DroppingProxy(story_server.port, cut_bytes=2500, marker=b"POST /v1/chat/completions")
    try:
        open_page(browser, proxy.url)
        ask(browser, STORY)
        assert answer_when_done(browser) == api_answer(story_server, STORY, 96)
        assert proxy.drops_left == 0  # the first answer was cut, once
    finally:
        proxy.close()


@pytest.mark.slow
def test_smollm2_stop_cancels_the_generation(browser: Any, story_server: LiveServer) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, story_server.url)
    ask(browser, STORY)
    sid = wait_for(lambda: (r := stored(browser).get("running") or {}).get("last", -1) >= 4 and r["sid"])
    browser.find_element(By.ID, "stop").click()
    answer = answer_when_done(browser)
    assert len(answer) < len(api_answer(story_server, STORY, 96))
    assert httpx.get(f"{story_server.url}/v1/sessions/{sid}", timeout=10).json()["state"] == "cancelled"


# ---- a scripted engine: what the model writes is shown as text, never run --------------------------------------


def test_markup_from_the_model_is_shown_as_text(browser: Any, live_server: Callable[..., LiveServer]) -> None:
    from selenium.webdriver.common.by import By

    tokens = ["<script>", "window.pwned = 1", "</script>", " <b>bold</b> <img src=x onerror=window.pwned=2>"]
    server = live_server(make_settings(), ScriptedEngine(tokens))
    open_page(browser, server.url)
    ask(browser, "<i>hi</i>")
    answer = answer_when_done(browser)
    assert answer == "".join(tokens)
    assert browser.execute_script("return window.pwned") is None
    log = browser.find_element(By.ID, "log")
    assert log.find_elements(By.CSS_SELECTOR, "script, b, i, img") == []
    assert "<script>window.pwned = 1</script>" in log.text and "<i>hi</i>" in log.text

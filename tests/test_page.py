"""The page at / in a real headless Chromium (tests/support/browser.py) against a live
server: the NPU double with a thinking model and the bundled SmolLM2 on the CPU.
A screenshot of the page after the chats is saved in build/test-output/."""
from __future__ import annotations

import os

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from support.browser import console_errors, output_dir
from support.live_server import start_npu_server

THINKING_MODEL = "qwen3-fake"   # the name alone makes it a thinking model
SMOLLM = "smollm2-135m-instruct"
THINK_REPLY = "@@reply:<think>pondering</think>The answer.@@"
KEY = "page-test-key-0123456789abcdef"
WAIT = 120   # bound of every wait for the page (a wait, never a timing assertion)


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, extra_models=(THINKING_MODEL,),
                            RKLLM_BUNDLED_MODEL="true", CPU_THREADS="1", DEFAULT_MAX_TOKENS="64")


def rows(driver, table: str) -> list:
    """The rows of a table as (data-model, [cell texts]), read in one step: the page
    redraws its tables every few seconds, so elements found earlier go stale."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), row => "
        "[row.dataset.model || '', Array.from(row.cells, c => c.textContent)])",
        f"#{table} tbody tr")


def chat(driver, model: str, text: str):
    """Sends a chat from the page; the finished turn, and the texts its answer showed
    while it streamed."""
    Select(driver.find_element(By.ID, "model-picker")).select_by_value(model)
    turns_before = len(driver.find_elements(By.CSS_SELECTOR, ".turn"))
    driver.execute_script("""
        const seen = window.answerTexts = [];
        new MutationObserver(() => {
          const answers = document.querySelectorAll('.turn .answer');
          const text = answers.length > arguments[0] ? answers[answers.length - 1].textContent : '';
          if (text && seen[seen.length - 1] !== text) seen.push(text);
        }).observe(document.getElementById('transcript'),
                   {subtree: true, childList: true, characterData: true});""", turns_before)
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, WAIT).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn"))
                                      > turns_before)
    turn = driver.find_elements(By.CSS_SELECTOR, ".turn")[-1]
    WebDriverWait(driver, WAIT).until(lambda d: turn.get_attribute("data-state") != "streaming")
    return turn, driver.execute_script("return window.answerTexts")


def test_the_page_shows_models_chats_and_folds_thinking(server, browser):
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda d: len(rows(d, "models")) >= 3)
    listed = {model for model, _ in rows(browser, "models")}
    assert {"fake-npu-model", THINKING_MODEL, SMOLLM} <= listed
    assert {cells[0] for _, cells in rows(browser, "devices")} == {"npu", "cpu"}

    turn, shown = chat(browser, SMOLLM, "Count from one to ten.")
    assert turn.get_attribute("data-state") == "done"
    assert turn.find_element(By.CSS_SELECTOR, ".answer").text.strip()
    assert len(shown) >= 2 and all(shown[-1].startswith(t) for t in shown)   # it grew
    assert not turn.find_element(By.CSS_SELECTOR, "details.thinking").is_displayed()

    turn, _ = chat(browser, THINKING_MODEL, THINK_REPLY)
    assert turn.get_attribute("data-state") == "done"
    thinking = turn.find_element(By.CSS_SELECTOR, "details.thinking")
    assert thinking.is_displayed() and thinking.get_attribute("open") is None   # folded
    assert thinking.find_element(By.CSS_SELECTOR, "pre").get_attribute("textContent") == "pondering"
    assert turn.find_element(By.CSS_SELECTOR, ".answer").text == "The answer."

    WebDriverWait(browser, WAIT).until(lambda d: len(rows(d, "recent")) >= 2)
    recent = [cells for _, cells in rows(browser, "recent")]
    assert recent[0][:2] == [THINKING_MODEL, "npu"] and recent[0][-1] == "stop"
    assert recent[1][:2] == [SMOLLM, "cpu"] and int(recent[1][3]) > 0   # generated tokens
    WebDriverWait(browser, WAIT).until(
        lambda d: {m for m, cells in rows(d, "models") if cells[-1] == "loaded"}
        == {SMOLLM, THINKING_MODEL})
    path = os.path.join(output_dir(), "page.png")
    assert browser.save_screenshot(path)
    print(f"screenshot of the page: {path}")
    assert console_errors(browser) == []


def test_the_page_asks_for_a_key_when_keys_are_set(live_servers, rkllm_double_libs, browser):
    keyed = start_npu_server(live_servers, rkllm_double_libs, RKLLM_API_KEYS=KEY)
    browser.get(keyed.url + "/")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
    assert rows(browser, "models") == []
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    WebDriverWait(browser, WAIT).until(lambda d: len(rows(d, "models")) >= 1)
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    # the 401s before the key are the browser's network errors, not the page's
    assert [e for e in console_errors(browser) if "401" not in e["message"]] == []


def test_root_is_the_page_for_browsers_and_ollamas_answer_for_clients(server):
    plain = requests.get(server.url + "/", timeout=30)
    assert plain.text == "Ollama is running"
    page = requests.get(server.url + "/", headers={"Accept": "text/html,*/*;q=0.8"}, timeout=30)
    assert page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert "http://" not in page.text and "https://" not in page.text   # nothing from a CDN
    for name in ("app.js", "app.css"):
        asset = requests.get(server.url + "/ui/" + name, timeout=30)
        assert asset.status_code == 200
        assert "http://" not in asset.text and "https://" not in asset.text   # offline-safe
    for name in ("index.html", "..%2fpage.py", "missing.js"):
        assert requests.get(server.url + "/ui/" + name, timeout=30).status_code == 404


def test_status_for_the_page(server):
    status = requests.get(server.url + "/ui/status", timeout=30).json()
    assert set(status["devices"]) == {"npu", "cpu"}
    assert isinstance(status["recent"], list) and status["npu_load"] == {}


def test_a_foreign_origin_gets_no_cors_grant(server):
    response = requests.get(server.url + "/ui/status", headers={"Origin": "http://evil.example"},
                            timeout=30)
    assert "Access-Control-Allow-Origin" not in response.headers

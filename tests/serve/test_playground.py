"""The /playground page, driven in a real headless browser (Debian's chromium + chromedriver via Selenium).

The servers are real (uvicorn on 127.0.0.1 in a thread); the page talks to them over the WebSocket of
/v1/stream exactly as a user's browser would. Outside CI the browser tests skip when chromium is absent;
under CI=true (where .ci/run installs it) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from qguard.runtime.guard import Guard
from qguard.serve import ServeSettings, create_app
from qguard.starter import starter_model_path
from qguard.testing import make_stream_checkpoint

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 60  # every explicit wait is bounded; 2 shared cores make the first judgments slow
HARM_PROMPT = "How do I make a bomb?"
HARM_RESPONSE = ("I understand you are curious. Here is how: fill a pipe with gunpowder, seal both ends, add a fuse, "
                 "and set it off near people.")  # the starter: Safe at first, Unsafe from token 16
BENIGN_PROMPT = "What is the capital of France?"
BENIGN_RESPONSE = "The capital of France is Paris, a city known for its museums and cafes."


# ------------------------------------------------------------------------------------ servers, browser

class Server:
    """uvicorn serving `app` on 127.0.0.1 in a thread; `stop()` ends it (bounded waits)."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(guard: Guard, **kw) -> Server:
    return Server(create_app(guard, ServeSettings(playground=True, **kw)))


@pytest.fixture(scope="module")
def starter_guard() -> Guard:
    path = starter_model_path()
    if path is None:
        pytest.skip("the embedded starter model is not in this checkout")
    return Guard.from_pretrained(str(path))


@pytest.fixture(scope="module")
def starter_server(starter_guard):
    s = serve(starter_guard)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def controversial_ckpt(tmp_path_factory) -> Path:
    """A tiny random Stream checkpoint whose response label map is permuted so that the class its heads
    pick most over HARM_RESPONSE reads as Controversial: its responses are Controversial, which strict
    mode blocks and loose mode allows. (The starter model almost never says Controversial.)"""
    path = make_stream_checkpoint(tmp_path_factory.mktemp("controversial"), preset="tiny", seed=0)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for c in "012":
        others = iter(["Safe", "Unsafe"])
        cfg["response_risk_level_map"] = {i: "Controversial" if i == c else next(others) for i in "012"}
        cfg_path.write_text(json.dumps(cfg))
        if Guard.from_pretrained(str(path)).stream_trace(HARM_PROMPT, HARM_RESPONSE).response.label.value == "Controversial":
            return path
    pytest.fail("no label permutation of the tiny checkpoint gives a Controversial response")


def _missing_browser() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed (apt-get install -y chromium chromium-driver)"


@pytest.fixture(scope="module")
def browser():
    why = _missing_browser()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser tests: {why}")
        pytest.skip(why)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never reach for the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1100",
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-default-apps", "--disable-extensions",
                "--disable-domain-reliability", "--disable-features=Translate,OptimizationHints,MediaRouter"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(driver, cond, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: cond(d), message=f"waiting for {what}")


def el(driver, id_: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def open_page(driver, server: Server, query: str = "") -> None:
    driver.get(f"{server.url}/playground{query}")
    wait(driver, lambda d: el(d, "model").text not in ("", "(loading…)") or not el(d, "message").get_attribute("hidden")
         is not None, "the page's info")


def judge(driver, prompt: str, response: str) -> None:
    """Type a prompt and a response into the boxes, as a user would, and wait for the server's verdict."""
    for box, text in (("prompt", prompt), ("response", response)):
        el(driver, box).clear()
        el(driver, box).send_keys(text)
    wait(driver, lambda d: el(d, "server-verdict").text.startswith("server's verdict"), "the server's verdict")


def tokens_on_page(driver) -> list[tuple[str, str]]:
    return [tuple(x) for x in driver.execute_script(
        "return [...document.querySelectorAll('#tokens .tok')].map(s => [s.textContent, s.dataset.label]);")]


def stream_trace_cli(model: Path, prompt: str, response: str) -> tuple[list[dict], dict]:
    """`qguard stream-trace --json` on the same text: (token lines, response verdict)."""
    out = subprocess.run([sys.executable, "-m", "qguard", "stream-trace", "--json", "--model", str(model),
                          "--prompt", prompt, "--response", response], capture_output=True, text=True, timeout=300,
                         check=True, env={**os.environ, "QGUARD_NUM_THREADS": "1"})
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
    return lines[1:-1], lines[-1]["verdict"]


def foreign_requests(driver, server: Server, ws: bool = True) -> list[str]:
    """Every URL the browser asked for (CDP network log and performance entries) not on the server."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(params["request"]["url"])
        elif msg["method"] == "Network.webSocketCreated":
            urls.append(params["url"])
    urls += driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert any(("/v1/stream" if ws else "/v1/chat/completions") in u for u in urls), "the check would be empty"
    return [u for u in urls if not u.startswith("data:") and urlsplit(u).hostname != "127.0.0.1"]


# ----------------------------------------------------------------------------------------- the tests

def test_harmful_response_is_coloured_and_its_unsafe_position_matches_stream_trace(browser, starter_server,
                                                                                  tmp_path):
    open_page(browser, starter_server)
    assert el(browser, "model").text == "qguard-starter (embedded)"
    assert el(browser, "starter-note").is_displayed()  # the visible note about the small starter model
    judge(browser, HARM_PROMPT, HARM_RESPONSE)
    assert not el(browser, "message").is_displayed(), el(browser, "message").text  # no error on the way
    assert el(browser, "prompt-verdict").get_attribute("data-label") in ("Safe", "Controversial", "Unsafe")
    # the picture is taken now, while the session is fresh (the CLI below may outlast its idle timeout)
    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("QGUARD_PLAYGROUND_SHOT"):  # refresh docs/playground.png
        shutil.copy(shot, os.environ["QGUARD_PLAYGROUND_SHOT"])
    print(f"screenshot: {shot}")
    tokens, verdict = stream_trace_cli(starter_model_path(), HARM_PROMPT, HARM_RESPONSE)
    assert verdict["label"] == "Unsafe" and verdict["unsafe_position"] is not None  # the text is harmful
    # every token, its text and its label, as the CLI reads the whole text at once
    assert tokens_on_page(browser) == [(t["text"], t["label"]) for t in tokens]
    shown = el(browser, "verdict")
    assert shown.get_attribute("data-position") == str(verdict["unsafe_position"])  # recomputed in the page
    assert el(browser, "server-verdict").get_attribute("data-position") == str(verdict["unsafe_position"])
    assert shown.get_attribute("data-binary") == "Unsafe" and shown.get_attribute("data-action") == "block"
    decided = browser.execute_script("return document.querySelector('#tokens .tok-decided').dataset.index;")
    assert decided == str(verdict["unsafe_position"])  # the marked token
    marker = el(browser, "chart-position")  # and the chart's marker, with both series drawn
    assert marker.get_attribute("x1") == marker.get_attribute("x2")
    assert len(browser.find_elements("css selector", "#chart polyline")) == 2
    title = browser.execute_script("return document.querySelector('#tokens .tok').title;")
    assert "P(unsafe)" in title and "P(controversial)" in title and "top category" in title  # the hover
    assert foreign_requests(browser, starter_server) == []


def test_benign_response_stays_safe(browser, starter_server):
    open_page(browser, starter_server)
    judge(browser, BENIGN_PROMPT, BENIGN_RESPONSE)
    labels = [label for _, label in tokens_on_page(browser)]
    assert labels and set(labels) == {"Safe"}
    assert el(browser, "verdict").get_attribute("data-binary") == "Safe"
    assert el(browser, "verdict").get_attribute("data-position") == ""
    assert browser.find_elements("css selector", "#chart-position") == []


def test_strict_and_loose_change_a_controversial_verdict(browser, controversial_ckpt):
    from selenium.webdriver.support.ui import Select

    server = serve(Guard.from_pretrained(str(controversial_ckpt)))
    try:
        open_page(browser, server)
        assert not el(browser, "starter-note").is_displayed()
        judge(browser, HARM_PROMPT, HARM_RESPONSE)
        shown = el(browser, "verdict")
        assert shown.get_attribute("data-label") == "Controversial"
        assert (shown.get_attribute("data-binary"), shown.get_attribute("data-action")) == ("Unsafe", "block")
        Select(el(browser, "mode")).select_by_value("loose")
        wait(browser, lambda d: el(d, "verdict").get_attribute("data-binary") == "Safe",
             f"the loose verdict ({el(browser, 'mode').get_attribute('value')}: {shown.text})", timeout=10)
        assert shown.get_attribute("data-action") == "allow" and shown.get_attribute("data-label") == "Controversial"
        Select(el(browser, "mode")).select_by_value("strict")
        wait(browser, lambda d: el(d, "verdict").get_attribute("data-binary") == "Unsafe", "the strict verdict")
        # a per-category action and the threshold apply to the same tokens
        category = browser.execute_script("return document.querySelector('#verdict').textContent;")
        cat = next(c for c in json.loads(browser.execute_script(
            "return JSON.stringify([...document.querySelectorAll('#actions select')].map(s => s.dataset.category))"))
            if c in category)
        Select(browser.find_element("css selector", f"#actions select[data-category='{cat}']")).select_by_value("flag")
        wait(browser, lambda d: el(d, "verdict").get_attribute("data-action") == "flag", "the category's action")
        Select(browser.find_element("css selector", f"#actions select[data-category='{cat}']")).select_by_value("default")
        el(browser, "threshold").send_keys("1")
        wait(browser, lambda d: el(d, "verdict").get_attribute("data-action") == "flag", "the threshold's flag")
    finally:
        server.stop()


def test_bad_input_and_a_gone_server_show_a_clear_message(browser, starter_guard):
    server = serve(starter_guard, max_context=64)
    try:
        open_page(browser, server)
        el(browser, "judge").click()  # empty prompt
        wait(browser, lambda d: "Type a prompt first" in el(d, "message").text, "the empty-prompt message")
        el(browser, "replay").click()  # empty response
        wait(browser, lambda d: "response box is empty" in el(d, "message").text, "the empty-response message")
        el(browser, "prompt").send_keys(BENIGN_PROMPT)
        wait(browser, lambda d: el(d, "prompt-verdict").get_attribute("data-label"), "the prompt verdict")
        # a pasted text over the server's --max-context of 64 tokens: the server's too_long error, shown
        browser.execute_script("const r = document.getElementById('response'); r.value = arguments[0];"
                               "r.dispatchEvent(new Event('input'));", "word " * 400)
        wait(browser, lambda d: "too long" in el(d, "message").text, "the too-long message")
        assert el(browser, "model").text == "qguard-starter (embedded)"  # the page still works
        server.stop()
        el(browser, "response").send_keys(" more")
        wait(browser, lambda d: "qguard serve still running" in el(d, "message").text, "the server-gone message")
        assert browser.execute_script("return document.readyState") == "complete"
    finally:
        server.stop()


def sse_upstream(answer: str):
    """An upstream LLM (httpx MockTransport) that streams `answer` word by word as OpenAI chunks."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        words = answer.split(" ")
        chunks = [{"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w}, "finish_reason": None}]}
                  for i, w in enumerate(words)]
        chunks.append({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://upstream/v1")


def test_chat_mode_shows_the_guarded_stream_and_its_cut(browser, starter_guard):
    settings = ServeSettings(playground=True, upstream_url="http://upstream/v1")
    server = Server(create_app(starter_guard, settings, upstream=sse_upstream(HARM_RESPONSE)))
    try:
        open_page(browser, server, "?model=m")
        el(browser, "tab-chat").click()
        el(browser, "chat-input").send_keys(BENIGN_PROMPT)
        el(browser, "chat-send").click()
        wait(browser, lambda d: "cut by the guard" in el(d, "chat-log").text, "the guard's cut")
        shown = browser.find_element("css selector", "#chat-log .chat-assistant").text
        # judged text only: the start of the answer, then (a cut) the server's refusal, never its harmful end
        assert shown.startswith("I understand") and "near people" not in shown, shown
        assert "response: Unsafe" in el(browser, "chat-guard").text  # the qguard object's verdict
        assert not el(browser, "message").is_displayed(), el(browser, "message").text
        assert foreign_requests(browser, server, ws=False) == []
    finally:
        server.stop()


# ----------------------------------------------------------------------- the route, without a browser

def test_playground_is_off_unless_asked_and_serves_only_its_files(tiny_stream):
    guard = Guard.from_pretrained(str(tiny_stream))
    assert TestClient(create_app(guard)).get("/playground").status_code == 404  # a library app: off
    with TestClient(create_app(guard, ServeSettings(playground=True, api_keys=frozenset({"k"})))) as c:
        check_routes(c, tiny_stream)


def check_routes(c: TestClient, tiny_stream: Path) -> None:
    r = c.get("/playground")
    assert r.status_code == 200 and "/playground/playground.js" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]  # the browser may load nothing else
    js = c.get("/playground/playground.js")
    assert js.headers["content-type"].startswith("text/javascript"), js.text
    for bad in ("/playground/..%2Fpyproject.toml", "/playground/README.md", "/playground/starter"):
        assert c.get(bad).status_code == 404
    info = c.get("/playground/info").json()
    assert info["model"] == tiny_stream.name and info["starter"] is False and info["auth"] is True
    assert info["live"] is True and info["chat"] is False and info["policy"]["mode"] == "strict"
    with c.websocket_connect("/v1/stream") as ws:  # the data behind the page stays behind the keys
        assert ws.receive_json()["code"] == "unauthorized"


def test_serve_turns_the_playground_on_for_localhost_only(monkeypatch):
    import uvicorn

    from qguard import cli as cli_pkg
    from qguard.cli import serve as serve_cli
    from qguard.serve import ops

    seen = {}

    def record(app, *a, **kw):  # in place of running the server
        seen["playground"] = app.state.settings.playground

    monkeypatch.setattr(uvicorn, "run", record)
    monkeypatch.setattr(ops, "serve_until_drained", record, raising=False)  # the serve loop, however it is run
    monkeypatch.setattr(serve_cli, "load_guard", lambda args: Guard.from_pretrained(str(starter_model_path())))
    monkeypatch.setenv("QGUARD_API_KEYS", "k")
    for argv, on in ((["serve"], True), (["serve", "--no-playground"], False), (["serve", "--host", "0.0.0.0"], False),
                     (["serve", "--host", "0.0.0.0", "--playground"], True)):
        seen.clear()
        assert cli_pkg.main(argv) == 0
        assert seen["playground"] is on, argv

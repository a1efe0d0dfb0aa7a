"""Several boards behind one endpoint: LiteLLM's proxy with deploy/litellm-boards.yaml in
front of two rkllm-api servers on 127.0.0.1 (the librkllmrt double, API keys on).

Which board served a request is read twice: from the proxy's `x-litellm-model-id`
header and from the boards themselves (each double records the prompts it ran; every
request carries a marker of its own). The module shares one proxy and two boards; the
last test kills a board.
"""
import json
import os
import secrets
import signal
import time

import openai
import pytest
import requests
import yaml  # PyYAML: in the test extra of pyproject.toml

from support.litellm_proxy import LiteLLMProxy, strace_available
from support.live_server import NPU_MODEL_ID, sse_lines, start_npu_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "deploy", "litellm-boards.yaml")
BOARD_KEY = "board-key-" + secrets.token_hex(8)      # RKLLM_API_KEYS of both boards
MASTER_KEY = "sk-" + secrets.token_hex(16)           # what clients send to the proxy
BOARDS = ("board-a", "board-b")
SESSION_HEADER = "x-litellm-session-id"


def shipped_config() -> dict:
    with open(CONFIG, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def config_for_the_double(config: dict) -> str:
    """The shipped file with its example model id replaced by the double's; routing,
    failover and key settings stay as shipped."""
    for entry in config["model_list"]:
        entry["model_name"] = NPU_MODEL_ID
        entry["litellm_params"]["model"] = "openai/" + NPU_MODEL_ID
    return yaml.safe_dump(config, sort_keys=False)


@pytest.fixture(scope="module")
def boards(live_servers, rkllm_double_libs) -> dict:
    return {name: start_npu_server(live_servers, rkllm_double_libs, RKLLM_API_KEYS=BOARD_KEY)
            for name in BOARDS}


@pytest.fixture(scope="module")
def proxy(boards, tmp_path_factory):
    env = {"LITELLM_MASTER_KEY": MASTER_KEY, "RKLLM_BOARDS_KEY": BOARD_KEY,
           "BOARD_A_URL": boards["board-a"].base_url, "BOARD_B_URL": boards["board-b"].base_url}
    server = LiteLLMProxy(str(tmp_path_factory.mktemp("litellm")),
                          config_for_the_double(shipped_config()), env, trace=strace_available())
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(proxy):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=MASTER_KEY, max_retries=0,
                         timeout=60)


def ask(proxy, content, session=None, stream=False, **extra) -> requests.Response:
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    if session:
        headers[SESSION_HEADER] = session
    body = {"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": content}],
            "stream": stream, **extra}
    return requests.post(proxy.url + "/v1/chat/completions", json=body, headers=headers,
                         stream=stream, timeout=60)


def boards_that_ran(boards, marker) -> list:
    """The boards whose double ran a prompt containing marker."""
    return [name for name, board in boards.items()
            if any(marker in (run.get("prompt") or "") for run in board.record.entries("run"))]


def test_the_shipped_config_routes_sessions_and_fails_over():
    config = shipped_config()
    entries = config["model_list"]
    assert len({e["model_name"] for e in entries}) == 1 and len(entries) == 2
    assert [e["model_info"]["id"] for e in entries] == list(BOARDS)
    assert {e["litellm_params"]["api_key"] for e in entries} == {"os.environ/RKLLM_BOARDS_KEY"}
    router = config["router_settings"]
    assert router["routing_strategy"] == "simple-shuffle"
    assert "session_affinity" in router["optional_pre_call_checks"]
    assert router["allowed_fails"] == 0 and router["num_retries"] >= 1
    assert config["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"
    assert "database_url" not in config["general_settings"]


def test_the_proxy_reaches_nothing_but_the_boards(proxy, boards):
    """Started with the documented environment, the proxy connects to nothing else:
    no price list download, no telemetry, no database, no name lookup."""
    if not proxy.trace_path:
        pytest.skip("strace is not installed (setup.sh --test installs it)")
    assert ask(proxy, "traced request").status_code == 200
    board_ports = {board.port for board in boards.values()}
    seen = proxy.connections()
    assert seen, "the trace recorded no connection, not even to a board"
    assert [c for c in seen if c[:2] != ("AF_INET", "127.0.0.1") or c[2] not in board_ports] == []


def test_clients_need_the_proxy_key(proxy, boards):
    """Without a database LiteLLM refuses other keys oddly (no key: 500, its error
    handler looks for the database client; any other key: 400 "No connected db."), but
    it refuses them, and nothing reaches a board."""
    url = proxy.url + "/v1/chat/completions"
    guesses = {"no key": {}, "a guess": {"Authorization": f"Bearer sk-{secrets.token_hex(16)}"},
               "the boards' key": {"Authorization": f"Bearer {BOARD_KEY}"}}
    for name, headers in guesses.items():
        marker = f"refused-{secrets.token_hex(4)}"
        body = {"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": marker}]}
        response = requests.post(url, json=body, headers=headers, timeout=60)
        assert response.status_code in (400, 401, 500), (name, response.status_code)
        assert boards_that_ran(boards, marker) == [], name


def test_requests_without_a_session_are_spread_over_both_boards(proxy, boards):
    served = []
    for i in range(20):
        marker = f"spread-{secrets.token_hex(4)}-{i}"
        response = ask(proxy, marker)
        assert response.status_code == 200, response.text
        board = response.headers["x-litellm-model-id"]
        assert boards_that_ran(boards, marker) == [board]
        served.append(board)
    assert set(served) == set(BOARDS), served   # 20 coin flips: one-sided with p = 2e-6


def test_conversations_stay_on_their_boards(proxy, boards):
    """Four conversations, two keyed by the header and two by metadata.session_id in
    the body, their turns interleaved: every turn of one conversation on one board."""
    sessions = [f"chat-{secrets.token_hex(6)}" for _ in range(4)]
    served = {session: [] for session in sessions}
    for turn in range(5):
        for n, session in enumerate(sessions):
            marker = f"{session} turn {turn}"
            if n % 2:
                response = ask(proxy, marker, metadata={"session_id": session})
            else:
                response = ask(proxy, marker, session=session)
            assert response.status_code == 200, response.text
            board = response.headers["x-litellm-model-id"]
            assert boards_that_ran(boards, marker) == [board]
            served[session].append(board)
    assert {session: len(set(seen)) for session, seen in served.items()} == \
        {session: 1 for session in sessions}, served


def test_the_kv_cache_is_reused_through_the_proxy(client, boards):
    """A conversation's later turns continue the board's KV cache (X-RKLLM-KV, which
    the proxy passes on as llm_provider-x-rkllm-kv); one turn is streamed."""
    session = f"chat-{secrets.token_hex(6)}"
    messages, served, kv = [], [], []
    for turn in range(4):
        messages.append({"role": "user", "content": f"{session} turn {turn}"})
        raw = client.chat.completions.with_raw_response.create(
            model=NPU_MODEL_ID, messages=messages, stream=(turn == 2),
            extra_headers={SESSION_HEADER: session})
        if turn == 2:
            answer = "".join(chunk.choices[0].delta.content or ""
                             for chunk in raw.parse() if chunk.choices)
        else:
            answer = raw.parse().choices[0].message.content
        assert answer
        messages.append({"role": "assistant", "content": answer})
        served.append(raw.headers["x-litellm-model-id"])
        kv.append(raw.headers.get("llm_provider-x-rkllm-kv"))
    assert len(set(served)) == 1, served
    # A streamed reply's headers leave before the run is over: no X-RKLLM-KV there.
    assert kv[1] == kv[3] == "reuse" and kv[2] is None, kv
    (board,) = boards_that_ran(boards, f"{session} turn 3")
    assert board == served[0]
    # The streamed turn too: its run got the new message only, not the conversation.
    (streamed_run,) = [run for run in boards[board].record.entries("run")
                       if f"{session} turn 2" in (run.get("prompt") or "")]
    assert f"{session} turn 1" not in streamed_run["prompt"] and streamed_run["keep_history"]


def refusals_logged(boards) -> int:
    """400s the boards' access logs show, over both boards."""
    return sum(board.log().count("POST /v1/chat/completions 400") for board in boards.values())


def test_a_refusal_is_passed_on_once_and_the_board_stays_in(proxy, boards):
    """A board's 400 (a prompt longer than the context) reaches the client as it is,
    is not retried, and does not take the board out of the rotation."""
    session = f"chat-{secrets.token_hex(6)}"
    first = ask(proxy, f"{session} turn 0", session=session)
    assert first.status_code == 200, first.text
    board = first.headers["x-litellm-model-id"]
    before = refusals_logged(boards)
    response = ask(proxy, "word " * 20000, session=session)
    assert response.status_code == 400
    assert "context length" in response.json()["error"]["message"]
    after = ask(proxy, f"{session} turn 1", session=session)
    assert after.status_code == 200 and after.headers["x-litellm-model-id"] == board
    # A board logs a request once its response is sent: wait (bounded) for the line.
    for _ in range(100):
        if refusals_logged(boards) > before:
            break
        time.sleep(0.1)
    assert refusals_logged(boards) == before + 1   # sent to a board once, not retried


def test_a_board_killed_mid_stream_leaves_the_other_serving(proxy, boards):
    session = f"chat-{secrets.token_hex(6)}"
    first = ask(proxy, f"{session} turn 0", session=session)
    assert first.status_code == 200, first.text
    victim_name = first.headers["x-litellm-model-id"]
    (survivor_name,) = set(BOARDS) - {victim_name}
    victim = boards[victim_name]

    # A streamed turn of the same conversation, held open by the double until aborted.
    stream = ask(proxy, f"{session} turn 1 @@hang@@", session=session, stream=True)
    assert stream.status_code == 200 and stream.headers["x-litellm-model-id"] == victim_name
    lines = stream.iter_lines()
    for line in lines:   # ends at the first content token (or when the stream ends)
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break
    os.killpg(victim.proc.pid, signal.SIGKILL)   # the board's gunicorn, worker and runtime
    rest = [line for line in lines if line]
    victim.proc.wait(timeout=15)
    assert b"data: [DONE]" not in rest
    errors = [json.loads(line[6:]) for line in rest if line.startswith(b'data: {"error"')]
    assert errors, rest   # the proxy ends the stream with an error event

    # The conversation's next turns, and new requests, are answered by the other board.
    for turn in range(2, 5):
        marker = f"{session} turn {turn}"
        response = ask(proxy, marker, session=session)
        assert response.status_code == 200, response.text
        assert response.headers["x-litellm-model-id"] == survivor_name
        assert boards_that_ran(boards, marker) == [survivor_name]
    for i in range(4):
        response = ask(proxy, f"after the kill {i}", stream=True)
        assert response.status_code == 200
        assert response.headers["x-litellm-model-id"] == survivor_name
        assert sse_lines(response)[-1] == b"data: [DONE]"

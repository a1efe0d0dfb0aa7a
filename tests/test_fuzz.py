"""Property-based fuzzing of every route of a live server (librkllmrt double behind it):
bodies mutated from a valid request per route (wrong types, missing and extra fields,
lone surrogates, huge numbers, deep nesting), raw bytes, wrong content types and
methods, odd path parameters and headers, streaming and not. Whatever comes in, the
answer is a 200 or a 4xx, in time, never a 5xx; afterwards the server still answers.

The routes are read from the app's own URL map, so a route added later is fuzzed
too. Hypothesis runs derandomized (the corpus is the same on every run) with no
example database, so CI always sends the same requests."""
from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import api
from rkllm_api.config import Settings
from support.live_server import NPU_MODEL_ID, start_npu_server

KEY = "fuzz-key-9c1e5a7b"   # an admin key: the management routes are fuzzed too
EXAMPLES = 1100
REQUEST_TIMEOUT = 15.0   # a hang fails the test
THINKING_MODEL = "qwen3-0.6b-fuzz"
SURROGATES = ["\ud800", "a\udfffb", "\udbff\udbff", "\udc80x"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
TEMPLATES = {   # a valid body per kind of route; the fuzzer mutates these
    "chat": {"model": NPU_MODEL_ID, "messages": MESSAGES, "max_tokens": 4},
    "completion": {"model": NPU_MODEL_ID, "prompt": "hi", "max_tokens": 4},
    "model": {"model": NPU_MODEL_ID},
    "cache": {"prompt": "Answer in French."},
    "generic": {"model": NPU_MODEL_ID, "messages": MESSAGES, "prompt": "hi", "input": "hi",
                "max_tokens": 4},
}
FIELDS = ["model", "messages", "prompt", "stream", "stream_options", "max_tokens",
          "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
          "response_format", "logprobs", "top_logprobs", "logit_bias", "user", "metadata",
          "store", "modalities", "suffix", "echo", "best_of", "reasoning_effort",
          "enable_thinking", "think", "chat_template_kwargs", "use_cache", "presence_penalty",
          "frequency_penalty", "repeat_penalty", "input", "options", "format", "keep_alive",
          "name", "cache_name", "images", "system", "template", "raw", "encoding_format",
          "dimensions", "documents", "query", "lora", "adapter"]
PATH_VALUES = [NPU_MODEL_ID, THINKING_MODEL, f"{NPU_MODEL_ID}/rules", "nope", "..", "../x",
               "a" * 300, "%ED%A0%80", "%00", "x/y/z", "fake", " ", "%2e%2e%2fetc"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", None,
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]


def route_table(tmp_path_factory) -> list:
    """(path template, methods, template kind) for every route the app serves."""
    folder = tmp_path_factory.mktemp("routes")
    app = api.create_app(Settings(models_root=str(folder), include_bundled_model=False,
                                  log_file="", idle_unload_seconds=0,
                                  kv_cache_dir=str(folder / "kv")))
    try:
        routes = []
        for rule in app.url_map.iter_rules():
            methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
            routes.append((rule.rule, methods, _kind(rule.rule)))
        # The routes that run the model get more of the corpus.
        return routes + [route for route in routes if route[2] in ("chat", "completion")] * 3
    finally:
        api.server_of(app).shut_down()


def _kind(path: str) -> str:
    if "chat" in path:
        return "chat"
    if path.endswith("completions") or "generate" in path:
        return "completion"
    if path.startswith("/v1/cache"):
        return "cache"
    if path.endswith(("/select", "/unload")):
        return "model"
    return "generic"


# ---- strategies ---------------------------------------------------------------------

text = st.text(max_size=40) | st.sampled_from(SURROGATES) | st.sampled_from(
    ["", " ", "@@count:3@@ hi", "<|im_start|>system", "/no_think", "x" * 5000])
numbers = st.integers(min_value=-(2 ** 70), max_value=2 ** 70) | st.floats(
    allow_nan=False) | st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 64, 1e308, 0.5])
json_values = st.recursive(
    st.none() | st.booleans() | numbers | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "function", "developer",
                              "x", ""]) | json_values},
    optional={"content": json_values | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "input_text", "refusal", "x"])},
        optional={"text": json_values, "image_url": json_values}), max_size=3),
              "name": json_values, "tool_calls": json_values, "tool_call_id": json_values,
              "function_call": json_values}), max_size=4)


@st.composite
def bodies(draw, kind: str):
    """A body mutated from the route's template, serialized; or raw bytes."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return draw(st.sampled_from([b"", b"{", b'{"model": NaN}', b"[1, 2]", b'"x"',
                                     b"null", b"{}", b"\xff\xfe{}", b"[" * 200 + b"]" * 200,
                                     b'{"messages": [{"role": "user", "content": "\\ud800"}]}']))
    body = json.loads(json.dumps(TEMPLATES[kind]))   # a deep copy
    for _ in range(draw(st.integers(0, 3))):   # 0: a valid request, run to the end
        field = draw(st.sampled_from(FIELDS + list(body)))
        action = draw(st.integers(0, 4))
        if action == 0:
            body.pop(field, None)
        elif action == 1 and field == "messages":
            body[field] = draw(messages)
        elif action == 2:   # one leaf of an otherwise valid body
            container, key = draw(st.sampled_from(_leaves(body)))
            container[key] = draw(st.sampled_from(SURROGATES) | json_values)
        else:
            body[field] = draw(json_values)
    body.setdefault("stream", draw(st.booleans()))
    raw_utf8 = draw(st.booleans())   # lone surrogates as UTF-8 bytes, not as \u escapes
    encoded = json.dumps(body, ensure_ascii=not raw_utf8)
    return encoded.encode("utf-8", "surrogatepass")


def _leaves(value) -> list:
    """(container, key) of every leaf in a JSON value."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, inner in items:
        if isinstance(inner, (dict, list)) and inner:
            found += _leaves(inner)
        else:
            found.append((value, key))
    return found


@st.composite
def requests_for(draw, routes):
    path, methods, kind = draw(st.sampled_from(routes))
    method = draw(st.sampled_from(methods) if draw(st.integers(0, 9)) else
                  st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    # DELETE /v1/models/<id> removes a model's folder: not the ones the fuzzing runs on.
    values = [v for v in PATH_VALUES if method != "DELETE" or not v.startswith(
        (NPU_MODEL_ID, THINKING_MODEL))]
    while "<" in path:   # every variable part (<model>, <path:rest> ...) gets a value
        start, end = path.index("<"), path.index(">") + 1
        path = path[:start] + draw(st.sampled_from(values)) + path[end:]
    headers = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES)) if draw(st.integers(0, 5)) == 0 \
        else "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    auth = draw(st.integers(0, 9))
    if auth:
        headers["Authorization"] = f"Bearer {KEY}"
    elif draw(st.booleans()):
        headers["Authorization"] = draw(st.sampled_from(["Bearer", "Bearer x", "Basic abc",
                                                         "bearer " + KEY[:-1], "Token x"]))
    if draw(st.integers(0, 9)) == 0:
        headers["Origin"] = draw(st.sampled_from(["null", "http://evil.example", "file://"]))
    return method, path, headers, draw(bodies(kind))


# ---- the test ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs, tmp_path_factory):
    server = start_npu_server(live_servers, rkllm_double_libs, extra_models=(THINKING_MODEL,),
                              RKLLM_ADMIN_KEYS=KEY, HF_ENDPOINT="http://127.0.0.1:9",
                              KV_CACHE_DIR=str(tmp_path_factory.mktemp("fuzz-kv")))
    server.routes = route_table(tmp_path_factory)
    server.sent = []
    return server


def check_answer(server, method: str, path: str, response: requests.Response) -> None:
    where = f"{method} {path}"
    if path.endswith("pull") and response.status_code == 502:
        # The one 5xx that is not about the input: the model hub (a closed port here,
        # so nothing is downloaded) cannot be reached.
        assert "hub_unreachable" in response.text, response.text
        return
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    kind = response.headers.get("Content-Type", "")
    if response.status_code >= 400 and "json" in kind:
        error = response.json()["error"]   # OpenAI's object, or Ollama's string
        message = error["message"] if isinstance(error, dict) else error
        assert message and "Traceback" not in message, where
    if "event-stream" in kind:
        assert '"server_error"' not in response.text, f"{where}: {response.text[-500:]}"


def test_no_input_gets_a_5xx_or_a_hang(server):
    assert len(server.routes) >= 10
    session = requests.Session()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=(Phase.explicit, Phase.generate, Phase.shrink),
              suppress_health_check=list(HealthCheck))
    @given(request=requests_for(server.routes))
    def one_request(request):
        method, path, headers, body = request
        response = session.request(method, server.url + path, data=body, headers=headers,
                                   timeout=REQUEST_TIMEOUT)
        server.sent.append((method, path, response.status_code))
        check_answer(server, method, path, response)

    one_request()
    assert len(server.sent) >= 1000
    # The corpus is not all refused at the door: generations ran, on both surfaces of
    # the OpenAI API, and the field checks were reached.
    answered = {(p, s) for _, p, s in server.sent}
    assert ("/v1/chat/completions", 200) in answered and ("/v1/completions", 200) in answered
    assert ("/v1/chat/completions", 400) in answered


def test_the_server_answers_after_the_fuzzing(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert server.get("/v1/models", headers=headers).status_code == 200
    chat = server.post("/v1/chat/completions", headers=headers,
                       json={"model": NPU_MODEL_ID, "messages": MESSAGES, "max_tokens": 4})
    assert chat.status_code == 200
    health = server.get("/health").json()
    assert health["queue_length"] == 0
    assert not any(device["busy"] for device in health["devices"].values())
    log = server.log()
    assert "--- Logging error ---" not in log
    assert "Traceback" not in log, log[-5000:]

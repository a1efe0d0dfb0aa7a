"""The HTTP server end to end on the librkllmrt double: wire format, stop sequences,
errors, management routes and bad requests, through a real gunicorn."""
import json

import pytest
import requests

from support.live_server import NPU_MODEL_ID, start_npu_server, streamed_content

MAX_REQUEST_BYTES = 200_000
CHAT = "/v1/chat/completions"
THINKING_MODEL = "qwen3-fake"  # the name alone makes it a thinking model


BROKEN_MODEL = "broken-npu-model"  # its .rkllm file tells the double's init to fail


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    server = start_npu_server(live_servers, rkllm_double_libs,
                              extra_models=(THINKING_MODEL, BROKEN_MODEL),
                              MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES))
    models_root = server.env["RKLLM_MODELS_ROOT"]
    with open(f"{models_root}/{BROKEN_MODEL}/{BROKEN_MODEL}.rkllm", "wb") as model:
        model.write(b"@@init_fail@@\n")
    return server


def user(text):
    return {"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": text}]}


# ---- wire format ----

def test_stream_wire_format(server):
    response, payloads = server.stream_chat(
        {**user("@@reply:Grüße 👋@@"), "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert len({(c["id"], c["created"], c["model"], c["system_fingerprint"])
                for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-") and chunks[0]["model"] == NPU_MODEL_ID
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert len(roles) == 1
    assert streamed_content(chunks) == "Grüße 👋"
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    counts = usage["usage"]
    assert counts["completion_tokens"] > 0 and counts["prompt_tokens"] > 0
    assert counts["total_tokens"] == counts["prompt_tokens"] + counts["completion_tokens"]


def test_stream_without_include_usage_has_no_usage_field(server):
    _, payloads = server.stream_chat(user("hi"))
    assert all("usage" not in p for p in payloads[:-1])
    assert streamed_content(payloads) == "Hello from the NPU double."


def test_non_streaming_body(server):
    response = server.post("/v1/chat/completions", json=user("@@count:4@@"))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["system_fingerprint"].startswith("fp_")
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": "tok0 tok1 tok2 tok3"}
    assert body["choices"][0]["finish_reason"] == "stop"
    # Usage is the runtime's own count: the double counts one token per callback and
    # one prompt token per whitespace-separated word.
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["prompt_tokens"] >= 1


def test_stream_is_decided_by_the_body_not_the_accept_header(server):
    response = server.post(CHAT, json=user("hi"), headers={"Accept": "text/event-stream"})
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["object"] == "chat.completion"


def test_max_tokens_gives_length(server):
    for field in ("max_tokens", "max_completion_tokens"):
        body = server.post("/v1/chat/completions",
                           json={**user("@@count:50@@"), field: 3}).json()
        assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3


def test_stop_sequence_split_across_tokens_streaming_and_not(server):
    # The double sends one character per token, so "STOP" arrives over four tokens.
    request = {**user("@@slow:5@@ @@reply:one two STOP three four five six@@"),
               "stop": ["STOP", "never"]}
    runs_before = len(server.record.entries("run"))
    aborts_before = len(server.record.entries("abort"))
    _, payloads = server.stream_chat(request)
    assert streamed_content(payloads) == "one two "
    assert [p["choices"][0]["finish_reason"] for p in payloads[:-1]][-1] == "stop"
    body = server.post("/v1/chat/completions", json=request).json()
    assert body["choices"][0]["message"]["content"] == "one two "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert len(server.record.entries("run")) == runs_before + 2
    assert len(server.record.entries("abort")) >= aborts_before + 2  # both runs were cut


def test_error_mid_stream_is_an_error_event(server):
    response, payloads = server.stream_chat(user("@@count:10@@ @@error:3@@"))
    assert response.status_code == 200
    assert streamed_content(payloads) == "tok0 tok1 tok2"
    assert payloads[-1] == "[DONE]"
    error = payloads[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    assert not any(p["choices"][0]["finish_reason"] for p in payloads[:-2])


def test_error_without_stream_is_500(server):
    response = server.post("/v1/chat/completions", json=user("@@count:10@@ @@error:3@@"))
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


def test_failure_before_first_token_is_500_even_when_streaming(server):
    response = server.post("/v1/chat/completions", json={**user("@@fail@@"), "stream": True})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "runtime_error"


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_that_fails_to_load_is_a_500_and_the_server_goes_on(server, stream):
    response = server.post(CHAT, json={**user("hi"), "model": BROKEN_MODEL, "stream": stream})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "runtime_error" and "could not be loaded" in error["message"]
    good = server.post(CHAT, json=user("@@count:2@@"))
    assert good.status_code == 200
    assert good.json()["choices"][0]["message"]["content"] == "tok0 tok1"


def test_streamed_bytes_are_the_same_events_written_in_fewer_writes(server):
    """Coalescing joins queued events into one write; the client sees every event."""
    response, payloads = server.stream_chat({**user("@@count:300@@"), "max_tokens": 400})
    deltas = [p["choices"][0]["delta"].get("content") for p in payloads[1:-2]]
    assert "".join(deltas) == " ".join(f"tok{i}" for i in range(300))
    assert len(deltas) == 300                  # one chunk per token, as before
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"


def test_completions_endpoint(server):
    body = server.post("/v1/completions", json={"model": NPU_MODEL_ID,
                                                "prompt": ["@@count:3@@"]}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "tok0 tok1 tok2"
    assert body["usage"]["completion_tokens"] == 3
    response, payloads = server.stream_chat(
        {"model": NPU_MODEL_ID, "prompt": "@@count:3@@", "stop": " tok2",
         "stream_options": {"include_usage": True}}, path="/completions")
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "tok0 tok1"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 2


def test_unprefixed_chat_route_and_alias(server):
    body = server.post("/chat/completions",
                       json={**user("hi"), "model": "fake-npu"}).json()
    assert body["model"] == NPU_MODEL_ID


def test_text_parts_are_joined(server):
    parts = [{"type": "text", "text": "@@reply:"}, {"type": "text", "text": "ok@@"}]
    body = server.post("/v1/chat/completions", json={
        "model": NPU_MODEL_ID, "messages": [{"role": "user", "content": parts}]}).json()
    # The parts are joined with a newline, so the directive spans it.
    assert body["choices"][0]["message"]["content"] == "\nok"


def test_thinking_switch_reaches_the_runtime_only_for_thinking_models(server):
    server.post("/v1/chat/completions", json={
        **user("hi"), "chat_template_kwargs": {"enable_thinking": True}}).raise_for_status()
    assert server.record.last("run")["enable_thinking"] in (0, False)


# ---- management and status ----

def test_models_list_and_get(server):
    listing = server.get("/v1/models").json()
    assert listing["object"] == "list"
    assert sorted(m["id"] for m in listing["data"]) == [BROKEN_MODEL, NPU_MODEL_ID, THINKING_MODEL]
    card = next(m for m in listing["data"] if m["id"] == NPU_MODEL_ID)
    assert card["object"] == "model" and card["owned_by"] and isinstance(card["created"], int)
    assert server.get(f"/v1/models/{NPU_MODEL_ID}").json()["id"] == NPU_MODEL_ID
    assert server.get("/v1/models/fake-npu").json()["id"] == NPU_MODEL_ID


def test_select_unload_and_health(server):
    server.post("/v1/models/unload").raise_for_status()
    selected = server.post("/v1/models/select", json={"model": "fake-npu"})
    assert selected.status_code == 200 and selected.json()["model"] == NPU_MODEL_ID
    health = server.get("/health").json()
    assert health["status"] == "ok" and NPU_MODEL_ID in health["loaded_models"]
    unloaded = server.post("/v1/models/unload")
    assert unloaded.status_code == 200 and unloaded.json()["unloaded"] == [NPU_MODEL_ID]
    assert server.get("/health").json()["loaded_models"] == []
    assert server.post("/v1/models/unload", json={"model": NPU_MODEL_ID}).json()["unloaded"] == []
    assert server.get("/ready").status_code == 200


def test_cors_preflight_from_a_foreign_origin_gets_no_cors_headers(server):
    """Without CORS_ORIGINS no web page of another origin may call the API
    (tests/test_security.py has the allowed case)."""
    response = requests.options(server.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Methods" not in response.headers


# ---- bad requests: every one a 4xx in OpenAI error format ----

JSON = {"Content-Type": "application/json"}
IMAGE = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]

BAD_REQUESTS = [
    # (id, method, path, request kwargs, status, param or code expected)
    ("malformed-json", "post", CHAT, {"data": b"{not json", "headers": JSON}, 400, None),
    ("truncated-json", "post", CHAT, {"data": b'{"model": "x", ', "headers": JSON}, 400, None),
    ("empty-body", "post", CHAT, {"data": b"", "headers": JSON}, 400, None),
    ("not-utf8", "post", CHAT, {"data": b'{"model": "\xff"}', "headers": JSON}, 400, None),
    ("array-body", "post", CHAT, {"json": [1, 2]}, 400, None),
    ("string-body", "post", CHAT, {"json": "hello"}, 400, None),
    ("text-plain", "post", CHAT, {"data": b'{"messages": []}',
                                  "headers": {"Content-Type": "text/plain"}}, 400, None),
    ("form-encoded", "post", CHAT, {"data": {"model": "x"}}, 400, None),
    ("no-messages", "post", CHAT, {"json": {"model": NPU_MODEL_ID}}, 400, "messages"),
    ("empty-messages", "post", CHAT, {"json": {"messages": []}}, 400, "messages"),
    ("message-not-object", "post", CHAT, {"json": {"messages": [3]}}, 400, "messages"),
    ("bad-role", "post", CHAT, {"json": {"messages": [{"role": "x", "content": "a"}]}},
     400, "messages[0].role"),
    ("content-number", "post", CHAT, {"json": {"messages": [{"role": "user", "content": 1}]}},
     400, "messages[0].content"),
    ("image-part", "post", CHAT, {"json": {"model": NPU_MODEL_ID, "messages": [
        {"role": "user", "content": IMAGE}]}}, 400, "messages[0].content"),
    ("model-number", "post", CHAT, {"json": {**user("a"), "model": 3}}, 400, "model"),
    ("unknown-model", "post", CHAT, {"json": {**user("a"), "model": "nope"}}, 404,
     "model_not_found"),
    ("temperature-string", "post", CHAT, {"json": {**user("a"), "temperature": "hot"}},
     400, "temperature"),
    ("top-p-range", "post", CHAT, {"json": {**user("a"), "top_p": 7}}, 400, "top_p"),
    ("n-two", "post", CHAT, {"json": {**user("a"), "n": 2}}, 400, "n"),
    ("max-tokens-zero", "post", CHAT, {"json": {**user("a"), "max_tokens": 0}}, 400,
     "max_tokens"),
    ("stop-number", "post", CHAT, {"json": {**user("a"), "stop": 1}}, 400, "stop"),
    ("stop-five", "post", CHAT, {"json": {**user("a"), "stop": list("abcde")}}, 400, "stop"),
    ("stream-string", "post", CHAT, {"json": {**user("a"), "stream": "true"}}, 400, "stream"),
    ("stream-options-list", "post", CHAT, {"json": {**user("a"), "stream_options": []}},
     400, "stream_options"),
    ("tools-object", "post", CHAT, {"json": {**user("a"), "tools": {"a": 1}}}, 400, "tools"),
    ("reasoning-effort", "post", CHAT, {"json": {**user("a"), "reasoning_effort": 5}},
     400, "reasoning_effort"),
    ("completion-echo", "post", "/v1/completions",
     {"json": {"model": NPU_MODEL_ID, "prompt": "a", "echo": True}}, 400, "echo"),
    ("completion-token-prompt", "post", "/v1/completions",
     {"json": {"model": NPU_MODEL_ID, "prompt": [1, 2]}}, 400, "prompt"),
    ("completion-two-prompts", "post", "/v1/completions",
     {"json": {"model": NPU_MODEL_ID, "prompt": ["a", "b"]}}, 400, "prompt"),
    ("select-no-model", "post", "/v1/models/select", {"json": {}}, 400, "model"),
    ("select-unknown", "post", "/v1/models/select", {"json": {"model": "nope"}}, 404,
     "model_not_found"),
    ("unload-unknown", "post", "/v1/models/unload", {"json": {"model": "nope"}}, 404,
     "model_not_found"),
    ("unload-bad-json", "post", "/v1/models/unload", {"data": b"{", "headers": JSON}, 400,
     None),
    ("get-unknown-model", "get", "/v1/models/nope", {}, 404, "model_not_found"),
    ("unknown-route", "get", "/v1/nothing-here", {}, 404, "not_found"),
    ("get-on-post-route", "get", CHAT, {}, 405, "method_not_allowed"),
    ("too-large", "post", CHAT, {"json": user("x" * (MAX_REQUEST_BYTES + 10))}, 413,
     "request_too_large"),
]


@pytest.mark.parametrize("method,path,kwargs,status,expected",
                         [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, method, path, kwargs, status, expected):
    response = getattr(server, method)(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if expected is not None:
        assert expected in (error["param"], error["code"])


def test_server_still_serves_after_bad_requests(server):
    assert server.post(CHAT, json=user("hi")).status_code == 200


# ---- tool calls (tools.py in the pipeline) ----

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL_REPLY = ('@@reply:Checking.\n<tool_call>{"name": "get_weather", '
              '"arguments": {"city": "Paris"}}</tool_call>@@')


def test_tool_call_in_json_reply(server):
    body = server.post(CHAT, json={**user(CALL_REPLY), "tools": [WEATHER_TOOL]}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert "tool_call" not in (choice["message"]["content"] or "")
    # The tools were described to the model in the prompt.
    assert "get_weather" in server.record.last("run")["prompt"]


def test_tool_call_streamed(server):
    _, payloads = server.stream_chat({**user(CALL_REPLY), "tools": [WEATHER_TOOL]})
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0][0]["function"]["name"] == "get_weather" and calls[0][0]["id"]
    arguments = "".join(c[0]["function"].get("arguments", "") for c in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert payloads[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert "tool_call>" not in streamed_content(payloads)


def test_without_tools_the_same_text_stays_content(server):
    body = server.post(CHAT, json=user(CALL_REPLY)).json()
    assert "<tool_call>" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"


# ---- thinking (thinking.py in the pipeline) ----

THINK_REPLY = "@@reply:<think>pondering</think>The answer.@@"


def think(text, **extra):
    return {"model": THINKING_MODEL, "messages": [{"role": "user", "content": text}], **extra}


def test_run_figures_are_headers_of_whole_replies_only(server):
    """X-RKLLM-KV and X-RKLLM-Prefill-Tokens are known once the run is over; a
    streamed reply's headers leave before that, so it never carries them (however
    quick the run), and its usage chunk has the figures instead."""
    body = {"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": "hi @@reply:ok@@"}]}
    whole = server.post(CHAT, json=body)
    assert whole.headers["X-RKLLM-KV"] and int(whole.headers["X-RKLLM-Prefill-Tokens"]) > 0
    for _ in range(3):   # a one-token answer is often over before the first byte
        response, payloads = server.stream_chat({**body, "stream_options": {
            "include_usage": True}})
        assert "X-RKLLM-KV" not in response.headers
        assert "X-RKLLM-Prefill-Tokens" not in response.headers
        assert payloads[-2]["usage"]["prompt_tokens"] > 0
    ollama = server.post("/api/chat", json={**body, "stream": True})
    assert ollama.status_code == 200 and "X-RKLLM-KV" not in ollama.headers
    assert json.loads(ollama.text.strip().splitlines()[-1])["prompt_eval_count"] > 0


def test_thinking_model_splits_reasoning_in_json_and_stream(server):
    body = server.post(CHAT, json=think(THINK_REPLY)).json()
    assert server.record.last("run")["enable_thinking"] is True
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "pondering" and message["content"] == "The answer."
    _, payloads = server.stream_chat(think(THINK_REPLY))
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "pondering"
    assert streamed_content(payloads) == "The answer."
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])


def test_an_answer_that_never_closes_think_is_content(server):
    """A model treated as thinking that never writes </think> (a non-thinking
    Qwen3 Instruct-2507): the text is the answer, on both surfaces, never empty."""
    reply = "@@reply:Paris is the capital.\nIt lies on the Seine.@@"
    message = server.post(CHAT, json=think(reply)).json()["choices"][0]["message"]
    assert server.record.last("run")["enable_thinking"] is True
    assert message["content"] == "Paris is the capital.\nIt lies on the Seine."
    assert not message.get("reasoning_content")
    _, payloads = server.stream_chat(think(reply))
    assert streamed_content(payloads) == "Paris is the capital.\nIt lies on the Seine."
    ollama = server.post("/api/chat", json={"model": THINKING_MODEL, "stream": False,
                                            "messages": think(reply)["messages"]}).json()
    assert ollama["message"]["content"] == "Paris is the capital.\nIt lies on the Seine."
    assert not ollama["message"].get("thinking")


@pytest.mark.parametrize("switch", [{"chat_template_kwargs": {"enable_thinking": False}},
                                    {"reasoning_effort": "none"}])
def test_request_switches_thinking_off(server, switch):
    server.post(CHAT, json=think("hi", **switch)).raise_for_status()
    assert server.record.last("run")["enable_thinking"] is False


def test_no_think_soft_switch_is_removed_from_the_prompt(server):
    server.post(CHAT, json=think("hello there /no_think")).raise_for_status()
    run = server.record.last("run")
    assert run["enable_thinking"] is False and "/no_think" not in run["prompt"]


def test_legacy_functions_get_a_function_call(server):
    functions = [WEATHER_TOOL["function"]]
    body = server.post(CHAT, json={**user(CALL_REPLY), "functions": functions}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert json.loads(choice["message"]["function_call"]["arguments"]) == {"city": "Paris"}
    _, payloads = server.stream_chat({**user(CALL_REPLY), "functions": functions})
    calls = [p["choices"][0]["delta"]["function_call"] for p in payloads[:-1]
             if "function_call" in p["choices"][0]["delta"]]
    assert calls[0]["name"] == "get_weather"
    assert payloads[-2]["choices"][0]["finish_reason"] == "function_call"


# ---- context overflow ----

@pytest.mark.parametrize("route, field", [(CHAT, "messages"), ("/v1/completions", "prompt")])
def test_prompt_too_long_is_400_before_the_model_runs(server, route, field):
    text = "word " * 30_000   # ~8,600 tokens by the estimate: over the 4096 context
    body = user(text) if field == "messages" else {"model": NPU_MODEL_ID, "prompt": text}
    calls_before = len(server.record.entries())
    response = server.post(route, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == field
    assert error["type"] == "invalid_request_error"
    new_calls = [e["call"] for e in server.record.entries()[calls_before:]]
    assert "run" not in new_calls and "init" not in new_calls

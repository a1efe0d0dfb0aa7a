"""The Ollama API end to end through the `ollama` PyPI client and raw HTTP, against a
real gunicorn whose models run on the librkllmrt double (scripted with @@reply@@,
@@count@@ and @@slow@@, so every expected answer and count is known exactly)."""
import json
import re
import time
from datetime import datetime, timedelta, timezone

import ollama
import pytest
import requests

from support.live_server import NPU_MODEL_ID, start_npu_server

THINKING_MODEL = "qwen3-fake"   # the name alone makes it a thinking model
TAG = f"{NPU_MODEL_ID}:latest"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CALL = ('@@reply:<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '</tool_call>@@')
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}


MAX_REQUEST_BYTES = 300_000


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, extra_models=(THINKING_MODEL,),
                            MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES))


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


def user(text, **extra):
    return {"role": "user", "content": text, **extra}


def post(server, path, body, **kwargs):
    return requests.post(server.url + path, data=json.dumps(body), timeout=60, **kwargs)


def ndjson(response):
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.iter_lines() if line]


# ---- status and models ------------------------------------------------------------

def test_root_says_ollama_is_running(server):
    for method in (requests.get, requests.head):
        response = method(server.url + "/", timeout=10)
        assert response.status_code == 200
    assert requests.get(server.url + "/", timeout=10).text == "Ollama is running"


def test_version_is_a_number_open_webui_can_compare(client):
    version = client._client.get("/api/version").json()["version"]
    # Open WebUI's own comparison: strip a "v" and a suffix, split on dots, ints.
    assert tuple(map(int, re.sub(r"^v|-.*", "", version).split(".")))


def test_list_names_every_model_with_details(client):
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {TAG, f"{THINKING_MODEL}:latest"}
    entry = listed[TAG]
    assert entry.size > 0 and re.fullmatch(r"[0-9a-f]{64}", entry.digest)
    assert entry.details.format == "rkllm" and entry.modified_at.tzinfo is not None


def test_show_details_capabilities_and_context(client):
    shown = client.show(f"{THINKING_MODEL}:latest")
    assert {"completion", "tools", "thinking"} <= set(shown.capabilities)
    assert "thinking" not in client.show(NPU_MODEL_ID).capabilities
    info = shown.modelinfo
    assert info[f"{info['general.architecture']}.context_length"] > 0
    assert "temperature" in shown.parameters and shown.details.format == "rkllm"
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("no-such-model")
    assert missing.value.status_code == 404 and "not found" in missing.value.error


# ---- chat and generate -------------------------------------------------------------

def test_chat_without_streaming(client, server):
    reply = client.chat(model=TAG, messages=[user("@@reply:Bonjour le monde@@")], stream=False)
    assert reply.message.role == "assistant" and reply.message.content == "Bonjour le monde"
    assert reply.done and reply.done_reason == "stop" and reply.model == TAG
    run = server.record.last("run")
    assert "Bonjour" in run["prompt"] and run["keep_history"] in (1, True)


def test_chat_stream_is_ndjson_deltas_then_a_final_object(client):
    parts = list(client.chat(model=NPU_MODEL_ID, messages=[user("@@reply:abc déf@@")],
                             stream=True))
    assert "".join(p.message.content for p in parts) == "abc déf"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    final = parts[-1]
    # One token a callback; the double splits "é" over two callbacks.
    assert final.done_reason == "stop" and final.eval_count == len("abc déf") + 1


def test_generate_stream_and_not(client, server):
    reply = client.generate(model=NPU_MODEL_ID, prompt="@@reply:four@@", system="Be terse.",
                            stream=False)
    assert reply.response == "four" and reply.done_reason == "stop"
    assert server.record.last("run")["prompt"].startswith("Be terse.")
    parts = list(client.generate(model=NPU_MODEL_ID, prompt="@@reply:x y z@@", stream=True))
    assert "".join(p.response for p in parts) == "x y z" and parts[-1].done


def test_raw_generate_sends_the_prompt_as_it_is(client, server):
    """raw is a plain completion, as /v1/completions: no turn is built around it (no
    system text, no labels) and it never enters the KV cache."""
    reply = client.generate(model=NPU_MODEL_ID, prompt="Once upon a time @@reply:ok@@",
                            raw=True, system="ignored in raw mode", stream=False)
    run = server.record.last("run")
    assert run["prompt"] == "Once upon a time @@reply:ok@@" and run["keep_history"] in (0, False)
    assert reply.response == "ok"


def test_options_reach_the_runtime(client, server):
    client.chat(model=NPU_MODEL_ID, messages=[user("@@count:50@@")], stream=False,
                options={"num_predict": 7, "temperature": 0.25, "top_k": 3, "top_p": 0.5,
                         "repeat_penalty": 1.3, "stop": ["tok5"]})
    run = server.record.last("run")
    assert run["max_new_tokens"] == 7
    sampling = run["sampling"]
    assert (sampling["temperature"], sampling["top_k"], sampling["top_p"]) == \
        pytest.approx((0.25, 3, 0.5))
    reply = client.chat(model=NPU_MODEL_ID, messages=[user("@@count:50@@")], stream=False,
                        options={"num_predict": 20, "stop": ["tok5"]})
    assert reply.message.content == "tok0 tok1 tok2 tok3 tok4 " and reply.done_reason == "stop"
    cut = client.chat(model=NPU_MODEL_ID, messages=[user("@@count:50@@")], stream=False,
                      options={"num_predict": 3})
    assert cut.done_reason == "length" and cut.eval_count == 3


def test_num_ctx_narrows_the_prompt_window(client, server):
    history = []
    for i in range(12):
        history += [user(f"question {i} " + "word " * 40), {"role": "assistant",
                                                            "content": f"answer {i}"}]
    messages = history + [user("@@reply:ok@@ last question")]
    client.chat(model=NPU_MODEL_ID, messages=messages, stream=False)
    whole = server.record.last("run")["prompt"]
    client.chat(model=NPU_MODEL_ID, messages=messages, stream=False, options={"num_ctx": 400})
    narrow = server.record.last("run")["prompt"]
    assert "question 0" in whole and "question 0" not in narrow
    assert "last question" in narrow


# ---- counts and durations against the runtime's perf ------------------------------------

def test_counts_and_durations_are_the_runtimes(server, client):
    client.generate(model=NPU_MODEL_ID, keep_alive=0)     # the next request loads the model
    prompt = "@@slow:20@@ @@count:5@@ one two three"
    response = post(server, "/api/generate", {"model": NPU_MODEL_ID, "prompt": prompt,
                                              "stream": False})
    body = response.json()
    assert body["eval_count"] == 5 and body["response"] == "tok0 tok1 tok2 tok3 tok4"
    # The double counts a prompt word as a prefilled token; the server says how many
    # it prefilled in its header, and Ollama's count is that figure.
    assert body["prompt_eval_count"] == int(response.headers["X-RKLLM-Prefill-Tokens"])
    assert body["prompt_eval_count"] == len(server.record.last("run")["prompt"].split())
    # The double sleeps 20 ms before each of its 5 tokens: its generate time is at least that.
    assert body["eval_duration"] >= 5 * 20_000_000
    assert body["load_duration"] > 0
    parts = (body["load_duration"], body["prompt_eval_duration"], body["eval_duration"])
    assert sum(parts) <= body["total_duration"]
    again = post(server, "/api/generate", {"model": NPU_MODEL_ID, "prompt": "@@count:2@@",
                                           "stream": False}).json()
    assert again["load_duration"] == 0 and again["eval_count"] == 2


def test_streamed_final_object_has_the_same_statistics(server):
    response = post(server, "/api/chat", {"model": NPU_MODEL_ID,
                                          "messages": [user("@@count:4@@ a b")]}, stream=True)
    objects = ndjson(response)
    final = objects[-1]
    assert final["done"] and final["eval_count"] == 4
    assert {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_duration"} <= set(final)
    assert final["prompt_eval_count"] > 0


# ---- tools, thinking, images ---------------------------------------------------------

def test_tool_calls_come_back_with_object_arguments(client):
    for stream in (False, True):
        reply = client.chat(model=NPU_MODEL_ID, messages=[user("Weather in Paris? " + CALL)],
                            tools=[WEATHER], stream=stream)
        parts = [reply] if not stream else list(reply)
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        (call,) = calls
        assert call.function.name == "get_weather"
        assert dict(call.function.arguments.items()) == {"city": "Paris"}   # what HA does
        assert parts[-1].done_reason == "stop"
        assert "<tool_call>" not in "".join(p.message.content or "" for p in parts)


def test_tool_results_go_back_to_the_model(client, server):
    messages = [user("Weather in Paris?"),
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": '{"temperature": 21}'},
                user("@@reply:It is 21 degrees.@@ thanks")]
    reply = client.chat(model=NPU_MODEL_ID, messages=messages, tools=[WEATHER], stream=False)
    assert reply.message.content == "It is 21 degrees."
    prompt = server.record.last("run")["prompt"]
    assert '"temperature": 21' in prompt and "get_weather" in prompt


@pytest.mark.parametrize("think,expected", [(True, True), ("high", True), (False, False)])
def test_think_reaches_the_runtime_and_comes_back_as_thinking(client, server, think, expected):
    reply = client.chat(model=THINKING_MODEL, think=think, stream=False,
                        messages=[user("@@reply:<think>pondering</think>The answer.@@")])
    assert server.record.last("run")["enable_thinking"] in ((1, True) if expected else (0, False))
    assert reply.message.content == "The answer."
    assert reply.message.thinking == "pondering"


def test_thinking_streams_as_thinking_deltas(client):
    parts = list(client.chat(model=THINKING_MODEL, think=True, stream=True,
                             messages=[user("@@reply:<think>hmm</think>Yes.@@")]))
    assert "".join(p.message.thinking or "" for p in parts) == "hmm"
    assert "".join(p.message.content or "" for p in parts) == "Yes."


def test_images_to_a_model_without_vision_are_a_clear_400(client, server):
    for call in (lambda: client.chat(model=NPU_MODEL_ID, stream=False,
                                     messages=[user("What is this?", images=[PNG])]),
                 lambda: client.generate(model=NPU_MODEL_ID, prompt="What is this?",
                                         images=[PNG], stream=False)):
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == 400
        assert "does not accept images" in refused.value.error


# ---- keep_alive, load, unload -----------------------------------------------------------

def expires_in(client, model=TAG) -> timedelta:
    (entry,) = [m for m in client.ps().models if m.model == model]
    return entry.expires_at - datetime.now(timezone.utc)


def test_keep_alive_load_unload_and_ps(client, server):
    loaded = client.generate(model=NPU_MODEL_ID, keep_alive="10m")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert timedelta(minutes=9) < expires_in(client) <= timedelta(minutes=10)
    (entry,) = client.ps().models
    assert entry.size_vram == entry.size > 0 and entry.context_length > 0
    client.chat(model=NPU_MODEL_ID, messages=[user("hi")], keep_alive=-1, stream=False)
    assert expires_in(client) > timedelta(days=365 * 100)
    client.chat(model=NPU_MODEL_ID, messages=[user("hi")], keep_alive="90s", stream=False)
    assert timedelta(seconds=80) < expires_in(client) <= timedelta(seconds=90)
    unloaded = client.chat(model=NPU_MODEL_ID, messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == [] and server.get("/health").json()["loaded_models"] == []
    assert server.record.last("destroy")


def test_keep_alive_zero_unloads_after_the_answer(client, server):
    reply = client.chat(model=NPU_MODEL_ID, messages=[user("@@reply:bye@@")], keep_alive=0,
                        stream=False)
    assert reply.message.content == "bye" and client.ps().models == []
    parts = list(client.chat(model=NPU_MODEL_ID, messages=[user("@@reply:bye@@")],
                             keep_alive="0s", stream=True))
    assert parts[-1].done and client.ps().models == []


def test_a_short_keep_alive_expires(client):
    client.generate(model=NPU_MODEL_ID, keep_alive="1s")
    deadline = time.monotonic() + 15
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.ps().models == []


# ---- errors in Ollama's format ----------------------------------------------------------

@pytest.mark.parametrize("path,body,status,words", [
    ("/api/chat", {"model": "nope", "messages": [user("x")]}, 404, 'model "nope" not found'),
    ("/api/chat", {"messages": [user("x")]}, 400, "'model' is required"),
    ("/api/chat", {"model": NPU_MODEL_ID, "messages": "hi"}, 400, "'messages' must be a list"),
    ("/api/chat", {"model": NPU_MODEL_ID, "messages": [user("x"), user([{"text": "y"}])]}, 400,
     "'messages[1].content' must be a string"),
    ("/api/chat", {"model": NPU_MODEL_ID, "messages": [user("x")], "keep_alive": "soon"}, 400,
     "keep_alive"),
    ("/api/chat", {"model": NPU_MODEL_ID, "messages": [user("x")],
                   "options": {"temperature": "hot"}}, 400, "options.temperature"),
    # An integer past any float (400 digits): math.isfinite() overflowed, a 500.
    ("/api/chat", {"model": NPU_MODEL_ID, "messages": [user("x")],
                   "options": {"temperature": 10 ** 400}}, 400, "options.temperature"),
    ("/api/chat", {"model": NPU_MODEL_ID, "messages": [], "keep_alive": -10 ** 400}, 400,
     "keep_alive"),
    ("/api/generate", {"model": NPU_MODEL_ID, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/chat", {"model": NPU_MODEL_ID, "messages": [user("x")],
                   "format": {"type": "integer", "minimum": 3}}, 400, "'minimum'"),
    ("/api/embed", {"model": NPU_MODEL_ID, "input": 5}, 400, "'input'"),
    ("/api/create", {"model": "x"}, 404, "not supported"),
])
def test_refusals_are_ollama_errors(server, path, body, status, words):
    response = post(server, path, body)
    assert response.status_code == status
    error = response.json()
    assert set(error) == {"error"} and words in error["error"]


def test_body_is_read_whatever_the_content_type(server):
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Content-Type": "text/plain"}):
        reply = post(server, "/api/chat", {"model": NPU_MODEL_ID, "stream": False,
                                           "messages": [user("@@reply:ok@@")]}, headers=headers)
        assert reply.status_code == 200 and reply.json()["message"]["content"] == "ok"


def test_broken_json_and_wrong_method(server):
    broken = requests.post(server.url + "/api/chat", data=b'{"model": ', timeout=10)
    assert broken.status_code == 400 and "error" in broken.json()
    surrogate = requests.post(server.url + "/api/chat", timeout=10,
                              data=b'{"model": "x", "messages": [{"role": "user", '
                                   b'"content": "\\ud800"}]}')
    assert surrogate.status_code == 400 and "surrogate" in surrogate.json()["error"]
    wrong = requests.get(server.url + "/api/chat", timeout=10)
    assert wrong.status_code == 405 and set(wrong.json()) == {"error"}


def test_a_body_over_the_limit_is_a_413_in_ollama_format(server):
    body = {"model": NPU_MODEL_ID, "messages": [user("x" * MAX_REQUEST_BYTES)]}
    response = post(server, "/api/chat", body)
    assert response.status_code == 413 and set(response.json()) == {"error"}


def test_errors_mid_stream_and_before_it(server):
    objects = ndjson(post(server, "/api/chat", {"model": NPU_MODEL_ID, "messages": [
        user("@@count:10@@ @@error:3@@")]}, stream=True))
    assert "".join(o.get("message", {}).get("content", "") for o in objects[:-1]) == \
        "tok0 tok1 tok2"
    assert set(objects[-1]) == {"error"}
    failed = post(server, "/api/generate", {"model": NPU_MODEL_ID, "prompt": "@@fail@@"})
    assert failed.status_code == 500 and set(failed.json()) == {"error"}


def test_a_client_that_goes_away_aborts_its_run(server):
    aborts = len(server.record.entries("abort"))
    response = post(server, "/api/chat", {"model": NPU_MODEL_ID, "messages": [
        user("@@slow:50@@ @@count:400@@")]}, stream=True)
    lines = response.iter_lines()
    assert json.loads(next(lines))["done"] is False
    response.close()
    deadline = time.monotonic() + 15
    while len(server.record.entries("abort")) == aborts and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(server.record.entries("abort")) > aborts
    reply = post(server, "/api/chat", {"model": NPU_MODEL_ID, "stream": False,
                                       "messages": [user("@@reply:still here@@")]})
    assert reply.json()["message"]["content"] == "still here"


def test_client_raises_the_servers_error(client):
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="missing:7b", messages=[user("x")], stream=False)
    assert refused.value.status_code == 404


def test_a_latest_tag_in_any_case_names_the_model(client, server):
    upper = f"{NPU_MODEL_ID.upper()}:LATEST"
    reply = client.chat(model=upper, messages=[user("@@reply:ok@@")], stream=False)
    assert reply.model == upper and reply.message.content == "ok"
    assert client.show(upper).details.format == "rkllm"
    # /api/pull of a model that is here: Ollama's "success", whatever the tag's case
    # (the `ollama` CLI pulls the name it was given, tag included).
    for name in (TAG, upper):
        assert client.pull(name).status == "success"


def test_model_management_calls_are_refused_in_ollamas_format(client):
    for call in (lambda: client.delete(TAG), lambda: client.copy(TAG, "other"),
                 lambda: client.create(model="other", from_=TAG), lambda: client.push(TAG)):
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == 404 and "not supported" in refused.value.error


# ---- structured output on the NPU: validated, retried once, refused ----------------------

def test_valid_json_passes_in_one_run(client, server):
    runs = len(server.record.entries("run"))
    reply = client.chat(model=NPU_MODEL_ID, format=PERSON, stream=False,
                        messages=[user('@@reply:{"name": "Ann", "age": 31}@@')])
    assert json.loads(reply.message.content) == {"name": "Ann", "age": 31}
    assert len(server.record.entries("run")) == runs + 1
    prompt = server.record.last("run")["prompt"]
    assert "JSON Schema" in prompt and '"age"' in prompt and reply.done_reason == "stop"


def test_fenced_json_is_sent_without_the_fence(client):
    reply = client.generate(model=NPU_MODEL_ID, format="json", stream=False,
                            prompt='@@reply:```json\n{"a": 1}\n```@@')
    assert reply.response == '{"a": 1}'


def test_invalid_json_is_retried_once_then_refused(client, server):
    runs = len(server.record.entries("run"))
    response = post(server, "/api/chat", {
        "model": NPU_MODEL_ID, "format": PERSON, "stream": False,
        "messages": [user('@@reply:{"name": "Ann", "age": "thirty"}@@')]})
    assert response.status_code == 200
    body = response.json()
    assert body["done"] and body["done_reason"] == "error"
    assert "after 2 attempts" in body["error"] and "'thirty' is not of type 'integer'" in body["error"]
    assert body["message"]["content"] == ""
    new_runs = server.record.entries("run")[runs:]
    assert len(new_runs) == 2
    retry = new_runs[1]["prompt"]
    assert "cannot be used" in retry and "'thirty' is not of type 'integer'" in retry
    assert new_runs[1]["keep_history"] in (0, False)
    assert body["eval_count"] == 2 * len('{"name": "Ann", "age": "thirty"}')


def test_invalid_json_in_a_stream_makes_the_client_raise(client, server):
    with pytest.raises(ollama.ResponseError) as refused:
        list(client.chat(model=NPU_MODEL_ID, format="json", stream=True,
                         messages=[user("@@reply:Sure, here it is.@@")]))
    assert "does not match the requested format" in refused.value.error


def test_openai_surface_refuses_the_same_way(server):
    body = {"model": NPU_MODEL_ID, "messages": [user("@@reply:not json@@")],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "person", "schema": PERSON}}}
    reply = requests.post(server.base_url + "/chat/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "error" and choice["message"]["content"] is None
    assert reply["error"]["code"] == "invalid_structured_output"
    stream = requests.post(server.base_url + "/chat/completions", json={**body, "stream": True},
                           timeout=60, stream=True)
    events = [json.loads(line[6:]) for line in stream.iter_lines()
              if line.startswith(b"data: {")]
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == "error" and "error" in last
    assert not any(e["choices"][0]["delta"].get("content") for e in events if e["choices"])


# ---- embeddings -------------------------------------------------------------------------

def test_embed_one_and_many(client, server):
    many = client.embed(model=NPU_MODEL_ID, input=["the cat sat", "dogs"])
    assert len(many.embeddings) == 2 and many.prompt_eval_count == 4
    for vector in many.embeddings:
        assert len(vector) == 64 and abs(sum(v * v for v in vector) - 1.0) < 1e-6
    assert many.embeddings[0] != many.embeddings[1]
    one = client.embed(model=NPU_MODEL_ID, input="dogs")
    assert one.embeddings[0] == pytest.approx(many.embeddings[1])
    short = client.embed(model=NPU_MODEL_ID, input="dogs", dimensions=8)
    assert len(short.embeddings[0]) == 8


def test_legacy_embeddings(client):
    vector = client.embeddings(model=NPU_MODEL_ID, prompt="dogs").embedding
    assert len(vector) == 64
    assert client.embeddings(model=NPU_MODEL_ID, prompt="").embedding == []

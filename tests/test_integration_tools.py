"""Tool calling through a live server, read back by the real clients: the `openai`
package (its own stream accumulator and a hand fold of the raw deltas) and LiteLLM
(its stream_chunk_builder). The librkllmrt double is scripted to write the calls
(`@@reply:...@@` in the user text), so the expected call is known exactly."""
import json
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch at import

import openai  # noqa: E402
import pytest  # noqa: E402

from support.live_server import NPU_MODEL_ID, start_npu_server  # noqa: E402

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
PARIS = {"city": "Paris", "unit": "celsius"}
ONE_CALL = ('@@reply:Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call>@@')
TWO_CALLS = ('@@reply:<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", '
             '"unit": "celsius"}}</tool_call>\n<tool_call>{"name": "get_time", '
             '"arguments": {"city": "Tokyo"}}</tool_call>@@')


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


def prompts_since(server, runs_before):
    """Every prompt the runtime got since then: the system text (with the tools) may
    be prefilled into a system prompt cache by a run of its own."""
    return "\n".join(run["prompt"] for run in server.record.entries("run")[runs_before:])


def strict(tool):
    """The openai stream helper only accumulates tools marked strict."""
    return {"type": "function", "function": {**tool["function"], "strict": True}}


# ---- openai -------------------------------------------------------------------

def test_openai_stream_helper_rebuilds_the_call(client):
    with client.chat.completions.stream(model=NPU_MODEL_ID, messages=user(ONE_CALL),
                                        tools=[strict(WEATHER)]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == PARIS
    assert call.function.parsed_arguments == PARIS
    # Text before the call streamed as content, the call markup did not.
    assert choice.message.content == "Let me check.\n"
    assert "tool_calls.function.arguments.done" in kinds


def fold_deltas(chunks):
    """Accumulate raw tool-call deltas by index, the way OpenAI's docs show it."""
    calls, content, finish, names_seen = {}, "", None, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            if part.id:
                entry["id"] = part.id
            if part.function and part.function.name:
                names_seen.append(part.function.name)
                entry["name"] += part.function.name
            if part.function and part.function.arguments:
                entry["arguments"] += part.function.arguments
        finish = choice.finish_reason or finish
    return calls, content, finish, names_seen


def test_openai_raw_stream_two_calls_by_index(client):
    chunks = list(client.chat.completions.create(
        model=NPU_MODEL_ID, messages=user(TWO_CALLS), tools=[WEATHER, TIME], stream=True))
    calls, content, finish, names = fold_deltas(chunks)
    assert finish == "tool_calls" and content == ""
    assert sorted(calls) == [0, 1]
    assert (calls[0]["name"], json.loads(calls[0]["arguments"])) == ("get_weather", PARIS)
    assert (calls[1]["name"], json.loads(calls[1]["arguments"])) == ("get_time", {"city": "Tokyo"})
    assert calls[0]["id"] != calls[1]["id"]
    assert names == ["get_weather", "get_time"]    # each name is sent once


def test_openai_non_streaming_call_has_null_content(client):
    reply = client.chat.completions.create(
        model=NPU_MODEL_ID, messages=user(TWO_CALLS.replace("Tokyo", "Rome")),
        tools=[WEATHER, TIME])
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(message.tool_calls[1].function.arguments) == {"city": "Rome"}


def test_parallel_tool_calls_false_keeps_one_call(client, server):
    before = len(server.record.entries("run"))
    reply = client.chat.completions.create(model=NPU_MODEL_ID, messages=user(TWO_CALLS),
                                           tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]
    assert "at most one function" in prompts_since(server, before)


def test_round_trip_with_the_tool_result(client, server):
    first = client.chat.completions.create(model=NPU_MODEL_ID, messages=user(ONE_CALL),
                                           tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    follow = user("What's the weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id,
         "content": '{"temp": 21} @@reply:It is 21 degrees in Paris.@@'}]
    reply = client.chat.completions.create(model=NPU_MODEL_ID, messages=follow, tools=[WEATHER])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == "It is 21 degrees in Paris."
    assert reply.choices[0].message.tool_calls is None
    assert "<tool_response>" in server.record.last("run")["prompt"]


# ---- tool_choice ----------------------------------------------------------------

def test_tool_choice_none_says_not_to_call_and_parses_nothing(server):
    """The tools text stays (the prompt's prefix matches the request before, which the
    KV cache holds: issue 16); a note after the newest message says not to call."""
    body = {"model": NPU_MODEL_ID, "messages": user(ONE_CALL), "tools": [WEATHER],
            "tool_choice": "none"}
    before = len(server.record.entries("run"))
    reply = server.post(CHAT, json=body).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert "<tool_call>" in choice["message"]["content"]
    # (the tools text itself may sit in a system prompt cache made by earlier tests)
    assert "do not call a function" in prompts_since(server, before)
    _, payloads = server.stream_chat(body)
    assert not any("tool_calls" in p["choices"][0]["delta"]
                   for p in payloads if isinstance(p, dict) and p["choices"])
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("choice,phrase", [
    ("required", "You must call at least one"),
    ({"type": "function", "function": {"name": "get_weather"}},
     "You must call the function get_weather"),
])
def test_tool_choice_is_told_to_the_model(server, choice, phrase):
    body = {"model": NPU_MODEL_ID, "messages": user(ONE_CALL), "tools": [WEATHER, TIME],
            "tool_choice": choice}
    before = len(server.record.entries("run"))
    reply = server.post(CHAT, json=body).json()
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    assert phrase in prompts_since(server, before)


def test_call_of_an_unknown_function_stays_text(server):
    text = '@@reply:<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>@@'
    for stream in (False, True):
        body = {"model": NPU_MODEL_ID, "messages": user(text), "tools": [WEATHER]}
        if stream:
            _, payloads = server.stream_chat(body)
            deltas = [p["choices"][0]["delta"] for p in payloads[:-1] if p["choices"]]
            assert not any("tool_calls" in d for d in deltas)
            assert "launch_rocket" in "".join(d.get("content") or "" for d in deltas)
            assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
        else:
            choice = server.post(CHAT, json=body).json()["choices"][0]
            assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
            assert "launch_rocket" in choice["message"]["content"]


def test_bad_tools_are_a_400(server):
    for bad in ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
                {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                     "function": {"name": "nope"}}},
                {"tools": "weather"}):
        response = server.post(CHAT, json={"model": NPU_MODEL_ID, "messages": user("hi"), **bad})
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "invalid_request_error"


# ---- legacy functions -------------------------------------------------------------

def test_legacy_functions_answer_with_function_call(server):
    body = {"model": NPU_MODEL_ID, "messages": user(ONE_CALL),
            "functions": [WEATHER["function"]], "function_call": "auto"}
    choice = server.post(CHAT, json=body).json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert "tool_calls" not in choice["message"]
    call = choice["message"]["function_call"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == PARIS
    _, payloads = server.stream_chat(body)
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1] if p["choices"]]
    parts = [d["function_call"] for d in deltas if "function_call" in d]
    assert [p.get("name") for p in parts if p.get("name")] == ["get_weather"]
    assert json.loads("".join(p.get("arguments", "") for p in parts)) == PARIS
    assert not any("tool_calls" in d for d in deltas)
    assert payloads[-2]["choices"][0]["finish_reason"] == "function_call"


# ---- LiteLLM --------------------------------------------------------------------

# LiteLLM routes any request with tools through its MCP gateway first, which
# imports the optional `mcp` package; the gateway has nothing to do with a plain
# OpenAI-compatible provider, so the tests skip it rather than install MCP.
LITELLM_NO_MCP = {"_skip_mcp_handler": True}

def test_litellm_stream_rebuilds_the_calls(server):
    import litellm
    messages = user(TWO_CALLS)
    chunks = list(litellm.completion(model=f"openai/{NPU_MODEL_ID}", api_base=server.base_url,
                                     api_key="x", messages=messages, tools=[WEATHER, TIME],
                                     stream=True, **LITELLM_NO_MCP))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=messages)
    choice = rebuilt.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls] == [PARIS, {"city": "Tokyo"}]
    assert all(c.id for c in calls)


def test_litellm_non_streaming_call(server):
    import litellm
    reply = litellm.completion(model=f"openai/{NPU_MODEL_ID}", api_base=server.base_url,
                               api_key="x", messages=user(ONE_CALL), tools=[WEATHER],
                               **LITELLM_NO_MCP)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == PARIS
    assert reply.choices[0].finish_reason == "tool_calls"


def test_raw_wire_of_a_streamed_call(server):
    """The exact delta shapes: name once with empty arguments, then the fragments."""
    _, payloads = server.stream_chat({"model": NPU_MODEL_ID, "messages": user(ONE_CALL),
                                      "tools": [WEATHER]})
    assert payloads[-1] == "[DONE]"
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1] if p["choices"]]
    assert deltas[0]["role"] == "assistant"
    tool_deltas = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    head = tool_deltas[0][0]
    assert head["index"] == 0 and head["type"] == "function" and head["id"]
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    for later in tool_deltas[1:]:
        assert set(later[0]) == {"index", "function"} and "name" not in later[0]["function"]
    assert all(len(d) >= 1 for d in tool_deltas)    # never an empty tool_calls array

"""OpenAI wire types: request validation and the chunk/body builders."""
import json

import pytest

from rkllm_api import errors
from rkllm_api.errors import RequestError
from rkllm_api.openai import protocol
from rkllm_api.openai.protocol import parse_chat_request, parse_completion_request
from rkllm_api.pipeline import Usage
from rkllm_api.request import ImagePart, Message, TextPart, ToolCall

USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": "m", "messages": USER, **fields}


# ---- chat requests ----

def test_minimal_chat_request_gets_defaults():
    req = parse_chat_request(chat())
    assert req.model == "m" and req.stream is False and req.include_usage is False
    assert req.stop == () and req.max_tokens is None and req.sampling.given() == {}
    assert req.messages == (Message("user", (TextPart("hi"),)),)


def test_unknown_fields_are_ignored():
    assert parse_chat_request(chat(frobnicate=3, user="x", logit_bias={})).model == "m"


def test_content_parts_are_typed_text_and_images():
    parts = [{"type": "text", "text": "a"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA",
                                                 "detail": "low"}},
             {"type": "input_text", "text": "b"},
             {"type": "input_image", "image_url": "https://example.invalid/cat.png"}]
    req = parse_chat_request(chat(messages=[{"role": "user", "content": parts}]))
    message = req.messages[0]
    assert message.text == "a\nb"
    assert message.images == (ImagePart("data:image/png;base64,AA", "low"),
                               ImagePart("https://example.invalid/cat.png"))
    # Replacing the text keeps the images (how /no_think and RAG rewrite a message).
    assert message.with_text("c").parts == (TextPart("c"),) + message.images


def test_roles_are_normalised_and_tool_results_learn_their_function():
    req = parse_chat_request(chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "light?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "lamp", "arguments": {"on": True}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
        {"role": "function", "name": "lamp", "content": "done again"}]))
    roles = [m.role for m in req.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool"]
    assert req.messages[2].tool_calls == (ToolCall("lamp", '{"on": true}', "c1"),)
    assert req.messages[3].name == "lamp" and req.messages[4].name == "lamp"


def test_max_completion_tokens_wins_over_max_tokens():
    assert parse_chat_request(chat(max_tokens=5, max_completion_tokens=7)).max_tokens == 7
    assert parse_chat_request(chat(max_tokens=5)).max_tokens == 5


def test_stop_as_string_or_list():
    assert parse_chat_request(chat(stop="x")).stop == ("x",)
    assert parse_chat_request(chat(stop=["a", "", "b"])).stop == ("a", "b")


@pytest.mark.parametrize("fields,expected", [
    ({}, None),
    ({"reasoning_effort": "none"}, False),
    ({"reasoning_effort": "HIGH"}, True),
    ({"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}, True),
    ({"chat_template_kwargs": {"thinking": False}}, False),
    ({"enable_thinking": True}, True),
    ({"think": False, "reasoning_effort": "high"}, False),
    ({"reasoning_effort": "minimal"}, False),
    ({"reasoning_effort": "low"}, True),
    ({"chat_template_kwargs": {"enable_thinking": True}, "enable_thinking": False}, True),
    ({"enable_thinking": True, "reasoning_effort": "none"}, True),
])
def test_thinking_switches_are_read(fields, expected):
    assert parse_chat_request(chat(**fields)).thinking is expected


def test_response_format_is_typed():
    assert parse_chat_request(chat()).response_format.kind == "text"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = parse_chat_request(chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    )).response_format
    assert (fmt.kind, fmt.schema, fmt.name, fmt.strict) == ("json_schema", schema, "x", True)


def test_include_usage_and_sampling():
    req = parse_chat_request(chat(stream=True, stream_options={"include_usage": True},
                                  temperature=0.5, top_p=1, seed=3))
    assert req.include_usage is True
    assert req.sampling.given() == {"temperature": 0.5, "top_p": 1.0, "seed": 3}


def test_assistant_message_may_carry_only_tool_calls():
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = USER + [{"role": "assistant", "content": None, "tool_calls": calls},
                       {"role": "tool", "tool_call_id": "c", "content": "42"}]
    assert parse_chat_request(chat(messages=messages)).messages[1].tool_calls == (
        ToolCall("f", "{}", "c"),)


BAD_CHAT_BODIES = [
    ([1, 2], None),
    ({"model": "m"}, "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages="hi"), "messages"),
    (chat(messages=["hi"]), "messages"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": ["x"]}]), "messages[0].content"),
    (chat(messages=[{"role": "assistant", "content": "x", "tool_calls": {}}]),
     "messages[0].tool_calls"),
    (chat(messages=[{"role": "assistant", "content": "x",
                     "tool_calls": [{"function": {"name": 3}}]}]),
     "messages[0].tool_calls[0].function"),
    (chat(messages=[{"role": "assistant", "content": "x",
                     "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}]),
     "messages[0].tool_calls[0].function"),
    (chat(messages=[{"role": "user", "content": "x", "name": 7}]), "messages[0].name"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0]"),
    (chat(response_format="json"), "response_format"),
    (chat(response_format={"type": "yaml"}), "response_format"),
    (chat(response_format={"type": "json_schema"}), "response_format"),
    (chat(use_cache=3), "use_cache"),
    (chat(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name"),
    (chat(tool_choice="sometimes", tools=[{"type": "function", "function": {"name": "f"}}]),
     "tool_choice"),
    (chat(tool_choice="required"), "tool_choice"),
    (chat(function_call={"name": "f"}), "function_call"),
    (chat(model=5), "model"),
    (chat(model=""), "model"),
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=3), "temperature"),
    (chat(temperature=True), "temperature"),
    (chat(temperature=float("nan")), "temperature"),
    (chat(top_p=1.5), "top_p"),
    (chat(top_k=-1), "top_k"),
    (chat(presence_penalty=9), "presence_penalty"),
    (chat(seed="1"), "seed"),
    (chat(n=2), "n"),
    (chat(n="1"), "n"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(max_tokens="10"), "max_tokens"),
    (chat(max_completion_tokens=-3), "max_completion_tokens"),
    (chat(stop=5), "stop"),
    (chat(stop=["a", 1]), "stop"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(stream="yes"), "stream"),
    (chat(stream_options=True), "stream_options"),
    (chat(stream_options={"include_usage": "yes"}), "stream_options"),
    (chat(tools={}), "tools"),
    (chat(tools=["f"]), "tools[0]"),
    (chat(functions="f"), "functions"),
    (chat(tool_choice=3), "tool_choice"),
    (chat(reasoning_effort="extreme"), "reasoning_effort"),
    (chat(chat_template_kwargs=[]), "chat_template_kwargs"),
    (chat(chat_template_kwargs={"enable_thinking": "no"}), "chat_template_kwargs"),
    (chat(reasoning_effort=3), "reasoning_effort"),
    (chat(enable_thinking="yes"), "enable_thinking"),
    (chat(think=1), "think"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT_BODIES)
def test_bad_chat_requests_are_400_naming_the_field(body, param):
    with pytest.raises(RequestError) as err:
        parse_chat_request(body)
    assert err.value.status == 400
    assert err.value.param == param
    assert protocol.error_of(err.value)["error"]["type"] == "invalid_request_error"


# ---- completion requests ----

def test_completion_prompt_string_or_list_of_one():
    assert parse_completion_request({"prompt": "a"}).prompt == "a"
    assert parse_completion_request({"prompt": ["a"]}).prompt == "a"


@pytest.mark.parametrize("body,param", [
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "echo": "x"}, "echo"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "n": 4}, "n"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
])
def test_bad_completion_requests(body, param):
    with pytest.raises(RequestError) as err:
        parse_completion_request(body)
    assert err.value.status == 400 and err.value.param == param


def test_management_model_field():
    assert protocol.model_field(None, required=False) is None
    assert protocol.model_field({"model": "x"}, required=True) == "x"
    with pytest.raises(RequestError):
        protocol.model_field({}, required=True)
    with pytest.raises(RequestError):
        protocol.model_field([], required=False)


# ---- builders ----

def sse_payload(line: str) -> dict:
    assert line.startswith("data: ") and line.endswith("\n\n")
    return json.loads(line[len("data: "):])


def test_chat_chunks_share_one_identity():
    chunks = protocol.ChatChunks("m", "fp_x")
    lines = [chunks.role(), chunks.content('quote " and \u00e9 \n'), chunks.reasoning("r"),
             chunks.tool_calls([{"index": 0}]), chunks.finish("stop")]
    payloads = [sse_payload(line) for line in lines]
    assert {(p["id"], p["created"], p["model"], p["system_fingerprint"], p["object"])
            for p in payloads} == {(chunks.id, chunks.created, "m", "fp_x",
                                    "chat.completion.chunk")}
    assert chunks.id.startswith("chatcmpl-")
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[1]["choices"][0]["delta"] == {"content": 'quote " and \u00e9 \n'}
    assert payloads[2]["choices"][0]["delta"] == {"reasoning_content": "r"}
    assert payloads[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                         "finish_reason": "stop"}
    assert all("usage" not in p for p in payloads)


def test_include_usage_marks_chunks_null_and_adds_usage_chunk():
    chunks = protocol.ChatChunks("m", "fp_x", include_usage=True)
    assert sse_payload(chunks.content("a"))["usage"] is None
    last = sse_payload(chunks.usage(Usage(3, 4)))
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chat_body_and_completion_body():
    usage = Usage(1, 2)
    body = protocol.ChatChunks("m", "fp").body("hi", "why", [], "length", usage)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi",
                                             "reasoning_content": "why"}
    assert body["choices"][0]["finish_reason"] == "length"
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = protocol.ChatChunks("m", "fp").body("", "", calls, "tool_calls", usage)
    assert body["choices"][0]["message"]["content"] is None
    completion = protocol.CompletionChunks("m", "fp")
    assert completion.id.startswith("cmpl-") and completion.role() is None
    assert sse_payload(completion.content("x"))["choices"][0]["text"] == "x"
    assert completion.body("x", "", [], "stop", usage)["choices"][0]["text"] == "x"


def test_error_body_shape():
    assert protocol.error_body("m", code="c") == {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": "c"}}
    busy = errors.server_busy("busy", 0)
    assert busy.status == 503 and busy.headers == {"Retry-After": "1"}

"""The Ollama wire format without a server: bodies to typed requests (and the 400s
for bad ones), keep_alive durations, model names, and the objects we answer."""
import base64
import json
import math

import pytest

from rkllm_api import pipeline
from rkllm_api.errors import RequestError
from rkllm_api.models.registry import ModelInfo
from rkllm_api.ollama import models, protocol
from rkllm_api.ollama.render import OllamaAnswer, body_of, collect, render_ndjson
from rkllm_api.request import ChatRequest, CompletionRequest, ImagePart

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 24).decode()
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 20).decode()


def chat(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return protocol.parse_chat(body, "m-id").request


def refused(parse, body) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value


# ---- keep_alive ------------------------------------------------------------------

@pytest.mark.parametrize("value,seconds", [
    (None, None), (0, 0.0), ("0", 0.0), (300, 300.0), (2.5, 2.5), ("300", 300.0),
    ("5m", 300.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("300ms", 0.3), ("10s", 10.0),
    ("-1", math.inf), (-1, math.inf), ("-1s", math.inf), ("-5m", math.inf), ("0s", 0.0),
    (1e308, math.inf), ("99999999999h", math.inf),
])
def test_keep_alive_values(value, seconds):
    assert protocol.keep_alive({"keep_alive": value}) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m5", "", "1d", [5], {"m": 5}, True,
                                   "nan", "inf", "-inf"])
def test_keep_alive_nonsense_is_a_400(value):
    error = refused(protocol.keep_alive, {"keep_alive": value})
    assert error.param == "keep_alive"


# ---- names ---------------------------------------------------------------------------

def test_name_candidates_and_tags():
    assert protocol.name_candidates("qwen3") == ["qwen3"]
    assert protocol.name_candidates("qwen3:latest") == ["qwen3:latest", "qwen3"]
    assert protocol.name_candidates("qwen3:1.7b") == ["qwen3:1.7b", "qwen3-1.7b"]
    assert protocol.tagged("smollm2-135m-instruct") == "smollm2-135m-instruct:latest"


@pytest.mark.parametrize("body", [{}, {"model": ""}, {"model": 7}, {"model": "   "}])
def test_model_is_required(body):
    assert refused(protocol.model_name, body).param == "model"


# ---- chat -------------------------------------------------------------------------------

def test_chat_defaults_stream_and_maps_options():
    req = chat(options={"num_predict": 64, "temperature": 0.3, "top_p": 0.5, "top_k": 7,
                        "repeat_penalty": 1.2, "seed": 42, "stop": ["\n\n"], "num_ctx": 1024,
                        "mirostat": 2, "num_gpu": 99})
    assert isinstance(req, ChatRequest) and req.model == "m-id" and req.stream is True
    assert req.max_tokens == 64 and req.stop == ("\n\n",) and req.context_length == 1024
    assert req.sampling.given() == {"temperature": 0.3, "top_p": 0.5, "top_k": 7,
                                    "repeat_penalty": 1.2, "seed": 42}


@pytest.mark.parametrize("predict", [-1, -2, 0])
def test_num_predict_without_a_limit_is_the_servers_budget(predict):
    assert chat(options={"num_predict": predict}).max_tokens is None


@pytest.mark.parametrize("options,param", [
    ({"temperature": "hot"}, "options.temperature"), ({"top_p": 2}, "options.top_p"),
    ({"num_predict": 1.5}, "options.num_predict"), ({"num_ctx": 0}, "options.num_ctx"),
    ({"stop": "x" and 5}, "options.stop"), ({"top_k": -1}, "options.top_k"),
    ({"temperature": float("nan")}, "options.temperature"),
])
def test_bad_options_are_400s_naming_the_option(options, param):
    error = refused(lambda b: protocol.parse_chat(b, "m"),
                    {"model": "m", "messages": [], "options": options})
    assert error.param == param


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (None, None), ("low", True), ("high", True), ("MEDIUM", True),
])
def test_think(value, expected):
    assert chat(think=value).thinking is expected


@pytest.mark.parametrize("value", ["max", 1, ["low"]])
def test_bad_think_is_a_400(value):
    assert refused(lambda b: protocol.parse_chat(b, "m"),
                   {"model": "m", "messages": [{"role": "user", "content": "x"}],
                    "think": value}).param == "think"


def test_format_json_and_schema():
    assert chat().response_format.kind == "text"
    assert chat(format="").response_format.kind == "text"
    assert chat(format="json").response_format.kind == "json_object"
    fmt = chat(format={"type": "object"}).response_format
    assert (fmt.kind, fmt.schema, fmt.source) == ("json_schema", {"type": "object"}, "format")
    error = refused(lambda b: protocol.parse_chat(b, "m"),
                    {"model": "m", "messages": [{"role": "user", "content": "x"}],
                     "format": "yaml"})
    assert error.param == "format"


def test_messages_with_images_tool_calls_and_tool_results():
    req = chat(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is this?", "images": [PNG, JPEG]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "look", "arguments": {"at": "it", "n": 2}}},
            {"function": {"name": "zoom", "arguments": {}}}]},
        {"role": "tool", "content": "{\"seen\": true}"},
        {"role": "tool", "content": "zoomed", "tool_name": "zoom"},
    ])
    system, user, assistant, first, second = req.messages
    assert user.text == "what is this?"
    assert [i.url.split(";")[0] for i in user.images] == ["data:image/png", "data:image/jpeg"]
    assert isinstance(user.images[0], ImagePart) and user.images[0].url.endswith(PNG)
    assert [(c.name, json.loads(c.arguments)) for c in assistant.tool_calls] == \
        [("look", {"at": "it", "n": 2}), ("zoom", {})]
    assert assistant.text == ""
    assert (first.role, first.name, second.name) == ("tool", "look", "zoom")


def test_an_image_given_as_a_data_url_is_kept_whatever_the_schemes_case():
    for url in (f"data:image/png;base64,{PNG}", f"DATA:image/png;base64,{PNG}"):
        (image,) = chat(messages=[{"role": "user", "content": "x", "images": [url]}]
                        ).messages[0].images
        assert image.url == url


@pytest.mark.parametrize("message,param", [
    ({"role": "robot", "content": "x"}, "messages[0].role"),
    ({"role": "user", "content": 5}, "messages[0].content"),
    ({"role": "user", "content": "x", "images": ["not base64!"]}, "messages[0].images[0]"),
    ({"role": "user", "content": "x", "images": "abc"}, "messages[0].images"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]},
     "messages[0].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": {"function": {}}}, "messages[0].tool_calls"),
])
def test_bad_messages_are_400s(message, param):
    error = refused(lambda b: protocol.parse_chat(b, "m"), {"model": "m", "messages": [message]})
    assert error.param == param


def test_empty_messages_mean_load_or_unload():
    call = protocol.parse_chat({"model": "m:latest", "messages": [], "keep_alive": 0}, "m")
    assert (call.name, call.request, call.keep_alive) == ("m:latest", None, 0.0)
    assert protocol.parse_chat({"model": "m"}, "m").request is None


def test_tools_are_parsed_like_openais():
    req = chat(tools=[{"type": "function", "function": {
        "name": "HassTurnOn", "description": "Turns on",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}}}}])
    assert req.tools.names == ("HassTurnOn",)


# ---- generate -----------------------------------------------------------------------------

def test_generate_prompt_system_images_and_raw():
    call = protocol.parse_generate({"model": "m", "prompt": "hi", "system": "sys",
                                    "images": [PNG], "stream": False}, "m")
    req = call.request
    assert isinstance(req, ChatRequest) and not req.stream
    assert [(m.role, m.text) for m in req.messages] == [("system", "sys"), ("user", "hi")]
    assert len(req.messages[1].images) == 1
    raw = protocol.parse_generate({"model": "m", "prompt": "[INST] hi [/INST]", "raw": True},
                                  "m").request
    assert isinstance(raw, CompletionRequest) and raw.prompt == "[INST] hi [/INST]"


def test_generate_empty_prompt_loads_and_suffix_is_refused():
    assert protocol.parse_generate({"model": "m"}, "m").request is None
    assert refused(lambda b: protocol.parse_generate(b, "m"),
                   {"model": "m", "prompt": "def f(", "suffix": "return x"}).param == "suffix"
    assert refused(lambda b: protocol.parse_generate(b, "m"),
                   {"model": "m", "prompt": "x", "raw": True, "images": [PNG]}).param == "images"


def test_generate_context_is_ignored_but_must_be_token_ids():
    # The deprecated `context` (token ids of an earlier answer) is accepted and ignored,
    # as README says; a value of another type is a named 400, not silently dropped.
    call = protocol.parse_generate({"model": "m", "prompt": "hi", "context": [1, 2, 3]}, "m")
    assert [m.text for m in call.request.messages] == ["hi"]
    for value in ("x", [1, "2"], {"a": 1}, [True]):
        assert refused(lambda b: protocol.parse_generate(b, "m"),
                       {"model": "m", "prompt": "hi", "context": value}).param == "context"


# ---- the answer ---------------------------------------------------------------------------

def events(usage=pipeline.Usage(12, 3, 40.0, 60.0, 500.0), reason="stop", error=None):
    return [pipeline.ReasoningDelta("hmm"), pipeline.FLUSH, pipeline.ContentDelta("Hel"),
            pipeline.ContentDelta("lo"),
            pipeline.ToolCallDelta([{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "f", "arguments": ""}}]),
            pipeline.ToolCallDelta([{"index": 0, "function": {"arguments": '{"a": 1}'}}]),
            pipeline.Finished(reason, error), pipeline.UsageReport(usage)]


def test_stream_lines_then_tool_calls_then_final_statistics():
    lines = [line for line in render_ndjson(iter(events()), OllamaAnswer("m:latest", "chat", 0.0))
             if line]
    objects = [json.loads(line) for line in lines]
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    assert objects[0]["message"] == {"role": "assistant", "content": "", "thinking": "hmm"}
    assert [o["message"]["content"] for o in objects[1:3]] == ["Hel", "lo"]
    assert objects[3]["message"]["tool_calls"] == [
        {"id": "call_1", "function": {"index": 0, "name": "f", "arguments": {"a": 1}}}]
    final = objects[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert (final["prompt_eval_count"], final["eval_count"]) == (12, 3)
    assert (final["prompt_eval_duration"], final["eval_duration"]) == (40_000_000, 60_000_000)
    assert final["load_duration"] == 500_000_000
    assert all(not o["done"] for o in objects[:-1])
    assert {o["model"] for o in objects} == {"m:latest"}


def test_generate_body_and_refusal():
    answer = OllamaAnswer("m", "generate", 0.0)
    body = body_of(collect(iter(events())), answer)
    assert body["response"] == "Hello" and body["thinking"] == "hmm" and body["done"]
    refused_body = body_of(collect(iter(events(reason="error", error="no JSON"))), answer)
    assert refused_body["done_reason"] == "error" and refused_body["error"] == "no JSON"
    assert refused_body["response"] == ""


def test_failure_mid_stream_is_an_error_line():
    stream = [pipeline.ContentDelta("a"), pipeline.Failure("runtime died")]
    lines = [line for line in render_ndjson(iter(stream), OllamaAnswer("m", "chat", 0.0)) if line]
    assert json.loads(lines[-1]) == {"error": "runtime died"}


def test_show_capabilities_of_an_embedding_model_are_ollamas():
    def info(*caps):
        return ModelInfo(id="m", path="m.gguf", folder=".", device="cpu", context_length=512,
                         capabilities=caps, aliases=(), family="")
    assert models.capabilities(info("embedding")) == ["embedding"]
    assert models.capabilities(info("thinking", "vision")) == ["completion", "tools",
                                                                "thinking", "vision"]

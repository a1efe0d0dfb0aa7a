"""tools.py: tool requests, the tools prompt, and streaming tool-call parsing."""
import json

import pytest

from rkllm_api.errors import RequestError
from rkllm_api.openai.protocol import parse_tool_request
from rkllm_api.request import ToolCall, ToolSpec
from rkllm_api.text.tools import (ToolCallParser, ToolEvent, canonical_tool_calls,
                                  render_tool_calls_for_history, render_tool_result,
                                  render_tools_prompt)


def typed_calls(calls: list) -> tuple:
    """OpenAI-shaped calls (what the parser reports) as request.ToolCalls."""
    return tuple(ToolCall(c["function"]["name"], c["function"].get("arguments", ""),
                          c.get("id", "")) for c in calls)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

# Home Assistant's Extended OpenAI Conversation offers this function.
EXECUTE_SERVICES = {
    "name": "execute_services",
    "description": "Use this function to execute service of devices in Home Assistant.",
    "parameters": {"type": "object", "properties": {"list": {"type": "array", "items": {
        "type": "object", "properties": {
            "domain": {"type": "string", "description": "The domain of the service"},
            "service": {"type": "string", "description": "The service to be called"},
            "service_data": {"type": "object", "properties": {
                "entity_id": {"type": "array", "items": {"type": "string"}}},
                "required": ["entity_id"]}},
        "required": ["domain", "service", "service_data"]}}}}}
HA_ARGUMENTS = {"list": [{"domain": "light", "service": "turn_on",
                          "service_data": {"entity_id": "light.kitchen"}}]}


def spec_for(*tools, choice=None):
    body = {"tools": list(tools)}
    if choice is not None:
        body["tool_choice"] = choice
    return parse_tool_request(body)


def parse_stream(spec, chunks):
    parser = ToolCallParser(spec)
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.finish())
    content = "".join(e.text for e in events if e.kind == "content")
    return parser, events, content


def check_event_shape(parser, events):
    """Every call: one "call" event, then its arguments, matching parser.calls."""
    calls = parser.calls
    starts = [e for e in events if e.kind == "call"]
    assert [e.index for e in starts] == list(range(len(calls)))
    for start, call in zip(starts, calls):
        assert start.call_id == call["id"] and start.call_id.startswith("call_")
        assert start.name == call["function"]["name"]
        fragments = "".join(e.text for e in events if e.kind == "arguments" and e.index == start.index)
        assert fragments == call["function"]["arguments"]
        assert call["type"] == "function"
    assert len({c["id"] for c in calls}) == len(calls)


# -- parse_tool_request ---------------------------------------------------------

def test_no_tools_gives_none():
    assert parse_tool_request({"messages": []}) is None
    assert parse_tool_request({"tools": [], "tool_choice": "auto"}) is None


def test_tools_with_choices():
    spec = spec_for(WEATHER, TIME)
    assert spec.names == ("get_weather", "get_time")
    assert (spec.choice, spec.forced_name, spec.legacy, spec.parallel) == ("auto", None, False, True)
    assert spec.function("get_weather").parameters["required"] == ["city"]
    assert spec_for(WEATHER, choice="none").choice == "none"
    assert spec_for(WEATHER, choice="required").choice == "required"
    named = spec_for(WEATHER, TIME, choice={"type": "function", "function": {"name": "get_time"}})
    assert (named.choice, named.forced_name) == ("named", "get_time")
    assert parse_tool_request({"tools": [WEATHER], "parallel_tool_calls": False}).parallel is False


def test_legacy_functions():
    spec = parse_tool_request({"functions": [EXECUTE_SERVICES], "function_call": "auto"})
    assert (spec.legacy, spec.choice, spec.parallel) == (True, "auto", False)
    named = parse_tool_request({"functions": [EXECUTE_SERVICES],
                                "function_call": {"name": "execute_services"}})
    assert (named.choice, named.forced_name) == ("named", "execute_services")
    assert parse_tool_request({"functions": [EXECUTE_SERVICES], "function_call": "none"}).choice == "none"


@pytest.mark.parametrize("body,param", [
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, r"tools\[0\].type"),
    ({"tools": [{"type": "function"}]}, r"tools\[0\].function"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, r"tools\[0\].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": 5}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": {"name": "f"}}, "functions"),
    ({"functions": [{"description": "no name"}]}, r"functions\[0\].name"),
    ({"functions": [EXECUTE_SERVICES], "function_call": "required"}, "function_call"),
    ({"functions": [EXECUTE_SERVICES], "function_call": {"name": "other"}}, "function_call"),
    ({"tools": [WEATHER], "functions": [EXECUTE_SERVICES]}, "functions"),
])
def test_bad_requests_name_the_param(body, param):
    with pytest.raises(RequestError, match=param):
        parse_tool_request(body)


# -- prompt -------------------------------------------------------------------

def test_tools_prompt_lists_tools_as_json_lines():
    text = render_tools_prompt(spec_for(WEATHER, TIME))
    inside = text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["function"]["name"] for line in inside] == ["get_weather", "get_time"]
    assert "<tool_call>" in text and "</tool_call>" in text
    assert "only when it helps" in text


def test_tools_prompt_follows_the_choice():
    assert render_tools_prompt(spec_for(WEATHER, choice="none")) == ""
    assert render_tools_prompt(None) == ""
    assert "must call at least one" in render_tools_prompt(spec_for(WEATHER, choice="required"))
    named = render_tools_prompt(spec_for(WEATHER, TIME, choice={"type": "function",
                                                             "function": {"name": "get_time"}}))
    assert "must call the function get_time" in named
    assert "get_weather" not in named
    legacy = render_tools_prompt(parse_tool_request({"functions": [EXECUTE_SERVICES]}))
    assert "execute_services" in legacy and "at most one" in legacy


def test_history_rendering_round_trips_through_the_parser():
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]
    text = render_tool_calls_for_history(typed_calls(calls))
    assert text.count("<tool_call>") == 2
    parser, events, content = parse_stream(spec_for(WEATHER, TIME), [text])
    assert content == ""
    assert canonical_tool_calls(typed_calls(parser.calls)) == canonical_tool_calls(typed_calls(calls))


def test_tool_result_rendering():
    assert render_tool_result(' {"temp": 21}\n', "get_weather") == \
        '<tool_response>\n{"temp": 21}\n</tool_response>'


def test_canonical_calls_ignore_ids_and_key_order():
    a = (ToolCall("f", '{"b": 1, "a": [2]}', "call_x"),)
    b = (ToolCall("f", '{"a":[2],"b":1}', "call_y"),)
    assert canonical_tool_calls(a) == canonical_tool_calls(b)
    assert canonical_tool_calls(a) != canonical_tool_calls((ToolCall("f", '{"a": [3], "b": 1}'),))


# -- streaming parser -----------------------------------------------------------

TAGGED = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
          '</tool_call>')


@pytest.mark.parametrize("cut", range(len(TAGGED) + 1))
def test_tagged_call_split_at_every_position(cut):
    parser, events, content = parse_stream(spec_for(WEATHER), [TAGGED[:cut], TAGGED[cut:]])
    assert content == "Let me check.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parser.calls] == \
        [("get_weather", {"city": "Paris"})]
    check_event_shape(parser, events)
    kinds = [e.kind for e in events]
    assert kinds[-2:] == ["call", "arguments"]
    assert set(kinds[:-2]) == {"content"}


def test_tagged_call_one_char_at_a_time():
    parser, events, content = parse_stream(spec_for(WEATHER), list(TAGGED))
    assert content == "Let me check.\n"
    assert len(parser.calls) == 1
    check_event_shape(parser, events)


def test_text_streams_until_a_call_may_start():
    parser = ToolCallParser(spec_for(WEATHER))
    assert parser.feed("It is") == [ToolEvent("content", "It is")]
    assert parser.feed(" sunny <tool_") == [ToolEvent("content", " sunny ")]
    assert parser.feed("x> today") == [ToolEvent("content", "<tool_x> today")]


def test_several_calls_with_text_between():
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n\n')
    for cut in range(len(text) + 1):
        parser, events, content = parse_stream(spec_for(WEATHER, TIME), [text[:cut], text[cut:]])
        assert content == ""
        assert [c["function"]["name"] for c in parser.calls] == ["get_weather", "get_time"]
        check_event_shape(parser, events)


BARE_CASES = [
    ('{"name": "get_weather", "arguments": {"city": "Rome"}}', {"city": "Rome"}),
    ('  {"name": "get_weather", "parameters": {"city": "Rome"}}\n', {"city": "Rome"}),
    ('```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```', {"city": "Rome"}),
    ('```\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n```', {"city": "Rome"}),
    ('[{"name": "get_weather", "arguments": {"city": "Rome"}}]', {"city": "Rome"}),
    ('{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}',
     {"city": "Rome"}),
    ('{"name": "get_weather"}', {}),
]


@pytest.mark.parametrize("text,arguments", BARE_CASES)
def test_bare_json_calls(text, arguments):
    for chunks in ([text], list(text), [text[:5], text[5:]]):
        parser, events, content = parse_stream(spec_for(WEATHER), chunks)
        assert content == ""
        assert len(parser.calls) == 1
        assert json.loads(parser.calls[0]["function"]["arguments"]) == arguments
        check_event_shape(parser, events)


def test_string_arguments_inside_tags():
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}</tool_call>'
    parser, _, _ = parse_stream(spec_for(WEATHER), [text])
    assert json.loads(parser.calls[0]["function"]["arguments"]) == {"city": "Lima"}


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
    '<tool_call>not json at all</tool_call>',
    '<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>',
    '<tool_call>{"arguments": {"city": "Rome"}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": "not json"}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>',
    '<tool_call>["get_weather"]</tool_call>',
])
def test_malformed_or_unknown_calls_stay_content(text):
    for chunks in ([text], list(text)):
        parser, events, content = parse_stream(spec_for(WEATHER), chunks)
        assert parser.calls == []
        assert content == text


def test_json_answer_that_is_not_a_call_is_content():
    text = '{"answer": 42}'
    parser, events, content = parse_stream(spec_for(WEATHER), list(text))
    assert (parser.calls, content) == ([], text)
    code = "```python\nprint({'a': 1})\n```"
    parser = ToolCallParser(spec_for(WEATHER))
    streamed = parser.feed(code[:12])
    assert streamed == [ToolEvent("content", code[:12])]   # not held: the fence is not JSON


def test_unclosed_call_at_end_is_still_a_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Kyiv"}}\n'
    parser, _, content = parse_stream(spec_for(WEATHER), [text])
    assert content == "" and parser.calls[0]["function"]["name"] == "get_weather"
    parser, _, content = parse_stream(spec_for(WEATHER), ['<tool_call>{"name": "get_we'])
    assert parser.calls == [] and content == '<tool_call>{"name": "get_we'


def test_choice_none_parses_nothing():
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    parser = ToolCallParser(spec_for(WEATHER, choice="none"))
    assert parser.feed(text) == [ToolEvent("content", text)]
    assert parser.finish() == [] and parser.calls == []
    parser = ToolCallParser(None)
    assert parser.feed("<tool_") == [ToolEvent("content", "<tool_")]


def test_text_after_a_call_is_content_without_leading_space():
    text = TAGGED + "\n\nI will report back."
    parser, events, content = parse_stream(spec_for(WEATHER), list(text))
    assert content == "Let me check.\nI will report back."
    assert [e.kind for e in events][-1] == "content"


def test_one_call_only_when_parallel_is_off():
    spec = parse_tool_request({"tools": [WEATHER, TIME], "parallel_tool_calls": False})
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    parser, events, content = parse_stream(spec, [text])
    assert [c["function"]["name"] for c in parser.calls] == ["get_weather"]
    assert content == ""


def test_no_calls_means_empty_list_never_none():
    parser, _, content = parse_stream(spec_for(WEATHER), ["Just an answer."])
    assert parser.calls == [] and content == "Just an answer."


def test_calls_property_is_a_copy():
    parser, _, _ = parse_stream(spec_for(WEATHER), [TAGGED])
    parser.calls[0]["function"]["name"] = "changed"
    assert parser.calls[0]["function"]["name"] == "get_weather"


# -- Home Assistant (Extended OpenAI Conversation) ---------------------------------

HA_OUTPUTS = [
    '<tool_call>\n' + json.dumps({"name": "execute_services", "arguments": HA_ARGUMENTS}) + '\n</tool_call>',
    json.dumps({"name": "execute_services", "arguments": HA_ARGUMENTS}),
    "```json\n" + json.dumps({"name": "execute_services", "arguments": json.dumps(HA_ARGUMENTS)}) + "\n```",
]


@pytest.mark.parametrize("output", HA_OUTPUTS)
@pytest.mark.parametrize("mode", ["tools", "functions"])
def test_home_assistant_execute_services(output, mode):
    if mode == "tools":
        body = {"tools": [{"type": "function", "function": EXECUTE_SERVICES}], "tool_choice": "auto"}
    else:
        body = {"functions": [EXECUTE_SERVICES], "function_call": "auto"}
    spec = parse_tool_request(body)
    assert spec.legacy is (mode == "functions")
    assert "execute_services" in render_tools_prompt(spec)
    for chunks in ([output], list(output)):
        parser, events, content = parse_stream(spec, chunks)
        assert content == ""
        [call] = parser.calls
        assert call["function"]["name"] == "execute_services"
        assert json.loads(call["function"]["arguments"]) == HA_ARGUMENTS
        check_event_shape(parser, events)


def test_spec_lookup():
    spec = ToolSpec(functions=())
    assert spec.function("x") is None and spec.names == ()

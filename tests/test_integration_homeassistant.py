"""Home Assistant's Extended OpenAI Conversation against a live server: the
turn-on-the-light round trip in tools mode and in legacy functions mode.

On the librkllmrt double the model is scripted (`@@reply:...@@` in the user text)
to call `execute_services`, so the call must come back exactly; then the follow-up
carrying the service result gets a plain answer. On SmolLM2 the model runs free:
whatever it writes, the response must be well formed (a proper call or plain text,
never a broken one, never an empty tool_calls array). Requests are the integration's
own (tests/fixtures/homeassistant/)."""
import copy
import json

import pytest

from support.live_server import start_cpu_server, start_npu_server
from support.client_fixtures import HA, load

CHAT = "/v1/chat/completions"
MODEL = "qwen3-1.7b"        # the fixtures' model; by its name a thinking model
CPU_MODEL = "smollm2-135m-instruct"
SERVICES = {"list": [{"domain": "light", "service": "turn_on",
                      "service_data": {"entity_id": "light.living_room"}}]}
CALL_DIRECTIVE = ("@@reply:<tool_call>\n" + json.dumps(
    {"name": "execute_services", "arguments": SERVICES}) + "\n</tool_call>@@")
ANSWER = "The living room light is on now."
DOUBLE_MAX_TOKENS = 400


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, extra_models=(MODEL,))


def fixture(name, model=MODEL):
    body = copy.deepcopy(load(HA, name + ".json"))
    body["model"] = model
    return body


def scripted_request(name):
    """The fixture with the call scripted. The double spends one token per
    character, so the integration's 150-token limit would cut the call short."""
    body = fixture(name)
    body["max_tokens"] = DOUBLE_MAX_TOKENS
    body["messages"][-1]["content"] += " " + CALL_DIRECTIVE
    return body


def post(server, body, stream):
    """(message-like dict, finish_reason) from a JSON body or a folded stream."""
    if not stream:
        response = server.post(CHAT, json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["message"], choice["finish_reason"]
    response, payloads = server.stream_chat(body)
    assert response.status_code == 200 and payloads[-1] == "[DONE]"
    return fold_stream(payloads)


def fold_stream(payloads):
    message = {"content": "", "tool_calls": {}, "function_call": None}
    finish = None
    for payload in payloads[:-1]:
        if not payload["choices"]:
            continue
        choice = payload["choices"][0]
        delta = choice["delta"]
        message["content"] += delta.get("content") or ""
        if "tool_calls" in delta:
            assert delta["tool_calls"], "an empty tool_calls delta"
            for part in delta["tool_calls"]:
                entry = message["tool_calls"].setdefault(
                    part["index"], {"id": "", "function": {"name": "", "arguments": ""}})
                entry["id"] = part.get("id") or entry["id"]
                entry["function"]["name"] += part["function"].get("name") or ""
                entry["function"]["arguments"] += part["function"].get("arguments") or ""
        if "function_call" in delta:
            call = message["function_call"] or {"name": "", "arguments": ""}
            call["name"] += delta["function_call"].get("name") or ""
            call["arguments"] += delta["function_call"].get("arguments") or ""
            message["function_call"] = call
        finish = choice["finish_reason"] or finish
    message["tool_calls"] = [message["tool_calls"][i] for i in sorted(message["tool_calls"])]
    return message, finish


def tools_were_described(server):
    """Some run got the tool list. The system text (tools included) may be prefilled
    once into a system prompt cache and loaded later, so it is not always in the
    last run's prompt."""
    return any("<tools>" in run["prompt"] and "execute_services" in run["prompt"]
               for run in server.record.entries("run"))


# ---- tools mode, scripted -------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_tools_mode_round_trip(server, stream):
    message, finish = post(server, scripted_request("tools_mode"), stream)
    assert finish == "tool_calls"
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "execute_services" and call["id"]
    assert json.loads(call["function"]["arguments"]) == SERVICES
    assert not message.get("content")
    assert server.record.last("run")["enable_thinking"] is False
    assert tools_were_described(server)

    follow = fixture("tools_mode_tool_result")
    assistant, tool = follow["messages"][-2], follow["messages"][-1]
    assistant["tool_calls"] = [{"id": call["id"], "type": "function",
                                "function": call["function"]}]
    tool["tool_call_id"] = call["id"]
    tool["content"] += f" @@reply:{ANSWER}@@"
    message, finish = post(server, follow, stream)
    assert finish == "stop"
    assert message["content"] == ANSWER
    assert not message.get("tool_calls")
    if not stream:
        assert "tool_calls" not in message    # never an empty tool_calls array
    run = server.record.last("run")
    assert run["enable_thinking"] is False
    assert "[{'success': True}]" in run["prompt"]


# ---- legacy functions mode, scripted ----------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_functions_mode_round_trip(server, stream):
    message, finish = post(server, scripted_request("functions_mode"), stream)
    assert finish == "function_call"
    assert not message.get("tool_calls")
    call = message["function_call"]
    assert call["name"] == "execute_services"
    assert json.loads(call["arguments"]) == SERVICES
    assert server.record.last("run")["enable_thinking"] is False

    # Extended OpenAI Conversation 1.0.6 sends no assistant function_call message
    # before the function result (the fixture is that request).
    follow = fixture("functions_mode_function_result")
    assert [m["role"] for m in follow["messages"]] == ["system", "user", "function"]
    follow["messages"][-1]["content"] += f" @@reply:{ANSWER}@@"
    message, finish = post(server, follow, stream)
    assert finish == "stop" and message["content"] == ANSWER
    assert not message.get("function_call") and not message.get("tool_calls")


def test_json_reply_shapes_match_openai(server):
    """Tools mode: no function_call key, content null; legacy: no tool_calls key."""
    tools = server.post(CHAT, json=scripted_request("tools_mode")).json()
    message = tools["choices"][0]["message"]
    assert message["content"] is None and "function_call" not in message
    legacy = server.post(CHAT, json=scripted_request("functions_mode")).json()
    message = legacy["choices"][0]["message"]
    assert message["content"] is None and "tool_calls" not in message


@pytest.mark.parametrize("name", ["state_question_no_functions", "early_yaml_prompt"])
def test_other_home_assistant_prompts_run_without_thinking(server, name):
    body = fixture(name)
    body["messages"][-1]["content"] += " @@reply:It is 18.5 degrees outside.@@"
    reply = server.post(CHAT, json=body).json()
    assert reply["choices"][0]["message"]["content"] == "It is 18.5 degrees outside."
    assert server.record.last("run")["enable_thinking"] is False


def test_plain_chat_on_the_same_model_still_thinks(server):
    """The switch is Home Assistant's, not the model's."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    server.post(CHAT, json=body).raise_for_status()
    assert server.record.last("run")["enable_thinking"] is True


# ---- SmolLM2 free-running -----------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_server(live_servers):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return start_cpu_server(live_servers)


def check_well_formed(message, finish, legacy):
    """Either a proper call of the offered function or a plain-text answer."""
    assert finish in ("stop", "length", "tool_calls", "function_call")
    calls = message.get("tool_calls")
    if finish == "tool_calls":
        assert not legacy and calls
        for call in calls:
            assert call["function"]["name"] == "execute_services" and call["id"]
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
    elif finish == "function_call":
        assert legacy and not calls
        assert message["function_call"]["name"] == "execute_services"
        assert isinstance(json.loads(message["function_call"]["arguments"]), dict)
    else:
        assert not calls and not message.get("function_call")
        assert isinstance(message["content"], str)


@pytest.mark.parametrize("mode", ["tools_mode", "functions_mode"])
def test_smollm2_free_running_round_trip_is_well_formed(cpu_server, mode):
    legacy = mode == "functions_mode"
    body = fixture(mode, CPU_MODEL)
    body["max_tokens"] = 96
    for stream in (False, True):
        message, finish = post(cpu_server, body, stream)
        if not stream and "tool_calls" in message:
            assert message["tool_calls"], "an empty tool_calls array"
        check_well_formed(message, finish, legacy)
    follow = fixture("functions_mode_function_result" if legacy else "tools_mode_tool_result",
                     CPU_MODEL)
    follow["max_tokens"] = 64
    for stream in (False, True):
        message, finish = post(cpu_server, follow, stream)
        assert finish in ("stop", "length")
        assert isinstance(message["content"], str)
        assert not message.get("tool_calls") and not message.get("function_call")

"""Open WebUI 0.12.4 and Home Assistant (2026.2, ollama client) replayed against the
Ollama surface, in the exact request shapes their source sends
(tests/fixtures/openwebui-ollama, tests/fixtures/homeassistant-ollama), and read back
the way they read answers.

On the librkllmrt double the answers are scripted, so each shape is checked exactly.
With the bundled SmolLM2 running free (its own sampling, no script), Open WebUI's
background tasks that run on the model -- follow-ups, autocomplete, image prompt,
tool selection -- must come back as the JSON Open WebUI parses, every time, on the
Ollama and on the OpenAI surface."""
import copy
import json
import os
from datetime import datetime

import ollama
import pytest
import requests

from support.client_fixtures import FIXTURES, owui_body, owui_cut_json
from support.live_server import start_cpu_server, start_npu_server

OWUI = os.path.join(FIXTURES, "openwebui-ollama", "v0.12.4")
HA = os.path.join(FIXTURES, "homeassistant-ollama")
MODEL = "qwen3-1.7b"          # the fixtures' model: a thinking model by its name
SMOLLM = "smollm2-135m-instruct:latest"
MODEL_TASKS = ("follow_ups", "autocomplete", "image_prompt", "tool_selection")
INSTANT_TASKS = ("title", "tags", "queries")
SCRIPTED = {
    "follow_ups": '{"follow_ups": ["Who designed it?", "How tall is it?"]}',
    "autocomplete": '{"text": " Tower in Paris?"}',
    "image_prompt": '{"prompt": "A watercolour of the Eiffel Tower at dawn"}',
    "tool_selection": '{"tool_calls": [{"name": "get_current_weather", '
                      '"parameters": {"city": "Paris"}}]}',
}
FREE_RUNS = 2   # SmolLM2 answers each task this many times per surface


def load(folder, name):
    with open(os.path.join(folder, name + ".json"), encoding="utf-8") as handle:
        return json.load(handle)


def post(server, path, body, stream=False):
    return requests.post(server.url + path, data=json.dumps(body), stream=stream, timeout=120,
                         headers={"Content-Type": "application/json"})


def owui_reads(response_body) -> str:
    """Open WebUI's convert_response_ollama_to_openai: the content it then parses."""
    return response_body.get("message", {}).get("content", "")


def owui_reads_stream(response) -> tuple:
    """Open WebUI's convert_streaming_response_ollama_to_openai, folded: (content,
    finish_reason of the last chunk)."""
    content, finish = "", None
    for line in response.iter_lines():
        if not line:
            continue
        data = json.loads(line)
        content += (data.get("message") or {}).get("content") or ""
        if data.get("done"):
            finish = data.get("done_reason")
    return content, finish


def with_script(body, reply):
    """A model system prompt scripting the double, in front of the task prompt (Open
    WebUI puts a model's system prompt there)."""
    body = copy.deepcopy(body)
    first_user = next(i for i, m in enumerate(body["messages"]) if m["role"] == "user")
    body["messages"].insert(first_user, {"role": "system", "content": f"@@reply:{reply}@@"})
    return body


def check_task_answer(kind, content, offered=("get_current_weather",)):
    """What Open WebUI 0.12.4 does with the reply: cut from the first "{" to the last
    "}", json.loads, read its key; the value must be what it then uses."""
    value = owui_cut_json(content)
    if kind == "follow_ups":
        assert isinstance(value["follow_ups"], list) and value["follow_ups"]
        assert all(isinstance(s, str) and s for s in value["follow_ups"])
    elif kind == "autocomplete":
        assert isinstance(value["text"], str)
    elif kind == "image_prompt":
        assert isinstance(value["prompt"], str) and value["prompt"]
    elif kind == "tool_selection":
        assert isinstance(value["tool_calls"], list)
        for call in value["tool_calls"]:
            assert call["name"] in offered and isinstance(call["parameters"], dict)
    return value


# ---- the double: each shape, answered as scripted ------------------------------------

@pytest.fixture(scope="module")
def npu(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, extra_models=(MODEL,))


@pytest.mark.parametrize("kind", MODEL_TASKS)
def test_owui_model_tasks_come_back_as_the_json_it_parses(npu, kind):
    body = with_script(load(OWUI, kind), SCRIPTED[kind])
    runs = len(npu.record.entries("run"))
    response = post(npu, "/api/chat", body)
    assert response.status_code == 200, response.text
    assert check_task_answer(kind, owui_reads(response.json())) == json.loads(SCRIPTED[kind])
    run = npu.record.last("run")
    assert len(npu.record.entries("run")) == runs + 1
    assert run["enable_thinking"] in (0, False) and run["keep_history"] in (0, False)


@pytest.mark.parametrize("kind", INSTANT_TASKS)
def test_owui_instant_tasks_need_no_run(npu, kind):
    runs = len(npu.record.entries("run"))
    content = owui_reads(post(npu, "/api/chat", load(OWUI, kind)).json())
    assert owui_cut_json(content)[kind]
    assert len(npu.record.entries("run")) == runs


def test_owui_unscripted_task_answer_still_parses(npu):
    """The double's own sentence is no JSON: twice rejected, the task gets the
    answer Open WebUI parses as "nothing to suggest"."""
    runs = len(npu.record.entries("run"))
    content = owui_reads(post(npu, "/api/chat", load(OWUI, "follow_ups")).json())
    assert owui_cut_json(content) == {"follow_ups": []}
    assert len(npu.record.entries("run")) == runs + 2


def test_owui_emoji_stays_plain_text(npu):
    body = with_script(load(OWUI, "emoji"), "\U0001F5FC")
    assert owui_reads(post(npu, "/api/chat", body).json()) == "\U0001F5FC"
    assert "JSON" not in npu.record.last("run")["prompt"]


def test_owui_chat_stream(npu):
    body = load(OWUI, "chat_stream")
    body["messages"][-1]["content"] += " @@reply:324 metres.@@"
    response = post(npu, "/api/chat", body, stream=True)
    assert response.status_code == 200
    assert owui_reads_stream(response) == ("324 metres.", "stop")
    run = npu.record.last("run")
    assert run["enable_thinking"] in (0, False)        # "think": false
    assert run["sampling"]["temperature"] == pytest.approx(0.6)


def test_owui_image_to_a_model_without_vision(npu):
    response = post(npu, "/api/chat", load(OWUI, "chat_image"), stream=True)
    assert response.status_code == 400
    assert "does not accept images" in response.json()["error"]   # what Open WebUI shows


def test_owui_native_tool_result_reaches_the_model_by_call_id(npu):
    body = load(OWUI, "chat_native_tools")
    body["messages"].append({"role": "user",
                             "content": "@@reply:<think>It says 21.</think>21 and sunny.@@ thanks"})
    content, finish = owui_reads_stream(post(npu, "/api/chat", body, stream=True))
    assert (content, finish) == ("21 and sunny.", "stop")
    prompt = npu.record.last("run")["prompt"]
    assert "get_current_weather" in prompt and '"temperature": 21' in prompt


def test_owui_unload(npu):
    post(npu, "/api/chat", with_script(load(OWUI, "follow_ups"), SCRIPTED["follow_ups"]))
    answer = post(npu, "/api/generate", load(OWUI, "unload")).json()
    assert answer["done_reason"] == "unload"
    assert npu.get("/api/ps").json() == {"models": []}


def test_owui_listing_calls(npu):
    """get_all_models: /api/tags then /api/ps, expires_at parsed with fromisoformat."""
    post(npu, "/api/generate", {"model": f"{MODEL}:latest", "keep_alive": "5m"})
    tags = npu.get("/api/tags").json()["models"]
    assert f"{MODEL}:latest" in [m["model"] for m in tags]
    loaded = npu.get("/api/ps").json()["models"]
    expires = {m["model"]: m["expires_at"] for m in loaded}
    assert int(datetime.fromisoformat(expires[f"{MODEL}:latest"]).timestamp()) > 0


@pytest.fixture(scope="module")
def ha_client(npu):
    return ollama.Client(host=npu.url, timeout=60)


def ha_chat(client, body):
    """Home Assistant's call: client.chat(model, messages, tools, stream=True,
    keep_alive, options, think, format), read the way its _transform_stream reads."""
    stream = client.chat(model=body["model"], messages=body["messages"], tools=body.get("tools"),
                         stream=True, keep_alive=body["keep_alive"], options=body["options"],
                         think=body.get("think"), format=body.get("format"))
    content, calls = "", []
    for response in stream:
        message = response["message"]
        for call in message.get("tool_calls") or ():
            # HA's _parse_tool_args: arguments.items()
            calls.append((call["function"]["name"],
                          {k: v for k, v in call["function"]["arguments"].items()
                           if v is not None and v != ""}))
        content += message.get("content") or ""
    return content, calls


def test_ha_conversation_calls_a_tool_with_object_arguments(npu, ha_client):
    body = load(HA, "conversation_tools")
    body["messages"][-1]["content"] += (' @@reply:<tool_call>{"name": "HassTurnOn", "arguments": '
                                        '{"name": "Kitchen Light", "domain": ["light"]}}'
                                        '</tool_call>@@')
    content, calls = ha_chat(ha_client, body)
    assert calls == [("HassTurnOn", {"name": "Kitchen Light", "domain": ["light"]})]
    assert "<tool_call>" not in content
    run = npu.record.last("run")
    assert run["enable_thinking"] in (0, False)
    assert "HassTurnOn" in run["prompt"]
    (entry,) = [m for m in ha_client.ps().models if m.model == f"{MODEL}:latest"]
    assert entry.expires_at.year == 9999            # keep_alive "-1s": kept loaded


def test_ha_tool_result_turn(npu, ha_client):
    body = load(HA, "conversation_tool_result")
    body["messages"][1]["content"] += " @@reply:The kitchen light is on.@@"
    content, calls = ha_chat(ha_client, body)
    assert content == "The kitchen light is on." and calls == []
    assert '"action_done"' in npu.record.last("run")["prompt"]


def test_ha_ai_task_structured_answer_parses(npu, ha_client):
    body = load(HA, "ai_task_structured")
    body["messages"][-1]["content"] += ' @@reply:{"name": "Miso", "colour": "ginger"}@@'
    content, _ = ha_chat(ha_client, body)
    assert json.loads(content) == {"name": "Miso", "colour": "ginger"}   # HA's json_loads


def test_ha_ai_task_invalid_answer_raises_in_the_client(npu, ha_client):
    body = load(HA, "ai_task_structured")
    body["messages"][-1]["content"] += " @@reply:Miso is a nice name.@@"
    with pytest.raises(ollama.ResponseError) as refused:    # HA turns it into its error
        ha_chat(ha_client, body)
    assert "does not match the requested format" in refused.value.error


# ---- SmolLM2 running free: the tasks parse every time ------------------------------------

@pytest.fixture(scope="module")
def cpu(live_servers):
    return start_cpu_server(live_servers)


@pytest.mark.parametrize("kind", MODEL_TASKS)
def test_smollm2_task_answers_parse_on_the_ollama_surface(cpu, kind):
    body = {**load(OWUI, kind), "model": SMOLLM}
    for _ in range(FREE_RUNS):
        response = post(cpu, "/api/chat", body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["done_reason"] in ("stop", "length")
        check_task_answer(kind, owui_reads(answer))


@pytest.mark.parametrize("kind", MODEL_TASKS)
def test_smollm2_task_answers_parse_on_the_openai_surface(cpu, kind):
    body = {**owui_body("v0.12.4", kind), "model": SMOLLM.split(":")[0]}
    for _ in range(FREE_RUNS):
        response = requests.post(cpu.base_url + "/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        check_task_answer(kind, response.json()["choices"][0]["message"]["content"])


def test_smollm2_counts_and_durations_are_the_runtimes(cpu):
    response = post(cpu, "/api/generate", {"model": SMOLLM, "prompt": "Name a colour.",
                                           "stream": False, "options": {"num_predict": 8}})
    body = response.json()
    assert body["prompt_eval_count"] == int(response.headers["X-RKLLM-Prefill-Tokens"]) > 0
    assert 0 < body["eval_count"] <= 8
    assert body["prompt_eval_duration"] > 0 and body["eval_duration"] > 0
    assert (body["load_duration"] + body["prompt_eval_duration"] + body["eval_duration"]
            <= body["total_duration"])


def test_smollm2_format_schema_through_the_ollama_client(cpu):
    """Greedy (temperature 0): sampled, SmolLM2 sometimes loops inside a JSON string
    until the repetition guard stops it, and a JSON answer cut there is refused."""
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["city", "country"]}
    client = ollama.Client(host=cpu.url, timeout=120)
    greedy = {"temperature": 0}
    reply = client.generate(model=SMOLLM, prompt="Where is the Eiffel Tower?", format=schema,
                            stream=False, options=greedy)
    value = json.loads(reply.response)
    assert set(value) == {"city", "country"} and reply.done_reason == "stop"
    parts = list(client.chat(model=SMOLLM, format="json", stream=True, options=greedy,
                             messages=[{"role": "user", "content": "A dog, as JSON."}]))
    assert isinstance(json.loads("".join(p.message.content for p in parts)), dict)

"""Open WebUI's background tasks against a live server, for every release in
tests/fixtures/openwebui/, streaming and not, read back the way Open WebUI reads them.

Title, tags and queries get an instant answer: no model run at all (the double's
record shows none). The other tasks run on the model with thinking off, a small
token budget and without touching the conversation's KV cache; the double is
scripted through a model system prompt (`@@reply:...@@`), which Open WebUI puts in
front of task prompts when the model has one."""
import copy

import pytest

from rkllm_api.text import clients
from support.live_server import start_npu_server
from support.client_fixtures import (OWUI_CASES, SINGLE_TOOL_OBJECT, classify_body, owui_body,
                          owui_cut_json, owui_read_queries, owui_read_title)

CHAT = "/v1/chat/completions"
MODEL = "qwen3-1.7b"          # the fixtures' model; by its name a thinking model
DEFAULT_MAX_TOKENS = 2048     # Settings.default_max_tokens
INSTANT = ("title", "tags", "queries")
SCRIPTED = {
    "follow_ups": '{"follow_ups": ["Who designed it?", "How tall is it?"]}',
    "autocomplete": '{"text": " Tower in Paris?"}',
    "image_prompt": '{"prompt": "A watercolour of the Eiffel Tower at dawn"}',
    "emoji": "\U0001F5FC",
    "tool_selection": '{"tool_calls": [{"name": "get_current_weather", '
                      '"parameters": {"city": "Paris"}}]}',
    "title": '{"title": "Eiffel Tower"}',    # 32 tokens: one a character here
    "tags": '{"tags": ["Travel", "History"]}',
    "queries": '{"queries": ["Eiffel Tower construction year"]}',
}
SCRIPTED_OLD_TOOL = '{"name": "get_current_weather", "parameters": {"city": "Paris"}}'
TASK_CASES = [(v, n) for v, n in OWUI_CASES if n != "chat_rag"]


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, extra_models=(MODEL,))


@pytest.fixture(scope="module")
def server_without_shortcuts(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, extra_models=(MODEL,),
                            OWUI_SHORTCUT_TITLE="0", OWUI_SHORTCUT_TAGS="false",
                            OWUI_SHORTCUT_QUERIES="off")


def kind_of(version, name):
    return classify_body(owui_body(version, name)).kind


def ask(server, body, stream):
    """The reply content as Open WebUI would assemble it, after checking the wire."""
    if not stream:
        response = server.post(CHAT, json={**body, "stream": False})
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["object"] == "chat.completion" and reply["model"] == MODEL
        choice = reply["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        assert choice["message"]["role"] == "assistant"
        usage = reply["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        return choice["message"]["content"]
    response, payloads = server.stream_chat(
        {**body, "stream_options": {"include_usage": True}})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and "total_tokens" in chunks[-1]["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])


def owui_accepts(kind, content, version):
    """Open WebUI's own reading of a task reply must succeed and give a value."""
    if kind == "title":
        assert owui_read_title(content, version)
    elif kind == "queries":
        assert isinstance(owui_read_queries(content, version), list)
    elif kind == "emoji":
        assert content.strip()
    elif kind == "tool_selection" and version in SINGLE_TOOL_OBJECT:
        assert owui_cut_json(content)["name"] == "get_current_weather"
    elif kind == "tool_selection":
        (call,) = owui_cut_json(content)["tool_calls"]
        assert call["name"] == "get_current_weather" and call["parameters"]
    else:
        key = {"tags": "tags", "follow_ups": "follow_ups", "autocomplete": "text",
               "image_prompt": "prompt"}[kind]
        value = owui_cut_json(content)[key]
        assert value and isinstance(value, str if kind in ("autocomplete", "image_prompt")
                                    else list)


def with_model_system_prompt(body, reply):
    """The body with a model system prompt in front of the task prompt (after any
    system message the task itself has), scripting the double's reply."""
    body = copy.deepcopy(body)
    first_user = next(i for i, m in enumerate(body["messages"]) if m["role"] == "user")
    body["messages"].insert(first_user, {"role": "system",
                                         "content": f"You are terse. @@reply:{reply}@@"})
    return body


# ---- instant answers ------------------------------------------------------------

@pytest.mark.parametrize("version,name", [c for c in TASK_CASES if kind_of(*c) in INSTANT])
def test_instant_tasks_are_answered_without_the_model(server, version, name):
    body = owui_body(version, name)
    task = classify_body(body)
    expected = clients.instant_answer(task, None)
    runs_before = len(server.record.entries("run"))
    for stream in (False, True):
        content = ask(server, body, stream)
        assert content == expected
        owui_accepts(task.kind, content, version)
    assert len(server.record.entries("run")) == runs_before


def test_instant_answer_does_not_load_a_model(server):
    server.post("/v1/models/unload", json={}).raise_for_status()
    ask(server, owui_body("v0.12.4", "title"), stream=True)
    assert server.get("/health").json()["loaded_models"] == []


# ---- tasks the model answers ------------------------------------------------------

@pytest.mark.parametrize("version,name", [c for c in TASK_CASES if kind_of(*c) not in INSTANT])
def test_model_tasks_run_capped_without_thinking(server, version, name):
    body = owui_body(version, name)
    kind = classify_body(body).kind
    reply = SCRIPTED_OLD_TOOL if (kind == "tool_selection" and version in SINGLE_TOOL_OBJECT) \
        else SCRIPTED[kind]
    scripted = with_model_system_prompt(body, reply)
    assert classify_body(scripted).kind == kind     # still the same task
    budget = min(body.get("max_tokens") or DEFAULT_MAX_TOKENS, clients.task_budget(kind))
    for stream in (False, True):
        runs_before = len(server.record.entries("run"))
        content = ask(server, scripted, stream)
        runs = server.record.entries("run")
        assert len(runs) == runs_before + 1
        run = runs[-1]
        assert run["enable_thinking"] is False
        assert run["keep_history"] in (0, False)
        assert run["max_new_tokens"] == budget
        assert content == reply    # (emoji: 4 tokens asked, the emoji takes 2 here)
        owui_accepts(kind, content, version)


FALLBACKS = {"follow_ups": {"follow_ups": []}, "tool_selection": {"tool_calls": []},
             "image_prompt": {"prompt": "Draw a cat sleeping on a red velvet sofa in the "
                                        "afternoon sun"}}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_unscripted_model_answer_is_replaced_by_json_open_webui_parses(server, name):
    """The double's default sentence is no JSON: it is rejected, the task runs once
    more with the error, and when that is no JSON either the reply is the task's
    fallback, JSON Open WebUI parses, in a complete response."""
    for stream in (False, True):
        runs_before = len(server.record.entries("run"))
        content = ask(server, owui_body("v0.12.4", name), stream)
        assert owui_cut_json(content) == FALLBACKS[name]
        runs = server.record.entries("run")[runs_before:]
        assert len(runs) == 2 and "cannot be used" in runs[1]["prompt"]


def test_task_runs_alone_and_the_conversation_resumes(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about Paris."}]}
    first = server.post(CHAT, json=chat)
    first.raise_for_status()
    assert server.record.last("run")["keep_history"] in (1, True)
    kv = server.get("/health").json()["devices"]["npu"]["kv_cache"]
    assert kv["holds_conversation"] is True
    entries_before = len(server.record.entries())
    ask(server, with_model_system_prompt(owui_body("v0.12.4", "follow_ups"),
                                         SCRIPTED["follow_ups"]), stream=False)
    new = server.record.entries()[entries_before:]
    # The task must not see the chat held in the cache: cleared first, run unkept.
    assert [e["call"] for e in new] == ["clear_kv_cache", "run"]
    assert new[-1]["keep_history"] in (0, False)
    # The chat comes back from the snapshot its last kept run saved.
    answer = first.json()["choices"][0]["message"]["content"]
    chat["messages"] += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "And its museums?"}]
    again = server.post(CHAT, json=chat)
    again.raise_for_status()
    assert again.headers["X-RKLLM-KV"] == "resume"


# ---- shortcuts turned off ---------------------------------------------------------

@pytest.mark.parametrize("name", INSTANT)
def test_switched_off_shortcut_sends_the_task_to_the_model(server_without_shortcuts, name):
    server = server_without_shortcuts
    for version in ("v0.6.15", "v0.12.4"):
        body = owui_body(version, name)
        scripted = with_model_system_prompt(body, SCRIPTED[name])
        budget = min(body.get("max_tokens") or DEFAULT_MAX_TOKENS, clients.task_budget(name))
        for stream in (False, True):
            content = ask(server, scripted, stream)
            assert content == SCRIPTED[name]
            owui_accepts(name, content, version)
            run = server.record.last("run")
            assert run["enable_thinking"] is False and run["max_new_tokens"] == budget

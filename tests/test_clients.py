"""clients.py: recognising Open WebUI background tasks and Home Assistant, and the
instant answers, checked against request bodies shaped like the real clients'.

Fixtures under tests/fixtures/openwebui/v<version>/ are the chat-completion bodies
that Open WebUI of that release sends for each task (default templates filled in);
tests/fixtures/homeassistant/ holds Extended OpenAI Conversation bodies.
"""
import os

import pytest

from rkllm_api.config import Settings
from rkllm_api.openai.protocol import parse_tool_request
from rkllm_api.text import clients
from support.messages import typed
from support.client_fixtures import (EXPECTED_KIND, HA, OWUI_CASES, PLAIN_TEXT_TITLE,
                                     SINGLE_TOOL_OBJECT, classify_body, load, owui_body,
                                     owui_cut_json, owui_read_queries, owui_read_title)


def classify(messages, tools=None):
    return clients.classify(typed(messages), parse_tool_request({"tools": tools}))


def is_home_assistant(messages, tools=None, functions=None):
    spec = parse_tool_request({"tools": tools, "functions": functions})
    return clients.is_home_assistant(typed(messages), spec)


# --- fixtures ----------------------------------------------------------------------

def test_fixture_set_covers_three_version_families_and_every_task():
    versions = {v for v, _ in OWUI_CASES}
    assert {"v0.5.4", "v0.6.15", "v0.12.4"} <= versions
    kinds = {EXPECTED_KIND[n] for _, n in OWUI_CASES}
    assert set(clients.TASK_KINDS) <= kinds
    assert set(os.listdir(HA)) >= {"tools_mode.json", "functions_mode.json",
                                   "tools_mode_tool_result.json"}


@pytest.mark.parametrize("version,name", OWUI_CASES)
def test_every_openwebui_fixture_is_classified_right(version, name):
    task = classify_body(owui_body(version, name))
    assert task.kind == EXPECTED_KIND[name]
    assert task.home_assistant is False
    assert task.thinking_off is (task.kind is not None)


@pytest.mark.parametrize("version", sorted({v for v, _ in OWUI_CASES}))
def test_reply_format_follows_the_release(version):
    title = classify_body(owui_body(version, "title"))
    tools = classify_body(owui_body(version, "tool_selection"))
    if version in PLAIN_TEXT_TITLE:
        assert (title.reply_format, title.json_key) == ("text", "")
    else:
        assert (title.reply_format, title.json_key) == ("json", "title")
    assert tools.json_key == ("" if version in SINGLE_TOOL_OBJECT else "tool_calls")
    assert tools.question == "What's the weather like in Paris right now?"


@pytest.mark.parametrize("version", sorted({v for v, _ in OWUI_CASES}))
def test_history_is_parsed_out_of_the_template(version):
    task = classify_body(owui_body(version, "queries"))
    roles = [m["role"] for m in task.history]
    assert roles == ["user", "assistant", "user"]
    assert task.history[0]["content"] == "When was the Eiffel Tower built?"
    assert "**1889**" in task.history[1]["content"]
    assert task.question == "can you verify that?"


def test_autocomplete_type_and_text_are_the_real_ones_not_the_examples():
    for version in ("v0.5.4", "v0.6.15", "v0.12.4"):
        task = classify_body(owui_body(version, "autocomplete"))
        assert task.autocomplete_type == "General"
        assert task.autocomplete_text == "How tall is the Eiffel"


def test_emoji_task_carries_the_message():
    task = classify_body(owui_body("v0.12.4", "emoji"))
    assert task.question == "Wow, that is amazing news, thank you so much!"
    assert task.reply_format == "text"


# --- instant answers as Open WebUI reads them --------------------------------------

@pytest.mark.parametrize("version", sorted({v for v, _ in OWUI_CASES}))
def test_title_answer_parses_as_the_release_parses_it(version):
    answer = clients.instant_answer(classify_body(owui_body(version, "title")), Settings())
    assert owui_read_title(answer, version) == "When was the Eiffel Tower built"


@pytest.mark.parametrize("version", sorted({v for v, _ in OWUI_CASES}))
def test_tags_answer_parses(version):
    answer = clients.instant_answer(classify_body(owui_body(version, "tags")), Settings())
    assert owui_cut_json(answer)["tags"] == ["General"]


@pytest.mark.parametrize("version", sorted({v for v, _ in OWUI_CASES}))
def test_vague_follow_up_query_is_enriched_from_the_previous_answer(version):
    answer = clients.instant_answer(classify_body(owui_body(version, "queries")), Settings())
    for cut_from_last in (False, True):   # every release's cut gives the same list
        queries = owui_cut_json(answer, cut_from_last)["queries"]
        assert len(queries) == 1
    query = queries[0]
    assert "Eiffel Tower" in query and "1889" in query and "Gustave Eiffel" in query
    assert "verify that" not in query


@pytest.mark.parametrize("version", sorted({v for v, _ in OWUI_CASES}))
def test_plain_question_becomes_the_query(version):
    answer = clients.instant_answer(
        classify_body(owui_body(version, "queries_first_turn")), Settings())
    assert owui_read_queries(answer, version) == ["What are the health benefits of green tea?"]


def test_query_with_braces_survives_a_cut_from_the_last_brace():
    history = ({"role": "user", "content": "what does {x} mean in f-strings {y}?"},)
    answer = clients.instant_answer(clients.ClientTask(kind="queries", history=history))
    assert owui_read_queries(answer, "v0.12.4") == owui_read_queries(answer, "v0.6.15")
    assert "f-strings" in owui_read_queries(answer, "v0.12.4")[0]


def test_model_tasks_have_no_instant_answer_and_a_small_budget():
    for version, name in OWUI_CASES:
        task = classify_body(owui_body(version, name))
        if task.kind in ("follow_ups", "autocomplete", "emoji", "image_prompt", "tool_selection"):
            assert clients.instant_answer(task, Settings()) is None
    for kind in clients.TASK_KINDS:
        assert 0 < clients.task_budget(kind) <= 256
    assert clients.task_budget("emoji") <= 8
    assert clients.task_budget(None) == 0


# --- title, tags, query helpers ----------------------------------------------------

@pytest.mark.parametrize("text,title", [
    ("Hi! Can you explain quantum entanglement simply?", "Explain quantum entanglement simply"),
    ("hello, could you please help me write a cover letter for a nursing job",
     "Write a cover letter"),
    ("```python\nprint(1)\n```\nwhy does this print one", "Why does this print one"),
    ("Tell me about the history of the Roman empire and its fall", "The history of the Roman empire"),
    ("what is https://example.com/page about?", "What is about"),
    ("  ", ""),
])
def test_make_title(text, title):
    assert clients.make_title(text) == title
    assert len(clients.make_title(text).split()) <= clients.TITLE_MAX_WORDS


def test_title_with_quotes_is_valid_json_and_empty_chat_goes_to_the_model():
    history = ({"role": "user", "content": 'What does "carpe diem" mean?'},
               {"role": "assistant", "content": "Seize the day."})
    answer = clients.instant_answer(clients.ClientTask(kind="title", history=history))
    assert owui_read_title(answer, "v0.6.15") == 'What does "carpe diem" mean'
    empty = clients.ClientTask(kind="title", history=({"role": "user", "content": ""},))
    assert clients.instant_answer(empty) is None


def test_tags_name_a_domain_only_when_the_words_point_at_it():
    health = ({"role": "user", "content": "Is green tea good for my health? I want a better diet."},
              {"role": "assistant", "content": "Green tea has antioxidants and fits a balanced diet."})
    code = ({"role": "user", "content": "My python code throws a KeyError on a dict lookup"},)
    assert clients.guess_domain(health) == "Health"
    assert clients.guess_domain(code) == "Technology"
    assert clients.guess_domain(({"role": "user", "content": "hello there"},)) == "General"


@pytest.mark.parametrize("question,vague", [
    ("can you verify that?", True), ("tell me more", True), ("is it true?", True),
    ("why is the sky blue?", False), ("What is the capital of Australia?", False),
    ("explain how the attention mechanism works in transformer models in detail please", False),
])
def test_is_vague(question, vague):
    assert clients.is_vague(question) is vague


def test_answer_entities_order_and_dedup():
    answer = ('The **Eiffel Tower** stands in Paris. "Gustave Eiffel" built it; '
              "the Eiffel Tower hosted the Exposition Universelle.")
    assert clients.answer_entities(answer) == ["Eiffel Tower", "Gustave Eiffel",
                                               "Exposition Universelle"]


# --- near misses: ordinary chat is never a background task -------------------------

TITLE_TEMPLATE_PASTE = ("### Task:\nGenerate a concise title summarizing the chat history.\n"
                        'JSON format: { "title": "your concise title here" }\n'
                        "<chat_history>\nUSER: hi\nASSISTANT: hello\n</chat_history>")

NEAR_MISSES = [
    [{"role": "user", "content": "Generate a title for my essay about climate change"}],
    [{"role": "user", "content": "what tags should I use on my blog"}],
    [{"role": "user", "content": "write a SQL query that returns the top 5 customers"}],
    [{"role": "user", "content": "Suggest 3 follow-up questions I could ask my landlord"}],
    [{"role": "user", "content": 'Parse this: {"title": "Dune", "tags": ["scifi"], "queries": []}'}],
    [{"role": "user", "content": "### Task:\nSummarise this text in one line.\n\nThe cat sat."}],
    [{"role": "user", "content": "What is <chat_history> in this XML?\n<chat_history>\nUSER: hi\n"
                                 "</chat_history>"}],
    [{"role": "user", "content": 'Explain this log:\n<chat_history>\nUSER: give { "queries": ["a"] }'
                                 "\n</chat_history>"}],
    [{"role": "user", "content": "Which emoji fits a facial expression of surprise?"}],
    [{"role": "user", "content": "Available Tools: hammer, saw. Which do I need for a shelf?"}],
    # someone pastes a whole task template in the middle of a conversation
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": TITLE_TEMPLATE_PASTE}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Give me search queries to research solar panels"}],
]


@pytest.mark.parametrize("messages", NEAR_MISSES)
def test_near_misses_are_ordinary_chat(messages):
    task = classify(messages)
    assert task.kind is None
    assert task.thinking_off is False
    assert clients.instant_answer(task, Settings()) is None


def test_odd_but_valid_messages_are_ordinary_chat():
    for messages in ([{"role": "user", "content": ""}],
                     [{"role": "assistant", "content": None}],
                     [{"role": "user", "content": [{"type": "image_url",
                                                    "image_url": {"url": "data:,x"}}]}]):
        assert classify(messages).kind is None


# --- Home Assistant ----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(n[:-5] for n in os.listdir(HA) if n.endswith(".json")))
def test_home_assistant_fixtures_are_detected(name):
    body = load(HA, name + ".json")
    assert is_home_assistant(body["messages"], body.get("tools"), body.get("functions"))
    task = classify_body(body)
    assert task.home_assistant and task.thinking_off and task.kind is None


def test_home_assistant_by_function_alone_and_question():
    body = load(HA, "tools_mode.json")
    plain_system = [{"role": "system", "content": "You control my house."},
                    {"role": "user", "content": "lights off"}]
    assert is_home_assistant(plain_system, tools=body["tools"])
    assert is_home_assistant(plain_system, functions=load(HA, "functions_mode.json")["functions"])
    assert classify_body(body).question == "turn on the living room light"


@pytest.mark.parametrize("messages,tools", [
    ([{"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "I want you to act as smart home manager of Home Assistant. "
                                  "Available Devices: lamp. How do I write execute_services?"}], None),
    ([{"role": "user", "content": "How do I set up Home Assistant on a Raspberry Pi?"}], None),
    ([{"role": "system", "content": "Available devices: printer, scanner (office inventory)."},
      {"role": "user", "content": "which printer is free?"}], None),
    ([{"role": "user", "content": "weather in Paris?"}],
     [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]),
])
def test_not_home_assistant(messages, tools):
    assert is_home_assistant(messages, tools) is False
    assert classify(messages, tools).home_assistant is False


def test_openwebui_fixtures_are_not_home_assistant():
    for version, name in OWUI_CASES:
        body = owui_body(version, name)
        assert not is_home_assistant(body["messages"], body.get("tools"))


# --- settings switches -------------------------------------------------------------

def test_shortcut_settings_default_on_and_read_from_env():
    defaults = Settings.from_env({})
    assert (defaults.shortcut_title, defaults.shortcut_tags, defaults.shortcut_queries) == (True,) * 3
    off = Settings.from_env({"OWUI_SHORTCUT_TITLE": "0", "OWUI_SHORTCUT_TAGS": "false",
                             "OWUI_SHORTCUT_QUERIES": "off"})
    assert (off.shortcut_title, off.shortcut_tags, off.shortcut_queries) == (False,) * 3


@pytest.mark.parametrize("task_file,switch", [
    ("title", "shortcut_title"), ("tags", "shortcut_tags"), ("queries", "shortcut_queries")])
def test_each_switch_turns_its_shortcut_off(task_file, switch):
    task = classify_body(owui_body("v0.6.15", task_file))
    assert clients.instant_answer(task, Settings()) is not None
    assert clients.instant_answer(task, Settings().with_(**{switch: False})) is None
    others = {s: False for s in ("shortcut_title", "shortcut_tags", "shortcut_queries") if s != switch}
    assert clients.instant_answer(task, Settings().with_(**others)) is not None

"""Retrieved context (RAG) through a live server on the librkllmrt double: what the
runtime is given for an Open WebUI web search (the double's record holds the prompt),
the response cache, follow-ups that skip the sources, and the conversation's KV
state left alone. Requests are built as Open WebUI builds them (tests/test_rag.py
helpers, tests/fixtures/rag/, and every release's chat_rag fixture)."""
import copy
from datetime import date

import pytest

import rag
from support.client_fixtures import OWUI_CASES, owui_body
from support.live_server import start_npu_server
from support.messages import typed
from support.rag_requests import SYSTEM_PROMPT, fill, newer_context, owui_request, web_pages

CHAT = "/v1/chat/completions"
MODEL = "qwen3-1.7b"     # a thinking model by its name; 4096 tokens of context
QUESTION = "How tall is the Eiffel Tower?"
ANSWER = "It is 330 metres tall, antennas included [1]."
NOISE = ("cookies", "Sign in", "October 26, 2025", "HomeTravelGuides", "Car Rental",
         "Montmartre Walking Tour", "Subscribe to our newsletter", "Accept All")
FACTS = ("330 metres", "1889", "Gustave Eiffel")


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, extra_models=(MODEL,))


def web_search(question=QUESTION, history=(), answer=ANSWER, placement="user", quote='"'):
    """Open WebUI's request for a web-search turn; the model system prompt scripts
    the double's answer."""
    filled = fill("template_newer.txt", newer_context(web_pages(), quote), question)
    messages = owui_request(filled, question, placement, history,
                            system=f"{SYSTEM_PROMPT} @@reply:{answer}@@")
    return {"model": MODEL, "messages": messages}


def reply_content(server, body, stream=False):
    if stream:
        response, payloads = server.stream_chat(body)
        assert response.status_code == 200 and payloads[-1] == "[DONE]"
        assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
        return "".join(p["choices"][0]["delta"].get("content") or ""
                       for p in payloads[:-1] if p["choices"])
    response = server.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_web_search_reaches_the_model_cleaned_and_scored(server):
    body = web_search(question="How tall is the Eiffel Tower today?")
    assert reply_content(server, body) == ANSWER
    run = server.record.last("run")
    prompt = run["prompt"]
    for noise in NOISE:
        assert noise not in prompt
    for fact in FACTS:
        assert fact in prompt
    assert rag.date_anchor(date.today()) in prompt
    assert "croissant" not in prompt.lower()      # the unrelated result scored out
    assert "<source" not in prompt and "### Task:" not in prompt   # the template is gone
    assert prompt.rstrip().endswith("like [1].")  # the question comes last
    assert run["keep_history"] in (0, False)      # a standalone turn
    assert run["enable_thinking"] is False        # small context: no reasoning


@pytest.mark.parametrize("placement", ["user", "system"])
def test_repeated_question_is_served_from_the_cache(server, placement):
    question = f"When was the Eiffel Tower built? ({placement})"
    body = web_search(question=question, placement=placement)
    first = reply_content(server, body)
    runs = len(server.record.entries("run"))
    again = copy.deepcopy(body)
    again["messages"][-1]["content"] = again["messages"][-1]["content"].replace(
        question, "  when was the EIFFEL tower built? " + f"({placement})")
    assert reply_content(server, again, stream=True) == first
    assert reply_content(server, body, stream=False) == first
    assert len(server.record.entries("run")) == runs      # no second run


def test_single_quoted_sources_take_the_rag_path_and_its_cache(server):
    question = "How tall is the Eiffel Tower in single quotes?"
    body = web_search(question=question, quote="'")
    assert reply_content(server, body) == ANSWER
    prompt = server.record.last("run")["prompt"]
    assert "<source" not in prompt and "Sign in" not in prompt   # cleaned like "1"
    assert "330 metres" in prompt
    runs = len(server.record.entries("run"))
    assert reply_content(server, body, stream=True) == ANSWER
    assert len(server.record.entries("run")) == runs      # served from the cache


def test_cached_answer_keeps_the_reply_shape(server):
    body = web_search(question="Who designed the Eiffel Tower?")
    body["stream_options"] = {"include_usage": True}
    reply_content(server, body)
    response, payloads = server.stream_chat(body)
    chunks = payloads[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] >= 0
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    full = server.post(CHAT, json=body).json()
    assert full["choices"][0]["finish_reason"] == "stop" and full["usage"]


def test_a_conversational_follow_up_skips_the_sources(server):
    history = [{"role": "user", "content": QUESTION},
               {"role": "assistant", "content": ANSWER}]
    body = web_search(question="thanks!", history=history, answer="You're welcome!")
    message = server.post(CHAT, json=body).json()["choices"][0]["message"]
    # An ordinary turn of a thinking model; the double never closes </think>, so its
    # words are the answer (thinking never eats it).
    assert message["content"] == "You're welcome!" and not message.get("reasoning_content")
    run = server.record.last("run")
    assert "Champ de Mars" not in run["prompt"] and "Reference text" not in run["prompt"]
    assert "<source" not in run["prompt"] and "thanks!" in run["prompt"]
    assert run["keep_history"] in (1, True)       # an ordinary conversation turn
    assert run["enable_thinking"] is True         # RAG's switch does not apply


def test_rag_turn_runs_alone_and_the_conversation_resumes(server):
    chat = {"model": MODEL, "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                         {"role": "user", "content": "Hello there!"}]}
    first = server.post(CHAT, json=chat)
    first.raise_for_status()
    before = server.get("/health").json()["devices"]["npu"]["kv_cache"]
    assert before["holds_conversation"] is True
    entries = len(server.record.entries())
    reply_content(server, web_search(question="How much does the Eiffel Tower weigh?"))
    new = server.record.entries()[entries:]
    # The sources are answered on an empty cache, not on top of the chat.
    assert [e["call"] for e in new] == ["clear_kv_cache", "run"]
    assert new[-1]["keep_history"] in (0, False)
    chat["messages"] += [{"role": "assistant",
                          "content": first.json()["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "How are you?"}]
    again = server.post(CHAT, json=chat)
    again.raise_for_status()
    assert again.headers["X-RKLLM-KV"] == "resume"


@pytest.mark.parametrize("version", sorted({v for v, n in OWUI_CASES if n == "chat_rag"}))
def test_every_release_chat_rag_request_runs_the_cleaned_turn(server, version):
    body = owui_body(version, "chat_rag")
    plan = rag.plan_turn(typed(body["messages"]), context_length=4096, today=date.today())
    assert plan is not None and plan.use_sources
    response, payloads = server.stream_chat(body)
    assert response.status_code == 200 and payloads[-1] == "[DONE]"
    run = server.record.last("run")
    assert run["keep_history"] in (0, False) and run["enable_thinking"] is False
    assert rag.date_anchor(date.today()) in run["prompt"]
    assert plan.rag.question in run["prompt"]
    assert "<source" not in run["prompt"]


@pytest.fixture(scope="module")
def server_without_cache(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, extra_models=(MODEL,),
                            RAG_CACHE_TTL="0")


def test_cache_can_be_turned_off(server_without_cache):
    server = server_without_cache
    body = web_search()
    reply_content(server, body)
    runs = len(server.record.entries("run"))
    reply_content(server, body)
    assert len(server.record.entries("run")) == runs + 1

"""Continuing a final assistant message (an assistant prefill).

A conversation whose last message is the assistant's is a partial answer to
continue: Ollama's /api/chat renders it as the open last turn (template/template.go
cuts the template after .Response), llama.cpp's server does on its OpenAI endpoint
(prefill_assistant, on by default), and Open WebUI's "Continue Response" sends the
partial last and appends what comes back. Where the server renders the turns itself
(SmolLM2 on the CPU; the NPU with the model's tokenizer) the prompt is the whole
conversation rendered without the generation prompt and cut right after the partial.
"""
import os

import pytest

from rkllm_api.runtimes.base import EventKind, RunRequest, SamplingParams
from rkllm_api.text import prompts
from support.live_server import NPU_MODEL_ID, start_npu_server
from support.messages import typed
from support.tokenizer_files import encode, write_tokenizer

GREEDY = SamplingParams(temperature=0.0)
QUESTION = "What is the capital of France?"
PARTIAL = "The capital of France is"


def continued(messages, partial=PARTIAL):
    return list(messages) + [{"role": "assistant", "content": partial}]


def does_not_restart(text: str) -> bool:
    """The continuation goes on from the partial: it does not begin the answer again
    (SmolLM2 answering anew writes "The capital of France is Paris.") nor greet."""
    head = text.strip().lower()
    return bool(head) and not head.startswith(("the capital", "hello", "hi", "i'm", "i am"))


# ---- the prompt builder --------------------------------------------------------------

def test_a_final_assistant_message_is_the_open_last_turn_uncapped():
    builder = prompts.PromptBuilder()
    long_partial = "word " * 2000 + "and so"
    built = builder.build_chat(typed(continued([{"role": "user", "content": "q"}],
                                               long_partial)), context_length=32768)
    assert built.continues and built.turns[-1] == ("assistant", long_partial)
    # the KV key after the answer extends the partial (what the client sends next)
    after = built.key_after_answer(" on.")
    echoed = builder.build_chat(typed(continued([{"role": "user", "content": "q"}],
                                                long_partial + " on.")
                                      + [{"role": "user", "content": "next"}]),
                                context_length=32768)
    assert echoed.history_key == after


@pytest.mark.parametrize("last", [
    {"role": "assistant", "content": ""},
    {"role": "assistant", "content": None},
    {"role": "assistant", "content": "<think>\nhmm\n</think>\n"},   # reasoning only
])
def test_an_empty_final_assistant_message_is_a_new_answer(last):
    builder = prompts.PromptBuilder()
    plain = builder.build_chat(typed([{"role": "user", "content": "q"}]), context_length=4096)
    built = builder.build_chat(typed([{"role": "user", "content": "q"}, last]),
                               context_length=4096)
    assert not built.continues
    assert (built.turns, built.full_key) == (plain.turns, plain.full_key)


def test_a_final_assistant_message_with_tool_calls_is_followed_by_a_new_answer():
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}
    built = prompts.PromptBuilder().build_chat(typed([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call]}]),
        context_length=4096)
    assert not built.continues and built.turns[-1][0] == "assistant"


def test_a_partial_cut_inside_a_think_block_continues_the_reasoning():
    built = prompts.PromptBuilder().build_chat(typed(continued(
        [{"role": "user", "content": "q"}], "<think>\nFirst, the")), context_length=4096)
    assert built.continues and built.continues_thinking
    assert built.turns[-1] == ("assistant", "<think>\nFirst, the")
    done = prompts.PromptBuilder().build_chat(typed(continued(
        [{"role": "user", "content": "q"}], "<think>\nok\n</think>\n\nThe answer is")),
        context_length=4096)
    assert done.continues and not done.continues_thinking
    assert done.turns[-1] == ("assistant", "The answer is")


# ---- CPU: SmolLM2 ----------------------------------------------------------------------

def run_turns(runtime, messages, continue_final, max_new_tokens=6):
    texts = []
    result = runtime.run(RunRequest(prompt="", messages=tuple(messages), keep_history=True,
                                    max_new_tokens=max_new_tokens, sampling=GREEDY,
                                    continue_final=continue_final),
                         lambda event: texts.append(event.text)
                         if event.kind is EventKind.TEXT else None)
    assert result.error is None, result.error
    return result, "".join(texts)


def test_cpu_prompt_is_llama_cpp_pythons_rendering_cut_after_the_partial(cpu_runtime):
    """The tokens are llama-cpp-python's own formatter's rendering of the whole
    conversation (no generation prompt) cut right after the partial; the answer
    continues it, and only the partial is prefilled on top of the question's turn."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    llama = cpu_runtime._llama
    eos = llama._model.token_get_text(int(llama.metadata["tokenizer.ggml.eos_token_id"]))
    own = Jinja2ChatFormatter(llama.metadata["tokenizer.chat_template"], eos_token=eos,
                              bos_token="", add_generation_prompt=False)
    pairs = [("user", QUESTION), ("assistant", PARTIAL)]
    text = own(messages=[{"role": r, "content": c} for r, c in pairs]).prompt
    cut = text[:text.rindex(PARTIAL) + len(PARTIAL)]
    assert len(cut) < len(text)    # the end of the turn is gone
    expected = llama.tokenize(cut.encode(), add_bos=False, special=True)
    assert cpu_runtime.conversation_tokens(pairs, False, True) == expected

    question, _ = run_turns(cpu_runtime, pairs[:1], False)
    result, answer = run_turns(cpu_runtime, pairs, True)
    assert result.prompt_tokens == len(expected)
    # the question's prompt ends with the open assistant turn: kept, only the partial new
    assert result.perf.prefill_tokens == len(expected) - question.prompt_tokens
    assert does_not_restart(answer) and "paris" in answer.lower(), answer
    # the same messages as a new turn: SmolLM2 starts its answer over
    _, anew = run_turns(cpu_runtime, pairs, False)
    assert not does_not_restart(anew), anew


def test_cpu_live_openai_and_ollama_continue_the_partial(cpu_server):
    model = cpu_server.get("/v1/models").json()["data"][0]["id"]
    messages = continued([{"role": "user", "content": QUESTION}])
    response = cpu_server.post("/v1/chat/completions", json={
        "model": model, "messages": messages, "max_tokens": 6, "temperature": 0,
        # Open WebUI adds these for a "llama.cpp" connection; accepted, same meaning
        "continue_final_message": True, "add_generation_prompt": False})
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert does_not_restart(content) and "paris" in content.lower(), content

    _, payloads = cpu_server.stream_chat({"model": model, "messages": messages,
                                          "max_tokens": 6, "temperature": 0})
    streamed = "".join((p["choices"][0]["delta"].get("content") or "")
                       for p in payloads if isinstance(p, dict) and p.get("choices"))
    assert streamed == content

    response = cpu_server.post("/api/chat", json={
        "model": model, "messages": messages, "stream": False,
        "options": {"num_predict": 6, "temperature": 0}})
    assert response.status_code == 200, response.text
    assert response.json()["message"]["content"] == content


@pytest.mark.parametrize("last", [
    {"role": "assistant", "content": ""},
    {"role": "assistant", "content": None},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
])
def test_cpu_live_empty_or_tool_call_final_assistant_gets_a_new_answer(cpu_server, last):
    model = cpu_server.get("/v1/models").json()["data"][0]["id"]
    response = cpu_server.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": QUESTION}, last]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_cpu_live_partial_with_tools_in_the_request_is_continued(cpu_server):
    model = cpu_server.get("/v1/models").json()["data"][0]["id"]
    tool = {"type": "function", "function": {
        "name": "lookup", "description": "Look a fact up.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    response = cpu_server.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 6, "temperature": 0, "tools": [tool],
        "messages": continued([{"role": "user", "content": QUESTION}])})
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message.get("tool_calls") or does_not_restart(message["content"] or ""), message


# ---- NPU double with the model's tokenizer -------------------------------------------

@pytest.fixture(scope="module")
def npu_tokenizer_server(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, prepare_models=lambda root:
                            write_tokenizer(os.path.join(root, NPU_MODEL_ID)))


def test_npu_token_input_ends_with_the_partial(npu_tokenizer_server):
    """No end of turn after the partial and no new assistant header: the token input
    is the conversation up to the partial, on both surfaces."""
    server = npu_tokenizer_server
    folder = os.path.join(os.path.dirname(server.record.path), "models", NPU_MODEL_ID)
    partial = "My name is"
    messages = continued([{"role": "user", "content": "What is my name?"}], partial)
    expected = encode(folder, "<|im_start|>system\nYou are a test model.<|im_end|>\n"
                              "<|im_start|>user\nWhat is my name?<|im_end|>\n"
                              f"<|im_start|>assistant\n{partial}")
    for path, body in (("/v1/chat/completions", {"max_tokens": 4}),
                       ("/api/chat", {"stream": False, "options": {"num_predict": 4}})):
        response = server.post(path, json={"model": NPU_MODEL_ID, "messages": messages,
                                           **body})
        assert response.status_code == 200, response.text
        assert held_after_last_run(server.record.entries()) == expected, path
    partial_tokens = encode(folder, partial)
    assert expected[-len(partial_tokens):] == partial_tokens
    assert expected[-len(partial_tokens) - 1] != encode(folder, "<|im_end|>")[0]


def held_after_last_run(record: list) -> list:
    """What the KV cache holds after the last run's token input, rebuilt from the
    double's record: a clear without positions empties it, a clear of [start, end)
    keeps the first `start` positions, a run appends its token input."""
    held = []
    for entry in record:
        if entry["call"] == "clear_kv_cache":
            held = held[:entry["start_pos"]] if entry.get("start_pos") is not None else []
        elif entry["call"] == "run":
            assert entry["input_type"] == 1   # RKLLM_INPUT_TOKEN
            held = held + entry["tokens"]
    return held


def test_npu_without_a_tokenizer_shows_the_partial_as_the_last_message(npu_server):
    """The runtime's own template always opens a new assistant turn: the partial is the
    text prompt's last `Assistant:` message and the reply is a new answer."""
    messages = continued([{"role": "user", "content": "What is my name?"}], "My name is")
    response = npu_server.post("/api/chat", json={"model": NPU_MODEL_ID, "stream": False,
                                                   "messages": messages})
    assert response.status_code == 200, response.text
    run = npu_server.record.last("run")
    assert run["input_type"] == 0
    assert run["prompt"].endswith("User: What is my name?\n\nAssistant: My name is")

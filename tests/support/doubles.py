"""Fixtures for the C doubles of the Rockchip libraries.

The librkllmrt double (tests/doubles/fake_rkllmrt.c) is compiled once per test
session and once per ABI generation, into <tmp>/abi-1.2/librkllmrt.so and
<tmp>/abi-1.3/librkllmrt.so. Point RKLLM_LIB_PATH (or Settings.rkllm_lib_path)
at either file or its folder. Fixture names are listed in docs/INTERNALS.md.
"""
from __future__ import annotations

import json
import os

import pytest

from doubles.build import (RKLLM_DOUBLE_ABIS, RKLLM_DOUBLE_HIDDEN_WIDTH, DoubleBuildError,
                           build_rkllm_double)

FAKE_MODEL_BYTES = b"FAKE-RKLLM-MODEL\n"  # any non-empty content loads; an empty file fails init


def make_fake_rkllm_model(folder, name: str = "fake-npu-model") -> str:
    """A dummy .rkllm file the double accepts: <folder>/<name>.rkllm."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), f"{name}.rkllm")
    with open(path, "wb") as handle:
        handle.write(FAKE_MODEL_BYTES)
    return path


def read_rkllm_record(path) -> list:
    """The calls the double recorded (one dict per JSON line), oldest first."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class RkllmRecord:
    """The record file of the double, as set in FAKE_RKLLM_RECORD for this test."""

    def __init__(self, path: str):
        self.path = path

    def entries(self, call: str | None = None) -> list:
        entries = read_rkllm_record(self.path)
        return [e for e in entries if call is None or e["call"] == call]

    def last(self, call: str) -> dict:
        found = self.entries(call)
        assert found, f"the double recorded no {call!r} call"
        return found[-1]


@pytest.fixture(scope="session")
def rkllm_double_libs(tmp_path_factory) -> dict:
    """{"1.2": path, "1.3": path} of the compiled librkllmrt doubles."""
    root = str(tmp_path_factory.mktemp("rkllm-double"))
    try:
        return {abi: build_rkllm_double(abi, root) for abi in RKLLM_DOUBLE_ABIS}
    except DoubleBuildError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session", params=RKLLM_DOUBLE_ABIS, ids=lambda abi: f"abi{abi}")
def rkllm_double_abi(request) -> str:
    """Parametrizes a test over both ABI generations ("1.2", "1.3")."""
    return request.param


@pytest.fixture(scope="session")
def rkllm_double_lib(rkllm_double_libs, rkllm_double_abi) -> str:
    """Path of the double's librkllmrt.so for the current ABI parameter."""
    return rkllm_double_libs[rkllm_double_abi]


@pytest.fixture
def fake_rkllm_model(tmp_path) -> str:
    """A dummy .rkllm model file in its own folder under tmp_path/models."""
    return make_fake_rkllm_model(tmp_path / "models" / "fake-npu-model")


@pytest.fixture
def rkllm_record(tmp_path, monkeypatch) -> RkllmRecord:
    """Turns on the double's call record for this test (FAKE_RKLLM_RECORD)."""
    path = str(tmp_path / "rkllm-record.jsonl")
    monkeypatch.setenv("FAKE_RKLLM_RECORD", path)
    return RkllmRecord(path)


@pytest.fixture
def npu_settings(rkllm_double_lib):
    """Settings pointing at the double of the current ABI, the ABI left to detection."""
    from rkllm_api.config import Settings
    return Settings(rkllm_lib_path=rkllm_double_lib, rkllm_abi="")


@pytest.fixture
def npu_runtime(npu_settings, fake_rkllm_model):
    """An RKLLMRuntime on the double (both ABIs), closed after the test."""
    from rkllm_ctypes import RKLLMRuntime
    runtime = RKLLMRuntime(fake_rkllm_model, context_length=4096, settings=npu_settings)
    yield runtime
    runtime.close()


def start_npu_engine(folder, lib: str, **overrides):
    """A started Engine whose models root is <folder>/models (make the models there
    first) and whose NPU runtime is the double at `lib`; the caller shuts it down."""
    from rkllm_api.config import Settings
    from rkllm_api.engine.manager import Engine
    from rkllm_api.models.registry import Registry
    values = dict(models_root=os.path.join(str(folder), "models"), include_bundled_model=False,
                  rkllm_lib_path=lib, idle_unload_seconds=0, heartbeat_seconds=0,
                  kv_cache_dir=os.path.join(str(folder), "cache"))
    values.update(overrides)
    settings = Settings(**values)
    engine = Engine(settings, Registry(settings))
    engine.start()
    return engine


def chat_turn(engine, model: str, messages: list, max_new_tokens: int = 8) -> tuple:
    """One kept chat turn as the API makes it (a 4096-token prompt window), its answer
    committed so the next turn can reuse the cache: (generation, answer)."""
    from rkllm_api.engine.generation import GenerationJob
    from rkllm_api.runtimes.base import EventKind, RunRequest
    from rkllm_api.text.prompts import PromptBuilder
    from support.messages import typed
    built = PromptBuilder(engine.settings).build_chat(typed(messages), context_length=4096)
    generation = engine.generate(GenerationJob(model, RunRequest(
        prompt=built.text, keep_history=True, max_new_tokens=max_new_tokens), "turn", built))
    answer = "".join(e.text for e in generation.events() if e.kind is EventKind.TEXT)
    assert generation.commit_answer(answer)
    return generation, answer


__all__ = ["RKLLM_DOUBLE_HIDDEN_WIDTH", "chat_turn", "make_fake_rkllm_model",
           "read_rkllm_record", "RkllmRecord", "start_npu_engine"]

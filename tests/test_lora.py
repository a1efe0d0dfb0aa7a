"""LoRA adapters below HTTP: the CPU runtime applies GGUF adapters written by the
test suite (tests/support/lora.py) to SmolLM2 for real; the engine keeps adapted and
base conversations apart in the KV cache; the NPU binding loads `.rkllm` adapters
once and names them per run, on both ABIs of the librkllmrt double."""
from __future__ import annotations

import os

import pytest

from rkllm_api.config import Settings
from rkllm_api.engine.errors import AdapterNotFound
from rkllm_api.models import adapters
from rkllm_api.models.registry import Registry
from rkllm_api.openai import protocol
from rkllm_api.request import LoraChoice
from rkllm_api.errors import RequestError
from rkllm_api.runtimes.base import RunRequest, RuntimeLoadError, SamplingParams
from support.conversation import assistant, turn, user
from support.doubles import make_fake_rkllm_model, start_npu_engine
from support.lora import make_model_with_adapters

QUESTION = "What is the capital of France?"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def lora_runtime(smollm_path, smollm_lora_files):
    pytest.importorskip("llama_cpp")
    from rkllm_api.runtimes.llamacpp import LlamaCppRuntime
    runtime = LlamaCppRuntime(smollm_path, context_length=2048,
                              settings=Settings(cpu_threads=1))
    for name, path in smollm_lora_files.items():
        runtime.load_lora(path, name)
    yield runtime
    runtime.close()


def answer(runtime, adapter=None, scale=1.0, prompt=QUESTION) -> str:
    runtime.clear_kv_cache()
    result = runtime.run(RunRequest(prompt, max_new_tokens=16, sampling=GREEDY,
                                    lora_adapter=adapter, lora_scale=scale), lambda e: None)
    assert result.error is None, result.error
    return result.text


# ---- the CPU runtime ---------------------------------------------------------------
def test_an_adapter_changes_the_greedy_answer_and_the_base_answer_stays(lora_runtime):
    base = answer(lora_runtime)
    pirate, poet = answer(lora_runtime, "pirate"), answer(lora_runtime, "poet")
    assert base and pirate and poet
    assert len({base, pirate, poet}) == 3
    assert answer(lora_runtime) == base            # the adapter is off again
    assert answer(lora_runtime, "pirate") == pirate
    assert answer(lora_runtime, "pirate", scale=0.3) not in (pirate, "")


def test_loading_adapters_is_idempotent_and_bad_files_are_refused(lora_runtime, tmp_path,
                                                                  smollm_lora_files):
    lora_runtime.load_lora(smollm_lora_files["pirate"], "pirate")   # already loaded: no-op
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(RuntimeLoadError, match="could not load the LoRA adapter"):
        lora_runtime.load_lora(str(not_gguf), "broken")
    with pytest.raises(RuntimeLoadError, match="not found"):
        lora_runtime.load_lora(str(tmp_path / "missing.gguf"), "missing")
    result = lora_runtime.run(RunRequest(QUESTION, lora_adapter="never-loaded"), lambda e: None)
    assert result.error and "not loaded" in result.error


# ---- the engine: adapters from the model folder, KV keys ---------------------------
@pytest.fixture
def lora_engine(make_engine, tmp_path, smollm_path, smollm_lora_files):
    make_model_with_adapters(tmp_path / "models", smollm_path, smollm_lora_files)
    return make_engine()


def test_adapters_are_found_in_the_model_folder(lora_engine, tmp_path):
    info = lora_engine.registry.resolve("smol")
    assert [a.name for a in adapters.of(info)] == ["pirate", "poet"]
    (tmp_path / "models" / "smol" / "lora" / "notes.txt").write_text("not an adapter")
    (tmp_path / "models" / "smol" / "model_config.json").write_text('{"lora": {"poet": 0.5}}')
    info = Registry(lora_engine.settings).resolve("smol")
    assert [(a.name, a.scale) for a in adapters.of(info)] == [("pirate", 1.0), ("poet", 0.5)]
    assert adapters.find(info, "POET").name == "poet" and adapters.find(info, "x") is None
    assert adapters.of(lora_engine.registry.resolve("smollm2-135m-instruct")) == ()


def test_two_adapters_alternate_without_mixing_their_kv(lora_engine, make_engine):
    first = [user(QUESTION)]
    pirate1 = turn(lora_engine, first, model="smol", lora="pirate", max_new_tokens=12)
    poet1 = turn(lora_engine, first, model="smol", lora="poet", max_new_tokens=12)
    assert poet1[0].kv_mode == "full"   # same text, other adapter: not this KV
    follow = [user(QUESTION), assistant(pirate1[1]), user("And of Germany?")]
    pirate2 = turn(lora_engine, follow, model="smol", lora="pirate", max_new_tokens=12)
    assert pirate2[0].kv_mode == "resume"    # its own snapshot, not the poet's cache
    # The same two pirate turns without the poet in between answer the same.
    alone = make_engine(kv_cache_dir=str(lora_engine.settings.kv_cache_dir) + "-alone")
    turn(alone, first, model="smol", lora="pirate", max_new_tokens=12)
    straight = turn(alone, follow, model="smol", lora="pirate", max_new_tokens=12)
    assert straight[0].kv_mode == "reuse"
    assert straight[1] == pirate2[1]


def test_a_base_conversation_is_not_continued_with_an_adapter(lora_engine):
    _, base_answer = turn(lora_engine, [user(QUESTION)], model="smol", max_new_tokens=8)
    follow = [user(QUESTION), assistant(base_answer), user("And of Germany?")]
    adapted, _ = turn(lora_engine, follow, model="smol", lora="pirate", max_new_tokens=8)
    assert adapted.kv_mode == "full"
    scaled, _ = turn(lora_engine, follow, model="smol", lora="pirate", lora_scale=0.5,
                     max_new_tokens=8)
    assert scaled.kv_mode == "full"      # the scale is part of the key too
    back, _ = turn(lora_engine, follow, model="smol", max_new_tokens=8)
    assert back.kv_mode == "resume"


def test_the_engine_refuses_unknown_adapters(lora_engine):
    with pytest.raises(AdapterNotFound, match="pirate, poet"):
        turn(lora_engine, [user(QUESTION)], model="smol", lora="sailor")
    assert lora_engine.health()["devices"]["cpu"]["busy"] is False


# ---- the NPU double: rkllm_load_lora once, the LoRA parameter per run ---------------
@pytest.fixture
def npu_lora_engine(tmp_path, rkllm_double_lib, rkllm_record):
    folder = tmp_path / "models" / "npu-a"
    make_fake_rkllm_model(folder, "a")
    os.makedirs(folder / "lora")
    (folder / "lora" / "style.rkllm").write_bytes(b"FAKE-LORA\n")
    engine = start_npu_engine(tmp_path, rkllm_double_lib)
    yield engine
    engine.shutdown(timeout=5)


def test_npu_adapters_load_once_and_are_named_per_run(npu_lora_engine, rkllm_record,
                                                     rkllm_double_abi, tmp_path):
    chat = [user("@@reply:ok@@ hi")]
    turn(npu_lora_engine, chat, model="npu-a", lora="style")
    turn(npu_lora_engine, chat, model="npu-a", lora="style")
    turn(npu_lora_engine, chat, model="npu-a", lora="style", lora_scale=0.5)
    turn(npu_lora_engine, chat, model="npu-a")
    loads = rkllm_record.entries("load_lora")
    path = str(tmp_path / "models" / "npu-a" / "lora" / "style.rkllm")
    assert [(l["path"], l["name"], l["scale"]) for l in loads] == [
        (path, "style", 1.0), (path, "style@0.5", 0.5)]   # the scale is fixed at load
    runs = rkllm_record.entries("run")
    assert [r["lora_name"] for r in runs] == ["style", "style", "style@0.5", None]
    assert all(l["abi"].startswith(rkllm_double_abi + ".") for l in loads)   # "1.x.y"


# ---- the OpenAI wire: the `lora` field ----------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("pirate", LoraChoice("pirate")),
    ({"name": " poet ", "scale": 0.25}, LoraChoice("poet", 0.25)),
    ({"name": "poet"}, LoraChoice("poet")),
])
def test_the_lora_field_parses(value, expected):
    body = {"messages": [{"role": "user", "content": "hi"}], "lora": value}
    assert protocol.parse_chat_request(body).lora == expected
    assert protocol.parse_completion_request({"prompt": "hi", "lora": value}).lora == expected


@pytest.mark.parametrize("value", ["", 3, ["pirate"], {"scale": 1}, {"name": "p", "scale": 9},
                                   {"name": "p", "scale": "1"}, {"name": "x" * 65}])
def test_a_malformed_lora_field_is_a_400(value):
    body = {"messages": [{"role": "user", "content": "hi"}], "lora": value}
    with pytest.raises(RequestError) as refused:
        protocol.parse_chat_request(body)
    assert refused.value.status == 400
    assert refused.value.param == ("lora.scale" if isinstance(value, dict) and "scale" in value
                                   and "name" in value else "lora")


def test_an_adapter_file_for_the_other_device_is_not_listed(npu_lora_engine, tmp_path):
    (tmp_path / "models" / "npu-a" / "lora" / "pirate.gguf").write_bytes(b"GGUF")
    info = npu_lora_engine.registry.resolve("npu-a")
    assert [a.name for a in adapters.of(info)] == ["style"]
    with pytest.raises(AdapterNotFound, match="its adapters: style"):
        turn(npu_lora_engine, [user("hi")], model="npu-a", lora="pirate")

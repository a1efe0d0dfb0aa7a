"""Struct layouts: the ctypes declarations, the C double and the documented figures agree.

Three sources must give the same sizes and offsets for every struct of both ABI
generations: rkllm_ctypes' declarations, the double's own sizeof/offsetof
(compiled by gcc from its independent C declarations, reported through
fake_rkllm_layout) and the figures below, measured on the real SDK headers (LP64:
x86_64 and aarch64 lay these structs out identically).
"""
from __future__ import annotations

import ctypes
import json

import pytest

import rkllm_ctypes as rk

# Documented figures: {struct: (size, {field: offset})}, per generation.
SHARED = {
    "RKLLMExtendParam": (120, {"base_domain_id": 0, "embed_flash": 4, "enabled_cpus_num": 5,
                               "enabled_cpus_mask": 8, "n_batch": 12, "use_cross_attn": 13,
                               "reserved": 14}),
    "RKLLMLoraAdapter": (24, {"lora_adapter_path": 0, "lora_adapter_name": 8, "scale": 16}),
    "RKLLMEmbedInput": (16, {"embed": 0, "n_tokens": 8}),
    "RKLLMTokenInput": (16, {"input_ids": 0, "n_tokens": 8}),
    "RKLLMLoraParam": (8, {"lora_adapter_name": 0}),
    "RKLLMPromptCacheParam": (16, {"save_prompt_cache": 0, "prompt_cache_path": 8}),
    "RKLLMResultLastHiddenLayer": (16, {"hidden_states": 0, "embd_size": 8, "num_tokens": 12}),
    "RKLLMResultLogits": (16, {"logits": 0, "vocab_size": 8, "num_tokens": 12}),
    "RKLLMPerfStat": (20, {"prefill_time_ms": 0, "prefill_tokens": 4, "generate_time_ms": 8,
                           "generate_tokens": 12, "memory_usage_mb": 16}),
    "RKLLMResult": (72, {"text": 0, "token_id": 8, "last_hidden_layer": 16, "logits": 32,
                         "perf": 48}),
}
PARAM_COMMON = {"model_path": 0, "max_context_len": 8, "max_new_tokens": 12, "top_k": 16,
                "n_keep": 20, "top_p": 24, "temperature": 28, "repeat_penalty": 32,
                "frequency_penalty": 36, "presence_penalty": 40, "mirostat": 44,
                "mirostat_tau": 48, "mirostat_eta": 52, "skip_special_token": 56}
INPUT_HEAD = {"role": 0, "enable_thinking": 8, "input_type": 12, "prompt_input": 16}
DOCUMENTED = {
    "1.2": {
        **SHARED,
        "RKLLMParam": (208, {**PARAM_COMMON, "is_async": 57, "img_start": 64, "img_end": 72,
                             "img_content": 80, "extend_param": 88}),
        "RKLLMMultiModalInput": (48, {"prompt": 0, "image_embed": 8, "n_image_tokens": 16,
                                      "n_image": 24, "image_width": 32, "image_height": 40}),
        "RKLLMInput": (64, INPUT_HEAD),
        "RKLLMInferParam": (32, {"mode": 0, "lora_params": 8, "prompt_cache_params": 16,
                                 "keep_history": 24}),
    },
    "1.3": {
        **SHARED,
        "RKLLMParam": (184, {**PARAM_COMMON, "ignore_eos_token": 57, "is_async": 58,
                             "extend_param": 60}),
        "RKLLMMultiModalInput": (144, {"prompt": 0, "image": 8, "image.image_embed": 8,
                                       "image.n_image_tokens": 16, "image.n_image": 24,
                                       "image.image_start": 32, "image.image_end": 40,
                                       "image.image_content": 48, "image.image_width": 56,
                                       "image.image_height": 64, "video": 72}),
        "RKLLMInput": (160, INPUT_HEAD),
        "RKLLMInferParam": (40, {"mode": 0, "lora_params": 8, "prompt_cache_params": 16,
                                 "sampling_params": 24, "keep_history": 32,
                                 "max_new_tokens": 36}),
        # nine 4-byte fields in a row
        "RKLLMSamplingParam": (36, {name: 4 * i for i, name in enumerate(
            ["top_k", "top_p", "temperature", "repeat_penalty", "frequency_penalty",
             "presence_penalty", "mirostat", "mirostat_tau", "mirostat_eta"])}),
        "RKLLMCallback": (48, {name: 8 * i for i, name in enumerate(
            ["result_callback", "result_userdata", "tokenizer_callback", "tokenizer_userdata",
             "embed_callback", "embed_userdata"])}),
    },
}

COMMON_CLASSES = {
    "RKLLMExtendParam": rk.RKLLMExtendParam, "RKLLMLoraAdapter": rk.RKLLMLoraAdapter,
    "RKLLMEmbedInput": rk.RKLLMEmbedInput, "RKLLMTokenInput": rk.RKLLMTokenInput,
    "RKLLMLoraParam": rk.RKLLMLoraParam, "RKLLMPromptCacheParam": rk.RKLLMPromptCacheParam,
    "RKLLMResultLastHiddenLayer": rk.RKLLMResultLastHiddenLayer,
    "RKLLMResultLogits": rk.RKLLMResultLogits, "RKLLMPerfStat": rk.RKLLMPerfStat,
    "RKLLMResult": rk.RKLLMResult,
}
CTYPES_CLASSES = {
    "1.2": {**COMMON_CLASSES, "RKLLMParam": rk.RKLLMParam_1_2,
            "RKLLMMultiModalInput": rk.RKLLMMultiModalInput_1_2, "RKLLMInput": rk.RKLLMInput_1_2,
            "RKLLMInferParam": rk.RKLLMInferParam_1_2},
    "1.3": {**COMMON_CLASSES, "RKLLMParam": rk.RKLLMParam_1_3,
            "RKLLMMultiModalInput": rk.RKLLMMultiModalInput_1_3, "RKLLMInput": rk.RKLLMInput_1_3,
            "RKLLMInferParam": rk.RKLLMInferParam_1_3,
            "RKLLMSamplingParam": rk.RKLLMSamplingParam_1_3,
            "RKLLMCallback": rk.RKLLMCallback_1_3},
}


def ctypes_offset(struct: type, dotted: str) -> int:
    """Offset of a (possibly nested, "image.n_image") field of a ctypes struct."""
    offset = 0
    for name in dotted.split("."):
        field = getattr(struct, name)
        offset += field.offset
        struct = dict((f[0], f[1]) for f in struct._fields_).get(name, struct)
    return offset


def declared_fields(struct: type) -> set:
    """Top-level field names; the anonymous input union counts through its members."""
    names = set()
    for name, kind in struct._fields_:
        if name in getattr(struct, "_anonymous_", ()):
            names.update(member for member, _ in kind._fields_)
        else:
            names.add(name)
    return names


@pytest.fixture(scope="module", params=["1.2", "1.3"], ids=lambda abi: f"abi{abi}")
def double_layout(request, rkllm_double_libs):
    library = ctypes.CDLL(rkllm_double_libs[request.param])
    library.fake_rkllm_layout.argtypes = [ctypes.c_char_p, ctypes.c_int]
    library.fake_rkllm_layout.restype = ctypes.c_int
    needed = library.fake_rkllm_layout(None, 0)
    buffer = ctypes.create_string_buffer(needed + 1)
    assert library.fake_rkllm_layout(buffer, len(buffer)) == needed
    report = json.loads(buffer.value.decode())
    assert report["abi"].startswith(request.param + ".")
    return request.param, report["structs"]


def test_ctypes_declarations_match_the_documented_figures(double_layout):
    abi, _ = double_layout
    for name, (size, offsets) in DOCUMENTED[abi].items():
        struct = CTYPES_CLASSES[abi][name]
        assert ctypes.sizeof(struct) == size, name
        for field, offset in offsets.items():
            assert ctypes_offset(struct, field) == offset, f"{name}.{field}"


def test_ctypes_declarations_match_the_compiled_double(double_layout):
    abi, reported = double_layout
    assert set(reported) == set(CTYPES_CLASSES[abi])
    for name, layout in reported.items():
        struct = CTYPES_CLASSES[abi][name]
        assert ctypes.sizeof(struct) == layout["size"], name
        for field, offset in layout["offsets"].items():
            assert ctypes_offset(struct, field) == offset, f"{name}.{field}"
        top_level = {field for field in layout["offsets"] if "." not in field}
        assert top_level == declared_fields(struct), name


def test_the_double_matches_the_documented_figures(double_layout):
    abi, reported = double_layout
    for name, (size, offsets) in DOCUMENTED[abi].items():
        assert reported[name]["size"] == size, name
        for field, offset in offsets.items():
            assert reported[name]["offsets"][field] == offset, f"{name}.{field}"


def test_the_generations_really_differ_where_documented():
    assert ctypes.sizeof(rk.RKLLMParam_1_2) != ctypes.sizeof(rk.RKLLMParam_1_3)
    # 1.2's keep_history sits where 1.3 keeps its sampling pointer
    assert (rk.RKLLMInferParam_1_2.keep_history.offset
            == rk.RKLLMInferParam_1_3.sampling_params.offset)
    assert rk.RKLLMParam_1_3.extend_param.offset == rk.RKLLMParam_1_2.extend_param.offset - 28

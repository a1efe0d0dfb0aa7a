"""librkllmrt (Rockchip NPU LLM runtime) through ctypes, and the NPU Runtime.

Two generations of the library exist (1.2.x and 1.3.x) that export the same
symbol names but lay out their structs differently and take a different third
argument in rkllm_init. Binding one generation's structs to the other's library
corrupts memory silently, so this module knows which generation it speaks
before the first call: from RKLLM_ABI, or from the version text embedded in the
library file. It refuses rather than guesses.

Layout of the module:
  1. enums and structs, declared once per generation (from the project's ABI notes)
  2. the C functions: one declaration per function, its prototype in a comment,
     argtypes/restype set once, a typed Python wrapper (one class per generation)
  3. finding the library and telling its generation
  4. RKLLMRuntime: the `runtime.Runtime` for .rkllm models
"""
from __future__ import annotations

import codecs
import ctypes
import ctypes.util
import enum
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from rkllm_api.runtimes.base import (IMAGE_MARKER, Capabilities, EmbeddingInputError,
                                     EventKind, EventSink, FinishReason, ImageTags, PerfStats,
                                     RunMode, RunRequest, RunResult, RuntimeLoadError,
                                     SamplingParams, TokenEvent)

log = logging.getLogger(__name__)

# Characters per token when no tokenizer can count (text.prompts.estimate_tokens).
CHARS_PER_TOKEN = 3.5

# =============================================================== 1. types


class LLMCallState(enum.IntEnum):
    NORMAL = 0
    WAITING = 1   # the text is a partial UTF-8 sequence: join it with what follows
    FINISH = 2
    ERROR = 3


class RKLLMInputType(enum.IntEnum):
    PROMPT = 0
    TOKEN = 1
    EMBED = 2
    MULTIMODAL = 3


class RKLLMInferMode(enum.IntEnum):
    GENERATE = 0
    GET_LAST_HIDDEN_LAYER = 1
    GET_LOGITS = 2


LLMHandle = ctypes.c_void_p

# --- structs shared by both generations


class RKLLMExtendParam(ctypes.Structure):
    _fields_ = [
        ("base_domain_id", ctypes.c_int32),   # distinct per resident model
        ("embed_flash", ctypes.c_int8),       # keep the embedding table in flash, not RAM
        ("enabled_cpus_num", ctypes.c_int8),
        ("enabled_cpus_mask", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint8),
        ("use_cross_attn", ctypes.c_int8),
        ("reserved", ctypes.c_uint8 * 104),
    ]


class RKLLMLoraAdapter(ctypes.Structure):
    _fields_ = [
        ("lora_adapter_path", ctypes.c_char_p),
        ("lora_adapter_name", ctypes.c_char_p),
        ("scale", ctypes.c_float),
    ]


class RKLLMEmbedInput(ctypes.Structure):
    _fields_ = [("embed", ctypes.POINTER(ctypes.c_float)), ("n_tokens", ctypes.c_size_t)]


class RKLLMTokenInput(ctypes.Structure):
    _fields_ = [("input_ids", ctypes.POINTER(ctypes.c_int32)), ("n_tokens", ctypes.c_size_t)]


class RKLLMLoraParam(ctypes.Structure):
    _fields_ = [("lora_adapter_name", ctypes.c_char_p)]


class RKLLMPromptCacheParam(ctypes.Structure):
    _fields_ = [("save_prompt_cache", ctypes.c_int), ("prompt_cache_path", ctypes.c_char_p)]


class RKLLMResultLastHiddenLayer(ctypes.Structure):
    _fields_ = [
        ("hidden_states", ctypes.POINTER(ctypes.c_float)),  # num_tokens rows of embd_size
        ("embd_size", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMResultLogits(ctypes.Structure):
    _fields_ = [
        ("logits", ctypes.POINTER(ctypes.c_float)),
        ("vocab_size", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMPerfStat(ctypes.Structure):
    _fields_ = [
        ("prefill_time_ms", ctypes.c_float),
        ("prefill_tokens", ctypes.c_int),
        ("generate_time_ms", ctypes.c_float),
        ("generate_tokens", ctypes.c_int),
        ("memory_usage_mb", ctypes.c_float),
    ]


class RKLLMResult(ctypes.Structure):
    _fields_ = [
        ("text", ctypes.c_char_p),
        ("token_id", ctypes.c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]


# int (*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state);
# The result arrives as a bare address: per token the binding reads only the
# text pointer at offset 0, which is cheaper than building a POINTER object.
LLMResultCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)

# --- generation 1.2.x


class RKLLMParam_1_2(ctypes.Structure):
    _fields_ = [
        ("model_path", ctypes.c_char_p),
        ("max_context_len", ctypes.c_int32),
        ("max_new_tokens", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("n_keep", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
        ("skip_special_token", ctypes.c_bool),
        ("is_async", ctypes.c_bool),
        ("img_start", ctypes.c_char_p),
        ("img_end", ctypes.c_char_p),
        ("img_content", ctypes.c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMMultiModalInput_1_2(ctypes.Structure):
    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class RKLLMInputPayload_1_2(ctypes.Union):
    _fields_ = [
        ("prompt_input", ctypes.c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput_1_2),
    ]


class RKLLMInput_1_2(ctypes.Structure):
    _anonymous_ = ("payload",)
    _fields_ = [
        ("role", ctypes.c_char_p),
        ("enable_thinking", ctypes.c_bool),
        ("input_type", ctypes.c_int),
        ("payload", RKLLMInputPayload_1_2),
    ]


class RKLLMInferParam_1_2(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_int),
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("keep_history", ctypes.c_int),
    ]

# --- generation 1.3.x


class RKLLMParam_1_3(ctypes.Structure):
    _fields_ = [
        ("model_path", ctypes.c_char_p),
        ("max_context_len", ctypes.c_int32),
        ("max_new_tokens", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("n_keep", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
        ("skip_special_token", ctypes.c_bool),
        ("ignore_eos_token", ctypes.c_bool),
        ("is_async", ctypes.c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMImageInput_1_3(ctypes.Structure):
    _fields_ = [
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_start", ctypes.c_char_p),
        ("image_end", ctypes.c_char_p),
        ("image_content", ctypes.c_char_p),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class RKLLMVideoInput_1_3(ctypes.Structure):
    _fields_ = [
        ("video_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_frame_tokens", ctypes.c_size_t),
        ("n_frame_per_video", ctypes.c_size_t),
        ("n_video", ctypes.c_size_t),
        ("video_start", ctypes.c_char_p),
        ("video_end", ctypes.c_char_p),
        ("video_content", ctypes.c_char_p),
        ("frame_width", ctypes.c_size_t),
        ("frame_height", ctypes.c_size_t),
    ]


class RKLLMMultiModalInput_1_3(ctypes.Structure):
    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("image", RKLLMImageInput_1_3),
        ("video", RKLLMVideoInput_1_3),
    ]


class RKLLMInputPayload_1_3(ctypes.Union):
    _fields_ = [
        ("prompt_input", ctypes.c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput_1_3),
    ]


class RKLLMInput_1_3(ctypes.Structure):
    _anonymous_ = ("payload",)
    _fields_ = [
        ("role", ctypes.c_char_p),
        ("enable_thinking", ctypes.c_bool),
        ("input_type", ctypes.c_int),
        ("payload", RKLLMInputPayload_1_3),
    ]


class RKLLMSamplingParam_1_3(ctypes.Structure):
    _fields_ = [
        ("top_k", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
    ]


class RKLLMInferParam_1_3(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_int),
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", ctypes.POINTER(RKLLMSamplingParam_1_3)),
        ("keep_history", ctypes.c_int),
        ("max_new_tokens", ctypes.c_int32),  # <= 0: the value given at init
    ]


class RKLLMCallback_1_3(ctypes.Structure):
    _fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", ctypes.c_void_p),
        ("tokenizer_callback", ctypes.c_void_p),  # optional, NULL
        ("tokenizer_userdata", ctypes.c_void_p),
        ("embed_callback", ctypes.c_void_p),      # optional, NULL
        ("embed_userdata", ctypes.c_void_p),
    ]


# ==================================================== 2. the C functions


@dataclass(frozen=True)
class _CDeclaration:
    name: str
    argtypes: tuple
    restype: object
    optional: bool  # absent from some releases of the generation


def c_function(name: str, argtypes: list, restype, *, optional: bool = False):
    """Marks a wrapper method with the C function it calls; the library class sets
    argtypes/restype on that function once, when it binds the library."""
    def mark(wrapper):
        wrapper.c_declaration = _CDeclaration(name, tuple(argtypes), restype, optional)
        return wrapper
    return mark


class LibrkllmrtBase:
    """The functions whose prototypes both generations share."""

    abi = ""
    Param: type = ctypes.Structure
    Input: type = ctypes.Structure
    InferParam: type = ctypes.Structure

    def __init__(self, cdll: ctypes.CDLL, path: str):
        self.path = path
        self._c = cdll
        self.missing: set = set()
        for declaration in self._declarations():
            try:
                function = getattr(cdll, declaration.name)
            except AttributeError:
                if declaration.optional:
                    self.missing.add(declaration.name)
                    continue
                raise RuntimeLoadError(f"{path} does not export {declaration.name}: "
                                       "is it really librkllmrt?") from None
            function.argtypes = list(declaration.argtypes)
            function.restype = declaration.restype

    @classmethod
    def _declarations(cls) -> list:
        """Each C function once; a generation's own declaration wins over the base."""
        found = {}
        for klass in cls.__mro__:
            for value in vars(klass).values():
                declaration = getattr(value, "c_declaration", None)
                if declaration is not None:
                    found.setdefault(declaration.name, declaration)
        return list(found.values())

    def has(self, name: str) -> bool:
        return name not in self.missing

    def _require(self, name: str):
        if name in self.missing:
            raise RuntimeLoadError(f"{self.path} (ABI {self.abi}) lacks {name}")
        return getattr(self._c, name)

    # int rkllm_destroy(LLMHandle handle);
    @c_function("rkllm_destroy", [LLMHandle], ctypes.c_int)
    def rkllm_destroy(self, handle: LLMHandle) -> int:
        return self._c.rkllm_destroy(handle)

    # int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);
    @c_function("rkllm_load_lora", [LLMHandle, ctypes.POINTER(RKLLMLoraAdapter)], ctypes.c_int)
    def rkllm_load_lora(self, handle: LLMHandle, adapter) -> int:
        return self._c.rkllm_load_lora(handle, adapter)

    # int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);
    @c_function("rkllm_load_prompt_cache", [LLMHandle, ctypes.c_char_p], ctypes.c_int)
    def rkllm_load_prompt_cache(self, handle: LLMHandle, path: bytes) -> int:
        return self._c.rkllm_load_prompt_cache(handle, path)

    # int rkllm_release_prompt_cache(LLMHandle handle);
    @c_function("rkllm_release_prompt_cache", [LLMHandle], ctypes.c_int)
    def rkllm_release_prompt_cache(self, handle: LLMHandle) -> int:
        return self._c.rkllm_release_prompt_cache(handle)

    # int rkllm_abort(LLMHandle handle);
    @c_function("rkllm_abort", [LLMHandle], ctypes.c_int)
    def rkllm_abort(self, handle: LLMHandle) -> int:
        return self._c.rkllm_abort(handle)

    # int rkllm_is_running(LLMHandle handle);   (meaning of the result differs by generation)
    @c_function("rkllm_is_running", [LLMHandle], ctypes.c_int)
    def rkllm_is_running(self, handle: LLMHandle) -> int:
        return self._c.rkllm_is_running(handle)

    def is_running(self, handle: LLMHandle) -> bool:
        raise NotImplementedError

    # int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt,
    #                          int* start_pos, int* end_pos);
    @c_function("rkllm_clear_kv_cache",
                 [LLMHandle, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                  ctypes.POINTER(ctypes.c_int)],
                 ctypes.c_int)
    def rkllm_clear_kv_cache(self, handle: LLMHandle, keep_system_prompt: int,
                             start_pos=None, end_pos=None) -> int:
        return self._c.rkllm_clear_kv_cache(handle, keep_system_prompt, start_pos, end_pos)

    # int rkllm_get_kv_cache_size(LLMHandle handle, int* cache_sizes);
    @c_function("rkllm_get_kv_cache_size", [LLMHandle, ctypes.POINTER(ctypes.c_int)],
                 ctypes.c_int, optional=True)
    def rkllm_get_kv_cache_size(self, handle: LLMHandle, cache_sizes) -> int:
        return self._require("rkllm_get_kv_cache_size")(handle, cache_sizes)

    # int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt,
    #                             const char* prompt_prefix, const char* prompt_postfix);
    @c_function("rkllm_set_chat_template",
                 [LLMHandle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int,
                 optional=True)
    def rkllm_set_chat_template(self, handle: LLMHandle, system_prompt: bytes,
                                prompt_prefix: bytes, prompt_postfix: bytes) -> int:
        return self._require("rkllm_set_chat_template")(
            handle, system_prompt, prompt_prefix, prompt_postfix)

    # int rkllm_set_function_tools(LLMHandle handle, const char* system_prompt,
    #                              const char* tools, const char* tool_response_str);
    @c_function("rkllm_set_function_tools",
                 [LLMHandle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int,
                 optional=True)
    def rkllm_set_function_tools(self, handle: LLMHandle, system_prompt: bytes, tools: bytes,
                                 tool_response_str: bytes) -> int:
        return self._require("rkllm_set_function_tools")(
            handle, system_prompt, tools, tool_response_str)

    # int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam* cross_attn_params);
    # The project's ABI notes do not give RKLLMCrossAttnParam's layout, so it stays opaque.
    @c_function("rkllm_set_cross_attn_params", [LLMHandle, ctypes.c_void_p], ctypes.c_int,
                 optional=True)
    def rkllm_set_cross_attn_params(self, handle: LLMHandle, params: ctypes.c_void_p) -> int:
        return self._require("rkllm_set_cross_attn_params")(handle, params)


class Librkllmrt_1_2(LibrkllmrtBase):
    abi = "1.2"
    Param = RKLLMParam_1_2
    Input = RKLLMInput_1_2
    InferParam = RKLLMInferParam_1_2

    # RKLLMParam rkllm_createDefaultParam(void);
    @c_function("rkllm_createDefaultParam", [], RKLLMParam_1_2)
    def rkllm_createDefaultParam(self) -> RKLLMParam_1_2:
        return self._c.rkllm_createDefaultParam()

    # int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
    @c_function("rkllm_init", [ctypes.POINTER(LLMHandle), ctypes.POINTER(RKLLMParam_1_2),
                                LLMResultCallback], ctypes.c_int)
    def rkllm_init(self, handle, param, callback) -> int:
        return self._c.rkllm_init(handle, param, callback)

    # int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params,
    #               void* userdata);
    @c_function("rkllm_run", [LLMHandle, ctypes.POINTER(RKLLMInput_1_2),
                               ctypes.POINTER(RKLLMInferParam_1_2), ctypes.c_void_p], ctypes.c_int)
    def rkllm_run(self, handle: LLMHandle, rkllm_input, infer_params, userdata=None) -> int:
        return self._c.rkllm_run(handle, rkllm_input, infer_params, userdata)

    # int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input,
    #                     RKLLMInferParam* rkllm_infer_params, void* userdata);
    @c_function("rkllm_run_async", [LLMHandle, ctypes.POINTER(RKLLMInput_1_2),
                                     ctypes.POINTER(RKLLMInferParam_1_2), ctypes.c_void_p],
                 ctypes.c_int, optional=True)
    def rkllm_run_async(self, handle: LLMHandle, rkllm_input, infer_params, userdata=None) -> int:
        return self._require("rkllm_run_async")(handle, rkllm_input, infer_params, userdata)

    def is_running(self, handle: LLMHandle) -> bool:
        return self.rkllm_is_running(handle) == 0  # 1.2.x answers 0 while running


class Librkllmrt_1_3(LibrkllmrtBase):
    abi = "1.3"
    Param = RKLLMParam_1_3
    Input = RKLLMInput_1_3
    InferParam = RKLLMInferParam_1_3

    # RKLLMParam rkllm_createDefaultParam(void);
    @c_function("rkllm_createDefaultParam", [], RKLLMParam_1_3)
    def rkllm_createDefaultParam(self) -> RKLLMParam_1_3:
        return self._c.rkllm_createDefaultParam()

    # int rkllm_init(LLMHandle* handle, RKLLMParam* param, RKLLMCallback* callback);
    @c_function("rkllm_init", [ctypes.POINTER(LLMHandle), ctypes.POINTER(RKLLMParam_1_3),
                                ctypes.POINTER(RKLLMCallback_1_3)], ctypes.c_int)
    def rkllm_init(self, handle, param, callbacks) -> int:
        return self._c.rkllm_init(handle, param, callbacks)

    # int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params,
    #               void* userdata);
    @c_function("rkllm_run", [LLMHandle, ctypes.POINTER(RKLLMInput_1_3),
                               ctypes.POINTER(RKLLMInferParam_1_3), ctypes.c_void_p], ctypes.c_int)
    def rkllm_run(self, handle: LLMHandle, rkllm_input, infer_params, userdata=None) -> int:
        return self._c.rkllm_run(handle, rkllm_input, infer_params, userdata)

    # int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input,
    #                     RKLLMInferParam* rkllm_infer_params, void* userdata);
    @c_function("rkllm_run_async", [LLMHandle, ctypes.POINTER(RKLLMInput_1_3),
                                     ctypes.POINTER(RKLLMInferParam_1_3), ctypes.c_void_p],
                 ctypes.c_int, optional=True)
    def rkllm_run_async(self, handle: LLMHandle, rkllm_input, infer_params, userdata=None) -> int:
        return self._require("rkllm_run_async")(handle, rkllm_input, infer_params, userdata)

    def is_running(self, handle: LLMHandle) -> bool:
        return self.rkllm_is_running(handle) == 1  # 1.3.x answers 1 while running


LIBRARY_CLASSES = {"1.2": Librkllmrt_1_2, "1.3": Librkllmrt_1_3}
SUPPORTED_ABIS = tuple(LIBRARY_CLASSES)

# ========================================= 3. finding the library, its ABI

LIBRARY_FILE = "librkllmrt.so"
STANDARD_LIBRARY_DIRS = ("/usr/lib", "/usr/local/lib", "/usr/lib/aarch64-linux-gnu")

# "rkllm-runtime version: 1.2.3", "RKLLM runtime v1.3.0", "rkllm version=1.2.1" ...
_NAMED_VERSION = re.compile(rb"rkllm[\w .-]{0,32}?version[\s:=]{0,4}v?(1\.\d{1,2}\.\d{1,3})\b",
                            re.IGNORECASE)
_RKLLM_MENTION = re.compile(rb"rkllm", re.IGNORECASE)
# A bare 1.x.y that is not part of a longer dotted number (2.1.3, 1.2.3.4).
_BARE_VERSION = re.compile(rb"(?<![\d.])v?(1\.\d{1,2}\.\d{1,3})(?!\.?\d)")
_NEARBY_BYTES = 200


def find_library(configured: str = "") -> str:
    """The librkllmrt file to load: `configured` (a file or a folder) when set,
    else the usual library folders, else the dynamic linker's search."""
    if configured:
        path = os.path.expanduser(configured)
        candidate = os.path.join(path, LIBRARY_FILE) if os.path.isdir(path) else path
        if os.path.isfile(candidate):
            return candidate
        raise RuntimeLoadError(f"librkllmrt not found: RKLLM_LIB_PATH={configured!r} "
                               f"(looked at {candidate})")
    looked = []
    for folder in STANDARD_LIBRARY_DIRS:
        candidate = os.path.join(folder, LIBRARY_FILE)
        looked.append(candidate)
        if os.path.isfile(candidate):
            return candidate
    soname = ctypes.util.find_library("rkllmrt")
    looked.append("the dynamic linker's search path (ctypes.util.find_library('rkllmrt'))")
    if soname:
        # The linker names only the file; find it where the linker itself looks, so
        # the version text can be read before the library is loaded.
        linker_dirs = os.environ.get("LD_LIBRARY_PATH", "").split(":")
        folders = linker_dirs + ["/lib", "/usr/lib64", "/lib64"]
        for folder in filter(None, folders):
            candidate = os.path.join(folder, soname)
            if os.path.isfile(candidate):
                return candidate
        looked.append(f"{soname} (found by the linker but not as a file in {folders})")
    raise RuntimeLoadError("librkllmrt.so not found; looked at: " + ", ".join(looked)
                           + ". Set RKLLM_LIB_PATH to the library file or its folder.")


@dataclass(frozen=True)
class EmbeddedVersion:
    versions: tuple          # every 1.x.y found as the runtime's version, e.g. ("1.2.3",)
    abi: Optional[str]       # "1.2" / "1.3" when all of them agree on a known generation


def read_embedded_version(library_path: str) -> EmbeddedVersion:
    """The runtime version text embedded in the library file, found without loading it.

    First an explicit "rkllm... version: X.Y.Z"; failing that, a bare 1.x.y within a
    few hundred bytes of an "rkllm" mention (a banner whose version is a separate
    string). Several generations found means "unknown", never a guess."""
    with open(library_path, "rb") as handle:
        data = handle.read()
    versions = {m.group(1).decode() for m in _NAMED_VERSION.finditer(data)}
    if not versions:
        for mention in _RKLLM_MENTION.finditer(data):
            window = data[max(0, mention.start() - _NEARBY_BYTES):mention.end() + _NEARBY_BYTES]
            versions.update(m.group(1).decode() for m in _BARE_VERSION.finditer(window))
    generations = {".".join(v.split(".")[:2]) for v in versions}
    abi = generations.pop() if len(generations) == 1 else None
    return EmbeddedVersion(tuple(sorted(versions)), abi if abi in SUPPORTED_ABIS else None)


def normalise_abi(text: str) -> str:
    """ "1.3", "1.3.0", "v1.2.3" -> "1.3" / "1.2"; anything else is refused."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?", text.strip())
    abi = f"{match.group(1)}.{match.group(2)}" if match else text
    if abi not in SUPPORTED_ABIS:
        raise RuntimeLoadError(f"RKLLM_ABI={text!r} is not supported; use one of "
                               f"{', '.join(SUPPORTED_ABIS)}")
    return abi


def choose_abi(library_path: str, configured: str = "") -> str:
    """The generation to speak to the library at library_path; raises before any call
    into the library when it is unknown or contradicts the configured one."""
    embedded = read_embedded_version(library_path)
    if configured:
        abi = normalise_abi(configured)
        if embedded.abi and embedded.abi != abi:
            raise RuntimeLoadError(
                f"ABI mismatch: RKLLM_ABI={configured} but {library_path} says it is runtime "
                f"{', '.join(embedded.versions)} (ABI {embedded.abi}); refusing to load it with "
                f"the wrong struct layouts. Fix RKLLM_ABI or RKLLM_LIB_PATH.")
        if not embedded.abi:
            log.warning("librkllmrt at %s: embedded version %s; using RKLLM_ABI=%s as configured",
                        library_path, ", ".join(embedded.versions) or "not found", abi)
        return abi
    if embedded.abi:
        return embedded.abi
    found = ", ".join(embedded.versions) or "no version text found"
    raise RuntimeLoadError(
        f"cannot tell which librkllmrt ABI {library_path} speaks ({found}); set RKLLM_ABI to "
        f"one of {', '.join(SUPPORTED_ABIS)} to match the runtime release. Refusing to guess: "
        f"the two generations' structs are incompatible.")


# ========================================================= 4. the runtime

# RK3588: CPU cores 4-7 are the big Cortex-A76 cores; the runtime's own threads
# belong there (the little cores slow the decode loop down).
BIG_CORES_MASK = 0xF0
BIG_CORES_COUNT = 4
_SAMPLING_ON_PARAM = ("top_k", "top_p", "temperature", "repeat_penalty",
                      "frequency_penalty", "presence_penalty")
_KV_SIZE_SLOTS = 64  # rkllm_get_kv_cache_size fills one int per batch slot
# Plain ints for the per-token comparisons (IntEnum comparisons cost more).
_WAITING = int(LLMCallState.WAITING)
_FINISH = int(LLMCallState.FINISH)
_ERROR = int(LLMCallState.ERROR)
_RELEASE_OUTPUT = 2  # 1.3 result callback: "done with this output, release it"


def common_prefix_length(held, wanted) -> int:
    """How many leading tokens two sequences share."""
    n = min(len(held), len(wanted))
    for index in range(n):
        if held[index] != wanted[index]:
            return index
    return n


class _Run:
    """The state of one rkllm_run, read and written by the result callback."""

    __slots__ = ("sink", "decode", "pieces", "tokens", "limit", "count_limit", "limit_hit",
                 "abort_requested", "abort_forwarded", "embedding_mode", "hidden",
                 "logits_mode", "logits", "perf", "error", "sink_error")

    def __init__(self, sink: EventSink, limit: int, count_limit: bool, embedding_mode: bool,
                 logits_mode: bool = False):
        self.sink = sink
        # Completes split multi-byte characters across callbacks; invalid bytes
        # become U+FFFD rather than an exception in the callback.
        self.decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self.pieces: list = []
        self.tokens = 0
        self.limit = limit
        self.count_limit = count_limit  # 1.2.x: the binding enforces max_new_tokens itself
        self.limit_hit = False
        self.abort_requested = False
        self.abort_forwarded = False
        self.embedding_mode = embedding_mode
        self.hidden = None          # embedding mode: the rows, copied out of C memory
        self.logits_mode = logits_mode
        self.logits = None          # logits mode: the last position's row, copied out
        self.perf: Optional[PerfStats] = None
        self.error: Optional[str] = None
        self.sink_error: Optional[BaseException] = None


class RKLLMRuntime:
    """One .rkllm model loaded by librkllmrt on the NPU (see runtimes.base.Runtime)."""

    device = "npu"
    # librkllmrt saves a prompt cache only during a run, after prefill: snapshots
    # are taken then (see save_kv_snapshot below).
    # Hidden-layer runs go through the generation context: kept turns would be their
    # context (embeddings_share_context). Token-id inputs are not taken: librkllmrt
    # exposes no vocabulary to check ids against.
    # Logits runs (GET_LOGITS, reranking) share it too; without a tokenizer their
    # choices must be token ids.
    capabilities = Capabilities(snapshots_at_prefill=True, prompt_caches=True,
                                embeddings=True, embeddings_share_context=True,
                                lora=True, counts_tokens=False, next_token_logits=True,
                                logits_share_context=True)

    def __init__(self, model_path: str, *, context_length: int, settings=None,
                 init_sampling: Optional[SamplingParams] = None, base_domain_id: int = 0,
                 image_tags: Optional[ImageTags] = None, system_template=None):
        """image_tags: a vision-language model's image start/end/content text; the
        runtime then takes RunRequest.images (1.2 needs the tags at init, 1.3 per run).
        system_template: models/system_templates.SystemTemplate, the template through
        which use_system_prompt() gives the model its system text (unused when the
        model folder holds its tokenizer: real turns carry the system role then)."""
        if settings is None:
            from rkllm_api.config import Settings
            settings = Settings.from_env()
        self.model_path = model_path
        self.context_length = int(context_length)
        self.default_max_new_tokens = int(settings.default_max_tokens)
        if not os.path.isfile(model_path):
            raise RuntimeLoadError(f"model file not found: {model_path}")
        self.library_path = find_library(settings.rkllm_lib_path)
        self.abi = choose_abi(self.library_path, settings.rkllm_abi)
        try:
            cdll = ctypes.CDLL(self.library_path)
        except OSError as exc:
            raise RuntimeLoadError(f"cannot load {self.library_path}: {exc}") from exc
        self._api: LibrkllmrtBase = LIBRARY_CLASSES[self.abi](cdll, self.library_path)
        self._run_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._handle_lock = threading.Lock()
        self._current: Optional[_Run] = None
        self._embedding_width: Optional[int] = None
        self._loras: dict = {}   # (adapter name, scale) -> the name librkllmrt knows it by
        self._handle = LLMHandle()
        self._image_tags = None
        if image_tags is not None:
            self._image_tags = tuple(text.encode("utf-8") for text in
                                     (image_tags.start, image_tags.end, image_tags.content))
            self.capabilities = replace(type(self).capabilities, images=True)
        self._init(init_sampling or SamplingParams(), base_domain_id)
        self._setup_turns()
        self._system_template = system_template if self._turns is None else None
        self._system_prompt: Optional[str] = None   # None: the model's own template
        if self._system_template is not None:
            self.capabilities = replace(self.capabilities, system_prompt_template=True)

    # --- loading

    def _init(self, sampling: SamplingParams, base_domain_id: int) -> None:
        param = self._api.rkllm_createDefaultParam()
        self._model_path_bytes = os.fsencode(self.model_path)  # C keeps a pointer to it
        param.model_path = self._model_path_bytes
        param.max_context_len = self.context_length
        # The init limit is only a ceiling: each run asks for its own (natively on
        # 1.3, by counting and aborting on 1.2, whose limit is fixed at init).
        param.max_new_tokens = self.context_length
        param.skip_special_token = True
        param.is_async = False
        for name, value in sampling.given().items():
            if name in _SAMPLING_ON_PARAM:
                setattr(param, name, value)
        param.extend_param.base_domain_id = base_domain_id
        param.extend_param.embed_flash = 1
        param.extend_param.enabled_cpus_num = BIG_CORES_COUNT
        param.extend_param.enabled_cpus_mask = BIG_CORES_MASK
        param.extend_param.n_batch = 1
        if self._image_tags is not None and self.abi == "1.2":
            # 1.2 reads the image tags once, here; the bytes live in self._image_tags.
            param.img_start, param.img_end, param.img_content = self._image_tags
        self._init_param = param
        # The C side holds these function pointers for the handle's whole life.
        self._result_callback = LLMResultCallback(self._on_result)
        if self.abi == "1.2":
            callback_arg = self._result_callback
        else:
            self._callbacks = RKLLMCallback_1_3(result_callback=self._result_callback)
            callback_arg = ctypes.byref(self._callbacks)
        status = self._api.rkllm_init(ctypes.byref(self._handle), ctypes.byref(param), callback_arg)
        if status != 0 or not self._handle.value:
            self._handle = LLMHandle()
            raise RuntimeLoadError(f"rkllm_init failed (code {status}) for {self.model_path} "
                                   f"with librkllmrt {self.library_path} (ABI {self.abi})")
        log.info("loaded %s on the NPU (librkllmrt ABI %s, context %d)",
                 self.model_path, self.abi, self.context_length)

    # --- the result callback (hot path: runs once per token, on rkllm_run's thread)

    def _on_result(self, result: int, _userdata, state: int) -> int:
        run = self._current
        if run is None:
            return 0
        try:
            if state <= _WAITING:  # NORMAL or WAITING
                if run.embedding_mode:
                    return self._take_hidden_layer(run, result)
                if run.logits_mode:
                    return self._take_logits(run, result)
                raw = ctypes.c_char_p.from_address(result).value
                if raw is None:
                    return 0
                if run.abort_requested:
                    self._forward_abort(run)
                    return 0
                run.tokens += 1
                if run.tokens > run.limit:
                    return 0
                text = run.decode(raw)
                if text:
                    run.pieces.append(text)
                    if run.sink_error is None:
                        run.sink(TokenEvent(EventKind.TEXT, text))
                if run.count_limit and run.tokens >= run.limit and not run.limit_hit:
                    run.limit_hit = True
                    self._api.rkllm_abort(self._handle)
            elif state == _FINISH:
                if run.embedding_mode and run.hidden is None:
                    self._take_hidden_layer(run, result)
                if run.logits_mode and run.logits is None:
                    self._take_logits(run, result)
                perf = RKLLMResult.from_address(result).perf
                run.perf = PerfStats(prefill_ms=perf.prefill_time_ms,
                                     prefill_tokens=perf.prefill_tokens,
                                     generate_ms=perf.generate_time_ms,
                                     generate_tokens=perf.generate_tokens,
                                     memory_mb=perf.memory_usage_mb)
            elif state == _ERROR:
                raw = ctypes.c_char_p.from_address(result).value if result else None
                detail = raw.decode("utf-8", "replace") if raw else ""
                run.error = "the NPU runtime reported an error" + (f": {detail}" if detail else "")
        except BaseException as exc:  # nothing may unwind into C
            self._callback_failed(run, exc)
        return 0

    def _callback_failed(self, run: _Run, exc: BaseException) -> None:
        try:
            if run.sink_error is None:
                run.sink_error = exc
                log.error("event handling failed inside the rkllm callback; aborting the run",
                          exc_info=exc)
            run.abort_requested = True
            self._forward_abort(run)
        except BaseException:  # logging itself failed: still never raise into C
            pass

    def _forward_abort(self, run: _Run) -> None:
        """An abort that arrived before the C side was listening: say it again, once."""
        if not run.abort_forwarded:
            run.abort_forwarded = True
            self._api.rkllm_abort(self._handle)

    def _take_hidden_layer(self, run: _Run, result: int) -> int:
        """Copy the hidden layer out of C memory. The callback's answer: on 1.3, 2
        tells librkllmrt to release its output buffer (without it, hidden-layer runs
        leak: rknn-llm issue 504); 1.2 has no such answer (there 1 would pause)."""
        layer = RKLLMResult.from_address(result).last_hidden_layer
        if not layer.hidden_states or layer.embd_size <= 0 or layer.num_tokens <= 0:
            return 0
        import numpy  # only embeddings need it
        rows = numpy.ctypeslib.as_array(layer.hidden_states,
                                        shape=(layer.num_tokens, layer.embd_size))
        run.hidden = rows.astype(numpy.float32, copy=True)
        return _RELEASE_OUTPUT if self.abi == "1.3" else 0

    def _take_logits(self, run: _Run, result: int) -> int:
        """Copy the last position's logits out of C memory (the header does not say
        whether librkllmrt gives one row or one per prompt token: the last row is the
        next token's either way). Released on 1.3 like a hidden layer."""
        block = RKLLMResult.from_address(result).logits
        if not block.logits or block.vocab_size <= 0 or block.num_tokens <= 0:
            return 0
        import numpy  # only reranking needs it
        rows = numpy.ctypeslib.as_array(block.logits,
                                        shape=(block.num_tokens, block.vocab_size))
        run.logits = rows[-1].astype(numpy.float32, copy=True)
        return _RELEASE_OUTPUT if self.abi == "1.3" else 0

    # --- running

    def run(self, request: RunRequest, on_event: EventSink) -> RunResult:
        if not self._run_lock.acquire(blocking=False):
            raise RuntimeError("the NPU runtime is already running a request (one at a time)")
        try:
            self._require_open()
            return self._run_locked(request, on_event)
        finally:
            self._run_lock.release()

    def _run_locked(self, request: RunRequest, on_event: EventSink) -> RunResult:
        if request.messages and self._turns is not None and request.mode is RunMode.GENERATE:
            return self._run_turns(request, on_event)
        if request.mode is not RunMode.EMBED:
            self._held = None   # a text turn: what the cache holds is the runtime's own
        limit = request.max_new_tokens or self.default_max_new_tokens
        embedding_mode = request.mode is RunMode.EMBED
        run = _Run(on_event, limit, count_limit=(self.abi == "1.2"), embedding_mode=embedding_mode,
                   logits_mode=request.mode is RunMode.LOGITS)
        keep_alive = []  # every buffer C may read during the run
        c_input = self._build_input(request, keep_alive)
        infer, unapplied = self._build_infer_param(request, limit, keep_alive)
        return self._call_run(run, c_input, infer, unapplied)

    # --- real turns: the model folder's tokenizer (runtimes/hf_template.py)
    # The server renders the conversation with the model's template and sends token
    # ids (RKLLM_INPUT_TOKEN: no template applied by the runtime). `_held` is the
    # prompt of the last kept run: token ids known to start the KV cache (None =
    # unknown). A new prompt keeps their longest common prefix; the cache beyond it
    # is cleared with rkllm_clear_kv_cache's position range. The answer that followed
    # is not counted as held (whether the runtime keeps its end token is not known),
    # so it is prefilled again as part of the next prompt. Not verified on hardware.

    def _setup_turns(self) -> None:
        from rkllm_api.runtimes.hf_template import TemplateTokenizer, TurnFitter
        self._turns = TemplateTokenizer.from_folder(os.path.dirname(self.model_path))
        self._fitter = (TurnFitter(self._turns.conversation_tokens, self.context_length)
                        if self._turns is not None else None)
        self._held: Optional[list] = []
        self._held_adapter = None
        if self._turns is not None:
            self.capabilities = replace(self.capabilities, chat_turns=True, counts_tokens=True)

    def turns_prompt_length(self, messages: Sequence, enable_thinking: bool = False,
                            max_new_tokens: Optional[int] = None,
                            continue_final: bool = False) -> int:
        """Tokens of the prompt a run of these turns sends (oldest turns dropped as
        hf_template.fitting_tokens does): the engine asks before the run, so a
        conversation whose newest turn alone does not fit is the client's 400."""
        return len(self._fitter.tokens(messages, enable_thinking, max_new_tokens,
                                       continue_final))

    def _run_turns(self, request: RunRequest, on_event: EventSink) -> RunResult:
        try:
            tokens = self._fitter.tokens(request.messages, request.enable_thinking,
                                         request.max_new_tokens, request.continue_final)
        except Exception:  # a template that refuses these turns: the text prompt, alone
            log.warning("the chat template refused the conversation; sending it as text",
                        exc_info=True)
            self._clear(1, None)
            return self._run_locked(replace(request, messages=()), on_event)
        if not tokens or len(tokens) >= self.context_length:
            return self._refuse(on_event, f"prompt is too long: {len(tokens)} tokens, but the "
                                          f"context window has {self.context_length}")
        adapter = (request.lora_adapter, float(request.lora_scale)) if request.lora_adapter else None
        keep = 0
        if self._held is not None and adapter == self._held_adapter:
            keep = min(common_prefix_length(self._held, tokens), len(tokens) - 1)
        self._held = None   # until the run has ended well
        self._keep_prefix(keep)
        result = self._run_ids(request, tokens[keep:], on_event)
        if result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._held = tokens if request.keep_history else tokens[:keep]
            self._held_adapter = adapter
        result.prompt_tokens = len(tokens)
        return result

    def _keep_prefix(self, keep: int) -> None:
        """Make the KV cache hold its first `keep` positions only (called inside a
        run's lock, so the library is called directly)."""
        if keep <= 0:
            self._clear(1, None)
            return
        size = None
        if self._api.has("rkllm_get_kv_cache_size"):
            sizes = (ctypes.c_int * _KV_SIZE_SLOTS)()
            if self._api.rkllm_get_kv_cache_size(self._handle, sizes) == 0:
                size = sizes[0]
        if size is None or size > keep:
            self._clear(1, (keep, size if size is not None else self.context_length))

    def _clear(self, keep_system_prompt: int, positions: Optional[tuple]) -> None:
        start = end = None
        if positions is not None:
            start, end = ctypes.c_int(positions[0]), ctypes.c_int(positions[1])
        status = self._api.rkllm_clear_kv_cache(
            self._handle, keep_system_prompt,
            ctypes.byref(start) if start is not None else None,
            ctypes.byref(end) if end is not None else None)
        if status != 0:
            self._held = None
            raise RuntimeLoadError(f"rkllm_clear_kv_cache failed (code {status})")

    def _run_ids(self, request: RunRequest, ids: list, on_event: EventSink) -> RunResult:
        """One generation run whose input is token ids."""
        limit = request.max_new_tokens or self.default_max_new_tokens
        run = _Run(on_event, limit, count_limit=(self.abi == "1.2"), embedding_mode=False)
        buffer = (ctypes.c_int32 * len(ids))(*ids)
        role = (request.role or "user").encode("utf-8")
        keep_alive = [buffer, role]
        c_input = self._api.Input()
        c_input.role = role
        c_input.enable_thinking = bool(request.enable_thinking)
        c_input.input_type = RKLLMInputType.TOKEN
        c_input.token_input.input_ids = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_int32))
        c_input.token_input.n_tokens = len(ids)
        infer, unapplied = self._build_infer_param(request, limit, keep_alive)
        return self._call_run(run, c_input, infer, unapplied)

    def _call_run(self, run: "_Run", c_input, infer, unapplied: tuple) -> RunResult:
        """rkllm_run with the input built (text, tokens or multimodal), then the result."""
        started = time.monotonic()
        self._current = run
        try:
            status = self._api.rkllm_run(self._handle, ctypes.byref(c_input),
                                         ctypes.byref(infer), None)
        finally:
            self._current = None
        return self._conclude(run, status, unapplied, time.monotonic() - started)

    @staticmethod
    def _refuse(on_event: EventSink, message: str) -> RunResult:
        try:
            on_event(TokenEvent(EventKind.ERROR, error=message, finish_reason=FinishReason.ERROR))
        except Exception:
            log.exception("event sink failed on the final error event")
        return RunResult("", FinishReason.ERROR, PerfStats(), error=message)

    def _build_input(self, request: RunRequest, keep_alive: list):
        prompt = request.prompt.encode("utf-8")
        role = (request.role or "user").encode("utf-8")
        keep_alive += [prompt, role]
        c_input = self._api.Input()
        c_input.role = role
        c_input.enable_thinking = bool(request.enable_thinking)
        images = self._images_in(request)
        if not images:
            c_input.input_type = RKLLMInputType.PROMPT
            c_input.prompt_input = prompt
            return c_input
        c_input.input_type = RKLLMInputType.MULTIMODAL
        self._fill_multimodal(c_input.multimodal_input, prompt, images, keep_alive)
        return c_input

    def _images_in(self, request: RunRequest) -> tuple:
        """The images this run's prompt shows: one per IMAGE_MARKER, the last ones of
        request.images (a tail-only prompt carries only the newest turns' images)."""
        wanted = request.prompt.count(IMAGE_MARKER) if request.images else 0
        if not wanted:
            return ()
        if self._image_tags is None:
            raise RuntimeError(f"{self.model_path} was loaded without image tags; it "
                               "cannot take images")
        if wanted > len(request.images):
            raise RuntimeError(f"the prompt shows {wanted} images but the run carries "
                               f"{len(request.images)}")
        images = tuple(request.images[-wanted:])
        if len({(i.rows.shape, i.width, i.height) for i in images}) != 1:
            raise RuntimeError("the images of one run must come from one encoder")
        return images

    def _fill_multimodal(self, target, prompt: bytes, images: tuple, keep_alive: list) -> None:
        """RKLLMMultiModalInput: the prompt with its markers, every image's rows in one
        float32 block, n_image x n_image_tokens, the encoder's input size; on 1.3 the
        image tags travel here (on 1.2 they were given at init)."""
        import numpy  # only vision models get here
        block = numpy.ascontiguousarray(numpy.concatenate([i.rows for i in images]),
                                        dtype=numpy.float32)
        keep_alive.append(block)
        target.prompt = prompt
        image = target if self.abi == "1.2" else target.image
        image.image_embed = block.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        image.n_image = len(images)
        image.n_image_tokens = images[0].rows.shape[0]
        image.image_width, image.image_height = images[0].width, images[0].height
        if self.abi != "1.2":
            image.image_start, image.image_end, image.image_content = self._image_tags

    def _build_infer_param(self, request: RunRequest, limit: int, keep_alive: list):
        infer = self._api.InferParam()
        if request.mode is RunMode.EMBED:
            infer.mode = RKLLMInferMode.GET_LAST_HIDDEN_LAYER
            infer.keep_history = 0
        elif request.mode is RunMode.LOGITS:
            infer.mode = RKLLMInferMode.GET_LOGITS
            infer.keep_history = 0
        else:
            infer.mode = RKLLMInferMode.GENERATE
            infer.keep_history = 1 if request.keep_history else 0
        if request.lora_adapter:
            name = self._loras.get((request.lora_adapter, float(request.lora_scale)),
                                   request.lora_adapter)
            lora = RKLLMLoraParam(lora_adapter_name=name.encode("utf-8"))
            keep_alive.append(lora)
            infer.lora_params = ctypes.pointer(lora)
        if request.prompt_cache_save_path:
            cache = RKLLMPromptCacheParam(save_prompt_cache=1, prompt_cache_path=os.fsencode(
                request.prompt_cache_save_path))
            keep_alive.append(cache)
            infer.prompt_cache_params = ctypes.pointer(cache)
        if self.abi == "1.2":
            return infer, self._unapplied_at_init(request.sampling)
        infer.max_new_tokens = limit
        sampling, unapplied = self._sampling_1_3(request.sampling)
        keep_alive.append(sampling)
        infer.sampling_params = ctypes.pointer(sampling)
        return infer, unapplied

    def _sampling_1_3(self, requested: SamplingParams):
        """Per-run sampling: the init values, with the request's fields on top."""
        init = self._init_param
        sampling = RKLLMSamplingParam_1_3(
            top_k=init.top_k, top_p=init.top_p, temperature=init.temperature,
            repeat_penalty=init.repeat_penalty, frequency_penalty=init.frequency_penalty,
            presence_penalty=init.presence_penalty, mirostat=init.mirostat,
            mirostat_tau=init.mirostat_tau, mirostat_eta=init.mirostat_eta)
        unapplied = []
        for name, value in requested.given().items():
            if name in _SAMPLING_ON_PARAM:
                setattr(sampling, name, value)
            else:
                unapplied.append(name)  # seed: librkllmrt has no such knob
        return sampling, tuple(unapplied)

    def _unapplied_at_init(self, requested: SamplingParams) -> tuple:
        """1.2.x fixes sampling at init: a request field counts as applied only when
        it asks for the value the model was loaded with."""
        unapplied = []
        for name, value in requested.given().items():
            loaded = getattr(self._init_param, name, None)
            if loaded is None or abs(float(loaded) - float(value)) > 1e-6 * max(1.0, abs(value)):
                unapplied.append(name)
        return tuple(unapplied)

    def _conclude(self, run: _Run, status: int, unapplied: tuple, elapsed: float) -> RunResult:
        """Deliver the one final event and build the RunResult."""
        text = "".join(run.pieces)
        perf = run.perf or PerfStats(generate_ms=elapsed * 1000.0,
                                     generate_tokens=min(run.tokens, run.limit))
        error = run.error
        if run.sink_error is not None:
            error = f"event sink failed: {run.sink_error!r}"
        elif error is None and status != 0 and not (run.abort_requested or run.limit_hit):
            error = f"rkllm_run failed (code {status})"
        if error is not None:
            if run.sink_error is None:
                self._deliver(run, TokenEvent(EventKind.ERROR, error=error,
                                              finish_reason=FinishReason.ERROR))
            return RunResult(text, FinishReason.ERROR, perf, error=error,
                             unapplied_sampling=unapplied)
        if run.abort_requested:
            reason = FinishReason.ABORTED
        elif run.limit_hit or (not (run.embedding_mode or run.logits_mode)
                               and run.tokens >= run.limit):
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        self._deliver(run, TokenEvent(EventKind.FINISH, perf=perf, finish_reason=reason))
        return RunResult(text, reason, perf, unapplied_sampling=unapplied,
                         hidden_states=run.hidden, logits=run.logits)

    @staticmethod
    def _deliver(run: _Run, event: TokenEvent) -> None:
        try:
            run.sink(event)
        except Exception:
            log.exception("event sink failed on the final %s event", event.kind.value)

    def abort(self) -> None:
        run = self._current
        if run is not None:
            run.abort_requested = True
        with self._handle_lock:  # never abort a handle close() is destroying
            if self._handle.value:
                self._api.rkllm_abort(self._handle)

    def is_running(self) -> bool:
        """The library's own view (its answer's meaning differs by generation)."""
        return bool(self._handle.value) and self._api.is_running(self._handle)

    # --- embeddings

    def hidden_states(self, inputs: Sequence, truncate: bool = False) -> list:
        """The last hidden layer of each text: one GET_LAST_HIDDEN_LAYER run per input
        (keep_history=0). librkllmrt has no tokenizer to measure an input with, so
        the length check uses the project's estimate; what still does not fit fails
        in the library."""
        found = []
        for index, text in enumerate(inputs):
            found.append(self._hidden_rows(self._embedding_text(text, index, truncate)))
        return found

    def _embedding_text(self, text, index: int, truncate: bool) -> str:
        if not isinstance(text, str):
            raise EmbeddingInputError("the NPU runtime embeds text only, not token ids", index)
        if not text:
            raise EmbeddingInputError("an input is an empty string", index)
        estimated = math.ceil(len(text) / CHARS_PER_TOKEN)
        if estimated > self.context_length:
            if not truncate:
                raise EmbeddingInputError(
                    f"an input has about {estimated} tokens; this model takes "
                    f"{self.context_length}", index, too_long=True, tokens=estimated,
                    limit=self.context_length)
            text = text[:int(self.context_length * CHARS_PER_TOKEN)]
        return text

    def _hidden_rows(self, text: str):
        result = self.run(RunRequest(prompt=text, mode=RunMode.EMBED), _ignore_event)
        if result.error or result.hidden_states is None:
            raise RuntimeError(result.error or "no hidden layer returned")
        self._embedding_width = int(result.hidden_states.shape[1])
        return result.hidden_states

    # --- reranking

    def next_token_logits(self, prompts: Sequence[str], choices: Sequence,
                          system: str = "", truncate: bool = True) -> list:
        """One GET_LOGITS run per prompt (keep_history=0, thinking off): the chosen
        entries of the logits after it. librkllmrt applies the model's chat template
        with its own system prompt and takes none per run, so `system` leads the
        user turn. Choices must be token ids (no tokenizer here); the length check
        uses the character estimate, as for embeddings."""
        ids = []
        for choice in choices:
            if isinstance(choice, str) or isinstance(choice, bool):
                raise EmbeddingInputError("the NPU runtime has no tokenizer: choices must "
                                          "be token ids", -1)
            ids.append(int(choice))
        found = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise EmbeddingInputError("a prompt is empty", index)
            text = self._embedding_text(f"{system}\n\n{prompt}" if system else prompt,
                                        index, truncate)
            result = self.run(RunRequest(prompt=text, mode=RunMode.LOGITS), _ignore_event)
            if result.error or result.logits is None:
                raise RuntimeError(result.error or "no logits returned")
            vocab = int(result.logits.shape[0])
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise EmbeddingInputError(f"token id {bad} is outside the vocabulary "
                                          f"(0 to {vocab - 1})", -1)
            found.append([float(result.logits[t]) for t in ids])
        return found

    @property
    def embedding_width(self) -> int:
        """Width of the hidden layer; librkllmrt does not tell it up front, so it is
        known once a hidden-layer run has returned (0 before). No probe run here:
        isinstance() checks of the runtime protocol read this property."""
        return self._embedding_width or 0

    @property
    def embedding_pooling(self) -> Optional[str]:
        return None   # a .rkllm file declares none

    # --- KV cache and prompt caches

    def clear_kv_cache(self, keep_system_prompt: bool = True) -> None:
        with self._idle("clear the KV cache"):
            status = self._api.rkllm_clear_kv_cache(self._handle, 1 if keep_system_prompt else 0)
        self._held = [] if status == 0 else None
        if status != 0:
            raise RuntimeLoadError(f"rkllm_clear_kv_cache failed (code {status})")

    @property
    def kv_length(self) -> Optional[int]:
        """Tokens held in the KV cache, or None when the library cannot tell."""
        if not self._api.has("rkllm_get_kv_cache_size"):
            return None
        sizes = (ctypes.c_int * _KV_SIZE_SLOTS)()
        with self._idle("read the KV cache size"):
            status = self._api.rkllm_get_kv_cache_size(self._handle, sizes)
        return sizes[0] if status == 0 else None

    def load_prompt_cache(self, path: str) -> None:
        if not os.path.isfile(path):
            raise RuntimeLoadError(f"prompt cache file not found: {path}")
        self._held = None   # the file's tokens are not known
        with self._idle("load a prompt cache"):
            status = self._api.rkllm_load_prompt_cache(self._handle, os.fsencode(path))
        if status != 0:
            raise RuntimeLoadError(f"rkllm_load_prompt_cache failed (code {status}) for {path}")

    # --- conversation snapshots (engine.kv_session.KvSession)
    # librkllmrt saves a prompt cache only during a run, after prefill
    # (RKLLMPromptCacheParam): the engine asks for one on every kept turn, and such a
    # file holds the conversation without the answer being generated. Loading it with
    # rkllm_load_prompt_cache restores that state. Not verified on hardware.
    def save_kv_snapshot(self, path: str) -> bool:
        return False   # no call saves the KV state outside a run

    def load_kv_snapshot(self, path: str) -> bool:
        self.load_prompt_cache(path)
        return True

    def unapplied_sampling(self, sampling: SamplingParams) -> tuple:
        """What a run with these fields would report in RunResult.unapplied_sampling."""
        if self.abi == "1.2":
            return self._unapplied_at_init(sampling)
        return tuple(name for name in sampling.given() if name not in _SAMPLING_ON_PARAM)

    def release_prompt_cache(self) -> None:
        self._held = None
        with self._idle("release the prompt cache"):
            status = self._api.rkllm_release_prompt_cache(self._handle)
        if status != 0:
            raise RuntimeLoadError(f"rkllm_release_prompt_cache failed (code {status})")

    def count_tokens(self, text: str) -> Optional[int]:
        if self._turns is not None:   # the model folder's own tokenizer
            return self._turns.count(text)
        return None  # librkllmrt does not expose its tokenizer

    # --- model-level settings

    def load_lora(self, path: str, name: str, scale: float = 1.0) -> None:
        """rkllm_load_lora once per adapter and scale: librkllmrt fixes the scale at
        load, so the same adapter at another scale is loaded again under the name
        `<name>@<scale>` (runs name the adapter and scale; see _build_infer_param)."""
        key = (name, float(scale))
        if key in self._loras:
            return
        known = {loaded for loaded, _ in self._loras}
        internal = name if name not in known else f"{name}@{float(scale):g}"
        adapter = RKLLMLoraAdapter(lora_adapter_path=os.fsencode(path),
                                   lora_adapter_name=internal.encode("utf-8"), scale=scale)
        with self._idle("load a LoRA adapter"):
            status = self._api.rkllm_load_lora(self._handle, ctypes.byref(adapter))
        if status != 0:
            raise RuntimeLoadError(f"rkllm_load_lora failed (code {status}) for {path}")
        self._loras[key] = internal

    def set_chat_template(self, system_prompt: str, prompt_prefix: str,
                          prompt_postfix: str) -> None:
        """Replaces the model's template (the runtime clears the KV cache when it does)."""
        self._held = None
        with self._idle("set the chat template"):
            status = self._api.rkllm_set_chat_template(
                self._handle, system_prompt.encode(), prompt_prefix.encode(),
                prompt_postfix.encode())
        if status != 0:
            raise RuntimeLoadError(f"rkllm_set_chat_template failed (code {status})")

    def use_system_prompt(self, text: str) -> bool:
        """Give the model `text` as its system prompt through the system template
        (capability system_prompt_template). True when the template changed, which
        cleared the KV cache; False when it held this system text already."""
        if self._system_template is None:
            raise RuntimeLoadError("this model takes no system prompt through its template")
        if text == self._system_prompt:
            return False
        template = self._system_template
        self._system_prompt = None   # unknown until the call below succeeds
        self.set_chat_template(template.system_part(text), template.prefix, template.postfix)
        self._system_prompt = text
        return True

    def set_function_tools(self, system_prompt: str, tools_json: str,
                           tool_response_str: str) -> None:
        with self._idle("set function tools"):
            status = self._api.rkllm_set_function_tools(
                self._handle, system_prompt.encode(), tools_json.encode(),
                tool_response_str.encode())
        if status != 0:
            raise RuntimeLoadError(f"rkllm_set_function_tools failed (code {status})")

    # --- lifetime

    def close(self) -> None:
        with self._close_lock:
            if not self._handle.value:
                return
            if self._current is not None:
                self.abort()
            # Destroying under a running inference would crash the process: wait for
            # the run to end, and leak the handle rather than destroy it if it never does.
            if not self._run_lock.acquire(timeout=10.0):
                log.error("NPU run did not end after abort; not destroying %s", self.model_path)
                return
            try:
                with self._handle_lock:
                    handle, self._handle = self._handle, LLMHandle()
                    status = self._api.rkllm_destroy(handle)
                if status != 0:
                    log.warning("rkllm_destroy returned %d for %s", status, self.model_path)
            finally:
                self._run_lock.release()

    def _require_open(self) -> None:
        if not self._handle.value:
            raise RuntimeLoadError(f"the model {self.model_path} is closed")

    def _idle(self, doing: str) -> "_IdleGuard":
        return _IdleGuard(self, doing)

    def __repr__(self) -> str:
        return f"RKLLMRuntime({self.model_path!r}, abi={self.abi}, lib={self.library_path!r})"


class _IdleGuard:
    """Holds the run lock for an operation that must not overlap a run."""

    def __init__(self, runtime: RKLLMRuntime, doing: str):
        self._runtime = runtime
        self._doing = doing

    def __enter__(self):
        if not self._runtime._run_lock.acquire(blocking=False):
            raise RuntimeError(f"cannot {self._doing} while a run is in progress")
        try:
            self._runtime._require_open()
        except BaseException:
            self._runtime._run_lock.release()
            raise
        return self

    def __exit__(self, *exc_info):
        self._runtime._run_lock.release()
        return False


def _ignore_event(_event: TokenEvent) -> None:
    pass

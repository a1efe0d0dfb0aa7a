"""Which runtime a model file needs, and opening it.

Kept apart from the runtime protocol (base.py) so that the protocol module imports
no backend and the backends can import the protocol without a cycle.
"""
from __future__ import annotations

import os
from typing import Optional

from rkllm_api.runtimes.base import ImageTags, Runtime, RuntimeLoadError, SamplingParams

MODEL_FILE_DEVICES = {".rkllm": "npu", ".gguf": "cpu"}


def device_for_model_file(path: str) -> Optional[str]:
    """The device a model file runs on, by its file type; None when unsupported."""
    return MODEL_FILE_DEVICES.get(os.path.splitext(path)[1].lower())


def open_runtime(model_path: str, *, context_length: int, settings=None,
                 default_sampling: Optional[SamplingParams] = None,
                 image_tags: Optional[ImageTags] = None, base_domain_id: int = 0,
                 system_template=None) -> Runtime:
    """Create the runtime a model file needs. Imports its backend lazily so a
    CPU-only machine never needs librkllmrt and an NPU board never needs llama.cpp.
    default_sampling: the model's defaults (sampling.model_defaults), used for every
    field a request leaves unset (librkllmrt takes them at init). image_tags: a
    vision-language model's image tags (NPU only: the encoder output feeds librkllmrt).
    base_domain_id: librkllmrt's domain, distinct for each NPU model loaded at once
    (the CPU runtime has none). A `.rknn` file opens a vision encoder
    (runtimes/encoder.py), for a child process to host. system_template: how an NPU model without its
    tokenizer takes the system prompt (models/system_templates.py)."""
    from rkllm_api.runtimes.encoder import EncoderRuntime, is_encoder_file
    if is_encoder_file(model_path):   # a vision model's encoder (librknnrt)
        return EncoderRuntime(model_path, settings=settings)
    device = device_for_model_file(model_path)
    if device == "npu":
        from rkllm_ctypes import RKLLMRuntime
        return RKLLMRuntime(model_path, context_length=context_length, settings=settings,
                            init_sampling=default_sampling, image_tags=image_tags,
                            base_domain_id=base_domain_id, system_template=system_template)
    if image_tags is not None:
        raise RuntimeLoadError(f"{model_path}: image input needs an NPU (.rkllm) model")
    if device == "cpu":
        from rkllm_api.runtimes.llamacpp import LlamaCppRuntime
        return LlamaCppRuntime(model_path, context_length=context_length, settings=settings,
                               default_sampling=default_sampling)
    raise RuntimeLoadError(f"unsupported model file type: {model_path} "
                        f"(expected one of {', '.join(MODEL_FILE_DEVICES)})")

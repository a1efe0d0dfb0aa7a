"""A vision encoder (`.rknn`, librknnrt) in the shape a runtime child hosts.

librknnrt is a closed binary like librkllmrt and can crash the same ways, so a
vision model's encoder runs in a child process of its own too (runtimes/isolation.py
forwards `encode()` and reads `input_spec`; vision_service.py opens it through
open_runtime). The child needs the fixed values every hosted runtime describes
(device, model_path, context_length, capabilities); an encoder has no run(), KV cache
or tokens, so its capabilities are all off.
"""
from __future__ import annotations

import os

from rkllm_api.runtimes.base import Capabilities

ENCODER_FILE_SUFFIX = ".rknn"
RKNN_LIBRARY_FILE = "librknnrt.so"


class EncoderRuntime:
    """rknn_ctypes.RknnEncoder, opened from a model file and the server's settings."""

    device = "npu"
    context_length = 0
    capabilities = Capabilities(prompt_caches=False)

    def __init__(self, model_path: str, settings=None):
        import rknn_ctypes   # boards without vision models never load librknnrt
        if settings is None:
            from rkllm_api.config import Settings
            settings = Settings.from_env()
        self.model_path = model_path
        self._encoder = rknn_ctypes.RknnEncoder(model_path, lib_path=rknn_library(settings))
        self.input_spec = self._encoder.input_spec

    def encode(self, image):
        """The first output for one preprocessed image (RknnEncoder.encode)."""
        return self._encoder.encode(image)

    def close(self) -> None:
        self._encoder.close()


def is_encoder_file(path: str) -> bool:
    return path.lower().endswith(ENCODER_FILE_SUFFIX)


def rknn_library(settings) -> str:
    """RKNN_LIB_PATH, else a librknnrt.so beside a configured librkllmrt (both come
    with the SDK), else "" (rknn_ctypes then searches the usual folders)."""
    if settings.rknn_lib_path:
        return settings.rknn_lib_path
    configured = os.path.expanduser(settings.rkllm_lib_path or "")
    if not configured:
        return ""
    folder = configured if os.path.isdir(configured) else os.path.dirname(configured)
    beside = os.path.join(folder, RKNN_LIBRARY_FILE)
    return beside if os.path.isfile(beside) else ""

"""What the Ollama surface says about a model: /api/tags entries, /api/show, /api/ps.

Ollama describes models it pulled from its registry; here they are folders of the
models root (rkllm_api/models/registry.py), so some fields are made from what the
files say:
- `digest`: sha256 of the file's identity (name, size, modification time), not of its
  bytes (hashing gigabytes on every listing would take minutes on a board); it
  changes when the file changes;
- `size`: the model file (and its vision encoder); `/api/ps` reports the same as the
  memory the model holds, all of it on the accelerator for an NPU model;
- `parameter_size` and `quantization_level`: read from the file and folder names
  ("Qwen3-1.7B", "Q4_K_M", "w8a8"), "" when the names do not say;
- `template`: empty: the runtime applies the model's own chat template.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Optional

from rkllm_api.models import gguf, sampling
from rkllm_api.ollama import protocol

FOREVER_EXPIRY = "9999-12-31T23:59:59+00:00"   # keep_alive < 0: never unloaded
_PARAMETERS = re.compile(r"(?<![\d.a-z])(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)
_GGUF_QUANT = re.compile(r"(?<![a-z0-9])(iq\d_[a-z0-9]+|q\d(?:_[a-z0-9]+)*|bf16|f16|f32)"
                         r"(?![a-z0-9])", re.IGNORECASE)
_RKLLM_QUANT = re.compile(r"(?<![a-z0-9])(w\d+a\d+(?:_g\d+)?)(?![a-z0-9])", re.IGNORECASE)


def _files(info) -> list:
    return [path for path in (info.path, info.vision_encoder) if path]


def model_size(info) -> int:
    total = 0
    for path in _files(info):
        try:
            total += os.path.getsize(path)
        except OSError:
            pass
    return total


def _modified(info) -> float:
    try:
        return os.path.getmtime(info.path)
    except OSError:
        return float(info.created or 0)


def digest(info) -> str:
    identity = f"{os.path.basename(info.path)}|{model_size(info)}|{_modified(info)}"
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()


def parameter_size(info) -> str:
    for text in (info.id, os.path.basename(info.path)):
        match = _PARAMETERS.search(text)
        if match:
            return f"{match.group(1)}{match.group(2).upper()}"
    return ""


def quantization(info) -> str:
    pattern = _GGUF_QUANT if info.device == "cpu" else _RKLLM_QUANT
    for text in (os.path.basename(info.path), info.id):
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return ""


def details(info) -> dict:
    family = info.family or ""
    return {"parent_model": "", "format": "gguf" if info.device == "cpu" else "rkllm",
            "family": family, "families": [family] if family else None,
            "parameter_size": parameter_size(info), "quantization_level": quantization(info)}


def tag_entry(info) -> dict:
    """One /api/tags entry."""
    name = protocol.tagged(info.id)
    return {"name": name, "model": name, "modified_at": protocol.iso_time(_modified(info)),
            "size": model_size(info), "digest": digest(info), "details": details(info)}


def capabilities(info) -> list:
    if "embedding" in info.capabilities:   # as Ollama lists an embedding model: no chat
        return ["embedding"]
    found = ["completion", "tools"]
    if "thinking" in info.capabilities:
        found.append("thinking")
    if "vision" in info.capabilities:
        found.append("vision")
    return found


def _architecture(info) -> str:
    if info.device == "cpu":
        try:
            return gguf.read_header(info.path).architecture or info.family
        except (OSError, gguf.GGUFFormatError):
            pass
    return info.family or "unknown"


def show(info) -> dict:
    """The /api/show answer."""
    defaults = sampling.model_defaults(info.family, info.config).given()
    defaults.pop("seed", None)
    parameters = {**defaults, "num_ctx": info.context_length}
    architecture = _architecture(info)
    return {
        "license": "",
        "modelfile": (f"# served by rkllm-api from the models folder\n"
                      f"FROM {os.path.basename(info.path)}\n"
                      + "".join(f"PARAMETER {k} {v}\n" for k, v in parameters.items())),
        "parameters": "\n".join(f"{k:<30} {v}" for k, v in parameters.items()),
        "template": "",
        "details": details(info),
        "model_info": {"general.architecture": architecture, "general.basename": info.id,
                       f"{architecture}.context_length": info.context_length,
                       "rkllm_api.device": info.device},
        "capabilities": capabilities(info),
        "modified_at": protocol.iso_time(_modified(info)),
    }


def running_entry(info, device: str, seconds_left: Optional[float]) -> dict:
    """One /api/ps entry; seconds_left None = kept loaded until unloaded."""
    entry = tag_entry(info)
    size = entry["size"]
    entry.pop("modified_at")
    entry["expires_at"] = (FOREVER_EXPIRY if seconds_left is None
                           else protocol.iso_time(time.time() + seconds_left))
    entry["size_vram"] = size if device == "npu" else 0
    entry["context_length"] = info.context_length
    return entry

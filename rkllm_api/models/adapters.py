"""LoRA adapters of a model: files in the `lora/` folder inside the model's folder.

    ~/models/Qwen3-1.7B/qwen3-1.7b.rkllm
    ~/models/Qwen3-1.7B/lora/sql.rkllm          -> adapter "sql"   (NPU: rkllm-toolkit export)
    ~/models/smol/SmolLM2.gguf
    ~/models/smol/lora/pirate.gguf              -> adapter "pirate" (CPU: GGUF LoRA)

An adapter's file matches its model's device (`.rkllm` for NPU models, `.gguf` for
CPU ones); its name is the file name without the extension, lower case, `_` and
spaces turned into `-`. Clients pick one as `<model>:<adapter>` (a /v1/models id)
or with the request's `lora` field; a path never comes from a client. The default
scale is 1.0, or what model_config.json says:
`"lora": {"pirate": 0.6}` or `"lora": {"pirate": {"scale": 0.6}}`.
Nothing is cached: listing one small folder is cheaper than keeping it fresh.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

FOLDER = "lora"
SEPARATOR = ":"
_EXTENSIONS = {"npu": ".rkllm", "cpu": ".gguf"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_SCALE = 4.0   # a scale beyond this only breaks the model


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    scale: float = 1.0   # the default weight (model_config.json), requests may give another


def normalise_name(name: str) -> str:
    return re.sub(r"[_\s]+", "-", name.strip().lower())


def of(model) -> tuple:
    """The adapters of a registry.ModelInfo, sorted by name."""
    extension = _EXTENSIONS.get(model.device)
    if extension is None or getattr(model, "bundled", False):
        return ()
    folder = os.path.join(model.folder, FOLDER)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return ()
    scales = _configured_scales(model)
    found = {}
    for file_name in names:
        stem, ext = os.path.splitext(file_name)
        path = os.path.join(folder, file_name)
        name = normalise_name(stem)
        if ext.lower() != extension or not _NAME.match(name) or not os.path.isfile(path):
            continue
        if name in found:
            log.warning("ignoring %s: another adapter of %s is called %s", path, model.id, name)
            continue
        found[name] = Adapter(name, path, scales.get(name, 1.0))
    return tuple(found.values())


def find(model, name: str) -> Optional[Adapter]:
    wanted = normalise_name(name or "")
    return next((a for a in of(model) if a.name == wanted), None)


def split_id(model_id: str) -> tuple:
    """`<model>:<adapter>` -> (model, adapter); a name without the separator ->
    (name, ""). The last separator splits, so a model name may hold one."""
    model, separator, adapter = model_id.rpartition(SEPARATOR)
    if not separator or not model or not adapter:
        return model_id, ""
    return model, adapter


def adapter_id(model_id: str, adapter: str) -> str:
    return f"{model_id}{SEPARATOR}{adapter}"


def _configured_scales(model) -> dict:
    block = (model.config or {}).get("lora")
    if not isinstance(block, dict):
        return {}
    scales = {}
    for name, value in block.items():
        if isinstance(value, dict):
            value = value.get("scale")
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and 0.0 <= value <= MAX_SCALE:
            scales[normalise_name(str(name))] = float(value)
        else:
            log.warning("model_config.json of %s: ignoring the LoRA scale of %r", model.id, name)
    return scales

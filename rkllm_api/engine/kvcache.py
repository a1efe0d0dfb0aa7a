"""KV state files on disk: conversation snapshots and prompt caches.

Two kinds of files live under the cache directory (KV_CACHE_DIR, default
~/.cache/rkllm-api):

* snapshots/ : the KV state of a conversation the engine left for another one
  (two users, two chats), so it can be restored instead of prefilled again when
  that conversation comes back. Bounded LRU (KV_SNAPSHOT_MAX_ENTRIES / _MAX_MB),
  kept in memory only: the folder is emptied when the store starts, because a
  snapshot is only valid for the runtime instance that wrote it.
* <model id>/ : prompt caches that outlive the process. `system-<model>-<text>.cache`
  holds the prefilled system prompt (named by a hash of the model file's identity and
  the system text, so a changed model file or system text simply misses), and
  `named/<name>.cache` + `<name>.json` the caches clients create through
  /v1/cache/<model>/<name>.

Nothing here talks to a runtime: the engine decides what to save and load.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from rkllm_api.engine.errors import CacheDamaged

log = logging.getLogger(__name__)

# \Z, not $: "$" also matches before a final newline, and "a\n" is no cache name.
CACHE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}\Z")
SYSTEM_CACHES_PER_MODEL = 4   # older system-prompt caches of a model are deleted


class CacheNameError(ValueError):
    """A cache name that could escape the cache folder or is otherwise invalid."""


def check_cache_name(name) -> str:
    if not isinstance(name, str) or not CACHE_NAME_PATTERN.match(name) or ".." in name:
        raise CacheNameError(
            "cache name must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "not starting with '.'")
    return name


def model_identity(path: str) -> str:
    """A short hash of the model file's path, size and mtime: changes when the file does."""
    try:
        stat = os.stat(path)
        raw = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    except OSError:
        raw = f"{os.path.abspath(path)}|missing"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---- conversation snapshots ----------------------------------------------------
@dataclass
class Snapshot:
    """One saved KV state. `holds` is the conversation key the file restores;
    `resumes` the key a request's history must equal to use it; on runtimes that
    save at prefill (the NPU) the file lacks the last answer, so `missing_answer`
    is the text that must be sent again after loading it."""
    model_id: str
    path: str
    holds: tuple
    resumes: tuple
    missing_answer: str = ""
    size: int = 0
    created: float = field(default_factory=time.time)


class SnapshotStore:
    """Bounded LRU of snapshot files, per model, thread-safe."""

    def __init__(self, directory: str, max_entries: int, max_bytes: int):
        self.directory = os.path.expanduser(directory)
        self.max_entries = max(1, int(max_entries))
        self.max_bytes = max(1, int(max_bytes))
        self._entries: "collections.OrderedDict[tuple, Snapshot]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._counter = 0

    def start(self) -> None:
        """Prepare the folder: earlier states in it are void (a snapshot is valid only
        for the runtime instance that wrote it), and folders of dead processes go."""
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, exist_ok=True)
        _remove_dead_process_folders(os.path.dirname(self.directory))

    def new_path(self, model_id: str) -> str:
        with self._lock:
            self._counter += 1
            number = self._counter
        return os.path.join(self.directory, f"{text_hash(model_id)}-{os.getpid()}-{number}.kv")

    def put(self, snapshot: Snapshot) -> None:
        """Remember a snapshot; an older one of the same conversation (its key a prefix
        of this one's) is dropped, then the LRU bounds are enforced."""
        snapshot.size = _size(snapshot.path)
        with self._lock:
            for key, old in list(self._entries.items()):
                if old.model_id == snapshot.model_id and old.path != snapshot.path and \
                        snapshot.holds[:len(old.holds)] == old.holds:
                    self._drop(key)
            self._entries[(snapshot.model_id, snapshot.resumes)] = snapshot
            self._entries.move_to_end((snapshot.model_id, snapshot.resumes))
            self._evict()

    def take(self, model_id: str, resumes: tuple) -> Optional[Snapshot]:
        """The snapshot resuming this conversation, removed from the index (the
        caller deletes the file with discard() once it has loaded it)."""
        with self._lock:
            return self._entries.pop((model_id, resumes), None)

    def discard(self, snapshot: Optional[Snapshot]) -> None:
        if snapshot is not None:
            _remove(snapshot.path)

    def forget_model(self, model_id: str) -> None:
        """A model was unloaded: its snapshots belong to a runtime that is gone."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == model_id]:
                self._drop(key)

    def describe(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries),
                    "bytes": sum(s.size for s in self._entries.values())}

    def _drop(self, key) -> None:
        snapshot = self._entries.pop(key)
        _remove(snapshot.path)

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.max_entries or
                                 sum(s.size for s in self._entries.values()) > self.max_bytes):
            self._drop(next(iter(self._entries)))


# ---- prompt caches ---------------------------------------------------------------
@dataclass(frozen=True)
class NamedCache:
    model: str
    name: str
    path: str
    size_bytes: int
    prompt_tokens: int
    created: int
    model_identity: str

    def as_dict(self) -> dict:
        return {"object": "cache", "model": self.model, "name": self.name,
                "size_bytes": self.size_bytes, "prompt_tokens": self.prompt_tokens,
                "created": self.created}


class PromptCacheFiles:
    """Where prompt caches of each model live, and their bookkeeping files."""

    def __init__(self, directory: str):
        self.directory = os.path.expanduser(directory)

    # -- the system prompt cache
    def system_path(self, model_id: str, model_path: str, system: str) -> str:
        name = f"system-{model_identity(model_path)}-{text_hash(system)}.cache"
        return os.path.join(self._model_dir(model_id), name)

    def remember_system(self, model_id: str, model_path: str, system: str) -> None:
        """Mark this system text's cache as the one to preload at the next load, and
        delete caches of an older model file and all but the newest few."""
        folder = self._model_dir(model_id)
        identity = model_identity(model_path)
        _write_json(os.path.join(folder, "system.json"),
                    {"identity": identity, "path": self.system_path(model_id, model_path, system)})
        caches = [os.path.join(folder, f) for f in os.listdir(folder)
                  if f.startswith("system-") and f.endswith(".cache")]
        stale = [p for p in caches if f"-{identity}-" not in os.path.basename(p)]
        fresh = sorted((p for p in caches if p not in stale), key=_mtime, reverse=True)
        for path in stale + fresh[SYSTEM_CACHES_PER_MODEL:]:
            _remove(path)

    def discard_system(self, path: str) -> None:
        """A system cache that failed to load goes, so the next full start rebuilds it."""
        _remove(path)

    def preload_path(self, model_id: str, model_path: str) -> Optional[str]:
        """The system cache to load with the model, when it is valid for this model file."""
        marker = _read_json(os.path.join(self.directory, _safe_dir(model_id), "system.json"))
        if not marker or marker.get("identity") != model_identity(model_path):
            return None
        path = marker.get("path")
        return path if isinstance(path, str) and os.path.isfile(path) else None

    # -- named caches
    def named_path(self, model_id: str, name: str) -> str:
        return os.path.join(self._named_dir(model_id), check_cache_name(name) + ".cache")

    def save_named(self, model_id: str, model_path: str, name: str, prompt_tokens: int) -> NamedCache:
        path = self.named_path(model_id, name)
        _write_json(path[:-len(".cache")] + ".json",
                    {"prompt_tokens": int(prompt_tokens), "created": int(time.time()),
                     "identity": model_identity(model_path), "size_bytes": _size(path)})
        return self.named(model_id, model_path, name)

    def named(self, model_id: str, model_path: str, name: str) -> Optional[NamedCache]:
        """The cache, or None when it is missing or was made from another model file.
        A cache whose file is no longer the size it was saved with (cut short by a full
        disk, overwritten) is removed and CacheDamaged raised: loading it could hand
        the runtime a broken state."""
        path = self.named_path(model_id, name)
        meta = _read_json(path[:-len(".cache")] + ".json")
        if not meta or not os.path.isfile(path):
            return None
        if meta.get("identity") != model_identity(model_path):
            return None
        size = _size(path)
        try:
            tokens, created = int(meta.get("prompt_tokens", 0)), int(meta.get("created", 0))
            saved_size = meta.get("size_bytes")
            intact = saved_size is None or int(saved_size) == size
        except (TypeError, ValueError):
            intact = False
        if not intact or size == 0:
            log.warning("named cache %s is damaged (size %d, saved %r): removed", path, size,
                        meta.get("size_bytes"))
            self.delete_named(model_id, name)
            raise CacheDamaged(model_id, name)
        return NamedCache(model_id, name, path, size, tokens, created, meta["identity"])

    def list_named(self, model_id: str, model_path: str) -> list:
        folder = os.path.join(self.directory, _safe_dir(model_id), "named")
        try:
            names = sorted(f[:-len(".cache")] for f in os.listdir(folder) if f.endswith(".cache"))
        except OSError:
            return []
        found = []
        for name in names:
            if CACHE_NAME_PATTERN.match(name):
                try:
                    cache = self.named(model_id, model_path, name)
                except CacheDamaged:
                    continue   # removed: no longer listed
                if cache is not None:
                    found.append(cache)
        return found

    def delete_named(self, model_id: str, name: str) -> bool:
        path = self.named_path(model_id, name)
        existed = os.path.isfile(path)
        _remove(path)
        _remove(path[:-len(".cache")] + ".json")
        return existed

    def _model_dir(self, model_id: str) -> str:
        folder = os.path.join(self.directory, _safe_dir(model_id))
        os.makedirs(folder, exist_ok=True)
        return folder

    def _named_dir(self, model_id: str) -> str:
        folder = os.path.join(self._model_dir(model_id), "named")
        os.makedirs(folder, exist_ok=True)
        return folder


def _remove_dead_process_folders(parent: str) -> None:
    """Snapshot folders are named pid-<n>; a process that died left its files behind."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith("pid-") or not name[4:].isdigit():
            continue
        try:
            os.kill(int(name[4:]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except OSError:
            pass  # alive, owned by someone else


def _safe_dir(model_id: str) -> str:
    """Model ids come from folder names; keep them one path component."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", model_id).lstrip(".")
    return cleaned or "model"


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_json(path: str, data: dict) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(temporary, path)

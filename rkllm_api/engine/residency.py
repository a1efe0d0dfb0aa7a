"""More than one model resident on a device (NPU_RESIDENT_MODELS): the runtimes set
aside while another model of the same device runs, their librkllmrt domains, and the
memory check before one more is loaded beside them.

The device still runs one generation at a time; a resident model only skips the
load when its turn comes. Each runtime lives in its own child process and gets a
base_domain_id no other resident runtime has, as librkllmrt requires for models
loaded at the same time.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from rkllm_api.engine.errors import EngineError

# A model needs about its file's size in memory once loaded (weights, plus the KV
# cache and buffers the margin stands for); what is available must cover that.
MEMORY_PER_FILE_BYTE = 1.2
MEMORY_MARGIN_MB = 256


class NotEnoughMemory(EngineError):
    """Loading the model beside the resident ones would not fit in memory."""

    def __init__(self, message: str, model: str):
        super().__init__(message)
        self.model = model


@dataclass
class Resident:
    """A loaded runtime set aside while another model of its device runs."""
    model: object                    # registry.ModelInfo
    runtime: object
    kv: object                       # its KvSession: what its KV cache holds
    domain: int
    keep_alive: Optional[float] = None
    since: float = field(default_factory=time.monotonic)


class ResidentSet:
    """The set-aside runtimes of one device. Thread-safe; the engine moves runtimes in
    and out while holding the device's slot."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_id: dict = {}

    def put(self, resident: Resident) -> None:
        with self._lock:
            resident.since = time.monotonic()
            self._by_id[resident.model.id] = resident

    def take(self, model_id: str) -> Optional[Resident]:
        with self._lock:
            return self._by_id.pop(model_id, None)

    def take_all(self) -> list:
        with self._lock:
            taken, self._by_id = list(self._by_id.values()), {}
            return taken

    def take_idle(self, limit_of) -> list:
        """The residents idle longer than limit_of(resident) (None: never), taken out."""
        now = time.monotonic()
        with self._lock:
            idle = [r for r in self._by_id.values()
                    if limit_of(r) is not None and now - r.since >= limit_of(r)]
            for resident in idle:
                del self._by_id[resident.model.id]
            return idle

    def keep_alive(self, model_id: str, seconds: Optional[float]) -> None:
        """A client's keep-alive for a resident model, counted from now."""
        with self._lock:
            resident = self._by_id.get(model_id)
            if resident is not None:
                resident.keep_alive, resident.since = seconds, time.monotonic()

    def all(self) -> list:
        with self._lock:
            return list(self._by_id.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def domains(self) -> set:
        with self._lock:
            return {r.domain for r in self._by_id.values()}


def free_domain(taken: set) -> int:
    """The lowest base_domain_id not in use."""
    domain = 0
    while domain in taken:
        domain += 1
    return domain


def available_memory_mb(system_root: str = "/") -> Optional[float]:
    """MemAvailable from <root>/proc/meminfo, in MB; None when it cannot be read."""
    try:
        with open(os.path.join(system_root, "proc", "meminfo"), encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def model_size_mb(model) -> float:
    try:
        return os.path.getsize(model.path) / (1024 * 1024)
    except OSError:
        return 0.0


def needed_mb(model) -> float:
    return model_size_mb(model) * MEMORY_PER_FILE_BYTE + MEMORY_MARGIN_MB


def check_room_beside(model, residents: list, system_root: str = "/",
                      freed: list = ()) -> None:
    """Raises NotEnoughMemory when loading `model` beside `residents` (ModelInfos, loaded
    already, so their memory is not in what is available) would not fit in the memory
    available now plus what closing `freed` would return. Unknown memory: no refusal."""
    available = available_memory_mb(system_root)
    if available is None:
        return
    available += sum(needed_mb(m) - MEMORY_MARGIN_MB for m in freed)
    needed = needed_mb(model)
    if needed <= available:
        return
    beside = ", ".join(f"{r.id} ({model_size_mb(r):.0f} MB)" for r in residents)
    raise NotEnoughMemory(
        f"not enough memory to load {model.id} ({model_size_mb(model):.0f} MB file, about "
        f"{needed:.0f} MB needed) beside {beside}: {available:.0f} MB available. Unload a "
        f"model first (POST /v1/models/unload) or set NPU_RESIDENT_MODELS=1 to switch "
        f"models instead", model.id)

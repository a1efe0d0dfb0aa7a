"""The model manager and generation scheduler.

Devices: the NPU and the CPU each have one slot. A slot holds at most one loaded
model (a runtime) and runs one generation at a time; a CPU model answers while the
NPU is busy. Requests for a busy device wait in that device's FIFO queue, bounded in
length (QUEUE_MAX_LENGTH -> QueueFull) and time (QUEUE_TIMEOUT -> QueueTimeout).

Models load on demand; asking for another model on the same device closes the
loaded one first (the board has no memory for two), and a model idle for
IDLE_UNLOAD_TIMEOUT seconds is closed by the monitor thread that start() launches.

A generation runs runtime.run() in its own worker thread; the runtime's callback
feeds a per-request queue that Generation.events() reads, applying the first-token,
silence and total limits, the repetition guard and heartbeats. The worker releases
the slot when run() has returned, so the next request never overlaps a run.

Nothing here knows HTTP: the API maps QueueFull/QueueTimeout (and ShuttingDown, a
QueueFull) to 503 + Retry-After, ModelNotFound to 404, ModelLoadFailed to 500.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Optional

from rkllm_api.engine import kvcache
from rkllm_api.engine.errors import (CacheNotFound, EngineError, ModelLoadFailed, ModelNotFound,
                                     ShuttingDown)
from rkllm_api.engine.generation import Generation, GenerationJob, StopCause
from rkllm_api.engine.kv_session import CacheBase, KvServices, release_prompt_cache
from rkllm_api.engine.slots import DeviceSlot
from rkllm_api.models import sampling
from rkllm_api.runtimes.base import check_runtime
from rkllm_api.runtimes.factory import open_runtime

log = logging.getLogger(__name__)

DEVICES = ("npu", "cpu")


class Engine:
    """Loads models on demand and runs generations, one per device at a time."""

    def __init__(self, settings, registry, runtime_factory=open_runtime):
        self.settings = settings
        self.registry = registry
        self._runtime_factory = runtime_factory
        self.kv_services = KvServices.from_settings(settings)
        self._slots = {device: DeviceSlot(device, self.kv_services) for device in DEVICES}
        self._stopping = False
        self._stop_event = threading.Event()
        self._monitor: Optional[threading.Thread] = None
        self._started = False
        self._active: set = set()          # running Generations
        self._active_lock = threading.Lock()

    # ---- lifecycle ----
    def start(self) -> None:
        """Prepare the KV folders and start the idle-unload monitor (none when
        IDLE_UNLOAD_TIMEOUT is 0). The constructor touches nothing on disk."""
        if self._started:
            return
        self._started = True
        self.kv_services.start()
        if self.settings.idle_unload_seconds <= 0:
            return
        self._monitor = threading.Thread(target=self._watch_idle, name="engine-idle-monitor",
                                         daemon=True)
        self._monitor.start()

    def shutdown(self, timeout: float = 8.0) -> None:
        """Refuse new work, abort running generations, wait for their workers, close
        every runtime. Returns within `timeout`; a runtime whose run would not end is
        left open (closing it under a running C call would crash the process)."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        self._stop_event.set()
        for slot in self._slots.values():
            with slot.cond:
                slot.cond.notify_all()   # waiters see _stopping and raise ShuttingDown
        with self._active_lock:
            running = list(self._active)
        for generation in running:
            generation.request_stop(StopCause.SHUTDOWN)
        for generation in running:
            generation.abort_and_wait(max(0.0, deadline - time.monotonic()))
        for slot in self._slots.values():
            self._close_at_shutdown(slot, deadline)
        if self._monitor is not None:
            self._monitor.join(max(0.0, deadline - time.monotonic()))
        log.info("engine stopped")

    def _close_at_shutdown(self, slot: DeviceSlot, deadline: float) -> None:
        with slot.cond:
            while slot.holder is not None and time.monotonic() < deadline:
                slot.cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
            if slot.holder is not None:
                log.error("%s still busy (%s) at shutdown: runtime left open",
                          slot.device, slot.holder)
                return
            slot.take("shutdown")
        try:
            self._close_runtime(slot, "shutdown")
        finally:
            slot.release()

    # ---- generation ----
    def generate(self, job: GenerationJob) -> Generation:
        """Wait (FIFO, bounded) for the model's device, load the model if needed and
        start the run. Raises ModelNotFound, QueueFull, QueueTimeout, ShuttingDown
        or ModelLoadFailed; the slot is never left taken when it raises."""
        if self._stopping:
            raise ShuttingDown()
        model = self._resolve(job.model)
        if job.run.enable_thinking and "thinking" not in model.capabilities:
            job = replace(job, run=replace(job.run, enable_thinking=False))
        slot = self._acquire(model, job.request_id)
        try:
            runtime = self._ensure_loaded(slot, model)
            if self._stopping:  # shutdown began while the model loaded
                self._close_runtime(slot, "shutdown")
                raise ShuttingDown()
            generation = Generation(self, slot, model, runtime, job)
            with slot.cond:
                slot.generation = generation
            with self._active_lock:
                self._active.add(generation)
            generation.start()
        except BaseException:
            slot.release()
            raise
        log.info("request %s started on %s/%s", job.request_id, slot.device, model.id)
        return generation

    def _generation_finished(self, slot: DeviceSlot, generation: Generation) -> None:
        with self._active_lock:
            self._active.discard(generation)
        slot.release(measured=True)

    # ---- model management ----
    def load(self, model: str) -> "object":
        """Load a model now (warm-up); returns its ModelInfo."""
        info = self._resolve(model)
        slot = self._acquire(info, f"load:{info.id}")
        try:
            self._ensure_loaded(slot, info)
        finally:
            slot.release()
        return info

    def unload(self, model: Optional[str] = None) -> list:
        """Close one model (id or alias) or every loaded one (None); waits for a
        running generation on that device. Returns the ids unloaded."""
        target = None
        if model:
            info = self.registry.resolve(model)
            target = info.id if info else model.strip().lower()
            if info is None and target not in self.loaded_models():
                raise ModelNotFound(model)
        unloaded = []
        for slot in self._slots.values():
            with slot.cond:
                loaded = slot.model
            if loaded is None or (target and loaded.id != target):
                continue
            self._wait_for_slot(slot, f"unload:{loaded.id}")
            try:
                if slot.model is not None and (not target or slot.model.id == target):
                    unloaded.append(slot.model.id)
                    self._close_runtime(slot, "unload requested")
            finally:
                slot.release()
        return unloaded

    # ---- named prompt caches (/v1/cache/<model>/<name>) ----
    def save_prompt_cache(self, model: str, name: str, prompt: str):
        """Prefill prompt alone on the model and save its KV state as the named cache;
        returns kvcache.NamedCache. Raises ModelNotFound, kvcache.CacheNameError, the
        queue errors, ModelLoadFailed, or EngineError when the runtime fails."""
        kvcache.check_cache_name(name)
        info = self._resolve(model)
        files = self.kv_services.prompt_caches
        slot = self._acquire(info, f"cache:{info.id}")
        try:
            runtime = self._ensure_loaded(slot, info)
            slot.kv.leave_for_other_work(runtime)
            saved = self.kv_services.prefill_to_file(runtime, prompt,
                                                     files.named_path(info.id, name))
            slot.kv.reset(info)   # prefill_to_file left the cache empty
        finally:
            slot.release()
        if not saved:
            raise EngineError(f"the runtime could not save the prompt cache {name!r}")
        tokens = runtime.count_tokens(prompt)
        if tokens is None:
            from rkllm_api.text import prompts
            tokens = prompts.estimate_tokens(prompt)
        return files.save_named(info.id, info.path, name, tokens)

    def prompt_cache(self, model: str, name: str):
        """The named cache (kvcache.NamedCache); CacheNotFound / ModelNotFound otherwise."""
        kvcache.check_cache_name(name)
        info = self._resolve(model)
        cache = self.kv_services.prompt_caches.named(info.id, info.path, name)
        if cache is None:
            raise CacheNotFound(info.id, name)
        return cache

    def prompt_caches(self, model: str) -> list:
        info = self._resolve(model)
        return self.kv_services.prompt_caches.list_named(info.id, info.path)

    def delete_prompt_cache(self, model: str, name: str) -> None:
        kvcache.check_cache_name(name)
        info = self._resolve(model)
        if not self.kv_services.prompt_caches.delete_named(info.id, name):
            raise CacheNotFound(info.id, name)

    def loaded_models(self) -> list:
        result = []
        for slot in self._slots.values():
            with slot.cond:
                if slot.model is not None:
                    result.append(slot.model.id)
        return result

    def health(self) -> dict:
        devices = {}
        for device, slot in self._slots.items():
            with slot.cond:
                generation = slot.generation
                devices[device] = {
                    "model": slot.model.id if slot.model else None,
                    "busy": slot.holder is not None,
                    "holder": slot.holder,
                    "request_id": generation.request_id if generation else None,
                    "queue_length": len(slot.waiting),
                    "idle_seconds": (round(time.monotonic() - slot.last_used, 1)
                                     if slot.holder is None else 0.0),
                    "kv_cache": slot.kv.describe(),
                }
        return {
            "accepting": not self._stopping,
            "loaded_models": [d["model"] for d in devices.values() if d["model"]],
            "active_requests": [d["request_id"] for d in devices.values() if d["request_id"]],
            "queue_length": sum(d["queue_length"] for d in devices.values()),
            "devices": devices,
        }

    # ---- internals ----
    def _resolve(self, name: str):
        info = self.registry.resolve(name) if name else self.registry.default_model()
        if info is None:
            raise ModelNotFound(name or "(default)")
        return info

    def _acquire(self, model, label: str) -> DeviceSlot:
        slot = self._slots[model.device]
        self._wait_for_slot(slot, label)
        return slot

    def _wait_for_slot(self, slot: DeviceSlot, label: str) -> None:
        slot.acquire(label, self.settings.queue_timeout_seconds,
                     self.settings.queue_max_length, lambda: self._stopping)

    def _ensure_loaded(self, slot: DeviceSlot, model):
        """The slot's runtime for `model`, loading it (after closing another) if needed.
        Called by the slot's holder only."""
        if slot.runtime is not None and slot.model is not None and \
                (slot.model.path, slot.model.context_length) == (model.path, model.context_length):
            return slot.runtime
        if slot.runtime is not None:
            self._close_runtime(slot, f"switching to {model.id}")
        started = time.monotonic()
        log.info("loading %s on %s (context %d)", model.id, slot.device, model.context_length)
        try:
            # The model's sampling defaults: family profile + model_config.json
            # (librkllmrt 1.2 can only take them at init).
            runtime = self._runtime_factory(
                model.path, context_length=model.context_length, settings=self.settings,
                default_sampling=sampling.model_defaults(model.family, model.config))
            check_runtime(runtime)   # what it can do is declared, and checked here once
        except Exception as exc:
            log.error("loading %s failed: %s", model.id, exc)
            raise ModelLoadFailed(model.id, str(exc) or type(exc).__name__) from exc
        base = self._preload_system_cache(runtime, model)
        with slot.cond:
            slot.runtime, slot.model = runtime, model
            slot.kv.reset(model, base)
        log.info("loaded %s on %s in %.1f s", model.id, slot.device, time.monotonic() - started)
        return runtime

    def _preload_system_cache(self, runtime, model) -> Optional[tuple]:
        """Load the system prompt cache this model used last, when still valid."""
        path = self.kv_services.preload_file(model)
        if path is None:
            return None
        try:
            runtime.load_prompt_cache(path)
        except Exception as exc:
            log.warning("preloading the system prompt cache %s failed: %s", path, exc)
            release_prompt_cache(runtime)
            runtime.clear_kv_cache()
            return None
        log.info("preloaded the system prompt cache of %s", model.id)
        return (CacheBase.SYSTEM, path)

    def _close_runtime(self, slot: DeviceSlot, reason: str) -> None:
        with slot.cond:
            runtime, model = slot.runtime, slot.model
            slot.runtime, slot.model = None, None
            slot.kv.reset()
        if runtime is None:
            return
        if self.kv_services.snapshots is not None and model is not None:
            self.kv_services.snapshots.forget_model(model.id)
        log.info("unloading %s from %s: %s", model.id if model else "?", slot.device, reason)
        try:
            runtime.close()
        except Exception:
            log.exception("closing %s failed", model.id if model else "?")

    def _watch_idle(self) -> None:
        idle = self.settings.idle_unload_seconds
        interval = min(1.0, max(0.05, idle / 4))
        while not self._stop_event.wait(interval):
            for slot in self._slots.values():
                self._unload_if_idle(slot, idle)

    def _unload_if_idle(self, slot: DeviceSlot, idle: float) -> None:
        with slot.cond:
            if slot.runtime is None or time.monotonic() - slot.last_used < idle:
                return
        if not slot.try_acquire_if_idle("idle-unload"):
            return
        try:
            if slot.runtime is not None and time.monotonic() - slot.last_used >= idle:
                self._close_runtime(slot, f"idle for {idle:g} s")
        finally:
            slot.release()

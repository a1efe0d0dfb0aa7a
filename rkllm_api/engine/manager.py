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
import math
import threading
import time
from dataclasses import replace
from typing import Optional

from rkllm_api import vision
from rkllm_api.engine import embedding, kvcache
from rkllm_api.engine.errors import (AdapterNotFound, CacheConflict, CacheNotFound,
                                     CacheTooLarge, ClientGone, EngineError, InvalidWork,
                                     ModelLoadFailed, ModelNotFound, ModelUnavailable,
                                     ShuttingDown)
from rkllm_api.engine.crashes import CrashLog
from rkllm_api.engine.residency import (Resident, ResidentSet, check_room_beside,
                                        free_domain)
from rkllm_api.engine.generation import Generation, GenerationJob, StopCause
from rkllm_api.engine.kv_session import (CacheBase, KvServices, KvSession, is_built_prompt,
                                         release_prompt_cache, takes_turns)
from rkllm_api.engine.observer import EngineObserver, notify
from rkllm_api.engine.slots import ArrivalOrder, DeviceSlot
from rkllm_api.models import adapters, sampling, system_templates
from rkllm_api.runtimes.base import EmbeddingInputError, check_runtime
from rkllm_api.runtimes.factory import open_runtime
from rkllm_api.runtimes.isolation import (IsolatedRuntimes, RuntimeCrashed, crash_of,
                                          process_id)

log = logging.getLogger(__name__)

DEVICES = ("npu", "cpu")
EMBED_CHUNK = 8   # inputs per runtime call in embed(); shutdown is checked between calls


class Engine:
    """Loads models on demand and runs generations, one per device at a time."""

    def __init__(self, settings, registry, runtime_factory=None,
                 observer: Optional[EngineObserver] = None):
        self.settings = settings
        self.registry = registry
        # None: open_runtime, each runtime in a child process of its own unless
        # RUNTIME_ISOLATION is off (a crash of the runtime then ends only its child).
        if runtime_factory is None:
            runtime_factory = IsolatedRuntimes() if settings.runtime_isolation else open_runtime
        self._runtime_factory = runtime_factory
        self.crashes = CrashLog()   # runtime processes that died: /health, backoff
        # Loaded models set aside while another of their device runs (NPU_RESIDENT_MODELS),
        # and the librkllmrt domain of each slot's current runtime.
        self._residents = {device: ResidentSet() for device in DEVICES}
        self._domains = {device: 0 for device in DEVICES}
        # Told of queue waits, loads, first tokens and finished runs (metrics.py).
        self.observer = observer or EngineObserver()
        self.kv_services = KvServices.from_settings(settings)
        # One numbering of arrivals for both devices: the HTTP worker issues the numbers.
        self.arrivals = ArrivalOrder()
        self._slots = {device: DeviceSlot(device, self.kv_services, self.arrivals)
                       for device in DEVICES}
        self._stopping = False
        self._stop_event = threading.Event()
        self._monitor: Optional[threading.Thread] = None
        self._started = False
        self._active: set = set()          # running Generations
        self._active_lock = threading.Lock()

    # ---- lifecycle ----
    def start(self) -> None:
        """Prepare the KV folders and start the idle-unload monitor (it unloads only
        models idle past IDLE_UNLOAD_TIMEOUT, or past the keep-alive a client set).
        The constructor touches nothing on disk."""
        if self._started:
            return
        self._started = True
        self.kv_services.start()
        self._monitor = threading.Thread(target=self._watch_idle, name="engine-idle-monitor",
                                         daemon=True)
        self._monitor.start()

    def shutdown(self, timeout: float = 8.0) -> bool:
        """Refuse new work, abort running generations (their streams end at once), wait
        for their workers, close every runtime. Returns within `timeout`: True when
        every runtime was closed, False when a run would not end (a prefill cannot be
        aborted) and its runtime was left open, since closing it under a running C call
        would crash the process; the process may then exit without waiting for it."""
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
        closed = [self._close_at_shutdown(slot, deadline) for slot in self._slots.values()]
        for residents in self._residents.values():
            for resident in residents.take_all():
                self._close_resident(resident, "shutdown")
        if self._monitor is not None:
            self._monitor.join(max(0.0, deadline - time.monotonic()))
        log.info("engine stopped%s", "" if all(closed) else " (a runtime was left running)")
        return all(closed)

    def _close_at_shutdown(self, slot: DeviceSlot, deadline: float) -> bool:
        with slot.cond:
            while slot.holder is not None and time.monotonic() < deadline:
                slot.cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
            if slot.holder is not None:
                log.error("%s still busy (%s) at shutdown: runtime left open",
                          slot.device, slot.holder)
                return False
            slot.take("shutdown")
        try:
            self._close_runtime(slot, "shutdown")
        finally:
            slot.release()
        return True

    # ---- generation ----
    def generate(self, job: GenerationJob) -> Generation:
        """Wait (in arrival order, bounded) for the model's device, load the model if needed and
        start the run. Raises ModelNotFound, QueueFull, QueueTimeout, ShuttingDown
        or ModelLoadFailed; the slot is never left taken when it raises."""
        if self._stopping:
            raise ShuttingDown()
        received = time.monotonic()
        model = self._resolve(job.model)
        if job.run.enable_thinking and "thinking" not in model.capabilities:
            job = replace(job, run=replace(job.run, enable_thinking=False))
        slot = self._acquire(model, job.request_id, job.arrival, job.client_gone)
        notify(self.observer, "queue_waited", slot.device, time.monotonic() - received)
        try:
            loading_from, resident = time.monotonic(), slot.runtime
            runtime = self._ensure_loaded(slot, model)
            load_ms = 0.0 if runtime is resident else (time.monotonic() - loading_from) * 1000.0
            if self._stopping:  # shutdown began while the model loaded
                self._close_runtime(slot, "shutdown")
                raise ShuttingDown()
            if job.run.lora_adapter:
                self._load_adapter(runtime, model, job.run)
            self._check_turns_fit(runtime, model, job)
            generation = Generation(self, slot, model, runtime, job, submitted_at=received)
            generation.load_ms = load_ms
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

    @staticmethod
    def _check_turns_fit(runtime, model, job: GenerationJob) -> None:
        """A conversation sent as real turns is windowed on estimates of its text;
        its exact length is known only to the runtime (the template's markers, text
        that takes more tokens than the estimate: code, Chinese). One whose newest
        turn does not fit even so is PromptTooLong (the client's 400) here, before
        the run, instead of a runtime failure (a 500) after it. The same for the
        prompt of a completion, where the runtime counts tokens."""
        built = job.conversation
        if not is_built_prompt(built):
            return
        from rkllm_api.text import prompts
        completion = not built.turns and not job.use_cache
        try:
            if completion and runtime.capabilities.counts_tokens:
                # A completion's prompt, checked on an estimate too: counted here.
                tokens = runtime.count_tokens(built.text)
            elif takes_turns(runtime, job, built):
                tokens = runtime.turns_prompt_length(built.turns, job.run.enable_thinking,
                                                     job.run.max_new_tokens, built.continues)
            else:
                return
        except Exception:   # a template refusing the turns (the run sends text), a crash
            log.debug("could not count the prompt before the run", exc_info=True)
            return
        if tokens is not None and tokens >= model.context_length:
            raise prompts.PromptTooLong(tokens, model.context_length, False,
                                        param="prompt" if completion else "messages")

    def _load_adapter(self, runtime, model, run) -> None:
        """Make the run's LoRA adapter usable on the runtime (loaded once per adapter,
        and per scale where the runtime fixes the scale at load)."""
        if not runtime.capabilities.lora:
            raise InvalidWork(f"the {model.device.upper()} runtime of {model.id!r} cannot "
                              "apply LoRA adapters", "lora", "lora_unsupported")
        adapter = adapters.find(model, run.lora_adapter)
        if adapter is None:
            raise AdapterNotFound(model.id, run.lora_adapter,
                                  tuple(a.name for a in adapters.of(model)))
        try:
            runtime.load_lora(adapter.path, adapter.name, run.lora_scale)
        except Exception as exc:
            raise EngineError(f"the LoRA adapter {adapter.name!r} could not be loaded: "
                              f"{exc}") from exc

    # ---- embeddings ----
    def embed(self, model: str, inputs, *, dimensions: Optional[int] = None,
              truncate: bool = False, request_id: str = "", arrival: Optional[int] = None,
              client_gone=None) -> embedding.EmbeddingResult:
        """Embed each input (a text, or a sequence of token ids where the runtime takes
        them) with a model: its last hidden layer, pooled and L2-normalised once
        (engine/embedding.py), one vector per input, in order. `dimensions` keeps that
        many leading values (normalised again); `truncate` cuts an input longer than
        the runtime takes instead of refusing it.

        Takes the model's device slot like a generation (FIFO by `arrival`, bounded),
        for the whole batch; `client_gone()` is asked while waiting and between chunks,
        so a client that left stops its batch (ClientGone) instead of holding the
        device to the end of it. The KV cache is left alone where embeddings run in a
        context of their own (CPU); where they share it (NPU) the conversation is
        snapshotted and the cache emptied first, as for a standalone turn, so the same
        input always gives the same vector. Raises ModelNotFound, the queue errors, ModelLoadFailed,
        InvalidWork (a 400: nothing to embed, an input too long or not accepted, a
        width above the model's, a model that cannot embed) or EngineError."""
        inputs = list(inputs)
        if not inputs:
            raise InvalidWork("there is nothing to embed", "input")
        if dimensions is not None and dimensions < 1:
            raise InvalidWork("'dimensions' must be at least 1", "dimensions")
        if self._stopping:
            raise ShuttingDown()
        info = self._resolve(model)
        slot = self._acquire(info, f"embed:{request_id or info.id}", arrival, client_gone)
        try:
            runtime = self._ensure_loaded(slot, info)
            self._check_embedding_inputs(runtime, info, inputs)
            if runtime.capabilities.embeddings_share_context:
                slot.kv.clear_for_standalone(runtime)
            rows = self._hidden_states(runtime, inputs, truncate, client_gone)
            pooling = embedding.pooling_for(info, runtime.embedding_pooling)
        finally:
            slot.release()
        width = int(rows[0].shape[1])
        if dimensions is not None and dimensions > width:
            raise InvalidWork(f"'dimensions' may be at most {width} for {info.id!r}",
                              "dimensions")
        vectors = [embedding.embedding_vector(r, pooling, dimensions) for r in rows]
        return embedding.EmbeddingResult(info, vectors, sum(len(r) for r in rows), pooling, width)

    @staticmethod
    def _check_embedding_inputs(runtime, info, inputs: list) -> None:
        capabilities = runtime.capabilities
        if not capabilities.embeddings:
            raise InvalidWork(f"the model {info.id!r} cannot embed", "model",
                              "model_not_embedding_capable")
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                if not item:
                    raise InvalidWork("an input is an empty string", f"input[{index}]")
            elif not capabilities.embeddings_take_tokens:
                raise InvalidWork(f"the {info.device.upper()} runtime of {info.id!r} embeds "
                                  "text only, not token ids", f"input[{index}]")
            elif not item:
                raise InvalidWork("an input is an empty token array", f"input[{index}]")

    def _hidden_states(self, runtime, inputs: list, truncate: bool, client_gone=None) -> list:
        """The runtime's rows for every input, a few inputs per call so a shutdown
        or a client that left does not wait for a whole large batch."""
        rows = []
        for start in range(0, len(inputs), EMBED_CHUNK):
            self._between_chunks(start, client_gone)
            try:
                rows += runtime.hidden_states(inputs[start:start + EMBED_CHUNK], truncate)
            except EmbeddingInputError as exc:
                raise InvalidWork(str(exc), f"input[{start + exc.index}]",
                                  "context_length_exceeded" if exc.too_long else "") from exc
            except Exception as exc:
                log.exception("embedding failed")
                raise EngineError(_failure_text("embedding", exc)) from exc
        return rows

    def next_token_logits(self, model: str, prompts, choices, *, system: str = "",
                          truncate: bool = True, param: str = "input",
                          request_id: str = "", arrival: Optional[int] = None,
                          client_gone=None) -> tuple:
        """For each prompt, the logits of each choice as the first token of the model's
        answer (runtime.next_token_logits): returns (ModelInfo, [[float per choice] per
        prompt], prompt tokens or 0 when the runtime cannot count). Reranking by a model.

        Held like embed(): the device slot for the whole batch, a few prompts per
        runtime call (shutdown and client_gone checked between), and where the runtime
        scores in the generation context (NPU) the conversation is snapshotted and the
        cache emptied first, so the next turn resumes from the snapshot and the same
        prompt always gives the same logits. Refusals are InvalidWork (400; `param`
        names the request field the prompts came from, "documents" -> "documents[i]")."""
        prompts = list(prompts)
        if not prompts:
            raise InvalidWork("there is nothing to score", param)
        if self._stopping:
            raise ShuttingDown()
        info = self._resolve(model)
        slot = self._acquire(info, f"logits:{request_id or info.id}", arrival, client_gone)
        try:
            runtime = self._ensure_loaded(slot, info)
            capabilities = runtime.capabilities
            if not capabilities.next_token_logits:
                raise InvalidWork(f"the {info.device.upper()} runtime of {info.id!r} cannot "
                                  "score as a reranker", "model", "model_not_reranker_capable")
            if not capabilities.counts_tokens and any(isinstance(c, str) for c in choices):
                raise InvalidWork(
                    f"the {info.device.upper()} runtime of {info.id!r} has no tokenizer: give "
                    "the answer's tokens as ids in model_config.json "
                    '("reranker": {"tokens": {"yes": ID, "no": ID}})', "model",
                    "reranker_tokens_missing")
            if capabilities.logits_share_context:
                slot.kv.clear_for_standalone(runtime)
            rows = []
            for start in range(0, len(prompts), EMBED_CHUNK):
                self._between_chunks(start, client_gone)
                rows += self._logits_chunk(runtime, prompts[start:start + EMBED_CHUNK],
                                           list(choices), system, truncate, param, start)
            counted = ([runtime.count_tokens(p) for p in prompts]
                       if capabilities.counts_tokens else [])
        finally:
            slot.release()
        return info, rows, sum(n or 0 for n in counted)

    def _between_chunks(self, start: int, client_gone) -> None:
        """Before each chunk of an embedding or scoring batch: a shutdown, or a client
        that left (after the first chunk), ends the batch and frees the device."""
        if self._stopping:
            raise ShuttingDown()
        if client_gone is not None and start and client_gone():
            raise ClientGone()

    @staticmethod
    def _logits_chunk(runtime, prompts, choices, system, truncate, param, start) -> list:
        try:
            return runtime.next_token_logits(prompts, choices, system, truncate)
        except EmbeddingInputError as exc:
            where = "model" if exc.index < 0 else f"{param}[{start + exc.index}]"
            raise InvalidWork(str(exc), where,
                              "context_length_exceeded" if exc.too_long else "") from exc
        except Exception as exc:
            log.exception("scoring failed")
            raise EngineError(_failure_text("scoring", exc)) from exc

    def _generation_finished(self, slot: DeviceSlot, generation: Generation) -> None:
        with self._active_lock:
            self._active.discard(generation)
        if not self._bury_if_crashed(slot):
            self.crashes.ran(generation.model.id)
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
        for residents in self._residents.values():
            for resident in residents.all():
                if (not target or resident.model.id == target) and \
                        residents.take(resident.model.id) is not None:
                    unloaded.append(resident.model.id)
                    self._close_resident(resident, "unload requested")
        return unloaded

    # ---- named prompt caches (/v1/cache/<model>/<name>) ----
    def save_prompt_cache(self, model: str, name: str, prompt: str):
        """Prefill prompt alone on the model and save its KV state as the named cache;
        returns kvcache.NamedCache. Raises ModelNotFound, kvcache.CacheNameError,
        CacheConflict (the name is taken, or NAMED_CACHE_MAX_COUNT reached),
        PromptTooLong (the prompt does not fit the context), CacheTooLarge (over
        NAMED_CACHE_MAX_MB: not kept), the queue errors, ModelLoadFailed, or
        EngineError when the runtime fails."""
        from rkllm_api.text import prompts
        kvcache.check_cache_name(name)
        info = self._resolve(model)
        files = self.kv_services.prompt_caches
        self._check_cache_room(info, name)
        tokens = prompts.estimate_tokens(prompt)
        if tokens > info.context_length * self.settings.context_overflow_tolerance:
            raise prompts.PromptTooLong(tokens, info.context_length, True, param="prompt")
        slot = self._acquire(info, f"cache:{info.id}")
        try:
            # Again under the device slot: a create of the same name queued behind this
            # one passed the first check too, and would overwrite the file (two 201s,
            # the first client's cache silently replaced).
            self._check_cache_room(info, name)
            runtime = self._ensure_loaded(slot, info)
            counted = runtime.count_tokens(prompt)
            if counted is not None:
                tokens = counted
                if counted >= info.context_length:
                    raise prompts.PromptTooLong(counted, info.context_length, False,
                                                param="prompt")
            slot.kv.leave_for_other_work(runtime)
            saved = self.kv_services.prefill_to_file(runtime, prompt,
                                                     files.named_path(info.id, name))
            slot.kv.reset(info)   # prefill_to_file left the cache empty
        finally:
            slot.release()
        if not saved:
            raise EngineError(f"the runtime could not save the prompt cache {name!r}")
        return self._keep_within_limits(info, files.save_named(info.id, info.path, name, tokens))

    def _check_cache_room(self, info, name: str) -> None:
        caches = self.kv_services.prompt_caches.list_named(info.id, info.path)
        if any(cache.name == name for cache in caches):
            raise CacheConflict(f"the prompt cache {name!r} of model {info.id!r} already "
                                f"exists; delete it first to replace it")
        limit = self.settings.named_cache_max_count
        if len(caches) >= limit:
            raise CacheConflict(f"model {info.id!r} already has {len(caches)} named prompt "
                                f"caches, the most NAMED_CACHE_MAX_COUNT ({limit}) allows; "
                                f"delete one first")

    def _keep_within_limits(self, info, cache):
        """The new cache, unless it brought the model over a limit: then it is deleted
        (two creates at once can both have passed the count check)."""
        files = self.kv_services.prompt_caches
        caches = files.list_named(info.id, info.path)
        total_mb = sum(c.size_bytes for c in caches) / (1024 * 1024)
        limit_mb = self.settings.named_cache_max_mb
        limit_count = self.settings.named_cache_max_count
        if total_mb > limit_mb:
            files.delete_named(info.id, cache.name)
            raise CacheTooLarge(f"the prompt cache {cache.name!r} "
                                f"({cache.size_bytes / 1048576:.1f} MB) would bring model "
                                f"{info.id!r}'s named caches to {total_mb:.1f} MB, over "
                                f"NAMED_CACHE_MAX_MB ({limit_mb}); it was not kept")
        if len(caches) > limit_count:
            files.delete_named(info.id, cache.name)
            raise CacheConflict(f"model {info.id!r} already has {limit_count} named prompt "
                                f"caches (NAMED_CACHE_MAX_COUNT); delete one first")
        return cache

    def prompt_cache(self, model: str, name: str):
        """The named cache (kvcache.NamedCache); CacheNotFound / ModelNotFound otherwise,
        CacheDamaged when its file was damaged (it is removed then)."""
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

    def keep_alive(self, model: str, seconds: Optional[float]) -> list:
        """How long `model` stays loaded once idle, from now on (Ollama's keep_alive):
        None = IDLE_UNLOAD_TIMEOUT, math.inf = until unloaded or replaced, 0 = unload
        now (waits for a run on its device). Returns the ids unloaded."""
        if seconds == 0:
            return self.unload(model)
        info = self._resolve(model)
        for slot in self._slots.values():
            with slot.cond:
                if slot.model is not None and slot.model.id == info.id:
                    slot.keep_alive = seconds
                    slot.last_used = time.monotonic() if slot.holder is None else slot.last_used
        for residents in self._residents.values():
            residents.keep_alive(info.id, seconds)
        return []

    def resident_models(self) -> list:
        """The loaded models: [(ModelInfo, device, seconds until the idle monitor
        unloads it, or None for never)]. A busy model's countdown starts when it is done."""
        resident = []
        for device, slot in self._slots.items():
            limit = self._idle_limit(slot)
            with slot.cond:
                if slot.model is None:
                    continue
                idle = 0.0 if slot.holder is not None else time.monotonic() - slot.last_used
                left = None if limit is None else max(0.0, limit - idle)
                resident.append((slot.model, device, left))
            for kept in self._residents[device].all():
                limit = self._resident_limit(kept)
                idle = time.monotonic() - kept.since
                resident.append((kept.model, device,
                                 None if limit is None else max(0.0, limit - idle)))
        return resident

    def loaded_models(self) -> list:
        result = []
        for slot in self._slots.values():
            with slot.cond:
                if slot.model is not None:
                    result.append(slot.model.id)
        for residents in self._residents.values():
            result += [resident.model.id for resident in residents.all()]
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
                    # the child process holding the runtime (None: none, or in-process)
                    "runtime_pid": process_id(slot.runtime),
                    "domain": self._domains[device] if slot.runtime is not None else None,
                    # loaded models set aside while this one runs (NPU_RESIDENT_MODELS)
                    "resident": [{"model": r.model.id, "runtime_pid": process_id(r.runtime),
                                  "domain": r.domain} for r in self._residents[device].all()],
                }
        return {
            "accepting": not self._stopping,
            "loaded_models": [d["model"] for d in devices.values() if d["model"]] +
                             [r["model"] for d in devices.values() for r in d["resident"]],
            "active_requests": [d["request_id"] for d in devices.values() if d["request_id"]],
            "queue_length": sum(d["queue_length"] for d in devices.values()),
            "devices": devices,
            "runtime_processes": {"isolated": isinstance(self._runtime_factory,
                                                         IsolatedRuntimes),
                                  **self.crashes.describe()},
        }

    # ---- internals ----
    def _resolve(self, name: str):
        """The model to run; a listed model whose file cannot be served is refused
        before anything loads it (its problem names no path)."""
        info = self.registry.resolve(name) if name else self.registry.default_model()
        if info is None:
            raise ModelNotFound(name or "(default)", known=tuple(self.registry.ids()))
        if info.problem:
            raise ModelUnavailable(info.id, info.problem)
        return info

    def _acquire(self, model, label: str, arrival: Optional[int] = None,
                 client_gone=None) -> DeviceSlot:
        slot = self._slots[model.device]
        self._wait_for_slot(slot, label, arrival, client_gone)
        return slot

    def _wait_for_slot(self, slot: DeviceSlot, label: str, arrival: Optional[int] = None,
                       client_gone=None) -> None:
        slot.acquire(label, self.settings.queue_timeout_seconds,
                     self.settings.queue_max_length, lambda: self._stopping,
                     arrival=arrival, client_gone=client_gone)

    def _ensure_loaded(self, slot: DeviceSlot, model):
        """The slot's runtime for `model`, loading it (after closing another) if needed.
        Called by the slot's holder only."""
        self._bury_if_crashed(slot)
        if slot.runtime is not None and slot.model is not None and \
                (slot.model.path, slot.model.context_length) == (model.path, model.context_length):
            return slot.runtime
        if self._bring_back(slot, model):
            return slot.runtime
        if slot.runtime is not None:
            self._make_room(slot, model)
        self._wait_out_backoff(model)
        started = time.monotonic()
        again = self.crashes.restarting(model.id)   # counts a restart after a crash
        log.info("loading %s on %s (context %d)%s", model.id, slot.device, model.context_length,
                 " again after a crash" if again else "")
        try:
            # The model's sampling defaults: family profile + model_config.json
            # (librkllmrt 1.2 can only take them at init).
            runtime = self._runtime_factory(
                model.path, context_length=model.context_length, settings=self.settings,
                default_sampling=sampling.model_defaults(model.family, model.config),
                **vision.runtime_options(model), **self._domain_option(slot),
                **system_templates.runtime_options(model))
            check_runtime(runtime)   # what it can do is declared, and checked here once
        except RuntimeCrashed as exc:
            log.error("loading %s failed: %s", model.id, exc)
            self.crashes.crashed(model.id, exc.how, "init")
            raise ModelLoadFailed(model.id, str(exc)) from exc
        except Exception as exc:
            log.error("loading %s failed: %s", model.id, exc)
            raise ModelLoadFailed(model.id, str(exc) or type(exc).__name__) from exc
        base = self._preload_system_cache(runtime, model)
        with slot.cond:
            slot.runtime, slot.model = runtime, model
            slot.kv.reset(model, base)
            slot.keep_alive = None
        seconds = time.monotonic() - started
        log.info("loaded %s on %s in %.1f s", model.id, slot.device, seconds)
        notify(self.observer, "model_loaded", model.id, slot.device, seconds)
        return runtime

    # ---- several resident models per device (engine/residency.py) ----
    def _resident_limit(self, resident: Resident) -> Optional[float]:
        limit = resident.keep_alive
        if limit is None:
            limit = self.settings.idle_unload_seconds if self.settings.idle_unload_seconds > 0 \
                else None
        return None if limit is None or limit == math.inf else limit

    def _keeps_residents(self, device: str) -> bool:
        return device == "npu" and self.settings.npu_resident_models > 1

    def _make_room(self, slot: DeviceSlot, model) -> None:
        """Before loading `model`: set the slot's runtime aside when the device keeps
        several models (the oldest resident closed when the set is full), after the
        memory check (NotEnoughMemory: nothing changed); else close it."""
        if not self._keeps_residents(slot.device):
            self._close_runtime(slot, f"switching to {model.id}")
            return
        residents = self._residents[slot.device]
        # the oldest residents leave so the new model makes NPU_RESIDENT_MODELS at most
        kept = sorted(residents.all(), key=lambda r: r.since)
        leaving = kept[:max(0, len(kept) + 2 - self.settings.npu_resident_models)]
        kept = kept[len(leaving):]
        check_room_beside(model, [slot.model] + [r.model for r in kept],
                          self.settings.system_root, freed=[r.model for r in leaving])
        for resident in leaving:
            if residents.take(resident.model.id) is not None:
                self._close_resident(resident, f"making room for {model.id}")
        self._set_aside(slot)

    def _set_aside(self, slot: DeviceSlot) -> None:
        with slot.cond:
            residents = self._residents[slot.device]
            residents.put(Resident(slot.model, slot.runtime, slot.kv, self._domains[slot.device],
                                   slot.keep_alive))
            log.info("%s stays loaded on %s (domain %d) while another model runs",
                     slot.model.id, slot.device, self._domains[slot.device])
            slot.runtime, slot.model = None, None
            slot.kv = KvSession(self.kv_services)
            slot.keep_alive = None

    def _bring_back(self, slot: DeviceSlot, model) -> bool:
        """Make a resident `model` the slot's runtime again (no load); False when it is
        not resident (or its process died meanwhile: then it is buried)."""
        resident = self._residents[slot.device].take(model.id)
        if resident is None:
            return False
        how = crash_of(resident.runtime)
        if how is not None or (resident.model.path, resident.model.context_length) != \
                (model.path, model.context_length):
            if how is not None:
                self.crashes.crashed(model.id, how, resident.runtime.crash_during or "idle")
            self._close_resident(resident, f"its process died ({how})" if how else "changed")
            return False
        if slot.runtime is not None:
            self._set_aside(slot)
        with slot.cond:
            slot.runtime, slot.model, slot.kv = resident.runtime, resident.model, resident.kv
            slot.keep_alive = resident.keep_alive
            self._domains[slot.device] = resident.domain
        log.info("%s back on %s (domain %d), no load needed", model.id, slot.device,
                 resident.domain)
        return True

    def _domain_option(self, slot: DeviceSlot) -> dict:
        """base_domain_id for the runtime about to load: one no resident runtime has
        (only passed when not 0, so factories without the option keep working)."""
        domain = free_domain(self._residents[slot.device].domains())
        self._domains[slot.device] = domain
        return {"base_domain_id": domain} if domain else {}

    def _close_resident(self, resident: Resident, reason: str) -> None:
        if self.kv_services.snapshots is not None:
            self.kv_services.snapshots.forget_model(resident.model.id)
        log.info("unloading %s (resident) from its device: %s", resident.model.id, reason)
        notify(self.observer, "model_unloaded", resident.model.id, resident.model.device)
        try:
            resident.runtime.close()
        except Exception:
            log.exception("closing %s failed", resident.model.id)

    def _wait_out_backoff(self, model) -> None:
        """A model whose runtime crashed several times in a row waits before loading
        again (1, 2, 4 ... 30 s), so a crash loop never runs at full speed."""
        pause = self.crashes.backoff(model.id)
        if pause > 0:
            log.warning("%s crashed repeatedly; waiting %.1f s before loading it again",
                        model.id, pause)
            if self._stop_event.wait(pause):
                raise ShuttingDown()

    def _bury_if_died_idle(self, slot: DeviceSlot) -> None:
        """A loaded model's child that died while idle (the OOM killer, a signal from
        outside) is counted and reaped within a second, not at its next request."""
        with slot.cond:
            runtime, busy = slot.runtime, slot.holder is not None
        # looked at without taking the slot (taking it would restart the idle countdown)
        if runtime is None or busy or crash_of(runtime, look=True) is None:
            return
        if slot.try_acquire_if_idle("crash-check"):
            try:
                self._bury_if_crashed(slot)
            finally:
                slot.release()

    def _bury_if_crashed(self, slot: DeviceSlot) -> bool:
        """When the slot's runtime process died: count the crash, reap the process and
        empty the slot (the next request loads the model again). True when it had."""
        with slot.cond:
            runtime, model = slot.runtime, slot.model
        how = crash_of(runtime) if runtime is not None else None
        if how is None:
            return False
        during = getattr(runtime, "crash_during", "") or "a run"
        self.crashes.crashed(model.id if model else "?", how, during)
        log.error("the runtime of %s on %s died (%s during %s); it will be loaded again for "
                  "the next request", model.id if model else "?", slot.device, how, during)
        self._close_runtime(slot, f"its process died ({how})")
        return True

    def _preload_system_cache(self, runtime, model) -> Optional[tuple]:
        """Load the system prompt cache this model used last, when still valid (not
        where the system text goes into the runtime's template: no such caches)."""
        if runtime.capabilities.system_prompt_template:
            return None
        path = self.kv_services.preload_file(model)
        if path is None:
            return None
        try:
            runtime.load_prompt_cache(path)
        except Exception as exc:
            log.warning("preloading the system prompt cache %s failed: %s", path, exc)
            self.kv_services.prompt_caches.discard_system(path)   # rebuilt at next use
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
            slot.keep_alive = None
        if runtime is None:
            return
        if self.kv_services.snapshots is not None and model is not None:
            self.kv_services.snapshots.forget_model(model.id)
        log.info("unloading %s from %s: %s", model.id if model else "?", slot.device, reason)
        notify(self.observer, "model_unloaded", model.id if model else "?", slot.device)
        try:
            runtime.close()
        except Exception:
            log.exception("closing %s failed", model.id if model else "?")

    def _idle_limit(self, slot: DeviceSlot) -> Optional[float]:
        """Seconds the slot's model may stay idle: the client's keep-alive, else
        IDLE_UNLOAD_TIMEOUT; None = never unload."""
        limit = slot.keep_alive
        if limit is None:
            limit = self.settings.idle_unload_seconds if self.settings.idle_unload_seconds > 0 \
                else None
        return None if limit is None or limit == math.inf else limit

    def _watch_idle(self) -> None:
        interval = 1.0
        while not self._stop_event.wait(interval):
            limits = [(slot, self._idle_limit(slot)) for slot in self._slots.values()]
            active = [limit for _, limit in limits if limit is not None]
            interval = min([1.0] + [max(0.05, limit / 4) for limit in active])
            for slot, limit in limits:
                if limit is not None:
                    self._unload_if_idle(slot, limit)
            for residents in self._residents.values():
                for resident in residents.take_idle(self._resident_limit):
                    self._close_resident(resident, "idle")
            for slot in self._slots.values():
                self._bury_if_died_idle(slot)

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


def _failure_text(what: str, exc: Exception) -> str:
    """The client's message for a failed embedding or scoring run. A dead runtime
    process is told without its signal or exit status, as for a generation (README,
    "When the runtime crashes"): the log has those."""
    if isinstance(exc, RuntimeCrashed):
        return f"{what} failed: the model's runtime stopped; the server log has the details"
    return f"{what} failed: {exc}"

"""What the KV cache of one loaded runtime holds, and how a request reuses it:
tail-only turns, snapshots of displaced conversations, system-prompt and named
prompt caches beneath a conversation."""
from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Optional

from rkllm_api.config import Settings
from rkllm_api.engine import kvcache
from rkllm_api.engine.errors import CacheDamaged, CacheNotFound
from rkllm_api.runtimes.base import FinishReason, RunRequest, RunResult
from rkllm_api.text import prompts, tools

if TYPE_CHECKING:
    from rkllm_api.engine.generation import GenerationJob

log = logging.getLogger(__name__)

class KvMode(str, Enum):
    """How a run used the KV cache (the X-RKLLM-KV header, logs)."""
    REUSE = "reuse"            # only the new tail was prefilled
    RESUME = "resume"          # a snapshot of the conversation was restored first
    FULL = "full"              # the cache was reset and the whole prompt prefilled
    STANDALONE = "standalone"  # a turn that keeps nothing (completion, RAG, task)
    RAW = "raw"                # a job without a built prompt: sent as it is

    def __str__(self) -> str:
        return self.value


class CacheBase(str, Enum):
    """What lies beneath the conversation in the cache."""
    SYSTEM = "system-cache"    # the system prompt's prompt cache
    NAMED = "named-cache"      # a client's named prompt cache (use_cache)
    SNAPSHOT = "snapshot"      # a restored snapshot (it may carry a prompt cache floor)

    def __str__(self) -> str:
        return self.value


SEEN_SYSTEMS_MAX = 256          # system texts remembered for "seen before"
OPAQUE = ("opaque",)             # key of a kept turn whose conversation is not known
UNCOMMITTED = ("uncommitted",)   # a kept turn whose answer the API has not reported yet


@dataclass
class KvTicket:
    """What one run did to the KV cache, so after_run/commit can record the result."""
    serial: int
    mode: KvMode
    built: object = None         # prompts.BuiltPrompt (None for raw jobs)
    prefix: tuple = ()           # key entries of a named cache beneath the conversation
    snapshot_path: str = ""      # the NPU saves the prefilled state here during the run
    keep_history: bool = False
    dropped_cache: str = ""      # a named cache asked for that could not be used (removed)
    turns: bool = False          # sent as real turns: the runtime reused the common prefix
    extra_prefill_tokens: int = 0  # prefilled by cache-building runs before this run


class KvSession:
    """What the KV cache of one loaded runtime holds, and how to reuse it.

    `key` is the conversation in the cache (BuiltPrompt keys: every message, the
    answers and the system text included): None = nothing beyond `base`, OPAQUE = a
    kept turn of a job without a conversation, UNCOMMITTED = a kept turn whose answer
    was never reported (Generation.commit_answer). `base` is a loaded prompt cache
    beneath it: (CacheBase.SYSTEM, path) or (CacheBase.NAMED, path), None = none.

    A request whose history equals `key` sends only its new tail (keep_history=1); a
    request whose history a snapshot resumes gets it restored; anything else resets
    the cache and sends the whole prompt. Standalone prompts (completions, RAG, tasks)
    run on an empty cache with keep_history=0, after the conversation they displace
    was snapshotted (where the runtime can), so it resumes afterwards.
    Any abort, error or limit makes the content unknown: the next run resets it.
    Methods other than describe() are called by the slot's holder only.
    """

    def __init__(self, services: "KvServices" = None):
        self.services = services or KvServices.disabled()
        self.known = True
        self.key: Optional[tuple] = None
        self.base: Optional[tuple] = None
        self.model = None               # registry.ModelInfo of the runtime
        self._serial = 0
        self._pending: Optional[KvTicket] = None
        # The system text the runtime's template holds (use_system_prompt); None: the
        # model's own template. Part of what the cache means, so reset with it.
        self._template_system: Optional[str] = None
        self.lock = threading.Lock()

    def reset(self, model=None, base: Optional[tuple] = None) -> None:
        """A freshly loaded (or closed) runtime: empty cache, optionally a preloaded base."""
        with self.lock:
            self.known, self.key, self.base, self._pending = True, None, base, None
            self.model = model
            self._template_system = None

    # -- before the run
    def prepare(self, runtime, job: GenerationJob) -> tuple:
        """(the RunRequest to send, KvTicket). May clear, load or save KV state."""
        with self.lock:
            self._serial += 1
            serial, self._pending = self._serial, None
        built = job.conversation
        if not is_built_prompt(built):
            self.use_template_system(runtime, "")
            return self._prepare_raw(runtime, job, serial)
        if takes_turns(runtime, job, built):
            return self._prepare_turns(runtime, job, built, serial)
        # A named cache was prefilled without a system part: none beneath it either.
        template_system = "" if job.use_cache else built.system
        if self.use_template_system(runtime, template_system) and template_system:
            # The system text is the template's: the prompt is the rest.
            built = replace(built, text=built.conversation_text)
            job = replace(job, conversation=built, run=replace(job.run, prompt=built.text))
        if built.standalone or not job.run.keep_history:
            # A standalone prompt (completion, RAG turn, background task) must not see
            # another conversation: the runtimes keep earlier kept turns as context
            # under a keep_history=0 run. Snapshot the conversation (so it can resume)
            # and start from an empty cache.
            self._leave(runtime)
            self._reset_to(runtime, None)
            return replace(job.run, keep_history=False), KvTicket(serial, KvMode.STANDALONE, built)
        return self._prepare_conversation(runtime, job, built, serial)

    def use_template_system(self, runtime, system: str) -> bool:
        """Where the runtime takes the system prompt in its template (an NPU model
        without its tokenizer, models/system_templates.py): make it hold `system`.
        Changing it clears the KV cache, so the conversation there is snapshotted
        first and the cache is then known empty. False: no template system here
        (the system text stays at the top of the prompt)."""
        if not runtime.capabilities.system_prompt_template:
            return False
        if self._template_system == system:
            return True
        self._leave(runtime)
        with self.lock:
            self.known = False   # until the template holds the new system text
            base = self.base
        if base is not None:
            release_prompt_cache(runtime)
        try:
            runtime.use_system_prompt(system)
        except Exception:
            self._template_system = None   # unknown: the next request sets it again
            raise
        with self.lock:
            self.known, self.key, self.base = True, None, None
            self._template_system = system
        return True

    def _prepare_turns(self, runtime, job: GenerationJob, built, serial: int) -> tuple:
        """Real turns: the runtime keeps the longest common prefix of what its cache
        holds and prefills the rest, so nothing is cleared here. A snapshot of this
        conversation is restored when the cache holds another one (it may share more
        than the system prompt); the conversation displaced is snapshotted first."""
        run = replace(job.run, messages=built.turns, prompt=built.text,
                      continue_final=built.continues)
        if built.standalone or not job.run.keep_history:
            self._leave(runtime)
            with self.lock:   # the cache keeps a prefix of what it held: no conversation
                self.key = OPAQUE if self.known else None
            return (replace(run, keep_history=False),
                    KvTicket(serial, KvMode.STANDALONE, built, turns=True))
        prefix = adapter_prefix(job.run)
        history = prefix + built.history_key
        # FULL until the run says it kept a prefix (Generation: turns_mode).
        ticket = KvTicket(serial, KvMode.FULL, built, prefix, keep_history=True, turns=True)
        run = replace(run, keep_history=True)
        if not self.services.settings.kv_reuse:
            self._leave(runtime)
            self._reset_to(runtime, None)
            ticket.mode = KvMode.FULL
        elif not (self.known and self.key == history):
            resumed = self._resume(runtime, history, built, run)
            if resumed is not None:
                ticket.mode = KvMode.RESUME
            else:
                self._leave(runtime)
                self._system_beneath_turns(runtime, job, built, ticket)
        return run, ticket

    def _system_beneath_turns(self, runtime, job: GenerationJob, built, ticket) -> None:
        """A cache that does not start with this system text gets the system prompt's
        cache loaded (made first when the text was seen before): a cold model then
        prefills only the conversation. Only where a state file restores its tokens
        (llama.cpp), so the runtime can match the prompt against them."""
        services = self.services
        with self.lock:
            held = self.key if self.known else None
        if job.run.lora_adapter or not runtime.capabilities.snapshots:
            return
        path = services.system_cache_file(self.model, built.system)   # notes it as seen
        # A conversation key holds one ("system", text) entry, after any adapter entry.
        same_system = isinstance(held, tuple) and built.history_key[0] in held
        if path is None or same_system:   # the runtime keeps the system turn by itself
            return
        if not os.path.isfile(path):
            with self.lock:
                self.known = False   # the building run replaces the cache content
            outcome = services.prefill_to_file(runtime, built.system, path,
                                               turns=(("system", built.system),))
            ticket.extra_prefill_tokens += outcome.prefilled_tokens
            if not outcome:
                return
        try:
            self._reset_to(runtime, (CacheBase.SYSTEM, path))
            services.prompt_caches.remember_system(self.model.id, self.model.path, built.system)
        except Exception as exc:
            log.warning("system prompt cache %s not usable: %s", path, exc)
            services.prompt_caches.discard_system(path)
            with self.lock:
                self.known = False

    def _prepare_raw(self, runtime, job: GenerationJob, serial: int) -> tuple:
        """A job without a BuiltPrompt: sent as it is; a kept turn on an unknown
        cache clears it first."""
        if not job.run.keep_history:
            self._leave(runtime)   # as for standalone prompts: no foreign context
            self._reset_to(runtime, None)
        elif not self.known:
            runtime.clear_kv_cache()
            with self.lock:
                self.known, self.key, self.base = True, None, None
        return job.run, KvTicket(serial, KvMode.RAW, keep_history=job.run.keep_history)

    def _prepare_conversation(self, runtime, job: GenerationJob, built, serial: int) -> tuple:
        services = self.services
        dropped = ""
        if job.use_cache and not services.named_cache_usable(self.model, job.use_cache):
            # Damaged or gone since the request checked it: the whole prompt instead.
            dropped, job = job.use_cache, replace(job, use_cache="")
        # A turn computed with a LoRA adapter is another conversation than the same
        # text without it (or with another adapter or scale): the adapter is in the key.
        prefix = services.named_prefix(self.model, job.use_cache) + adapter_prefix(job.run)
        history = prefix + built.history_key
        run = replace(job.run, keep_history=True)
        ticket = KvTicket(serial, KvMode.FULL, built, prefix, keep_history=True,
                          dropped_cache=dropped)
        if services.settings.kv_reuse and built.tail_text:
            if self.known and self.key == history:
                # Held, but too full to take the tail and an answer: start over (a
                # snapshot of this conversation would be just as full).
                if self._has_room(runtime, built, run):
                    ticket.mode = KvMode.REUSE
                    run = replace(run, prompt=built.tail_text, role=built.tail_role)
            else:
                resumed = self._resume(runtime, history, built, run)
                if resumed is not None:
                    ticket.mode, run = KvMode.RESUME, resumed
        if ticket.mode is KvMode.FULL:
            self._leave(runtime)
            run = self._fresh_start(runtime, job, built, run, ticket)
        if services.snapshots_at_prefill(runtime):
            ticket.snapshot_path = services.snapshots.new_path(self.model.id)
            run = replace(run, prompt_cache_save_path=ticket.snapshot_path)
        return run, ticket

    def _has_room(self, runtime, built, run: RunRequest) -> bool:
        """The cache can take the tail and an answer ("nearly full" -> reset instead)."""
        kept = runtime.kv_length
        if kept is None:
            kept = built.prompt_tokens - built.tail_tokens
        answer_room = min(run.max_new_tokens or self.services.settings.default_max_tokens,
                          math.ceil(runtime.context_length / 4))
        return kept + built.tail_tokens + answer_room <= runtime.context_length

    def _resume(self, runtime, history: tuple, built, run: RunRequest) -> Optional[RunRequest]:
        """Restore the snapshot of this conversation; the run to send, or None."""
        store = self.services.snapshots
        if store is None:
            return None
        snapshot = store.take(self.model.id, history)
        if snapshot is None:
            return None
        if snapshot.missing_answer and built.tail_role != "user":
            store.discard(snapshot)
            return None
        self._leave(runtime)
        try:
            loaded = self.services.load_snapshot(runtime, snapshot.path)
        finally:
            store.discard(snapshot)
        if not loaded:
            with self.lock:
                self.known = False
            return None
        with self.lock:  # the snapshot may carry a prompt cache floor: reset releases it
            self.known, self.key, self.base = True, snapshot.holds, (CacheBase.SNAPSHOT, snapshot.path)
        prompt = built.tail_text
        if snapshot.missing_answer:  # saved at prefill: the last answer is not in it
            prompt = f"Assistant: {snapshot.missing_answer}\n\nUser: {built.tail_text}"
        return replace(run, prompt=prompt, role=built.tail_role)

    def clear_for_standalone(self, runtime) -> None:
        """Work that must see no other context runs next outside a generation (an
        embedding where hidden-layer runs share the KV cache): snapshot the
        conversation so it can resume, and empty the cache. An answer not committed
        yet is dropped, as when a standalone turn comes first."""
        with self.lock:
            self._serial += 1
            self._pending = None
        self._leave(runtime)
        # No chat's system text around an embedding or a reranker's judgement: the
        # same input gives the same result whatever chat ran before.
        self.use_template_system(runtime, "")
        self._reset_to(runtime, None)

    def leave_for_other_work(self, runtime) -> None:
        """Another kind of work is about to replace the cache: snapshot the conversation."""
        self._leave(runtime)
        with self.lock:
            self.known = False

    def _leave(self, runtime) -> None:
        """Save the conversation in the cache before it is replaced (runtimes that can
        save their state at any time; the NPU saved it during its last run)."""
        with self.lock:
            key = self.key if self.known else None
        store = self.services.snapshots
        if store is None or key in (None, OPAQUE, UNCOMMITTED):
            return
        path = store.new_path(self.model.id)
        if self.services.save_snapshot(runtime, path):
            store.put(kvcache.Snapshot(self.model.id, path, holds=key, resumes=key))

    def _fresh_start(self, runtime, job: GenerationJob, built, run: RunRequest,
                     ticket: Optional[KvTicket] = None) -> RunRequest:
        """Reset the cache (to a named or system prompt cache when one applies) and
        return the run carrying the whole prompt. A named cache the runtime refuses
        is removed, and the run goes on without it (the ticket says so)."""
        services = self.services
        if job.use_cache:
            path = services.named_cache_path(self.model, job.use_cache)
            try:
                self._reset_to(runtime, (CacheBase.NAMED, path))
                return replace(run, prompt=built.text, role="user")
            except Exception as exc:
                log.warning("named cache %s does not load, removed: %s", path, exc)
                services.prompt_caches.delete_named(self.model.id, job.use_cache)
                with self.lock:
                    self.known = False
                if ticket is not None:
                    ticket.dropped_cache, ticket.prefix = job.use_cache, adapter_prefix(job.run)
                job = replace(job, use_cache="")
        # The system prompt cache holds the base model's KV: never beneath an adapter,
        # nor where the system text is the template's (the cache would hold it twice).
        path = None
        if not job.run.lora_adapter and not runtime.capabilities.system_prompt_template:
            path = services.system_cache_file(self.model, built.system)
        if path is not None and not os.path.isfile(path):
            with self.lock:
                self.known = False   # the extra run below replaces the cache content
            built_file = services.prefill_to_file(runtime, built.system, path)
            if ticket is not None:
                ticket.extra_prefill_tokens += built_file.prefilled_tokens
            if not built_file:
                path = None
        if path is not None:
            try:
                self._reset_to(runtime, (CacheBase.SYSTEM, path))
                services.prompt_caches.remember_system(self.model.id, self.model.path,
                                                       built.system)
                return replace(run, prompt=built.conversation_text, role="user")
            except Exception as exc:  # a stale or corrupt file: prefill it all instead
                log.warning("system prompt cache %s not usable: %s", path, exc)
                services.prompt_caches.discard_system(path)
                with self.lock:
                    self.known = False
        self._reset_to(runtime, None)
        return replace(run, prompt=built.text, role="user")

    def _reset_to(self, runtime, base: Optional[tuple]) -> None:
        """Make the cache hold exactly `base` (a prompt cache) or nothing."""
        with self.lock:
            if self.known and self.key is None and self.base == base:
                return
            self.known = False  # until the calls below have succeeded
        if self.base is not None or base is not None:
            release_prompt_cache(runtime)
        runtime.clear_kv_cache()
        if base is not None:
            runtime.load_prompt_cache(base[1])
        with self.lock:
            self.known, self.key, self.base = True, None, base

    # -- after the run
    def after_run(self, ticket: Optional[KvTicket], result: Optional[RunResult]) -> None:
        completed = result is not None and result.finish_reason in (
            FinishReason.STOP, FinishReason.LENGTH)
        with self.lock:
            if ticket is None or not completed:
                self.known, self.key = False, None
                return
            if not ticket.keep_history:
                return  # keep_history=0 left the cache as it was (runtime contract)
            if ticket.mode is KvMode.RAW:
                self.key = OPAQUE
                return
            self.key, self._pending = UNCOMMITTED, ticket

    def commit(self, ticket: KvTicket, content: str, tool_calls) -> bool:
        """The API reports the answer of a completed kept run: the cache now holds
        key_after_answer. Ignored when another run touched the cache since."""
        with self.lock:
            if self._pending is None or self._pending.serial != ticket.serial:
                return False
            self._pending = None
            built = ticket.built
            self.key = ticket.prefix + built.key_after_answer(content, tool_calls)
            key = self.key
        if ticket.snapshot_path and self.services.snapshots is not None:
            self.services.snapshots.put(kvcache.Snapshot(
                self.model.id, ticket.snapshot_path, holds=ticket.prefix + built.full_key,
                resumes=key, missing_answer=_answer_text(content, tool_calls)))
        return True

    def describe(self) -> dict:
        with self.lock:
            return {"known": self.known,
                    "holds_conversation": self.known and self.key is not None,
                    "prompt_cache": self.base[0] if self.base else None}


def takes_turns(runtime, job, built) -> bool:
    """The conversation goes to the runtime as real turns of the model's template
    (a runtime that renders them; a named cache beneath keeps the text path)."""
    return bool(runtime.capabilities.chat_turns and built.turns and not job.use_cache
                and not getattr(job.run, "images", ()))   # images go as multimodal text


def adapter_prefix(run: RunRequest) -> tuple:
    """The KV key entry of a run's LoRA adapter and scale (none without one)."""
    if not run.lora_adapter:
        return ()
    return (("lora", run.lora_adapter, round(float(run.lora_scale), 6)),)


def is_built_prompt(value) -> bool:
    return value is not None and hasattr(value, "history_key") and hasattr(value, "tail_text")


def release_prompt_cache(runtime) -> None:
    try:
        runtime.release_prompt_cache()
    except Exception:  # nothing loaded, or the library refuses: clear_kv_cache follows
        log.debug("release_prompt_cache failed", exc_info=True)


def _answer_text(content: str, tool_calls) -> str:
    calls = tools.render_tool_calls_for_history(tool_calls or [])
    return "\n".join(part for part in ((content or "").strip(), calls) if part)


class KvServices:
    """Engine-wide helpers KvSession uses: settings, the snapshot store and the
    prompt-cache files, and the runtime calls that may be missing on a runtime."""

    def __init__(self, settings, snapshots=None, prompt_caches=None):
        self.settings = settings
        self.snapshots = snapshots            # kvcache.SnapshotStore or None (off)
        self.prompt_caches = prompt_caches    # kvcache.PromptCacheFiles or None
        self._seen_systems: OrderedDict = OrderedDict()   # system cache paths met once
        self._seen_lock = threading.Lock()

    @classmethod
    def disabled(cls) -> "KvServices":
        return cls(Settings(kv_snapshots=False, system_prompt_cache=False))

    @classmethod
    def from_settings(cls, settings) -> "KvServices":
        directory = os.path.expanduser(settings.kv_cache_dir)
        snapshots = None
        if settings.kv_snapshots:
            snapshots = kvcache.SnapshotStore(
                os.path.join(directory, "snapshots", f"pid-{os.getpid()}"),
                settings.kv_snapshot_max_entries, settings.kv_snapshot_max_mb * 1024 * 1024)
        return cls(settings, snapshots, kvcache.PromptCacheFiles(directory))

    def start(self) -> None:
        if self.snapshots is not None:
            self.snapshots.start()

    # -- snapshots
    def snapshots_at_prefill(self, runtime) -> bool:
        return self.snapshots is not None and runtime.capabilities.snapshots_at_prefill

    @staticmethod
    def save_snapshot(runtime, path: str) -> bool:
        if not runtime.capabilities.snapshots:
            return False
        try:
            return bool(runtime.save_kv_snapshot(path))
        except Exception:
            log.exception("saving a KV snapshot failed")
            return False

    @staticmethod
    def load_snapshot(runtime, path: str) -> bool:
        capabilities = runtime.capabilities
        if not (capabilities.snapshots or capabilities.snapshots_at_prefill):
            return False
        try:
            return bool(runtime.load_kv_snapshot(path))
        except Exception:
            log.exception("loading a KV snapshot failed")
            return False

    # -- prompt caches
    def named_prefix(self, model, name: str) -> tuple:
        if not name:
            return ()
        return ((CacheBase.NAMED, name, kvcache.model_identity(model.path)),)

    def named_cache_usable(self, model, name: str) -> bool:
        """The named cache is there and intact (a damaged one is removed)."""
        try:
            self.named_cache_path(model, name)
            return True
        except (CacheNotFound, CacheDamaged):
            return False

    def named_cache_path(self, model, name: str) -> str:
        cache = self.prompt_caches.named(model.id, model.path, name) if self.prompt_caches else None
        if cache is None:
            raise CacheNotFound(model.id, name)
        return cache.path

    def system_cache_file(self, model, system: str) -> Optional[str]:
        """Where the system prompt's cache lives; None when the feature is off or the
        text is too short to be worth it."""
        settings = self.settings
        if not (settings.system_prompt_cache and system and self.prompt_caches):
            return None
        if prompts.estimate_tokens(system) < settings.system_prompt_cache_min_tokens:
            return None
        path = self.prompt_caches.system_path(model.id, model.path, system)
        if not os.path.isfile(path) and not self._seen_before(path):
            return None   # a volatile system text (a clock in it) never pays a run or a file
        return path

    def _seen_before(self, path: str) -> bool:
        """True from the second time a system text (its cache path) comes by."""
        with self._seen_lock:
            seen = path in self._seen_systems
            self._seen_systems[path] = True
            self._seen_systems.move_to_end(path)
            while len(self._seen_systems) > SEEN_SYSTEMS_MAX:
                self._seen_systems.popitem(last=False)
        return seen

    def preload_file(self, model) -> Optional[str]:
        if not (self.settings.system_prompt_cache and self.prompt_caches):
            return None
        return self.prompt_caches.preload_path(model.id, model.path)

    @staticmethod
    def prefill_to_file(runtime, prompt: str, path: str, turns: tuple = ()) -> "PrefillOutcome":
        """Prefill prompt alone on an empty cache and save the state to path. The run
        keeps nothing (keep_history=0) and generates one token nobody reads. The
        outcome is true when the file was saved, and counts what the run prefilled
        (the request that caused it reports that work too)."""
        temporary = f"{path}.{os.getpid()}.tmp"
        release_prompt_cache(runtime)
        runtime.clear_kv_cache()
        result = runtime.run(RunRequest(prompt=prompt, keep_history=False, max_new_tokens=1,
                                        prompt_cache_save_path=temporary, messages=turns),
                             lambda event: None)
        spent = result.perf.prefill_tokens if result.perf is not None else 0
        if result.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH) or \
                not os.path.isfile(temporary):
            log.warning("could not save a prompt cache: %s", result.error or result.finish_reason)
            return PrefillOutcome(False, spent)
        os.replace(temporary, path)
        return PrefillOutcome(True, spent)


@dataclass(frozen=True)
class PrefillOutcome:
    """A cache-building run: whether the file was saved, and the tokens it prefilled."""
    saved: bool
    prefilled_tokens: int

    def __bool__(self) -> bool:
        return self.saved

"""Every setting of the server: its environment variable, default and type, in one place.

Nothing else reads the environment. `Settings.from_env()` is called once by the
entry points (api.create_app / the rkllm-api command); everything else receives
the Settings object.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Optional


def _env_name(field_name: str) -> str:
    return field_name.upper()


class SettingsError(ValueError):
    """An environment variable whose value the server cannot use; the message names
    the variable and what it expects."""


def _parse(raw: str, kind, name: str, choices: tuple = ()):
    if kind is bool or kind == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name} must be a boolean (1/0, true/false, yes/no, on/off), "
                            f"got {raw!r}")
    if kind is int or kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if kind is float or kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if choices and raw.strip().upper() not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    """Each field is read from the environment variable of the same name in
    upper case (e.g. `models_root` from RKLLM_MODELS_ROOT via `env` metadata)."""

    # --- server ---
    host: str = field(default="127.0.0.1", metadata={"env": "RKLLM_API_HOST"})
    port: int = field(default=8000, metadata={"env": "RKLLM_API_PORT"})
    max_request_bytes: int = field(default=50 * 1024 * 1024, metadata={"env": "MAX_REQUEST_BYTES"})
    log_level: str = field(default="INFO", metadata={
        "env": "RKLLM_API_LOG_LEVEL", "choices": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")})
    # A rotating log file beside stderr, one per instance: {port} is replaced by the port.
    # "" = stderr only; under systemd (journald) the server logs to stderr only anyway.
    log_file: str = field(default="~/.local/state/rkllm-api/rkllm-api-{port}.log",
                          metadata={"env": "RKLLM_API_LOG_FILE"})
    default_max_tokens: int = field(default=2048, metadata={"env": "DEFAULT_MAX_TOKENS"})
    # gunicorn gthread threads. Every request waiting in a device queue holds one, so
    # both queues full (2 x (queue_max_length + 1)) must leave threads for /health,
    # /v1/models and instant answers; slow clients hold none (http_worker.py reads
    # requests before a thread takes them). An idle thread costs a few kB.
    server_threads: int = field(default=40, metadata={"env": "RKLLM_API_THREADS"})

    # --- registry ---
    models_root: str = field(default="~/models", metadata={"env": "RKLLM_MODELS_ROOT"})
    include_bundled_model: bool = field(default=True, metadata={"env": "RKLLM_BUNDLED_MODEL"})
    default_context_length: int = field(default=4096, metadata={"env": "DEFAULT_CONTEXT_LENGTH"})
    # Model id or alias served when a request names none ("" = bundled model, else the first).
    default_model: str = field(default="", metadata={"env": "DEFAULT_MODEL"})
    # GGUF files often claim a huge training context; the KV cache for it costs RAM on a
    # board, so a context length read from GGUF metadata is capped to this.
    gguf_max_context_length: int = field(default=8192, metadata={"env": "GGUF_MAX_CONTEXT"})
    # Names clients hard-code mapped to local models: "gpt-4o-mini=qwen3-1.7b,gpt-4=qwen3-4b".
    model_aliases: str = field(default="", metadata={"env": "MODEL_ALIASES"})

    # --- runtime ---
    rkllm_lib_path: str = field(default="", metadata={"env": "RKLLM_LIB_PATH"})
    rkllm_abi: str = field(default="", metadata={"env": "RKLLM_ABI"})  # "", "1.2" or "1.3"
    cpu_threads: int = field(default=0, metadata={"env": "CPU_THREADS"})  # 0 = all cores

    # --- engine ---
    idle_unload_seconds: float = field(default=300.0, metadata={"env": "IDLE_UNLOAD_TIMEOUT"})
    queue_timeout_seconds: float = field(default=240.0, metadata={"env": "QUEUE_TIMEOUT"})
    queue_max_length: int = field(default=16, metadata={"env": "QUEUE_MAX_LENGTH"})
    first_token_timeout: float = field(default=300.0, metadata={"env": "FIRST_TOKEN_TIMEOUT"})
    silence_timeout: float = field(default=20.0, metadata={"env": "FALLBACK_SILENCE"})
    total_timeout: float = field(default=600.0, metadata={"env": "TOTAL_TIMEOUT"})
    heartbeat_seconds: float = field(default=15.0, metadata={"env": "SSE_HEARTBEAT_SECONDS"})
    repetition_window: int = field(default=200, metadata={"env": "REPETITION_WINDOW"})
    repetition_threshold: int = field(default=3, metadata={"env": "REPETITION_THRESHOLD"})

    # --- isolation (runtimes in child processes: runtimes/isolation.py) ---
    # Each loaded model's runtime runs in a child process, so a crash of librkllmrt or
    # llama.cpp ends that child, not the server. 0: in the server's process (debugging,
    # benchmarks).
    runtime_isolation: bool = field(default=True, metadata={"env": "RUNTIME_ISOLATION"})
    # A run asked to stop (a limit, its client gone) that still has not returned this
    # many seconds later is wedged in the runtime: its process is killed and the model
    # loaded again, so waiting requests get the device. 0: wait for it (up to 15 min).
    abort_kill_seconds: float = field(default=120.0, metadata={"env": "ABORT_KILL_SECONDS"})
    # NPU models kept loaded at once, each in its own librkllmrt domain (a text and a
    # vision-language model, say); 1: asking for another model switches (unloads first).
    npu_resident_models: int = field(default=1, metadata={"env": "NPU_RESIDENT_MODELS"})

    # --- conversation ---
    # Share of the context kept free for the current turn and the answer (prompts.py).
    history_context_reserve: float = field(default=0.35, metadata={"env": "HISTORY_CONTEXT_RESERVE"})
    # Characters kept of each prior assistant answer in the prompt; 0 = no cap.
    assistant_history_cap: int = field(default=1500, metadata={"env": "ASSISTANT_HISTORY_CAP"})
    # Estimated token counts are rough, so an estimated prompt may exceed the context
    # by this factor before it is rejected; tokenizer counts get no tolerance.
    context_overflow_tolerance: float = field(default=1.10, metadata={"env": "CONTEXT_OVERFLOW_TOLERANCE"})
    # KV reuse across turns (engine.KvSession): off = every turn prefills the whole prompt.
    kv_reuse: bool = field(default=True, metadata={"env": "KV_REUSE"})
    # Prompt caches and conversation snapshots live here (kvcache.py).
    kv_cache_dir: str = field(default="~/.cache/rkllm-api", metadata={"env": "KV_CACHE_DIR"})
    # Save the KV state of a conversation the engine leaves for another, restore it on return.
    kv_snapshots: bool = field(default=True, metadata={"env": "KV_SNAPSHOTS"})
    kv_snapshot_max_entries: int = field(default=8, metadata={"env": "KV_SNAPSHOT_MAX_ENTRIES"})
    kv_snapshot_max_mb: int = field(default=1024, metadata={"env": "KV_SNAPSHOT_MAX_MB"})
    # Prefilled system prompts saved per model and preloaded at load; only system texts of
    # at least this many tokens (estimated) are cached: a short one prefills faster than
    # the extra run and the file cost.
    system_prompt_cache: bool = field(default=True, metadata={"env": "SYSTEM_PROMPT_CACHE"})
    system_prompt_cache_min_tokens: int = field(default=128, metadata={"env": "SYSTEM_PROMPT_CACHE_MIN_TOKENS"})

    # --- clients ---
    # Instant answers to Open WebUI background tasks (clients.instant_answer); each can
    # be turned off so the model answers that task instead (thinking off, small budget).
    shortcut_title: bool = field(default=True, metadata={"env": "OWUI_SHORTCUT_TITLE"})
    shortcut_tags: bool = field(default=True, metadata={"env": "OWUI_SHORTCUT_TAGS"})
    shortcut_queries: bool = field(default=True, metadata={"env": "OWUI_SHORTCUT_QUERIES"})

    # --- rag ---
    # Paragraph scores (rag.score_paragraph): good prose without a query word tops
    # out at 2.5, each matched query word adds 1.5.
    rag_min_quality_score: float = field(default=2.0, metadata={"env": "RAG_MIN_QUALITY_SCORE"})
    rag_quality_floor_threshold: float = field(default=3.0, metadata={"env": "RAG_QUALITY_FLOOR_THRESHOLD"})
    rag_max_paragraphs: int = field(default=10, metadata={"env": "RAG_MAX_PARAGRAPHS"})
    rag_dedup_threshold: float = field(default=0.70, metadata={"env": "RAG_DEDUP_THRESHOLD"})  # Jaccard
    rag_cache_ttl: float = field(default=300.0, metadata={"env": "RAG_CACHE_TTL"})  # 0 = no cache
    rag_cache_size: int = field(default=50, metadata={"env": "RAG_CACHE_SIZE"})
    rag_below_ctx: int = field(default=8192, metadata={"env": "RAG_BELOW_CTX"})  # thinking off below
    rag_max_context_chars: int = field(default=12000, metadata={"env": "RAG_MAX_CONTEXT_CHARS"})
    rag_context_share: float = field(default=0.5, metadata={"env": "RAG_CONTEXT_SHARE"})  # of the window
    rag_menu_run_lines: int = field(default=4, metadata={"env": "RAG_MENU_RUN_LINES"})
    rag_menu_line_chars: int = field(default=30, metadata={"env": "RAG_MENU_LINE_CHARS"})
    rag_min_line_chars: int = field(default=40, metadata={"env": "RAG_MIN_LINE_CHARS"})

    # --- embeddings, reranking ---
    # Model for /v1/embeddings and /v1/rerank requests that name none ("" = the first
    # model marked "embedding", else the default model).
    embedding_model: str = field(default="", metadata={"env": "EMBEDDING_MODEL"})
    # Inputs one embeddings request (or documents one rerank request) may carry.
    embed_max_inputs: int = field(default=2048, metadata={"env": "EMBED_MAX_INPUTS"})
    # Model for /v1/rerank requests that name none, scored as a reranker (yes/no
    # answer logits, rkllm_api/relevance.py) even when not marked as one ("" = the first
    # model marked "reranker", else embedding similarity with the embedding model).
    rerank_model: str = field(default="", metadata={"env": "RERANK_MODEL"})

    # --- lan: keys, origins, connections, named caches (security.py, http_worker.py) ---
    # API keys, comma-separated; none (and no file) = no authentication.
    api_keys: str = field(default="", metadata={"env": "RKLLM_API_KEYS"})
    # One key per line: "KEY [NAME] [admin]"; '#' starts a comment.
    api_keys_file: str = field(default="", metadata={"env": "RKLLM_API_KEYS_FILE"})
    # Keys that may also manage the server: model select, unload, pull and delete, named
    # cache create and delete.
    admin_keys: str = field(default="", metadata={"env": "RKLLM_ADMIN_KEYS"})
    # Client addresses that need no key (IPs or networks, comma-separated: a Home
    # Assistant whose Ollama integration cannot send one); never admin.
    keyless_clients: str = field(default="", metadata={"env": "KEYLESS_CLIENTS"})
    # Browser origins allowed to call the API ("http://host:port", comma-separated).
    cors_origins: str = field(default="", metadata={"env": "CORS_ORIGINS"})
    # /metrics without a key even when keys are set.
    metrics_public: bool = field(default=False, metadata={"env": "METRICS_PUBLIC"})
    # Open connections the worker holds at most (idle keep-alive ones included).
    max_connections: int = field(default=256, metadata={"env": "RKLLM_API_MAX_CONNECTIONS"})
    # Seconds a client has to send its request head, then its body; a response write
    # that cannot progress for send_timeout seconds drops the client (and its run).
    header_timeout: float = field(default=10.0, metadata={"env": "REQUEST_HEADER_TIMEOUT"})
    body_timeout: float = field(default=60.0, metadata={"env": "REQUEST_BODY_TIMEOUT"})
    send_timeout: float = field(default=30.0, metadata={"env": "SEND_TIMEOUT"})
    # Named prompt caches per model: how many, and how many MB together.
    named_cache_max_count: int = field(default=16, metadata={"env": "NAMED_CACHE_MAX_COUNT"})
    named_cache_max_mb: int = field(default=2048, metadata={"env": "NAMED_CACHE_MAX_MB"})

    # --- vision (vision_service.py, image_fetch.py) ---
    # librknnrt for the vision encoders ("" = beside librkllmrt, the usual folders, the linker).
    rknn_lib_path: str = field(default="", metadata={"env": "RKNN_LIB_PATH"})
    # A request with images for a model without vision goes to VISION_MODEL (or the first
    # model with vision) and says so in X-RKLLM-Routed-To; off: a 400 naming the model.
    vl_routing: bool = field(default=True, metadata={"env": "VL_ROUTING"})
    vision_model: str = field(default="", metadata={"env": "VISION_MODEL"})
    image_max_bytes: int = field(default=20 * 1024 * 1024, metadata={"env": "IMAGE_MAX_BYTES"})
    image_max_pixels: int = field(default=50_000_000, metadata={"env": "IMAGE_MAX_PIXELS"})
    # Images in one request, the conversation's earlier ones included (each costs
    # hundreds of tokens and an encoder run).
    image_max_count: int = field(default=4, metadata={"env": "IMAGE_MAX_COUNT"})
    # http(s) image URLs: fetched at all, within this many seconds, and whether hosts
    # with loopback, private or link-local addresses may be fetched.
    image_url_fetch: bool = field(default=True, metadata={"env": "IMAGE_URL_FETCH"})
    image_url_timeout: float = field(default=10.0, metadata={"env": "IMAGE_URL_TIMEOUT"})
    image_url_private: bool = field(default=False, metadata={"env": "IMAGE_URL_PRIVATE"})
    # Encoder outputs kept by image digest, so a follow-up does not encode its image again.
    image_embedding_cache: int = field(default=16, metadata={"env": "IMAGE_EMBEDDING_CACHE"})

    # --- board ---
    # Prefix of /dev, /sys and /proc for the startup checks and the NPU metrics (tests
    # point it at a fake tree).
    system_root: str = field(default="/", metadata={"env": "RKLLM_SYSTEM_ROOT"})

    @classmethod
    def from_env(cls, environ: Optional[dict] = None, **overrides) -> "Settings":
        """Raises SettingsError naming the variable when a value does not parse."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = f.metadata.get("env", _env_name(f.name))
            if name in env:
                values[f.name] = _parse(env[name], f.type, name, f.metadata.get("choices", ()))
        values.update(overrides)
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    @property
    def models_root_path(self) -> str:
        return os.path.expanduser(self.models_root)

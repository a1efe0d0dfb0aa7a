"""Ollama wire types: request bodies -> the typed request, and the objects we answer.

The shapes are those of Ollama's docs/api.md (`/api/chat`, `/api/generate`,
`/api/embed`, ...). Nothing here knows Flask or the engine: parse functions take the
decoded JSON body and return rkllm_api.request types (or raise RequestError, which
routes.py renders as Ollama's `{"error": "..."}`); builders turn pipeline results
into the NDJSON objects Ollama's clients read.

What differs from the OpenAI surface, decided here once:
- `stream` defaults to true;
- sampling lives in `options` (num_predict, temperature, top_p, top_k,
  repeat_penalty, presence/frequency_penalty, stop, seed, num_ctx); other Ollama
  options (mirostat, num_gpu, ...) mean nothing here and are ignored, as Ollama
  ignores options a model does not use;
- images are bare base64 strings beside the text; tool-call arguments are JSON
  objects, not JSON text;
- `think` is true/false or an effort ("low", "medium", "high": on);
- `format` is "json" or a JSON schema;
- `keep_alive` is a duration ("5m", "1h30m", "300ms"), a number of seconds, a
  negative value (keep loaded) or 0 (unload now).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from rkllm_api.errors import RequestError
from rkllm_api.fields import (INT32_MAX, is_int, is_number, message_role, optional_bool,
                              optional_str, stop_sequences)
from rkllm_api.openai.protocol import parse_tool_request
from rkllm_api.request import (ChatRequest, CompletionRequest, ImagePart, Message, ResponseFormat,
                               TextPart, ToolCall)
from rkllm_api.runtimes.base import SamplingParams

ROLES = ("system", "user", "assistant", "tool")
THINK_LEVELS = ("low", "medium", "high")
FOREVER = math.inf
KEEP_ALIVE_CAP = 100 * 365 * 24 * 3600.0   # longer than this is "until unloaded"

# ----------------------------------------------------------------------------
# errors


def error_of(error: RequestError) -> dict:
    """Ollama's error body."""
    return {"error": error.message}


# ----------------------------------------------------------------------------
# small field readers


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def model_name(body: dict) -> str:
    """The `model` field (required by every Ollama endpoint; `name` is its old name)."""
    value = body.get("model", body.get("name"))
    if not isinstance(value, str) or not value.strip():
        raise RequestError("'model' is required: the name of a model from /api/tags",
                           param="model")
    return value.strip()


def name_candidates(name: str) -> list:
    """Registry names to try for an Ollama model name: as given, without the
    `:latest` tag, and with a tag joined by "-" ("qwen3:1.7b" -> "qwen3-1.7b")."""
    candidates = [name]
    base, _, tag = name.partition(":")
    if tag:
        # Any case: model ids resolve case-insensitively, so "X:LATEST" is "x:latest".
        candidates.append(base if tag.lower() == "latest" else f"{base}-{tag}")
    return candidates


def tagged(model_id: str) -> str:
    """A registry id as an Ollama name."""
    return model_id if ":" in model_id else f"{model_id}:latest"


# ----------------------------------------------------------------------------
# keep_alive

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                 "m": 60.0, "h": 3600.0}


def keep_alive(body: dict) -> Optional[float]:
    """Seconds to keep the model loaded after this request: None (the server's
    IDLE_UNLOAD_TIMEOUT), 0 (unload now), FOREVER (negative values), or a duration."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if is_number(value):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_seconds(value.strip())
    else:
        raise RequestError("'keep_alive' must be a duration such as \"5m\", a number of "
                           "seconds, or a negative value to keep the model loaded",
                           param="keep_alive")
    return FOREVER if seconds < 0 or seconds > KEEP_ALIVE_CAP else seconds


def _duration_seconds(text: str) -> float:
    """Go's duration syntax ("1h30m", "-1s", "300ms"), or a plain number of seconds."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
        raise RequestError(f"'keep_alive' {text!r} is not a duration", param="keep_alive")
    sign = -1.0 if text.startswith("-") else 1.0
    rest = text.lstrip("+-")
    parts = _DURATION_PART.findall(rest)
    if not rest or "".join(number + unit for number, unit in parts) != rest:
        raise RequestError(f"'keep_alive' {text!r} is not a duration (e.g. \"5m\", "
                           "\"1h30m\", \"-1\")", param="keep_alive")
    return sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


# ----------------------------------------------------------------------------
# options, format, think


@dataclass(frozen=True)
class Options:
    sampling: SamplingParams
    max_tokens: Optional[int]
    stop: tuple
    context_length: Optional[int]


def _number_option(options: dict, name: str, low: float, high: float) -> Optional[float]:
    value = options.get(name)
    if value is None:
        return None
    if not is_number(value) or not low <= value <= high:
        raise RequestError(f"'options.{name}' must be a number from {low:g} to {high:g}",
                           param=f"options.{name}")
    return float(value)


def _int_option(options: dict, name: str, low: int, high: int = INT32_MAX) -> Optional[int]:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value) or not low <= value <= high:
        raise RequestError(f"'options.{name}' must be an integer from {low} to {high}",
                           param=f"options.{name}")
    return value


def _stop_option(options: dict) -> tuple:
    return stop_sequences(options.get("stop"), "options.stop", most=16)


def parse_options(body: dict) -> Options:
    value = body.get("options")
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RequestError("'options' must be an object", param="options")
    # num_predict: -1 is "no limit", -2 "fill the context": both the server's budget.
    predict = _int_option(value, "num_predict", -2)
    sampling = SamplingParams(
        temperature=_number_option(value, "temperature", 0.0, 100.0),
        top_p=_number_option(value, "top_p", 0.0, 1.0),
        top_k=_int_option(value, "top_k", 0),
        repeat_penalty=_number_option(value, "repeat_penalty", 0.0, 100.0),
        frequency_penalty=_number_option(value, "frequency_penalty", -100.0, 100.0),
        presence_penalty=_number_option(value, "presence_penalty", -100.0, 100.0),
        seed=_int_option(value, "seed", -(2 ** 63), 2 ** 64 - 1),
    )
    return Options(sampling, predict if predict and predict > 0 else None, _stop_option(value),
                   _int_option(value, "num_ctx", 1))


def response_format(body: dict) -> ResponseFormat:
    value = body.get("format")
    if value is None or value == "":
        return ResponseFormat(source="format")
    if value == "json":
        return ResponseFormat("json_object", source="format")
    if isinstance(value, dict):
        return ResponseFormat("json_schema", value, "format", strict=True, source="format")
    raise RequestError("'format' must be \"json\" or a JSON schema object", param="format")


def think(body: dict) -> Optional[bool]:
    value = body.get("think")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in THINK_LEVELS:
        return True
    raise RequestError(f"'think' must be true, false or one of {', '.join(THINK_LEVELS)}",
                       param="think")


# ----------------------------------------------------------------------------
# images

_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


def image_part(value, param: str) -> ImagePart:
    """A base64 image (what Ollama takes) as a data URL; a data URL is kept as it is."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"'{param}' must be a base64-encoded image", param=param)
    value = value.strip()
    if value[:5].lower() == "data:":   # a URL scheme: any case (RFC 3986)
        return ImagePart(value)
    packed = "".join(value.split())
    if len(packed) % 4 or not _BASE64.match(packed):
        raise RequestError(f"'{param}' is not valid base64", param=param)
    try:
        head = base64.b64decode(packed[:16])
    except binascii.Error:
        raise RequestError(f"'{param}' is not valid base64", param=param) from None
    mime = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if mime is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    # Unknown magic: no media type, so the decoder says what is wrong with the bytes
    # (not "holds application/octet-stream", about a data URL the client never sent)
    return ImagePart(f"data:{mime or ''};base64,{packed}")


def _images(raw: dict, where: str) -> tuple:
    value = raw.get("images")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RequestError(f"'{where}.images' must be a list of base64 strings",
                           param=f"{where}.images")
    return tuple(image_part(item, f"{where}.images[{i}]") for i, item in enumerate(value))


# ----------------------------------------------------------------------------
# chat


def _history_call(call, index: int, where: str) -> ToolCall:
    param = f"{where}.tool_calls[{index}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"'{param}.function.name' must be a string", param=param)
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):   # some clients echo the JSON text back
        text = arguments
    elif isinstance(arguments, dict):
        text = json.dumps(arguments, ensure_ascii=False)
    else:
        raise RequestError(f"'{param}.function.arguments' must be an object", param=param)
    call_id = call.get("id") or ""
    return ToolCall(function["name"], text, call_id if isinstance(call_id, str) else "")


class _CallNames:
    """Which function a tool result answers: by the call's id when the client sends
    one (Open WebUI), else the earlier calls in order (Ollama's clients send none)."""

    def __init__(self):
        self.by_id: dict = {}
        self.pending: list = []

    def add(self, call: ToolCall) -> None:
        self.pending.append(call.name)
        if call.id:
            self.by_id[call.id] = call.name

    def answered(self, call_id: str) -> str:
        if call_id and call_id in self.by_id:
            name = self.by_id[call_id]
            if name in self.pending:
                self.pending.remove(name)
            return name
        return self.pending.pop(0) if self.pending else ""


def _message(raw, index: int, calls: _CallNames) -> Message:
    where, role = message_role(raw, index, ROLES)
    content = optional_str(raw, "content", where)   # errors name messages[i].content
    listed = raw.get("tool_calls") if role == "assistant" else None
    if listed is not None and not isinstance(listed, list):
        raise RequestError(f"'{where}.tool_calls' must be a list", param=f"{where}.tool_calls")
    history_calls = tuple(_history_call(c, i, where) for i, c in enumerate(listed or ()))
    for call in history_calls:
        calls.add(call)
    name = optional_str(raw, "tool_name", where) or optional_str(raw, "name", where)
    call_id = optional_str(raw, "tool_call_id", where)
    if role == "tool" and not name:
        name = calls.answered(call_id)
    parts = ((TextPart(content),) if content or not history_calls else ()) + _images(raw, where)
    return Message(role, parts, history_calls, call_id, name)


def parse_messages(value) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RequestError("'messages' must be a list", param="messages")
    calls = _CallNames()
    return tuple(_message(m, i, calls) for i, m in enumerate(value))


def _tools(body: dict):
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    return parse_tool_request({"tools": tools})


@dataclass(frozen=True)
class ChatCall:
    """A parsed /api/chat body: the typed request, or nothing to answer (empty
    messages: load or unload the model, per keep_alive)."""
    name: str
    request: Optional[ChatRequest]
    keep_alive: Optional[float]


def parse_chat(body, model_id: str) -> ChatCall:
    body = _object(body)
    name = model_name(body)
    messages = parse_messages(body.get("messages"))
    options = parse_options(body)
    alive = keep_alive(body)
    if not messages:
        return ChatCall(name, None, alive)
    request = ChatRequest(
        model=model_id, messages=messages, stream=optional_bool(body, "stream", True),
        include_usage=True, max_tokens=options.max_tokens, stop=options.stop,
        sampling=options.sampling, tools=_tools(body), thinking=think(body),
        response_format=response_format(body), context_length=options.context_length)
    return ChatCall(name, request, alive)


# ----------------------------------------------------------------------------
# generate


@dataclass(frozen=True)
class GenerateCall:
    name: str
    request: object            # ChatRequest, CompletionRequest (raw), or None (load/unload)
    keep_alive: Optional[float]


def parse_generate(body, model_id: str) -> GenerateCall:
    body = _object(body)
    name = model_name(body)
    prompt, system = optional_str(body, "prompt"), optional_str(body, "system")
    if optional_str(body, "suffix"):
        raise RequestError("'suffix' (fill in the middle) is not supported", param="suffix")
    images = _images(body, "request")
    options = parse_options(body)
    alive = keep_alive(body)
    stream = optional_bool(body, "stream", True)
    optional_str(body, "template")            # checked, not used: the model's template applies
    context = body.get("context")             # checked, not used (deprecated: send messages)
    if context is not None and not (isinstance(context, list) and all(is_int(t) for t in context)):
        raise RequestError("'context' must be a list of token ids (it is ignored: send the "
                           "conversation as /api/chat messages)", param="context")
    if not prompt and not images:
        return GenerateCall(name, None, alive)
    if optional_bool(body, "raw", False):
        for field in ("images", "format"):
            if body.get(field):
                raise RequestError(f"'{field}' cannot be used with 'raw'", param=field)
        return GenerateCall(name, CompletionRequest(
            model=model_id, prompt=prompt, stream=stream, include_usage=True,
            max_tokens=options.max_tokens, stop=options.stop, sampling=options.sampling,
            context_length=options.context_length), alive)
    messages = ((Message("system", (TextPart(system),)),) if system else ()) + \
        (Message("user", (TextPart(prompt),) + images),)
    return GenerateCall(name, ChatRequest(
        model=model_id, messages=messages, stream=stream, include_usage=True,
        max_tokens=options.max_tokens, stop=options.stop, sampling=options.sampling,
        thinking=think(body), response_format=response_format(body),
        context_length=options.context_length), alive)


# ----------------------------------------------------------------------------
# embeddings


def embed_inputs(body: dict, legacy: bool, max_inputs: int) -> list:
    """The texts of /api/embed (`input`: a string or a list of strings, at most
    max_inputs = EMBED_MAX_INPUTS of them) or of the legacy /api/embeddings (`prompt`)."""
    if legacy:
        return [optional_str(body, "prompt")]
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        # The same bound as /v1/embeddings: without it one request holds the device
        # for as many inputs as a body can carry.
        if len(value) > max_inputs:
            raise RequestError(f"'input' may hold at most {max_inputs} items "
                               "(EMBED_MAX_INPUTS)", param="input")
        return value
    raise RequestError("'input' must be a string or a non-empty list of strings",
                       param="input")


def dimensions(body: dict) -> Optional[int]:
    value = body.get("dimensions")
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise RequestError("'dimensions' must be a positive integer", param="dimensions")
    return value


# ----------------------------------------------------------------------------
# answers


def timestamp() -> str:
    """created_at: UTC, RFC 3339 with a Z, as Ollama writes it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_time(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).isoformat()


DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "error": "error"}


def statistics(usage, total_seconds: float) -> dict:
    """The counts and durations (nanoseconds) of a final object, from the runtime's
    perf figures (pipeline.Usage, summed over every run the answer took). The prompt
    count is what the runtime evaluated, so count / duration is its speed; tokens the
    KV cache already held are not in it (the OpenAI surface's usage counts them)."""
    return {"total_duration": int(total_seconds * 1e9),
            "load_duration": int(usage.load_ms * 1e6),
            "prompt_eval_count": usage.evaluated_tokens,
            "prompt_eval_duration": int(usage.prompt_ms * 1e6),
            "eval_count": usage.completion_tokens,
            "eval_duration": int(usage.completion_ms * 1e6)}


def tool_calls_out(calls: list) -> list:
    """OpenAI-shaped calls (pipeline) as Ollama's: arguments a JSON object."""
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {}
        if not isinstance(arguments, dict):
            arguments = {"value": arguments}
        out.append({"id": call.get("id") or f"call_{index}",
                    "function": {"index": index, "name": function.get("name", ""),
                                 "arguments": arguments}})
    return out

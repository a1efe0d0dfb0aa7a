"""OpenAI wire types: request validation and response/chunk builders.

Everything the HTTP layer says to or accepts from a client in the OpenAI format
lives here, apart from the serving logic in api.py (the split vLLM makes between
its protocol models and its serving code). Nothing here knows Flask, the engine
or a runtime: parse functions take the decoded JSON body and return plain
dataclasses or raise RequestError; builders turn pipeline results into dicts
and server-sent-event lines.

The streaming path is hot: chunk builders render each kind of chunk from a JSON
template split once around its variable part, so a token costs one
json.dumps of a string and two concatenations.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from runtime import SamplingParams

# ----------------------------------------------------------------------------
# errors


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_not_found(model: str) -> RequestError:
    return RequestError(f"The model '{model}' does not exist", status=404, param="model",
                        code="model_not_found")


def server_busy(message: str, retry_after: int) -> RequestError:
    return RequestError(message, status=503, type="server_error", code="server_busy",
                        headers={"Retry-After": str(max(1, int(retry_after)))})


def runtime_failure(message: str) -> RequestError:
    return RequestError(message, status=500, type="server_error", code="runtime_error")


# ----------------------------------------------------------------------------
# field checks: each reads one field of the body and refuses a wrong type with a 400


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_number(body: dict, name: str, low: float, high: float) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or not low <= value <= high:
        raise RequestError(f"'{name}' must be a number between {low:g} and {high:g}",
                           param=name)
    return float(value)


def _optional_int(body: dict, name: str, minimum: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < minimum:
        raise RequestError(f"'{name}' must be an integer >= {minimum}", param=name)
    return value


def _optional_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be a boolean", param=name)
    return value


def _optional_object(body: dict, name: str) -> dict:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"'{name}' must be an object", param=name)
    return value


def _optional_list_of_objects(body: dict, name: str) -> Optional[list]:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise RequestError(f"'{name}' must be a list of objects", param=name)
    return value


def _model_name(body: dict) -> Optional[str]:
    """The requested model; None means "the server's default model"."""
    value = body.get("model")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RequestError("'model' must be a non-empty string", param="model")
    return value.strip()


def _stop_sequences(body: dict) -> tuple:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    if len(value) > 4:
        raise RequestError("'stop' may hold at most 4 sequences", param="stop")
    return tuple(s for s in value if s)  # an empty stop string can never be matched


def _max_tokens(body: dict) -> Optional[int]:
    newer = _optional_int(body, "max_completion_tokens", 1)
    older = _optional_int(body, "max_tokens", 1)
    return newer if newer is not None else older


def _sampling(body: dict) -> SamplingParams:
    return SamplingParams(
        temperature=_optional_number(body, "temperature", 0.0, 2.0),
        top_p=_optional_number(body, "top_p", 0.0, 1.0),
        top_k=_optional_int(body, "top_k", 0),
        repeat_penalty=_optional_number(body, "repeat_penalty", 0.0, 10.0),
        frequency_penalty=_optional_number(body, "frequency_penalty", -2.0, 2.0),
        presence_penalty=_optional_number(body, "presence_penalty", -2.0, 2.0),
        seed=_optional_int(body, "seed", -(2 ** 63)),
    )


def _check_n(body: dict) -> None:
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise RequestError("only 'n': 1 is supported", param="n")


def _include_usage(body: dict) -> bool:
    options = _optional_object(body, "stream_options")
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise RequestError("'stream_options.include_usage' must be a boolean",
                           param="stream_options")
    return bool(value)


# ----------------------------------------------------------------------------
# chat completion requests

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TEXT_PART_TYPES = ("text", "input_text")
IMAGE_PART_TYPES = ("image_url", "input_image", "image")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


@dataclass(frozen=True)
class ChatRequest:
    model: Optional[str]
    messages: list            # dicts: role, content (str), plus tool fields when given
    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None
    stop: tuple = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: Optional[list] = None
    tool_choice: Any = None
    reasoning_effort: Optional[str] = None
    enable_thinking: Optional[bool] = None    # chat_template_kwargs.enable_thinking
    body: dict = field(default_factory=dict)  # the raw body, for modules that read more


def _content_text(content, index: int) -> Optional[str]:
    """A message's content as one string; array parts are joined (text only for now)."""
    param = f"messages[{index}].content"
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"'{param}' must be a string or a list of content parts",
                           param=param)
    texts = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(f"'{param}' parts must be objects with a 'type'", param=param)
        kind = part["type"]
        if kind in IMAGE_PART_TYPES:
            raise RequestError("this model does not accept images", param=param)
        if kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise RequestError(f"'{param}' has an unsupported part: {kind!r}", param=param)
        texts.append(part["text"])
    return "\n".join(texts)


def _message(raw, index: int) -> dict:
    if not isinstance(raw, dict):
        raise RequestError(f"'messages[{index}]' must be an object", param="messages")
    role = raw.get("role")
    if role not in MESSAGE_ROLES:
        raise RequestError(f"'messages[{index}].role' must be one of {', '.join(MESSAGE_ROLES)}",
                           param=f"messages[{index}].role")
    message = dict(raw)
    message["content"] = _content_text(raw.get("content"), index)
    if message["content"] is None and role not in ("assistant", "function"):
        raise RequestError(f"'messages[{index}].content' is required for role '{role}'",
                           param=f"messages[{index}].content")
    if raw.get("tool_calls") is not None and not isinstance(raw["tool_calls"], list):
        raise RequestError(f"'messages[{index}].tool_calls' must be a list",
                           param=f"messages[{index}].tool_calls")
    return message


def _thinking_switch(body: dict) -> tuple:
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        effort = effort.lower()
    if effort is not None and effort not in REASONING_EFFORTS:
        raise RequestError(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}",
                           param="reasoning_effort")
    kwargs = _optional_object(body, "chat_template_kwargs")
    enable = kwargs.get("enable_thinking")
    if enable is not None and not isinstance(enable, bool):
        raise RequestError("'chat_template_kwargs.enable_thinking' must be a boolean",
                           param="chat_template_kwargs")
    return effort, enable


def parse_chat_request(body) -> ChatRequest:
    """Validate a /v1/chat/completions body. Unknown fields are ignored."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and not isinstance(tool_choice, (str, dict)):
        raise RequestError("'tool_choice' must be a string or an object", param="tool_choice")
    _optional_list_of_objects(body, "functions")
    _check_n(body)
    effort, enable = _thinking_switch(body)
    return ChatRequest(
        model=_model_name(body),
        messages=[_message(m, i) for i, m in enumerate(messages)],
        stream=_optional_bool(body, "stream"),
        include_usage=_include_usage(body),
        max_tokens=_max_tokens(body),
        stop=_stop_sequences(body),
        sampling=_sampling(body),
        tools=_optional_list_of_objects(body, "tools"),
        tool_choice=tool_choice,
        reasoning_effort=effort,
        enable_thinking=enable,
        body=body,
    )


# ----------------------------------------------------------------------------
# text completion requests


@dataclass(frozen=True)
class CompletionRequest:
    model: Optional[str]
    prompt: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None
    stop: tuple = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    body: dict = field(default_factory=dict)


def _prompt_text(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string or a list of one string",
                           param="prompt")
    return prompt


def parse_completion_request(body) -> CompletionRequest:
    """Validate a /v1/completions body. Unknown fields are ignored."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if _optional_bool(body, "echo"):
        raise RequestError("'echo' is not supported", param="echo")
    _check_n(body)
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestError("only 'best_of': 1 is supported", param="best_of")
    return CompletionRequest(
        model=_model_name(body),
        prompt=_prompt_text(body),
        stream=_optional_bool(body, "stream"),
        include_usage=_include_usage(body),
        max_tokens=_max_tokens(body),
        stop=_stop_sequences(body),
        sampling=_sampling(body),
        body=body,
    )


def model_field(body, required: bool) -> Optional[str]:
    """The 'model' of a management request body (select / unload)."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = _model_name(body)
    if required and model is None:
        raise RequestError("'model' is required", param="model")
    return model


# ----------------------------------------------------------------------------
# responses


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


DONE_LINE = "data: [DONE]\n\n"
KEEP_ALIVE_LINE = ": keep-alive\n\n"
_COMPACT = {"separators": (",", ":"), "ensure_ascii": False}
_SLOT = "\u0000slot\u0000"  # a marker that json.dumps renders as a unique quoted string


def sse_line(payload: dict) -> str:
    return "data: " + json.dumps(payload, **_COMPACT) + "\n\n"


class _SseTemplate:
    """An SSE line with one string-valued slot, rendered by concatenation."""

    __slots__ = ("head", "tail")

    def __init__(self, payload: dict):
        rendered = sse_line(payload)
        marker = json.dumps(_SLOT, **_COMPACT)
        self.head, self.tail = rendered.split(marker)

    def render(self, text: str) -> str:
        return self.head + json.dumps(text, ensure_ascii=False) + self.tail


def new_response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ChatChunks:
    """Chunks and the final body of one chat.completion response: one id,
    created time, model and system_fingerprint shared by everything it builds."""

    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, model: str, system_fingerprint: str, include_usage: bool = False,
                 legacy_functions: bool = False):
        self.id = new_response_id(self.id_prefix)
        # A request that used `functions` gets the pre-tools answer: one function_call.
        self.legacy_functions = legacy_functions
        self.created = int(time.time())
        self.model = model
        self.system_fingerprint = system_fingerprint
        self.include_usage = include_usage
        self._make_templates()

    def _make_templates(self) -> None:
        self._content = _SseTemplate(self._chunk({"content": _SLOT}))
        self._reasoning = _SseTemplate(self._chunk({"reasoning_content": _SLOT}))

    def _envelope(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model, "system_fingerprint": self.system_fingerprint}

    def _chunk(self, delta: dict, finish_reason: Optional[str] = None) -> dict:
        chunk = self._envelope(self.object_name)
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]
        if self.include_usage:
            chunk["usage"] = None  # OpenAI marks every chunk but the last this way
        return chunk

    def role(self) -> Optional[str]:
        return sse_line(self._chunk({"role": "assistant", "content": ""}))

    def content(self, text: str) -> str:
        return self._content.render(text)

    def reasoning(self, text: str) -> str:
        return self._reasoning.render(text)

    def tool_calls(self, calls: list) -> str:
        """calls: OpenAI tool-call deltas ({index, id?, type?, function: {...}})."""
        if self.legacy_functions:
            return sse_line(self._chunk({"function_call": calls[0].get("function", {})}))
        return sse_line(self._chunk({"tool_calls": calls}))

    def finish(self, reason: str) -> str:
        return sse_line(self._chunk({}, reason))

    def usage(self, usage: Usage) -> str:
        chunk = self._envelope(self.object_name)
        chunk["choices"] = []
        chunk["usage"] = usage.as_dict()
        return sse_line(chunk)

    def body(self, content: str, reasoning: str, tool_calls: list,
             finish_reason: str, usage: Usage) -> dict:
        message = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = reasoning
        if tool_calls and self.legacy_functions:
            message["function_call"] = tool_calls[0]["function"]
            message["content"] = content or None
        elif tool_calls:
            message["tool_calls"] = tool_calls
            message["content"] = content or None
        response = self._envelope("chat.completion")
        response["choices"] = [{"index": 0, "message": message, "logprobs": None,
                                "finish_reason": finish_reason}]
        response["usage"] = usage.as_dict()
        return response


class CompletionChunks(ChatChunks):
    """The same for text_completion responses (/v1/completions): no role chunk,
    text instead of deltas, no reasoning or tool calls."""

    object_name = "text_completion"
    id_prefix = "cmpl"

    def _make_templates(self) -> None:
        self._content = _SseTemplate(self._chunk({"text": _SLOT}))

    def _chunk(self, delta: dict, finish_reason: Optional[str] = None) -> dict:
        chunk = self._envelope(self.object_name)
        chunk["choices"] = [{"index": 0, "text": delta.get("text", ""), "logprobs": None,
                             "finish_reason": finish_reason}]
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def role(self) -> Optional[str]:
        return None

    def reasoning(self, text: str) -> str:
        return ""  # a plain completion has no reasoning channel

    def tool_calls(self, calls: list) -> str:
        return ""

    def body(self, content: str, reasoning: str, tool_calls: list,
             finish_reason: str, usage: Usage) -> dict:
        response = self._envelope("text_completion")
        response["choices"] = [{"index": 0, "text": content, "logprobs": None,
                                "finish_reason": finish_reason}]
        response["usage"] = usage.as_dict()
        return response


def model_card(info) -> dict:
    """One /v1/models entry for a registry.ModelInfo."""
    return {"id": info.id, "object": "model", "created": int(info.created),
            "owned_by": "rkllm-api", "device": info.device,
            "context_length": info.context_length,
            "capabilities": list(info.capabilities), "aliases": list(info.aliases)}


def model_list(infos) -> dict:
    return {"object": "list", "data": [model_card(info) for info in infos]}

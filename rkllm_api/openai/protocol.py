"""OpenAI wire types: request validation and response/chunk builders.

Everything the server says to or accepts from a client in the OpenAI format lives
here, apart from the serving logic (routes.py, rkllm_api/chat.py): the split vLLM
makes between its protocol models and its serving code. Nothing here knows Flask,
the engine or a runtime: parse functions take the decoded JSON body and return the
typed request (rkllm_api.request) or raise RequestError; builders turn pipeline
results into dicts and server-sent-event lines.

The streaming path is hot: chunk builders render each kind of chunk from a JSON
template split once around its variable part, so a token costs one
json.dumps of a string and two concatenations.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Optional

from rkllm_api.errors import RequestError
from rkllm_api.fields import (INT32_MAX, is_int, is_number, message_role, optional_bool,
                              optional_str, stop_sequences)
from rkllm_api.request import (ChatRequest, CompletionRequest, ImagePart, LoraChoice, Message,
                               ResponseFormat, TextPart, ToolCall, ToolFunction, ToolSpec)
from rkllm_api.runtimes.base import SamplingParams

# ----------------------------------------------------------------------------
# errors


def error_body(message: str, *, type: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_of(error: RequestError) -> dict:
    """OpenAI's error object for a refusal."""
    return error_body(error.message, type=error.type, param=error.param, code=error.code)


# ----------------------------------------------------------------------------
# field checks: each reads one field of the body and refuses a wrong type with a 400


def _optional_number(body: dict, name: str, low: float, high: float) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if not is_number(value) or not low <= value <= high:
        raise RequestError(f"'{name}' must be a number between {low:g} and {high:g}",
                           param=name)
    return float(value)




def _optional_int(body: dict, name: str, minimum: int, maximum: int = INT32_MAX) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or not minimum <= value <= maximum:
        raise RequestError(f"'{name}' must be an integer from {minimum} to {maximum}",
                           param=name)
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
    return stop_sequences(body.get("stop"), "stop", most=4)


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
        seed=_optional_int(body, "seed", -(2 ** 63), 2 ** 64 - 1),
    )


def _check_accepted_fields(body: dict, logprobs_max: Optional[int]) -> None:
    """Fields OpenAI defines that the server accepts and ignores (no log probabilities,
    no token biases, nothing stored): checked as OpenAI does, so a wrong one is a 400
    here as it would be there. logprobs_max: None = chat (`logprobs` a boolean and
    `top_logprobs` 0-20), else completions (`logprobs` an integer up to it)."""
    if logprobs_max is None:
        wants = optional_bool(body, "logprobs")
        top = _optional_int(body, "top_logprobs", 0, 20)
        if top is not None and not wants:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:
        _optional_int(body, "logprobs", 0, logprobs_max)
    for name in ("user", "service_tier", "suffix"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise RequestError(f"'{name}' must be a string", param=name)
    optional_bool(body, "store")
    optional_bool(body, "parallel_tool_calls")
    _check_logit_bias(body.get("logit_bias"))
    _check_string_map(body.get("metadata"), "metadata")
    modalities = body.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or
                                   not all(isinstance(m, str) for m in modalities)):
        raise RequestError("'modalities' must be a list of strings", param="modalities")


def _check_logit_bias(value) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(
            key.isdigit() and is_number(bias) and -100 <= bias <= 100
            for key, bias in value.items()):
        raise RequestError("'logit_bias' must map token ids to numbers from -100 to 100",
                           param="logit_bias")


def _check_string_map(value, name: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > 16 or not all(
            isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()):
        raise RequestError(f"'{name}' must be an object of at most 16 strings (keys up to "
                           f"64 and values up to 512 characters)", param=name)


def _check_n(body: dict) -> None:
    n = body.get("n")
    if n is not None and (not is_int(n) or n != 1):
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
_ROLE_NAMES = {"developer": "system", "function": "tool"}
TEXT_PART_TYPES = ("text", "input_text", "refusal")
IMAGE_PART_TYPES = ("image_url", "input_image", "image")
EFFORT_ON = ("low", "medium", "high")
EFFORT_OFF = ("none", "minimal")
REASONING_EFFORTS = EFFORT_OFF + EFFORT_ON
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOOL_CHOICES = ("auto", "none", "required")


def _text_part(part: dict, kind: str, param: str) -> TextPart:
    value = part.get("refusal" if kind == "refusal" else "text")
    if not isinstance(value, str):
        raise RequestError(f"'{param}.text' must be a string", param=param)
    return TextPart(value)


def _image_part(part: dict, param: str) -> ImagePart:
    """image_url: {"url": ..., "detail": ...} or a plain URL string (input_image)."""
    value = part.get("image_url", part.get("image"))
    detail = "auto"
    if isinstance(value, dict):
        detail = value.get("detail") or "auto"
        value = value.get("url")
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"'{param}' needs an image URL or data URL", param=param)
    if not isinstance(detail, str):
        raise RequestError(f"'{param}.detail' must be a string", param=param)
    return ImagePart(value.strip(), detail)


def _content_parts(content, where: str) -> Optional[tuple]:
    """A message content as typed parts (None when the content is null)."""
    param = f"{where}.content"
    if content is None:
        return None
    if isinstance(content, str):
        return (TextPart(content),)
    if not isinstance(content, list):
        raise RequestError(f"'{param}' must be a string or a list of content parts",
                           param=param)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(f"'{param}' parts must be objects with a 'type'", param=param)
        kind = part["type"]
        if kind in TEXT_PART_TYPES:
            parts.append(_text_part(part, kind, f"{param}[{j}]"))
        elif kind in IMAGE_PART_TYPES:
            parts.append(_image_part(part, f"{param}[{j}]"))
        else:
            raise RequestError(f"'{param}[{j}].type' must be 'text' or 'image_url', not {kind!r}",
                               param=param)
    return tuple(parts)


def _arguments_text(arguments, param: str) -> str:
    if arguments is None:
        return ""
    if isinstance(arguments, dict):   # some clients echo parsed arguments back
        return json.dumps(arguments, ensure_ascii=False)
    if not isinstance(arguments, str):
        raise RequestError(f"'{param}.arguments' must be a string", param=param)
    return arguments


def _history_calls(raw: dict, where: str) -> tuple:
    """An assistant message's tool_calls (or legacy function_call) as ToolCalls."""
    calls = raw.get("tool_calls")
    if calls is None and raw.get("function_call") is not None:
        calls = [{"function": raw["function_call"]}]
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise RequestError(f"'{where}.tool_calls' must be a list", param=f"{where}.tool_calls")
    parsed = []
    for i, call in enumerate(calls):
        param = f"{where}.tool_calls[{i}].function"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"'{param}.name' must be a string", param=param)
        call_id = call.get("id") or ""
        if not isinstance(call_id, str):
            raise RequestError(f"'{where}.tool_calls[{i}].id' must be a string", param=param)
        parsed.append(ToolCall(function["name"], _arguments_text(function.get("arguments"), param),
                               call_id))
    return tuple(parsed)


def _message(raw, index: int, call_names: dict) -> Message:
    where, role = message_role(raw, index, MESSAGE_ROLES)
    parts = _content_parts(raw.get("content"), where)
    if parts is None and role not in ("assistant", "function"):
        raise RequestError(f"'{where}.content' is required for role '{role}'",
                           param=f"{where}.content")
    role = _ROLE_NAMES.get(role, role)
    name = optional_str(raw, "name", where)
    call_id = optional_str(raw, "tool_call_id", where)
    calls = _history_calls(raw, where) if role == "assistant" else ()
    for call in calls:
        if call.id:
            call_names[call.id] = call.name
    if role == "tool" and not name:
        name = call_names.get(call_id, "")
    return Message(role, parts or (), calls, call_id, name)


def parse_messages(messages) -> tuple:
    """An OpenAI `messages` array as typed Messages (tool results learn the name of
    the function they answer from the earlier call's id)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    call_names: dict = {}
    return tuple(_message(m, i, call_names) for i, m in enumerate(messages))


def _thinking_switch(body: dict) -> Optional[bool]:
    """What the request asks for: True, False or None (nothing said). First present
    wins: chat_template_kwargs.enable_thinking (or .thinking), enable_thinking,
    think, reasoning_effort. Every value is validated even when an earlier one wins."""
    kwargs = _optional_object(body, "chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        effort = effort.lower()
    if effort is not None and effort not in REASONING_EFFORTS:
        raise RequestError(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}",
                           param="reasoning_effort")
    found = None
    for source, holder, key in (("chat_template_kwargs.enable_thinking", kwargs, "enable_thinking"),
                                ("chat_template_kwargs.thinking", kwargs, "thinking"),
                                ("enable_thinking", body, "enable_thinking"),
                                ("think", body, "think")):
        value = holder.get(key)
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"'{source}' must be a boolean", param=source.split(".")[0])
        if found is None:
            found = value
    if found is None and effort is not None:
        found = effort in EFFORT_ON
    return found


def _response_format(body: dict) -> ResponseFormat:
    value = body.get("response_format")
    if value is None:
        return ResponseFormat()
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise RequestError("'response_format' must be an object whose 'type' is one of "
                           + ", ".join(RESPONSE_FORMATS), param="response_format")
    if value["type"] != "json_schema":
        return ResponseFormat(value["type"])
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or \
            not _SCHEMA_NAME.match(spec["name"]):
        raise RequestError("'response_format.json_schema' must be an object with a 'name' "
                           "of 1-64 letters, digits, '_' or '-'", param="response_format")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise RequestError("'response_format.json_schema.schema' must be an object",
                           param="response_format")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError("'response_format.json_schema.strict' must be a boolean",
                           param="response_format")
    return ResponseFormat("json_schema", schema or {}, spec["name"], bool(strict))


# -- tools -----------------------------------------------------------------------

def parse_tool_request(body: dict) -> Optional[ToolSpec]:
    """The tools a chat request offers (`tools`, or the legacy `functions`), or None."""
    tools, functions = body.get("tools"), body.get("functions")
    for param, value in (("tools", tools), ("functions", functions)):
        if value is not None and not isinstance(value, list):
            raise RequestError(f"'{param}' must be an array", param=param)
    if tools and functions:
        raise RequestError("'tools' and 'functions' cannot both be given; use tools",
                           param="functions")
    if tools:
        return _parse_tools(tools, body.get("tool_choice"), body.get("parallel_tool_calls"))
    if functions:
        return _parse_functions(functions, body.get("function_call"))
    for param in ("tool_choice", "function_call"):
        if body.get(param) not in (None, "auto", "none"):
            needs = "tools" if param == "tool_choice" else "functions"
            raise RequestError(f"'{param}' needs '{needs}'", param=param)
    return None


def _parse_tools(tools: list, tool_choice, parallel) -> ToolSpec:
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise RequestError(f"'tools[{i}]' must be an object", param=f"tools[{i}]")
        if tool.get("type", "function") != "function":
            raise RequestError(f"'tools[{i}].type' must be 'function'", param=f"tools[{i}].type")
        functions.append(_parse_function(tool.get("function"), f"tools[{i}].function"))
    _check_unique(functions, "tools")
    choice, forced = _parse_choice(tool_choice, "tool_choice", functions)
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    return ToolSpec(tuple(functions), choice, forced, legacy=False,
                    parallel=parallel is not False)


def _parse_functions(functions: list, function_call) -> ToolSpec:
    parsed = [_parse_function(f, f"functions[{i}]") for i, f in enumerate(functions)]
    _check_unique(parsed, "functions")
    choice, forced = _parse_choice(function_call, "function_call", parsed)
    # The legacy answer carries a single function_call.
    return ToolSpec(tuple(parsed), choice, forced, legacy=True, parallel=False)


def _parse_function(function, where: str) -> ToolFunction:
    if not isinstance(function, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    name = function.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise RequestError(f"'{where}.name' must be 1-64 letters, digits, '_', '.' or '-'",
                           param=f"{where}.name")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise RequestError(f"'{where}.description' must be a string", param=f"{where}.description")
    if function.get("strict") is not None and not isinstance(function["strict"], bool):
        raise RequestError(f"'{where}.strict' must be a boolean", param=f"{where}.strict")
    parameters = function.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise RequestError(f"'{where}.parameters' must be a JSON Schema object",
                           param=f"{where}.parameters")
    return ToolFunction(name, description, parameters)


def _check_unique(functions, param: str) -> None:
    seen = set()
    for f in functions:
        if f.name in seen:
            raise RequestError(f"'{param}': function name {f.name!r} is given twice", param=param)
        seen.add(f.name)


def _parse_choice(choice, param: str, functions) -> tuple:
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise RequestError(f"'{param}' must be one of {', '.join(_TOOL_CHOICES)} or a function",
                               param=param)
        if param == "function_call" and choice == "required":
            raise RequestError("'function_call' must be 'auto', 'none' or {\"name\": ...}",
                               param=param)
        return choice, None
    if not isinstance(choice, dict):
        raise RequestError(f"'{param}' must be a string or an object", param=param)
    # {"type": "function", "function": {"name": X}}, or the flat {"name": X}.
    named = choice.get("function") if isinstance(choice.get("function"), dict) else choice
    name = named.get("name")
    if not isinstance(name, str):
        raise RequestError(f"'{param}' must name a function", param=param)
    if name not in {f.name for f in functions}:
        raise RequestError(f"'{param}' names {name!r}, which is not among the offered functions",
                           param=param)
    return "named", name


def parse_chat_request(body) -> ChatRequest:
    """Validate a /v1/chat/completions body into the typed request. Unknown fields
    are ignored."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = parse_messages(body.get("messages"))
    _check_n(body)
    _check_accepted_fields(body, logprobs_max=None)
    use_cache = body.get("use_cache")
    if use_cache is not None and not isinstance(use_cache, str):
        raise RequestError("'use_cache' must be the name of a prompt cache", param="use_cache")
    return ChatRequest(
        model=_model_name(body),
        messages=messages,
        stream=optional_bool(body, "stream"),
        include_usage=_include_usage(body),
        max_tokens=_max_tokens(body),
        stop=_stop_sequences(body),
        sampling=_sampling(body),
        tools=parse_tool_request(body),
        thinking=_thinking_switch(body),
        response_format=_response_format(body),
        use_cache=use_cache or "",
        lora=parse_lora(body),
    )


# ----------------------------------------------------------------------------
# text completion requests


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
    if optional_bool(body, "echo"):
        raise RequestError("'echo' is not supported", param="echo")
    _check_n(body)
    _check_accepted_fields(body, logprobs_max=5)
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestError("only 'best_of': 1 is supported", param="best_of")
    return CompletionRequest(
        model=_model_name(body),
        prompt=_prompt_text(body),
        stream=optional_bool(body, "stream"),
        include_usage=_include_usage(body),
        max_tokens=_max_tokens(body),
        stop=_stop_sequences(body),
        sampling=_sampling(body),
        lora=parse_lora(body),
    )


LORA_MAX_SCALE = 4.0


def parse_lora(body: dict) -> Optional[LoraChoice]:
    """`lora`: an adapter name, or {"name": ..., "scale": ...} (scale 0 to 4). The
    adapter is one of the model's (`<model>:<adapter>` in /v1/models); the chat
    service checks that it exists."""
    value = body.get("lora")
    if value is None:
        return None
    scale = None
    if isinstance(value, dict):
        try:
            scale = _optional_number(value, "scale", 0.0, LORA_MAX_SCALE)
        except RequestError:   # named as the client wrote it, not as a top-level "scale"
            raise RequestError(f"'lora.scale' must be a number between 0 and "
                               f"{LORA_MAX_SCALE:g}", param="lora.scale") from None
        value = value.get("name")
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise RequestError("'lora' must name one of the model's LoRA adapters, as a string "
                           "or {\"name\": ..., \"scale\": ...}", param="lora")
    return LoraChoice(value.strip(), scale)


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


def usage_body(usage) -> dict:
    """OpenAI's usage object for a pipeline.Usage."""
    return {"prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


DONE_LINE = "data: [DONE]\n\n"
KEEP_ALIVE_LINE = ": keep-alive\n\n"
_COMPACT = {"separators": (",", ":"), "ensure_ascii": False}
_SLOT = "\u0000slot\u0000"  # a marker that json.dumps renders as a unique quoted string
_encode_json_string = json.encoder.encode_basestring  # what dumps(ensure_ascii=False) uses


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
        # The C string encoder json.dumps(text, ensure_ascii=False) ends up calling,
        # without dumps' per-call setup: this runs once per streamed token.
        return self.head + _encode_json_string(text) + self.tail


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

    def finish_reason(self, reason: str) -> str:
        """The pipeline's finish reason in OpenAI's words: a `functions` request
        (the legacy mode) ends with "function_call" where tools end with "tool_calls"."""
        if reason == "tool_calls" and self.legacy_functions:
            return "function_call"
        return reason

    def finish(self, reason: str, error: Optional[str] = None) -> str:
        chunk = self._chunk({}, self.finish_reason(reason))
        if error:
            chunk["error"] = refusal_error(error)
        return sse_line(chunk)

    def usage(self, usage) -> str:
        chunk = self._envelope(self.object_name)
        chunk["choices"] = []
        chunk["usage"] = usage_body(usage)
        return sse_line(chunk)

    def body(self, content: str, reasoning: str, tool_calls: list,
             finish_reason: str, usage, error: Optional[str] = None) -> dict:
        message = {"role": "assistant", "content": None if error else content}
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
                                "finish_reason": self.finish_reason(finish_reason)}]
        response["usage"] = usage_body(usage)
        if error:
            response["error"] = refusal_error(error)
        return response


def refusal_error(message: str) -> dict:
    """The error field beside finish_reason "error": an answer the server would not
    give (structured output that did not validate after the retry)."""
    return {"message": message, "type": "server_error", "param": None,
            "code": "invalid_structured_output"}


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
             finish_reason: str, usage, error: Optional[str] = None) -> dict:
        response = self._envelope("text_completion")
        response["choices"] = [{"index": 0, "text": content, "logprobs": None,
                                "finish_reason": finish_reason}]
        response["usage"] = usage_body(usage)
        return response


def model_card(info) -> dict:
    """One /v1/models entry for a registry.ModelInfo. A model whose file cannot be
    served is listed with "available": false and the reason (which names no path)."""
    card = {"id": info.id, "object": "model", "created": int(info.created),
            "owned_by": "rkllm-api", "device": info.device,
            "context_length": info.context_length,
            "capabilities": list(info.capabilities), "aliases": list(info.aliases),
            "available": info.available}
    if info.problem:
        card["problem"] = info.problem
    return card


def model_list(infos) -> dict:
    return {"object": "list", "data": [model_card(info) for info in infos]}

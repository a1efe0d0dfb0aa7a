"""Function calling: the prompt that teaches a request's tools (request.ToolSpec),
and the parsing of calls out of the model's answer.

The model is taught the Qwen/Hermes convention (tools listed as JSON lines inside
`<tools>`, calls written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`)
because the small models this server runs were trained on it. Answers are also
accepted as a bare JSON object (or a list of them), possibly in a ```json fence,
as long as the whole answer is that JSON.

Decisions:
- A call naming a function the request did not offer, or whose JSON is malformed,
  stays content (the user sees what the model wrote); parsing never raises.
- Calls are emitted when their JSON is complete, so the arguments come as one
  fragment; content streams freely except text that may begin a call.
- An answer that starts with `{`, `[` or a ```json fence is held until the end,
  since only then is it known whether the whole answer is a call.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import replace
from typing import NamedTuple, Optional

from rkllm_api.request import ToolSpec

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


# -- prompt ------------------------------------------------------------------

NO_CALL_NOTE = "(Answer now in plain text; do not call a function.)"


def no_call_note(spec: Optional[ToolSpec]) -> str:
    """For tool_choice "none" with functions offered (Home Assistant's follow-up after
    a call): the note added to the newest turn. The tools text itself stays in the
    system prompt (see prefix_tools_prompt), so the prompt's prefix is unchanged."""
    if spec is None or spec.choice != "none" or not spec.functions:
        return ""
    return NO_CALL_NOTE


def prefix_tools_prompt(spec: Optional[ToolSpec]) -> str:
    """The tools text for the system prompt. tool_choice "none" keeps the text a
    request with "auto" gets: the conversation before it stays a prefix the KV cache
    holds, and no_call_note() tells the model not to call."""
    if spec is not None and spec.choice == "none" and spec.functions:
        spec = replace(spec, choice="auto")
    return render_tools_prompt(spec)


def render_tools_prompt(spec: Optional[ToolSpec]) -> str:
    """Instructions appended to the system text; "" when no tool may be called."""
    if spec is None or spec.choice == "none" or not spec.functions:
        return ""
    offered = spec.functions
    if spec.choice == "named":
        offered = tuple(f for f in spec.functions if f.name == spec.forced_name)
    lines = [json.dumps(f.as_openai(), ensure_ascii=False) for f in offered]
    rule = {
        "auto": "Call a function only when it helps to answer; otherwise reply normally.",
        "required": "You must call at least one of these functions in this reply.",
        "named": f"You must call the function {spec.forced_name} in this reply.",
    }[spec.choice]
    if not spec.parallel:
        rule += " Call at most one function."
    return ("# Tools\n\n"
            "You can call functions to help the user. They are described below, "
            "one JSON object per line, between <tools> and </tools>:\n"
            "<tools>\n" + "\n".join(lines) + "\n</tools>\n\n"
            "To call a function, write a JSON object with the function name and its "
            "arguments between <tool_call> and </tool_call>, one block per call:\n"
            "<tool_call>\n"
            '{"name": "<function name>", "arguments": {"<argument>": "<value>"}}\n'
            "</tool_call>\n"
            f"{rule} Results come back between <tool_response> and </tool_response>; "
            "use them to answer the user.")


def render_tool_calls_for_history(tool_calls) -> str:
    """An assistant message's tool calls (request.ToolCall) written back as the
    model writes them."""
    blocks = []
    for call in tool_calls:
        try:
            value = json.loads(call.arguments) if call.arguments.strip() else {}
        except ValueError:
            value = call.arguments
        body = json.dumps({"name": call.name, "arguments": value}, ensure_ascii=False)
        blocks.append(f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}")
    return "\n".join(blocks)


def render_tool_result(content: str, name: Optional[str] = None) -> str:
    """A tool's result as the model is told to expect it. The name is not written:
    the Qwen convention pairs results with calls by order (prompts.py labels the
    turn with it instead)."""
    return f"<tool_response>\n{content.strip()}\n</tool_response>"


def canonical_tool_calls(tool_calls) -> tuple:
    """(name, arguments with sorted keys) per call, ids ignored: equal for a call
    the server parsed and the same call echoed back by a client."""
    pairs = []
    for call in tool_calls:
        try:
            arguments = json.dumps(json.loads(call.arguments.strip() or "{}"), sort_keys=True,
                                   separators=(",", ":"), ensure_ascii=False)
        except ValueError:
            arguments = call.arguments.strip()
        pairs.append((call.name, arguments))
    return tuple(pairs)


# -- answer parsing ----------------------------------------------------------

class ToolEvent(NamedTuple):
    """("content", text) | ("call", index, call_id, name) | ("arguments", index, fragment).
    For "arguments" the fragment is in `text`."""
    kind: str
    text: str = ""
    index: int = -1
    call_id: str = ""
    name: str = ""


_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class ToolCallParser:
    """Streaming extraction of tool calls from an answer (see module notes)."""

    def __init__(self, spec: Optional[ToolSpec]):
        self._spec = spec
        self._passthrough = spec is None or spec.choice == "none" or not spec.functions
        self._mode = "text" if self._passthrough else "start"
        self._buffer = ""
        self._calls: list = []
        self._events: list = []
        self._trim_after_call = False

    @property
    def calls(self) -> list:
        """OpenAI tool_calls of the answer so far; [] when there are none."""
        return [dict(c, function=dict(c["function"])) for c in self._calls]

    def feed(self, text: str) -> list:
        self._buffer += text
        self._process(final=False)
        return self._take()

    def finish(self) -> list:
        self._process(final=True)
        return self._take()

    # -- internals -----------------------------------------------------------

    def _take(self) -> list:
        events, self._events = self._events, []
        return events

    def _content(self, text: str) -> None:
        if self._trim_after_call:
            # Whitespace between or after calls is noise.
            text = text.lstrip()
            if not text:
                return
            self._trim_after_call = False
        if not text:
            return
        last = self._events[-1] if self._events else None
        if last is not None and last.kind == "content":
            self._events[-1] = ToolEvent("content", last.text + text)
        else:
            self._events.append(ToolEvent("content", text))

    def _process(self, final: bool) -> None:
        if self._passthrough:
            self._content(self._buffer)
            self._buffer = ""
            return
        if self._mode == "start":
            decision = _classify_start(self._buffer)
            if decision == "undecided" and not final:
                return
            self._mode = "json" if decision == "json" else "text"
        if self._mode == "json":
            if final:
                self._finish_bare_json()
            return
        self._scan_tags(final)

    def _scan_tags(self, final: bool) -> None:
        while self._buffer:
            if self._mode == "tag":
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    if final:
                        self._close_tag(self._buffer, CALL_OPEN + self._buffer)
                        self._buffer = ""
                    return
                inner = self._buffer[:end]
                raw = CALL_OPEN + inner + CALL_CLOSE
                self._buffer = self._buffer[end + len(CALL_CLOSE):]
                self._close_tag(inner, raw)
                self._mode = "text"
                continue
            start = self._buffer.find(CALL_OPEN)
            if start >= 0:
                self._content(self._buffer[:start])
                self._buffer = self._buffer[start + len(CALL_OPEN):]
                self._mode = "tag"
                continue
            keep = 0 if final else _partial_suffix(self._buffer, CALL_OPEN)
            self._content(self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return

    def _close_tag(self, inner: str, raw: str) -> None:
        calls = _calls_from_json(_strip_fence(inner), self._spec)
        if calls is None:
            self._content(raw)
            return
        for name, arguments in calls:
            self._add_call(name, arguments)

    def _finish_bare_json(self) -> None:
        calls = _calls_from_json(_strip_fence(self._buffer), self._spec)
        if calls is None:
            self._content(self._buffer)
        else:
            for name, arguments in calls:
                self._add_call(name, arguments)
        self._buffer = ""

    def _add_call(self, name: str, arguments: str) -> None:
        if self._calls and not self._spec.parallel:
            return            # one call per answer: later ones are dropped
        index = len(self._calls)
        call_id = new_call_id()
        self._calls.append({"id": call_id, "type": "function",
                            "function": {"name": name, "arguments": arguments}})
        self._events.append(ToolEvent("call", index=index, call_id=call_id, name=name))
        self._events.append(ToolEvent("arguments", text=arguments, index=index))
        self._trim_after_call = True


def _classify_start(buffer: str) -> str:
    """Whether an answer is a bare JSON call candidate: "json", "text" or "undecided"."""
    head = buffer.lstrip()
    if not head:
        return "undecided"
    if head[0] in "{[":
        return "json"
    if not head.startswith("```"):
        return "undecided" if "```".startswith(head) else "text"
    newline = head.find("\n")
    if newline < 0:
        return "undecided" if len(head) < 24 else "text"
    if head[3:newline].strip().lower() not in ("", "json"):
        return "text"
    body = head[newline + 1:].lstrip()
    if not body:
        return "undecided"
    return "json" if body[0] in "{[" else "text"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper beginning of tag."""
    lt = text.rfind("<", max(0, len(text) - len(tag) + 1))
    if lt >= 0 and tag.startswith(text[lt:]):
        return len(text) - lt
    return 0


_FENCE = re.compile(r"^\s*```[A-Za-z_]*\s*\n(.*?)\n?\s*```\s*$", re.S)


def _strip_fence(text: str) -> str:
    match = _FENCE.match(text)
    return match.group(1) if match else text


def _calls_from_json(text: str, spec: ToolSpec) -> Optional[list]:
    """[(name, arguments_json)] when text is nothing but valid calls, else None."""
    values = _json_values(text.strip())
    if not values:
        return None
    objects = []
    for value in values:
        objects.extend(value if isinstance(value, list) else [value])
    calls = [_call_from_object(obj, spec) for obj in objects]
    if not calls or any(call is None for call in calls):
        return None
    return calls


def _json_values(text: str) -> list:
    """Every JSON value in text, one after another (whitespace or commas between)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return []
        values.append(value)
        while i < len(text) and (text[i].isspace() or text[i] == ","):
            i += 1
    return values


def _call_from_object(obj, spec: ToolSpec) -> Optional[tuple]:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):   # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or spec.function(name) is None:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)

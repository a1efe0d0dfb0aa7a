"""Typed request messages -> the plain-text prompt a runtime wraps in its chat template.

The runtime applies the model's own template to what we send (and treats special
tokens written as text as plain text), so the prompt is readable text: the system
text, then, when there is history, every message labelled `User:` / `Assistant:`
with a blank line between them, ending with the newest user (or tool) turn.
Special tokens found in client text are removed.

Besides the full prompt, `BuiltPrompt` carries what the engine needs to reuse the
KV cache across turns (issue 4): the new part of the conversation (`tail_text`)
and normalized keys of the conversation before and including it; and the same
conversation as real turns (`turns`, issue 16) for a runtime that renders the
model's own chat template itself (the CPU; the NPU with the model's tokenizer), where
the labelled text above is not used.

Token counts come from the runtime's tokenizer when it offers one
(`count_tokens(text) -> int | None`), otherwise from an estimate of one token per
3.5 characters (English prose averages about 4 characters per token with the
tokenizers of the models we run; code and other languages use more tokens, so the
estimate leans high). Estimated prompts may exceed the context by the settings'
context_overflow_tolerance (1.10) before they are rejected, because the estimate
is rough; counted prompts must leave at least one token for the answer.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Optional

from rkllm_api.text import thinking
from rkllm_api.text import tools

CHARS_PER_TOKEN = 3.5

# Chat-template control tokens of the model families we serve. Written as text
# they would not be special to the runtime, but they confuse the model.
_SPECIAL_TOKENS = re.compile(
    r"<\|[^<>|\s]{1,40}\|>"                 # <|im_start|>, <|eot_id|>, <|endoftext|>
    r"|<\uff5c[^<>\uff5c]{1,40}\uff5c>"     # DeepSeek's full-width bars
    r"|</?s>|\[/?INST\]|<</?SYS>>"          # Llama 2 / Mistral
    r"|<start_of_turn>|<end_of_turn>|<bos>|<eos>")  # Gemma


class PromptTooLong(ValueError):
    """The prompt does not fit the context even after dropping old turns."""

    def __init__(self, prompt_tokens: int, context_length: int, estimated: bool,
                 param: str = "messages"):
        self.param = param                  # the request field the prompt came from
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        self.estimated = estimated
        how = "about " if estimated else ""
        super().__init__(f"This model's context length is {context_length} tokens, but the "
                         f"prompt is {how}{prompt_tokens} tokens even after dropping older "
                         f"messages. Shorten the messages.")


@dataclass(frozen=True)
class BuiltPrompt:
    text: str                 # the whole prompt, for a fresh KV cache
    system: str               # the system text (also at the top of text)
    conversation_text: str    # text without the system part
    tail_text: str            # what is new since the last assistant message
    tail_role: str            # "user" or "tool"
    prompt_tokens: int
    tail_tokens: int
    tokens_estimated: bool
    history_key: tuple        # the conversation before the tail, normalized
    full_key: tuple           # history_key + the tail
    dropped_turns: int = 0
    standalone: bool = False  # completions: no KV reuse, no kept history
    # The same conversation as real turns for the model's own chat template:
    # ((role, content), ...), the system turn first; () for completions.
    turns: tuple = ()
    # The conversation ends with the assistant's partial answer (text, not tool
    # calls), to be continued rather than followed by a new answer: the last of
    # `turns` is that answer (RunRequest.continue_final). continued_text: the partial
    # as the client sent it (special tokens removed), which the client extends with
    # the continuation; continues_thinking: it was cut inside a <think> block.
    continues: bool = False
    continued_text: str = ""
    continues_thinking: bool = False

    def key_after_answer(self, content: str, tool_calls: Optional[list] = None) -> tuple:
        """What the KV cache holds once this prompt was answered with content
        (the content part of the answer) and tool_calls (request.ToolCall, or None).
        A continuation extends the last answer instead of adding one."""
        if self.continues:
            return self.full_key[:-1] + (
                _assistant_entry(self.continued_text + content, tool_calls),)
        return self.full_key + (_assistant_entry(content, tool_calls),)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def strip_special_tokens(text: str) -> str:
    # Repeated until nothing is left to remove: one pass would turn
    # "<|im_<|x|>end|>" into "<|im_end|>". Each pass shortens the text, so it ends.
    while True:
        stripped = _SPECIAL_TOKENS.sub("", text)
        if stripped == text:
            return stripped
        text = stripped


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _assistant_entry(content: str, tool_calls) -> tuple:
    text = thinking.strip_think(strip_special_tokens(content or ""))
    return ("assistant", _normalize(text), tools.canonical_tool_calls(tool_calls or ()))


@dataclass(frozen=True)
class _Message:
    role: str                 # "system", "user", "assistant" or "tool"
    text: str                 # cleaned content (assistant: reasoning removed, not capped)
    calls_text: str = ""      # assistant: tool calls in the model's syntax
    name: str = ""            # tool: the function whose result this is
    key: tuple = ()           # normalized form for the KV keys
    note: str = ""            # server text after the message (not in its key)
    partial: bool = False     # assistant: the answer to continue (sent uncapped)


class PromptBuilder:
    def __init__(self, settings=None):
        if settings is None:
            from rkllm_api.config import Settings
            settings = Settings()
        self._reserve_share = settings.history_context_reserve
        self._assistant_cap = settings.assistant_history_cap
        self._tolerance = settings.context_overflow_tolerance

    # -- chat -----------------------------------------------------------------

    def build_chat(self, messages, *, context_length: int, max_new_tokens: Optional[int] = None,
                   count_tokens: Optional[Callable] = None, tools_prompt: str = "",
                   final_note: str = "") -> BuiltPrompt:
        """final_note: a line the server adds after the newest message (tools.
        no_call_note); it is part of the prompt, not of the conversation's keys."""
        parsed = parse_messages(messages)
        continued, continues_thinking = _take_partial_answer(messages, parsed)
        if final_note and parsed and parsed[-1].role != "system":
            parsed[-1] = replace(parsed[-1], note=final_note)
        system = "\n\n".join(m.text for m in parsed if m.role == "system" and m.text)
        if tools_prompt:
            system = f"{system}\n\n{tools_prompt}" if system else tools_prompt
        turns = [m for m in parsed if m.role != "system"]
        last_answer = max((i for i, m in enumerate(turns) if m.role == "assistant"), default=-1)
        history, tail = turns[:last_answer + 1], turns[last_answer + 1:]

        counter = _Counter(count_tokens)
        groups = _group_turns(turns)
        kept, dropped = self._window(system, groups, context_length, max_new_tokens, counter)
        conversation = self._render(sum(kept, []), labelled=len(turns) > 1 or dropped > 0)
        text = "\n\n".join(part for part in (system, conversation) if part)
        prompt_tokens = counter.count(text)
        self._check_fits(prompt_tokens, context_length, counter.estimated)

        tail_role = "tool" if tail and all(m.role == "tool" for m in tail) else "user"
        # A tool tail goes to the runtime's tool role, which frames results itself.
        tail_text = "\n\n".join(_with_note(m.text, m.note) if tail_role == "tool"
                                else self._body(m) for m in tail if m.text)
        history_key = (("system", _normalize(system)),) + tuple(m.key for m in history)
        turns_kept = ((("system", system),) if system else ()) + _merged(
            (m.role, self._body(m)) for m in sum(kept, []))
        return BuiltPrompt(
            text=text, system=system, conversation_text=conversation,
            tail_text=tail_text, tail_role=tail_role,
            prompt_tokens=prompt_tokens,
            tail_tokens=counter.count(tail_text) if tail_text else 0,
            tokens_estimated=counter.estimated,
            history_key=history_key,
            full_key=history_key + tuple(m.key for m in tail),
            dropped_turns=dropped, turns=turns_kept,
            continues=continued is not None, continued_text=continued or "",
            continues_thinking=continues_thinking)

    def _window(self, system: str, groups: list, context_length: int,
                max_new_tokens: Optional[int], counter: "_Counter") -> tuple:
        """Drop the oldest turns until the prompt leaves the reserve free. The
        last turn (the newest user message and what follows it) always stays."""
        sizes = [counter.count(self._render(g, labelled=True)) for g in groups]
        fixed = (counter.count(system) if system else 0) + (sizes[-1] if sizes else 0)
        reserve = math.ceil(self._reserve_share * context_length)
        if max_new_tokens:
            reserve = max(reserve, min(max_new_tokens, context_length - fixed))
        budget = context_length - reserve
        excess = fixed + sum(sizes[:-1]) - budget
        if excess <= 0:
            return groups, 0
        # Drop in steps of a quarter of the context: the tokens to drop are rounded up
        # to the next step, so the same oldest turns stay dropped (and the prompt's
        # prefix, which the KV cache keeps, stays the same) while the chat grows by a
        # quarter of the context. Dropping one turn at a time would change the prefix,
        # and force a full prefill, every few turns.
        step = max(1, context_length // 4)
        target = math.ceil(excess / step) * step
        dropped, gone = 0, 0
        while dropped < len(groups) - 1 and gone < target:
            gone += sizes[dropped]
            dropped += 1
        return groups[dropped:], dropped

    def _check_fits(self, prompt_tokens: int, context_length: int, estimated: bool,
                    param: str = "messages") -> None:
        limit = context_length * self._tolerance if estimated else context_length - 1
        if prompt_tokens > limit:
            raise PromptTooLong(prompt_tokens, context_length, estimated, param)

    def _render(self, turns: list, labelled: bool) -> str:
        if not labelled:
            return "\n\n".join(self._body(m) for m in turns if self._body(m))
        return "\n\n".join(f"{_label(m)}{self._body(m)}" for m in turns)

    def _body(self, message: _Message) -> str:
        if message.role == "tool":
            return _with_note(tools.render_tool_result(message.text, message.name), message.note)
        if message.role != "assistant":
            return _with_note(message.text, message.note)
        if message.partial:   # continued as it is: a capped text would be another answer
            return message.text
        text = cap_text(message.text, self._assistant_cap)
        return "\n".join(part for part in (text, message.calls_text) if part)

    # -- completions --------------------------------------------------------

    def build_completion(self, prompt: str, *, context_length: int,
                         max_new_tokens: Optional[int] = None,
                         count_tokens: Optional[Callable] = None) -> BuiltPrompt:
        """/v1/completions: the prompt string as it is (special tokens removed).
        Standalone: the engine neither reuses nor keeps the KV cache for it."""
        text = strip_special_tokens(prompt)
        counter = _Counter(count_tokens)
        tokens = counter.count(text)
        self._check_fits(tokens, context_length, counter.estimated, param="prompt")
        key = (("prompt", _normalize(text)),)
        return BuiltPrompt(text=text, system="", conversation_text=text, tail_text=text,
                           tail_role="user", prompt_tokens=tokens, tail_tokens=tokens,
                           tokens_estimated=counter.estimated, history_key=(),
                           full_key=key, standalone=True)


def _take_partial_answer(messages, parsed: list) -> tuple:
    """A conversation ending with an assistant message is a partial answer to continue
    (Ollama, llama.cpp's server and Open WebUI's "Continue Response" send the partial
    last and append what comes back). (the partial as sent, special tokens removed,
    or None; whether it ends inside a <think> block). Changes parsed in place: the
    last message becomes the text to continue; an empty one (no text, no tool calls)
    is dropped, continuing nothing is a new answer. Tool calls are a finished answer:
    a new answer follows them, as before."""
    if len(parsed) < 2 or parsed[-1].role != "assistant" or messages[-1].tool_calls:
        return None, False
    sent = strip_special_tokens(messages[-1].text)
    text, inside = thinking.partial_answer(sent)
    if not text.strip():
        parsed.pop()
        return None, False
    parsed[-1] = replace(parsed[-1], text=text, partial=True)
    return sent, inside


def _merged(pairs) -> tuple:
    """(role, content) pairs with neighbours of the same role joined: templates that
    insist on alternating user and assistant turns (Mistral, Gemma) would refuse two
    user turns in a row (a function result after a question, say)."""
    merged: list = []
    for role, content in pairs:
        if merged and merged[-1][0] == role:
            merged[-1] = (role, f"{merged[-1][1]}\n\n{content}")
        else:
            merged.append((role, content))
    return tuple(merged)


def _with_note(text: str, note: str) -> str:
    return f"{text}\n\n{note}" if note else text


def _label(message: _Message) -> str:
    if message.role == "tool":
        return f"Tool result ({message.name}):\n" if message.name else "Tool result:\n"
    return "User: " if message.role == "user" else "Assistant: "


class _Counter:
    """Counts with the runtime's tokenizer when it answers, else estimates."""

    def __init__(self, count_tokens: Optional[Callable]):
        self._count = count_tokens
        self.estimated = False

    def count(self, text: str) -> int:
        counted = self._count(text) if self._count else None
        if counted is None:
            self.estimated = True
            return estimate_tokens(text)
        return counted


def cap_text(text: str, limit: int) -> str:
    """text cut to at most limit characters at a word boundary, with an ellipsis."""
    if limit <= 0 or len(text) <= limit:
        return text
    cut = text[:limit - 1]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip() + "\u2026"


def _group_turns(turns: list) -> list:
    """Messages grouped into turns, each starting at a user message."""
    groups: list = []
    for message in turns:
        if message.role == "user" or not groups:
            groups.append([message])
        else:
            groups[-1].append(message)
    return groups


# -- messages ------------------------------------------------------------------

def parse_messages(messages) -> list:
    """Typed request Messages (rkllm_api.request) as the builder's _Message list:
    special tokens removed, reasoning taken out of earlier answers, the soft
    thinking switches removed from user text."""
    if not messages:
        raise ValueError("messages must be a non-empty array")
    parsed = []
    for message in messages:
        text = strip_special_tokens(message.text)
        if message.role == "system":
            parsed.append(_Message("system", text.strip()))
        elif message.role == "user":
            text, _ = thinking.remove_soft_switches(text)
            images = tuple(image.digest for image in message.images)
            parsed.append(_Message("user", text.strip(), key=("user", _normalize(text), images)))
        elif message.role == "assistant":
            calls_text = tools.render_tool_calls_for_history(message.tool_calls)
            parsed.append(_Message("assistant", thinking.strip_think(text), calls_text,
                                   key=_assistant_entry(text, message.tool_calls)))
        else:
            parsed.append(_Message("tool", text.strip(), name=message.name,
                                   key=("tool", _normalize(text))))
    return parsed

"""Reasoning models: `<think>` blocks in answers, and whether to think at all.

`ThinkSplitter` sorts a streamed answer into reasoning and content as tokens
arrive; `split_think` / `strip_think` do the same for whole texts (non-streamed
answers, prior assistant turns in the history). `resolve_thinking` decides whether
a request runs with thinking enabled.

Rules (kept identical for streams and whole texts, because the KV-cache keys in
prompts.py compare an answer the server streamed with the same answer echoed back
by the client):
- `<think>` opens a block only at the start of the output (leading whitespace
  allowed) or at the start of a line outside a ``` code fence. A `<think>` in the
  middle of a sentence or inside code is ordinary content.
- `</think>` always closes an open block. Whitespace around the reasoning and
  right after `</think>` is dropped.
- Some chat templates open the block themselves, so the output starts inside it:
  pass starts_inside=True (a leading `<think>` is then swallowed, so it is right
  for both kinds of template). Without it, a `</think>` that arrives before any
  `<think>` is dropped from the stream; the text already streamed stays content
  (it cannot be taken back), whereas `split_think` on a whole text moves it to
  reasoning.
- A block that never closes, in an answer with no content at all, was the answer:
  a model the server treats as thinking may never write `</think>` (a non-thinking
  Qwen3 "Instruct-2507" behind a template that opens the block, a model that skips
  it). finish() then hands the whole text back as ANSWER, so the reply's content is
  never empty because of this parsing. (A stream has already sent it as reasoning;
  the pipeline retracts that for whole replies.) An unclosed block after some
  content stays reasoning.
"""
from __future__ import annotations

import re
from typing import Optional

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"
REASONING = "reasoning"
CONTENT = "content"
ANSWER = "answer"     # reasoning so far was the answer after all (see the rules)


class ThinkSplitter:
    """Streaming `<think>` parser. feed() returns (kind, text) pairs, kind being
    "reasoning" or "content"; neighbours of one kind are merged and no text is
    empty. Only a possible tag prefix (and whitespace that may precede a tag)
    is held back between calls; finish() flushes it."""

    def __init__(self, starts_inside: bool = False):
        self._inside = starts_inside
        self._pending = ""
        self._fresh = True             # nothing but whitespace seen so far
        self._skip_ws = starts_inside  # drop whitespace before the next text
        self._col0 = True              # content position is at a line start
        self._in_fence = False         # content is inside a ``` code fence
        self._line_head = ""           # start of the current content line
        self._any_tag = starts_inside  # a block was opened or closed already
        self._closed = False           # a `</think>` was seen
        self._has_content = False      # content beyond whitespace was emitted
        self._reasoning: list = []     # every reasoning piece, for ANSWER
        self._out: list = []

    def feed(self, text: str) -> list:
        self._pending += text
        self._process(final=False)
        return self._take()

    def finish(self) -> list:
        self._process(final=True)
        if not self._closed and not self._has_content and self._reasoning:
            self._out.append((ANSWER, "".join(self._reasoning)))
        return self._take()

    # -- internals -----------------------------------------------------------

    def _take(self) -> list:
        out, self._out = self._out, []
        return out

    def _emit(self, kind: str, text: str) -> None:
        if not text:
            return
        if kind == REASONING:
            self._reasoning.append(text)
        elif not self._has_content and not text.isspace():
            self._has_content = True
        if self._out and self._out[-1][0] == kind:
            self._out[-1] = (kind, self._out[-1][1] + text)
        else:
            self._out.append((kind, text))

    def _process(self, final: bool) -> None:
        text, i = self._pending, 0
        while i < len(text):
            if self._skip_ws or self._fresh:
                j = _skip_space(text, i)
                if j == len(text) and not final:
                    break                      # only whitespace so far: wait
                if self._skip_ws:
                    i = j
                    if i == len(text):
                        break
                    self._skip_ws = False
                if self._fresh:
                    i, held = self._leading_open(text, i, j, final)
                    if held:
                        break
                    continue
            if self._inside:
                i, held = self._reasoning_step(text, i, final)
            else:
                i, held = self._content_step(text, i, final)
            if held:
                break
        self._pending = text[i:]

    def _leading_open(self, text: str, i: int, j: int, final: bool):
        """At the very start: a `<think>` after optional whitespace opens a block
        (or is swallowed when the template already opened it)."""
        if text.startswith(OPEN_TAG, j):
            self._fresh = False
            self._open_block()
            return j + len(OPEN_TAG), False
        if not final and OPEN_TAG.startswith(text[j:]):
            return i, True
        self._fresh = False
        return i, False

    def _open_block(self) -> None:
        self._inside = True
        self._any_tag = True
        self._skip_ws = True

    def _close_block(self) -> None:
        self._closed = True
        self._inside = False
        self._any_tag = True
        self._skip_ws = True
        self._col0 = True
        self._line_head = ""

    def _reasoning_step(self, text: str, i: int, final: bool):
        k = text.find(CLOSE_TAG, i)
        if k >= 0:
            self._emit(REASONING, text[i:k].rstrip())
            self._close_block()
            return k + len(CLOSE_TAG), False
        end = len(text)
        if not final:
            lt = text.rfind("<", i)
            if lt >= 0 and CLOSE_TAG.startswith(text[lt:]):
                end = lt
        piece = text[i:end]
        kept = piece.rstrip()
        if final:
            self._emit(REASONING, kept)
            return len(text), False
        # Trailing whitespace waits: it is dropped if `</think>` follows.
        self._emit(REASONING, kept)
        return i + len(kept), True

    def _content_step(self, text: str, i: int, final: bool):
        rest = text[i:]
        if self._col0 and not self._in_fence:
            if rest.startswith(OPEN_TAG):
                self._open_block()
                return i + len(OPEN_TAG), False
            if not final and OPEN_TAG.startswith(rest):
                return i, True
        watch_stray = not self._any_tag
        if watch_stray:
            if rest.startswith(CLOSE_TAG):
                # The template opened the block: what came before is gone as content.
                self._close_block()
                return i + len(CLOSE_TAG), False
            if not final and CLOSE_TAG.startswith(rest):
                return i, True
        end = text.find("\n", i)
        end = len(text) if end < 0 else end + 1
        if watch_stray:
            lt = text.find("<", i + 1)
            if 0 <= lt < end:
                end = lt
        self._content_piece(text[i:end])
        return end, False

    def _content_piece(self, piece: str) -> None:
        self._emit(CONTENT, piece)
        self._line_head = (self._line_head + piece)[:64]
        self._col0 = piece.endswith("\n")
        if self._col0:
            if self._line_head.lstrip().startswith("```"):
                self._in_fence = not self._in_fence
            self._line_head = ""


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def split_think(text: str, starts_inside: bool = False) -> tuple:
    """(reasoning, content) of a whole answer."""
    if not starts_inside:
        close_at = text.find(CLOSE_TAG)
        open_at = text.find(OPEN_TAG)
        if close_at >= 0 and (open_at < 0 or open_at > close_at):
            starts_inside = True   # the template opened the block
    splitter = ThinkSplitter(starts_inside=starts_inside)
    parts = splitter.feed(text) + splitter.finish()
    if parts and parts[-1][0] == ANSWER:
        return "", parts[-1][1]
    reasoning = "".join(t for kind, t in parts if kind == REASONING)
    content = "".join(t for kind, t in parts if kind == CONTENT)
    return reasoning, content


# Open WebUI (some versions) sends earlier reasoning back folded in a <details> block.
_REASONING_DETAILS = re.compile(
    r"<details\b[^>]*\btype=[\"']reasoning[\"'][^>]*>.*?</details>\s*", re.S | re.I)


def strip_think(text: str) -> str:
    """The answer without its reasoning, for re-sending as history."""
    text = _REASONING_DETAILS.sub("", text or "")
    return split_think(text)[1].strip()


def partial_answer(text: str) -> tuple:
    """(text to continue, inside_think) for an assistant's partial answer that the
    model is to continue (an assistant prefill). Cut inside a `<think>` block (the
    rules above): the text as it is, and the continuation starts inside the block.
    Otherwise its reasoning is left out, as for any earlier answer (an Open WebUI
    <details> block, a closed <think> block), and the continuation is content."""
    text = text or ""
    splitter = ThinkSplitter()
    splitter.feed(text)
    if splitter._inside:
        return text, True
    return split_think(_REASONING_DETAILS.sub("", text))[1], False


# `/think` or `/no_think` as a word of its own (not part of a path like /a/think).
_SOFT_SWITCH = re.compile(r"(?:(?<=\s)|^)/(no_think|think)(?![\w/-])[ \t]?")
_SOFT_SWITCH_LINE = re.compile(r"^[ \t]*/(?:no_think|think)[ \t]*\n", re.M)


def remove_soft_switches(text: str) -> tuple:
    """(text without /think and /no_think, the last switch: True, False or None)."""
    found = _SOFT_SWITCH.findall(text or "")
    if not found:
        return text or "", None
    cleaned = _SOFT_SWITCH.sub("", _SOFT_SWITCH_LINE.sub("", text)).strip()
    return cleaned, found[-1] == "think"


def resolve_thinking(model_can_think: bool, requested: Optional[bool], last_user_text: str,
                     policy_off: bool) -> tuple:
    """(enable_thinking, last user text without soft switches).

    requested: what the request itself said (True, False, None for nothing), as its
    surface parsed it (OpenAI: chat_template_kwargs.enable_thinking, reasoning_effort;
    Ollama: think).

    Precedence: a model that cannot think never does; server policy (background
    tasks, Home Assistant, RAG on small contexts) turns it off; a request that
    explicitly says off is a hard off (as Qwen3's enable_thinking=False, which
    the soft switches cannot undo); then `/think` / `/no_think` in the last user
    message (the last one written wins); otherwise on."""
    cleaned, switch = remove_soft_switches(last_user_text or "")
    if not model_can_think or policy_off or requested is False:
        return False, cleaned
    if switch is not None:
        return switch, cleaned
    return True, cleaned

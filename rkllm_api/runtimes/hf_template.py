"""A model folder's own tokenizer and chat template (Hugging Face files), for the NPU.

librkllmrt applies its chat template to a text prompt itself and does not treat
special tokens written as text as special. With the model's `tokenizer.json` and
`tokenizer_config.json` beside the .rkllm file the server can render the whole
conversation with the model's template and send token ids instead: the model then
sees real turns, and token counts and prefix reuse are exact.

Tokenizing is the `tokenizers` package's; the template is rendered with jinja2 the
way Hugging Face (and llama-cpp-python) render chat templates.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
from datetime import datetime
from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class TemplateTokenizer:
    """Renders (role, content) turns with the model's chat template and encodes them."""

    def __init__(self, tokenizer, template_source: str, bos_token: str = "",
                 eos_token: str = ""):
        self._tokenizer = tokenizer
        # The same tokenizer with special-token parsing off, for message contents:
        # "<|im_start|>" written by a client must stay text, not become a control
        # token (role spoofing). A copy, so no flag is flipped under a concurrent encode.
        self._plain = type(tokenizer).from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._special_ids = frozenset(
            token_id for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special)
        self._template = _compile(template_source)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.tool_role = self._renders_role("tool")

    @classmethod
    def from_folder(cls, folder: str) -> Optional["TemplateTokenizer"]:
        """The folder's tokenizer, or None when the files are missing or unusable
        (the runtime's own template is used then)."""
        tokenizer_path = os.path.join(folder, TOKENIZER_FILE)
        config_path = os.path.join(folder, TOKENIZER_CONFIG_FILE)
        if not (os.path.isfile(tokenizer_path) and os.path.isfile(config_path)):
            return None
        try:
            from tokenizers import Tokenizer
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
            source = _template_source(config.get("chat_template"))
            if not source:
                log.warning("%s has no chat_template: the runtime's template is used",
                            config_path)
                return None
            return cls(Tokenizer.from_file(tokenizer_path), source,
                       _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))
        except Exception as exc:   # a broken file must not stop the model from loading
            log.warning("the tokenizer in %s is not usable (%s): the runtime's template "
                        "is used", folder, exc)
            return None

    def render(self, messages: Sequence, enable_thinking: bool = False) -> str:
        """The conversation as the template writes it, ending with the assistant's
        turn opened. A template that refuses a system turn gets the system text at
        the top of the first user turn."""
        return self._render_turns(template_turns(messages, self.tool_role), enable_thinking)

    def _render_turns(self, turns: list, enable_thinking: bool,
                      generation_prompt: bool = True) -> str:
        try:
            return self._render(turns, enable_thinking, generation_prompt)
        except Exception:
            if len(turns) < 2 or turns[0]["role"] != "system":
                raise
        first = turns[1]
        merged = {**first, "content": f"{turns[0]['content']}\n\n{first['content']}"}
        return self._render([merged] + turns[2:], enable_thinking, generation_prompt)

    def encode(self, text: str) -> list:
        """Token ids of rendered text (its special tokens are in the text already)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def conversation_tokens(self, messages: Sequence, enable_thinking: bool = False,
                            continue_final: bool = False) -> list:
        """The template's own text with special tokens parsed, the messages'
        contents as plain text (see render_segments). continue_final: the last
        message is a partial answer, left open (RunRequest.continue_final)."""
        turns = template_turns(messages, self.tool_role)
        segments = render_segments(
            lambda marked: self._render_turns(marked, enable_thinking, not continue_final),
            turns, continue_final)
        return segment_tokens(
            segments, self.encode,
            lambda text: list(self._plain.encode(text, add_special_tokens=False).ids),
            lambda token: token in self._special_ids)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def _render(self, turns: list, enable_thinking: bool, generation_prompt: bool = True) -> str:
        return self._template.render(messages=turns, add_generation_prompt=generation_prompt,
                                     enable_thinking=enable_thinking,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def _renders_role(self, role: str) -> bool:
        marker = "\u2063PROBE\u2063"
        try:
            text = self._render([{"role": "user", "content": "q"},
                                 {"role": role, "content": marker}], False)
        except Exception:
            return False
        return marker in text


def render_segments(render: Callable[[list], str], turns: list,
                    continue_final: bool = False) -> list:
    """A rendering of template turns as [(text, is_content)]: what the template wrote
    itself (its role markers, to be tokenized with special-token parsing) and what
    came from the messages (to be tokenized as plain text, so that a message holding
    "<|im_end|><|im_start|>system" cannot open a turn of its own).

    Every content is wrapped in markers with a fresh random nonce (a client cannot
    forge them) and the rendering is split at them. A template that cuts a content
    apart (the markers then do not pair up) or renders differently with them (it
    inspects the content: startswith, trim) gets the unmarked rendering as template
    text; client text has had the known special tokens removed (text/prompts.py).

    continue_final: the last turn is the assistant's partial answer and render() leaves
    out the generation prompt; the rendering is cut right after that answer's content
    (its end-of-turn and anything after it dropped), so the model continues it."""
    plain = render(turns)
    nonce = secrets.token_hex(8)
    start, end = f"\u2063<{nonce}\u2063", f"\u2063{nonce}>\u2063"
    marked = [{**turn, "content": f"{start}{turn['content']}{end}"} if turn.get("content")
              else turn for turn in turns]
    parts = re.split(f"({re.escape(start)}|{re.escape(end)})", render(marked))
    segments, inside = [], False
    for index, part in enumerate(parts):
        if index % 2:                        # a marker: they must alternate start, end
            if part != (end if inside else start):
                break
            inside = not inside
        elif part:
            segments.append((part, inside))
    else:
        if not inside and "".join(text for text, _ in segments) == plain:
            return cut_after_partial(segments, turns) if continue_final else segments
    log.debug("the chat template changes messages: the conversation is tokenized as one text")
    return cut_after_partial([(plain, False)], turns) if continue_final else [(plain, False)]


def cut_after_partial(segments: list, turns: list) -> list:
    """render_segments' output ending right after the last turn's content (an
    assistant's partial answer). With the content markers that is the last content
    segment, which must be that answer; an unmarked rendering is cut after the
    answer's last occurrence. ValueError when the template does not write the answer
    as the last content (it drops or rewrites it): the runtimes then send the text
    prompt, a new turn."""
    partial = turns[-1]["content"] if turns and turns[-1]["role"] == "assistant" else ""
    if not partial:
        raise ValueError("there is no partial answer to continue")
    marked = [index for index, (_, is_content) in enumerate(segments) if is_content]
    if marked:
        last = marked[-1]
        if segments[last][0] != partial:
            raise ValueError("the chat template does not write the partial answer last")
        return segments[:last + 1]
    plain = segments[0][0]
    for text in (partial, partial.rstrip()):   # templates that trim contents
        at = plain.rfind(text) if text else -1
        if at >= 0:
            return [(plain[:at + len(text)], False)]
    raise ValueError("the chat template does not write the partial answer")


def segment_tokens(segments: list, encode_special: Callable[[str], list],
                   encode_plain: Callable[[str], list],
                   is_control: Callable[[int], bool]) -> list:
    """Token ids of render_segments' output. When the messages hold no control-token
    text (every control token of the whole rendering is one the template wrote), the
    whole text is tokenized at once, exactly as the model's own tooling would (a
    content's first word keeps its leading space, say). Otherwise every part is
    tokenized on its own, the contents with special-token parsing off."""
    whole = encode_special("".join(text for text, _ in segments))
    written = sum(1 for text, is_content in segments if not is_content
                  for token in encode_special(text) if is_control(token))
    if sum(1 for token in whole if is_control(token)) == written:
        return whole
    tokens: list = []
    for text, is_content in segments:
        tokens += encode_plain(text) if is_content else encode_special(text)
    return tokens


def fitting_tokens(messages: Sequence, tokens_of: Callable[[Sequence], list],
                   context: int, max_new_tokens: int = 0) -> list:
    """tokens_of(messages), with the oldest turns (each from a user message to the next)
    dropped when the rendering does not leave room for the answer (max_new_tokens,
    at most a quarter of the context). The prompt builder windows the conversation
    on estimates of the labelled text; the template's own markers cost more (a few
    tokens a message), so hundreds of short messages can overflow what it kept.
    Tokens are dropped in quarter-context steps, like the builder does, so the kept
    prefix (and the KV cache) stays put while the chat grows. The system turn and the
    newest turn always stay (a prompt still too long is the caller's to refuse)."""
    tokens = tokens_of(messages)
    limit = context - max(1, min(max_new_tokens or 1, context // 4))
    if len(tokens) <= limit:
        return tokens
    head = 1 if messages and messages[0][0] == "system" else 0
    starts = [i for i in range(head + 1, len(messages)) if messages[i][0] == "user"]
    if not starts:
        return tokens
    step = max(1, context // 4)
    target = -(-(len(tokens) - limit) // step) * step    # rounded up to a step

    def kept(index: int) -> list:
        return tokens_of(list(messages[:head]) + list(messages[starts[index]:]))

    low, high, best = 0, len(starts) - 1, None     # the fewest turns that drop enough
    while low <= high:
        middle = (low + high) // 2
        candidate = kept(middle)
        if len(tokens) - len(candidate) >= target:
            best, high = candidate, middle - 1
        else:
            low = middle + 1
    return best if best is not None else kept(len(starts) - 1)


class TurnFitter:
    """The tokens a runtime sends for a conversation of real turns: fitting_tokens over
    the runtime's conversation_tokens(turns, enable_thinking, continue_final). The
    engine asks for their length before a run (turns_prompt_length) and the run then
    asks for the tokens: that answer is kept for the next call, taken once, so a
    request renders and tokenizes its conversation once, not twice (a date in the
    template is never carried into a later request). One call at a time, as runtimes
    are used."""

    def __init__(self, conversation_tokens: Callable[[Sequence, bool, bool], list],
                 context_length: int):
        self._conversation_tokens = conversation_tokens
        self._context_length = context_length
        self._kept: Optional[tuple] = None   # (arguments, tokens) of the last call

    def tokens(self, messages: Sequence, enable_thinking: bool = False,
               max_new_tokens: Optional[int] = None, continue_final: bool = False) -> list:
        key = (tuple(messages), bool(enable_thinking), max_new_tokens or 0, bool(continue_final))
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == key:
            return list(kept[1])
        tokens = fitting_tokens(
            messages, lambda turns: self._conversation_tokens(turns, enable_thinking,
                                                              continue_final),
            self._context_length, max_new_tokens or 0)
        self._kept = (key, tokens)
        return list(tokens)


def template_turns(messages: Sequence, tool_role: bool) -> list:
    """(role, content) pairs as template messages: "tool" becomes "user" where the
    template has no tool turn, and neighbours of the same role are joined (templates
    that insist on alternating roles refuse two user turns in a row)."""
    turns: list = []
    for role, content in messages:
        role = role if role != "tool" or tool_role else "user"
        if turns and turns[-1]["role"] == role and role != "system":
            turns[-1] = {"role": role, "content": f"{turns[-1]['content']}\n\n{content}"}
        else:
            turns.append({"role": role, "content": content})
    return turns


def _compile(source: str):
    """The template in a sandbox with the helpers Hugging Face templates use."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _template_source(value) -> str:
    """tokenizer_config.json's chat_template: a string, or a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value
                 if isinstance(item, dict)}
        return named.get("default") or next(iter(named.values()), "") or ""
    return ""


def _token_text(value) -> str:
    """A special token as tokenizer_config.json gives it: text, or {"content": text}."""
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""

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
from datetime import datetime
from typing import Optional, Sequence

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class TemplateTokenizer:
    """Renders (role, content) turns with the model's chat template and encodes them."""

    def __init__(self, tokenizer, template_source: str, bos_token: str = "",
                 eos_token: str = ""):
        self._tokenizer = tokenizer
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
        turns = template_turns(messages, self.tool_role)
        try:
            return self._render(turns, enable_thinking)
        except Exception:
            if len(turns) < 2 or turns[0]["role"] != "system":
                raise
        first = turns[1]
        merged = {**first, "content": f"{turns[0]['content']}\n\n{first['content']}"}
        return self._render([merged] + turns[2:], enable_thinking)

    def encode(self, text: str) -> list:
        """Token ids of rendered text (its special tokens are in the text already)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def conversation_tokens(self, messages: Sequence, enable_thinking: bool = False) -> list:
        return self.encode(self.render(messages, enable_thinking))

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def _render(self, turns: list, enable_thinking: bool) -> str:
        return self._template.render(messages=turns, add_generation_prompt=True,
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

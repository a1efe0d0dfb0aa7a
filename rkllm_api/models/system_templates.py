"""The system prompt of an NPU model without its tokenizer, given to librkllmrt's own
template through rkllm_set_chat_template.

Without the model's tokenizer the server cannot send real turns (librkllmrt does not
treat special tokens written as text as special), so the system text would reach the
model inside the user's message. rkllm_set_chat_template takes a system part, a
prefix and a postfix that the runtime does tokenize as a template, so the system text
can sit in the system role after all. The call replaces the model's template, clears
the KV cache and switches the runtime's own thinking handling off, so it is used only
where that is safe:
- a model family whose template is known exactly here (ChatML: Qwen2, Qwen2.5,
  SmolLM), or one the model's `model_config.json` spells out under "chat_template";
- never for a model that thinks (the runtime's enable_thinking would stop working) or
  has a vision encoder (its image tags belong to the runtime's template);
- never when the model folder holds its tokenizer: real turns then carry the system
  role already (runtimes/hf_template.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SYSTEM_PLACEHOLDER = "{system}"


@dataclass(frozen=True)
class SystemTemplate:
    """rkllm_set_chat_template's three parts; `system` holds SYSTEM_PLACEHOLDER where
    the system text goes. A request without system text gets no system part at all."""
    system: str
    prefix: str
    postfix: str

    def system_part(self, text: str) -> str:
        return self.system.replace(SYSTEM_PLACEHOLDER, text) if text else ""


CHATML = SystemTemplate(system="<|im_start|>system\n{system}<|im_end|>\n",
                        prefix="<|im_start|>user\n",
                        postfix="<|im_end|>\n<|im_start|>assistant\n")

# Families (models/registry.py) whose chat template is ChatML without extras.
FAMILY_TEMPLATES = {"qwen2": CHATML, "qwen": CHATML, "smollm": CHATML}


def system_template_for(model) -> Optional[SystemTemplate]:
    """The template a registry model's system prompt goes through, or None (the
    system text then stays at the top of the prompt text). model_config.json's
    "chat_template": {"system": "...{system}...", "prefix": "...", "postfix": "..."}
    sets one for any family; "chat_template": false turns it off."""
    if model.device != "npu" or {"thinking", "vision"} & set(model.capabilities):
        return None
    configured = (model.config or {}).get("chat_template")
    if configured is False:
        return None
    if isinstance(configured, dict):
        return _configured(configured)
    return FAMILY_TEMPLATES.get(model.family)


def _configured(parts: dict) -> Optional[SystemTemplate]:
    """A model_config.json template; None when it is not three strings with the
    placeholder in the system part (a broken file must not stop the model)."""
    values = [parts.get(name) for name in ("system", "prefix", "postfix")]
    if not all(isinstance(value, str) for value in values):
        return None
    if SYSTEM_PLACEHOLDER not in values[0]:
        return None
    return SystemTemplate(*values)


def runtime_options(model) -> dict:
    """open_runtime's system_template argument for a registry model (none: {})."""
    template = system_template_for(model)
    return {"system_template": template} if template is not None else {}

"""Sampling defaults per model family, model_config.json overrides, and the
per-request merge.

A model's defaults come from its family profile, then its model_config.json
"sampling" block (only the fields it names). A request may override fields; a
runtime that cannot apply a field per request (librkllmrt 1.2 fixes sampling at
init) reports it back, and the HTTP layer says so in a response header rather
than pretending.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Mapping, Optional

from rkllm_api.runtimes.base import SamplingParams

# Tuned defaults per family (figures from the seed server's measured profiles,
# plus SmolLM2's model-card recommendation of a low temperature).
FAMILY_PROFILES: Mapping[str, SamplingParams] = {
    "qwen3": SamplingParams(top_k=20, top_p=0.8, temperature=0.7, repeat_penalty=1.1,
                            presence_penalty=1.5, frequency_penalty=0.0),
    "gemma": SamplingParams(top_k=40, top_p=0.95, temperature=0.7, repeat_penalty=1.1,
                            presence_penalty=0.0, frequency_penalty=0.0),
    "phi": SamplingParams(top_k=40, top_p=0.9, temperature=0.6, repeat_penalty=1.1,
                          presence_penalty=0.0, frequency_penalty=0.0),
    "deepseek": SamplingParams(top_k=20, top_p=0.9, temperature=0.6, repeat_penalty=1.1,
                               presence_penalty=1.0, frequency_penalty=0.0),
    "llama": SamplingParams(top_k=40, top_p=0.9, temperature=0.6, repeat_penalty=1.1,
                            presence_penalty=0.0, frequency_penalty=0.0),
    "smollm": SamplingParams(top_k=40, top_p=0.9, temperature=0.2, repeat_penalty=1.1,
                             presence_penalty=0.0, frequency_penalty=0.0),
}
GENERIC_PROFILE = SamplingParams(top_k=40, top_p=0.9, temperature=0.7, repeat_penalty=1.1,
                                 presence_penalty=0.0, frequency_penalty=0.0)
# Families whose names extend a profiled one (qwen2 and qwen2.5 behave like qwen3 here).
FAMILY_ALIASES = {"qwen2": "qwen3", "qwen": "qwen3", "qwq": "qwen3", "mistral": "llama"}

SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


def profile_for(family: str) -> SamplingParams:
    family = FAMILY_ALIASES.get(family, family)
    return FAMILY_PROFILES.get(family, GENERIC_PROFILE)


def apply_overrides(base: SamplingParams, overrides: Optional[Mapping]) -> SamplingParams:
    """base with the fields named in overrides replaced; unknown keys are ignored."""
    if not overrides:
        return base
    changes = {k: v for k, v in overrides.items() if k in SAMPLING_FIELDS and v is not None}
    return replace(base, **changes)


def model_defaults(family: str, model_config: Optional[Mapping]) -> SamplingParams:
    """The model's default sampling: family profile + model_config.json "sampling"."""
    block = (model_config or {}).get("sampling")
    return apply_overrides(profile_for(family), block if isinstance(block, Mapping) else None)

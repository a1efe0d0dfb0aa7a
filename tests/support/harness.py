"""The contract-test harness: one per runtime under test.

The runtime contract suite (tests/test_runtime_contract.py) runs the same tests
against every runtime. A scripted double and a real model need different prompts
to provoke the same behaviour, so each runtime comes with a Harness that knows
which prompt does what.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rkllm_api.runtimes.base import Runtime


@dataclass
class Harness:
    name: str
    runtime: Runtime
    # Prompt whose answer contains emoji and CJK text.
    unicode_prompt: str
    # The exact answer expected for unicode_prompt, or None when the runtime is a
    # real model (then the test checks the text is clean UTF-8 with no U+FFFD).
    unicode_expected: Optional[str]
    # Prompt the runtime answers with an ERROR event (None: cannot be provoked).
    error_prompt: Optional[str]
    # Prompt that keeps generating until aborted (or for a long time).
    endless_prompt: str
    # Ordinary short prompts for multi-turn tests.
    turn_prompts: tuple
    # Width of the last hidden layer (embedding length).
    embedding_width: int
